//! Convolution: its geometry and the forward and backward ops.

use super::{BufId, GradOut, OpDesc};

/// Geometry of a 2-D convolution over an NCHW batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    /// Batch size.
    pub n: usize,
    /// Input channels.
    pub c: usize,
    /// Input height, in pixels (before padding).
    pub h: usize,
    /// Input width, in pixels (before padding).
    pub w: usize,
    /// Output channels (filters).
    pub k: usize,
    /// Filter height.
    pub kh: usize,
    /// Filter width.
    pub kw: usize,
    /// Vertical stride.
    pub sh: usize,
    /// Horizontal stride.
    pub sw: usize,
    /// Zero padding added above and below the input (each side).
    pub ph: usize,
    /// Zero padding added left and right of the input (each side).
    pub pw: usize,
    /// Vertical dilation (1: adjacent filter taps).
    pub dh: usize,
    /// Horizontal dilation (1: adjacent filter taps).
    pub dw: usize,
    /// Channel groups: `c` and `k` are both multiples of it, and output channel group `g` sees
    /// only input channel group `g` (1: a dense convolution; `c`: depthwise).
    pub groups: usize,
    /// Output height: `(h + 2 ph - dh (kh - 1) - 1) / sh + 1`.
    pub oh: usize,
    /// Output width: `(w + 2 pw - dw (kw - 1) - 1) / sw + 1`.
    pub ow: usize,
}

impl ConvGeom {
    /// Values in the input, `n * c * h * w`.
    pub fn input_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    /// Values in the output, `n * k * oh * ow`.
    pub fn output_len(&self) -> usize {
        self.n * self.k * self.oh * self.ow
    }
    /// Values in the filter tensor, laid out `[k, c / groups, kh, kw]`.
    pub fn weight_len(&self) -> usize {
        self.k * (self.c / self.groups) * self.kh * self.kw
    }
    /// A 1x1, stride-1, unpadded convolution: a plain matrix product per image.
    pub fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.sh == 1 && self.sw == 1 && self.ph == 0 && self.pw == 0
    }
}

/// The order in memory of a convolution's activations (input, output and their gradients)
/// and filter, as PyTorch's `torch.memory_format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MemoryFormat {
    /// Channels first: activations `[n, c, h, w]`, filter `[k, c / groups, kh, kw]`. kiln's
    /// user-facing layout and PyTorch's default; every backend runs it.
    #[default]
    Nchw,
    /// Channels last: activations `[n, h, w, c]`, filter `[k, kh, kw, c / groups]` (cuDNN's
    /// NHWC filter layout), what tensor cores read without transposing. Only mixed precision
    /// plans it (`exec/autocast.rs`, between casts that permute), on a backend whose
    /// convolutions take half-precision data (CUDA); the others refuse it.
    Nhwc,
}

impl MemoryFormat {
    /// `nchw` or `nhwc`.
    pub fn name(self) -> &'static str {
        match self {
            MemoryFormat::Nchw => "nchw",
            MemoryFormat::Nhwc => "nhwc",
        }
    }
}

/// `y = conv(x, w) + b`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Conv2d {
    /// Geometry.
    pub g: ConvGeom,
    /// Memory order of `x`, `w` and `y` (the bias is a plain vector).
    pub format: MemoryFormat,
    /// Input.
    pub x: BufId,
    /// Weight.
    pub w: BufId,
    /// Bias, if any.
    pub b: Option<BufId>,
    /// Output.
    pub y: BufId,
}

/// Gradients of a convolution: input (`dx`), filter (`dw`) and bias (`db`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Conv2dBackward {
    /// Geometry.
    pub g: ConvGeom,
    /// Memory order of `x`, `w`, `dy`, `dx` and `dw`.
    pub format: MemoryFormat,
    /// Input.
    pub x: BufId,
    /// Weight.
    pub w: BufId,
    /// Gradient of the output.
    pub dy: BufId,
    /// Gradient of the input, where wanted.
    pub dx: Option<GradOut>,
    /// Gradient of the weight.
    pub dw: GradOut,
    /// Gradient of the bias, where wanted.
    pub db: Option<GradOut>,
}

impl ConvGeom {
    /// The geometry for debug logs.
    fn describe(&self) -> String {
        let g = self;
        format!(
            "{}x{}x{}x{} -> {}x{}x{} k{}x{} s{}x{} p{}x{} d{}x{} g{}",
            g.n, g.c, g.h, g.w, g.k, g.oh, g.ow, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.groups
        )
    }
}

fn describe(g: &ConvGeom, format: MemoryFormat) -> String {
    match format {
        MemoryFormat::Nchw => g.describe(),
        MemoryFormat::Nhwc => format!("{} nhwc", g.describe()),
    }
}

impl OpDesc for Conv2d {
    const NAME: &'static str = "conv2d";
    buffer_table!(|o, f| {
        f(r!(o.x), o.g.input_len(), R);
        f(r!(o.w), o.g.weight_len(), R);
        if let Some(b) = r!(o.b) {
            f(b, o.g.k, R);
        }
        f(r!(o.y), o.g.output_len(), W);
    });
    fn shapes(&self) -> String {
        describe(&self.g, self.format)
    }
}

impl OpDesc for Conv2dBackward {
    const NAME: &'static str = "conv2d_backward";
    buffer_table!(|o, f| {
        f(r!(o.x), o.g.input_len(), R);
        f(r!(o.w), o.g.weight_len(), R);
        f(r!(o.dy), o.g.output_len(), R);
        if let Some(d) = r!(o.dx) {
            f(r!(d.buf), o.g.input_len(), grad_access(d.accumulate));
        }
        f(r!(o.dw.buf), o.g.weight_len(), grad_access(o.dw.accumulate));
        if let Some(d) = r!(o.db) {
            f(r!(d.buf), o.g.k, grad_access(d.accumulate));
        }
    });
    fn shapes(&self) -> String {
        describe(&self.g, self.format)
    }
}
