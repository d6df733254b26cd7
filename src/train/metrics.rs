//! What training reports: per-step results, evaluation metrics, per-epoch logs and the history.

use serde::{Deserialize, Serialize};

/// The result of one training step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    /// Mean loss over the batch.
    pub loss: f32,
    /// Fraction of correct predictions (classification only).
    pub accuracy: Option<f32>,
}

/// Loss and accuracy over a dataset (or an epoch of training batches).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Mean loss per sample.
    pub loss: f32,
    /// Top-1 accuracy (classification only); for binary losses, the fraction of correct
    /// element-wise predictions.
    pub accuracy: Option<f32>,
    /// Accuracy counting a prediction correct when the target is among the `top_k` largest
    /// outputs (arg-max classification only). `None` when `top_k` is at least the number of
    /// classes: every target is then among the top k, and PyTorch's `topk` would refuse a k
    /// larger than the class count rather than report 100%.
    pub top_k_accuracy: Option<f32>,
    /// The `k` of `top_k_accuracy` ([`crate::train::TrainerConfig::top_k`]).
    pub top_k: usize,
    /// Samples seen.
    pub samples: usize,
}

/// One epoch of `fit`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochLog {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Figures over the epoch's training batches (with the weights as they changed during
    /// the epoch, as Keras reports them).
    pub train: Metrics,
    /// Figures on the validation data after the epoch, when `fit` was given some.
    pub val: Option<Metrics>,
    /// Learning rate used during the epoch's last step.
    pub lr: f64,
    /// Wall-clock time of the epoch, validation included, in seconds.
    pub seconds: f64,
}

/// Every epoch's log.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// One log per epoch, in order.
    pub epochs: Vec<EpochLog>,
}

impl History {
    /// The latest epoch's log (`None` before the first epoch ends).
    pub fn last(&self) -> Option<&EpochLog> {
        self.epochs.last()
    }
}
