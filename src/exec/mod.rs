//! Execution: a model's parameters placed on a backend once, plans compiled from a model and a
//! step description (see [`plan`]; the network alone with [`Executor::plan`], the whole training
//! step with [`Executor::step_plan`]), allocated once, and the calls that run them. The engine as
//! a whole (rooms, plan, compiling, memory) is described in `src/exec/README.md`.
//!
//! ```
//! use kiln::backend::cpu::CpuBackend;
//! use kiln::exec::{Executor, Mode};
//! use kiln::model::ModelBuilder;
//! use kiln::tensor::Tensor;
//!
//! let model = ModelBuilder::new(&[2, 4]).dense(3).relu().dense(2).build().unwrap();
//! let mut exec = Executor::new(&model, CpuBackend::<f32>::new(Some(1)).unwrap()).unwrap();
//! let x = Tensor::new(&[2, 4], vec![0.5; 8]).unwrap();
//! let y = exec.predict(&x, Mode::Eval).unwrap();
//! assert_eq!(y.shape(), &[2, 2]);
//! ```

mod autocast;
mod checkpoint;
mod compile;
mod fuse;
pub mod plan;
mod profile;
mod scaler;
mod step;

/// The vocabulary of a step description: loss functions, scoring and update rules are the
/// backend's op descriptors, named here so that the training API needs nothing of the backend.
pub use crate::backend::{LossFn, OptRule, Scoring};
pub use compile::Lowering;
pub use plan::{BufRole, MemoryReport, Mode, ParamBuffers, Plan, PlanOptions, PlannedBuffer};
pub use profile::{LayerProfile, Profile};
pub use scaler::{GradScaler, ScalerState};
pub use step::{Clip, Figures, GuardState, OptimizerSnapshot, Parallel, Precision, SUMS_LEN, StepDesc, Sums};

/// A backend chosen at run time ([`crate::backend::Device::open`]).
pub type AnyBackend = Box<dyn Backend>;

use crate::backend::{Backend, BufId, CounterId};
use crate::model::{Layer, Model};
use crate::tensor::Tensor;
use crate::{Error, Result};
use step::Training;

/// Handle to a compiled plan of an [`Executor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PlanId(usize);

/// A model placed on a backend: parameter buffers allocated and filled once, plus the plans
/// compiled so far (each allocated once and reused on every call).
pub struct Executor<B: Backend> {
    backend: B,
    model: Model,
    params: Vec<ParamBuffers>,
    counters: Vec<Option<CounterId>>,
    /// The seed of dropout masks (the model's own unless set).
    dropout_seed: u64,
    /// What each plan was compiled for (the plan cache's keys, and so the CUDA graph cache's).
    keys: Vec<Key>,
    plans: Vec<Plan>,
    /// What training steps share (optimizer state, metric sums), once set up.
    training: Option<Training>,
    /// Plans fuse batch norm with the activation after it (`exec/fuse.rs`).
    fuse: bool,
}

/// What a plan was compiled from.
#[derive(Clone, Debug, PartialEq)]
enum Key {
    /// The network alone (forward, and backward in training).
    Network(Lowering),
    /// A whole step.
    Step(StepDesc),
}

/// Whether a new executor's plans fuse batch norm with the activation after it (`exec/fuse.rs`):
/// `KILN_FUSION=0` off, `KILN_FUSION=1` on, else the backend's default
/// ([`Backend::fuses_norm_activation`]); [`Executor::set_fusion`] decides afterwards.
fn fusion_default<B: Backend + ?Sized>(backend: &B) -> bool {
    match std::env::var("KILN_FUSION").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => backend.fuses_norm_activation(),
    }
}

/// `KILN_DEBUG=1`: print each plan's memory when it is compiled.
fn debug() -> bool {
    static DEBUG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var("KILN_DEBUG").is_ok_and(|v| v == "1"))
}

impl<B: Backend> Executor<B> {
    /// Allocates and uploads the model's parameters on `backend`.
    pub fn new(model: &Model, mut backend: B) -> Result<Self> {
        let mut params = Vec::with_capacity(model.params().len());
        for (spec, value) in model.params().iter().zip(model.param_values()) {
            let v = backend.alloc(spec.len(), crate::backend::DType::F32)?;
            backend.write(v, value)?;
            let grad = if spec.trainable { Some(backend.alloc(spec.len(), crate::backend::DType::F32)?) } else { None };
            params.push(ParamBuffers { value: v, grad });
        }
        let mut counters = Vec::with_capacity(model.nodes().len());
        for node in model.nodes() {
            counters.push(match node.layer {
                Layer::Dropout { .. } => Some(backend.new_counter()?),
                _ => None,
            });
        }
        let fuse = fusion_default(&backend);
        Ok(Executor {
            backend,
            model: model.clone(),
            params,
            counters,
            dropout_seed: model.seed(),
            keys: Vec::new(),
            plans: Vec::new(),
            training: None,
            fuse,
        })
    }

    /// Whether plans compiled from now on fuse batch norm with the activation after it
    /// (`exec/fuse.rs`; by default as `KILN_FUSION` or the backend says: on for the CPU and
    /// wgpu, off for CUDA until its fused kernels have run on a GPU): the same values (bit for
    /// bit on the CPU), passes over memory and launches fewer. Set it before the first plan:
    /// afterwards it is an error (plans already compiled would not follow it).
    pub fn set_fusion(&mut self, on: bool) -> Result<()> {
        if !self.plans.is_empty() && on != self.fuse {
            return Err(Error::State("Executor::set_fusion must be called before the first plan is compiled".into()));
        }
        self.fuse = on;
        Ok(())
    }

    /// As [`Executor::new`], with dropout masks drawn from `seed` instead of the model's seed.
    pub fn with_seed(model: &Model, backend: B, seed: u64) -> Result<Self> {
        let mut e = Self::new(model, backend)?;
        e.dropout_seed = seed;
        Ok(e)
    }

    /// The plan for `batch` samples in `mode`, compiled and allocated on first request.
    pub fn plan(&mut self, batch: usize, mode: Mode, options: PlanOptions) -> Result<PlanId> {
        let options = if mode == Mode::Eval { PlanOptions::default() } else { options };
        self.compile(Lowering { options, ..self.lowering(batch, mode) })
    }

    /// What [`Executor::plan`] compiles for `batch` and `mode` by default: this executor's
    /// dropout seed, rank 0, local batch norm updating its running statistics.
    pub fn lowering(&self, batch: usize, mode: Mode) -> Lowering {
        Lowering {
            batch,
            mode,
            options: PlanOptions::default(),
            dropout_seed: self.dropout_seed,
            rank: 0,
            sync_batch_norm: false,
            update_running_stats: true,
            precision: Precision::F32,
            fuse: self.fuse,
        }
    }

    /// The plan of the network alone for `low` (see [`Lowering`]), compiled and allocated on
    /// first request.
    pub fn plan_for(&mut self, low: Lowering) -> Result<PlanId> {
        let low = if low.mode == Mode::Eval { Lowering { options: PlanOptions::default(), ..low } } else { low };
        self.compile(low)
    }

    /// The plan for `low`, compiled and allocated on first request: planned over virtual
    /// buffers, its memory checked against what the device has free, then allocated once.
    fn compile(&mut self, low: Lowering) -> Result<PlanId> {
        if let Some(i) = self.keys.iter().position(|k| *k == Key::Network(low)) {
            return Ok(PlanId(i));
        }
        self.check_precision(low.precision)?;
        let mut table = compile::Table::default();
        let mut p = compile::network(&self.model, &self.params, &self.counters, &low, &mut table)?;
        let needed: u64 = table.buffers.iter().map(|b| b.bytes() as u64).sum();
        let oom = |free: u64| Error::OutOfMemory {
            model: format!(
                "the {}-layer model ({} parameters)",
                self.model.nodes().len() - 1,
                self.model.param_count()
            ),
            batch: low.batch,
            needed,
            free,
        };
        // Refuse a plan larger than what the device has free before allocating anything.
        if let Some(free) = self.backend.available_memory()
            && needed > free
        {
            return Err(oom(free));
        }
        let mut ids: Vec<&mut BufId> = vec![&mut p.input, &mut p.output];
        ids.extend(p.output_grad.as_mut());
        ids.extend(p.input_grad.as_mut());
        ids.extend(p.node_outputs.iter_mut());
        match compile::allocate(&mut self.backend, &mut table, &mut [&mut p.forward, &mut p.backward], &mut ids) {
            Ok(()) => {}
            Err(Error::OutOfMemory { free, .. }) => return Err(oom(free)),
            Err(e) => return Err(e),
        }
        p.buffers = table.buffers;
        Ok(self.add_plan(Key::Network(low), p))
    }

    fn add_plan(&mut self, key: Key, plan: Plan) -> PlanId {
        self.plans.push(plan);
        self.keys.push(key);
        let id = PlanId(self.plans.len() - 1);
        if debug() {
            eprintln!("[kiln] {}", self.memory(id));
        }
        id
    }

    /// The device memory a plan uses, by role: the executor's parameters and gradients (shared
    /// by all its plans) and the plan's own buffers. `KILN_DEBUG=1` prints it when a plan is
    /// compiled, before its first step.
    pub fn memory(&self, id: PlanId) -> MemoryReport {
        let p = &self.plans[id.0];
        let mode = match p.mode {
            Mode::Train => "training",
            Mode::Eval => "evaluation",
        };
        let shared = self.model.params().iter().zip(&self.params).flat_map(|(s, b)| {
            let grad = b.grad.map(|g| (BufRole::Gradient, self.backend.dtype(g), s.len()));
            std::iter::once((BufRole::Parameter, self.backend.dtype(b.value), s.len())).chain(grad)
        });
        let own = p.buffers.iter().map(|b| (b.role, b.dtype, b.len));
        let training = match (&self.keys[id.0], &self.training) {
            (Key::Step(_), Some(t)) => t.buffers(),
            _ => Vec::new(),
        };
        let what = if p.step.is_empty() { "network" } else { "step" };
        MemoryReport::new(
            format!("plan {} ({what}): {mode}, batch {}", id.0, p.batch),
            shared.chain(training).chain(own),
        )
    }

    /// The compiled plan behind a handle.
    pub fn plan_info(&self, id: PlanId) -> &Plan {
        &self.plans[id.0]
    }

    /// Copies a batch into the plan's input buffer.
    pub fn set_input(&mut self, id: PlanId, data: &[f32]) -> Result<()> {
        let p = &self.plans[id.0];
        let expected = p.batch * self.model.nodes()[0].shape.iter().product::<usize>();
        if data.len() != expected {
            return Err(Error::shape(
                "model input",
                format!("{expected} values ({} samples of {:?})", p.batch, self.model.nodes()[0].shape),
                data.len(),
            ));
        }
        self.backend.write(p.input, data)
    }

    /// Runs the forward kernels.
    pub fn forward(&mut self, id: PlanId) -> Result<()> {
        let ops = std::mem::take(&mut self.plans[id.0].forward);
        let r = self.backend.run(&ops);
        self.plans[id.0].forward = ops;
        r
    }

    /// Runs the forward kernels as one unit the backend may replay (a CUDA graph keyed by the
    /// plan): what predictions do.
    pub fn run_forward(&mut self, id: PlanId) -> Result<()> {
        let ops = std::mem::take(&mut self.plans[id.0].forward);
        let r = self.backend.run_cached(id.0 as u64, &ops);
        self.plans[id.0].forward = ops;
        r
    }

    /// Copies the output to the host.
    pub fn read_output(&mut self, id: PlanId) -> Result<Vec<f32>> {
        let out = self.plans[id.0].output;
        self.backend.read(out)
    }

    /// Sets the gradient of the loss with respect to the output (training plans).
    pub fn set_output_grad(&mut self, id: PlanId, grad: &[f32]) -> Result<()> {
        let p = &self.plans[id.0];
        let g = p.output_grad.ok_or_else(|| Error::State("this plan has no backward pass".into()))?;
        let expected = self.backend.len(g);
        if grad.len() != expected {
            return Err(Error::shape("output gradient", expected, grad.len()));
        }
        self.backend.write(g, grad)
    }

    /// Runs the backward kernels (training plans).
    pub fn backward(&mut self, id: PlanId) -> Result<()> {
        if self.plans[id.0].mode != Mode::Train {
            return Err(Error::State("backward needs a training plan".into()));
        }
        let ops = std::mem::take(&mut self.plans[id.0].backward);
        let r = self.backend.run(&ops);
        self.plans[id.0].backward = ops;
        r
    }

    /// The gradient with respect to the input (plans compiled with `input_grad`).
    pub fn read_input_grad(&mut self, id: PlanId) -> Result<Vec<f32>> {
        let g = self.plans[id.0]
            .input_grad
            .ok_or_else(|| Error::State("the plan was not compiled with input_grad".into()))?;
        self.backend.read(g)
    }

    fn param_index(&self, name: &str) -> Result<usize> {
        self.model
            .params()
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| Error::Param { name: name.into(), reason: "the model has no parameter of this name".into() })
    }

    /// The parameter buffers, in the order of `model().params()`.
    pub fn param_buffers(&self) -> &[ParamBuffers] {
        &self.params
    }

    /// Current value of a parameter.
    pub fn read_param(&mut self, name: &str) -> Result<Vec<f32>> {
        let i = self.param_index(name)?;
        self.backend.read(self.params[i].value)
    }

    /// Current gradient of a trainable parameter.
    pub fn read_param_grad(&mut self, name: &str) -> Result<Vec<f32>> {
        let i = self.param_index(name)?;
        let g = self.params[i].grad.ok_or_else(|| Error::Param {
            name: name.into(),
            reason: "is not trainable, so it has no gradient".into(),
        })?;
        self.backend.read(g)
    }

    /// Overwrites the gradient of a trainable parameter (restoring accumulated gradients).
    pub fn write_param_grad(&mut self, name: &str, value: &[f32]) -> Result<()> {
        let i = self.param_index(name)?;
        let g = self.params[i].grad.ok_or_else(|| Error::Param {
            name: name.into(),
            reason: "is not trainable, so it has no gradient".into(),
        })?;
        if value.len() != self.model.params()[i].len() {
            return Err(Error::Param {
                name: name.into(),
                reason: format!("expected {} gradient values, got {}", self.model.params()[i].len(), value.len()),
            });
        }
        self.backend.write(g, value)
    }

    /// Overwrites a parameter's value.
    pub fn write_param(&mut self, name: &str, value: &[f32]) -> Result<()> {
        let i = self.param_index(name)?;
        let spec = &self.model.params()[i];
        if value.len() != spec.len() {
            return Err(Error::Param {
                name: name.into(),
                reason: format!("expected {} values for shape {:?}, got {}", spec.len(), spec.shape, value.len()),
            });
        }
        self.backend.write(self.params[i].value, value)
    }

    /// Copies the current parameters back into the executor's model and returns it.
    pub fn sync_model(&mut self) -> Result<&Model> {
        for i in 0..self.params.len() {
            let v = self.backend.read(self.params[i].value)?;
            let name = self.model.params()[i].name.clone();
            self.model.set_param(&name, &v)?;
        }
        Ok(&self.model)
    }

    /// The model (its parameter values as of the last [`Executor::sync_model`]).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The dropout counter of node `i`, if it is a dropout layer.
    pub fn dropout_counter(&self, node: usize) -> Option<CounterId> {
        self.counters.get(node).copied().flatten()
    }

    /// Each dropout layer's name and how many masks it has drawn (checkpoints).
    pub fn dropout_steps(&mut self) -> Result<Vec<(String, u64)>> {
        let mut v = Vec::new();
        for (i, c) in self.counters.iter().enumerate() {
            if let Some(c) = *c {
                v.push((self.model.nodes()[i].name.clone(), self.backend.counter(c)?));
            }
        }
        Ok(v)
    }

    /// Restores [`Executor::dropout_steps`], in the same order.
    pub fn set_dropout_steps(&mut self, steps: &[(String, u64)]) -> Result<()> {
        let counters: Vec<CounterId> = self.counters.iter().flatten().copied().collect();
        for (c, (_, value)) in counters.into_iter().zip(steps) {
            self.backend.set_counter(c, *value)?;
        }
        Ok(())
    }

    /// The backend in words (device, threads).
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Runs the model on a batch and returns its output (training mode applies dropout and
    /// batch statistics, and updates running statistics, as PyTorch's `model.train()` does).
    pub fn predict(&mut self, input: &Tensor, mode: Mode) -> Result<Tensor> {
        let per_sample = &self.model.nodes()[0].shape;
        if input.shape().len() != per_sample.len() + 1 || input.shape()[1..] != per_sample[..] {
            return Err(Error::shape(
                "model input",
                format!("[batch, {}]", per_sample.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
                format!("{:?}", input.shape()),
            ));
        }
        let batch = input.shape()[0];
        let id = self.plan(batch, mode, PlanOptions::default())?;
        self.set_input(id, input.data())?;
        self.run_forward(id)?;
        let mut shape = vec![batch];
        shape.extend_from_slice(&self.model.nodes().last().unwrap().shape);
        Tensor::new(&shape, self.read_output(id)?)
    }
}
