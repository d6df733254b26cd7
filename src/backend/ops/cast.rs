//! Number-format conversion for mixed precision (`Precision::Bf16Mixed` in `exec`): f32 to a
//! half-precision dtype (bf16 or f16) where an activation enters the half channels-last part of
//! a plan, back to f32 where it leaves it, optionally moving the values between channels-first
//! and channels-last order in the same pass (tensor cores read NHWC). The compiler inserts these
//! (`exec/autocast.rs`); no layer lowers to them.

use super::{BufId, GradOut, MemoryFormat, Op, OpDesc};
use crate::{Error, Result};

/// A per-channel bias added while widening a convolution's half-precision output: the value at
/// channels-first index `i` (its index in the NCHW tensor, whichever order `dst` is in) gets
/// `buf[(i / inner) % channels]` (`inner` is the plane size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CastBias {
    /// The bias (f32, `channels` values).
    pub buf: BufId,
    /// Channels.
    pub channels: usize,
    /// Values per channel and sample.
    pub inner: usize,
}

/// A change of memory order made while casting: `n` blocks (images; a filter's output
/// channels) of `c` channels by `hw` positions. `to: Nhwc` reads `src` as `[n, c, hw]` and
/// writes `dst` as `[n, hw, c]`; `to: Nchw` the reverse. A filter `[k, c, kh, kw]` becomes
/// cuDNN's NHWC filter `[k, kh, kw, c]` with `n = k`, `hw = kh * kw`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CastPermute {
    /// Blocks.
    pub n: usize,
    /// Channels per block.
    pub c: usize,
    /// Positions per channel.
    pub hw: usize,
    /// The order `dst` is written in (`src` is in the other).
    pub to: MemoryFormat,
}

impl CastPermute {
    /// The source index and the channels-first index of destination value `j`.
    pub fn source_of(&self, j: usize) -> (usize, usize) {
        let (c, hw) = (self.c, self.hw);
        match self.to {
            // dst [n, hw, c] <- src [n, c, hw]
            MemoryFormat::Nhwc => {
                let (b, r) = (j / (hw * c), j % (hw * c));
                let (p, ch) = (r / c, r % c);
                let s = (b * c + ch) * hw + p;
                (s, s)
            }
            // dst [n, c, hw] <- src [n, hw, c]
            MemoryFormat::Nchw => {
                let (b, r) = (j / (c * hw), j % (c * hw));
                let (ch, p) = (r / hw, r % hw);
                ((b * hw + p) * c + ch, j)
            }
        }
    }
}

/// `dst (=|+=) convert(src) (+ bias)` over `len` values, permuted where `permute` says. The
/// direction comes from the buffers' dtypes: f32 to bf16 or f16 rounds to nearest even (NaN
/// stays NaN, overflow goes to infinity, as PyTorch's `.to(torch.bfloat16)` and
/// `.to(torch.float16)`); bf16 or f16 to f32 is exact; a half type to itself only permutes.
/// Accumulating into a half destination adds in f32 and rounds once; a bias needs an f32
/// destination.
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
    /// A change between channels-first and channels-last order, made in the same pass.
    pub permute: Option<CastPermute>,
}

impl Op {
    /// Whether the op may name half-precision (bf16, f16) buffers: the casts, the convolutions
    /// and matrix products that mixed precision runs on tensor cores, and the ops it runs on
    /// half channels-last activations between them (batch norm, element-wise activations,
    /// sums and gradient copies); parameters, their gradients and statistics stay f32. A
    /// backend that computes in half precision still checks each such op's dtypes itself.
    pub fn takes_half(&self) -> bool {
        matches!(
            self,
            Op::Cast(_)
                | Op::Conv2d(_)
                | Op::Conv2dBackward(_)
                | Op::Linear(_)
                | Op::LinearBackward(_)
                | Op::BatchNormTrain(_)
                | Op::BatchNormInfer(_)
                | Op::BatchNormBackward(_)
                | Op::Act(_)
                | Op::ActBackward(_)
                | Op::Add(_)
                | Op::GradInto(_)
        )
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
        let permute =
            self.permute.map(|p| format!(", to {} {}x{}x{}", p.to.name(), p.n, p.c, p.hw)).unwrap_or_default();
        format!("{}{acc}{bias}{permute}", self.len)
    }
    fn check(&self) -> Result<()> {
        if let Some(b) = self.bias
            && (b.channels == 0 || b.inner == 0)
        {
            return Err(Error::shape("cast bias", "at least one channel of at least one value", format!("{b:?}")));
        }
        if let Some(p) = self.permute
            && p.n.checked_mul(p.c).and_then(|v| v.checked_mul(p.hw)) != Some(self.len)
        {
            return Err(Error::shape(
                "cast permutation",
                format!("n * c * hw = {} values", self.len),
                format!("{} x {} x {}", p.n, p.c, p.hw),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_indices_invert_each_other() {
        let (n, c, hw) = (2, 3, 5);
        let to_nhwc = CastPermute { n, c, hw, to: MemoryFormat::Nhwc };
        let to_nchw = CastPermute { to: MemoryFormat::Nchw, ..to_nhwc };
        for j in 0..n * c * hw {
            let (s, i) = to_nhwc.source_of(j);
            // NHWC value j (image b, position p, channel ch) came from NCHW s.
            let (b, p, ch) = (j / (hw * c), (j / c) % hw, j % c);
            assert_eq!((s, i), ((b * c + ch) * hw + p, s));
            // And back: NCHW value s reads NHWC j.
            assert_eq!(to_nchw.source_of(s), (j, s));
        }
    }

    #[test]
    fn a_permutation_must_cover_the_cast() {
        let p = CastPermute { n: 2, c: 3, hw: 4, to: MemoryFormat::Nhwc };
        let dst = GradOut { buf: BufId(1), accumulate: false };
        let cast = |len| Cast { len, src: BufId(0), dst, bias: None, permute: Some(p) };
        assert!(cast(24).check().is_ok());
        let e = cast(25).check().unwrap_err().to_string();
        assert!(e.contains("permutation") && e.contains("2 x 3 x 4"), "{e}");
    }
}
