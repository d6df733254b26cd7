//! Dynamic loss scaling, as PyTorch's `torch.amp.GradScaler`: the loss gradient multiplied by a
//! scale kept on the device ([`ScaleLoss`]), and before clipping and the update the gradients
//! divided by it again, checked for inf/NaN and the scale adapted ([`UnscaleGrads`]). The scale
//! and its counters live in one small buffer (layout: [`scaler`](super::scaler)), so a
//! replayed CUDA graph scales, skips and adapts with no host involvement.

use super::{BufId, OpDesc, guard, scaler};

/// `buf *= scale[SCALE]` over `len` values: the loss gradient of a scaled step (PyTorch's
/// `scaler.scale(loss)`, applied to the loss's gradient; the same by linearity, and exact for
/// the powers of two the scale normally is).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScaleLoss {
    /// Number of values.
    pub len: usize,
    /// The loss gradient, scaled in place.
    pub buf: BufId,
    /// The scaler state (layout: [`scaler`](super::scaler)).
    pub scale: BufId,
}

/// PyTorch's `scaler.unscale_(optimizer)` and `scaler.update()` in one op, before clipping
/// and the optimizer step:
///
/// 1. every gradient value is checked (inf or NaN sets the step's found-inf flag) and
///    multiplied by `1 / scale` (the reciprocal taken in f64 and rounded to f32, as PyTorch);
/// 2. `guard[SKIP]` is set when inf/NaN was found (with `merge_skip`, or-ed into what a
///    [`CheckFinite`](super::CheckFinite) earlier in the step wrote; else overwritten), so the
///    [`OptimizerStep`](super::OptimizerStep) reading the guard leaves weights, optimizer state
///    and step counter untouched;
/// 3. the scale is updated: after a step with inf/NaN, multiplied by `backoff_factor`, the
///    good-step count reset and the skipped count incremented; after a good one, the good-step
///    count incremented and, when it reaches `growth_interval`, reset with the scale multiplied
///    by `growth_factor` (unless that would make it infinite).
#[derive(Clone, Debug, PartialEq)]
pub struct UnscaleGrads {
    /// Gradients: buffer and values.
    pub grads: Vec<(BufId, usize)>,
    /// The scaler state (layout: [`scaler`](super::scaler)).
    pub scale: BufId,
    /// The finite-step guard the optimizer step reads (layout: [`guard`](super::guard)).
    pub guard: BufId,
    /// Keep a skip already set by this step's finite check.
    pub merge_skip: bool,
    /// Factor on the scale after `growth_interval` good steps in a row (PyTorch: 2).
    pub growth_factor: f32,
    /// Factor on the scale after a step with inf/NaN gradients (PyTorch: 0.5).
    pub backoff_factor: f32,
    /// Good steps in a row before the scale grows (PyTorch: 2000).
    pub growth_interval: u32,
}

impl OpDesc for ScaleLoss {
    const NAME: &'static str = "scale_loss";
    buffer_table!(|o, f| {
        f(r!(o.scale), scaler::LEN, R);
        f(r!(o.buf), o.len, RW);
    });
    fn shapes(&self) -> String {
        format!("{}", self.len)
    }
}

impl OpDesc for UnscaleGrads {
    const NAME: &'static str = "unscale_grads";
    buffer_table!(|o, f| {
        for (b, n) in r!(o.grads) {
            f(b, *n, RW);
        }
        f(r!(o.scale), scaler::LEN, RW);
        f(r!(o.guard), guard::LEN, RW);
    });
    fn shapes(&self) -> String {
        format!(
            "{} tensors ({} values), growth {} every {}, backoff {}",
            self.grads.len(),
            self.grads.iter().map(|g| g.1).sum::<usize>(),
            self.growth_factor,
            self.growth_interval,
            self.backoff_factor
        )
    }
}
