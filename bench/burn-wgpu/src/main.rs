//! The models of kiln's `examples/bench.rs` in Burn (0.22, its wgpu backend with autodiff and
//! kernel fusion, as shipped), trained the same way: cross-entropy on random inputs and labels,
//! Adam (lr 1e-3), 10 warm-up steps, then 5 groups of 20 steps; the median group's ms per step.
//! Prints the same CSV columns as kiln's bench (`model,batch,mode,ms_per_step,images_per_s,
//! peak_mib`; Burn reports no peak memory, so that column is empty).
//!
//! `burn-wgpu-bench [--models simple,mnist,cifar,resnet18] [--batches 8,64,256]`
//! Built here (no GPU) and run on the GPU machine beside kiln's bench; see BENCHMARKS.md.

use std::time::Instant;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Dropout, DropoutConfig, Linear, LinearConfig, PaddingConfig2d, Relu};
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::{DeviceKind, Distribution};

fn conv(cin: usize, cout: usize, k: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([cin, cout], [k, k]).init(device)
}

/// Tutorial 1's simple CNN: 3x32x32 -> conv 16 -> conv 32 -> dense 64 -> 10 (valid 3x3 convs).
#[derive(Module, Debug)]
struct Simple {
    c1: Conv2d,
    c2: Conv2d,
    d1: Linear,
    out: Linear,
    relu: Relu,
}

impl Simple {
    fn new(device: &Device) -> Self {
        Self {
            c1: conv(3, 16, 3, device),
            c2: conv(16, 32, 3, device),
            d1: LinearConfig::new(32 * 28 * 28, 64).init(device),
            out: LinearConfig::new(64, 10).init(device),
            relu: Relu::new(),
        }
    }
    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x = self.relu.forward(self.c1.forward(x));
        let x = self.relu.forward(self.c2.forward(x));
        let x: Tensor<2> = x.flatten(1, 3);
        self.out.forward(self.relu.forward(self.d1.forward(x)))
    }
}

/// Convolutions (valid 3x3, ReLU after each) then dense layers with ReLU and dropout: the MNIST
/// CNN (1x28x28: 32, 32, 64, 64; dense 128, dropout 0.5) and the CIFAR CNN (3x32x32: 32, 32, 64,
/// 64, 128, 128; dense 512, dropout 0.5, dense 256, dropout 0.3), as kiln's zoo builds them.
#[derive(Module, Debug)]
struct Tutorial {
    convs: Vec<Conv2d>,
    dense: Vec<Linear>,
    drops: Vec<Dropout>,
    out: Linear,
    relu: Relu,
}

impl Tutorial {
    fn new(input: [usize; 3], filters: &[usize], hidden: &[(usize, f64)], device: &Device) -> Self {
        let mut cin = input[0];
        let mut side = input[1];
        let mut convs = Vec::new();
        for &f in filters {
            convs.push(conv(cin, f, 3, device));
            cin = f;
            side -= 2;
        }
        let mut width = cin * side * side;
        let mut dense = Vec::new();
        let mut drops = Vec::new();
        for &(h, p) in hidden {
            dense.push(LinearConfig::new(width, h).init(device));
            drops.push(DropoutConfig::new(p).init());
            width = h;
        }
        Self { convs, dense, drops, out: LinearConfig::new(width, 10).init(device), relu: Relu::new() }
    }
    fn forward(&self, mut x: Tensor<4>) -> Tensor<2> {
        for c in &self.convs {
            x = self.relu.forward(c.forward(x));
        }
        let mut x: Tensor<2> = x.flatten(1, 3);
        for (d, drop) in self.dense.iter().zip(&self.drops) {
            x = drop.forward(self.relu.forward(d.forward(x)));
        }
        self.out.forward(x)
    }
}

/// torchvision's BasicBlock (3x3 conv, BN, ReLU, 3x3 conv, BN, + shortcut (1x1 strided conv + BN
/// when the shape changes), ReLU); convolutions without bias.
#[derive(Module, Debug)]
struct Block {
    c1: Conv2d,
    b1: BatchNorm,
    c2: Conv2d,
    b2: BatchNorm,
    down: Option<(Conv2d, BatchNorm)>,
    relu: Relu,
}

impl Block {
    fn new(cin: usize, cout: usize, stride: usize, device: &Device) -> Self {
        let c3 = |cin, s| {
            Conv2dConfig::new([cin, cout], [3, 3])
                .with_stride([s, s])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_bias(false)
                .init(device)
        };
        let down = (stride != 1 || cin != cout).then(|| {
            (
                Conv2dConfig::new([cin, cout], [1, 1]).with_stride([stride, stride]).with_bias(false).init(device),
                BatchNormConfig::new(cout).init(device),
            )
        });
        Self {
            c1: c3(cin, stride),
            b1: BatchNormConfig::new(cout).init(device),
            c2: c3(cout, 1),
            b2: BatchNormConfig::new(cout).init(device),
            down,
            relu: Relu::new(),
        }
    }
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = self.relu.forward(self.b1.forward(self.c1.forward(x.clone())));
        let y = self.b2.forward(self.c2.forward(y));
        let s = match &self.down {
            Some((c, b)) => b.forward(c.forward(x)),
            None => x,
        };
        self.relu.forward(y + s)
    }
}

/// ResNet-18 with the CIFAR stem (3x3 stride-1 first convolution, no max pool), 10 classes.
#[derive(Module, Debug)]
struct ResNet18 {
    conv1: Conv2d,
    bn1: BatchNorm,
    blocks: Vec<Block>,
    pool: AdaptiveAvgPool2d,
    fc: Linear,
    relu: Relu,
}

impl ResNet18 {
    fn new(device: &Device) -> Self {
        let mut blocks = Vec::new();
        let mut cin = 64;
        for (stage, width) in [64, 128, 256, 512].into_iter().enumerate() {
            for b in 0..2 {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                blocks.push(Block::new(cin, width, stride, device));
                cin = width;
            }
        }
        Self {
            conv1: Conv2dConfig::new([3, 64], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_bias(false)
                .init(device),
            bn1: BatchNormConfig::new(64).init(device),
            blocks,
            pool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            fc: LinearConfig::new(512, 10).init(device),
            relu: Relu::new(),
        }
    }
    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let mut x = self.relu.forward(self.bn1.forward(self.conv1.forward(x)));
        for b in &self.blocks {
            x = b.forward(x);
        }
        let x: Tensor<2> = self.pool.forward(x).flatten(1, 3);
        self.fc.forward(x)
    }
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

/// Trains `model` with Adam for warm-up + 5x20 steps; returns the median ms per step.
fn time_model<M: Module>(
    mut model: M,
    forward: impl Fn(&M, Tensor<4>) -> Tensor<2>,
    shape: [usize; 4],
    device: &Device,
) -> f64 {
    let mut optim = AdamConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let x = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), device);
    let y = Tensor::<1, Int>::random([shape[0]], Distribution::Uniform(0.0, 10.0), device);
    let mut step = |model: M| -> M {
        let loss = loss_fn.forward(forward(&model, x.clone()), y.clone()).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        optim.step(1e-3, model, grads)
    };
    for _ in 0..10 {
        model = step(model);
    }
    device.sync().expect("sync");
    let mut groups = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        for _ in 0..20 {
            model = step(model);
        }
        device.sync().expect("sync");
        groups.push(t0.elapsed().as_secs_f64() * 1e3 / 20.0);
    }
    groups.sort_by(f64::total_cmp);
    groups[2]
}

fn main() {
    let models = arg("--models").unwrap_or_else(|| "simple,mnist,cifar,resnet18".into());
    let batches: Vec<usize> = arg("--batches")
        .unwrap_or_else(|| "8,64,256".into())
        .split(',')
        .map(|b| b.parse().expect("--batches: comma-separated integers"))
        .collect();
    let device = Device::wgpu(DeviceKind::DefaultDevice).autodiff();
    device.seed(0);
    println!("model,batch,mode,ms_per_step,images_per_s,peak_mib");
    for name in models.split(',') {
        for &b in &batches {
            let ms = match name {
                "simple" => time_model(Simple::new(&device), Simple::forward, [b, 3, 32, 32], &device),
                "mnist" => time_model(
                    Tutorial::new([1, 28, 28], &[32, 32, 64, 64], &[(128, 0.5)], &device),
                    Tutorial::forward,
                    [b, 1, 28, 28],
                    &device,
                ),
                "cifar" => time_model(
                    Tutorial::new([3, 32, 32], &[32, 32, 64, 64, 128, 128], &[(512, 0.5), (256, 0.3)], &device),
                    Tutorial::forward,
                    [b, 3, 32, 32],
                    &device,
                ),
                "resnet18" => time_model(ResNet18::new(&device), ResNet18::forward, [b, 3, 32, 32], &device),
                other => panic!("unknown model {other}: expected simple, mnist, cifar or resnet18"),
            };
            println!("{name},{b},burn_wgpu,{ms:.4},{:.0},", b as f64 / ms * 1e3);
        }
    }
}
