//! Turning an ONNX graph into kiln layers.
//!
//! The graph is walked in dependency order. Every tensor becomes one of:
//! - an activation: a kiln node, plus the shape ONNX gives it per sample, which may differ from
//!   the kiln node's (after `GlobalAveragePool` ONNX has `[C, 1, 1]` where kiln has `[C]`; after
//!   `Unsqueeze`/`Squeeze` only the ONNX shape changes). A layer that cares about the layout gets
//!   a `Reshape` inserted when they differ; element-wise layers and dense layers (which flatten)
//!   do not need one;
//! - a constant (initializer, `Constant` node, or folded from constants);
//! - a shape value: integers computed from `Shape` of an activation, where the batch size is a
//!   symbol, so PyTorch's `Shape -> Gather -> Unsqueeze -> Concat -> Reshape` flatten is resolved
//!   without knowing the batch size.
//!
//! Patterns become single layers: `MatMul` + `Add` of a constant (dense with bias), `Sigmoid` +
//! `Mul` (SiLU), the erf formula of GELU (`fold.rs`), `Reshape` + `InstanceNormalization` +
//! `Reshape` + `Mul` + `Add` (GroupNorm, `norm.rs`). Layers made and then absorbed by a pattern
//! are dropped at the end (`graph.rs`) with every other layer the output does not depend on.
//!
//! go-metal's files (`producer_name` "go-metal") are read to go-metal's meaning: `MatMul`'s `B`
//! is the dense weight already in `[out, in]` (go-metal's importer transposes it back), its
//! input may be the 4-D convolution output (go-metal's dense flattens), and batch norm's
//! `momentum` is in PyTorch's convention.

use super::proto::NodeProto;
use super::read::{
    self, Attrs, Const, ConstData, check_auto_pad, ints_usize, pair, sanitize_name, symmetric_pads, transpose,
};
use crate::model::{Activation, Conv2d, ConvTranspose2d, Layer, Linear, Node, Padding, ParamRole, Pool2d};
use std::collections::{HashMap, HashSet};

/// The operators kiln imports (some only in the patterns `import.rs` describes).
pub(super) const SUPPORTED_OPS: &[&str] = &[
    "Constant",
    "Identity",
    "Dropout",
    "Cast",
    "Shape",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Concat",
    "Slice",
    "Transpose",
    "Reshape",
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "Add",
    "Sum",
    "Mul",
    "Div",
    "Erf",
    "Relu",
    "Sigmoid",
    "Tanh",
    "LeakyRelu",
    "Elu",
    "Gelu",
    "Softmax",
    "BatchNormalization",
    "InstanceNormalization",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "ReduceMean",
    "Flatten",
];

pub(super) const UNSUPPORTED: &str = "this operator is not supported";

pub(super) type Res<T> = std::result::Result<T, String>;

/// One element of a shape value: a known integer or the batch size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Sym {
    Known(i64),
    Batch,
}

/// What an ONNX tensor is during the import.
#[derive(Clone, Debug)]
pub(super) enum Val {
    /// The output of kiln node `node`, whose per-sample shape in ONNX is `shape`.
    Act {
        node: usize,
        shape: Vec<usize>,
    },
    Const(Const),
    /// A 0-D (`dims` empty) or 1-D integer tensor that may hold the batch size.
    Shape {
        dims: Vec<usize>,
        vals: Vec<Sym>,
    },
    /// Part of GELU's erf formula applied to kiln node `x` (see `fold.rs`).
    Gelu {
        stage: GeluStage,
        x: usize,
        shape: Vec<usize>,
    },
    /// Made by a node kiln cannot import (reported once, at that node).
    Poison,
}

/// How far along GELU's formula `x * 0.5 * (1 + erf(x / sqrt(2)))` a tensor is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum GeluStage {
    /// `x / sqrt(2)`
    Scaled,
    /// `erf(x / sqrt(2))`
    Erf,
    /// `1 + erf(x / sqrt(2))`
    OnePlusErf,
    /// `x * (1 + erf(x / sqrt(2)))`
    TimesX,
    /// `0.5 * x`
    HalfX,
    /// `0.5 * (1 + erf(x / sqrt(2)))`
    HalfOnePlusErf,
}

/// The parameters of one kiln node, by role.
#[derive(Clone, Debug, Default)]
pub(super) struct Params(Vec<(ParamRole, Vec<f32>)>);

impl Params {
    pub fn new() -> Self {
        Params(Vec::new())
    }

    pub(super) fn insert(&mut self, role: ParamRole, v: Vec<f32>) {
        self.0.retain(|(r, _)| *r != role);
        self.0.push((role, v));
    }

    pub(super) fn get(&self, role: &ParamRole) -> Option<&Vec<f32>> {
        self.0.iter().find(|(r, _)| r == role).map(|(_, v)| v)
    }

    pub(super) fn get_mut(&mut self, role: &ParamRole) -> Option<&mut Vec<f32>> {
        self.0.iter_mut().find(|(r, _)| r == role).map(|(_, v)| v)
    }
}

/// The import's state: what each ONNX tensor is, and the kiln layers made so far.
pub(super) struct Importer<'a> {
    /// The file is go-metal's (see the module comment).
    pub go_metal: bool,
    /// The batch size fixed in the input's shape, if it is.
    pub fixed_batch: Option<usize>,
    /// Each ONNX tensor's meaning, by name.
    pub vals: HashMap<String, Val>,
    /// The kiln layers made so far (node 0 is the input).
    pub nodes: Vec<Node>,
    /// Their parameters, by role (index as `nodes`).
    pub params: Vec<Params>,
    /// The layer names taken.
    pub names: HashSet<String>,
    /// How many nodes (and graph outputs) read each tensor.
    pub uses: HashMap<&'a str, usize>,
    /// For each kiln node, how many of those reads were by nodes whose output is the same
    /// kiln node (a reshape of its ONNX shape, an identity, a bias folded into it): such a read
    /// is not another consumer of the value.
    pub alias_reads: HashMap<usize, usize>,
}

impl<'a> Importer<'a> {
    pub fn val(&self, name: &str) -> Res<Val> {
        if name.is_empty() {
            return Err("an optional input is missing where one is required".into());
        }
        self.vals.get(name).cloned().ok_or_else(|| format!("input '{name}' is not known"))
    }

    pub fn input(&self, node: &NodeProto, k: usize) -> Res<Val> {
        match node.input.get(k) {
            Some(n) => self.val(n),
            None => Err(format!("has {} inputs, needs at least {}", node.input.len(), k + 1)),
        }
    }

    pub fn opt_input(&self, node: &NodeProto, k: usize) -> Res<Option<Val>> {
        match node.input.get(k) {
            Some(n) if !n.is_empty() => self.val(n).map(Some),
            _ => Ok(None),
        }
    }

    pub(super) fn act(&self, node: &NodeProto, k: usize) -> Res<(usize, Vec<usize>)> {
        match self.input(node, k)? {
            Val::Act { node, shape } => Ok((node, shape)),
            _ => Err(format!("input {k} must be computed from the model's input, not a constant")),
        }
    }

    pub(super) fn weight(&self, node: &NodeProto, k: usize, what: &str) -> Res<Const> {
        match self.input(node, k)? {
            Val::Const(c) if c.floats().is_some() => Ok(c),
            _ => Err(format!("{what} (input {k}) must be a float constant (an initializer)")),
        }
    }

    fn unique_name(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut k = 2;
        while self.names.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        self.names.insert(name.clone());
        name
    }

    /// Appends a kiln layer reading `inputs`, checking its shape as the builder does.
    pub fn add(&mut self, base: &str, layer: Layer, inputs: Vec<usize>, params: Params) -> Res<usize> {
        let name = self.unique_name(base);
        let ins: Vec<&[usize]> = inputs.iter().map(|&j| self.nodes[j].shape.as_slice()).collect();
        let shape = crate::model::shape::infer(&name, &layer, &ins).map_err(|e| e.to_string())?;
        if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none_or(|n| n > 1 << 32) {
            return Err(format!("output shape {shape:?} is too large"));
        }
        self.nodes.push(Node { name, layer, inputs, shape });
        self.params.push(params);
        Ok(self.nodes.len() - 1)
    }

    /// A kiln node holding activation `(node, shape)` in exactly the ONNX shape.
    pub(super) fn exact(&mut self, node: usize, shape: &[usize]) -> Res<usize> {
        if self.nodes[node].shape == shape {
            return Ok(node);
        }
        let base = format!("{}/reshape", self.nodes[node].name);
        self.add(&base, Layer::Reshape(shape.to_vec()), vec![node], Params::new())
    }

    pub fn set(&mut self, node: &NodeProto, k: usize, v: Val) {
        if let Val::Act { node: n, .. } = v {
            let reads = node
                .input
                .iter()
                .filter(|i| matches!(self.vals.get(i.as_str()), Some(Val::Act { node: m, .. }) if *m == n))
                .count();
            *self.alias_reads.entry(n).or_default() += reads;
        }
        if let Some(o) = node.output.get(k).filter(|o| !o.is_empty()) {
            self.vals.insert(o.clone(), v);
        }
    }

    pub(super) fn used(&self, node: &NodeProto, k: usize) -> bool {
        node.output.get(k).is_some_and(|o| !o.is_empty() && self.uses.get(o.as_str()).copied().unwrap_or(0) > 0)
    }

    pub(super) fn name_for(&self, node: &NodeProto, weight_input: Option<usize>, fallback: &str) -> String {
        if let Some(k) = weight_input
            && let Some(w) = node.input.get(k)
            && let Some(stem) = w.strip_suffix(".weight")
            && !stem.is_empty()
        {
            return stem.to_string();
        }
        sanitize_name(node).unwrap_or_else(|| fallback.to_string())
    }

    /// Imports one node; its outputs are set on success.
    pub(super) fn node(&mut self, node: &NodeProto) -> Res<()> {
        let op = node.op_type.as_deref().unwrap_or("");
        let a = Attrs::new(node);
        let lower = op.to_ascii_lowercase();
        let name = self.name_for(node, None, &lower);
        match op {
            "Constant" => {
                let c = if let Some(t) = a.tensor("value")? {
                    read::read_tensor(t, None)?
                } else if a.has("value_float") {
                    Const { dims: vec![], data: ConstData::F32(vec![a.float("value_float", 0.0)?]) }
                } else if let Some(v) = a.floats("value_floats")? {
                    Const { dims: vec![v.len()], data: ConstData::F32(v) }
                } else if a.has("value_int") {
                    Const { dims: vec![], data: ConstData::I64(vec![a.int("value_int", 0)?]) }
                } else if let Some(v) = a.ints("value_ints")? {
                    Const { dims: vec![v.len()], data: ConstData::I64(v) }
                } else {
                    return Err("a Constant without a supported value attribute".into());
                };
                self.set(node, 0, Val::Const(c));
            }
            "Identity" | "Dropout" => {
                if op == "Dropout"
                    && let Some(t) = self.opt_input(node, 2)?
                    && !matches!(&t, Val::Const(c) if matches!(&c.data, ConstData::I64(v) if v.iter().all(|&b| b == 0)))
                {
                    return Err("training_mode must be a constant false".into());
                }
                if self.used(node, 1) {
                    return Err("its mask output is used".into());
                }
                let v = self.input(node, 0)?;
                self.set(node, 0, v);
            }
            "Cast" => {
                let to = a.int("to", 0)?;
                let v = self.input(node, 0)?;
                let out = match (v, to) {
                    (v @ Val::Act { .. }, 1) => v,
                    (Val::Const(c), 1) => Val::Const(Const {
                        data: ConstData::F32(match c.data {
                            ConstData::F32(f) => f,
                            ConstData::I64(i) => i.iter().map(|&x| x as f32).collect(),
                        }),
                        dims: c.dims,
                    }),
                    (Val::Const(c), 6 | 7) => Val::Const(Const {
                        data: ConstData::I64(match c.data {
                            ConstData::F32(f) => f.iter().map(|&x| x as i64).collect(),
                            ConstData::I64(i) => i,
                        }),
                        dims: c.dims,
                    }),
                    (v @ Val::Shape { .. }, 6 | 7) => v,
                    _ => return Err(format!("cast to type {to} is not supported here")),
                };
                self.set(node, 0, out);
            }
            "Shape" => {
                let (_, shape) = self.act(node, 0)?;
                let mut full = vec![Sym::Batch];
                full.extend(shape.iter().map(|&d| Sym::Known(d as i64)));
                let r = full.len() as i64;
                let clamp = |x: i64| if x < 0 { (x + r).clamp(0, r) } else { x.min(r) } as usize;
                let (s, e) = (clamp(a.int("start", 0)?), clamp(a.int("end", r)?));
                let vals = if s < e { full[s..e].to_vec() } else { vec![] };
                self.set(node, 0, Val::Shape { dims: vec![vals.len()], vals });
            }
            "Gather" | "Unsqueeze" | "Squeeze" | "Concat" | "Slice" | "Transpose" | "Reshape"
                if self.all_static(node) =>
            {
                let v = super::fold::fold(self, node, &a)?;
                self.set(node, 0, v);
            }
            "Conv" => {
                let (x, xs) = self.act(node, 0)?;
                let w = self.weight(node, 1, "the weight")?;
                let b = self.opt_input(node, 2)?;
                check_auto_pad(&a)?;
                if w.dims.len() != 4 {
                    return Err(format!("only 2-D convolutions are supported (weight shape {:?})", w.dims));
                }
                let kernel = pair("kernel_shape", a.ints("kernel_shape")?, 0)?;
                let kernel = if kernel == (0, 0) { (w.dims[2], w.dims[3]) } else { kernel };
                if kernel != (w.dims[2], w.dims[3]) {
                    return Err(format!("kernel_shape {kernel:?} differs from the weight's {:?}", w.dims));
                }
                let (ph, pw) = symmetric_pads(a.ints("pads")?)?;
                let conv = Conv2d {
                    out_channels: w.dims[0],
                    kernel,
                    stride: pair("strides", a.ints("strides")?, 1)?,
                    padding: Padding::Explicit(ph, pw),
                    dilation: pair("dilations", a.ints("dilations")?, 1)?,
                    groups: ints_usize("group", &[a.int("group", 1)?])?[0],
                    bias: b.is_some(),
                };
                let mut p = Params::new();
                p.insert(ParamRole::Weight, w.floats().unwrap_or_default().to_vec());
                if let Some(b) = b {
                    match b {
                        Val::Const(c) if c.floats().is_some() && c.len() == w.dims[0] => {
                            p.insert(ParamRole::Bias, c.floats().unwrap_or_default().to_vec());
                        }
                        _ => return Err(format!("the bias must be a float constant of {} values", w.dims[0])),
                    }
                }
                let x = self.exact(x, &xs)?;
                if self.nodes[x].shape.len() != 3 || self.nodes[x].shape[0] != w.dims[1] * conv.groups {
                    return Err(format!(
                        "weight {:?} with {} groups does not fit input {:?}",
                        w.dims, conv.groups, self.nodes[x].shape
                    ));
                }
                let name = self.name_for(node, Some(1), "conv");
                let n = self.add(&name, Layer::Conv2d(conv), vec![x], p)?;
                let shape = self.nodes[n].shape.clone();
                self.set(node, 0, Val::Act { node: n, shape });
            }
            "ConvTranspose" => self.conv_transpose(node, &a)?,
            "Gemm" => {
                let (x, xs) = self.act(node, 0)?;
                let w = self.weight(node, 1, "B")?;
                if a.int("transA", 0)? != 0 {
                    return Err("transA = 1 is not supported".into());
                }
                if xs.len() != 1 || w.dims.len() != 2 {
                    return Err(format!("needs a [batch, features] input and a 2-D B, got {xs:?} and {:?}", w.dims));
                }
                let (alpha, beta) = (a.float("alpha", 1.0)?, a.float("beta", 1.0)?);
                let wf = w.floats().unwrap_or_default();
                let (out, inp, mut wv) = if a.int("transB", 0)? != 0 {
                    (w.dims[0], w.dims[1], wf.to_vec())
                } else {
                    (w.dims[1], w.dims[0], transpose(wf, w.dims[0], w.dims[1]))
                };
                if inp != xs[0] {
                    return Err(format!("B {:?} does not fit an input of {} features", w.dims, xs[0]));
                }
                wv.iter_mut().for_each(|v| *v *= alpha);
                let bias = match self.opt_input(node, 2)? {
                    None => None,
                    Some(Val::Const(c)) if c.floats().is_some() && (c.len() == out || c.len() == 1) => {
                        let f = c.floats().unwrap_or_default();
                        Some((0..out).map(|j| beta * f[if f.len() == 1 { 0 } else { j }]).collect::<Vec<f32>>())
                    }
                    Some(_) => return Err(format!("C must be a float constant of {out} values")),
                };
                let name = self.name_for(node, Some(1), "dense");
                self.linear(node, &name, x, out, wv, bias)?;
            }
            "MatMul" => {
                let (x, xs) = self.act(node, 0)?;
                let w = self.weight(node, 1, "B")?;
                if w.dims.len() != 2 {
                    return Err(format!("B must be 2-D, got {:?}", w.dims));
                }
                let wf = w.floats().unwrap_or_default();
                let features: usize = xs.iter().product();
                let (out, wv) = if self.go_metal {
                    // go-metal stores the dense weight as [out, in] (its importer transposes it back).
                    if w.dims[1] != features {
                        return Err(format!(
                            "go-metal dense weight {:?} does not fit {features} input features",
                            w.dims
                        ));
                    }
                    (w.dims[0], wf.to_vec())
                } else {
                    if xs.len() != 1 || w.dims[0] != xs[0] {
                        return Err(format!(
                            "only [batch, features] x [features, out] is supported, got {xs:?} x {:?}",
                            w.dims
                        ));
                    }
                    (w.dims[1], transpose(wf, w.dims[0], w.dims[1]))
                };
                let name = self.name_for(node, Some(1), "dense");
                self.linear(node, &name, x, out, wv, None)?;
            }
            "Add" | "Sum" => self.add_node(node, op, &name)?,
            "Mul" => self.mul_node(node, &name)?,
            "Div" | "Erf" => super::fold::gelu_part(self, node, op)?,
            "Relu" | "Sigmoid" | "Tanh" | "LeakyRelu" | "Elu" | "Gelu" => {
                let act = match op {
                    "Relu" => Activation::Relu,
                    "Sigmoid" => Activation::Sigmoid,
                    "Tanh" => Activation::Tanh,
                    "LeakyRelu" => Activation::LeakyRelu { slope: a.float("alpha", 0.01)? },
                    "Elu" => Activation::Elu { alpha: a.float("alpha", 1.0)? },
                    _ => match a.string("approximate")?.as_deref() {
                        None | Some("none") => Activation::Gelu,
                        Some(m) => {
                            return Err(format!("GELU approximation '{m}' is not supported (kiln has the exact one)"));
                        }
                    },
                };
                let (x, xs) = self.act(node, 0)?;
                let n = self.add(&name, Layer::Activation(act), vec![x], Params::new())?;
                self.set(node, 0, Val::Act { node: n, shape: xs });
            }
            "Softmax" => {
                let (x, xs) = self.act(node, 0)?;
                let rank = xs.len() as i64 + 1;
                let axis = a.int("axis", -1)?;
                if axis < -rank || axis >= rank {
                    return Err(format!("axis {axis} is out of range for rank {rank}"));
                }
                let x = self.exact(x, &xs)?;
                let n = self.add(&name, Layer::Softmax { axis: axis as isize }, vec![x], Params::new())?;
                self.set(node, 0, Val::Act { node: n, shape: xs });
            }
            "BatchNormalization" => self.batch_norm(node, &a)?,
            "InstanceNormalization" => self.instance_norm(node, &a)?,
            "MaxPool" | "AveragePool" => {
                check_auto_pad(&a)?;
                if self.used(node, 1) {
                    return Err("its indices output is used".into());
                }
                let (x, xs) = self.act(node, 0)?;
                if xs.len() != 3 {
                    return Err(format!("needs a [batch, C, H, W] input, got per-sample {xs:?}"));
                }
                let kernel = pair("kernel_shape", a.ints("kernel_shape")?, 0)?;
                if pair("dilations", a.ints("dilations")?, 1)? != (1, 1) {
                    return Err("dilated pooling is not supported".into());
                }
                let pool = Pool2d {
                    kernel,
                    stride: pair("strides", a.ints("strides")?, 1)?,
                    padding: symmetric_pads(a.ints("pads")?)?,
                    count_include_pad: a.int("count_include_pad", 0)? != 0,
                };
                if a.int("ceil_mode", 0)? != 0 {
                    // Ceil mode only matters when it adds a window; kiln has floor mode.
                    for (len, k, s, p) in [
                        (xs[1], kernel.0, pool.stride.0, pool.padding.0),
                        (xs[2], kernel.1, pool.stride.1, pool.padding.1),
                    ] {
                        if s > 0 && (len + 2 * p).checked_sub(k).is_some_and(|r| r % s != 0) {
                            return Err("ceil_mode = 1 changes the output size here; kiln pools in floor mode".into());
                        }
                    }
                }
                let layer = if op == "MaxPool" { Layer::MaxPool2d(pool) } else { Layer::AvgPool2d(pool) };
                let x = self.exact(x, &xs)?;
                let n = self.add(&name, layer, vec![x], Params::new())?;
                let shape = self.nodes[n].shape.clone();
                self.set(node, 0, Val::Act { node: n, shape });
            }
            "GlobalAveragePool" | "ReduceMean" => {
                let (x, xs) = self.act(node, 0)?;
                let keep = a.int("keepdims", 1)? != 0;
                if op == "ReduceMean" {
                    let axes = match self.opt_input(node, 1)? {
                        Some(Val::Const(Const { data: ConstData::I64(v), .. })) => v,
                        Some(Val::Shape { vals, .. }) if vals.iter().all(|v| matches!(v, Sym::Known(_))) => {
                            vals.iter().map(|v| if let Sym::Known(k) = v { *k } else { 0 }).collect()
                        }
                        Some(_) => return Err("axes must be constant".into()),
                        None => a.ints("axes")?.unwrap_or_default(),
                    };
                    let mut axes: Vec<i64> = axes.iter().map(|&v| if v < 0 { v + 4 } else { v }).collect();
                    axes.sort();
                    if xs.len() != 3 || axes != [2, 3] {
                        return Err(format!("only the mean over height and width is supported (axes {axes:?})"));
                    }
                }
                if xs.len() != 3 {
                    return Err(format!("needs a [batch, C, H, W] input, got per-sample {xs:?}"));
                }
                let x = self.exact(x, &xs)?;
                let n = self.add(&name, Layer::GlobalAvgPool, vec![x], Params::new())?;
                let shape = if keep || op == "GlobalAveragePool" { vec![xs[0], 1, 1] } else { vec![xs[0]] };
                self.set(node, 0, Val::Act { node: n, shape });
            }
            "Flatten" => {
                let (x, xs) = self.act(node, 0)?;
                let rank = xs.len() as i64 + 1;
                let axis = a.int("axis", 1)?;
                if axis != 1 && axis != 1 - rank {
                    return Err(format!("only axis 1 is supported, got {axis}"));
                }
                let flat = vec![xs.iter().product()];
                self.reshape_to(node, &name, x, flat)?;
            }
            "Reshape" | "Squeeze" | "Unsqueeze" => {
                let (x, xs) = self.act(node, 0)?;
                let target = super::fold::target_shape(self, node, &a, op, &xs)?;
                if op == "Reshape" {
                    self.reshape_to(node, &name, x, target)?;
                } else {
                    self.set(node, 0, Val::Act { node: x, shape: target });
                }
            }
            "Concat" => {
                let mut ins = Vec::new();
                let mut shapes = Vec::new();
                for k in 0..node.input.len() {
                    let (x, xs) = self.act(node, k)?;
                    ins.push(self.exact(x, &xs)?);
                    shapes.push(xs);
                }
                let rank = shapes.first().map_or(0, |s| s.len() as i64 + 1);
                let axis = a.int("axis", 1)?;
                if axis != 1 && axis != 1 - rank {
                    return Err(format!("only concatenation along axis 1 (channels) is supported, got {axis}"));
                }
                let n = self.add(&name, Layer::Concat, ins, Params::new())?;
                let shape = self.nodes[n].shape.clone();
                self.set(node, 0, Val::Act { node: n, shape });
            }
            _ => return Err(UNSUPPORTED.into()),
        }
        Ok(())
    }

    /// `ConvTranspose` (2-D, explicit symmetric pads, `output_padding`) as kiln's
    /// ConvTranspose2d; the weight is `[in, out / group, kh, kw]` in both.
    fn conv_transpose(&mut self, node: &NodeProto, a: &Attrs) -> Res<()> {
        let (x, xs) = self.act(node, 0)?;
        let w = self.weight(node, 1, "the weight")?;
        check_auto_pad(a)?;
        if a.has("output_shape") {
            return Err("output_shape is not supported (pads and output_padding are)".into());
        }
        if w.dims.len() != 4 {
            return Err(format!("only 2-D transposed convolutions are supported (weight shape {:?})", w.dims));
        }
        let kernel = pair("kernel_shape", a.ints("kernel_shape")?, 0)?;
        let kernel = if kernel == (0, 0) { (w.dims[2], w.dims[3]) } else { kernel };
        if kernel != (w.dims[2], w.dims[3]) {
            return Err(format!("kernel_shape {kernel:?} differs from the weight's {:?}", w.dims));
        }
        let groups = ints_usize("group", &[a.int("group", 1)?])?[0];
        let conv = ConvTranspose2d {
            out_channels: w.dims[1] * groups,
            kernel,
            stride: pair("strides", a.ints("strides")?, 1)?,
            padding: symmetric_pads(a.ints("pads")?)?,
            output_padding: pair("output_padding", a.ints("output_padding")?, 0)?,
            dilation: pair("dilations", a.ints("dilations")?, 1)?,
            groups,
            bias: false,
        };
        let x = self.exact(x, &xs)?;
        if self.nodes[x].shape.len() != 3 || self.nodes[x].shape[0] != w.dims[0] {
            return Err(format!("weight {:?} does not fit input {:?}", w.dims, self.nodes[x].shape));
        }
        let mut p = Params::new();
        p.insert(ParamRole::Weight, w.floats().unwrap_or_default().to_vec());
        let conv = match self.opt_input(node, 2)? {
            None => conv,
            Some(Val::Const(c)) if c.floats().is_some() && c.len() == conv.out_channels => {
                p.insert(ParamRole::Bias, c.floats().unwrap_or_default().to_vec());
                ConvTranspose2d { bias: true, ..conv }
            }
            Some(_) => return Err(format!("the bias must be a float constant of {} values", conv.out_channels)),
        };
        let name = self.name_for(node, Some(1), "conv_transpose");
        let n = self.add(&name, Layer::ConvTranspose2d(conv), vec![x], p)?;
        let shape = self.nodes[n].shape.clone();
        self.set(node, 0, Val::Act { node: n, shape });
        Ok(())
    }

    /// Whether every input of `node` is a constant or a shape value (so it can be folded).
    fn all_static(&self, node: &NodeProto) -> bool {
        node.input
            .iter()
            .filter(|i| !i.is_empty())
            .all(|i| matches!(self.vals.get(i.as_str()), Some(Val::Const(_) | Val::Shape { .. })))
    }

    fn reshape_to(&mut self, node: &NodeProto, name: &str, x: usize, target: Vec<usize>) -> Res<()> {
        let have: usize = self.nodes[x].shape.iter().product();
        if have != target.iter().product::<usize>() {
            return Err(format!("cannot reshape {:?} into {target:?}", self.nodes[x].shape));
        }
        // Only the ONNX shape changes; a layer that needs it materialised gets a Reshape then.
        // A flatten is kept as a layer of its own (it names the step, as PyTorch's model has it).
        let n = if target.len() == 1 && self.nodes[x].shape.len() > 1 {
            self.add(name, Layer::Flatten, vec![x], Params::new())?
        } else {
            x
        };
        self.set(node, 0, Val::Act { node: n, shape: target });
        Ok(())
    }

    fn linear(
        &mut self,
        node: &NodeProto,
        name: &str,
        x: usize,
        out: usize,
        w: Vec<f32>,
        bias: Option<Vec<f32>>,
    ) -> Res<()> {
        let mut p = Params::new();
        p.insert(ParamRole::Weight, w);
        let has_bias = bias.is_some();
        if let Some(b) = bias {
            p.insert(ParamRole::Bias, b);
        }
        let n = self.add(name, Layer::Linear(Linear { out_features: out, bias: has_bias }), vec![x], p)?;
        self.set(node, 0, Val::Act { node: n, shape: vec![out] });
        Ok(())
    }

    fn add_node(&mut self, node: &NodeProto, op: &str, name: &str) -> Res<()> {
        let vals: Vec<Val> = (0..node.input.len()).map(|k| self.input(node, k)).collect::<Res<_>>()?;
        if vals.len() < 2 {
            return Err("needs at least two inputs".into());
        }
        if vals.iter().any(|v| matches!(v, Val::Gelu { .. })) {
            return super::fold::gelu_add(self, node, &vals);
        }
        match vals.as_slice() {
            [Val::Act { node: x, shape }, Val::Const(c)] | [Val::Const(c), Val::Act { node: x, shape }]
                if op == "Add" =>
            {
                let (x, shape) = (*x, shape.clone());
                self.fuse_bias(node, x, shape, c)
            }
            _ => {
                let mut ins = Vec::new();
                let mut shape = Vec::new();
                for v in &vals {
                    match v {
                        Val::Act { node: x, shape: s } => {
                            ins.push(self.exact(*x, s)?);
                            shape = s.clone();
                        }
                        _ => return Err("adding a constant to a value is only supported as a layer's bias".into()),
                    }
                }
                let n = self.add(name, Layer::Add, ins, Params::new())?;
                self.set(node, 0, Val::Act { node: n, shape });
                Ok(())
            }
        }
    }

    /// `x + c` where `x` is a dense layer or convolution without bias that nothing else reads
    /// and `c` fits as its bias: the bias is set on that layer.
    fn fuse_bias(&mut self, node: &NodeProto, x: usize, shape: Vec<usize>, c: &Const) -> Res<()> {
        if self.fold_norm_shift(node, x, &shape, c)? {
            return Ok(());
        }
        let single_use = self.producer_uses(x) <= 1;
        let f = c.floats().ok_or("the added constant must be float")?;
        let ok = match &mut self.nodes[x].layer {
            Layer::Linear(l) if !l.bias && single_use && f.len() == l.out_features => {
                l.bias = true;
                true
            }
            Layer::Conv2d(cv) if !cv.bias && single_use && f.len() == cv.out_channels && c.dims.len() >= 3 => {
                cv.bias = true;
                true
            }
            _ => false,
        };
        if !ok {
            return Err(
                "adding a constant to a value is only supported as the bias of a dense layer or convolution".into()
            );
        }
        self.params[x].insert(ParamRole::Bias, f.to_vec());
        self.set(node, 0, Val::Act { node: x, shape });
        Ok(())
    }

    /// How many ONNX nodes (and graph outputs) read kiln node `x`'s value, through any of its
    /// tensors, not counting reads that only rename or reshape it.
    pub(super) fn producer_uses(&self, x: usize) -> usize {
        let reads: usize = self
            .vals
            .iter()
            .filter(|(_, v)| matches!(v, Val::Act { node, .. } if *node == x))
            .map(|(k, _)| self.uses.get(k.as_str()).copied().unwrap_or(0))
            .sum();
        reads.saturating_sub(self.alias_reads.get(&x).copied().unwrap_or(0))
    }

    fn mul_node(&mut self, node: &NodeProto, name: &str) -> Res<()> {
        let (p, q) = (self.input(node, 0)?, self.input(node, 1)?);
        if self.fold_norm_scale(node, &p, &q)? {
            return Ok(());
        }
        if let (Val::Act { node: a, shape: sa }, Val::Act { node: b, shape: sb }) = (&p, &q) {
            // x * sigmoid(x) is SiLU.
            for (x, s, xs) in [(*a, *b, sa), (*b, *a, sb)] {
                let n = &self.nodes[s];
                if n.layer == Layer::Activation(Activation::Sigmoid) && n.inputs == [x] {
                    let m = self.add(name, Layer::Activation(Activation::Silu), vec![x], Params::new())?;
                    self.set(node, 0, Val::Act { node: m, shape: xs.clone() });
                    return Ok(());
                }
            }
        }
        super::fold::gelu_mul(self, node, p, q)
    }
}
