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
//! cuDNN derives the convolution's output size from its input, so it can describe the geometry
//! directly only when `output_padding < stride` (PyTorch also accepts `stride <= output_padding
//! < dilation`). Other geometries run as the transposed convolution with no padding over its
//! whole, uncropped output (`full`: `(oh - 1) * stride + dilation * (k - 1) + 1` rows), which
//! cuDNN describes exactly, through op scratch: forward computes that into the scratch and
//! crops rows and columns `[padding, padding + h)` into `y` (zeros past its end: those rows
//! get only the bias); backward pads `dy` the same way into the scratch and runs the input and
//! weight gradients on it. The bias gradient sums the unpadded `dy`.

use cudarc::driver::sys::CUdeviceptr;

use super::CudaBackend;
use super::conv2d::{Dir, cudnn_lock};
use super::nvrtc::ModuleSrc;
use crate::Result;
use crate::backend::DType;
use crate::backend::ops::RunOp;
use crate::backend::ops::{self, ConvGeom};

kernels! {
    crop_or_pad(src: (const float*), dst: (float*), planes: i64, src_h: i64, src_w: i64, dst_h: i64, dst_w: i64, top: i64, left: i64, pad: int);
}

pub(super) const MODULE: ModuleSrc = ModuleSrc {
    name: "conv_transpose2d",
    kernels: KERNELS,
    prototypes,
    source: r#"
// For each of `planes` planes: dst[i, j] = src[i + top, j + left] (crop, pad = 0) or
// src[i - top, j - left] (pad = 1), and 0 where that falls outside src.
extern "C" __global__ void crop_or_pad(const float* src, float* dst, i64 planes, i64 src_h, i64 src_w,
                                       i64 dst_h, i64 dst_w, i64 top, i64 left, int pad) {
    GRID_LOOP(t, planes * dst_h * dst_w) {
        i64 p = t / (dst_h * dst_w), i = t / dst_w % dst_h, j = t % dst_w;
        i64 si = pad ? i - top : i + top, sj = pad ? j - left : j + left;
        bool inside = si >= 0 && si < src_h && sj >= 0 && sj < src_w;
        dst[t] = inside ? src[(p * src_h + si) * src_w + sj] : 0.f;
    }
}
"#,
};

/// Whether cuDNN describes the geometry as it is: its convolution output size rule, applied to
/// `g.h x g.w` with `g`'s padding, gives this op's input size `g.oh x g.ow`.
fn cudnn_describes(g: &ConvGeom) -> bool {
    let out = |len: usize, pad: usize, d: usize, k: usize, s: usize| {
        (len + 2 * pad).checked_sub(d * (k - 1) + 1).map(|v| v / s + 1)
    };
    (out(g.h, g.ph, g.dh, g.kh, g.sh), out(g.w, g.pw, g.dw, g.kw, g.sw)) == (Some(g.oh), Some(g.ow))
}

/// The same transposed convolution with no padding, over its whole uncropped output (which
/// cuDNN always describes).
fn full(g: &ConvGeom) -> ConvGeom {
    let len = |o: usize, s: usize, d: usize, k: usize| (o - 1) * s + d * (k - 1) + 1;
    ConvGeom { h: len(g.oh, g.sh, g.dh, g.kh), w: len(g.ow, g.sw, g.dw, g.kw), ph: 0, pw: 0, ..*g }
}

impl CudaBackend {
    /// Copies between `g`'s output-shaped tensor `out` and the `full(g)`-shaped `whole`: crops
    /// `whole` into `out` (`pad` false) or pads `out` into `whole` (`pad` true).
    fn crop_or_pad(&self, g: &ConvGeom, whole: CUdeviceptr, out: CUdeviceptr, pad: bool) -> Result<()> {
        let f = full(g);
        let planes = g.n * g.c;
        let (src, dst, src_hw, dst_hw) =
            if pad { (out, whole, (g.h, g.w), (f.h, f.w)) } else { (whole, out, (f.h, f.w), (g.h, g.w)) };
        let args = crop_or_pad {
            src,
            dst,
            planes,
            src_h: src_hw.0,
            src_w: src_hw.1,
            dst_h: dst_hw.0,
            dst_w: dst_hw.1,
            top: g.ph,
            left: g.pw,
            pad: pad as i32,
        };
        self.launch_elems(planes * dst_hw.0 * dst_hw.1, &args)
    }
}

impl RunOp<ops::ConvTranspose2d> for CudaBackend {
    fn run_op(&mut self, o: &ops::ConvTranspose2d) -> Result<()> {
        let ops::ConvTranspose2d { x, w, b, y, .. } = *o;
        let g = &o.g;
        let _lock = cudnn_lock();
        let (xp, wp, yp) = (self.ptr(x), self.ptr(w), self.ptr(y));
        if cudnn_describes(g) {
            let c = self.conv_algo(g, Dir::BackwardData, wp, xp)?;
            let ws = self.conv_workspace(c.memory)?;
            self.conv_run(g, c, (wp, xp), (yp, 0.0), ws)?;
        } else {
            let f = full(g);
            let whole = self.op_scratch(f.input_len() * DType::F32.size())?;
            let c = self.conv_algo(&f, Dir::BackwardData, wp, xp)?;
            let ws = self.conv_workspace(c.memory)?;
            self.conv_run(&f, c, (wp, xp), (whole, 0.0), ws)?;
            self.crop_or_pad(g, whole, yp, false)?;
        }
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
        let _lock = cudnn_lock();
        let (xp, wp) = (self.ptr(x), self.ptr(w));
        // The geometry cuDNN runs and the output gradient it reads: `dy` itself, or `dy`
        // padded to the uncropped output.
        let (cg, dyp) = if cudnn_describes(g) {
            (*g, self.ptr(dy))
        } else {
            let f = full(g);
            let whole = self.op_scratch(f.input_len() * DType::F32.size())?;
            self.crop_or_pad(g, whole, self.ptr(dy), true)?;
            (f, whole)
        };
        let beta = |acc: bool| if acc { 1.0f32 } else { 0.0f32 };
        if let Some(dx) = dx {
            let c = self.conv_algo(&cg, Dir::Forward, dyp, wp)?;
            let ws = self.conv_workspace(c.memory)?;
            self.conv_run(&cg, c, (dyp, wp), (self.ptr(dx.buf), beta(dx.accumulate)), ws)?;
        }
        let c = self.conv_algo(&cg, Dir::BackwardFilter, dyp, xp)?;
        let ws = self.conv_workspace(c.memory)?;
        self.conv_run(&cg, c, (dyp, xp), (self.ptr(dw.buf), beta(dw.accumulate)), ws)?;
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

    /// cuDNN's size rule describes `output_padding < stride` directly; beyond it the geometry
    /// runs uncropped, and that geometry is one cuDNN describes with this op's input size.
    #[test]
    fn geometries_cudnn_cannot_describe_run_uncropped() {
        // Input 4, stride 2, padding 1, kernel 3: output 7 + output_padding (0 or 1).
        assert!(cudnn_describes(&geom(7, 2, 1, 4)));
        assert!(cudnn_describes(&geom(8, 2, 1, 4)));
        // Stride 1, dilation 2, output_padding 1: output 4 - 1 - 2 + 4 + 1 + 1 = 7; cuDNN says 5.
        let g = geom(7, 1, 2, 4);
        assert!(!cudnn_describes(&g));
        let f = full(&g);
        assert_eq!((f.h, f.w, f.ph, f.pw), (8, 8, 0, 0));
        assert!(cudnn_describes(&f));
        // Stride 2, dilation 3, output_padding 2 > padding 1, on a 3x5 input.
        let g = ConvGeom { h: 11, w: 15, oh: 3, ow: 5, sh: 2, sw: 2, dh: 3, dw: 3, ..geom(11, 2, 3, 3) };
        assert!(!cudnn_describes(&g));
        let f = full(&g);
        assert_eq!((f.h, f.w), (11, 15));
        assert!(cudnn_describes(&f));
    }
}
