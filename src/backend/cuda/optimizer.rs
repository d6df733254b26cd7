//! Optimizer updates and gradient clipping on the GPU, the CPU reference's formulas
//! (`backend/cpu/optimizer.rs`) operation for operation. The learning rate and momentum/beta1
//! come from the device `hyper` buffer and the step number from a device counter, so a replayed
//! CUDA graph uses whatever the trainer wrote before the launch: schedules reach the GPU.
//!
//! Every op here is a multi-tensor launch (`multi_tensor.rs`, as PyTorch's fused optimizers):
//! one launch updates every parameter, one block per chunk of 8192 values, and its last block to
//! finish advances the step counter (and NAdam's momentum product) that every block computed
//! from the values before the launch. Clipping by norm and the non-finite check sum squares in
//! f64: each chunk's partial sum goes to its own slot and the launch's last block adds the slots
//! in a fixed order (no atomic additions, so the result is the same every run) and updates the
//! guard or writes the norm; clipping then scales every gradient by PyTorch's coefficient in one
//! more launch. A default training step thus runs two kernels after backward (check, update),
//! whatever the number of parameter tensors.

use super::CudaBackend;
use super::multi_tensor::MT_CHUNK;
use super::nvrtc::ModuleSrc;
use crate::Result;
use crate::backend::ops;
use crate::backend::ops::OptRule;
use crate::backend::ops::RunOp;

/// Threads per block of the multi-tensor and reduction kernels (the reductions' shared arrays
/// hold 256 values).
const MT_THREADS: u32 = 256;

kernels! {
    opt_begin(step: (u64*), scalars: (float*), hyper: (const float*), md: float, guard: (const float*));
    opt_sgd(tab: (const u64*), chunks: (const u64*), chunk: i64, hyper: (const float*), step: (u64*), done: (unsigned*), damp: float, nesterov: int, wd: float, guard: (const float*));
    opt_adam(tab: (const u64*), chunks: (const u64*), chunk: i64, hyper: (const float*), step: (u64*), done: (unsigned*), beta2: float, eps: float, wd: float, decoupled: int, guard: (const float*));
    opt_rmsprop(tab: (const u64*), chunks: (const u64*), chunk: i64, hyper: (const float*), step: (u64*), done: (unsigned*), alpha: float, eps: float, wd: float, guard: (const float*));
    opt_adagrad(tab: (const u64*), chunks: (const u64*), chunk: i64, hyper: (const float*), step: (u64*), done: (unsigned*), lr_decay: float, eps: float, wd: float, guard: (const float*));
    opt_adadelta(tab: (const u64*), chunks: (const u64*), chunk: i64, hyper: (const float*), step: (u64*), done: (unsigned*), rho: float, eps: float, wd: float, guard: (const float*));
    opt_nadam(tab: (const u64*), chunks: (const u64*), chunk: i64, hyper: (const float*), step: (u64*), done: (unsigned*), scalars: (float*), beta2: float, eps: float, wd: float, md: float, guard: (const float*));
    sum_slots(slots: (const double*), count: i64, acc: (double*), norm_out: (float*));
    mt_norm(tab: (const u64*), chunks: (const u64*), chunk: i64, slots: (double*), done: (unsigned*), acc: (double*), norm_out: (float*));
    mt_clip_scale(tab: (const u64*), chunks: (const u64*), chunk: i64, acc: (const double*), max_norm: float);
    mt_clip_value(tab: (const u64*), chunks: (const u64*), chunk: i64, clip: float);
    check_finite(stats: (const float*), slots: (const double*), count: i64, g: (float*), sticky: int);
    mt_check_finite(tab: (const u64*), chunks: (const u64*), chunk: i64, slots: (double*), done: (unsigned*), stats: (const float*), g: (float*), sticky: int);
}

pub(super) const MODULE: ModuleSrc = ModuleSrc {
    name: "optimizer",
    kernels: KERNELS,
    prototypes,
    source: concat!(
        mt_prelude!(),
        r#"
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

// Each update kernel below runs one block per chunk of a multi-tensor table (multi_tensor.rs)
// whose records are (w, g, state 0, state 1, state 2, len); the arithmetic per value is the CPU
// reference's (backend/cpu/optimizer.rs), and the scalar coefficients are computed by every
// thread from the same inputs, so every block agrees on them bit for bit. Every block takes
// this step's number as *step + 1 (and NAdam's momentum product as opt_begin would make it);
// the last block to finish stores them (opt_end), so one launch does what opt_begin and the
// update did in two. (opt_begin remains for a step over no parameters.)

// NAdam's momentum product after step t, as opt_begin computes it.
__device__ __forceinline__ float nadam_product(const float* scalars, const float* hyper, u64 t, float md) {
    double mu = (double)hyper[HYPER_MOMENTUM] * (1.0 - 0.5 * pow(0.96, (double)t * (double)md));
    return (float)((double)scalars[0] * mu);
}

// After a block's updates: the last block stores the step number t (and, with scalars, NAdam's
// new momentum product), which every block computed from the values before this launch.
__device__ __forceinline__ void opt_end(unsigned* done, u64* step, u64 t, float* scalars, float product) {
    if (last_block(done) && threadIdx.x == 0) {
        *step = t;
        if (scalars) scalars[0] = product;
    }
}

extern "C" __global__ void opt_sgd(const u64* tab, const u64* chunks, i64 chunk, const float* hyper,
                                   u64* step, unsigned* done, float damp, int nesterov, float wd, const float* guard) {
    if (SKIPPED(guard)) return;
    u64 t = *step + 1;
    MtChunk c = mt_chunk(tab, chunks, chunk);
    float* w = MT_PTR(c, 0, float); const float* g = MT_PTR(c, 1, const float); float* buf = MT_PTR(c, 2, float);
    float lr = hyper[HYPER_LR], mu = hyper[HYPER_MOMENTUM];
    int first = t == 1;
    MT_LOOP(i, c) {
        float d = g[i];
        if (wd != 0.f) d = d + wd * w[i];
        if (mu != 0.f) {
            buf[i] = first ? d : buf[i] * mu + (1.f - damp) * d;
            d = nesterov ? d + mu * buf[i] : buf[i];
        }
        w[i] = w[i] - lr * d;
    }
    opt_end(done, step, t, 0, 0.f);
}

extern "C" __global__ void opt_adam(const u64* tab, const u64* chunks, i64 chunk, const float* hyper,
                                    u64* step, unsigned* done, float beta2, float eps, float wd, int decoupled,
                                    const float* guard) {
    if (SKIPPED(guard)) return;
    u64 tn = *step + 1;
    MtChunk c = mt_chunk(tab, chunks, chunk);
    float* w = MT_PTR(c, 0, float); const float* g = MT_PTR(c, 1, const float);
    float* m = MT_PTR(c, 2, float); float* v = MT_PTR(c, 3, float); float* vmax = MT_PTR(c, 4, float);
    double t = (double)tn, lr = (double)hyper[HYPER_LR], b1 = (double)hyper[HYPER_MOMENTUM];
    float step_size = (float)(lr / (1.0 - pow(b1, t)));
    float bc2_sqrt = (float)sqrt(1.0 - pow((double)beta2, t));
    float one_m_b1 = (float)(1.0 - b1), one_m_b2 = 1.f - beta2;
    float decay = (float)(1.0 - lr * (double)wd);
    MT_LOOP(i, c) {
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
    opt_end(done, step, tn, 0, 0.f);
}

extern "C" __global__ void opt_rmsprop(const u64* tab, const u64* chunks, i64 chunk, const float* hyper,
                                       u64* step, unsigned* done, float alpha, float eps, float wd,
                                       const float* guard) {
    if (SKIPPED(guard)) return;
    u64 t = *step + 1;
    MtChunk c = mt_chunk(tab, chunks, chunk);
    float* w = MT_PTR(c, 0, float); const float* g = MT_PTR(c, 1, const float);
    float* sq = MT_PTR(c, 2, float); float* buf = MT_PTR(c, 3, float); float* ga = MT_PTR(c, 4, float);
    float lr = hyper[HYPER_LR], mu = hyper[HYPER_MOMENTUM], one_m_a = 1.f - alpha;
    MT_LOOP(i, c) {
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
    opt_end(done, step, t, 0, 0.f);
}

extern "C" __global__ void opt_adagrad(const u64* tab, const u64* chunks, i64 chunk, const float* hyper,
                                       u64* step, unsigned* done, float lr_decay, float eps, float wd,
                                       const float* guard) {
    if (SKIPPED(guard)) return;
    u64 t = *step + 1;
    MtChunk c = mt_chunk(tab, chunks, chunk);
    float* w = MT_PTR(c, 0, float); const float* g = MT_PTR(c, 1, const float); float* sum = MT_PTR(c, 2, float);
    float clr = (float)((double)hyper[HYPER_LR] / (1.0 + ((double)t - 1.0) * (double)lr_decay));
    MT_LOOP(i, c) {
        float gi = g[i];
        if (wd != 0.f) gi = gi + wd * w[i];
        sum[i] += gi * gi;
        float std_ = sqrtf(sum[i]) + eps;
        w[i] = w[i] - clr * (gi / std_);
    }
    opt_end(done, step, t, 0, 0.f);
}

extern "C" __global__ void opt_adadelta(const u64* tab, const u64* chunks, i64 chunk, const float* hyper,
                                        u64* step, unsigned* done, float rho, float eps, float wd,
                                        const float* guard) {
    if (SKIPPED(guard)) return;
    u64 t = *step + 1;
    MtChunk c = mt_chunk(tab, chunks, chunk);
    float* w = MT_PTR(c, 0, float); const float* g = MT_PTR(c, 1, const float);
    float* sq = MT_PTR(c, 2, float); float* acc = MT_PTR(c, 3, float);
    float lr = hyper[HYPER_LR], one_m_r = 1.f - rho;
    MT_LOOP(i, c) {
        float gi = g[i];
        if (wd != 0.f) gi = gi + wd * w[i];
        sq[i] = sq[i] * rho + one_m_r * gi * gi;
        float std_ = sqrtf(sq[i] + eps);
        float delta = sqrtf(acc[i] + eps) / std_ * gi;
        acc[i] = acc[i] * rho + one_m_r * delta * delta;
        w[i] = w[i] - lr * delta;
    }
    opt_end(done, step, t, 0, 0.f);
}

extern "C" __global__ void opt_nadam(const u64* tab, const u64* chunks, i64 chunk, const float* hyper,
                                     u64* step, unsigned* done, float* scalars, float beta2, float eps, float wd,
                                     float md, const float* guard) {
    if (SKIPPED(guard)) return;
    u64 tn = *step + 1;
    float product = nadam_product(scalars, hyper, tn, md);
    MtChunk c = mt_chunk(tab, chunks, chunk);
    float* w = MT_PTR(c, 0, float); const float* g = MT_PTR(c, 1, const float);
    float* m = MT_PTR(c, 2, float); float* v = MT_PTR(c, 3, float);
    double t = (double)tn, lr = (double)hyper[HYPER_LR], b1 = (double)hyper[HYPER_MOMENTUM];
    double mu = b1 * (1.0 - 0.5 * pow(0.96, t * (double)md));
    double mu_next = b1 * (1.0 - 0.5 * pow(0.96, (t + 1.0) * (double)md));
    double mu_product = (double)product;
    float c_grad = (float)(-lr * (1.0 - mu) / (1.0 - mu_product));
    float c_avg = (float)(-lr * mu_next / (1.0 - mu_product * mu_next));
    float one_m_b1 = (float)(1.0 - b1), one_m_b2 = 1.f - beta2;
    float bc2 = (float)(1.0 - pow((double)beta2, t));
    MT_LOOP(i, c) {
        float gi = g[i];
        if (wd != 0.f) gi = gi + wd * w[i];
        m[i] = lerpf_(m[i], gi, one_m_b1);
        v[i] = v[i] * beta2 + one_m_b2 * gi * gi;
        float denom = sqrtf(v[i] / bc2) + eps;
        w[i] = w[i] + c_grad * (gi / denom);
        w[i] = w[i] + c_avg * (m[i] / denom);
    }
    opt_end(done, step, tn, scalars, product);
}

// slots[blockIdx.x] = the sum of squares of this block's chunk (records: (g, ..., len)). Each
// thread loads four values before adding any (one load in flight per warp would leave most of
// the bandwidth unused), then adds them in order.
__device__ void mt_block_sumsq(const u64* tab, const u64* chunks, i64 chunk, double* slots) {
    __shared__ double sh[256];
    MtChunk c = mt_chunk(tab, chunks, chunk);
    const float* g = MT_PTR(c, 0, const float);
    double s = 0.0;
    for (i64 i = c.start + threadIdx.x; i < c.end; i += 4 * blockDim.x) {
        float v[4];
#pragma unroll
        for (int k = 0; k < 4; k++) v[k] = i + k * blockDim.x < c.end ? g[i + k * blockDim.x] : 0.f;
#pragma unroll
        for (int k = 0; k < 4; k++) s += (double)v[k] * (double)v[k];
    }
    s = block_sum(s, sh);
    if (threadIdx.x == 0) slots[blockIdx.x] = s;
}

// The sum of count slots in a fixed order (one block of 256 threads); every thread gets it. The
// slots are read past the L1 cache (other blocks of the same launch may have written them).
__device__ double sum_slots_fixed(const double* slots, i64 count) {
    __shared__ double sh[256];
    double s = 0.0;
    for (i64 i = threadIdx.x; i < count; i += blockDim.x) s += __ldcg(&slots[i]);
    return block_sum(s, sh);
}

// *acc = sum of count slots, in a fixed order (one block); norm_out (if given) = sqrt(*acc).
extern "C" __global__ void sum_slots(const double* slots, i64 count, double* acc, float* norm_out) {
    double s = sum_slots_fixed(slots, count);
    if (threadIdx.x == 0) {
        *acc = s;
        if (norm_out) *norm_out = (float)sqrt(s);
    }
}

// Clipping's norm in one launch: every chunk's sum of squares into its slot, then the last block
// adds the slots as sum_slots does into *acc and writes the norm.
extern "C" __global__ void mt_norm(const u64* tab, const u64* chunks, i64 chunk, double* slots, unsigned* done,
                                   double* acc, float* norm_out) {
    mt_block_sumsq(tab, chunks, chunk, slots);
    if (!last_block(done)) return;
    double s = sum_slots_fixed(slots, gridDim.x);
    if (threadIdx.x == 0) {
        *acc = s;
        if (norm_out) *norm_out = (float)sqrt(s);
    }
}

// g *= min(max_norm / (sqrt(acc) + 1e-6), 1) over every chunk of the table.
extern "C" __global__ void mt_clip_scale(const u64* tab, const u64* chunks, i64 chunk, const double* acc,
                                         float max_norm) {
    MtChunk c = mt_chunk(tab, chunks, chunk);
    float* g = MT_PTR(c, 0, float);
    double norm = sqrt(*acc);
    double coef = (double)max_norm / (norm + 1e-6);
    float cf = (float)(coef < 1.0 ? coef : 1.0);
    MT_LOOP(i, c) g[i] *= cf;
}

extern "C" __global__ void mt_clip_value(const u64* tab, const u64* chunks, i64 chunk, float clip) {
    MtChunk c = mt_chunk(tab, chunks, chunk);
    float* g = MT_PTR(c, 0, float);
    MT_LOOP(i, c) g[i] = g[i] < -clip ? -clip : (g[i] > clip ? clip : g[i]);
}

// The guard update of CheckFinite for this loss and sum of squares (one thread), as the CPU
// backend's check_finite.
__device__ void guard_update(const float* stats, double sumsq, float* g, int sticky) {
    float loss = stats[STATS_LOSS];
    double norm = sqrt(sumsq);
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

// CheckFinite over no gradients (one block of 256 threads: count is 0, the norm 0).
extern "C" __global__ void check_finite(const float* stats, const double* slots, i64 count, float* g, int sticky) {
    double sumsq = sum_slots_fixed(slots, count);
    if (threadIdx.x == 0 && blockIdx.x == 0) guard_update(stats, sumsq, g, sticky);
}

// CheckFinite in one launch: every chunk's sum of squares into its slot, then the last block
// adds the slots in a fixed order and updates the guard.
extern "C" __global__ void mt_check_finite(const u64* tab, const u64* chunks, i64 chunk, double* slots,
                                           unsigned* done, const float* stats, float* g, int sticky) {
    mt_block_sumsq(tab, chunks, chunk, slots);
    if (!last_block(done)) return;
    double sumsq = sum_slots_fixed(slots, gridDim.x);
    if (threadIdx.x == 0) guard_update(stats, sumsq, g, sticky);
}
"#
    ),
};

impl RunOp<ops::OptimizerStep> for CudaBackend {
    /// One multi-tensor launch over every parameter, whose last block advances the step counter
    /// (with no parameters, `opt_begin` advances it alone).
    fn run_op(&mut self, o: &ops::OptimizerStep) -> Result<()> {
        let ops::OptimizerStep { rule, hyper, step, scalars, .. } = *o;
        let step_ptr = self.mem.counter_ptr(step.0)?;
        let (h, sc) = (self.ptr(hyper), self.ptr(scalars));
        let guard = o.guard.map(|g| self.ptr(g)).unwrap_or(0);
        let md = match rule {
            OptRule::NAdam { momentum_decay, .. } => momentum_decay,
            _ => -1.0,
        };
        // Records: the parameter, its gradient and its state tensors (as many as the rule keeps,
        // at most three: checked by the op).
        let addrs: Vec<Vec<u64>> =
            o.params.iter().map(|p| [p.value, p.grad].iter().chain(&p.state).map(|&b| self.ptr(b)).collect()).collect();
        let tensors: Vec<(&[u64], usize)> = addrs.iter().zip(&o.params).map(|(a, p)| (&a[..], p.len)).collect();
        let t = self.mt_table(&tensors)?;
        let (tab, chunks, chunk) = (t.tab, t.chunks, MT_CHUNK);
        if t.count == 0 {
            return self.launch_blocks(1, 32, 0, &opt_begin { step: step_ptr, scalars: sc, hyper: h, md, guard });
        }
        let grid = t.count as u32;
        let done = self.done;
        match rule {
            OptRule::Sgd { dampening, nesterov, weight_decay } => {
                let k = opt_sgd {
                    tab,
                    chunks,
                    chunk,
                    hyper: h,
                    step: step_ptr,
                    done,
                    damp: dampening,
                    nesterov: nesterov as i32,
                    wd: weight_decay,
                    guard,
                };
                self.launch_blocks(grid, MT_THREADS, 0, &k)
            }
            OptRule::Adam { beta2, eps, weight_decay, decoupled, .. } => {
                let k = opt_adam {
                    tab,
                    chunks,
                    chunk,
                    hyper: h,
                    step: step_ptr,
                    done,
                    beta2,
                    eps,
                    wd: weight_decay,
                    decoupled: decoupled as i32,
                    guard,
                };
                self.launch_blocks(grid, MT_THREADS, 0, &k)
            }
            OptRule::RmsProp { alpha, eps, weight_decay, .. } => {
                let k = opt_rmsprop {
                    tab,
                    chunks,
                    chunk,
                    hyper: h,
                    step: step_ptr,
                    done,
                    alpha,
                    eps,
                    wd: weight_decay,
                    guard,
                };
                self.launch_blocks(grid, MT_THREADS, 0, &k)
            }
            OptRule::Adagrad { lr_decay, eps, weight_decay } => {
                let k = opt_adagrad {
                    tab,
                    chunks,
                    chunk,
                    hyper: h,
                    step: step_ptr,
                    done,
                    lr_decay,
                    eps,
                    wd: weight_decay,
                    guard,
                };
                self.launch_blocks(grid, MT_THREADS, 0, &k)
            }
            OptRule::Adadelta { rho, eps, weight_decay } => {
                let k = opt_adadelta {
                    tab,
                    chunks,
                    chunk,
                    hyper: h,
                    step: step_ptr,
                    done,
                    rho,
                    eps,
                    wd: weight_decay,
                    guard,
                };
                self.launch_blocks(grid, MT_THREADS, 0, &k)
            }
            OptRule::NAdam { beta2, eps, weight_decay, momentum_decay } => {
                let k = opt_nadam {
                    tab,
                    chunks,
                    chunk,
                    hyper: h,
                    step: step_ptr,
                    done,
                    scalars: sc,
                    beta2,
                    eps,
                    wd: weight_decay,
                    md: momentum_decay,
                    guard,
                };
                self.launch_blocks(grid, MT_THREADS, 0, &k)
            }
        }
    }
}

impl RunOp<ops::CheckFinite> for CudaBackend {
    /// [`ops::CheckFinite`] in one multi-tensor launch: each chunk's f64 sum of squares into
    /// its own slot, then the launch's last block adds the slots in a fixed order and updates
    /// the guard; nothing is read back.
    fn run_op(&mut self, o: &ops::CheckFinite) -> Result<()> {
        let ops::CheckFinite { ref grads, stats, guard, sticky } = *o;
        let t = self.mt_grads(grads)?;
        let slots = self.op_scratch(8 * t.count.max(1))?;
        let (stats, g, sticky) = (self.ptr(stats), self.ptr(guard), sticky as i32);
        if t.count == 0 {
            return self.launch_blocks(1, MT_THREADS, 0, &check_finite { stats, slots, count: 0, g, sticky });
        }
        let args =
            mt_check_finite { tab: t.tab, chunks: t.chunks, chunk: MT_CHUNK, slots, done: self.done, stats, g, sticky };
        self.launch_blocks(t.count as u32, MT_THREADS, 0, &args)
    }
}

impl RunOp<ops::ClipGradNorm> for CudaBackend {
    /// The global norm as for [`ops::CheckFinite`] in one launch (its last block writes the
    /// total and the norm), then one multi-tensor launch scales every gradient.
    fn run_op(&mut self, o: &ops::ClipGradNorm) -> Result<()> {
        let ops::ClipGradNorm { ref grads, max_norm, norm } = *o;
        let t = self.mt_grads(grads)?;
        // Scratch: the total (8 bytes), then one slot per chunk.
        let acc = self.op_scratch(8 * (1 + t.count))?;
        let (slots, norm_out) = (acc + 8, self.ptr(norm));
        if t.count == 0 {
            return self.launch_blocks(1, MT_THREADS, 0, &sum_slots { slots, count: 0, acc, norm_out });
        }
        let total = mt_norm { tab: t.tab, chunks: t.chunks, chunk: MT_CHUNK, slots, done: self.done, acc, norm_out };
        self.launch_blocks(t.count as u32, MT_THREADS, 0, &total)?;
        let scale = mt_clip_scale { tab: t.tab, chunks: t.chunks, chunk: MT_CHUNK, acc, max_norm };
        self.launch_blocks(t.count as u32, MT_THREADS, 0, &scale)
    }
}

impl RunOp<ops::ClipGradValue> for CudaBackend {
    fn run_op(&mut self, o: &ops::ClipGradValue) -> Result<()> {
        let ops::ClipGradValue { ref grads, clip } = *o;
        let t = self.mt_grads(grads)?;
        let args = mt_clip_value { tab: t.tab, chunks: t.chunks, chunk: MT_CHUNK, clip };
        self.launch_blocks(t.count as u32, MT_THREADS, 0, &args)
    }
}
