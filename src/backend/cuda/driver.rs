//! The thin layer over the CUDA driver API (through cudarc's raw `sys` bindings): status codes
//! turned into [`Error::DeviceCall`], the device context and stream, timing events, and kernel
//! launches with their argument lists.
//!
//! Every call into a CUDA library in this backend goes through one of the macros below
//! ([`drv!`](crate::backend::cuda::driver), `dnn!`, `blaslt!`, `rtc!`), written as
//! `unsafe { drv!(cuMemAlloc_v2(&mut ptr, bytes)) }?`. Besides naming the failing call in the
//! error, that one spelling lets `loader.rs` check (in a unit test) that every symbol this
//! backend calls is on the list verified before the libraries are first used: cudarc panics on a
//! missing symbol, and kiln must not.

use std::ffi::{CStr, c_void};

use cudarc::driver::sys;

use crate::{Error, Result};

/// Calls a CUDA driver function by name; evaluates to `Result<()>`.
macro_rules! drv {
    ($f:ident ( $($a:expr),* $(,)? )) => {
        $crate::backend::cuda::driver::check_cu(stringify!($f), cudarc::driver::sys::$f($($a),*))
    };
}
pub(crate) use drv;

/// A driver status as an error naming the call.
pub(crate) fn check_cu(call: &str, r: sys::CUresult) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    Err(Error::DeviceCall { call: call.to_string(), status: cu_status(r) })
}

/// The driver's name for a status (`CUDA_ERROR_OUT_OF_MEMORY`), falling back to the number.
pub(crate) fn cu_status(r: sys::CUresult) -> String {
    let mut p: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: the driver library was loaded and checked by `loader::ensure` before any call;
    // cuGetErrorName writes a pointer to a static string.
    let ok = unsafe { sys::cuGetErrorName(r, &mut p) } == sys::CUresult::CUDA_SUCCESS;
    if ok && !p.is_null() {
        // SAFETY: non-null pointers from cuGetErrorName point at NUL-terminated static strings.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    } else {
        format!("CUresult {}", r as u32)
    }
}

/// One GPU: its primary context and the one stream every op of a backend is queued on.
pub(crate) struct Gpu {
    pub ordinal: usize,
    pub device: sys::CUdevice,
    pub ctx: sys::CUcontext,
    pub stream: sys::CUstream,
    pub name: String,
    /// Compute capability (major, minor).
    pub cc: (i32, i32),
    pub sm_count: u32,
    pub total_mem: u64,
}

impl Gpu {
    /// Initialises the driver, retains the device's primary context and creates a
    /// non-blocking stream (one that never waits on the legacy default stream).
    pub fn open(ordinal: usize) -> Result<Gpu> {
        let dev_err = |reason: String| Error::Device { device: format!("cuda:{ordinal}"), reason };
        // SAFETY (this block): plain driver calls with out-pointers to locals.
        unsafe {
            drv!(cuInit(0)).map_err(|e| dev_err(format!("the CUDA driver did not initialise ({e})")))?;
            let mut count = 0;
            drv!(cuDeviceGetCount(&mut count))?;
            if count <= 0 {
                return Err(dev_err("the driver is installed but sees no GPU".into()));
            }
            if ordinal >= count as usize {
                return Err(dev_err(format!("there are only {count} GPU(s) (ordinals 0..{})", count - 1)));
            }
            let mut device = 0;
            drv!(cuDeviceGet(&mut device, ordinal as i32))?;
            let mut name = [0 as std::ffi::c_char; 256];
            drv!(cuDeviceGetName(name.as_mut_ptr(), 256, device))?;
            let name = CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned();
            let attr = |a: sys::CUdevice_attribute| -> Result<i32> {
                let mut v = 0;
                drv!(cuDeviceGetAttribute(&mut v, a, device))?;
                Ok(v)
            };
            use sys::CUdevice_attribute as A;
            let cc = (
                attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            );
            if cc.0 < 6 {
                return Err(dev_err(format!(
                    "{name} has compute capability {}.{}; kiln needs 6.0 or newer",
                    cc.0, cc.1
                )));
            }
            let sm_count = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
            let mut total_mem = 0usize;
            drv!(cuDeviceTotalMem_v2(&mut total_mem, device))?;
            let mut ctx = std::ptr::null_mut();
            drv!(cuDevicePrimaryCtxRetain(&mut ctx, device))?;
            drv!(cuCtxSetCurrent(ctx))?;
            let mut stream = std::ptr::null_mut();
            if let Err(e) = drv!(cuStreamCreate(&mut stream, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)) {
                let _ = drv!(cuDevicePrimaryCtxRelease_v2(device));
                return Err(e);
            }
            Ok(Gpu { ordinal, device, ctx, stream, name, cc, sm_count, total_mem: total_mem as u64 })
        }
    }

    /// Makes this GPU's context current on the calling thread (a backend may move between
    /// threads; every entry point calls this first).
    pub fn bind(&self) -> Result<()> {
        // SAFETY: `ctx` is a live primary context retained by `open`.
        unsafe { drv!(cuCtxSetCurrent(self.ctx)) }
    }

    /// Waits for everything queued on the stream.
    pub fn sync(&self) -> Result<()> {
        // SAFETY: `stream` is live for the lifetime of `self`.
        unsafe { drv!(cuStreamSynchronize(self.stream)) }
    }

    /// Free and total device memory in bytes.
    pub fn mem_info(&self) -> Result<(u64, u64)> {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: out-pointers to locals; the context is current (callers bind first).
        unsafe { drv!(cuMemGetInfo_v2(&mut free, &mut total))? };
        Ok((free as u64, total as u64))
    }

    /// Launches `f` on the stream with a 1-D grid.
    pub fn launch(&self, f: sys::CUfunction, grid: u32, block: u32, shared: u32, args: &Args) -> Result<()> {
        self.launch_2d(f, (grid, 1), block, shared, args)
    }

    /// Launches `f` on the stream with a 2-D grid `(x, y)`.
    pub fn launch_2d(&self, f: sys::CUfunction, grid: (u32, u32), block: u32, shared: u32, args: &Args) -> Result<()> {
        let mut ptrs = args.pointers();
        // SAFETY: `f` comes from a module loaded in this context; `ptrs` point into `args`,
        // which outlives the call (the driver copies parameter values at launch).
        unsafe {
            drv!(cuLaunchKernel(
                f,
                grid.0.max(1),
                grid.1.max(1),
                1,
                block,
                1,
                1,
                shared,
                self.stream,
                ptrs.as_mut_ptr(),
                std::ptr::null_mut()
            ))
        }
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // SAFETY: the stream and the retained context belong to this value. Errors are ignored:
        // nothing useful can be done about them while dropping.
        unsafe {
            let _ = drv!(cuCtxSetCurrent(self.ctx));
            let _ = drv!(cuStreamSynchronize(self.stream));
            let _ = drv!(cuStreamDestroy_v2(self.stream));
            let _ = drv!(cuDevicePrimaryCtxRelease_v2(self.device));
        }
    }
}

/// The argument list of a kernel launch. Each value sits in its own 8-byte slot; the driver
/// reads as many bytes from each slot as the kernel parameter's type has (little-endian, so a
/// 4-byte `int` or `float` is the slot's first four bytes).
#[derive(Default)]
pub(crate) struct Args {
    slots: Vec<u64>,
}

impl Args {
    pub fn new() -> Self {
        Args { slots: Vec::with_capacity(12) }
    }
    /// A device pointer (`float*`, `const unsigned long long*`, ...); 0 is `NULL`.
    pub fn ptr(mut self, p: sys::CUdeviceptr) -> Self {
        self.slots.push(p);
        self
    }
    /// A `long long`.
    pub fn i64(mut self, v: usize) -> Self {
        self.slots.push(v as u64);
        self
    }
    /// An `int`.
    pub fn i32(mut self, v: i32) -> Self {
        self.slots.push(v as u32 as u64);
        self
    }
    /// An `unsigned int`.
    pub fn u32(mut self, v: u32) -> Self {
        self.slots.push(v as u64);
        self
    }
    /// A `float`.
    pub fn f32(mut self, v: f32) -> Self {
        self.slots.push(v.to_bits() as u64);
        self
    }
    /// A `double`.
    pub fn f64(mut self, v: f64) -> Self {
        self.slots.push(v.to_bits());
        self
    }
    /// An `unsigned long long`.
    pub fn u64(mut self, v: u64) -> Self {
        self.slots.push(v);
        self
    }
    /// The packed argument slots (for tests of the launchers).
    #[cfg(test)]
    pub fn slots(&self) -> &[u64] {
        &self.slots
    }
    fn pointers(&self) -> Vec<*mut c_void> {
        self.slots.iter().map(|s| s as *const u64 as *mut c_void).collect()
    }
}

/// A CUDA event for timing work on the stream.
pub(crate) struct Event(sys::CUevent);

impl Event {
    pub fn new(timing: bool) -> Result<Event> {
        let flags =
            if timing { sys::CUevent_flags::CU_EVENT_DEFAULT } else { sys::CUevent_flags::CU_EVENT_DISABLE_TIMING };
        let mut e = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; the context is current.
        unsafe { drv!(cuEventCreate(&mut e, flags as u32))? };
        Ok(Event(e))
    }
    pub fn record(&self, stream: sys::CUstream) -> Result<()> {
        // SAFETY: both handles are live.
        unsafe { drv!(cuEventRecord(self.0, stream)) }
    }
    /// Waits until the work recorded before this event has finished (at once if never recorded).
    pub fn wait(&self) -> Result<()> {
        // SAFETY: the event is live.
        unsafe { drv!(cuEventSynchronize(self.0)) }
    }
    /// Makes `stream` wait (on the device) for the work recorded before this event; during a
    /// capture this is how a second stream forks from and joins the captured one.
    pub fn wait_on(&self, stream: sys::CUstream) -> Result<()> {
        // SAFETY: both handles are live.
        unsafe { drv!(cuStreamWaitEvent(stream, self.0, 0)) }
    }
    /// Whether the work recorded before this event has finished (true if never recorded).
    pub fn done(&self) -> Result<bool> {
        // SAFETY: the event is live.
        match unsafe { sys::cuEventQuery(self.0) } {
            sys::CUresult::CUDA_SUCCESS => Ok(true),
            sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            r => check_cu("cuEventQuery", r).map(|_| false),
        }
    }
    /// Milliseconds between `start` and this event (both recorded and complete).
    pub fn since(&self, start: &Event) -> Result<f64> {
        let mut ms = 0f32;
        // SAFETY: both events are live and were created with timing enabled.
        unsafe { drv!(cuEventElapsedTime_v2(&mut ms, start.0, self.0))? };
        Ok(ms as f64)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the event belongs to this value.
        unsafe {
            let _ = drv!(cuEventDestroy_v2(self.0));
        }
    }
}
