//! The backend seam: buffers, copies, and op kernels described by the plain descriptors of
//! [`ops`]. A backend knows ops, not layers, and nothing above it.
//!
//! - [`cpu::CpuBackend`]: pure Rust, multi-threaded (rayon + gemm), generic over `f32` and `f64`;
//!   the numerical reference every other backend is checked against.
//! - [`cuda::CudaBackend`]: cuDNN convolutions, cuBLASLt dense layers, NVRTC-compiled kernels for
//!   the rest, CUDA graphs for repeated op lists. Compiled in every build; the CUDA libraries are
//!   loaded at run time, so a machine without them gets an error at creation, never a panic.
//! - `wgpu::WgpuBackend` (cargo feature `wgpu`): WGSL compute shaders through wgpu (Vulkan,
//!   Metal, DX12; verified on Vulkan).
//! - [`Device`]: which one to create (`Device::Auto` takes a GPU when one is usable).

mod collective;
pub mod cpu;
pub mod cuda;
mod device;
mod dtype;
pub mod ops;
#[cfg(feature = "wgpu")]
pub mod wgpu;

pub use collective::Communicator;
pub use cuda::{CudaBackend, CudaOptions};
pub use device::Device;
pub(crate) use device::print_notice_once;
pub use dtype::{DType, HostSlice, HostVec};
pub use ops::{ActFn, BnGeom, BufId, ConvGeom, CounterId, GradOut, LossFn, Op, OptParam, OptRule, PoolGeom, Scoring};

use crate::Result;

/// What an engine needs from a device.
///
/// Buffers are allocated once per plan and addressed by [`BufId`]; [`Backend::run`] executes a
/// list of ops in order. Reading a buffer is the only point at which a backend must wait for
/// queued work, so a step that nobody reads from costs no synchronisation.
///
/// Backends are `Send`: an executor (and the trainer around it) may move to another thread.
pub trait Backend: Send {
    /// A one-line description (device, threads).
    fn describe(&self) -> String;

    /// A new buffer of `len` zeros of `dtype`. Ops compute in the backend's float type (see
    /// [`Backend::computes`]); buffers of other dtypes can be allocated and copied.
    fn alloc(&mut self, len: usize, dtype: DType) -> Result<BufId>;

    /// Length of a buffer in elements.
    fn len(&self, buf: BufId) -> usize;

    /// The dtype a buffer was allocated with.
    fn dtype(&self, buf: BufId) -> DType;

    /// Whether ops of this backend compute on buffers of `dtype`: `f32` everywhere; on
    /// `CpuBackend<f64>` (the reference) also `f64`, and its `f32` buffers are held in `f64`.
    fn computes(&self, dtype: DType) -> bool;

    /// Whether convolutions and matrix products take inputs of `dtype` (accumulating in f32,
    /// results f32 or `dtype`), as mixed precision needs: bf16 and f16 on CUDA; none by default.
    fn computes_products_in(&self, dtype: DType) -> bool {
        let _ = dtype;
        false
    }

    /// Whether f32 convolutions and matrix products run on TF32 tensor cores: `Some(on)` on a
    /// backend that has the mode (CUDA, set when it is made), `None` where there is no such
    /// mode (CPU, wgpu: f32 arithmetic always).
    fn tf32(&self) -> Option<bool> {
        None
    }

    /// Whether plans for this backend fuse batch norm with the activation after it by default
    /// (`exec/fuse.rs`; `Executor::set_fusion` and `KILN_FUSION` decide otherwise): yes where
    /// the fused kernels have been checked on the device kind (CPU, wgpu).
    fn fuses_norm_activation(&self) -> bool {
        true
    }

    /// Releases a buffer's memory (after a plan failed part-way); the id must not be used again.
    fn free(&mut self, buf: BufId) -> Result<()>;

    /// Copies host values into a buffer (lengths must match). A float buffer takes values of
    /// any float dtype, rounded to its precision (`CpuBackend<f64>` keeps `f64` values whole);
    /// an integer buffer only values of its own dtype.
    fn write_host(&mut self, buf: BufId, data: HostSlice<'_>) -> Result<()>;

    /// Copies a buffer to the host as `dtype`: any float dtype from a float buffer (from the
    /// precision the buffer is held in), an integer buffer's own dtype.
    fn read_host(&mut self, buf: BufId, dtype: DType) -> Result<HostVec>;

    /// Copies `f32` values into a buffer ([`Backend::write_host`]).
    fn write(&mut self, buf: BufId, data: &[f32]) -> Result<()> {
        self.write_host(buf, HostSlice::F32(data))
    }

    /// Copies a float buffer to the host as `f32` ([`Backend::read_host`]).
    fn read(&mut self, buf: BufId) -> Result<Vec<f32>> {
        self.read_host(buf, DType::F32)?.into_f32()
    }

    /// Copies `f64` values into a buffer, at full precision where the backend computes in
    /// `f64` (the reference path); others round to their own precision.
    fn write_f64(&mut self, buf: BufId, data: &[f64]) -> Result<()> {
        self.write_host(buf, HostSlice::F64(data))
    }

    /// Reads a float buffer as `f64`.
    fn read_f64(&mut self, buf: BufId) -> Result<Vec<f64>> {
        self.read_host(buf, DType::F64)?.into_f64()
    }

    /// A new execution counter starting at zero.
    fn new_counter(&mut self) -> Result<CounterId>;

    /// The counter's current value.
    fn counter(&mut self, id: CounterId) -> Result<u64>;

    /// Sets a counter (restoring a checkpoint).
    fn set_counter(&mut self, id: CounterId, value: u64) -> Result<()>;

    /// Executes `ops` in order.
    fn run(&mut self, ops: &[Op]) -> Result<()>;

    /// Executes `ops` in order, where the caller promises that `key` always names this same op
    /// list (a plan's step). The CUDA backend runs the first call eagerly (the warm-up, where
    /// algorithm searches and workspace allocations happen), captures the second into a CUDA
    /// graph and replays that graph from then on. Backends without such a mechanism just run.
    fn run_cached(&mut self, key: u64, ops: &[Op]) -> Result<()> {
        let _ = key;
        self.run(ops)
    }

    /// Whether [`Backend::run_cached`] replays captured graphs (CUDA, unless told to run
    /// eagerly) rather than just running the ops.
    fn replays_graphs(&self) -> bool {
        false
    }

    /// Waits until all queued work has finished (for timing; reads already wait).
    fn synchronize(&mut self) -> Result<()> {
        Ok(())
    }

    /// Runs `ops` in order and returns each op's time in milliseconds (for profiles). Backends
    /// with device timers override this (CUDA: the ops queued back to back with an event between
    /// every two); the default times each op on the host between two synchronisations.
    fn profile(&mut self, ops: &[Op]) -> Result<Vec<f64>> {
        let mut times = Vec::with_capacity(ops.len());
        self.synchronize()?;
        for op in ops {
            let t = std::time::Instant::now();
            self.run(std::slice::from_ref(op))?;
            self.synchronize()?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(times)
    }

    /// The most device memory this backend has held at once, in bytes, where it tracks it.
    fn peak_memory(&self) -> Option<u64> {
        None
    }

    /// Bytes that can still be allocated, where the backend can tell. Plans larger than this
    /// are refused before any allocation: on a host that overcommits memory, an allocation
    /// larger than RAM "succeeds" and the process is killed when it is touched.
    fn available_memory(&self) -> Option<u64> {
        None
    }

    /// Makes this backend one rank of a data-parallel group: [`Op::AllReduce`] and
    /// synchronised batch norm then reduce over `comm`'s group (the CPU backend through `comm`
    /// itself; the CUDA backend through NCCL, which it sets up using `comm` to agree on an id).
    /// Every rank must call this. Backends without collectives refuse.
    fn set_communicator(&mut self, comm: Box<dyn Communicator>) -> Result<()> {
        Err(crate::Error::State(format!("{} cannot join a data-parallel group ({})", self.describe(), comm.describe())))
    }

    /// The group's communicator given to [`Backend::set_communicator`], for collectives on host
    /// values (parameters at the start, metrics).
    fn communicator(&mut self) -> Option<&mut dyn Communicator> {
        None
    }
}

/// A boxed backend is a backend, so `Executor<Box<dyn Backend>>` works for a device chosen at
/// run time ([`Device::open`]). Every method forwards, the defaults included, so the boxed
/// backend behaves exactly as the one inside.
impl Backend for Box<dyn Backend> {
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn alloc(&mut self, len: usize, dtype: DType) -> Result<BufId> {
        (**self).alloc(len, dtype)
    }
    fn len(&self, buf: BufId) -> usize {
        (**self).len(buf)
    }
    fn dtype(&self, buf: BufId) -> DType {
        (**self).dtype(buf)
    }
    fn computes(&self, dtype: DType) -> bool {
        (**self).computes(dtype)
    }
    fn computes_products_in(&self, dtype: DType) -> bool {
        (**self).computes_products_in(dtype)
    }
    fn tf32(&self) -> Option<bool> {
        (**self).tf32()
    }
    fn fuses_norm_activation(&self) -> bool {
        (**self).fuses_norm_activation()
    }
    fn write_host(&mut self, buf: BufId, data: HostSlice<'_>) -> Result<()> {
        (**self).write_host(buf, data)
    }
    fn read_host(&mut self, buf: BufId, dtype: DType) -> Result<HostVec> {
        (**self).read_host(buf, dtype)
    }
    fn free(&mut self, buf: BufId) -> Result<()> {
        (**self).free(buf)
    }
    fn write(&mut self, buf: BufId, data: &[f32]) -> Result<()> {
        (**self).write(buf, data)
    }
    fn read(&mut self, buf: BufId) -> Result<Vec<f32>> {
        (**self).read(buf)
    }
    fn write_f64(&mut self, buf: BufId, data: &[f64]) -> Result<()> {
        (**self).write_f64(buf, data)
    }
    fn read_f64(&mut self, buf: BufId) -> Result<Vec<f64>> {
        (**self).read_f64(buf)
    }
    fn new_counter(&mut self) -> Result<CounterId> {
        (**self).new_counter()
    }
    fn counter(&mut self, id: CounterId) -> Result<u64> {
        (**self).counter(id)
    }
    fn set_counter(&mut self, id: CounterId, value: u64) -> Result<()> {
        (**self).set_counter(id, value)
    }
    fn run(&mut self, ops: &[Op]) -> Result<()> {
        (**self).run(ops)
    }
    fn run_cached(&mut self, key: u64, ops: &[Op]) -> Result<()> {
        (**self).run_cached(key, ops)
    }
    fn synchronize(&mut self) -> Result<()> {
        (**self).synchronize()
    }
    fn replays_graphs(&self) -> bool {
        (**self).replays_graphs()
    }
    fn profile(&mut self, ops: &[Op]) -> Result<Vec<f64>> {
        (**self).profile(ops)
    }
    fn peak_memory(&self) -> Option<u64> {
        (**self).peak_memory()
    }
    fn available_memory(&self) -> Option<u64> {
        (**self).available_memory()
    }
    fn set_communicator(&mut self, comm: Box<dyn Communicator>) -> Result<()> {
        (**self).set_communicator(comm)
    }
    fn communicator(&mut self) -> Option<&mut dyn Communicator> {
        (**self).communicator()
    }
}
