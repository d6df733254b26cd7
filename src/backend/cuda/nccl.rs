//! NCCL, the CUDA backend's collectives: the library loaded at run time and checked first, the
//! [`NcclCommunicator`] (a [`Communicator`] of its own, and what the backend's all-reduces go
//! through), and the backend's side of data-parallel steps ([`Collectives`]).
//!
//! Loading: NCCL's functions are resolved here, from the library found under its soname
//! `libnccl.so.2` (on the loader's path, else in the folders `loader.rs` searches, which include
//! the `nvidia/nccl/lib` folder of PyTorch's wheels). cudarc's `nccl` feature gives the types
//! (`ncclUniqueId`, `ncclComm_t`, the data-type and reduction enums) but not the calls: its
//! loader looks for `libnccl.so` and `libnccl.so.{9..13,1}`, not `.so.2`, panics when none is
//! there, and returns `ncclResult_t` as a Rust enum, which a newer NCCL's new status code would
//! make undefined behaviour. Here a missing library or function is an [`Error::Device`], and
//! statuses are plain integers. Before the library is loaded `NCCL_NVLS_ENABLE=0` is set
//! (unless it already is): NVLink multicast stays off.
//!
//! Failure: communicators are created non-blocking, so initialisation can be given up after
//! the timeout; a watchdog thread polls NCCL's asynchronous error and the completion of the
//! last queued step that contains collectives, and aborts the communicator (which releases the
//! GPU kernels waiting for a peer) when NCCL reports an error or a step is older than the
//! timeout. Every later use then fails with [`Error::Dist`] saying why.
//!
//! Overlap: the backend queues each bucket's all-reduce on this communicator's own stream,
//! which waits (an event) for the compute stream to have written the bucket; the compute
//! stream waits for the reduction (another event) only before the first op that touches a
//! buffer still being reduced, and at the end of every op list. Inside a CUDA graph capture the
//! same events fork the second stream from the captured one and join it back, so the step's
//! graph holds the overlap. Every NCCL operation of a communicator goes through that one stream,
//! in the order the ops are queued, which is the same on every rank.

use std::collections::HashSet;
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cudarc::driver::sys;
use cudarc::nccl::sys::{ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};
use libloading::Library;

use super::driver::{Event, Gpu, drv};
use crate::backend::Communicator;
use crate::backend::ops::RunOp;
use crate::backend::ops::{self, BufId, Op};
use crate::{Error, Result};

/// An NCCL status (`ncclResult_t`), kept as the integer it is.
type Status = c_uint;
const SUCCESS: Status = 0;
const IN_PROGRESS: Status = 7;

/// The oldest NCCL whose configuration structure [`Config`] matches (2.18, with `splitShare`).
const MIN_VERSION: c_int = 21800;

/// `ncclConfig_t` as NCCL 2.18's header defines it; newer NCCLs accept it (they read as many
/// fields as `size` and `version` say).
#[repr(C)]
struct Config {
    size: usize,
    magic: c_uint,
    version: c_uint,
    blocking: c_int,
    cga_cluster_size: c_int,
    min_ctas: c_int,
    max_ctas: c_int,
    net_name: *const c_char,
    split_share: c_int,
}

/// `NCCL_CONFIG_UNDEF_INT`: leave the field at NCCL's default.
const UNDEF: c_int = c_int::MIN;

type Stream = sys::CUstream;

/// The NCCL functions kiln calls, resolved from the library.
struct Api {
    _lib: Library,
    path: String,
    version: c_int,
    get_unique_id: unsafe extern "C" fn(*mut ncclUniqueId) -> Status,
    init_rank_config: unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int, *mut Config) -> Status,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        ncclRedOp_t,
        ncclComm_t,
        Stream,
    ) -> Status,
    broadcast:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, c_int, ncclComm_t, Stream) -> Status,
    group_start: unsafe extern "C" fn() -> Status,
    group_end: unsafe extern "C" fn() -> Status,
    get_async_error: unsafe extern "C" fn(ncclComm_t, *mut Status) -> Status,
    abort: unsafe extern "C" fn(ncclComm_t) -> Status,
    finalize: unsafe extern "C" fn(ncclComm_t) -> Status,
    destroy: unsafe extern "C" fn(ncclComm_t) -> Status,
    error_string: unsafe extern "C" fn(Status) -> *const c_char,
    last_error: unsafe extern "C" fn(ncclComm_t) -> *const c_char,
}

static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();

/// NCCL, loaded and checked once per process.
fn api() -> Result<&'static Api> {
    API.get_or_init(load).as_ref().map_err(|e| Error::Device { device: "nccl".into(), reason: e.clone() })
}

/// Where NCCL was found and its version (`(2, 28, 9)`), or why it cannot be used. Loads it.
pub fn nccl_version() -> Result<(String, (u32, u32, u32))> {
    let a = api()?;
    let v = a.version as u32;
    Ok((a.path.clone(), (v / 10000, v / 100 % 100, v % 100)))
}

/// Sets `NCCL_NVLS_ENABLE=0` unless it is already `0`.
fn disable_nvls() {
    if std::env::var("NCCL_NVLS_ENABLE").is_ok_and(|v| v.trim() == "0") {
        return;
    }
    if let Ok(v) = std::env::var("NCCL_NVLS_ENABLE") {
        eprintln!("kiln: NCCL_NVLS_ENABLE={v} overridden to 0 (NVLink multicast stays off)");
    }
    // SAFETY: done once per process, before NCCL is loaded (so NCCL reads it at its start). Rust
    // code reads the environment under std's lock; C code of another thread calling getenv at
    // this very moment could race, which is why `kiln launch` sets the variable for every
    // worker from the start: there this line is never reached.
    unsafe { std::env::set_var("NCCL_NVLS_ENABLE", "0") };
}

fn load() -> std::result::Result<Api, String> {
    disable_nvls();
    const NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];
    // SAFETY (both opens): loading NCCL runs its initialisers, which is what using it means.
    let by_name = NAMES.iter().find_map(|&n| unsafe { Library::new(n) }.ok().map(|l| (l, n.to_string())));
    let found =
        by_name.or_else(|| {
            super::loader::search_dirs().iter().flat_map(|d| NAMES.map(|n| d.join(n))).filter(|p| p.is_file()).find_map(
                |p: std::path::PathBuf| unsafe { Library::new(&p) }.ok().map(|l| (l, p.display().to_string())),
            )
        });
    let (lib, path) = found.ok_or_else(|| {
        "NCCL (libnccl.so.2) was not found: install NCCL or the nvidia-nccl wheel (PyTorch's), or set \
         KILN_CUDA_LIBRARY_PATH"
            .to_string()
    })?;
    let mut missing = Vec::new();
    macro_rules! get {
        ($name:literal) => {{
            // SAFETY: the symbol is used with the signature NCCL's header gives it (the field's type).
            match unsafe { lib.get($name.as_bytes()) } {
                Ok(s) => Some(*s),
                Err(_) => {
                    missing.push($name);
                    None
                }
            }
        }};
    }
    let get_version: Option<unsafe extern "C" fn(*mut c_int) -> Status> = get!("ncclGetVersion");
    let fns = (
        get!("ncclGetUniqueId"),
        get!("ncclCommInitRankConfig"),
        get!("ncclAllReduce"),
        get!("ncclBroadcast"),
        get!("ncclGroupStart"),
        get!("ncclGroupEnd"),
        get!("ncclCommGetAsyncError"),
        get!("ncclCommAbort"),
        get!("ncclCommFinalize"),
        get!("ncclCommDestroy"),
        get!("ncclGetErrorString"),
        get!("ncclGetLastError"),
    );
    let (
        (Some(get_version), Some(get_unique_id), Some(init_rank_config), Some(all_reduce), Some(broadcast)),
        (Some(group_start), Some(group_end), Some(get_async_error), Some(abort), Some(finalize), Some(destroy)),
        (Some(error_string), Some(last_error)),
    ) = ((get_version, fns.0, fns.1, fns.2, fns.3), (fns.4, fns.5, fns.6, fns.7, fns.8, fns.9), (fns.10, fns.11))
    else {
        return Err(format!("{path} lacks {} (too old a version?)", missing.join(", ")));
    };
    let mut version = 0;
    // SAFETY: an out-pointer to a local.
    let r = unsafe { get_version(&mut version) };
    if r != SUCCESS || version < MIN_VERSION {
        return Err(format!("{path} is NCCL version {version}; kiln needs 2.18 or newer"));
    }
    Ok(Api {
        _lib: lib,
        path,
        version,
        get_unique_id,
        init_rank_config,
        all_reduce,
        broadcast,
        group_start,
        group_end,
        get_async_error,
        abort,
        finalize,
        destroy,
        error_string,
        last_error,
    })
}

impl Api {
    /// A status as an error naming the call, with NCCL's last message where there is a comm.
    fn check(&self, call: &str, comm: Option<ncclComm_t>, r: Status) -> Result<()> {
        if r == SUCCESS || r == IN_PROGRESS {
            return Ok(());
        }
        Err(Error::DeviceCall { call: call.into(), status: self.describe(comm, r) })
    }

    fn describe(&self, comm: Option<ncclComm_t>, r: Status) -> String {
        let text = |p: *const c_char| {
            // SAFETY: NCCL returns NUL-terminated strings it owns (or null).
            (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        };
        // SAFETY: both return pointers to strings NCCL keeps.
        let name = text(unsafe { (self.error_string)(r) }).unwrap_or_else(|| format!("ncclResult {r}"));
        let detail = comm.and_then(|c| text(unsafe { (self.last_error)(c) })).filter(|d| !d.is_empty());
        match detail {
            Some(d) => format!("{name} ({d})"),
            None => name,
        }
    }

    /// Waits until `comm` has no operation in progress (non-blocking communicators), at most
    /// until `deadline`.
    fn wait_ready(&self, comm: ncclComm_t, deadline: Instant, what: &str) -> Result<()> {
        let mut spins = 0u32;
        loop {
            let mut state = SUCCESS;
            // SAFETY: a live communicator and an out-pointer to a local.
            self.check("ncclCommGetAsyncError", Some(comm), unsafe { (self.get_async_error)(comm, &mut state) })?;
            match state {
                SUCCESS => return Ok(()),
                IN_PROGRESS if Instant::now() < deadline => {
                    spins += 1;
                    if spins < 1000 { std::thread::yield_now() } else { std::thread::sleep(Duration::from_millis(1)) }
                }
                IN_PROGRESS => return Err(Error::dist(what.to_string(), "NCCL did not finish within the timeout")),
                r => {
                    return Err(Error::DeviceCall { call: what.into(), status: self.describe(Some(comm), r) });
                }
            }
        }
    }
}

/// The raw handles the watchdog thread uses; only through NCCL's and the driver's thread-safe
/// calls (`ncclCommGetAsyncError`, `ncclCommAbort`, `cuEventQuery`).
struct Handles {
    comm: ncclComm_t,
    ctx: sys::CUcontext,
}

// SAFETY: see `Handles`: the calls made with these handles from the watchdog thread are the
// ones NCCL and CUDA document as safe to make from another thread.
unsafe impl Send for Handles {}

/// What the watchdog and the communicator share.
struct WatchState {
    /// The event recorded after the last queued work holding collectives.
    event: Option<Event>,
    /// When it was recorded, while that work has not been seen to finish.
    since: Option<Instant>,
    /// Why the communicator was aborted.
    failure: Option<String>,
    stop: bool,
}

// SAFETY: the event is only recorded (by the owner) and queried (by the watchdog) under the
// mutex; CUDA allows both from any thread with the context current.
unsafe impl Send for WatchState {}

struct Watch {
    state: Mutex<WatchState>,
    wake: Condvar,
}

impl Watch {
    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The watchdog: every 100 ms, NCCL's asynchronous error and the age of the last queued step.
fn watchdog(api: &'static Api, h: Handles, watch: Arc<Watch>, timeout: Duration, context: String) {
    // SAFETY: the primary context outlives the communicator, which joins this thread on drop.
    let _ = unsafe { drv!(cuCtxSetCurrent(h.ctx)) };
    let mut st = watch.lock();
    loop {
        if st.stop || st.failure.is_some() {
            return;
        }
        let mut state = SUCCESS;
        // SAFETY: the communicator is live until this thread is joined.
        let r = unsafe { (api.get_async_error)(h.comm, &mut state) };
        let mut why = None;
        if r != SUCCESS {
            why = Some(format!("ncclCommGetAsyncError failed: {}", api.describe(None, r)));
        } else if state != SUCCESS && state != IN_PROGRESS {
            why = Some(format!("NCCL reported {}", api.describe(Some(h.comm), state)));
        } else if let (Some(ev), Some(since)) = (&st.event, st.since) {
            match ev.done() {
                Ok(true) => st.since = None,
                Ok(false) if since.elapsed() > timeout => {
                    why = Some(format!(
                        "a step's collectives did not finish within {:.0} s (a rank stopped, hung or diverged)",
                        timeout.as_secs_f64()
                    ))
                }
                Ok(false) => {}
                Err(e) => why = Some(format!("the device failed: {e}")),
            }
        }
        if let Some(why) = why {
            eprintln!("kiln: {context}: {why}; aborting the NCCL communicator");
            // SAFETY: aborting from another thread is what ncclCommAbort is for; the owner makes
            // no NCCL call without this lock and none at all once `failure` is set.
            unsafe { (api.abort)(h.comm) };
            st.failure = Some(why);
            return;
        }
        st = watch.wake.wait_timeout(st, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner()).0;
    }
}

/// A group's NCCL communicator on one GPU: the collectives of [`Communicator`] on host values
/// (copied through device memory), and the device-buffer all-reduces the CUDA backend queues.
///
/// Made from a bootstrap communicator of the same group (normally the TCP one), through which
/// rank 0 hands the others NCCL's id.
pub struct NcclCommunicator {
    api: &'static Api,
    comm: ncclComm_t,
    rank: usize,
    world: usize,
    timeout: Duration,
    watch: Arc<Watch>,
    watcher: Option<JoinHandle<()>>,
    /// Device memory for the host-value collectives.
    scratch: (sys::CUdeviceptr, usize),
    /// This communicator's context and its own stream, on which every NCCL operation goes.
    gpu: Gpu,
}

// SAFETY: the handles are used through `&mut self` (and the watchdog's documented calls); each
// entry point makes the context current first.
unsafe impl Send for NcclCommunicator {}

impl NcclCommunicator {
    /// The NCCL communicator of `bootstrap`'s group on GPU `ordinal`. Every rank must call this
    /// at the same time; it fails (never hangs) when the others do not within the bootstrap's
    /// timeout, and with [`Error::Device`] when NCCL is not installed.
    pub fn new(ordinal: usize, bootstrap: &mut dyn Communicator) -> Result<NcclCommunicator> {
        let api = api()?;
        let gpu = Gpu::open(ordinal)?;
        let (rank, world, timeout) = (bootstrap.rank(), bootstrap.world(), bootstrap.timeout());
        let context = format!("rank {rank} of {world}, NCCL on cuda:{ordinal}");
        let mut id = ncclUniqueId { internal: [0; 128] };
        if rank == 0 {
            // SAFETY: an out-pointer to a local.
            api.check("ncclGetUniqueId", None, unsafe { (api.get_unique_id)(&mut id) })?;
        }
        if world > 1 {
            // The 128 bytes travel as 32 f32 bit patterns (copied, never computed with).
            let mut packed: Vec<f32> = id
                .internal
                .chunks_exact(4)
                .map(|b| f32::from_bits(u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])))
                .collect();
            bootstrap.broadcast(&mut packed, 0)?;
            for (dst, v) in id.internal.chunks_exact_mut(4).zip(&packed) {
                for (d, b) in dst.iter_mut().zip(v.to_bits().to_le_bytes()) {
                    *d = b as c_char;
                }
            }
        }
        let mut config = Config {
            size: std::mem::size_of::<Config>(),
            magic: 0xcafe_beef,
            version: MIN_VERSION as c_uint,
            blocking: 0,
            cga_cluster_size: UNDEF,
            min_ctas: UNDEF,
            max_ctas: UNDEF,
            net_name: std::ptr::null(),
            split_share: UNDEF,
        };
        let mut comm: ncclComm_t = std::ptr::null_mut();
        gpu.bind()?;
        // SAFETY: out-pointer to a local, an id from rank 0, a config that lives across the call.
        let r = unsafe { (api.init_rank_config)(&mut comm, world as c_int, id, rank as c_int, &mut config) };
        let ready = api
            .check("ncclCommInitRankConfig", None, r)
            .and_then(|_| api.wait_ready(comm, Instant::now() + timeout, &format!("{context}: initialisation")));
        if let Err(e) = ready {
            if !comm.is_null() {
                // SAFETY: a communicator being initialised may be aborted.
                unsafe { (api.abort)(comm) };
            }
            return Err(e);
        }
        let watch = Arc::new(Watch {
            state: Mutex::new(WatchState { event: None, since: None, failure: None, stop: false }),
            wake: Condvar::new(),
        });
        let handles = Handles { comm, ctx: gpu.ctx };
        let (w, ctx) = (watch.clone(), context.clone());
        let watcher = std::thread::Builder::new()
            .name(format!("kiln-nccl-watch-{rank}"))
            .spawn(move || watchdog(api, handles, w, timeout, ctx))
            .map_err(|e| Error::dist(context.clone(), format!("cannot start the watchdog thread: {e}")))?;
        Ok(NcclCommunicator { api, comm, rank, world, timeout, watch, watcher: Some(watcher), scratch: (0, 0), gpu })
    }

    fn context(&self) -> String {
        format!("rank {} of {}, NCCL on cuda:{}", self.rank, self.world, self.gpu.ordinal)
    }

    /// The stream every NCCL operation of this communicator goes on.
    pub(super) fn stream(&self) -> Stream {
        self.gpu.stream
    }

    /// An error if the watchdog aborted the communicator.
    pub(super) fn check_alive(&self) -> Result<()> {
        match &self.watch.lock().failure {
            Some(why) => Err(Error::dist(self.context(), format!("the communicator was aborted: {why}"))),
            None => Ok(()),
        }
    }

    /// Queues the all-reduce of device buffers `(pointer, values)` on [`Self::stream`], as one
    /// NCCL group.
    pub(super) fn enqueue_all_reduce(
        &self,
        bufs: &[(sys::CUdeviceptr, usize)],
        dtype: ncclDataType_t,
        op: ncclRedOp_t,
    ) -> Result<()> {
        let st = self.watch.lock();
        if let Some(why) = &st.failure {
            return Err(Error::dist(self.context(), format!("the communicator was aborted: {why}")));
        }
        let a = self.api;
        // SAFETY: the buffers are device allocations of at least `n` values of `dtype` (the
        // backend checked the op's extents); the stream and communicator are live; no abort can
        // happen while the lock is held.
        unsafe {
            a.check("ncclGroupStart", Some(self.comm), (a.group_start)())?;
            let mut queued = Ok(());
            for &(p, n) in bufs.iter().filter(|b| b.1 > 0) {
                let r = (a.all_reduce)(p as *const c_void, p as *mut c_void, n, dtype, op, self.comm, self.gpu.stream);
                queued = a.check("ncclAllReduce", Some(self.comm), r);
                if queued.is_err() {
                    break;
                }
            }
            let ended = a.check("ncclGroupEnd", Some(self.comm), (a.group_end)());
            queued.and(ended)?;
        }
        a.wait_ready(self.comm, Instant::now() + self.timeout, &self.context())?;
        drop(st);
        Ok(())
    }

    /// Records, on `stream`, the point after which no collective of the queued work is left,
    /// for the watchdog to time.
    pub(super) fn watch_after(&self, stream: Stream) -> Result<()> {
        let mut st = self.watch.lock();
        if st.event.is_none() {
            st.event = Some(Event::new(false)?);
        }
        st.event.as_ref().expect("made above").record(stream)?;
        st.since = Some(Instant::now());
        Ok(())
    }

    /// Device scratch of at least `bytes`.
    fn scratch(&mut self, bytes: usize) -> Result<sys::CUdeviceptr> {
        if bytes > self.scratch.1 {
            if self.scratch.0 != 0 {
                self.gpu.sync()?;
                // SAFETY: allocated below by an earlier call; the stream no longer uses it.
                unsafe { drv!(cuMemFree_v2(self.scratch.0))? };
                self.scratch = (0, 0);
            }
            let size = bytes.next_multiple_of(1 << 16);
            let mut p = 0;
            // SAFETY: out-pointer to a local; the context is current.
            unsafe { drv!(cuMemAlloc_v2(&mut p, size))? };
            self.scratch = (p, size);
        }
        Ok(self.scratch.0)
    }

    /// Waits for this communicator's stream, at most the timeout (then aborts).
    fn wait_stream(&self) -> Result<()> {
        let ev = Event::new(false)?;
        ev.record(self.gpu.stream)?;
        let deadline = Instant::now() + self.timeout;
        while !ev.done()? {
            self.check_alive()?;
            if Instant::now() >= deadline {
                let mut st = self.watch.lock();
                if st.failure.is_none() {
                    // SAFETY: under the lock, as the watchdog does.
                    unsafe { (self.api.abort)(self.comm) };
                    st.failure = Some("a collective did not finish within the timeout".into());
                }
                drop(st);
                return self.check_alive();
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// A host-value collective: `data` to the device, `run` on the stream, back to the host.
    fn on_device<T: Copy>(
        &mut self,
        data: &mut [T],
        run: impl FnOnce(&Self, sys::CUdeviceptr) -> Result<()>,
    ) -> Result<()> {
        self.check_alive()?;
        self.gpu.bind()?;
        let bytes = std::mem::size_of_val(data);
        let p = self.scratch(bytes.max(8))?;
        // SAFETY: `p` holds at least `bytes`; a pageable source is copied before the call returns.
        unsafe { drv!(cuMemcpyHtoDAsync_v2(p, data.as_ptr() as *const c_void, bytes, self.gpu.stream))? };
        run(self, p)?;
        self.wait_stream()?;
        // SAFETY: the stream is idle; `data` has room for `bytes`.
        unsafe { drv!(cuMemcpyDtoH_v2(data.as_mut_ptr() as *mut c_void, p, bytes)) }
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        let n = data.len();
        self.on_device(data, |c, p| c.enqueue_all_reduce(&[(p, n)], ncclDataType_t::ncclFloat32, ncclRedOp_t::ncclSum))
    }

    fn all_reduce_sum_f64(&mut self, data: &mut [f64]) -> Result<()> {
        let n = data.len();
        self.on_device(data, |c, p| c.enqueue_all_reduce(&[(p, n)], ncclDataType_t::ncclFloat64, ncclRedOp_t::ncclSum))
    }

    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<()> {
        if root >= self.world {
            return Err(Error::dist(self.context(), format!("root {root} is not a rank of the group")));
        }
        let n = data.len();
        self.on_device(data, |c, p| {
            let st = c.watch.lock();
            let a = c.api;
            // SAFETY: `p` holds `n` floats; live stream and communicator; lock held (no abort).
            let r = unsafe {
                (a.broadcast)(
                    p as *const c_void,
                    p as *mut c_void,
                    n,
                    ncclDataType_t::ncclFloat32,
                    root as c_int,
                    c.comm,
                    c.gpu.stream,
                )
            };
            a.check("ncclBroadcast", Some(c.comm), r)?;
            a.wait_ready(c.comm, Instant::now() + c.timeout, &c.context())?;
            drop(st);
            Ok(())
        })
    }

    fn barrier(&mut self) -> Result<()> {
        self.all_reduce_sum(&mut [0.0])
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn describe(&self) -> String {
        let v = self.api.version;
        format!(
            "nccl {}.{}.{} (rank {} of {}, cuda:{})",
            v / 10000,
            v / 100 % 100,
            v % 100,
            self.rank,
            self.world,
            self.gpu.ordinal
        )
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        {
            let mut st = self.watch.lock();
            st.stop = true;
            self.watch.wake.notify_all();
        }
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        let _ = self.gpu.bind();
        let aborted = self.watch.lock().failure.is_some();
        if !aborted {
            let a = self.api;
            // SAFETY: the communicator is live and unused by anyone else now; finalising waits
            // for its operations (bounded by the timeout), destroying frees it. On failure it
            // is aborted instead.
            unsafe {
                let fin = a
                    .check("ncclCommFinalize", Some(self.comm), (a.finalize)(self.comm))
                    .and_then(|_| a.wait_ready(self.comm, Instant::now() + self.timeout, "finalize"));
                if fin.is_ok() {
                    (a.destroy)(self.comm);
                } else {
                    (a.abort)(self.comm);
                }
            }
        }
        self.watch.lock().event = None;
        if self.scratch.0 != 0 {
            let _ = self.gpu.sync();
            // SAFETY: allocated by `scratch`; the stream is idle.
            unsafe {
                let _ = drv!(cuMemFree_v2(self.scratch.0));
            }
        }
    }
}

/// The CUDA backend's membership of a data-parallel group: the group's own communicator (for
/// host values and bootstrapping) and NCCL (for device buffers), with the events that fork
/// NCCL's stream from the compute stream and join it back.
pub(super) struct Collectives {
    pub host: Box<dyn Communicator>,
    pub nccl: NcclCommunicator,
    fork: Event,
    join: Event,
    /// Buffers reduced on NCCL's stream that the compute stream has not waited for yet.
    pending: HashSet<BufId>,
    /// NCCL's stream holds work the compute stream has not waited for.
    unjoined: bool,
}

impl Collectives {
    /// NCCL on GPU `ordinal` for `host`'s group (every rank calls this together).
    pub fn new(ordinal: usize, mut host: Box<dyn Communicator>) -> Result<Collectives> {
        let nccl = NcclCommunicator::new(ordinal, &mut *host)?;
        Ok(Collectives {
            host,
            nccl,
            fork: Event::new(false)?,
            join: Event::new(false)?,
            pending: HashSet::new(),
            unjoined: false,
        })
    }

    /// Queues the reduction of `bufs` on NCCL's stream after the work queued so far on
    /// `compute`; `ids` are the buffers, which the compute stream must not touch before
    /// [`Collectives::join_into`].
    pub fn all_reduce(
        &mut self,
        compute: Stream,
        bufs: &[(sys::CUdeviceptr, usize)],
        ids: impl IntoIterator<Item = BufId>,
        dtype: ncclDataType_t,
        op: ncclRedOp_t,
    ) -> Result<()> {
        self.fork.record(compute)?;
        self.fork.wait_on(self.nccl.stream())?;
        self.nccl.enqueue_all_reduce(bufs, dtype, op)?;
        self.join.record(self.nccl.stream())?;
        self.unjoined = true;
        self.pending.extend(ids);
        Ok(())
    }

    /// Whether `op` touches a buffer still being reduced on NCCL's stream.
    pub fn must_join(&self, op: &Op) -> bool {
        let mut touches = false;
        if self.unjoined {
            op.each_buffer(&mut |u| touches |= self.pending.contains(&u.buf));
        }
        touches
    }

    /// Makes `compute` wait for everything queued on NCCL's stream.
    pub fn join_into(&mut self, compute: Stream) -> Result<()> {
        if self.unjoined {
            self.join.wait_on(compute)?;
            self.unjoined = false;
            self.pending.clear();
        }
        Ok(())
    }
}

impl super::CudaBackend {
    fn group(&mut self, what: &str) -> Result<&mut Collectives> {
        self.coll.as_mut().ok_or_else(|| {
            Error::State(format!("{what} needs a data-parallel group: call Backend::set_communicator first"))
        })
    }
}

impl RunOp<ops::AllReduce> for super::CudaBackend {
    /// [`crate::backend::Op::AllReduce`]: queued on NCCL's stream, joined later.
    fn run_op(&mut self, o: &ops::AllReduce) -> Result<()> {
        let (bufs, mean) = (&o.bufs, o.mean);
        let ptrs: Vec<(sys::CUdeviceptr, usize)> = bufs.iter().map(|&(b, n)| (self.ptr(b), n)).collect();
        let stream = self.gpu.stream;
        let op = if mean { ncclRedOp_t::ncclAvg } else { ncclRedOp_t::ncclSum };
        self.group("all_reduce")?.all_reduce(stream, &ptrs, bufs.iter().map(|b| b.0), ncclDataType_t::ncclFloat32, op)
    }
}

impl super::CudaBackend {
    /// Sums `len` f64 values at `p` over the group and makes the compute stream wait for the
    /// result (synchronised batch norm's statistics).
    pub(super) fn sum_f64_now(&mut self, p: sys::CUdeviceptr, len: usize) -> Result<()> {
        let stream = self.gpu.stream;
        let g = self.group("batch norm with synchronised statistics")?;
        g.all_reduce(stream, &[(p, len)], [], ncclDataType_t::ncclFloat64, ncclRedOp_t::ncclSum)?;
        g.join_into(stream)
    }

    /// Before `op`: waits for the reductions of the buffers it touches.
    pub(super) fn join_for(&mut self, op: &Op) -> Result<()> {
        let stream = self.gpu.stream;
        if let Some(g) = self.coll.as_mut()
            && !matches!(op, Op::AllReduce(_))
            && g.must_join(op)
        {
            g.join_into(stream)?;
        }
        Ok(())
    }

    /// At the end of an op list (eager or captured): the compute stream waits for NCCL's.
    pub(super) fn join_collectives(&mut self) -> Result<()> {
        let stream = self.gpu.stream;
        match self.coll.as_mut() {
            Some(g) => g.join_into(stream),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where NCCL is present (a Python environment with PyTorch's wheels, found through the
    /// search folders), it loads, has every function, is new enough, and makes an id (which
    /// needs no GPU); elsewhere the error says what is missing, and nothing panics.
    #[test]
    fn nccl_loads_where_present_and_is_an_error_where_not() {
        match nccl_version() {
            Ok((path, v)) => {
                println!("NCCL {v:?} at {path}");
                assert!(v >= (2, 18, 0));
                let a = api().unwrap();
                let mut id = ncclUniqueId { internal: [0; 128] };
                // SAFETY: an out-pointer to a local.
                a.check("ncclGetUniqueId", None, unsafe { (a.get_unique_id)(&mut id) }).unwrap();
                assert!(id.internal.iter().any(|&b| b != 0), "an id of zeros");
                assert!(a.describe(None, 2).contains("system error"), "{}", a.describe(None, 2));
                assert!(std::env::var("NCCL_NVLS_ENABLE").is_ok_and(|v| v == "0"));
            }
            Err(Error::Device { reason, .. }) => {
                println!("skipped: {reason}");
                assert!(reason.contains("NCCL"), "{reason}");
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn the_config_structure_has_nccl_2_18s_layout() {
        // size_t, 2 x uint, 4 x int, pointer, int: 8 + 8 + 16 + 8 + 4 (+4 padding) on 64-bit.
        assert_eq!(std::mem::size_of::<Config>(), 48);
        assert_eq!(std::mem::offset_of!(Config, net_name), 32);
        assert_eq!(std::mem::size_of::<ncclUniqueId>(), 128);
    }
}
