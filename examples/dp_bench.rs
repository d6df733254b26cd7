//! Data-parallel scaling benchmark, the counterpart of `bench/ddp_baseline.py` (PyTorch DDP under
//! torchrun): ResNet-18 (CIFAR stem) training steps at a batch per GPU, on 1 GPU and on N, each
//! process one GPU, gradients all-reduced through NCCL in 25 MiB buckets during backward, the
//! whole step one CUDA graph. f32, TF32 off, Adam, a fixed random batch per rank (no loading).
//!
//!     cargo run --release --example dp_bench -- --nproc 2 [--model resnet18] [--batch 256] [--sync-bn]
//!
//! With `--nproc N` it starts its own N workers (as `kiln launch --nproc N -- dp_bench ...`
//! would). Timing, per rank: 10 warm-up steps, then 5 groups of 20 steps (no synchronisation
//! inside a group, a barrier between groups); the median group's time per step. Rank 0 prints
//! CSV: `impl,model,gpus,batch_per_gpu,ms_per_step,images_per_s,per_rank_ms`, where
//! `ms_per_step` is the slowest rank's and images/s counts every GPU's images. `--device cpu`
//! runs the same on the CPU backend (a smoke test).

use std::time::Instant;

use kiln::backend::Device;
use kiln::dist::{DataParallel, Launch};
use kiln::rng::Rng;
use kiln::tensor::Tensor;
use kiln::train::{Optimizer, Trainer, TrainerConfig};
use kiln::zoo;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn main() -> anyhow::Result<()> {
    // The launcher: re-run this program as N workers (dropping `--nproc N`).
    if let (Some(n), None) = (arg("--nproc"), std::env::var_os("RANK")) {
        let mut args: Vec<String> = std::env::args().skip(1).collect();
        let i = args.iter().position(|a| a == "--nproc").expect("found above");
        args.drain(i..i + 2);
        let report = Launch::new(n.parse()?, std::env::current_exe()?).args(args).run()?;
        std::process::exit(report.code());
    }
    let model_name = arg("--model").unwrap_or_else(|| "resnet18".into());
    let batch: usize = arg("--batch").map(|b| b.parse()).transpose()?.unwrap_or(256);
    let device: Device = arg("--device").map(|d| d.parse()).transpose()?.unwrap_or(Device::Cuda(0));
    let sync_batch_norm = std::env::args().any(|a| a == "--sync-bn");
    let builder = match model_name.as_str() {
        "resnet18" => zoo::resnet18(batch, 10),
        "cifar" => zoo::cifar_cnn(batch),
        "simple" => zoo::simple_cnn(batch),
        other => anyhow::bail!("unknown model {other}"),
    };
    let model = builder.seed(0).build()?;
    let config = TrainerConfig {
        batch_size: batch,
        device,
        optimizer: Optimizer::adam(),
        data_parallel: Some(DataParallel { sync_batch_norm, ..Default::default() }),
        ..Default::default()
    };
    let mut t = Trainer::new(&model, config)?;
    let (rank, world) = (t.rank(), t.world_size());
    let shape = model.input_shape();
    let mut r = Rng::new(1 + rank as u64);
    let x = Tensor::new(&shape, (0..shape.iter().product()).map(|_| r.normal()).collect())?;
    let y: Vec<u32> = (0..batch).map(|_| r.below(10) as u32).collect();
    if rank == 0 {
        eprintln!("dp_bench: {model_name}, {world} process(es), batch {batch} each; {}", t.device());
    }
    for _ in 0..10 {
        t.train_step(&x, &y)?;
    }
    t.executor().backend_mut().synchronize()?;
    let mut groups = Vec::new();
    for _ in 0..5 {
        barrier(&mut t)?;
        let t0 = Instant::now();
        for _ in 0..20 {
            t.train_step(&x, &y)?;
        }
        t.executor().backend_mut().synchronize()?;
        groups.push(t0.elapsed().as_secs_f64() * 1e3 / 20.0);
    }
    let loss = t.take_epoch_metrics()?.loss;
    anyhow::ensure!(loss.is_finite(), "loss {loss}");
    groups.sort_by(f64::total_cmp);
    let ms = groups[2];
    // Every rank's median, so the slowest rank (which sets the pace) is visible.
    let mut all = vec![0f32; world];
    all[rank] = ms as f32;
    if let Some(c) = t.executor().backend_mut().communicator() {
        c.all_reduce_sum(&mut all)?;
    }
    if rank == 0 {
        let slowest = all.iter().cloned().fold(0f32, f32::max) as f64;
        println!("impl,model,gpus,batch_per_gpu,ms_per_step,images_per_s,per_rank_ms");
        println!(
            "kiln,{model_name},{world},{batch},{slowest:.3},{:.0},{}",
            (world * batch) as f64 / slowest * 1e3,
            all.iter().map(|m| format!("{m:.3}")).collect::<Vec<_>>().join(" ")
        );
    }
    Ok(())
}

/// All ranks start each timed group together.
fn barrier(t: &mut Trainer) -> kiln::Result<()> {
    match t.executor().backend_mut().communicator() {
        Some(c) => c.barrier(),
        None => Ok(()),
    }
}
