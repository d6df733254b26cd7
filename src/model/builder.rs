//! The fluent model builder: [`ModelBuilder`] (its documentation has the example). This file
//! holds the builder's state, naming, branching and `build`; each layer's methods (`conv2d`,
//! `relu`, `residual`, ...) live in that layer's home, `model/layers/<name>.rs`.

use std::collections::HashSet;

use super::layers::Layer;
use super::{Model, Node};
use crate::{Error, Result};

/// Largest number of values a tensor may have (per sample, or the whole input batch): 2^40.
/// Beyond it sizes multiplied by a batch size could overflow.
const MAX_ELEMENTS: usize = 1 << 40;

/// One branch of a [`ModelBuilder::concat`] block: a closure that appends layers to the builder
/// it is given. Make one with [`branch`].
pub struct Branch<'a>(pub(in crate::model) Box<dyn FnOnce(ModelBuilder) -> ModelBuilder + 'a>);

/// Wraps a closure as a [`Branch`]: `branch(|b| b.conv2d(64, 1).relu())`.
pub fn branch<'a>(f: impl FnOnce(ModelBuilder) -> ModelBuilder + 'a) -> Branch<'a> {
    Branch(Box::new(f))
}

#[derive(Clone, Debug)]
struct Pending {
    name: Option<String>,
    layer: Layer,
    inputs: Vec<usize>,
}

/// Builds a [`Model`] layer by layer, as a fluent chain of named layers.
///
/// ```
/// use kiln::model::{ModelBuilder, Conv2d};
/// let model = ModelBuilder::new(&[8, 3, 32, 32])
///     .conv2d(16, 3).name("conv1")          // go-metal: AddConv2D(16, 3, "conv1")
///     .relu()
///     .conv2d_with(Conv2d::new(32, 3).stride(2).padding(1))
///     .batch_norm()
///     .relu()
///     // a residual block: main path plus identity shortcut, joined by addition
///     .residual(|main| main.conv2d_with(Conv2d::new(32, 3).padding("same")).relu())
///     .global_avg_pool()
///     .dense(10)
///     .build()
///     .unwrap();
/// assert_eq!(model.output_shape(), &[8, 10]);
/// ```
///
/// Every method appends one layer after the current one. Branching blocks take closures that
/// build each branch from the same starting point: [`ModelBuilder::residual`] (identity
/// shortcut), [`ModelBuilder::residual_with`] (projection shortcut) and [`ModelBuilder::concat`]
/// (parallel branches joined along channels, as in Inception). Errors (bad options, shapes that do
/// not fit, duplicate names) are collected and returned by [`ModelBuilder::build`], naming the
/// layer.
#[derive(Debug)]
pub struct ModelBuilder {
    input_shape: Vec<usize>,
    nodes: Vec<Pending>,
    cursor: usize,
    last_added: Option<usize>,
    seed: u64,
    error: Option<Error>,
    /// Node ranges of the `checkpoint` blocks so far (`model/checkpoint.rs`).
    checkpoints: Vec<std::ops::Range<usize>>,
}

impl ModelBuilder {
    /// Starts a model whose input is `[batch, C, H, W]` (images) or `[batch, features]`.
    /// The batch size is the default for summaries; a model runs at any batch size.
    pub fn new(input_shape: &[usize]) -> Self {
        ModelBuilder {
            input_shape: input_shape.to_vec(),
            nodes: vec![Pending { name: Some("input".into()), layer: Layer::Input, inputs: vec![] }],
            cursor: 0,
            last_added: None,
            seed: 0,
            error: None,
            checkpoints: Vec::new(),
        }
    }

    /// Seed for the initial weights (default 0): the same seed gives the same weights.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Appends any layer after the current one.
    pub fn layer(mut self, layer: Layer) -> Self {
        self.nodes.push(Pending { name: None, layer, inputs: vec![self.cursor] });
        self.cursor = self.nodes.len() - 1;
        self.last_added = Some(self.cursor);
        self
    }

    /// Names the most recently added layer (otherwise it gets `conv2d_1`, `relu_2`, ...).
    ///
    /// Inside a branch closure of [`ModelBuilder::residual`] or [`ModelBuilder::concat`], `name`
    /// before the branch's first layer is an error, as before the model's first layer: there is no
    /// layer of this branch to name yet.
    pub fn name(mut self, name: &str) -> Self {
        match self.last_added {
            Some(i) => self.nodes[i].name = Some(name.to_string()),
            None if self.cursor != 0 => {
                self.error.get_or_insert(Error::Model(format!(
                    "name(\"{name}\") called at the start of a branch, before any layer was added to it"
                )));
            }
            None => {
                self.error.get_or_insert(Error::Model(format!("name(\"{name}\") called before any layer was added")));
            }
        }
        self
    }

    /// The node the next layer will follow (where branches fork).
    pub(in crate::model) fn cursor(&self) -> usize {
        self.cursor
    }

    /// Runs `f` on a builder positioned at `fork` and returns it with the branch's last node.
    /// Inside the branch nothing has been added yet, so `name` has nothing to name (it must not
    /// rename the previous branch's last layer).
    pub(in crate::model) fn run_branch(
        mut self,
        fork: usize,
        f: impl FnOnce(ModelBuilder) -> ModelBuilder,
    ) -> (Self, usize) {
        self.cursor = fork;
        self.last_added = None;
        let b = f(self);
        let end = b.cursor;
        (b, end)
    }

    /// How many nodes the builder holds (the input included): where a block's first node goes.
    pub(in crate::model) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Records a gradient-checkpointed segment: the nodes `segment` (`model/checkpoint.rs`).
    pub(in crate::model) fn add_checkpoint(mut self, segment: std::ops::Range<usize>) -> Self {
        self.checkpoints.push(segment);
        self
    }

    /// Appends a layer that joins the outputs of the nodes `inputs` (residual, concat).
    pub(in crate::model) fn join(mut self, layer: Layer, inputs: Vec<usize>) -> Self {
        self.nodes.push(Pending { name: None, layer, inputs });
        self.cursor = self.nodes.len() - 1;
        self.last_added = Some(self.cursor);
        self
    }

    /// Validates the whole model and computes shapes, parameters and initial weights.
    pub fn build(mut self) -> Result<Model> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let shape = &self.input_shape;
        if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none_or(|n| n > MAX_ELEMENTS) {
            return Err(Error::Model(format!("input shape {shape:?} is too large")));
        }
        if !(shape.len() == 2 || shape.len() == 4) || shape.contains(&0) {
            return Err(Error::Model(format!(
                "input shape must be [batch, C, H, W] or [batch, features] with non-zero sizes, got {shape:?}"
            )));
        }
        if self.nodes.len() < 2 {
            return Err(Error::Model("the model has no layers".into()));
        }
        let names = assign_names(&self.nodes)?;
        let checkpoints = std::mem::take(&mut self.checkpoints);
        let mut nodes: Vec<Node> = Vec::with_capacity(self.nodes.len());
        for (i, (p, name)) in self.nodes.into_iter().zip(names).enumerate() {
            let shape = if i == 0 {
                shape[1..].to_vec()
            } else {
                let ins: Vec<&[usize]> = p.inputs.iter().map(|&j| nodes[j].shape.as_slice()).collect();
                super::shape::infer(&name, &p.layer, &ins)?
            };
            if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none_or(|n| n > MAX_ELEMENTS) {
                return Err(Error::layer(&name, format!("output shape {shape:?} is too large")));
            }
            nodes.push(Node { name, layer: p.layer, inputs: p.inputs, shape });
        }
        Model::from_nodes(nodes, self.input_shape[0], self.seed)?.with_checkpoints(checkpoints)
    }
}

/// Gives every unnamed layer `{type}_{k}` (the k-th layer of its type), skipping names the user
/// took, and rejects empty or duplicate names.
fn assign_names(nodes: &[Pending]) -> Result<Vec<String>> {
    let mut taken = HashSet::new();
    for p in nodes {
        if let Some(n) = &p.name {
            if n.is_empty() {
                return Err(Error::Model("a layer name must not be empty".into()));
            }
            if !taken.insert(n.clone()) {
                return Err(Error::layer(n, "duplicate layer name: every layer needs a unique name"));
            }
        }
    }
    let mut counts = std::collections::HashMap::<&str, usize>::new();
    let mut out = Vec::with_capacity(nodes.len());
    for p in nodes {
        let t = p.layer.type_name();
        let k = counts.entry(t).or_insert(0);
        *k += 1;
        match &p.name {
            Some(n) => out.push(n.clone()),
            None => {
                let mut candidate = format!("{t}_{k}");
                while taken.contains(&candidate) {
                    *k += 1;
                    candidate = format!("{t}_{k}");
                }
                taken.insert(candidate.clone());
                out.push(candidate);
            }
        }
    }
    Ok(out)
}
