//! Models and training checkpoints as safetensors files.
//!
//! One file holds:
//! - the weights and running statistics under their PyTorch `state_dict` names and layouts
//!   (`conv1.weight` `[out, in, kh, kw]`, `bn1.running_var`, ...), F32, plus an I64 scalar
//!   `{bn}.num_batches_tracked` per batch-norm layer with running statistics, as PyTorch has, so
//!   `model.load_state_dict(safetensors.torch.load_file(path), strict=True)` accepts a model
//!   file for the equivalent `torch.nn` model;
//! - in `__metadata__`: `kiln.model`, the architecture as JSON (input shape, seed, the layers
//!   with their options), so [`Model::load`] needs none of the code that built the model;
//!   `format: pt`; `kiln.format_version`; `kiln.checksum` (see `safetensors.rs`);
//! - for a checkpoint, `kiln.trainer` (the [`TrainerMeta`] as JSON, with the loss scaler's
//!   scale, good steps and skipped steps when the run scales its loss: `scaler`, absent from
//!   older files, which still load) and the trainer's state tensors under `trainer/{name}`
//!   ([`TrainerState`]);
//! - the caller's own string pairs, if it gave any ([`Model::save_with_metadata`], read back by
//!   [`Model::load_with_metadata`] or [`Model::load_metadata`]): class names, preprocessing, a
//!   dataset's name. Keys starting with `kiln.` and the key `format` are kiln's and refused there.
//!   The checksum covers them, so an altered value fails to load like an altered weight.
//!
//! `num_batches_tracked`: kiln's batch norm always uses its fixed `momentum`, for which PyTorch
//! never reads this count, so it changes no result. [`Model::save`] writes 0 (a model does not
//! know how it was trained); [`Trainer::save_checkpoint`] writes the training batches run
//! ([`TrainerState::batches_trained`]), what PyTorch would have counted. On load it is accepted
//! if it is an integer scalar, and ignored.
//!
//! ```
//! use kiln::model::{Model, ModelBuilder};
//!
//! let model = ModelBuilder::new(&[1, 3, 8, 8]).conv2d(4, 3).name("conv1").batch_norm().name("bn1").relu()
//!     .dense(2).name("fc").build().unwrap();
//! let path = std::env::temp_dir().join(format!("kiln-doc-model-{}.safetensors", std::process::id()));
//! model.save(&path).unwrap();
//! let back = Model::load(&path).unwrap(); // no builder code needed
//! assert_eq!(back.nodes(), model.nodes());
//! assert_eq!(back.param_values(), model.param_values());
//! # std::fs::remove_file(&path).ok();
//! ```
//!
//! Everything read is checked before it is used: the graph as the builder checks it, every
//! weight present with its exact shape and finite, nothing unknown (all problems are listed in
//! one error), and the trainer state against the model ([`TrainerState::check`]).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::safetensors::{self as st, Entry, Parsed, VERSION_KEY};
use crate::backend::Device;
use crate::model::{Layer, Model, Node, ParamRole, ParamSpec};
use crate::train::{StateTensor, Trainer, TrainerMeta, TrainerState};
use crate::{Error, Result};

const MODEL_KEY: &str = "kiln.model";
const TRAINER_KEY: &str = "kiln.trainer";
const VERSION: &str = "1";
/// Prefix of the trainer-state tensors in a checkpoint.
const TRAINER_PREFIX: &str = "trainer/";

/// The architecture as stored in `kiln.model`.
#[derive(Serialize, Deserialize)]
struct SavedModel {
    /// `[batch, C, H, W]` or `[batch, features]`, the builder's input shape.
    input_shape: Vec<usize>,
    seed: u64,
    nodes: Vec<Node>,
}

/// The content of a kiln file: a model and, for a training checkpoint, the trainer's state.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// The model: architecture and weights.
    pub model: Model,
    /// The trainer's state, for a training checkpoint (`None` for a model file).
    pub trainer: Option<TrainerState>,
}

impl Checkpoint {
    /// Reads and checks a file written by [`Model::save`] or [`Trainer::save_checkpoint`].
    pub fn read(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref();
        Checkpoint::from_bytes(&st::read(path)?, path)
    }

    /// As [`Checkpoint::read`], from the file's bytes (`path` only names it in errors).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Checkpoint> {
        Ok(Checkpoint::decode(bytes, path)?.0)
    }

    /// As [`Checkpoint::from_bytes`], with the caller's metadata.
    fn decode(bytes: &[u8], path: &Path) -> Result<(Checkpoint, BTreeMap<String, String>)> {
        let fail = |reason: String| Error::format(path, reason);
        let file = st::parse(bytes, path)?;
        if let Some(v) = file.metadata.get(VERSION_KEY)
            && v != VERSION
        {
            return Err(fail(format!("format version {v} is not {VERSION}: written by another kiln version")));
        }
        let Some(arch) = file.metadata.get(MODEL_KEY) else {
            return Err(fail(format!(
                "has no architecture ('{MODEL_KEY}' metadata): not written by kiln; build the model in code \
                 and use Model::load_weights"
            )));
        };
        let arch: SavedModel =
            serde_json::from_str(arch).map_err(|e| fail(format!("architecture ('{MODEL_KEY}') is invalid: {e}")))?;
        let specs = Model::check_saved_graph(&arch.nodes, &arch.input_shape)
            .map_err(|e| fail(format!("architecture is invalid: {e}")))?;
        let meta: Option<TrainerMeta> = match file.metadata.get(TRAINER_KEY) {
            Some(m) => Some(
                serde_json::from_str(m)
                    .map_err(|e| fail(format!("trainer state ('{TRAINER_KEY}') is invalid: {e}")))?,
            ),
            None => None,
        };
        let values = match_weights(&specs, &arch.nodes, &file, meta.is_some()).map_err(|p| fail(p.message()))?;
        let model = Model::from_saved(arch.nodes, specs, values, arch.input_shape[0], arch.seed);
        let trainer = match meta {
            None => None,
            Some(meta) => {
                let mut tensors = BTreeMap::new();
                for (name, raw) in &file.tensors {
                    let Some(short) = name.strip_prefix(TRAINER_PREFIX) else { continue };
                    let t = if raw.dtype == ::safetensors::Dtype::F64 {
                        raw.to_f64_exact().map(StateTensor::F64)
                    } else {
                        raw.to_f32_exact().map(StateTensor::F32)
                    };
                    tensors.insert(short.to_string(), t.map_err(|e| fail(format!("tensor '{name}': {e}")))?);
                }
                let state = TrainerState { meta, tensors };
                state.check(&model).map_err(|e| fail(e.to_string()))?;
                Some(state)
            }
        };
        Ok((Checkpoint { model, trainer }, user_metadata(&file)))
    }

    /// The file's bytes. Refuses non-finite weights or state (a diverged run must not replace a
    /// good checkpoint) and a trainer state that does not fit the model.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        encode(&self.model, self.trainer.as_ref(), &BTreeMap::new())
    }

    /// Writes the file atomically (a crash leaves the previous file at `path` intact).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        st::write_atomic(path.as_ref(), &self.to_bytes()?)
    }
}

/// Whether a metadata key is kiln's own (not the caller's).
fn is_reserved(key: &str) -> bool {
    key.starts_with("kiln.") || key == "format"
}

/// The caller's pairs of a file's metadata: all but kiln's own keys.
fn user_metadata(file: &Parsed) -> BTreeMap<String, String> {
    file.metadata.iter().filter(|(k, _)| !is_reserved(k)).map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn encode(model: &Model, trainer: Option<&TrainerState>, user: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    if let Some(k) = user.keys().find(|k| is_reserved(k)) {
        return Err(Error::State(format!(
            "not saving: metadata key '{k}' is kiln's own (keys starting with 'kiln.' and 'format' are reserved)"
        )));
    }
    let bad: Vec<&str> = model
        .params()
        .iter()
        .zip(model.param_values())
        .filter(|(_, v)| v.iter().any(|x| !x.is_finite()))
        .map(|(p, _)| p.name.as_str())
        .collect();
    if !bad.is_empty() {
        return Err(Error::State(format!("not saving: non-finite values (NaN or infinity) in {}", bad.join(", "))));
    }
    let mut tensors = BTreeMap::new();
    for (p, v) in model.params().iter().zip(model.param_values()) {
        tensors.insert(p.name.clone(), Entry::f32(p.shape.clone(), v));
    }
    let tracked = trainer.map(|t| t.batches_trained()).unwrap_or(0).min(i64::MAX as u64) as i64;
    for name in batches_tracked_names(model.nodes()) {
        tensors.insert(name, Entry::i64(vec![], &[tracked]));
    }
    let saved = SavedModel { input_shape: model.input_shape(), seed: model.seed(), nodes: model.nodes().to_vec() };
    let mut metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        (VERSION_KEY.to_string(), VERSION.to_string()),
        (MODEL_KEY.to_string(), json(&saved)?),
    ]);
    metadata.extend(user.iter().map(|(k, v)| (k.clone(), v.clone())));
    if let Some(state) = trainer {
        state.check(model).map_err(|e| Error::State(format!("not saving: {e}")))?;
        if let Some(p) = model.params().iter().find(|p| p.name.starts_with(TRAINER_PREFIX)) {
            return Err(Error::Param {
                name: p.name.clone(),
                reason: format!("a layer name starting with '{TRAINER_PREFIX}' cannot be saved in a checkpoint"),
            });
        }
        metadata.insert(TRAINER_KEY.to_string(), json(&state.meta)?);
        for (name, t) in &state.tensors {
            let entry = match t {
                StateTensor::F32(v) => Entry::f32(vec![v.len()], v),
                StateTensor::F64(v) => Entry::f64(vec![v.len()], v),
            };
            tensors.insert(format!("{TRAINER_PREFIX}{name}"), entry);
        }
    }
    st::encode(&tensors, metadata)
}

/// A metadata value: JSON text.
fn json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::State(format!("could not serialise metadata: {e}")))
}

/// `{bn}.num_batches_tracked` for every batch-norm layer with running statistics.
fn batches_tracked_names(nodes: &[Node]) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| matches!(&n.layer, Layer::BatchNorm(bn) if bn.track_running_stats))
        .map(|n| format!("{}.num_batches_tracked", n.name))
        .collect()
}

/// Everything wrong between a file's tensors and a model's parameters.
#[derive(Default)]
struct Problems {
    missing: Vec<String>,
    unexpected: Vec<String>,
    other: Vec<String>,
}

impl Problems {
    fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.other.is_empty()
    }

    fn message(&self) -> String {
        let n = self.missing.len() + self.unexpected.len() + self.other.len();
        let mut parts = vec![format!("does not fit the model ({n} problem{})", if n == 1 { "" } else { "s" })];
        if !self.missing.is_empty() {
            parts.push(format!("missing: {}", self.missing.join(", ")));
        }
        if !self.unexpected.is_empty() {
            parts.push(format!("unexpected: {}", self.unexpected.join(", ")));
        }
        parts.extend(self.other.iter().cloned());
        parts.join("; ")
    }
}

/// The values of `specs` from `file`, or every problem found: missing, unexpected, mis-shaped,
/// wrongly typed, non-finite tensors and negative running variances. `num_batches_tracked` may be
/// absent. With `checkpoint`, the `trainer/` tensors are not the model's concern.
fn match_weights(
    specs: &[ParamSpec],
    nodes: &[Node],
    file: &Parsed,
    checkpoint: bool,
) -> std::result::Result<Vec<Vec<f32>>, Problems> {
    let mut problems = Problems::default();
    let mut values = Vec::with_capacity(specs.len());
    for spec in specs {
        let Some(raw) = file.tensors.get(&spec.name) else {
            problems.missing.push(spec.name.clone());
            continue;
        };
        if raw.shape != spec.shape {
            problems
                .other
                .push(format!("{}: shape {:?} in the file, {:?} in the model", spec.name, raw.shape, spec.shape));
            continue;
        }
        match raw.to_f32() {
            Err(e) => problems.other.push(format!("{}: {e}", spec.name)),
            Ok(v) if v.iter().any(|x| !x.is_finite()) => {
                problems.other.push(format!("{}: non-finite values (NaN or infinity)", spec.name))
            }
            Ok(v) if spec.role == ParamRole::RunningVar && v.iter().any(|&x| x < 0.0) => {
                problems.other.push(format!("{}: negative running variance", spec.name))
            }
            Ok(v) => values.push(v),
        }
    }
    let tracked = batches_tracked_names(nodes);
    for (name, raw) in &file.tensors {
        if specs.iter().any(|s| &s.name == name) || (checkpoint && name.starts_with(TRAINER_PREFIX)) {
            continue;
        }
        if tracked.contains(name) {
            if !raw.is_integer_scalar() {
                problems.other.push(format!("{name}: must be an integer scalar, got {:?} {:?}", raw.dtype, raw.shape));
            }
            continue;
        }
        problems.unexpected.push(name.clone());
    }
    if problems.is_empty() { Ok(values) } else { Err(problems) }
}

/// The bytes of a checkpoint of `trainer` (what [`Trainer::save_checkpoint`] writes).
pub(crate) fn checkpoint_bytes(trainer: &mut Trainer) -> Result<Vec<u8>> {
    let state = trainer.state()?;
    encode(trainer.model()?, Some(&state), &BTreeMap::new())
}

impl Model {
    /// Writes the model (architecture and weights) to a safetensors file, atomically; see the
    /// module documentation for the layout. Non-finite weights are refused.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        self.save_with_metadata(path, &BTreeMap::new())
    }

    /// As [`Model::save`], with the caller's own metadata in the file (`__metadata__`, beside
    /// kiln's keys and covered by its checksum): class names, how inputs are prepared, anything a
    /// program needs to use the model from the file alone. Keys starting with `kiln.` and the key
    /// `format` are kiln's: an error names the first such key and nothing is written.
    ///
    /// ```
    /// use std::collections::BTreeMap;
    /// use kiln::model::{Model, ModelBuilder};
    ///
    /// let model = ModelBuilder::new(&[1, 4]).dense(2).build().unwrap();
    /// let path = std::env::temp_dir().join(format!("kiln-doc-meta-{}.safetensors", std::process::id()));
    /// let meta = BTreeMap::from([("classes".to_string(), r#"["cat","dog"]"#.to_string())]);
    /// model.save_with_metadata(&path, &meta).unwrap();
    /// let (back, read) = Model::load_with_metadata(&path).unwrap();
    /// assert_eq!(read, meta);
    /// assert_eq!(back.param_values(), model.param_values());
    /// # std::fs::remove_file(&path).ok();
    /// ```
    pub fn save_with_metadata(&self, path: impl AsRef<Path>, metadata: &BTreeMap<String, String>) -> Result<()> {
        st::write_atomic(path.as_ref(), &encode(self, None, metadata)?)
    }

    /// Reads a model written by [`Model::save`] (or the model of a checkpoint written by
    /// [`Trainer::save_checkpoint`]), with no need for the code that built it.
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        Ok(Checkpoint::read(path)?.model)
    }

    /// As [`Model::load`], with the caller's metadata [`Model::save_with_metadata`] wrote (empty
    /// for a file written without any). kiln's own keys are not in the map.
    pub fn load_with_metadata(path: impl AsRef<Path>) -> Result<(Model, BTreeMap<String, String>)> {
        let path = path.as_ref();
        let (checkpoint, metadata) = Checkpoint::decode(&st::read(path)?, path)?;
        Ok((checkpoint.model, metadata))
    }

    /// The caller's metadata of a safetensors file (what [`Model::save_with_metadata`] wrote;
    /// for a file written elsewhere, its `__metadata__` but `format`), without building the model.
    /// The file's checksum is checked when it has one.
    pub fn load_metadata(path: impl AsRef<Path>) -> Result<BTreeMap<String, String>> {
        let path = path.as_ref();
        Ok(user_metadata(&st::parse(&st::read(path)?, path)?))
    }

    /// Replaces every weight with those of a safetensors file holding a PyTorch `state_dict` (as
    /// `safetensors.torch.save_file(model.state_dict(), path)` writes it) or written by kiln. The
    /// file must have exactly this model's parameters and running statistics, by name and shape
    /// (`num_batches_tracked` may be present or not); F32, F64, F16 and BF16 are accepted. If
    /// anything does not fit, nothing is changed and the error lists every missing, unexpected
    /// and mis-shaped tensor.
    pub fn load_weights(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = st::read(path)?;
        self.load_weights_from_bytes(&bytes, path)
    }

    /// As [`Model::load_weights`], from the file's bytes (`path` only names it in errors).
    pub fn load_weights_from_bytes(&mut self, bytes: &[u8], path: &Path) -> Result<()> {
        let file = st::parse(bytes, path)?;
        let checkpoint = file.metadata.contains_key(TRAINER_KEY);
        let values = match_weights(self.params(), self.nodes(), &file, checkpoint)
            .map_err(|p| Error::format(path, p.message()))?;
        let names: Vec<String> = self.params().iter().map(|p| p.name.clone()).collect();
        for (name, v) in names.iter().zip(values) {
            self.set_param(name, &v)?;
        }
        Ok(())
    }
}

impl Trainer {
    /// Writes a checkpoint (weights, optimizer, schedule, counters, history, config) atomically:
    /// [`Trainer::resume`] on it continues exactly where this trainer is.
    pub fn save_checkpoint(&mut self, path: impl AsRef<Path>) -> Result<()> {
        st::write_atomic(path.as_ref(), &checkpoint_bytes(self)?)
    }

    /// A trainer continuing from a checkpoint, on the device it was saved with.
    pub fn resume(path: impl AsRef<Path>) -> Result<Trainer> {
        Trainer::resume_with(path, None)
    }

    /// As [`Trainer::resume`], on another device (results are bit for bit the original's only on
    /// the same device and thread count).
    pub fn resume_on(path: impl AsRef<Path>, device: Device) -> Result<Trainer> {
        Trainer::resume_with(path, Some(device))
    }

    fn resume_with(path: impl AsRef<Path>, device: Option<Device>) -> Result<Trainer> {
        let path = path.as_ref();
        let Checkpoint { model, trainer } = Checkpoint::read(path)?;
        let Some(mut state) = trainer else {
            return Err(Error::format(
                path,
                "has no trainer state: written by Model::save, not Trainer::save_checkpoint (use Model::load)",
            ));
        };
        if let Some(d) = device {
            state.meta.config.device = d;
        }
        Trainer::from_state(&model, state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelBuilder;

    fn tmp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("kiln-meta-{name}-{}.safetensors", std::process::id()))
    }

    fn model() -> Model {
        ModelBuilder::new(&[2, 3]).dense(4).relu().dense(2).build().unwrap()
    }

    #[test]
    fn user_metadata_round_trips_and_kiln_keys_stay_kiln_s() {
        let path = tmp("roundtrip");
        let m = model();
        let meta = BTreeMap::from([
            ("classes".to_string(), r#"["cat","dog"]"#.to_string()),
            ("preprocess".to_string(), "mean 0.5, std 0.25".to_string()),
            ("".to_string(), "empty key".to_string()),
        ]);
        m.save_with_metadata(&path, &meta).unwrap();
        let (back, read) = Model::load_with_metadata(&path).unwrap();
        assert_eq!(read, meta);
        assert_eq!(Model::load_metadata(&path).unwrap(), meta);
        assert_eq!(back.param_values(), m.param_values());
        // A plain save has none; the file's own keys are not the caller's.
        m.save(&path).unwrap();
        assert!(Model::load_metadata(&path).unwrap().is_empty());
        assert!(Model::load_with_metadata(&path).unwrap().1.is_empty());
        for key in ["kiln.checksum", "kiln.model", "kiln.anything", "format"] {
            let bad = BTreeMap::from([(key.to_string(), "x".to_string())]);
            let e = m.save_with_metadata(&path, &bad).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("reserved"), "{key}: {e}");
        }
        // The refused saves left the last good file in place.
        assert!(Model::load_metadata(&path).unwrap().is_empty());
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn an_altered_metadata_value_fails_the_checksum() {
        let path = tmp("tamper");
        let meta = BTreeMap::from([("classes".to_string(), r#"["cat","dog"]"#.to_string())]);
        model().save_with_metadata(&path, &meta).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        // Same length, so the header and the tensor offsets stay valid: only the checksum can tell.
        let (from, to) = (br#"[\"cat\",\"dog\"]"#, br#"[\"cat\",\"cow\"]"#);
        let at = bytes.windows(from.len()).position(|w| w == from).expect("the value is in the header");
        let mut altered = bytes.clone();
        altered[at..at + to.len()].copy_from_slice(to);
        std::fs::write(&path, &altered).unwrap();
        for e in [
            Model::load_metadata(&path).unwrap_err().to_string(),
            Model::load_with_metadata(&path).unwrap_err().to_string(),
            Model::load(&path).unwrap_err().to_string(),
        ] {
            assert!(e.contains("checksum mismatch"), "{e}");
        }
        // The unaltered bytes still load (the test altered what it meant to).
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(Model::load_metadata(&path).unwrap(), meta);
        std::fs::remove_file(&path).ok();
    }
}
