//! The optimizer step and what runs between backward and it: gradient clipping, the
//! finite-step check and the data-parallel all-reduce.

use super::{BufId, CounterId, OpDesc, guard, hyper, stats};
use crate::{Error, Result};

/// An optimizer's update rule and its fixed hyper-parameters, with PyTorch's semantics.
/// The learning rate and the momentum (SGD, RMSprop) or beta1 (Adam family) are read from the
/// device `hyper` buffer each step, so schedules reach the device without re-planning.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptRule {
    /// Stochastic gradient descent, with momentum when the `hyper` momentum is not 0 (state:
    /// the momentum buffer, which the first step sets to the gradient).
    Sgd {
        /// Fraction of each new gradient left out of the momentum buffer (0: none).
        dampening: f32,
        /// Nesterov momentum: step along `g + momentum * buf` instead of `buf`.
        nesterov: bool,
        /// L2 penalty: `weight_decay * w` is added to the gradient.
        weight_decay: f32,
    },
    /// Adam; `decoupled` is AdamW's weight decay (state: first and second moments, and their
    /// running maximum with `amsgrad`).
    Adam {
        /// Decay of the second-moment average (PyTorch's default 0.999).
        beta2: f32,
        /// Added to the denominator's square root (default 1e-8).
        eps: f32,
        /// Weight decay: an L2 term in the gradient, or with `decoupled` the factor
        /// `1 - lr * weight_decay` on the weights before the update.
        weight_decay: f32,
        /// AdamW: decay the weights directly instead of through the gradient.
        decoupled: bool,
        /// Divide by the largest second moment seen so far (AMSGrad).
        amsgrad: bool,
    },
    /// RMSprop (state: the squared-gradient average, the momentum buffer, and the gradient
    /// average when `centered`).
    RmsProp {
        /// Decay of the squared-gradient average (PyTorch's default 0.99).
        alpha: f32,
        /// Added to the denominator's square root (default 1e-8).
        eps: f32,
        /// L2 penalty added to the gradient.
        weight_decay: f32,
        /// Divide by an estimate of the gradient's variance (its average subtracted) instead of
        /// its raw second moment.
        centered: bool,
    },
    /// Adagrad (state: the sum of squared gradients).
    Adagrad {
        /// The learning rate at step `t` is `lr / (1 + (t - 1) * lr_decay)` (0: constant).
        lr_decay: f32,
        /// Added to the denominator's square root (default 1e-10).
        eps: f32,
        /// L2 penalty added to the gradient.
        weight_decay: f32,
    },
    /// Adadelta (state: the squared-gradient and squared-update averages).
    Adadelta {
        /// Decay of both averages (PyTorch's default 0.9).
        rho: f32,
        /// Added inside both square roots (default 1e-6).
        eps: f32,
        /// L2 penalty added to the gradient.
        weight_decay: f32,
    },
    /// NAdam, Adam with Nesterov momentum and PyTorch's momentum schedule (state: first and
    /// second moments; the momentum product lives in the step's `scalars`).
    NAdam {
        /// Decay of the second-moment average (default 0.999).
        beta2: f32,
        /// Added to the denominator's square root (default 1e-8).
        eps: f32,
        /// L2 penalty added to the gradient.
        weight_decay: f32,
        /// The momentum at step `t` is `beta1 * (1 - 0.5 * 0.96^(t * momentum_decay))`
        /// (PyTorch's default 0.004).
        momentum_decay: f32,
    },
}

impl OptRule {
    /// Number of state tensors each parameter needs (moments, accumulators).
    pub fn state_tensors(&self) -> usize {
        match *self {
            OptRule::Sgd { .. } => 1,
            OptRule::Adam { amsgrad, .. } => 2 + amsgrad as usize,
            OptRule::RmsProp { centered, .. } => 2 + centered as usize,
            OptRule::Adagrad { .. } => 1,
            OptRule::Adadelta { .. } => 2,
            OptRule::NAdam { .. } => 2,
        }
    }
}

/// One parameter tensor handled by an optimizer step.
#[derive(Clone, Debug, PartialEq)]
pub struct OptParam {
    /// Number of values (of the parameter, its gradient and each state tensor).
    pub len: usize,
    /// The parameter's values, updated in place.
    pub value: BufId,
    /// Its gradient (read only).
    pub grad: BufId,
    /// State tensors, as many as [`OptRule::state_tensors`].
    pub state: Vec<BufId>,
}

/// Scales gradients so their global L2 norm is at most `max_norm`, as PyTorch's
/// `clip_grad_norm_` (coefficient `max_norm / (norm + 1e-6)` when below one); the norm before
/// clipping is written to `norm[0]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipGradNorm {
    /// Gradients: buffer and values.
    pub grads: Vec<(BufId, usize)>,
    /// Largest global norm kept.
    pub max_norm: f32,
    /// Receives the norm before clipping.
    pub norm: BufId,
}

/// Clamps every gradient value to `[-clip, clip]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipGradValue {
    /// Gradients: buffer and values.
    pub grads: Vec<(BufId, usize)>,
    /// Bound on each value.
    pub clip: f32,
}

/// Checks a training step before its update: the batch's loss (`stats[LOSS]`) and the global L2
/// norm of `grads` must be finite. A bad step sets `guard[SKIP]`, which [`OptimizerStep`] reads
/// on the device, so weights and optimizer state stay as they were, with no synchronisation
/// with the host; the first bad step's figures are kept for the trainer to report (layout:
/// [`guard`](super::guard)). With `sticky`, once a step was bad every later update is skipped too, until the
/// host clears the guard (the trainer's error mode: nothing moves between the bad step and the
/// error). The norm is summed in f64, so only a gradient whose norm exceeds f32's range or holds
/// NaN or infinity counts.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckFinite {
    /// The loss op's statistics (layout: [`stats`](super::stats)).
    pub stats: BufId,
    /// Gradients: buffer and values.
    pub grads: Vec<(BufId, usize)>,
    /// The guard (layout: [`guard`](super::guard)).
    pub guard: BufId,
    /// Keep skipping after a bad step.
    pub sticky: bool,
}

/// Replaces each of `bufs` (buffer, values) by its sum over the ranks of the backend's
/// data-parallel group, or by the mean with `mean` (the gradient all-reduce of one bucket).
/// The CUDA backend runs it on a second stream, so it overlaps with the ops after it until
/// one of them touches these buffers.
#[derive(Clone, Debug, PartialEq)]
pub struct AllReduce {
    /// Buffers reduced: buffer and values.
    pub bufs: Vec<(BufId, usize)>,
    /// Average rather than sum.
    pub mean: bool,
}

/// One optimizer step over all `params`. `step` counts steps (it is incremented first, so
/// the first step is number 1); `scalars` holds per-optimizer scalar state (NAdam's
/// momentum product, starting at 1).
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerStep {
    /// Update rule.
    pub rule: OptRule,
    /// Learning rate and momentum (layout: [`hyper`](super::hyper)).
    pub hyper: BufId,
    /// Step counter (incremented first).
    pub step: CounterId,
    /// Per-optimizer scalar state.
    pub scalars: BufId,
    /// The parameters updated.
    pub params: Vec<OptParam>,
    /// A [`CheckFinite`] guard: when its `SKIP` is set the step changes nothing (not even the
    /// step counter).
    pub guard: Option<BufId>,
}

/// Tensors and their total values, for debug logs.
fn tensors(grads: &[(BufId, usize)]) -> String {
    format!("{} tensors ({} values)", grads.len(), grads.iter().map(|b| b.1).sum::<usize>())
}

impl OpDesc for ClipGradNorm {
    const NAME: &'static str = "clip_grad_norm";
    buffer_table!(|o, f| {
        for (b, n) in r!(o.grads) {
            f(b, *n, RW);
        }
        f(r!(o.norm), 1, W);
    });
    fn shapes(&self) -> String {
        format!("{} tensors, max norm {}", self.grads.len(), self.max_norm)
    }
}

impl OpDesc for ClipGradValue {
    const NAME: &'static str = "clip_grad_value";
    buffer_table!(|o, f| {
        for (b, n) in r!(o.grads) {
            f(b, *n, RW);
        }
    });
    fn shapes(&self) -> String {
        format!("{} tensors, clip {}", self.grads.len(), self.clip)
    }
}

impl OpDesc for AllReduce {
    const NAME: &'static str = "all_reduce";
    buffer_table!(|o, f| {
        for (b, n) in r!(o.bufs) {
            f(b, *n, RW);
        }
    });
    fn shapes(&self) -> String {
        format!("{}, {}", tensors(&self.bufs), if self.mean { "mean" } else { "sum" })
    }
}

impl OpDesc for CheckFinite {
    const NAME: &'static str = "check_finite";
    buffer_table!(|o, f| {
        f(r!(o.stats), stats::LEN, R);
        for (b, n) in r!(o.grads) {
            f(b, *n, R);
        }
        f(r!(o.guard), guard::LEN, RW);
    });
    fn shapes(&self) -> String {
        format!("{}{}", tensors(&self.grads), if self.sticky { ", sticky" } else { "" })
    }
}

impl OpDesc for OptimizerStep {
    const NAME: &'static str = "optimizer_step";
    buffer_table!(|o, f| {
        if let Some(g) = r!(o.guard) {
            f(g, guard::LEN, R);
        }
        f(r!(o.hyper), hyper::LEN, R);
        f(r!(o.scalars), 1, RW);
        for p in r!(o.params) {
            f(r!(p.value), p.len, RW);
            f(r!(p.grad), p.len, R);
            for s in r!(p.state) {
                f(s, p.len, RW);
            }
        }
    });
    fn shapes(&self) -> String {
        format!(
            "{:?} on {} tensors ({} values)",
            self.rule,
            self.params.len(),
            self.params.iter().map(|p| p.len).sum::<usize>()
        )
    }

    /// Every parameter has as many state tensors as the rule keeps.
    fn check(&self) -> Result<()> {
        let want = self.rule.state_tensors();
        match self.params.iter().find(|p| p.state.len() != want) {
            Some(p) => Err(Error::shape(
                format!("state tensors of parameter buffer {} in op {}", p.value.0, Self::NAME),
                want,
                p.state.len(),
            )),
            None => Ok(()),
        }
    }
}
