//! Training: the trainer, losses, optimizers, learning-rate schedules, metrics, the `fit` loop
//! and its callbacks.
//!
//! Optimizers, losses and schedules follow PyTorch's formulas and defaults. The trainer is the
//! loop; [`crate::exec`] compiles each whole training step (forward, loss, backward, clipping,
//! update) into one plan, so on a GPU it runs without host round trips.

mod callbacks;
mod config;
mod evaluate;
mod fit;
mod lbfgs;
mod loss;
mod metrics;
mod nonfinite;
mod progress;
mod schedule;
mod state;
mod trainer;

pub use crate::backend::Device;
/// Loss scaling's settings and state ([`LossScaling`], [`Trainer::scaler_state`]).
pub use crate::exec::{GradScaler, ScalerState};
/// The mode [`Trainer::predict_with`] takes.
pub use crate::exec::{Mode, Precision};
pub use callbacks::{Callback, Control, EarlyStopping, Logger, Monitor, format_log};
pub use config::{GradClip, LossScaling, NonFinite, Optimizer, Problem, ScheduleUnit, TrainerConfig};
pub use loss::{Loss, Targets};
pub use metrics::{EpochLog, History, Metrics, StepResult};
pub use progress::{Progress, ProgressStyle};
pub use schedule::{Anneal, PlateauMode, Schedule, Scheduler, Warmup};
pub use state::{StateTensor, TrainerMeta, TrainerState};
pub use trainer::Trainer;
