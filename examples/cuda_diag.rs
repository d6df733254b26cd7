//! Diagnostic: where GPU and CPU training of the CIFAR CNN part ways. Prints, after each Adam
//! step, the loss on both and the norm-wise relative difference of a few parameters, for the
//! tutorial's CIFAR CNN and for the same network without dropout.
//!
//!     cargo run --release --example cuda_diag

use kiln::backend::{CudaBackend, CudaOptions};
use kiln::data::synthetic::tutorial_images;
use kiln::model::ModelBuilder;
use kiln::rng::Rng;
use kiln::train::{Device, Optimizer, Trainer, TrainerConfig};

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
    let n: f64 = a.iter().map(|p| (*p as f64).powi(2)).sum();
    (d / n.max(1e-30)).sqrt()
}

fn cifar(dropout: bool) -> ModelBuilder {
    let mut b = ModelBuilder::new(&[8, 3, 32, 32]);
    for (i, c) in [32, 32, 64, 64, 128, 128].iter().enumerate() {
        b = b.conv2d(*c, 3).name(&format!("conv{i}")).relu();
    }
    b = b.flatten().dense(512).name("dense1").relu();
    if dropout {
        b = b.dropout(0.5);
    }
    b = b.dense(256).name("dense2").relu();
    if dropout {
        b = b.dropout(0.3);
    }
    b.dense(10).name("out").seed(3)
}

fn main() -> anyhow::Result<()> {
    let (x, y) = tutorial_images(8, 3, 32, 32, 10, &mut Rng::new(5));
    let cases = [
        ("dropout, Adam 1e-3", true, Optimizer::adam(), 1e-3),
        ("no dropout, Adam 1e-3", false, Optimizer::adam(), 1e-3),
        ("dropout, SGD 1e-3", true, Optimizer::sgd(0.9), 1e-3),
        ("dropout, Adam 1e-4", true, Optimizer::adam(), 1e-4),
    ];
    for (label, dropout, opt, lr) in cases {
        println!("== {label}");
        let model = cifar(dropout).build()?;
        let cfg = |device| TrainerConfig {
            batch_size: 8,
            device,
            optimizer: opt.clone(),
            learning_rate: lr,
            ..Default::default()
        };
        let mut cpu = Trainer::new(&model, cfg(Device::Cpu))?;
        let gpu = CudaBackend::with_options(0, CudaOptions::default())?;
        let mut dev = Trainer::with_backend(&model, cfg(Device::Cuda(0)), Box::new(gpu))?;
        for step in 1..=10 {
            let (a, b) = (cpu.train_batch(&x, &y)?, dev.train_batch(&x, &y)?);
            let mut line = format!("step {step:2}: loss {:.6} {:.6}", a.loss, b.loss);
            for name in ["conv0.weight", "conv5.weight", "dense1.weight", "dense1.bias", "dense2.weight", "out.weight"]
            {
                let (pa, pb) = (cpu.executor().read_param(name)?, dev.executor().read_param(name)?);
                line += &format!(" | {name} {:.1e}", rel(&pa, &pb));
            }
            for name in ["conv0.weight", "dense1.weight"] {
                let (ga, gb) = (cpu.executor().read_param_grad(name)?, dev.executor().read_param_grad(name)?);
                line += &format!(" | grad {name} {:.1e}", rel(&ga, &gb));
            }
            println!("{line}");
        }
    }
    Ok(())
}
