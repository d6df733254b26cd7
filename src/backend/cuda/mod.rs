//! The CUDA backend: every [`Op`] on an NVIDIA GPU, f32, with the CPU backend's semantics.
//!
//! | op | how | file |
//! | --- | --- | --- |
//! | convolution | cuDNN (algorithm timed once per shape, deterministic, no TF32 by default) | `conv2d.rs` |
//! | transposed convolution | cuDNN's convolution directions, swapped | `conv_transpose2d.rs` |
//! | dense | cuBLASLt (bias and bias gradient fused in epilogues) | `linear.rs` |
//! | everything else | CUDA C compiled by NVRTC for the GPU's architecture, cached on disk | `activation.rs`, `softmax.rs`, `dropout.rs`, `batch_norm.rs`, `pool2d.rs`, `join.rs`, `nvrtc.rs` |
//!
//! Memory is allocated when the planner asks ([`Backend::alloc`]) and never freed before the
//! backend is dropped (`memory.rs`); host copies go through pinned staging buffers; only reads
//! synchronise. [`Backend::run_cached`] captures a step into a CUDA graph (`graph.rs`).
//! The CUDA libraries are loaded at run time and checked first (`loader.rs`), so creating a
//! backend on a machine without them is an [`Error::Device`], not a panic.
//!
//! Data-parallel training: [`Backend::set_communicator`] sets up NCCL (`nccl.rs`) for the
//! group; [`Op::AllReduce`] then runs on NCCL's own stream, overlapping the ops after it, and
//! synchronised batch norm reduces its statistics there too (`batch_norm.rs`).
//!
//! Environment: `KILN_EAGER=1` runs `run_cached` lists eagerly (same kernels, no graphs);
//! `KILN_DEBUG=1` logs every launch with its shapes and time (and algorithm choices, captures
//! and replays); `KILN_CACHE_DIR` sets the kernel cache folder; `KILN_CUDA_LIBRARY_PATH` adds
//! folders to search for the libraries.

#[macro_use]
mod nvrtc;
// Before the kernel modules: its `mt_prelude!` goes into their sources.
#[macro_use]
mod multi_tensor;
// Before the modules with half kernels: its `half_prelude!` goes into their sources.
#[macro_use]
mod cast;
mod activation;
mod batch_norm;
mod conv2d;
mod conv_transpose2d;
mod driver;
mod dropout;
mod graph;
mod group_norm;
mod join;
#[doc(hidden)]
pub mod kernel_check;
mod linear;
mod loader;
mod loss;
mod loss_scale;
mod memory;
mod nccl;
mod optimizer;
mod pool2d;
mod softmax;

use std::collections::HashMap;
use std::path::PathBuf;

use cudarc::driver::sys;

use super::ops::{BufId, CounterId, Op};
use super::{Backend, DType, HostSlice, HostVec};
use crate::backend::Communicator;
use crate::{Error, Result};
use driver::{Event, Gpu};
use memory::DeviceMemory;
use nvrtc::Kernel;

pub use nccl::{NcclCommunicator, nccl_version};
pub use nvrtc::default_cache_dir;

/// Every NVRTC-compiled kernel module.
const MODULES: &[&nvrtc::ModuleSrc] = &[
    &activation::MODULE,
    &batch_norm::MODULE,
    &cast::MODULE,
    &conv_transpose2d::MODULE,
    &dropout::MODULE,
    &group_norm::MODULE,
    &join::MODULE,
    &loss::MODULE,
    &loss_scale::MODULE,
    &optimizer::MODULE,
    &pool2d::MODULE,
    &softmax::MODULE,
];

/// Options of a [`CudaBackend`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CudaOptions {
    /// Let convolutions and dense layers use TF32 tensor cores (about 1e-3 relative error
    /// instead of f32's 1e-6; faster on large layers). Off by default.
    pub tf32: bool,
    /// Where compiled kernels are cached; `None`: [`default_cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Run `run_cached` lists eagerly instead of as CUDA graphs; `None`: `KILN_EAGER=1`.
    pub eager: Option<bool>,
    /// Log every launch; `None`: `KILN_DEBUG=1`.
    pub debug: Option<bool>,
    /// Let cuDNN use algorithms whose results vary in the last bits from run to run (atomic
    /// accumulation) when they are faster, as PyTorch's `cudnn.benchmark` does. Off by default:
    /// then a replayed graph computes bit for bit what an eager run does.
    pub nondeterministic: bool,
    /// Use only direct and GEMM-based convolution algorithms, never the FFT and Winograd ones
    /// (which are checked to 2e-5 of an exact result, 6e-5 for filter gradients, before use):
    /// the closest agreement with the CPU reference over many steps, at up to twice the
    /// convolution time on ResNet-18. Off by default.
    pub exact: bool,
}

/// One lock for submitting work from any backend of the process. Several backends on one
/// context (the tests run many at once) saw cuDNN return INTERNAL_ERROR now and then, even with
/// every cuDNN call serialised, when another thread was capturing or launching a graph; holding
/// this across each whole `run`/`run_cached` (which only queue work) costs nothing in a process
/// with one backend and makes concurrent ones take turns.
static SUBMIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn submit_lock() -> std::sync::MutexGuard<'static, ()> {
    SUBMIT.lock().unwrap_or_else(|p| p.into_inner())
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

/// A CUDA GPU as a [`Backend`]. See the module documentation.
pub struct CudaBackend {
    // Fields drop in order: graphs before the memory they point into, every library handle
    // before the context, the context (`gpu`) last.
    graphs: HashMap<u64, graph::Cached>,
    /// The data-parallel group (NCCL), once joined; graphs above may point at it.
    coll: Option<nccl::Collectives>,
    dnn: conv2d::Cudnn,
    lt: linear::Lt,
    funcs: HashMap<&'static str, sys::CUfunction>,
    /// Owns the loaded kernel modules that `funcs` points into.
    _modules: Vec<nvrtc::Module>,
    /// Each buffer's address, length in values and dtype.
    bufs: Vec<(sys::CUdeviceptr, usize, DType)>,
    mem: DeviceMemory,
    compiles: usize,
    /// Scratch that one op uses while it runs (batch-norm partial sums, clipping's
    /// accumulator): grown in eager runs, never during capture; a grown one keeps its
    /// predecessor alive, as a captured graph may point at it.
    op_scratch: (sys::CUdeviceptr, usize),
    /// The device tables of multi-tensor launches (optimizer, clipping, non-finite check),
    /// made in warm-up runs and kept for the graphs that point at them.
    mt_tables: multi_tensor::MtTables,
    /// The count of finished blocks with which a kernel finds its last block (`last_block` in
    /// `multi_tensor.rs`: batch norm's statistics, the optimizer's step counter, the norm of
    /// clipping and the non-finite check): zero between launches.
    done: sys::CUdeviceptr,
    nvrtc_version: (i32, i32),
    tf32: bool,
    eager: bool,
    debug: bool,
    gpu: Gpu,
}

// SAFETY: the raw handles (context, stream, library handles, modules, graphs) are only used
// through `&mut self` or `&self` methods, never from two threads at once, and every entry
// point makes the context current on the calling thread first (`Gpu::bind`). The CUDA driver,
// cuDNN and cuBLASLt allow a handle to be used from another thread as long as calls are not
// concurrent.
unsafe impl Send for CudaBackend {}

impl CudaBackend {
    /// The GPU of this ordinal with default options.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_options(ordinal, CudaOptions::default())
    }

    /// The GPU of this ordinal. Fails with [`Error::Device`] when there is no such GPU or the
    /// driver, NVRTC, cuBLASLt or cuDNN is missing.
    pub fn with_options(ordinal: usize, options: CudaOptions) -> Result<Self> {
        let device = format!("cuda:{ordinal}");
        let libs = loader::ensure().map_err(|reason| Error::Device { device: device.clone(), reason })?;
        let debug = options.debug.unwrap_or_else(|| env_flag("KILN_DEBUG"));
        if debug {
            eprintln!("[kiln cuda] libraries: {}", libs.paths.join(", "));
        }
        let gpu = Gpu::open(ordinal)?;
        let unusable = |what: &str, e: Error| Error::Device { device: device.clone(), reason: format!("{what}: {e}") };
        let mut mem = DeviceMemory::new()?;
        let cache_dir = options.cache_dir.clone().or_else(default_cache_dir);
        let mut compiler = nvrtc::Compiler::new(gpu.cc, cache_dir).map_err(|e| unusable("NVRTC", e))?;
        let modules = compiler.load_all(MODULES)?;
        if debug {
            eprintln!(
                "[kiln cuda] kernels: {} module(s) compiled, {} from the cache",
                compiler.compiles,
                MODULES.len() - compiler.compiles
            );
        }
        let funcs = modules.iter().flat_map(|m| m.functions.iter().copied()).collect();
        let dnn = conv2d::Cudnn::new(gpu.stream, options.tf32, !options.nondeterministic, options.exact)
            .map_err(|e| unusable("cuDNN", e))?;
        let ws = mem.alloc(&gpu, linear::LT_WORKSPACE)?;
        let done = mem.alloc(&gpu, 256)?;
        let lt = linear::Lt::new(ws, options.tf32).map_err(|e| unusable("cuBLASLt", e))?;
        Ok(CudaBackend {
            graphs: HashMap::new(),
            coll: None,
            dnn,
            lt,
            funcs,
            _modules: modules,
            bufs: Vec::new(),
            mem,
            compiles: compiler.compiles,
            op_scratch: (0, 0),
            mt_tables: Default::default(),
            done,
            nvrtc_version: compiler.version,
            tf32: options.tf32,
            eager: options.eager.unwrap_or_else(|| env_flag("KILN_EAGER")),
            debug,
            gpu,
        })
    }

    /// How many kernel modules this backend compiled with NVRTC (0 when all came from the disk
    /// cache).
    pub fn nvrtc_compiles(&self) -> usize {
        self.compiles
    }

    /// Device bytes held now (buffers, workspaces, counters).
    pub fn memory_in_use(&self) -> u64 {
        self.mem.current()
    }

    /// At least `bytes` of scratch for the op being queued (ops on the one stream run in order,
    /// so they can all share it).
    fn op_scratch(&mut self, bytes: usize) -> Result<sys::CUdeviceptr> {
        if bytes > self.op_scratch.1 {
            let size = bytes.next_multiple_of(1 << 16);
            let p = self.mem.alloc(&self.gpu, size)?;
            self.op_scratch = (p, size);
        }
        Ok(self.op_scratch.0)
    }

    /// Launches a 2-D grid of `block`-thread blocks.
    fn launch_grid<K: Kernel>(&self, grid: (u32, u32), block: u32, k: &K) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 {
            return Ok(());
        }
        self.gpu.launch_2d(self.func(K::NAME)?, grid, block, 0, &k.args())
    }

    fn ptr(&self, b: BufId) -> sys::CUdeviceptr {
        self.bufs[b.0].0
    }

    fn opt_ptr(&self, b: Option<BufId>) -> sys::CUdeviceptr {
        b.map(|b| self.ptr(b)).unwrap_or(0)
    }

    fn func(&self, name: &str) -> Result<sys::CUfunction> {
        self.funcs.get(name).copied().ok_or_else(|| Error::State(format!("CUDA kernel {name} is not loaded")))
    }

    /// Launches a grid-stride kernel over `n` items: 256 threads a block, at most 32 blocks per
    /// multiprocessor (enough to fill it; more only adds scheduling).
    fn launch_elems<K: Kernel>(&self, n: usize, k: &K) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let grid = n.div_ceil(256).min(self.gpu.sm_count as usize * 32) as u32;
        self.gpu.launch(self.func(K::NAME)?, grid, 256, 0, &k.args())
    }

    fn launch_blocks<K: Kernel>(&self, grid: u32, block: u32, shared: u32, k: &K) -> Result<()> {
        if grid == 0 {
            return Ok(());
        }
        self.gpu.launch(self.func(K::NAME)?, grid, block, shared, &k.args())
    }

    /// Queues one op.
    fn exec(&mut self, op: &Op) -> Result<()> {
        // bf16 and f16 only where mixed precision puts them (each such op checks its own dtypes).
        let half = op.takes_half();
        op.validate(|b| self.bufs.get(b.0).map(|x| (x.1, x.2)), |d| d == DType::F32 || (half && d.is_half()))?;
        if self.coll.is_some() {
            self.join_for(op)?;
        }
        op.run_on(self)
    }

    /// Runs ops eagerly; under `KILN_DEBUG=1` each is timed and logged. Reductions still
    /// running on NCCL's stream are joined at the end.
    fn run_ops(&mut self, ops: &[Op]) -> Result<()> {
        if !self.debug {
            let ran = ops.iter().try_for_each(|op| self.exec(op));
            return ran.and(self.join_collectives());
        }
        // The caller holds the submission lock (`run`): time without taking it again (a
        // std mutex is not re-entrant; taking it here hung every eager run under KILN_DEBUG=1).
        let times = self.time_ops(ops);
        let joined = self.join_collectives();
        for (op, ms) in ops.iter().zip(times?) {
            eprintln!("[kiln cuda] {:<20} {:<48} {ms:>9.3} ms", op.name(), op.shapes());
        }
        joined
    }

    /// Around every op list of a backend in a group: refuse to queue work after the watchdog
    /// aborted NCCL, and let it time the list's collectives.
    fn run_watched(&mut self, run: impl FnOnce(&mut Self) -> Result<()>) -> Result<()> {
        if let Some(c) = &self.coll {
            c.nccl.check_alive()?;
        }
        run(self)?;
        match &self.coll {
            Some(c) => c.nccl.watch_after(self.gpu.stream),
            None => Ok(()),
        }
    }

    /// [`Backend::profile`]'s work, for a caller that holds the submission lock and has bound
    /// the context.
    fn time_ops(&mut self, ops: &[Op]) -> Result<Vec<f64>> {
        let marks = (0..=ops.len()).map(|_| Event::new(true)).collect::<Result<Vec<_>>>()?;
        marks[0].record(self.gpu.stream)?;
        for (op, end) in ops.iter().zip(&marks[1..]) {
            self.exec(op)?;
            end.record(self.gpu.stream)?;
        }
        marks[ops.len()].wait()?;
        marks.windows(2).map(|w| w[1].since(&w[0])).collect()
    }

    /// A buffer's address, length and dtype, or an error naming a buffer that does not exist.
    fn buf(&self, buf: BufId) -> Result<(sys::CUdeviceptr, usize, DType)> {
        self.bufs.get(buf.0).copied().ok_or_else(|| Error::State(format!("no buffer {}", buf.0)))
    }
}

impl Backend for CudaBackend {
    fn describe(&self) -> String {
        let gib = self.gpu.total_mem as f64 / (1u64 << 30) as f64;
        format!(
            "cuda:{} ({}, sm_{}{}, {} SMs, {gib:.1} GiB; cuDNN {}, cuBLASLt {}, NVRTC {}.{}; TF32 {}{})",
            self.gpu.ordinal,
            self.gpu.name,
            self.gpu.cc.0,
            self.gpu.cc.1,
            self.gpu.sm_count,
            self.dnn.version,
            self.lt.version,
            self.nvrtc_version.0,
            self.nvrtc_version.1,
            if self.tf32 { "on" } else { "off" },
            if self.eager { ", eager" } else { "" },
        ) + &self.coll.as_ref().map(|c| format!("; {}", c.nccl.describe())).unwrap_or_default()
    }

    fn alloc(&mut self, len: usize, dtype: DType) -> Result<BufId> {
        self.gpu.bind()?;
        let bytes = match dtype.bytes(len) {
            Ok(b) => b,
            Err(_) => {
                let free = self.gpu.mem_info()?.0;
                return Err(Error::OutOfMemory { model: String::new(), batch: 0, needed: u64::MAX, free });
            }
        };
        let p = self.mem.alloc(&self.gpu, bytes)?;
        self.bufs.push((p, len, dtype));
        Ok(BufId(self.bufs.len() - 1))
    }

    fn len(&self, buf: BufId) -> usize {
        self.bufs[buf.0].1
    }

    fn dtype(&self, buf: BufId) -> DType {
        self.bufs[buf.0].2
    }

    fn computes(&self, dtype: DType) -> bool {
        dtype == DType::F32
    }

    /// TF32 as [`CudaOptions::tf32`] set it.
    fn tf32(&self) -> Option<bool> {
        Some(self.tf32)
    }

    /// Not by default yet: the fused batch norm kernels (`batch_norm.rs`) compile with NVRTC and
    /// match the unfused sequence under a CPU emulation, but have not run on a GPU (session 7
    /// had no device time left for them). `KILN_FUSION=1` or `Executor::set_fusion(true)` turn
    /// the pass on, as tests/cuda_fused.rs does.
    fn fuses_norm_activation(&self) -> bool {
        false
    }

    /// bf16 and f16: cuDNN convolutions and cuBLASLt products on tensor cores, f32 accumulation.
    fn computes_products_in(&self, dtype: DType) -> bool {
        dtype.is_half()
    }

    fn free(&mut self, buf: BufId) -> Result<()> {
        self.gpu.bind()?;
        let (p, _, dtype) = self.bufs[buf.0];
        self.mem.free_now(&self.gpu, p)?;
        self.bufs[buf.0] = (0, 0, dtype);
        Ok(())
    }

    fn write_host(&mut self, buf: BufId, data: HostSlice<'_>) -> Result<()> {
        self.gpu.bind()?;
        let (p, len, dtype) = self.buf(buf)?;
        if len != data.len() {
            return Err(Error::shape("buffer write", len, data.len()));
        }
        // Values already of the buffer's dtype go straight from the caller's slice.
        if data.dtype() == dtype {
            return self.mem.upload(&self.gpu, p, data.as_bytes());
        }
        let converted = data.convert(dtype)?;
        self.mem.upload(&self.gpu, p, converted.as_slice().as_bytes())
    }

    fn read_host(&mut self, buf: BufId, dtype: DType) -> Result<HostVec> {
        self.gpu.bind()?;
        let (p, len, held) = self.buf(buf)?;
        if held != dtype && !(held.is_float() && dtype.is_float()) {
            return Err(Error::shape("buffer read", format!("{dtype} values"), format!("{held} values")));
        }
        let mut out = HostVec::zeros(held, len);
        self.mem.download(&self.gpu, p, out.as_bytes_mut())?;
        if held == dtype { Ok(out) } else { out.as_slice().convert(dtype) }
    }

    fn new_counter(&mut self) -> Result<CounterId> {
        self.gpu.bind()?;
        Ok(CounterId(self.mem.new_counter(&self.gpu)?))
    }

    fn counter(&mut self, id: CounterId) -> Result<u64> {
        self.gpu.bind()?;
        let p = self.mem.counter_ptr(id.0)?;
        let mut b = [0u8; 8];
        self.mem.download(&self.gpu, p, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn set_counter(&mut self, id: CounterId, value: u64) -> Result<()> {
        self.gpu.bind()?;
        let p = self.mem.counter_ptr(id.0)?;
        self.mem.upload(&self.gpu, p, &value.to_le_bytes())
    }

    fn run(&mut self, ops: &[Op]) -> Result<()> {
        let _turn = submit_lock();
        self.gpu.bind()?;
        self.run_watched(|b| b.run_ops(ops))
    }

    fn run_cached(&mut self, key: u64, ops: &[Op]) -> Result<()> {
        let _turn = submit_lock();
        self.gpu.bind()?;
        self.run_watched(|b| b.run_cached_ops(key, ops))
    }

    fn set_communicator(&mut self, comm: Box<dyn Communicator>) -> Result<()> {
        if self.coll.is_some() {
            return Err(Error::State("this backend already belongs to a data-parallel group".into()));
        }
        self.gpu.bind()?;
        self.coll = Some(nccl::Collectives::new(self.gpu.ordinal, comm)?);
        self.gpu.bind()
    }

    fn communicator(&mut self) -> Option<&mut dyn Communicator> {
        self.coll.as_mut().map(|c| &mut *c.host as &mut dyn Communicator)
    }

    /// Runs `ops` eagerly, back to back as an eager pass runs them, with a device event
    /// recorded between every two ops; returns each op's milliseconds (the time between the
    /// events around it). Waiting for each op on the host instead would add the launch latency
    /// of every op to its time (ResNet-18 at batch 64: the ops' sum came out 52% above the eager
    /// pass that way; measured on the H200, 2026-11-29).
    fn profile(&mut self, ops: &[Op]) -> Result<Vec<f64>> {
        let _turn = submit_lock();
        self.gpu.bind()?;
        self.time_ops(ops)
    }

    fn replays_graphs(&self) -> bool {
        !self.eager
    }

    fn synchronize(&mut self) -> Result<()> {
        self.gpu.bind()?;
        self.gpu.sync()
    }

    fn peak_memory(&self) -> Option<u64> {
        Some(self.mem.peak())
    }

    fn available_memory(&self) -> Option<u64> {
        self.gpu.bind().ok()?;
        self.gpu.mem_info().ok().map(|(free, _)| free)
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Make the context current and let queued work finish; the fields then drop in
        // declaration order (graphs, libraries, modules, memory, and the context last).
        let _ = self.gpu.bind();
        let _ = self.gpu.sync();
    }
}
