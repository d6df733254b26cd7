//! The trainer: a model compiled on a backend with its loss and optimizer, stepping whole
//! training steps (forward, loss, backward, clipping, update) as one op list per batch size.
//!
//! ```
//! use kiln::model::ModelBuilder;
//! use kiln::tensor::Tensor;
//! use kiln::train::{Trainer, TrainerConfig};
//!
//! let model = ModelBuilder::new(&[4, 3]).dense(8).relu().dense(2).build().unwrap();
//! let mut trainer = Trainer::new(&model, TrainerConfig { batch_size: 4, ..Default::default() }).unwrap();
//! let x = Tensor::new(&[4, 3], vec![0.1; 12]).unwrap();
//! let r = trainer.train_batch(&x, &[0u32, 1, 0, 1]).unwrap();
//! assert!(r.loss > 0.0 && r.accuracy.is_some());
//! ```
//!
//! Nothing is read back from the device unless asked: [`Trainer::train_step`] queues a step and
//! returns; [`Trainer::train_batch`] also reads the step's loss and accuracy. Every step adds its
//! figures to device-side sums, which [`Trainer::take_epoch_metrics`] reads once per epoch.
//!
//! Data-parallel training ([`TrainerConfig::data_parallel`], [`Trainer::with_communicator`]):
//! each process is one rank of a group and trains on its shard of every batch; the parameters
//! start as rank 0's, each update step all-reduces (averages) the gradients bucket by bucket
//! during backward (see [`crate::dist`]), and the epoch metrics are summed over the ranks. The
//! loss that [`Trainer::train_batch`] returns is this rank's own.

use std::time::Instant;

use super::callbacks::{Callback, Control};
use super::config::{GradClip, Optimizer, Problem, ScheduleUnit, TrainerConfig};
use super::lbfgs::{self, LbfgsConfig, LbfgsState};
use super::loss::Targets;
use super::metrics::{EpochLog, History, Metrics, StepResult};
use super::schedule::Scheduler;
use crate::backend::cpu::CpuBackend;
use crate::backend::ops::{self, hyper, stats};
use crate::backend::{Backend, BufId, CounterId, LossFn, Op, OptParam, OptRule, Scoring};
use crate::backend::{CudaBackend, CudaOptions, Device};
use crate::data::DataLoader;
use crate::dist::{Communicator, DataParallel, DistEnv, TcpCommunicator, bucket};
use crate::exec::{Executor, Mode, PlanId, PlanOptions};
use crate::model::Model;
use crate::tensor::Tensor;
use crate::{Error, Result};

/// What a cached step list does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StepKind {
    /// Forward, loss, backward: gradients accumulate, no update.
    Accumulate,
    /// Forward, loss, backward, clipping, update (and zeroing accumulated gradients).
    Update,
    /// Forward (evaluation mode) and loss only.
    Eval,
}

struct Step {
    batch: usize,
    kind: StepKind,
    f: LossFn,
    scoring: Scoring,
    plan: PlanId,
    target: BufId,
    ops: Vec<Op>,
}

/// The optimizer's device state.
pub(super) struct OptState {
    pub(super) rule: OptRule,
    pub(super) step: CounterId,
    pub(super) scalars: BufId,
    /// One per trainable parameter, in the order of `model.params()`.
    pub(super) params: Vec<OptParam>,
}

/// This trainer's place in a data-parallel group.
struct DistState {
    rank: usize,
    world: usize,
    options: DataParallel,
}

/// Trains one model; see the module documentation.
// Fields read and restored by `state.rs` (checkpoints) are `pub(super)`.
pub struct Trainer {
    pub(super) exec: Executor<Box<dyn Backend>>,
    pub(super) config: TrainerConfig,
    out_shape: Vec<usize>,
    pub(super) opt: Option<OptState>,
    pub(super) lbfgs: LbfgsState,
    hyper: BufId,
    pub(super) train_stats: BufId,
    eval_stats: BufId,
    clip_norm: BufId,
    steps: Vec<Step>,
    pub(super) scheduler: Scheduler,
    /// Micro-batches since the last optimizer step (gradient accumulation).
    pub(super) micro: usize,
    /// Optimizer steps taken.
    pub(super) opt_steps: u64,
    /// Epochs completed.
    pub(super) epoch: usize,
    /// Batches of the current epoch that `fit` has trained on (a resumed `fit` continues after them).
    pub(super) batch_in_epoch: usize,
    pub(super) history: History,
    pub(super) last_lr: f64,
    /// The first evaluation of the last L-BFGS step.
    lbfgs_first: Option<StepResult>,
    /// Set when training data-parallel.
    dist: Option<DistState>,
}

/// The backend for a config: the CPU with its thread count, the GPU with its TF32 setting, or,
/// for `Auto`, the GPU when one is usable and otherwise the CPU (saying why once per process).
/// In data-parallel training the GPU is the local rank's (`local_rank`), whatever `Cuda(i)` says.
fn open_device(config: &TrainerConfig, local_rank: Option<usize>) -> Result<Box<dyn Backend>> {
    let options = CudaOptions { tf32: config.tf32, nondeterministic: !config.deterministic, ..Default::default() };
    let cuda = |i| CudaBackend::with_options(i, options.clone());
    let gpu = |i: usize| match (local_rank, &config.data_parallel) {
        (Some(l), Some(dp)) => dp.device_for(l),
        _ => Ok(i),
    };
    Ok(match config.device {
        Device::Cpu => Box::new(CpuBackend::<f32>::new(config.threads)?),
        Device::Cuda(i) => Box::new(cuda(gpu(i)?)?),
        Device::Auto => match cuda(gpu(0)?) {
            Ok(b) => Box::new(b),
            Err(e) => {
                static NOTICE: std::sync::Once = std::sync::Once::new();
                NOTICE.call_once(|| eprintln!("kiln: no usable GPU ({e}); training on the CPU"));
                Box::new(CpuBackend::<f32>::new(config.threads)?)
            }
        },
    })
}

pub(super) fn opt_rule(o: &Optimizer) -> Option<OptRule> {
    Some(match *o {
        Optimizer::Sgd { dampening, nesterov, weight_decay, .. } => OptRule::Sgd { dampening, nesterov, weight_decay },
        Optimizer::Adam { beta2, eps, weight_decay, amsgrad, .. } => {
            OptRule::Adam { beta2, eps, weight_decay, decoupled: false, amsgrad }
        }
        Optimizer::AdamW { beta2, eps, weight_decay, amsgrad, .. } => {
            OptRule::Adam { beta2, eps, weight_decay, decoupled: true, amsgrad }
        }
        Optimizer::RmsProp { alpha, eps, centered, weight_decay, .. } => {
            OptRule::RmsProp { alpha, eps, weight_decay, centered }
        }
        Optimizer::Adagrad { lr_decay, eps, weight_decay, .. } => OptRule::Adagrad { lr_decay, eps, weight_decay },
        Optimizer::Adadelta { rho, eps, weight_decay } => OptRule::Adadelta { rho, eps, weight_decay },
        Optimizer::NAdam { beta2, eps, weight_decay, momentum_decay, .. } => {
            OptRule::NAdam { beta2, eps, weight_decay, momentum_decay }
        }
        Optimizer::Lbfgs { .. } => return None,
    })
}

impl Trainer {
    /// Validates the config against the model and places both on the configured device.
    pub fn new(model: &Model, config: TrainerConfig) -> Result<Trainer> {
        config.validate()?;
        if let Some(dp) = &config.data_parallel {
            // The group first: a rank whose device fails to open must not leave the others
            // waiting at the rendezvous for the full timeout (its exit closes its sockets).
            let env = DistEnv::from_env()?;
            let comm = TcpCommunicator::connect(&env, dp.timeout())?;
            let backend = open_device(&config, Some(env.local_rank))?;
            return Self::with_communicator(model, config, backend, Box::new(comm));
        }
        let backend = open_device(&config, None)?;
        Self::with_backend(model, config, backend)
    }

    /// A data-parallel trainer on `backend` as one rank of `comm`'s group (with
    /// `config.data_parallel`'s options, or the defaults): the backend joins the group
    /// ([`Backend::set_communicator`]) and the parameters are set to rank 0's. Every rank of the
    /// group must make its trainer from the same model and config. [`Trainer::new`] does this
    /// with the group of the environment; this is for groups made otherwise (threads, tests).
    pub fn with_communicator(
        model: &Model,
        mut config: TrainerConfig,
        mut backend: Box<dyn Backend>,
        comm: Box<dyn Communicator>,
    ) -> Result<Trainer> {
        let options = config.data_parallel.get_or_insert_with(DataParallel::default).clone();
        config.validate()?;
        let (rank, world) = (comm.rank(), comm.world());
        backend.set_communicator(comm)?;
        let mut t = Self::with_backend(model, config, backend)?;
        t.dist = Some(DistState { rank, world, options });
        t.broadcast_parameters()?;
        Ok(t)
    }

    /// This process's rank in its data-parallel group (0 when training alone).
    pub fn rank(&self) -> usize {
        self.dist.as_ref().map_or(0, |d| d.rank)
    }

    /// The number of processes training together (1 when training alone).
    pub fn world_size(&self) -> usize {
        self.dist.as_ref().map_or(1, |d| d.world)
    }

    fn comm(&mut self) -> Result<&mut dyn Communicator> {
        self.exec
            .backend_mut()
            .communicator()
            .ok_or_else(|| Error::State("the backend lost its data-parallel group".into()))
    }

    /// Sets every parameter (running statistics included) to rank 0's, as DDP does at start.
    fn broadcast_parameters(&mut self) -> Result<()> {
        let specs: Vec<(String, usize)> =
            self.exec.model().params().iter().map(|p| (p.name.clone(), p.len())).collect();
        let mut flat = Vec::new();
        for (name, _) in &specs {
            flat.extend(self.exec.read_param(name)?);
        }
        self.comm()?.broadcast(&mut flat, 0)?;
        let mut off = 0;
        for (name, len) in &specs {
            self.exec.write_param(name, &flat[off..off + len])?;
            off += len;
        }
        Ok(())
    }

    /// As [`Trainer::new`], on a backend the caller made (ignoring `config.device`, `threads`
    /// and `tf32`), for example a [`CudaBackend`] with options of its own.
    pub fn with_backend(model: &Model, config: TrainerConfig, backend: Box<dyn Backend>) -> Result<Trainer> {
        config.validate()?;
        let out_shape = model.nodes().last().expect("a built model has layers").shape.clone();
        config.loss.check_output(&out_shape)?;
        let mut exec = Executor::new(model, backend)?;
        let b = exec.backend_mut();
        let hyper = b.alloc(hyper::LEN)?;
        let train_stats = b.alloc(stats::LEN)?;
        let eval_stats = b.alloc(stats::LEN)?;
        let clip_norm = b.alloc(1)?;
        let opt = match opt_rule(&config.optimizer) {
            None => None,
            Some(rule) => {
                let step = exec.backend_mut().new_counter()?;
                let scalars = exec.backend_mut().alloc(1)?;
                exec.backend_mut().write(scalars, &[1.0])?;
                let init = match config.optimizer {
                    Optimizer::Adagrad { initial_accumulator_value, .. } => initial_accumulator_value,
                    _ => 0.0,
                };
                let mut params = Vec::new();
                let bufs = exec.param_buffers().to_vec();
                for (spec, pb) in model.params().iter().zip(bufs) {
                    let Some(grad) = pb.grad else { continue };
                    let mut state = Vec::new();
                    for _ in 0..rule.state_tensors() {
                        let s = exec.backend_mut().alloc(spec.len())?;
                        if init != 0.0 {
                            exec.backend_mut().write(s, &vec![init; spec.len()])?;
                        }
                        state.push(s);
                    }
                    params.push(OptParam { len: spec.len(), value: pb.value, grad, state });
                }
                Some(OptState { rule, step, scalars, params })
            }
        };
        let scheduler = Scheduler::new(config.learning_rate, config.schedule.clone(), config.warmup);
        Ok(Trainer {
            exec,
            config,
            out_shape,
            opt,
            lbfgs: LbfgsState::default(),
            hyper,
            train_stats,
            eval_stats,
            clip_norm,
            steps: Vec::new(),
            scheduler,
            micro: 0,
            opt_steps: 0,
            epoch: 0,
            batch_in_epoch: 0,
            history: History::default(),
            last_lr: 0.0,
            lbfgs_first: None,
            dist: None,
        })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }

    /// The device the trainer runs on, in words.
    pub fn device(&self) -> String {
        self.exec.backend().describe()
    }

    /// The model with its current (trained) parameters.
    pub fn model(&mut self) -> Result<&Model> {
        self.exec.sync_model()
    }

    /// The learning rate the next step will use.
    pub fn learning_rate(&self) -> f64 {
        self.scheduler.lr()
    }

    /// Optimizer steps taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.opt_steps
    }

    /// Epochs completed (by `fit` or [`Trainer::end_epoch`]).
    pub fn epochs_done(&self) -> usize {
        self.epoch
    }

    /// Per-epoch logs so far.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// The executor (parameters, plans, backend) for advanced use.
    pub fn executor(&mut self) -> &mut Executor<Box<dyn Backend>> {
        &mut self.exec
    }

    fn check_inputs(&self, inputs: &Tensor) -> Result<usize> {
        let per = &self.exec.model().nodes()[0].shape;
        let s = inputs.shape();
        if s.len() != per.len() + 1 || s[1..] != per[..] || s[0] == 0 {
            return Err(Error::shape(
                "inputs",
                format!("[batch, {}]", per.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
                format!("{s:?}"),
            ));
        }
        Ok(s[0])
    }

    /// Finds or builds the op list for a step.
    fn step_index(&mut self, batch: usize, kind: StepKind, f: LossFn, scoring: Scoring) -> Result<usize> {
        if let Some(i) =
            self.steps.iter().position(|s| s.batch == batch && s.kind == kind && s.f == f && s.scoring == scoring)
        {
            return Ok(i);
        }
        let k = self.config.grad_accumulation;
        let (mode, options) = match kind {
            StepKind::Eval => (Mode::Eval, PlanOptions::default()),
            _ => (Mode::Train, PlanOptions { input_grad: false, accumulate_param_grads: k > 1 }),
        };
        let plan = self.exec.plan(batch, mode, options)?;
        let c: usize = self.out_shape.iter().product();
        // Targets are reused across steps of the same batch size.
        let target = match self.steps.iter().find(|s| s.batch == batch) {
            Some(s) => s.target,
            None => self.exec.backend_mut().alloc(batch * c)?,
        };
        let info = self.exec.plan_info(plan).clone();
        let mut ops = info.forward.clone();
        let (stats_buf, dpred) = match kind {
            StepKind::Eval => (self.eval_stats, None),
            _ => (self.train_stats, info.output_grad),
        };
        ops.push(Op::Loss(ops::Loss {
            f,
            scoring,
            n: batch,
            c,
            pred: info.output,
            target,
            stats: stats_buf,
            dpred,
            grad_scale: 1.0 / k as f32,
        }));
        if kind != StepKind::Eval {
            match (&self.dist, &self.opt) {
                // Data-parallel update: each gradient bucket is averaged over the group as soon
                // as backward has finished it (accumulating steps reduce nothing, as DDP's
                // no_sync: the update step reduces the accumulated sum).
                (Some(d), Some(opt)) if kind == StepKind::Update => {
                    let grads: Vec<(BufId, usize)> = opt.params.iter().map(|p| (p.grad, p.len)).collect();
                    let buckets = bucket::assign(&grads, d.options.first_bucket_bytes, d.options.bucket_bytes);
                    ops.extend(bucket::insert_all_reduces(&info.backward, &buckets, true));
                }
                _ => ops.extend(info.backward.iter().cloned()),
            }
            if let Some(d) = &self.dist {
                let rank = d.rank as u64;
                for op in &mut ops {
                    match op {
                        Op::BatchNormTrain(ops::BatchNormTrain { sync, .. })
                        | Op::BatchNormBackward(ops::BatchNormBackward { sync, .. }) => {
                            *sync = d.options.sync_batch_norm
                        }
                        // Each rank draws its own dropout masks (rank 0 those of a lone run).
                        Op::Dropout(ops::Dropout { seed, .. }) if rank > 0 => *seed = crate::rng::mix_seed(*seed, rank),
                        _ => {}
                    }
                }
            }
        }
        if kind == StepKind::Update
            && let Some(opt) = &self.opt
        {
            let grads: Vec<(BufId, usize)> = opt.params.iter().map(|p| (p.grad, p.len)).collect();
            match self.config.grad_clip {
                Some(GradClip::Norm(max_norm)) => ops.push(Op::ClipGradNorm(ops::ClipGradNorm {
                    grads: grads.clone(),
                    max_norm,
                    norm: self.clip_norm,
                })),
                Some(GradClip::Value(clip)) => {
                    ops.push(Op::ClipGradValue(ops::ClipGradValue { grads: grads.clone(), clip }))
                }
                None => {}
            }
            ops.push(Op::OptimizerStep(ops::OptimizerStep {
                rule: opt.rule,
                hyper: self.hyper,
                step: opt.step,
                scalars: opt.scalars,
                params: opt.params.clone(),
            }));
            if k > 1 {
                ops.extend(grads.iter().map(|&(buf, len)| Op::Fill(ops::Fill { len, buf, value: 0.0 })));
            }
        }
        self.steps.push(Step { batch, kind, f, scoring, plan, target, ops });
        Ok(self.steps.len() - 1)
    }

    fn run_step(&mut self, i: usize) -> Result<()> {
        let ops = std::mem::take(&mut self.steps[i].ops);
        let r = self.exec.backend_mut().run_cached(i as u64, &ops);
        self.steps[i].ops = ops;
        r
    }

    fn write_hyper(&mut self) -> Result<()> {
        let lr = self.scheduler.lr();
        let mom = self.scheduler.momentum().unwrap_or(self.config.optimizer.momentum() as f64);
        self.last_lr = lr;
        self.exec.backend_mut().write(self.hyper, &[lr as f32, mom as f32])
    }

    /// Queues one training step on a batch (up to the configured batch size; a smaller last
    /// batch trains on exactly its own samples) without waiting for it or reading anything
    /// back. With gradient accumulation over k batches, every k-th call updates the weights.
    pub fn train_step<'a>(&mut self, inputs: &Tensor, targets: impl Into<Targets<'a>>) -> Result<()> {
        let targets = targets.into();
        let n = self.check_inputs(inputs)?;
        if n > self.config.batch_size {
            return Err(Error::shape("inputs", format!("at most batch_size = {} samples", self.config.batch_size), n));
        }
        let classification = self.config.problem == Problem::Classification;
        let (f, scoring, tv) = self.config.loss.prepare(targets, n, &self.out_shape, classification, 1)?;
        if let Optimizer::Lbfgs { max_iter, history_size, tolerance_grad, tolerance_change } = self.config.optimizer {
            let cfg = LbfgsConfig {
                lr: self.scheduler.lr(),
                max_iter,
                history_size,
                tolerance_grad: tolerance_grad as f64,
                tolerance_change: tolerance_change as f64,
            };
            return self.lbfgs_step(cfg, inputs, f, scoring, &tv);
        }
        let stepping = self.micro + 1 == self.config.grad_accumulation;
        let kind = if stepping { StepKind::Update } else { StepKind::Accumulate };
        let i = self.step_index(n, kind, f, scoring)?;
        let (plan, target) = (self.steps[i].plan, self.steps[i].target);
        self.exec.set_input(plan, inputs.data())?;
        let tlen = tv.len();
        let full = self.exec.backend().len(target);
        if tlen == full {
            self.exec.backend_mut().write(target, &tv)?;
        } else {
            // Class-index targets use the first n values of a buffer sized for value targets.
            let mut padded = tv;
            padded.resize(full, 0.0);
            self.exec.backend_mut().write(target, &padded)?;
        }
        if stepping {
            self.write_hyper()?;
        }
        self.run_step(i)?;
        if stepping {
            self.micro = 0;
            self.opt_steps += 1;
            if self.config.schedule_unit == ScheduleUnit::Batch {
                let metric = if self.scheduler.needs_metric() { Some(self.step_metric(n)?) } else { None };
                self.scheduler.step(metric)?;
            }
        } else {
            self.micro += 1;
        }
        Ok(())
    }

    /// The last step's loss for a plateau schedule: averaged over a data-parallel group, so
    /// every rank's schedule takes the same decision.
    fn step_metric(&mut self, n: usize) -> Result<f64> {
        let mut loss = [self.last_step_result(n)?.loss];
        if self.dist.is_some() {
            self.comm()?.all_reduce_mean(&mut loss)?;
        }
        Ok(loss[0] as f64)
    }

    /// One training step, returning the batch's loss and accuracy (this waits for the step).
    /// For L-BFGS, the loss and accuracy are those of the step's first evaluation, as PyTorch's
    /// `step(closure)` returns.
    pub fn train_batch<'a>(&mut self, inputs: &Tensor, targets: impl Into<Targets<'a>>) -> Result<StepResult> {
        self.train_step(inputs, targets)?;
        match self.lbfgs_first.take() {
            Some(r) => Ok(r),
            None => self.last_step_result(inputs.shape()[0]),
        }
    }

    fn last_step_result(&mut self, n: usize) -> Result<StepResult> {
        let s = self.exec.backend_mut().read(self.train_stats)?;
        let scored = self.scored_per_batch(n);
        let accuracy =
            (self.config.problem == Problem::Classification && scored > 0).then(|| s[stats::CORRECT] / scored as f32);
        Ok(StepResult { loss: s[stats::LOSS], accuracy })
    }

    fn scored_per_batch(&self, n: usize) -> usize {
        use super::loss::Loss;
        match self.config.loss {
            Loss::BinaryCrossEntropy | Loss::BinaryCrossEntropyWithLogits => {
                n * self.out_shape.iter().product::<usize>()
            }
            _ => n,
        }
    }

    fn lbfgs_step(&mut self, cfg: LbfgsConfig, inputs: &Tensor, f: LossFn, scoring: Scoring, tv: &[f32]) -> Result<()> {
        let n = inputs.shape()[0];
        let i = self.step_index(n, StepKind::Accumulate, f, scoring)?;
        let (plan, target) = (self.steps[i].plan, self.steps[i].target);
        self.exec.set_input(plan, inputs.data())?;
        let mut padded = tv.to_vec();
        padded.resize(self.exec.backend().len(target), 0.0);
        self.exec.backend_mut().write(target, &padded)?;
        let specs: Vec<(String, usize)> =
            self.exec.model().params().iter().filter(|p| p.trainable).map(|p| (p.name.clone(), p.len())).collect();
        let mut flat = Vec::new();
        for (name, _) in &specs {
            flat.extend(self.exec.read_param(name)?);
        }
        let mut state = std::mem::take(&mut self.lbfgs);
        let mut first: Option<StepResult> = None;
        let result = lbfgs::step(cfg, &mut state, &mut flat, |p| {
            let mut off = 0;
            for (name, len) in &specs {
                self.exec.write_param(name, &p[off..off + len])?;
                off += len;
            }
            self.run_step(i)?;
            let r = self.last_step_result(n)?;
            first.get_or_insert(r);
            let loss = r.loss as f64;
            let mut g = Vec::with_capacity(p.len());
            for (name, _) in &specs {
                g.extend(self.exec.read_param_grad(name)?);
            }
            Ok((loss, g))
        });
        self.lbfgs = state;
        result?;
        self.lbfgs_first = first;
        let mut off = 0;
        for (name, len) in &specs {
            self.exec.write_param(name, &flat[off..off + len])?;
            off += len;
        }
        self.last_lr = cfg.lr;
        self.opt_steps += 1;
        if self.config.schedule_unit == ScheduleUnit::Batch {
            let metric = if self.scheduler.needs_metric() { Some(self.last_step_result(n)?.loss as f64) } else { None };
            self.scheduler.step(metric)?;
        }
        Ok(())
    }

    /// Reads and clears the training figures summed since the last call (one device read). In
    /// data-parallel training they are summed over the group, so every rank must call this.
    pub fn take_epoch_metrics(&mut self) -> Result<Metrics> {
        let m = self.read_metrics(self.train_stats, self.dist.is_some())?;
        self.exec.backend_mut().write(self.train_stats, &[0.0; stats::LEN])?;
        Ok(m)
    }

    /// The metrics summed in `buf`; with `combine`, summed over the data-parallel group.
    fn read_metrics(&mut self, buf: BufId, combine: bool) -> Result<Metrics> {
        let mut s = self.exec.backend_mut().read(buf)?;
        if combine {
            self.comm()?.all_reduce_sum(&mut s[stats::SUM_LOSS..])?;
        }
        let samples = s[stats::SUM_SAMPLES];
        let scored = s[stats::SUM_SCORED];
        let classification = self.config.problem == Problem::Classification;
        let argmax = matches!(
            self.config.loss,
            super::loss::Loss::SparseCrossEntropy
                | super::loss::Loss::CrossEntropy { .. }
                | super::loss::Loss::CategoricalCrossEntropy
        );
        Ok(Metrics {
            loss: if samples > 0.0 { s[stats::SUM_LOSS] / samples } else { 0.0 },
            accuracy: (classification && scored > 0.0).then(|| s[stats::SUM_CORRECT] / scored),
            top_k_accuracy: (classification && argmax && scored > 0.0).then(|| s[stats::SUM_CORRECT_K] / scored),
            top_k: self.config.top_k,
            samples: samples as usize,
        })
    }

    /// Ends an epoch outside `fit`: advances a per-epoch schedule (`metric` feeds plateau
    /// detection) and counts the epoch.
    pub fn end_epoch(&mut self, metric: Option<f64>) -> Result<()> {
        if self.config.schedule_unit == ScheduleUnit::Epoch {
            self.scheduler.step(metric)?;
        }
        self.epoch += 1;
        self.batch_in_epoch = 0;
        Ok(())
    }

    /// Runs `inputs` through the model in evaluation mode (no dropout, batch norm on running
    /// statistics) and returns the raw outputs (logits for the logit losses).
    pub fn predict(&mut self, inputs: &Tensor) -> Result<Tensor> {
        self.predict_with(inputs, Mode::Eval)
    }

    /// As [`Trainer::predict`], in the given mode (training mode applies dropout and batch
    /// statistics, and updates running statistics).
    pub fn predict_with(&mut self, inputs: &Tensor, mode: Mode) -> Result<Tensor> {
        let n = self.check_inputs(inputs)?;
        let per_in: usize = inputs.len() / n;
        let c: usize = self.out_shape.iter().product();
        let mut out = Vec::with_capacity(n * c);
        for start in (0..n).step_by(self.config.batch_size) {
            let b = self.config.batch_size.min(n - start);
            let plan = self.exec.plan(b, mode, PlanOptions::default())?;
            self.exec.set_input(plan, &inputs.data()[start * per_in..(start + b) * per_in])?;
            self.exec.forward(plan)?;
            out.extend(self.exec.read_output(plan)?);
        }
        let mut shape = vec![n];
        shape.extend_from_slice(&self.out_shape);
        Tensor::new(&shape, out)
    }

    /// Predictions as probabilities: a softmax over classes for the cross-entropy losses, a
    /// sigmoid for logits under binary cross-entropy, the outputs unchanged otherwise.
    pub fn predict_proba(&mut self, inputs: &Tensor) -> Result<Tensor> {
        use super::loss::Loss;
        let mut out = self.predict(inputs)?;
        let c: usize = self.out_shape.iter().product();
        match self.config.loss {
            Loss::SparseCrossEntropy | Loss::CrossEntropy { .. } => {
                for row in out.data_mut().chunks_mut(c) {
                    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let s: f32 = row.iter().map(|v| (v - m).exp()).sum();
                    row.iter_mut().for_each(|v| *v = (*v - m).exp() / s);
                }
            }
            Loss::BinaryCrossEntropyWithLogits => {
                out.data_mut().iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp()))
            }
            _ => {}
        }
        Ok(out)
    }

    /// Loss and accuracy over `inputs` and `targets` in evaluation mode, in batches of the
    /// configured size.
    pub fn evaluate_tensors<'a>(&mut self, inputs: &Tensor, targets: impl Into<Targets<'a>>) -> Result<Metrics> {
        let targets = targets.into();
        let n = self.check_inputs(inputs)?;
        if targets.len() != n {
            return Err(Error::shape("targets", format!("{n} samples"), targets.len()));
        }
        self.exec.backend_mut().write(self.eval_stats, &[0.0; stats::LEN])?;
        let per_in = inputs.len() / n;
        for start in (0..n).step_by(self.config.batch_size) {
            let b = self.config.batch_size.min(n - start);
            let x = Tensor::new(
                &self.batch_shape(inputs, b),
                inputs.data()[start * per_in..(start + b) * per_in].to_vec(),
            )?;
            match targets {
                Targets::Classes(c) => self.eval_batch(&x, Targets::Classes(&c[start..start + b]))?,
                Targets::Values(t) => {
                    let per_t = t.len() / n;
                    let mut shape = t.shape().to_vec();
                    shape[0] = b;
                    let tb = Tensor::new(&shape, t.data()[start * per_t..(start + b) * per_t].to_vec())?;
                    self.eval_batch(&x, Targets::Values(&tb))?
                }
            }
        }
        self.read_metrics(self.eval_stats, false)
    }

    fn batch_shape(&self, inputs: &Tensor, b: usize) -> Vec<usize> {
        let mut s = inputs.shape().to_vec();
        s[0] = b;
        s
    }

    /// Queues the evaluation of one batch, adding to the evaluation sums.
    fn eval_batch(&mut self, inputs: &Tensor, targets: Targets) -> Result<()> {
        let n = inputs.shape()[0];
        let classification = self.config.problem == Problem::Classification;
        let (f, scoring, tv) =
            self.config.loss.prepare(targets, n, &self.out_shape, classification, self.config.top_k)?;
        let i = self.step_index(n, StepKind::Eval, f, scoring)?;
        let (plan, target) = (self.steps[i].plan, self.steps[i].target);
        self.exec.set_input(plan, inputs.data())?;
        let mut padded = tv;
        padded.resize(self.exec.backend().len(target), 0.0);
        self.exec.backend_mut().write(target, &padded)?;
        self.run_step(i)
    }

    /// Loss and accuracy over one pass of a loader, in evaluation mode. In data-parallel
    /// training, a loader sharded over the group (`.shard(rank, world)`) gives the metrics of
    /// the whole dataset, summed over the ranks (every rank must then call this); any other
    /// loader gives this rank's own.
    pub fn evaluate(&mut self, data: &DataLoader) -> Result<Metrics> {
        self.exec.backend_mut().write(self.eval_stats, &[0.0; stats::LEN])?;
        for batch in data.epoch(0) {
            let batch = batch?;
            self.eval_batch(&batch.inputs, Targets::Classes(&batch.labels))?;
            data.recycle(batch);
        }
        let combine = self.dist.as_ref().is_some_and(|d| d.world > 1 && data.shard() == (d.rank, d.world));
        self.read_metrics(self.eval_stats, combine)
    }

    /// Data-parallel `fit`: the loader must be this rank's shard, and every rank must have the
    /// same number of batches per epoch (else one would wait for the others at an all-reduce
    /// that never comes).
    fn check_shards(&mut self, train: &DataLoader) -> Result<()> {
        let Some(d) = &self.dist else { return Ok(()) };
        let (rank, world) = (d.rank, d.world);
        if world > 1 && train.shard() != (rank, world) {
            let (r, w) = train.shard();
            return Err(Error::config(
                "train loader",
                format!(
                    "rank {rank} of {world} trains on shard {r} of {w}: build the loader with \
                     .shard(trainer.rank(), trainer.world_size()) so each sample is seen once per epoch"
                ),
            ));
        }
        if world == 1 {
            return Ok(());
        }
        let len = train.len() as f64;
        let mut v = [len, len * len];
        self.comm()?.all_reduce_sum_f64(&mut v)?;
        // Equal counts on every rank exactly when world * sum(len^2) == sum(len)^2.
        if world as f64 * v[1] != v[0] * v[0] {
            return Err(Error::config(
                "train loader",
                format!(
                    "the ranks have different numbers of batches per epoch (this rank {len}, {} on average): \
                     build the loader with drop_last(true)",
                    v[0] / world as f64
                ),
            ));
        }
        Ok(())
    }

    /// Trains for `epochs` epochs in total (continuing from the epochs already done), evaluating
    /// on `val` after each, and returns the history.
    pub fn fit(&mut self, train: &DataLoader, val: Option<&DataLoader>, epochs: usize) -> Result<History> {
        self.fit_with(train, val, epochs, &mut [])
    }

    /// As [`Trainer::fit`], calling `callbacks` after every batch and every epoch; any of them can
    /// stop training. Stopped after a batch, the epoch stays open: a later `fit` (or one on a
    /// trainer resumed from a checkpoint taken then) continues it from the next batch.
    pub fn fit_with(
        &mut self,
        train: &DataLoader,
        val: Option<&DataLoader>,
        epochs: usize,
        callbacks: &mut [&mut dyn Callback],
    ) -> Result<History> {
        let first = self.history.epochs.len();
        self.check_shards(train)?;
        if self.batch_in_epoch == 0 {
            // Mid-epoch (resumed), the sums of the batches already done belong to this epoch.
            self.take_epoch_metrics()?;
        }
        while self.epoch < epochs {
            let t0 = Instant::now();
            let mut stop = false;
            for batch in train.epoch_from(self.epoch as u64, self.batch_in_epoch) {
                let batch = batch?;
                self.train_step(&batch.inputs, &batch.labels)?;
                train.recycle(batch);
                self.batch_in_epoch += 1;
                for cb in callbacks.iter_mut() {
                    stop |= cb.on_batch_end(self)? == Control::Stop;
                }
                if stop {
                    break;
                }
            }
            if stop {
                break;
            }
            let train_m = self.take_epoch_metrics()?;
            let val_m = match val {
                Some(v) => Some(self.evaluate(v)?),
                None => None,
            };
            let lr = self.last_lr;
            let metric = Some(val_m.map(|m| m.loss).unwrap_or(train_m.loss) as f64);
            self.end_epoch(metric)?;
            let log =
                EpochLog { epoch: self.epoch, train: train_m, val: val_m, lr, seconds: t0.elapsed().as_secs_f64() };
            self.history.epochs.push(log.clone());
            for cb in callbacks.iter_mut() {
                stop |= cb.on_epoch_end(&log) == Control::Stop;
                stop |= cb.on_epoch_end_with_trainer(self, &log)? == Control::Stop;
            }
            if stop {
                break;
            }
        }
        Ok(History { epochs: self.history.epochs[first..].to_vec() })
    }
}
