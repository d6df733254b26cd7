//! Batch norm, group norm and per-channel sums on wgpu (the formulas of
//! `backend/cpu/{batch_norm,group_norm}.rs`, in f32).
//!
//! Reductions over a set (a channel, or a sample's group) are split into segments of at least
//! 2048 values where a few sets of many values would leave the GPU idle (batch norm over a
//! channel of 64 images): about 1024 256-thread workgroups in all, workgroup `(set, segment)`
//! summing its segment in a fixed order (thread `t` takes values `t, t + 256, ...`, four
//! independent partial sums so four loads are in flight, added in a fixed order), then the
//! workgroup's partial sums in a fixed tree; a second pass combines each set's segments in order,
//! one thread per set. Results are the same every run. The statistics use two passes per
//! segment (the mean, then the squared deviations from it, as the CPU does over the whole set),
//! and the segments' (mean, squared deviations) are combined with Chan's formula. Batch norm and
//! group norm share the kernels: a set's values and a value's statistics are found by strides
//! given as parameters.
//!
//! The workgroup's tree: through workgroup memory (`super::REDUCE`), or, where the device has
//! subgroup operations and the choice allows them (`tuning`), `subgroupAdd` within each
//! subgroup and the subgroups' sums added in subgroup order.

use super::REDUCE;
use super::elementwise::{ACT_FNS, act_code};
use super::record::{Bind, Kernel, Recorder, f, grid, u, unsupported};
use crate::Result;
use crate::backend::ops::{self, ActFn, GradOut};

/// The fused activation (`exec/fuse.rs`) in WGSL: `fused_act(code, a, v)` applies activation
/// `code - 1` (elementwise.rs's codes; 0: none), `fused_grad(code, a, z, d)` multiplies the
/// gradient `d` of the activated output by the derivative from that output `z` (`deriv` with
/// `z` for both its input and output: for the fusable functions the branches on the input's
/// sign are the same on the output's, as `backend/cpu/activation.rs` says).
const FUSED_ACT: &str = "
fn fused_act(code: u32, a: f32, v: f32) -> f32 {
    if (code == 0u) { return v; }
    return act(code - 1u, a, v);
}
fn fused_grad(code: u32, a: f32, z: f32, d: f32) -> f32 {
    if (code == 0u) { return d; }
    return deriv(code - 1u, a, z, z) * d;
}
";

/// A fused activation's kernel parameters: code + 1 (0 for none) and its constant's bits.
fn fused(op: &str, act: Option<ActFn>) -> Result<[u32; 2]> {
    match act {
        None => Ok([0, 0]),
        Some(fun) if fun.derivative_from_output() => {
            let (code, a) = act_code(fun);
            Ok([code + 1, f(a)])
        }
        Some(fun) => Err(crate::Error::State(format!("{op}: {fun:?} cannot be fused into batch norm"))),
    }
}

/// Workgroup counts for one workgroup per set, `segs` per set along z.
fn per_set(sets: usize, segs: usize) -> Result<[u32; 3]> {
    let x = sets.clamp(1, 65535);
    Ok([u(x)?, u(sets.div_ceil(x))?, u(segs.max(1))?])
}

/// Segments of a set of `count` values among `sets`: about 1024 workgroups in all, each segment
/// at least 2048 values and a multiple of 1024. Returns (segments, segment length).
fn segments(sets: usize, count: usize) -> (usize, usize) {
    let want = 1024usize.div_ceil(sets.max(1)).min(count / 2048).max(1);
    let len = count.div_ceil(want).next_multiple_of(1024).max(1024);
    (count.div_ceil(len).max(1), len)
}

/// The opening of a reduction kernel without subgroup operations: 256 threads, `grp` the
/// workgroup's set (x and y), `seg` its segment (z); `SH` holds the tree of `REDUCE`.
const HEAD: &str = "var<workgroup> SH: array<f32, 256>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let grp = wg.x + wg.y * nwg.x; let seg = wg.z;
";

/// [`HEAD`] with subgroup operations: the subgroup's id, count and lane for [`REDUCE_SG`].
const HEAD_SG: &str = "var<workgroup> SH: array<f32, 256>;
var<private> SG_ID: u32;
var<private> SG_COUNT: u32;
var<private> SG_LANE: u32;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg_id: u32,
        @builtin(num_subgroups) sg_count: u32, @builtin(subgroup_invocation_id) sg_lane: u32) {
    SG_ID = sg_id; SG_COUNT = sg_count; SG_LANE = sg_lane;
    let grp = wg.x + wg.y * nwg.x; let seg = wg.z;
";

/// `reduce(v, li)` with subgroup operations: each subgroup's sum (`subgroupAdd`), then the
/// subgroups' sums added in subgroup order by every thread. Every thread must call it.
const REDUCE_SG: &str = "
fn reduce(v: f32, li: u32) -> f32 {
    let s = subgroupAdd(v);
    workgroupBarrier();
    if (SG_LANE == 0u) { SH[SG_ID] = s; }
    workgroupBarrier();
    var t = 0.0;
    for (var i = 0u; i < SG_COUNT; i++) { t = t + SH[i]; }
    workgroupBarrier();
    return t;
}
";

/// A reduction kernel in both forms: the workgroup tree through workgroup memory, and with
/// subgroup operations (used where the device has them and the choice allows).
struct Reduction {
    plain: Kernel,
    sg: Kernel,
}

impl Reduction {
    fn pick(&'static self, r: &Recorder) -> &'static Kernel {
        if r.choice().subgroups { &self.sg } else { &self.plain }
    }
}

/// A [`Reduction`] named `$name` (and `$name` + `_sg`) from the parts before the opening
/// (bindings, helpers) and its body.
macro_rules! reduction {
    ($name:literal, [$($pre:expr),*], $body:expr) => {
        Reduction {
            plain: Kernel { name: $name, parts: &[REDUCE, $($pre,)* HEAD, $body] },
            sg: Kernel { name: concat!($name, "_sg"), parts: &[REDUCE_SG, $($pre,)* HEAD_SG, $body] },
        }
    };
}

/// Set `grp`'s value `e`: `X[grp * P[3] + (e / P[1]) * P[2] + e % P[1]]` (`P[0]` values).
const SET_INDEX: &str = "
fn set_index(grp: u32, e: u32) -> u32 { return grp * P[3] + (e / P[1]) * P[2] + e % P[1]; }
";

/// Per (set, segment): the segment's mean and the sum of squared deviations from it, into
/// `PART[2 (set * segs + seg) ..]`. `P`: count, inner, stride, base, eps, has running, momentum,
/// sets, segs, segment length.
static NORM_STATS: Reduction = reduction!(
    "norm_stats",
    [
        "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> PART: array<f32>;
",
        SET_INDEX
    ],
    "    let live = grp < P[7];
    let start = seg * P[9];
    var end = min(P[0], start + P[9]);
    if (!live) { end = start; }
    let cnt = max(f32(end - start), 1.0);
    var s0 = 0.0; var s1 = 0.0; var s2 = 0.0; var s3 = 0.0;
    var e = start + li;
    for (; e + 768u < end; e += 1024u) {
        s0 = s0 + X[set_index(grp, e)];
        s1 = s1 + X[set_index(grp, e + 256u)];
        s2 = s2 + X[set_index(grp, e + 512u)];
        s3 = s3 + X[set_index(grp, e + 768u)];
    }
    for (; e < end; e += 256u) { s0 = s0 + X[set_index(grp, e)]; }
    let mu = reduce((s0 + s1) + (s2 + s3), li) / cnt;
    s0 = 0.0; s1 = 0.0; s2 = 0.0; s3 = 0.0;
    e = start + li;
    for (; e + 768u < end; e += 1024u) {
        let d0 = X[set_index(grp, e)] - mu;
        let d1 = X[set_index(grp, e + 256u)] - mu;
        let d2 = X[set_index(grp, e + 512u)] - mu;
        let d3 = X[set_index(grp, e + 768u)] - mu;
        s0 = s0 + d0 * d0; s1 = s1 + d1 * d1; s2 = s2 + d2 * d2; s3 = s3 + d3 * d3;
    }
    for (; e < end; e += 256u) { let d = X[set_index(grp, e)] - mu; s0 = s0 + d * d; }
    let m2 = reduce((s0 + s1) + (s2 + s3), li);
    if (live && li == 0u) {
        let o = 2u * (grp * P[8] + seg);
        PART[o] = mu;
        PART[o + 1u] = m2;
    }
}"
);

/// Per set, one thread: the segments of [`NORM_STATS`] combined in order (Chan's formula for
/// the squared deviations of a union), then the mean, `1 / sqrt(var + eps)` and the running
/// statistics. `P` as [`NORM_STATS`].
static NORM_STATS_FINAL: Kernel = Kernel {
    name: "norm_stats_final",
    parts: &[concat!(
        "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> PART: array<f32>;
@group(0) @binding(2) var<storage, read_write> MEAN: array<f32>;
@group(0) @binding(3) var<storage, read_write> INVSTD: array<f32>;
@group(0) @binding(4) var<storage, read_write> RM: array<f32>;
@group(0) @binding(5) var<storage, read_write> RV: array<f32>;
",
        main1d!(),
        "    if (i >= P[7]) { return; }
    let count = P[0]; let segs = P[8]; let len = P[9];
    var n = 0.0; var mu = 0.0; var m2 = 0.0;
    for (var s = 0u; s < segs; s++) {
        let nb = f32(min(count, (s + 1u) * len) - s * len);
        let o = 2u * (i * segs + s);
        let tot = n + nb;
        let d = PART[o] - mu;
        mu = mu + d * (nb / tot);
        m2 = m2 + PART[o + 1u] + d * d * (n * nb / tot);
        n = tot;
    }
    let v = m2 / f32(count);
    MEAN[i] = mu;
    INVSTD[i] = 1.0 / sqrt(v + pf(P[4]));
    if (P[5] != 0u) {
        let m = pf(P[6]);
        let unbias = select(1.0, n / (n - 1.0), count > 1u);
        RM[i] = (1.0 - m) * RM[i] + m * mu;
        RV[i] = (1.0 - m) * RV[i] + m * v * unbias;
    }
}"
    )],
};

/// `y = x * scale + shift` with the value's channel `(i / hw) % c` and statistics index
/// `(i / P[3]) % P[4]`, then the fused activation. `P`: len, hw, c, stat div, stat mod, has
/// gamma, has beta, mode (0: batch statistics `S1` = mean, `S2` = invstd; 1: running `S1` =
/// mean, `S2` = variance), eps, fused activation code, its constant.
static NORM_APPLY: Kernel = Kernel {
    name: "norm_apply",
    parts: &[
        ACT_FNS,
        FUSED_ACT,
        concat!(
            "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> GAMMA: array<f32>;
@group(0) @binding(3) var<storage, read> BETA: array<f32>;
@group(0) @binding(4) var<storage, read> S1: array<f32>;
@group(0) @binding(5) var<storage, read> S2: array<f32>;
@group(0) @binding(6) var<storage, read_write> Y: array<f32>;
",
            main1d!(),
            "    if (i >= P[0]) { return; }
    let ch = (i / P[1]) % P[2];
    let st = (i / P[3]) % P[4];
    var gm = 1.0;
    if (P[5] != 0u) { gm = GAMMA[ch]; }
    var bt = 0.0;
    if (P[6] != 0u) { bt = BETA[ch]; }
    var scale = 0.0;
    if (P[7] == 0u) { scale = gm * S2[st]; } else { scale = gm / sqrt(S2[st] + pf(P[8])); }
    let shift = bt - S1[st] * scale;
    Y[i] = fused_act(P[9], pf(P[10]), X[i] * scale + shift);
}"
        ),
    ],
};

/// Per (channel, segment): `sum(dy)` and `sum(dy * xhat)` over the segment's samples and
/// positions, into `PART[2 (ch * segs + seg) ..]`, `dy` through the fused activation's
/// derivative (its output `Z`). `P`: n * hw, hw, c, stat div, stat mod, has dgamma, accumulate
/// dgamma, has dbeta, accumulate dbeta, segs, segment length, fused activation code, constant.
static NORM_PARAM_SUMS: Reduction = reduction!(
    "norm_param_sums",
    [
        ACT_FNS,
        FUSED_ACT,
        "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> MEAN: array<f32>;
@group(0) @binding(3) var<storage, read> INVSTD: array<f32>;
@group(0) @binding(4) var<storage, read> DY: array<f32>;
@group(0) @binding(5) var<storage, read> Z: array<f32>;
@group(0) @binding(6) var<storage, read_write> PART: array<f32>;
fn term(ch: u32, e: u32) -> vec2<f32> {
    let idx = ((e / P[1]) * P[2] + ch) * P[1] + e % P[1];
    let st = (idx / P[3]) % P[4];
    var d = DY[idx];
    if (P[11] != 0u) { d = fused_grad(P[11], pf(P[12]), Z[idx], d); }
    return vec2<f32>(d, d * ((X[idx] - MEAN[st]) * INVSTD[st]));
}
"
    ],
    "    let live = grp < P[2];
    let start = seg * P[10];
    var end = min(P[0], start + P[10]);
    if (!live) { end = start; }
    var t0 = vec2<f32>(0.0); var t1 = vec2<f32>(0.0); var t2 = vec2<f32>(0.0); var t3 = vec2<f32>(0.0);
    var e = start + li;
    for (; e + 768u < end; e += 1024u) {
        t0 = t0 + term(grp, e);
        t1 = t1 + term(grp, e + 256u);
        t2 = t2 + term(grp, e + 512u);
        t3 = t3 + term(grp, e + 768u);
    }
    for (; e < end; e += 256u) { t0 = t0 + term(grp, e); }
    let t = (t0 + t1) + (t2 + t3);
    let sdy = reduce(t.x, li);
    let sdyx = reduce(t.y, li);
    if (live && li == 0u) {
        let o = 2u * (grp * P[9] + seg);
        PART[o] = sdy;
        PART[o + 1u] = sdyx;
    }
}"
);

/// Per channel, one thread: the segments of [`NORM_PARAM_SUMS`] added in order, into `SUMS`
/// (`sum(dy)`, `sum(dy * xhat)`) and, where wanted, the beta and gamma gradients. `P` as there.
static NORM_PARAM_FINAL: Kernel = Kernel {
    name: "norm_param_final",
    parts: &[concat!(
        "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> PART: array<f32>;
@group(0) @binding(2) var<storage, read_write> SUMS: array<f32>;
@group(0) @binding(3) var<storage, read_write> DGAMMA: array<f32>;
@group(0) @binding(4) var<storage, read_write> DBETA: array<f32>;
",
        main1d!(),
        "    if (i >= P[2]) { return; }
    let segs = P[9];
    var a = 0.0; var b = 0.0;
    for (var s = 0u; s < segs; s++) {
        let o = 2u * (i * segs + s);
        a = a + PART[o];
        b = b + PART[o + 1u];
    }
    SUMS[2u * i] = a;
    SUMS[2u * i + 1u] = b;
    if (P[5] != 0u) { DGAMMA[i] = select(b, DGAMMA[i] + b, P[6] != 0u); }
    if (P[7] != 0u) { DBETA[i] = select(a, DBETA[i] + a, P[8] != 0u); }
}"
    )],
};

/// Batch norm's input gradient from the per-channel sums, `dy` through the fused activation's
/// derivative. `P`: len, hw, c, has gamma, accumulate, count (f32), fused activation code,
/// constant.
static BN_DX: Kernel = Kernel {
    name: "bn_dx",
    parts: &[
        ACT_FNS,
        FUSED_ACT,
        concat!(
            "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> GAMMA: array<f32>;
@group(0) @binding(3) var<storage, read> MEAN: array<f32>;
@group(0) @binding(4) var<storage, read> INVSTD: array<f32>;
@group(0) @binding(5) var<storage, read> DY: array<f32>;
@group(0) @binding(6) var<storage, read> SUMS: array<f32>;
@group(0) @binding(7) var<storage, read> Z: array<f32>;
@group(0) @binding(8) var<storage, read_write> DX: array<f32>;
",
            main1d!(),
            "    if (i >= P[0]) { return; }
    let ch = (i / P[1]) % P[2];
    var gm = 1.0;
    if (P[3] != 0u) { gm = GAMMA[ch]; }
    let is = INVSTD[ch];
    let count = pf(P[5]);
    let xhat = (X[i] - MEAN[ch]) * is;
    var d = DY[i];
    if (P[6] != 0u) { d = fused_grad(P[6], pf(P[7]), Z[i], d); }
    let v = gm * is / count * (count * d - SUMS[2u * ch] - xhat * SUMS[2u * ch + 1u]);
    if (P[4] != 0u) { DX[i] = DX[i] + v; } else { DX[i] = v; }
}"
        ),
    ],
};

/// Group norm's input gradient, one workgroup per (sample, group) of `P[0]` contiguous values.
/// `P`: len, hw, channels per group, groups, has gamma, accumulate, sets.
static GN_DX: Reduction = reduction!(
    "gn_dx",
    ["@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> GAMMA: array<f32>;
@group(0) @binding(3) var<storage, read> MEAN: array<f32>;
@group(0) @binding(4) var<storage, read> INVSTD: array<f32>;
@group(0) @binding(5) var<storage, read> DY: array<f32>;
@group(0) @binding(6) var<storage, read_write> DX: array<f32>;
"],
    "    let live = grp < P[6];
    let len = P[0];
    let c0 = (grp % P[3]) * P[2];
    var mu = 0.0;
    var is = 0.0;
    if (live) { mu = MEAN[grp]; is = INVSTD[grp]; }
    var a = 0.0;
    var b = 0.0;
    if (live) {
        for (var e = li; e < len; e += 256u) {
            var gm = 1.0;
            if (P[4] != 0u) { gm = GAMMA[c0 + e / P[1]]; }
            let d = DY[grp * len + e] * gm;
            a = a + d;
            b = b + d * ((X[grp * len + e] - mu) * is);
        }
    }
    let sd = reduce(a, li);
    let sdx = reduce(b, li);
    if (live) {
        let m = f32(len);
        for (var e = li; e < len; e += 256u) {
            var gm = 1.0;
            if (P[4] != 0u) { gm = GAMMA[c0 + e / P[1]]; }
            let j = grp * len + e;
            let d = DY[j] * gm;
            let v = is / m * (m * d - sd - (X[j] - mu) * is * sdx);
            if (P[5] != 0u) { DX[j] = DX[j] + v; } else { DX[j] = v; }
        }
    }
}"
);

/// Per channel of an `[n, c, hw]` tensor: the sum over samples and positions, in `P[4]`
/// segments of `P[5]` values (a multiple of 256) per channel, so a few channels of many values
/// still fill the GPU: workgroup `(ch, seg)` (channel `x + y * width`, segment `z`) sums its segment in a fixed order (thread `t` takes
/// values `t, t + 256, ...`, then the tree of `REDUCE`); with one segment it stores the channel's
/// sum, with several its partial sum in `PART[ch * segs + seg]` for [`CHANNEL_SUM_FINAL`].
/// Positions are stepped without a division per value. `P`: n * hw, hw, c, accumulate, segs,
/// segment length.
static CHANNEL_SUM: Reduction = reduction!(
    "channel_sum",
    ["@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> OUT: array<f32>;
@group(0) @binding(3) var<storage, read_write> PART: array<f32>;
"],
    "    let ch = grp;
    let count = P[0]; let hw = P[1]; let c = P[2]; let segs = P[4];
    let start = seg * P[5];
    var end = min(count, start + P[5]);
    if (ch >= c) { end = 0u; }
    let q = 256u / hw; let rem = 256u % hw;
    var e = start + li;
    var n = e / hw; var p = e % hw;
    var s = 0.0;
    for (; e < end; e += 256u) {
        s = s + X[(n * c + ch) * hw + p];
        n += q; p += rem;
        if (p >= hw) { p -= hw; n += 1u; }
    }
    let t = reduce(s, li);
    if (li == 0u && ch < c) {
        if (segs > 1u) {
            PART[ch * segs + seg] = t;
        } else if (P[3] != 0u) { OUT[ch] = OUT[ch] + t; } else { OUT[ch] = t; }
    }
}"
);

/// The channels' sums from [`CHANNEL_SUM`]'s segments, added in order, one thread per channel.
static CHANNEL_SUM_FINAL: Kernel = Kernel {
    name: "channel_sum_final",
    parts: &[concat!(
        "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> PART: array<f32>;
@group(0) @binding(2) var<storage, read_write> OUT: array<f32>;
",
        main1d!(),
        "    if (i >= P[2]) { return; }
    let segs = P[4];
    var t = 0.0;
    for (var s = 0u; s < segs; s++) { t = t + PART[i * segs + s]; }
    if (P[3] != 0u) { OUT[i] = OUT[i] + t; } else { OUT[i] = t; }
}"
    )],
};

/// Segments per channel for [`CHANNEL_SUM`]: about 512 workgroups in all, each at least 4096
/// values. Returns (segments, segment length).
fn channel_segments(c: usize, count: usize) -> (usize, usize) {
    let want = 512usize.div_ceil(c.max(1)).min(count / 4096).max(1);
    let len = count.div_ceil(want).next_multiple_of(256).max(256);
    (count.div_ceil(len).max(1), len)
}

/// `out[c] (+)= sum over n and hw of x[n, c, hw]`.
pub(super) fn channel_sum(r: &mut Recorder, (n, c, hw): (usize, usize, usize), x: Bind, out: GradOut) -> Result<()> {
    let count = n * hw;
    let (segs, len) = channel_segments(c, count);
    let params = [u(count)?, u(hw)?, u(c)?, out.accumulate as u32, u(segs)?, u(len)?];
    let part = r.scratch(if segs > 1 { c * segs } else { 1 });
    let k = CHANNEL_SUM.pick(r);
    r.dispatch(k, &params, (&[x], &[Bind::Buf(out.buf), part.clone()]), per_set(c, segs)?)?;
    if segs > 1 {
        r.dispatch(&CHANNEL_SUM_FINAL, &params, (&[part], &[Bind::Buf(out.buf)]), grid(c))?;
    }
    Ok(())
}

fn opt(r: &mut Recorder, b: Option<ops::BufId>) -> Bind {
    match b {
        Some(b) => Bind::Buf(b),
        None => r.scratch(1),
    }
}

/// The stats kernel's parameters, sets and statistics layout for batch norm and group norm.
struct Layout {
    /// count, inner, stride, base of the stats kernel.
    set: [usize; 4],
    sets: usize,
    /// Statistics index `(i / div) % modulo` of value `i`.
    div: usize,
    modulo: usize,
}

fn bn_layout(g: &ops::BnGeom) -> Layout {
    Layout { set: [g.n * g.hw, g.hw, g.c * g.hw, g.hw], sets: g.c, div: g.hw, modulo: g.c }
}

fn gn_layout(g: &ops::GnGeom) -> Layout {
    let len = g.c / g.groups * g.hw;
    Layout { set: [len, len, 0, len], sets: g.n * g.groups, div: len, modulo: g.n * g.groups }
}

/// Statistics, then the normalisation (the train forward of both norms).
fn normalise(
    r: &mut Recorder,
    (l, hw, c, eps): (&Layout, usize, usize, f32),
    (x, gamma, beta, y): (ops::BufId, Option<ops::BufId>, Option<ops::BufId>, ops::BufId),
    (mean, invstd): (ops::BufId, ops::BufId),
    running: Option<(ops::BufId, ops::BufId, f32)>,
    [code, a]: [u32; 2],
) -> Result<()> {
    let (rm, rv, momentum) = match running {
        Some((a, b, m)) => (Bind::Buf(a), Bind::Buf(b), m),
        None => (r.scratch(1), r.scratch(1), 0.0),
    };
    let [count, inner, stride, base] = l.set;
    let (segs, seg_len) = segments(l.sets, count);
    let params = [
        u(count)?,
        u(inner)?,
        u(stride)?,
        u(base)?,
        f(eps),
        running.is_some() as u32,
        f(momentum),
        u(l.sets)?,
        u(segs)?,
        u(seg_len)?,
    ];
    let part = r.scratch(2 * l.sets * segs);
    let k = NORM_STATS.pick(r);
    r.dispatch(k, &params, (&[Bind::Buf(x)], std::slice::from_ref(&part)), per_set(l.sets, segs)?)?;
    let writes = [Bind::Buf(mean), Bind::Buf(invstd), rm, rv];
    r.dispatch(&NORM_STATS_FINAL, &params, (&[part], &writes), grid(l.sets))?;
    let len = count * l.sets;
    let params =
        [u(len)?, u(hw)?, u(c)?, u(l.div)?, u(l.modulo)?, gamma.is_some() as u32, beta.is_some() as u32, 0, 0, code, a];
    let reads = [Bind::Buf(x), opt(r, gamma), opt(r, beta), Bind::Buf(mean), Bind::Buf(invstd)];
    r.dispatch(&NORM_APPLY, &params, (&reads, &[Bind::Buf(y)]), grid(len))
}

fn batch_norm_train(r: &mut Recorder, o: &ops::BatchNormTrain) -> Result<()> {
    if o.sync {
        return Err(unsupported(o, "synchronised batch norm needs a data-parallel group"));
    }
    let g = &o.g;
    let act = fused("batch_norm_train", o.act)?;
    normalise(r, (&bn_layout(g), g.hw, g.c, g.eps), (o.x, o.gamma, o.beta, o.y), (o.mean, o.invstd), o.running, act)
}

fn batch_norm_infer(r: &mut Recorder, o: &ops::BatchNormInfer) -> Result<()> {
    let g = &o.g;
    let len = g.n * g.c * g.hw;
    let [code, a] = fused("batch_norm_infer", o.act)?;
    let (has_gamma, has_beta) = (o.gamma.is_some() as u32, o.beta.is_some() as u32);
    let params = [u(len)?, u(g.hw)?, u(g.c)?, u(g.hw)?, u(g.c)?, has_gamma, has_beta, 1, f(g.eps), code, a];
    let reads = [Bind::Buf(o.x), opt(r, o.gamma), opt(r, o.beta), Bind::Buf(o.running_mean), Bind::Buf(o.running_var)];
    r.dispatch(&NORM_APPLY, &params, (&reads, &[Bind::Buf(o.y)]), grid(len))
}

/// The parameter-gradient sums of both norms; returns the per-channel sums buffer. `act`: the
/// fused activation's output, code and constant (batch norm; `None` for none).
fn param_sums(
    r: &mut Recorder,
    (l, n, c, hw): (&Layout, usize, usize, usize),
    (x, mean, invstd, dy): (ops::BufId, ops::BufId, ops::BufId, ops::BufId),
    act: Option<(ops::BufId, [u32; 2])>,
    (dgamma, dbeta): (Option<GradOut>, Option<GradOut>),
) -> Result<Bind> {
    let sums = r.scratch(2 * c);
    let flag = |d: Option<GradOut>| (d.is_some() as u32, d.is_some_and(|d| d.accumulate) as u32);
    let ((hg, ag), (hb, ab)) = (flag(dgamma), flag(dbeta));
    let (segs, seg_len) = segments(c, n * hw);
    let (z, [code, a]) = act.unwrap_or((dy, [0, 0]));
    let params = [u(n * hw)?, u(hw)?, u(c)?, u(l.div)?, u(l.modulo)?, hg, ag, hb, ab, u(segs)?, u(seg_len)?, code, a];
    let part = r.scratch(2 * c * segs);
    let reads = [Bind::Buf(x), Bind::Buf(mean), Bind::Buf(invstd), Bind::Buf(dy), Bind::Buf(z)];
    let k = NORM_PARAM_SUMS.pick(r);
    r.dispatch(k, &params, (&reads, std::slice::from_ref(&part)), per_set(c, segs)?)?;
    let writes = [sums.clone(), opt(r, dgamma.map(|d| d.buf)), opt(r, dbeta.map(|d| d.buf))];
    r.dispatch(&NORM_PARAM_FINAL, &params, (&[part], &writes), grid(c))?;
    Ok(sums)
}

fn batch_norm_backward(r: &mut Recorder, o: &ops::BatchNormBackward) -> Result<()> {
    if o.sync {
        return Err(unsupported(o, "synchronised batch norm needs a data-parallel group"));
    }
    let g = &o.g;
    let l = bn_layout(g);
    let code = fused("batch_norm_backward", o.act.map(|a| a.f))?;
    let act = o.act.map(|a| (a.y, code));
    let sums = param_sums(r, (&l, g.n, g.c, g.hw), (o.x, o.mean, o.invstd, o.dy), act, (o.dgamma, o.dbeta))?;
    if let Some(dx) = o.dx {
        let len = g.n * g.c * g.hw;
        let count = f((g.n * g.hw) as f32);
        let params =
            [u(len)?, u(g.hw)?, u(g.c)?, o.gamma.is_some() as u32, dx.accumulate as u32, count, code[0], code[1]];
        let gamma = opt(r, o.gamma);
        let z = Bind::Buf(o.act.map_or(o.dy, |a| a.y));
        let reads = [Bind::Buf(o.x), gamma, Bind::Buf(o.mean), Bind::Buf(o.invstd), Bind::Buf(o.dy), sums, z];
        r.dispatch(&BN_DX, &params, (&reads, &[Bind::Buf(dx.buf)]), grid(len))?;
    }
    Ok(())
}

fn group_norm(r: &mut Recorder, o: &ops::GroupNorm) -> Result<()> {
    let g = &o.g;
    normalise(r, (&gn_layout(g), g.hw, g.c, g.eps), (o.x, o.gamma, o.beta, o.y), (o.mean, o.invstd), None, [0, 0])
}

fn group_norm_backward(r: &mut Recorder, o: &ops::GroupNormBackward) -> Result<()> {
    let g = &o.g;
    let l = gn_layout(g);
    if o.dgamma.is_some() || o.dbeta.is_some() {
        param_sums(r, (&l, g.n, g.c, g.hw), (o.x, o.mean, o.invstd, o.dy), None, (o.dgamma, o.dbeta))?;
    }
    if let Some(dx) = o.dx {
        let params = [
            u(l.set[0])?,
            u(g.hw)?,
            u(g.c / g.groups)?,
            u(g.groups)?,
            o.gamma.is_some() as u32,
            dx.accumulate as u32,
            u(l.sets)?,
        ];
        let gamma = opt(r, o.gamma);
        let reads = [Bind::Buf(o.x), gamma, Bind::Buf(o.mean), Bind::Buf(o.invstd), Bind::Buf(o.dy)];
        let k = GN_DX.pick(r);
        r.dispatch(k, &params, (&reads, &[Bind::Buf(dx.buf)]), per_set(l.sets, 1)?)?;
    }
    Ok(())
}

runs! {
    BatchNormTrain => batch_norm_train,
    BatchNormInfer => batch_norm_infer,
    BatchNormBackward => batch_norm_backward,
    GroupNorm => group_norm,
    GroupNormBackward => group_norm_backward,
}
