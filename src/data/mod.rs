//! Data: datasets, transforms and the prefetching loader that turns them into host batches.
//!
//! This module uses nothing of `model`, `backend` or `exec`: what it produces is a [`Batch`], a
//! contiguous NCHW f32 [`Tensor`](crate::tensor::Tensor) with its labels, which a trainer then
//! uploads. The pieces, in the order data flows through them:
//!
//! ```text
//! Dataset::get(i) -> Sample { Image (CHW f32), label }      Mnist, Cifar10, ImageFolder,
//!                                                            TensorDataset, Subset
//!   -> (optional cache of decoded samples, before augmentation)
//!   -> Transform::apply(image, rng)                          Compose of ToFloat, Normalize,
//!                                                            RandomCrop, Resize, ...
//!   -> DataLoader: batches in a seeded epoch order, built by worker threads ahead of the
//!      consumer, delivered in order as Result<Batch>
//! ```
//!
//! # Pixel values
//!
//! An [`Image`] is always channels-first (CHW) `f32`. Datasets decoded from bytes (MNIST, CIFAR-10,
//! image files) yield the byte values themselves, 0.0 ..= 255.0, as a PIL image holds them;
//! [`ToFloat`] scales them to [0, 1] (torchvision's `ToTensor`), after which [`Normalize`] and
//! [`ColorJitter`] apply. Geometric transforms (crops, flips, resizes, rotations) work at any scale.
//!
//! # Determinism
//!
//! Every random choice comes from [`crate::rng::Rng`]. The loader's epoch order is a pure function
//! of (seed, epoch), and each sample's augmentation draws from its own generator,
//! [`sample_rng`]`(seed, epoch, index)`, so a batch's content does not depend on the number of
//! workers, the batch size, the shard or thread scheduling.
//!
//! # Example
//!
//! ```no_run
//! use kiln::data::{Compose, DataLoader, Mnist, Normalize, Split, ToFloat};
//!
//! # fn main() -> kiln::Result<()> {
//! let train = Mnist::new("data/mnist", Split::Train)?;
//! let loader = DataLoader::builder(train)
//!     .batch_size(64)
//!     .shuffle(true)
//!     .seed(42)
//!     .workers(2)
//!     .transform(Compose::new().then(ToFloat).then(Normalize::new(&[0.1307], &[0.3081])?))
//!     .build()?;
//! for epoch in 0..3 {
//!     for batch in loader.epoch(epoch) {
//!         let batch = batch?; // batch.inputs: [64, 1, 28, 28]
//!         # let _ = batch;
//!     }
//! }
//! # Ok(())
//! # }
//! ```

mod buffers;
mod cifar;
mod dataset;
mod digits;
mod folder;
mod geometry;
mod idx;
mod loader;
mod sample;
pub mod synthetic;
mod transforms;

pub use buffers::{BufferPool, BufferSource};
pub use cifar::Cifar10;
pub use dataset::{Dataset, Subset, TensorDataset, split};
pub use digits::{DIGITS_LEN, digits};
pub use folder::{Check, ImageFolder, ImageFolderBuilder, OnError, Skipped};
pub use geometry::{CenterCrop, RandomCrop, RandomRotation, Resize, ResizeMode, rotate};
pub use idx::{IdxArray, Mnist, Split, read_idx};
pub use loader::{Batch, DataLoader, DataLoaderBuilder, Epoch};
pub use sample::{Image, Sample};
pub use transforms::{
    ColorJitter, Compose, Denormalize, HorizontalFlip, Lambda, Normalize, RandomHorizontalFlip, ToFloat, ToGrey, ToRgb,
    Transform, adjust_brightness, adjust_contrast, adjust_saturation, sample_rng,
};
