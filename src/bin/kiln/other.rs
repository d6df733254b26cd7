//! `kiln eval`, `kiln predict`, `kiln summary` and `kiln bench`, and the model resolution
//! `summary` and `profile` share.

use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln::backend::Device;
use kiln::data::{Image, Transform};
use kiln::model::{Model, ModelSpec};
use kiln::rng::Rng;
use kiln::tensor::Tensor;
use kiln::train::{Trainer, TrainerConfig};

use crate::data::{self, DataSource};
use crate::models::{self, ZOO};
use crate::{BenchArgs, CmdResult, EvalArgs, PredictArgs, SummaryArgs};

pub fn device(s: &str) -> Result<Device, String> {
    s.parse().map_err(|e: kiln::Error| format!("--device: {e}"))
}

fn trainer(model: &Model, batch: usize, dev: Device) -> Result<Trainer, String> {
    Trainer::new(model, TrainerConfig { batch_size: batch, device: dev, top_k: 5, ..Default::default() })
        .map_err(|e| e.to_string())
}

pub fn eval(a: EvalArgs) -> CmdResult {
    if a.batch == 0 {
        return Err("--batch: must be at least 1".into());
    }
    let dev = device(&a.device)?;
    let (model, meta, path) = models::load_model(&a.model)?;
    let src = match (&a.data, &meta) {
        (Some(d), _) => DataSource::parse(d)?,
        (None, Some(m)) => m.data.clone(),
        (None, None) => {
            return Err(format!("{}: no kiln train metadata in it (data, preprocessing): give --data", path.display()));
        }
    };
    let (val_split, seed) = meta.as_ref().map_or((data::recipe(&src.kind).val_split, 1), |m| (m.val_split, m.seed));
    let size = meta.as_ref().map_or(64, |m| m.preprocess.input[1]);
    let loaded = data::load(&src, val_split, seed, size)?;
    let pre = meta.as_ref().map_or(loaded.pre.clone(), |m| m.preprocess.clone());
    let classes = meta.as_ref().map_or(loaded.classes.clone(), |m| m.classes.clone());
    let input = &model.input_shape()[1..];
    if input != loaded.pre.input.as_slice() {
        return Err(format!(
            "--data {}: gives inputs of shape {:?}, but {} takes {input:?}",
            src.describe(),
            loaded.pre.input,
            path.display()
        ));
    }
    let outputs: usize = model.output_shape()[1..].iter().product();
    if outputs != loaded.classes.len() {
        return Err(format!(
            "--data {}: has {} classes, but {} has {outputs} outputs",
            src.describe(),
            loaded.classes.len(),
            path.display()
        ));
    }
    let (set, what) = match (&loaded.val, a.train_split) {
        (Some(v), false) => (v.clone(), loaded.val_name.clone()),
        _ => (loaded.train.clone(), "training data".to_string()),
    };
    let loader = data::loader(set, a.batch, false, seed, pre.transform()?)?;
    let mut t = trainer(&model, a.batch, dev)?;
    let m = t.evaluate(&loader).map_err(|e| e.to_string())?;
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    let mut shape = Vec::new();
    for b in loader.epoch(0) {
        let b = b.map_err(|e| e.to_string())?;
        shape = b.inputs.shape().to_vec();
        xs.extend_from_slice(b.inputs.data());
        ys.extend_from_slice(&b.labels);
    }
    shape[0] = ys.len();
    let x = Tensor::new(&shape, xs).map_err(|e| e.to_string())?;
    let e = crate::run::evaluate_proba(&mut t, &x, &ys, outputs)?;
    if a.out.json {
        let v = serde_json::json!({
            "model": path.display().to_string(),
            "data": src.describe(),
            "split": what,
            "samples": m.samples,
            "loss": m.loss,
            "accuracy": m.accuracy,
            "top_k": m.top_k,
            "top_k_accuracy": m.top_k_accuracy,
            "classes": classes,
            "report": e.report,
            "confusion": e.confusion,
            "roc_auc": e.roc_auc,
            "average_precision": e.average_precision,
            "macro_roc_auc": e.macro_roc_auc,
            "macro_average_precision": e.macro_average_precision,
        });
        println!("{v}");
        return Ok(());
    }
    println!("{} on {}: {what}", path.display(), src.describe());
    println!(
        "loss {:.4}  accuracy {:.2}%  top-{} {:.2}%\n",
        m.loss,
        m.accuracy.unwrap_or(0.0) * 100.0,
        m.top_k,
        m.top_k_accuracy.unwrap_or(0.0) * 100.0
    );
    if !a.out.quiet {
        print!("{}", e.table(Some(&classes)));
        println!("\nconfusion matrix (rows: true class, columns: predicted)");
        print!("{}", e.confusion_table(Some(&classes)));
    }
    Ok(())
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

/// Decodes an image file to CHW 0..=255 values with `channels` channels (grey: torchvision's
/// weights 0.2989 R + 0.587 G + 0.114 B, as `ImageFolder`).
fn read_image(p: &Path, channels: usize) -> Result<Image, String> {
    let img = image::open(p).map_err(|e| format!("{}: {e}", p.display()))?.to_rgb8();
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    let mut data = vec![0f32; channels * h * w];
    for (x, y, px) in img.enumerate_pixels() {
        let (x, y) = (x as usize, y as usize);
        let [r, g, b] = px.0.map(f32::from);
        if channels == 1 {
            data[y * w + x] = 0.2989 * r + 0.587 * g + 0.114 * b;
        } else {
            for (c, v) in [r, g, b].into_iter().enumerate() {
                data[c * h * w + y * w + x] = v;
            }
        }
    }
    Image::new(channels, h, w, data).map_err(|e| format!("{}: {e}", p.display()))
}

pub fn predict(a: PredictArgs) -> CmdResult {
    let dev = device(&a.device)?;
    let (model, meta, path) = models::load_model(&a.model)?;
    let meta = meta.ok_or_else(|| {
        format!(
            "{}: no kiln train metadata in it (the preprocessing and class names `kiln train` stores in the model file)",
            path.display()
        )
    })?;
    let pre = &meta.preprocess;
    let transform = pre.transform()?;
    let mut files: Vec<PathBuf> = Vec::new();
    for p in &a.images {
        if p.is_dir() {
            let mut inner: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| is_image(f))
                .collect();
            if inner.is_empty() {
                return Err(format!("{}: no PNG or JPEG images in this folder", p.display()));
            }
            inner.sort();
            files.extend(inner);
        } else if p.exists() {
            files.push(p.clone());
        } else {
            return Err(format!("{}: no such file", p.display()));
        }
    }
    let (c, h, w) = (pre.input[0], pre.input[1], pre.input[2]);
    let mut xs = Vec::with_capacity(files.len() * c * h * w);
    let mut rng = Rng::new(0);
    for f in &files {
        let img = read_image(f, c)?;
        if !pre.resize && (img.height() != h || img.width() != w) {
            return Err(format!(
                "{}: is {}x{}, but the model takes {h}x{w} images",
                f.display(),
                img.width(),
                img.height()
            ));
        }
        let img = transform.apply(img, &mut rng).map_err(|e| format!("{}: {e}", f.display()))?;
        xs.extend_from_slice(img.data());
    }
    let x = Tensor::new(&[files.len(), c, h, w], xs).map_err(|e| e.to_string())?;
    let mut t = trainer(&model, files.len().clamp(1, 256), dev)?;
    let p = t.predict_proba(&x).map_err(|e| e.to_string())?;
    let k = meta.classes.len().max(1);
    for (f, row) in files.iter().zip(p.data().chunks(k)) {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&i, &j| row[j].total_cmp(&row[i]).then(i.cmp(&j)));
        let top: Vec<(String, f32)> = order
            .iter()
            .take(a.top.max(1))
            .map(|&i| (meta.classes.get(i).cloned().unwrap_or_else(|| i.to_string()), row[i]))
            .collect();
        if a.json {
            let v = serde_json::json!({
                "image": f.display().to_string(),
                "top": top.iter().map(|(c, p)| serde_json::json!({"class": c, "probability": p})).collect::<Vec<_>>(),
            });
            println!("{v}");
        } else {
            let s: Vec<String> = top.iter().map(|(c, p)| format!("{c} {:.1}%", p * 100.0)).collect();
            println!("{}: {}", f.display(), s.join(", "));
        }
    }
    Ok(())
}

/// The model a `summary`/`profile` argument names: a zoo name, a spec file (.toml), a kiln model
/// file or a run folder; built (or rebuilt) at `batch` when given.
pub fn any_model(name: &str, batch: Option<usize>, classes: usize) -> Result<Model, String> {
    Ok(if let Some(b) = models::zoo(name, batch.unwrap_or(1), classes) {
        b.build().map_err(|e| format!("{name}: {e}"))?
    } else if name.ends_with(".toml") {
        ModelSpec::read(name).and_then(|s| s.build(batch)).map_err(|e| e.to_string())?
    } else if Path::new(name).exists() {
        let (m, _, _) = models::load_model(Path::new(name))?;
        match batch {
            // The summary's memory figures use the builder's batch size: rebuild at `b`,
            // keeping the weights.
            Some(b) => {
                let spec = m.to_spec().map_err(|e| e.to_string())?;
                let mut rebuilt =
                    ModelSpec::parse(&spec, name).and_then(|s| s.build(Some(b))).map_err(|e| e.to_string())?;
                for p in m.params() {
                    let v = m.param(&p.name).ok_or_else(|| format!("{name}: no parameter {}", p.name))?.to_vec();
                    rebuilt.set_param(&p.name, &v).map_err(|e| e.to_string())?;
                }
                rebuilt
            }
            None => m,
        }
    } else {
        return Err(format!("{name}: no such file, and not a zoo name ({ZOO})"));
    })
}

pub fn summary(a: SummaryArgs) -> CmdResult {
    if a.batch == Some(0) {
        return Err("--batch: must be at least 1".into());
    }
    let model = any_model(&a.model, a.batch, a.classes)?;
    if a.spec {
        print!("{}", model.to_spec().map_err(|e| e.to_string())?);
    } else {
        print!("{}", model.summary());
    }
    Ok(())
}

pub fn bench(a: BenchArgs) -> CmdResult {
    let dev = device(&a.device)?;
    if a.groups == 0 || a.steps == 0 || a.batches.contains(&0) {
        return Err("--groups, --steps and --batches must be at least 1".into());
    }
    for m in &a.models {
        if models::zoo(m, 1, 10).is_none() {
            return Err(format!("--models: unknown model '{m}' (expected one of {ZOO})"));
        }
    }
    println!("model,batch,device,ms_per_step,images_per_s,peak_mib");
    for name in &a.models {
        for &batch in &a.batches {
            let model =
                models::zoo(name, batch, 10).map(|b| b.seed(0).build()).transpose().map_err(|e| e.to_string())?;
            let Some(model) = model else { continue };
            let config = TrainerConfig {
                batch_size: batch,
                device: dev,
                deterministic: !a.nondeterministic,
                ..Default::default()
            };
            let mut t = match Trainer::new(&model, config) {
                Ok(t) => t,
                Err(e) => {
                    println!("{name},{batch},{},ERROR,{e}", a.device);
                    continue;
                }
            };
            let shape = model.input_shape();
            let mut r = Rng::new(1);
            let x = Tensor::new(&shape, (0..shape.iter().product()).map(|_| r.normal()).collect())
                .map_err(|e| e.to_string())?;
            let classes: usize = model.output_shape()[1..].iter().product();
            let y: Vec<u32> = (0..batch).map(|_| r.below(classes as u64) as u32).collect();
            let step = |t: &mut Trainer| t.train_step(&x, &y).map_err(|e| e.to_string());
            for _ in 0..3 {
                step(&mut t)?;
            }
            t.executor().backend_mut().synchronize().map_err(|e| e.to_string())?;
            let mut groups = Vec::new();
            for _ in 0..a.groups {
                let t0 = Instant::now();
                for _ in 0..a.steps {
                    step(&mut t)?;
                }
                t.executor().backend_mut().synchronize().map_err(|e| e.to_string())?;
                groups.push(t0.elapsed().as_secs_f64() * 1e3 / a.steps as f64);
            }
            groups.sort_by(f64::total_cmp);
            let ms = groups[groups.len() / 2];
            let peak = t.executor().backend().peak_memory().unwrap_or(0) as f64 / (1u64 << 20) as f64;
            let loss = t.take_epoch_metrics().map_err(|e| e.to_string())?.loss;
            if !loss.is_finite() {
                return Err(format!("{name} at batch {batch}: the loss is {loss}"));
            }
            println!("{name},{batch},{},{ms:.4},{:.0},{peak:.0}", t.device(), batch as f64 / ms * 1e3);
        }
    }
    Ok(())
}
