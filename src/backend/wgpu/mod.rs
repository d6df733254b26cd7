//! The portable GPU backend: every op as a WGSL compute shader run through wgpu, so one code path
//! reaches Vulkan, Metal and DX12 (built with the `wgpu` cargo feature). Verified on Vulkan only:
//! Mesa's lavapipe (a CPU Vulkan driver, what CI runs) and the NVIDIA driver.
//!
//! - Buffers (`memory`): `f32` or `u32` (ops compute in `f32`), each a wgpu buffer of its own
//!   (wgpu's allocator places them in large device-memory blocks), so kernels bind their inputs
//!   read-only. [`WgpuBackend::with_arena`] (or `KILN_WGPU_ARENA=1`) makes them ranges of one large
//!   wgpu buffer instead (every buffer allocated before the next use: the parameters, training
//!   state and first plan of an executor share one), bound at aligned offsets and all read-write
//!   (wgpu tracks usage per buffer), which measured 1.5-1.8x slower on NVIDIA's Vulkan driver
//!   (NOTES.md, round 5). Host writes go through a ring of mapped staging buffers, copied at the
//!   start of the next submission.
//! - Ops: [`record`] turns an op list into a list of dispatches (pipeline, bind group, workgroup
//!   counts) and buffer copies; the kernels live by op family (`gemm`, `elementwise`, `norm`,
//!   `pool`, `loss`, `optim`), one Rust function per op, each with its WGSL.
//! - `run_cached`: the dispatch list of a plan's step (pipelines, bind groups, the parameters of
//!   every dispatch) is built once per key and kept; each step encodes it into one command
//!   buffer and submits it once (wgpu command buffers cannot be resubmitted, so re-encoding the
//!   kept list is wgpu's analogue of replaying a CUDA graph). Nothing is read back unless asked.
//!   Each recorded list holds its dispatches' parameters and its scratch in two buffers of its
//!   own.
//! - Counters (dropout steps, optimizer steps) live in device buffers and are advanced by
//!   kernels, so a resubmitted step needs nothing from the host.
//! - Determinism: no atomics; every reduction has a fixed assignment of values to threads and a
//!   fixed tree order, so results are identical run to run.
//!
//! Not done here: data-parallel groups (`AllReduce`, synchronised batch norm are refused with an
//! error naming the op) and `shader-f16`. Subgroup operations are requested where the adapter has
//! them and used by the reductions (`tuning` holds the kernel choices tests and tuning can force).
//!
//! `KILN_DEBUG=1` prints the adapter when the backend opens, and runs every op as its own
//! submission, waited for, printing its name, shapes and time (as the CPU backend does).
//! `KILN_WGPU_PROFILE=1` (where the adapter has timestamp queries) times every cached step op by
//! op on the device (each op in compute passes of its own, a timestamp at either end, the step
//! waited for) and prints each step's per-op medians and the sums by op kind when the backend is
//! dropped; `Backend::profile` (`kiln profile --device wgpu`) uses the same timestamps. NOTES.md
//! holds the measurements and what was predicted for them.

/// The entry point of a one-dimensional kernel (256 threads per workgroup), opening its body with
/// `i`, the invocation's flat index (see `record`'s conventions).
macro_rules! main1d {
    () => {
        "@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = gid(wg, nwg, li);
"
    };
}

/// The entry point of a kernel with one 256-thread workgroup per reduced group (a channel, a
/// sample): `grp` is the group, `li` the thread; `SH` holds 256 partial sums.
macro_rules! main_reduce {
    () => {
        "var<workgroup> SH: array<f32, 256>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let grp = wg.x + wg.y * nwg.x;
"
    };
}

/// A function `reduce(v, li) -> f32` for [`main_reduce`] kernels: the workgroup's sum of `v`, the
/// same tree every run (every thread of the workgroup must call it).
const REDUCE: &str = r#"
fn reduce(v: f32, li: u32) -> f32 {
    workgroupBarrier();
    SH[li] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s >> 1u) {
        if (li < s) { SH[li] = SH[li] + SH[li + s]; }
        workgroupBarrier();
    }
    let r = SH[0];
    workgroupBarrier();
    return r;
}
"#;

/// The registry's `RunOp` impls of the recorder, one line per op, each calling the op's function
/// in the file that invokes it: `runs! { Act => act, ActBackward => act_backward }`.
macro_rules! runs {
    ($($op:ident => $f:ident),* $(,)?) => {
        $(
            impl crate::backend::ops::RunOp<crate::backend::ops::$op> for super::record::Recorder<'_> {
                fn run_op(&mut self, o: &crate::backend::ops::$op) -> crate::Result<()> {
                    $f(self, o)
                }
            }
        )*
    };
}

mod elementwise;
mod gemm;
mod loss;
mod loss_scale;
mod memory;
mod norm;
mod optim;
mod pool;
mod record;
mod tuning;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::ops::{BufId, CounterId, Op};
use super::{Backend, DType, HostSlice, HostVec};
use crate::{Error, Result};
use record::{Kernel, Recorded, Recorder};

/// The longest a read or `synchronize` waits for the device.
const WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

/// What an adapter is, in the words `Device::Auto` and the tests use.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    /// The adapter's name (`NVIDIA H200`, `llvmpipe (LLVM 15.0.6, 256 bits)`).
    pub name: String,
    /// wgpu's backend (Vulkan, Metal, Dx12).
    pub backend: String,
    /// Whether it is a real GPU (discrete, integrated or virtual) rather than a CPU driver such
    /// as lavapipe.
    pub is_gpu: bool,
}

/// The wgpu backend's memory ([`WgpuBackend::memory`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgpuMemory {
    /// wgpu buffers holding the plan buffers (one per batch of allocations made before a use;
    /// more only where the adapter's `max_buffer_size` splits one).
    pub chunks: usize,
    /// Bytes those buffers hold.
    pub arena_bytes: u64,
    /// The largest plan buffer the adapter can bind, in bytes (larger ones are refused).
    pub max_buffer_bytes: u64,
    /// Bytes of the staging ring's mapped buffers (host-visible memory).
    pub staging_bytes: u64,
    /// Host writes copied through the staging ring so far.
    pub uploads: u64,
    /// Of those, writes that waited for the device to release a stage.
    pub waits: u64,
    /// Whether every plan buffer is a wgpu buffer of its own (the default: read-only bindings),
    /// rather than a range of a shared one ([`WgpuBackend::with_arena`]).
    pub dedicated: bool,
}

/// The wgpu backend (see the module docs).
pub struct WgpuBackend {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    /// Every plan buffer, as ranges of a few large wgpu buffers (see `memory`).
    arena: memory::Arena,
    /// Host writes go through it to the device (see `memory`).
    ring: memory::Ring,
    counters: Vec<wgpu::Buffer>,
    pipelines: HashMap<&'static str, wgpu::ComputePipeline>,
    cached: HashMap<u64, Recorded>,
    /// Validation and device errors reported by wgpu since they were last taken.
    errors: Arc<Mutex<Vec<String>>>,
    /// Most bytes of device memory held at once: the arena's chunks and the recorded lists'
    /// own buffers (parameters, scratch).
    peak: u64,
    debug: bool,
    /// Whether the device writes timestamps at compute-pass boundaries (`TIMESTAMP_QUERY`).
    timestamps: bool,
    /// `KILN_WGPU_PROFILE=1` (with timestamps): each cached step timed op by op, printed at drop.
    profile_log: Option<HashMap<u64, StepLog>>,
    /// Whether the device has subgroup operations (`SUBGROUP`), and the kernel choices in force.
    has_subgroups: bool,
    choice: tuning::Choice,
}

/// The per-op device times of one cached step, over the steps run under `KILN_WGPU_PROFILE=1`.
struct StepLog {
    names: Vec<String>,
    /// `times[op][run]`, milliseconds.
    times: Vec<Vec<f64>>,
    /// Host milliseconds to encode and submit each run.
    encode: Vec<f64>,
}

/// The process's one wgpu instance. Each backend opens its own device, but they share the
/// instance: on the NVIDIA Vulkan driver, a process that created and dropped a few dozen instances
/// (a test binary opening a backend per test) found no adapter on the next one.
fn instance() -> &'static wgpu::Instance {
    static INSTANCE: std::sync::OnceLock<wgpu::Instance> = std::sync::OnceLock::new();
    INSTANCE.get_or_init(|| {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
        desc.backends = wgpu::Backends::PRIMARY;
        wgpu::Instance::new(desc)
    })
}

fn summary(a: &wgpu::Adapter) -> AdapterSummary {
    let i = a.get_info();
    AdapterSummary {
        name: i.name.clone(),
        backend: format!("{:?}", i.backend),
        is_gpu: matches!(
            i.device_type,
            wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu | wgpu::DeviceType::VirtualGpu
        ),
    }
}

/// Every adapter wgpu finds (Vulkan, Metal, DX12), in the order `Device::Wgpu(i)` numbers them.
pub fn adapters() -> Vec<AdapterSummary> {
    pollster::block_on(instance().enumerate_adapters(wgpu::Backends::PRIMARY)).iter().map(summary).collect()
}

/// `KILN_WGPU_ARENA=1`: plan buffers as ranges of one wgpu buffer ([`WgpuBackend::with_arena`]).
fn one_arena_from_env() -> bool {
    std::env::var("KILN_WGPU_ARENA").is_ok_and(|v| v == "1")
}

fn device_error(ordinal: usize, reason: impl Into<String>) -> Error {
    Error::Device { device: format!("wgpu:{ordinal}"), reason: reason.into() }
}

impl WgpuBackend {
    /// Opens adapter `ordinal` of [`adapters`]; an error when there is no such adapter (no
    /// Vulkan/Metal/DX12 driver) or its device cannot be created.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_arena(ordinal, one_arena_from_env())
    }

    /// [`WgpuBackend::new`], with the plan buffers as ranges of one wgpu buffer (`one_arena`,
    /// every binding read-write) or each a wgpu buffer of its own (the default: read-only
    /// bindings where a kernel only reads).
    pub fn with_arena(ordinal: usize, one_arena: bool) -> Result<Self> {
        let list = pollster::block_on(instance().enumerate_adapters(wgpu::Backends::PRIMARY));
        if list.is_empty() {
            return Err(device_error(
                ordinal,
                "no wgpu adapter (no Vulkan, Metal or DX12 driver found; on Linux install a Vulkan \
                 driver, e.g. Debian's mesa-vulkan-drivers)",
            ));
        }
        let Some(adapter) = list.into_iter().nth(ordinal) else {
            return Err(device_error(ordinal, "no such adapter"));
        };
        Self::with_adapter(ordinal, adapter, one_arena)
    }

    /// Opens the first adapter that is a real GPU (not a CPU driver such as lavapipe), for
    /// `Device::Auto`; an error saying what was found when there is none.
    pub fn first_gpu() -> Result<Self> {
        let list = pollster::block_on(instance().enumerate_adapters(wgpu::Backends::PRIMARY));
        let names: Vec<String> = list.iter().map(|a| summary(a).name).collect();
        match list.into_iter().enumerate().find(|(_, a)| summary(a).is_gpu) {
            Some((i, a)) => Self::with_adapter(i, a, one_arena_from_env()),
            None if names.is_empty() => Err(device_error(0, "no wgpu adapter")),
            None => Err(device_error(0, format!("no wgpu GPU adapter (only CPU drivers: {})", names.join(", ")))),
        }
    }

    fn with_adapter(ordinal: usize, adapter: wgpu::Adapter, one_arena: bool) -> Result<Self> {
        let info = adapter.get_info();
        let limits = adapter.limits();
        let need = 10;
        if limits.max_storage_buffers_per_shader_stage < need {
            return Err(device_error(
                ordinal,
                format!(
                    "{} allows {} storage buffers per shader, kiln's kernels need {need}",
                    info.name, limits.max_storage_buffers_per_shader_stage
                ),
            ));
        }
        let timestamps = adapter.features().contains(wgpu::Features::TIMESTAMP_QUERY);
        let has_subgroups = adapter.features().contains(wgpu::Features::SUBGROUP);
        let mut features = wgpu::Features::empty();
        features.set(wgpu::Features::TIMESTAMP_QUERY, timestamps);
        features.set(wgpu::Features::SUBGROUP, has_subgroups);
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("kiln"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::default(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| device_error(ordinal, format!("{}: cannot create the device: {e}", info.name)))?;
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            sink.lock().unwrap_or_else(|p| p.into_inner()).push(e.to_string());
        }));
        let debug = std::env::var("KILN_DEBUG").is_ok_and(|v| v == "1");
        if debug {
            eprintln!("[kiln wgpu] {} ({:?}, {:?}, driver {})", info.name, info.backend, info.device_type, info.driver);
        }
        let profiling = std::env::var("KILN_WGPU_PROFILE").is_ok_and(|v| v == "1");
        if profiling && !timestamps {
            eprintln!("[kiln wgpu] KILN_WGPU_PROFILE=1 ignored: {} offers no timestamp queries", info.name);
        }
        Ok(WgpuBackend {
            device,
            queue,
            info,
            arena: memory::Arena::new(&limits, !one_arena),
            ring: memory::Ring::new(),
            counters: Vec::new(),
            pipelines: HashMap::new(),
            cached: HashMap::new(),
            errors,
            peak: 0,
            debug,
            timestamps,
            profile_log: (profiling && timestamps).then(HashMap::new),
            has_subgroups,
            choice: tuning::Choice::from_env(has_subgroups)?,
        })
    }

    /// The adapter this backend runs on.
    pub fn adapter(&self) -> AdapterSummary {
        AdapterSummary {
            name: self.info.name.clone(),
            backend: format!("{:?}", self.info.backend),
            is_gpu: !matches!(self.info.device_type, wgpu::DeviceType::Cpu | wgpu::DeviceType::Other),
        }
    }

    /// The errors wgpu reported since the last call, as one `Error` (none: `Ok`).
    fn take_errors(&self, what: &str) -> Result<()> {
        let mut e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if e.is_empty() {
            return Ok(());
        }
        let all = e.drain(..).collect::<Vec<_>>().join("; ");
        Err(Error::DeviceCall { call: format!("wgpu {what}"), status: all })
    }

    fn slot(&self, id: BufId) -> Result<&memory::Slot> {
        self.arena.slot(id.0)
    }

    /// How the backend's memory is laid out now and how host writes went (for tests and
    /// reports).
    pub fn memory(&self) -> WgpuMemory {
        WgpuMemory {
            dedicated: self.arena.dedicated(),
            chunks: self.arena.chunks(),
            arena_bytes: self.arena.current(),
            max_buffer_bytes: self.arena.max_binding(),
            staging_bytes: self.ring.bytes(),
            uploads: self.ring.uploads,
            waits: self.ring.waits,
        }
    }

    /// Creates the arena chunks of buffers allocated since the last use (see `memory`).
    fn materialize(&mut self) -> Result<()> {
        if self.arena.materialize(&self.device)? {
            self.take_errors("allocating the arena")?;
            self.note_peak(0);
        }
        Ok(())
    }

    /// Notes the memory held now (`extra`: a recorded list not in the cache) for the peak.
    fn note_peak(&mut self, extra: u64) {
        let lists: u64 = self.cached.values().map(|r| r.bytes()).sum();
        self.peak = self.peak.max(self.arena.current() + lists + extra);
    }

    /// Submits the staging ring's pending copies on their own, where there are any.
    fn flush_uploads(&mut self) {
        if !self.ring.pending() {
            return;
        }
        let mut enc =
            self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("kiln upload") });
        let taken = self.ring.take(&mut enc);
        let si = self.queue.submit([enc.finish()]);
        self.ring.submitted(taken, si);
    }

    /// Encodes with `encode` after the staging ring's pending copies, into one command buffer,
    /// and submits it.
    fn submit_encoded(&mut self, label: &str, encode: impl FnOnce(&mut wgpu::CommandEncoder)) {
        let mut enc = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
        let taken = self.ring.take(&mut enc);
        encode(&mut enc);
        let si = self.queue.submit([enc.finish()]);
        self.ring.submitted(taken, si);
    }

    /// The pipeline of `k`, compiled on first use.
    fn pipeline(&mut self, k: &Kernel) -> Result<wgpu::ComputePipeline> {
        if let Some(p) = self.pipelines.get(k.name) {
            return Ok(p.clone());
        }
        // With plan buffers as ranges of one wgpu buffer, every storage binding is declared
        // read-write: wgpu tracks usage per buffer, so a dispatch that binds one range read-only
        // and another read-write would be refused as a usage conflict. With a buffer each
        // (the default) the kernels keep their read-only bindings, which NVIDIA's
        // driver reads through its read-only cache path (NOTES.md, round 5).
        let source = if self.arena.dedicated() {
            k.source().to_string()
        } else {
            k.source().replace("var<storage, read>", "var<storage, read_write>")
        };
        let desc =
            wgpu::ShaderModuleDescriptor { label: Some(k.name), source: wgpu::ShaderSource::Wgsl(source.into()) };
        // wgpu bounds every shader loop with a hidden counter unless told the loops end; the
        // counter keeps drivers from unrolling them (the GEMM's 16-deep inner loop above all).
        // Bounds checks on every access and guarded integer division stay on.
        let mut checks = wgpu::ShaderRuntimeChecks::checked();
        checks.force_loop_bounding = false;
        // SAFETY: every loop in kiln's WGSL ends: `for` loops run to a bound given as a
        // parameter with a positive step, and the few `loop`s (the GEMM's depth states) subtract
        // a positive size (channels, output width or pixels of a validated op) until below it.
        let module = unsafe { self.device.create_shader_module_trusted(desc, checks) };
        let p = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(k.name),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        self.take_errors(&format!("shader {}", k.name))?;
        self.pipelines.insert(k.name, p.clone());
        Ok(p)
    }

    fn storage(&self, bytes: u64, label: &str) -> wgpu::Buffer {
        use wgpu::BufferUsages as U;
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(4).next_multiple_of(4),
            usage: U::STORAGE | U::COPY_SRC | U::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Copies `bytes` bytes of `src` from `offset` to the host, waiting for queued work.
    fn read_bytes(&mut self, src: &wgpu::Buffer, offset: u64, bytes: u64) -> Result<Vec<u8>> {
        let size = bytes.max(4).next_multiple_of(4);
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kiln read"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.submit_encoded("kiln read", |enc| enc.copy_buffer_to_buffer(src, offset, &staging, 0, size));
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        self.take_errors("read")?;
        rx.recv()
            .map_err(|_| Error::DeviceCall { call: "wgpu map_async".into(), status: "no answer".into() })?
            .map_err(|e| Error::DeviceCall { call: "wgpu map_async".into(), status: e.to_string() })?;
        let out = {
            let view = staging
                .get_mapped_range(..)
                .map_err(|e| Error::DeviceCall { call: "wgpu get_mapped_range".into(), status: e.to_string() })?;
            view[..bytes as usize].to_vec()
        };
        staging.unmap();
        Ok(out)
    }

    /// Waits for queued work, at most [`WAIT_LIMIT`]: a device that never finishes (a driver
    /// stuck in a shader) is an error, not a hang.
    fn wait(&self) -> Result<()> {
        let poll = wgpu::PollType::Wait { submission_index: None, timeout: Some(WAIT_LIMIT) };
        match self.device.poll(poll) {
            Ok(_) => Ok(()),
            Err(wgpu::PollError::Timeout) => Err(Error::DeviceCall {
                call: "wgpu poll".into(),
                status: format!("{} did not finish its queued work within {} s", self.info.name, WAIT_LIMIT.as_secs()),
            }),
            Err(e) => Err(Error::DeviceCall { call: "wgpu poll".into(), status: e.to_string() }),
        }
    }

    /// Validates, records and submits `ops` (from the cache under `key` when given); with
    /// `KILN_DEBUG=1` one op at a time, timed.
    fn submit(&mut self, key: Option<u64>, ops: &[Op]) -> Result<()> {
        if self.debug {
            for op in ops {
                let t = std::time::Instant::now();
                self.submit_list(None, std::slice::from_ref(op))?;
                self.synchronize()?;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                eprintln!("[kiln wgpu] {:<22} {:<48} {ms:>9.3} ms", op.name(), op.shapes());
            }
            return Ok(());
        }
        self.submit_list(key, ops)
    }

    /// The recorded form of `ops`: from the cache under `key`, or validated and recorded.
    fn recorded(&mut self, key: Option<u64>, ops: &[Op]) -> Result<Recorded> {
        if let Some(r) = key.and_then(|k| self.cached.remove(&k)) {
            return Ok(r);
        }
        self.materialize()?;
        for op in ops {
            let info = |b: BufId| self.arena.slot(b.0).ok().map(|s| (s.len, s.dtype));
            op.validate(info, |d| d == DType::F32)?;
        }
        let mut rec = Recorder::new(self);
        for op in ops {
            rec.op(op)?;
        }
        let r = rec.finish()?;
        self.take_errors("recording")?;
        self.note_peak(r.bytes());
        Ok(r)
    }

    fn submit_list(&mut self, key: Option<u64>, ops: &[Op]) -> Result<()> {
        let recorded = self.recorded(key, ops)?;
        match (key, self.profile_log.is_some()) {
            (Some(k), true) => {
                let t = std::time::Instant::now();
                let times = self.timed(&recorded)?;
                let log = self.profile_log.get_or_insert_with(HashMap::new);
                let entry = log.entry(k).or_insert_with(|| StepLog {
                    names: recorded.op_names().map(String::from).collect(),
                    times: vec![Vec::new(); times.len()],
                    encode: Vec::new(),
                });
                entry.encode.push(t.elapsed().as_secs_f64() * 1e3 - times.iter().sum::<f64>());
                for (all, t) in entry.times.iter_mut().zip(times) {
                    all.push(t);
                }
            }
            _ => {
                self.submit_encoded("kiln step", |enc| recorded.encode(enc));
                self.take_errors("submit")?;
            }
        }
        if let Some(k) = key {
            self.cached.insert(k, recorded);
        }
        Ok(())
    }

    /// Runs `recorded` once with a timestamp pair around each op and waits: each op's device
    /// time in milliseconds.
    fn timed(&mut self, recorded: &Recorded) -> Result<Vec<f64>> {
        let n = recorded.op_names().count();
        if n == 0 {
            return Ok(Vec::new());
        }
        if 2 * n > wgpu::QUERY_SET_MAX_QUERIES as usize {
            return Err(Error::State(format!(
                "wgpu: cannot time {n} ops in one list (at most {})",
                wgpu::QUERY_SET_MAX_QUERIES / 2
            )));
        }
        let queries = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("kiln profile"),
            ty: wgpu::QueryType::Timestamp,
            count: 2 * n as u32,
        });
        let bytes = (16 * n) as u64;
        let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kiln timestamps"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        self.submit_encoded("kiln timed", |enc| recorded.encode_timed(enc, &queries, &resolve));
        self.take_errors("timed submit")?;
        let raw = self.read_bytes(&resolve, 0, bytes)?;
        let ticks: Vec<u64> = raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
        let ns = self.queue.get_timestamp_period() as f64;
        Ok(ticks.chunks_exact(2).map(|p| p[1].saturating_sub(p[0]) as f64 * ns / 1e6).collect())
    }
}

/// The median of `v` (0 for none).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

impl Drop for WgpuBackend {
    /// Prints what `KILN_WGPU_PROFILE=1` measured: per cached step, each op's median device time
    /// and the sums by op kind.
    fn drop(&mut self) {
        let Some(log) = self.profile_log.take() else { return };
        for (key, l) in log {
            let runs = l.encode.len();
            let per_op: Vec<f64> = l.times.iter().map(|t| median(t)).collect();
            let total: f64 = per_op.iter().sum();
            eprintln!(
                "[kiln wgpu profile] {} step {key}: {runs} runs, {} ops, device {total:.3} ms per step (sum of op \
                 medians), host encode+wait overhead {:.3} ms (median)",
                self.info.name,
                per_op.len(),
                median(&l.encode)
            );
            let mut kinds: Vec<(String, f64, usize)> = Vec::new();
            for (name, ms) in l.names.iter().zip(&per_op) {
                eprintln!("[kiln wgpu profile]   {ms:>9.4} ms  {name}");
                let kind = name.split_whitespace().next().unwrap_or("").to_string();
                match kinds.iter_mut().find(|(k, _, _)| *k == kind) {
                    Some(e) => {
                        e.1 += ms;
                        e.2 += 1;
                    }
                    None => kinds.push((kind, *ms, 1)),
                }
            }
            kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
            for (kind, ms, count) in kinds {
                eprintln!(
                    "[kiln wgpu profile] by kind {kind:<24} {ms:>9.4} ms ({count} ops, {:.1}%)",
                    100.0 * ms / total.max(1e-12)
                );
            }
        }
    }
}

/// Host values as little-endian bytes.
fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Backend for WgpuBackend {
    fn describe(&self) -> String {
        format!("wgpu {} ({:?}, {:?})", self.info.name, self.info.backend, self.info.device_type)
    }

    /// Places the buffer in the arena (see `memory`): its memory is created, zeroed, with the
    /// other buffers allocated before the next use.
    fn alloc(&mut self, len: usize, dtype: DType) -> Result<BufId> {
        if !matches!(dtype, DType::F32 | DType::U32) {
            return Err(Error::State(format!("the wgpu backend holds float32 and uint32 buffers, not {dtype}")));
        }
        Ok(BufId(self.arena.alloc(len, dtype)?))
    }

    fn len(&self, buf: BufId) -> usize {
        self.slot(buf).map(|s| s.len).unwrap_or(0)
    }

    fn dtype(&self, buf: BufId) -> DType {
        self.slot(buf).map(|s| s.dtype).unwrap_or(DType::F32)
    }

    fn computes(&self, dtype: DType) -> bool {
        dtype == DType::F32
    }

    fn free(&mut self, buf: BufId) -> Result<()> {
        self.arena.free(buf.0);
        self.cached.clear();
        Ok(())
    }

    fn write_host(&mut self, buf: BufId, data: HostSlice<'_>) -> Result<()> {
        let slot = self.slot(buf)?;
        if slot.len != data.len() {
            return Err(Error::shape("buffer write", slot.len, data.len()));
        }
        let bytes = match slot.dtype {
            DType::F32 => match data {
                HostSlice::F32(v) => f32_bytes(v),
                other => f32_bytes(&other.convert(DType::F32)?.into_f32()?),
            },
            _ => match data.convert(DType::U32)? {
                HostVec::U32(v) => u32_bytes(&v),
                other => return Err(Error::State(format!("wgpu: cannot write {} into uint32", other.dtype()))),
            },
        };
        if bytes.is_empty() {
            return Ok(());
        }
        if !self.arena.materialized(slot) {
            return self.arena.write_pending(buf.0, bytes);
        }
        let (dst, offset) = (self.arena.buffer(slot)?.clone(), slot.offset);
        self.ring.write(&self.device, &self.queue, WAIT_LIMIT, (&dst, offset), &bytes)?;
        self.take_errors("write")
    }

    fn read_host(&mut self, buf: BufId, dtype: DType) -> Result<HostVec> {
        self.materialize()?;
        let slot = self.slot(buf)?;
        let (len, own, offset) = (slot.len, slot.dtype, slot.offset);
        let src = self.arena.buffer(slot)?.clone();
        let raw = self.read_bytes(&src, offset, (len * 4) as u64)?;
        let words = raw.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]);
        let host = match own {
            DType::F32 => HostVec::F32(words.map(f32::from_le_bytes).collect()),
            _ => HostVec::U32(words.map(u32::from_le_bytes).collect()),
        };
        host.as_slice().convert(dtype)
    }

    fn new_counter(&mut self) -> Result<CounterId> {
        let b = self.storage(8, "kiln counter");
        self.counters.push(b);
        Ok(CounterId(self.counters.len() - 1))
    }

    fn counter(&mut self, id: CounterId) -> Result<u64> {
        let b = self.counters.get(id.0).ok_or_else(|| Error::State(format!("wgpu: no counter {}", id.0)))?.clone();
        let raw = self.read_bytes(&b, 0, 8)?;
        Ok(u64::from_le_bytes(raw[..8].try_into().expect("8 bytes read")))
    }

    fn set_counter(&mut self, id: CounterId, value: u64) -> Result<()> {
        let b = self.counters.get(id.0).ok_or_else(|| Error::State(format!("wgpu: no counter {}", id.0)))?;
        self.queue.write_buffer(b, 0, &value.to_le_bytes());
        self.take_errors("set_counter")
    }

    fn run(&mut self, ops: &[Op]) -> Result<()> {
        self.submit(None, ops)
    }

    fn run_cached(&mut self, key: u64, ops: &[Op]) -> Result<()> {
        self.submit(Some(key), ops)
    }

    fn synchronize(&mut self) -> Result<()> {
        self.flush_uploads();
        self.wait()?;
        self.take_errors("synchronize")
    }

    /// Each op's device time from timestamp queries around it (one list, one submission), where
    /// the adapter has them; otherwise host times around one submission per op.
    fn profile(&mut self, ops: &[Op]) -> Result<Vec<f64>> {
        if !self.timestamps {
            let mut times = Vec::with_capacity(ops.len());
            self.synchronize()?;
            for op in ops {
                let t = std::time::Instant::now();
                self.submit_list(None, std::slice::from_ref(op))?;
                self.synchronize()?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            return Ok(times);
        }
        let recorded = self.recorded(None, ops)?;
        self.timed(&recorded)
    }

    fn peak_memory(&self) -> Option<u64> {
        Some(self.peak)
    }
}
