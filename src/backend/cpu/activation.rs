//! Element-wise activations on the CPU, forward and backward, with PyTorch's definitions.
//!
//! NaN goes through as in PyTorch: every forward maps NaN to NaN (ReLU too: a NaN input must
//! not become a harmless 0), and the piecewise backwards (ReLU, leaky ReLU, ELU) take the branch
//! PyTorch's comparison takes for NaN (`tests/hardening.rs` has PyTorch's numbers).

use rayon::prelude::*;

use super::CpuBackend;
use super::float::Float;
use super::{CHUNK, store};
use crate::Result;
use crate::backend::ops::ActFn;
use crate::backend::ops::{self, RunOp};

#[inline]
fn sigmoid<T: Float>(x: T) -> T {
    if x >= T::ZERO {
        T::ONE / (T::ONE + (-x).exp())
    } else {
        let e = x.exp();
        e / (T::ONE + e)
    }
}

const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

#[inline]
pub(super) fn apply<T: Float>(f: ActFn, x: T) -> T {
    match f {
        // `x <= 0`, not `!(x > 0)`: NaN stays NaN (PyTorch's `clamp_min`).
        ActFn::Relu => {
            if x <= T::ZERO {
                T::ZERO
            } else {
                x
            }
        }
        ActFn::LeakyRelu(s) => {
            if x > T::ZERO {
                x
            } else {
                x * T::from_f32(s)
            }
        }
        ActFn::Elu(a) => {
            if x > T::ZERO {
                x
            } else {
                T::from_f32(a) * (x.exp() - T::ONE)
            }
        }
        ActFn::Sigmoid => sigmoid(x),
        ActFn::Tanh => x.tanh(),
        ActFn::Silu => x * sigmoid(x),
        ActFn::Gelu => T::from_f64(0.5) * x * (T::ONE + (x * T::from_f64(FRAC_1_SQRT_2)).erf()),
    }
}

/// `f'(x)` given the forward input `x` and output `y`.
#[inline]
fn derivative<T: Float>(f: ActFn, x: T, y: T) -> T {
    match f {
        // PyTorch's `threshold_backward`: `x <= 0 ? 0 : grad`, so NaN passes the gradient.
        ActFn::Relu => {
            if x <= T::ZERO {
                T::ZERO
            } else {
                T::ONE
            }
        }
        ActFn::LeakyRelu(s) => {
            if x > T::ZERO {
                T::ONE
            } else {
                T::from_f32(s)
            }
        }
        // PyTorch's `elu_backward`: `x <= 0 ? ... : grad`, so NaN passes the gradient.
        ActFn::Elu(a) => {
            if x <= T::ZERO {
                y + T::from_f32(a)
            } else {
                T::ONE
            }
        }
        ActFn::Sigmoid => y * (T::ONE - y),
        ActFn::Tanh => T::ONE - y * y,
        ActFn::Silu => {
            let s = sigmoid(x);
            s * (T::ONE + x * (T::ONE - s))
        }
        ActFn::Gelu => {
            let cdf = T::from_f64(0.5) * (T::ONE + (x * T::from_f64(FRAC_1_SQRT_2)).erf());
            let pdf = T::from_f64(INV_SQRT_2PI) * (T::from_f64(-0.5) * x * x).exp();
            cdf + x * pdf
        }
    }
}

/// `f'(x)` from the output `y = f(x)` alone, for the functions where that is exact
/// ([`ActFn::derivative_from_output`]; batch norm's fused activation): the same value and NaN
/// branch as [`derivative`] from the input, since `y <= 0` exactly where `x <= 0` (`y > 0`
/// where `x > 0`) for those. NaN for the others (never asked: such a fused op is refused).
#[inline]
pub(super) fn derivative_from_output<T: Float>(f: ActFn, y: T) -> T {
    match f {
        ActFn::Relu => {
            if y <= T::ZERO {
                T::ZERO
            } else {
                T::ONE
            }
        }
        ActFn::LeakyRelu(s) => {
            if y > T::ZERO {
                T::ONE
            } else {
                T::from_f32(s)
            }
        }
        ActFn::Elu(a) => {
            if y <= T::ZERO {
                y + T::from_f32(a)
            } else {
                T::ONE
            }
        }
        ActFn::Sigmoid => y * (T::ONE - y),
        ActFn::Tanh => T::ONE - y * y,
        ActFn::Silu | ActFn::Gelu => T::from_f64(f64::NAN),
    }
}

pub fn forward<T: Float>(f: ActFn, x: &[T], y: &mut [T]) {
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| {
        y.iter_mut().zip(x).for_each(|(y, &x)| *y = apply(f, x));
    });
}

pub fn backward<T: Float>(f: ActFn, x: &[T], y: &[T], dy: &[T], dx: (&mut [T], bool)) {
    let (dx, acc) = dx;
    dx.par_chunks_mut(CHUNK).enumerate().for_each(|(c, dx)| {
        let o = c * CHUNK;
        for (i, d) in dx.iter_mut().enumerate() {
            store(d, derivative(f, x[o + i], y[o + i]) * dy[o + i], acc);
        }
    });
}

impl<T: Float> RunOp<ops::Act> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::Act) -> Result<()> {
        let ops::Act { f, len, x, y } = o;
        let mut yv = self.take(*y);
        forward(*f, &self.bufs[x.0][..*len], &mut yv[..*len]);
        self.put(*y, yv);
        Ok(())
    }
}

impl<T: Float> RunOp<ops::ActBackward> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::ActBackward) -> Result<()> {
        let ops::ActBackward { f, len, x, y, dy, dx } = o;
        let (mut dxv, acc) = self.take_grad(*dx);
        let b = &self.bufs;
        backward(*f, &b[x.0][..*len], &b[y.0][..*len], &b[dy.0][..*len], (&mut dxv[..*len], acc));
        self.put(dx.buf, dxv);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NaN through each activation, forward and backward (upstream gradient 0.5), from PyTorch
    /// 2.15 on the CPU in float64:
    ///
    /// ```text
    /// x = torch.tensor([nan], dtype=torch.float64, requires_grad=True); y = f(x); y.backward(0.5 * ones)
    /// ```
    ///
    /// (`F.relu`, `F.leaky_relu(x, 0.01)`, `F.elu(x, 1.0)`, `torch.sigmoid`, `torch.tanh`, `F.silu`,
    /// `F.gelu`): every output is NaN; the gradients are 0.5, 0.005, 0.5 for the piecewise three
    /// (their comparison sends NaN down the gradient-passing branch) and NaN for the rest.
    #[test]
    fn nan_goes_through_as_in_pytorch() {
        let cases: [(ActFn, Option<f64>); 7] = [
            (ActFn::Relu, Some(0.5)),
            (ActFn::LeakyRelu(0.01), Some(0.005)),
            (ActFn::Elu(1.0), Some(0.5)),
            (ActFn::Sigmoid, None),
            (ActFn::Tanh, None),
            (ActFn::Silu, None),
            (ActFn::Gelu, None),
        ];
        for (f, want_grad) in cases {
            for nan in [f64::NAN, -f64::NAN] {
                let y = apply(f, nan);
                assert!(y.is_nan(), "{f:?} forward of NaN gave {y}");
                let g = derivative(f, nan, y) * 0.5;
                match want_grad {
                    Some(w) => assert!((g - w).abs() < 1e-9, "{f:?} backward of NaN: {g}, PyTorch {w}"),
                    None => assert!(g.is_nan(), "{f:?} backward of NaN: {g}, PyTorch NaN"),
                }
                assert!(apply(f, nan as f32).is_nan(), "{f:?} forward of NaN in f32");
            }
        }
    }
}
