//! The trainer's seed and the API a parity harness needs: `TrainerConfig::seed` drives dropout
//! masks and the data order of `fit`; gradients can be computed and read without an update (also
//! under gradient accumulation); a training-mode forward pass changes nothing.

use kiln::data::{DataLoader, TensorDataset};
use kiln::model::{Model, ModelBuilder};
use kiln::rng::Rng;
use kiln::tensor::Tensor;
use kiln::train::{Device, Mode, Optimizer, Trainer, TrainerConfig};

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut r = Rng::new(seed);
    Tensor::new(shape, (0..shape.iter().product()).map(|_| r.uniform_range(-1.0, 1.0)).collect()).unwrap()
}

fn config(seed: u64) -> TrainerConfig {
    TrainerConfig { batch_size: 4, seed, device: Device::Cpu, threads: Some(1), ..Default::default() }
}

fn with_dropout() -> Model {
    ModelBuilder::new(&[4, 16]).dense(32).dropout(0.5).dense(3).seed(7).build().unwrap()
}

#[test]
fn the_config_seed_decides_the_dropout_masks() {
    let x = random(&[4, 16], 1);
    let masks = |seed: u64| {
        let mut t = Trainer::new(&with_dropout(), config(seed)).unwrap();
        (t.predict_with(&x, Mode::Train).unwrap(), t.predict_with(&x, Mode::Train).unwrap())
    };
    let (a1, a2) = masks(1);
    assert_eq!((a1.clone(), a2.clone()), masks(1), "the same seed draws the same masks");
    assert_ne!(a1, a2, "each pass draws a new mask");
    let (b1, _) = masks(2);
    assert_ne!(a1, b1, "another seed draws other masks");
}

#[test]
fn the_config_seed_decides_the_data_order() {
    // No dropout: only the order of the samples differs between the runs. Plain SGD on batches
    // of one sample ends at different weights for different orders.
    let model = ModelBuilder::new(&[1, 6, 1, 1]).flatten().dense(4).relu().dense(3).seed(3).build().unwrap();
    let x = random(&[24, 6, 1, 1], 2);
    let labels: Vec<u32> = (0..24).map(|i| i % 3).collect();
    let loader = DataLoader::builder(TensorDataset::new(x, labels).unwrap())
        .batch_size(1)
        .shuffle(true)
        .seed(11)
        .build()
        .unwrap();
    let weights = |seed: u64| {
        let cfg = TrainerConfig { batch_size: 1, optimizer: Optimizer::sgd(0.0), learning_rate: 0.1, ..config(seed) };
        let mut t = Trainer::new(&model, cfg).unwrap();
        t.fit(&loader, None, 2).unwrap();
        t.model().unwrap().param_values().concat()
    };
    let a = weights(1);
    assert_eq!(a, weights(1), "the same seed walks the same order");
    assert_ne!(a, weights(2), "another seed walks another order");
}

fn dense() -> Model {
    ModelBuilder::new(&[4, 5]).dense(6).relu().dense(3).name("out").seed(5).build().unwrap()
}

fn sgd(k: usize) -> TrainerConfig {
    TrainerConfig { optimizer: Optimizer::sgd(0.0), learning_rate: 0.5, grad_accumulation: k, ..config(0) }
}

#[test]
fn gradients_are_computed_and_read_without_an_update() {
    let mut t = Trainer::new(&dense(), sgd(1)).unwrap();
    let (x, y) = (random(&[4, 5], 3), [0u32, 2, 1, 2]);
    let before = t.model().unwrap().param_values().concat();
    let r = t.compute_gradients(&x, &y).unwrap();
    assert!(r.loss > 0.0);
    assert_eq!(t.model().unwrap().param_values().concat(), before, "no update");
    assert_eq!(t.steps_taken(), 0);
    assert_eq!(t.take_epoch_metrics().unwrap().samples, 0, "the epoch's figures are untouched");
    let g = t.gradients().unwrap();
    assert_eq!(
        g.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["dense_1.weight", "dense_1.bias", "out.weight", "out.bias"]
    );
    assert!(g.iter().all(|(_, v)| v.iter().any(|&x| x != 0.0)));
    assert_eq!(t.grad("out.weight").unwrap(), g[2].1);
    // A training step on the same batch computes the same gradient and updates by -lr * grad.
    let w0 = t.executor().read_param("out.weight").unwrap();
    t.train_step(&x, &y).unwrap();
    assert_eq!(t.grad("out.weight").unwrap(), g[2].1, "the gradient the update used stays readable");
    let w1 = t.executor().read_param("out.weight").unwrap();
    for ((a, b), g) in w0.iter().zip(&w1).zip(&g[2].1) {
        assert!((a - 0.5 * g - b).abs() < 1e-6, "{a} - 0.5 * {g} != {b}");
    }
    assert!(t.grad("nope").is_err());
}

#[test]
fn gradients_stay_readable_under_accumulation() {
    let (a, b) = (random(&[4, 5], 4), random(&[4, 5], 5));
    let (ya, yb) = ([1u32, 0, 2, 2], [0u32, 1, 1, 2]);
    let mut single = Trainer::new(&dense(), sgd(1)).unwrap();
    single.compute_gradients(&a, &ya).unwrap();
    let ga = single.gradients().unwrap();
    single.compute_gradients(&b, &yb).unwrap();
    let gb = single.gradients().unwrap();

    let mut t = Trainer::new(&dense(), sgd(2)).unwrap();
    let close = |got: &[(String, Vec<f32>)], want: &dyn Fn(usize, usize) -> f32| {
        for (p, (_, v)) in got.iter().enumerate() {
            for (i, &x) in v.iter().enumerate() {
                assert!((x - want(p, i)).abs() <= 1e-6 * (1.0 + want(p, i).abs()), "{x} vs {}", want(p, i));
            }
        }
    };
    t.train_step(&a, &ya).unwrap();
    close(&t.gradients().unwrap(), &|p, i| ga[p].1[i] / 2.0);
    assert!(t.compute_gradients(&a, &ya).is_err(), "refused in the middle of an accumulation");
    t.train_step(&b, &yb).unwrap();
    assert_eq!(t.steps_taken(), 1);
    close(&t.gradients().unwrap(), &|p, i| (ga[p].1[i] + gb[p].1[i]) / 2.0);
    // The next accumulation starts from zero again: its first batch gives half that batch's
    // gradient at the updated weights.
    let updated = t.model().unwrap().clone();
    let mut fresh = Trainer::new(&updated, sgd(1)).unwrap();
    fresh.compute_gradients(&b, &yb).unwrap();
    let gb2 = fresh.gradients().unwrap();
    t.train_step(&b, &yb).unwrap();
    close(&t.gradients().unwrap(), &|p, i| gb2[p].1[i] / 2.0);
}

#[test]
fn a_training_mode_forward_changes_nothing() {
    let model = ModelBuilder::new(&[4, 2, 4, 4])
        .conv2d(3, 3)
        .batch_norm()
        .relu()
        .flatten()
        .dropout(0.3)
        .dense(2)
        .seed(2)
        .build()
        .unwrap();
    let mut t = Trainer::new(&model, config(9)).unwrap();
    let x = random(&[4, 2, 4, 4], 6);
    let rm = |t: &mut Trainer| {
        let name =
            t.executor().model().params().iter().find(|p| p.name.ends_with("running_mean")).unwrap().name.clone();
        t.executor().read_param(&name).unwrap()
    };
    let stats = rm(&mut t);
    let f1 = t.forward_train(&x).unwrap();
    let f2 = t.forward_train(&x).unwrap();
    assert_eq!(f1, f2, "the dropout streams did not advance");
    assert_eq!(rm(&mut t), stats, "running statistics unchanged");
    assert_ne!(f1, t.predict(&x).unwrap(), "training mode, not evaluation");
    // What the next training-mode pass computes, which does advance and update.
    assert_eq!(t.predict_with(&x, Mode::Train).unwrap(), f1);
    assert_ne!(rm(&mut t), stats);
    assert_ne!(t.forward_train(&x).unwrap(), f1);
}
