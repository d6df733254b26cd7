//! The `kiln` command: train, evaluate and run CNNs from the shell, with progress bars, metrics
//! and an HTML report; `kiln launch` starts the workers of a data-parallel job. It uses the
//! library's public API only.
//!
//! ```text
//! kiln train                                   # the embedded 8x8 digits, default recipe
//! kiln train --data mnist:data/mnist --name mnist
//! kiln eval runs/mnist --data mnist:data/mnist
//! kiln predict runs/mnist img1.png img2.png
//! kiln summary net.toml
//! kiln profile resnet18 --batch 64 --device cuda
//! kiln bench --models resnet18 --batches 64
//! kiln export runs/mnist mnist.onnx --opset 18
//! kiln import resnet.onnx resnet.safetensors
//! kiln launch --nproc 2 -- target/release/examples/my_training --epochs 3
//! ```

mod data;
mod launch;
mod models;
mod onnx;
mod other;
mod profile;
mod run;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Train, evaluate and run convolutional networks with kiln.
#[derive(Parser, Debug)]
#[command(name = "kiln", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model; writes runs/NAME/ (model, checkpoints, config, history, report.html).
    Train(Box<TrainArgs>),
    /// Evaluate a model: loss, accuracy, top-k, per-class precision/recall/F1, confusion matrix,
    /// ROC AUC and average precision.
    Eval(EvalArgs),
    /// Classify images: the top-k classes with their probabilities.
    Predict(PredictArgs),
    /// Print a model's summary table (layers, shapes, parameters, FLOPs, memory).
    Summary(SummaryArgs),
    /// Profile a model per layer by name: forward and backward ms, parameters, activation
    /// memory, FLOPs and GFLOP/s, the pass timed whole (eager and as a graph) and peak memory.
    Profile(ProfileArgs),
    /// Time whole training steps of zoo models (milliseconds per step, images/s, peak memory).
    Bench(BenchArgs),
    /// Write a model's inference graph as an ONNX file (for ONNX Runtime, TensorRT, OpenVINO).
    Export(ExportArgs),
    /// Read an ONNX file (exported by PyTorch, go-metal or kiln) into a trainable kiln model file.
    Import(ImportArgs),
    /// Start the workers of a data-parallel job (`kiln launch --help`).
    #[command(disable_help_flag = true)]
    Launch(LaunchArgs),
}

/// How progress and results are printed.
#[derive(Args, Debug, Clone, Copy)]
pub struct Output {
    /// Print nothing but errors and the final result line.
    #[arg(long, short = 'q', conflicts_with = "json")]
    pub quiet: bool,
    /// Machine-readable output: one JSON object per line (per epoch, then the result).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// The run's name: its folder is RUNS/NAME (default: the dataset's name, numbered to be new).
    #[arg(long)]
    pub name: Option<String>,
    /// Where run folders go.
    #[arg(long, default_value = "runs")]
    pub runs: PathBuf,
    /// Continue the run NAME from its newest checkpoint (its saved config is used; --epochs may
    /// raise the total).
    #[arg(long, requires = "name")]
    pub resume: bool,
    /// The data: digits (embedded, the default), mnist:DIR, fashion:DIR, cifar10:DIR, folder:DIR.
    #[arg(long, default_value = "digits")]
    pub data: String,
    /// Fraction of the training data held out for validation (default: the recipe's; datasets
    /// with a test split validate on it when 0).
    #[arg(long)]
    pub val_split: Option<f64>,
    /// Side length images of a folder are resized to.
    #[arg(long, default_value_t = 64)]
    pub image_size: usize,
    /// The model: `recipe` (the dataset's default), a zoo name (simple_cnn, advanced_cnn,
    /// multiscale_cnn, mnist_cnn, cifar_cnn, resnet18, inception_block), a spec file (.toml) or a
    /// kiln model file (its weights are the starting point).
    #[arg(long, default_value = "recipe")]
    pub model: String,
    /// Epochs in total (default: the recipe's).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Batch size (default: the recipe's).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Optimizer: adam, adamw, sgd (momentum 0.9, Nesterov), rmsprop.
    #[arg(long)]
    pub optimizer: Option<String>,
    /// Learning rate (the peak rate under onecycle).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Weight decay.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Learning-rate schedule, stepped every batch: onecycle, cosine, constant.
    #[arg(long)]
    pub schedule: Option<String>,
    /// Augmentation preset: none, light (random crops), standard (random crops; flips for colour
    /// images and clothing).
    #[arg(long)]
    pub augment: Option<String>,
    /// Device: auto (a GPU when usable, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Precision: f32; tf32 (on CUDA, convolutions and dense layers round their inputs to
    /// TF32 on the tensor cores, as PyTorch's `allow_tf32`; about 1e-3 relative); or bf16
    /// (mixed precision on CUDA, as PyTorch's autocast: convolutions and dense layers in bf16
    /// with f32 accumulation, weights, optimizer state, batch norm and losses in f32; about
    /// 1e-2 relative); or f16 (the same in f16, with dynamic loss scaling as PyTorch's
    /// GradScaler).
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Seed of the weights, the data order and augmentation.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    pub out: Output,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A kiln model file, or a run folder (its model.safetensors).
    pub model: PathBuf,
    /// The data (default: what the model was trained on, its validation part).
    #[arg(long)]
    pub data: Option<String>,
    /// Evaluate on the training part instead of the validation/test part.
    #[arg(long)]
    pub train_split: bool,
    /// Batch size.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Device: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[command(flatten)]
    pub out: Output,
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// A kiln model file, or a run folder.
    pub model: PathBuf,
    /// Images (PNG or JPEG), or folders of them.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// How many classes to show per image.
    #[arg(long, default_value_t = 3)]
    pub top: usize,
    /// Device: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// One JSON object per image.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct SummaryArgs {
    /// A kiln model file, a run folder, a spec file (.toml) or a zoo name.
    pub model: String,
    /// Batch size the summary's memory figures use (default: the model's).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Classes, for zoo models that take a class count.
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Print the model's spec (TOML) instead of the table.
    #[arg(long)]
    pub spec: bool,
}

#[derive(Args, Debug)]
pub struct ProfileArgs {
    /// A zoo name, a spec file (.toml), a kiln model file or a run folder.
    pub model: String,
    /// Samples per batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Classes, for zoo models that take a class count.
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Device: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Timed passes; each figure is their median.
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Zoo models, comma-separated: simple_cnn, multiscale_cnn, mnist_cnn, cifar_cnn, resnet18.
    #[arg(long, default_value = "simple_cnn,multiscale_cnn,mnist_cnn,cifar_cnn,resnet18", value_delimiter = ',')]
    pub models: Vec<String>,
    /// Batch sizes, comma-separated.
    #[arg(long, default_value = "8,64,256", value_delimiter = ',')]
    pub batches: Vec<usize>,
    /// Device: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Let cuDNN pick non-deterministic algorithms when faster (as `cudnn.benchmark`).
    #[arg(long)]
    pub nondeterministic: bool,
    /// Timed groups of steps (the median group is reported).
    #[arg(long, default_value_t = 5)]
    pub groups: usize,
    /// Steps per timed group.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A kiln model file, or a run folder (its model.safetensors; the class names and
    /// preprocessing kept in its metadata go into the ONNX file's metadata).
    pub model: PathBuf,
    /// The ONNX file to write.
    pub out: PathBuf,
    /// ONNX operator set: 13 to 20 (GELU is written as `Gelu` from 20, as its formula below).
    #[arg(long, default_value_t = 18, value_parser = clap::value_parser!(i64).range(13..=20))]
    pub opset: i64,
    /// Fix the batch dimension to the model's batch size (default: symbolic, any batch size).
    #[arg(long)]
    pub static_batch: bool,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The ONNX file (all of its initializers inside it, or external data beside it).
    pub file: PathBuf,
    /// The kiln model file to write (for `kiln eval/predict/train --model`); the class names and
    /// preprocessing go into its metadata when the file was written by `kiln export` from a run.
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// The launcher's options, `--`, the program and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    pub args: Vec<OsString>,
}

/// A failed command: the message to print (already naming the flag, file or line).
pub type CmdResult = Result<(), String>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (name, result) = match cli.command {
        Command::Train(a) => ("train", run::train(*a)),
        Command::Eval(a) => ("eval", other::eval(a)),
        Command::Predict(a) => ("predict", other::predict(a)),
        Command::Summary(a) => ("summary", other::summary(a)),
        Command::Profile(a) => ("profile", profile::profile(a)),
        Command::Bench(a) => ("bench", other::bench(a)),
        Command::Export(a) => ("export", onnx::export(a)),
        Command::Import(a) => ("import", onnx::import(a)),
        Command::Launch(a) => return launch::main(a.args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln {name}: {e}");
            ExitCode::from(1)
        }
    }
}
