//! Element types of buffers ([`DType`]) and typed host copies ([`HostSlice`], [`HostVec`]).
//!
//! Every buffer has a dtype, given at [`crate::backend::Backend::alloc`]. Host copies carry
//! their element type with them, so no byte count is ever derived from an assumed `f32`.
//! Float buffers take and give any float type, converted on the host (rounded to nearest);
//! integer buffers only their own.

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The element type of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    /// IEEE 754 single precision: what every op computes in on the GPU, and on `CpuBackend<f32>`.
    F32,
    /// IEEE 754 double precision: the CPU reference path.
    F64,
    /// bfloat16 (storage and copies; compute comes with mixed precision).
    BF16,
    /// IEEE 754 half precision (storage and copies; compute comes with mixed precision).
    F16,
    /// Unsigned 32-bit integers (class indices, positions).
    U32,
    /// Signed 64-bit integers (PyTorch's label dtype).
    I64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// Whether values are floating point.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::BF16 | DType::F16)
    }

    /// Whether this is a half-precision float that mixed precision computes products in
    /// (bf16, f16).
    pub fn is_half(self) -> bool {
        matches!(self, DType::BF16 | DType::F16)
    }

    /// The name PyTorch gives it (`float32`, `bfloat16`, `int64`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            DType::U32 => "uint32",
            DType::I64 => "int64",
        }
    }

    /// Bytes of `len` elements, or an error naming the overflow.
    pub fn bytes(self, len: usize) -> Result<usize> {
        len.checked_mul(self.size()).ok_or_else(|| {
            Error::shape("buffer size", format!("at most {} {} values", usize::MAX / self.size(), self.name()), len)
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Host values of one dtype, borrowed: what [`crate::backend::Backend::write_host`] copies in.
#[derive(Clone, Copy, Debug)]
pub enum HostSlice<'a> {
    /// `f32` values.
    F32(&'a [f32]),
    /// `f64` values.
    F64(&'a [f64]),
    /// bfloat16 values.
    BF16(&'a [bf16]),
    /// half-precision values.
    F16(&'a [f16]),
    /// `u32` values.
    U32(&'a [u32]),
    /// `i64` values.
    I64(&'a [i64]),
}

/// Host values of one dtype, owned: what [`crate::backend::Backend::read_host`] returns.
#[derive(Clone, Debug, PartialEq)]
pub enum HostVec {
    /// `f32` values.
    F32(Vec<f32>),
    /// `f64` values.
    F64(Vec<f64>),
    /// bfloat16 values.
    BF16(Vec<bf16>),
    /// half-precision values.
    F16(Vec<f16>),
    /// `u32` values.
    U32(Vec<u32>),
    /// `i64` values.
    I64(Vec<i64>),
}

/// Calls `$body` with `$v` bound to the inner slice or vector of any variant.
macro_rules! each_variant {
    ($e:expr, $t:ident, $v:ident => $body:expr) => {
        match $e {
            $t::F32($v) => $body,
            $t::F64($v) => $body,
            $t::BF16($v) => $body,
            $t::F16($v) => $body,
            $t::U32($v) => $body,
            $t::I64($v) => $body,
        }
    };
}

/// The bytes of a slice of plain numbers (every kiln host is little-endian, as the GPU is).
fn bytes_of<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: the element types here (f32, f64, bf16, f16, u32, i64) have no padding and every
    // bit pattern of their bytes is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn bytes_of_mut<T: Copy>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as `bytes_of`; and every bit pattern is a valid value of these element types.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}

impl HostSlice<'_> {
    /// The dtype of the values.
    pub fn dtype(&self) -> DType {
        match self {
            HostSlice::F32(_) => DType::F32,
            HostSlice::F64(_) => DType::F64,
            HostSlice::BF16(_) => DType::BF16,
            HostSlice::F16(_) => DType::F16,
            HostSlice::U32(_) => DType::U32,
            HostSlice::I64(_) => DType::I64,
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        each_variant!(self, HostSlice, v => v.len())
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values' bytes, little-endian.
    pub fn as_bytes(&self) -> &[u8] {
        each_variant!(self, HostSlice, v => bytes_of(v))
    }

    /// The values as `f64` (exact for every float dtype; `None` for integers).
    pub fn to_f64(&self) -> Option<Vec<f64>> {
        Some(match *self {
            HostSlice::F32(v) => v.iter().map(|&x| x as f64).collect(),
            HostSlice::F64(v) => v.to_vec(),
            HostSlice::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
            HostSlice::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            HostSlice::U32(_) | HostSlice::I64(_) => return None,
        })
    }

    /// The values converted to `dtype`: any float type to any float type (rounded to nearest);
    /// integers only to their own type. An error names both dtypes otherwise.
    pub fn convert(&self, dtype: DType) -> Result<HostVec> {
        if self.dtype() == dtype {
            return Ok(self.to_owned());
        }
        let mismatch = || Error::shape("host copy", format!("{dtype} values"), format!("{} values", self.dtype()));
        if !(self.dtype().is_float() && dtype.is_float()) {
            return Err(mismatch());
        }
        // Straight from f32 where it is the source, so f32 -> bf16/f16 rounds once.
        if let HostSlice::F32(v) = *self {
            return Ok(match dtype {
                DType::F64 => HostVec::F64(v.iter().map(|&x| x as f64).collect()),
                DType::BF16 => HostVec::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
                DType::F16 => HostVec::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
                _ => return Err(mismatch()),
            });
        }
        let w = self.to_f64().ok_or_else(mismatch)?;
        HostVec::from_f64(dtype, &w).ok_or_else(mismatch)
    }

    /// An owned copy.
    pub fn to_owned(&self) -> HostVec {
        match *self {
            HostSlice::F32(v) => HostVec::F32(v.to_vec()),
            HostSlice::F64(v) => HostVec::F64(v.to_vec()),
            HostSlice::BF16(v) => HostVec::BF16(v.to_vec()),
            HostSlice::F16(v) => HostVec::F16(v.to_vec()),
            HostSlice::U32(v) => HostVec::U32(v.to_vec()),
            HostSlice::I64(v) => HostVec::I64(v.to_vec()),
        }
    }
}

impl HostVec {
    /// `len` zeros of `dtype`.
    pub fn zeros(dtype: DType, len: usize) -> HostVec {
        match dtype {
            DType::F32 => HostVec::F32(vec![0.0; len]),
            DType::F64 => HostVec::F64(vec![0.0; len]),
            DType::BF16 => HostVec::BF16(vec![bf16::ZERO; len]),
            DType::F16 => HostVec::F16(vec![f16::ZERO; len]),
            DType::U32 => HostVec::U32(vec![0; len]),
            DType::I64 => HostVec::I64(vec![0; len]),
        }
    }

    /// `f64` values rounded to the float `dtype`; `None` for an integer dtype.
    pub fn from_f64(dtype: DType, v: &[f64]) -> Option<HostVec> {
        Some(match dtype {
            DType::F32 => HostVec::F32(v.iter().map(|&x| x as f32).collect()),
            DType::F64 => HostVec::F64(v.to_vec()),
            DType::BF16 => HostVec::BF16(v.iter().map(|&x| bf16::from_f64(x)).collect()),
            DType::F16 => HostVec::F16(v.iter().map(|&x| f16::from_f64(x)).collect()),
            DType::U32 | DType::I64 => return None,
        })
    }

    /// The values, borrowed.
    pub fn as_slice(&self) -> HostSlice<'_> {
        match self {
            HostVec::F32(v) => HostSlice::F32(v),
            HostVec::F64(v) => HostSlice::F64(v),
            HostVec::BF16(v) => HostSlice::BF16(v),
            HostVec::F16(v) => HostSlice::F16(v),
            HostVec::U32(v) => HostSlice::U32(v),
            HostVec::I64(v) => HostSlice::I64(v),
        }
    }

    /// The dtype of the values.
    pub fn dtype(&self) -> DType {
        self.as_slice().dtype()
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values' bytes, little-endian, to fill from a device.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        each_variant!(self, HostVec, v => bytes_of_mut(v))
    }

    /// The values as `f32` (rounded from f64; exact from the half types); an error for integers.
    pub fn into_f32(self) -> Result<Vec<f32>> {
        match self {
            HostVec::F32(v) => Ok(v),
            other => match other.as_slice().convert(DType::F32)? {
                HostVec::F32(v) => Ok(v),
                _ => unreachable!("convert returns the dtype asked for"),
            },
        }
    }

    /// The values as `f64` (exact from every float dtype); an error for integers.
    pub fn into_f64(self) -> Result<Vec<f64>> {
        match self {
            HostVec::F64(v) => Ok(v),
            other => other
                .as_slice()
                .to_f64()
                .ok_or_else(|| Error::shape("host copy", "float values", format!("{} values", other.dtype()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_conversions() {
        assert_eq!(
            [DType::F32, DType::F64, DType::BF16, DType::F16, DType::U32, DType::I64].map(DType::size),
            [4, 8, 2, 2, 4, 8]
        );
        let v = [1.0f32, -2.5, 3.0e-3];
        let b = HostSlice::F32(&v).convert(DType::BF16).unwrap();
        assert_eq!(b.dtype(), DType::BF16);
        assert_eq!(b.as_slice().as_bytes().len(), 6);
        let back = b.into_f32().unwrap();
        assert_eq!(back[..2], [1.0, -2.5]);
        assert!((back[2] - 3.0e-3).abs() < 3.0e-3 / 128.0);
        assert!(HostSlice::U32(&[1, 2]).convert(DType::F32).is_err());
        assert!(HostSlice::F32(&v).convert(DType::I64).is_err());
        assert_eq!(HostSlice::I64(&[7]).convert(DType::I64).unwrap(), HostVec::I64(vec![7]));
        assert_eq!(DType::U32.bytes(3).unwrap(), 12);
        assert!(DType::F64.bytes(usize::MAX).is_err());
    }
}
