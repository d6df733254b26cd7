//! Dynamic loss scaling as PyTorch's `torch.amp.GradScaler`, as a feature of step plans
//! ([`StepDesc::loss_scaling`](super::StepDesc::loss_scaling)) that works with every
//! [`Precision`](super::Precision) and every backend.
//!
//! A scaled step multiplies the loss gradient by the current scale right after the loss
//! ([`ops::ScaleLoss`]), so backward runs on gradients large enough not to flush to zero in
//! f16. An update step then, before clipping and the optimizer, divides every parameter
//! gradient by the scale, checks it for inf/NaN and adapts the scale ([`ops::UnscaleGrads`]):
//!
//! ```text
//! Loss -> ScaleLoss -> backward (-> all-reduce) -> [CheckFinite, loss only] -> UnscaleGrads -> [Clip] -> OptimizerStep
//! ```
//!
//! A step whose gradients hold inf or NaN sets the finite-step guard's skip flag, which the
//! optimizer step reads on the device: weights, optimizer state and its step counter stay as
//! they were. The scale then backs off (x0.5) and the step is counted; after `growth_interval`
//! good steps in a row it grows (x2). Everything lives in one four-value device buffer
//! ([`ops::scaler`]), so nothing is read back per step and a CUDA graph replays the whole step.
//! Gradients overflowing is what the scaler is for, so with scaling on the finite check of
//! [`StepDesc::check_finite`](super::StepDesc::check_finite) looks only at the loss (computed
//! in f32 before scaling): a non-finite loss is still its business.

use serde::{Deserialize, Serialize};

use super::Executor;
use crate::backend::ops::{self, scaler};
use crate::backend::{Backend, BufId, Op};
use crate::{Error, Result};

/// The largest count the scaler's f32 state holds exactly.
const MAX_EXACT: u64 = 1 << 24;

/// Settings of dynamic loss scaling, PyTorch's `GradScaler` arguments with its defaults
/// (`GradScaler::default()`): initial scale 65536, growth x2 after 2000 good steps in a row,
/// backoff x0.5 after a step with inf/NaN gradients.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GradScaler {
    /// The scale of the first step (positive, finite; default 65536 = 2^16).
    pub init_scale: f32,
    /// Factor on the scale after `growth_interval` good steps in a row (above 1; default 2).
    pub growth_factor: f32,
    /// Factor on the scale after a step with inf/NaN gradients (in (0, 1); default 0.5).
    pub backoff_factor: f32,
    /// Good steps in a row before the scale grows (1 to 2^24; default 2000).
    pub growth_interval: u32,
}

impl Default for GradScaler {
    fn default() -> Self {
        GradScaler { init_scale: 65536.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 2000 }
    }
}

impl GradScaler {
    /// Checks every setting; the error names `{field}.{setting}`.
    pub fn validate(&self, field: &str) -> Result<()> {
        let bad = |name: &str, why: String| Err(Error::config(format!("{field}.{name}"), why));
        if !(self.init_scale > 0.0 && self.init_scale.is_finite()) {
            return bad("init_scale", format!("must be positive and finite, got {}", self.init_scale));
        }
        if !(self.growth_factor > 1.0 && self.growth_factor.is_finite()) {
            return bad("growth_factor", format!("must be above 1 and finite, got {}", self.growth_factor));
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return bad("backoff_factor", format!("must be in (0, 1), got {}", self.backoff_factor));
        }
        if self.growth_interval == 0 || self.growth_interval as u64 > MAX_EXACT {
            return bad("growth_interval", format!("must be in 1..=2^24, got {}", self.growth_interval));
        }
        Ok(())
    }

    /// The state before the first step.
    pub fn initial_state(&self) -> ScalerState {
        ScalerState { scale: self.init_scale, good_steps: 0, skipped: 0 }
    }
}

/// Where dynamic loss scaling stands: what checkpoints save so a resumed run scales exactly as
/// the original would have.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScalerState {
    /// The current scale (an f32, as PyTorch's `scaler.get_scale()`).
    pub scale: f32,
    /// Good steps in a row since the scale last changed (PyTorch's growth tracker).
    pub good_steps: u32,
    /// Update steps skipped because their gradients held inf or NaN.
    pub skipped: u64,
}

impl ScalerState {
    /// Checks the state can be what a scaler holds; the error names `field`.
    pub fn validate(&self, field: &str) -> Result<()> {
        if !(self.scale > 0.0 && self.scale.is_finite()) {
            return Err(Error::config(field, format!("scale must be positive and finite, got {}", self.scale)));
        }
        if self.good_steps as u64 >= MAX_EXACT || self.skipped > MAX_EXACT {
            return Err(Error::config(field, "a count exceeds 2^24, what the device state holds exactly"));
        }
        Ok(())
    }
}

/// The op after the loss of a scaled training step: `dpred *= scale`.
pub(super) fn scale_loss(dpred: BufId, len: usize, scale: BufId) -> Op {
    Op::ScaleLoss(ops::ScaleLoss { len, buf: dpred, scale })
}

/// The op before clipping of a scaled update step (see [`ops::UnscaleGrads`]).
pub(super) fn unscale(s: &GradScaler, grads: &[(BufId, usize)], scale: BufId, guard: BufId, checked: bool) -> Op {
    Op::UnscaleGrads(ops::UnscaleGrads {
        grads: grads.to_vec(),
        scale,
        guard,
        merge_skip: checked,
        growth_factor: s.growth_factor,
        backoff_factor: s.backoff_factor,
        growth_interval: s.growth_interval,
    })
}

impl<B: Backend> Executor<B> {
    /// The loss scaler's state on the device (one read; the same for steps planned with and
    /// without [`StepDesc::loss_scaling`](super::StepDesc::loss_scaling): only scaled steps
    /// change it).
    pub fn scaler_state(&mut self) -> Result<ScalerState> {
        let b = self.training()?.scaler;
        let s = self.backend.read(b)?;
        Ok(ScalerState {
            scale: s[scaler::SCALE],
            good_steps: s[scaler::GOOD_STEPS] as u32,
            skipped: s[scaler::SKIPPED] as u64,
        })
    }

    /// Sets the loss scaler's state (the start of a run, or a checkpoint's state).
    pub fn set_scaler_state(&mut self, state: ScalerState) -> Result<()> {
        state.validate("scaler state")?;
        let b = self.training()?.scaler;
        let mut v = [0.0f32; scaler::LEN];
        v[scaler::SCALE] = state.scale;
        v[scaler::GOOD_STEPS] = state.good_steps as f32;
        v[scaler::SKIPPED] = state.skipped as f32;
        self.backend.write(b, &v)
    }
}
