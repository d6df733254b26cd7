//! Training: the trainer, losses, optimizers, learning-rate schedules, metrics, the `fit` loop
//! and its callbacks.
//!
//! Optimizers, losses and schedules follow PyTorch's formulas and defaults; the whole training
//! step (forward, loss, backward, clipping, update) is one list of backend ops, so on a GPU it
//! runs without host round trips.

mod callbacks;
mod config;
mod lbfgs;
mod loss;
mod metrics;
mod schedule;
mod state;
mod trainer;

pub use crate::backend::Device;
pub use callbacks::{Callback, Control, EarlyStopping, Logger, Monitor, format_log};
pub use config::{GradClip, Optimizer, Problem, ScheduleUnit, TrainerConfig};
pub use loss::{Loss, Targets};
pub use metrics::{EpochLog, History, Metrics, StepResult};
pub use schedule::{Anneal, PlateauMode, Schedule, Scheduler, Warmup};
pub use state::{StateTensor, TrainerMeta, TrainerState};
pub use trainer::Trainer;
