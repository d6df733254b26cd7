//! Mixed precision in f16 on the GPU (`Precision::F16Mixed`, PyTorch's
//! `autocast(dtype=torch.float16)` with `GradScaler`): every case of the shared corpus forward
//! and backward in f16 against the CPU's f32 reference; ten training steps of the seed CNNs
//! with loss scaling (on by default for f16) against the same steps in f32; an injected NaN
//! skipping the update inside the replayed graph and halving the scale; graph replay against
//! eager execution; and, on every machine, the CPU's refusal naming the field.
//!
//! Tolerance: [`TOL`], as tests/cuda_bf16.rs, relative to each tensor's largest magnitude.
//! f16 keeps 11 significant bits, 8 times finer than bf16's 8, so one product errs by about
//! 2^-10 (1e-3) of its magnitude, not 3.9e-3; the corpus's inputs and gradients (uniform in
//! [-1, 1], no loss scaling: the output gradient is given) stay far inside f16's range
//! (6.1e-5 to 65504), except values that are tiny in any case. The bound is bf16's 1e-2, with the
//! same two exceptions for the same reasons (tests/cuda_bf16.rs: cases whose gradients hinge
//! on ReLU or max-pooling decisions are checked on forward tensors; `residual_projection`'s
//! cancelling bias gradient), and ResNet-18 gets [`DEEP_TOL`]: bf16 measured 4.48e-2 there
//! (20 products in sequence), so f16 should come near 6e-3; 2e-2 leaves a 3x margin.
//! Not yet run on a GPU: each test prints what it measured.

use std::sync::{Arc, OnceLock};

use kiln::backend::Backend;
use kiln::backend::cpu::CpuBackend;
use kiln::exec::{Executor, Lowering, Mode, PlanOptions, Precision};
use kiln::model::{Model, ModelBuilder};
use kiln::rng::Rng;
use kiln::tensor::Tensor;
use kiln::train::{Device, GradScaler, LossScaling, NonFinite, Optimizer, ScalerState, Trainer, TrainerConfig};
use kiln::zoo;

mod corpus;
mod cuda_common;
mod half_common;
use cuda_common::{cuda, cuda_with, gpu_trial, gpu_trial_when, plain_trial, rel_err, run_trials, within};
use half_common::{pass, random};

/// f16 mixed precision against the f32 reference: see the module documentation.
const TOL: f64 = 1e-2;

/// ResNet-18's tolerance (see the module documentation).
const DEEP_TOL: f64 = 2e-2;

/// Cases whose gradients hinge on ReLU or max-pooling decisions: forward tensors only (the
/// list of tests/cuda_bf16.rs).
const KINKED: &[&str] = &[
    "dense_larger",
    "group_norm_features",
    "conv_transpose2d_output_padding_past_stride_decoder",
    "simple_cnn",
    "advanced_cnn",
    "multiscale_cnn",
    "mnist_cnn",
    "cifar_cnn",
    "inception_block",
];

/// A sum that batch norm nearly cancels (see tests/cuda_bf16.rs).
const CANCELLING: &[(&str, &str)] = &[("residual_projection", "conv2d_1.bias.grad")];

/// One corpus case in f16 on the GPU against f32 on the CPU, plain and with parameter
/// gradients accumulated over two passes.
fn corpus_case(name: &str, builder: ModelBuilder) {
    let model = builder.seed(3).build().expect("model builds");
    let mut g = Executor::new(&model, cuda()).unwrap();
    let mut c = Executor::new(&model, CpuBackend::<f32>::new(None).unwrap()).unwrap();
    let plain = PlanOptions { input_grad: true, accumulate_param_grads: false };
    let accumulating = PlanOptions { input_grad: true, accumulate_param_grads: true };
    let (mut worst, mut failed) = ((0f64, String::new()), Vec::new());
    let kinked = KINKED.contains(&name);
    let tol = if name.starts_with("resnet18") { DEEP_TOL } else { TOL };
    for (opts, steps, tag) in [(plain, 1, ""), (accumulating, 2, " (accumulated)")] {
        let want = pass(&mut c, &model, opts, steps, Precision::F32);
        let got = pass(&mut g, &model, opts, steps, Precision::F16Mixed);
        for ((what, r), (_, v)) in want.iter().zip(&got) {
            if (kinked && what.ends_with(".grad")) || CANCELLING.contains(&(name, what.as_str())) {
                continue;
            }
            let err = rel_err(r, v);
            if !within(r, v, tol) {
                failed.push(format!("{what}{tag}: {err:.2e}"));
            }
            if err >= worst.0 {
                worst = (err, format!("{what}{tag}"));
            }
        }
    }
    let what = if kinked { " (forward tensors)" } else { "" };
    println!("f16 {name:<44} max rel err {:.2e} ({}){what}", worst.0, worst.1);
    assert!(
        failed.is_empty(),
        "{name}: f16 differs from the f32 reference by more than {tol:e}: {}",
        failed.join("; ")
    );
}

/// Ten SGD steps in f16 with loss scaling against ten in f32 on the GPU, with
/// tests/cuda_bf16.rs's bounds (losses within 2e-2, the parameters' total change within 5e-2):
/// f16 is finer than bf16, so bf16's bounds hold with room. The scale starts at 1024, not
/// PyTorch's 65536, so that no step overflows and the two runs take the same ten steps (at
/// 65536 the first steps' f16 weight gradients overflow and are skipped by design; see
/// [`the_default_scale_backs_off_and_training_goes_on`]).
fn ten_steps(name: &str, model: Model, batch: usize) {
    let mut r = Rng::new(5);
    let shape = model.input_shape();
    let x = Tensor::new(&shape, (0..shape.iter().product()).map(|_| r.normal()).collect()).unwrap();
    let y: Vec<u32> = (0..batch).map(|_| r.below(10) as u32).collect();
    let cfg = |precision| TrainerConfig {
        batch_size: batch,
        optimizer: Optimizer::sgd(0.9),
        learning_rate: 1e-2,
        device: Device::Cuda(0),
        precision,
        loss_scaling: LossScaling::Dynamic(GradScaler { init_scale: 1024.0, ..Default::default() }),
        ..Default::default()
    };
    let mut f = Trainer::with_backend(&model, cfg(Precision::F32), Box::new(cuda())).unwrap();
    let mut h = Trainer::with_backend(&model, cfg(Precision::F16Mixed), Box::new(cuda())).unwrap();
    let mut worst = 0f32;
    for step in 0..10 {
        let (a, b) = (f.train_batch(&x, &y).unwrap().loss, h.train_batch(&x, &y).unwrap().loss);
        let d = (a - b).abs() / a.abs().max(1.0);
        worst = worst.max(d);
        assert!(d <= 2e-2, "{name} step {step}: loss f32 {a} f16 {b}");
    }
    let s = h.scaler_state().unwrap().expect("the config scales the loss");
    println!("{name}: f16 scaler after ten steps: {s:?}");
    assert_eq!(s.skipped, 0, "{name}: a step overflowed at scale 1024, so the runs are not comparable");
    let (mf, mh) = (f.model().unwrap().clone(), h.model().unwrap().clone());
    let (mut diff2, mut norm2) = (0f64, 0f64);
    for ((w0, wf), wh) in model.param_values().iter().zip(mf.param_values()).zip(mh.param_values()) {
        for ((&a, &b), &c) in w0.iter().zip(wf).zip(wh) {
            let (df, dh) = ((b - a) as f64, (c - a) as f64);
            diff2 += (df - dh).powi(2);
            norm2 += df.powi(2);
        }
    }
    let rel = (diff2 / norm2).sqrt();
    println!("{name}: ten f16 steps, losses within {worst:.2e}, parameter change within {rel:.2e} of f32's");
    assert!(norm2 > 0.0, "{name}: the f32 steps changed nothing");
    assert!(rel <= 5e-2, "{name}: f16's ten updates differ from f32's by {rel:.2e}");
}

/// With `LossScaling::Auto` (PyTorch's 65536), ResNet-18 in f16: steps whose gradients
/// overflow are skipped while the scale halves, then training goes on: most of 30 steps apply,
/// the weights stay finite and the loss goes down. Prints how many were skipped.
fn the_default_scale_backs_off_and_training_goes_on() {
    let model = zoo::resnet18(8, 10).seed(3).build().unwrap();
    let cfg = TrainerConfig {
        batch_size: 8,
        optimizer: Optimizer::sgd(0.9),
        learning_rate: 1e-2,
        device: Device::Cuda(0),
        precision: Precision::F16Mixed,
        ..Default::default()
    };
    let mut t = Trainer::with_backend(&model, cfg, Box::new(cuda())).unwrap();
    let mut r = Rng::new(5);
    let x = Tensor::new(&[8, 3, 32, 32], (0..8 * 3 * 1024).map(|_| r.normal()).collect()).unwrap();
    let y: Vec<u32> = (0..8).map(|_| r.below(10) as u32).collect();
    let first = t.train_batch(&x, &y).unwrap().loss;
    let mut last = first;
    for _ in 1..30 {
        last = t.train_batch(&x, &y).unwrap().loss;
    }
    let s = t.scaler_state().unwrap().expect("f16 scales the loss by default");
    println!("f16 resnet18, default scaler: {s:?} after 30 steps; loss {first} -> {last}");
    assert!(s.skipped < 15, "{} of 30 steps skipped", s.skipped);
    assert!(s.scale <= 65536.0 * 2.0 && s.scale >= 1.0, "scale {}", s.scale);
    assert!(t.model().unwrap().param_values().iter().flatten().all(|v| v.is_finite()));
    assert!(last < first, "the loss did not go down: {first} -> {last}");
}

fn ten_steps_of_the_seed_cnns_stay_close_to_f32() {
    ten_steps("simple_cnn", zoo::simple_cnn(8).seed(3).build().unwrap(), 8);
    ten_steps("cifar_cnn", zoo::cifar_cnn(8).seed(3).build().unwrap(), 8);
    ten_steps("mnist_cnn", zoo::mnist_cnn(8).seed(3).build().unwrap(), 8);
    ten_steps("resnet18", zoo::resnet18(8, 10).seed(3).build().unwrap(), 8);
}

/// In f16 with the scaler, a NaN step queued with `train_step` (a graph replay) leaves the
/// weights as they were and halves the scale; the next steps apply.
fn a_nan_step_in_f16_is_skipped_inside_the_graph() {
    let model = ModelBuilder::new(&[8, 3, 16, 16]).conv2d(8, 3).relu().flatten().dense(10).seed(2).build().unwrap();
    let cfg = TrainerConfig {
        batch_size: 8,
        device: Device::Cuda(0),
        precision: Precision::F16Mixed,
        non_finite: NonFinite::Ignore,
        loss_scaling: LossScaling::Dynamic(GradScaler {
            init_scale: 1024.0,
            growth_interval: 100,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut t = Trainer::with_backend(&model, cfg, Box::new(cuda())).unwrap();
    let batch = |k: usize, nan: bool| {
        let mut x = random(8 * 768, k as u64);
        if nan {
            x[5] = f32::NAN;
        }
        (Tensor::new(&[8, 3, 16, 16], x).unwrap(), (0..8).map(|i| ((i + k) % 10) as u32).collect::<Vec<_>>())
    };
    for k in 0..3 {
        let (x, y) = batch(k, false);
        t.train_step(&x, &y[..]).unwrap();
    }
    assert_eq!(t.scaler_state().unwrap(), Some(ScalerState { scale: 1024.0, good_steps: 3, skipped: 0 }));
    let w = t.model().unwrap().param_values().to_vec();
    let (x, y) = batch(3, true);
    t.train_step(&x, &y[..]).unwrap();
    assert_eq!(t.model().unwrap().param_values(), &w[..], "the skipped f16 step changed the weights");
    assert_eq!(t.scaler_state().unwrap(), Some(ScalerState { scale: 512.0, good_steps: 0, skipped: 1 }));
    let (x, y) = batch(4, false);
    t.train_step(&x, &y[..]).unwrap();
    assert_ne!(t.model().unwrap().param_values(), &w[..]);
    assert!(t.model().unwrap().param_values().iter().flatten().all(|v| v.is_finite()));
}

/// Whole f16 training steps (scaled) replayed as a CUDA graph compute, bit for bit, what eager
/// execution of the same kernels does.
fn graph_replay_equals_eager_in_f16() {
    let model = zoo::resnet18(8, 10).seed(2).build().unwrap();
    let cfg =
        TrainerConfig { batch_size: 8, device: Device::Cuda(0), precision: Precision::F16Mixed, ..Default::default() };
    let mut a = Trainer::with_backend(&model, cfg.clone(), Box::new(cuda())).unwrap();
    let eager = cuda_with(kiln::backend::CudaOptions { eager: Some(true), ..Default::default() });
    let mut b = Trainer::with_backend(&model, cfg, Box::new(eager)).unwrap();
    let x = Tensor::new(&[8, 3, 32, 32], random(8 * 3 * 1024, 8)).unwrap();
    let y: Vec<u32> = (0..8).map(|i| i % 10).collect();
    for _ in 0..6 {
        a.train_step(&x, &y).unwrap();
        b.train_step(&x, &y).unwrap();
    }
    assert!(a.executor().backend().replays_graphs() && !b.executor().backend().replays_graphs());
    let (ma, mb) = (a.model().unwrap().clone(), b.model().unwrap().clone());
    for (spec, (va, vb)) in ma.params().iter().zip(ma.param_values().iter().zip(mb.param_values())) {
        assert!(va.iter().zip(vb).all(|(p, q)| p.to_bits() == q.to_bits()), "{} differs", spec.name);
    }
    assert_eq!(a.scaler_state().unwrap(), b.scaler_state().unwrap());
    println!("f16 resnet18: 6 graph-replayed steps bit-identical to eager, scaler {:?}", a.scaler_state().unwrap());
}

/// A backend that computes in f32 only refuses f16 plans, naming the field.
fn the_cpu_refuses_f16_plans_naming_the_field() {
    let model = zoo::simple_cnn(2).seed(1).build().unwrap();
    let mut e = Executor::new(&model, CpuBackend::<f32>::new(Some(1)).unwrap()).unwrap();
    let low = Lowering { precision: Precision::F16Mixed, ..e.lowering(2, Mode::Train) };
    let err = e.plan_for(low).unwrap_err().to_string();
    assert!(err.contains("precision") && err.contains("f16"), "{err}");
}

fn require_gpu() -> bool {
    std::env::var("KILN_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

fn main() {
    let mut trials = vec![
        gpu_trial("ten_steps_of_the_seed_cnns_stay_close_to_f32", ten_steps_of_the_seed_cnns_stay_close_to_f32),
        gpu_trial("the_default_scale_backs_off_and_training_goes_on", the_default_scale_backs_off_and_training_goes_on),
        gpu_trial("a_nan_step_in_f16_is_skipped_inside_the_graph", a_nan_step_in_f16_is_skipped_inside_the_graph),
        gpu_trial("graph_replay_equals_eager_in_f16", graph_replay_equals_eager_in_f16),
        plain_trial("the_cpu_refuses_f16_plans_naming_the_field", the_cpu_refuses_f16_plans_naming_the_field),
    ];
    // One trial per corpus case, `corpus::NAME`; the GPU is probed once, by the first to run.
    let missing: Arc<OnceLock<Option<String>>> = Arc::new(OnceLock::new());
    for case in corpus::cases().into_iter().filter(|c| c.parity) {
        let missing = missing.clone();
        let probe = move || {
            missing
                .get_or_init(|| match kiln::backend::CudaBackend::new(0) {
                    Err(e) if !require_gpu() => Some(format!("no usable GPU: {e}")),
                    _ => None,
                })
                .clone()
        };
        trials.push(gpu_trial_when(&format!("corpus::{}", case.name), probe, move || {
            corpus_case(case.name, (case.build)())
        }));
    }
    run_trials(trials)
}
