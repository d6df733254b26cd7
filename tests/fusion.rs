//! Batch norm + activation fusion (`src/exec/fuse.rs`) on the CPU reference: the fused op alone
//! against batch norm then the activation (ReLU's ties at exactly 0 included), whole training
//! steps with the pass on against off (bit for bit: the CPU computes the same values in the same
//! order), checkpointed segments, evaluation, and the plan's structure and memory.

use kiln::backend::Backend;
use kiln::backend::cpu::CpuBackend;
use kiln::backend::ops::{self, ActFn, BnGeom, FusedAct, GradOut};
use kiln::backend::{BufId, Op};
use kiln::exec::{BufRole, Executor, LossFn, Mode, OptRule, PlanOptions, Precision, Scoring, StepDesc, Sums};
use kiln::model::{Conv2d, ModelBuilder};
use kiln::rng::Rng;

/// The functions batch norm fuses (derivative from the output), with a slope and an alpha of 0.
const FUSABLE: [ActFn; 7] = [
    ActFn::Relu,
    ActFn::LeakyRelu(0.1),
    ActFn::LeakyRelu(0.0),
    ActFn::Elu(1.0),
    ActFn::Elu(0.0),
    ActFn::Sigmoid,
    ActFn::Tanh,
];

fn cpu() -> CpuBackend<f32> {
    CpuBackend::<f32>::new(Some(2)).unwrap()
}

fn buf(b: &mut CpuBackend<f32>, data: &[f32]) -> BufId {
    let id = b.alloc(data.len(), kiln::backend::DType::F32).unwrap();
    b.write(id, data).unwrap();
    id
}

fn zeros(b: &mut CpuBackend<f32>, n: usize) -> BufId {
    buf(b, &vec![0.0; n])
}

fn grad(buf: BufId) -> Option<GradOut> {
    Some(GradOut { buf, accumulate: false })
}

/// Batch `[4, 3, 5]`: channel 0 holds -9..=10 (mean 0.5: no value on it), channels 1 and 2
/// are symmetric around 0 with four exact zeros (with gamma 1 and beta 0 or -0.0 batch norm
/// maps them to exactly 0, ReLU's tie, or -0.0).
fn input() -> Vec<f32> {
    let g = BnGeom { n: 4, c: 3, hw: 5, eps: 1e-5 };
    let mut x = vec![0.0f32; g.n * g.c * g.hw];
    for n in 0..g.n {
        for i in 0..g.hw {
            let k = n * g.hw + i; // 0..20 within a channel
            x[(n * g.c) * g.hw + i] = k as f32 - 9.0;
            let sym = [-3.0, -2.0, -1.5, -1.0, 0.0, 1.0, 1.5, 2.0, 3.0, -0.0];
            x[(n * g.c + 1) * g.hw + i] = sym[k % 10] * if k >= 10 { -1.0 } else { 1.0 };
            x[(n * g.c + 2) * g.hw + i] = sym[(k + 3) % 10] * 0.25;
        }
    }
    x
}

/// Everything one training form of the op writes: output, statistics, running statistics,
/// input gradient, scale and shift gradients.
fn run_train(f: ActFn, fused: bool, affine: bool) -> (Vec<Vec<f32>>, Vec<f32>) {
    let g = BnGeom { n: 4, c: 3, hw: 5, eps: 1e-5 };
    let len = g.n * g.c * g.hw;
    let mut b = cpu();
    let x = buf(&mut b, &input());
    let (gamma, beta) =
        if affine { (Some(buf(&mut b, &[1.0, 1.0, 0.5])), Some(buf(&mut b, &[0.0, -0.0, 0.0]))) } else { (None, None) };
    let mut r = Rng::new(3);
    let dz_host: Vec<f32> = (0..len).map(|_| r.uniform_range(-1.0, 1.0)).collect();
    let dz = buf(&mut b, &dz_host);
    let (y, z, dy) = (zeros(&mut b, len), zeros(&mut b, len), zeros(&mut b, len));
    let (mean, invstd) = (zeros(&mut b, g.c), zeros(&mut b, g.c));
    let (rm, rv) = (zeros(&mut b, g.c), buf(&mut b, &[1.0; 3]));
    let (dx, dgamma, dbeta) = (zeros(&mut b, len), zeros(&mut b, g.c), zeros(&mut b, g.c));
    let (dgamma, dbeta) = if affine { (grad(dgamma), grad(dbeta)) } else { (None, None) };
    let bn = ops::BatchNormTrain {
        g,
        x,
        gamma,
        beta,
        y,
        mean,
        invstd,
        running: Some((rm, rv, 0.1)),
        sync: false,
        act: None,
    };
    let back =
        ops::BatchNormBackward { g, x, gamma, mean, invstd, dy, dx: grad(dx), dgamma, dbeta, sync: false, act: None };
    let list = if fused {
        vec![
            Op::BatchNormTrain(ops::BatchNormTrain { y: z, act: Some(f), ..bn }),
            Op::BatchNormBackward(ops::BatchNormBackward { dy: dz, act: Some(FusedAct { f, y: z }), ..back }),
        ]
    } else {
        vec![
            Op::BatchNormTrain(bn),
            Op::Act(ops::Act { f, len, x: y, y: z }),
            Op::ActBackward(ops::ActBackward {
                f,
                len,
                x: y,
                y: z,
                dy: dz,
                dx: GradOut { buf: dy, accumulate: false },
            }),
            Op::BatchNormBackward(back),
        ]
    };
    b.run(&list).unwrap();
    let mut out: Vec<Vec<f32>> = [z, mean, invstd, rm, rv, dx].iter().map(|&id| b.read(id).unwrap()).collect();
    for d in [dgamma, dbeta].into_iter().flatten() {
        out.push(b.read(d.buf).unwrap());
    }
    // With fusion the pre-activation output is never written; without, it is what the
    // activation read.
    let pre = if fused { Vec::new() } else { b.read(y).unwrap() };
    (out, [pre, dz_host].concat())
}

#[test]
fn fused_training_op_matches_batch_norm_then_activation_bit_for_bit() {
    for f in FUSABLE {
        for affine in [true, false] {
            let (want, _) = run_train(f, false, affine);
            let (got, _) = run_train(f, true, affine);
            for (k, (w, g)) in want.iter().zip(&got).enumerate() {
                let (wb, gb): (Vec<u32>, Vec<u32>) =
                    (w.iter().map(|v| v.to_bits()).collect(), g.iter().map(|v| v.to_bits()).collect());
                assert_eq!(wb, gb, "{f:?} affine {affine}: output {k} differs from batch norm then the activation");
            }
        }
    }
}

/// ReLU's gradient at exactly 0 is 0 (PyTorch's `threshold_backward`): the fused op's `dbeta`
/// is the sum of the output gradient where batch norm's output is above 0 only, computed here
/// from the unfused run's batch norm output (which holds exact zeros, -0.0 among them).
#[test]
fn relu_ties_at_zero_pass_no_gradient() {
    let (_, pre_and_dz) = run_train(ActFn::Relu, false, true);
    let len = 60;
    let (pre, dz) = pre_and_dz.split_at(len);
    let zeros = pre.iter().filter(|v| **v == 0.0).count();
    assert!(zeros >= 8, "the input gives exact zeros after batch norm ({zeros})");
    assert!(pre.iter().any(|v| *v == 0.0 && v.is_sign_negative()), "and -0.0");
    let (got, _) = run_train(ActFn::Relu, true, true);
    let dbeta = got.last().unwrap();
    for (c, got) in dbeta.iter().enumerate() {
        let mut want = 0f64;
        for n in 0..4 {
            for i in 0..5 {
                let j = (n * 3 + c) * 5 + i;
                if pre[j] > 0.0 {
                    want += dz[j] as f64;
                }
            }
        }
        assert!((*got as f64 - want).abs() < 1e-5, "channel {c}: dbeta {got} but the mask gives {want}");
    }
}

#[test]
fn fused_inference_op_matches_batch_norm_then_activation() {
    let g = BnGeom { n: 4, c: 3, hw: 5, eps: 1e-5 };
    let len = 60;
    for f in FUSABLE {
        let run = |fused: bool| {
            let mut b = cpu();
            let x = buf(&mut b, &input());
            let (gamma, beta) = (buf(&mut b, &[1.0, 2.0, -0.5]), buf(&mut b, &[0.25, 0.0, 0.1]));
            let (rm, rv) = (buf(&mut b, &[0.5, 0.0, 0.0]), buf(&mut b, &[30.0, 2.0, 0.5]));
            let (y, z) = (zeros(&mut b, len), zeros(&mut b, len));
            let bn = ops::BatchNormInfer {
                g,
                x,
                gamma: Some(gamma),
                beta: Some(beta),
                running_mean: rm,
                running_var: rv,
                y,
                act: None,
            };
            let list = if fused {
                vec![Op::BatchNormInfer(ops::BatchNormInfer { y: z, act: Some(f), ..bn })]
            } else {
                vec![Op::BatchNormInfer(bn), Op::Act(ops::Act { f, len, x: y, y: z })]
            };
            b.run(&list).unwrap();
            b.read(z).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
        };
        assert_eq!(run(true), run(false), "{f:?}");
    }
}

/// SiLU and GELU (their derivatives need the input) and negative slopes or alphas (two inputs
/// give one output) cannot be fused: such an op is refused with an error naming the function.
#[test]
fn an_activation_that_needs_its_input_is_refused() {
    for f in [ActFn::Silu, ActFn::Gelu, ActFn::LeakyRelu(-0.5), ActFn::Elu(-1.0)] {
        assert!(!f.derivative_from_output());
        let g = BnGeom { n: 2, c: 1, hw: 2, eps: 1e-5 };
        let mut b = cpu();
        let (x, y, m, s) = (buf(&mut b, &[1.0, 2.0, 3.0, 4.0]), zeros(&mut b, 4), zeros(&mut b, 1), zeros(&mut b, 1));
        let op = ops::BatchNormTrain {
            g,
            x,
            gamma: None,
            beta: None,
            y,
            mean: m,
            invstd: s,
            running: None,
            sync: false,
            act: Some(f),
        };
        let err = b.run(&[Op::BatchNormTrain(op)]).unwrap_err().to_string();
        assert!(err.contains("cannot be fused") && err.contains(&format!("{f:?}")), "{err}");
    }
}

/// Fusable functions after batch norm over images and over features (ReLU, leaky ReLU, sigmoid,
/// tanh, ELU); not fused: a ReLU on a batch norm output that also feeds a residual sum, SiLU, a
/// negative slope, a ReLU after a sum. With `checkpoint`, the second block is a checkpointed
/// segment: its leaky ReLU fuses in forward and in the recomputed forward, and the sigmoid
/// after its last batch norm (outside the segment) fuses with it, the backward reading the
/// recomputed statistics.
fn model(checkpoint: bool) -> ModelBuilder {
    let seg = |b: ModelBuilder| {
        b.conv2d_with(Conv2d::new(6, 3).padding(1).bias(false)).batch_norm().leaky_relu(0.2).conv2d(6, 3).batch_norm()
    };
    let b = ModelBuilder::new(&[4, 3, 8, 8]).conv2d_with(Conv2d::new(6, 3).padding(1)).batch_norm().relu();
    let b = if checkpoint { b.checkpoint(seg) } else { seg(b) };
    b.sigmoid()
        .batch_norm()
        .residual(|m| m.relu().conv2d_with(Conv2d::new(6, 3).padding(1)).batch_norm().tanh())
        .relu()
        .conv2d(4, 3)
        .batch_norm()
        .silu()
        .conv2d_with(Conv2d::new(4, 1))
        .batch_norm()
        .leaky_relu(-0.5)
        .flatten()
        .dense(12)
        .batch_norm()
        .elu(1.0)
        .dense(5)
}

fn step_desc(mode: Mode) -> StepDesc {
    StepDesc {
        batch: 4,
        mode,
        loss: LossFn::SoftmaxCrossEntropy { label_smoothing: 0.0, class_targets: true },
        scoring: Scoring::ArgMax { top_k: 1 },
        sums: if mode == Mode::Train { Sums::Train } else { Sums::Eval },
        update: mode == Mode::Train,
        zero_grads_first: true,
        accumulation: 1,
        clip: None,
        parallel: None,
        precision: Precision::F32,
        check_finite: None,
        loss_scaling: None,
    }
}

/// Three SGD steps with momentum, then an evaluation step and a prediction: every loss, every
/// parameter's gradient and value (running statistics included), the predictions.
fn train(model: &kiln::model::Model, fuse: bool) -> Vec<(String, Vec<u32>)> {
    let mut e = Executor::new(model, cpu()).unwrap();
    e.set_fusion(fuse).unwrap();
    e.init_training(Some(OptRule::Sgd { dampening: 0.0, nesterov: false, weight_decay: 1e-4 }), 0.0).unwrap();
    e.set_hyper(0.05, 0.9).unwrap();
    let id = e.step_plan(&step_desc(Mode::Train)).unwrap();
    let mut r = Rng::new(11);
    let mut out = Vec::new();
    let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    for s in 0..3 {
        let x: Vec<f32> = (0..4 * 3 * 64).map(|_| r.uniform_range(-2.0, 2.0)).collect();
        e.set_input(id, &x).unwrap();
        e.set_labels(id, &[s % 5, 1, 4, 2]).unwrap();
        e.set_sums(Sums::Train, None).unwrap();
        e.run(id).unwrap();
        out.push((format!("loss {s}"), bits(vec![e.figures(Sums::Train, false).unwrap().loss])));
        for spec in model.params() {
            if spec.trainable {
                out.push((format!("{} grad {s}", spec.name), bits(e.read_param_grad(&spec.name).unwrap())));
            }
            out.push((format!("{} {s}", spec.name), bits(e.read_param(&spec.name).unwrap())));
        }
    }
    let ev = e.step_plan(&step_desc(Mode::Eval)).unwrap();
    let x: Vec<f32> = (0..4 * 3 * 64).map(|_| r.uniform_range(-2.0, 2.0)).collect();
    e.set_input(ev, &x).unwrap();
    e.set_labels(ev, &[0, 1, 2, 3]).unwrap();
    e.set_sums(Sums::Eval, None).unwrap();
    e.run(ev).unwrap();
    out.push(("eval loss".into(), bits(vec![e.figures(Sums::Eval, false).unwrap().loss])));
    let t = kiln::tensor::Tensor::new(&[4, 3, 8, 8], x).unwrap();
    out.push(("prediction".into(), bits(e.predict(&t, Mode::Eval).unwrap().data().to_vec())));
    out
}

#[test]
fn training_steps_with_fusion_match_those_without_bit_for_bit() {
    for checkpoint in [false, true] {
        let m = model(checkpoint).seed(5).build().unwrap();
        let (want, got) = (train(&m, false), train(&m, true));
        assert_eq!(want.len(), got.len());
        for ((name, w), (_, g)) in want.iter().zip(&got) {
            assert_eq!(w, g, "checkpointed {checkpoint}: {name} differs with fusion");
        }
    }
}

/// The fused ops are there, the activations they took in are gone (forward and backward, in
/// the recomputed forward of a checkpointed segment too), the others stay; the plan holds
/// less activation memory, and no more of anything.
#[test]
fn the_plan_has_the_fused_ops_and_less_memory() {
    for checkpoint in [false, true] {
        let m = model(checkpoint).seed(5).build().unwrap();
        let plan = |fuse: bool| {
            let mut e = Executor::new(&m, cpu()).unwrap();
            e.set_fusion(fuse).unwrap();
            let id = e.plan(4, Mode::Train, PlanOptions { input_grad: true, accumulate_param_grads: false }).unwrap();
            (e.plan_info(id).clone(), e.memory(id))
        };
        let ((off, mem_off), (on, mem_on)) = (plan(false), plan(true));
        let count = |ops: &[Op], f: &dyn Fn(&Op) -> bool| ops.iter().filter(|o| f(o)).count();
        let fused_fwd = |o: &Op| matches!(o, Op::BatchNormTrain(b) if b.act.is_some());
        let fused_bwd = |o: &Op| matches!(o, Op::BatchNormBackward(b) if b.act.is_some());
        let acts = |o: &Op| matches!(o, Op::Act(_));
        let act_bwd = |o: &Op| matches!(o, Op::ActBackward(_));
        // Fused: relu, leaky_relu(0.2), sigmoid, tanh, elu.
        let fused = 5;
        assert_eq!(count(&off.forward, &fused_fwd), 0);
        let recomputed = if checkpoint { 1 } else { 0 };
        assert_eq!(count(&on.forward, &fused_fwd), fused, "checkpointed {checkpoint}");
        assert_eq!(count(&on.backward, &fused_fwd), recomputed, "the segment's recomputed forward");
        assert_eq!(count(&on.backward, &fused_bwd), fused);
        assert_eq!(count(&on.forward, &acts), count(&off.forward, &acts) - fused);
        assert_eq!(count(&on.backward, &acts), count(&off.backward, &acts) - recomputed);
        assert_eq!(count(&on.backward, &act_bwd), count(&off.backward, &act_bwd) - fused);
        assert_eq!(on.forward.len(), off.forward.len() - fused);
        assert_eq!(on.backward.len(), off.backward.len() - fused - recomputed);
        assert_eq!(on.forward_nodes.len(), on.forward.len());
        assert_eq!(on.backward_nodes.len(), on.backward.len());
        // A fused batch norm's node names the fused output.
        for op in &on.forward {
            if let Op::BatchNormTrain(b) = op
                && b.act.is_some()
            {
                assert!(on.node_outputs.contains(&b.y));
            }
        }
        // Every buffer an op names is one the plan holds (or a parameter of the executor).
        let mut named = std::collections::HashSet::new();
        for op in on.forward.iter().chain(&on.backward) {
            op.each_buffer(&mut |u| {
                named.insert(u.buf);
            });
        }
        for b in on.buffers.iter().filter(|b| b.role == BufRole::Activation) {
            assert!(named.contains(&b.id) || b.id == on.input, "{} is held but never used", b.label);
        }
        // Memory: no role holds more. The pre-activation outputs die in forward even unfused
        // where the activation's backward reads its output only, and share buffers by lifetime
        // (exec/compile.rs), so fusion frees only what their turns needed: here the buffer the
        // last of them (before the dense head) kept alone.
        let (act_on, act_off) = (mem_on.of(BufRole::Activation), mem_off.of(BufRole::Activation));
        println!("checkpointed {checkpoint}: fusion off\n{mem_off}\nfusion on\n{mem_on}");
        assert!(act_on < act_off, "{act_on} < {act_off}");
        assert!(mem_on.of(BufRole::Gradient) <= mem_off.of(BufRole::Gradient));
        assert!(mem_on.total() < mem_off.total());
        for role in [BufRole::Saved, BufRole::Workspace, BufRole::Parameter, BufRole::Input] {
            assert_eq!(mem_on.of(role), mem_off.of(role), "{role:?}");
        }
    }
}

/// Evaluation plans fuse too (batch norm with running statistics), and `set_fusion` after the
/// first plan is an error, not a silent change of plans already compiled.
#[test]
fn evaluation_plans_fuse_and_fusion_is_set_before_the_first_plan() {
    let m = model(false).seed(5).build().unwrap();
    let mut e = Executor::new(&m, cpu()).unwrap();
    // The CPU fuses by default (unless KILN_FUSION says otherwise).
    if std::env::var_os("KILN_FUSION").is_none() {
        assert!(cpu().fuses_norm_activation());
    } else {
        e.set_fusion(true).unwrap();
    }
    let id = e.plan(4, Mode::Eval, PlanOptions::default()).unwrap();
    let p = e.plan_info(id);
    let fused = p.forward.iter().filter(|o| matches!(o, Op::BatchNormInfer(b) if b.act.is_some())).count();
    assert_eq!(fused, 5);
    let err = e.set_fusion(false).unwrap_err().to_string();
    assert!(err.contains("set_fusion") && err.contains("before the first plan"), "{err}");
    e.set_fusion(true).unwrap();
}
