//! What a compiled plan is: the step description it was compiled from, its buffers by role and
//! its op lists. Pure data: nothing here touches a device (see `exec/compile.rs` for how a plan
//! is made and [`super::Executor`] for how it runs).

use std::fmt;

use crate::backend::{BufId, DType, Op};

/// Training or evaluation (defined with the layers' lowering, [`crate::model::lower`]).
pub use crate::model::Mode;

/// Options of a training plan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PlanOptions {
    /// Also compute the gradient with respect to the model input.
    pub input_grad: bool,
    /// Add parameter gradients to what the gradient buffers hold instead of overwriting them
    /// (gradient accumulation over several batches).
    pub accumulate_param_grads: bool,
}

/// What a buffer holds (for memory accounting and debugging).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BufRole {
    /// A parameter's value (weights, biases, running statistics); shared by all plans.
    Parameter,
    /// A gradient: of a parameter (shared by all plans) or of an activation (per plan, reused
    /// by lifetime).
    Gradient,
    /// Optimizer state (moments, accumulators); shared by all plans.
    OptimizerState,
    /// A layer's output.
    Activation,
    /// Saved by forward for backward (mask, argmax, batch statistics).
    Saved,
    /// Scratch an op needs only while it runs (a clipping norm).
    Workspace,
    /// What the caller writes before a step: the model input and the loss targets.
    Input,
    /// Small buffers of scalars: hyperparameters, loss and metric sums.
    Scalar,
}

impl BufRole {
    /// Every role, in the order memory reports list them.
    pub const ALL: [BufRole; 8] = [
        BufRole::Parameter,
        BufRole::Gradient,
        BufRole::OptimizerState,
        BufRole::Activation,
        BufRole::Saved,
        BufRole::Workspace,
        BufRole::Input,
        BufRole::Scalar,
    ];

    /// The role's name in memory reports.
    pub fn name(self) -> &'static str {
        match self {
            BufRole::Parameter => "parameters",
            BufRole::Gradient => "gradients",
            BufRole::OptimizerState => "optimizer state",
            BufRole::Activation => "activations",
            BufRole::Saved => "saved for backward",
            BufRole::Workspace => "workspace",
            BufRole::Input => "inputs",
            BufRole::Scalar => "scalars",
        }
    }
}

/// One buffer a plan uses.
#[derive(Clone, Debug)]
pub struct PlannedBuffer {
    /// The device buffer (after allocation; a virtual id while compiling).
    pub id: BufId,
    /// Length in elements.
    pub len: usize,
    /// Element type: what it is allocated with and what its bytes are counted from.
    pub dtype: DType,
    /// What it holds.
    pub role: BufRole,
    /// Layer or purpose, for reports.
    pub label: String,
}

impl PlannedBuffer {
    /// Bytes it takes: its length times its dtype's size.
    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }
}

/// The device buffers of one parameter, shared by every plan of an executor.
#[derive(Clone, Copy, Debug)]
pub struct ParamBuffers {
    /// The value.
    pub value: BufId,
    /// Gradient buffer, for trainable parameters.
    pub grad: Option<BufId>,
}

/// A compiled model for one step description: forward and backward of the network, and the
/// whole step's op list when the description has a loss.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Samples per batch.
    pub batch: usize,
    /// Training or evaluation.
    pub mode: Mode,
    /// Gradient options.
    pub options: PlanOptions,
    /// The network's forward ops.
    pub forward: Vec<Op>,
    /// The network's backward ops (empty in evaluation mode).
    pub backward: Vec<Op>,
    /// For each op of `forward`, the index of the model node (layer) it was lowered from.
    pub forward_nodes: Vec<usize>,
    /// For each op of `backward`, the index of the model node (layer) whose backward it is.
    pub backward_nodes: Vec<usize>,
    /// The model input.
    pub input: BufId,
    /// The model output.
    pub output: BufId,
    /// Where the caller (the loss) writes the gradient of the output, in training mode.
    pub output_grad: Option<BufId>,
    /// The gradient of the input, when requested.
    pub input_grad: Option<BufId>,
    /// Output buffer of each node.
    pub node_outputs: Vec<BufId>,
    /// A step plan's whole op list (forward, loss, backward, all-reduces, clipping, update);
    /// empty for a plan of the network alone.
    pub step: Vec<Op>,
    /// A step plan's target buffer.
    pub target: Option<BufId>,
    /// The buffers this plan owns (parameters, their gradients and optimizer state belong to
    /// the executor and are shared by its plans).
    pub buffers: Vec<PlannedBuffer>,
}

impl Plan {
    /// Bytes of the buffers this plan owns (not counting parameters), each from its dtype.
    pub fn bytes(&self) -> usize {
        self.buffers.iter().map(PlannedBuffer::bytes).sum()
    }
    /// Bytes of the plan's own buffers of one role.
    pub fn bytes_of(&self, role: BufRole) -> usize {
        self.buffers.iter().filter(|b| b.role == role).map(PlannedBuffer::bytes).sum()
    }
}

/// Device memory by role, as [`super::Executor::memory`] reports it before a plan's first step.
/// `Display` prints one line per role in MiB with the dtypes of its buffers (llm.c style).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemoryReport {
    /// What the report is about (the plan's batch and mode).
    pub title: String,
    /// Bytes per role, in the order of [`BufRole::ALL`] (roles with no buffer included, as 0).
    pub bytes: Vec<(BufRole, usize)>,
    /// The dtypes of each role's buffers, in the order of [`BufRole::ALL`] (first seen first;
    /// empty for a role with no buffer).
    pub dtypes: Vec<(BufRole, Vec<DType>)>,
}

impl MemoryReport {
    /// The report of `buffers`, given as `(role, dtype, length in elements)`.
    pub fn new(title: String, buffers: impl Iterator<Item = (BufRole, DType, usize)>) -> MemoryReport {
        let mut bytes: Vec<(BufRole, usize)> = BufRole::ALL.iter().map(|&r| (r, 0)).collect();
        let mut dtypes: Vec<(BufRole, Vec<DType>)> = BufRole::ALL.iter().map(|&r| (r, Vec::new())).collect();
        for (role, dtype, len) in buffers {
            let k = BufRole::ALL.iter().position(|&r| r == role).expect("every role is listed");
            bytes[k].1 += len * dtype.size();
            if !dtypes[k].1.contains(&dtype) {
                dtypes[k].1.push(dtype);
            }
        }
        MemoryReport { title, bytes, dtypes }
    }
    /// Bytes of one role.
    pub fn of(&self, role: BufRole) -> usize {
        self.bytes.iter().filter(|b| b.0 == role).map(|b| b.1).sum()
    }
    /// Bytes in all.
    pub fn total(&self) -> usize {
        self.bytes.iter().map(|b| b.1).sum()
    }
}

impl fmt::Display for MemoryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
        writeln!(f, "{}", self.title)?;
        for (&(role, b), (_, dtypes)) in self.bytes.iter().zip(&self.dtypes) {
            let dtypes: Vec<&str> = dtypes.iter().map(|d| d.name()).collect();
            let dtypes = if dtypes.is_empty() { String::new() } else { format!("  {}", dtypes.join(", ")) };
            writeln!(f, "  {:<20}{:>10.2} MiB{dtypes}", role.name(), mib(b))?;
        }
        write!(f, "  {:<20}{:>10.2} MiB", "total", mib(self.total()))
    }
}
