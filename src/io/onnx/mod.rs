//! ONNX: exporting a model's inference graph, importing models exported by PyTorch or go-metal.
//!
//! - [`Model::export_onnx`] writes what evaluation computes (batch norm with its running
//!   statistics, dropout removed) for ONNX Runtime, TensorRT, OpenVINO or another framework:
//!   opset 13 to 20 (18 by default, what PyTorch's exporter writes), the IR version that goes with
//!   it, a symbolic batch dimension unless asked otherwise, weights as raw initializers under
//!   their PyTorch names, and metadata (`kiln.version`, `kiln.class_names` when given).
//! - [`Model::from_onnx`] builds a trainable model from a file: layers and weights, named after
//!   the file's weights and nodes. It reads PyTorch's exports (the dynamo exporter and the legacy
//!   TorchScript one, opsets 13 to 20), with or without constant folding, and go-metal's files,
//!   which are a dialect of their own (see `import.rs`). Anything kiln cannot represent is one
//!   error listing every such node, never a partial model.
//!
//! `proto.rs` is generated from `onnx.proto` (`scripts/onnx-proto/generate.sh`); `read.rs`
//! checks and decodes what a file holds (tensors, attributes, the graph's order), `graph.rs`
//! drives the import, `import.rs` turns ONNX nodes into kiln layers (`norm.rs` the
//! normalisations, `fold.rs` constants and formulas), `export.rs` does the reverse. Every size read from a file is
//! bounded before anything is allocated from it, and a hostile file is an error, never a panic.

mod export;
mod fold;
mod graph;
mod import;
mod norm;
#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod proto;
mod read;

use std::path::Path;

use prost::Message;

use crate::model::Model;
use crate::{Error, Result};

/// How [`Model::export_onnx`] writes a model.
///
/// ```
/// use kiln::io::onnx::OnnxOptions;
/// let options = OnnxOptions { opset: 20, ..OnnxOptions::default() };
/// assert!(options.dynamic_batch);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct OnnxOptions {
    /// ONNX operator set, 13 to 20 (default 18). From 20 GELU is written as ONNX's `Gelu`,
    /// below as the erf formula.
    pub opset: i64,
    /// Leave the batch dimension symbolic (`batch`), so the file runs at any batch size
    /// (default); otherwise it is fixed to the model's batch size.
    pub dynamic_batch: bool,
    /// Class names, in output order, stored as JSON in the `kiln.class_names` metadata entry.
    pub class_names: Option<Vec<String>>,
    /// The graph's name (default `"kiln"`).
    pub graph_name: String,
    /// More model metadata entries (key, value), written after kiln's own (default none).
    pub metadata: Vec<(String, String)>,
}

impl Default for OnnxOptions {
    fn default() -> Self {
        OnnxOptions {
            opset: 18,
            dynamic_batch: true,
            class_names: None,
            graph_name: "kiln".into(),
            metadata: Vec::new(),
        }
    }
}

/// The ONNX operators [`Model::from_onnx`] reads (`Mul`, `Div`, `Erf` only in the SiLU and GELU
/// formulas; `Shape`, `Gather`, `Slice`, `Transpose` on constants and shapes).
pub const SUPPORTED_OPS: &[&str] = import::SUPPORTED_OPS;

/// The model metadata entries (`metadata_props`: key, value) of an ONNX file, in file order;
/// kiln's exports have `kiln.version` and, when known, `kiln.class_names` (a JSON list).
///
/// ```
/// use kiln::io::onnx::{self, OnnxOptions};
/// use kiln::model::ModelBuilder;
/// let model = ModelBuilder::new(&[1, 4]).dense(2).build().unwrap();
/// let options = OnnxOptions { class_names: Some(vec!["cat".into(), "dog".into()]), ..OnnxOptions::default() };
/// let path = std::env::temp_dir().join(format!("kiln-doc-meta-{}.onnx", std::process::id()));
/// model.export_onnx(&path, options).unwrap();
/// let meta = onnx::metadata(&path).unwrap();
/// assert!(meta.contains(&("kiln.class_names".to_string(), r#"["cat","dog"]"#.to_string())));
/// std::fs::remove_file(&path).unwrap();
/// ```
pub fn metadata(path: impl AsRef<Path>) -> Result<Vec<(String, String)>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let proto = read::decode(&bytes, path)?;
    Ok(proto.metadata_props.into_iter().map(|e| (e.key.unwrap_or_default(), e.value.unwrap_or_default())).collect())
}

/// The operator sets kiln writes and reads.
pub const SUPPORTED_OPSETS: std::ops::RangeInclusive<i64> = 13..=20;

/// The IR version of the ONNX release that introduced `opset` (what `onnx.helper`'s version
/// table gives), so older runtimes that know the opset also accept the file.
fn ir_version_for(opset: i64) -> Result<i64> {
    match opset {
        13 | 14 => Ok(7),
        15..=18 => Ok(8),
        19 | 20 => Ok(9),
        _ => Err(Error::config("opset", format!("ONNX opset {opset} is not supported; kiln writes 13 to 20"))),
    }
}

impl Model {
    /// Writes the model's inference graph to an ONNX file (see [`crate::io::onnx`]).
    ///
    /// ```
    /// use kiln::io::onnx::OnnxOptions;
    /// use kiln::model::{Model, ModelBuilder};
    /// let model = ModelBuilder::new(&[1, 3, 8, 8]).conv2d(4, 3).relu().flatten().dense(2).build().unwrap();
    /// let path = std::env::temp_dir().join(format!("kiln-doc-{}.onnx", std::process::id()));
    /// model.export_onnx(&path, OnnxOptions::default()).unwrap();
    /// let back = Model::from_onnx(&path).unwrap();
    /// assert_eq!(back.param_count(), model.param_count());
    /// std::fs::remove_file(&path).unwrap();
    /// ```
    pub fn export_onnx(&self, path: impl AsRef<Path>, options: OnnxOptions) -> Result<()> {
        let bytes = self.to_onnx_bytes(&options)?;
        crate::io::safetensors::write_atomic(path.as_ref(), &bytes)
    }

    /// The bytes [`Model::export_onnx`] writes.
    pub fn to_onnx_bytes(&self, options: &OnnxOptions) -> Result<Vec<u8>> {
        Ok(export::to_proto(self, options)?.encode_to_vec())
    }

    /// A trainable model from an ONNX file exported by PyTorch, go-metal or kiln (see
    /// [`crate::io::onnx`]). Initializers stored as external data are read from files next to
    /// the model, by relative paths that must stay inside the model's folder.
    pub fn from_onnx(path: impl AsRef<Path>) -> Result<Model> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        graph::from_bytes(&bytes, path, path.parent())
    }

    /// As [`Model::from_onnx`], from a file's bytes (`name` only names it in errors). External
    /// data is refused: there is no folder to read it from.
    pub fn from_onnx_bytes(bytes: &[u8], name: impl AsRef<Path>) -> Result<Model> {
        graph::from_bytes(bytes, name.as_ref(), None)
    }
}
