//! Dropout on the CPU. The mask comes from the counter-based Philox generator
//! ([`crate::rng::dropout_uniforms`]), so a GPU kernel given the same seed and step draws the
//! same mask.

use rayon::prelude::*;

use super::CpuBackend;
use super::float::Float;
use super::{CHUNK, store};
use crate::Result;
use crate::backend::ops::{self, RunOp};
use crate::rng::dropout_uniforms;

/// `mask = (u >= rate) / (1 - rate)` and `y = x * mask`, for execution number `step`.
pub fn forward<T: Float>(rate: f32, seed: u64, step: u64, x: &[T], y: &mut [T], mask: &mut [T]) {
    let scale = T::from_f32(1.0 / (1.0 - rate));
    debug_assert_eq!(CHUNK % 4, 0);
    y.par_chunks_mut(CHUNK).zip(mask.par_chunks_mut(CHUNK)).enumerate().for_each(|(c, (y, mask))| {
        let base = c * CHUNK;
        for (blk, (yb, mb)) in y.chunks_mut(4).zip(mask.chunks_mut(4)).enumerate() {
            let start = base + blk * 4;
            let u = dropout_uniforms(seed, step, (start / 4) as u64);
            for e in 0..yb.len() {
                let m = if u[e] >= rate { scale } else { T::ZERO };
                mb[e] = m;
                yb[e] = x[start + e] * m;
            }
        }
    });
}

pub fn backward<T: Float>(mask: &[T], dy: &[T], dx: (&mut [T], bool)) {
    let (dx, acc) = dx;
    dx.par_chunks_mut(CHUNK).enumerate().for_each(|(c, dx)| {
        let o = c * CHUNK;
        for (i, d) in dx.iter_mut().enumerate() {
            store(d, dy[o + i] * mask[o + i], acc);
        }
    });
}

impl<T: Float> RunOp<ops::Dropout> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::Dropout) -> Result<()> {
        let ops::Dropout { rate, len, seed, counter, replay, x, y, mask } = o;
        let step = if *replay {
            self.counters[counter.0].wrapping_sub(1)
        } else {
            self.counters[counter.0] += 1;
            self.counters[counter.0] - 1
        };
        let mut yv = self.take(*y);
        let mut mv = self.take(*mask);
        forward(*rate, *seed, step, &self.bufs[x.0][..*len], &mut yv[..*len], &mut mv[..*len]);
        self.put(*y, yv);
        self.put(*mask, mv);
        Ok(())
    }
}

impl<T: Float> RunOp<ops::DropoutBackward> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::DropoutBackward) -> Result<()> {
        let ops::DropoutBackward { len, mask, dy, dx } = o;
        let (mut dxv, acc) = self.take_grad(*dx);
        backward(&self.bufs[mask.0][..*len], &self.bufs[dy.0][..*len], (&mut dxv[..*len], acc));
        self.put(dx.buf, dxv);
        Ok(())
    }
}
