//! Choosing a device: `Device::Auto` takes the GPU when one is usable and otherwise falls back
//! to the CPU with a notice; an explicit CUDA request that cannot be met is an error, never a
//! panic. These run on every machine: without a GPU (here, CI) they check the fallback and the
//! error; with one they check that the GPU is chosen.

use kiln::Error;
use kiln::backend::cpu::CpuBackend;
use kiln::backend::{Backend, CudaBackend, CudaOptions, Device};
use kiln::exec::{Executor, Mode};
use kiln::model::ModelBuilder;
use kiln::rng::Rng;
use kiln::tensor::Tensor;

mod cuda_common;

#[test]
fn explicit_cuda_is_an_error_without_a_gpu_and_auto_falls_back() {
    let opts = CudaOptions::default();
    match CudaBackend::new(0) {
        Err(e) => {
            assert!(matches!(e, Error::Device { .. }), "expected a device error, got {e:?}");
            let explicit = Device::Cuda(0).open_noting(&opts).err().expect("cuda:0 must fail here");
            assert!(matches!(explicit, Error::Device { .. }), "{explicit:?}");
            let (auto, notice) = Device::Auto.open_noting(&opts).unwrap();
            assert!(auto.describe().starts_with("cpu"), "{}", auto.describe());
            let notice = notice.expect("the fallback says why");
            assert!(notice.contains("running on the CPU") && notice.contains("cuda:0"), "{notice}");
            println!("no GPU here ({e}); checked the error and the CPU fallback");
        }
        Ok(gpu) => {
            assert!(gpu.describe().starts_with("cuda:0"), "{}", gpu.describe());
            let (auto, notice) = Device::Auto.open_noting(&opts).unwrap();
            assert!(auto.describe().starts_with("cuda:0") && notice.is_none(), "{}", auto.describe());
            let missing = Device::Cuda(999).open_noting(&opts).err().expect("no machine has 1000 GPUs");
            assert!(matches!(&missing, Error::Device { reason, .. } if reason.contains("only")), "{missing:?}");
            println!("GPU: {}", auto.describe());
        }
    }
    assert!(Device::Cpu.open().unwrap().describe().starts_with("cpu"));
}

#[test]
fn a_boxed_backend_runs_an_executor_like_the_cpu() {
    let model = ModelBuilder::new(&[4, 6]).dense(5).tanh().dense(3).seed(9).build().unwrap();
    let mut r = Rng::new(1);
    let x = Tensor::new(&[4, 6], (0..24).map(|_| r.uniform_range(-1.0, 1.0)).collect()).unwrap();
    let mut boxed: Executor<Box<dyn Backend>> = Executor::new(&model, Device::Auto.open().unwrap()).unwrap();
    let mut cpu = Executor::new(&model, CpuBackend::<f32>::new(Some(1)).unwrap()).unwrap();
    let a = boxed.predict(&x, Mode::Eval).unwrap();
    let b = cpu.predict(&x, Mode::Eval).unwrap();
    let err = cuda_common::rel_err(b.data(), a.data());
    assert!(err < 1e-5, "{} vs cpu: {err:e}", boxed.backend().describe());
}

/// A backend moves to another thread with its executor (the trainer may run on a worker).
#[test]
fn a_backend_moves_between_threads() {
    let model = ModelBuilder::new(&[2, 3]).dense(2).seed(1).build().unwrap();
    let x = Tensor::new(&[2, 3], vec![0.5, -1.0, 2.0, 0.0, 1.0, -0.5]).unwrap();
    let mut e = Executor::new(&model, Device::Auto.open().unwrap()).unwrap();
    let first = e.predict(&x, Mode::Eval).unwrap();
    let again = std::thread::spawn(move || e.predict(&x, Mode::Eval).unwrap()).join().unwrap();
    assert_eq!(first.data(), again.data());
}
