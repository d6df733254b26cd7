//! kiln: define convolutional neural networks with a fluent builder and train them fast.

pub mod data;
pub mod error;
pub mod rng;
pub mod tensor;

pub use error::{Error, Result};
