//! The cast op ([`crate::backend::ops::Cast`]) on the CPU. The CPU backend computes in f32 (or
//! f64 for the reference) and refuses bf16 buffers (`Op::validate`), so mixed precision is not
//! planned here (`exec` refuses `Precision::Bf16Mixed` for a backend without bf16 compute); what
//! reaches this kernel is a cast between the dtypes the backend holds in its own float type: a
//! copy, with the bias added and accumulation, as on the GPU.

use rayon::prelude::*;

use super::CpuBackend;
use super::float::Float;
use crate::Result;
use crate::backend::ops::{self, RunOp};

const CHUNK: usize = 1 << 14;

/// `dst (=|+=) src + bias[(i / inner) % channels]` (the bias as `(values, channels, inner)`).
pub fn cast<T: Float>(src: &[T], (dst, acc): (&mut [T], bool), bias: Option<(&[T], usize, usize)>) {
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).enumerate().for_each(|(c, (d, s))| {
        for (j, (d, &s)) in d.iter_mut().zip(s).enumerate() {
            let v = match bias {
                Some((b, channels, inner)) => s + b[((c * CHUNK + j) / inner) % channels],
                None => s,
            };
            super::store(d, v, acc);
        }
    });
}

impl<T: Float> RunOp<ops::Cast> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::Cast) -> Result<()> {
        let ops::Cast { len, src, dst, bias } = *o;
        let (mut dv, acc) = self.take_grad(dst);
        let b = &self.bufs;
        let bias = bias.map(|c| (&b[c.buf.0][..c.channels], c.channels, c.inner));
        cast(&b[src.0][..len], (&mut dv[..len], acc), bias);
        self.put(dst.buf, dv);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn copies_adds_the_bias_per_channel_and_accumulates() {
        // 2 samples x 2 channels x 2 values.
        let src = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let mut dst = [0.0f32; 8];
        super::cast(&src, (&mut dst, false), Some((&[10.0, 20.0], 2, 2)));
        assert_eq!(dst, [11.0, 12.0, 23.0, 24.0, 15.0, 16.0, 27.0, 28.0]);
        super::cast(&src, (&mut dst, true), None);
        assert_eq!(dst, [12.0, 14.0, 26.0, 28.0, 20.0, 22.0, 34.0, 36.0]);
    }
}
