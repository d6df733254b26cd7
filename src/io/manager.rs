//! The checkpoint manager: a `fit` callback that saves checkpoints every N epochs (and, if asked,
//! every N batches), keeps the last K, and keeps the best by a chosen figure.
//!
//! ```
//! # fn main() -> kiln::Result<()> {
//! use kiln::data::{DataLoader, TensorDataset};
//! use kiln::io::CheckpointManager;
//! use kiln::model::ModelBuilder;
//! use kiln::tensor::Tensor;
//! use kiln::train::{Monitor, Trainer, TrainerConfig};
//!
//! let images = Tensor::new(&[8, 1, 2, 2], (0..32).map(|i| i as f32 / 32.0).collect())?;
//! let train = DataLoader::builder(TensorDataset::new(images, vec![0, 1, 0, 1, 0, 1, 0, 1])?).batch_size(4).build()?;
//! let model = ModelBuilder::new(&[4, 1, 2, 2]).dense(2).build()?;
//! let dir = std::env::temp_dir().join(format!("kiln-doc-checkpoints-{}", std::process::id()));
//! let mut ckpt = CheckpointManager::new(&dir)?.every_epochs(1).keep_last(2).best(Monitor::TrainLoss);
//! // Run again after a crash, the same program continues from the newest checkpoint.
//! let mut trainer = match ckpt.latest()? {
//!     Some(path) => Trainer::resume(path)?,
//!     None => Trainer::new(&model, TrainerConfig { batch_size: 4, ..Default::default() })?,
//! };
//! trainer.fit_with(&train, None, 3, &mut [&mut ckpt])?;
//! assert_eq!(ckpt.checkpoints()?.len(), 2); // epochs 2 and 3
//! assert!(ckpt.best_path().exists());
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(()) }
//! ```
//!
//! Files in the directory: `epoch-00003-step-000000120.safetensors` (3 epochs and 120
//! optimizer steps done; mid-epoch with [`CheckpointManager::every_batches`], or when
//! [`CheckpointManager::save`] is called from a loop of one's own) and `best.safetensors`. Only
//! files named so are ever deleted. Each is written atomically, so a crash or kill during a save leaves the earlier files
//! intact; a kill can leave a temporary `.epoch-….tmp-…` file, which the manager's first save
//! removes.

use std::fs;
use std::path::{Path, PathBuf};

use super::checkpoint::checkpoint_bytes;
use super::safetensors::write_atomic;
use crate::train::{Callback, Control, EpochLog, Monitor, Trainer};
use crate::{Error, Result};

const SUFFIX: &str = ".safetensors";
const BEST: &str = "best.safetensors";

/// Saves checkpoints during `fit`; see the module documentation.
#[derive(Clone, Debug)]
pub struct CheckpointManager {
    dir: PathBuf,
    every_epochs: usize,
    every_batches: usize,
    keep_last: Option<usize>,
    best: Option<Monitor>,
    /// Whether the directory has been swept of temporary files yet.
    swept: bool,
}

/// The order of a periodic checkpoint's file name `epoch-{e}-step-{s}.safetensors`:
/// `(optimizer steps, epochs done)`, which only grow as training goes on.
fn position(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix("epoch-")?.strip_suffix(SUFFIX)?;
    let number = |s: &str| (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten();
    let (e, s) = rest.split_once("-step-")?;
    Some((number(s)?, number(e)?))
}

impl CheckpointManager {
    /// A manager saving into `dir` (created if missing) after every epoch and keeping the last 3.
    /// A directory has one writing manager; others may read it ([`CheckpointManager::latest`]).
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(CheckpointManager { dir, every_epochs: 1, every_batches: 0, keep_last: Some(3), best: None, swept: false })
    }

    /// Removes temporary files that saves killed mid-write left behind. Done by the first save,
    /// not by `new`: a manager made only to find the latest checkpoint must not delete the file
    /// that the directory's writer is writing.
    fn sweep(&mut self) {
        if std::mem::replace(&mut self.swept, true) {
            return;
        }
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name.starts_with(".epoch-") || name.starts_with(&format!(".{BEST}"));
            if ours && name.contains(&format!("{SUFFIX}.tmp-")) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Save after every `n`-th epoch (0: never).
    pub fn every_epochs(mut self, n: usize) -> Self {
        self.every_epochs = n;
        self
    }

    /// Also save every `n` batches within an epoch (0, the default: never), so a crash loses at
    /// most `n` batches; the resumed `fit` continues mid-epoch.
    pub fn every_batches(mut self, n: usize) -> Self {
        self.every_batches = n;
        self
    }

    /// Keep the newest `k` periodic checkpoints (at least 1), deleting older ones.
    pub fn keep_last(mut self, k: usize) -> Self {
        self.keep_last = Some(k.max(1));
        self
    }

    /// Keep every periodic checkpoint.
    pub fn keep_all(mut self) -> Self {
        self.keep_last = None;
        self
    }

    /// Also keep `best.safetensors`: the checkpoint of the epoch with the best `monitor` figure
    /// so far (judged against the trainer's whole history, so it carries over a resume).
    pub fn best(mut self, monitor: Monitor) -> Self {
        self.best = Some(monitor);
        self
    }

    /// The directory the checkpoints go to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the best checkpoint is kept.
    pub fn best_path(&self) -> PathBuf {
        self.dir.join(BEST)
    }

    /// The periodic checkpoints in the directory, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<PathBuf>> {
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))? {
            let entry = entry.map_err(|e| Error::io(&self.dir, e))?;
            if let Some(pos) = position(&entry.file_name().to_string_lossy()) {
                found.push((pos, entry.path()));
            }
        }
        found.sort();
        Ok(found.into_iter().map(|(_, p)| p).collect())
    }

    /// The newest periodic checkpoint, to resume from.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        Ok(self.checkpoints()?.pop())
    }

    /// Saves a periodic checkpoint of `trainer` now, deletes the ones beyond the last K, and
    /// returns its path.
    pub fn save(&mut self, trainer: &mut Trainer) -> Result<PathBuf> {
        let (e, s) = (trainer.epochs_done(), trainer.steps_taken());
        let name = format!("epoch-{e:05}-step-{s:09}{SUFFIX}");
        let path = self.dir.join(name);
        self.sweep();
        write_atomic(&path, &checkpoint_bytes(trainer)?)?;
        self.prune(&path)?;
        Ok(path)
    }

    fn prune(&self, keep: &Path) -> Result<()> {
        let Some(k) = self.keep_last else { return Ok(()) };
        let all = self.checkpoints()?;
        let excess = all.len().saturating_sub(k);
        for old in all.iter().take(excess).filter(|p| p.as_path() != keep) {
            fs::remove_file(old).map_err(|e| Error::io(old, e))?;
        }
        Ok(())
    }
}

impl Callback for CheckpointManager {
    fn on_epoch_end_with_trainer(&mut self, trainer: &mut Trainer, log: &EpochLog) -> Result<Control> {
        if self.every_epochs > 0 && trainer.epochs_done().is_multiple_of(self.every_epochs) {
            self.save(trainer)?;
        }
        if let Some(monitor) = self.best
            && let Some((v, larger_better)) = monitor.read(log)
        {
            let history = &trainer.history().epochs;
            let before = &history[..history.len().saturating_sub(1)];
            let improved =
                before.iter().filter_map(|l| monitor.read(l)).all(|(b, _)| if larger_better { v > b } else { v < b });
            if improved {
                self.sweep();
                write_atomic(&self.best_path(), &checkpoint_bytes(trainer)?)?;
            }
        }
        Ok(Control::Continue)
    }

    fn on_batch_end(&mut self, trainer: &mut Trainer) -> Result<Control> {
        if self.every_batches > 0 && trainer.batches_done_in_epoch().is_multiple_of(self.every_batches) {
            self.save(trainer)?;
        }
        Ok(Control::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::position;

    #[test]
    fn file_names_order_by_step_then_epoch() {
        assert_eq!(position("epoch-00003-step-000000040.safetensors"), Some((40, 3)));
        assert!(
            position("epoch-00003-step-000000040.safetensors") < position("epoch-00002-step-000000041.safetensors")
        );
        for other in [
            "best.safetensors",
            "epoch-00003.safetensors",
            "epoch-3-step-.safetensors",
            ".epoch-00001-step-000000001.safetensors.tmp-1-0",
            "epoch-00001-step-000000001.json",
        ] {
            assert_eq!(position(other), None, "{other}");
        }
    }
}
