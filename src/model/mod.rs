//! Models: layer kinds and options, the fluent builder, the validated graph with every layer's
//! output shape, parameters named and laid out as PyTorch's, their initial values, FLOPs and the
//! summary table. Nothing here knows about devices.

mod builder;
mod checkpoint;
mod layers;
pub mod lower;
mod params;
mod restore;
pub mod shape;
pub mod spec;
mod summary;

pub use builder::{Branch, ModelBuilder, branch};
pub use layers::options::*;
pub use layers::{Layer, Padding};
pub use lower::Mode;
pub use params::{ParamRole, ParamSpec};
pub use spec::{ModelSpec, SpecItem};

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// One layer of a built model: its unique name, kind, input nodes and per-sample output shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Unique within the model: given by the builder, or the layer's type name and a counter
    /// (`conv2d_1`); parameter names start with it.
    pub name: String,
    /// What the node computes, with its options.
    pub layer: Layer,
    /// Indices of the nodes feeding this one (earlier in the list: the list is topological).
    pub inputs: Vec<usize>,
    /// Output shape without the batch axis.
    pub shape: Vec<usize>,
}

/// A validated model: a directed acyclic graph of named layers in topological order, with shapes,
/// parameter specifications and the current parameter values (on the host).
///
/// The last node is the output.
#[derive(Clone, Debug)]
pub struct Model {
    nodes: Vec<Node>,
    params: Vec<ParamSpec>,
    values: Vec<Vec<f32>>,
    batch: usize,
    seed: u64,
    /// Gradient-checkpointed segments: node ranges, in order, none nested (see
    /// [`ModelBuilder::checkpoint`]).
    checkpoints: Vec<std::ops::Range<usize>>,
}

impl Model {
    pub(crate) fn from_nodes(nodes: Vec<Node>, batch: usize, seed: u64) -> Result<Model> {
        let mut params = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            if let Some(&src) = node.inputs.first() {
                params.extend(params::param_specs(i, &node.name, &node.layer, &nodes[src].shape));
            }
        }
        // Parameter counts in checked arithmetic (a [2^31, 2^33] weight must not wrap to 0
        // values), and the values' memory reserved fallibly: a model too large for this machine
        // is an error naming the layer and the bytes, not an aborted process.
        let mut total = 0usize;
        for p in &params {
            let layer = &nodes[p.node].name;
            let n =
                p.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).filter(|&n| n <= params::MAX_PARAM_VALUES);
            let Some(n) = n else {
                return Err(Error::layer(
                    layer,
                    format!(
                        "parameter {} of shape {:?} has more than {} values",
                        p.name,
                        p.shape,
                        params::MAX_PARAM_VALUES
                    ),
                ));
            };
            total = total.checked_add(n).filter(|&t| t <= params::MAX_PARAM_VALUES).ok_or_else(|| {
                Error::Model(format!(
                    "the parameters up to {} number more than {} values",
                    p.name,
                    params::MAX_PARAM_VALUES
                ))
            })?;
        }
        let values = params
            .iter()
            .enumerate()
            .map(|(k, p)| {
                params::init_param(p, &nodes[p.node].layer, seed, k).map_err(|e| Error::layer(&nodes[p.node].name, e))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Model { nodes, params, values, batch, seed, checkpoints: Vec::new() })
    }

    /// The layers, input node first, output node last.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node with the given name.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The batch size given to the builder (a model runs at any batch size).
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// The seed the initial weights were drawn with.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Input shape with the builder's batch size: `[batch, C, H, W]` or `[batch, features]`.
    pub fn input_shape(&self) -> Vec<usize> {
        self.shape_with_batch(0)
    }

    /// Output shape with the builder's batch size.
    pub fn output_shape(&self) -> Vec<usize> {
        self.shape_with_batch(self.nodes.len() - 1)
    }

    /// Output shape of node `i` with the builder's batch size.
    pub fn shape_with_batch(&self, i: usize) -> Vec<usize> {
        let mut s = vec![self.batch];
        s.extend_from_slice(&self.nodes[i].shape);
        s
    }

    /// Every parameter and running statistic, in PyTorch `state_dict` order.
    pub fn params(&self) -> &[ParamSpec] {
        &self.params
    }

    /// Number of trainable parameters (what PyTorch's `sum(p.numel() for p in m.parameters())`
    /// gives).
    pub fn param_count(&self) -> usize {
        self.params.iter().filter(|p| p.trainable).map(|p| p.len()).sum()
    }

    /// Number of non-trained values (batch-norm running statistics).
    pub fn buffer_count(&self) -> usize {
        self.params.iter().filter(|p| !p.trainable).map(|p| p.len()).sum()
    }

    /// Current values of every parameter, in the order of [`Model::params`].
    pub fn param_values(&self) -> &[Vec<f32>] {
        &self.values
    }

    /// Current value of the parameter `name` (such as `"conv1.weight"`).
    pub fn param(&self, name: &str) -> Option<&[f32]> {
        self.params.iter().position(|p| p.name == name).map(|i| self.values[i].as_slice())
    }

    /// Replaces the value of parameter `name`; the length must match its shape.
    pub fn set_param(&mut self, name: &str, value: &[f32]) -> Result<()> {
        let i = self.params.iter().position(|p| p.name == name).ok_or_else(|| Error::Param {
            name: name.into(),
            reason: "the model has no parameter of this name".into(),
        })?;
        if value.len() != self.params[i].len() {
            return Err(Error::Param {
                name: name.into(),
                reason: format!(
                    "expected {} values for shape {:?}, got {}",
                    self.params[i].len(),
                    self.params[i].shape,
                    value.len()
                ),
            });
        }
        self.values[i].copy_from_slice(value);
        Ok(())
    }

    /// Forward FLOPs of node `i` for one sample (a multiply-add counts as two).
    pub fn flops(&self, i: usize) -> u64 {
        summary::node_flops(self, i)
    }

    /// Total forward FLOPs for one sample.
    pub fn total_flops(&self) -> u64 {
        (0..self.nodes.len()).map(|i| self.flops(i)).sum()
    }

    /// A table of layers, output shapes, parameters and FLOPs, with totals and memory, like
    /// PyTorch's `torchsummary` or Keras's `model.summary()`.
    pub fn summary(&self) -> String {
        summary::render(self)
    }
}
