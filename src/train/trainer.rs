//! The trainer: the training loop around plans that [`crate::exec`] compiles ([`Trainer`]).

use super::config::{GradClip, NonFinite, Optimizer, Problem, ScheduleUnit, TrainerConfig, opt_rule};
use super::lbfgs::{LbfgsConfig, LbfgsState};
use super::loss::{BatchTargets, Loss, Targets};
use super::metrics::{History, StepResult};
use super::schedule::Scheduler;
use crate::dist::{Communicator, DataParallel, DistEnv, TcpCommunicator};
use crate::exec::{AnyBackend, Clip, Executor, LossFn, Mode, Parallel, PlanId, Scoring};
use crate::exec::{Precision, StepDesc, Sums};
use crate::model::Model;
use crate::tensor::Tensor;
use crate::{Error, Result};

/// What a training step does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StepKind {
    /// Forward, loss, backward: gradients accumulate, no update.
    Accumulate,
    /// As `Accumulate`, first zeroing the gradients (the first batch of an accumulation).
    AccumulateFirst,
    /// Forward, loss, backward, clipping, update.
    Update,
    /// Forward (evaluation mode) and loss only.
    Eval,
    /// Forward, loss (into the evaluation sums) and backward from zeroed gradients, no update.
    Gradients,
}

/// This trainer's place in a data-parallel group.
pub(super) struct DistState {
    pub(super) rank: usize,
    pub(super) world: usize,
    options: DataParallel,
}

/// The trainer: the training loop around plans that [`crate::exec`] compiles. It turns the
/// user's configuration into step descriptions ([`StepDesc`]), feeds batches, advances the
/// learning-rate schedule and keeps the counts; the executor compiles each step (forward, loss,
/// backward, clipping, update) into one op list and runs it.
///
/// ```
/// use kiln::model::ModelBuilder;
/// use kiln::tensor::Tensor;
/// use kiln::train::{Trainer, TrainerConfig};
///
/// let model = ModelBuilder::new(&[4, 3]).dense(8).relu().dense(2).build().unwrap();
/// let mut trainer = Trainer::new(&model, TrainerConfig { batch_size: 4, ..Default::default() }).unwrap();
/// let x = Tensor::new(&[4, 3], vec![0.1; 12]).unwrap();
/// let r = trainer.train_batch(&x, &[0u32, 1, 0, 1]).unwrap();
/// assert!(r.loss > 0.0 && r.accuracy.is_some());
/// ```
///
/// Nothing is read back from the device unless asked: [`Trainer::train_step`] queues a step and
/// returns; [`Trainer::train_batch`] also reads the step's loss and accuracy. Every step adds its
/// figures to device-side sums, which [`Trainer::take_epoch_metrics`] reads once per epoch.
///
/// [`TrainerConfig::seed`] seeds the dropout masks and the order (and augmentation) in which
/// `fit` walks its loader; the weights come from the model's own seed.
///
/// Data-parallel training ([`TrainerConfig::data_parallel`], [`Trainer::with_communicator`]):
/// each process is one rank of a group and trains on its shard of every batch; the parameters
/// start as rank 0's, each update step all-reduces (averages) the gradients bucket by bucket
/// during backward (see [`crate::dist`]), and the epoch metrics are summed over the ranks. The
/// loss that [`Trainer::train_batch`] returns is this rank's own.
// Fields read and restored by `state.rs` (checkpoints) and used by the loop's other files are
// `pub(super)`.
pub struct Trainer {
    pub(super) exec: Executor<AnyBackend>,
    pub(super) config: TrainerConfig,
    pub(super) out_shape: Vec<usize>,
    pub(super) lbfgs: LbfgsState,
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
    pub(super) lbfgs_first: Option<StepResult>,
    /// Set when training data-parallel.
    pub(super) dist: Option<DistState>,
    /// The plan of the last training step (its output is read to explain a non-finite loss).
    pub(super) last_plan: Option<PlanId>,
}

/// The configured device, opened through [`crate::backend::Device`] (the local rank's GPU in
/// data-parallel training); `Auto`'s fallback notice is printed once per process.
fn open_device(config: &TrainerConfig, local_rank: Option<usize>) -> Result<AnyBackend> {
    let gpu = match (local_rank, &config.data_parallel) {
        (Some(l), Some(dp)) => Some(dp.device_for(l)?),
        _ => None,
    };
    let tf32 = config.tf32 || config.precision == Precision::Tf32;
    let (backend, notice) = config.device.open_for_training(config.threads, tf32, config.deterministic, gpu)?;
    if let Some(n) = notice {
        // One Once for the whole process, shared with `Device::open`.
        crate::backend::print_notice_once(&n);
    }
    Ok(backend)
}

/// Says once per process that [`Precision::Tf32`] computes in f32 on `device` (a backend
/// without TF32: the CPU, wgpu), as PyTorch's TF32 flags do nothing there.
fn print_tf32_notice(device: &str) {
    static NOTICE: std::sync::Once = std::sync::Once::new();
    NOTICE.call_once(|| {
        eprintln!("kiln: precision tf32 is a mode of NVIDIA tensor cores; {device} computes in f32 (the same results as Precision::F32)")
    });
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
    /// ([`crate::backend::Backend::set_communicator`]) and the parameters are set to rank 0's.
    /// Every rank of the group must make its trainer from the same model and config.
    /// [`Trainer::new`] does this with the group of the environment; this is for groups made
    /// otherwise (threads, tests).
    pub fn with_communicator(
        model: &Model,
        mut config: TrainerConfig,
        backend: AnyBackend,
        comm: Box<dyn Communicator>,
    ) -> Result<Trainer> {
        let options = config.data_parallel.get_or_insert_with(DataParallel::default).clone();
        config.validate()?;
        let (rank, world) = (comm.rank(), comm.world());
        let mut t = Self::with_backend(model, config, backend)?;
        t.exec.join_group(comm)?;
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

    /// Sets every parameter (running statistics included) to rank 0's, as DDP does at start.
    fn broadcast_parameters(&mut self) -> Result<()> {
        let specs: Vec<(String, usize)> =
            self.exec.model().params().iter().map(|p| (p.name.clone(), p.len())).collect();
        let mut flat = Vec::new();
        for (name, _) in &specs {
            flat.extend(self.exec.read_param(name)?);
        }
        self.exec.communicator()?.broadcast(&mut flat, 0)?;
        let mut off = 0;
        for (name, len) in &specs {
            self.exec.write_param(name, &flat[off..off + len])?;
            off += len;
        }
        Ok(())
    }

    /// As [`Trainer::new`], on a backend the caller made (ignoring `config.device`, `threads`
    /// and `tf32`), for example a [`crate::backend::CudaBackend`] with options of its own
    /// ([`Precision::Tf32`] then needs one made with TF32 on: an error naming `precision`
    /// otherwise).
    pub fn with_backend(model: &Model, config: TrainerConfig, backend: AnyBackend) -> Result<Trainer> {
        config.validate()?;
        let out_shape = model.nodes().last().expect("a built model has layers").shape.clone();
        config.loss.check_output(&out_shape)?;
        let mut exec = Executor::with_seed(model, backend, config.seed)?;
        exec.check_precision(config.precision)?;
        let initial = match config.optimizer {
            Optimizer::Adagrad { initial_accumulator_value, .. } => initial_accumulator_value,
            _ => 0.0,
        };
        exec.init_training(opt_rule(&config.optimizer), initial)?;
        if let Some(s) = config.grad_scaler() {
            exec.set_scaler_state(s.initial_state())?;
        }
        if config.precision == Precision::Tf32 && exec.backend().tf32().is_none() {
            print_tf32_notice(&exec.describe());
        }
        let scheduler = Scheduler::new(config.learning_rate, config.schedule.clone(), config.warmup);
        Ok(Trainer {
            exec,
            config,
            out_shape,
            lbfgs: LbfgsState::default(),
            scheduler,
            micro: 0,
            opt_steps: 0,
            epoch: 0,
            batch_in_epoch: 0,
            history: History::default(),
            last_lr: 0.0,
            lbfgs_first: None,
            dist: None,
            last_plan: None,
        })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }

    /// The device the trainer runs on, in words.
    pub fn device(&self) -> String {
        self.exec.describe()
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
    pub fn executor(&mut self) -> &mut Executor<AnyBackend> {
        &mut self.exec
    }

    pub(super) fn check_inputs(&self, inputs: &Tensor) -> Result<usize> {
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

    /// The plan of a step of `kind` on `batch` samples (compiled on first request).
    pub(super) fn step_plan(&mut self, batch: usize, kind: StepKind, loss: LossFn, scoring: Scoring) -> Result<PlanId> {
        let parallel = self.dist.as_ref().map(|d| Parallel {
            rank: d.rank,
            world: d.world,
            sync_batch_norm: d.options.sync_batch_norm,
            first_bucket_bytes: d.options.first_bucket_bytes,
            bucket_bytes: d.options.bucket_bytes,
        });
        let desc = StepDesc {
            batch,
            mode: if kind == StepKind::Eval { Mode::Eval } else { Mode::Train },
            loss,
            scoring,
            sums: if matches!(kind, StepKind::Eval | StepKind::Gradients) { Sums::Eval } else { Sums::Train },
            update: kind == StepKind::Update,
            zero_grads_first: matches!(kind, StepKind::AccumulateFirst | StepKind::Gradients),
            accumulation: if kind == StepKind::Gradients { 1 } else { self.config.grad_accumulation },
            clip: self.config.grad_clip.map(|c| match c {
                GradClip::Norm(n) => Clip::Norm(n),
                GradClip::Value(v) => Clip::Value(v),
            }),
            parallel,
            precision: self.config.precision,
            // Gradients asked for are the true ones: not scaled.
            loss_scaling: if kind == StepKind::Gradients { None } else { self.config.grad_scaler() },
            check_finite: match self.config.non_finite {
                NonFinite::Error => Some(true),
                NonFinite::Skip => Some(false),
                NonFinite::Ignore => None,
            },
        };
        self.exec.step_plan(&desc)
    }

    /// Feeds a step plan its batch.
    pub(super) fn feed(&mut self, plan: PlanId, inputs: &Tensor, targets: &BatchTargets) -> Result<()> {
        self.exec.set_input(plan, inputs.data())?;
        match targets {
            BatchTargets::Labels(l) => self.exec.set_labels(plan, l),
            BatchTargets::Values(v) => self.exec.set_target(plan, v),
        }
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
        let k = self.config.grad_accumulation;
        let stepping = self.micro + 1 == k;
        let kind = match (stepping, self.micro) {
            (true, _) => StepKind::Update,
            (false, 0) => StepKind::AccumulateFirst,
            (false, _) => StepKind::Accumulate,
        };
        let plan = self.step_plan(n, kind, f, scoring)?;
        self.last_plan = Some(plan);
        self.feed(plan, inputs, &tv)?;
        if stepping {
            let lr = self.scheduler.lr();
            let mom = self.scheduler.momentum().unwrap_or(self.config.optimizer.momentum() as f64);
            self.last_lr = lr;
            self.exec.set_hyper(lr, mom)?;
        }
        self.exec.run(plan)?;
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
            self.exec.communicator()?.all_reduce_mean(&mut loss)?;
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
            None => {
                self.report_non_finite()?;
                self.last_step_result(inputs.shape()[0])
            }
        }
    }

    pub(super) fn last_step_result(&mut self, n: usize) -> Result<StepResult> {
        let f = self.exec.figures(Sums::Train, false)?;
        let scored = self.scored_per_batch(n);
        let accuracy =
            (self.config.problem == Problem::Classification && scored > 0).then(|| f.correct / scored as f32);
        Ok(StepResult { loss: f.loss, accuracy })
    }

    fn scored_per_batch(&self, n: usize) -> usize {
        match self.config.loss {
            Loss::BinaryCrossEntropy | Loss::BinaryCrossEntropyWithLogits => {
                n * self.out_shape.iter().product::<usize>()
            }
            _ => n,
        }
    }

    /// Computes the gradients of the batch's mean loss with respect to every trainable
    /// parameter, without updating anything: no optimizer step, no step counted, the epoch's
    /// training figures untouched. Like a training step it runs in training mode (batch
    /// statistics, which update the running statistics, and dropout). Read the result with
    /// [`Trainer::grad`] or [`Trainer::gradients`]. Refused in the middle of a gradient
    /// accumulation, whose partial sums it would overwrite.
    pub fn compute_gradients<'a>(&mut self, inputs: &Tensor, targets: impl Into<Targets<'a>>) -> Result<StepResult> {
        if self.micro > 0 {
            return Err(Error::State(format!(
                "{} of {} accumulated batches are pending: computing gradients now would overwrite them",
                self.micro, self.config.grad_accumulation
            )));
        }
        let n = self.check_inputs(inputs)?;
        let classification = self.config.problem == Problem::Classification;
        let (f, scoring, tv) = self.config.loss.prepare(targets.into(), n, &self.out_shape, classification, 1)?;
        let plan = self.step_plan(n, StepKind::Gradients, f, scoring)?;
        self.feed(plan, inputs, &tv)?;
        self.exec.set_sums(Sums::Eval, None)?;
        self.exec.run(plan)?;
        let fig = self.exec.figures(Sums::Eval, false)?;
        let scored = self.scored_per_batch(n);
        let accuracy = (classification && scored > 0).then(|| fig.correct / scored as f32);
        Ok(StepResult { loss: fig.loss, accuracy })
    }

    /// The current gradient of a trainable parameter: after [`Trainer::compute_gradients`],
    /// that batch's; after a training step, the (clipped) gradient the update used; in the
    /// middle of a gradient accumulation, the sum so far (each batch's scaled by `1/k`).
    pub fn grad(&mut self, name: &str) -> Result<Vec<f32>> {
        self.exec.read_param_grad(name)
    }

    /// Every trainable parameter's gradient ([`Trainer::grad`]), by name, in model order.
    pub fn gradients(&mut self) -> Result<Vec<(String, Vec<f32>)>> {
        let names: Vec<String> =
            self.exec.model().params().iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
        names.into_iter().map(|n| self.exec.read_param_grad(&n).map(|g| (n, g))).collect()
    }
}
