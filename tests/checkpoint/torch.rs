//! Weights interchangeable with PyTorch through safetensors, checked against files PyTorch wrote
//! and read (tests/fixtures/torch_cnn.py says how each file was made; no Python is needed here).
//!
//! - PyTorch -> kiln: `torch_cnn.safetensors` is a `state_dict` (nn.Sequential names, batch norm
//!   with `num_batches_tracked`); loaded into the same architecture built in kiln, the eval-mode
//!   output matches the one PyTorch computed.
//! - kiln -> PyTorch: `kiln_cnn.safetensors` (Model::save) and `kiln_cnn_ckpt.safetensors`
//!   (Trainer::save_checkpoint) were written by this test with KILN_REGEN_FIXTURES=1, and
//!   `torch_cnn.py check` loaded both with `load_state_dict(strict=True)` and matched kiln's
//!   output (recorded in src/io/NOTES.md). Here they must still load in kiln and give that output.

use std::path::{Path, PathBuf};

use kiln::backend::cpu::CpuBackend;
use kiln::exec::{Executor, Mode};
use kiln::model::{Conv2d, Model, ModelBuilder};
use kiln::tensor::Tensor;
use kiln::train::{Device, Optimizer, Trainer, TrainerConfig};
use safetensors::{Dtype, SafeTensors};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// The PyTorch model of torch_cnn.py, layer for layer, named as its state_dict.
fn kiln_net() -> Model {
    ModelBuilder::new(&[2, 3, 8, 8])
        .conv2d_with(Conv2d::new(8, 3).padding(1))
        .name("features.0")
        .batch_norm()
        .name("features.1")
        .relu()
        .max_pool2d(2)
        .conv2d_with(Conv2d::new(16, 3).stride(2).padding(1).bias(false))
        .name("features.4")
        .batch_norm()
        .name("features.5")
        .relu()
        .flatten()
        .dense(32)
        .name("head.1")
        .batch_norm()
        .name("head.2")
        .relu()
        .dropout(0.5)
        .dense(10)
        .name("head.5")
        .build()
        .unwrap()
}

fn f32s(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::F32);
    (t.shape().to_vec(), t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// The input `x` and output `y` of an `*_io.safetensors` fixture.
fn read_io(name: &str) -> (Tensor, Vec<f32>) {
    let bytes = std::fs::read(fixture(name)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (shape, x) = f32s(&st, "x");
    (Tensor::new(&shape, x).unwrap(), f32s(&st, "y").1)
}

fn eval(model: &Model, x: &Tensor) -> Vec<f32> {
    let mut e = Executor::new(model, CpuBackend::<f32>::new(Some(1)).unwrap()).unwrap();
    e.predict(x, Mode::Eval).unwrap().data().to_vec()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len());
    let err = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let scale = want.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    assert!(scale > 0.1, "{what}: a trivial output checks nothing");
    assert!(err <= 2e-5 * scale.max(1.0), "{what}: max error {err} (outputs up to {scale})");
}

#[test]
fn a_pytorch_state_dict_loads_and_reproduces_pytorch_s_output() {
    let mut model = kiln_net();
    model.load_weights(fixture("torch_cnn.safetensors")).unwrap();
    // Running statistics came across (PyTorch ran three training batches before saving).
    assert!(model.param("features.1.running_var").unwrap().iter().all(|&v| v != 1.0));
    let (x, y) = read_io("torch_cnn_io.safetensors");
    assert_close(&eval(&model, &x), &y, "PyTorch weights in kiln");
}

#[test]
fn a_pytorch_state_dict_for_another_architecture_is_refused_with_every_difference() {
    // The head one layer short and 12 features wide: names and shapes no longer fit.
    let mut model = ModelBuilder::new(&[2, 3, 8, 8])
        .conv2d_with(Conv2d::new(8, 3).padding(1))
        .name("features.0")
        .batch_norm()
        .name("features.1")
        .relu()
        .max_pool2d(2)
        .conv2d_with(Conv2d::new(16, 3).stride(2).padding(1).bias(false))
        .name("features.4")
        .flatten()
        .dense(12)
        .name("head.1")
        .build()
        .unwrap();
    let reason = match model.load_weights(fixture("torch_cnn.safetensors")) {
        Err(kiln::Error::Format { reason, .. }) => reason,
        other => panic!("expected a format error, got {other:?}"),
    };
    for needle in [
        "features.5.weight",
        "head.2.running_mean",
        "head.5.bias",
        "head.1.weight: shape [32, 64] in the file, [12, 64]",
    ] {
        assert!(reason.contains(needle), "'{needle}' not in: {reason}");
    }
}

/// Writes the kiln -> PyTorch fixtures: PyTorch's weights, two SGD steps in kiln (so the weights
/// are kiln's own), a model file, a checkpoint, and kiln's eval output on `x`.
fn regenerate() {
    let mut model = kiln_net();
    model.load_weights(fixture("torch_cnn.safetensors")).unwrap();
    let config = TrainerConfig {
        batch_size: 2,
        learning_rate: 0.1,
        optimizer: Optimizer::sgd(0.9),
        device: Device::Cpu,
        threads: Some(1),
        ..Default::default()
    };
    let mut t = Trainer::new(&model, config).unwrap();
    let (x, _) = read_io("torch_cnn_io.safetensors");
    for labels in [[1u32, 7], [3, 3]] {
        t.train_step(&x, &labels).unwrap();
    }
    t.save_checkpoint(fixture("kiln_cnn_ckpt.safetensors")).unwrap();
    let trained = t.model().unwrap().clone();
    trained.save(fixture("kiln_cnn.safetensors")).unwrap();
    let y = eval(&trained, &x);
    let bytes = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
    let (xb, yb) = (bytes(x.data()), bytes(&y));
    let views = [
        ("x", safetensors::tensor::TensorView::new(Dtype::F32, x.shape().to_vec(), &xb).unwrap()),
        ("y", safetensors::tensor::TensorView::new(Dtype::F32, vec![2, 10], &yb).unwrap()),
    ];
    safetensors::serialize_to_file(views, None, &fixture("kiln_cnn_io.safetensors")).unwrap();
}

#[test]
fn kiln_files_that_pytorch_loaded_strictly_still_load_and_compute_the_same() {
    if std::env::var_os("KILN_REGEN_FIXTURES").is_some() {
        regenerate();
    }
    let (x, y) = read_io("kiln_cnn_io.safetensors");
    for file in ["kiln_cnn.safetensors", "kiln_cnn_ckpt.safetensors"] {
        let model = Model::load(fixture(file)).unwrap();
        assert_eq!(model.nodes(), kiln_net().nodes(), "{file}: architecture");
        assert_close(&eval(&model, &x), &y, file);
    }
    let mut differs = kiln_net();
    differs.load_weights(fixture("torch_cnn.safetensors")).unwrap();
    let torch_out = eval(&differs, &x);
    assert!(torch_out.iter().zip(&y).any(|(a, b)| (a - b).abs() > 1e-3), "kiln trained the weights it saved");
}
