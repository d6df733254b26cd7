//! Joins and copies on the GPU: addition of several tensors (residual joins), channel
//! concatenation and its gradient (Inception), gradient copies, fills; plus the two reductions
//! that the library-backed layers need beside cuDNN and cuBLASLt (bias add and per-channel sum
//! for convolutions, per-column sum for dense layers). As `backend/cpu/join.rs`.

use super::CudaBackend;
use super::driver::Args;
use super::nvrtc::ModuleSrc;
use crate::Result;
use crate::backend::ops;
use crate::backend::ops::{BufId, GradOut};

/// Inputs one `add` launch takes; longer sums chain launches that accumulate.
const ADD_FAN_IN: usize = 8;

/// Threads per block of the per-channel reduction.
const SUM_THREADS: u32 = 256;

pub(super) const MODULE: ModuleSrc = ModuleSrc {
    name: "join",
    kernels: &["add_n", "strided_copy", "copy_or_add", "fill", "bias_add", "channel_sum", "column_sum"],
    source: r#"
// y = a0 + a1 + ... (count inputs, added left to right), or y += a0 + ... when acc.
extern "C" __global__ void add_n(float* y, i64 n, int count, int acc, const float* a0, const float* a1,
                                 const float* a2, const float* a3, const float* a4, const float* a5,
                                 const float* a6, const float* a7) {
    const float* a[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
    GRID_LOOP(i, n) {
        float s = acc ? y[i] + a[0][i] : a[0][i];
        for (int j = 1; j < count; j++) s += a[j][i];
        y[i] = s;
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

extern "C" __global__ void copy_or_add(const float* src, float* dst, i64 n, int acc) {
    GRID_LOOP(i, n) store(&dst[i], src[i], acc);
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
"#,
};

impl CudaBackend {
    pub(super) fn add(&mut self, o: &ops::Add) -> Result<()> {
        let ops::Add { len, y, .. } = *o;
        let inputs = &o.inputs;
        for (i, chunk) in inputs.chunks(ADD_FAN_IN).enumerate() {
            let mut args = Args::new().ptr(self.ptr(y)).i64(len).i32(chunk.len() as i32).i32((i > 0) as i32);
            for k in 0..ADD_FAN_IN {
                args = args.ptr(chunk.get(k).map(|b| self.ptr(*b)).unwrap_or(0));
            }
            self.launch_elems("add_n", len, &args)?;
        }
        Ok(())
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
        let args = Args::new()
            .ptr(self.ptr(src))
            .ptr(self.ptr(dst.buf))
            .i64(rows)
            .i64(len)
            .i64(src_stride)
            .i64(src_off)
            .i64(dst_stride)
            .i64(dst_off)
            .i32(dst.accumulate as i32);
        self.launch_elems("strided_copy", rows * len, &args)
    }

    pub(super) fn concat(&mut self, o: &ops::Concat) -> Result<()> {
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

    pub(super) fn concat_backward(&mut self, o: &ops::ConcatBackward) -> Result<()> {
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

    pub(super) fn grad_into(&mut self, o: &ops::GradInto) -> Result<()> {
        let ops::GradInto { len, src, dst, .. } = *o;
        let args = Args::new().ptr(self.ptr(src)).ptr(self.ptr(dst.buf)).i64(len).i32(dst.accumulate as i32);
        self.launch_elems("copy_or_add", len, &args)
    }

    pub(super) fn fill(&mut self, o: &ops::Fill) -> Result<()> {
        let ops::Fill { len, buf, value, .. } = *o;
        let args = Args::new().ptr(self.ptr(buf)).i64(len).f32(value);
        self.launch_elems("fill", len, &args)
    }

    /// `y[n, k, hw] += b[k]` (convolution bias).
    pub(super) fn bias_add(&mut self, y: BufId, b: BufId, n: usize, k: usize, hw: usize) -> Result<()> {
        let args = Args::new().ptr(self.ptr(y)).ptr(self.ptr(b)).i64(n * k * hw).i64(k).i64(hw);
        self.launch_elems("bias_add", n * k * hw, &args)
    }

    /// `db[k] (+)= sum over n, hw of dy[n, k, hw]` (convolution bias gradient).
    pub(super) fn channel_sum(&mut self, dy: BufId, db: GradOut, n: usize, k: usize, hw: usize) -> Result<()> {
        let args = Args::new().ptr(self.ptr(dy)).ptr(self.ptr(db.buf)).i64(n).i64(k).i64(hw).i32(db.accumulate as i32);
        self.launch_blocks("channel_sum", k as u32, SUM_THREADS, SUM_THREADS * 8, &args)
    }

    /// `db[j] (+)= sum over rows of dy[m, n]` (dense bias gradient, where the epilogue can't).
    pub(super) fn column_sum(&mut self, dy: BufId, db: GradOut, m: usize, n: usize) -> Result<()> {
        let args = Args::new().ptr(self.ptr(dy)).ptr(self.ptr(db.buf)).i64(m).i64(n).i32(db.accumulate as i32);
        self.launch_elems("column_sum", n, &args)
    }
}
