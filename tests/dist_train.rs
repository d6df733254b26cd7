//! Data-parallel training on the CPU backend, two ranks as two threads over the TCP
//! communicator: after an epoch of 20 steps through `fit` (each rank on its shard of every
//! batch), the weights equal those of one process training on the whole batches, within 1e-5
//! relative, which shows both the gradient averaging and that the sharded loaders together visit
//! exactly the batches of the lone run. Batch norm needs synchronised statistics for that; with
//! per-rank statistics (the default) the runs differ, as in PyTorch. (`tests/dist_launch.rs`
//! does the same with two processes started by the launcher.)

mod common;
use common::free_port;

use std::time::Duration;

use kiln::backend::cpu::CpuBackend;
use kiln::data::synthetic::tutorial_images;
use kiln::data::{DataLoader, TensorDataset};
use kiln::dist::{DataParallel, DistEnv, TcpCommunicator};
use kiln::model::{Model, ModelBuilder};
use kiln::rng::Rng;
use kiln::train::{Device, GradClip, History, Optimizer, Trainer, TrainerConfig};

/// 320 images of the tutorial's task, 1 x 8 x 8, 10 classes.
fn dataset() -> TensorDataset {
    let (x, y) = tutorial_images(320, 1, 8, 8, 10, &mut Rng::new(11));
    TensorDataset::new(x, y).unwrap()
}

fn cnn(batch_norm: bool) -> Model {
    let b = ModelBuilder::new(&[16, 1, 8, 8]).conv2d(6, 3);
    let b = if batch_norm { b.batch_norm() } else { b };
    b.relu().max_pool2d(2).flatten().dense(10).seed(3).build().unwrap()
}

fn config(batch: usize) -> TrainerConfig {
    TrainerConfig {
        batch_size: batch,
        learning_rate: 0.05,
        optimizer: Optimizer::sgd(0.9),
        device: Device::Cpu,
        threads: Some(1),
        seed: 5,
        ..Default::default()
    }
}

fn loader(batch: usize, rank: usize, world: usize) -> DataLoader {
    DataLoader::builder(dataset()).batch_size(batch).shuffle(true).seed(9).shard(rank, world).build().unwrap()
}

/// Every parameter (running statistics too), by name.
type Params = Vec<(String, Vec<f32>)>;

fn params(t: &mut Trainer) -> Params {
    let m = t.model().unwrap();
    m.params().iter().zip(m.param_values()).map(|(s, v)| (s.name.clone(), v.to_vec())).collect()
}

/// The largest per-tensor difference relative to the tensor's largest magnitude.
fn max_rel_diff(a: &Params, b: &Params) -> f64 {
    a.iter()
        .zip(b)
        .map(|((na, va), (nb, vb))| {
            assert_eq!(na, nb);
            let scale = va.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-6);
            va.iter().zip(vb).fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs())) / scale
        })
        .fold(0.0, f64::max)
}

/// Trains `model` with `config` on the whole batches of one epoch.
fn alone(model: &Model, config: TrainerConfig, batch: usize) -> (Params, History) {
    let mut t = Trainer::new(model, config).unwrap();
    let h = t.fit(&loader(batch, 0, 1), None, 1).unwrap();
    (params(&mut t), h)
}

/// Trains `model` with `config` (per-rank batch) as `world` thread ranks over TCP, each on its
/// shard; returns each rank's parameters and history.
fn together(model: &Model, config: TrainerConfig, world: usize) -> Vec<(Params, History)> {
    let port = free_port();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..world)
            .map(|rank| {
                let config = config.clone();
                s.spawn(move || {
                    let env = DistEnv {
                        rank,
                        world_size: world,
                        local_rank: rank,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                    };
                    let comm = TcpCommunicator::connect(&env, Duration::from_secs(60)).unwrap();
                    let backend = Box::new(CpuBackend::<f32>::new(Some(1)).unwrap());
                    let batch = config.batch_size;
                    let mut t = Trainer::with_communicator(model, config, backend, Box::new(comm)).unwrap();
                    assert_eq!((t.rank(), t.world_size()), (rank, world));
                    let h = t.fit(&loader(batch, rank, world), None, 1).unwrap();
                    (params(&mut t), h)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn dp(sync_batch_norm: bool) -> Option<DataParallel> {
    Some(DataParallel { sync_batch_norm, ..Default::default() })
}

#[test]
fn two_ranks_on_half_batches_train_as_one_process_on_whole_batches() {
    let model = cnn(false);
    let (reference, h1) = alone(&model, config(16), 16);
    assert_eq!(h1.epochs[0].train.samples, 320);
    let ranks = together(&model, TrainerConfig { data_parallel: dp(false), ..config(8) }, 2);
    // The ranks hold the same bits: every update is the same averaged gradient.
    assert_eq!(ranks[0].0, ranks[1].0);
    let d = max_rel_diff(&reference, &ranks[0].0);
    println!("2 ranks x batch 8 vs 1 process x batch 16, 20 SGD steps: max relative difference {d:.2e}");
    assert!(d < 1e-5, "{d}");
    // The epoch's metrics are summed over the ranks: every sample once.
    let (m1, m2) = (h1.epochs[0].train, ranks[0].1.epochs[0].train);
    assert_eq!(m2.samples, 320);
    assert!((m1.loss - m2.loss).abs() <= 1e-5 * m1.loss, "{} vs {}", m1.loss, m2.loss);
    assert_eq!(m1.accuracy, m2.accuracy);
    // And training moved the weights (the comparison is not between two untrained models).
    let untrained: Params =
        model.params().iter().zip(model.param_values()).map(|(s, v)| (s.name.clone(), v.to_vec())).collect();
    assert!(max_rel_diff(&reference, &untrained) > 1e-2);
}

#[test]
fn synchronised_batch_norm_matches_the_lone_run_and_per_rank_statistics_do_not() {
    let model = cnn(true);
    let (reference, _) = alone(&model, config(16), 16);
    let synced = together(&model, TrainerConfig { data_parallel: dp(true), ..config(8) }, 2);
    assert_eq!(synced[0].0, synced[1].0);
    let d = max_rel_diff(&reference, &synced[0].0);
    println!("sync batch norm, 2 ranks vs 1 process: max relative difference {d:.2e} (running stats included)");
    assert!(d < 1e-5, "{d}");
    // Per-rank statistics (the default): each rank normalises its 8 samples by their own mean
    // and variance, which is a different model update.
    let local = together(&model, TrainerConfig { data_parallel: dp(false), ..config(8) }, 2);
    let d = max_rel_diff(&reference, &local[0].0);
    println!("per-rank batch norm, 2 ranks vs 1 process: max relative difference {d:.2e}");
    assert!(d > 1e-4, "{d}");
}

#[test]
fn accumulation_and_clipping_see_the_averaged_gradient() {
    // 1 process: batch 16, clip the global norm. 2 ranks: 2 micro-batches of 4 each per update.
    let model = cnn(false);
    let base = TrainerConfig { grad_clip: Some(GradClip::Norm(0.5)), ..config(16) };
    let (reference, _) = alone(&model, base.clone(), 16);
    let ranks =
        together(&model, TrainerConfig { batch_size: 4, grad_accumulation: 2, data_parallel: dp(false), ..base }, 2);
    let d = max_rel_diff(&reference, &ranks[0].0);
    println!("accumulation 2 x 4 on 2 ranks vs batch 16, clipped: max relative difference {d:.2e}");
    assert!(d < 1e-5, "{d}");
}

#[test]
fn four_ranks_train_as_one() {
    let model = cnn(true);
    let (reference, _) = alone(&model, config(16), 16);
    let ranks = together(&model, TrainerConfig { data_parallel: dp(true), ..config(4) }, 4);
    let d = max_rel_diff(&reference, &ranks[0].0);
    println!("4 ranks x batch 4 (sync batch norm) vs 1 process x batch 16: max relative difference {d:.2e}");
    assert!(d < 1e-5, "{d}");
    assert!(ranks.iter().all(|r| r.0 == ranks[0].0));
}

#[test]
fn a_group_of_one_is_exactly_a_lone_run() {
    let model = cnn(true);
    let (reference, _) = alone(&model, config(16), 16);
    let comm = TcpCommunicator::connect(&DistEnv::single(), Duration::from_secs(1)).unwrap();
    let backend = Box::new(CpuBackend::<f32>::new(Some(1)).unwrap());
    let mut t = Trainer::with_communicator(
        &model,
        TrainerConfig { data_parallel: dp(true), ..config(16) },
        backend,
        Box::new(comm),
    )
    .unwrap();
    t.fit(&loader(16, 0, 1), None, 1).unwrap();
    assert_eq!(params(&mut t), reference, "bit for bit");
}

#[test]
fn fit_refuses_loaders_that_would_skip_samples_or_hang() {
    let model = cnn(false);
    let cfg = TrainerConfig { data_parallel: dp(false), ..config(8) };
    let port = free_port();
    let errs: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|rank| {
                let (model, cfg) = (&model, cfg.clone());
                s.spawn(move || {
                    let env = DistEnv {
                        rank,
                        world_size: 2,
                        local_rank: rank,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                    };
                    let comm = TcpCommunicator::connect(&env, Duration::from_secs(30)).unwrap();
                    let backend = Box::new(CpuBackend::<f32>::new(Some(1)).unwrap());
                    let mut t = Trainer::with_communicator(model, cfg, backend, Box::new(comm)).unwrap();
                    // Not sharded: every rank would train on every sample.
                    let unsharded = t.fit(&loader(8, 0, 1), None, 1).unwrap_err().to_string();
                    // Sharded, but rank 1 gets 2 batches more than rank 0 (a different dataset
                    // size stands in for any uneven split).
                    let n = if rank == 0 { 40 } else { 56 };
                    let (x, y) = tutorial_images(n, 1, 8, 8, 10, &mut Rng::new(1));
                    let uneven = DataLoader::builder(TensorDataset::new(x, y).unwrap())
                        .batch_size(4)
                        .shard(rank, 2)
                        .build()
                        .unwrap();
                    let uneven = t.fit(&uneven, None, 1).unwrap_err().to_string();
                    format!("{unsharded} | {uneven}")
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in &errs {
        assert!(e.contains("shard 0 of 1") || e.contains("trains on shard"), "{e}");
        assert!(e.contains("different numbers of batches per epoch"), "{e}");
    }
}

#[test]
fn lbfgs_and_bad_options_are_config_errors() {
    let model = cnn(false);
    let bad = |c: TrainerConfig| Trainer::new(&model, c).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        bad(TrainerConfig { optimizer: Optimizer::lbfgs(), data_parallel: dp(false), ..config(8) })
            .contains("data_parallel")
    );
    let timeout = DataParallel { timeout_s: -1.0, ..Default::default() };
    assert!(bad(TrainerConfig { data_parallel: Some(timeout), ..config(8) }).contains("timeout_s"));
}
