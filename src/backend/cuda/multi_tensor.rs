//! Multi-tensor launches (as PyTorch's `multi_tensor_apply`): one kernel launch over a whole set
//! of tensors, such as every parameter of an optimizer step or every gradient of a clipping or
//! non-finite check, instead of one launch per tensor.
//!
//! A set is described by a table in device memory, made on the first run of an op (the eager
//! warm-up before a CUDA graph is captured) and kept for the backend's life, so a replayed graph
//! does no host work for it:
//!
//! ```text
//! records: one per tensor, MT_REC u64 each: up to MT_PTRS buffer addresses (0 where absent),
//!          then the tensor's length in values
//! chunks:  one u64 per block: (tensor index << 32) | chunk index within the tensor; chunk k of a
//!          tensor covers values [k * MT_CHUNK, min((k + 1) * MT_CHUNK, len))
//! ```
//!
//! A kernel finds its block's tensor and range with `mt_chunk` (`mt_prelude!`, put in front of the
//! source of the modules that use it). The chunks of a tensor are the same whichever set it belongs to,
//! so an element-wise kernel computes the same bits for a tensor alone or in a set; reductions
//! write one partial sum per chunk into a fixed slot and add the slots in a fixed order.

use std::collections::HashMap;

use cudarc::driver::sys;

use super::CudaBackend;
use crate::Result;

/// Values per chunk (one 256-thread block each: 32 values per thread).
pub(super) const MT_CHUNK: usize = 8192;

/// Buffer addresses per record.
pub(super) const MT_PTRS: usize = 5;

/// u64 slots per record: the addresses, then the length.
const MT_REC: usize = MT_PTRS + 1;

/// The device side, as a string literal for `concat!` in a module's source: `mt_chunk`, the
/// loop over a chunk's values, and `last_block` (also used by batch norm).
macro_rules! mt_prelude {
    () => {
        r#"
#define MT_REC 6
// This block's tensor record and value range in a multi-tensor table (multi_tensor.rs).
struct MtChunk { const u64* rec; i64 start, end; };
__device__ __forceinline__ MtChunk mt_chunk(const u64* tab, const u64* chunks, i64 chunk) {
    u64 c = chunks[blockIdx.x];
    MtChunk m;
    m.rec = tab + MT_REC * (i64)(c >> 32);
    m.start = (i64)(c & 0xffffffffull) * chunk;
    i64 n = (i64)m.rec[MT_REC - 1];
    m.end = m.start + chunk < n ? m.start + chunk : n;
    return m;
}
// Address k of this block's record, as a T* (null where the tensor has none).
#define MT_PTR(m, k, T) ((T*)(m).rec[k])
#define MT_LOOP(i, m) for (i64 i = (m).start + threadIdx.x; i < (m).end; i += blockDim.x)

// Whether this block is the last of its grid to get here, every other block's writes before
// its call then visible to it (the threadFenceReduction pattern: fence, then count on `done`).
// The last block sets `done` back to 0 for the next launch (kernels on the stream run one after
// another, so one counter serves them all: CudaBackend::done). Every thread of the block must
// call it; every thread gets the answer. Values other blocks wrote are read with __ldcg (past
// the L1 cache).
__device__ bool last_block(unsigned* done) {
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned blocks = gridDim.x * gridDim.y;
        last = atomicAdd(done, 1u) == blocks - 1;
        if (last) *done = 0;
    }
    __syncthreads();
    if (last) __threadfence();
    return last != 0;
}
"#
    };
}

/// A table in device memory: where its records and chunks are, and how many chunks (blocks a
/// launch over it takes).
#[derive(Clone, Copy, Debug)]
pub(super) struct MtTable {
    /// Address of the records.
    pub tab: sys::CUdeviceptr,
    /// Address of the chunk list.
    pub chunks: sys::CUdeviceptr,
    /// Number of chunks.
    pub count: usize,
}

/// The tables made so far, by their records (a captured graph may point at any of them, so
/// none is freed before the backend).
#[derive(Default)]
pub(super) struct MtTables {
    made: HashMap<Vec<u64>, MtTable>,
}

/// The records of a set of tensors, each given by its addresses (at most [`MT_PTRS`]) and
/// length.
fn records(tensors: &[(&[u64], usize)]) -> Vec<u64> {
    let mut records = Vec::with_capacity(tensors.len() * MT_REC);
    for &(ptrs, len) in tensors {
        records.extend((0..MT_PTRS).map(|k| ptrs.get(k).copied().unwrap_or(0)));
        records.push(len as u64);
    }
    records
}

/// The chunk list of a set of tensors of these lengths.
fn chunks(lens: impl Iterator<Item = usize>) -> Vec<u64> {
    lens.enumerate()
        .flat_map(|(t, len)| (0..len.div_ceil(MT_CHUNK) as u64).map(move |k| ((t as u64) << 32) | k))
        .collect()
}

impl CudaBackend {
    /// The device table of a set of tensors (each: up to [`MT_PTRS`] addresses and a length),
    /// made and uploaded on first use, found again on later calls. Making one allocates and
    /// copies from the host, which is refused during a CUDA graph capture: the warm-up run
    /// before the capture makes it.
    pub(super) fn mt_table(&mut self, tensors: &[(&[u64], usize)]) -> Result<MtTable> {
        let too_big = |t: &(&[u64], usize)| t.0.len() > MT_PTRS || t.1.div_ceil(MT_CHUNK) > u32::MAX as usize;
        if tensors.len() > u32::MAX as usize || tensors.iter().any(too_big) {
            return Err(crate::Error::State(format!(
                "a multi-tensor launch takes fewer than 2^32 tensors of at most {MT_PTRS} buffers and 2^32 chunks each \
                 ({} tensors given)",
                tensors.len()
            )));
        }
        let records = records(tensors);
        if let Some(t) = self.mt_tables.made.get(&records) {
            return Ok(*t);
        }
        let chunks = chunks(tensors.iter().map(|t| t.1));
        let bytes: Vec<u8> = records.iter().chain(&chunks).flat_map(|v| v.to_le_bytes()).collect();
        let tab = self.mem.alloc(&self.gpu, bytes.len().max(8))?;
        if !bytes.is_empty() {
            self.mem.upload(&self.gpu, tab, &bytes)?;
        }
        let table = MtTable { tab, chunks: tab + 8 * records.len() as u64, count: chunks.len() };
        self.mt_tables.made.insert(records, table);
        Ok(table)
    }

    /// The table of a set of gradients (one address each), as clipping and the non-finite
    /// check take them.
    pub(super) fn mt_grads(&mut self, grads: &[(crate::backend::ops::BufId, usize)]) -> Result<MtTable> {
        let ptrs: Vec<[u64; 1]> = grads.iter().map(|&(g, _)| [self.ptr(g)]).collect();
        let tensors: Vec<(&[u64], usize)> = ptrs.iter().zip(grads).map(|(p, &(_, n))| (&p[..], n)).collect();
        self.mt_table(&tensors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_value_once_and_name_their_tensor() {
        let lens = [0, 1, MT_CHUNK - 1, MT_CHUNK, MT_CHUNK + 1, 3 * MT_CHUNK + 5];
        let ptrs: Vec<[u64; 2]> = (0..lens.len() as u64).map(|k| [100 + k, 200 + k]).collect();
        let tensors: Vec<(&[u64], usize)> = ptrs.iter().zip(lens).map(|(p, n)| (&p[..], n)).collect();
        let (records, chunks) = (records(&tensors), chunks(lens.iter().copied()));
        assert_eq!(records.len(), lens.len() * MT_REC);
        for (t, &n) in lens.iter().enumerate() {
            let r = &records[t * MT_REC..(t + 1) * MT_REC];
            assert_eq!(r, [100 + t as u64, 200 + t as u64, 0, 0, 0, n as u64]);
            // The chunks of tensor t, in order, cover [0, n) exactly.
            let mine: Vec<u64> = chunks.iter().filter(|c| (**c >> 32) as usize == t).map(|c| c & 0xffff_ffff).collect();
            assert_eq!(mine, (0..n.div_ceil(MT_CHUNK) as u64).collect::<Vec<_>>(), "tensor {t} of {n} values");
        }
        assert_eq!(chunks.len(), 1 + 1 + 1 + 2 + 4);
    }

    #[test]
    fn the_device_side_reads_records_of_the_same_width() {
        assert!(mt_prelude!().contains(&format!("#define MT_REC {MT_REC}\n")));
    }
}
