//! Times a training step's kernels on the GPU: per-op times of one eager forward+backward, the
//! whole step eager and as a replayed CUDA graph, and peak device memory.
//!
//!     cargo run --release --example cuda_profile -- [resnet18|simple|multiscale|mnist|cifar] [batch] [steps] [f32|bf16]
//!
//! Numbers are medians over `steps` steps (default 50) after two warm-up steps; each op's time
//! comes from device events around it, with the op waiting for the one before (so the sum of op
//! times is the step's device time without launch overlap).

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use kiln::backend::{Backend, CudaBackend, Op};
use kiln::exec::{Executor, Lowering, Mode, PlanOptions, Precision};
use kiln::rng::Rng;
use kiln::zoo;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().map(String::as_str).unwrap_or("resnet18");
    let batch: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(64);
    let steps: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(50);
    let precision = match args.get(3).map(String::as_str) {
        None | Some("f32") => Precision::F32,
        Some("bf16") => Precision::Bf16Mixed,
        Some(other) => bail!("precision {other}: expected f32 or bf16"),
    };
    let builder = match which {
        "resnet18" => zoo::resnet18(batch, 10),
        "simple" => zoo::simple_cnn(batch),
        "mnist" => zoo::mnist_cnn(batch),
        "multiscale" => zoo::multiscale_cnn(batch),
        "cifar" => zoo::cifar_cnn(batch),
        other => bail!("unknown model {other}"),
    };
    let model = builder.seed(1).build()?;
    let backend = CudaBackend::new(0).context("opening the GPU")?;
    println!("{}", backend.describe());
    let mut e = Executor::new(&model, backend)?;
    let low = Lowering { options: PlanOptions::default(), precision, ..e.lowering(batch, Mode::Train) };
    let p = e.plan_for(low)?;
    let info = e.plan_info(p).clone();
    let mut r = Rng::new(3);
    let x: Vec<f32> = (0..e.backend().len(info.input)).map(|_| r.uniform_range(-1.0, 1.0)).collect();
    let dy: Vec<f32> = (0..e.backend().len(info.output)).map(|_| r.uniform_range(-0.1, 0.1)).collect();
    e.set_input(p, &x)?;
    e.set_output_grad(p, &dy)?;
    let ops: Vec<Op> = info.forward.iter().chain(&info.backward).cloned().collect();
    let be = e.backend_mut();

    // Warm-up: algorithm searches, workspace growth.
    be.run(&ops)?;
    be.run(&ops)?;
    be.synchronize()?;

    // Per-op device times.
    let mut per_op: Vec<Vec<f64>> = vec![Vec::new(); ops.len()];
    for _ in 0..steps.clamp(1, 10) {
        for (i, t) in be.profile(&ops)?.into_iter().enumerate() {
            per_op[i].push(t);
        }
    }
    let per_op: Vec<f64> = per_op.into_iter().map(median).collect();
    let mut by_name: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
    for (op, t) in ops.iter().zip(&per_op) {
        let e = by_name.entry(op.name()).or_default();
        e.0 += 1;
        e.1 += t;
    }
    let total: f64 = per_op.iter().sum();
    println!(
        "\n{which} batch {batch} {}: {} forward + {} backward ops",
        precision.name(),
        info.forward.len(),
        info.backward.len()
    );
    println!("{:<22} {:>5} {:>10} {:>7}", "op", "count", "ms", "share");
    let mut rows: Vec<_> = by_name.into_iter().collect();
    rows.sort_by(|a, b| b.1.1.total_cmp(&a.1.1));
    for (name, (n, t)) in &rows {
        println!("{name:<22} {n:>5} {t:>10.3} {:>6.1}%", 100.0 * t / total);
    }
    println!("{:<22} {:>5} {total:>10.3}", "sum of op times", ops.len());
    let mut slow: Vec<(usize, f64)> = per_op.iter().copied().enumerate().collect();
    slow.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("\nslowest ops:");
    for (i, t) in slow.iter().take(8) {
        println!("  #{i:<4} {:<20} {t:>8.3} ms", ops[*i].name());
    }

    // Whole steps: eager, then as a CUDA graph.
    let time_steps = |be: &mut CudaBackend, cached: bool| -> Result<f64> {
        let mut ts = Vec::with_capacity(steps);
        for _ in 0..steps {
            let t = Instant::now();
            if cached {
                be.run_cached(1, &ops)?
            } else {
                be.run(&ops)?
            }
            be.synchronize()?;
            ts.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(median(ts))
    };
    let eager = time_steps(be, false)?;
    be.run_cached(1, &ops)?; // warm-up of the key
    be.run_cached(1, &ops)?; // capture + launch
    be.synchronize()?;
    let graph = time_steps(be, true)?;
    println!(
        "\nstep (forward+backward, median of {steps}): eager {eager:.3} ms, graph {graph:.3} ms ({:.0} images/s)",
        batch as f64 / graph * 1e3
    );
    println!("peak device memory {:.1} MiB", be.peak_memory().unwrap_or(0) as f64 / (1 << 20) as f64);
    Ok(())
}
