//! Batch norm + activation fusion: the compiler's pass that folds an element-wise activation
//! into the batch norm before it (issue 11: one pass over memory and one buffer fewer each way).
//!
//! ```text
//! before:  x -> BatchNormTrain -> y -> Act(f) -> z        dz -> ActBackward -> dy -> BatchNormBackward -> dx
//! after:   x -> BatchNormTrain{act: f} -> z               dz, z -> BatchNormBackward{act: (f, z)} -> dx
//! ```
//!
//! The fused forward writes `f(gamma * xhat + beta)`; the fused backward reads the gradient of
//! the activated output and that output, multiplies by `f'` (computed from the output, so only
//! functions where that is exact fuse: [`ActFn::derivative_from_output`]) before its sums. The
//! pre-activation buffer `y` and its gradient `dy` disappear from the plan (their memory with
//! them), and so do the activation's two ops.
//!
//! A pair fuses only where nothing else needs `y` or `dy`: `y` is read by the one activation
//! op and by that activation's backward ops (where they read the activation's input: ReLU,
//! sigmoid and tanh are lowered reading their output only), `dy` is
//! written by such a backward op alone (no gradient sum: `y` has no other consumer) and read by
//! the batch norm's own backward alone (of the same layer), and neither is one of the plan's
//! edges. Forward and backward fuse together or not at all. The pass runs
//! on the f32 NCHW plan as lowered, before mixed precision (`exec/autocast.rs`), which then gives
//! the fused ops the form of their input as for any batch norm; inside checkpointed segments
//! (`exec/checkpoint.rs`) it fuses the recomputed forward too (those ops sit in the backward
//! list), over pooled buffers, and a segment's last batch norm fuses with the activation after
//! the segment (its backward reads the recomputed statistics, the same bits as the forward's).
//! Every backend runs the fused ops (CPU, CUDA, wgpu).
//!
//! `Lowering::fuse` turns the pass on: by default where the backend says so
//! (`Backend::fuses_norm_activation`: the CPU and wgpu; not CUDA until its fused kernels have run
//! on a GPU), `KILN_FUSION=0`/`1` off or on everywhere, `Executor::set_fusion` per executor.

use std::collections::HashMap;

use super::compile::{PLANNED, Table, VirtualGrad};
use super::plan::Plan;
use crate::backend::BufId;
use crate::backend::ops::{self, ActFn, FusedAct, Op};

/// Where an op is: forward (`false`) or backward (`true`) list, and its index there.
type At = (bool, usize);

/// One batch norm and the activation after it, found fusable.
struct Pair {
    /// The batch norm (forward form) and its activation op.
    bn: At,
    act: At,
    f: ActFn,
    /// The pre-activation buffer and the activated output.
    y: BufId,
    z: BufId,
    /// Each (activation backward, batch norm backward) pair reading from it.
    backward: Vec<(At, At)>,
}

/// Fuses every batch norm followed by an activation where nothing else needs the buffer
/// between them (see the module documentation). `table` loses the dropped activations' entries
/// (ids above them move down); `grads` keeps its entries (a dropped gradient is simply no
/// longer named by any op: `compile::assign_gradients` gives such no buffer).
pub(super) fn batch_norm_act(plan: &mut Plan, table: &mut Table, grads: &mut [VirtualGrad]) {
    let pairs = find(plan);
    if pairs.is_empty() {
        return;
    }
    let mut drop_fwd = vec![false; plan.forward.len()];
    let mut drop_bwd = vec![false; plan.backward.len()];
    let mut replaced: HashMap<BufId, BufId> = HashMap::new();
    for p in &pairs {
        match op_at(plan, p.bn) {
            Op::BatchNormTrain(o) => {
                o.y = p.z;
                o.act = Some(p.f);
            }
            Op::BatchNormInfer(o) => {
                o.y = p.z;
                o.act = Some(p.f);
            }
            _ => unreachable!("found as a batch norm"),
        }
        for &(ab, bb) in &p.backward {
            let Op::ActBackward(a) = op_at(plan, ab).clone() else { unreachable!("found as an activation backward") };
            let Op::BatchNormBackward(k) = op_at(plan, bb) else { unreachable!("found as a batch norm backward") };
            k.dy = a.dy;
            k.act = Some(FusedAct { f: p.f, y: p.z });
            dropped(&mut drop_fwd, &mut drop_bwd, ab);
        }
        dropped(&mut drop_fwd, &mut drop_bwd, p.act);
        replaced.insert(p.y, p.z);
    }
    (plan.forward, plan.forward_nodes) = keep(&plan.forward, &plan.forward_nodes, &drop_fwd);
    (plan.backward, plan.backward_nodes) = keep(&plan.backward, &plan.backward_nodes, &drop_bwd);
    // A fused batch norm has no output of its own: its node names the fused output.
    for b in plan.node_outputs.iter_mut().chain(grads.iter_mut().map(|g| &mut g.of)) {
        if let Some(&z) = replaced.get(b) {
            *b = z;
        }
    }
    compact(plan, table, grads, &replaced);
}

fn op_at(plan: &mut Plan, (bwd, i): At) -> &mut Op {
    if bwd { &mut plan.backward[i] } else { &mut plan.forward[i] }
}

fn dropped(fwd: &mut [bool], bwd: &mut [bool], (b, i): At) {
    if b {
        bwd[i] = true;
    } else {
        fwd[i] = true;
    }
}

fn keep(ops: &[Op], owners: &[usize], drop: &[bool]) -> (Vec<Op>, Vec<usize>) {
    ops.iter().zip(owners).zip(drop).filter(|(_, d)| !**d).map(|((o, &n), _)| (o.clone(), n)).unzip()
}

/// The fusable pairs of `plan`.
fn find(plan: &Plan) -> Vec<Pair> {
    // Every op naming each buffer (an op naming one buffer twice is listed twice).
    let mut users: HashMap<BufId, Vec<At>> = HashMap::new();
    let lists = [(false, &plan.forward), (true, &plan.backward)];
    for (bwd, list) in lists {
        for (i, op) in list.iter().enumerate() {
            op.each_buffer(&mut |u| users.entry(u.buf).or_default().push((bwd, i)));
        }
    }
    let op = |(bwd, i): At| if bwd { &plan.backward[i] } else { &plan.forward[i] };
    let edges = [Some(plan.input), Some(plan.output), plan.output_grad, plan.input_grad];
    let edge = |b: BufId| edges.contains(&Some(b));
    let mut pairs = Vec::new();
    for (bwd, list) in lists {
        for (i, o) in list.iter().enumerate() {
            let (g, y, train) = match o {
                Op::BatchNormTrain(b) if b.act.is_none() => (b.g, b.y, true),
                Op::BatchNormInfer(b) if b.act.is_none() => (b.g, b.y, false),
                _ => continue,
            };
            let node = if bwd { plan.backward_nodes[i] } else { plan.forward_nodes[i] };
            let len = g.n * g.c * g.hw;
            if edge(y) {
                continue;
            }
            let others: Vec<At> = users[&y].iter().copied().filter(|&a| a != (bwd, i)).collect();
            // The one activation op reading y, after the batch norm in the same list.
            let acts: Vec<(At, ops::Act)> = others
                .iter()
                .filter_map(|&a| match op(a) {
                    Op::Act(act) if act.x == y => Some((a, *act)),
                    _ => None,
                })
                .collect();
            let [(act_at, act)] = acts[..] else { continue };
            if act_at.0 != bwd || act_at.1 <= i || act.len != len || act.y == y || !act.f.derivative_from_output() {
                continue;
            }
            if users[&act.y].iter().any(|&a| a != act_at && !reads_only(op(a), act.y)) {
                // Something else writes the activated output: keep the ops as they are.
                continue;
            }
            // The activation's backward ops: they read the activated output, and the
            // pre-activation y too unless the lowering names the output as their input (ReLU,
            // sigmoid, tanh). Every other reader of y must be one of them, and each one that
            // reads y must fuse with the batch norm's own backward (it could not run without
            // y); one that reads the output only fuses where it can, else it stays as it is.
            let mut ok = others
                .iter()
                .all(|&a| a == act_at || matches!(op(a), Op::ActBackward(ab) if ab.x == y && ab.y == act.y));
            let mut backward = Vec::new();
            let mut seen = Vec::new();
            for &a in &users[&act.y] {
                let Op::ActBackward(ab) = op(a) else { continue };
                if seen.contains(&a) || ab.y != act.y || (ab.x != y && ab.x != act.y) {
                    continue;
                }
                seen.push(a);
                let same = ab.f == act.f && ab.len == len;
                match backward_pair(plan, &users, a, ab, (g, train, node), &edge).filter(|_| same) {
                    Some(k) => backward.push((a, k)),
                    None if ab.x == y => ok = false,
                    None => {}
                }
            }
            if ok {
                pairs.push(Pair { bn: (bwd, i), act: act_at, f: act.f, y, z: act.y, backward });
            }
        }
    }
    pairs
}

/// Whether `op` names `b` for reading only.
fn reads_only(op: &Op, b: BufId) -> bool {
    let mut only = true;
    op.each_buffer(&mut |u| only &= u.buf != b || !u.access.writes());
    only
}

/// The batch norm backward that consumes activation backward `ab` (at `at`) alone: the one
/// reading its input gradient as `dy`, of the same layer (`node`) as the batch norm (training
/// form: `train`) of shape `g`. (Where that layer ends a checkpointed segment, its backward reads
/// the statistics of its recomputation, which are the forward's bits again.)
fn backward_pair(
    plan: &Plan,
    users: &HashMap<BufId, Vec<At>>,
    at: At,
    ab: &ops::ActBackward,
    (g, train, node): (ops::BnGeom, bool, usize),
    edge: &impl Fn(BufId) -> bool,
) -> Option<At> {
    let d = ab.dx;
    if !train || !at.0 || d.accumulate || edge(d.buf) {
        return None;
    }
    let others: Vec<At> = users[&d.buf].iter().copied().filter(|&a| a != at).collect();
    let [k] = others[..] else { return None };
    match &plan.backward[k.1] {
        Op::BatchNormBackward(b)
            if k.0
                && k.1 > at.1
                && b.act.is_none()
                && b.dy == d.buf
                && b.g == g
                && plan.backward_nodes[k.1] == node
                && b.dx.is_none_or(|x| x.buf != d.buf) =>
        {
            Some(k)
        }
        _ => None,
    }
}

/// Drops the table entries of the buffers fusion made unused (`replaced`'s keys that are
/// table entries): the entries after each move down, and every id naming them follows.
fn compact(plan: &mut Plan, table: &mut Table, grads: &mut [VirtualGrad], replaced: &HashMap<BufId, BufId>) {
    let n = table.buffers.len();
    let entry = |b: BufId| b.0.checked_sub(PLANNED).filter(|&i| i < n);
    let mut dead = vec![false; n];
    for &y in replaced.keys() {
        if let Some(i) = entry(y) {
            dead[i] = true;
        }
    }
    if !dead.contains(&true) {
        return;
    }
    let mut new_index = vec![usize::MAX; n];
    let mut next = 0;
    for i in 0..n {
        if !dead[i] {
            new_index[i] = next;
            next += 1;
        }
    }
    let mut k = 0;
    table.buffers.retain(|_| {
        k += 1;
        !dead[k - 1]
    });
    for (i, b) in table.buffers.iter_mut().enumerate() {
        b.id = BufId(PLANNED + i);
    }
    let map = |b: &mut BufId| {
        if let Some(i) = entry(*b) {
            debug_assert!(!dead[i], "a dropped buffer is still named");
            *b = BufId(PLANNED + new_index[i]);
        }
    };
    for op in plan.forward.iter_mut().chain(plan.backward.iter_mut()) {
        op.visit_bufs(&mut |b| map(b));
    }
    let fields = [Some(&mut plan.input), Some(&mut plan.output), plan.output_grad.as_mut(), plan.input_grad.as_mut()];
    for b in fields.into_iter().flatten().chain(plan.node_outputs.iter_mut()).chain(grads.iter_mut().map(|g| &mut g.of))
    {
        map(b);
    }
}
