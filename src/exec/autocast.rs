//! Mixed precision ([`crate::exec::Precision::Bf16Mixed`]): the compiler's pass that puts convolutions and
//! matrix products on bf16 tensor cores, as PyTorch's `autocast(dtype=torch.bfloat16)` does,
//! while everything else stays f32.
//!
//! The network's ops are lowered in f32 first, as always; this pass then rewrites each
//! convolution and dense op (forward and backward) into casts around a bf16 op:
//!
//! ```text
//! Conv2d(x, w, b -> y)            Cast x -> X, Cast w -> W, Conv2d(X, W -> Y), Cast Y (+ b) -> y
//! Conv2dBackward(x, w, dy         Cast x -> X, Cast w -> W (if dx), Cast dy -> DY,
//!   -> dx, dw, db)                Conv2dBackward(X, W, DY -> DX, DW, db), Cast DX (+)-> dx, Cast DW (+)-> dw
//! Linear(x, w, b -> y)            Cast x -> X, Cast w -> W, Linear(X, W, b -> y)
//! LinearBackward(x, w, dy         Cast x -> X, Cast w -> W (if dx), Cast dy -> DY,
//!   -> dx, dw, db)                LinearBackward(X, W, DY -> dx, dw, db)
//! ```
//!
//! Capital letters are bf16 scratch buffers. cuDNN's bf16 convolutions write a bf16 result
//! (`PSEUDO_BFLOAT16_CONFIG`), so their outputs and gradients are widened by a cast, which also
//! adds the bias and accumulates where the gradient does; cuBLASLt writes f32 directly. Bias
//! gradients are summed in f64 from the bf16 output gradient (as autocast's bf16 bias).
//! Activations, their gradients, parameters (the master weights) and their gradients stay
//! f32, so batch norm, softmax, losses, clipping and the optimizer see f32 as before.
//!
//! Work on a stream is serialised, so the scratch is shared: one buffer per operand (inputs,
//! weights, outputs and output gradients, input gradients, weight gradients), as long as the
//! largest use, in the plan's workspace. Casting the input and weight again in backward
//! instead of keeping forward's bf16 copies costs a pass over them and saves holding a bf16
//! copy of every activation until backward. Transposed convolutions stay f32 for now.

use super::compile::Table;
use super::plan::{BufRole, Plan};
use crate::backend::ops::{self, Cast, CastBias, GradOut, Op};
use crate::backend::{BufId, DType};

/// The scratch operands.
const X: usize = 0;
const W: usize = 1;
const Y: usize = 2;
const DX: usize = 3;
const DW: usize = 4;
const LABELS: [&str; 5] = [
    "bf16 inputs",
    "bf16 weights",
    "bf16 outputs and output gradients",
    "bf16 input gradients",
    "bf16 weight gradients",
];

/// Values of each scratch operand that `op` needs once rewritten (0: none).
fn needs(op: &Op) -> [usize; 5] {
    match op {
        Op::Conv2d(o) => [o.g.input_len(), o.g.weight_len(), o.g.output_len(), 0, 0],
        Op::Conv2dBackward(o) => {
            let g = &o.g;
            [
                g.input_len(),
                g.weight_len(),
                g.output_len(),
                if o.dx.is_some() { g.input_len() } else { 0 },
                g.weight_len(),
            ]
        }
        Op::Linear(o) => [o.m * o.k, o.n * o.k, 0, 0, 0],
        Op::LinearBackward(o) => [o.m * o.k, o.n * o.k, o.m * o.n, 0, 0],
        _ => [0; 5],
    }
}

/// Rewrites `plan`'s forward and backward for [`crate::exec::Precision::Bf16Mixed`] (see the module
/// documentation), adding the bf16 scratch to `table`. The op-to-node maps follow: each cast
/// belongs to the layer of the op it serves.
pub(super) fn bf16(plan: &mut Plan, table: &mut Table) {
    let mut len = [0usize; 5];
    for op in plan.forward.iter().chain(&plan.backward) {
        for (l, n) in len.iter_mut().zip(needs(op)) {
            *l = (*l).max(n);
        }
    }
    // A dummy id where an operand is never used (no op below names it).
    let mut scratch = [BufId(usize::MAX); 5];
    for (s, (&l, label)) in scratch.iter_mut().zip(len.iter().zip(LABELS)) {
        if l > 0 {
            *s = table.new_buffer(l, DType::BF16, BufRole::Workspace, label.into());
        }
    }
    rewrite(&mut plan.forward, &mut plan.forward_nodes, &scratch);
    rewrite(&mut plan.backward, &mut plan.backward_nodes, &scratch);
}

fn rewrite(ops: &mut Vec<Op>, owners: &mut Vec<usize>, s: &[BufId; 5]) {
    let mut out = Vec::with_capacity(ops.len() * 3);
    let mut own = Vec::with_capacity(ops.len() * 3);
    for (op, &node) in ops.iter().zip(owners.iter()) {
        expand(op, s, &mut out);
        own.resize(out.len(), node);
    }
    *ops = out;
    *owners = own;
}

/// `dst = bf16(src)` over `len` values.
fn narrow(len: usize, src: BufId, dst: BufId) -> Op {
    Op::Cast(Cast { len, src, dst: GradOut { buf: dst, accumulate: false }, bias: None })
}

/// `dst (=|+=) f32(src) (+ bias)` over `len` values.
fn widen(len: usize, src: BufId, dst: GradOut, bias: Option<CastBias>) -> Op {
    Op::Cast(Cast { len, src, dst, bias })
}

fn overwrite(buf: BufId) -> GradOut {
    GradOut { buf, accumulate: false }
}

/// Pushes `op`, rewritten for bf16 where it is a convolution or a matrix product.
fn expand(op: &Op, s: &[BufId; 5], out: &mut Vec<Op>) {
    match *op {
        Op::Conv2d(o) => {
            let g = o.g;
            out.push(narrow(g.input_len(), o.x, s[X]));
            out.push(narrow(g.weight_len(), o.w, s[W]));
            out.push(Op::Conv2d(ops::Conv2d { g, x: s[X], w: s[W], b: None, y: s[Y] }));
            let bias = o.b.map(|buf| CastBias { buf, channels: g.k, inner: g.oh * g.ow });
            out.push(widen(g.output_len(), s[Y], overwrite(o.y), bias));
        }
        Op::Conv2dBackward(o) => {
            let g = o.g;
            out.push(narrow(g.input_len(), o.x, s[X]));
            if o.dx.is_some() {
                out.push(narrow(g.weight_len(), o.w, s[W]));
            }
            out.push(narrow(g.output_len(), o.dy, s[Y]));
            out.push(Op::Conv2dBackward(ops::Conv2dBackward {
                g,
                x: s[X],
                w: s[W],
                dy: s[Y],
                dx: o.dx.map(|_| overwrite(s[DX])),
                dw: overwrite(s[DW]),
                db: o.db,
            }));
            if let Some(dx) = o.dx {
                out.push(widen(g.input_len(), s[DX], dx, None));
            }
            out.push(widen(g.weight_len(), s[DW], o.dw, None));
        }
        Op::Linear(o) => {
            out.push(narrow(o.m * o.k, o.x, s[X]));
            out.push(narrow(o.n * o.k, o.w, s[W]));
            out.push(Op::Linear(ops::Linear { x: s[X], w: s[W], ..o }));
        }
        Op::LinearBackward(o) => {
            out.push(narrow(o.m * o.k, o.x, s[X]));
            if o.dx.is_some() {
                out.push(narrow(o.n * o.k, o.w, s[W]));
            }
            out.push(narrow(o.m * o.n, o.dy, s[Y]));
            out.push(Op::LinearBackward(ops::LinearBackward { x: s[X], w: s[W], dy: s[Y], ..o }));
        }
        _ => out.push(op.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::Precision;
    use super::super::compile::{self, Lowering, Table};
    use super::super::plan::{Mode, ParamBuffers, PlanOptions};
    use crate::backend::{BufId, DType, Op};
    use crate::model::{Conv2d, ModelBuilder};

    fn lower(precision: Precision, mode: Mode) -> (crate::exec::Plan, Table) {
        let model = ModelBuilder::new(&[4, 3, 8, 8])
            .conv2d_with(Conv2d::new(6, 3).padding(1))
            .relu()
            .conv2d_with(Conv2d::new(6, 3).bias(false))
            .batch_norm()
            .flatten()
            .dense(5)
            .seed(1)
            .build()
            .unwrap();
        let params: Vec<ParamBuffers> = (0..model.params().len())
            .map(|i| ParamBuffers {
                value: BufId(2 * i),
                grad: model.params()[i].trainable.then_some(BufId(2 * i + 1)),
            })
            .collect();
        let low = Lowering {
            batch: 4,
            mode,
            options: PlanOptions { input_grad: true, accumulate_param_grads: true },
            dropout_seed: 0,
            rank: 0,
            sync_batch_norm: false,
            update_running_stats: true,
            precision,
        };
        let mut table = Table::default();
        let plan = compile::network(&model, &params, &vec![None; model.nodes().len()], &low, &mut table).unwrap();
        (plan, table)
    }

    fn count(ops: &[Op], f: impl Fn(&Op) -> bool) -> usize {
        ops.iter().filter(|o| f(o)).count()
    }

    #[test]
    fn convolutions_and_products_move_to_bf16_between_casts() {
        let (f32p, _) = lower(Precision::F32, Mode::Train);
        let (p, table) = lower(Precision::Bf16Mixed, Mode::Train);
        let dtype = |b: BufId| table.buffers.iter().find(|t| t.id == b).map_or(DType::F32, |t| t.dtype);
        // Five bf16 scratch buffers, all workspace; nothing else of the plan changes dtype.
        let scratch: Vec<_> = table.buffers.iter().filter(|b| b.dtype == DType::BF16).collect();
        assert_eq!(scratch.len(), 5);
        assert!(scratch.iter().all(|b| b.role == crate::exec::BufRole::Workspace));
        // Forward: 2 convolutions (x, w, widen) and 1 dense (x, w) -> 8 casts.
        assert_eq!(count(&p.forward, |o| matches!(o, Op::Cast(_))), 8);
        assert_eq!(p.forward.len(), f32p.forward.len() + 8);
        // Backward (the input gradient is asked for): each convolution x, w, dy, then dx and
        // dw widened = 5; dense x, w, dy = 3.
        assert_eq!(count(&p.backward, |o| matches!(o, Op::Cast(_))), 13);
        assert_eq!((p.forward_nodes.len(), p.backward_nodes.len()), (p.forward.len(), p.backward.len()));
        for op in p.forward.iter().chain(&p.backward) {
            match op {
                Op::Conv2d(o) => {
                    assert!([o.x, o.w, o.y].iter().all(|&b| dtype(b) == DType::BF16));
                    assert_eq!(o.b, None, "the bias moves into the widening cast");
                }
                Op::Conv2dBackward(o) => assert!([o.x, o.w, o.dy, o.dw.buf].iter().all(|&b| dtype(b) == DType::BF16)),
                Op::Linear(o) => {
                    assert!(dtype(o.x) == DType::BF16 && dtype(o.w) == DType::BF16 && dtype(o.y) == DType::F32)
                }
                Op::LinearBackward(o) => {
                    assert!(dtype(o.dy) == DType::BF16 && dtype(o.dw.buf) == DType::F32);
                    assert!(o.dx.is_some_and(|d| dtype(d.buf) == DType::F32));
                }
                Op::Cast(c) => assert_ne!(dtype(c.src), dtype(c.dst.buf)),
                other => {
                    let mut bf16 = false;
                    other.clone().visit_bufs(&mut |b| bf16 |= dtype(*b) == DType::BF16);
                    assert!(!bf16, "{} names a bf16 buffer", other.name());
                }
            }
        }
        // Accumulating parameter gradients: the casts into them accumulate.
        let dw_casts = p.backward.iter().filter(|o| matches!(o, Op::Cast(c) if c.dst.accumulate)).count();
        assert_eq!(dw_casts, 2, "the two convolution weight gradients");
    }

    #[test]
    fn f32_plans_are_untouched() {
        let (a, ta) = lower(Precision::F32, Mode::Eval);
        assert!(ta.buffers.iter().all(|b| b.dtype == DType::F32));
        assert!(!a.forward.iter().any(|o| matches!(o, Op::Cast(_))));
        let (b, _) = lower(Precision::Bf16Mixed, Mode::Eval);
        assert_eq!(b.forward.len(), a.forward.len() + 8);
    }
}
