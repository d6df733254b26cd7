//! 2-D convolutions on the GPU through cuDNN: forward, backward-data and backward-filter with
//! the legacy convolution API (still in cuDNN 9), bias add and bias gradient with kiln's own
//! kernels (`join.rs`).
//!
//! Per convolution geometry the backend keeps the descriptors and, per direction, the algorithm
//! chosen by timing every candidate once (`cudnnFind*AlgorithmEx`, on scratch outputs so an
//! accumulating gradient is never clobbered). Unless TF32 was asked for, the choice keeps f32
//! accuracy: `CUDNN_FMA_MATH` only (`CUDNN_DEFAULT_MATH` lets cuDNN use TF32 tensor cores on
//! Ampere and later, about 1e-3 relative error), and an FFT or Winograd algorithm (which
//! transform the data and lose precision, but are often twice as fast) only after it has been
//! run beside the fastest direct or GEMM-based one on the same data and agreed with it to 2e-5
//! of its largest value (6e-5 for filter gradients; see [`transform_tolerance`]). Deterministic algorithms are preferred, so a replayed graph computes
//! exactly what eager execution does (see [`pick`]). The search happens in the warm-up run; one
//! workspace serves every convolution (work on the one stream is serialised) and grows, never
//! shrinks, in the warm-up only.

use std::collections::HashMap;
use std::ffi::{CStr, c_void};

use cudarc::cudnn::sys;
use cudarc::driver::sys::CUdeviceptr;

use super::CudaBackend;
use crate::backend::ops;
use crate::backend::ops::RunOp;
use crate::backend::ops::{BufId, ConvGeom, MemoryFormat};
use crate::backend::{DType, HostVec};
use crate::{Error, Result};

macro_rules! dnn {
    ($f:ident ( $($a:expr),* $(,)? )) => {
        $crate::backend::cuda::conv2d::check_dnn(stringify!($f), cudarc::cudnn::sys::$f($($a),*))
    };
}

pub(crate) fn check_dnn(call: &str, r: sys::cudnnStatus_t) -> Result<()> {
    if r == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        return Ok(());
    }
    // SAFETY: cudnnGetErrorString returns a static string for any status.
    let p = unsafe { sys::cudnnGetErrorString(r) };
    let status = if p.is_null() {
        format!("cudnnStatus {}", r as u32)
    } else {
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into()
    };
    Err(Error::DeviceCall { call: call.to_string(), status })
}

/// One lock for every cuDNN call in the process. cuDNN documents handles as usable from several
/// threads at once when each thread has its own, but cuDNN 9.14's legacy convolution API was
/// seen on the H100 here returning `CUDNN_STATUS_INTERNAL_ERROR` and `EXECUTION_FAILED` when two
/// backends (two threads, two handles, one context) called it concurrently, and never when the
/// same calls ran one thread at a time. The calls only queue work, so serialising them costs a
/// single-backend process nothing.
static CUDNN_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub(super) fn cudnn_lock() -> std::sync::MutexGuard<'static, ()> {
    // A panic while holding the lock leaves nothing half-done that the lock protects.
    CUDNN_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The largest workspace an algorithm search may offer candidates (algorithms that want more
/// are not considered); also bounded by half the free memory.
const SEARCH_WORKSPACE: usize = 512 << 20;

/// An algorithm of one of the three directions.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Algo {
    Forward(sys::cudnnConvolutionFwdAlgo_t),
    BackwardData(sys::cudnnConvolutionBwdDataAlgo_t),
    BackwardFilter(sys::cudnnConvolutionBwdFilterAlgo_t),
}

/// The algorithm chosen for one direction of one geometry.
#[derive(Clone, Copy, Debug)]
pub(super) struct Chosen {
    algo: Algo,
    pub(super) memory: usize,
    math: sys::cudnnMathType_t,
    /// Which of the geometry's descriptors: f32 NCHW, or mixed precision's half types.
    data: ConvData,
}

/// The data type and memory order of a convolution's tensors (f32 NCHW unless mixed precision
/// put it in bf16 or f16, NHWC); its compute type is f32 either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct ConvData {
    pub dtype: DType,
    pub format: MemoryFormat,
}

impl ConvData {
    /// f32, channels first: every convolution outside mixed precision.
    pub const F32: ConvData = ConvData { dtype: DType::F32, format: MemoryFormat::Nchw };

    fn half(self) -> bool {
        self.dtype.is_half()
    }
}

/// Descriptors and chosen algorithms of one convolution geometry.
struct ConvEntry {
    x: sys::cudnnTensorDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
    chosen: [Option<Chosen>; 3],
}

impl Drop for ConvEntry {
    fn drop(&mut self) {
        // SAFETY: the descriptors belong to this entry.
        unsafe {
            let _ = dnn!(cudnnDestroyTensorDescriptor(self.x));
            let _ = dnn!(cudnnDestroyTensorDescriptor(self.y));
            let _ = dnn!(cudnnDestroyFilterDescriptor(self.w));
            let _ = dnn!(cudnnDestroyConvolutionDescriptor(self.conv));
        }
    }
}

/// The cuDNN state of a backend.
pub(crate) struct Cudnn {
    handle: sys::cudnnHandle_t,
    convs: HashMap<Key, ConvEntry>,
    /// The shared workspace: device pointer and size in bytes.
    workspace: (CUdeviceptr, usize),
    tf32: bool,
    /// Prefer deterministic algorithms (see [`pick`]).
    deterministic: bool,
    /// Never use transform (FFT, Winograd) algorithms.
    exact_only: bool,
    pub version: usize,
}

impl Cudnn {
    pub fn new(
        stream: cudarc::driver::sys::CUstream,
        tf32: bool,
        deterministic: bool,
        exact_only: bool,
    ) -> Result<Cudnn> {
        let mut handle = std::ptr::null_mut();
        let _lock = cudnn_lock();
        // SAFETY: out-pointer to a local; the stream is live for the backend's life.
        unsafe {
            dnn!(cudnnCreate(&mut handle))?;
            if let Err(e) = dnn!(cudnnSetStream(handle, stream as sys::cudaStream_t)) {
                let _ = dnn!(cudnnDestroy(handle));
                return Err(e);
            }
        }
        // SAFETY: a plain query.
        let version = unsafe { sys::cudnnGetVersion() };
        Ok(Cudnn { handle, convs: HashMap::new(), workspace: (0, 0), tf32, deterministic, exact_only, version })
    }
}

impl Drop for Cudnn {
    fn drop(&mut self) {
        let _lock = cudnn_lock();
        self.convs.clear();
        // SAFETY: the handle belongs to this value; the stream has been synchronised.
        unsafe {
            let _ = dnn!(cudnnDestroy(self.handle));
        }
    }
}

/// A geometry with its data type and memory order.
type Key = ([usize; 16], ConvData);

fn key(g: &ConvGeom, data: ConvData) -> Key {
    ([g.n, g.c, g.h, g.w, g.k, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.groups, g.oh, g.ow], data)
}

fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::shape(format!("cuDNN convolution {what}"), "a value below 2^31", v))
}

/// Creates the descriptors of a geometry and checks cuDNN's output size against the plan's.
/// With a half `data.dtype`, input, filter and output are bf16 or f16 and the convolution
/// computes in f32 (cuDNN's `PSEUDO_BFLOAT16_CONFIG` / `PSEUDO_HALF_CONFIG`: tensor cores, f32
/// accumulation); with `data.format` NHWC, activations are `[n, h, w, c]` and the filter
/// `[k, kh, kw, c / groups]` (the dimensions are still given in NCHW order; the format says how
/// they lie in memory).
fn describe(g: &ConvGeom, data: ConvData) -> Result<ConvEntry> {
    let mut e = ConvEntry {
        x: std::ptr::null_mut(),
        y: std::ptr::null_mut(),
        w: std::ptr::null_mut(),
        conv: std::ptr::null_mut(),
        chosen: [None; 3],
    };
    use sys::cudnnDataType_t::CUDNN_DATA_FLOAT as F32;
    let format = match data.format {
        MemoryFormat::Nchw => sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
        MemoryFormat::Nhwc => sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
    };
    let data = match data.dtype {
        DType::F32 => F32,
        DType::BF16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        DType::F16 => sys::cudnnDataType_t::CUDNN_DATA_HALF,
        d => return Err(Error::State(format!("cuDNN convolution of {d} data: f32, bf16 or f16 expected"))),
    };
    // SAFETY: out-pointers into `e`, whose Drop destroys whatever was created if a later call
    // fails (destroying a null descriptor is a no-op error that is ignored).
    unsafe {
        dnn!(cudnnCreateTensorDescriptor(&mut e.x))?;
        dnn!(cudnnCreateTensorDescriptor(&mut e.y))?;
        dnn!(cudnnCreateFilterDescriptor(&mut e.w))?;
        dnn!(cudnnCreateConvolutionDescriptor(&mut e.conv))?;
        let (n, c, h, w) = (int(g.n, "batch")?, int(g.c, "channels")?, int(g.h, "height")?, int(g.w, "width")?);
        dnn!(cudnnSetTensor4dDescriptor(e.x, format, data, n, c, h, w))?;
        dnn!(cudnnSetTensor4dDescriptor(
            e.y,
            format,
            data,
            n,
            int(g.k, "filters")?,
            int(g.oh, "out")?,
            int(g.ow, "out")?
        ))?;
        dnn!(cudnnSetFilter4dDescriptor(
            e.w,
            data,
            format,
            int(g.k, "filters")?,
            int(g.c / g.groups, "channels")?,
            int(g.kh, "kernel")?,
            int(g.kw, "kernel")?
        ))?;
        dnn!(cudnnSetConvolution2dDescriptor(
            e.conv,
            int(g.ph, "padding")?,
            int(g.pw, "padding")?,
            int(g.sh, "stride")?,
            int(g.sw, "stride")?,
            int(g.dh, "dilation")?,
            int(g.dw, "dilation")?,
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            F32
        ))?;
        dnn!(cudnnSetConvolutionGroupCount(e.conv, int(g.groups, "groups")?))?;
        let (mut on, mut ok, mut oh, mut ow) = (0, 0, 0, 0);
        dnn!(cudnnGetConvolution2dForwardOutputDim(e.conv, e.x, e.w, &mut on, &mut ok, &mut oh, &mut ow))?;
        if (on as usize, ok as usize, oh as usize, ow as usize) != (g.n, g.k, g.oh, g.ow) {
            return Err(Error::shape(
                "cuDNN convolution output",
                format!("{:?}", (g.n, g.k, g.oh, g.ow)),
                format!("{:?}", (on, ok, oh, ow)),
            ));
        }
    }
    Ok(e)
}

/// What the selection needs from any of cuDNN's three perf structs.
struct Candidate {
    index: usize,
    algo: Algo,
    ok: bool,
    /// A direct or GEMM-based algorithm: exact f32 arithmetic. The FFT and Winograd ones
    /// transform the data first and lose precision (seen here: a 5x5 filter gradient off by
    /// 6e-4 of its largest value on a run where such an algorithm timed fastest).
    exact: bool,
    time: f32,
    memory: usize,
    deterministic: bool,
    math: sys::cudnnMathType_t,
    /// One line for logs and errors.
    text: String,
}

/// The fastest usable candidate (cuDNN returns them fastest first) within the workspace
/// offered: FMA math unless TF32 is allowed, exact (direct or GEMM-based) when `exact`. Among
/// those a deterministic one if there is any (so graph replays equal eager runs bit for bit),
/// else the fastest non-deterministic one (some shapes have none that is deterministic; their
/// results vary in the last bits from run to run, as PyTorch's do by default).
///
/// With `deterministic` false (the backend's `nondeterministic` option), simply the fastest
/// usable one, deterministic or not, as PyTorch's `cudnn.benchmark` chooses.
fn pick(cands: &[Candidate], tf32: bool, exact: bool, workspace: usize, deterministic: bool) -> Option<usize> {
    let usable: Vec<&Candidate> = cands
        .iter()
        .filter(|c| {
            c.ok && c.memory <= workspace
                && (tf32 || c.math == sys::cudnnMathType_t::CUDNN_FMA_MATH)
                && (c.exact || !exact)
        })
        .collect();
    let preferred = if deterministic { usable.iter().find(|c| c.deterministic) } else { None };
    preferred.or(usable.first()).map(|c| c.index)
}

/// Choices already made in this process, by geometry, direction, TF32 and determinism: a second
/// backend (another trainer, a test beside another) reuses them, so it computes exactly what
/// the first does and skips the search. cuDNN's timing-based choice could otherwise differ
/// between two searches of the same shape.
type PickKey = (Key, u8, bool, bool, bool);
static PICKS: std::sync::Mutex<Option<HashMap<PickKey, Chosen>>> = std::sync::Mutex::new(None);

fn remembered(k: PickKey) -> Option<Chosen> {
    PICKS.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|m| m.get(&k).copied())
}

fn remember(k: PickKey, c: Chosen) {
    PICKS.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(HashMap::new).insert(k, c);
}

macro_rules! candidates {
    ($perf:expr, $n:expr, $wrap:expr) => {
        $perf[..$n]
            .iter()
            .enumerate()
            .map(|(index, p)| {
                let name = format!("{:?}", p.algo);
                Candidate {
                    index,
                    algo: $wrap(p.algo),
                    ok: p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS,
                    exact: !name.contains("FFT") && !name.contains("WINOGRAD"),
                    time: p.time,
                    memory: p.memory,
                    deterministic: p.determinism == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC,
                    math: p.mathType,
                    text: format!(
                        "{name} {:?} {:.3} ms {} B {:?} {:?}",
                        p.status, p.time, p.memory, p.determinism, p.mathType
                    ),
                }
            })
            .collect::<Vec<_>>()
    };
}

/// Which direction a search is for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Dir {
    Forward = 0,
    BackwardData = 1,
    BackwardFilter = 2,
}

/// How closely a transform (FFT, Winograd) algorithm must match the exact one to be used,
/// relative to the result's largest value. Forward and backward-data errors travel on through
/// the rest of the model, so they get a fifth of the 1e-4 that a whole model must stay within;
/// a filter gradient goes nowhere but its own parameter, so it may use 60% of that budget.
/// Measured on ResNet-18 (batch 64, H100): Winograd forward and backward-data passes differ by
/// 1.0e-5 to 1.7e-5, backward-filter transforms by 2.6e-5 to 4.7e-5 (all kept), and the 6e-4
/// case that prompted the check is rejected.
fn transform_tolerance(dir: Dir) -> f64 {
    match dir {
        Dir::Forward | Dir::BackwardData => 2e-5,
        Dir::BackwardFilter => 6e-5,
    }
}

impl CudaBackend {
    /// The math the search offers: tensor cores for half data (`TENSOR_OP_MATH`) and under
    /// TF32 (`DEFAULT_MATH`), FMA (true f32) otherwise.
    fn math(&self, data: ConvData) -> sys::cudnnMathType_t {
        if data.half() {
            sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
        } else if self.dnn.tf32 {
            sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
        } else {
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        }
    }

    /// The entry of a geometry, created on first use.
    fn conv_entry(&mut self, g: &ConvGeom, data: ConvData) -> Result<&mut ConvEntry> {
        match self.dnn.convs.entry(key(g, data)) {
            std::collections::hash_map::Entry::Occupied(o) => Ok(o.into_mut()),
            std::collections::hash_map::Entry::Vacant(v) => Ok(v.insert(describe(g, data)?)),
        }
    }

    /// Grows the shared workspace to at least `bytes` (warm-up only: refused during capture).
    pub(super) fn conv_workspace(&mut self, bytes: usize) -> Result<(CUdeviceptr, usize)> {
        if bytes > self.dnn.workspace.1 {
            // The old workspace stays allocated (a captured graph may point at it) until drop.
            let p = self.mem.alloc(&self.gpu, bytes.next_multiple_of(1 << 20))?;
            self.dnn.workspace = (p, bytes.next_multiple_of(1 << 20));
        }
        Ok(self.dnn.workspace)
    }

    /// Queues one convolution pass: `out = op(a, b)` (+ `beta * out`) with the direction's
    /// operands: forward `(x, w) -> y`, backward data `(w, dy) -> dx`, backward filter
    /// `(x, dy) -> dw`.
    pub(super) fn conv_run(
        &self,
        g: &ConvGeom,
        c: Chosen,
        (a, b): (CUdeviceptr, CUdeviceptr),
        (out, beta): (CUdeviceptr, f32),
        ws: (CUdeviceptr, usize),
    ) -> Result<()> {
        let e = self.dnn.convs.get(&key(g, c.data)).ok_or_else(|| Error::State("convolution not described".into()))?;
        let (h, one) = (self.dnn.handle, 1.0f32);
        let (alpha, beta) = (&one as *const f32 as *const c_void, &beta as *const f32 as *const c_void);
        let (a, b, out, w) = (a as *const c_void, b as *const c_void, out as *mut c_void, ws.0 as *mut c_void);
        // SAFETY: live descriptors and device buffers of the sizes the descriptors state
        // (checked against the plan in `exec`); the workspace holds at least `c.memory` bytes.
        unsafe {
            dnn!(cudnnSetConvolutionMathType(e.conv, c.math))?;
            match c.algo {
                Algo::Forward(algo) => {
                    dnn!(cudnnConvolutionForward(h, alpha, e.x, a, e.w, b, e.conv, algo, w, ws.1, beta, e.y, out))
                }
                Algo::BackwardData(algo) => {
                    dnn!(cudnnConvolutionBackwardData(h, alpha, e.w, a, e.y, b, e.conv, algo, w, ws.1, beta, e.x, out))
                }
                Algo::BackwardFilter(algo) => {
                    dnn!(cudnnConvolutionBackwardFilter(
                        h, alpha, e.x, a, e.y, b, e.conv, algo, w, ws.1, beta, e.w, out
                    ))
                }
            }
        }
    }

    /// The algorithm of one direction of an f32 convolution, searched for on first use
    /// (warm-up only).
    pub(super) fn conv_algo(&mut self, g: &ConvGeom, dir: Dir, a: CUdeviceptr, b: CUdeviceptr) -> Result<Chosen> {
        self.conv_algo_as(g, ConvData::F32, dir, a, b)
    }

    /// [`CudaBackend::conv_algo`] for data of any type and order.
    fn conv_algo_as(
        &mut self,
        g: &ConvGeom,
        data: ConvData,
        dir: Dir,
        a: CUdeviceptr,
        b: CUdeviceptr,
    ) -> Result<Chosen> {
        if let Some(c) = self.conv_entry(g, data)?.chosen[dir as usize] {
            return Ok(c);
        }
        let pick_key = (key(g, data), dir as u8, self.dnn.tf32, self.dnn.deterministic, self.dnn.exact_only);
        if let Some(c) = remembered(pick_key) {
            self.conv_entry(g, data)?.chosen[dir as usize] = Some(c);
            return Ok(c);
        }
        if self.mem.capturing {
            return Err(Error::State(format!(
                "cuDNN algorithm search ({dir:?}) during CUDA graph capture: the warm-up run did not cover this convolution"
            )));
        }
        let out_bytes = data.dtype.size()
            * match dir {
                Dir::Forward => g.output_len(),
                Dir::BackwardData => g.input_len(),
                Dir::BackwardFilter => g.weight_len(),
            };
        let (free, _) = self.gpu.mem_info()?;
        let ws_bytes = SEARCH_WORKSPACE.min((free / 2) as usize).saturating_sub(2 * out_bytes);
        let mut temps = Vec::new();
        let r = (|| {
            for bytes in [out_bytes, out_bytes, ws_bytes] {
                temps.push(self.mem.alloc(&self.gpu, bytes)?);
            }
            self.conv_search(g, data, dir, (a, b), (temps[0], temps[1]), (temps[2], ws_bytes))
        })();
        for t in temps {
            self.mem.free_now(&self.gpu, t)?;
        }
        let c = r?;
        self.conv_entry(g, data)?.chosen[dir as usize] = Some(c);
        remember(pick_key, c);
        Ok(c)
    }

    /// Times every algorithm (`cudnnFind*AlgorithmEx`) and chooses one; see the module docs.
    /// Half data (mixed precision) is treated as TF32 is: any math type, the fastest algorithm
    /// (deterministic first), no check against an exact one, whose own half rounding of the
    /// output would be all the check could see.
    fn conv_search(
        &mut self,
        g: &ConvGeom,
        data: ConvData,
        dir: Dir,
        (a, b): (CUdeviceptr, CUdeviceptr),
        scratch: (CUdeviceptr, CUdeviceptr),
        ws: (CUdeviceptr, usize),
    ) -> Result<Chosen> {
        let (tf32, math, handle) = (self.dnn.tf32 || data.half(), self.math(data), self.dnn.handle);
        let e = self.conv_entry(g, data)?;
        let (xd, yd, wd, cd) = (e.x, e.y, e.w, e.conv);
        let (ap, bp, s, w) = (a as *const c_void, b as *const c_void, scratch.0 as *mut c_void, ws.0 as *mut c_void);
        let mut n = 0;
        // SAFETY: descriptors and pointers describe live device buffers of the right sizes;
        // the perf arrays hold as many entries as requested.
        let cands = unsafe {
            dnn!(cudnnSetConvolutionMathType(cd, math))?;
            match dir {
                Dir::Forward => {
                    let mut perf = [std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>(); 8];
                    dnn!(cudnnFindConvolutionForwardAlgorithmEx(
                        handle,
                        xd,
                        ap,
                        wd,
                        bp,
                        cd,
                        yd,
                        s,
                        8,
                        &mut n,
                        perf.as_mut_ptr(),
                        w,
                        ws.1
                    ))?;
                    candidates!(perf, n as usize, Algo::Forward)
                }
                Dir::BackwardData => {
                    let mut perf = [std::mem::zeroed::<sys::cudnnConvolutionBwdDataAlgoPerf_t>(); 6];
                    dnn!(cudnnFindConvolutionBackwardDataAlgorithmEx(
                        handle,
                        wd,
                        ap,
                        yd,
                        bp,
                        cd,
                        xd,
                        s,
                        6,
                        &mut n,
                        perf.as_mut_ptr(),
                        w,
                        ws.1
                    ))?;
                    candidates!(perf, n as usize, Algo::BackwardData)
                }
                Dir::BackwardFilter => {
                    let mut perf = [std::mem::zeroed::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>(); 7];
                    dnn!(cudnnFindConvolutionBackwardFilterAlgorithmEx(
                        handle,
                        xd,
                        ap,
                        yd,
                        bp,
                        cd,
                        wd,
                        s,
                        7,
                        &mut n,
                        perf.as_mut_ptr(),
                        w,
                        ws.1
                    ))?;
                    candidates!(perf, n as usize, Algo::BackwardFilter)
                }
            }
        };
        let chosen = |i: usize| Chosen { algo: cands[i].algo, memory: cands[i].memory, math: cands[i].math, data };
        let det = self.dnn.deterministic;
        let exact = pick(&cands, tf32, !tf32, ws.1, det);
        let fastest = pick(&cands, tf32, false, ws.1, det);
        let (choice, note) = match (exact, fastest) {
            (_, None) => {
                return Err(Error::DeviceCall {
                    call: format!("cuDNN algorithm search ({dir:?}) for {g:?}"),
                    status: format!(
                        "no algorithm{} fits in {} bytes of workspace; candidates: {}",
                        if tf32 { "" } else { " with FMA math (no TF32)" },
                        ws.1,
                        cands.iter().map(|c| c.text.as_str()).collect::<Vec<_>>().join("; ")
                    ),
                });
            }
            // TF32, or nothing exact to check against: the fastest.
            (None, Some(f)) => (f, "no exact algorithm".to_string()),
            (Some(x), Some(_)) if self.dnn.exact_only => (x, "exact only".to_string()),
            (Some(x), Some(f)) if x == f || cands[f].time >= 0.9 * cands[x].time => (x, String::new()),
            // A transform algorithm at least 10% faster: use it if it agrees with the exact one.
            (Some(x), Some(f)) => {
                self.conv_run(g, chosen(x), (a, b), (scratch.0, 0.0), ws)?;
                self.conv_run(g, chosen(f), (a, b), (scratch.1, 0.0), ws)?;
                let len = match dir {
                    Dir::Forward => g.output_len(),
                    Dir::BackwardData => g.input_len(),
                    Dir::BackwardFilter => g.weight_len(),
                };
                let (mut rx, mut rf) = (HostVec::zeros(DType::F32, len), HostVec::zeros(DType::F32, len));
                self.mem.download(&self.gpu, scratch.0, rx.as_bytes_mut())?;
                self.mem.download(&self.gpu, scratch.1, rf.as_bytes_mut())?;
                let err = relative_difference(&rx.into_f32()?, &rf.into_f32()?);
                if err <= transform_tolerance(dir) {
                    (f, format!("transform checked: {err:.1e} from {}", cands[x].text))
                } else {
                    (x, format!("transform rejected: {err:.1e} from exact ({})", cands[f].text))
                }
            }
        };
        if self.debug {
            eprintln!("[kiln cuda] cudnn {dir:?} {:?}: {} {note}", key(g, data), cands[choice].text);
            for c in &cands {
                eprintln!("[kiln cuda]     candidate {}", c.text);
            }
        }
        Ok(chosen(choice))
    }
}

impl CudaBackend {
    /// The data type and order of a convolution's data buffers: all f32 (channels first), or
    /// all one half type (mixed precision, in `format`); any other mixture is an error naming
    /// the op's buffers. A half convolution's bias and bias gradient stay f32 (`bias` lists
    /// them); a channels-last half output gets its bias from the convolution (mixed precision
    /// keeps it half), a channels-first one where it is widened (the cast after it).
    fn conv_data(
        &self,
        op: &str,
        format: MemoryFormat,
        data: &[BufId],
        bias: (Option<BufId>, bool),
    ) -> Result<ConvData> {
        let types: Vec<DType> = data.iter().map(|&b| self.dtype_of(b)).collect();
        let want = if types[0].is_half() { types[0] } else { DType::F32 };
        let bias_ok = bias.0.is_none_or(|b| self.dtype_of(b) == DType::F32)
            && !(want.is_half() && bias.1 && format != MemoryFormat::Nhwc);
        let format_ok = want.is_half() || format == MemoryFormat::Nchw;
        if types.iter().all(|&t| t == want) && bias_ok && format_ok {
            return Ok(ConvData { dtype: want, format });
        }
        let list: Vec<String> = data.iter().zip(&types).map(|(b, t)| format!("buffer {} {t}", b.0)).collect();
        Err(Error::State(format!(
            "{op} ({}): operands must be all f32 (channels first) or all bf16 or all f16 with an f32 bias (a channels-first half output takes its bias in the cast that widens it); got {}{}",
            format.name(),
            list.join(", "),
            bias.0.map(|b| format!(", bias buffer {} {}", b.0, self.dtype_of(b))).unwrap_or_default()
        )))
    }
}

impl RunOp<ops::Conv2d> for CudaBackend {
    fn run_op(&mut self, o: &ops::Conv2d) -> Result<()> {
        let ops::Conv2d { x, w, b, y, format, .. } = *o;
        let g = &o.g;
        let data = self.conv_data("conv2d", format, &[x, w, y], (b, b.is_some()))?;
        let _lock = cudnn_lock();
        let (xp, wp, yp) = (self.ptr(x), self.ptr(w), self.ptr(y));
        let c = self.conv_algo_as(g, data, Dir::Forward, xp, wp)?;
        let ws = self.conv_workspace(c.memory)?;
        self.conv_run(g, c, (xp, wp), (yp, 0.0), ws)?;
        match b {
            Some(b) if data.half() => self.bias_add_half(y, b, (g.n, g.k, g.oh * g.ow), format)?,
            Some(b) => self.bias_add(y, b, g.n, g.k, g.oh * g.ow)?,
            None => {}
        }
        Ok(())
    }
}

impl RunOp<ops::Conv2dBackward> for CudaBackend {
    fn run_op(&mut self, o: &ops::Conv2dBackward) -> Result<()> {
        let ops::Conv2dBackward { x, w, dy, dx, dw, db, format, .. } = *o;
        let g = &o.g;
        let mut bufs = vec![x, w, dy, dw.buf];
        bufs.extend(dx.map(|d| d.buf));
        let data = self.conv_data("conv2d_backward", format, &bufs, (db.map(|d| d.buf), false))?;
        let _lock = cudnn_lock();
        let (xp, wp, dyp) = (self.ptr(x), self.ptr(w), self.ptr(dy));
        let beta = |acc: bool| if acc { 1.0f32 } else { 0.0f32 };
        if let Some(dx) = dx {
            let c = self.conv_algo_as(g, data, Dir::BackwardData, wp, dyp)?;
            let ws = self.conv_workspace(c.memory)?;
            self.conv_run(g, c, (wp, dyp), (self.ptr(dx.buf), beta(dx.accumulate)), ws)?;
        }
        let c = self.conv_algo_as(g, data, Dir::BackwardFilter, xp, dyp)?;
        let ws = self.conv_workspace(c.memory)?;
        self.conv_run(g, c, (xp, dyp), (self.ptr(dw.buf), beta(dw.accumulate)), ws)?;
        match db {
            Some(db) if data.half() => self.channel_sum_half(dy, db, (g.n, g.k, g.oh * g.ow), format)?,
            Some(db) => self.channel_sum(dy, db, g.n, g.k, g.oh * g.ow)?,
            None => {}
        }
        Ok(())
    }
}

/// Largest difference relative to the reference's largest magnitude; infinite where either
/// holds a NaN or infinity the other does not.
fn relative_difference(reference: &[f32], other: &[f32]) -> f64 {
    let scale = reference.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let mut diff = 0f64;
    for (a, b) in reference.iter().zip(other) {
        if a.is_finite() != b.is_finite() {
            return f64::INFINITY;
        }
        diff = diff.max((*a as f64 - *b as f64).abs());
    }
    if scale == 0.0 { diff } else { diff / scale }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sys::cudnnMathType_t::{CUDNN_DEFAULT_MATH as DEFAULT, CUDNN_FMA_MATH as FMA};

    fn cand(index: usize, exact: bool, deterministic: bool, math: sys::cudnnMathType_t, memory: usize) -> Candidate {
        let algo = Algo::Forward(sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_GEMM);
        Candidate { index, algo, ok: true, exact, time: index as f32, memory, deterministic, math, text: String::new() }
    }

    #[test]
    fn pick_prefers_exact_deterministic_fma_within_the_workspace() {
        let cands = [
            cand(0, false, true, FMA, 0),    // FFT: fastest, not exact
            cand(1, true, false, FMA, 0),    // exact, non-deterministic
            cand(2, true, true, DEFAULT, 0), // may use TF32
            cand(3, true, true, FMA, 1000),  // too much workspace below
            cand(4, true, true, FMA, 10),
        ];
        assert_eq!(pick(&cands, false, true, 100, true), Some(4));
        assert_eq!(pick(&cands, false, true, 1000, true), Some(3));
        // Without a deterministic exact candidate: the fastest exact one.
        assert_eq!(pick(&cands[..3], false, true, 100, true), Some(1));
        // Transforms allowed (to be checked against the exact choice): the FFT one.
        assert_eq!(pick(&cands, false, false, 100, true), Some(0));
        // TF32 allowed: every math type too, deterministic first.
        assert_eq!(pick(&cands[1..], true, false, 100, true), Some(2));
        // Not preferring determinism: the fastest exact one, deterministic or not.
        assert_eq!(pick(&cands, false, true, 100, false), Some(1));
        let failed = Candidate { ok: false, ..cand(0, true, true, FMA, 0) };
        assert_eq!(pick(&[failed], false, true, 100, true), None);
    }

    #[test]
    fn relative_difference_flags_non_finite_values() {
        let d = relative_difference(&[2.0, -4.0], &[2.0, -4.0004]);
        assert!((d - 1e-4).abs() < 1e-6, "{d}");
        assert!(relative_difference(&[1.0, 2.0], &[1.0, f32::NAN]).is_infinite());
    }
}
