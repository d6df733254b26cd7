//! Optimizer updates and gradient clipping on the CPU, following PyTorch's single-tensor
//! implementations operation by operation (the order of f32 operations matters for matching its
//! numbers to 1e-6). Scalar coefficients (bias corrections, step sizes) are computed in f64, as
//! PyTorch computes them in Python floats.

use rayon::prelude::*;

use super::CHUNK;
use super::CpuBackend;
use super::float::Float;
use crate::Result;
use crate::backend::ops::OptRule;
use crate::backend::ops::{self, RunOp};

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

/// The guard update of [`ops::CheckFinite`] for a step with this loss and gradient norm (the
/// CUDA kernel `check_finite` does the same).
fn check_finite<T: Float>(g: &mut [T], loss: f64, norm: f64, sticky: bool) {
    use ops::guard::*;
    let bad_loss = !loss.is_finite();
    // The norm as the f32 it is reported in: beyond f32's range counts as infinite.
    let bad_norm = !(norm as f32).is_finite();
    let bad = bad_loss || bad_norm;
    let stuck = sticky && g[FIRST_BAD] != T::ZERO;
    if bad && g[FIRST_BAD] == T::ZERO {
        g[FIRST_BAD] = g[CHECKED] + T::ONE;
        g[WHAT] = T::from_usize(bad_loss as usize + 2 * bad_norm as usize);
        g[LOSS] = T::from_f64(loss);
        g[NORM] = T::from_f64(norm);
    }
    if bad {
        g[BAD_STEPS] += T::ONE;
    }
    g[CHECKED] += T::ONE;
    g[SKIP] = if bad || stuck { T::ONE } else { T::ZERO };
}

impl<T: Float> RunOp<ops::ClipGradNorm> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::ClipGradNorm) -> Result<()> {
        let ops::ClipGradNorm { grads, max_norm, norm } = o;
        let views: Vec<&[T]> = grads.iter().map(|(g, len)| &self.bufs[g.0][..*len]).collect();
        let total = global_norm(&views);
        let coef = T::from_f64(clip_coef(total, *max_norm));
        self.bufs[norm.0][0] = T::from_f64(total);
        for (g, len) in grads {
            self.bufs[g.0][..*len].iter_mut().for_each(|v| *v *= coef);
        }
        Ok(())
    }
}

impl<T: Float> RunOp<ops::ClipGradValue> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::ClipGradValue) -> Result<()> {
        let ops::ClipGradValue { grads, clip } = o;
        let (lo, hi) = (T::from_f32(-clip), T::from_f32(*clip));
        for (g, len) in grads {
            for v in &mut self.bufs[g.0][..*len] {
                if *v < lo {
                    *v = lo;
                } else if *v > hi {
                    *v = hi;
                }
            }
        }
        Ok(())
    }
}

impl<T: Float> RunOp<ops::CheckFinite> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::CheckFinite) -> Result<()> {
        let ops::CheckFinite { stats, grads, guard, sticky } = o;
        let views: Vec<&[T]> = grads.iter().map(|(g, len)| &self.bufs[g.0][..*len]).collect();
        let norm = global_norm(&views);
        let loss = self.bufs[stats.0][ops::stats::LOSS].to_f64();
        check_finite(&mut self.bufs[guard.0], loss, norm, *sticky);
        Ok(())
    }
}

impl<T: Float> RunOp<ops::OptimizerStep> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::OptimizerStep) -> Result<()> {
        let ops::OptimizerStep { rule, hyper, step, scalars, params, guard } = o;
        if let Some(g) = guard
            && self.bufs[g.0][ops::guard::SKIP] != T::ZERO
        {
            // The finite-step guard says skip: the parameters and counters stay as they are.
            return Ok(());
        }
        let t = self.counters[step.0] + 1;
        self.counters[step.0] = t;
        let h = &self.bufs[hyper.0];
        let (lr, mom) = (h[ops::hyper::LR].to_f64(), h[ops::hyper::MOMENTUM].to_f64());
        let mut mu_product = 1.0;
        if let ops::OptRule::NAdam { momentum_decay, .. } = rule {
            // Stored and used at the buffer's precision, as PyTorch keeps it in a
            // float32 tensor (and as the GPU kernel does).
            let prev = self.bufs[scalars.0][0].to_f64();
            let stored = T::from_f64(prev * nadam_mu(mom, *momentum_decay as f64, t));
            self.bufs[scalars.0][0] = stored;
            mu_product = stored.to_f64();
        }
        for p in params {
            let mut w = self.take(p.value);
            let mut st: Vec<Vec<T>> = p.state.iter().map(|s| self.take(*s)).collect();
            update(*rule, t, (lr, mom, mu_product), &mut w[..p.len], &self.bufs[p.grad.0][..p.len], &mut st);
            self.put(p.value, w);
            for (s, v) in p.state.iter().zip(st) {
                self.put(*s, v);
            }
        }
        Ok(())
    }
}
