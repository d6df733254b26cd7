//! Mixed precision ([`crate::exec::Precision::Bf16Mixed`], and f16 through the same pass): the
//! compiler's pass that puts convolutions and matrix products on tensor cores in a half
//! precision dtype (bf16 or f16, the pass's parameter), as PyTorch's
//! `autocast(dtype=torch.bfloat16)` (or `float16`) does, while everything else stays f32.
//!
//! The network's ops are lowered in f32 first, as always; this pass then rewrites each
//! convolution and dense op (forward and backward) into casts around a half op:
//!
//! ```text
//! Conv2d(x, w, b -> y)            Cast x -> X', Cast w -> W', Conv2d'(X', W' -> Y'), Cast Y' (+ b) -> y
//! Conv2dBackward(x, w, dy         Cast x -> X', Cast w -> W' (if dx), Cast dy -> DY',
//!   -> dx, dw, db)                Conv2dBackward'(X', W', DY' -> DX', DW', db), Cast DX' (+)-> dx, Cast DW' (+)-> dw
//! Linear(x, w, b -> y)            Cast x -> X, Cast w -> W, Linear(X, W, b -> y)
//! LinearBackward(x, w, dy         Cast x -> X, Cast w -> W (if dx), Cast dy -> DY,
//!   -> dx, dw, db)                LinearBackward(X, W, DY -> dx, dw, db)
//! ```
//!
//! Capital letters are half scratch buffers; a prime marks channels-last (NHWC) order: the
//! casts around a convolution also permute (activations NCHW <-> NHWC, filters `[k, c, kh, kw]`
//! <-> `[k, kh, kw, c]`, cuDNN's NHWC filter layout), in the same pass over memory, and the
//! convolution runs in [`MemoryFormat::Nhwc`], where cuDNN's tensor-core kernels read their
//! operands without transposing them (in NCHW they are slower than f32 on Hopper, see
//! `backend/cuda/NOTES.md`). A permutation that changes nothing (one channel, or one position)
//! is left out. The user-facing layout and every other op stay NCHW f32: the conversions happen
//! at each convolution's edges, not once at the plan's (a whole-plan NHWC layout, with batch
//! norm and activations in NHWC, is a later step).
//!
//! cuDNN's half convolutions write a half result (`PSEUDO_BFLOAT16_CONFIG`, `PSEUDO_HALF_CONFIG`;
//! the filter gradient too: the legacy API takes one data type for x, w and their gradients),
//! so their outputs and gradients are widened by a cast, which also adds the bias and
//! accumulates where the gradient does; cuBLASLt writes f32 directly. Bias gradients are summed
//! in f64 from the half output gradient (as autocast's half bias). Activations, their gradients,
//! parameters (the master weights) and their gradients stay f32, so batch norm, softmax,
//! losses, clipping and the optimizer see f32 as before.
//!
//! Work on a stream is serialised, so the scratch is shared: one buffer per operand (inputs,
//! weights, outputs and output gradients, input gradients, weight gradients), as long as the
//! largest use, in the plan's workspace. Casting the input and weight again in backward
//! instead of keeping forward's half copies costs a pass over them and saves holding a half
//! copy of every activation until backward. Transposed convolutions stay f32 for now.

use super::Precision;
use super::compile::Table;
use super::plan::{BufRole, Plan};
use crate::backend::ops::{self, Cast, CastBias, CastPermute, GradOut, MemoryFormat, Op};
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

/// The scratch operands.
const X: usize = 0;
const W: usize = 1;
const Y: usize = 2;
const DX: usize = 3;
const DW: usize = 4;
const LABELS: [&str; 5] = ["inputs", "weights", "outputs and output gradients", "input gradients", "weight gradients"];

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

/// Rewrites `plan`'s forward and backward for mixed precision in `half` (bf16 or f16; see the
/// module documentation), adding the half scratch to `table`. The op-to-node maps follow: each
/// cast belongs to the layer of the op it serves.
pub(super) fn mixed(plan: &mut Plan, table: &mut Table, half: DType) {
    debug_assert!(half.is_half(), "mixed precision in {half}");
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
            *s = table.new_buffer(l, half, BufRole::Workspace, format!("{half} {label}"));
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

/// `n` blocks of `c` channels by `hw` positions written in order `to`; `None` where the two
/// orders are the same bytes (one channel or one position).
fn permute(n: usize, c: usize, hw: usize, to: MemoryFormat) -> Option<CastPermute> {
    (c > 1 && hw > 1).then_some(CastPermute { n, c, hw, to })
}

/// `dst = half(src)` over `len` values, permuted where `p` says.
fn narrow(len: usize, src: BufId, dst: BufId, p: Option<CastPermute>) -> Op {
    Op::Cast(Cast { len, src, dst: GradOut { buf: dst, accumulate: false }, bias: None, permute: p })
}

/// `dst (=|+=) f32(src) (+ bias)` over `len` values, permuted where `p` says.
fn widen(len: usize, src: BufId, dst: GradOut, bias: Option<CastBias>, p: Option<CastPermute>) -> Op {
    Op::Cast(Cast { len, src, dst, bias, permute: p })
}

fn overwrite(buf: BufId) -> GradOut {
    GradOut { buf, accumulate: false }
}

/// Pushes `op`, rewritten for half precision where it is a convolution or a matrix product.
fn expand(op: &Op, s: &[BufId; 5], out: &mut Vec<Op>) {
    use MemoryFormat::{Nchw, Nhwc};
    match *op {
        Op::Conv2d(o) => {
            let g = o.g;
            let (cg, taps) = (g.c / g.groups, g.kh * g.kw);
            out.push(narrow(g.input_len(), o.x, s[X], permute(g.n, g.c, g.h * g.w, Nhwc)));
            out.push(narrow(g.weight_len(), o.w, s[W], permute(g.k, cg, taps, Nhwc)));
            out.push(Op::Conv2d(ops::Conv2d { g, format: Nhwc, x: s[X], w: s[W], b: None, y: s[Y] }));
            let bias = o.b.map(|buf| CastBias { buf, channels: g.k, inner: g.oh * g.ow });
            out.push(widen(g.output_len(), s[Y], overwrite(o.y), bias, permute(g.n, g.k, g.oh * g.ow, Nchw)));
        }
        Op::Conv2dBackward(o) => {
            let g = o.g;
            let (cg, taps) = (g.c / g.groups, g.kh * g.kw);
            out.push(narrow(g.input_len(), o.x, s[X], permute(g.n, g.c, g.h * g.w, Nhwc)));
            if o.dx.is_some() {
                out.push(narrow(g.weight_len(), o.w, s[W], permute(g.k, cg, taps, Nhwc)));
            }
            out.push(narrow(g.output_len(), o.dy, s[Y], permute(g.n, g.k, g.oh * g.ow, Nhwc)));
            out.push(Op::Conv2dBackward(ops::Conv2dBackward {
                g,
                format: Nhwc,
                x: s[X],
                w: s[W],
                dy: s[Y],
                dx: o.dx.map(|_| overwrite(s[DX])),
                dw: overwrite(s[DW]),
                db: o.db,
            }));
            if let Some(dx) = o.dx {
                out.push(widen(g.input_len(), s[DX], dx, None, permute(g.n, g.c, g.h * g.w, Nchw)));
            }
            out.push(widen(g.weight_len(), s[DW], o.dw, None, permute(g.k, cg, taps, Nchw)));
        }
        Op::Linear(o) => {
            out.push(narrow(o.m * o.k, o.x, s[X], None));
            out.push(narrow(o.n * o.k, o.w, s[W], None));
            out.push(Op::Linear(ops::Linear { x: s[X], w: s[W], ..o }));
        }
        Op::LinearBackward(o) => {
            out.push(narrow(o.m * o.k, o.x, s[X], None));
            if o.dx.is_some() {
                out.push(narrow(o.n * o.k, o.w, s[W], None));
            }
            out.push(narrow(o.m * o.n, o.dy, s[Y], None));
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
    use crate::backend::ops::MemoryFormat;
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

    /// The f32 plan rewritten for `half` (what `Precision::Bf16Mixed` plans with `BF16`).
    fn mixed(half: DType) -> (crate::exec::Plan, Table) {
        let (mut p, mut table) = lower(Precision::F32, Mode::Train);
        super::mixed(&mut p, &mut table, half);
        (p, table)
    }

    #[test]
    fn convolutions_and_products_move_to_half_between_casts() {
        let (f32p, _) = lower(Precision::F32, Mode::Train);
        let (bf, _) = lower(Precision::Bf16Mixed, Mode::Train);
        let m = mixed(DType::BF16).0;
        assert_eq!((&bf.forward, &bf.backward), (&m.forward, &m.backward), "Bf16Mixed is the pass in bf16");
        for half in [DType::BF16, DType::F16] {
            let (p, table) = mixed(half);
            let dtype = |b: BufId| table.buffers.iter().find(|t| t.id == b).map_or(DType::F32, |t| t.dtype);
            // Five half scratch buffers, all workspace; nothing else of the plan changes dtype.
            let scratch: Vec<_> = table.buffers.iter().filter(|b| b.dtype.is_half()).collect();
            assert_eq!(scratch.len(), 5);
            assert!(scratch.iter().all(|b| b.role == crate::exec::BufRole::Workspace && b.dtype == half));
            // Forward: 2 convolutions (x, w, widen) and 1 dense (x, w) -> 8 casts.
            assert_eq!(count(&p.forward, |o| matches!(o, Op::Cast(_))), 8);
            assert_eq!(p.forward.len(), f32p.forward.len() + 8);
            // Backward (the input gradient is asked for): each convolution x, w, dy, then dx
            // and dw widened = 5; dense x, w, dy = 3.
            assert_eq!(count(&p.backward, |o| matches!(o, Op::Cast(_))), 13);
            assert_eq!((p.forward_nodes.len(), p.backward_nodes.len()), (p.forward.len(), p.backward.len()));
            for op in p.forward.iter().chain(&p.backward) {
                match op {
                    Op::Conv2d(o) => {
                        assert!([o.x, o.w, o.y].iter().all(|&b| dtype(b) == half));
                        assert_eq!(o.b, None, "the bias moves into the widening cast");
                        assert_eq!(o.format, MemoryFormat::Nhwc);
                    }
                    Op::Conv2dBackward(o) => {
                        assert!([o.x, o.w, o.dy, o.dw.buf].iter().all(|&b| dtype(b) == half));
                        assert_eq!(o.format, MemoryFormat::Nhwc);
                    }
                    Op::Linear(o) => assert!(dtype(o.x) == half && dtype(o.w) == half && dtype(o.y) == DType::F32),
                    Op::LinearBackward(o) => {
                        assert!(dtype(o.dy) == half && dtype(o.dw.buf) == DType::F32);
                        assert!(o.dx.is_some_and(|d| dtype(d.buf) == DType::F32));
                    }
                    Op::Cast(c) => assert_ne!(dtype(c.src), dtype(c.dst.buf)),
                    other => {
                        let mut found = false;
                        other.clone().visit_bufs(&mut |b| found |= dtype(*b).is_half());
                        assert!(!found, "{} names a half buffer", other.name());
                    }
                }
            }
            // Accumulating parameter gradients: the casts into them accumulate.
            let dw_casts = p.backward.iter().filter(|o| matches!(o, Op::Cast(c) if c.dst.accumulate)).count();
            assert_eq!(dw_casts, 2, "the two convolution weight gradients");
        }
    }

    /// Every cast around a convolution changes the memory order (this model has no
    /// one-channel or one-position operand), into NHWC before it and back after it, with the
    /// geometry of the operand it carries; the dense layer's casts do not.
    #[test]
    fn the_casts_around_convolutions_permute() {
        use MemoryFormat::{Nchw, Nhwc};
        let (p, _) = mixed(DType::BF16);
        // First convolution: 4 x 3 x 8x8 -> 4 x 6 x 8x8, filter 6 x 3 x 3x3.
        let casts: Vec<_> =
            p.forward.iter().filter_map(|o| if let Op::Cast(c) = o { Some(*c) } else { None }).collect();
        let perm = |i: usize| casts[i].permute.map(|p| (p.n, p.c, p.hw, p.to));
        assert_eq!(perm(0), Some((4, 3, 64, Nhwc)), "input");
        assert_eq!(perm(1), Some((6, 3, 9, Nhwc)), "filter to [k, kh, kw, c]");
        assert_eq!(perm(2), Some((4, 6, 64, Nchw)), "output back");
        assert!(casts[2].bias.is_some_and(|b| (b.channels, b.inner) == (6, 64)));
        // Second convolution: 4 x 6 x 8x8 -> 4 x 6 x 6x6, no bias.
        assert_eq!(perm(5), Some((4, 6, 36, Nchw)));
        assert!(casts[5].bias.is_none());
        // The dense layer's two casts: plain.
        assert!(casts[6..].iter().all(|c| c.permute.is_none()));
        let back: Vec<_> =
            p.backward.iter().filter_map(|o| if let Op::Cast(c) = o { Some(*c) } else { None }).collect();
        let to = |to| back.iter().filter(|c| c.permute.is_some_and(|p| p.to == to)).count();
        // Per convolution x, w, dy into NHWC; dx, dw back.
        assert_eq!((to(Nhwc), to(Nchw)), (6, 4));
        // The filter gradient goes back to [k, c, kh, kw] and accumulates.
        assert!(back.iter().any(|c| c.dst.accumulate && c.permute.is_some_and(|p| (p.n, p.c, p.hw) == (6, 6, 9))));
        for c in casts.iter().chain(&back) {
            assert!(Op::Cast(*c).check().is_ok(), "{c:?}");
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
        let (b, _) = lower(Precision::Bf16Mixed, Mode::Eval);
        assert_eq!(b.forward.len(), a.forward.len() + 8);
    }
}
