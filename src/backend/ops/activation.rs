//! Element-wise activations, softmax and dropout, forward and backward.

use super::{BufId, CounterId, GradOut, OpDesc};

/// Element-wise activation functions (PyTorch's definitions).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ActFn {
    /// `max(x, 0)`; NaN stays NaN.
    Relu,
    /// `x` for `x > 0`, else `slope * x`, with the slope given (PyTorch's default 0.01).
    LeakyRelu(f32),
    /// `x` for `x > 0`, else `alpha * (exp(x) - 1)`, with alpha given (PyTorch's default 1).
    Elu(f32),
    /// `1 / (1 + exp(-x))`.
    Sigmoid,
    /// The hyperbolic tangent.
    Tanh,
    /// `x * sigmoid(x)` (also called swish).
    Silu,
    /// The exact GELU, `x * Phi(x)` with `Phi` the standard normal CDF (PyTorch's default,
    /// not the tanh approximation).
    Gelu,
}

impl ActFn {
    /// Whether `f'(x)` follows from the output `y = f(x)` alone, with the same value and the
    /// same NaN branch as from the input (what batch norm's fused activation needs: its backward
    /// keeps the activated output, not the normalised values): ReLU (`y <= 0` exactly where
    /// `x <= 0`), leaky ReLU with a slope of at least 0 and ELU with an alpha of at least 0
    /// (the sign of `y` is that of `x`), sigmoid and tanh (derivatives of `y`). Not SiLU or
    /// GELU, nor the negative-slope forms (two inputs give one output).
    pub fn derivative_from_output(self) -> bool {
        match self {
            ActFn::Relu | ActFn::Sigmoid | ActFn::Tanh => true,
            ActFn::LeakyRelu(s) => s >= 0.0,
            ActFn::Elu(a) => a >= 0.0,
            ActFn::Silu | ActFn::Gelu => false,
        }
    }
}

/// `y = f(x)` over `len` values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Act {
    /// The function.
    pub f: ActFn,
    /// Number of values.
    pub len: usize,
    /// Input.
    pub x: BufId,
    /// Output.
    pub y: BufId,
}

/// `dx = f'(x) * dy`, given the forward input `x` and output `y`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ActBackward {
    /// The function.
    pub f: ActFn,
    /// Number of values.
    pub len: usize,
    /// Input.
    pub x: BufId,
    /// Output.
    pub y: BufId,
    /// Gradient of the output.
    pub dy: BufId,
    /// Gradient of the input, where wanted.
    pub dx: GradOut,
}

/// Softmax over the middle axis of an `[outer, dim, inner]` view.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Softmax {
    /// Size of the outer axis.
    pub outer: usize,
    /// Size of the axis normalised over.
    pub dim: usize,
    /// Size of the inner axis.
    pub inner: usize,
    /// Input.
    pub x: BufId,
    /// Output.
    pub y: BufId,
}

/// The gradient of [`Softmax`] from its output: `dx = y * (dy - sum(dy * y))`, the sum taken
/// along the normalised axis.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SoftmaxBackward {
    /// Size of the outer axis.
    pub outer: usize,
    /// Size of the axis normalised over.
    pub dim: usize,
    /// Size of the inner axis.
    pub inner: usize,
    /// Output.
    pub y: BufId,
    /// Gradient of the output.
    pub dy: BufId,
    /// Gradient of the input, where wanted.
    pub dx: GradOut,
}

/// `mask = (u >= rate) / (1 - rate)`, `y = x * mask`, where `u` is the Philox uniform for
/// (`seed`, the counter's value, element index); the counter then advances by one. A replay
/// (the recomputation of a checkpointed segment in backward) draws with the counter's value
/// minus one, the step of the forward that ran last, and leaves the counter as it is: the same
/// mask again.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    /// Probability of dropping a value.
    pub rate: f32,
    /// Number of values.
    pub len: usize,
    /// Seed of the Philox stream.
    pub seed: u64,
    /// Counter giving the step (advanced by the op unless it replays).
    pub counter: CounterId,
    /// Draw the mask of the counter's previous step again, without advancing it.
    pub replay: bool,
    /// Input.
    pub x: BufId,
    /// Output.
    pub y: BufId,
    /// The saved mask (`0` or `1 / (1 - rate)`).
    pub mask: BufId,
}

/// The gradient of [`Dropout`]: `dx = dy * mask`, with the mask the forward saved.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutBackward {
    /// Number of values.
    pub len: usize,
    /// The saved mask (`0` or `1 / (1 - rate)`).
    pub mask: BufId,
    /// Gradient of the output.
    pub dy: BufId,
    /// Gradient of the input, where wanted.
    pub dx: GradOut,
}

impl OpDesc for Act {
    const NAME: &'static str = "activation";
    buffer_table!(|o, f| {
        f(r!(o.x), o.len, R);
        f(r!(o.y), o.len, W);
    });
    fn shapes(&self) -> String {
        format!("{:?} {}", self.f, self.len)
    }
}

impl OpDesc for ActBackward {
    const NAME: &'static str = "activation_backward";
    buffer_table!(|o, f| {
        f(r!(o.x), o.len, R);
        f(r!(o.y), o.len, R);
        f(r!(o.dy), o.len, R);
        f(r!(o.dx.buf), o.len, grad_access(o.dx.accumulate));
    });
    fn shapes(&self) -> String {
        format!("{:?} {}", self.f, self.len)
    }
}

impl OpDesc for Softmax {
    const NAME: &'static str = "softmax";
    buffer_table!(|o, f| {
        let n = o.outer * o.dim * o.inner;
        f(r!(o.x), n, R);
        f(r!(o.y), n, W);
    });
    fn shapes(&self) -> String {
        format!("{}x[{}]x{}", self.outer, self.dim, self.inner)
    }
}

impl OpDesc for SoftmaxBackward {
    const NAME: &'static str = "softmax_backward";
    buffer_table!(|o, f| {
        let n = o.outer * o.dim * o.inner;
        f(r!(o.y), n, R);
        f(r!(o.dy), n, R);
        f(r!(o.dx.buf), n, grad_access(o.dx.accumulate));
    });
    fn shapes(&self) -> String {
        format!("{}x[{}]x{}", self.outer, self.dim, self.inner)
    }
}

impl OpDesc for Dropout {
    const NAME: &'static str = "dropout";
    buffer_table!(|o, f| {
        f(r!(o.x), o.len, R);
        f(r!(o.y), o.len, W);
        f(r!(o.mask), o.len, W);
    });
    fn shapes(&self) -> String {
        format!("p={} {}", self.rate, self.len)
    }
}

impl OpDesc for DropoutBackward {
    const NAME: &'static str = "dropout_backward";
    buffer_table!(|o, f| {
        f(r!(o.mask), o.len, R);
        f(r!(o.dy), o.len, R);
        f(r!(o.dx.buf), o.len, grad_access(o.dx.accumulate));
    });
    fn shapes(&self) -> String {
        format!("{}", self.len)
    }
}
