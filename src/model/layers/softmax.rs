//! Softmax along an axis, whole: shape rule, FLOPs and lowering to ops. Its kernels are in
//! `backend/cpu/softmax.rs` and `backend/cuda/softmax.rs`.

use crate::backend::{Op, ops};

use super::LayerKind;
use crate::model::Layer;
use crate::model::ModelBuilder;
use crate::model::lower::{Backward, Forward};
use crate::model::spec::{SpecTable, SpecType};
use crate::{Error, Result};

/// `(outer, dim, inner)` of a softmax along `axis` of `[batch, ins...]`.
fn dims(batch: usize, ins: &[usize], axis: isize) -> (usize, usize, usize) {
    let mut full = vec![batch];
    full.extend_from_slice(ins);
    let ax = if axis < 0 { (axis + full.len() as isize) as usize } else { axis as usize };
    (full[..ax].iter().product(), full[ax], full[ax + 1..].iter().product())
}

/// Softmax's kind: its axis.
pub(crate) struct Softmax {
    pub(crate) axis: isize,
}

/// Its spec-file type.
pub(crate) const SPEC: &[SpecType] = &[SpecType {
    name: "softmax",
    fields: &["axis"],
    read: |f| {
        let axis = f.int_or("axis", -1)?;
        let axis = isize::try_from(axis).map_err(|_| f.line_err("axis out of range"))?;
        Ok(Layer::Softmax { axis })
    },
}];

/// The builder methods of this home's layers.
impl ModelBuilder {
    /// Softmax along `axis` of the full tensor (1 for `[batch, classes]`; -1 for the last axis).
    pub fn softmax(self, axis: isize) -> Self {
        self.layer(Layer::Softmax { axis })
    }
}

impl LayerKind for Softmax {
    fn type_name(&self) -> &'static str {
        "softmax"
    }
    fn display_type(&self) -> String {
        format!("Softmax({})", self.axis)
    }
    /// Shape rule: the input's shape, with `axis` in range for the tensor with its batch axis.
    fn infer(&self, name: &str, input: &[usize]) -> Result<Vec<usize>> {
        let axis = self.axis;
        let rank = input.len() as isize + 1;
        if axis < -rank || axis >= rank {
            return Err(Error::layer(
                name,
                format!("softmax axis {axis} is out of range for a rank-{rank} tensor (batch included)"),
            ));
        }
        Ok(input.to_vec())
    }
    /// Forward FLOPs per sample: exponent, sum and division (3 per value).
    fn flops(&self, _input: &[usize], out: u64, _inputs: usize) -> u64 {
        3 * out
    }
    /// Lowering of the forward pass: one [`Op::Softmax`].
    fn forward(&self, cx: &mut Forward<'_>) -> Result<()> {
        let axis = self.axis;
        let (x, y) = (cx.input(0), cx.output());
        let (outer, dim, inner) = dims(cx.batch, cx.in_shapes[0], axis);
        cx.push(Op::Softmax(ops::Softmax { outer, dim, inner, x, y }));
        Ok(())
    }
    /// Lowering of the backward pass: one [`Op::SoftmaxBackward`] (from the output).
    fn backward(&self, cx: &mut Backward<'_>) -> Result<()> {
        let axis = self.axis;
        if let Some(dx) = cx.dx(0) {
            let (outer, dim, inner) = dims(cx.batch, cx.in_shapes[0], axis);
            let (y, dy) = (cx.output(), cx.dy());
            cx.push(Op::SoftmaxBackward(ops::SoftmaxBackward { outer, dim, inner, y, dy, dx }));
        }
        Ok(())
    }
    fn write_spec(&self, t: &mut SpecTable) {
        t.signed("axis", self.axis as i64);
    }
}
