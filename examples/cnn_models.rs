//! Every architecture of go-metal's CNN tutorial, plus ResNet-18 (CIFAR stem) and an
//! Inception-style block: each one built, summarised (layers, output shapes, parameters, FLOPs,
//! memory) and trained for a few Adam steps on random data, printing the loss.
//!
//!     cargo run --release --example cnn_models [-- --summary]
//!
//! `--summary` prints each model's full table.

use std::time::Instant;

use kiln::rng::Rng;
use kiln::tensor::Tensor;
use kiln::train::{Trainer, TrainerConfig};
use kiln::zoo;

fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--summary");
    let batch = 8;
    let models = [
        ("Simple CNN (tutorial 1)", zoo::simple_cnn(batch)),
        ("Advanced CNN (tutorial 2)", zoo::advanced_cnn(batch)),
        ("Multi-scale CNN (tutorial 2)", zoo::multiscale_cnn(batch)),
        ("MNIST CNN (tutorial 3)", zoo::mnist_cnn(batch)),
        ("CIFAR-10 CNN (tutorial 3)", zoo::cifar_cnn(batch)),
        ("ResNet-18, CIFAR stem", zoo::resnet18(batch, 10)),
        ("Inception block (GoogLeNet 3a)", zoo::inception_block(batch, 10)),
    ];
    let mut rng = Rng::new(7);
    for (title, builder) in models {
        let model = builder.seed(1).build()?;
        println!(
            "\n{title}: {} layers, {} parameters, {:.1} MFLOPs per image",
            model.nodes().len() - 1,
            model.param_count(),
            model.total_flops() as f64 / 1e6
        );
        if full {
            print!("{}", model.summary());
        }
        let mut trainer = Trainer::new(&model, TrainerConfig { batch_size: batch, ..Default::default() })?;
        let shape = model.input_shape();
        let x = Tensor::new(&shape, (0..shape.iter().product()).map(|_| rng.normal()).collect())?;
        let classes = model.output_shape()[1] as u64;
        let y: Vec<u32> = (0..batch).map(|_| rng.below(classes) as u32).collect();
        let t0 = Instant::now();
        let losses: Vec<String> = (0..3)
            .map(|_| trainer.train_batch(&x, &y).map(|r| format!("{:.4}", r.loss)))
            .collect::<kiln::Result<_>>()?;
        println!(
            "  3 Adam steps on one random batch of {batch}: loss {} ({:.2}s)",
            losses.join(" -> "),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
