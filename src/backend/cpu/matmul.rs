//! A checked wrapper around the `gemm` crate: every matrix product of the CPU backend (dense
//! layers and im2col convolutions) goes through [`matmul`].

use super::float::Float;

/// A matrix view: `data[r * rs + c * cs]` is element (r, c).
#[derive(Clone, Copy)]
pub struct Mat<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major `rows x cols` matrix.
    pub fn rm(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, rs: cols, cs: 1 }
    }
    /// The transpose of this view (no copy).
    pub fn t(self) -> Self {
        Mat { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
    fn max_index(&self) -> usize {
        if self.rows == 0 || self.cols == 0 { 0 } else { (self.rows - 1) * self.rs + (self.cols - 1) * self.cs }
    }
}

/// `c = a * b` (or `c += a * b` when `accumulate`), with `c` row-major `a.rows x b.cols` at row
/// stride `ldc`. `threads > 1` lets gemm split the product over the current rayon pool.
pub fn matmul<T: Float>(c: &mut [T], ldc: usize, accumulate: bool, a: Mat<T>, b: Mat<T>, threads: usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "matmul: inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * ldc + n <= c.len(), "matmul: destination too small");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                c[r * ldc..r * ldc + n].fill(T::ZERO);
            }
        }
        return;
    }
    assert!(a.max_index() < a.data.len() && b.max_index() < b.data.len(), "matmul: operand too small");
    // Contraction contiguous in both operands and long next to the output: dot products beat
    // gemm there (see dot.rs); gemm stays better when the output is large.
    if a.cs == 1 && b.rs == 1 && k >= 4 * m.max(n) && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        let cast = |s: &[T]| -> &[f32] {
            // SAFETY: T is f32 (checked above), so the slice has the same layout.
            unsafe { std::slice::from_raw_parts(s.as_ptr() as *const f32, s.len()) }
        };
        // SAFETY: as above, for the mutable destination.
        let c32 = unsafe { std::slice::from_raw_parts_mut(c.as_mut_ptr() as *mut f32, c.len()) };
        use super::dot::{Rows, gemm_nt};
        gemm_nt(
            (m, n, k),
            Rows { v: cast(a.data), ld: a.rs },
            Rows { v: cast(b.data), ld: b.cs },
            (c32, ldc),
            accumulate,
            threads,
        );
        return;
    }
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the asserts above keep every index gemm touches inside the three slices, and `c`
    // is borrowed mutably, so it cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        );
    }
}
