//! The confusion matrix and the per-class scores derived from it (scikit-learn's
//! `confusion_matrix` and `classification_report`, with `zero_division=0`).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Counts of (true class, predicted class) pairs: row = true class, column = prediction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfusionMatrix {
    /// Number of classes (rows and columns).
    pub classes: usize,
    /// Row-major counts, `classes * classes` of them.
    pub counts: Vec<u64>,
}

impl ConfusionMatrix {
    /// The matrix of `truth` against `predicted` (one class index each, below `classes`).
    pub fn new(classes: usize, truth: &[u32], predicted: &[u32]) -> Result<Self> {
        if truth.len() != predicted.len() {
            return Err(Error::Shape {
                what: "confusion matrix predictions".into(),
                expected: format!("{} (one per true label)", truth.len()),
                got: predicted.len().to_string(),
            });
        }
        let mut counts = vec![0u64; classes * classes];
        for (i, (&t, &p)) in truth.iter().zip(predicted).enumerate() {
            if t as usize >= classes || p as usize >= classes {
                return Err(Error::Label {
                    sample: i,
                    reason: format!("class {} is not below the number of classes, {classes}", t.max(p)),
                });
            }
            counts[t as usize * classes + p as usize] += 1;
        }
        Ok(ConfusionMatrix { classes, counts })
    }

    /// Samples of class `truth` predicted as `predicted`.
    pub fn get(&self, truth: usize, predicted: usize) -> u64 {
        self.counts[truth * self.classes + predicted]
    }

    /// Number of samples.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Fraction of samples on the diagonal (0 when there are none).
    pub fn accuracy(&self) -> f64 {
        let correct: u64 = (0..self.classes).map(|c| self.get(c, c)).sum();
        ratio(correct, self.total())
    }

    /// Precision, recall, F1 and support of every class, and their averages.
    pub fn report(&self) -> ClassReport {
        let k = self.classes;
        let per_class: Vec<ClassScores> = (0..k)
            .map(|c| {
                let tp = self.get(c, c);
                let predicted: u64 = (0..k).map(|t| self.get(t, c)).sum();
                let support: u64 = (0..k).map(|p| self.get(c, p)).sum();
                let precision = ratio(tp, predicted);
                let recall = ratio(tp, support);
                let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
                ClassScores { precision, recall, f1, support }
            })
            .collect();
        let total: u64 = per_class.iter().map(|s| s.support).sum();
        let avg = |w: &dyn Fn(&ClassScores) -> f64, norm: f64| ClassScores {
            precision: per_class.iter().map(|s| w(s) * s.precision).sum::<f64>() / norm,
            recall: per_class.iter().map(|s| w(s) * s.recall).sum::<f64>() / norm,
            f1: per_class.iter().map(|s| w(s) * s.f1).sum::<f64>() / norm,
            support: total,
        };
        let macro_avg = avg(&|_| 1.0, k.max(1) as f64);
        let weighted_avg =
            if total > 0 { avg(&|s| s.support as f64, total as f64) } else { ClassScores { support: 0, ..macro_avg } };
        ClassReport { per_class, macro_avg, weighted_avg, accuracy: self.accuracy() }
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// One class's scores (or an average's, whose support is the total).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassScores {
    /// Of the samples predicted as this class, the fraction that are (0 when none are predicted).
    pub precision: f64,
    /// Of the samples of this class, the fraction predicted as it (0 when there are none).
    pub recall: f64,
    /// Harmonic mean of precision and recall (0 when both are).
    pub f1: f64,
    /// Samples of this class.
    pub support: u64,
}

/// Per-class scores with their unweighted (macro) and support-weighted averages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassReport {
    /// One entry per class, in class order.
    pub per_class: Vec<ClassScores>,
    /// Mean over classes.
    pub macro_avg: ClassScores,
    /// Mean over classes weighted by support.
    pub weighted_avg: ClassScores,
    /// Overall accuracy.
    pub accuracy: f64,
}
