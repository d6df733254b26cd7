//! Max and average pooling on the GPU, forward and backward, as `backend/cpu/pool2d.rs`
//! (PyTorch's windows, `count_include_pad`, NaN propagation; global average pooling is an
//! average pool whose window is the whole plane).
//!
//! Forward: one thread per output. Backward gathers instead of scattering: one thread per
//! input value walks the outputs whose window covers it, in increasing output order. No two
//! threads write one value, so no atomics, and the sums are added in the CPU's order, so the
//! results match the CPU bit for bit.

use super::CudaBackend;
use super::nvrtc::ModuleSrc;
use crate::Result;
use crate::backend::ops;
use crate::backend::ops::RunOp;

kernels! {
    max_pool_forward(x: (const float*), y: (float*), argmax: (float*), planes: i64, h: i64, w: i64, kh: i64, kw: i64, sh: i64, sw: i64, ph: i64, pw: i64, oh: i64, ow: i64);
    max_pool_backward(argmax: (const float*), dy: (const float*), dx: (float*), planes: i64, h: i64, w: i64, kh: i64, kw: i64, sh: i64, sw: i64, ph: i64, pw: i64, oh: i64, ow: i64, acc: int);
    avg_pool_forward(x: (const float*), y: (float*), planes: i64, h: i64, w: i64, kh: i64, kw: i64, sh: i64, sw: i64, ph: i64, pw: i64, oh: i64, ow: i64, cip: int);
    avg_pool_backward(dy: (const float*), dx: (float*), planes: i64, h: i64, w: i64, kh: i64, kw: i64, sh: i64, sw: i64, ph: i64, pw: i64, oh: i64, ow: i64, cip: int, acc: int);
}

pub(super) const MODULE: ModuleSrc = ModuleSrc {
    name: "pool2d",
    kernels: KERNELS,
    prototypes,
    source: r#"
// The geometry, in the order PoolGeom lists it (n and c folded into the plane count).
#define POOL_ARGS i64 planes, i64 h, i64 w, i64 kh, i64 kw, i64 sh, i64 sw, i64 ph, i64 pw, i64 oh, i64 ow

// Clipped window of output (oy, ox) and the divisor of an average pool.
__device__ __forceinline__ void window_(i64 oy, i64 ox, i64 h, i64 w, i64 kh, i64 kw, i64 sh, i64 sw, i64 ph, i64 pw,
                                        int cip, i64* h0, i64* h1, i64* w0, i64* w1, i64* div) {
    i64 hs = oy * sh - ph, ws = ox * sw - pw;
    i64 he = min(hs + kh, h + ph), we = min(ws + kw, w + pw);
    i64 padded = (he - hs) * (we - ws);
    *h0 = max(hs, (i64)0); *w0 = max(ws, (i64)0);
    *h1 = min(he, h); *w1 = min(we, w);
    *div = cip ? padded : (*h1 - *h0) * (*w1 - *w0);
}

// Outputs along one axis whose window covers input index i: [lo, hi] (empty when lo > hi).
__device__ __forceinline__ void covering_(i64 i, i64 k, i64 s, i64 p, i64 out, i64* lo, i64* hi) {
    i64 a = i + p - k;
    *lo = a < 0 ? 0 : a / s + 1;
    *hi = min((i + p) / s, out - 1);
}

extern "C" __global__ void max_pool_forward(const float* x, float* y, float* argmax, POOL_ARGS) {
    GRID_LOOP(o, planes * oh * ow) {
        i64 p = o / (oh * ow), oy = (o / ow) % oh, ox = o % ow;
        i64 h0, h1, w0, w1, div;
        window_(oy, ox, h, w, kh, kw, sh, sw, ph, pw, 1, &h0, &h1, &w0, &w1, &div);
        const float* xp = x + p * h * w;
        float best = -INFINITY;
        i64 at = h0 * w + w0;
        bool done = false;
        for (i64 iy = h0; iy < h1 && !done; iy++) {
            for (i64 ix = w0; ix < w1; ix++) {
                float v = xp[iy * w + ix];
                if (v > best || isnan(v)) {
                    best = v;
                    at = iy * w + ix;
                    if (isnan(v)) { done = true; break; }
                }
            }
        }
        y[o] = best;
        argmax[o] = (float)at;
    }
}

extern "C" __global__ void max_pool_backward(const float* argmax, const float* dy, float* dx, POOL_ARGS, int acc) {
    GRID_LOOP(i, planes * h * w) {
        i64 p = i / (h * w), iy = (i / w) % h, ix = i % w;
        i64 at = iy * w + ix;
        i64 ylo, yhi, xlo, xhi;
        covering_(iy, kh, sh, ph, oh, &ylo, &yhi);
        covering_(ix, kw, sw, pw, ow, &xlo, &xhi);
        float s = acc ? dx[i] : 0.f;
        for (i64 oy = ylo; oy <= yhi; oy++)
            for (i64 ox = xlo; ox <= xhi; ox++) {
                i64 o = (p * oh + oy) * ow + ox;
                if ((i64)argmax[o] == at) s += dy[o];
            }
        dx[i] = s;
    }
}

extern "C" __global__ void avg_pool_forward(const float* x, float* y, POOL_ARGS, int cip) {
    GRID_LOOP(o, planes * oh * ow) {
        i64 p = o / (oh * ow), oy = (o / ow) % oh, ox = o % ow;
        i64 h0, h1, w0, w1, div;
        window_(oy, ox, h, w, kh, kw, sh, sw, ph, pw, cip, &h0, &h1, &w0, &w1, &div);
        const float* xp = x + p * h * w;
        float s = 0.f;
        for (i64 iy = h0; iy < h1; iy++)
            for (i64 ix = w0; ix < w1; ix++) s += xp[iy * w + ix];
        y[o] = s / (float)div;
    }
}

extern "C" __global__ void avg_pool_backward(const float* dy, float* dx, POOL_ARGS, int cip, int acc) {
    GRID_LOOP(i, planes * h * w) {
        i64 p = i / (h * w), iy = (i / w) % h, ix = i % w;
        i64 ylo, yhi, xlo, xhi;
        covering_(iy, kh, sh, ph, oh, &ylo, &yhi);
        covering_(ix, kw, sw, pw, ow, &xlo, &xhi);
        float s = acc ? dx[i] : 0.f;
        for (i64 oy = ylo; oy <= yhi; oy++)
            for (i64 ox = xlo; ox <= xhi; ox++) {
                i64 h0, h1, w0, w1, div;
                window_(oy, ox, h, w, kh, kw, sh, sw, ph, pw, cip, &h0, &h1, &w0, &w1, &div);
                s += dy[(p * oh + oy) * ow + ox] / (float)div;
            }
        dx[i] = s;
    }
}
"#,
};

/// A pooling kernel's launcher: the given arguments plus the geometry every pooling kernel takes
/// (`POOL_ARGS`).
macro_rules! pool {
    ($k:ident, $g:expr, { $($f:ident: $v:expr),* $(,)? }) => {
        $k {
            $($f: $v,)*
            planes: $g.n * $g.c,
            h: $g.h,
            w: $g.w,
            kh: $g.kh,
            kw: $g.kw,
            sh: $g.sh,
            sw: $g.sw,
            ph: $g.ph,
            pw: $g.pw,
            oh: $g.oh,
            ow: $g.ow,
        }
    };
}

impl RunOp<ops::MaxPool> for CudaBackend {
    fn run_op(&mut self, o: &ops::MaxPool) -> Result<()> {
        let ops::MaxPool { x, y, argmax, .. } = *o;
        let g = &o.g;
        let args = pool!(max_pool_forward, g, { x: self.ptr(x), y: self.ptr(y), argmax: self.ptr(argmax) });
        self.launch_elems(g.output_len(), &args)
    }
}

impl RunOp<ops::MaxPoolBackward> for CudaBackend {
    fn run_op(&mut self, o: &ops::MaxPoolBackward) -> Result<()> {
        let ops::MaxPoolBackward { argmax, dy, dx, .. } = *o;
        let g = &o.g;
        let args = pool!(max_pool_backward, g, {
            argmax: self.ptr(argmax),
            dy: self.ptr(dy),
            dx: self.ptr(dx.buf),
            acc: dx.accumulate as i32,
        });
        self.launch_elems(g.input_len(), &args)
    }
}

impl RunOp<ops::AvgPool> for CudaBackend {
    fn run_op(&mut self, o: &ops::AvgPool) -> Result<()> {
        let ops::AvgPool { count_include_pad, x, y, .. } = *o;
        let g = &o.g;
        let args = pool!(avg_pool_forward, g, { x: self.ptr(x), y: self.ptr(y), cip: count_include_pad as i32 });
        self.launch_elems(g.output_len(), &args)
    }
}

impl RunOp<ops::AvgPoolBackward> for CudaBackend {
    fn run_op(&mut self, o: &ops::AvgPoolBackward) -> Result<()> {
        let ops::AvgPoolBackward { count_include_pad, dy, dx, .. } = *o;
        let g = &o.g;
        let args = pool!(avg_pool_backward, g, {
            dy: self.ptr(dy),
            dx: self.ptr(dx.buf),
            cip: count_include_pad as i32,
            acc: dx.accumulate as i32,
        });
        self.launch_elems(g.input_len(), &args)
    }
}
