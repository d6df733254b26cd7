//! Gradient checkpointing on the GPU: a checkpointed model (batch norm and dropout inside its
//! segments) trains bit-identically to the same model without checkpoints on the same GPU
//! (deterministic f32), so the recomputation replays the dropout masks on the device
//! (`ops::Dropout::replay`) and leaves the counters and running statistics as forward left them.

use kiln::backend::Device;
use kiln::model::{Conv2d, Model, ModelBuilder};
use kiln::rng::Rng;
use kiln::tensor::Tensor;
use kiln::train::{Optimizer, Trainer, TrainerConfig};

mod cuda_common;
use cuda_common::cuda;

fn maybe(b: ModelBuilder, ckpt: bool, f: impl FnOnce(ModelBuilder) -> ModelBuilder) -> ModelBuilder {
    if ckpt { b.checkpoint(f) } else { f(b) }
}

fn cnn(ckpt: bool) -> Model {
    let conv = |c: usize| Conv2d::new(c, 3).padding(1);
    let b = ModelBuilder::new(&[8, 3, 12, 12]).seed(7);
    let b = maybe(b, ckpt, |b| b.conv2d_with(conv(8)).batch_norm().relu().dropout(0.3));
    let b = maybe(b, ckpt, |b| b.residual(|m| m.conv2d_with(conv(8)).batch_norm().relu()).max_pool2d(2));
    let b = b.flatten().dense(16).relu();
    maybe(b, ckpt, |b| b.dropout(0.5).dense(10)).build().unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn checkpointed_training_is_bit_identical_on_the_gpu() {
    let config = TrainerConfig {
        batch_size: 8,
        learning_rate: 1e-2,
        optimizer: Optimizer::adam(),
        device: Device::Cuda(0),
        seed: 11,
        ..Default::default()
    };
    let (plain, ck) = (cnn(false), cnn(true));
    let mut a = Trainer::with_backend(&plain, config.clone(), Box::new(cuda())).unwrap();
    let mut b = Trainer::with_backend(&ck, config, Box::new(cuda())).unwrap();
    let mut r = Rng::new(5);
    for step in 0..4 {
        let x = Tensor::new(&[8, 3, 12, 12], (0..8 * 3 * 144).map(|_| 2.0 * r.uniform() - 1.0).collect()).unwrap();
        let y: Vec<u32> = (0..8).map(|_| (r.next_u64() % 10) as u32).collect();
        let (ra, rb) = (a.train_batch(&x, &y).unwrap(), b.train_batch(&x, &y).unwrap());
        assert_eq!(ra.loss.to_bits(), rb.loss.to_bits(), "step {step}: loss {} vs {}", ra.loss, rb.loss);
        for ((name, ga), (_, gb)) in a.gradients().unwrap().into_iter().zip(b.gradients().unwrap()) {
            assert_eq!(bits(&ga), bits(&gb), "step {step}: gradient of {name}");
        }
    }
    let (ma, mb) = (a.model().unwrap().clone(), b.model().unwrap().clone());
    for (spec, (va, vb)) in ma.params().iter().zip(ma.param_values().iter().zip(mb.param_values())) {
        assert_eq!(bits(va), bits(vb), "{}", spec.name);
    }
    let (da, db) = (a.executor().dropout_steps().unwrap(), b.executor().dropout_steps().unwrap());
    assert_eq!(da, db);
    assert!(da.iter().all(|(_, n)| *n == 4), "{da:?}");
}

tests! {
    gpu: [checkpointed_training_is_bit_identical_on_the_gpu],
}
