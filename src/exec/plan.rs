//! Compiling a model into a plan: for one batch size and mode, the explicit ordered list of
//! forward kernels and backward kernels over buffers allocated once.
//!
//! Activations get a buffer each (views such as flatten share their input's); in training,
//! every tensor whose gradient is needed gets a gradient buffer, and what backward needs from
//! forward (batch-norm mean and inverse std, max-pool argmax, dropout mask) gets a named buffer.
//! Gradients flowing into one tensor from several consumers (a residual fork) are summed by
//! letting the first writer overwrite and the others accumulate, in the order backward runs.

use std::collections::HashSet;

use crate::backend::{ActFn, Backend, BnGeom, BufId, ConvGeom, CounterId, GradOut, Op, PoolGeom};
use crate::model::{Activation, Layer, Model, ParamRole, shape};
use crate::{Error, Result};

/// Training (batch statistics, dropout on, backward planned) or evaluation (forward only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    Train,
    Eval,
}

/// Options of a training plan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PlanOptions {
    /// Also compute the gradient with respect to the model input.
    pub input_grad: bool,
    /// Add parameter gradients to what the gradient buffers hold instead of overwriting them
    /// (gradient accumulation over several batches).
    pub accumulate_param_grads: bool,
}

/// What a planned buffer holds (for memory accounting and debugging).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufRole {
    Input,
    Activation,
    Gradient,
    /// Saved by forward for backward (mask, argmax, batch statistics).
    Saved,
}

/// One buffer a plan allocated.
#[derive(Clone, Debug)]
pub struct PlannedBuffer {
    pub id: BufId,
    pub len: usize,
    pub role: BufRole,
    pub label: String,
}

/// The device buffers of one parameter, shared by every plan of an executor.
#[derive(Clone, Copy, Debug)]
pub struct ParamBuffers {
    pub value: BufId,
    /// Gradient buffer, for trainable parameters.
    pub grad: Option<BufId>,
}

/// A compiled model for one batch size and mode.
#[derive(Clone, Debug)]
pub struct Plan {
    pub batch: usize,
    pub mode: Mode,
    pub options: PlanOptions,
    pub forward: Vec<Op>,
    /// Empty in evaluation mode.
    pub backward: Vec<Op>,
    pub input: BufId,
    pub output: BufId,
    /// Where the caller (the loss) writes the gradient of the output, in training mode.
    pub output_grad: Option<BufId>,
    /// The gradient of the input, when requested.
    pub input_grad: Option<BufId>,
    /// Output buffer of each node.
    pub node_outputs: Vec<BufId>,
    pub buffers: Vec<PlannedBuffer>,
}

impl Plan {
    /// Bytes of the buffers this plan owns (not counting parameters), for f32 storage.
    pub fn bytes(&self) -> usize {
        self.buffers.iter().map(|b| b.len * 4).sum()
    }
    /// Bytes of the buffers of one role.
    pub fn bytes_of(&self, role: BufRole) -> usize {
        self.buffers.iter().filter(|b| b.role == role).map(|b| b.len * 4).sum()
    }
}

/// A backend that only hands out buffer ids: compiling a plan against it measures the plan's
/// memory without allocating any (used to report what a plan that ran out of memory needed).
#[derive(Default)]
pub struct SizeOnly {
    lens: Vec<usize>,
    counters: usize,
}

impl Backend for SizeOnly {
    fn describe(&self) -> String {
        "size-only planning".into()
    }
    fn alloc(&mut self, len: usize) -> Result<BufId> {
        self.lens.push(len);
        Ok(BufId(self.lens.len() - 1))
    }
    fn len(&self, buf: BufId) -> usize {
        self.lens[buf.0]
    }
    fn free(&mut self, _: BufId) -> Result<()> {
        Ok(())
    }
    fn write(&mut self, _: BufId, _: &[f32]) -> Result<()> {
        Err(Error::State("a size-only backend holds no data".into()))
    }
    fn read(&mut self, _: BufId) -> Result<Vec<f32>> {
        Err(Error::State("a size-only backend holds no data".into()))
    }
    fn new_counter(&mut self) -> Result<CounterId> {
        self.counters += 1;
        Ok(CounterId(self.counters - 1))
    }
    fn counter(&mut self, _: CounterId) -> Result<u64> {
        Ok(0)
    }
    fn set_counter(&mut self, _: CounterId, _: u64) -> Result<()> {
        Ok(())
    }
    fn run(&mut self, _: &[Op]) -> Result<()> {
        Err(Error::State("a size-only backend runs nothing".into()))
    }
}

struct Builder<'a, B: Backend> {
    backend: &'a mut B,
    buffers: Vec<PlannedBuffer>,
    allocated: &'a mut Vec<BufId>,
}

impl<B: Backend> Builder<'_, B> {
    fn alloc(&mut self, len: usize, role: BufRole, label: String) -> Result<BufId> {
        let id = self.backend.alloc(len)?;
        self.allocated.push(id);
        self.buffers.push(PlannedBuffer { id, len, role, label });
        Ok(id)
    }
}

fn act_fn(a: &Activation) -> ActFn {
    match *a {
        Activation::Relu => ActFn::Relu,
        Activation::LeakyRelu { slope } => ActFn::LeakyRelu(slope),
        Activation::Elu { alpha } => ActFn::Elu(alpha),
        Activation::Sigmoid => ActFn::Sigmoid,
        Activation::Tanh => ActFn::Tanh,
        Activation::Silu => ActFn::Silu,
        Activation::Gelu => ActFn::Gelu,
    }
}

fn conv_geom(model: &Model, i: usize, batch: usize) -> Result<ConvGeom> {
    let node = &model.nodes()[i];
    let Layer::Conv2d(c) = &node.layer else { unreachable!("conv_geom on a non-conv node") };
    let ins = &model.nodes()[node.inputs[0]].shape;
    let r = shape::resolve_conv(&node.name, c, ins)?;
    Ok(ConvGeom {
        n: batch,
        c: ins[0],
        h: ins[1],
        w: ins[2],
        k: c.out_channels,
        kh: c.kernel.0,
        kw: c.kernel.1,
        sh: c.stride.0,
        sw: c.stride.1,
        ph: r.pad.0,
        pw: r.pad.1,
        dh: c.dilation.0,
        dw: c.dilation.1,
        groups: c.groups,
        oh: r.out_hw.0,
        ow: r.out_hw.1,
    })
}

fn pool_geom(
    ins: &[usize],
    out: &[usize],
    batch: usize,
    k: (usize, usize),
    s: (usize, usize),
    p: (usize, usize),
) -> PoolGeom {
    PoolGeom {
        n: batch,
        c: ins[0],
        h: ins[1],
        w: ins[2],
        kh: k.0,
        kw: k.1,
        sh: s.0,
        sw: s.1,
        ph: p.0,
        pw: p.1,
        oh: out.get(1).copied().unwrap_or(1),
        ow: out.get(2).copied().unwrap_or(1),
    }
}

/// `(outer, dim, inner)` of a softmax along `axis` of `[batch, ins...]`.
fn softmax_dims(batch: usize, ins: &[usize], axis: isize) -> (usize, usize, usize) {
    let mut full = vec![batch];
    full.extend_from_slice(ins);
    let ax = if axis < 0 { (axis + full.len() as isize) as usize } else { axis as usize };
    (full[..ax].iter().product(), full[ax], full[ax + 1..].iter().product())
}

fn bn_geom(ins: &[usize], batch: usize, eps: f32) -> BnGeom {
    BnGeom { n: batch, c: ins[0], hw: ins[1..].iter().product(), eps }
}

/// Finds the buffers of parameter `role` of node `i`.
fn param(model: &Model, params: &[ParamBuffers], i: usize, role: ParamRole) -> Option<ParamBuffers> {
    model.params().iter().position(|p| p.node == i && p.role == role).map(|k| params[k])
}

/// Compiles `model` for `batch` samples in `mode`, allocating the plan's buffers on `backend`.
/// `params` are the parameter buffers (in the order of `model.params()`), `counters` the dropout
/// counters by node.
pub fn compile<B: Backend>(
    model: &Model,
    params: &[ParamBuffers],
    counters: &[Option<CounterId>],
    backend: &mut B,
    batch: usize,
    mode: Mode,
    options: PlanOptions,
) -> Result<Plan> {
    let mut allocated = Vec::new();
    let r = compile_into(model, params, counters, backend, batch, mode, options, &mut allocated);
    if r.is_err() {
        // Leave the backend as it was, so a smaller batch can be tried.
        for id in allocated {
            backend.free(id)?;
        }
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn compile_into<B: Backend>(
    model: &Model,
    params: &[ParamBuffers],
    counters: &[Option<CounterId>],
    backend: &mut B,
    batch: usize,
    mode: Mode,
    options: PlanOptions,
    allocated: &mut Vec<BufId>,
) -> Result<Plan> {
    if batch == 0 {
        return Err(Error::config("batch size", "must be at least 1"));
    }
    let largest = model.nodes().iter().map(|n| n.shape.iter().product::<usize>()).max().unwrap_or(1);
    if largest.checked_mul(batch).is_none_or(|n| n > 1 << 40) {
        return Err(Error::config("batch size", format!("{batch} makes tensors of more than 2^40 values")));
    }
    let nodes = model.nodes();
    let numel = |i: usize| batch * nodes[i].shape.iter().product::<usize>();
    let mut b = Builder { backend, buffers: Vec::new(), allocated };
    let mut out: Vec<BufId> = Vec::with_capacity(nodes.len());
    let mut forward = Vec::new();
    // What backward needs from forward, per node.
    let mut saved: Vec<Vec<BufId>> = vec![Vec::new(); nodes.len()];

    for (i, node) in nodes.iter().enumerate() {
        let name = &node.name;
        let x = node.inputs.first().map(|&j| out[j]);
        let ins: &[usize] = node.inputs.first().map(|&j| nodes[j].shape.as_slice()).unwrap_or(&[]);
        let new_out = |b: &mut Builder<B>| b.alloc(numel(i), BufRole::Activation, name.clone());
        let y = match &node.layer {
            Layer::Input => b.alloc(numel(0), BufRole::Input, "input".into())?,
            Layer::Flatten | Layer::Reshape(_) => x.expect("view has an input"),
            Layer::Dropout { .. } if mode == Mode::Eval => x.expect("dropout has an input"),
            Layer::Conv2d(c) => {
                let y = new_out(&mut b)?;
                let g = conv_geom(model, i, batch)?;
                let w = param(model, params, i, ParamRole::Weight).expect("conv weight").value;
                let bias = if c.bias { param(model, params, i, ParamRole::Bias).map(|p| p.value) } else { None };
                forward.push(Op::Conv2d { g, x: x.unwrap(), w, b: bias, y });
                y
            }
            Layer::Linear(l) => {
                let y = new_out(&mut b)?;
                let w = param(model, params, i, ParamRole::Weight).expect("linear weight").value;
                let bias = if l.bias { param(model, params, i, ParamRole::Bias).map(|p| p.value) } else { None };
                forward.push(Op::Linear {
                    m: batch,
                    k: ins.iter().product(),
                    n: l.out_features,
                    x: x.unwrap(),
                    w,
                    b: bias,
                    y,
                });
                y
            }
            Layer::Activation(a) => {
                let y = new_out(&mut b)?;
                forward.push(Op::Act { f: act_fn(a), len: numel(i), x: x.unwrap(), y });
                y
            }
            Layer::Softmax { axis } => {
                let y = new_out(&mut b)?;
                let (outer, dim, inner) = softmax_dims(batch, ins, *axis);
                forward.push(Op::Softmax { outer, dim, inner, x: x.unwrap(), y });
                y
            }
            Layer::Dropout { rate } => {
                let y = new_out(&mut b)?;
                let mask = b.alloc(numel(i), BufRole::Saved, format!("{name}.mask"))?;
                let counter = counters[i].expect("dropout counter");
                let seed = crate::rng::mix_seed(model.seed() ^ 0xD80F_0A7E, i as u64);
                forward.push(Op::Dropout { rate: *rate, len: numel(i), seed, counter, x: x.unwrap(), y, mask });
                saved[i] = vec![mask];
                y
            }
            Layer::BatchNorm(bn) => {
                let g = bn_geom(ins, batch, bn.eps);
                if mode == Mode::Train && g.n * g.hw < 2 {
                    return Err(Error::layer(
                        name,
                        format!(
                            "batch norm in training needs more than one value per channel; \
                             batch {batch} of shape {ins:?} gives {}",
                            g.n * g.hw
                        ),
                    ));
                }
                let y = new_out(&mut b)?;
                let gamma = param(model, params, i, ParamRole::Weight).map(|p| p.value);
                let beta = param(model, params, i, ParamRole::Bias).map(|p| p.value);
                let rm = param(model, params, i, ParamRole::RunningMean).map(|p| p.value);
                let rv = param(model, params, i, ParamRole::RunningVar).map(|p| p.value);
                match (mode, rm, rv) {
                    (Mode::Eval, Some(rm), Some(rv)) => forward.push(Op::BatchNormInfer {
                        g,
                        x: x.unwrap(),
                        gamma,
                        beta,
                        running_mean: rm,
                        running_var: rv,
                        y,
                    }),
                    _ => {
                        let mean = b.alloc(g.c, BufRole::Saved, format!("{name}.mean"))?;
                        let invstd = b.alloc(g.c, BufRole::Saved, format!("{name}.invstd"))?;
                        let running = match (mode, rm, rv) {
                            (Mode::Train, Some(rm), Some(rv)) => Some((rm, rv, bn.momentum)),
                            _ => None,
                        };
                        forward.push(Op::BatchNormTrain {
                            g,
                            x: x.unwrap(),
                            gamma,
                            beta,
                            y,
                            mean,
                            invstd,
                            running,
                            sync: false,
                        });
                        saved[i] = vec![mean, invstd];
                    }
                }
                y
            }
            Layer::MaxPool2d(p) => {
                let y = new_out(&mut b)?;
                let argmax = b.alloc(numel(i), BufRole::Saved, format!("{name}.argmax"))?;
                let g = pool_geom(ins, &node.shape, batch, p.kernel, p.stride, p.padding);
                forward.push(Op::MaxPool { g, x: x.unwrap(), y, argmax });
                saved[i] = vec![argmax];
                y
            }
            Layer::AvgPool2d(p) => {
                let y = new_out(&mut b)?;
                let g = pool_geom(ins, &node.shape, batch, p.kernel, p.stride, p.padding);
                forward.push(Op::AvgPool { g, count_include_pad: p.count_include_pad, x: x.unwrap(), y });
                y
            }
            Layer::GlobalAvgPool => {
                let y = new_out(&mut b)?;
                let g = pool_geom(ins, &[], batch, (ins[1], ins[2]), (1, 1), (0, 0));
                forward.push(Op::AvgPool { g, count_include_pad: true, x: x.unwrap(), y });
                y
            }
            Layer::Add => {
                let y = new_out(&mut b)?;
                forward.push(Op::Add { len: numel(i), inputs: node.inputs.iter().map(|&j| out[j]).collect(), y });
                y
            }
            Layer::Concat => {
                let y = new_out(&mut b)?;
                let inner = node.shape[1..].iter().product();
                let parts = node.inputs.iter().map(|&j| (out[j], nodes[j].shape[0])).collect();
                forward.push(Op::Concat { n: batch, inner, parts, y });
                y
            }
        };
        out.push(y);
    }

    let mut plan = Plan {
        batch,
        mode,
        options,
        forward,
        backward: Vec::new(),
        input: out[0],
        output: *out.last().unwrap(),
        output_grad: None,
        input_grad: None,
        node_outputs: out.clone(),
        buffers: Vec::new(),
    };
    if mode == Mode::Train {
        plan_backward(model, params, &mut b, &mut plan, &saved, options)?;
    }
    plan.buffers = b.buffers;
    Ok(plan)
}

fn plan_backward<B: Backend>(
    model: &Model,
    params: &[ParamBuffers],
    b: &mut Builder<B>,
    plan: &mut Plan,
    saved: &[Vec<BufId>],
    options: PlanOptions,
) -> Result<()> {
    let nodes = model.nodes();
    let batch = plan.batch;
    let numel = |i: usize| batch * nodes[i].shape.iter().product::<usize>();
    let out = &plan.node_outputs;

    // A node needs the gradient of its output if it has trainable parameters or one of its
    // inputs needs a gradient.
    let mut needs = vec![false; nodes.len()];
    needs[0] = options.input_grad;
    for i in 1..nodes.len() {
        let has_params = model.params().iter().any(|p| p.node == i && p.trainable);
        needs[i] = has_params || nodes[i].inputs.iter().any(|&j| needs[j]);
    }
    // Gradient buffers are planned in two passes: the ops are written against virtual ids,
    // then each virtual buffer gets a physical one that is free over its lifetime (from the op
    // that first writes it to the op that last reads it), so backward needs memory for the
    // gradients alive at once, not for every tensor's gradient.
    let mut grad: Vec<Option<BufId>> = vec![None; nodes.len()];
    let mut virtual_len: Vec<(usize, String)> = Vec::new();
    for i in 0..nodes.len() {
        if !needs[i] {
            continue;
        }
        let is_view = matches!(nodes[i].layer, Layer::Flatten | Layer::Reshape(_));
        grad[i] = Some(if is_view {
            grad[nodes[i].inputs[0]].expect("view input needs grad")
        } else {
            virtual_len.push((numel(i), format!("{}.grad", nodes[i].name)));
            BufId(VIRTUAL + virtual_len.len() - 1)
        });
    }
    let last = nodes.len() - 1;
    let Some(dout) = grad[last] else {
        // Nothing to differentiate (no parameters, no input gradient).
        return Ok(());
    };
    plan.output_grad = Some(dout);
    plan.input_grad = grad[0];

    let mut written: HashSet<BufId> = HashSet::from([dout]);
    let into = |j: usize, written: &mut HashSet<BufId>| -> Option<GradOut> {
        let g = grad[j]?;
        let accumulate = !written.insert(g);
        Some(GradOut { buf: g, accumulate })
    };
    let pgrad = |i: usize, role: ParamRole| -> Option<GradOut> {
        param(model, params, i, role)
            .and_then(|p| p.grad)
            .map(|g| GradOut { buf: g, accumulate: options.accumulate_param_grads })
    };

    let mut ops = Vec::new();
    for i in (1..nodes.len()).rev() {
        let Some(dy) = grad[i] else { continue };
        let node = &nodes[i];
        let x = out[node.inputs[0]];
        let y = out[i];
        let j0 = node.inputs[0];
        match &node.layer {
            Layer::Input | Layer::Flatten | Layer::Reshape(_) => {}
            Layer::Conv2d(_) => {
                let g = conv_geom(model, i, batch)?;
                let w = param(model, params, i, ParamRole::Weight).unwrap().value;
                ops.push(Op::Conv2dBackward {
                    g,
                    x,
                    w,
                    dy,
                    dx: into(j0, &mut written),
                    dw: pgrad(i, ParamRole::Weight).unwrap(),
                    db: pgrad(i, ParamRole::Bias),
                });
            }
            Layer::Linear(l) => {
                let w = param(model, params, i, ParamRole::Weight).unwrap().value;
                ops.push(Op::LinearBackward {
                    m: batch,
                    k: nodes[j0].shape.iter().product(),
                    n: l.out_features,
                    x,
                    w,
                    dy,
                    dx: into(j0, &mut written),
                    dw: pgrad(i, ParamRole::Weight).unwrap(),
                    db: pgrad(i, ParamRole::Bias),
                });
            }
            Layer::Activation(a) => {
                if let Some(dx) = into(j0, &mut written) {
                    ops.push(Op::ActBackward { f: act_fn(a), len: numel(i), x, y, dy, dx });
                }
            }
            Layer::Softmax { axis } => {
                if let Some(dx) = into(j0, &mut written) {
                    let (outer, dim, inner) = softmax_dims(batch, &nodes[j0].shape, *axis);
                    ops.push(Op::SoftmaxBackward { outer, dim, inner, y, dy, dx });
                }
            }
            Layer::Dropout { .. } => {
                if let Some(dx) = into(j0, &mut written) {
                    ops.push(Op::DropoutBackward { len: numel(i), mask: saved[i][0], dy, dx });
                }
            }
            Layer::BatchNorm(bn) => {
                let g = bn_geom(&nodes[j0].shape, batch, bn.eps);
                let dx = into(j0, &mut written);
                let (dgamma, dbeta) = (pgrad(i, ParamRole::Weight), pgrad(i, ParamRole::Bias));
                if dx.is_some() || dgamma.is_some() {
                    ops.push(Op::BatchNormBackward {
                        g,
                        x,
                        gamma: param(model, params, i, ParamRole::Weight).map(|p| p.value),
                        mean: saved[i][0],
                        invstd: saved[i][1],
                        dy,
                        dx,
                        dgamma,
                        dbeta,
                        sync: false,
                    });
                }
            }
            Layer::MaxPool2d(p) => {
                if let Some(dx) = into(j0, &mut written) {
                    let g = pool_geom(&nodes[j0].shape, &node.shape, batch, p.kernel, p.stride, p.padding);
                    ops.push(Op::MaxPoolBackward { g, argmax: saved[i][0], dy, dx });
                }
            }
            Layer::AvgPool2d(p) => {
                if let Some(dx) = into(j0, &mut written) {
                    let g = pool_geom(&nodes[j0].shape, &node.shape, batch, p.kernel, p.stride, p.padding);
                    ops.push(Op::AvgPoolBackward { g, count_include_pad: p.count_include_pad, dy, dx });
                }
            }
            Layer::GlobalAvgPool => {
                if let Some(dx) = into(j0, &mut written) {
                    let s = &nodes[j0].shape;
                    let g = pool_geom(s, &[], batch, (s[1], s[2]), (1, 1), (0, 0));
                    ops.push(Op::AvgPoolBackward { g, count_include_pad: true, dy, dx });
                }
            }
            Layer::Add => {
                for &j in &node.inputs {
                    if let Some(dst) = into(j, &mut written) {
                        ops.push(Op::GradInto { len: numel(i), src: dy, dst });
                    }
                }
            }
            Layer::Concat => {
                let parts: Vec<(Option<GradOut>, usize)> =
                    node.inputs.iter().map(|&j| (into(j, &mut written), nodes[j].shape[0])).collect();
                if parts.iter().any(|p| p.0.is_some()) {
                    ops.push(Op::ConcatBackward { n: batch, inner: node.shape[1..].iter().product(), parts, dy });
                }
            }
        }
    }
    // Lifetimes of the virtual gradient buffers over `ops`: the output gradient is written
    // before backward starts (by the loss) and the input gradient is read after it ends.
    let n_virtual = virtual_len.len();
    let mut first = vec![usize::MAX; n_virtual];
    let mut last = vec![0usize; n_virtual];
    for (k, op) in ops.iter_mut().enumerate() {
        op.visit_bufs(&mut |b: &mut BufId| {
            if b.0 >= VIRTUAL {
                let v = b.0 - VIRTUAL;
                first[v] = first[v].min(k + 1);
                last[v] = last[v].max(k + 1);
            }
        });
    }
    first[dout.0 - VIRTUAL] = 0;
    if let Some(ig) = plan.input_grad {
        last[ig.0 - VIRTUAL] = ops.len() + 1;
    }
    let mut order: Vec<usize> = (0..n_virtual).collect();
    order.sort_by_key(|&v| first[v]);
    let mut physical = vec![BufId(0); n_virtual];
    // (buffer, length, free after op index)
    let mut pool: Vec<(BufId, usize, usize)> = Vec::new();
    for v in order {
        let (len, label) = &virtual_len[v];
        let reuse = pool.iter().position(|&(_, l, free_after)| l == *len && free_after < first[v]);
        physical[v] = match reuse {
            Some(p) => {
                pool[p].2 = last[v];
                pool[p].0
            }
            None => {
                let id = b.alloc(*len, BufRole::Gradient, label.clone())?;
                pool.push((id, *len, last[v]));
                id
            }
        };
    }
    let map = |b: &mut BufId| {
        if b.0 >= VIRTUAL {
            *b = physical[b.0 - VIRTUAL];
        }
    };
    let mut map = map;
    for op in &mut ops {
        op.visit_bufs(&mut map);
    }
    plan.output_grad.iter_mut().for_each(&mut map);
    plan.input_grad.iter_mut().for_each(&mut map);
    plan.backward = ops;
    Ok(())
}

/// Virtual gradient buffer ids start here, far above any real id.
const VIRTUAL: usize = usize::MAX / 2;
