//! CPU training-pass benchmark: forward + backward milliseconds per batch for the seed tutorial's
//! simple, MNIST and CIFAR CNNs at batch 8 and 64, on a fixed number of threads (default 2).
//! `bench/cpu_compare.sh` runs it next to PyTorch's CPU build in the same session.
//!
//!     cargo run --release --example cpu_bench [-- --threads 2 --iters 20]
//!
//! Prints CSV: `model,batch,threads,ms_fwd_bwd,images_per_s` (median of `iters` passes after
//! three warm-up passes). With KILN_PROFILE=1 it also prints the time per op kind.

use std::collections::BTreeMap;
use std::time::Instant;

use kiln::backend::Backend;
use kiln::backend::cpu::CpuBackend;
use kiln::exec::{Executor, Mode, PlanOptions};
use kiln::rng::Rng;
use kiln::zoo;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let threads = arg("--threads", 2);
    let iters = arg("--iters", 20);
    let profile = std::env::var("KILN_PROFILE").is_ok_and(|v| v == "1");
    println!("model,batch,threads,ms_fwd_bwd,images_per_s");
    type Make = fn(usize) -> kiln::model::ModelBuilder;
    let models: [(&str, Make); 3] = [("simple", zoo::simple_cnn), ("mnist", zoo::mnist_cnn), ("cifar", zoo::cifar_cnn)];
    for (name, make) in models {
        for batch in [8usize, 64] {
            let model = make(batch).build()?;
            let mut e = Executor::new(&model, CpuBackend::<f32>::new(Some(threads))?)?;
            let p = e.plan(batch, Mode::Train, PlanOptions::default())?;
            let n: usize = model.input_shape().iter().product();
            let mut r = Rng::new(1);
            let x: Vec<f32> = (0..n).map(|_| r.normal()).collect();
            let dy = vec![0.01f32; batch * 10];
            e.set_input(p, &x)?;
            let mut times = Vec::new();
            for it in 0..iters + 3 {
                let t = Instant::now();
                e.forward(p)?;
                e.set_output_grad(p, &dy)?;
                e.backward(p)?;
                if it >= 3 {
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            times.sort_by(f64::total_cmp);
            let ms = times[times.len() / 2];
            println!("{name},{batch},{threads},{ms:.3},{:.0}", batch as f64 / ms * 1e3);
            if profile {
                let info = e.plan_info(p).clone();
                let mut by_op: BTreeMap<String, f64> = BTreeMap::new();
                for op in info.forward.iter().chain(&info.backward) {
                    let t = Instant::now();
                    for _ in 0..5 {
                        e.backend_mut().run(std::slice::from_ref(op))?;
                    }
                    *by_op.entry(op.name().to_string()).or_default() += t.elapsed().as_secs_f64() * 1e3 / 5.0;
                }
                for (op, ms) in by_op {
                    eprintln!("  {name} b{batch} {op:<22} {ms:8.3} ms");
                }
            }
        }
    }
    Ok(())
}
