//! Truncated, bit-flipped, oversized, cyclic, inconsistent and unsupported files are errors that
//! name what is wrong, never panics. Files are crafted from a kiln export with tract's protobuf
//! types.

use kiln::io::onnx::OnnxOptions;
use kiln::model::{Model, ModelBuilder};
use prost::Message;
use tract_onnx::pb;

fn small_model() -> Model {
    ModelBuilder::new(&[1, 2, 6, 6])
        .conv2d(3, 3)
        .name("conv")
        .batch_norm()
        .name("bn")
        .relu()
        .name("act")
        .flatten()
        .name("flat")
        .dense(4)
        .name("fc")
        .build()
        .unwrap()
}

fn proto() -> pb::ModelProto {
    let bytes = small_model().to_onnx_bytes(&OnnxOptions::default()).unwrap();
    pb::ModelProto::decode(&bytes[..]).unwrap()
}

fn import(p: &pb::ModelProto) -> Result<Model, String> {
    Model::from_onnx_bytes(&p.encode_to_vec(), "crafted.onnx").map_err(|e| e.to_string())
}

fn expect_err(p: &pb::ModelProto, needles: &[&str]) {
    let err = import(p).expect_err("the crafted file must be refused");
    for n in needles {
        assert!(err.contains(n), "error should mention '{n}': {err}");
    }
}

fn graph(p: &mut pb::ModelProto) -> &mut pb::GraphProto {
    p.graph.as_mut().unwrap()
}

#[test]
fn every_truncation_is_an_error_or_a_whole_model() {
    let bytes = small_model().to_onnx_bytes(&OnnxOptions::default()).unwrap();
    let whole = Model::from_onnx_bytes(&bytes, "whole.onnx").unwrap();
    let mut loaded = 0;
    for len in 0..bytes.len() {
        // A cut at a field boundary can leave a valid, smaller protobuf (the metadata gone): it
        // must then be the same model, never a partial one.
        if let Ok(m) = Model::from_onnx_bytes(&bytes[..len], "truncated.onnx") {
            assert_eq!(m.param_values(), whole.param_values(), "prefix of {len} bytes");
            loaded += 1;
        }
    }
    assert!(loaded < 200, "{loaded} of {} prefixes loaded", bytes.len());
}

#[test]
fn every_bit_flip_returns() {
    let bytes = small_model().to_onnx_bytes(&OnnxOptions::default()).unwrap();
    let mut errors = 0;
    for i in 0..bytes.len() * 8 {
        let mut b = bytes.clone();
        b[i / 8] ^= 1 << (i % 8);
        errors += Model::from_onnx_bytes(&b, "flipped.onnx").is_err() as usize;
    }
    // Flips inside weight bytes load a different value (ONNX has no checksum); flips in the
    // structure are errors.
    assert!(errors > 0);
}

#[test]
fn huge_dims_and_wrong_initializer_sizes_name_the_tensor() {
    let mut p = proto();
    graph(&mut p).initializer[0].dims = vec![1 << 40, 1 << 40];
    expect_err(&p, &["conv.weight", "more than"]);
    let mut p = proto();
    graph(&mut p).initializer[0].dims = vec![1 << 20, 1 << 10];
    expect_err(&p, &["conv.weight", "bytes"]);
    let mut p = proto();
    graph(&mut p).initializer[0].dims = vec![-3, 2];
    expect_err(&p, &["conv.weight", "negative"]);
    let mut p = proto();
    let fc = graph(&mut p).initializer.iter_mut().find(|t| t.name == "fc.weight").unwrap();
    fc.raw_data.truncate(fc.raw_data.len() - 4);
    expect_err(&p, &["fc.weight"]);
    // A weight whose shape does not fit the layer's input.
    let mut p = proto();
    let fc = graph(&mut p).initializer.iter_mut().find(|t| t.name == "fc.weight").unwrap();
    fc.dims = vec![4, 2 * fc.dims[1]];
    fc.raw_data.extend(fc.raw_data.clone());
    expect_err(&p, &["Gemm 'fc'", "features"]);
    // Huge input dimensions.
    let mut p = proto();
    let input = &mut graph(&mut p).input[0];
    if let Some(pb::type_proto::Value::TensorType(t)) = input.r#type.as_mut().unwrap().value.as_mut() {
        t.shape.as_mut().unwrap().dim[2].value = Some(pb::tensor_shape_proto::dimension::Value::DimValue(1 << 50));
    }
    expect_err(&p, &["input"]);
}

#[test]
fn cycles_and_dangling_inputs_name_the_nodes() {
    let mut p = proto();
    let g = graph(&mut p);
    // act reads fc's output, fc (through flat) reads act's: a cycle.
    let act = g.node.iter().position(|n| n.name == "act").unwrap();
    let fc_out = g.node.iter().find(|n| n.name == "fc").unwrap().output[0].clone();
    g.node[act].input[0] = fc_out;
    expect_err(&p, &["cycle", "act", "fc"]);
    let mut p = proto();
    graph(&mut p).node[1].input[0] = "nowhere".into();
    expect_err(&p, &["nowhere", "not produced"]);
    let mut p = proto();
    let g = graph(&mut p);
    let dup = g.node[0].output[0].clone();
    g.node[1].output[0] = dup;
    expect_err(&p, &["produced more than once"]);
}

#[test]
fn unsupported_nodes_are_listed_together() {
    let mut p = proto();
    let g = graph(&mut p);
    let act = g.node.iter().position(|n| n.name == "act").unwrap();
    g.node[act].op_type = "Hardmax".into();
    let flat = g.node.iter().position(|n| n.name == "flat").unwrap();
    g.node[flat].op_type = "LpNormalization".into();
    let err = import(&p).unwrap_err();
    assert!(err.contains("Hardmax 'act'") && err.contains("LpNormalization 'flat'"), "{err}");
    assert!(err.contains("2 nodes"), "{err}");
    // Attributes kiln cannot represent are named too.
    let mut p = proto();
    let conv = &mut graph(&mut p).node[0];
    conv.attribute.iter_mut().find(|a| a.name == "pads").unwrap().ints = vec![1, 0, 0, 0];
    expect_err(&p, &["Conv 'conv'", "asymmetric"]);
    // Opsets outside 13..=20 and missing graphs.
    let mut p = proto();
    p.opset_import[0].version = 9;
    expect_err(&p, &["opset 9"]);
    let mut p = proto();
    p.graph = None;
    expect_err(&p, &["no graph"]);
    // Not protobuf at all.
    let err = Model::from_onnx_bytes(b"\xff\xff\xff\xff not onnx", "junk.onnx").unwrap_err().to_string();
    assert!(err.contains("junk.onnx") && err.contains("not a valid ONNX file"), "{err}");
}

fn externalise(p: &mut pb::ModelProto, name: &str, location: &str) -> Vec<u8> {
    let t = graph(p).initializer.iter_mut().find(|t| t.name == name).unwrap();
    let data = std::mem::take(&mut t.raw_data);
    t.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
    let entry = |k: &str, v: String| pb::StringStringEntryProto { key: k.into(), value: v };
    t.external_data =
        vec![entry("location", location.into()), entry("offset", "4".into()), entry("length", data.len().to_string())];
    data
}

#[test]
fn external_data_is_read_inside_the_models_folder_only() {
    let dir = std::env::temp_dir().join(format!("kiln-onnx-external-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("m")).unwrap();
    let want = Model::from_onnx_bytes(&proto().encode_to_vec(), "x.onnx").unwrap();
    let mut p = proto();
    let data = externalise(&mut p, "fc.weight", "weights.bin");
    let mut file = vec![0u8; 4];
    file.extend(&data);
    std::fs::write(dir.join("m/weights.bin"), &file).unwrap();
    std::fs::write(dir.join("m/model.onnx"), p.encode_to_vec()).unwrap();
    let m = Model::from_onnx(dir.join("m/model.onnx")).unwrap();
    assert_eq!(m.param("fc.weight"), want.param("fc.weight"));
    // Bytes alone have no folder: refused by name.
    let err = Model::from_onnx_bytes(&p.encode_to_vec(), "m.onnx").unwrap_err().to_string();
    assert!(err.contains("fc.weight") && err.contains("external"), "{err}");
    // Paths leaving the folder are refused, even to a file that exists.
    std::fs::write(dir.join("outside.bin"), &file).unwrap();
    for location in ["../outside.bin", "/etc/passwd", "sub/../../outside.bin"] {
        let mut p = proto();
        externalise(&mut p, "fc.weight", location);
        std::fs::write(dir.join("m/bad.onnx"), p.encode_to_vec()).unwrap();
        let err = Model::from_onnx(dir.join("m/bad.onnx")).unwrap_err().to_string();
        assert!(err.contains("fc.weight") && err.contains("inside the model's folder"), "{location}: {err}");
    }
    // A length past the end of the file.
    let mut p = proto();
    externalise(&mut p, "fc.weight", "weights.bin");
    let t = graph(&mut p).initializer.iter_mut().find(|t| t.name == "fc.weight").unwrap();
    t.external_data[1].value = "1000000".into();
    std::fs::write(dir.join("m/far.onnx"), p.encode_to_vec()).unwrap();
    let err = Model::from_onnx(dir.join("m/far.onnx")).unwrap_err().to_string();
    assert!(err.contains("fc.weight") && err.contains("outside"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
