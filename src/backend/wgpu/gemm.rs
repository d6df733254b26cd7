//! Matrix products on wgpu: one tiled GEMM core (64x64 output tiles, 16x16 threads of 4x4
//! outputs, 16-deep slices of A and B staged in workgroup memory as rows of `vec4`, so the inner
//! loop reads one `vec4` of A and one of B per 16 multiply-adds) and four ways of feeding it:
//!
//! - `strided`: A and B addressed by strides, for the dense layer's three products;
//! - `conv_fwd`: implicit GEMM, `Y[k, p] = W[k, r] * im2col(X)[r, p]` per image and group;
//! - `conv_dgrad`: `dX[c, q] = W^T[c, (tap, k)] * dY[(tap, k), q]`, gathering for each input
//!   pixel the outputs its taps reach (no scatter, no atomics);
//! - `conv_wgrad`: `dW[k, r] = dY[k, (n, p)] * im2col(X)[(n, p), r]` per group.
//!
//! Address arithmetic stays out of the inner loops: each thread loads the same rows of A and the
//! same columns (or depths) of B on every slice, so a variant splits an address into a part fixed
//! per row or column (`a_row`, `b_col`, computed once, with the divisions) and a depth state
//! (`a_k`, `b_k`) that `a_next`/`b_next` advance by 16 with additions and compares. The
//! convolutions order their depth tap-major (`(tap, channel)`), so a 16-deep slice crosses at
//! most one tap boundary when there are 16 or more channels.
//!
//! A transposed convolution is the adjoint of a convolution (`ops/conv_transpose.rs`): its
//! forward is `conv_dgrad`, its input gradient `conv_fwd`, its weight gradient `conv_wgrad` with
//! the two tensors swapped. Each output value is one thread's fixed-order sum (or, split over
//! depth, fixed slices added in order), so results are the same every run. Bias gradients are
//! per-channel sums (`norm::channel_sum`).

use super::norm::channel_sum;
use super::record::{Bind, Kernel, Recorder, grid, u};
use crate::Result;
use crate::backend::ops::{self, ConvGeom, GradOut};

/// The core. The variant before it defines `B_KFAST` (whether B's tile is loaded with
/// consecutive threads along the depth, where B is contiguous in depth, rather than along
/// columns), the types `ARow`, `AK`, `BCol`, `BK` and `a_row(z, r)`, `a_k(z, k)`, `a_next(s)`,
/// `a_val(z, row, s)` (and the same for B with columns), `c_index(z, r, c)` and
/// `bias_index(z, r, c)`. `P`: M, N, K, accumulate, has bias, slices of K, slice depth, batches,
/// then the variant's parameters from `P[8]`. Workgroup z is `slice * batches + batch`. With one
/// slice the core stores into C; with several (a deep product over few output tiles, such as a
/// weight gradient summed over a whole batch) each slice writes its partial product to `PART`,
/// and `CORE_SUM` adds the slices in order.
///
/// Tiles: `As[k * 17 + r / 4][r % 4]` (rows padded to 17 `vec4` against bank conflicts when
/// threads store along the depth), `Bs` likewise with columns. Thread `li` loads A's rows
/// `li / 16 + 16 t` at depth `li % 16`, and B's columns `li % 64` at depths `li / 64 + 4 t`
/// (or, with `B_KFAST`, columns `li / 16 + 16 t` at depth `li % 16`), for `t` in 0..4.
///
/// Written out by hand for each `t` and each output row: no function-scope array is indexed by
/// a loop variable. The first version kept the accumulators, row parts and depth states in
/// arrays indexed in loops; on the H200's Vulkan driver that ran at ~1.8 TFLOP/s whatever the
/// loaders did (device run of 2026-11-29, NOTES.md), which is what arrays demoted to local
/// memory cost: wgpu bounds every loop with a counter, so the driver cannot unroll them.
const CORE: &str = r#"
var<workgroup> As: array<vec4<f32>, 272>;
var<workgroup> Bs: array<vec4<f32>, 272>;
fn stage_a(z: u32, ok: bool, ka: u32, ra: u32, row: ARow, s: AK) {
    var v = 0.0;
    if (ok) { v = a_val(z, row, s); }
    As[ka * 17u + ra / 4u][ra % 4u] = v;
}
fn stage_b(z: u32, ok: bool, kb: u32, cb: u32, col: BCol, s: BK) {
    var v = 0.0;
    if (ok) { v = b_val(z, col, s); }
    Bs[kb * 17u + cb / 4u][cb % 4u] = v;
}
fn store1(z: u32, slice: u32, r: u32, c: u32, value: f32) {
    let M = P[0]; let N = P[1];
    if (c >= N) { return; }
    var v = value;
    if (P[5] > 1u) {
        PART[((slice * P[7] + z) * M + r) * N + c] = v;
    } else {
        if (P[4] != 0u) { v = v + BIAS[bias_index(z, r, c)]; }
        let o = c_index(z, r, c);
        if (P[3] != 0u) { C[o] = C[o] + v; } else { C[o] = v; }
    }
}
fn store_row(z: u32, slice: u32, r: u32, c: u32, v: vec4<f32>) {
    if (r >= P[0]) { return; }
    store1(z, slice, r, c, v.x);
    store1(z, slice, r, c + 1u, v.y);
    store1(z, slice, r, c + 2u, v.z);
    store1(z, slice, r, c + 3u, v.w);
}
@compute @workgroup_size(16, 16, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let M = P[0]; let N = P[1];
    let batches = P[7];
    let slice = wg.z / batches; let z = wg.z % batches;
    let kbeg = slice * P[6]; let kend = min(P[2], kbeg + P[6]);
    let row0 = wg.y * 64u; let col0 = wg.x * 64u;
    let ka = li % 16u;
    let ra0 = li / 16u;
    let ar0 = a_row(z, min(row0 + ra0, M - 1u));
    let ar1 = a_row(z, min(row0 + ra0 + 16u, M - 1u));
    let ar2 = a_row(z, min(row0 + ra0 + 32u, M - 1u));
    let ar3 = a_row(z, min(row0 + ra0 + 48u, M - 1u));
    var ak = a_k(z, kbeg + ka);
    let cb = li % 64u; let kb0 = li / 64u;
    var bc0: BCol; var bc1: BCol; var bc2: BCol; var bc3: BCol;
    var bk0: BK; var bk1: BK; var bk2: BK; var bk3: BK;
    if (B_KFAST) {
        bc0 = b_col(z, min(col0 + ra0, N - 1u));
        bc1 = b_col(z, min(col0 + ra0 + 16u, N - 1u));
        bc2 = b_col(z, min(col0 + ra0 + 32u, N - 1u));
        bc3 = b_col(z, min(col0 + ra0 + 48u, N - 1u));
        bk0 = b_k(z, kbeg + ka);
    } else {
        bc0 = b_col(z, min(col0 + cb, N - 1u));
        bk0 = b_k(z, kbeg + kb0);
        bk1 = b_k(z, kbeg + kb0 + 4u);
        bk2 = b_k(z, kbeg + kb0 + 8u);
        bk3 = b_k(z, kbeg + kb0 + 12u);
    }
    var acc0 = vec4<f32>(0.0); var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0); var acc3 = vec4<f32>(0.0);
    for (var k0 = kbeg; k0 < kend; k0 += 16u) {
        let kin = k0 + ka < kend;
        stage_a(z, kin && row0 + ra0 < M, ka, ra0, ar0, ak);
        stage_a(z, kin && row0 + ra0 + 16u < M, ka, ra0 + 16u, ar1, ak);
        stage_a(z, kin && row0 + ra0 + 32u < M, ka, ra0 + 32u, ar2, ak);
        stage_a(z, kin && row0 + ra0 + 48u < M, ka, ra0 + 48u, ar3, ak);
        ak = a_next(ak);
        if (B_KFAST) {
            stage_b(z, kin && col0 + ra0 < N, ka, ra0, bc0, bk0);
            stage_b(z, kin && col0 + ra0 + 16u < N, ka, ra0 + 16u, bc1, bk0);
            stage_b(z, kin && col0 + ra0 + 32u < N, ka, ra0 + 32u, bc2, bk0);
            stage_b(z, kin && col0 + ra0 + 48u < N, ka, ra0 + 48u, bc3, bk0);
            bk0 = b_next(bk0);
        } else {
            let cin = col0 + cb < N;
            stage_b(z, cin && k0 + kb0 < kend, kb0, cb, bc0, bk0);
            stage_b(z, cin && k0 + kb0 + 4u < kend, kb0 + 4u, cb, bc0, bk1);
            stage_b(z, cin && k0 + kb0 + 8u < kend, kb0 + 8u, cb, bc0, bk2);
            stage_b(z, cin && k0 + kb0 + 12u < kend, kb0 + 12u, cb, bc0, bk3);
            bk0 = b_next(bk0); bk1 = b_next(bk1); bk2 = b_next(bk2); bk3 = b_next(bk3);
        }
        workgroupBarrier();
        for (var k = 0u; k < 16u; k += 4u) {
            var av = As[k * 17u + lid.y]; var bv = Bs[k * 17u + lid.x];
            acc0 = fma(vec4<f32>(av.x), bv, acc0); acc1 = fma(vec4<f32>(av.y), bv, acc1);
            acc2 = fma(vec4<f32>(av.z), bv, acc2); acc3 = fma(vec4<f32>(av.w), bv, acc3);
            av = As[(k + 1u) * 17u + lid.y]; bv = Bs[(k + 1u) * 17u + lid.x];
            acc0 = fma(vec4<f32>(av.x), bv, acc0); acc1 = fma(vec4<f32>(av.y), bv, acc1);
            acc2 = fma(vec4<f32>(av.z), bv, acc2); acc3 = fma(vec4<f32>(av.w), bv, acc3);
            av = As[(k + 2u) * 17u + lid.y]; bv = Bs[(k + 2u) * 17u + lid.x];
            acc0 = fma(vec4<f32>(av.x), bv, acc0); acc1 = fma(vec4<f32>(av.y), bv, acc1);
            acc2 = fma(vec4<f32>(av.z), bv, acc2); acc3 = fma(vec4<f32>(av.w), bv, acc3);
            av = As[(k + 3u) * 17u + lid.y]; bv = Bs[(k + 3u) * 17u + lid.x];
            acc0 = fma(vec4<f32>(av.x), bv, acc0); acc1 = fma(vec4<f32>(av.y), bv, acc1);
            acc2 = fma(vec4<f32>(av.z), bv, acc2); acc3 = fma(vec4<f32>(av.w), bv, acc3);
        }
        workgroupBarrier();
    }
    let r0 = row0 + lid.y * 4u; let c0 = col0 + lid.x * 4u;
    store_row(z, slice, r0, c0, acc0);
    store_row(z, slice, r0 + 1u, c0, acc1);
    store_row(z, slice, r0 + 2u, c0, acc2);
    store_row(z, slice, r0 + 3u, c0, acc3);
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

/// `P[8..12]`: A's row and depth strides, B's depth and column strides; bias per column. A row
/// or column part is its offset, a depth state the depth's offset.
const STRIDED: &str = "
alias ARow = u32; alias AK = u32; alias BCol = u32; alias BK = u32;
fn a_row(z: u32, r: u32) -> u32 { return r * P[8]; }
fn a_k(z: u32, k: u32) -> u32 { return k * P[9]; }
fn a_next(s: u32) -> u32 { return s + 16u * P[9]; }
fn a_val(z: u32, row: u32, s: u32) -> f32 { return A[row + s]; }
fn b_col(z: u32, c: u32) -> u32 { return c * P[11]; }
fn b_k(z: u32, k: u32) -> u32 { return k * P[10]; }
fn b_next(s: u32) -> u32 { return s + 16u * P[10]; }
fn b_val(z: u32, col: u32, s: u32) -> f32 { return B[col + s]; }
fn c_index(z: u32, r: u32, c: u32) -> u32 { return r * P[1] + c; }
fn bias_index(z: u32, r: u32, c: u32) -> u32 { return c; }
";

/// The convolution geometry from `P[8]`: n, c, h, w, k, kh, kw, sh, sw, ph, pw, dh, dw, groups,
/// oh, ow; `Pix`, a pixel's part of an address (a channel base and a padded position); and the
/// tap-major depth `k = (i * kw + j) * inner + ch` as the state `(ch, i, j)`: `kd` splits it
/// (divisions, once per thread), `kd_next` advances it by 16.
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
struct Pix { base: u32, y: i32, x: i32 }
fn kd(k: u32, inner: u32) -> vec3<u32> {
    let tap = k / inner;
    return vec3<u32>(k - tap * inner, tap / g_kw(), tap % g_kw());
}
fn kd_next(s: vec3<u32>, inner: u32) -> vec3<u32> {
    var r = s;
    r.x = r.x + 16u;
    loop {
        if (r.x < inner) { break; }
        r.x = r.x - inner;
        r.z = r.z + 1u;
        if (r.z == g_kw()) { r.z = 0u; r.y = r.y + 1u; }
    }
    return r;
}
";

/// Batch `z` = image * groups + group; A = W (row: the filter's base), B = X under the im2col
/// view (column: output pixel p's image-and-group base and top-left input position), C = Y,
/// bias per output channel. Depth `(tap, input channel)`.
const CONV_FWD: &str = "
const B_KFAST: bool = false;
alias ARow = u32; alias AK = vec3<u32>; alias BCol = Pix; alias BK = vec3<u32>;
fn a_row(z: u32, r: u32) -> u32 { return ((z % g_groups()) * g_kg() + r) * P[2]; }
fn a_k(z: u32, k: u32) -> vec3<u32> { return kd(k, g_cg()); }
fn a_next(s: vec3<u32>) -> vec3<u32> { return kd_next(s, g_cg()); }
fn a_val(z: u32, row: u32, s: vec3<u32>) -> f32 {
    return A[row + s.x * g_kh() * g_kw() + s.y * g_kw() + s.z];
}
fn b_col(z: u32, p: u32) -> Pix {
    let oy = p / g_ow(); let ox = p % g_ow();
    let base = ((z / g_groups()) * g_c() + (z % g_groups()) * g_cg()) * g_h() * g_w();
    return Pix(base, i32(oy * P[15]) - i32(P[17]), i32(ox * P[16]) - i32(P[18]));
}
fn b_k(z: u32, k: u32) -> vec3<u32> { return kd(k, g_cg()); }
fn b_next(s: vec3<u32>) -> vec3<u32> { return kd_next(s, g_cg()); }
fn b_val(z: u32, c: Pix, s: vec3<u32>) -> f32 {
    let iy = c.y + i32(s.y * P[19]); let ix = c.x + i32(s.z * P[20]);
    if (iy < 0 || ix < 0 || iy >= i32(g_h()) || ix >= i32(g_w())) { return 0.0; }
    return B[c.base + (s.x * g_h() + u32(iy)) * g_w() + u32(ix)];
}
fn c_index(z: u32, r: u32, c: u32) -> u32 {
    return ((z / g_groups()) * g_k() + (z % g_groups()) * g_kg() + r) * g_oh() * g_ow() + c;
}
fn bias_index(z: u32, r: u32, c: u32) -> u32 { return (z % g_groups()) * g_kg() + r; }
";

/// Batch `z` = image * groups + group; A = W (row: input channel r's filters), B = dY
/// (output-shaped; column: input pixel q's image-and-group base and padded position), C = dX
/// (input-shaped), bias per input channel (a transposed convolution's forward). Depth
/// `(tap, output channel)`: tap `(i, j)` of output `(oy, ox)` reads input
/// `(oy * sh + i * dh - ph, ...)`, so pixel q gets the outputs whose stride divides its offset.
const CONV_DGRAD: &str = "
const B_KFAST: bool = false;
alias ARow = u32; alias AK = vec3<u32>; alias BCol = Pix; alias BK = vec3<u32>;
fn a_row(z: u32, r: u32) -> u32 {
    return ((z % g_groups()) * g_kg() * g_cg() + r) * g_kh() * g_kw();
}
fn a_k(z: u32, k: u32) -> vec3<u32> { return kd(k, g_kg()); }
fn a_next(s: vec3<u32>) -> vec3<u32> { return kd_next(s, g_kg()); }
fn a_val(z: u32, row: u32, s: vec3<u32>) -> f32 {
    return A[row + s.x * g_cg() * g_kh() * g_kw() + s.y * g_kw() + s.z];
}
fn b_col(z: u32, q: u32) -> Pix {
    let base = ((z / g_groups()) * g_k() + (z % g_groups()) * g_kg()) * g_oh() * g_ow();
    return Pix(base, i32(q / g_w() + P[17]), i32(q % g_w() + P[18]));
}
fn b_k(z: u32, k: u32) -> vec3<u32> { return kd(k, g_kg()); }
fn b_next(s: vec3<u32>) -> vec3<u32> { return kd_next(s, g_kg()); }
fn b_val(z: u32, c: Pix, s: vec3<u32>) -> f32 {
    let ty = c.y - i32(s.y * P[19]); let tx = c.x - i32(s.z * P[20]);
    if (ty < 0 || tx < 0) { return 0.0; }
    var oy = u32(ty); var ox = u32(tx);
    if (P[15] != 1u || P[16] != 1u) {
        if (oy % P[15] != 0u || ox % P[16] != 0u) { return 0.0; }
        oy = oy / P[15]; ox = ox / P[16];
    }
    if (oy >= g_oh() || ox >= g_ow()) { return 0.0; }
    return B[c.base + (s.x * g_oh() + oy) * g_ow() + ox];
}
fn c_index(z: u32, r: u32, c: u32) -> u32 {
    return ((z / g_groups()) * g_c() + (z % g_groups()) * g_cg() + r) * g_h() * g_w() + c;
}
fn bias_index(z: u32, r: u32, c: u32) -> u32 { return (z % g_groups()) * g_cg() + r; }
";

/// Batch `z` = group; A = dY (output-shaped; row: output channel r's base), B = X under the
/// im2col view (column `ch * kh * kw + tap`, the weight's layout: the channel's base and the
/// tap's offset), C = dW. Depth `(image, output pixel)`, contiguous in both A and B, so B is
/// loaded along the depth; A's state is `(n, p)`, B's `(n, oy, ox)`.
const CONV_WGRAD: &str = "
const B_KFAST: bool = true;
alias ARow = u32; alias AK = vec2<u32>; alias BCol = Pix; alias BK = vec3<u32>;
fn a_row(z: u32, r: u32) -> u32 { return (z * g_kg() + r) * g_oh() * g_ow(); }
fn a_k(z: u32, k: u32) -> vec2<u32> { let ohw = g_oh() * g_ow(); return vec2<u32>(k / ohw, k % ohw); }
fn a_next(s: vec2<u32>) -> vec2<u32> {
    let ohw = g_oh() * g_ow();
    var r = s;
    r.y = r.y + 16u;
    loop { if (r.y < ohw) { break; } r.y = r.y - ohw; r.x = r.x + 1u; }
    return r;
}
fn a_val(z: u32, row: u32, s: vec2<u32>) -> f32 { return A[row + s.x * g_k() * g_oh() * g_ow() + s.y]; }
fn b_col(z: u32, c: u32) -> Pix {
    let khw = g_kh() * g_kw();
    let ch = c / khw; let tap = c % khw;
    let i = tap / g_kw(); let j = tap % g_kw();
    let base = (z * g_cg() + ch) * g_h() * g_w();
    return Pix(base, i32(i * P[19]) - i32(P[17]), i32(j * P[20]) - i32(P[18]));
}
fn b_k(z: u32, k: u32) -> vec3<u32> {
    let ohw = g_oh() * g_ow();
    let p = k % ohw;
    return vec3<u32>(k / ohw, p / g_ow(), p % g_ow());
}
fn b_next(s: vec3<u32>) -> vec3<u32> {
    var r = s;
    r.z = r.z + 16u;
    loop {
        if (r.z < g_ow()) { break; }
        r.z = r.z - g_ow();
        r.y = r.y + 1u;
        if (r.y == g_oh()) { r.y = 0u; r.x = r.x + 1u; }
    }
    return r;
}
fn b_val(z: u32, c: Pix, s: vec3<u32>) -> f32 {
    let iy = i32(s.y * P[15]) + c.y; let ix = i32(s.z * P[16]) + c.x;
    if (iy < 0 || ix < 0 || iy >= i32(g_h()) || ix >= i32(g_w())) { return 0.0; }
    return B[s.x * g_c() * g_h() * g_w() + c.base + u32(iy) * g_w() + u32(ix)];
}
fn c_index(z: u32, r: u32, c: u32) -> u32 { return (z * g_kg() + r) * P[1] + c; }
fn bias_index(z: u32, r: u32, c: u32) -> u32 { return 0u; }
";

/// A GEMM variant: its core kernel and its slice-sum kernel.
struct Gemm {
    core: Kernel,
    sum: Kernel,
}

/// B's tile loaded along columns (contiguous columns) or along the depth.
const COLS: &str = "const B_KFAST: bool = false;\n";
const DEPTH: &str = "const B_KFAST: bool = true;\n";

static GEMM_STRIDED: Gemm = Gemm {
    core: Kernel { name: "gemm_strided", parts: &[BINDINGS, COLS, STRIDED, CORE] },
    sum: Kernel { name: "gemm_strided_sum", parts: &[BINDINGS, COLS, STRIDED, CORE_SUM] },
};
static GEMM_STRIDED_DEPTH: Gemm = Gemm {
    core: Kernel { name: "gemm_strided_depth", parts: &[BINDINGS, DEPTH, STRIDED, CORE] },
    sum: Kernel { name: "gemm_strided_depth_sum", parts: &[BINDINGS, DEPTH, STRIDED, CORE_SUM] },
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

/// Slices of the depth `k` for a launch of `tiles` workgroups: enough to fill about 512
/// workgroups (an H200 holds ~4 of these per SM, 132 SMs), each slice at least 256 deep (a
/// multiple of 16). Returns (slices, depth of one).
fn split_k(tiles: usize, k: usize) -> (usize, usize) {
    let want = (512 / tiles.max(1)).min(k / 256).clamp(1, 64);
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
    // B = w^T: contiguous along the depth.
    launch(r, &GEMM_STRIDED_DEPTH, Shape { m, n, k, batches: 1 }, operands, &[u(k)?, 1, 1, u(k)?])
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
