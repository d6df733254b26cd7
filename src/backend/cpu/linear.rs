//! Dense (fully connected) layer on the CPU: one gemm per pass, split by gemm over the pool.
//!
//! `y[m, n] = x[m, k] * w[n, k]^T + b`; backward `dx = dy * w`, `dw = dy^T * x`, `db = sum_m dy`.

use super::CpuBackend;
use super::WeightGrads;
use super::float::Float;
use super::matmul::{Mat, matmul};
use crate::Result;
use crate::backend::ops::{self, RunOp};

/// `(m, k, n)`: rows, input features, output features.
pub fn forward<T: Float>(
    (m, k, n): (usize, usize, usize),
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    y: &mut [T],
    threads: usize,
) {
    matmul(y, n, false, Mat::rm(x, m, k), Mat::rm(w, n, k).t(), threads);
    if let Some(b) = b {
        for row in y.chunks_mut(n) {
            row.iter_mut().zip(b).for_each(|(v, &bj)| *v += bj);
        }
    }
}

/// `(m, k, n)`: rows, input features, output features.
pub fn backward<T: Float>(
    (m, k, n): (usize, usize, usize),
    x: &[T],
    w: &[T],
    dy: &[T],
    (dx, dw, db): WeightGrads<'_, T>,
    threads: usize,
) {
    if let Some((dx, acc)) = dx {
        matmul(dx, k, acc, Mat::rm(dy, m, n), Mat::rm(w, n, k), threads);
    }
    matmul(dw.0, k, dw.1, Mat::rm(dy, m, n).t(), Mat::rm(x, m, k), threads);
    if let Some((db, acc)) = db {
        if !acc {
            db.fill(T::ZERO);
        }
        for row in dy.chunks(n) {
            db.iter_mut().zip(row).for_each(|(d, &g)| *d += g);
        }
    }
}

impl<T: Float> RunOp<ops::Linear> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::Linear) -> Result<()> {
        let ops::Linear { m, k, n, x, w, b, y } = o;
        let threads = self.threads;
        let mut yv = self.take(*y);
        let bufs = &self.bufs;
        forward((*m, *k, *n), &bufs[x.0], &bufs[w.0], b.map(|b| bufs[b.0].as_slice()), &mut yv, threads);
        self.put(*y, yv);
        Ok(())
    }
}

impl<T: Float> RunOp<ops::LinearBackward> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::LinearBackward) -> Result<()> {
        let ops::LinearBackward { m, k, n, x, w, dy, dx, dw, db } = *o;
        self.with_weight_grads((dx, dw, db), |b, grads| {
            let bufs = &b.bufs;
            backward((m, k, n), &bufs[x.0], &bufs[w.0], &bufs[dy.0], grads, b.threads)
        });
        Ok(())
    }
}
