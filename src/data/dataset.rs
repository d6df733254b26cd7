//! The [`Dataset`] trait, the in-memory [`TensorDataset`], and [`Subset`] with the seeded
//! train/validation [`split`].
//!
//! The file formats (IDX, CIFAR-10, image folders) live in their own files; this one holds what
//! every dataset shares.

use std::path::Path;
use std::sync::Arc;

use super::sample::{Image, Sample};
use crate::rng::{Rng, mix_seed};
use crate::tensor::Tensor;
use crate::{Error, Result};

/// A finite, indexable collection of labelled images.
///
/// `Send + Sync` because the loader's worker threads share one dataset and call [`get`] from
/// several threads at once; implementations keep what they need in memory or open files per call.
///
/// [`get`]: Dataset::get
pub trait Dataset: Send + Sync {
    /// The number of samples.
    fn len(&self) -> usize;

    /// Whether the dataset has no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sample `index` (in `0..len()`), decoded but not augmented. An index out of range, an
    /// unreadable or corrupt file is an error naming the sample or the path.
    fn get(&self, index: usize) -> Result<Sample>;

    /// The class names in label order, where the dataset knows them.
    fn classes(&self) -> Option<&[String]> {
        None
    }

    /// The number of classes, where known: labels are in `0..num_classes()`.
    fn num_classes(&self) -> Option<usize> {
        self.classes().map(<[String]>::len)
    }

    /// The file sample `index` comes from, where there is one; the loader puts it in errors.
    fn path(&self, index: usize) -> Option<&Path> {
        let _ = index;
        None
    }
}

/// Lets an `Arc<D>` (or `Arc<dyn Dataset>`) be handed where a dataset is taken, to keep a handle.
impl<D: Dataset + ?Sized> Dataset for Arc<D> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        (**self).get(index)
    }
    fn classes(&self) -> Option<&[String]> {
        (**self).classes()
    }
    fn num_classes(&self) -> Option<usize> {
        (**self).num_classes()
    }
    fn path(&self, index: usize) -> Option<&Path> {
        (**self).path(index)
    }
}

impl<D: Dataset + ?Sized> Dataset for Box<D> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        (**self).get(index)
    }
    fn classes(&self) -> Option<&[String]> {
        (**self).classes()
    }
    fn num_classes(&self) -> Option<usize> {
        (**self).num_classes()
    }
    fn path(&self, index: usize) -> Option<&Path> {
        (**self).path(index)
    }
}

/// The error for an index past the end of a dataset.
pub(crate) fn out_of_range(index: usize, len: usize) -> Error {
    Error::sample(index, format!("index out of range for a dataset of {len} samples"))
}

/// Images held in memory: a tensor `[N, C, H, W]` (or `[N, H, W]`, taken as one channel, or
/// `[N, D]`, taken as `D` channels of 1x1) and one label per image.
#[derive(Clone, Debug)]
pub struct TensorDataset {
    chw: [usize; 3],
    data: Vec<f32>,
    labels: Vec<u32>,
    classes: Option<Vec<String>>,
    num_classes: Option<usize>,
}

impl TensorDataset {
    /// Checks that there is one label per image.
    pub fn new(images: Tensor, labels: Vec<u32>) -> Result<Self> {
        let chw = match *images.shape() {
            [_, c, h, w] => [c, h, w],
            [_, h, w] => [1, h, w],
            [_, d] => [d, 1, 1],
            _ => {
                return Err(Error::shape(
                    "TensorDataset images",
                    "[N, C, H, W], [N, H, W] or [N, D]",
                    format!("{:?}", images.shape()),
                ));
            }
        };
        let n = images.shape()[0];
        if labels.len() != n {
            return Err(Error::shape("TensorDataset labels", format!("{n} labels (one per image)"), labels.len()));
        }
        Ok(TensorDataset { chw, data: images.into_data(), labels, classes: None, num_classes: None })
    }

    /// Declares the number of classes; errors naming the first sample whose label is not below it.
    pub fn with_num_classes(mut self, n: usize) -> Result<Self> {
        if let Some((i, &l)) = self.labels.iter().enumerate().find(|&(_, &l)| l as usize >= n) {
            return Err(Error::Label {
                sample: i,
                reason: format!("label {l} is not below the number of classes, {n}"),
            });
        }
        self.num_classes = Some(n);
        Ok(self)
    }

    /// Declares the class names (and so their number), checked as [`with_num_classes`] does.
    ///
    /// [`with_num_classes`]: TensorDataset::with_num_classes
    pub fn with_classes(self, names: Vec<String>) -> Result<Self> {
        let mut d = self.with_num_classes(names.len())?;
        d.classes = Some(names);
        Ok(d)
    }

    /// The labels, in sample order.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }
}

impl Dataset for TensorDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn get(&self, index: usize) -> Result<Sample> {
        let label = *self.labels.get(index).ok_or_else(|| out_of_range(index, self.labels.len()))?;
        let [c, h, w] = self.chw;
        let n = c * h * w;
        let image = Image::new(c, h, w, self.data[index * n..(index + 1) * n].to_vec())?;
        Ok(Sample { image, label })
    }

    fn classes(&self) -> Option<&[String]> {
        self.classes.as_deref()
    }

    fn num_classes(&self) -> Option<usize> {
        self.num_classes
    }
}

/// A view of some samples of another dataset: sample `i` of the subset is sample `indices[i]` of
/// the inner one.
#[derive(Clone)]
pub struct Subset {
    inner: Arc<dyn Dataset>,
    indices: Vec<usize>,
}

impl Subset {
    /// Errors naming the first index that is out of range for `dataset`. Pass an `Arc` of a
    /// dataset (`Arc::clone(&ds)`) to keep using it elsewhere.
    pub fn new(dataset: impl Dataset + 'static, indices: Vec<usize>) -> Result<Self> {
        Subset::from_arc(Arc::new(dataset), indices)
    }

    fn from_arc(inner: Arc<dyn Dataset>, indices: Vec<usize>) -> Result<Self> {
        let len = inner.len();
        if let Some(&bad) = indices.iter().find(|&&i| i >= len) {
            return Err(out_of_range(bad, len));
        }
        Ok(Subset { inner, indices })
    }

    /// The inner dataset's indices, in subset order.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }
}

impl std::fmt::Debug for Subset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subset").field("inner_len", &self.inner.len()).field("len", &self.indices.len()).finish()
    }
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }

    fn get(&self, index: usize) -> Result<Sample> {
        let &i = self.indices.get(index).ok_or_else(|| out_of_range(index, self.indices.len()))?;
        self.inner.get(i)
    }

    fn classes(&self) -> Option<&[String]> {
        self.inner.classes()
    }

    fn num_classes(&self) -> Option<usize> {
        self.inner.num_classes()
    }

    fn path(&self, index: usize) -> Option<&Path> {
        self.indices.get(index).and_then(|&i| self.inner.path(i))
    }
}

/// Salt that keeps the split's permutation independent of other streams drawn from the same seed.
const SPLIT_SALT: u64 = 0x5350_4c49_5400_0001;

/// Splits `dataset` at random into `(train, validation)`, the validation part holding
/// `round(fraction * len)` samples. The partition is a pure function of `(len, fraction, seed)`;
/// each part lists its indices in ascending order (the loader shuffles the training part).
pub fn split(dataset: impl Dataset + 'static, fraction: f64, seed: u64) -> Result<(Subset, Subset)> {
    if !(0.0..=1.0).contains(&fraction) {
        return Err(Error::config("split fraction", format!("must be in [0, 1], got {fraction}")));
    }
    let inner: Arc<dyn Dataset> = Arc::new(dataset);
    let n = inner.len();
    let n_val = ((fraction * n as f64).round() as usize).min(n);
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(mix_seed(seed, SPLIT_SALT)).shuffle(&mut order);
    let mut val = order[..n_val].to_vec();
    let mut train = order[n_val..].to_vec();
    val.sort_unstable();
    train.sort_unstable();
    Ok((Subset::from_arc(Arc::clone(&inner), train)?, Subset::from_arc(inner, val)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> TensorDataset {
        let data = (0..n * 4).map(|v| v as f32).collect();
        let labels = (0..n as u32).map(|i| i % 3).collect();
        TensorDataset::new(Tensor::new(&[n, 1, 2, 2], data).unwrap(), labels).unwrap()
    }

    #[test]
    fn tensor_dataset_slices_images() {
        let ds = ramp(5);
        assert_eq!(ds.len(), 5);
        let s = ds.get(2).unwrap();
        assert_eq!(s.label, 2);
        assert_eq!(s.image.shape(), [1, 2, 2]);
        assert_eq!(s.image.data(), &[8.0, 9.0, 10.0, 11.0]);
        let err = ds.get(5).unwrap_err();
        assert!(matches!(err, Error::Sample { index: 5, .. }), "{err}");
    }

    #[test]
    fn tensor_dataset_checks_shapes_and_labels() {
        let err = TensorDataset::new(Tensor::zeros(&[3, 1, 2, 2]), vec![0, 1]).unwrap_err();
        assert!(err.to_string().contains("3 labels"), "{err}");
        assert!(TensorDataset::new(Tensor::zeros(&[3]), vec![0, 1, 2]).is_err());
        let flat = TensorDataset::new(Tensor::zeros(&[2, 5]), vec![0, 1]).unwrap();
        assert_eq!(flat.get(1).unwrap().image.shape(), [5, 1, 1]);
        let err = ramp(5).with_num_classes(2).unwrap_err();
        assert!(matches!(err, Error::Label { sample: 2, .. }), "label 2 of sample 2 is not below 2: {err}");
        let named = ramp(5).with_classes(vec!["a".into(), "b".into(), "c".into()]).unwrap();
        assert_eq!(named.num_classes(), Some(3));
        assert_eq!(named.classes().unwrap()[2], "c");
    }

    #[test]
    fn subset_maps_indices_and_checks_them() {
        let ds = Arc::new(ramp(6));
        let sub = Subset::new(Arc::clone(&ds), vec![4, 1]).unwrap();
        assert_eq!(sub.len(), 2);
        assert_eq!(sub.get(0).unwrap(), ds.get(4).unwrap());
        assert_eq!(sub.get(1).unwrap().label, 1);
        assert!(sub.get(2).is_err());
        let err = Subset::new(ds, vec![0, 6]).unwrap_err();
        assert!(err.to_string().contains("sample 6"), "{err}");
    }

    #[test]
    fn split_is_a_seeded_partition() {
        let (train, val) = split(ramp(100), 0.2, 7).unwrap();
        assert_eq!((train.len(), val.len()), (80, 20));
        let mut all: Vec<usize> = train.indices().iter().chain(val.indices()).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        let (train2, val2) = split(ramp(100), 0.2, 7).unwrap();
        assert_eq!(train2.indices(), train.indices());
        assert_eq!(val2.indices(), val.indices());
        let (_, val3) = split(ramp(100), 0.2, 8).unwrap();
        assert_ne!(val3.indices(), val.indices());
        assert!(val.indices().windows(2).all(|w| w[0] < w[1]));
        assert!(split(ramp(10), 1.5, 0).is_err());
        assert!(split(ramp(10), f64::NAN, 0).is_err());
        let (t, v) = split(ramp(10), 0.0, 0).unwrap();
        assert_eq!((t.len(), v.len()), (10, 0));
    }
}
