//! The fully connected layer's matrix product, forward and backward.

use super::{BufId, GradOut, OpDesc};

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

impl OpDesc for Linear {
    const NAME: &'static str = "linear";
    buffer_table!(|o, f| {
        f(r!(o.x), o.m * o.k, R);
        f(r!(o.w), o.n * o.k, R);
        if let Some(b) = r!(o.b) {
            f(b, o.n, R);
        }
        f(r!(o.y), o.m * o.n, W);
    });
    fn shapes(&self) -> String {
        let (m, k, n) = (self.m, self.k, self.n);
        format!("{m}x{k} -> {m}x{n}")
    }
}

impl OpDesc for LinearBackward {
    const NAME: &'static str = "linear_backward";
    buffer_table!(|o, f| {
        f(r!(o.x), o.m * o.k, R);
        f(r!(o.w), o.n * o.k, R);
        f(r!(o.dy), o.m * o.n, R);
        if let Some(d) = r!(o.dx) {
            f(r!(d.buf), o.m * o.k, grad_access(d.accumulate));
        }
        f(r!(o.dw.buf), o.n * o.k, grad_access(o.dw.accumulate));
        if let Some(d) = r!(o.db) {
            f(r!(d.buf), o.n, grad_access(d.accumulate));
        }
    });
    fn shapes(&self) -> String {
        let (m, k, n) = (self.m, self.k, self.n);
        format!("{m}x{k} -> {m}x{n}")
    }
}
