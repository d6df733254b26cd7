//! `kiln export` and `kiln import`, run as a user runs them: a model trained briefly on the
//! embedded digits goes to ONNX and back, and the imported model evaluates to the same logits,
//! loss and accuracy; its class names travel in the ONNX metadata. Bad input exits non-zero
//! with an error naming the flag or file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln::backend::cpu::CpuBackend;
use kiln::exec::{Executor, Mode};
use kiln::model::{Layer, Model};
use kiln::rng::Rng;
use kiln::tensor::Tensor;
use serde_json::Value;

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-cli-onnx-{name}-{}", std::process::id()));
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

/// Runs a command that must fail; checks that its standard error names each of `names`.
fn fails(dir: &Path, args: &[&str], names: &[&str]) {
    let o = kiln(dir, args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "kiln {args:?} succeeded");
    assert!(!err.contains("panicked"), "kiln {args:?} panicked:\n{err}");
    for n in names {
        assert!(err.contains(n), "kiln {args:?}: the error does not name {n:?}:\n{err}");
    }
}

fn logits(model: &Model, x: &Tensor) -> Vec<f32> {
    let mut exec = Executor::new(model, CpuBackend::<f32>::new(Some(1)).unwrap()).unwrap();
    exec.predict(x, Mode::Eval).unwrap().data().to_vec()
}

#[test]
fn export_import_eval_gives_the_same_logits_and_metrics() {
    let dir = tmp("roundtrip");
    ok(&dir, &["train", "--name", "t", "--epochs", "1", "--device", "cpu", "--quiet"]);
    let out = ok(&dir, &["export", "runs/t", "t.onnx"]);
    assert!(out.contains("t.onnx") && out.contains("opset 18"), "{out}");
    ok(&dir, &["export", "runs/t/model.safetensors", "t13.onnx", "--opset", "13", "--static-batch"]);

    // Class names and the CLI's side file travel as metadata.
    let meta = kiln::io::onnx::metadata(dir.join("t.onnx")).unwrap();
    let names: Vec<String> = (0..10).map(|d| d.to_string()).collect();
    let class_names = meta.iter().find(|(k, _)| k == "kiln.class_names").map(|(_, v)| v.clone());
    assert_eq!(class_names, Some(serde_json::to_string(&names).unwrap()), "{meta:?}");

    let original = Model::load(dir.join("runs/t/model.safetensors")).unwrap();
    let mut rng = Rng::new(3);
    let mut shape = original.input_shape();
    shape[0] = 5;
    let n = shape.iter().product();
    let x = Tensor::new(&shape, (0..n).map(|_| rng.uniform_range(0.0, 1.0)).collect()).unwrap();
    let want = logits(&original, &x);
    for file in ["t.onnx", "t13.onnx"] {
        let back = format!("{file}.safetensors");
        let out = ok(&dir, &["import", file, &back]);
        assert!(out.contains(&back), "{out}");
        assert!(!dir.join(format!("{file}.json")).exists(), "{file}: a side file was written");
        let meta = Model::load_metadata(dir.join(&back)).unwrap();
        assert!(meta.contains_key("kiln_cli.model"), "{file}: no CLI metadata in the model file: {meta:?}");
        let imported = Model::load(dir.join(&back)).unwrap();
        assert_eq!(imported.param_count(), original.param_count(), "{file}");
        let got = logits(&imported, &x);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{file}: logit {g} where kiln gave {w}");
        }
    }

    // eval reads the metadata the import wrote back into the model file: same data, same numbers.
    let eval = |model: &str| -> Value {
        let out = ok(&dir, &["eval", model, "--device", "cpu", "--json"]);
        serde_json::from_str(out.lines().last().unwrap()).unwrap()
    };
    let (a, b) = (eval("runs/t"), eval("t.onnx.safetensors"));
    assert_eq!(a["samples"], b["samples"]);
    assert_eq!(a["accuracy"], b["accuracy"]);
    assert_eq!(a["confusion"], b["confusion"]);
    let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
    assert!((la - lb).abs() <= 1e-5 * la.abs().max(1.0), "loss {lb} after the round trip, {la} before");
    // The imported model is a kiln model file like any other: it trains further.
    ok(
        &dir,
        &["train", "--name", "again", "--model", "t.onnx.safetensors", "--epochs", "1", "--device", "cpu", "--quiet"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_file_without_kiln_metadata_imports_without_a_side_file() {
    let dir = tmp("plain");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/groupnorm-legacy-op13.onnx");
    let out = ok(&dir, &["import", fixture.to_str().unwrap(), "gn.safetensors"]);
    assert!(out.contains("--data"), "{out}");
    assert!(!dir.join("gn.json").exists());
    let m = Model::load(dir.join("gn.safetensors")).unwrap();
    assert_eq!(m.nodes().iter().filter(|n| matches!(n.layer, Layer::GroupNorm(_))).count(), 4);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_names_the_flag_or_file() {
    let dir = tmp("bad");
    std::fs::write(dir.join("garbage.onnx"), b"this is not protobuf").unwrap();
    fails(&dir, &["export", "missing.safetensors", "x.onnx"], &["missing.safetensors"]);
    fails(&dir, &["import", "missing.onnx", "x.safetensors"], &["missing.onnx"]);
    fails(&dir, &["import", "garbage.onnx", "x.safetensors"], &["garbage.onnx", "not a valid ONNX file"]);
    fails(&dir, &["import"], &["FILE"]);
    ok(&dir, &["train", "--name", "m", "--epochs", "1", "--device", "cpu", "--quiet"]);
    for opset in ["12", "21", "x"] {
        fails(&dir, &["export", "runs/m", "x.onnx", "--opset", opset], &["--opset", opset]);
    }
    fails(&dir, &["export", "runs/m", "no/such/dir/x.onnx"], &["no/such/dir"]);
    assert!(!dir.join("x.onnx").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
