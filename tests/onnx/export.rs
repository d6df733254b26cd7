//! Exports run by tract give kiln's logits, for every zoo model and every layer option.

use super::{assert_close, kiln_forward, random_input, tract_forward};
use kiln::io::onnx::OnnxOptions;
use kiln::model::{
    BatchNorm, Conv2d, ConvTranspose2d, GroupNorm, Layer, Linear, Model, ModelBuilder, ParamRole, Pool2d, branch,
};
use kiln::rng::Rng;
use kiln::zoo;

/// Running statistics away from 0 and 1, so that exporting each one is checked.
fn perturb_stats(model: &mut Model, seed: u64) {
    let mut rng = Rng::new(seed);
    let stats: Vec<(String, usize, ParamRole)> =
        model.params().iter().filter(|p| !p.trainable).map(|p| (p.name.clone(), p.len(), p.role)).collect();
    for (name, n, role) in stats {
        let v: Vec<f32> =
            (0..n)
                .map(|_| {
                    if role == ParamRole::RunningVar {
                        rng.uniform_range(0.5, 1.5)
                    } else {
                        rng.uniform_range(-0.2, 0.2)
                    }
                })
                .collect();
        model.set_param(&name, &v).unwrap();
    }
    // GroupNorm's scale and shift away from 1 and 0, so that exporting each one is checked.
    let mut rng = Rng::new(seed + 1);
    let affine: Vec<(String, usize, ParamRole)> = model
        .params()
        .iter()
        .filter(|p| matches!(model.nodes()[p.node].layer, Layer::GroupNorm(_)))
        .map(|p| (p.name.clone(), p.len(), p.role))
        .collect();
    for (name, n, role) in affine {
        let (lo, hi) = if role == ParamRole::Weight { (0.5, 1.5) } else { (-0.2, 0.2) };
        let v: Vec<f32> = (0..n).map(|_| rng.uniform_range(lo, hi)).collect();
        model.set_param(&name, &v).unwrap();
    }
}

/// Exports `model` with `options` and checks tract's outputs against kiln's at batch 1 and 7.
fn check(what: &str, model: &Model, options: &OnnxOptions) {
    let bytes = model.to_onnx_bytes(options).unwrap_or_else(|e| panic!("{what}: export failed: {e}"));
    for batch in [1, 7] {
        let mut shape = model.input_shape();
        shape[0] = batch;
        let x = random_input(&shape, 11 + batch as u64);
        let want = kiln_forward(model, &x);
        let got = tract_forward(&bytes, &x);
        assert_close(&format!("{what} (opset {}, batch {batch})", options.opset), &got, want.data());
    }
}

fn build(b: ModelBuilder) -> Model {
    let mut m = b.seed(5).build().unwrap();
    perturb_stats(&mut m, 9);
    m
}

#[test]
fn zoo_models_run_in_tract_with_kilns_logits() {
    let models: Vec<(&str, ModelBuilder)> = vec![
        ("simple_cnn", zoo::simple_cnn(2)),
        ("advanced_cnn", zoo::advanced_cnn(2)),
        ("multiscale_cnn", zoo::multiscale_cnn(2)),
        ("mnist_cnn", zoo::mnist_cnn(2)),
        ("cifar_cnn", zoo::cifar_cnn(2)),
        ("resnet18", zoo::resnet18(2, 10)),
        ("inception_block", zoo::inception_block(2, 10)),
    ];
    for (name, b) in models {
        check(name, &build(b), &OnnxOptions::default());
    }
}

/// Every layer kind and option kiln has, in small models.
fn corpus() -> Vec<(&'static str, ModelBuilder)> {
    let img = || ModelBuilder::new(&[2, 4, 9, 11]);
    vec![
        (
            "conv_options",
            img()
                .conv2d_with(Conv2d::new(6, 3).stride(2).padding(1))
                .relu()
                .conv2d_with(
                    Conv2d::new(6, 3)
                        .kernel_hw(3, 1)
                        .stride_hw(1, 2)
                        .padding((1, 0))
                        .dilation_hw(2, 1)
                        .groups(3)
                        .bias(false),
                )
                .conv2d_with(Conv2d::new(6, 3).padding("same").dilation(1).groups(6))
                .conv2d_with(Conv2d::new(4, 2).padding("valid"))
                .flatten()
                .dense(3),
        ),
        (
            "pools",
            img()
                .max_pool2d_with(Pool2d::new(3).stride(2).padding(1))
                .avg_pool2d_with(Pool2d::new(3).stride(1).padding(1).count_include_pad(true))
                .avg_pool2d_with(Pool2d::new(2).stride_hw(1, 2).padding_hw(1, 0).count_include_pad(false))
                .avg_pool2d(2)
                .global_avg_pool()
                .dense(3),
        ),
        // One model per activation, each straight to the output, so that any error shows.
        ("relu", ModelBuilder::new(&[2, 12]).dense(12).relu()),
        ("leaky_relu", ModelBuilder::new(&[2, 12]).dense(12).leaky_relu(0.1)),
        ("elu", ModelBuilder::new(&[2, 12]).dense(12).elu(0.7)),
        ("sigmoid", ModelBuilder::new(&[2, 12]).dense(12).sigmoid()),
        ("tanh", ModelBuilder::new(&[2, 12]).dense(12).tanh()),
        ("silu", img().conv2d(3, 3).silu()),
        ("gelu", img().conv2d(3, 3).gelu()),
        ("softmax", ModelBuilder::new(&[2, 12]).dense(5).softmax(1)),
        ("softmax_images", img().conv2d(3, 3).softmax(-1)),
        (
            "batch_norm",
            img()
                .conv2d(4, 3)
                .batch_norm()
                .batch_norm_with(BatchNorm::new().affine(false).eps(1e-3).momentum(0.2))
                .flatten()
                .dense(8)
                .batch_norm()
                .relu()
                .dense(3),
        ),
        (
            // Images (affine, not affine with another eps, one channel per group) and features.
            "group_norm",
            img()
                .conv2d(6, 3)
                .group_norm(3)
                .relu()
                .group_norm_with(GroupNorm::new(2).eps(1e-3).affine(false))
                .group_norm(6)
                .flatten()
                .dense(8)
                .group_norm(4)
                .dense(3),
        ),
        (
            "conv_transpose",
            img()
                .conv_transpose2d_with(ConvTranspose2d::new(4, 3).stride(2).padding(1).output_padding(1))
                .relu()
                .conv_transpose2d_with(
                    ConvTranspose2d::new(6, 3)
                        .kernel_hw(3, 2)
                        .stride_hw(1, 2)
                        .padding_hw(2, 0)
                        .dilation(2)
                        .groups(2)
                        .bias(false),
                )
                .global_avg_pool()
                .dense(3),
        ),
        (
            "dense_on_images_dropout_reshape",
            img()
                .dropout(0.3)
                .dense_with(Linear::new(12).bias(false))
                .dropout(0.5)
                .reshape(&[3, 2, 2])
                .conv2d(2, 1)
                .reshape(&[8])
                .dense(3)
                .softmax(-1),
        ),
        (
            "residual_and_concat",
            img()
                .conv2d_with(Conv2d::new(4, 3).padding(1))
                .residual(|m| m.conv2d_with(Conv2d::new(4, 3).padding(1)).batch_norm().relu())
                .residual_with(
                    |m| m.conv2d_with(Conv2d::new(8, 3).stride(2).padding(1)),
                    |s| s.conv2d_with(Conv2d::new(8, 1).stride(2)),
                )
                .concat([
                    branch(|b| b.conv2d(3, 1)),
                    branch(|b| b.max_pool2d_with(Pool2d::new(3).stride(1).padding(1))),
                    branch(|b| b.silu()),
                ])
                .global_avg_pool()
                .dense(4),
        ),
    ]
}

#[test]
fn every_layer_option_runs_in_tract_with_kilns_logits() {
    for (name, b) in corpus() {
        let m = build(b);
        for opset in [13, 18, 20] {
            check(name, &m, &OnnxOptions { opset, ..OnnxOptions::default() });
        }
    }
}

#[test]
fn fixed_batch_and_metadata() {
    let m = build(zoo::simple_cnn(3));
    let options = OnnxOptions {
        dynamic_batch: false,
        class_names: Some((0..10).map(|i| format!("class {i}")).collect()),
        ..OnnxOptions::default()
    };
    let bytes = m.to_onnx_bytes(&options).unwrap();
    let x = random_input(&[3, 3, 32, 32], 4);
    assert_close("fixed batch", &tract_forward(&bytes, &x), kiln_forward(&m, &x).data());
    let proto = <tract_onnx::pb::ModelProto as prost::Message>::decode(&bytes[..]).unwrap();
    assert_eq!(proto.ir_version, 8);
    assert_eq!(proto.producer_name, "kiln");
    let meta: Vec<(String, String)> = proto.metadata_props.iter().map(|e| (e.key.clone(), e.value.clone())).collect();
    assert!(meta.contains(&("kiln.version".into(), env!("CARGO_PKG_VERSION").into())), "{meta:?}");
    assert!(meta.iter().any(|(k, v)| k == "kiln.class_names" && v.starts_with("[\"class 0\"")), "{meta:?}");
    let graph = proto.graph.unwrap();
    assert!(graph.node.iter().any(|n| n.name == "conv1" && n.op_type == "Conv"));
    assert!(graph.node.iter().any(|n| n.name == "dense1" && n.op_type == "Gemm"));
    assert!(graph.initializer.iter().all(|t| !t.raw_data.is_empty() && t.float_data.is_empty()));
    assert!(graph.initializer.iter().any(|t| t.name == "conv1.weight"));
}

#[test]
fn opsets_13_to_20_and_ir_versions() {
    use kiln::io::onnx::SUPPORTED_OPSETS;
    let m = build(ModelBuilder::new(&[1, 6]).dense(6).gelu().dense(2));
    let ir = |opset| match opset {
        13 | 14 => 7,
        15..=18 => 8,
        _ => 9,
    };
    for opset in SUPPORTED_OPSETS {
        let bytes = m.to_onnx_bytes(&OnnxOptions { opset, ..OnnxOptions::default() }).unwrap();
        let proto = <tract_onnx::pb::ModelProto as prost::Message>::decode(&bytes[..]).unwrap();
        assert_eq!(proto.ir_version, ir(opset), "opset {opset}");
        assert_eq!(proto.opset_import[0].version, opset);
        let ops: Vec<&str> = proto.graph.as_ref().unwrap().node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops.contains(&"Gelu"), opset >= 20, "opset {opset}: {ops:?}");
        assert_eq!(ops.contains(&"Erf"), opset < 20, "opset {opset}: {ops:?}");
        let back = Model::from_onnx_bytes(&bytes, "gelu.onnx").unwrap();
        assert_eq!(back.param_values(), m.param_values());
    }
    for opset in [12, 21] {
        let err = m.to_onnx_bytes(&OnnxOptions { opset, ..OnnxOptions::default() }).unwrap_err().to_string();
        assert!(err.contains(&format!("opset {opset}")), "{err}");
    }
}

#[test]
fn batch_norm_without_running_statistics_is_refused_by_name() {
    let m = ModelBuilder::new(&[2, 3])
        .dense(4)
        .name("fc")
        .batch_norm_with(BatchNorm::new().track_running_stats(false))
        .name("bn_batch_stats")
        .build()
        .unwrap();
    let err = m.to_onnx_bytes(&OnnxOptions::default()).unwrap_err().to_string();
    assert!(err.contains("bn_batch_stats"), "{err}");
}

#[test]
fn exported_models_import_back_unchanged() {
    let mut all = corpus();
    all.push(("resnet18", zoo::resnet18(2, 10)));
    all.push(("mnist_cnn", zoo::mnist_cnn(2)));
    for (name, b) in all {
        let m = build(b);
        let bytes = m.to_onnx_bytes(&OnnxOptions::default()).unwrap();
        let back = Model::from_onnx_bytes(&bytes, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        let x = random_input(&m.input_shape(), 3);
        assert_close(&format!("{name} imported back"), kiln_forward(&back, &x).data(), kiln_forward(&m, &x).data());
        // Same parameters under the same names (the export writes PyTorch's state_dict names).
        for (p, v) in m.params().iter().zip(m.param_values()) {
            assert_eq!(back.param(&p.name), Some(v.as_slice()), "{name}: {}", p.name);
        }
    }
}

#[test]
fn export_writes_a_file() {
    let m = build(zoo::mnist_cnn(1));
    let dir = std::env::temp_dir().join(format!("kiln-onnx-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mnist.onnx");
    m.export_onnx(&path, OnnxOptions::default()).unwrap();
    let back = Model::from_onnx(&path).unwrap();
    assert_eq!(back.param_count(), m.param_count());
    let err = m.export_onnx(dir.join("missing/x.onnx"), OnnxOptions::default()).unwrap_err().to_string();
    assert!(err.contains("missing"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Writes every zoo model and corpus model (opsets 13, 18 and 20) with inputs and kiln's
/// outputs at batch 1 and 7 for `scripts/onnx_check.py`, which runs the ONNX checker and ONNX
/// Runtime on them.
#[test]
#[ignore = "run by scripts/onnx_check.py (needs KILN_ONNX_CHECK_DIR)"]
fn write_exports_for_onnxruntime() {
    let dir = std::path::PathBuf::from(std::env::var("KILN_ONNX_CHECK_DIR").expect("KILN_ONNX_CHECK_DIR"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut all: Vec<(String, Model, Vec<i64>)> = vec![
        ("simple_cnn", zoo::simple_cnn(2)),
        ("advanced_cnn", zoo::advanced_cnn(2)),
        ("multiscale_cnn", zoo::multiscale_cnn(2)),
        ("mnist_cnn", zoo::mnist_cnn(2)),
        ("cifar_cnn", zoo::cifar_cnn(2)),
        ("resnet18", zoo::resnet18(2, 10)),
        ("inception_block", zoo::inception_block(2, 10)),
    ]
    .into_iter()
    .map(|(n, b)| (n.to_string(), build(b), vec![18]))
    .collect();
    all.extend(corpus().into_iter().map(|(n, b)| (n.to_string(), build(b), vec![13, 18, 20])));
    // Imported from PyTorch and go-metal, fine-tuned one step, exported again.
    for file in ["resnet18_tv-dynamo-op18.onnx", "gometal.onnx"] {
        let stem = file.trim_end_matches(".onnx").replace('-', "_");
        all.push((format!("finetuned_{stem}"), super::import::fine_tuned(file), vec![18]));
    }
    for (name, m, opsets) in all {
        for opset in opsets {
            let options = OnnxOptions { opset, ..OnnxOptions::default() };
            m.export_onnx(dir.join(format!("{name}-op{opset}.onnx")), options).unwrap();
        }
        let mut io = serde_json::Map::new();
        for batch in [1, 7] {
            let mut shape = m.input_shape();
            shape[0] = batch;
            let x = random_input(&shape, 11 + batch as u64);
            let y = kiln_forward(&m, &x);
            io.insert(format!("input{batch}"), serde_json::json!({"shape": x.shape(), "data": x.data()}));
            io.insert(format!("output{batch}"), serde_json::json!({"shape": y.shape(), "data": y.data()}));
        }
        std::fs::write(dir.join(format!("{name}.io.json")), serde_json::to_string(&io).unwrap()).unwrap();
    }
}
