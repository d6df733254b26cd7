//! CUDA graphs and dropout on the GPU: a replayed graph computes bit for bit what eager
//! execution of the same ops computes; dropout masks are the CPU's for the same seed and step;
//! the counters that number the steps live on the device and advance under replay; and the
//! device's Philox is the Rust one.

use kiln::backend::cpu::CpuBackend;
use kiln::backend::{Backend, BufId, CudaBackend, Op, ops};
use kiln::exec::{BufRole, Executor, Mode, PlanId, PlanOptions};
use kiln::model::{Conv2d, Model, ModelBuilder, ParamRole};
use kiln::rng::{Rng, philox4x32};
use kiln::zoo;

mod cuda_common;
use cuda_common::cuda;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.uniform_range(-1.0, 1.0)).collect()
}

/// Puts a training plan back at its starting point: input, output gradient, dropout counters
/// and running statistics, so every run computes the same thing.
fn reset(e: &mut Executor<CudaBackend>, model: &Model, p: PlanId, x: &[f32], r: &[f32]) {
    e.set_input(p, x).unwrap();
    e.set_output_grad(p, r).unwrap();
    for i in 0..model.nodes().len() {
        if let Some(c) = e.dropout_counter(i) {
            e.backend_mut().set_counter(c, 0).unwrap();
        }
    }
    for spec in model.params() {
        match spec.role {
            ParamRole::RunningMean => e.write_param(&spec.name, &vec![0.0; spec.len()]).unwrap(),
            ParamRole::RunningVar => e.write_param(&spec.name, &vec![1.0; spec.len()]).unwrap(),
            _ => {}
        }
    }
}

/// Every buffer of the plan and every parameter, as raw bits.
fn snapshot(e: &mut Executor<CudaBackend>, p: PlanId) -> Vec<(String, Vec<u32>)> {
    let mut bufs: Vec<(String, BufId)> =
        e.plan_info(p).buffers.iter().filter(|b| b.role != BufRole::Input).map(|b| (b.label.clone(), b.id)).collect();
    for (k, pb) in e.param_buffers().to_vec().into_iter().enumerate() {
        bufs.push((format!("param {k}"), pb.value));
        if let Some(g) = pb.grad {
            bufs.push((format!("param {k} grad"), g));
        }
    }
    bufs.into_iter().map(|(l, b)| (l, e.backend_mut().read(b).unwrap().iter().map(|v| v.to_bits()).collect())).collect()
}

fn graph_equals_eager(name: &str, model: Model) {
    let gpu = cuda();
    let batch = model.batch_size();
    let mut e = Executor::new(&model, gpu).unwrap();
    let p = e.plan(batch, Mode::Train, PlanOptions { input_grad: true, accumulate_param_grads: false }).unwrap();
    let info = e.plan_info(p).clone();
    let ops: Vec<Op> = info.forward.iter().chain(&info.backward).cloned().collect();
    let x = random(e.backend().len(info.input), 1);
    let r = random(e.backend().len(info.output), 2);

    reset(&mut e, &model, p, &x, &r);
    e.backend_mut().run(&ops).unwrap();
    let eager = snapshot(&mut e, p);
    // Warm-up (eager), capture + first launch, then two replays.
    for round in 0..4 {
        reset(&mut e, &model, p, &x, &r);
        e.backend_mut().run_cached(0xC0FFEE, &ops).unwrap();
        let got = snapshot(&mut e, p);
        for ((label, a), (_, b)) in eager.iter().zip(&got) {
            assert!(a == b, "{name}: round {round}: buffer {label} differs between eager and graph execution");
        }
    }
    println!("graph {name}: {} ops, {} buffers bit-identical to eager over 4 rounds", ops.len(), eager.len());
}

fn graph_replay_is_bit_identical_to_eager() {
    let mixed = ModelBuilder::new(&[8, 3, 16, 16])
        .conv2d_with(Conv2d::new(8, 3).padding(1))
        .batch_norm()
        .relu()
        .max_pool2d(2)
        .residual(|m| m.conv2d_with(Conv2d::new(8, 3).padding(1)).gelu())
        .dropout(0.2)
        .global_avg_pool()
        .dense(5)
        .softmax(1)
        .seed(5)
        .build()
        .unwrap();
    graph_equals_eager("mixed", mixed);
    graph_equals_eager("resnet18", zoo::resnet18(8, 10).seed(5).build().unwrap());
    graph_equals_eager("inception", zoo::inception_block(2, 10).seed(5).build().unwrap());
}

fn dropout_masks_match_the_cpu_and_counters_advance_under_replay() {
    let gpu = cuda();
    let model = ModelBuilder::new(&[64, 1001]).dropout(0.3).seed(17).build().unwrap();
    let mut g = Executor::new(&model, gpu).unwrap();
    let mut c = Executor::new(&model, CpuBackend::<f32>::new(None).unwrap()).unwrap();
    let (pg, pc) = (
        g.plan(64, Mode::Train, PlanOptions::default()).unwrap(),
        c.plan(64, Mode::Train, PlanOptions::default()).unwrap(),
    );
    let mask = |e: &kiln::exec::Plan| e.buffers.iter().find(|b| b.label.ends_with(".mask")).unwrap().id;
    let (mg, mc) = (mask(g.plan_info(pg)), mask(c.plan_info(pc)));
    let x = random(64 * 1001, 3);
    g.set_input(pg, &x).unwrap();
    c.set_input(pc, &x).unwrap();
    let fwd = g.plan_info(pg).forward.clone();
    let counter = g.dropout_counter(1).unwrap();
    let mut previous: Option<Vec<f32>> = None;
    for step in 0..5u64 {
        // Step 0 warms up, 1 captures, 2.. replay the graph.
        g.backend_mut().run_cached(42, &fwd).unwrap();
        c.forward(pc).unwrap();
        assert_eq!(g.backend_mut().counter(counter).unwrap(), step + 1, "the device counter advanced");
        let (yg, yc) = (g.read_output(pg).unwrap(), c.read_output(pc).unwrap());
        let (kg, kc) = (g.backend_mut().read(mg).unwrap(), c.backend_mut().read(mc).unwrap());
        assert!(kg == kc, "step {step}: the GPU's mask differs from the CPU's");
        assert!(yg == yc, "step {step}: the GPU's output differs from the CPU's");
        let dropped = kg.iter().filter(|&&m| m == 0.0).count() as f64 / kg.len() as f64;
        assert!((dropped - 0.3).abs() < 0.01, "step {step}: dropped fraction {dropped}");
        assert!(previous.as_ref() != Some(&kg), "step {step}: a new mask every step");
        previous = Some(kg);
    }
    // Setting the counter back replays the masks of earlier steps.
    g.backend_mut().set_counter(counter, 1).unwrap();
    g.backend_mut().run_cached(42, &fwd).unwrap();
    let cpu_counter = c.dropout_counter(1).unwrap();
    c.backend_mut().set_counter(cpu_counter, 1).unwrap();
    c.forward(pc).unwrap();
    assert!(g.read_output(pg).unwrap() == c.read_output(pc).unwrap(), "set_counter rewinds the device counter");
    println!(
        "dropout: 6 steps, masks identical to the CPU's, device counter at {}",
        g.backend_mut().counter(counter).unwrap()
    );
}

fn device_philox_is_the_rust_philox() {
    let mut gpu = cuda();
    // The Random123 known-answer vectors, then random counters under random keys.
    let kat = [
        ([0u32; 4], [0u32; 2]),
        ([u32::MAX; 4], [u32::MAX; 2]),
        ([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
    ];
    for (ctr, key) in kat {
        assert_eq!(gpu.philox4x32_on_device(&[ctr], key).unwrap()[0], philox4x32(ctr, key));
    }
    let mut r = Rng::new(8);
    for _ in 0..4 {
        let key = [r.next_u32(), r.next_u32()];
        let ctrs: Vec<[u32; 4]> =
            (0..10_000).map(|_| [r.next_u32(), r.next_u32(), r.next_u32(), r.next_u32()]).collect();
        let got = gpu.philox4x32_on_device(&ctrs, key).unwrap();
        for (c, g) in ctrs.iter().zip(&got) {
            assert_eq!(*g, philox4x32(*c, key), "counter {c:?} key {key:?}");
        }
    }
}

fn a_changed_op_list_under_one_key_starts_over() {
    let mut gpu = cuda();
    let a = gpu.alloc(1000, kiln::backend::DType::F32).unwrap();
    let fill = |v: f32| vec![Op::Fill(ops::Fill { len: 1000, buf: a, value: v })];
    for _ in 0..3 {
        gpu.run_cached(9, &fill(1.5)).unwrap();
    }
    assert!(gpu.read(a).unwrap().iter().all(|&v| v == 1.5));
    gpu.run_cached(9, &fill(-2.0)).unwrap();
    assert!(gpu.read(a).unwrap().iter().all(|&v| v == -2.0), "the new list ran, not the old graph");
    gpu.run_cached(9, &fill(3.0)).unwrap();
    gpu.run_cached(9, &fill(3.0)).unwrap();
    assert!(gpu.read(a).unwrap().iter().all(|&v| v == 3.0));
}

/// Predictions and evaluation steps replay CUDA graphs keyed by their plans, and a replay gives
/// the warm-up's numbers bit for bit.
fn predictions_and_evaluation_replay_graphs() {
    use kiln::exec::{LossFn, Precision, Scoring, StepDesc, Sums};
    use kiln::tensor::Tensor;
    let gpu = cuda();
    let model = zoo::simple_cnn(4).seed(3).build().unwrap();
    let mut e = Executor::new(&model, gpu).unwrap();
    let x = Tensor::new(&[4, 3, 32, 32], random(4 * 3 * 32 * 32, 2)).unwrap();
    let graphs = e.backend().graph_count();
    let first = e.predict(&x, Mode::Eval).unwrap(); // warm-up, eager
    assert_eq!(e.backend().graph_count(), graphs);
    let second = e.predict(&x, Mode::Eval).unwrap(); // captured and launched
    let third = e.predict(&x, Mode::Eval).unwrap(); // replayed
    assert_eq!(e.backend().graph_count(), graphs + 1, "the prediction plan runs as a graph");
    let bits = |t: &Tensor| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&first), bits(&second));
    assert_eq!(bits(&first), bits(&third));

    e.init_training(None, 0.0).unwrap();
    let desc = StepDesc {
        batch: 4,
        mode: Mode::Eval,
        loss: LossFn::SoftmaxCrossEntropy { label_smoothing: 0.0, class_targets: true },
        scoring: Scoring::ArgMax { top_k: 1 },
        sums: Sums::Eval,
        update: false,
        zero_grads_first: false,
        accumulation: 1,
        clip: None,
        parallel: None,
        precision: Precision::F32,
        check_finite: None,
        loss_scaling: None,
    };
    let id = e.step_plan(&desc).unwrap();
    e.set_input(id, x.data()).unwrap();
    e.set_labels(id, &[0, 1, 2, 3]).unwrap();
    e.set_sums(Sums::Eval, None).unwrap();
    for _ in 0..3 {
        e.run(id).unwrap();
    }
    assert_eq!(e.backend().graph_count(), graphs + 2, "the evaluation step runs as a graph");
    let f = e.figures(Sums::Eval, false).unwrap();
    assert_eq!(f.samples, 12.0);
    assert!((f.sum_loss - 12.0 * f.loss).abs() <= 1e-5 * f.sum_loss.abs(), "three identical batches: {f:?}");
}

tests! {
    gpu: [
        graph_replay_is_bit_identical_to_eager,
        dropout_masks_match_the_cpu_and_counters_advance_under_replay,
        device_philox_is_the_rust_philox,
        a_changed_op_list_under_one_key_starts_over,
        predictions_and_evaluation_replay_graphs,
    ],
}
