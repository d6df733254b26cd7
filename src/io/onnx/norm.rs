//! Normalisation layers from ONNX: `BatchNormalization`, and `InstanceNormalization` as kiln's
//! GroupNorm, with the per-channel `Mul` and `Add` that follow it folded into its parameters.
//!
//! Both PyTorch exporters (TorchScript and dynamo, opsets 13 and 18) write `nn.GroupNorm(G, C)`
//! as
//!
//! ```text
//! Reshape(x, [0, G, -1]) -> InstanceNormalization(scale = ones[G], B = zeros[G], epsilon)
//!   -> Reshape(_, Shape(x)) -> Mul(_, weight) -> Add(_, bias)      (weight, bias: [C, 1, 1] or [C])
//! ```
//!
//! (ONNX's `GroupNormalization` has per-group scale and bias until opset 21, so neither exporter
//! uses it; kiln's export writes the same chain.) A `Reshape` only changes a tensor's ONNX shape
//! (`import.rs`), so `InstanceNormalization` sees kiln node `x` viewed as `[G, L]`: each row is
//! `C / G` whole consecutive channels when `G` divides `C`, which is kiln's GroupNorm with `G`
//! groups; its per-group scale and bias become per-channel parameters. The `Mul` and `Add` by a
//! per-channel constant are then folded in (`weight *= m; bias = bias * m + a`) when nothing
//! else reads the normalised value. An `InstanceNormalization` on `[C, H, W]` itself
//! (`nn.InstanceNorm2d` without running statistics) is GroupNorm with `C` groups.

use super::import::{Importer, Params, Res, Val};
use super::proto::NodeProto;
use super::read::{Attrs, Const};
use crate::model::{BatchNorm, GroupNorm, Layer, ParamRole};

/// The per-channel values of constant `c` broadcast against an activation of per-sample shape
/// `shape` (`[C, ...]`, batch first in ONNX), if `c` varies along the channel axis only (or not
/// at all): `[C, 1, 1]`, `[1, C, 1, 1]`, `[C]` on a `[batch, C]` value, a scalar.
fn per_channel(c: &Const, shape: &[usize]) -> Option<Vec<f32>> {
    let f = c.floats()?;
    let rank = shape.len() + 1;
    let channels = *shape.first()?;
    if c.dims.len() > rank {
        return None;
    }
    let mut along_channels = false;
    for (i, &d) in c.dims.iter().enumerate() {
        // Dimension i of `c` lines up with dimension `rank - len + i` of the activation.
        if rank - c.dims.len() + i == 1 && d == channels {
            along_channels = true;
        } else if d != 1 {
            return None;
        }
    }
    match (along_channels, f.len()) {
        (true, n) if n == channels => Some(f.to_vec()),
        (false, 1) => Some(vec![f[0]; channels]),
        _ => None,
    }
}

impl Importer<'_> {
    /// `BatchNormalization` (inference form) as kiln's BatchNorm with running statistics.
    pub(super) fn batch_norm(&mut self, node: &NodeProto, a: &Attrs) -> Res<()> {
        if a.int("training_mode", 0)? != 0 || (1..node.output.len()).any(|k| self.used(node, k)) {
            return Err("training mode (batch statistics as outputs) is not supported".into());
        }
        let (x, xs) = self.act(node, 0)?;
        if xs.len() != 1 && xs.len() != 3 {
            return Err(format!("needs a [batch, C] or [batch, C, H, W] input, got per-sample {xs:?}"));
        }
        let c = xs[0];
        let mut p = Params::new();
        for (k, role, what) in [
            (1, ParamRole::Weight, "scale"),
            (2, ParamRole::Bias, "B"),
            (3, ParamRole::RunningMean, "input_mean"),
            (4, ParamRole::RunningVar, "input_var"),
        ] {
            let t = self.weight(node, k, what)?;
            if t.len() != c {
                return Err(format!("{what} has {} values for {c} channels", t.len()));
            }
            p.insert(role, t.floats().unwrap_or_default().to_vec());
        }
        if p.get(&ParamRole::RunningVar).into_iter().flatten().any(|v| v.is_nan() || *v < 0.0) {
            return Err("input_var has a negative or NaN value".into());
        }
        let momentum = a.float("momentum", 0.9)?;
        // ONNX's momentum weighs the running statistic; PyTorch's (and go-metal's) the batch.
        let momentum = if self.go_metal { momentum } else { 1.0 - momentum };
        let bn = BatchNorm { eps: a.float("epsilon", 1e-5)?, momentum, affine: true, track_running_stats: true };
        let x = self.exact(x, &xs)?;
        let name = self.name_for(node, Some(1), "batch_norm");
        let n = self.add(&name, Layer::BatchNorm(bn), vec![x], p)?;
        self.set(node, 0, Val::Act { node: n, shape: xs });
        Ok(())
    }

    /// `InstanceNormalization` over groups of whole channels: kiln's GroupNorm (module comment).
    pub(super) fn instance_norm(&mut self, node: &NodeProto, a: &Attrs) -> Res<()> {
        let (x, xs) = self.act(node, 0)?;
        if xs.len() < 2 {
            return Err(format!("needs an input of rank 3 or more, got per-sample shape {xs:?}"));
        }
        let groups = xs[0];
        let layout = self.nodes[x].shape.clone();
        let channels = layout[0];
        if !(layout.len() == 1 || layout.len() == 3) || groups == 0 || !channels.is_multiple_of(groups) {
            return Err(format!(
                "only groups of whole channels of a [batch, C] or [batch, C, H, W] value are supported \
                 (GroupNorm): {groups} instances of a value of per-sample shape {layout:?}"
            ));
        }
        let (scale, bias) = (self.weight(node, 1, "scale")?, self.weight(node, 2, "B")?);
        if scale.len() != groups || bias.len() != groups {
            return Err(format!("scale and B have {} and {} values for {groups} instances", scale.len(), bias.len()));
        }
        let per_group = channels / groups;
        let widen = |c: &Const| -> Vec<f32> {
            c.floats().unwrap_or_default().iter().flat_map(|&v| std::iter::repeat_n(v, per_group)).collect()
        };
        let mut p = Params::new();
        p.insert(ParamRole::Weight, widen(&scale));
        p.insert(ParamRole::Bias, widen(&bias));
        let gn = GroupNorm { groups, eps: a.float("epsilon", 1e-5)?, affine: true };
        // kiln's export names the node `{layer}/norm`.
        let name = self.name_for(node, None, "group_norm");
        let name = name.strip_suffix("/norm").filter(|s| !s.is_empty()).unwrap_or(&name).to_string();
        let n = self.add(&name, Layer::GroupNorm(gn), vec![x], p)?;
        self.set(node, 0, Val::Act { node: n, shape: xs });
        Ok(())
    }

    /// The GroupNorm that activation `v` is, in kiln's layout, if nothing else reads it.
    fn sole_group_norm(&self, v: &Val) -> Option<(usize, Vec<usize>)> {
        match v {
            Val::Act { node, shape }
                if matches!(self.nodes[*node].layer, Layer::GroupNorm(GroupNorm { affine: true, .. }))
                    && self.nodes[*node].shape == *shape
                    && self.producer_uses(*node) <= 1 =>
            {
                Some((*node, shape.clone()))
            }
            _ => None,
        }
    }

    /// `Mul` of a GroupNorm's output by a per-channel constant, folded into its weight and
    /// bias; false (nothing done) when the inputs are not that.
    pub(super) fn fold_norm_scale(&mut self, node: &NodeProto, p: &Val, q: &Val) -> Res<bool> {
        let (norm, k, c) = match (p, q) {
            (v, Val::Const(c)) => (self.sole_group_norm(v), 1, c),
            (Val::Const(c), v) => (self.sole_group_norm(v), 0, c),
            _ => return Ok(false),
        };
        let Some((x, shape)) = norm else { return Ok(false) };
        let Some(m) = per_channel(c, &shape) else { return Ok(false) };
        for role in [ParamRole::Weight, ParamRole::Bias] {
            if let Some(v) = self.params[x].get_mut(&role) {
                v.iter_mut().zip(&m).for_each(|(v, m)| *v *= m);
            }
        }
        // PyTorch's (and kiln's) name for the weight names the layer.
        if let Some(stem) = node.input[k].strip_suffix(".weight").filter(|s| !s.is_empty())
            && !self.names.contains(stem)
        {
            self.names.remove(&self.nodes[x].name);
            self.names.insert(stem.to_string());
            self.nodes[x].name = stem.to_string();
        }
        self.set(node, 0, Val::Act { node: x, shape });
        Ok(true)
    }

    /// `Add` of a per-channel constant to a GroupNorm's output, folded into its bias; false
    /// (nothing done) when the inputs are not that.
    pub(super) fn fold_norm_shift(&mut self, node: &NodeProto, x: usize, shape: &[usize], c: &Const) -> Res<bool> {
        let v = Val::Act { node: x, shape: shape.to_vec() };
        let Some((x, shape)) = self.sole_group_norm(&v) else { return Ok(false) };
        let Some(a) = per_channel(c, &shape) else { return Ok(false) };
        if let Some(b) = self.params[x].get_mut(&ParamRole::Bias) {
            b.iter_mut().zip(&a).for_each(|(b, a)| *b += a);
        }
        self.set(node, 0, Val::Act { node: x, shape });
        Ok(true)
    }
}
