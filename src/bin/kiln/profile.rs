//! `kiln profile`: the seed's CNNProfile, per layer by name (forward and backward time,
//! parameters, activation memory, FLOPs, GFLOP/s), the pass timed whole (eager and as a
//! replayed graph) and the peak memory, through the library's `Executor::profile`.

use kiln::exec::{Executor, Profile};

use crate::other::{any_model, device};
use crate::{CmdResult, ProfileArgs};

/// Profiles `model` at `batch` on `dev` (`reps` repetitions).
pub fn run_profile(
    model: &kiln::model::Model,
    batch: usize,
    dev: kiln::backend::Device,
    reps: usize,
) -> Result<Profile, String> {
    let backend = dev.open().map_err(|e| format!("--device: {e}"))?;
    let mut exec = Executor::new(model, backend).map_err(|e| e.to_string())?;
    exec.profile(batch, reps).map_err(|e| format!("profiling at batch {batch}: {e}"))
}

/// The profile as one JSON object (layers as an array).
pub fn to_json(p: &Profile) -> serde_json::Value {
    serde_json::json!({
        "device": p.device,
        "batch": p.batch,
        "reps": p.reps,
        "layers": p.layers.iter().map(|l| serde_json::json!({
            "name": l.name,
            "type": l.layer,
            "shape": l.shape,
            "forward_ms": l.forward_ms,
            "backward_ms": l.backward_ms,
            "params": l.params,
            "activation_bytes": l.activation_bytes,
            "flops": l.flops,
            "forward_gflops": l.forward_gflops(),
        })).collect::<Vec<_>>(),
        "layer_sum_ms": p.layer_sum_ms(),
        "eager_ms": p.eager_ms,
        "graph_ms": p.graph_ms,
        "plan_bytes": p.plan_bytes,
        "peak_bytes": p.peak_bytes,
    })
}

pub fn profile(a: ProfileArgs) -> CmdResult {
    if a.batch == 0 {
        return Err("--batch: must be at least 1".into());
    }
    if a.reps == 0 {
        return Err("--reps: must be at least 1".into());
    }
    let dev = device(&a.device)?;
    let model = any_model(&a.model, Some(a.batch), a.classes)?;
    let p = run_profile(&model, a.batch, dev, a.reps)?;
    if a.json {
        println!("{}", to_json(&p));
    } else {
        print!("{p}");
    }
    Ok(())
}
