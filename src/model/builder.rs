//! The fluent model builder: [`ModelBuilder`] (its documentation has the example).

use std::collections::HashSet;

use super::layers::{Activation, BatchNorm, Conv2d, ConvTranspose2d, GroupNorm, Layer, Linear, Pool2d};
use super::{Model, Node};
use crate::{Error, Result};

/// Largest number of values a tensor may have (per sample, or the whole input batch): 2^40.
/// Beyond it sizes multiplied by a batch size could overflow.
const MAX_ELEMENTS: usize = 1 << 40;

/// One branch of a [`ModelBuilder::concat`] block: a closure that appends layers to the builder
/// it is given. Make one with [`branch`].
pub struct Branch<'a>(Box<dyn FnOnce(ModelBuilder) -> ModelBuilder + 'a>);

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

    /// `out_channels` filters of `kernel x kernel`, stride 1, no padding, with bias.
    pub fn conv2d(self, out_channels: usize, kernel: usize) -> Self {
        self.layer(Layer::Conv2d(Conv2d::new(out_channels, kernel)))
    }
    /// A convolution with options: `conv2d_with(Conv2d::new(64, 3).stride(2).padding(1))`.
    pub fn conv2d_with(self, conv: Conv2d) -> Self {
        self.layer(Layer::Conv2d(conv))
    }
    /// A transposed convolution (`nn.ConvTranspose2d`): `out_channels` filters of
    /// `kernel x kernel`, stride 1, no padding, with bias.
    pub fn conv_transpose2d(self, out_channels: usize, kernel: usize) -> Self {
        self.layer(Layer::ConvTranspose2d(ConvTranspose2d::new(out_channels, kernel)))
    }
    /// A transposed convolution with options:
    /// `conv_transpose2d_with(ConvTranspose2d::new(32, 3).stride(2).padding(1).output_padding(1))`.
    pub fn conv_transpose2d_with(self, conv: ConvTranspose2d) -> Self {
        self.layer(Layer::ConvTranspose2d(conv))
    }
    /// A fully connected layer with bias; flattens its input itself.
    pub fn dense(self, out_features: usize) -> Self {
        self.layer(Layer::Linear(Linear::new(out_features)))
    }
    /// Same as [`ModelBuilder::dense`], under PyTorch's name.
    pub fn linear(self, out_features: usize) -> Self {
        self.dense(out_features)
    }
    /// A fully connected layer with options: `dense_with(Linear::new(10).bias(false))`.
    pub fn dense_with(self, linear: Linear) -> Self {
        self.layer(Layer::Linear(linear))
    }
    /// Flattens each sample: `[batch, ...] -> [batch, product]`.
    pub fn flatten(self) -> Self {
        self.layer(Layer::Flatten)
    }
    /// Reshapes each sample to `shape` (same number of values).
    pub fn reshape(self, shape: &[usize]) -> Self {
        self.layer(Layer::Reshape(shape.to_vec()))
    }
    /// `max(x, 0)` element-wise.
    pub fn relu(self) -> Self {
        self.layer(Layer::Activation(Activation::Relu))
    }
    /// `x` for `x > 0`, else `slope * x` (PyTorch's default slope is 0.01; must be finite).
    pub fn leaky_relu(self, slope: f32) -> Self {
        self.layer(Layer::Activation(Activation::LeakyRelu { slope }))
    }
    /// `x` for `x > 0`, else `alpha * (exp(x) - 1)` (PyTorch's default alpha is 1; must be
    /// finite).
    pub fn elu(self, alpha: f32) -> Self {
        self.layer(Layer::Activation(Activation::Elu { alpha }))
    }
    /// `1 / (1 + exp(-x))` element-wise.
    pub fn sigmoid(self) -> Self {
        self.layer(Layer::Activation(Activation::Sigmoid))
    }
    /// The hyperbolic tangent, element-wise.
    pub fn tanh(self) -> Self {
        self.layer(Layer::Activation(Activation::Tanh))
    }
    /// `x * sigmoid(x)` element-wise.
    pub fn silu(self) -> Self {
        self.layer(Layer::Activation(Activation::Silu))
    }
    /// Same as [`ModelBuilder::silu`].
    pub fn swish(self) -> Self {
        self.silu()
    }
    /// The exact GELU, `x * Phi(x)` (PyTorch's default, not the tanh approximation).
    pub fn gelu(self) -> Self {
        self.layer(Layer::Activation(Activation::Gelu))
    }
    /// Softmax along `axis` of the full tensor (1 for `[batch, classes]`; -1 for the last axis).
    pub fn softmax(self, axis: isize) -> Self {
        self.layer(Layer::Softmax { axis })
    }
    /// In training, zeroes each value with probability `rate` (in `[0, 1)`) and scales the
    /// rest by `1 / (1 - rate)`; the identity in evaluation.
    pub fn dropout(self, rate: f32) -> Self {
        self.layer(Layer::Dropout { rate })
    }
    /// Batch normalisation with PyTorch's defaults (eps 1e-5, momentum 0.1, affine).
    pub fn batch_norm(self) -> Self {
        self.layer(Layer::BatchNorm(BatchNorm::default()))
    }
    /// Batch normalisation with options: `batch_norm_with(BatchNorm::new().momentum(0.01))`.
    pub fn batch_norm_with(self, bn: BatchNorm) -> Self {
        self.layer(Layer::BatchNorm(bn))
    }
    /// Group normalisation with `groups` groups and PyTorch's defaults (eps 1e-5, affine).
    pub fn group_norm(self, groups: usize) -> Self {
        self.layer(Layer::GroupNorm(GroupNorm::new(groups)))
    }
    /// Group normalisation with options: `group_norm_with(GroupNorm::new(8).eps(1e-6))`.
    pub fn group_norm_with(self, gn: GroupNorm) -> Self {
        self.layer(Layer::GroupNorm(gn))
    }
    /// Max pooling with a `kernel x kernel` window and stride equal to the kernel.
    pub fn max_pool2d(self, kernel: usize) -> Self {
        self.layer(Layer::MaxPool2d(Pool2d::new(kernel)))
    }
    /// Max pooling with options: `max_pool2d_with(Pool2d::new(3).stride(2).padding(1))`.
    pub fn max_pool2d_with(self, pool: Pool2d) -> Self {
        self.layer(Layer::MaxPool2d(pool))
    }
    /// Average pooling with a `kernel x kernel` window and stride equal to the kernel.
    pub fn avg_pool2d(self, kernel: usize) -> Self {
        self.layer(Layer::AvgPool2d(Pool2d::new(kernel)))
    }
    /// Average pooling with options (stride, padding, `count_include_pad`).
    pub fn avg_pool2d_with(self, pool: Pool2d) -> Self {
        self.layer(Layer::AvgPool2d(pool))
    }
    /// Mean over height and width: `[batch, C, H, W] -> [batch, C]`.
    pub fn global_avg_pool(self) -> Self {
        self.layer(Layer::GlobalAvgPool)
    }

    /// Runs `f` on a builder positioned at `fork` and returns it with the branch's last node.
    /// Inside the branch nothing has been added yet, so `name` has nothing to name (it must not
    /// rename the previous branch's last layer).
    fn run_branch(mut self, fork: usize, f: impl FnOnce(ModelBuilder) -> ModelBuilder) -> (Self, usize) {
        self.cursor = fork;
        self.last_added = None;
        let b = f(self);
        let end = b.cursor;
        (b, end)
    }

    fn join(mut self, layer: Layer, inputs: Vec<usize>) -> Self {
        self.nodes.push(Pending { name: None, layer, inputs });
        self.cursor = self.nodes.len() - 1;
        self.last_added = Some(self.cursor);
        self
    }

    /// A residual block with an identity shortcut: `y = main(x) + x`.
    pub fn residual(self, main: impl FnOnce(ModelBuilder) -> ModelBuilder) -> Self {
        self.residual_with(main, |shortcut| shortcut)
    }

    /// A residual block with a shortcut path of its own (a projection such as a strided 1x1
    /// convolution and batch norm): `y = main(x) + shortcut(x)`.
    pub fn residual_with(
        self,
        main: impl FnOnce(ModelBuilder) -> ModelBuilder,
        shortcut: impl FnOnce(ModelBuilder) -> ModelBuilder,
    ) -> Self {
        let fork = self.cursor;
        let (b, main_end) = self.run_branch(fork, main);
        let (b, short_end) = b.run_branch(fork, shortcut);
        b.join(Layer::Add, vec![main_end, short_end])
    }

    /// Parallel branches from the current layer, concatenated along channels:
    /// `.concat([branch(|b| b.conv2d(64, 1)), branch(|b| b.max_pool2d_with(..).conv2d(32, 1))])`.
    pub fn concat<'a>(self, branches: impl IntoIterator<Item = Branch<'a>>) -> Self {
        let fork = self.cursor;
        let mut b = self;
        let mut ends = Vec::new();
        for Branch(f) in branches {
            let (nb, end) = b.run_branch(fork, f);
            b = nb;
            ends.push(end);
        }
        b.join(Layer::Concat, ends)
    }

    /// Validates the whole model and computes shapes, parameters and initial weights.
    pub fn build(self) -> Result<Model> {
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
        Model::from_nodes(nodes, self.input_shape[0], self.seed)
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
