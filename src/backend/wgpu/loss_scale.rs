//! Dynamic loss scaling on wgpu ([`ops::ScaleLoss`], [`ops::UnscaleGrads`]), the CPU's formulas
//! (`backend/cpu/loss_scale.rs`, PyTorch's `GradScaler`) operation for operation. The found-inf
//! flag is an atomic word of the recorded list, set by any invocation that meets inf or NaN
//! and cleared by the update kernel that reads it, so a resubmitted list starts clean.

use super::record::{Bind, Kernel, Recorder, f, grid, u};
use crate::Result;
use crate::backend::ops;

/// `G *= S[SCALE]`. `P`: len.
static SCALE_LOSS: Kernel = Kernel {
    name: "scale_loss",
    parts: &[concat!(
        "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> S: array<f32>;
@group(0) @binding(2) var<storage, read_write> G: array<f32>;
",
        main1d!(),
        "    if (i >= P[0]) { return; }
    G[i] = G[i] * S[SCALER_SCALE];
}"
    )],
};

/// `G *= 1 / S[SCALE]`, inf or NaN in `G` setting `FLAG`. `P`: len. The reciprocal is taken in
/// f32 (WGSL has no f64; the CPU and CUDA take it in f64 as PyTorch): the same value for the
/// powers of two the scale is unless its initial value was set otherwise.
static UNSCALE: Kernel = Kernel {
    name: "unscale_grads",
    parts: &[concat!(
        "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> S: array<f32>;
@group(0) @binding(2) var<storage, read_write> G: array<f32>;
@group(0) @binding(3) var<storage, read_write> FLAG: array<atomic<u32>>;
",
        main1d!(),
        "    if (i >= P[0]) { return; }
    let v = G[i];
    if (!is_finite(v)) { atomicStore(&FLAG[0], 1u); }
    G[i] = v * (1.0 / S[SCALER_SCALE]);
}"
    )],
};

/// One invocation: the scale update, the skipped count and the guard's skip flag. `P`: growth
/// interval, growth factor, backoff factor, merge.
static UPDATE: Kernel = Kernel {
    name: "scaler_update",
    parts: &["@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read_write> S: array<f32>;
@group(0) @binding(2) var<storage, read_write> GUARD: array<f32>;
@group(0) @binding(3) var<storage, read_write> FLAG: array<atomic<u32>>;
@compute @workgroup_size(1)
fn main() {
    let found = atomicLoad(&FLAG[0]) != 0u;
    atomicStore(&FLAG[0], 0u);
    if (found) {
        S[SCALER_SCALE] = S[SCALER_SCALE] * pf(P[2]);
        S[SCALER_GOOD_STEPS] = 0.0;
        S[SCALER_SKIPPED] = S[SCALER_SKIPPED] + 1.0;
    } else {
        let good = S[SCALER_GOOD_STEPS] + 1.0;
        if (good >= f32(P[0])) {
            let grown = S[SCALER_SCALE] * pf(P[1]);
            if (is_finite(grown)) { S[SCALER_SCALE] = grown; }
            S[SCALER_GOOD_STEPS] = 0.0;
        } else {
            S[SCALER_GOOD_STEPS] = good;
        }
    }
    S[SCALER_FOUND_INF] = 0.0;
    let keep = P[3] != 0u && GUARD[GUARD_SKIP] != 0.0;
    GUARD[GUARD_SKIP] = select(0.0, 1.0, found || keep);
}"],
};

fn scale_loss(r: &mut Recorder, o: &ops::ScaleLoss) -> Result<()> {
    r.dispatch(&SCALE_LOSS, &[u(o.len)?], (&[Bind::Buf(o.scale)], &[Bind::Buf(o.buf)]), grid(o.len))
}

fn unscale_grads(r: &mut Recorder, o: &ops::UnscaleGrads) -> Result<()> {
    let flag = r.scratch(1);
    for &(g, n) in &o.grads {
        r.dispatch(&UNSCALE, &[u(n)?], (&[Bind::Buf(o.scale)], &[Bind::Buf(g), flag.clone()]), grid(n))?;
    }
    let params = [o.growth_interval, f(o.growth_factor), f(o.backoff_factor), o.merge_skip as u32];
    r.dispatch(&UPDATE, &params, (&[], &[Bind::Buf(o.scale), Bind::Buf(o.guard), flag]), [1, 1, 1])
}

runs! {
    ScaleLoss => scale_loss,
    UnscaleGrads => unscale_grads,
}
