//! Which buffers an op reads and writes, and how many values of each it touches: the one table
//! both backends validate op lists with ([`Op::validate`]), the planner renames buffers with
//! ([`Op::visit_bufs`]) and the CUDA backend orders its collectives with ([`Op::buffers`]).

use super::*;
use crate::backend::DType;
use crate::{Error, Result};

/// How an op uses a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Only read.
    Read,
    /// Overwritten without being read.
    Write,
    /// Read, then written (accumulated gradients, running statistics, optimizer state).
    ReadWrite,
}

impl Access {
    /// Whether the op writes the buffer.
    pub fn writes(self) -> bool {
        self != Access::Read
    }
}

/// One buffer of an op: which, how many values from its start, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufUse {
    /// The buffer.
    pub buf: BufId,
    /// Values the op touches, from the start of the buffer.
    pub len: usize,
    /// Read, written, or both.
    pub access: Access,
}

fn grad_access(accumulate: bool) -> Access {
    if accumulate { Access::ReadWrite } else { Access::Write }
}

/// Whether a loss reads class indices (`n` values) rather than a target per prediction.
pub(crate) fn class_targets(f: LossFn) -> bool {
    matches!(
        f,
        LossFn::SoftmaxCrossEntropy { class_targets: true, .. }
            | LossFn::CategoricalCrossEntropy { class_targets: true }
    )
}

/// The table, written once for both `&Op` and `&mut Op` (`$m` is `mut` or nothing): calls
/// `$f(&[mut] BufId, len, Access)` for every buffer the op names, in a fixed order.
macro_rules! each_buffer {
    ($op:expr, $f:ident, $($m:tt)?) => {{
        use Access::{Read as R, ReadWrite as RW, Write as W};
        match $op {
            Op::Conv2d(o) => {
                $f(&$($m)? o.x, o.g.input_len(), R);
                $f(&$($m)? o.w, o.g.weight_len(), R);
                if let Some(b) = &$($m)? o.b {
                    $f(b, o.g.k, R);
                }
                $f(&$($m)? o.y, o.g.output_len(), W);
            }
            Op::Conv2dBackward(o) => {
                $f(&$($m)? o.x, o.g.input_len(), R);
                $f(&$($m)? o.w, o.g.weight_len(), R);
                $f(&$($m)? o.dy, o.g.output_len(), R);
                if let Some(d) = &$($m)? o.dx {
                    $f(&$($m)? d.buf, o.g.input_len(), grad_access(d.accumulate));
                }
                $f(&$($m)? o.dw.buf, o.g.weight_len(), grad_access(o.dw.accumulate));
                if let Some(d) = &$($m)? o.db {
                    $f(&$($m)? d.buf, o.g.k, grad_access(d.accumulate));
                }
            }
            Op::ConvTranspose2d(o) => {
                $f(&$($m)? o.x, o.g.output_len(), R);
                $f(&$($m)? o.w, o.g.weight_len(), R);
                if let Some(b) = &$($m)? o.b {
                    $f(b, o.g.c, R);
                }
                $f(&$($m)? o.y, o.g.input_len(), W);
            }
            Op::ConvTranspose2dBackward(o) => {
                $f(&$($m)? o.x, o.g.output_len(), R);
                $f(&$($m)? o.w, o.g.weight_len(), R);
                $f(&$($m)? o.dy, o.g.input_len(), R);
                if let Some(d) = &$($m)? o.dx {
                    $f(&$($m)? d.buf, o.g.output_len(), grad_access(d.accumulate));
                }
                $f(&$($m)? o.dw.buf, o.g.weight_len(), grad_access(o.dw.accumulate));
                if let Some(d) = &$($m)? o.db {
                    $f(&$($m)? d.buf, o.g.c, grad_access(d.accumulate));
                }
            }
            Op::Linear(o) => {
                $f(&$($m)? o.x, o.m * o.k, R);
                $f(&$($m)? o.w, o.n * o.k, R);
                if let Some(b) = &$($m)? o.b {
                    $f(b, o.n, R);
                }
                $f(&$($m)? o.y, o.m * o.n, W);
            }
            Op::LinearBackward(o) => {
                $f(&$($m)? o.x, o.m * o.k, R);
                $f(&$($m)? o.w, o.n * o.k, R);
                $f(&$($m)? o.dy, o.m * o.n, R);
                if let Some(d) = &$($m)? o.dx {
                    $f(&$($m)? d.buf, o.m * o.k, grad_access(d.accumulate));
                }
                $f(&$($m)? o.dw.buf, o.n * o.k, grad_access(o.dw.accumulate));
                if let Some(d) = &$($m)? o.db {
                    $f(&$($m)? d.buf, o.n, grad_access(d.accumulate));
                }
            }
            Op::Act(o) => {
                $f(&$($m)? o.x, o.len, R);
                $f(&$($m)? o.y, o.len, W);
            }
            Op::ActBackward(o) => {
                $f(&$($m)? o.x, o.len, R);
                $f(&$($m)? o.y, o.len, R);
                $f(&$($m)? o.dy, o.len, R);
                $f(&$($m)? o.dx.buf, o.len, grad_access(o.dx.accumulate));
            }
            Op::Softmax(o) => {
                let n = o.outer * o.dim * o.inner;
                $f(&$($m)? o.x, n, R);
                $f(&$($m)? o.y, n, W);
            }
            Op::SoftmaxBackward(o) => {
                let n = o.outer * o.dim * o.inner;
                $f(&$($m)? o.y, n, R);
                $f(&$($m)? o.dy, n, R);
                $f(&$($m)? o.dx.buf, n, grad_access(o.dx.accumulate));
            }
            Op::Dropout(o) => {
                $f(&$($m)? o.x, o.len, R);
                $f(&$($m)? o.y, o.len, W);
                $f(&$($m)? o.mask, o.len, W);
            }
            Op::DropoutBackward(o) => {
                $f(&$($m)? o.mask, o.len, R);
                $f(&$($m)? o.dy, o.len, R);
                $f(&$($m)? o.dx.buf, o.len, grad_access(o.dx.accumulate));
            }
            Op::BatchNormTrain(o) => {
                let (n, c) = (o.g.n * o.g.c * o.g.hw, o.g.c);
                $f(&$($m)? o.x, n, R);
                if let Some(b) = &$($m)? o.gamma {
                    $f(b, c, R);
                }
                if let Some(b) = &$($m)? o.beta {
                    $f(b, c, R);
                }
                $f(&$($m)? o.y, n, W);
                $f(&$($m)? o.mean, c, W);
                $f(&$($m)? o.invstd, c, W);
                if let Some((rm, rv, _)) = &$($m)? o.running {
                    $f(rm, c, RW);
                    $f(rv, c, RW);
                }
            }
            Op::BatchNormInfer(o) => {
                let (n, c) = (o.g.n * o.g.c * o.g.hw, o.g.c);
                $f(&$($m)? o.x, n, R);
                if let Some(b) = &$($m)? o.gamma {
                    $f(b, c, R);
                }
                if let Some(b) = &$($m)? o.beta {
                    $f(b, c, R);
                }
                $f(&$($m)? o.running_mean, c, R);
                $f(&$($m)? o.running_var, c, R);
                $f(&$($m)? o.y, n, W);
            }
            Op::GroupNorm(o) => {
                let (n, c, s) = (o.g.n * o.g.c * o.g.hw, o.g.c, o.g.n * o.g.groups);
                $f(&$($m)? o.x, n, R);
                if let Some(b) = &$($m)? o.gamma {
                    $f(b, c, R);
                }
                if let Some(b) = &$($m)? o.beta {
                    $f(b, c, R);
                }
                $f(&$($m)? o.y, n, W);
                $f(&$($m)? o.mean, s, W);
                $f(&$($m)? o.invstd, s, W);
            }
            Op::GroupNormBackward(o) => {
                let (n, c, s) = (o.g.n * o.g.c * o.g.hw, o.g.c, o.g.n * o.g.groups);
                $f(&$($m)? o.x, n, R);
                if let Some(b) = &$($m)? o.gamma {
                    $f(b, c, R);
                }
                $f(&$($m)? o.mean, s, R);
                $f(&$($m)? o.invstd, s, R);
                $f(&$($m)? o.dy, n, R);
                if let Some(d) = &$($m)? o.dx {
                    $f(&$($m)? d.buf, n, grad_access(d.accumulate));
                }
                if let Some(d) = &$($m)? o.dgamma {
                    $f(&$($m)? d.buf, c, grad_access(d.accumulate));
                }
                if let Some(d) = &$($m)? o.dbeta {
                    $f(&$($m)? d.buf, c, grad_access(d.accumulate));
                }
            }
            Op::BatchNormBackward(o) => {
                let (n, c) = (o.g.n * o.g.c * o.g.hw, o.g.c);
                $f(&$($m)? o.x, n, R);
                if let Some(b) = &$($m)? o.gamma {
                    $f(b, c, R);
                }
                $f(&$($m)? o.mean, c, R);
                $f(&$($m)? o.invstd, c, R);
                $f(&$($m)? o.dy, n, R);
                if let Some(d) = &$($m)? o.dx {
                    $f(&$($m)? d.buf, n, grad_access(d.accumulate));
                }
                if let Some(d) = &$($m)? o.dgamma {
                    $f(&$($m)? d.buf, c, grad_access(d.accumulate));
                }
                if let Some(d) = &$($m)? o.dbeta {
                    $f(&$($m)? d.buf, c, grad_access(d.accumulate));
                }
            }
            Op::MaxPool(o) => {
                $f(&$($m)? o.x, o.g.input_len(), R);
                $f(&$($m)? o.y, o.g.output_len(), W);
                $f(&$($m)? o.argmax, o.g.output_len(), W);
            }
            Op::MaxPoolBackward(o) => {
                $f(&$($m)? o.argmax, o.g.output_len(), R);
                $f(&$($m)? o.dy, o.g.output_len(), R);
                $f(&$($m)? o.dx.buf, o.g.input_len(), grad_access(o.dx.accumulate));
            }
            Op::AvgPool(o) => {
                $f(&$($m)? o.x, o.g.input_len(), R);
                $f(&$($m)? o.y, o.g.output_len(), W);
            }
            Op::AvgPoolBackward(o) => {
                $f(&$($m)? o.dy, o.g.output_len(), R);
                $f(&$($m)? o.dx.buf, o.g.input_len(), grad_access(o.dx.accumulate));
            }
            Op::Add(o) => {
                for b in &$($m)? o.inputs {
                    $f(b, o.len, R);
                }
                $f(&$($m)? o.y, o.len, W);
            }
            Op::Concat(o) => {
                let channels: usize = o.parts.iter().map(|p| p.1).sum();
                for (b, c) in &$($m)? o.parts {
                    $f(b, o.n * *c * o.inner, R);
                }
                $f(&$($m)? o.y, o.n * channels * o.inner, W);
            }
            Op::ConcatBackward(o) => {
                let channels: usize = o.parts.iter().map(|p| p.1).sum();
                for (d, c) in &$($m)? o.parts {
                    if let Some(d) = d {
                        $f(&$($m)? d.buf, o.n * *c * o.inner, grad_access(d.accumulate));
                    }
                }
                $f(&$($m)? o.dy, o.n * channels * o.inner, R);
            }
            Op::GradInto(o) => {
                $f(&$($m)? o.src, o.len, R);
                $f(&$($m)? o.dst.buf, o.len, grad_access(o.dst.accumulate));
            }
            Op::Fill(o) => $f(&$($m)? o.buf, o.len, W),
            Op::Loss(o) => {
                let targets = if class_targets(o.f) { o.n } else { o.n * o.c };
                $f(&$($m)? o.pred, o.n * o.c, R);
                $f(&$($m)? o.target, targets, R);
                $f(&$($m)? o.stats, stats::LEN, RW);
                if let Some(d) = &$($m)? o.dpred {
                    $f(d, o.n * o.c, W);
                }
            }
            Op::ClipGradNorm(o) => {
                for (b, n) in &$($m)? o.grads {
                    $f(b, *n, RW);
                }
                $f(&$($m)? o.norm, 1, W);
            }
            Op::ClipGradValue(o) => {
                for (b, n) in &$($m)? o.grads {
                    $f(b, *n, RW);
                }
            }
            Op::AllReduce(o) => {
                for (b, n) in &$($m)? o.bufs {
                    $f(b, *n, RW);
                }
            }
            Op::CheckFinite(o) => {
                $f(&$($m)? o.stats, stats::LEN, R);
                for (b, n) in &$($m)? o.grads {
                    $f(b, *n, R);
                }
                $f(&$($m)? o.guard, guard::LEN, RW);
            }
            Op::OptimizerStep(o) => {
                if let Some(g) = &$($m)? o.guard {
                    $f(g, guard::LEN, R);
                }
                $f(&$($m)? o.hyper, hyper::LEN, R);
                $f(&$($m)? o.scalars, 1, RW);
                for p in &$($m)? o.params {
                    $f(&$($m)? p.value, p.len, RW);
                    $f(&$($m)? p.grad, p.len, R);
                    for s in &$($m)? p.state {
                        $f(s, p.len, RW);
                    }
                }
            }
        }
    }};
}

impl Op {
    /// Calls `f` on every buffer the op names, with the values it touches and how.
    pub fn each_buffer(&self, f: &mut impl FnMut(BufUse)) {
        let mut g = |buf: &BufId, len: usize, access: Access| f(BufUse { buf: *buf, len, access });
        each_buffer!(self, g,)
    }

    /// Every buffer the op names (inputs, outputs, saved tensors, gradients, state), with the
    /// values it touches and how.
    pub fn buffers(&self) -> Vec<BufUse> {
        let mut v = Vec::new();
        self.each_buffer(&mut |u| v.push(u));
        v
    }

    /// Calls `f` on every buffer id the op names, so that it can rename them.
    pub fn visit_bufs(&mut self, f: &mut impl FnMut(&mut BufId)) {
        let mut g = |buf: &mut BufId, _: usize, _: Access| f(buf);
        each_buffer!(self, g, mut)
    }

    /// Checks the op against the buffers a backend holds (`info` gives a buffer's length in
    /// values and its dtype, `None` for one that does not exist; `computes` says which dtypes
    /// the backend's ops work on): every buffer must exist, be long enough and hold a dtype the
    /// backend computes with, and the op must be consistent in itself. A wrong op list is then
    /// an error, never a read or write past an allocation. Both backends call this before
    /// executing an op.
    pub fn validate(
        &self,
        info: impl Fn(BufId) -> Option<(usize, DType)>,
        computes: impl Fn(DType) -> bool,
    ) -> Result<()> {
        if let Op::OptimizerStep(o) = self {
            let want = o.rule.state_tensors();
            if let Some(p) = o.params.iter().find(|p| p.state.len() != want) {
                return Err(Error::shape(
                    format!("state tensors of parameter buffer {} in op {}", p.value.0, self.name()),
                    want,
                    p.state.len(),
                ));
            }
        }
        let mut bad = None;
        self.each_buffer(&mut |u| {
            let have = info(u.buf);
            if bad.is_none() && have.is_none_or(|(len, dtype)| len < u.len || !computes(dtype)) {
                bad = Some((u, have));
            }
        });
        let Some((u, have)) = bad else { return Ok(()) };
        let what = format!("buffer {} of op {}", u.buf.0, self.name());
        Err(match have {
            None => Error::shape(what, format!("at least {} values", u.len), "no such buffer"),
            Some((len, _)) if len < u.len => {
                Error::shape(what, format!("at least {} values", u.len), format!("{len} values"))
            }
            Some((_, dtype)) => {
                Error::shape(what, "values of a dtype the backend computes with", format!("{dtype} values"))
            }
        })
    }

    /// A short description of the op's shapes, for debug logs.
    pub fn shapes(&self) -> String {
        fn list(parts: impl Iterator<Item = usize>) -> String {
            format!("{:?}", parts.collect::<Vec<_>>())
        }
        match self {
            Op::Conv2d(Conv2d { g, .. }) | Op::Conv2dBackward(Conv2dBackward { g, .. }) => format!(
                "{}x{}x{}x{} -> {}x{}x{} k{}x{} s{}x{} p{}x{} d{}x{} g{}",
                g.n, g.c, g.h, g.w, g.k, g.oh, g.ow, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.groups
            ),
            Op::ConvTranspose2d(ConvTranspose2d { g, .. })
            | Op::ConvTranspose2dBackward(ConvTranspose2dBackward { g, .. }) => format!(
                "{}x{}x{}x{} -> {}x{}x{} k{}x{} s{}x{} p{}x{} d{}x{} g{} (transposed)",
                g.n, g.k, g.oh, g.ow, g.c, g.h, g.w, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.groups
            ),
            Op::Linear(Linear { m, k, n, .. }) | Op::LinearBackward(LinearBackward { m, k, n, .. }) => {
                format!("{m}x{k} -> {m}x{n}")
            }
            Op::Act(Act { f, len, .. }) | Op::ActBackward(ActBackward { f, len, .. }) => format!("{f:?} {len}"),
            Op::Softmax(Softmax { outer, dim, inner, .. })
            | Op::SoftmaxBackward(SoftmaxBackward { outer, dim, inner, .. }) => format!("{outer}x[{dim}]x{inner}"),
            Op::Dropout(o) => format!("p={} {}", o.rate, o.len),
            Op::DropoutBackward(DropoutBackward { len, .. })
            | Op::GradInto(GradInto { len, .. })
            | Op::Fill(Fill { len, .. }) => format!("{len}"),
            Op::BatchNormTrain(BatchNormTrain { g, .. })
            | Op::BatchNormInfer(BatchNormInfer { g, .. })
            | Op::BatchNormBackward(BatchNormBackward { g, .. }) => format!("{}x{}x{}", g.n, g.c, g.hw),
            Op::GroupNorm(GroupNorm { g, .. }) | Op::GroupNormBackward(GroupNormBackward { g, .. }) => {
                format!("{}x{}x{}/{}", g.n, g.c, g.hw, g.groups)
            }
            Op::MaxPool(MaxPool { g, .. })
            | Op::MaxPoolBackward(MaxPoolBackward { g, .. })
            | Op::AvgPool(AvgPool { g, .. })
            | Op::AvgPoolBackward(AvgPoolBackward { g, .. }) => {
                format!("{}x{}x{}x{} -> {}x{} k{}x{} s{}x{}", g.n, g.c, g.h, g.w, g.oh, g.ow, g.kh, g.kw, g.sh, g.sw)
            }
            Op::Add(o) => format!("{} x {}", o.inputs.len(), o.len),
            Op::Concat(o) => format!("{} x {} x {}", o.n, list(o.parts.iter().map(|p| p.1)), o.inner),
            Op::ConcatBackward(o) => format!("{} x {} x {}", o.n, list(o.parts.iter().map(|p| p.1)), o.inner),
            Op::Loss(o) => format!("{:?} {}x{}", o.f, o.n, o.c),
            Op::ClipGradNorm(o) => format!("{} tensors, max norm {}", o.grads.len(), o.max_norm),
            Op::ClipGradValue(o) => format!("{} tensors, clip {}", o.grads.len(), o.clip),
            Op::AllReduce(o) => format!(
                "{} tensors ({} values), {}",
                o.bufs.len(),
                o.bufs.iter().map(|b| b.1).sum::<usize>(),
                if o.mean { "mean" } else { "sum" }
            ),
            Op::CheckFinite(o) => format!(
                "{} tensors ({} values){}",
                o.grads.len(),
                o.grads.iter().map(|b| b.1).sum::<usize>(),
                if o.sticky { ", sticky" } else { "" }
            ),
            Op::OptimizerStep(o) => format!(
                "{:?} on {} tensors ({} values)",
                o.rule,
                o.params.len(),
                o.params.iter().map(|p| p.len).sum::<usize>()
            ),
        }
    }
}
