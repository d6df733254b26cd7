//! The DataLoader: order independent of worker count, each sample once per epoch, seeded shuffles,
//! drop_last and short batches, shards, errors and panics as items, clean early drop, the cache
//! and buffer recycling.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use kiln::data::{
    Batch, BufferSource, Compose, DataLoader, Dataset, Image, Lambda, RandomCrop, RandomHorizontalFlip, Sample,
};
use kiln::{Error, Result};

/// Sample `i` is a 1x2x2 image of value `i` everywhere, label `i % 10`. Counts its loads, and
/// can fail at one index or sleep on every load.
#[derive(Default)]
struct Numbers {
    n: usize,
    fail_at: Option<usize>,
    delay: Option<Duration>,
    loads: Arc<AtomicUsize>,
}

impl Numbers {
    fn new(n: usize) -> Self {
        Numbers { n, ..Default::default() }
    }
}

impl Dataset for Numbers {
    fn len(&self) -> usize {
        self.n
    }

    fn get(&self, index: usize) -> Result<Sample> {
        self.loads.fetch_add(1, Ordering::Relaxed);
        if let Some(d) = self.delay {
            std::thread::sleep(d);
        }
        if Some(index) == self.fail_at {
            return Err(Error::Format { path: format!("numbers/{index}.png").into(), reason: "corrupt".into() });
        }
        Ok(Sample { image: Image::new(1, 2, 2, vec![index as f32; 4])?, label: (index % 10) as u32 })
    }
}

fn all_batches(loader: &DataLoader, epoch: u64) -> Vec<Batch> {
    loader.epoch(epoch).map(|b| b.unwrap()).collect()
}

/// An augmentation that uses the per-sample generator: crop with padding, flip, plus noise.
fn augment() -> Compose {
    Compose::new().then(RandomCrop::new(2, 2).padding(1)).then(RandomHorizontalFlip::new(0.5)).then(Lambda(
        |mut img: Image, rng: &mut kiln::rng::Rng| {
            for v in img.data_mut() {
                *v += rng.uniform();
            }
            Ok(img)
        },
    ))
}

#[test]
fn batches_are_the_same_for_any_number_of_workers() {
    let make = |workers| {
        DataLoader::builder(Numbers::new(103))
            .batch_size(8)
            .shuffle(true)
            .seed(5)
            .workers(workers)
            .prefetch(1)
            .transform(augment())
            .build()
            .unwrap()
    };
    let reference = all_batches(&make(0), 3);
    assert_eq!(reference.len(), 13);
    for workers in [1, 4] {
        assert_eq!(all_batches(&make(workers), 3), reference, "{workers} workers");
    }
}

#[test]
fn every_sample_once_per_epoch() {
    let loader = DataLoader::builder(Numbers::new(50)).batch_size(7).shuffle(true).seed(1).workers(3).build().unwrap();
    for epoch in 0..3 {
        let batches = all_batches(&loader, epoch);
        let mut seen: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
        assert_eq!(seen, loader.indices(epoch));
        seen.sort_unstable();
        assert_eq!(seen, (0..50).collect::<Vec<_>>());
        // Inputs and labels belong to the indices.
        for b in &batches {
            for (j, &i) in b.indices.iter().enumerate() {
                assert_eq!(b.labels[j], (i % 10) as u32);
                assert_eq!(&b.inputs.data()[j * 4..(j + 1) * 4], &[i as f32; 4]);
            }
        }
    }
}

#[test]
fn shuffling_is_seeded_per_epoch() {
    let make = |seed, shuffle| DataLoader::builder(Numbers::new(40)).shuffle(shuffle).seed(seed).build().unwrap();
    let a = make(11, true);
    assert_ne!(a.indices(0), a.indices(1));
    assert_eq!(a.indices(1), make(11, true).indices(1));
    assert_ne!(a.indices(1), make(12, true).indices(1));
    assert_ne!(a.indices(0), (0..40).collect::<Vec<_>>());
    assert_eq!(make(11, false).indices(4), (0..40).collect::<Vec<_>>());
    // The iterated order is the planned one.
    let seen: Vec<usize> = all_batches(&a, 1).into_iter().flat_map(|b| b.indices).collect();
    assert_eq!(seen, a.indices(1));
}

#[test]
fn drop_last_and_the_short_last_batch() {
    let make = |drop_last| {
        DataLoader::builder(Numbers::new(10))
            .batch_size(4)
            .shuffle(true)
            .seed(2)
            .workers(2)
            .drop_last(drop_last)
            .build()
            .unwrap()
    };
    let keep = make(false);
    assert_eq!(keep.len(), 3);
    let batches = all_batches(&keep, 0);
    let sizes: Vec<usize> = batches.iter().map(Batch::len).collect();
    assert_eq!(sizes, [4, 4, 2]);
    let last = &batches[2];
    assert_eq!(last.inputs.shape(), &[2, 1, 2, 2]);
    assert_eq!(last.indices, keep.indices(0)[8..]);
    let want: Vec<f32> = last.indices.iter().flat_map(|&i| [i as f32; 4]).collect();
    assert_eq!(last.inputs.data(), &want[..]);

    let drop = make(true);
    assert_eq!(drop.len(), 2);
    let batches = all_batches(&drop, 0);
    assert_eq!(batches.len(), 2);
    assert!(batches.iter().all(|b| b.len() == 4));
    assert_eq!(batches[1].indices, keep.indices(0)[4..8]);
}

#[test]
fn shards_are_disjoint_and_cover_the_epoch() {
    let world = 3;
    let n = 29;
    let whole = DataLoader::builder(Numbers::new(n)).shuffle(true).seed(8).build().unwrap();
    for epoch in 0..2 {
        let mut union = Vec::new();
        for rank in 0..world {
            let shard = DataLoader::builder(Numbers::new(n))
                .batch_size(4)
                .shuffle(true)
                .seed(8)
                .workers(2)
                .shard(rank, world)
                .build()
                .unwrap();
            let seen: Vec<usize> = all_batches(&shard, epoch).into_iter().flat_map(|b| b.indices).collect();
            // Rank r takes positions r, r + world, ... of the common order.
            let want: Vec<usize> = whole.indices(epoch).into_iter().skip(rank).step_by(world).collect();
            assert_eq!(seen, want);
            union.extend(seen);
        }
        union.sort_unstable();
        assert_eq!(union, (0..n).collect::<Vec<_>>(), "each sample exactly once");
    }
    // With drop_last every rank gets the same number of batches.
    let lens: Vec<usize> = (0..world)
        .map(|rank| {
            DataLoader::builder(Numbers::new(n)).batch_size(4).drop_last(true).shard(rank, world).build().unwrap().len()
        })
        .collect();
    assert_eq!(lens, [2, 2, 2]);
}

#[test]
fn a_failing_sample_fails_only_its_batch() {
    for workers in [0, 3] {
        let loader = DataLoader::builder(Numbers { n: 20, fail_at: Some(9), ..Default::default() })
            .batch_size(4)
            .workers(workers)
            .build()
            .unwrap();
        let results: Vec<_> = loader.epoch(0).collect();
        assert_eq!(results.len(), 5);
        for (k, r) in results.iter().enumerate() {
            if k == 2 {
                let err = r.as_ref().unwrap_err();
                assert!(err.to_string().contains("numbers/9.png"), "{err}");
            } else {
                assert_eq!(r.as_ref().unwrap().indices[0], 4 * k, "batch {k}");
            }
        }
    }
}

#[test]
fn transform_errors_and_mismatched_shapes_name_the_sample() {
    // A crop too large for sample 6 only.
    let picky = Lambda(
        |img: Image, rng: &mut kiln::rng::Rng| {
            if img.data()[0] == 6.0 { RandomCrop::new(5, 5).apply_to(img, rng) } else { Ok(img) }
        },
    );
    let loader = DataLoader::builder(Numbers::new(8)).batch_size(4).transform(picky).workers(2).build().unwrap();
    let results: Vec<_> = loader.epoch(0).collect();
    assert!(results[0].is_ok());
    let err = results[1].as_ref().unwrap_err();
    assert!(matches!(err, Error::Sample { index: 6, .. }), "{err}");
    assert!(err.to_string().contains("RandomCrop"), "{err}");

    // Sample 3 comes out bigger than the rest of its batch.
    let grow = Lambda(
        |img: Image, _: &mut kiln::rng::Rng| {
            if img.data()[0] == 3.0 { Ok(Image::zeros(1, 3, 3)) } else { Ok(img) }
        },
    );
    let loader = DataLoader::builder(Numbers::new(8)).batch_size(4).transform(grow).build().unwrap();
    let err = loader.epoch(0).next().unwrap().unwrap_err();
    assert!(matches!(err, Error::Sample { index: 3, .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("1x3x3") && msg.contains("1x2x2"), "{msg}");
}

/// Lets a test call a transform in a closure without importing the trait at each call.
trait ApplyTo {
    fn apply_to(&self, img: Image, rng: &mut kiln::rng::Rng) -> Result<Image>;
}

impl<T: kiln::data::Transform> ApplyTo for T {
    fn apply_to(&self, img: Image, rng: &mut kiln::rng::Rng) -> Result<Image> {
        self.apply(img, rng)
    }
}

#[test]
fn a_panicking_transform_is_an_error_item_not_a_panic() {
    let boom = || {
        Lambda(|img: Image, _: &mut kiln::rng::Rng| {
            if img.data()[0] == 5.0 {
                panic!("transform exploded on purpose");
            }
            Ok(img)
        })
    };
    for workers in [0, 2] {
        let loader =
            DataLoader::builder(Numbers::new(8)).batch_size(2).transform(boom()).workers(workers).build().unwrap();
        let results: Vec<_> = loader.epoch(0).collect();
        assert_eq!(results.len(), 4);
        let err = results[2].as_ref().unwrap_err();
        assert!(err.to_string().contains("exploded on purpose"), "{err}");
        assert!(results[3].is_ok(), "iteration goes on after the failed batch");
    }
}

#[test]
fn dropping_mid_epoch_stops_the_workers() {
    let loads = Arc::new(AtomicUsize::new(0));
    let loader = DataLoader::builder(Numbers {
        n: 2000,
        delay: Some(Duration::from_millis(2)),
        loads: Arc::clone(&loads),
        ..Default::default()
    })
    .batch_size(10)
    .workers(4)
    .prefetch(2)
    .build()
    .unwrap();
    let mut epoch = loader.epoch(0);
    epoch.next().unwrap().unwrap();
    epoch.next().unwrap().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        drop(epoch);
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(20)).expect("dropping the epoch returned (workers joined)");
    let after_drop = loads.load(Ordering::Relaxed);
    // At most the batches in flight were loaded: 4 workers x (2 queued + 1 building) + 2 taken.
    assert!(after_drop <= 10 * (4 * 3 + 2), "{after_drop} loads");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(loads.load(Ordering::Relaxed), after_drop, "no worker still loading");
    // Dropping the loader and a fresh epoch is fine too.
    let mut e = loader.epoch(1);
    e.next().unwrap().unwrap();
    drop(loader);
    assert!(e.next().unwrap().is_ok(), "an epoch outlives its loader");
}

#[test]
fn cache_loads_each_sample_once_and_changes_nothing() {
    let loads = Arc::new(AtomicUsize::new(0));
    let make = |cache, loads: Arc<AtomicUsize>| {
        DataLoader::builder(Numbers { n: 30, loads, ..Default::default() })
            .batch_size(8)
            .shuffle(true)
            .workers(2)
            .cache(cache)
            .transform(augment())
            .build()
            .unwrap()
    };
    let cached = make(true, Arc::clone(&loads));
    let plain = make(false, Arc::new(AtomicUsize::new(0)));
    for epoch in 0..3 {
        assert_eq!(all_batches(&cached, epoch), all_batches(&plain, epoch));
    }
    assert_eq!(loads.load(Ordering::Relaxed), 30);
}

/// A buffer source that records what passes through it.
#[derive(Default)]
struct Recorder {
    taken: Mutex<Vec<usize>>,
    given: AtomicUsize,
}

impl BufferSource for Recorder {
    fn take(&self, len: usize) -> Vec<f32> {
        self.taken.lock().unwrap().push(len);
        vec![f32::NAN; len]
    }
    fn give(&self, _: Vec<f32>) {
        self.given.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn batch_buffers_come_from_the_source_and_are_recycled() {
    // The default pool: a recycled buffer is filled again.
    let loader = DataLoader::builder(Numbers::new(12)).batch_size(4).build().unwrap();
    let mut epoch = loader.epoch(0);
    let first = epoch.next().unwrap().unwrap();
    let ptr = first.inputs.data().as_ptr();
    loader.recycle(first);
    let second = epoch.next().unwrap().unwrap();
    assert_eq!(second.inputs.data().as_ptr(), ptr);
    assert_eq!(second.indices, [4, 5, 6, 7]);
    assert_eq!(second.inputs.data()[0], 4.0);

    // A caller's source: every batch buffer comes from it (NaN-filled, so all overwritten).
    let rec = Arc::new(Recorder::default());
    let loader = DataLoader::builder(Numbers::new(10))
        .batch_size(4)
        .workers(2)
        .buffers(Arc::clone(&rec) as Arc<dyn BufferSource>)
        .build()
        .unwrap();
    for b in loader.epoch(0) {
        let b = b.unwrap();
        assert!(b.inputs.data().iter().all(|v| !v.is_nan()));
        loader.recycle(b);
    }
    // Two workers take buffers concurrently: compare as a multiset.
    let mut taken = rec.taken.lock().unwrap().clone();
    taken.sort_unstable();
    assert_eq!(taken, [8, 16, 16]);
    assert_eq!(rec.given.load(Ordering::Relaxed), 3);
}

#[test]
fn length_and_size_hint_agree() {
    let loader = DataLoader::builder(Numbers::new(10)).batch_size(3).workers(2).build().unwrap();
    let mut e = loader.epoch(0);
    assert_eq!(e.len(), 4);
    e.next();
    assert_eq!(e.len(), 3);
    assert_eq!(e.count(), 3);
    let empty = DataLoader::builder(Numbers::new(0)).workers(2).build().unwrap();
    assert!(empty.is_empty());
    assert_eq!(empty.epoch(0).count(), 0);
}

#[test]
fn resuming_mid_epoch_gives_the_remaining_batches() {
    for workers in [0, 3] {
        let loader = DataLoader::builder(Numbers::new(50))
            .batch_size(6)
            .shuffle(true)
            .seed(4)
            .workers(workers)
            .transform(augment())
            .build()
            .unwrap();
        let whole = all_batches(&loader, 2);
        let rest: Vec<Batch> = loader.epoch_from(2, 4).map(|b| b.unwrap()).collect();
        assert_eq!(rest, whole[4..], "{workers} workers");
        assert_eq!(loader.epoch_from(2, 4).len(), whole.len() - 4);
        assert_eq!(loader.epoch_from(2, 99).count(), 0);
    }
}
