//! BatchNorm, whole: options, shape rule, parameters and running statistics (PyTorch's names and
//! initial values), FLOPs and lowering to ops (training with batch statistics, optionally
//! synchronised over a data-parallel group; evaluation with running statistics). Its kernels are
//! `backend/{cpu,cuda}/batch_norm.rs` (one path, plain or synchronised).

use serde::{Deserialize, Serialize};

use super::LayerKind;
use crate::model::Layer;
use crate::model::spec::{SpecTable, SpecType};

use crate::backend::Op;
use crate::backend::ops::{self, BnGeom};
use crate::model::ModelBuilder;
use crate::model::ParamRole;
use crate::model::lower::{Backward, Forward, Mode};
use crate::model::params::ParamDecl;
use crate::model::shape::dims_str;
use crate::{Error, Result};

/// Batch normalisation over channels (4-D input) or features (2-D input), as PyTorch's
/// `BatchNorm2d` / `BatchNorm1d`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchNorm {
    /// Added to the variance before its square root; positive and finite (default 1e-5).
    pub eps: f32,
    /// Weight of the newest batch in the running statistics (PyTorch's `momentum`, 0.1).
    pub momentum: f32,
    /// Learnable scale and shift (`weight`, `bias`).
    pub affine: bool,
    /// Keep running statistics for evaluation; without them evaluation uses batch statistics.
    pub track_running_stats: bool,
}

impl Default for BatchNorm {
    fn default() -> Self {
        BatchNorm { eps: 1e-5, momentum: 0.1, affine: true, track_running_stats: true }
    }
}

impl BatchNorm {
    /// PyTorch's defaults: eps 1e-5, momentum 0.1, affine, tracking running statistics.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets [`BatchNorm::eps`].
    pub fn eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }
    /// Sets [`BatchNorm::momentum`], in `[0, 1]` (checked when the model is built).
    pub fn momentum(mut self, m: f32) -> Self {
        self.momentum = m;
        self
    }
    /// Sets [`BatchNorm::affine`].
    pub fn affine(mut self, a: bool) -> Self {
        self.affine = a;
        self
    }
    /// Sets [`BatchNorm::track_running_stats`].
    pub fn track_running_stats(mut self, t: bool) -> Self {
        self.track_running_stats = t;
        self
    }
}

fn geom(ins: &[usize], batch: usize, eps: f32) -> BnGeom {
    BnGeom { n: batch, c: ins[0], hw: ins[1..].iter().product(), eps }
}

/// Its spec-file type.
pub(crate) const SPEC: &[SpecType] = &[SpecType {
    name: "batch_norm",
    fields: &["eps", "momentum", "affine", "track_running_stats"],
    read: |f| {
        let d = BatchNorm::default();
        Ok(Layer::BatchNorm(BatchNorm {
            eps: f.float_or("eps", d.eps)?,
            momentum: f.float_or("momentum", d.momentum)?,
            affine: f.bool_or("affine", d.affine)?,
            track_running_stats: f.bool_or("track_running_stats", d.track_running_stats)?,
        }))
    },
}];

/// The builder methods of this home's layers.
impl ModelBuilder {
    /// Batch normalisation with PyTorch's defaults (eps 1e-5, momentum 0.1, affine).
    pub fn batch_norm(self) -> Self {
        self.layer(Layer::BatchNorm(BatchNorm::default()))
    }

    /// Batch normalisation with options: `batch_norm_with(BatchNorm::new().momentum(0.01))`.
    pub fn batch_norm_with(self, bn: BatchNorm) -> Self {
        self.layer(Layer::BatchNorm(bn))
    }
}

impl LayerKind for BatchNorm {
    fn type_name(&self) -> &'static str {
        "batch_norm"
    }
    fn display_type(&self) -> String {
        "BatchNorm".into()
    }
    /// Shape rule: a `[batch, features]` or `[batch, C, H, W]` input, kept as the output's shape.
    fn infer(&self, name: &str, input: &[usize]) -> Result<Vec<usize>> {
        if input.len() != 1 && input.len() != 3 {
            return Err(Error::layer(
                name,
                format!(
                    "batch_norm needs a [batch, features] or [batch, C, H, W] input, got per-sample shape {}",
                    dims_str(input)
                ),
            ));
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(Error::layer(name, format!("eps must be positive and finite, got {}", self.eps)));
        }
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(Error::layer(name, format!("momentum must be in [0, 1], got {}", self.momentum)));
        }
        Ok(input.to_vec())
    }
    /// `weight` and `bias` `[C]` when affine, then `running_mean` and `running_var` `[C]` (state,
    /// not trained) when tracking running statistics; PyTorch's `state_dict` order.
    fn params(&self, input: &[usize]) -> Vec<ParamDecl> {
        let c = input[0];
        let mut v = Vec::new();
        if self.affine {
            v.push(ParamDecl::trained("weight", ParamRole::Weight, vec![c], 1));
            v.push(ParamDecl::trained("bias", ParamRole::Bias, vec![c], 1));
        }
        if self.track_running_stats {
            v.push(ParamDecl::state("running_mean", ParamRole::RunningMean, vec![c]));
            v.push(ParamDecl::state("running_var", ParamRole::RunningVar, vec![c]));
        }
        v
    }
    /// PyTorch's initial values: weight 1, bias 0, running mean 0, running variance 1.
    fn init(&self, role: ParamRole, n: usize) -> Option<Vec<f32>> {
        Some(vec![if matches!(role, ParamRole::Weight | ParamRole::RunningVar) { 1.0 } else { 0.0 }; n])
    }
    /// Forward FLOPs per sample: the scale and shift (2 per value).
    fn flops(&self, _input: &[usize], out: u64, _inputs: usize) -> u64 {
        2 * out
    }
    /// Lowering of the forward pass: [`Op::BatchNormInfer`] in evaluation with running statistics,
    /// else [`Op::BatchNormTrain`] (batch statistics saved for backward).
    fn forward(&self, cx: &mut Forward<'_>) -> Result<()> {
        let (node, batch, ins) = (cx.node, cx.batch, cx.in_shapes[0]);
        let g = geom(ins, batch, self.eps);
        if cx.mode == Mode::Train && g.n * g.hw < 2 {
            return Err(Error::layer(
                &node.name,
                format!(
                    "batch norm in training needs more than one value per channel; \
                     batch {batch} of shape {ins:?} gives {}",
                    g.n * g.hw
                ),
            ));
        }
        let (x, y) = (cx.input(0), cx.output());
        let gamma = cx.param(ParamRole::Weight);
        let beta = cx.param(ParamRole::Bias);
        let rm = cx.param(ParamRole::RunningMean);
        let rv = cx.param(ParamRole::RunningVar);
        match (cx.mode, rm, rv) {
            (Mode::Eval, Some(running_mean), Some(running_var)) => cx.push(Op::BatchNormInfer(ops::BatchNormInfer {
                g,
                x,
                gamma,
                beta,
                running_mean,
                running_var,
                y,
                act: None,
            })),
            _ => {
                let mean = cx.save(g.c, "mean");
                let invstd = cx.save(g.c, "invstd");
                let running = match (cx.mode, rm, rv) {
                    (Mode::Train, Some(rm), Some(rv)) if cx.update_running_stats => Some((rm, rv, self.momentum)),
                    _ => None,
                };
                let sync = cx.sync_batch_norm && cx.mode == Mode::Train;
                let op = ops::BatchNormTrain { g, x, gamma, beta, y, mean, invstd, running, sync, act: None };
                cx.push(Op::BatchNormTrain(op));
            }
        }
        Ok(())
    }
    /// Lowering of the backward pass: one [`Op::BatchNormBackward`].
    fn backward(&self, cx: &mut Backward<'_>) -> Result<()> {
        let g = geom(cx.in_shapes[0], cx.batch, self.eps);
        let (x, dy) = (cx.input(0), cx.dy());
        let dx = cx.dx(0);
        let (dgamma, dbeta) = (cx.param_grad(ParamRole::Weight), cx.param_grad(ParamRole::Bias));
        if dx.is_some() || dgamma.is_some() {
            let gamma = cx.param(ParamRole::Weight);
            let (mean, invstd, sync) = (cx.saved(0), cx.saved(1), cx.sync_batch_norm);
            let op = ops::BatchNormBackward { g, x, gamma, mean, invstd, dy, dx, dgamma, dbeta, sync, act: None };
            cx.push(Op::BatchNormBackward(op));
        }
        Ok(())
    }
    fn write_spec(&self, t: &mut SpecTable) {
        t.float("eps", self.eps);
        t.float("momentum", self.momentum);
        t.bool("affine", self.affine);
        t.bool("track_running_stats", self.track_running_stats);
    }
}
