//! Mixed precision on the GPU: the cast op ([`ops::Cast`], f32 <-> bf16 or f16, with a
//! convolution's bias fused into the widening of its output, and the change between NCHW and
//! NHWC made in the same pass) and the two bias-gradient reductions over a half-precision
//! output gradient (per channel for convolutions, in either memory order; per column for dense
//! layers), as `join.rs`'s f32 ones. Half values travel as their 16 bits (`u16`): NVRTC has no
//! headers here, so bf16 conversions are written out (round to nearest even, NaN kept quiet, as
//! `__float2bfloat16_rn`) and f16 ones are PTX's `cvt.rn.f16.f32` / `cvt.f32.f16` (what
//! `__float2half_rn` compiles to). Kernels take the half type as a number (`kind`: 1 bf16, 2
//! f16; 0 f32 where either side may be f32), a uniform branch in a memory-bound loop.
//!
//! The permuting cast is a tiled transpose: each image (or filter) is a `[rows, cols]` matrix
//! written as `[cols, rows]`, through a 32x33 shared tile so that both the reads and the writes
//! of a warp are contiguous.

use super::CudaBackend;
use super::nvrtc::ModuleSrc;
use crate::backend::DType;
use crate::backend::ops::{self, BufId, GradOut, MemoryFormat, RunOp};
use crate::{Error, Result};

/// Threads per block of the per-channel reduction (as `join.rs`).
const SUM_THREADS: u32 = 256;

/// Side of the permuting cast's square tile (the kernel's `TILE`).
const TILE: usize = 32;

kernels! {
    cast_to_half(src: (const float*), dst: (u16*), n: i64, kind: int, acc: int);
    bias_add_any(y: (void*), b: (const float*), total: i64, k: i64, hw: i64, kind: int, nhwc: int);
    cast_from_half(src: (const u16*), dst: (float*), n: i64, acc: int, bias: (const float*), k: i64, hw: i64, kind: int);
    cast_permute(src: (const void*), dst: (void*), nb: i64, rows: i64, cols: i64, skind: int, dkind: int, acc: int,
        bias: (const float*), bk: i64, binner: i64, bias_src: int);
    channel_sum_half(dy: (const u16*), db: (float*), n: i64, k: i64, hw: i64, acc: int, kind: int);
    channel_partials_nhwc(dy: (const u16*), part: (double*), rows: i64, k: i64, per: i64, kind: int);
    channel_partials_sum(part: (const double*), db: (float*), segs: i64, k: i64, acc: int);
    column_sum_half(dy: (const u16*), db: (float*), m: i64, n: i64, acc: int, kind: int);
}

/// The half-precision helpers every module with half kernels puts in front of its source (a
/// string literal for `concat!`): conversions between f32 and bf16 / f16 (`to_half`,
/// `from_half`, by `kind`: 1 bf16, 2 f16), and `load_any` / `put_any`, which read and write
/// an element of a buffer of any of the three (`kind` 0: f32).
macro_rules! half_prelude {
    () => {
        r#"
typedef unsigned short u16;

__device__ __forceinline__ u16 to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

__device__ __forceinline__ float from_bf16(u16 h) { return __uint_as_float(((unsigned)h) << 16); }

__device__ __forceinline__ u16 to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float from_f16(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// kind: 1 bf16, 2 f16.
__device__ __forceinline__ u16 to_half(float f, int kind) { return kind == 2 ? to_f16(f) : to_bf16(f); }
__device__ __forceinline__ float from_half(u16 h, int kind) { return kind == 2 ? from_f16(h) : from_bf16(h); }

// kind: 0 f32, else a half type.
__device__ __forceinline__ float load_any(const void* p, i64 i, int kind) {
    return kind == 0 ? ((const float*)p)[i] : from_half(((const u16*)p)[i], kind);
}
// Stores v (added to what is there where acc; a half sum is rounded once, as PyTorch's).
__device__ __forceinline__ void put_any(void* p, i64 i, float v, int kind, int acc) {
    if (kind == 0) store(&((float*)p)[i], v, acc);
    else ((u16*)p)[i] = to_half(acc ? from_half(((u16*)p)[i], kind) + v : v, kind);
}

"#
    };
}

pub(super) const MODULE: ModuleSrc = ModuleSrc {
    name: "cast",
    kernels: KERNELS,
    prototypes,
    source: concat!(
        half_prelude!(),
        r#"
#define TILE 32

// dst = half(src) (dst = half(dst + src) where acc), four values a thread (every buffer starts
// 256-byte aligned), then the tail.
extern "C" __global__ void cast_to_half(const float* src, u16* dst, i64 n, int kind, int acc) {
    i64 n4 = n / 4;
    const float4* s4 = (const float4*)src;
    uint2* d4 = (uint2*)dst;
    GRID_LOOP(i, n4) {
        float4 v = s4[i];
        if (acc) {
            uint2 d = d4[i];
            v.x += from_half((u16)(d.x & 0xffffu), kind);
            v.y += from_half((u16)(d.x >> 16), kind);
            v.z += from_half((u16)(d.y & 0xffffu), kind);
            v.w += from_half((u16)(d.y >> 16), kind);
        }
        uint2 o;
        o.x = (unsigned)to_half(v.x, kind) | ((unsigned)to_half(v.y, kind) << 16);
        o.y = (unsigned)to_half(v.z, kind) | ((unsigned)to_half(v.w, kind) << 16);
        d4[i] = o;
    }
    GRID_LOOP(j, n - n4 * 4) put_any(dst, n4 * 4 + j, src[n4 * 4 + j], kind, acc);
}

// dst (=|+=) f32(src) (+ bias[(i / hw) % k] where bias is not null).
extern "C" __global__ void cast_from_half(const u16* src, float* dst, i64 n, int acc, const float* bias, i64 k, i64 hw, int kind) {
    GRID_LOOP(i, n) {
        float v = from_half(src[i], kind);
        if (bias) v += bias[(i / hw) % k];
        store(&dst[i], v, acc);
    }
}

// nb matrices src [rows, cols] -> dst [cols, rows], converting from skind to dkind (dst
// accumulates where acc, f32 only), plus bias[(i / binner) % bk] where bias is not null, i the
// index on the channels-first side (the source's where bias_src, else the destination's).
// 256 threads: a 32x32 tile read row by row (8 rows a pass) and written column by column.
extern "C" __global__ void cast_permute(const void* src, void* dst, i64 nb, i64 rows, i64 cols, int skind, int dkind,
                                        int acc, const float* bias, i64 bk, i64 binner, int bias_src) {
    __shared__ float tile[TILE][TILE + 1];
    i64 tr = (rows + TILE - 1) / TILE, tc = (cols + TILE - 1) / TILE;
    int tx = threadIdx.x % TILE, ty = threadIdx.x / TILE, step = blockDim.x / TILE;
    for (i64 t = blockIdx.x; t < nb * tr * tc; t += gridDim.x) {
        i64 b = t / (tr * tc), rem = t % (tr * tc);
        i64 r0 = (rem / tc) * TILE, c0 = (rem % tc) * TILE, base = b * rows * cols;
        for (int j = ty; j < TILE; j += step) {
            i64 r = r0 + j, c = c0 + tx;
            if (r < rows && c < cols) tile[j][tx] = load_any(src, base + r * cols + c, skind);
        }
        __syncthreads();
        for (int j = ty; j < TILE; j += step) {
            i64 c = c0 + j, r = r0 + tx;
            if (r < rows && c < cols) {
                float v = tile[tx][j];
                i64 d = base + c * rows + r;
                if (bias) v += bias[((bias_src ? base + r * cols + c : d) / binner) % bk];
                put_any(dst, d, v, dkind, acc);
            }
        }
        __syncthreads();
    }
}

// One block per channel: db[ch] (=|+=) sum over n and hw of an NCHW dy, in f64.
extern "C" __global__ void channel_sum_half(const u16* dy, float* db, i64 n, i64 k, i64 hw, int acc, int kind) {
    extern __shared__ double sh[];
    i64 ch = blockIdx.x;
    double s = 0.0;
    for (i64 t = threadIdx.x; t < n * hw; t += blockDim.x) s += (double)from_half(dy[((t / hw) * k + ch) * hw + t % hw], kind);
    s = block_sum(s, sh);
    if (threadIdx.x == 0) store(&db[ch], (float)s, acc);
}

// An NHWC dy is a [rows, k] matrix (rows = n * hw). First pass: block b sums the 32 channels of
// group b % groups over the rows of segment b / groups ([s * per, (s + 1) * per)), 256 threads as
// 32 channels by 8 row lanes (a warp reads 32 neighbouring channels of one row), the lanes added
// in a fixed order; part[s * k + ch] in f64.
extern "C" __global__ void channel_partials_nhwc(const u16* dy, double* part, i64 rows, i64 k, i64 per, int kind) {
    __shared__ double sh[8][33];
    int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
    i64 groups = (k + 31) / 32;
    i64 g = blockIdx.x % groups, s = blockIdx.x / groups, ch = g * 32 + tx;
    i64 r0 = s * per, r1 = r0 + per < rows ? r0 + per : rows;
    double t = 0.0;
    if (ch < k) for (i64 r = r0 + ty; r < r1; r += 8) t += (double)from_half(dy[r * k + ch], kind);
    sh[ty][tx] = t;
    __syncthreads();
    if (ty == 0 && ch < k) {
        double u = 0.0;
        for (int j = 0; j < 8; j++) u += sh[j][tx];
        part[s * k + ch] = u;
    }
}

// Second pass: db[ch] (=|+=) the segments' partial sums, added in segment order (deterministic).
extern "C" __global__ void channel_partials_sum(const double* part, float* db, i64 segs, i64 k, int acc) {
    GRID_LOOP(ch, k) {
        double u = 0.0;
        for (i64 s = 0; s < segs; s++) u += part[s * k + ch];
        store(&db[ch], (float)u, acc);
    }
}

// One thread per column: db[j] (=|+=) sum over m rows of dy[m, n], in f64.
extern "C" __global__ void column_sum_half(const u16* dy, float* db, i64 m, i64 n, int acc, int kind) {
    GRID_LOOP(j, n) {
        double s = 0.0;
        for (i64 r = 0; r < m; r++) s += (double)from_half(dy[r * n + j], kind);
        store(&db[j], (float)s, acc);
    }
}

// y[i] += b[channel of i] over a half or f32 y (kind) in NCHW ([n, k, hw]) or NHWC ([n, hw, k])
// order (a convolution's bias).
extern "C" __global__ void bias_add_any(void* y, const float* b, i64 total, i64 k, i64 hw, int kind, int nhwc) {
    GRID_LOOP(i, total) put_any(y, i, b[nhwc ? i % k : (i / hw) % k], kind, 1);
}
"#
    ),
};

/// The kernels' number for a dtype: 0 f32, 1 bf16, 2 f16; `None` for the others.
pub(super) fn kind(d: DType) -> Option<i32> {
    match d {
        DType::F32 => Some(0),
        DType::BF16 => Some(1),
        DType::F16 => Some(2),
        _ => None,
    }
}

/// The kernels' number of a half dtype (1 bf16, 2 f16), or an error naming `what`.
pub(super) fn half_kind(d: DType, what: &str) -> Result<i32> {
    match kind(d) {
        Some(k) if k > 0 => Ok(k),
        _ => Err(Error::State(format!("{what}: {d} where bfloat16 or float16 is expected"))),
    }
}

impl CudaBackend {
    /// The dtype a buffer was allocated with.
    pub(super) fn dtype_of(&self, b: BufId) -> DType {
        self.bufs[b.0].2
    }

    /// The kernels' number for buffer `b`'s dtype (0 f32, 1 bf16, 2 f16), or an error naming
    /// `what` (an op's operand) for any other dtype.
    pub(super) fn kind_of(&self, b: BufId, what: &str) -> Result<i32> {
        let d = self.dtype_of(b);
        kind(d)
            .ok_or_else(|| Error::State(format!("{what}: buffer {} holds {d}, not float32, bfloat16 or float16", b.0)))
    }
}

impl RunOp<ops::Cast> for CudaBackend {
    fn run_op(&mut self, o: &ops::Cast) -> Result<()> {
        let ops::Cast { len, src, dst, bias, permute } = *o;
        let (from, to) = (self.dtype_of(src), self.dtype_of(dst.buf));
        let narrowing = from == DType::F32 && to.is_half() && bias.is_none();
        let widening = from.is_half() && to == DType::F32;
        // Half to the same half type: a change of order only (a channels-last activation into
        // the channels-first order a dense layer reads).
        let permuting = from.is_half() && to == from && permute.is_some() && bias.is_none();
        if !narrowing && !widening && !permuting {
            return Err(Error::State(format!(
                "cast of buffer {} ({from}) into buffer {} ({to}){}{}: the GPU casts f32 to bf16 or f16 (no bias), bf16 or f16 to f32, and permutes bf16 or f16 (no bias)",
                src.0,
                dst.buf.0,
                if dst.accumulate { ", accumulating" } else { "" },
                if bias.is_some() { ", with a bias" } else { "" },
            )));
        }
        let (sk, dk) = (kind(from).unwrap_or(0), kind(to).unwrap_or(0));
        let (b, k, hw) = bias.map_or((0, 1, 1), |c| (self.ptr(c.buf), c.channels, c.inner));
        if let Some(p) = permute {
            // to NHWC: src [n, c, hw] rows c; to NCHW: src [n, hw, c] rows hw.
            let (rows, cols) = match p.to {
                MemoryFormat::Nhwc => (p.c, p.hw),
                MemoryFormat::Nchw => (p.hw, p.c),
            };
            let args = cast_permute {
                src: self.ptr(src),
                dst: self.ptr(dst.buf),
                nb: p.n,
                rows,
                cols,
                skind: sk,
                dkind: dk,
                acc: dst.accumulate as i32,
                bias: b,
                bk: k,
                binner: hw,
                bias_src: (p.to == MemoryFormat::Nhwc) as i32,
            };
            let tiles = p.n * rows.div_ceil(TILE) * cols.div_ceil(TILE);
            let grid = tiles.min(self.gpu.sm_count as usize * 16) as u32;
            return self.launch_blocks(grid, 256, 0, &args);
        }
        if narrowing {
            let args = cast_to_half {
                src: self.ptr(src),
                dst: self.ptr(dst.buf),
                n: len,
                kind: dk,
                acc: dst.accumulate as i32,
            };
            // Four values a thread.
            return self.launch_elems(len.div_ceil(4), &args);
        }
        let args = cast_from_half {
            src: self.ptr(src),
            dst: self.ptr(dst.buf),
            n: len,
            acc: dst.accumulate as i32,
            bias: b,
            k,
            hw,
            kind: sk,
        };
        self.launch_elems(len, &args)
    }
}

impl CudaBackend {
    /// `db[k] (+)= sum over n, hw of dy` for a half-precision `dy` in `format` (a
    /// convolution's bias gradient under mixed precision). Channels-first: one block per channel
    /// (as `join.rs`). Channels-last: that would read 2 bytes out of every `2 k`, so the rows
    /// are split into segments summed by blocks of 32 neighbouring channels each, into f64
    /// partial sums in the convolutions' shared workspace (free between cuDNN calls, work on
    /// the stream being serialised), then added per channel in segment order: deterministic, as
    /// the segmentation depends on the shape and the GPU's multiprocessor count only.
    pub(super) fn channel_sum_half(
        &mut self,
        dy: BufId,
        db: GradOut,
        (n, k, hw): (usize, usize, usize),
        format: MemoryFormat,
    ) -> Result<()> {
        let kind = half_kind(self.dtype_of(dy), "convolution bias gradient")?;
        let acc = db.accumulate as i32;
        if format == MemoryFormat::Nchw {
            let args = channel_sum_half { dy: self.ptr(dy), db: self.ptr(db.buf), n, k, hw, acc, kind };
            return self.launch_blocks(k as u32, SUM_THREADS, SUM_THREADS * 8, &args);
        }
        let (rows, groups) = (n * hw, k.div_ceil(32));
        // About four blocks per multiprocessor, each over at least 64 rows.
        let want = (4 * self.gpu.sm_count as usize).div_ceil(groups).clamp(1, rows.div_ceil(64).max(1));
        let per = rows.div_ceil(want).max(1);
        let segs = rows.div_ceil(per).max(1);
        let (part, _) = self.conv_workspace(segs * k * size_of::<f64>())?;
        let args = channel_partials_nhwc { dy: self.ptr(dy), part, rows, k, per, kind };
        self.launch_blocks((groups * segs) as u32, SUM_THREADS, 0, &args)?;
        let args = channel_partials_sum { part, db: self.ptr(db.buf), segs, k, acc };
        self.launch_elems(k, &args)
    }

    /// `y[.., k, ..] += b[k]` over a half-precision `y` of `n` images of `k` channels by `hw`
    /// positions in `format` (a convolution's bias under mixed precision, where its output
    /// stays half).
    pub(super) fn bias_add_half(
        &mut self,
        y: BufId,
        b: BufId,
        (n, k, hw): (usize, usize, usize),
        format: MemoryFormat,
    ) -> Result<()> {
        let kind = half_kind(self.dtype_of(y), "convolution bias")?;
        let nhwc = (format == MemoryFormat::Nhwc) as i32;
        let args = bias_add_any { y: self.ptr(y), b: self.ptr(b), total: n * k * hw, k, hw, kind, nhwc };
        self.launch_elems(n * k * hw, &args)
    }

    /// `db[j] (+)= sum over rows of dy[m, n]` for a half-precision `dy` (a dense layer's bias
    /// gradient under mixed precision).
    pub(super) fn column_sum_half(&mut self, dy: BufId, db: GradOut, m: usize, n: usize) -> Result<()> {
        let kind = half_kind(self.dtype_of(dy), "dense bias gradient")?;
        let args = column_sum_half { dy: self.ptr(dy), db: self.ptr(db.buf), m, n, acc: db.accumulate as i32, kind };
        self.launch_elems(n, &args)
    }
}
