//! Data parallelism on the GPU through NCCL. Without a GPU or NCCL the GPU tests report
//! themselves ignored, with the reason; with `KILN_REQUIRE_GPU=1` a missing GPU or NCCL fails
//! them instead.
//!
//! On one GPU: the NCCL communicator of a group of one (host collectives), all-reduces inside a
//! captured CUDA graph (NCCL's stream forked from and joined to the captured one), and a
//! data-parallel trainer of one rank (bucketed all-reduces, synchronised batch norm) against a
//! plain one. On two or more GPUs (`two_gpus_train_as_one`): two processes, one per GPU,
//! started by the launcher, against one GPU on whole batches.

use std::path::Path;
use std::time::Duration;

use kiln::backend::{Backend, BufId, CudaBackend, GradOut, Op, ops};
use kiln::data::synthetic::tutorial_images;
use kiln::data::{DataLoader, TensorDataset};
use kiln::dist::{Communicator, DataParallel, DistEnv, Launch, TcpCommunicator};
use kiln::model::{Model, ModelBuilder};
use kiln::rng::Rng;
use kiln::train::{Device, Optimizer, Trainer, TrainerConfig};

mod cuda_common;
use cuda_common::cuda;

fn require() -> bool {
    std::env::var("KILN_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// Why NCCL cannot be used here (`None` when it can, or when `KILN_REQUIRE_GPU=1` asks for it).
fn nccl_missing() -> Option<String> {
    if let Some(why) = cuda_common::gpu_missing() {
        return Some(format!("no usable GPU: {why}"));
    }
    match kiln::backend::cuda::nccl_version() {
        Err(e) if !require() => Some(format!("NCCL unusable: {e}")),
        _ => None,
    }
}

/// GPU 0, after checking that NCCL loads (a missing NCCL fails the test).
fn gpu_and_nccl() -> CudaBackend {
    let gpu = cuda();
    match kiln::backend::cuda::nccl_version() {
        Ok((path, v)) => println!("NCCL {v:?} at {path}"),
        Err(e) => panic!("NCCL is unusable: {e}"),
    }
    gpu
}

fn single() -> Box<TcpCommunicator> {
    Box::new(TcpCommunicator::connect(&DistEnv::single(), Duration::from_secs(60)).unwrap())
}

fn nccl_communicator_of_one_rank() {
    let gpu = gpu_and_nccl();
    drop(gpu);
    let mut c = kiln::backend::cuda::NcclCommunicator::new(0, &mut *single()).unwrap();
    assert_eq!((c.rank(), c.world()), (0, 1));
    assert!(c.describe().starts_with("nccl"), "{}", c.describe());
    let mut v: Vec<f32> = (0..100_000).map(|i| i as f32 * 0.5).collect();
    let orig = v.clone();
    c.all_reduce_sum(&mut v).unwrap();
    assert_eq!(v, orig);
    c.all_reduce_mean(&mut v).unwrap();
    assert_eq!(v, orig);
    let mut d = vec![1.5f64, -2.25];
    c.all_reduce_sum_f64(&mut d).unwrap();
    assert_eq!(d, [1.5, -2.25]);
    c.broadcast(&mut v, 0).unwrap();
    assert_eq!(v, orig);
    assert!(c.broadcast(&mut v, 1).is_err());
    c.barrier().unwrap();
}

fn all_reduce_runs_inside_a_captured_graph() {
    let mut gpu = gpu_and_nccl();
    gpu.set_communicator(single()).unwrap();
    assert!(gpu.describe().contains("nccl"), "{}", gpu.describe());
    let n = 1 << 20;
    let (a, b, c) = (
        gpu.alloc(n, kiln::backend::DType::F32).unwrap(),
        gpu.alloc(n, kiln::backend::DType::F32).unwrap(),
        gpu.alloc(7, kiln::backend::DType::F32).unwrap(),
    );
    // Fill a, reduce it (a group of one: unchanged), then read it into b: the read must wait
    // for the reduction on NCCL's stream. c is reduced last and only joined at the list's end.
    let ops = vec![
        Op::Fill(ops::Fill { len: n, buf: a, value: 2.0 }),
        Op::AllReduce(ops::AllReduce { bufs: vec![(a, n)], mean: true }),
        Op::Fill(ops::Fill { len: 7, buf: c, value: 3.0 }),
        Op::GradInto(ops::GradInto { len: n, src: a, dst: GradOut { buf: b, accumulate: true } }),
        Op::AllReduce(ops::AllReduce { bufs: vec![(c, 7)], mean: false }),
    ];
    // Warm-up (eager), capture, then replays.
    for step in 1..=4 {
        gpu.run_cached(1, &ops).unwrap();
        let got = gpu.read(b).unwrap();
        assert!(got.iter().all(|&x| x == 2.0 * step as f32), "step {step}: {}", got[0]);
        assert_eq!(gpu.read(c).unwrap(), vec![3.0; 7]);
    }
    // A second group is refused; a backend with no group refuses collectives.
    assert!(gpu.set_communicator(single()).is_err());
    let mut other = cuda();
    let x = other.alloc(4, kiln::backend::DType::F32).unwrap();
    assert!(other.run(&[Op::AllReduce(ops::AllReduce { bufs: vec![(x, 4)], mean: true })]).is_err());
}

fn model() -> Model {
    ModelBuilder::new(&[16, 3, 16, 16])
        .conv2d(8, 3)
        .batch_norm()
        .relu()
        .max_pool2d(2)
        .conv2d(16, 3)
        .batch_norm()
        .relu()
        .global_avg_pool()
        .dense(10)
        .seed(3)
        .build()
        .unwrap()
}

fn config(batch: usize, dp: bool) -> TrainerConfig {
    TrainerConfig {
        batch_size: batch,
        learning_rate: 0.05,
        optimizer: Optimizer::sgd(0.9),
        device: Device::Cuda(0),
        seed: 5,
        data_parallel: dp.then(|| DataParallel {
            sync_batch_norm: true,
            // Small buckets, so the step holds several all-reduces between backward ops.
            bucket_bytes: 4096,
            first_bucket_bytes: 1024,
            timeout_s: 120.0,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn loader(batch: usize, rank: usize, world: usize) -> DataLoader {
    let (x, y) = tutorial_images(320, 3, 16, 16, 10, &mut Rng::new(11));
    DataLoader::builder(TensorDataset::new(x, y).unwrap())
        .batch_size(batch)
        .shuffle(true)
        .seed(9)
        .shard(rank, world)
        .build()
        .unwrap()
}

type Params = Vec<(String, Vec<f32>)>;

fn params(t: &mut Trainer) -> Params {
    let m = t.model().unwrap();
    m.params().iter().zip(m.param_values()).map(|(s, v)| (s.name.clone(), v.to_vec())).collect()
}

fn max_rel_diff(a: &Params, b: &Params) -> f64 {
    a.iter()
        .zip(b)
        .map(|((_, va), (_, vb))| {
            let scale = va.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-6);
            va.iter().zip(vb).fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs())) / scale
        })
        .fold(0.0, f64::max)
}

/// One GPU, batch 16, 20 steps (CUDA graphs): the reference for the data-parallel runs.
fn alone() -> Params {
    let gpu = cuda();
    let mut t = Trainer::with_backend(&model(), config(16, false), Box::new(gpu)).unwrap();
    t.fit(&loader(16, 0, 1), None, 1).unwrap();
    params(&mut t)
}

fn a_data_parallel_trainer_of_one_rank_trains_as_a_plain_one() {
    let gpu = gpu_and_nccl();
    let mut t = Trainer::with_communicator(&model(), config(16, true), Box::new(gpu), single()).unwrap();
    t.fit(&loader(16, 0, 1), None, 1).unwrap();
    let dp = params(&mut t);
    let reference = alone();
    let d = max_rel_diff(&reference, &dp);
    println!("GPU, group of one (NCCL, sync batch norm, small buckets) vs plain: max relative difference {d:.2e}");
    // The f32 GPU tolerance of DESIGN.md (the two backends may time different cuDNN algorithms).
    assert!(d < 1e-4, "{d}");
}

const ROLE: &str = "KILN_TEST_CUDA_DP_OUT";

/// Two processes, one per GPU, batch 8 each, against one GPU on batch 16. Needs 2 GPUs
/// (nvidia-h200-x2); ignored with fewer.
fn two_gpus_train_as_one() {
    if let Ok(out) = std::env::var(ROLE) {
        // A worker: its GPU is LOCAL_RANK's.
        let mut t = Trainer::new(&model(), config(8, true)).unwrap();
        t.fit(&loader(8, t.rank(), t.world_size()), None, 1).unwrap();
        let json = serde_json::to_string(&params(&mut t)).unwrap();
        std::fs::write(Path::new(&out).join(format!("rank{}.json", t.rank())), json).unwrap();
        std::process::exit(0);
    }
    drop(gpu_and_nccl());
    let dir = std::env::temp_dir().join(format!("kiln-cuda-dp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let report = Launch::new(2, std::env::current_exe().unwrap())
        .args(["--exact", "two_gpus_train_as_one", "--nocapture", "--test-threads", "1", "-q"])
        .env(ROLE, &dir)
        .run()
        .unwrap();
    report.into_result().unwrap();
    let read = |r: usize| -> Params {
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("rank{r}.json"))).unwrap()).unwrap()
    };
    let (r0, r1) = (read(0), read(1));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(r0, r1, "both GPUs hold the same weights");
    let reference = alone();
    let d = max_rel_diff(&reference, &r0);
    println!("2 GPUs x batch 8 (NCCL, sync batch norm) vs 1 GPU x batch 16, 20 steps: max relative difference {d:.2e}");
    assert!(d < 1e-4, "{d}");
}

fn op_lists_name_their_buffers() {
    // The all-reduce op reports its buffers (the planner and the CUDA backend's joins rely on it).
    let mut op = Op::AllReduce(ops::AllReduce { bufs: vec![(BufId(3), 10), (BufId(5), 2)], mean: true });
    let mut seen = Vec::new();
    op.visit_bufs(&mut |b| seen.push(b.0));
    assert_eq!(seen, [3, 5]);
    assert_eq!(op.name(), "all_reduce");
}

/// Why `two_gpus_train_as_one` cannot run here: no NCCL or fewer than 2 GPUs (a worker process it
/// started always runs).
fn two_gpus_missing() -> Option<String> {
    if std::env::var(ROLE).is_ok() {
        return None;
    }
    nccl_missing().or_else(|| CudaBackend::new(1).err().map(|e| format!("fewer than 2 GPUs: {e}")))
}

fn main() {
    use cuda_common::{gpu_trial_when, plain_trial};
    let trials = vec![
        gpu_trial_when("nccl_communicator_of_one_rank", nccl_missing, nccl_communicator_of_one_rank),
        gpu_trial_when(
            "all_reduce_runs_inside_a_captured_graph",
            nccl_missing,
            all_reduce_runs_inside_a_captured_graph,
        ),
        gpu_trial_when(
            "a_data_parallel_trainer_of_one_rank_trains_as_a_plain_one",
            nccl_missing,
            a_data_parallel_trainer_of_one_rank_trains_as_a_plain_one,
        ),
        gpu_trial_when("two_gpus_train_as_one", two_gpus_missing, two_gpus_train_as_one),
        plain_trial("op_lists_name_their_buffers", op_lists_name_their_buffers),
    ];
    cuda_common::run_trials(trials)
}
