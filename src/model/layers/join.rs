//! Add and Concat, whole: the joins of residual and Inception blocks (`ModelBuilder::residual`,
//! `concat`): shape rules, FLOPs and lowering to ops. Their kernels are `backend/cpu/join.rs`
//! and `backend/cuda/join.rs`.

use super::LayerKind;
use crate::backend::{GradOut, Op, ops};
use crate::model::lower::{Backward, Forward};
use crate::model::shape::dims_str;
use crate::model::{Branch, Layer, ModelBuilder};
use crate::{Error, Result};

/// Add's shape rule: two or more inputs of one shape, which is the output's.
pub(crate) fn infer_add(name: &str, inputs: &[&[usize]]) -> Result<Vec<usize>> {
    if inputs.len() < 2 {
        return Err(Error::layer(name, format!("add needs at least two inputs, got {}", inputs.len())));
    }
    for x in &inputs[1..] {
        if *x != inputs[0] {
            return Err(Error::layer(
                name,
                format!(
                    "cannot add branches of shapes {} and {} (per sample); \
                     a projection shortcut can match them",
                    dims_str(inputs[0]),
                    dims_str(x)
                ),
            ));
        }
    }
    Ok(inputs[0].to_vec())
}

/// Concat's shape rule: two or more inputs equal but in their first (channel or feature) axis;
/// the output's channels are the sum of theirs.
pub(crate) fn infer_concat(name: &str, inputs: &[&[usize]]) -> Result<Vec<usize>> {
    if inputs.len() < 2 {
        return Err(Error::layer(name, format!("concat needs at least two inputs, got {}", inputs.len())));
    }
    let first = inputs[0];
    let mut channels = 0;
    for x in inputs {
        if x.len() != first.len() || x[1..] != first[1..] {
            return Err(Error::layer(
                name,
                format!(
                    "cannot concatenate branches of shapes {} and {} along channels: \
                     all other dimensions must match",
                    dims_str(first),
                    dims_str(x)
                ),
            ));
        }
        channels += x[0];
    }
    let mut out = first.to_vec();
    out[0] = channels;
    Ok(out)
}

/// Add's forward FLOPs per sample: one per output value and input after the first.
pub(crate) fn add_flops(out: u64, inputs: usize) -> u64 {
    out * (inputs as u64 - 1)
}

/// Add forward: one [`Op::Add`] of all inputs.
pub(crate) fn add_forward(cx: &mut Forward<'_>) -> Result<()> {
    let y = cx.output();
    cx.push(Op::Add(ops::Add { len: cx.numel(), inputs: cx.inputs().to_vec(), y }));
    Ok(())
}

/// Add backward: the output gradient into each input's gradient that is wanted
/// ([`Op::GradInto`]).
pub(crate) fn add_backward(cx: &mut Backward<'_>) -> Result<()> {
    let dy = cx.dy();
    for k in 0..cx.inputs.len() {
        if let Some(dst) = cx.dx(k) {
            cx.push(Op::GradInto(ops::GradInto { len: cx.numel(), src: dy, dst }));
        }
    }
    Ok(())
}

/// Concat forward: one [`Op::Concat`] along the first axis after the batch.
pub(crate) fn concat_forward(cx: &mut Forward<'_>) -> Result<()> {
    let y = cx.output();
    let inner = cx.node.shape[1..].iter().product();
    let parts = cx.inputs.iter().zip(&cx.in_shapes).map(|(&b, s)| (b, s[0])).collect();
    cx.push(Op::Concat(ops::Concat { n: cx.batch, inner, parts, y }));
    Ok(())
}

/// Concat backward: one [`Op::ConcatBackward`] splitting the gradient into the inputs that want
/// theirs.
pub(crate) fn concat_backward(cx: &mut Backward<'_>) -> Result<()> {
    let parts: Vec<(Option<GradOut>, usize)> = (0..cx.inputs.len()).map(|k| (cx.dx(k), cx.in_shapes[k][0])).collect();
    if parts.iter().any(|p| p.0.is_some()) {
        let inner = cx.node.shape[1..].iter().product();
        cx.push(Op::ConcatBackward(ops::ConcatBackward { n: cx.batch, inner, parts, dy: cx.dy() }));
    }
    Ok(())
}

/// Add's kind (no spec type: `residual` blocks make it).
pub(crate) struct Add;

/// Concat's kind (no spec type: `concat` blocks make it).
pub(crate) struct Concat;

/// The builder methods of this home's layers.
impl ModelBuilder {
    /// A residual block with an identity shortcut: `y = main(x) + x`.
    pub fn residual(self, main: impl FnOnce(ModelBuilder) -> ModelBuilder) -> Self {
        self.residual_with(main, |shortcut| shortcut)
    }

    /// A residual block with a shortcut path of its own (a projection such as a strided 1x1
    /// convolution and batch norm): `y = main(x) + shortcut(x)`.
    pub fn residual_with(
        self,
        main: impl FnOnce(ModelBuilder) -> ModelBuilder,
        shortcut: impl FnOnce(ModelBuilder) -> ModelBuilder,
    ) -> Self {
        let fork = self.cursor();
        let (b, main_end) = self.run_branch(fork, main);
        let (b, short_end) = b.run_branch(fork, shortcut);
        b.join(Layer::Add, vec![main_end, short_end])
    }

    /// Parallel branches from the current layer, concatenated along channels:
    /// `.concat([branch(|b| b.conv2d(64, 1)), branch(|b| b.max_pool2d_with(..).conv2d(32, 1))])`.
    pub fn concat<'a>(self, branches: impl IntoIterator<Item = Branch<'a>>) -> Self {
        let fork = self.cursor();
        let mut b = self;
        let mut ends = Vec::new();
        for Branch(f) in branches {
            let (nb, end) = b.run_branch(fork, f);
            b = nb;
            ends.push(end);
        }
        b.join(Layer::Concat, ends)
    }
}

impl LayerKind for Add {
    fn type_name(&self) -> &'static str {
        "add"
    }
    fn display_type(&self) -> String {
        "Add".into()
    }
    fn infer_inputs(&self, name: &str, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        infer_add(name, inputs)
    }
    fn infer(&self, name: &str, input: &[usize]) -> Result<Vec<usize>> {
        infer_add(name, &[input])
    }
    fn flops(&self, _input: &[usize], out: u64, inputs: usize) -> u64 {
        add_flops(out, inputs)
    }
    fn forward(&self, cx: &mut Forward<'_>) -> Result<()> {
        add_forward(cx)
    }
    fn backward(&self, cx: &mut Backward<'_>) -> Result<()> {
        add_backward(cx)
    }
}

impl LayerKind for Concat {
    fn type_name(&self) -> &'static str {
        "concat"
    }
    fn display_type(&self) -> String {
        "Concat".into()
    }
    fn infer_inputs(&self, name: &str, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        infer_concat(name, inputs)
    }
    fn infer(&self, name: &str, input: &[usize]) -> Result<Vec<usize>> {
        infer_concat(name, &[input])
    }
    fn flops(&self, _input: &[usize], _out: u64, _inputs: usize) -> u64 {
        0
    }
    fn forward(&self, cx: &mut Forward<'_>) -> Result<()> {
        concat_forward(cx)
    }
    fn backward(&self, cx: &mut Backward<'_>) -> Result<()> {
        concat_backward(cx)
    }
}
