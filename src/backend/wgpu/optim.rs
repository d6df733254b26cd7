//! Optimizer steps, gradient clipping and the finite-step check on wgpu, the formulas of
//! `backend/cpu/optimizer.rs` operation for operation. The learning rate and momentum/beta1 are
//! read from the `hyper` buffer and the step number from a device counter, so a resubmitted step
//! uses what the trainer wrote before it. The scalar coefficients (bias corrections, step sizes)
//! are computed in f32 here where the CPU computes them in f64: they differ by a few f32 ulps.
//!
//! A small kernel advances the step counter (and NAdam's momentum product) unless the guard says
//! skip; then one dispatch per parameter tensor updates it. Global norms are computed without
//! overflow (a running maximum and the sum of squares scaled by it, as LAPACK's `nrm2`), in fixed
//! slots per tensor combined in order by one workgroup, so they are the same every run.

use super::record::{Bind, Kernel, Recorder, f, grid, u, unsupported};
use crate::Result;
use crate::backend::ops::{self, OptRule};

/// `P`: has guard, is NAdam, momentum decay. Skipped steps change nothing.
static OPT_BEGIN: Kernel = Kernel {
    name: "opt_begin",
    parts: &["@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> HYPER: array<f32>;
@group(0) @binding(2) var<storage, read> GUARD: array<f32>;
@group(0) @binding(3) var<storage, read_write> STEP: array<u32>;
@group(0) @binding(4) var<storage, read_write> SCALARS: array<f32>;
@compute @workgroup_size(1)
fn main() {
    if (P[0] != 0u && GUARD[GUARD_SKIP] != 0.0) { return; }
    let lo = STEP[0] + 1u;
    if (lo == 0u) { STEP[1] = STEP[1] + 1u; }
    STEP[0] = lo;
    if (P[1] != 0u) {
        let t = f32(lo) + f32(STEP[1]) * 4294967296.0;
        let mu = HYPER[HYPER_MOMENTUM] * (1.0 - 0.5 * pow(0.96, t * pf(P[2])));
        SCALARS[0] = SCALARS[0] * mu;
    }
}"],
};

/// One parameter tensor's update. `RULE` (a constant pasted before: 0 SGD, 1 Adam, 2 RMSprop,
/// 3 Adagrad, 4 Adadelta, 5 NAdam) selects the code at compile time, one pipeline per rule, so no
/// rule pays for another's registers. `P`: len, rule, has guard, then the rule's constants from
/// `P[3]`.
const OPT_UPDATE: &str = concat!(
    "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> G: array<f32>;
@group(0) @binding(2) var<storage, read> HYPER: array<f32>;
@group(0) @binding(3) var<storage, read> STEP: array<u32>;
@group(0) @binding(4) var<storage, read> GUARD: array<f32>;
@group(0) @binding(5) var<storage, read> SCALARS: array<f32>;
@group(0) @binding(6) var<storage, read_write> W: array<f32>;
@group(0) @binding(7) var<storage, read_write> S0: array<f32>;
@group(0) @binding(8) var<storage, read_write> S1: array<f32>;
@group(0) @binding(9) var<storage, read_write> S2: array<f32>;
fn lerp_(a: f32, b: f32, w: f32) -> f32 {
    if (w < 0.5) { return a + w * (b - a); }
    return b - (b - a) * (1.0 - w);
}
",
    main1d!(),
    r#"    if (i >= P[0]) { return; }
    if (P[2] != 0u && GUARD[GUARD_SKIP] != 0.0) { return; }
    let lr = HYPER[HYPER_LR]; let mom = HYPER[HYPER_MOMENTUM];
    let t = f32(STEP[0]) + f32(STEP[1]) * 4294967296.0;
    var g = G[i];
    var w = W[i];
    switch RULE {
        case 0u: {
            let damp = pf(P[3]); let nesterov = P[4] != 0u; let wd = pf(P[5]);
            var d = g;
            if (wd != 0.0) { d = d + wd * w; }
            if (mom != 0.0) {
                var b = d;
                if (!(STEP[0] == 1u && STEP[1] == 0u)) { b = S0[i] * mom + (1.0 - damp) * d; }
                S0[i] = b;
                d = select(b, d + mom * b, nesterov);
            }
            w = w - lr * d;
        }
        case 1u: {
            let b2 = pf(P[3]); let eps = pf(P[4]); let wd = pf(P[5]);
            let decoupled = P[6] != 0u; let ams = P[7] != 0u;
            let step_size = lr / (1.0 - pow(mom, t));
            let bc2_sqrt = sqrt(1.0 - pow(b2, t));
            if (wd != 0.0) {
                if (decoupled) { w = w * (1.0 - lr * wd); } else { g = g + wd * w; }
            }
            let m = lerp_(S0[i], g, 1.0 - mom);
            let v = S1[i] * b2 + (1.0 - b2) * g * g;
            S0[i] = m;
            S1[i] = v;
            var vm = v;
            if (ams) { vm = max(S2[i], v); S2[i] = vm; }
            let denom = sqrt(vm) / bc2_sqrt + eps;
            w = w - step_size * (m / denom);
        }
        case 2u: {
            let a = pf(P[3]); let eps = pf(P[4]); let wd = pf(P[5]); let centered = P[6] != 0u;
            if (wd != 0.0) { g = g + wd * w; }
            let sq = S0[i] * a + (1.0 - a) * g * g;
            S0[i] = sq;
            var avg = sqrt(sq) + eps;
            if (centered) {
                let ga = lerp_(S2[i], g, 1.0 - a);
                S2[i] = ga;
                avg = sqrt(sq - ga * ga) + eps;
            }
            if (mom > 0.0) {
                let b = S1[i] * mom + g / avg;
                S1[i] = b;
                w = w - lr * b;
            } else {
                w = w - lr * (g / avg);
            }
        }
        case 3u: {
            let clr = lr / (1.0 + (t - 1.0) * pf(P[3]));
            let eps = pf(P[4]); let wd = pf(P[5]);
            if (wd != 0.0) { g = g + wd * w; }
            let s = S0[i] + g * g;
            S0[i] = s;
            w = w - clr * (g / (sqrt(s) + eps));
        }
        case 4u: {
            let r = pf(P[3]); let eps = pf(P[4]); let wd = pf(P[5]);
            if (wd != 0.0) { g = g + wd * w; }
            let sq = S0[i] * r + (1.0 - r) * g * g;
            S0[i] = sq;
            let delta = sqrt(S1[i] + eps) / sqrt(sq + eps) * g;
            S1[i] = S1[i] * r + (1.0 - r) * delta * delta;
            w = w - lr * delta;
        }
        default: {
            let b2 = pf(P[3]); let eps = pf(P[4]); let wd = pf(P[5]); let md = pf(P[6]);
            let mu = mom * (1.0 - 0.5 * pow(0.96, t * md));
            let mu_next = mom * (1.0 - 0.5 * pow(0.96, (t + 1.0) * md));
            let prod = SCALARS[0];
            let c_grad = -lr * (1.0 - mu) / (1.0 - prod);
            let c_avg = -lr * mu_next / (1.0 - prod * mu_next);
            let bc2 = 1.0 - pow(b2, t);
            if (wd != 0.0) { g = g + wd * w; }
            let m = lerp_(S0[i], g, 1.0 - mom);
            let v = S1[i] * b2 + (1.0 - b2) * g * g;
            S0[i] = m;
            S1[i] = v;
            let denom = sqrt(v / bc2) + eps;
            w = w + c_grad * (g / denom);
            w = w + c_avg * (m / denom);
        }
    }
    W[i] = w;
}"#
);

/// [`OPT_UPDATE`] for each rule, by its code.
static OPT_UPDATES: [Kernel; 6] = [
    Kernel { name: "opt_update_sgd", parts: &["const RULE: u32 = 0u;\n", OPT_UPDATE] },
    Kernel { name: "opt_update_adam", parts: &["const RULE: u32 = 1u;\n", OPT_UPDATE] },
    Kernel { name: "opt_update_rmsprop", parts: &["const RULE: u32 = 2u;\n", OPT_UPDATE] },
    Kernel { name: "opt_update_adagrad", parts: &["const RULE: u32 = 3u;\n", OPT_UPDATE] },
    Kernel { name: "opt_update_adadelta", parts: &["const RULE: u32 = 4u;\n", OPT_UPDATE] },
    Kernel { name: "opt_update_nadam", parts: &["const RULE: u32 = 5u;\n", OPT_UPDATE] },
];

/// The rule's code and constants (`P[3..]` of `opt_update`), and whether it is NAdam with its
/// momentum decay.
fn rule_params(rule: OptRule) -> (u32, Vec<u32>) {
    match rule {
        OptRule::Sgd { dampening, nesterov, weight_decay } => (0, vec![f(dampening), nesterov as u32, f(weight_decay)]),
        OptRule::Adam { beta2, eps, weight_decay, decoupled, amsgrad } => {
            (1, vec![f(beta2), f(eps), f(weight_decay), decoupled as u32, amsgrad as u32])
        }
        OptRule::RmsProp { alpha, eps, weight_decay, centered } => {
            (2, vec![f(alpha), f(eps), f(weight_decay), centered as u32])
        }
        OptRule::Adagrad { lr_decay, eps, weight_decay } => (3, vec![f(lr_decay), f(eps), f(weight_decay)]),
        OptRule::Adadelta { rho, eps, weight_decay } => (4, vec![f(rho), f(eps), f(weight_decay)]),
        OptRule::NAdam { beta2, eps, weight_decay, momentum_decay } => {
            (5, vec![f(beta2), f(eps), f(weight_decay), f(momentum_decay)])
        }
    }
}

fn optimizer_step(r: &mut Recorder, o: &ops::OptimizerStep) -> Result<()> {
    let guard = match o.guard {
        Some(g) => Bind::Buf(g),
        None => r.scratch(1),
    };
    let has_guard = o.guard.is_some() as u32;
    let md = match o.rule {
        OptRule::NAdam { momentum_decay, .. } => Some(momentum_decay),
        _ => None,
    };
    let begin = [has_guard, md.is_some() as u32, f(md.unwrap_or(0.0))];
    let reads = [Bind::Buf(o.hyper), guard.clone()];
    r.dispatch(&OPT_BEGIN, &begin, (&reads, &[Bind::Counter(o.step), Bind::Buf(o.scalars)]), [1, 1, 1])?;
    let (code, consts) = rule_params(o.rule);
    for p in &o.params {
        let mut params = vec![u(p.len)?, code, has_guard];
        params.extend_from_slice(&consts);
        let reads = [Bind::Buf(p.grad), Bind::Buf(o.hyper), Bind::Counter(o.step), guard.clone(), Bind::Buf(o.scalars)];
        let mut writes = vec![Bind::Buf(p.value)];
        writes.extend(p.state.iter().map(|s| Bind::Buf(*s)));
        // The rules' state order: RMSprop keeps [square average, momentum, gradient average].
        while writes.len() < 4 {
            writes.push(r.scratch(1));
        }
        r.dispatch(&OPT_UPDATES[code as usize], &params, (&reads, &writes), grid(p.len))?;
    }
    Ok(())
}

/// The running (maximum, scaled sum of squares, non-finite flag) of a norm, and their merge.
const NORM_FNS: &str = "
// x: (m, s, flag, 0): the norm is m * sqrt(s); flag 1: an infinity was seen, 2: a NaN.
fn norm_add(a: vec4<f32>, v: f32) -> vec4<f32> {
    var r = a;
    if (is_nan(v)) { r.z = 2.0; return r; }
    if (!is_finite(v)) { r.z = max(r.z, 1.0); return r; }
    let x = abs(v);
    if (x > r.x) { let q = r.x / x; r.y = r.y * q * q + 1.0; r.x = x; }
    else if (x > 0.0) { let q = x / r.x; r.y = r.y + q * q; }
    return r;
}
fn ratio2(x: f32, m: f32) -> f32 {
    if (x == m) { return 1.0; }
    let q = x / m;
    return q * q;
}
fn norm_merge(a: vec4<f32>, b: vec4<f32>) -> vec4<f32> {
    let m = max(a.x, b.x);
    var s = a.y + b.y;
    if (m > 0.0) { s = a.y * ratio2(a.x, m) + b.y * ratio2(b.x, m); }
    return vec4<f32>(m, s, max(a.z, b.z), 0.0);
}
fn norm_value(a: vec4<f32>) -> f32 {
    if (a.z == 2.0) { return bitcast<f32>(0x7fc00000u); }
    if (a.z == 1.0) { return bitcast<f32>(0x7f800000u); }
    return a.x * sqrt(a.y);
}
var<workgroup> NSH: array<vec4<f32>, 256>;
fn norm_reduce(v: vec4<f32>, li: u32) -> vec4<f32> {
    NSH[li] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s >> 1u) {
        if (li < s) { NSH[li] = norm_merge(NSH[li], NSH[li + s]); }
        workgroupBarrier();
    }
    return NSH[0];
}
";

/// Partial norms of one tensor: workgroup `w` of `P[2]` takes values `[w * P[1], (w + 1) * P[1])`
/// of `P[0]` and writes slot `P[3] + w`.
static NORM_PARTIAL: Kernel = Kernel {
    name: "norm_partial",
    parts: &[
        NORM_FNS,
        "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> SLOTS: array<vec4<f32>>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let start = wg.x * P[1];
    let end = min(start + P[1], P[0]);
    var a = vec4<f32>(0.0);
    for (var e = start + li; e < end; e += 256u) { a = norm_add(a, X[e]); }
    let r = norm_reduce(a, li);
    if (li == 0u) { SLOTS[P[3] + wg.x] = r; }
}",
    ],
};

/// Merges `P[0]` slots in order into the norm, written to `NORM[0]`.
static NORM_FINAL: Kernel = Kernel {
    name: "norm_final",
    parts: &[
        NORM_FNS,
        "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> SLOTS: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> NORM: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) li: u32) {
    var a = vec4<f32>(0.0);
    for (var e = li; e < P[0]; e += 256u) { a = norm_merge(a, SLOTS[e]); }
    let r = norm_reduce(a, li);
    if (li == 0u) { NORM[0] = norm_value(r); }
}",
    ],
};

/// Values per workgroup of [`NORM_PARTIAL`]: 16 per thread, so a large tensor spreads over
/// thousands of workgroups (the whole GPU) rather than a few long serial loops; the final merge
/// reads one slot per workgroup.
fn chunk(_len: usize) -> usize {
    4096
}

/// The global L2 norm of `grads` into `norm[0]`.
fn global_norm(r: &mut Recorder, grads: &[(ops::BufId, usize)], norm: &Bind) -> Result<()> {
    let total: usize = grads.iter().map(|(_, n)| n.div_ceil(chunk(*n)).max(1)).sum();
    let slots = r.scratch(4 * total.max(1));
    let mut at = 0;
    for (b, n) in grads {
        let c = chunk(*n);
        let w = n.div_ceil(c).max(1);
        let params = [u(*n)?, u(c)?, u(w)?, u(at)?];
        r.dispatch(&NORM_PARTIAL, &params, (&[Bind::Buf(*b)], std::slice::from_ref(&slots)), [u(w)?, 1, 1])?;
        at += w;
    }
    r.dispatch(&NORM_FINAL, &[u(total)?], (&[slots], std::slice::from_ref(norm)), [1, 1, 1])
}

/// `G *= min(max_norm / (norm + 1e-6), 1)`. `P`: len, max norm.
static CLIP_SCALE: Kernel = Kernel {
    name: "clip_scale",
    parts: &[concat!(
        "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> NORM: array<f32>;
@group(0) @binding(2) var<storage, read_write> G: array<f32>;
",
        main1d!(),
        "    if (i >= P[0]) { return; }
    let coef = min(pf(P[1]) / (NORM[0] + 1e-6), 1.0);
    G[i] = G[i] * coef;
}"
    )],
};

fn clip_grad_norm(r: &mut Recorder, o: &ops::ClipGradNorm) -> Result<()> {
    let norm = Bind::Buf(o.norm);
    global_norm(r, &o.grads, &norm)?;
    for (b, n) in &o.grads {
        r.dispatch(&CLIP_SCALE, &[u(*n)?, f(o.max_norm)], (std::slice::from_ref(&norm), &[Bind::Buf(*b)]), grid(*n))?;
    }
    Ok(())
}

static CLIP_VALUE: Kernel = Kernel {
    name: "clip_value",
    parts: &[concat!(
        "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read_write> G: array<f32>;
",
        main1d!(),
        "    if (i >= P[0]) { return; }
    let v = G[i];
    let hi = pf(P[1]);
    if (v < -hi) { G[i] = -hi; } else if (v > hi) { G[i] = hi; }
}"
    )],
};

fn clip_grad_value(r: &mut Recorder, o: &ops::ClipGradValue) -> Result<()> {
    for (b, n) in &o.grads {
        r.dispatch(&CLIP_VALUE, &[u(*n)?, f(o.clip)], (&[], &[Bind::Buf(*b)]), grid(*n))?;
    }
    Ok(())
}

/// The guard update of `CheckFinite` (the CPU's `check_finite`). `P`: sticky.
static CHECK_FINITE: Kernel = Kernel {
    name: "check_finite",
    parts: &["@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> STATS: array<f32>;
@group(0) @binding(2) var<storage, read> NORM: array<f32>;
@group(0) @binding(3) var<storage, read_write> GUARD: array<f32>;
@compute @workgroup_size(1)
fn main() {
    let loss = STATS[STATS_LOSS];
    let norm = NORM[0];
    let bad_loss = !is_finite(loss);
    let bad_norm = !is_finite(norm);
    let bad = bad_loss || bad_norm;
    let stuck = P[0] != 0u && GUARD[GUARD_FIRST_BAD] != 0.0;
    if (bad && GUARD[GUARD_FIRST_BAD] == 0.0) {
        GUARD[GUARD_FIRST_BAD] = GUARD[GUARD_CHECKED] + 1.0;
        GUARD[GUARD_WHAT] = select(0.0, 1.0, bad_loss) + select(0.0, 2.0, bad_norm);
        GUARD[GUARD_LOSS] = loss;
        GUARD[GUARD_NORM] = norm;
    }
    if (bad) { GUARD[GUARD_BAD_STEPS] = GUARD[GUARD_BAD_STEPS] + 1.0; }
    GUARD[GUARD_CHECKED] = GUARD[GUARD_CHECKED] + 1.0;
    GUARD[GUARD_SKIP] = select(0.0, 1.0, bad || stuck);
}"],
};

/// Refused: the backend joins no data-parallel group.
fn all_reduce(_: &mut Recorder, o: &ops::AllReduce) -> Result<()> {
    Err(unsupported(o, "the wgpu backend has no data-parallel group"))
}

fn check_finite(r: &mut Recorder, o: &ops::CheckFinite) -> Result<()> {
    let norm = r.scratch(1);
    global_norm(r, &o.grads, &norm)?;
    let reads = [Bind::Buf(o.stats), norm];
    r.dispatch(&CHECK_FINITE, &[o.sticky as u32], (&reads, &[Bind::Buf(o.guard)]), [1, 1, 1])
}

runs! {
    OptimizerStep => optimizer_step,
    ClipGradNorm => clip_grad_norm,
    ClipGradValue => clip_grad_value,
    CheckFinite => check_finite,
    AllReduce => all_reduce,
}
