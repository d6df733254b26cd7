//! `c (+)= a * b^T` with both operands row-major along the contraction axis ("NT"), for f32.
//!
//! The `gemm` crate is slow on this shape when the contraction is long and the output small, as
//! in a dense layer's forward pass at small batch (`y[8, 512] = x[8, 51200] * w[512, 51200]^T`
//! ran at 5 GFLOP/s, 16x below its speed on other layouts; see `BENCHMARKS.md`). Here each
//! output is a dot product of two contiguous rows: a 4x4 register tile of such dot products runs
//! over the contraction in SIMD lanes, with AVX-512 or AVX2+FMA picked at run time.

use rayon::prelude::*;

const KC: usize = 2048;

/// A 4x4 tile of dot products over `k` values: rows `a[i * lda..]`, `b[j * ldb..]`.
///
/// # Safety
/// `a` must hold 4 rows of `k` values at stride `lda`, `b` 4 rows at stride `ldb`.
#[inline(always)]
unsafe fn tile<const L: usize, const FMA: bool>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    k: usize,
) -> [[f32; 4]; 4] {
    let full = k / L * L;
    #[cfg(target_arch = "x86_64")]
    if FMA && L == 16 {
        // SAFETY: `block_avx512` (the only caller with L = 16 and FMA) runs where AVX-512 was
        // detected; the reads are the caller's promise.
        let acc = unsafe { lanes_avx512(a, lda, b, ldb, full) };
        return unsafe { finish(&acc, a, lda, b, ldb, (full, k)) };
    }
    #[cfg(target_arch = "x86_64")]
    if FMA && L == 8 {
        // SAFETY: as above, for `block_avx2`.
        let acc = unsafe { lanes_avx2(a, lda, b, ldb, full) };
        return unsafe { finish(&acc, a, lda, b, ldb, (full, k)) };
    }
    let mut acc = [[[0f32; L]; 4]; 4];
    let mut p = 0;
    while p < full {
        // SAFETY: p + L <= k, so every read stays within the rows.
        let av: [[f32; L]; 4] =
            std::array::from_fn(|i| unsafe { (a.add(i * lda + p) as *const [f32; L]).read_unaligned() });
        let bv: [[f32; L]; 4] =
            std::array::from_fn(|j| unsafe { (b.add(j * ldb + p) as *const [f32; L]).read_unaligned() });
        for i in 0..4 {
            for j in 0..4 {
                for l in 0..L {
                    acc[i][j][l] =
                        if FMA { av[i][l].mul_add(bv[j][l], acc[i][j][l]) } else { acc[i][j][l] + av[i][l] * bv[j][l] };
                }
            }
        }
        p += L;
    }
    // SAFETY: the caller's promise.
    unsafe { finish(&acc, a, lda, b, ldb, (full, k)) }
}

/// The tile's dot products: each accumulator's lanes summed in order, then the values
/// `full..k` that did not fill a vector.
///
/// # Safety
/// As [`tile`].
#[inline(always)]
unsafe fn finish<const M: usize>(
    acc: &[[[f32; M]; 4]; 4],
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    (full, k): (usize, usize),
) -> [[f32; 4]; 4] {
    let mut out = [[0f32; 4]; 4];
    for i in 0..4 {
        for j in 0..4 {
            let mut s: f32 = acc[i][j].iter().sum();
            for q in full..k {
                // SAFETY: q < k.
                s += unsafe { *a.add(i * lda + q) * *b.add(j * ldb + q) };
            }
            out[i][j] = s;
        }
    }
    out
}

// The AVX-512 and AVX2 accumulations are written with intrinsics: written as arrays of lanes
// (as `tile` does for other targets), LLVM kept the sixteen accumulators in registers at one
// commit and stored all of them to the stack on every iteration at the next (same source, a
// 15-19% slower CPU step; BENCHMARKS.md). Each lane gets the same fused multiply-adds in the same
// order as the portable loop, so the results are bit for bit the same.

/// Sixteen AVX-512 accumulators of the 4x4 tile over `a`/`b`'s first `full` values (a multiple
/// of 16), returned as lanes.
///
/// # Safety
/// AVX-512F and FMA must be available; the reads are as [`tile`]'s.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn lanes_avx512(a: *const f32, lda: usize, b: *const f32, ldb: usize, full: usize) -> [[[f32; 16]; 4]; 4] {
    use std::arch::x86_64::{_mm512_fmadd_ps, _mm512_loadu_ps, _mm512_setzero_ps, _mm512_storeu_ps};
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    let mut p = 0;
    while p < full {
        // SAFETY: p + 16 <= full <= the rows' length, as the caller promises.
        let (a0, a1, a2, a3) = unsafe {
            (
                _mm512_loadu_ps(a.add(p)),
                _mm512_loadu_ps(a.add(lda + p)),
                _mm512_loadu_ps(a.add(2 * lda + p)),
                _mm512_loadu_ps(a.add(3 * lda + p)),
            )
        };
        let av = [a0, a1, a2, a3];
        // SAFETY: as above, for b.
        let (b0, b1, b2, b3) = unsafe {
            (
                _mm512_loadu_ps(b.add(p)),
                _mm512_loadu_ps(b.add(ldb + p)),
                _mm512_loadu_ps(b.add(2 * ldb + p)),
                _mm512_loadu_ps(b.add(3 * ldb + p)),
            )
        };
        let bv = [b0, b1, b2, b3];
        for i in 0..4 {
            for j in 0..4 {
                acc[i][j] = _mm512_fmadd_ps(av[i], bv[j], acc[i][j]);
            }
        }
        p += 16;
    }
    let mut out = [[[0f32; 16]; 4]; 4];
    for i in 0..4 {
        for j in 0..4 {
            // SAFETY: 16 values fit the lane array.
            unsafe { _mm512_storeu_ps(out[i][j].as_mut_ptr(), acc[i][j]) };
        }
    }
    out
}

/// As [`lanes_avx512`] with AVX2 vectors of 8 (`full` a multiple of 8).
///
/// # Safety
/// AVX2 and FMA must be available; the reads are as [`tile`]'s.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn lanes_avx2(a: *const f32, lda: usize, b: *const f32, ldb: usize, full: usize) -> [[[f32; 8]; 4]; 4] {
    use std::arch::x86_64::{_mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps, _mm256_storeu_ps};
    let mut acc = [[_mm256_setzero_ps(); 4]; 4];
    let mut p = 0;
    while p < full {
        // SAFETY: p + 8 <= full <= the rows' length, as the caller promises.
        let (a0, a1, a2, a3) = unsafe {
            (
                _mm256_loadu_ps(a.add(p)),
                _mm256_loadu_ps(a.add(lda + p)),
                _mm256_loadu_ps(a.add(2 * lda + p)),
                _mm256_loadu_ps(a.add(3 * lda + p)),
            )
        };
        let av = [a0, a1, a2, a3];
        // SAFETY: as above, for b.
        let (b0, b1, b2, b3) = unsafe {
            (
                _mm256_loadu_ps(b.add(p)),
                _mm256_loadu_ps(b.add(ldb + p)),
                _mm256_loadu_ps(b.add(2 * ldb + p)),
                _mm256_loadu_ps(b.add(3 * ldb + p)),
            )
        };
        let bv = [b0, b1, b2, b3];
        for i in 0..4 {
            for j in 0..4 {
                acc[i][j] = _mm256_fmadd_ps(av[i], bv[j], acc[i][j]);
            }
        }
        p += 8;
    }
    let mut out = [[[0f32; 8]; 4]; 4];
    for i in 0..4 {
        for j in 0..4 {
            // SAFETY: 8 values fit the lane array.
            unsafe { _mm256_storeu_ps(out[i][j].as_mut_ptr(), acc[i][j]) };
        }
    }
    out
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Adds `a * b^T` for all `m` rows of `a` and the first `nb` rows of `b` into `out`, whose
/// element (i, j) is at `out.add(i * ldc + j)`.
///
/// # Safety
/// `out` must be valid for those writes, and no other thread may touch those elements.
#[inline(always)]
unsafe fn block<const L: usize, const FMA: bool>(
    (m, k): (usize, usize),
    a: Rows<'_>,
    b: Rows<'_>,
    nb: usize,
    out: Out,
) {
    let (Rows { v: a, ld: lda }, Rows { v: b, ld: ldb }, Out { ptr: out, ld: ldc }) = (a, b, out);
    // SAFETY (all writes below): (i, j) with i < m, j < nb, as the caller guarantees.
    let add = |i: usize, j: usize, v: f32| unsafe { *out.add(i * ldc + j) += v };
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        let mut i = 0;
        while i + 4 <= m {
            let mut j = 0;
            while j + 4 <= nb {
                // SAFETY: rows i..i+4 of a and j..j+4 of b exist and hold k0 + kc values.
                let t =
                    unsafe { tile::<L, FMA>(a.as_ptr().add(i * lda + k0), lda, b.as_ptr().add(j * ldb + k0), ldb, kc) };
                for (ii, row) in t.iter().enumerate() {
                    for (jj, v) in row.iter().enumerate() {
                        add(i + ii, j + jj, *v);
                    }
                }
                j += 4;
            }
            for jj in j..nb {
                for ii in i..i + 4 {
                    add(ii, jj, dot(&a[ii * lda + k0..][..kc], &b[jj * ldb + k0..][..kc]));
                }
            }
            i += 4;
        }
        for ii in i..m {
            for jj in 0..nb {
                add(ii, jj, dot(&a[ii * lda + k0..][..kc], &b[jj * ldb + k0..][..kc]));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn block_avx512((m, k): (usize, usize), a: Rows<'_>, b: Rows<'_>, nb: usize, out: Out) {
    // SAFETY: forwarded from the caller.
    unsafe { block::<16, true>((m, k), a, b, nb, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2((m, k): (usize, usize), a: Rows<'_>, b: Rows<'_>, nb: usize, out: Out) {
    // SAFETY: forwarded from the caller.
    unsafe { block::<8, true>((m, k), a, b, nb, out) }
}

/// # Safety
/// As [`block`].
unsafe fn block_dispatch((m, k): (usize, usize), a: Rows<'_>, b: Rows<'_>, nb: usize, out: Out) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the features were detected on this CPU; the rest is the caller's promise.
            return unsafe { block_avx512((m, k), a, b, nb, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { block_avx2((m, k), a, b, nb, out) };
        }
    }
    // SAFETY: the caller's promise.
    unsafe { block::<8, false>((m, k), a, b, nb, out) }
}

/// Rows of a row-major matrix: row `i` starts at `v[i * ld]`.
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    /// The values.
    pub v: &'a [f32],
    /// The row stride.
    pub ld: usize,
}

/// Where a block writes: element (i, j) at `ptr.add(i * ld + j)`.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    ld: usize,
}

/// A raw pointer that may cross threads: each task writes its own columns only.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `c[m, n] = a[m, k] * b[n, k]^T` (or `+=` when `accumulate`); `a`, `b`, `c` row-major with row
/// strides `a.ld`, `b.ld`, `ldc`. Blocks of columns of `c` are split over the current rayon pool;
/// each output is summed in the same order whatever the thread count.
pub fn gemm_nt(
    (m, n, k): (usize, usize, usize),
    a: Rows<'_>,
    b: Rows<'_>,
    (c, ldc): (&mut [f32], usize),
    accumulate: bool,
    threads: usize,
) {
    let (lda, ldb) = (a.ld, b.ld);
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.v.len() >= (m - 1) * lda + k && b.v.len() >= (n - 1) * ldb + k && c.len() >= (m - 1) * ldc + n);
    assert!(ldc >= n);
    if !accumulate {
        for i in 0..m {
            c[i * ldc..i * ldc + n].fill(0.0);
        }
    }
    let per = n.div_ceil(threads.max(1) * 2).max(16).next_multiple_of(4);
    let out = SendPtr(c.as_mut_ptr());
    (0..n.div_ceil(per)).into_par_iter().for_each(|blk| {
        let j0 = blk * per;
        let nb = per.min(n - j0);
        let o = out;
        // SAFETY: the asserts above keep (i, j0 + j) inside `c` for i < m, j < nb, and column
        // blocks are disjoint, so no two tasks write the same element.
        unsafe {
            block_dispatch((m, k), a, Rows { v: &b.v[j0 * ldb..], ld: ldb }, nb, Out { ptr: o.0.add(j0), ld: ldc })
        };
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_on_ragged_shapes() {
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (4, 4, 16), (9, 21, 100), (8, 64, 2500), (13, 3, 4097)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
            let b: Vec<f32> = (0..n * k).map(|i| ((i * 5) % 13) as f32 - 6.0).collect();
            let mut c = vec![1.0f32; m * n];
            gemm_nt((m, n, k), Rows { v: &a, ld: k }, Rows { v: &b, ld: k }, (&mut c, n), true, 2);
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = 1.0 + (0..k).map(|p| a[i * k + p] * b[j * k + p]).sum::<f32>();
                    assert_eq!(c[i * n + j], want, "({m},{n},{k}) at ({i},{j})");
                }
            }
        }
    }

    /// The value `tile::<L, true>` must give for one output: lane `l` accumulates
    /// `a[p] * b[p]` (fused) for `p = l, l + L, ...` below the last whole vector, the lanes are
    /// summed in order, then the remaining products are added one by one.
    fn lane_order_dot(a: &[f32], b: &[f32], lanes: usize, k0: usize, kc: usize) -> f32 {
        let full = kc / lanes * lanes;
        let mut acc = vec![0f32; lanes];
        for p in (0..full).step_by(lanes) {
            for (l, v) in acc.iter_mut().enumerate() {
                *v = a[k0 + p + l].mul_add(b[k0 + p + l], *v);
            }
        }
        let mut s: f32 = acc.iter().sum();
        for q in full..kc {
            s += a[k0 + q] * b[k0 + q];
        }
        s
    }

    /// The intrinsic AVX-512 and AVX2 paths are bit for bit the portable lane order (values
    /// with many significant bits, so any other summation order shows).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn simd_paths_keep_the_lane_order() {
        let (m, nb, k) = (6, 7, 2 * KC + 37);
        let mut r = crate::rng::Rng::new(5);
        let a: Vec<f32> = (0..m * k).map(|_| r.normal()).collect();
        let b: Vec<f32> = (0..nb * k).map(|_| r.normal()).collect();
        type Block = unsafe fn((usize, usize), Rows<'_>, Rows<'_>, usize, Out);
        let mut paths: Vec<(usize, Block)> = Vec::new();
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
            paths.push((16, block_avx512));
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            paths.push((8, block_avx2));
        }
        assert!(!paths.is_empty(), "this x86-64 CPU has neither AVX-512 nor AVX2 with FMA");
        for (lanes, f) in paths {
            let mut c = vec![0f32; m * nb];
            let out = Out { ptr: c.as_mut_ptr(), ld: nb };
            // SAFETY: the features were detected; `c` holds m x nb values at stride nb.
            unsafe { f((m, k), Rows { v: &a, ld: k }, Rows { v: &b, ld: k }, nb, out) };
            for i in 0..m {
                for j in 0..nb {
                    let (ar, br) = (&a[i * k..][..k], &b[j * k..][..k]);
                    // Blocks of KC add into the output one after another.
                    let want = (0..k).step_by(KC).fold(0f32, |acc, k0| {
                        let kc = KC.min(k - k0);
                        // Rows past the last whole 4x4 tile use the plain dot product.
                        let tiled = i < m / 4 * 4 && j < nb / 4 * 4;
                        acc + if tiled {
                            lane_order_dot(ar, br, lanes, k0, kc)
                        } else {
                            ar[k0..k0 + kc].iter().zip(&br[k0..k0 + kc]).map(|(x, y)| x * y).sum::<f32>()
                        }
                    });
                    assert_eq!(c[i * nb + j].to_bits(), want.to_bits(), "{lanes} lanes at ({i},{j})");
                }
            }
        }
    }
}
