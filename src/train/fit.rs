//! The `fit` loop: epochs over a loader, evaluation, callbacks, and the per-epoch figures.

use std::time::Instant;

use super::callbacks::{Callback, Control};
use super::config::{Problem, ScheduleUnit};
use super::loss::Loss;
use super::metrics::{EpochLog, History, Metrics};
use super::trainer::Trainer;
use crate::data::DataLoader;
use crate::exec::Sums;
use crate::rng::mix_seed;
use crate::{Error, Result};

/// Salt that keeps `fit`'s data order stream apart from the dropout stream of the same seed.
const DATA_ORDER_SALT: u64 = 0x0DA7_A0D3;

impl Trainer {
    /// The loader epoch that `fit`'s current epoch walks: a function of the config's seed and
    /// the epoch, so the seed drives the order (and augmentation) of the data.
    fn data_epoch(&self) -> u64 {
        mix_seed(self.config.seed ^ DATA_ORDER_SALT, self.epoch as u64)
    }

    /// Reads and clears the training figures summed since the last call (one device read). In
    /// data-parallel training they are summed over the group, so every rank must call this.
    pub fn take_epoch_metrics(&mut self) -> Result<Metrics> {
        self.report_non_finite()?;
        let m = self.read_metrics(Sums::Train, self.dist.is_some())?;
        self.exec.set_sums(Sums::Train, None)?;
        Ok(m)
    }

    /// The metrics summed in `sums`; with `combine`, summed over the data-parallel group.
    pub(super) fn read_metrics(&mut self, sums: Sums, combine: bool) -> Result<Metrics> {
        let f = self.exec.figures(sums, combine)?;
        let classification = self.config.problem == Problem::Classification;
        let classes: usize = self.out_shape.iter().product();
        let argmax = matches!(
            self.config.loss,
            Loss::SparseCrossEntropy | Loss::CrossEntropy { .. } | Loss::CategoricalCrossEntropy
        );
        Ok(Metrics {
            loss: if f.samples > 0.0 { f.sum_loss / f.samples } else { 0.0 },
            accuracy: (classification && f.scored > 0.0).then(|| f.sum_correct / f.scored),
            // With k at least the class count every target is in the top k: not reported.
            top_k_accuracy: (classification && argmax && f.scored > 0.0 && self.config.top_k < classes)
                .then(|| f.sum_correct_k / f.scored),
            top_k: self.config.top_k,
            samples: f.samples as usize,
        })
    }

    /// Ends an epoch outside `fit`: advances a per-epoch schedule (`metric` feeds plateau
    /// detection) and counts the epoch.
    pub fn end_epoch(&mut self, metric: Option<f64>) -> Result<()> {
        if self.config.schedule_unit == ScheduleUnit::Epoch {
            self.scheduler.step(metric)?;
        }
        self.epoch += 1;
        self.batch_in_epoch = 0;
        Ok(())
    }

    /// Data-parallel `fit`: the loader must be this rank's shard, and every rank must have the
    /// same number of batches per epoch (else one would wait for the others at an all-reduce
    /// that never comes).
    fn check_shards(&mut self, train: &DataLoader) -> Result<()> {
        let Some(d) = &self.dist else { return Ok(()) };
        let (rank, world) = (d.rank, d.world);
        if world > 1 && train.shard() != (rank, world) {
            let (r, w) = train.shard();
            return Err(Error::config(
                "train loader",
                format!(
                    "rank {rank} of {world} trains on shard {r} of {w}: build the loader with \
                     .shard(trainer.rank(), trainer.world_size()) so each sample is seen once per epoch"
                ),
            ));
        }
        if world == 1 {
            return Ok(());
        }
        let len = train.len() as f64;
        let mut v = [len, len * len];
        self.exec.communicator()?.all_reduce_sum_f64(&mut v)?;
        // Equal counts on every rank exactly when world * sum(len^2) == sum(len)^2.
        if world as f64 * v[1] != v[0] * v[0] {
            return Err(Error::config(
                "train loader",
                format!(
                    "the ranks have different numbers of batches per epoch (this rank {len}, {} on average): \
                     build the loader with drop_last(true)",
                    v[0] / world as f64
                ),
            ));
        }
        Ok(())
    }

    /// Trains for `epochs` epochs in total (continuing from the epochs already done), evaluating
    /// on `val` after each, and returns the history. Epoch `e` walks the loader in the order of
    /// its epoch `mix(config.seed, e)`, so [`crate::train::TrainerConfig::seed`] decides the
    /// data order and augmentation (and a resumed run continues the same order).
    pub fn fit(&mut self, train: &DataLoader, val: Option<&DataLoader>, epochs: usize) -> Result<History> {
        self.fit_with(train, val, epochs, &mut [])
    }

    /// As [`Trainer::fit`], calling `callbacks` after every batch and every epoch; any of them can
    /// stop training. Stopped after a batch, the epoch stays open: a later `fit` (or one on a
    /// trainer resumed from a checkpoint taken then) continues it from the next batch.
    pub fn fit_with(
        &mut self,
        train: &DataLoader,
        val: Option<&DataLoader>,
        epochs: usize,
        callbacks: &mut [&mut dyn Callback],
    ) -> Result<History> {
        let first = self.history.epochs.len();
        no_batches("fit: the training loader", train)?;
        if let Some(v) = val {
            no_batches("fit: the validation loader", v)?;
        }
        self.check_shards(train)?;
        if self.batch_in_epoch == 0 {
            // Mid-epoch (resumed), the sums of the batches already done belong to this epoch.
            self.take_epoch_metrics()?;
        }
        while self.epoch < epochs {
            let t0 = Instant::now();
            let mut stop = false;
            for batch in train.epoch_from(self.data_epoch(), self.batch_in_epoch) {
                let batch = batch?;
                self.train_step(&batch.inputs, &batch.labels)?;
                train.recycle(batch);
                self.batch_in_epoch += 1;
                for cb in callbacks.iter_mut() {
                    stop |= cb.on_batch_end(self)? == Control::Stop;
                }
                if stop {
                    break;
                }
            }
            if stop {
                break;
            }
            let train_m = self.take_epoch_metrics()?;
            let val_m = match val {
                Some(v) => Some(self.evaluate(v)?),
                None => None,
            };
            let lr = self.last_lr;
            let metric = Some(val_m.map(|m| m.loss).unwrap_or(train_m.loss) as f64);
            self.end_epoch(metric)?;
            let log =
                EpochLog { epoch: self.epoch, train: train_m, val: val_m, lr, seconds: t0.elapsed().as_secs_f64() };
            self.history.epochs.push(log.clone());
            for cb in callbacks.iter_mut() {
                stop |= cb.on_epoch_end(&log) == Control::Stop;
                stop |= cb.on_epoch_end_with_trainer(self, &log)? == Control::Stop;
            }
            if stop {
                break;
            }
        }
        Ok(History { epochs: self.history.epochs[first..].to_vec() })
    }
}

/// An epoch of no batches would train nothing and report a loss of 0: an error naming the loader.
pub(super) fn no_batches(what: &str, loader: &DataLoader) -> Result<()> {
    if !loader.is_empty() {
        return Ok(());
    }
    let (rank, world) = loader.shard();
    let shard = if world > 1 { format!(", shard {rank} of {world}") } else { String::new() };
    Err(Error::State(format!(
        "{what} has no batches ({} samples{shard}, batch size {}); nothing to train or evaluate on",
        loader.num_samples(),
        loader.batch_size()
    )))
}
