//! Batch norm and group norm: their shapes and the forward and backward ops.

use super::{ActFn, BufId, GradOut, OpDesc};
use crate::{Error, Result};

/// Batch-norm shape: `n` samples, `c` channels, `hw` values per channel per sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BnGeom {
    /// Samples.
    pub n: usize,
    /// Channels: one mean, variance, scale and shift each.
    pub c: usize,
    /// Values per channel per sample (`h * w` for images, 1 after a dense layer).
    pub hw: usize,
    /// Added to the variance before its square root (PyTorch's default 1e-5).
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
    /// An activation applied to the output (`y = f(gamma * xhat + beta)`), fused in by the
    /// compiler (`exec/fuse.rs`); one whose derivative follows from its output
    /// ([`ActFn::derivative_from_output`]).
    pub act: Option<ActFn>,
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
    /// An activation applied to the output, as [`BatchNormTrain::act`].
    pub act: Option<ActFn>,
}

/// The gradients of [`Op::BatchNormTrain`](super::Op::BatchNormTrain). With `sync`, `dx` uses the sums of `dy` and
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
    /// The activation the forward applied ([`BatchNormTrain::act`]): then `dy` is the gradient
    /// of the activated output, which is multiplied by `f'` (from that output) before the sums.
    pub act: Option<FusedAct>,
}

/// The activation fused into batch norm, as its backward sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FusedAct {
    /// The function (one whose derivative follows from its output).
    pub f: ActFn,
    /// The activated output of the forward.
    pub y: BufId,
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

/// The gradients of [`Op::GroupNorm`](super::Op::GroupNorm).
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

/// A fused activation's function checked: batch norm fuses only those whose derivative
/// follows from their output.
fn check_act(op: &str, f: Option<ActFn>) -> Result<()> {
    match f {
        Some(f) if !f.derivative_from_output() => Err(Error::State(format!(
            "{op}: {f:?} cannot be fused into batch norm (its derivative does not follow from its output)"
        ))),
        _ => Ok(()),
    }
}

/// The shape for debug logs, with the fused activation.
fn describe_act(g: &BnGeom, f: Option<ActFn>) -> String {
    match f {
        Some(f) => format!("{} +{f:?}", g.describe()),
        None => g.describe(),
    }
}

impl BnGeom {
    /// Values of the batch, and channels.
    fn sizes(&self) -> (usize, usize) {
        (self.n * self.c * self.hw, self.c)
    }

    /// The shape for debug logs.
    fn describe(&self) -> String {
        format!("{}x{}x{}", self.n, self.c, self.hw)
    }
}

impl GnGeom {
    /// Values of the batch, channels, and (sample, group) pairs.
    fn sizes(&self) -> (usize, usize, usize) {
        (self.n * self.c * self.hw, self.c, self.n * self.groups)
    }

    /// The shape for debug logs.
    fn describe(&self) -> String {
        format!("{}x{}x{}/{}", self.n, self.c, self.hw, self.groups)
    }
}

impl OpDesc for BatchNormTrain {
    const NAME: &'static str = "batch_norm_train";
    buffer_table!(|o, f| {
        let (n, c) = o.g.sizes();
        f(r!(o.x), n, R);
        if let Some(b) = r!(o.gamma) {
            f(b, c, R);
        }
        if let Some(b) = r!(o.beta) {
            f(b, c, R);
        }
        f(r!(o.y), n, W);
        f(r!(o.mean), c, W);
        f(r!(o.invstd), c, W);
        if let Some((rm, rv, _)) = r!(o.running) {
            f(rm, c, RW);
            f(rv, c, RW);
        }
    });
    fn shapes(&self) -> String {
        describe_act(&self.g, self.act)
    }
    fn check(&self) -> Result<()> {
        check_act(Self::NAME, self.act)
    }
}

impl OpDesc for BatchNormInfer {
    const NAME: &'static str = "batch_norm_infer";
    buffer_table!(|o, f| {
        let (n, c) = o.g.sizes();
        f(r!(o.x), n, R);
        if let Some(b) = r!(o.gamma) {
            f(b, c, R);
        }
        if let Some(b) = r!(o.beta) {
            f(b, c, R);
        }
        f(r!(o.running_mean), c, R);
        f(r!(o.running_var), c, R);
        f(r!(o.y), n, W);
    });
    fn shapes(&self) -> String {
        describe_act(&self.g, self.act)
    }
    fn check(&self) -> Result<()> {
        check_act(Self::NAME, self.act)
    }
}

impl OpDesc for BatchNormBackward {
    const NAME: &'static str = "batch_norm_backward";
    buffer_table!(|o, f| {
        let (n, c) = o.g.sizes();
        f(r!(o.x), n, R);
        if let Some(b) = r!(o.gamma) {
            f(b, c, R);
        }
        f(r!(o.mean), c, R);
        f(r!(o.invstd), c, R);
        f(r!(o.dy), n, R);
        if let Some(a) = r!(o.act) {
            f(r!(a.y), n, R);
        }
        if let Some(d) = r!(o.dx) {
            f(r!(d.buf), n, grad_access(d.accumulate));
        }
        if let Some(d) = r!(o.dgamma) {
            f(r!(d.buf), c, grad_access(d.accumulate));
        }
        if let Some(d) = r!(o.dbeta) {
            f(r!(d.buf), c, grad_access(d.accumulate));
        }
    });
    fn shapes(&self) -> String {
        describe_act(&self.g, self.act.map(|a| a.f))
    }
    fn check(&self) -> Result<()> {
        check_act(Self::NAME, self.act.map(|a| a.f))
    }
}

impl OpDesc for GroupNorm {
    const NAME: &'static str = "group_norm";
    buffer_table!(|o, f| {
        let (n, c, s) = o.g.sizes();
        f(r!(o.x), n, R);
        if let Some(b) = r!(o.gamma) {
            f(b, c, R);
        }
        if let Some(b) = r!(o.beta) {
            f(b, c, R);
        }
        f(r!(o.y), n, W);
        f(r!(o.mean), s, W);
        f(r!(o.invstd), s, W);
    });
    fn shapes(&self) -> String {
        self.g.describe()
    }
}

impl OpDesc for GroupNormBackward {
    const NAME: &'static str = "group_norm_backward";
    buffer_table!(|o, f| {
        let (n, c, s) = o.g.sizes();
        f(r!(o.x), n, R);
        if let Some(b) = r!(o.gamma) {
            f(b, c, R);
        }
        f(r!(o.mean), s, R);
        f(r!(o.invstd), s, R);
        f(r!(o.dy), n, R);
        if let Some(d) = r!(o.dx) {
            f(r!(d.buf), n, grad_access(d.accumulate));
        }
        if let Some(d) = r!(o.dgamma) {
            f(r!(d.buf), c, grad_access(d.accumulate));
        }
        if let Some(d) = r!(o.dbeta) {
            f(r!(d.buf), c, grad_access(d.accumulate));
        }
    });
    fn shapes(&self) -> String {
        self.g.describe()
    }
}
