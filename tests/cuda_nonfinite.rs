//! Issue 14, item 1 on the GPU: NaN goes through every activation kernel as on the CPU, and the
//! step's non-finite check (a device flag that the update kernels read, inside the replayed CUDA
//! graph) leaves weights and optimizer state untouched. Reported as ignored without a GPU (and
//! failing instead under `KILN_REQUIRE_GPU=1`), through tests/cuda_common's harness.

mod cuda_common;

use kiln::Error;
use kiln::model::{Model, ModelBuilder};
use kiln::tensor::Tensor;
use kiln::train::{Device, Loss, NonFinite, Optimizer, Trainer, TrainerConfig};

fn gpu_config(non_finite: NonFinite) -> TrainerConfig {
    TrainerConfig { batch_size: 2, device: Device::Cuda(0), non_finite, ..Default::default() }
}

fn nan_batch() -> (Tensor, Vec<u32>) {
    let mut x = vec![0.25f32; 50];
    x[12] = f32::NAN;
    (Tensor::new(&[2, 1, 5, 5], x).unwrap(), vec![0, 2])
}

fn good_batch(k: usize) -> (Tensor, Vec<u32>) {
    let x = (0..50).map(|i| ((i * 7 + k * 3) % 11) as f32 / 11.0).collect();
    (Tensor::new(&[2, 1, 5, 5], x).unwrap(), vec![(k % 3) as u32, ((k + 1) % 3) as u32])
}

fn issue_model() -> Model {
    ModelBuilder::new(&[2, 1, 5, 5]).conv2d(4, 3).relu().flatten().dense(3).seed(3).build().unwrap()
}

fn weights(t: &mut Trainer) -> Vec<Vec<f32>> {
    t.model().unwrap().param_values().to_vec()
}

fn cuda_nan_goes_through_every_activation() {
    type Act = fn(ModelBuilder) -> ModelBuilder;
    let acts: [(&str, Act); 7] = [
        ("relu", |b| b.relu()),
        ("leaky_relu", |b| b.leaky_relu(0.01)),
        ("elu", |b| b.elu(1.0)),
        ("sigmoid", |b| b.sigmoid()),
        ("tanh", |b| b.tanh()),
        ("silu", |b| b.silu()),
        ("gelu", |b| b.gelu()),
    ];
    for (name, act) in acts {
        let model = act(ModelBuilder::new(&[2, 1, 5, 5]).conv2d(4, 3)).flatten().dense(3).seed(1).build().unwrap();
        let mut t = Trainer::new(&model, gpu_config(NonFinite::Error)).unwrap();
        let y = t.predict(&nan_batch().0).unwrap();
        assert!(y.data()[..3].iter().all(|v| v.is_nan()), "{name}: sample 0 gave {:?}", &y.data()[..3]);
        assert!(y.data()[3..].iter().all(|v| v.is_finite()), "{name}: sample 1 gave {:?}", &y.data()[3..]);
    }
}

fn cuda_non_finite_step_inside_the_graph_is_an_error_and_changes_nothing() {
    let mut reference = Trainer::new(&issue_model(), gpu_config(NonFinite::Error)).unwrap();
    let mut t = Trainer::new(&issue_model(), gpu_config(NonFinite::Error)).unwrap();
    // Three good steps: eager warm-up, capture, replay; the bad step is a graph replay.
    for k in 0..3 {
        let (x, y) = good_batch(k);
        reference.train_batch(&x, &y).unwrap();
        t.train_batch(&x, &y).unwrap();
    }
    let before = weights(&mut t);
    let (x, y) = nan_batch();
    // train_step queues without reading back: the flag alone must stop the update.
    t.train_step(&x, &y[..]).unwrap();
    let (gx, gy) = good_batch(3);
    t.train_step(&gx, &gy[..]).unwrap(); // queued after the bad step: skipped (error mode)
    match t.take_epoch_metrics() {
        Err(Error::NonFinite { step, what }) => {
            assert_eq!(step, 4);
            assert!(what.contains("loss (NaN)"), "{what}");
        }
        other => panic!("expected Error::NonFinite, got {other:?}"),
    }
    assert_eq!(weights(&mut t), before, "the bad step or the one queued after it changed the weights");
    let (gx, gy) = good_batch(4);
    reference.train_batch(&gx, &gy).unwrap();
    t.train_batch(&gx, &gy).unwrap();
    assert_eq!(weights(&mut t), weights(&mut reference), "optimizer state moved during the skipped steps");
}

fn cuda_skip_mode_counts_and_matches_the_cpu() {
    let cpu = TrainerConfig { device: Device::Cpu, ..gpu_config(NonFinite::Skip) };
    let mut on_cpu = Trainer::new(&issue_model(), cpu).unwrap();
    let mut on_gpu = Trainer::new(&issue_model(), gpu_config(NonFinite::Skip)).unwrap();
    for k in 0..5 {
        let (x, y) = if k == 2 { nan_batch() } else { good_batch(k) };
        on_cpu.train_batch(&x, &y).unwrap();
        on_gpu.train_batch(&x, &y).unwrap();
    }
    assert_eq!(on_gpu.skipped_steps().unwrap(), 1);
    assert_eq!(on_cpu.skipped_steps().unwrap(), 1);
    for (c, g) in weights(&mut on_cpu).iter().zip(weights(&mut on_gpu)) {
        assert!(cuda_common::within(c, &g, 1e-4), "GPU weights differ from the CPU's");
    }
}

fn cuda_bce_on_values_outside_zero_one_names_the_sample() {
    let mut model = ModelBuilder::new(&[3, 2]).dense(1).build().unwrap();
    model.set_param("dense_1.weight", &[1.0, 0.0]).unwrap();
    model.set_param("dense_1.bias", &[0.5]).unwrap();
    let config = TrainerConfig {
        batch_size: 3,
        loss: Loss::BinaryCrossEntropy,
        optimizer: Optimizer::sgd(0.0),
        ..gpu_config(NonFinite::Error)
    };
    let mut t = Trainer::new(&model, config).unwrap();
    let x = Tensor::new(&[3, 2], vec![0.0, 0.0, 3.0, 0.0, -0.2, 0.0]).unwrap();
    match t.train_batch(&x, &[0u32, 1, 0][..]) {
        Err(Error::NonFinite { what, .. }) => {
            assert!(what.contains("sample 1") && what.contains("BinaryCrossEntropyWithLogits"), "{what}")
        }
        other => panic!("expected an error naming sample 1, got {other:?}"),
    }
}

tests! {
    gpu: [
        cuda_nan_goes_through_every_activation,
        cuda_non_finite_step_inside_the_graph_is_an_error_and_changes_nothing,
        cuda_skip_mode_counts_and_matches_the_cpu,
        cuda_bce_on_values_outside_zero_one_names_the_sample,
    ],
}
