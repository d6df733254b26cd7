//! Batch norm and group norm: their shapes and the forward and backward ops.

use super::{BufId, GradOut};

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
