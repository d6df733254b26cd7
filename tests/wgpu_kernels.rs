//! The wgpu backend's kernel choices against the CPU reference: every matrix-product tile (each
//! forced in turn, where the backend would pick one per shape) on convolutions (strided, padded,
//! grouped, transposed) and dense layers whose sizes leave ragged tiles and split the depth, and
//! the reductions (batch norm over several segments per channel, group norm, bias gradients)
//! with subgroup operations and with the workgroup-memory fallback. A training step's output,
//! input gradient and every parameter gradient (and the running statistics) within the corpus
//! tolerance (1e-4 of the largest magnitude) of the CPU's.
//!
//! Ignored where this build has no `wgpu` feature or wgpu finds no adapter (see wgpu_common).

mod cuda_common;
mod wgpu_common;

#[cfg(feature = "wgpu")]
mod on_wgpu {
    use crate::cuda_common::{rel_err, within};
    use crate::wgpu_common::{adapter, wgpu_trial};
    use kiln::backend::Backend;
    use kiln::backend::cpu::CpuBackend;
    use kiln::backend::wgpu::WgpuBackend;
    use kiln::exec::{Executor, Mode, PlanOptions};
    use kiln::model::{Conv2d, ConvTranspose2d, ModelBuilder};
    use kiln::rng::Rng;
    use libtest_mimic::Trial;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| r.uniform_range(-1.0, 1.0)).collect()
    }

    /// Output, input gradient, then every parameter's gradient and value after one training step.
    fn step<B: Backend>(e: &mut Executor<B>, model: &kiln::model::Model) -> Vec<(String, Vec<f32>)> {
        let p =
            e.plan(model.batch_size(), Mode::Train, PlanOptions { input_grad: true, ..Default::default() }).unwrap();
        let x = random(e.backend().len(e.plan_info(p).input), 5);
        let r = random(e.backend().len(e.plan_info(p).output), 6);
        e.set_input(p, &x).unwrap();
        e.forward(p).unwrap();
        e.set_output_grad(p, &r).unwrap();
        e.backward(p).unwrap();
        let mut out = vec![("output".to_string(), e.read_output(p).unwrap())];
        out.push(("input.grad".into(), e.read_input_grad(p).unwrap()));
        for spec in model.params() {
            if spec.trainable {
                out.push((format!("{}.grad", spec.name), e.read_param_grad(&spec.name).unwrap()));
            }
            out.push((spec.name.clone(), e.read_param(&spec.name).unwrap()));
        }
        out
    }

    /// `builder`'s training step on `gpu` against the CPU, within 1e-4; returns the worst error.
    fn compare(what: &str, builder: ModelBuilder, gpu: WgpuBackend) -> f64 {
        let model = builder.seed(7).build().expect("model builds");
        let want = step(&mut Executor::new(&model, CpuBackend::<f32>::new(None).unwrap()).unwrap(), &model);
        let got = step(&mut Executor::new(&model, gpu).unwrap(), &model);
        let mut worst = 0f64;
        for ((name, r), (_, v)) in want.iter().zip(&got) {
            let err = rel_err(r, v);
            assert!(within(r, v, 1e-4), "{what}: {name} differs from the CPU by {err:e} of its largest value");
            worst = worst.max(err);
        }
        println!("{what:<40} max rel err {worst:.2e}");
        worst
    }

    fn open() -> WgpuBackend {
        WgpuBackend::new(adapter()).unwrap_or_else(|e| panic!("the wgpu backend is unusable: {e}"))
    }

    /// Convolutions and dense layers with sizes that leave every tile ragged (40, 24 and 12
    /// rows; 144, 36 and 100 pixels per image, side by side over a batch of 3), a strided grouped
    /// convolution, a transposed one, and a depth that splits (a 1200-wide dense layer over a
    /// batch of 3).
    fn gemm_model() -> ModelBuilder {
        ModelBuilder::new(&[3, 6, 12, 12])
            .conv2d_with(Conv2d::new(40, 3).padding(1))
            .relu()
            .conv2d_with(Conv2d::new(24, 3).stride(2).padding(1).groups(2))
            .tanh()
            .conv_transpose2d_with(ConvTranspose2d::new(8, 3).stride(2).padding(1).output_padding(1))
            .conv2d_with(Conv2d::new(12, 5).padding(1).bias(false))
            .flatten()
            .dense(70)
            .relu()
            .dense(5)
    }

    fn tile_matches_the_cpu(tile: String) {
        let mut gpu = open();
        gpu.force_gemm_tile(Some(&tile)).unwrap();
        compare(&format!("tile {tile}"), gemm_model(), gpu);
    }

    /// Batch norm whose channels hold 16 x 18 x 18 = 5184 values (two segments each), group norm,
    /// and biases (per-channel sums) after them.
    fn norm_model() -> ModelBuilder {
        ModelBuilder::new(&[16, 4, 20, 20])
            .conv2d_with(Conv2d::new(8, 3).bias(false))
            .batch_norm()
            .relu()
            .conv2d(6, 3)
            .group_norm(3)
            .flatten()
            .dense(4)
    }

    fn reductions_match_the_cpu(subgroups: bool) {
        let mut gpu = open();
        let on = gpu.use_subgroups(subgroups);
        assert!(subgroups || !on, "subgroups stayed on after being turned off");
        let how = if on { "subgroups" } else { "workgroup memory" };
        compare(&format!("norms, reductions through {how}"), norm_model(), gpu);
    }

    /// Batch norm with each activation it fuses (`exec/fuse.rs`: the plans hold the fused ops),
    /// over images (two segments per channel) and over features: a training step and an
    /// evaluation prediction against the CPU (whose fused ops equal the unfused ones bit for
    /// bit, tests/fusion.rs). The convolutions before batch norm have no bias (a bias there
    /// gets a gradient of about 0, all cancellation, which no relative bound compares).
    fn fused_batch_norm_matches_the_cpu() {
        let model = || {
            ModelBuilder::new(&[16, 4, 20, 20])
                .conv2d_with(Conv2d::new(6, 3).bias(false))
                .batch_norm()
                .relu()
                .conv2d_with(Conv2d::new(6, 3).bias(false))
                .batch_norm()
                .leaky_relu(0.1)
                .conv2d_with(Conv2d::new(5, 3).bias(false))
                .batch_norm()
                .elu(1.0)
                .conv2d_with(Conv2d::new(4, 3).stride(2).bias(false))
                .batch_norm()
                .sigmoid()
                .flatten()
                .dense(10)
                .batch_norm()
                .tanh()
                .dense(3)
        };
        let built = model().seed(7).build().unwrap();
        let mut gpu = Executor::new(&built, open()).unwrap();
        let p = gpu.plan(16, Mode::Train, PlanOptions::default()).unwrap();
        let fused = gpu
            .plan_info(p)
            .forward
            .iter()
            .filter(|o| matches!(o, kiln::backend::Op::BatchNormTrain(b) if b.act.is_some()))
            .count();
        assert_eq!(fused, 5, "every batch norm carries its activation");
        compare("fused batch norm + activations", model(), open());
        let x = kiln::tensor::Tensor::new(&[16, 4, 20, 20], random(16 * 4 * 400, 9)).unwrap();
        let want = Executor::new(&built, CpuBackend::<f32>::new(None).unwrap()).unwrap().predict(&x, Mode::Eval);
        let got = gpu.predict(&x, Mode::Eval).unwrap();
        let (w, g) = (want.unwrap().data().to_vec(), got.data().to_vec());
        assert!(within(&w, &g, 1e-4), "evaluation: {:e} of the largest value", rel_err(&w, &g));
    }

    /// An unknown tile is an error naming the tiles there are.
    fn unknown_tile_is_an_error() {
        let err = open().force_gemm_tile(Some("48x48")).unwrap_err().to_string();
        assert!(err.contains("48x48") && err.contains("128x128"), "{err}");
    }

    pub fn trials() -> Vec<Trial> {
        let mut t: Vec<Trial> = WgpuBackend::gemm_tiles()
            .into_iter()
            .map(|tile| wgpu_trial(&format!("tile_{tile}_matches_the_cpu"), move || tile_matches_the_cpu(tile)))
            .collect();
        t.push(wgpu_trial("reductions_with_subgroups_match_the_cpu", || reductions_match_the_cpu(true)));
        t.push(wgpu_trial("reductions_without_subgroups_match_the_cpu", || reductions_match_the_cpu(false)));
        t.push(wgpu_trial("fused_batch_norm_matches_the_cpu", fused_batch_norm_matches_the_cpu));
        t.push(wgpu_trial("unknown_tile_is_an_error", unknown_tile_is_an_error));
        t
    }
}

fn main() {
    #[cfg(feature = "wgpu")]
    let trials = on_wgpu::trials();
    #[cfg(not(feature = "wgpu"))]
    let trials = Vec::new();
    wgpu_common::run_trials(trials)
}
