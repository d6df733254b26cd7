//! The training report: one self-contained HTML file (`runs/NAME/report.html` for `kiln train`)
//! with PNG plots embedded as data URIs: loss and accuracy per epoch (train and validation), the
//! learning rate per step, the confusion matrix, one-vs-rest ROC and precision-recall curves, the
//! per-class table, the model summary and the config (and a profile, when one is given).
//!
//! The numbers behind every plot are embedded too, as JSON in
//! `<script type="application/json" id="kiln-series">` (plot name -> series of `[x, y]` points),
//! so a reader (or a test) can check a plot against the run's history.

mod plots;

pub use plots::Series;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::Result;
use crate::metrics::Evaluation;
use crate::train::EpochLog;

/// What a report shows; see the module documentation.
#[derive(Clone, Debug, Default)]
pub struct Report<'a> {
    /// The page's title (the run's name).
    pub title: String,
    /// Facts shown at the top as a table: device, time, final accuracy, ...
    pub facts: Vec<(String, String)>,
    /// The per-epoch history.
    pub history: &'a [EpochLog],
    /// `(optimizer step, learning rate)` of every step.
    pub lr_steps: &'a [(u64, f64)],
    /// Metrics on the evaluation set, with what that set is (`"validation set, 360 images"`).
    pub evaluation: Option<(&'a Evaluation, String)>,
    /// Class names in label order (else the class numbers are shown).
    pub class_names: Vec<String>,
    /// The model summary table.
    pub summary: String,
    /// The resolved config, as text.
    pub config: String,
    /// A per-layer profile table, where there is one.
    pub profile: Option<String>,
}

/// Base64 (standard alphabet, padded), for data URIs.
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for k in 0..4 {
            if k <= c.len() {
                s.push(A[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The series each plot draws, computed from the report's inputs.
pub fn plot_series(r: &Report) -> BTreeMap<String, Vec<Series>> {
    let mut out = BTreeMap::new();
    let h = r.history;
    let ep = |f: &dyn Fn(&EpochLog) -> Option<f64>| -> Vec<(f64, f64)> {
        h.iter().filter_map(|l| f(l).map(|v| (l.epoch as f64, v))).collect()
    };
    let mut loss = vec![Series { label: "train".into(), points: ep(&|l| Some(l.train.loss as f64)) }];
    let val_loss = ep(&|l| l.val.map(|v| v.loss as f64));
    if !val_loss.is_empty() {
        loss.push(Series { label: "validation".into(), points: val_loss });
    }
    out.insert("loss".into(), loss);
    let train_acc = ep(&|l| l.train.accuracy.map(|a| a as f64));
    if !train_acc.is_empty() {
        let mut acc = vec![Series { label: "train".into(), points: train_acc }];
        let val_acc = ep(&|l| l.val.and_then(|v| v.accuracy).map(|a| a as f64));
        if !val_acc.is_empty() {
            acc.push(Series { label: "validation".into(), points: val_acc });
        }
        out.insert("accuracy".into(), acc);
    }
    if !r.lr_steps.is_empty() {
        let points = r.lr_steps.iter().map(|&(s, lr)| (s as f64, lr)).collect();
        out.insert("learning_rate".into(), vec![Series { label: "learning rate".into(), points }]);
    }
    if let Some((e, _)) = &r.evaluation {
        let name = |c: usize| r.class_names.get(c).cloned().unwrap_or_else(|| c.to_string());
        let roc = e
            .roc
            .iter()
            .enumerate()
            .filter_map(|(c, curve)| {
                curve.as_ref().map(|k| Series {
                    label: format!("{} (AUC {:.3})", name(c), e.roc_auc[c].unwrap_or(f64::NAN)),
                    points: k.fpr.iter().copied().zip(k.tpr.iter().copied()).collect(),
                })
            })
            .collect();
        out.insert("roc".into(), roc);
        let pr =
            e.pr.iter()
                .enumerate()
                .filter_map(|(c, curve)| {
                    curve.as_ref().map(|k| Series {
                        label: format!("{} (AP {:.3})", name(c), e.average_precision[c].unwrap_or(f64::NAN)),
                        points: k.recall.iter().copied().zip(k.precision.iter().copied()).collect(),
                    })
                })
                .collect();
        out.insert("pr".into(), pr);
    }
    out
}

impl Report<'_> {
    /// The report as one HTML document.
    pub fn render(&self) -> Result<String> {
        let series = plot_series(self);
        let mut images: Vec<(String, Vec<u8>)> = Vec::new();
        if let Some(s) = series.get("loss") {
            images.push(("Loss per epoch".into(), plots::line_chart("loss", "epoch", "loss", s, None, false)?));
        }
        if let Some(s) = series.get("accuracy") {
            images.push((
                "Accuracy per epoch".into(),
                plots::line_chart("accuracy", "epoch", "accuracy", s, None, false)?,
            ));
        }
        if let Some(s) = series.get("learning_rate") {
            images.push((
                "Learning rate per step".into(),
                plots::line_chart("learning rate", "optimizer step", "learning rate", s, None, false)?,
            ));
        }
        let names: Vec<String> = match &self.evaluation {
            Some((e, _)) => (0..e.confusion.classes)
                .map(|c| self.class_names.get(c).cloned().unwrap_or_else(|| c.to_string()))
                .collect(),
            None => vec![],
        };
        if let Some((e, _)) = &self.evaluation {
            images.push(("Confusion matrix".into(), plots::confusion(&e.confusion.counts, &names)?));
            if let Some(s) = series.get("roc") {
                images.push((
                    "ROC curves (one class against the rest)".into(),
                    plots::unit_curves("ROC", "false-positive rate", "true-positive rate", s, true)?,
                ));
            }
            if let Some(s) = series.get("pr") {
                images.push((
                    "Precision-recall curves (one class against the rest)".into(),
                    plots::unit_curves("precision-recall", "recall", "precision", s, false)?,
                ));
            }
        }
        let mut h = String::new();
        let title = escape(&self.title);
        let _ = write!(
            h,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>kiln report: {title}</title>\n<style>\
             body{{font-family:sans-serif;max-width:1320px;margin:1em auto;padding:0 1em;color:#222}}\
             h1{{font-size:1.6em}} h2{{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}}\
             .plots{{display:flex;flex-wrap:wrap;gap:12px}} figure{{margin:0}} figcaption{{font-size:.9em;color:#555}}\
             pre{{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em}} table{{border-collapse:collapse}}\
             td,th{{padding:.15em .8em;border-bottom:1px solid #eee;text-align:left}}</style></head>\n<body>\n\
             <h1>kiln report: {title}</h1>\n"
        );
        if !self.facts.is_empty() {
            h += "<table class=\"facts\">\n";
            for (k, v) in &self.facts {
                let _ = writeln!(h, "<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(v));
            }
            h += "</table>\n";
        }
        h += "<h2>Plots</h2>\n<div class=\"plots\">\n";
        for (caption, png) in &images {
            let _ = writeln!(
                h,
                "<figure><img alt=\"{c}\" src=\"data:image/png;base64,{}\"><figcaption>{c}</figcaption></figure>",
                base64(png),
                c = escape(caption)
            );
        }
        h += "</div>\n";
        if let Some((e, what)) = &self.evaluation {
            let _ = write!(
                h,
                "<h2>Metrics on the {}</h2>\n<pre>{}</pre>\n<pre>{}</pre>\n",
                escape(what),
                escape(&e.table(Some(&names))),
                escape(&e.confusion_table(Some(&names)))
            );
        }
        if let Some(p) = &self.profile {
            let _ = write!(h, "<h2>Profile</h2>\n<pre>{}</pre>\n", escape(p));
        }
        let _ = write!(h, "<h2>Model</h2>\n<pre>{}</pre>\n", escape(&self.summary));
        let _ = write!(h, "<h2>Config</h2>\n<pre>{}</pre>\n", escape(&self.config));
        if !self.history.is_empty() {
            h += "<h2>History</h2>\n<table><tr><th>epoch</th><th>loss</th><th>accuracy</th><th>val loss</th>\
                  <th>val accuracy</th><th>lr</th><th>seconds</th></tr>\n";
            let pct = |a: Option<f32>| a.map_or("-".into(), |a| format!("{:.2}%", a * 100.0));
            for l in self.history {
                let _ = writeln!(
                    h,
                    "<tr><td>{}</td><td>{:.4}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.3e}</td><td>{:.1}</td></tr>",
                    l.epoch,
                    l.train.loss,
                    pct(l.train.accuracy),
                    l.val.map_or("-".into(), |v| format!("{:.4}", v.loss)),
                    pct(l.val.and_then(|v| v.accuracy)),
                    l.lr,
                    l.seconds
                );
            }
            h += "</table>\n";
        }
        // `</` cannot occur in JSON of numbers and escaped labels, but a class name could hold it.
        let json = serde_json::to_string(&series).unwrap_or_default().replace("</", "<\\/");
        let _ = write!(h, "<script type=\"application/json\" id=\"kiln-series\">{json}</script>\n</body></html>\n");
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE=")]
        {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn plots_decode_as_png_with_text_drawn() {
        let s = vec![Series { label: "train".into(), points: vec![(1.0, 0.5), (2.0, 0.25)] }];
        let png = plots::line_chart("loss", "epoch", "loss", &s, None, false).unwrap();
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (640, 400));
        // The caption's glyphs are dark pixels in the top band (the font is drawn).
        let dark =
            (0..640).flat_map(|x| (0..30).map(move |y| (x, y))).filter(|&(x, y)| img.get_pixel(x, y)[0] < 100).count();
        assert!(dark > 20, "no text drawn in the caption band ({dark} dark pixels)");
        let names: Vec<String> = (0..3).map(|c| c.to_string()).collect();
        let cm = plots::confusion(&[5, 1, 0, 0, 7, 2, 1, 0, 9], &names).unwrap();
        assert!(image::load_from_memory(&cm).is_ok());
    }
}
