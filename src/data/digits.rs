//! The 8x8 handwritten digits, embedded in the library so training works on any machine with no
//! download: 1,797 greyscale images of 8x8 pixels, 10 classes (`"0"` to `"9"`). The file and its
//! provenance and licence are beside this one (`digits.csv.gz`, `digits.LICENSE.md`): UCI's
//! "Optical Recognition of Handwritten Digits" test set, as scikit-learn ships it.
//!
//! ```
//! use kiln::data::{Dataset, digits};
//! let d = digits().unwrap();
//! assert_eq!(d.len(), 1797);
//! assert_eq!(d.get(0).unwrap().image.shape(), [1, 8, 8]);
//! ```

use std::io::Read;

use flate2::read::GzDecoder;

use super::dataset::TensorDataset;
use crate::tensor::Tensor;
use crate::{Error, Result};

/// The compressed file, embedded in the binary (57,523 bytes).
const DIGITS_CSV_GZ: &[u8] = include_bytes!("digits.csv.gz");

/// Number of images in the embedded digits.
pub const DIGITS_LEN: usize = 1797;

/// The embedded 8x8 digits as a dataset of `[1, 8, 8]` images with class names `"0"`..`"9"`.
///
/// The file's pixels count "on" pixels in 4x4 blocks (0..=16); they are scaled by 255/16 to the
/// 0..=255 range of the other byte-valued datasets, so [`super::ToFloat`] maps them to [0, 1].
pub fn digits() -> Result<TensorDataset> {
    let bad = |reason: String| Error::format(std::path::Path::new("<embedded digits.csv.gz>"), reason);
    let mut text = String::new();
    GzDecoder::new(DIGITS_CSV_GZ).read_to_string(&mut text).map_err(|e| bad(format!("cannot decompress: {e}")))?;
    let mut pixels = Vec::with_capacity(DIGITS_LEN * 64);
    let mut labels = Vec::with_capacity(DIGITS_LEN);
    for (i, line) in text.lines().enumerate() {
        let values: Vec<f32> = line
            .split(',')
            .map(|v| v.trim().parse::<f32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad(format!("line {}: {e}", i + 1)))?;
        if values.len() != 65 {
            return Err(bad(format!("line {}: {} values, expected 65", i + 1, values.len())));
        }
        pixels.extend(values[..64].iter().map(|v| v * (255.0 / 16.0)));
        labels.push(values[64] as u32);
    }
    let n = labels.len();
    let classes = (0..10).map(|d| d.to_string()).collect();
    TensorDataset::new(Tensor::new(&[n, 1, 8, 8], pixels)?, labels)?.with_classes(classes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Dataset;

    #[test]
    fn embedded_digits_are_complete_and_balanced() {
        let d = digits().unwrap();
        assert_eq!(d.len(), DIGITS_LEN);
        let mut counts = [0usize; 10];
        for &l in d.labels() {
            counts[l as usize] += 1;
        }
        // sklearn.datasets.load_digits(): np.bincount(y) == [178 182 177 183 181 182 181 179 174 180]
        assert_eq!(counts, [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]);
        let first = d.get(0).unwrap();
        assert_eq!(first.label, 0);
        // load_digits().images[0][0] == [0, 0, 5, 13, 9, 1, 0, 0]
        let row: Vec<f32> = first.image.data()[..8].iter().map(|v| v * 16.0 / 255.0).collect();
        let expect = [0.0, 0.0, 5.0, 13.0, 9.0, 1.0, 0.0, 0.0];
        assert!(row.iter().zip(expect).all(|(a, b)| (a - b).abs() < 1e-4), "{row:?}");
    }
}
