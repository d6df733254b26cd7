//! The trainer's configuration: optimizer, loss, problem type, schedule, clipping, accumulation,
//! device and seed, with every field validated in one place ([`TrainerConfig::validate`]).

use serde::{Deserialize, Serialize};

use super::loss::Loss;
use super::schedule::{Schedule, Warmup};
use crate::backend::Device;
use crate::dist::DataParallel;
use crate::exec::{GradScaler, OptRule, Precision};
use crate::{Error, Result};

/// What the model predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Problem {
    /// Class labels: accuracy is reported.
    Classification,
    /// Continuous targets: no accuracy.
    Regression,
}

/// An optimizer and its hyper-parameters, with PyTorch's semantics and defaults (the learning
/// rate is [`TrainerConfig::learning_rate`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Optimizer {
    /// Stochastic gradient descent (`torch.optim.SGD`).
    Sgd {
        /// Momentum factor, `>= 0` (0: plain SGD; default of [`Optimizer::sgd`]'s argument).
        momentum: f32,
        /// Fraction of each new gradient left out of the momentum buffer, `>= 0` (default 0).
        dampening: f32,
        /// Nesterov momentum; needs a positive momentum and zero dampening (default off).
        nesterov: bool,
        /// L2 penalty added to the gradient as `weight_decay * w`, `>= 0` (default 0).
        weight_decay: f32,
    },
    /// Adam (`torch.optim.Adam`): weight decay enters the gradient as an L2 term.
    Adam {
        /// Decay of the first-moment (mean) average, in `[0, 1)` (default 0.9).
        beta1: f32,
        /// Decay of the second-moment average, in `(0, 1)` (default 0.999).
        beta2: f32,
        /// Added to the denominator for stability, positive (default 1e-8).
        eps: f32,
        /// L2 penalty added to the gradient, `>= 0` (default 0).
        weight_decay: f32,
        /// AMSGrad: divide by the largest second moment so far (default off).
        amsgrad: bool,
    },
    /// Adam with decoupled weight decay (`torch.optim.AdamW`).
    AdamW {
        /// Decay of the first-moment average, in `[0, 1)` (default 0.9).
        beta1: f32,
        /// Decay of the second-moment average, in `(0, 1)` (default 0.999).
        beta2: f32,
        /// Added to the denominator for stability, positive (default 1e-8).
        eps: f32,
        /// Each step multiplies the weights by `1 - lr * weight_decay` before the Adam update,
        /// `>= 0` (default 0.01).
        weight_decay: f32,
        /// AMSGrad: divide by the largest second moment so far (default off).
        amsgrad: bool,
    },
    /// RMSprop (`torch.optim.RMSprop`).
    RmsProp {
        /// Decay of the squared-gradient average, in `[0, 1]` (default 0.99).
        alpha: f32,
        /// Added to the denominator for stability, positive (default 1e-8).
        eps: f32,
        /// Momentum factor, `>= 0` (default 0).
        momentum: f32,
        /// Normalise by the gradient's estimated variance rather than its second moment
        /// (default off).
        centered: bool,
        /// L2 penalty added to the gradient, `>= 0` (default 0).
        weight_decay: f32,
    },
    /// Adagrad (`torch.optim.Adagrad`).
    Adagrad {
        /// The rate at step `t` is `lr / (1 + (t - 1) * lr_decay)`, `>= 0` (default 0).
        lr_decay: f32,
        /// Added to the denominator for stability, positive (default 1e-10).
        eps: f32,
        /// L2 penalty added to the gradient, `>= 0` (default 0).
        weight_decay: f32,
        /// Starting value of every sum of squared gradients, `>= 0` (default 0).
        initial_accumulator_value: f32,
    },
    /// Adadelta (`torch.optim.Adadelta`); the learning rate scales its update (PyTorch's
    /// default rate for it is 1.0).
    Adadelta {
        /// Decay of the squared-gradient and squared-update averages, in `[0, 1]` (default 0.9).
        rho: f32,
        /// Added inside the square roots, positive (default 1e-6).
        eps: f32,
        /// L2 penalty added to the gradient, `>= 0` (default 0).
        weight_decay: f32,
    },
    /// NAdam, Adam with Nesterov momentum (`torch.optim.NAdam`).
    NAdam {
        /// Base momentum, in `(0, 1)` (default 0.9).
        beta1: f32,
        /// Decay of the second-moment average, in `(0, 1)` (default 0.999).
        beta2: f32,
        /// Added to the denominator for stability, positive (default 1e-8).
        eps: f32,
        /// L2 penalty added to the gradient, `>= 0` (default 0).
        weight_decay: f32,
        /// The momentum at step `t` is `beta1 * (1 - 0.5 * 0.96^(t * momentum_decay))`,
        /// `>= 0` (default 0.004).
        momentum_decay: f32,
    },
    /// L-BFGS for full-batch problems (no line search, as PyTorch's default): each
    /// `train_batch` call is one `optimizer.step(closure)` of up to `max_iter` evaluations.
    /// Runs on the host; not with gradient accumulation, clipping or data parallelism.
    Lbfgs {
        /// Most iterations (loss and gradient evaluations) per step, at least 1 (default 20).
        max_iter: usize,
        /// Number of past updates kept for the Hessian estimate, at least 1 (default 100).
        history_size: usize,
        /// The step ends when the largest absolute gradient value is at most this, `>= 0`
        /// (default 1e-7).
        tolerance_grad: f32,
        /// The step ends when the loss, or every parameter, changes by less than this between
        /// iterations, `>= 0` (default 1e-9).
        tolerance_change: f32,
    },
}

impl Optimizer {
    /// Plain SGD with the given momentum (0 for none).
    pub fn sgd(momentum: f32) -> Self {
        Optimizer::Sgd { momentum, dampening: 0.0, nesterov: false, weight_decay: 0.0 }
    }
    /// Adam with PyTorch's defaults (betas 0.9, 0.999, eps 1e-8).
    pub fn adam() -> Self {
        Optimizer::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, amsgrad: false }
    }
    /// AdamW with PyTorch's defaults (weight decay 0.01).
    pub fn adamw() -> Self {
        Optimizer::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, amsgrad: false }
    }
    /// RMSprop with PyTorch's defaults (alpha 0.99, eps 1e-8, no momentum, not centered).
    pub fn rmsprop() -> Self {
        Optimizer::RmsProp { alpha: 0.99, eps: 1e-8, momentum: 0.0, centered: false, weight_decay: 0.0 }
    }
    /// Adagrad with PyTorch's defaults (eps 1e-10, no rate decay, accumulators from 0).
    pub fn adagrad() -> Self {
        Optimizer::Adagrad { lr_decay: 0.0, eps: 1e-10, weight_decay: 0.0, initial_accumulator_value: 0.0 }
    }
    /// Adadelta with PyTorch's defaults (rho 0.9, eps 1e-6); pair it with a learning rate near
    /// 1.0, PyTorch's default for it.
    pub fn adadelta() -> Self {
        Optimizer::Adadelta { rho: 0.9, eps: 1e-6, weight_decay: 0.0 }
    }
    /// NAdam with PyTorch's defaults (betas 0.9, 0.999, eps 1e-8, momentum decay 0.004).
    pub fn nadam() -> Self {
        Optimizer::NAdam { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, momentum_decay: 4e-3 }
    }
    /// L-BFGS with PyTorch's defaults (20 iterations per step, history 100, tolerances 1e-7
    /// on the gradient and 1e-9 on changes).
    pub fn lbfgs() -> Self {
        Optimizer::Lbfgs { max_iter: 20, history_size: 100, tolerance_grad: 1e-7, tolerance_change: 1e-9 }
    }

    /// The optimizer's name as PyTorch spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Optimizer::Sgd { .. } => "SGD",
            Optimizer::Adam { .. } => "Adam",
            Optimizer::AdamW { .. } => "AdamW",
            Optimizer::RmsProp { .. } => "RMSprop",
            Optimizer::Adagrad { .. } => "Adagrad",
            Optimizer::Adadelta { .. } => "Adadelta",
            Optimizer::NAdam { .. } => "NAdam",
            Optimizer::Lbfgs { .. } => "LBFGS",
        }
    }

    /// The momentum (SGD, RMSprop) or beta1 (Adam family) that the device reads each step.
    pub(crate) fn momentum(&self) -> f32 {
        match *self {
            Optimizer::Sgd { momentum, .. } | Optimizer::RmsProp { momentum, .. } => momentum,
            Optimizer::Adam { beta1, .. } | Optimizer::AdamW { beta1, .. } | Optimizer::NAdam { beta1, .. } => beta1,
            _ => 0.0,
        }
    }
}

/// Gradient clipping before each optimizer step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum GradClip {
    /// Scale all gradients so their global L2 norm is at most this (`clip_grad_norm_`).
    Norm(f32),
    /// Clamp every gradient value to `[-v, v]` (`clip_grad_value_`).
    Value(f32),
}

/// What a training step does when its loss or gradient norm is not finite (NaN or infinite),
/// checked inside the step before the update (on the GPU, on the device: no synchronisation).
/// In every mode but [`NonFinite::Ignore`] such a step's update is not applied: the weights and
/// the optimizer state (its step count included) stay as they were.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NonFinite {
    /// Training stops with [`Error::NonFinite`] naming the step and what was not finite. The
    /// error comes at the next read-back (`train_batch`, or the end of a `fit` epoch through
    /// [`crate::train::Trainer::take_epoch_metrics`]); updates queued after the bad step are not
    /// applied either.
    #[default]
    Error,
    /// The step is skipped and counted ([`crate::train::Trainer::skipped_steps`]), as PyTorch's
    /// `GradScaler` skips a step whose gradients hold inf or NaN.
    Skip,
    /// No check: the update applies whatever was computed (kiln before this option).
    Ignore,
}

/// Dynamic loss scaling ([`TrainerConfig::loss_scaling`]), as PyTorch's `torch.amp.GradScaler`:
/// the loss gradient is multiplied by a scale so that small gradients survive in reduced
/// precision; before clipping and the update the gradients are divided by it again, a step
/// whose gradients hold inf or NaN is skipped (weights and optimizer state, its step counter
/// included, untouched) and counted, and the scale adapts (see [`GradScaler`]). All on the
/// device, with nothing read back per step. The state is in checkpoints
/// ([`crate::train::Trainer::scaler_state`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum LossScaling {
    /// Scaling with PyTorch's defaults where the precision needs it ([`Precision::F16Mixed`]),
    /// none otherwise (the default): f32, TF32 and bf16 have f32's range.
    #[default]
    Auto,
    /// No scaling.
    Off,
    /// Dynamic scaling with these settings, in any precision and on every backend (with f32,
    /// as PyTorch allows it, the scaled step computes what the unscaled one does as long as
    /// nothing overflows: the scale is a power of two).
    Dynamic(GradScaler),
}

/// When the learning-rate schedule advances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScheduleUnit {
    /// After every optimizer step.
    Batch,
    /// After every epoch of [`crate::train::Trainer::fit`] (or each call to
    /// [`crate::train::Trainer::end_epoch`]).
    Epoch,
}

/// Everything the trainer needs to know. `TrainerConfig::default()` works: Adam at 1e-3, sparse
/// cross-entropy, classification, batch 32, on the GPU when there is a usable one, else the CPU.
///
/// In a checkpoint, a field missing from the saved config (a file from an earlier kiln) takes
/// its default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainerConfig {
    /// Largest batch `train_batch` accepts; plans are made for it and for any smaller last batch.
    pub batch_size: usize,
    /// Base learning rate (schedules scale it).
    pub learning_rate: f64,
    /// The optimizer and its hyper-parameters (default: [`Optimizer::adam`]).
    pub optimizer: Optimizer,
    /// The loss function (default: sparse cross-entropy on class indices); it must suit
    /// `problem`.
    pub loss: Loss,
    /// Classification (accuracy is reported; the default) or regression.
    pub problem: Problem,
    /// Optional learning-rate schedule, and how often it advances.
    pub schedule: Option<Schedule>,
    /// Whether the schedule advances per epoch (the default, as PyTorch's schedulers are
    /// usually stepped) or per optimizer step.
    pub schedule_unit: ScheduleUnit,
    /// Linear warm-up before the schedule (or before the constant rate).
    pub warmup: Option<Warmup>,
    /// Gradient clipping before each optimizer step (default none).
    pub grad_clip: Option<GradClip>,
    /// Accumulate gradients over this many batches before each optimizer step.
    pub grad_accumulation: usize,
    /// Top-k accuracy reported by `evaluate` (classification); not reported (`None`) for a model
    /// with `top_k` or fewer classes, where it would be 100% whatever the model does.
    pub top_k: usize,
    /// Where to train: [`Device::Auto`] (the default) takes the GPU when a usable one and the
    /// CUDA libraries are present, else the CPU with a one-line notice.
    pub device: Device,
    /// CPU threads (`None`: all cores, or `KILN_NUM_THREADS`); at most 4096.
    pub threads: Option<usize>,
    /// Let the GPU use TF32 tensor cores for convolutions and dense layers (faster, about 1e-3
    /// relative error); off by default, so results match the f32 CPU reference.
    /// [`Precision::Tf32`] turns it on too.
    pub tf32: bool,
    /// Number format of the training step (default f32): [`Precision::Bf16Mixed`] runs
    /// convolutions and dense layers in bf16 on tensor cores with f32 accumulation, keeping f32
    /// weights, gradients, optimizer state, batch-norm statistics and losses (CUDA only; an
    /// error naming `precision` elsewhere); [`Precision::F16Mixed`] the same in f16, with loss
    /// scaling; [`Precision::Tf32`] TF32 tensor cores for f32 convolutions and dense layers.
    #[serde(default)]
    pub precision: Precision,
    /// Dynamic loss scaling (default [`LossScaling::Auto`]: where the precision needs it).
    #[serde(default)]
    pub loss_scaling: LossScaling,
    /// Use only cuDNN algorithms that give the same bits every run (the default), so a run is
    /// reproducible and a replayed CUDA graph equals an eager run. `false` also allows faster
    /// algorithms that accumulate with atomics, as PyTorch's `cudnn.benchmark` does.
    pub deterministic: bool,
    /// What a step with a non-finite loss or gradient norm does (default: stop with an error;
    /// see [`NonFinite`]).
    pub non_finite: NonFinite,
    /// Seed for dropout and data order (weights come from the model's own seed).
    pub seed: u64,
    /// Train data-parallel, one process per device, as one rank of the group that the
    /// environment describes (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`,
    /// as `kiln launch` and `torchrun` set them; without them, a group of one). `batch_size` is
    /// then the batch of each process. See [`crate::dist`].
    #[serde(default)]
    pub data_parallel: Option<DataParallel>,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            batch_size: 32,
            learning_rate: 1e-3,
            optimizer: Optimizer::adam(),
            loss: Loss::SparseCrossEntropy,
            problem: Problem::Classification,
            schedule: None,
            schedule_unit: ScheduleUnit::Epoch,
            warmup: None,
            grad_clip: None,
            grad_accumulation: 1,
            top_k: 5,
            device: Device::Auto,
            threads: None,
            tf32: false,
            precision: Precision::F32,
            loss_scaling: LossScaling::Auto,
            deterministic: true,
            non_finite: NonFinite::Error,
            seed: 0,
            data_parallel: None,
        }
    }
}

/// The most CPU threads a config may ask for: far above any machine's core count, far below the
/// tens of thousands that would take the system minutes to start (and then fail).
pub(crate) const MAX_THREADS: usize = 4096;

fn positive(field: &str, v: f32) -> Result<()> {
    if v > 0.0 && v.is_finite() { Ok(()) } else { Err(Error::config(field, format!("must be positive, got {v}"))) }
}

fn non_negative(field: &str, v: f32) -> Result<()> {
    if v >= 0.0 && v.is_finite() { Ok(()) } else { Err(Error::config(field, format!("must be >= 0, got {v}"))) }
}

fn open_unit(field: &str, v: f32) -> Result<()> {
    if v > 0.0 && v < 1.0 { Ok(()) } else { Err(Error::config(field, format!("must be in (0, 1), got {v}"))) }
}

fn half_open_unit(field: &str, v: f32) -> Result<()> {
    if (0.0..1.0).contains(&v) { Ok(()) } else { Err(Error::config(field, format!("must be in [0, 1), got {v}"))) }
}

fn closed_unit(field: &str, v: f32) -> Result<()> {
    if (0.0..=1.0).contains(&v) { Ok(()) } else { Err(Error::config(field, format!("must be in [0, 1], got {v}"))) }
}

/// Rates and factors are given in f64 but the update kernels compute in f32: a value that is
/// finite and positive in f64 can be infinite (1e39) or zero (1e-50) in f32 and would turn every
/// weight into NaN or freeze it. Checked in the precision used.
fn positive_f32(field: &str, v: f64) -> Result<()> {
    let f = v as f32;
    if v > 0.0 && f > 0.0 && f.is_finite() {
        Ok(())
    } else {
        Err(Error::config(
            field,
            format!("must be positive and finite in f32 (the precision of the update), got {v:e}"),
        ))
    }
}

/// As [`positive_f32`], for values that may be zero.
fn non_negative_f32(field: &str, v: f64) -> Result<()> {
    if v >= 0.0 && (v as f32).is_finite() {
        Ok(())
    } else {
        Err(Error::config(field, format!("must be >= 0 and finite in f32 (the precision of the update), got {v:e}")))
    }
}

/// The schedule's rates and factors in f32 (its own `validate` checks their ranges in f64).
fn schedule_fits_f32(s: &Schedule) -> Result<()> {
    match s {
        Schedule::Step { gamma, .. } | Schedule::MultiStep { gamma, .. } | Schedule::Exponential { gamma } => {
            positive_f32("schedule.gamma", *gamma)
        }
        Schedule::Cosine { eta_min, .. } | Schedule::CosineWarmRestarts { eta_min, .. } => {
            non_negative_f32("schedule.eta_min", *eta_min)
        }
        Schedule::OneCycle { max_lr, div_factor, final_div_factor, base_momentum, max_momentum, .. } => {
            positive_f32("schedule.max_lr", *max_lr)?;
            positive_f32("schedule.div_factor", *div_factor)?;
            positive_f32("schedule.final_div_factor", *final_div_factor)?;
            // The smallest rate the cycle reaches must still be a positive f32.
            positive_f32("schedule.final_div_factor", max_lr / div_factor / final_div_factor)?;
            non_negative_f32("schedule.base_momentum", *base_momentum)?;
            non_negative_f32("schedule.max_momentum", *max_momentum)
        }
        Schedule::ReduceOnPlateau { factor, threshold, min_lr, .. } => {
            positive_f32("schedule.factor", *factor)?;
            if !threshold.is_finite() {
                return Err(Error::config("schedule.threshold", format!("must be finite, got {threshold}")));
            }
            non_negative_f32("schedule.min_lr", *min_lr)
        }
    }
}

impl TrainerConfig {
    /// The loss scaler's settings when [`TrainerConfig::loss_scaling`] resolves to scaling
    /// (`Auto`: where [`TrainerConfig::precision`] needs it), else `None`.
    pub fn grad_scaler(&self) -> Option<GradScaler> {
        match self.loss_scaling {
            LossScaling::Auto => needs_loss_scaling(self.precision).then(GradScaler::default),
            LossScaling::Off => None,
            LossScaling::Dynamic(s) => Some(s),
        }
    }

    /// Checks every field; the error names the field and says why.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::config("batch_size", "must be at least 1"));
        }
        positive_f32("learning_rate", self.learning_rate)?;
        if self.grad_accumulation == 0 {
            return Err(Error::config("grad_accumulation", "must be at least 1"));
        }
        if self.top_k == 0 {
            return Err(Error::config("top_k", "must be at least 1"));
        }
        match self.optimizer {
            Optimizer::Sgd { momentum, dampening, nesterov, weight_decay } => {
                non_negative("optimizer.momentum", momentum)?;
                non_negative("optimizer.dampening", dampening)?;
                non_negative("optimizer.weight_decay", weight_decay)?;
                if nesterov && (momentum <= 0.0 || dampening != 0.0) {
                    return Err(Error::config(
                        "optimizer.nesterov",
                        "Nesterov momentum requires a momentum and zero dampening",
                    ));
                }
            }
            Optimizer::Adam { beta1, beta2, eps, weight_decay, .. }
            | Optimizer::AdamW { beta1, beta2, eps, weight_decay, .. } => {
                half_open_unit("optimizer.beta1", beta1)?;
                open_unit("optimizer.beta2", beta2)?;
                positive("optimizer.eps", eps)?;
                non_negative("optimizer.weight_decay", weight_decay)?;
            }
            Optimizer::NAdam { beta1, beta2, eps, weight_decay, momentum_decay } => {
                open_unit("optimizer.beta1", beta1)?;
                open_unit("optimizer.beta2", beta2)?;
                positive("optimizer.eps", eps)?;
                non_negative("optimizer.weight_decay", weight_decay)?;
                non_negative("optimizer.momentum_decay", momentum_decay)?;
            }
            Optimizer::RmsProp { alpha, eps, momentum, weight_decay, .. } => {
                closed_unit("optimizer.alpha", alpha)?;
                positive("optimizer.eps", eps)?;
                non_negative("optimizer.momentum", momentum)?;
                non_negative("optimizer.weight_decay", weight_decay)?;
            }
            Optimizer::Adagrad { lr_decay, eps, weight_decay, initial_accumulator_value } => {
                non_negative("optimizer.lr_decay", lr_decay)?;
                positive("optimizer.eps", eps)?;
                non_negative("optimizer.weight_decay", weight_decay)?;
                non_negative("optimizer.initial_accumulator_value", initial_accumulator_value)?;
            }
            Optimizer::Adadelta { rho, eps, weight_decay } => {
                closed_unit("optimizer.rho", rho)?;
                positive("optimizer.eps", eps)?;
                non_negative("optimizer.weight_decay", weight_decay)?;
            }
            Optimizer::Lbfgs { max_iter, history_size, tolerance_grad, tolerance_change } => {
                if max_iter == 0 {
                    return Err(Error::config("optimizer.max_iter", "must be at least 1"));
                }
                if history_size == 0 {
                    return Err(Error::config("optimizer.history_size", "must be at least 1"));
                }
                non_negative("optimizer.tolerance_grad", tolerance_grad)?;
                non_negative("optimizer.tolerance_change", tolerance_change)?;
                if self.grad_accumulation != 1 {
                    return Err(Error::config("grad_accumulation", "L-BFGS evaluates full batches; use 1"));
                }
                if self.grad_clip.is_some() {
                    return Err(Error::config("grad_clip", "is not applied by L-BFGS; leave it unset"));
                }
                if self.grad_scaler().is_some() {
                    return Err(Error::config(
                        "loss_scaling",
                        "L-BFGS runs on the host with its own line of evaluations; use LossScaling::Off",
                    ));
                }
            }
        }
        if let LossScaling::Dynamic(s) = &self.loss_scaling {
            s.validate("loss_scaling")?;
        }
        match self.grad_clip {
            Some(GradClip::Norm(v)) => positive("grad_clip", v)?,
            Some(GradClip::Value(v)) => positive("grad_clip", v)?,
            None => {}
        }
        if let Some(s) = &self.schedule {
            s.validate()?;
            schedule_fits_f32(s)?;
        }
        if let Some(w) = &self.warmup {
            w.validate()?;
            positive_f32("warmup.start_factor", w.start_factor * self.learning_rate)?;
        }
        match self.threads {
            Some(0) => return Err(Error::config("threads", "must be at least 1")),
            Some(n) if n > MAX_THREADS => {
                let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1);
                return Err(Error::config(
                    "threads",
                    format!(
                        "{n} CPU threads is more than kiln's limit of {MAX_THREADS} (this machine has {cores} cores)"
                    ),
                ));
            }
            _ => {}
        }
        if let Some(dp) = &self.data_parallel {
            dp.validate()?;
            if matches!(self.optimizer, Optimizer::Lbfgs { .. }) {
                return Err(Error::config(
                    "data_parallel",
                    "L-BFGS evaluates full batches in one process; not supported",
                ));
            }
        }
        self.loss.validate()?;
        match (self.problem, self.loss.is_regression()) {
            (Problem::Classification, true) => Err(Error::config(
                "loss",
                format!("{} is a regression loss but problem is Classification", self.loss.name()),
            )),
            (Problem::Regression, false) => Err(Error::config(
                "loss",
                format!("{} is a classification loss but problem is Regression", self.loss.name()),
            )),
            _ => Ok(()),
        }
    }
}

/// Whether `precision` trains with loss scaling under [`LossScaling::Auto`]: f16, whose range
/// ends at 65504 and whose smallest normal is 6e-5 (bf16 has f32's range).
fn needs_loss_scaling(precision: Precision) -> bool {
    match precision {
        Precision::F16Mixed => true,
        Precision::F32 | Precision::Tf32 | Precision::Bf16Mixed => false,
    }
}

/// The device update rule of an optimizer (`None` for L-BFGS, which runs on the host).
pub(super) fn opt_rule(o: &Optimizer) -> Option<OptRule> {
    Some(match *o {
        Optimizer::Sgd { dampening, nesterov, weight_decay, .. } => OptRule::Sgd { dampening, nesterov, weight_decay },
        Optimizer::Adam { beta2, eps, weight_decay, amsgrad, .. } => {
            OptRule::Adam { beta2, eps, weight_decay, decoupled: false, amsgrad }
        }
        Optimizer::AdamW { beta2, eps, weight_decay, amsgrad, .. } => {
            OptRule::Adam { beta2, eps, weight_decay, decoupled: true, amsgrad }
        }
        Optimizer::RmsProp { alpha, eps, centered, weight_decay, .. } => {
            OptRule::RmsProp { alpha, eps, weight_decay, centered }
        }
        Optimizer::Adagrad { lr_decay, eps, weight_decay, .. } => OptRule::Adagrad { lr_decay, eps, weight_decay },
        Optimizer::Adadelta { rho, eps, weight_decay } => OptRule::Adadelta { rho, eps, weight_decay },
        Optimizer::NAdam { beta2, eps, weight_decay, momentum_decay, .. } => {
            OptRule::NAdam { beta2, eps, weight_decay, momentum_decay }
        }
        Optimizer::Lbfgs { .. } => return None,
    })
}
