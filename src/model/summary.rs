//! FLOP counts and the summary table.

use super::Model;

fn numel(s: &[usize]) -> u64 {
    s.iter().product::<usize>() as u64
}

/// Forward FLOPs of node `i` for one sample; a multiply-add counts as two.
pub(super) fn node_flops(m: &Model, i: usize) -> u64 {
    let node = &m.nodes[i];
    let out = numel(&node.shape);
    let input = node.inputs.first().map(|&j| m.nodes[j].shape.as_slice()).unwrap_or(&[]);
    node.layer.with_kind(|k| k.flops(input, out, node.inputs.len()))
}

fn fmt_count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (k, ch) in s.chars().enumerate() {
        if k > 0 && (s.len() - k).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn fmt_flops(f: u64) -> String {
    match f {
        0 => "-".into(),
        f if f >= 1_000_000_000 => format!("{:.2} G", f as f64 / 1e9),
        f if f >= 1_000_000 => format!("{:.2} M", f as f64 / 1e6),
        f if f >= 1_000 => format!("{:.1} K", f as f64 / 1e3),
        f => f.to_string(),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

pub(super) fn render(m: &Model) -> String {
    let batch = m.batch as u64;
    let mut rows: Vec<[String; 4]> = Vec::new();
    for (i, node) in m.nodes.iter().enumerate() {
        let params: usize = m.params.iter().filter(|p| p.node == i && p.trainable).map(|p| p.len()).sum();
        let from = if node.inputs.len() > 1 {
            node.inputs.iter().map(|&j| m.nodes[j].name.as_str()).collect::<Vec<_>>().join(", ")
        } else {
            String::new()
        };
        let input = node.inputs.first().map(|&j| m.nodes[j].shape.as_slice()).unwrap_or(&[]);
        let detail = node.layer.with_kind(|k| k.detail(&node.name, input)).unwrap_or(from);
        let ty = node.layer.display_type();
        let ty = if detail.is_empty() { ty } else { format!("{ty} [{detail}]") };
        rows.push([
            format!("{} ({ty})", node.name),
            format!("{:?}", m.shape_with_batch(i)),
            if params > 0 { fmt_count(params as u64) } else { "0".into() },
            fmt_flops(m.flops(i) * batch),
        ]);
    }
    let headers = ["Layer (type)", "Output shape", "Param #", "FLOPs (fwd)"];
    let mut widths = [0usize; 4];
    for (k, h) in headers.iter().enumerate() {
        widths[k] = h.len();
        for r in &rows {
            widths[k] = widths[k].max(r[k].chars().count());
        }
    }
    let total_w = widths.iter().sum::<usize>() + 3 * 2;
    let mut s = String::new();
    let line = |c: char| c.to_string().repeat(total_w) + "\n";
    s += &line('=');
    // Names and shapes left-aligned, counts right-aligned.
    let row = |r: [&str; 4]| {
        let [w0, w1, w2, w3] = widths;
        format!("{:<w0$}  {:<w1$}  {:>w2$}  {:>w3$}\n", r[0], r[1], r[2], r[3])
    };
    s += &row(headers);
    s += &line('=');
    for r in &rows {
        s += &row([&r[0], &r[1], &r[2], &r[3]]);
    }
    s += &line('=');
    let trainable = m.param_count() as u64;
    let buffers = m.buffer_count() as u64;
    let activations: u64 =
        m.nodes.iter().filter(|n| !n.layer.with_kind(|k| k.is_view())).map(|n| numel(&n.shape) * batch).sum();
    s += &format!("Total params:          {}\n", fmt_count(trainable + buffers));
    s += &format!("Trainable params:      {}\n", fmt_count(trainable));
    s += &format!("Non-trainable (stats): {}\n", fmt_count(buffers));
    s += &format!("Parameter memory:      {}\n", mib((trainable + buffers) * 4));
    s += &format!("Activation memory:     {} (forward, batch {batch}, f32)\n", mib(activations * 4));
    s += &format!("Forward FLOPs:         {} per batch of {batch}\n", fmt_flops(m.total_flops() * batch));
    s += &line('-');
    s
}
