//! Dropout, whole: shape rule, FLOPs and lowering to ops (a mask drawn from the node's own
//! counter-based stream in training, the identity in evaluation). Its kernels are
//! `backend/cpu/dropout.rs` and `backend/cuda/dropout.rs`.

use crate::backend::{Op, ops};

use super::LayerKind;
use crate::model::Layer;
use crate::model::ModelBuilder;
use crate::model::lower::{Backward, Forward, Mode};
use crate::model::spec::{SpecTable, SpecType};
use crate::{Error, Result};

/// Dropout's kind: its rate.
pub(crate) struct Dropout {
    pub(crate) rate: f32,
}

/// Its spec-file type.
pub(crate) const SPEC: &[SpecType] =
    &[SpecType { name: "dropout", fields: &["rate"], read: |f| Ok(Layer::Dropout { rate: f.float("rate")? }) }];

/// The builder methods of this home's layers.
impl ModelBuilder {
    /// In training, zeroes each value with probability `rate` (in `[0, 1)`) and scales the
    /// rest by `1 / (1 - rate)`; the identity in evaluation.
    pub fn dropout(self, rate: f32) -> Self {
        self.layer(Layer::Dropout { rate })
    }
}

impl LayerKind for Dropout {
    fn type_name(&self) -> &'static str {
        "dropout"
    }
    fn display_type(&self) -> String {
        format!("Dropout({})", self.rate)
    }
    /// Shape rule: the input's shape, for a rate in `[0, 1)`.
    fn infer(&self, name: &str, input: &[usize]) -> Result<Vec<usize>> {
        let rate = self.rate;
        if !(0.0..1.0).contains(&rate) {
            return Err(Error::layer(name, format!("dropout rate must be in [0, 1), got {rate}")));
        }
        Ok(input.to_vec())
    }
    fn flops(&self, _input: &[usize], out: u64, _inputs: usize) -> u64 {
        out
    }
    /// Lowering of the forward pass: in training one [`Op::Dropout`] saving its mask; in
    /// evaluation the output is the input.
    fn forward(&self, cx: &mut Forward<'_>) -> Result<()> {
        let rate = self.rate;
        if cx.mode == Mode::Eval {
            cx.alias_input();
            return Ok(());
        }
        let (x, y) = (cx.input(0), cx.output());
        let len = cx.numel();
        let mask = cx.save(len, "mask");
        let (seed, counter) = cx.dropout.expect("dropout counter");
        // A recomputation (a checkpointed segment in backward) draws the forward's mask again.
        let replay = cx.recompute;
        cx.push(Op::Dropout(ops::Dropout { rate, len, seed, counter, replay, x, y, mask }));
        Ok(())
    }
    /// Lowering of the backward pass: one [`Op::DropoutBackward`] through the saved mask.
    fn backward(&self, cx: &mut Backward<'_>) -> Result<()> {
        if let Some(dx) = cx.dx(0) {
            let (mask, dy) = (cx.saved(0), cx.dy());
            cx.push(Op::DropoutBackward(ops::DropoutBackward { len: cx.numel(), mask, dy, dx }));
        }
        Ok(())
    }
    fn write_spec(&self, t: &mut SpecTable) {
        t.float("rate", self.rate);
    }
}
