//! Group normalisation on the CPU (PyTorch's `nn.GroupNorm`): forward and backward.
//!
//! Layout `[n, c, hw]`; the channels of each sample are split into `groups` groups of
//! `c / groups` consecutive channels, each normalised by its own mean and variance (biased,
//! as PyTorch). Training and evaluation compute the same thing (there are no running
//! statistics). Sums are taken in f64 whatever the element type; samples run in parallel.

use rayon::prelude::*;

use super::CpuBackend;
use super::float::Float;
use super::{Grad, store};
use crate::Result;
use crate::backend::ops::GnGeom;
use crate::backend::ops::{self, RunOp};

/// Forward: `y = (x - mean) * invstd * gamma[c] + beta[c]`, saving `mean` and `invstd`
/// (`[n, groups]`) for backward.
pub fn forward<T: Float>(
    g: &GnGeom,
    x: &[T],
    (gamma, beta): (Option<&[T]>, Option<&[T]>),
    y: &mut [T],
    (mean, invstd): (&mut [T], &mut [T]),
) {
    let cg = g.c / g.groups;
    let len = cg * g.hw;
    let stats: Vec<(f64, f64)> = x
        .par_chunks(len)
        .map(|xs| {
            let mu = xs.iter().map(|v| v.to_f64()).sum::<f64>() / len as f64;
            let var = xs.iter().map(|v| (v.to_f64() - mu).powi(2)).sum::<f64>() / len as f64;
            (mu, 1.0 / (var + g.eps as f64).sqrt())
        })
        .collect();
    for (k, &(mu, is)) in stats.iter().enumerate() {
        mean[k] = T::from_f64(mu);
        invstd[k] = T::from_f64(is);
    }
    let (mean, invstd) = (&*mean, &*invstd);
    y.par_chunks_mut(len).zip(x.par_chunks(len)).enumerate().for_each(|(k, (y, x))| {
        let (mu, is) = (mean[k], invstd[k]);
        let c0 = (k % g.groups) * cg;
        for j in 0..cg {
            let c = c0 + j;
            let scale = gamma.map_or(is, |gm| gm[c] * is);
            let shift = beta.map_or(T::ZERO, |b| b[c]) - mu * scale;
            let r = j * g.hw..(j + 1) * g.hw;
            y[r.clone()].iter_mut().zip(&x[r]).for_each(|(y, &x)| *y = x * scale + shift);
        }
    });
}

/// Backward: with `xhat = (x - mean) * invstd`, `d = dy * gamma[c]` and `M = c / groups * hw`,
/// `dx = invstd / M * (M * d - sum(d) - xhat * sum(d * xhat))` (sums over the group),
/// `dgamma[c] = sum(dy * xhat)`, `dbeta[c] = sum(dy)` (over samples and positions).
pub fn backward<T: Float>(
    g: &GnGeom,
    x: &[T],
    gamma: Option<&[T]>,
    (mean, invstd): (&[T], &[T]),
    dy: &[T],
    [dx, dgamma, dbeta]: [Option<Grad<'_, T>>; 3],
) {
    let cg = g.c / g.groups;
    let len = cg * g.hw;
    let gm = |c: usize| gamma.map_or(1.0, |gm| gm[c].to_f64());
    let xhat = |k: usize, i: usize| (x[k * len + i].to_f64() - mean[k].to_f64()) * invstd[k].to_f64();
    if dgamma.is_some() || dbeta.is_some() {
        let sums: Vec<(f64, f64)> = (0..g.c)
            .into_par_iter()
            .map(|c| {
                let (mut sdy, mut sdyx) = (0.0, 0.0);
                for n in 0..g.n {
                    let k = n * g.groups + c / cg;
                    let off = (c % cg) * g.hw;
                    for i in off..off + g.hw {
                        let d = dy[k * len + i].to_f64();
                        sdy += d;
                        sdyx += d * xhat(k, i);
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
    }
    if let Some((dx, acc)) = dx {
        let m = len as f64;
        dx.par_chunks_mut(len).enumerate().for_each(|(k, dxk)| {
            let c0 = (k % g.groups) * cg;
            let (mut sd, mut sdx) = (0.0, 0.0);
            for i in 0..len {
                let d = dy[k * len + i].to_f64() * gm(c0 + i / g.hw);
                sd += d;
                sdx += d * xhat(k, i);
            }
            let is = invstd[k].to_f64();
            for i in 0..len {
                let d = dy[k * len + i].to_f64() * gm(c0 + i / g.hw);
                let v = is / m * (m * d - sd - xhat(k, i) * sdx);
                store(&mut dxk[i], T::from_f64(v), acc);
            }
        });
    }
}

impl<T: Float> RunOp<ops::GroupNorm> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::GroupNorm) -> Result<()> {
        let ops::GroupNorm { g, x, gamma, beta, y, mean, invstd } = o;
        let (mut yv, mut mv, mut iv) = (self.take(*y), self.take(*mean), self.take(*invstd));
        let b = &self.bufs;
        let affine = (gamma.map(|i| b[i.0].as_slice()), beta.map(|i| b[i.0].as_slice()));
        forward(g, &b[x.0], affine, &mut yv, (&mut mv, &mut iv));
        self.put(*y, yv);
        self.put(*mean, mv);
        self.put(*invstd, iv);
        Ok(())
    }
}

impl<T: Float> RunOp<ops::GroupNormBackward> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::GroupNormBackward) -> Result<()> {
        let ops::GroupNormBackward { g, x, gamma, mean, invstd, dy, dx, dgamma, dbeta } = *o;
        self.with_grads([dx, dgamma, dbeta], |b, grads| {
            let bufs = &b.bufs;
            let gamma = gamma.map(|i| bufs[i.0].as_slice());
            backward(&g, &bufs[x.0], gamma, (&bufs[mean.0], &bufs[invstd.0]), &bufs[dy.0], grads);
        });
        Ok(())
    }
}
