//! Fuzz target for the ONNX reader: any bytes given to `Model::from_onnx_bytes` (protobuf
//! decoding, tensor and attribute checks, the graph order, the conversion to kiln layers and the
//! rebuilt model's checks) must return, never panic or read out of bounds. A file that imports
//! must export, and the export must import again with the same weights.
//!
//! cargo +nightly fuzz run read_onnx fuzz/corpus/read_onnx tests/fixtures/onnx
//! (fuzz/NOTES.md: the seeds and the runs.)

#![no_main]

use kiln::io::onnx::OnnxOptions;
use kiln::model::Model;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(model) = Model::from_onnx_bytes(data, "fuzz.onnx") {
        let bytes = model.to_onnx_bytes(&OnnxOptions::default()).expect("an imported model must export");
        let back = Model::from_onnx_bytes(&bytes, "fuzz-export.onnx").expect("kiln's export must import");
        assert_eq!(back.param_values(), model.param_values());
    }
});
