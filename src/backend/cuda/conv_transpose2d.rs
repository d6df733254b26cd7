//! 2-D transposed convolutions on the GPU through cuDNN: the convolution machinery of
//! `conv2d.rs` (descriptors, timed algorithm choice, shared workspace) with the directions
//! swapped. The op's geometry is that of the convolution it transposes (see
//! `backend/ops/conv_transpose.rs`), so:
//! - forward `y = convT(x, w)` is cuDNN's backward-data with `x` as the output gradient;
//! - the input gradient `dx = conv(dy, w)` is cuDNN's forward;
//! - the weight gradient is cuDNN's backward-filter with `dy` as the input and `x` as the output
//!   gradient;
//! - bias add and bias gradient are kiln's kernels (`join.rs`).
//!
//! cuDNN derives the convolution's output size from its input, so it can only describe
//! `output_padding < stride` (PyTorch also accepts `stride <= output_padding < dilation`; the
//! rows and columns that adds reach no input). Such a geometry is refused with an error naming
//! it; the CPU backend computes it.

use super::CudaBackend;
use super::conv2d::{Dir, cudnn_lock};
use crate::backend::ops::RunOp;
use crate::backend::ops::{self, ConvGeom};
use crate::{Error, Result};

/// Refuses a geometry cuDNN cannot describe: one whose convolution output (this op's input) is
/// smaller than what the convolution's input size gives.
fn check(g: &ConvGeom) -> Result<()> {
    let out = |len: usize, pad: usize, d: usize, k: usize, s: usize| {
        (len + 2 * pad).checked_sub(d * (k - 1) + 1).map(|v| v / s + 1)
    };
    let want = (out(g.h, g.ph, g.dh, g.kh, g.sh), out(g.w, g.pw, g.dw, g.kw, g.sw));
    if want == (Some(g.oh), Some(g.ow)) {
        return Ok(());
    }
    Err(Error::Device {
        device: "cuda".into(),
        reason: format!(
            "conv_transpose2d with output_padding >= stride (input {}x{}, output {}x{}, stride {}x{}, dilation {}x{}) \
         on the CUDA backend: cuDNN cannot describe it; the CPU backend computes it",
            g.oh, g.ow, g.h, g.w, g.sh, g.sw, g.dh, g.dw
        ),
    })
}

impl RunOp<ops::ConvTranspose2d> for CudaBackend {
    fn run_op(&mut self, o: &ops::ConvTranspose2d) -> Result<()> {
        let ops::ConvTranspose2d { x, w, b, y, .. } = *o;
        let g = &o.g;
        check(g)?;
        let _lock = cudnn_lock();
        let (xp, wp, yp) = (self.ptr(x), self.ptr(w), self.ptr(y));
        let c = self.conv_algo(g, Dir::BackwardData, wp, xp)?;
        let ws = self.conv_workspace(c.memory)?;
        self.conv_run(g, c, (wp, xp), (yp, 0.0), ws)?;
        if let Some(b) = b {
            self.bias_add(y, b, g.n, g.c, g.h * g.w)?;
        }
        Ok(())
    }
}

impl RunOp<ops::ConvTranspose2dBackward> for CudaBackend {
    fn run_op(&mut self, o: &ops::ConvTranspose2dBackward) -> Result<()> {
        let ops::ConvTranspose2dBackward { x, w, dy, dx, dw, db, .. } = *o;
        let g = &o.g;
        check(g)?;
        let _lock = cudnn_lock();
        let (xp, wp, dyp) = (self.ptr(x), self.ptr(w), self.ptr(dy));
        let beta = |acc: bool| if acc { 1.0f32 } else { 0.0f32 };
        if let Some(dx) = dx {
            let c = self.conv_algo(g, Dir::Forward, dyp, wp)?;
            let ws = self.conv_workspace(c.memory)?;
            self.conv_run(g, c, (dyp, wp), (self.ptr(dx.buf), beta(dx.accumulate)), ws)?;
        }
        let c = self.conv_algo(g, Dir::BackwardFilter, dyp, xp)?;
        let ws = self.conv_workspace(c.memory)?;
        self.conv_run(g, c, (dyp, xp), (self.ptr(dw.buf), beta(dw.accumulate)), ws)?;
        if let Some(db) = db {
            self.channel_sum(dy, db, g.n, g.c, g.h * g.w)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geom(h: usize, s: usize, d: usize, oh: usize) -> ConvGeom {
        ConvGeom {
            n: 1,
            c: 1,
            h,
            w: h,
            k: 1,
            kh: 3,
            kw: 3,
            sh: s,
            sw: s,
            ph: 1,
            pw: 1,
            dh: d,
            dw: d,
            groups: 1,
            oh,
            ow: oh,
        }
    }

    #[test]
    fn output_padding_below_stride_is_described_and_beyond_it_refused() {
        // Input 4, stride 2, padding 1, kernel 3: output 7 + output_padding (0 or 1).
        assert!(check(&geom(7, 2, 1, 4)).is_ok());
        assert!(check(&geom(8, 2, 1, 4)).is_ok());
        // Stride 1, dilation 2, output_padding 1: output 4 - 1 - 2 + 4 + 1 + 1 = 7; cuDNN says 5.
        let e = check(&geom(7, 1, 2, 4)).unwrap_err().to_string();
        assert!(e.contains("output_padding >= stride"), "{e}");
    }
}
