//! Ops that combine or fill whole tensors: sums, channel concatenation, gradient copies, fills.

use super::{BufId, GradOut};

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
