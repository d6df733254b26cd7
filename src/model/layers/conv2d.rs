//! Conv2d, whole: options, shape rule (padding and output size), parameters (PyTorch's
//! `nn.Conv2d` names and layout), FLOPs, its summary detail and lowering to ops. Its kernels are
//! `backend/cpu/conv2d.rs` and `backend/cuda/conv2d.rs` (cuDNN).

use serde::{Deserialize, Serialize};

use super::Padding;

use super::LayerKind;
use crate::backend::Op;
use crate::backend::ops::{self, ConvGeom};
use crate::model::Layer;
use crate::model::ModelBuilder;
use crate::model::ParamRole;
use crate::model::lower::{Backward, Forward};
use crate::model::params::ParamDecl;
use crate::model::shape::{bounded, need_4d, positive, window_out};
use crate::model::spec::{SpecTable, SpecType};
use crate::{Error, Result};

/// A 2-D convolution: `out_channels` filters of `kernel` size over NCHW input.
///
/// Weight `[out, in/groups, kh, kw]`, bias `[out]`, initialised as PyTorch's `nn.Conv2d`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conv2d {
    /// Number of filters (output channels); at least 1 and a multiple of `groups`.
    pub out_channels: usize,
    /// Filter `(height, width)`, each at least 1.
    pub kernel: (usize, usize),
    /// Step between windows `(vertical, horizontal)`, each at least 1 (default `(1, 1)`).
    pub stride: (usize, usize),
    /// Zero padding on each side (default [`Padding::Valid`], none).
    pub padding: Padding,
    /// Spacing between filter taps `(vertical, horizontal)`, each at least 1 (default
    /// `(1, 1)`).
    pub dilation: (usize, usize),
    /// Channel groups; must divide the input channels and `out_channels` (default 1).
    pub groups: usize,
    /// Whether the layer adds a learned bias per output channel (default true).
    pub bias: bool,
}

impl Conv2d {
    /// `out_channels` filters of `kernel x kernel`, stride 1, no padding, with bias.
    pub fn new(out_channels: usize, kernel: usize) -> Self {
        Conv2d {
            out_channels,
            kernel: (kernel, kernel),
            stride: (1, 1),
            padding: Padding::Valid,
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
    /// The same stride `s` in both directions.
    pub fn stride(mut self, s: usize) -> Self {
        self.stride = (s, s);
        self
    }
    /// Vertical stride `sh` and horizontal stride `sw`.
    pub fn stride_hw(mut self, sh: usize, sw: usize) -> Self {
        self.stride = (sh, sw);
        self
    }
    /// `1`, `(1, 2)`, `"same"`, `"valid"` or a [`Padding`].
    pub fn padding(mut self, p: impl Into<Padding>) -> Self {
        self.padding = p.into();
        self
    }
    /// The same dilation `d` in both directions.
    pub fn dilation(mut self, d: usize) -> Self {
        self.dilation = (d, d);
        self
    }
    /// Vertical dilation `dh` and horizontal dilation `dw`.
    pub fn dilation_hw(mut self, dh: usize, dw: usize) -> Self {
        self.dilation = (dh, dw);
        self
    }
    /// Grouped convolution; `groups == in_channels == out_channels` is depthwise.
    pub fn groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }
    /// With (`true`, the default) or without a bias.
    pub fn bias(mut self, b: bool) -> Self {
        self.bias = b;
        self
    }
}

/// A convolution's geometry resolved against its input: symmetric padding and output size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvResolved {
    /// Zero padding on each side, `(vertical, horizontal)`.
    pub pad: (usize, usize),
    /// Output `(height, width)`.
    pub out_hw: (usize, usize),
}

/// Resolves a convolution's padding and output size for a `[C, H, W]` input.
pub fn resolve_conv(name: &str, conv: &Conv2d, input: &[usize]) -> Result<ConvResolved> {
    let (c, h, w) = need_4d(name, "conv2d", input)?;
    positive(name, "out_channels", conv.out_channels)?;
    positive(name, "kernel height", conv.kernel.0)?;
    positive(name, "kernel width", conv.kernel.1)?;
    positive(name, "stride", conv.stride.0.min(conv.stride.1))?;
    positive(name, "dilation", conv.dilation.0.min(conv.dilation.1))?;
    positive(name, "groups", conv.groups)?;
    if !c.is_multiple_of(conv.groups) || !conv.out_channels.is_multiple_of(conv.groups) {
        return Err(Error::layer(
            name,
            format!(
                "groups = {} must divide both input channels ({c}) and out_channels ({})",
                conv.groups, conv.out_channels
            ),
        ));
    }
    let eff = (conv.dilation.0 * (conv.kernel.0 - 1) + 1, conv.dilation.1 * (conv.kernel.1 - 1) + 1);
    let pad = match conv.padding {
        Padding::Valid => (0, 0),
        Padding::Explicit(ph, pw) => {
            if ph == usize::MAX || pw == usize::MAX {
                return Err(Error::layer(name, "padding must be \"same\", \"valid\" or a number"));
            }
            (ph, pw)
        }
        Padding::Same => {
            if conv.stride != (1, 1) {
                return Err(Error::layer(
                    name,
                    format!("padding \"same\" needs stride 1, got stride {:?}", conv.stride),
                ));
            }
            let (th, tw) = (eff.0 - 1, eff.1 - 1);
            if th % 2 == 1 || tw % 2 == 1 {
                return Err(Error::layer(
                    name,
                    format!(
                        "padding \"same\" with kernel {:?} and dilation {:?} needs uneven padding \
                         (kiln pads symmetrically); use an odd kernel or explicit padding",
                        conv.kernel, conv.dilation
                    ),
                ));
            }
            (th / 2, tw / 2)
        }
    };
    let oh = window_out(name, "height", h, pad.0, eff.0, conv.stride.0)?;
    let ow = window_out(name, "width", w, pad.1, eff.1, conv.stride.1)?;
    Ok(ConvResolved { pad, out_hw: (oh, ow) })
}

fn geom(name: &str, c: &Conv2d, ins: &[usize], batch: usize) -> Result<ConvGeom> {
    let r = resolve_conv(name, c, ins)?;
    Ok(ConvGeom {
        n: batch,
        c: ins[0],
        h: ins[1],
        w: ins[2],
        k: c.out_channels,
        kh: c.kernel.0,
        kw: c.kernel.1,
        sh: c.stride.0,
        sw: c.stride.1,
        ph: r.pad.0,
        pw: r.pad.1,
        dh: c.dilation.0,
        dw: c.dilation.1,
        groups: c.groups,
        oh: r.out_hw.0,
        ow: r.out_hw.1,
    })
}

/// Its spec-file type.
pub(crate) const SPEC: &[SpecType] = &[SpecType {
    name: "conv2d",
    fields: &["out_channels", "kernel", "stride", "padding", "dilation", "groups", "bias"],
    read: |f| {
        Ok(Layer::Conv2d(Conv2d {
            out_channels: f.size("out_channels", 1)?,
            kernel: f.pair("kernel", 1)?,
            stride: f.pair_or("stride", 1, (1, 1))?,
            padding: f.padding()?,
            dilation: f.pair_or("dilation", 1, (1, 1))?,
            groups: f.size_or("groups", 1, 1)?,
            bias: f.bool_or("bias", true)?,
        }))
    },
}];

/// The builder methods of this home's layers.
impl ModelBuilder {
    /// `out_channels` filters of `kernel x kernel`, stride 1, no padding, with bias.
    pub fn conv2d(self, out_channels: usize, kernel: usize) -> Self {
        self.layer(Layer::Conv2d(Conv2d::new(out_channels, kernel)))
    }

    /// A convolution with options: `conv2d_with(Conv2d::new(64, 3).stride(2).padding(1))`.
    pub fn conv2d_with(self, conv: Conv2d) -> Self {
        self.layer(Layer::Conv2d(conv))
    }
}

impl LayerKind for Conv2d {
    fn type_name(&self) -> &'static str {
        "conv2d"
    }
    fn display_type(&self) -> String {
        "Conv2d".into()
    }
    /// The size options against `MAX_OPTION` (shared by the builder and the model-file loader).
    fn check_options(&self, name: &str) -> Result<()> {
        bounded(name, "out_channels", &[self.out_channels])?;
        bounded(name, "kernel", &[self.kernel.0, self.kernel.1])?;
        bounded(name, "stride", &[self.stride.0, self.stride.1])?;
        bounded(name, "dilation", &[self.dilation.0, self.dilation.1])?;
        bounded(name, "groups", &[self.groups])?;
        // usize::MAX marks a padding string that was not understood (resolve_conv says so).
        if let Padding::Explicit(h, w) = self.padding
            && h != usize::MAX
            && w != usize::MAX
        {
            bounded(name, "padding", &[h, w])?;
        }
        Ok(())
    }
    /// Shape rule: `[C, H, W] -> [out_channels, oh, ow]`.
    fn infer(&self, name: &str, input: &[usize]) -> Result<Vec<usize>> {
        let r = resolve_conv(name, self, input)?;
        Ok(vec![self.out_channels, r.out_hw.0, r.out_hw.1])
    }
    /// Weight `[out, in/groups, kh, kw]` and, with `bias`, bias `[out]`; both drawn with the
    /// weight's fan-in, as PyTorch does.
    fn params(&self, input: &[usize]) -> Vec<ParamDecl> {
        let cin = input[0] / self.groups;
        let fan_in = cin * self.kernel.0 * self.kernel.1;
        let mut v = vec![ParamDecl::trained(
            "weight",
            ParamRole::Weight,
            vec![self.out_channels, cin, self.kernel.0, self.kernel.1],
            fan_in,
        )];
        if self.bias {
            v.push(ParamDecl::trained("bias", ParamRole::Bias, vec![self.out_channels], fan_in));
        }
        v
    }
    /// Forward FLOPs per sample: a multiply-add per output and weight tap, plus the bias.
    fn flops(&self, input: &[usize], out: u64, _inputs: usize) -> u64 {
        let per_out = 2 * (input[0] / self.groups * self.kernel.0 * self.kernel.1) as u64;
        out * per_out + if self.bias { out } else { 0 }
    }
    /// The summary's detail column: kernel, and stride, padding, dilation and groups where not
    /// the default.
    fn detail(&self, name: &str, input: &[usize]) -> Option<String> {
        let pad = resolve_conv(name, self, input).map(|r| r.pad).unwrap_or((0, 0));
        let mut d = format!("k{}x{}", self.kernel.0, self.kernel.1);
        if self.stride != (1, 1) {
            d += &format!(" s{}x{}", self.stride.0, self.stride.1);
        }
        if pad != (0, 0) {
            d += &format!(" p{}x{}", pad.0, pad.1);
        }
        if self.dilation != (1, 1) {
            d += &format!(" d{}x{}", self.dilation.0, self.dilation.1);
        }
        if self.groups != 1 {
            d += &format!(" g{}", self.groups);
        }
        Some(d)
    }
    /// Lowering of the forward pass: one [`Op::Conv2d`].
    fn forward(&self, cx: &mut Forward<'_>) -> Result<()> {
        let g = geom(&cx.node.name, self, cx.in_shapes[0], cx.batch)?;
        let (x, y) = (cx.input(0), cx.output());
        let w = cx.param(ParamRole::Weight).expect("conv weight");
        let b = if self.bias { cx.param(ParamRole::Bias) } else { None };
        cx.push(Op::Conv2d(ops::Conv2d { g, format: ops::MemoryFormat::Nchw, x, w, b, y }));
        Ok(())
    }
    /// Lowering of the backward pass: one [`Op::Conv2dBackward`] (data, weight and bias gradients).
    fn backward(&self, cx: &mut Backward<'_>) -> Result<()> {
        let g = geom(&cx.node.name, self, cx.in_shapes[0], cx.batch)?;
        let (x, dy) = (cx.input(0), cx.dy());
        let w = cx.param(ParamRole::Weight).expect("conv weight");
        let dx = cx.dx(0);
        let dw = cx.param_grad(ParamRole::Weight).expect("conv weight gradient");
        let db = cx.param_grad(ParamRole::Bias);
        let format = ops::MemoryFormat::Nchw;
        cx.push(Op::Conv2dBackward(ops::Conv2dBackward { g, format, x, w, dy, dx, dw, db }));
        Ok(())
    }
    fn write_spec(&self, t: &mut SpecTable) {
        t.int("out_channels", self.out_channels);
        t.pair("kernel", self.kernel);
        t.pair("stride", self.stride);
        t.padding("padding", self.padding);
        t.pair("dilation", self.dilation);
        t.int("groups", self.groups);
        t.bool("bias", self.bias);
    }
}
