//! The test corpus every backend runs, written once: the layers, options and models that
//! tests/gradcheck.rs checks against finite differences on the CPU, and that tests/parity.rs runs
//! on every backend of [`backends`] against the CPU reference (the candle `test_device!` habit).
//!
//! A new layer adds its cases here; a new backend adds itself to [`backends`] and runs them all.
#![allow(dead_code)] // each test file uses a different part

use kiln::backend::Backend;
use kiln::model::{BatchNorm, Conv2d, ConvTranspose2d, GroupNorm, Linear, ModelBuilder, Pool2d, branch};
use kiln::zoo;

/// One model of the corpus.
pub struct Case {
    /// Test name (`cargo test NAME` selects it).
    pub name: &'static str,
    /// The model, unseeded (each suite seeds it).
    pub build: fn() -> ModelBuilder,
    /// Finite-difference tolerance for tests/gradcheck.rs; `None` for models too large to check
    /// that way in CI time (they run in the parity suite only).
    pub gradcheck: Option<f64>,
    /// Run by the backend parity suite. Off only for cases whose gradients include a bias that
    /// is analytically zero (a biased convolution or dense layer feeding batch norm): comparing
    /// two f32 roundings of zero measures nothing, and each such case has a bias-free twin here.
    pub parity: bool,
}

/// Default finite-difference tolerance; batch norm's normalisation needs 5e-5.
const FD: Option<f64> = Some(1e-5);
const FD_BN: Option<f64> = Some(5e-5);

fn case(name: &'static str, build: fn() -> ModelBuilder) -> Case {
    Case { name, build, gradcheck: FD, parity: true }
}
fn bn_case(name: &'static str, build: fn() -> ModelBuilder) -> Case {
    Case { name, build, gradcheck: FD_BN, parity: true }
}
/// Finite differences only (see [`Case::parity`]).
fn gradcheck_only(name: &'static str, tol: f64, build: fn() -> ModelBuilder) -> Case {
    Case { name, build, gradcheck: Some(tol), parity: false }
}
/// Backend parity only (too large for finite differences).
fn parity_only(name: &'static str, build: fn() -> ModelBuilder) -> Case {
    Case { name, build, gradcheck: None, parity: true }
}

pub fn img(b: usize, c: usize, h: usize, w: usize) -> ModelBuilder {
    ModelBuilder::new(&[b, c, h, w])
}

/// A convolution without bias, for those feeding batch norm (see [`Case::parity`]).
pub fn no_bias(k: usize, kernel: usize) -> Conv2d {
    Conv2d::new(k, kernel).bias(false)
}

/// Every case, in a fixed order.
pub fn cases() -> Vec<Case> {
    vec![
        // Convolutions.
        case("conv2d_basic", || img(2, 3, 6, 6).conv2d(4, 3)),
        case("conv2d_stride_padding", || img(2, 3, 7, 7).conv2d_with(Conv2d::new(4, 3).stride(2).padding(1))),
        case("conv2d_same_dilation", || img(2, 2, 7, 7).conv2d_with(Conv2d::new(3, 3).padding("same").dilation(2))),
        case("conv2d_groups", || img(2, 4, 5, 5).conv2d_with(Conv2d::new(6, 3).groups(2).padding(1))),
        case("conv2d_depthwise", || img(2, 3, 5, 5).conv2d_with(Conv2d::new(3, 3).groups(3))),
        case("conv2d_non_square_no_bias", || {
            img(2, 2, 6, 7).conv2d_with(Conv2d::new(3, 2).kernel_hw(2, 3).stride_hw(2, 1).padding((1, 0)).bias(false))
        }),
        case("conv2d_pointwise", || img(3, 4, 4, 4).conv2d(5, 1)),
        case("conv2d_pointwise_groups", || img(2, 4, 4, 4).conv2d_with(Conv2d::new(4, 1).groups(2).bias(false))),
        case("conv2d_pointwise_stride", || img(2, 3, 5, 5).conv2d_with(Conv2d::new(4, 1).stride(2))),
        parity_only("conv2d_larger", || img(8, 16, 20, 20).conv2d_with(Conv2d::new(32, 3).padding(1))),
        // Transposed convolutions: every option, alone and together.
        case("conv_transpose2d_basic", || img(2, 3, 4, 4).conv_transpose2d(4, 3)),
        case("conv_transpose2d_stride_padding_output_padding", || {
            img(2, 3, 4, 5).conv_transpose2d_with(ConvTranspose2d::new(4, 3).stride(2).padding(1).output_padding(1))
        }),
        case("conv_transpose2d_dilation", || {
            img(2, 2, 4, 4).conv_transpose2d_with(ConvTranspose2d::new(3, 3).dilation(2).padding(1))
        }),
        case("conv_transpose2d_groups", || {
            img(2, 4, 3, 3).conv_transpose2d_with(ConvTranspose2d::new(6, 3).groups(2).stride(2))
        }),
        case("conv_transpose2d_depthwise", || {
            img(2, 3, 4, 4).conv_transpose2d_with(ConvTranspose2d::new(3, 3).groups(3).stride(2).output_padding(1))
        }),
        case("conv_transpose2d_non_square_no_bias", || {
            img(2, 2, 3, 4).conv_transpose2d_with(
                ConvTranspose2d::new(3, 2)
                    .kernel_hw(2, 3)
                    .stride_hw(3, 1)
                    .padding_hw(1, 0)
                    .output_padding_hw(2, 0)
                    .dilation_hw(1, 2)
                    .bias(false),
            )
        }),
        case("conv_transpose2d_pointwise", || img(2, 4, 3, 3).conv_transpose2d(5, 1)),
        // Output padding at or above the stride (allowed below the dilation): cuDNN cannot
        // describe it, so the CUDA backend runs the uncropped transposed convolution and crops it
        // (backend/cuda/conv_transpose2d.rs); output padding beyond the padding leaves rows that
        // only the bias reaches.
        case("conv_transpose2d_output_padding_past_stride", || {
            img(2, 2, 3, 3).conv_transpose2d_with(ConvTranspose2d::new(3, 2).dilation(3).padding(1).output_padding(2))
        }),
        case("conv_transpose2d_output_padding_past_stride_dilation2", || {
            img(2, 3, 4, 3).conv_transpose2d_with(ConvTranspose2d::new(4, 3).dilation(2).padding(1).output_padding(1))
        }),
        case("conv_transpose2d_output_padding_past_stride_strided_groups", || {
            img(2, 4, 3, 4)
                .conv_transpose2d_with(ConvTranspose2d::new(4, 2).stride(2).dilation(3).output_padding(2).groups(2))
        }),
        case("conv_transpose2d_output_padding_past_stride_one_axis_no_bias", || {
            img(2, 2, 4, 4).conv_transpose2d_with(
                ConvTranspose2d::new(3, 3).dilation_hw(2, 1).padding(1).output_padding_hw(1, 0).bias(false),
            )
        }),
        case("conv_transpose2d_output_padding_past_stride_decoder", || {
            img(2, 2, 6, 6)
                .conv2d_with(Conv2d::new(3, 3).padding(1))
                .relu()
                .conv_transpose2d_with(ConvTranspose2d::new(2, 3).dilation(2).padding(2).output_padding(1))
        }),
        case("conv_transpose2d_decoder", || {
            img(2, 2, 8, 8)
                .conv2d_with(Conv2d::new(4, 3).stride(2).padding(1))
                .relu()
                .conv_transpose2d_with(ConvTranspose2d::new(2, 3).stride(2).padding(1).output_padding(1))
        }),
        parity_only("conv_transpose2d_larger", || {
            img(8, 16, 10, 10).conv_transpose2d_with(ConvTranspose2d::new(8, 4).stride(2).padding(1))
        }),
        // Dense layers and views.
        case("dense", || ModelBuilder::new(&[3, 5]).dense(4).dense_with(Linear::new(2).bias(false))),
        case("dense_on_images", || img(2, 2, 3, 3).dense(4)),
        case("flatten_dense", || img(2, 2, 3, 3).flatten().dense(3)),
        case("reshape_softmax", || img(2, 2, 3, 4).reshape(&[4, 6]).softmax(-1)),
        parity_only("dense_larger", || ModelBuilder::new(&[64, 300]).dense(200).relu().dense(10)),
        // Activations.
        case("act_relu", || img(2, 2, 3, 3).conv2d(3, 2).relu()),
        case("act_leaky_relu", || img(2, 2, 3, 3).conv2d(3, 2).leaky_relu(0.1)),
        case("act_elu", || img(2, 2, 3, 3).conv2d(3, 2).elu(0.7)),
        case("act_sigmoid", || img(2, 2, 3, 3).conv2d(3, 2).sigmoid()),
        case("act_tanh", || img(2, 2, 3, 3).conv2d(3, 2).tanh()),
        case("act_silu", || img(2, 2, 3, 3).conv2d(3, 2).silu()),
        case("act_gelu", || img(2, 2, 3, 3).conv2d(3, 2).gelu()),
        // Softmax.
        case("softmax_rows", || ModelBuilder::new(&[3, 6]).dense(5).softmax(1)),
        case("softmax_channels", || img(2, 3, 3, 3).conv2d(4, 1).softmax(1)),
        gradcheck_only("softmax_last_axis_biased", 1e-5, || img(2, 3, 3, 3).conv2d(4, 1).softmax(-1)),
        case("softmax_last_axis", || img(2, 3, 3, 3).conv2d_with(Conv2d::new(4, 1).bias(false)).softmax(-1)),
        parity_only("softmax_wide_rows", || ModelBuilder::new(&[4, 50]).dense(1000).softmax(1)),
        // Dropout.
        case("dropout", || ModelBuilder::new(&[4, 10]).dense(12).dropout(0.4).dense(3)),
        parity_only("dropout_odd_length", || ModelBuilder::new(&[3, 7]).dense(13).dropout(0.5).dense(2)),
        // Batch norm (bias-free layers in front for parity, see `Case::parity`).
        gradcheck_only("batch_norm_4d_biased", 5e-5, || img(3, 2, 4, 4).conv2d(3, 3).batch_norm()),
        bn_case("batch_norm_4d", || img(3, 2, 4, 4).conv2d_with(no_bias(3, 3)).batch_norm()),
        gradcheck_only("batch_norm_2d_biased", 5e-5, || {
            ModelBuilder::new(&[5, 4]).dense(6).batch_norm().relu().dense(2)
        }),
        bn_case("batch_norm_2d", || {
            ModelBuilder::new(&[5, 4]).dense_with(Linear::new(6).bias(false)).batch_norm().relu().dense(2)
        }),
        gradcheck_only("batch_norm_affine_off_biased", 5e-5, || {
            img(3, 2, 4, 4).conv2d(3, 3).batch_norm_with(BatchNorm::new().affine(false).momentum(0.3))
        }),
        bn_case("batch_norm_affine_off", || {
            img(3, 2, 4, 4).conv2d_with(no_bias(3, 3)).batch_norm_with(BatchNorm::new().affine(false).momentum(0.3))
        }),
        gradcheck_only("batch_norm_no_running_stats_biased", 5e-5, || {
            img(3, 2, 4, 4).conv2d(3, 3).batch_norm_with(BatchNorm::new().track_running_stats(false))
        }),
        bn_case("batch_norm_no_running_stats", || {
            img(3, 2, 4, 4).conv2d_with(no_bias(3, 3)).batch_norm_with(BatchNorm::new().track_running_stats(false))
        }),
        parity_only("batch_norm_large", || img(16, 8, 16, 16).conv2d_with(no_bias(16, 3)).batch_norm()),
        // Batch norm with each activation it fuses (exec/fuse.rs; ReLU is in batch_norm_2d).
        bn_case("batch_norm_fused_activations", || {
            img(3, 2, 4, 4)
                .conv2d_with(no_bias(4, 3))
                .batch_norm()
                .leaky_relu(0.1)
                .conv2d_with(no_bias(4, 1))
                .batch_norm()
                .sigmoid()
                .conv2d_with(no_bias(4, 1))
                .batch_norm_with(BatchNorm::new().affine(false))
                .tanh()
                .conv2d_with(no_bias(3, 1))
                .batch_norm()
                .elu(1.0)
        }),
        // Group norm.
        bn_case("group_norm", || img(2, 4, 3, 3).conv2d(6, 1).group_norm(3)),
        bn_case("group_norm_no_affine_eps", || {
            img(2, 4, 3, 3).conv2d(4, 1).group_norm_with(GroupNorm::new(2).eps(1e-3).affine(false))
        }),
        bn_case("group_norm_features", || ModelBuilder::new(&[3, 5]).dense(8).group_norm(4).relu().dense(2)),
        // Instance norm (a group per channel) removes a per-channel constant, so the gradient of a
        // bias in front of it is zero up to rounding: compared relative to its largest value it is
        // noise (2.3e-3 on the H200). As for batch norm: biased for finite differences only.
        gradcheck_only("group_norm_instance_and_layer_biased", 5e-5, || {
            img(2, 3, 4, 4).conv2d(3, 1).group_norm(3).conv2d(4, 1).group_norm(1)
        }),
        bn_case("group_norm_instance_and_layer", || {
            img(2, 3, 4, 4).conv2d_with(no_bias(3, 1)).group_norm(3).conv2d(4, 1).group_norm(1)
        }),
        parity_only("group_norm_large", || img(8, 32, 16, 16).conv2d_with(no_bias(32, 3)).group_norm(8)),
        // Pooling.
        case("max_pool", || img(2, 2, 6, 6).conv2d(3, 1).max_pool2d(2)),
        case("max_pool_overlapping", || {
            img(2, 2, 5, 5).conv2d(3, 1).max_pool2d_with(Pool2d::new(3).stride(1).padding(1))
        }),
        case("avg_pool_padded", || img(2, 2, 6, 5).conv2d(3, 1).avg_pool2d_with(Pool2d::new(3).stride(2).padding(1))),
        case("avg_pool_no_pad_count", || {
            img(2, 2, 6, 5).conv2d(3, 1).avg_pool2d_with(Pool2d::new(3).stride(2).padding(1).count_include_pad(false))
        }),
        case("global_avg_pool", || img(2, 2, 4, 5).conv2d(3, 1).global_avg_pool().dense(2)),
        // Joins.
        case("residual", || {
            img(2, 3, 5, 5).conv2d_with(Conv2d::new(4, 3).padding(1)).residual(|m| {
                m.conv2d_with(Conv2d::new(4, 3).padding(1)).tanh().conv2d_with(Conv2d::new(4, 3).padding(1))
            })
        }),
        gradcheck_only("residual_projection_biased", 5e-5, || {
            img(3, 3, 6, 6).conv2d(4, 1).residual_with(
                |m| m.conv2d_with(Conv2d::new(6, 3).stride(2).padding(1)).batch_norm().relu(),
                |s| s.conv2d_with(Conv2d::new(6, 1).stride(2).bias(false)).batch_norm(),
            )
        }),
        bn_case("residual_projection", || {
            img(3, 3, 6, 6).conv2d(4, 1).residual_with(
                |m| m.conv2d_with(no_bias(6, 3).stride(2).padding(1)).batch_norm().relu(),
                |s| s.conv2d_with(Conv2d::new(6, 1).stride(2).bias(false)).batch_norm(),
            )
        }),
        case("concat", || {
            img(2, 3, 5, 5).conv2d(4, 1).concat([
                branch(|b| b.conv2d(2, 1)),
                branch(|b| b.conv2d_with(Conv2d::new(3, 3).padding(1)).sigmoid()),
                branch(|b| b.max_pool2d_with(Pool2d::new(3).stride(1).padding(1))),
                branch(|b| b),
            ])
        }),
        // Whole models.
        gradcheck_only("mixed_model_biased", 5e-5, || mixed(Conv2d::new(4, 3).padding(1))),
        bn_case("mixed_model", || mixed(no_bias(4, 3).padding(1))),
        parity_only("resnet18_silu", || resnet18_silu(4)),
        parity_only("simple_cnn", || zoo::simple_cnn(4)),
        parity_only("advanced_cnn", || zoo::advanced_cnn(4)),
        parity_only("multiscale_cnn", || zoo::multiscale_cnn(4)),
        parity_only("mnist_cnn", || zoo::mnist_cnn(4)),
        parity_only("cifar_cnn", || zoo::cifar_cnn(4)),
        parity_only("inception_block", || zoo::inception_block(2, 10)),
    ]
}

/// `zoo::resnet18`'s layers (CIFAR stem, four stages of two basic blocks, 3x3 convolutions
/// without bias, batch norm, projections on the strided blocks) with SiLU in place of ReLU.
///
/// Why not the zoo model itself: its gradients are not a continuous function of the rounding.
/// Batch norm centres every pre-activation on zero, so some lie within f32 rounding of it, and
/// a ReLU mask bit that flips between two f32 computations (or between f32 and f64) moves the
/// whole channel's gradient through the following batch norms' backward. On the CPU, ReLU
/// ResNet-18's f32 gradients are up to 2.8e-2 (batch 8) and 3.5e-2 (batch 4) of their largest
/// value away from the same computation in f64, and a parity run once failed on the H200 with
/// the input gradient 8.9e-3 away while every layer's own case passed. With SiLU the f32 error
/// is 5.4e-6 at batch 4 and 8, so a 1e-4 tolerance measures the kernels, not a coin flip.
/// ReLU's kernels are covered by the smaller cases, and the ReLU model's forward by the other
/// zoo models.
fn resnet18_silu(batch: usize) -> ModelBuilder {
    let mut b = img(batch, 3, 32, 32).conv2d_with(no_bias(64, 3).padding(1)).batch_norm().silu();
    let mut inp = 64;
    for (stage, width) in [64usize, 128, 256, 512].into_iter().enumerate() {
        for block in 0..2 {
            let stride = if stage > 0 && block == 0 { 2 } else { 1 };
            let main = move |m: ModelBuilder| {
                m.conv2d_with(no_bias(width, 3).stride(stride).padding(1))
                    .batch_norm()
                    .silu()
                    .conv2d_with(no_bias(width, 3).padding(1))
                    .batch_norm()
            };
            b = if stride != 1 || inp != width {
                b.residual_with(main, move |s| s.conv2d_with(no_bias(width, 1).stride(stride)).batch_norm())
            } else {
                b.residual(main)
            };
            b = b.silu();
            inp = width;
        }
    }
    b.global_avg_pool().dense(10)
}

fn mixed(first: Conv2d) -> ModelBuilder {
    img(2, 3, 8, 8)
        .conv2d_with(first)
        .batch_norm()
        .relu()
        .max_pool2d(2)
        .residual(|m| m.conv2d_with(Conv2d::new(4, 3).padding(1)).gelu())
        .dropout(0.2)
        .global_avg_pool()
        .dense(3)
        .softmax(1)
}

/// A backend under test: the parity suite runs every parity case of [`cases`] on it against the
/// CPU reference (f32).
pub struct BackendUnderTest {
    /// Prefix of its tests' names (`cuda::conv2d_basic`).
    pub name: &'static str,
    /// Opens it; an error means it is not usable here.
    pub open: fn() -> kiln::Result<Box<dyn Backend>>,
    /// Largest difference allowed, relative to the reference tensor's largest magnitude.
    pub tol: f64,
    /// Why the large cases (those without a finite-difference check: whole models, `*_larger`)
    /// are not run on this backend here, reported as their reason to be ignored; `None` runs them.
    pub skip_large: fn() -> Option<String>,
}

/// Every backend the corpus runs on. A new backend adds one line here.
pub fn backends() -> Vec<BackendUnderTest> {
    #[allow(unused_mut)]
    let mut all = vec![BackendUnderTest {
        name: "cuda",
        open: || Ok(Box::new(kiln::backend::CudaBackend::new(0)?) as Box<dyn Backend>),
        tol: 1e-4,
        skip_large: || None,
    }];
    #[cfg(feature = "wgpu")]
    all.push(BackendUnderTest {
        name: "wgpu",
        open: || Ok(Box::new(kiln::backend::wgpu::WgpuBackend::new(0)?) as Box<dyn Backend>),
        tol: 1e-4,
        skip_large: wgpu_skip_large,
    });
    all
}

/// On a CPU Vulkan driver (Mesa's lavapipe, what CI has) a whole model takes minutes per case:
/// the large cases run on wgpu GPU adapters, or anywhere with `KILN_WGPU_LARGE=1`.
#[cfg(feature = "wgpu")]
fn wgpu_skip_large() -> Option<String> {
    static WHY: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    WHY.get_or_init(|| {
        let adapter = kiln::backend::wgpu::WgpuBackend::new(0).ok()?.adapter();
        let forced = std::env::var("KILN_WGPU_LARGE").is_ok_and(|v| v == "1");
        (!adapter.is_gpu && !forced)
            .then(|| format!("large case on {}, a CPU driver (KILN_WGPU_LARGE=1 runs it)", adapter.name))
    })
    .clone()
}
