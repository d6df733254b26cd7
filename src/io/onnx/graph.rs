//! The import's driver: the graph's input and output, initializers, walking the nodes in
//! dependency order through [`Importer::node`](super::import), collecting every node kiln
//! cannot import into one error, and building the model from the layers the output needs.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::import::{Importer, Params, Res, SUPPORTED_OPS, UNSUPPORTED, Val};
use super::proto::{ValueInfoProto, tensor_shape_proto::dimension::Value as DimValue, type_proto};
use super::read::{self, node_label};
use crate::model::{Layer, Model, Node};
use crate::{Error, Result};

/// The per-sample shape of the graph's input, and its batch size when fixed.
fn input_shape(v: &ValueInfoProto) -> Res<(Option<usize>, Vec<usize>)> {
    let Some(type_proto::Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err("the input is not a tensor".into());
    };
    if !matches!(t.elem_type, Some(1)) {
        return Err(format!("the input must be float32 (element type {:?})", t.elem_type));
    }
    let dims = &t.shape.as_ref().ok_or("the input has no shape")?.dim;
    if !(dims.len() == 2 || dims.len() == 4) {
        return Err(format!(
            "the input must be [batch, C, H, W] or [batch, features]; it has {} dimensions",
            dims.len()
        ));
    }
    let batch = match &dims[0].value {
        Some(DimValue::DimValue(b)) if *b > 0 && *b <= 1 << 24 => Some(*b as usize),
        _ => None,
    };
    let mut per = Vec::new();
    for d in &dims[1..] {
        match &d.value {
            Some(DimValue::DimValue(v)) if *v > 0 && *v <= 1 << 24 => per.push(*v as usize),
            _ => {
                return Err(format!(
                    "every input dimension but the batch must be a fixed positive size, got {:?}",
                    d.value
                ));
            }
        }
    }
    Ok((batch, per))
}

/// The kiln model of an ONNX file's bytes; `base` is the folder external data is read from.
pub(super) fn from_bytes(bytes: &[u8], path: &Path, base: Option<&Path>) -> Result<Model> {
    let proto = read::decode(bytes, path)?;
    let graph = proto.graph.as_ref().expect("decode checks the graph");
    let fail = |reason: String| Error::format(path, reason);
    let mut vals = HashMap::new();
    let mut problems = Vec::new();
    for t in &graph.initializer {
        let name = t.name.clone().unwrap_or_default();
        match read::read_tensor(t, base) {
            Ok(c) => {
                vals.insert(name, Val::Const(c));
            }
            Err(e) => problems.push(format!("initializer '{name}': {e}")),
        }
    }
    if !problems.is_empty() {
        return Err(fail(problems.join("; ")));
    }
    let inputs: Vec<&ValueInfoProto> =
        graph.input.iter().filter(|i| !vals.contains_key(i.name.as_deref().unwrap_or(""))).collect();
    let [input] = inputs.as_slice() else {
        return Err(fail(format!("kiln models have one input; the graph has {}", inputs.len())));
    };
    let in_name = input.name.clone().unwrap_or_default();
    let (batch, per_sample) = input_shape(input).map_err(|e| fail(format!("input '{in_name}': {e}")))?;
    let [output] = graph.output.as_slice() else {
        return Err(fail(format!("kiln models have one output; the graph has {}", graph.output.len())));
    };
    let out_name = output.name.clone().unwrap_or_default();
    let mut available: HashSet<String> = vals.keys().cloned().collect();
    available.insert(in_name.clone());
    let order = read::topological_order(&graph.node, &available).map_err(fail)?;
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for n in &graph.node {
        for i in &n.input {
            *uses.entry(i.as_str()).or_default() += 1;
        }
    }
    *uses.entry(out_name.as_str()).or_default() += 1;
    let input_node_name = if in_name.is_empty() { "input".to_string() } else { in_name.clone() };
    let mut imp = Importer {
        go_metal: proto.producer_name.as_deref() == Some("go-metal"),
        fixed_batch: batch,
        vals,
        nodes: vec![Node {
            name: input_node_name.clone(),
            layer: Layer::Input,
            inputs: vec![],
            shape: per_sample.clone(),
        }],
        params: vec![Params::new()],
        names: HashSet::from([input_node_name]),
        uses,
        alias_reads: HashMap::new(),
    };
    imp.vals.insert(in_name, Val::Act { node: 0, shape: per_sample.clone() });
    for &i in &order {
        let node = &graph.node[i];
        if !matches!(node.domain.as_deref(), None | Some("") | Some("ai.onnx")) {
            problems.push(format!(
                "{}: operators of domain '{}' are not supported",
                node_label(node, i),
                node.domain.as_deref().unwrap_or("")
            ));
            continue;
        }
        let poisoned = node.input.iter().any(|n| matches!(imp.vals.get(n.as_str()), Some(Val::Poison)));
        let op = node.op_type.as_deref().unwrap_or("");
        let result = if !SUPPORTED_OPS.contains(&op) {
            Err(UNSUPPORTED.to_string())
        } else if poisoned {
            // Its input is already reported; a supported operator after it is not.
            Err(String::new())
        } else {
            imp.node(node)
        };
        if let Err(e) = result {
            if !e.is_empty() {
                problems.push(format!("{}: {e}", node_label(node, i)));
            }
            for o in &node.output {
                imp.vals.insert(o.clone(), Val::Poison);
            }
        }
    }
    if !problems.is_empty() {
        return Err(fail(format!(
            "cannot import {} node{}: {}",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" },
            problems.join("; ")
        )));
    }
    let (last, shape) = match imp.vals.get(&out_name) {
        Some(Val::Act { node, shape }) if *node != 0 => (*node, shape.clone()),
        _ => return Err(fail(format!("the output '{out_name}' is not computed by any layer kiln can import"))),
    };
    let last = imp.exact(last, &shape).map_err(|e| fail(format!("output '{out_name}': {e}")))?;
    finish(imp, last, batch.unwrap_or(1), path)
}

/// Keeps the layers the output depends on, in order, and builds the model from them.
fn finish(imp: Importer, last: usize, batch: usize, path: &Path) -> Result<Model> {
    let mut live = vec![false; imp.nodes.len()];
    live[last] = true;
    live[0] = true;
    for i in (0..=last).rev() {
        if live[i] {
            for &j in &imp.nodes[i].inputs {
                live[j] = true;
            }
        }
    }
    let mut remap = vec![usize::MAX; imp.nodes.len()];
    let mut nodes = Vec::new();
    let mut kept_params = Vec::new();
    for (i, (mut n, p)) in imp.nodes.into_iter().zip(imp.params).enumerate().take(last + 1) {
        if !live[i] {
            continue;
        }
        n.inputs = n.inputs.iter().map(|&j| remap[j]).collect();
        remap[i] = nodes.len();
        nodes.push(n);
        kept_params.push(p);
    }
    let mut input_shape = vec![batch];
    input_shape.extend_from_slice(&nodes[0].shape);
    let specs = Model::check_saved_graph(&nodes, &input_shape)?;
    let mut values = Vec::with_capacity(specs.len());
    for s in &specs {
        let v = kept_params[s.node]
            .get(&s.role)
            .ok_or_else(|| Error::format(path, format!("parameter '{}' has no value in the file", s.name)))?;
        if v.len() != s.len() {
            return Err(Error::format(
                path,
                format!("parameter '{}' has {} values for shape {:?}", s.name, v.len(), s.shape),
            ));
        }
        if v.iter().any(|x| !x.is_finite()) {
            return Err(Error::format(path, format!("parameter '{}' has a non-finite value", s.name)));
        }
        values.push(v.clone());
    }
    Ok(Model::from_saved(nodes, specs, values, batch, 0))
}
