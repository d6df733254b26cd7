//! Mixed precision on the GPU: the cast op ([`ops::Cast`], f32 <-> bf16, with a convolution's
//! bias fused into the widening of its output) and the two bias-gradient reductions over a bf16
//! output gradient (per channel for convolutions, per column for dense layers), as `join.rs`'s
//! f32 ones. bf16 values travel as their 16 bits (`u16`): NVRTC has no headers here, so the
//! conversions are written out (round to nearest even, NaN kept quiet, as `__float2bfloat16_rn`).

use super::CudaBackend;
use super::nvrtc::ModuleSrc;
use crate::backend::DType;
use crate::backend::ops::{self, BufId, GradOut, RunOp};
use crate::{Error, Result};

/// Threads per block of the per-channel reduction (as `join.rs`).
const SUM_THREADS: u32 = 256;

kernels! {
    cast_f32_bf16(src: (const float*), dst: (u16*), n: i64);
    cast_bf16_f32(src: (const u16*), dst: (float*), n: i64, acc: int, bias: (const float*), k: i64, hw: i64);
    channel_sum_bf16(dy: (const u16*), db: (float*), n: i64, k: i64, hw: i64, acc: int);
    column_sum_bf16(dy: (const u16*), db: (float*), m: i64, n: i64, acc: int);
}

pub(super) const MODULE: ModuleSrc = ModuleSrc {
    name: "cast",
    kernels: KERNELS,
    prototypes,
    source: r#"
typedef unsigned short u16;

__device__ __forceinline__ u16 to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

__device__ __forceinline__ float from_bf16(u16 h) { return __uint_as_float(((unsigned)h) << 16); }

// dst = bf16(src), four values a thread (every buffer starts 256-byte aligned), then the tail.
extern "C" __global__ void cast_f32_bf16(const float* src, u16* dst, i64 n) {
    i64 n4 = n / 4;
    const float4* s4 = (const float4*)src;
    uint2* d4 = (uint2*)dst;
    GRID_LOOP(i, n4) {
        float4 v = s4[i];
        uint2 o;
        o.x = (unsigned)to_bf16(v.x) | ((unsigned)to_bf16(v.y) << 16);
        o.y = (unsigned)to_bf16(v.z) | ((unsigned)to_bf16(v.w) << 16);
        d4[i] = o;
    }
    GRID_LOOP(j, n - n4 * 4) dst[n4 * 4 + j] = to_bf16(src[n4 * 4 + j]);
}

// dst (=|+=) f32(src) (+ bias[(i / hw) % k] where bias is not null).
extern "C" __global__ void cast_bf16_f32(const u16* src, float* dst, i64 n, int acc, const float* bias, i64 k, i64 hw) {
    GRID_LOOP(i, n) {
        float v = from_bf16(src[i]);
        if (bias) v += bias[(i / hw) % k];
        store(&dst[i], v, acc);
    }
}

// One block per channel: db[ch] (=|+=) sum over n and hw of dy[n, ch, hw], in f64.
extern "C" __global__ void channel_sum_bf16(const u16* dy, float* db, i64 n, i64 k, i64 hw, int acc) {
    extern __shared__ double sh[];
    i64 ch = blockIdx.x;
    double s = 0.0;
    for (i64 t = threadIdx.x; t < n * hw; t += blockDim.x) s += (double)from_bf16(dy[((t / hw) * k + ch) * hw + t % hw]);
    s = block_sum(s, sh);
    if (threadIdx.x == 0) store(&db[ch], (float)s, acc);
}

// One thread per column: db[j] (=|+=) sum over m rows of dy[m, n], in f64.
extern "C" __global__ void column_sum_bf16(const u16* dy, float* db, i64 m, i64 n, int acc) {
    GRID_LOOP(j, n) {
        double s = 0.0;
        for (i64 r = 0; r < m; r++) s += (double)from_bf16(dy[r * n + j]);
        store(&db[j], (float)s, acc);
    }
}
"#,
};

impl CudaBackend {
    /// The dtype a buffer was allocated with.
    pub(super) fn dtype_of(&self, b: BufId) -> DType {
        self.bufs[b.0].2
    }
}

impl RunOp<ops::Cast> for CudaBackend {
    fn run_op(&mut self, o: &ops::Cast) -> Result<()> {
        let ops::Cast { len, src, dst, bias } = *o;
        match (self.dtype_of(src), self.dtype_of(dst.buf)) {
            (DType::F32, DType::BF16) if !dst.accumulate && bias.is_none() => {
                let args = cast_f32_bf16 { src: self.ptr(src), dst: self.ptr(dst.buf), n: len };
                // Four values a thread.
                self.launch_elems(len.div_ceil(4), &args)
            }
            (DType::BF16, DType::F32) => {
                let (b, k, hw) = bias.map_or((0, 1, 1), |c| (self.ptr(c.buf), c.channels, c.inner));
                let args = cast_bf16_f32 {
                    src: self.ptr(src),
                    dst: self.ptr(dst.buf),
                    n: len,
                    acc: dst.accumulate as i32,
                    bias: b,
                    k,
                    hw,
                };
                self.launch_elems(len, &args)
            }
            (from, to) => Err(Error::State(format!(
                "cast of buffer {} ({from}) into buffer {} ({to}){}{}: the GPU casts f32 to bf16 (overwriting, no bias) and bf16 to f32",
                src.0,
                dst.buf.0,
                if dst.accumulate { ", accumulating" } else { "" },
                if bias.is_some() { ", with a bias" } else { "" },
            ))),
        }
    }
}

impl CudaBackend {
    /// `db[k] (+)= sum over n, hw of dy[n, k, hw]` for a bf16 `dy` (a convolution's bias
    /// gradient under mixed precision).
    pub(super) fn channel_sum_bf16(&mut self, dy: BufId, db: GradOut, n: usize, k: usize, hw: usize) -> Result<()> {
        let args = channel_sum_bf16 { dy: self.ptr(dy), db: self.ptr(db.buf), n, k, hw, acc: db.accumulate as i32 };
        self.launch_blocks(k as u32, SUM_THREADS, SUM_THREADS * 8, &args)
    }

    /// `db[j] (+)= sum over rows of dy[m, n]` for a bf16 `dy` (a dense layer's bias gradient
    /// under mixed precision).
    pub(super) fn column_sum_bf16(&mut self, dy: BufId, db: GradOut, m: usize, n: usize) -> Result<()> {
        let args = column_sum_bf16 { dy: self.ptr(dy), db: self.ptr(db.buf), m, n, acc: db.accumulate as i32 };
        self.launch_elems(n, &args)
    }
}
