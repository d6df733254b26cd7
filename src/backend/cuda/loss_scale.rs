//! Dynamic loss scaling on the GPU ([`ops::ScaleLoss`], [`ops::UnscaleGrads`]), the CPU's
//! formulas (`backend/cpu/loss_scale.rs`, PyTorch's `GradScaler`) operation for operation. The
//! scale is read from its device buffer by every kernel and the found-inf flag is written
//! there, so a replayed CUDA graph scales, skips and adapts the scale with nothing read back.
//! Every gradient is unscaled by one multi-tensor launch (`multi_tensor.rs`); several threads
//! may set the flag in one step, and they all write 1.

use super::CudaBackend;
use super::multi_tensor::MT_CHUNK;
use super::nvrtc::ModuleSrc;
use crate::Result;
use crate::backend::ops::{self, RunOp};

kernels! {
    scale_loss(g: (float*), n: i64, s: (const float*));
    mt_unscale_grads(tab: (const u64*), chunks: (const u64*), chunk: i64, s: (float*));
    scaler_update(s: (float*), guard: (float*), growth: float, backoff: float, interval: i64, merge: int);
}

pub(super) const MODULE: ModuleSrc = ModuleSrc {
    name: "loss_scale",
    kernels: KERNELS,
    prototypes,
    source: concat!(
        mt_prelude!(),
        r#"
// g *= scale.
extern "C" __global__ void scale_loss(float* g, i64 n, const float* s) {
    float k = s[SCALER_SCALE];
    GRID_LOOP(i, n) g[i] = g[i] * k;
}

// Every gradient of the table (address 0 of each record) *= 1 / scale (the reciprocal in f64,
// as PyTorch); inf or NaN in one sets the found flag.
extern "C" __global__ void mt_unscale_grads(const u64* tab, const u64* chunks, i64 chunk, float* s) {
    MtChunk c = mt_chunk(tab, chunks, chunk);
    float* g = MT_PTR(c, 0, float);
    float inv = (float)(1.0 / (double)s[SCALER_SCALE]);
    int found = 0;
    MT_LOOP(i, c) {
        float v = g[i];
        found |= !isfinite(v);
        g[i] = v * inv;
    }
    if (found) s[SCALER_FOUND_INF] = 1.f;
}

// One thread: PyTorch's _amp_update_scale_, the skipped count, the guard's skip flag.
extern "C" __global__ void scaler_update(float* s, float* guard, float growth, float backoff, i64 interval, int merge) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    int found = s[SCALER_FOUND_INF] != 0.f;
    if (found) {
        s[SCALER_SCALE] = s[SCALER_SCALE] * backoff;
        s[SCALER_GOOD_STEPS] = 0.f;
        s[SCALER_SKIPPED] = s[SCALER_SKIPPED] + 1.f;
    } else {
        float good = s[SCALER_GOOD_STEPS] + 1.f;
        if ((double)good >= (double)interval) {
            float grown = s[SCALER_SCALE] * growth;
            if (isfinite(grown)) s[SCALER_SCALE] = grown;
            s[SCALER_GOOD_STEPS] = 0.f;
        } else {
            s[SCALER_GOOD_STEPS] = good;
        }
    }
    s[SCALER_FOUND_INF] = 0.f;
    int keep = merge && guard[GUARD_SKIP] != 0.f;
    guard[GUARD_SKIP] = (found || keep) ? 1.f : 0.f;
}
"#
    ),
};

impl RunOp<ops::ScaleLoss> for CudaBackend {
    fn run_op(&mut self, o: &ops::ScaleLoss) -> Result<()> {
        self.launch_elems(o.len, &scale_loss { g: self.ptr(o.buf), n: o.len, s: self.ptr(o.scale) })
    }
}

impl RunOp<ops::UnscaleGrads> for CudaBackend {
    /// One multi-tensor launch over every gradient, then one thread updates the scale and
    /// the guard.
    fn run_op(&mut self, o: &ops::UnscaleGrads) -> Result<()> {
        let s = self.ptr(o.scale);
        let t = self.mt_grads(&o.grads)?;
        let args = mt_unscale_grads { tab: t.tab, chunks: t.chunks, chunk: MT_CHUNK, s };
        self.launch_blocks(t.count as u32, 256, 0, &args)?;
        let args = scaler_update {
            s,
            guard: self.ptr(o.guard),
            growth: o.growth_factor,
            backoff: o.backoff_factor,
            interval: o.growth_interval as usize,
            merge: o.merge_skip as i32,
        };
        self.launch_blocks(1, 32, 0, &args)
    }
}
