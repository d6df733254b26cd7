//! L-BFGS for full-batch problems: a port of PyTorch's `torch.optim.LBFGS.step` without line
//! search (its default). It runs on the host over the flattened parameters; each evaluation of
//! the loss and gradient is a forward and backward pass on the backend.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::config::ScheduleUnit;
use super::loss::BatchTargets;
use super::metrics::StepResult;
use super::trainer::{StepKind, Trainer};
use crate::Result;
use crate::exec::{LossFn, Scoring};
use crate::tensor::Tensor;

/// L-BFGS state carried between `step` calls, as PyTorch keeps it in `optimizer.state`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
// Fields are `pub(super)` for `state.rs`, which saves and restores them (checkpoints).
pub struct LbfgsState {
    pub(super) d: Vec<f32>,
    pub(super) t: f64,
    pub(super) old_dirs: VecDeque<Vec<f32>>,
    pub(super) old_stps: VecDeque<Vec<f32>>,
    pub(super) ro: VecDeque<f64>,
    pub(super) h_diag: f64,
    pub(super) prev_flat_grad: Option<Vec<f32>>,
    pub(super) prev_loss: f64,
    pub(super) n_iter: usize,
    pub(super) func_evals: usize,
}

/// Hyper-parameters (PyTorch's names and defaults; `max_eval` is `max_iter * 5 / 4`).
#[derive(Clone, Copy, Debug)]
pub struct LbfgsConfig {
    pub lr: f64,
    pub max_iter: usize,
    pub history_size: usize,
    pub tolerance_grad: f64,
    pub tolerance_change: f64,
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn max_abs(a: &[f32]) -> f64 {
    a.iter().fold(0.0f64, |m, &x| m.max((x as f64).abs()))
}

/// One `optimizer.step(closure)`. `params` holds the flattened parameters and is updated in
/// place; `eval(params)` returns the loss and flattened gradient there. Returns the loss of the
/// first evaluation, as PyTorch does.
pub fn step(
    cfg: LbfgsConfig,
    state: &mut LbfgsState,
    params: &mut [f32],
    mut eval: impl FnMut(&[f32]) -> Result<(f64, Vec<f32>)>,
) -> Result<f64> {
    let max_eval = cfg.max_iter * 5 / 4;
    let (orig_loss, mut flat_grad) = eval(params)?;
    let mut loss = orig_loss;
    let mut current_evals = 1;
    state.func_evals += 1;
    if max_abs(&flat_grad) <= cfg.tolerance_grad {
        return Ok(orig_loss);
    }
    let mut n_iter = 0;
    while n_iter < cfg.max_iter {
        n_iter += 1;
        state.n_iter += 1;
        if state.n_iter == 1 {
            state.d = flat_grad.iter().map(|g| -g).collect();
            state.old_dirs.clear();
            state.old_stps.clear();
            state.ro.clear();
            state.h_diag = 1.0;
        } else {
            let prev = state.prev_flat_grad.as_ref().expect("set after the first iteration");
            let y: Vec<f32> = flat_grad.iter().zip(prev).map(|(a, b)| a - b).collect();
            let s: Vec<f32> = state.d.iter().map(|d| (*d as f64 * state.t) as f32).collect();
            let ys = dot(&y, &s);
            if ys > 1e-10 {
                if state.old_dirs.len() == cfg.history_size {
                    state.old_dirs.pop_front();
                    state.old_stps.pop_front();
                    state.ro.pop_front();
                }
                state.h_diag = ys / dot(&y, &y);
                state.old_dirs.push_back(y);
                state.old_stps.push_back(s);
                state.ro.push_back(1.0 / ys);
            }
            let num_old = state.old_dirs.len();
            let mut al = vec![0.0f64; num_old];
            let mut q: Vec<f32> = flat_grad.iter().map(|g| -g).collect();
            for i in (0..num_old).rev() {
                al[i] = dot(&state.old_stps[i], &q) * state.ro[i];
                for (qv, dv) in q.iter_mut().zip(&state.old_dirs[i]) {
                    *qv -= (al[i] * *dv as f64) as f32;
                }
            }
            let mut r: Vec<f32> = q.iter().map(|v| (*v as f64 * state.h_diag) as f32).collect();
            for (i, a) in al.iter().enumerate() {
                let be_i = dot(&state.old_dirs[i], &r) * state.ro[i];
                for (rv, sv) in r.iter_mut().zip(&state.old_stps[i]) {
                    *rv += ((a - be_i) * *sv as f64) as f32;
                }
            }
            state.d = r;
        }
        state.prev_flat_grad = Some(flat_grad.clone());
        state.prev_loss = loss;
        state.t = if state.n_iter == 1 {
            (1.0f64).min(1.0 / flat_grad.iter().map(|g| (*g as f64).abs()).sum::<f64>()) * cfg.lr
        } else {
            cfg.lr
        };
        let gtd = dot(&flat_grad, &state.d);
        if gtd > -cfg.tolerance_change {
            break;
        }
        for (p, d) in params.iter_mut().zip(&state.d) {
            *p += (state.t * *d as f64) as f32;
        }
        let mut ls_evals = 0;
        let mut opt_cond = false;
        if n_iter != cfg.max_iter {
            let (l, g) = eval(params)?;
            loss = l;
            flat_grad = g;
            opt_cond = max_abs(&flat_grad) <= cfg.tolerance_grad;
            ls_evals = 1;
        }
        current_evals += ls_evals;
        state.func_evals += ls_evals;
        if n_iter == cfg.max_iter || current_evals >= max_eval || opt_cond {
            break;
        }
        if state.d.iter().map(|d| (*d as f64 * state.t).abs()).fold(0.0, f64::max) <= cfg.tolerance_change {
            break;
        }
        if (loss - state.prev_loss).abs() < cfg.tolerance_change {
            break;
        }
    }
    Ok(orig_loss)
}

impl Trainer {
    /// One L-BFGS step on a batch: each evaluation runs the step plan's forward, loss and
    /// backward, and reads the loss and gradients back.
    pub(super) fn lbfgs_step(
        &mut self,
        cfg: LbfgsConfig,
        inputs: &Tensor,
        f: LossFn,
        scoring: Scoring,
        tv: &BatchTargets,
    ) -> Result<()> {
        let n = inputs.shape()[0];
        let plan = self.step_plan(n, StepKind::Accumulate, f, scoring)?;
        self.feed(plan, inputs, tv)?;
        let specs: Vec<(String, usize)> =
            self.exec.model().params().iter().filter(|p| p.trainable).map(|p| (p.name.clone(), p.len())).collect();
        let mut flat = Vec::new();
        for (name, _) in &specs {
            flat.extend(self.exec.read_param(name)?);
        }
        let mut state = std::mem::take(&mut self.lbfgs);
        let mut first: Option<StepResult> = None;
        let result = step(cfg, &mut state, &mut flat, |p| {
            let mut off = 0;
            for (name, len) in &specs {
                self.exec.write_param(name, &p[off..off + len])?;
                off += len;
            }
            self.exec.run(plan)?;
            let r = self.last_step_result(n)?;
            first.get_or_insert(r);
            let loss = r.loss as f64;
            let mut g = Vec::with_capacity(p.len());
            for (name, _) in &specs {
                g.extend(self.exec.read_param_grad(name)?);
            }
            Ok((loss, g))
        });
        self.lbfgs = state;
        result?;
        self.lbfgs_first = first;
        let mut off = 0;
        for (name, len) in &specs {
            self.exec.write_param(name, &flat[off..off + len])?;
            off += len;
        }
        self.last_lr = cfg.lr;
        self.opt_steps += 1;
        if self.config.schedule_unit == ScheduleUnit::Batch {
            let metric = if self.scheduler.needs_metric() { Some(self.last_step_result(n)?.loss as f64) } else { None };
            self.scheduler.step(metric)?;
        }
        Ok(())
    }
}
