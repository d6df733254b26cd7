//! Training on the GPU against the CPU reference: every loss and optimizer op, gradient
//! clipping, ten Adam steps of the seed's CIFAR CNN through the trainer, the tutorial's task,
//! and graph replay against eager execution of whole training steps.

use kiln::backend::cpu::CpuBackend;
use kiln::backend::ops::{self, hyper, stats};
use kiln::backend::{Backend, CudaOptions, DType, HostSlice, LossFn, Op, OptParam, OptRule, Scoring};
use kiln::data::synthetic::tutorial_images;
use kiln::model::Model;
use kiln::rng::Rng;
use kiln::tensor::Tensor;
use kiln::train::{GradClip, Loss, Optimizer, Problem, Schedule, ScheduleUnit, Trainer, TrainerConfig};
use kiln::zoo;

mod cuda_common;
use cuda_common::{cuda, cuda_with, rel_err, within};

fn random(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.uniform_range(lo, hi)).collect()
}

/// Runs `ops` (built against buffers `bufs` filled with `init`) on a backend and returns the
/// final contents of every buffer.
fn run_on(
    b: &mut dyn Backend,
    init: &[Vec<f32>],
    build: &dyn Fn(&[kiln::backend::BufId], kiln::backend::CounterId) -> Vec<Op>,
    times: usize,
) -> Vec<Vec<f32>> {
    let ids: Vec<_> = init
        .iter()
        .map(|v| {
            let id = b.alloc(v.len(), kiln::backend::DType::F32).unwrap();
            b.write(id, v).unwrap();
            id
        })
        .collect();
    let counter = b.new_counter().unwrap();
    let ops = build(&ids, counter);
    for _ in 0..times {
        b.run(&ops).unwrap();
    }
    ids.iter().map(|&i| b.read(i).unwrap()).collect()
}

fn every_loss_matches_the_cpu() {
    let mut gpu = cuda();
    let mut cpu = CpuBackend::<f32>::new(Some(2)).unwrap();
    let (n, c) = (37, 5);
    let logits = random(n * c, 1, -3.0, 3.0);
    let probs: Vec<f32> = logits.iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect();
    let soft: Vec<f32> = {
        let v = random(n * c, 2, 0.0, 1.0);
        v.chunks(c)
            .flat_map(|r| {
                let s: f32 = r.iter().sum();
                r.iter().map(move |x| x / s).collect::<Vec<_>>()
            })
            .collect()
    };
    // Class labels travel as u32; the table keeps them as f32 here and `run_loss_on` writes
    // them into a u32 buffer for the losses that take class targets.
    let classes: Vec<f32> = (0..n).map(|i| (i * 7 % c) as f32).collect();
    let binary: Vec<f32> = (0..n * c).map(|i| (i % 3 == 0) as u8 as f32).collect();
    let values = random(n * c, 3, -2.0, 2.0);
    let top = Scoring::ArgMax { top_k: 2 };
    let cases: Vec<(LossFn, Scoring, &Vec<f32>, &Vec<f32>)> = vec![
        (LossFn::SoftmaxCrossEntropy { label_smoothing: 0.0, class_targets: true }, top, &logits, &classes),
        (LossFn::SoftmaxCrossEntropy { label_smoothing: 0.1, class_targets: false }, top, &logits, &soft),
        (LossFn::BinaryCrossEntropy, Scoring::Binary { logits: false }, &probs, &binary),
        (LossFn::BinaryCrossEntropyWithLogits, Scoring::Binary { logits: true }, &logits, &binary),
        (LossFn::CategoricalCrossEntropy { class_targets: true }, top, &probs, &classes),
        (LossFn::MeanSquaredError, Scoring::None, &logits, &values),
        (LossFn::MeanAbsoluteError, Scoring::None, &logits, &values),
        (LossFn::Huber { delta: 0.7 }, Scoring::None, &logits, &values),
    ];
    for (f, scoring, pred, target) in cases {
        let want = run_loss_on(&mut cpu, (f, scoring, n, c), pred, target);
        let got = run_loss_on(&mut gpu, (f, scoring, n, c), pred, target);
        assert!(within(&want.0, &got.0, 1e-6), "{f:?} stats: cpu {:?} gpu {:?}", want.0, got.0);
        assert!(within(&want.1, &got.1, 1e-6), "{f:?} gradient: {}", rel_err(&want.1, &got.1));
    }
}

/// Runs one loss op twice (the sums accumulate) on a backend and returns the stats and the
/// prediction gradient. Targets of a loss with class targets go into a u32 buffer.
fn run_loss_on(
    b: &mut dyn Backend,
    (f, scoring, n, c): (LossFn, Scoring, usize, usize),
    pred: &[f32],
    target: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let buf = |b: &mut dyn Backend, v: &[f32]| {
        let id = b.alloc(v.len(), DType::F32).unwrap();
        b.write(id, v).unwrap();
        id
    };
    let p = buf(b, pred);
    let t = if f.class_targets() {
        let labels: Vec<u32> = target.iter().map(|&y| y as u32).collect();
        let id = b.alloc(n, DType::U32).unwrap();
        b.write_host(id, HostSlice::U32(&labels)).unwrap();
        id
    } else {
        buf(b, target)
    };
    let st = buf(b, &[0.0; stats::LEN]);
    let d = buf(b, &vec![0.0; n * c]);
    let op = Op::Loss(ops::Loss { f, scoring, n, c, pred: p, target: t, stats: st, dpred: Some(d), grad_scale: 0.5 });
    for _ in 0..2 {
        b.run(std::slice::from_ref(&op)).unwrap();
    }
    (b.read(st).unwrap(), b.read(d).unwrap())
}

fn every_optimizer_and_clipping_matches_the_cpu() {
    let mut gpu = cuda();
    let mut cpu = CpuBackend::<f32>::new(Some(2)).unwrap();
    let rules = [
        OptRule::Sgd { dampening: 0.1, nesterov: false, weight_decay: 0.01 },
        OptRule::Sgd { dampening: 0.0, nesterov: true, weight_decay: 0.0 },
        OptRule::Adam { beta2: 0.999, eps: 1e-8, weight_decay: 0.01, decoupled: false, amsgrad: true },
        OptRule::Adam { beta2: 0.99, eps: 1e-8, weight_decay: 0.01, decoupled: true, amsgrad: false },
        OptRule::RmsProp { alpha: 0.99, eps: 1e-8, weight_decay: 0.01, centered: true },
        OptRule::Adagrad { lr_decay: 0.01, eps: 1e-10, weight_decay: 0.01 },
        OptRule::Adadelta { rho: 0.9, eps: 1e-6, weight_decay: 0.01 },
        OptRule::NAdam { beta2: 0.999, eps: 1e-8, weight_decay: 0.01, momentum_decay: 4e-3 },
    ];
    let len = 10_000;
    for (k, rule) in rules.iter().enumerate() {
        let mut init = vec![random(len, 10 + k as u64, -1.0, 1.0), random(len, 20 + k as u64, -1.0, 1.0)];
        init.extend((0..rule.state_tensors()).map(|_| vec![0.0; len]));
        init.push(vec![0.05, 0.9]); // hyper: lr, momentum/beta1
        init.push(vec![1.0]); // scalars
        init.push(vec![0.0]); // clip norm out
        let s = rule.state_tensors();
        let build = |b: &[kiln::backend::BufId], step| {
            let p = OptParam { len, value: b[0], grad: b[1], state: b[2..2 + s].to_vec() };
            vec![
                Op::ClipGradNorm(ops::ClipGradNorm { grads: vec![(b[1], len)], max_norm: 20.0, norm: b[4 + s] }),
                Op::ClipGradValue(ops::ClipGradValue { grads: vec![(b[1], len)], clip: 0.9 }),
                Op::OptimizerStep(ops::OptimizerStep {
                    rule: *rule,
                    hyper: b[2 + s],
                    step,
                    scalars: b[3 + s],
                    params: vec![p],
                    guard: None,
                }),
            ]
        };
        assert_eq!(hyper::LEN, 2);
        let want = run_on(&mut cpu, &init, &build, 3);
        let got = run_on(&mut gpu, &init, &build, 3);
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            assert!(within(w, g, 1e-5), "{rule:?} buffer {i}: relative error {}", rel_err(w, g));
        }
    }
}

fn cifar_config(device: kiln::backend::Device) -> TrainerConfig {
    TrainerConfig { batch_size: 8, device, learning_rate: 1e-4, ..Default::default() }
}

/// Adam at 1e-4. At PyTorch's default 1e-3 this network's ten-step trajectory is chaotic: Adam's
/// update is about `lr * sign(g)` for any gradient above its eps, so elements whose gradient is
/// rounding noise step in a direction the noise picks, and the difference grows step by step
/// (device run 15, `examples/cuda_diag.rs`: with SGD the GPU stays within 2e-9 of the CPU for ten
/// steps, dropout included; with Adam at 1e-3 dense1 drifts to 3e-2 by step ten, exact
/// convolutions or not, while each single pass agrees to 1e-6).
fn ten_adam_steps_of_the_cifar_cnn_match_the_cpu() {
    let gpu = cuda();
    let model = zoo::cifar_cnn(8).seed(3).build().unwrap();
    let (x, y) = tutorial_images(8, 3, 32, 32, 10, &mut Rng::new(5));
    let mut cpu = Trainer::new(&model, cifar_config(kiln::backend::Device::Cpu)).unwrap();
    let mut dev = Trainer::with_backend(&model, cifar_config(kiln::backend::Device::Cuda(0)), Box::new(gpu)).unwrap();
    for step in 0..10 {
        let (a, b) = (cpu.train_batch(&x, &y).unwrap(), dev.train_batch(&x, &y).unwrap());
        // Adam amplifies f32 rounding differences in tiny gradients (its update is about the
        // sign), so the losses drift apart slowly; they stay within 1%.
        assert!((a.loss - b.loss).abs() <= 1e-2 * a.loss.abs().max(1.0), "step {step}: loss {} vs {}", a.loss, b.loss);
    }
    let (pc, pg) = (cpu.model().unwrap().clone(), dev.model().unwrap().clone());
    compare_params(&pc, &pg, 1e-3);
}

/// The parameters within `tol` in the norm-wise relative sense, ||gpu - cpu|| / ||cpu||
/// (METHOD.md's measure), over the whole parameter vector; each tensor within 20 x `tol`.
///
/// Element-wise bounds cannot hold after Adam steps: where a gradient is rounding noise, Adam
/// still steps by up to lr in a direction the noise decides, and the deeper convolutions, with
/// the smallest gradients, drift most. On the H100 (device run 12, 2026-11-24) ten steps of the
/// CIFAR CNN left conv1_1 at 1.3e-4, conv2_2 at 1.5e-3 and conv3_1 at 6.7e-3; the test prints
/// every tensor's figure and the whole model's.
fn compare_params(a: &Model, b: &Model, tol: f64) {
    let (mut diff2, mut norm2) = (0.0, 0.0);
    for (spec, (va, vb)) in a.params().iter().zip(a.param_values().iter().zip(b.param_values())) {
        let d: f64 = va.iter().zip(vb).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
        let n: f64 = va.iter().map(|p| (*p as f64).powi(2)).sum();
        let rel = (d / n.max(1e-24)).sqrt();
        println!("{}: relative error {rel:.2e}", spec.name);
        assert!(rel <= 20.0 * tol, "{}: relative error {rel}", spec.name);
        diff2 += d;
        norm2 += n;
    }
    let rel = (diff2 / norm2).sqrt();
    println!("all parameters: relative error {rel:.2e}");
    assert!(rel <= tol, "parameters: relative error {rel}");
}

fn the_tutorial_task_trains_the_same_on_the_gpu() {
    let gpu = cuda();
    let model = zoo::simple_cnn(8).seed(4).build().unwrap();
    let (x, y) = tutorial_images(8, 3, 32, 32, 10, &mut Rng::new(4));
    let cfg = |device| TrainerConfig { batch_size: 8, seed: 4, device, ..Default::default() };
    let mut cpu = Trainer::new(&model, cfg(kiln::backend::Device::Cpu)).unwrap();
    let mut dev = Trainer::with_backend(&model, cfg(kiln::backend::Device::Cuda(0)), Box::new(gpu)).unwrap();
    let mut last = (0.0, 0.0);
    for _ in 0..17 {
        last = (cpu.train_batch(&x, &y).unwrap().loss, dev.train_batch(&x, &y).unwrap().loss);
    }
    println!("tutorial loss after 17 steps: cpu {} gpu {}", last.0, last.1);
    assert!(last.1 < 0.1, "the GPU run converges as the CPU one does: {last:?}");
    assert!((last.0 - last.1).abs() < 1e-3, "{last:?}");
}

fn graph_replay_and_eager_training_steps_are_identical() {
    let graph = cuda();
    let eager = cuda_with(CudaOptions { eager: Some(true), ..Default::default() });
    // Dropout, batch norm, a schedule and clipping: everything the device must carry between steps.
    let model = kiln::model::ModelBuilder::new(&[16, 3, 16, 16])
        .conv2d(8, 3)
        .batch_norm()
        .relu()
        .max_pool2d(2)
        .dropout(0.2)
        .dense(10)
        .seed(2)
        .build()
        .unwrap();
    let cfg = TrainerConfig {
        batch_size: 16,
        optimizer: Optimizer::nadam(),
        schedule: Some(Schedule::one_cycle(0.01, 40)),
        schedule_unit: ScheduleUnit::Batch,
        grad_clip: Some(GradClip::Norm(0.5)),
        ..Default::default()
    };
    let mut a = Trainer::with_backend(&model, cfg.clone(), Box::new(graph)).unwrap();
    let mut b = Trainer::with_backend(&model, cfg, Box::new(eager)).unwrap();
    let x = Tensor::new(&[16, 3, 16, 16], random(16 * 768, 8, -1.0, 1.0)).unwrap();
    let y: Vec<u32> = (0..16).map(|i| i % 10).collect();
    for _ in 0..12 {
        a.train_step(&x, &y).unwrap();
        b.train_step(&x, &y).unwrap();
    }
    let (ma, mb) = (a.model().unwrap().clone(), b.model().unwrap().clone());
    for (spec, (va, vb)) in ma.params().iter().zip(ma.param_values().iter().zip(mb.param_values())) {
        assert!(va.iter().zip(vb).all(|(p, q)| p.to_bits() == q.to_bits()), "{} differs", spec.name);
    }
    let (ma, mb) = (a.take_epoch_metrics().unwrap(), b.take_epoch_metrics().unwrap());
    assert_eq!(ma, mb);
}

fn regression_and_binary_losses_train_on_the_gpu() {
    let gpu = cuda();
    let x = Tensor::new(&[64, 2], random(128, 9, -1.0, 1.0)).unwrap();
    let y: Vec<f32> = x.data().chunks(2).map(|r| 2.0 * r[0] - 3.0 * r[1] + 1.0).collect();
    let y = Tensor::new(&[64, 1], y).unwrap();
    let model = kiln::model::ModelBuilder::new(&[64, 2]).dense(16).tanh().dense(1).seed(2).build().unwrap();
    let cfg = TrainerConfig {
        batch_size: 64,
        learning_rate: 0.05,
        optimizer: Optimizer::sgd(0.9),
        loss: Loss::MeanSquaredError,
        problem: Problem::Regression,
        ..Default::default()
    };
    let mut t = Trainer::with_backend(&model, cfg, Box::new(gpu)).unwrap();
    let first = t.train_batch(&x, &y).unwrap().loss;
    for _ in 0..400 {
        t.train_step(&x, &y).unwrap();
    }
    let last = t.evaluate_tensors(&x, &y).unwrap().loss;
    assert!(last < 1e-2 && last < first / 100.0, "{first} -> {last}");
}

tests! {
    gpu: [
        every_loss_matches_the_cpu,
        every_optimizer_and_clipping_matches_the_cpu,
        ten_adam_steps_of_the_cifar_cnn_match_the_cpu,
        the_tutorial_task_trains_the_same_on_the_gpu,
        graph_replay_and_eager_training_steps_are_identical,
        regression_and_binary_losses_train_on_the_gpu,
    ],
}
