//! The trainer end to end: the tutorial's task converges, regression converges, every place
//! go-metal goes wrong goes right here (schedules reach the update, a short last batch trains on
//! its own samples, single-output binary targets are not inverted), and bad configs and labels
//! are errors that say what is wrong.

use kiln::data::synthetic::tutorial_images;
use kiln::data::{DataLoader, TensorDataset};
use kiln::exec::Mode;
use kiln::model::ModelBuilder;
use kiln::rng::Rng;
use kiln::tensor::Tensor;
use kiln::train::{
    Device, EarlyStopping, GradClip, Loss, Monitor, Optimizer, Problem, Schedule, ScheduleUnit, Trainer, TrainerConfig,
};
use kiln::{Error, zoo};

fn cpu() -> Device {
    Device::Cpu
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut r = Rng::new(seed);
    Tensor::new(shape, (0..shape.iter().product()).map(|_| r.uniform_range(-1.0, 1.0)).collect()).unwrap()
}

#[test]
fn the_tutorial_task_converges_within_twenty_epochs() {
    // The seed tutorial's program (examples/cnn_tutorial.rs) with its seed: Adam at 1e-3, one
    // step per epoch on 8 synthetic images.
    let seed = 4;
    let model = zoo::simple_cnn(8).seed(seed).build().unwrap();
    let config = TrainerConfig { batch_size: 8, seed, device: cpu(), ..Default::default() };
    let mut t = Trainer::new(&model, config).unwrap();
    let (x, y) = tutorial_images(8, 3, 32, 32, 10, &mut Rng::new(seed));
    let mut losses = Vec::new();
    for _ in 0..20 {
        let r = t.train_batch(&x, &y).unwrap();
        losses.push(r.loss);
        if r.loss < 0.1 {
            break;
        }
    }
    assert!(*losses.last().unwrap() < 0.1, "losses: {losses:?}");
    assert!(losses[0] > 2.0, "starts near ln(10): {losses:?}");
}

#[test]
fn a_toy_regression_converges() {
    // y = 2 x0 - 3 x1 + 1, learned by a small MLP with SGD + momentum and MSE.
    let x = random(&[64, 2], 1);
    let y: Vec<f32> = x.data().chunks(2).map(|r| 2.0 * r[0] - 3.0 * r[1] + 1.0).collect();
    let y = Tensor::new(&[64, 1], y).unwrap();
    let model = ModelBuilder::new(&[64, 2]).dense(16).tanh().dense(1).seed(2).build().unwrap();
    let config = TrainerConfig {
        batch_size: 64,
        learning_rate: 0.05,
        optimizer: Optimizer::sgd(0.9),
        loss: Loss::MeanSquaredError,
        problem: Problem::Regression,
        device: cpu(),
        ..Default::default()
    };
    let mut t = Trainer::new(&model, config).unwrap();
    let first = t.train_batch(&x, &y).unwrap();
    assert_eq!(first.accuracy, None, "regression reports no accuracy");
    for _ in 0..400 {
        t.train_step(&x, &y).unwrap();
    }
    let m = t.evaluate_tensors(&x, &y).unwrap();
    assert!(m.loss < 1e-2 && m.loss < first.loss / 100.0, "{} -> {}", first.loss, m.loss);
}

#[test]
fn a_short_last_batch_trains_on_exactly_its_own_samples() {
    let model = ModelBuilder::new(&[8, 3, 8, 8]).conv2d(4, 3).relu().dense(3).seed(5).build().unwrap();
    let x = random(&[5, 3, 8, 8], 2);
    let y = [0u32, 2, 1, 1, 0];
    let make = |batch_size| {
        Trainer::new(
            &model,
            TrainerConfig { batch_size, optimizer: Optimizer::sgd(0.0), device: cpu(), ..Default::default() },
        )
        .unwrap()
    };
    // A trainer configured for 8 given a batch of 5, and one configured for exactly 5.
    let (mut a, mut b) = (make(8), make(5));
    let ra = a.train_batch(&x, &y).unwrap();
    let rb = b.train_batch(&x, &y).unwrap();
    assert_eq!(ra, rb);
    assert_eq!(a.model().unwrap().param_values(), b.model().unwrap().param_values());
    // More than the configured batch is refused.
    let err = make(4).train_batch(&x, &y).unwrap_err();
    assert!(err.to_string().contains("at most batch_size = 4"), "{err}");
}

#[test]
fn gradient_accumulation_equals_one_big_batch() {
    let model = ModelBuilder::new(&[4, 6]).dense(5).relu().dense(3).seed(9).build().unwrap();
    let x = random(&[8, 6], 3);
    let y = [0u32, 1, 2, 0, 1, 2, 2, 1];
    let base =
        TrainerConfig { optimizer: Optimizer::sgd(0.5), learning_rate: 0.1, device: cpu(), ..Default::default() };
    let mut big = Trainer::new(&model, TrainerConfig { batch_size: 8, ..base.clone() }).unwrap();
    let mut acc = Trainer::new(&model, TrainerConfig { batch_size: 4, grad_accumulation: 2, ..base }).unwrap();
    for _ in 0..3 {
        big.train_step(&x, &y).unwrap();
        let halves = [(0..4), (4..8)];
        for h in halves {
            let xs = Tensor::new(&[4, 6], x.data()[h.start * 6..h.end * 6].to_vec()).unwrap();
            acc.train_step(&xs, &y[h]).unwrap();
        }
    }
    assert_eq!(acc.steps_taken(), 3);
    let (pa, pb) = (big.model().unwrap().param_values().to_vec(), acc.model().unwrap().param_values().to_vec());
    for (a, b) in pa.iter().flatten().zip(pb.iter().flatten()) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

#[test]
fn schedules_change_the_rate_the_update_uses() {
    // Plain SGD: each update is -lr * grad, so lr = -delta / grad can be read back per step.
    let model = ModelBuilder::new(&[4, 3]).dense(2).name("fc").seed(1).build().unwrap();
    let config = TrainerConfig {
        batch_size: 4,
        learning_rate: 0.1,
        optimizer: Optimizer::sgd(0.0),
        schedule: Some(Schedule::Exponential { gamma: 0.5 }),
        schedule_unit: ScheduleUnit::Batch,
        device: cpu(),
        ..Default::default()
    };
    let mut t = Trainer::new(&model, config).unwrap();
    let x = random(&[4, 3], 4);
    for step in 0..4 {
        let before = t.executor().read_param("fc.weight").unwrap();
        t.train_step(&x, &[0u32, 1, 1, 0]).unwrap();
        let after = t.executor().read_param("fc.weight").unwrap();
        let g = t.executor().read_param_grad("fc.weight").unwrap();
        let i = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
        let lr = -(after[i] - before[i]) / g[i];
        let want = 0.1 * 0.5f32.powi(step);
        assert!((lr - want).abs() < 1e-3 * want, "step {step}: lr used {lr}, scheduled {want}");
    }
    assert!((t.learning_rate() - 0.1 * 0.5f64.powi(4)).abs() < 1e-12);
}

#[test]
fn gradient_clipping_by_norm_bounds_the_update() {
    let model = ModelBuilder::new(&[4, 3]).dense(2).name("fc").seed(1).build().unwrap();
    let config = TrainerConfig {
        batch_size: 4,
        learning_rate: 1.0,
        optimizer: Optimizer::sgd(0.0),
        grad_clip: Some(GradClip::Norm(0.01)),
        device: cpu(),
        ..Default::default()
    };
    let mut t = Trainer::new(&model, config).unwrap();
    let before: Vec<f32> = ["fc.weight", "fc.bias"].iter().flat_map(|n| t.executor().read_param(n).unwrap()).collect();
    let big: Vec<f32> = random(&[4, 3], 5).data().iter().map(|v| v * 10.0).collect();
    t.train_step(&Tensor::new(&[4, 3], big).unwrap(), &[0u32, 1, 0, 1]).unwrap();
    let after: Vec<f32> = ["fc.weight", "fc.bias"].iter().flat_map(|n| t.executor().read_param(n).unwrap()).collect();
    let step: f32 = before.iter().zip(&after).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
    // The update is lr times the clipped gradient, whose norm is max_norm (up to the 1e-6 guard).
    assert!((step - 0.01).abs() < 1e-5, "update norm {step}");
}

#[test]
fn single_output_binary_classification_learns_the_right_way_round() {
    // Label 1 exactly when the first feature is positive.
    let x = random(&[64, 2], 6);
    let y: Vec<u32> = x.data().chunks(2).map(|r| (r[0] > 0.0) as u32).collect();
    let model = ModelBuilder::new(&[64, 2]).dense(1).seed(3).build().unwrap();
    let config = TrainerConfig {
        batch_size: 64,
        learning_rate: 0.5,
        optimizer: Optimizer::sgd(0.0),
        loss: Loss::BinaryCrossEntropyWithLogits,
        device: cpu(),
        ..Default::default()
    };
    let mut t = Trainer::new(&model, config).unwrap();
    for _ in 0..200 {
        t.train_step(&x, &y).unwrap();
    }
    let m = t.evaluate_tensors(&x, &y).unwrap();
    assert!(m.accuracy.unwrap() > 0.95, "{m:?}");
    let p = t.predict_proba(&Tensor::new(&[2, 2], vec![0.9, 0.0, -0.9, 0.0]).unwrap()).unwrap();
    assert!(p.data()[0] > 0.8 && p.data()[1] < 0.2, "{:?}", p.data());
}

#[test]
fn dropout_is_on_in_training_and_off_in_evaluation() {
    let model = ModelBuilder::new(&[4, 32]).dense(32).dropout(0.5).dense(2).seed(1).build().unwrap();
    let mut t = Trainer::new(&model, TrainerConfig { batch_size: 4, device: cpu(), ..Default::default() }).unwrap();
    let x = random(&[4, 32], 7);
    let (e1, e2) = (t.predict(&x).unwrap(), t.predict(&x).unwrap());
    assert_eq!(e1, e2, "evaluation is deterministic");
    let (t1, t2) = (t.predict_with(&x, Mode::Train).unwrap(), t.predict_with(&x, Mode::Train).unwrap());
    assert_ne!(t1, t2, "training mode draws a new mask each pass");
    assert_ne!(t1, e1);
}

#[test]
fn evaluate_reports_accuracy_and_top_k() {
    // A model whose output is its input: accuracy is decided by the inputs alone.
    let model = ModelBuilder::new(&[4, 4]).relu().build().unwrap();
    let config =
        TrainerConfig { batch_size: 2, top_k: 2, optimizer: Optimizer::sgd(0.0), device: cpu(), ..Default::default() };
    let mut t = Trainer::new(&model, config).unwrap();
    let x = Tensor::new(
        &[4, 4],
        vec![
            0.9, 0.5, 0.1, 0.0, // predicts 0 (second: 1)
            0.1, 0.2, 0.9, 0.0, // predicts 2 (second: 1)
            0.3, 0.8, 0.2, 0.1, // predicts 1 (second: 0)
            0.1, 0.2, 0.3, 0.9, // predicts 3 (second: 2)
        ],
    )
    .unwrap();
    let m = t.evaluate_tensors(&x, &[0u32, 1, 0, 0]).unwrap();
    assert_eq!(m.samples, 4);
    assert_eq!(m.accuracy, Some(0.25));
    assert_eq!(m.top_k_accuracy, Some(0.75));
}

#[test]
fn fit_runs_epochs_with_validation_schedules_and_early_stopping() {
    let (x, y) = tutorial_images(48, 3, 32, 32, 4, &mut Rng::new(3));
    let ds = TensorDataset::new(x, y).unwrap();
    let (train, val) = kiln::data::split(ds, 0.25, 1).unwrap();
    let train = DataLoader::builder(train).batch_size(16).shuffle(true).seed(1).build().unwrap();
    let val = DataLoader::builder(val).batch_size(16).build().unwrap();
    let model = zoo::simple_cnn(16).seed(2).build().unwrap();
    let config = TrainerConfig {
        batch_size: 16,
        schedule: Some(Schedule::Step { step_size: 2, gamma: 0.5 }),
        device: cpu(),
        ..Default::default()
    };
    let mut t = Trainer::new(&model, config).unwrap();
    let mut stop = EarlyStopping::new(Monitor::ValLoss, 100);
    let h = t.fit_with(&train, Some(&val), 4, &mut [&mut stop]).unwrap();
    assert_eq!(h.epochs.len(), 4);
    assert_eq!(h.epochs[0].train.samples, 36);
    assert_eq!(h.epochs[0].val.unwrap().samples, 12);
    let lrs: Vec<f64> = h.epochs.iter().map(|e| e.lr).collect();
    assert_eq!(lrs, [1e-3, 1e-3, 5e-4, 5e-4]);
    assert!(h.epochs[3].train.loss < h.epochs[0].train.loss);
    // Fitting again to 6 epochs continues from epoch 4; early stopping with patience 0 stops
    // after the first epoch that does not improve.
    let mut impatient = EarlyStopping::new(Monitor::TrainLoss, 0).min_delta(1e9);
    let h2 = t.fit_with(&train, Some(&val), 6, &mut [&mut impatient]).unwrap();
    assert_eq!(h2.epochs.len(), 2, "the first epoch sets the best, the second cannot beat it by 1e9");
    assert_eq!(h2.epochs[0].epoch, 5);
    assert_eq!(impatient.stopped_epoch, Some(6));
}

fn expect_config_err(config: TrainerConfig, field: &str) {
    let model = ModelBuilder::new(&[2, 3]).dense(4).build().unwrap();
    match Trainer::new(&model, config) {
        Err(Error::Config { field: f, reason }) => assert_eq!(f, field, "{reason}"),
        Err(e) => panic!("expected a config error on {field}, got {e}"),
        Ok(_) => panic!("expected a config error on {field}"),
    }
}

#[test]
fn invalid_configs_name_the_field() {
    let d = TrainerConfig::default;
    expect_config_err(TrainerConfig { learning_rate: 0.0, ..d() }, "learning_rate");
    expect_config_err(TrainerConfig { learning_rate: -1.0, ..d() }, "learning_rate");
    expect_config_err(TrainerConfig { batch_size: 0, ..d() }, "batch_size");
    let adam = |beta1, beta2, eps| Optimizer::Adam { beta1, beta2, eps, weight_decay: 0.0, amsgrad: false };
    expect_config_err(TrainerConfig { optimizer: adam(1.0, 0.999, 1e-8), ..d() }, "optimizer.beta1");
    expect_config_err(TrainerConfig { optimizer: adam(0.9, 0.0, 1e-8), ..d() }, "optimizer.beta2");
    expect_config_err(TrainerConfig { optimizer: adam(0.9, 1.5, 1e-8), ..d() }, "optimizer.beta2");
    expect_config_err(TrainerConfig { optimizer: adam(0.9, 0.999, 0.0), ..d() }, "optimizer.eps");
    let nesterov = Optimizer::Sgd { momentum: 0.0, dampening: 0.0, nesterov: true, weight_decay: 0.0 };
    expect_config_err(TrainerConfig { optimizer: nesterov, ..d() }, "optimizer.nesterov");
    expect_config_err(TrainerConfig { grad_accumulation: 0, ..d() }, "grad_accumulation");
    expect_config_err(TrainerConfig { grad_clip: Some(GradClip::Norm(0.0)), ..d() }, "grad_clip");
    expect_config_err(
        TrainerConfig { schedule: Some(Schedule::Step { step_size: 0, gamma: 0.5 }), ..d() },
        "schedule.step_size",
    );
    expect_config_err(TrainerConfig { loss: Loss::MeanSquaredError, ..d() }, "loss");
    expect_config_err(
        TrainerConfig { loss: Loss::Huber { delta: 0.0 }, problem: Problem::Regression, ..d() },
        "loss.delta",
    );
    expect_config_err(
        TrainerConfig { loss: Loss::CrossEntropy { label_smoothing: 1.5 }, ..d() },
        "loss.label_smoothing",
    );
    // A loss that does not fit the output: cross-entropy over one output, or over an image.
    let one = ModelBuilder::new(&[2, 3]).dense(1).build().unwrap();
    let err = Trainer::new(&one, TrainerConfig::default()).err().unwrap().to_string();
    assert!(err.contains("at least 2 outputs") && err.contains("BinaryCrossEntropyWithLogits"), "{err}");
    let image = ModelBuilder::new(&[2, 3, 4, 4]).conv2d(2, 1).build().unwrap();
    let err = Trainer::new(&image, TrainerConfig::default()).err().unwrap().to_string();
    assert!(err.contains("[batch, outputs]"), "{err}");
}

#[test]
fn invalid_labels_name_the_sample() {
    let model = ModelBuilder::new(&[3, 2]).dense(3).build().unwrap();
    let mut t = Trainer::new(&model, TrainerConfig { batch_size: 3, device: cpu(), ..Default::default() }).unwrap();
    let x = random(&[3, 2], 1);
    match t.train_batch(&x, &[0u32, 3, 1]) {
        Err(Error::Label { sample: 1, reason }) => assert!(reason.contains("out of range"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let err = t.train_batch(&x, &[0u32, 1]).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    let wrong_input = random(&[3, 5], 1);
    assert!(matches!(t.train_batch(&wrong_input, &[0u32, 1, 2]), Err(Error::Shape { .. })));
    let probs = Tensor::new(&[3, 3], vec![1.0, 0.0, 0.0, 0.0, f32::NAN, 1.0, 0.0, 1.0, 0.0]).unwrap();
    let err = t.train_batch(&x, &probs).unwrap_err().to_string();
    assert!(err.contains("SparseCrossEntropy takes class indices"), "{err}");

    let mut ce = Trainer::new(
        &model,
        TrainerConfig {
            batch_size: 3,
            loss: Loss::CrossEntropy { label_smoothing: 0.0 },
            device: cpu(),
            ..Default::default()
        },
    )
    .unwrap();
    match ce.train_batch(&x, &probs) {
        Err(Error::Label { sample: 1, reason }) => assert!(reason.contains("NaN"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let mut bce = Trainer::new(
        &ModelBuilder::new(&[3, 2]).dense(1).build().unwrap(),
        TrainerConfig { batch_size: 3, loss: Loss::BinaryCrossEntropyWithLogits, device: cpu(), ..Default::default() },
    )
    .unwrap();
    match bce.train_batch(&x, &[1u32, 0, 2]) {
        Err(Error::Label { sample: 2, reason }) => assert!(reason.contains("0 or 1"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let out_of_range = Tensor::new(&[3, 1], vec![0.0, 1.5, 1.0]).unwrap();
    assert!(matches!(bce.train_batch(&x, &out_of_range), Err(Error::Label { sample: 1, .. })));
    let mut reg = Trainer::new(
        &model,
        TrainerConfig {
            batch_size: 3,
            loss: Loss::MeanSquaredError,
            problem: Problem::Regression,
            device: cpu(),
            ..Default::default()
        },
    )
    .unwrap();
    let inf = Tensor::new(&[3, 3], vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, f32::INFINITY, 0.0, 0.0]).unwrap();
    assert!(matches!(reg.train_batch(&x, &inf), Err(Error::Label { sample: 2, .. })));
}
