//! Lowering one layer to ops: the narrow boundary between the compiler and the layers.
//!
//! The compiler (`crate::exec`) walks the model's graph, owns every buffer and decides
//! lifetimes; a layer only says which ops compute it. It sees a [`Forward`] context (its input
//! buffers, its parameters, `output()` to get its activation buffer, `save()` for what backward
//! needs, `push()` for an op) and, in training, a [`Backward`] context (the same buffers plus
//! `dy()`, `saved(k)`, `dx(k)` and `param_grad(role)`). Nothing here allocates device memory:
//! buffers are virtual until the whole plan is known (the compiler allocates them once).
//!
//! [`forward`] and [`backward`] dispatch through the layer's kind (`Layer::with_kind`) to its
//! home in `model/layers/`, which holds its whole lowering. This file uses only the op descriptors of [`crate::backend::ops`], so `model` does
//! not depend on the compiler (which depends on `model`).

use std::collections::HashSet;

use super::{Layer, Node, ParamRole};
use crate::Result;
use crate::backend::{BufId, CounterId, DType, GradOut, Op};

/// Training (batch statistics, dropout on, backward planned) or evaluation (forward only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Batch statistics in batch norm (running statistics updated), dropout on.
    Train,
    /// Running statistics in batch norm, dropout off, no backward.
    Eval,
}

/// Where the compiler keeps the plan's virtual buffers; a context asks it for new ones.
pub trait Buffers {
    /// A new virtual buffer of `len` elements of `dtype` for a layer's output.
    fn activation(&mut self, len: usize, dtype: DType, label: String) -> BufId;
    /// A new virtual buffer of `len` elements of `dtype` that forward fills for backward.
    fn saved(&mut self, len: usize, dtype: DType, label: String) -> BufId;
}

/// What a layer's forward lowering sees.
pub struct Forward<'a> {
    /// The layer's node (name, kind, per-sample output shape).
    pub node: &'a Node,
    /// Per-sample shapes of the inputs, in the node's input order.
    pub in_shapes: Vec<&'a [usize]>,
    /// Samples in the batch.
    pub batch: usize,
    /// Training or evaluation.
    pub mode: Mode,
    /// Whether batch norm reduces its statistics over the data-parallel group.
    pub sync_batch_norm: bool,
    /// Whether batch norm in training updates its running statistics.
    pub update_running_stats: bool,
    /// Seed and counter of this node's dropout mask stream (dropout layers only).
    pub dropout: Option<(u64, CounterId)>,
    /// This is a recomputation in backward of a checkpointed segment (`ModelBuilder::checkpoint`):
    /// the layer must compute exactly what its forward computed and change no state (dropout
    /// draws the forward's mask again without advancing its counter; batch norm leaves its
    /// running statistics alone, `update_running_stats` is off).
    pub recompute: bool,
    pub(crate) inputs: Vec<BufId>,
    pub(crate) params: Vec<(ParamRole, BufId)>,
    pub(crate) bufs: &'a mut dyn Buffers,
    pub(crate) ops: &'a mut Vec<Op>,
    pub(crate) output: Option<BufId>,
    pub(crate) saved: Vec<BufId>,
}

impl Forward<'_> {
    /// The buffer of input `k`.
    pub fn input(&self, k: usize) -> BufId {
        self.inputs[k]
    }
    /// The buffers of all inputs.
    pub fn inputs(&self) -> &[BufId] {
        &self.inputs
    }
    /// Elements of the layer's output over the whole batch.
    pub fn numel(&self) -> usize {
        self.batch * self.node.shape.iter().product::<usize>()
    }
    /// The layer's output buffer (an activation), made on first use.
    pub fn output(&mut self) -> BufId {
        if let Some(y) = self.output {
            return y;
        }
        let y = self.bufs.activation(self.numel(), DType::F32, self.node.name.clone());
        self.output = Some(y);
        y
    }
    /// The output is input 0's buffer (a view, or dropout in evaluation).
    pub fn alias_input(&mut self) {
        self.output = Some(self.inputs[0]);
    }
    /// A buffer that forward fills and backward reads ([`Backward::saved`], in this order).
    pub fn save(&mut self, len: usize, what: &str) -> BufId {
        let b = self.bufs.saved(len, DType::F32, format!("{}.{what}", self.node.name));
        self.saved.push(b);
        b
    }
    /// The value buffer of the layer's parameter of `role`, if it has one.
    pub fn param(&self, role: ParamRole) -> Option<BufId> {
        self.params.iter().find(|p| p.0 == role).map(|p| p.1)
    }
    /// Appends an op to the plan.
    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }
}

/// What a layer's backward lowering sees.
pub struct Backward<'a> {
    /// The layer's node.
    pub node: &'a Node,
    /// Per-sample shapes of the inputs.
    pub in_shapes: Vec<&'a [usize]>,
    /// Samples in the batch.
    pub batch: usize,
    /// Whether batch norm reduces its statistics over the data-parallel group.
    pub sync_batch_norm: bool,
    pub(crate) inputs: Vec<BufId>,
    pub(crate) output: BufId,
    pub(crate) dy: BufId,
    pub(crate) saved: &'a [BufId],
    pub(crate) input_grads: Vec<Option<BufId>>,
    pub(crate) written: &'a mut HashSet<BufId>,
    pub(crate) params: Vec<(ParamRole, BufId, Option<BufId>)>,
    pub(crate) accumulate_param_grads: bool,
    pub(crate) ops: &'a mut Vec<Op>,
}

impl Backward<'_> {
    /// The buffer of input `k` (its forward value).
    pub fn input(&self, k: usize) -> BufId {
        self.inputs[k]
    }
    /// The layer's forward output.
    pub fn output(&self) -> BufId {
        self.output
    }
    /// The gradient of the layer's output.
    pub fn dy(&self) -> BufId {
        self.dy
    }
    /// Elements of the layer's output over the whole batch.
    pub fn numel(&self) -> usize {
        self.batch * self.node.shape.iter().product::<usize>()
    }
    /// The `k`-th buffer forward saved.
    pub fn saved(&self, k: usize) -> BufId {
        self.saved[k]
    }
    /// Where to put the gradient of input `k` (`None` when nothing needs it). Call it once per
    /// op that writes it: the first writer of a tensor's gradient overwrites, later writers (the
    /// other consumers of a fork) accumulate.
    pub fn dx(&mut self, k: usize) -> Option<GradOut> {
        let g = self.input_grads[k]?;
        let accumulate = !self.written.insert(g);
        Some(GradOut { buf: g, accumulate })
    }
    /// The value buffer of the layer's parameter of `role`.
    pub fn param(&self, role: ParamRole) -> Option<BufId> {
        self.params.iter().find(|p| p.0 == role).map(|p| p.1)
    }
    /// Where to put the gradient of the parameter of `role` (trainable parameters only).
    pub fn param_grad(&self, role: ParamRole) -> Option<GradOut> {
        let g = self.params.iter().find(|p| p.0 == role).and_then(|p| p.2)?;
        Some(GradOut { buf: g, accumulate: self.accumulate_param_grads })
    }
    /// Appends an op to the plan.
    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }
}

/// Whether a layer's output is its input's buffer seen with another shape (and so is its
/// gradient).
pub fn is_view(layer: &Layer) -> bool {
    layer.with_kind(|k| k.is_view())
}

/// Lowers one layer's forward pass: the layer's home in `model/layers/` says how.
pub fn forward(cx: &mut Forward) -> Result<()> {
    let node = cx.node;
    node.layer.with_kind(|k| k.forward(cx))
}

/// Lowers one layer's backward pass (called in reverse order, only for layers whose output
/// gradient is needed).
pub fn backward(cx: &mut Backward) -> Result<()> {
    let node = cx.node;
    node.layer.with_kind(|k| k.backward(cx))
}
