//! 2-D convolution on the CPU: im2col + gemm per image, images split over the thread pool.
//!
//! Forward, per image and group: `y_g[K/G, OH*OW] = w_g[K/G, C/G*KH*KW] * col[C/G*KH*KW, OH*OW]`,
//! where `col` unfolds the input windows (skipped for pointwise 1x1 convolutions, whose `col` is
//! the input itself). Backward reuses the same unfolding: `dw_g += dy_g * col^T` and
//! `dcol = w_g^T * dy_g`, folded back into `dx` (col2im).
//!
//! Work is split into one contiguous range of images per thread; each range accumulates its own
//! filter and bias gradient, and the ranges are summed in order afterwards, so results are
//! identical run to run for a given thread count. With fewer images than threads, the threads
//! go to gemm instead.

use rayon::prelude::*;

use super::float::Float;
use super::matmul::{Mat, matmul};
use crate::backend::ops::ConvGeom;

/// Per-thread working memory, kept by the backend and reused every step.
#[derive(Default)]
pub struct Scratch<T> {
    pub col: Vec<T>,
    pub dcol: Vec<T>,
    pub dw: Vec<T>,
    pub db: Vec<T>,
}

fn resize<T: Float>(v: &mut Vec<T>, len: usize) {
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
fn im2col<T: Float>(g: &ConvGeom, cg: usize, x: &[T], col: &mut [T]) {
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
fn col2im_add<T: Float>(g: &ConvGeom, cg: usize, col: &[T], x: &mut [T]) {
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

/// How images are split: `(chunks, images per chunk, threads left for gemm)`.
fn split(n: usize, threads: usize) -> (usize, usize, usize) {
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
    let pointwise = g.is_pointwise();
    y.par_chunks_mut(per * per_out).zip(scratch.par_iter_mut()).enumerate().for_each(|(ci, (ychunk, s))| {
        if !pointwise {
            resize(&mut s.col, cg * kk * ohw);
        }
        for (j, yimg) in ychunk.chunks_mut(per_out).enumerate() {
            let ximg = &x[(ci * per + j) * per_in..][..per_in];
            for grp in 0..g.groups {
                let xg = &ximg[grp * cg * hw..][..cg * hw];
                let wg = &w[grp * kg * cg * kk..][..kg * cg * kk];
                let yg = &mut yimg[grp * kg * ohw..][..kg * ohw];
                if pointwise {
                    matmul(yg, ohw, false, Mat::rm(wg, kg, cg), Mat::rm(xg, cg, ohw), inner);
                } else {
                    im2col(g, cg, xg, &mut s.col);
                    matmul(yg, ohw, false, Mat::rm(wg, kg, cg * kk), Mat::rm(&s.col, cg * kk, ohw), inner);
                }
            }
            if let Some(b) = b {
                for (o, plane) in yimg.chunks_mut(ohw).enumerate() {
                    let bo = b[o];
                    plane.iter_mut().for_each(|v| *v += bo);
                }
            }
        }
    });
}

/// Gradients of a convolution. `dx`, `dw` and `db` are `(buffer, accumulate)`.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Float>(
    g: &ConvGeom,
    x: &[T],
    w: &[T],
    dy: &[T],
    dx: Option<(&mut [T], bool)>,
    dw: (&mut [T], bool),
    db: Option<(&mut [T], bool)>,
    scratch: &mut [Scratch<T>],
    threads: usize,
) {
    let (cg, kg) = (g.c / g.groups, g.k / g.groups);
    let (kk, ohw, hw) = (g.kh * g.kw, g.oh * g.ow, g.h * g.w);
    let (per_in, per_out) = (g.c * hw, g.k * ohw);
    let (chunks, per, inner) = split(g.n, threads);
    let pointwise = g.is_pointwise();
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
        if !pointwise {
            resize(&mut s.col, cg * kk * ohw);
            resize(&mut s.dcol, cg * kk * ohw);
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
                let dwg = &mut s.dw[grp * kg * cg * kk..][..kg * cg * kk];
                if pointwise {
                    matmul(dwg, cg, true, Mat::rm(dyg, kg, ohw), Mat::rm(xg, cg, ohw).t(), inner);
                    if let Some(d) = dximg.as_deref_mut() {
                        let dxg = &mut d[grp * cg * hw..][..cg * hw];
                        matmul(dxg, hw, dx_acc, Mat::rm(wg, kg, cg).t(), Mat::rm(dyg, kg, ohw), inner);
                    }
                } else {
                    im2col(g, cg, xg, &mut s.col);
                    matmul(dwg, cg * kk, true, Mat::rm(dyg, kg, ohw), Mat::rm(&s.col, cg * kk, ohw).t(), inner);
                    if let Some(d) = dximg.as_deref_mut() {
                        matmul(&mut s.dcol, ohw, false, Mat::rm(wg, kg, cg * kk).t(), Mat::rm(dyg, kg, ohw), inner);
                        col2im_add(g, cg, &s.dcol, &mut d[grp * cg * hw..][..cg * hw]);
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
fn reduce_into<'a, T: Float>(dst: (&mut [T], bool), parts: impl Iterator<Item = &'a [T]>) {
    let (d, acc) = dst;
    if !acc {
        d.fill(T::ZERO);
    }
    for p in parts {
        d.iter_mut().zip(p).for_each(|(a, &b)| *a += b);
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
