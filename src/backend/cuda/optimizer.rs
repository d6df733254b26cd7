//! Optimizer updates and gradient clipping on the GPU, the CPU reference's formulas
//! (`backend/cpu/optimizer.rs`) operation for operation. The learning rate and momentum/beta1
//! come from the device `hyper` buffer and the step number from a device counter, so a replayed
//! CUDA graph uses whatever the trainer wrote before the launch: schedules reach the GPU.
//!
//! One small kernel advances the step counter (and NAdam's momentum product), then one launch
//! per parameter tensor updates it. Clipping by norm sums squares in f64: a fixed number of
//! blocks per tensor writes partial sums to fixed slots, one block adds the slots in order (no
//! atomics, so the result is the same every run), then every gradient is scaled by PyTorch's
//! coefficient.

use super::CudaBackend;
use super::nvrtc::ModuleSrc;
use crate::Result;
use crate::backend::ops;
use crate::backend::ops::OptRule;
use crate::backend::ops::RunOp;

kernels! {
    opt_begin(step: (u64*), scalars: (float*), hyper: (const float*), md: float, guard: (const float*));
    opt_sgd(w: (float*), g: (const float*), buf: (float*), n: i64, hyper: (const float*), step: (const u64*), damp: float, nesterov: int, wd: float, guard: (const float*));
    opt_adam(w: (float*), g: (const float*), m: (float*), v: (float*), vmax: (float*), n: i64, hyper: (const float*), step: (const u64*), beta2: float, eps: float, wd: float, decoupled: int, guard: (const float*));
    opt_rmsprop(w: (float*), g: (const float*), sq: (float*), buf: (float*), ga: (float*), n: i64, hyper: (const float*), alpha: float, eps: float, wd: float, guard: (const float*));
    opt_adagrad(w: (float*), g: (const float*), sum: (float*), n: i64, hyper: (const float*), step: (const u64*), lr_decay: float, eps: float, wd: float, guard: (const float*));
    opt_adadelta(w: (float*), g: (const float*), sq: (float*), acc: (float*), n: i64, hyper: (const float*), rho: float, eps: float, wd: float, guard: (const float*));
    opt_nadam(w: (float*), g: (const float*), m: (float*), v: (float*), n: i64, hyper: (const float*), step: (const u64*), scalars: (const float*), beta2: float, eps: float, wd: float, md: float, guard: (const float*));
    sumsq_partial(g: (const float*), n: i64, slots: (double*));
    sum_slots(slots: (const double*), count: i64, acc: (double*));
    clip_scale(g: (float*), n: i64, acc: (const double*), max_norm: float, norm_out: (float*));
    clip_value(g: (float*), n: i64, clip: float);
    check_finite(stats: (const float*), acc: (const double*), g: (float*), sticky: int);
}

pub(super) const MODULE: ModuleSrc = ModuleSrc {
    name: "optimizer",
    kernels: KERNELS,
    prototypes,
    source: r#"
// Whether a CheckFinite guard says this step's update is skipped (no guard: never).
#define SKIPPED(guard) ((guard) != 0 && (guard)[GUARD_SKIP] != 0.f)

__device__ __forceinline__ float lerpf_(float a, float b, float w) {
    return w < 0.5f ? a + w * (b - a) : b - (b - a) * (1.f - w);
}

// t = ++step; for NAdam (md >= 0) scalars[0] = (float)(scalars[0] * mu_t).
extern "C" __global__ void opt_begin(u64* step, float* scalars, const float* hyper, float md, const float* guard) {
    if (SKIPPED(guard)) return;
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    u64 t = *step + 1;
    *step = t;
    if (md >= 0.f) {
        double mu = (double)hyper[HYPER_MOMENTUM] * (1.0 - 0.5 * pow(0.96, (double)t * (double)md));
        scalars[0] = (float)((double)scalars[0] * mu);
    }
}

extern "C" __global__ void opt_sgd(float* w, const float* g, float* buf, i64 n, const float* hyper,
                                   const u64* step, float damp, int nesterov, float wd, const float* guard) {
    if (SKIPPED(guard)) return;
    float lr = hyper[HYPER_LR], mu = hyper[HYPER_MOMENTUM];
    int first = *step == 1;
    GRID_LOOP(i, n) {
        float d = g[i];
        if (wd != 0.f) d = d + wd * w[i];
        if (mu != 0.f) {
            buf[i] = first ? d : buf[i] * mu + (1.f - damp) * d;
            d = nesterov ? d + mu * buf[i] : buf[i];
        }
        w[i] = w[i] - lr * d;
    }
}

extern "C" __global__ void opt_adam(float* w, const float* g, float* m, float* v, float* vmax, i64 n,
                                    const float* hyper, const u64* step, float beta2, float eps, float wd,
                                    int decoupled, const float* guard) {
    if (SKIPPED(guard)) return;
    double t = (double)*step, lr = (double)hyper[HYPER_LR], b1 = (double)hyper[HYPER_MOMENTUM];
    float step_size = (float)(lr / (1.0 - pow(b1, t)));
    float bc2_sqrt = (float)sqrt(1.0 - pow((double)beta2, t));
    float one_m_b1 = (float)(1.0 - b1), one_m_b2 = 1.f - beta2;
    float decay = (float)(1.0 - lr * (double)wd);
    GRID_LOOP(i, n) {
        float gi = g[i];
        if (wd != 0.f) {
            if (decoupled) w[i] *= decay; else gi = gi + wd * w[i];
        }
        m[i] = lerpf_(m[i], gi, one_m_b1);
        v[i] = v[i] * beta2 + one_m_b2 * gi * gi;
        float denom;
        if (vmax) {
            if (v[i] > vmax[i]) vmax[i] = v[i];
            denom = sqrtf(vmax[i]) / bc2_sqrt + eps;
        } else {
            denom = sqrtf(v[i]) / bc2_sqrt + eps;
        }
        w[i] = w[i] - step_size * (m[i] / denom);
    }
}

extern "C" __global__ void opt_rmsprop(float* w, const float* g, float* sq, float* buf, float* ga, i64 n,
                                       const float* hyper, float alpha, float eps, float wd, const float* guard) {
    if (SKIPPED(guard)) return;
    float lr = hyper[HYPER_LR], mu = hyper[HYPER_MOMENTUM], one_m_a = 1.f - alpha;
    GRID_LOOP(i, n) {
        float gi = g[i];
        if (wd != 0.f) gi = gi + wd * w[i];
        sq[i] = sq[i] * alpha + one_m_a * gi * gi;
        float avg;
        if (ga) {
            ga[i] = lerpf_(ga[i], gi, one_m_a);
            avg = sqrtf(sq[i] - ga[i] * ga[i]) + eps;
        } else {
            avg = sqrtf(sq[i]) + eps;
        }
        if (mu > 0.f) {
            buf[i] = buf[i] * mu + gi / avg;
            w[i] = w[i] - lr * buf[i];
        } else {
            w[i] = w[i] - lr * (gi / avg);
        }
    }
}

extern "C" __global__ void opt_adagrad(float* w, const float* g, float* sum, i64 n, const float* hyper,
                                       const u64* step, float lr_decay, float eps, float wd, const float* guard) {
    if (SKIPPED(guard)) return;
    float clr = (float)((double)hyper[HYPER_LR] / (1.0 + ((double)*step - 1.0) * (double)lr_decay));
    GRID_LOOP(i, n) {
        float gi = g[i];
        if (wd != 0.f) gi = gi + wd * w[i];
        sum[i] += gi * gi;
        float std_ = sqrtf(sum[i]) + eps;
        w[i] = w[i] - clr * (gi / std_);
    }
}

extern "C" __global__ void opt_adadelta(float* w, const float* g, float* sq, float* acc, i64 n,
                                        const float* hyper, float rho, float eps, float wd, const float* guard) {
    if (SKIPPED(guard)) return;
    float lr = hyper[HYPER_LR], one_m_r = 1.f - rho;
    GRID_LOOP(i, n) {
        float gi = g[i];
        if (wd != 0.f) gi = gi + wd * w[i];
        sq[i] = sq[i] * rho + one_m_r * gi * gi;
        float std_ = sqrtf(sq[i] + eps);
        float delta = sqrtf(acc[i] + eps) / std_ * gi;
        acc[i] = acc[i] * rho + one_m_r * delta * delta;
        w[i] = w[i] - lr * delta;
    }
}

extern "C" __global__ void opt_nadam(float* w, const float* g, float* m, float* v, i64 n, const float* hyper,
                                     const u64* step, const float* scalars, float beta2, float eps, float wd,
                                     float md, const float* guard) {
    if (SKIPPED(guard)) return;
    double t = (double)*step, lr = (double)hyper[HYPER_LR], b1 = (double)hyper[HYPER_MOMENTUM];
    double mu = b1 * (1.0 - 0.5 * pow(0.96, t * (double)md));
    double mu_next = b1 * (1.0 - 0.5 * pow(0.96, (t + 1.0) * (double)md));
    double mu_product = (double)scalars[0];
    float c_grad = (float)(-lr * (1.0 - mu) / (1.0 - mu_product));
    float c_avg = (float)(-lr * mu_next / (1.0 - mu_product * mu_next));
    float one_m_b1 = (float)(1.0 - b1), one_m_b2 = 1.f - beta2;
    float bc2 = (float)(1.0 - pow((double)beta2, t));
    GRID_LOOP(i, n) {
        float gi = g[i];
        if (wd != 0.f) gi = gi + wd * w[i];
        m[i] = lerpf_(m[i], gi, one_m_b1);
        v[i] = v[i] * beta2 + one_m_b2 * gi * gi;
        float denom = sqrtf(v[i] / bc2) + eps;
        w[i] = w[i] + c_grad * (gi / denom);
        w[i] = w[i] + c_avg * (m[i] / denom);
    }
}

// slots[blockIdx.x] = this block's share of the sum of squares of g.
extern "C" __global__ void sumsq_partial(const float* g, i64 n, double* slots) {
    __shared__ double sh[256];
    double s = 0.0;
    GRID_LOOP(i, n) s += (double)g[i] * (double)g[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) slots[blockIdx.x] = s;
}

// *acc = sum of count slots, in a fixed order (one block).
extern "C" __global__ void sum_slots(const double* slots, i64 count, double* acc) {
    __shared__ double sh[256];
    double s = 0.0;
    for (i64 i = threadIdx.x; i < count; i += blockDim.x) s += slots[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) *acc = s;
}

// g *= min(max_norm / (sqrt(acc) + 1e-6), 1); the first launch also writes the norm.
extern "C" __global__ void clip_scale(float* g, i64 n, const double* acc, float max_norm, float* norm_out) {
    double norm = sqrt(*acc);
    double coef = (double)max_norm / (norm + 1e-6);
    float cf = (float)(coef < 1.0 ? coef : 1.0);
    if (norm_out && blockIdx.x == 0 && threadIdx.x == 0) *norm_out = (float)norm;
    GRID_LOOP(i, n) g[i] *= cf;
}

// The guard update of CheckFinite (one thread), as the CPU backend's check_finite.
extern "C" __global__ void check_finite(const float* stats, const double* acc, float* g, int sticky) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    float loss = stats[STATS_LOSS];
    double norm = sqrt(*acc);
    int bad_loss = !isfinite(loss);
    int bad_norm = !isfinite((float)norm);
    int bad = bad_loss || bad_norm;
    int stuck = sticky && g[GUARD_FIRST_BAD] != 0.f;
    if (bad && g[GUARD_FIRST_BAD] == 0.f) {
        g[GUARD_FIRST_BAD] = g[GUARD_CHECKED] + 1.f;
        g[GUARD_WHAT] = (float)(bad_loss + 2 * bad_norm);
        g[GUARD_LOSS] = loss;
        g[GUARD_NORM] = (float)norm;
    }
    if (bad) g[GUARD_BAD_STEPS] += 1.f;
    g[GUARD_CHECKED] += 1.f;
    g[GUARD_SKIP] = (bad || stuck) ? 1.f : 0.f;
}

extern "C" __global__ void clip_value(float* g, i64 n, float clip) {
    GRID_LOOP(i, n) g[i] = g[i] < -clip ? -clip : (g[i] > clip ? clip : g[i]);
}
"#,
};

impl RunOp<ops::OptimizerStep> for CudaBackend {
    fn run_op(&mut self, o: &ops::OptimizerStep) -> Result<()> {
        let ops::OptimizerStep { rule, hyper, step, scalars, .. } = *o;
        let params = &o.params;
        let step_ptr = self.mem.counter_ptr(step.0)?;
        let (h, sc) = (self.ptr(hyper), self.ptr(scalars));
        let guard = o.guard.map(|g| self.ptr(g)).unwrap_or(0);
        let md = match rule {
            OptRule::NAdam { momentum_decay, .. } => momentum_decay,
            _ => -1.0,
        };
        self.launch_blocks(1, 32, 0, &opt_begin { step: step_ptr, scalars: sc, hyper: h, md, guard })?;
        for p in params {
            let (w, g, n) = (self.ptr(p.value), self.ptr(p.grad), p.len);
            let st = |k: usize| p.state.get(k).map(|&b| self.ptr(b)).unwrap_or(0);
            match rule {
                OptRule::Sgd { dampening, nesterov, weight_decay } => {
                    let k = opt_sgd {
                        w,
                        g,
                        buf: st(0),
                        n,
                        hyper: h,
                        step: step_ptr,
                        damp: dampening,
                        nesterov: nesterov as i32,
                        wd: weight_decay,
                        guard,
                    };
                    self.launch_elems(n, &k)?
                }
                OptRule::Adam { beta2, eps, weight_decay, decoupled, .. } => {
                    let k = opt_adam {
                        w,
                        g,
                        m: st(0),
                        v: st(1),
                        vmax: st(2),
                        n,
                        hyper: h,
                        step: step_ptr,
                        beta2,
                        eps,
                        wd: weight_decay,
                        decoupled: decoupled as i32,
                        guard,
                    };
                    self.launch_elems(n, &k)?
                }
                OptRule::RmsProp { alpha, eps, weight_decay, .. } => {
                    let k = opt_rmsprop {
                        w,
                        g,
                        sq: st(0),
                        buf: st(1),
                        ga: st(2),
                        n,
                        hyper: h,
                        alpha,
                        eps,
                        wd: weight_decay,
                        guard,
                    };
                    self.launch_elems(n, &k)?
                }
                OptRule::Adagrad { lr_decay, eps, weight_decay } => {
                    let k = opt_adagrad {
                        w,
                        g,
                        sum: st(0),
                        n,
                        hyper: h,
                        step: step_ptr,
                        lr_decay,
                        eps,
                        wd: weight_decay,
                        guard,
                    };
                    self.launch_elems(n, &k)?
                }
                OptRule::Adadelta { rho, eps, weight_decay } => {
                    let k =
                        opt_adadelta { w, g, sq: st(0), acc: st(1), n, hyper: h, rho, eps, wd: weight_decay, guard };
                    self.launch_elems(n, &k)?
                }
                OptRule::NAdam { beta2, eps, weight_decay, momentum_decay } => {
                    let k = opt_nadam {
                        w,
                        g,
                        m: st(0),
                        v: st(1),
                        n,
                        hyper: h,
                        step: step_ptr,
                        scalars: sc,
                        beta2,
                        eps,
                        wd: weight_decay,
                        md: momentum_decay,
                        guard,
                    };
                    self.launch_elems(n, &k)?
                }
            }
        }
        Ok(())
    }
}

impl RunOp<ops::CheckFinite> for CudaBackend {
    /// [`ops::CheckFinite`]: the global norm as for clipping (fixed-order f64 sums), then one
    /// thread updates the guard; nothing is read back.
    fn run_op(&mut self, o: &ops::CheckFinite) -> Result<()> {
        let ops::CheckFinite { ref grads, stats, guard, sticky } = *o;
        const SLOTS: usize = 256;
        let acc = self.op_scratch(8 * (1 + SLOTS * grads.len().max(1)))?;
        let slots = acc + 8;
        for (k, &(g, n)) in grads.iter().enumerate() {
            let args = sumsq_partial { g: self.ptr(g), n, slots: slots + (8 * SLOTS * k) as u64 };
            self.launch_blocks(SLOTS as u32, 256, 0, &args)?;
        }
        let count = SLOTS * grads.len();
        self.launch_blocks(1, 256, 0, &sum_slots { slots, count, acc })?;
        let args = check_finite { stats: self.ptr(stats), acc, g: self.ptr(guard), sticky: sticky as i32 };
        self.launch_blocks(1, 32, 0, &args)
    }
}

impl RunOp<ops::ClipGradNorm> for CudaBackend {
    fn run_op(&mut self, o: &ops::ClipGradNorm) -> Result<()> {
        let ops::ClipGradNorm { ref grads, max_norm, norm } = *o;
        // Scratch: the total, then SLOTS partial sums per tensor.
        const SLOTS: usize = 256;
        let acc = self.op_scratch(8 * (1 + SLOTS * grads.len()))?;
        let slots = acc + 8;
        for (k, &(g, n)) in grads.iter().enumerate() {
            let args = sumsq_partial { g: self.ptr(g), n, slots: slots + (8 * SLOTS * k) as u64 };
            self.launch_blocks(SLOTS as u32, 256, 0, &args)?;
        }
        let count = SLOTS * grads.len();
        self.launch_blocks(1, 256, 0, &sum_slots { slots, count, acc })?;
        for (k, &(g, n)) in grads.iter().enumerate() {
            let out = if k == 0 { self.ptr(norm) } else { 0 };
            self.launch_elems(n, &clip_scale { g: self.ptr(g), n, acc, max_norm, norm_out: out })?;
        }
        Ok(())
    }
}

impl RunOp<ops::ClipGradValue> for CudaBackend {
    fn run_op(&mut self, o: &ops::ClipGradValue) -> Result<()> {
        let ops::ClipGradValue { ref grads, clip } = *o;
        for &(g, n) in grads {
            self.launch_elems(n, &clip_value { g: self.ptr(g), n, clip })?;
        }
        Ok(())
    }
}
