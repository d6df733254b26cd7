//! `kiln train`: resolves the recipe, trains with progress, checkpoints and Ctrl-C handling, and
//! writes the run folder:
//!
//! ```text
//! runs/NAME/config.toml          the resolved config (what --resume reads)
//! runs/NAME/model.safetensors    the trained model (kiln model file; data, class names, preprocessing in its metadata)
//! runs/NAME/model.toml           its spec
//! runs/NAME/checkpoints/         CheckpointManager: the last 2 epochs and the best by val accuracy
//! runs/NAME/history.csv, history.json, metrics.json, report.html
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use kiln::backend::Device;
use kiln::data::Dataset;
use kiln::io::CheckpointManager;
use kiln::metrics::Evaluation;
use kiln::report::Report;
use kiln::tensor::Tensor;
use kiln::train::{
    Callback, Control, EpochLog, Monitor, Optimizer, Precision, Progress, ProgressStyle, Schedule, ScheduleUnit,
    Trainer, TrainerConfig,
};
use serde::{Deserialize, Serialize};

use crate::data::{self, DataSource};
use crate::models::{self, ModelMeta};
use crate::{CmdResult, TrainArgs};

/// Everything a run was trained with (`runs/NAME/config.toml`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunConfig {
    pub name: String,
    pub data: String,
    pub val_split: f64,
    pub image_size: usize,
    pub model: String,
    pub epochs: usize,
    pub batch: usize,
    pub optimizer: String,
    pub lr: f64,
    pub weight_decay: f64,
    pub schedule: String,
    pub augment: String,
    pub device: String,
    /// f32, tf32 (CUDA's TF32 tensor-core mode for convolutions and dense layers), bf16 (mixed
    /// precision: those layers in bf16 with f32 accumulation, everything else f32) or f16 (the
    /// same in f16, with dynamic loss scaling).
    #[serde(default = "f32_name")]
    pub precision: String,
    pub seed: u64,
}

fn f32_name() -> String {
    "f32".into()
}

/// The step's number format `--precision` asks for. The library accepts TF32 on the CPU (as
/// PyTorch's flags, it computes in f32 there, with a notice); asked for together with
/// `--device cpu` it is refused here, as a contradiction in the command.
fn precision(precision: &str, device: &str) -> Result<Precision, String> {
    match precision {
        "f32" => Ok(Precision::F32),
        "tf32" | "bf16" | "f16" if device == "cpu" => Err(format!(
            "--precision {precision}: {} is a mode of NVIDIA tensor cores; on --device cpu kiln computes in f32 (use --precision f32)",
            precision.to_uppercase()
        )),
        "tf32" => Ok(Precision::Tf32),
        "bf16" => Ok(Precision::Bf16Mixed),
        "f16" => Ok(Precision::F16Mixed),
        other => Err(format!("--precision {other}: expected f32, tf32, bf16 or f16")),
    }
}

fn optimizer(name: &str, wd: f64) -> Result<Optimizer, String> {
    let wd = wd as f32;
    Ok(match name {
        "adam" => match Optimizer::adam() {
            Optimizer::Adam { beta1, beta2, eps, amsgrad, .. } => {
                Optimizer::Adam { beta1, beta2, eps, weight_decay: wd, amsgrad }
            }
            o => o,
        },
        "adamw" => match Optimizer::adamw() {
            Optimizer::AdamW { beta1, beta2, eps, amsgrad, weight_decay } => {
                Optimizer::AdamW { beta1, beta2, eps, weight_decay: if wd > 0.0 { wd } else { weight_decay }, amsgrad }
            }
            o => o,
        },
        "sgd" => match Optimizer::sgd(0.9) {
            Optimizer::Sgd { momentum, dampening, .. } => {
                Optimizer::Sgd { momentum, dampening, nesterov: true, weight_decay: wd }
            }
            o => o,
        },
        "rmsprop" => Optimizer::rmsprop(),
        other => return Err(format!("--optimizer {other}: expected adam, adamw, sgd or rmsprop")),
    })
}

fn schedule(name: &str, lr: f64, steps: usize) -> Result<Option<Schedule>, String> {
    Ok(match name {
        "onecycle" => Some(Schedule::one_cycle(lr, steps.max(1))),
        "cosine" => Some(Schedule::Cosine { t_max: steps.max(1), eta_min: 0.0 }),
        "constant" => None,
        other => return Err(format!("--schedule {other}: expected onecycle, cosine or constant")),
    })
}

/// Stops `fit` after the batch during which Ctrl-C was pressed.
struct Interrupt(Arc<AtomicBool>);

impl Callback for Interrupt {
    fn on_batch_end(&mut self, _: &mut Trainer) -> kiln::Result<Control> {
        Ok(if self.0.load(Ordering::Relaxed) { Control::Stop } else { Control::Continue })
    }
}

fn new_name(runs: &Path, base: &str) -> String {
    if !runs.join(base).exists() {
        return base.to_string();
    }
    (2..).map(|k| format!("{base}-{k}")).find(|n| !runs.join(n).exists()).unwrap_or_else(|| base.into())
}

fn io<T>(path: &Path, r: std::io::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{}: {e}", path.display()))
}

/// The resolved config from the flags (a new run) or from the run folder (`--resume`).
fn resolve(a: &TrainArgs) -> Result<RunConfig, String> {
    if a.resume {
        let name = a.name.clone().unwrap_or_default();
        let path = a.runs.join(&name).join("config.toml");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!("--resume: {}: {e} (no run named '{name}' in {})", path.display(), a.runs.display())
        })?;
        let mut c: RunConfig = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(e) = a.epochs {
            c.epochs = e;
        }
        if a.device != "auto" {
            c.device = a.device.clone();
        }
        return Ok(c);
    }
    let src = DataSource::parse(&a.data)?;
    let r = data::recipe(&src.kind);
    let name = match &a.name {
        Some(n) if n.is_empty() || n.contains(['/', '\\']) || n == "." || n == ".." => {
            return Err(format!("--name '{n}': a run name is a plain folder name"));
        }
        Some(n) if a.runs.join(n).join("config.toml").exists() => {
            return Err(format!(
                "--name {n}: {} already holds a run (add --resume to continue it, or choose another name)",
                a.runs.join(n).display()
            ));
        }
        Some(n) => n.clone(),
        None => new_name(&a.runs, &src.kind),
    };
    let pos = |flag: &str, v: f64| {
        if v > 0.0 && v.is_finite() { Ok(v) } else { Err(format!("{flag} {v}: must be positive")) }
    };
    Ok(RunConfig {
        name,
        data: a.data.clone(),
        val_split: a.val_split.unwrap_or(r.val_split),
        image_size: a.image_size,
        model: a.model.clone(),
        epochs: a.epochs.unwrap_or(r.epochs),
        batch: a.batch.unwrap_or(r.batch),
        optimizer: a.optimizer.clone().unwrap_or_else(|| r.optimizer.into()),
        lr: pos("--lr", a.lr.unwrap_or(r.lr))?,
        weight_decay: a.weight_decay.unwrap_or(r.weight_decay),
        schedule: a.schedule.clone().unwrap_or_else(|| r.schedule.into()),
        augment: a.augment.clone().unwrap_or_else(|| r.augment.into()),
        device: a.device.clone(),
        precision: a.precision.clone(),
        seed: a.seed,
    })
}

/// Every image and label of `d`, through `loader`'s transform (evaluation order).
fn collect(loader: &kiln::data::DataLoader) -> Result<(Tensor, Vec<u32>), String> {
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    let mut shape = vec![];
    for b in loader.epoch(0) {
        let b = b.map_err(|e| e.to_string())?;
        shape = b.inputs.shape().to_vec();
        xs.extend_from_slice(b.inputs.data());
        ys.extend_from_slice(&b.labels);
        loader.recycle(b);
    }
    shape[0] = ys.len();
    Ok((Tensor::new(&shape, xs).map_err(|e| e.to_string())?, ys))
}

/// Class probabilities of `x` and the metrics they give.
pub fn evaluate_proba(trainer: &mut Trainer, x: &Tensor, y: &[u32], classes: usize) -> Result<Evaluation, String> {
    let p = trainer.predict_proba(x).map_err(|e| e.to_string())?;
    Evaluation::from_proba(p.data(), classes, y).map_err(|e| e.to_string())
}

pub fn train(a: TrainArgs) -> CmdResult {
    if a.batch == Some(0) || a.epochs == Some(0) {
        return Err(format!("--{}: must be at least 1", if a.batch == Some(0) { "batch" } else { "epochs" }));
    }
    let t_start = Instant::now();
    let cfg = resolve(&a)?;
    let dir = a.runs.join(&cfg.name);
    let device: Device = cfg.device.parse().map_err(|e: kiln::Error| format!("--device: {e}"))?;
    let precision = precision(&cfg.precision, &cfg.device)?;
    let src = DataSource::parse(&cfg.data)?;
    let recipe = data::recipe(&src.kind);
    let loaded = data::load(&src, cfg.val_split, cfg.seed, cfg.image_size)?;
    let classes = loaded.classes.len();
    let train_loader = data::loader(
        loaded.train.clone(),
        cfg.batch,
        true,
        cfg.seed,
        data::train_transform(&loaded.pre, &cfg.augment)?,
    )?;
    let val_loader = match &loaded.val {
        Some(v) => Some(data::loader(v.clone(), cfg.batch.max(256), false, cfg.seed, loaded.pre.transform()?)?),
        None => None,
    };
    let batches = train_loader.len();
    let steps = batches * cfg.epochs;
    let style = if a.out.json {
        ProgressStyle::Json
    } else if a.out.quiet {
        ProgressStyle::Quiet
    } else {
        ProgressStyle::Auto
    };
    let mut progress = Progress::new(style, batches, cfg.epochs);

    let ckpt_dir = dir.join("checkpoints");
    let mut manager = CheckpointManager::new(&ckpt_dir)
        .map_err(|e| e.to_string())?
        .every_epochs(1)
        .keep_last(2)
        .best(if val_loader.is_some() { Monitor::ValAccuracy } else { Monitor::TrainAccuracy });
    let mut trainer = if a.resume {
        let latest = manager
            .latest()
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("--resume: no checkpoint in {}", ckpt_dir.display()))?;
        progress.println(&format!("resuming {} from {}", cfg.name, latest.display()));
        Trainer::resume_on(&latest, device).map_err(|e| e.to_string())?
    } else {
        let model = models::resolve(&cfg.model, recipe.spec, &loaded.pre.input, classes, cfg.batch, cfg.seed)?;
        let config = TrainerConfig {
            batch_size: cfg.batch,
            learning_rate: cfg.lr,
            optimizer: optimizer(&cfg.optimizer, cfg.weight_decay)?,
            schedule: schedule(&cfg.schedule, cfg.lr, steps)?,
            schedule_unit: ScheduleUnit::Batch,
            device,
            precision,
            seed: cfg.seed,
            ..Default::default()
        };
        let t = Trainer::new(&model, config).map_err(|e| e.to_string())?;
        io(&dir, std::fs::create_dir_all(&dir))?;
        let text = toml::to_string(&cfg).map_err(|e| e.to_string())?;
        io(&dir, std::fs::write(dir.join("config.toml"), format!("# kiln train, resolved config\n{text}")))?;
        t
    };
    let mut history = load_history(&dir);
    history.lr_steps.retain(|&(s, _)| s <= trainer.steps_taken());
    history.epochs.truncate(trainer.epochs_done());
    if !a.out.json && !a.out.quiet {
        progress.println(&format!(
            "kiln train {}: {} ({} training images{}), {} epochs of {} batches of {} on {}",
            cfg.name,
            src.describe(),
            loaded.train.len(),
            loaded.val.as_ref().map_or(String::new(), |_| format!(", {}", loaded.val_name)),
            cfg.epochs,
            batches,
            cfg.batch,
            trainer.device()
        ));
    }

    let stop = Arc::new(AtomicBool::new(false));
    #[cfg(unix)]
    {
        // First Ctrl-C: finish the batch, save, exit. A second one exits at once.
        use signal_hook::consts::{SIGINT, SIGTERM};
        for sig in [SIGINT, SIGTERM] {
            let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&stop));
            let _ = signal_hook::flag::register(sig, Arc::clone(&stop));
        }
    }
    let mut interrupt = Interrupt(Arc::clone(&stop));
    let fit = trainer.fit_with(
        &train_loader,
        val_loader.as_ref(),
        cfg.epochs,
        &mut [&mut progress, &mut manager, &mut interrupt],
    );
    history.lr_steps.extend_from_slice(progress.lr_steps());
    history.epochs = trainer.history().epochs.clone();
    fit.map_err(|e| e.to_string())?;
    write_history(&dir, &history)?;
    if stop.load(Ordering::Relaxed) {
        let path = manager.save(&mut trainer).map_err(|e| e.to_string())?;
        eprintln!(
            "\ninterrupted: checkpoint saved to {}\nresume with: kiln train --runs {} --name {} --resume",
            path.display(),
            a.runs.display(),
            cfg.name
        );
        return Err("interrupted".into());
    }

    // The trained model (with the data, class names and preprocessing in its metadata) and spec.
    let model = trainer.model().map_err(|e| e.to_string())?.clone();
    let model_file = dir.join("model.safetensors");
    let meta = ModelMeta {
        data: src.clone(),
        val_split: cfg.val_split,
        seed: cfg.seed,
        classes: loaded.classes.clone(),
        preprocess: loaded.pre.clone(),
    };
    models::save_model(&model, &model_file, &meta)?;
    // A side file left by an older kiln in this run folder would describe an older model.
    let side = models::meta_path(&model_file);
    if side.exists() {
        io(&side, std::fs::remove_file(&side))?;
    }
    if let Ok(spec) = model.to_spec() {
        io(&dir, std::fs::write(dir.join("model.toml"), spec))?;
    }

    // Metrics on the validation part and the report.
    let evaluation = match &val_loader {
        Some(v) => {
            let (x, y) = collect(v)?;
            Some(evaluate_proba(&mut trainer, &x, &y, classes)?)
        }
        None => None,
    };
    if let Some(e) = &evaluation {
        let text = serde_json::to_string_pretty(e).map_err(|e| e.to_string())?;
        io(&dir, std::fs::write(dir.join("metrics.json"), text))?;
    }
    let last = history.epochs.last().cloned();
    let seconds = t_start.elapsed().as_secs_f64();
    let val_acc = last.as_ref().and_then(|l| l.val).and_then(|m| m.accuracy);
    let mut facts = vec![
        ("data".to_string(), src.describe()),
        ("device".to_string(), trainer.device()),
        ("epochs".to_string(), format!("{} of {} batches of {}", history.epochs.len(), batches, cfg.batch)),
        ("wall time".to_string(), format!("{seconds:.1} s (this invocation)")),
    ];
    if let Some(a) = val_acc {
        facts.push((format!("accuracy on the {}", loaded.val_name), format!("{:.2}%", a * 100.0)));
    }
    // The per-layer profile of the trained model at the training batch size (a few passes on
    // random inputs; parameters are left as they are).
    let profile = trainer.executor().profile(cfg.batch, 5).map_err(|e| format!("profiling the model: {e}"))?;
    let report = Report {
        title: cfg.name.clone(),
        facts,
        history: &history.epochs,
        lr_steps: &history.lr_steps,
        evaluation: evaluation.as_ref().map(|e| (e, loaded.val_name.clone())),
        class_names: loaded.classes.clone(),
        summary: model.summary(),
        config: toml::to_string(&cfg).unwrap_or_default(),
        profile: Some(profile.to_string()),
    };
    let html = report.render().map_err(|e| e.to_string())?;
    let report_path = dir.join("report.html");
    io(&report_path, std::fs::write(&report_path, html))?;

    let final_line = serde_json::json!({
        "run": dir.display().to_string(),
        "epochs": history.epochs.len(),
        "val_accuracy": val_acc,
        "train_accuracy": last.as_ref().and_then(|l| l.train.accuracy),
        "seconds": seconds,
        "report": report_path.display().to_string(),
    });
    if a.out.json {
        println!("{final_line}");
    } else {
        if let Some(acc) = val_acc {
            println!("{}: {:.2}% accuracy on the {} in {seconds:.1} s", cfg.name, acc * 100.0, loaded.val_name);
        }
        println!("model: {}", model_file.display());
        println!("report: {}", report_path.display());
    }
    Ok(())
}

/// `history.json`: the epochs and the learning rate of every step.
#[derive(Default, Serialize, Deserialize)]
pub struct RunHistory {
    pub epochs: Vec<EpochLog>,
    pub lr_steps: Vec<(u64, f64)>,
}

fn load_history(dir: &Path) -> RunHistory {
    std::fs::read_to_string(dir.join("history.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

fn write_history(dir: &Path, h: &RunHistory) -> Result<(), String> {
    let json = serde_json::to_string_pretty(h).map_err(|e| e.to_string())?;
    let p: PathBuf = dir.join("history.json");
    io(&p, std::fs::write(&p, json))?;
    let opt = |v: Option<f32>| v.map_or(String::new(), |v| v.to_string());
    let mut csv = String::from("epoch,train_loss,train_accuracy,val_loss,val_accuracy,lr,seconds\n");
    for l in &h.epochs {
        csv += &format!(
            "{},{},{},{},{},{},{}\n",
            l.epoch,
            l.train.loss,
            opt(l.train.accuracy),
            l.val.map_or(String::new(), |v| v.loss.to_string()),
            opt(l.val.and_then(|v| v.accuracy)),
            l.lr,
            l.seconds
        );
    }
    let p = dir.join("history.csv");
    io(&p, std::fs::write(&p, csv))
}
