//! Behaviour of the CPU engine beyond single-layer numerics: dropout in training and evaluation,
//! batch norm's two modes, determinism, and plans that allocate once.

use kiln::backend::cpu::CpuBackend;
use kiln::exec::{Executor, Mode, PlanOptions};
use kiln::model::ModelBuilder;
use kiln::rng::Rng;
use kiln::tensor::Tensor;
use kiln::zoo;

fn cpu(threads: usize) -> CpuBackend<f32> {
    CpuBackend::new(Some(threads)).unwrap()
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut r = Rng::new(seed);
    let n = shape.iter().product();
    Tensor::new(shape, (0..n).map(|_| r.uniform_range(-1.0, 1.0)).collect()).unwrap()
}

#[test]
fn dropout_drops_in_training_and_not_in_evaluation() {
    let rate = 0.3;
    let m = ModelBuilder::new(&[64, 100]).dropout(rate).build().unwrap();
    let mut e = Executor::new(&m, cpu(2)).unwrap();
    let x = Tensor::new(&[64, 100], vec![1.0; 6400]).unwrap();
    let eval = e.predict(&x, Mode::Eval).unwrap();
    assert_eq!(eval.data(), x.data(), "evaluation is the identity");
    let a = e.predict(&x, Mode::Train).unwrap();
    let zeros = a.data().iter().filter(|&&v| v == 0.0).count();
    let frac = zeros as f32 / a.len() as f32;
    assert!((frac - rate).abs() < 0.03, "dropped fraction {frac}");
    let keep = 1.0 / (1.0 - rate);
    assert!(a.data().iter().all(|&v| v == 0.0 || (v - keep).abs() < 1e-6), "kept values are scaled by 1/(1-p)");
    // A new mask every step, and the same masks for the same seed.
    let b = e.predict(&x, Mode::Train).unwrap();
    assert_ne!(a.data(), b.data());
    let mut e2 = Executor::new(&m, cpu(1)).unwrap();
    assert_eq!(e2.predict(&x, Mode::Train).unwrap().data(), a.data());
    assert_eq!(e2.predict(&x, Mode::Train).unwrap().data(), b.data());
}

#[test]
fn batch_norm_uses_batch_statistics_in_training_and_running_ones_in_evaluation() {
    let m = ModelBuilder::new(&[8, 3, 4, 4]).batch_norm().build().unwrap();
    let mut e = Executor::new(&m, cpu(2)).unwrap();
    let x = random(&[8, 3, 4, 4], 1);
    // Training output is normalised per channel: mean 0, variance 1.
    let y = e.predict(&x, Mode::Train).unwrap();
    for c in 0..3 {
        let vals: Vec<f32> = (0..8).flat_map(|n| y.data()[(n * 3 + c) * 16..(n * 3 + c + 1) * 16].to_vec()).collect();
        let mean = vals.iter().sum::<f32>() / vals.len() as f32;
        let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / vals.len() as f32;
        assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-3, "channel {c}: mean {mean} var {var}");
    }
    // Evaluation uses the running statistics: after one step they are 0.9*(0,1) + 0.1*(mean, unbiased var).
    let ev = e.predict(&x, Mode::Eval).unwrap();
    let rm = e.read_param("batch_norm_1.running_mean").unwrap();
    let rv = e.read_param("batch_norm_1.running_var").unwrap();
    for c in 0..3 {
        let vals: Vec<f64> =
            (0..8).flat_map(|n| x.data()[(n * 3 + c) * 16..(n * 3 + c + 1) * 16].to_vec()).map(f64::from).collect();
        let mean = vals.iter().sum::<f64>() / 128.0;
        let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 127.0;
        assert!((rm[c] as f64 - 0.1 * mean).abs() < 1e-6);
        assert!((rv[c] as f64 - (0.9 + 0.1 * var)).abs() < 1e-6);
        let i = (2 * 3 + c) * 16 + 5;
        let want = (x.data()[i] - rm[c]) / (rv[c] + 1e-5).sqrt();
        assert!((ev.data()[i] - want).abs() < 1e-5);
    }
}

#[test]
fn results_are_identical_run_to_run() {
    let m = zoo::simple_cnn(8).seed(4).build().unwrap();
    let x = random(&[8, 3, 32, 32], 2);
    let run = |threads| {
        let mut e = Executor::new(&m, cpu(threads)).unwrap();
        let p = e.plan(8, Mode::Train, PlanOptions::default()).unwrap();
        e.set_input(p, x.data()).unwrap();
        e.forward(p).unwrap();
        e.set_output_grad(p, &[0.1; 80]).unwrap();
        e.backward(p).unwrap();
        (
            e.read_output(p).unwrap(),
            e.read_param_grad("conv1.weight").unwrap(),
            e.read_param_grad("dense1.weight").unwrap(),
        )
    };
    let a = run(2);
    assert_eq!(a, run(2), "same thread count: bit-identical");
    let c = run(1);
    for (u, v) in a.1.iter().zip(&c.1) {
        assert!((u - v).abs() <= 1e-4 * (1.0 + v.abs()), "thread counts agree closely");
    }
}

#[test]
fn plans_allocate_once_and_are_reused() {
    let m = zoo::resnet18(2, 10).build().unwrap();
    let mut e = Executor::new(&m, cpu(2)).unwrap();
    let p = e.plan(2, Mode::Train, PlanOptions::default()).unwrap();
    let bytes = e.backend().bytes();
    let x = random(&[2, 3, 32, 32], 3);
    for _ in 0..2 {
        e.set_input(p, x.data()).unwrap();
        e.forward(p).unwrap();
        e.set_output_grad(p, &[0.05; 20]).unwrap();
        e.backward(p).unwrap();
    }
    assert_eq!(e.backend().bytes(), bytes, "no buffer grows after planning");
    assert_eq!(e.plan(2, Mode::Train, PlanOptions::default()).unwrap(), p, "the plan is cached");
    let info = e.plan_info(p);
    assert!(!info.forward.is_empty() && !info.backward.is_empty());
    // Every forward op reads only buffers that exist: the plan is self-contained.
    assert!(info.bytes() > 0);
}

#[test]
fn parameter_gradients_accumulate_when_asked() {
    let m = ModelBuilder::new(&[4, 6]).dense(3).build().unwrap();
    let mut e = Executor::new(&m, cpu(1)).unwrap();
    let opts = PlanOptions { accumulate_param_grads: true, ..Default::default() };
    let p = e.plan(4, Mode::Train, opts).unwrap();
    let x = random(&[4, 6], 5);
    e.set_input(p, x.data()).unwrap();
    e.forward(p).unwrap();
    e.set_output_grad(p, &[1.0; 12]).unwrap();
    e.backward(p).unwrap();
    let once = e.read_param_grad("dense_1.weight").unwrap();
    e.backward(p).unwrap();
    let twice = e.read_param_grad("dense_1.weight").unwrap();
    for (a, b) in once.iter().zip(&twice) {
        assert!((2.0 * a - b).abs() < 1e-6);
    }
}

#[test]
fn running_out_of_memory_is_an_error_and_a_smaller_batch_still_works() {
    let m = zoo::simple_cnn(8).build().unwrap();
    let mut e = Executor::new(&m, cpu(1)).unwrap();
    // 2^24 images of 3x32x32 would need about 4 TB for activations and gradients.
    let err = e.plan(1 << 24, Mode::Train, PlanOptions::default()).unwrap_err();
    match &err {
        kiln::Error::OutOfMemory { batch, needed, .. } => {
            assert_eq!(*batch, 1 << 24);
            assert!(*needed > 1 << 40, "needed {needed}");
        }
        other => panic!("expected OutOfMemory, got {other}"),
    }
    assert!(err.to_string().contains("8-layer model") && err.to_string().contains("try a smaller batch"), "{err}");
    let before = e.backend().bytes();
    let p = e.plan(8, Mode::Train, PlanOptions::default()).unwrap();
    e.set_input(p, &[0.1; 8 * 3 * 32 * 32]).unwrap();
    e.forward(p).unwrap();
    assert!(e.backend().bytes() > before);
}

#[test]
fn backward_reuses_gradient_memory() {
    use kiln::exec::BufRole;
    // ResNet-18 keeps most activations for backward (those it does not read share buffers),
    // but the gradients alive at one time are a few blocks' worth: planned by lifetime they
    // take far less than the activations. Without batch norm + ReLU fusion (exec/fuse.rs),
    // which drops nine of the activations.
    let m = zoo::resnet18(2, 10).build().unwrap();
    let mut e = Executor::new(&m, cpu(1)).unwrap();
    e.set_fusion(false).unwrap();
    let p = e.plan(2, Mode::Train, PlanOptions::default()).unwrap();
    let info = e.plan_info(p);
    let (act, grad) = (info.bytes_of(BufRole::Activation), info.bytes_of(BufRole::Gradient));
    println!("resnet18 batch 2: activations {act} bytes, gradients {grad} bytes");
    assert!(grad * 3 < act, "gradients {grad} bytes vs activations {act} bytes");
}
