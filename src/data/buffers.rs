//! Where the loader's batch buffers come from, and where recycled ones go.
//!
//! Each [`Batch`](super::Batch) owns its inputs as a `Vec<f32>` inside a tensor. A consumer done
//! with a batch hands it back with [`DataLoader::recycle`](super::DataLoader::recycle), and the
//! workers fill that same memory again instead of allocating. The default [`BufferPool`] keeps a
//! few such buffers. A backend that wants batches in page-locked memory for fast uploads (CUDA)
//! implements [`BufferSource`] itself: it can pin each buffer it hands out in place
//! (`cudaHostRegister`) and keep it registered for as long as it circulates, so the loader never
//! needs to know about devices.

use std::sync::Mutex;

/// Supplies the loader's batch buffers and takes them back.
///
/// A consumer done with a batch hands it back with
/// [`DataLoader::recycle`](super::DataLoader::recycle), which passes the buffer to
/// [`give`](BufferSource::give); the workers [`take`](BufferSource::take) buffers for new batches.
/// The default is a [`BufferPool`]. A backend that wants batches in page-locked memory (CUDA)
/// implements this trait: it can pin each buffer it hands out in place (`cudaHostRegister`) and
/// keep it registered while it circulates.
///
/// Caveat for such a source: a batch dropped without being recycled frees its buffer through
/// Rust's allocator, still pinned. A pinning source is therefore for consumers that recycle every
/// batch (a training loop does); the alternative is to leave the default pool in place and copy
/// each batch into a pinned staging buffer before upload.
pub trait BufferSource: Send + Sync {
    /// A buffer of exactly `len` values; the loader overwrites every one of them.
    fn take(&self, len: usize) -> Vec<f32>;

    /// A buffer the consumer has finished with, to hand out again (or to drop).
    fn give(&self, buffer: Vec<f32>);
}

/// A bounded free list of buffers: [`take`](BufferSource::take) reuses a returned buffer whose
/// capacity fits, else allocates; [`give`](BufferSource::give) keeps up to `max_kept` buffers and
/// drops the rest.
#[derive(Debug)]
pub struct BufferPool {
    free: Mutex<Vec<Vec<f32>>>,
    max_kept: usize,
}

impl BufferPool {
    /// A pool keeping at most `max_kept` returned buffers for reuse.
    pub fn new(max_kept: usize) -> Self {
        BufferPool { free: Mutex::new(Vec::new()), max_kept }
    }

    /// How many buffers are waiting to be reused.
    pub fn available(&self) -> usize {
        self.free.lock().map(|f| f.len()).unwrap_or(0)
    }
}

impl BufferSource for BufferPool {
    fn take(&self, len: usize) -> Vec<f32> {
        // A poisoned lock only means another thread panicked while holding it; the list of
        // buffers is still valid, so carry on with it.
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            free.iter().position(|b| b.capacity() >= len).map(|i| free.swap_remove(i))
        };
        match reused {
            Some(mut b) => {
                // Same length as last time in the steady state: neither branch touches memory.
                b.truncate(len);
                b.resize(len, 0.0);
                b
            }
            None => vec![0.0; len],
        }
    }

    fn give(&self, buffer: Vec<f32>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.max_kept {
            free.push(buffer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_reuses_memory_and_stays_bounded() {
        let pool = BufferPool::new(1);
        let a = pool.take(10);
        assert_eq!(a.len(), 10);
        let ptr = a.as_ptr();
        pool.give(a);
        pool.give(vec![0.0; 3]);
        assert_eq!(pool.available(), 1);
        let b = pool.take(8);
        assert_eq!((b.len(), b.as_ptr()), (8, ptr));
        assert_eq!(pool.available(), 0);
        pool.give(vec![1.0; 2]);
        // Too small to hold 5: a fresh buffer, the small one stays.
        assert_eq!(pool.take(5).len(), 5);
        assert_eq!(pool.available(), 1);
    }
}
