//! Data parallelism across processes: the launcher starts this test binary again as its
//! workers (the worker role comes through the environment), which train through
//! `Trainer::new` with `data_parallel`, finding their group from RANK, WORLD_SIZE, MASTER_ADDR
//! and MASTER_PORT exactly as a user's program under `kiln launch` or `torchrun` would. Two
//! processes on half batches end with the weights of one process on whole batches; a worker
//! that dies makes the other stop with an error naming it; the `kiln` command propagates a
//! failure and kills the rest.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::TempDir;
use kiln::data::synthetic::tutorial_images;
use kiln::data::{DataLoader, TensorDataset};
use kiln::dist::{DataParallel, Launch};
use kiln::model::{Model, ModelBuilder};
use kiln::rng::Rng;
use kiln::train::{Device, Optimizer, Trainer, TrainerConfig};
use libtest_mimic::{Arguments, Completion, Trial};

/// Set in the workers' environment: what the worker does.
const ROLE: &str = "KILN_TEST_DP_ROLE";
/// Set in the workers' environment: the folder they write their results to.
const OUT: &str = "KILN_TEST_DP_OUT";

type Params = Vec<(String, Vec<f32>)>;

fn model() -> Model {
    ModelBuilder::new(&[16, 1, 8, 8]).conv2d(6, 3).batch_norm().relu().max_pool2d(2).dense(10).seed(3).build().unwrap()
}

fn config(batch: usize, data_parallel: bool) -> TrainerConfig {
    TrainerConfig {
        batch_size: batch,
        learning_rate: 0.05,
        optimizer: Optimizer::sgd(0.9),
        device: Device::Cpu,
        threads: Some(1),
        seed: 5,
        data_parallel: data_parallel.then(|| DataParallel {
            sync_batch_norm: true,
            timeout_s: 60.0,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn loader(batch: usize, rank: usize, world: usize) -> DataLoader {
    let (x, y) = tutorial_images(320, 1, 8, 8, 10, &mut Rng::new(11));
    let ds = TensorDataset::new(x, y).unwrap();
    DataLoader::builder(ds).batch_size(batch).shuffle(true).seed(9).shard(rank, world).build().unwrap()
}

fn params(t: &mut Trainer) -> Params {
    let m = t.model().unwrap();
    m.params().iter().zip(m.param_values()).map(|(s, v)| (s.name.clone(), v.to_vec())).collect()
}

/// What a worker process does; returns the process's exit code.
fn worker(role: &str, out: &Path) -> i32 {
    let rank: usize = std::env::var("RANK").unwrap().parse().unwrap();
    let mut t = Trainer::new(&model(), config(8, true)).unwrap();
    assert_eq!((t.rank(), t.world_size()), (rank, 2));
    let data = loader(8, t.rank(), t.world_size());
    match role {
        "train" => {
            t.fit(&data, None, 1).unwrap();
            let json = serde_json::to_string(&params(&mut t)).unwrap();
            std::fs::write(out.join(format!("rank{rank}.json")), json).unwrap();
            0
        }
        "die" => {
            for (i, b) in data.epoch(0).enumerate() {
                let b = b.unwrap();
                if rank == 1 && i == 3 {
                    // A crash in the middle of training: no goodbye, sockets closed by the OS.
                    std::process::exit(3);
                }
                if let Err(e) = t.train_batch(&b.inputs, &b.labels) {
                    std::fs::write(out.join(format!("rank{rank}.err")), e.to_string()).unwrap();
                    // The kernel closes a dying process's sockets before its parent hears of
                    // the exit (the process's other threads must end first), so this rank saw
                    // the closed connection and could exit before the launcher was told of
                    // rank 1's exit: 4 runs in 10 reported rank 0 as the first failure on a
                    // loaded machine. The pause keeps the exits in their causal order for the
                    // launcher's first-failure check.
                    std::thread::sleep(Duration::from_secs(1));
                    return 1;
                }
            }
            0
        }
        other => panic!("unknown role {other}"),
    }
}

/// Runs `test` as a 2-worker job of this test binary in role `role`; `None` when this process
/// is itself a worker (it then exits with the worker's code).
fn launch(test: &str, role: &str, out: &Path, grace: Duration) -> Option<kiln::dist::LaunchReport> {
    if let Ok(role) = std::env::var(ROLE) {
        let out = std::env::var(OUT).unwrap();
        std::process::exit(worker(&role, Path::new(&out)));
    }
    let mut l = Launch::new(2, std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads", "1", "-q"])
        .env(ROLE, role)
        .env(OUT, out);
    l.grace = grace;
    // A port outside the system's ephemeral range (see common::free_port), not the launcher's
    // port-0 pick, which other tests' sockets could take before rank 0 listens.
    l.master_port = Some(common::free_port());
    Some(l.run().unwrap())
}

fn two_processes_train_as_one() {
    let dir = TempDir::new("dp-train");
    let Some(report) = launch("two_processes_train_as_one", "train", dir.path(), Duration::from_secs(10)) else {
        return;
    };
    report.into_result().unwrap();
    let read = |r: usize| -> Params {
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(format!("rank{r}.json"))).unwrap()).unwrap()
    };
    let (r0, r1) = (read(0), read(1));
    assert_eq!(r0, r1, "both processes hold the same weights");
    let mut alone = Trainer::new(&model(), config(16, false)).unwrap();
    alone.fit(&loader(16, 0, 1), None, 1).unwrap();
    let reference = params(&mut alone);
    let mut worst = 0f64;
    for ((name, a), (_, b)) in reference.iter().zip(&r0) {
        let scale = a.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-6);
        let d = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs())) / scale;
        assert!(d < 1e-5, "{name}: relative difference {d}");
        worst = worst.max(d);
    }
    println!("2 processes x batch 8 vs 1 x batch 16, sync batch norm, 20 steps: max relative difference {worst:.2e}");
}

fn a_worker_that_dies_makes_the_other_stop_with_an_error_naming_it() {
    let dir = TempDir::new("dp-die");
    let start = Instant::now();
    let grace = Duration::from_secs(60);
    let Some(report) =
        launch("a_worker_that_dies_makes_the_other_stop_with_an_error_naming_it", "die", dir.path(), grace)
    else {
        return;
    };
    // Rank 0 stopped on its own, long before the launcher would have killed it.
    assert!(start.elapsed() < Duration::from_secs(30), "{:?}", start.elapsed());
    assert!(report.killed.is_empty(), "{report:?}");
    assert_eq!(report.statuses[1].code(), Some(3));
    assert_eq!(report.statuses[0].code(), Some(1));
    // The launcher saw the exits in the order they happened: rank 1 first.
    assert_eq!(report.first_failure.map(|f| f.0), Some(1), "{report:?}");
    assert_eq!(report.code(), 3);
    let err = std::fs::read_to_string(dir.path().join("rank0.err")).unwrap();
    assert!(err.contains("rank 0 of 2") && err.contains("rank 1 closed its connection"), "{err}");
}

/// A test of the `kiln` binary: reported ignored where the binary is not (a test binary copied
/// to another machine has no `kiln`), run with its path otherwise.
fn kiln_trial(name: &str, test: fn(&str)) -> Trial {
    Trial::ignorable_test(name, move || {
        let exe = env!("CARGO_BIN_EXE_kiln");
        if !Path::new(exe).exists() {
            return Ok(Completion::ignored_with(format!("{exe} is not on this machine")));
        }
        test(exe);
        Ok(Completion::Completed)
    })
}

#[cfg(unix)]
fn kiln_launch_sets_the_environment_of_every_worker(exe: &str) {
    let out = std::process::Command::new(exe)
        .args(["launch", "--nproc", "3", "--master-port", "29999", "--"])
        .args([
            "sh",
            "-c",
            r#"echo "$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT $NCCL_NVLS_ENABLE""#,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut lines: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(String::from).collect();
    lines.sort();
    assert_eq!(
        lines,
        ["0 3 0 3 127.0.0.1 29999 0", "1 3 1 3 127.0.0.1 29999 0", "2 3 2 3 127.0.0.1 29999 0"],
        "one line per worker"
    );
    // Several machines: this one's ranks are offset by its index.
    let out = std::process::Command::new(exe)
        .args(["launch", "--nnodes", "2", "--node-rank", "1", "--nproc", "2", "--master-addr", "10.1.2.3"])
        .args(["--", "sh", "-c", r#"echo "$RANK $WORLD_SIZE $LOCAL_RANK $MASTER_ADDR $MASTER_PORT""#])
        .output()
        .unwrap();
    let mut lines: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(String::from).collect();
    lines.sort();
    assert_eq!(lines, ["2 4 0 10.1.2.3 29500", "3 4 1 10.1.2.3 29500"]);
}

#[cfg(unix)]
fn kiln_launch_kills_the_rest_when_one_fails_and_exits_with_its_code(exe: &str) {
    let start = Instant::now();
    let out = std::process::Command::new(exe)
        .args(["launch", "--nproc", "3", "--grace", "0.5", "--"])
        .args(["sh", "-c", r#"if [ "$RANK" = 1 ]; then exit 3; fi; exec sleep 60"#])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(start.elapsed() < Duration::from_secs(20), "{:?}", start.elapsed());
    assert!(err.contains("rank 1 failed (exit code 3)"), "{err}");
    assert!(err.contains("killing rank 0") && err.contains("killing rank 2"), "{err}");
}

fn kiln_launch_refuses_bad_arguments(exe: &str) {
    let run = |args: &[&str]| std::process::Command::new(exe).args(args).output().unwrap();
    for args in
        [&["launch", "--nproc", "x", "--", "true"][..], &["launch"], &["frobnicate"], &["launch", "--bogus", "1"]]
    {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    }
    let out = run(&["launch", "--", "/nonexistent/program"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot start"));
    assert!(run(&["--help"]).status.success());
    assert!(Launch::new(0, "true").run().is_err());
}

fn main() {
    let plain = |name: &str, test: fn()| {
        Trial::test(name, move || {
            test();
            Ok(())
        })
    };
    #[allow(unused_mut)]
    let mut trials = vec![
        plain("two_processes_train_as_one", two_processes_train_as_one),
        plain(
            "a_worker_that_dies_makes_the_other_stop_with_an_error_naming_it",
            a_worker_that_dies_makes_the_other_stop_with_an_error_naming_it,
        ),
        kiln_trial("kiln_launch_refuses_bad_arguments", kiln_launch_refuses_bad_arguments),
    ];
    #[cfg(unix)]
    trials.extend([
        kiln_trial(
            "kiln_launch_sets_the_environment_of_every_worker",
            kiln_launch_sets_the_environment_of_every_worker,
        ),
        kiln_trial(
            "kiln_launch_kills_the_rest_when_one_fails_and_exits_with_its_code",
            kiln_launch_kills_the_rest_when_one_fails_and_exits_with_its_code,
        ),
    ]);
    libtest_mimic::run(&Arguments::from_args(), trials).exit()
}
