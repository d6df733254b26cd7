//! Max and average pooling: the window geometry and the forward and backward ops.

use super::{BufId, GradOut};

/// Geometry of a 2-D pooling window over an NCHW batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeom {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub ph: usize,
    pub pw: usize,
    pub oh: usize,
    pub ow: usize,
}

impl PoolGeom {
    pub fn input_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    pub fn output_len(&self) -> usize {
        self.n * self.c * self.oh * self.ow
    }
}

/// Max pooling; `argmax` receives, per output, the index of the chosen input within its
/// `h * w` plane (as a float, exact below 2^24).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaxPool {
    /// Geometry.
    pub g: PoolGeom,
    /// Input.
    pub x: BufId,
    /// Output.
    pub y: BufId,
    /// Saved index of each maximum within its plane.
    pub argmax: BufId,
}

/// The op `MaxPoolBackward`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaxPoolBackward {
    /// Geometry.
    pub g: PoolGeom,
    /// Saved index of each maximum within its plane.
    pub argmax: BufId,
    /// Gradient of the output.
    pub dy: BufId,
    /// Gradient of the input, where wanted.
    pub dx: GradOut,
}

/// The op `AvgPool`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AvgPool {
    /// Geometry.
    pub g: PoolGeom,
    /// Count padding in the divisor (PyTorch's option).
    pub count_include_pad: bool,
    /// Input.
    pub x: BufId,
    /// Output.
    pub y: BufId,
}

/// The op `AvgPoolBackward`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AvgPoolBackward {
    /// Geometry.
    pub g: PoolGeom,
    /// Count padding in the divisor (PyTorch's option).
    pub count_include_pad: bool,
    /// Gradient of the output.
    pub dy: BufId,
    /// Gradient of the input, where wanted.
    pub dx: GradOut,
}
