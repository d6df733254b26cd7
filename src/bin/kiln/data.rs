//! `--data`: which dataset, its preprocessing and augmentation, and each dataset's default recipe
//! (model, epochs, batch, optimizer, learning rate, schedule, augmentation).

use std::path::PathBuf;
use std::sync::Arc;

use kiln::data::{
    Compose, DataLoader, Dataset, ImageFolder, Mnist, Normalize, RandomCrop, RandomHorizontalFlip, Resize, Split,
    Subset, ToFloat, Transform, digits, split,
};
use serde::{Deserialize, Serialize};

/// A dataset named on the command line: `digits` (embedded), `mnist:DIR`, `fashion:DIR`,
/// `cifar10:DIR`, `folder:DIR`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataSource {
    /// `digits`, `mnist`, `fashion`, `cifar10` or `folder`.
    pub kind: String,
    /// The directory (none for `digits`).
    pub dir: Option<PathBuf>,
}

impl DataSource {
    pub fn parse(s: &str) -> Result<DataSource, String> {
        let (kind, dir) = match s.split_once(':') {
            Some((k, d)) => (k, Some(d)),
            None => (s, None),
        };
        let kind = kind.to_ascii_lowercase();
        match (kind.as_str(), dir) {
            ("digits", None) => Ok(DataSource { kind, dir: None }),
            ("mnist" | "fashion" | "cifar10" | "folder", Some(d)) if !d.is_empty() => {
                Ok(DataSource { kind, dir: Some(PathBuf::from(d)) })
            }
            ("mnist" | "fashion" | "cifar10" | "folder", _) => {
                Err(format!("--data {s}: give the directory, as {kind}:DIR"))
            }
            _ => Err(format!(
                "--data {s}: unknown dataset '{kind}' (expected digits, mnist:DIR, fashion:DIR, cifar10:DIR or folder:DIR)"
            )),
        }
    }

    pub fn describe(&self) -> String {
        match &self.dir {
            Some(d) => format!("{}:{}", self.kind, d.display()),
            None => self.kind.clone(),
        }
    }
}

/// How images are turned into model inputs; stored beside the model so `kiln predict` and
/// `kiln eval` preprocess as training did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// `[C, H, W]` of a model input.
    pub input: Vec<usize>,
    /// Images are resized to `input`'s height and width first (image folders).
    pub resize: bool,
    /// Per-channel mean and std after scaling pixels to [0, 1].
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Preprocess {
    /// The evaluation transform: resize (if asked), scale to [0, 1], normalise.
    pub fn transform(&self) -> Result<Compose, String> {
        let mut t = Compose::new();
        if self.resize {
            t = t.then(Resize::new(self.input[1], self.input[2]));
        }
        Ok(t.then(ToFloat).then(Normalize::new(&self.mean, &self.std).map_err(|e| e.to_string())?))
    }
}

/// Per-dataset defaults that reach the README's figures.
#[derive(Clone, Debug)]
pub struct Recipe {
    pub epochs: usize,
    pub batch: usize,
    pub optimizer: &'static str,
    pub lr: f64,
    pub weight_decay: f64,
    pub schedule: &'static str,
    pub augment: &'static str,
    pub val_split: f64,
    /// The default model as a spec (see `kiln::model::spec`), `{classes}` replaced.
    pub spec: &'static str,
}

pub fn recipe(kind: &str) -> Recipe {
    match kind {
        "digits" => Recipe {
            epochs: 12,
            batch: 32,
            optimizer: "adam",
            lr: 3e-3,
            weight_decay: 0.0,
            schedule: "onecycle",
            augment: "none",
            val_split: 0.2,
            spec: include_str!("recipes/digits.toml"),
        },
        "mnist" => Recipe {
            epochs: 15,
            batch: 128,
            optimizer: "adam",
            lr: 3e-3,
            weight_decay: 0.0,
            schedule: "onecycle",
            augment: "standard",
            val_split: 0.0,
            spec: include_str!("recipes/mnist.toml"),
        },
        "fashion" => Recipe {
            epochs: 30,
            batch: 128,
            optimizer: "adamw",
            lr: 3e-3,
            weight_decay: 5e-4,
            schedule: "onecycle",
            augment: "standard",
            val_split: 0.0,
            spec: include_str!("recipes/fashion.toml"),
        },
        "cifar10" => Recipe {
            epochs: 30,
            batch: 128,
            optimizer: "sgd",
            lr: 0.1,
            weight_decay: 5e-4,
            schedule: "onecycle",
            augment: "standard",
            val_split: 0.0,
            spec: "resnet18",
        },
        _ => Recipe {
            epochs: 20,
            batch: 32,
            optimizer: "adam",
            lr: 1e-3,
            weight_decay: 0.0,
            schedule: "cosine",
            augment: "standard",
            val_split: 0.2,
            spec: include_str!("recipes/folder.toml"),
        },
    }
}

/// Datasets ready for loaders: training and validation parts, class names, preprocessing.
pub struct Loaded {
    pub train: Arc<dyn Dataset>,
    pub val: Option<Arc<dyn Dataset>>,
    /// What the validation part is, in words.
    pub val_name: String,
    pub classes: Vec<String>,
    pub pre: Preprocess,
}

/// A shared dataset.
type Set = Arc<dyn Dataset>;

fn arc(d: impl Dataset + 'static) -> Set {
    Arc::new(d)
}

fn split_off(d: Set, frac: f64, seed: u64) -> Result<(Set, Option<Set>), String> {
    if frac <= 0.0 {
        return Ok((d, None));
    }
    let (t, v): (Subset, Subset) = split(d, frac, seed).map_err(|e| format!("--val-split {frac}: {e}"))?;
    Ok((arc(t), Some(arc(v))))
}

/// Opens `src`. `val_split` carves a validation part off the training data (the datasets with a
/// test split use it for validation when `val_split` is 0); `image_size` is the side images of
/// a folder are resized to.
pub fn load(src: &DataSource, val_split: f64, seed: u64, image_size: usize) -> Result<Loaded, String> {
    let ctx = |e: kiln::Error| format!("--data {}: {e}", src.describe());
    let dir = src.dir.clone().unwrap_or_default();
    let names = |n: usize| (0..n).map(|c| c.to_string()).collect::<Vec<_>>();
    let (train, test, classes, pre): (Set, Option<Set>, Vec<String>, Preprocess) = match src.kind.as_str() {
        "digits" => {
            let d = digits().map_err(ctx)?;
            let pre = Preprocess { input: vec![1, 8, 8], resize: false, mean: vec![0.305], std: vec![0.376] };
            (arc(d), None, names(10), pre)
        }
        "mnist" | "fashion" => {
            let open = |s| if src.kind == "mnist" { Mnist::new(&dir, s) } else { Mnist::fashion(&dir, s) };
            let (tr, te) = (open(Split::Train).map_err(ctx)?, open(Split::Test).map_err(ctx)?);
            let (mean, std) = if src.kind == "mnist" { (0.1307, 0.3081) } else { (0.2860, 0.3530) };
            let classes = if src.kind == "mnist" {
                names(10)
            } else {
                [
                    "T-shirt/top",
                    "Trouser",
                    "Pullover",
                    "Dress",
                    "Coat",
                    "Sandal",
                    "Shirt",
                    "Sneaker",
                    "Bag",
                    "Ankle boot",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect()
            };
            let pre = Preprocess { input: vec![1, 28, 28], resize: false, mean: vec![mean], std: vec![std] };
            (arc(tr), Some(arc(te)), classes, pre)
        }
        "cifar10" => {
            let tr = kiln::data::Cifar10::new(&dir, Split::Train).map_err(ctx)?;
            let te = kiln::data::Cifar10::new(&dir, Split::Test).map_err(ctx)?;
            let classes = tr.classes().map(<[String]>::to_vec).unwrap_or_else(|| names(10));
            let pre = Preprocess {
                input: vec![3, 32, 32],
                resize: false,
                mean: vec![0.4914, 0.4822, 0.4465],
                std: vec![0.2470, 0.2435, 0.2616],
            };
            (arc(tr), Some(arc(te)), classes, pre)
        }
        _ => {
            let f = ImageFolder::builder(&dir).channels(3).build().map_err(ctx)?;
            let classes = f.classes().map(<[String]>::to_vec).unwrap_or_default();
            let pre = Preprocess {
                input: vec![3, image_size, image_size],
                resize: true,
                mean: vec![0.5; 3],
                std: vec![0.5; 3],
            };
            (arc(f), None, classes, pre)
        }
    };
    if !(0.0..1.0).contains(&val_split) {
        return Err(format!("--val-split {val_split}: expected a fraction in [0, 1)"));
    }
    let (train, val, val_name) = match test {
        Some(test) if val_split <= 0.0 => {
            let n = test.len();
            (train, Some(test), format!("test set ({n} images)"))
        }
        _ => {
            let (t, v) = split_off(train, val_split, seed)?;
            let name = v.as_ref().map_or(String::new(), |v| {
                format!("validation split ({} images, {:.0}% held out)", v.len(), val_split * 100.0)
            });
            (t, v, name)
        }
    };
    Ok(Loaded { train, val, val_name, classes, pre })
}

/// The training transform: the augmentation preset, then the evaluation transform.
pub fn train_transform(pre: &Preprocess, augment: &str) -> Result<Compose, String> {
    let (c, h, w) = (pre.input[0], pre.input[1], pre.input[2]);
    let mut t = Compose::new();
    if pre.resize {
        t = t.then(Resize::new(h, w));
    }
    match augment {
        "none" => {}
        "light" => t = t.then(RandomCrop::new(h, w).padding((h / 14).max(1))),
        "standard" => {
            t = t.then(RandomCrop::new(h, w).padding((h / 8).max(1)));
            // Flips suit colour photographs and clothing, not digits or letters.
            if c == 3 || pre.mean.first() == Some(&0.2860) {
                t = t.then(RandomHorizontalFlip::new(0.5));
            }
        }
        other => return Err(format!("--augment {other}: expected none, light or standard")),
    }
    let eval = Preprocess { resize: false, ..pre.clone() }.transform()?;
    Ok(t.then(eval))
}

/// A loader over `data` with `transform`.
pub fn loader(
    data: Arc<dyn Dataset>,
    batch: usize,
    shuffle: bool,
    seed: u64,
    transform: impl Transform + 'static,
) -> Result<DataLoader, String> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
    DataLoader::builder(data)
        .batch_size(batch)
        .shuffle(shuffle)
        .seed(seed)
        .workers(workers)
        .cache(true)
        .transform(transform)
        .build()
        .map_err(|e| format!("data loader: {e}"))
}
