//! Element-wise activations on the GPU, forward and backward: one NVRTC kernel each, with the
//! function chosen by a code (uniform across the launch, so the switch costs nothing). The
//! formulas are the CPU backend's (`backend/cpu/activation.rs`), written the same way so the
//! two agree to a few ulps. Each operand may be f32, bf16 or f16 (mixed precision keeps
//! activations and their gradients in half): values are computed in f32 and rounded once when
//! stored.

use super::CudaBackend;
use super::nvrtc::ModuleSrc;
use crate::Result;
use crate::backend::ops;
use crate::backend::ops::ActFn;
use crate::backend::ops::RunOp;

kernels! {
    act_forward(f: int, p: float, x: (const void*), y: (void*), n: i64, xk: int, yk: int);
    act_backward(f: int, p: float, x: (const void*), y: (const void*), dy: (const void*), dx: (void*), n: i64, acc: int, xk: int, yk: int, dyk: int, dxk: int);
}

pub(super) const MODULE: ModuleSrc = ModuleSrc {
    name: "activation",
    kernels: KERNELS,
    prototypes,
    source: concat!(
        half_prelude!(),
        r#"
__device__ __forceinline__ float sigmoid_(float x) {
    if (x >= 0.f) return 1.f / (1.f + expf(-x));
    float e = expf(x);
    return e / (1.f + e);
}

// f: 0 relu, 1 leaky relu (p = slope), 2 elu (p = alpha), 3 sigmoid, 4 tanh, 5 silu, 6 gelu (erf).
// NaN stays NaN (relu tests x <= 0, not x > 0), and the piecewise backwards take PyTorch's branch
// for NaN, as the CPU backend does.
__device__ __forceinline__ float act_(int f, float p, float x) {
    switch (f) {
    case 0: return x <= 0.f ? 0.f : x;
    case 1: return x > 0.f ? x : x * p;
    case 2: return x > 0.f ? x : p * (expf(x) - 1.f);
    case 3: return sigmoid_(x);
    case 4: return tanhf(x);
    case 5: return x * sigmoid_(x);
    default: return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
    }
}

// f'(x), given the forward input x and output y.
__device__ __forceinline__ float dact_(int f, float p, float x, float y) {
    switch (f) {
    case 0: return x <= 0.f ? 0.f : 1.f;
    case 1: return x > 0.f ? 1.f : p;
    case 2: return x <= 0.f ? y + p : 1.f;
    case 3: return y * (1.f - y);
    case 4: return 1.f - y * y;
    case 5: { float s = sigmoid_(x); return s * (1.f + x * (1.f - s)); }
    default: {
        float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
        float pdf = 0.398942280401432678f * expf(-0.5f * x * x);
        return cdf + x * pdf;
    }
    }
}

// Operand kinds (xk, yk, ...): 0 f32, 1 bf16, 2 f16 (half_prelude). Each thread loads ILP
// values (a grid stride apart) before computing any, so that a warp has ILP loads in flight (as
// batch_norm.rs's element-wise kernels; the arithmetic per value is the same).
#define ILP 4
extern "C" __global__ void act_forward(int f, float p, const void* x, void* y, i64 n, int xk, int yk) {
    i64 i0 = (i64)blockIdx.x * blockDim.x + threadIdx.x, stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = i0; i < n; i += ILP * stride) {
        float v[ILP];
#pragma unroll
        for (int k = 0; k < ILP; k++) v[k] = i + k * stride < n ? load_any(x, i + k * stride, xk) : 0.f;
#pragma unroll
        for (int k = 0; k < ILP; k++)
            if (i + k * stride < n) put_any(y, i + k * stride, act_(f, p, v[k]), yk, 0);
    }
}

extern "C" __global__ void act_backward(int f, float p, const void* x, const void* y, const void* dy,
                                        void* dx, i64 n, int acc, int xk, int yk, int dyk, int dxk) {
    // Read only what f' needs: x (ReLU, leaky ReLU, ELU, SiLU, GELU), y (ELU, sigmoid, tanh).
    int need_x = f != 3 && f != 4, need_y = f >= 2 && f <= 4;
    i64 i0 = (i64)blockIdx.x * blockDim.x + threadIdx.x, stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = i0; i < n; i += ILP * stride) {
        float xv[ILP], yv[ILP], dv[ILP];
#pragma unroll
        for (int k = 0; k < ILP; k++) {
            i64 at = i + k * stride;
            int ok = at < n;
            xv[k] = ok && need_x ? load_any(x, at, xk) : 0.f;
            yv[k] = ok && need_y ? load_any(y, at, yk) : 0.f;
            dv[k] = ok ? load_any(dy, at, dyk) : 0.f;
        }
#pragma unroll
        for (int k = 0; k < ILP; k++)
            if (i + k * stride < n) put_any(dx, i + k * stride, dact_(f, p, xv[k], yv[k]) * dv[k], dxk, acc);
    }
}
"#
    ),
};

/// The kernel's code and parameter for an activation.
fn code(f: ActFn) -> (i32, f32) {
    match f {
        ActFn::Relu => (0, 0.0),
        ActFn::LeakyRelu(s) => (1, s),
        ActFn::Elu(a) => (2, a),
        ActFn::Sigmoid => (3, 0.0),
        ActFn::Tanh => (4, 0.0),
        ActFn::Silu => (5, 0.0),
        ActFn::Gelu => (6, 0.0),
    }
}

impl RunOp<ops::Act> for CudaBackend {
    fn run_op(&mut self, o: &ops::Act) -> Result<()> {
        let ops::Act { f, len, x, y, .. } = *o;
        let (c, p) = code(f);
        let (xk, yk) = (self.kind_of(x, "activation input")?, self.kind_of(y, "activation output")?);
        let args = act_forward { f: c, p, x: self.ptr(x), y: self.ptr(y), n: len, xk, yk };
        self.launch_elems(len, &args)
    }
}

impl RunOp<ops::ActBackward> for CudaBackend {
    fn run_op(&mut self, o: &ops::ActBackward) -> Result<()> {
        let ops::ActBackward { f, len, x, y, dy, dx, .. } = *o;
        let (c, p) = code(f);
        let args = act_backward {
            f: c,
            p,
            x: self.ptr(x),
            y: self.ptr(y),
            dy: self.ptr(dy),
            dx: self.ptr(dx.buf),
            n: len,
            acc: dx.accumulate as i32,
            xk: self.kind_of(x, "activation input")?,
            yk: self.kind_of(y, "activation output")?,
            dyk: self.kind_of(dy, "activation output gradient")?,
            dxk: self.kind_of(dx.buf, "activation input gradient")?,
        };
        self.launch_elems(len, &args)
    }
}
