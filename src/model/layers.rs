//! The layer kinds a model is made of: the [`Layer`] enum here, and one home per kind in
//! `layers/` holding its whole story: options, shape rule (`infer`), parameters (`params`,
//! `init`), FLOPs, and lowering to ops (`forward`, `backward`). `shape.rs`, `params.rs`,
//! `summary.rs`, `lower.rs` and `spec.rs` only dispatch to them through the `LayerKind` trait
//! each home implements. A new layer is a file there and, here, its `mod` line, its variant,
//! its arm in `Layer::with_kind` (the one exhaustive match) and its entry in `SPEC_TYPES`.
//!
//! Each option struct is a small builder (`Conv2d::new(32, 3).stride(2).padding(1)`) handed to the
//! matching `ModelBuilder::*_with` method; the short methods (`conv2d(32, 3)`) use the defaults,
//! which are PyTorch's.

use serde::{Deserialize, Serialize};

use super::ParamRole;
use super::lower::{Backward, Forward};
use super::params::ParamDecl;
use super::spec::{SpecTable, SpecType};
use crate::{Error, Result};

pub(crate) mod activation;
pub(crate) mod batch_norm;
pub(crate) mod conv2d;
pub(crate) mod conv_transpose2d;
pub(crate) mod dropout;
pub(crate) mod group_norm;
pub(crate) mod join;
pub(crate) mod linear;
pub(crate) mod pool;
pub(crate) mod softmax;
pub(crate) mod view;
pub use options::*;

/// The option types of the layer kinds (each defined in its home), re-exported by `model`.
pub mod options {
    pub use super::activation::Activation;
    pub use super::batch_norm::BatchNorm;
    pub use super::conv_transpose2d::ConvTranspose2d;
    pub use super::conv2d::Conv2d;
    pub use super::group_norm::GroupNorm;
    pub use super::linear::Linear;
    pub use super::pool::Pool2d;
}

/// How a convolution or pooling window is padded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Padding {
    /// No padding (PyTorch's `padding=0`, Keras's `"valid"`).
    Valid,
    /// Output spatial size equals input size (stride 1 only), as PyTorch's `padding="same"`.
    Same,
    /// Zero padding of `(height, width)` on each side.
    Explicit(usize, usize),
}

impl From<usize> for Padding {
    fn from(p: usize) -> Self {
        Padding::Explicit(p, p)
    }
}

impl From<(usize, usize)> for Padding {
    fn from(p: (usize, usize)) -> Self {
        Padding::Explicit(p.0, p.1)
    }
}

impl From<&str> for Padding {
    /// `"same"` or `"valid"`; anything else becomes `Padding::Explicit(usize::MAX, ..)`, which the
    /// model build rejects with an error naming the layer.
    fn from(s: &str) -> Self {
        match s.to_ascii_lowercase().as_str() {
            "same" => Padding::Same,
            "valid" => Padding::Valid,
            _ => Padding::Explicit(usize::MAX, usize::MAX),
        }
    }
}

/// One node of a model's graph.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Layer {
    /// The model's input; always node 0.
    Input,
    /// A 2-D convolution; see [`Conv2d`].
    Conv2d(Conv2d),
    /// Transposed convolution (`nn.ConvTranspose2d`); see [`ConvTranspose2d`].
    ConvTranspose2d(ConvTranspose2d),
    /// A fully connected layer; see [`Linear`].
    Linear(Linear),
    /// `[batch, ...] -> [batch, product]`.
    Flatten,
    /// `[batch, ...] -> [batch, shape...]`, same number of elements per sample.
    Reshape(Vec<usize>),
    /// An element-wise activation; see [`Activation`].
    Activation(Activation),
    /// Softmax along `axis` of the full tensor (batch is axis 0; negative counts from the end).
    Softmax {
        /// The axis normalised over (1 for `[batch, classes]`; -1 for the last).
        axis: isize,
    },
    /// Zeroes each element with probability `rate` in training and scales the rest by
    /// `1 / (1 - rate)`; the identity in evaluation.
    Dropout {
        /// Probability of zeroing a value, in `[0, 1)`.
        rate: f32,
    },
    /// Batch normalisation; see [`BatchNorm`].
    BatchNorm(BatchNorm),
    /// Group normalisation (`nn.GroupNorm`); see [`GroupNorm`].
    GroupNorm(GroupNorm),
    /// Max pooling over each window; see [`Pool2d`].
    MaxPool2d(Pool2d),
    /// Average pooling over each window; see [`Pool2d`].
    AvgPool2d(Pool2d),
    /// Mean over height and width: `[batch, C, H, W] -> [batch, C]`.
    GlobalAvgPool,
    /// Element-wise sum of two or more inputs of identical shape (residual join).
    Add,
    /// Concatenation along the channel (or feature) axis (Inception join).
    Concat,
}

impl Layer {
    /// The short type name used for automatic layer names and in summaries.
    pub fn type_name(&self) -> &'static str {
        self.with_kind(|k| k.type_name())
    }

    /// The PyTorch-style class name shown in summaries.
    pub fn display_type(&self) -> String {
        self.with_kind(|k| k.display_type())
    }

    /// Calls `f` with this layer's kind: the one place that matches on every variant (a new
    /// layer adds its arm here, and its spec types to `SPEC_TYPES`).
    pub(crate) fn with_kind<R>(&self, f: impl FnOnce(&dyn LayerKind) -> R) -> R {
        match self {
            Layer::Input => f(&Input),
            Layer::Conv2d(c) => f(c),
            Layer::ConvTranspose2d(c) => f(c),
            Layer::Linear(l) => f(l),
            Layer::Flatten => f(&view::Flatten),
            Layer::Reshape(dims) => f(&view::Reshape(dims)),
            Layer::Activation(a) => f(a),
            Layer::Softmax { axis } => f(&softmax::Softmax { axis: *axis }),
            Layer::Dropout { rate } => f(&dropout::Dropout { rate: *rate }),
            Layer::BatchNorm(bn) => f(bn),
            Layer::GroupNorm(gn) => f(gn),
            Layer::MaxPool2d(p) => f(&pool::Max(p)),
            Layer::AvgPool2d(p) => f(&pool::Avg(p)),
            Layer::GlobalAvgPool => f(&pool::GlobalAvg),
            Layer::Add => f(&join::Add),
            Layer::Concat => f(&join::Concat),
        }
    }
}

/// The spec-file types of every layer kind, in the order error messages list them (`residual`
/// and `concat` blocks are spec.rs's own).
pub(crate) const SPEC_TYPES: &[&[SpecType]] = &[
    conv2d::SPEC,
    conv_transpose2d::SPEC,
    linear::SPEC,
    view::SPEC,
    activation::SPEC,
    softmax::SPEC,
    dropout::SPEC,
    batch_norm::SPEC,
    group_norm::SPEC,
    pool::SPEC,
];

/// One layer kind's whole story, implemented in its home (`layers/<name>.rs`) and reached
/// through [`Layer::with_kind`]: `shape.rs`, `params.rs`, `summary.rs`, `lower.rs` and
/// `spec.rs` call these and know no layer by name.
pub(crate) trait LayerKind {
    /// The short type name: automatic layer names, summaries, spec files.
    fn type_name(&self) -> &'static str;
    /// The PyTorch-style class name shown in summaries.
    fn display_type(&self) -> String;
    /// Checks the size options against `MAX_OPTION` (shared by the builder and the loader).
    fn check_options(&self, _name: &str) -> Result<()> {
        Ok(())
    }
    /// The per-sample output shape for the per-sample input shapes; by default the layer takes
    /// exactly one input and [`LayerKind::infer`] says the rest.
    fn infer_inputs(&self, name: &str, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        match inputs {
            [x] => self.infer(name, x),
            _ => Err(Error::layer(name, format!("expects one input, got {}", inputs.len()))),
        }
    }
    /// The shape rule of a one-input layer, with every validation error naming the layer.
    fn infer(&self, name: &str, input: &[usize]) -> Result<Vec<usize>>;
    /// The parameters it owns for this input shape, in PyTorch's `state_dict` order.
    fn params(&self, _input: &[usize]) -> Vec<ParamDecl> {
        Vec::new()
    }
    /// Initial values of its parameter of `role`, when not PyTorch's default
    /// uniform(±1/√fan_in).
    fn init(&self, _role: ParamRole, _n: usize) -> Option<Vec<f32>> {
        None
    }
    /// Forward FLOPs per sample (a multiply-add counts as two), from the first input's shape,
    /// the output's values and the number of inputs.
    fn flops(&self, input: &[usize], out: u64, inputs: usize) -> u64;
    /// The summary's detail column (`None`: the inputs of a join are listed).
    fn detail(&self, _name: &str, _input: &[usize]) -> Option<String> {
        None
    }
    /// Whether the output is the input's buffer seen with another shape (and so is its
    /// gradient).
    fn is_view(&self) -> bool {
        false
    }
    /// Lowers the forward pass to ops.
    fn forward(&self, cx: &mut Forward<'_>) -> Result<()>;
    /// Lowers the backward pass to ops (called only when the output's gradient is needed).
    fn backward(&self, cx: &mut Backward<'_>) -> Result<()>;
    /// Writes its options into its spec-file table (`type` and `name` are written already).
    fn write_spec(&self, _t: &mut SpecTable) {}
}

/// The model's input node: placed by the compiler, no rule of its own.
struct Input;

impl LayerKind for Input {
    fn type_name(&self) -> &'static str {
        "input"
    }
    fn display_type(&self) -> String {
        "Input".into()
    }
    fn infer_inputs(&self, name: &str, _inputs: &[&[usize]]) -> Result<Vec<usize>> {
        Err(Error::layer(name, "an input layer can only be the first node"))
    }
    fn infer(&self, name: &str, input: &[usize]) -> Result<Vec<usize>> {
        self.infer_inputs(name, &[input])
    }
    fn flops(&self, _input: &[usize], _out: u64, _inputs: usize) -> u64 {
        0
    }
    fn forward(&self, _cx: &mut Forward<'_>) -> Result<()> {
        unreachable!("the compiler places the input")
    }
    fn backward(&self, _cx: &mut Backward<'_>) -> Result<()> {
        Ok(())
    }
}
