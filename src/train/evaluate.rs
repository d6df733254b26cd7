//! Using the model outside training steps: predictions, evaluation over tensors or a loader,
//! and a training-mode forward pass that changes nothing.

use super::config::Problem;
use super::loss::{Loss, Targets};
use super::metrics::Metrics;
use super::trainer::{StepKind, Trainer};
use crate::data::DataLoader;
use crate::exec::{Mode, PlanOptions, Sums};
use crate::tensor::Tensor;
use crate::{Error, Result};

impl Trainer {
    /// Runs `inputs` through the model in evaluation mode (no dropout, batch norm on running
    /// statistics) and returns the raw outputs (logits for the logit losses).
    pub fn predict(&mut self, inputs: &Tensor) -> Result<Tensor> {
        self.predict_with(inputs, Mode::Eval)
    }

    /// As [`Trainer::predict`], in the given mode (training mode applies dropout and batch
    /// statistics, and updates running statistics).
    pub fn predict_with(&mut self, inputs: &Tensor, mode: Mode) -> Result<Tensor> {
        let n = self.check_inputs(inputs)?;
        let per_in: usize = inputs.len() / n;
        let c: usize = self.out_shape.iter().product();
        let mut out = Vec::with_capacity(n * c);
        for start in (0..n).step_by(self.config.batch_size) {
            let b = self.config.batch_size.min(n - start);
            let plan = self.exec.plan(b, mode, PlanOptions::default())?;
            self.exec.set_input(plan, &inputs.data()[start * per_in..(start + b) * per_in])?;
            self.exec.run_forward(plan)?;
            out.extend(self.exec.read_output(plan)?);
        }
        let mut shape = vec![n];
        shape.extend_from_slice(&self.out_shape);
        Tensor::new(&shape, out)
    }

    /// Predictions as probabilities: a softmax over classes for the cross-entropy losses, a
    /// sigmoid for logits under binary cross-entropy, the outputs unchanged otherwise.
    pub fn predict_proba(&mut self, inputs: &Tensor) -> Result<Tensor> {
        let mut out = self.predict(inputs)?;
        let c: usize = self.out_shape.iter().product();
        match self.config.loss {
            Loss::SparseCrossEntropy | Loss::CrossEntropy { .. } => {
                for row in out.data_mut().chunks_mut(c) {
                    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let s: f32 = row.iter().map(|v| (v - m).exp()).sum();
                    row.iter_mut().for_each(|v| *v = (*v - m).exp() / s);
                }
            }
            Loss::BinaryCrossEntropyWithLogits => {
                out.data_mut().iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp()))
            }
            _ => {}
        }
        Ok(out)
    }

    /// Loss and accuracy over `inputs` and `targets` in evaluation mode, in batches of the
    /// configured size.
    pub fn evaluate_tensors<'a>(&mut self, inputs: &Tensor, targets: impl Into<Targets<'a>>) -> Result<Metrics> {
        let targets = targets.into();
        let n = self.check_inputs(inputs)?;
        if targets.len() != n {
            return Err(Error::shape("targets", format!("{n} samples"), targets.len()));
        }
        self.exec.set_sums(Sums::Eval, None)?;
        let per_in = inputs.len() / n;
        for start in (0..n).step_by(self.config.batch_size) {
            let b = self.config.batch_size.min(n - start);
            let x = Tensor::new(
                &self.batch_shape(inputs, b),
                inputs.data()[start * per_in..(start + b) * per_in].to_vec(),
            )?;
            match targets {
                Targets::Classes(c) => self.eval_batch(&x, Targets::Classes(&c[start..start + b]))?,
                Targets::Values(t) => {
                    let per_t = t.len() / n;
                    let mut shape = t.shape().to_vec();
                    shape[0] = b;
                    let tb = Tensor::new(&shape, t.data()[start * per_t..(start + b) * per_t].to_vec())?;
                    self.eval_batch(&x, Targets::Values(&tb))?
                }
            }
        }
        self.read_metrics(Sums::Eval, false)
    }

    fn batch_shape(&self, inputs: &Tensor, b: usize) -> Vec<usize> {
        let mut s = inputs.shape().to_vec();
        s[0] = b;
        s
    }

    /// Queues the evaluation of one batch, adding to the evaluation sums.
    fn eval_batch(&mut self, inputs: &Tensor, targets: Targets) -> Result<()> {
        let n = inputs.shape()[0];
        let classification = self.config.problem == Problem::Classification;
        let (f, scoring, tv) =
            self.config.loss.prepare(targets, n, &self.out_shape, classification, self.config.top_k)?;
        let plan = self.step_plan(n, StepKind::Eval, f, scoring)?;
        self.feed(plan, inputs, &tv)?;
        self.exec.run(plan)
    }

    /// Loss and accuracy over one pass of a loader, in evaluation mode. In data-parallel
    /// training, a loader sharded over the group (`.shard(rank, world)`) gives the metrics of
    /// the whole dataset, summed over the ranks (every rank must then call this); any other
    /// loader gives this rank's own.
    pub fn evaluate(&mut self, data: &DataLoader) -> Result<Metrics> {
        super::fit::no_batches("evaluate: the loader", data)?;
        self.exec.set_sums(Sums::Eval, None)?;
        for batch in data.epoch(0) {
            let batch = batch?;
            self.eval_batch(&batch.inputs, Targets::Classes(&batch.labels))?;
            data.recycle(batch);
        }
        let combine = self.dist.as_ref().is_some_and(|d| d.world > 1 && data.shard() == (d.rank, d.world));
        self.read_metrics(Sums::Eval, combine)
    }

    /// The model's outputs in training mode, as the next training step would compute them
    /// (batch statistics of this batch, the dropout masks the next step would draw), while
    /// changing nothing: running statistics are not updated and the dropout streams do not
    /// advance. For checking a model against a reference (PyTorch's `model.train()` forward);
    /// in data-parallel training the batch statistics are this rank's own.
    pub fn forward_train(&mut self, inputs: &Tensor) -> Result<Tensor> {
        let n = self.check_inputs(inputs)?;
        let per_in: usize = inputs.len() / n;
        let steps = self.exec.dropout_steps()?;
        let mut out = Vec::with_capacity(n * self.out_shape.iter().product::<usize>());
        for start in (0..n).step_by(self.config.batch_size) {
            let b = self.config.batch_size.min(n - start);
            let mut low = self.exec.lowering(b, Mode::Train);
            low.rank = self.rank();
            low.update_running_stats = false;
            let plan = self.exec.plan_for(low)?;
            self.exec.set_input(plan, &inputs.data()[start * per_in..(start + b) * per_in])?;
            self.exec.run_forward(plan)?;
            out.extend(self.exec.read_output(plan)?);
        }
        self.exec.set_dropout_steps(&steps)?;
        let mut shape = vec![n];
        shape.extend_from_slice(&self.out_shape);
        Tensor::new(&shape, out)
    }
}
