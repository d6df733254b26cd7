//! Joins and copies on the CPU: addition (residual), channel concatenation (Inception),
//! gradient copies, fills.

use rayon::prelude::*;

use super::CpuBackend;
use super::float::Float;
use super::{CHUNK, store};
use crate::Result;
use crate::backend::ops::{self, RunOp};

pub fn add<T: Float>(inputs: &[&[T]], y: &mut [T]) {
    y.par_chunks_mut(CHUNK).enumerate().for_each(|(c, y)| {
        let (o, len) = (c * CHUNK, y.len());
        y.copy_from_slice(&inputs[0][o..o + len]);
        for x in &inputs[1..] {
            y.iter_mut().zip(&x[o..o + len]).for_each(|(y, &x)| *y += x);
        }
    });
}

/// Concatenates `parts` (each `(data, channels)`) along channels for each of `n` samples.
pub fn concat<T: Float>(n: usize, inner: usize, parts: &[(&[T], usize)], y: &mut [T]) {
    let total: usize = parts.iter().map(|p| p.1).sum();
    y.par_chunks_mut(total * inner).enumerate().take(n).for_each(|(s, ys)| {
        let mut off = 0;
        for (x, ch) in parts {
            let len = ch * inner;
            ys[off..off + len].copy_from_slice(&x[s * len..(s + 1) * len]);
            off += len;
        }
    });
}

/// Splits the gradient of a concatenation: part `i` of sample `s` gets its channel slice.
pub fn concat_backward<T: Float>(
    n: usize,
    inner: usize,
    total: usize,
    dy: &[T],
    offset: usize,
    channels: usize,
    dx: (&mut [T], bool),
) {
    let (dx, acc) = dx;
    let len = channels * inner;
    dx.par_chunks_mut(len).enumerate().take(n).for_each(|(s, d)| {
        let src = &dy[s * total * inner + offset * inner..][..len];
        d.iter_mut().zip(src).for_each(|(d, &g)| store(d, g, acc));
    });
}

pub fn grad_into<T: Float>(src: &[T], dst: (&mut [T], bool)) {
    let (dst, acc) = dst;
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| {
        d.iter_mut().zip(s).for_each(|(d, &s)| store(d, s, acc));
    });
}

impl<T: Float> RunOp<ops::Add> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::Add) -> Result<()> {
        let ops::Add { len, inputs, y } = o;
        let mut yv = self.take(*y);
        let ins: Vec<&[T]> = inputs.iter().map(|i| &self.bufs[i.0][..*len]).collect();
        add(&ins, &mut yv[..*len]);
        self.put(*y, yv);
        Ok(())
    }
}

impl<T: Float> RunOp<ops::Concat> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::Concat) -> Result<()> {
        let ops::Concat { n, inner, parts, y } = o;
        let mut yv = self.take(*y);
        let ps: Vec<(&[T], usize)> = parts.iter().map(|(b, c)| (self.bufs[b.0].as_slice(), *c)).collect();
        concat(*n, *inner, &ps, &mut yv);
        self.put(*y, yv);
        Ok(())
    }
}

impl<T: Float> RunOp<ops::ConcatBackward> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::ConcatBackward) -> Result<()> {
        let ops::ConcatBackward { n, inner, parts, dy } = o;
        let total: usize = parts.iter().map(|p| p.1).sum();
        let mut offset = 0;
        for (g, ch) in parts {
            if let Some(g) = g {
                let (mut dxv, acc) = self.take_grad(*g);
                concat_backward(*n, *inner, total, &self.bufs[dy.0], offset, *ch, (&mut dxv, acc));
                self.put(g.buf, dxv);
            }
            offset += ch;
        }
        Ok(())
    }
}

impl<T: Float> RunOp<ops::GradInto> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::GradInto) -> Result<()> {
        let ops::GradInto { len, src, dst } = o;
        let (mut dv, acc) = self.take_grad(*dst);
        grad_into(&self.bufs[src.0][..*len], (&mut dv[..*len], acc));
        self.put(dst.buf, dv);
        Ok(())
    }
}

impl<T: Float> RunOp<ops::Fill> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::Fill) -> Result<()> {
        let ops::Fill { len, buf, value } = o;
        self.bufs[buf.0][..*len].fill(T::from_f32(*value));
        Ok(())
    }
}
