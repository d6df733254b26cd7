//! Model files and training checkpoints (`kiln::io`), one test binary (one link, not five):
//!
//! - `resume`: N steps, save, resume, M steps equals N+M steps bit for bit, for every optimizer;
//!   `fit` interrupted mid-epoch or between epochs and resumed equals an uninterrupted `fit`;
//! - `files`: what a file holds, loading without the model's code, `load_weights` errors, the
//!   checkpoint manager;
//! - `torch`: weights to and from PyTorch through safetensors (fixtures made by
//!   tests/fixtures/torch_cnn.py);
//! - `corruption`: truncation, bit flips, hostile headers, architectures and trainer states,
//!   random and mutated bytes;
//! - `kill`: a process killed while saving always leaves a loadable checkpoint.

mod corruption;
mod files;
mod kill;
mod resume;
mod torch;
