//! Progress reporting for `fit`: a callback that draws a progress bar per epoch (batches done,
//! ETA, samples/s, running loss and accuracy) and prints one summary line per epoch, or plain
//! lines when the output is not a terminal, or one JSON object per epoch, or nothing. It also
//! records the learning rate of every optimizer step (what the report plots).
//!
//! ```
//! # fn main() -> kiln::Result<()> {
//! use kiln::data::{DataLoader, TensorDataset};
//! use kiln::model::ModelBuilder;
//! use kiln::tensor::Tensor;
//! use kiln::train::{Progress, ProgressStyle, Trainer, TrainerConfig};
//!
//! let x = Tensor::new(&[8, 1, 2, 2], (0..32).map(|i| i as f32 / 32.0).collect())?;
//! let train = DataLoader::builder(TensorDataset::new(x, vec![0, 1, 0, 1, 0, 1, 0, 1])?).batch_size(4).build()?;
//! let model = ModelBuilder::new(&[4, 1, 2, 2]).dense(2).build()?;
//! let mut trainer = Trainer::new(&model, TrainerConfig { batch_size: 4, ..Default::default() })?;
//! // ProgressStyle::Auto: a bar on a terminal, plain lines otherwise.
//! let mut progress = Progress::new(ProgressStyle::Quiet, train.len(), 2);
//! trainer.fit_with(&train, None, 2, &mut [&mut progress])?;
//! assert_eq!(progress.lr_steps().len(), 4); // one learning rate per optimizer step
//! # Ok(()) }
//! ```

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle as BarStyle};

use super::callbacks::{Callback, Control, format_log};
use super::metrics::{EpochLog, Metrics};
use super::trainer::Trainer;
use crate::Result;

/// How [`Progress`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressStyle {
    /// A bar when standard output is a terminal, else [`ProgressStyle::Plain`].
    Auto,
    /// A redrawn bar per epoch (on standard error), then the epoch's summary line.
    Bar,
    /// Text lines only: a line at each quarter of an epoch and the epoch's summary line.
    Plain,
    /// One JSON object per epoch (the [`EpochLog`]) on standard output, nothing else.
    Json,
    /// Nothing printed (learning rates are still recorded).
    Quiet,
}

/// A `fit` callback reporting progress; see the module documentation.
pub struct Progress {
    style: ProgressStyle,
    batches: usize,
    epochs: usize,
    bar: Option<ProgressBar>,
    epoch_start: Instant,
    last_draw: Instant,
    samples: usize,
    lr_steps: Vec<(u64, f64)>,
    out: Box<dyn Write + Send>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress").field("style", &self.style).field("batches", &self.batches).finish()
    }
}

impl Progress {
    /// Reports `epochs` epochs of `batches` batches each, printing to standard output.
    pub fn new(style: ProgressStyle, batches: usize, epochs: usize) -> Progress {
        let style = match style {
            ProgressStyle::Auto if std::io::stdout().is_terminal() => ProgressStyle::Bar,
            ProgressStyle::Auto => ProgressStyle::Plain,
            s => s,
        };
        Progress {
            style,
            batches,
            epochs,
            bar: None,
            epoch_start: Instant::now(),
            last_draw: Instant::now(),
            samples: 0,
            lr_steps: Vec::new(),
            out: Box::new(std::io::stdout()),
        }
    }

    /// Writes lines (plain and JSON styles) to `out` instead of standard output.
    pub fn to_writer(mut self, out: impl Write + Send + 'static) -> Progress {
        self.out = Box::new(out);
        self
    }

    /// The style in use (`Auto` resolved).
    pub fn style(&self) -> ProgressStyle {
        self.style
    }

    /// `(optimizer step, learning rate it used)` for every step taken during `fit`.
    pub fn lr_steps(&self) -> &[(u64, f64)] {
        &self.lr_steps
    }

    /// Prints a line (above the bar, if one is drawn), unless quiet or JSON.
    pub fn println(&mut self, line: &str) {
        match (&self.bar, self.style) {
            (_, ProgressStyle::Quiet | ProgressStyle::Json) => {}
            (Some(bar), _) => bar.println(line),
            (None, _) => {
                let _ = writeln!(self.out, "{line}");
            }
        }
    }

    fn start_epoch(&mut self, trainer: &Trainer) {
        self.epoch_start = Instant::now();
        self.samples = 0;
        if self.style == ProgressStyle::Bar {
            let bar = ProgressBar::with_draw_target(Some(self.batches as u64), ProgressDrawTarget::stderr_with_hz(8));
            let template =
                "epoch {prefix} [{bar:30.cyan/blue}] {pos}/{len} | {elapsed_precise} < {eta_precise} | {msg}";
            if let Ok(s) = BarStyle::with_template(template) {
                bar.set_style(s.progress_chars("=> "));
            }
            bar.set_prefix(format!("{}/{}", trainer.epochs_done() + 1, self.epochs));
            self.bar = Some(bar);
        }
    }

    fn running(&self, trainer: &mut Trainer, done: usize) -> Result<String> {
        let m = trainer.running_metrics()?;
        let secs = self.epoch_start.elapsed().as_secs_f64().max(1e-9);
        let mut s = format!("{:.0} samples/s | loss {:.4}", self.samples as f64 / secs, m.loss);
        if let Some(a) = m.accuracy {
            s += &format!(" acc {:.2}%", a * 100.0);
        }
        if self.style == ProgressStyle::Plain {
            s = format!("epoch {}/{} batch {done}/{} | {s}", trainer.epochs_done() + 1, self.epochs, self.batches);
        }
        Ok(s)
    }
}

impl Callback for Progress {
    fn on_batch_end(&mut self, trainer: &mut Trainer) -> Result<Control> {
        let done = trainer.batches_done_in_epoch();
        if self.lr_steps.last().is_none_or(|&(s, _)| s != trainer.steps_taken()) && trainer.steps_taken() > 0 {
            self.lr_steps.push((trainer.steps_taken(), trainer.last_lr));
        }
        if done <= 1 || (self.bar.is_none() && self.style == ProgressStyle::Bar) {
            self.start_epoch(trainer);
        }
        self.samples += trainer.config().batch_size;
        match self.style {
            ProgressStyle::Bar => {
                if let Some(bar) = &self.bar {
                    bar.set_position(done as u64);
                }
                if self.last_draw.elapsed() >= Duration::from_millis(250) || done == self.batches {
                    self.last_draw = Instant::now();
                    let msg = self.running(trainer, done)?;
                    if let Some(bar) = &self.bar {
                        bar.set_message(msg);
                    }
                }
            }
            ProgressStyle::Plain => {
                let quarter = self.batches.div_ceil(4).max(1);
                if done.is_multiple_of(quarter) && done < self.batches {
                    let line = self.running(trainer, done)?;
                    let _ = writeln!(self.out, "{line}");
                }
            }
            _ => {}
        }
        Ok(Control::Continue)
    }

    fn on_epoch_end(&mut self, log: &EpochLog) -> Control {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        match self.style {
            ProgressStyle::Json => {
                if let Ok(s) = serde_json::to_string(log) {
                    let _ = writeln!(self.out, "{s}");
                }
            }
            ProgressStyle::Quiet => {}
            _ => {
                let _ = writeln!(self.out, "{}", format_log(log));
            }
        }
        let _ = self.out.flush();
        Control::Continue
    }
}

impl Trainer {
    /// Loss and accuracy of the training batches of the open epoch so far (one device read; the
    /// sums are not cleared). In data-parallel training, this rank's own.
    pub fn running_metrics(&mut self) -> Result<Metrics> {
        self.read_metrics(crate::exec::Sums::Train, false)
    }
}
