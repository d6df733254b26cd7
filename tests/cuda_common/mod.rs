//! Helpers shared by the GPU tests: a test harness (libtest-mimic) that reports a GPU test as
//! **ignored** when there is no usable GPU, getting the GPU, and comparing tensors.
//!
//! The test files using it are `harness = false` targets (Cargo.toml) whose `main` lists their
//! tests; `cargo test FILTER`, `--exact`, `--ignored` and `--nocapture` work as with libtest.
#![allow(dead_code)] // each test file uses a different part

use kiln::backend::{CudaBackend, CudaOptions};
use libtest_mimic::{Arguments, Completion, Trial};

/// One GPU test at a time in a test binary: cuDNN 9.14 returned INTERNAL_ERROR now and then
/// when backends of several test threads worked at once, even with every submission
/// serialised. [`gpu_trial`] holds this lock while its test runs.
static GPU_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether `KILN_REQUIRE_GPU=1` (the GPU machine) asks every GPU test to run, failing where
/// its device or library is missing instead of being ignored.
pub fn require_gpu() -> bool {
    std::env::var("KILN_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// Why GPU 0 cannot be used here (`None` when it can), asked once per test binary. With
/// `KILN_REQUIRE_GPU=1` (set on the GPU machine) this is always `None`: the GPU tests then run
/// and fail loudly in [`cuda`] instead of being ignored, so a broken setup cannot pass.
pub fn gpu_missing() -> Option<&'static str> {
    static MISSING: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    MISSING
        .get_or_init(|| {
            if require_gpu() {
                return None;
            }
            CudaBackend::new(0).err().map(|e| e.to_string())
        })
        .as_deref()
}

/// A test that needs GPU 0: reported as **ignored** (with the reason) when there is none and
/// `KILN_REQUIRE_GPU` is not `1`; otherwise it runs holding the binary's GPU turn.
pub fn gpu_trial(name: &str, test: impl FnOnce() + Send + 'static) -> Trial {
    gpu_trial_when(name, || gpu_missing().map(|why| format!("no usable GPU: {why}")), test)
}

/// A GPU test with its own precondition, asked when the test starts: `missing` says why it
/// cannot run here (it is then ignored); `None` runs it. Both hold the GPU turn (`missing` may
/// open a backend to find out).
pub fn gpu_trial_when(
    name: &str,
    missing: impl FnOnce() -> Option<String> + Send + 'static,
    test: impl FnOnce() + Send + 'static,
) -> Trial {
    Trial::ignorable_test(name, move || {
        let _turn = GPU_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = missing() {
            return Ok(Completion::ignored_with(why));
        }
        test();
        Ok(Completion::Completed)
    })
}

/// A test that runs everywhere.
pub fn plain_trial(name: &str, test: impl FnOnce() + Send + 'static) -> Trial {
    Trial::test(name, move || {
        test();
        Ok(())
    })
}

/// Runs the trials with cargo test's arguments (filters, `--exact`, `--nocapture`,
/// `--test-threads`) and exits with the harness's status.
pub fn run_trials(trials: Vec<Trial>) -> ! {
    libtest_mimic::run(&Arguments::from_args(), trials).exit()
}

/// `main` for a test file whose tests are plain functions: `tests! { gpu: [a, b], plain: [c] }`
/// runs `a` and `b` as [`gpu_trial`]s and `c` everywhere, each named after its function.
#[macro_export]
macro_rules! tests {
    (gpu: [$($g:ident),* $(,)?] $(, plain: [$($p:ident),* $(,)?])? $(,)?) => {
        fn main() {
            #[allow(unused_mut)]
            let mut trials = vec![$(cuda_common::gpu_trial(stringify!($g), $g)),*];
            $($(trials.push(cuda_common::plain_trial(stringify!($p), $p));)*)?
            cuda_common::run_trials(trials)
        }
    };
}

/// GPU 0. Inside a [`gpu_trial`] it is there (or `KILN_REQUIRE_GPU=1` asked for it): its absence
/// fails the test.
pub fn cuda() -> CudaBackend {
    match CudaBackend::new(0) {
        Ok(b) => b,
        Err(e) if require_gpu() => panic!("KILN_REQUIRE_GPU=1 but the GPU is unusable: {e}"),
        Err(e) => panic!("the GPU is unusable: {e}"),
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

/// GPU 0 with options.
pub fn cuda_with(options: CudaOptions) -> CudaBackend {
    CudaBackend::with_options(0, options).unwrap_or_else(|e| panic!("the GPU is unusable: {e}"))
}
