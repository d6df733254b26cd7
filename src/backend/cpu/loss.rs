//! Losses and accuracy on the CPU: the reference for every loss kernel. Per-sample values are
//! computed in f64 whatever the element type.

use super::CpuBackend;
use super::float::Float;
use crate::backend::HostVec;
use crate::backend::ops::{self, BufId, LossFn, RunOp, Scoring, stats};
use crate::{Error, Result};

/// A loss op's targets as the kernel reads them.
#[derive(Clone, Copy)]
pub enum Targets<'a, T> {
    /// One class label per sample (each below the number of classes).
    Labels(&'a [u32]),
    /// Values shaped like the predictions.
    Values(&'a [T]),
}

/// Writes the batch's loss and scores into `st` and adds them to its sums; writes the gradient
/// of the mean loss (times `scale`) into `dpred` when given. Labels must be below `o.c` (the
/// op checks them first).
pub fn loss<T: Float>(o: &ops::Loss, pred: &[T], targets: Targets<T>, st: &mut [T], mut dpred: Option<&mut [T]>) {
    let (labels, target): (&[u32], &[T]) = match targets {
        Targets::Labels(l) => (l, &[]),
        Targets::Values(v) => (&[], v),
    };
    let ops::Loss { f, scoring, n, c, grad_scale: scale, .. } = *o;
    let scale = scale as f64;
    let mut total = 0.0f64;
    let nf = n as f64;
    let all = (n * c) as f64;
    for i in 0..n {
        let z: Vec<f64> = pred[i * c..(i + 1) * c].iter().map(|v| v.to_f64()).collect();
        let mut grad = vec![0.0f64; c];
        match f {
            LossFn::SoftmaxCrossEntropy { label_smoothing, class_targets } => {
                let eps = label_smoothing as f64;
                let q: Vec<f64> = if class_targets {
                    let y = labels[i] as usize;
                    (0..c).map(|j| (1.0 - eps) * (j == y) as u8 as f64 + eps / c as f64).collect()
                } else {
                    target[i * c..(i + 1) * c].iter().map(|t| t.to_f64() * (1.0 - eps) + eps / c as f64).collect()
                };
                let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                let qsum: f64 = q.iter().sum();
                for j in 0..c {
                    let logp = z[j] - lse;
                    total -= q[j] * logp;
                    grad[j] = (logp.exp() * qsum - q[j]) / nf;
                }
            }
            LossFn::CategoricalCrossEntropy { class_targets } => {
                for j in 0..c {
                    let t =
                        if class_targets { (labels[i] as usize == j) as u8 as f64 } else { target[i * c + j].to_f64() };
                    let p = z[j].clamp(1e-7, 1.0 - 1e-7);
                    total -= t * p.ln();
                    let inside = z[j] > 1e-7 && z[j] < 1.0 - 1e-7;
                    grad[j] = if inside { -t / p / nf } else { 0.0 };
                }
            }
            LossFn::BinaryCrossEntropy => {
                for j in 0..c {
                    let (p, t) = (z[j], target[i * c + j].to_f64());
                    if !(0.0..=1.0).contains(&p) {
                        // Not a probability (PyTorch raises; `ln` of it clamped at -100 would
                        // give a finite, wrong loss): NaN, which the step reports as non-finite.
                        total = f64::NAN;
                        grad[j] = f64::NAN;
                        continue;
                    }
                    total -= t * p.ln().max(-100.0) + (1.0 - t) * (1.0 - p).ln().max(-100.0);
                    grad[j] = (p - t) / (p * (1.0 - p)).max(1e-12) / all;
                }
            }
            LossFn::BinaryCrossEntropyWithLogits => {
                for j in 0..c {
                    let (x, t) = (z[j], target[i * c + j].to_f64());
                    total += x.max(0.0) - x * t + (-x.abs()).exp().ln_1p();
                    grad[j] = (1.0 / (1.0 + (-x).exp()) - t) / all;
                }
            }
            LossFn::MeanSquaredError => {
                for j in 0..c {
                    let d = z[j] - target[i * c + j].to_f64();
                    total += d * d;
                    grad[j] = 2.0 * d / all;
                }
            }
            LossFn::MeanAbsoluteError => {
                for j in 0..c {
                    let d = z[j] - target[i * c + j].to_f64();
                    total += d.abs();
                    let sign = if d > 0.0 {
                        1.0
                    } else if d < 0.0 {
                        -1.0
                    } else {
                        0.0
                    };
                    grad[j] = sign / all;
                }
            }
            LossFn::Huber { delta } => {
                let delta = delta as f64;
                for j in 0..c {
                    let d = z[j] - target[i * c + j].to_f64();
                    total += if d.abs() < delta { 0.5 * d * d } else { delta * (d.abs() - 0.5 * delta) };
                    grad[j] = d.clamp(-delta, delta) / all;
                }
            }
        }
        if let Some(dp) = dpred.as_deref_mut() {
            for j in 0..c {
                dp[i * c + j] = T::from_f64(grad[j] * scale);
            }
        }
    }
    let mean = match f {
        LossFn::SoftmaxCrossEntropy { .. } | LossFn::CategoricalCrossEntropy { .. } => total / nf,
        _ => total / all,
    };
    let (correct, correct_k, scored) = score(scoring, n, c, pred, targets);
    st[stats::LOSS] = T::from_f64(mean);
    st[stats::CORRECT] = T::from_usize(correct);
    st[stats::CORRECT_K] = T::from_usize(correct_k);
    st[stats::SUM_LOSS] += T::from_f64(mean * nf);
    st[stats::SUM_CORRECT] += T::from_usize(correct);
    st[stats::SUM_CORRECT_K] += T::from_usize(correct_k);
    st[stats::SUM_SAMPLES] += T::from_usize(n);
    st[stats::SUM_SCORED] += T::from_usize(scored);
}

/// `(correct, correct within top k, predictions scored)`.
fn score<T: Float>(scoring: Scoring, n: usize, c: usize, pred: &[T], targets: Targets<T>) -> (usize, usize, usize) {
    let (labels, target): (&[u32], &[T]) = match targets {
        Targets::Labels(l) => (l, &[]),
        Targets::Values(v) => (&[], v),
    };
    let class_targets = matches!(targets, Targets::Labels(_));
    match scoring {
        Scoring::None => (0, 0, 0),
        Scoring::ArgMax { top_k } => {
            let (mut correct, mut correct_k) = (0, 0);
            for i in 0..n {
                let row = &pred[i * c..(i + 1) * c];
                let label = if class_targets { labels[i] as usize } else { argmax(&target[i * c..(i + 1) * c]) };
                if argmax(row) == label {
                    correct += 1;
                }
                let above = row.iter().filter(|&&v| v > row[label]).count();
                if above < top_k {
                    correct_k += 1;
                }
            }
            (correct, correct_k, n)
        }
        Scoring::Binary { logits } => {
            let threshold = if logits { T::ZERO } else { T::from_f64(0.5) };
            let half = T::from_f64(0.5);
            let correct = (0..n * c).filter(|&e| (pred[e] > threshold) == (target[e] > half)).count();
            (correct, correct, n * c)
        }
    }
}

/// Index of the first largest value.
fn argmax<T: Float>(row: &[T]) -> usize {
    let mut best = 0;
    for (j, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = j;
        }
    }
    best
}

/// The first `n` labels of a class-target buffer (validation saw a `u32` buffer, which the
/// backend holds in `other`).
fn labels(other: &[Option<HostVec>], target: BufId, n: usize) -> Result<&[u32]> {
    match &other[target.0] {
        Some(HostVec::U32(l)) => Ok(&l[..n]),
        _ => Err(Error::State(format!("loss op: target buffer {} holds no u32 labels", target.0))),
    }
}

impl<T: Float> RunOp<ops::Loss> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::Loss) -> Result<()> {
        let ops::Loss { pred, target, stats, dpred, n, c, .. } = *o;
        if o.f.class_targets() {
            let bad = labels(&self.other, target, n)?.iter().enumerate().find(|(_, y)| **y as usize >= c);
            if let Some((sample, y)) = bad {
                return Err(Error::Label {
                    sample,
                    reason: format!("class {y} is out of range: the model has {c} outputs (classes 0..{c})"),
                });
            }
        }
        let mut sv = self.take(stats);
        let mut dv = dpred.map(|d| self.take(d));
        let b = &self.bufs;
        let targets = match o.f.class_targets() {
            true => Targets::Labels(labels(&self.other, target, n)?),
            false => Targets::Values(&b[target.0]),
        };
        loss(o, &b[pred.0], targets, &mut sv, dv.as_deref_mut());
        self.put(stats, sv);
        if let (Some(d), Some(v)) = (dpred, dv) {
            self.put(d, v);
        }
        Ok(())
    }
}
