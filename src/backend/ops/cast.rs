//! Number-format conversion for mixed precision (`Precision::Bf16Mixed` in `exec`): f32 to bf16
//! before a convolution or matrix product, bf16 back to f32 after it. The compiler inserts these
//! around the ops that run on tensor cores (`exec/autocast.rs`); no layer lowers to them.

use super::{BufId, GradOut, Op, OpDesc};

/// A per-channel bias added while widening a convolution's bf16 output: value `i` gets
/// `buf[(i / inner) % channels]` (NCHW: `inner` is the plane size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CastBias {
    /// The bias (f32, `channels` values).
    pub buf: BufId,
    /// Channels.
    pub channels: usize,
    /// Values per channel and sample.
    pub inner: usize,
}

/// `dst (=|+=) convert(src) (+ bias)` over `len` values. The direction comes from the buffers'
/// dtypes: f32 to bf16 rounds to nearest even (NaN stays NaN, overflow goes to infinity, as
/// PyTorch's `.to(torch.bfloat16)`); bf16 to f32 is exact. Accumulating and adding a bias
/// need an f32 destination.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cast {
    /// Number of values.
    pub len: usize,
    /// Source.
    pub src: BufId,
    /// Destination (accumulated into where `dst.accumulate`: a gradient summed over consumers
    /// or batches).
    pub dst: GradOut,
    /// A convolution's bias, fused into the widening of its output.
    pub bias: Option<CastBias>,
}

impl Op {
    /// Whether the op may name bf16 buffers: the casts, and the convolutions and matrix
    /// products that mixed precision runs on tensor cores (their bf16 operands come from casts;
    /// results, parameters and gradients of parameters stay f32). A backend that computes in
    /// bf16 still checks each such op's dtypes itself.
    pub fn takes_bf16(&self) -> bool {
        matches!(self, Op::Cast(_) | Op::Conv2d(_) | Op::Conv2dBackward(_) | Op::Linear(_) | Op::LinearBackward(_))
    }
}

impl OpDesc for Cast {
    const NAME: &'static str = "cast";
    buffer_table!(|o, f| {
        f(r!(o.src), o.len, R);
        f(r!(o.dst.buf), o.len, grad_access(o.dst.accumulate));
        if let Some(b) = r!(o.bias) {
            f(r!(b.buf), b.channels, R);
        }
    });
    fn shapes(&self) -> String {
        let acc = if self.dst.accumulate { ", accumulate" } else { "" };
        let bias = self.bias.map(|b| format!(", bias {}x{}", b.channels, b.inner)).unwrap_or_default();
        format!("{}{acc}{bias}", self.len)
    }
}
