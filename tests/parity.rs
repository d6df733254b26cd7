//! Every backend against the CPU reference, on the shared corpus (tests/corpus): same model,
//! same weights, same batch; forward output, input gradient, every parameter gradient and the
//! batch-norm running statistics after a training step, then the evaluation output, all within
//! the backend's tolerance (f32, no TF32: 1e-4) of the tensor's largest magnitude (with
//! gradcheck.rs's floor for tensors that are analytically zero, see `cuda_common::within`). A
//! second training plan that accumulates parameter gradients over two steps checks the
//! accumulate paths (cuDNN and cuBLASLt with beta = 1, the epilogue fallbacks).
//!
//! One test per backend and case, named `BACKEND::CASE` (`cargo test --test parity cuda::resnet18_silu`).
//! A backend that cannot be opened here (no GPU) reports its tests as ignored, with the reason;
//! with `KILN_REQUIRE_GPU=1` they fail instead. A backend may also leave the large cases out
//! where they would be too slow (wgpu on a CPU Vulkan driver), reported as ignored with why.

use std::sync::{Arc, OnceLock};

use kiln::backend::cpu::CpuBackend;
use kiln::backend::{Backend, CudaOptions};
use kiln::exec::{Executor, Mode, PlanOptions};
use kiln::model::{Model, ModelBuilder};
use kiln::rng::Rng;

mod corpus;
mod cuda_common;
use cuda_common::{gpu_trial, gpu_trial_when, rel_err, run_trials, within};

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.uniform_range(-1.0, 1.0)).collect()
}

/// Every tensor a training step produces, by name, after `steps` forward+backward passes.
fn step<B: Backend>(e: &mut Executor<B>, model: &Model, opts: PlanOptions, steps: usize) -> Vec<(String, Vec<f32>)> {
    let batch = model.batch_size();
    let p = e.plan(batch, Mode::Train, opts).unwrap();
    let x = random(e.backend().len(e.plan_info(p).input), 11);
    let r = random(e.backend().len(e.plan_info(p).output), 99);
    for _ in 0..steps {
        e.set_input(p, &x).unwrap();
        e.forward(p).unwrap();
        e.set_output_grad(p, &r).unwrap();
        e.backward(p).unwrap();
    }
    let mut out = vec![("output".to_string(), e.read_output(p).unwrap())];
    if opts.input_grad {
        out.push(("input.grad".into(), e.read_input_grad(p).unwrap()));
    }
    for spec in model.params() {
        if spec.trainable {
            out.push((format!("{}.grad", spec.name), e.read_param_grad(&spec.name).unwrap()));
        }
        // Values: running statistics changed by the step; the others must be untouched.
        out.push((spec.name.clone(), e.read_param(&spec.name).unwrap()));
    }
    let pe = e.plan(batch, Mode::Eval, PlanOptions::default()).unwrap();
    e.set_input(pe, &x).unwrap();
    e.forward(pe).unwrap();
    out.push(("eval output".into(), e.read_output(pe).unwrap()));
    out
}

fn compare_on(name: &str, builder: ModelBuilder, gpu: Box<dyn Backend>, tol: f64) -> f64 {
    let model = builder.seed(3).build().expect("model builds");
    let mut worst = (0f64, String::new());
    let mut g = Executor::new(&model, gpu).unwrap();
    let mut c = Executor::new(&model, CpuBackend::<f32>::new(None).unwrap()).unwrap();
    let plain = PlanOptions { input_grad: true, accumulate_param_grads: false };
    let accumulating = PlanOptions { input_grad: true, accumulate_param_grads: true };
    for (opts, steps, tag) in [(plain, 1, ""), (accumulating, 2, " (accumulated)")] {
        let want = step(&mut c, &model, opts, steps);
        let got = step(&mut g, &model, opts, steps);
        for ((what, r), (_, v)) in want.iter().zip(&got) {
            let err = rel_err(r, v);
            assert!(within(r, v, tol), "{name}: {what}{tag}: GPU differs from CPU by {err:e} of its largest value");
            if err >= worst.0 {
                worst = (err, format!("{what}{tag}"));
            }
        }
    }
    println!("parity {name:<28} max rel err {:.2e} ({})", worst.0, worst.1);
    worst.0
}

/// With TF32 allowed, convolutions and dense layers round their inputs to 10-bit mantissas:
/// results stay within TF32's tolerance (about 1e-3 relative), and the backend says TF32 is on.
fn tf32_option() {
    let gpu = cuda_common::cuda_with(CudaOptions { tf32: true, ..Default::default() });
    assert!(gpu.describe().contains("TF32 on"), "{}", gpu.describe());
    let model = corpus::img(8, 16, 12, 12).conv2d(32, 3).relu().dense(20);
    let err = compare_on("tf32 conv+dense", model, Box::new(gpu), 1e-2);
    println!("tf32: max rel err {err:.2e} (f32 paths stay near 1e-7)");
}

fn require_gpu() -> bool {
    std::env::var("KILN_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

fn main() {
    let mut trials = Vec::new();
    for backend in corpus::backends() {
        // Why this backend cannot be opened here, asked once, by its first test that runs.
        let missing: Arc<OnceLock<Option<String>>> = Arc::new(OnceLock::new());
        for case in corpus::cases().into_iter().filter(|c| c.parity) {
            let (missing, open, tol) = (missing.clone(), backend.open, backend.tol);
            let (skip_large, large) = (backend.skip_large, case.gradcheck.is_none());
            let name = format!("{}::{}", backend.name, case.name);
            let label = name.clone();
            let probe = move || {
                let why = missing
                    .get_or_init(|| match open() {
                        Err(e) if !require_gpu() => Some(format!("{label}: backend unusable here: {e}")),
                        _ => None,
                    })
                    .clone();
                if why.is_some() || !large { why } else { skip_large() }
            };
            trials.push(gpu_trial_when(&name, probe, move || {
                let gpu = open().unwrap_or_else(|e| panic!("the backend is unusable: {e}"));
                compare_on(case.name, (case.build)(), gpu, tol);
            }));
        }
    }
    trials.push(gpu_trial("cuda::tf32_option", tf32_option));
    run_trials(trials)
}
