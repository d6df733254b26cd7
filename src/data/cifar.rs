//! CIFAR-10 in its binary format: files of 3,073-byte records, each one label byte (0..=9)
//! followed by a 32x32 RGB image stored channel by channel (1,024 red, 1,024 green, 1,024 blue
//! bytes), which is already the CHW order kiln uses.

use std::fs;
use std::path::{Path, PathBuf};

use super::dataset::{Dataset, out_of_range};
use super::idx::Split;
use super::sample::{Image, Sample};
use crate::{Error, Result};

const SIDE: usize = 32;
const PIXELS: usize = 3 * SIDE * SIDE;
const RECORD: usize = 1 + PIXELS;

const CLASSES: [&str; 10] = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// CIFAR-10: 32x32 RGB images (3 channels, 0..=255) in 10 classes, held in memory as bytes
/// (154 MB for the 50,000 training images).
#[derive(Clone, Debug)]
pub struct Cifar10 {
    images: Vec<u8>,
    labels: Vec<u8>,
    classes: Vec<String>,
}

impl Cifar10 {
    /// From `dir` holding `data_batch_1.bin` ... `data_batch_5.bin` (train) or `test_batch.bin`
    /// (test), or holding the archive's `cifar-10-batches-bin/` folder that does.
    pub fn new(dir: impl AsRef<Path>, split: Split) -> Result<Self> {
        let mut dir = dir.as_ref().to_path_buf();
        if !dir.join("test_batch.bin").exists() && dir.join("cifar-10-batches-bin").is_dir() {
            dir.push("cifar-10-batches-bin");
        }
        let files: Vec<PathBuf> = match split {
            Split::Train => (1..=5).map(|i| dir.join(format!("data_batch_{i}.bin"))).collect(),
            Split::Test => vec![dir.join("test_batch.bin")],
        };
        Cifar10::from_files(&files)
    }

    /// From the given batch files, concatenated in that order.
    pub fn from_files<P: AsRef<Path>>(files: &[P]) -> Result<Self> {
        if files.is_empty() {
            return Err(Error::config("Cifar10::from_files", "no batch files given (expected data_batch_N.bin files)"));
        }
        let mut images = Vec::new();
        let mut labels = Vec::new();
        for path in files {
            let path = path.as_ref();
            let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
            if bytes.is_empty() || bytes.len() % RECORD != 0 {
                return Err(Error::format(
                    path,
                    format!(
                        "length {} is not a positive multiple of the {RECORD}-byte CIFAR-10 \
                         record (1 label byte + 3x32x32 pixel bytes)",
                        bytes.len()
                    ),
                ));
            }
            images.reserve(bytes.len() / RECORD * PIXELS);
            for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
                if rec[0] as usize >= CLASSES.len() {
                    return Err(Error::format(path, format!("record {i} has label {}, expected 0..=9", rec[0])));
                }
                labels.push(rec[0]);
                images.extend_from_slice(&rec[1..]);
            }
        }
        Ok(Cifar10 { images, labels, classes: CLASSES.iter().map(|s| s.to_string()).collect() })
    }

    /// The labels, in sample order.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }
}

impl Dataset for Cifar10 {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn get(&self, index: usize) -> Result<Sample> {
        let label = *self.labels.get(index).ok_or_else(|| out_of_range(index, self.labels.len()))?;
        let image = Image::from_chw_u8(3, SIDE, SIDE, &self.images[index * PIXELS..(index + 1) * PIXELS])?;
        Ok(Sample { image, label: label as u32 })
    }

    fn classes(&self) -> Option<&[String]> {
        Some(&self.classes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-cifar-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// A record whose label is `label` and whose pixel p of channel c is `(c * 7 + p + label) % 256`.
    fn record(label: u8) -> Vec<u8> {
        let mut r = vec![label];
        for c in 0..3 {
            r.extend((0..1024).map(|p| ((c * 7 + p + label as usize) % 256) as u8));
        }
        r
    }

    #[test]
    fn reads_records_as_chw_and_checks_lengths() {
        let dir = temp_dir("ok");
        let mut bytes = record(3);
        bytes.extend(record(9));
        fs::write(dir.join("test_batch.bin"), &bytes).unwrap();
        let ds = Cifar10::new(&dir, Split::Test).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.classes().unwrap()[9], "truck");
        let s = ds.get(1).unwrap();
        assert_eq!(s.label, 9);
        assert_eq!(s.image.shape(), [3, 32, 32]);
        // channel 2, row 1, column 3: pixel 35 of the blue plane.
        assert_eq!(s.image.pixel(2, 1, 3), (14 + 35 + 9) as f32);
        assert!(ds.get(2).is_err());

        fs::write(dir.join("test_batch.bin"), &bytes[..RECORD + 100]).unwrap();
        let err = Cifar10::new(&dir, Split::Test).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("test_batch.bin") && msg.contains("3173"), "{msg}");

        let mut bad = record(3);
        bad[0] = 10;
        fs::write(dir.join("test_batch.bin"), &bad).unwrap();
        let err = Cifar10::new(&dir, Split::Test).unwrap_err();
        assert!(err.to_string().contains("record 0 has label 10"), "{err}");

        let err = Cifar10::new(&dir, Split::Train).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert!(err.to_string().contains("data_batch_1.bin"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn finds_the_archive_folder() {
        let dir = temp_dir("nested");
        let inner = dir.join("cifar-10-batches-bin");
        fs::create_dir_all(&inner).unwrap();
        for i in 1..=5 {
            fs::write(inner.join(format!("data_batch_{i}.bin")), record(i)).unwrap();
        }
        let ds = Cifar10::new(&dir, Split::Train).unwrap();
        let labels: Vec<u32> = (0..5).map(|i| ds.get(i).unwrap().label).collect();
        assert_eq!(labels, [1, 2, 3, 4, 5]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
