//! The `kiln` binary, run as a user runs it: a short training run on the embedded digits and
//! what it writes (run folder, report), eval, predict, summary, resume, Ctrl-C, and bad input for
//! every subcommand (non-zero exit, an error naming the flag, file or line).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn kiln(dir: &Path, args: &[&str]) -> Output {
    Command::new(KILN).args(args).current_dir(dir).output().unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let o = kiln(dir, args);
    assert!(o.status.success(), "kiln {args:?} failed:\n{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// Runs a command that must fail; returns its standard error, checked to contain each of `names`.
fn fails(dir: &Path, args: &[&str], names: &[&str]) -> String {
    let o = kiln(dir, args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "kiln {args:?} succeeded");
    assert!(!err.contains("panicked"), "kiln {args:?} panicked:\n{err}");
    for n in names {
        assert!(err.contains(n), "kiln {args:?}: the error does not name {n:?}:\n{err}");
    }
    err
}

fn b64decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("bad base64 byte {c}"),
    } as u32;
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c) << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// Every `src="..."`/`href="..."` of the page is a data URI or an existing file; every PNG
/// decodes; returns the embedded series JSON.
fn check_report(path: &Path) -> Value {
    let html = std::fs::read_to_string(path).unwrap();
    let mut pngs = 0;
    for attr in ["src=\"", "href=\""] {
        for piece in html.split(attr).skip(1) {
            let target = &piece[..piece.find('"').unwrap()];
            if let Some(b64) = target.strip_prefix("data:image/png;base64,") {
                let img = image::load_from_memory(&b64decode(b64)).expect("an embedded PNG does not decode");
                assert!(img.width() >= 300 && img.height() >= 300);
                pngs += 1;
            } else {
                assert!(
                    path.parent().unwrap().join(target).exists(),
                    "the report references {target}, which is missing"
                );
            }
        }
    }
    assert_eq!(pngs, 6, "loss, accuracy, learning rate, confusion, ROC, PR");
    // The per-layer profile names the model's layers.
    let profile = &html[html.find("<h2>Profile</h2>").expect("the report has a profile")..];
    assert!(
        profile.contains("conv2d_1") && profile.contains("sum of layers"),
        "{}",
        &profile[..400.min(profile.len())]
    );
    let start = html.find("id=\"kiln-series\">").unwrap() + "id=\"kiln-series\">".len();
    let end = start + html[start..].find("</script>").unwrap();
    serde_json::from_str(&html[start..end]).unwrap()
}

fn points(series: &Value, plot: &str, label: &str) -> Vec<(f64, f64)> {
    let s = series[plot].as_array().unwrap().iter().find(|s| s["label"] == label).unwrap();
    s["points"].as_array().unwrap().iter().map(|p| (p[0].as_f64().unwrap(), p[1].as_f64().unwrap())).collect()
}

/// The same points with y as f32 (loss and accuracy are f32 figures).
fn f32s(p: Vec<(f64, f64)>) -> Vec<(f64, f32)> {
    p.into_iter().map(|(x, y)| (x, y as f32)).collect()
}

#[test]
fn train_on_digits_then_eval_predict_summary_resume() {
    let dir = tmp("train");
    // JSON mode: one object per epoch, then the result.
    let out = ok(&dir, &["train", "--name", "t", "--epochs", "4", "--device", "cpu", "--json"]);
    let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5, "{out}");
    for (i, l) in lines[..4].iter().enumerate() {
        assert_eq!(l["epoch"], i + 1);
    }
    let result = &lines[4];
    let acc = result["val_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.93, "4 epochs on the digits reached only {acc}");
    let run = dir.join("runs/t");
    for f in
        ["config.toml", "model.safetensors", "model.toml", "history.csv", "history.json", "metrics.json", "report.html"]
    {
        assert!(run.join(f).exists(), "{f} missing");
    }
    assert!(!run.join("model.json").exists(), "the class names and preprocessing belong in the model file");
    assert!(std::fs::read_dir(run.join("checkpoints")).unwrap().count() >= 2);
    let history: Value = serde_json::from_str(&std::fs::read_to_string(run.join("history.json")).unwrap()).unwrap();
    let epochs = history["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 4);
    // Both are f32 figures (written as the shortest decimal for an f32 in history.json).
    assert_eq!(
        epochs[3]["val"]["accuracy"].as_f64().unwrap() as f32,
        acc as f32,
        "the stated accuracy is the history's"
    );
    assert_eq!(std::fs::read_to_string(run.join("history.csv")).unwrap().lines().count(), 5);

    // The report's plots are the history.
    let series = check_report(&run.join("report.html"));
    let train_loss: Vec<(f64, f64)> =
        epochs.iter().map(|e| (e["epoch"].as_f64().unwrap(), e["train"]["loss"].as_f64().unwrap())).collect();
    assert_eq!(f32s(points(&series, "loss", "train")), f32s(train_loss));
    let val_acc: Vec<(f64, f64)> =
        epochs.iter().map(|e| (e["epoch"].as_f64().unwrap(), e["val"]["accuracy"].as_f64().unwrap())).collect();
    assert_eq!(f32s(points(&series, "accuracy", "validation")), f32s(val_acc));
    let lr: Vec<(f64, f64)> = history["lr_steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_f64().unwrap(), p[1].as_f64().unwrap()))
        .collect();
    assert_eq!(lr.len(), 4 * 45, "one learning rate per step (45 batches of 32 per epoch)");
    assert_eq!(points(&series, "learning_rate", "learning rate"), lr);

    // eval on the same held-out part gives the same accuracy, and sklearn-style metrics.
    let e: Value = serde_json::from_str(&ok(&dir, &["eval", "runs/t", "--device", "cpu", "--json"])).unwrap();
    assert_eq!(e["accuracy"].as_f64().unwrap() as f32, acc as f32, "{e}");
    assert_eq!(e["samples"], 359);
    assert_eq!(e["confusion"]["counts"].as_array().unwrap().len(), 100);
    let table = ok(&dir, &["eval", "runs/t", "--device", "cpu"]);
    assert!(table.contains("macro avg") && table.contains("weighted avg") && table.contains("roc-auc"), "{table}");

    // predict on PNGs made from the data: most are recognised.
    let digits = kiln::data::digits().unwrap();
    use kiln::data::Dataset;
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    let mut truth = Vec::new();
    for i in 0..10 {
        let s = digits.get(i * 37).unwrap();
        let px: Vec<u8> = s.image.data().iter().map(|v| v.round() as u8).collect();
        image::GrayImage::from_raw(8, 8, px).unwrap().save(imgs.join(format!("{i}.png"))).unwrap();
        truth.push(s.label.to_string());
    }
    let out = ok(&dir, &["predict", "runs/t", "imgs", "--top", "2", "--device", "cpu", "--json"]);
    let preds: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(preds.len(), 10);
    let right = preds.iter().zip(&truth).filter(|(p, t)| p["top"][0]["class"] == t.as_str()).count();
    assert!(right >= 8, "{right}/10 recognised:\n{out}");
    assert_eq!(preds[0]["top"].as_array().unwrap().len(), 2);
    let plain = ok(&dir, &["predict", "runs/t/model.safetensors", "imgs/3.png", "--device", "cpu"]);
    assert!(plain.starts_with("imgs/3.png: ") && plain.contains('%'), "{plain}");
    // The model file alone is enough: a copy with nothing beside it predicts the same.
    std::fs::create_dir_all(dir.join("lone")).unwrap();
    std::fs::copy(run.join("model.safetensors"), dir.join("lone/model.safetensors")).unwrap();
    let lone = ok(&dir, &["predict", "lone/model.safetensors", "imgs/3.png", "--device", "cpu"]);
    assert_eq!(lone, plain);

    // summary of the written spec equals the model file's.
    let a = ok(&dir, &["summary", "runs/t/model.toml"]);
    let b = ok(&dir, &["summary", "runs/t"]);
    assert_eq!(a, b);
    assert!(a.contains("conv2d_1"), "{a}");

    // --resume continues to 5 epochs.
    let out = ok(&dir, &["train", "--name", "t", "--resume", "--epochs", "5", "--device", "cpu", "--json"]);
    assert_eq!(out.lines().count(), 2, "{out}");
    let history: Value = serde_json::from_str(&std::fs::read_to_string(run.join("history.json")).unwrap()).unwrap();
    assert_eq!(history["epochs"].as_array().unwrap().len(), 5);
    assert_eq!(history["lr_steps"].as_array().unwrap().len(), 5 * 45);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn plain_progress_when_not_a_terminal() {
    let dir = tmp("plain");
    let out = ok(&dir, &["train", "--name", "p", "--epochs", "1", "--device", "cpu"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("kiln train p: digits (1438 training images, validation split"), "{out}");
    assert!(lines.iter().any(|l| l.starts_with("epoch 1/1 batch 12/45 | ") && l.contains("samples/s | loss")), "{out}");
    assert!(lines.iter().any(|l| l.starts_with("epoch   1: loss ") && l.contains("| val loss")), "{out}");
    assert!(lines.last().unwrap().starts_with("report: runs/p/report.html"), "{out}");
    assert!(!out.contains('\r') && !out.contains('\u{1b}'), "no bar drawing when not a terminal");
    let quiet = ok(&dir, &["train", "--name", "q", "--epochs", "1", "--device", "cpu", "--quiet"]);
    assert!(!quiet.contains("epoch"), "{quiet}");
    std::fs::remove_dir_all(&dir).ok();
}

#[cfg(unix)]
#[test]
fn ctrl_c_saves_a_checkpoint_and_says_how_to_resume() {
    let dir = tmp("sigint");
    let mut child = Command::new(KILN)
        .args(["train", "--name", "c", "--epochs", "200", "--device", "cpu"])
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Wait for the first epoch to end, then interrupt.
    for l in lines.by_ref() {
        if l.unwrap().starts_with("epoch   1:") {
            break;
        }
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("interrupted: checkpoint saved to runs/c/checkpoints/epoch-"), "{err}");
    assert!(err.contains("resume with: kiln train --runs runs --name c --resume"), "{err}");
    let out = ok(&dir, &["train", "--name", "c", "--resume", "--epochs", "2", "--device", "cpu", "--quiet"]);
    assert!(out.contains("report: runs/c/report.html"), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_input_names_the_flag_file_or_line() {
    let dir = tmp("bad");
    let w = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
    w("unknown.toml", "input = [1, 8, 8]\n\n[[layers]]\ntype = \"conv3d\"\n");
    w("option.toml", "input = [1, 8, 8]\n\n[[layers]]\ntype = \"conv2d\"\nout_channels = 4\nkernel = -3\n");
    w("shape.toml", "input = [1, 8, 8]\n\n[[layers]]\ntype = \"conv2d\"\nout_channels = 4\nkernel = 9\n");
    w("notamodel.safetensors", "junk");
    fails(&dir, &["train", "--data", "bogus:x"], &["--data bogus:x", "unknown dataset"]);
    fails(&dir, &["train", "--data", "mnist:/nonexistent/mnist"], &["--data mnist:/nonexistent/mnist"]);
    fails(&dir, &["train", "--optimizer", "nope", "--epochs", "1"], &["--optimizer nope"]);
    fails(&dir, &["train", "--schedule", "nope", "--epochs", "1"], &["--schedule nope"]);
    fails(&dir, &["train", "--augment", "nope", "--epochs", "1"], &["--augment nope"]);
    fails(&dir, &["train", "--device", "tpu"], &["--device", "tpu"]);
    fails(&dir, &["train", "--precision", "fp8", "--epochs", "1"], &["--precision fp8", "f32, tf32, bf16 or f16"]);
    fails(&dir, &["train", "--precision", "bf16", "--device", "cpu"], &["--precision bf16", "--device cpu"]);
    fails(&dir, &["train", "--precision", "tf32", "--device", "cpu"], &["--precision tf32", "--device cpu"]);
    fails(&dir, &["train", "--epochs", "abc"], &["--epochs"]);
    fails(&dir, &["train", "--val-split", "1.5"], &["--val-split 1.5"]);
    fails(&dir, &["train", "--model", "missing.toml"], &["missing.toml"]);
    fails(&dir, &["train", "--model", "unknown.toml"], &["unknown.toml", "line 4", "conv3d"]);
    fails(&dir, &["train", "--model", "option.toml"], &["option.toml", "line 6", "field `kernel`"]);
    fails(&dir, &["train", "--model", "shape.toml"], &["shape.toml", "line 3", "conv2d_1"]);
    fails(&dir, &["train", "--model", "mnist_cnn"], &["--model mnist_cnn", "[1, 28, 28]", "[1, 8, 8]"]);
    fails(&dir, &["train", "--resume", "--name", "none"], &["--resume", "none"]);
    fails(&dir, &["eval", "nothere"], &["nothere"]);
    fails(&dir, &["eval", "notamodel.safetensors", "--data", "digits"], &["notamodel.safetensors"]);
    fails(&dir, &["predict", "nothere", "x.png"], &["nothere"]);
    fails(&dir, &["summary", "unknown.toml"], &["unknown.toml", "line 4"]);
    fails(&dir, &["summary", "nosuchmodel"], &["nosuchmodel"]);
    fails(&dir, &["bench", "--models", "nope"], &["--models", "nope"]);
    fails(&dir, &["launch"], &["no program"]);
    fails(&dir, &["frobnicate"], &["frobnicate"]);

    // Data that does not match a model: a colour image folder against the digits model, an image
    // of the wrong size for predict.
    let run = dir.join("runs/m");
    ok(&dir, &["train", "--name", "m", "--epochs", "1", "--device", "cpu", "--quiet"]);
    for class in ["a", "b"] {
        std::fs::create_dir_all(dir.join("folder").join(class)).unwrap();
        image::RgbImage::new(8, 8).save(dir.join("folder").join(class).join("x.png")).unwrap();
    }
    fails(
        &dir,
        &["eval", "runs/m", "--data", "folder:folder", "--device", "cpu"],
        &["--data folder:folder", "[3, 8, 8]"],
    );
    image::GrayImage::new(16, 16).save(dir.join("big.png")).unwrap();
    fails(&dir, &["predict", "runs/m", "big.png", "--device", "cpu"], &["big.png", "8x8"]);
    fails(&dir, &["predict", "runs/m", "nothere.png"], &["nothere.png"]);
    fails(&dir, &["train", "--name", "m", "--epochs", "1"], &["--name m", "--resume"]);
    assert!(run.join("model.safetensors").exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// Draws `n` 8x8 images of one colour (a little noise apiece) into `dir`.
fn draw(dir: &Path, n: usize, rgb: [u8; 3]) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        let img = image::RgbImage::from_fn(8, 8, |x, y| {
            image::Rgb(rgb.map(|c| c.saturating_add(((x * 7 + y * 3 + i as u32) % 9) as u8)))
        });
        img.save(dir.join(format!("{i}.png"))).unwrap();
    }
}

#[test]
fn predict_names_an_image_folder_s_classes_from_the_lone_model_file() {
    let dir = tmp("names");
    draw(&dir.join("folder/crimson"), 6, [220, 20, 30]);
    draw(&dir.join("folder/navy"), 6, [10, 20, 200]);
    ok(
        &dir,
        &[
            "train",
            "--name",
            "f",
            "--data",
            "folder:folder",
            "--image-size",
            "8",
            "--epochs",
            "2",
            "--batch",
            "4",
            "--device",
            "cpu",
            "--quiet",
        ],
    );
    // Only the model file, somewhere else, with no side file: class names and preprocessing
    // (the resize to 8x8 and the normalisation) come from its metadata.
    std::fs::create_dir_all(dir.join("elsewhere")).unwrap();
    std::fs::copy(dir.join("runs/f/model.safetensors"), dir.join("elsewhere/m.safetensors")).unwrap();
    draw(&dir.join("big"), 1, [220, 20, 30]);
    image::imageops::resize(
        &image::open(dir.join("big/0.png")).unwrap().to_rgb8(),
        24,
        24,
        image::imageops::FilterType::Nearest,
    )
    .save(dir.join("big/0.png"))
    .unwrap();
    let out = ok(&dir, &["predict", "elsewhere/m.safetensors", "big/0.png", "--top", "2", "--device", "cpu", "--json"]);
    let p: Value = serde_json::from_str(out.trim()).unwrap();
    let mut names: Vec<&str> = p["top"].as_array().unwrap().iter().map(|t| t["class"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["crimson", "navy"], "{out}");
    let plain = ok(&dir, &["predict", "elsewhere/m.safetensors", "big/0.png", "--device", "cpu"]);
    assert!(plain.contains("crimson") || plain.contains("navy"), "{plain}");
    // Without the metadata (the model saved plainly) predict says what is missing.
    let model = kiln::model::Model::load(dir.join("elsewhere/m.safetensors")).unwrap();
    model.save(dir.join("elsewhere/plain.safetensors")).unwrap();
    fails(&dir, &["predict", "elsewhere/plain.safetensors", "big/0.png"], &["plain.safetensors", "class names"]);
    // A run folder written before the metadata moved into the model file: model.json beside it
    // is still read.
    let meta = kiln::model::Model::load_metadata(dir.join("elsewhere/m.safetensors")).unwrap();
    std::fs::write(dir.join("elsewhere/plain.json"), &meta["kiln_cli.model"]).unwrap();
    let old =
        ok(&dir, &["predict", "elsewhere/plain.safetensors", "big/0.png", "--top", "2", "--device", "cpu", "--json"]);
    assert_eq!(old.replace("plain.safetensors", "m.safetensors"), out);
    std::fs::remove_dir_all(&dir).ok();
}
