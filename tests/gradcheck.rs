//! Gradient checks for every layer and option of the shared corpus (tests/corpus) on the CPU
//! backend, one test per case (`cargo test --test gradcheck batch_norm`).
//!
//! For each small model: the loss `L = sum(r * y)` with fixed random `r`; the analytic gradients
//! (backward in f64) of every parameter and of the input are compared with central finite
//! differences in f64, then the f32 path (forward output and every gradient) is compared with
//! the f64 reference.

use kiln::backend::Backend;
use kiln::backend::cpu::CpuBackend;
use kiln::exec::{Executor, Mode, PlanId, PlanOptions};
use kiln::model::{Model, ModelBuilder};
use kiln::rng::Rng;
use libtest_mimic::{Arguments, Trial};

mod corpus;

const EPS: f64 = 1e-6;

struct Case {
    exec: Executor<CpuBackend<f64>>,
    plan: PlanId,
    r: Vec<f64>,
}

fn reset_dropout<B: Backend>(exec: &mut Executor<B>) {
    for i in 0..exec.model().nodes().len() {
        if let Some(c) = exec.dropout_counter(i) {
            exec.backend_mut().set_counter(c, 0).unwrap();
        }
    }
}

impl Case {
    fn loss(&mut self) -> f64 {
        reset_dropout(&mut self.exec);
        self.exec.forward(self.plan).unwrap();
        let out = self.exec.plan_info(self.plan).output;
        let y = self.exec.backend_mut().read_f64(out).unwrap();
        y.iter().zip(&self.r).map(|(a, b)| a * b).sum()
    }
}

fn input_for(model: &Model, seed: u64) -> Vec<f32> {
    let n: usize = model.input_shape().iter().product();
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.uniform_range(-1.0, 1.0)).collect()
}

/// Picks up to `k` distinct indices of `0..n`.
fn sample(n: usize, k: usize, rng: &mut Rng) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut idx);
    idx.truncate(k);
    idx
}

fn close(analytic: f64, numeric: f64, tol: f64) -> bool {
    (analytic - numeric).abs() <= tol * (1.0 + analytic.abs().max(numeric.abs()))
}

/// Finite differences in f64 against backward in f64 (within `tol`), then f32 against f64.
fn check_with(builder: ModelBuilder, tol: f64) {
    let model = builder.seed(3).build().expect("model builds");
    let batch = model.batch_size();
    let x = input_for(&model, 11);
    let opts = PlanOptions { input_grad: true, accumulate_param_grads: false };

    // f64 analytic gradients.
    let mut exec = Executor::new(&model, CpuBackend::<f64>::new(Some(2)).unwrap()).unwrap();
    let plan = exec.plan(batch, Mode::Train, opts).unwrap();
    exec.set_input(plan, &x).unwrap();
    let out_len = exec.backend().len(exec.plan_info(plan).output);
    let mut rng = Rng::new(99);
    let r: Vec<f64> = (0..out_len).map(|_| rng.uniform_range(-1.0, 1.0) as f64).collect();
    let mut case = Case { exec, plan, r: r.clone() };
    case.loss();
    let og = case.exec.plan_info(plan).output_grad.unwrap();
    case.exec.backend_mut().write_f64(og, &r).unwrap();
    case.exec.backward(plan).unwrap();

    // Tensors to check: every trainable parameter, and the input.
    let mut targets: Vec<(String, kiln::backend::BufId, kiln::backend::BufId)> = Vec::new();
    for (spec, bufs) in model.params().iter().zip(case.exec.param_buffers()) {
        if let Some(g) = bufs.grad {
            targets.push((spec.name.clone(), bufs.value, g));
        }
    }
    let p = case.exec.plan_info(plan);
    targets.push(("input".into(), p.input, p.input_grad.unwrap()));

    let mut pick = Rng::new(5);
    for (name, value, grad) in &targets {
        let analytic = case.exec.backend_mut().read_f64(*grad).unwrap();
        let base = case.exec.backend_mut().read_f64(*value).unwrap();
        for i in sample(base.len(), 12, &mut pick) {
            let mut v = base.clone();
            v[i] = base[i] + EPS;
            case.exec.backend_mut().write_f64(*value, &v).unwrap();
            let lp = case.loss();
            v[i] = base[i] - EPS;
            case.exec.backend_mut().write_f64(*value, &v).unwrap();
            let lm = case.loss();
            case.exec.backend_mut().write_f64(*value, &base).unwrap();
            let numeric = (lp - lm) / (2.0 * EPS);
            assert!(
                close(analytic[i], numeric, tol),
                "{name}[{i}]: analytic {} vs finite difference {numeric}",
                analytic[i]
            );
        }
    }

    // The f32 path against the f64 reference, on the same weights and input.
    let mut e32 = Executor::new(&model, CpuBackend::<f32>::new(Some(2)).unwrap()).unwrap();
    let p32 = e32.plan(batch, Mode::Train, opts).unwrap();
    e32.set_input(p32, &x).unwrap();
    reset_dropout(&mut e32);
    e32.forward(p32).unwrap();
    let r32: Vec<f32> = r.iter().map(|&v| v as f32).collect();
    e32.set_output_grad(p32, &r32).unwrap();
    e32.backward(p32).unwrap();
    // Re-run the f64 reference once more at the unperturbed point.
    case.loss();
    case.exec.backend_mut().write_f64(og, &r).unwrap();
    case.exec.backward(plan).unwrap();
    let (o64, o32) = (case.exec.plan_info(plan).output, e32.plan_info(p32).output);
    let mut pairs = vec![("output".to_string(), o64, o32)];
    for (k, (spec, b64)) in model.params().iter().zip(case.exec.param_buffers()).enumerate() {
        if let Some(g) = b64.grad {
            pairs.push((format!("{}.grad", spec.name), g, e32.param_buffers()[k].grad.unwrap()));
        }
        if spec.trainable {
            // Running statistics are left out: the f64 executor ran many more forward passes.
            pairs.push((spec.name.clone(), b64.value, e32.param_buffers()[k].value));
        }
    }
    pairs.push((
        "input.grad".into(),
        case.exec.plan_info(plan).input_grad.unwrap(),
        e32.plan_info(p32).input_grad.unwrap(),
    ));
    for (name, a, b) in pairs {
        let reference = case.exec.backend_mut().read_f64(a).unwrap();
        let got = e32.backend_mut().read(b).unwrap();
        let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3);
        for (i, (r, g)) in reference.iter().zip(&got).enumerate() {
            assert!((r - *g as f64).abs() <= 1e-4 * scale + 1e-6, "f32 vs f64 {name}[{i}]: {g} vs {r} (scale {scale})");
        }
    }
}

fn main() {
    let trials = corpus::cases()
        .into_iter()
        .filter_map(|case| {
            let tol = case.gradcheck?;
            Some(Trial::test(case.name, move || {
                check_with((case.build)(), tol);
                Ok(())
            }))
        })
        .collect();
    libtest_mimic::run(&Arguments::from_args(), trials).exit()
}
