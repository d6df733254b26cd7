//! Element-wise activations on the CPU, forward and backward, with PyTorch's definitions.

use rayon::prelude::*;

use super::float::Float;
use super::{CHUNK, store};
use crate::backend::ops::ActFn;

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
fn apply<T: Float>(f: ActFn, x: T) -> T {
    match f {
        ActFn::Relu => {
            if x > T::ZERO {
                x
            } else {
                T::ZERO
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
        ActFn::Relu => {
            if x > T::ZERO {
                T::ONE
            } else {
                T::ZERO
            }
        }
        ActFn::LeakyRelu(s) => {
            if x > T::ZERO {
                T::ONE
            } else {
                T::from_f32(s)
            }
        }
        ActFn::Elu(a) => {
            if x > T::ZERO {
                T::ONE
            } else {
                y + T::from_f32(a)
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
