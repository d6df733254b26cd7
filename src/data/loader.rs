//! The [`DataLoader`]: seeded epoch orders, batching, worker threads that load, decode and augment
//! ahead of the consumer, an optional cache of decoded samples, and sharding for data-parallel
//! training.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use super::buffers::{BufferPool, BufferSource};
use super::dataset::Dataset;
use super::sample::{Image, Sample};
use super::transforms::{Transform, sample_rng};
use crate::rng::{Rng, mix_seed};
use crate::tensor::Tensor;
use crate::{Error, Result};

/// A batch: inputs `[n, C, H, W]`, contiguous f32, with the label and dataset index of each of
/// the `n` samples. Hand it back with [`DataLoader::recycle`] to reuse its memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// The images, `[n, C, H, W]`.
    pub inputs: Tensor,
    /// The class labels, one per image.
    pub labels: Vec<u32>,
    /// Each sample's index in the dataset.
    pub indices: Vec<usize>,
}

impl Batch {
    /// The number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch holds no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Salt that keeps epoch orders independent of the augmentation and split streams of one seed.
const SHUFFLE_SALT: u64 = 0x5348_5546_464c_4531;

/// A decoded sample as the cache keeps it: as bytes when every value is an integer in 0..=255
/// (what byte-sourced datasets produce; a quarter of the memory), else as floats.
enum Cached {
    Bytes { shape: [usize; 3], data: Vec<u8>, label: u32 },
    Floats(Sample),
}

impl Cached {
    fn new(sample: &Sample) -> Cached {
        let data = sample.image.data();
        // Bit-exact round trip through u8: integers 0..=255, not -0.0, not NaN.
        if data.iter().all(|&v| (v as u8 as f32).to_bits() == v.to_bits()) {
            Cached::Bytes {
                shape: sample.image.shape(),
                data: data.iter().map(|&v| v as u8).collect(),
                label: sample.label,
            }
        } else {
            Cached::Floats(sample.clone())
        }
    }

    fn sample(&self) -> Result<Sample> {
        match self {
            Cached::Bytes { shape, data, label } => {
                Ok(Sample { image: Image::from_chw_u8(shape[0], shape[1], shape[2], data)?, label: *label })
            }
            Cached::Floats(s) => Ok(s.clone()),
        }
    }
}

/// What stays the same from epoch to epoch; shared with the workers.
struct Inner {
    dataset: Arc<dyn Dataset>,
    transform: Option<Arc<dyn Transform>>,
    cache: Option<Vec<OnceLock<Cached>>>,
    buffers: Arc<dyn BufferSource>,
    batch_size: usize,
    shuffle: bool,
    drop_last: bool,
    workers: usize,
    prefetch: usize,
    seed: u64,
    rank: usize,
    world: usize,
}

/// Options for a [`DataLoader`]; [`DataLoader::builder`] makes one, [`build`] checks it.
///
/// [`build`]: DataLoaderBuilder::build
pub struct DataLoaderBuilder {
    dataset: Arc<dyn Dataset>,
    transform: Option<Arc<dyn Transform>>,
    buffers: Option<Arc<dyn BufferSource>>,
    batch_size: usize,
    shuffle: bool,
    drop_last: bool,
    workers: usize,
    prefetch: usize,
    seed: u64,
    cache: bool,
    rank: usize,
    world: usize,
}

impl DataLoaderBuilder {
    /// Samples per batch (default 1).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }

    /// A new random order every epoch (default false: dataset order).
    pub fn shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }

    /// Drop the last batch of an epoch when it is short (default false: it is delivered with just
    /// its own samples). With sharding it also trims the epoch to a multiple of the world size, so
    /// every rank gets the same number of batches.
    pub fn drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// Worker threads (default 0: batches are built on the consumer's thread when asked for).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Batches each worker may have ready ahead of the consumer (default 2, PyTorch's
    /// `prefetch_factor`).
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = n;
        self
    }

    /// The seed of the epoch orders and of the augmentation (default 0).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The preprocessing and augmentation applied to each sample.
    pub fn transform(mut self, t: impl Transform + 'static) -> Self {
        self.transform = Some(Arc::new(t));
        self
    }

    /// Keep each decoded sample in memory (before the transform) after its first load, so later
    /// epochs skip reading and decoding (default false). Byte-valued images are kept as bytes.
    pub fn cache(mut self, cache: bool) -> Self {
        self.cache = cache;
        self
    }

    /// Load only shard `rank` of `world`: every rank walks the same seeded epoch order, rank `r`
    /// taking positions `r, r + world, r + 2 * world, ...`. The shards are disjoint and together
    /// cover the epoch once; without `drop_last` their sizes differ by at most one sample.
    pub fn shard(mut self, rank: usize, world: usize) -> Self {
        self.rank = rank;
        self.world = world;
        self
    }

    /// Where batch buffers come from (default: a small [`BufferPool`] fed by
    /// [`DataLoader::recycle`]). A backend supplies its own to get page-locked memory.
    pub fn buffers(mut self, source: Arc<dyn BufferSource>) -> Self {
        self.buffers = Some(source);
        self
    }

    /// Checks the options.
    pub fn build(self) -> Result<DataLoader> {
        if self.batch_size == 0 {
            return Err(Error::config("batch_size", "must be at least 1"));
        }
        if self.prefetch == 0 {
            return Err(Error::config("prefetch", "must be at least 1"));
        }
        if self.world == 0 || self.rank >= self.world {
            return Err(Error::config(
                "shard",
                format!(
                    "rank must be below world size, world size at least 1: got rank {} of {}",
                    self.rank, self.world
                ),
            ));
        }
        let kept = (self.workers * (self.prefetch + 1) + 2).max(4);
        let buffers = self.buffers.unwrap_or_else(|| Arc::new(BufferPool::new(kept)));
        let cache = self.cache.then(|| (0..self.dataset.len()).map(|_| OnceLock::new()).collect());
        Ok(DataLoader {
            inner: Arc::new(Inner {
                dataset: self.dataset,
                transform: self.transform,
                cache,
                buffers,
                batch_size: self.batch_size,
                shuffle: self.shuffle,
                drop_last: self.drop_last,
                workers: self.workers,
                prefetch: self.prefetch,
                seed: self.seed,
                rank: self.rank,
                world: self.world,
            }),
        })
    }
}

/// Batches of a dataset, epoch after epoch.
///
/// How an epoch runs with `W` workers: batch `k` of the epoch is built by worker `k % W`, which
/// sends it down its own bounded channel (`prefetch` batches deep); the consumer receives batch
/// `k` from channel `k % W`. So batches arrive in order with no reordering buffer, at most
/// `W * (prefetch + 1)` batches exist ahead of the consumer, and one slow batch holds up only the
/// batches behind it (PyTorch's `DataLoader` works the same way). Dropping the [`Epoch`] raises a
/// stop flag that workers check between samples, closes the channels, and joins the workers.
///
/// Nothing a worker does depends on which worker it is: the epoch order is a pure function of
/// (seed, epoch), and a sample's augmentation of (seed, epoch, index) ([`sample_rng`]), so the
/// batches are the same for any number of workers, including none.
///
/// ```
/// use kiln::data::{DataLoader, TensorDataset};
/// use kiln::tensor::Tensor;
/// # fn main() -> kiln::Result<()> {
/// let ds = TensorDataset::new(Tensor::zeros(&[10, 1, 4, 4]), (0..10).collect())?;
/// let loader = DataLoader::builder(ds).batch_size(4).shuffle(true).seed(1).workers(2).build()?;
/// assert_eq!(loader.len(), 3);
/// for epoch in 0..2 {
///     let sizes: Vec<usize> = loader.epoch(epoch).map(|b| b.map(|b| b.len())).collect::<Result<_, _>>()?;
///     assert_eq!(sizes, [4, 4, 2]);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct DataLoader {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DataLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = &self.inner;
        f.debug_struct("DataLoader")
            .field("samples", &i.dataset.len())
            .field("batch_size", &i.batch_size)
            .field("shuffle", &i.shuffle)
            .field("drop_last", &i.drop_last)
            .field("workers", &i.workers)
            .field("prefetch", &i.prefetch)
            .field("seed", &i.seed)
            .field("cache", &i.cache.is_some())
            .field("shard", &(i.rank, i.world))
            .finish_non_exhaustive()
    }
}

impl DataLoader {
    /// Options for loading `dataset`; pass an `Arc` of it (`Arc::clone(&ds)`) to keep a handle.
    pub fn builder(dataset: impl Dataset + 'static) -> DataLoaderBuilder {
        DataLoaderBuilder {
            dataset: Arc::new(dataset),
            transform: None,
            buffers: None,
            batch_size: 1,
            shuffle: false,
            drop_last: false,
            workers: 0,
            prefetch: 2,
            seed: 0,
            cache: false,
            rank: 0,
            world: 1,
        }
    }

    /// Batches per epoch (of this shard).
    pub fn len(&self) -> usize {
        let n = self.num_samples();
        let bs = self.inner.batch_size;
        if self.inner.drop_last { n / bs } else { n.div_ceil(bs) }
    }

    /// Whether an epoch has no batches.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Samples this shard takes from each epoch (before `drop_last` drops a short batch).
    pub fn num_samples(&self) -> usize {
        let i = &self.inner;
        let n = i.dataset.len();
        if i.drop_last {
            n / i.world
        } else {
            // Positions rank, rank + world, ... below n.
            n.saturating_sub(i.rank).div_ceil(i.world)
        }
    }

    /// Samples per batch (the last may be shorter unless `drop_last`).
    pub fn batch_size(&self) -> usize {
        self.inner.batch_size
    }

    /// The shard this loader loads, `(rank, world)` ([`DataLoaderBuilder::shard`]; `(0, 1)`: all).
    pub fn shard(&self) -> (usize, usize) {
        (self.inner.rank, self.inner.world)
    }

    /// The dataset the batches come from.
    pub fn dataset(&self) -> &dyn Dataset {
        &*self.inner.dataset
    }

    /// The dataset indices this shard visits in `epoch`, in order (the samples of the batches
    /// `epoch(epoch)` yields, short batch included even under `drop_last`).
    pub fn indices(&self, epoch: u64) -> Vec<usize> {
        let i = &self.inner;
        let n = i.dataset.len();
        let mut order: Vec<usize> = (0..n).collect();
        if i.shuffle {
            Rng::new(mix_seed(mix_seed(i.seed, SHUFFLE_SALT), epoch)).shuffle(&mut order);
        }
        let take = if i.drop_last { n / i.world * i.world } else { n };
        order[..take].iter().skip(i.rank).step_by(i.world).copied().collect()
    }

    /// The batches of epoch `epoch`, in order. Each item is one batch or the error that kept it
    /// from being built (naming the sample and, where there is one, its file); iteration may go on
    /// past an error. Dropping the iterator early stops and joins the workers.
    pub fn epoch(&self, epoch: u64) -> Epoch {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` from batch `first` on (none if `first >= len()`), the same as
    /// `epoch(epoch).skip(first)` would give but without building the skipped batches: for
    /// resuming from a checkpoint taken mid-epoch, which needs only (seed, epoch, batches done).
    pub fn epoch_from(&self, epoch: u64, first: usize) -> Epoch {
        let job = Arc::new(EpochJob {
            inner: Arc::clone(&self.inner),
            epoch,
            order: self.indices(epoch),
            batches: self.len(),
            stop: AtomicBool::new(false),
        });
        let mut it = Epoch {
            next: first,
            first,
            batches: job.batches,
            receivers: Vec::new(),
            handles: Vec::new(),
            pending_error: None,
            done: false,
            job,
        };
        let workers = self.inner.workers.min(it.batches.saturating_sub(first));
        for w in 0..workers {
            let (tx, rx) = sync_channel(self.inner.prefetch);
            let job = Arc::clone(&it.job);
            let spawned = std::thread::Builder::new()
                .name(format!("kiln-data-{w}"))
                .spawn(move || worker(job, first + w, workers, tx));
            match spawned {
                Ok(h) => {
                    it.receivers.push(rx);
                    it.handles.push(Some(h));
                }
                Err(e) => {
                    it.pending_error =
                        Some(Error::State(format!("data loader: could not start worker thread {w} of {workers}: {e}")));
                    break;
                }
            }
        }
        it
    }

    /// Returns a batch's input buffer to the loader's buffer source for reuse.
    pub fn recycle(&self, batch: Batch) {
        self.inner.buffers.give(batch.inputs.into_data());
    }
}

/// One epoch's plan, shared by its workers.
struct EpochJob {
    inner: Arc<Inner>,
    epoch: u64,
    order: Vec<usize>,
    batches: usize,
    stop: AtomicBool,
}

impl EpochJob {
    /// Sample `index`, from the cache when it holds it.
    fn load(&self, index: usize) -> Result<Sample> {
        let Some(cache) = &self.inner.cache else {
            return self.inner.dataset.get(index);
        };
        let slot = cache.get(index).ok_or_else(|| Error::sample(index, "index out of range for the loader's cache"))?;
        if let Some(c) = slot.get() {
            return c.sample();
        }
        let sample = self.inner.dataset.get(index)?;
        // Another worker may have filled the slot meanwhile; its copy is the same.
        let _ = slot.set(Cached::new(&sample));
        Ok(sample)
    }

    /// An error about sample `index`, naming its file where the dataset has one.
    fn sample_error(&self, index: usize, reason: impl std::fmt::Display) -> Error {
        match self.inner.dataset.path(index) {
            Some(p) => Error::sample(index, format!("{}: {reason}", p.display())),
            None => Error::sample(index, reason.to_string()),
        }
    }

    /// Builds batch `k`; a pure function of the job and `k`.
    fn batch(&self, k: usize) -> Result<Batch> {
        let bs = self.inner.batch_size;
        let indices = self.order[k * bs..((k + 1) * bs).min(self.order.len())].to_vec();
        let mut labels = Vec::with_capacity(indices.len());
        let mut out: Option<(Vec<f32>, [usize; 3])> = None;
        let result = (|| {
            for (j, &index) in indices.iter().enumerate() {
                if self.stop.load(Ordering::Relaxed) {
                    return Err(Error::State("data loader epoch was dropped".into()));
                }
                let sample = self.load(index)?;
                let image = match &self.inner.transform {
                    None => sample.image,
                    Some(t) => {
                        let mut rng = sample_rng(self.inner.seed, self.epoch, index);
                        t.apply(sample.image, &mut rng).map_err(|e| self.sample_error(index, e))?
                    }
                };
                let (buf, shape) = out.get_or_insert_with(|| {
                    let len = indices.len() * image.data().len();
                    (self.inner.buffers.take(len), image.shape())
                });
                if image.shape() != *shape {
                    return Err(self.sample_error(
                        index,
                        format!(
                            "image is {} but the first of its batch (sample {}) is {}x{}x{}; \
                             a transform such as Resize or CenterCrop can make them agree",
                            image.dims(),
                            indices[0],
                            shape[0],
                            shape[1],
                            shape[2]
                        ),
                    ));
                }
                let n = image.data().len();
                buf[j * n..(j + 1) * n].copy_from_slice(image.data());
                labels.push(sample.label);
            }
            Ok(())
        })();
        match (result, out) {
            (Ok(()), Some((buf, [c, h, w]))) => {
                Ok(Batch { inputs: Tensor::new(&[indices.len(), c, h, w], buf)?, labels, indices })
            }
            (Ok(()), None) => Err(Error::State(format!("data loader: batch {k} is empty"))),
            (Err(e), out) => {
                if let Some((buf, _)) = out {
                    self.inner.buffers.give(buf);
                }
                Err(e)
            }
        }
    }

    /// [`batch`](Self::batch), with a panic (in a user's transform or dataset) turned into an
    /// error for that batch.
    fn batch_caught(&self, k: usize) -> Result<Batch> {
        catch_unwind(AssertUnwindSafe(|| self.batch(k))).unwrap_or_else(|payload| {
            Err(Error::State(format!(
                "data loader: panic while building batch {k} of epoch {}: {}",
                self.epoch,
                panic_message(&*payload)
            )))
        })
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// A worker: builds batches `start, start + workers, ...` and sends them in order until the
/// epoch ends or the consumer goes away.
fn worker(job: Arc<EpochJob>, start: usize, workers: usize, tx: SyncSender<Result<Batch>>) {
    for k in (start..job.batches).step_by(workers) {
        if job.stop.load(Ordering::Relaxed) {
            return;
        }
        let batch = job.batch_caught(k);
        if tx.send(batch).is_err() {
            return;
        }
    }
}

/// The batches of one epoch, in order: an iterator of `Result<Batch>`. See [`DataLoader::epoch`].
pub struct Epoch {
    job: Arc<EpochJob>,
    next: usize,
    /// The first batch of this iterator (0 unless resumed mid-epoch); batch k is worker
    /// (k - first) % workers's.
    first: usize,
    batches: usize,
    /// One channel per worker; empty when batches are built on the consumer's thread.
    receivers: Vec<Receiver<Result<Batch>>>,
    handles: Vec<Option<JoinHandle<()>>>,
    pending_error: Option<Error>,
    done: bool,
}

impl Iterator for Epoch {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if let Some(e) = self.pending_error.take() {
            self.done = true;
            return Some(Err(e));
        }
        if self.done || self.next >= self.batches {
            return None;
        }
        let k = self.next;
        self.next += 1;
        if self.receivers.is_empty() {
            return Some(self.job.batch_caught(k));
        }
        let w = (k - self.first) % self.receivers.len();
        match self.receivers[w].recv() {
            Ok(batch) => Some(batch),
            Err(_) => {
                // The worker ended without sending batch k: its thread died outside the guarded
                // batch building. Nothing more can come in order.
                self.done = true;
                let why = match self.handles[w].take().map(JoinHandle::join) {
                    Some(Err(payload)) => panic_message(&*payload),
                    _ => "it stopped".into(),
                };
                Some(Err(Error::State(format!("data loader worker {w} failed before batch {k}: {why}"))))
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = if self.pending_error.is_some() {
            1
        } else if self.done {
            0
        } else {
            self.batches.saturating_sub(self.next)
        };
        (left, Some(left))
    }
}

impl ExactSizeIterator for Epoch {}

impl Drop for Epoch {
    fn drop(&mut self) {
        self.job.stop.store(true, Ordering::Relaxed);
        // Closing the channels wakes any worker blocked on a full one.
        self.receivers.clear();
        for h in self.handles.iter_mut().filter_map(Option::take) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::TensorDataset;

    fn ds(n: usize) -> TensorDataset {
        let data = (0..n).map(|v| v as f32).collect();
        TensorDataset::new(Tensor::new(&[n, 1, 1, 1], data).unwrap(), (0..n as u32).collect()).unwrap()
    }

    #[test]
    fn config_is_checked() {
        assert!(DataLoader::builder(ds(3)).batch_size(0).build().is_err());
        assert!(DataLoader::builder(ds(3)).prefetch(0).build().is_err());
        assert!(DataLoader::builder(ds(3)).shard(2, 2).build().is_err());
        assert!(DataLoader::builder(ds(3)).shard(0, 0).build().is_err());
    }

    #[test]
    fn lengths_per_shard() {
        let l = |n, bs, drop, rank, world| {
            let dl = DataLoader::builder(ds(n)).batch_size(bs).drop_last(drop).shard(rank, world).build().unwrap();
            assert_eq!(dl.indices(0).len(), dl.num_samples());
            (dl.num_samples(), dl.len())
        };
        assert_eq!(l(10, 4, false, 0, 1), (10, 3));
        assert_eq!(l(10, 4, true, 0, 1), (10, 2));
        assert_eq!(l(9, 2, false, 0, 2), (5, 3));
        assert_eq!(l(9, 2, false, 1, 2), (4, 2));
        assert_eq!(l(9, 2, true, 0, 2), (4, 2));
        assert_eq!(l(9, 2, true, 1, 2), (4, 2));
        assert_eq!(l(1, 2, false, 2, 3), (0, 0));
        assert_eq!(l(0, 2, false, 0, 1), (0, 0));
    }

    #[test]
    fn cache_keeps_bytes_when_lossless() {
        let s = |v: f32| Sample { image: Image::new(1, 1, 2, vec![v, 255.0]).unwrap(), label: 1 };
        assert!(matches!(Cached::new(&s(3.0)), Cached::Bytes { .. }));
        assert!(matches!(Cached::new(&s(3.5)), Cached::Floats(_)));
        assert!(matches!(Cached::new(&s(-1.0)), Cached::Floats(_)));
        assert!(matches!(Cached::new(&s(-0.0)), Cached::Floats(_)));
        assert!(matches!(Cached::new(&s(256.0)), Cached::Floats(_)));
        assert_eq!(Cached::new(&s(3.0)).sample().unwrap(), s(3.0));
        assert_eq!(Cached::new(&s(0.25)).sample().unwrap(), s(0.25));
    }
}
