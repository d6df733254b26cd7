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
//! | [`dist`] | data-parallel training: communicators, rendezvous, gradient buckets, the launcher |
//! | [`zoo`] | the seed tutorial's architectures, ResNet-18 and an Inception block |

pub mod backend;
pub mod data;
pub mod dist;
pub mod error;
pub mod exec;
pub mod io;
pub mod model;
pub mod rng;
pub mod tensor;
pub mod train;
pub mod zoo;

pub use error::{Error, Result};

/// The README's code blocks, compiled and run by `cargo test --doc` so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
