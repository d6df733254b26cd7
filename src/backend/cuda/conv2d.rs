//! 2-D convolutions on the GPU through cuDNN: forward, backward-data and backward-filter with
//! the legacy convolution API (still in cuDNN 9), bias add and bias gradient with kiln's own
//! kernels (`join.rs`).
//!
//! Per convolution geometry the backend keeps the descriptors and, per direction, the algorithm
//! chosen by timing every candidate once (`cudnnFind*AlgorithmEx`, on scratch outputs so an
//! accumulating gradient is never clobbered). Only deterministic algorithms are taken (so a
//! replayed graph computes exactly what eager execution does), and unless TF32 was asked for,
//! only `CUDNN_FMA_MATH` ones (`CUDNN_DEFAULT_MATH` lets cuDNN use TF32 tensor cores on Ampere
//! and later, about 1e-3 relative error). The search happens in the warm-up run; one workspace
//! serves every convolution (work on the one stream is serialised) and grows, never shrinks,
//! in the warm-up only.

use std::collections::HashMap;
use std::ffi::{CStr, c_void};

use cudarc::cudnn::sys;
use cudarc::driver::sys::CUdeviceptr;

use super::CudaBackend;
use crate::backend::ops::{BufId, ConvGeom, GradOut};
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

/// The largest workspace an algorithm search may offer candidates (algorithms that want more
/// are not considered); also bounded by half the free memory.
const SEARCH_WORKSPACE: usize = 512 << 20;

/// The algorithm chosen for one direction of one geometry.
#[derive(Clone, Copy, Debug)]
struct Chosen<A> {
    algo: A,
    memory: usize,
    math: sys::cudnnMathType_t,
}

/// Descriptors and chosen algorithms of one convolution geometry.
struct ConvEntry {
    x: sys::cudnnTensorDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
    fwd: Option<Chosen<sys::cudnnConvolutionFwdAlgo_t>>,
    bwd_data: Option<Chosen<sys::cudnnConvolutionBwdDataAlgo_t>>,
    bwd_filter: Option<Chosen<sys::cudnnConvolutionBwdFilterAlgo_t>>,
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
    convs: HashMap<[usize; 16], ConvEntry>,
    /// The shared workspace: device pointer and size in bytes.
    workspace: (CUdeviceptr, usize),
    tf32: bool,
    pub version: usize,
}

impl Cudnn {
    pub fn new(stream: cudarc::driver::sys::CUstream, tf32: bool) -> Result<Cudnn> {
        let mut handle = std::ptr::null_mut();
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
        Ok(Cudnn { handle, convs: HashMap::new(), workspace: (0, 0), tf32, version })
    }
}

impl Drop for Cudnn {
    fn drop(&mut self) {
        self.convs.clear();
        // SAFETY: the handle belongs to this value; the stream has been synchronised.
        unsafe {
            let _ = dnn!(cudnnDestroy(self.handle));
        }
    }
}

fn key(g: &ConvGeom) -> [usize; 16] {
    [g.n, g.c, g.h, g.w, g.k, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.groups, g.oh, g.ow]
}

fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::shape(format!("cuDNN convolution {what}"), "a value below 2^31", v))
}

/// Creates the descriptors of a geometry and checks cuDNN's output size against the plan's.
fn describe(g: &ConvGeom) -> Result<ConvEntry> {
    let mut e = ConvEntry {
        x: std::ptr::null_mut(),
        y: std::ptr::null_mut(),
        w: std::ptr::null_mut(),
        conv: std::ptr::null_mut(),
        fwd: None,
        bwd_data: None,
        bwd_filter: None,
    };
    use sys::cudnnDataType_t::CUDNN_DATA_FLOAT as F32;
    use sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW as NCHW;
    // SAFETY: out-pointers into `e`, whose Drop destroys whatever was created if a later call
    // fails (destroying a null descriptor is a no-op error that is ignored).
    unsafe {
        dnn!(cudnnCreateTensorDescriptor(&mut e.x))?;
        dnn!(cudnnCreateTensorDescriptor(&mut e.y))?;
        dnn!(cudnnCreateFilterDescriptor(&mut e.w))?;
        dnn!(cudnnCreateConvolutionDescriptor(&mut e.conv))?;
        let (n, c, h, w) = (int(g.n, "batch")?, int(g.c, "channels")?, int(g.h, "height")?, int(g.w, "width")?);
        dnn!(cudnnSetTensor4dDescriptor(e.x, NCHW, F32, n, c, h, w))?;
        dnn!(cudnnSetTensor4dDescriptor(
            e.y,
            NCHW,
            F32,
            n,
            int(g.k, "filters")?,
            int(g.oh, "out")?,
            int(g.ow, "out")?
        ))?;
        dnn!(cudnnSetFilter4dDescriptor(
            e.w,
            F32,
            NCHW,
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
    ok: bool,
    memory: usize,
    deterministic: bool,
    math: sys::cudnnMathType_t,
}

/// The fastest usable candidate (cuDNN returns them fastest first): deterministic, FMA math
/// unless TF32 is allowed, within the workspace offered.
fn pick(cands: &[Candidate], tf32: bool, workspace: usize) -> Option<usize> {
    let usable =
        |c: &&Candidate| c.ok && c.memory <= workspace && (tf32 || c.math == sys::cudnnMathType_t::CUDNN_FMA_MATH);
    cands.iter().filter(usable).find(|c| c.deterministic).map(|c| c.index)
}

macro_rules! candidates {
    ($perf:expr, $n:expr) => {
        $perf[..$n]
            .iter()
            .enumerate()
            .map(|(index, p)| Candidate {
                index,
                ok: p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS,
                memory: p.memory,
                deterministic: p.determinism == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC,
                math: p.mathType,
            })
            .collect::<Vec<_>>()
    };
}

/// Which direction a search is for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Dir {
    Forward,
    BackwardData,
    BackwardFilter,
}

impl CudaBackend {
    fn math(&self) -> sys::cudnnMathType_t {
        if self.dnn.tf32 { sys::cudnnMathType_t::CUDNN_DEFAULT_MATH } else { sys::cudnnMathType_t::CUDNN_FMA_MATH }
    }

    /// The entry of a geometry, created on first use.
    fn conv_entry(&mut self, g: &ConvGeom) -> Result<&mut ConvEntry> {
        match self.dnn.convs.entry(key(g)) {
            std::collections::hash_map::Entry::Occupied(o) => Ok(o.into_mut()),
            std::collections::hash_map::Entry::Vacant(v) => Ok(v.insert(describe(g)?)),
        }
    }

    /// Grows the shared workspace to at least `bytes` (warm-up only: refused during capture).
    fn conv_workspace(&mut self, bytes: usize) -> Result<(CUdeviceptr, usize)> {
        if bytes > self.dnn.workspace.1 {
            // The old workspace stays allocated (a captured graph may point at it) until drop.
            let p = self.mem.alloc(&self.gpu, bytes.next_multiple_of(1 << 20))?;
            self.dnn.workspace = (p, bytes.next_multiple_of(1 << 20));
        }
        Ok(self.dnn.workspace)
    }

    /// Times every algorithm of one direction on scratch outputs and records the choice.
    fn conv_search(&mut self, g: &ConvGeom, dir: Dir, a: CUdeviceptr, b: CUdeviceptr) -> Result<()> {
        if self.mem.capturing {
            return Err(Error::State(format!(
                "cuDNN algorithm search ({dir:?}) during CUDA graph capture: the warm-up run did not cover this convolution"
            )));
        }
        let out_bytes = 4 * match dir {
            Dir::Forward => g.output_len(),
            Dir::BackwardData => g.input_len(),
            Dir::BackwardFilter => g.weight_len(),
        };
        let (free, _) = self.gpu.mem_info()?;
        let ws_bytes = SEARCH_WORKSPACE.min((free / 2) as usize).saturating_sub(out_bytes);
        let scratch = self.mem.alloc(&self.gpu, out_bytes)?;
        let ws = match self.mem.alloc(&self.gpu, ws_bytes) {
            Ok(p) => p,
            Err(e) => {
                self.mem.free_now(&self.gpu, scratch)?;
                return Err(e);
            }
        };
        let r = self.conv_search_in(g, dir, a, b, scratch, ws, ws_bytes);
        self.mem.free_now(&self.gpu, scratch)?;
        self.mem.free_now(&self.gpu, ws)?;
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn conv_search_in(
        &mut self,
        g: &ConvGeom,
        dir: Dir,
        a: CUdeviceptr,
        b: CUdeviceptr,
        scratch: CUdeviceptr,
        ws: CUdeviceptr,
        ws_bytes: usize,
    ) -> Result<()> {
        let (tf32, math, handle) = (self.dnn.tf32, self.math(), self.dnn.handle);
        let e = self.conv_entry(g)?;
        let (xd, yd, wd, cd) = (e.x, e.y, e.w, e.conv);
        let (a, b, s, w) = (a as *const c_void, b as *const c_void, scratch as *mut c_void, ws as *mut c_void);
        let mut n = 0;
        let none = || Error::DeviceCall {
            call: format!("cuDNN algorithm search ({dir:?}) for {g:?}"),
            status: format!(
                "no deterministic algorithm{} fits in {ws_bytes} bytes of workspace",
                if tf32 { "" } else { " with FMA math (no TF32)" }
            ),
        };
        // SAFETY: descriptors and pointers describe live device buffers of the right sizes;
        // the perf arrays hold as many entries as requested.
        unsafe {
            dnn!(cudnnSetConvolutionMathType(cd, math))?;
            match dir {
                Dir::Forward => {
                    let mut perf = [std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>(); 8];
                    dnn!(cudnnFindConvolutionForwardAlgorithmEx(
                        handle,
                        xd,
                        a,
                        wd,
                        b,
                        cd,
                        yd,
                        s,
                        8,
                        &mut n,
                        perf.as_mut_ptr(),
                        w,
                        ws_bytes
                    ))?;
                    let i = pick(&candidates!(perf, n as usize), tf32, ws_bytes).ok_or_else(none)?;
                    let p = perf[i];
                    self.conv_entry(g)?.fwd = Some(Chosen { algo: p.algo, memory: p.memory, math: p.mathType });
                }
                Dir::BackwardData => {
                    let mut perf = [std::mem::zeroed::<sys::cudnnConvolutionBwdDataAlgoPerf_t>(); 6];
                    dnn!(cudnnFindConvolutionBackwardDataAlgorithmEx(
                        handle,
                        wd,
                        a,
                        yd,
                        b,
                        cd,
                        xd,
                        s,
                        6,
                        &mut n,
                        perf.as_mut_ptr(),
                        w,
                        ws_bytes
                    ))?;
                    let i = pick(&candidates!(perf, n as usize), tf32, ws_bytes).ok_or_else(none)?;
                    let p = perf[i];
                    self.conv_entry(g)?.bwd_data = Some(Chosen { algo: p.algo, memory: p.memory, math: p.mathType });
                }
                Dir::BackwardFilter => {
                    let mut perf = [std::mem::zeroed::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>(); 7];
                    dnn!(cudnnFindConvolutionBackwardFilterAlgorithmEx(
                        handle,
                        xd,
                        a,
                        yd,
                        b,
                        cd,
                        wd,
                        s,
                        7,
                        &mut n,
                        perf.as_mut_ptr(),
                        w,
                        ws_bytes
                    ))?;
                    let i = pick(&candidates!(perf, n as usize), tf32, ws_bytes).ok_or_else(none)?;
                    let p = perf[i];
                    self.conv_entry(g)?.bwd_filter = Some(Chosen { algo: p.algo, memory: p.memory, math: p.mathType });
                }
            }
        }
        if self.debug {
            let e = self.conv_entry(g)?;
            let chosen = match dir {
                Dir::Forward => format!("{:?}", e.fwd),
                Dir::BackwardData => format!("{:?}", e.bwd_data),
                Dir::BackwardFilter => format!("{:?}", e.bwd_filter),
            };
            eprintln!("[kiln cuda] cudnn {dir:?} {:?}: {chosen}", key(g));
        }
        Ok(())
    }

    pub(super) fn conv_forward(&mut self, g: &ConvGeom, x: BufId, w: BufId, b: Option<BufId>, y: BufId) -> Result<()> {
        let (xp, wp, yp) = (self.ptr(x), self.ptr(w), self.ptr(y));
        if self.conv_entry(g)?.fwd.is_none() {
            self.conv_search(g, Dir::Forward, xp, wp)?;
        }
        let e = self.conv_entry(g)?;
        let (xd, yd, wd, cd, c) = (e.x, e.y, e.w, e.conv, e.fwd.expect("searched above"));
        let (ws, ws_bytes) = self.conv_workspace(c.memory)?;
        let (one, zero) = (1.0f32, 0.0f32);
        // SAFETY: live descriptors and device buffers of the sizes the descriptors state
        // (checked against the plan in `exec`); the workspace holds `c.memory` bytes.
        unsafe {
            dnn!(cudnnSetConvolutionMathType(cd, c.math))?;
            dnn!(cudnnConvolutionForward(
                self.dnn.handle,
                &one as *const f32 as *const c_void,
                xd,
                xp as *const c_void,
                wd,
                wp as *const c_void,
                cd,
                c.algo,
                ws as *mut c_void,
                ws_bytes,
                &zero as *const f32 as *const c_void,
                yd,
                yp as *mut c_void
            ))?;
        }
        if let Some(b) = b {
            self.bias_add(y, b, g.n, g.k, g.oh * g.ow)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn conv_backward(
        &mut self,
        g: &ConvGeom,
        x: BufId,
        w: BufId,
        dy: BufId,
        dx: Option<GradOut>,
        dw: GradOut,
        db: Option<GradOut>,
    ) -> Result<()> {
        let (xp, wp, dyp) = (self.ptr(x), self.ptr(w), self.ptr(dy));
        let one = 1.0f32;
        let beta = |acc: bool| if acc { 1.0f32 } else { 0.0f32 };
        if let Some(dx) = dx {
            if self.conv_entry(g)?.bwd_data.is_none() {
                self.conv_search(g, Dir::BackwardData, wp, dyp)?;
            }
            let e = self.conv_entry(g)?;
            let (xd, yd, wd, cd, c) = (e.x, e.y, e.w, e.conv, e.bwd_data.expect("searched above"));
            let (ws, ws_bytes) = self.conv_workspace(c.memory)?;
            let b = beta(dx.accumulate);
            // SAFETY: as in `conv_forward`.
            unsafe {
                dnn!(cudnnSetConvolutionMathType(cd, c.math))?;
                dnn!(cudnnConvolutionBackwardData(
                    self.dnn.handle,
                    &one as *const f32 as *const c_void,
                    wd,
                    wp as *const c_void,
                    yd,
                    dyp as *const c_void,
                    cd,
                    c.algo,
                    ws as *mut c_void,
                    ws_bytes,
                    &b as *const f32 as *const c_void,
                    xd,
                    self.ptr(dx.buf) as *mut c_void
                ))?;
            }
        }
        if self.conv_entry(g)?.bwd_filter.is_none() {
            self.conv_search(g, Dir::BackwardFilter, xp, dyp)?;
        }
        let e = self.conv_entry(g)?;
        let (xd, yd, wd, cd, c) = (e.x, e.y, e.w, e.conv, e.bwd_filter.expect("searched above"));
        let (ws, ws_bytes) = self.conv_workspace(c.memory)?;
        let b = beta(dw.accumulate);
        // SAFETY: as in `conv_forward`.
        unsafe {
            dnn!(cudnnSetConvolutionMathType(cd, c.math))?;
            dnn!(cudnnConvolutionBackwardFilter(
                self.dnn.handle,
                &one as *const f32 as *const c_void,
                xd,
                xp as *const c_void,
                yd,
                dyp as *const c_void,
                cd,
                c.algo,
                ws as *mut c_void,
                ws_bytes,
                &b as *const f32 as *const c_void,
                wd,
                self.ptr(dw.buf) as *mut c_void
            ))?;
        }
        if let Some(db) = db {
            self.channel_sum(dy, db, g.n, g.k, g.oh * g.ow)?;
        }
        Ok(())
    }
}
