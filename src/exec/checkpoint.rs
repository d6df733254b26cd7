//! Gradient checkpointing, the compiler's side ([`crate::model::ModelBuilder::checkpoint`]).
//!
//! In a training plan, what the layers of a checkpointed segment write in forward (outputs and
//! what they save for backward) goes into *pooled* virtual buffers instead of buffers of their
//! own; only the segment's last output is *pinned* (kept until backward: later layers read it).
//! In backward, right before the first backward op of a segment, its forward is lowered again
//! (recomputed) into fresh pooled buffers, and the segment's backward reads those. Pooled
//! buffers get table entries by lifetime over forward then backward, as gradients do: one free
//! over a buffer's whole span (first op that touches it to the last) with the same length, dtype
//! and role is reused, so the segments share a few buffers instead of keeping each one's.
//!
//! The recomputation is the same ops in the same order, so gradients are bit-identical on the
//! CPU. It changes no state: batch norm does not update its running statistics a second time,
//! and dropout replays the mask of its forward (`ops::Dropout::replay`) without advancing its
//! counter. A segment's last layer is recomputed only if it saved something (a batch norm's
//! statistics, a dropout mask); otherwise its backward reads its kept output.

use super::compile::{GRADIENT, Lowering, PLANNED, Table, lifetime_holders, node_params};
use super::plan::{BufRole, Mode, ParamBuffers, Plan};
use crate::Result;
use crate::backend::ops::Access;
use crate::backend::{BufId, CounterId, DType, Op};
use crate::model::Model;
use crate::model::lower::{self, Buffers, Forward};

/// Virtual ids of pooled buffers start here (below the gradients' virtual ids).
const POOLED: usize = PLANNED + usize::MAX / 8;

/// One pooled virtual buffer.
struct Virtual {
    len: usize,
    dtype: DType,
    role: BufRole,
    label: String,
    /// Kept for backward (a segment's output): a table entry of its own.
    pinned: bool,
}

/// The pooled buffers: what the layers of a segment get from `Buffers`.
#[derive(Default)]
struct Pool(Vec<Virtual>);

impl Pool {
    fn add(&mut self, len: usize, dtype: DType, role: BufRole, label: String) -> BufId {
        self.0.push(Virtual { len, dtype, role, label, pinned: false });
        BufId(POOLED + self.0.len() - 1)
    }
    fn index(b: BufId) -> Option<usize> {
        (POOLED..GRADIENT).contains(&b.0).then(|| b.0 - POOLED)
    }
}

impl Buffers for Pool {
    fn activation(&mut self, len: usize, dtype: DType, label: String) -> BufId {
        self.add(len, dtype, BufRole::Activation, label)
    }
    fn saved(&mut self, len: usize, dtype: DType, label: String) -> BufId {
        self.add(len, dtype, BufRole::Saved, label)
    }
}

/// What a node's backward reads: its inputs' values, its output and what forward saved
/// (recomputed ones for the nodes of a checkpointed segment).
pub(super) struct Operands {
    pub(super) inputs: Vec<BufId>,
    pub(super) output: BufId,
    pub(super) saved: Vec<BufId>,
}

/// The checkpointed segments of one plan while it is compiled.
pub(super) struct Segments<'a> {
    model: &'a Model,
    params: &'a [ParamBuffers],
    counters: &'a [Option<CounterId>],
    low: Lowering,
    /// The segment of each node (training plans only).
    segment_of: Vec<Option<usize>>,
    pool: Pool,
    /// Each segment, once recomputed in backward.
    recomputed: Vec<bool>,
    /// Each node's recomputed output and saved buffers.
    outputs: Vec<Option<BufId>>,
    saved: Vec<Option<Vec<BufId>>>,
}

impl<'a> Segments<'a> {
    /// The segments of `model` for a plan lowered as `low` (none outside training).
    pub(super) fn new(
        model: &'a Model,
        params: &'a [ParamBuffers],
        counters: &'a [Option<CounterId>],
        low: &Lowering,
    ) -> Self {
        let n = model.nodes().len();
        let mut segment_of = vec![None; n];
        if low.mode == Mode::Train {
            for (s, r) in model.checkpoints().iter().enumerate() {
                r.clone().for_each(|i| segment_of[i] = Some(s));
            }
        }
        Segments {
            model,
            params,
            counters,
            low: *low,
            segment_of,
            pool: Pool::default(),
            recomputed: vec![false; model.checkpoints().len()],
            outputs: vec![None; n],
            saved: vec![None; n],
        }
    }

    /// Where node `i`'s forward gets its buffers: pooled inside a segment, else the table.
    pub(super) fn buffers<'s>(&'s mut self, i: usize, table: &'s mut Table) -> &'s mut dyn Buffers {
        if self.segment_of[i].is_some() { &mut self.pool } else { table }
    }

    /// After node `i`'s forward wrote `y`: the last output of a segment is kept for backward.
    pub(super) fn forward_done(&mut self, i: usize, y: BufId) {
        if let Some(s) = self.segment_of[i]
            && self.model.checkpoints()[s].end == i + 1
            && let Some(v) = Pool::index(y)
        {
            self.pool.0[v].pinned = true;
        }
    }

    /// The buffers node `i`'s backward reads. On the first node of a segment that backward
    /// reaches, the segment's forward is recomputed first, appended to `ops` (`owners` gets the
    /// node of each op). `out` and `saved` are what forward made.
    pub(super) fn operands(
        &mut self,
        i: usize,
        out: &[BufId],
        saved: &[Vec<BufId>],
        ops: &mut Vec<Op>,
        owners: &mut Vec<usize>,
    ) -> Result<Operands> {
        if let Some(s) = self.segment_of[i]
            && !self.recomputed[s]
        {
            self.recomputed[s] = true;
            self.recompute(s, out, saved, ops, owners)?;
        }
        let node = &self.model.nodes()[i];
        Ok(Operands {
            inputs: node.inputs.iter().map(|&j| self.outputs[j].unwrap_or(out[j])).collect(),
            output: self.outputs[i].unwrap_or(out[i]),
            saved: self.saved[i].clone().unwrap_or_else(|| saved[i].clone()),
        })
    }

    /// Lowers segment `s`'s forward again into `ops`, into fresh pooled buffers.
    fn recompute(
        &mut self,
        s: usize,
        out: &[BufId],
        saved: &[Vec<BufId>],
        ops: &mut Vec<Op>,
        owners: &mut Vec<usize>,
    ) -> Result<()> {
        let nodes = self.model.nodes();
        let range = self.model.checkpoints()[s].clone();
        let last = range.end - 1;
        for j in range {
            if j == last && saved[j].is_empty() {
                // Its output is kept and it saved nothing: its backward needs no recomputation.
                break;
            }
            let node = &nodes[j];
            let inputs = node.inputs.iter().map(|&k| self.outputs[k].unwrap_or(out[k])).collect();
            let mut cx = Forward {
                node,
                in_shapes: node.inputs.iter().map(|&k| nodes[k].shape.as_slice()).collect(),
                batch: self.low.batch,
                mode: Mode::Train,
                sync_batch_norm: self.low.sync_batch_norm,
                update_running_stats: false,
                dropout: self.counters[j].map(|c| (self.low.dropout_seed_of(j), c)),
                recompute: true,
                inputs,
                params: node_params(self.model, self.params, j).into_iter().map(|(r, p)| (r, p.value)).collect(),
                bufs: &mut self.pool,
                ops,
                output: None,
                saved: Vec::new(),
            };
            lower::forward(&mut cx)?;
            let (y, sv) = (cx.output.expect("a layer's lowering sets its output"), cx.saved);
            self.outputs[j] = Some(y);
            self.saved[j] = Some(sv);
            owners.resize(ops.len(), j);
        }
        Ok(())
    }

    /// Gives every pooled buffer a table entry, reused by lifetime over the plan's forward then
    /// backward ops, and rewrites the plan to them. A pinned buffer, and one whose first use is
    /// not a plain write, gets an entry of its own.
    pub(super) fn assign(self, table: &mut Table, plan: &mut Plan) {
        let n = self.pool.0.len();
        if n == 0 {
            return;
        }
        let mut first = vec![usize::MAX; n];
        let mut last = vec![0usize; n];
        let mut own = vec![false; n];
        for (k, op) in plan.forward.iter().chain(&plan.backward).enumerate() {
            op.each_buffer(&mut |u| {
                if let Some(v) = Pool::index(u.buf) {
                    if first[v] == usize::MAX && u.access != Access::Write {
                        own[v] = true;
                    }
                    first[v] = first[v].min(k);
                    last[v] = last[v].max(k);
                }
            });
        }
        let pool = &self.pool.0;
        let key = |v: usize| (pool[v].len, pool[v].dtype, pool[v].role);
        let (order, holder) = lifetime_holders(&first, &last, key, |v| !pool[v].pinned && !own[v]);
        let mut physical = vec![BufId(0); n];
        for v in order {
            let b = &pool[v];
            if first[v] == usize::MAX
                && !plan.node_outputs.contains(&BufId(POOLED + v))
                && plan.output != BufId(POOLED + v)
            {
                // Named by no op (fused away by exec/fuse.rs): no table entry.
                continue;
            }
            physical[v] = if holder[v] != v {
                physical[holder[v]]
            } else if b.pinned || own[v] || first[v] == usize::MAX {
                table.new_buffer(b.len, b.dtype, b.role, b.label.clone())
            } else {
                table.new_buffer(b.len, b.dtype, b.role, format!("{} (checkpointed)", b.label))
            };
        }
        let mut map = |b: &mut BufId| {
            if let Some(v) = Pool::index(*b) {
                *b = physical[v];
            }
        };
        for op in plan.forward.iter_mut().chain(plan.backward.iter_mut()) {
            op.visit_bufs(&mut map);
        }
        plan.node_outputs.iter_mut().for_each(&mut map);
        map(&mut plan.output);
    }
}
