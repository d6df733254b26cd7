//! Gradient checkpointing (`ModelBuilder::checkpoint`) on the CPU: a checkpointed model trains
//! bit-identically to the same model without checkpoints (losses, gradients, Adam's updates,
//! batch norm's running statistics, dropout's masks and counters), its training plan holds less
//! activation and saved-for-backward memory, and misuse is an error.

use kiln::backend::cpu::CpuBackend;
use kiln::exec::{BufRole, Executor, Mode, PlanOptions};
use kiln::model::{Conv2d, Model, ModelBuilder};
use kiln::rng::Rng;
use kiln::tensor::Tensor;
use kiln::train::{Device, Optimizer, Trainer, TrainerConfig};
use kiln::{Error, zoo};

/// `f(b)`, inside a checkpoint block when `ckpt`.
fn maybe(b: ModelBuilder, ckpt: bool, f: impl FnOnce(ModelBuilder) -> ModelBuilder) -> ModelBuilder {
    if ckpt { b.checkpoint(f) } else { f(b) }
}

fn conv(c: usize) -> Conv2d {
    Conv2d::new(c, 3).padding(1)
}

/// Convolutions, batch norm, ReLU and dropout; the segments end with dropout (its mask is
/// recomputed), batch norm (its statistics are) and a pooling layer.
fn cnn(ckpt: bool) -> Model {
    let b = ModelBuilder::new(&[8, 3, 12, 12]).seed(7);
    let b = maybe(b, ckpt, |b| b.conv2d_with(conv(8)).batch_norm().relu().dropout(0.3));
    let b = maybe(b, ckpt, |b| b.conv2d_with(conv(8)).batch_norm());
    let b = maybe(b, ckpt, |b| b.relu().max_pool2d(2));
    let b = b.flatten().dense(16).relu();
    let b = maybe(b, ckpt, |b| b.dropout(0.5).dense(10));
    b.build().unwrap()
}

/// A small ResNet: a stem, identity and projection residual blocks, each block one checkpointed
/// segment (the CNN above and `tests/cuda_checkpoint.rs` have segments of several layers that
/// are not blocks).
fn resnet(ckpt: bool) -> Model {
    let block = |b: ModelBuilder, c: usize| {
        b.residual(|m| m.conv2d_with(conv(c)).batch_norm().relu().conv2d_with(conv(c)).batch_norm()).relu()
    };
    let b = ModelBuilder::new(&[4, 3, 16, 16]).seed(3).conv2d_with(conv(8)).batch_norm().relu();
    let b = maybe(b, ckpt, |b| block(b, 8));
    let b = maybe(b, ckpt, |b| block(b, 8));
    let b = maybe(b, ckpt, |b| block(b, 8));
    let b = maybe(b, ckpt, |b| {
        b.residual_with(
            |m| m.conv2d_with(conv(16).stride(2)).batch_norm().relu().conv2d_with(conv(16)).batch_norm(),
            |s| s.conv2d_with(Conv2d::new(16, 1).stride(2)).batch_norm(),
        )
        .relu()
    });
    let b = maybe(b, ckpt, |b| block(b, 16));
    b.global_avg_pool().dense(10).build().unwrap()
}

fn data(shape: &[usize], seed: u64) -> (Tensor, Vec<u32>) {
    let mut r = Rng::new(seed);
    let x = Tensor::new(shape, (0..shape.iter().product()).map(|_| 2.0 * r.uniform() - 1.0).collect()).unwrap();
    let y = (0..shape[0]).map(|_| (r.next_u64() % 10) as u32).collect();
    (x, y)
}

fn trainer(model: &Model) -> Trainer {
    let config = TrainerConfig {
        batch_size: model.batch_size(),
        learning_rate: 1e-2,
        optimizer: Optimizer::adam(),
        device: Device::Cpu,
        threads: Some(2),
        seed: 11,
        ..Default::default()
    };
    Trainer::new(model, config).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Trains `plain` and `checkpointed` side by side for `steps` Adam steps on the same batches
/// and asserts every loss, gradient, parameter and running statistic bit-identical.
fn same_training(plain: Model, checkpointed: Model, steps: usize) {
    assert!(plain.checkpoints().is_empty() && !checkpointed.checkpoints().is_empty());
    assert_eq!(plain.nodes(), checkpointed.nodes());
    let (mut a, mut b) = (trainer(&plain), trainer(&checkpointed));
    for step in 0..steps {
        let (x, y) = data(&plain.input_shape(), 100 + step as u64);
        let (ra, rb) = (a.train_batch(&x, &y).unwrap(), b.train_batch(&x, &y).unwrap());
        assert_eq!(ra.loss.to_bits(), rb.loss.to_bits(), "step {step}: loss {} vs {}", ra.loss, rb.loss);
        for ((name, ga), (_, gb)) in a.gradients().unwrap().into_iter().zip(b.gradients().unwrap()) {
            assert!(ga.iter().any(|&g| g != 0.0), "step {step}: {name} has a zero gradient");
            assert_eq!(bits(&ga), bits(&gb), "step {step}: gradient of {name}");
        }
    }
    let (ma, mb) = (a.model().unwrap().clone(), b.model().unwrap().clone());
    let mut running = 0;
    for (spec, (va, vb)) in ma.params().iter().zip(ma.param_values().iter().zip(mb.param_values())) {
        assert_eq!(bits(va), bits(vb), "{} after {steps} steps", spec.name);
        running += spec.name.contains("running_") as usize;
    }
    if plain.nodes().iter().any(|n| n.name.starts_with("batch_norm")) {
        assert!(running > 0);
        // The running mean moved from its initial zeros (each step updated it once).
        let rm = ma.param("batch_norm_1.running_mean").unwrap();
        assert!(rm.iter().any(|&v| v != 0.0));
    }
    let (da, db) = (a.executor().dropout_steps().unwrap(), b.executor().dropout_steps().unwrap());
    assert_eq!(da, db, "dropout counters");
    assert!(da.iter().all(|(_, n)| *n == steps as u64), "one mask per step: {da:?}");
}

#[test]
fn a_checkpointed_cnn_with_batch_norm_and_dropout_trains_bit_identically() {
    same_training(cnn(false), cnn(true), 4);
}

#[test]
fn a_checkpointed_resnet_trains_bit_identically() {
    same_training(resnet(false), resnet(true), 3);
}

#[test]
fn checkpointing_recomputes_in_backward() {
    let (plain, ck) = (cnn(false), cnn(true));
    let plan = |m: &Model| {
        let mut e = Executor::new(m, CpuBackend::<f32>::new(Some(1)).unwrap()).unwrap();
        // The plans as lowered (batch norm + ReLU fusion, exec/fuse.rs, merges ops).
        e.set_fusion(false).unwrap();
        let id = e.plan(8, Mode::Train, PlanOptions::default()).unwrap();
        e.plan_info(id).clone()
    };
    let (p, c) = (plan(&plain), plan(&ck));
    assert_eq!(p.forward.len(), c.forward.len());
    // Recomputed: segment 1 (conv, bn, relu, dropout), segment 2 (conv, bn), segment 3 (relu;
    // max pool saves its argmax, so it is recomputed too), segment 4 (dropout; dense saved nothing).
    let recomputed = c.backward.len() - p.backward.len();
    assert_eq!(recomputed, 4 + 2 + 2 + 1, "{:?}", c.backward.iter().map(|o| o.name()).collect::<Vec<_>>());
    let dropouts = c.backward.iter().filter(|o| o.name() == "dropout").count();
    assert_eq!(dropouts, 2);
    assert_eq!(c.backward_nodes.len(), c.backward.len());
}

/// Activation plus saved-for-backward bytes of a training plan.
fn kept_bytes(m: &Model, batch: usize) -> (usize, String) {
    let mut e = Executor::new(m, CpuBackend::<f32>::new(Some(1)).unwrap()).unwrap();
    let id = e.plan(batch, Mode::Train, PlanOptions::default()).unwrap();
    let p = e.plan_info(id);
    (p.bytes_of(BufRole::Activation) + p.bytes_of(BufRole::Saved), e.memory(id).to_string())
}

#[test]
fn checkpointing_a_resnet_saves_activation_memory() {
    let (plain, plain_report) = kept_bytes(&resnet(false), 32);
    let (ck, ck_report) = kept_bytes(&resnet(true), 32);
    println!("without checkpoints:\n{plain_report}\nwith checkpoints:\n{ck_report}");
    println!("activations + saved: {plain} -> {ck} bytes ({:.0}%)", 100.0 * ck as f64 / plain as f64);
    // Kept: the stem and each block's output; pooled: one block's inside at a time per size
    // (buffers are shared between tensors of one length). The plain plan already lets the
    // activations backward does not read share buffers (exec/compile.rs), so the saving is
    // what checkpointing adds to that (was 40% against a plan without sharing).
    assert!(ck * 10 < plain * 8, "{ck} bytes with checkpoints against {plain} without");
    // ResNet-18 with every residual block a segment.
    let r18 = zoo::resnet18(8, 10).build().unwrap();
    let blocks: Vec<std::ops::Range<usize>> = r18
        .nodes()
        .iter()
        .enumerate()
        .filter(|(_, n)| n.name.ends_with(".add") || n.layer == kiln::model::Layer::Add)
        .map(|(i, _)| i)
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| w[0] + 1..w[1] + 1)
        .collect();
    assert!(blocks.len() >= 6, "{blocks:?}");
    let (plain, _) = kept_bytes(&r18, 8);
    let (ck, report) = kept_bytes(&r18.with_checkpoints(blocks).unwrap(), 8);
    println!("ResNet-18, batch 8: activations + saved {plain} -> {ck} bytes\n{report}");
    assert!(ck < plain);
}

#[test]
fn evaluation_and_input_gradients_are_unchanged() {
    let (plain, ck) = (resnet(false), resnet(true));
    let (x, _) = data(&plain.input_shape(), 5);
    let run = |m: &Model| {
        let mut e = Executor::new(m, CpuBackend::<f32>::new(Some(1)).unwrap()).unwrap();
        let eval = e.predict(&x, Mode::Eval).unwrap();
        let opts = PlanOptions { input_grad: true, ..Default::default() };
        let id = e.plan(4, Mode::Train, opts).unwrap();
        e.set_input(id, x.data()).unwrap();
        e.forward(id).unwrap();
        let out = e.read_output(id).unwrap();
        e.set_output_grad(id, &vec![0.25; out.len()]).unwrap();
        e.backward(id).unwrap();
        (eval.data().to_vec(), out, e.read_input_grad(id).unwrap())
    };
    let (a, b) = (run(&plain), run(&ck));
    assert_eq!(bits(&a.0), bits(&b.0));
    assert_eq!(bits(&a.1), bits(&b.1));
    assert!(a.2.iter().any(|&g| g != 0.0));
    assert_eq!(bits(&a.2), bits(&b.2));
}

#[test]
fn empty_and_nested_checkpoint_blocks_are_errors() {
    let e = ModelBuilder::new(&[2, 4]).dense(4).name("fc").checkpoint(|b| b).dense(2).build().unwrap_err();
    assert!(matches!(&e, Error::Model(m) if m.contains("checkpoint block after layer 'fc' is empty")), "{e}");
    let e = ModelBuilder::new(&[2, 4]).checkpoint(|b| b.dense(4).checkpoint(|c| c.relu())).build().unwrap_err();
    assert!(e.to_string().contains("cannot be nested"), "{e}");
    let m = ModelBuilder::new(&[2, 4]).dense(4).residual(|b| b.relu()).build().unwrap();
    let e = m.with_checkpoints(std::iter::once(1..3)).unwrap_err();
    assert!(e.to_string().contains("only the block's last layer may be used outside it"), "{e}");
}
