//! Element-wise ops, softmax, dropout, joins, gradient copies and fills on wgpu, following the
//! CPU reference (`backend/cpu/{activation,softmax,dropout,join}.rs`) operation for operation.

use super::record::{Bind, Kernel, Recorder, f, grid, u};
use crate::Result;
use crate::backend::ops::{self, ActFn};

/// The activation functions and their derivatives (also batch norm's fused activation,
/// `norm.rs`).
pub(super) const ACT_FNS: &str = r#"
fn sigmoid(x: f32) -> f32 {
    if (x >= 0.0) { return 1.0 / (1.0 + exp(-x)); }
    let e = exp(x);
    return e / (1.0 + e);
}
// tanh without overflow: 1 - 2 / (exp(2|x|) + 1), with x's sign.
fn tanh_(x: f32) -> f32 {
    if (is_nan(x)) { return x; }
    let t = 1.0 - 2.0 / (exp(2.0 * abs(x)) + 1.0);
    return select(t, -t, x < 0.0);
}
// erf to about 1e-7 (Abramowitz and Stegun 7.1.26 has 1.5e-7; this is W. J. Cody's rational
// form as used by Numerical Recipes' erfc, 1.2e-7 relative).
fn erf_(x: f32) -> f32 {
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t * exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 +
        t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 +
        t * (-0.82215223 + t * 0.17087277)))))))));
    let e = 1.0 - r;
    return select(e, -e, x < 0.0);
}
const FRAC_1_SQRT_2: f32 = 0.70710678118654752;
const INV_SQRT_2PI: f32 = 0.3989422804014327;
fn act(fc: u32, a: f32, x: f32) -> f32 {
    switch fc {
        case 0u: { return select(x, 0.0, x <= 0.0); }
        case 1u: { return select(x * a, x, x > 0.0); }
        case 2u: { return select(a * (exp(x) - 1.0), x, x > 0.0); }
        case 3u: { return sigmoid(x); }
        case 4u: { return tanh_(x); }
        case 5u: { return x * sigmoid(x); }
        default: { return 0.5 * x * (1.0 + erf_(x * FRAC_1_SQRT_2)); }
    }
}
fn deriv(fc: u32, a: f32, x: f32, y: f32) -> f32 {
    switch fc {
        case 0u: { return select(1.0, 0.0, x <= 0.0); }
        case 1u: { return select(a, 1.0, x > 0.0); }
        case 2u: { return select(1.0, y + a, x <= 0.0); }
        case 3u: { return y * (1.0 - y); }
        case 4u: { return 1.0 - y * y; }
        case 5u: { let s = sigmoid(x); return s * (1.0 + x * (1.0 - s)); }
        default: {
            let cdf = 0.5 * (1.0 + erf_(x * FRAC_1_SQRT_2));
            let pdf = INV_SQRT_2PI * exp(-0.5 * x * x);
            return cdf + x * pdf;
        }
    }
}
"#;

static ACT: Kernel = Kernel {
    name: "act",
    parts: &[
        ACT_FNS,
        concat!(
            "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;
",
            main1d!(),
            "    if (i >= P[0]) { return; }
    Y[i] = act(P[1], pf(P[2]), X[i]);
}"
        ),
    ],
};

static ACT_BACKWARD: Kernel = Kernel {
    name: "act_backward",
    parts: &[
        ACT_FNS,
        concat!(
            "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> Y: array<f32>;
@group(0) @binding(3) var<storage, read> DY: array<f32>;
@group(0) @binding(4) var<storage, read_write> DX: array<f32>;
",
            main1d!(),
            "    if (i >= P[0]) { return; }
    let v = deriv(P[1], pf(P[2]), X[i], Y[i]) * DY[i];
    if (P[3] != 0u) { DX[i] = DX[i] + v; } else { DX[i] = v; }
}"
        ),
    ],
};

/// The kernels' code for a function and its parameter.
pub(super) fn act_code(fun: ActFn) -> (u32, f32) {
    match fun {
        ActFn::Relu => (0, 0.0),
        ActFn::LeakyRelu(s) => (1, s),
        ActFn::Elu(a) => (2, a),
        ActFn::Sigmoid => (3, 0.0),
        ActFn::Tanh => (4, 0.0),
        ActFn::Silu => (5, 0.0),
        ActFn::Gelu => (6, 0.0),
    }
}

fn act(r: &mut Recorder, o: &ops::Act) -> Result<()> {
    let (code, a) = act_code(o.f);
    r.dispatch(&ACT, &[u(o.len)?, code, f(a)], (&[Bind::Buf(o.x)], &[Bind::Buf(o.y)]), grid(o.len))
}

fn act_backward(r: &mut Recorder, o: &ops::ActBackward) -> Result<()> {
    let (code, a) = act_code(o.f);
    let reads = [Bind::Buf(o.x), Bind::Buf(o.y), Bind::Buf(o.dy)];
    let params = [u(o.len)?, code, f(a), o.dx.accumulate as u32];
    r.dispatch(&ACT_BACKWARD, &params, (&reads, &[Bind::Buf(o.dx.buf)]), grid(o.len))
}

static SOFTMAX: Kernel = Kernel {
    name: "softmax",
    parts: &[concat!(
        "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;
",
        main1d!(),
        "    if (i >= P[0]) { return; }
    let dim = P[1]; let inner = P[2];
    let base = (i / inner) * dim * inner + i % inner;
    var m = bitcast<f32>(0xff800000u);
    for (var d = 0u; d < dim; d++) {
        let v = X[base + d * inner];
        if (v > m || is_nan(v)) { m = v; }
    }
    var s = 0.0;
    for (var d = 0u; d < dim; d++) {
        let e = exp(X[base + d * inner] - m);
        Y[base + d * inner] = e;
        s = s + e;
    }
    let inv = 1.0 / s;
    for (var d = 0u; d < dim; d++) {
        Y[base + d * inner] = Y[base + d * inner] * inv;
    }
}"
    )],
};

static SOFTMAX_BACKWARD: Kernel = Kernel {
    name: "softmax_backward",
    parts: &[concat!(
        "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> Y: array<f32>;
@group(0) @binding(2) var<storage, read> DY: array<f32>;
@group(0) @binding(3) var<storage, read_write> DX: array<f32>;
",
        main1d!(),
        "    if (i >= P[0]) { return; }
    let dim = P[1]; let inner = P[2];
    let base = (i / inner) * dim * inner + i % inner;
    var dot = 0.0;
    for (var d = 0u; d < dim; d++) {
        dot = dot + DY[base + d * inner] * Y[base + d * inner];
    }
    for (var d = 0u; d < dim; d++) {
        let j = base + d * inner;
        let v = Y[j] * (DY[j] - dot);
        if (P[3] != 0u) { DX[j] = DX[j] + v; } else { DX[j] = v; }
    }
}"
    )],
};

fn softmax(r: &mut Recorder, o: &ops::Softmax) -> Result<()> {
    let rows = o.outer * o.inner;
    let params = [u(rows)?, u(o.dim)?, u(o.inner)?];
    r.dispatch(&SOFTMAX, &params, (&[Bind::Buf(o.x)], &[Bind::Buf(o.y)]), grid(rows))
}

fn softmax_backward(r: &mut Recorder, o: &ops::SoftmaxBackward) -> Result<()> {
    let rows = o.outer * o.inner;
    let params = [u(rows)?, u(o.dim)?, u(o.inner)?, o.dx.accumulate as u32];
    r.dispatch(&SOFTMAX_BACKWARD, &params, (&[Bind::Buf(o.y), Bind::Buf(o.dy)], &[Bind::Buf(o.dx.buf)]), grid(rows))
}

/// Philox 4x32-10 in WGSL (the CPU's `rng::philox4x32`, 32x32->64 products from 16-bit halves).
const PHILOX: &str = r#"
fn mulhilo(a: u32, b: u32) -> vec2<u32> {
    let al = a & 0xffffu; let ah = a >> 16u;
    let bl = b & 0xffffu; let bh = b >> 16u;
    let ll = al * bl; let hl = ah * bl; let lh = al * bh; let hh = ah * bh;
    let cross = (ll >> 16u) + (hl & 0xffffu) + lh;
    let hi = hh + (hl >> 16u) + (cross >> 16u);
    let lo = (cross << 16u) | (ll & 0xffffu);
    return vec2<u32>(hi, lo);
}
fn philox(ctr: vec4<u32>, key: vec2<u32>) -> vec4<u32> {
    var c = ctr;
    var k = key;
    for (var round = 0u; round < 10u; round++) {
        if (round > 0u) { k = k + vec2<u32>(0x9E3779B9u, 0xBB67AE85u); }
        let p0 = mulhilo(0xD2511F53u, c.x);
        let p1 = mulhilo(0xCD9E8D57u, c.z);
        c = vec4<u32>(p1.x ^ c.y ^ k.x, p1.y, p0.x ^ c.w ^ k.y, p0.y);
    }
    return c;
}
"#;

static DROPOUT: Kernel = Kernel {
    name: "dropout",
    parts: &[
        PHILOX,
        concat!(
            "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> STEP: array<u32>;
@group(0) @binding(3) var<storage, read_write> Y: array<f32>;
@group(0) @binding(4) var<storage, read_write> MASK: array<f32>;
",
            main1d!(),
            "    // P: len, seed lo, seed hi, rate, scale, back (1: a replay draws the previous step's
    // mask); one thread per block of four values.
    let len = P[0];
    if (i * 4u >= len) { return; }
    let lo = STEP[0] - P[5];
    let hi = STEP[1] - select(0u, 1u, STEP[0] < P[5]);
    let r = philox(vec4<u32>(i, 0u, lo, hi), vec2<u32>(P[1], P[2]));
    let rate = pf(P[3]);
    let scale = pf(P[4]);
    for (var e = 0u; e < 4u; e++) {
        let j = i * 4u + e;
        if (j < len) {
            let unit = f32(r[e] >> 8u) * (1.0 / 16777216.0);
            let m = select(0.0, scale, unit >= rate);
            MASK[j] = m;
            Y[j] = X[j] * m;
        }
    }
}"
        ),
    ],
};

/// Adds `P[0]` to a 64-bit counter (two words, low first).
static COUNTER_ADD: Kernel = Kernel {
    name: "counter_add",
    parts: &["@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read_write> C: array<u32>;
@compute @workgroup_size(1)
fn main() {
    let lo = C[0] + P[0];
    C[1] = C[1] + select(0u, 1u, lo < C[0]);
    C[0] = lo;
}"],
};

fn dropout(r: &mut Recorder, o: &ops::Dropout) -> Result<()> {
    let scale = 1.0f32 / (1.0 - o.rate);
    let params = [u(o.len)?, o.seed as u32, (o.seed >> 32) as u32, f(o.rate), f(scale), o.replay as u32];
    let reads = [Bind::Buf(o.x), Bind::Counter(o.counter)];
    r.dispatch(&DROPOUT, &params, (&reads, &[Bind::Buf(o.y), Bind::Buf(o.mask)]), grid(o.len.div_ceil(4)))?;
    if o.replay {
        // The recomputation of a checkpointed segment: the forward's mask, the counter kept.
        return Ok(());
    }
    r.dispatch(&COUNTER_ADD, &[1], (&[], &[Bind::Counter(o.counter)]), [1, 1, 1])
}

static MUL: Kernel = Kernel {
    name: "mul",
    parts: &[concat!(
        "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> A: array<f32>;
@group(0) @binding(2) var<storage, read> B: array<f32>;
@group(0) @binding(3) var<storage, read_write> D: array<f32>;
",
        main1d!(),
        "    if (i >= P[0]) { return; }
    let v = B[i] * A[i];
    if (P[1] != 0u) { D[i] = D[i] + v; } else { D[i] = v; }
}"
    )],
};

fn dropout_backward(r: &mut Recorder, o: &ops::DropoutBackward) -> Result<()> {
    let params = [u(o.len)?, o.dx.accumulate as u32];
    r.dispatch(&MUL, &params, (&[Bind::Buf(o.mask), Bind::Buf(o.dy)], &[Bind::Buf(o.dx.buf)]), grid(o.len))
}

static ADD2: Kernel = Kernel {
    name: "add2",
    parts: &[concat!(
        "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> A: array<f32>;
@group(0) @binding(2) var<storage, read> B: array<f32>;
@group(0) @binding(3) var<storage, read_write> Y: array<f32>;
",
        main1d!(),
        "    if (i >= P[0]) { return; }
    Y[i] = A[i] + B[i];
}"
    )],
};

/// `D += S` over `P[0]` values.
static ACCUMULATE: Kernel = Kernel {
    name: "accumulate",
    parts: &[concat!(
        "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> S: array<f32>;
@group(0) @binding(2) var<storage, read_write> D: array<f32>;
",
        main1d!(),
        "    if (i >= P[0]) { return; }
    D[i] = D[i] + S[i];
}"
    )],
};

fn add(r: &mut Recorder, o: &ops::Add) -> Result<()> {
    let y = Bind::Buf(o.y);
    match o.inputs.as_slice() {
        [] => Ok(()),
        [a] => r.copy(&Bind::Buf(*a), &y, o.len),
        [a, b, rest @ ..] => {
            let n = u(o.len)?;
            r.dispatch(&ADD2, &[n], (&[Bind::Buf(*a), Bind::Buf(*b)], std::slice::from_ref(&y)), grid(o.len))?;
            for c in rest {
                r.dispatch(&ACCUMULATE, &[n], (&[Bind::Buf(*c)], std::slice::from_ref(&y)), grid(o.len))?;
            }
            Ok(())
        }
    }
}

fn grad_into(r: &mut Recorder, o: &ops::GradInto) -> Result<()> {
    if o.dst.accumulate {
        r.dispatch(&ACCUMULATE, &[u(o.len)?], (&[Bind::Buf(o.src)], &[Bind::Buf(o.dst.buf)]), grid(o.len))
    } else {
        r.copy(&Bind::Buf(o.src), &Bind::Buf(o.dst.buf), o.len)
    }
}

/// The cast of mixed precision ([`ops::Cast`]). This backend holds f32 buffers only (its
/// validation refuses bf16 ones, and `exec` plans bf16 only for backends whose products take
/// it), so a cast that reaches it is f32 to f32: a copy or an accumulation, as [`grad_into`].
/// The bias a widening cast adds to a half-precision convolution's output and the change of
/// memory order around a channels-last one never occur here: refused.
fn cast(r: &mut Recorder, o: &ops::Cast) -> Result<()> {
    if o.bias.is_some() || o.permute.is_some() {
        let what = if o.bias.is_some() { "a bias" } else { "a change of memory order" };
        return Err(crate::Error::State(format!(
            "cast with {what}: the wgpu backend computes in f32 only (no mixed precision)"
        )));
    }
    grad_into(r, &ops::GradInto { len: o.len, src: o.src, dst: o.dst })
}

static FILL: Kernel = Kernel {
    name: "fill",
    parts: &[concat!(
        "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read_write> Y: array<f32>;
",
        main1d!(),
        "    if (i >= P[0]) { return; }
    Y[i] = pf(P[1]);
}"
    )],
};

fn fill(r: &mut Recorder, o: &ops::Fill) -> Result<()> {
    r.dispatch(&FILL, &[u(o.len)?, f(o.value)], (&[], &[Bind::Buf(o.buf)]), grid(o.len))
}

/// Copies one part of a concatenation: `P` = values, part block (`channels * inner`), output
/// block (`total * inner`), offset in the output block, accumulate.
static CONCAT_PART: Kernel = Kernel {
    name: "concat_part",
    parts: &[concat!(
        "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> S: array<f32>;
@group(0) @binding(2) var<storage, read_write> D: array<f32>;
",
        main1d!(),
        "    if (i >= P[0]) { return; }
    D[(i / P[1]) * P[2] + P[3] + i % P[1]] = S[i];
}"
    )],
};

static CONCAT_PART_BACKWARD: Kernel = Kernel {
    name: "concat_part_backward",
    parts: &[concat!(
        "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> DY: array<f32>;
@group(0) @binding(2) var<storage, read_write> DX: array<f32>;
",
        main1d!(),
        "    if (i >= P[0]) { return; }
    let v = DY[(i / P[1]) * P[2] + P[3] + i % P[1]];
    if (P[4] != 0u) { DX[i] = DX[i] + v; } else { DX[i] = v; }
}"
    )],
};

fn concat(r: &mut Recorder, o: &ops::Concat) -> Result<()> {
    let total: usize = o.parts.iter().map(|p| p.1).sum();
    let mut offset = 0;
    for (b, ch) in &o.parts {
        let count = o.n * ch * o.inner;
        let params = [u(count)?, u(ch * o.inner)?, u(total * o.inner)?, u(offset * o.inner)?];
        r.dispatch(&CONCAT_PART, &params, (&[Bind::Buf(*b)], &[Bind::Buf(o.y)]), grid(count))?;
        offset += ch;
    }
    Ok(())
}

fn concat_backward(r: &mut Recorder, o: &ops::ConcatBackward) -> Result<()> {
    let total: usize = o.parts.iter().map(|p| p.1).sum();
    let mut offset = 0;
    for (g, ch) in &o.parts {
        if let Some(g) = g {
            let count = o.n * ch * o.inner;
            let params = [u(count)?, u(ch * o.inner)?, u(total * o.inner)?, u(offset * o.inner)?, g.accumulate as u32];
            r.dispatch(&CONCAT_PART_BACKWARD, &params, (&[Bind::Buf(o.dy)], &[Bind::Buf(g.buf)]), grid(count))?;
        }
        offset += ch;
    }
    Ok(())
}

runs! {
    Act => act,
    ActBackward => act_backward,
    Softmax => softmax,
    SoftmaxBackward => softmax_backward,
    Dropout => dropout,
    DropoutBackward => dropout_backward,
    Add => add,
    GradInto => grad_into,
    Cast => cast,
    Fill => fill,
    Concat => concat,
    ConcatBackward => concat_backward,
}
