//! 2-D transposed convolution on the CPU (PyTorch's `nn.ConvTranspose2d`), built from the
//! convolution's im2col pieces (`conv2d.rs`).
//!
//! `g` is the geometry of the convolution being transposed (see `backend/ops/conv_transpose.rs`):
//! this op's input `x` is `[n, k, oh, ow]`, its output `y` is `[n, c, h, w]`, its weight
//! `[k, c/groups, kh, kw]`. Per image and group, with `cg = c/groups`, `kg = k/groups` and
//! `col` of `[cg*kh*kw, oh*ow]`:
//! - forward: `col = w_g^T * x_g`, folded onto `y_g` (col2im), plus the bias;
//! - input gradient: `dx_g = w_g * im2col(dy_g)` (the convolution's forward);
//! - weight gradient: `dw_g += x_g * im2col(dy_g)^T`, bias gradient: `db[c] += sum(dy_c)`.
//!
//! Work is split into one contiguous range of images per thread, as in `conv2d.rs`; each range
//! accumulates its own weight and bias gradient, summed in order afterwards, so results are
//! identical run to run for a given thread count.

use rayon::prelude::*;

use super::CpuBackend;
use super::WeightGrads;
use super::conv2d::{Scratch, add_bias, col2im_add, im2col, reduce_into, resize, split};
use super::float::Float;
use super::matmul::{Mat, matmul};
use crate::Result;
use crate::backend::ops::ConvGeom;
use crate::backend::ops::{self, RunOp};

/// `y = conv_transpose(x, w) + b`.
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
    let (per_x, per_y) = (g.k * ohw, g.c * hw);
    let (_, per, inner) = split(g.n, threads);
    y.par_chunks_mut(per * per_y).zip(scratch.par_iter_mut()).enumerate().for_each(|(ci, (ychunk, s))| {
        resize(&mut s.col, cg * kk * ohw);
        for (j, yimg) in ychunk.chunks_mut(per_y).enumerate() {
            let ximg = &x[(ci * per + j) * per_x..][..per_x];
            yimg.fill(T::ZERO);
            for grp in 0..g.groups {
                let xg = &ximg[grp * kg * ohw..][..kg * ohw];
                let wg = &w[grp * kg * cg * kk..][..kg * cg * kk];
                matmul(&mut s.col, ohw, false, Mat::rm(wg, kg, cg * kk).t(), Mat::rm(xg, kg, ohw), inner);
                col2im_add(g, cg, &s.col, &mut yimg[grp * cg * hw..][..cg * hw]);
            }
            if let Some(b) = b {
                add_bias(yimg, b, hw);
            }
        }
    });
}

/// Gradients of a transposed convolution. `dx`, `dw` and `db` are `(buffer, accumulate)`.
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
    let (per_x, per_y) = (g.k * ohw, g.c * hw);
    let (chunks, per, inner) = split(g.n, threads);
    let wlen = g.weight_len();
    let dx_acc = dx.as_ref().is_some_and(|d| d.1);
    let mut dx_chunks: Vec<Option<&mut [T]>> = match dx {
        Some((d, _)) => d.chunks_mut(per * per_x).map(Some).collect(),
        None => (0..chunks).map(|_| None).collect(),
    };
    let work: Vec<_> = dx_chunks.drain(..).zip(scratch.iter_mut()).enumerate().collect();
    work.into_par_iter().for_each(|(ci, (mut dxc, s))| {
        resize(&mut s.dw, wlen);
        s.dw.fill(T::ZERO);
        resize(&mut s.db, g.c);
        s.db.fill(T::ZERO);
        resize(&mut s.col, cg * kk * ohw);
        let first = ci * per;
        for j in 0..per.min(g.n - first) {
            let img = first + j;
            let ximg = &x[img * per_x..][..per_x];
            let dyimg = &dy[img * per_y..][..per_y];
            let mut dximg = dxc.as_deref_mut().map(|d| &mut d[j * per_x..(j + 1) * per_x]);
            for grp in 0..g.groups {
                let xg = &ximg[grp * kg * ohw..][..kg * ohw];
                let wg = &w[grp * kg * cg * kk..][..kg * cg * kk];
                let Scratch { col, dw: sdw, .. } = &mut *s;
                im2col(g, cg, &dyimg[grp * cg * hw..][..cg * hw], col);
                let dwg = &mut sdw[grp * kg * cg * kk..][..kg * cg * kk];
                matmul(dwg, cg * kk, true, Mat::rm(xg, kg, ohw), Mat::rm(col, cg * kk, ohw).t(), inner);
                if let Some(d) = dximg.as_deref_mut() {
                    let dxg = &mut d[grp * kg * ohw..][..kg * ohw];
                    matmul(dxg, ohw, dx_acc, Mat::rm(wg, kg, cg * kk), Mat::rm(col, cg * kk, ohw), inner);
                }
            }
            for (o, plane) in dyimg.chunks(hw).enumerate() {
                s.db[o] += plane.iter().copied().sum::<T>();
            }
        }
    });
    reduce_into(dw, scratch[..chunks].iter().map(|s| s.dw.as_slice()));
    if let Some(db) = db {
        reduce_into(db, scratch[..chunks].iter().map(|s| s.db.as_slice()));
    }
}

impl<T: Float> RunOp<ops::ConvTranspose2d> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::ConvTranspose2d) -> Result<()> {
        let ops::ConvTranspose2d { g, x, w, b, y } = o;
        let threads = self.threads;
        let mut yv = self.take(*y);
        let bufs = &self.bufs;
        let bias = b.map(|b| bufs[b.0].as_slice());
        forward(g, &bufs[x.0], &bufs[w.0], bias, &mut yv, &mut self.scratch, threads);
        self.put(*y, yv);
        Ok(())
    }
}

impl<T: Float> RunOp<ops::ConvTranspose2dBackward> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::ConvTranspose2dBackward) -> Result<()> {
        let ops::ConvTranspose2dBackward { g, x, w, dy, dx, dw, db } = *o;
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

    /// The definition, one multiply-add per (input value, tap): `y[o, iy*s - p + ki*d, ...] +=
    /// x[i, iy, ix] * w[i, o % cg, ki, kj]`, taps outside the output dropped.
    fn naive(g: &ConvGeom, x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
        let (cg, kg) = (g.c / g.groups, g.k / g.groups);
        let mut y = vec![0.0; g.input_len()];
        for n in 0..g.n {
            for i in 0..g.k {
                let grp = i / kg;
                for iy in 0..g.oh {
                    for ix in 0..g.ow {
                        let xv = x[((n * g.k + i) * g.oh + iy) * g.ow + ix];
                        for oc in 0..cg {
                            let o = grp * cg + oc;
                            for ki in 0..g.kh {
                                for kj in 0..g.kw {
                                    let yy = (iy * g.sh + ki * g.dh) as isize - g.ph as isize;
                                    let yx = (ix * g.sw + kj * g.dw) as isize - g.pw as isize;
                                    if yy < 0 || yx < 0 || yy >= g.h as isize || yx >= g.w as isize {
                                        continue;
                                    }
                                    let wv = w[((i * cg + oc) * g.kh + ki) * g.kw + kj];
                                    y[((n * g.c + o) * g.h + yy as usize) * g.w + yx as usize] += xv * wv;
                                }
                            }
                        }
                    }
                }
            }
        }
        for (k, v) in y.iter_mut().enumerate() {
            *v += b[(k / (g.h * g.w)) % g.c];
        }
        y
    }

    fn values(n: usize, seed: u64) -> Vec<f64> {
        (0..n).map(|i| (((i as u64 * 2654435761 + seed) % 1000) as f64) / 500.0 - 1.0).collect()
    }

    #[test]
    fn forward_matches_the_definition() {
        // (in k, out c, groups, kernel, stride, padding, dilation, output padding), input 3x4.
        let cases = [
            (2, 3, 1, (3, 3), (1, 1), (0, 0), (1, 1), (0, 0)),
            (4, 2, 2, (3, 2), (2, 3), (1, 0), (1, 1), (1, 2)),
            (3, 6, 3, (2, 3), (2, 1), (0, 1), (2, 3), (1, 0)),
            (2, 2, 1, (1, 1), (3, 2), (0, 0), (1, 1), (2, 1)),
        ];
        for (k, c, groups, (kh, kw), (sh, sw), (ph, pw), (dh, dw), (oph, opw)) in cases {
            let (oh, ow) = (3, 4);
            let h = (oh - 1) * sh + dh * (kh - 1) + oph + 1 - 2 * ph;
            let w = (ow - 1) * sw + dw * (kw - 1) + opw + 1 - 2 * pw;
            let g = ConvGeom { n: 2, c, h, w, k, kh, kw, sh, sw, ph, pw, dh, dw, groups, oh, ow };
            let (x, wt, b) = (values(g.output_len(), 1), values(g.weight_len(), 7), values(c, 3));
            let want = naive(&g, &x, &wt, &b);
            for threads in [1, 3] {
                let mut y = vec![f64::NAN; g.input_len()];
                let mut scratch: Vec<Scratch<f64>> = (0..threads).map(|_| Scratch::default()).collect();
                forward(&g, &x, &wt, Some(&b), &mut y, &mut scratch, threads);
                for (a, e) in y.iter().zip(&want) {
                    assert!((a - e).abs() < 1e-12, "{g:?}: {a} vs {e}");
                }
            }
        }
    }
}
