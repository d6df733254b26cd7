//! CUDA graphs: the op list of a step captured once and replayed with one launch.
//!
//! [`crate::backend::Backend::run_cached`] with a key: the first call runs the ops eagerly (the
//! warm-up: cuDNN algorithm searches, workspace growth, cuBLASLt heuristics all happen there);
//! the second captures the same ops from the stream into a graph (`cuStreamBeginCapture` in
//! thread-local mode, so other threads' CUDA calls are unaffected), instantiates and launches it;
//! later calls only launch. A key whose op list changes starts over with a warm-up. During
//! capture, allocating or copying from the host is refused with an error (see
//! `memory.rs`), since the graph would bake in a copy or a pointer of the moment.
//!
//! Replays compute exactly what eager runs compute: the same kernels with the same arguments,
//! every kernel and library algorithm deterministic. Dropout counters live in device memory and
//! are incremented by a kernel inside the graph, so each replay draws the next mask.

use cudarc::driver::sys;

use super::CudaBackend;
use super::driver::drv;
use crate::Result;
use crate::backend::ops::Op;

/// One key's op list and, once captured, its graph.
pub(crate) struct Cached {
    ops: Vec<Op>,
    graph: Option<(sys::CUgraph, sys::CUgraphExec)>,
}

impl Drop for Cached {
    fn drop(&mut self) {
        if let Some((g, e)) = self.graph.take() {
            // SAFETY: both belong to this value; the owning backend synchronises before
            // dropping graphs it replaces or holds.
            unsafe {
                let _ = drv!(cuGraphExecDestroy(e));
                let _ = drv!(cuGraphDestroy(g));
            }
        }
    }
}

impl CudaBackend {
    /// How many op lists are held as captured CUDA graphs (each replayed on later calls with
    /// its key): shows which plans run as graphs.
    pub fn graph_count(&self) -> usize {
        self.graphs.values().filter(|c| c.graph.is_some()).count()
    }

    pub(super) fn run_cached_ops(&mut self, key: u64, ops: &[Op]) -> Result<()> {
        // Nothing to capture in an empty list (CUDA would instantiate an empty graph).
        if self.eager || ops.is_empty() {
            return self.run_ops(ops);
        }
        let state = self.graphs.get(&key).filter(|c| c.ops == ops).map(|c| c.graph.map(|g| g.1));
        match state {
            Some(Some(exec)) => {
                if self.debug {
                    eprintln!("[kiln cuda] graph {key:#x}: replay ({} ops)", ops.len());
                }
                // SAFETY: an instantiated graph of this context; its buffers live as long as the
                // backend (nothing is freed while the backend lives).
                unsafe { drv!(cuGraphLaunch(exec, self.gpu.stream)) }
            }
            Some(None) => {
                let graph = self.capture(ops)?;
                if self.debug {
                    eprintln!("[kiln cuda] graph {key:#x}: captured {} ops, launching", ops.len());
                }
                let exec = graph.1;
                self.graphs.get_mut(&key).expect("present above").graph = Some(graph);
                // SAFETY: as above.
                unsafe { drv!(cuGraphLaunch(exec, self.gpu.stream)) }
            }
            None => {
                if self.graphs.remove(&key).is_some() {
                    // The old graph may still be running: wait before destroying it.
                    self.gpu.sync()?;
                }
                if self.debug {
                    eprintln!("[kiln cuda] graph {key:#x}: warm-up ({} ops, eager)", ops.len());
                }
                self.run_ops(ops)?;
                self.graphs.insert(key, Cached { ops: ops.to_vec(), graph: None });
                Ok(())
            }
        }
    }

    /// Records `ops` from the stream into an instantiated graph (nothing runs).
    fn capture(&mut self, ops: &[Op]) -> Result<(sys::CUgraph, sys::CUgraphExec)> {
        let stream = self.gpu.stream;
        // SAFETY: the stream is live; capture ends on every path below.
        unsafe {
            drv!(cuStreamBeginCapture_v2(stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL))?;
        }
        self.mem.capturing = true;
        let recorded = ops.iter().try_for_each(|op| self.exec(op));
        // NCCL's stream, forked from the captured one by the all-reduces, joins it back (also
        // after a failed op: the capture must end with every forked stream joined).
        let recorded = recorded.and(self.join_collectives());
        self.mem.capturing = false;
        let mut graph = std::ptr::null_mut();
        // SAFETY: ends the capture begun above; `graph` receives the result (null if invalid).
        let ended = unsafe { drv!(cuStreamEndCapture(stream, &mut graph)) };
        let destroy = |g: sys::CUgraph| {
            if !g.is_null() {
                // SAFETY: `g` was returned by the capture above and is used nowhere else.
                unsafe {
                    let _ = drv!(cuGraphDestroy(g));
                }
            }
        };
        if let Err(e) = recorded.and(ended) {
            destroy(graph);
            return Err(e);
        }
        let mut exec = std::ptr::null_mut();
        // SAFETY: `graph` is a complete captured graph.
        if let Err(e) = unsafe { drv!(cuGraphInstantiateWithFlags(&mut exec, graph, 0)) } {
            destroy(graph);
            return Err(e);
        }
        Ok((graph, exec))
    }
}
