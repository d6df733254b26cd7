//! Dynamic loss scaling (PyTorch's `GradScaler`) on the CPU backend: a scaled f32 run computes
//! what the unscaled one does; a step with inf/NaN gradients is skipped (weights and optimizer
//! state, Adam's step counter included, untouched), counted, and halves the scale; the scale
//! doubles after `growth_interval` good steps; the scaler's state is in checkpoints and a
//! resumed run continues bit for bit. Also: `Precision::Tf32` on the CPU is f32, and
//! `Precision::F16Mixed` is refused there. Tiny models, a few steps each (CI time).

use std::collections::BTreeMap;

use kiln::Error;
use kiln::model::{Model, ModelBuilder};
use kiln::tensor::Tensor;
use kiln::train::{
    Device, GradClip, GradScaler, LossScaling, NonFinite, Optimizer, Precision, ScalerState, StateTensor, Trainer,
    TrainerConfig, TrainerMeta,
};

fn model() -> Model {
    ModelBuilder::new(&[2, 1, 5, 5]).conv2d(4, 3).batch_norm().relu().flatten().dense(3).seed(3).build().unwrap()
}

/// Without batch norm, whose backward would undo a large input's effect on the gradients.
fn plain_model() -> Model {
    ModelBuilder::new(&[2, 1, 5, 5]).conv2d(4, 3).relu().flatten().dense(3).seed(3).build().unwrap()
}

fn config(loss_scaling: LossScaling) -> TrainerConfig {
    TrainerConfig {
        batch_size: 2,
        device: Device::Cpu,
        threads: Some(1),
        optimizer: Optimizer::adam(),
        learning_rate: 1e-2,
        loss_scaling,
        ..Default::default()
    }
}

fn scaled(init_scale: f32, growth_interval: u32) -> LossScaling {
    LossScaling::Dynamic(GradScaler { init_scale, growth_interval, ..GradScaler::default() })
}

/// Batch `k`: inputs times `gain`.
fn batch(k: usize, gain: f32) -> (Tensor, Vec<u32>) {
    let x = (0..50).map(|i| gain * ((i * 7 + k * 3) % 11) as f32 / 11.0 - 0.4).collect();
    (Tensor::new(&[2, 1, 5, 5], x).unwrap(), vec![(k % 3) as u32, ((k + 1) % 3) as u32])
}

/// A batch whose loss and gradients are NaN (a NaN input, as tests/cuda_nonfinite.rs injects).
fn nan_batch() -> (Tensor, Vec<u32>) {
    let (x, y) = batch(0, 1.0);
    let mut v = x.data().to_vec();
    v[12] = f32::NAN;
    (Tensor::new(&[2, 1, 5, 5], v).unwrap(), y)
}

fn step(t: &mut Trainer, (x, y): &(Tensor, Vec<u32>)) {
    t.train_step(x, &y[..]).unwrap();
}

fn weights(t: &mut Trainer) -> Vec<Vec<f32>> {
    t.model().unwrap().param_values().to_vec()
}

/// The optimizer's state tensors and step counter.
fn optimizer(t: &mut Trainer) -> (BTreeMap<String, StateTensor>, u64) {
    let s = t.state().unwrap();
    let tensors = s.tensors.into_iter().filter(|(k, _)| k.starts_with("optimizer.")).collect();
    (tensors, s.meta.optimizer_step)
}

fn scaler(t: &mut Trainer) -> ScalerState {
    t.scaler_state().unwrap().expect("the config scales the loss")
}

#[test]
fn a_scaled_f32_run_computes_what_the_unscaled_one_does() {
    // The scale is a power of two: scaling and unscaling are exact while nothing overflows.
    for (accumulation, clip) in [(1, None), (2, Some(GradClip::Norm(0.5)))] {
        let cfg = |s| TrainerConfig { grad_accumulation: accumulation, grad_clip: clip, ..config(s) };
        let mut plain = Trainer::new(&model(), cfg(LossScaling::Off)).unwrap();
        let mut scaled_run = Trainer::new(&model(), cfg(scaled(65536.0, 2000))).unwrap();
        assert_eq!(plain.scaler_state().unwrap(), None);
        for k in 0..6 {
            step(&mut plain, &batch(k, 1.0));
            step(&mut scaled_run, &batch(k, 1.0));
        }
        assert_eq!(weights(&mut scaled_run), weights(&mut plain), "accumulation {accumulation}");
        assert_eq!(optimizer(&mut scaled_run), optimizer(&mut plain));
        let updates = 6 / accumulation as u32;
        assert_eq!(scaler(&mut scaled_run), ScalerState { scale: 65536.0, good_steps: updates, skipped: 0 });
    }
}

#[test]
fn a_step_with_nan_gradients_is_skipped_counted_and_halves_the_scale() {
    let mut t =
        Trainer::new(&plain_model(), TrainerConfig { non_finite: NonFinite::Ignore, ..config(scaled(1024.0, 2000)) })
            .unwrap();
    for k in 0..3 {
        step(&mut t, &batch(k, 1.0));
    }
    assert_eq!(scaler(&mut t), ScalerState { scale: 1024.0, good_steps: 3, skipped: 0 });
    let (w, opt) = (weights(&mut t), optimizer(&mut t));
    step(&mut t, &nan_batch());
    assert_eq!(weights(&mut t), w, "the skipped step changed the weights");
    assert_eq!(optimizer(&mut t), opt, "the skipped step changed the optimizer state or Adam's step counter");
    assert_eq!(scaler(&mut t), ScalerState { scale: 512.0, good_steps: 0, skipped: 1 });
    step(&mut t, &batch(3, 1.0));
    assert_ne!(weights(&mut t), w, "the good step after it did not apply");
    assert_eq!(optimizer(&mut t).1, 4);
    assert_eq!(scaler(&mut t), ScalerState { scale: 512.0, good_steps: 1, skipped: 1 });
}

#[test]
fn overflowing_gradients_back_off_until_they_fit_then_training_is_the_unscaled_one() {
    // Inputs of ~100 give weight gradients of ~10: at 2^127 they overflow f32 until the scale
    // has backed off enough. Skipped steps change nothing, so from then on the run is an
    // unscaled run on the batches after the skipped ones (small ones, which do not overflow).
    let big = |k| batch(k, 100.0);
    let mut t = Trainer::new(&plain_model(), config(scaled(2f32.powi(127), 2000))).unwrap();
    let w0 = weights(&mut t);
    let mut k = 0;
    loop {
        step(&mut t, &big(k));
        k += 1;
        if scaler(&mut t).skipped < k as u64 {
            break;
        }
        assert_eq!(weights(&mut t), w0, "skipped step {k} changed the weights");
        assert!(k < 20, "still skipping at scale {}", scaler(&mut t).scale);
    }
    // Batch k - 1 was the first that fit.
    let skipped = k - 1;
    assert!(skipped >= 1, "the first step at 2^127 did not overflow");
    // The good batch's step has run; so must the reference.
    let mut reference = Trainer::new(&plain_model(), config(LossScaling::Off)).unwrap();
    step(&mut reference, &big(skipped));
    for j in k..k + 3 {
        step(&mut t, &batch(j, 1.0));
        step(&mut reference, &batch(j, 1.0));
    }
    assert_eq!(weights(&mut t), weights(&mut reference));
    assert_eq!(optimizer(&mut t), optimizer(&mut reference));
    let s = scaler(&mut t);
    assert_eq!(s, ScalerState { scale: 2f32.powi(127 - skipped as i32), good_steps: 4, skipped: skipped as u64 });
    // Nothing of this went through the non-finite check (the default NonFinite::Error).
    assert_eq!(t.skipped_steps().unwrap(), 0);
}

#[test]
fn the_scale_grows_after_growth_interval_good_steps() {
    let mut t = Trainer::new(&plain_model(), TrainerConfig { non_finite: NonFinite::Ignore, ..config(scaled(8.0, 3)) })
        .unwrap();
    let want = [(8.0, 1), (8.0, 2), (16.0, 0), (16.0, 1), (16.0, 2), (32.0, 0)];
    for (k, (scale, good)) in want.into_iter().enumerate() {
        step(&mut t, &batch(k, 1.0));
        assert_eq!(scaler(&mut t), ScalerState { scale, good_steps: good, skipped: 0 }, "after step {}", k + 1);
    }
    step(&mut t, &nan_batch());
    assert_eq!(scaler(&mut t), ScalerState { scale: 16.0, good_steps: 0, skipped: 1 });
}

#[test]
fn a_nan_loss_is_still_the_non_finite_policy_s_error() {
    // With scaling, the finite check looks at the loss only; a NaN loss stays an error.
    let mut t = Trainer::new(&plain_model(), config(scaled(1024.0, 2000))).unwrap();
    let (x, y) = nan_batch();
    match t.train_batch(&x, &y) {
        Err(Error::NonFinite { step, what }) => assert!(step == 1 && what.contains("loss"), "{step}: {what}"),
        other => panic!("expected Error::NonFinite, got {other:?}"),
    }
    // The scaler skipped the step too (NaN gradients) and backed off.
    assert_eq!(scaler(&mut t), ScalerState { scale: 512.0, good_steps: 0, skipped: 1 });
}

fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("kiln-grad-scaler-{name}-{}.safetensors", std::process::id()))
}

#[test]
fn resume_of_a_scaled_run_continues_bit_for_bit() {
    // Large inputs at a scale near f32's limit: steps overflow and back off, good ones grow
    // the scale again (every 2), and it overflows again, on both sides of the checkpoint.
    let cfg = || config(scaled(2f32.powi(127), 2));
    let batches: Vec<_> = (0..10).map(|k| batch(k, 100.0)).collect();
    let mut whole = Trainer::new(&plain_model(), cfg()).unwrap();
    for b in &batches {
        step(&mut whole, b);
    }
    let mut first = Trainer::new(&plain_model(), cfg()).unwrap();
    for b in &batches[..5] {
        step(&mut first, b);
    }
    let saved = scaler(&mut first);
    assert!(saved.skipped >= 1 && saved.scale < 2f32.powi(127), "{saved:?}");
    let path = tmp("resume");
    first.save_checkpoint(&path).unwrap();
    let mut resumed = Trainer::resume(&path).unwrap();
    std::fs::remove_file(&path).ok();
    assert_eq!(scaler(&mut resumed), saved);
    for b in &batches[5..] {
        step(&mut resumed, b);
    }
    assert_eq!(weights(&mut resumed), weights(&mut whole));
    assert_eq!(optimizer(&mut resumed), optimizer(&mut whole));
    let end = scaler(&mut whole);
    assert_eq!(scaler(&mut resumed), end);
    assert!(end.skipped > saved.skipped, "no step overflowed after the checkpoint: {end:?}");
}

#[test]
fn states_without_scaler_state_still_load_and_mismatches_are_refused() {
    let mut t = Trainer::new(&model(), config(LossScaling::Off)).unwrap();
    step(&mut t, &batch(0, 1.0));
    let state = t.state().unwrap();
    // A state written before loss scaling existed: its meta has no `scaler` key.
    let mut json = serde_json::to_value(&state.meta).unwrap();
    assert!(json.as_object_mut().unwrap().remove("scaler").is_some());
    let old: TrainerMeta = serde_json::from_value(json).unwrap();
    assert_eq!(old.scaler, None);
    let model = t.model().unwrap().clone();
    Trainer::from_state(&model, kiln::train::TrainerState { meta: old, tensors: state.tensors.clone() }).unwrap();
    // A scaling config with no scaler state, and a bad scale, are refused by name.
    let mut bad = state.clone();
    bad.meta.config.loss_scaling = scaled(8.0, 2);
    let e = Trainer::from_state(&model, bad.clone()).err().expect("refused").to_string();
    assert!(e.contains("scaler state"), "{e}");
    bad.meta.scaler = Some(ScalerState { scale: f32::INFINITY, good_steps: 0, skipped: 0 });
    let e = Trainer::from_state(&model, bad).err().expect("refused").to_string();
    assert!(e.contains("scale must be positive and finite"), "{e}");
}

#[test]
fn bad_scaler_settings_name_the_field() {
    let cases = [
        (GradScaler { init_scale: 0.0, ..GradScaler::default() }, "loss_scaling.init_scale"),
        (GradScaler { growth_factor: 1.0, ..GradScaler::default() }, "loss_scaling.growth_factor"),
        (GradScaler { backoff_factor: 1.0, ..GradScaler::default() }, "loss_scaling.backoff_factor"),
        (GradScaler { growth_interval: 0, ..GradScaler::default() }, "loss_scaling.growth_interval"),
    ];
    for (s, field) in cases {
        match Trainer::new(&model(), config(LossScaling::Dynamic(s))) {
            Err(Error::Config { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: expected a config error, got {:?}", other.err()),
        }
    }
    let lbfgs = TrainerConfig { optimizer: Optimizer::lbfgs(), ..config(scaled(8.0, 2)) };
    match Trainer::new(&model(), lbfgs) {
        Err(Error::Config { field, .. }) => assert_eq!(field, "loss_scaling"),
        other => panic!("expected a config error, got {:?}", other.err()),
    }
}

#[test]
fn pytorch_s_defaults() {
    let s = GradScaler::default();
    assert_eq!((s.init_scale, s.growth_factor, s.backoff_factor, s.growth_interval), (65536.0, 2.0, 0.5, 2000));
    // Auto scales f16 mixed precision only, with PyTorch's defaults.
    let mut t = Trainer::new(&model(), config(LossScaling::Auto)).unwrap();
    assert_eq!(t.scaler_state().unwrap(), None);
    for p in [Precision::F32, Precision::Tf32, Precision::Bf16Mixed, Precision::F16Mixed] {
        let c = TrainerConfig { precision: p, ..config(LossScaling::Auto) };
        assert_eq!(c.grad_scaler(), (p == Precision::F16Mixed).then(GradScaler::default), "{p:?}");
        let off = TrainerConfig { loss_scaling: LossScaling::Off, ..c };
        assert_eq!(off.grad_scaler(), None);
    }
}

#[test]
fn the_cpu_refuses_f16_naming_the_field() {
    let cfg = TrainerConfig { precision: Precision::F16Mixed, ..config(LossScaling::Auto) };
    match Trainer::new(&model(), cfg) {
        Err(Error::Config { field, reason }) => {
            assert_eq!(field, "precision");
            assert!(reason.contains("f16") && reason.contains("Precision::F32"), "{reason}");
        }
        other => panic!("expected a config error, got {:?}", other.err()),
    }
}

#[test]
fn tf32_on_the_cpu_is_f32() {
    // As PyTorch's allow_tf32 flags do nothing on the CPU: accepted (with a notice), same bits.
    let mut f32_run = Trainer::new(&model(), config(LossScaling::Off)).unwrap();
    let mut tf32_run =
        Trainer::new(&model(), TrainerConfig { precision: Precision::Tf32, ..config(LossScaling::Off) }).unwrap();
    for k in 0..3 {
        step(&mut f32_run, &batch(k, 1.0));
        step(&mut tf32_run, &batch(k, 1.0));
    }
    assert_eq!(weights(&mut tf32_run), weights(&mut f32_run));
}
