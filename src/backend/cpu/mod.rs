//! The CPU backend: every op in pure Rust, multi-threaded with rayon, matrix products by the
//! `gemm` crate. Generic over the element type: `CpuBackend<f32>` trains, `CpuBackend<f64>` is
//! the reference that gradient checks and the GPU backend are compared against.
//!
//! Results are bit-identical run to run for a given thread count: work is split into fixed
//! ranges and partial sums are combined in a fixed order.
//!
//! `KILN_DEBUG=1` prints every op with its time; `KILN_NUM_THREADS` sets the default thread
//! count.
//!
//! The worker threads of an f32 backend flush subnormal numbers to zero (flush-to-zero and
//! denormals-are-zero, PyTorch's `torch.set_flush_denormal(True)`): values below 1.2e-38 become
//! 0. Without it, an optimizer state that decays into the subnormal range (Adam's second moment
//! of a rarely-used weight) makes every step up to 1.8 times slower, as each subnormal operation
//! takes a slow path in the FPU (`examples/step_time.rs` shows it). The f64 reference backend
//! keeps IEEE subnormals, and `KILN_DENORMALS=keep` keeps them in f32 too.

mod activation;
mod batch_norm;
mod collective;
mod conv2d;
mod conv_transpose2d;
mod dot;
mod dropout;
mod float;
mod group_norm;
mod join;
mod linear;
mod loss;
mod matmul;
mod optimizer;
mod pool2d;
mod softmax;

pub use float::Float;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use super::ops::{self, BufId, CounterId, GradOut, Op, OptRule};
use super::{Backend, DType, HostSlice, HostVec};
use crate::backend::Communicator;
use crate::{Error, Result};

/// Element-wise kernels work on chunks of this many values (a multiple of 4, for dropout).
pub(crate) const CHUNK: usize = 1 << 14;

/// A gradient output as a kernel sees it: the values, and whether to add to them.
pub(crate) type Grad<'a, T> = (&'a mut [T], bool);

/// The gradients a weighted op's backward writes: input (where wanted), weight, bias (where
/// the op has one).
pub(crate) type WeightGrads<'a, T> = (Option<Grad<'a, T>>, Grad<'a, T>, Option<Grad<'a, T>>);

/// Writes `v` into `d`, or adds it when `acc`.
#[inline]
pub(crate) fn store<T: Float>(d: &mut T, v: T, acc: bool) {
    if acc {
        *d += v;
    } else {
        *d = v;
    }
}

/// The CPU backend; `T` is `f32` (training) or `f64` (reference).
pub struct CpuBackend<T: Float = f32> {
    /// The values of the buffers ops compute on (empty for the others).
    bufs: Vec<Vec<T>>,
    /// Each buffer's dtype.
    dtypes: Vec<DType>,
    /// The values of buffers of a dtype ops do not compute on (bf16, f16, integers, and f64
    /// on `CpuBackend<f32>`), held in their own dtype.
    other: Vec<Option<HostVec>>,
    counters: Vec<u64>,
    scratch: Vec<conv2d::Scratch<T>>,
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
    debug: bool,
    /// The data-parallel group, once joined ([`Backend::set_communicator`]).
    comm: Option<Box<dyn Communicator>>,
    /// Keys of `run_cached` op lists validated since the last `free`.
    validated: HashSet<u64>,
}

/// The group's communicator for a collective op, or the error of a backend that joined none.
fn group<'a>(comm: &'a mut Option<Box<dyn Communicator>>, op: &Op) -> Result<&'a mut dyn Communicator> {
    match comm {
        Some(c) => Ok(&mut **c),
        None => Err(Error::State(format!(
            "{} needs a data-parallel group: call Backend::set_communicator first",
            op.name()
        ))),
    }
}

/// `MemAvailable` plus free swap from `/proc/meminfo` (Linux), in bytes.
fn host_available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = info.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
    };
    Some(field("MemAvailable:")? + field("SwapFree:").unwrap_or(0))
}

/// The guard update of [`ops::CheckFinite`] for a step with this loss and gradient norm (the
/// CUDA kernel `check_finite` does the same).
fn check_finite<T: Float>(g: &mut [T], loss: f64, norm: f64, sticky: bool) {
    use ops::guard::*;
    let bad_loss = !loss.is_finite();
    // The norm as the f32 it is reported in: beyond f32's range counts as infinite.
    let bad_norm = !(norm as f32).is_finite();
    let bad = bad_loss || bad_norm;
    let stuck = sticky && g[FIRST_BAD] != T::ZERO;
    if bad && g[FIRST_BAD] == T::ZERO {
        g[FIRST_BAD] = g[CHECKED] + T::ONE;
        g[WHAT] = T::from_usize(bad_loss as usize + 2 * bad_norm as usize);
        g[LOSS] = T::from_f64(loss);
        g[NORM] = T::from_f64(norm);
    }
    if bad {
        g[BAD_STEPS] += T::ONE;
    }
    g[CHECKED] += T::ONE;
    g[SKIP] = if bad || stuck { T::ONE } else { T::ZERO };
}

/// Sets flush-to-zero and denormals-are-zero for the calling thread's floating-point unit (on
/// x86-64 the MXCSR bits FTZ and DAZ; on AArch64 FPCR.FZ); elsewhere it does nothing.
fn flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: reads and writes this thread's SSE control register; FTZ (bit 15) and DAZ (bit 6)
    // change only how subnormal numbers are treated. The intrinsics are deprecated in favour of
    // inline assembly, which would do the same.
    #[allow(deprecated)]
    unsafe {
        use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
        _mm_setcsr(_mm_getcsr() | (1 << 15) | (1 << 6));
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: sets FPCR.FZ (bit 24) of this thread: subnormal inputs and results become zero.
    unsafe {
        let mut fpcr: u64;
        std::arch::asm!("mrs {}, fpcr", out(reg) fpcr);
        fpcr |= 1 << 24;
        std::arch::asm!("msr fpcr, {}", in(reg) fpcr);
    }
}

/// The thread count used when none is given: `KILN_NUM_THREADS`, else all cores.
pub fn default_threads() -> usize {
    std::env::var("KILN_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

impl<T: Float> CpuBackend<T> {
    /// A backend with its own pool of `threads` threads (`None`: [`default_threads`]).
    pub fn new(threads: Option<usize>) -> Result<Self> {
        let threads = threads.unwrap_or_else(default_threads);
        if threads == 0 {
            return Err(Error::config("threads", "must be at least 1"));
        }
        let flush = std::mem::size_of::<T>() == 4 && !std::env::var("KILN_DENORMALS").is_ok_and(|v| v == "keep");
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .start_handler(move |_| {
                if flush {
                    flush_denormals();
                }
            })
            .thread_name(|i| format!("kiln-cpu-{i}"))
            .build()
            .map_err(|e| Error::Device { device: "cpu".into(), reason: format!("cannot start threads: {e}") })?;
        Ok(CpuBackend {
            bufs: Vec::new(),
            dtypes: Vec::new(),
            other: Vec::new(),
            counters: Vec::new(),
            scratch: (0..threads).map(|_| conv2d::Scratch::default()).collect(),
            pool: Arc::new(pool),
            threads,
            debug: std::env::var("KILN_DEBUG").is_ok_and(|v| v == "1"),
            comm: None,
            validated: HashSet::new(),
        })
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Direct access to a buffer's values.
    pub fn buffer(&self, id: BufId) -> &[T] {
        &self.bufs[id.0]
    }

    /// Direct mutable access to a buffer's values.
    pub fn buffer_mut(&mut self, id: BufId) -> &mut [T] {
        &mut self.bufs[id.0]
    }

    /// Total bytes held in buffers.
    pub fn bytes(&self) -> usize {
        let other: usize = self.other.iter().flatten().map(|h| h.len() * h.dtype().size()).sum();
        self.bufs.iter().map(|b| b.len() * std::mem::size_of::<T>()).sum::<usize>() + other
    }

    fn computes_dtype(dtype: DType) -> bool {
        dtype == T::DTYPE || dtype == DType::F32
    }

    fn check_len(&self, buf: BufId, len: usize) -> Result<()> {
        let have = self.len(buf);
        if have != len { Err(Error::shape("buffer write", have, len)) } else { Ok(()) }
    }

    fn take(&mut self, id: BufId) -> Vec<T> {
        std::mem::take(&mut self.bufs[id.0])
    }

    fn put(&mut self, id: BufId, v: Vec<T>) {
        self.bufs[id.0] = v;
    }

    fn take_grad(&mut self, g: GradOut) -> (Vec<T>, bool) {
        (self.take(g.buf), g.accumulate)
    }

    fn exec(&mut self, op: &Op) -> Result<()> {
        let threads = self.threads;
        match op {
            Op::Conv2d(ops::Conv2d { g, x, w, b, y }) => {
                let mut yv = self.take(*y);
                let bufs = &self.bufs;
                conv2d::forward(
                    g,
                    &bufs[x.0],
                    &bufs[w.0],
                    b.map(|b| bufs[b.0].as_slice()),
                    &mut yv,
                    &mut self.scratch,
                    threads,
                );
                self.put(*y, yv);
            }
            Op::Conv2dBackward(ops::Conv2dBackward { g, x, w, dy, dx, dw, db }) => {
                let mut dxv = dx.map(|d| self.take_grad(d));
                let mut dwv = self.take_grad(*dw);
                let mut dbv = db.map(|d| self.take_grad(d));
                let bufs = &self.bufs;
                conv2d::backward(
                    g,
                    &bufs[x.0],
                    &bufs[w.0],
                    &bufs[dy.0],
                    (
                        dxv.as_mut().map(|(v, a)| (v.as_mut_slice(), *a)),
                        (&mut dwv.0, dwv.1),
                        dbv.as_mut().map(|(v, a)| (v.as_mut_slice(), *a)),
                    ),
                    &mut self.scratch,
                    threads,
                );
                if let (Some(d), Some((v, _))) = (dx, dxv) {
                    self.put(d.buf, v);
                }
                self.put(dw.buf, dwv.0);
                if let (Some(d), Some((v, _))) = (db, dbv) {
                    self.put(d.buf, v);
                }
            }
            Op::ConvTranspose2d(ops::ConvTranspose2d { g, x, w, b, y }) => {
                let mut yv = self.take(*y);
                let bufs = &self.bufs;
                let bias = b.map(|b| bufs[b.0].as_slice());
                conv_transpose2d::forward(g, &bufs[x.0], &bufs[w.0], bias, &mut yv, &mut self.scratch, threads);
                self.put(*y, yv);
            }
            Op::ConvTranspose2dBackward(ops::ConvTranspose2dBackward { g, x, w, dy, dx, dw, db }) => {
                let mut dxv = dx.map(|d| self.take_grad(d));
                let mut dwv = self.take_grad(*dw);
                let mut dbv = db.map(|d| self.take_grad(d));
                let bufs = &self.bufs;
                conv_transpose2d::backward(
                    g,
                    &bufs[x.0],
                    &bufs[w.0],
                    &bufs[dy.0],
                    (
                        dxv.as_mut().map(|(v, a)| (v.as_mut_slice(), *a)),
                        (&mut dwv.0, dwv.1),
                        dbv.as_mut().map(|(v, a)| (v.as_mut_slice(), *a)),
                    ),
                    &mut self.scratch,
                    threads,
                );
                if let (Some(d), Some((v, _))) = (dx, dxv) {
                    self.put(d.buf, v);
                }
                self.put(dw.buf, dwv.0);
                if let (Some(d), Some((v, _))) = (db, dbv) {
                    self.put(d.buf, v);
                }
            }
            Op::Linear(ops::Linear { m, k, n, x, w, b, y }) => {
                let mut yv = self.take(*y);
                let bufs = &self.bufs;
                linear::forward(
                    (*m, *k, *n),
                    &bufs[x.0],
                    &bufs[w.0],
                    b.map(|b| bufs[b.0].as_slice()),
                    &mut yv,
                    threads,
                );
                self.put(*y, yv);
            }
            Op::LinearBackward(ops::LinearBackward { m, k, n, x, w, dy, dx, dw, db }) => {
                let mut dxv = dx.map(|d| self.take_grad(d));
                let mut dwv = self.take_grad(*dw);
                let mut dbv = db.map(|d| self.take_grad(d));
                let bufs = &self.bufs;
                linear::backward(
                    (*m, *k, *n),
                    &bufs[x.0],
                    &bufs[w.0],
                    &bufs[dy.0],
                    (
                        dxv.as_mut().map(|(v, a)| (v.as_mut_slice(), *a)),
                        (&mut dwv.0, dwv.1),
                        dbv.as_mut().map(|(v, a)| (v.as_mut_slice(), *a)),
                    ),
                    threads,
                );
                if let (Some(d), Some((v, _))) = (dx, dxv) {
                    self.put(d.buf, v);
                }
                self.put(dw.buf, dwv.0);
                if let (Some(d), Some((v, _))) = (db, dbv) {
                    self.put(d.buf, v);
                }
            }
            Op::Act(ops::Act { f, len, x, y }) => {
                let mut yv = self.take(*y);
                activation::forward(*f, &self.bufs[x.0][..*len], &mut yv[..*len]);
                self.put(*y, yv);
            }
            Op::ActBackward(ops::ActBackward { f, len, x, y, dy, dx }) => {
                let (mut dxv, acc) = self.take_grad(*dx);
                let b = &self.bufs;
                activation::backward(*f, &b[x.0][..*len], &b[y.0][..*len], &b[dy.0][..*len], (&mut dxv[..*len], acc));
                self.put(dx.buf, dxv);
            }
            Op::Softmax(ops::Softmax { dim, inner, x, y, .. }) => {
                let mut yv = self.take(*y);
                softmax::forward(*dim, *inner, &self.bufs[x.0], &mut yv);
                self.put(*y, yv);
            }
            Op::SoftmaxBackward(ops::SoftmaxBackward { dim, inner, y, dy, dx, .. }) => {
                let (mut dxv, acc) = self.take_grad(*dx);
                softmax::backward(*dim, *inner, &self.bufs[y.0], &self.bufs[dy.0], (&mut dxv, acc));
                self.put(dx.buf, dxv);
            }
            Op::Dropout(ops::Dropout { rate, len, seed, counter, x, y, mask }) => {
                let step = self.counters[counter.0];
                self.counters[counter.0] += 1;
                let mut yv = self.take(*y);
                let mut mv = self.take(*mask);
                dropout::forward(*rate, *seed, step, &self.bufs[x.0][..*len], &mut yv[..*len], &mut mv[..*len]);
                self.put(*y, yv);
                self.put(*mask, mv);
            }
            Op::DropoutBackward(ops::DropoutBackward { len, mask, dy, dx }) => {
                let (mut dxv, acc) = self.take_grad(*dx);
                dropout::backward(&self.bufs[mask.0][..*len], &self.bufs[dy.0][..*len], (&mut dxv[..*len], acc));
                self.put(dx.buf, dxv);
            }
            Op::BatchNormTrain(ops::BatchNormTrain { g, x, gamma, beta, y, mean, invstd, running, sync }) => {
                let comm = match sync {
                    true => Some(group(&mut self.comm, op)?),
                    false => None,
                };
                let mut yv = std::mem::take(&mut self.bufs[y.0]);
                let mut mv = std::mem::take(&mut self.bufs[mean.0]);
                let mut iv = std::mem::take(&mut self.bufs[invstd.0]);
                let mut rv = running
                    .map(|(m, v, mom)| (std::mem::take(&mut self.bufs[m.0]), std::mem::take(&mut self.bufs[v.0]), mom));
                let b = &self.bufs;
                let r = batch_norm::forward_train(
                    g,
                    &b[x.0],
                    (gamma.map(|i| b[i.0].as_slice()), beta.map(|i| b[i.0].as_slice())),
                    &mut yv,
                    (&mut mv, &mut iv),
                    rv.as_mut().map(|(m, v, mom)| (m.as_mut_slice(), v.as_mut_slice(), *mom)),
                    comm,
                );
                self.put(*y, yv);
                self.put(*mean, mv);
                self.put(*invstd, iv);
                if let (Some((mi, vi, _)), Some((m, v, _))) = (running, rv) {
                    self.put(*mi, m);
                    self.put(*vi, v);
                }
                r?;
            }
            Op::BatchNormInfer(ops::BatchNormInfer { g, x, gamma, beta, running_mean, running_var, y }) => {
                let mut yv = self.take(*y);
                let b = &self.bufs;
                batch_norm::forward_infer(
                    g,
                    &b[x.0],
                    gamma.map(|i| b[i.0].as_slice()),
                    beta.map(|i| b[i.0].as_slice()),
                    &b[running_mean.0],
                    &b[running_var.0],
                    &mut yv,
                );
                self.put(*y, yv);
            }
            Op::BatchNormBackward(ops::BatchNormBackward {
                g,
                x,
                gamma,
                mean,
                invstd,
                dy,
                dx,
                dgamma,
                dbeta,
                sync,
            }) => {
                let comm = match sync {
                    true => Some(group(&mut self.comm, op)?),
                    false => None,
                };
                let mut take = |d: &GradOut| (std::mem::take(&mut self.bufs[d.buf.0]), d.accumulate);
                let mut dxv = dx.as_ref().map(&mut take);
                let mut dgv = dgamma.as_ref().map(&mut take);
                let mut dbv = dbeta.as_ref().map(&mut take);
                let b = &self.bufs;
                let r = batch_norm::backward(
                    g,
                    &b[x.0],
                    gamma.map(|i| b[i.0].as_slice()),
                    (&b[mean.0], &b[invstd.0]),
                    &b[dy.0],
                    [
                        dxv.as_mut().map(|(v, a)| (v.as_mut_slice(), *a)),
                        dgv.as_mut().map(|(v, a)| (v.as_mut_slice(), *a)),
                        dbv.as_mut().map(|(v, a)| (v.as_mut_slice(), *a)),
                    ],
                    comm,
                );
                for (d, v) in [(dx, dxv), (dgamma, dgv), (dbeta, dbv)] {
                    if let (Some(d), Some((v, _))) = (d, v) {
                        self.put(d.buf, v);
                    }
                }
                r?;
            }
            Op::GroupNorm(ops::GroupNorm { g, x, gamma, beta, y, mean, invstd }) => {
                let (mut yv, mut mv, mut iv) = (self.take(*y), self.take(*mean), self.take(*invstd));
                let b = &self.bufs;
                let affine = (gamma.map(|i| b[i.0].as_slice()), beta.map(|i| b[i.0].as_slice()));
                group_norm::forward(g, &b[x.0], affine, &mut yv, (&mut mv, &mut iv));
                self.put(*y, yv);
                self.put(*mean, mv);
                self.put(*invstd, iv);
            }
            Op::GroupNormBackward(ops::GroupNormBackward { g, x, gamma, mean, invstd, dy, dx, dgamma, dbeta }) => {
                let mut take = |d: &GradOut| (std::mem::take(&mut self.bufs[d.buf.0]), d.accumulate);
                let mut dxv = dx.as_ref().map(&mut take);
                let mut dgv = dgamma.as_ref().map(&mut take);
                let mut dbv = dbeta.as_ref().map(&mut take);
                let b = &self.bufs;
                group_norm::backward(
                    g,
                    &b[x.0],
                    gamma.map(|i| b[i.0].as_slice()),
                    (&b[mean.0], &b[invstd.0]),
                    &b[dy.0],
                    [
                        dxv.as_mut().map(|(v, a)| (v.as_mut_slice(), *a)),
                        dgv.as_mut().map(|(v, a)| (v.as_mut_slice(), *a)),
                        dbv.as_mut().map(|(v, a)| (v.as_mut_slice(), *a)),
                    ],
                );
                for (d, v) in [(dx, dxv), (dgamma, dgv), (dbeta, dbv)] {
                    if let (Some(d), Some((v, _))) = (d, v) {
                        self.put(d.buf, v);
                    }
                }
            }
            Op::MaxPool(ops::MaxPool { g, x, y, argmax }) => {
                let mut yv = self.take(*y);
                let mut av = self.take(*argmax);
                pool2d::max_forward(g, &self.bufs[x.0], &mut yv, &mut av);
                self.put(*y, yv);
                self.put(*argmax, av);
            }
            Op::MaxPoolBackward(ops::MaxPoolBackward { g, argmax, dy, dx }) => {
                let (mut dxv, acc) = self.take_grad(*dx);
                pool2d::max_backward(g, &self.bufs[argmax.0], &self.bufs[dy.0], (&mut dxv, acc));
                self.put(dx.buf, dxv);
            }
            Op::AvgPool(ops::AvgPool { g, count_include_pad, x, y }) => {
                let mut yv = self.take(*y);
                pool2d::avg_forward(g, *count_include_pad, &self.bufs[x.0], &mut yv);
                self.put(*y, yv);
            }
            Op::AvgPoolBackward(ops::AvgPoolBackward { g, count_include_pad, dy, dx }) => {
                let (mut dxv, acc) = self.take_grad(*dx);
                pool2d::avg_backward(g, *count_include_pad, &self.bufs[dy.0], (&mut dxv, acc));
                self.put(dx.buf, dxv);
            }
            Op::Add(ops::Add { len, inputs, y }) => {
                let mut yv = self.take(*y);
                let ins: Vec<&[T]> = inputs.iter().map(|i| &self.bufs[i.0][..*len]).collect();
                join::add(&ins, &mut yv[..*len]);
                self.put(*y, yv);
            }
            Op::Concat(ops::Concat { n, inner, parts, y }) => {
                let mut yv = self.take(*y);
                let ps: Vec<(&[T], usize)> = parts.iter().map(|(b, c)| (self.bufs[b.0].as_slice(), *c)).collect();
                join::concat(*n, *inner, &ps, &mut yv);
                self.put(*y, yv);
            }
            Op::ConcatBackward(ops::ConcatBackward { n, inner, parts, dy }) => {
                let total: usize = parts.iter().map(|p| p.1).sum();
                let mut offset = 0;
                for (g, ch) in parts {
                    if let Some(g) = g {
                        let (mut dxv, acc) = self.take_grad(*g);
                        join::concat_backward(*n, *inner, total, &self.bufs[dy.0], offset, *ch, (&mut dxv, acc));
                        self.put(g.buf, dxv);
                    }
                    offset += ch;
                }
            }
            Op::GradInto(ops::GradInto { len, src, dst }) => {
                let (mut dv, acc) = self.take_grad(*dst);
                join::grad_into(&self.bufs[src.0][..*len], (&mut dv[..*len], acc));
                self.put(dst.buf, dv);
            }
            Op::Fill(ops::Fill { len, buf, value }) => {
                self.bufs[buf.0][..*len].fill(T::from_f32(*value));
            }
            Op::Loss(o @ ops::Loss { pred, target, stats, dpred, .. }) => {
                let mut sv = self.take(*stats);
                let mut dv = dpred.map(|d| self.take(d));
                let b = &self.bufs;
                loss::loss(o, &b[pred.0], &b[target.0], &mut sv, dv.as_deref_mut());
                self.put(*stats, sv);
                if let (Some(d), Some(v)) = (dpred, dv) {
                    self.put(*d, v);
                }
            }
            Op::ClipGradNorm(ops::ClipGradNorm { grads, max_norm, norm }) => {
                let views: Vec<&[T]> = grads.iter().map(|(g, len)| &self.bufs[g.0][..*len]).collect();
                let total = optimizer::global_norm(&views);
                let coef = T::from_f64(optimizer::clip_coef(total, *max_norm));
                self.bufs[norm.0][0] = T::from_f64(total);
                for (g, len) in grads {
                    self.bufs[g.0][..*len].iter_mut().for_each(|v| *v *= coef);
                }
            }
            Op::ClipGradValue(ops::ClipGradValue { grads, clip }) => {
                let (lo, hi) = (T::from_f32(-clip), T::from_f32(*clip));
                for (g, len) in grads {
                    for v in &mut self.bufs[g.0][..*len] {
                        if *v < lo {
                            *v = lo;
                        } else if *v > hi {
                            *v = hi;
                        }
                    }
                }
            }
            Op::AllReduce(ops::AllReduce { bufs, mean }) => {
                collective::all_reduce(group(&mut self.comm, op)?, &mut self.bufs, bufs, *mean)?;
            }
            Op::CheckFinite(ops::CheckFinite { stats, grads, guard, sticky }) => {
                let views: Vec<&[T]> = grads.iter().map(|(g, len)| &self.bufs[g.0][..*len]).collect();
                let norm = optimizer::global_norm(&views);
                let loss = self.bufs[stats.0][ops::stats::LOSS].to_f64();
                check_finite(&mut self.bufs[guard.0], loss, norm, *sticky);
            }
            Op::OptimizerStep(ops::OptimizerStep { guard: Some(g), .. })
                if self.bufs[g.0][ops::guard::SKIP] != T::ZERO => {}
            Op::OptimizerStep(ops::OptimizerStep { rule, hyper, step, scalars, params, .. }) => {
                let t = self.counters[step.0] + 1;
                self.counters[step.0] = t;
                let h = &self.bufs[hyper.0];
                let (lr, mom) = (h[ops::hyper::LR].to_f64(), h[ops::hyper::MOMENTUM].to_f64());
                let mut mu_product = 1.0;
                if let OptRule::NAdam { momentum_decay, .. } = rule {
                    // Stored and used at the buffer's precision, as PyTorch keeps it in a
                    // float32 tensor (and as the GPU kernel does).
                    let prev = self.bufs[scalars.0][0].to_f64();
                    let stored = T::from_f64(prev * optimizer::nadam_mu(mom, *momentum_decay as f64, t));
                    self.bufs[scalars.0][0] = stored;
                    mu_product = stored.to_f64();
                }
                for p in params {
                    let mut w = self.take(p.value);
                    let mut st: Vec<Vec<T>> = p.state.iter().map(|s| self.take(*s)).collect();
                    optimizer::update(
                        *rule,
                        t,
                        (lr, mom, mu_product),
                        &mut w[..p.len],
                        &self.bufs[p.grad.0][..p.len],
                        &mut st,
                    );
                    self.put(p.value, w);
                    for (s, v) in p.state.iter().zip(st) {
                        self.put(*s, v);
                    }
                }
            }
        }
        Ok(())
    }
}

impl<T: Float> Backend for CpuBackend<T> {
    fn describe(&self) -> String {
        format!("cpu ({} threads, {})", self.threads, std::any::type_name::<T>())
    }

    fn alloc(&mut self, len: usize, dtype: DType) -> Result<BufId> {
        // A failed allocation must be an error, not an abort: the caller (a plan for a batch
        // size too large for this machine) can try a smaller one.
        let computes = Self::computes_dtype(dtype);
        let size = if computes { std::mem::size_of::<T>() } else { dtype.size() };
        let bytes = (len as u64).saturating_mul(size as u64);
        let oom = || Error::OutOfMemory { model: String::new(), batch: 0, needed: bytes, free: 0 };
        let mut v = Vec::new();
        if computes {
            v.try_reserve_exact(len).map_err(|_| oom())?;
            v.resize(len, T::ZERO);
            self.other.push(None);
        } else {
            Vec::<u8>::new().try_reserve_exact(bytes as usize).map_err(|_| oom())?;
            self.other.push(Some(HostVec::zeros(dtype, len)));
        }
        self.bufs.push(v);
        self.dtypes.push(dtype);
        Ok(BufId(self.bufs.len() - 1))
    }

    fn len(&self, buf: BufId) -> usize {
        match &self.other[buf.0] {
            Some(h) => h.len(),
            None => self.bufs[buf.0].len(),
        }
    }

    fn dtype(&self, buf: BufId) -> DType {
        self.dtypes[buf.0]
    }

    fn computes(&self, dtype: DType) -> bool {
        Self::computes_dtype(dtype)
    }

    fn free(&mut self, buf: BufId) -> Result<()> {
        self.bufs[buf.0] = Vec::new();
        self.other[buf.0] = None;
        self.validated.clear();
        Ok(())
    }

    fn write_host(&mut self, buf: BufId, data: HostSlice<'_>) -> Result<()> {
        self.check_len(buf, data.len())?;
        if let Some(h) = &mut self.other[buf.0] {
            *h = data.convert(h.dtype())?;
            return Ok(());
        }
        let b = &mut self.bufs[buf.0];
        match data {
            HostSlice::F32(v) => b.iter_mut().zip(v).for_each(|(d, &s)| *d = T::from_f32(s)),
            HostSlice::F64(v) => b.iter_mut().zip(v).for_each(|(d, &s)| *d = T::from_f64(s)),
            other => {
                let v = other.convert(DType::F64)?.into_f64()?;
                b.iter_mut().zip(v).for_each(|(d, s)| *d = T::from_f64(s));
            }
        }
        Ok(())
    }

    fn read_host(&mut self, buf: BufId, dtype: DType) -> Result<HostVec> {
        if let Some(h) = &self.other[buf.0] {
            return h.as_slice().convert(dtype);
        }
        let b = &self.bufs[buf.0];
        match dtype {
            DType::F32 => Ok(HostVec::F32(b.iter().map(|v| v.to_f32()).collect())),
            DType::F64 => Ok(HostVec::F64(b.iter().map(|v| v.to_f64()).collect())),
            _ => HostSlice::F64(&b.iter().map(|v| v.to_f64()).collect::<Vec<_>>()).convert(dtype),
        }
    }

    fn available_memory(&self) -> Option<u64> {
        host_available_memory()
    }

    fn new_counter(&mut self) -> Result<CounterId> {
        self.counters.push(0);
        Ok(CounterId(self.counters.len() - 1))
    }

    fn counter(&mut self, id: CounterId) -> Result<u64> {
        Ok(self.counters[id.0])
    }

    fn set_counter(&mut self, id: CounterId, value: u64) -> Result<()> {
        self.counters[id.0] = value;
        Ok(())
    }

    fn set_communicator(&mut self, comm: Box<dyn Communicator>) -> Result<()> {
        self.comm = Some(comm);
        Ok(())
    }

    fn communicator(&mut self) -> Option<&mut dyn Communicator> {
        self.comm.as_deref_mut().map(|c| c as &mut dyn Communicator)
    }

    fn run(&mut self, ops: &[Op]) -> Result<()> {
        self.run_ops(ops, true)
    }

    fn run_cached(&mut self, key: u64, ops: &[Op]) -> Result<()> {
        // The key promises the same op list, so it is validated on its first run only (and
        // again after a buffer is freed).
        let check = self.validated.insert(key);
        let ran = self.run_ops(ops, check);
        if ran.is_err() {
            self.validated.remove(&key);
        }
        ran
    }
}

impl<T: Float> CpuBackend<T> {
    /// Executes `ops` in order on the pool, each checked first ([`Op::validate`]) when `check`.
    fn run_ops(&mut self, ops: &[Op], check: bool) -> Result<()> {
        let pool = self.pool.clone();
        pool.install(|| {
            for op in ops {
                if check {
                    let info = |b: BufId| (b.0 < self.bufs.len()).then(|| (self.len(b), self.dtypes[b.0]));
                    op.validate(info, Self::computes_dtype)?;
                }
                if self.debug {
                    let t = Instant::now();
                    self.exec(op)?;
                    eprintln!(
                        "[kiln cpu] {:<22} {:<48} {:>9.3} ms",
                        op.name(),
                        op.shapes(),
                        t.elapsed().as_secs_f64() * 1e3
                    );
                } else {
                    self.exec(op)?;
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod denormal_tests {
    use super::*;

    /// Whether `1e-39 * 1` (a subnormal times one) gives zero on the backend's threads.
    fn flushes<T: Float>(b: &CpuBackend<T>) -> bool {
        b.pool.install(|| std::hint::black_box(std::hint::black_box(1e-39f32) * std::hint::black_box(1.0f32)) == 0.0)
    }

    #[test]
    fn f32_workers_flush_subnormals_and_the_f64_reference_does_not() {
        if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
            assert!(flushes(&CpuBackend::<f32>::new(Some(2)).unwrap()));
        }
        assert!(!flushes(&CpuBackend::<f64>::new(Some(2)).unwrap()));
        // The calling thread is not changed.
        assert_ne!(std::hint::black_box(1e-39f32) * std::hint::black_box(1.0f32), 0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ops::{self, GradOut};

    /// Every dtype can be allocated and copied; f32 buffers of the f64 reference keep f64
    /// values whole; integer buffers take only their own type; ops refuse dtypes they do not
    /// compute with, and a too-short buffer, with an error instead of a panic.
    #[test]
    fn typed_buffers_and_validation() {
        let mut r = CpuBackend::<f64>::new(Some(1)).unwrap();
        let a = r.alloc(2, DType::F32).unwrap();
        r.write_f64(a, &[0.1, 1e300]).unwrap();
        assert_eq!(r.read_f64(a).unwrap(), [0.1, 1e300]);
        assert_eq!(r.read(a).unwrap(), [0.1f32, f32::INFINITY]);
        let mut b = CpuBackend::<f32>::new(Some(1)).unwrap();
        let d = b.alloc(1, DType::F64).unwrap();
        b.write_f64(d, &[0.1]).unwrap();
        assert_eq!(b.read_f64(d).unwrap(), [0.1], "an f64 buffer of the f32 backend keeps f64 values");
        let u = b.alloc(2, DType::U32).unwrap();
        b.write_host(u, HostSlice::U32(&[3, 4])).unwrap();
        assert_eq!(b.read_host(u, DType::U32).unwrap(), HostVec::U32(vec![3, 4]));
        assert!(b.write(u, &[1.0, 2.0]).is_err());
        assert!(b.write_host(u, HostSlice::U32(&[1])).is_err(), "a short write");
        let h = b.alloc(2, DType::BF16).unwrap();
        b.write(h, &[1.0, 1.0 + 1.0 / 512.0]).unwrap();
        assert_eq!(b.read(h).unwrap(), [1.0, 1.0], "bf16 keeps 8 bits of mantissa");
        let f = b.alloc(2, DType::F32).unwrap();
        let copy = |src: BufId, len: usize| {
            Op::GradInto(ops::GradInto { len, src, dst: GradOut { buf: f, accumulate: false } })
        };
        assert!(b.run(&[copy(h, 2)]).is_err(), "an op read a bf16 buffer");
        assert!(b.run(&[copy(f, 3)]).is_err(), "an op read past a buffer");
        b.write(f, &[1.0, 2.0]).unwrap();
        let g = b.alloc(2, DType::F32).unwrap();
        b.run(&[Op::GradInto(ops::GradInto { len: 2, src: f, dst: GradOut { buf: g, accumulate: false } })]).unwrap();
        assert_eq!(b.read(g).unwrap(), [1.0, 2.0]);
    }
}
