//! Shapes and parameter counts of the seed tutorial's models, ResNet-18 and the Inception block.
//! Expected parameter counts are PyTorch's for the equivalent `torch.nn` models
//! (`sum(p.numel() for p in m.parameters())`, computed with torch 2.15 (CPU) from the definitions in
//! shared/bench/torch_baseline.py and torchvision's resnet18 with the CIFAR stem).

use kiln::model::{Model, ParamRole};
use kiln::zoo;

fn shape_of(m: &Model, name: &str) -> Vec<usize> {
    let i = m.nodes().iter().position(|n| n.name == name).unwrap_or_else(|| panic!("no layer {name}"));
    m.shape_with_batch(i)
}

#[test]
fn simple_cnn_matches_the_tutorial() {
    let m = zoo::simple_cnn(8).build().unwrap();
    // The tutorial's comments: 3x32x32 -> 16x30x30 -> 32x28x28 -> 25088 -> 64 -> 10.
    assert_eq!(shape_of(&m, "conv1"), [8, 16, 30, 30]);
    assert_eq!(shape_of(&m, "conv2"), [8, 32, 28, 28]);
    assert_eq!(shape_of(&m, "flatten"), [8, 25088]);
    assert_eq!(shape_of(&m, "dense1"), [8, 64]);
    assert_eq!(m.output_shape(), [8, 10]);
    assert_eq!(m.param_count(), 1_611_434);
    // 7 layers as the tutorial counts them (conv, relu, conv, relu, flatten, dense, relu, dense
    // is 8 calls; go-metal's "Total layers" counts the same 8).
    assert_eq!(m.nodes().len() - 1, 8);
}

#[test]
fn advanced_cnn_matches_the_tutorial() {
    let m = zoo::advanced_cnn(8).build().unwrap();
    for (name, s) in [
        ("conv1_1", [8, 32, 30, 30]),
        ("conv1_2", [8, 32, 28, 28]),
        ("conv2_1", [8, 64, 26, 26]),
        ("conv2_2", [8, 64, 24, 24]),
        ("conv3_1", [8, 128, 22, 22]),
        ("conv3_2", [8, 128, 20, 20]),
    ] {
        assert_eq!(shape_of(&m, name), s, "{name}");
    }
    assert_eq!(shape_of(&m, "flatten"), [8, 51200]);
    assert_eq!(m.param_count(), 13_428_650);
}

#[test]
fn multiscale_cnn() {
    let m = zoo::multiscale_cnn(8).build().unwrap();
    assert_eq!(shape_of(&m, "conv_1x1"), [8, 16, 32, 32]);
    assert_eq!(shape_of(&m, "conv_3x3"), [8, 32, 30, 30]);
    assert_eq!(shape_of(&m, "conv_5x5"), [8, 32, 26, 26]);
    assert_eq!(shape_of(&m, "conv_agg"), [8, 64, 24, 24]);
    assert_eq!(m.param_count(), 4_768_842);
}

#[test]
fn mnist_cnn_matches_the_tutorial() {
    let m = zoo::mnist_cnn(8).build().unwrap();
    for (name, s) in
        [("conv1", [8, 32, 26, 26]), ("conv2", [8, 32, 24, 24]), ("conv3", [8, 64, 22, 22]), ("conv4", [8, 64, 20, 20])]
    {
        assert_eq!(shape_of(&m, name), s, "{name}");
    }
    assert_eq!(shape_of(&m, "flatten"), [8, 25600]);
    assert_eq!(m.param_count(), 3_343_210);
}

#[test]
fn cifar_cnn() {
    let m = zoo::cifar_cnn(8).build().unwrap();
    assert_eq!(shape_of(&m, "conv3_2"), [8, 128, 20, 20]);
    assert_eq!(m.param_count(), 26_635_818);
}

#[test]
fn resnet18_cifar_stem() {
    let m = zoo::resnet18(8, 10).build().unwrap();
    assert_eq!(m.param_count(), 11_173_962);
    assert_eq!(shape_of(&m, "layer1.1.relu2"), [8, 64, 32, 32]);
    assert_eq!(shape_of(&m, "layer2.0.relu2"), [8, 128, 16, 16]);
    assert_eq!(shape_of(&m, "layer4.1.relu2"), [8, 512, 4, 4]);
    assert_eq!(m.output_shape(), [8, 10]);
    // Names and layouts as torchvision's state_dict.
    let p = |n: &str| m.params().iter().find(|p| p.name == n).unwrap_or_else(|| panic!("no {n}")).clone();
    assert_eq!(p("conv1.weight").shape, [64, 3, 3, 3]);
    assert_eq!(p("layer2.0.downsample.0.weight").shape, [128, 64, 1, 1]);
    assert_eq!(p("layer2.0.downsample.1.running_var").role, ParamRole::RunningVar);
    assert_eq!(p("fc.weight").shape, [10, 512]);
    assert_eq!(p("fc.bias").shape, [10]);
    assert!(m.params().iter().all(|p| p.name != "conv1.bias"));
    // 20 batch norms with 4 tensors each, 20 convolutions, fc weight and bias (PyTorch's
    // state_dict adds one num_batches_tracked per batch norm).
    assert_eq!(m.params().len(), 20 * 4 + 20 + 2);
}

#[test]
fn inception_block_concatenates_branches() {
    let m = zoo::inception_block(4, 10).build().unwrap();
    assert_eq!(shape_of(&m, "inception_3a"), [4, 256, 28, 28]);
    assert_eq!(m.param_count(), 166_266);
}

#[test]
fn depthwise_separable_and_same_padding() {
    use kiln::model::{Conv2d, ModelBuilder};
    let m = ModelBuilder::new(&[2, 8, 16, 16])
        .conv2d_with(Conv2d::new(8, 3).groups(8).padding("same").bias(false))
        .conv2d(16, 1)
        .build()
        .unwrap();
    assert_eq!(m.output_shape(), [2, 16, 16, 16]);
    assert_eq!(m.params()[0].shape, [8, 1, 3, 3]);
    assert_eq!(m.param_count(), 72 + 8 * 16 + 16);
}

#[test]
fn flops_and_summary() {
    let m = zoo::simple_cnn(8).build().unwrap();
    let conv1 = m.nodes().iter().position(|n| n.name == "conv1").unwrap();
    // 2 * (3*3*3) MACs per output * 16*30*30 outputs + one bias add per output.
    assert_eq!(m.flops(conv1), 2 * 27 * 16 * 900 + 16 * 900);
    let s = m.summary();
    for needle in ["conv1 (Conv2d [k3x3])", "[8, 16, 30, 30]", "1,611,434", "Activation memory", "dense1 (Linear)"] {
        assert!(s.contains(needle), "summary lacks {needle:?}:\n{s}");
    }
}

#[test]
fn same_seed_same_weights() {
    let a = zoo::simple_cnn(8).seed(7).build().unwrap();
    let b = zoo::simple_cnn(8).seed(7).build().unwrap();
    let c = zoo::simple_cnn(8).seed(8).build().unwrap();
    assert_eq!(a.param_values(), b.param_values());
    assert_ne!(a.param_values(), c.param_values());
}

#[test]
fn initialisation_follows_pytorch_defaults() {
    let m = zoo::resnet18(8, 10).seed(1).build().unwrap();
    for (spec, v) in m.params().iter().zip(m.param_values()) {
        match spec.role {
            ParamRole::RunningMean => assert!(v.iter().all(|&x| x == 0.0)),
            ParamRole::RunningVar => assert!(v.iter().all(|&x| x == 1.0)),
            _ if spec.name.contains("bn") || spec.name.contains("downsample.1") => {
                let expect = if spec.role == ParamRole::Weight { 1.0 } else { 0.0 };
                assert!(v.iter().all(|&x| x == expect), "{}", spec.name);
            }
            _ => {
                // kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)); variance bound^2/3.
                let bound = 1.0 / (spec.fan_in as f32).sqrt();
                assert!(v.iter().all(|&x| x.abs() <= bound), "{}", spec.name);
                if v.len() > 1000 {
                    let var = v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / v.len() as f64;
                    let expect = (bound as f64).powi(2) / 3.0;
                    assert!((var / expect - 1.0).abs() < 0.1, "{}: variance {var} vs {expect}", spec.name);
                }
            }
        }
    }
}

/// GroupNorm: shape kept, PyTorch's parameter names and initial values, FLOPs, summary, and a
/// save/load round trip that computes the same.
#[test]
fn group_norm_layer() {
    use kiln::backend::cpu::CpuBackend;
    use kiln::exec::{Executor, Mode};
    use kiln::model::{GroupNorm, ModelBuilder};
    use kiln::tensor::Tensor;
    let m = ModelBuilder::new(&[2, 4, 5, 5])
        .conv2d(8, 3)
        .group_norm(4)
        .name("gn")
        .group_norm_with(GroupNorm::new(2).eps(1e-3).affine(false))
        .seed(7)
        .build()
        .unwrap();
    assert_eq!(shape_of(&m, "gn"), [2, 8, 3, 3]);
    let names: Vec<&str> = m.params().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["conv2d_1.weight", "conv2d_1.bias", "gn.weight", "gn.bias"]);
    assert_eq!(m.param("gn.weight").unwrap(), [1.0; 8]);
    assert_eq!(m.param("gn.bias").unwrap(), [0.0; 8]);
    assert_eq!(m.flops(2), 5 * 8 * 9);
    assert!(m.summary().contains("GroupNorm(4)"), "{}", m.summary());

    let mut m = m;
    m.set_param("gn.weight", &[0.5, 1.5, 2.0, 1.0, -1.0, 0.25, 3.0, 1.0]).unwrap();
    let path = std::env::temp_dir().join(format!("kiln-gn-{}.safetensors", std::process::id()));
    m.save(&path).unwrap();
    let back = Model::load(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(back.nodes(), m.nodes());
    assert_eq!(back.param_values(), m.param_values());
    let x = Tensor::new(&[2, 4, 5, 5], (0..200).map(|i| (i as f32 * 0.37).sin()).collect()).unwrap();
    let predict = |model: &Model| {
        let mut e = Executor::new(model, CpuBackend::<f32>::new(Some(1)).unwrap()).unwrap();
        e.predict(&x, Mode::Eval).unwrap().data().to_vec()
    };
    assert_eq!(predict(&m), predict(&back));
}

/// ConvTranspose2d: output size, PyTorch's parameter names, layout `[in, out/groups, kh, kw]`
/// and initial bound `1/sqrt(out/groups * kh * kw)`, FLOPs, summary, and a save/load round trip
/// that computes the same.
#[test]
fn conv_transpose2d_layer() {
    use kiln::backend::cpu::CpuBackend;
    use kiln::exec::{Executor, Mode};
    use kiln::model::{ConvTranspose2d, ModelBuilder};
    use kiln::tensor::Tensor;
    let up = ConvTranspose2d::new(6, 3).stride(2).padding(1).output_padding(1).groups(2);
    let m = ModelBuilder::new(&[2, 4, 5, 5])
        .conv_transpose2d_with(up)
        .name("up")
        .conv_transpose2d_with(ConvTranspose2d::new(2, 2).kernel_hw(2, 3).dilation_hw(1, 2).bias(false))
        .seed(7)
        .build()
        .unwrap();
    // (5 - 1) * 2 - 2 * 1 + (3 - 1) + 1 + 1 = 10; then 10 + 1 = 11 high, 10 + 2 * 2 = 14 wide.
    assert_eq!(shape_of(&m, "up"), [2, 6, 10, 10]);
    assert_eq!(m.output_shape(), &[2, 2, 11, 14]);
    let names: Vec<&str> = m.params().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["up.weight", "up.bias", "conv_transpose2d_2.weight"]);
    let shapes: Vec<&[usize]> = m.params().iter().map(|p| p.shape.as_slice()).collect();
    assert_eq!(shapes, [&[4, 3, 3, 3][..], &[6], &[6, 2, 2, 3]]);
    let fan_in: Vec<usize> = m.params().iter().map(|p| p.fan_in).collect();
    assert_eq!(fan_in, [27, 27, 12]);
    for p in m.params() {
        let bound = 1.0 / (p.fan_in as f32).sqrt();
        let v = m.param(&p.name).unwrap();
        assert!(v.iter().all(|x| x.abs() <= bound) && v.iter().any(|x| x.abs() > bound / 2.0), "{}", p.name);
    }
    // A multiply-add per input value and tap (4 * 25 inputs, 3 * 9 taps each), plus the bias.
    assert_eq!(m.flops(1), 2 * 100 * 27 + 600);
    assert_eq!(m.flops(2), 2 * 600 * 12);
    let summary = m.summary();
    assert!(summary.contains("ConvTranspose2d") && summary.contains("k3x3 s2x2 p1x1 op1x1 g2"), "{summary}");

    let path = std::env::temp_dir().join(format!("kiln-convt-{}.safetensors", std::process::id()));
    m.save(&path).unwrap();
    let back = Model::load(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(back.nodes(), m.nodes());
    assert_eq!(back.param_values(), m.param_values());
    let x = Tensor::new(&[2, 4, 5, 5], (0..200).map(|i| (i as f32 * 0.37).sin()).collect()).unwrap();
    let predict = |model: &Model| {
        let mut e = Executor::new(model, CpuBackend::<f32>::new(Some(1)).unwrap()).unwrap();
        e.predict(&x, Mode::Eval).unwrap().data().to_vec()
    };
    assert_eq!(predict(&m), predict(&back));
}
