//! Linear (dense), whole: options, shape rule, parameters (PyTorch's `nn.Linear` names and
//! layout), FLOPs and lowering to ops. Its kernels are `backend/cpu/linear.rs` and
//! `backend/cuda/linear.rs` (cuBLASLt).

use serde::{Deserialize, Serialize};

use super::LayerKind;
use crate::model::Layer;
use crate::model::spec::{Fields, SpecTable, SpecType};

use crate::Result;
use crate::backend::{Op, ops};
use crate::model::ModelBuilder;
use crate::model::ParamRole;
use crate::model::lower::{Backward, Forward};
use crate::model::params::ParamDecl;
use crate::model::shape::{bounded, positive};

/// A fully connected layer; flattens its input to `[batch, features]` itself.
///
/// Weight `[out, in]`, bias `[out]`, initialised as PyTorch's `nn.Linear`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Linear {
    /// Output features; at least 1.
    pub out_features: usize,
    /// Whether the layer adds a learned bias per output feature (default true).
    pub bias: bool,
}

impl Linear {
    /// `out_features` outputs, with bias.
    pub fn new(out_features: usize) -> Self {
        Linear { out_features, bias: true }
    }
    /// With (`true`, the default) or without a bias.
    pub fn bias(mut self, b: bool) -> Self {
        self.bias = b;
        self
    }
}

fn read_spec(f: &mut Fields<'_, '_>) -> Result<Layer> {
    Ok(Layer::Linear(Linear { out_features: f.size("out_features", 1)?, bias: f.bool_or("bias", true)? }))
}

/// Its spec-file types (`dense` and its PyTorch name `linear`).
pub(crate) const SPEC: &[SpecType] = &[
    SpecType { name: "dense", fields: &["out_features", "bias"], read: read_spec },
    SpecType { name: "linear", fields: &["out_features", "bias"], read: read_spec },
];

/// The builder methods of this home's layers.
impl ModelBuilder {
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
}

impl LayerKind for Linear {
    fn type_name(&self) -> &'static str {
        "dense"
    }
    fn display_type(&self) -> String {
        "Linear".into()
    }
    /// The size option against `MAX_OPTION`.
    fn check_options(&self, name: &str) -> Result<()> {
        bounded(name, "out_features", &[self.out_features])
    }
    /// Shape rule: any input (flattened per sample) `-> [out_features]`.
    fn infer(&self, name: &str, _input: &[usize]) -> Result<Vec<usize>> {
        positive(name, "out_features", self.out_features)?;
        Ok(vec![self.out_features])
    }
    /// Weight `[out, in]` and, with `bias`, bias `[out]`, drawn with fan-in `in`.
    fn params(&self, input: &[usize]) -> Vec<ParamDecl> {
        let fan_in: usize = input.iter().product();
        let mut v = vec![ParamDecl::trained("weight", ParamRole::Weight, vec![self.out_features, fan_in], fan_in)];
        if self.bias {
            v.push(ParamDecl::trained("bias", ParamRole::Bias, vec![self.out_features], fan_in));
        }
        v
    }
    /// Forward FLOPs per sample: a multiply-add per output and input, plus the bias.
    fn flops(&self, input: &[usize], out: u64, _inputs: usize) -> u64 {
        let fan_in = input.iter().product::<usize>() as u64;
        out * 2 * fan_in + if self.bias { out } else { 0 }
    }
    /// Lowering of the forward pass: one [`Op::Linear`].
    fn forward(&self, cx: &mut Forward<'_>) -> Result<()> {
        let k = cx.in_shapes[0].iter().product();
        let (x, y) = (cx.input(0), cx.output());
        let w = cx.param(ParamRole::Weight).expect("linear weight");
        let b = if self.bias { cx.param(ParamRole::Bias) } else { None };
        cx.push(Op::Linear(ops::Linear { m: cx.batch, k, n: self.out_features, x, w, b, y }));
        Ok(())
    }
    /// Lowering of the backward pass: one [`Op::LinearBackward`].
    fn backward(&self, cx: &mut Backward<'_>) -> Result<()> {
        let k = cx.in_shapes[0].iter().product();
        let (x, dy) = (cx.input(0), cx.dy());
        let w = cx.param(ParamRole::Weight).expect("linear weight");
        let dx = cx.dx(0);
        let dw = cx.param_grad(ParamRole::Weight).expect("linear weight gradient");
        let db = cx.param_grad(ParamRole::Bias);
        cx.push(Op::LinearBackward(ops::LinearBackward { m: cx.batch, k, n: self.out_features, x, w, dy, dx, dw, db }));
        Ok(())
    }
    fn write_spec(&self, t: &mut SpecTable) {
        t.int("out_features", self.out_features);
        t.bool("bias", self.bias);
    }
}
