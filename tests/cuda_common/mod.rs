//! Helpers shared by the `cuda_*` tests: getting the GPU (or skipping), and comparing tensors.
#![allow(dead_code)] // each test file uses a different part

use kiln::backend::CudaBackend;

/// GPU 0, or `None` after printing `skipped: <reason>` when there is none. With
/// `KILN_REQUIRE_GPU=1` (set on the GPU machine) a missing GPU fails the test instead, so a
/// broken setup there cannot pass as a skip.
pub fn cuda() -> Option<CudaBackend> {
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

/// Largest difference relative to the reference's largest magnitude (floored at 1e-6, so an
/// all-zero reference compares absolutely).
pub fn rel_err(reference: &[f32], got: &[f32]) -> f64 {
    assert_eq!(reference.len(), got.len(), "lengths differ");
    let scale = reference.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-6);
    let diff = reference.iter().zip(got).fold(0f64, |m, (a, b)| {
        let d = (*a as f64 - *b as f64).abs();
        if d.is_nan() { f64::INFINITY } else { m.max(d) }
    });
    diff / scale
}
