//! The half-precision corpus harness tests/cuda_bf16.rs and tests/cuda_f16.rs share: a plan of a
//! given precision and every tensor a few training passes produce, as tests/parity.rs's `step`.

use kiln::backend::Backend;
use kiln::exec::{Executor, Lowering, Mode, PlanOptions, Precision};
use kiln::model::Model;
use kiln::rng::Rng;

pub fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.uniform_range(-1.0, 1.0)).collect()
}

/// A network plan of `precision` for `batch` samples in `mode`.
pub fn plan<B: Backend>(
    e: &mut Executor<B>,
    batch: usize,
    mode: Mode,
    options: PlanOptions,
    precision: Precision,
) -> kiln::exec::PlanId {
    let low = Lowering { options, precision, ..e.lowering(batch, mode) };
    e.plan_for(low).unwrap()
}

/// Every tensor a training pass produces, by name, after `steps` forward+backward passes of
/// `precision` (as tests/parity.rs's `step`), then the evaluation output.
pub fn pass<B: Backend>(
    e: &mut Executor<B>,
    model: &Model,
    opts: PlanOptions,
    steps: usize,
    precision: Precision,
) -> Vec<(String, Vec<f32>)> {
    let batch = model.batch_size();
    let p = plan(e, batch, Mode::Train, opts, precision);
    let x = random(e.backend().len(e.plan_info(p).input), 11);
    let r = random(e.backend().len(e.plan_info(p).output), 99);
    for _ in 0..steps {
        e.set_input(p, &x).unwrap();
        e.forward(p).unwrap();
        e.set_output_grad(p, &r).unwrap();
        e.backward(p).unwrap();
    }
    let mut out = vec![("output".to_string(), e.read_output(p).unwrap())];
    if opts.input_grad {
        out.push(("input.grad".into(), e.read_input_grad(p).unwrap()));
    }
    for spec in model.params() {
        if spec.trainable {
            out.push((format!("{}.grad", spec.name), e.read_param_grad(&spec.name).unwrap()));
        }
        out.push((spec.name.clone(), e.read_param(&spec.name).unwrap()));
    }
    let pe = plan(e, batch, Mode::Eval, PlanOptions::default(), precision);
    e.set_input(pe, &x).unwrap();
    e.forward(pe).unwrap();
    out.push(("eval output".into(), e.read_output(pe).unwrap()));
    out
}
