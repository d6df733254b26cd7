//! Data loader throughput: images/s for decoding 32x32 PNGs and augmenting them CIFAR-style
//! (random crop with 4 pixels of padding, horizontal flip, scale to [0, 1], normalise).
//!
//! Writes a 10-class x 500-image folder of 32x32 RGB PNGs to a temporary directory (smooth
//! gradients plus noise, so they compress about as badly as real photos do), then times epochs of
//! a `DataLoader` over it, cache off, with 0 (consumer thread), 1 and 2 workers, plus two reference
//! rows: decoding alone, and the cache on (augmentation alone). Run with
//!
//! ```text
//! cargo run --release --example loader_bench [-- IMAGES_PER_CLASS EPOCHS]
//! ```
//!
//! Results are recorded in BENCHMARKS.md.

use std::error::Error;
use std::path::Path;
use std::time::Instant;

use kiln::data::{Compose, DataLoader, Dataset, ImageFolder, Normalize, RandomCrop, RandomHorizontalFlip, ToFloat};
use kiln::rng::Rng;

const CLASSES: usize = 10;
const SIDE: u32 = 32;
const BATCH: usize = 128;

fn write_images(root: &Path, per_class: usize) -> Result<u64, Box<dyn Error>> {
    let mut rng = Rng::new(2024);
    let mut bytes = 0;
    for class in 0..CLASSES {
        let dir = root.join(format!("class_{class:02}"));
        std::fs::create_dir_all(&dir)?;
        for i in 0..per_class {
            let (a, b) = (rng.uniform() * 4.0, rng.uniform() * 4.0);
            let mut px = Vec::with_capacity((SIDE * SIDE * 3) as usize);
            for y in 0..SIDE {
                for x in 0..SIDE {
                    for c in 0..3 {
                        let base = 128.0
                            + 60.0 * ((x as f32 * a + c as f32) / 8.0).sin()
                            + 50.0 * ((y as f32 * b + class as f32) / 8.0).cos();
                        let noise = (rng.uniform() - 0.5) * 40.0;
                        px.push((base + noise).clamp(0.0, 255.0) as u8);
                    }
                }
            }
            let path = dir.join(format!("{i:04}.png"));
            image::save_buffer(&path, &px, SIDE, SIDE, image::ExtendedColorType::Rgb8)?;
            bytes += std::fs::metadata(&path)?.len();
        }
    }
    Ok(bytes)
}

fn augment() -> Result<Compose, Box<dyn Error>> {
    Ok(Compose::new()
        .then(RandomCrop::new(32, 32).padding(4))
        .then(RandomHorizontalFlip::new(0.5))
        .then(ToFloat)
        .then(Normalize::new(&[0.4914, 0.4822, 0.4465], &[0.2470, 0.2435, 0.2616])?))
}

/// Times `epochs` epochs after one warm-up epoch; returns images/s of each timed epoch.
fn run(loader: &DataLoader, epochs: u64) -> Result<Vec<f64>, Box<dyn Error>> {
    let mut rates = Vec::new();
    let mut checksum = 0.0f64;
    for epoch in 0..=epochs {
        let start = Instant::now();
        let mut images = 0;
        for batch in loader.epoch(epoch) {
            let batch = batch?;
            images += batch.len();
            checksum += batch.inputs.data()[0] as f64;
            loader.recycle(batch);
        }
        let secs = start.elapsed().as_secs_f64();
        if epoch > 0 {
            rates.push(images as f64 / secs);
        }
    }
    std::hint::black_box(checksum);
    Ok(rates)
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let per_class: usize = args.get(1).map_or(Ok(500), |s| s.parse())?;
    let epochs: u64 = args.get(2).map_or(Ok(5), |s| s.parse())?;

    let root = std::env::temp_dir().join(format!("kiln-loader-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let t = Instant::now();
    let bytes = write_images(&root, per_class)?;
    let n = CLASSES * per_class;
    println!(
        "wrote {n} PNGs of {SIDE}x{SIDE} RGB ({:.1} KiB on average) in {:.2} s to {}",
        bytes as f64 / n as f64 / 1024.0,
        t.elapsed().as_secs_f64(),
        root.display()
    );

    let t = Instant::now();
    let folder = std::sync::Arc::new(ImageFolder::new(&root)?);
    println!(
        "ImageFolder::new (list + header check of {} files): {:.1} ms",
        folder.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
    println!("batch {BATCH}, {epochs} timed epochs after 1 warm-up, shuffled; images/s per epoch: median (min..max)");

    let configs: [(&str, usize, bool, bool); 5] = [
        ("decode + augment, 0 workers (consumer thread)", 0, true, false),
        ("decode + augment, 1 worker", 1, true, false),
        ("decode + augment, 2 workers", 2, true, false),
        ("decode only, 2 workers", 2, false, false),
        ("augment only (cache on), 2 workers", 2, true, true),
    ];
    for (name, workers, with_augment, cache) in configs {
        let mut b = DataLoader::builder(std::sync::Arc::clone(&folder))
            .batch_size(BATCH)
            .shuffle(true)
            .seed(1)
            .workers(workers)
            .cache(cache);
        if with_augment {
            b = b.transform(augment()?);
        }
        let mut rates = run(&b.build()?, epochs)?;
        rates.sort_by(f64::total_cmp);
        let median = rates[rates.len() / 2];
        println!("{name:<48} {median:>9.0}  ({:.0}..{:.0})", rates[0], rates[rates.len() - 1]);
    }
    std::fs::remove_dir_all(&root)?;
    Ok(())
}
