//! The CUDA kernels and libraries, checked without a GPU: every NVRTC kernel module compiles
//! for the H100's architecture (so a CUDA C error shows up wherever NVRTC is, not first on the
//! GPU machine), a kernel defined with other parameters than `kernels!` declared does not
//! compile, and each CUDA library that is present opens with every symbol kiln calls.
//!
//! Each test is reported **ignored** (with the reason) where its library is missing, and runs
//! everywhere with `KILN_REQUIRE_GPU=1` (the GPU machine), where a missing library fails it.

use kiln::backend::cuda::kernel_check;

mod cuda_common;
use cuda_common::{gpu_trial_when, require_gpu, run_trials};

/// Why `stem` cannot be used here, unless `KILN_REQUIRE_GPU=1` demands the test run.
fn missing(stem: &'static str) -> impl FnOnce() -> Option<String> + Send + 'static {
    move || if require_gpu() { None } else { kernel_check::library_missing(stem) }
}

fn every_kernel_module_compiles() {
    let names = kernel_check::compile_every_module("sm_90").unwrap_or_else(|e| panic!("{e}"));
    assert!(names.contains(&"batch_norm") && names.contains(&"optimizer"), "{names:?}");
}

fn a_kernel_defined_with_other_parameters_than_declared_does_not_compile() {
    let good = "extern \"C\" __global__ void typed_probe(float* x, i64 n, float v) { if (n) x[0] = v; }";
    kernel_check::compile_typed_probe(good, "sm_90").unwrap_or_else(|e| panic!("{e}"));
    let bad = "extern \"C\" __global__ void typed_probe(float* x, int n, float v) { if (n) x[0] = v; }";
    let e = kernel_check::compile_typed_probe(bad, "sm_90").expect_err("a mismatched definition compiled");
    assert!(e.to_string().contains("typed_probe"), "{e}");
}

fn library_opens_with_every_symbol(stem: &'static str) -> impl FnOnce() + Send + 'static {
    move || {
        let path = kernel_check::open_library(stem).unwrap_or_else(|e| panic!("{stem}: {e}"));
        println!("{stem}: {path}");
    }
}

fn main() {
    let mut trials = vec![
        gpu_trial_when("every_kernel_module_compiles", missing("nvrtc"), every_kernel_module_compiles),
        gpu_trial_when(
            "a_kernel_defined_with_other_parameters_than_declared_does_not_compile",
            missing("nvrtc"),
            a_kernel_defined_with_other_parameters_than_declared_does_not_compile,
        ),
    ];
    for stem in ["nvrtc", "cublasLt", "cudnn"] {
        trials.push(gpu_trial_when(
            &format!("{stem}_opens_with_every_symbol"),
            missing(stem),
            library_opens_with_every_symbol(stem),
        ));
    }
    run_trials(trials)
}
