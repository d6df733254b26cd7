//! The whole step as one plan: a step description compiles into one op list (forward, loss,
//! backward, update) over buffers whose roles and sizes are known before the first step.

use kiln::backend::cpu::CpuBackend;
use kiln::exec::{BufRole, Clip, Executor, LossFn, Mode, OptRule, PlanOptions, Precision, Scoring, StepDesc, Sums};
use kiln::model::ModelBuilder;
use kiln::zoo;

fn step(batch: usize, mode: Mode, update: bool, clip: Option<Clip>) -> StepDesc {
    StepDesc {
        batch,
        mode,
        loss: LossFn::SoftmaxCrossEntropy { label_smoothing: 0.0, class_targets: true },
        scoring: Scoring::ArgMax { top_k: 1 },
        sums: if mode == Mode::Train { Sums::Train } else { Sums::Eval },
        update,
        zero_grads_first: false,
        accumulation: 1,
        clip,
        parallel: None,
        precision: Precision::F32,
        check_finite: None,
        loss_scaling: None,
    }
}

#[test]
fn a_step_plan_holds_the_whole_step_and_its_memory_by_role() {
    let m = zoo::simple_cnn(4).build().unwrap();
    let mut e = Executor::new(&m, CpuBackend::<f32>::new(Some(1)).unwrap()).unwrap();
    assert!(e.step_plan(&step(4, Mode::Train, true, None)).is_err(), "training state first");
    let sgd = OptRule::Sgd { dampening: 0.0, nesterov: false, weight_decay: 0.0 };
    e.init_training(Some(sgd), 0.0).unwrap();
    let id = e.step_plan(&step(4, Mode::Train, true, Some(Clip::Norm(1.0)))).unwrap();
    assert_eq!(e.step_plan(&step(4, Mode::Train, true, Some(Clip::Norm(1.0)))).unwrap(), id, "cached");
    let p = e.plan_info(id).clone();
    // forward, the loss, backward, clipping, the update: nothing else runs in a step.
    assert_eq!(p.step.len(), p.forward.len() + 1 + p.backward.len() + 2);
    assert_eq!(p.step[..p.forward.len()], p.forward[..]);
    assert_eq!(p.step[p.forward.len() + 1..p.forward.len() + 1 + p.backward.len()], p.backward[..]);
    assert!(p.target.is_some());
    // Evaluation shares the network plan of predictions and adds only the loss.
    let ev = e.step_plan(&step(4, Mode::Eval, false, None)).unwrap();
    let pe = e.plan(4, Mode::Eval, PlanOptions::default()).unwrap();
    assert_eq!(e.plan_info(ev).step.len(), e.plan_info(pe).forward.len() + 1);
    assert_eq!(e.plan_info(ev).output, e.plan_info(pe).output);

    let r = e.memory(id);
    let params: usize = m.params().iter().map(|s| s.len()).sum();
    let trainable: usize = m.params().iter().filter(|s| s.trainable).map(|s| s.len()).sum();
    assert_eq!(r.of(BufRole::Parameter), params * 4);
    assert_eq!(r.of(BufRole::OptimizerState), trainable * 4, "SGD keeps one momentum buffer");
    assert_eq!(r.of(BufRole::Gradient), trainable * 4 + p.bytes_of(BufRole::Gradient));
    assert_eq!(r.of(BufRole::Activation), p.bytes_of(BufRole::Activation));
    assert_eq!(r.of(BufRole::Input), 4 * 3 * 32 * 32 * 4 + 4 * 4, "the f32 input and one u32 label per sample");
    assert_eq!(r.of(BufRole::Saved), 0, "no layer of this model saves anything for backward");
    assert!(r.of(BufRole::Scalar) > 0 && r.of(BufRole::Workspace) > 0);
    let text = r.to_string();
    println!("{text}");
    for role in BufRole::ALL {
        assert!(text.contains(role.name()), "{text}");
    }
    assert_eq!(text.lines().count(), BufRole::ALL.len() + 2);
    assert!(text.lines().last().unwrap().contains("total") && text.contains("MiB"));
}

#[test]
fn a_plan_is_allocated_once_after_planning() {
    // What the backend holds after planning is what the report says the plan needs: nothing
    // was allocated for a measuring pass, nothing more is allocated by running.
    let m = ModelBuilder::new(&[6, 3, 8, 8]).conv2d(4, 3).batch_norm().relu().flatten().dense(5).build().unwrap();
    let mut e = Executor::new(&m, CpuBackend::<f32>::new(Some(1)).unwrap()).unwrap();
    let before = e.backend().bytes();
    let id = e.plan(6, Mode::Train, PlanOptions::default()).unwrap();
    assert_eq!(e.backend().bytes() - before, e.plan_info(id).bytes());
    e.set_input(id, &vec![0.5; 6 * 3 * 8 * 8]).unwrap();
    e.forward(id).unwrap();
    e.set_output_grad(id, &[0.1; 30]).unwrap();
    e.backward(id).unwrap();
    assert_eq!(e.backend().bytes() - before, e.plan_info(id).bytes());
}

#[test]
fn planned_buffers_carry_their_dtype_and_memory_is_counted_from_it() {
    use kiln::backend::{Backend, DType};
    use kiln::exec::MemoryReport;
    let m =
        ModelBuilder::new(&[2, 3, 8, 8]).conv2d(4, 3).max_pool2d(2).dropout(0.5).flatten().dense(5).build().unwrap();
    let mut e = Executor::new(&m, CpuBackend::<f32>::new(Some(1)).unwrap()).unwrap();
    let id = e.plan(2, Mode::Train, PlanOptions::default()).unwrap();
    let p = e.plan_info(id).clone();
    assert!(p.buffers.iter().any(|b| b.role == BufRole::Saved), "max pool and dropout save for backward");
    for b in &p.buffers {
        // Allocated with the planned dtype; its bytes are its length times the dtype's size.
        assert_eq!(e.backend().dtype(b.id), b.dtype, "{}", b.label);
        assert_eq!(b.bytes(), b.len * b.dtype.size());
    }
    assert_eq!(p.bytes(), p.buffers.iter().map(|b| b.len * b.dtype.size()).sum::<usize>());
    // The report names each role's dtypes (f32 throughout today) and leaves empty roles bare.
    let text = e.memory(id).to_string();
    let line = |role: BufRole| text.lines().find(|l| l.contains(role.name())).unwrap().to_string();
    for role in [BufRole::Parameter, BufRole::Gradient, BufRole::Activation, BufRole::Saved, BufRole::Input] {
        assert!(line(role).ends_with("MiB  float32"), "{text}");
    }
    assert!(line(BufRole::OptimizerState).ends_with("MiB"), "no optimizer state in a network plan: {text}");

    // Bytes come from each buffer's dtype, not from an assumed f32.
    let r = MemoryReport::new(
        "mixed".into(),
        [
            (BufRole::Activation, DType::BF16, 10),
            (BufRole::Activation, DType::F32, 10),
            (BufRole::Saved, DType::F64, 3),
            (BufRole::Input, DType::I64, 4),
            (BufRole::Activation, DType::BF16, 1),
        ]
        .into_iter(),
    );
    assert_eq!(r.of(BufRole::Activation), 11 * 2 + 10 * 4);
    assert_eq!(r.of(BufRole::Saved), 24);
    assert_eq!(r.of(BufRole::Input), 32);
    assert_eq!(r.total(), 62 + 24 + 32);
    let text = r.to_string();
    assert!(text.lines().any(|l| l.contains("activations") && l.ends_with("bfloat16, float32")), "{text}");
    assert!(text.lines().any(|l| l.contains("saved for backward") && l.ends_with("float64")), "{text}");
}

/// Class targets are a u32 buffer of one label per sample, end to end: planned with that dtype,
/// written with `set_labels` (checked against the number of classes), read by the loss op as
/// labels; value targets stay f32. The wrong setter, a label out of range, or an f32 buffer
/// handed to a class-target loss is an error naming what is wrong, never a panic.
#[test]
fn class_labels_are_u32_end_to_end_and_checked() {
    use kiln::backend::ops::{self, stats};
    use kiln::backend::{Backend, DType, HostSlice, Op};
    let m = ModelBuilder::new(&[3, 4]).dense(5).build().unwrap();
    let mut e = Executor::new(&m, CpuBackend::<f32>::new(Some(1)).unwrap()).unwrap();
    let sgd = OptRule::Sgd { dampening: 0.0, nesterov: false, weight_decay: 0.0 };
    e.init_training(Some(sgd), 0.0).unwrap();
    let id = e.step_plan(&step(3, Mode::Eval, false, None)).unwrap();
    let t = e.plan_info(id).target.unwrap();
    let planned = e.plan_info(id).buffers.iter().find(|b| b.id == t).unwrap().clone();
    assert_eq!((planned.dtype, planned.len, planned.label.as_str()), (DType::U32, 3, "labels"));
    assert_eq!(e.backend().dtype(t), DType::U32);
    e.set_input(id, &[0.1; 12]).unwrap();
    let err = e.set_labels(id, &[0, 5, 1]).unwrap_err().to_string();
    assert!(err.contains("sample 1") && err.contains("class 5") && err.contains("5 outputs"), "{err}");
    let err = e.set_target(id, &[0.0, 1.0, 2.0]).unwrap_err().to_string();
    assert!(err.contains("set_labels"), "{err}");
    e.set_labels(id, &[4, 0]).unwrap(); // a short batch is padded with class 0
    e.set_labels(id, &[4, 0, 2]).unwrap();
    e.set_sums(Sums::Eval, None).unwrap();
    e.run(id).unwrap();
    assert!(e.figures(Sums::Eval, false).unwrap().loss.is_finite());

    // Value targets (MSE) keep an f32 buffer of the output's shape.
    let mut d = step(3, Mode::Eval, false, None);
    (d.loss, d.scoring) = (LossFn::MeanSquaredError, Scoring::None);
    let v = e.step_plan(&d).unwrap();
    let tv = e.plan_info(v).target.unwrap();
    assert_eq!((e.backend().dtype(tv), e.backend().len(tv)), (DType::F32, 15));
    assert!(e.set_labels(v, &[0, 1, 2]).unwrap_err().to_string().contains("set_target"));

    // The backend seam: a class-target loss refuses an f32 target buffer and names a label out
    // of range written past the executor.
    let mut b = CpuBackend::<f32>::new(Some(1)).unwrap();
    let buf = |b: &mut CpuBackend<f32>, len: usize, dtype: DType| b.alloc(len, dtype).unwrap();
    let (pred, st) = (buf(&mut b, 6, DType::F32), buf(&mut b, stats::LEN, DType::F32));
    let (f32_target, labels) = (buf(&mut b, 2, DType::F32), buf(&mut b, 2, DType::U32));
    let op = |target| {
        Op::Loss(ops::Loss {
            f: LossFn::SoftmaxCrossEntropy { label_smoothing: 0.0, class_targets: true },
            scoring: Scoring::ArgMax { top_k: 1 },
            n: 2,
            c: 3,
            pred,
            target,
            stats: st,
            dpred: None,
            grad_scale: 1.0,
        })
    };
    let err = b.run(&[op(f32_target)]).unwrap_err().to_string();
    assert!(err.contains("uint32") && err.contains("float32"), "{err}");
    b.write_host(labels, HostSlice::U32(&[2, 3])).unwrap();
    let err = b.run(&[op(labels)]).unwrap_err().to_string();
    assert!(err.contains("sample 1") && err.contains("class 3") && err.contains("3 outputs"), "{err}");
    b.write_host(labels, HostSlice::U32(&[2, 1])).unwrap();
    b.run(&[op(labels)]).unwrap();
}

/// Activations that backward does not read share buffers by lifetime (exec/compile.rs): a
/// batch norm's output that only its ReLU reads dies in forward (ReLU's backward reads its
/// output), so a later activation takes its buffer; activations backward reads
/// keep their own; an evaluation plan (no backward) needs only a few buffers in turn. What the
/// shared plans compute is checked by the numerical suites (gradcheck's finite differences,
/// train_reference's and torch_parity's PyTorch figures), whose models share buffers this way.
#[test]
fn activations_dead_before_backward_share_buffers() {
    use kiln::backend::Op;
    let m = ModelBuilder::new(&[4, 3, 8, 8])
        .conv2d_with(kiln::model::Conv2d::new(6, 3).padding(1))
        .batch_norm()
        .relu()
        .conv2d_with(kiln::model::Conv2d::new(6, 3).padding(1))
        .batch_norm()
        .relu()
        .flatten()
        .dense(5)
        .seed(3)
        .build()
        .unwrap();
    let mut e = Executor::new(&m, CpuBackend::<f32>::new(Some(1)).unwrap()).unwrap();
    // The plan as lowered: batch norm + ReLU fusion (exec/fuse.rs) would drop the batch norm
    // outputs this test follows.
    e.set_fusion(false).unwrap();
    let id = e.plan(4, Mode::Train, PlanOptions::default()).unwrap();
    let p = e.plan_info(id).clone();
    let bn_out: Vec<_> =
        p.forward.iter().filter_map(|o| if let Op::BatchNormTrain(b) = o { Some(b.y) } else { None }).collect();
    let bn_in: Vec<_> =
        p.forward.iter().filter_map(|o| if let Op::BatchNormTrain(b) = o { Some(b.x) } else { None }).collect();
    assert_eq!(bn_out.len(), 2);
    // The first batch norm's output dies at the ReLU after it; the next activation written
    // (the second convolution's output) takes its buffer.
    let writers = p.forward.iter().filter(|o| o.buffers().iter().any(|u| u.buf == bn_out[0] && u.access.writes()));
    assert_eq!(writers.count(), 2, "the first batch-norm output's buffer is reused");
    assert_ne!(bn_in[0], bn_in[1], "batch norm's inputs are read by its backward: one buffer each");
    for o in &p.backward {
        if let Op::ActBackward(a) = o {
            assert_eq!(a.x, a.y, "ReLU's backward reads its output only");
        }
    }
    // Six activations of 4*6*8*8 values (two convolutions, two batch norms, two ReLUs) and the
    // dense output: one batch-norm buffer is shared.
    let act = |p: &kiln::exec::Plan| p.bytes_of(BufRole::Activation);
    assert_eq!(act(&p), (5 * 4 * 6 * 8 * 8 + 4 * 5) * 4);

    // Evaluation: nothing is kept for backward, so the activations take turns in a few buffers.
    let ev = e.plan(4, Mode::Eval, PlanOptions::default()).unwrap();
    let pe = e.plan_info(ev).clone();
    assert!(act(&pe) <= (2 * 4 * 6 * 8 * 8 + 4 * 5) * 4, "{} bytes", act(&pe));
}
