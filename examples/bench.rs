//! GPU training-step benchmark, the counterpart of `shared/bench/torch_baseline.py`: for the seed
//! tutorial's simple, multi-scale, MNIST and CIFAR CNNs and ResNet-18 (CIFAR stem), at batch 8,
//! 64 and 256, the median milliseconds per whole training step (batch upload from pinned host
//! memory, forward, loss, backward, Adam update; one CUDA graph), images per second and peak
//! device memory. f32, TF32 off (as the baseline's `eager` and `graph` modes) by default;
//! `--precision tf32` lets convolutions and dense layers use TF32 tensor cores
//! (`Precision::Tf32`, beside the baseline's `eager_tf32`; the mode column gets `_tf32`);
//! `--precision bf16` trains in bf16 mixed precision (`Precision::Bf16Mixed`: convolutions and
//! dense layers on bf16 tensor cores, the rest f32), to set beside the baseline's `amp_bf16`,
//! `compile_amp` and `compile_graph_amp` modes (the mode column gets `_bf16`); `--precision f16`
//! the same in f16 with dynamic loss scaling (`Precision::F16Mixed`, `_f16`).
//!
//!     cargo run --release --example bench -- [--models simple,resnet18] [--batches 8,64] [--eager]
//!         [--nondeterministic] [--no-finite-check] [--precision f32|tf32|bf16|f16] [--device cpu]
//!
//! `--no-finite-check` turns off the per-step check of the loss and gradient norm
//! (`TrainerConfig::non_finite = NonFinite::Ignore`; on by default since it was added), to compare
//! with builds from before it.
//! `--nondeterministic` lets cuDNN use its atomic-accumulating algorithms when faster, as
//! PyTorch's `cudnn.benchmark` (the baseline's setting) does; kiln's default is deterministic.
//!
//! Timing: 10 warm-up steps (the first runs eagerly, the second is captured), then 5 groups of
//! 20 steps with no synchronisation inside a group; each group's mean per step, median of the
//! five (the baseline's method). Prints CSV: `model,batch,mode,ms_per_step,images_per_s,peak_mib`.

use std::time::Instant;

use kiln::backend::Device;
use kiln::rng::Rng;
use kiln::tensor::Tensor;
use kiln::train::{NonFinite, Precision, Trainer, TrainerConfig};
use kiln::zoo;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn main() -> anyhow::Result<()> {
    let models: Vec<String> = arg("--models")
        .unwrap_or_else(|| "simple,multiscale,mnist,cifar,resnet18".into())
        .split(',')
        .map(String::from)
        .collect();
    let batches: Vec<usize> = arg("--batches")
        .unwrap_or_else(|| "8,64,256".into())
        .split(',')
        .map(|b| b.parse())
        .collect::<Result<_, _>>()?;
    let device: Device = arg("--device").map(|d| d.parse()).transpose()?.unwrap_or(Device::Cuda(0));
    let eager = std::env::args().any(|a| a == "--eager");
    if eager {
        // SAFETY: set before any thread of this program reads the environment.
        unsafe { std::env::set_var("KILN_EAGER", "1") };
    }
    let nondet = std::env::args().any(|a| a == "--nondeterministic");
    let non_finite =
        if std::env::args().any(|a| a == "--no-finite-check") { NonFinite::Ignore } else { NonFinite::default() };
    let precision = match arg("--precision").as_deref() {
        None | Some("f32") => Precision::F32,
        Some("tf32") => Precision::Tf32,
        Some("bf16") => Precision::Bf16Mixed,
        Some("f16") => Precision::F16Mixed,
        Some(other) => anyhow::bail!("--precision {other}: expected f32, tf32, bf16 or f16"),
    };
    let mode = format!(
        "kiln_{}{}{}",
        if eager { "eager" } else { "graph" },
        if nondet { "_nondet" } else { "" },
        match precision {
            Precision::F32 => "",
            Precision::Tf32 => "_tf32",
            Precision::Bf16Mixed => "_bf16",
            Precision::F16Mixed => "_f16",
        }
    );
    println!("model,batch,mode,ms_per_step,images_per_s,peak_mib");
    for name in &models {
        for &batch in &batches {
            let builder = match name.as_str() {
                "simple" => zoo::simple_cnn(batch),
                "multiscale" => zoo::multiscale_cnn(batch),
                "mnist" => zoo::mnist_cnn(batch),
                "cifar" => zoo::cifar_cnn(batch),
                "resnet18" => zoo::resnet18(batch, 10),
                other => anyhow::bail!("unknown model {other}"),
            };
            let model = builder.seed(0).build()?;
            let config = TrainerConfig {
                batch_size: batch,
                device,
                deterministic: !nondet,
                non_finite,
                precision,
                ..Default::default()
            };
            let mut t = match Trainer::new(&model, config) {
                Ok(t) => t,
                Err(e) => {
                    println!("{name},{batch},{mode},ERROR,{e}");
                    continue;
                }
            };
            let shape = model.input_shape();
            let mut r = Rng::new(1);
            let x = Tensor::new(&shape, (0..shape.iter().product()).map(|_| r.normal()).collect())?;
            let y: Vec<u32> = (0..batch).map(|_| r.below(10) as u32).collect();
            for _ in 0..10 {
                t.train_step(&x, &y)?;
            }
            t.executor().backend_mut().synchronize()?;
            let mut groups = Vec::new();
            for _ in 0..5 {
                let t0 = Instant::now();
                for _ in 0..20 {
                    t.train_step(&x, &y)?;
                }
                t.executor().backend_mut().synchronize()?;
                groups.push(t0.elapsed().as_secs_f64() * 1e3 / 20.0);
            }
            groups.sort_by(f64::total_cmp);
            let ms = groups[2];
            let peak = t.executor().backend().peak_memory().unwrap_or(0) as f64 / (1u64 << 20) as f64;
            let loss = t.take_epoch_metrics()?.loss;
            assert!(loss.is_finite(), "{name} batch {batch}: loss {loss}");
            println!("{name},{batch},{mode},{ms:.4},{:.0},{peak:.0}", batch as f64 / ms * 1e3);
        }
    }
    Ok(())
}
