//! The ops of a 2-D transposed convolution (PyTorch's `nn.ConvTranspose2d`).
//!
//! A transposed convolution is the adjoint of a convolution, so its ops carry the geometry of
//! *the convolution they transpose* (a [`ConvGeom`]): that convolution's input `[n, c, h, w]`
//! is the transposed convolution's output, its output `[n, k, oh, ow]` the transposed
//! convolution's input, and its weight `[k, c/groups, kh, kw]` is exactly PyTorch's
//! ConvTranspose2d weight `[in, out/groups, kH, kW]`. Stride, padding, dilation and groups mean
//! the same in both. Then the transposed convolution's forward is the convolution's
//! backward-data, its backward-data is the convolution's forward, and its weight gradient is the
//! convolution's weight gradient with input and output gradient swapped: the backends reuse
//! their convolution machinery (im2col on the CPU, cuDNN's three directions on CUDA).
//!
//! `output_padding` needs no field: it only makes the output (`g.h`, `g.w`) larger than the
//! inputs reach; those rows and columns get the bias alone.

use super::{BufId, ConvGeom, GradOut, OpDesc};

/// `y = conv_transpose(x, w) + b`: `x` is `[n, k, oh, ow]`, `y` is `[n, c, h, w]`, `w` is
/// `[k, c/groups, kh, kw]` and `b` is `[c]` (see the module docs for why `g` is the geometry of
/// the transposed convolution).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConvTranspose2d {
    /// Geometry of the convolution this op transposes.
    pub g: ConvGeom,
    /// Input, `g.output_len()` values.
    pub x: BufId,
    /// Weight, `g.weight_len()` values.
    pub w: BufId,
    /// Bias, `g.c` values, if any.
    pub b: Option<BufId>,
    /// Output, `g.input_len()` values.
    pub y: BufId,
}

/// Gradients of a transposed convolution: input (`dx`), weight (`dw`) and bias (`db`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConvTranspose2dBackward {
    /// Geometry of the convolution the forward op transposes.
    pub g: ConvGeom,
    /// The forward input, `g.output_len()` values.
    pub x: BufId,
    /// Weight.
    pub w: BufId,
    /// Gradient of the forward output, `g.input_len()` values.
    pub dy: BufId,
    /// Gradient of the input, where wanted.
    pub dx: Option<GradOut>,
    /// Gradient of the weight.
    pub dw: GradOut,
    /// Gradient of the bias, where wanted.
    pub db: Option<GradOut>,
}

/// The geometry for debug logs, as the transposed convolution sees it.
fn describe(g: &ConvGeom) -> String {
    format!(
        "{}x{}x{}x{} -> {}x{}x{} k{}x{} s{}x{} p{}x{} d{}x{} g{} (transposed)",
        g.n, g.k, g.oh, g.ow, g.c, g.h, g.w, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.groups
    )
}

impl OpDesc for ConvTranspose2d {
    const NAME: &'static str = "conv_transpose2d";
    buffer_table!(|o, f| {
        f(r!(o.x), o.g.output_len(), R);
        f(r!(o.w), o.g.weight_len(), R);
        if let Some(b) = r!(o.b) {
            f(b, o.g.c, R);
        }
        f(r!(o.y), o.g.input_len(), W);
    });
    fn shapes(&self) -> String {
        describe(&self.g)
    }
}

impl OpDesc for ConvTranspose2dBackward {
    const NAME: &'static str = "conv_transpose2d_backward";
    buffer_table!(|o, f| {
        f(r!(o.x), o.g.output_len(), R);
        f(r!(o.w), o.g.weight_len(), R);
        f(r!(o.dy), o.g.input_len(), R);
        if let Some(d) = r!(o.dx) {
            f(r!(d.buf), o.g.output_len(), grad_access(d.accumulate));
        }
        f(r!(o.dw.buf), o.g.weight_len(), grad_access(o.dw.accumulate));
        if let Some(d) = r!(o.db) {
            f(r!(d.buf), o.g.c, grad_access(d.accumulate));
        }
    });
    fn shapes(&self) -> String {
        describe(&self.g)
    }
}
