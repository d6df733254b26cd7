//! Convolution: its geometry and the forward and backward ops.

use super::{BufId, GradOut};

/// Geometry of a 2-D convolution over an NCHW batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    /// Batch size.
    pub n: usize,
    /// Input channels, height, width.
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// Output channels.
    pub k: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub ph: usize,
    pub pw: usize,
    pub dh: usize,
    pub dw: usize,
    pub groups: usize,
    pub oh: usize,
    pub ow: usize,
}

impl ConvGeom {
    pub fn input_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    pub fn output_len(&self) -> usize {
        self.n * self.k * self.oh * self.ow
    }
    pub fn weight_len(&self) -> usize {
        self.k * (self.c / self.groups) * self.kh * self.kw
    }
    /// A 1x1, stride-1, unpadded convolution: a plain matrix product per image.
    pub fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.sh == 1 && self.sw == 1 && self.ph == 0 && self.pw == 0
    }
}

/// `y = conv(x, w) + b`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Conv2d {
    /// Geometry.
    pub g: ConvGeom,
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
