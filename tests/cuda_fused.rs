//! The CUDA backend's multi-tensor launches (issue 11: one optimizer launch for all parameters,
//! one non-finite check and one clipping pass over all gradients) against the CPU reference,
//! on sets of odd-sized tensors that start and end inside chunks (8192 values each): every
//! optimizer rule with weight decay, both clippings and the finite-step guard; a set updated in
//! one launch against each of its tensors updated alone (bit for bit: a tensor's chunks do not
//! depend on its set); CUDA graph replay against eager runs (bit for bit); and NaN, infinity and
//! an f32-overflowing norm injected into one gradient of a set. Also batch norm's kernels (each
//! channel over several blocks, the last block of a launch finishing the statistics) on shapes
//! with hundreds of blocks, more channels than a block has threads, and odd sizes, against the
//! CPU and bit for bit run to run. Reported ignored without a GPU (failing instead under
//! `KILN_REQUIRE_GPU=1`), through tests/cuda_common's harness.

use kiln::backend::cpu::CpuBackend;
use kiln::backend::ops::{self, guard, stats};
use kiln::backend::ops::{ActFn, BnGeom, FusedAct, GradOut};
use kiln::backend::{Backend, BufId, CounterId, DType, Op, OptParam, OptRule};
use kiln::rng::Rng;

mod cuda_common;
use cuda_common::{cuda, rel_err, within};

fn random(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.uniform_range(lo, hi)).collect()
}

/// Tensor sets: one value; a chunk's length and its neighbours; many small odd tensors (one
/// chunk each); a mix with a tensor of several chunks.
fn sets() -> Vec<Vec<usize>> {
    vec![
        vec![1],
        vec![3, 8191, 8192, 8193, 1],
        (0..97).map(|k| (k * 37) % 301 + 1).collect(),
        vec![257, 65, 1, 3 * 8192 + 11, 2, 40_001, 511],
    ]
}

/// Every rule kiln has, each with weight decay where it takes one and the variants (momentum
/// kinds, AMSGrad, AdamW, centred) spread over the cases.
fn rules() -> Vec<OptRule> {
    vec![
        OptRule::Sgd { dampening: 0.1, nesterov: false, weight_decay: 0.01 },
        OptRule::Sgd { dampening: 0.0, nesterov: true, weight_decay: 0.0 },
        OptRule::Adam { beta2: 0.999, eps: 1e-8, weight_decay: 0.01, decoupled: false, amsgrad: true },
        OptRule::Adam { beta2: 0.99, eps: 1e-8, weight_decay: 0.01, decoupled: true, amsgrad: false },
        OptRule::Adam { beta2: 0.999, eps: 1e-8, weight_decay: 0.0, decoupled: false, amsgrad: false },
        OptRule::RmsProp { alpha: 0.99, eps: 1e-8, weight_decay: 0.01, centered: true },
        OptRule::RmsProp { alpha: 0.9, eps: 1e-8, weight_decay: 0.0, centered: false },
        OptRule::Adagrad { lr_decay: 0.01, eps: 1e-10, weight_decay: 0.01 },
        OptRule::Adadelta { rho: 0.9, eps: 1e-6, weight_decay: 0.01 },
        OptRule::NAdam { beta2: 0.999, eps: 1e-8, weight_decay: 0.01, momentum_decay: 4e-3 },
    ]
}

/// The buffers of one optimizer problem on a backend: per tensor its value, gradient and state,
/// then the shared hyper-parameters, scalars, clip-norm output, loss statistics and guard.
struct Problem {
    /// Every buffer, in the order of [`initial`]'s contents.
    ids: Vec<BufId>,
    params: Vec<OptParam>,
    hyper: BufId,
    scalars: BufId,
    norm: BufId,
    stats: BufId,
    guard: BufId,
    steps: Vec<CounterId>,
}

/// The initial contents of a problem's buffers: values in [-1, 1], gradients in [-2, 2]
/// (so both clippings act), zero state, lr 0.05 and momentum/beta1 0.9, a finite loss.
fn initial(lens: &[usize], rule: &OptRule, seed: u64) -> Vec<Vec<f32>> {
    let mut bufs = Vec::new();
    for (k, &n) in lens.iter().enumerate() {
        bufs.push(random(n, seed + 2 * k as u64, -1.0, 1.0));
        bufs.push(random(n, seed + 2 * k as u64 + 1, -2.0, 2.0));
        bufs.extend((0..rule.state_tensors()).map(|_| vec![0.0; n]));
    }
    let mut loss = vec![0.0; stats::LEN];
    loss[stats::LOSS] = 0.5;
    bufs.extend([vec![0.05, 0.9], vec![1.0], vec![0.0], loss, vec![0.0; guard::LEN]]);
    bufs
}

/// Allocates and fills a problem's buffers; `counters` step counters.
fn upload(b: &mut dyn Backend, lens: &[usize], rule: &OptRule, init: &[Vec<f32>], counters: usize) -> Problem {
    let ids: Vec<BufId> = init
        .iter()
        .map(|v| {
            let id = b.alloc(v.len(), DType::F32).unwrap();
            b.write(id, v).unwrap();
            id
        })
        .collect();
    let s = rule.state_tensors();
    let params = lens
        .iter()
        .enumerate()
        .map(|(k, &len)| {
            let at = k * (2 + s);
            OptParam { len, value: ids[at], grad: ids[at + 1], state: ids[at + 2..at + 2 + s].to_vec() }
        })
        .collect();
    let rest = &ids[ids.len() - 5..];
    let steps = (0..counters).map(|_| b.new_counter().unwrap()).collect();
    let (hyper, scalars, norm, stats, guard) = (rest[0], rest[1], rest[2], rest[3], rest[4]);
    Problem { ids, params, hyper, scalars, norm, stats, guard, steps }
}

fn read_all(b: &mut dyn Backend, p: &Problem) -> Vec<Vec<f32>> {
    p.ids.iter().map(|&i| b.read(i).unwrap()).collect()
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter().map(|b| b.iter().map(|x| x.to_bits()).collect()).collect()
}

impl Problem {
    fn grads(&self) -> Vec<(BufId, usize)> {
        self.params.iter().map(|p| (p.grad, p.len)).collect()
    }

    fn step(&self, rule: OptRule, params: Vec<OptParam>, counter: usize, guard: bool) -> Op {
        Op::OptimizerStep(ops::OptimizerStep {
            rule,
            hyper: self.hyper,
            step: self.steps[counter],
            scalars: self.scalars,
            params,
            guard: guard.then_some(self.guard),
        })
    }

    /// A training step's tail as the executor plans it: check, clip by norm, clip by value,
    /// update.
    fn tail(&self, rule: OptRule, sticky: bool) -> Vec<Op> {
        let grads = self.grads();
        vec![
            Op::CheckFinite(ops::CheckFinite { stats: self.stats, grads: grads.clone(), guard: self.guard, sticky }),
            Op::ClipGradNorm(ops::ClipGradNorm { grads: grads.clone(), max_norm: 20.0, norm: self.norm }),
            Op::ClipGradValue(ops::ClipGradValue { grads, clip: 0.9 }),
            self.step(rule, self.params.clone(), 0, true),
        ]
    }
}

/// Runs `ops_of(problem)` `times` times on a fresh backend's buffers (as CUDA graph replays
/// with `cached`), returning every buffer.
fn run(
    b: &mut dyn Backend,
    (lens, rule, init): (&[usize], OptRule, &[Vec<f32>]),
    ops_of: &dyn Fn(&Problem) -> Vec<Op>,
    (times, cached): (usize, bool),
) -> Vec<Vec<f32>> {
    let p = upload(b, lens, &rule, init, lens.len());
    let ops = ops_of(&p);
    for _ in 0..times {
        if cached { b.run_cached(0xf05ed, &ops).unwrap() } else { b.run(&ops).unwrap() }
    }
    read_all(b, &p)
}

fn every_optimizer_over_odd_tensor_sets_matches_the_cpu_and_replays_bit_for_bit() {
    let mut cpu = CpuBackend::<f32>::new(Some(2)).unwrap();
    let (mut gpu_eager, mut gpu_graph) = (cuda(), cuda());
    for (s, lens) in sets().iter().enumerate() {
        for (r, rule) in rules().into_iter().enumerate() {
            let init = initial(lens, &rule, 100 * s as u64 + 10 * r as u64);
            let tail = |p: &Problem| p.tail(rule, false);
            let want = run(&mut cpu, (lens, rule, &init), &tail, (3, false));
            let eager = run(&mut gpu_eager, (lens, rule, &init), &tail, (3, false));
            let graph = run(&mut gpu_graph, (lens, rule, &init), &tail, (3, true));
            for (i, (w, g)) in want.iter().zip(&eager).enumerate() {
                assert!(within(w, g, 1e-5), "{rule:?} on {lens:?}: buffer {i}: relative error {}", rel_err(w, g));
            }
            let n = init.len();
            // The clip norm (written on the last step) and the guard (three good steps checked).
            assert!(rel_err(&want[n - 3], &eager[n - 3]) <= 1e-6, "norm {:?} vs {:?}", want[n - 3], eager[n - 3]);
            assert_eq!(want[n - 1], eager[n - 1], "guard");
            assert_eq!(eager[n - 1][guard::CHECKED], 3.0);
            assert!(bits(&eager) == bits(&graph), "{rule:?} on {lens:?}: graph replays differ from eager runs");
        }
    }
}

fn a_set_in_one_launch_equals_each_tensor_alone() {
    let lens = &sets()[3];
    let mut gpu = cuda();
    for rule in rules() {
        let init = initial(lens, &rule, 7);
        let together = upload(&mut gpu, lens, &rule, &init, 1);
        let ops = vec![
            Op::ClipGradValue(ops::ClipGradValue { grads: together.grads(), clip: 0.9 }),
            together.step(rule, together.params.clone(), 0, false),
        ];
        // Each tensor alone, with its own step counter and (NAdam) momentum product, which one
        // launch over the set keeps once for all tensors.
        let alone = upload(&mut gpu, lens, &rule, &init, lens.len());
        let mut products = vec![init[init.len() - 4].clone(); lens.len()];
        for _ in 0..3 {
            gpu.run(&ops).unwrap();
            for (k, q) in alone.params.iter().enumerate() {
                gpu.write(alone.scalars, &products[k]).unwrap();
                let clip = Op::ClipGradValue(ops::ClipGradValue { grads: vec![(q.grad, q.len)], clip: 0.9 });
                gpu.run(&[clip, alone.step(rule, vec![q.clone()], k, false)]).unwrap();
                products[k] = gpu.read(alone.scalars).unwrap();
            }
        }
        let (a, b) = (read_all(&mut gpu, &together), read_all(&mut gpu, &alone));
        let n = init.len();
        for (i, (x, y)) in bits(&a).iter().zip(bits(&b)).enumerate().take(n - 5) {
            assert!(*x == y, "{rule:?}: buffer {i} differs between one launch and one per tensor");
        }
        assert_ne!(a[0], init[0], "{rule:?}: nothing was updated");
        assert!(products.iter().all(|p| p == &a[n - 4]), "{rule:?}: scalars {products:?} vs {:?}", a[n - 4]);
    }
}

/// Where a bad value goes: (tensor, index, value); several for the overflowing norm.
type Injection = Vec<(usize, usize, f32)>;

fn the_non_finite_check_over_a_set_finds_nan_inf_and_overflow() {
    let lens = sets()[3].clone();
    let last = lens.len() - 1;
    let cases: Vec<(&str, Injection, bool)> = vec![
        ("NaN in the last value of the last tensor", vec![(last, lens[last] - 1, f32::NAN)], true),
        ("infinity inside a chunk of the multi-chunk tensor", vec![(3, 8192 + 5, f32::INFINITY)], true),
        ("-infinity in a one-value tensor", vec![(2, 0, f32::NEG_INFINITY)], true),
        ("a norm beyond f32's range from finite values", vec![(0, 7, 3e38), (5, 40_000, -3e38)], true),
        ("large finite values with a finite norm", vec![(0, 7, 1e18), (5, 40_000, -1e18)], false),
    ];
    let rule = OptRule::Adam { beta2: 0.999, eps: 1e-8, weight_decay: 0.01, decoupled: true, amsgrad: false };
    for (what, inject, bad) in cases {
        for sticky in [false, true] {
            let init = initial(&lens, &rule, 3);
            let s = rule.state_tensors();
            let mut poisoned = init.clone();
            for &(t, i, v) in &inject {
                poisoned[t * (2 + s) + 1][i] = v;
            }
            let check = |p: &Problem| {
                let grads = p.grads();
                vec![
                    Op::CheckFinite(ops::CheckFinite { stats: p.stats, grads, guard: p.guard, sticky }),
                    p.step(rule, p.params.clone(), 0, true),
                ]
            };
            // One good step, the injected one, then a good one again; the same on the CPU.
            let mut guards = Vec::new();
            let mut results = Vec::new();
            for gpu in [false, true] {
                let mut b: Box<dyn Backend> =
                    if gpu { Box::new(cuda()) } else { Box::new(CpuBackend::<f32>::new(Some(2)).unwrap()) };
                let p = upload(&mut *b, &lens, &rule, &init, 1);
                let ops = check(&p);
                b.run_cached(1, &ops).unwrap();
                let after_good = read_all(&mut *b, &p);
                for (k, v) in poisoned.iter().enumerate() {
                    if !same_bits(v, &init[k]) {
                        b.write(p.ids[k], v).unwrap();
                    }
                }
                b.run_cached(1, &ops).unwrap();
                let after_bad = read_all(&mut *b, &p);
                let steps = b.counter(p.steps[0]).unwrap();
                if bad {
                    for k in (0..init.len() - 5).filter(|k| k % (2 + s) != 1) {
                        assert_eq!(
                            after_bad[k], after_good[k],
                            "{what}: buffer {k} moved in a skipped step (gpu {gpu})"
                        );
                    }
                    assert_eq!(steps, 1, "{what}: the step counter moved in a skipped step");
                } else {
                    assert_eq!(steps, 2, "{what}: the step was not applied");
                }
                for (k, v) in init.iter().enumerate() {
                    if !same_bits(&poisoned[k], v) {
                        b.write(p.ids[k], v).unwrap();
                    }
                }
                b.run_cached(1, &ops).unwrap();
                let end = read_all(&mut *b, &p);
                let g = end[init.len() - 1].clone();
                guards.push(g.clone());
                results.push(end);
                assert_eq!(g[guard::CHECKED], 3.0, "{what}");
                assert_eq!(g[guard::BAD_STEPS], bad as u8 as f32, "{what}");
                assert_eq!(g[guard::FIRST_BAD], if bad { 2.0 } else { 0.0 }, "{what}");
                // Non-sticky: the good step after a bad one updates; sticky: it is skipped too.
                assert_eq!(g[guard::SKIP], (bad && sticky) as u8 as f32, "{what}, sticky {sticky}");
                let applied = match (bad, sticky) {
                    (false, _) => 3,
                    (true, false) => 2,
                    (true, true) => 1,
                };
                assert_eq!(b.counter(p.steps[0]).unwrap(), applied, "{what}, sticky {sticky}");
            }
            let (c, g) = (&guards[0], &guards[1]);
            for k in 0..guard::LEN {
                let same = c[k] == g[k] || (c[k].is_nan() && g[k].is_nan());
                assert!(same, "{what}: guard value {k}: CPU {} GPU {}", c[k], g[k]);
            }
            if bad {
                let norm_bad = c[guard::WHAT] == 2.0;
                assert!(norm_bad, "{what}: the CPU reports {}", c[guard::WHAT]);
            }
            for (k, (x, y)) in results[0].iter().zip(&results[1]).enumerate().take(init.len() - 5) {
                assert!(within(x, y, 1e-5), "{what}: buffer {k}: relative error {}", rel_err(x, y));
            }
        }
    }
}

/// Batch norm forward (training, running statistics) then backward with every gradient, the
/// parameter gradients accumulated, on one backend: returns every buffer after `times` runs
/// (as CUDA graph replays with `cached`). With `act`, the activation is fused into both
/// (`exec/fuse.rs`): `y` is the activated output and `dy` its gradient.
fn batch_norm_on(
    b: &mut dyn Backend,
    g: BnGeom,
    seed: u64,
    act: Option<ActFn>,
    (times, cached): (usize, bool),
) -> Vec<Vec<f32>> {
    let (m, c) = (g.n * g.c * g.hw, g.c);
    let init = [
        random(m, seed, -1.0, 3.0),     // x
        random(m, seed + 1, -1.0, 1.0), // dy
        random(c, seed + 2, 0.5, 1.5),  // gamma
        random(c, seed + 3, -0.5, 0.5), // beta
        vec![0.0; m],                   // y
        vec![0.0; c],                   // mean
        vec![0.0; c],                   // invstd
        vec![0.0; c],                   // running mean
        vec![1.0; c],                   // running var
        vec![0.0; m],                   // dx
        random(c, seed + 4, -0.1, 0.1), // dgamma (accumulated into)
        vec![0.0; c],                   // dbeta
    ];
    let id: Vec<BufId> = init
        .iter()
        .map(|v| {
            let i = b.alloc(v.len(), DType::F32).unwrap();
            b.write(i, v).unwrap();
            i
        })
        .collect();
    let ops = vec![
        Op::BatchNormTrain(ops::BatchNormTrain {
            g,
            x: id[0],
            gamma: Some(id[2]),
            beta: Some(id[3]),
            y: id[4],
            mean: id[5],
            invstd: id[6],
            running: Some((id[7], id[8], 0.1)),
            sync: false,
            act,
        }),
        Op::BatchNormBackward(ops::BatchNormBackward {
            g,
            x: id[0],
            gamma: Some(id[2]),
            mean: id[5],
            invstd: id[6],
            dy: id[1],
            dx: Some(GradOut { buf: id[9], accumulate: false }),
            dgamma: Some(GradOut { buf: id[10], accumulate: true }),
            dbeta: Some(GradOut { buf: id[11], accumulate: false }),
            sync: false,
            act: act.map(|f| FusedAct { f, y: id[4] }),
        }),
    ];
    for _ in 0..times {
        if cached { b.run_cached(0xb17, &ops).unwrap() } else { b.run(&ops).unwrap() }
    }
    id.iter().map(|&i| b.read(i).unwrap()).collect()
}

fn batch_norm_over_many_blocks_matches_the_cpu_and_repeats_bit_for_bit() {
    let shapes = [
        (64, 7, 33),  // one sample per block: 448 blocks
        (300, 3, 5),  // two samples per block
        (9, 700, 1),  // after a dense layer: more channels than threads in the last block
        (2, 5, 1031), // long rows
        (1, 1, 1),
        (256, 64, 64), // ResNet-18's first stage at batch 256, a quarter of its width
    ];
    let names =
        ["x", "dy", "gamma", "beta", "y", "mean", "invstd", "running mean", "running var", "dx", "dgamma", "dbeta"];
    let mut cpu = CpuBackend::<f32>::new(Some(2)).unwrap();
    let (mut eager, mut graph) = (cuda(), cuda());
    for (k, &(n, c, hw)) in shapes.iter().enumerate() {
        let g = BnGeom { n, c, hw, eps: 1e-5 };
        // Three runs: the running statistics and dgamma accumulate over them.
        let want = batch_norm_on(&mut cpu, g, 50 + k as u64, None, (3, false));
        let got = batch_norm_on(&mut eager, g, 50 + k as u64, None, (3, false));
        let replayed = batch_norm_on(&mut graph, g, 50 + k as u64, None, (3, true));
        for (i, (w, v)) in want.iter().zip(&got).enumerate() {
            assert!(within(w, v, 1e-5), "{n}x{c}x{hw}: {}: relative error {}", names[i], rel_err(w, v));
        }
        assert!(bits(&got) == bits(&replayed), "{n}x{c}x{hw}: graph replays differ from eager runs");
        let again = batch_norm_on(&mut eager, g, 50 + k as u64, None, (3, false));
        assert!(bits(&got) == bits(&again), "{n}x{c}x{hw}: two eager runs differ");
    }
}

/// Batch norm with each activation it fuses (`exec/fuse.rs`), f32 channels-first, against the
/// CPU (whose fused op equals batch norm then the activation bit for bit, tests/fusion.rs), and
/// graph replays bit for bit; then the inference form against batch norm then the activation
/// on the CPU.
fn fused_batch_norm_activation_matches_the_cpu() {
    let acts = [ActFn::Relu, ActFn::LeakyRelu(0.1), ActFn::Elu(1.0), ActFn::Sigmoid, ActFn::Tanh];
    let shapes = [(64, 7, 33), (9, 700, 1), (2, 5, 1031), (32, 64, 256)];
    let mut cpu = CpuBackend::<f32>::new(Some(2)).unwrap();
    let (mut eager, mut graph) = (cuda(), cuda());
    for f in acts {
        for (k, &(n, c, hw)) in shapes.iter().enumerate() {
            let g = BnGeom { n, c, hw, eps: 1e-5 };
            let seed = 80 + k as u64;
            let want = batch_norm_on(&mut cpu, g, seed, Some(f), (2, false));
            let got = batch_norm_on(&mut eager, g, seed, Some(f), (2, false));
            let replayed = batch_norm_on(&mut graph, g, seed, Some(f), (2, true));
            for (i, (w, v)) in want.iter().zip(&got).enumerate() {
                assert!(within(w, v, 1e-5), "{f:?} {n}x{c}x{hw}: buffer {i}: relative error {}", rel_err(w, v));
            }
            assert!(bits(&got) == bits(&replayed), "{f:?} {n}x{c}x{hw}: graph replays differ from eager runs");
        }
        // Inference: running statistics, then the activation.
        let g = BnGeom { n: 16, c: 24, hw: 49, eps: 1e-5 };
        let len = g.n * g.c * g.hw;
        let infer = |b: &mut dyn Backend, fused: bool| {
            let vals = [
                random(len, 90, -2.0, 2.0),
                random(g.c, 91, 0.5, 1.5),
                random(g.c, 92, -0.5, 0.5),
                random(g.c, 93, -0.3, 0.3),
                random(g.c, 94, 0.5, 2.0),
                vec![0.0; len],
                vec![0.0; len],
            ];
            let id: Vec<BufId> = vals
                .iter()
                .map(|v| {
                    let i = b.alloc(v.len(), DType::F32).unwrap();
                    b.write(i, v).unwrap();
                    i
                })
                .collect();
            let bn = ops::BatchNormInfer {
                g,
                x: id[0],
                gamma: Some(id[1]),
                beta: Some(id[2]),
                running_mean: id[3],
                running_var: id[4],
                y: id[5],
                act: None,
            };
            let list = if fused {
                vec![Op::BatchNormInfer(ops::BatchNormInfer { y: id[6], act: Some(f), ..bn })]
            } else {
                vec![Op::BatchNormInfer(bn), Op::Act(ops::Act { f, len, x: id[5], y: id[6] })]
            };
            b.run(&list).unwrap();
            b.read(id[6]).unwrap()
        };
        let (w, v) = (infer(&mut cpu, false), infer(&mut eager, true));
        assert!(within(&w, &v, 1e-5), "{f:?} inference: relative error {}", rel_err(&w, &v));
    }
}

/// Two SGD steps (momentum) of a network whose batch norms carry ReLU, leaky ReLU, sigmoid and
/// tanh (one of them inside a residual block), with fusion (`exec/fuse.rs`) against without, on
/// the GPU: every loss, parameter gradient and parameter. In f32 within 1e-5 (the fused kernels
/// do the unfused arithmetic); in bf16 mixed precision (half NHWC batch norm) within 1e-2, the
/// bf16 bound (the fused form skips one rounding of the pre-activation to bf16).
fn training_with_fusion_matches_training_without() {
    use kiln::exec::{Executor, LossFn, Mode, Precision, Scoring, StepDesc, Sums};
    use kiln::model::{Conv2d, ModelBuilder};
    let conv = |k| Conv2d::new(k, 3).padding(1).bias(false);
    let model = ModelBuilder::new(&[8, 3, 16, 16])
        .conv2d_with(conv(16))
        .batch_norm()
        .relu()
        .residual(|m| m.conv2d_with(conv(16)).batch_norm().leaky_relu(0.1).conv2d_with(conv(16)).batch_norm())
        .relu()
        .conv2d_with(Conv2d::new(8, 3).stride(2).bias(false))
        .batch_norm()
        .sigmoid()
        .flatten()
        .dense(32)
        .batch_norm()
        .tanh()
        .dense(10)
        .seed(3)
        .build()
        .unwrap();
    for (precision, tol) in [(Precision::F32, 1e-5), (Precision::Bf16Mixed, 1e-2)] {
        let run = |fuse: bool| {
            let mut e = Executor::new(&model, cuda()).unwrap();
            e.set_fusion(fuse).unwrap();
            let sgd = OptRule::Sgd { dampening: 0.0, nesterov: false, weight_decay: 0.0 };
            e.init_training(Some(sgd), 0.0).unwrap();
            e.set_hyper(0.05, 0.9).unwrap();
            let desc = StepDesc {
                batch: 8,
                mode: Mode::Train,
                loss: LossFn::SoftmaxCrossEntropy { label_smoothing: 0.0, class_targets: true },
                scoring: Scoring::ArgMax { top_k: 1 },
                sums: Sums::Train,
                update: true,
                zero_grads_first: true,
                accumulation: 1,
                clip: None,
                parallel: None,
                precision,
                check_finite: None,
                loss_scaling: None,
            };
            let id = e.step_plan(&desc).unwrap();
            let fused = e
                .plan_info(id)
                .step
                .iter()
                .filter(|o| matches!(o, Op::BatchNormBackward(b) if b.act.is_some()))
                .count();
            assert_eq!(fused, if fuse { 4 } else { 0 }, "{precision:?}");
            let mut out = Vec::new();
            for s in 0..2u64 {
                e.set_input(id, &random(8 * 3 * 256, 70 + s, -2.0, 2.0)).unwrap();
                e.set_labels(id, &[0, 1, 2, 3, 4, 5, 6, 7]).unwrap();
                e.set_sums(Sums::Train, None).unwrap();
                e.run(id).unwrap();
                out.push((format!("loss {s}"), vec![e.figures(Sums::Train, false).unwrap().loss]));
                for spec in model.params() {
                    if spec.trainable {
                        out.push((format!("{}.grad {s}", spec.name), e.read_param_grad(&spec.name).unwrap()));
                    }
                    out.push((format!("{} {s}", spec.name), e.read_param(&spec.name).unwrap()));
                }
            }
            out
        };
        let (want, got) = (run(false), run(true));
        let mut worst = 0f64;
        for ((name, w), (_, g)) in want.iter().zip(&got) {
            let err = rel_err(w, g);
            worst = worst.max(err);
            assert!(within(w, g, tol), "{precision:?} {name}: {err:.2e} between fused and unfused");
        }
        println!("{precision:?}: fused against unfused, max rel err {worst:.2e}");
    }
}

tests! {
    gpu: [
        batch_norm_over_many_blocks_matches_the_cpu_and_repeats_bit_for_bit,
        fused_batch_norm_activation_matches_the_cpu,
        training_with_fusion_matches_training_without,
        every_optimizer_over_odd_tensor_sets_matches_the_cpu_and_replays_bit_for_bit,
        a_set_in_one_launch_equals_each_tensor_alone,
        the_non_finite_check_over_a_set_finds_nan_inf_and_overflow,
    ],
}
