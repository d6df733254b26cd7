//! Matrix products on wgpu: one tiled GEMM core, generated for several workgroup tiles (64x64
//! to 128x128 outputs, 4x4 to 8x8 per thread, 16-deep slices of A and B staged in workgroup
//! memory as rows of `vec4`, the next slice loaded into registers while the current one is
//! multiplied), the tile and the depth split chosen per shape (`plan`), and four ways of feeding
//! it:
//!
//! - `strided`: A and B addressed by strides, for the dense layer's three products;
//! - `conv_fwd`: implicit GEMM, `Y[k, (n, p)] = W[k, r] * im2col(X)[r, (n, p)]` per group, the
//!   batch's images side by side in the columns;
//! - `conv_dgrad`: `dX[c, (n, q)] = W^T[c, (tap, k)] * dY[(tap, k), (n, q)]`, gathering for each
//!   input pixel the outputs its taps reach (no scatter, no atomics);
//! - `conv_wgrad`: `dW[k, r] = dY[k, (n, p)] * im2col(X)[(n, p), r]` per group.
//!
//! Address arithmetic stays out of the inner loops: each thread loads the same rows of A and the
//! same columns (or depths) of B on every slice, so a variant splits an address into a part fixed
//! per row or column (`a_row`, `b_col`, computed once, with the divisions) and a depth state
//! (`a_k`, `b_k`) that `a_next`/`b_next` advance by 16 with additions and compares; C's index is
//! a row part plus a column part (`c_row`, `c_col`), each computed once per thread. The
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

/// A workgroup's tile of the output: 256 threads as `wy` rows by `256 / wy` columns, each thread
/// `tm` x `tn` outputs (4 or 8 each), so `wy * tm` rows by `(256 / wy) * tn` columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Tile {
    pub wy: u32,
    pub tm: u32,
    pub tn: u32,
}

impl Tile {
    fn wx(self) -> u32 {
        256 / self.wy
    }
    fn bm(self) -> usize {
        (self.wy * self.tm) as usize
    }
    fn bn(self) -> usize {
        (self.wx() * self.tn) as usize
    }
}

/// The tiles the core is generated for: 64x64 (4x4 per thread), 128x64, 64x128, 128x128 (8x8 per
/// thread) and 32x128 (for 32-row products, which waste half of a 64-row tile).
pub(super) const TILES: [Tile; 5] = [
    Tile { wy: 16, tm: 4, tn: 4 },
    Tile { wy: 16, tm: 8, tn: 4 },
    Tile { wy: 16, tm: 4, tn: 8 },
    Tile { wy: 16, tm: 8, tn: 8 },
    Tile { wy: 8, tm: 4, tn: 4 },
];

/// Stores of the core: one value, or a row's four, into C (bias, accumulate) or, with several
/// slices of the depth, into `PART`. `cr` and `cc` are the row's and the column's parts of C's
/// index (`c_row`, `c_col`), computed once per row and per column.
const STORES: &str = "
fn store1(z: u32, slice: u32, r: u32, c: u32, cr: u32, cc: u32, value: f32) {
    let M = P[0]; let N = P[1];
    if (c >= N) { return; }
    var v = value;
    if (P[5] > 1u) {
        PART[((slice * P[7] + z) * M + r) * N + c] = v;
    } else {
        if (P[4] != 0u) { v = v + BIAS[bias_index(z, r, c)]; }
        let o = cr + cc;
        if (P[3] != 0u) { C[o] = C[o] + v; } else { C[o] = v; }
    }
}
fn store4(z: u32, slice: u32, r: u32, c: u32, cc: vec4<u32>, v: vec4<f32>) {
    if (r >= P[0]) { return; }
    let cr = c_row(z, r);
    store1(z, slice, r, c, cr, cc.x, v.x);
    store1(z, slice, r, c + 1u, cr, cc.y, v.y);
    store1(z, slice, r, c + 2u, cr, cc.z, v.z);
    store1(z, slice, r, c + 3u, cr, cc.w, v.w);
}
";

/// The GEMM core for tile `t`, written out as straight-line WGSL (see [`core`]); `kfast`: B's
/// tile is loaded with consecutive threads along the depth (where B is contiguous in depth)
/// rather than along columns.
///
/// The variant before it defines the types `ARow`, `AK`, `BCol`, `BK` and `a_row(z, r)`,
/// `a_k(z, k)`, `a_next(s)`, `a_val(z, row, s)` (and the same for B with columns), `c_row(z, r)`,
/// `c_col(z, c)` (C's index is their sum) and `bias_index(z, r, c)`. `P`: M, N, K, accumulate,
/// has bias, slices of K, slice depth, batches, then the variant's parameters from `P[8]`.
/// Workgroup z is `slice * batches + batch`. With one slice the core stores into C; with
/// several (a deep product over few output tiles, such as a weight gradient summed over a whole
/// batch) each slice writes its partial product to `PART`, and `CORE_SUM` adds the slices in
/// order.
///
/// Tiles in workgroup memory: `As[k * SA + r / 4][r % 4]` (SA = rows / 4 + 1: padded against
/// bank conflicts when threads store along the depth), `Bs` likewise with columns. Thread `li`
/// loads A's rows `li / 16 + 16 t` at depth `li % 16`; B's columns `li % 64 + 64 u` at depths
/// `li / 64 + 4 t` (or, `kfast`, columns `li / 16 + 16 t` at depth `li % 16`). The next slice's
/// values are loaded into registers while the current slice is multiplied (register
/// prefetch), then stored to workgroup memory. A thread's outputs are rows `4 (y + g wy) + i`
/// and columns `4 (x + h wx) + j` (groups of four rows and columns spread across the tile, so
/// the `vec4` reads of a warp from workgroup memory do not conflict).
///
/// Everything per thread is a plain variable: no function-scope array is indexed anywhere. An
/// earlier core that kept accumulators and states in arrays indexed in loops ran at ~1.8
/// TFLOP/s on the H200's Vulkan driver (NOTES.md, round 2): arrays demoted to local memory.
fn core(t: Tile, kfast: bool) -> String {
    use std::fmt::Write;
    let (wy, wx, tm, tn) = (t.wy, t.wx(), t.tm, t.tn);
    let (bm, bn) = (t.bm(), t.bn());
    let (gm, gn) = (tm / 4, tn / 4);
    let (sa, sb) = (bm / 4 + 1, bn / 4 + 1);
    let na = bm / 16;
    let nbv = bn / 16;
    let nc = bn / 64;
    let mut s = String::new();
    let _ = writeln!(s, "var<workgroup> As: array<vec4<f32>, {}>;", 16 * sa);
    let _ = writeln!(s, "var<workgroup> Bs: array<vec4<f32>, {}>;", 16 * sb);
    s += STORES;
    let _ = writeln!(s, "@compute @workgroup_size({wx}, {wy}, 1)");
    s += "fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let M = P[0]; let N = P[1];
    let batches = P[7];
    let slice = wg.z / batches; let z = wg.z % batches;
    let kbeg = slice * P[6]; let kend = min(P[2], kbeg + P[6]);
    let ka = li % 16u; let ra = li / 16u;
";
    let _ = writeln!(s, "    let row0 = wg.y * {bm}u; let col0 = wg.x * {bn}u;");
    for i in 0..na {
        let o = 16 * i;
        let _ =
            writeln!(s, "    let ar{i} = a_row(z, min(row0 + ra + {o}u, M - 1u)); let aok{i} = row0 + ra + {o}u < M;");
    }
    s += "    var ak = a_k(z, kbeg + ka);\n";
    if kfast {
        for i in 0..nbv {
            let o = 16 * i;
            let _ = writeln!(
                s,
                "    let bc{i} = b_col(z, min(col0 + ra + {o}u, N - 1u)); let bok{i} = col0 + ra + {o}u < N;"
            );
        }
        s += "    var bk = b_k(z, kbeg + ka);\n";
    } else {
        s += "    let cb = li % 64u; let kb = li / 64u;\n";
        for u in 0..nc {
            let o = 64 * u;
            let _ = writeln!(
                s,
                "    let bc{u} = b_col(z, min(col0 + cb + {o}u, N - 1u)); let bok{u} = col0 + cb + {o}u < N;"
            );
        }
        for i in 0..4 {
            let _ = writeln!(s, "    var bk{i} = b_k(z, kbeg + kb + {}u);", 4 * i);
        }
    }
    for i in 0..na {
        let _ = writeln!(s, "    var va{i} = 0.0;");
    }
    for i in 0..nbv {
        let _ = writeln!(s, "    var vb{i} = 0.0;");
    }
    // Loads the slice starting at depth `k` into the registers.
    let load = |s: &mut String, k: &str| {
        let _ = writeln!(s, "    {{ let kin = {k} + ka < kend;");
        for i in 0..na {
            let _ = writeln!(s, "    va{i} = 0.0; if (kin && aok{i}) {{ va{i} = a_val(z, ar{i}, ak); }}");
        }
        if kfast {
            for i in 0..nbv {
                let _ = writeln!(s, "    vb{i} = 0.0; if (kin && bok{i}) {{ vb{i} = b_val(z, bc{i}, bk); }}");
            }
        } else {
            for d in 0..4 {
                let _ = writeln!(s, "    let kok{d} = {k} + kb + {}u < kend;", 4 * d);
                for u in 0..nc {
                    let v = u * 4 + d;
                    let _ = writeln!(s, "    vb{v} = 0.0; if (bok{u} && kok{d}) {{ vb{v} = b_val(z, bc{u}, bk{d}); }}");
                }
            }
        }
        s.push_str("    }\n");
    };
    load(&mut s, "kbeg");
    for i in 0..tm {
        for j in 0..gn {
            let _ = writeln!(s, "    var acc{i}_{j} = vec4<f32>(0.0);");
        }
    }
    s += "    for (var k0 = kbeg; k0 < kend; k0 += 16u) {\n";
    for i in 0..na {
        let _ = writeln!(s, "    As[ka * {sa}u + ra / 4u + {}u][ra % 4u] = va{i};", 4 * i);
    }
    if kfast {
        for i in 0..nbv {
            let _ = writeln!(s, "    Bs[ka * {sb}u + ra / 4u + {}u][ra % 4u] = vb{i};", 4 * i);
        }
    } else {
        for d in 0..4 {
            for u in 0..nc {
                let _ = writeln!(
                    s,
                    "    Bs[(kb + {}u) * {sb}u + cb / 4u + {}u][cb % 4u] = vb{};",
                    4 * d,
                    16 * u,
                    u * 4 + d
                );
            }
        }
    }
    s += "    workgroupBarrier();\n    if (k0 + 16u < kend) {\n    ak = a_next(ak);\n";
    if kfast {
        s += "    bk = b_next(bk);\n";
    } else {
        s += "    bk0 = b_next(bk0); bk1 = b_next(bk1); bk2 = b_next(bk2); bk3 = b_next(bk3);\n";
    }
    load(&mut s, "k0 + 16u");
    s += "    }\n    for (var k = 0u; k < 16u; k += 4u) {\n";
    for kk in 0..4 {
        let _ = writeln!(s, "    {{ let ko = k + {kk}u;");
        for g in 0..gm {
            let _ = writeln!(s, "    let a{g} = As[ko * {sa}u + lid.y + {}u];", g * wy);
        }
        for h in 0..gn {
            let _ = writeln!(s, "    let b{h} = Bs[ko * {sb}u + lid.x + {}u];", h * wx);
        }
        for i in 0..tm {
            let c = ["x", "y", "z", "w"][(i % 4) as usize];
            for j in 0..gn {
                let _ = writeln!(s, "    acc{i}_{j} = fma(vec4<f32>(a{}.{c}), b{j}, acc{i}_{j});", i / 4);
            }
        }
        s += "    }\n";
    }
    s += "    }\n    workgroupBarrier();\n    }\n";
    for h in 0..gn {
        let _ = writeln!(s, "    let c{h} = col0 + 4u * (lid.x + {}u);", h * wx);
        let _ = writeln!(
            s,
            "    let cc{h} = vec4<u32>(c_col(z, min(c{h}, N - 1u)), c_col(z, min(c{h} + 1u, N - 1u)), \
             c_col(z, min(c{h} + 2u, N - 1u)), c_col(z, min(c{h} + 3u, N - 1u)));"
        );
    }
    for i in 0..tm {
        let _ = writeln!(s, "    let r{i} = row0 + 4u * (lid.y + {}u) + {}u;", (i / 4) * wy, i % 4);
        for j in 0..gn {
            let _ = writeln!(s, "    store4(z, slice, r{i}, c{j}, cc{j}, acc{i}_{j});");
        }
    }
    s += "}\n";
    s
}

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
    "fn c_index(z: u32, r: u32, c: u32) -> u32 { return c_row(z, r) + c_col(z, c); }\n",
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
fn c_row(z: u32, r: u32) -> u32 { return r * P[1]; }
fn c_col(z: u32, c: u32) -> u32 { return c; }
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
// Batch z's group, and the first image of its columns (`P[24]` images side by side per batch).
fn z_grp(z: u32) -> u32 { return z % P[21]; }
fn z_img(z: u32) -> u32 { return (z / P[21]) * P[24]; }
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

/// Batch `z` = (images, group); A = W (row: the filter's base), B = X under the im2col view with
/// the batch's images side by side (column `image * oh * ow + p`: the image-and-group base and
/// output pixel p's top-left input position), C = Y, bias per output channel. Depth `(tap, input
/// channel)`. Columns span images so layers with few pixels (ResNet's 4x4 and 8x8 stages) still
/// fill whole tiles.
const CONV_FWD: &str = "
alias ARow = u32; alias AK = vec3<u32>; alias BCol = Pix; alias BK = vec3<u32>;
fn a_row(z: u32, r: u32) -> u32 { return (z_grp(z) * g_kg() + r) * P[2]; }
fn a_k(z: u32, k: u32) -> vec3<u32> { return kd(k, g_cg()); }
fn a_next(s: vec3<u32>) -> vec3<u32> { return kd_next(s, g_cg()); }
fn a_val(z: u32, row: u32, s: vec3<u32>) -> f32 {
    return A[row + s.x * g_kh() * g_kw() + s.y * g_kw() + s.z];
}
fn b_col(z: u32, col: u32) -> Pix {
    let ohw = g_oh() * g_ow();
    let img = z_img(z) + col / ohw; let p = col % ohw;
    let oy = p / g_ow(); let ox = p % g_ow();
    let base = (img * g_c() + z_grp(z) * g_cg()) * g_h() * g_w();
    return Pix(base, i32(oy * P[15]) - i32(P[17]), i32(ox * P[16]) - i32(P[18]));
}
fn b_k(z: u32, k: u32) -> vec3<u32> { return kd(k, g_cg()); }
fn b_next(s: vec3<u32>) -> vec3<u32> { return kd_next(s, g_cg()); }
fn b_val(z: u32, c: Pix, s: vec3<u32>) -> f32 {
    let iy = c.y + i32(s.y * P[19]); let ix = c.x + i32(s.z * P[20]);
    if (iy < 0 || ix < 0 || iy >= i32(g_h()) || ix >= i32(g_w())) { return 0.0; }
    return B[c.base + (s.x * g_h() + u32(iy)) * g_w() + u32(ix)];
}
fn c_row(z: u32, r: u32) -> u32 { return (z_grp(z) * g_kg() + r) * g_oh() * g_ow(); }
fn c_col(z: u32, c: u32) -> u32 {
    let ohw = g_oh() * g_ow();
    return (z_img(z) + c / ohw) * g_k() * ohw + c % ohw;
}
fn bias_index(z: u32, r: u32, c: u32) -> u32 { return z_grp(z) * g_kg() + r; }
";

/// Batch `z` = (images, group); A = W (row: input channel r's filters), B = dY (output-shaped;
/// column `image * h * w + q`: the image-and-group base and input pixel q's padded position), C = dX
/// (input-shaped), bias per input channel (a transposed convolution's forward). Depth
/// `(tap, output channel)`: tap `(i, j)` of output `(oy, ox)` reads input
/// `(oy * sh + i * dh - ph, ...)`, so pixel q gets the outputs whose stride divides its offset.
const CONV_DGRAD: &str = "
alias ARow = u32; alias AK = vec3<u32>; alias BCol = Pix; alias BK = vec3<u32>;
fn a_row(z: u32, r: u32) -> u32 {
    return (z_grp(z) * g_kg() * g_cg() + r) * g_kh() * g_kw();
}
fn a_k(z: u32, k: u32) -> vec3<u32> { return kd(k, g_kg()); }
fn a_next(s: vec3<u32>) -> vec3<u32> { return kd_next(s, g_kg()); }
fn a_val(z: u32, row: u32, s: vec3<u32>) -> f32 {
    return A[row + s.x * g_cg() * g_kh() * g_kw() + s.y * g_kw() + s.z];
}
fn b_col(z: u32, col: u32) -> Pix {
    let hw = g_h() * g_w();
    let img = z_img(z) + col / hw; let q = col % hw;
    let base = (img * g_k() + z_grp(z) * g_kg()) * g_oh() * g_ow();
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
fn c_row(z: u32, r: u32) -> u32 { return (z_grp(z) * g_cg() + r) * g_h() * g_w(); }
fn c_col(z: u32, c: u32) -> u32 {
    let hw = g_h() * g_w();
    return (z_img(z) + c / hw) * g_c() * hw + c % hw;
}
fn bias_index(z: u32, r: u32, c: u32) -> u32 { return z_grp(z) * g_cg() + r; }
";

/// Batch `z` = group; A = dY (output-shaped; row: output channel r's base), B = X under the
/// im2col view (column `ch * kh * kw + tap`, the weight's layout: the channel's base and the
/// tap's offset), C = dW. Depth `(image, output pixel)`, contiguous in both A and B, so B is
/// loaded along the depth; A's state is `(n, p)`, B's `(n, oy, ox)`.
const CONV_WGRAD: &str = "
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
fn c_row(z: u32, r: u32) -> u32 { return (z * g_kg() + r) * P[1]; }
fn c_col(z: u32, c: u32) -> u32 { return c; }
fn bias_index(z: u32, r: u32, c: u32) -> u32 { return 0u; }
";

/// The ways of feeding the core: each one's WGSL (after `BINDINGS`), whether B is loaded along
/// the depth, and its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// A and B by strides, B loaded along columns.
    Strided,
    /// A and B by strides, B loaded along the depth (B = w^T of a dense layer).
    StridedDepth,
    ConvFwd,
    ConvDgrad,
    ConvWgrad,
}

const VARIANTS: [Variant; 5] =
    [Variant::Strided, Variant::StridedDepth, Variant::ConvFwd, Variant::ConvDgrad, Variant::ConvWgrad];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Strided => "strided",
            Variant::StridedDepth => "strided_depth",
            Variant::ConvFwd => "conv_fwd",
            Variant::ConvDgrad => "conv_dgrad",
            Variant::ConvWgrad => "conv_wgrad",
        }
    }
    fn parts(self) -> &'static [&'static str] {
        match self {
            Variant::Strided | Variant::StridedDepth => &[BINDINGS, STRIDED],
            Variant::ConvFwd => &[BINDINGS, CONV_GEOM, CONV_FWD],
            Variant::ConvDgrad => &[BINDINGS, CONV_GEOM, CONV_DGRAD],
            Variant::ConvWgrad => &[BINDINGS, CONV_GEOM, CONV_WGRAD],
        }
    }
    fn kfast(self) -> bool {
        matches!(self, Variant::StridedDepth | Variant::ConvWgrad)
    }
}

/// The kernels of every variant: the core for each tile (`cores[tile]`) and the slice sum.
struct Gemm {
    cores: Vec<Kernel>,
    sum: Kernel,
}

/// Leaks a generated string: the kernels are built once per process and live as long as it.
fn leak(parts: Vec<&'static str>) -> &'static [&'static str] {
    Box::leak(parts.into_boxed_slice())
}

/// The kernels of `v`, generated on first use.
fn kernels(v: Variant) -> &'static Gemm {
    static ALL: std::sync::OnceLock<Vec<Gemm>> = std::sync::OnceLock::new();
    let all = ALL.get_or_init(|| {
        VARIANTS
            .iter()
            .map(|&v| {
                let cores = TILES
                    .iter()
                    .map(|&t| {
                        let name = format!("gemm_{}_{}x{}_{}x{}", v.name(), t.bm(), t.bn(), t.tm, t.tn);
                        let mut parts = v.parts().to_vec();
                        parts.push(Box::leak(core(t, v.kfast()).into_boxed_str()));
                        Kernel { name: Box::leak(name.into_boxed_str()), parts: leak(parts) }
                    })
                    .collect();
                let mut parts = v.parts().to_vec();
                parts.push(CORE_SUM);
                let sum =
                    Kernel { name: Box::leak(format!("gemm_{}_sum", v.name()).into_boxed_str()), parts: leak(parts) };
                Gemm { cores, sum }
            })
            .collect()
    });
    &all[VARIANTS.iter().position(|&x| x == v).unwrap_or(0)]
}

/// Slices of the depth `k` for a launch of `tiles` workgroups: enough to make about `want`
/// workgroups, each slice at least 256 deep (a multiple of 16). Returns (slices, depth of one).
fn split_k(tiles: usize, k: usize, want: usize) -> (usize, usize) {
    let want = (want / tiles.max(1)).min(k / 256).clamp(1, 64);
    let depth = k.div_ceil(want).next_multiple_of(16);
    (k.div_ceil(depth).max(1), depth)
}

/// One GEMM launch: `m x n` outputs over depth `k`, `batches` of them.
#[derive(Clone, Copy, Debug)]
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

/// A launch plan: the tile, the slices of the depth and each slice's depth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Plan {
    tile: Tile,
    slices: usize,
    depth: usize,
}

/// The streaming multiprocessors of the GPU the estimates are for (an H200: 132; the plan only
/// compares tiles, so other GPUs get reasonable, not tuned, choices).
const SMS: usize = 132;

/// Workgroups of tile `t` one SM holds at once (~4 of the 4x4-per-thread tiles, ~2 of 8x8:
/// registers), what split-K aims to fill.
fn resident(t: Tile) -> usize {
    SMS * if t.tm * t.tn >= 64 { 2 } else { 4 }
}

/// Multiply-adds per lane and clock relative to the 8x8 tile: fewer outputs per thread read more
/// workgroup memory and load more per multiply-add.
fn efficiency(t: Tile) -> f64 {
    match t.tm * t.tn {
        64 => 1.0,
        32 => 0.85,
        _ => 0.7,
    }
}

/// The plan of `s` (or of `forced`'s tile): for each tile, the depth split that fills the GPU
/// with about [`resident`] workgroups where the tiles alone do not, then the estimated time in
/// SM clocks: workgroups per SM (rounded up) x a workgroup's padded multiply-adds / (128 lanes x
/// the tile's efficiency), plus the slice sum's traffic (8 bytes per partial value at ~2800 bytes
/// per clock for the whole GPU). The least is taken.
fn plan(s: Shape, forced: Option<Tile>) -> Plan {
    let cost = |t: Tile| {
        let tiles = s.n.div_ceil(t.bn()) * s.m.div_ceil(t.bm()) * s.batches;
        let (slices, depth) = split_k(tiles, s.k, resident(t));
        let per_sm = (tiles * slices).div_ceil(SMS) as f64;
        let mut clocks = per_sm * (t.bm() * t.bn() * depth) as f64 / (128.0 * efficiency(t));
        if slices > 1 {
            clocks += 8.0 * (slices * s.batches * s.m * s.n) as f64 / 2800.0;
        }
        (clocks, Plan { tile: t, slices, depth })
    };
    if let Some(t) = forced {
        return cost(t).1;
    }
    let mut best = cost(TILES[0]);
    for &t in &TILES[1..] {
        let c = cost(t);
        if c.0 < best.0 {
            best = c;
        }
    }
    best.1
}

fn launch(r: &mut Recorder, v: Variant, s: Shape, o: Operands, extra: &[u32]) -> Result<()> {
    let has_bias = o.bias.is_some();
    let bias = match o.bias {
        Some(b) => b,
        None => r.scratch(1),
    };
    let p = plan(s, r.choice().gemm_tile);
    let (t, slices, depth) = (p.tile, p.slices, p.depth);
    let gemm = kernels(v);
    let core = &gemm.cores[TILES.iter().position(|&x| x == t).unwrap_or(0)];
    let part = r.scratch(if slices > 1 { slices * s.batches * s.m * s.n } else { 1 });
    let mut params =
        vec![u(s.m)?, u(s.n)?, u(s.k)?, o.c.accumulate as u32, has_bias as u32, u(slices)?, u(depth)?, u(s.batches)?];
    params.extend_from_slice(extra);
    let groups = [u(s.n.div_ceil(t.bn()))?, u(s.m.div_ceil(t.bm()))?, u(slices * s.batches)?];
    let reads = [o.a, o.b, bias];
    let writes = [Bind::Buf(o.c.buf), part];
    r.dispatch(core, &params, (&reads, &writes), groups)?;
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
    launch(r, Variant::StridedDepth, Shape { m, n, k, batches: 1 }, operands, &[u(k)?, 1, 1, u(k)?])
}

fn linear_backward(r: &mut Recorder, o: &ops::LinearBackward) -> Result<()> {
    let (m, k, n) = (o.m, o.k, o.n);
    if let Some(dx) = o.dx {
        // dx[m, k] = dy[m, n] * w[n, k]
        let operands = Operands { a: Bind::Buf(o.dy), b: Bind::Buf(o.w), bias: None, c: dx };
        launch(r, Variant::Strided, Shape { m, n: k, k: n, batches: 1 }, operands, &[u(n)?, 1, u(k)?, 1])?;
    }
    // dw[n, k] = dy^T[n, m] * x[m, k]
    let operands = Operands { a: Bind::Buf(o.dy), b: Bind::Buf(o.x), bias: None, c: o.dw };
    launch(r, Variant::Strided, Shape { m: n, n: k, k: m, batches: 1 }, operands, &[1, u(n)?, u(k)?, 1])?;
    if let Some(db) = o.db {
        channel_sum(r, (m, n, 1), Bind::Buf(o.dy), db)?;
    }
    Ok(())
}

/// The geometry parameters (`P[8..24]`) and `P[24]`, the images side by side in one batch of the
/// product.
fn geom(g: &ConvGeom, images: usize) -> Result<Vec<u32>> {
    [g.n, g.c, g.h, g.w, g.k, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.groups, g.oh, g.ow, images]
        .iter()
        .map(|&v| u(v))
        .collect()
}

/// Images side by side in the columns of one product over `pixels` per image: all of them,
/// unless the columns would pass the 65535 workgroups a dispatch dimension allows (then one
/// image per batch of the launch).
fn images_per_product(n: usize, pixels: usize) -> usize {
    if (n * pixels).div_ceil(64) <= 65535 { n } else { 1 }
}

/// `y = conv(x, w) (+ b)` into `y`.
fn conv_fwd(r: &mut Recorder, g: &ConvGeom, (x, w, b): (Bind, Bind, Option<Bind>), y: GradOut) -> Result<()> {
    let (cg, kg) = (g.c / g.groups, g.k / g.groups);
    let images = images_per_product(g.n, g.oh * g.ow);
    let shape = Shape { m: kg, n: images * g.oh * g.ow, k: cg * g.kh * g.kw, batches: g.n / images * g.groups };
    launch(r, Variant::ConvFwd, shape, Operands { a: w, b: x, bias: b, c: y }, &geom(g, images)?)
}

/// The input-shaped product `dx = conv^T(dy, w) (+ b)`.
fn conv_dgrad(r: &mut Recorder, g: &ConvGeom, (dy, w, b): (Bind, Bind, Option<Bind>), dx: GradOut) -> Result<()> {
    let (cg, kg) = (g.c / g.groups, g.k / g.groups);
    let images = images_per_product(g.n, g.h * g.w);
    let shape = Shape { m: cg, n: images * g.h * g.w, k: kg * g.kh * g.kw, batches: g.n / images * g.groups };
    launch(r, Variant::ConvDgrad, shape, Operands { a: w, b: dy, bias: b, c: dx }, &geom(g, images)?)
}

/// `dw = dy (output-shaped) x im2col(x) (input-shaped)`.
fn conv_wgrad(r: &mut Recorder, g: &ConvGeom, (dy, x): (Bind, Bind), dw: GradOut) -> Result<()> {
    let (cg, kg) = (g.c / g.groups, g.k / g.groups);
    let shape = Shape { m: kg, n: cg * g.kh * g.kw, k: g.n * g.oh * g.ow, batches: g.groups };
    launch(r, Variant::ConvWgrad, shape, Operands { a: dy, b: x, bias: None, c: dw }, &geom(g, 1)?)
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
