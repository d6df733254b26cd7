//! Joins and copies on the GPU: addition of several tensors (residual joins), channel
//! concatenation and its gradient (Inception), gradient copies, fills; plus the two reductions
//! that the library-backed layers need beside cuDNN and cuBLASLt (bias add and per-channel sum
//! for convolutions, per-column sum for dense layers). As `backend/cpu/join.rs`.

use super::CudaBackend;
use super::nvrtc::ModuleSrc;
use crate::backend::ops;
use crate::backend::ops::RunOp;
use crate::backend::ops::{BufId, GradOut};
use crate::{Error, Result};

/// Inputs one `add` launch takes; longer sums chain launches that accumulate.
const ADD_FAN_IN: usize = 8;

/// Threads per block of the per-channel reduction.
const SUM_THREADS: u32 = 256;

kernels! {
    add_n(y: (void*), n: i64, count: int, acc: int, a0: (const void*), a1: (const void*), a2: (const void*), a3: (const void*), a4: (const void*), a5: (const void*), a6: (const void*), a7: (const void*), kind: int);
    strided_copy(src: (const float*), dst: (float*), rows: i64, len: i64, src_stride: i64, src_off: i64, dst_stride: i64, dst_off: i64, acc: int);
    copy_or_add(src: (const void*), dst: (void*), n: i64, acc: int, kind: int);
    fill(dst: (float*), n: i64, v: float);
    bias_add(y: (float*), b: (const float*), total: i64, k: i64, hw: i64);
    channel_sum(dy: (const float*), db: (float*), n: i64, k: i64, hw: i64, acc: int);
    column_sum(dy: (const float*), db: (float*), m: i64, n: i64, acc: int);
}

pub(super) const MODULE: ModuleSrc = ModuleSrc {
    name: "join",
    kernels: KERNELS,
    prototypes,
    source: concat!(
        half_prelude!(),
        r#"
// y = a0 + a1 + ... (count inputs, added left to right), or y += a0 + ... when acc; y and the
// inputs all of one kind (0 f32, 1 bf16, 2 f16: the sum in f32, rounded once). Each thread
// loads ILP values of an input (a grid stride apart) before adding them, as batch_norm.rs's
// element-wise kernels do (same additions in the same order).
#define ILP 4
extern "C" __global__ void add_n(void* y, i64 n, int count, int acc, const void* a0, const void* a1,
                                 const void* a2, const void* a3, const void* a4, const void* a5,
                                 const void* a6, const void* a7, int kind) {
    const void* a[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
    i64 i0 = (i64)blockIdx.x * blockDim.x + threadIdx.x, stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = i0; i < n; i += ILP * stride) {
        float s[ILP];
#pragma unroll
        for (int k = 0; k < ILP; k++) {
            i64 at = i + k * stride;
            s[k] = at < n ? (acc ? load_any(y, at, kind) + load_any(a[0], at, kind) : load_any(a[0], at, kind)) : 0.f;
        }
        for (int j = 1; j < count; j++) {
            float v[ILP];
#pragma unroll
            for (int k = 0; k < ILP; k++) v[k] = i + k * stride < n ? load_any(a[j], i + k * stride, kind) : 0.f;
#pragma unroll
            for (int k = 0; k < ILP; k++) s[k] += v[k];
        }
#pragma unroll
        for (int k = 0; k < ILP; k++)
            if (i + k * stride < n) put_any(y, i + k * stride, s[k], kind, 0);
    }
}

// For each of `rows` rows of `len` values: dst[r * dst_stride + dst_off + j] (=|+=) src[r * src_stride + src_off + j].
extern "C" __global__ void strided_copy(const float* src, float* dst, i64 rows, i64 len, i64 src_stride,
                                        i64 src_off, i64 dst_stride, i64 dst_off, int acc) {
    GRID_LOOP(i, rows * len) {
        i64 r = i / len, j = i % len;
        store(&dst[r * dst_stride + dst_off + j], src[r * src_stride + src_off + j], acc);
    }
}

// dst (=|+=) src, both of one kind, ILP values a thread in flight.
extern "C" __global__ void copy_or_add(const void* src, void* dst, i64 n, int acc, int kind) {
    i64 i0 = (i64)blockIdx.x * blockDim.x + threadIdx.x, stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = i0; i < n; i += ILP * stride) {
        float v[ILP];
#pragma unroll
        for (int k = 0; k < ILP; k++) v[k] = i + k * stride < n ? load_any(src, i + k * stride, kind) : 0.f;
#pragma unroll
        for (int k = 0; k < ILP; k++)
            if (i + k * stride < n) put_any(dst, i + k * stride, v[k], kind, acc);
    }
}

extern "C" __global__ void fill(float* dst, i64 n, float v) {
    GRID_LOOP(i, n) dst[i] = v;
}

// y[n, k, hw] += b[k]
extern "C" __global__ void bias_add(float* y, const float* b, i64 total, i64 k, i64 hw) {
    GRID_LOOP(i, total) y[i] += b[(i / hw) % k];
}

// One block per channel: db[ch] (=|+=) sum over n and hw of dy[n, ch, hw], in f64.
extern "C" __global__ void channel_sum(const float* dy, float* db, i64 n, i64 k, i64 hw, int acc) {
    extern __shared__ double sh[];
    i64 ch = blockIdx.x;
    double s = 0.0;
    for (i64 t = threadIdx.x; t < n * hw; t += blockDim.x) s += (double)dy[((t / hw) * k + ch) * hw + t % hw];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) store(&db[ch], (float)s, acc);
}

// One thread per column: db[j] (=|+=) sum over m rows of dy[m, n], in f64.
extern "C" __global__ void column_sum(const float* dy, float* db, i64 m, i64 n, int acc) {
    GRID_LOOP(j, n) {
        double s = 0.0;
        for (i64 r = 0; r < m; r++) s += (double)dy[r * n + j];
        store(&db[j], (float)s, acc);
    }
}
"#
    ),
};

impl RunOp<ops::Add> for CudaBackend {
    fn run_op(&mut self, o: &ops::Add) -> Result<()> {
        let ops::Add { len, y, .. } = *o;
        let inputs = &o.inputs;
        let kind = self.same_kind("add", y, inputs)?;
        for (i, chunk) in inputs.chunks(ADD_FAN_IN).enumerate() {
            let a = |k: usize| chunk.get(k).map(|b| self.ptr(*b)).unwrap_or(0);
            let args = add_n {
                y: self.ptr(y),
                n: len,
                count: chunk.len() as i32,
                acc: (i > 0) as i32,
                a0: a(0),
                a1: a(1),
                a2: a(2),
                a3: a(3),
                a4: a(4),
                a5: a(5),
                a6: a(6),
                a7: a(7),
                kind,
            };
            self.launch_elems(len, &args)?;
        }
        Ok(())
    }
}

impl CudaBackend {
    /// The kernels' number of the dtype `y` and every buffer of `others` share (f32, bf16 or
    /// f16); an error naming `op` where they differ.
    fn same_kind(&self, op: &str, y: BufId, others: &[BufId]) -> Result<i32> {
        let kind = self.kind_of(y, op)?;
        match others.iter().find(|&&b| self.dtype_of(b) != self.dtype_of(y)) {
            None => Ok(kind),
            Some(&b) => Err(Error::State(format!(
                "{op}: buffer {} holds {} and buffer {} holds {}: its operands must share one dtype",
                y.0,
                self.dtype_of(y),
                b.0,
                self.dtype_of(b)
            ))),
        }
    }

    /// Copies `rows` rows of `len` values between row-strided layouts (concat and its gradient);
    /// `src` and `dst` are (buffer, row stride, offset).
    pub(super) fn strided_copy(
        &mut self,
        (src, src_stride, src_off): (BufId, usize, usize),
        (dst, dst_stride, dst_off): (GradOut, usize, usize),
        rows: usize,
        len: usize,
    ) -> Result<()> {
        let args = strided_copy {
            src: self.ptr(src),
            dst: self.ptr(dst.buf),
            rows,
            len,
            src_stride,
            src_off,
            dst_stride,
            dst_off,
            acc: dst.accumulate as i32,
        };
        self.launch_elems(rows * len, &args)
    }
}

impl RunOp<ops::Concat> for CudaBackend {
    fn run_op(&mut self, o: &ops::Concat) -> Result<()> {
        let ops::Concat { n, inner, ref parts, y } = *o;
        let total: usize = parts.iter().map(|p| p.1).sum();
        let mut off = 0;
        for &(b, ch) in parts {
            let len = ch * inner;
            self.strided_copy(
                (b, len, 0),
                (GradOut { buf: y, accumulate: false }, total * inner, off * inner),
                n,
                len,
            )?;
            off += ch;
        }
        Ok(())
    }
}

impl RunOp<ops::ConcatBackward> for CudaBackend {
    fn run_op(&mut self, o: &ops::ConcatBackward) -> Result<()> {
        let ops::ConcatBackward { n, inner, ref parts, dy } = *o;
        let total: usize = parts.iter().map(|p| p.1).sum();
        let mut off = 0;
        for &(g, ch) in parts {
            let len = ch * inner;
            if let Some(g) = g {
                self.strided_copy((dy, total * inner, off * inner), (g, len, 0), n, len)?;
            }
            off += ch;
        }
        Ok(())
    }
}

impl RunOp<ops::GradInto> for CudaBackend {
    fn run_op(&mut self, o: &ops::GradInto) -> Result<()> {
        let ops::GradInto { len, src, dst, .. } = *o;
        let kind = self.same_kind("grad_into", dst.buf, &[src])?;
        let args = copy_or_add { src: self.ptr(src), dst: self.ptr(dst.buf), n: len, acc: dst.accumulate as i32, kind };
        self.launch_elems(len, &args)
    }
}

impl RunOp<ops::Fill> for CudaBackend {
    fn run_op(&mut self, o: &ops::Fill) -> Result<()> {
        let ops::Fill { len, buf, value, .. } = *o;
        let args = fill { dst: self.ptr(buf), n: len, v: value };
        self.launch_elems(len, &args)
    }
}

impl CudaBackend {
    /// `y[n, k, hw] += b[k]` (convolution bias).
    pub(super) fn bias_add(&mut self, y: BufId, b: BufId, n: usize, k: usize, hw: usize) -> Result<()> {
        let args = bias_add { y: self.ptr(y), b: self.ptr(b), total: n * k * hw, k, hw };
        self.launch_elems(n * k * hw, &args)
    }

    /// `db[k] (+)= sum over n, hw of dy[n, k, hw]` (convolution bias gradient).
    pub(super) fn channel_sum(&mut self, dy: BufId, db: GradOut, n: usize, k: usize, hw: usize) -> Result<()> {
        let args = channel_sum { dy: self.ptr(dy), db: self.ptr(db.buf), n, k, hw, acc: db.accumulate as i32 };
        self.launch_blocks(k as u32, SUM_THREADS, SUM_THREADS * 8, &args)
    }

    /// `db[j] (+)= sum over rows of dy[m, n]` (dense bias gradient, where the epilogue can't).
    pub(super) fn column_sum(&mut self, dy: BufId, db: GradOut, m: usize, n: usize) -> Result<()> {
        let args = column_sum { dy: self.ptr(dy), db: self.ptr(db.buf), m, n, acc: db.accumulate as i32 };
        self.launch_elems(n, &args)
    }
}
