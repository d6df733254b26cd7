//! Computing what needs no layer: operators on constants and shape values (PyTorch's exporters
//! leave `Shape`, `Gather`, `Concat`, `Reshape` chains and transposed weights when constant
//! folding is off or the batch is dynamic), the target shapes of reshapes, and the pieces of
//! GELU's erf formula, recognised in the orders PyTorch's two exporters write them.

use super::import::{GeluStage, Importer, Params, Res, Sym, Val};
use super::proto::NodeProto;
use super::read::{Attrs, Const, ConstData};
use crate::model::{Activation, Layer};

/// A static tensor's values as one of two element kinds.
enum Data {
    F(Vec<f32>),
    S(Vec<Sym>),
}

fn data_of(v: &Val) -> Option<(Vec<usize>, Data)> {
    match v {
        Val::Const(Const { dims, data: ConstData::F32(f) }) => Some((dims.clone(), Data::F(f.clone()))),
        Val::Const(Const { dims, data: ConstData::I64(i) }) => {
            Some((dims.clone(), Data::S(i.iter().map(|&k| Sym::Known(k)).collect())))
        }
        Val::Shape { dims, vals } => Some((dims.clone(), Data::S(vals.clone()))),
        _ => None,
    }
}

fn to_val(dims: Vec<usize>, d: Data) -> Val {
    match d {
        Data::F(f) => Val::Const(Const { dims, data: ConstData::F32(f) }),
        Data::S(s) if s.iter().all(|v| matches!(v, Sym::Known(_))) => Val::Const(Const {
            dims,
            data: ConstData::I64(s.iter().map(|v| if let Sym::Known(k) = v { *k } else { 0 }).collect()),
        }),
        Data::S(vals) => Val::Shape { dims, vals },
    }
}

/// Known integers of a static value (an error if it holds the batch size or floats).
fn known_ints(v: &Val, what: &str) -> Res<Vec<i64>> {
    match data_of(v) {
        Some((_, Data::S(s))) => s
            .iter()
            .map(|v| match v {
                Sym::Known(k) => Ok(*k),
                Sym::Batch => Err(format!("{what} depends on the batch size")),
            })
            .collect(),
        _ => Err(format!("{what} must be a constant integer tensor")),
    }
}

/// The axes of Squeeze/Unsqueeze/ReduceMean: input `k` (opset 13+) or the `axes` attribute.
fn axes(imp: &Importer, node: &NodeProto, a: &Attrs, k: usize) -> Res<Option<Vec<i64>>> {
    match imp.opt_input(node, k)? {
        Some(v) => known_ints(&v, "axes").map(Some),
        None => a.ints("axes"),
    }
}

fn norm_axis(axis: i64, rank: usize) -> Res<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if (0..r).contains(&a) { Ok(a as usize) } else { Err(format!("axis {axis} is out of range for rank {rank}")) }
}

fn split(dims: &[usize], axis: usize) -> (usize, usize, usize) {
    (dims[..axis].iter().product(), dims[axis], dims[axis + 1..].iter().product())
}

fn gather<T: Clone>(dims: &[usize], v: &[T], idx: &[i64], idims: &[usize], axis: usize) -> Res<(Vec<usize>, Vec<T>)> {
    let (outer, n, inner) = split(dims, axis);
    let mut out = Vec::new();
    for o in 0..outer {
        for &i in idx {
            let j = if i < 0 { i + n as i64 } else { i };
            if !(0..n as i64).contains(&j) {
                return Err(format!("index {i} is out of range for size {n}"));
            }
            let start = (o * n + j as usize) * inner;
            out.extend_from_slice(&v[start..start + inner]);
        }
    }
    let mut od = dims[..axis].to_vec();
    od.extend_from_slice(idims);
    od.extend_from_slice(&dims[axis + 1..]);
    Ok((od, out))
}

fn transpose_nd<T: Clone>(dims: &[usize], v: &[T], perm: &[usize]) -> (Vec<usize>, Vec<T>) {
    let rank = dims.len();
    let mut strides = vec![1usize; rank];
    for i in (0..rank.saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    let od: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
    let mut out = Vec::with_capacity(v.len());
    let mut idx = vec![0usize; rank];
    for _ in 0..v.len() {
        let src: usize = (0..rank).map(|k| idx[k] * strides[perm[k]]).sum();
        out.push(v[src].clone());
        for k in (0..rank).rev() {
            idx[k] += 1;
            if idx[k] < od[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    (od, out)
}

/// Applies a shape-only operator to a static value's elements.
fn apply<T: Clone>(
    imp: &Importer,
    node: &NodeProto,
    a: &Attrs,
    op: &str,
    dims: Vec<usize>,
    v: Vec<T>,
) -> Res<(Vec<usize>, Vec<T>)> {
    match op {
        "Gather" => {
            let idx_val = imp.input(node, 1)?;
            let idx = known_ints(&idx_val, "indices")?;
            let idims = match &idx_val {
                Val::Const(c) => c.dims.clone(),
                Val::Shape { dims, .. } => dims.clone(),
                _ => vec![idx.len()],
            };
            let axis = norm_axis(a.int("axis", 0)?, dims.len())?;
            gather(&dims, &v, &idx, &idims, axis)
        }
        "Unsqueeze" => {
            let ax = axes(imp, node, a, 1)?.ok_or("Unsqueeze needs axes")?;
            let rank = dims.len() + ax.len();
            let mut ax: Vec<usize> = ax.iter().map(|&x| norm_axis(x, rank)).collect::<Res<_>>()?;
            ax.sort();
            let mut od = dims.clone();
            for x in ax {
                od.insert(x.min(od.len()), 1);
            }
            Ok((od, v))
        }
        "Squeeze" => {
            let od: Vec<usize> = match axes(imp, node, a, 1)? {
                None => dims.iter().copied().filter(|&d| d != 1).collect(),
                Some(ax) => {
                    let ax: Vec<usize> = ax.iter().map(|&x| norm_axis(x, dims.len())).collect::<Res<_>>()?;
                    if ax.iter().any(|&x| dims[x] != 1) {
                        return Err(format!("cannot squeeze a dimension that is not 1 ({dims:?}, axes {ax:?})"));
                    }
                    dims.iter().enumerate().filter(|(i, _)| !ax.contains(i)).map(|(_, &d)| d).collect()
                }
            };
            Ok((od, v))
        }
        "Reshape" => {
            let target = known_ints(&imp.input(node, 1)?, "the target shape")?;
            let n = v.len();
            let mut od = Vec::new();
            let mut infer = None;
            for (i, &t) in target.iter().enumerate() {
                match t {
                    -1 if infer.is_none() => {
                        infer = Some(i);
                        od.push(1);
                    }
                    0 => od.push(*dims.get(i).ok_or("a 0 in the target shape has no input dimension to copy")?),
                    t if t > 0 => od.push(t as usize),
                    _ => return Err(format!("invalid target shape {target:?}")),
                }
            }
            let known: usize = od.iter().product();
            if let Some(i) = infer {
                if known == 0 || !n.is_multiple_of(known) {
                    return Err(format!("cannot reshape {dims:?} into {target:?}"));
                }
                od[i] = n / known;
            }
            if od.iter().product::<usize>() != n {
                return Err(format!("cannot reshape {dims:?} into {target:?}"));
            }
            Ok((od, v))
        }
        "Transpose" => {
            let perm: Vec<usize> = match a.ints("perm")? {
                Some(p) => p.iter().map(|&x| norm_axis(x, dims.len())).collect::<Res<_>>()?,
                None => (0..dims.len()).rev().collect(),
            };
            let mut seen = perm.clone();
            seen.sort();
            if seen != (0..dims.len()).collect::<Vec<_>>() {
                return Err(format!("perm {perm:?} is not a permutation of {} axes", dims.len()));
            }
            Ok(transpose_nd(&dims, &v, &perm))
        }
        "Slice" => {
            if dims.len() != 1 {
                return Err("slicing constants is supported for 1-D tensors only".into());
            }
            let get = |k: usize| -> Res<Option<Vec<i64>>> {
                imp.opt_input(node, k)?.map(|v| known_ints(&v, "slice bounds")).transpose()
            };
            let starts = get(1)?.or(a.ints("starts")?).ok_or("Slice needs starts")?;
            let ends = get(2)?.or(a.ints("ends")?).ok_or("Slice needs ends")?;
            let steps = get(4)?.unwrap_or(vec![1]);
            if starts.len() != 1 || ends.len() != 1 || steps.len() != 1 || steps[0] == 0 {
                return Err("only a single-axis slice is supported".into());
            }
            if let Some(ax) = get(3)?.or(a.ints("axes")?)
                && ax.iter().any(|&x| x != 0 && x != -1)
            {
                return Err(format!("slice axes {ax:?} out of range for a 1-D tensor"));
            }
            let n = dims[0] as i64;
            let clamp = |x: i64, hi: i64| if x < 0 { (x + n).clamp(0, hi) } else { x.min(hi) };
            let step = steps[0];
            let mut out = Vec::new();
            if step > 0 {
                let (mut i, e) = (clamp(starts[0], n), clamp(ends[0], n));
                while i < e {
                    out.push(v[i as usize].clone());
                    i += step;
                }
            } else {
                let (mut i, e) = (clamp(starts[0], n - 1), if ends[0] < -n { -1 } else { clamp(ends[0], n - 1) });
                while i > e {
                    out.push(v[i as usize].clone());
                    i += step;
                }
            }
            Ok((vec![out.len()], out))
        }
        _ => Err("this operator is not supported on constants".into()),
    }
}

/// Folds a shape-only operator whose inputs are all static.
pub(super) fn fold(imp: &Importer, node: &NodeProto, a: &Attrs) -> Res<Val> {
    let op = node.op_type.as_deref().unwrap_or("");
    if op == "Concat" {
        let parts: Vec<(Vec<usize>, Data)> = (0..node.input.len())
            .map(|k| imp.input(node, k).and_then(|v| data_of(&v).ok_or_else(|| "inputs must be static".to_string())))
            .collect::<Res<_>>()?;
        let Some((first, _)) = parts.first() else { return Err("Concat needs inputs".into()) };
        let rank = first.len();
        let axis = norm_axis(a.int("axis", 0)?, rank)?;
        let floats = matches!(parts[0].1, Data::F(_));
        let mut od = first.clone();
        od[axis] = 0;
        for (d, v) in &parts {
            if d.len() != rank
                || d.iter().enumerate().any(|(i, &x)| i != axis && x != first[i])
                || matches!(v, Data::F(_)) != floats
            {
                return Err("Concat inputs do not fit together".into());
            }
            od[axis] += d[axis];
        }
        let (outer, _, _) = split(first, axis);
        macro_rules! cat {
            ($variant:ident) => {{
                let mut out = Vec::new();
                for o in 0..outer {
                    for (d, v) in &parts {
                        let Data::$variant(v) = v else { unreachable!("checked above") };
                        let chunk = d[axis..].iter().product::<usize>();
                        out.extend_from_slice(&v[o * chunk..(o + 1) * chunk]);
                    }
                }
                Data::$variant(out)
            }};
        }
        let out = if floats { cat!(F) } else { cat!(S) };
        return Ok(to_val(od, out));
    }
    let (dims, d) = data_of(&imp.input(node, 0)?).ok_or("input 0 must be static")?;
    let (od, out) = match d {
        Data::F(v) => {
            let (od, v) = apply(imp, node, a, op, dims, v)?;
            (od, Data::F(v))
        }
        Data::S(v) => {
            let (od, v) = apply(imp, node, a, op, dims, v)?;
            (od, Data::S(v))
        }
    };
    Ok(to_val(od, out))
}

/// The per-sample ONNX shape after a Reshape, Squeeze or Unsqueeze of an activation whose
/// per-sample shape is `xs`. The batch axis must stay where it is.
pub(super) fn target_shape(imp: &Importer, node: &NodeProto, a: &Attrs, op: &str, xs: &[usize]) -> Res<Vec<usize>> {
    match op {
        "Reshape" => {
            let (_, d) = data_of(&imp.input(node, 1)?).ok_or("the target shape must be static")?;
            let Data::S(t) = d else { return Err("the target shape must be integers".into()) };
            if a.int("allowzero", 0)? != 0 && t.contains(&Sym::Known(0)) {
                return Err("allowzero with a 0 in the target shape is not supported".into());
            }
            let per: usize = xs.iter().product();
            let Some((first, rest)) = t.split_first() else { return Err("an empty target shape".into()) };
            let mut out = Vec::new();
            let mut infer = None;
            for (i, s) in rest.iter().enumerate() {
                match *s {
                    Sym::Known(-1) if infer.is_none() => {
                        infer = Some(i);
                        out.push(1);
                    }
                    Sym::Known(0) => out.push(*xs.get(i).ok_or("a 0 in the target shape has nothing to copy")?),
                    Sym::Known(k) if k > 0 && k <= 1 << 32 => out.push(k as usize),
                    _ => return Err(format!("target shape {t:?} is not supported")),
                }
            }
            let batch_kept = match *first {
                Sym::Batch | Sym::Known(0) => true,
                Sym::Known(-1) => infer.is_none(),
                Sym::Known(b) => imp.fixed_batch == Some(b as usize),
            };
            if !batch_kept {
                return Err(format!("target shape {t:?} changes the batch dimension"));
            }
            let known: usize = out.iter().product();
            if let Some(i) = infer {
                if known == 0 || !per.is_multiple_of(known) {
                    return Err(format!("cannot reshape per-sample {xs:?} into {t:?}"));
                }
                out[i] = per / known;
            }
            if out.iter().product::<usize>() != per {
                return Err(format!("cannot reshape per-sample {xs:?} into {t:?} (the batch size would change)"));
            }
            Ok(out)
        }
        "Unsqueeze" => {
            let ax = axes(imp, node, a, 1)?.ok_or("Unsqueeze needs axes")?;
            let rank = xs.len() + 1 + ax.len();
            let mut ax: Vec<usize> = ax.iter().map(|&x| norm_axis(x, rank)).collect::<Res<_>>()?;
            ax.sort();
            let mut full = vec![usize::MAX];
            full.extend_from_slice(xs);
            for x in ax {
                if x == 0 {
                    return Err("unsqueezing before the batch axis is not supported".into());
                }
                full.insert(x.min(full.len()), 1);
            }
            Ok(full[1..].to_vec())
        }
        _ => {
            let rank = xs.len() + 1;
            let keep: Vec<bool> = match axes(imp, node, a, 1)? {
                None => (0..rank).map(|i| i == 0 || xs[i - 1] != 1).collect(),
                Some(ax) => {
                    let ax: Vec<usize> = ax.iter().map(|&x| norm_axis(x, rank)).collect::<Res<_>>()?;
                    if ax.contains(&0) {
                        return Err("squeezing the batch axis is not supported".into());
                    }
                    if ax.iter().any(|&x| xs[x - 1] != 1) {
                        return Err(format!("cannot squeeze a dimension that is not 1 (per-sample {xs:?})"));
                    }
                    (0..rank).map(|i| !ax.contains(&i)).collect()
                }
            };
            Ok(xs.iter().enumerate().filter(|(i, _)| keep[i + 1]).map(|(_, &d)| d).collect())
        }
    }
}

fn scalar(v: &Val) -> Option<f32> {
    match v {
        Val::Const(c) if c.len() == 1 => match &c.data {
            ConstData::F32(f) => Some(f[0]),
            ConstData::I64(i) => Some(i[0] as f32),
        },
        _ => None,
    }
}

fn near(v: Option<f32>, target: f32) -> bool {
    v.is_some_and(|v| (v - target).abs() <= 1e-6 * target.abs().max(1.0))
}

/// `Div(x, sqrt 2)` and `Erf` of it: the first steps of GELU's formula.
pub(super) fn gelu_part(imp: &mut Importer, node: &NodeProto, op: &str) -> Res<()> {
    let x = imp.input(node, 0)?;
    let next = match (op, &x) {
        ("Div", Val::Act { node: n, shape }) if near(scalar(&imp.input(node, 1)?), std::f32::consts::SQRT_2) => {
            Val::Gelu { stage: GeluStage::Scaled, x: *n, shape: shape.clone() }
        }
        ("Erf", Val::Gelu { stage: GeluStage::Scaled, x: n, shape }) => {
            Val::Gelu { stage: GeluStage::Erf, x: *n, shape: shape.clone() }
        }
        _ => {
            return Err(format!("{op} is supported only as part of GELU's formula x * 0.5 * (1 + erf(x / sqrt(2)))"));
        }
    };
    imp.set(node, 0, next);
    Ok(())
}

/// `Add(erf(x / sqrt 2), 1)`.
pub(super) fn gelu_add(imp: &mut Importer, node: &NodeProto, vals: &[Val]) -> Res<()> {
    match vals {
        [Val::Gelu { stage: GeluStage::Erf, x, shape }, one] | [one, Val::Gelu { stage: GeluStage::Erf, x, shape }]
            if near(scalar(one), 1.0) =>
        {
            let v = Val::Gelu { stage: GeluStage::OnePlusErf, x: *x, shape: shape.clone() };
            imp.set(node, 0, v);
            Ok(())
        }
        _ => Err("part of an unrecognised formula (only GELU's erf formula is supported)".into()),
    }
}

/// The multiplications of GELU's formula, in the orders the exporters write: `(x * (1 + erf)) *
/// 0.5` (TorchScript), `x * (0.5 * (1 + erf))` (dynamo), `(0.5 * x) * (1 + erf)`, and
/// `x * (1 / sqrt 2)` for its first step.
pub(super) fn gelu_mul(imp: &mut Importer, node: &NodeProto, p: Val, q: Val) -> Res<()> {
    use GeluStage::*;
    let gelu = |imp: &mut Importer, x: usize, shape: &[usize]| -> Res<Val> {
        let base = super::read::gelu_name(node);
        let n = imp.add(&base, Layer::Activation(Activation::Gelu), vec![x], Params::new())?;
        Ok(Val::Act { node: n, shape: shape.to_vec() })
    };
    for (a, b) in [(&p, &q), (&q, &p)] {
        let out = match (a, b) {
            (Val::Act { node: x, shape }, c) if near(scalar(c), std::f32::consts::FRAC_1_SQRT_2) => {
                Some(Val::Gelu { stage: Scaled, x: *x, shape: shape.clone() })
            }
            (Val::Act { node: x, shape }, c) if near(scalar(c), 0.5) => {
                Some(Val::Gelu { stage: HalfX, x: *x, shape: shape.clone() })
            }
            (Val::Act { node: x, shape }, Val::Gelu { stage: OnePlusErf, x: y, .. }) if x == y => {
                Some(Val::Gelu { stage: TimesX, x: *x, shape: shape.clone() })
            }
            (Val::Gelu { stage: OnePlusErf, x, shape }, c) if near(scalar(c), 0.5) => {
                Some(Val::Gelu { stage: HalfOnePlusErf, x: *x, shape: shape.clone() })
            }
            (Val::Act { node: x, shape }, Val::Gelu { stage: HalfOnePlusErf, x: y, .. }) if x == y => {
                Some(gelu(imp, *x, shape)?)
            }
            (Val::Gelu { stage: TimesX, x, shape }, c) if near(scalar(c), 0.5) => Some(gelu(imp, *x, shape)?),
            (Val::Gelu { stage: HalfX, x, shape }, Val::Gelu { stage: OnePlusErf, x: y, .. }) if x == y => {
                Some(gelu(imp, *x, shape)?)
            }
            _ => None,
        };
        if let Some(v) = out {
            imp.set(node, 0, v);
            return Ok(());
        }
    }
    Err("Mul is supported only in SiLU (x * sigmoid(x)) and GELU's erf formula".into())
}
