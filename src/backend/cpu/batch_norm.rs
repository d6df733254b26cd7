//! Batch normalisation on the CPU: training (batch statistics, running-statistic update as
//! PyTorch does it), inference (running statistics) and backward.
//!
//! Layout `[n, c, hw]`. Per-channel sums are taken in f64 whatever the element type, then the
//! normalisation is applied image by image in parallel.
//!
//! Synchronised batch norm (a data-parallel group's communicator given) all-reduces those f64
//! sums, with the sample count, over the group: the mean, then the squared deviations from it,
//! in the forward pass (the same two-pass formula, so a group of one computes exactly what
//! plain batch norm does); the sums of `dy` and `dy * xhat` in the backward pass.

use rayon::prelude::*;

use super::CpuBackend;
use super::float::Float;
use super::{Grad, store};
use crate::Result;
use crate::backend::Communicator;
use crate::backend::ops::{self, ActFn, BnGeom, OpDesc, RunOp};

/// Per channel: f64 sums of `f(x)` over the batch and spatial positions.
fn channel_sums<T: Float>(g: &BnGeom, x: &[T], f: impl Fn(usize, T) -> f64 + Sync) -> Vec<f64> {
    (0..g.c)
        .into_par_iter()
        .map(|c| {
            let mut s = 0.0;
            for n in 0..g.n {
                let base = (n * g.c + c) * g.hw;
                for &v in &x[base..base + g.hw] {
                    s += f(c, v);
                }
            }
            s
        })
        .collect()
}

/// `y[n, c, i] = f(x[n, c, i] * scale[c] + shift[c])` (`f` the fused activation, if any),
/// image by image in parallel. The affine value is rounded to `T` before `f`, as batch norm
/// then an activation op compute it.
fn affine<T: Float>(g: &BnGeom, x: &[T], scale: &[T], shift: &[T], act: Option<ActFn>, y: &mut [T]) {
    y.par_chunks_mut(g.c * g.hw).zip(x.par_chunks(g.c * g.hw)).for_each(|(y, x)| {
        for c in 0..g.c {
            let (a, b) = (scale[c], shift[c]);
            let r = c * g.hw..(c + 1) * g.hw;
            let pairs = y[r.clone()].iter_mut().zip(&x[r]);
            match act {
                None => pairs.for_each(|(y, &x)| *y = x * a + b),
                Some(f) => pairs.for_each(|(y, &x)| *y = super::activation::apply(f, x * a + b)),
            }
        }
    });
}

/// The gradient batch norm's own output gets: `dy`, or with a fused activation
/// `dy * f'(from the activated output z)`, rounded to `T` as the activation's backward op
/// would store it.
#[inline]
fn grad_in<T: Float>(dy: &[T], act: Option<(ActFn, &[T])>, i: usize) -> T {
    match act {
        None => dy[i],
        Some((f, z)) => super::activation::derivative_from_output(f, z[i]) * dy[i],
    }
}

fn gamma_beta<T: Float>(c: usize, gamma: Option<&[T]>, beta: Option<&[T]>) -> (Vec<T>, Vec<T>) {
    (
        gamma.map(|g| g.to_vec()).unwrap_or_else(|| vec![T::ONE; c]),
        beta.map(|b| b.to_vec()).unwrap_or_else(|| vec![T::ZERO; c]),
    )
}

/// Training forward. `running` is `(running_mean, running_var, momentum)`; `sync` the group
/// whose statistics to use (synchronised batch norm); `act` the activation fused into the
/// output, if any.
pub fn forward_train<T: Float>(
    g: &BnGeom,
    x: &[T],
    (gamma, beta): (Option<&[T]>, Option<&[T]>),
    (y, act): (&mut [T], Option<ActFn>),
    (mean, invstd): (&mut [T], &mut [T]),
    running: Option<(&mut [T], &mut [T], f32)>,
    mut sync: Option<&mut dyn Communicator>,
) -> Result<()> {
    let mut count = (g.n * g.hw) as f64;
    let mut sums = channel_sums(g, x, |_, v| v.to_f64());
    if let Some(comm) = sync.as_deref_mut() {
        sums.push(count);
        comm.all_reduce_sum_f64(&mut sums)?;
        count = sums.pop().expect("count pushed above");
    }
    let mu: Vec<f64> = sums.iter().map(|s| s / count).collect();
    let mut sq = channel_sums(g, x, |c, v| {
        let d = v.to_f64() - mu[c];
        d * d
    });
    if let Some(comm) = sync {
        comm.all_reduce_sum_f64(&mut sq)?;
    }
    let var: Vec<f64> = sq.iter().map(|s| s / count).collect();
    for c in 0..g.c {
        mean[c] = T::from_f64(mu[c]);
        invstd[c] = T::from_f64(1.0 / (var[c] + g.eps as f64).sqrt());
    }
    if let Some((rm, rv, momentum)) = running {
        let m = momentum as f64;
        let unbias = if count > 1.0 { count / (count - 1.0) } else { 1.0 };
        for c in 0..g.c {
            rm[c] = T::from_f64((1.0 - m) * rm[c].to_f64() + m * mu[c]);
            rv[c] = T::from_f64((1.0 - m) * rv[c].to_f64() + m * var[c] * unbias);
        }
    }
    let (gm, bt) = gamma_beta(g.c, gamma, beta);
    let scale: Vec<T> = (0..g.c).map(|c| gm[c] * invstd[c]).collect();
    let shift: Vec<T> = (0..g.c).map(|c| bt[c] - mean[c] * scale[c]).collect();
    affine(g, x, &scale, &shift, act, y);
    Ok(())
}

/// Evaluation forward with running statistics, then the fused activation `act`, if any.
pub fn forward_infer<T: Float>(
    g: &BnGeom,
    x: &[T],
    (gamma, beta): (Option<&[T]>, Option<&[T]>),
    (rm, rv): (&[T], &[T]),
    act: Option<ActFn>,
    y: &mut [T],
) {
    let (gm, bt) = gamma_beta(g.c, gamma, beta);
    let eps = T::from_f32(g.eps);
    let scale: Vec<T> = (0..g.c).map(|c| gm[c] / (rv[c] + eps).sqrt()).collect();
    let shift: Vec<T> = (0..g.c).map(|c| bt[c] - rm[c] * scale[c]).collect();
    affine(g, x, &scale, &shift, act, y);
}

/// Backward of the training forward:
/// `dx = gamma * invstd / M * (M * dy - sum(dy) - xhat * sum(dy * xhat))`,
/// `dgamma = sum(dy * xhat)`, `dbeta = sum(dy)`, with `M = n * hw`. With `sync`, `dx` takes
/// the sums and `M` over the group; `dgamma` and `dbeta` stay local (the gradient all-reduce
/// averages them). With a fused activation `act` = (f, its output z), `dy` is the gradient
/// of `z` and batch norm's own output gradient is `dy * f'(z)`.
pub fn backward<T: Float>(
    g: &BnGeom,
    x: &[T],
    gamma: Option<&[T]>,
    (mean, invstd): (&[T], &[T]),
    (dy, act): (&[T], Option<(ActFn, &[T])>),
    [dx, dgamma, dbeta]: [Option<Grad<'_, T>>; 3],
    sync: Option<&mut dyn Communicator>,
) -> Result<()> {
    let mut sums: Vec<(f64, f64)> = (0..g.c)
        .into_par_iter()
        .map(|c| {
            let (m, is) = (mean[c].to_f64(), invstd[c].to_f64());
            let (mut sdy, mut sdyx) = (0.0, 0.0);
            for n in 0..g.n {
                let base = (n * g.c + c) * g.hw;
                for (i, xv) in x.iter().enumerate().skip(base).take(g.hw) {
                    let d = grad_in(dy, act, i).to_f64();
                    sdy += d;
                    sdyx += d * (xv.to_f64() - m) * is;
                }
            }
            (sdy, sdyx)
        })
        .collect();
    if let Some((db, acc)) = dbeta {
        for c in 0..g.c {
            store(&mut db[c], T::from_f64(sums[c].0), acc);
        }
    }
    if let Some((dg, acc)) = dgamma {
        for c in 0..g.c {
            store(&mut dg[c], T::from_f64(sums[c].1), acc);
        }
    }
    if let Some((dx, acc)) = dx {
        let mut count = (g.n * g.hw) as f64;
        if let Some(comm) = sync {
            let mut flat: Vec<f64> = sums.iter().flat_map(|&(a, b)| [a, b]).collect();
            flat.push(count);
            comm.all_reduce_sum_f64(&mut flat)?;
            count = flat[2 * g.c];
            sums = flat[..2 * g.c].chunks_exact(2).map(|p| (p[0], p[1])).collect();
        }
        let gm: Vec<f64> = (0..g.c).map(|c| gamma.map(|g| g[c].to_f64()).unwrap_or(1.0)).collect();
        dx.par_chunks_mut(g.c * g.hw).enumerate().for_each(|(n, dxn)| {
            for c in 0..g.c {
                let (m, is) = (mean[c].to_f64(), invstd[c].to_f64());
                let k = gm[c] * is / count;
                let (sdy, sdyx) = sums[c];
                let base = (n * g.c + c) * g.hw;
                for i in 0..g.hw {
                    let xhat = (x[base + i].to_f64() - m) * is;
                    let v = k * (count * grad_in(dy, act, base + i).to_f64() - sdy - xhat * sdyx);
                    store(&mut dxn[c * g.hw + i], T::from_f64(v), acc);
                }
            }
        });
    }
    Ok(())
}

impl<T: Float> RunOp<ops::BatchNormTrain> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::BatchNormTrain) -> Result<()> {
        let ops::BatchNormTrain { g, x, gamma, beta, y, mean, invstd, running, sync, act } = o;
        let comm = match sync {
            true => Some(super::group(&mut self.comm, ops::BatchNormTrain::NAME)?),
            false => None,
        };
        let mut yv = std::mem::take(&mut self.bufs[y.0]);
        let mut mv = std::mem::take(&mut self.bufs[mean.0]);
        let mut iv = std::mem::take(&mut self.bufs[invstd.0]);
        let mut rv =
            running.map(|(m, v, mom)| (std::mem::take(&mut self.bufs[m.0]), std::mem::take(&mut self.bufs[v.0]), mom));
        let b = &self.bufs;
        let r = forward_train(
            g,
            &b[x.0],
            (gamma.map(|i| b[i.0].as_slice()), beta.map(|i| b[i.0].as_slice())),
            (&mut yv, *act),
            (&mut mv, &mut iv),
            rv.as_mut().map(|(m, v, mom)| (m.as_mut_slice(), v.as_mut_slice(), *mom)),
            comm,
        );
        self.put(*y, yv);
        self.put(*mean, mv);
        self.put(*invstd, iv);
        if let (Some((mi, vi, _)), Some((m, v, _))) = (running, rv) {
            self.put(*mi, m);
            self.put(*vi, v);
        }
        r
    }
}

impl<T: Float> RunOp<ops::BatchNormInfer> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::BatchNormInfer) -> Result<()> {
        let ops::BatchNormInfer { g, x, gamma, beta, running_mean, running_var, y, act } = o;
        let mut yv = self.take(*y);
        let b = &self.bufs;
        forward_infer(
            g,
            &b[x.0],
            (gamma.map(|i| b[i.0].as_slice()), beta.map(|i| b[i.0].as_slice())),
            (&b[running_mean.0], &b[running_var.0]),
            *act,
            &mut yv,
        );
        self.put(*y, yv);
        Ok(())
    }
}

impl<T: Float> RunOp<ops::BatchNormBackward> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::BatchNormBackward) -> Result<()> {
        let ops::BatchNormBackward { g, x, gamma, mean, invstd, dy, dx, dgamma, dbeta, sync, act } = *o;
        self.with_grads([dx, dgamma, dbeta], |b, grads| {
            let comm = match sync {
                true => Some(super::group(&mut b.comm, ops::BatchNormBackward::NAME)?),
                false => None,
            };
            let bufs = &b.bufs;
            let gamma = gamma.map(|i| bufs[i.0].as_slice());
            let act = act.map(|a| (a.f, bufs[a.y.0].as_slice()));
            backward(&g, &bufs[x.0], gamma, (&bufs[mean.0], &bufs[invstd.0]), (&bufs[dy.0], act), grads, comm)
        })
    }
}
