//! kiln::metrics against scikit-learn's numbers on fixed predictions (the fixture and the script
//! that made it: tests/fixtures/metrics/).

use kiln::metrics::Evaluation;
use serde_json::Value;

fn f(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| match x.as_str() {
            Some("inf") => f64::INFINITY,
            _ => x.as_f64().unwrap(),
        })
        .collect()
}

fn close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g == w) || (g - w).abs() <= 1e-12, "{what}[{i}]: kiln {g}, scikit-learn {w}");
    }
}

#[test]
fn metrics_equal_scikit_learn() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/metrics/sklearn.json")).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for (n, case) in cases.iter().enumerate() {
        let k = case["classes"].as_u64().unwrap() as usize;
        let labels: Vec<u32> = case["labels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let proba: Vec<f32> = f(&case["proba"]).iter().map(|&v| v as f32).collect();
        let e = Evaluation::from_proba(&proba, k, &labels).unwrap();
        let cm: Vec<u64> = case["confusion"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(e.confusion.counts, cm, "case {n}: confusion");
        let r = &e.report;
        close("precision", &r.per_class.iter().map(|s| s.precision).collect::<Vec<_>>(), &f(&case["precision"]));
        close("recall", &r.per_class.iter().map(|s| s.recall).collect::<Vec<_>>(), &f(&case["recall"]));
        close("f1", &r.per_class.iter().map(|s| s.f1).collect::<Vec<_>>(), &f(&case["f1"]));
        let support: Vec<f64> = r.per_class.iter().map(|s| s.support as f64).collect();
        close("support", &support, &f(&case["support"]));
        close("macro", &[r.macro_avg.precision, r.macro_avg.recall, r.macro_avg.f1], &f(&case["macro"]));
        close("weighted", &[r.weighted_avg.precision, r.weighted_avg.recall, r.weighted_avg.f1], &f(&case["weighted"]));
        for (c, pc) in case["per_class"].as_array().unwrap().iter().enumerate() {
            let w = |s: &str| format!("case {n} class {c} {s}");
            close(&w("roc_auc"), &[e.roc_auc[c].unwrap()], &[pc["roc_auc"].as_f64().unwrap()]);
            close(&w("ap"), &[e.average_precision[c].unwrap()], &[pc["ap"].as_f64().unwrap()]);
            let roc = e.roc[c].as_ref().unwrap();
            close(&w("fpr"), &roc.fpr, &f(&pc["fpr"]));
            close(&w("tpr"), &roc.tpr, &f(&pc["tpr"]));
            close(&w("roc thresholds"), &roc.thresholds, &f(&pc["roc_thresholds"]));
            let pr = e.pr[c].as_ref().unwrap();
            close(&w("precision curve"), &pr.precision, &f(&pc["precision"]));
            close(&w("recall curve"), &pr.recall, &f(&pc["recall"]));
            close(&w("pr thresholds"), &pr.thresholds, &f(&pc["pr_thresholds"]));
        }
        close("macro ap", &[e.macro_average_precision.unwrap()], &[case["macro_ap"].as_f64().unwrap()]);
        close("macro roc auc", &[e.macro_roc_auc.unwrap()], &[case["macro_roc_auc"].as_f64().unwrap()]);
    }
}

#[test]
fn undefined_scores_are_absent_and_bad_input_is_an_error() {
    // Class 2 never occurs: no recall, no AUC, no AP for it; precision 0 (scikit-learn's
    // zero_division=0), and the macro average over the classes present.
    let proba = [0.8, 0.1, 0.1, 0.2, 0.7, 0.1, 0.6, 0.3, 0.1];
    let e = Evaluation::from_proba(&proba, 3, &[0, 1, 1]).unwrap();
    assert_eq!(e.roc_auc[2], None);
    assert_eq!(e.average_precision[2], None);
    assert_eq!(e.report.per_class[2].support, 0);
    assert_eq!(e.macro_roc_auc, Some((1.0 + 1.0) / 2.0));
    assert!(Evaluation::from_proba(&proba, 3, &[0, 1]).is_err());
    assert!(Evaluation::from_proba(&proba, 3, &[0, 1, 5]).is_err());
    assert!(Evaluation::from_proba(&[f32::NAN, 0.0], 2, &[0]).is_err());
}
