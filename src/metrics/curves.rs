//! Binary ranking curves and their areas, as scikit-learn computes them: `roc_curve` (with
//! `drop_intermediate=False`), `roc_auc_score`, `precision_recall_curve` and
//! `average_precision_score`. One-vs-rest use: the positives are one class's samples, the scores
//! that class's probabilities.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A ROC curve: false- and true-positive rates at every distinct score threshold, from the
/// point (0, 0) (threshold +infinity, written as `f64::INFINITY`) to (1, 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RocCurve {
    /// False-positive rate of each point.
    pub fpr: Vec<f64>,
    /// True-positive rate of each point.
    pub tpr: Vec<f64>,
    /// Score threshold of each point (a sample is positive when its score is >= it), decreasing.
    pub thresholds: Vec<f64>,
}

/// A precision-recall curve, recall decreasing to the final point (recall 0, precision 1), as
/// scikit-learn orders it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrCurve {
    /// Precision of each point.
    pub precision: Vec<f64>,
    /// Recall of each point.
    pub recall: Vec<f64>,
    /// Thresholds, increasing; one fewer than points.
    pub thresholds: Vec<f64>,
}

/// True and false positives counted at each distinct threshold, scores decreasing
/// (scikit-learn's `_binary_clf_curve`).
fn counts(positive: &[bool], scores: &[f32]) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    if positive.len() != scores.len() {
        return Err(Error::Shape {
            what: "curve scores".into(),
            expected: format!("{} (one per label)", positive.len()),
            got: scores.len().to_string(),
        });
    }
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(Error::sample(i, format!("score {} is not finite", scores[i])));
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut tps, mut fps, mut thr) = (Vec::new(), Vec::new(), Vec::new());
    let (mut tp, mut fp) = (0.0, 0.0);
    for (k, &i) in order.iter().enumerate() {
        if positive[i] {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        let last_of_run = k + 1 == order.len() || scores[order[k + 1]] != scores[i];
        if last_of_run {
            tps.push(tp);
            fps.push(fp);
            thr.push(scores[i] as f64);
        }
    }
    Ok((tps, fps, thr))
}

/// The ROC curve; `None` when the labels are all positive or all negative (a rate is undefined).
pub fn roc_curve(positive: &[bool], scores: &[f32]) -> Result<Option<RocCurve>> {
    let (tps, fps, thr) = counts(positive, scores)?;
    let (p, n) = (tps.last().copied().unwrap_or(0.0), fps.last().copied().unwrap_or(0.0));
    if p == 0.0 || n == 0.0 {
        return Ok(None);
    }
    let mut c = RocCurve { fpr: vec![0.0], tpr: vec![0.0], thresholds: vec![f64::INFINITY] };
    for k in 0..tps.len() {
        c.fpr.push(fps[k] / n);
        c.tpr.push(tps[k] / p);
        c.thresholds.push(thr[k]);
    }
    Ok(Some(c))
}

/// Area under the ROC curve (trapezoids); `None` when it is undefined (one class only).
pub fn roc_auc(positive: &[bool], scores: &[f32]) -> Result<Option<f64>> {
    Ok(roc_curve(positive, scores)?
        .map(|c| c.fpr.windows(2).zip(c.tpr.windows(2)).map(|(x, y)| (x[1] - x[0]) * (y[1] + y[0]) / 2.0).sum()))
}

/// The precision-recall curve; `None` when there is no positive (recall is undefined).
pub fn precision_recall_curve(positive: &[bool], scores: &[f32]) -> Result<Option<PrCurve>> {
    let (tps, fps, thr) = counts(positive, scores)?;
    let p = tps.last().copied().unwrap_or(0.0);
    if p == 0.0 {
        return Ok(None);
    }
    let mut precision: Vec<f64> = tps.iter().zip(&fps).map(|(t, f)| t / (t + f)).collect();
    let mut recall: Vec<f64> = tps.iter().map(|t| t / p).collect();
    let mut thresholds = thr;
    precision.reverse();
    recall.reverse();
    thresholds.reverse();
    precision.push(1.0);
    recall.push(0.0);
    Ok(Some(PrCurve { precision, recall, thresholds }))
}

/// Average precision: the sum over thresholds of (recall increase) x precision, without
/// interpolation; `None` when there is no positive.
pub fn average_precision(positive: &[bool], scores: &[f32]) -> Result<Option<f64>> {
    Ok(precision_recall_curve(positive, scores)?
        .map(|c| -(0..c.recall.len() - 1).map(|k| (c.recall[k + 1] - c.recall[k]) * c.precision[k]).sum::<f64>()))
}
