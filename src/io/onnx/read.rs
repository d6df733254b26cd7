//! Reading what an ONNX file holds, checked: the model and its opset, constant tensors
//! (initializers and `Constant` nodes, inline or external), node attributes (typed, or untyped as
//! proto3 writers such as go-metal leave them), and the graph's nodes in an order where every
//! input is produced before it is read (cycles are errors).
//!
//! Nothing here trusts a size: a tensor's element count is bounded and must match the bytes or
//! values actually present before anything is allocated for it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Component, Path};

use prost::Message;

use super::SUPPORTED_OPSETS;
use super::proto::{
    AttributeProto, ModelProto, NodeProto, TensorProto, attribute_proto::AttributeType, tensor_proto::DataLocation,
    tensor_proto::DataType,
};
use crate::{Error, Result};

/// Largest number of values one tensor of a file may hold (2^31, 8 GiB of f32).
const MAX_TENSOR_VALUES: u64 = 1 << 31;

/// A constant tensor: float values (f32, or f64 narrowed) or integers (int64, int32, bool).
#[derive(Clone, Debug, PartialEq)]
pub(super) enum ConstData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// A constant tensor read from an initializer or a `Constant` node.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Const {
    pub dims: Vec<usize>,
    pub data: ConstData,
}

impl Const {
    pub fn len(&self) -> usize {
        match &self.data {
            ConstData::F32(v) => v.len(),
            ConstData::I64(v) => v.len(),
        }
    }

    pub fn floats(&self) -> Option<&[f32]> {
        match &self.data {
            ConstData::F32(v) => Some(v),
            ConstData::I64(_) => None,
        }
    }
}

/// Decodes a file's bytes as an ONNX model and checks its operator set.
pub(super) fn decode(bytes: &[u8], path: &Path) -> Result<ModelProto> {
    let model =
        ModelProto::decode(bytes).map_err(|e| Error::format(path, format!("not a valid ONNX file (protobuf: {e})")))?;
    let default_opset = model
        .opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
        .and_then(|o| o.version);
    match default_opset {
        Some(v) if SUPPORTED_OPSETS.contains(&v) => {}
        Some(v) => {
            return Err(Error::format(
                path,
                format!(
                    "ONNX opset {v} is not supported; kiln reads opsets {} to {}",
                    SUPPORTED_OPSETS.start(),
                    SUPPORTED_OPSETS.end()
                ),
            ));
        }
        None => return Err(Error::format(path, "the file imports no version of the default ONNX operator set")),
    }
    if model.graph.is_none() {
        return Err(Error::format(path, "the file has no graph"));
    }
    Ok(model)
}

fn elem_count(dims: &[i64]) -> std::result::Result<(Vec<usize>, usize), String> {
    let mut n: u64 = 1;
    let mut out = Vec::with_capacity(dims.len());
    for &d in dims {
        if d < 0 {
            return Err(format!("negative dimension {d} in {dims:?}"));
        }
        n = n
            .checked_mul(d as u64)
            .filter(|&n| n <= MAX_TENSOR_VALUES)
            .ok_or_else(|| format!("shape {dims:?} has more than {MAX_TENSOR_VALUES} values"))?;
        out.push(d as usize);
    }
    Ok((out, n as usize))
}

/// Reads the bytes of an external-data tensor: `location` relative to `base` (the model's
/// folder), with no absolute path, no `..` and no link leading outside it.
fn external_bytes(t: &TensorProto, base: Option<&Path>) -> std::result::Result<Vec<u8>, String> {
    let Some(base) = base else {
        return Err("its data is in an external file, which cannot be read when the model is given as bytes".into());
    };
    let entry = |k: &str| t.external_data.iter().find(|e| e.key.as_deref() == Some(k)).and_then(|e| e.value.clone());
    let location = entry("location").ok_or("external data without a location")?;
    let rel = Path::new(&location);
    if rel.as_os_str().is_empty() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(format!("external data location '{location}' must be a relative path inside the model's folder"));
    }
    let base = if base.as_os_str().is_empty() { Path::new(".") } else { base };
    let dir = base.canonicalize().map_err(|e| format!("model folder {}: {e}", base.display()))?;
    let file = dir.join(rel).canonicalize().map_err(|e| format!("external data file '{location}': {e}"))?;
    if !file.starts_with(&dir) {
        return Err(format!("external data location '{location}' leads outside the model's folder"));
    }
    let parse = |k: &str| -> std::result::Result<Option<u64>, String> {
        entry(k).map(|v| v.parse::<u64>().map_err(|_| format!("external data {k} '{v}' is not a number"))).transpose()
    };
    let offset = parse("offset")?.unwrap_or(0);
    let bytes = std::fs::read(&file).map_err(|e| format!("external data file '{location}': {e}"))?;
    let end = match parse("length")? {
        Some(len) => offset.checked_add(len).ok_or("external data offset + length overflows")?,
        None => bytes.len() as u64,
    };
    if offset > end || end > bytes.len() as u64 {
        return Err(format!("external data [{offset}, {end}) lies outside '{location}' ({} bytes)", bytes.len()));
    }
    Ok(bytes[offset as usize..end as usize].to_vec())
}

/// A tensor's values, checked against its shape and type.
pub(super) fn read_tensor(t: &TensorProto, base: Option<&Path>) -> std::result::Result<Const, String> {
    let (dims, n) = elem_count(&t.dims)?;
    if t.segment.is_some() {
        return Err("segmented tensors are not supported".into());
    }
    let external = t.data_location == Some(DataLocation::External as i32);
    let raw: Option<Vec<u8>> = if external { Some(external_bytes(t, base)?) } else { t.raw_data.clone() };
    let dtype = t.data_type.unwrap_or(0);
    let typed_len = |len: usize| -> std::result::Result<(), String> {
        if len == n { Ok(()) } else { Err(format!("holds {len} values for shape {dims:?} ({n} values)")) }
    };
    let from_raw = |raw: &[u8], width: usize| -> std::result::Result<(), String> {
        if raw.len() as u64 == n as u64 * width as u64 {
            Ok(())
        } else {
            Err(format!(
                "holds {} bytes for shape {dims:?} of {width}-byte values ({} bytes expected)",
                raw.len(),
                n * width
            ))
        }
    };
    let data = match DataType::try_from(dtype) {
        Ok(DataType::Float) => ConstData::F32(match &raw {
            Some(r) => {
                from_raw(r, 4)?;
                r.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
            }
            None => {
                typed_len(t.float_data.len())?;
                t.float_data.clone()
            }
        }),
        Ok(DataType::Double) => ConstData::F32(match &raw {
            Some(r) => {
                from_raw(r, 8)?;
                r.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect()
            }
            None => {
                typed_len(t.double_data.len())?;
                t.double_data.iter().map(|&v| v as f32).collect()
            }
        }),
        Ok(DataType::Int64) => ConstData::I64(match &raw {
            Some(r) => {
                from_raw(r, 8)?;
                r.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
            }
            None => {
                typed_len(t.int64_data.len())?;
                t.int64_data.clone()
            }
        }),
        Ok(DataType::Int32) => ConstData::I64(match &raw {
            Some(r) => {
                from_raw(r, 4)?;
                r.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect()
            }
            None => {
                typed_len(t.int32_data.len())?;
                t.int32_data.iter().map(|&v| v as i64).collect()
            }
        }),
        Ok(DataType::Bool) => ConstData::I64(match &raw {
            Some(r) => {
                from_raw(r, 1)?;
                r.iter().map(|&b| (b != 0) as i64).collect()
            }
            None => {
                typed_len(t.int32_data.len())?;
                t.int32_data.iter().map(|&v| (v != 0) as i64).collect()
            }
        }),
        Ok(other) => return Err(format!("tensors of type {} are not supported", other.as_str_name())),
        Err(_) => return Err(format!("unknown tensor data type {dtype}")),
    };
    Ok(Const { dims, data })
}

/// A node's attributes, read by name with the kind the operator expects. An attribute whose
/// `type` is missing (proto3 writers) is read as that kind, and one with no value at all is that
/// kind's zero (proto3 omits zero values).
pub(super) struct Attrs<'a>(&'a [AttributeProto]);

impl<'a> Attrs<'a> {
    pub fn new(node: &'a NodeProto) -> Self {
        Attrs(&node.attribute)
    }

    fn get(&self, name: &str, want: AttributeType) -> std::result::Result<Option<&'a AttributeProto>, String> {
        let Some(a) = self.0.iter().find(|a| a.name.as_deref() == Some(name)) else { return Ok(None) };
        match a.r#type {
            None | Some(0) => Ok(Some(a)),
            Some(t) if t == want as i32 => Ok(Some(a)),
            Some(t) => Err(format!(
                "attribute '{name}' has type {}, expected {}",
                AttributeType::try_from(t).map(|t| t.as_str_name()).unwrap_or("unknown"),
                want.as_str_name()
            )),
        }
    }

    pub fn int(&self, name: &str, default: i64) -> std::result::Result<i64, String> {
        Ok(self.get(name, AttributeType::Int)?.map(|a| a.i.unwrap_or(0)).unwrap_or(default))
    }

    pub fn float(&self, name: &str, default: f32) -> std::result::Result<f32, String> {
        Ok(self.get(name, AttributeType::Float)?.map(|a| a.f.unwrap_or(0.0)).unwrap_or(default))
    }

    pub fn ints(&self, name: &str) -> std::result::Result<Option<Vec<i64>>, String> {
        Ok(self.get(name, AttributeType::Ints)?.map(|a| a.ints.clone()))
    }

    pub fn floats(&self, name: &str) -> std::result::Result<Option<Vec<f32>>, String> {
        Ok(self.get(name, AttributeType::Floats)?.map(|a| a.floats.clone()))
    }

    pub fn string(&self, name: &str) -> std::result::Result<Option<String>, String> {
        Ok(self
            .get(name, AttributeType::String)?
            .map(|a| String::from_utf8_lossy(a.s.as_deref().unwrap_or(&[])).into_owned()))
    }

    pub fn tensor(&self, name: &str) -> std::result::Result<Option<&'a TensorProto>, String> {
        Ok(self.get(name, AttributeType::Tensor)?.and_then(|a| a.t.as_ref()))
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|a| a.name.as_deref() == Some(name))
    }
}

/// A node's name for messages: its name, or `#index` when it has none.
pub(super) fn node_label(node: &NodeProto, index: usize) -> String {
    let op = node.op_type.as_deref().unwrap_or("?");
    match node.name.as_deref() {
        Some(n) if !n.is_empty() => format!("{op} '{n}'"),
        _ => format!("{op} (node #{index})"),
    }
}

/// The nodes' indices in an order where each node comes after the producers of its inputs.
/// `available` holds the tensors that exist before any node runs (graph inputs, initializers).
/// A tensor produced twice, an input nobody produces, or a cycle is an error naming the nodes.
pub(super) fn topological_order(
    nodes: &[NodeProto],
    available: &HashSet<String>,
) -> std::result::Result<Vec<usize>, String> {
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            if available.contains(o) || producer.insert(o, i).is_some() {
                return Err(format!("{}: output '{o}' is produced more than once", node_label(n, i)));
            }
        }
    }
    let mut waiting = vec![0usize; nodes.len()];
    let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    let mut problems = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for inp in n.input.iter().filter(|s| !s.is_empty()) {
            match producer.get(inp.as_str()) {
                Some(&p) => {
                    waiting[i] += 1;
                    consumers[p].push(i);
                }
                None if available.contains(inp) => {}
                None => problems.push(format!("{}: input '{inp}' is not produced by any node", node_label(n, i))),
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    let mut ready: VecDeque<usize> = (0..nodes.len()).filter(|&i| waiting[i] == 0).collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(i) = ready.pop_front() {
        order.push(i);
        for &c in &consumers[i] {
            waiting[c] -= 1;
            if waiting[c] == 0 {
                ready.push_back(c);
            }
        }
    }
    if order.len() < nodes.len() {
        let stuck: Vec<String> =
            (0..nodes.len()).filter(|&i| waiting[i] > 0).map(|i| node_label(&nodes[i], i)).collect();
        return Err(format!("the graph has a cycle through {}", stuck.join(", ")));
    }
    Ok(order)
}

pub(super) fn sanitize_name(node: &NodeProto) -> Option<String> {
    let raw = node.name.as_deref()?.trim();
    if raw.is_empty() {
        return None;
    }
    if let Some(path) = raw.strip_prefix('/') {
        // The TorchScript exporter's scopes: "/layer1/layer1.0/conv1/Conv" is module
        // "layer1.0.conv1"; the last part is the operator.
        let parts: Vec<&str> = path.split('/').collect();
        // A scope inside a Sequential is "{attribute}.{index}" ("downsample.0" under
        // "layer2.0.downsample"): the attribute is already the name's last part.
        let mut name = String::new();
        for p in &parts[..parts.len() - 1] {
            let last = name.rsplit('.').next().unwrap_or("");
            if name.is_empty() || p.starts_with(&format!("{name}.")) {
                name = p.to_string();
            } else if let Some((head, tail)) = p.split_once('.')
                && head == last
            {
                name = format!("{name}.{tail}");
            } else {
                name = format!("{name}.{p}");
            }
        }
        return if name.is_empty() { None } else { Some(name) };
    }
    Some(raw.to_string())
}

/// The name of the GELU layer that `node` (the formula's last multiplication) completes.
pub(super) fn gelu_name(node: &NodeProto) -> String {
    sanitize_name(node).unwrap_or_else(|| "gelu".into())
}

pub(super) fn ints_usize(what: &str, v: &[i64]) -> std::result::Result<Vec<usize>, String> {
    v.iter()
        .map(|&x| {
            if (0..=(1 << 24)).contains(&x) { Ok(x as usize) } else { Err(format!("{what} value {x} is out of range")) }
        })
        .collect()
}

/// Symmetric 2-D padding from ONNX `pads` `[top, left, bottom, right]`.
pub(super) fn symmetric_pads(pads: Option<Vec<i64>>) -> std::result::Result<(usize, usize), String> {
    match pads {
        None => Ok((0, 0)),
        Some(p) if p.len() == 4 => {
            let p = ints_usize("pads", &p)?;
            if p[0] != p[2] || p[1] != p[3] {
                return Err(format!("asymmetric padding {p:?} is not supported (kiln pads symmetrically)"));
            }
            Ok((p[0], p[1]))
        }
        Some(p) => Err(format!("pads {p:?} must have 4 values for a 2-D window")),
    }
}

pub(super) fn pair(what: &str, v: Option<Vec<i64>>, default: usize) -> std::result::Result<(usize, usize), String> {
    match v {
        None => Ok((default, default)),
        Some(v) if v.len() == 2 => {
            let v = ints_usize(what, &v)?;
            Ok((v[0], v[1]))
        }
        Some(v) => Err(format!("{what} {v:?} must have 2 values")),
    }
}

pub(super) fn check_auto_pad(a: &Attrs) -> std::result::Result<(), String> {
    match a.string("auto_pad")?.as_deref() {
        None | Some("NOTSET") | Some("VALID") | Some("") => Ok(()),
        Some(p) => Err(format!("auto_pad {p} is not supported (use explicit pads)")),
    }
}

pub(super) fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}
