//! Softmax over the middle axis of an `[outer, dim, inner]` view on the GPU, forward and
//! backward, as the CPU backend defines it (`backend/cpu/softmax.rs`): max-subtracted, a NaN
//! anywhere along the axis propagates.
//!
//! Two shapes of launch: rows (`inner == 1`, a dense layer's classes) take one warp per row and
//! reduce with shuffles; everything else takes one thread per `(outer, inner)` column looping
//! over `dim` (a channel softmax over images, where neighbouring threads read neighbouring
//! values). Both reduce in a fixed order, so results are the same run to run.

use super::CudaBackend;
use super::nvrtc::ModuleSrc;
use crate::Result;
use crate::backend::ops;
use crate::backend::ops::RunOp;

kernels! {
    softmax_cols(x: (const float*), y: (float*), outer: i64, dim: i64, inner: i64);
    softmax_rows(x: (const float*), y: (float*), rows: i64, dim: i64);
    softmax_backward_cols(y: (const float*), dy: (const float*), dx: (float*), outer: i64, dim: i64, inner: i64, acc: int);
    softmax_backward_rows(y: (const float*), dy: (const float*), dx: (float*), rows: i64, dim: i64, acc: int);
}

pub(super) const MODULE: ModuleSrc = ModuleSrc {
    name: "softmax",
    kernels: KERNELS,
    prototypes,
    source: r#"
__device__ __forceinline__ float max_nan(float m, float v) { return (v > m || isnan(v)) ? v : m; }

extern "C" __global__ void softmax_cols(const float* x, float* y, i64 outer, i64 dim, i64 inner) {
    GRID_LOOP(t, outer * inner) {
        i64 base = (t / inner) * dim * inner + t % inner;
        float m = -INFINITY;
        for (i64 d = 0; d < dim; d++) m = max_nan(m, x[base + d * inner]);
        float s = 0.f;
        for (i64 d = 0; d < dim; d++) { float e = expf(x[base + d * inner] - m); y[base + d * inner] = e; s += e; }
        float inv = 1.f / s;
        for (i64 d = 0; d < dim; d++) y[base + d * inner] *= inv;
    }
}

__device__ __forceinline__ float warp_max_nan(float v) {
    for (int o = 16; o > 0; o >>= 1) v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// One warp per row of `dim` values; blockDim.x is a multiple of 32.
extern "C" __global__ void softmax_rows(const float* x, float* y, i64 rows, i64 dim) {
    i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    i64 warps = (i64)gridDim.x * blockDim.x / 32;
    for (i64 r = warp; r < rows; r += warps) {
        const float* xr = x + r * dim;
        float* yr = y + r * dim;
        float m = -INFINITY;
        for (i64 d = lane; d < dim; d += 32) m = max_nan(m, xr[d]);
        m = warp_max_nan(m);
        float s = 0.f;
        for (i64 d = lane; d < dim; d += 32) { float e = expf(xr[d] - m); yr[d] = e; s += e; }
        float inv = 1.f / warp_sum(s);
        for (i64 d = lane; d < dim; d += 32) yr[d] *= inv;
    }
}

// dx = y * (dy - sum(dy * y)) along the axis.
extern "C" __global__ void softmax_backward_cols(const float* y, const float* dy, float* dx, i64 outer, i64 dim,
                                                 i64 inner, int acc) {
    GRID_LOOP(t, outer * inner) {
        i64 base = (t / inner) * dim * inner + t % inner;
        float dot = 0.f;
        for (i64 d = 0; d < dim; d++) dot += dy[base + d * inner] * y[base + d * inner];
        for (i64 d = 0; d < dim; d++) {
            i64 j = base + d * inner;
            store(&dx[j], y[j] * (dy[j] - dot), acc);
        }
    }
}

extern "C" __global__ void softmax_backward_rows(const float* y, const float* dy, float* dx, i64 rows, i64 dim,
                                                 int acc) {
    i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    i64 warps = (i64)gridDim.x * blockDim.x / 32;
    for (i64 r = warp; r < rows; r += warps) {
        i64 o = r * dim;
        float dot = 0.f;
        for (i64 d = lane; d < dim; d += 32) dot += dy[o + d] * y[o + d];
        dot = warp_sum(dot);
        for (i64 d = lane; d < dim; d += 32) store(&dx[o + d], y[o + d] * (dy[o + d] - dot), acc);
    }
}
"#,
};

impl RunOp<ops::Softmax> for CudaBackend {
    fn run_op(&mut self, o: &ops::Softmax) -> Result<()> {
        let ops::Softmax { outer, dim, inner, x, y, .. } = *o;
        if inner == 1 {
            let args = softmax_rows { x: self.ptr(x), y: self.ptr(y), rows: outer, dim };
            self.launch_elems(outer * 32, &args)
        } else {
            let args = softmax_cols { x: self.ptr(x), y: self.ptr(y), outer, dim, inner };
            self.launch_elems(outer * inner, &args)
        }
    }
}

impl RunOp<ops::SoftmaxBackward> for CudaBackend {
    fn run_op(&mut self, o: &ops::SoftmaxBackward) -> Result<()> {
        let ops::SoftmaxBackward { outer, dim, inner, y, dy, dx, .. } = *o;
        let acc = dx.accumulate as i32;
        let (y, dy, dx) = (self.ptr(y), self.ptr(dy), self.ptr(dx.buf));
        if inner == 1 {
            self.launch_elems(outer * 32, &softmax_backward_rows { y, dy, dx, rows: outer, dim, acc })
        } else {
            self.launch_elems(outer * inner, &softmax_backward_cols { y, dy, dx, outer, dim, inner, acc })
        }
    }
}
