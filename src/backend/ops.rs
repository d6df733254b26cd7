//! The op descriptors every backend executes: plain data (sizes, options, buffer ids), no layers,
//! no pointers, nothing device-specific. A plan is a `Vec<Op>`; the CPU backend runs it op by op
//! and the CUDA backend captures the same list as one CUDA graph.
//!
//! Conventions: tensors are contiguous row-major (NCHW for images). Gradients are written into a
//! [`GradOut`], which either overwrites its buffer or adds to it (when several consumers of one
//! tensor each contribute to its gradient, or when parameter gradients accumulate over batches).

use serde::{Deserialize, Serialize};

mod buffers;

pub use buffers::{Access, BufUse};

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
    pub buf: BufId,
    pub accumulate: bool,
}

/// Geometry of a 2-D convolution over an NCHW batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    /// Batch size.
    pub n: usize,
    /// Input channels, height, width.
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// Output channels.
    pub k: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub ph: usize,
    pub pw: usize,
    pub dh: usize,
    pub dw: usize,
    pub groups: usize,
    pub oh: usize,
    pub ow: usize,
}

impl ConvGeom {
    pub fn input_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    pub fn output_len(&self) -> usize {
        self.n * self.k * self.oh * self.ow
    }
    pub fn weight_len(&self) -> usize {
        self.k * (self.c / self.groups) * self.kh * self.kw
    }
    /// A 1x1, stride-1, unpadded convolution: a plain matrix product per image.
    pub fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.sh == 1 && self.sw == 1 && self.ph == 0 && self.pw == 0
    }
}

/// Geometry of a 2-D pooling window over an NCHW batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeom {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub ph: usize,
    pub pw: usize,
    pub oh: usize,
    pub ow: usize,
}

impl PoolGeom {
    pub fn input_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    pub fn output_len(&self) -> usize {
        self.n * self.c * self.oh * self.ow
    }
}

/// Element-wise activation functions (PyTorch's definitions).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ActFn {
    Relu,
    LeakyRelu(f32),
    Elu(f32),
    Sigmoid,
    Tanh,
    Silu,
    Gelu,
}

/// Batch-norm shape: `n` samples, `c` channels, `hw` values per channel per sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BnGeom {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
    pub eps: f32,
}

/// Group-norm shape: `n` samples, `c` channels in `groups` groups of `c / groups` consecutive
/// channels, `hw` values per channel per sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GnGeom {
    /// Samples.
    pub n: usize,
    /// Channels (a multiple of `groups`).
    pub c: usize,
    /// Values per channel per sample.
    pub hw: usize,
    /// Groups.
    pub groups: usize,
    /// Added to the variance.
    pub eps: f32,
}

/// A loss function on the model output `pred` (`n` samples of `c` values) and the targets.
///
/// Targets are class indices (`n` values) for [`LossFn::SoftmaxCrossEntropy`] with
/// `class_targets`, else values with the shape of `pred`. Every loss is averaged as PyTorch's
/// `reduction="mean"` does: over samples for the cross-entropies, over all elements otherwise.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LossFn {
    /// Softmax cross-entropy on logits, with optional label smoothing. Targets are class indices
    /// or probabilities (one-hot or soft).
    SoftmaxCrossEntropy {
        label_smoothing: f32,
        class_targets: bool,
    },
    /// Binary cross-entropy on probabilities (PyTorch clamps the logs at -100).
    BinaryCrossEntropy,
    /// Binary cross-entropy on logits, computed stably.
    BinaryCrossEntropyWithLogits,
    /// `-sum(t * log(clip(p, 1e-7, 1)))` on probabilities, as Keras's categorical cross-entropy.
    /// Targets are class indices or probabilities.
    CategoricalCrossEntropy {
        class_targets: bool,
    },
    MeanSquaredError,
    MeanAbsoluteError,
    Huber {
        delta: f32,
    },
}

/// How the loss op scores predictions for the accuracy metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    /// No accuracy (regression).
    None,
    /// Class prediction by arg-max; `top_k` also counts targets among the k largest outputs.
    ArgMax { top_k: usize },
    /// Element-wise binary prediction: output above `0.5` (probabilities) or `0` (logits).
    Binary { logits: bool },
}

/// Defines a buffer layout once: a module of `usize` constants for Rust, and the same values as
/// C `#define`s (`PREFIX_NAME`) that [`cuda_layouts`] hands the CUDA kernels, so no offset is
/// written twice.
macro_rules! layout {
    ($(#[$doc:meta])* $m:ident, $prefix:literal { $($(#[$d:meta])* $name:ident = $val:expr;)* }) => {
        $(#[$doc])*
        pub mod $m {
            $($(#[$d])* pub const $name: usize = $val;)*

            /// The layout as C `#define`s, for kernel sources.
            pub(crate) fn c_defines() -> String {
                let mut s = String::new();
                $(s += &format!("#define {}_{} {}\n", $prefix, stringify!($name), $name);)*
                s
            }
        }
    };
}

layout! {
    /// Layout of the loss op's statistics buffer: the batch's mean loss and correct counts, and
    /// sums over every batch since the buffer was last cleared (so an epoch's metrics need one
    /// read).
    stats, "STATS" {
        /// Mean loss of the last batch.
        LOSS = 0;
        /// Correct predictions in the last batch (top-1, or elements for binary scoring).
        CORRECT = 1;
        /// Targets among the top k outputs in the last batch.
        CORRECT_K = 2;
        /// Sum over batches of mean loss times samples.
        SUM_LOSS = 3;
        /// Sum over batches of [`CORRECT`].
        SUM_CORRECT = 4;
        /// Sum over batches of [`CORRECT_K`].
        SUM_CORRECT_K = 5;
        /// Samples seen.
        SUM_SAMPLES = 6;
        /// Predictions scored (samples, or elements under binary scoring).
        SUM_SCORED = 7;
        /// Number of values in the buffer.
        LEN = 8;
    }
}

layout! {
    /// Layout of the guard buffer of [`CheckFinite`]: whether this step's update is skipped,
    /// and what the checks found so far (counts are exact up to 2^24 steps).
    guard, "GUARD" {
        /// 1 when the current step's update is to be skipped (the optimizer kernels read it).
        SKIP = 0;
        /// Steps found non-finite (and not applied) since the buffer was cleared.
        BAD_STEPS = 1;
        /// 1 + the number of steps checked before the first bad one (0: none bad yet).
        FIRST_BAD = 2;
        /// What the first bad step had: 1 a non-finite loss, 2 a non-finite gradient norm, 3 both.
        WHAT = 3;
        /// The first bad step's loss.
        LOSS = 4;
        /// The first bad step's gradient norm.
        NORM = 5;
        /// Steps checked since the buffer was cleared.
        CHECKED = 6;
        /// Number of values in the buffer.
        LEN = 7;
    }
}

/// Every buffer layout shared with the CUDA kernels, as C `#define`s ([`stats`], [`hyper`],
/// [`guard`]).
pub(crate) fn cuda_layouts() -> String {
    stats::c_defines() + &hyper::c_defines() + &guard::c_defines()
}

/// An optimizer's update rule and its fixed hyper-parameters, with PyTorch's semantics.
/// The learning rate and the momentum (SGD, RMSprop) or beta1 (Adam family) are read from the
/// device `hyper` buffer each step, so schedules reach the device without re-planning.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptRule {
    Sgd {
        dampening: f32,
        nesterov: bool,
        weight_decay: f32,
    },
    /// Adam; `decoupled` is AdamW's weight decay.
    Adam {
        beta2: f32,
        eps: f32,
        weight_decay: f32,
        decoupled: bool,
        amsgrad: bool,
    },
    RmsProp {
        alpha: f32,
        eps: f32,
        weight_decay: f32,
        centered: bool,
    },
    Adagrad {
        lr_decay: f32,
        eps: f32,
        weight_decay: f32,
    },
    Adadelta {
        rho: f32,
        eps: f32,
        weight_decay: f32,
    },
    NAdam {
        beta2: f32,
        eps: f32,
        weight_decay: f32,
        momentum_decay: f32,
    },
}

impl OptRule {
    /// Number of state tensors each parameter needs (moments, accumulators).
    pub fn state_tensors(&self) -> usize {
        match *self {
            OptRule::Sgd { .. } => 1,
            OptRule::Adam { amsgrad, .. } => 2 + amsgrad as usize,
            OptRule::RmsProp { centered, .. } => 2 + centered as usize,
            OptRule::Adagrad { .. } => 1,
            OptRule::Adadelta { .. } => 2,
            OptRule::NAdam { .. } => 2,
        }
    }
}

layout! {
    /// Indices into an optimizer's `hyper` buffer.
    hyper, "HYPER" {
        /// The learning rate.
        LR = 0;
        /// SGD/RMSprop momentum, or Adam/NAdam beta1.
        MOMENTUM = 1;
        /// Number of values in the buffer.
        LEN = 2;
    }
}

/// One parameter tensor handled by an optimizer step.
#[derive(Clone, Debug, PartialEq)]
pub struct OptParam {
    pub len: usize,
    pub value: BufId,
    pub grad: BufId,
    /// State tensors, as many as [`OptRule::state_tensors`].
    pub state: Vec<BufId>,
}

/// `y = conv(x, w) + b`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Conv2d {
    /// Geometry.
    pub g: ConvGeom,
    /// Input.
    pub x: BufId,
    /// Weight.
    pub w: BufId,
    /// Bias, if any.
    pub b: Option<BufId>,
    /// Output.
    pub y: BufId,
}

/// Gradients of a convolution: input (`dx`), filter (`dw`) and bias (`db`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Conv2dBackward {
    /// Geometry.
    pub g: ConvGeom,
    /// Input.
    pub x: BufId,
    /// Weight.
    pub w: BufId,
    /// Gradient of the output.
    pub dy: BufId,
    /// Gradient of the input, where wanted.
    pub dx: Option<GradOut>,
    /// Gradient of the weight.
    pub dw: GradOut,
    /// Gradient of the bias, where wanted.
    pub db: Option<GradOut>,
}

/// `y[m, n] = x[m, k] * w[n, k]^T + b[n]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Linear {
    /// Rows (samples).
    pub m: usize,
    /// Input features.
    pub k: usize,
    /// Output features.
    pub n: usize,
    /// Input.
    pub x: BufId,
    /// Weight.
    pub w: BufId,
    /// Bias, if any.
    pub b: Option<BufId>,
    /// Output.
    pub y: BufId,
}

/// The op `LinearBackward`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearBackward {
    /// Rows (samples).
    pub m: usize,
    /// Input features.
    pub k: usize,
    /// Output features.
    pub n: usize,
    /// Input.
    pub x: BufId,
    /// Weight.
    pub w: BufId,
    /// Gradient of the output.
    pub dy: BufId,
    /// Gradient of the input, where wanted.
    pub dx: Option<GradOut>,
    /// Gradient of the weight.
    pub dw: GradOut,
    /// Gradient of the bias, where wanted.
    pub db: Option<GradOut>,
}

/// `y = f(x)` over `len` values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Act {
    /// The function.
    pub f: ActFn,
    /// Number of values.
    pub len: usize,
    /// Input.
    pub x: BufId,
    /// Output.
    pub y: BufId,
}

/// `dx = f'(x) * dy`, given the forward input `x` and output `y`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ActBackward {
    /// The function.
    pub f: ActFn,
    /// Number of values.
    pub len: usize,
    /// Input.
    pub x: BufId,
    /// Output.
    pub y: BufId,
    /// Gradient of the output.
    pub dy: BufId,
    /// Gradient of the input, where wanted.
    pub dx: GradOut,
}

/// Softmax over the middle axis of an `[outer, dim, inner]` view.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Softmax {
    /// Size of the outer axis.
    pub outer: usize,
    /// Size of the axis normalised over.
    pub dim: usize,
    /// Size of the inner axis.
    pub inner: usize,
    /// Input.
    pub x: BufId,
    /// Output.
    pub y: BufId,
}

/// The op `SoftmaxBackward`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SoftmaxBackward {
    /// Size of the outer axis.
    pub outer: usize,
    /// Size of the axis normalised over.
    pub dim: usize,
    /// Size of the inner axis.
    pub inner: usize,
    /// Output.
    pub y: BufId,
    /// Gradient of the output.
    pub dy: BufId,
    /// Gradient of the input, where wanted.
    pub dx: GradOut,
}

/// `mask = (u >= rate) / (1 - rate)`, `y = x * mask`, where `u` is the Philox uniform for
/// (`seed`, the counter's value, element index); the counter then advances by one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    /// Probability of dropping a value.
    pub rate: f32,
    /// Number of values.
    pub len: usize,
    /// Seed of the Philox stream.
    pub seed: u64,
    /// Counter giving the step (advanced by the op).
    pub counter: CounterId,
    /// Input.
    pub x: BufId,
    /// Output.
    pub y: BufId,
    /// The saved mask (`0` or `1 / (1 - rate)`).
    pub mask: BufId,
}

/// The op `DropoutBackward`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutBackward {
    /// Number of values.
    pub len: usize,
    /// The saved mask (`0` or `1 / (1 - rate)`).
    pub mask: BufId,
    /// Gradient of the output.
    pub dy: BufId,
    /// Gradient of the input, where wanted.
    pub dx: GradOut,
}

/// Batch norm with the batch's statistics (training, or evaluation without running
/// statistics): saves `mean` and `invstd` for backward and, when `running` is given as
/// `(mean, var, momentum)`, updates the running statistics as PyTorch does (unbiased
/// variance). With `sync`, the statistics are those of the samples of every rank of the
/// backend's data-parallel group (PyTorch's `SyncBatchNorm`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormTrain {
    /// Geometry.
    pub g: BnGeom,
    /// Input.
    pub x: BufId,
    /// Scale, if affine.
    pub gamma: Option<BufId>,
    /// Shift, if affine.
    pub beta: Option<BufId>,
    /// Output.
    pub y: BufId,
    /// Saved batch mean per channel.
    pub mean: BufId,
    /// Saved inverse standard deviation per channel.
    pub invstd: BufId,
    /// Running mean, running variance and momentum, when tracked.
    pub running: Option<(BufId, BufId, f32)>,
    /// Statistics over the whole data-parallel group.
    pub sync: bool,
}

/// Batch norm with running statistics (evaluation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormInfer {
    /// Geometry.
    pub g: BnGeom,
    /// Input.
    pub x: BufId,
    /// Scale, if affine.
    pub gamma: Option<BufId>,
    /// Shift, if affine.
    pub beta: Option<BufId>,
    /// Running mean per channel.
    pub running_mean: BufId,
    /// Running variance per channel.
    pub running_var: BufId,
    /// Output.
    pub y: BufId,
}

/// The gradients of [`Op::BatchNormTrain`]. With `sync`, `dx` uses the sums of `dy` and
/// `dy * xhat` over every rank (as the forward's statistics did), while `dgamma` and `dbeta`
/// stay this rank's own, as the gradient all-reduce then averages them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormBackward {
    /// Geometry.
    pub g: BnGeom,
    /// Input.
    pub x: BufId,
    /// Scale, if affine.
    pub gamma: Option<BufId>,
    /// Saved batch mean per channel.
    pub mean: BufId,
    /// Saved inverse standard deviation per channel.
    pub invstd: BufId,
    /// Gradient of the output.
    pub dy: BufId,
    /// Gradient of the input, where wanted.
    pub dx: Option<GradOut>,
    /// Gradient of the scale, where wanted.
    pub dgamma: Option<GradOut>,
    /// Gradient of the shift, where wanted.
    pub dbeta: Option<GradOut>,
    /// Statistics over the whole data-parallel group.
    pub sync: bool,
}

/// Group norm (PyTorch's `nn.GroupNorm`, the same in training and evaluation): saves the
/// mean and inverse standard deviation of each sample's group (`[n, groups]`) for backward.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupNorm {
    /// Geometry.
    pub g: GnGeom,
    /// Input.
    pub x: BufId,
    /// Scale per channel, if affine.
    pub gamma: Option<BufId>,
    /// Shift per channel, if affine.
    pub beta: Option<BufId>,
    /// Output.
    pub y: BufId,
    /// Saved mean per sample and group.
    pub mean: BufId,
    /// Saved inverse standard deviation per sample and group.
    pub invstd: BufId,
}

/// The gradients of [`Op::GroupNorm`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupNormBackward {
    /// Geometry.
    pub g: GnGeom,
    /// Input.
    pub x: BufId,
    /// Scale per channel, if affine.
    pub gamma: Option<BufId>,
    /// Saved mean per sample and group.
    pub mean: BufId,
    /// Saved inverse standard deviation per sample and group.
    pub invstd: BufId,
    /// Gradient of the output.
    pub dy: BufId,
    /// Gradient of the input, where wanted.
    pub dx: Option<GradOut>,
    /// Gradient of the scale, where wanted.
    pub dgamma: Option<GradOut>,
    /// Gradient of the shift, where wanted.
    pub dbeta: Option<GradOut>,
}

/// Max pooling; `argmax` receives, per output, the index of the chosen input within its
/// `h * w` plane (as a float, exact below 2^24).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaxPool {
    /// Geometry.
    pub g: PoolGeom,
    /// Input.
    pub x: BufId,
    /// Output.
    pub y: BufId,
    /// Saved index of each maximum within its plane.
    pub argmax: BufId,
}

/// The op `MaxPoolBackward`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaxPoolBackward {
    /// Geometry.
    pub g: PoolGeom,
    /// Saved index of each maximum within its plane.
    pub argmax: BufId,
    /// Gradient of the output.
    pub dy: BufId,
    /// Gradient of the input, where wanted.
    pub dx: GradOut,
}

/// The op `AvgPool`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AvgPool {
    /// Geometry.
    pub g: PoolGeom,
    /// Count padding in the divisor (PyTorch's option).
    pub count_include_pad: bool,
    /// Input.
    pub x: BufId,
    /// Output.
    pub y: BufId,
}

/// The op `AvgPoolBackward`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AvgPoolBackward {
    /// Geometry.
    pub g: PoolGeom,
    /// Count padding in the divisor (PyTorch's option).
    pub count_include_pad: bool,
    /// Gradient of the output.
    pub dy: BufId,
    /// Gradient of the input, where wanted.
    pub dx: GradOut,
}

/// `y = sum(inputs)` over `len` values.
#[derive(Clone, Debug, PartialEq)]
pub struct Add {
    /// Number of values.
    pub len: usize,
    /// The summands.
    pub inputs: Vec<BufId>,
    /// Output.
    pub y: BufId,
}

/// Concatenation of `n` samples along channels: part `i` contributes `parts[i].1` channels
/// of `inner` values each.
#[derive(Clone, Debug, PartialEq)]
pub struct Concat {
    /// Output features.
    pub n: usize,
    /// Size of the inner axis.
    pub inner: usize,
    /// The parts: buffer and channels.
    pub parts: Vec<(BufId, usize)>,
    /// Output.
    pub y: BufId,
}

/// The gradient of a concatenation, split back to the parts that need one.
#[derive(Clone, Debug, PartialEq)]
pub struct ConcatBackward {
    /// Output features.
    pub n: usize,
    /// Size of the inner axis.
    pub inner: usize,
    /// The parts: buffer and channels.
    pub parts: Vec<(Option<GradOut>, usize)>,
    /// Gradient of the output.
    pub dy: BufId,
}

/// `dst = src` or `dst += src` over `len` values (the gradient of an addition).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradInto {
    /// Number of values.
    pub len: usize,
    /// Source.
    pub src: BufId,
    /// Destination.
    pub dst: GradOut,
}

/// Sets `len` values of `buf` to `value`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fill {
    /// Number of values.
    pub len: usize,
    /// The buffer.
    pub buf: BufId,
    /// The value.
    pub value: f32,
}

/// Loss and accuracy of `pred` against `target`: writes the batch's figures into `stats` (see
/// [`stats`]) and adds them to its sums, and, when `dpred` is given, the gradient of the mean
/// loss times `grad_scale` (1/k under gradient accumulation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Loss {
    /// The function.
    pub f: LossFn,
    /// How predictions are scored.
    pub scoring: Scoring,
    /// Output features.
    pub n: usize,
    /// Values per sample.
    pub c: usize,
    /// Predictions.
    pub pred: BufId,
    /// Targets (class indices or values).
    pub target: BufId,
    /// Statistics (layout: [`stats`]).
    pub stats: BufId,
    /// Gradient of the predictions, where wanted.
    pub dpred: Option<BufId>,
    /// Factor on the gradient.
    pub grad_scale: f32,
}

/// Scales gradients so their global L2 norm is at most `max_norm`, as PyTorch's
/// `clip_grad_norm_` (coefficient `max_norm / (norm + 1e-6)` when below one); the norm before
/// clipping is written to `norm[0]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipGradNorm {
    /// Gradients: buffer and values.
    pub grads: Vec<(BufId, usize)>,
    /// Largest global norm kept.
    pub max_norm: f32,
    /// Receives the norm before clipping.
    pub norm: BufId,
}

/// Clamps every gradient value to `[-clip, clip]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipGradValue {
    /// Gradients: buffer and values.
    pub grads: Vec<(BufId, usize)>,
    /// Bound on each value.
    pub clip: f32,
}

/// Checks a training step before its update: the batch's loss (`stats[LOSS]`) and the global L2
/// norm of `grads` must be finite. A bad step sets `guard[SKIP]`, which [`OptimizerStep`] reads
/// on the device, so weights and optimizer state stay as they were, with no synchronisation
/// with the host; the first bad step's figures are kept for the trainer to report (layout:
/// [`guard`]). With `sticky`, once a step was bad every later update is skipped too, until the
/// host clears the guard (the trainer's error mode: nothing moves between the bad step and the
/// error). The norm is summed in f64, so only a gradient whose norm exceeds f32's range or holds
/// NaN or infinity counts.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckFinite {
    /// The loss op's statistics (layout: [`stats`]).
    pub stats: BufId,
    /// Gradients: buffer and values.
    pub grads: Vec<(BufId, usize)>,
    /// The guard (layout: [`guard`]).
    pub guard: BufId,
    /// Keep skipping after a bad step.
    pub sticky: bool,
}

/// Replaces each of `bufs` (buffer, values) by its sum over the ranks of the backend's
/// data-parallel group, or by the mean with `mean` (the gradient all-reduce of one bucket).
/// The CUDA backend runs it on a second stream, so it overlaps with the ops after it until
/// one of them touches these buffers.
#[derive(Clone, Debug, PartialEq)]
pub struct AllReduce {
    /// Buffers reduced: buffer and values.
    pub bufs: Vec<(BufId, usize)>,
    /// Average rather than sum.
    pub mean: bool,
}

/// One optimizer step over all `params`. `step` counts steps (it is incremented first, so
/// the first step is number 1); `scalars` holds per-optimizer scalar state (NAdam's
/// momentum product, starting at 1).
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerStep {
    /// Update rule.
    pub rule: OptRule,
    /// Learning rate and momentum (layout: [`hyper`]).
    pub hyper: BufId,
    /// Step counter (incremented first).
    pub step: CounterId,
    /// Per-optimizer scalar state.
    pub scalars: BufId,
    /// The parameters updated.
    pub params: Vec<OptParam>,
    /// A [`CheckFinite`] guard: when its `SKIP` is set the step changes nothing (not even the
    /// step counter).
    pub guard: Option<BufId>,
}

/// One kernel launch of a plan: each variant holds its op's descriptor.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// See [`Conv2d`].
    Conv2d(Conv2d),
    /// See [`Conv2dBackward`].
    Conv2dBackward(Conv2dBackward),
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
