//! Compiles onnx.proto with protox (pure Rust, no protoc) and prost-build into Rust, written to
//! the directory given as the first argument.

fn main() {
    let out = std::env::args().nth(1).expect("usage: kiln-onnx-proto-gen OUT_DIR");
    let here = env!("CARGO_MANIFEST_DIR");
    let fds = protox::compile([format!("{here}/onnx.proto")], [here]).expect("onnx.proto compiles");
    prost_build::Config::new()
        .disable_comments(["."])
        .out_dir(&out)
        .compile_fds(fds)
        .expect("prost-build generates the Rust");
}
