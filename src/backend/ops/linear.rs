//! The fully connected layer's matrix product, forward and backward.

use super::{BufId, GradOut};

/// `y[m, n] = x[m, k] * w[n, k]^T + b[n]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Linear {
    /// Rows (samples).
    pub m: usize,
    /// Input features.
    pub k: usize,
    /// Output features.
    pub n: usize,
    /// Input.
    pub x: BufId,
    /// Weight.
    pub w: BufId,
    /// Bias, if any.
    pub b: Option<BufId>,
    /// Output.
    pub y: BufId,
}

/// Gradients of [`Linear`]: `dx = dy * w` (`[m, k]`), `dw = dy^T * x` (`[n, k]`) and
/// `db = sum of dy over rows` (`[n]`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearBackward {
    /// Rows (samples).
    pub m: usize,
    /// Input features.
    pub k: usize,
    /// Output features.
    pub n: usize,
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
