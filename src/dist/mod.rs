//! Data-parallel training: one process per device, each training the same model on its share of
//! every batch, gradients averaged over the processes before each optimizer step (as PyTorch's
//! `DistributedDataParallel`).
//!
//! | piece | what | file |
//! | --- | --- | --- |
//! | [`Communicator`] | the collectives a group needs: all-reduce (sum, mean) of f32/f64 buffers, broadcast, barrier; defined by the backend seam (`backend/collective.rs`), which the backends call, and re-exported here | `backend/collective.rs` |
//! | [`TcpCommunicator`] | the communicator over plain TCP: rendezvous at `MASTER_ADDR:MASTER_PORT`, ring all-reduce, timeouts | `tcp.rs` |
//! | [`DistEnv`] | rank, world size, local rank and rendezvous address, read from the environment as `torchrun` sets it | here |
//! | [`bucket`] | gradient buckets (~25 MiB, reverse parameter order) and where their all-reduces go in a step | `bucket.rs` |
//! | [`Launch`] | starting the workers of one machine (`kiln launch --nproc N -- program`) | `launch.rs` |
//!
//! The NCCL communicator that the CUDA backend uses for its all-reduces,
//! [`crate::backend::cuda::NcclCommunicator`], implements the same trait.
//!
//! # How a data-parallel step runs
//!
//! A backend joins a group with [`crate::backend::Backend::set_communicator`]. The trainer then
//! inserts one [`crate::backend::Op::AllReduce`] per gradient bucket into the step's op list,
//! right after the backward op that last writes one of the bucket's gradients, so the
//! reduction of the last layers' gradients starts while the first layers' backward still runs
//! (on the GPU: on a second stream, inside the step's CUDA graph). The CPU backend reduces with
//! the group's communicator (TCP), the CUDA backend with NCCL, bootstrapped through it.
//!
//! # One process per device
//!
//! Each process owns one device and one backend, as DDP does with `torchrun`: the CUDA backend
//! serialises submissions within a process, NCCL's best-tested mode is one GPU per process, and a
//! worker that crashes takes down nothing but itself (the others see its sockets close and stop
//! with an error naming it; the launcher then ends any that remain).

pub mod bucket;
mod launch;
mod tcp;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub use crate::backend::Communicator;
pub use launch::{Launch, LaunchReport};
pub use tcp::TcpCommunicator;

/// The options of data-parallel training ([`crate::train::TrainerConfig::data_parallel`]).
///
/// The group itself (rank, world size, rendezvous address) comes from the environment
/// ([`DistEnv::from_env`]), as `kiln launch` or `torchrun` set it; a process started without it
/// trains alone, as a group of one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DataParallel {
    /// The GPUs of this machine by local rank: the process with `LOCAL_RANK` i trains on
    /// `devices[i]`. Empty: GPU `LOCAL_RANK`. Unused when training on the CPU.
    pub devices: Vec<usize>,
    /// Batch-norm statistics over the samples of every rank (PyTorch's `SyncBatchNorm`) instead
    /// of each rank's own (the default, as DDP). Costs two small all-reduces per batch-norm layer
    /// in the forward pass and one in the backward pass, which do not overlap with compute.
    pub sync_batch_norm: bool,
    /// Gradient bytes per all-reduce bucket (DDP's `bucket_cap_mb`, 25 MiB).
    pub bucket_bytes: usize,
    /// Bytes of the first bucket (the last layers' gradients), smaller so that communication
    /// starts early (DDP's 1 MiB).
    pub first_bucket_bytes: usize,
    /// How long the rendezvous and each collective may wait for a peer, in seconds.
    pub timeout_s: f64,
}

impl Default for DataParallel {
    fn default() -> Self {
        DataParallel {
            devices: Vec::new(),
            sync_batch_norm: false,
            bucket_bytes: 25 << 20,
            first_bucket_bytes: 1 << 20,
            timeout_s: 600.0,
        }
    }
}

impl DataParallel {
    /// Checks every field; the error names it.
    pub fn validate(&self) -> Result<()> {
        if self.bucket_bytes == 0 || self.first_bucket_bytes == 0 {
            return Err(Error::config("data_parallel.bucket_bytes", "buckets must hold at least one byte"));
        }
        if !(self.timeout_s > 0.0 && self.timeout_s.is_finite()) {
            return Err(Error::config("data_parallel.timeout_s", format!("must be positive, got {}", self.timeout_s)));
        }
        Ok(())
    }

    /// [`DataParallel::timeout_s`] as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout_s)
    }

    /// The GPU of the process with this local rank.
    pub fn device_for(&self, local_rank: usize) -> Result<usize> {
        if self.devices.is_empty() {
            return Ok(local_rank);
        }
        self.devices.get(local_rank).copied().ok_or_else(|| {
            Error::config(
                "data_parallel.devices",
                format!("LOCAL_RANK is {local_rank} but only {} device(s) are listed", self.devices.len()),
            )
        })
    }
}

/// Where this process stands in a data-parallel job: the variables `torchrun` and `kiln launch`
/// set (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    /// Rank in the whole job, `0..world_size`.
    pub rank: usize,
    /// Number of processes in the whole job (1: not data-parallel).
    pub world_size: usize,
    /// Rank on this machine: which of its GPUs this process takes.
    pub local_rank: usize,
    /// Where rank 0 listens for the others (an address every machine of the job reaches).
    pub master_addr: String,
    /// The port rank 0 listens on at `master_addr` (torchrun's default is 29500).
    pub master_port: u16,
}

impl DistEnv {
    /// A group of one (no rendezvous, no sockets).
    pub fn single() -> DistEnv {
        DistEnv { rank: 0, world_size: 1, local_rank: 0, master_addr: "127.0.0.1".into(), master_port: 0 }
    }

    /// Reads the process environment; without `WORLD_SIZE`, a group of one.
    pub fn from_env() -> Result<DistEnv> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Reads the variables through `get` (testable without touching the environment).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<DistEnv> {
        fn num<T: std::str::FromStr>(name: &str, v: &str) -> Result<T> {
            v.trim().parse().map_err(|_| Error::config(name, format!("expected a non-negative integer, got '{v}'")))
        }
        let Some(world) = get("WORLD_SIZE") else {
            if get("RANK").is_some() {
                return Err(Error::config("WORLD_SIZE", "RANK is set but WORLD_SIZE is not"));
            }
            return Ok(DistEnv::single());
        };
        let world_size: usize = num("WORLD_SIZE", &world)?;
        if world_size == 0 {
            return Err(Error::config("WORLD_SIZE", "must be at least 1"));
        }
        let rank: usize = match get("RANK") {
            Some(r) => num("RANK", &r)?,
            None if world_size == 1 => 0,
            None => return Err(Error::config("RANK", format!("must be set when WORLD_SIZE is {world_size}"))),
        };
        if rank >= world_size {
            return Err(Error::config("RANK", format!("{rank} is not below WORLD_SIZE {world_size}")));
        }
        let local_rank = match get("LOCAL_RANK") {
            Some(r) => num("LOCAL_RANK", &r)?,
            None => rank,
        };
        if world_size == 1 {
            return Ok(DistEnv { local_rank, ..DistEnv::single() });
        }
        let master_addr = get("MASTER_ADDR")
            .filter(|a| !a.trim().is_empty())
            .ok_or_else(|| Error::config("MASTER_ADDR", "must be set (the address of rank 0) when WORLD_SIZE > 1"))?;
        let port = get("MASTER_PORT")
            .ok_or_else(|| Error::config("MASTER_PORT", "must be set (rank 0's port) when WORLD_SIZE > 1"))?;
        let master_port: u16 = num("MASTER_PORT", &port)?;
        if master_port == 0 {
            return Err(Error::config("MASTER_PORT", "must be a port number from 1 to 65535"));
        }
        Ok(DistEnv { rank, world_size, local_rank, master_addr: master_addr.trim().to_string(), master_port })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<DistEnv> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        DistEnv::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn reads_torchrun_variables() {
        let e = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap();
        assert_eq!(
            e,
            DistEnv { rank: 3, world_size: 4, local_rank: 1, master_addr: "10.0.0.1".into(), master_port: 29500 }
        );
        assert_eq!(env(&[]).unwrap(), DistEnv::single());
        assert_eq!(env(&[("WORLD_SIZE", "1")]).unwrap().world_size, 1);
    }

    #[test]
    fn bad_variables_are_errors_naming_them() {
        let base = [("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1234")];
        let with = |k: &str, v: &str| {
            let mut p: Vec<(&str, &str)> = base.iter().filter(|(n, _)| *n != k).copied().collect();
            if !v.is_empty() {
                p.push((k, v));
            }
            env(&p.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>())
        };
        for (k, v) in [
            ("RANK", "2"),
            ("RANK", "x"),
            ("RANK", ""),
            ("MASTER_ADDR", ""),
            ("MASTER_PORT", ""),
            ("MASTER_PORT", "0"),
            ("MASTER_PORT", "70000"),
            ("WORLD_SIZE", "0"),
        ] {
            match with(k, v) {
                Err(Error::Config { field, .. }) => assert_eq!(field, k, "{k}={v}"),
                other => panic!("{k}={v}: {other:?}"),
            }
        }
        assert!(env(&[("RANK", "0")]).is_err(), "RANK without WORLD_SIZE");
    }

    #[test]
    fn devices_by_local_rank() {
        let dp = DataParallel { devices: vec![2, 3], ..Default::default() };
        assert_eq!(dp.device_for(1).unwrap(), 3);
        assert!(dp.device_for(2).is_err());
        assert_eq!(DataParallel::default().device_for(5).unwrap(), 5);
        assert!(DataParallel { timeout_s: 0.0, ..Default::default() }.validate().is_err());
        assert!(DataParallel { bucket_bytes: 0, ..Default::default() }.validate().is_err());
    }
}
