//! Loss functions, accuracy scoring and the loss op.

use super::{BufId, OpDesc, stats};

/// A loss function on the model output `pred` (`n` samples of `c` values) and the targets.
///
/// Targets are class indices (`n` values, a `u32` buffer) for the cross-entropies with
/// `class_targets`, else values with the shape of `pred`. Every loss is averaged as PyTorch's
/// `reduction="mean"` does: over samples for the cross-entropies, over all elements otherwise.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LossFn {
    /// Softmax cross-entropy on logits, with optional label smoothing. Targets are class indices
    /// or probabilities (one-hot or soft).
    SoftmaxCrossEntropy {
        /// Weight in `[0, 1)` moved from the target distribution to the uniform one
        /// (PyTorch's `label_smoothing`; 0: none).
        label_smoothing: f32,
        /// Targets are class indices (`n` values) rather than `n x c` probabilities.
        class_targets: bool,
    },
    /// Binary cross-entropy on probabilities (PyTorch clamps the logs at -100).
    BinaryCrossEntropy,
    /// Binary cross-entropy on logits, computed stably.
    BinaryCrossEntropyWithLogits,
    /// `-sum(t * log(clip(p, 1e-7, 1)))` on probabilities, as Keras's categorical cross-entropy.
    /// Targets are class indices or probabilities.
    CategoricalCrossEntropy {
        /// Targets are class indices (`n` values) rather than `n x c` probabilities.
        class_targets: bool,
    },
    /// `(p - t)^2`, averaged over every element.
    MeanSquaredError,
    /// `|p - t|`, averaged over every element.
    MeanAbsoluteError,
    /// PyTorch's `HuberLoss`: `0.5 d^2` where `|d| = |p - t| < delta`, else
    /// `delta * (|d| - 0.5 delta)`; averaged over every element.
    Huber {
        /// Where the loss turns from quadratic to linear (positive; PyTorch's default 1).
        delta: f32,
    },
}

impl LossFn {
    /// Whether the loss reads class indices (`n` values) rather than a target per prediction.
    pub fn class_targets(self) -> bool {
        matches!(
            self,
            LossFn::SoftmaxCrossEntropy { class_targets: true, .. }
                | LossFn::CategoricalCrossEntropy { class_targets: true }
        )
    }
}

/// How the loss op scores predictions for the accuracy metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    /// No accuracy (regression).
    None,
    /// Class prediction by arg-max; `top_k` also counts targets among the k largest outputs.
    ArgMax {
        /// Counted as correct when the target is among this many largest outputs (at most
        /// the number of classes).
        top_k: usize,
    },
    /// Element-wise binary prediction: output above `0.5` (probabilities) or `0` (logits).
    Binary {
        /// The outputs are logits (threshold 0) rather than probabilities (threshold 0.5).
        logits: bool,
    },
}

/// Loss and accuracy of `pred` against `target`: writes the batch's figures into `stats` (see
/// [`stats`](super::stats)) and adds them to its sums, and, when `dpred` is given, the gradient of the mean
/// loss times `grad_scale` (1/k under gradient accumulation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Loss {
    /// The function.
    pub f: LossFn,
    /// How predictions are scored.
    pub scoring: Scoring,
    /// Output features.
    pub n: usize,
    /// Values per sample.
    pub c: usize,
    /// Predictions.
    pub pred: BufId,
    /// Targets: class labels (`n` values of dtype `u32`, each below `c`) when the loss takes
    /// class targets ([`LossFn::class_targets`]), else `n * c` values of the computing dtype.
    pub target: BufId,
    /// Statistics (layout: [`stats`](super::stats)).
    pub stats: BufId,
    /// Gradient of the predictions, where wanted.
    pub dpred: Option<BufId>,
    /// Factor on the gradient.
    pub grad_scale: f32,
}

impl OpDesc for Loss {
    const NAME: &'static str = "loss";
    buffer_table!(|o, f| {
        f(r!(o.pred), o.n * o.c, R);
        if o.f.class_targets() {
            f(r!(o.target), o.n, R_U32);
        } else {
            f(r!(o.target), o.n * o.c, R);
        }
        f(r!(o.stats), stats::LEN, RW);
        if let Some(d) = r!(o.dpred) {
            f(d, o.n * o.c, W);
        }
    });
    fn shapes(&self) -> String {
        format!("{:?} {}x{}", self.f, self.n, self.c)
    }
}
