//! Helpers shared by the `cuda_*` tests: getting the GPU (or skipping), and comparing tensors.
#![allow(dead_code)] // each test file uses a different part

use kiln::backend::{CudaBackend, CudaOptions};

/// One GPU test at a time in a test binary: cuDNN 9.14 returned INTERNAL_ERROR now and then
/// when backends of several test threads worked at once, even with every submission
/// serialised. The lock is taken by a test's first `cuda()` and held by its thread until the
/// test ends (the thread exits).
static GPU_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

thread_local! {
    static HELD: std::cell::RefCell<Option<std::sync::MutexGuard<'static, ()>>> = const { std::cell::RefCell::new(None) };
}

fn take_turn() {
    HELD.with(|h| {
        let mut h = h.borrow_mut();
        if h.is_none() {
            *h = Some(GPU_TESTS.lock().unwrap_or_else(|p| p.into_inner()));
        }
    });
}

/// GPU 0, or `None` after printing `skipped: <reason>` when there is none. With
/// `KILN_REQUIRE_GPU=1` (set on the GPU machine) a missing GPU fails the test instead, so a
/// broken setup there cannot pass as a skip.
pub fn cuda() -> Option<CudaBackend> {
    take_turn();
    match CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(e) if std::env::var("KILN_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("KILN_REQUIRE_GPU=1 but the GPU is unusable: {e}")
        }
        Err(e) => {
            println!("skipped: {e}");
            None
        }
    }
}

/// Largest difference relative to the reference's largest magnitude: the measure the parity
/// tests bound by 1e-4 (through [`within`]).
pub fn rel_err(reference: &[f32], got: &[f32]) -> f64 {
    max_diff(reference, got) / scale(reference)
}

/// tests/gradcheck.rs's f32 criterion: `|a - b| <= tol * max(largest |a|, 1e-3) + 1e-6`. The
/// floor and the absolute term matter only for tensors that are analytically zero, such as the
/// bias gradient of a convolution feeding batch norm (which removes any constant), whose values
/// are f32 rounding noise near 1e-7 that no two summation orders agree on.
pub fn within(reference: &[f32], got: &[f32], tol: f64) -> bool {
    max_diff(reference, got) <= tol * scale(reference) + 1e-6
}

fn scale(reference: &[f32]) -> f64 {
    reference.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-3)
}

fn max_diff(reference: &[f32], got: &[f32]) -> f64 {
    assert_eq!(reference.len(), got.len(), "lengths differ");
    reference.iter().zip(got).fold(0f64, |m, (a, b)| {
        let d = (*a as f64 - *b as f64).abs();
        if d.is_nan() { f64::INFINITY } else { m.max(d) }
    })
}

/// GPU 0 with options (taking the test's turn like [`cuda`]); `None` where [`cuda`] skips.
pub fn cuda_with(options: CudaOptions) -> Option<CudaBackend> {
    cuda()?;
    Some(CudaBackend::with_options(0, options).expect("GPU 0 opened a moment ago"))
}
