//! Run-time compilation of kiln's CUDA C kernels with NVRTC, for the GPU's own architecture
//! (`sm_90` on an H100), with an on-disk cache so a second start compiles nothing.
//!
//! Cache: one `.cubin` file per module under `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`,
//! else `~/.cache/kiln` (or the folder given in [`super::CudaOptions`]). The file name holds a
//! 64-bit FNV-1a hash of the source, the target architecture, the NVRTC version and the compile
//! options, so a changed kernel, another GPU or another NVRTC never loads a stale binary. Files
//! are written to a temporary name and renamed, so concurrent processes never read half a file;
//! a cache folder that cannot be written only costs a recompile next time.

use std::ffi::{CStr, CString, c_char};
use std::path::{Path, PathBuf};

use cudarc::driver::sys;
use cudarc::nvrtc::sys as rtc_sys;

use super::driver::drv;
use crate::{Error, Result};

macro_rules! rtc {
    ($f:ident ( $($a:expr),* $(,)? )) => {
        $crate::backend::cuda::nvrtc::check_rtc(stringify!($f), cudarc::nvrtc::sys::$f($($a),*))
    };
}

pub(crate) fn check_rtc(call: &str, r: rtc_sys::nvrtcResult) -> Result<()> {
    if r == rtc_sys::nvrtcResult::NVRTC_SUCCESS {
        return Ok(());
    }
    // SAFETY: nvrtcGetErrorString returns a pointer to a static string for any status.
    let p = unsafe { rtc_sys::nvrtcGetErrorString(r) };
    let status = if p.is_null() {
        format!("nvrtcResult {}", r as u32)
    } else {
        // SAFETY: non-null, NUL-terminated static string.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    };
    Err(Error::DeviceCall { call: call.to_string(), status })
}

/// The C spelling of a kernel argument type of [`kernels!`].
macro_rules! c_type {
    (int) => {
        "int"
    };
    (unsigned) => {
        "unsigned"
    };
    (i64) => {
        "i64"
    };
    (u64) => {
        "u64"
    };
    (float) => {
        "float"
    };
    (double) => {
        "double"
    };
    ((const float*)) => {
        "const float*"
    };
    ((float*)) => {
        "float*"
    };
    ((const double*)) => {
        "const double*"
    };
    ((double*)) => {
        "double*"
    };
    ((const unsigned*)) => {
        "const unsigned*"
    };
    ((unsigned*)) => {
        "unsigned*"
    };
    ((u64*)) => {
        "u64*"
    };
    ((const u16*)) => {
        "const u16*"
    };
    ((u16*)) => {
        "u16*"
    };
    ((const u64*)) => {
        "const u64*"
    };
    ((const void*)) => {
        "const void*"
    };
    ((void*)) => {
        "void*"
    };
}

/// The Rust type a launcher takes for a kernel argument type of [`kernels!`]: `i64` (sizes and
/// offsets, never negative) is a `usize`; every pointer a device address.
macro_rules! rust_type {
    (int) => {
        i32
    };
    (unsigned) => {
        u32
    };
    (i64) => {
        usize
    };
    (u64) => {
        u64
    };
    (float) => {
        f32
    };
    (double) => {
        f64
    };
    (($($p:tt)*)) => {
        cudarc::driver::sys::CUdeviceptr
    };
}

/// How a launcher passes an argument of a [`kernels!`] type.
macro_rules! push_arg {
    ($args:expr, int, $v:expr) => {
        $args.i32($v)
    };
    ($args:expr, unsigned, $v:expr) => {
        $args.u32($v)
    };
    ($args:expr, i64, $v:expr) => {
        $args.i64($v)
    };
    ($args:expr, u64, $v:expr) => {
        $args.u64($v)
    };
    ($args:expr, float, $v:expr) => {
        $args.f32($v)
    };
    ($args:expr, double, $v:expr) => {
        $args.f64($v)
    };
    ($args:expr, ($($p:tt)*), $v:expr) => {
        $args.ptr($v)
    };
}

/// Declares a module's kernels once, each with its name and typed argument list, and makes:
/// - a launcher struct per kernel (named as the kernel; one field per argument, of the Rust
///   type for its C type), whose [`Kernel::args`] packs the arguments in declaration order, so
///   a launch that misses an argument or gives one the wrong type does not compile;
/// - `KERNELS`, the names to look up after loading, and `prototypes()`, the C declarations
///   appended to the module's source, so NVRTC refuses a definition whose parameters differ
///   from the declaration (a C function cannot be declared twice with different parameters).
macro_rules! kernels {
    ($($name:ident($($arg:ident: $t:tt),* $(,)?);)*) => {
        $(
            #[allow(non_camel_case_types)]
            #[derive(Clone, Copy, Debug)]
            pub(super) struct $name {
                $(pub $arg: rust_type!($t),)*
            }

            impl $crate::backend::cuda::nvrtc::Kernel for $name {
                const NAME: &'static str = stringify!($name);
                fn args(&self) -> $crate::backend::cuda::driver::Args {
                    let a = $crate::backend::cuda::driver::Args::new();
                    $(let a = push_arg!(a, $t, self.$arg);)*
                    a
                }
            }
        )*

        /// The names of this module's kernels.
        pub(super) const KERNELS: &[&str] = &[$(stringify!($name)),*];

        /// The C declarations of this module's kernels, as [`kernels!`] declared them.
        pub(super) fn prototypes() -> String {
            let mut s = String::new();
            $(
                let params: &[&str] = &[$(concat!(c_type!($t), " ", stringify!($arg))),*];
                s += &format!("extern \"C\" __global__ void {}({});\n", stringify!($name), params.join(", "));
            )*
            s
        }
    };
}

/// A kernel launch's name and arguments, made by a launcher struct of [`kernels!`].
pub(crate) trait Kernel {
    /// The kernel's name in its module.
    const NAME: &'static str;
    /// The arguments, packed in the order of the C definition.
    fn args(&self) -> super::driver::Args;
}

/// One CUDA C source and the kernels it defines (declared with [`kernels!`]).
pub(crate) struct ModuleSrc {
    pub name: &'static str,
    pub source: &'static str,
    pub kernels: &'static [&'static str],
    /// The C declarations of `kernels`, compiled after `source` so that a definition whose
    /// parameters differ from its declaration does not compile.
    pub prototypes: fn() -> String,
}

impl ModuleSrc {
    /// The whole text NVRTC compiles: the prelude, the source, the declarations.
    fn full_source(&self) -> String {
        format!(
            "{}\n{}\n// Declarations from kernels! (checked against the definitions above)\n{}",
            prelude(),
            self.source,
            (self.prototypes)()
        )
    }
}

/// A loaded module and its kernel handles.
pub(crate) struct Module {
    handle: sys::CUmodule,
    pub functions: Vec<(&'static str, sys::CUfunction)>,
}

impl Drop for Module {
    fn drop(&mut self) {
        // SAFETY: the module belongs to this value; the owning backend has synchronised.
        unsafe {
            let _ = drv!(cuModuleUnload(self.handle));
        }
    }
}

/// Definitions shared by every module: [`PRELUDE_BASE`] and the buffer layouts of
/// [`crate::backend::ops`] ([`crate::backend::ops::cuda_layouts`]).
pub(crate) fn prelude() -> &'static str {
    static P: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    P.get_or_init(|| format!("{}\n{PRELUDE_BASE}", crate::backend::ops::cuda_layouts()))
}

/// Definitions shared by every module (no headers: NVRTC has no standard library here).
const PRELUDE_BASE: &str = r#"
typedef long long i64;
typedef unsigned long long u64;
#define INFINITY __int_as_float(0x7f800000)
#define NAN __int_as_float(0x7fc00000)
#define GRID_LOOP(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)
__device__ __forceinline__ void store(float* d, float v, int acc) { if (acc) *d += v; else *d = v; }

// Sum of one double per thread over the block, in a fixed order (deterministic).
// `sh` holds blockDim.x doubles; blockDim.x is a power of two. Every thread gets the result.
__device__ double block_sum(double v, double* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    double r = sh[0];
    __syncthreads();
    return r;
}
"#;

/// The compiler: target architecture, NVRTC version, cache folder, and a count of compiles.
pub(crate) struct Compiler {
    pub arch: String,
    pub version: (i32, i32),
    pub cache_dir: Option<PathBuf>,
    pub compiles: usize,
}

/// Where compiled kernels are cached when no folder is configured.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("KILN_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(Path::new(&d).join("kiln"));
    }
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache").join("kiln"))
}

/// 64-bit FNV-1a over several byte strings (with separators, so ("ab","c") != ("a","bc")).
pub(crate) fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter().chain(&[0xff]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl Compiler {
    pub fn new(cc: (i32, i32), cache_dir: Option<PathBuf>) -> Result<Compiler> {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: out-pointers to locals.
        unsafe { rtc!(nvrtcVersion(&mut major, &mut minor))? };
        Ok(Compiler { arch: format!("sm_{}{}", cc.0, cc.1), version: (major, minor), cache_dir, compiles: 0 })
    }

    fn options(&self) -> Vec<String> {
        vec![format!("--gpu-architecture={}", self.arch), "--std=c++17".into(), "-lineinfo".into()]
    }

    fn cache_path(&self, m: &ModuleSrc) -> Option<PathBuf> {
        let opts = self.options().join(" ");
        let version = format!("{}.{}", self.version.0, self.version.1);
        let h = fnv1a(&[m.full_source().as_bytes(), self.arch.as_bytes(), version.as_bytes(), opts.as_bytes()]);
        self.cache_dir.as_ref().map(|d| d.join(format!("{}-{h:016x}.cubin", m.name)))
    }

    /// Compiles (or loads from the cache) every module, compiling the missing ones in parallel.
    pub fn load_all(&mut self, mods: &[&ModuleSrc]) -> Result<Vec<Module>> {
        let cached: Vec<Option<Vec<u8>>> =
            mods.iter().map(|m| self.cache_path(m).and_then(|p| std::fs::read(p).ok())).collect();
        let opts = self.options();
        let fresh: Vec<Result<Option<Vec<u8>>>> = std::thread::scope(|s| {
            let handles: Vec<_> = mods
                .iter()
                .zip(&cached)
                .map(|(m, c)| {
                    let opts = &opts;
                    s.spawn(move || if c.is_some() { Ok(None) } else { compile(m, opts).map(Some) })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::DeviceCall { call: "nvrtc compile thread".into(), status: "panicked".into() })
                    })
                })
                .collect()
        });
        let mut out = Vec::with_capacity(mods.len());
        for ((m, c), f) in mods.iter().zip(cached).zip(fresh) {
            let (cubin, from_cache) = match (c, f?) {
                (Some(c), _) => (c, true),
                (None, Some(f)) => (f, false),
                (None, None) => unreachable!("a module is either cached or compiled"),
            };
            let module = match load(m, &cubin) {
                Ok(module) => module,
                // A damaged cache file: compile afresh.
                Err(_) if from_cache => {
                    let fresh = compile(m, &opts)?;
                    self.compiles += 1;
                    self.store(m, &fresh);
                    load(m, &fresh)?
                }
                Err(e) => return Err(e),
            };
            if !from_cache {
                self.compiles += 1;
                self.store(m, &cubin);
            }
            out.push(module);
        }
        Ok(out)
    }

    fn store(&self, m: &ModuleSrc, cubin: &[u8]) {
        let Some(path) = self.cache_path(m) else { return };
        let Some(dir) = path.parent() else { return };
        if std::fs::create_dir_all(dir).is_err() {
            return;
        }
        // Unique per process and call, so concurrent writers never share a temporary file.
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".{}.{}.{seq}.tmp", m.name, std::process::id()));
        if std::fs::write(&tmp, cubin).is_ok() && std::fs::rename(&tmp, &path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// Compiles one module to a cubin; a compile error carries NVRTC's log.
pub(super) fn compile(m: &ModuleSrc, opts: &[String]) -> Result<Vec<u8>> {
    let src = CString::new(m.full_source())
        .map_err(|_| Error::State(format!("kernel source {} holds a NUL byte", m.name)))?;
    let name = CString::new(format!("{}.cu", m.name)).expect("module names have no NUL");
    let copts: Vec<CString> = opts.iter().map(|o| CString::new(o.as_str()).expect("options have no NUL")).collect();
    let ptrs: Vec<*const c_char> = copts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: rtc_sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: all strings are NUL-terminated and outlive the program; the program is destroyed
    // on every path below.
    unsafe {
        rtc!(nvrtcCreateProgram(&mut prog, src.as_ptr(), name.as_ptr(), 0, std::ptr::null(), std::ptr::null()))?;
        let r = (|| -> Result<Vec<u8>> {
            let compiled = rtc!(nvrtcCompileProgram(prog, ptrs.len() as i32, ptrs.as_ptr()));
            if let Err(Error::DeviceCall { status, .. }) = compiled {
                let mut len = 0usize;
                rtc!(nvrtcGetProgramLogSize(prog, &mut len))?;
                let mut log = vec![0u8; len.max(1)];
                rtc!(nvrtcGetProgramLog(prog, log.as_mut_ptr() as *mut c_char))?;
                let log = String::from_utf8_lossy(&log).trim_end_matches('\0').to_string();
                return Err(Error::DeviceCall {
                    call: format!("nvrtcCompileProgram({})", m.name),
                    status: format!("{status}\n{log}"),
                });
            }
            let mut len = 0usize;
            rtc!(nvrtcGetCUBINSize(prog, &mut len))?;
            let mut cubin = vec![0u8; len];
            rtc!(nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char))?;
            Ok(cubin)
        })();
        let _ = rtc!(nvrtcDestroyProgram(&mut prog));
        r
    }
}

/// Loads a cubin into the current context and looks its kernels up.
fn load(m: &ModuleSrc, cubin: &[u8]) -> Result<Module> {
    let mut handle = std::ptr::null_mut();
    // SAFETY: `cubin` is a complete image (the driver validates it and fails cleanly if not).
    unsafe { drv!(cuModuleLoadData(&mut handle, cubin.as_ptr() as *const std::ffi::c_void))? };
    let mut module = Module { handle, functions: Vec::new() };
    for &k in m.kernels {
        let cname = CString::new(k).expect("kernel names have no NUL");
        let mut f = std::ptr::null_mut();
        // SAFETY: `handle` is the module loaded above; `cname` is NUL-terminated.
        unsafe { drv!(cuModuleGetFunction(&mut f, handle, cname.as_ptr()))? };
        module.functions.push((k, f));
    }
    Ok(module)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Compiling the kernel modules needs NVRTC: tests/cuda_kernels.rs does it (through
    // `kernel_check`), reported ignored where NVRTC is missing.

    #[test]
    fn fnv1a_separates_parts_and_is_stable() {
        assert_ne!(fnv1a(&[&b"ab"[..], &b"c"[..]]), fnv1a(&[&b"a"[..], &b"bc"[..]]));
        // The cache key must not change between builds or Rust versions: FNV-1a of "a", 0xff,
        // computed independently.
        assert_eq!(fnv1a(&[&b"a"[..]]), 0x089b_c907_b544_c769);
    }
}
