//! Matrix products on wgpu: one tiled GEMM core (64x64 output tiles, 16x16 threads of 4x4
//! outputs, 16-deep slices of A and B staged in workgroup memory) and four ways of feeding it:
//!
//! - `strided`: A and B addressed by strides, for the dense layer's three products;
//! - `conv_fwd`: implicit GEMM, `Y[k, p] = W[k, r] * im2col(X)[r, p]` per image and group;
//! - `conv_dgrad`: `dX[c, q] = W^T[c, (k, tap)] * dY[(k, tap), q]`, gathering for each input
//!   pixel the outputs its taps reach (no scatter, no atomics);
//! - `conv_wgrad`: `dW[k, r] = dY[k, (n, p)] * im2col(X)[(n, p), r]` per group.
//!
//! A transposed convolution is the adjoint of a convolution (`ops/conv_transpose.rs`): its
//! forward is `conv_dgrad`, its input gradient `conv_fwd`, its weight gradient `conv_wgrad` with
//! the two tensors swapped. Each output value is one thread's fixed-order sum, so results are the
//! same every run. Bias gradients are per-channel sums (`norm::channel_sum`).

use super::norm::channel_sum;
use super::record::{Bind, Kernel, Recorder, grid, u};
use crate::Result;
use crate::backend::ops::{self, ConvGeom, GradOut};

/// The core; the variant before it defines `load_a(z, r, k)`, `load_b(z, k, c)`,
/// `c_index(z, r, c)` and `bias_index(z, r, c)`. `P`: M, N, K, accumulate, has bias, slices of K,
/// slice depth, batches, then the variant's parameters from `P[8]`. Workgroup z is
/// `slice * batches + batch`. With one slice the core stores into C; with several (a deep product
/// over few output tiles, such as a weight gradient summed over a whole batch) each slice writes
/// its partial product to `PART`, and `CORE_SUM` adds the slices in order.
const CORE: &str = r#"
var<workgroup> As: array<f32, 1024>;
var<workgroup> Bs: array<f32, 1024>;
@compute @workgroup_size(16, 16, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let M = P[0]; let N = P[1]; let K = P[2];
    let slices = P[5]; let batches = P[7];
    let slice = wg.z / batches; let z = wg.z % batches;
    let kbeg = slice * P[6]; let kend = min(K, kbeg + P[6]);
    let row0 = wg.y * 64u; let col0 = wg.x * 64u;
    var acc: array<vec4<f32>, 4>;
    for (var i = 0u; i < 4u; i++) { acc[i] = vec4<f32>(0.0); }
    for (var k0 = kbeg; k0 < kend; k0 += 16u) {
        for (var t = 0u; t < 4u; t++) {
            let idx = li + t * 256u;
            let ra = idx / 16u; let ka = idx % 16u;
            var a = 0.0;
            if (row0 + ra < M && k0 + ka < kend) { a = load_a(z, row0 + ra, k0 + ka); }
            As[ka * 64u + ra] = a;
            let kb = idx / 64u; let cb = idx % 64u;
            var b = 0.0;
            if (k0 + kb < kend && col0 + cb < N) { b = load_b(z, k0 + kb, col0 + cb); }
            Bs[kb * 64u + cb] = b;
        }
        workgroupBarrier();
        for (var k = 0u; k < 16u; k++) {
            let ab = k * 64u + lid.y * 4u;
            let bb = k * 64u + lid.x * 4u;
            let bv = vec4<f32>(Bs[bb], Bs[bb + 1u], Bs[bb + 2u], Bs[bb + 3u]);
            acc[0] = fma(vec4<f32>(As[ab]), bv, acc[0]);
            acc[1] = fma(vec4<f32>(As[ab + 1u]), bv, acc[1]);
            acc[2] = fma(vec4<f32>(As[ab + 2u]), bv, acc[2]);
            acc[3] = fma(vec4<f32>(As[ab + 3u]), bv, acc[3]);
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let r = row0 + lid.y * 4u + i;
        for (var j = 0u; j < 4u; j++) {
            let c = col0 + lid.x * 4u + j;
            if (r < M && c < N) {
                var v = acc[i][j];
                if (slices > 1u) {
                    PART[((slice * batches + z) * M + r) * N + c] = v;
                } else {
                    if (P[4] != 0u) { v = v + BIAS[bias_index(z, r, c)]; }
                    let o = c_index(z, r, c);
                    if (P[3] != 0u) { C[o] = C[o] + v; } else { C[o] = v; }
                }
            }
        }
    }
}
"#;

const BINDINGS: &str = "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> A: array<f32>;
@group(0) @binding(2) var<storage, read> B: array<f32>;
@group(0) @binding(3) var<storage, read> BIAS: array<f32>;
@group(0) @binding(4) var<storage, read_write> C: array<f32>;
@group(0) @binding(5) var<storage, read_write> PART: array<f32>;
";

/// Adds the slices' partial products in order and stores them as the core does (bias,
/// accumulate), one thread per output value of every batch.
const CORE_SUM: &str = concat!(
    main1d!(),
    "    let M = P[0]; let N = P[1]; let slices = P[5]; let batches = P[7];
    if (i >= batches * M * N) { return; }
    let z = i / (M * N); let r = (i % (M * N)) / N; let c = i % N;
    var v = 0.0;
    for (var s = 0u; s < slices; s++) { v = v + PART[((s * batches + z) * M + r) * N + c]; }
    if (P[4] != 0u) { v = v + BIAS[bias_index(z, r, c)]; }
    let o = c_index(z, r, c);
    if (P[3] != 0u) { C[o] = C[o] + v; } else { C[o] = v; }
    // Keeps A and B in the layout the recorder binds (it is derived from the shader).
    if (M == 0xffffffffu) { C[0] = A[0] + B[0]; }
}"
);

/// `P[8..12]`: A's row and depth strides, B's depth and column strides; bias per column.
const STRIDED: &str = "
fn load_a(z: u32, r: u32, k: u32) -> f32 { return A[r * P[8] + k * P[9]]; }
fn load_b(z: u32, k: u32, c: u32) -> f32 { return B[k * P[10] + c * P[11]]; }
fn c_index(z: u32, r: u32, c: u32) -> u32 { return r * P[1] + c; }
fn bias_index(z: u32, r: u32, c: u32) -> u32 { return c; }
";

/// The convolution geometry from `P[8]`: n, c, h, w, k, kh, kw, sh, sw, ph, pw, dh, dw, groups,
/// oh, ow; and `im2col_b`, the value of B (an NCHW input) under filter tap `(i, j)` of output
/// position `p`, zero in the padding.
const CONV_GEOM: &str = "
fn g_c() -> u32 { return P[9]; }
fn g_h() -> u32 { return P[10]; }
fn g_w() -> u32 { return P[11]; }
fn g_k() -> u32 { return P[12]; }
fn g_kh() -> u32 { return P[13]; }
fn g_kw() -> u32 { return P[14]; }
fn g_groups() -> u32 { return P[21]; }
fn g_oh() -> u32 { return P[22]; }
fn g_ow() -> u32 { return P[23]; }
fn g_cg() -> u32 { return P[9] / P[21]; }
fn g_kg() -> u32 { return P[12] / P[21]; }
fn im2col_b(nn: u32, ch: u32, i: u32, j: u32, p: u32) -> f32 {
    let oy = p / g_ow(); let ox = p % g_ow();
    let iy = i32(oy * P[15] + i * P[19]) - i32(P[17]);
    let ix = i32(ox * P[16] + j * P[20]) - i32(P[18]);
    if (iy < 0 || ix < 0 || iy >= i32(g_h()) || ix >= i32(g_w())) { return 0.0; }
    return B[((nn * g_c() + ch) * g_h() + u32(iy)) * g_w() + u32(ix)];
}
";

/// Batch `z` = image * groups + group; A = W, B = X, C = Y, bias per output channel.
const CONV_FWD: &str = "
fn load_a(z: u32, r: u32, k: u32) -> f32 {
    return A[((z % g_groups()) * g_kg() + r) * P[2] + k];
}
fn load_b(z: u32, k: u32, c: u32) -> f32 {
    let khw = g_kh() * g_kw();
    let tap = k % khw;
    return im2col_b(z / g_groups(), (z % g_groups()) * g_cg() + k / khw, tap / g_kw(), tap % g_kw(), c);
}
fn c_index(z: u32, r: u32, c: u32) -> u32 {
    return ((z / g_groups()) * g_k() + (z % g_groups()) * g_kg() + r) * g_oh() * g_ow() + c;
}
fn bias_index(z: u32, r: u32, c: u32) -> u32 { return (z % g_groups()) * g_kg() + r; }
";

/// Batch `z` = image * groups + group; A = W, B = dY (output-shaped), C = dX (input-shaped),
/// bias per input channel (a transposed convolution's forward).
const CONV_DGRAD: &str = "
fn load_a(z: u32, r: u32, k: u32) -> f32 {
    let khw = g_kh() * g_kw();
    return A[(((z % g_groups()) * g_kg() + k / khw) * g_cg() + r) * khw + k % khw];
}
fn load_b(z: u32, k: u32, c: u32) -> f32 {
    let khw = g_kh() * g_kw();
    let ko = k / khw; let tap = k % khw;
    let i = tap / g_kw(); let j = tap % g_kw();
    let ty = i32(c / g_w() + P[17]) - i32(i * P[19]);
    let tx = i32(c % g_w() + P[18]) - i32(j * P[20]);
    if (ty < 0 || tx < 0) { return 0.0; }
    if (u32(ty) % P[15] != 0u || u32(tx) % P[16] != 0u) { return 0.0; }
    let oy = u32(ty) / P[15]; let ox = u32(tx) / P[16];
    if (oy >= g_oh() || ox >= g_ow()) { return 0.0; }
    let nn = z / g_groups();
    return B[((nn * g_k() + (z % g_groups()) * g_kg() + ko) * g_oh() + oy) * g_ow() + ox];
}
fn c_index(z: u32, r: u32, c: u32) -> u32 {
    return ((z / g_groups()) * g_c() + (z % g_groups()) * g_cg() + r) * g_h() * g_w() + c;
}
fn bias_index(z: u32, r: u32, c: u32) -> u32 { return (z % g_groups()) * g_cg() + r; }
";

/// Batch `z` = group; A = dY (output-shaped), B = X (input-shaped), C = dW.
const CONV_WGRAD: &str = "
fn load_a(z: u32, r: u32, k: u32) -> f32 {
    let ohw = g_oh() * g_ow();
    return A[((k / ohw) * g_k() + z * g_kg() + r) * ohw + k % ohw];
}
fn load_b(z: u32, k: u32, c: u32) -> f32 {
    let ohw = g_oh() * g_ow();
    let khw = g_kh() * g_kw();
    let tap = c % khw;
    return im2col_b(k / ohw, z * g_cg() + c / khw, tap / g_kw(), tap % g_kw(), k % ohw);
}
fn c_index(z: u32, r: u32, c: u32) -> u32 { return (z * g_kg() + r) * P[1] + c; }
fn bias_index(z: u32, r: u32, c: u32) -> u32 { return 0u; }
";

/// A GEMM variant: its core kernel and its slice-sum kernel.
struct Gemm {
    core: Kernel,
    sum: Kernel,
}

static GEMM_STRIDED: Gemm = Gemm {
    core: Kernel { name: "gemm_strided", parts: &[BINDINGS, STRIDED, CORE] },
    sum: Kernel { name: "gemm_strided_sum", parts: &[BINDINGS, STRIDED, CORE_SUM] },
};
static GEMM_CONV_FWD: Gemm = Gemm {
    core: Kernel { name: "gemm_conv_fwd", parts: &[BINDINGS, CONV_GEOM, CONV_FWD, CORE] },
    sum: Kernel { name: "gemm_conv_fwd_sum", parts: &[BINDINGS, CONV_GEOM, CONV_FWD, CORE_SUM] },
};
static GEMM_CONV_DGRAD: Gemm = Gemm {
    core: Kernel { name: "gemm_conv_dgrad", parts: &[BINDINGS, CONV_GEOM, CONV_DGRAD, CORE] },
    sum: Kernel { name: "gemm_conv_dgrad_sum", parts: &[BINDINGS, CONV_GEOM, CONV_DGRAD, CORE_SUM] },
};
static GEMM_CONV_WGRAD: Gemm = Gemm {
    core: Kernel { name: "gemm_conv_wgrad", parts: &[BINDINGS, CONV_GEOM, CONV_WGRAD, CORE] },
    sum: Kernel { name: "gemm_conv_wgrad_sum", parts: &[BINDINGS, CONV_GEOM, CONV_WGRAD, CORE_SUM] },
};

/// Slices of the depth `k` for a launch of `tiles` workgroups: enough to fill about 256
/// workgroups, each slice at least 256 deep (a multiple of 16). Returns (slices, depth of one).
fn split_k(tiles: usize, k: usize) -> (usize, usize) {
    let want = (256 / tiles.max(1)).min(k / 256).clamp(1, 64);
    let depth = k.div_ceil(want).next_multiple_of(16);
    (k.div_ceil(depth).max(1), depth)
}

/// One GEMM launch: `m x n` outputs over depth `k`, `batches` of them.
struct Shape {
    m: usize,
    n: usize,
    k: usize,
    batches: usize,
}

/// The buffers of one launch: A, B, the bias (if any) and C with its accumulate flag.
struct Operands {
    a: Bind,
    b: Bind,
    bias: Option<Bind>,
    c: GradOut,
}

fn launch(r: &mut Recorder, gemm: &Gemm, s: Shape, o: Operands, extra: &[u32]) -> Result<()> {
    let has_bias = o.bias.is_some();
    let bias = match o.bias {
        Some(b) => b,
        None => r.scratch(1),
    };
    let tiles = s.n.div_ceil(64) * s.m.div_ceil(64) * s.batches;
    let (slices, depth) = split_k(tiles, s.k);
    let part = r.scratch(if slices > 1 { slices * s.batches * s.m * s.n } else { 1 });
    let mut params =
        vec![u(s.m)?, u(s.n)?, u(s.k)?, o.c.accumulate as u32, has_bias as u32, u(slices)?, u(depth)?, u(s.batches)?];
    params.extend_from_slice(extra);
    let groups = [u(s.n.div_ceil(64))?, u(s.m.div_ceil(64))?, u(slices * s.batches)?];
    let reads = [o.a, o.b, bias];
    let writes = [Bind::Buf(o.c.buf), part];
    r.dispatch(&gemm.core, &params, (&reads, &writes), groups)?;
    if slices > 1 {
        r.dispatch(&gemm.sum, &params, (&reads, &writes), grid(s.batches * s.m * s.n))?;
    }
    Ok(())
}

fn set(buf: ops::BufId) -> GradOut {
    GradOut { buf, accumulate: false }
}

fn linear(r: &mut Recorder, o: &ops::Linear) -> Result<()> {
    let (m, k, n) = (o.m, o.k, o.n);
    let operands = Operands { a: Bind::Buf(o.x), b: Bind::Buf(o.w), bias: o.b.map(Bind::Buf), c: set(o.y) };
    launch(r, &GEMM_STRIDED, Shape { m, n, k, batches: 1 }, operands, &[u(k)?, 1, 1, u(k)?])
}

fn linear_backward(r: &mut Recorder, o: &ops::LinearBackward) -> Result<()> {
    let (m, k, n) = (o.m, o.k, o.n);
    if let Some(dx) = o.dx {
        // dx[m, k] = dy[m, n] * w[n, k]
        let operands = Operands { a: Bind::Buf(o.dy), b: Bind::Buf(o.w), bias: None, c: dx };
        launch(r, &GEMM_STRIDED, Shape { m, n: k, k: n, batches: 1 }, operands, &[u(n)?, 1, u(k)?, 1])?;
    }
    // dw[n, k] = dy^T[n, m] * x[m, k]
    let operands = Operands { a: Bind::Buf(o.dy), b: Bind::Buf(o.x), bias: None, c: o.dw };
    launch(r, &GEMM_STRIDED, Shape { m: n, n: k, k: m, batches: 1 }, operands, &[1, u(n)?, u(k)?, 1])?;
    if let Some(db) = o.db {
        channel_sum(r, (m, n, 1), Bind::Buf(o.dy), db)?;
    }
    Ok(())
}

fn geom(g: &ConvGeom) -> Result<Vec<u32>> {
    [g.n, g.c, g.h, g.w, g.k, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.groups, g.oh, g.ow]
        .iter()
        .map(|&v| u(v))
        .collect()
}

/// `y = conv(x, w) (+ b)` into `y`.
fn conv_fwd(r: &mut Recorder, g: &ConvGeom, (x, w, b): (Bind, Bind, Option<Bind>), y: GradOut) -> Result<()> {
    let (cg, kg) = (g.c / g.groups, g.k / g.groups);
    let shape = Shape { m: kg, n: g.oh * g.ow, k: cg * g.kh * g.kw, batches: g.n * g.groups };
    launch(r, &GEMM_CONV_FWD, shape, Operands { a: w, b: x, bias: b, c: y }, &geom(g)?)
}

/// The input-shaped product `dx = conv^T(dy, w) (+ b)`.
fn conv_dgrad(r: &mut Recorder, g: &ConvGeom, (dy, w, b): (Bind, Bind, Option<Bind>), dx: GradOut) -> Result<()> {
    let (cg, kg) = (g.c / g.groups, g.k / g.groups);
    let shape = Shape { m: cg, n: g.h * g.w, k: kg * g.kh * g.kw, batches: g.n * g.groups };
    launch(r, &GEMM_CONV_DGRAD, shape, Operands { a: w, b: dy, bias: b, c: dx }, &geom(g)?)
}

/// `dw = dy (output-shaped) x im2col(x) (input-shaped)`.
fn conv_wgrad(r: &mut Recorder, g: &ConvGeom, (dy, x): (Bind, Bind), dw: GradOut) -> Result<()> {
    let (cg, kg) = (g.c / g.groups, g.k / g.groups);
    let shape = Shape { m: kg, n: cg * g.kh * g.kw, k: g.n * g.oh * g.ow, batches: g.groups };
    launch(r, &GEMM_CONV_WGRAD, shape, Operands { a: dy, b: x, bias: None, c: dw }, &geom(g)?)
}

/// This backend's convolutions are channels-first (channels-last ones come only from mixed
/// precision, which is not planned here).
fn nchw_only(op: &str, format: ops::MemoryFormat) -> Result<()> {
    match format {
        ops::MemoryFormat::Nchw => Ok(()),
        f => Err(crate::Error::State(format!("{op} in {}: the wgpu backend's convolutions are NCHW only", f.name()))),
    }
}

fn conv2d(r: &mut Recorder, o: &ops::Conv2d) -> Result<()> {
    nchw_only("conv2d", o.format)?;
    conv_fwd(r, &o.g, (Bind::Buf(o.x), Bind::Buf(o.w), o.b.map(Bind::Buf)), set(o.y))
}

fn conv2d_backward(r: &mut Recorder, o: &ops::Conv2dBackward) -> Result<()> {
    nchw_only("conv2d_backward", o.format)?;
    let g = &o.g;
    if let Some(dx) = o.dx {
        conv_dgrad(r, g, (Bind::Buf(o.dy), Bind::Buf(o.w), None), dx)?;
    }
    conv_wgrad(r, g, (Bind::Buf(o.dy), Bind::Buf(o.x)), o.dw)?;
    if let Some(db) = o.db {
        channel_sum(r, (g.n, g.k, g.oh * g.ow), Bind::Buf(o.dy), db)?;
    }
    Ok(())
}

fn conv_transpose2d(r: &mut Recorder, o: &ops::ConvTranspose2d) -> Result<()> {
    conv_dgrad(r, &o.g, (Bind::Buf(o.x), Bind::Buf(o.w), o.b.map(Bind::Buf)), set(o.y))
}

fn conv_transpose2d_backward(r: &mut Recorder, o: &ops::ConvTranspose2dBackward) -> Result<()> {
    let g = &o.g;
    if let Some(dx) = o.dx {
        conv_fwd(r, g, (Bind::Buf(o.dy), Bind::Buf(o.w), None), dx)?;
    }
    conv_wgrad(r, g, (Bind::Buf(o.x), Bind::Buf(o.dy)), o.dw)?;
    if let Some(db) = o.db {
        channel_sum(r, (g.n, g.c, g.h * g.w), Bind::Buf(o.dy), db)?;
    }
    Ok(())
}

runs! {
    Linear => linear,
    LinearBackward => linear_backward,
    Conv2d => conv2d,
    Conv2dBackward => conv2d_backward,
    ConvTranspose2d => conv_transpose2d,
    ConvTranspose2dBackward => conv_transpose2d_backward,
}
