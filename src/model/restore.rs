//! Rebuilding a model from a graph read back from a file (`crate::io`): the graph is checked as
//! the builder checks a new one (shapes re-inferred layer by layer), and sizes are bounded
//! before any arithmetic on them, because the file may be corrupt or hostile. Parameter values
//! are not drawn here: they come from the file.

use std::collections::HashSet;

use super::layers::Layer;
use super::params::{self, ParamSpec};
use super::shape::{MAX_OPTION, check_options};
use super::{Model, Node};
use crate::{Error, Result};

/// Largest number of values per sample a layer's output may have in a file.
const MAX_VALUES_PER_SAMPLE: usize = 1 << 32;

/// The product of `dims`, or an error if it exceeds [`MAX_VALUES_PER_SAMPLE`].
fn values_per_sample(name: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d).filter(|&p| p <= MAX_VALUES_PER_SAMPLE))
        .ok_or_else(|| Error::layer(name, format!("shape {dims:?} has more than {MAX_VALUES_PER_SAMPLE} values")))
}

impl Model {
    /// Checks a saved graph (`nodes`, for input `[batch, ...]`) as the builder would check it and
    /// returns its parameter specifications: node 0 is the input, every other node reads only
    /// earlier nodes, names are unique and non-empty, every option is in range, and each node's
    /// stored shape is the one inferred from its inputs.
    pub(crate) fn check_saved_graph(nodes: &[Node], input_shape: &[usize]) -> Result<Vec<ParamSpec>> {
        let bad = |reason: String| Err(Error::Model(reason));
        if !(input_shape.len() == 2 || input_shape.len() == 4) || input_shape.contains(&0) {
            return bad(format!("saved input shape {input_shape:?} is not [batch, C, H, W] or [batch, features]"));
        }
        if input_shape.iter().any(|&d| d > MAX_OPTION) {
            return bad(format!("saved input shape {input_shape:?} has a dimension larger than {MAX_OPTION}"));
        }
        values_per_sample("input", &input_shape[1..])?;
        if nodes.len() < 2 {
            return bad("the saved model has no layers".into());
        }
        let first = &nodes[0];
        if first.layer != Layer::Input || !first.inputs.is_empty() || first.shape != input_shape[1..] {
            return bad(format!(
                "saved node 0 must be the input layer, with no inputs and shape {:?}",
                &input_shape[1..]
            ));
        }
        let mut names = HashSet::new();
        let mut specs = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            if node.name.is_empty() {
                return bad(format!("saved node {i} has an empty name"));
            }
            if !names.insert(node.name.as_str()) {
                return Err(Error::layer(&node.name, "duplicate layer name in the saved model"));
            }
            if i == 0 {
                continue;
            }
            if node.inputs.is_empty() || node.inputs.iter().any(|&j| j >= i) {
                return Err(Error::layer(
                    &node.name,
                    format!("saved inputs {:?} must be non-empty and all before node {i}", node.inputs),
                ));
            }
            check_options(&node.name, &node.layer)?;
            if let Layer::Reshape(dims) = &node.layer {
                values_per_sample(&node.name, dims)?;
            }
            let ins: Vec<&[usize]> = node.inputs.iter().map(|&j| nodes[j].shape.as_slice()).collect();
            let shape = super::shape::infer(&node.name, &node.layer, &ins)?;
            if shape != node.shape {
                return Err(Error::layer(
                    &node.name,
                    format!("saved output shape {:?} differs from the inferred {shape:?}", node.shape),
                ));
            }
            values_per_sample(&node.name, &shape)?;
            specs.extend(params::param_specs(i, &node.name, &node.layer, &nodes[node.inputs[0]].shape));
        }
        Ok(specs)
    }

    /// A model from a graph that [`Model::check_saved_graph`] accepted, its specifications, and
    /// one value vector per specification (lengths checked by the caller).
    pub(crate) fn from_saved(
        nodes: Vec<Node>,
        params: Vec<ParamSpec>,
        values: Vec<Vec<f32>>,
        batch: usize,
        seed: u64,
    ) -> Model {
        debug_assert!(params.iter().zip(&values).all(|(p, v)| p.len() == v.len()));
        Model { nodes, params, values, batch, seed, checkpoints: Vec::new() }
    }
}
