//! Batch normalisation on the CPU: training (batch statistics, running-statistic update as
//! PyTorch does it), inference (running statistics) and backward.
//!
//! Layout `[n, c, hw]`. Per-channel sums are taken in f64 whatever the element type, then the
//! normalisation is applied image by image in parallel.

use rayon::prelude::*;

use super::float::Float;
use super::store;
use crate::backend::ops::BnGeom;

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

/// `y[n, c, i] = x[n, c, i] * scale[c] + shift[c]`, image by image in parallel.
fn affine<T: Float>(g: &BnGeom, x: &[T], scale: &[T], shift: &[T], y: &mut [T]) {
    y.par_chunks_mut(g.c * g.hw).zip(x.par_chunks(g.c * g.hw)).for_each(|(y, x)| {
        for c in 0..g.c {
            let (a, b) = (scale[c], shift[c]);
            let r = c * g.hw..(c + 1) * g.hw;
            y[r.clone()].iter_mut().zip(&x[r]).for_each(|(y, &x)| *y = x * a + b);
        }
    });
}

fn gamma_beta<T: Float>(c: usize, gamma: Option<&[T]>, beta: Option<&[T]>) -> (Vec<T>, Vec<T>) {
    (
        gamma.map(|g| g.to_vec()).unwrap_or_else(|| vec![T::ONE; c]),
        beta.map(|b| b.to_vec()).unwrap_or_else(|| vec![T::ZERO; c]),
    )
}

/// Training forward. `running` is `(running_mean, running_var, momentum)`.
#[allow(clippy::too_many_arguments)]
pub fn forward_train<T: Float>(
    g: &BnGeom,
    x: &[T],
    gamma: Option<&[T]>,
    beta: Option<&[T]>,
    y: &mut [T],
    mean: &mut [T],
    invstd: &mut [T],
    running: Option<(&mut [T], &mut [T], f32)>,
) {
    let count = (g.n * g.hw) as f64;
    let sums = channel_sums(g, x, |_, v| v.to_f64());
    let mu: Vec<f64> = sums.iter().map(|s| s / count).collect();
    let sq = channel_sums(g, x, |c, v| {
        let d = v.to_f64() - mu[c];
        d * d
    });
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
    affine(g, x, &scale, &shift, y);
}

/// Evaluation forward with running statistics.
pub fn forward_infer<T: Float>(
    g: &BnGeom,
    x: &[T],
    gamma: Option<&[T]>,
    beta: Option<&[T]>,
    rm: &[T],
    rv: &[T],
    y: &mut [T],
) {
    let (gm, bt) = gamma_beta(g.c, gamma, beta);
    let eps = T::from_f32(g.eps);
    let scale: Vec<T> = (0..g.c).map(|c| gm[c] / (rv[c] + eps).sqrt()).collect();
    let shift: Vec<T> = (0..g.c).map(|c| bt[c] - rm[c] * scale[c]).collect();
    affine(g, x, &scale, &shift, y);
}

/// Backward of the training forward:
/// `dx = gamma * invstd / M * (M * dy - sum(dy) - xhat * sum(dy * xhat))`,
/// `dgamma = sum(dy * xhat)`, `dbeta = sum(dy)`, with `M = n * hw`.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Float>(
    g: &BnGeom,
    x: &[T],
    gamma: Option<&[T]>,
    mean: &[T],
    invstd: &[T],
    dy: &[T],
    dx: Option<(&mut [T], bool)>,
    dgamma: Option<(&mut [T], bool)>,
    dbeta: Option<(&mut [T], bool)>,
) {
    let sums: Vec<(f64, f64)> = (0..g.c)
        .into_par_iter()
        .map(|c| {
            let (m, is) = (mean[c].to_f64(), invstd[c].to_f64());
            let (mut sdy, mut sdyx) = (0.0, 0.0);
            for n in 0..g.n {
                let base = (n * g.c + c) * g.hw;
                for i in base..base + g.hw {
                    let d = dy[i].to_f64();
                    sdy += d;
                    sdyx += d * (x[i].to_f64() - m) * is;
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
        let count = (g.n * g.hw) as f64;
        let gm: Vec<f64> = (0..g.c).map(|c| gamma.map(|g| g[c].to_f64()).unwrap_or(1.0)).collect();
        dx.par_chunks_mut(g.c * g.hw).enumerate().for_each(|(n, dxn)| {
            for c in 0..g.c {
                let (m, is) = (mean[c].to_f64(), invstd[c].to_f64());
                let k = gm[c] * is / count;
                let (sdy, sdyx) = sums[c];
                let base = (n * g.c + c) * g.hw;
                for i in 0..g.hw {
                    let xhat = (x[base + i].to_f64() - m) * is;
                    let v = k * (count * dy[base + i].to_f64() - sdy - xhat * sdyx);
                    store(&mut dxn[c * g.hw + i], T::from_f64(v), acc);
                }
            }
        });
    }
}
