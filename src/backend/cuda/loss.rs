//! Losses and accuracy on the GPU: one block walks the batch, each thread a sample at a time,
//! with per-sample values in f64 and the batch's sums reduced in a fixed order, so the figures
//! match the CPU reference (`backend/cpu/loss.rs`, whose formulas these are, line for line).

use super::CudaBackend;
use super::nvrtc::ModuleSrc;
use crate::Result;
use crate::backend::ops;
use crate::backend::ops::RunOp;
use crate::backend::ops::{LossFn, Scoring};

/// Threads of the single loss block.
const THREADS: u32 = 256;

kernels! {
    loss_forward_backward(f: int, p: float, scoring: int, top_k: int, logits: int, n: i64, c: i64, pred: (const float*), target: (const float*), labels: (const unsigned*), stats: (float*), dpred: (float*), scale: float);
}

pub(super) const MODULE: ModuleSrc = ModuleSrc {
    name: "loss",
    kernels: KERNELS,
    prototypes,
    source: r#"
__device__ __forceinline__ double clampd(double v, double lo, double hi) { return v < lo ? lo : (v > hi ? hi : v); }

// f: 0 softmax cross-entropy (p = label smoothing), 1 binary cross-entropy, 2 binary
// cross-entropy on logits, 3 categorical cross-entropy, 4 MSE, 5 MAE, 6 Huber (p = delta).
// scoring: 0 none, 1 arg-max with top_k, 2 binary (threshold 0 for logits, 0.5 otherwise).
// Class targets come as `labels` (one per sample, u32), other targets as `target` (n x c); the
// pointer not in use is null. A label >= c (the executor refuses those before they reach the
// device) makes the loss NaN, which the non-finite check reports, instead of a read out of range.
extern "C" __global__ void loss_forward_backward(int f, float p, int scoring, int top_k, int logits, i64 n,
                                                 i64 c, const float* pred, const float* target,
                                                 const unsigned* labels, float* stats, float* dpred,
                                                 float scale) {
    __shared__ double sh[256];
    double total = 0.0, correct = 0.0, correct_k = 0.0;
    const double nf = (double)n, all = (double)(n * c), sc = (double)scale;
    const bool class_targets = labels != nullptr;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
        const float* z = pred + i * c;
        const float* t = class_targets ? nullptr : target + i * c;
        if (class_targets && (i64)labels[i] >= c) {
            total = NAN;
            if (dpred) for (i64 j = 0; j < c; j++) dpred[i * c + j] = NAN;
            continue;
        }
        if (f == 0) {
            double eps = (double)p, m = -INFINITY, se = 0.0, qsum = 0.0;
            i64 y = class_targets ? (i64)labels[i] : -1;
            for (i64 j = 0; j < c; j++) m = fmax(m, (double)z[j]);
            for (i64 j = 0; j < c; j++) se += exp((double)z[j] - m);
            double lse = m + log(se);
            for (i64 j = 0; j < c; j++) qsum += class_targets ? (1.0 - eps) * (j == y) + eps / c : (double)t[j] * (1.0 - eps) + eps / c;
            for (i64 j = 0; j < c; j++) {
                double q = class_targets ? (1.0 - eps) * (j == y) + eps / c : (double)t[j] * (1.0 - eps) + eps / c;
                double logp = (double)z[j] - lse;
                total -= q * logp;
                if (dpred) dpred[i * c + j] = (float)((exp(logp) * qsum - q) / nf * sc);
            }
        } else if (f == 3) {
            for (i64 j = 0; j < c; j++) {
                double tv = class_targets ? (double)((i64)labels[i] == j) : (double)t[j];
                double pv = clampd((double)z[j], 1e-7, 1.0 - 1e-7);
                total -= tv * log(pv);
                bool inside = (double)z[j] > 1e-7 && (double)z[j] < 1.0 - 1e-7;
                if (dpred) dpred[i * c + j] = (float)((inside ? -tv / pv / nf : 0.0) * sc);
            }
        } else {
            for (i64 j = 0; j < c; j++) {
                double x = (double)z[j], tv = (double)t[j], g;
                if (f == 1 && !(x >= 0.0 && x <= 1.0)) {
                    // Not a probability (PyTorch raises): the loss is NaN, which the step's
                    // non-finite check reports, naming the sample (as the CPU backend).
                    total = NAN;
                    g = NAN;
                } else if (f == 1) {
                    total -= tv * fmax(log(x), -100.0) + (1.0 - tv) * fmax(log(1.0 - x), -100.0);
                    g = (x - tv) / fmax(x * (1.0 - x), 1e-12) / all;
                } else if (f == 2) {
                    total += fmax(x, 0.0) - x * tv + log1p(exp(-fabs(x)));
                    g = (1.0 / (1.0 + exp(-x)) - tv) / all;
                } else if (f == 4) {
                    double d = x - tv;
                    total += d * d;
                    g = 2.0 * d / all;
                } else if (f == 5) {
                    double d = x - tv;
                    total += fabs(d);
                    g = (d > 0.0 ? 1.0 : (d < 0.0 ? -1.0 : 0.0)) / all;
                } else {
                    double d = x - tv, delta = (double)p;
                    total += fabs(d) < delta ? 0.5 * d * d : delta * (fabs(d) - 0.5 * delta);
                    g = clampd(d, -delta, delta) / all;
                }
                if (dpred) dpred[i * c + j] = (float)(g * sc);
            }
        }
        if (scoring == 1) {
            i64 label = 0;
            if (class_targets) {
                label = (i64)labels[i];
            } else {
                for (i64 j = 1; j < c; j++) if (t[j] > t[label]) label = j;
            }
            i64 best = 0, above = 0;
            for (i64 j = 1; j < c; j++) if (z[j] > z[best]) best = j;
            for (i64 j = 0; j < c; j++) if (z[j] > z[label]) above++;
            correct += (best == label);
            correct_k += (above < top_k);
        } else if (scoring == 2) {
            float thr = logits ? 0.f : 0.5f;
            for (i64 j = 0; j < c; j++) correct += ((z[j] > thr) == (t[j] > 0.5f));
        }
    }
    total = block_sum(total, sh);
    correct = block_sum(correct, sh);
    correct_k = scoring == 2 ? correct : block_sum(correct_k, sh);
    if (threadIdx.x == 0) {
        double mean = (f == 0 || f == 3) ? total / nf : total / all;
        double scored = scoring == 0 ? 0.0 : (scoring == 1 ? nf : all);
        stats[STATS_LOSS] = (float)mean;
        stats[STATS_CORRECT] = (float)correct;
        stats[STATS_CORRECT_K] = (float)correct_k;
        stats[STATS_SUM_LOSS] += (float)(mean * nf);
        stats[STATS_SUM_CORRECT] += (float)correct;
        stats[STATS_SUM_CORRECT_K] += (float)correct_k;
        stats[STATS_SUM_SAMPLES] += (float)nf;
        stats[STATS_SUM_SCORED] += (float)scored;
    }
}
"#,
};

impl RunOp<ops::Loss> for CudaBackend {
    fn run_op(&mut self, o: &ops::Loss) -> Result<()> {
        let ops::Loss { f, scoring, n, c, pred, target, stats, dpred, grad_scale, .. } = *o;
        let (code, p, class_targets) = match f {
            LossFn::SoftmaxCrossEntropy { label_smoothing, class_targets } => (0, label_smoothing, class_targets),
            LossFn::BinaryCrossEntropy => (1, 0.0, false),
            LossFn::BinaryCrossEntropyWithLogits => (2, 0.0, false),
            LossFn::CategoricalCrossEntropy { class_targets } => (3, 0.0, class_targets),
            LossFn::MeanSquaredError => (4, 0.0, false),
            LossFn::MeanAbsoluteError => (5, 0.0, false),
            LossFn::Huber { delta } => (6, delta, false),
        };
        let (sc, top_k, logits) = match scoring {
            Scoring::None => (0, 0, false),
            Scoring::ArgMax { top_k } => (1, top_k, false),
            Scoring::Binary { logits } => (2, 0, logits),
        };
        let (values, labels) = if class_targets { (0, self.ptr(target)) } else { (self.ptr(target), 0) };
        let args = loss_forward_backward {
            f: code,
            p,
            scoring: sc,
            top_k: top_k as i32,
            logits: logits as i32,
            n,
            c,
            pred: self.ptr(pred),
            target: values,
            labels,
            stats: self.ptr(stats),
            dpred: self.opt_ptr(dpred),
            scale: grad_scale,
        };
        self.launch_blocks(1, THREADS, 0, &args)
    }
}
