//! Synchronised batch norm on the GPU (the `sync` ops of a data-parallel group), as
//! `backend/cpu/batch_norm.rs` defines it: the forward pass all-reduces each channel's f64 sums
//! of `x` and `x^2` with the sample count, the backward pass the sums of `dy` and `dy * xhat`
//! (for `dx`; `dgamma` and `dbeta` stay local, as the gradient all-reduce averages them).
//!
//! The per-segment partial sums come from `batch_norm.rs`'s `bn_partial`; here they are summed
//! per channel in f64 (fixed order), reduced over the group by NCCL (f64, on NCCL's stream, the
//! compute stream waiting for it), and the statistics are finished from the group's totals and
//! count. A group of one computes what plain batch norm computes, up to the order of the f64
//! additions.

use super::CudaBackend;
use super::batch_norm::{BN_THREADS, bn_apply, bn_finalize_grad, bn_partial, segments};
use super::nvrtc::ModuleSrc;
use crate::Result;
use crate::backend::ops;
use crate::backend::ops::GradOut;

kernels! {
    bn_sync_totals(part: (const double*), segs: int, totals: (double*), c: i64, count: double);
    bn_sync_finalize(totals: (const double*), mean: (float*), invstd: (float*), rmean: (float*), rvar: (float*), gamma: (const float*), beta: (const float*), coef: (float*), c: i64, eps: float, momentum: float);
    bn_sync_put(p: (double*), v: double);
    bn_sync_apply_grad(x: (const float*), gamma: (const float*), mean: (const float*), invstd: (const float*), dy: (const float*), sums: (const double*), dx: (float*), total: i64, c: i64, hw: i64, acc: int);
}

pub(super) const MODULE: ModuleSrc = ModuleSrc {
    name: "sync_batch_norm",
    kernels: KERNELS,
    prototypes,
    source: r#"
// totals[2ch], totals[2ch + 1]: the sums over segments of the partial sums of channel ch;
// totals[2c]: this rank's count.
extern "C" __global__ void bn_sync_totals(const double* part, int segs, double* totals, i64 c, double count) {
    GRID_LOOP(ch, c) {
        double a = 0.0, b = 0.0;
        for (int s = 0; s < segs; s++) { a += part[(ch * segs + s) * 2]; b += part[(ch * segs + s) * 2 + 1]; }
        totals[2 * ch] = a;
        totals[2 * ch + 1] = b;
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) totals[2 * c] = count;
}

// bn_finalize of batch_norm.rs on the group's totals (sum x, sum x^2, count).
extern "C" __global__ void bn_sync_finalize(const double* totals, float* mean, float* invstd, float* rmean,
                                            float* rvar, const float* gamma, const float* beta, float* coef, i64 c,
                                            float eps, float momentum) {
    GRID_LOOP(ch, c) {
        double count = totals[2 * c];
        double mu = totals[2 * ch] / count;
        double var = totals[2 * ch + 1] / count - mu * mu;
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

extern "C" __global__ void bn_sync_put(double* p, double v) {
    if (blockIdx.x == 0 && threadIdx.x == 0) *p = v;
}

// bn_apply_grad of batch_norm.rs with the group's sums and count (sums[2c]).
extern "C" __global__ void bn_sync_apply_grad(const float* x, const float* gamma, const float* mean,
                                              const float* invstd, const float* dy, const double* sums, float* dx,
                                              i64 total, i64 c, i64 hw, int acc) {
    double count = sums[2 * c];
    GRID_LOOP(i, total) {
        i64 ch = (i / hw) % c;
        double is = (double)invstd[ch];
        double k = (gamma ? (double)gamma[ch] : 1.0) * is / count;
        double xhat = ((double)x[i] - (double)mean[ch]) * is;
        store(&dx[i], (float)(k * (count * (double)dy[i] - sums[2 * ch] - xhat * sums[2 * ch + 1])), acc);
    }
}
"#,
};

impl CudaBackend {
    pub(super) fn sync_bn_train_forward(&mut self, o: &ops::BatchNormTrain) -> Result<()> {
        let ops::BatchNormTrain { x, gamma, beta, y, mean, invstd, running, .. } = *o;
        let g = &o.g;
        let (segs, per) = segments(g, self.gpu.sm_count as usize);
        // Scratch: partial sums (2 f64 per channel and segment), totals (2 f64 per channel and
        // the count), coefficients (2 f32 per channel).
        let part_bytes = g.c * segs * 16;
        let totals_bytes = (2 * g.c + 1) * 8;
        let scratch = self.op_scratch(part_bytes + totals_bytes + g.c * 8)?;
        let totals = scratch + part_bytes as u64;
        let coef = totals + totals_bytes as u64;
        let xp = self.ptr(x);
        let part =
            bn_partial { x: xp, dy: 0, mean: 0, invstd: 0, part: scratch, n: g.n, c: g.c, hw: g.hw, per, mode: 0 };
        self.launch_grid((segs as u32, g.c as u32), BN_THREADS, &part)?;
        let count = (g.n * g.hw) as f64;
        let tot = bn_sync_totals { part: scratch, segs: segs as i32, totals, c: g.c, count };
        self.launch_elems(g.c.max(1), &tot)?;
        self.sum_f64_now(totals, 2 * g.c + 1)?;
        let (rm, rv, momentum) = match running {
            Some((m, v, mo)) => (self.ptr(m), self.ptr(v), mo),
            None => (0, 0, 0.0),
        };
        let fin = bn_sync_finalize {
            totals,
            mean: self.ptr(mean),
            invstd: self.ptr(invstd),
            rmean: rm,
            rvar: rv,
            gamma: self.opt_ptr(gamma),
            beta: self.opt_ptr(beta),
            coef,
            c: g.c,
            eps: g.eps,
            momentum,
        };
        self.launch_elems(g.c, &fin)?;
        let total = g.n * g.c * g.hw;
        let apply = bn_apply { x: xp, coef, y: self.ptr(y), total, c: g.c, hw: g.hw };
        self.launch_elems(total, &apply)
    }

    pub(super) fn sync_bn_backward(&mut self, o: &ops::BatchNormBackward) -> Result<()> {
        let ops::BatchNormBackward { x, gamma, mean, invstd, dy, dx, dgamma, dbeta, .. } = *o;
        let g = &o.g;
        let (segs, per) = segments(g, self.gpu.sm_count as usize);
        let part_bytes = g.c * segs * 16;
        let scratch = self.op_scratch(part_bytes + (2 * g.c + 1) * 8)?;
        let sums = scratch + part_bytes as u64;
        let (xp, mp, ip, dyp) = (self.ptr(x), self.ptr(mean), self.ptr(invstd), self.ptr(dy));
        let part =
            bn_partial { x: xp, dy: dyp, mean: mp, invstd: ip, part: scratch, n: g.n, c: g.c, hw: g.hw, per, mode: 1 };
        self.launch_grid((segs as u32, g.c as u32), BN_THREADS, &part)?;
        // This rank's sums, and from them its own dgamma and dbeta.
        let grad = |o: Option<GradOut>| o.map(|d| (self.ptr(d.buf), d.accumulate as i32)).unwrap_or((0, 0));
        let (dgp, dga) = grad(dgamma);
        let (dbp, dba) = grad(dbeta);
        let fin = bn_finalize_grad {
            part: scratch,
            segs: segs as i32,
            sums,
            dgamma: dgp,
            dbeta: dbp,
            acc_dgamma: dga,
            acc_dbeta: dba,
            c: g.c,
        };
        self.launch_elems(g.c, &fin)?;
        let Some(d) = dx else { return Ok(()) };
        let count_at = sums + (2 * g.c * 8) as u64;
        self.launch_elems(1, &bn_sync_put { p: count_at, v: (g.n * g.hw) as f64 })?;
        self.sum_f64_now(sums, 2 * g.c + 1)?;
        let total = g.n * g.c * g.hw;
        let args = bn_sync_apply_grad {
            x: xp,
            gamma: self.opt_ptr(gamma),
            mean: mp,
            invstd: ip,
            dy: dyp,
            sums,
            dx: self.ptr(d.buf),
            total,
            c: g.c,
            hw: g.hw,
            acc: d.accumulate as i32,
        };
        self.launch_elems(total, &args)
    }
}
