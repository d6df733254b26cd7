//! Compiling: a model and a step description become a [`Plan`] over virtual buffers, then the
//! plan's buffers are allocated once.
//!
//! Planning never touches the device. Every buffer the plan owns is first a virtual id (an
//! index into the plan's buffer table, far above any real id); the op lists are written against
//! those; only when the whole plan is known is its memory added up, checked against what the
//! device has free, allocated in one pass and the ops rewritten to the real ids.
//!
//! Activations get a buffer each while planning (views such as flatten share their input's); in training, every
//! tensor whose gradient is needed gets a gradient buffer, and what backward needs from forward
//! gets a named buffer ([`crate::model::lower::Forward::save`]). Gradient buffers are reused by
//! lifetime: each is live from the op that first writes it to the op that last reads it, and a
//! buffer of the same length free over that span is taken instead of a new one. Gradients flowing
//! into one tensor from several consumers (a residual fork) are summed by letting the first
//! writer overwrite and the others accumulate, in the order backward runs. Activations are then
//! shared the same way over forward and backward (`share_activations`): those backward never reads
//! die within forward and lend their buffers to later ones.

use std::collections::HashSet;

use super::Precision;
use super::checkpoint::Segments;
use super::plan::{BufRole, Mode, ParamBuffers, Plan, PlanOptions, PlannedBuffer};
use crate::backend::ops::Access;
use crate::backend::{Backend, BufId, CounterId, DType, Op};
use crate::model::lower::{self, Backward, Buffers, Forward};
use crate::model::{Layer, Model};
use crate::rng::mix_seed;
use crate::{Error, Result};

/// Virtual ids of the plan's buffer table start here, far above any real id.
pub(super) const PLANNED: usize = usize::MAX / 2;
/// Virtual ids of gradients before they are given a (reused) table entry.
pub(super) const GRADIENT: usize = PLANNED + usize::MAX / 4;

/// Everything the network part of a plan depends on besides the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lowering {
    /// Samples per batch.
    pub batch: usize,
    /// Training or evaluation.
    pub mode: Mode,
    /// Gradient options (training).
    pub options: PlanOptions,
    /// The seed of the dropout masks (each dropout node draws from its own stream of it).
    pub dropout_seed: u64,
    /// This process's rank in a data-parallel group (0 alone): ranks above 0 draw their own
    /// dropout masks, rank 0 those of a lone run.
    pub rank: usize,
    /// Batch norm in training reduces its statistics over the data-parallel group.
    pub sync_batch_norm: bool,
    /// Batch norm in training updates its running statistics (off for a forward pass that
    /// must change nothing).
    pub update_running_stats: bool,
    /// Number format: with [`Precision::Bf16Mixed`], convolutions and matrix products run in
    /// bf16 between casts (see `exec/autocast.rs`).
    pub precision: Precision,
    /// Batch norm takes in the activation after it, forward and backward (`exec/fuse.rs`):
    /// the same values, one buffer and one pass over memory fewer each way.
    pub fuse: bool,
}

impl Lowering {
    /// The seed of dropout node `node`'s masks.
    pub fn dropout_seed_of(&self, node: usize) -> u64 {
        let seed = mix_seed(self.dropout_seed ^ 0xD80F_0A7E, node as u64);
        if self.rank > 0 { mix_seed(seed, self.rank as u64) } else { seed }
    }
}

/// The plan's buffer table while compiling.
#[derive(Default)]
pub(super) struct Table {
    pub(super) buffers: Vec<PlannedBuffer>,
}

impl Table {
    pub(super) fn new_buffer(&mut self, len: usize, dtype: DType, role: BufRole, label: String) -> BufId {
        let id = BufId(PLANNED + self.buffers.len());
        self.buffers.push(PlannedBuffer { id, len, dtype, role, label });
        id
    }
}

impl Buffers for Table {
    fn activation(&mut self, len: usize, dtype: DType, label: String) -> BufId {
        self.new_buffer(len, dtype, BufRole::Activation, label)
    }
    fn saved(&mut self, len: usize, dtype: DType, label: String) -> BufId {
        self.new_buffer(len, dtype, BufRole::Saved, label)
    }
}

/// The buffers of parameter `role` of node `i`.
pub(super) fn node_params(
    model: &Model,
    params: &[ParamBuffers],
    i: usize,
) -> Vec<(crate::model::ParamRole, ParamBuffers)> {
    model.params().iter().zip(params).filter(|(s, _)| s.node == i).map(|(s, p)| (s.role, *p)).collect()
}

/// Plans the network's forward (and, in training, backward) ops over virtual buffers.
pub(super) fn network(
    model: &Model,
    params: &[ParamBuffers],
    counters: &[Option<CounterId>],
    low: &Lowering,
    table: &mut Table,
) -> Result<Plan> {
    let batch = low.batch;
    if batch == 0 {
        return Err(Error::config("batch size", "must be at least 1"));
    }
    let largest = model.nodes().iter().map(|n| n.shape.iter().product::<usize>()).max().unwrap_or(1);
    if largest.checked_mul(batch).is_none_or(|n| n > 1 << 40) {
        return Err(Error::config("batch size", format!("{batch} makes tensors of more than 2^40 values")));
    }
    let nodes = model.nodes();
    let mut out: Vec<BufId> = Vec::with_capacity(nodes.len());
    let mut forward = Vec::new();
    let mut forward_nodes = Vec::new();
    // What backward needs from forward, per node.
    let mut saved: Vec<Vec<BufId>> = vec![Vec::new(); nodes.len()];
    // Checkpointed segments (training): their forward writes pooled buffers (exec/checkpoint.rs).
    let mut segments = Segments::new(model, params, counters, low);
    for (i, node) in nodes.iter().enumerate() {
        if let Layer::Input = node.layer {
            let len = batch * node.shape.iter().product::<usize>();
            out.push(table.new_buffer(len, DType::F32, BufRole::Input, "input".into()));
            continue;
        }
        let mut cx = Forward {
            node,
            in_shapes: node.inputs.iter().map(|&j| nodes[j].shape.as_slice()).collect(),
            batch,
            mode: low.mode,
            sync_batch_norm: low.sync_batch_norm,
            update_running_stats: low.update_running_stats,
            dropout: counters[i].map(|c| (low.dropout_seed_of(i), c)),
            recompute: false,
            inputs: node.inputs.iter().map(|&j| out[j]).collect(),
            params: node_params(model, params, i).into_iter().map(|(r, p)| (r, p.value)).collect(),
            bufs: segments.buffers(i, table),
            ops: &mut forward,
            output: None,
            saved: Vec::new(),
        };
        lower::forward(&mut cx)?;
        let y = cx.output.expect("a layer's lowering sets its output");
        saved[i] = cx.saved;
        segments.forward_done(i, y);
        out.push(y);
        forward_nodes.resize(forward.len(), i);
    }
    let mut plan = Plan {
        batch,
        mode: low.mode,
        options: low.options,
        forward,
        backward: Vec::new(),
        forward_nodes,
        backward_nodes: Vec::new(),
        input: out[0],
        output: *out.last().expect("a model has nodes"),
        output_grad: None,
        input_grad: None,
        node_outputs: out,
        step: Vec::new(),
        target: None,
        buffers: Vec::new(),
    };
    let mut grads = Vec::new();
    if low.mode == Mode::Train {
        grads = backward(model, params, low, &mut plan, &saved, &mut segments)?;
    }
    if low.fuse {
        super::fuse::batch_norm_act(&mut plan, table, &mut grads);
    }
    if let Some(half) = super::autocast::half_dtype(low.precision) {
        super::autocast::mixed(&mut plan, table, &mut grads, half);
    }
    assign_gradients(table, &mut plan, &grads);
    segments.assign(table, &mut plan);
    share_activations(table, &mut plan);
    Ok(plan)
}

/// Buffer reuse by lifetime, the one rule of every pool a plan has (activation gradients,
/// checkpointed segments, activations): items are visited in order of first use (`first[i]`,
/// an op index; `usize::MAX` for an item no op names), and one that may share (`shares(i)`)
/// takes the buffer of the first earlier holder with the same `key` whose last use
/// (`last`) came strictly before its first; any other item holds a buffer of its own, which
/// only sharing items after it can take. Returns the visiting order (every item) and each
/// item's holder (itself when it holds a buffer).
pub(super) fn lifetime_holders<K: PartialEq>(
    first: &[usize],
    last: &[usize],
    key: impl Fn(usize) -> K,
    shares: impl Fn(usize) -> bool,
) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..first.len()).collect();
    order.sort_by_key(|&i| first[i]);
    let mut holder: Vec<usize> = (0..first.len()).collect();
    // (holding item, free after op index)
    let mut pool: Vec<(usize, usize)> = Vec::new();
    for &i in &order {
        if first[i] == usize::MAX || !shares(i) {
            continue;
        }
        let k = key(i);
        match pool.iter_mut().find(|slot| key(slot.0) == k && slot.1 < first[i]) {
            Some(slot) => {
                holder[i] = slot.0;
                slot.1 = last[i];
            }
            None => pool.push((i, last[i])),
        }
    }
    (order, holder)
}

/// Lets activations share storage by lifetime, as [`assign_gradients`] does for gradients: an
/// activation is live from the op that first writes it to the op that last reads it, over
/// forward then backward (in training, most are read again by backward and live that long;
/// the others, such as the output of a batch norm that only a ReLU reads, die within forward),
/// and one whose whole life comes after another's of the same length and dtype takes that
/// buffer. Only buffers whose first use overwrites all of them share (never one read before it
/// is written, which would see the previous holder's values instead of zeros), and never the
/// plan's input and output, which the caller writes and reads around the op lists. The table
/// loses the merged entries and the plan's ids are renumbered.
fn share_activations(table: &mut Table, plan: &mut Plan) {
    let n = table.buffers.len();
    let index = |b: BufId| b.0.checked_sub(PLANNED).filter(|&i| i < n);
    let mut first = vec![usize::MAX; n];
    let mut last = vec![0usize; n];
    let mut shares: Vec<bool> = table.buffers.iter().map(|b| b.role == BufRole::Activation).collect();
    for b in [Some(plan.input), Some(plan.output), plan.output_grad, plan.input_grad].into_iter().flatten() {
        if let Some(i) = index(b) {
            shares[i] = false;
        }
    }
    for (k, op) in plan.forward.iter().chain(&plan.backward).enumerate() {
        op.each_buffer(&mut |u| {
            let Some(i) = index(u.buf) else { return };
            if (first[i] == usize::MAX || first[i] == k) && (u.access != Access::Write || u.len < table.buffers[i].len)
            {
                shares[i] = false;
            }
            first[i] = first[i].min(k);
            last[i] = last[i].max(k);
        });
    }
    let key = |i: usize| (table.buffers[i].len, table.buffers[i].dtype);
    let (_, holder) = lifetime_holders(&first, &last, key, |i| shares[i]);
    if holder.iter().enumerate().all(|(i, &h)| i == h) {
        return;
    }
    // Renumber: the kept entries in their order; a merged one takes its holder's new id.
    let mut new_index = vec![usize::MAX; n];
    let mut merged = vec![0usize; n];
    let mut kept = Vec::with_capacity(n);
    for (i, b) in std::mem::take(&mut table.buffers).into_iter().enumerate() {
        if holder[i] == i {
            new_index[i] = kept.len();
            kept.push(b);
        } else {
            merged[holder[i]] += 1;
        }
    }
    for (i, b) in kept.iter_mut().enumerate() {
        b.id = BufId(PLANNED + i);
    }
    for (i, &m) in merged.iter().enumerate() {
        if m > 0 {
            let b = &mut kept[new_index[i]];
            b.label = format!("{} (and {m} more by turns)", b.label);
        }
    }
    table.buffers = kept;
    let mut map = |b: &mut BufId| {
        if let Some(i) = index(*b) {
            *b = BufId(PLANNED + new_index[holder[i]]);
        }
    };
    for op in plan.forward.iter_mut().chain(plan.backward.iter_mut()) {
        op.visit_bufs(&mut map);
    }
    map(&mut plan.input);
    map(&mut plan.output);
    plan.output_grad.iter_mut().for_each(&mut map);
    plan.input_grad.iter_mut().for_each(&mut map);
    plan.node_outputs.iter_mut().for_each(&mut map);
}

/// An activation gradient of a training plan before it has a table entry: virtual id
/// `GRADIENT + i` is the `i`-th of [`backward`]'s list.
pub(super) struct VirtualGrad {
    /// Values.
    pub(super) len: usize,
    /// The table label (`<node>.grad`).
    pub(super) label: String,
    /// The activation (a forward buffer) it is the gradient of.
    pub(super) of: BufId,
    /// Its dtype: the activation's (f32, unless mixed precision keeps that activation in half).
    pub(super) dtype: DType,
}

/// Plans the backward ops over virtual gradient ids (`GRADIENT + i`, the returned list), which
/// [`assign_gradients`] then gives table entries.
fn backward(
    model: &Model,
    params: &[ParamBuffers],
    low: &Lowering,
    plan: &mut Plan,
    saved: &[Vec<BufId>],
    segments: &mut Segments,
) -> Result<Vec<VirtualGrad>> {
    let nodes = model.nodes();
    let batch = plan.batch;
    let numel = |i: usize| batch * nodes[i].shape.iter().product::<usize>();
    let out = &plan.node_outputs;

    // A node needs the gradient of its output if it has trainable parameters or one of its
    // inputs needs a gradient.
    let mut needs = vec![false; nodes.len()];
    needs[0] = low.options.input_grad;
    for i in 1..nodes.len() {
        let has_params = model.params().iter().any(|p| p.node == i && p.trainable);
        needs[i] = has_params || nodes[i].inputs.iter().any(|&j| needs[j]);
    }
    // The ops are written against gradient ids first; each is given a table entry once the
    // lifetimes are known.
    let mut grad: Vec<Option<BufId>> = vec![None; nodes.len()];
    let mut virtual_grads: Vec<VirtualGrad> = Vec::new();
    for i in 0..nodes.len() {
        if !needs[i] {
            continue;
        }
        grad[i] = Some(if lower::is_view(&nodes[i].layer) {
            grad[nodes[i].inputs[0]].expect("view input needs grad")
        } else {
            let label = format!("{}.grad", nodes[i].name);
            virtual_grads.push(VirtualGrad { len: numel(i), label, of: out[i], dtype: DType::F32 });
            BufId(GRADIENT + virtual_grads.len() - 1)
        });
    }
    let last = nodes.len() - 1;
    let Some(dout) = grad[last] else {
        // Nothing to differentiate (no parameters, no input gradient).
        return Ok(Vec::new());
    };
    plan.output_grad = Some(dout);
    plan.input_grad = grad[0];

    let mut written: HashSet<BufId> = HashSet::from([dout]);
    let mut ops = Vec::new();
    let mut owners = Vec::new();
    for i in (1..nodes.len()).rev() {
        let Some(dy) = grad[i] else { continue };
        let node = &nodes[i];
        // Recomputed values inside a checkpointed segment (its forward is re-emitted first).
        let operands = segments.operands(i, out, saved, &mut ops, &mut owners)?;
        let mut cx = Backward {
            node,
            in_shapes: node.inputs.iter().map(|&j| nodes[j].shape.as_slice()).collect(),
            batch,
            sync_batch_norm: low.sync_batch_norm,
            inputs: operands.inputs,
            output: operands.output,
            dy,
            saved: &operands.saved,
            input_grads: node.inputs.iter().map(|&j| grad[j]).collect(),
            written: &mut written,
            params: node_params(model, params, i).into_iter().map(|(r, p)| (r, p.value, p.grad)).collect(),
            accumulate_param_grads: low.options.accumulate_param_grads,
            ops: &mut ops,
        };
        lower::backward(&mut cx)?;
        owners.resize(ops.len(), i);
    }
    plan.backward = ops;
    plan.backward_nodes = owners;
    Ok(virtual_grads)
}

/// Gives the virtual gradients of `plan`'s backward (`grads`, from [`backward`]) table entries
/// by lifetime over the backward ops: the output gradient is written before backward starts (by
/// the loss) and the input gradient is read after it ends; a buffer of the same length and
/// dtype free over a gradient's whole span is reused. A gradient no op names (fused away by
/// `exec/fuse.rs`) gets none.
fn assign_gradients(table: &mut Table, plan: &mut Plan, grads: &[VirtualGrad]) {
    if grads.is_empty() {
        return;
    }
    let ops = &mut plan.backward;
    let n_virtual = grads.len();
    let mut first = vec![usize::MAX; n_virtual];
    let mut last = vec![0usize; n_virtual];
    for (k, op) in ops.iter_mut().enumerate() {
        op.visit_bufs(&mut |b: &mut BufId| {
            if b.0 >= GRADIENT {
                let v = b.0 - GRADIENT;
                first[v] = first[v].min(k + 1);
                last[v] = last[v].max(k + 1);
            }
        });
    }
    if let Some(dout) = plan.output_grad {
        first[dout.0 - GRADIENT] = 0;
    }
    if let Some(ig) = plan.input_grad {
        last[ig.0 - GRADIENT] = ops.len() + 1;
    }
    let (order, holder) = lifetime_holders(&first, &last, |v| (grads[v].len, grads[v].dtype), |_| true);
    let mut physical = vec![BufId(0); n_virtual];
    for v in order {
        if first[v] == usize::MAX {
            continue;
        }
        let g = &grads[v];
        physical[v] = if holder[v] == v {
            table.new_buffer(g.len, g.dtype, BufRole::Gradient, g.label.clone())
        } else {
            physical[holder[v]]
        };
    }
    let mut map = |b: &mut BufId| {
        if b.0 >= GRADIENT {
            *b = physical[b.0 - GRADIENT];
        }
    };
    for op in ops.iter_mut() {
        op.visit_bufs(&mut map);
    }
    plan.output_grad.iter_mut().for_each(&mut map);
    plan.input_grad.iter_mut().for_each(&mut map);
}

/// Allocates every buffer of `table` on `backend` and rewrites `ops` (and `ids`) from virtual
/// to real ids; the table's entries get their real ids. On failure, what was allocated is freed,
/// so the backend is as it was (a smaller batch can be tried).
pub(super) fn allocate<B: Backend>(
    backend: &mut B,
    table: &mut Table,
    ops: &mut [&mut Vec<Op>],
    ids: &mut [&mut BufId],
) -> Result<()> {
    let mut real = Vec::with_capacity(table.buffers.len());
    for b in &table.buffers {
        match backend.alloc(b.len, b.dtype) {
            Ok(id) => real.push(id),
            Err(e) => {
                for id in real {
                    backend.free(id)?;
                }
                return Err(e);
            }
        }
    }
    let mut map = |b: &mut BufId| {
        if b.0 >= PLANNED {
            *b = real[b.0 - PLANNED];
        }
    };
    for list in ops {
        for op in list.iter_mut() {
            op.visit_bufs(&mut map);
        }
    }
    for id in ids {
        map(id);
    }
    for (b, id) in table.buffers.iter_mut().zip(real) {
        b.id = id;
    }
    Ok(())
}
