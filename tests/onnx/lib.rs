//! Nothing: this package exists for its test target (`onnx.rs`); Cargo.toml says why.
