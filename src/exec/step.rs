//! The whole training step as one plan: the network's forward, the loss, backward (with each
//! gradient bucket's all-reduce in data-parallel training), gradient clipping and the optimizer
//! update, compiled from a [`StepDesc`] into one op list that a backend replays as a unit (one
//! CUDA graph).
//!
//! What all step plans of an executor share lives in [`Training`]: the optimizer's state, its
//! step counter and hyperparameter buffer, the metric sums the loss op adds to and the clipping
//! norm. The learning rate and momentum are read from the hyperparameter buffer by the update,
//! so a schedule changes them without re-planning.

use super::compile::Lowering;
use super::plan::{BufRole, Mode, Plan, PlanOptions, PlannedBuffer};
use super::scaler::GradScaler;
use super::{Executor, Key, PlanId};
use crate::backend::ops::{self, guard, hyper, stats};
use crate::backend::{Backend, BufId, CounterId, DType, HostSlice, LossFn, Op, OptParam, OptRule, Scoring};
use crate::dist::{Communicator, bucket};
use crate::model::Model;
use crate::{Error, Result};

/// Gradient clipping before the update, as PyTorch's `clip_grad_norm_` / `clip_grad_value_`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Clip {
    /// Scale all gradients so their global L2 norm is at most this.
    Norm(f32),
    /// Clamp every gradient value to `[-v, v]`.
    Value(f32),
}

/// This process's part in data-parallel training, as far as the plan is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Parallel {
    /// This process's rank (its dropout masks are drawn from its own stream).
    pub rank: usize,
    /// Processes in the group.
    pub world: usize,
    /// Batch norm reduces its statistics over the group.
    pub sync_batch_norm: bool,
    /// Size of the first gradient bucket (bytes).
    pub first_bucket_bytes: usize,
    /// Size of the other gradient buckets (bytes).
    pub bucket_bytes: usize,
}

/// Number format of a plan's arithmetic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// f32 storage and arithmetic, with convolutions and matrix products on TF32 tensor cores
    /// (inputs rounded to 10 mantissa bits, f32 accumulation), as PyTorch's
    /// `torch.backends.cudnn.allow_tf32` and `torch.backends.cuda.matmul.allow_tf32`: about
    /// 1e-3 relative error against f32. The plan is the f32 plan; the CUDA backend selects
    /// TF32 math in cuDNN and cuBLASLt (`CudaOptions::tf32`, which the trainer sets for this
    /// precision). Backends without TF32 (CPU, wgpu) compute in f32, as PyTorch's flags do
    /// nothing there; the trainer says so once on stderr.
    Tf32,
    /// Mixed precision with bf16, as PyTorch's `autocast(dtype=torch.bfloat16)` with
    /// `channels_last`: convolutions and matrix products take bf16 inputs on tensor cores and
    /// accumulate in f32, and the activations between convolutions (batch norm, activation
    /// functions, residual sums, their gradients) stay bf16 channels-last; parameters (the
    /// master weights), their gradients, the optimizer's state, batch-norm statistics,
    /// softmax, losses and the ops without bf16 kernels stay f32, with casts where the two
    /// meet (`exec/autocast.rs`); about 1e-2 relative error against f32 (bf16 keeps 8
    /// significant bits). Transposed convolutions stay f32 for now.
    /// Needs a backend that computes in bf16 (CUDA); others refuse it, naming `precision`.
    Bf16Mixed,
    /// Mixed precision with f16, as PyTorch's `autocast(dtype=torch.float16)`: the same pass
    /// as [`Precision::Bf16Mixed`] with f16 operands (11 significant bits, about 1e-3 relative
    /// per product, but a range that ends at 65504), so training needs loss scaling, which
    /// `LossScaling::Auto` turns on for it (PyTorch's `GradScaler`). Needs a backend whose
    /// products take f16 (CUDA); others refuse it, naming `precision`.
    F16Mixed,
}

impl Precision {
    /// The name used in configurations and on the command line (`f32`, `tf32`, `bf16`, `f16`).
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16Mixed => "bf16",
            Precision::F16Mixed => "f16",
        }
    }
}

/// Values in a metric sums buffer ([`Executor::sums`]).
pub const SUMS_LEN: usize = stats::LEN;

/// Which metric sums a step's loss adds to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Sums {
    /// Training figures (read once per epoch).
    Train,
    /// Evaluation figures.
    Eval,
}

/// What a step plan does, besides the model: the input of compilation, and the key of the plan
/// cache (and so of the CUDA graph cache).
#[derive(Clone, Debug, PartialEq)]
pub struct StepDesc {
    /// Samples per batch.
    pub batch: usize,
    /// Training (forward, loss, backward) or evaluation (forward and loss).
    pub mode: Mode,
    /// The loss function.
    pub loss: LossFn,
    /// How predictions are scored for accuracy.
    pub scoring: Scoring,
    /// Where the loss's figures are summed.
    pub sums: Sums,
    /// Clip and update after backward (training); without it, gradients only accumulate.
    pub update: bool,
    /// Zero the parameter gradients first (the first batch of an accumulation). They are not
    /// zeroed after an update, so the gradients an update used stay readable until then.
    pub zero_grads_first: bool,
    /// Gradient accumulation over this many batches: the loss gradient is scaled by `1/k` and
    /// parameter gradients add up (k > 1).
    pub accumulation: usize,
    /// Gradient clipping before the update.
    pub clip: Option<Clip>,
    /// Data-parallel training.
    pub parallel: Option<Parallel>,
    /// Number format.
    pub precision: Precision,
    /// Check the loss and gradient norm before the update ([`ops::CheckFinite`]): `None` for no
    /// check, `Some(sticky)` to skip a non-finite step's update (and, with `sticky`, every
    /// later one until [`Executor::clear_guard`]).
    pub check_finite: Option<bool>,
    /// Dynamic loss scaling (see `exec/scaler.rs`): training steps multiply the loss gradient
    /// by the scale; update steps divide the gradients by it before clipping, skip the update
    /// when they hold inf or NaN, and adapt the scale. With it, [`StepDesc::check_finite`]
    /// checks the loss only (overflowing gradients are the scaler's to handle).
    pub loss_scaling: Option<GradScaler>,
}

/// The buffers every step plan of an executor shares.
pub struct Training {
    /// The update rule and its device state (`None` for optimizers that run on the host, such
    /// as L-BFGS).
    pub optimizer: Option<OptimizerState>,
    /// Learning rate and momentum (see [`hyper`]).
    pub hyper: BufId,
    /// Training figures (see [`stats`]).
    pub train_stats: BufId,
    /// Evaluation figures.
    pub eval_stats: BufId,
    /// The gradient norm before clipping.
    pub clip_norm: BufId,
    /// What the non-finite checks found (see [`guard`]).
    pub guard: BufId,
    /// The loss scaler's state (see [`ops::scaler`]).
    pub scaler: BufId,
}

/// The optimizer's device state.
pub struct OptimizerState {
    /// The update rule.
    pub rule: OptRule,
    /// Steps taken (bias corrections use it).
    pub step: CounterId,
    /// Per-optimizer scalar state (NAdam's momentum product).
    pub scalars: BufId,
    /// One per trainable parameter, in the order of `model.params()`.
    pub params: Vec<OptParam>,
}

impl Training {
    /// Allocates the shared buffers; the optimizer's state starts at `initial` (Adagrad's
    /// initial accumulator value; zero for the others).
    pub(super) fn new<B: Backend>(
        backend: &mut B,
        model: &Model,
        params: &[super::ParamBuffers],
        rule: Option<OptRule>,
        initial: f32,
    ) -> Result<Training> {
        let hyper = backend.alloc(hyper::LEN, DType::F32)?;
        let train_stats = backend.alloc(stats::LEN, DType::F32)?;
        let eval_stats = backend.alloc(stats::LEN, DType::F32)?;
        let clip_norm = backend.alloc(1, DType::F32)?;
        let guard = backend.alloc(guard::LEN, DType::F32)?;
        let scaler = backend.alloc(ops::scaler::LEN, DType::F32)?;
        let mut s = [0.0f32; ops::scaler::LEN];
        s[ops::scaler::SCALE] = GradScaler::default().init_scale;
        backend.write(scaler, &s)?;
        let optimizer = match rule {
            None => None,
            Some(rule) => {
                let step = backend.new_counter()?;
                let scalars = backend.alloc(1, DType::F32)?;
                backend.write(scalars, &[1.0])?;
                let mut ps = Vec::new();
                for (spec, pb) in model.params().iter().zip(params) {
                    let Some(grad) = pb.grad else { continue };
                    let mut state = Vec::new();
                    for _ in 0..rule.state_tensors() {
                        let s = backend.alloc(spec.len(), DType::F32)?;
                        if initial != 0.0 {
                            backend.write(s, &vec![initial; spec.len()])?;
                        }
                        state.push(s);
                    }
                    ps.push(OptParam { len: spec.len(), value: pb.value, grad, state });
                }
                Some(OptimizerState { rule, step, scalars, params: ps })
            }
        };
        Ok(Training { optimizer, hyper, train_stats, eval_stats, clip_norm, guard, scaler })
    }

    /// The buffers of this state by role, for memory reports.
    pub(super) fn buffers(&self) -> Vec<(BufRole, DType, usize)> {
        let mut v = vec![
            (BufRole::Scalar, DType::F32, hyper::LEN),
            (BufRole::Scalar, DType::F32, 2 * stats::LEN),
            (BufRole::Workspace, DType::F32, 1),
            (BufRole::Scalar, DType::F32, guard::LEN),
            (BufRole::Scalar, DType::F32, ops::scaler::LEN),
        ];
        if let Some(o) = &self.optimizer {
            v.push((BufRole::Scalar, DType::F32, 1));
            v.extend(
                o.params.iter().flat_map(|p| p.state.iter().map(|_| (BufRole::OptimizerState, DType::F32, p.len))),
            );
        }
        v
    }

    /// The sums buffer of `sums`.
    pub fn sums(&self, sums: Sums) -> BufId {
        match sums {
            Sums::Train => self.train_stats,
            Sums::Eval => self.eval_stats,
        }
    }
}

/// The whole step's op list: under accumulation, zeroing the gradients `grads` first; the
/// network's forward, the loss, its backward (with all-reduces), clipping and the update.
/// `target` is the plan's target buffer.
pub(super) fn assemble(
    desc: &StepDesc,
    training: &Training,
    net: &Plan,
    grads: &[(BufId, usize)],
    out_len: usize,
    target: BufId,
) -> Vec<Op> {
    let (forward, backward, pred, dpred) = (&net.forward, &net.backward, net.output, net.output_grad);
    let k = desc.accumulation.max(1);
    let mut ops = Vec::new();
    if desc.zero_grads_first && desc.mode == Mode::Train {
        ops.extend(grads.iter().map(|&(buf, len)| Op::Fill(ops::Fill { len, buf, value: 0.0 })));
    }
    ops.extend(forward.iter().cloned());
    ops.push(Op::Loss(ops::Loss {
        f: desc.loss,
        scoring: desc.scoring,
        n: desc.batch,
        c: out_len,
        pred,
        target,
        stats: training.sums(desc.sums),
        dpred: if desc.mode == Mode::Train { dpred } else { None },
        grad_scale: 1.0 / k as f32,
    }));
    if let (Mode::Train, Some(_), Some(dpred)) = (desc.mode, desc.loss_scaling, dpred) {
        ops.push(super::scaler::scale_loss(dpred, desc.batch * out_len, training.scaler));
    }
    if desc.mode == Mode::Eval {
        return ops;
    }
    match (&desc.parallel, &training.optimizer) {
        // Data-parallel update: each gradient bucket is averaged over the group as soon as
        // backward has finished it (accumulating steps reduce nothing, as DDP's no_sync: the
        // update step reduces the accumulated sum).
        (Some(p), Some(opt)) if desc.update => {
            let grads: Vec<(BufId, usize)> = opt.params.iter().map(|p| (p.grad, p.len)).collect();
            let buckets = bucket::assign(&grads, p.first_bucket_bytes, p.bucket_bytes);
            ops.extend(bucket::insert_all_reduces(backward, &buckets, true));
        }
        _ => ops.extend(backward.iter().cloned()),
    }
    if desc.update
        && let Some(opt) = &training.optimizer
    {
        // Before clipping, as PyTorch's GradScaler unscales and checks before clip_grad_*_:
        // clipping by value would turn an infinite gradient finite.
        // With loss scaling, the check looks at the loss alone and the scaler at the gradients
        // (after it, so the skip it sets is or-ed into the check's).
        if let Some(sticky) = desc.check_finite {
            ops.push(Op::CheckFinite(ops::CheckFinite {
                stats: training.sums(desc.sums),
                grads: if desc.loss_scaling.is_some() { Vec::new() } else { grads.to_vec() },
                guard: training.guard,
                sticky,
            }));
        }
        if let Some(s) = &desc.loss_scaling {
            let checked = desc.check_finite.is_some();
            ops.push(super::scaler::unscale(s, grads, training.scaler, training.guard, checked));
        }
        match desc.clip {
            Some(Clip::Norm(max_norm)) => ops.push(Op::ClipGradNorm(ops::ClipGradNorm {
                grads: grads.to_vec(),
                max_norm,
                norm: training.clip_norm,
            })),
            Some(Clip::Value(clip)) => ops.push(Op::ClipGradValue(ops::ClipGradValue { grads: grads.to_vec(), clip })),
            None => {}
        }
        ops.push(Op::OptimizerStep(ops::OptimizerStep {
            rule: opt.rule,
            hyper: training.hyper,
            step: opt.step,
            scalars: opt.scalars,
            params: opt.params.clone(),
            guard: (desc.check_finite.is_some() || desc.loss_scaling.is_some()).then_some(training.guard),
        }));
    }
    ops
}

/// The loss op's figures, read from a sums buffer (see [`Executor::figures`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Figures {
    /// Mean loss of the last batch.
    pub loss: f32,
    /// Correct predictions in the last batch.
    pub correct: f32,
    /// Sum over batches of mean loss times samples.
    pub sum_loss: f32,
    /// Correct predictions summed over batches.
    pub sum_correct: f32,
    /// Targets among the top k outputs, summed over batches.
    pub sum_correct_k: f32,
    /// Samples seen.
    pub samples: f32,
    /// Predictions scored (samples, or elements under binary scoring).
    pub scored: f32,
}

/// What the non-finite checks ([`StepDesc::check_finite`]) found since the guard was cleared.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GuardState {
    /// Steps found non-finite (their updates were not applied).
    pub bad_steps: u64,
    /// The first bad step, counted among the checked steps from 1 (`None`: none).
    pub first_bad: Option<u64>,
    /// The first bad step's loss was not finite.
    pub bad_loss: bool,
    /// The first bad step's gradient norm was not finite.
    pub bad_norm: bool,
    /// The first bad step's loss.
    pub loss: f32,
    /// The first bad step's gradient norm.
    pub norm: f32,
    /// Steps checked.
    pub checked: u64,
}

/// The device state of the optimizer, copied to the host (checkpoints).
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerSnapshot {
    /// Per trainable parameter (in model order), its state tensors.
    pub tensors: Vec<Vec<Vec<f32>>>,
    /// Per-optimizer scalar state.
    pub scalars: Vec<f32>,
    /// Steps taken.
    pub step: u64,
}

impl<B: Backend> Executor<B> {
    /// Prepares the buffers that training steps share: the optimizer's state for `rule` (every
    /// state tensor starting at `initial`), its hyperparameters, the metric sums. `None` for an
    /// optimizer that runs on the host. Called once, before the first [`Executor::step_plan`].
    pub fn init_training(&mut self, rule: Option<OptRule>, initial: f32) -> Result<()> {
        if self.training.is_some() {
            return Err(Error::State("the executor's training state is already set up".into()));
        }
        self.training = Some(Training::new(&mut self.backend, &self.model, &self.params, rule, initial)?);
        Ok(())
    }

    /// Whether this executor's backend can run plans of `precision`: an error naming the field
    /// `precision` where it cannot (bf16 mixed precision on a backend that computes in f32
    /// only, such as the CPU; TF32 on a CUDA backend made with TF32 off). TF32 on a backend
    /// without the mode (CPU, wgpu) is accepted: it computes in f32, as PyTorch's flags do.
    pub fn check_precision(&self, precision: Precision) -> Result<()> {
        if let Some(half) = super::autocast::half_dtype(precision)
            && !self.backend.computes_products_in(half)
        {
            return Err(Error::config(
                "precision",
                format!(
                    "{} mixed precision needs a backend whose convolutions and matrix products take {} (CUDA); {} computes in f32 only: use Precision::F32",
                    precision.name(),
                    precision.name(),
                    self.backend.describe()
                ),
            ));
        }
        if precision == Precision::Tf32 && self.backend.tf32() == Some(false) {
            return Err(Error::config(
                "precision",
                format!(
                    "TF32 needs the CUDA backend made with TF32 on (CudaOptions {{ tf32: true, .. }}, which Trainer::new sets for Precision::Tf32); {} has it off",
                    self.backend.describe()
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn training(&self) -> Result<&Training> {
        self.training.as_ref().ok_or_else(|| Error::State("call Executor::init_training before a step plan".into()))
    }

    /// The plan of a whole step (see [`StepDesc`]), compiled and allocated on first request:
    /// the network's plan (shared with predictions of the same batch, mode and lowering) plus
    /// a target buffer and the step's op list.
    pub fn step_plan(&mut self, desc: &StepDesc) -> Result<PlanId> {
        // Looked up on every step: compared in place, nothing allocated.
        if let Some(i) = self.keys.iter().position(|k| matches!(k, Key::Step(d) if d == desc)) {
            return Ok(PlanId(i));
        }
        self.training()?;
        let train = desc.mode == Mode::Train;
        let parallel = desc.parallel.filter(|_| train);
        let low = Lowering {
            batch: desc.batch,
            mode: desc.mode,
            options: PlanOptions { input_grad: false, accumulate_param_grads: train && desc.accumulation > 1 },
            dropout_seed: self.dropout_seed,
            rank: parallel.map_or(0, |p| p.rank),
            sync_batch_norm: parallel.is_some_and(|p| p.sync_batch_norm),
            update_running_stats: true,
            precision: desc.precision,
            fuse: self.fuse,
        };
        let net = self.compile(low)?;
        let out_len: usize = self.model.nodes().last().expect("a model has nodes").shape.iter().product();
        // Class targets are one u32 label per sample; other targets are values shaped like
        // the output.
        let (target_len, target_dtype) =
            if desc.loss.class_targets() { (desc.batch, DType::U32) } else { (desc.batch * out_len, DType::F32) };
        let target = self.backend.alloc(target_len, target_dtype)?;
        let mut plan = self.plans[net.0].clone();
        plan.buffers.push(PlannedBuffer {
            id: target,
            len: target_len,
            dtype: target_dtype,
            role: BufRole::Input,
            label: if target_dtype == DType::U32 { "labels" } else { "target" }.into(),
        });
        plan.target = Some(target);
        let grads: Vec<(BufId, usize)> =
            self.model.params().iter().zip(&self.params).filter_map(|(s, p)| Some((p.grad?, s.len()))).collect();
        plan.step = assemble(desc, self.training()?, &plan, &grads, out_len, target);
        Ok(self.add_plan(Key::Step(desc.clone()), plan))
    }

    /// The target buffer of a step plan, checked to hold `dtype`; its length.
    fn target_of(&self, id: PlanId, dtype: DType) -> Result<(BufId, usize)> {
        let t = self.plans[id.0].target.ok_or_else(|| Error::State("this plan has no loss".into()))?;
        match self.backend.dtype(t) {
            d if d == dtype => Ok((t, self.backend.len(t))),
            DType::U32 => Err(Error::State("this plan's loss takes class labels: use Executor::set_labels".into())),
            _ => Err(Error::State("this plan's loss takes target values: use Executor::set_target".into())),
        }
    }

    /// Writes a step plan's target values (losses without class targets): up to the whole
    /// buffer, `batch` times the output's values; a shorter batch is padded with zeros.
    pub fn set_target(&mut self, id: PlanId, targets: &[f32]) -> Result<()> {
        let (t, full) = self.target_of(id, DType::F32)?;
        if targets.len() > full {
            return Err(Error::shape("targets", format!("at most {full} values"), targets.len()));
        }
        if targets.len() == full {
            return self.backend.write(t, targets);
        }
        let mut padded = Vec::with_capacity(full);
        padded.extend_from_slice(targets);
        padded.resize(full, 0.0);
        self.backend.write(t, &padded)
    }

    /// Writes a step plan's class labels (losses with class targets): up to `batch` labels,
    /// each below the model's number of outputs (an error names the first that is not); a
    /// shorter batch is padded with class 0.
    pub fn set_labels(&mut self, id: PlanId, labels: &[u32]) -> Result<()> {
        let (t, full) = self.target_of(id, DType::U32)?;
        if labels.len() > full {
            return Err(Error::shape("labels", format!("at most {full} values"), labels.len()));
        }
        let classes: usize = self.model.nodes().last().expect("a model has nodes").shape.iter().product();
        if let Some((sample, y)) = labels.iter().enumerate().find(|(_, y)| **y as usize >= classes) {
            return Err(Error::Label {
                sample,
                reason: format!("class {y} is out of range: the model has {classes} outputs (classes 0..{classes})"),
            });
        }
        if labels.len() == full {
            return self.backend.write_host(t, HostSlice::U32(labels));
        }
        let mut padded = Vec::with_capacity(full);
        padded.extend_from_slice(labels);
        padded.resize(full, 0);
        self.backend.write_host(t, HostSlice::U32(&padded))
    }

    /// Runs a step plan's whole op list, as one unit the backend may replay (a CUDA graph).
    pub fn run(&mut self, id: PlanId) -> Result<()> {
        let ops = std::mem::take(&mut self.plans[id.0].step);
        let r = self.backend.run_cached(id.0 as u64, &ops);
        self.plans[id.0].step = ops;
        r
    }

    /// Sets the learning rate and momentum (beta1) the next update reads.
    pub fn set_hyper(&mut self, lr: f64, momentum: f64) -> Result<()> {
        let h = self.training()?.hyper;
        let mut v = [0.0f32; hyper::LEN];
        v[hyper::LR] = lr as f32;
        v[hyper::MOMENTUM] = momentum as f32;
        self.backend.write(h, &v)
    }

    /// The figures of a sums buffer; with `combine`, the sums are added up over the
    /// data-parallel group (every rank must then call this).
    pub fn figures(&mut self, sums: Sums, combine: bool) -> Result<Figures> {
        let mut s = self.sums(sums)?;
        if combine {
            self.communicator()?.all_reduce_sum(&mut s[stats::SUM_LOSS..])?;
        }
        Ok(Figures {
            loss: s[stats::LOSS],
            correct: s[stats::CORRECT],
            sum_loss: s[stats::SUM_LOSS],
            sum_correct: s[stats::SUM_CORRECT],
            sum_correct_k: s[stats::SUM_CORRECT_K],
            samples: s[stats::SUM_SAMPLES],
            scored: s[stats::SUM_SCORED],
        })
    }

    /// What the non-finite checks found since the guard was last cleared.
    pub fn guard(&mut self) -> Result<GuardState> {
        let g = self.backend.read(self.training()?.guard)?;
        Ok(GuardState {
            bad_steps: g[guard::BAD_STEPS] as u64,
            first_bad: (g[guard::FIRST_BAD] != 0.0).then(|| g[guard::FIRST_BAD] as u64),
            bad_loss: g[guard::WHAT] as u32 & 1 != 0,
            bad_norm: g[guard::WHAT] as u32 & 2 != 0,
            loss: g[guard::LOSS],
            norm: g[guard::NORM],
            checked: g[guard::CHECKED] as u64,
        })
    }

    /// Clears the guard: the next update applies again (after a sticky check stopped them).
    pub fn clear_guard(&mut self) -> Result<()> {
        let g = self.training()?.guard;
        self.backend.write(g, &[0.0; guard::LEN])
    }

    /// The raw values of a sums buffer (checkpoints).
    pub fn sums(&mut self, sums: Sums) -> Result<Vec<f32>> {
        let b = self.training()?.sums(sums);
        self.backend.read(b)
    }

    /// Overwrites a sums buffer (`None`: clears it).
    pub fn set_sums(&mut self, sums: Sums, values: Option<&[f32]>) -> Result<()> {
        let b = self.training()?.sums(sums);
        match values {
            Some(v) if v.len() != stats::LEN => Err(Error::shape("metric sums", stats::LEN, v.len())),
            Some(v) => self.backend.write(b, v),
            None => self.backend.write(b, &[0.0; stats::LEN]),
        }
    }

    /// The optimizer's state (`None` without a device optimizer).
    pub fn optimizer_state(&mut self) -> Result<Option<OptimizerSnapshot>> {
        let Some(opt) = &self.training()?.optimizer else { return Ok(None) };
        let (params, scalars, step) = (opt.params.clone(), opt.scalars, opt.step);
        let mut tensors = Vec::with_capacity(params.len());
        for p in &params {
            tensors.push(p.state.iter().map(|&b| self.backend.read(b)).collect::<Result<Vec<_>>>()?);
        }
        Ok(Some(OptimizerSnapshot { tensors, scalars: self.backend.read(scalars)?, step: self.backend.counter(step)? }))
    }

    /// Restores the optimizer's state from [`Executor::optimizer_state`]'s snapshot.
    pub fn set_optimizer_state(&mut self, snap: &OptimizerSnapshot) -> Result<()> {
        let Some(opt) = &self.training()?.optimizer else {
            return Err(Error::State("this executor has no device optimizer".into()));
        };
        let (params, scalars, step) = (opt.params.clone(), opt.scalars, opt.step);
        if snap.tensors.len() != params.len() {
            return Err(Error::shape("optimizer state", params.len(), snap.tensors.len()));
        }
        for (p, t) in params.iter().zip(&snap.tensors) {
            if t.len() != p.state.len() {
                return Err(Error::shape("optimizer state tensors", p.state.len(), t.len()));
            }
            for (&b, v) in p.state.iter().zip(t) {
                self.backend.write(b, v)?;
            }
        }
        self.backend.write(scalars, &snap.scalars)?;
        self.backend.set_counter(step, snap.step)
    }

    /// Makes the backend one rank of `comm`'s data-parallel group
    /// ([`Backend::set_communicator`]); step plans with [`Parallel`] then reduce over it.
    pub fn join_group(&mut self, comm: Box<dyn Communicator>) -> Result<()> {
        self.backend.set_communicator(comm)
    }

    /// The data-parallel group's communicator (an error when the backend has none).
    pub fn communicator(&mut self) -> Result<&mut dyn Communicator> {
        self.backend
            .communicator()
            .ok_or_else(|| Error::State("the backend is not part of a data-parallel group".into()))
    }
}
