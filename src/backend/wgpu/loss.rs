//! The loss op on wgpu: every loss and scoring of `backend/cpu/loss.rs` (class labels as u32), in f32, in one
//! 256-thread workgroup. Thread `t` takes samples `t, t + 256, ...`, writes their gradient and
//! sums their loss and scores; the workgroup then adds the partial sums in a fixed tree, so the
//! figures are the same every run. `STATS_*` are `ops::stats`'s offsets (`record::layouts`).

use super::REDUCE;
use super::record::{Bind, Kernel, Recorder, f, u};
use crate::Result;
use crate::backend::ops::{self, LossFn, Scoring};

/// `P`: n, c, loss kind, its parameter (label smoothing or delta), class targets, scoring (0
/// none, 1 arg-max, 2 binary on probabilities, 3 binary on logits), top k, has dpred, grad scale.
static LOSS: Kernel = Kernel {
    name: "loss",
    parts: &[
        REDUCE,
        concat!(
            "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> PRED: array<f32>;
@group(0) @binding(2) var<storage, read> TARGET: array<f32>;
@group(0) @binding(3) var<storage, read> LABELS: array<u32>;
@group(0) @binding(4) var<storage, read_write> STATS: array<f32>;
@group(0) @binding(5) var<storage, read_write> DPRED: array<f32>;
",
            main_reduce!(),
            r#"    let n = P[0]; let c = P[1]; let kind = P[2]; let prm = pf(P[3]);
    let classes = P[4] != 0u;
    let nf = f32(n); let all = f32(n * c);
    let scale = pf(P[8]);
    var total = 0.0;
    var correct = 0.0;
    var correct_k = 0.0;
    for (var i = li; i < n; i += 256u) {
        let row = i * c;
        var label = 0u;
        if (classes) {
            label = LABELS[i];
            // Out of range (the executor refuses those before upload): a NaN loss, as on CUDA.
            if (label >= c) { total = bitcast<f32>(0x7fc00000u); label = 0u; }
        }
        if (kind == 0u) {
            // Softmax cross-entropy with label smoothing.
            var m = bitcast<f32>(0xff800000u);
            for (var j = 0u; j < c; j++) { m = max(m, PRED[row + j]); }
            var se = 0.0;
            for (var j = 0u; j < c; j++) { se = se + exp(PRED[row + j] - m); }
            let lse = m + log(se);
            var qsum = 0.0;
            for (var j = 0u; j < c; j++) {
                var t = 0.0;
                if (classes) { t = select(0.0, 1.0, j == label); } else { t = TARGET[row + j]; }
                qsum = qsum + (t * (1.0 - prm) + prm / f32(c));
            }
            for (var j = 0u; j < c; j++) {
                var t = 0.0;
                if (classes) { t = select(0.0, 1.0, j == label); } else { t = TARGET[row + j]; }
                let q = t * (1.0 - prm) + prm / f32(c);
                let logp = PRED[row + j] - lse;
                total = total - q * logp;
                if (P[7] != 0u) { DPRED[row + j] = (exp(logp) * qsum - q) / nf * scale; }
            }
        } else if (kind == 1u) {
            // Categorical cross-entropy on probabilities.
            for (var j = 0u; j < c; j++) {
                var t = 0.0;
                if (classes) { t = select(0.0, 1.0, j == label); } else { t = TARGET[row + j]; }
                let z = PRED[row + j];
                let p = clamp(z, 1e-7, 1.0 - 1e-7);
                total = total - t * log(p);
                let inside = z > 1e-7 && z < 1.0 - 1e-7;
                if (P[7] != 0u) { DPRED[row + j] = select(0.0, -t / p / nf, inside) * scale; }
            }
        } else {
            for (var j = 0u; j < c; j++) {
                let z = PRED[row + j];
                let t = TARGET[row + j];
                var g = 0.0;
                if (kind == 2u) {
                    if (!(z >= 0.0 && z <= 1.0)) {
                        total = bitcast<f32>(0x7fc00000u);
                        g = total;
                    } else {
                        total = total - (t * max(log(z), -100.0) + (1.0 - t) * max(log(1.0 - z), -100.0));
                        g = (z - t) / max(z * (1.0 - z), 1e-12) / all;
                    }
                } else if (kind == 3u) {
                    total = total + (max(z, 0.0) - z * t + log(1.0 + exp(-abs(z))));
                    g = (1.0 / (1.0 + exp(-z)) - t) / all;
                } else if (kind == 4u) {
                    let d = z - t;
                    total = total + d * d;
                    g = 2.0 * d / all;
                } else if (kind == 5u) {
                    let d = z - t;
                    total = total + abs(d);
                    g = sign(d) / all;
                } else {
                    let d = z - t;
                    total = total + select(prm * (abs(d) - 0.5 * prm), 0.5 * d * d, abs(d) < prm);
                    g = clamp(d, -prm, prm) / all;
                }
                if (P[7] != 0u) { DPRED[row + j] = g * scale; }
            }
        }
        // Scores.
        if (P[5] == 1u) {
            if (!classes) {
                for (var j = 1u; j < c; j++) { if (TARGET[row + j] > TARGET[row + label]) { label = j; } }
            }
            var best = 0u;
            for (var j = 1u; j < c; j++) { if (PRED[row + j] > PRED[row + best]) { best = j; } }
            if (best == label) { correct = correct + 1.0; }
            var above = 0u;
            for (var j = 0u; j < c; j++) { if (PRED[row + j] > PRED[row + label]) { above++; } }
            if (above < P[6]) { correct_k = correct_k + 1.0; }
        } else if (P[5] >= 2u) {
            let threshold = select(0.5, 0.0, P[5] == 3u);
            for (var j = 0u; j < c; j++) {
                if ((PRED[row + j] > threshold) == (TARGET[row + j] > 0.5)) { correct = correct + 1.0; }
            }
            correct_k = correct;
        }
    }
    let sum_total = reduce(total, li);
    let sum_correct = reduce(correct, li);
    let sum_correct_k = reduce(correct_k, li);
    if (li == 0u && grp == 0u) {
        var mean = sum_total / all;
        if (kind <= 1u) { mean = sum_total / nf; }
        var scored = 0.0;
        if (P[5] == 1u) { scored = nf; } else if (P[5] >= 2u) { scored = all; }
        STATS[STATS_LOSS] = mean;
        STATS[STATS_CORRECT] = sum_correct;
        STATS[STATS_CORRECT_K] = sum_correct_k;
        STATS[STATS_SUM_LOSS] = STATS[STATS_SUM_LOSS] + mean * nf;
        STATS[STATS_SUM_CORRECT] = STATS[STATS_SUM_CORRECT] + sum_correct;
        STATS[STATS_SUM_CORRECT_K] = STATS[STATS_SUM_CORRECT_K] + sum_correct_k;
        STATS[STATS_SUM_SAMPLES] = STATS[STATS_SUM_SAMPLES] + nf;
        STATS[STATS_SUM_SCORED] = STATS[STATS_SUM_SCORED] + scored;
    }
}"#
        ),
    ],
};

fn loss(r: &mut Recorder, o: &ops::Loss) -> Result<()> {
    let (kind, prm, classes) = match o.f {
        LossFn::SoftmaxCrossEntropy { label_smoothing, class_targets } => (0, label_smoothing, class_targets),
        LossFn::CategoricalCrossEntropy { class_targets } => (1, 0.0, class_targets),
        LossFn::BinaryCrossEntropy => (2, 0.0, false),
        LossFn::BinaryCrossEntropyWithLogits => (3, 0.0, false),
        LossFn::MeanSquaredError => (4, 0.0, false),
        LossFn::MeanAbsoluteError => (5, 0.0, false),
        LossFn::Huber { delta } => (6, delta, false),
    };
    let (scoring, top_k) = match o.scoring {
        Scoring::None => (0, 0),
        Scoring::ArgMax { top_k } => (1, top_k),
        Scoring::Binary { logits } => (2 + logits as u32, 0),
    };
    let params =
        [u(o.n)?, u(o.c)?, kind, f(prm), classes as u32, scoring, u(top_k)?, o.dpred.is_some() as u32, f(o.grad_scale)];
    let dpred = match o.dpred {
        Some(d) => Bind::Buf(d),
        None => r.scratch(1),
    };
    // Class labels are a u32 buffer, values an f32 one; the other binding gets a placeholder.
    let (target, labels) =
        if classes { (r.scratch(1), Bind::Buf(o.target)) } else { (Bind::Buf(o.target), r.scratch(1)) };
    let reads = [Bind::Buf(o.pred), target, labels];
    r.dispatch(&LOSS, &params, (&reads, &[Bind::Buf(o.stats), dpred]), [1, 1, 1])
}

runs! {
    Loss => loss,
}
