//! The CUDA backend against the CPU reference, layer by layer and on whole models: same model,
//! same weights, same batch; forward output, input gradient, every parameter gradient and the
//! batch-norm running statistics after a training step, then the evaluation output, all within
//! 1e-4 of the tensor's largest magnitude (f32, no TF32; with gradcheck.rs's floor for tensors
//! that are analytically zero, see `cuda_common::within`). A second training plan that
//! accumulates parameter gradients over two steps checks the accumulate paths (cuDNN and
//! cuBLASLt with beta = 1, the epilogue fallbacks).
//!
//! The model list is tests/gradcheck.rs's, plus ResNet-18 and the seed CNNs of `kiln::zoo`.
//! Without a GPU every test prints `skipped: <reason>` and passes.

use kiln::backend::cpu::CpuBackend;
use kiln::backend::{Backend, CudaBackend, CudaOptions};
use kiln::exec::{Executor, Mode, PlanOptions};
use kiln::model::{BatchNorm, Conv2d, Linear, Model, ModelBuilder, Pool2d, branch};
use kiln::rng::Rng;
use kiln::zoo;

mod cuda_common;
use cuda_common::{cuda, rel_err, within};

const TOL: f64 = 1e-4;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.uniform_range(-1.0, 1.0)).collect()
}

/// Every tensor a training step produces, by name, after `steps` forward+backward passes.
fn step<B: Backend>(e: &mut Executor<B>, model: &Model, opts: PlanOptions, steps: usize) -> Vec<(String, Vec<f32>)> {
    let batch = model.batch_size();
    let p = e.plan(batch, Mode::Train, opts).unwrap();
    let x = random(e.backend().len(e.plan_info(p).input), 11);
    let r = random(e.backend().len(e.plan_info(p).output), 99);
    for _ in 0..steps {
        e.set_input(p, &x).unwrap();
        e.forward(p).unwrap();
        e.set_output_grad(p, &r).unwrap();
        e.backward(p).unwrap();
    }
    let mut out = vec![("output".to_string(), e.read_output(p).unwrap())];
    if opts.input_grad {
        out.push(("input.grad".into(), e.read_input_grad(p).unwrap()));
    }
    for spec in model.params() {
        if spec.trainable {
            out.push((format!("{}.grad", spec.name), e.read_param_grad(&spec.name).unwrap()));
        }
        // Values: running statistics changed by the step; the others must be untouched.
        out.push((spec.name.clone(), e.read_param(&spec.name).unwrap()));
    }
    let pe = e.plan(batch, Mode::Eval, PlanOptions::default()).unwrap();
    e.set_input(pe, &x).unwrap();
    e.forward(pe).unwrap();
    out.push(("eval output".into(), e.read_output(pe).unwrap()));
    out
}

/// Runs `builder`'s model on both backends and returns the worst relative error.
fn compare(name: &str, builder: ModelBuilder) -> f64 {
    let Some(gpu) = cuda() else { return 0.0 };
    compare_on(name, builder, gpu, TOL)
}

fn compare_on(name: &str, builder: ModelBuilder, gpu: CudaBackend, tol: f64) -> f64 {
    let model = builder.seed(3).build().expect("model builds");
    let mut worst = (0f64, String::new());
    let mut g = Executor::new(&model, gpu).unwrap();
    let mut c = Executor::new(&model, CpuBackend::<f32>::new(None).unwrap()).unwrap();
    let plain = PlanOptions { input_grad: true, accumulate_param_grads: false };
    let accumulating = PlanOptions { input_grad: true, accumulate_param_grads: true };
    for (opts, steps, tag) in [(plain, 1, ""), (accumulating, 2, " (accumulated)")] {
        let want = step(&mut c, &model, opts, steps);
        let got = step(&mut g, &model, opts, steps);
        for ((what, r), (_, v)) in want.iter().zip(&got) {
            let err = rel_err(r, v);
            assert!(within(r, v, tol), "{name}: {what}{tag}: GPU differs from CPU by {err:e} of its largest value");
            if err >= worst.0 {
                worst = (err, format!("{what}{tag}"));
            }
        }
    }
    println!("parity {name:<28} max rel err {:.2e} ({})", worst.0, worst.1);
    worst.0
}

/// A convolution without bias, for those feeding batch norm (or a softmax along a spatial
/// axis; likewise a dense layer feeding batch norm): there the bias gradient is analytically zero, and comparing two f32 roundings of zero
/// measures nothing (they differ by about 1e-6 for gradients of order one). Real networks (the
/// ResNets) leave that bias out for the same reason; biased convolutions are covered elsewhere.
fn no_bias(k: usize, kernel: usize) -> Conv2d {
    Conv2d::new(k, kernel).bias(false)
}

fn img(b: usize, c: usize, h: usize, w: usize) -> ModelBuilder {
    ModelBuilder::new(&[b, c, h, w])
}

#[test]
fn convolutions() {
    compare("conv basic", img(2, 3, 6, 6).conv2d(4, 3));
    compare("conv stride padding", img(2, 3, 7, 7).conv2d_with(Conv2d::new(4, 3).stride(2).padding(1)));
    compare("conv same dilation", img(2, 2, 7, 7).conv2d_with(Conv2d::new(3, 3).padding("same").dilation(2)));
    compare("conv groups", img(2, 4, 5, 5).conv2d_with(Conv2d::new(6, 3).groups(2).padding(1)));
    compare("conv depthwise", img(2, 3, 5, 5).conv2d_with(Conv2d::new(3, 3).groups(3)));
    compare(
        "conv non-square no bias",
        img(2, 2, 6, 7).conv2d_with(Conv2d::new(3, 2).kernel_hw(2, 3).stride_hw(2, 1).padding((1, 0)).bias(false)),
    );
    compare("conv pointwise", img(3, 4, 4, 4).conv2d(5, 1));
    compare("conv pointwise groups", img(2, 4, 4, 4).conv2d_with(Conv2d::new(4, 1).groups(2).bias(false)));
    compare("conv pointwise stride", img(2, 3, 5, 5).conv2d_with(Conv2d::new(4, 1).stride(2)));
    compare("conv larger", img(8, 16, 20, 20).conv2d_with(Conv2d::new(32, 3).padding(1)));
}

#[test]
fn dense_and_views() {
    compare("dense", ModelBuilder::new(&[3, 5]).dense(4).dense_with(Linear::new(2).bias(false)));
    compare("dense on images", img(2, 2, 3, 3).dense(4));
    compare("flatten dense", img(2, 2, 3, 3).flatten().dense(3));
    compare("reshape softmax", img(2, 2, 3, 4).reshape(&[4, 6]).softmax(-1));
    compare("dense larger", ModelBuilder::new(&[64, 300]).dense(200).relu().dense(10));
}

#[test]
fn activations() {
    type AddAct = fn(ModelBuilder) -> ModelBuilder;
    let acts: Vec<(&str, AddAct)> = vec![
        ("relu", |b| b.relu()),
        ("leaky relu", |b| b.leaky_relu(0.1)),
        ("elu", |b| b.elu(0.7)),
        ("sigmoid", |b| b.sigmoid()),
        ("tanh", |b| b.tanh()),
        ("silu", |b| b.silu()),
        ("gelu", |b| b.gelu()),
    ];
    for (name, act) in acts {
        compare(name, act(img(2, 2, 3, 3).conv2d(3, 2)));
    }
}

#[test]
fn softmax_axes() {
    compare("softmax rows", ModelBuilder::new(&[3, 6]).dense(5).softmax(1));
    compare("softmax channels", img(2, 3, 3, 3).conv2d(4, 1).softmax(1));
    compare("softmax last axis", img(2, 3, 3, 3).conv2d_with(Conv2d::new(4, 1).bias(false)).softmax(-1));
    compare("softmax wide rows", ModelBuilder::new(&[4, 50]).dense(1000).softmax(1));
}

#[test]
fn dropout_in_training() {
    compare("dropout", ModelBuilder::new(&[4, 10]).dense(12).dropout(0.4).dense(3));
    compare("dropout odd length", ModelBuilder::new(&[3, 7]).dense(13).dropout(0.5).dense(2));
}

#[test]
fn batch_norm() {
    compare("batch norm 4-D", img(3, 2, 4, 4).conv2d_with(no_bias(3, 3)).batch_norm());
    compare(
        "batch norm 2-D",
        ModelBuilder::new(&[5, 4]).dense_with(Linear::new(6).bias(false)).batch_norm().relu().dense(2),
    );
    compare(
        "batch norm affine off",
        img(3, 2, 4, 4).conv2d_with(no_bias(3, 3)).batch_norm_with(BatchNorm::new().affine(false).momentum(0.3)),
    );
    compare(
        "batch norm no running stats",
        img(3, 2, 4, 4).conv2d_with(no_bias(3, 3)).batch_norm_with(BatchNorm::new().track_running_stats(false)),
    );
    compare("batch norm large", img(16, 8, 16, 16).conv2d_with(no_bias(16, 3)).batch_norm());
}

#[test]
fn pooling() {
    compare("max pool", img(2, 2, 6, 6).conv2d(3, 1).max_pool2d(2));
    compare("max pool overlapping", img(2, 2, 5, 5).conv2d(3, 1).max_pool2d_with(Pool2d::new(3).stride(1).padding(1)));
    compare("avg pool padded", img(2, 2, 6, 5).conv2d(3, 1).avg_pool2d_with(Pool2d::new(3).stride(2).padding(1)));
    compare(
        "avg pool no pad count",
        img(2, 2, 6, 5).conv2d(3, 1).avg_pool2d_with(Pool2d::new(3).stride(2).padding(1).count_include_pad(false)),
    );
    compare("global avg pool", img(2, 2, 4, 5).conv2d(3, 1).global_avg_pool().dense(2));
}

#[test]
fn joins() {
    compare(
        "residual",
        img(2, 3, 5, 5)
            .conv2d_with(Conv2d::new(4, 3).padding(1))
            .residual(|m| m.conv2d_with(Conv2d::new(4, 3).padding(1)).tanh().conv2d_with(Conv2d::new(4, 3).padding(1))),
    );
    compare(
        "residual projection",
        img(3, 3, 6, 6).conv2d(4, 1).residual_with(
            |m| m.conv2d_with(no_bias(6, 3).stride(2).padding(1)).batch_norm().relu(),
            |s| s.conv2d_with(Conv2d::new(6, 1).stride(2).bias(false)).batch_norm(),
        ),
    );
    compare(
        "concat",
        img(2, 3, 5, 5).conv2d(4, 1).concat([
            branch(|b| b.conv2d(2, 1)),
            branch(|b| b.conv2d_with(Conv2d::new(3, 3).padding(1)).sigmoid()),
            branch(|b| b.max_pool2d_with(Pool2d::new(3).stride(1).padding(1))),
            branch(|b| b),
        ]),
    );
}

#[test]
fn mixed_model() {
    compare(
        "mixed",
        img(2, 3, 8, 8)
            .conv2d_with(no_bias(4, 3).padding(1))
            .batch_norm()
            .relu()
            .max_pool2d(2)
            .residual(|m| m.conv2d_with(Conv2d::new(4, 3).padding(1)).gelu())
            .dropout(0.2)
            .global_avg_pool()
            .dense(3)
            .softmax(1),
    );
}

#[test]
fn resnet18() {
    compare("resnet18", zoo::resnet18(4, 10));
}

#[test]
fn seed_cnns() {
    compare("simple cnn", zoo::simple_cnn(4));
    compare("advanced cnn", zoo::advanced_cnn(4));
    compare("multiscale cnn", zoo::multiscale_cnn(4));
    compare("mnist cnn", zoo::mnist_cnn(4));
    compare("cifar cnn", zoo::cifar_cnn(4));
    compare("inception block", zoo::inception_block(2, 10));
}

/// With TF32 allowed, convolutions and dense layers round their inputs to 10-bit mantissas:
/// results stay within TF32's tolerance (about 1e-3 relative), and the backend says TF32 is on.
#[test]
fn tf32_option() {
    if cuda().is_none() {
        return;
    }
    let gpu = CudaBackend::with_options(0, CudaOptions { tf32: true, ..Default::default() }).unwrap();
    assert!(gpu.describe().contains("TF32 on"), "{}", gpu.describe());
    let err = compare_on("tf32 conv+dense", img(8, 16, 12, 12).conv2d(32, 3).relu().dense(20), gpu, 1e-2);
    println!("tf32: max rel err {err:.2e} (f32 paths stay near 1e-7)");
}
