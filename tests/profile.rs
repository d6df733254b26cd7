//! Per-layer profiles: `Executor::profile` (every layer by name, ops attributed to the layer they
//! were lowered from, FLOPs and parameters from the model) and `kiln profile` on a spec file,
//! its JSON and its bad input. Times are measured, never asserted beyond being finite and
//! non-negative (speed is claimed by benchmarks, not tests).

use std::path::PathBuf;
use std::process::Command;

use kiln::backend::cpu::CpuBackend;
use kiln::exec::{Executor, Mode, PlanOptions};
use kiln::model::ModelBuilder;
use serde_json::Value;

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

#[test]
fn every_op_belongs_to_a_layer_and_every_layer_is_profiled() {
    let model = ModelBuilder::new(&[2, 3, 8, 8])
        .conv2d(4, 3)
        .batch_norm()
        .relu()
        .residual(|b| b.conv2d_with(kiln::model::Conv2d::new(4, 3).padding(1)).relu())
        .max_pool2d(2)
        .dropout(0.5)
        .flatten()
        .dense(5)
        .build()
        .unwrap();
    let mut exec = Executor::new(&model, CpuBackend::<f32>::new(Some(1)).unwrap()).unwrap();
    let id = exec.plan(2, Mode::Train, PlanOptions::default()).unwrap();
    let plan = exec.plan_info(id).clone();
    assert_eq!(plan.forward_nodes.len(), plan.forward.len());
    assert_eq!(plan.backward_nodes.len(), plan.backward.len());
    // Forward ops come in node order, backward ops in reverse node order.
    assert!(plan.forward_nodes.windows(2).all(|w| w[0] <= w[1]), "{:?}", plan.forward_nodes);
    assert!(plan.backward_nodes.windows(2).all(|w| w[0] >= w[1]), "{:?}", plan.backward_nodes);
    // The first forward op is the first convolution's, the last backward op too.
    assert_eq!(model.nodes()[plan.forward_nodes[0]].name, "conv2d_1");
    assert_eq!(model.nodes()[*plan.backward_nodes.last().unwrap()].name, "conv2d_1");

    let before: Vec<Vec<f32>> = model.params().iter().map(|p| exec.read_param(&p.name).unwrap()).collect();
    let p = exec.profile(3, 2).unwrap();
    let after: Vec<Vec<f32>> = model.params().iter().map(|p| exec.read_param(&p.name).unwrap()).collect();
    assert_eq!(before, after, "profiling changed parameters or running statistics");

    let names: Vec<&str> = model.nodes()[1..].iter().map(|n| n.name.as_str()).collect();
    assert_eq!(p.layers.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(), names);
    assert_eq!((p.batch, p.reps), (3, 2));
    for (i, l) in p.layers.iter().enumerate() {
        assert!(l.forward_ms >= 0.0 && l.forward_ms.is_finite() && l.backward_ms >= 0.0, "{l:?}");
        assert_eq!(l.flops, model.flops(i + 1) * 3, "{}", l.name);
        let params: usize = model.params().iter().filter(|s| s.node == i + 1).map(|s| s.len()).sum();
        assert_eq!(l.params, params, "{}", l.name);
    }
    let conv = &p.layers[0];
    assert_eq!(conv.activation_bytes, 3 * 4 * 6 * 6 * 4, "conv2d_1 writes its output only");
    let flatten = p.layers.iter().find(|l| l.name.starts_with("flatten")).unwrap();
    assert_eq!(flatten.activation_bytes, 0, "a view writes nothing");
    let dropout = p.layers.iter().find(|l| l.name.starts_with("dropout")).unwrap();
    assert!(dropout.activation_bytes > 3 * 4 * 3 * 3 * 4, "dropout saves its mask: {dropout:?}");
    assert_eq!(p.graph_ms, None, "the CPU has no graphs");
    assert!(p.eager_ms > 0.0 && p.plan_bytes > 0);
    let table = p.to_string();
    for n in names {
        assert!(table.contains(n), "{n} missing from\n{table}");
    }
    assert!(exec.profile(3, 0).is_err());
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-profile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn kiln_profile_names_every_layer_and_refuses_bad_input() {
    let dir = tmp("cli");
    let spec = "input = [1, 8, 8]\n\n[[layers]]\ntype = \"conv2d\"\nout_channels = 4\nkernel = 3\nname = \"stem\"\n\n\
                [[layers]]\ntype = \"relu\"\n\n[[layers]]\ntype = \"flatten\"\n\n[[layers]]\ntype = \"dense\"\nout_features = 3\n";
    std::fs::write(dir.join("net.toml"), spec).unwrap();
    let run = |args: &[&str]| Command::new(KILN).args(args).current_dir(&dir).output().unwrap();
    let o = run(&["profile", "net.toml", "--batch", "4", "--device", "cpu", "--reps", "2"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for n in ["stem", "relu_1", "flatten_1", "dense_1", "sum of layers", "forward+backward pass"] {
        assert!(out.contains(n), "{n} missing from\n{out}");
    }
    let o = run(&["profile", "net.toml", "--batch", "4", "--device", "cpu", "--reps", "2", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 4);
    assert_eq!(layers[0]["name"], "stem");
    assert_eq!(layers[0]["params"], 4 * 9 + 4);
    assert_eq!(layers[0]["flops"].as_u64().unwrap(), 4 * 2 * (4 * 6 * 6 * 9) + 4 * 4 * 6 * 6, "{}", layers[0]);
    assert_eq!(v["batch"], 4);

    for (args, names) in [
        (vec!["profile", "net.toml", "--batch", "0"], vec!["--batch"]),
        (vec!["profile", "net.toml", "--reps", "0"], vec!["--reps"]),
        (vec!["profile", "nosuch.toml"], vec!["nosuch.toml"]),
        (vec!["profile", "net.toml", "--device", "tpu"], vec!["--device", "tpu"]),
    ] {
        let o = run(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(!err.contains("panicked"), "{err}");
        for n in names {
            assert!(err.contains(n), "{args:?}: {err}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
