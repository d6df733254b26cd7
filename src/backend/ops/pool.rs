//! Max and average pooling: the window geometry and the forward and backward ops.

use super::{BufId, GradOut, OpDesc};

/// Geometry of a 2-D pooling window over an NCHW batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeom {
    /// Batch size.
    pub n: usize,
    /// Channels (pooling keeps them).
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Window height.
    pub kh: usize,
    /// Window width.
    pub kw: usize,
    /// Vertical stride.
    pub sh: usize,
    /// Horizontal stride.
    pub sw: usize,
    /// Padding above and below (each side): never chosen by max pooling, counted by average
    /// pooling only with `count_include_pad`.
    pub ph: usize,
    /// Padding left and right (each side), as `ph`.
    pub pw: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
}

impl PoolGeom {
    /// Values in the input, `n * c * h * w`.
    pub fn input_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    /// Values in the output, `n * c * oh * ow`.
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

/// The gradient of [`MaxPool`]: each output's gradient goes to the input its `argmax`
/// names (summed where windows overlap); every other input gets zero.
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

/// Average pooling: each output is the mean of its window (divided by the whole window with
/// `count_include_pad`, else by the values inside the input).
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

/// The gradient of [`AvgPool`]: each output's gradient is spread evenly over its window's
/// inputs, with the forward's divisor.
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

impl PoolGeom {
    /// The geometry for debug logs.
    fn describe(&self) -> String {
        let g = self;
        format!("{}x{}x{}x{} -> {}x{} k{}x{} s{}x{}", g.n, g.c, g.h, g.w, g.oh, g.ow, g.kh, g.kw, g.sh, g.sw)
    }
}

impl OpDesc for MaxPool {
    const NAME: &'static str = "max_pool";
    buffer_table!(|o, f| {
        f(r!(o.x), o.g.input_len(), R);
        f(r!(o.y), o.g.output_len(), W);
        f(r!(o.argmax), o.g.output_len(), W);
    });
    fn shapes(&self) -> String {
        self.g.describe()
    }
}

impl OpDesc for MaxPoolBackward {
    const NAME: &'static str = "max_pool_backward";
    buffer_table!(|o, f| {
        f(r!(o.argmax), o.g.output_len(), R);
        f(r!(o.dy), o.g.output_len(), R);
        f(r!(o.dx.buf), o.g.input_len(), grad_access(o.dx.accumulate));
    });
    fn shapes(&self) -> String {
        self.g.describe()
    }
}

impl OpDesc for AvgPool {
    const NAME: &'static str = "avg_pool";
    buffer_table!(|o, f| {
        f(r!(o.x), o.g.input_len(), R);
        f(r!(o.y), o.g.output_len(), W);
    });
    fn shapes(&self) -> String {
        self.g.describe()
    }
}

impl OpDesc for AvgPoolBackward {
    const NAME: &'static str = "avg_pool_backward";
    buffer_table!(|o, f| {
        f(r!(o.dy), o.g.output_len(), R);
        f(r!(o.dx.buf), o.g.input_len(), grad_access(o.dx.accumulate));
    });
    fn shapes(&self) -> String {
        self.g.describe()
    }
}
