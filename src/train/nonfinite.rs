//! Non-finite steps, as the trainer reports them: the device guard that the step's
//! `CheckFinite` op fills (see [`crate::exec`]) read back and turned into
//! [`Error::NonFinite`] naming the step, or counted ([`NonFinite::Skip`]); and the loss
//! scaler's state, which counts the steps it skipped.

use super::config::{NonFinite, opt_rule};
use super::loss::Loss;
use super::trainer::Trainer;
use crate::exec::ScalerState;
use crate::{Error, Result};

impl Trainer {
    /// Steps whose update was skipped because their loss or gradient norm was not finite
    /// ([`NonFinite::Skip`]; under [`NonFinite::Error`], those not yet reported). One device read.
    /// With loss scaling, the steps its scaler skipped are counted in [`Trainer::scaler_state`].
    pub fn skipped_steps(&mut self) -> Result<u64> {
        if opt_rule(&self.config.optimizer).is_none() {
            return Ok(0);
        }
        Ok(self.exec.guard()?.bad_steps)
    }

    /// The loss scaler's scale, good steps in a row and skipped steps, when the config scales
    /// the loss ([`crate::train::LossScaling`]); `None` otherwise. One device read.
    pub fn scaler_state(&mut self) -> Result<Option<ScalerState>> {
        if self.config.grad_scaler().is_none() {
            return Ok(None);
        }
        self.exec.scaler_state().map(Some)
    }

    /// Under [`NonFinite::Error`], the first step found non-finite since the last report, as
    /// [`Error::NonFinite`]; the guard is then cleared, so training can go on (from the weights
    /// before that step). One device read.
    pub(super) fn report_non_finite(&mut self) -> Result<()> {
        if self.config.non_finite != NonFinite::Error || opt_rule(&self.config.optimizer).is_none() {
            return Ok(());
        }
        let g = self.exec.guard()?;
        let Some(first) = g.first_bad else { return Ok(()) };
        self.exec.clear_guard()?;
        // The checked steps since the guard was cleared end with the latest one, number
        // `opt_steps`; the bad one was the `first`-th of them.
        let step = (self.opt_steps + first).saturating_sub(g.checked);
        let (loss, norm) = (g.loss, g.norm);
        let mut what = match (g.bad_loss, g.bad_norm) {
            (true, false) => format!("loss ({loss})"),
            (false, _) => format!("gradient norm ({norm})"),
            (true, true) => format!("loss ({loss}) and gradient norm ({norm})"),
        };
        if !loss.is_finite()
            && let Some(hint) = self.probability_hint()?
        {
            what += &hint;
        }
        Err(Error::NonFinite { step, what })
    }

    /// For a loss on probabilities, the first model output outside [0, 1] of the last step
    /// (its loss is NaN, as PyTorch raises), named by sample, with what to do instead.
    fn probability_hint(&mut self) -> Result<Option<String>> {
        let (Loss::BinaryCrossEntropy, Some(plan)) = (&self.config.loss, self.last_plan) else {
            return Ok(None);
        };
        let out = self.exec.read_output(plan)?;
        let c: usize = self.out_shape.iter().product();
        Ok(out.iter().position(|p| !(0.0..=1.0).contains(p)).map(|i| {
            format!(
                ": BinaryCrossEntropy takes probabilities in [0, 1], but output {} of sample {} is {}; \
                 end the model with .sigmoid() or use BinaryCrossEntropyWithLogits on its logits",
                i % c,
                i / c,
                out[i]
            )
        }))
    }
}
