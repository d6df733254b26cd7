//! Softmax over the middle axis of an `[outer, dim, inner]` view, on the CPU.

use rayon::prelude::*;

use super::CpuBackend;
use super::float::Float;
use super::store;
use crate::Result;
use crate::backend::ops::{self, RunOp};

pub fn forward<T: Float>(dim: usize, inner: usize, x: &[T], y: &mut [T]) {
    y.par_chunks_mut(dim * inner).zip(x.par_chunks(dim * inner)).for_each(|(y, x)| {
        for i in 0..inner {
            let mut max = T::neg_infinity();
            for d in 0..dim {
                let v = x[d * inner + i];
                if v > max || v.is_nan() {
                    max = v;
                }
            }
            let mut sum = T::ZERO;
            for d in 0..dim {
                let e = (x[d * inner + i] - max).exp();
                y[d * inner + i] = e;
                sum += e;
            }
            let inv = T::ONE / sum;
            for d in 0..dim {
                y[d * inner + i] *= inv;
            }
        }
    });
}

/// `dx = y * (dy - sum(dy * y))` along the softmax axis.
pub fn backward<T: Float>(dim: usize, inner: usize, y: &[T], dy: &[T], dx: (&mut [T], bool)) {
    let (dx, acc) = dx;
    dx.par_chunks_mut(dim * inner).enumerate().for_each(|(o, dx)| {
        let base = o * dim * inner;
        for i in 0..inner {
            let dot: T = (0..dim).map(|d| dy[base + d * inner + i] * y[base + d * inner + i]).sum();
            for d in 0..dim {
                let j = base + d * inner + i;
                store(&mut dx[d * inner + i], y[j] * (dy[j] - dot), acc);
            }
        }
    });
}

impl<T: Float> RunOp<ops::Softmax> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::Softmax) -> Result<()> {
        let ops::Softmax { dim, inner, x, y, .. } = o;
        let mut yv = self.take(*y);
        forward(*dim, *inner, &self.bufs[x.0], &mut yv);
        self.put(*y, yv);
        Ok(())
    }
}

impl<T: Float> RunOp<ops::SoftmaxBackward> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::SoftmaxBackward) -> Result<()> {
        let ops::SoftmaxBackward { dim, inner, y, dy, dx, .. } = o;
        let (mut dxv, acc) = self.take_grad(*dx);
        backward(*dim, *inner, &self.bufs[y.0], &self.bufs[dy.0], (&mut dxv, acc));
        self.put(dx.buf, dxv);
        Ok(())
    }
}
