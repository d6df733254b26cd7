//! Group normalisation on the GPU (forward and backward), as `backend/cpu/group_norm.rs`.
//!
//! One block per (sample, group) computes that group's statistics in f64 with the CPU's
//! two-pass formula (mean, then squared deviations), and in backward the group's sums for `dx`;
//! one block per channel sums `dgamma` and `dbeta` over samples in a fixed order (results
//! identical run to run, no atomics); the affine step is element-wise.

use super::CudaBackend;
use super::nvrtc::ModuleSrc;
use crate::Result;
use crate::backend::ops;
use crate::backend::ops::GradOut;
use crate::backend::ops::RunOp;

/// Threads per block of the reduction kernels (a power of two, for the block reduction).
const GN_THREADS: u32 = 256;

kernels! {
    gn_stats(x: (const float*), mean: (float*), invstd: (float*), len: i64, eps: float);
    gn_apply(x: (const float*), gamma: (const float*), beta: (const float*), mean: (const float*), invstd: (const float*), y: (float*), total: i64, c: i64, hw: i64, groups: i64);
    gn_grad_input(x: (const float*), gamma: (const float*), mean: (const float*), invstd: (const float*), dy: (const float*), dx: (float*), c: i64, hw: i64, groups: i64, acc: int);
    gn_grad_affine(x: (const float*), mean: (const float*), invstd: (const float*), dy: (const float*), dgamma: (float*), dbeta: (float*), acc_dgamma: int, acc_dbeta: int, n: i64, c: i64, hw: i64, groups: i64);
}

pub(super) const MODULE: ModuleSrc = ModuleSrc {
    name: "group_norm",
    kernels: KERNELS,
    prototypes,
    source: r#"
// Block k = sample * groups + group: mean and invstd of its len = (c / groups) * hw values.
extern "C" __global__ void gn_stats(const float* x, float* mean, float* invstd, i64 len, float eps) {
    __shared__ double sh[256];
    i64 k = blockIdx.x;
    const float* xs = x + k * len;
    double a = 0.0;
    for (i64 i = threadIdx.x; i < len; i += blockDim.x) a += (double)xs[i];
    double mu = block_sum(a, sh) / (double)len;
    double b = 0.0;
    for (i64 i = threadIdx.x; i < len; i += blockDim.x) { double d = (double)xs[i] - mu; b += d * d; }
    double var = block_sum(b, sh) / (double)len;
    if (threadIdx.x == 0) {
        mean[k] = (float)mu;
        invstd[k] = (float)(1.0 / sqrt(var + (double)eps));
    }
}

// y = x * scale + shift with scale = gamma[c] * invstd, shift = beta[c] - mean * scale (f32, as
// the CPU computes them).
extern "C" __global__ void gn_apply(const float* x, const float* gamma, const float* beta, const float* mean,
                                    const float* invstd, float* y, i64 total, i64 c, i64 hw, i64 groups) {
    GRID_LOOP(i, total) {
        i64 ch = (i / hw) % c;
        i64 k = (i / hw) / c * groups + ch / (c / groups);
        float is = invstd[k];
        float sc = gamma ? gamma[ch] * is : is;
        float sh = (beta ? beta[ch] : 0.f) - mean[k] * sc;
        y[i] = x[i] * sc + sh;
    }
}

// Block k: with d = dy * gamma[c] and xhat = (x - mean) * invstd over the group's len values,
// dx = invstd / len * (len * d - sum(d) - xhat * sum(d * xhat)).
extern "C" __global__ void gn_grad_input(const float* x, const float* gamma, const float* mean, const float* invstd,
                                         const float* dy, float* dx, i64 c, i64 hw, i64 groups, int acc) {
    __shared__ double sh[256];
    i64 k = blockIdx.x, cg = c / groups, len = cg * hw;
    i64 c0 = (k % groups) * cg;
    double mu = (double)mean[k], is = (double)invstd[k];
    const float* xs = x + k * len;
    const float* dys = dy + k * len;
    double a = 0.0, b = 0.0;
    for (i64 i = threadIdx.x; i < len; i += blockDim.x) {
        double d = (double)dys[i] * (gamma ? (double)gamma[c0 + i / hw] : 1.0);
        a += d;
        b += d * ((double)xs[i] - mu) * is;
    }
    double sd = block_sum(a, sh), sdx = block_sum(b, sh);
    double m = (double)len;
    for (i64 i = threadIdx.x; i < len; i += blockDim.x) {
        double d = (double)dys[i] * (gamma ? (double)gamma[c0 + i / hw] : 1.0);
        double xhat = ((double)xs[i] - mu) * is;
        store(&dx[k * len + i], (float)(is / m * (m * d - sd - xhat * sdx)), acc);
    }
}

// Block ch: dbeta = sum(dy), dgamma = sum(dy * xhat) over samples and positions.
extern "C" __global__ void gn_grad_affine(const float* x, const float* mean, const float* invstd, const float* dy,
                                          float* dgamma, float* dbeta, int acc_dgamma, int acc_dbeta, i64 n, i64 c,
                                          i64 hw, i64 groups) {
    __shared__ double sh[256];
    i64 ch = blockIdx.x;
    double a = 0.0, b = 0.0;
    for (i64 u = threadIdx.x; u < n * hw; u += blockDim.x) {
        i64 s = u / hw;
        i64 i = (s * c + ch) * hw + u % hw;
        i64 k = s * groups + ch / (c / groups);
        double d = (double)dy[i];
        a += d;
        b += d * ((double)x[i] - (double)mean[k]) * (double)invstd[k];
    }
    a = block_sum(a, sh);
    b = block_sum(b, sh);
    if (threadIdx.x == 0) {
        if (dbeta) store(&dbeta[ch], (float)a, acc_dbeta);
        if (dgamma) store(&dgamma[ch], (float)b, acc_dgamma);
    }
}
"#,
};

impl RunOp<ops::GroupNorm> for CudaBackend {
    fn run_op(&mut self, o: &ops::GroupNorm) -> Result<()> {
        let ops::GroupNorm { g, x, gamma, beta, y, mean, invstd } = *o;
        let (xp, mp, ip) = (self.ptr(x), self.ptr(mean), self.ptr(invstd));
        let len = g.c / g.groups * g.hw;
        let stats = gn_stats { x: xp, mean: mp, invstd: ip, len, eps: g.eps };
        self.launch_grid(((g.n * g.groups) as u32, 1), GN_THREADS, &stats)?;
        let total = g.n * g.c * g.hw;
        let apply = gn_apply {
            x: xp,
            gamma: self.opt_ptr(gamma),
            beta: self.opt_ptr(beta),
            mean: mp,
            invstd: ip,
            y: self.ptr(y),
            total,
            c: g.c,
            hw: g.hw,
            groups: g.groups,
        };
        self.launch_elems(total, &apply)
    }
}

impl RunOp<ops::GroupNormBackward> for CudaBackend {
    fn run_op(&mut self, o: &ops::GroupNormBackward) -> Result<()> {
        let ops::GroupNormBackward { g, x, gamma, mean, invstd, dy, dx, dgamma, dbeta } = *o;
        let (xp, mp, ip, dyp) = (self.ptr(x), self.ptr(mean), self.ptr(invstd), self.ptr(dy));
        if dgamma.is_some() || dbeta.is_some() {
            let grad = |o: Option<GradOut>| o.map(|d| (self.ptr(d.buf), d.accumulate as i32)).unwrap_or((0, 0));
            let (dgp, dga) = grad(dgamma);
            let (dbp, dba) = grad(dbeta);
            let args = gn_grad_affine {
                x: xp,
                mean: mp,
                invstd: ip,
                dy: dyp,
                dgamma: dgp,
                dbeta: dbp,
                acc_dgamma: dga,
                acc_dbeta: dba,
                n: g.n,
                c: g.c,
                hw: g.hw,
                groups: g.groups,
            };
            self.launch_grid((g.c as u32, 1), GN_THREADS, &args)?;
        }
        if let Some(d) = dx {
            let args = gn_grad_input {
                x: xp,
                gamma: self.opt_ptr(gamma),
                mean: mp,
                invstd: ip,
                dy: dyp,
                dx: self.ptr(d.buf),
                c: g.c,
                hw: g.hw,
                groups: g.groups,
                acc: d.accumulate as i32,
            };
            self.launch_grid(((g.n * g.groups) as u32, 1), GN_THREADS, &args)?;
        }
        Ok(())
    }
}
