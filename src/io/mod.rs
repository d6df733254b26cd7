//! Files: models and training checkpoints in safetensors, the checkpoint manager.
//!
//! - [`crate::model::Model::save`] / [`crate::model::Model::load`]: the architecture and weights
//!   in one safetensors file, named and laid out as PyTorch's `state_dict`, so Python's
//!   `safetensors.torch.load_file` gives tensors that `load_state_dict(strict=True)` accepts for
//!   the equivalent `torch.nn` model;
//! - [`crate::model::Model::load_weights`]: weights saved from PyTorch into a kiln model of the
//!   same architecture;
//! - [`crate::train::Trainer::save_checkpoint`] / [`crate::train::Trainer::resume`]: everything a
//!   run needs to continue exactly (bit for bit on the CPU backend);
//! - [`CheckpointManager`]: a `fit` callback that saves every N epochs, keeps the last K and the
//!   best.
//!
//! Every file is written atomically and every file read is checked: a truncated, corrupt or
//! hostile file is an error, never a panic. `safetensors.rs` holds the format, `checkpoint.rs`
//! what kiln puts in it, `manager.rs` when and where. This module uses `model` and `train`;
//! neither uses it.

pub mod checkpoint;
pub mod manager;
pub mod onnx;
mod safetensors;

pub use checkpoint::Checkpoint;
pub use manager::CheckpointManager;
