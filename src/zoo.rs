//! Ready-made models: the five architectures of go-metal's CNN tutorial (as the tutorial writes
//! them), ResNet-18 with the CIFAR stem, and an Inception-style block.
//!
//! Each function takes the batch size (and where it matters the class count) and returns a
//! builder, so callers can seed or extend it before `build()`.

use crate::model::{Conv2d, ModelBuilder, Pool2d, branch};

/// Tutorial 1's simple CNN: 3x32x32 -> Conv(16) -> Conv(32) -> FC(64) -> 10.
#[rustfmt::skip]
pub fn simple_cnn(batch: usize) -> ModelBuilder {
    ModelBuilder::new(&[batch, 3, 32, 32])
        .conv2d(16, 3).name("conv1").relu().name("relu1")
        .conv2d(32, 3).name("conv2").relu().name("relu2")
        .flatten().name("flatten")
        .dense(64).name("dense1").relu().name("relu3")
        .dense(10).name("output")
}

/// The three blocks of two 3x3 convolutions (32, 64, 128 filters) that tutorial 2's advanced CNN
/// and tutorial 3's CIFAR-10 CNN share, named as the tutorial names them (`conv1_1`, `relu1_1`,
/// ...), then `flatten`.
fn tutorial_conv_blocks(batch: usize) -> ModelBuilder {
    let mut b = ModelBuilder::new(&[batch, 3, 32, 32]);
    for (block, filters) in [(1, 32), (2, 64), (3, 128)] {
        for layer in 1..=2 {
            b = b.conv2d(filters, 3).name(&format!("conv{block}_{layer}")).relu().name(&format!("relu{block}_{layer}"));
        }
    }
    b.flatten().name("flatten")
}

/// The classifier head both share: `dense1` (with `hidden.0` units) -> dropout 0.5 -> `dense2`
/// (`hidden.1` units) -> dropout 0.3 -> 10 outputs.
#[rustfmt::skip]
fn tutorial_head(b: ModelBuilder, hidden: (usize, usize)) -> ModelBuilder {
    b.dense(hidden.0).name("dense1").relu().name("relu_fc1").dropout(0.5).name("dropout1")
        .dense(hidden.1).name("dense2").relu().name("relu_fc2").dropout(0.3).name("dropout2")
        .dense(10).name("output")
}

/// Tutorial 2's VGG-style advanced CNN with dropout (dense 256 -> 128).
pub fn advanced_cnn(batch: usize) -> ModelBuilder {
    tutorial_head(tutorial_conv_blocks(batch), (256, 128))
}

/// Tutorial 2's multi-scale CNN (1x1, 3x3, 5x5 kernels).
#[rustfmt::skip]
pub fn multiscale_cnn(batch: usize) -> ModelBuilder {
    ModelBuilder::new(&[batch, 3, 32, 32])
        .conv2d(16, 1).name("conv_1x1").relu().name("relu_1x1")
        .conv2d(32, 3).name("conv_3x3").relu().name("relu_3x3")
        .conv2d(32, 5).name("conv_5x5").relu().name("relu_5x5")
        .conv2d(64, 3).name("conv_agg").relu().name("relu_agg")
        .flatten().name("flatten")
        .dense(128).name("dense").relu().name("relu_dense")
        .dense(10).name("output")
}

/// Tutorial 3's MNIST CNN: 1x28x28 -> 32 -> 32 -> 64 -> 64 -> 128 -> 10.
#[rustfmt::skip]
pub fn mnist_cnn(batch: usize) -> ModelBuilder {
    ModelBuilder::new(&[batch, 1, 28, 28])
        .conv2d(32, 3).name("conv1").relu().name("relu1")
        .conv2d(32, 3).name("conv2").relu().name("relu2")
        .conv2d(64, 3).name("conv3").relu().name("relu3")
        .conv2d(64, 3).name("conv4").relu().name("relu4")
        .flatten().name("flatten")
        .dense(128).name("dense1").relu().name("relu5")
        .dropout(0.5).name("dropout")
        .dense(10).name("output")
}

/// Tutorial 3's CIFAR-10 CNN (dense 512 -> 256).
pub fn cifar_cnn(batch: usize) -> ModelBuilder {
    tutorial_head(tutorial_conv_blocks(batch), (512, 256))
}

/// torchvision's BasicBlock: two 3x3 convolutions with batch norm, and an identity shortcut, or a
/// strided 1x1 projection when the shape changes. Names follow torchvision (`layer1.0.conv1`).
#[rustfmt::skip]
fn basic_block(b: ModelBuilder, prefix: &str, out: usize, stride: usize, project: bool) -> ModelBuilder {
    let n = |s: &str| format!("{prefix}.{s}");
    let main = |m: ModelBuilder| {
        m.conv2d_with(Conv2d::new(out, 3).stride(stride).padding(1).bias(false)).name(&n("conv1"))
            .batch_norm().name(&n("bn1"))
            .relu().name(&n("relu1"))
            .conv2d_with(Conv2d::new(out, 3).padding(1).bias(false)).name(&n("conv2"))
            .batch_norm().name(&n("bn2"))
    };
    let b = if project {
        b.residual_with(main, |s| {
            s.conv2d_with(Conv2d::new(out, 1).stride(stride).bias(false)).name(&n("downsample.0"))
                .batch_norm().name(&n("downsample.1"))
        })
    } else {
        b.residual(main)
    };
    b.name(&n("add")).relu().name(&n("relu2"))
}

/// ResNet-18 with the CIFAR stem (3x3 stride-1 first convolution, no max pool), as
/// `torchvision.models.resnet18(num_classes)` with `conv1 = Conv2d(3, 64, 3, 1, 1, bias=False)`
/// and `maxpool = Identity()`; 11,173,962 parameters for 10 classes.
#[rustfmt::skip]
pub fn resnet18(batch: usize, classes: usize) -> ModelBuilder {
    let mut b = ModelBuilder::new(&[batch, 3, 32, 32])
        .conv2d_with(Conv2d::new(64, 3).padding(1).bias(false)).name("conv1")
        .batch_norm().name("bn1")
        .relu().name("relu");
    let mut inp = 64;
    for (stage, width) in [64usize, 128, 256, 512].into_iter().enumerate() {
        for block in 0..2 {
            let stride = if stage > 0 && block == 0 { 2 } else { 1 };
            b = basic_block(b, &format!("layer{}.{block}", stage + 1), width, stride, stride != 1 || inp != width);
            inp = width;
        }
    }
    b.global_avg_pool().name("avgpool").dense(classes).name("fc")
}

/// An Inception-style block (GoogLeNet's 3a sizes) on a 192x28x28 input: 1x1, 1x1->3x3,
/// 1x1->5x5 and 3x3 max-pool->1x1 branches concatenated to 256 channels, then a classifier.
#[rustfmt::skip]
pub fn inception_block(batch: usize, classes: usize) -> ModelBuilder {
    ModelBuilder::new(&[batch, 192, 28, 28])
        .concat([
            branch(|b| b.conv2d(64, 1).name("branch1x1").relu()),
            branch(|b| {
                b.conv2d(96, 1).name("branch3x3_reduce").relu()
                    .conv2d_with(Conv2d::new(128, 3).padding("same")).name("branch3x3").relu()
            }),
            branch(|b| {
                b.conv2d(16, 1).name("branch5x5_reduce").relu()
                    .conv2d_with(Conv2d::new(32, 5).padding("same")).name("branch5x5").relu()
            }),
            branch(|b| {
                b.max_pool2d_with(Pool2d::new(3).stride(1).padding(1)).name("branch_pool")
                    .conv2d(32, 1).name("branch_pool_proj").relu()
            }),
        ])
        .name("inception_3a")
        .global_avg_pool()
        .dense(classes)
        .name("fc")
}
