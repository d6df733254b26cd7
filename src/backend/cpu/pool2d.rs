//! Max and average pooling on the CPU, one `h x w` plane per task.

use rayon::prelude::*;

use super::CpuBackend;
use super::float::Float;
use super::store;
use crate::Result;
use crate::backend::ops::PoolGeom;
use crate::backend::ops::{self, RunOp};

/// The clipped window of output `(oy, ox)` and PyTorch's `count_include_pad` divisor.
#[inline]
fn window(g: &PoolGeom, oy: usize, ox: usize, count_include_pad: bool) -> (usize, usize, usize, usize, usize) {
    let hs = (oy * g.sh) as isize - g.ph as isize;
    let ws = (ox * g.sw) as isize - g.pw as isize;
    let he = (hs + g.kh as isize).min((g.h + g.ph) as isize);
    let we = (ws + g.kw as isize).min((g.w + g.pw) as isize);
    let padded = ((he - hs) * (we - ws)) as usize;
    let (h0, w0) = (hs.max(0) as usize, ws.max(0) as usize);
    let (h1, w1) = (he.min(g.h as isize) as usize, we.min(g.w as isize) as usize);
    let div = if count_include_pad { padded } else { (h1 - h0) * (w1 - w0) };
    (h0, h1, w0, w1, div)
}

pub fn max_forward<T: Float>(g: &PoolGeom, x: &[T], y: &mut [T], argmax: &mut [T]) {
    let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
    y.par_chunks_mut(ohw).zip(argmax.par_chunks_mut(ohw)).enumerate().for_each(|(p, (y, am))| {
        let xp = &x[p * hw..(p + 1) * hw];
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let (h0, h1, w0, w1, _) = window(g, oy, ox, true);
                let mut best = T::neg_infinity();
                let mut at = h0 * g.w + w0;
                'win: for iy in h0..h1 {
                    for ix in w0..w1 {
                        let v = xp[iy * g.w + ix];
                        if v > best || v.is_nan() {
                            best = v;
                            at = iy * g.w + ix;
                            if v.is_nan() {
                                break 'win;
                            }
                        }
                    }
                }
                y[oy * g.ow + ox] = best;
                am[oy * g.ow + ox] = T::from_usize(at);
            }
        }
    });
}

pub fn max_backward<T: Float>(g: &PoolGeom, argmax: &[T], dy: &[T], dx: (&mut [T], bool)) {
    let (dx, acc) = dx;
    let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
    dx.par_chunks_mut(hw).enumerate().for_each(|(p, dxp)| {
        if !acc {
            dxp.fill(T::ZERO);
        }
        for o in 0..ohw {
            dxp[argmax[p * ohw + o].to_usize()] += dy[p * ohw + o];
        }
    });
}

pub fn avg_forward<T: Float>(g: &PoolGeom, count_include_pad: bool, x: &[T], y: &mut [T]) {
    let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
    y.par_chunks_mut(ohw).enumerate().for_each(|(p, y)| {
        let xp = &x[p * hw..(p + 1) * hw];
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let (h0, h1, w0, w1, div) = window(g, oy, ox, count_include_pad);
                let mut s = T::ZERO;
                for iy in h0..h1 {
                    for ix in w0..w1 {
                        s += xp[iy * g.w + ix];
                    }
                }
                y[oy * g.ow + ox] = s / T::from_usize(div);
            }
        }
    });
}

pub fn avg_backward<T: Float>(g: &PoolGeom, count_include_pad: bool, dy: &[T], dx: (&mut [T], bool)) {
    let (dx, acc) = dx;
    let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
    dx.par_chunks_mut(hw).enumerate().for_each(|(p, dxp)| {
        if !acc {
            dxp.fill(T::ZERO);
        }
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let (h0, h1, w0, w1, div) = window(g, oy, ox, count_include_pad);
                let v = dy[p * ohw + oy * g.ow + ox] / T::from_usize(div);
                for iy in h0..h1 {
                    for ix in w0..w1 {
                        store(&mut dxp[iy * g.w + ix], v, true);
                    }
                }
            }
        }
    });
}

impl<T: Float> RunOp<ops::MaxPool> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::MaxPool) -> Result<()> {
        let ops::MaxPool { g, x, y, argmax } = o;
        let mut yv = self.take(*y);
        let mut av = self.take(*argmax);
        max_forward(g, &self.bufs[x.0], &mut yv, &mut av);
        self.put(*y, yv);
        self.put(*argmax, av);
        Ok(())
    }
}

impl<T: Float> RunOp<ops::MaxPoolBackward> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::MaxPoolBackward) -> Result<()> {
        let ops::MaxPoolBackward { g, argmax, dy, dx } = o;
        let (mut dxv, acc) = self.take_grad(*dx);
        max_backward(g, &self.bufs[argmax.0], &self.bufs[dy.0], (&mut dxv, acc));
        self.put(dx.buf, dxv);
        Ok(())
    }
}

impl<T: Float> RunOp<ops::AvgPool> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::AvgPool) -> Result<()> {
        let ops::AvgPool { g, count_include_pad, x, y } = o;
        let mut yv = self.take(*y);
        avg_forward(g, *count_include_pad, &self.bufs[x.0], &mut yv);
        self.put(*y, yv);
        Ok(())
    }
}

impl<T: Float> RunOp<ops::AvgPoolBackward> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::AvgPoolBackward) -> Result<()> {
        let ops::AvgPoolBackward { g, count_include_pad, dy, dx } = o;
        let (mut dxv, acc) = self.take_grad(*dx);
        avg_backward(g, *count_include_pad, &self.bufs[dy.0], (&mut dxv, acc));
        self.put(dx.buf, dxv);
        Ok(())
    }
}
