//! Every validation rule of the builder: a bad spec is an error naming the layer and the reason,
//! never a panic.

use kiln::Error;
use kiln::backend::cpu::CpuBackend;
use kiln::exec::{Executor, Mode, PlanOptions};
use kiln::model::{BatchNorm, Conv2d, ModelBuilder, Pool2d, branch};
use kiln::tensor::Tensor;

/// Asserts that building fails with a message containing every fragment.
fn fails(b: ModelBuilder, fragments: &[&str]) {
    let err = b.build().expect_err("the model should be rejected").to_string();
    for f in fragments {
        assert!(err.contains(f), "error {err:?} should mention {f:?}");
    }
}

fn img() -> ModelBuilder {
    ModelBuilder::new(&[2, 3, 8, 8])
}

#[test]
fn kernel_larger_than_padded_input() {
    fails(img().conv2d(4, 9).name("big"), &["layer 'big'", "kernel extent 9", "padded input"]);
    fails(img().conv2d_with(Conv2d::new(4, 3).dilation(4)), &["conv2d_1", "kernel extent 9"]);
    fails(img().max_pool2d(9).name("pool"), &["'pool'", "kernel extent 9"]);
}

#[test]
fn zero_sizes_and_strides() {
    fails(img().conv2d_with(Conv2d::new(4, 3).stride(0)).name("c"), &["'c'", "stride must be at least 1"]);
    fails(img().conv2d(0, 3), &["conv2d_1", "out_channels must be at least 1"]);
    fails(img().conv2d(4, 0), &["kernel height must be at least 1"]);
    fails(img().conv2d_with(Conv2d::new(4, 3).dilation(0)), &["dilation must be at least 1"]);
    fails(img().max_pool2d_with(Pool2d::new(2).stride(0)), &["max_pool2d_1", "stride must be at least 1"]);
    fails(img().dense(0).name("fc"), &["'fc'", "out_features must be at least 1"]);
    fails(ModelBuilder::new(&[2, 0, 8, 8]).relu(), &["input shape", "non-zero"]);
    fails(ModelBuilder::new(&[2, 3, 8]).relu(), &["input shape"]);
    fails(img(), &["no layers"]);
}

#[test]
fn groups_must_divide_channels() {
    fails(img().conv2d_with(Conv2d::new(4, 3).groups(2)), &["groups = 2", "input channels (3)"]);
    fails(img().conv2d_with(Conv2d::new(4, 3).groups(0)), &["groups must be at least 1"]);
}

#[test]
fn same_padding_rules() {
    fails(img().conv2d_with(Conv2d::new(4, 3).stride(2).padding("same")), &["\"same\" needs stride 1"]);
    fails(img().conv2d_with(Conv2d::new(4, 2).padding("same")), &["uneven padding"]);
    fails(img().conv2d_with(Conv2d::new(4, 3).padding("full")), &["padding must be"]);
    let m = img().conv2d_with(Conv2d::new(4, 5).padding("same")).build().unwrap();
    assert_eq!(m.output_shape(), vec![2, 4, 8, 8]);
}

#[test]
fn pooling_padding_at_most_half_the_kernel() {
    fails(img().max_pool2d_with(Pool2d::new(2).padding(2)), &["at most half the kernel"]);
    fails(img().avg_pool2d_with(Pool2d::new(3).padding(2)), &["at most half the kernel"]);
}

#[test]
fn layers_that_need_image_input() {
    let flat = || ModelBuilder::new(&[2, 10]);
    fails(flat().conv2d(3, 1).name("c"), &["'c'", "needs a [batch, C, H, W] input"]);
    fails(flat().max_pool2d(2), &["needs a [batch, C, H, W] input"]);
    fails(flat().global_avg_pool(), &["needs a [batch, C, H, W] input"]);
    fails(flat().reshape(&[2, 5]).batch_norm().name("bn"), &["'bn'", "batch_norm needs"]);
}

#[test]
fn option_ranges() {
    fails(img().dropout(1.0).name("d"), &["'d'", "dropout rate must be in [0, 1)"]);
    fails(img().dropout(-0.1), &["dropout rate"]);
    fails(img().dropout(f32::NAN), &["dropout rate"]);
    fails(img().batch_norm_with(BatchNorm::new().eps(0.0)), &["eps must be positive"]);
    fails(img().batch_norm_with(BatchNorm::new().momentum(1.5)), &["momentum must be in [0, 1]"]);
    fails(img().leaky_relu(f32::NAN), &["slope must be finite"]);
    fails(img().elu(f32::INFINITY), &["alpha must be finite"]);
    fails(img().softmax(4).name("sm"), &["'sm'", "axis 4 is out of range"]);
    fails(img().softmax(-5), &["axis -5 is out of range"]);
    assert!(img().softmax(-4).build().is_ok());
}

#[test]
fn reshape_must_keep_the_size() {
    fails(img().reshape(&[3, 8, 7]).name("r"), &["'r'", "cannot reshape"]);
    fails(img().reshape(&[0, 192]), &["non-zero"]);
}

#[test]
fn joins_must_match() {
    fails(
        img().conv2d(4, 1).residual(|m| m.conv2d(4, 3)).name("join"),
        &["'join'", "cannot add branches of shapes [4, 6, 6] and [4, 8, 8]"],
    );
    fails(
        img().concat([branch(|b| b.conv2d(2, 1)), branch(|b| b.conv2d(2, 3))]).name("cat"),
        &["'cat'", "cannot concatenate"],
    );
    fails(img().layer(kiln::model::Layer::Add), &["add needs at least two inputs"]);
}

#[test]
fn group_norm_options() {
    use kiln::model::GroupNorm;
    fails(img().conv2d(6, 1).group_norm(4).name("gn"), &["'gn'", "groups (4)", "divide the 6 channels"]);
    fails(img().group_norm(0).name("gn"), &["'gn'", "at least 1"]);
    fails(img().group_norm_with(GroupNorm::new(3).eps(0.0)).name("gn"), &["'gn'", "eps must be positive"]);
    fails(
        img().reshape(&[3, 8, 8]).flatten().reshape(&[2, 3, 4, 8]).group_norm(1).name("gn"),
        &["'gn'", "group_norm needs"],
    );
}

#[test]
fn conv_transpose2d_options() {
    use kiln::model::ConvTranspose2d;
    let ct = |c: ConvTranspose2d| img().conv_transpose2d_with(c).name("up");
    fails(
        ct(ConvTranspose2d::new(4, 3).stride(2).output_padding(2)),
        &["'up'", "output_padding along height (2)", "smaller than the stride (2) or the dilation (1)"],
    );
    fails(
        ct(ConvTranspose2d::new(4, 3).output_padding_hw(0, 1)),
        &["'up'", "output_padding along width (1)", "stride (1) or the dilation (1)"],
    );
    fails(ct(ConvTranspose2d::new(4, 3).groups(2)), &["'up'", "groups = 2", "input channels (3)"]);
    fails(ct(ConvTranspose2d::new(5, 3).groups(3)), &["'up'", "groups = 3", "out_channels (5)"]);
    fails(ct(ConvTranspose2d::new(4, 3).padding(6)), &["'up'", "padding leaves no output"]);
    fails(ct(ConvTranspose2d::new(4, 3).stride(0)), &["'up'", "stride must be at least 1"]);
    fails(ct(ConvTranspose2d::new(0, 3)), &["'up'", "out_channels must be at least 1"]);
    fails(ct(ConvTranspose2d::new(4, 3).dilation(0)), &["'up'", "dilation must be at least 1"]);
    fails(ct(ConvTranspose2d::new(4, 3).stride(1 << 40)), &["'up'", "stride", "16777216"]);
    fails(ModelBuilder::new(&[2, 12]).conv_transpose2d(4, 3).name("up"), &["'up'", "conv_transpose2d needs"]);
    // Sizes the options allow but no machine holds: an error, not an overflow or an abort.
    assert!(ct(ConvTranspose2d::new(1 << 24, 3).stride(1 << 24)).build().is_err());
    // Allowed: output padding below the dilation though not below the stride (PyTorch's rule).
    let m = ct(ConvTranspose2d::new(4, 3).dilation(3).output_padding(2)).build().unwrap();
    assert_eq!(m.output_shape(), &[2, 4, 16, 16]);
}

#[test]
fn names_must_be_unique() {
    fails(img().conv2d(4, 3).name("a").relu().name("a"), &["'a'", "duplicate layer name"]);
    fails(img().relu().name(""), &["must not be empty"]);
    fails(img().name("x").relu(), &["before any layer"]);
    // A user name that matches an automatic one is kept; the automatic one moves on.
    let m = img().conv2d(4, 1).conv2d(4, 1).name("conv2d_1").build().unwrap();
    let names: Vec<&str> = m.nodes().iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["input", "conv2d_2", "conv2d_1"]);
}

/// `.name()` first inside a branch closure has no layer of its branch to name: an error, as before
/// the model's first layer (it used to rename the previous branch's last layer silently).
#[test]
fn name_at_the_start_of_a_branch_is_an_error() {
    let branch_start = ["name(\"x\")", "start of a branch", "before any layer was added"];
    fails(img().conv2d(4, 1).residual_with(|m| m.conv2d(4, 1), |s| s.name("x").conv2d(4, 1)), &branch_start);
    fails(img().conv2d(4, 1).residual(|m| m.name("x").conv2d(4, 1)), &branch_start);
    fails(img().conv2d(4, 1).concat([branch(|b| b.conv2d(2, 1)), branch(|b| b.name("x").conv2d(2, 1))]), &branch_start);
    fails(img().residual(|m| m.name("x").conv2d(3, 1)), &["name(\"x\")", "before any layer was added"]);
    // Names given after a layer inside a branch, and after the join, name those layers.
    let m = img()
        .conv2d(4, 1)
        .name("stem")
        .residual_with(|m| m.conv2d(4, 1).name("main"), |s| s.conv2d(4, 1).name("proj"))
        .name("join")
        .concat([branch(|b| b.conv2d(2, 1).name("left")), branch(|b| b.conv2d(2, 1).name("right"))])
        .build()
        .unwrap();
    let names: Vec<&str> = m.nodes().iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["input", "stem", "main", "proj", "join", "left", "right", "concat_1"]);
}

#[test]
fn automatic_names_count_per_type() {
    let m = img().conv2d(4, 3).relu().conv2d(4, 3).relu().flatten().dense(2).build().unwrap();
    let names: Vec<&str> = m.nodes().iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["input", "conv2d_1", "relu_1", "conv2d_2", "relu_2", "flatten_1", "dense_1"]);
}

#[test]
fn batch_norm_training_needs_more_than_one_value() {
    let m = ModelBuilder::new(&[1, 4]).dense(3).batch_norm().name("bn").build().unwrap();
    let mut e = Executor::new(&m, CpuBackend::<f32>::new(Some(1)).unwrap()).unwrap();
    let err = e.plan(1, Mode::Train, PlanOptions::default()).unwrap_err().to_string();
    assert!(err.contains("'bn'") && err.contains("more than one value per channel"), "{err}");
    // Evaluation at batch 1 is fine, and so is training at batch 2.
    assert!(e.plan(1, Mode::Eval, PlanOptions::default()).is_ok());
    assert!(e.plan(2, Mode::Train, PlanOptions::default()).is_ok());
}

#[test]
fn executor_rejects_bad_inputs() {
    let m = img().conv2d(4, 3).build().unwrap();
    let mut e = Executor::new(&m, CpuBackend::<f32>::new(Some(1)).unwrap()).unwrap();
    let wrong = Tensor::zeros(&[2, 3, 8, 7]);
    let err = e.predict(&wrong, Mode::Eval).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    assert!(err.to_string().contains("[batch, 3, 8, 8]"), "{err}");
    let id = e.plan(2, Mode::Eval, PlanOptions::default()).unwrap();
    assert!(e.set_input(id, &[0.0; 5]).is_err());
    assert!(e.backward(id).is_err(), "an evaluation plan has no backward pass");
    assert!(e.set_output_grad(id, &[0.0; 5]).is_err());
    assert!(e.plan(0, Mode::Eval, PlanOptions::default()).is_err());
    assert!(e.read_param("nope.weight").is_err());
    assert!(e.write_param("conv2d_1.weight", &[1.0; 3]).is_err());
}
