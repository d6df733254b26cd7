//! kiln: define convolutional neural networks with a fluent builder and train them fast.
//!
//! The crate is organised as the rooms of `DESIGN.md`:
//!
//! | module | holds |
//! | --- | --- |
//! | [`model`] | layers and options, the builder, the validated graph, shapes, parameters, summary |
//! | [`backend`] | the backend seam (buffers, op kernels on plain descriptors) and the CPU backend |
//! | [`exec`] | compiling a model into a plan of kernels over buffers allocated once, running it |
//! | [`data`] | datasets, transforms and the prefetching loader (host batches only) |
//! | [`train`] | the trainer, losses, optimizers, schedules, metrics, `fit` and its callbacks |
//! | [`io`] | models and checkpoints in safetensors (PyTorch-compatible), the checkpoint manager |
//! | [`metrics`] | confusion matrix, per-class precision/recall/F1, ROC and PR curves, AUC, AP |
//! | [`report`] | the self-contained HTML training report with its PNG plots |
//! | [`dist`] | data-parallel training: communicators, rendezvous, gradient buckets, the launcher |
//! | [`zoo`] | the seed tutorial's architectures, ResNet-18 and an Inception block |
//!
//! A model, a trainer and a few steps (on the GPU when one is usable, else on the CPU):
//!
//! ```
//! use kiln::model::ModelBuilder;
//! use kiln::tensor::Tensor;
//! use kiln::train::{Optimizer, Trainer, TrainerConfig};
//!
//! # fn main() -> kiln::Result<()> {
//! let model = ModelBuilder::new(&[4, 1, 8, 8]) // [batch, channels, height, width]
//!     .conv2d(8, 3).relu()
//!     .max_pool2d(2)
//!     .flatten()
//!     .dense(3)
//!     .seed(1)
//!     .build()?; // shapes are checked here; an error names the layer
//! let config = TrainerConfig { batch_size: 4, optimizer: Optimizer::adam(), ..Default::default() };
//! let mut trainer = Trainer::new(&model, config)?;
//! let images = Tensor::new(&[4, 1, 8, 8], (0..256).map(|i| (i % 7) as f32 / 7.0).collect())?;
//! let labels = [0u32, 1, 2, 0];
//! let first = trainer.train_batch(&images, &labels)?.loss;
//! for _ in 0..20 {
//!     trainer.train_step(&images, &labels)?; // queued; nothing read back
//! }
//! let last = trainer.train_batch(&images, &labels)?.loss;
//! assert!(last < first);
//! let probabilities = trainer.predict_proba(&images)?; // [4, 3]
//! assert_eq!(probabilities.shape(), &[4, 3]);
//! # Ok(())
//! # }
//! ```
//!
//! Every mistake a user can make (a bad option, a shape that does not fit, a label out of range,
//! an unreadable file, a NaN in the data) is an [`Error`] naming the layer, sample, field or
//! path; nothing a user passes in makes kiln panic or abort.

// Every public item says what it is (clippy's -D warnings makes a missing doc an error).
#![warn(missing_docs)]

pub mod backend;
pub mod data;
pub mod dist;
pub mod error;
pub mod exec;
pub mod io;
pub mod metrics;
pub mod model;
pub mod report;
pub mod rng;
pub mod tensor;
pub mod train;
pub mod zoo;

pub use error::{Error, Result};

/// The README's code blocks, compiled and run by `cargo test --doc` so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
