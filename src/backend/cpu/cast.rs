//! The cast op ([`crate::backend::ops::Cast`]) on the CPU. The CPU backend computes in f32 (or
//! f64 for the reference) and refuses half-precision buffers (`Op::validate`), so mixed
//! precision is not planned here (`exec` refuses it for a backend without half-precision
//! products); what reaches this kernel is a cast between the dtypes the backend holds in its own
//! float type: a copy, with the bias added, accumulation and the change of memory order
//! (NCHW <-> NHWC) as on the GPU. It is the reference the GPU's permuting casts are checked
//! against (`tests/cuda_bf16.rs`), and its tests below check the index logic on every machine.

use rayon::prelude::*;

use super::CpuBackend;
use super::float::Float;
use crate::Result;
use crate::backend::ops::{self, CastPermute, RunOp};

const CHUNK: usize = 1 << 14;

/// `dst[j] (=|+=) src[s(j)] + bias[(i(j) / inner) % channels]`, where `s(j)` is `j` or, with a
/// permutation, the source index of destination `j`, and `i(j)` the channels-first index of the
/// value (the bias as `(values, channels, inner)`).
pub fn cast<T: Float>(
    src: &[T],
    (dst, acc): (&mut [T], bool),
    bias: Option<(&[T], usize, usize)>,
    permute: Option<CastPermute>,
) {
    dst.par_chunks_mut(CHUNK).enumerate().for_each(|(c, d)| {
        for (k, d) in d.iter_mut().enumerate() {
            let j = c * CHUNK + k;
            let (s, i) = permute.map_or((j, j), |p| p.source_of(j));
            let v = match bias {
                Some((b, channels, inner)) => src[s] + b[(i / inner) % channels],
                None => src[s],
            };
            super::store(d, v, acc);
        }
    });
}

impl<T: Float> RunOp<ops::Cast> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::Cast) -> Result<()> {
        let ops::Cast { len, src, dst, bias, permute } = *o;
        let (mut dv, acc) = self.take_grad(dst);
        let b = &self.bufs;
        let bias = bias.map(|c| (&b[c.buf.0][..c.channels], c.channels, c.inner));
        cast(&b[src.0][..len], (&mut dv[..len], acc), bias, permute);
        self.put(dst.buf, dv);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::CpuBackend;
    use crate::backend::ops::{Cast, CastBias, CastPermute, MemoryFormat, Op};
    use crate::backend::{Backend, BufId, DType, GradOut};

    #[test]
    fn copies_adds_the_bias_per_channel_and_accumulates() {
        // 2 samples x 2 channels x 2 values.
        let src = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let mut dst = [0.0f32; 8];
        super::cast(&src, (&mut dst, false), Some((&[10.0, 20.0], 2, 2)), None);
        assert_eq!(dst, [11.0, 12.0, 23.0, 24.0, 15.0, 16.0, 27.0, 28.0]);
        super::cast(&src, (&mut dst, true), None, None);
        assert_eq!(dst, [12.0, 14.0, 26.0, 28.0, 20.0, 22.0, 34.0, 36.0]);
    }

    /// The value of NCHW element (b, ch, y, x) written as a number that names it.
    fn named(n: usize, c: usize, hw: usize) -> Vec<f32> {
        (0..n * c * hw).map(|i| (1000 * (i / (c * hw)) + 100 * ((i / hw) % c) + i % hw) as f32).collect()
    }

    #[test]
    fn permutes_an_activation_to_channels_last_and_back_with_the_bias() {
        // 2 images x 3 channels x 2x2 positions.
        let (n, c, hw) = (2, 3, 4);
        let x = named(n, c, hw);
        let mut nhwc = vec![0.0f32; x.len()];
        let to_last = CastPermute { n, c, hw, to: MemoryFormat::Nhwc };
        super::cast(&x, (&mut nhwc, false), None, Some(to_last));
        // Image 0, position 0: channels 0, 1, 2; then position 1 ...
        assert_eq!(&nhwc[..7], &[0.0, 100.0, 200.0, 1.0, 101.0, 201.0, 2.0]);
        // Image 1, last position, last channel.
        assert_eq!(nhwc[23], 1203.0);
        // Back to NCHW, adding a bias per channel and accumulating into what was there.
        let mut back = vec![0.5f32; x.len()];
        let to_first = CastPermute { to: MemoryFormat::Nchw, ..to_last };
        super::cast(&nhwc, (&mut back, true), Some((&[10.0, 20.0, 30.0], c, hw)), Some(to_first));
        for (i, (&v, &b)) in x.iter().zip(&back).enumerate() {
            assert_eq!(b, v + 0.5 + [10.0, 20.0, 30.0][(i / hw) % c], "value {i}");
        }
    }

    #[test]
    fn permutes_a_filter_to_cudnns_nhwc_layout() {
        // [k = 2, c = 3, kh = 1, kw = 2] -> [k, kh, kw, c]: n = k, hw = kh * kw.
        let w = named(2, 3, 2);
        let mut krsc = vec![0.0f32; w.len()];
        super::cast(&w, (&mut krsc, false), None, Some(CastPermute { n: 2, c: 3, hw: 2, to: MemoryFormat::Nhwc }));
        assert_eq!(krsc, [0.0, 100.0, 200.0, 1.0, 101.0, 201.0, 1000.0, 1100.0, 1200.0, 1001.0, 1101.0, 1201.0]);
    }

    #[test]
    fn the_op_permutes_on_the_backend_and_refuses_a_wrong_shape() {
        let mut cpu = CpuBackend::<f32>::new(Some(2)).unwrap();
        let (n, c, hw) = (3, 5, 7 * 3);
        let len = n * c * hw;
        let (x, y, z, b) = (
            cpu.alloc(len, DType::F32).unwrap(),
            cpu.alloc(len, DType::F32).unwrap(),
            cpu.alloc(len, DType::F32).unwrap(),
            cpu.alloc(c, DType::F32).unwrap(),
        );
        let xv = named(n, c, hw);
        cpu.write(x, &xv).unwrap();
        cpu.write(b, &[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        let over = |buf: BufId| GradOut { buf, accumulate: false };
        let p = CastPermute { n, c, hw, to: MemoryFormat::Nhwc };
        let bias = CastBias { buf: b, channels: c, inner: hw };
        cpu.run(&[
            Op::Cast(Cast { len, src: x, dst: over(y), bias: None, permute: Some(p) }),
            Op::Cast(Cast {
                len,
                src: y,
                dst: over(z),
                bias: Some(bias),
                permute: Some(CastPermute { to: MemoryFormat::Nchw, ..p }),
            }),
        ])
        .unwrap();
        let (yv, zv) = (cpu.read(y).unwrap(), cpu.read(z).unwrap());
        // NHWC element (image 2, position 20, channel 4).
        assert_eq!(yv[(2 * hw + 20) * c + 4], xv[(2 * c + 4) * hw + 20]);
        for (i, (&v, &r)) in xv.iter().zip(&zv).enumerate() {
            assert_eq!(r, v + ((i / hw) % c + 1) as f32, "value {i}");
        }
        let bad = CastPermute { hw: hw + 1, ..p };
        let e = cpu.run(&[Op::Cast(Cast { len, src: x, dst: over(y), bias: None, permute: Some(bad) })]);
        assert!(e.unwrap_err().to_string().contains("permutation"));
    }
}
