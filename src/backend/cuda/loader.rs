//! Finding and checking the CUDA libraries before cudarc touches them.
//!
//! cudarc (with `dynamic-loading`) opens each library on first use and panics when the library
//! or one of its symbols is missing. kiln must instead return an error, so before any CUDA call
//! [`ensure`] opens every library kiln needs (the driver `libcuda`, NVRTC, cuBLASLt, cuDNN) the
//! way cudarc will, and checks that each exports every symbol this backend calls. The unit test
//! at the bottom keeps the symbol lists honest: it reads this folder's sources and fails if a
//! call site names a function missing from its library's list.
//!
//! Libraries are looked up by name first (the loader's path, `LD_LIBRARY_PATH`, ldconfig), then
//! in the usual install folders: `$KILN_CUDA_LIBRARY_PATH` (colon-separated), `$CUDA_HOME`,
//! `/usr/local/cuda`, and the `nvidia/*/lib` folders of Python environments (where pip's CUDA
//! and cuDNN wheels, as PyTorch installs them, put their libraries). A library found in a folder
//! is opened by its full path and kept open; glibc then resolves cudarc's later open by name
//! (`libcudnn.so.9`) to that same library, since it matches loaded libraries by soname.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libloading::Library;

/// One library kiln needs.
struct Needed {
    /// The name cudarc derives its candidate file names from.
    stem: &'static str,
    /// What it is, for a user who lacks it.
    what: &'static str,
    /// What its absence means or where it comes from.
    hint: &'static str,
    symbols: &'static [&'static str],
}

const DRIVER_SYMBOLS: &[&str] = &[
    "cuCtxSetCurrent",
    "cuDeviceGet",
    "cuDeviceGetAttribute",
    "cuDeviceGetCount",
    "cuDeviceGetName",
    "cuDevicePrimaryCtxRelease_v2",
    "cuDevicePrimaryCtxRetain",
    "cuDeviceTotalMem_v2",
    "cuDriverGetVersion",
    "cuEventCreate",
    "cuEventDestroy_v2",
    "cuEventElapsedTime_v2",
    "cuEventQuery",
    "cuEventRecord",
    "cuEventSynchronize",
    "cuGetErrorName",
    "cuGraphDestroy",
    "cuGraphExecDestroy",
    "cuGraphInstantiateWithFlags",
    "cuGraphLaunch",
    "cuInit",
    "cuLaunchKernel",
    "cuMemAllocHost_v2",
    "cuMemAlloc_v2",
    "cuMemFreeHost",
    "cuMemFree_v2",
    "cuMemGetInfo_v2",
    "cuMemcpyDtoH_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuMemsetD32Async",
    "cuMemsetD8Async",
    "cuModuleGetFunction",
    "cuModuleLoadData",
    "cuModuleUnload",
    "cuStreamBeginCapture_v2",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamEndCapture",
    "cuStreamSynchronize",
    "cuStreamWaitEvent",
];

const NVRTC_SYMBOLS: &[&str] = &[
    "nvrtcCompileProgram",
    "nvrtcCreateProgram",
    "nvrtcDestroyProgram",
    "nvrtcGetCUBIN",
    "nvrtcGetCUBINSize",
    "nvrtcGetErrorString",
    "nvrtcGetProgramLog",
    "nvrtcGetProgramLogSize",
    "nvrtcVersion",
];

const CUBLASLT_SYMBOLS: &[&str] = &[
    "cublasLtCreate",
    "cublasLtDestroy",
    "cublasLtGetStatusName",
    "cublasLtGetVersion",
    "cublasLtMatmul",
    "cublasLtMatmulAlgoGetHeuristic",
    "cublasLtMatmulDescCreate",
    "cublasLtMatmulDescDestroy",
    "cublasLtMatmulDescSetAttribute",
    "cublasLtMatmulPreferenceCreate",
    "cublasLtMatmulPreferenceDestroy",
    "cublasLtMatmulPreferenceSetAttribute",
    "cublasLtMatrixLayoutCreate",
    "cublasLtMatrixLayoutDestroy",
];

const CUDNN_SYMBOLS: &[&str] = &[
    "cudnnConvolutionBackwardData",
    "cudnnConvolutionBackwardFilter",
    "cudnnConvolutionForward",
    "cudnnCreate",
    "cudnnCreateConvolutionDescriptor",
    "cudnnCreateFilterDescriptor",
    "cudnnCreateTensorDescriptor",
    "cudnnDestroy",
    "cudnnDestroyConvolutionDescriptor",
    "cudnnDestroyFilterDescriptor",
    "cudnnDestroyTensorDescriptor",
    "cudnnFindConvolutionBackwardDataAlgorithmEx",
    "cudnnFindConvolutionBackwardFilterAlgorithmEx",
    "cudnnFindConvolutionForwardAlgorithmEx",
    "cudnnGetConvolution2dForwardOutputDim",
    "cudnnGetErrorString",
    "cudnnGetVersion",
    "cudnnSetConvolution2dDescriptor",
    "cudnnSetConvolutionGroupCount",
    "cudnnSetConvolutionMathType",
    "cudnnSetFilter4dDescriptor",
    "cudnnSetStream",
    "cudnnSetTensor4dDescriptor",
];

const NEEDED: &[Needed] = &[
    Needed {
        stem: "cuda",
        what: "the NVIDIA driver library libcuda.so.1",
        hint: "no NVIDIA driver is installed",
        symbols: DRIVER_SYMBOLS,
    },
    Needed {
        stem: "nvrtc",
        what: "NVRTC (libnvrtc)",
        hint: "install the CUDA toolkit or the nvidia-cuda-nvrtc wheel, or set KILN_CUDA_LIBRARY_PATH",
        symbols: NVRTC_SYMBOLS,
    },
    Needed {
        stem: "cublasLt",
        what: "cuBLASLt (libcublasLt)",
        hint: "install the CUDA toolkit or the nvidia-cublas wheel, or set KILN_CUDA_LIBRARY_PATH",
        symbols: CUBLASLT_SYMBOLS,
    },
    Needed {
        stem: "cudnn",
        what: "cuDNN 9 (libcudnn.so.9)",
        hint: "install cuDNN 9 or the nvidia-cudnn wheel, or set KILN_CUDA_LIBRARY_PATH",
        symbols: CUDNN_SYMBOLS,
    },
];

/// The libraries, open for the life of the process.
pub(crate) struct Loaded {
    _libs: Vec<Library>,
    /// Where each library was found, for [`crate::backend::Backend::describe`] and debugging.
    pub paths: Vec<String>,
}

static LOADED: OnceLock<Result<Loaded, String>> = OnceLock::new();

/// Opens and checks every library once per process; the error says what is missing.
pub(crate) fn ensure() -> Result<&'static Loaded, String> {
    LOADED.get_or_init(load_all).as_ref().map_err(|e| e.clone())
}

fn load_all() -> Result<Loaded, String> {
    let dirs = search_dirs();
    let mut libs = Vec::new();
    let mut paths = Vec::new();
    for need in NEEDED {
        let (lib, found) = load_one(need, &dirs)?;
        libs.push(lib);
        paths.push(found);
    }
    Ok(Loaded { _libs: libs, paths })
}

/// Opens one library and checks its symbols; returns it and where it was found.
fn load_one(need: &Needed, dirs: &[PathBuf]) -> Result<(Library, String), String> {
    let (lib, found) = open(need.stem, dirs).map_err(|problems| match problems.first() {
        // A file that is there but cannot be loaded (unreadable, not a library, wrong
        // architecture) is not "not found": say what the loader said about it.
        Some(why) => format!("{} was found but cannot be loaded: {why}", need.what),
        None => format!("{} was not found: {}", need.what, need.hint),
    })?;
    let missing: Vec<&str> =
        // SAFETY: looking a symbol up runs no code; the pointer is not used.
        need.symbols.iter().copied().filter(|s| unsafe { lib.get::<*const ()>(s.as_bytes()) }.is_err()).collect();
    if !missing.is_empty() {
        return Err(format!("{found} lacks {} (too old a version?)", missing.join(", ")));
    }
    Ok((lib, found))
}

/// Opens and checks one library by cudarc's name for it (`nvrtc`, `cublasLt`, `cudnn`),
/// without the others: NVRTC compiles with no driver or GPU, which lets the kernels be
/// compiled (and checked) on a machine without one. The library stays loaded.
pub(crate) fn ensure_one(stem: &str) -> Result<String, String> {
    let need = NEEDED.iter().find(|n| n.stem == stem).ok_or_else(|| format!("kiln does not use a library {stem}"))?;
    let (lib, found) = load_one(need, &search_dirs())?;
    std::mem::forget(lib);
    Ok(found)
}

/// Opens the library as cudarc will: the first of cudarc's candidate names that loads. Why a
/// candidate that exists failed to load is added to `problems`.
fn open_by_name(stem: &str, problems: &mut Vec<String>) -> Option<(Library, String)> {
    cudarc::get_lib_name_candidates(stem).into_iter().find_map(|name| {
        // SAFETY: loading a CUDA library runs its initialisers, which is what using it means.
        match unsafe { Library::new(&name) } {
            Ok(l) => Some((l, name)),
            Err(e) => {
                let why = dl_error(&e);
                if !why.contains("No such file") {
                    problems.push(why);
                }
                None
            }
        }
    })
}

/// The system loader's message (`dlerror`), which libloading keeps as the error's source.
fn dl_error(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(source) => source.to_string(),
        None => e.to_string(),
    }
}

/// The library, or why not: the loader's messages for files that exist but did not load
/// (empty when none was there).
fn open(stem: &str, dirs: &[PathBuf]) -> Result<(Library, String), Vec<String>> {
    let mut problems = Vec::new();
    if let Some(found) = open_by_name(stem, &mut problems) {
        return Ok(found);
    }
    open_in_dirs(stem, dirs, &mut problems).ok_or(problems)
}

/// The library from one of `dirs`.
fn open_in_dirs(stem: &str, dirs: &[PathBuf], problems: &mut Vec<String>) -> Option<(Library, String)> {
    let names = cudarc::get_lib_name_candidates(stem);
    for dir in dirs {
        for name in &names {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            // SAFETY: as above. The handle is kept (in `Loaded`) so the library stays loaded.
            let pre = match unsafe { Library::new(&path) } {
                Ok(pre) => pre,
                Err(e) => {
                    problems.push(format!("{}: {}", path.display(), dl_error(&e)));
                    continue;
                }
            };
            preload_companions(stem, dir);
            // The preloaded library now answers to its soname; open it exactly as cudarc will.
            if let Some((lib, _)) = open_by_name(stem, &mut Vec::new()) {
                drop(pre);
                return Some((lib, path.display().to_string()));
            }
            // Its soname is none of cudarc's candidates: keep our handle, cudarc would panic.
            drop(pre);
        }
    }
    None
}

/// Libraries that a library found outside the loader's path opens by name itself (cuDNN's
/// sub-libraries, NVRTC's builtins): opened by full path first, so those opens succeed too.
fn preload_companions(stem: &str, dir: &Path) {
    let prefixes: &[&str] = match stem {
        "cudnn" => &[
            "libcudnn_graph.so",
            "libcudnn_engines_precompiled.so",
            "libcudnn_engines_runtime_compiled.so",
            "libcudnn_heuristic.so",
            "libcudnn_ops.so",
            "libcudnn_cnn.so",
        ],
        "nvrtc" => &["libnvrtc-builtins.so"],
        _ => &[],
    };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    for prefix in prefixes {
        for f in files.iter().filter(|f| f.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix)))
        {
            // SAFETY: as above; leaked on purpose so the library stays loaded for the process.
            if let Ok(lib) = unsafe { Library::new(f) } {
                std::mem::forget(lib);
                break;
            }
        }
    }
}

/// Folders to search when a library is not on the loader's path.
pub(super) fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("KILN_CUDA_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(p) = std::env::var_os(var) {
            dirs.push(Path::new(&p).join("lib64"));
            dirs.push(Path::new(&p).join("lib"));
        }
    }
    for d in
        ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib64"]
    {
        dirs.push(PathBuf::from(d));
    }
    // Python environments: the active ones, every python3 on PATH, and the system prefixes.
    let mut lib_roots: Vec<PathBuf> = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(p) = std::env::var_os(var) {
            lib_roots.push(Path::new(&p).join("lib"));
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for bin in std::env::split_paths(&path) {
            if bin.join("python3").exists()
                && let Some(prefix) = bin.parent()
            {
                lib_roots.push(prefix.join("lib"));
            }
        }
    }
    lib_roots.push(PathBuf::from("/usr/local/lib"));
    lib_roots.push(PathBuf::from("/usr/lib"));
    for root in lib_roots {
        for py in subdirs(&root).into_iter().filter(|p| name_starts(p, "python3")) {
            for pkgs in ["site-packages", "dist-packages"] {
                for pkg in subdirs(&py.join(pkgs).join("nvidia")) {
                    dirs.push(pkg.join("lib"));
                }
            }
        }
    }
    dirs.dedup();
    dirs
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

fn name_starts(p: &Path, prefix: &str) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `libcuda.so.1` that is there but cannot be loaded is reported as such, with the
    /// loader's reason, not as "not found".
    #[test]
    fn a_library_that_cannot_be_loaded_is_not_reported_missing() {
        let dir = std::env::temp_dir().join(format!("kiln-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in cudarc::get_lib_name_candidates("cuda") {
            if !name.contains('/') {
                std::fs::write(dir.join(&name), b"not a shared library").unwrap();
            }
        }
        let mut problems = Vec::new();
        assert!(open_in_dirs("cuda", std::slice::from_ref(&dir), &mut problems).is_none());
        assert!(problems.iter().any(|p| p.contains(&dir.display().to_string())), "{problems:?}");
        // Where no driver is installed, the whole lookup says what it found.
        if open_by_name("cuda", &mut Vec::new()).is_none() {
            let err = load_one(&NEEDED[0], std::slice::from_ref(&dir)).err().unwrap();
            assert!(err.contains("was found but cannot be loaded") && err.contains("libcuda"), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Every call through the `drv`, `rtc`, `blaslt` and `dnn` macros in this folder's sources
    /// names a symbol on its library's checked list.
    #[test]
    fn every_called_symbol_is_checked_before_use() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/backend/cuda");
        let mut calls = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let src = std::fs::read_to_string(&path).unwrap();
            for (mac, list) in [
                ("drv!(", DRIVER_SYMBOLS),
                ("rtc!(", NVRTC_SYMBOLS),
                ("blaslt!(", CUBLASLT_SYMBOLS),
                ("dnn!(", CUDNN_SYMBOLS),
            ] {
                for (i, _) in src.match_indices(mac) {
                    let rest = &src[i + mac.len()..];
                    let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    // The macro definitions themselves (`$f`) are not call sites.
                    if name.is_empty() {
                        continue;
                    }
                    calls += 1;
                    assert!(list.contains(&name.as_str()), "{}: {name} is called but not checked", path.display());
                }
            }
            // Raw calls into a `sys` module (bypassing the macros) must be listed too.
            for (i, _) in src.match_indices("sys::") {
                let name: String =
                    src[i + 5..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if src[i + 5 + name.len()..].starts_with('(') {
                    let listed = [DRIVER_SYMBOLS, NVRTC_SYMBOLS, CUBLASLT_SYMBOLS, CUDNN_SYMBOLS]
                        .iter()
                        .any(|l| l.contains(&name.as_str()));
                    assert!(listed, "{}: raw call {name} is not checked", path.display());
                }
            }
        }
        assert!(calls > 50, "found only {calls} call sites: is the scan looking at the right folder?");
    }

    // That each library present opens and has every symbol is tests/cuda_kernels.rs's part
    // (ignored where the library is missing).

    #[test]
    fn symbol_lists_have_no_duplicates() {
        for list in [DRIVER_SYMBOLS, NVRTC_SYMBOLS, CUBLASLT_SYMBOLS, CUDNN_SYMBOLS] {
            let mut v = list.to_vec();
            v.sort();
            v.dedup();
            assert_eq!(v.len(), list.len());
        }
    }
}
