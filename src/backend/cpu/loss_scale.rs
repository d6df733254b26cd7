//! Dynamic loss scaling on the CPU ([`ops::ScaleLoss`], [`ops::UnscaleGrads`]): the formulas of
//! PyTorch's `GradScaler` (`_amp_foreach_non_finite_check_and_unscale_`, `_amp_update_scale_`),
//! which the CUDA kernels in `cuda/loss_scale.rs` follow operation for operation.

use super::CpuBackend;
use super::float::Float;
use crate::Result;
use crate::backend::ops::{self, RunOp, guard, scaler};

/// `1 / scale` as PyTorch takes it: the reciprocal in f64, rounded to the computing type.
pub fn inverse<T: Float>(scale: T) -> T {
    T::from_f64(1.0 / scale.to_f64())
}

/// Multiplies `g` by `inv` and says whether it held inf or NaN before (PyTorch checks the
/// value it is given, then multiplies).
pub fn unscale<T: Float>(g: &mut [T], inv: T) -> bool {
    let mut found = false;
    for v in g {
        found |= !v.to_f64().is_finite();
        *v *= inv;
    }
    found
}

/// The scale update after a step (PyTorch's `_amp_update_scale_`, plus the skipped count) and
/// the guard's skip flag; `s` is the scaler state (layout [`scaler`]).
pub fn update<T: Float>(s: &mut [T], g: &mut [T], o: &ops::UnscaleGrads) {
    let found = s[scaler::FOUND_INF] != T::ZERO;
    if found {
        s[scaler::SCALE] *= T::from_f32(o.backoff_factor);
        s[scaler::GOOD_STEPS] = T::ZERO;
        s[scaler::SKIPPED] += T::ONE;
    } else {
        let good = s[scaler::GOOD_STEPS] + T::ONE;
        if good.to_f64() >= o.growth_interval as f64 {
            let grown = s[scaler::SCALE] * T::from_f32(o.growth_factor);
            if grown.to_f64().is_finite() {
                s[scaler::SCALE] = grown;
            }
            s[scaler::GOOD_STEPS] = T::ZERO;
        } else {
            s[scaler::GOOD_STEPS] = good;
        }
    }
    s[scaler::FOUND_INF] = T::ZERO;
    let keep = o.merge_skip && g[guard::SKIP] != T::ZERO;
    g[guard::SKIP] = if found || keep { T::ONE } else { T::ZERO };
}

impl<T: Float> RunOp<ops::ScaleLoss> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::ScaleLoss) -> Result<()> {
        let s = self.bufs[o.scale.0][scaler::SCALE];
        self.bufs[o.buf.0][..o.len].iter_mut().for_each(|v| *v *= s);
        Ok(())
    }
}

impl<T: Float> RunOp<ops::UnscaleGrads> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::UnscaleGrads) -> Result<()> {
        let inv = inverse(self.bufs[o.scale.0][scaler::SCALE]);
        let mut found = false;
        for &(b, n) in &o.grads {
            found |= unscale(&mut self.bufs[b.0][..n], inv);
        }
        if found {
            self.bufs[o.scale.0][scaler::FOUND_INF] = T::ONE;
        }
        let mut s = self.take(o.scale);
        update(&mut s, &mut self.bufs[o.guard.0], o);
        self.put(o.scale, s);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ops::BufId;

    fn op(interval: u32, merge_skip: bool) -> ops::UnscaleGrads {
        ops::UnscaleGrads {
            grads: Vec::new(),
            scale: BufId(0),
            guard: BufId(1),
            merge_skip,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: interval,
        }
    }

    #[test]
    fn unscale_checks_before_multiplying() {
        let mut g = [2.0f32, -4.0, 8.0];
        assert!(!unscale(&mut g, inverse(4.0f32)));
        assert_eq!(g, [0.5, -1.0, 2.0]);
        let mut g = [1.0f32, f32::INFINITY, 0.0];
        assert!(unscale(&mut g, 0.5));
        let mut g = [f32::NAN];
        assert!(unscale(&mut g, 1.0));
    }

    #[test]
    fn backs_off_grows_and_stops_growing_before_infinity() {
        let o = op(2, false);
        let mut guard = [0.0f32; guard::LEN];
        let mut s = [8.0f32, 0.0, 0.0, 1.0];
        update(&mut s, &mut guard, &o);
        assert_eq!((s, guard[guard::SKIP]), ([4.0, 0.0, 1.0, 0.0], 1.0));
        update(&mut s, &mut guard, &o);
        assert_eq!((s, guard[guard::SKIP]), ([4.0, 1.0, 1.0, 0.0], 0.0));
        update(&mut s, &mut guard, &o);
        assert_eq!(s, [8.0, 0.0, 1.0, 0.0]);
        let mut s = [f32::MAX, 1.0, 0.0, 0.0];
        update(&mut s, &mut guard, &o);
        assert_eq!(s, [f32::MAX, 0.0, 0.0, 0.0], "a scale that would overflow stays");
    }

    #[test]
    fn a_skip_from_the_finite_check_is_kept_only_when_merging() {
        let mut guard = [0.0f32; guard::LEN];
        guard[guard::SKIP] = 1.0;
        let mut s = [8.0f32, 0.0, 0.0, 0.0];
        update(&mut s, &mut guard, &op(100, true));
        assert_eq!(guard[guard::SKIP], 1.0);
        update(&mut s, &mut guard, &op(100, false));
        assert_eq!(guard[guard::SKIP], 0.0);
    }
}
