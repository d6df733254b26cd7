//! Learning-rate schedules with PyTorch's semantics (`torch.optim.lr_scheduler`), computed on the
//! host and written to the device's hyper-parameter buffer before each step, so the rate the
//! optimizer kernels use is the scheduled one.
//!
//! A schedule is a function of how many times it has been stepped (per batch or per epoch, by
//! [`super::ScheduleUnit`]); [`ReduceOnPlateau`](Schedule::ReduceOnPlateau) also keeps state fed
//! by a metric. A [`Warmup`] runs first and then hands over to the schedule, as PyTorch's
//! `SequentialLR([LinearLR(start_factor, total_iters=steps), schedule], milestones=[steps])`.

// `!(x > 0.0)` is deliberate below: it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How the one-cycle schedule anneals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Anneal {
    /// Half-cosine curves between the phases' rates (PyTorch's default, `"cos"`).
    Cos,
    /// Straight lines between the phases' rates (`"linear"`).
    Linear,
}

/// Whether a plateau means the metric stopped falling (loss) or rising (accuracy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlateauMode {
    /// Lower is better (a loss): improvement means falling below `best * (1 - threshold)`.
    Min,
    /// Higher is better (an accuracy): improvement means rising above `best * (1 + threshold)`.
    Max,
}

/// A learning-rate schedule; `lr(k)` below is the rate after `k` steps, for base rate `base`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Schedule {
    /// `base * gamma^(k / step_size)` (`StepLR`).
    Step {
        /// Steps between two decays, at least 1.
        step_size: usize,
        /// Factor applied at each decay, positive (PyTorch's default 0.1).
        gamma: f64,
    },
    /// `base * gamma^(number of milestones <= k)` (`MultiStepLR`).
    MultiStep {
        /// Step counts at which the rate decays, in increasing order.
        milestones: Vec<usize>,
        /// Factor applied at each milestone, positive (PyTorch's default 0.1).
        gamma: f64,
    },
    /// `base * gamma^k` (`ExponentialLR`).
    Exponential {
        /// Factor applied every step, positive.
        gamma: f64,
    },
    /// `eta_min + (base - eta_min) * (1 + cos(pi k / t_max)) / 2` (`CosineAnnealingLR`).
    Cosine {
        /// Steps from the base rate down to `eta_min` (half a period), at least 1.
        t_max: usize,
        /// The lowest rate, `>= 0` (PyTorch's default 0).
        eta_min: f64,
    },
    /// Cosine annealing restarted after `t_0`, `t_0 * t_mult`, ... steps
    /// (`CosineAnnealingWarmRestarts`).
    CosineWarmRestarts {
        /// Length of the first cycle in steps, at least 1.
        t_0: usize,
        /// Each cycle is this many times longer than the one before, at least 1 (default 1).
        t_mult: usize,
        /// The lowest rate, reached at the end of each cycle, `>= 0` (default 0).
        eta_min: f64,
    },
    /// The one-cycle policy (`OneCycleLR`); it sets the rate itself (from `max_lr`) and, with
    /// `cycle_momentum`, cycles the momentum (or Adam's beta1) between `base_momentum` and
    /// `max_momentum`. Steps past `total_steps` keep the final rate.
    OneCycle {
        /// The peak rate, positive (the trainer's `learning_rate` is not used).
        max_lr: f64,
        /// Steps in the cycle, at least 2.
        total_steps: usize,
        /// Fraction of the cycle spent raising the rate, in `(0, 1)` (default 0.3).
        pct_start: f64,
        /// The shape of the curves (default [`Anneal::Cos`]).
        anneal: Anneal,
        /// The cycle starts at `max_lr / div_factor`, positive (default 25).
        div_factor: f64,
        /// The cycle ends at the start rate divided by this, positive (default 1e4).
        final_div_factor: f64,
        /// Three phases as in the paper (up, back down to the start rate, then to the final
        /// rate) instead of PyTorch's default two (up, then down to the final rate).
        three_phase: bool,
        /// Cycle the momentum (or beta1) inversely to the rate (default on).
        cycle_momentum: bool,
        /// The momentum at the peak rate (default 0.85).
        base_momentum: f64,
        /// The momentum at the start and end of the cycle (default 0.95).
        max_momentum: f64,
    },
    /// Multiply the rate by `factor` when the metric has not improved for `patience` steps
    /// (`ReduceLROnPlateau`, relative threshold).
    ReduceOnPlateau {
        /// Whether the metric should fall (a loss, the default) or rise (an accuracy).
        mode: PlateauMode,
        /// Factor applied at each reduction, in `(0, 1)` (default 0.1).
        factor: f64,
        /// Steps without improvement tolerated before a reduction (default 10).
        patience: usize,
        /// Relative change that counts as an improvement, `>= 0` (default 1e-4).
        threshold: f64,
        /// Steps after a reduction during which no improvement is looked for (default 0).
        cooldown: usize,
        /// The rate never goes below this, `>= 0` (default 0).
        min_lr: f64,
    },
}

impl Schedule {
    /// `OneCycleLR(max_lr, total_steps)` with PyTorch's defaults.
    pub fn one_cycle(max_lr: f64, total_steps: usize) -> Self {
        Schedule::OneCycle {
            max_lr,
            total_steps,
            pct_start: 0.3,
            anneal: Anneal::Cos,
            div_factor: 25.0,
            final_div_factor: 1e4,
            three_phase: false,
            cycle_momentum: true,
            base_momentum: 0.85,
            max_momentum: 0.95,
        }
    }

    /// `ReduceLROnPlateau(mode="min")` with PyTorch's defaults.
    pub fn reduce_on_plateau() -> Self {
        Schedule::ReduceOnPlateau {
            mode: PlateauMode::Min,
            factor: 0.1,
            patience: 10,
            threshold: 1e-4,
            cooldown: 0,
            min_lr: 0.0,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |field: &str, why: String| Err(Error::config(format!("schedule.{field}"), why));
        match self {
            Schedule::Step { step_size, gamma } => {
                if *step_size == 0 {
                    return bad("step_size", "must be at least 1".into());
                }
                if !(*gamma > 0.0) {
                    return bad("gamma", format!("must be positive, got {gamma}"));
                }
            }
            Schedule::MultiStep { milestones, gamma } => {
                if milestones.windows(2).any(|w| w[0] > w[1]) {
                    return bad("milestones", format!("must be increasing, got {milestones:?}"));
                }
                if !(*gamma > 0.0) {
                    return bad("gamma", format!("must be positive, got {gamma}"));
                }
            }
            Schedule::Exponential { gamma } if !(*gamma > 0.0) => {
                return bad("gamma", format!("must be positive, got {gamma}"));
            }
            Schedule::Cosine { t_max, eta_min } => {
                if *t_max == 0 {
                    return bad("t_max", "must be at least 1".into());
                }
                if !(*eta_min >= 0.0) {
                    return bad("eta_min", format!("must be >= 0, got {eta_min}"));
                }
            }
            Schedule::CosineWarmRestarts { t_0, t_mult, eta_min } => {
                if *t_0 == 0 || *t_mult == 0 {
                    return bad("t_0", "t_0 and t_mult must be at least 1".into());
                }
                if !(*eta_min >= 0.0) {
                    return bad("eta_min", format!("must be >= 0, got {eta_min}"));
                }
            }
            Schedule::OneCycle { max_lr, total_steps, pct_start, div_factor, final_div_factor, .. } => {
                if !(*max_lr > 0.0) {
                    return bad("max_lr", format!("must be positive, got {max_lr}"));
                }
                if *total_steps < 2 {
                    return bad("total_steps", "must be at least 2".into());
                }
                if !(*pct_start > 0.0 && *pct_start < 1.0) {
                    return bad("pct_start", format!("must be in (0, 1), got {pct_start}"));
                }
                if !(*div_factor > 0.0 && *final_div_factor > 0.0) {
                    return bad("div_factor", "div_factor and final_div_factor must be positive".into());
                }
            }
            Schedule::ReduceOnPlateau { factor, threshold, min_lr, .. } => {
                if !(*factor > 0.0 && *factor < 1.0) {
                    return bad("factor", format!("must be in (0, 1), got {factor}"));
                }
                if !(*threshold >= 0.0) || !(*min_lr >= 0.0) {
                    return bad("threshold", "threshold and min_lr must be >= 0".into());
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// A linear warm-up from `start_factor * lr` to `lr` over `steps` steps (PyTorch's `LinearLR`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Warmup {
    /// Length of the warm-up in schedule steps, at least 1; the schedule's own count starts
    /// after it.
    pub steps: usize,
    /// The first step's rate as a fraction of the base rate, in `(0, 1]` (PyTorch's default
    /// 1/3).
    pub start_factor: f64,
}

impl Warmup {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::config("warmup.steps", "must be at least 1"));
        }
        if !(self.start_factor > 0.0 && self.start_factor <= 1.0) {
            return Err(Error::config("warmup.start_factor", format!("must be in (0, 1], got {}", self.start_factor)));
        }
        Ok(())
    }
}

/// The schedule's running state: step count and, for plateau detection, the best metric.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
// Fields are `pub(super)` for `state.rs`, which checks a scheduler read from a checkpoint.
pub struct Scheduler {
    pub(super) base_lr: f64,
    pub(super) schedule: Option<Schedule>,
    pub(super) warmup: Option<Warmup>,
    /// Steps taken so far.
    pub(super) count: usize,
    pub(super) plateau_lr: f64,
    pub(super) best: Option<f64>,
    pub(super) bad_steps: usize,
    pub(super) cooldown_left: usize,
}

impl Scheduler {
    /// A scheduler at step 0 for the base rate `base_lr` (the trainer's `learning_rate`), with
    /// an optional schedule and warm-up (neither: the rate stays `base_lr`). The arguments are
    /// not checked here; [`crate::train::TrainerConfig::validate`] checks them.
    pub fn new(base_lr: f64, schedule: Option<Schedule>, warmup: Option<Warmup>) -> Self {
        Scheduler {
            base_lr,
            schedule,
            warmup,
            count: 0,
            plateau_lr: base_lr,
            best: None,
            bad_steps: 0,
            cooldown_left: 0,
        }
    }

    /// Steps taken so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Whether advancing needs a metric (plateau detection).
    pub fn needs_metric(&self) -> bool {
        matches!(self.schedule, Some(Schedule::ReduceOnPlateau { .. }))
    }

    /// The learning rate for the current step.
    pub fn lr(&self) -> f64 {
        let k = self.count;
        if let Some(w) = self.warmup
            && k < w.steps
        {
            let f = w.start_factor + (1.0 - w.start_factor) * k as f64 / w.steps as f64;
            return self.base_lr * f;
        }
        let k = k - self.warmup.map(|w| w.steps).unwrap_or(0);
        let base = self.base_lr;
        match &self.schedule {
            None => base,
            Some(Schedule::Step { step_size, gamma }) => base * gamma.powi((k / step_size) as i32),
            Some(Schedule::MultiStep { milestones, gamma }) => {
                base * gamma.powi(milestones.iter().filter(|&&m| m <= k).count() as i32)
            }
            Some(Schedule::Exponential { gamma }) => base * gamma.powi(k as i32),
            Some(Schedule::Cosine { t_max, eta_min }) => {
                let e = *eta_min;
                e + (base - e) * (1.0 + (PI * k as f64 / *t_max as f64).cos()) / 2.0
            }
            Some(Schedule::CosineWarmRestarts { t_0, t_mult, eta_min }) => {
                let (mut t_cur, mut t_i) = (k, *t_0);
                if *t_mult == 1 {
                    t_cur %= t_i;
                } else {
                    // Periods grow geometrically: a few dozen iterations at most.
                    while t_cur >= t_i {
                        t_cur -= t_i;
                        t_i = t_i.saturating_mul(*t_mult);
                    }
                }
                let e = *eta_min;
                e + (base - e) * (1.0 + (PI * t_cur as f64 / t_i as f64).cos()) / 2.0
            }
            Some(s @ Schedule::OneCycle { .. }) => one_cycle(s, k).0,
            Some(Schedule::ReduceOnPlateau { .. }) => self.plateau_lr,
        }
    }

    /// The momentum (or beta1) for the current step, where the schedule sets one.
    pub fn momentum(&self) -> Option<f64> {
        let k = self.count.checked_sub(self.warmup.map(|w| w.steps).unwrap_or(0))?;
        match &self.schedule {
            Some(s @ Schedule::OneCycle { cycle_momentum: true, .. }) => Some(one_cycle(s, k).1),
            _ => None,
        }
    }

    /// Advances one step. Plateau detection needs `metric` (ignored otherwise); during warm-up
    /// the metric does not count.
    pub fn step(&mut self, metric: Option<f64>) -> Result<()> {
        let in_warmup = self.warmup.is_some_and(|w| self.count < w.steps);
        self.count += 1;
        if let Some(Schedule::ReduceOnPlateau { mode, factor, patience, threshold, cooldown, min_lr }) = &self.schedule
            && !in_warmup
        {
            let m = metric.ok_or_else(|| {
                Error::config("schedule", "ReduceOnPlateau needs a metric each step (validation or training loss)")
            })?;
            let t = *threshold;
            let better = match (self.best, mode) {
                (None, _) => true,
                (Some(b), PlateauMode::Min) => m < b * (1.0 - t),
                (Some(b), PlateauMode::Max) => m > b * (1.0 + t),
            };
            if better {
                self.best = Some(m);
                self.bad_steps = 0;
            } else {
                self.bad_steps += 1;
            }
            if self.cooldown_left > 0 {
                self.cooldown_left -= 1;
                self.bad_steps = 0;
            }
            if self.bad_steps > *patience {
                let new = (self.plateau_lr * *factor).max(*min_lr);
                if self.plateau_lr - new > 1e-8 {
                    self.plateau_lr = new;
                }
                self.cooldown_left = *cooldown;
                self.bad_steps = 0;
            }
        }
        Ok(())
    }
}

/// `(lr, momentum)` of the one-cycle policy at step `k` (PyTorch's `OneCycleLR`).
fn one_cycle(s: &Schedule, k: usize) -> (f64, f64) {
    let Schedule::OneCycle {
        max_lr,
        total_steps,
        pct_start,
        anneal,
        div_factor,
        final_div_factor,
        three_phase,
        base_momentum,
        max_momentum,
        ..
    } = *s
    else {
        unreachable!("one_cycle on another schedule")
    };
    let initial = max_lr / div_factor;
    let min_lr = initial / final_div_factor;
    let (bm, mm) = (base_momentum, max_momentum);
    let total = total_steps as f64;
    let pct = pct_start;
    // (end step, start lr, end lr, start momentum, end momentum)
    let phases: Vec<(f64, f64, f64, f64, f64)> = if three_phase {
        vec![
            (pct * total - 1.0, initial, max_lr, mm, bm),
            (2.0 * pct * total - 2.0, max_lr, initial, bm, mm),
            (total - 1.0, initial, min_lr, mm, mm),
        ]
    } else {
        vec![(pct * total - 1.0, initial, max_lr, mm, bm), (total - 1.0, max_lr, min_lr, bm, mm)]
    };
    let step = (k as f64).min(total - 1.0);
    let f = |start: f64, end: f64, p: f64| match anneal {
        Anneal::Cos => end + (start - end) / 2.0 * ((PI * p).cos() + 1.0),
        Anneal::Linear => (end - start) * p + start,
    };
    let mut start_step = 0.0;
    for (i, &(end_step, lr0, lr1, m0, m1)) in phases.iter().enumerate() {
        if step <= end_step || i == phases.len() - 1 {
            let p = (step - start_step) / (end_step - start_step);
            return (f(lr0, lr1, p), f(m0, m1, p));
        }
        start_step = end_step;
    }
    unreachable!("the last phase always matches")
}
