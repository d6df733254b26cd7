//! Ops that combine or fill whole tensors: sums, channel concatenation, gradient copies, fills.

use super::{BufId, GradOut, OpDesc};

/// `y = sum(inputs)` over `len` values.
#[derive(Clone, Debug, PartialEq)]
pub struct Add {
    /// Number of values.
    pub len: usize,
    /// The summands.
    pub inputs: Vec<BufId>,
    /// Output.
    pub y: BufId,
}

/// Concatenation of `n` samples along channels: part `i` contributes `parts[i].1` channels
/// of `inner` values each.
#[derive(Clone, Debug, PartialEq)]
pub struct Concat {
    /// Output features.
    pub n: usize,
    /// Size of the inner axis.
    pub inner: usize,
    /// The parts: buffer and channels.
    pub parts: Vec<(BufId, usize)>,
    /// Output.
    pub y: BufId,
}

/// The gradient of a concatenation, split back to the parts that need one.
#[derive(Clone, Debug, PartialEq)]
pub struct ConcatBackward {
    /// Output features.
    pub n: usize,
    /// Size of the inner axis.
    pub inner: usize,
    /// The parts: buffer and channels.
    pub parts: Vec<(Option<GradOut>, usize)>,
    /// Gradient of the output.
    pub dy: BufId,
}

/// `dst = src` or `dst += src` over `len` values (the gradient of an addition).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradInto {
    /// Number of values.
    pub len: usize,
    /// Source.
    pub src: BufId,
    /// Destination.
    pub dst: GradOut,
}

/// Sets `len` values of `buf` to `value`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fill {
    /// Number of values.
    pub len: usize,
    /// The buffer.
    pub buf: BufId,
    /// The value.
    pub value: f32,
}

/// A list of channel counts for debug logs.
fn channel_list(parts: impl Iterator<Item = usize>) -> String {
    format!("{:?}", parts.collect::<Vec<_>>())
}

impl OpDesc for Add {
    const NAME: &'static str = "add";
    buffer_table!(|o, f| {
        for b in r!(o.inputs) {
            f(b, o.len, R);
        }
        f(r!(o.y), o.len, W);
    });
    fn shapes(&self) -> String {
        format!("{} x {}", self.inputs.len(), self.len)
    }
}

impl OpDesc for Concat {
    const NAME: &'static str = "concat";
    buffer_table!(|o, f| {
        let channels: usize = o.parts.iter().map(|p| p.1).sum();
        for (b, c) in r!(o.parts) {
            f(b, o.n * *c * o.inner, R);
        }
        f(r!(o.y), o.n * channels * o.inner, W);
    });
    fn shapes(&self) -> String {
        format!("{} x {} x {}", self.n, channel_list(self.parts.iter().map(|p| p.1)), self.inner)
    }
}

impl OpDesc for ConcatBackward {
    const NAME: &'static str = "concat_backward";
    buffer_table!(|o, f| {
        let channels: usize = o.parts.iter().map(|p| p.1).sum();
        for (d, c) in r!(o.parts) {
            if let Some(d) = d {
                f(r!(d.buf), o.n * *c * o.inner, grad_access(d.accumulate));
            }
        }
        f(r!(o.dy), o.n * channels * o.inner, R);
    });
    fn shapes(&self) -> String {
        format!("{} x {} x {}", self.n, channel_list(self.parts.iter().map(|p| p.1)), self.inner)
    }
}

impl OpDesc for GradInto {
    const NAME: &'static str = "grad_into";
    buffer_table!(|o, f| {
        f(r!(o.src), o.len, R);
        f(r!(o.dst.buf), o.len, grad_access(o.dst.accumulate));
    });
    fn shapes(&self) -> String {
        format!("{}", self.len)
    }
}

impl OpDesc for Fill {
    const NAME: &'static str = "fill";
    buffer_table!(|o, f| {
        f(r!(o.buf), o.len, W);
    });
    fn shapes(&self) -> String {
        format!("{}", self.len)
    }
}
