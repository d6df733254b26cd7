//! The op descriptors every backend executes: plain data (sizes, options, buffer ids), no layers,
//! no pointers, nothing device-specific. A plan is a `Vec<Op>`; the CPU backend runs it op by op
//! and the CUDA backend captures the same list as one CUDA graph.
//!
//! Conventions: tensors are contiguous row-major (NCHW for images). Gradients are written into a
//! [`GradOut`], which either overwrites its buffer or adds to it (when several consumers of one
//! tensor each contribute to its gradient, or when parameter gradients accumulate over batches).
//!
//! This file holds the buffer handles and the [`Op`] enum; the descriptors live by family in
//! `ops/` (`conv`, `linear`, `activation`, `norm`, `pool`, `tensor`, `loss`, `optim`), the
//! device-buffer layouts in `ops/layout.rs` and the read/write table of every op in
//! `ops/buffers.rs`. All of them are re-exported here, so paths stay `backend::ops::Name`.

use serde::{Deserialize, Serialize};

mod activation;
mod buffers;
mod conv;
mod conv_transpose;
mod layout;
mod linear;
mod loss;
mod norm;
mod optim;
mod pool;
mod tensor;

pub use activation::{Act, ActBackward, ActFn, Dropout, DropoutBackward, Softmax, SoftmaxBackward};
pub use buffers::{Access, BufUse};
pub use conv::{Conv2d, Conv2dBackward, ConvGeom};
pub use conv_transpose::{ConvTranspose2d, ConvTranspose2dBackward};
pub(crate) use layout::cuda_layouts;
pub use layout::{guard, hyper, stats};
pub use linear::{Linear, LinearBackward};
pub use loss::{Loss, LossFn, Scoring};
pub use norm::{BatchNormBackward, BatchNormInfer, BatchNormTrain, BnGeom, GnGeom, GroupNorm, GroupNormBackward};
pub use optim::{AllReduce, CheckFinite, ClipGradNorm, ClipGradValue, OptParam, OptRule, OptimizerStep};
pub use pool::{AvgPool, AvgPoolBackward, MaxPool, MaxPoolBackward, PoolGeom};
pub use tensor::{Add, Concat, ConcatBackward, Fill, GradInto};

/// A buffer of `f32` (or, on the CPU reference path, `f64`) values owned by a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BufId(pub usize);

/// A per-layer execution counter kept by the backend (on the GPU in device memory, so a replayed
/// graph advances it): it makes each dropout mask depend on the step without host involvement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CounterId(pub usize);

/// Where a gradient goes: overwrite `buf`, or add to what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GradOut {
    /// The gradient buffer.
    pub buf: BufId,
    /// Add to the buffer's values instead of overwriting them.
    pub accumulate: bool,
}

/// One kernel launch of a plan: each variant holds its op's descriptor.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// See [`Conv2d`].
    Conv2d(Conv2d),
    /// See [`Conv2dBackward`].
    Conv2dBackward(Conv2dBackward),
    /// See [`ConvTranspose2d`].
    ConvTranspose2d(ConvTranspose2d),
    /// See [`ConvTranspose2dBackward`].
    ConvTranspose2dBackward(ConvTranspose2dBackward),
    /// See [`Linear`].
    Linear(Linear),
    /// See [`LinearBackward`].
    LinearBackward(LinearBackward),
    /// See [`Act`].
    Act(Act),
    /// See [`ActBackward`].
    ActBackward(ActBackward),
    /// See [`Softmax`].
    Softmax(Softmax),
    /// See [`SoftmaxBackward`].
    SoftmaxBackward(SoftmaxBackward),
    /// See [`Dropout`].
    Dropout(Dropout),
    /// See [`DropoutBackward`].
    DropoutBackward(DropoutBackward),
    /// See [`BatchNormTrain`].
    BatchNormTrain(BatchNormTrain),
    /// See [`BatchNormInfer`].
    BatchNormInfer(BatchNormInfer),
    /// See [`BatchNormBackward`].
    BatchNormBackward(BatchNormBackward),
    /// See [`GroupNorm`].
    GroupNorm(GroupNorm),
    /// See [`GroupNormBackward`].
    GroupNormBackward(GroupNormBackward),
    /// See [`MaxPool`].
    MaxPool(MaxPool),
    /// See [`MaxPoolBackward`].
    MaxPoolBackward(MaxPoolBackward),
    /// See [`AvgPool`].
    AvgPool(AvgPool),
    /// See [`AvgPoolBackward`].
    AvgPoolBackward(AvgPoolBackward),
    /// See [`Add`].
    Add(Add),
    /// See [`Concat`].
    Concat(Concat),
    /// See [`ConcatBackward`].
    ConcatBackward(ConcatBackward),
    /// See [`GradInto`].
    GradInto(GradInto),
    /// See [`Fill`].
    Fill(Fill),
    /// See [`Loss`].
    Loss(Loss),
    /// See [`ClipGradNorm`].
    ClipGradNorm(ClipGradNorm),
    /// See [`ClipGradValue`].
    ClipGradValue(ClipGradValue),
    /// See [`AllReduce`].
    AllReduce(AllReduce),
    /// See [`CheckFinite`].
    CheckFinite(CheckFinite),
    /// See [`OptimizerStep`].
    OptimizerStep(OptimizerStep),
}

impl Op {
    /// A short name for logs and profiles.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Conv2d(_) => "conv2d",
            Op::Conv2dBackward(_) => "conv2d_backward",
            Op::ConvTranspose2d(_) => "conv_transpose2d",
            Op::ConvTranspose2dBackward(_) => "conv_transpose2d_backward",
            Op::Linear(_) => "linear",
            Op::LinearBackward(_) => "linear_backward",
            Op::Act(_) => "activation",
            Op::ActBackward(_) => "activation_backward",
            Op::Softmax(_) => "softmax",
            Op::SoftmaxBackward(_) => "softmax_backward",
            Op::Dropout(_) => "dropout",
            Op::DropoutBackward(_) => "dropout_backward",
            Op::BatchNormTrain(_) => "batch_norm_train",
            Op::BatchNormInfer(_) => "batch_norm_infer",
            Op::BatchNormBackward(_) => "batch_norm_backward",
            Op::GroupNorm(_) => "group_norm",
            Op::GroupNormBackward(_) => "group_norm_backward",
            Op::MaxPool(_) => "max_pool",
            Op::MaxPoolBackward(_) => "max_pool_backward",
            Op::AvgPool(_) => "avg_pool",
            Op::AvgPoolBackward(_) => "avg_pool_backward",
            Op::Add(_) => "add",
            Op::Concat(_) => "concat",
            Op::ConcatBackward(_) => "concat_backward",
            Op::GradInto(_) => "grad_into",
            Op::Fill(_) => "fill",
            Op::Loss(_) => "loss",
            Op::ClipGradNorm(_) => "clip_grad_norm",
            Op::ClipGradValue(_) => "clip_grad_value",
            Op::AllReduce(_) => "all_reduce",
            Op::CheckFinite(_) => "check_finite",
            Op::OptimizerStep(_) => "optimizer_step",
        }
    }
}
