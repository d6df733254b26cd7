//! Builds every architecture of go-metal's CNN tutorial, plus ResNet-18 (CIFAR stem) and an
//! Inception-style block, and prints each one's summary: layers, output shapes, parameters,
//! FLOPs and memory.
//!
//!     cargo run --release --example cnn_models

use kiln::zoo;

fn main() -> anyhow::Result<()> {
    let models = [
        ("Simple CNN (tutorial 1)", zoo::simple_cnn(8)),
        ("Advanced CNN (tutorial 2)", zoo::advanced_cnn(8)),
        ("Multi-scale CNN (tutorial 2)", zoo::multiscale_cnn(8)),
        ("MNIST CNN (tutorial 3)", zoo::mnist_cnn(8)),
        ("CIFAR-10 CNN (tutorial 3)", zoo::cifar_cnn(8)),
        ("ResNet-18, CIFAR stem", zoo::resnet18(8, 10)),
        ("Inception block (GoogLeNet 3a)", zoo::inception_block(8, 10)),
    ];
    for (title, builder) in models {
        let model = builder.build()?;
        println!("\n{title}: {} layers, {} parameters", model.nodes().len() - 1, model.param_count());
        print!("{}", model.summary());
    }
    Ok(())
}
