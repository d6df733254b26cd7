//! Helpers shared by the wgpu tests: a libtest-mimic harness that reports a test as **ignored**
//! (with the reason) when this build has no `wgpu` feature or wgpu finds no adapter here, and
//! opening the backend. With `KILN_REQUIRE_WGPU=1` a missing adapter fails the tests instead (set
//! it where Vulkan is meant to work: CI with lavapipe, the GPU machine with its Vulkan loader).
//!
//! `KILN_WGPU_ADAPTER=N` picks the adapter (default 0, the first wgpu lists).
#![allow(dead_code)] // each test file uses a different part

use libtest_mimic::{Arguments, Completion, Trial};

/// One wgpu test at a time in a test binary: lavapipe runs its shaders on the same two cores.
static WGPU_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether `KILN_REQUIRE_WGPU=1` asks every wgpu test to run (failing where it cannot).
pub fn require_wgpu() -> bool {
    std::env::var("KILN_REQUIRE_WGPU").is_ok_and(|v| v == "1")
}

/// The adapter the tests use (`KILN_WGPU_ADAPTER`, default 0).
pub fn adapter() -> usize {
    std::env::var("KILN_WGPU_ADAPTER").ok().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Why the wgpu backend cannot be used here (`None` when it can), asked once per binary.
pub fn wgpu_missing() -> Option<&'static str> {
    static MISSING: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    MISSING
        .get_or_init(|| {
            if require_wgpu() {
                return None;
            }
            open().err().map(|e| e.to_string())
        })
        .as_deref()
}

/// The wgpu backend on the test adapter, or why not.
pub fn open() -> kiln::Result<Box<dyn kiln::backend::Backend>> {
    kiln::backend::Device::Wgpu(adapter()).open()
}

/// The backend inside a [`wgpu_trial`], where it must open.
pub fn wgpu() -> Box<dyn kiln::backend::Backend> {
    open().unwrap_or_else(|e| panic!("the wgpu backend is unusable: {e}"))
}

/// A test that needs the wgpu backend: ignored (with the reason) where it cannot open.
pub fn wgpu_trial(name: &str, test: impl FnOnce() + Send + 'static) -> Trial {
    Trial::ignorable_test(name, move || {
        let _turn = WGPU_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = wgpu_missing() {
            return Ok(Completion::ignored_with(format!("no usable wgpu adapter: {why}")));
        }
        test();
        Ok(Completion::Completed)
    })
}

/// A test too slow for a CPU Vulkan driver (lavapipe, what CI has): ignored there (with why)
/// unless `KILN_WGPU_LARGE=1`; on GPU adapters it runs as [`wgpu_trial`].
pub fn wgpu_large_trial(name: &str, test: impl FnOnce() + Send + 'static) -> Trial {
    Trial::ignorable_test(name, move || {
        let _turn = WGPU_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = wgpu_missing() {
            return Ok(Completion::ignored_with(format!("no usable wgpu adapter: {why}")));
        }
        let forced = std::env::var("KILN_WGPU_LARGE").is_ok_and(|v| v == "1");
        #[cfg(feature = "wgpu")]
        if !forced {
            let a = kiln::backend::wgpu::WgpuBackend::new(adapter()).map(|b| b.adapter());
            if let Some(a) = a.ok().filter(|a| !a.is_gpu) {
                return Ok(Completion::ignored_with(format!(
                    "too slow on {}, a CPU driver (KILN_WGPU_LARGE=1 runs it)",
                    a.name
                )));
            }
        }
        let _ = forced;
        test();
        Ok(Completion::Completed)
    })
}

/// Runs the trials with cargo test's arguments and exits with the harness's status.
pub fn run_trials(trials: Vec<Trial>) -> ! {
    libtest_mimic::run(&Arguments::from_args(), trials).exit()
}
