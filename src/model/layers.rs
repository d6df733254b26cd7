//! The layer kinds a model is made of: the [`Layer`] enum here, and one home per kind in
//! `layers/` holding its whole story: options, shape rule (`infer`), parameters (`params`,
//! `init`), FLOPs, and lowering to ops (`forward`, `backward`). `shape.rs`, `params.rs`,
//! `summary.rs` and `lower.rs` only dispatch to them; a new layer is a variant here, a file
//! there and one arm in each dispatch (the exhaustive matches of `shape.rs`, `lower.rs` and
//! `summary.rs` point at them).
//!
//! Each option struct is a small builder (`Conv2d::new(32, 3).stride(2).padding(1)`) handed to the
//! matching `ModelBuilder::*_with` method; the short methods (`conv2d(32, 3)`) use the defaults,
//! which are PyTorch's.

use serde::{Deserialize, Serialize};

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
pub use activation::Activation;
pub use batch_norm::BatchNorm;
pub use conv_transpose2d::ConvTranspose2d;
pub use conv2d::Conv2d;
pub use group_norm::GroupNorm;
pub use linear::Linear;
pub use pool::Pool2d;

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
        match self {
            Layer::Input => "input",
            Layer::Conv2d(_) => "conv2d",
            Layer::ConvTranspose2d(_) => "conv_transpose2d",
            Layer::Linear(_) => "dense",
            Layer::Flatten => "flatten",
            Layer::Reshape(_) => "reshape",
            Layer::Activation(a) => a.name(),
            Layer::Softmax { .. } => "softmax",
            Layer::Dropout { .. } => "dropout",
            Layer::BatchNorm(_) => "batch_norm",
            Layer::GroupNorm(_) => "group_norm",
            Layer::MaxPool2d(_) => "max_pool2d",
            Layer::AvgPool2d(_) => "avg_pool2d",
            Layer::GlobalAvgPool => "global_avg_pool",
            Layer::Add => "add",
            Layer::Concat => "concat",
        }
    }

    /// The PyTorch-style class name shown in summaries.
    pub fn display_type(&self) -> String {
        match self {
            Layer::Input => "Input".into(),
            Layer::Conv2d(_) => "Conv2d".into(),
            Layer::ConvTranspose2d(_) => "ConvTranspose2d".into(),
            Layer::Linear(_) => "Linear".into(),
            Layer::Flatten => "Flatten".into(),
            Layer::Reshape(_) => "Reshape".into(),
            Layer::Activation(a) => a.display_type(),
            Layer::Softmax { axis } => format!("Softmax({axis})"),
            Layer::Dropout { rate } => format!("Dropout({rate})"),
            Layer::BatchNorm(_) => "BatchNorm".into(),
            Layer::GroupNorm(g) => format!("GroupNorm({})", g.groups),
            Layer::MaxPool2d(_) => "MaxPool2d".into(),
            Layer::AvgPool2d(_) => "AvgPool2d".into(),
            Layer::GlobalAvgPool => "GlobalAvgPool".into(),
            Layer::Add => "Add".into(),
            Layer::Concat => "Concat".into(),
        }
    }
}
