//! The element type of the CPU backend: `f32` for training, `f64` for the reference that gradient
//! checks compare against. Every CPU kernel is written once, generic over [`Float`].

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// The element type of the CPU backend's buffers and kernels: implemented for `f32` (what
/// training uses) and `f64` (the reference gradient checks compare against). The methods are
/// the few numeric functions the kernels need, so one kernel serves both precisions.
pub trait Float:
    Copy
    + Send
    + Sync
    + 'static
    + Default
    + Debug
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + Sum
{
    /// The dtype of this element type.
    const DTYPE: crate::backend::DType;
    /// Zero.
    const ZERO: Self;
    /// One.
    const ONE: Self;
    /// Converts from `f64`, rounding to nearest for `f32` (values beyond its range become
    /// infinite).
    fn from_f64(v: f64) -> Self;
    /// Converts from `f32` (exact).
    fn from_f32(v: f32) -> Self;
    /// Converts to `f64` (exact).
    fn to_f64(self) -> f64;
    /// Converts to `f32`, rounding to nearest for `f64`.
    fn to_f32(self) -> f32;
    /// `e^self`.
    fn exp(self) -> Self;
    /// The natural logarithm (NaN below 0, minus infinity at 0).
    fn ln(self) -> Self;
    /// The square root (NaN below 0).
    fn sqrt(self) -> Self;
    /// The hyperbolic tangent.
    fn tanh(self) -> Self;
    /// The error function (libm's, for the exact GELU).
    fn erf(self) -> Self;
    /// The absolute value.
    fn abs(self) -> Self;
    /// Minus infinity (the identity of a maximum, as in max pooling).
    fn neg_infinity() -> Self;
    /// Whether the value is NaN.
    fn is_nan(self) -> bool;
    /// Converts a count or index (exact below 2^53 for `f64`, 2^24 for `f32`).
    fn from_usize(v: usize) -> Self {
        Self::from_f64(v as f64)
    }
    /// Converts a stored index back (truncating; negative and NaN values give 0), as max
    /// pooling reads its saved arg-max.
    fn to_usize(self) -> usize {
        self.to_f64() as usize
    }
}

macro_rules! impl_float {
    ($t:ty, $dtype:expr, $erf:path) => {
        impl Float for $t {
            const DTYPE: crate::backend::DType = $dtype;
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline]
            fn from_f32(v: f32) -> Self {
                v as $t
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn to_f32(self) -> f32 {
                self as f32
            }
            #[inline]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline]
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            #[inline]
            fn erf(self) -> Self {
                $erf(self)
            }
            #[inline]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline]
            fn neg_infinity() -> Self {
                <$t>::NEG_INFINITY
            }
            #[inline]
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
        }
    };
}

impl_float!(f32, crate::backend::DType::F32, libm::erff);
impl_float!(f64, crate::backend::DType::F64, libm::erf);
