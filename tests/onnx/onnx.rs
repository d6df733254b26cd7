//! ONNX export and import (issue 12).
//!
//! - `export`: every zoo model and a corpus of every layer option, exported and run by tract (a
//!   pure-Rust ONNX runtime), logits compared with kiln's CPU backend at batch 1 and 7;
//! - `import`: files exported by PyTorch (both exporters) and a go-metal-style file, logits
//!   compared with PyTorch's (stored with the fixtures), fine-tuned and exported again;
//! - `hostile`: truncated, bit-flipped, oversized, cyclic and unsupported files are errors.
//!
//! Tolerance: `|kiln - reference| <= 1e-5 * max(1, |reference|)` for every output value.

// This file is the test target of the package in tests/onnx (Cargo.toml there says why it is a
// package of its own); its modules sit beside it.
#[path = "export.rs"]
mod export;
#[path = "hostile.rs"]
mod hostile;
#[path = "import.rs"]
mod import;

use kiln::backend::cpu::CpuBackend;
use kiln::exec::{Executor, Mode};
use kiln::model::Model;
use kiln::rng::Rng;
use kiln::tensor::Tensor;
use tract_onnx::prelude::*;

/// kiln's evaluation output for `x` on the CPU backend.
pub fn kiln_forward(model: &Model, x: &Tensor) -> Tensor {
    let mut exec = Executor::new(model, CpuBackend::<f32>::new(Some(1)).unwrap()).unwrap();
    exec.predict(x, Mode::Eval).unwrap()
}

/// tract's output for ONNX `bytes` on input `x`.
pub fn tract_forward(bytes: &[u8], x: &Tensor) -> Vec<f32> {
    let model = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .unwrap()
        .with_input_fact(0, f32::fact(x.shape()).into())
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let input = tract_onnx::prelude::Tensor::from_shape(x.shape(), x.data()).unwrap();
    let out = model.run(tvec!(input.into())).unwrap();
    out[0].to_plain_array_view::<f32>().unwrap().iter().copied().collect()
}

/// A batch of values uniform in [-1, 1).
pub fn random_input(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let n = shape.iter().product();
    Tensor::new(shape, (0..n).map(|_| rng.uniform_range(-1.0, 1.0)).collect()).unwrap()
}

/// Panics with the worst element if `got` and `want` differ by more than the tolerance.
pub fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: {} values, expected {}", got.len(), want.len());
    let mut worst = (0.0f32, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / w.abs().max(1.0);
        // NaN counts as the worst error.
        let err = if err.is_nan() { f32::INFINITY } else { err };
        if err > worst.0 {
            worst = (err, i);
        }
    }
    assert!(
        worst.0 <= 1e-5,
        "{what}: value {} is {} where {} was expected (scaled error {:e})",
        worst.1,
        got[worst.1],
        want[worst.1],
        worst.0
    );
}
