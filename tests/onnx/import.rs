//! Files exported by PyTorch (tests/fixtures/onnx/make_fixtures.py) and a go-metal-style file
//! (make_go_metal.py) import as trainable models that give the producer's outputs.

use std::path::{Path, PathBuf};

use super::{assert_close, kiln_forward, tract_forward};
use kiln::io::onnx::OnnxOptions;
use kiln::model::{Layer, Model};
use kiln::tensor::Tensor;
use kiln::train::{Device, Optimizer, Trainer, TrainerConfig};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/onnx")
}

#[derive(serde::Deserialize)]
struct Io {
    input_shape: Vec<usize>,
    input: Vec<f32>,
    output_shape: Vec<usize>,
    output: Vec<f32>,
}

fn io(path: &Path) -> (Tensor, Vec<usize>, Vec<f32>) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let io: Io = serde_json::from_str(&text).unwrap();
    (Tensor::new(&io.input_shape, io.input).unwrap(), io.output_shape, io.output)
}

const MODELS: [&str; 11] = [
    "simple",
    "advanced",
    "multiscale",
    "mnist",
    "cifar",
    "resnet18_cifar",
    "resnet18_tv",
    "inception",
    "corpus",
    "groupnorm",
    "convtranspose",
];

fn files(model: &str) -> Vec<String> {
    let mut v: Vec<String> =
        ["legacy-op13", "legacy-op18", "dynamo-op18"].iter().map(|t| format!("{model}-{t}.onnx")).collect();
    if model == "simple" {
        v.extend(["simple-typed.onnx", "simple-nofold.onnx", "simple-dropout.onnx"].map(String::from));
    }
    v
}

/// Imports `file` and checks kiln's output on the stored input against PyTorch's.
fn check_file(dir: &Path, file: &str, model: &str) -> Model {
    let m = Model::from_onnx(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    let (x, shape, want) = io(&dir.join(format!("{model}.io.json")));
    let y = kiln_forward(&m, &x);
    assert_eq!(y.shape(), shape.as_slice(), "{file}");
    assert_close(file, y.data(), &want);
    m
}

#[test]
fn pytorch_exports_import_with_pytorchs_outputs() {
    for model in MODELS {
        for file in files(model) {
            check_file(&fixtures(), &file, model);
        }
    }
}

#[test]
fn imports_keep_pytorchs_names_and_layers() {
    let m = Model::from_onnx(fixtures().join("resnet18_tv-legacy-op13.onnx")).unwrap();
    // The exporter folds batch norm into the convolutions (eval mode); convolution weights then
    // have generated names, and the layers are named after the TorchScript scopes.
    for name in ["conv1.weight", "layer2.0.downsample.0.weight", "layer4.1.conv2.bias", "fc.weight"] {
        assert!(
            m.param(name).is_some(),
            "{name} missing: {:?}",
            m.params().iter().map(|p| &p.name).collect::<Vec<_>>()
        );
    }
    assert!(m.nodes().iter().any(|n| matches!(n.layer, Layer::MaxPool2d(_))));
    assert_eq!(m.nodes().iter().filter(|n| n.layer == Layer::Add).count(), 8);
    let m = Model::from_onnx(fixtures().join("corpus-legacy-op18.onnx")).unwrap();
    assert!(m.param("bn2.running_var").is_some(), "{:?}", m.params().iter().map(|p| &p.name).collect::<Vec<_>>());
    // The corpus's SiLU and GELU formulas become single layers.
    for file in ["corpus-legacy-op13.onnx", "corpus-dynamo-op18.onnx"] {
        let m = Model::from_onnx(fixtures().join(file)).unwrap();
        let acts: Vec<String> = m.nodes().iter().map(|n| n.layer.type_name().to_string()).collect();
        for a in ["silu", "gelu", "leaky_relu", "elu", "tanh", "sigmoid", "softmax"] {
            assert_eq!(acts.iter().filter(|t| *t == a).count(), 1, "{file}: {a} in {acts:?}");
        }
    }
}

#[test]
fn pytorch_group_norm_imports_as_group_norm_layers() {
    // make_fixtures.py's GroupNorms: GroupNorm(4, 8), GroupNorm(2, 8, eps 1e-3, affine=False),
    // InstanceNorm2d(8, affine) (8 groups of one channel), GroupNorm(3, 12) on [batch, 12].
    for file in files("groupnorm") {
        let m = Model::from_onnx(fixtures().join(&file)).unwrap();
        let norms: Vec<(usize, f32)> = m
            .nodes()
            .iter()
            .filter_map(|n| match &n.layer {
                Layer::GroupNorm(g) => Some((g.groups, g.eps)),
                _ => None,
            })
            .collect();
        assert_eq!(norms, [(4, 1e-5), (2, 1e-3), (8, 1e-5), (3, 1e-5)], "{file}");
        // Each Mul and Add by the per-channel weight and bias is folded into its layer.
        let kinds: Vec<&str> = m.nodes().iter().map(|n| n.layer.type_name()).collect();
        assert!(!kinds.contains(&"add"), "{file}: {kinds:?}");
    }
    // The TorchScript exporter keeps PyTorch's names where the parameter is used as it is.
    let m = Model::from_onnx(fixtures().join("groupnorm-legacy-op18.onnx")).unwrap();
    for name in ["gn3.weight", "gn3.bias", "inorm.weight"] {
        assert!(m.param(name).is_some(), "{name}: {:?}", m.params().iter().map(|p| &p.name).collect::<Vec<_>>());
    }
}

#[test]
fn instance_norm_that_is_not_a_group_norm_is_refused_by_name() {
    // InstanceNormalization over a [C, H, W] value viewed as [H*W, C]: not groups of channels.
    let m = kiln::model::ModelBuilder::new(&[1, 4, 3, 3]).conv2d(6, 1).build().unwrap();
    let bytes = m.to_onnx_bytes(&OnnxOptions::default()).unwrap();
    let mut proto = <tract_onnx::pb::ModelProto as prost::Message>::decode(&bytes[..]).unwrap();
    let graph = proto.graph.as_mut().unwrap();
    let conv_out = graph.node[0].output[0].clone();
    let out = graph.output[0].name.clone();
    graph.node[0].output[0] = "conv".into();
    let i64s = |name: &str, v: &[i64]| tract_onnx::pb::TensorProto {
        name: name.into(),
        dims: vec![v.len() as i64],
        data_type: 7,
        int64_data: v.to_vec(),
        ..Default::default()
    };
    let f32s = |name: &str, v: &[f32]| tract_onnx::pb::TensorProto {
        name: name.into(),
        dims: vec![v.len() as i64],
        data_type: 1,
        float_data: v.to_vec(),
        ..Default::default()
    };
    graph.initializer.extend([i64s("rows", &[0, 9, -1]), f32s("ones", &[1.0; 9]), f32s("zeros", &[0.0; 9])]);
    let node = |op: &str, name: &str, ins: &[&str], out: &str| tract_onnx::pb::NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: ins.iter().map(|s| s.to_string()).collect(),
        output: vec![out.into()],
        ..Default::default()
    };
    graph.node.push(node("Reshape", "rows", &["conv", "rows"], "r"));
    graph.node.push(node("InstanceNormalization", "odd_norm", &["r", "ones", "zeros"], "n"));
    graph.node.push(node("Flatten", "flat", &["n"], &out));
    assert_ne!(conv_out, "");
    let bytes = prost::Message::encode_to_vec(&proto);
    let err = Model::from_onnx_bytes(&bytes, "odd.onnx").unwrap_err().to_string();
    assert!(err.contains("odd_norm") && err.contains("InstanceNormalization"), "{err}");
}

/// The model of fixture `file` after one Adam step.
pub fn fine_tuned(file: &str) -> Model {
    let m = Model::from_onnx(fixtures().join(file)).unwrap();
    let mut shape = m.input_shape();
    shape[0] = 4;
    let x = super::random_input(&shape, 21);
    let classes = m.output_shape()[1] as u32;
    let labels: Vec<u32> = (0..4).map(|i| i % classes).collect();
    let config = TrainerConfig {
        batch_size: 4,
        learning_rate: 1e-2,
        optimizer: Optimizer::adam(),
        device: Device::Cpu,
        threads: Some(1),
        ..TrainerConfig::default()
    };
    let mut trainer = Trainer::new(&m, config).unwrap();
    let step = trainer.train_batch(&x, &labels).unwrap();
    assert!(step.loss.is_finite(), "{file}: loss {}", step.loss);
    let tuned = trainer.model().unwrap().clone();
    assert_ne!(tuned.param_values(), m.param_values(), "{file}: the step changed nothing");
    tuned
}

/// One Adam step on an imported model, then its export runs in tract with the new weights.
fn fine_tune_and_export(file: &str) {
    let tuned = fine_tuned(file);
    let mut shape = tuned.input_shape();
    let bytes = tuned.to_onnx_bytes(&OnnxOptions::default()).unwrap();
    for batch in [1, 7] {
        shape[0] = batch;
        let x = super::random_input(&shape, 5);
        assert_close(
            &format!("{file} fine-tuned, batch {batch}"),
            &tract_forward(&bytes, &x),
            kiln_forward(&tuned, &x).data(),
        );
    }
}

#[test]
fn imported_models_fine_tune_and_export_again() {
    for file in [
        "resnet18_tv-dynamo-op18.onnx",
        "resnet18_cifar-legacy-op13.onnx",
        "mnist-legacy-op18.onnx",
        "gometal.onnx",
        "groupnorm-dynamo-op18.onnx",
        "convtranspose-legacy-op13.onnx",
    ] {
        fine_tune_and_export(file);
    }
}

#[test]
fn go_metal_file_imports_with_go_metals_meaning() {
    let m = check_file(&fixtures(), "gometal.onnx", "gometal");
    let names: Vec<&str> = m.nodes().iter().map(|n| n.name.as_str()).collect();
    for n in ["conv1", "bn1", "relu1", "conv2", "dense1", "dense2", "output", "swish1", "softmax"] {
        assert!(names.contains(&n), "{n} not in {names:?}");
    }
    // The proto3 zero values: LeakyReLU's slope 0 is read as 0, not ONNX's default 0.01.
    assert!(
        m.nodes()
            .iter()
            .any(|n| n.name == "leaky0"
                && n.layer == Layer::Activation(kiln::model::Activation::LeakyRelu { slope: 0.0 }))
    );
    // The square dense layer's weight is the file's B as it is ([out, in]).
    let file_b = m.param("dense2.weight").unwrap().to_vec();
    assert_eq!(m.params().iter().find(|p| p.name == "dense2.weight").unwrap().shape, vec![16, 16]);
    assert_eq!(m.param("dense1.weight").unwrap().len(), 16 * 36);
    // Read as standard ONNX (producer renamed), the square layer would be transposed: the
    // dialect matters, and the result differs.
    let mut bytes = std::fs::read(fixtures().join("gometal.onnx")).unwrap();
    let at = bytes.windows(8).position(|w| w == b"go-metal").unwrap();
    bytes[at..at + 8].copy_from_slice(b"go-other");
    let err = Model::from_onnx_bytes(&bytes, "renamed.onnx").unwrap_err().to_string();
    assert!(err.contains("dense1_matmul_op"), "a 4-D MatMul input is go-metal's only: {err}");
    assert!(!file_b.is_empty());
}

/// torchvision's full ResNet-18 (45 MB, not committed): `python make_fixtures.py --full-resnet DIR`
/// then `KILN_ONNX_FULL=DIR cargo test --test onnx -- --ignored torchvision_resnet18_full`.
#[test]
#[ignore = "needs KILN_ONNX_FULL=DIR written by make_fixtures.py --full-resnet DIR"]
fn torchvision_resnet18_full() {
    let dir = PathBuf::from(std::env::var("KILN_ONNX_FULL").expect("KILN_ONNX_FULL must name the folder"));
    for file in ["resnet18_full-legacy-op18.onnx", "resnet18_full-dynamo-op18.onnx"] {
        let m = check_file(&dir, file, "resnet18_full");
        // torchvision's 11,689,512 less the batch norms the exporters fold into the convolutions
        // (2 x 4,800 scales and shifts become 4,800 convolution biases).
        assert_eq!(m.param_count(), 11_689_512 - 4_800, "{file}");
    }
}
