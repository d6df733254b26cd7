//! Per-layer profiles (the seed's `CNNProfile`): forward and backward time, parameters,
//! activation memory, FLOPs and achieved GFLOP/s of every layer by name, plus the forward and
//! backward pass timed whole (eagerly and replayed as a CUDA graph where the backend has them) and
//! the device's peak memory.
//!
//! Each op of a training plan knows the layer it was lowered from ([`Plan::forward_nodes`],
//! [`Plan::backward_nodes`]); the backend times every op of a pass ([`Backend::profile`]: on
//! CUDA the ops run back to back with a device event between every two, on the CPU each op is
//! timed on the host), and the times are added up per layer. The medians of `reps` such passes
//! are reported, so a layer's sum is close to the whole pass run eagerly.
//!
//! ```
//! use kiln::backend::cpu::CpuBackend;
//! use kiln::exec::Executor;
//! use kiln::model::ModelBuilder;
//!
//! let model = ModelBuilder::new(&[1, 1, 8, 8]).conv2d(4, 3).relu().flatten().dense(10).build().unwrap();
//! let mut exec = Executor::new(&model, CpuBackend::<f32>::new(Some(1)).unwrap()).unwrap();
//! let profile = exec.profile(4, 2).unwrap();
//! assert_eq!(profile.layers.len(), 4);
//! assert_eq!(profile.layers[0].name, "conv2d_1");
//! println!("{profile}");
//! ```

use std::fmt;
use std::time::Instant;

use super::plan::{BufRole, Plan};
use super::{Executor, Mode};
use crate::backend::{Backend, Op};
use crate::rng::Rng;
use crate::{Error, Result};

/// One layer's line of a [`Profile`].
#[derive(Clone, Debug, PartialEq)]
pub struct LayerProfile {
    /// The layer's name (`conv2d_1`, or the name given with `.name(..)`).
    pub name: String,
    /// The layer as the summary describes it (`Conv2d`, `GroupNorm(8)`).
    pub layer: String,
    /// Output shape without the batch axis.
    pub shape: Vec<usize>,
    /// Milliseconds of the layer's forward ops per batch (median over the repetitions).
    pub forward_ms: f64,
    /// Milliseconds of the layer's backward ops per batch (0 where nothing flows back).
    pub backward_ms: f64,
    /// Number of parameter values (running statistics included).
    pub params: usize,
    /// Bytes of what the layer's forward writes: its output (views such as flatten share their
    /// input's and count 0) and what it saves for backward.
    pub activation_bytes: usize,
    /// Forward floating-point operations per batch (multiply-adds count 2).
    pub flops: u64,
}

impl LayerProfile {
    /// Forward GFLOP/s achieved: [`LayerProfile::flops`] over [`LayerProfile::forward_ms`] (0 for
    /// a layer with no FLOPs or no measurable time).
    pub fn forward_gflops(&self) -> f64 {
        if self.forward_ms > 0.0 { self.flops as f64 / (self.forward_ms * 1e6) } else { 0.0 }
    }
}

/// What [`Executor::profile`] measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    /// The backend, as it describes itself.
    pub device: String,
    /// Samples per batch.
    pub batch: usize,
    /// Repetitions each median is taken over.
    pub reps: usize,
    /// Every layer of the model, in order.
    pub layers: Vec<LayerProfile>,
    /// The forward and backward pass run whole and eagerly, end to end (ms, median).
    pub eager_ms: f64,
    /// The same pass replayed as one CUDA graph (ms, median); `None` where the backend has no
    /// graphs (the CPU).
    pub graph_ms: Option<f64>,
    /// Bytes of the plan: parameters, gradients and the plan's own buffers.
    pub plan_bytes: usize,
    /// The most device memory the backend held at once, where it tracks it (CUDA).
    pub peak_bytes: Option<u64>,
}

impl Profile {
    /// Sum of the layers' forward and backward times (ms): the pass without launch overlap.
    pub fn layer_sum_ms(&self) -> f64 {
        self.layers.iter().map(|l| l.forward_ms + l.backward_ms).sum()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

impl<B: Backend> Executor<B> {
    /// Profiles a training pass (forward and backward, no loss and no update) at `batch` samples
    /// per batch on random inputs: every layer's forward and backward time, parameters,
    /// activation memory, FLOPs and GFLOP/s, the pass timed whole (eager, and as a graph where
    /// the backend replays graphs) and peak memory. Each time is the median of `reps`
    /// repetitions after two warm-up passes (algorithm searches, workspace growth).
    ///
    /// Parameters and running statistics are left as they were (batch norm is lowered without
    /// its running-statistics update); dropout counters advance.
    pub fn profile(&mut self, batch: usize, reps: usize) -> Result<Profile> {
        if reps == 0 {
            return Err(Error::config("profile repetitions", "must be at least 1"));
        }
        let low = super::Lowering { update_running_stats: false, ..self.lowering(batch, Mode::Train) };
        let id = self.plan_for(low)?;
        let plan: Plan = self.plans[id.0].clone();
        let mut rng = Rng::new(0x9E0F);
        let x: Vec<f32> = (0..self.backend.len(plan.input)).map(|_| rng.uniform_range(-1.0, 1.0)).collect();
        self.backend.write(plan.input, &x)?;
        if let Some(dy) = plan.output_grad {
            let g: Vec<f32> = (0..self.backend.len(dy)).map(|_| rng.uniform_range(-0.1, 0.1)).collect();
            self.backend.write(dy, &g)?;
        }
        let ops: Vec<Op> = plan.forward.iter().chain(&plan.backward).cloned().collect();
        let be = &mut self.backend;
        be.run(&ops)?;
        be.run(&ops)?;
        be.synchronize()?;

        let nodes = self.model.nodes();
        let mut forward = vec![Vec::with_capacity(reps); nodes.len()];
        let mut backward = vec![Vec::with_capacity(reps); nodes.len()];
        for _ in 0..reps {
            let times = be.profile(&ops)?;
            let (f, b) = times.split_at(plan.forward.len());
            let mut fw = vec![0.0; nodes.len()];
            let mut bw = vec![0.0; nodes.len()];
            for (t, &n) in f.iter().zip(&plan.forward_nodes) {
                fw[n] += t;
            }
            for (t, &n) in b.iter().zip(&plan.backward_nodes) {
                bw[n] += t;
            }
            for n in 0..nodes.len() {
                forward[n].push(fw[n]);
                backward[n].push(bw[n]);
            }
        }

        let timed = |be: &mut B, cached: bool| -> Result<f64> {
            let mut ts = Vec::with_capacity(reps);
            for _ in 0..reps {
                let t = Instant::now();
                if cached {
                    be.run_cached(PROFILE_KEY ^ id.0 as u64, &ops)?;
                } else {
                    be.run(&ops)?;
                }
                be.synchronize()?;
                ts.push(t.elapsed().as_secs_f64() * 1e3);
            }
            Ok(median(ts))
        };
        let eager_ms = timed(be, false)?;
        let graph_ms = if be.replays_graphs() {
            // Warm-up of the key, then capture; only then are replays timed.
            be.run_cached(PROFILE_KEY ^ id.0 as u64, &ops)?;
            be.run_cached(PROFILE_KEY ^ id.0 as u64, &ops)?;
            be.synchronize()?;
            Some(timed(be, true)?)
        } else {
            None
        };

        let mut layers = Vec::with_capacity(nodes.len().saturating_sub(1));
        for (i, node) in nodes.iter().enumerate().skip(1) {
            let owned =
                |label: &str| label == node.name || label.strip_prefix(&node.name).is_some_and(|r| r.starts_with('.'));
            layers.push(LayerProfile {
                name: node.name.clone(),
                layer: node.layer.display_type(),
                shape: node.shape.clone(),
                forward_ms: median(std::mem::take(&mut forward[i])),
                backward_ms: median(std::mem::take(&mut backward[i])),
                params: self.model.params().iter().filter(|p| p.node == i).map(|p| p.len()).sum(),
                activation_bytes: plan
                    .buffers
                    .iter()
                    .filter(|b| matches!(b.role, BufRole::Activation | BufRole::Saved) && owned(&b.label))
                    .map(|b| b.len * 4)
                    .sum(),
                flops: self.model.flops(i) * batch as u64,
            });
        }
        let memory = self.memory(id);
        Ok(Profile {
            device: self.backend.describe(),
            batch,
            reps,
            layers,
            eager_ms,
            graph_ms,
            plan_bytes: memory.total(),
            peak_bytes: self.backend.peak_memory(),
        })
    }
}

/// Graph-cache keys of profiled passes (kept apart from the step plans' keys).
const PROFILE_KEY: u64 = 0x5052_4F46_0000_0000;

fn mib(bytes: f64) -> f64 {
    bytes / (1u64 << 20) as f64
}

impl fmt::Display for Profile {
    /// The profile as a table: one line per layer, then the totals.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Profile on {}, batch {} (medians of {} passes)", self.device, self.batch, self.reps)?;
        // Columns as wide as the longest layer name and type (ResNet's `layer2.0.downsample.0`).
        let nw = self.layers.iter().map(|l| l.name.len()).max().unwrap_or(0).max(5);
        let tw = self.layers.iter().map(|l| l.layer.len()).max().unwrap_or(0).max(4);
        writeln!(
            f,
            "{:<nw$} {:<tw$} {:>10} {:>11} {:>10} {:>11} {:>10} {:>9}",
            "layer", "type", "fwd ms", "bwd ms", "params", "act MiB", "MFLOPs", "GFLOP/s"
        )?;
        for l in &self.layers {
            writeln!(
                f,
                "{:<nw$} {:<tw$} {:>10.3} {:>11.3} {:>10} {:>11.2} {:>10.1} {:>9.1}",
                l.name,
                l.layer,
                l.forward_ms,
                l.backward_ms,
                l.params,
                mib(l.activation_bytes as f64),
                l.flops as f64 / 1e6,
                l.forward_gflops()
            )?;
        }
        let fw: f64 = self.layers.iter().map(|l| l.forward_ms).sum();
        let bw: f64 = self.layers.iter().map(|l| l.backward_ms).sum();
        writeln!(f, "{:<w$} {:>10.3} {:>11.3}", "sum of layers", fw, bw, w = nw + tw + 1)?;
        write!(f, "forward+backward pass: eager {:.3} ms", self.eager_ms)?;
        if let Some(g) = self.graph_ms {
            write!(f, ", replayed as a graph {g:.3} ms")?;
        }
        writeln!(f, " ({:.0} images/s)", self.batch as f64 / self.graph_ms.unwrap_or(self.eager_ms) * 1e3)?;
        write!(f, "plan memory {:.1} MiB", mib(self.plan_bytes as f64))?;
        if let Some(p) = self.peak_bytes {
            write!(f, ", peak device memory {:.1} MiB", mib(p as f64))?;
        }
        writeln!(f)
    }
}
