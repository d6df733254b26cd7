//! Mixed precision ([`crate::exec::Precision::Bf16Mixed`], and f16 through the same pass): the
//! compiler's pass that runs convolutions and matrix products on tensor cores in a half
//! precision dtype (bf16 or f16, the pass's parameter), as PyTorch's
//! `autocast(dtype=torch.bfloat16)` (or `float16`) with `channels_last` does, and keeps the
//! activations between them in that dtype, channels-last (NHWC).
//!
//! The network's ops are lowered in f32 NCHW first, as always; this pass then decides a form
//! for every activation buffer and its gradient, **f32 NCHW** (as lowered) or **half NHWC**,
//! and rewrites each op to run in one form, with a cast (`ops::Cast`, which also permutes
//! between the two orders) only where an operand's buffer has the other form:
//!
//! - *Half producers*: a convolution's output is half NHWC (cuDNN's tensor-core layout; the
//!   bias is added in NHWC by the convolution). Batch norm, element-wise activations and sums
//!   (residual joins) whose input is half write half NHWC too: they run on half buffers
//!   (statistics, sums and arithmetic in f32 inside the kernels). Batch norm over an NHWC
//!   `[n, c, hw]` tensor is batch norm over `[n * hw, c, 1]` (channel innermost), so its op keeps
//!   its meaning and only its geometry changes.
//! - *Edges*: the plan's input, output, output gradient and input gradient stay f32 NCHW (the
//!   caller reads and writes them), and so does everything inside a checkpointed segment (its
//!   buffers are pooled) and every activation no half producer writes.
//! - A gradient has its activation's form (PyTorch's gradients have their tensor's dtype and
//!   layout), so backward runs in half where forward did, gradient sums (a tensor used twice)
//!   included.
//! - Every other op (pooling, dropout, softmax, concatenation, group norm, transposed
//!   convolutions, the loss) runs in f32 NCHW as before: a half operand is widened into f32
//!   scratch before it, a half result is written to f32 scratch and narrowed after it (read and
//!   narrowed again where the op accumulates).
//! - Dense layers (cuBLASLt) take half operands and write f32: a half input in NHWC order is
//!   permuted (half to half) into the order the dense layer reads (flatten is channels-first),
//!   a half input gradient is narrowed from f32 scratch.
//!
//! ```text
//! f32 plan:   x -> Conv2d -> y1 -> BatchNorm -> y2 -> Relu -> y3 -> Conv2d -> ...
//! mixed:      x -Cast(NHWC)-> X' -> Conv2d' -> Y1' -> BatchNorm' -> Y2' -> Relu' -> Y3' -> Conv2d' -> ...
//! ```
//!
//! (capital and primed: half NHWC). Weights (f32 master copies) are narrowed once per plan run,
//! into a half copy per weight (filters permuted to cuDNN's `[k, kh, kw, c]`) at their first use
//! in forward, which backward reads again. Weight gradients come out of cuDNN in the half type and
//! are widened (and permuted back, accumulated where asked) into the f32 gradients; bias
//! gradients are summed in f64 from the half output gradient. Parameters, their gradients,
//! batch norm's statistics, the loss and the optimizer stay f32.
//!
//! The casts' scratch is shared: work on a stream is serialised and a conversion lives only
//! around its one op, so the k-th conversion of each dtype within an op uses the plan's k-th
//! scratch buffer of that dtype (as long as its largest use), planned as workspace.

use std::collections::HashMap;

use super::Precision;
use super::compile::{GRADIENT, PLANNED, Table, VirtualGrad};
use super::plan::{BufRole, Plan};
use crate::backend::ops::{self, Access, BnGeom, Cast, CastBias, CastPermute, GradOut, MemoryFormat, Op};
use crate::backend::{BufId, DType};

/// The half dtype a precision computes convolutions and matrix products in (the parameter of
/// [`mixed`]); `None` where it computes everything in f32.
pub(super) fn half_dtype(p: Precision) -> Option<DType> {
    match p {
        Precision::F32 | Precision::Tf32 => None,
        Precision::Bf16Mixed => Some(DType::BF16),
        Precision::F16Mixed => Some(DType::F16),
    }
}

/// Virtual ids of the pass's scratch while it runs (between the table's ids and the pooled
/// ones of `exec/checkpoint.rs`); they become table entries at its end.
const SCRATCH: usize = PLANNED + usize::MAX / 16;

/// The shape of a half NHWC tensor: `[n, c, hw]` in channels-first terms, stored `[n, hw, c]`.
type Geo = (usize, usize, usize);

/// Rewrites `plan`'s forward and backward for mixed precision in `half` (bf16 or f16; see the
/// module documentation): gives half activations and their gradients (`grads`, still virtual)
/// the half dtype, adds the scratch and the weights' half copies to `table`. The op-to-node
/// maps follow: each cast belongs to the layer of the op it serves.
pub(super) fn mixed(plan: &mut Plan, table: &mut Table, grads: &mut [VirtualGrad], half: DType) {
    debug_assert!(half.is_half(), "mixed precision in {half}");
    let halves = decide(plan, table, grads, half);
    let mut pass = Pass { half, halves, slots: Vec::new(), used: [0; 2], weights: HashMap::new() };
    let forward = pass.rewrite(&plan.forward, &plan.forward_nodes, table);
    let backward = pass.rewrite(&plan.backward, &plan.backward_nodes, table);
    (plan.forward, plan.forward_nodes) = forward;
    (plan.backward, plan.backward_nodes) = backward;
    // The scratch slots become table entries.
    let ids: Vec<BufId> = pass
        .slots
        .iter()
        .enumerate()
        .map(|(k, &(len, dtype))| table.new_buffer(len, dtype, BufRole::Workspace, format!("{dtype} scratch {k}")))
        .collect();
    let mut map = |b: &mut BufId| {
        if (SCRATCH..SCRATCH + ids.len()).contains(&b.0) {
            *b = ids[b.0 - SCRATCH];
        }
    };
    for op in plan.forward.iter_mut().chain(plan.backward.iter_mut()) {
        op.visit_bufs(&mut map);
    }
}

/// Which activations (and gradients) are kept in half NHWC, with their shapes; sets their
/// dtype in `table` (activations) and `grads` (gradients).
fn decide(plan: &Plan, table: &mut Table, grads: &mut [VirtualGrad], half: DType) -> HashMap<BufId, Geo> {
    // Activations of the table (not pooled by checkpointing), not at the plan's edges.
    let activations: Vec<bool> =
        table.buffers.iter().map(|b| b.role == BufRole::Activation && b.dtype == DType::F32).collect();
    let entry = |b: BufId| b.0.checked_sub(PLANNED).filter(|&i| i < activations.len());
    let edges = [Some(plan.input), Some(plan.output), plan.output_grad, plan.input_grad];
    let eligible = |b: BufId| !edges.contains(&Some(b)) && entry(b).is_some_and(|i| activations[i]);
    let mut halves: HashMap<BufId, Geo> = HashMap::new();
    for op in &plan.forward {
        let (y, geo) = match op {
            Op::Conv2d(o) => (o.y, Some((o.g.n, o.g.k, o.g.oh * o.g.ow))),
            Op::BatchNormTrain(o) => (o.y, halves.contains_key(&o.x).then_some((o.g.n, o.g.c, o.g.hw))),
            Op::BatchNormInfer(o) => (o.y, halves.contains_key(&o.x).then_some((o.g.n, o.g.c, o.g.hw))),
            Op::Act(o) => (o.y, halves.get(&o.x).copied()),
            Op::Add(o) => (o.y, o.inputs.iter().find_map(|b| halves.get(b).copied())),
            _ => continue,
        };
        if let Some(g) = geo
            && eligible(y)
        {
            halves.insert(y, g);
        }
    }
    for b in halves.keys() {
        if let Some(i) = entry(*b) {
            table.buffers[i].dtype = half;
        }
    }
    for (i, g) in grads.iter_mut().enumerate() {
        let id = BufId(GRADIENT + i);
        if let Some(&geo) = halves.get(&g.of)
            && !edges.contains(&Some(id))
        {
            g.dtype = half;
            halves.insert(id, geo);
        }
    }
    halves
}

/// `n` blocks of `c` channels by `hw` positions written in order `to`; `None` where the two
/// orders are the same bytes (one channel or one position).
fn permute(n: usize, c: usize, hw: usize, to: MemoryFormat) -> Option<CastPermute> {
    (c > 1 && hw > 1).then_some(CastPermute { n, c, hw, to })
}

fn geo_permute((n, c, hw): Geo, to: MemoryFormat) -> Option<CastPermute> {
    permute(n, c, hw, to)
}

fn cast(len: usize, src: BufId, dst: GradOut, p: Option<CastPermute>) -> Op {
    Op::Cast(Cast { len, src, dst, bias: None, permute: p })
}

fn overwrite(buf: BufId) -> GradOut {
    GradOut { buf, accumulate: false }
}

/// Batch norm over an NHWC `[n, c, hw]` tensor: `hw` rows of channels per sample.
fn rows(g: BnGeom) -> BnGeom {
    BnGeom { n: g.n * g.hw, c: g.c, hw: 1, eps: g.eps }
}

/// The rewriting state.
struct Pass {
    half: DType,
    /// The buffers kept in half NHWC, with their shapes.
    halves: HashMap<BufId, Geo>,
    /// Scratch slots: largest use and dtype; slot `k` is virtual id `SCRATCH + k`.
    slots: Vec<(usize, DType)>,
    /// Slots taken by the current op: half, f32.
    used: [usize; 2],
    /// The half copy of each weight (made at its first use).
    weights: HashMap<BufId, BufId>,
}

impl Pass {
    fn rewrite(&mut self, ops: &[Op], owners: &[usize], table: &mut Table) -> (Vec<Op>, Vec<usize>) {
        let mut out = Vec::with_capacity(ops.len() * 2);
        let mut own = Vec::with_capacity(ops.len() * 2);
        for (op, &node) in ops.iter().zip(owners) {
            self.used = [0; 2];
            let mut post = Vec::new();
            self.expand(op, table, &mut out, &mut post);
            out.append(&mut post);
            own.resize(out.len(), node);
        }
        (out, own)
    }

    fn is_half(&self, b: BufId) -> bool {
        self.halves.contains_key(&b)
    }

    /// The next free scratch slot of `dtype` for the current op, at least `len` long.
    fn slot(&mut self, len: usize, dtype: DType) -> BufId {
        let which = usize::from(dtype == DType::F32);
        let nth = self.used[which];
        self.used[which] += 1;
        let mut seen = 0;
        for (k, s) in self.slots.iter_mut().enumerate() {
            if s.1 == dtype {
                if seen == nth {
                    s.0 = s.0.max(len);
                    return BufId(SCRATCH + k);
                }
                seen += 1;
            }
        }
        self.slots.push((len, dtype));
        BufId(SCRATCH + self.slots.len() - 1)
    }

    /// `b` as a half NHWC operand of shape `geo`: itself, or narrowed into scratch.
    fn as_half(&mut self, b: BufId, geo: Geo, out: &mut Vec<Op>) -> BufId {
        if self.is_half(b) {
            return b;
        }
        let len = geo.0 * geo.1 * geo.2;
        let s = self.slot(len, self.half);
        out.push(cast(len, b, overwrite(s), geo_permute(geo, MemoryFormat::Nhwc)));
        s
    }

    /// Where an op that writes half NHWC of shape `geo` writes `d`: `d` itself, or scratch
    /// widened (and accumulated, as `d` says) into `d` after the op.
    fn out_half(&mut self, d: GradOut, geo: Geo, post: &mut Vec<Op>) -> GradOut {
        if self.is_half(d.buf) {
            return d;
        }
        let len = geo.0 * geo.1 * geo.2;
        let s = self.slot(len, self.half);
        post.push(cast(len, s, d, geo_permute(geo, MemoryFormat::Nchw)));
        overwrite(s)
    }

    /// The half copy of weight `w` (`len` values, permuted as `p` says), narrowed at its first
    /// use.
    fn weight(&mut self, w: BufId, len: usize, p: Option<CastPermute>, table: &mut Table, out: &mut Vec<Op>) -> BufId {
        if let Some(&h) = self.weights.get(&w) {
            return h;
        }
        let h = table.new_buffer(len, self.half, BufRole::Workspace, format!("{} weights", self.half));
        out.push(cast(len, w, overwrite(h), p));
        self.weights.insert(w, h);
        h
    }

    /// A dense layer's input in the half type, rows in channels-first order (what flatten
    /// gives): a half NCHW-equivalent buffer as is, a half NHWC one permuted into scratch, an
    /// f32 one narrowed into scratch.
    fn dense_input(&mut self, x: BufId, len: usize, out: &mut Vec<Op>) -> BufId {
        let p = match self.halves.get(&x) {
            Some(&geo) => match geo_permute(geo, MemoryFormat::Nchw) {
                None => return x,
                p => p,
            },
            None => None,
        };
        let s = self.slot(len, self.half);
        out.push(cast(len, x, overwrite(s), p));
        s
    }

    /// An op that runs in f32 NCHW: each half buffer it names (except those in `keep`) is
    /// widened into f32 scratch before it (where the op reads it) and narrowed back after it
    /// (where the op writes it).
    fn in_f32(&mut self, op: &Op, keep: &[BufId], out: &mut Vec<Op>, post: &mut Vec<Op>) {
        let mut named: Vec<(BufId, Access)> = Vec::new();
        op.each_buffer(&mut |u| {
            if self.halves.contains_key(&u.buf) && !keep.contains(&u.buf) {
                match named.iter_mut().find(|(b, _)| *b == u.buf) {
                    Some((_, a)) => {
                        if *a != u.access {
                            *a = Access::ReadWrite;
                        }
                    }
                    None => named.push((u.buf, u.access)),
                }
            }
        });
        if named.is_empty() {
            out.push(op.clone());
            return;
        }
        let mut map = Vec::new();
        for (b, access) in named {
            let geo = self.halves[&b];
            let len = geo.0 * geo.1 * geo.2;
            let s = self.slot(len, DType::F32);
            if access != Access::Write {
                out.push(cast(len, b, overwrite(s), geo_permute(geo, MemoryFormat::Nchw)));
            }
            if access.writes() {
                post.push(cast(len, s, overwrite(b), geo_permute(geo, MemoryFormat::Nhwc)));
            }
            map.push((b, s));
        }
        let mut op = op.clone();
        op.visit_bufs(&mut |b| {
            if let Some(&(_, s)) = map.iter().find(|(h, _)| h == b) {
                *b = s;
            }
        });
        out.push(op);
    }

    /// Pushes `op` rewritten (see the module documentation), with what must follow it into
    /// `post`.
    fn expand(&mut self, op: &Op, table: &mut Table, out: &mut Vec<Op>, post: &mut Vec<Op>) {
        use MemoryFormat::{Nchw, Nhwc};
        match op {
            Op::Conv2d(o) => {
                let g = o.g;
                let (cg, taps) = (g.c / g.groups, g.kh * g.kw);
                let x = self.as_half(o.x, (g.n, g.c, g.h * g.w), out);
                let w = self.weight(o.w, g.weight_len(), permute(g.k, cg, taps, Nhwc), table, out);
                let ygeo = (g.n, g.k, g.oh * g.ow);
                if self.is_half(o.y) {
                    // The bias is added in NHWC by the convolution.
                    out.push(Op::Conv2d(ops::Conv2d { g, format: Nhwc, x, w, b: o.b, y: o.y }));
                } else {
                    // The bias goes into the widening cast.
                    let len = g.output_len();
                    let s = self.slot(len, self.half);
                    out.push(Op::Conv2d(ops::Conv2d { g, format: Nhwc, x, w, b: None, y: s }));
                    let bias = o.b.map(|buf| CastBias { buf, channels: g.k, inner: g.oh * g.ow });
                    out.push(Op::Cast(Cast {
                        len,
                        src: s,
                        dst: overwrite(o.y),
                        bias,
                        permute: geo_permute(ygeo, Nchw),
                    }));
                }
            }
            Op::Conv2dBackward(o) => {
                let g = o.g;
                let (cg, taps) = (g.c / g.groups, g.kh * g.kw);
                let xgeo = (g.n, g.c, g.h * g.w);
                let x = self.as_half(o.x, xgeo, out);
                let w = self.weight(o.w, g.weight_len(), permute(g.k, cg, taps, Nhwc), table, out);
                let dy = self.as_half(o.dy, (g.n, g.k, g.oh * g.ow), out);
                let dx = o.dx.map(|d| self.out_half(d, xgeo, post));
                let dw = self.slot(g.weight_len(), self.half);
                post.push(cast(g.weight_len(), dw, o.dw, permute(g.k, cg, taps, Nchw)));
                out.push(Op::Conv2dBackward(ops::Conv2dBackward {
                    g,
                    format: Nhwc,
                    x,
                    w,
                    dy,
                    dx,
                    dw: overwrite(dw),
                    db: o.db,
                }));
            }
            Op::BatchNormTrain(o) if self.is_half(o.x) => {
                let y = self.out_half(overwrite(o.y), (o.g.n, o.g.c, o.g.hw), post).buf;
                out.push(Op::BatchNormTrain(ops::BatchNormTrain { g: rows(o.g), y, ..*o }));
            }
            Op::BatchNormInfer(o) if self.is_half(o.x) => {
                let y = self.out_half(overwrite(o.y), (o.g.n, o.g.c, o.g.hw), post).buf;
                out.push(Op::BatchNormInfer(ops::BatchNormInfer { g: rows(o.g), y, ..*o }));
            }
            Op::BatchNormBackward(o) if self.is_half(o.x) => {
                let geo = (o.g.n, o.g.c, o.g.hw);
                let dy = self.as_half(o.dy, geo, out);
                // A fused activation's output (exec/fuse.rs) has the form of batch norm's.
                let act = o.act.map(|a| ops::FusedAct { y: self.as_half(a.y, geo, out), ..a });
                let dx = o.dx.map(|d| self.out_half(d, geo, post));
                out.push(Op::BatchNormBackward(ops::BatchNormBackward { g: rows(o.g), dy, dx, act, ..*o }));
            }
            Op::Act(o) if self.is_half(o.x) => {
                let geo = self.halves[&o.x];
                let y = self.out_half(overwrite(o.y), geo, post).buf;
                out.push(Op::Act(ops::Act { y, ..*o }));
            }
            Op::ActBackward(o) if self.is_half(o.x) => {
                let geo = self.halves[&o.x];
                let y = self.as_half(o.y, geo, out);
                let dy = self.as_half(o.dy, geo, out);
                let dx = self.out_half(o.dx, geo, post);
                out.push(Op::ActBackward(ops::ActBackward { y, dy, dx, ..*o }));
            }
            Op::Add(o) if o.inputs.iter().any(|b| self.is_half(*b)) => {
                let geo = o.inputs.iter().find_map(|b| self.halves.get(b).copied()).expect("a half input");
                let inputs = o.inputs.iter().map(|&b| self.as_half(b, geo, out)).collect();
                let y = self.out_half(overwrite(o.y), geo, post).buf;
                out.push(Op::Add(ops::Add { len: o.len, inputs, y }));
            }
            Op::GradInto(o) if self.is_half(o.src) != self.is_half(o.dst.buf) => {
                // A copy between the two forms is a cast (the half side gives the shape).
                let (geo, to) = match self.halves.get(&o.src) {
                    Some(&g) => (g, Nchw),
                    None => (self.halves[&o.dst.buf], Nhwc),
                };
                out.push(cast(o.len, o.src, o.dst, geo_permute(geo, to)));
            }
            Op::GradInto(o) if self.is_half(o.src) => out.push(op.clone()),
            Op::Linear(o) => {
                let x = self.dense_input(o.x, o.m * o.k, out);
                let w = self.weight(o.w, o.n * o.k, None, table, out);
                self.in_f32(&Op::Linear(ops::Linear { x, w, ..*o }), &[x, w], out, post);
            }
            Op::LinearBackward(o) => {
                let x = self.dense_input(o.x, o.m * o.k, out);
                let w = self.weight(o.w, o.n * o.k, None, table, out);
                let dy = self.dense_input(o.dy, o.m * o.n, out);
                // cuBLASLt writes the input gradient in f32: narrowed after it where half.
                let op = Op::LinearBackward(ops::LinearBackward { x, w, dy, ..*o });
                self.in_f32(&op, &[x, w, dy], out, post);
            }
            _ => self.in_f32(op, &[], out, post),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Precision;
    use super::super::compile::{self, Lowering, Table};
    use super::super::plan::{BufRole, Mode, ParamBuffers, PlanOptions};
    use crate::backend::ops::MemoryFormat::{self, Nchw, Nhwc};
    use crate::backend::{BufId, DType, Op};
    use crate::model::{Conv2d, ModelBuilder};
    use crate::zoo;

    fn lower_model(builder: ModelBuilder, precision: Precision, mode: Mode) -> (crate::exec::Plan, Table) {
        lower_fused(builder, precision, mode, false)
    }

    /// As `lower_model`, with batch norm + activation fusion (`exec/fuse.rs`) as `fuse` says.
    fn lower_fused(builder: ModelBuilder, precision: Precision, mode: Mode, fuse: bool) -> (crate::exec::Plan, Table) {
        let model = builder.seed(1).build().unwrap();
        let params: Vec<ParamBuffers> = (0..model.params().len())
            .map(|i| ParamBuffers {
                value: BufId(2 * i),
                grad: model.params()[i].trainable.then_some(BufId(2 * i + 1)),
            })
            .collect();
        let low = Lowering {
            batch: model.batch_size(),
            mode,
            options: PlanOptions { input_grad: true, accumulate_param_grads: true },
            dropout_seed: 0,
            rank: 0,
            sync_batch_norm: false,
            update_running_stats: true,
            precision,
            fuse,
        };
        let mut table = Table::default();
        let plan = compile::network(&model, &params, &vec![None; model.nodes().len()], &low, &mut table).unwrap();
        (plan, table)
    }

    /// conv (bias) -> relu -> conv (no bias) -> batch norm -> flatten -> dense, batch 4 of 3x8x8.
    fn small() -> ModelBuilder {
        ModelBuilder::new(&[4, 3, 8, 8])
            .conv2d_with(Conv2d::new(6, 3).padding(1))
            .relu()
            .conv2d_with(Conv2d::new(6, 3).bias(false))
            .batch_norm()
            .flatten()
            .dense(5)
    }

    fn lower(precision: Precision, mode: Mode) -> (crate::exec::Plan, Table) {
        lower_model(small(), precision, mode)
    }

    fn count(ops: &[Op], f: impl Fn(&Op) -> bool) -> usize {
        ops.iter().filter(|o| f(o)).count()
    }

    fn casts(ops: &[Op]) -> Vec<ops::Cast> {
        ops.iter().filter_map(|o| if let Op::Cast(c) = o { Some(*c) } else { None }).collect()
    }

    use crate::backend::ops;

    /// A buffer's dtype in the final table (ids not in it are the executor's parameters: f32).
    fn dtype_in(table: &Table) -> impl Fn(BufId) -> DType + '_ {
        |b: BufId| table.buffers.iter().find(|t| t.id == b).map_or(DType::F32, |t| t.dtype)
    }

    /// Every op names buffers of the dtypes it can run on: the ops that take half operands
    /// (`Op::takes_half`) half ones as the pass arranged them, every other op f32 only; a cast
    /// converts between two dtypes or permutes.
    fn check_dtypes(p: &crate::exec::Plan, table: &Table, half: DType) {
        let dtype = dtype_in(table);
        for op in p.forward.iter().chain(&p.backward) {
            match op {
                Op::Conv2d(o) => {
                    assert!([o.x, o.w, o.y].iter().all(|&b| dtype(b) == half), "{op:?}");
                    assert_eq!(o.format, MemoryFormat::Nhwc);
                }
                Op::Conv2dBackward(o) => {
                    assert!([o.x, o.w, o.dy, o.dw.buf].iter().all(|&b| dtype(b) == half));
                    assert!(o.dx.is_none_or(|d| dtype(d.buf) == half));
                    assert!(o.db.is_none_or(|d| dtype(d.buf) == DType::F32));
                    assert_eq!(o.format, MemoryFormat::Nhwc);
                }
                Op::Linear(o) => assert!(dtype(o.x) == half && dtype(o.w) == half && dtype(o.y) == DType::F32),
                Op::LinearBackward(o) => {
                    assert!(dtype(o.x) == half && dtype(o.dy) == half && dtype(o.dw.buf) == DType::F32);
                    assert!(o.dx.is_none_or(|d| dtype(d.buf) == DType::F32));
                }
                Op::BatchNormTrain(o) if dtype(o.x) == half => {
                    assert_eq!((dtype(o.y), o.g.hw), (half, 1), "half batch norm runs on NHWC rows");
                    assert_eq!((dtype(o.mean), dtype(o.invstd)), (DType::F32, DType::F32));
                }
                Op::BatchNormInfer(o) if dtype(o.x) == half => assert_eq!((dtype(o.y), o.g.hw), (half, 1)),
                Op::BatchNormBackward(o) if dtype(o.x) == half => {
                    assert_eq!(o.g.hw, 1);
                    assert!(dtype(o.dy) == half && o.dx.is_none_or(|d| dtype(d.buf) == half));
                    assert!(o.act.is_none_or(|a| dtype(a.y) == half), "a fused activation's output is half too");
                }
                Op::Act(o) if dtype(o.x) == half => assert_eq!(dtype(o.y), half),
                Op::ActBackward(o) if dtype(o.x) == half => {
                    assert!([o.y, o.dy, o.dx.buf].iter().all(|&b| dtype(b) == half));
                }
                Op::Add(o) if dtype(o.y) == half => assert!(o.inputs.iter().all(|&b| dtype(b) == half)),
                Op::GradInto(o) => assert_eq!(dtype(o.src), dtype(o.dst.buf)),
                Op::Cast(c) => {
                    assert!(dtype(c.src) != dtype(c.dst.buf) || c.permute.is_some(), "{c:?}");
                    assert!(Op::Cast(*c).check().is_ok(), "{c:?}");
                }
                other => {
                    let mut found = false;
                    other.clone().visit_bufs(&mut |b| found |= dtype(*b).is_half());
                    assert!(!found, "{} names a half buffer", other.name());
                }
            }
        }
        for b in [Some(p.input), Some(p.output), p.output_grad, p.input_grad].into_iter().flatten() {
            assert_eq!(dtype(b), DType::F32, "the plan's edges stay f32");
        }
    }

    #[test]
    fn activations_between_convolutions_stay_half() {
        for (precision, half) in [(Precision::Bf16Mixed, DType::BF16), (Precision::F16Mixed, DType::F16)] {
            let (p, table) = lower(precision, Mode::Train);
            check_dtypes(&p, &table, half);
            let dtype = dtype_in(&table);
            // Half: both convolutions' outputs, the ReLU's and batch norm's, and their gradients.
            let half_of = |role| table.buffers.iter().filter(|b| b.role == role && b.dtype == half).count();
            assert_eq!(half_of(BufRole::Activation), 4);
            assert!(half_of(BufRole::Gradient) >= 2, "gradients reuse buffers of one dtype");
            let fwd = casts(&p.forward);
            // Forward: the input narrowed and permuted, the three weights narrowed, batch
            // norm's output permuted (half to half) into the order flatten gives the dense layer.
            assert_eq!(fwd.len(), 5, "{fwd:?}");
            let perm = |c: &ops::Cast| c.permute.map(|p| (p.n, p.c, p.hw, p.to));
            assert_eq!(perm(&fwd[0]), Some((4, 3, 64, Nhwc)), "input");
            assert_eq!(perm(&fwd[1]), Some((6, 3, 9, Nhwc)), "filter to [k, kh, kw, c]");
            assert_eq!(perm(&fwd[2]), Some((6, 6, 9, Nhwc)), "second filter");
            assert_eq!(perm(&fwd[3]), Some((4, 6, 36, Nchw)), "batch norm's output for the dense layer");
            assert!(dtype(fwd[3].src) == half && dtype(fwd[3].dst.buf) == half);
            assert_eq!(perm(&fwd[4]), None, "dense weight");
            // The first convolution keeps its bias (added in NHWC).
            assert!(p.forward.iter().any(|o| matches!(o, Op::Conv2d(c) if c.b.is_some())));
            // Backward: the dense layer's input permuted again and its output gradient narrowed;
            // its f32 input gradient narrowed into batch norm's half output gradient (NHWC);
            // each filter gradient widened back (accumulating); the first convolution's input
            // narrowed again and its input gradient widened into the f32 input gradient.
            let back = casts(&p.backward);
            assert_eq!(back.len(), 7, "{back:?}");
            let to = |t| back.iter().filter(|c| c.permute.is_some_and(|p| p.to == t)).count();
            assert_eq!((to(Nhwc), to(Nchw)), (2, 4));
            assert!(back.iter().any(|c| c.dst.accumulate && perm(c) == Some((6, 6, 9, Nchw))));
            assert_eq!(back.iter().filter(|c| c.dst.accumulate).count(), 2, "the filter gradients");
            let ig = back.iter().find(|c| Some(c.dst.buf) == p.input_grad).expect("input gradient widened");
            assert_eq!(perm(ig), Some((4, 3, 64, Nchw)));
            // Weights are narrowed once, in forward: backward reads the same half copies.
            let fw: Vec<BufId> =
                p.forward.iter().filter_map(|o| if let Op::Conv2d(c) = o { Some(c.w) } else { None }).collect();
            let bw: Vec<BufId> = p
                .backward
                .iter()
                .filter_map(|o| if let Op::Conv2dBackward(c) = o { Some(c.w) } else { None })
                .collect();
            assert_eq!(bw.iter().rev().copied().collect::<Vec<_>>(), fw);
            assert_eq!((p.forward_nodes.len(), p.backward_nodes.len()), (p.forward.len(), p.backward.len()));
        }
    }

    /// An op without a half kernel (max pooling here) gets its half operand widened into f32
    /// NCHW before it, and its input gradient narrowed back after it.
    #[test]
    fn an_f32_op_between_half_ones_is_cast_around() {
        let b = ModelBuilder::new(&[2, 3, 8, 8]).conv2d(4, 3).relu().max_pool2d(2).flatten().dense(3);
        let (p, table) = lower_model(b, Precision::Bf16Mixed, Mode::Train);
        check_dtypes(&p, &table, DType::BF16);
        let at = p.forward.iter().position(|o| matches!(o, Op::MaxPool(_))).unwrap();
        let Op::Cast(c) = &p.forward[at - 1] else { panic!("a cast before max pooling") };
        assert_eq!(c.permute.map(|p| (p.n, p.c, p.hw, p.to)), Some((2, 4, 36, Nchw)));
        let at = p.backward.iter().position(|o| matches!(o, Op::MaxPoolBackward(_))).unwrap();
        let Op::Cast(c) = &p.backward[at + 1] else { panic!("a cast after max pooling's backward") };
        assert_eq!(c.permute.map(|p| (p.n, p.c, p.hw, p.to)), Some((2, 4, 36, Nhwc)));
        assert_eq!(dtype_in(&table)(c.dst.buf), DType::BF16);
    }

    /// ResNet-18: batch norm, ReLU, the residual sums and their gradients all run in half; the
    /// only activation casts are the input, the global average pool's input and gradient, the
    /// dense layer's, and the input gradient.
    #[test]
    fn resnet18_runs_half_between_its_edges() {
        let (p, table) = lower_model(zoo::resnet18(2, 10), Precision::Bf16Mixed, Mode::Train);
        check_dtypes(&p, &table, DType::BF16);
        let dtype = dtype_in(&table);
        let half = |b: BufId| dtype(b) == DType::BF16;
        assert_eq!(count(&p.forward, |o| matches!(o, Op::BatchNormTrain(b) if half(b.x))), 20);
        assert_eq!(count(&p.forward, |o| matches!(o, Op::Add(a) if half(a.y))), 8);
        assert_eq!(count(&p.backward, |o| matches!(o, Op::BatchNormBackward(b) if half(b.dy))), 20);
        assert_eq!(count(&p.backward, |o| matches!(o, Op::ActBackward(a) if half(a.dx.buf))), 17);
        // 21 weights (20 convolutions, the dense layer) narrowed once each, plus the input and
        // the pool's input (forward), ...
        let is_weight = |c: &ops::Cast| table.buffers.iter().any(|t| t.id == c.dst.buf && t.label.ends_with("weights"));
        let fwd = casts(&p.forward);
        assert_eq!(fwd.iter().filter(|c| is_weight(c)).count(), 21);
        assert_eq!(fwd.len() - 21, 3, "the input, the pool's input, the dense layer's input: {fwd:?}");
        assert!(casts(&p.backward).iter().all(|c| !is_weight(c)));
    }

    /// With batch norm + activation fusion (exec/fuse.rs, before this pass): ResNet-18's nine
    /// batch norms that a ReLU follows carry it and run in half NHWC as the others (backward
    /// reading the half activated output); the casts are those of the unfused plan, and the
    /// plan holds no more memory.
    #[test]
    fn fused_batch_norm_runs_half() {
        let (p, table) = lower_fused(zoo::resnet18(2, 10), Precision::Bf16Mixed, Mode::Train, true);
        let (q, tq) = lower_model(zoo::resnet18(2, 10), Precision::Bf16Mixed, Mode::Train);
        check_dtypes(&p, &table, DType::BF16);
        let dtype = dtype_in(&table);
        let half = |b: BufId| dtype(b) == DType::BF16;
        let fused_fwd = |o: &Op| matches!(o, Op::BatchNormTrain(b) if b.act.is_some() && half(b.x) && half(b.y));
        assert_eq!(count(&p.forward, fused_fwd), 9);
        assert_eq!(
            count(&p.backward, |o| matches!(o, Op::BatchNormBackward(b) if b.act.is_some_and(|a| half(a.y)))),
            9
        );
        assert_eq!(count(&p.forward, |o| matches!(o, Op::Act(_))), 8, "the ReLUs after the sums");
        assert_eq!(count(&p.backward, |o| matches!(o, Op::ActBackward(a) if half(a.dx.buf))), 8);
        // The same casts (the table's ids differ: nine entries fewer).
        let shapes = |c: Vec<ops::Cast>| c.iter().map(|c| (c.len, c.permute, c.dst.accumulate)).collect::<Vec<_>>();
        assert_eq!(shapes(casts(&p.forward)), shapes(casts(&q.forward)));
        assert_eq!(shapes(casts(&p.backward)), shapes(casts(&q.backward)));
        // No more memory of any kind. (The pre-activation buffers die in forward even unfused,
        // where ReLU's backward reads its output only, and share buffers by lifetime: fusion
        // drops their ops and passes, here no bytes.)
        let bytes = |t: &Table, role| t.buffers.iter().filter(|b| b.role == role).map(|b| b.bytes()).sum::<usize>();
        for role in BufRole::ALL {
            assert!(bytes(&table, role) <= bytes(&tq, role), "{role:?}");
        }
    }

    #[test]
    fn a_one_channel_input_is_cast_without_permuting() {
        assert!(super::permute(8, 1, 784, MemoryFormat::Nhwc).is_none());
        assert!(super::permute(8, 64, 1, MemoryFormat::Nchw).is_none());
        assert!(super::permute(8, 2, 2, MemoryFormat::Nchw).is_some());
    }

    #[test]
    fn f32_plans_are_untouched() {
        let (a, ta) = lower(Precision::F32, Mode::Eval);
        assert!(ta.buffers.iter().all(|b| b.dtype == DType::F32));
        assert!(!a.forward.iter().any(|o| matches!(o, Op::Cast(_))));
        let (b, tb) = lower(Precision::Bf16Mixed, Mode::Eval);
        check_dtypes(&b, &tb, DType::BF16);
        assert_eq!(b.forward.len(), a.forward.len() + 5);
    }
}
