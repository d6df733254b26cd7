//! Optimizer updates and gradient clipping on the CPU, following PyTorch's single-tensor
//! implementations operation by operation (the order of f32 operations matters for matching its
//! numbers to 1e-6). Scalar coefficients (bias corrections, step sizes) are computed in f64, as
//! PyTorch computes them in Python floats.

use rayon::prelude::*;

use super::CHUNK;
use super::float::Float;
use crate::backend::ops::OptRule;

/// `torch.lerp(a, b, w)` as PyTorch's CPU kernel computes it.
#[inline]
fn lerp<T: Float>(a: T, b: T, w: T) -> T {
    if w.to_f64() < 0.5 { a + w * (b - a) } else { b - (b - a) * (T::ONE - w) }
}

/// One step for one parameter tensor. `t` is the step number (1 for the first step), `lr` and
/// `mom` the learning rate and momentum/beta1, `mu_product` NAdam's running product (already
/// including this step's `mu`).
pub fn update<T: Float>(
    rule: OptRule,
    t: u64,
    (lr, mom, mu_product): (f64, f64, f64),
    w: &mut [T],
    g: &[T],
    state: &mut [Vec<T>],
) {
    let tf = t as f64;
    match rule {
        OptRule::Sgd { dampening, nesterov, weight_decay } => {
            let (wd, mu, damp, lr) =
                (T::from_f32(weight_decay), T::from_f64(mom), T::from_f32(dampening), T::from_f64(lr));
            let first = t == 1;
            let buf = &mut state[0];
            par3(w, g, buf, |w, g, b| {
                let mut d = g;
                if wd != T::ZERO {
                    d += wd * *w;
                }
                if mu != T::ZERO {
                    *b = if first { d } else { *b * mu + (T::ONE - damp) * d };
                    d = if nesterov { d + mu * *b } else { *b };
                }
                *w -= lr * d;
            });
        }
        OptRule::Adam { beta2, eps, weight_decay, decoupled, .. } => {
            let b1 = mom;
            let bc1 = 1.0 - b1.powf(tf);
            let bc2 = 1.0 - (beta2 as f64).powf(tf);
            let step_size = T::from_f64(lr / bc1);
            let bc2_sqrt = T::from_f64(bc2.sqrt());
            let (wd, one_m_b1, b2, one_m_b2, eps) = (
                T::from_f32(weight_decay),
                T::from_f64(1.0 - b1),
                T::from_f32(beta2),
                T::from_f32(1.0 - beta2),
                T::from_f32(eps),
            );
            let decay = T::from_f64(1.0 - lr * weight_decay as f64);
            let (m, rest) = state.split_at_mut(1);
            let (v, vmax) = rest.split_at_mut(1);
            let m = &mut m[0];
            let v = &mut v[0];
            let mut vmax = vmax.first_mut();
            let n = w.len();
            for i in 0..n {
                let mut gi = g[i];
                if weight_decay != 0.0 {
                    if decoupled {
                        w[i] *= decay;
                    } else {
                        gi += wd * w[i];
                    }
                }
                m[i] = lerp(m[i], gi, one_m_b1);
                v[i] = v[i] * b2 + one_m_b2 * gi * gi;
                let denom = match vmax.as_deref_mut() {
                    Some(vm) => {
                        if v[i] > vm[i] {
                            vm[i] = v[i];
                        }
                        vm[i].sqrt() / bc2_sqrt + eps
                    }
                    None => v[i].sqrt() / bc2_sqrt + eps,
                };
                w[i] -= step_size * (m[i] / denom);
            }
        }
        OptRule::RmsProp { alpha, eps, weight_decay, .. } => {
            let (a, one_m_a, eps, wd, lr, mu) = (
                T::from_f32(alpha),
                T::from_f32(1.0 - alpha),
                T::from_f32(eps),
                T::from_f32(weight_decay),
                T::from_f64(lr),
                T::from_f64(mom),
            );
            let (sq, rest) = state.split_at_mut(1);
            let (buf, rest) = rest.split_at_mut(1);
            let sq = &mut sq[0];
            let buf = &mut buf[0];
            let mut ga = rest.first_mut();
            for i in 0..w.len() {
                let mut gi = g[i];
                if weight_decay != 0.0 {
                    gi += wd * w[i];
                }
                sq[i] = sq[i] * a + one_m_a * gi * gi;
                let avg = match ga.as_deref_mut() {
                    Some(ga) => {
                        ga[i] = lerp(ga[i], gi, one_m_a);
                        (sq[i] - ga[i] * ga[i]).sqrt() + eps
                    }
                    None => sq[i].sqrt() + eps,
                };
                if mom > 0.0 {
                    buf[i] = buf[i] * mu + gi / avg;
                    w[i] -= lr * buf[i];
                } else {
                    w[i] -= lr * (gi / avg);
                }
            }
        }
        OptRule::Adagrad { lr_decay, eps, weight_decay } => {
            let clr = T::from_f64(lr / (1.0 + (tf - 1.0) * lr_decay as f64));
            let (wd, eps) = (T::from_f32(weight_decay), T::from_f32(eps));
            let sum = &mut state[0];
            par3(w, g, sum, |w, g, s| {
                let mut gi = g;
                if wd != T::ZERO {
                    gi += wd * *w;
                }
                *s += gi * gi;
                let std = s.sqrt() + eps;
                *w -= clr * (gi / std);
            });
        }
        OptRule::Adadelta { rho, eps, weight_decay } => {
            let (r, one_m_r, eps, wd, lr) = (
                T::from_f32(rho),
                T::from_f32(1.0 - rho),
                T::from_f32(eps),
                T::from_f32(weight_decay),
                T::from_f64(lr),
            );
            let (sq, acc) = state.split_at_mut(1);
            let (sq, acc) = (&mut sq[0], &mut acc[0]);
            for i in 0..w.len() {
                let mut gi = g[i];
                if weight_decay != 0.0 {
                    gi += wd * w[i];
                }
                sq[i] = sq[i] * r + one_m_r * gi * gi;
                let std = (sq[i] + eps).sqrt();
                let delta = (acc[i] + eps).sqrt() / std * gi;
                acc[i] = acc[i] * r + one_m_r * delta * delta;
                w[i] -= lr * delta;
            }
        }
        OptRule::NAdam { beta2, eps, weight_decay, momentum_decay } => {
            let b1 = mom;
            let md = momentum_decay as f64;
            let bc2 = 1.0 - (beta2 as f64).powf(tf);
            let mu = b1 * (1.0 - 0.5 * 0.96f64.powf(tf * md));
            let mu_next = b1 * (1.0 - 0.5 * 0.96f64.powf((tf + 1.0) * md));
            let c_grad = T::from_f64(-lr * (1.0 - mu) / (1.0 - mu_product));
            let c_avg = T::from_f64(-lr * mu_next / (1.0 - mu_product * mu_next));
            let (wd, one_m_b1, b2, one_m_b2, eps, bc2) = (
                T::from_f32(weight_decay),
                T::from_f64(1.0 - b1),
                T::from_f32(beta2),
                T::from_f32(1.0 - beta2),
                T::from_f32(eps),
                T::from_f64(bc2),
            );
            let (m, v) = state.split_at_mut(1);
            let (m, v) = (&mut m[0], &mut v[0]);
            for i in 0..w.len() {
                let mut gi = g[i];
                if weight_decay != 0.0 {
                    gi += wd * w[i];
                }
                m[i] = lerp(m[i], gi, one_m_b1);
                v[i] = v[i] * b2 + one_m_b2 * gi * gi;
                let denom = (v[i] / bc2).sqrt() + eps;
                w[i] += c_grad * (gi / denom);
                w[i] += c_avg * (m[i] / denom);
            }
        }
    }
}

/// NAdam's momentum coefficient for step `t`.
pub fn nadam_mu(beta1: f64, momentum_decay: f64, t: u64) -> f64 {
    beta1 * (1.0 - 0.5 * 0.96f64.powf(t as f64 * momentum_decay))
}

/// Element-wise update of `w` from `g` and one state tensor, in parallel chunks.
fn par3<T: Float>(w: &mut [T], g: &[T], s: &mut [T], f: impl Fn(&mut T, T, &mut T) + Sync) {
    w.par_chunks_mut(CHUNK).zip(s.par_chunks_mut(CHUNK)).enumerate().for_each(|(c, (w, s))| {
        let o = c * CHUNK;
        for i in 0..w.len() {
            f(&mut w[i], g[o + i], &mut s[i]);
        }
    });
}

/// Global L2 norm of several gradient tensors, in f64.
pub fn global_norm<T: Float>(grads: &[&[T]]) -> f64 {
    grads.iter().map(|g| g.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>()).sum::<f64>().sqrt()
}

/// PyTorch's clip coefficient: `min(max_norm / (norm + 1e-6), 1)`.
pub fn clip_coef(norm: f64, max_norm: f32) -> f64 {
    (max_norm as f64 / (norm + 1e-6)).min(1.0)
}
