//! Classification metrics from predictions: the confusion matrix, per-class precision, recall,
//! F1 and support with macro and weighted averages, and one-vs-rest ROC and precision-recall
//! curves with ROC AUC and average precision. Each follows scikit-learn's definition (checked
//! against its numbers in `tests/metrics.rs`, fixtures from `tests/fixtures/metrics/make.py`).
//!
//! ```
//! use kiln::metrics::Evaluation;
//! // three samples, two classes: probabilities row by row, and the true classes
//! let proba = [0.9, 0.1, 0.3, 0.7, 0.6, 0.4];
//! let e = Evaluation::from_proba(&proba, 2, &[0, 1, 1]).unwrap();
//! assert_eq!(e.confusion.get(1, 0), 1); // the third sample: class 1 predicted as 0
//! assert_eq!(e.report.per_class[1].recall, 0.5);
//! assert_eq!(e.roc_auc[1], Some(1.0));  // class 1's probabilities rank its samples first
//! ```
//!
//! With a trainer: `Evaluation::from_proba(trainer.predict_proba(&x)?.data(), classes, &labels)`.

mod confusion;
mod curves;

pub use confusion::{ClassReport, ClassScores, ConfusionMatrix};
pub use curves::{PrCurve, RocCurve, average_precision, precision_recall_curve, roc_auc, roc_curve};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Everything kiln reports about a classifier on a labelled set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// True class against arg-max prediction.
    pub confusion: ConfusionMatrix,
    /// Precision, recall, F1, support per class and averaged.
    pub report: ClassReport,
    /// One-vs-rest ROC AUC of each class (`None` where the class has no sample, or every sample is
    /// of it).
    pub roc_auc: Vec<Option<f64>>,
    /// One-vs-rest average precision of each class (`None` where the class has no sample).
    pub average_precision: Vec<Option<f64>>,
    /// Mean of the defined per-class ROC AUCs (scikit-learn's `roc_auc_score(multi_class="ovr")`
    /// when all are defined).
    pub macro_roc_auc: Option<f64>,
    /// Mean of the defined per-class average precisions.
    pub macro_average_precision: Option<f64>,
    /// One-vs-rest ROC curve of each class.
    pub roc: Vec<Option<RocCurve>>,
    /// One-vs-rest precision-recall curve of each class.
    pub pr: Vec<Option<PrCurve>>,
}

fn mean(v: &[Option<f64>]) -> Option<f64> {
    let d: Vec<f64> = v.iter().flatten().copied().collect();
    (!d.is_empty()).then(|| d.iter().sum::<f64>() / d.len() as f64)
}

impl Evaluation {
    /// Metrics from class probabilities (`proba`: `labels.len()` rows of `classes` values, as
    /// `Trainer::predict_proba` returns) and the true classes. Ties in the arg-max go to the
    /// lower class, as NumPy's `argmax`.
    pub fn from_proba(proba: &[f32], classes: usize, labels: &[u32]) -> Result<Evaluation> {
        if classes == 0 || proba.len() != labels.len() * classes {
            return Err(Error::Shape {
                what: "probabilities".into(),
                expected: format!("{} samples x {classes} classes", labels.len()),
                got: format!("{} values", proba.len()),
            });
        }
        let predicted: Vec<u32> = proba
            .chunks(classes)
            .map(|row| {
                let mut best = 0;
                for (c, v) in row.iter().enumerate() {
                    if *v > row[best] {
                        best = c;
                    }
                }
                best as u32
            })
            .collect();
        let confusion = ConfusionMatrix::new(classes, labels, &predicted)?;
        let report = confusion.report();
        let (mut roc, mut pr, mut auc, mut ap) = (vec![], vec![], vec![], vec![]);
        for c in 0..classes {
            let positive: Vec<bool> = labels.iter().map(|&l| l as usize == c).collect();
            let scores: Vec<f32> = proba.iter().skip(c).step_by(classes).copied().collect();
            roc.push(roc_curve(&positive, &scores)?);
            pr.push(precision_recall_curve(&positive, &scores)?);
            auc.push(roc_auc(&positive, &scores)?);
            ap.push(average_precision(&positive, &scores)?);
        }
        Ok(Evaluation {
            confusion,
            report,
            macro_roc_auc: mean(&auc),
            macro_average_precision: mean(&ap),
            roc_auc: auc,
            average_precision: ap,
            roc,
            pr,
        })
    }

    /// The per-class table (precision, recall, F1, support, ROC AUC, AP) with averages, as
    /// scikit-learn's `classification_report` prints it; `names` label the rows (else the class
    /// numbers).
    pub fn table(&self, names: Option<&[String]>) -> String {
        let k = self.confusion.classes;
        let name = |c: usize| names.and_then(|n| n.get(c).cloned()).unwrap_or_else(|| c.to_string());
        let width = (0..k).map(|c| name(c).len()).max().unwrap_or(0).max(12);
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
        let mut s = format!(
            "{:>width$}  {:>9}  {:>9}  {:>9}  {:>7}  {:>7}  {:>7}\n",
            "", "precision", "recall", "f1-score", "support", "roc-auc", "ap"
        );
        for (c, sc) in self.report.per_class.iter().enumerate() {
            s += &format!(
                "{:>width$}  {:>9.4}  {:>9.4}  {:>9.4}  {:>7}  {:>7}  {:>7}\n",
                name(c),
                sc.precision,
                sc.recall,
                sc.f1,
                sc.support,
                opt(self.roc_auc[c]),
                opt(self.average_precision[c])
            );
        }
        let total = self.report.macro_avg.support;
        s += &format!("\n{:>width$}  {:>9}  {:>9}  {:>9.4}  {:>7}\n", "accuracy", "", "", self.report.accuracy, total);
        let m = self.report.macro_avg;
        s += &format!(
            "{:>width$}  {:>9.4}  {:>9.4}  {:>9.4}  {:>7}  {:>7}  {:>7}\n",
            "macro avg",
            m.precision,
            m.recall,
            m.f1,
            total,
            opt(self.macro_roc_auc),
            opt(self.macro_average_precision)
        );
        let w = self.report.weighted_avg;
        s += &format!(
            "{:>width$}  {:>9.4}  {:>9.4}  {:>9.4}  {:>7}\n",
            "weighted avg", w.precision, w.recall, w.f1, total
        );
        s
    }

    /// The confusion matrix as text, rows true classes, columns predictions.
    pub fn confusion_table(&self, names: Option<&[String]>) -> String {
        let k = self.confusion.classes;
        let name = |c: usize| names.and_then(|n| n.get(c).cloned()).unwrap_or_else(|| c.to_string());
        let cell = (0..k)
            .map(|c| name(c).len())
            .chain(self.confusion.counts.iter().map(|v| v.to_string().len()))
            .max()
            .unwrap_or(1);
        let head = (0..k).map(|c| name(c).len()).max().unwrap_or(1).max(4);
        let mut s = format!("{:>head$}", "true\\pred");
        s = format!("{s:>head$}");
        for c in 0..k {
            s += &format!(" {:>cell$}", name(c));
        }
        s.push('\n');
        for t in 0..k {
            s += &format!("{:>w$}", name(t), w = head.max(9));
            for p in 0..k {
                s += &format!(" {:>cell$}", self.confusion.get(t, p));
            }
            s.push('\n');
        }
        s
    }
}
