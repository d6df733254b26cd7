//! `--model`: recipes, zoo names, spec files and kiln model files; what the CLI keeps in a model
//! file's metadata ([`ModelMeta`]: the data it was trained on, class names, preprocessing), which
//! `eval` and `predict` read so they prepare inputs exactly as training did, from the model file
//! alone.
//!
//! Run folders written before the metadata moved into the model file kept it beside the model,
//! as `model.json`; [`load_model`] still reads that side file when the model file has none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln::model::{Model, ModelBuilder, ModelSpec};
use kiln::zoo;
use serde::{Deserialize, Serialize};

use crate::data::{DataSource, Preprocess};

pub const ZOO: &str = "simple_cnn, advanced_cnn, multiscale_cnn, mnist_cnn, cifar_cnn, resnet18, inception_block";

/// A zoo model's builder, if `name` is one.
pub fn zoo(name: &str, batch: usize, classes: usize) -> Option<ModelBuilder> {
    Some(match name {
        "simple_cnn" | "simple" => zoo::simple_cnn(batch),
        "advanced_cnn" | "advanced" => zoo::advanced_cnn(batch),
        "multiscale_cnn" | "multiscale" => zoo::multiscale_cnn(batch),
        "mnist_cnn" => zoo::mnist_cnn(batch),
        "cifar_cnn" | "cifar" => zoo::cifar_cnn(batch),
        "resnet18" => zoo::resnet18(batch, classes),
        "inception_block" => zoo::inception_block(batch, classes),
        _ => return None,
    })
}

/// The model file's metadata key under which the CLI keeps its [`ModelMeta`] (as JSON).
pub const META_KEY: &str = "kiln_cli.model";

/// What the CLI keeps in a model file's metadata.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelMeta {
    /// The data it was trained on.
    pub data: DataSource,
    /// The validation fraction and seed of that training (to find the held-out part again).
    pub val_split: f64,
    pub seed: u64,
    /// Class names in label order.
    pub classes: Vec<String>,
    /// How inputs are prepared.
    pub preprocess: Preprocess,
}

/// `runs/NAME` -> `runs/NAME/model.safetensors`; a file stays itself.
pub fn model_path(p: &Path) -> PathBuf {
    if p.is_dir() { p.join("model.safetensors") } else { p.to_path_buf() }
}

/// The side file of a model file where runs written before kept its [`ModelMeta`]:
/// `model.safetensors` -> `model.json`. Read only (see [`load_model`]); no longer written.
pub fn meta_path(model: &Path) -> PathBuf {
    model.with_extension("json")
}

/// Loads a kiln model file (or a run folder's) and the CLI's metadata: from the model file, or,
/// for a model file without it (a run written before the metadata moved into the file), from
/// the `model.json` side file beside it, if there is one.
pub fn load_model(p: &Path) -> Result<(Model, Option<ModelMeta>, PathBuf), String> {
    let path = model_path(p);
    if !path.exists() {
        return Err(format!("{}: no such model file (give a kiln model file or a run folder)", path.display()));
    }
    let (model, metadata) = Model::load_with_metadata(&path).map_err(|e| e.to_string())?;
    let meta = if let Some(json) = metadata.get(META_KEY) {
        Some(serde_json::from_str(json).map_err(|e| format!("{}: metadata {META_KEY}: {e}", path.display()))?)
    } else {
        let mp = meta_path(&path);
        if mp.exists() {
            let text = std::fs::read_to_string(&mp).map_err(|e| format!("{}: {e}", mp.display()))?;
            Some(serde_json::from_str(&text).map_err(|e| format!("{}: {e}", mp.display()))?)
        } else {
            None
        }
    };
    Ok((model, meta, path))
}

/// Writes `model` to `path` with `meta` in its metadata (under [`META_KEY`]).
pub fn save_model(model: &Model, path: &Path, meta: &ModelMeta) -> Result<(), String> {
    let json = serde_json::to_string(meta).map_err(|e| e.to_string())?;
    let metadata = BTreeMap::from([(META_KEY.to_string(), json)]);
    model.save_with_metadata(path, &metadata).map_err(|e| format!("{}: {e}", path.display()))
}

/// The model `--model` names, for inputs `input` (`[C, H, W]`) and `classes` classes.
pub fn resolve(
    spec: &str,
    recipe_spec: &str,
    input: &[usize],
    classes: usize,
    batch: usize,
    seed: u64,
) -> Result<Model, String> {
    let fill = |t: &str| t.replace("{classes}", &classes.to_string()).replace("{size}", &input[1].to_string());
    let model = if spec == "recipe" {
        if let Some(b) = zoo(recipe_spec, batch, classes) {
            b.seed(seed).build().map_err(|e| format!("--model recipe ({recipe_spec}): {e}"))?
        } else {
            ModelSpec::parse(&fill(recipe_spec), "<recipe>")
                .and_then(|s| ModelSpec { seed, ..s }.build(Some(batch)))
                .map_err(|e| format!("--model recipe: {e}"))?
        }
    } else if let Some(b) = zoo(spec, batch, classes) {
        b.seed(seed).build().map_err(|e| format!("--model {spec}: {e}"))?
    } else if spec.ends_with(".toml") {
        let s = ModelSpec::read(spec).map_err(|e| format!("--model: {e}"))?;
        s.build(Some(batch)).map_err(|e| format!("--model: {e}"))?
    } else if Path::new(spec).exists() {
        load_model(Path::new(spec))?.0
    } else {
        return Err(format!("--model {spec}: not a zoo name ({ZOO}), a spec file (.toml) or an existing model file"));
    };
    let got = &model.input_shape()[1..];
    if got != input {
        return Err(format!(
            "--model {spec} takes inputs of shape {got:?}, but the data gives {input:?} (choose a model for this data)"
        ));
    }
    let out: usize = model.output_shape()[1..].iter().product();
    if out != classes {
        return Err(format!("--model {spec} has {out} outputs, but the data has {classes} classes"));
    }
    Ok(model)
}
