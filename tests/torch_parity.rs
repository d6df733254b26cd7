//! The CPU backend against PyTorch, layer by layer: forward output, input gradient, parameter
//! gradients and batch-norm running statistics after one training step, in f64.
//!
//! The expected numbers are in tests/fixtures/torch_layers.json, written by
//! tests/fixtures/torch_layers.py (PyTorch on the CPU, float64); the inputs are formulas that
//! both sides compute (see the script).

use kiln::backend::Backend;
use kiln::backend::cpu::CpuBackend;
use kiln::exec::{Executor, Mode, PlanOptions};
use kiln::model::{BatchNorm, Conv2d, ConvTranspose2d, GroupNorm, ModelBuilder, Pool2d};
use serde_json::Value;

fn builder(name: &str) -> ModelBuilder {
    let img = |s: [usize; 4]| ModelBuilder::new(&s);
    match name {
        "conv_basic" => img([2, 3, 5, 5]).conv2d(4, 3),
        "conv_stride_pad" => img([2, 3, 7, 6]).conv2d_with(Conv2d::new(4, 3).stride(2).padding(1)),
        "conv_same_dilated" => img([2, 2, 7, 7]).conv2d_with(Conv2d::new(3, 3).padding("same").dilation(2)),
        "conv_groups" => img([2, 4, 5, 5]).conv2d_with(Conv2d::new(6, 3).padding(1).groups(2)),
        "conv_depthwise_rect" => img([2, 3, 6, 7])
            .conv2d_with(Conv2d::new(3, 2).kernel_hw(2, 3).stride_hw(2, 1).padding((1, 0)).groups(3).bias(false)),
        "conv_pointwise" => img([2, 4, 3, 3]).conv2d(5, 1),
        "conv_transpose_basic" => img([2, 3, 4, 4]).conv_transpose2d(4, 3),
        "conv_transpose_stride_pad_outpad" => {
            img([2, 3, 4, 5]).conv_transpose2d_with(ConvTranspose2d::new(4, 3).stride(2).padding(1).output_padding(1))
        }
        "conv_transpose_dilated_groups" => img([2, 4, 3, 4]).conv_transpose2d_with(
            ConvTranspose2d::new(6, 3).stride(2).padding(2).output_padding(1).dilation(2).groups(2),
        ),
        "conv_transpose_rect_no_bias" => img([2, 2, 3, 4]).conv_transpose2d_with(
            ConvTranspose2d::new(3, 2)
                .kernel_hw(2, 3)
                .stride_hw(3, 1)
                .padding_hw(1, 0)
                .output_padding_hw(2, 0)
                .dilation_hw(1, 2)
                .bias(false),
        ),
        "conv_transpose_outpad_past_stride" => {
            img([2, 2, 3, 3]).conv_transpose2d_with(ConvTranspose2d::new(3, 2).padding(1).output_padding(2).dilation(3))
        }
        "linear" => ModelBuilder::new(&[3, 7]).dense(4),
        "linear_flatten" => img([2, 2, 3, 3]).flatten().dense(5),
        "relu" => img([2, 3, 4, 4]).relu(),
        "leaky_relu" => img([2, 3, 4, 4]).leaky_relu(0.1),
        "elu" => img([2, 3, 4, 4]).elu(0.7),
        "sigmoid" => img([2, 3, 4, 4]).sigmoid(),
        "tanh" => img([2, 3, 4, 4]).tanh(),
        "silu" => img([2, 3, 4, 4]).silu(),
        "gelu" => img([2, 3, 4, 4]).gelu(),
        "softmax_channels" => img([2, 3, 2, 2]).softmax(1),
        "batch_norm2d" => img([3, 2, 3, 3]).batch_norm(),
        "batch_norm1d" => ModelBuilder::new(&[5, 4]).batch_norm_with(BatchNorm::new().momentum(0.3)),
        "group_norm" => img([2, 6, 3, 3]).group_norm(3),
        "group_norm_no_affine" => img([3, 4, 2, 3]).group_norm_with(GroupNorm::new(2).eps(1e-3).affine(false)),
        "group_norm_features" => ModelBuilder::new(&[3, 8]).group_norm(4),
        "group_norm_instance" => img([2, 3, 4, 4]).group_norm(3),
        "max_pool" => img([2, 2, 7, 7]).max_pool2d_with(Pool2d::new(3).stride(2).padding(1)),
        "avg_pool_pad" => img([2, 2, 7, 6]).avg_pool2d_with(Pool2d::new(3).stride(2).padding(1)),
        "avg_pool_nopad_count" => {
            img([2, 2, 7, 6]).avg_pool2d_with(Pool2d::new(3).stride(2).padding(1).count_include_pad(false))
        }
        "global_avg_pool" => img([2, 3, 4, 5]).global_avg_pool(),
        other => panic!("no kiln model for case {other}"),
    }
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number")).collect()
}

fn assert_close_tol(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: kiln {g} vs PyTorch {w}");
    }
}

#[test]
fn every_layer_matches_pytorch_in_f64() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/torch_layers.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = fixture["cases"].as_object().unwrap();
    assert!(cases.len() >= 31);
    for (name, case) in cases {
        let model = builder(name).build().unwrap();
        let mut e = Executor::new(&model, CpuBackend::<f64>::new(Some(2)).unwrap()).unwrap();
        let batch = model.batch_size();
        let plan = e.plan(batch, Mode::Train, PlanOptions { input_grad: true, ..Default::default() }).unwrap();
        // Parameters and input from the script's formulas, at full f64 precision.
        let mut p = 0;
        for (spec, bufs) in model.params().iter().zip(e.param_buffers().to_vec()) {
            if spec.trainable {
                let v: Vec<f64> = (0..spec.len()).map(|i| 0.3 * (1.3 * i as f64 + p as f64 + 1.0).sin()).collect();
                e.backend_mut().write_f64(bufs.value, &v).unwrap();
                p += 1;
            }
        }
        let info = e.plan_info(plan).clone();
        let n = e.backend().len(info.input);
        let x: Vec<f64> = (0..n).map(|i| (0.37 * i as f64 + 0.1).sin()).collect();
        e.backend_mut().write_f64(info.input, &x).unwrap();
        e.forward(plan).unwrap();
        let m = e.backend().len(info.output);
        let dy: Vec<f64> = (0..m).map(|i| (0.7 * i as f64).cos()).collect();
        e.backend_mut().write_f64(info.output_grad.unwrap(), &dy).unwrap();
        e.backward(plan).unwrap();

        // Options such as ELU's alpha are f32 (0.7f32 differs from 0.7 by 1e-8 relative), so
        // layers with such an option get a looser bound; the rest must agree to 1e-9.
        let tol = if ["elu", "leaky_relu"].contains(&name.as_str()) { 1e-7 } else { 1e-9 };
        let assert_close = |what: &str, got: &[f64], want: &[f64]| assert_close_tol(what, got, want, tol);
        let out = e.backend_mut().read_f64(info.output).unwrap();
        assert_close(&format!("{name} output"), &out, &floats(&case["output"]));
        let dx = e.backend_mut().read_f64(info.input_grad.unwrap()).unwrap();
        assert_close(&format!("{name} input grad"), &dx, &floats(&case["input_grad"]));
        let want_grads = case["param_grads"].as_array().unwrap();
        let bufs = e.param_buffers().to_vec();
        let trainable: Vec<_> = model.params().iter().zip(&bufs).filter(|(s, _)| s.trainable).collect();
        assert_eq!(trainable.len(), want_grads.len(), "{name}: parameter count");
        // PyTorch's state_dict names: kiln's `layer.weight` ends as PyTorch's `weight` (or `1.weight`).
        let want_names = case["param_names"].as_array().unwrap();
        for ((spec, _), want) in trainable.iter().zip(want_names) {
            let want = want.as_str().unwrap().rsplit('.').next().unwrap();
            assert_eq!(spec.name.rsplit('.').next().unwrap(), want, "{name}: parameter name of {}", spec.name);
        }
        for ((spec, b), want) in trainable.iter().zip(want_grads) {
            let g = e.backend_mut().read_f64(b.grad.unwrap()).unwrap();
            assert_close(&format!("{name} {} grad", spec.name), &g, &floats(want));
        }
        for (spec, b) in model.params().iter().zip(&bufs) {
            let key = match spec.role {
                kiln::model::ParamRole::RunningMean => "running_mean",
                kiln::model::ParamRole::RunningVar => "running_var",
                _ => continue,
            };
            let v = e.backend_mut().read_f64(b.value).unwrap();
            // Momentum is an f32 option too.
            assert_close_tol(&format!("{name} {key}"), &v, &floats(&case[key]), 1e-7);
        }
    }
}
