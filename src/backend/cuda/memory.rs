//! Device memory of the CUDA backend: allocations with out-of-memory reporting and peak
//! tracking, the pinned staging buffers that host-to-device copies go through, and the arena of
//! 64-bit execution counters.
//!
//! Nothing here frees memory while the backend lives (buffers are planned once; a grown
//! workspace keeps its predecessor until drop, because a captured CUDA graph may still point at
//! it), so there is no free list to manage: the "caching allocator" is simply allocating once.
//! Everything is freed in [`DeviceMemory::release`], called from the backend's `Drop`.

use cudarc::driver::sys;

use super::driver::{Event, Gpu, drv};
use crate::{Error, Result};

/// Bytes of each pinned staging buffer (4 MiB: large enough that a batch upload is a few
/// copies, small enough to cost nothing).
const STAGE_BYTES: usize = 4 << 20;

/// Staging buffers used in turn. A training step writes three (batch, targets, hyper-parameters),
/// so 16 let the host queue about five steps ahead of the GPU before a write must wait for an
/// earlier copy to finish; with two, each step's writes waited for the previous step's graph.
const STAGES: usize = 16;

/// Counters per arena chunk; a chunk never moves once allocated, so graphs may point into it.
const COUNTERS_PER_CHUNK: usize = 512;

/// The backend's device allocations.
pub(crate) struct DeviceMemory {
    allocs: Vec<(sys::CUdeviceptr, usize)>,
    current: u64,
    peak: u64,
    staging: Vec<(*mut u8, Event)>,
    next_stage: usize,
    counter_chunks: Vec<sys::CUdeviceptr>,
    counters: usize,
    /// Set while a CUDA graph is being captured: allocating or copying from the host then would
    /// either fail inside the capture or be baked into the graph, so both are refused.
    pub capturing: bool,
}

impl DeviceMemory {
    pub fn new() -> Result<DeviceMemory> {
        let mut staging: Vec<(*mut u8, Event)> = Vec::with_capacity(STAGES);
        for _ in 0..STAGES {
            let mut p: *mut std::ffi::c_void = std::ptr::null_mut();
            // SAFETY: out-pointer to a local; the context is current.
            let made = unsafe { drv!(cuMemAllocHost_v2(&mut p, STAGE_BYTES)) }.and_then(|_| Event::new(false));
            match made {
                Ok(e) => staging.push((p as *mut u8, e)),
                Err(e) => {
                    for (buf, _) in &staging {
                        // SAFETY: allocated by cuMemAllocHost above; nothing uses it yet.
                        unsafe {
                            let _ = drv!(cuMemFreeHost(*buf as *mut std::ffi::c_void));
                        }
                    }
                    if !p.is_null() {
                        // SAFETY: as above (the event creation failed after the allocation).
                        unsafe {
                            let _ = drv!(cuMemFreeHost(p));
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(DeviceMemory {
            allocs: Vec::new(),
            current: 0,
            peak: 0,
            staging,
            next_stage: 0,
            counter_chunks: Vec::new(),
            counters: 0,
            capturing: false,
        })
    }

    fn refuse_in_capture(&self, what: &str) -> Result<()> {
        if self.capturing {
            return Err(Error::State(format!(
                "{what} during CUDA graph capture: every allocation and host copy must happen in the warm-up run"
            )));
        }
        Ok(())
    }

    /// `bytes` of device memory, zeroed. Out of memory gives [`Error::OutOfMemory`] with the
    /// request and the free memory (model and batch are filled in by the executor) and leaves
    /// everything already allocated in place.
    pub fn alloc(&mut self, gpu: &Gpu, bytes: usize) -> Result<sys::CUdeviceptr> {
        self.refuse_in_capture("allocating device memory")?;
        if bytes == 0 {
            return Ok(0);
        }
        let (free, _) = gpu.mem_info()?;
        let oom = || Error::OutOfMemory { model: String::new(), batch: 0, needed: bytes as u64, free };
        if bytes as u64 > free {
            return Err(oom());
        }
        let mut p = 0;
        // SAFETY: out-pointer to a local; the context is current.
        let r = unsafe { sys::cuMemAlloc_v2(&mut p, bytes) };
        if r == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            return Err(oom());
        }
        super::driver::check_cu("cuMemAlloc_v2", r)?;
        // Zero it on the stream, so the zeros are ordered before any later use of the buffer:
        // by 32-bit words, or by bytes where the size is not a multiple of 4 (an odd number of
        // bf16 values; a word count rounded up would write past the allocation and is refused).
        // SAFETY: `p` is a fresh allocation of `bytes` bytes.
        let zeroed = unsafe {
            if bytes.is_multiple_of(4) {
                drv!(cuMemsetD32Async(p, 0, bytes / 4, gpu.stream))
            } else {
                drv!(cuMemsetD8Async(p, 0, bytes, gpu.stream))
            }
        };
        if let Err(e) = zeroed {
            // SAFETY: `p` was allocated above and is not referenced anywhere else.
            unsafe {
                let _ = drv!(cuMemFree_v2(p));
            }
            return Err(e);
        }
        self.allocs.push((p, bytes));
        self.current += bytes as u64;
        self.peak = self.peak.max(self.current);
        Ok(p)
    }

    /// Most bytes held at once.
    pub fn peak(&self) -> u64 {
        self.peak
    }

    /// Bytes held now.
    pub fn current(&self) -> u64 {
        self.current
    }

    /// Frees an allocation made by [`DeviceMemory::alloc`] after waiting for the stream (for
    /// temporary scratch of algorithm searches; never used for planned buffers).
    pub fn free_now(&mut self, gpu: &Gpu, p: sys::CUdeviceptr) -> Result<()> {
        if p == 0 {
            return Ok(());
        }
        gpu.sync()?;
        if let Some(i) = self.allocs.iter().position(|a| a.0 == p) {
            let (_, bytes) = self.allocs.swap_remove(i);
            self.current -= bytes as u64;
            // SAFETY: `p` was allocated by this allocator and the stream no longer uses it.
            unsafe { drv!(cuMemFree_v2(p))? };
        }
        Ok(())
    }

    /// Copies host bytes to `dst` asynchronously, through the pinned staging buffers in turn.
    /// Before a staging buffer is refilled, the event recorded after its last copy is waited for, so a later write never overwrites staging memory that a queued copy still
    /// reads; the caller's slice may be reused as soon as this returns.
    pub fn upload(&mut self, gpu: &Gpu, dst: sys::CUdeviceptr, data: &[u8]) -> Result<()> {
        self.refuse_in_capture("copying from the host")?;
        for (i, chunk) in data.chunks(STAGE_BYTES).enumerate() {
            let (buf, done) = &self.staging[self.next_stage];
            done.wait()?;
            // SAFETY: `buf` is a pinned allocation of STAGE_BYTES >= chunk.len() bytes, and the
            // wait above guarantees no queued copy reads it any more.
            unsafe { std::ptr::copy_nonoverlapping(chunk.as_ptr(), *buf, chunk.len()) };
            let at = dst + (i * STAGE_BYTES) as u64;
            // SAFETY: `dst` is a device allocation of at least `data.len()` bytes (checked by
            // the callers against the buffer length); `buf` stays valid until the event fires.
            unsafe { drv!(cuMemcpyHtoDAsync_v2(at, *buf as *const std::ffi::c_void, chunk.len(), gpu.stream))? };
            done.record(gpu.stream)?;
            self.next_stage = (self.next_stage + 1) % STAGES;
        }
        Ok(())
    }

    /// Copies device bytes to the host after waiting for all queued work.
    pub fn download(&self, gpu: &Gpu, src: sys::CUdeviceptr, out: &mut [u8]) -> Result<()> {
        self.refuse_in_capture("copying to the host")?;
        gpu.sync()?;
        if out.is_empty() {
            return Ok(());
        }
        // SAFETY: `src` holds at least `out.len()` bytes (checked by callers); the stream is
        // idle, so the copy sees every queued write.
        unsafe { drv!(cuMemcpyDtoH_v2(out.as_mut_ptr() as *mut std::ffi::c_void, src, out.len())) }
    }

    /// A new zeroed 64-bit counter in device memory; returns its index.
    pub fn new_counter(&mut self, gpu: &Gpu) -> Result<usize> {
        if self.counters == self.counter_chunks.len() * COUNTERS_PER_CHUNK {
            let p = self.alloc(gpu, COUNTERS_PER_CHUNK * 8)?;
            self.counter_chunks.push(p);
        }
        self.counters += 1;
        Ok(self.counters - 1)
    }

    /// Device address of counter `i`.
    pub fn counter_ptr(&self, i: usize) -> Result<sys::CUdeviceptr> {
        if i >= self.counters {
            return Err(Error::State(format!("no counter {i} on this backend")));
        }
        Ok(self.counter_chunks[i / COUNTERS_PER_CHUNK] + (i % COUNTERS_PER_CHUNK * 8) as u64)
    }

    /// Frees everything (the backend is being dropped; the stream has been synchronised).
    fn release(&mut self) {
        for (p, _) in self.allocs.drain(..) {
            // SAFETY: every entry is a live allocation of this allocator, no longer in use.
            unsafe {
                let _ = drv!(cuMemFree_v2(p));
            }
        }
        for (buf, _) in &self.staging {
            if buf.is_null() {
                continue;
            }
            // SAFETY: allocated by cuMemAllocHost in `new`; no copy is pending (stream synced).
            unsafe {
                let _ = drv!(cuMemFreeHost(*buf as *mut std::ffi::c_void));
            }
        }
        self.staging.iter_mut().for_each(|s| s.0 = std::ptr::null_mut());
        self.current = 0;
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        self.release();
    }
}
