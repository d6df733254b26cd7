//! Model files and checkpoints: what is in them (PyTorch `state_dict` names, shapes and dtypes,
//! the architecture), that a saved model loads without the code that built it, that loading
//! someone else's weights lists every problem at once, and the checkpoint manager's rotation,
//! best checkpoint and clean-up.

use std::path::{Path, PathBuf};

use kiln::backend::cpu::CpuBackend;
use kiln::data::{DataLoader, TensorDataset};
use kiln::exec::{Executor, Mode};
use kiln::io::{Checkpoint, CheckpointManager};
use kiln::model::{BatchNorm, Conv2d, Model, ModelBuilder, Pool2d, branch};
use kiln::rng::Rng;
use kiln::tensor::Tensor;
use kiln::train::{Device, Monitor, Optimizer, Trainer, TrainerConfig};
use kiln::{Error, Result};
use safetensors::{Dtype, SafeTensors};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-files-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut r = Rng::new(seed);
    Tensor::new(shape, (0..shape.iter().product()).map(|_| r.uniform_range(-1.0, 1.0)).collect()).unwrap()
}

/// Every layer kind and option that changes the architecture: residual and concatenating
/// blocks, batch norm without affine parameters or running statistics, pooling options.
fn every_layer() -> Model {
    ModelBuilder::new(&[2, 3, 8, 8])
        .conv2d_with(Conv2d::new(6, 3).padding("same").bias(false))
        .name("stem")
        .batch_norm_with(BatchNorm::new().momentum(0.2).eps(1e-3))
        .name("stem_bn")
        .leaky_relu(0.2)
        .residual(|b| {
            b.conv2d_with(Conv2d::new(6, 3).padding(1).groups(3))
                .batch_norm_with(BatchNorm::new().affine(false))
                .elu(0.5)
        })
        .concat([
            branch(|b| b.conv2d(4, 1).gelu()),
            branch(|b| {
                b.max_pool2d_with(Pool2d::new(3).stride(1).padding(1)).conv2d_with(Conv2d::new(2, 1).dilation(1))
            }),
        ])
        .avg_pool2d_with(Pool2d::new(2).count_include_pad(false))
        .batch_norm_with(BatchNorm::new().track_running_stats(false))
        .silu()
        .reshape(&[6, 4, 4])
        .global_avg_pool()
        .dropout(0.1)
        .dense(5)
        .name("head")
        .tanh()
        .softmax(-1)
        .seed(42)
        .build()
        .unwrap()
}

fn forward(model: &Model, x: &Tensor) -> Vec<f32> {
    let mut e = Executor::new(model, CpuBackend::<f32>::new(Some(1)).unwrap()).unwrap();
    e.predict(x, Mode::Eval).unwrap().data().to_vec()
}

fn bits(m: &Model) -> Vec<Vec<u32>> {
    m.param_values().iter().map(|v| v.iter().map(|x| x.to_bits()).collect()).collect()
}

#[test]
fn a_saved_model_loads_without_its_code_and_computes_the_same() {
    let mut model = every_layer();
    // Non-default running statistics, so they are seen to travel.
    let var: Vec<f32> = (0..6).map(|i| 0.5 + i as f32).collect();
    model.set_param("stem_bn.running_var", &var).unwrap();
    let path = tmp("roundtrip").join("model.safetensors");
    model.save(&path).unwrap();
    let back = Model::load(&path).unwrap();
    assert_eq!(back.nodes(), model.nodes());
    assert_eq!(back.params(), model.params());
    assert_eq!(bits(&back), bits(&model));
    assert_eq!((back.batch_size(), back.seed()), (model.batch_size(), model.seed()));
    let x = random(&[2, 3, 8, 8], 1);
    let (a, b) = (forward(&model, &x), forward(&back, &x));
    assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
}

#[test]
fn files_hold_pytorch_state_dict_names_shapes_and_dtypes() {
    let model = every_layer();
    let path = tmp("layout").join("model.safetensors");
    model.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut want: Vec<String> = model.params().iter().map(|p| p.name.clone()).collect();
    // Only the batch norms with running statistics have the counter, as in PyTorch.
    want.extend(["stem_bn.num_batches_tracked".into(), "batch_norm_2.num_batches_tracked".into()]);
    want.sort();
    assert_eq!(names, want);
    for p in model.params() {
        let t = st.tensor(&p.name).unwrap();
        assert_eq!((t.dtype(), t.shape()), (Dtype::F32, p.shape.as_slice()), "{}", p.name);
    }
    assert!(model.params().iter().any(|p| p.name == "stem.weight" && p.shape == [6, 3, 3, 3]));
    let nbt = st.tensor("stem_bn.num_batches_tracked").unwrap();
    assert_eq!((nbt.dtype(), nbt.shape(), nbt.data()), (Dtype::I64, &[][..], &0i64.to_le_bytes()[..]));
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
    assert!(meta.get("kiln.model").unwrap().contains("\"stem_bn\""));
}

/// Writes a safetensors file of F32 tensors (and any raw extras) as PyTorch would: no metadata.
fn write_torch_like(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn small() -> Model {
    ModelBuilder::new(&[1, 2, 4, 4])
        .conv2d(3, 3)
        .name("conv")
        .batch_norm()
        .name("bn")
        .relu()
        .dense(2)
        .name("fc")
        .build()
        .unwrap()
}

/// The tensors of `small()` as a PyTorch state_dict would hold them, with given values.
fn small_state(fill: f32) -> Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)> {
    let t = |n, s: Vec<usize>| {
        let len = s.iter().product();
        (n, Dtype::F32, s, f32_bytes(&vec![fill; len]))
    };
    vec![
        t("conv.weight", vec![3, 2, 3, 3]),
        t("conv.bias", vec![3]),
        t("bn.weight", vec![3]),
        t("bn.bias", vec![3]),
        t("bn.running_mean", vec![3]),
        t("bn.running_var", vec![3]),
        ("bn.num_batches_tracked", Dtype::I64, vec![], 7i64.to_le_bytes().to_vec()),
        t("fc.weight", vec![2, 12]),
        t("fc.bias", vec![2]),
    ]
}

#[test]
fn pytorch_weights_load_by_name_with_or_without_the_batch_counter() {
    let dir = tmp("torch-like");
    let mut model = small();
    let path = dir.join("w.safetensors");
    write_torch_like(&path, &small_state(0.25));
    model.load_weights(&path).unwrap();
    assert!(model.param_values().iter().all(|v| v.iter().all(|&x| x == 0.25)));
    // Without num_batches_tracked, and in half precision (widened exactly).
    let half: Vec<_> = small_state(0.0)
        .into_iter()
        .filter(|t| t.0 != "bn.num_batches_tracked")
        .map(|(n, _, s, b)| (n, Dtype::BF16, s.clone(), [0x80, 0x3f].repeat(b.len() / 4)))
        .collect();
    write_torch_like(&path, &half);
    model.load_weights(&path).unwrap();
    assert!(model.param_values().iter().all(|v| v.iter().all(|&x| x == 1.0)), "bf16 0x3f80 is 1.0");
    // A model file has no architecture, and the error says what to do instead.
    match Model::load(&path) {
        Err(Error::Format { reason, .. }) => assert!(reason.contains("load_weights"), "{reason}"),
        other => panic!("expected a format error, got {other:?}"),
    }
}

#[test]
fn loading_weights_that_do_not_fit_lists_every_problem_and_changes_nothing() {
    let dir = tmp("misfit");
    let mut model = small();
    let before = bits(&model);
    let mut state = small_state(0.5);
    state.retain(|t| t.0 != "conv.bias" && t.0 != "bn.running_mean"); // two missing
    state.push(("extra.weight", Dtype::F32, vec![1], f32_bytes(&[1.0]))); // unexpected
    state.push(("head.bias", Dtype::F32, vec![1], f32_bytes(&[1.0]))); // unexpected
    for t in state.iter_mut() {
        match t.0 {
            "fc.weight" => *t = ("fc.weight", Dtype::F32, vec![12, 2], t.3.clone()), // transposed
            "fc.bias" => *t = ("fc.bias", Dtype::I32, vec![2], vec![0; 8]),          // not a float
            "bn.weight" => *t = ("bn.weight", Dtype::F32, vec![3], f32_bytes(&[1.0, f32::NAN, 1.0])),
            "bn.running_var" => *t = ("bn.running_var", Dtype::F32, vec![3], f32_bytes(&[1.0, -1.0, 1.0])),
            "bn.num_batches_tracked" => *t = ("bn.num_batches_tracked", Dtype::F32, vec![2], f32_bytes(&[0.0, 0.0])),
            _ => {}
        }
    }
    let path = dir.join("misfit.safetensors");
    write_torch_like(&path, &state);
    let err = model.load_weights(&path).unwrap_err();
    let Error::Format { reason, path: p } = err else { panic!("expected a format error, got {err:?}") };
    assert_eq!(p, path);
    for needle in [
        "9 problems",
        "missing: conv.bias, bn.running_mean",
        "unexpected: extra.weight, head.bias",
        "fc.weight: shape [12, 2] in the file, [2, 12] in the model",
        "fc.bias: dtype I32",
        "bn.weight: non-finite",
        "bn.running_var: negative running variance",
        "bn.num_batches_tracked: must be an integer scalar",
    ] {
        assert!(reason.contains(needle), "'{needle}' not in: {reason}");
    }
    assert_eq!(bits(&model), before, "a failed load must change nothing");
}

#[test]
fn non_finite_weights_are_not_saved_and_the_previous_file_survives() {
    let dir = tmp("nan");
    let path = dir.join("m.safetensors");
    let mut model = small();
    model.save(&path).unwrap();
    let good = std::fs::read(&path).unwrap();
    let mut w = model.param("fc.weight").unwrap().to_vec();
    w[3] = f32::NAN;
    model.set_param("fc.weight", &w).unwrap();
    match model.save(&path) {
        Err(Error::State(reason)) => assert!(reason.contains("fc.weight"), "{reason}"),
        other => panic!("expected an error, got {other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), good);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left behind");
}

fn tiny_loader(seed: u64) -> DataLoader {
    let x = random(&[16, 2, 4, 4], seed);
    let y = (0..16).map(|i| (i % 2) as u32).collect();
    DataLoader::builder(TensorDataset::new(x, y).unwrap()).batch_size(4).shuffle(true).seed(seed).build().unwrap()
}

fn trainer_config() -> TrainerConfig {
    TrainerConfig {
        batch_size: 4,
        learning_rate: 0.05,
        optimizer: Optimizer::sgd(0.9),
        device: Device::Cpu,
        threads: Some(1),
        ..Default::default()
    }
}

#[test]
fn a_checkpoint_is_also_a_model_file_and_counts_batch_norm_batches() {
    let dir = tmp("ckpt-model");
    let mut t = Trainer::new(&small(), trainer_config()).unwrap();
    t.fit(&tiny_loader(1), None, 2).unwrap();
    let path = dir.join("ckpt.safetensors");
    t.save_checkpoint(&path).unwrap();
    let model = Model::load(&path).unwrap();
    assert_eq!(bits(&model), bits(t.model().unwrap()));
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    // 2 epochs of 4 batches: PyTorch's batch norm would have counted 8.
    assert_eq!(st.tensor("bn.num_batches_tracked").unwrap().data(), &8i64.to_le_bytes());
    assert!(st.names().iter().any(|n| n.starts_with("trainer/optimizer.0.")));
    let ckpt = Checkpoint::read(&path).unwrap();
    let state = ckpt.trainer.unwrap();
    assert_eq!((state.meta.epochs_done, state.meta.steps_taken, state.meta.history.epochs.len()), (2, 8, 2));
    // A model file cannot be resumed.
    model.save(dir.join("model.safetensors")).unwrap();
    match Trainer::resume(dir.join("model.safetensors")) {
        Err(Error::Format { reason, .. }) => assert!(reason.contains("no trainer state"), "{reason}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a model file resumed"),
    }
    // The device can be changed on resume.
    let t2 = Trainer::resume_on(&path, Device::Cpu).unwrap();
    assert_eq!(t2.config().device, Device::Cpu);
    assert_eq!(t2.epochs_done(), 2);
}

#[test]
fn a_layer_named_like_trainer_state_cannot_be_checkpointed() -> Result<()> {
    let model = ModelBuilder::new(&[1, 3]).dense(2).name("trainer/x").build()?;
    let mut t = Trainer::new(&model, TrainerConfig { batch_size: 1, ..trainer_config() })?;
    match t.save_checkpoint(tmp("clash").join("c.safetensors")) {
        Err(Error::Param { name, .. }) => assert_eq!(name, "trainer/x.weight"),
        other => panic!("expected a parameter error, got {other:?}"),
    }
    Ok(())
}

#[test]
fn the_manager_keeps_the_last_k_and_the_best_and_cleans_up_after_a_kill() {
    let dir = tmp("manager");
    std::fs::write(dir.join(".epoch-00009-step-000000036.safetensors.tmp-123-0"), b"half a file").unwrap();
    std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
    std::fs::write(dir.join("epoch-00001.json"), b"mine too").unwrap();
    let mut mgr = CheckpointManager::new(&dir).unwrap().every_epochs(2).keep_last(2).best(Monitor::TrainLoss);
    assert!(dir.join(".epoch-00009-step-000000036.safetensors.tmp-123-0").exists(), "a reader deletes nothing");
    let mut t = Trainer::new(&small(), trainer_config()).unwrap();
    let loader = tiny_loader(3);
    t.fit_with(&loader, None, 7, &mut [&mut mgr]).unwrap();
    assert!(
        !dir.join(".epoch-00009-step-000000036.safetensors.tmp-123-0").exists(),
        "the writer removed the stale file"
    );
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "best.safetensors",
            "epoch-00001.json",
            "epoch-00004-step-000000016.safetensors",
            "epoch-00006-step-000000024.safetensors",
            "notes.txt"
        ]
    );
    // best.safetensors is the checkpoint of the epoch with the lowest training loss.
    let losses: Vec<f32> = t.history().epochs.iter().map(|e| e.train.loss).collect();
    let best_epoch = losses.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 + 1;
    let best = Checkpoint::read(mgr.best_path()).unwrap().trainer.unwrap();
    assert_eq!(best.meta.epochs_done, best_epoch, "losses {losses:?}");
    assert_eq!(mgr.latest().unwrap().unwrap(), dir.join("epoch-00006-step-000000024.safetensors"));
    let resumed = Trainer::resume(mgr.latest().unwrap().unwrap()).unwrap();
    assert_eq!(resumed.epochs_done(), 6);
}
