//! Joins and copies on the CPU: addition (residual), channel concatenation (Inception),
//! gradient copies, fills.

use rayon::prelude::*;

use super::float::Float;
use super::{CHUNK, store};

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
