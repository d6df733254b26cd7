//! Loss scaling on the wgpu backend (`backend/wgpu/loss_scale.rs`), as tests/grad_scaler.rs
//! checks it on the CPU: a scaled f32 run equals the unscaled one bit for bit, the scale grows
//! after `growth_interval` good steps, and a NaN step is skipped (weights untouched) and
//! halves the scale. Ignored without the `wgpu` feature or an adapter (tests/wgpu_common);
//! `cargo test --test wgpu_scaler` runs it (on lavapipe: 0.5 s).

mod wgpu_common;

use kiln::model::ModelBuilder;
use kiln::tensor::Tensor;
use kiln::train::{Device, GradScaler, LossScaling, NonFinite, ScalerState, Trainer, TrainerConfig};
use wgpu_common::{adapter, run_trials, wgpu_trial};

fn batch(k: usize, nan: bool) -> (Tensor, Vec<u32>) {
    let mut x: Vec<f32> = (0..50).map(|i| ((i * 7 + k * 3) % 11) as f32 / 11.0 - 0.4).collect();
    if nan {
        x[12] = f32::NAN;
    }
    (Tensor::new(&[2, 1, 5, 5], x).unwrap(), vec![(k % 3) as u32, ((k + 1) % 3) as u32])
}

fn the_scaler_skips_halves_and_grows_as_on_the_cpu() {
    let model = ModelBuilder::new(&[2, 1, 5, 5]).conv2d(4, 3).relu().flatten().dense(3).seed(3).build().unwrap();
    let cfg = |loss_scaling| TrainerConfig {
        batch_size: 2,
        device: Device::Wgpu(adapter()),
        learning_rate: 1e-2,
        loss_scaling,
        non_finite: NonFinite::Ignore,
        ..Default::default()
    };
    let mut plain = Trainer::new(&model, cfg(LossScaling::Off)).unwrap();
    let scaler = GradScaler { init_scale: 1024.0, growth_interval: 3, ..Default::default() };
    let mut t = Trainer::new(&model, cfg(LossScaling::Dynamic(scaler))).unwrap();
    for k in 0..4 {
        let (x, y) = batch(k, false);
        plain.train_step(&x, &y[..]).unwrap();
        t.train_step(&x, &y[..]).unwrap();
    }
    assert_eq!(plain.model().unwrap().param_values(), t.model().unwrap().param_values(), "scaled != unscaled");
    assert_eq!(t.scaler_state().unwrap(), Some(ScalerState { scale: 2048.0, good_steps: 1, skipped: 0 }));
    let w = t.model().unwrap().param_values().to_vec();
    let (x, y) = batch(9, true);
    t.train_step(&x, &y[..]).unwrap();
    assert_eq!(t.model().unwrap().param_values(), &w[..], "the skipped step changed the weights");
    assert_eq!(t.scaler_state().unwrap(), Some(ScalerState { scale: 1024.0, good_steps: 0, skipped: 1 }));
    let (x, y) = batch(5, false);
    t.train_step(&x, &y[..]).unwrap();
    assert_ne!(t.model().unwrap().param_values(), &w[..], "the good step after it did not apply");
    assert_eq!(t.scaler_state().unwrap(), Some(ScalerState { scale: 1024.0, good_steps: 1, skipped: 1 }));
}

fn main() {
    run_trials(vec![wgpu_trial(
        "the_scaler_skips_halves_and_grows_as_on_the_cpu",
        the_scaler_skips_halves_and_grows_as_on_the_cpu,
    )])
}
