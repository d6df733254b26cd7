//! ConvTranspose2d, whole: options, shape rule, parameters (PyTorch's `nn.ConvTranspose2d`
//! names, layout and initial values), FLOPs, summary detail and lowering to ops. Its kernels are
//! `backend/cpu/conv_transpose2d.rs` and `backend/cuda/conv_transpose2d.rs` (cuDNN); its ops
//! `backend/ops/conv_transpose.rs`; its tests the `conv_transpose2d*` cases of tests/corpus.
//!
//! ```
//! use kiln::model::{ConvTranspose2d, ModelBuilder};
//! let model = ModelBuilder::new(&[2, 8, 5, 5])
//!     .conv_transpose2d(4, 2) // 5x5 -> 6x6
//!     .conv_transpose2d_with(ConvTranspose2d::new(2, 3).stride(2).padding(1).output_padding(1))
//!     .build()
//!     .unwrap();
//! assert_eq!(model.output_shape(), &[2, 2, 12, 12]);
//! // weight [in, out/groups, kh, kw] = [8, 4, 2, 2]
//! assert_eq!(model.param("conv_transpose2d_1.weight").unwrap().len(), 8 * 4 * 2 * 2);
//! ```

use serde::{Deserialize, Serialize};

use super::LayerKind;
use crate::model::Layer;
use crate::model::spec::{SpecTable, SpecType};

use crate::backend::Op;
use crate::backend::ops::{self, ConvGeom};
use crate::model::ModelBuilder;
use crate::model::ParamRole;
use crate::model::lower::{Backward, Forward};
use crate::model::params::ParamDecl;
use crate::model::shape::{bounded, need_4d, positive};
use crate::{Error, Result};

/// A 2-D transposed convolution (PyTorch's `nn.ConvTranspose2d`), the adjoint of a
/// convolution: each input value adds its `kernel` window, scaled by the weight, onto the
/// output at `stride` steps. Used to upsample in decoders and U-Nets.
///
/// Output size per axis: `(H - 1) * stride - 2 * padding + dilation * (kernel - 1) +
/// output_padding + 1`. Weight `[in, out/groups, kh, kw]`, bias `[out]`, initialised as
/// PyTorch does (uniform in `±1/sqrt(out/groups * kh * kw)`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConvTranspose2d {
    /// Output channels.
    pub out_channels: usize,
    /// Kernel `(height, width)`.
    pub kernel: (usize, usize),
    /// Stride `(height, width)`: the upsampling factor.
    pub stride: (usize, usize),
    /// Removed from each side of the output `(height, width)` (PyTorch's `padding`: the
    /// padding of the convolution this one transposes).
    pub padding: (usize, usize),
    /// Added to one side of the output `(height, width)`, to reach sizes a stride cannot tell
    /// apart; must be smaller than the stride or the dilation along its axis.
    pub output_padding: (usize, usize),
    /// Spacing between kernel taps `(height, width)`.
    pub dilation: (usize, usize),
    /// Channel groups; must divide both input and output channels.
    pub groups: usize,
    /// Learnable per-channel bias.
    pub bias: bool,
}

impl ConvTranspose2d {
    /// `out_channels` filters of `kernel x kernel`, stride 1, no padding, with bias
    /// (PyTorch's defaults).
    pub fn new(out_channels: usize, kernel: usize) -> Self {
        ConvTranspose2d {
            out_channels,
            kernel: (kernel, kernel),
            stride: (1, 1),
            padding: (0, 0),
            output_padding: (0, 0),
            dilation: (1, 1),
            groups: 1,
            bias: true,
        }
    }
    /// A non-square kernel `(height, width)`.
    pub fn kernel_hw(mut self, kh: usize, kw: usize) -> Self {
        self.kernel = (kh, kw);
        self
    }
    /// The same stride along both axes.
    pub fn stride(mut self, s: usize) -> Self {
        self.stride = (s, s);
        self
    }
    /// Stride `(height, width)`.
    pub fn stride_hw(mut self, sh: usize, sw: usize) -> Self {
        self.stride = (sh, sw);
        self
    }
    /// The same padding along both axes.
    pub fn padding(mut self, p: usize) -> Self {
        self.padding = (p, p);
        self
    }
    /// Padding `(height, width)`.
    pub fn padding_hw(mut self, ph: usize, pw: usize) -> Self {
        self.padding = (ph, pw);
        self
    }
    /// The same output padding along both axes.
    pub fn output_padding(mut self, p: usize) -> Self {
        self.output_padding = (p, p);
        self
    }
    /// Output padding `(height, width)`.
    pub fn output_padding_hw(mut self, ph: usize, pw: usize) -> Self {
        self.output_padding = (ph, pw);
        self
    }
    /// The same dilation along both axes.
    pub fn dilation(mut self, d: usize) -> Self {
        self.dilation = (d, d);
        self
    }
    /// Dilation `(height, width)`.
    pub fn dilation_hw(mut self, dh: usize, dw: usize) -> Self {
        self.dilation = (dh, dw);
        self
    }
    /// Channel groups.
    pub fn groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }
    /// Learnable bias (default true).
    pub fn bias(mut self, b: bool) -> Self {
        self.bias = b;
        self
    }
}

/// Output length along one axis, or why there is none.
fn axis_out(name: &str, axis: &str, c: &ConvTranspose2d, len: usize, i: usize) -> Result<usize> {
    let pick = |p: (usize, usize)| if i == 0 { p.0 } else { p.1 };
    let (k, s, p, op, d) = (pick(c.kernel), pick(c.stride), pick(c.padding), pick(c.output_padding), pick(c.dilation));
    if op >= s && op >= d {
        return Err(Error::layer(
            name,
            format!("output_padding along {axis} ({op}) must be smaller than the stride ({s}) or the dilation ({d})"),
        ));
    }
    // (len - 1) * s + d * (k - 1) + op + 1 - 2 * p, in u128 so no option or input size overflows.
    let full = (len as u128 - 1) * s as u128 + d as u128 * (k as u128 - 1) + op as u128 + 1;
    match full.checked_sub(2 * p as u128) {
        Some(out) if out >= 1 && out <= usize::MAX as u128 / 2 => Ok(out as usize),
        _ => Err(Error::layer(
            name,
            format!(
                "output {axis} would be {full} - 2*{p} (input {len}, kernel {k}, stride {s}, dilation {d}, \
                 output_padding {op}): padding leaves no output"
            ),
        )),
    }
}

/// The fan-in PyTorch initialises with: `weight.size(1) * kh * kw`, that is
/// `out_channels / groups * kh * kw` (the weight's second axis is the output's).
pub(crate) fn fan_in(c: &ConvTranspose2d) -> usize {
    c.out_channels / c.groups * c.kernel.0 * c.kernel.1
}

/// The geometry of the convolution this layer transposes (see `backend/ops/conv_transpose.rs`):
/// its input is this layer's output `[out, OH, OW]`, its output this layer's input.
fn geom(c: &ConvTranspose2d, ins: &[usize], out: &[usize], batch: usize) -> ConvGeom {
    ConvGeom {
        n: batch,
        c: out[0],
        h: out[1],
        w: out[2],
        k: ins[0],
        kh: c.kernel.0,
        kw: c.kernel.1,
        sh: c.stride.0,
        sw: c.stride.1,
        ph: c.padding.0,
        pw: c.padding.1,
        dh: c.dilation.0,
        dw: c.dilation.1,
        groups: c.groups,
        oh: ins[1],
        ow: ins[2],
    }
}

/// Its spec-file type.
pub(crate) const SPEC: &[SpecType] = &[SpecType {
    name: "conv_transpose2d",
    fields: &["out_channels", "kernel", "stride", "padding", "output_padding", "dilation", "groups", "bias"],
    read: |f| {
        Ok(Layer::ConvTranspose2d(ConvTranspose2d {
            out_channels: f.size("out_channels", 1)?,
            kernel: f.pair("kernel", 1)?,
            stride: f.pair_or("stride", 1, (1, 1))?,
            padding: f.pair_or("padding", 0, (0, 0))?,
            output_padding: f.pair_or("output_padding", 0, (0, 0))?,
            dilation: f.pair_or("dilation", 1, (1, 1))?,
            groups: f.size_or("groups", 1, 1)?,
            bias: f.bool_or("bias", true)?,
        }))
    },
}];

/// The builder methods of this home's layers.
impl ModelBuilder {
    /// A transposed convolution (`nn.ConvTranspose2d`): `out_channels` filters of
    /// `kernel x kernel`, stride 1, no padding, with bias.
    pub fn conv_transpose2d(self, out_channels: usize, kernel: usize) -> Self {
        self.layer(Layer::ConvTranspose2d(ConvTranspose2d::new(out_channels, kernel)))
    }

    /// A transposed convolution with options:
    /// `conv_transpose2d_with(ConvTranspose2d::new(32, 3).stride(2).padding(1).output_padding(1))`.
    pub fn conv_transpose2d_with(self, conv: ConvTranspose2d) -> Self {
        self.layer(Layer::ConvTranspose2d(conv))
    }
}

impl LayerKind for ConvTranspose2d {
    fn type_name(&self) -> &'static str {
        "conv_transpose2d"
    }
    fn display_type(&self) -> String {
        "ConvTranspose2d".into()
    }
    /// The size options against `MAX_OPTION` (shared by the builder and the model-file loader).
    fn check_options(&self, name: &str) -> Result<()> {
        bounded(name, "out_channels", &[self.out_channels])?;
        bounded(name, "kernel", &[self.kernel.0, self.kernel.1])?;
        bounded(name, "stride", &[self.stride.0, self.stride.1])?;
        bounded(name, "padding", &[self.padding.0, self.padding.1])?;
        bounded(name, "output_padding", &[self.output_padding.0, self.output_padding.1])?;
        bounded(name, "dilation", &[self.dilation.0, self.dilation.1])?;
        bounded(name, "groups", &[self.groups])
    }
    /// Shape rule: `[C, H, W] -> [out_channels, OH, OW]` (see [`ConvTranspose2d`] for the size).
    /// The size options were checked against `MAX_OPTION` before (`check_options`).
    fn infer(&self, name: &str, input: &[usize]) -> Result<Vec<usize>> {
        let (cin, h, w) = need_4d(name, "conv_transpose2d", input)?;
        positive(name, "out_channels", self.out_channels)?;
        positive(name, "kernel height", self.kernel.0)?;
        positive(name, "kernel width", self.kernel.1)?;
        positive(name, "stride", self.stride.0.min(self.stride.1))?;
        positive(name, "dilation", self.dilation.0.min(self.dilation.1))?;
        positive(name, "groups", self.groups)?;
        positive(name, "input height", h)?;
        positive(name, "input width", w)?;
        if !cin.is_multiple_of(self.groups) || !self.out_channels.is_multiple_of(self.groups) {
            return Err(Error::layer(
                name,
                format!(
                    "groups = {} must divide both input channels ({cin}) and out_channels ({})",
                    self.groups, self.out_channels
                ),
            ));
        }
        Ok(vec![self.out_channels, axis_out(name, "height", self, h, 0)?, axis_out(name, "width", self, w, 1)?])
    }
    /// Weight `[in, out/groups, kh, kw]` and, with `bias`, bias `[out]`, in PyTorch's
    /// `state_dict` order; both drawn uniformly within `±1/sqrt(fan_in)` (the default initialiser,
    /// with [`fan_in`]).
    fn params(&self, input: &[usize]) -> Vec<ParamDecl> {
        let w = vec![input[0], self.out_channels / self.groups, self.kernel.0, self.kernel.1];
        let mut v = vec![ParamDecl::trained("weight", ParamRole::Weight, w, fan_in(self))];
        if self.bias {
            v.push(ParamDecl::trained("bias", ParamRole::Bias, vec![self.out_channels], fan_in(self)));
        }
        v
    }
    /// Forward FLOPs per sample: a multiply-add per input value and weight tap, plus the bias per
    /// output value.
    fn flops(&self, input: &[usize], out: u64, _inputs: usize) -> u64 {
        let taps = (self.out_channels / self.groups * self.kernel.0 * self.kernel.1) as u64;
        2 * input.iter().product::<usize>() as u64 * taps + if self.bias { out } else { 0 }
    }
    /// The summary's detail column: kernel, and stride, padding, output padding, dilation and
    /// groups where not the default.
    fn detail(&self, _name: &str, _input: &[usize]) -> Option<String> {
        let mut d = format!("k{}x{}", self.kernel.0, self.kernel.1);
        let pairs = [
            ("s", self.stride, (1, 1)),
            ("p", self.padding, (0, 0)),
            ("op", self.output_padding, (0, 0)),
            ("d", self.dilation, (1, 1)),
        ];
        for (tag, v, default) in pairs {
            if v != default {
                d += &format!(" {tag}{}x{}", v.0, v.1);
            }
        }
        if self.groups != 1 {
            d += &format!(" g{}", self.groups);
        }
        Some(d)
    }
    /// Lowering of the forward pass: one [`Op::ConvTranspose2d`].
    fn forward(&self, cx: &mut Forward<'_>) -> Result<()> {
        let g = geom(self, cx.in_shapes[0], &cx.node.shape, cx.batch);
        let (x, y) = (cx.input(0), cx.output());
        let w = cx.param(ParamRole::Weight).ok_or_else(|| Error::layer(&cx.node.name, "has no weight buffer"))?;
        let b = if self.bias { cx.param(ParamRole::Bias) } else { None };
        cx.push(Op::ConvTranspose2d(ops::ConvTranspose2d { g, x, w, b, y }));
        Ok(())
    }
    /// Lowering of the backward pass: one [`Op::ConvTranspose2dBackward`] (input, weight and bias
    /// gradients).
    fn backward(&self, cx: &mut Backward<'_>) -> Result<()> {
        let g = geom(self, cx.in_shapes[0], &cx.node.shape, cx.batch);
        let (x, dy) = (cx.input(0), cx.dy());
        let name = &cx.node.name.clone();
        let w = cx.param(ParamRole::Weight).ok_or_else(|| Error::layer(name, "has no weight buffer"))?;
        let dx = cx.dx(0);
        let dw = cx.param_grad(ParamRole::Weight).ok_or_else(|| Error::layer(name, "has no weight gradient"))?;
        let db = cx.param_grad(ParamRole::Bias);
        cx.push(Op::ConvTranspose2dBackward(ops::ConvTranspose2dBackward { g, x, w, dy, dx, dw, db }));
        Ok(())
    }
    fn write_spec(&self, t: &mut SpecTable) {
        t.int("out_channels", self.out_channels);
        t.pair("kernel", self.kernel);
        t.pair("stride", self.stride);
        t.pair("padding", self.padding);
        t.pair("output_padding", self.output_padding);
        t.pair("dilation", self.dilation);
        t.int("groups", self.groups);
        t.bool("bias", self.bias);
    }
}
