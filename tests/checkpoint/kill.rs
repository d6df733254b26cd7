//! A training process killed (SIGKILL) at random moments while it saves checkpoints always
//! leaves a loadable checkpoint behind, and the next run resumes from it.
//!
//! The test re-invokes its own binary as the child (selected by an environment variable): the
//! child resumes from the newest checkpoint if there is one, then trains and saves through a
//! `CheckpointManager` in a loop, each save some megabytes so that kills land mid-write.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln::io::{Checkpoint, CheckpointManager};
use kiln::model::ModelBuilder;
use kiln::rng::Rng;
use kiln::tensor::Tensor;
use kiln::train::{Device, Trainer, TrainerConfig};

const CHILD_DIR: &str = "KILN_KILL_TEST_DIR";
const TEST: &str = "kill::killing_a_process_during_saves_always_leaves_a_loadable_checkpoint";

/// The child: train and save forever (until killed, or 60 s as a safety net).
fn child(dir: &Path) -> ! {
    let start = Instant::now();
    let mut mgr = CheckpointManager::new(dir).unwrap().keep_last(2);
    let mut t = match mgr.latest().unwrap() {
        Some(p) => Trainer::resume(p).unwrap(),
        None => {
            // About 260k parameters: with Adam's two moments a checkpoint is some 3 MB.
            let model = ModelBuilder::new(&[4, 64]).dense(2048).relu().dense(64).relu().dense(2).build().unwrap();
            let config = TrainerConfig { batch_size: 4, device: Device::Cpu, threads: Some(1), ..Default::default() };
            Trainer::new(&model, config).unwrap()
        }
    };
    let mut r = Rng::new(t.steps_taken());
    let x = Tensor::new(&[4, 64], (0..256).map(|_| r.uniform_range(-1.0, 1.0)).collect()).unwrap();
    while start.elapsed() < Duration::from_secs(60) {
        t.train_step(&x, &[0u32, 1, 1, 0]).unwrap();
        mgr.save(&mut t).unwrap();
    }
    std::process::exit(0)
}

/// Whether a checkpoint is being written (its temporary file exists).
fn writing(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().contains(".tmp-"))
}

/// The newest checkpoint, found as a second program would: a manager that only reads.
fn newest(dir: &Path) -> Option<PathBuf> {
    CheckpointManager::new(dir).ok()?.latest().ok()?
}

#[test]
fn killing_a_process_during_saves_always_leaves_a_loadable_checkpoint() {
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        child(Path::new(&dir));
    }
    let dir = std::env::temp_dir().join(format!("kiln-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut r = Rng::new(7);
    let (mut torn, mut last_steps) = (0, 0);
    for round in 0..10 {
        let before = newest(&dir);
        let mut c = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", TEST, "--test-threads=1", "--nocapture"])
            .env(CHILD_DIR, &dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait for the child's first new save. Then, in even rounds, kill it as soon as it is
        // writing a checkpoint (a temporary file exists), at a random point of the write; in odd
        // rounds, at a random moment.
        let t0 = Instant::now();
        let alive = |c: &mut std::process::Child, what: &str| {
            assert!(t0.elapsed() < Duration::from_secs(60), "round {round}: {what}");
            assert!(c.try_wait().unwrap().is_none(), "round {round}: the child exited early");
        };
        while newest(&dir) == before {
            alive(&mut c, "the child saved nothing");
            std::thread::sleep(Duration::from_millis(1));
        }
        if round % 2 == 0 {
            while !writing(&dir) {
                alive(&mut c, "the child wrote nothing more");
                std::thread::sleep(Duration::from_micros(100));
            }
            std::thread::sleep(Duration::from_micros(r.below(2_000)));
        } else {
            std::thread::sleep(Duration::from_micros(r.below(60_000)));
        }
        c.kill().unwrap();
        c.wait().unwrap();

        let names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        torn += names.iter().filter(|n| n.contains(".tmp-")).count();
        let files: Vec<_> = names.iter().filter(|n| !n.starts_with('.')).collect();
        assert!(!files.is_empty() && files.len() <= 3, "round {round}: {names:?}");
        for f in files {
            let ckpt = Checkpoint::read(dir.join(f)).unwrap_or_else(|e| panic!("round {round}: {f} is damaged: {e}"));
            assert!(ckpt.trainer.is_some());
        }
        let latest = Trainer::resume(newest(&dir).unwrap()).unwrap();
        assert!(latest.steps_taken() > last_steps, "round {round}: training went on from the last checkpoint");
        last_steps = latest.steps_taken();
    }
    // The kills did land mid-write (the half-written file is there, and was ignored).
    println!("{torn} of 10 kills left a half-written temporary file; every finished checkpoint loaded");
    assert!(torn > 0, "no kill interrupted a write: the test did not test what it is for");
    let _ = std::fs::remove_dir_all(&dir);
}
