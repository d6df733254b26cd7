//! The op descriptors every backend executes: plain data (sizes, options, buffer ids), no layers,
//! no pointers, nothing device-specific. A plan is a `Vec<Op>`; the CPU backend runs it op by op
//! and the CUDA backend captures the same list as one CUDA graph.
//!
//! Conventions: tensors are contiguous row-major (NCHW for images). Gradients are written into a
//! [`GradOut`], which either overwrites its buffer or adds to it (when several consumers of one
//! tensor each contribute to its gradient, or when parameter gradients accumulate over batches).

use serde::{Deserialize, Serialize};

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

/// Layout of the loss op's statistics buffer: the batch's mean loss and correct counts, and sums
/// over every batch since the buffer was last cleared (so an epoch's metrics need one read).
pub mod stats {
    /// Mean loss of the last batch.
    pub const LOSS: usize = 0;
    /// Correct predictions in the last batch (top-1, or elements for binary scoring).
    pub const CORRECT: usize = 1;
    /// Targets among the top k outputs in the last batch.
    pub const CORRECT_K: usize = 2;
    /// Sum over batches of mean loss times samples.
    pub const SUM_LOSS: usize = 3;
    pub const SUM_CORRECT: usize = 4;
    pub const SUM_CORRECT_K: usize = 5;
    /// Samples seen.
    pub const SUM_SAMPLES: usize = 6;
    /// Predictions scored (samples, or elements under binary scoring).
    pub const SUM_SCORED: usize = 7;
    /// Number of values in the buffer.
    pub const LEN: usize = 8;
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

/// Indices into an optimizer's `hyper` buffer.
pub mod hyper {
    pub const LR: usize = 0;
    /// SGD/RMSprop momentum, or Adam/NAdam beta1.
    pub const MOMENTUM: usize = 1;
    pub const LEN: usize = 2;
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

/// One kernel launch of a plan.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// `y = conv(x, w) + b`.
    Conv2d {
        g: ConvGeom,
        x: BufId,
        w: BufId,
        b: Option<BufId>,
        y: BufId,
    },
    /// Gradients of a convolution: input (`dx`), filter (`dw`) and bias (`db`).
    Conv2dBackward {
        g: ConvGeom,
        x: BufId,
        w: BufId,
        dy: BufId,
        dx: Option<GradOut>,
        dw: GradOut,
        db: Option<GradOut>,
    },
    /// `y[m, n] = x[m, k] * w[n, k]^T + b[n]`.
    Linear {
        m: usize,
        k: usize,
        n: usize,
        x: BufId,
        w: BufId,
        b: Option<BufId>,
        y: BufId,
    },
    LinearBackward {
        m: usize,
        k: usize,
        n: usize,
        x: BufId,
        w: BufId,
        dy: BufId,
        dx: Option<GradOut>,
        dw: GradOut,
        db: Option<GradOut>,
    },
    /// `y = f(x)` over `len` values.
    Act {
        f: ActFn,
        len: usize,
        x: BufId,
        y: BufId,
    },
    /// `dx = f'(x) * dy`, given the forward input `x` and output `y`.
    ActBackward {
        f: ActFn,
        len: usize,
        x: BufId,
        y: BufId,
        dy: BufId,
        dx: GradOut,
    },
    /// Softmax over the middle axis of an `[outer, dim, inner]` view.
    Softmax {
        outer: usize,
        dim: usize,
        inner: usize,
        x: BufId,
        y: BufId,
    },
    SoftmaxBackward {
        outer: usize,
        dim: usize,
        inner: usize,
        y: BufId,
        dy: BufId,
        dx: GradOut,
    },
    /// `mask = (u >= rate) / (1 - rate)`, `y = x * mask`, where `u` is the Philox uniform for
    /// (`seed`, the counter's value, element index); the counter then advances by one.
    Dropout {
        rate: f32,
        len: usize,
        seed: u64,
        counter: CounterId,
        x: BufId,
        y: BufId,
        mask: BufId,
    },
    DropoutBackward {
        len: usize,
        mask: BufId,
        dy: BufId,
        dx: GradOut,
    },
    /// Batch norm with the batch's statistics (training, or evaluation without running
    /// statistics): saves `mean` and `invstd` for backward and, when `running` is given as
    /// `(mean, var, momentum)`, updates the running statistics as PyTorch does (unbiased
    /// variance). With `sync`, the statistics are those of the samples of every rank of the
    /// backend's data-parallel group (PyTorch's `SyncBatchNorm`).
    BatchNormTrain {
        g: BnGeom,
        x: BufId,
        gamma: Option<BufId>,
        beta: Option<BufId>,
        y: BufId,
        mean: BufId,
        invstd: BufId,
        running: Option<(BufId, BufId, f32)>,
        sync: bool,
    },
    /// Batch norm with running statistics (evaluation).
    BatchNormInfer {
        g: BnGeom,
        x: BufId,
        gamma: Option<BufId>,
        beta: Option<BufId>,
        running_mean: BufId,
        running_var: BufId,
        y: BufId,
    },
    /// The gradients of [`Op::BatchNormTrain`]. With `sync`, `dx` uses the sums of `dy` and
    /// `dy * xhat` over every rank (as the forward's statistics did), while `dgamma` and `dbeta`
    /// stay this rank's own, as the gradient all-reduce then averages them.
    BatchNormBackward {
        g: BnGeom,
        x: BufId,
        gamma: Option<BufId>,
        mean: BufId,
        invstd: BufId,
        dy: BufId,
        dx: Option<GradOut>,
        dgamma: Option<GradOut>,
        dbeta: Option<GradOut>,
        sync: bool,
    },
    /// Max pooling; `argmax` receives, per output, the index of the chosen input within its
    /// `h * w` plane (as a float, exact below 2^24).
    MaxPool {
        g: PoolGeom,
        x: BufId,
        y: BufId,
        argmax: BufId,
    },
    MaxPoolBackward {
        g: PoolGeom,
        argmax: BufId,
        dy: BufId,
        dx: GradOut,
    },
    AvgPool {
        g: PoolGeom,
        count_include_pad: bool,
        x: BufId,
        y: BufId,
    },
    AvgPoolBackward {
        g: PoolGeom,
        count_include_pad: bool,
        dy: BufId,
        dx: GradOut,
    },
    /// `y = sum(inputs)` over `len` values.
    Add {
        len: usize,
        inputs: Vec<BufId>,
        y: BufId,
    },
    /// Concatenation of `n` samples along channels: part `i` contributes `parts[i].1` channels
    /// of `inner` values each.
    Concat {
        n: usize,
        inner: usize,
        parts: Vec<(BufId, usize)>,
        y: BufId,
    },
    /// The gradient of a concatenation, split back to the parts that need one.
    ConcatBackward {
        n: usize,
        inner: usize,
        parts: Vec<(Option<GradOut>, usize)>,
        dy: BufId,
    },
    /// `dst = src` or `dst += src` over `len` values (the gradient of an addition).
    GradInto {
        len: usize,
        src: BufId,
        dst: GradOut,
    },
    /// Sets `len` values of `buf` to `value`.
    Fill {
        len: usize,
        buf: BufId,
        value: f32,
    },
    /// Loss and accuracy of `pred` against `target`: writes the batch's figures into `stats` (see
    /// [`stats`]) and adds them to its sums, and, when `dpred` is given, the gradient of the mean
    /// loss times `grad_scale` (1/k under gradient accumulation).
    Loss {
        f: LossFn,
        scoring: Scoring,
        n: usize,
        c: usize,
        pred: BufId,
        target: BufId,
        stats: BufId,
        dpred: Option<BufId>,
        grad_scale: f32,
    },
    /// Scales gradients so their global L2 norm is at most `max_norm`, as PyTorch's
    /// `clip_grad_norm_` (coefficient `max_norm / (norm + 1e-6)` when below one); the norm before
    /// clipping is written to `norm[0]`.
    ClipGradNorm {
        grads: Vec<(BufId, usize)>,
        max_norm: f32,
        norm: BufId,
    },
    /// Clamps every gradient value to `[-clip, clip]`.
    ClipGradValue {
        grads: Vec<(BufId, usize)>,
        clip: f32,
    },
    /// Replaces each of `bufs` (buffer, values) by its sum over the ranks of the backend's
    /// data-parallel group, or by the mean with `mean` (the gradient all-reduce of one bucket).
    /// The CUDA backend runs it on a second stream, so it overlaps with the ops after it until
    /// one of them touches these buffers.
    AllReduce {
        bufs: Vec<(BufId, usize)>,
        mean: bool,
    },
    /// One optimizer step over all `params`. `step` counts steps (it is incremented first, so
    /// the first step is number 1); `scalars` holds per-optimizer scalar state (NAdam's
    /// momentum product, starting at 1).
    OptimizerStep {
        rule: OptRule,
        hyper: BufId,
        step: CounterId,
        scalars: BufId,
        params: Vec<OptParam>,
    },
}

impl Op {
    /// Calls `f` on every buffer id the op names (inputs, outputs, saved tensors, gradients).
    pub fn visit_bufs(&mut self, f: &mut impl FnMut(&mut BufId)) {
        fn g(d: &mut GradOut, f: &mut impl FnMut(&mut BufId)) {
            f(&mut d.buf)
        }
        match self {
            Op::Conv2d { x, w, b, y, .. } | Op::Linear { x, w, b, y, .. } => {
                f(x);
                f(w);
                b.iter_mut().for_each(&mut *f);
                f(y);
            }
            Op::Conv2dBackward { x, w, dy, dx, dw, db, .. } | Op::LinearBackward { x, w, dy, dx, dw, db, .. } => {
                f(x);
                f(w);
                f(dy);
                dx.iter_mut().for_each(|d| g(d, f));
                g(dw, f);
                db.iter_mut().for_each(|d| g(d, f));
            }
            Op::Act { x, y, .. } | Op::Softmax { x, y, .. } | Op::AvgPool { x, y, .. } => {
                f(x);
                f(y);
            }
            Op::ActBackward { x, y, dy, dx, .. } => {
                f(x);
                f(y);
                f(dy);
                g(dx, f);
            }
            Op::SoftmaxBackward { y, dy, dx, .. } => {
                f(y);
                f(dy);
                g(dx, f);
            }
            Op::Dropout { x, y, mask, .. } => {
                f(x);
                f(y);
                f(mask);
            }
            Op::DropoutBackward { mask, dy, dx, .. } => {
                f(mask);
                f(dy);
                g(dx, f);
            }
            Op::BatchNormTrain { x, gamma, beta, y, mean, invstd, running, .. } => {
                f(x);
                gamma.iter_mut().for_each(&mut *f);
                beta.iter_mut().for_each(&mut *f);
                f(y);
                f(mean);
                f(invstd);
                if let Some((m, v, _)) = running {
                    f(m);
                    f(v);
                }
            }
            Op::BatchNormInfer { x, gamma, beta, running_mean, running_var, y, .. } => {
                f(x);
                gamma.iter_mut().for_each(&mut *f);
                beta.iter_mut().for_each(&mut *f);
                f(running_mean);
                f(running_var);
                f(y);
            }
            Op::BatchNormBackward { x, gamma, mean, invstd, dy, dx, dgamma, dbeta, .. } => {
                f(x);
                gamma.iter_mut().for_each(&mut *f);
                f(mean);
                f(invstd);
                f(dy);
                for d in [dx, dgamma, dbeta] {
                    d.iter_mut().for_each(|d| g(d, f));
                }
            }
            Op::MaxPool { x, y, argmax, .. } => {
                f(x);
                f(y);
                f(argmax);
            }
            Op::MaxPoolBackward { argmax, dy, dx, .. } => {
                f(argmax);
                f(dy);
                g(dx, f);
            }
            Op::AvgPoolBackward { dy, dx, .. } => {
                f(dy);
                g(dx, f);
            }
            Op::Add { inputs, y, .. } => {
                inputs.iter_mut().for_each(&mut *f);
                f(y);
            }
            Op::Concat { parts, y, .. } => {
                parts.iter_mut().for_each(|(b, _)| f(b));
                f(y);
            }
            Op::ConcatBackward { parts, dy, .. } => {
                parts.iter_mut().for_each(|(d, _)| d.iter_mut().for_each(|d| g(d, f)));
                f(dy);
            }
            Op::GradInto { src, dst, .. } => {
                f(src);
                g(dst, f);
            }
            Op::Fill { buf, .. } => f(buf),
            Op::Loss { pred, target, stats, dpred, .. } => {
                f(pred);
                f(target);
                f(stats);
                dpred.iter_mut().for_each(&mut *f);
            }
            Op::ClipGradNorm { grads, norm, .. } => {
                grads.iter_mut().for_each(|(b, _)| f(b));
                f(norm);
            }
            Op::ClipGradValue { grads, .. } | Op::AllReduce { bufs: grads, .. } => {
                grads.iter_mut().for_each(|(b, _)| f(b))
            }
            Op::OptimizerStep { hyper, scalars, params, .. } => {
                f(hyper);
                f(scalars);
                for p in params {
                    f(&mut p.value);
                    f(&mut p.grad);
                    p.state.iter_mut().for_each(&mut *f);
                }
            }
        }
    }

    /// A short name for logs and profiles.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Conv2d { .. } => "conv2d",
            Op::Conv2dBackward { .. } => "conv2d_backward",
            Op::Linear { .. } => "linear",
            Op::LinearBackward { .. } => "linear_backward",
            Op::Act { .. } => "activation",
            Op::ActBackward { .. } => "activation_backward",
            Op::Softmax { .. } => "softmax",
            Op::SoftmaxBackward { .. } => "softmax_backward",
            Op::Dropout { .. } => "dropout",
            Op::DropoutBackward { .. } => "dropout_backward",
            Op::BatchNormTrain { .. } => "batch_norm_train",
            Op::BatchNormInfer { .. } => "batch_norm_infer",
            Op::BatchNormBackward { .. } => "batch_norm_backward",
            Op::MaxPool { .. } => "max_pool",
            Op::MaxPoolBackward { .. } => "max_pool_backward",
            Op::AvgPool { .. } => "avg_pool",
            Op::AvgPoolBackward { .. } => "avg_pool_backward",
            Op::Add { .. } => "add",
            Op::Concat { .. } => "concat",
            Op::ConcatBackward { .. } => "concat_backward",
            Op::GradInto { .. } => "grad_into",
            Op::Fill { .. } => "fill",
            Op::Loss { .. } => "loss",
            Op::ClipGradNorm { .. } => "clip_grad_norm",
            Op::ClipGradValue { .. } => "clip_grad_value",
            Op::AllReduce { .. } => "all_reduce",
            Op::OptimizerStep { .. } => "optimizer_step",
        }
    }
}
