//! Max and average pooling on wgpu (`backend/cpu/pool2d.rs`'s windows and tie rules). The
//! backward passes gather: each input value sums the gradients of the outputs whose windows
//! hold it, in increasing output order as the CPU adds them, so no atomics are needed.

use super::record::{Bind, Kernel, Recorder, grid, u};
use crate::Result;
use crate::backend::ops::{self, PoolGeom};

/// `P` from index 1: h, w, kh, kw, sh, sw, ph, pw, oh, ow, count_include_pad; `window` gives the
/// clipped window of an output as (h0, h1, w0, w1) and its divisor.
const WINDOW: &str = "
struct Win { h0: u32, h1: u32, w0: u32, w1: u32, div: f32 }
fn window(oy: u32, ox: u32) -> Win {
    let hs = i32(oy * P[5]) - i32(P[7]);
    let ws = i32(ox * P[6]) - i32(P[8]);
    let he = min(hs + i32(P[3]), i32(P[1] + P[7]));
    let we = min(ws + i32(P[4]), i32(P[2] + P[8]));
    let padded = (he - hs) * (we - ws);
    let h0 = u32(max(hs, 0)); let w0 = u32(max(ws, 0));
    let h1 = u32(min(he, i32(P[1]))); let w1 = u32(min(we, i32(P[2])));
    var div = f32(padded);
    if (P[11] == 0u) { div = f32((h1 - h0) * (w1 - w0)); }
    return Win(h0, h1, w0, w1, div);
}
// The outputs whose windows may hold input row iy (or column, with the other strides): first and
// one past the last.
fn out_range(iy: u32, k: u32, s: u32, p: u32, o: u32) -> vec2<u32> {
    let top = i32(iy + p);
    let lo = max(top - i32(k) + 1, 0);
    let first = u32((lo + i32(s) - 1) / i32(s));
    let last = min(u32(top) / s + 1u, o);
    return vec2<u32>(first, last);
}
";

const BINDINGS_FWD: &str = "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;
";

static MAX_POOL: Kernel = Kernel {
    name: "max_pool",
    parts: &[
        WINDOW,
        BINDINGS_FWD,
        concat!(
            "@group(0) @binding(3) var<storage, read_write> ARGMAX: array<f32>;
",
            main1d!(),
            "    if (i >= P[0]) { return; }
    let ohw = P[9] * P[10];
    let plane = i / ohw; let o = i % ohw;
    let win = window(o / P[10], o % P[10]);
    let base = plane * P[1] * P[2];
    var best = bitcast<f32>(0xff800000u);
    var at = win.h0 * P[2] + win.w0;
    var done = false;
    for (var iy = win.h0; iy < win.h1 && !done; iy++) {
        for (var ix = win.w0; ix < win.w1; ix++) {
            let v = X[base + iy * P[2] + ix];
            if (v > best || is_nan(v)) {
                best = v;
                at = iy * P[2] + ix;
                if (is_nan(v)) { done = true; break; }
            }
        }
    }
    Y[i] = best;
    ARGMAX[i] = f32(at);
}"
        ),
    ],
};

static MAX_POOL_BACKWARD: Kernel = Kernel {
    name: "max_pool_backward",
    parts: &[
        WINDOW,
        concat!(
            "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> ARGMAX: array<f32>;
@group(0) @binding(2) var<storage, read> DY: array<f32>;
@group(0) @binding(3) var<storage, read_write> DX: array<f32>;
",
            main1d!(),
            "    // One thread per input value; P[0] = inputs, P[12] = accumulate.
    if (i >= P[0]) { return; }
    let hw = P[1] * P[2];
    let plane = i / hw; let q = i % hw;
    let ry = out_range(q / P[2], P[3], P[5], P[7], P[9]);
    let rx = out_range(q % P[2], P[4], P[6], P[8], P[10]);
    var s = 0.0;
    if (P[12] != 0u) { s = DX[i]; }
    let base = plane * P[9] * P[10];
    for (var oy = ry.x; oy < ry.y; oy++) {
        for (var ox = rx.x; ox < rx.y; ox++) {
            let o = base + oy * P[10] + ox;
            if (u32(ARGMAX[o]) == q) { s = s + DY[o]; }
        }
    }
    DX[i] = s;
}"
        ),
    ],
};

static AVG_POOL: Kernel = Kernel {
    name: "avg_pool",
    parts: &[
        WINDOW,
        BINDINGS_FWD,
        concat!(
            main1d!(),
            "    if (i >= P[0]) { return; }
    let ohw = P[9] * P[10];
    let plane = i / ohw; let o = i % ohw;
    let win = window(o / P[10], o % P[10]);
    let base = plane * P[1] * P[2];
    var s = 0.0;
    for (var iy = win.h0; iy < win.h1; iy++) {
        for (var ix = win.w0; ix < win.w1; ix++) {
            s = s + X[base + iy * P[2] + ix];
        }
    }
    Y[i] = s / win.div;
}"
        ),
    ],
};

static AVG_POOL_BACKWARD: Kernel = Kernel {
    name: "avg_pool_backward",
    parts: &[
        WINDOW,
        concat!(
            "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> DY: array<f32>;
@group(0) @binding(2) var<storage, read_write> DX: array<f32>;
",
            main1d!(),
            "    if (i >= P[0]) { return; }
    let hw = P[1] * P[2];
    let plane = i / hw; let q = i % hw;
    let iy = q / P[2]; let ix = q % P[2];
    let ry = out_range(iy, P[3], P[5], P[7], P[9]);
    let rx = out_range(ix, P[4], P[6], P[8], P[10]);
    var s = 0.0;
    if (P[12] != 0u) { s = DX[i]; }
    let base = plane * P[9] * P[10];
    for (var oy = ry.x; oy < ry.y; oy++) {
        for (var ox = rx.x; ox < rx.y; ox++) {
            let win = window(oy, ox);
            if (iy >= win.h0 && iy < win.h1 && ix >= win.w0 && ix < win.w1) {
                s = s + DY[base + oy * P[10] + ox] / win.div;
            }
        }
    }
    DX[i] = s;
}"
        ),
    ],
};

fn params(count: usize, g: &PoolGeom, count_include_pad: bool, acc: bool) -> Result<Vec<u32>> {
    let mut p = vec![u(count)?];
    for v in [g.h, g.w, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.oh, g.ow] {
        p.push(u(v)?);
    }
    p.push(count_include_pad as u32);
    p.push(acc as u32);
    Ok(p)
}

fn max_pool(r: &mut Recorder, o: &ops::MaxPool) -> Result<()> {
    let n = o.g.output_len();
    let writes = [Bind::Buf(o.y), Bind::Buf(o.argmax)];
    r.dispatch(&MAX_POOL, &params(n, &o.g, true, false)?, (&[Bind::Buf(o.x)], &writes), grid(n))
}

fn max_pool_backward(r: &mut Recorder, o: &ops::MaxPoolBackward) -> Result<()> {
    let n = o.g.input_len();
    let p = params(n, &o.g, true, o.dx.accumulate)?;
    r.dispatch(&MAX_POOL_BACKWARD, &p, (&[Bind::Buf(o.argmax), Bind::Buf(o.dy)], &[Bind::Buf(o.dx.buf)]), grid(n))
}

fn avg_pool(r: &mut Recorder, o: &ops::AvgPool) -> Result<()> {
    let n = o.g.output_len();
    let p = params(n, &o.g, o.count_include_pad, false)?;
    r.dispatch(&AVG_POOL, &p, (&[Bind::Buf(o.x)], &[Bind::Buf(o.y)]), grid(n))
}

fn avg_pool_backward(r: &mut Recorder, o: &ops::AvgPoolBackward) -> Result<()> {
    let n = o.g.input_len();
    let p = params(n, &o.g, o.count_include_pad, o.dx.accumulate)?;
    r.dispatch(&AVG_POOL_BACKWARD, &p, (&[Bind::Buf(o.dy)], &[Bind::Buf(o.dx.buf)]), grid(n))
}

runs! {
    MaxPool => max_pool,
    MaxPoolBackward => max_pool_backward,
    AvgPool => avg_pool,
    AvgPoolBackward => avg_pool_backward,
}
