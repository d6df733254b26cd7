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
mod cast;
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
mod loss_scale;
mod matmul;
mod optimizer;
mod pool2d;
mod softmax;

pub use float::Float;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use super::ops::{BufId, CounterId, GradOut, Op};
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
fn group<'a>(comm: &'a mut Option<Box<dyn Communicator>>, op: &str) -> Result<&'a mut dyn Communicator> {
    match comm {
        Some(c) => Ok(&mut **c),
        None => Err(Error::State(format!("{op} needs a data-parallel group: call Backend::set_communicator first"))),
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

    /// Runs `f` with the gradient outputs `grads` taken out of the buffer table (so that `f`
    /// reads the op's inputs through the backend while writing them), then puts them back:
    /// the frame of every backward op. `None`: a gradient not wanted.
    fn with_grads<const N: usize, R>(
        &mut self,
        grads: [Option<GradOut>; N],
        f: impl FnOnce(&mut Self, [Option<Grad<'_, T>>; N]) -> R,
    ) -> R {
        let mut taken = grads.map(|g| g.map(|g| self.take_grad(g)));
        let r = f(self, taken.each_mut().map(|t| t.as_mut().map(|(v, acc)| (v.as_mut_slice(), *acc))));
        for (g, t) in grads.into_iter().zip(taken) {
            if let (Some(g), Some((v, _))) = (g, t) {
                self.put(g.buf, v);
            }
        }
        r
    }

    /// [`with_grads`](Self::with_grads) for a weighted op: input gradient (where wanted),
    /// weight gradient, bias gradient (where the op has one).
    fn with_weight_grads<R>(
        &mut self,
        (dx, dw, db): (Option<GradOut>, GradOut, Option<GradOut>),
        f: impl FnOnce(&mut Self, WeightGrads<'_, T>) -> R,
    ) -> R {
        let (mut w, acc) = self.take_grad(dw);
        let r = self.with_grads([dx, db], |b, [dx, db]| f(b, (dx, (&mut w, acc), db)));
        self.put(dw.buf, w);
        r
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
                    op.run_on(self)?;
                    eprintln!(
                        "[kiln cpu] {:<22} {:<48} {:>9.3} ms",
                        op.name(),
                        op.shapes(),
                        t.elapsed().as_secs_f64() * 1e3
                    );
                } else {
                    op.run_on(self)?;
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
