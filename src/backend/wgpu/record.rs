//! Turning an op list into what a command buffer replays: dispatches (pipeline, bind group,
//! workgroup counts) and buffer copies, built once per plan key and encoded into one command
//! buffer per step.
//!
//! Kernel conventions (every WGSL source here follows them): entry point `main`; binding 0 is
//! the dispatch's parameters, `array<u32>` (floats as their bits, read with `bitcast<f32>`);
//! then the buffers read, then the buffers written, in the order the Rust side passes them.
//! One-dimensional kernels run 256 threads per workgroup over a two-dimensional grid of
//! workgroups (`grid`), and compute their index with the prelude's `gid`.

use super::WgpuBackend;
use crate::backend::ops::{BufId, CounterId, Op, OpDesc};
use crate::{Error, Result};
use wgpu::util::DeviceExt;

/// A compute kernel: a unique name (the pipeline cache's key) and its WGSL. `parts` are pasted
/// after the common prelude, in order (a GEMM core after its variant's loaders).
pub(super) struct Kernel {
    pub name: &'static str,
    pub parts: &'static [&'static str],
}

impl Kernel {
    pub fn source(&self) -> String {
        let mut s = String::from(PRELUDE) + &layouts();
        for p in self.parts {
            s += p;
        }
        s
    }
}

/// Helpers every kernel may use.
const PRELUDE: &str = r#"
// The flat index of a 256-thread invocation in a 2-D grid of workgroups.
fn gid(wg: vec3<u32>, nwg: vec3<u32>, li: u32) -> u32 {
    return (wg.x + wg.y * nwg.x) * 256u + li;
}
fn pf(v: u32) -> f32 {
    return bitcast<f32>(v);
}
// NaN and infinity tested on the bits: shader compilers may assume floats are finite.
fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}
fn is_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}
"#;

/// The small buffers' layouts (`ops::stats`, `ops::guard`, `ops::hyper`, `ops::scaler`) as WGSL constants
/// (`STATS_LOSS`, `GUARD_SKIP`, `HYPER_LR`, ...), from the Rust constants: defined once.
fn layouts() -> String {
    use crate::backend::ops::{guard, hyper, scaler, stats};
    let all: [(&str, usize); 21] = [
        ("STATS_LOSS", stats::LOSS),
        ("STATS_CORRECT", stats::CORRECT),
        ("STATS_CORRECT_K", stats::CORRECT_K),
        ("STATS_SUM_LOSS", stats::SUM_LOSS),
        ("STATS_SUM_CORRECT", stats::SUM_CORRECT),
        ("STATS_SUM_CORRECT_K", stats::SUM_CORRECT_K),
        ("STATS_SUM_SAMPLES", stats::SUM_SAMPLES),
        ("STATS_SUM_SCORED", stats::SUM_SCORED),
        ("GUARD_SKIP", guard::SKIP),
        ("GUARD_BAD_STEPS", guard::BAD_STEPS),
        ("GUARD_FIRST_BAD", guard::FIRST_BAD),
        ("GUARD_WHAT", guard::WHAT),
        ("GUARD_LOSS", guard::LOSS),
        ("GUARD_NORM", guard::NORM),
        ("GUARD_CHECKED", guard::CHECKED),
        ("HYPER_LR", hyper::LR),
        ("HYPER_MOMENTUM", hyper::MOMENTUM),
        ("SCALER_SCALE", scaler::SCALE),
        ("SCALER_GOOD_STEPS", scaler::GOOD_STEPS),
        ("SCALER_SKIPPED", scaler::SKIPPED),
        ("SCALER_FOUND_INF", scaler::FOUND_INF),
    ];
    all.iter().map(|(name, v)| format!("const {name}: u32 = {v}u;\n")).collect()
}

/// Workgroup counts for `n` invocations of a 256-thread kernel (at most 65535 per dimension).
pub(super) fn grid(n: usize) -> [u32; 3] {
    let groups = n.div_ceil(256).max(1);
    let x = groups.min(65535);
    [x as u32, groups.div_ceil(x) as u32, 1]
}

/// A buffer bound to a dispatch.
#[derive(Clone)]
pub(super) enum Bind {
    /// A plan buffer.
    Buf(BufId),
    /// A counter's 8 bytes (two u32 words, low first).
    Counter(CounterId),
    /// A buffer owned by the recorded list (partial sums, placeholders).
    Raw(wgpu::Buffer),
}

enum Step {
    Dispatch { pipeline: wgpu::ComputePipeline, bind: wgpu::BindGroup, groups: [u32; 3] },
    Copy { src: wgpu::Buffer, dst: wgpu::Buffer, bytes: u64 },
}

/// A recorded op list, ready to be encoded into a command buffer (again and again).
pub(super) struct Recorded {
    steps: Vec<Step>,
    /// Each op's steps, `steps[ops[i].0..ops[i].1]`, and its name and shapes (for profiles).
    ops: Vec<(usize, usize, String)>,
}

impl Recorded {
    /// Encodes the steps: consecutive dispatches share one compute pass (wgpu orders their
    /// buffer accesses), copies go between passes.
    pub fn encode(&self, enc: &mut wgpu::CommandEncoder) {
        encode_steps(enc, &self.steps, None);
    }

    /// The ops recorded, with their names and shapes.
    pub fn op_names(&self) -> impl Iterator<Item = &str> {
        self.ops.iter().map(|(_, _, n)| n.as_str())
    }

    /// Encodes the steps with each op in passes of its own, timestamps `2 i` and `2 i + 1` of
    /// `queries` written at the start of op `i`'s first pass and the end of its last (an op
    /// with no dispatch gets an empty pass), then resolves the `2 * ops` timestamps into
    /// `resolve`.
    pub fn encode_timed(&self, enc: &mut wgpu::CommandEncoder, queries: &wgpu::QuerySet, resolve: &wgpu::Buffer) {
        for (i, (a, b, _)) in self.ops.iter().enumerate() {
            encode_steps(enc, &self.steps[*a..*b], Some((queries, 2 * i as u32)));
        }
        enc.resolve_query_set(queries, 0..2 * self.ops.len() as u32, resolve, 0);
    }
}

/// Encodes `steps` (dispatch runs as passes, copies between); with `timed`, the first pass
/// writes timestamp `at` at its start and the last `at + 1` at its end.
fn encode_steps(enc: &mut wgpu::CommandEncoder, steps: &[Step], timed: Option<(&wgpu::QuerySet, u32)>) {
    let last_run = steps.iter().rposition(|s| matches!(s, Step::Dispatch { .. }));
    let writes = |first: bool, last: bool| {
        timed.map(|(query_set, at)| wgpu::ComputePassTimestampWrites {
            query_set,
            beginning_of_pass_write_index: first.then_some(at),
            end_of_pass_write_index: last.then_some(at + 1),
        })
    };
    let mut first = true;
    let mut i = 0;
    while i < steps.len() {
        match &steps[i] {
            Step::Copy { src, dst, bytes } => {
                enc.copy_buffer_to_buffer(src, 0, dst, 0, *bytes);
                i += 1;
            }
            Step::Dispatch { .. } => {
                let start = i;
                while matches!(steps.get(i), Some(Step::Dispatch { .. })) {
                    i += 1;
                }
                let last = last_run.is_some_and(|l| l < i && l >= start);
                let desc = wgpu::ComputePassDescriptor { label: None, timestamp_writes: writes(first, last) };
                let mut pass = enc.begin_compute_pass(&desc);
                for step in &steps[start..i] {
                    if let Step::Dispatch { pipeline, bind, groups } = step {
                        pass.set_pipeline(pipeline);
                        pass.set_bind_group(0, bind, &[]);
                        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
                    }
                }
                first = false;
            }
        }
    }
    if last_run.is_none() && timed.is_some() {
        let _ =
            enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: writes(true, true) });
    }
}

/// Builds a [`Recorded`] list op by op: each op's function (in its family's file) calls
/// [`Recorder::dispatch`] and [`Recorder::copy`].
pub(super) struct Recorder<'a> {
    be: &'a mut WgpuBackend,
    steps: Vec<Step>,
    ops: Vec<(usize, usize, String)>,
}

impl<'a> Recorder<'a> {
    pub fn new(be: &'a mut WgpuBackend) -> Self {
        Recorder { be, steps: Vec::new(), ops: Vec::new() }
    }

    pub fn finish(self) -> Recorded {
        Recorded { steps: self.steps, ops: self.ops }
    }

    /// Records one op (through the registry: each op's `RunOp` impl sits in its family's file).
    pub fn op(&mut self, op: &Op) -> Result<()> {
        let start = self.steps.len();
        op.run_on(self)?;
        self.ops.push((start, self.steps.len(), format!("{:<22} {}", op.name(), op.shapes())));
        Ok(())
    }

    fn resolve(&self, b: &Bind) -> Result<wgpu::Buffer> {
        Ok(match b {
            Bind::Buf(id) => self.be.slot(*id)?.buf.clone(),
            Bind::Counter(c) => {
                self.be.counters.get(c.0).ok_or_else(|| Error::State(format!("wgpu: no counter {}", c.0)))?.clone()
            }
            Bind::Raw(b) => b.clone(),
        })
    }

    /// A new device buffer of `len` f32 values owned by the recorded list (scratch, partial
    /// sums, the placeholder bound where an optional buffer is absent).
    pub fn scratch(&mut self, len: usize) -> Bind {
        Bind::Raw(self.be.storage((len * 4) as u64, "kiln scratch"))
    }

    /// Records a dispatch of `k` over `groups` workgroups with `params` at binding 0, `reads`
    /// next and `writes` last. A read that is also written by the same dispatch is copied to a
    /// scratch buffer first (a storage buffer cannot be bound both read-only and read-write).
    pub fn dispatch(
        &mut self,
        k: &Kernel,
        params: &[u32],
        (reads, writes): (&[Bind], &[Bind]),
        groups: [u32; 3],
    ) -> Result<()> {
        let pipeline = self.be.pipeline(k)?;
        let contents: Vec<u8> =
            if params.is_empty() { vec![0; 4] } else { params.iter().flat_map(|p| p.to_le_bytes()).collect() };
        let pbuf = self.be.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(k.name),
            contents: &contents,
            usage: wgpu::BufferUsages::STORAGE,
        });
        let written: Vec<BufId> =
            writes.iter().filter_map(|b| if let Bind::Buf(id) = b { Some(*id) } else { None }).collect();
        let mut bufs = vec![pbuf];
        for r in reads {
            let b = self.resolve(r)?;
            match r {
                Bind::Buf(id) if written.contains(id) => {
                    let bytes = b.size();
                    let copy = self.be.storage(bytes, "kiln alias copy");
                    self.steps.push(Step::Copy { src: b, dst: copy.clone(), bytes });
                    bufs.push(copy);
                }
                _ => bufs.push(b),
            }
        }
        for w in writes {
            bufs.push(self.resolve(w)?);
        }
        let layout = pipeline.get_bind_group_layout(0);
        let entries: Vec<wgpu::BindGroupEntry> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry { binding: i as u32, resource: b.as_entire_binding() })
            .collect();
        let bind = self.be.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(k.name),
            layout: &layout,
            entries: &entries,
        });
        self.be.take_errors(&format!("binding {}", k.name))?;
        if groups.iter().all(|&g| g > 0) {
            self.steps.push(Step::Dispatch { pipeline, bind, groups });
        }
        Ok(())
    }

    /// Records a copy of the first `len` f32 values of `src` into `dst`.
    pub fn copy(&mut self, src: &Bind, dst: &Bind, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (src, dst) = (self.resolve(src)?, self.resolve(dst)?);
        self.steps.push(Step::Copy { src, dst, bytes: (len * 4) as u64 });
        Ok(())
    }
}

/// The error for an op (or an option of one) this backend does not run.
pub(super) fn unsupported<O: OpDesc>(op: &O, why: &str) -> Error {
    Error::State(format!("op {} ({}) is not supported on wgpu: {why}", O::NAME, op.shapes()))
}

/// An f32 parameter as its bits.
pub(super) fn f(v: f32) -> u32 {
    v.to_bits()
}

/// A size parameter; the kernels index with u32, so larger sizes are refused when recording.
pub(super) fn u(v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::State(format!("wgpu: size {v} exceeds the 32-bit indices of its kernels")))
}
