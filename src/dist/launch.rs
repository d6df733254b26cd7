//! Starting the workers of a data-parallel job on one machine (what `kiln launch` and
//! `torchrun --nproc-per-node` do): one process per device, each told its place through the
//! environment, and no worker left running when one fails.
//!
//! Every worker gets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
//! `MASTER_PORT` (read by [`super::DistEnv::from_env`]), `NCCL_NVLS_ENABLE=0` (with PyTorch's and
//! NVSHMEM's switches for NVLink multicast, which stays off), and, unless already set,
//! `KILN_NUM_THREADS` = the machine's cores divided among the workers, so CPU workers do not
//! oversubscribe the cores.
//!
//! When a worker exits unsuccessfully, the others get `grace` to stop on their own (they do,
//! with an error naming the failed rank, as soon as a collective needs it), then get SIGTERM,
//! and SIGKILL 3 s later.
//!
//! Several machines: run the launcher on each, with the same `nnodes`, `master_addr` (an address
//! of machine 0 that every machine reaches) and `master_port`, and `node_rank` 0..nnodes; the
//! ranks of machine `k` are `k * nproc .. (k + 1) * nproc`.

use std::ffi::OsString;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// A job to start: `nproc` copies of `program args...` on this machine.
#[derive(Clone, Debug)]
pub struct Launch {
    /// Workers on this machine (usually its number of GPUs).
    pub nproc: usize,
    /// Machines in the job.
    pub nnodes: usize,
    /// This machine's index, `0..nnodes`.
    pub node_rank: usize,
    /// Where rank 0 listens (on machine 0).
    pub master_addr: String,
    /// Rank 0's port; `None`: a free port when the job has one machine, else 29500 (as torchrun).
    pub master_port: Option<u16>,
    /// The program every worker runs (the same on each; workers tell themselves apart by
    /// `RANK` and `LOCAL_RANK`).
    pub program: OsString,
    /// Its arguments, the same for every worker.
    pub args: Vec<OsString>,
    /// How long the other workers may take to stop on their own after one fails.
    pub grace: Duration,
    /// Extra environment for every worker.
    pub env: Vec<(OsString, OsString)>,
}

/// How a job ended.
#[derive(Clone, Debug)]
pub struct LaunchReport {
    /// Each worker's exit status, by local rank.
    pub statuses: Vec<ExitStatus>,
    /// The global rank and status of the first worker seen to fail, if any did.
    pub first_failure: Option<(usize, ExitStatus)>,
    /// Workers the launcher had to kill after the grace period.
    pub killed: Vec<usize>,
}

impl LaunchReport {
    /// The exit code for the launcher itself: 0 when every worker succeeded, else the first
    /// failed worker's code (128 + signal for a worker killed by a signal).
    pub fn code(&self) -> i32 {
        match self.first_failure {
            None => 0,
            Some((_, st)) => exit_code(st),
        }
    }

    /// `Ok` when every worker succeeded, else an [`Error::Dist`] naming the failed rank.
    pub fn into_result(self) -> Result<()> {
        match self.first_failure {
            None => Ok(()),
            Some((rank, st)) => Err(Error::dist(
                "launch",
                format!(
                    "rank {rank} failed ({}); {} other worker(s) had to be killed",
                    describe(st),
                    self.killed.len()
                ),
            )),
        }
    }
}

fn exit_code(st: ExitStatus) -> i32 {
    if let Some(c) = st.code() {
        return c;
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(s) = st.signal() {
            return 128 + s;
        }
    }
    1
}

fn describe(st: ExitStatus) -> String {
    match st.code() {
        Some(c) => format!("exit code {c}"),
        None => format!("{st}"),
    }
}

/// A port nobody listens on now (bound and released: another program could take it before the
/// job's rank 0 does, which then fails with a clear error).
fn free_port() -> Result<u16> {
    std::net::TcpListener::bind(("0.0.0.0", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::dist("launch", format!("cannot find a free port: {e}")))
}

impl Launch {
    /// `nproc` workers of `program` on this machine, a job of one machine, rank 0 on localhost.
    pub fn new(nproc: usize, program: impl Into<OsString>) -> Launch {
        Launch {
            nproc,
            nnodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: None,
            program: program.into(),
            args: Vec::new(),
            grace: Duration::from_secs(10),
            env: Vec::new(),
        }
    }

    /// Appends arguments for the program.
    pub fn args<I, S>(mut self, args: I) -> Launch
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for every worker.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Launch {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Starts the workers and waits for all of them; see the module documentation. `Err` only
    /// when the job could not start (bad options, a program that does not exist); a worker's
    /// failure is in the report.
    pub fn run(&self) -> Result<LaunchReport> {
        if self.nproc == 0 || self.nnodes == 0 {
            return Err(Error::config("nproc", "the job needs at least one worker on at least one machine"));
        }
        if self.node_rank >= self.nnodes {
            return Err(Error::config("node_rank", format!("{} is not below nnodes {}", self.node_rank, self.nnodes)));
        }
        let port = match self.master_port {
            Some(p) => p,
            None if self.nnodes == 1 => free_port()?,
            None => 29500,
        };
        let world = self.nproc * self.nnodes;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = (cores / self.nproc).max(1).to_string();
        let mut children: Vec<Child> = Vec::with_capacity(self.nproc);
        let ranks: Vec<usize> = (0..self.nproc).map(|l| self.node_rank * self.nproc + l).collect();
        for (local, &rank) in ranks.iter().enumerate() {
            let mut cmd = Command::new(&self.program);
            cmd.args(&self.args)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", local.to_string())
                .env("LOCAL_WORLD_SIZE", self.nproc.to_string())
                .env("MASTER_ADDR", &self.master_addr)
                .env("MASTER_PORT", port.to_string())
                .env("NCCL_NVLS_ENABLE", "0")
                .env("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
                .env("NVSHMEM_DISABLE_NVLS", "1");
            if std::env::var_os("KILN_NUM_THREADS").is_none() {
                cmd.env("KILN_NUM_THREADS", &threads);
            }
            for (k, v) in &self.env {
                cmd.env(k, v);
            }
            match cmd.spawn() {
                Ok(c) => children.push(c),
                Err(e) => {
                    for c in children.iter_mut() {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    return Err(Error::dist(
                        "launch",
                        format!("cannot start {} for rank {rank}: {e}", self.program.to_string_lossy()),
                    ));
                }
            }
        }

        // One thread waits for each worker, so exits are seen in the order they happen (the
        // first failure is the cause, the ones right after it usually its consequence).
        let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
        let (tx, rx) = std::sync::mpsc::channel();
        for (local, mut child) in children.into_iter().enumerate() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let st = child.wait().unwrap_or_else(|_| fake_failure());
                let _ = tx.send((local, st));
            });
        }
        drop(tx);
        let mut statuses: Vec<Option<ExitStatus>> = vec![None; self.nproc];
        let mut first_failure: Option<(usize, ExitStatus)> = None;
        let mut stop_at: Option<Instant> = None;
        let mut kill_at: Option<Instant> = None;
        let mut killed = Vec::new();
        while statuses.iter().any(Option::is_none) {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok((local, st)) => {
                    statuses[local] = Some(st);
                    if st.success() {
                        continue;
                    }
                    if first_failure.is_some() {
                        eprintln!("kiln launch: rank {} failed too ({})", ranks[local], describe(st));
                        continue;
                    }
                    first_failure = Some((ranks[local], st));
                    let running = statuses.iter().filter(|s| s.is_none()).count();
                    if running > 0 {
                        eprintln!(
                            "kiln launch: rank {} failed ({}); the other {running} worker(s) have {:.0} s to stop",
                            ranks[local],
                            describe(st),
                            self.grace.as_secs_f64()
                        );
                    }
                    stop_at = Some(Instant::now() + self.grace);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    // Every waiting thread is gone: whatever is missing counts as failed.
                    statuses.iter_mut().filter(|s| s.is_none()).for_each(|s| *s = Some(fake_failure()));
                }
            }
            let now = Instant::now();
            if stop_at.is_some_and(|t| now >= t) {
                stop_at = None;
                kill_at = Some(now + Duration::from_secs(3));
                for local in (0..self.nproc).filter(|&l| statuses[l].is_none()) {
                    eprintln!("kiln launch: killing rank {}", ranks[local]);
                    killed.push(ranks[local]);
                    terminate(pids[local], false);
                }
            }
            if kill_at.is_some_and(|t| now >= t) {
                kill_at = None;
                for local in (0..self.nproc).filter(|&l| statuses[l].is_none()) {
                    terminate(pids[local], true);
                }
            }
        }
        Ok(LaunchReport {
            statuses: statuses.into_iter().map(|s| s.expect("all collected")).collect(),
            first_failure,
            killed,
        })
    }
}

/// Asks a worker to stop (SIGTERM), or makes it (`force`: SIGKILL). The worker has not been
/// reaped yet (its waiting thread has not reported), so the pid is still its own.
fn terminate(pid: u32, force: bool) {
    #[cfg(unix)]
    {
        let sig = if force { libc::SIGKILL } else { libc::SIGTERM };
        // SAFETY: kill(2) with a pid of our own unreaped child and a valid signal number.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
    #[cfg(not(unix))]
    {
        let _ = force;
        let _ = Command::new("taskkill").args(["/F", "/PID", &pid.to_string()]).status();
    }
}

/// The status of a worker whose real status could not be collected.
fn fake_failure() -> ExitStatus {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        ExitStatus::from_raw(1 << 8)
    }
    #[cfg(not(unix))]
    {
        use std::os::windows::process::ExitStatusExt;
        ExitStatus::from_raw(1)
    }
}
