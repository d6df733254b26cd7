//! Trains a small CNN on a class-per-folder tree of JPEG/PNG images (the layout of go-metal's
//! cats-vs-dogs tutorial: `root/cats/*.jpg`, `root/dogs/*.jpg`), with augmentation and a seeded
//! validation split.
//!
//!     cargo run --release --example image_folder -- [DIR] [--epochs N] [--size PX]
//!
//! Without DIR it first writes a synthetic tree to a temporary folder (two classes, "circles" and
//! "squares", 300 images each of varied sizes and colours, PNG and JPEG mixed, plus one corrupt
//! file that the loader reports and skips), so it runs with no download.

use std::path::{Path, PathBuf};

use kiln::data::{
    ColorJitter, Compose, DataLoader, Dataset, ImageFolder, Normalize, OnError, RandomHorizontalFlip, RandomRotation,
    Resize, ResizeMode, ToFloat, split,
};
use kiln::model::{Conv2d, ModelBuilder};
use kiln::rng::Rng;
use kiln::train::{EarlyStopping, Logger, Monitor, Optimizer, Schedule, Trainer, TrainerConfig};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Writes `per_class` images of each class: a filled circle or square on a noisy background.
fn write_synthetic_tree(root: &Path, per_class: usize) -> anyhow::Result<()> {
    let mut rng = Rng::new(11);
    for (class, name) in ["circles", "squares"].iter().enumerate() {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        for i in 0..per_class {
            let (w, h) = (48 + rng.below(40) as u32, 48 + rng.below(40) as u32);
            let fg = [rng.below(256) as u8, rng.below(256) as u8, rng.below(256) as u8];
            let bg = [255 - fg[0], 255 - fg[1], 255 - fg[2]];
            let (cx, cy) = (w as f32 * rng.uniform_range(0.35, 0.65), h as f32 * rng.uniform_range(0.35, 0.65));
            let r = w.min(h) as f32 * rng.uniform_range(0.2, 0.35);
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                let (dx, dy) = (x as f32 - cx, y as f32 - cy);
                let inside = if class == 0 { dx * dx + dy * dy < r * r } else { dx.abs() < r && dy.abs() < r };
                let noise = (rng.below(41) as i32 - 20) as i16;
                let c = if inside { fg } else { bg };
                image::Rgb(c.map(|v| (v as i16 + noise).clamp(0, 255) as u8))
            });
            let ext = if i % 2 == 0 { "png" } else { "jpg" };
            img.save(dir.join(format!("{name}_{i:04}.{ext}")))?;
        }
    }
    std::fs::write(root.join("squares").join("broken.png"), b"\x89PNG\r\n\x1a\nthis is not a PNG")?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let epochs: usize = arg(&args, "--epochs", 25);
    let size: usize = arg(&args, "--size", 48);
    let given = args.first().filter(|a| !a.starts_with("--"));
    let root: PathBuf = match given {
        Some(d) => d.into(),
        None => {
            let d = std::env::temp_dir().join(format!("kiln-image-folder-{}", std::process::id()));
            println!("no folder given: writing a synthetic two-class tree to {}", d.display());
            write_synthetic_tree(&d, 300)?;
            d
        }
    };

    let folder = ImageFolder::builder(&root).channels(3).on_error(OnError::Skip).build()?;
    let classes = folder.classes().map(|c| c.to_vec()).unwrap_or_default();
    println!(
        "{} images in {} classes {:?}; {} skipped",
        folder.files().len(),
        classes.len(),
        classes,
        folder.skipped().len()
    );
    let (train_set, val_set) = split(folder, 0.2, 7)?;
    let mean = [0.5, 0.5, 0.5];
    let std = [0.25, 0.25, 0.25];
    let augment = Compose::new()
        .then(Resize::new(size, size).mode(ResizeMode::KeepAspectCrop))
        .then(RandomHorizontalFlip::new(0.5))
        .then(RandomRotation::new(10.0)?)
        .then(ToFloat)
        .then(ColorJitter::new(0.2, 0.2, 0.2)?)
        .then(Normalize::new(&mean, &std)?);
    let plain = Compose::new()
        .then(Resize::new(size, size).mode(ResizeMode::KeepAspectCrop))
        .then(ToFloat)
        .then(Normalize::new(&mean, &std)?);
    let batch = 32;
    let train = DataLoader::builder(train_set)
        .batch_size(batch)
        .shuffle(true)
        .seed(3)
        .workers(1)
        .transform(augment)
        .cache(true)
        .build()?;
    let val = DataLoader::builder(val_set).batch_size(batch).workers(1).transform(plain).cache(true).build()?;

    let model = ModelBuilder::new(&[batch, 3, size, size])
        .conv2d_with(Conv2d::new(16, 3).padding(1).bias(false))
        .batch_norm()
        .relu()
        .max_pool2d(2)
        .conv2d_with(Conv2d::new(32, 3).padding(1).bias(false))
        .batch_norm()
        .relu()
        .max_pool2d(2)
        .conv2d_with(Conv2d::new(64, 3).padding(1).bias(false))
        .batch_norm()
        .relu()
        .global_avg_pool()
        .dropout(0.2)
        .dense(classes.len())
        .seed(5)
        .build()?;
    println!(
        "model: {} parameters; training on {} images, validating on {}",
        model.param_count(),
        train.num_samples(),
        val.num_samples()
    );
    let config = TrainerConfig {
        batch_size: batch,
        learning_rate: 3e-3,
        optimizer: Optimizer::adamw(),
        schedule: Some(Schedule::Cosine { t_max: epochs, eta_min: 1e-5 }),
        seed: 5,
        ..Default::default()
    };
    let mut trainer = Trainer::new(&model, config)?;
    let mut stop = EarlyStopping::new(Monitor::ValLoss, 5);
    trainer.fit_with(&train, Some(&val), epochs, &mut [&mut Logger, &mut stop])?;
    let m = trainer.evaluate(&val)?;
    println!("validation accuracy {:.1}% (loss {:.4})", m.accuracy.unwrap_or(0.0) * 100.0, m.loss);
    if given.is_none() {
        std::fs::remove_dir_all(&root)?;
    }
    Ok(())
}
