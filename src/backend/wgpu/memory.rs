//! Device memory of the wgpu backend: the arena that holds every plan buffer as a byte range of
//! one wgpu buffer (a few where the adapter's `max_buffer_size` forces it), and the ring of
//! mapped staging buffers that host writes (the batch above all) go through.
//!
//! **Arena.** [`Arena::alloc`] only places a buffer: it takes the next range of the open chunk,
//! at an offset aligned to `min_storage_buffer_offset_alignment` and at least 256 bytes (so it
//! can be bound on its own), and creates nothing. The chunks are created by [`Arena::materialize`], which the
//! backend calls before anything uses a buffer (a read, a recording, a submission): everything
//! allocated since the last use becomes one wgpu buffer. A plan is allocated buffer by buffer
//! through the unchanged `Backend::alloc` seam, and the executor allocates the parameters, the
//! training state and the first plan before its first step, so these all share one allocation;
//! a plan compiled later (an evaluation batch size) gets one of its own. A write to a buffer
//! whose chunk does not exist yet is kept on the host and copied in when the chunk is created
//! (mapped at creation), so the parameters written right after their allocation do not force a
//! chunk of their own. A chunk is closed (and the next begun) where the next buffer would take
//! it past `max_buffer_size`; one buffer larger than `max_storage_buffer_binding_size` (it could
//! not be bound) is refused with [`Error::OutOfMemory`] when it is allocated.
//!
//! By default (the arena *dedicated*) every buffer is a chunk of its own: the placing, deferred
//! creation and pending writes are the same, but no two plan buffers share a wgpu buffer, so a
//! kernel can bind its inputs read-only (with one shared buffer every binding must be read-write,
//! which NVIDIA's driver reads without its read-only cache path: 1.5-1.8x slower steps, NOTES.md
//! round 5). wgpu's own allocator still places the buffers in large device-memory blocks.
//!
//! Nothing is moved or reused: a chunk is destroyed when its last buffer is freed (after a plan
//! failed part-way), as the CUDA backend frees nothing while it lives.
//!
//! **Staging ring.** [`Ring::write`] copies host bytes into the current stage, a buffer mapped for
//! writing (`MAP_WRITE | COPY_SRC`), and notes the copy to its destination; the next submission
//! (a step, a read) begins with those copies ([`Ring::take`]), and the stage is mapped again
//! (`map_async`) right after that submission, so it comes back once the device has done the
//! copies. The host fills the next stage meanwhile: with [`STAGES`] stages it can be that many
//! submissions ahead before a write waits, and it waits only for the one submission that used
//! the stage it needs. Nothing is read back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::backend::DType;
use crate::{Error, Result};

/// One plan buffer: a byte range of a chunk.
pub(super) struct Slot {
    pub chunk: usize,
    pub offset: u64,
    pub len: usize,
    pub dtype: DType,
    /// Bytes written before the chunk existed, copied in when it is created.
    pending: Option<Vec<u8>>,
}

impl Slot {
    /// The bytes the slot occupies (at least 4: a binding cannot be empty).
    pub fn bytes(&self) -> u64 {
        padded((self.len * self.dtype.size()) as u64)
    }
}

/// `bytes` rounded up to whole 32-bit words, at least one.
fn padded(bytes: u64) -> u64 {
    bytes.max(4).next_multiple_of(4)
}

/// One wgpu buffer holding many slots.
struct Chunk {
    /// `None` until materialized (and again once destroyed).
    buf: Option<wgpu::Buffer>,
    /// Bytes used: the end of its last slot.
    size: u64,
    /// Slots not freed.
    live: usize,
    /// Whether later allocations may still be placed in it (not materialized, not full).
    open: bool,
}

/// The plan buffers (see the module docs).
pub(super) struct Arena {
    slots: Vec<Option<Slot>>,
    chunks: Vec<Chunk>,
    /// Offset alignment of a binding (`min_storage_buffer_offset_alignment`).
    align: u64,
    /// Largest chunk (`max_buffer_size`).
    max_chunk: u64,
    /// Largest buffer (`max_storage_buffer_binding_size`, at most `max_chunk`).
    max_binding: u64,
    /// Bytes of the chunks that exist now.
    current: u64,
    /// Each buffer a chunk of its own (the backend's default; `KILN_WGPU_ARENA=1` turns it
    /// off): then no chunk holds two plan buffers and read-only bindings are possible.
    dedicated: bool,
}

impl Arena {
    pub fn new(limits: &wgpu::Limits, dedicated: bool) -> Arena {
        // At least 256 bytes (what WebGPU guarantees and most adapters ask for): each buffer
        // starts a cache line of its own, as a buffer of its own would, and `vec4` arrays and
        // mapped ranges (8 bytes) are aligned wherever the adapter allows less.
        let align = u64::from(limits.min_storage_buffer_offset_alignment).max(256);
        let max_chunk = limits.max_buffer_size / 4 * 4;
        Arena {
            slots: Vec::new(),
            chunks: Vec::new(),
            align,
            max_chunk,
            max_binding: limits.max_storage_buffer_binding_size.min(max_chunk) / 4 * 4,
            current: 0,
            dedicated,
        }
    }

    /// The largest buffer [`Arena::alloc`] accepts, in bytes.
    /// Whether every plan buffer is a wgpu buffer of its own (no two share a chunk), so that a
    /// dispatch may bind some read-only and others read-write.
    pub fn dedicated(&self) -> bool {
        self.dedicated
    }

    pub fn max_binding(&self) -> u64 {
        self.max_binding
    }

    /// Offset alignment of the buffers (and of the recorded lists' ranges).
    pub fn align(&self) -> u64 {
        self.align
    }

    /// wgpu buffers the arena holds now.
    pub fn chunks(&self) -> usize {
        self.chunks.iter().filter(|c| c.buf.is_some()).count()
    }

    /// Bytes of device memory the chunks hold now.
    pub fn current(&self) -> u64 {
        self.current
    }

    /// Places a buffer of `len` values of `dtype` (zeros) in the open chunk; nothing is created
    /// until [`Arena::materialize`].
    pub fn alloc(&mut self, len: usize, dtype: DType) -> Result<usize> {
        let bytes = padded(dtype.bytes(len)? as u64);
        if bytes > self.max_binding {
            return Err(Error::OutOfMemory { model: String::new(), batch: 0, needed: bytes, free: self.max_binding });
        }
        let open =
            self.chunks.last().filter(|c| c.open && !self.dedicated).map(|c| c.size.next_multiple_of(self.align));
        let (chunk, offset) = match open {
            Some(at) if at + bytes <= self.max_chunk => (self.chunks.len() - 1, at),
            _ => {
                if let Some(c) = self.chunks.last_mut() {
                    c.open = false;
                }
                self.chunks.push(Chunk { buf: None, size: 0, live: 0, open: true });
                (self.chunks.len() - 1, 0)
            }
        };
        let c = &mut self.chunks[chunk];
        c.size = offset + bytes;
        c.live += 1;
        self.slots.push(Some(Slot { chunk, offset, len, dtype, pending: None }));
        Ok(self.slots.len() - 1)
    }

    pub fn slot(&self, id: usize) -> Result<&Slot> {
        self.slots
            .get(id)
            .and_then(|s| s.as_ref())
            .ok_or_else(|| Error::State(format!("wgpu: buffer {id} does not exist (freed?)")))
    }

    /// The wgpu buffer holding `slot`, once materialized.
    pub fn buffer(&self, slot: &Slot) -> Result<&wgpu::Buffer> {
        self.chunks[slot.chunk]
            .buf
            .as_ref()
            .ok_or_else(|| Error::State("wgpu: a buffer was used before its memory was created".into()))
    }

    /// Whether `slot`'s chunk exists on the device.
    pub fn materialized(&self, slot: &Slot) -> bool {
        self.chunks[slot.chunk].buf.is_some()
    }

    /// Keeps `bytes` as the contents of slot `id` until its chunk is created.
    pub fn write_pending(&mut self, id: usize, bytes: Vec<u8>) -> Result<()> {
        self.slot(id)?;
        if let Some(s) = self.slots[id].as_mut() {
            s.pending = Some(bytes);
        }
        Ok(())
    }

    /// Frees slot `id`; a chunk with no slot left is destroyed (or, not created yet, shrinks to
    /// its last live slot, so a failed plan's ranges are used again).
    pub fn free(&mut self, id: usize) {
        let Some(chunk) = self.slots.get_mut(id).and_then(|s| s.take()).map(|s| s.chunk) else { return };
        let c = &mut self.chunks[chunk];
        c.live -= 1;
        if c.buf.is_none() {
            let end = self.slots.iter().flatten().filter(|t| t.chunk == chunk).map(|t| t.offset + t.bytes()).max();
            self.chunks[chunk].size = end.unwrap_or(0);
        } else if c.live == 0 {
            if let Some(b) = c.buf.take() {
                b.destroy();
            }
            c.open = false;
            self.current -= c.size.next_multiple_of(4);
        }
    }

    /// Creates every chunk that has slots but no buffer yet, with the host writes kept for its
    /// slots copied in. Returns whether any was created (the caller checks wgpu's errors).
    pub fn materialize(&mut self, device: &wgpu::Device) -> Result<bool> {
        let mut made = false;
        for (i, c) in self.chunks.iter_mut().enumerate() {
            if c.buf.is_some() || c.live == 0 {
                continue;
            }
            let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
            for s in self.slots.iter_mut().flatten().filter(|s| s.chunk == i) {
                if let Some(p) = s.pending.take() {
                    writes.push((s.offset, p));
                }
            }
            use wgpu::BufferUsages as U;
            let size = c.size.next_multiple_of(4);
            let buf = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("kiln arena"),
                size,
                usage: U::STORAGE | U::COPY_SRC | U::COPY_DST,
                mapped_at_creation: !writes.is_empty(),
            });
            if !writes.is_empty() {
                // New buffers are zeroed, mapped ones too: only the written slots are copied.
                for (offset, bytes) in writes.iter().filter(|(_, b)| !b.is_empty()) {
                    let end = offset + padded(bytes.len() as u64);
                    let mut view = buf.get_mapped_range_mut(*offset..end).map_err(|e| Error::DeviceCall {
                        call: "wgpu get_mapped_range_mut (arena)".into(),
                        status: e.to_string(),
                    })?;
                    view.slice(..bytes.len()).copy_from_slice(bytes);
                }
                buf.unmap();
            }
            c.buf = Some(buf);
            c.open = false;
            self.current += size;
            made = true;
        }
        Ok(made)
    }
}

/// Staging buffers used in turn, one per submission that carries host writes: the host may be
/// this many submissions ahead of the device before a write waits.
pub(super) const STAGES: usize = 4;

/// Smallest stage (bytes); a stage grows to the largest set of writes one submission carries.
const STAGE_MIN: u64 = 1 << 20;

/// One staging buffer of the ring.
struct Stage {
    buf: wgpu::Buffer,
    cap: u64,
    /// Bytes written since the stage was last taken.
    used: u64,
    /// Copies to encode at the start of the next submission: stage offset, destination,
    /// destination offset, bytes.
    copies: Vec<(u64, wgpu::Buffer, u64, u64)>,
    /// Set by the `map_async` callback once the device is done with the stage.
    mapped: Arc<AtomicBool>,
    /// The submission that last used the stage.
    submission: Option<wgpu::SubmissionIndex>,
}

/// The staging ring (see the module docs).
pub(super) struct Ring {
    stages: Vec<Stage>,
    cur: usize,
    /// Copies through the ring since the backend opened, and how many writes waited for a stage.
    pub uploads: u64,
    pub waits: u64,
}

impl Ring {
    pub fn new() -> Ring {
        Ring { stages: Vec::new(), cur: 0, uploads: 0, waits: 0 }
    }

    /// Whether writes wait in the current stage for the next submission.
    pub fn pending(&self) -> bool {
        self.stages.get(self.cur).is_some_and(|s| !s.copies.is_empty())
    }

    /// Bytes of host-visible memory the stages hold.
    pub fn bytes(&self) -> u64 {
        self.stages.iter().map(|s| s.cap).sum()
    }

    fn new_stage(device: &wgpu::Device, cap: u64) -> Stage {
        let buf = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kiln staging"),
            size: cap,
            usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: true,
        });
        Stage { buf, cap, used: 0, copies: Vec::new(), mapped: Arc::new(AtomicBool::new(true)), submission: None }
    }

    /// Waits until the current stage is mapped again (the device has done its copies): first
    /// without blocking, then for the one submission that used it.
    fn ready(&mut self, device: &wgpu::Device, limit: std::time::Duration) -> Result<()> {
        let s = &self.stages[self.cur];
        if s.mapped.load(Ordering::Acquire) {
            return Ok(());
        }
        let _ = device.poll(wgpu::PollType::Poll);
        if s.mapped.load(Ordering::Acquire) {
            return Ok(());
        }
        self.waits += 1;
        let poll = wgpu::PollType::Wait { submission_index: s.submission.clone(), timeout: Some(limit) };
        device
            .poll(poll)
            .map_err(|e| Error::DeviceCall { call: "wgpu poll (staging)".into(), status: e.to_string() })?;
        if !s.mapped.load(Ordering::Acquire) {
            // The callback runs in the poll that sees the submission done; one more poll for
            // drivers that report the submission done before mapping it.
            let _ = device.poll(wgpu::PollType::Wait { submission_index: None, timeout: Some(limit) });
        }
        if s.mapped.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(Error::DeviceCall {
                call: "wgpu map_async (staging)".into(),
                status: "the stage was not mapped".into(),
            })
        }
    }

    /// Copies `bytes` into the current stage and notes their copy to `dst` at `offset` for the
    /// next submission. Where the stage is full, its copies are submitted alone first (through
    /// `queue`) and the next stage is taken; a stage smaller than `bytes` is replaced by a
    /// larger one.
    pub fn write(
        &mut self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        limit: std::time::Duration,
        (dst, offset): (&wgpu::Buffer, u64),
        bytes: &[u8],
    ) -> Result<()> {
        let n = (bytes.len() as u64).next_multiple_of(wgpu::MAP_ALIGNMENT);
        if n == 0 {
            return Ok(());
        }
        if self.stages.len() < STAGES && self.stages.get(self.cur).is_none() {
            self.stages.push(Ring::new_stage(device, n.max(STAGE_MIN).next_power_of_two()));
        }
        self.ready(device, limit)?;
        let s = &self.stages[self.cur];
        if s.used > 0 && s.used + n > s.cap {
            let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("kiln upload") });
            let taken = self.take(&mut enc);
            let si = queue.submit([enc.finish()]);
            self.submitted(taken, si);
            if self.stages.len() < STAGES && self.stages.get(self.cur).is_none() {
                self.stages.push(Ring::new_stage(device, n.max(STAGE_MIN).next_power_of_two()));
            }
            self.ready(device, limit)?;
        }
        let s = &mut self.stages[self.cur];
        if n > s.cap {
            s.buf.destroy();
            *s = Ring::new_stage(device, n.next_power_of_two());
        }
        let at = s.used;
        {
            let mut view = s.buf.get_mapped_range_mut(at..at + n).map_err(|e| Error::DeviceCall {
                call: "wgpu get_mapped_range_mut (staging)".into(),
                status: e.to_string(),
            })?;
            view.slice(..bytes.len()).copy_from_slice(bytes);
        }
        s.copies.push((at, dst.clone(), offset, (bytes.len() as u64).next_multiple_of(4)));
        s.used += n;
        self.uploads += 1;
        Ok(())
    }

    /// Encodes the current stage's copies at the start of `enc` (call before encoding
    /// anything else) and moves to the next stage; returns the stage taken, for
    /// [`Ring::submitted`] (`None`: nothing was written).
    pub fn take(&mut self, enc: &mut wgpu::CommandEncoder) -> Option<usize> {
        let s = self.stages.get_mut(self.cur).filter(|s| !s.copies.is_empty())?;
        s.buf.unmap();
        s.mapped.store(false, Ordering::Release);
        for (at, dst, offset, bytes) in s.copies.drain(..) {
            enc.copy_buffer_to_buffer(&s.buf, at, &dst, offset, bytes);
        }
        s.used = 0;
        let taken = self.cur;
        self.cur = (self.cur + 1) % STAGES;
        Some(taken)
    }

    /// After the submission `si` that carried stage `taken`'s copies: maps the stage again
    /// (done once the device has finished with it).
    pub fn submitted(&mut self, taken: Option<usize>, si: wgpu::SubmissionIndex) {
        let Some(s) = taken.and_then(|t| self.stages.get_mut(t)) else { return };
        let flag = s.mapped.clone();
        s.submission = Some(si);
        s.buf.map_async(wgpu::MapMode::Write, .., move |r| {
            if r.is_ok() {
                flag.store(true, Ordering::Release);
            }
        });
    }
}
