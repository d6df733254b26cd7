//! Choosing a backend at run time: [`Device::Cpu`], [`Device::Cuda`], [`Device::Wgpu`] or
//! [`Device::Auto`].
//!
//! `Auto` takes CUDA GPU 0 when a usable one and the CUDA libraries are present, else (in builds
//! with the `wgpu` feature) the first wgpu adapter that is a real GPU (a CPU driver such as
//! lavapipe is never chosen), else the CPU with a one-line notice on stderr saying why. An
//! explicit `Cuda(i)` or `Wgpu(i)` that cannot be honoured is an [`Error::Device`], never a
//! fallback: a user who asked for the GPU should not silently get a run a hundred times slower.
//!
//! ```
//! use kiln::backend::{Backend, Device};
//!
//! let backend = Device::Cpu.open().unwrap();
//! assert!(backend.describe().starts_with("cpu"));
//! assert_eq!("cuda:1".parse::<Device>().unwrap(), Device::Cuda(1));
//! ```

use std::fmt;
use std::str::FromStr;

use super::Backend;
use super::cpu::CpuBackend;
use super::cuda::{CudaBackend, CudaOptions};
use crate::{Error, Result};

/// Where a model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Device {
    /// The pure-Rust CPU backend (f32, all cores or `KILN_NUM_THREADS`).
    Cpu,
    /// The CUDA GPU of this ordinal.
    Cuda(usize),
    /// The wgpu adapter of this ordinal (Vulkan, Metal or DX12; builds with the `wgpu` feature).
    Wgpu(usize),
    /// CUDA GPU 0 when usable, else a wgpu GPU adapter, else the CPU (with a notice on stderr).
    #[default]
    Auto,
}

impl Device {
    /// Creates the backend with default options, printing the fallback notice of `Auto` (if
    /// any) on stderr, once per process. The backend's [`Backend::describe`] says what was
    /// chosen.
    pub fn open(self) -> Result<Box<dyn Backend>> {
        self.open_with(&CudaOptions::default())
    }

    /// [`Device::open`] with CUDA options (TF32, kernel cache folder, eager mode).
    pub fn open_with(self, options: &CudaOptions) -> Result<Box<dyn Backend>> {
        let (backend, notice) = self.open_noting(options)?;
        if let Some(n) = notice {
            print_notice_once(&n);
        }
        Ok(backend)
    }

    /// Creates the backend and returns, instead of printing it, the notice saying why `Auto`
    /// fell back to the CPU (`None` when it did not).
    pub fn open_noting(self, options: &CudaOptions) -> Result<(Box<dyn Backend>, Option<String>)> {
        self.open_on(None, None, options)
    }

    /// Opens the device as a trainer configures it: the CPU with `threads` workers (`None`: all
    /// cores or `KILN_NUM_THREADS`), CUDA with TF32 and determinism as given, and, where `gpu`
    /// is set (the local rank's GPU in data-parallel training), that GPU in place of the
    /// ordinal `Cuda(i)` or `Auto` would take. Returns the `Auto` notice as
    /// [`Device::open_noting`] does.
    pub fn open_for_training(
        self,
        threads: Option<usize>,
        tf32: bool,
        deterministic: bool,
        gpu: Option<usize>,
    ) -> Result<(Box<dyn Backend>, Option<String>)> {
        let options = CudaOptions { tf32, nondeterministic: !deterministic, ..Default::default() };
        self.open_on(gpu, threads, &options)
    }

    fn open_on(
        self,
        gpu: Option<usize>,
        threads: Option<usize>,
        options: &CudaOptions,
    ) -> Result<(Box<dyn Backend>, Option<String>)> {
        let cpu = || -> Result<Box<dyn Backend>> { Ok(Box::new(CpuBackend::<f32>::new(threads)?)) };
        match self {
            Device::Cpu => Ok((cpu()?, None)),
            Device::Cuda(i) => Ok((Box::new(CudaBackend::with_options(gpu.unwrap_or(i), options.clone())?), None)),
            Device::Wgpu(i) => Ok((open_wgpu(gpu.unwrap_or(i))?, None)),
            Device::Auto => match CudaBackend::with_options(gpu.unwrap_or(0), options.clone()) {
                Ok(b) => Ok((Box::new(b), None)),
                Err(e) => match auto_wgpu() {
                    Ok(b) => Ok((b, None)),
                    Err(w) => Ok((cpu()?, Some(cpu_fallback_notice(&e, w.as_ref())))),
                },
            },
        }
    }
}

#[cfg(feature = "wgpu")]
fn open_wgpu(i: usize) -> Result<Box<dyn Backend>> {
    Ok(Box::new(super::wgpu::WgpuBackend::new(i)?))
}

#[cfg(not(feature = "wgpu"))]
fn open_wgpu(i: usize) -> Result<Box<dyn Backend>> {
    Err(Error::Device {
        device: format!("wgpu:{i}"),
        reason:
            "this kiln was built without the `wgpu` cargo feature (it is on by default; drop --no-default-features)"
                .into(),
    })
}

/// `Auto`'s second choice: a wgpu adapter that is a real GPU; the error says why not (`None`:
/// a build without the feature, which has nothing to say).
#[cfg(feature = "wgpu")]
fn auto_wgpu() -> std::result::Result<Box<dyn Backend>, Option<Error>> {
    match super::wgpu::WgpuBackend::first_gpu() {
        Ok(b) => Ok(Box::new(b)),
        Err(e) => Err(Some(e)),
    }
}

#[cfg(not(feature = "wgpu"))]
fn auto_wgpu() -> std::result::Result<Box<dyn Backend>, Option<Error>> {
    Err(None)
}

/// The one wording of the notice that `Auto` fell back to the CPU, and why (CUDA's reason, and
/// wgpu's in builds with that backend).
pub(crate) fn cpu_fallback_notice(why: &Error, wgpu: Option<&Error>) -> String {
    match wgpu {
        Some(w) => format!("kiln: no usable GPU ({why}; {w}); running on the CPU"),
        None => format!("kiln: no usable GPU ({why}); running on the CPU"),
    }
}

/// Prints the CPU-fallback notice on stderr the first time only: a program that opens many
/// backends (a trainer, an evaluator, a predictor) learns it once.
pub(crate) fn print_notice_once(notice: &str) {
    static NOTICE: std::sync::Once = std::sync::Once::new();
    NOTICE.call_once(|| eprintln!("{notice}"));
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Wgpu(i) => write!(f, "wgpu:{i}"),
            Device::Auto => write!(f, "auto"),
        }
    }
}

/// Parses `cpu`, `auto`, `cuda` (GPU 0), `cuda:N`, `wgpu` (adapter 0) and `wgpu:N`, as a
/// command line or config gives them.
impl FromStr for Device {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(Device::Cpu),
            "auto" => Ok(Device::Auto),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            "wgpu" => Ok(Device::Wgpu(0)),
            _ => {
                let ordinal = |prefix: &str| t.strip_prefix(prefix).and_then(|n| n.parse().ok());
                ordinal("cuda:").map(Device::Cuda).or_else(|| ordinal("wgpu:").map(Device::Wgpu)).ok_or_else(|| {
                    Error::config("device", format!("expected cpu, cuda, cuda:N, wgpu, wgpu:N or auto, got '{s}'"))
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for (s, d) in [
            ("cpu", Device::Cpu),
            ("auto", Device::Auto),
            ("cuda:0", Device::Cuda(0)),
            ("cuda:3", Device::Cuda(3)),
            ("wgpu:2", Device::Wgpu(2)),
        ] {
            assert_eq!(s.parse::<Device>().unwrap(), d);
            assert_eq!(d.to_string(), s);
        }
        assert_eq!(" CUDA ".parse::<Device>().unwrap(), Device::Cuda(0));
        assert!("cuda:x".parse::<Device>().is_err());
        assert!("tpu".parse::<Device>().is_err());
        assert_eq!("wgpu".parse::<Device>().unwrap(), Device::Wgpu(0));
        assert!("wgpu:".parse::<Device>().is_err());
    }

    /// Without the feature, asking for wgpu is an error that names the feature.
    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn wgpu_without_the_feature_names_it() {
        let e = Device::Wgpu(0).open().err().expect("no wgpu backend in this build").to_string();
        assert!(e.contains("`wgpu` cargo feature"), "{e}");
    }
}
