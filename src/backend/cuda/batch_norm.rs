//! Batch normalisation on the GPU: training forward (batch statistics, running-statistic update
//! as PyTorch does it), inference forward, and backward, as `backend/cpu/batch_norm.rs`.
//!
//! Training forward and backward take one block per channel: the block sums its channel's
//! `n * hw` values in f64 (mean, then the centred squares: two passes, as the CPU does), reduces
//! in a fixed tree order, then applies the result to the same values. No atomics, no partial
//! buffers: results are identical run to run, and the statistics carry f64 accuracy, so they
//! match the CPU's f64 sums to f32 rounding.

use super::CudaBackend;
use super::driver::Args;
use super::nvrtc::ModuleSrc;
use crate::Result;
use crate::backend::ops::{BnGeom, BufId, GradOut};

/// Threads per block of the per-channel kernels (a power of two, for the block reduction).
const BN_THREADS: u32 = 512;

pub(super) const MODULE: ModuleSrc = ModuleSrc {
    name: "batch_norm",
    kernels: &["bn_train_forward", "bn_infer_forward", "bn_backward"],
    source: r#"
// Index of value t (0 <= t < n*hw) of channel ch in an [n, c, hw] tensor.
#define BN_AT(t) ((((t) / hw) * c + ch) * hw + (t) % hw)

extern "C" __global__ void bn_train_forward(const float* x, const float* gamma, const float* beta, float* y,
                                            float* mean, float* invstd, float* rmean, float* rvar,
                                            i64 n, i64 c, i64 hw, float eps, float momentum) {
    extern __shared__ double sh[];
    i64 ch = blockIdx.x;
    i64 m = n * hw;
    double s = 0.0;
    for (i64 t = threadIdx.x; t < m; t += blockDim.x) s += (double)x[BN_AT(t)];
    double count = (double)m;
    double mu = block_sum(s, sh) / count;
    double q = 0.0;
    for (i64 t = threadIdx.x; t < m; t += blockDim.x) { double d = (double)x[BN_AT(t)] - mu; q += d * d; }
    double var = block_sum(q, sh) / count;
    float meanf = (float)mu;
    float isf = (float)(1.0 / sqrt(var + (double)eps));
    if (threadIdx.x == 0) {
        mean[ch] = meanf;
        invstd[ch] = isf;
        if (rmean) {
            double mo = (double)momentum;
            double unbias = count > 1.0 ? count / (count - 1.0) : 1.0;
            rmean[ch] = (float)((1.0 - mo) * (double)rmean[ch] + mo * mu);
            rvar[ch] = (float)((1.0 - mo) * (double)rvar[ch] + mo * var * unbias);
        }
    }
    float g = gamma ? gamma[ch] : 1.f;
    float b = beta ? beta[ch] : 0.f;
    float a = g * isf;
    float shift = b - meanf * a;
    for (i64 t = threadIdx.x; t < m; t += blockDim.x) { i64 i = BN_AT(t); y[i] = x[i] * a + shift; }
}

extern "C" __global__ void bn_infer_forward(const float* x, const float* gamma, const float* beta, const float* rmean,
                                            const float* rvar, float* y, i64 n, i64 c, i64 hw, float eps) {
    GRID_LOOP(i, n * c * hw) {
        i64 ch = (i / hw) % c;
        float g = gamma ? gamma[ch] : 1.f;
        float b = beta ? beta[ch] : 0.f;
        float scale = g / sqrtf(rvar[ch] + eps);
        float shift = b - rmean[ch] * scale;
        y[i] = x[i] * scale + shift;
    }
}

// dx = gamma * invstd / M * (M * dy - sum(dy) - xhat * sum(dy * xhat)), M = n * hw;
// dgamma = sum(dy * xhat), dbeta = sum(dy). Null outputs are skipped.
extern "C" __global__ void bn_backward(const float* x, const float* gamma, const float* mean, const float* invstd,
                                       const float* dy, float* dx, float* dgamma, float* dbeta,
                                       i64 n, i64 c, i64 hw, int acc_dx, int acc_dgamma, int acc_dbeta) {
    extern __shared__ double sh[];
    i64 ch = blockIdx.x;
    i64 m = n * hw;
    double mu = (double)mean[ch], is = (double)invstd[ch];
    double sdy = 0.0, sdyx = 0.0;
    for (i64 t = threadIdx.x; t < m; t += blockDim.x) {
        i64 i = BN_AT(t);
        double d = (double)dy[i];
        sdy += d;
        sdyx += d * ((double)x[i] - mu) * is;
    }
    sdy = block_sum(sdy, sh);
    sdyx = block_sum(sdyx, sh);
    if (threadIdx.x == 0) {
        if (dbeta) store(&dbeta[ch], (float)sdy, acc_dbeta);
        if (dgamma) store(&dgamma[ch], (float)sdyx, acc_dgamma);
    }
    if (dx) {
        double count = (double)m;
        double k = (gamma ? (double)gamma[ch] : 1.0) * is / count;
        for (i64 t = threadIdx.x; t < m; t += blockDim.x) {
            i64 i = BN_AT(t);
            double xhat = ((double)x[i] - mu) * is;
            store(&dx[i], (float)(k * (count * (double)dy[i] - sdy - xhat * sdyx)), acc_dx);
        }
    }
}
"#,
};

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn bn_train_forward(
        &mut self,
        g: &BnGeom,
        x: BufId,
        gamma: Option<BufId>,
        beta: Option<BufId>,
        y: BufId,
        mean: BufId,
        invstd: BufId,
        running: Option<(BufId, BufId, f32)>,
    ) -> Result<()> {
        let (rm, rv, momentum) = match running {
            Some((m, v, mo)) => (self.ptr(m), self.ptr(v), mo),
            None => (0, 0, 0.0),
        };
        let args = Args::new()
            .ptr(self.ptr(x))
            .ptr(self.opt_ptr(gamma))
            .ptr(self.opt_ptr(beta))
            .ptr(self.ptr(y))
            .ptr(self.ptr(mean))
            .ptr(self.ptr(invstd))
            .ptr(rm)
            .ptr(rv)
            .i64(g.n)
            .i64(g.c)
            .i64(g.hw)
            .f32(g.eps)
            .f32(momentum);
        self.launch_blocks("bn_train_forward", g.c as u32, BN_THREADS, BN_THREADS * 8, &args)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn bn_infer_forward(
        &mut self,
        g: &BnGeom,
        x: BufId,
        gamma: Option<BufId>,
        beta: Option<BufId>,
        running_mean: BufId,
        running_var: BufId,
        y: BufId,
    ) -> Result<()> {
        let args = Args::new()
            .ptr(self.ptr(x))
            .ptr(self.opt_ptr(gamma))
            .ptr(self.opt_ptr(beta))
            .ptr(self.ptr(running_mean))
            .ptr(self.ptr(running_var))
            .ptr(self.ptr(y))
            .i64(g.n)
            .i64(g.c)
            .i64(g.hw)
            .f32(g.eps);
        self.launch_elems("bn_infer_forward", g.n * g.c * g.hw, &args)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn bn_backward(
        &mut self,
        g: &BnGeom,
        x: BufId,
        gamma: Option<BufId>,
        mean: BufId,
        invstd: BufId,
        dy: BufId,
        dx: Option<GradOut>,
        dgamma: Option<GradOut>,
        dbeta: Option<GradOut>,
    ) -> Result<()> {
        let grad = |o: Option<GradOut>| o.map(|d| (self.ptr(d.buf), d.accumulate as i32)).unwrap_or((0, 0));
        let (dxp, dxa) = grad(dx);
        let (dgp, dga) = grad(dgamma);
        let (dbp, dba) = grad(dbeta);
        let args = Args::new()
            .ptr(self.ptr(x))
            .ptr(self.opt_ptr(gamma))
            .ptr(self.ptr(mean))
            .ptr(self.ptr(invstd))
            .ptr(self.ptr(dy))
            .ptr(dxp)
            .ptr(dgp)
            .ptr(dbp)
            .i64(g.n)
            .i64(g.c)
            .i64(g.hw)
            .i32(dxa)
            .i32(dga)
            .i32(dba);
        self.launch_blocks("bn_backward", g.c as u32, BN_THREADS, BN_THREADS * 8, &args)
    }
}
