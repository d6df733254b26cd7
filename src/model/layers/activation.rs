//! Element-wise activations, whole: the functions (PyTorch's definitions), their names, shape
//! rule, FLOPs and lowering to ops. Their kernels are `backend/cpu/activation.rs` and
//! `backend/cuda/activation.rs`.

use serde::{Deserialize, Serialize};

use super::LayerKind;
use crate::model::Layer;
use crate::model::spec::{SpecTable, SpecType};

use crate::backend::{ActFn, Op, ops};
use crate::model::ModelBuilder;
use crate::model::lower::{Backward, Forward};
use crate::{Error, Result};

/// Element-wise activation functions, with PyTorch's definitions.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// `x` for `x > 0`, else `slope * x` (PyTorch's default slope is 0.01).
    LeakyRelu {
        /// The slope for negative inputs (finite).
        slope: f32,
    },
    /// `x` for `x > 0`, else `alpha * (exp(x) - 1)`.
    Elu {
        /// The value approached for very negative inputs is `-alpha` (finite; PyTorch's
        /// default 1).
        alpha: f32,
    },
    /// `1 / (1 + exp(-x))`.
    Sigmoid,
    /// The hyperbolic tangent.
    Tanh,
    /// `x * sigmoid(x)`, also called swish.
    Silu,
    /// `x * Phi(x)` with the exact normal CDF (PyTorch's default, not the tanh approximation).
    Gelu,
}

impl Activation {
    /// The lower-case name used in summaries, automatic layer names and model files
    /// (`"leaky_relu"`).
    pub fn name(&self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::LeakyRelu { .. } => "leaky_relu",
            Activation::Elu { .. } => "elu",
            Activation::Sigmoid => "sigmoid",
            Activation::Tanh => "tanh",
            Activation::Silu => "silu",
            Activation::Gelu => "gelu",
        }
    }

    /// The PyTorch class name shown in summaries.
    pub(crate) fn display_type(&self) -> String {
        match self {
            Activation::Relu => "ReLU".into(),
            Activation::LeakyRelu { slope } => format!("LeakyReLU({slope})"),
            Activation::Elu { alpha } => format!("ELU({alpha})"),
            Activation::Sigmoid => "Sigmoid".into(),
            Activation::Tanh => "Tanh".into(),
            Activation::Silu => "SiLU".into(),
            Activation::Gelu => "GELU".into(),
        }
    }
}

fn act_fn(a: &Activation) -> ActFn {
    match *a {
        Activation::Relu => ActFn::Relu,
        Activation::LeakyRelu { slope } => ActFn::LeakyRelu(slope),
        Activation::Elu { alpha } => ActFn::Elu(alpha),
        Activation::Sigmoid => ActFn::Sigmoid,
        Activation::Tanh => ActFn::Tanh,
        Activation::Silu => ActFn::Silu,
        Activation::Gelu => ActFn::Gelu,
    }
}

/// Its spec-file types, one per function (`swish` is `silu`'s other name).
pub(crate) const SPEC: &[SpecType] = &[
    SpecType { name: "relu", fields: &[], read: |_| Ok(Layer::Activation(Activation::Relu)) },
    SpecType {
        name: "leaky_relu",
        fields: &["slope"],
        read: |f| Ok(Layer::Activation(Activation::LeakyRelu { slope: f.float_or("slope", 0.01)? })),
    },
    SpecType {
        name: "elu",
        fields: &["alpha"],
        read: |f| Ok(Layer::Activation(Activation::Elu { alpha: f.float_or("alpha", 1.0)? })),
    },
    SpecType { name: "sigmoid", fields: &[], read: |_| Ok(Layer::Activation(Activation::Sigmoid)) },
    SpecType { name: "tanh", fields: &[], read: |_| Ok(Layer::Activation(Activation::Tanh)) },
    SpecType { name: "silu", fields: &[], read: |_| Ok(Layer::Activation(Activation::Silu)) },
    SpecType { name: "swish", fields: &[], read: |_| Ok(Layer::Activation(Activation::Silu)) },
    SpecType { name: "gelu", fields: &[], read: |_| Ok(Layer::Activation(Activation::Gelu)) },
];

/// The builder methods of this home's layers.
impl ModelBuilder {
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
}

impl LayerKind for Activation {
    fn type_name(&self) -> &'static str {
        self.name()
    }
    fn display_type(&self) -> String {
        Activation::display_type(self)
    }
    /// Shape rule: the input's shape, for a function whose constant is finite.
    fn infer(&self, name: &str, input: &[usize]) -> Result<Vec<usize>> {
        match *self {
            Activation::LeakyRelu { slope } if !slope.is_finite() => {
                Err(Error::layer(name, format!("leaky_relu slope must be finite, got {slope}")))
            }
            Activation::Elu { alpha } if !alpha.is_finite() => {
                Err(Error::layer(name, format!("elu alpha must be finite, got {alpha}")))
            }
            _ => Ok(input.to_vec()),
        }
    }
    fn flops(&self, _input: &[usize], out: u64, _inputs: usize) -> u64 {
        out
    }
    /// Lowering of the forward pass: one [`Op::Act`].
    fn forward(&self, cx: &mut Forward<'_>) -> Result<()> {
        let (x, y) = (cx.input(0), cx.output());
        cx.push(Op::Act(ops::Act { f: act_fn(self), len: cx.numel(), x, y }));
        Ok(())
    }
    /// Lowering of the backward pass: one [`Op::ActBackward`] (it reads the input and the
    /// output). ReLU, sigmoid and tanh have derivatives that are functions of the output alone
    /// (`y <= 0` exactly where `x <= 0`, NaN included; `y (1 - y)`; `1 - y^2`), so their op names
    /// the output as the input too: the input is then not kept for backward and its buffer can
    /// be shared (a batch norm's or a residual sum's output feeding a ReLU; see
    /// `exec/compile.rs`).
    fn backward(&self, cx: &mut Backward<'_>) -> Result<()> {
        if let Some(dx) = cx.dx(0) {
            let (y, dy) = (cx.output(), cx.dy());
            let x = match self {
                Activation::Relu | Activation::Sigmoid | Activation::Tanh => y,
                _ => cx.input(0),
            };
            cx.push(Op::ActBackward(ops::ActBackward { f: act_fn(self), len: cx.numel(), x, y, dy, dx }));
        }
        Ok(())
    }
    fn write_spec(&self, t: &mut SpecTable) {
        match *self {
            Activation::LeakyRelu { slope } => t.float("slope", slope),
            Activation::Elu { alpha } => t.float("alpha", alpha),
            Activation::Relu | Activation::Sigmoid | Activation::Tanh | Activation::Silu | Activation::Gelu => {}
        }
    }
}
