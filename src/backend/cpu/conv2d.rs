//! 2-D convolution on the CPU: im2col + gemm per image, images split over the thread pool.
//!
//! Forward, per image and group: `y_g[K/G, OH*OW] = w_g[K/G, C/G*KH*KW] * col[C/G*KH*KW, OH*OW]`,
//! where `col` unfolds the input windows (skipped for pointwise 1x1 convolutions, whose `col` is
//! the input itself). Backward reuses the same unfolding: `dw_g += dy_g * col^T` and
//! `dcol = w_g^T * dy_g`, folded back into `dx` (col2im).
//!
//! Stride-1 convolutions (the common case) unfold "wide": the input is padded once into scratch,
//! and each `col` row is one contiguous slice of the padded planes, as long as `L = (OH - 1) *
//! Wp + OW` (Wp the padded width), so the products compute an output `Wp` wide whose last
//! `Wp - OW` columns of each row are garbage and are dropped when copying out. Unfolding is then
//! `C/G*KH*KW` memory copies per image instead of `C/G*KH*KW*OH` short ones (on the MNIST CNN's
//! 3x3 layers the short copies cost as much as the matrix product; see BENCHMARKS.md).
//!
//! Work is split into one contiguous range of images per thread; each range accumulates its own
//! filter and bias gradient, and the ranges are summed in order afterwards, so results are
//! identical run to run for a given thread count. With fewer images than threads, the threads
//! go to gemm instead.

use rayon::prelude::*;

use super::CpuBackend;
use super::WeightGrads;
use super::float::Float;
use super::matmul::{Mat, matmul};
use crate::Result;
use crate::backend::ops::ConvGeom;
use crate::backend::ops::{self, RunOp};

/// Per-thread working memory, kept by the backend and reused every step.
#[derive(Default)]
pub struct Scratch<T> {
    pub col: Vec<T>,
    pub dcol: Vec<T>,
    pub dw: Vec<T>,
    pub db: Vec<T>,
    /// Padded input (wide lowering).
    pub xpad: Vec<T>,
    /// Wide output, or the wide output gradient in backward.
    pub ywide: Vec<T>,
    /// Padded input gradient (wide lowering).
    pub dxpad: Vec<T>,
}

/// How a convolution becomes matrix products.
#[derive(Clone, Copy)]
enum Lowering {
    /// 1x1, stride 1, no padding: the input is the matrix.
    Pointwise,
    /// Stride 1: wide unfolding of the padded input; `hp, wp` padded size, `l` row length.
    Wide { hp: usize, wp: usize, l: usize },
    /// Anything else: classic im2col.
    Im2col,
}

fn lowering(g: &ConvGeom) -> Lowering {
    if g.is_pointwise() {
        Lowering::Pointwise
    } else if g.sh == 1 && g.sw == 1 {
        let (hp, wp) = (g.h + 2 * g.ph, g.w + 2 * g.pw);
        Lowering::Wide { hp, wp, l: (g.oh - 1) * wp + g.ow }
    } else {
        Lowering::Im2col
    }
}

fn padded(g: &ConvGeom) -> bool {
    g.ph > 0 || g.pw > 0
}

/// Copies `cg` planes of `x` into `xp` with a zero border of `(ph, pw)`.
fn pad_into<T: Float>(g: &ConvGeom, cg: usize, hp: usize, wp: usize, x: &[T], xp: &mut [T]) {
    for c in 0..cg {
        let dst = &mut xp[c * hp * wp..(c + 1) * hp * wp];
        dst[..g.ph * wp].fill(T::ZERO);
        dst[(g.ph + g.h) * wp..].fill(T::ZERO);
        for iy in 0..g.h {
            let row = &mut dst[(iy + g.ph) * wp..(iy + g.ph + 1) * wp];
            row[..g.pw].fill(T::ZERO);
            row[g.pw + g.w..].fill(T::ZERO);
            row[g.pw..g.pw + g.w].copy_from_slice(&x[(c * g.h + iy) * g.w..][..g.w]);
        }
    }
}

/// Row `(c, ki, kj)` of the wide unfolding starts at this offset of the padded planes.
#[inline]
fn wide_offset(g: &ConvGeom, hp: usize, wp: usize, c: usize, ki: usize, kj: usize) -> usize {
    c * hp * wp + ki * g.dh * wp + kj * g.dw
}

fn unfold_wide<T: Float>(g: &ConvGeom, cg: usize, hp: usize, wp: usize, l: usize, src: &[T], col: &mut [T]) {
    for c in 0..cg {
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let r = (c * g.kh + ki) * g.kw + kj;
                let off = wide_offset(g, hp, wp, c, ki, kj);
                col[r * l..(r + 1) * l].copy_from_slice(&src[off..off + l]);
            }
        }
    }
}

/// The adjoint of [`unfold_wide`]: adds each row of `dcol` onto the padded planes `dst`.
fn fold_wide_add<T: Float>(g: &ConvGeom, cg: usize, hp: usize, wp: usize, l: usize, dcol: &[T], dst: &mut [T]) {
    for c in 0..cg {
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let r = (c * g.kh + ki) * g.kw + kj;
                let off = wide_offset(g, hp, wp, c, ki, kj);
                dst[off..off + l].iter_mut().zip(&dcol[r * l..(r + 1) * l]).for_each(|(d, &v)| *d += v);
            }
        }
    }
}

/// `y[o, oy, ox] = wide[o, oy * wp + ox]` for `kg` output planes.
fn compact<T: Float>(g: &ConvGeom, kg: usize, wp: usize, l: usize, wide: &[T], y: &mut [T]) {
    for o in 0..kg {
        for oy in 0..g.oh {
            y[(o * g.oh + oy) * g.ow..][..g.ow].copy_from_slice(&wide[o * l + oy * wp..][..g.ow]);
        }
    }
}

/// The inverse of [`compact`], with zeros in the garbage columns.
fn expand<T: Float>(g: &ConvGeom, kg: usize, wp: usize, l: usize, dy: &[T], wide: &mut [T]) {
    wide.fill(T::ZERO);
    for o in 0..kg {
        for oy in 0..g.oh {
            wide[o * l + oy * wp..][..g.ow].copy_from_slice(&dy[(o * g.oh + oy) * g.ow..][..g.ow]);
        }
    }
}

/// Adds the interior of the padded planes `dxp` onto `dx`.
fn unpad_add<T: Float>(g: &ConvGeom, cg: usize, hp: usize, wp: usize, dxp: &[T], dx: &mut [T]) {
    for c in 0..cg {
        for iy in 0..g.h {
            let src = &dxp[c * hp * wp + (iy + g.ph) * wp + g.pw..][..g.w];
            dx[(c * g.h + iy) * g.w..][..g.w].iter_mut().zip(src).for_each(|(d, &v)| *d += v);
        }
    }
}

pub(super) fn resize<T: Float>(v: &mut Vec<T>, len: usize) {
    if v.len() != len {
        v.resize(len, T::ZERO);
    }
}

/// First output index whose window tap lands at or after input index 0, and one past the last
/// whose tap lands before `len`, for a tap at offset `off` with stride `s` over `out` outputs.
fn valid_range(off: isize, s: usize, len: usize, out: usize) -> (usize, usize) {
    let s = s as isize;
    let lo = if off >= 0 { 0 } else { ((-off) + s - 1) / s };
    let last = len as isize - 1 - off;
    let hi = if last < 0 { 0 } else { (last / s + 1).min(out as isize) };
    let lo = lo.min(hi);
    (lo as usize, hi as usize)
}

/// Unfolds the `cg` channels of one image group `x` (`cg * h * w`) into `col`
/// (`cg*kh*kw` rows of `oh*ow`).
pub(super) fn im2col<T: Float>(g: &ConvGeom, cg: usize, x: &[T], col: &mut [T]) {
    let (h, w, oh, ow) = (g.h, g.w, g.oh, g.ow);
    let ohw = oh * ow;
    for c in 0..cg {
        let xc = &x[c * h * w..(c + 1) * h * w];
        for ki in 0..g.kh {
            let off_h = (ki * g.dh) as isize - g.ph as isize;
            for kj in 0..g.kw {
                let off_w = (kj * g.dw) as isize - g.pw as isize;
                let (lo, hi) = valid_range(off_w, g.sw, w, ow);
                let row = &mut col[((c * g.kh + ki) * g.kw + kj) * ohw..][..ohw];
                for oy in 0..oh {
                    let iy = (oy * g.sh) as isize + off_h;
                    let r = &mut row[oy * ow..(oy + 1) * ow];
                    if iy < 0 || iy >= h as isize {
                        r.fill(T::ZERO);
                        continue;
                    }
                    r[..lo].fill(T::ZERO);
                    r[hi..].fill(T::ZERO);
                    let xrow = &xc[iy as usize * w..(iy as usize + 1) * w];
                    if g.sw == 1 {
                        let start = (lo as isize + off_w) as usize;
                        r[lo..hi].copy_from_slice(&xrow[start..start + (hi - lo)]);
                    } else {
                        for ox in lo..hi {
                            r[ox] = xrow[((ox * g.sw) as isize + off_w) as usize];
                        }
                    }
                }
            }
        }
    }
}

/// Folds `col` back onto the image group `x`, adding (the adjoint of [`im2col`]).
pub(super) fn col2im_add<T: Float>(g: &ConvGeom, cg: usize, col: &[T], x: &mut [T]) {
    let (h, w, oh, ow) = (g.h, g.w, g.oh, g.ow);
    let ohw = oh * ow;
    for c in 0..cg {
        let xc = &mut x[c * h * w..(c + 1) * h * w];
        for ki in 0..g.kh {
            let off_h = (ki * g.dh) as isize - g.ph as isize;
            for kj in 0..g.kw {
                let off_w = (kj * g.dw) as isize - g.pw as isize;
                let (lo, hi) = valid_range(off_w, g.sw, w, ow);
                let row = &col[((c * g.kh + ki) * g.kw + kj) * ohw..][..ohw];
                for oy in 0..oh {
                    let iy = (oy * g.sh) as isize + off_h;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let r = &row[oy * ow..(oy + 1) * ow];
                    let xrow = &mut xc[iy as usize * w..(iy as usize + 1) * w];
                    for ox in lo..hi {
                        xrow[((ox * g.sw) as isize + off_w) as usize] += r[ox];
                    }
                }
            }
        }
    }
}

/// Adds `b[o]` to every value of plane `o` of one image (`img` holds planes of `plane` values).
pub(super) fn add_bias<T: Float>(img: &mut [T], b: &[T], plane: usize) {
    for (o, p) in img.chunks_mut(plane).enumerate() {
        let bo = b[o];
        p.iter_mut().for_each(|v| *v += bo);
    }
}

/// How images are split: `(chunks, images per chunk, threads left for gemm)`.
pub(super) fn split(n: usize, threads: usize) -> (usize, usize, usize) {
    let chunks = threads.min(n).max(1);
    let per = n.div_ceil(chunks);
    let chunks = n.div_ceil(per);
    let inner = if chunks < threads { threads } else { 1 };
    (chunks, per, inner)
}

/// `y = conv(x, w) + b`.
pub fn forward<T: Float>(
    g: &ConvGeom,
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    y: &mut [T],
    scratch: &mut [Scratch<T>],
    threads: usize,
) {
    let (cg, kg) = (g.c / g.groups, g.k / g.groups);
    let (kk, ohw, hw) = (g.kh * g.kw, g.oh * g.ow, g.h * g.w);
    let (per_in, per_out) = (g.c * hw, g.k * ohw);
    let (_, per, inner) = split(g.n, threads);
    let lower = lowering(g);
    y.par_chunks_mut(per * per_out).zip(scratch.par_iter_mut()).enumerate().for_each(|(ci, (ychunk, s))| {
        match lower {
            Lowering::Pointwise => {}
            Lowering::Im2col => resize(&mut s.col, cg * kk * ohw),
            Lowering::Wide { hp, l, wp } => {
                resize(&mut s.col, cg * kk * l);
                resize(&mut s.ywide, kg * l);
                if padded(g) {
                    resize(&mut s.xpad, cg * hp * wp);
                }
            }
        }
        for (j, yimg) in ychunk.chunks_mut(per_out).enumerate() {
            let ximg = &x[(ci * per + j) * per_in..][..per_in];
            for grp in 0..g.groups {
                let xg = &ximg[grp * cg * hw..][..cg * hw];
                let wg = &w[grp * kg * cg * kk..][..kg * cg * kk];
                let yg = &mut yimg[grp * kg * ohw..][..kg * ohw];
                match lower {
                    Lowering::Pointwise => matmul(yg, ohw, false, Mat::rm(wg, kg, cg), Mat::rm(xg, cg, ohw), inner),
                    Lowering::Im2col => {
                        im2col(g, cg, xg, &mut s.col);
                        matmul(yg, ohw, false, Mat::rm(wg, kg, cg * kk), Mat::rm(&s.col, cg * kk, ohw), inner);
                    }
                    Lowering::Wide { hp, wp, l } => {
                        let Scratch { col, ywide, xpad, .. } = &mut *s;
                        let src: &[T] = if padded(g) {
                            pad_into(g, cg, hp, wp, xg, xpad);
                            xpad
                        } else {
                            xg
                        };
                        unfold_wide(g, cg, hp, wp, l, src, col);
                        matmul(ywide, l, false, Mat::rm(wg, kg, cg * kk), Mat::rm(col, cg * kk, l), inner);
                        compact(g, kg, wp, l, ywide, yg);
                    }
                }
            }
            if let Some(b) = b {
                add_bias(yimg, b, ohw);
            }
        }
    });
}

/// Gradients of a convolution. `dx`, `dw` and `db` are `(buffer, accumulate)`.
pub fn backward<T: Float>(
    g: &ConvGeom,
    x: &[T],
    w: &[T],
    dy: &[T],
    (dx, dw, db): WeightGrads<'_, T>,
    scratch: &mut [Scratch<T>],
    threads: usize,
) {
    let (cg, kg) = (g.c / g.groups, g.k / g.groups);
    let (kk, ohw, hw) = (g.kh * g.kw, g.oh * g.ow, g.h * g.w);
    let (per_in, per_out) = (g.c * hw, g.k * ohw);
    let (chunks, per, inner) = split(g.n, threads);
    let pointwise = g.is_pointwise();
    let lower = lowering(g);
    let wlen = g.weight_len();
    let dx_acc = dx.as_ref().map(|d| d.1).unwrap_or(false);
    let mut dx_chunks: Vec<Option<&mut [T]>> = match dx {
        Some((d, _)) => d.chunks_mut(per * per_in).map(Some).collect(),
        None => (0..chunks).map(|_| None).collect(),
    };
    let work: Vec<_> = dx_chunks.drain(..).zip(scratch.iter_mut()).enumerate().collect();
    work.into_par_iter().for_each(|(ci, (mut dxc, s))| {
        resize(&mut s.dw, wlen);
        s.dw.fill(T::ZERO);
        resize(&mut s.db, g.k);
        s.db.fill(T::ZERO);
        match lower {
            Lowering::Pointwise => {}
            Lowering::Im2col => {
                resize(&mut s.col, cg * kk * ohw);
                resize(&mut s.dcol, cg * kk * ohw);
            }
            Lowering::Wide { hp, wp, l } => {
                resize(&mut s.col, cg * kk * l);
                resize(&mut s.dcol, cg * kk * l);
                resize(&mut s.ywide, kg * l);
                if padded(g) {
                    resize(&mut s.xpad, cg * hp * wp);
                    resize(&mut s.dxpad, cg * hp * wp);
                }
            }
        }
        let first = ci * per;
        let count = per.min(g.n - first);
        for j in 0..count {
            let img = first + j;
            let ximg = &x[img * per_in..][..per_in];
            let dyimg = &dy[img * per_out..][..per_out];
            let mut dximg = dxc.as_deref_mut().map(|d| &mut d[j * per_in..(j + 1) * per_in]);
            if let Some(d) = dximg.as_deref_mut()
                && !dx_acc
                && !pointwise
            {
                d.fill(T::ZERO);
            }
            for grp in 0..g.groups {
                let xg = &ximg[grp * cg * hw..][..cg * hw];
                let wg = &w[grp * kg * cg * kk..][..kg * cg * kk];
                let dyg = &dyimg[grp * kg * ohw..][..kg * ohw];
                let Scratch { col, dcol, ywide, xpad, dxpad, dw: sdw, .. } = &mut *s;
                let dwg = &mut sdw[grp * kg * cg * kk..][..kg * cg * kk];
                match lower {
                    Lowering::Pointwise => {
                        matmul(dwg, cg, true, Mat::rm(dyg, kg, ohw), Mat::rm(xg, cg, ohw).t(), inner);
                        if let Some(d) = dximg.as_deref_mut() {
                            let dxg = &mut d[grp * cg * hw..][..cg * hw];
                            matmul(dxg, hw, dx_acc, Mat::rm(wg, kg, cg).t(), Mat::rm(dyg, kg, ohw), inner);
                        }
                    }
                    Lowering::Im2col => {
                        im2col(g, cg, xg, col);
                        matmul(dwg, cg * kk, true, Mat::rm(dyg, kg, ohw), Mat::rm(col, cg * kk, ohw).t(), inner);
                        if let Some(d) = dximg.as_deref_mut() {
                            matmul(dcol, ohw, false, Mat::rm(wg, kg, cg * kk).t(), Mat::rm(dyg, kg, ohw), inner);
                            col2im_add(g, cg, dcol, &mut d[grp * cg * hw..][..cg * hw]);
                        }
                    }
                    Lowering::Wide { hp, wp, l } => {
                        let src: &[T] = if padded(g) {
                            pad_into(g, cg, hp, wp, xg, xpad);
                            xpad
                        } else {
                            xg
                        };
                        unfold_wide(g, cg, hp, wp, l, src, col);
                        expand(g, kg, wp, l, dyg, ywide);
                        matmul(dwg, cg * kk, true, Mat::rm(ywide, kg, l), Mat::rm(col, cg * kk, l).t(), inner);
                        if let Some(d) = dximg.as_deref_mut() {
                            let dxg = &mut d[grp * cg * hw..][..cg * hw];
                            matmul(dcol, l, false, Mat::rm(wg, kg, cg * kk).t(), Mat::rm(ywide, kg, l), inner);
                            if padded(g) {
                                dxpad.fill(T::ZERO);
                                fold_wide_add(g, cg, hp, wp, l, dcol, dxpad);
                                unpad_add(g, cg, hp, wp, dxpad, dxg);
                            } else {
                                fold_wide_add(g, cg, hp, wp, l, dcol, dxg);
                            }
                        }
                    }
                }
            }
            for (o, plane) in dyimg.chunks(ohw).enumerate() {
                s.db[o] += plane.iter().copied().sum::<T>();
            }
        }
    });
    reduce_into(dw, scratch[..chunks].iter().map(|s| s.dw.as_slice()));
    if let Some(db) = db {
        reduce_into(db, scratch[..chunks].iter().map(|s| s.db.as_slice()));
    }
}

/// `dst = sum(parts)` (or `dst += sum(parts)`), summing the parts in order.
pub(super) fn reduce_into<'a, T: Float>(dst: (&mut [T], bool), parts: impl Iterator<Item = &'a [T]>) {
    let (d, acc) = dst;
    if !acc {
        d.fill(T::ZERO);
    }
    for p in parts {
        d.iter_mut().zip(p).for_each(|(a, &b)| *a += b);
    }
}

/// The CPU's convolutions are channels-first; channels-last ones come only from mixed precision,
/// which is not planned here.
fn nchw_only(op: &str, format: ops::MemoryFormat) -> Result<()> {
    match format {
        ops::MemoryFormat::Nchw => Ok(()),
        f => Err(crate::Error::State(format!("{op} in {}: the CPU backend's convolutions are NCHW only", f.name()))),
    }
}

impl<T: Float> RunOp<ops::Conv2d> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::Conv2d) -> Result<()> {
        let ops::Conv2d { g, format, x, w, b, y } = o;
        nchw_only("conv2d", *format)?;
        let threads = self.threads;
        let mut yv = self.take(*y);
        let bufs = &self.bufs;
        forward(g, &bufs[x.0], &bufs[w.0], b.map(|b| bufs[b.0].as_slice()), &mut yv, &mut self.scratch, threads);
        self.put(*y, yv);
        Ok(())
    }
}

impl<T: Float> RunOp<ops::Conv2dBackward> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::Conv2dBackward) -> Result<()> {
        let ops::Conv2dBackward { g, format, x, w, dy, dx, dw, db } = *o;
        nchw_only("conv2d_backward", format)?;
        self.with_weight_grads((dx, dw, db), |b, grads| {
            let bufs = &b.bufs;
            backward(&g, &bufs[x.0], &bufs[w.0], &bufs[dy.0], grads, &mut b.scratch, b.threads)
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_range_matches_brute_force() {
        for len in 1..7 {
            for s in 1..4 {
                for off in -4isize..5 {
                    for out in 0..8 {
                        let (lo, hi) = valid_range(off, s, len, out);
                        let ok: Vec<usize> = (0..out)
                            .filter(|&o| {
                                let i = (o * s) as isize + off;
                                i >= 0 && i < len as isize
                            })
                            .collect();
                        let got: Vec<usize> = (lo..hi).collect();
                        assert_eq!(ok, got, "len {len} s {s} off {off} out {out}");
                    }
                }
            }
        }
    }
}
