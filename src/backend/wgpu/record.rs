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
    /// A range of the recorded list's own scratch buffer (partial sums, placeholders), from
    /// [`Recorder::scratch`].
    Scratch(usize),
}

/// Where a binding or a copy's end lies while recording (the list's own buffers are created by
/// [`Recorder::finish`]).
#[derive(Clone)]
enum Range {
    /// A plan buffer: a range of an arena chunk (its index tells copies within one chunk).
    Arena { chunk: usize, buf: wgpu::Buffer, offset: u64, size: u64 },
    /// A whole buffer (a counter).
    Whole(wgpu::Buffer),
    /// A range of the list's scratch buffer.
    Scratch { offset: u64, size: u64 },
    /// A dispatch's parameters: a range of the list's parameter buffer.
    Params { offset: u64, size: u64 },
}

/// A step while recording.
enum Draft {
    Dispatch { pipeline: wgpu::ComputePipeline, ranges: Vec<Range>, groups: [u32; 3], name: &'static str },
    Copy { src: Range, dst: Range, bytes: u64 },
}

enum Step {
    Dispatch { pipeline: wgpu::ComputePipeline, bind: wgpu::BindGroup, groups: [u32; 3] },
    Copy { src: (wgpu::Buffer, u64), dst: (wgpu::Buffer, u64), bytes: u64 },
}

/// A recorded op list, ready to be encoded into a command buffer (again and again).
pub(super) struct Recorded {
    steps: Vec<Step>,
    /// Each op's steps, `steps[ops[i].0..ops[i].1]`, and its name and shapes (for profiles).
    ops: Vec<(usize, usize, String)>,
    /// Bytes of the list's own device buffers (parameters and scratch).
    bytes: u64,
}

impl Recorded {
    /// Encodes the steps: consecutive dispatches share one compute pass (wgpu orders their
    /// buffer accesses), copies go between passes.
    pub fn encode(&self, enc: &mut wgpu::CommandEncoder) {
        encode_steps(enc, &self.steps, None);
    }

    /// Bytes of device memory the list holds itself (its parameters and scratch).
    pub fn bytes(&self) -> u64 {
        self.bytes
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
                enc.copy_buffer_to_buffer(&src.0, src.1, &dst.0, dst.1, *bytes);
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

/// `D = S` over `P[0]` 32-bit words: a copy between two ranges of one buffer (two plan buffers
/// of one arena chunk), which `copy_buffer_to_buffer` refuses.
static COPY_WORDS: Kernel = Kernel {
    name: "copy_words",
    parts: &[concat!(
        "@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> S: array<u32>;
@group(0) @binding(2) var<storage, read_write> D: array<u32>;
",
        main1d!(),
        "    if (i >= P[0]) { return; }
    D[i] = S[i];
}"
    )],
};

/// Builds a [`Recorded`] list op by op: each op's function (in its family's file) calls
/// [`Recorder::dispatch`] and [`Recorder::copy`]. The list's own memory, every dispatch's
/// parameters and every scratch range, is laid out while recording and allocated by
/// [`Recorder::finish`] as two buffers (parameters, scratch), at offsets aligned for binding.
pub(super) struct Recorder<'a> {
    be: &'a mut WgpuBackend,
    drafts: Vec<Draft>,
    ops: Vec<(usize, usize, String)>,
    /// Every dispatch's parameters, each at an aligned offset.
    params: Vec<u8>,
    /// Scratch ranges (offset, bytes) and the end of the last.
    scratch: Vec<(u64, u64)>,
    scratch_end: u64,
    align: u64,
}

impl<'a> Recorder<'a> {
    pub fn new(be: &'a mut WgpuBackend) -> Self {
        let align = be.arena.align();
        Recorder {
            be,
            drafts: Vec::new(),
            ops: Vec::new(),
            params: Vec::new(),
            scratch: Vec::new(),
            scratch_end: 0,
            align,
        }
    }

    /// Creates the list's parameter and scratch buffers and every bind group.
    pub fn finish(self) -> Result<Recorded> {
        use wgpu::BufferUsages as U;
        let be = self.be;
        let params = (!self.params.is_empty()).then(|| {
            be.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("kiln parameters"),
                contents: &self.params,
                usage: U::STORAGE,
            })
        });
        let scratch_bytes = self.scratch_end.next_multiple_of(4);
        let new_scratch = |size: u64| {
            be.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("kiln scratch"),
                size,
                usage: U::STORAGE | U::COPY_SRC | U::COPY_DST,
                mapped_at_creation: false,
            })
        };
        // One buffer for every range, or (read-only bindings, `Arena::dedicated`) one per range,
        // so that no dispatch binds one buffer both read-only and read-write.
        let dedicated = be.arena.dedicated();
        let scratch = (scratch_bytes > 0 && !dedicated).then(|| new_scratch(scratch_bytes));
        let scratch_each: Vec<(u64, wgpu::Buffer)> = if dedicated {
            self.scratch.iter().map(|&(offset, size)| (offset, new_scratch(size.next_multiple_of(4)))).collect()
        } else {
            Vec::new()
        };
        be.take_errors("recording: the list's buffers")?;
        let missing = || Error::State("wgpu: a recorded range has no buffer".into());
        let place = |r: &Range| -> Result<(wgpu::Buffer, u64, Option<u64>)> {
            Ok(match r {
                Range::Arena { buf, offset, size, .. } => (buf.clone(), *offset, Some(*size)),
                Range::Whole(b) => (b.clone(), 0, None),
                Range::Scratch { offset, size } if dedicated => {
                    let i = scratch_each.binary_search_by_key(offset, |s| s.0).map_err(|_| missing())?;
                    (scratch_each[i].1.clone(), 0, Some(*size))
                }
                Range::Scratch { offset, size } => (scratch.clone().ok_or_else(missing)?, *offset, Some(*size)),
                Range::Params { offset, size } => (params.clone().ok_or_else(missing)?, *offset, Some(*size)),
            })
        };
        let mut steps = Vec::with_capacity(self.drafts.len());
        for d in &self.drafts {
            steps.push(match d {
                Draft::Copy { src, dst, bytes } => {
                    let (s, so, _) = place(src)?;
                    let (t, to, _) = place(dst)?;
                    Step::Copy { src: (s, so), dst: (t, to), bytes: *bytes }
                }
                Draft::Dispatch { pipeline, ranges, groups, name } => {
                    let placed = ranges.iter().map(place).collect::<Result<Vec<_>>>()?;
                    let entries: Vec<wgpu::BindGroupEntry> = placed
                        .iter()
                        .enumerate()
                        .map(|(i, (buffer, offset, size))| wgpu::BindGroupEntry {
                            binding: i as u32,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer,
                                offset: *offset,
                                size: size.and_then(wgpu::BufferSize::new),
                            }),
                        })
                        .collect();
                    let layout = pipeline.get_bind_group_layout(0);
                    let bind = be.device.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some(name),
                        layout: &layout,
                        entries: &entries,
                    });
                    be.take_errors(&format!("binding {name}"))?;
                    Step::Dispatch { pipeline: pipeline.clone(), bind, groups: *groups }
                }
            });
        }
        Ok(Recorded { steps, ops: self.ops, bytes: self.params.len() as u64 + scratch_bytes })
    }

    /// Records one op (through the registry: each op's `RunOp` impl sits in its family's file).
    pub fn op(&mut self, op: &Op) -> Result<()> {
        let start = self.drafts.len();
        op.run_on(self)?;
        self.ops.push((start, self.drafts.len(), format!("{:<22} {}", op.name(), op.shapes())));
        Ok(())
    }

    fn range(&self, b: &Bind) -> Result<Range> {
        Ok(match b {
            Bind::Buf(id) => {
                let slot = self.be.arena.slot(id.0)?;
                let buf = self.be.arena.buffer(slot)?.clone();
                Range::Arena { chunk: slot.chunk, buf, offset: slot.offset, size: slot.bytes() }
            }
            Bind::Counter(c) => Range::Whole(
                self.be.counters.get(c.0).ok_or_else(|| Error::State(format!("wgpu: no counter {}", c.0)))?.clone(),
            ),
            Bind::Scratch(i) => {
                let (offset, size) =
                    *self.scratch.get(*i).ok_or_else(|| Error::State(format!("wgpu: no scratch range {i}")))?;
                Range::Scratch { offset, size }
            }
        })
    }

    /// The kernel choices in force (tile, subgroups).
    pub fn choice(&self) -> &super::tuning::Choice {
        &self.be.choice
    }

    /// A scratch range of `len` f32 values owned by the recorded list (scratch, partial sums,
    /// the placeholder bound where an optional buffer is absent); zeros until first written.
    pub fn scratch(&mut self, len: usize) -> Bind {
        Bind::Scratch(self.scratch_range(((len * 4) as u64).max(4)))
    }

    /// Lays out a scratch range of `size` bytes; returns its index.
    fn scratch_range(&mut self, size: u64) -> usize {
        let offset = self.scratch_end.next_multiple_of(self.align);
        self.scratch.push((offset, size));
        self.scratch_end = offset + size;
        self.scratch.len() - 1
    }

    /// Records a dispatch of `k` over `groups` workgroups with `params` at binding 0, `reads`
    /// next and `writes` last. A read that is also written by the same dispatch is copied to a
    /// scratch range first (the kernel's two bindings must not alias).
    pub fn dispatch(
        &mut self,
        k: &Kernel,
        params: &[u32],
        (reads, writes): (&[Bind], &[Bind]),
        groups: [u32; 3],
    ) -> Result<()> {
        let pipeline = self.be.pipeline(k)?;
        let offset = (self.params.len() as u64).next_multiple_of(self.align);
        self.params.resize(offset as usize, 0);
        if params.is_empty() {
            self.params.extend([0; 4]);
        } else {
            self.params.extend(params.iter().flat_map(|p| p.to_le_bytes()));
        }
        let mut ranges = vec![Range::Params { offset, size: self.params.len() as u64 - offset }];
        let written: Vec<BufId> =
            writes.iter().filter_map(|b| if let Bind::Buf(id) = b { Some(*id) } else { None }).collect();
        for r in reads {
            let range = self.range(r)?;
            match (r, &range) {
                (Bind::Buf(id), Range::Arena { size, .. }) if written.contains(id) => {
                    let bytes = *size;
                    let i = self.scratch_range(bytes);
                    let (offset, size) = self.scratch[i];
                    let copy = Range::Scratch { offset, size };
                    self.drafts.push(Draft::Copy { src: range, dst: copy.clone(), bytes });
                    ranges.push(copy);
                }
                _ => ranges.push(range),
            }
        }
        for w in writes {
            ranges.push(self.range(w)?);
        }
        if groups.iter().all(|&g| g > 0) {
            self.drafts.push(Draft::Dispatch { pipeline, ranges, groups, name: k.name });
        }
        Ok(())
    }

    /// Records a copy of the first `len` 32-bit values of `src` into `dst`: a buffer copy, or
    /// a kernel where both lie in one wgpu buffer (two plan buffers of one arena chunk).
    pub fn copy(&mut self, src: &Bind, dst: &Bind, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if let (Bind::Buf(a), Bind::Buf(b)) = (src, dst)
            && a == b
        {
            return Ok(());
        }
        let (s, d) = (self.range(src)?, self.range(dst)?);
        let same = match (&s, &d) {
            (Range::Arena { chunk: a, .. }, Range::Arena { chunk: b, .. }) => a == b,
            (Range::Scratch { offset: a, .. }, Range::Scratch { offset: b, .. }) => {
                !self.be.arena.dedicated() || a == b
            }
            _ => false,
        };
        if same {
            return self.dispatch(
                &COPY_WORDS,
                &[u(len)?],
                (std::slice::from_ref(src), std::slice::from_ref(dst)),
                grid(len),
            );
        }
        self.drafts.push(Draft::Copy { src: s, dst: d, bytes: (len * 4) as u64 });
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
