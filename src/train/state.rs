//! A trainer's whole state as host values, taken with [`Trainer::state`] and turned back into a
//! trainer with [`Trainer::from_state`]: what checkpoints (`crate::io`) write and read. A trainer
//! rebuilt from a state continues exactly where the original was (bit for bit on the CPU backend
//! with the same thread count).
//!
//! What is saved, and why that is enough:
//! - the weights and batch-norm running statistics are the model's ([`Trainer::model`]), not
//!   part of this state;
//! - [`TrainerMeta`] (serialisable): the resolved config, the schedule's state, epochs, optimizer
//!   steps, batches done in the open epoch, micro-batches of a gradient accumulation in progress,
//!   the metric history, the optimizer's step counter, each dropout layer's execution counter
//!   (a dropout mask is a pure function of the model seed, the layer and that counter), and
//!   with loss scaling the scaler's scale, good-step count and skipped count;
//! - tensors: the optimizer's moments per parameter, its scalar state (NAdam's momentum
//!   product), gradients summed so far by an unfinished accumulation, the open epoch's metric
//!   sums, and L-BFGS's history;
//! - nothing for the data: the loader's order and augmentation are functions of (loader seed,
//!   epoch, sample index), and `batches_in_epoch` says where a resumed `fit` picks up
//!   ([`crate::data::DataLoader::epoch_from`]).
//!
//! [`TrainerState::check`] validates a state against a model without a device, so a state read
//! from an untrusted file is checked before anything is allocated from it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::config::MAX_THREADS;
use super::config::opt_rule;
use super::config::{Optimizer, TrainerConfig};
use super::lbfgs::LbfgsState;
use super::metrics::History;
use super::schedule::Scheduler;
use super::trainer::Trainer;
use crate::exec::{OptimizerSnapshot, SUMS_LEN, ScalerState, Sums};
use crate::model::{Layer, Model};
use crate::{Error, Result};

/// Largest step or epoch count a state may hold: far beyond any real run, small enough that no
/// schedule arithmetic on it can overflow.
const MAX_COUNT: u64 = 1 << 48;

/// The scalar part of a trainer's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerMeta {
    /// The resolved configuration the trainer was made with.
    pub config: TrainerConfig,
    /// The learning-rate schedule's position and plateau state.
    pub scheduler: Scheduler,
    /// Epochs completed (by `fit`, or closed with `end_epoch`).
    pub epochs_done: usize,
    /// Batches of the open epoch that `fit` has trained on.
    pub batches_in_epoch: usize,
    /// Optimizer steps taken (L-BFGS: `step(closure)` calls).
    pub steps_taken: u64,
    /// Micro-batches since the last optimizer step (gradient accumulation).
    pub micro_batches: usize,
    /// Learning rate of the last step (reported in the next epoch log).
    pub last_lr: f64,
    /// The logs of the epochs done so far.
    pub history: History,
    /// The optimizer's step counter on the device (bias corrections use it).
    pub optimizer_step: u64,
    /// Each dropout layer's name and execution counter, in model order.
    pub dropout_steps: Vec<(String, u64)>,
    /// L-BFGS iterations so far (the `n_iter` of PyTorch's state).
    pub lbfgs_iterations: usize,
    /// L-BFGS loss and gradient evaluations so far (the `func_evals` of PyTorch's state).
    pub lbfgs_evaluations: usize,
    /// The loss scaler's state, when the config scales the loss
    /// ([`TrainerConfig::grad_scaler`]); absent from states written before loss scaling.
    #[serde(default)]
    pub scaler: Option<ScalerState>,
}

/// One state tensor's values.
#[derive(Clone, Debug, PartialEq)]
pub enum StateTensor {
    /// Values kept in f32 (optimizer moments, accumulated gradients, metric sums).
    F32(Vec<f32>),
    /// L-BFGS keeps some scalars in f64.
    F64(Vec<f64>),
}

impl StateTensor {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            StateTensor::F32(v) => v.len(),
            StateTensor::F64(v) => v.len(),
        }
    }

    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn all_finite(&self) -> bool {
        match self {
            StateTensor::F32(v) => v.iter().all(|x| x.is_finite()),
            StateTensor::F64(v) => v.iter().all(|x| x.is_finite()),
        }
    }
}

/// Everything but the weights that a trainer needs to continue exactly; see the module docs.
///
/// Tensor names: `optimizer.{k}.{param}` (the k-th state tensor of a trainable parameter:
/// SGD's momentum buffer; Adam's first and second moments, then AMSGrad's maximum; ...),
/// `optimizer.scalars`, `grad.{param}` (only mid-accumulation), `train_sums`, and for L-BFGS
/// `lbfgs.d`, `lbfgs.prev_flat_grad`, `lbfgs.old_dirs.{i}`, `lbfgs.old_stps.{i}`, `lbfgs.ro` and
/// `lbfgs.scalars` (`t`, `h_diag`, `prev_loss`).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainerState {
    /// Counters, configuration, scheduler and history (serialised as JSON in checkpoints).
    pub meta: TrainerMeta,
    /// The state tensors by the names above.
    pub tensors: BTreeMap<String, StateTensor>,
}

/// What a state tensor must look like: its type and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    F32(usize),
    F64(usize),
}

fn bad(reason: impl Into<String>) -> Error {
    Error::State(format!("trainer state: {}", reason.into()))
}

impl TrainerState {
    /// Training-mode batches the trainer has run: what PyTorch counts in a batch-norm layer's
    /// `num_batches_tracked` over the same training (one per micro-batch; for L-BFGS, one per
    /// function evaluation). Batches run with `predict_with(.., Mode::Train)` are not counted.
    pub fn batches_trained(&self) -> u64 {
        let m = &self.meta;
        match m.config.optimizer {
            Optimizer::Lbfgs { .. } => m.lbfgs_evaluations as u64,
            _ => m.steps_taken.saturating_mul(m.config.grad_accumulation as u64).saturating_add(m.micro_batches as u64),
        }
    }

    /// The tensors a state for `model` under `config` must have, by name.
    fn expected(&self, model: &Model) -> Result<BTreeMap<String, Kind>> {
        let m = &self.meta;
        let mut want = BTreeMap::new();
        let trainable: Vec<_> = model.params().iter().filter(|p| p.trainable).collect();
        want.insert("train_sums".to_string(), Kind::F32(SUMS_LEN));
        if let Some(rule) = opt_rule(&m.config.optimizer) {
            for p in &trainable {
                for k in 0..rule.state_tensors() {
                    want.insert(format!("optimizer.{k}.{}", p.name), Kind::F32(p.len()));
                }
            }
            want.insert("optimizer.scalars".into(), Kind::F32(1));
        } else {
            // Before its first iteration L-BFGS has no direction and no previous gradient; after
            // it, both (its step reads the previous gradient unconditionally).
            let n: usize = trainable.iter().map(|p| p.len()).sum();
            let started = m.lbfgs_iterations > 0;
            want.insert("lbfgs.d".into(), Kind::F32(if started { n } else { 0 }));
            if started {
                want.insert("lbfgs.prev_flat_grad".into(), Kind::F32(n));
            }
            let h = self.tensors.get("lbfgs.ro").map(|t| t.len()).unwrap_or(0);
            if let Optimizer::Lbfgs { history_size, .. } = m.config.optimizer
                && h > history_size
            {
                return Err(bad(format!("L-BFGS holds {h} history pairs, more than history_size = {history_size}")));
            }
            want.insert("lbfgs.ro".into(), Kind::F64(h));
            for i in 0..h {
                want.insert(format!("lbfgs.old_dirs.{i}"), Kind::F32(n));
                want.insert(format!("lbfgs.old_stps.{i}"), Kind::F32(n));
            }
            want.insert("lbfgs.scalars".into(), Kind::F64(3));
        }
        if m.micro_batches > 0 {
            for p in &trainable {
                want.insert(format!("grad.{}", p.name), Kind::F32(p.len()));
            }
        }
        Ok(want)
    }

    /// Checks that the state fits `model` (the model it was taken with, weights aside), without
    /// touching a device: a valid config, a schedule that is the config's, counts in range, one
    /// counter per dropout layer, every tensor present with the right type and length, nothing
    /// unknown, and finite values. Every problem with the tensors is listed, not just the first.
    pub fn check(&self, model: &Model) -> Result<()> {
        let m = &self.meta;
        m.config.validate().map_err(|e| bad(format!("invalid config: {e}")))?;
        if let Some(t) = m.config.threads
            && t > MAX_THREADS
        {
            return Err(bad(format!("asks for {t} CPU threads (at most {MAX_THREADS})")));
        }
        m.config.loss.check_output(&model.nodes().last().map(|n| n.shape.clone()).unwrap_or_default())?;
        let s = &m.scheduler;
        if s.base_lr != m.config.learning_rate || s.schedule != m.config.schedule || s.warmup != m.config.warmup {
            return Err(bad("the schedule state does not belong to the config's schedule"));
        }
        if !(s.plateau_lr.is_finite() && s.plateau_lr >= 0.0 && m.last_lr.is_finite()) {
            return Err(bad("a learning rate in the state is not finite"));
        }
        let counts = [
            s.count as u64,
            s.bad_steps as u64,
            s.cooldown_left as u64,
            m.epochs_done as u64,
            m.batches_in_epoch as u64,
            m.steps_taken,
            m.optimizer_step,
            m.lbfgs_iterations as u64,
            m.lbfgs_evaluations as u64,
        ];
        if counts.iter().any(|&c| c > MAX_COUNT) || m.dropout_steps.iter().any(|(_, c)| *c > MAX_COUNT) {
            return Err(bad(format!("a step or epoch count exceeds {MAX_COUNT}")));
        }
        match (m.config.grad_scaler(), &m.scaler) {
            (Some(_), Some(s)) => s.validate("trainer state: scaler").map_err(|e| bad(e.to_string()))?,
            (None, None) => {}
            (Some(_), None) => return Err(bad("the config scales the loss but the state has no scaler state")),
            (None, Some(_)) => return Err(bad("the state has a scaler state but the config does not scale the loss")),
        }
        if m.micro_batches >= m.config.grad_accumulation {
            return Err(bad(format!(
                "{} micro-batches pending with grad_accumulation = {}",
                m.micro_batches, m.config.grad_accumulation
            )));
        }
        let dropouts: Vec<&str> = model
            .nodes()
            .iter()
            .filter(|n| matches!(n.layer, Layer::Dropout { .. }))
            .map(|n| n.name.as_str())
            .collect();
        let saved: Vec<&str> = m.dropout_steps.iter().map(|(n, _)| n.as_str()).collect();
        if dropouts != saved {
            return Err(bad(format!(
                "dropout counters for layers {saved:?}, but the model's dropout layers are {dropouts:?}"
            )));
        }
        let want = self.expected(model)?;
        let mut problems = Vec::new();
        for (name, kind) in &want {
            let Some(t) = self.tensors.get(name) else {
                problems.push(format!("missing {name}"));
                continue;
            };
            let (got, n) = match (t, kind) {
                (StateTensor::F32(v), Kind::F32(n)) => (v.len(), *n),
                (StateTensor::F64(v), Kind::F64(n)) => (v.len(), *n),
                (StateTensor::F32(_), Kind::F64(_)) => {
                    problems.push(format!("{name} must be F64"));
                    continue;
                }
                (StateTensor::F64(_), Kind::F32(_)) => {
                    problems.push(format!("{name} must be F32"));
                    continue;
                }
            };
            if got != n {
                problems.push(format!("{name} has {got} values, expected {n}"));
            } else if !t.all_finite() {
                problems.push(format!("{name} has non-finite values"));
            }
        }
        for name in self.tensors.keys().filter(|n| !want.contains_key(*n)) {
            problems.push(format!("unexpected {name}"));
        }
        if !problems.is_empty() {
            return Err(bad(problems.join("; ")));
        }
        for log in &m.history.epochs {
            let finite = log.train.loss.is_finite() && log.val.is_none_or(|v| v.loss.is_finite());
            if !finite {
                return Err(bad(format!("epoch {} of the history has a non-finite loss", log.epoch)));
            }
        }
        Ok(())
    }
}

impl Trainer {
    /// Batches of the open epoch that `fit` has trained on (0 between epochs).
    pub fn batches_done_in_epoch(&self) -> usize {
        self.batch_in_epoch
    }

    /// Takes the trainer's state (waiting for queued work). With the model's weights
    /// ([`Trainer::model`]) it is everything [`Trainer::from_state`] needs.
    pub fn state(&mut self) -> Result<TrainerState> {
        let lbfgs = opt_rule(&self.config.optimizer).is_none();
        let specs = self.exec.model().params().to_vec();
        let mut tensors = BTreeMap::new();
        let mut optimizer_step = 0;
        if let Some(snap) = self.exec.optimizer_state()? {
            let trainable = specs.iter().filter(|p| p.trainable);
            for (spec, state) in trainable.zip(snap.tensors) {
                for (k, v) in state.into_iter().enumerate() {
                    tensors.insert(format!("optimizer.{k}.{}", spec.name), StateTensor::F32(v));
                }
            }
            tensors.insert("optimizer.scalars".into(), StateTensor::F32(snap.scalars));
            optimizer_step = snap.step;
        }
        if self.micro > 0 {
            for spec in specs.iter().filter(|p| p.trainable) {
                tensors.insert(format!("grad.{}", spec.name), StateTensor::F32(self.exec.read_param_grad(&spec.name)?));
            }
        }
        tensors.insert("train_sums".into(), StateTensor::F32(self.exec.sums(Sums::Train)?));
        if lbfgs {
            let l = &self.lbfgs;
            tensors.insert("lbfgs.d".into(), StateTensor::F32(l.d.clone()));
            if let Some(g) = &l.prev_flat_grad {
                tensors.insert("lbfgs.prev_flat_grad".into(), StateTensor::F32(g.clone()));
            }
            for (i, (dir, stp)) in l.old_dirs.iter().zip(&l.old_stps).enumerate() {
                tensors.insert(format!("lbfgs.old_dirs.{i}"), StateTensor::F32(dir.clone()));
                tensors.insert(format!("lbfgs.old_stps.{i}"), StateTensor::F32(stp.clone()));
            }
            tensors.insert("lbfgs.ro".into(), StateTensor::F64(l.ro.iter().copied().collect()));
            tensors.insert("lbfgs.scalars".into(), StateTensor::F64(vec![l.t, l.h_diag, l.prev_loss]));
        }
        let dropout_steps = self.exec.dropout_steps()?;
        let scaler = self.scaler_state()?;
        let meta = TrainerMeta {
            config: self.config.clone(),
            scheduler: self.scheduler.clone(),
            epochs_done: self.epoch,
            batches_in_epoch: self.batch_in_epoch,
            steps_taken: self.opt_steps,
            micro_batches: self.micro,
            last_lr: self.last_lr,
            history: self.history.clone(),
            optimizer_step,
            dropout_steps,
            lbfgs_iterations: self.lbfgs.n_iter,
            lbfgs_evaluations: self.lbfgs.func_evals,
            scaler,
        };
        Ok(TrainerState { meta, tensors })
    }

    /// A trainer for `model` (whose weights are the ones saved with the state) that continues
    /// from `state`. The state is checked first ([`TrainerState::check`]).
    pub fn from_state(model: &Model, state: TrainerState) -> Result<Trainer> {
        state.check(model)?;
        let TrainerState { meta, mut tensors } = state;
        let mut t = Trainer::new(model, meta.config)?;
        let mut f32s = |name: &str| match tensors.remove(name) {
            Some(StateTensor::F32(v)) => Ok(v),
            _ => Err(bad(format!("{name} is missing or not F32"))),
        };
        let specs: Vec<_> = model.params().to_vec();
        if let Some(rule) = opt_rule(&t.config.optimizer) {
            let mut snap = OptimizerSnapshot { tensors: Vec::new(), scalars: Vec::new(), step: meta.optimizer_step };
            let k = rule.state_tensors();
            for spec in specs.iter().filter(|p| p.trainable) {
                snap.tensors
                    .push((0..k).map(|k| f32s(&format!("optimizer.{k}.{}", spec.name))).collect::<Result<_>>()?);
            }
            snap.scalars = f32s("optimizer.scalars")?;
            t.exec.set_optimizer_state(&snap)?;
        }
        if meta.micro_batches > 0 {
            for spec in specs.iter().filter(|p| p.trainable) {
                let v = f32s(&format!("grad.{}", spec.name))?;
                t.exec.write_param_grad(&spec.name, &v)?;
            }
        }
        let sums = f32s("train_sums")?;
        t.exec.set_sums(Sums::Train, Some(&sums))?;
        if opt_rule(&t.config.optimizer).is_none() {
            let d = f32s("lbfgs.d")?;
            let prev_flat_grad = match tensors.remove("lbfgs.prev_flat_grad") {
                Some(StateTensor::F32(v)) => Some(v),
                _ => None,
            };
            let (ro, scalars) = match (tensors.remove("lbfgs.ro"), tensors.remove("lbfgs.scalars")) {
                (Some(StateTensor::F64(ro)), Some(StateTensor::F64(s))) => (ro, s),
                _ => return Err(bad("lbfgs.ro and lbfgs.scalars must be F64")),
            };
            let mut l = LbfgsState {
                d,
                t: scalars[0],
                h_diag: scalars[1],
                prev_loss: scalars[2],
                prev_flat_grad,
                n_iter: meta.lbfgs_iterations,
                func_evals: meta.lbfgs_evaluations,
                ..Default::default()
            };
            for i in 0..ro.len() {
                let mut f32s = |name: String| match tensors.remove(&name) {
                    Some(StateTensor::F32(v)) => Ok(v),
                    _ => Err(bad(format!("{name} is missing or not F32"))),
                };
                l.old_dirs.push_back(f32s(format!("lbfgs.old_dirs.{i}"))?);
                l.old_stps.push_back(f32s(format!("lbfgs.old_stps.{i}"))?);
            }
            l.ro = ro.into();
            t.lbfgs = l;
        }
        t.exec.set_dropout_steps(&meta.dropout_steps)?;
        if let Some(s) = meta.scaler {
            t.exec.set_scaler_state(s)?;
        }
        t.scheduler = meta.scheduler;
        t.epoch = meta.epochs_done;
        t.batch_in_epoch = meta.batches_in_epoch;
        t.opt_steps = meta.steps_taken;
        t.micro = meta.micro_batches;
        t.last_lr = meta.last_lr;
        t.history = meta.history;
        Ok(t)
    }
}
