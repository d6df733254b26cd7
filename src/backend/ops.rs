//! The op descriptors every backend executes: plain data (sizes, options, buffer ids), no layers,
//! no pointers, nothing device-specific. A plan is a `Vec<Op>`; the CPU backend runs it op by op
//! and the CUDA backend captures the same list as one CUDA graph.
//!
//! Conventions: tensors are contiguous row-major (NCHW for images). Gradients are written into a
//! [`GradOut`], which either overwrites its buffer or adds to it (when several consumers of one
//! tensor each contribute to its gradient, or when parameter gradients accumulate over batches).
//!
//! This file holds the buffer handles and the op registry; the descriptors live by family in
//! `ops/` (`conv`, `linear`, `activation`, `norm`, `pool`, `tensor`, `loss`, `optim`, `cast`,
//! `loss_scale`), the device-buffer layouts in `ops/layout.rs`, and the validation built on every
//! op's buffer table in `ops/buffers.rs`. All of them are re-exported here, so paths stay `backend::ops::Name`.
//!
//! # The registry: adding an op
//!
//! An op is one descriptor struct and one line in `for_each_op!`. The struct (in
//! `ops/<family>.rs`) implements [`OpDesc`]: its name, its buffer table (written once with
//! `buffer_table!`, which makes both the `&` and the `&mut` visitor) and a shape summary. The
//! list line generates the [`Op`] variant and every `match` over ops: [`Op::name`],
//! [`Op::each_buffer`], [`Op::visit_bufs`], [`Op::shapes`], [`Op::validate`] and the dispatch to
//! a backend (`Op::run_on`).
//!
//! A backend executes an op by implementing `RunOp<Descriptor>` for itself, next to
//! the op's kernels (`cpu/conv2d.rs` has `impl RunOp<ops::Conv2d> for CpuBackend<T>`,
//! `cuda/conv2d.rs` has `impl RunOp<ops::Conv2d> for CudaBackend`). Its `run` then calls
//! `op.run_on(self)`, which compiles only when the backend implements `RunOp` for every op in
//! the list: a new op that one backend lacks is a compile error naming both, never a missing
//! `match` arm found at run time. A new backend follows the same two steps (one `RunOp` impl per
//! op in its op files, one `op.run_on(self)` call).

use serde::{Deserialize, Serialize};

use crate::Result;

/// Writes an op's buffer table once, as both [`OpDesc::each_buf`] and [`OpDesc::each_buf_mut`].
/// Used inside `impl OpDesc for Descriptor`: `buffer_table!(|o, f| { ... })` where `o` is the
/// descriptor, `f(buf, len, access)` reports one buffer and `r!(o.field)` borrows a field as
/// `&` in the first method and as `&mut` in the second. `R`, `W`, `RW` are the [`Usage`]s of
/// buffers of the computing dtype, `R_U32` of class labels read as `u32`, and
/// `grad_access(accumulate)` the usage of a [`GradOut`].
macro_rules! buffer_table {
    (|$o:ident, $f:ident| $body:block) => {
        buffer_table!(@with |$o, $f| $body $);
    };
    (@with |$o:ident, $f:ident| $body:block $d:tt) => {
        fn each_buf(&self, $f: &mut impl FnMut(&$crate::backend::ops::BufId, usize, $crate::backend::ops::Usage)) {
            #[allow(unused_imports)]
            use $crate::backend::ops::usage::{R, R_U32, RW, W, grad_access};
            #[allow(unused_macros)]
            macro_rules! r {
                ($d e:expr) => {
                    &$d e
                };
            }
            let $o = self;
            $body
        }

        fn each_buf_mut(
            &mut self,
            $f: &mut impl FnMut(&mut $crate::backend::ops::BufId, usize, $crate::backend::ops::Usage),
        ) {
            #[allow(unused_imports)]
            use $crate::backend::ops::usage::{R, R_U32, RW, W, grad_access};
            #[allow(unused_macros)]
            macro_rules! r {
                ($d e:expr) => {
                    &mut $d e
                };
            }
            let $o = self;
            $body
        }
    };
}

mod activation;
mod buffers;
mod cast;
mod conv;
mod conv_transpose;
mod layout;
mod linear;
mod loss;
mod loss_scale;
mod norm;
mod optim;
mod pool;
mod tensor;

pub use activation::{Act, ActBackward, ActFn, Dropout, DropoutBackward, Softmax, SoftmaxBackward};
pub(crate) use buffers::usage;
pub use buffers::{Access, BufUse, Usage};
pub use cast::{Cast, CastBias, CastPermute};
pub use conv::{Conv2d, Conv2dBackward, ConvGeom, MemoryFormat};
pub use conv_transpose::{ConvTranspose2d, ConvTranspose2dBackward};
pub(crate) use layout::cuda_layouts;
pub use layout::{guard, hyper, scaler, stats};
pub use linear::{Linear, LinearBackward};
pub use loss::{Loss, LossFn, Scoring};
pub use loss_scale::{ScaleLoss, UnscaleGrads};
pub use norm::{
    BatchNormBackward, BatchNormInfer, BatchNormTrain, BnGeom, FusedAct, GnGeom, GroupNorm, GroupNormBackward,
};
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

/// What an op descriptor says about itself: the seam's view of one op, implemented in the op's
/// family file (`ops/<family>.rs`). See the module docs for how an op is added.
pub trait OpDesc {
    /// A short name for logs and profiles (`conv2d`, `batch_norm_backward`).
    const NAME: &'static str;

    /// Calls `f(buffer, values touched from its start, usage)` for every buffer the op names
    /// (inputs, outputs, saved tensors, gradients, state), in a fixed order. Written with
    /// `buffer_table!`, which also makes [`each_buf_mut`](OpDesc::each_buf_mut).
    fn each_buf(&self, f: &mut impl FnMut(&BufId, usize, Usage));

    /// The same table as [`each_buf`](OpDesc::each_buf), with the ids mutable (the planner
    /// renames virtual buffers to real ones through it).
    fn each_buf_mut(&mut self, f: &mut impl FnMut(&mut BufId, usize, Usage));

    /// A short description of the op's shapes, for debug logs.
    fn shapes(&self) -> String;

    /// Checks what the buffer table cannot: that the op is consistent in itself. Most ops have
    /// nothing to check.
    fn check(&self) -> Result<()> {
        Ok(())
    }
}

/// A backend that executes ops of descriptor `O`: implemented once per op and backend, next to
/// the op's kernels (`cpu/<op>.rs`, `cuda/<op>.rs`). [`Op::run_on`] dispatches to it.
pub(crate) trait RunOp<O> {
    /// Executes (on a GPU: queues) the op. Its buffers have been validated ([`Op::validate`]).
    fn run_op(&mut self, op: &O) -> Result<()>;
}

/// The op list: calls the macro `$callback!` with the name of every op descriptor, each of
/// which is also its [`Op`] variant. **Adding an op adds one line here** (see the module docs).
macro_rules! for_each_op {
    ($callback:ident) => {
        $callback! {
            Conv2d,
            Conv2dBackward,
            ConvTranspose2d,
            ConvTranspose2dBackward,
            Linear,
            LinearBackward,
            Act,
            ActBackward,
            Softmax,
            SoftmaxBackward,
            Dropout,
            DropoutBackward,
            BatchNormTrain,
            BatchNormInfer,
            BatchNormBackward,
            GroupNorm,
            GroupNormBackward,
            MaxPool,
            MaxPoolBackward,
            AvgPool,
            AvgPoolBackward,
            Add,
            Concat,
            ConcatBackward,
            GradInto,
            Fill,
            Loss,
            ClipGradNorm,
            ClipGradValue,
            AllReduce,
            CheckFinite,
            OptimizerStep,
            Cast,
            ScaleLoss,
            UnscaleGrads,
        }
    };
}

/// Makes, from the op list, the [`Op`] enum and every `match` over it.
macro_rules! define_ops {
    ($($name:ident),* $(,)?) => {
        /// One kernel launch of a plan: each variant holds its op's descriptor.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Op {
            $(
                #[doc = concat!("See [`", stringify!($name), "`].")]
                $name($name),
            )*
        }

        $(
            impl From<$name> for Op {
                fn from(o: $name) -> Op {
                    Op::$name(o)
                }
            }
        )*

        /// A backend that implements [`RunOp`] for every op of the list (every backend must).
        pub(crate) trait RunsEveryOp: $(RunOp<$name> +)* {}
        impl<B: $(RunOp<$name> +)*> RunsEveryOp for B {}

        impl Op {
            /// A short name for logs and profiles.
            pub fn name(&self) -> &'static str {
                match self {
                    $(Op::$name(_) => <$name as OpDesc>::NAME,)*
                }
            }

            /// A short description of the op's shapes, for debug logs.
            pub fn shapes(&self) -> String {
                match self {
                    $(Op::$name(o) => o.shapes(),)*
                }
            }

            /// Calls `f(buffer, len, usage)` on every buffer the op names ([`OpDesc::each_buf`]).
            pub(crate) fn each_buf(&self, f: &mut impl FnMut(&BufId, usize, Usage)) {
                match self {
                    $(Op::$name(o) => o.each_buf(f),)*
                }
            }

            /// Calls `f(buffer, len, usage)` with mutable ids ([`OpDesc::each_buf_mut`]).
            pub(crate) fn each_buf_mut(&mut self, f: &mut impl FnMut(&mut BufId, usize, Usage)) {
                match self {
                    $(Op::$name(o) => o.each_buf_mut(f),)*
                }
            }

            /// The op's own consistency check ([`OpDesc::check`]).
            pub(crate) fn check(&self) -> Result<()> {
                match self {
                    $(Op::$name(o) => o.check(),)*
                }
            }

            /// Executes the op on a backend through its [`RunOp`] impl for the op's descriptor.
            pub(crate) fn run_on<B: RunsEveryOp>(&self, backend: &mut B) -> Result<()> {
                match self {
                    $(Op::$name(o) => RunOp::<$name>::run_op(backend, o),)*
                }
            }
        }
    };
}

for_each_op!(define_ops);

#[cfg(test)]
mod tests {
    use super::*;

    /// Every op has its own name (logs and profiles tell ops apart by it).
    #[test]
    fn op_names_are_distinct() {
        macro_rules! names {
            ($($name:ident),* $(,)?) => {
                [$(<$name as OpDesc>::NAME),*]
            };
        }
        let mut names = for_each_op!(names).to_vec();
        names.sort();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "two ops share a name");
        assert!(n >= 32);
    }
}
