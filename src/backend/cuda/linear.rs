//! Dense layers on the GPU through cuBLASLt: `y = x w^T + b` with the bias fused in the
//! epilogue, and backward `dx = dy w`, `dw = dy^T x` with the bias gradient fused into the `dw`
//! product (`BGRADB` epilogue) where cuBLASLt offers it; `join.rs`'s column sum otherwise, and
//! whenever the bias gradient must accumulate (an epilogue can only overwrite).
//!
//! cuBLASLt is column-major; kiln's row-major `a[r, c]` is column-major `a^T`. So, with
//! `X = x^T` (k x m), `W = w^T` (k x n), `DY = dy^T` (n x m), all leading dimensions the rows:
//!
//! | product | cuBLASLt `D = op(A) op(B)` | M x N, K |
//! | --- | --- | --- |
//! | `y^T = w x^T` | `A = W` transposed, `B = X` | n x m, k |
//! | `dx^T = w^T dy^T` | `A = W`, `B = DY` | k x m, n |
//! | `dw^T = x^T dy` | `A = X`, `B = DY` transposed | k x n, m |
//!
//! The `BGRADB` bias gradient is the sum of `op(B)` over the product's `K` (= batch) dimension,
//! one value per column of D: exactly `db[j] = sum_r dy[r, j]`.
//!
//! Compute type `CUBLAS_COMPUTE_32F` (true f32) unless TF32 was asked for
//! (`CUBLAS_COMPUTE_32F_FAST_TF32`). The algorithm of each product shape is chosen once by
//! cuBLASLt's heuristic and cached, so eager and replayed runs use the same one.
//!
//! Mixed precision (bf16 or f16 `x`, `w` and `dy`, from the casts `exec` puts before the op):
//! A and B are half, D (and C) stay f32 with f32 compute, so outputs, accumulation into
//! gradients and the bias epilogue are f32 as before. The bias gradient is then summed from the
//! half `dy`
//! (`cast.rs`), not in the `BGRADB` epilogue.

use std::collections::HashMap;
use std::ffi::{CStr, c_void};

use cudarc::cublaslt::sys;
use cudarc::driver::sys::CUdeviceptr;

use super::CudaBackend;
use crate::backend::DType;
use crate::backend::ops::RunOp;
use crate::backend::ops::{self, BufId};
use crate::{Error, Result};

macro_rules! blaslt {
    ($f:ident ( $($a:expr),* $(,)? )) => {
        $crate::backend::cuda::linear::check_lt(stringify!($f), cudarc::cublaslt::sys::$f($($a),*))
    };
}

pub(crate) fn check_lt(call: &str, r: sys::cublasStatus_t) -> Result<()> {
    if r == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        return Ok(());
    }
    // SAFETY: returns a static string for any status.
    let p = unsafe { sys::cublasLtGetStatusName(r) };
    let status = if p.is_null() {
        format!("cublasStatus {}", r as u32)
    } else {
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into()
    };
    Err(Error::DeviceCall { call: call.to_string(), status })
}

/// cuBLASLt's workspace: 32 MiB, NVIDIA's recommendation for Hopper.
pub(crate) const LT_WORKSPACE: usize = 32 << 20;

const OP_N: i32 = 0;
const OP_T: i32 = 1;

/// One matrix product's shape and options (everything but the pointers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Gemm {
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldd: usize,
    epilogue: u32,
    accumulate: bool,
    /// The type of A and B: f32, or bf16 or f16 (mixed precision); D is f32 either way.
    ab: DType,
}

/// The cuBLASLt state of a backend.
pub(crate) struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CUdeviceptr,
    compute: sys::cublasComputeType_t,
    /// The heuristic's algorithm per product, or `None` where it offered none (an epilogue that
    /// this shape does not support).
    algos: HashMap<Gemm, Option<sys::cublasLtMatmulAlgo_t>>,
    pub version: usize,
}

impl Lt {
    pub fn new(workspace: CUdeviceptr, tf32: bool) -> Result<Lt> {
        let mut handle = std::ptr::null_mut();
        // SAFETY: out-pointer to a local.
        unsafe { blaslt!(cublasLtCreate(&mut handle))? };
        // SAFETY: a plain query.
        let version = unsafe { sys::cublasLtGetVersion() };
        let compute = if tf32 {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        Ok(Lt { handle, workspace, compute, algos: HashMap::new(), version })
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: the handle belongs to this value.
        unsafe {
            let _ = blaslt!(cublasLtDestroy(self.handle));
        }
    }
}

/// The descriptors of one call, destroyed on drop whatever happens.
struct Descs {
    op: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
}

impl Drop for Descs {
    fn drop(&mut self) {
        // SAFETY: each non-null handle was created for this value.
        unsafe {
            if !self.op.is_null() {
                let _ = blaslt!(cublasLtMatmulDescDestroy(self.op));
            }
            for l in [self.a, self.b, self.d] {
                if !l.is_null() {
                    let _ = blaslt!(cublasLtMatrixLayoutDestroy(l));
                }
            }
        }
    }
}

fn set_attr<T>(desc: sys::cublasLtMatmulDesc_t, attr: sys::cublasLtMatmulDescAttributes_t, v: &T) -> Result<()> {
    // SAFETY: `v` points at a value of the type the attribute expects (callers pass i32 for
    // transposes, u32 for the epilogue, a pointer for the bias).
    unsafe { blaslt!(cublasLtMatmulDescSetAttribute(desc, attr, v as *const T as *const c_void, size_of::<T>())) }
}

fn descs(gm: &Gemm, compute: sys::cublasComputeType_t, bias: CUdeviceptr) -> Result<Descs> {
    let mut d =
        Descs { op: std::ptr::null_mut(), a: std::ptr::null_mut(), b: std::ptr::null_mut(), d: std::ptr::null_mut() };
    let f32t = sys::cudaDataType_t::CUDA_R_32F;
    let ab = match gm.ab {
        DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
        _ => f32t,
    };
    // TF32 is a mode of f32 inputs; half inputs take the plain f32 compute type.
    let compute = if gm.ab.is_half() { sys::cublasComputeType_t::CUBLAS_COMPUTE_32F } else { compute };
    let (ar, ac) = if gm.trans_a { (gm.k, gm.m) } else { (gm.m, gm.k) };
    let (br, bc) = if gm.trans_b { (gm.n, gm.k) } else { (gm.k, gm.n) };
    use sys::cublasLtMatmulDescAttributes_t as A;
    // SAFETY: out-pointers into `d`, which destroys what was created on every path.
    unsafe {
        blaslt!(cublasLtMatmulDescCreate(&mut d.op, compute, f32t))?;
        blaslt!(cublasLtMatrixLayoutCreate(&mut d.a, ab, ar as u64, ac as u64, gm.lda as i64))?;
        blaslt!(cublasLtMatrixLayoutCreate(&mut d.b, ab, br as u64, bc as u64, gm.ldb as i64))?;
        blaslt!(cublasLtMatrixLayoutCreate(&mut d.d, f32t, gm.m as u64, gm.n as u64, gm.ldd as i64))?;
    }
    set_attr(d.op, A::CUBLASLT_MATMUL_DESC_TRANSA, &if gm.trans_a { OP_T } else { OP_N })?;
    set_attr(d.op, A::CUBLASLT_MATMUL_DESC_TRANSB, &if gm.trans_b { OP_T } else { OP_N })?;
    set_attr(d.op, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &gm.epilogue)?;
    if bias != 0 {
        set_attr(d.op, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias)?;
    }
    Ok(d)
}

const EPI_DEFAULT: u32 = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT as u32;
const EPI_BIAS: u32 = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as u32;
const EPI_BGRADB: u32 = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BGRADB as u32;

impl CudaBackend {
    /// Runs `D = op(A) op(B)` (+ epilogue), or returns `Ok(false)` without running anything when
    /// cuBLASLt has no algorithm for this shape and epilogue.
    fn gemm(&mut self, gm: Gemm, a: CUdeviceptr, b: CUdeviceptr, d: CUdeviceptr, bias: CUdeviceptr) -> Result<bool> {
        let ds = descs(&gm, self.lt.compute, bias)?;
        let algo = match self.lt.algos.get(&gm) {
            Some(a) => *a,
            None => {
                let a = self.gemm_heuristic(&ds)?;
                if self.debug {
                    let what = if a.is_some() { "heuristic algorithm" } else { "no algorithm, falling back" };
                    eprintln!("[kiln cuda] cublasLt {gm:?}: {what}");
                }
                self.lt.algos.insert(gm, a);
                a
            }
        };
        let Some(algo) = algo else { return Ok(false) };
        let (alpha, beta) = (1.0f32, if gm.accumulate { 1.0f32 } else { 0.0f32 });
        // SAFETY: the layouts describe live device buffers of these sizes (checked against the
        // plan in `exec`); C and D are the same buffer (in place when accumulating).
        unsafe {
            blaslt!(cublasLtMatmul(
                self.lt.handle,
                ds.op,
                &alpha as *const f32 as *const c_void,
                a as *const c_void,
                ds.a,
                b as *const c_void,
                ds.b,
                &beta as *const f32 as *const c_void,
                d as *const c_void,
                ds.d,
                d as *mut c_void,
                ds.d,
                &algo,
                self.lt.workspace as *mut c_void,
                LT_WORKSPACE,
                self.gpu.stream as sys::cudaStream_t
            ))?;
        }
        Ok(true)
    }

    fn gemm_heuristic(&self, ds: &Descs) -> Result<Option<sys::cublasLtMatmulAlgo_t>> {
        let mut pref = std::ptr::null_mut();
        let mut result = [unsafe { std::mem::zeroed::<sys::cublasLtMatmulHeuristicResult_t>() }];
        let mut found = 0;
        // SAFETY: out-pointers to locals; the preference is destroyed below.
        unsafe {
            blaslt!(cublasLtMatmulPreferenceCreate(&mut pref))?;
            let ws = LT_WORKSPACE as u64;
            let r = blaslt!(cublasLtMatmulPreferenceSetAttribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8
            ))
            .and_then(|_| {
                let s = sys::cublasLtMatmulAlgoGetHeuristic(
                    self.lt.handle,
                    ds.op,
                    ds.a,
                    ds.b,
                    ds.d,
                    ds.d,
                    pref,
                    1,
                    result.as_mut_ptr(),
                    &mut found,
                );
                // "Not supported" (an epilogue this shape lacks) is an answer, not a failure.
                if s == sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED {
                    found = 0;
                    Ok(())
                } else {
                    check_lt("cublasLtMatmulAlgoGetHeuristic", s)
                }
            });
            let _ = blaslt!(cublasLtMatmulPreferenceDestroy(pref));
            r?;
        }
        Ok((found > 0 && result[0].state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS).then_some(result[0].algo))
    }
}

impl CudaBackend {
    /// The dtype of a dense op's inputs (`x`, `w`, and `dy` in backward): all f32, or all bf16
    /// or all f16 (mixed precision), with every output, bias and gradient f32; an error naming
    /// the buffers otherwise.
    fn linear_dtype(&self, op: &str, inputs: &[BufId], outputs: &[BufId]) -> Result<DType> {
        let first = self.dtype_of(inputs[0]);
        let want = if first.is_half() { first } else { DType::F32 };
        if inputs.iter().all(|&b| self.dtype_of(b) == want) && outputs.iter().all(|&b| self.dtype_of(b) == DType::F32) {
            return Ok(want);
        }
        let list = |bs: &[BufId]| {
            bs.iter().map(|b| format!("buffer {} {}", b.0, self.dtype_of(*b))).collect::<Vec<_>>().join(", ")
        };
        Err(Error::State(format!(
            "{op}: inputs must be all f32, all bf16 or all f16 and outputs f32; got inputs {}, outputs {}",
            list(inputs),
            list(outputs)
        )))
    }
}

impl RunOp<ops::Linear> for CudaBackend {
    fn run_op(&mut self, o: &ops::Linear) -> Result<()> {
        let ops::Linear { m, k, n, x, w, b, y, .. } = *o;
        let mut outputs = vec![y];
        outputs.extend(b);
        let ab = self.linear_dtype("linear", &[x, w], &outputs)?;
        let gm = Gemm {
            trans_a: true,
            trans_b: false,
            m: n,
            n: m,
            k,
            lda: k,
            ldb: k,
            ldd: n,
            epilogue: if b.is_some() { EPI_BIAS } else { EPI_DEFAULT },
            accumulate: false,
            ab,
        };
        let (xp, wp, yp, bp) = (self.ptr(x), self.ptr(w), self.ptr(y), self.opt_ptr(b));
        if self.gemm(gm, wp, xp, yp, bp)? {
            return Ok(());
        }
        // No fused-bias algorithm for this shape: the plain product, then the bias.
        let plain = Gemm { epilogue: EPI_DEFAULT, ..gm };
        if !self.gemm(plain, wp, xp, yp, 0)? {
            return Err(no_algo(&plain));
        }
        if let Some(b) = b {
            self.bias_add(y, b, m, n, 1)?;
        }
        Ok(())
    }
}

impl RunOp<ops::LinearBackward> for CudaBackend {
    fn run_op(&mut self, o: &ops::LinearBackward) -> Result<()> {
        let ops::LinearBackward { m, k, n, x, w, dy, dx, dw, db, .. } = *o;
        let mut outputs = vec![dw.buf];
        outputs.extend(dx.map(|d| d.buf));
        outputs.extend(db.map(|d| d.buf));
        let ab = self.linear_dtype("linear_backward", &[x, w, dy], &outputs)?;
        let (xp, wp, dyp) = (self.ptr(x), self.ptr(w), self.ptr(dy));
        if let Some(dx) = dx {
            let gm = Gemm {
                trans_a: false,
                trans_b: false,
                m: k,
                n: m,
                k: n,
                lda: k,
                ldb: n,
                ldd: k,
                epilogue: EPI_DEFAULT,
                accumulate: dx.accumulate,
                ab,
            };
            if !self.gemm(gm, wp, dyp, self.ptr(dx.buf), 0)? {
                return Err(no_algo(&gm));
            }
        }
        let gm = Gemm {
            trans_a: false,
            trans_b: true,
            m: k,
            n,
            k: m,
            lda: k,
            ldb: n,
            ldd: k,
            epilogue: EPI_DEFAULT,
            accumulate: dw.accumulate,
            ab,
        };
        let dwp = self.ptr(dw.buf);
        if let Some(db) = db
            && !db.accumulate
            && !ab.is_half()
            && self.gemm(Gemm { epilogue: EPI_BGRADB, ..gm }, xp, dyp, dwp, self.ptr(db.buf))?
        {
            return Ok(());
        }
        if !self.gemm(gm, xp, dyp, dwp, 0)? {
            return Err(no_algo(&gm));
        }
        match db {
            Some(db) if ab.is_half() => self.column_sum_half(dy, db, m, n)?,
            Some(db) => self.column_sum(dy, db, m, n)?,
            None => {}
        }
        Ok(())
    }
}

fn no_algo(gm: &Gemm) -> Error {
    Error::DeviceCall { call: "cublasLtMatmulAlgoGetHeuristic".into(), status: format!("no algorithm for {gm:?}") }
}
