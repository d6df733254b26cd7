//! CPU step time over a long run: the tutorial's simple CNN (batch 8, Adam at 1e-3) trained for
//! many steps on the same synthetic batch, printing the mean step time of each block of steps.
//! As Adam's second moments of rarely-updated weights decay into the subnormal range, every
//! step slows down unless subnormals are flushed to zero, which kiln's f32 CPU workers do
//! (`backend/cpu/mod.rs`); `KILN_DENORMALS=keep` turns that off, for comparison.
//!
//!     cargo run --release --example step_time -- [STEPS] [BLOCK]
//!     KILN_DENORMALS=keep cargo run --release --example step_time -- [STEPS] [BLOCK]

use std::time::Instant;

use kiln::data::synthetic::tutorial_images;
use kiln::rng::Rng;
use kiln::train::{Device, Trainer, TrainerConfig};
use kiln::zoo;

fn main() -> kiln::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let steps = args.first().copied().unwrap_or(2500);
    let block = args.get(1).copied().unwrap_or(250).max(1);
    let model = zoo::simple_cnn(8).seed(4).build()?;
    let (x, y) = tutorial_images(8, 3, 32, 32, 10, &mut Rng::new(4));
    let config = TrainerConfig { batch_size: 8, device: Device::Cpu, ..Default::default() };
    let mut t = Trainer::new(&model, config)?;
    let keep = std::env::var("KILN_DENORMALS").is_ok_and(|v| v == "keep");
    println!("simple CNN, batch 8, Adam 1e-3, {steps} steps; subnormals {}", if keep { "kept" } else { "flushed" });
    println!("{:>12} {:>14} {:>10}", "steps", "ms per step", "loss");
    let mut start = Instant::now();
    for s in 1..=steps {
        t.train_step(&x, &y[..])?;
        if s % block == 0 {
            let loss = t.train_batch(&x, &y[..])?.loss;
            let ms = start.elapsed().as_secs_f64() * 1e3 / (block + 1) as f64;
            println!("{:>5}-{:<6} {:>14.2} {:>10.2e}", s + 1 - block, s, ms, loss);
            start = Instant::now();
        }
    }
    Ok(())
}
