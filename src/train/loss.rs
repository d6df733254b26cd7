//! Loss functions as users name them, the targets they take, and the checks that targets are
//! valid (a label out of range or NaN is an error naming the sample) and that a loss fits the
//! model's output shape.

use serde::{Deserialize, Serialize};

use crate::exec::{LossFn, Scoring};
use crate::tensor::Tensor;
use crate::{Error, Result};

/// A loss function; all are averaged over the batch as PyTorch's `reduction="mean"`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Loss {
    /// Cross-entropy on logits with class-index targets (PyTorch `CrossEntropyLoss` with class
    /// indices; go-metal's and Keras's `SparseCategoricalCrossentropy(from_logits=True)`).
    SparseCrossEntropy,
    /// Cross-entropy on logits with probability (one-hot or soft) targets, or class indices, and
    /// optional label smoothing (PyTorch `CrossEntropyLoss(label_smoothing=..)`).
    CrossEntropy {
        /// Weight moved from the targets to the uniform distribution over classes, in `[0, 1]`
        /// (0: none).
        label_smoothing: f32,
    },
    /// Binary cross-entropy on probabilities (outputs after a sigmoid; PyTorch `BCELoss`), single
    /// output or multi-label.
    BinaryCrossEntropy,
    /// Binary cross-entropy on logits (PyTorch `BCEWithLogitsLoss`), single output or
    /// multi-label.
    BinaryCrossEntropyWithLogits,
    /// Cross-entropy on probabilities (outputs after a softmax; Keras `categorical_crossentropy`,
    /// probabilities clipped to [1e-7, 1 - 1e-7]), with probability or class-index targets.
    CategoricalCrossEntropy,
    /// Mean squared error (PyTorch `MSELoss`), averaged over every output value.
    MeanSquaredError,
    /// Mean absolute error (PyTorch `L1Loss`).
    MeanAbsoluteError,
    /// PyTorch `HuberLoss(delta)`.
    Huber {
        /// Where the loss turns from quadratic to linear, positive (PyTorch's default 1).
        delta: f32,
    },
}

/// Training targets: class indices, or values shaped like the model output.
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a> {
    /// One class index per sample, below the model's output width (checked: an index out of
    /// range is an error naming the sample).
    Classes(&'a [u32]),
    /// A tensor of the model output's shape (probabilities for the cross-entropies, values
    /// for regression).
    Values(&'a Tensor),
}

impl<'a> From<&'a [u32]> for Targets<'a> {
    fn from(v: &'a [u32]) -> Self {
        Targets::Classes(v)
    }
}

impl<'a> From<&'a Vec<u32>> for Targets<'a> {
    fn from(v: &'a Vec<u32>) -> Self {
        Targets::Classes(v)
    }
}

impl<'a, const N: usize> From<&'a [u32; N]> for Targets<'a> {
    fn from(v: &'a [u32; N]) -> Self {
        Targets::Classes(v)
    }
}

impl<'a> From<&'a Tensor> for Targets<'a> {
    fn from(v: &'a Tensor) -> Self {
        Targets::Values(v)
    }
}

impl Targets<'_> {
    /// Number of samples.
    pub fn len(&self) -> usize {
        match self {
            Targets::Classes(c) => c.len(),
            Targets::Values(t) => t.shape().first().copied().unwrap_or(0),
        }
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Loss {
    /// The variant's name, as config files and messages spell it (`"SparseCrossEntropy"`).
    pub fn name(&self) -> &'static str {
        match self {
            Loss::SparseCrossEntropy => "SparseCrossEntropy",
            Loss::CrossEntropy { .. } => "CrossEntropy",
            Loss::BinaryCrossEntropy => "BinaryCrossEntropy",
            Loss::BinaryCrossEntropyWithLogits => "BinaryCrossEntropyWithLogits",
            Loss::CategoricalCrossEntropy => "CategoricalCrossEntropy",
            Loss::MeanSquaredError => "MeanSquaredError",
            Loss::MeanAbsoluteError => "MeanAbsoluteError",
            Loss::Huber { .. } => "Huber",
        }
    }

    pub(crate) fn is_regression(&self) -> bool {
        matches!(self, Loss::MeanSquaredError | Loss::MeanAbsoluteError | Loss::Huber { .. })
    }

    pub(crate) fn validate(&self) -> Result<()> {
        match *self {
            Loss::CrossEntropy { label_smoothing } if !(0.0..=1.0).contains(&label_smoothing) => {
                Err(Error::config("loss.label_smoothing", format!("must be in [0, 1], got {label_smoothing}")))
            }
            Loss::Huber { delta } if !(delta > 0.0 && delta.is_finite()) => {
                Err(Error::config("loss.delta", format!("must be positive, got {delta}")))
            }
            _ => Ok(()),
        }
    }

    /// Checks that the loss fits a model whose per-sample output shape is `out`.
    pub(crate) fn check_output(&self, out: &[usize]) -> Result<()> {
        let classes = match out {
            [c] => *c,
            _ if self.is_regression() => return Ok(()),
            _ => {
                return Err(Error::config(
                    "loss",
                    format!(
                        "{} needs a [batch, outputs] model output, but the model gives [batch, {}]",
                        self.name(),
                        out.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        };
        match self {
            Loss::SparseCrossEntropy | Loss::CrossEntropy { .. } | Loss::CategoricalCrossEntropy if classes < 2 => {
                Err(Error::config(
                    "loss",
                    format!(
                        "{} needs at least 2 outputs (one per class), the model has {classes}; \
                         for a single-output binary classifier use BinaryCrossEntropyWithLogits",
                        self.name()
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    /// The device loss, the scoring rule and the host values of the targets for a batch of `n`
    /// samples with per-sample output shape `out`.
    pub(crate) fn prepare(
        &self,
        targets: Targets,
        n: usize,
        out: &[usize],
        problem_is_classification: bool,
        top_k: usize,
    ) -> Result<(LossFn, Scoring, BatchTargets)> {
        let c: usize = out.iter().product();
        if targets.len() != n {
            return Err(Error::shape("targets", format!("{n} samples (one per input)"), targets.len()));
        }
        let argmax = if problem_is_classification { Scoring::ArgMax { top_k } } else { Scoring::None };
        match (*self, targets) {
            (Loss::SparseCrossEntropy, Targets::Values(_)) => Err(Error::config(
                "loss",
                "SparseCrossEntropy takes class indices; for one-hot or probability targets use CrossEntropy",
            )),
            (Loss::SparseCrossEntropy, Targets::Classes(cl)) => {
                check_classes(cl, c)?;
                Ok((
                    LossFn::SoftmaxCrossEntropy { label_smoothing: 0.0, class_targets: true },
                    argmax,
                    BatchTargets::Labels(cl.to_vec()),
                ))
            }
            (Loss::CrossEntropy { label_smoothing }, Targets::Classes(cl)) => {
                check_classes(cl, c)?;
                Ok((
                    LossFn::SoftmaxCrossEntropy { label_smoothing, class_targets: true },
                    argmax,
                    BatchTargets::Labels(cl.to_vec()),
                ))
            }
            (Loss::CrossEntropy { label_smoothing }, Targets::Values(t)) => {
                let v = check_values(t, n, out, |x| x >= 0.0, "a probability (>= 0)")?;
                Ok((
                    LossFn::SoftmaxCrossEntropy { label_smoothing, class_targets: false },
                    argmax,
                    BatchTargets::Values(v),
                ))
            }
            (Loss::CategoricalCrossEntropy, Targets::Classes(cl)) => {
                check_classes(cl, c)?;
                Ok((LossFn::CategoricalCrossEntropy { class_targets: true }, argmax, BatchTargets::Labels(cl.to_vec())))
            }
            (Loss::CategoricalCrossEntropy, Targets::Values(t)) => {
                let v = check_values(t, n, out, |x| x >= 0.0, "a probability (>= 0)")?;
                Ok((LossFn::CategoricalCrossEntropy { class_targets: false }, argmax, BatchTargets::Values(v)))
            }
            (Loss::BinaryCrossEntropy | Loss::BinaryCrossEntropyWithLogits, targets) => {
                let f = if matches!(self, Loss::BinaryCrossEntropy) {
                    LossFn::BinaryCrossEntropy
                } else {
                    LossFn::BinaryCrossEntropyWithLogits
                };
                let scoring = if problem_is_classification {
                    Scoring::Binary { logits: matches!(self, Loss::BinaryCrossEntropyWithLogits) }
                } else {
                    Scoring::None
                };
                let v = match targets {
                    Targets::Classes(cl) if c == 1 => {
                        for (i, &y) in cl.iter().enumerate() {
                            if y > 1 {
                                return Err(Error::Label {
                                    sample: i,
                                    reason: format!("binary label must be 0 or 1, got {y}"),
                                });
                            }
                        }
                        to_f32(cl)
                    }
                    Targets::Classes(_) => {
                        return Err(Error::config(
                            "loss",
                            format!(
                                "{} on {c} outputs takes a [batch, {c}] tensor of 0/1 targets, not class indices",
                                self.name()
                            ),
                        ));
                    }
                    Targets::Values(t) => check_values(t, n, out, |x| (0.0..=1.0).contains(&x), "in [0, 1]")?,
                };
                Ok((f, scoring, BatchTargets::Values(v)))
            }
            (Loss::MeanSquaredError | Loss::MeanAbsoluteError | Loss::Huber { .. }, Targets::Classes(_)) => {
                Err(Error::config("loss", format!("{} takes value targets shaped like the output", self.name())))
            }
            (Loss::MeanSquaredError | Loss::MeanAbsoluteError | Loss::Huber { .. }, Targets::Values(t)) => {
                let f = match *self {
                    Loss::MeanSquaredError => LossFn::MeanSquaredError,
                    Loss::MeanAbsoluteError => LossFn::MeanAbsoluteError,
                    Loss::Huber { delta } => LossFn::Huber { delta },
                    _ => unreachable!(),
                };
                Ok((f, Scoring::None, BatchTargets::Values(check_values(t, n, out, |_| true, "finite")?)))
            }
        }
    }
}

/// A batch's targets as the step plan takes them: class labels (`u32`) for losses with class
/// targets, values otherwise.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum BatchTargets {
    /// One class label per sample, checked to be below the number of classes.
    Labels(Vec<u32>),
    /// Values shaped like the output (0/1 labels of a binary loss become values).
    Values(Vec<f32>),
}

fn to_f32(cl: &[u32]) -> Vec<f32> {
    cl.iter().map(|&y| y as f32).collect()
}

fn check_classes(cl: &[u32], classes: usize) -> Result<()> {
    for (i, &y) in cl.iter().enumerate() {
        if y as usize >= classes {
            return Err(Error::Label {
                sample: i,
                reason: format!("class {y} is out of range: the model has {classes} outputs (classes 0..{classes})"),
            });
        }
    }
    Ok(())
}

fn check_values(t: &Tensor, n: usize, out: &[usize], ok: impl Fn(f32) -> bool, what: &str) -> Result<Vec<f32>> {
    let mut want = vec![n];
    want.extend_from_slice(out);
    let per: usize = out.iter().product();
    // [n] is accepted for single-output models, as PyTorch users often pass it.
    if t.shape() != want.as_slice() && !(per == 1 && t.shape() == [n]) {
        return Err(Error::shape("targets", format!("{want:?}"), format!("{:?}", t.shape())));
    }
    for (k, &x) in t.data().iter().enumerate() {
        if x.is_nan() || x.is_infinite() || !ok(x) {
            return Err(Error::Label { sample: k / per.max(1), reason: format!("target value {x} must be {what}") });
        }
    }
    Ok(t.data().to_vec())
}
