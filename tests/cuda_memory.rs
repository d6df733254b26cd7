//! Memory and start-up behaviour of the CUDA backend: out-of-memory is an error that leaves the
//! backend usable, host copies through the pinned staging buffers arrive intact however they
//! are interleaved, peak memory is tracked, and a second backend loads its kernels from the
//! disk cache instead of compiling them.

use kiln::Error;
use kiln::backend::cpu::CpuBackend;
use kiln::backend::{Backend, CudaBackend, CudaOptions};
use kiln::exec::{Executor, Mode, PlanOptions};
use kiln::rng::Rng;
use kiln::tensor::Tensor;
use kiln::zoo;

mod cuda_common;
use cuda_common::{cuda, rel_err};

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.uniform_range(-1.0, 1.0)).collect()
}

fn out_of_memory_is_an_error_and_the_backend_stays_usable() {
    let mut gpu = cuda();
    // 4 TiB: far more than any card has.
    let huge = 1usize << 40;
    match gpu.alloc(huge, kiln::backend::DType::F32) {
        Err(Error::OutOfMemory { needed, free, .. }) => {
            assert_eq!(needed, 4 * huge as u64);
            assert!(free > 0 && free < needed, "free {free}");
        }
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
    let small = gpu.alloc(1000, kiln::backend::DType::F32).unwrap();
    let v = random(1000, 1);
    gpu.write(small, &v).unwrap();
    assert_eq!(gpu.read(small).unwrap(), v);

    // A plan too large for the card fails the same way; a small plan on the same executor then
    // works and matches the CPU.
    let model = zoo::mnist_cnn(8).seed(2).build().unwrap();
    let mut e = Executor::new(&model, gpu).unwrap();
    match e.plan(20_000_000, Mode::Train, PlanOptions::default()) {
        Err(Error::OutOfMemory { needed, free, .. }) => assert!(needed > free, "needed {needed}, free {free}"),
        other => panic!("expected OutOfMemory, got {:?}", other.map(|_| ())),
    }
    let x = Tensor::new(&[8, 1, 28, 28], random(8 * 784, 3)).unwrap();
    let y = e.predict(&x, Mode::Eval).unwrap();
    let mut c = Executor::new(&model, CpuBackend::<f32>::new(None).unwrap()).unwrap();
    let err = rel_err(c.predict(&x, Mode::Eval).unwrap().data(), y.data());
    assert!(err < 1e-4, "after OOM the backend still computes correctly: {err:e}");
}

fn staged_writes_arrive_intact() {
    let mut gpu = cuda();
    // 40 MB buffers span ten 4 MiB staging chunks; writes follow one another with no read in
    // between, so a staging buffer reused too early would corrupt the earlier copy.
    let n = 10_000_003;
    let (a, b) = (gpu.alloc(n, kiln::backend::DType::F32).unwrap(), gpu.alloc(n, kiln::backend::DType::F32).unwrap());
    let (va, vb, vc) = (random(n, 1), random(n, 2), random(n, 3));
    gpu.write(a, &va).unwrap();
    gpu.write(b, &vb).unwrap();
    gpu.write(a, &vc).unwrap();
    let small = gpu.alloc(5, kiln::backend::DType::F32).unwrap();
    for i in 0..50 {
        gpu.write(small, &[i as f32; 5]).unwrap();
    }
    assert!(gpu.read(a).unwrap() == vc, "the later write to a wins");
    assert!(gpu.read(b).unwrap() == vb);
    assert_eq!(gpu.read(small).unwrap(), vec![49.0; 5]);
    assert!(gpu.write(small, &[1.0; 4]).is_err(), "a write of the wrong length is refused");
    let peak = gpu.peak_memory().unwrap();
    assert!(peak >= 2 * 4 * n as u64, "peak {peak}");
}

fn counters_round_trip() {
    let mut gpu = cuda();
    let ids: Vec<_> = (0..600).map(|_| gpu.new_counter().unwrap()).collect();
    for (i, &c) in ids.iter().enumerate() {
        assert_eq!(gpu.counter(c).unwrap(), 0);
        gpu.set_counter(c, (i as u64) << 33 | 7).unwrap();
    }
    for (i, &c) in ids.iter().enumerate() {
        assert_eq!(gpu.counter(c).unwrap(), (i as u64) << 33 | 7);
    }
}

fn second_backend_compiles_nothing() {
    let dir = std::env::temp_dir().join(format!("kiln-nvrtc-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = CudaOptions { cache_dir: Some(dir.clone()), ..Default::default() };
    let first = CudaBackend::with_options(0, opts.clone()).unwrap();
    let compiled = first.nvrtc_compiles();
    drop(first);
    let mut second = CudaBackend::with_options(0, opts).unwrap();
    let cached = std::fs::read_dir(&dir).unwrap().count();
    // The second backend's kernels work.
    let b = second.alloc(10, kiln::backend::DType::F32).unwrap();
    second.run(&[kiln::backend::Op::Fill(kiln::backend::ops::Fill { len: 10, buf: b, value: 2.5 })]).unwrap();
    assert_eq!(second.read(b).unwrap(), vec![2.5; 10]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(compiled > 0, "a fresh cache folder means compiling");
    assert_eq!(cached, compiled, "one cache file per compiled module");
    assert_eq!(second.nvrtc_compiles(), 0, "the second backend loaded every module from the cache");
    println!("nvrtc: first backend compiled {compiled} modules, second compiled 0");
}

/// Buffers of every dtype can be allocated and copied on the GPU: integers and f64 round-trip
/// exactly, f32 values written into bf16/f16 buffers come back rounded as the `half` crate
/// rounds them, a read asks for a dtype the buffer can give, and an op refuses a buffer of a
/// dtype it does not compute with.
fn typed_buffers_round_trip_and_ops_refuse_other_dtypes() {
    use kiln::backend::{DType, HostSlice, HostVec, Op, ops};
    let mut gpu = cuda();
    let u = gpu.alloc(3, DType::U32).unwrap();
    gpu.write_host(u, HostSlice::U32(&[1, 7, u32::MAX])).unwrap();
    assert_eq!(gpu.read_host(u, DType::U32).unwrap(), HostVec::U32(vec![1, 7, u32::MAX]));
    assert!(gpu.read(u).is_err(), "an integer buffer read as f32");
    assert!(gpu.write(u, &[1.0, 2.0, 3.0]).is_err(), "f32 values written into an integer buffer");
    let i = gpu.alloc(2, DType::I64).unwrap();
    gpu.write_host(i, HostSlice::I64(&[-5, i64::MAX])).unwrap();
    assert_eq!(gpu.read_host(i, DType::I64).unwrap(), HostVec::I64(vec![-5, i64::MAX]));
    let d = gpu.alloc(2, DType::F64).unwrap();
    gpu.write_f64(d, &[0.1, -1e300]).unwrap();
    assert_eq!(gpu.read_f64(d).unwrap(), [0.1, -1e300]);
    let v = [1.0f32, -2.5, 3.0e-3, 65504.0];
    for dt in [DType::BF16, DType::F16] {
        let h = gpu.alloc(4, dt).unwrap();
        assert_eq!(gpu.dtype(h), dt);
        gpu.write(h, &v).unwrap();
        let want = HostSlice::F32(&v).convert(dt).unwrap().into_f32().unwrap();
        assert_eq!(gpu.read(h).unwrap(), want, "{dt}");
        let f = gpu.alloc(4, DType::F32).unwrap();
        let err =
            gpu.run(&[Op::GradInto(ops::GradInto { len: 4, src: h, dst: ops::GradOut { buf: f, accumulate: false } })]);
        assert!(err.is_err(), "an op read a {dt} buffer");
    }
}

tests! {
    gpu: [
        out_of_memory_is_an_error_and_the_backend_stays_usable,
        staged_writes_arrive_intact,
        counters_round_trip,
        second_backend_compiles_nothing,
        typed_buffers_round_trip_and_ops_refuse_other_dtypes,
    ],
}
