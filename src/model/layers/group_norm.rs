//! GroupNorm, whole: options, shape rule, parameters (PyTorch's `nn.GroupNorm` names and
//! initial values), FLOPs and lowering to ops. Its kernels are `backend/cpu/group_norm.rs` and
//! `backend/cuda/group_norm.rs`; its tests are the `group_norm*` cases of tests/corpus.
//!
//! ```
//! use kiln::model::{GroupNorm, ModelBuilder};
//! let model = ModelBuilder::new(&[2, 8, 4, 4])
//!     .conv2d(16, 3)
//!     .group_norm(4) // 4 groups of 4 channels
//!     .group_norm_with(GroupNorm::new(2).eps(1e-6).affine(false))
//!     .build()
//!     .unwrap();
//! assert_eq!(model.param("group_norm_1.weight").unwrap().len(), 16);
//! ```

use serde::{Deserialize, Serialize};

use super::LayerKind;
use crate::model::Layer;
use crate::model::spec::{SpecTable, SpecType};

use crate::backend::Op;
use crate::backend::ops::{self, GnGeom};
use crate::model::ModelBuilder;
use crate::model::ParamRole;
use crate::model::lower::{Backward, Forward};
use crate::model::params::ParamDecl;
use crate::{Error, Result};

/// Group normalisation (PyTorch's `nn.GroupNorm`): the channels of each sample are split into
/// `groups` groups of consecutive channels, each normalised by its own mean and (biased)
/// variance; then a per-channel scale and shift when `affine`. Batch-size independent, and the
/// same in training and evaluation (no running statistics).
///
/// Parameters `weight` (ones) and `bias` (zeros) of `[C]` when affine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupNorm {
    /// Number of groups; must divide the channel count.
    pub groups: usize,
    /// Added to the variance (PyTorch's default 1e-5).
    pub eps: f32,
    /// Learnable per-channel scale and shift (`weight`, `bias`).
    pub affine: bool,
}

impl GroupNorm {
    /// `groups` groups, eps 1e-5, affine (PyTorch's defaults).
    pub fn new(groups: usize) -> Self {
        GroupNorm { groups, eps: 1e-5, affine: true }
    }
    /// Added to the variance.
    pub fn eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }
    /// Learnable scale and shift (default true).
    pub fn affine(mut self, a: bool) -> Self {
        self.affine = a;
        self
    }
}

fn geom(gn: &GroupNorm, ins: &[usize], batch: usize) -> GnGeom {
    GnGeom { n: batch, c: ins[0], hw: ins[1..].iter().product(), groups: gn.groups, eps: gn.eps }
}

/// Its spec-file type.
pub(crate) const SPEC: &[SpecType] = &[SpecType {
    name: "group_norm",
    fields: &["groups", "eps", "affine"],
    read: |f| {
        Ok(Layer::GroupNorm(GroupNorm {
            groups: f.size("groups", 1)?,
            eps: f.float_or("eps", 1e-5)?,
            affine: f.bool_or("affine", true)?,
        }))
    },
}];

/// The builder methods of this home's layers.
impl ModelBuilder {
    /// Group normalisation with `groups` groups and PyTorch's defaults (eps 1e-5, affine).
    pub fn group_norm(self, groups: usize) -> Self {
        self.layer(Layer::GroupNorm(GroupNorm::new(groups)))
    }

    /// Group normalisation with options: `group_norm_with(GroupNorm::new(8).eps(1e-6))`.
    pub fn group_norm_with(self, gn: GroupNorm) -> Self {
        self.layer(Layer::GroupNorm(gn))
    }
}

impl LayerKind for GroupNorm {
    fn type_name(&self) -> &'static str {
        "group_norm"
    }

    fn display_type(&self) -> String {
        format!("GroupNorm({})", self.groups)
    }

    /// `[C, ...]` (4-D input, or 2-D `[batch, C]`) with `groups` dividing `C`; the output has
    /// the input's shape.
    fn infer(&self, name: &str, input: &[usize]) -> Result<Vec<usize>> {
        if input.len() != 1 && input.len() != 3 {
            return Err(Error::layer(
                name,
                format!("group_norm needs a [batch, C] or [batch, C, H, W] input, got per-sample shape {input:?}"),
            ));
        }
        if self.groups == 0 || !input[0].is_multiple_of(self.groups) {
            return Err(Error::layer(
                name,
                format!("group_norm groups ({}) must be at least 1 and divide the {} channels", self.groups, input[0]),
            ));
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(Error::layer(name, format!("eps must be positive and finite, got {}", self.eps)));
        }
        Ok(input.to_vec())
    }

    /// `weight` and `bias` `[C]` when affine, in PyTorch's `state_dict` order.
    fn params(&self, input: &[usize]) -> Vec<ParamDecl> {
        match self.affine {
            true => vec![
                ParamDecl::trained("weight", ParamRole::Weight, vec![input[0]], 1),
                ParamDecl::trained("bias", ParamRole::Bias, vec![input[0]], 1),
            ],
            false => vec![],
        }
    }

    /// PyTorch's initial value: weight 1, bias 0.
    fn init(&self, role: ParamRole, n: usize) -> Option<Vec<f32>> {
        Some(vec![if matches!(role, ParamRole::Weight) { 1.0 } else { 0.0 }; n])
    }

    /// Statistics (about 3 per value: sum, squared deviation) and the scale and shift (2 per
    /// value).
    fn flops(&self, _input: &[usize], out: u64, _inputs: usize) -> u64 {
        5 * out
    }

    /// One [`Op::GroupNorm`], saving mean and invstd per sample and group.
    fn forward(&self, cx: &mut Forward<'_>) -> Result<()> {
        let g = geom(self, cx.in_shapes[0], cx.batch);
        let (x, y) = (cx.input(0), cx.output());
        let (gamma, beta) = (cx.param(ParamRole::Weight), cx.param(ParamRole::Bias));
        let mean = cx.save(g.n * g.groups, "mean");
        let invstd = cx.save(g.n * g.groups, "invstd");
        cx.push(Op::GroupNorm(ops::GroupNorm { g, x, gamma, beta, y, mean, invstd }));
        Ok(())
    }

    /// One [`Op::GroupNormBackward`] for whichever gradients are wanted.
    fn backward(&self, cx: &mut Backward<'_>) -> Result<()> {
        let g = geom(self, cx.in_shapes[0], cx.batch);
        let (x, dy) = (cx.input(0), cx.dy());
        let dx = cx.dx(0);
        let (dgamma, dbeta) = (cx.param_grad(ParamRole::Weight), cx.param_grad(ParamRole::Bias));
        if dx.is_some() || dgamma.is_some() || dbeta.is_some() {
            let gamma = cx.param(ParamRole::Weight);
            let (mean, invstd) = (cx.saved(0), cx.saved(1));
            cx.push(Op::GroupNormBackward(ops::GroupNormBackward { g, x, gamma, mean, invstd, dy, dx, dgamma, dbeta }));
        }
        Ok(())
    }

    fn write_spec(&self, t: &mut SpecTable) {
        t.int("groups", self.groups);
        t.float("eps", self.eps);
        t.bool("affine", self.affine);
    }
}
