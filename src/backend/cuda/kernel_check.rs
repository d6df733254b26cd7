//! Checks of the CUDA kernels and libraries that need NVRTC or the libraries but no GPU, for
//! `tests/cuda_kernels.rs`: that test binary reports them ignored where the library is
//! missing, and the GPU machine (`KILN_REQUIRE_GPU=1`) runs them. Not part of kiln's API.

use super::MODULES;
use super::loader;
use super::nvrtc::{ModuleSrc, compile};
use crate::{Error, Result};

/// Why the library `stem` (`nvrtc`, `cublasLt`, `cudnn`) cannot be used here; `None` when it
/// opens. Only a library that is absent counts: one found but unusable (a missing symbol, a
/// loader error) is `None` too, so that the test that opens it fails with the reason.
pub fn library_missing(stem: &str) -> Option<String> {
    match loader::ensure_one(stem) {
        Err(e) if e.contains("was not found") => Some(e),
        _ => None,
    }
}

/// Opens the library `stem` as the backend does, checking that it has every symbol kiln
/// calls; returns the path it was found at, or why it cannot be used.
pub fn open_library(stem: &str) -> std::result::Result<String, String> {
    loader::ensure_one(stem)
}

fn opts(arch: &str) -> Vec<String> {
    [format!("--gpu-architecture={arch}"), "--std=c++17".into(), "-lineinfo".into()].to_vec()
}

/// Compiles every kernel module of the backend with NVRTC for `arch` (such as `sm_90`) and
/// checks that each cubin is an ELF image naming each kernel its module declares. Returns the
/// module names; an error names the module (a compile error carries NVRTC's log).
pub fn compile_every_module(arch: &str) -> Result<Vec<&'static str>> {
    loader::ensure_one("nvrtc").map_err(|reason| Error::Device { device: "nvrtc".into(), reason })?;
    let opts = opts(arch);
    let mut names = Vec::new();
    for m in MODULES {
        let cubin = compile(m, &opts)?;
        if !cubin.starts_with(b"\x7fELF") {
            return Err(Error::State(format!("{}: NVRTC's output is not an ELF cubin", m.name)));
        }
        let text = String::from_utf8_lossy(&cubin);
        if let Some(k) = m.kernels.iter().find(|k| !text.contains(*k)) {
            return Err(Error::State(format!("{}: kernel {k} missing from the cubin", m.name)));
        }
        names.push(m.name);
    }
    Ok(names)
}

/// The probe kernel's declaration. Its launcher struct is used only by the unit test below.
#[allow(dead_code)]
mod probe {
    kernels! {
        typed_probe(x: (float*), n: i64, v: float);
    }
}
use probe::{KERNELS, prototypes};

/// Compiles `definition` (CUDA C) for `arch` as a module declaring, through `kernels!`, the
/// single kernel `typed_probe(float* x, i64 n, float v)`: a definition whose parameters differ
/// from that declaration must fail to compile.
pub fn compile_typed_probe(definition: &'static str, arch: &str) -> Result<()> {
    loader::ensure_one("nvrtc").map_err(|reason| Error::Device { device: "nvrtc".into(), reason })?;
    let module = ModuleSrc { name: "typed_probe", source: definition, kernels: KERNELS, prototypes };
    compile(&module, &opts(arch)).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::probe::typed_probe;
    use super::*;
    use crate::backend::cuda::nvrtc::Kernel;

    /// The probe's declaration as `kernels!` renders it, and its launcher's argument packing
    /// (declaration order, one slot each); compiling it is tests/cuda_kernels.rs's part.
    #[test]
    fn the_probe_declaration_and_its_launcher() {
        assert_eq!(KERNELS, ["typed_probe"]);
        assert!(prototypes().contains("void typed_probe(float* x, i64 n, float v);"), "{}", prototypes());
        assert_eq!(typed_probe { x: 7, n: 3, v: 1.5 }.args().slots(), [7, 3, 1.5f32.to_bits() as u64]);
    }
}
