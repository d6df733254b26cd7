//! What careless and hostile users hit (issue 14): each test is one reproduction from the issue,
//! which returned a wrong result, aborted or panicked before the fix, and now gives an error that
//! names what is wrong.

mod common;

use std::io::Write;
use std::path::PathBuf;

use common::TempDir;
use kiln::data::{Cifar10, DataLoader, ImageFolder, Mnist, OnError, TensorDataset};
use kiln::model::ModelBuilder;
use kiln::tensor::Tensor;
use kiln::train::{Device, Loss, NonFinite, Optimizer, Schedule, Trainer, TrainerConfig};
use kiln::{Error, Result};

fn cpu_config() -> TrainerConfig {
    TrainerConfig { batch_size: 4, device: Device::Cpu, threads: Some(1), ..Default::default() }
}

fn config_err(config: TrainerConfig) -> (String, String) {
    let model = ModelBuilder::new(&[2, 3]).dense(4).build().unwrap();
    match Trainer::new(&model, config) {
        Err(Error::Config { field, reason }) => (field, reason),
        Err(e) => panic!("expected a config error, got {e}"),
        Ok(_) => panic!("expected a config error, got a trainer"),
    }
}

// Item 3: values finite in f64 but infinite (or zero) in f32, the precision of the update.
#[test]
fn rates_are_validated_in_the_precision_of_the_update() {
    let d = cpu_config;
    let (field, reason) = config_err(TrainerConfig { learning_rate: 1e39, ..d() });
    assert_eq!(field, "learning_rate");
    assert!(reason.contains("f32") && reason.contains("1e39"), "{reason}");
    assert_eq!(config_err(TrainerConfig { learning_rate: 1e-50, ..d() }).0, "learning_rate");
    let exp = Schedule::Exponential { gamma: f64::INFINITY };
    assert_eq!(config_err(TrainerConfig { schedule: Some(exp), ..d() }).0, "schedule.gamma");
    let exp = Schedule::Exponential { gamma: 1e40 };
    assert_eq!(config_err(TrainerConfig { schedule: Some(exp), ..d() }).0, "schedule.gamma");
    let cos = Schedule::Cosine { t_max: 10, eta_min: f64::INFINITY };
    assert_eq!(config_err(TrainerConfig { schedule: Some(cos), ..d() }).0, "schedule.eta_min");
    let cos = Schedule::CosineWarmRestarts { t_0: 10, t_mult: 1, eta_min: 1e300 };
    assert_eq!(config_err(TrainerConfig { schedule: Some(cos), ..d() }).0, "schedule.eta_min");
    let step = Schedule::Step { step_size: 1, gamma: f64::INFINITY };
    assert_eq!(config_err(TrainerConfig { schedule: Some(step), ..d() }).0, "schedule.gamma");
    let cycle = Schedule::one_cycle(1e39, 100);
    assert_eq!(config_err(TrainerConfig { schedule: Some(cycle), ..d() }).0, "schedule.max_lr");
    // A sound config still builds.
    let model = ModelBuilder::new(&[2, 3]).dense(4).build().unwrap();
    let cos = Schedule::Cosine { t_max: 10, eta_min: 1e-6 };
    Trainer::new(&model, TrainerConfig { schedule: Some(cos), ..d() }).unwrap();
}

// Item 9: a thread count that would take the system minutes to start (100,000) is refused at once.
#[test]
fn absurd_thread_counts_are_refused() {
    let t = std::time::Instant::now();
    let (field, reason) = config_err(TrainerConfig { threads: Some(100_000), ..cpu_config() });
    assert_eq!(field, "threads");
    assert!(reason.contains("4096"), "{reason}");
    assert!(t.elapsed().as_secs() < 5, "refused only after {:?}", t.elapsed());
}

// Item 4: nothing to train on is an error naming the source, not Ok with loss 0.
#[test]
fn fit_on_an_empty_loader_is_an_error() {
    let model = ModelBuilder::new(&[4, 3]).dense(2).build().unwrap();
    let mut t = Trainer::new(&model, cpu_config()).unwrap();
    let empty = TensorDataset::new(Tensor::zeros(&[0, 3]), vec![]).unwrap();
    let loader = DataLoader::builder(empty).batch_size(4).build().unwrap();
    let err = t.fit(&loader, None, 1).unwrap_err().to_string();
    assert!(err.contains("training loader has no batches"), "{err}");
    // Three samples with drop_last at batch 4: no batch either.
    let three = TensorDataset::new(Tensor::zeros(&[3, 3]), vec![0, 1, 0]).unwrap();
    let loader = DataLoader::builder(three).batch_size(4).drop_last(true).build().unwrap();
    let err = t.fit(&loader, None, 1).unwrap_err().to_string();
    assert!(err.contains("no batches") && err.contains("3 samples"), "{err}");
    let err = t.evaluate(&loader).unwrap_err().to_string();
    assert!(err.contains("evaluate") && err.contains("no batches"), "{err}");
}

fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend_from_slice(data);
    b
}

#[test]
fn an_idx_file_of_no_images_is_an_error_naming_it() {
    let dir = TempDir::new("harden-idx0");
    let images = dir.path().join("images-idx3-ubyte");
    let labels = dir.path().join("labels-idx1-ubyte");
    std::fs::write(&images, idx_bytes(&[0, 28, 28], &[])).unwrap();
    std::fs::write(&labels, idx_bytes(&[0], &[])).unwrap();
    match Mnist::from_files(&images, &labels) {
        Err(Error::Format { path, reason }) => {
            assert_eq!(path, images);
            assert!(reason.contains("no images"), "{reason}");
        }
        other => panic!("expected a format error, got {:?}", other.map(|m| kiln::data::Dataset::len(&m))),
    }
}

#[test]
fn cifar_from_no_files_is_an_error() {
    let err = Cifar10::from_files::<PathBuf>(&[]).unwrap_err().to_string();
    assert!(err.contains("Cifar10::from_files") && err.contains("no batch files"), "{err}");
}

#[test]
fn an_image_folder_whose_every_file_is_skipped_is_an_error_naming_it() {
    let dir = TempDir::new("harden-folder");
    for (class, file) in [("cat", "a.png"), ("dog", "b.jpg")] {
        std::fs::create_dir_all(dir.path().join(class)).unwrap();
        std::fs::write(dir.path().join(class).join(file), b"not an image").unwrap();
    }
    match ImageFolder::builder(dir.path()).on_error(OnError::Skip).build() {
        Err(Error::Format { path, reason }) => {
            assert_eq!(path, dir.path());
            assert!(reason.contains("every one of its 2 image files"), "{reason}");
        }
        Err(e) => panic!("expected a format error naming the folder, got {e}"),
        Ok(f) => panic!("expected an error, got a folder of {} files", f.files().len()),
    }
}

// Item 9: a gzip bomb (a few MB expanding to GiBs) is read only as far as the header declares.
#[test]
fn a_gzip_bomb_is_cut_off_at_the_declared_size() {
    let dir = TempDir::new("harden-bomb");
    let path = dir.path().join("bomb-idx3-ubyte.gz");
    // One gzip member of 1 MiB of zeros compresses to about 1 KiB; the file repeats it 1,024
    // times after a first member holding a header that declares 10 images (7,840 bytes): 1 GiB
    // of decompressed data in about 1 MiB of file.
    let member = |bytes: &[u8]| {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(bytes).unwrap();
        gz.finish().unwrap()
    };
    let mut file = member(&idx_bytes(&[10, 28, 28], &[]));
    let zeros = member(&vec![0u8; 1 << 20]);
    for _ in 0..1024 {
        file.extend_from_slice(&zeros);
    }
    std::fs::write(&path, &file).unwrap();
    let t = std::time::Instant::now();
    match kiln::data::read_idx(&path) {
        Err(Error::Format { path: p, reason }) => {
            assert_eq!(p, path);
            assert!(reason.contains("too long") && reason.contains("more than 7840"), "{reason}");
        }
        other => panic!("expected a format error, got {:?}", other.map(|a| a.dims)),
    }
    // Reading 7,841 bytes takes microseconds; the whole bomb took 10 s before.
    assert!(t.elapsed().as_secs() < 3, "took {:?}", t.elapsed());
    // A sound gzip file still reads.
    std::fs::write(&path, member(&idx_bytes(&[2, 2], &[1, 2, 3, 4]))).unwrap();
    assert_eq!(kiln::data::read_idx(&path).unwrap().data, [1, 2, 3, 4]);
}

// Item 8: temporaries of killed writers of one path do not pile up.
#[test]
fn save_checkpoint_sweeps_temporaries_of_dead_writers() {
    let dir = TempDir::new("harden-tmp");
    let path = dir.path().join("run.safetensors");
    // A process that has exited (and been waited for): its pid names no process now.
    let dead = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    let mut dead = dead;
    dead.wait().unwrap();
    let stale = dir.path().join(format!(".run.safetensors.tmp-{dead_pid}-0"));
    let stale2 = dir.path().join(format!(".run.safetensors.tmp-{dead_pid}-7"));
    // One of this (live) process: another thread's write in progress; and one of another file.
    let live = dir.path().join(format!(".run.safetensors.tmp-{}-99", std::process::id()));
    let other = dir.path().join(format!(".other.safetensors.tmp-{dead_pid}-0"));
    for p in [&stale, &stale2, &live, &other] {
        std::fs::write(p, b"partial").unwrap();
    }
    let model = ModelBuilder::new(&[4, 3]).dense(2).build().unwrap();
    let mut t = Trainer::new(&model, cpu_config()).unwrap();
    t.save_checkpoint(&path).unwrap();
    assert!(!stale.exists() && !stale2.exists(), "stale temporaries of a dead writer were left");
    assert!(live.exists(), "a live writer's temporary was removed");
    assert!(other.exists(), "another file's temporary was removed");
    assert!(Trainer::resume(&path).is_ok());
}

// Item 11: `fn main() -> kiln::Result<()>` prints `Error: {err:?}`: the readable message.
#[test]
fn errors_debug_print_as_their_message() {
    let err = ModelBuilder::new(&[1, 3, 8, 8]).conv2d(4, 9).build().unwrap_err();
    let shown = format!("{err:?}");
    assert_eq!(shown, err.to_string());
    assert!(shown.starts_with("layer 'conv2d"), "{shown}");
    let r: Result<()> = Err(err);
    assert!(!format!("{r:?}").contains("reason:"), "{r:?}");
}

// Item 1 (propagation): a NaN pixel reaches the output through ReLU, as in PyTorch, instead of
// becoming 0 there while NaN gradients reach the weights.
#[test]
fn a_nan_pixel_reaches_the_output_through_every_activation() {
    type Act = fn(ModelBuilder) -> ModelBuilder;
    let acts: [(&str, Act); 7] = [
        ("relu", |b| b.relu()),
        ("leaky_relu", |b| b.leaky_relu(0.01)),
        ("elu", |b| b.elu(1.0)),
        ("sigmoid", |b| b.sigmoid()),
        ("tanh", |b| b.tanh()),
        ("silu", |b| b.silu()),
        ("gelu", |b| b.gelu()),
    ];
    for (name, act) in acts {
        let model = act(ModelBuilder::new(&[2, 1, 5, 5]).conv2d(4, 3)).flatten().dense(3).seed(1).build().unwrap();
        let mut t = Trainer::new(&model, TrainerConfig { batch_size: 2, ..cpu_config() }).unwrap();
        let mut x = vec![0.25f32; 50];
        x[12] = f32::NAN; // the centre pixel of sample 0
        let y = t.predict(&Tensor::new(&[2, 1, 5, 5], x).unwrap()).unwrap();
        assert!(y.data()[..3].iter().all(|v| v.is_nan()), "{name}: sample 0 gave {:?}", &y.data()[..3]);
        assert!(y.data()[3..].iter().all(|v| v.is_finite()), "{name}: sample 1 gave {:?}", &y.data()[3..]);
    }
}

// Item 5: top-5 accuracy of a 3-class model is 100% by definition: not reported.
#[test]
fn top_k_of_at_least_the_class_count_is_not_reported() {
    let model = ModelBuilder::new(&[4, 3]).relu().build().unwrap();
    let x = Tensor::new(&[4, 3], vec![0.9, 0.5, 0.1, 0.1, 0.2, 0.9, 0.3, 0.8, 0.2, 0.1, 0.2, 0.3]).unwrap();
    let labels = [1u32, 0, 0, 0];
    for (k, want) in [(5, None), (3, None), (2, Some(0.5)), (1, Some(0.0))] {
        let mut t = Trainer::new(&model, TrainerConfig { top_k: k, ..cpu_config() }).unwrap();
        let m = t.evaluate_tensors(&x, &labels).unwrap();
        assert_eq!(m.top_k_accuracy, want, "top_k {k}");
        assert_eq!(m.accuracy, Some(0.0));
    }
}

// Item 6: a model too large for the machine is an error naming the layer and the bytes; a
// parameter count that overflows is an error, not a weight of 0 stored values.
#[test]
fn a_model_too_large_to_allocate_is_an_error_not_an_abort() {
    use kiln::model::Conv2d;
    // The dense weight: 1000 x (64 * 1022 * 1022) f32 values = 267,387,904,000 bytes.
    let err = ModelBuilder::new(&[1, 3, 1024, 1024]).conv2d(64, 3).flatten().dense(1000).build().unwrap_err();
    match &err {
        Error::Layer { layer, reason } => {
            assert_eq!(layer, "dense_1");
            assert!(reason.contains("267387904000 bytes"), "{reason}");
        }
        other => panic!("expected an error naming the layer, got {other}"),
    }
    // 2^31 x 2^33 overflows a 64-bit count (it wrapped to 0 values before).
    let err = ModelBuilder::new(&[1, 1 << 20, 1 << 11]).dense(1 << 23).build();
    assert!(err.is_err(), "a dense weight of 2^54 values built");
    let err = ModelBuilder::new(&[1, 1 << 24, 1 << 7]).conv2d_with(Conv2d::new(1 << 24, 1)).build();
    assert!(err.is_err(), "a conv weight of 2^48 values built");
}

// Item 7: one bound on size options, shared by the builder and the loader.
#[test]
fn the_builder_refuses_the_options_the_loader_refuses() {
    use kiln::model::{Conv2d, Pool2d};
    let conv = |c: Conv2d| ModelBuilder::new(&[1, 1, 8, 8]).conv2d_with(c).build();
    let huge = 1usize << 40;
    for (what, r) in [
        ("stride", conv(Conv2d::new(1, 3).stride(huge))),
        ("dilation", conv(Conv2d::new(1, 3).dilation(huge))),
        ("padding", conv(Conv2d::new(1, 3).padding(1usize << 62))),
        ("stride", conv(Conv2d::new(1, 3).stride_hw(1, usize::MAX))),
    ] {
        match r {
            Err(Error::Layer { reason, .. }) => {
                assert!(reason.contains(what) && reason.contains("16777216"), "{what}: {reason}")
            }
            other => panic!("{what}: expected a layer error, got {:?}", other.map(|m| m.output_shape())),
        }
    }
    let pool = ModelBuilder::new(&[1, 1, 8, 8]).avg_pool2d_with(Pool2d::new(1 << 32)).build();
    assert!(matches!(pool, Err(Error::Layer { ref reason, .. }) if reason.contains("pool kernel")), "{pool:?}");
}

// Item 9: a reshape target whose count overflows says so, not "(0 values)".
#[test]
fn a_reshape_whose_count_overflows_says_so() {
    let d = 1usize << 22;
    let err = ModelBuilder::new(&[1, 3, 4, 4]).reshape(&[d, d, d, d]).build().unwrap_err().to_string();
    assert!(err.contains("more than") && !err.contains("(0 values)"), "{err}");
}

// Item 9: `Device::Auto` without a GPU says so once per process, in one wording.
#[test]
fn the_cpu_fallback_notice_is_printed_once_per_process() {
    const CHILD: &str = "KILN_HARDEN_NOTICE_CHILD";
    if std::env::var_os(CHILD).is_some() {
        for _ in 0..2 {
            Device::Auto.open().unwrap();
        }
        let model = ModelBuilder::new(&[2, 3]).dense(2).build().unwrap();
        for _ in 0..2 {
            Trainer::new(&model, TrainerConfig { device: Device::Auto, ..Default::default() }).unwrap();
        }
        return;
    }
    let me = std::env::current_exe().unwrap();
    let out = std::process::Command::new(me)
        .args(["--exact", "the_cpu_fallback_notice_is_printed_once_per_process", "--nocapture"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let notices = stderr.lines().filter(|l| l.contains("no usable GPU")).count();
    let gpu = Device::Cuda(0).open().is_ok();
    assert_eq!(notices, if gpu { 0 } else { 1 }, "{stderr}");
    assert!(!stderr.contains("training on the CPU"), "a second wording: {stderr}");
}

// Item 1 (detection): the step checks its loss and gradient norm before the update.

fn nan_batch() -> (Tensor, Vec<u32>) {
    let mut x = vec![0.25f32; 50];
    x[12] = f32::NAN; // the centre pixel of sample 0
    (Tensor::new(&[2, 1, 5, 5], x).unwrap(), vec![0, 2])
}

fn good_batch(k: usize) -> (Tensor, Vec<u32>) {
    let x = (0..50).map(|i| ((i * 7 + k * 3) % 11) as f32 / 11.0).collect();
    (Tensor::new(&[2, 1, 5, 5], x).unwrap(), vec![(k % 3) as u32, ((k + 1) % 3) as u32])
}

fn issue_model() -> kiln::model::Model {
    ModelBuilder::new(&[2, 1, 5, 5]).conv2d(4, 3).relu().flatten().dense(3).seed(3).build().unwrap()
}

fn weights(t: &mut Trainer) -> Vec<Vec<f32>> {
    t.model().unwrap().param_values().to_vec()
}

fn trainer_with(non_finite: NonFinite) -> Trainer {
    let config = TrainerConfig { batch_size: 2, non_finite, ..cpu_config() };
    Trainer::new(&issue_model(), config).unwrap()
}

#[test]
fn a_nan_pixel_is_an_error_naming_the_step_and_changes_no_weight_or_state() {
    // The reference trains on the good batches only.
    let mut reference = trainer_with(NonFinite::Error);
    let mut t = trainer_with(NonFinite::Error);
    for k in 0..2 {
        let (x, y) = good_batch(k);
        reference.train_batch(&x, &y).unwrap();
        t.train_batch(&x, &y).unwrap();
    }
    let before = weights(&mut t);
    let (x, y) = nan_batch();
    match t.train_batch(&x, &y) {
        Err(Error::NonFinite { step, what }) => {
            assert_eq!(step, 3);
            assert!(what.contains("loss (NaN)"), "{what}");
        }
        other => panic!("expected Error::NonFinite, got {other:?}"),
    }
    assert_eq!(weights(&mut t), before, "the bad step changed the weights");
    // Optimizer state (Adam's moments and step count) untouched too: the next good step gives
    // the reference's weights bit for bit.
    let (x, y) = good_batch(2);
    reference.train_batch(&x, &y).unwrap();
    t.train_batch(&x, &y).unwrap();
    assert_eq!(weights(&mut t), weights(&mut reference));
}

#[test]
fn skip_mode_counts_the_step_and_goes_on() {
    let mut reference = trainer_with(NonFinite::Skip);
    let mut t = trainer_with(NonFinite::Skip);
    let (gx, gy) = good_batch(0);
    reference.train_batch(&gx, &gy).unwrap();
    t.train_batch(&gx, &gy).unwrap();
    let (x, y) = nan_batch();
    assert!(t.train_batch(&x, &y).unwrap().loss.is_nan());
    assert_eq!(t.skipped_steps().unwrap(), 1);
    let (gx, gy) = good_batch(1);
    reference.train_batch(&gx, &gy).unwrap();
    t.train_batch(&gx, &gy).unwrap();
    assert_eq!(weights(&mut t), weights(&mut reference));
    assert_eq!(reference.skipped_steps().unwrap(), 0);
}

#[test]
fn ignore_mode_does_what_kiln_did_before() {
    let mut t = trainer_with(NonFinite::Ignore);
    let (x, y) = nan_batch();
    assert!(t.train_batch(&x, &y).unwrap().loss.is_nan());
    assert!(weights(&mut t).iter().flatten().any(|w| w.is_nan()));
}

#[test]
fn a_diverging_sgd_is_an_error_not_ok_nan() {
    // The tutorial's simple CNN at learning rate 1e30: the second step's activations overflow.
    let model = kiln::zoo::simple_cnn(8).seed(4).build().unwrap();
    let (x, y) = kiln::data::synthetic::tutorial_images(8, 3, 32, 32, 10, &mut kiln::rng::Rng::new(4));
    let config = TrainerConfig { batch_size: 8, learning_rate: 1e30, optimizer: Optimizer::sgd(0.0), ..cpu_config() };
    let mut t = Trainer::new(&model, config).unwrap();
    let mut outcome = None;
    for k in 0..4 {
        match t.train_batch(&x, &y[..]) {
            Ok(r) => assert!(r.loss.is_finite(), "step {} returned Ok({})", k + 1, r.loss),
            Err(e) => {
                outcome = Some(e);
                break;
            }
        }
    }
    match outcome {
        Some(Error::NonFinite { what, .. }) => assert!(what.contains("loss") || what.contains("gradient norm")),
        other => panic!("expected Error::NonFinite, got {other:?}"),
    }
    assert!(weights(&mut t).iter().flatten().all(|w| w.is_finite()), "a non-finite weight was kept");
}

#[test]
fn fit_reports_a_non_finite_step_at_the_end_of_its_epoch() {
    let mut data = Vec::new();
    for k in 0..4 {
        data.extend_from_slice(good_batch(k).0.data());
    }
    data[50 + 12] = f32::NAN; // sample 2: in the second batch
    let ds = TensorDataset::new(Tensor::new(&[8, 1, 5, 5], data).unwrap(), vec![0, 1, 2, 0, 1, 2, 0, 1]).unwrap();
    let loader = DataLoader::builder(ds).batch_size(2).build().unwrap();
    let mut t = trainer_with(NonFinite::Error);
    match t.fit(&loader, None, 2) {
        Err(Error::NonFinite { step, .. }) => assert_eq!(step, 2),
        other => panic!("expected Error::NonFinite, got {:?}", other.map(|h| h.epochs.len())),
    }
    assert!(weights(&mut t).iter().flatten().all(|w| w.is_finite()));
}

// Item 2: binary cross-entropy on values outside [0, 1] names the sample and suggests the
// with-logits loss (PyTorch raises; kiln clamped the log and returned a finite loss).
#[test]
fn bce_on_values_outside_zero_one_names_the_sample() {
    let mut model = ModelBuilder::new(&[3, 2]).dense(1).build().unwrap();
    model.set_param("dense_1.weight", &[1.0, 0.0]).unwrap();
    model.set_param("dense_1.bias", &[0.5]).unwrap();
    let config =
        TrainerConfig { batch_size: 3, loss: Loss::BinaryCrossEntropy, optimizer: Optimizer::sgd(0.0), ..cpu_config() };
    let mut t = Trainer::new(&model, config).unwrap();
    // The dense layer's outputs 0.5, 3.5 and 0.3: sample 1's is not a probability.
    let x = Tensor::new(&[3, 2], vec![0.0, 0.0, 3.0, 0.0, -0.2, 0.0]).unwrap();
    let y = [0u32, 1, 0];
    let before = weights(&mut t);
    match t.train_batch(&x, &y[..]) {
        Err(Error::NonFinite { what, .. }) => {
            assert!(what.contains("sample 1") && what.contains("BinaryCrossEntropyWithLogits"), "{what}")
        }
        other => panic!("expected an error naming sample 1, got {other:?}"),
    }
    assert_eq!(weights(&mut t), before);
}
