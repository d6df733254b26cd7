//! Fuzz target for kiln's file loaders: any bytes given to `Checkpoint::from_bytes` (model files
//! and training checkpoints, which goes through the safetensors parser, the architecture checks
//! and the trainer-state checks) and to `Model::load_weights_from_bytes` must return, never panic
//! or read out of bounds. A file that loads must also save, and load again.
//!
//! cargo +nightly fuzz run load_checkpoint fuzz/corpus/load_checkpoint fuzz/seeds
//! (fuzz/NOTES.md: how the seeds were made, what the runs found.)

#![no_main]

use std::path::Path;

use kiln::io::Checkpoint;
use kiln::model::{Conv2d, ModelBuilder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.safetensors");
    if let Ok(ckpt) = Checkpoint::from_bytes(data, path) {
        let bytes = ckpt.to_bytes().expect("a checkpoint that loaded must save");
        Checkpoint::from_bytes(&bytes, path).expect("a checkpoint that kiln saved must load");
    }
    // The architecture of tests/fixtures/torch_cnn.safetensors, for PyTorch-style files.
    let mut model = ModelBuilder::new(&[2, 3, 8, 8])
        .conv2d_with(Conv2d::new(8, 3).padding(1))
        .name("features.0")
        .batch_norm()
        .name("features.1")
        .relu()
        .max_pool2d(2)
        .conv2d_with(Conv2d::new(16, 3).stride(2).padding(1).bias(false))
        .name("features.4")
        .batch_norm()
        .name("features.5")
        .relu()
        .flatten()
        .dense(32)
        .name("head.1")
        .batch_norm()
        .name("head.2")
        .relu()
        .dropout(0.5)
        .dense(10)
        .name("head.5")
        .build()
        .expect("a valid model");
    let _ = model.load_weights_from_bytes(data, path);
});
