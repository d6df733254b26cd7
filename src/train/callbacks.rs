//! Callbacks run by [`super::Trainer::fit_with`] after every epoch (and batch): early stopping
//! and per-epoch logging, and the trait for your own.

use super::metrics::EpochLog;
use super::trainer::Trainer;
use crate::Result;

/// Whether `fit` goes on after an epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Go on training.
    Continue,
    /// End `fit` after this epoch (or batch); `fit` then returns the history so far.
    Stop,
}

/// Something to run after every epoch (every method has a default that does nothing).
pub trait Callback {
    /// Called after every epoch of `fit` (training and, when given, validation) with its log;
    /// returning [`Control::Stop`] ends training.
    fn on_epoch_end(&mut self, log: &EpochLog) -> Control {
        let _ = log;
        Control::Continue
    }

    /// Called after [`Callback::on_epoch_end`] with the trainer, for callbacks that need more
    /// than the log (saving checkpoints). An error stops `fit`, which returns it.
    fn on_epoch_end_with_trainer(&mut self, trainer: &mut Trainer, log: &EpochLog) -> Result<Control> {
        let _ = (trainer, log);
        Ok(Control::Continue)
    }

    /// Called after every training batch of `fit` (mid-epoch checkpoints). Stopping here leaves
    /// the epoch open; an error stops `fit`, which returns it.
    fn on_batch_end(&mut self, trainer: &mut Trainer) -> Result<Control> {
        let _ = trainer;
        Ok(Control::Continue)
    }
}

/// Which figure a callback watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Monitor {
    /// The validation loss (lower is better); absent without validation data.
    ValLoss,
    /// The validation accuracy (higher is better); absent without validation data or for
    /// regression.
    ValAccuracy,
    /// The epoch's mean training loss (lower is better).
    TrainLoss,
    /// The epoch's training accuracy (higher is better); absent for regression.
    TrainAccuracy,
}

impl Monitor {
    /// The figure from a log, and whether larger is better.
    pub(crate) fn read(&self, log: &EpochLog) -> Option<(f64, bool)> {
        match self {
            Monitor::ValLoss => log.val.map(|m| (m.loss as f64, false)),
            Monitor::ValAccuracy => log.val.and_then(|m| m.accuracy).map(|a| (a as f64, true)),
            Monitor::TrainLoss => Some((log.train.loss as f64, false)),
            Monitor::TrainAccuracy => log.train.accuracy.map(|a| (a as f64, true)),
        }
    }
}

/// Stops training when the monitored figure has not improved by more than `min_delta` for
/// `patience` epochs (Keras's `EarlyStopping`). The figure is watched only when the epoch has it
/// (no validation data: validation figures are absent and nothing stops).
#[derive(Clone, Debug)]
pub struct EarlyStopping {
    /// The figure watched.
    pub monitor: Monitor,
    /// Epochs without improvement after which training stops (0 or 1: at the first epoch
    /// that does not improve).
    pub patience: usize,
    /// How much the figure must beat its best so far to count as an improvement (default 0:
    /// any strict improvement).
    pub min_delta: f64,
    best: Option<f64>,
    wait: usize,
    /// Epoch at which training was stopped, if it was.
    pub stopped_epoch: Option<usize>,
}

impl EarlyStopping {
    /// Watches `monitor` and stops after `patience` epochs without improvement.
    pub fn new(monitor: Monitor, patience: usize) -> Self {
        EarlyStopping { monitor, patience, min_delta: 0.0, best: None, wait: 0, stopped_epoch: None }
    }

    /// Sets [`EarlyStopping::min_delta`], in the monitored figure's units (a loss, or an
    /// accuracy as a fraction).
    pub fn min_delta(mut self, d: f64) -> Self {
        self.min_delta = d;
        self
    }
}

impl Callback for EarlyStopping {
    fn on_epoch_end(&mut self, log: &EpochLog) -> Control {
        let Some((v, larger_better)) = self.monitor.read(log) else { return Control::Continue };
        let improved = match self.best {
            None => true,
            Some(b) if larger_better => v > b + self.min_delta,
            Some(b) => v < b - self.min_delta,
        };
        if improved {
            self.best = Some(v);
            self.wait = 0;
            return Control::Continue;
        }
        self.wait += 1;
        if self.wait >= self.patience {
            self.stopped_epoch = Some(log.epoch);
            Control::Stop
        } else {
            Control::Continue
        }
    }
}

/// Prints one line per epoch: loss, accuracy, validation figures, learning rate and time.
#[derive(Clone, Debug, Default)]
pub struct Logger;

impl Callback for Logger {
    fn on_epoch_end(&mut self, log: &EpochLog) -> Control {
        println!("{}", format_log(log));
        Control::Continue
    }
}

/// `epoch 3: loss 0.1234 acc 96.10% | val loss 0.1100 acc 96.50% | lr 1.0e-3 | 2.1s`
pub fn format_log(log: &EpochLog) -> String {
    let mut s = format!("epoch {:>3}: loss {:.4}", log.epoch, log.train.loss);
    if let Some(a) = log.train.accuracy {
        s += &format!(" acc {:.2}%", a * 100.0);
    }
    if let Some(v) = log.val {
        s += &format!(" | val loss {:.4}", v.loss);
        if let Some(a) = v.accuracy {
            s += &format!(" acc {:.2}%", a * 100.0);
        }
    }
    s += &format!(" | lr {:.2e} | {:.1}s", log.lr, log.seconds);
    s
}
