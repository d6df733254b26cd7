//! Batch normalisation on the GPU: training forward (batch statistics, running-statistic update
//! as PyTorch does it), inference forward, and backward, as `backend/cpu/batch_norm.rs`; plain
//! or synchronised over a data-parallel group (the op's `sync`), by the same kernels.
//!
//! Each channel's `n * hw` values are split over several blocks (by samples), so that even a
//! layer with few channels fills the GPU: each block writes its f64 partial sums to its own
//! slot, and the last block of the launch to finish (found with one atomic counter,
//! `last_block`) reduces them per channel in a fixed order and computes the statistics
//! (`bn_stats`; backward `bn_stats_grad`), so results are identical run to run whichever block
//! is last; a second kernel applies them element-wise. The partial-sum and element-wise kernels
//! keep four loads in flight per thread and step each value's channel instead of dividing for
//! it (see the kernels' comment; NOTES.md has the reason). Statistics come from f64 sums of `x`
//! and `x^2` (one pass); in f64 the cancellation in `E[x^2] - mean^2` costs nothing at f32
//! precision.
//!
//! Synchronised batch norm differs in one step only (its forward pass takes three launches for
//! what `bn_stats` does in one: `bn_partial`, `bn_totals`, `bn_finalize`): the per-channel
//! totals (with this rank's sample count after them) are written to scratch and summed over the
//! group by NCCL (f64, on NCCL's stream, the compute stream waiting for it) before the statistics are
//! finished from them: in the forward pass the sums of `x` and `x^2`, in the backward pass the
//! sums of `dy` and `dy * xhat` (for `dx`; `dgamma` and `dbeta` stay local, as the gradient
//! all-reduce averages them). A group of one computes what plain batch norm computes.

use super::CudaBackend;
use super::nvrtc::ModuleSrc;
use crate::backend::ops;
use crate::backend::ops::RunOp;
use crate::backend::ops::{ActFn, BnGeom, BufId, GradOut};
use crate::{Error, Result};

/// Threads per block of the partial-sum kernels (a power of two, for the block reduction).
const BN_THREADS: u32 = 256;

/// How the samples of each channel are split: `(segments, samples per segment)`, aiming at
/// about four blocks per multiprocessor in all.
fn segments(g: &BnGeom, sms: usize) -> (usize, usize) {
    let want = (4 * sms).div_ceil(g.c.max(1)).clamp(1, g.n.max(1));
    let per = g.n.div_ceil(want);
    (g.n.div_ceil(per), per)
}

kernels! {
    bn_partial(x: (const float*), dy: (const float*), mean: (const float*), invstd: (const float*), part: (double*), n: i64, c: i64, hw: i64, per: i64, mode: int);
    bn_totals(part: (const double*), segs: int, totals: (double*), dgamma: (float*), dbeta: (float*), acc_dgamma: int, acc_dbeta: int, c: i64, count: double);
    bn_finalize(part: (const double*), segs: int, totals: (const double*), mean: (float*), invstd: (float*), rmean: (float*), rvar: (float*), gamma: (const float*), beta: (const float*), coef: (float*), c: i64, m: i64, eps: float, momentum: float);
    bn_stats(x: (const float*), part: (double*), n: i64, c: i64, hw: i64, per: i64, done: (unsigned*), mean: (float*), invstd: (float*), rmean: (float*), rvar: (float*), gamma: (const float*), beta: (const float*), coef: (float*), eps: float, momentum: float);
    bn_stats_grad(x: (const float*), dy: (const float*), z: (const float*), f: int, p: float, mean: (const float*), invstd: (const float*), part: (double*), n: i64, c: i64, hw: i64, per: i64, done: (unsigned*), totals: (double*), dgamma: (float*), dbeta: (float*), acc_dgamma: int, acc_dbeta: int);
    bn_apply(x: (const void*), coef: (const float*), y: (void*), total: i64, c: i64, hw: i64, xk: int, yk: int, f: int, p: float);
    bn_infer_forward(x: (const void*), gamma: (const float*), beta: (const float*), rmean: (const float*), rvar: (const float*), y: (void*), n: i64, c: i64, hw: i64, eps: float, xk: int, yk: int, f: int, p: float);
    bn_apply_grad(x: (const void*), gamma: (const float*), mean: (const float*), invstd: (const float*), dy: (const void*), z: (const void*), f: int, p: float, sums: (const double*), dx: (void*), total: i64, c: i64, hw: i64, acc: int, xk: int, dyk: int, zk: int, dxk: int);
    bn_rows_partial(x: (const void*), xk: int, part: (double*), rows: i64, c: i64, per: i64, segs: int);
    bn_rows_stats(x: (const void*), xk: int, part: (double*), rows: i64, c: i64, per: i64, segs: int, done: (unsigned*), mean: (float*), invstd: (float*), rmean: (float*), rvar: (float*), gamma: (const float*), beta: (const float*), coef: (float*), eps: float, momentum: float);
    bn_rows_stats_grad(x: (const void*), xk: int, dy: (const void*), dyk: int, z: (const void*), zk: int, f: int, p: float, mean: (const float*), invstd: (const float*), part: (double*), rows: i64, c: i64, per: i64, segs: int, done: (unsigned*), totals: (double*), dgamma: (float*), dbeta: (float*), acc_dgamma: int, acc_dbeta: int);
}

pub(super) const MODULE: ModuleSrc = ModuleSrc {
    name: "batch_norm",
    kernels: KERNELS,
    prototypes,
    source: concat!(
        mt_prelude!(),
        half_prelude!(),
        r#"
// The element-wise kernels below are grid-stride loops that handle ILP values per thread and
// iteration, loading all of them before using any, so that each warp has ILP loads in flight
// instead of one (at one load in flight per warp the H200 reaches only a fraction of its
// bandwidth); each value's channel comes from a ChanWalk instead of a 64-bit division. The
// arithmetic per value and, in bn_partial, the order of the additions are what they were with
// one value per iteration, so the results are the same bits.
#define ILP 4

// The activation fused into batch norm (exec/fuse.rs): f is activation.rs's code (-1 none, 0
// relu, 1 leaky relu with slope p, 2 elu with alpha p, 3 sigmoid, 4 tanh; the formulas of
// backend/cpu/activation.rs), and its derivative from the activated output z alone
// (derivative_from_output there: exact for these functions, NaN taking PyTorch's branch).
__device__ __forceinline__ float bn_act(int f, float p, float v) {
    switch (f) {
    case 0: return v <= 0.f ? 0.f : v;
    case 1: return v > 0.f ? v : v * p;
    case 2: return v > 0.f ? v : p * (expf(v) - 1.f);
    case 3: {
        if (v >= 0.f) return 1.f / (1.f + expf(-v));
        float e = expf(v);
        return e / (1.f + e);
    }
    case 4: return tanhf(v);
    default: return v;
    }
}
__device__ __forceinline__ float bn_dact(int f, float p, float z) {
    switch (f) {
    case 0: return z <= 0.f ? 0.f : 1.f;
    case 1: return z > 0.f ? 1.f : p;
    case 2: return z <= 0.f ? z + p : 1.f;
    case 3: return z * (1.f - z);
    case 4: return 1.f - z * z;
    default: return 1.f;
    }
}

// Where a grid-stride loop over an [n, c, hw] tensor is: the value's offset j in its row and its
// channel ch, advanced by the loop's stride without dividing. A step adds the stride's offset
// (carrying one row when it passes hw) and its whole rows mod c; ch + dch + carry < 2c, so one
// subtraction brings the channel back into range.
struct ChanWalk { int j, ch, dj, dch, hw, c; };
__device__ __forceinline__ ChanWalk chan_walk(i64 i0, i64 stride, i64 hw, i64 c) {
    ChanWalk w;
    w.hw = (int)hw; w.c = (int)c;
    w.j = (int)(i0 % hw); w.ch = (int)((i0 / hw) % c);
    w.dj = (int)(stride % hw); w.dch = (int)((stride / hw) % c);
    return w;
}
__device__ __forceinline__ void chan_next(ChanWalk& w) {
    w.j += w.dj;
    int carry = w.j >= w.hw;
    if (carry) w.j -= w.hw;
    w.ch += w.dch + carry;
    if (w.ch >= w.c) w.ch -= w.c;
}

// Block (s, ch) sums f(x) and g(x) over samples [s*per, min(n, (s+1)*per)) of channel ch:
// mode 0: x and x^2 (forward); mode 1: dy and dy * (x - mean) * invstd (backward; with a fused
// activation af >= 0, dy is bn_dact(z) * the given dy, z the activated output). Thread t
// adds values t, t + blockDim.x, ... of the segment in that order (ILP loads at a time); the
// value's row and offset are stepped, not divided out.
__device__ void bn_block_sums(const float* x, const float* dy, const float* z, int af, float ap, const float* mean,
                              const float* invstd, double* part, i64 n, i64 c, i64 hw, i64 per, int mode) {
    __shared__ double sh[256];
    i64 ch = blockIdx.y, s = blockIdx.x, segs = gridDim.x;
    i64 n0 = s * per, n1 = n0 + per < n ? n0 + per : n;
    double mu = mode ? (double)mean[ch] : 0.0, is = mode ? (double)invstd[ch] : 0.0;
    double a = 0.0, b = 0.0;
    i64 total = (n1 - n0) * hw;
    i64 drow = blockDim.x / hw, dj = blockDim.x % hw;
    i64 row = n0 + threadIdx.x / hw, j = threadIdx.x % hw;
    for (i64 u = threadIdx.x; u < total; u += ILP * blockDim.x) {
        float xv[ILP], dv[ILP];
#pragma unroll
        for (int k = 0; k < ILP; k++) {
            int ok = u + k * blockDim.x < total;
            i64 i = (row * c + ch) * hw + j;
            xv[k] = ok ? x[i] : 0.f;
            dv[k] = ok && mode ? dy[i] : 0.f;
            if (ok && mode && af >= 0) dv[k] = bn_dact(af, ap, z[i]) * dv[k];
            j += dj;
            row += drow;
            if (j >= hw) { j -= hw; row++; }
        }
#pragma unroll
        for (int k = 0; k < ILP; k++) {
            if (u + k * blockDim.x >= total) break;
            double v = (double)xv[k];
            if (mode == 0) {
                a += v;
                b += v * v;
            } else {
                double d = (double)dv[k];
                a += d;
                b += d * (v - mu) * is;
            }
        }
    }
    a = block_sum(a, sh);
    b = block_sum(b, sh);
    if (threadIdx.x == 0) {
        part[(ch * segs + s) * 2] = a;
        part[(ch * segs + s) * 2 + 1] = b;
    }
}

extern "C" __global__ void bn_partial(const float* x, const float* dy, const float* mean, const float* invstd,
                                      double* part, i64 n, i64 c, i64 hw, i64 per, int mode) {
    bn_block_sums(x, dy, 0, -1, 0.f, mean, invstd, part, n, c, hw, per, mode);
}


// Per channel: mean, invstd, the running statistics, and the affine coefficients coef[2ch] =
// gamma * invstd, coef[2ch + 1] = beta - mean * gamma * invstd (f32, as the CPU computes them).
// The sums of x and x^2 and their count: with segs > 0 summed here from this device's partial
// sums (plain batch norm, count m); with segs == 0 read from totals (the group's, after the
// all-reduce: totals[2ch], totals[2ch + 1], count totals[2c]).
// (Partial sums are read with __ldcg, past the L1 cache: in bn_stats they were written by
// other blocks of the same launch.)
__device__ void bn_finalize_ch(i64 ch, const double* part, int segs, const double* totals, float* mean,
                               float* invstd, float* rmean, float* rvar, const float* gamma, const float* beta,
                               float* coef, i64 c, i64 m, float eps, float momentum) {
    {
        double a = 0.0, b = 0.0, count;
        if (segs > 0) {
            for (int s = 0; s < segs; s++) { a += __ldcg(&part[(ch * segs + s) * 2]); b += __ldcg(&part[(ch * segs + s) * 2 + 1]); }
            count = (double)m;
        } else {
            a = totals[2 * ch];
            b = totals[2 * ch + 1];
            count = totals[2 * c];
        }
        double mu = a / count;
        double var = b / count - mu * mu;
        if (var < 0.0) var = 0.0;
        float meanf = (float)mu;
        float isf = (float)(1.0 / sqrt(var + (double)eps));
        mean[ch] = meanf;
        invstd[ch] = isf;
        if (rmean) {
            double mo = (double)momentum;
            double unbias = count > 1.0 ? count / (count - 1.0) : 1.0;
            rmean[ch] = (float)((1.0 - mo) * (double)rmean[ch] + mo * mu);
            rvar[ch] = (float)((1.0 - mo) * (double)rvar[ch] + mo * var * unbias);
        }
        float g = gamma ? gamma[ch] : 1.f;
        float bt = beta ? beta[ch] : 0.f;
        float sc = g * isf;
        coef[2 * ch] = sc;
        coef[2 * ch + 1] = bt - meanf * sc;
    }
}

extern "C" __global__ void bn_finalize(const double* part, int segs, const double* totals, float* mean,
                                       float* invstd, float* rmean, float* rvar, const float* gamma,
                                       const float* beta, float* coef, i64 c, i64 m, float eps, float momentum) {
    GRID_LOOP(ch, c) bn_finalize_ch(ch, part, segs, totals, mean, invstd, rmean, rvar, gamma, beta, coef, c, m, eps, momentum);
}

// Plain batch norm's forward statistics in one launch: bn_partial's sums (mode 0), then the last
// block to finish finalizes every channel as bn_finalize does (same additions, same order).
extern "C" __global__ void bn_stats(const float* x, double* part, i64 n, i64 c, i64 hw, i64 per, unsigned* done,
                                    float* mean, float* invstd, float* rmean, float* rvar, const float* gamma,
                                    const float* beta, float* coef, float eps, float momentum) {
    bn_block_sums(x, 0, 0, -1, 0.f, 0, 0, part, n, c, hw, per, 0);
    if (!last_block(done)) return;
    for (i64 ch = threadIdx.x; ch < c; ch += blockDim.x)
        bn_finalize_ch(ch, part, gridDim.x, 0, mean, invstd, rmean, rvar, gamma, beta, coef, c, n * hw, eps, momentum);
}

// The element-wise kernels take each operand's kind (xk, yk, ...: 0 f32, 1 bf16, 2 f16; the
// arithmetic in f32 or f64 as before, a half result rounded once). f, p: the fused activation
// (bn_act; -1 none), applied to the normalised value in f32 before it is stored.
extern "C" __global__ void bn_apply(const void* x, const float* coef, void* y, i64 total, i64 c, i64 hw, int xk, int yk,
                                    int f, float p) {
    i64 i0 = (i64)blockIdx.x * blockDim.x + threadIdx.x, stride = (i64)gridDim.x * blockDim.x;
    ChanWalk w = chan_walk(i0, stride, hw, c);
    for (i64 i = i0; i < total; i += ILP * stride) {
        float v[ILP];
        int ch[ILP];
#pragma unroll
        for (int k = 0; k < ILP; k++) {
            i64 at = i + k * stride;
            ch[k] = w.ch;
            chan_next(w);
            v[k] = at < total ? load_any(x, at, xk) : 0.f;
        }
#pragma unroll
        for (int k = 0; k < ILP; k++) {
            i64 at = i + k * stride;
            if (at < total) put_any(y, at, bn_act(f, p, v[k] * coef[2 * ch[k]] + coef[2 * ch[k] + 1]), yk, 0);
        }
    }
}

extern "C" __global__ void bn_infer_forward(const void* x, const float* gamma, const float* beta, const float* rmean,
                                            const float* rvar, void* y, i64 n, i64 c, i64 hw, float eps, int xk, int yk,
                                            int f, float p) {
    i64 total = n * c * hw;
    i64 i0 = (i64)blockIdx.x * blockDim.x + threadIdx.x, stride = (i64)gridDim.x * blockDim.x;
    ChanWalk w = chan_walk(i0, stride, hw, c);
    for (i64 i = i0; i < total; i += ILP * stride) {
        float v[ILP];
        int chs[ILP];
#pragma unroll
        for (int k = 0; k < ILP; k++) {
            i64 at = i + k * stride;
            chs[k] = w.ch;
            chan_next(w);
            v[k] = at < total ? load_any(x, at, xk) : 0.f;
        }
#pragma unroll
        for (int k = 0; k < ILP; k++) {
            i64 at = i + k * stride;
            if (at >= total) break;
            int ch = chs[k];
            float g = gamma ? gamma[ch] : 1.f;
            float b = beta ? beta[ch] : 0.f;
            float scale = g / sqrtf(rvar[ch] + eps);
            float shift = b - rmean[ch] * scale;
            put_any(y, at, bn_act(f, p, v[k] * scale + shift), yk, 0);
        }
    }
}

// Per channel: the sums over segments of the partial sums, into totals[2ch], totals[2ch + 1],
// and this device's count into totals[2c]. In the backward pass (mode 1 partials) also dbeta =
// sum(dy) and dgamma = sum(dy * xhat), where wanted; the totals are kept for bn_apply_grad.
__device__ void bn_totals_ch(i64 ch, const double* part, int segs, double* totals, float* dgamma, float* dbeta,
                             int acc_dgamma, int acc_dbeta) {
    double a = 0.0, b = 0.0;
    for (int s = 0; s < segs; s++) { a += __ldcg(&part[(ch * segs + s) * 2]); b += __ldcg(&part[(ch * segs + s) * 2 + 1]); }
    totals[2 * ch] = a;
    totals[2 * ch + 1] = b;
    if (dbeta) store(&dbeta[ch], (float)a, acc_dbeta);
    if (dgamma) store(&dgamma[ch], (float)b, acc_dgamma);
}

extern "C" __global__ void bn_totals(const double* part, int segs, double* totals, float* dgamma, float* dbeta,
                                     int acc_dgamma, int acc_dbeta, i64 c, double count) {
    GRID_LOOP(ch, c) bn_totals_ch(ch, part, segs, totals, dgamma, dbeta, acc_dgamma, acc_dbeta);
    if (blockIdx.x == 0 && threadIdx.x == 0) totals[2 * c] = count;
}

// The backward pass's sums in one launch: bn_partial's (mode 1), then the last block to finish
// writes the totals, the count, dgamma and dbeta as bn_totals does (same additions and order).
extern "C" __global__ void bn_stats_grad(const float* x, const float* dy, const float* z, int f, float p,
                                         const float* mean, const float* invstd, double* part, i64 n, i64 c, i64 hw,
                                         i64 per, unsigned* done, double* totals, float* dgamma, float* dbeta,
                                         int acc_dgamma, int acc_dbeta) {
    bn_block_sums(x, dy, z, f, p, mean, invstd, part, n, c, hw, per, 1);
    if (!last_block(done)) return;
    for (i64 ch = threadIdx.x; ch < c; ch += blockDim.x)
        bn_totals_ch(ch, part, gridDim.x, totals, dgamma, dbeta, acc_dgamma, acc_dbeta);
    if (threadIdx.x == 0) totals[2 * c] = (double)(n * hw);
}

// dx = gamma * invstd / M * (M * dy - sum(dy) - xhat * sum(dy * xhat)), with the sums and the
// count M from bn_totals (the group's, for synchronised batch norm): sums[2ch], sums[2ch + 1],
// M = sums[2c]. With a fused activation (f >= 0), dy is bn_dact(z) * the given dy.
extern "C" __global__ void bn_apply_grad(const void* x, const float* gamma, const float* mean, const float* invstd,
                                         const void* dy, const void* z, int f, float p, const double* sums, void* dx,
                                         i64 total, i64 c, i64 hw, int acc, int xk, int dyk, int zk, int dxk) {
    double count = sums[2 * c];
    i64 i0 = (i64)blockIdx.x * blockDim.x + threadIdx.x, stride = (i64)gridDim.x * blockDim.x;
    ChanWalk w = chan_walk(i0, stride, hw, c);
    for (i64 i = i0; i < total; i += ILP * stride) {
        float xv[ILP], dv[ILP];
        int chs[ILP];
#pragma unroll
        for (int k = 0; k < ILP; k++) {
            i64 at = i + k * stride;
            chs[k] = w.ch;
            chan_next(w);
            xv[k] = at < total ? load_any(x, at, xk) : 0.f;
            dv[k] = at < total ? load_any(dy, at, dyk) : 0.f;
            if (at < total && f >= 0) dv[k] = bn_dact(f, p, load_any(z, at, zk)) * dv[k];
        }
#pragma unroll
        for (int k = 0; k < ILP; k++) {
            i64 at = i + k * stride;
            if (at >= total) break;
            int ch = chs[k];
            double is = (double)invstd[ch];
            double kk = (gamma ? (double)gamma[ch] : 1.0) * is / count;
            double xhat = ((double)xv[k] - (double)mean[ch]) * is;
            put_any(dx, at, (float)(kk * (count * (double)dv[k] - sums[2 * ch] - xhat * sums[2 * ch + 1])), dxk, acc);
        }
    }
}

// Channels-last batch norm (hw = 1: x is a [rows, c] matrix, a channel's values a column; what
// mixed precision's NHWC activations are). One block per group of 32 neighbouring channels and
// segment of rows ([s * per, min(rows, (s + 1) * per))): 256 threads as 32 channels by 8 row
// lanes, so a warp reads 32 neighbouring values of one row; lane t adds rows r0 + t, r0 + t + 8,
// ... in order (ILP loads in flight), the 8 lanes are then added in order, and the block writes
// part[(ch * segs + s) * 2 + {0, 1}], the layout bn_finalize_ch and bn_totals_ch read. mode 0:
// x and x^2; mode 1: dy and dy * (x - mean) * invstd. Deterministic: the segmentation depends on
// the shape and the GPU only.
__device__ void bn_rows_sums(const void* x, int xk, const void* dy, int dyk, const void* z, int zk, int af, float ap,
                             const float* mean, const float* invstd, double* part, i64 rows, i64 c, i64 per,
                             int segs, int mode) {
    __shared__ double sa[8][33], sb[8][33];
    int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
    i64 groups = (c + 31) / 32;
    i64 s = blockIdx.x / groups, ch = (blockIdx.x % groups) * 32 + tx;
    i64 r0 = s * per, r1 = r0 + per < rows ? r0 + per : rows;
    double a = 0.0, b = 0.0;
    if (ch < c) {
        double mu = mode ? (double)mean[ch] : 0.0, is = mode ? (double)invstd[ch] : 0.0;
        for (i64 r = r0 + ty; r < r1; r += 8 * ILP) {
            float xv[ILP], dv[ILP];
#pragma unroll
            for (int k = 0; k < ILP; k++) {
                i64 rr = r + 8 * k;
                int ok = rr < r1;
                xv[k] = ok ? load_any(x, rr * c + ch, xk) : 0.f;
                dv[k] = ok && mode ? load_any(dy, rr * c + ch, dyk) : 0.f;
                if (ok && mode && af >= 0) dv[k] = bn_dact(af, ap, load_any(z, rr * c + ch, zk)) * dv[k];
            }
#pragma unroll
            for (int k = 0; k < ILP; k++) {
                if (r + 8 * k >= r1) break;
                double v = (double)xv[k];
                if (mode == 0) {
                    a += v;
                    b += v * v;
                } else {
                    double d = (double)dv[k];
                    a += d;
                    b += d * (v - mu) * is;
                }
            }
        }
    }
    sa[ty][tx] = a;
    sb[ty][tx] = b;
    __syncthreads();
    if (ty == 0 && ch < c) {
        double u = 0.0, v = 0.0;
        for (int j = 0; j < 8; j++) { u += sa[j][tx]; v += sb[j][tx]; }
        part[(ch * segs + s) * 2] = u;
        part[(ch * segs + s) * 2 + 1] = v;
    }
}

// The partial sums alone (synchronised batch norm: bn_totals and bn_finalize follow).
extern "C" __global__ void bn_rows_partial(const void* x, int xk, double* part, i64 rows, i64 c, i64 per, int segs) {
    bn_rows_sums(x, xk, 0, 0, 0, 0, -1, 0.f, 0, 0, part, rows, c, per, segs, 0);
}

// Forward statistics in one launch, as bn_stats: the sums, then the last block finalizes.
extern "C" __global__ void bn_rows_stats(const void* x, int xk, double* part, i64 rows, i64 c, i64 per, int segs,
                                         unsigned* done, float* mean, float* invstd, float* rmean, float* rvar,
                                         const float* gamma, const float* beta, float* coef, float eps, float momentum) {
    bn_rows_sums(x, xk, 0, 0, 0, 0, -1, 0.f, 0, 0, part, rows, c, per, segs, 0);
    if (!last_block(done)) return;
    for (i64 ch = threadIdx.x; ch < c; ch += blockDim.x)
        bn_finalize_ch(ch, part, segs, 0, mean, invstd, rmean, rvar, gamma, beta, coef, c, rows, eps, momentum);
}

// Backward sums in one launch, as bn_stats_grad.
extern "C" __global__ void bn_rows_stats_grad(const void* x, int xk, const void* dy, int dyk, const void* z, int zk,
                                              int f, float p, const float* mean, const float* invstd, double* part,
                                              i64 rows, i64 c, i64 per, int segs, unsigned* done, double* totals,
                                              float* dgamma, float* dbeta, int acc_dgamma, int acc_dbeta) {
    bn_rows_sums(x, xk, dy, dyk, z, zk, f, p, mean, invstd, part, rows, c, per, segs, 1);
    if (!last_block(done)) return;
    for (i64 ch = threadIdx.x; ch < c; ch += blockDim.x)
        bn_totals_ch(ch, part, segs, totals, dgamma, dbeta, acc_dgamma, acc_dbeta);
    if (threadIdx.x == 0) totals[2 * c] = (double)rows;
}
"#
    ),
};

/// How the rows of a channels-last batch norm (`hw = 1`) are split: `(segments, rows per
/// segment)`, about four blocks per multiprocessor in all (each block takes 32 channels of one
/// segment), at least 64 rows a segment.
fn row_segments(g: &BnGeom, sms: usize) -> (usize, usize) {
    let want = (4 * sms).div_ceil(g.c.div_ceil(32).max(1)).clamp(1, g.n.div_ceil(64).max(1));
    let per = g.n.div_ceil(want).max(1);
    (g.n.div_ceil(per).max(1), per)
}

/// The kernels' code and parameter of a fused activation (`bn_act`; -1 for none).
fn act_code(op: &str, f: Option<ActFn>) -> Result<(i32, f32)> {
    Ok(match f {
        None => (-1, 0.0),
        Some(ActFn::Relu) => (0, 0.0),
        Some(ActFn::LeakyRelu(s)) => (1, s),
        Some(ActFn::Elu(a)) => (2, a),
        Some(ActFn::Sigmoid) => (3, 0.0),
        Some(ActFn::Tanh) => (4, 0.0),
        Some(f @ (ActFn::Silu | ActFn::Gelu)) => {
            return Err(Error::State(format!("{op}: {f:?} cannot be fused into batch norm")));
        }
    })
}

impl CudaBackend {
    /// Whether batch norm on `x` runs the channels-last kernels: `x` is half (mixed precision's
    /// NHWC activations, given as `[n * h * w, c, 1]`). Half data in any other geometry is an
    /// error naming `op`.
    fn bn_rows(&self, op: &str, x: BufId, g: &BnGeom) -> Result<bool> {
        let half = self.dtype_of(x).is_half();
        if half && g.hw != 1 {
            return Err(Error::State(format!(
                "{op}: {} input {}x{}x{}: half-precision batch norm takes channels-last rows ([n * h * w, c, 1])",
                self.dtype_of(x),
                g.n,
                g.c,
                g.hw
            )));
        }
        Ok(half)
    }

    /// Blocks of a channels-last partial-sum launch.
    fn bn_row_blocks(g: &BnGeom, segs: usize) -> u32 {
        (g.c.div_ceil(32) * segs) as u32
    }
}

impl RunOp<ops::BatchNormTrain> for CudaBackend {
    fn run_op(&mut self, o: &ops::BatchNormTrain) -> Result<()> {
        let ops::BatchNormTrain { x, gamma, beta, y, mean, invstd, running, sync, act, .. } = *o;
        let g = &o.g;
        let rows = self.bn_rows("batch_norm_train", x, g)?;
        let (f, p) = act_code("batch_norm_train", act)?;
        let (xk, yk) = (self.kind_of(x, "batch norm input")?, self.kind_of(y, "batch norm output")?);
        let sms = self.gpu.sm_count as usize;
        let (segs, per) = if rows { row_segments(g, sms) } else { segments(g, sms) };
        // Scratch: partial sums (2 f64 per channel and segment), totals (2 f64 per channel and
        // the count; synchronised only), coefficients (2 f32 per channel).
        let part_bytes = g.c * segs * 16;
        let totals_bytes = (2 * g.c + 1) * 8;
        let scratch = self.op_scratch(part_bytes + totals_bytes + g.c * 8)?;
        let totals = scratch + part_bytes as u64;
        let coef = totals + totals_bytes as u64;
        let xp = self.ptr(x);
        let (rm, rv, momentum) = match running {
            Some((m, v, mo)) => (self.ptr(m), self.ptr(v), mo),
            None => (0, 0, 0.0),
        };
        let (mean, invstd, gamma, beta) = (self.ptr(mean), self.ptr(invstd), self.opt_ptr(gamma), self.opt_ptr(beta));
        let grid = (segs as u32, g.c as u32);
        if rows {
            let blocks = Self::bn_row_blocks(g, segs);
            if !sync {
                let stats = bn_rows_stats {
                    x: xp,
                    xk,
                    part: scratch,
                    rows: g.n,
                    c: g.c,
                    per,
                    segs: segs as i32,
                    done: self.done,
                    mean,
                    invstd,
                    rmean: rm,
                    rvar: rv,
                    gamma,
                    beta,
                    coef,
                    eps: g.eps,
                    momentum,
                };
                self.launch_blocks(blocks, BN_THREADS, 0, &stats)?;
            } else {
                let part = bn_rows_partial { x: xp, xk, part: scratch, rows: g.n, c: g.c, per, segs: segs as i32 };
                self.launch_blocks(blocks, BN_THREADS, 0, &part)?;
                self.bn_sync_finalize(scratch, segs, totals, g, (mean, invstd, rm, rv, gamma, beta, coef), momentum)?;
            }
        } else if !sync {
            // Plain batch norm: partial sums and statistics in one launch.
            let stats = bn_stats {
                x: xp,
                part: scratch,
                n: g.n,
                c: g.c,
                hw: g.hw,
                per,
                done: self.done,
                mean,
                invstd,
                rmean: rm,
                rvar: rv,
                gamma,
                beta,
                coef,
                eps: g.eps,
                momentum,
            };
            self.launch_grid(grid, BN_THREADS, &stats)?;
        } else {
            // Synchronised: this device's totals, summed over the group, then the statistics.
            let part =
                bn_partial { x: xp, dy: 0, mean: 0, invstd: 0, part: scratch, n: g.n, c: g.c, hw: g.hw, per, mode: 0 };
            self.launch_grid(grid, BN_THREADS, &part)?;
            self.bn_sync_finalize(scratch, segs, totals, g, (mean, invstd, rm, rv, gamma, beta, coef), momentum)?;
        }
        let total = g.n * g.c * g.hw;
        let apply = bn_apply { x: xp, coef, y: self.ptr(y), total, c: g.c, hw: g.hw, xk, yk, f, p };
        self.launch_elems(total, &apply)
    }
}

/// Device addresses of batch norm's per-channel outputs: mean, invstd, running mean and
/// variance (0 where not tracked), gamma, beta (0 where not affine), coefficients.
type BnStatPtrs = (u64, u64, u64, u64, u64, u64, u64);

impl CudaBackend {
    /// Synchronised batch norm's forward after this device's partial sums (`segs` per channel
    /// in `part`): per-channel totals into `totals`, summed over the group, then the
    /// statistics.
    fn bn_sync_finalize(
        &mut self,
        part: u64,
        segs: usize,
        totals: u64,
        g: &BnGeom,
        (mean, invstd, rmean, rvar, gamma, beta, coef): BnStatPtrs,
        momentum: f32,
    ) -> Result<()> {
        self.launch_bn_totals(part, segs, totals, g.c, (g.n * g.hw) as f64)?;
        self.sum_f64_now(totals, 2 * g.c + 1)?;
        let fin = bn_finalize {
            part: 0,
            segs: 0,
            totals,
            mean,
            invstd,
            rmean,
            rvar,
            gamma,
            beta,
            coef,
            c: g.c,
            m: g.n * g.hw,
            eps: g.eps,
            momentum,
        };
        self.launch_elems(g.c, &fin)
    }

    /// Launches `bn_totals` for the forward pass of synchronised batch norm: per-channel totals
    /// of the partial sums (and the count) into `totals`.
    fn launch_bn_totals(&mut self, part: u64, segs: usize, totals: u64, c: usize, count: f64) -> Result<()> {
        let args =
            bn_totals { part, segs: segs as i32, totals, dgamma: 0, dbeta: 0, acc_dgamma: 0, acc_dbeta: 0, c, count };
        self.launch_elems(c, &args)
    }
}

impl RunOp<ops::BatchNormInfer> for CudaBackend {
    fn run_op(&mut self, o: &ops::BatchNormInfer) -> Result<()> {
        let ops::BatchNormInfer { x, gamma, beta, running_mean, running_var, y, act, .. } = *o;
        let g = &o.g;
        self.bn_rows("batch_norm_infer", x, g)?;
        let (f, p) = act_code("batch_norm_infer", act)?;
        let (xk, yk) = (self.kind_of(x, "batch norm input")?, self.kind_of(y, "batch norm output")?);
        let args = bn_infer_forward {
            x: self.ptr(x),
            gamma: self.opt_ptr(gamma),
            beta: self.opt_ptr(beta),
            rmean: self.ptr(running_mean),
            rvar: self.ptr(running_var),
            y: self.ptr(y),
            n: g.n,
            c: g.c,
            hw: g.hw,
            eps: g.eps,
            xk,
            yk,
            f,
            p,
        };
        self.launch_elems(g.n * g.c * g.hw, &args)
    }
}

impl RunOp<ops::BatchNormBackward> for CudaBackend {
    fn run_op(&mut self, o: &ops::BatchNormBackward) -> Result<()> {
        let ops::BatchNormBackward { x, gamma, mean, invstd, dy, dx, dgamma, dbeta, sync, act, .. } = *o;
        let g = &o.g;
        let rows = self.bn_rows("batch_norm_backward", x, g)?;
        let (xk, dyk) = (self.kind_of(x, "batch norm input")?, self.kind_of(dy, "batch norm output gradient")?);
        // A fused activation: its output z (0 and kind 0 where none).
        let (f, p) = act_code("batch_norm_backward", act.map(|a| a.f))?;
        let (zp, zk) = match act {
            Some(a) => (self.ptr(a.y), self.kind_of(a.y, "batch norm activated output")?),
            None => (0, 0),
        };
        if !rows && (dyk, zk) != (0, 0) {
            return Err(Error::State(format!(
                "batch_norm_backward: channels-first batch norm takes an f32 output gradient and activated output, got {} and {}",
                self.dtype_of(dy),
                act.map_or(crate::backend::DType::F32, |a| self.dtype_of(a.y))
            )));
        }
        let sms = self.gpu.sm_count as usize;
        let (segs, per) = if rows { row_segments(g, sms) } else { segments(g, sms) };
        // Scratch: partial sums, then the totals (2 f64 per channel and the count).
        let part_bytes = g.c * segs * 16;
        let scratch = self.op_scratch(part_bytes + (2 * g.c + 1) * 8)?;
        let sums = scratch + part_bytes as u64;
        let (xp, mp, ip, dyp) = (self.ptr(x), self.ptr(mean), self.ptr(invstd), self.ptr(dy));
        // This device's sums (and count), and from them its own dgamma and dbeta, in one launch.
        let grad = |o: Option<GradOut>| o.map(|d| (self.ptr(d.buf), d.accumulate as i32)).unwrap_or((0, 0));
        let ((dgp, dga), (dbp, dba)) = (grad(dgamma), grad(dbeta));
        if rows {
            let stats = bn_rows_stats_grad {
                x: xp,
                xk,
                dy: dyp,
                dyk,
                z: zp,
                zk,
                f,
                p,
                mean: mp,
                invstd: ip,
                part: scratch,
                rows: g.n,
                c: g.c,
                per,
                segs: segs as i32,
                done: self.done,
                totals: sums,
                dgamma: dgp,
                dbeta: dbp,
                acc_dgamma: dga,
                acc_dbeta: dba,
            };
            self.launch_blocks(Self::bn_row_blocks(g, segs), BN_THREADS, 0, &stats)?;
        } else {
            let act = (zp, f, p);
            self.bn_plain_stats_grad(
                g,
                (xp, dyp, mp, ip),
                act,
                (scratch, sums),
                (segs, per),
                ((dgp, dga), (dbp, dba)),
            )?;
        }
        let Some(d) = dx else { return Ok(()) };
        if sync {
            self.sum_f64_now(sums, 2 * g.c + 1)?;
        }
        let total = g.n * g.c * g.hw;
        let args = bn_apply_grad {
            x: xp,
            gamma: self.opt_ptr(gamma),
            mean: mp,
            invstd: ip,
            dy: dyp,
            z: zp,
            f,
            p,
            sums,
            dx: self.ptr(d.buf),
            total,
            c: g.c,
            hw: g.hw,
            acc: d.accumulate as i32,
            xk,
            dyk,
            zk,
            dxk: self.kind_of(d.buf, "batch norm input gradient")?,
        };
        self.launch_elems(total, &args)
    }
}

/// (dgamma, accumulate), (dbeta, accumulate): device addresses (0 where not wanted).
type BnParamGrads = ((u64, i32), (u64, i32));

impl CudaBackend {
    /// The backward sums of channels-first batch norm (and `dgamma`, `dbeta`) in one launch;
    /// `(z, f, p)` the fused activation's output, code and parameter (`f` -1 where none).
    fn bn_plain_stats_grad(
        &mut self,
        g: &BnGeom,
        (xp, dyp, mp, ip): (u64, u64, u64, u64),
        (z, f, p): (u64, i32, f32),
        (scratch, sums): (u64, u64),
        (segs, per): (usize, usize),
        ((dgp, dga), (dbp, dba)): BnParamGrads,
    ) -> Result<()> {
        let stats = bn_stats_grad {
            x: xp,
            dy: dyp,
            z,
            f,
            p,
            mean: mp,
            invstd: ip,
            part: scratch,
            n: g.n,
            c: g.c,
            hw: g.hw,
            per,
            done: self.done,
            totals: sums,
            dgamma: dgp,
            dbeta: dbp,
            acc_dgamma: dga,
            acc_dbeta: dba,
        };
        self.launch_grid((segs as u32, g.c as u32), BN_THREADS, &stats)
    }
}
