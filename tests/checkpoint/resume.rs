//! Resuming from a checkpoint continues training exactly: N steps, save, resume, M steps gives
//! the same weights, running statistics, optimizer state and counters, bit for bit on the CPU
//! backend, as N+M steps in one go; for every optimizer, with schedules, dropout, batch norm and
//! gradient accumulation. And a `fit` stopped mid-epoch or between epochs, checkpointed and
//! resumed, ends where an uninterrupted `fit` ends, history included.

use std::path::PathBuf;

use kiln::data::{DataLoader, RandomHorizontalFlip, TensorDataset};
use kiln::io::CheckpointManager;
use kiln::model::{Conv2d, Model, ModelBuilder};
use kiln::rng::Rng;
use kiln::tensor::Tensor;
use kiln::train::{
    Callback, Control, Device, EpochLog, GradClip, History, Optimizer, Schedule, ScheduleUnit, Trainer, TrainerConfig,
    TrainerState, Warmup,
};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-resume-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Convolution, batch norm, pooling, dropout and dense layers: every kind of state.
fn cnn(seed: u64) -> Model {
    ModelBuilder::new(&[8, 3, 8, 8])
        .conv2d_with(Conv2d::new(4, 3).padding(1))
        .name("conv1")
        .batch_norm()
        .name("bn1")
        .relu()
        .max_pool2d(2)
        .dropout(0.3)
        .name("drop1")
        .dense(16)
        .name("fc1")
        .batch_norm()
        .name("bn2")
        .relu()
        .dropout(0.5)
        .name("drop2")
        .dense(3)
        .name("fc2")
        .seed(seed)
        .build()
        .unwrap()
}

fn batch(step: u64, n: usize) -> (Tensor, Vec<u32>) {
    let mut r = Rng::new(1000 + step);
    let x = Tensor::new(&[n, 3, 8, 8], (0..n * 192).map(|_| r.uniform_range(-1.0, 1.0)).collect()).unwrap();
    let y = (0..n).map(|_| r.below(3) as u32).collect();
    (x, y)
}

fn config(optimizer: Optimizer) -> TrainerConfig {
    TrainerConfig {
        batch_size: 8,
        learning_rate: 0.05,
        optimizer,
        device: Device::Cpu,
        threads: Some(2),
        ..Default::default()
    }
}

/// Weights, running statistics and the whole trainer state (with the history's timings cleared).
fn snapshot(t: &mut Trainer) -> (Vec<Vec<u32>>, TrainerState) {
    let weights = t.model().unwrap().param_values().iter().map(|v| v.iter().map(|x| x.to_bits()).collect()).collect();
    let mut state = t.state().unwrap();
    clear_seconds(&mut state.meta.history);
    (weights, state)
}

fn clear_seconds(h: &mut History) {
    h.epochs.iter_mut().for_each(|e| e.seconds = 0.0);
}

/// Trains `n + m` steps straight, and `n` steps, checkpoint, resume, `m` steps; both must agree
/// bit for bit. Batches vary in size (the last of each run is short) to cover several plans.
fn check_resume(name: &str, model: &Model, config: TrainerConfig, n: u64, m: u64) {
    let size = |s: u64| if s % 4 == 3 { 5 } else { 8 };
    let mut straight = Trainer::new(model, config.clone()).unwrap();
    for s in 0..n + m {
        let (x, y) = batch(s, size(s));
        straight.train_step(&x, &y).unwrap();
    }
    let mut first = Trainer::new(model, config).unwrap();
    for s in 0..n {
        let (x, y) = batch(s, size(s));
        first.train_step(&x, &y).unwrap();
    }
    let path = tmp(name).join("ckpt.safetensors");
    first.save_checkpoint(&path).unwrap();
    drop(first);
    let mut resumed = Trainer::resume(&path).unwrap();
    for s in n..n + m {
        let (x, y) = batch(s, size(s));
        resumed.train_step(&x, &y).unwrap();
    }
    let (w0, s0) = snapshot(&mut straight);
    let (w1, s1) = snapshot(&mut resumed);
    assert!(w0 == w1, "{name}: weights differ after resuming");
    assert_eq!(s0, s1, "{name}: trainer state differs after resuming");
    // The run must have moved: a resume that restored nothing would still match a run that did
    // nothing.
    let init: Vec<Vec<u32>> = model.param_values().iter().map(|v| v.iter().map(|x| x.to_bits()).collect()).collect();
    assert!(w0 != init, "{name}: training did not change the weights");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn sgd_with_momentum_resumes_bit_for_bit() {
    check_resume("sgd", &cnn(1), config(Optimizer::sgd(0.9)), 3, 4);
}

#[test]
fn sgd_nesterov_with_weight_decay_and_clipping_resumes_bit_for_bit() {
    let opt = Optimizer::Sgd { momentum: 0.9, dampening: 0.0, nesterov: true, weight_decay: 1e-3 };
    let c = TrainerConfig { grad_clip: Some(GradClip::Norm(0.5)), ..config(opt) };
    check_resume("nesterov", &cnn(2), c, 2, 3);
}

#[test]
fn adam_with_a_cosine_schedule_and_dropout_resumes_bit_for_bit() {
    let c = TrainerConfig {
        learning_rate: 0.01,
        schedule: Some(Schedule::Cosine { t_max: 6, eta_min: 1e-4 }),
        schedule_unit: ScheduleUnit::Batch,
        ..config(Optimizer::adam())
    };
    check_resume("adam-cosine", &cnn(3), c, 4, 3);
}

#[test]
fn adamw_amsgrad_with_warmup_resumes_bit_for_bit() {
    let opt = Optimizer::AdamW { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.01, amsgrad: true };
    let c = TrainerConfig {
        learning_rate: 0.01,
        warmup: Some(Warmup { steps: 3, start_factor: 0.1 }),
        schedule: Some(Schedule::one_cycle(0.02, 10)),
        schedule_unit: ScheduleUnit::Batch,
        ..config(opt)
    };
    check_resume("adamw", &cnn(4), c, 2, 4);
}

#[test]
fn nadam_mid_gradient_accumulation_resumes_bit_for_bit() {
    // 5 micro-batches with accumulation over 2: the checkpoint is taken with one micro-batch's
    // gradients summed and no update yet.
    let c = TrainerConfig { learning_rate: 0.01, grad_accumulation: 2, ..config(Optimizer::nadam()) };
    check_resume("nadam", &cnn(5), c, 5, 4);
}

#[test]
fn rmsprop_adagrad_and_adadelta_resume_bit_for_bit() {
    let rms = Optimizer::RmsProp { alpha: 0.9, eps: 1e-8, momentum: 0.5, centered: true, weight_decay: 0.0 };
    check_resume("rmsprop", &cnn(6), TrainerConfig { learning_rate: 0.001, ..config(rms) }, 2, 2);
    let ada = Optimizer::Adagrad { lr_decay: 0.01, eps: 1e-10, weight_decay: 0.0, initial_accumulator_value: 0.1 };
    check_resume("adagrad", &cnn(7), config(ada), 2, 2);
    check_resume("adadelta", &cnn(8), TrainerConfig { learning_rate: 1.0, ..config(Optimizer::adadelta()) }, 2, 2);
}

#[test]
fn lbfgs_resumes_bit_for_bit() {
    // A small regression-free classification MLP; L-BFGS keeps its history on the host.
    let model =
        ModelBuilder::new(&[8, 3, 8, 8]).dense(6).name("fc1").tanh().dense(3).name("fc2").seed(9).build().unwrap();
    let opt = Optimizer::Lbfgs { max_iter: 4, history_size: 3, tolerance_grad: 1e-9, tolerance_change: 1e-12 };
    check_resume("lbfgs", &model, TrainerConfig { learning_rate: 0.5, ..config(opt) }, 3, 2);
}

// ---- fit, interrupted and resumed ----

/// Stops `fit` after a given number of batches in total.
struct StopAfter {
    batches: usize,
    seen: usize,
}

impl Callback for StopAfter {
    fn on_batch_end(&mut self, _: &mut Trainer) -> kiln::Result<Control> {
        self.seen += 1;
        Ok(if self.seen == self.batches { Control::Stop } else { Control::Continue })
    }
}

/// Stops `fit` at the end of a given epoch.
struct StopAtEpoch(usize);

impl Callback for StopAtEpoch {
    fn on_epoch_end(&mut self, log: &EpochLog) -> Control {
        if log.epoch == self.0 { Control::Stop } else { Control::Continue }
    }
}

fn loaders() -> (DataLoader, DataLoader) {
    let mut r = Rng::new(77);
    let n = 44; // 6 batches of 8, the last one short
    let x = Tensor::new(&[n, 3, 8, 8], (0..n * 192).map(|_| r.uniform_range(-1.0, 1.0)).collect()).unwrap();
    let y: Vec<u32> = (0..n).map(|i| (i % 3) as u32).collect();
    let train = DataLoader::builder(TensorDataset::new(x.clone(), y.clone()).unwrap())
        .batch_size(8)
        .shuffle(true)
        .seed(5)
        .workers(2)
        .transform(RandomHorizontalFlip::new(0.5))
        .build()
        .unwrap();
    let val = DataLoader::builder(TensorDataset::new(x, y).unwrap()).batch_size(16).build().unwrap();
    (train, val)
}

fn fit_config() -> TrainerConfig {
    TrainerConfig {
        learning_rate: 0.01,
        // Per-epoch plateau detection: the schedule's metric state must survive the resume.
        schedule: Some(Schedule::ReduceOnPlateau {
            mode: kiln::train::PlateauMode::Min,
            factor: 0.5,
            patience: 0,
            threshold: 0.0,
            cooldown: 0,
            min_lr: 0.0,
        }),
        schedule_unit: ScheduleUnit::Epoch,
        ..config(Optimizer::adam())
    }
}

fn fit_interrupted(name: &str, stop: &mut dyn Callback) {
    let epochs = 3;
    let (train, val) = loaders();
    let model = cnn(11);
    let mut straight = Trainer::new(&model, fit_config()).unwrap();
    let mut full = straight.fit(&train, Some(&val), epochs).unwrap();

    let dir = tmp(name);
    let mut first = Trainer::new(&model, fit_config()).unwrap();
    let part = first.fit_with(&train, Some(&val), epochs, &mut [stop]).unwrap();
    assert!(first.epochs_done() < epochs, "{name}: the run was not interrupted");
    let path = dir.join("stopped.safetensors");
    first.save_checkpoint(&path).unwrap();
    drop(first);
    let mut resumed = Trainer::resume(&path).unwrap();
    let mut rest = resumed.fit(&train, Some(&val), epochs).unwrap();

    let (w0, s0) = snapshot(&mut straight);
    let (w1, s1) = snapshot(&mut resumed);
    assert!(w0 == w1, "{name}: weights differ from the uninterrupted fit");
    assert_eq!(s0, s1, "{name}: trainer state differs from the uninterrupted fit");
    // The resumed fit reports the epochs it finished; with the stopped part they are the whole run.
    let mut joined = History { epochs: [part.epochs, rest.epochs.clone()].concat() };
    clear_seconds(&mut joined);
    clear_seconds(&mut full);
    clear_seconds(&mut rest);
    assert_eq!(joined, full, "{name}: per-epoch logs differ");
    assert_eq!(s0.meta.history.epochs.len(), epochs);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn fit_stopped_mid_epoch_resumes_exactly() {
    // 8 batches: the whole first epoch (6) and 2 batches into the second.
    fit_interrupted("mid-epoch", &mut StopAfter { batches: 8, seen: 0 });
}

#[test]
fn fit_stopped_between_epochs_resumes_exactly() {
    fit_interrupted("epoch-boundary", &mut StopAtEpoch(1));
}

#[test]
fn the_manager_s_mid_epoch_checkpoint_resumes_exactly() {
    // A crash is simulated by stopping after 10 batches (6 make an epoch); the manager saved
    // every 4 batches and at every epoch end, so the newest checkpoint is "1 epoch and 4 batches"
    // (10 steps).
    let (train, val) = loaders();
    let model = cnn(12);
    let mut straight = Trainer::new(&model, fit_config()).unwrap();
    straight.fit(&train, Some(&val), 2).unwrap();

    let dir = tmp("manager");
    let mut mgr = CheckpointManager::new(&dir).unwrap().every_batches(4).keep_last(2);
    let mut t = Trainer::new(&model, fit_config()).unwrap();
    let mut stop = StopAfter { batches: 10, seen: 0 };
    t.fit_with(&train, Some(&val), 2, &mut [&mut mgr, &mut stop]).unwrap();
    let latest = mgr.latest().unwrap().unwrap();
    assert!(latest.ends_with("epoch-00001-step-000000010.safetensors"), "{latest:?}");
    let kept: Vec<_> = mgr.checkpoints().unwrap().iter().map(|p| p.file_name().unwrap().to_owned()).collect();
    assert_eq!(
        kept,
        ["epoch-00001-step-000000006.safetensors", "epoch-00001-step-000000010.safetensors"],
        "keep_last(2)"
    );
    drop(t);
    let mut resumed = Trainer::resume(&latest).unwrap();
    assert_eq!((resumed.epochs_done(), resumed.batches_done_in_epoch()), (1, 4));
    resumed.fit(&train, Some(&val), 2).unwrap();
    let (w0, s0) = snapshot(&mut straight);
    let (w1, s1) = snapshot(&mut resumed);
    assert!(w0 == w1, "weights differ from the uninterrupted fit");
    assert_eq!(s0, s1);
    let _ = std::fs::remove_dir_all(dir);
}
