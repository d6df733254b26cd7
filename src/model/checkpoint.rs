//! Gradient checkpointing, the model's side: [`ModelBuilder::checkpoint`] marks a run of layers
//! as one segment whose activations are not kept for backward but recomputed there (PyTorch's
//! `torch.utils.checkpoint`), and [`Model::checkpoints`] lists the segments. A segment is a
//! range of nodes; the compiler (`exec/checkpoint.rs`) does the rest. Segments change memory
//! and time, never results: gradients are bit-identical to the same model without them.

use std::ops::Range;

use super::{Model, ModelBuilder, Node};
use crate::{Error, Result};

/// The builder method of checkpoint blocks.
impl ModelBuilder {
    /// A gradient-checkpointed segment: the layers `segment` appends are computed as usual in
    /// forward, but only the segment's input and output are kept for backward; everything inside
    /// (outputs, batch statistics, dropout masks, pooling indices) is recomputed just before the
    /// segment's backward, in buffers the planner shares between segments. This trades one more
    /// forward pass of the segment for its activation memory, as PyTorch's
    /// `torch.utils.checkpoint`. Gradients are bit-identical to the same model without the
    /// block: the recomputation runs the same ops, draws the same dropout masks (without
    /// advancing their counters) and does not update batch norm's running statistics a second
    /// time.
    ///
    /// ```
    /// use kiln::model::{Conv2d, ModelBuilder};
    /// let model = ModelBuilder::new(&[8, 16, 32, 32])
    ///     .checkpoint(|b| b.residual(|m| m.conv2d_with(Conv2d::new(16, 3).padding(1)).batch_norm().relu()))
    ///     .global_avg_pool()
    ///     .dense(10)
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(model.checkpoints().len(), 1);
    /// ```
    ///
    /// An empty block, and a block inside another, are errors of [`ModelBuilder::build`].
    pub fn checkpoint(self, segment: impl FnOnce(ModelBuilder) -> ModelBuilder) -> Self {
        let start = self.len();
        let b = segment(self);
        let end = b.len();
        b.add_checkpoint(start..end)
    }
}

impl Model {
    /// The gradient-checkpointed segments ([`ModelBuilder::checkpoint`]), as ranges of node
    /// indices (into [`Model::nodes`]), in order.
    pub fn checkpoints(&self) -> &[Range<usize>] {
        &self.checkpoints
    }

    /// The model with `segments` as its checkpointed segments (replacing any it had): ranges of
    /// node indices, each non-empty, none overlapping another, and each used outside itself
    /// only through its last node (the shape of what [`ModelBuilder::checkpoint`] makes). Lets a
    /// model built elsewhere (a zoo model, a loaded file) trade compute for memory.
    pub fn with_checkpoints(mut self, segments: impl IntoIterator<Item = Range<usize>>) -> Result<Model> {
        let mut segments: Vec<Range<usize>> = segments.into_iter().collect();
        check(&self.nodes, &mut segments)?;
        self.checkpoints = segments;
        Ok(self)
    }
}

/// Checks checkpoint segments against the graph and sorts them.
fn check(nodes: &[Node], segments: &mut [Range<usize>]) -> Result<()> {
    let name = |i: usize| nodes.get(i).map_or("?", |n| n.name.as_str());
    for s in segments.iter() {
        if s.start >= s.end {
            let after = if s.start == 0 {
                "at the start of the model".to_string()
            } else {
                format!("after layer '{}'", name(s.start - 1))
            };
            return Err(Error::Model(format!(
                "the checkpoint block {after} is empty: it must hold at least one layer"
            )));
        }
        if s.start == 0 || s.end > nodes.len() {
            return Err(Error::Model(format!(
                "checkpoint segment {}..{} is not a range of layers (1..{})",
                s.start,
                s.end,
                nodes.len()
            )));
        }
    }
    segments.sort_by_key(|s| (s.start, std::cmp::Reverse(s.end)));
    for w in segments.windows(2) {
        if w[1].start < w[0].end {
            return Err(Error::Model(format!(
                "checkpoint blocks cannot be nested or overlap: the block from '{}' to '{}' is inside the one \
                 from '{}' to '{}'",
                name(w[1].start),
                name(w[1].end - 1),
                name(w[0].start),
                name(w[0].end - 1)
            )));
        }
    }
    for s in segments.iter() {
        let last = s.end - 1;
        for (k, node) in nodes.iter().enumerate().filter(|(k, _)| !s.contains(k)) {
            if let Some(&j) = node.inputs.iter().find(|&&j| s.contains(&j) && j != last) {
                return Err(Error::layer(
                    &node.name,
                    format!(
                        "reads layer '{}' inside the checkpoint block from '{}' to '{}' (node {k}); only the \
                         block's last layer may be used outside it",
                        name(j),
                        name(s.start),
                        name(last)
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::iter::once;

    use crate::Error;
    use crate::model::ModelBuilder;

    fn err(b: ModelBuilder) -> String {
        match b.build() {
            Err(Error::Model(m)) => m,
            other => panic!("expected a model error, got {other:?}"),
        }
    }

    #[test]
    fn blocks_record_their_layers() {
        let m = ModelBuilder::new(&[2, 4])
            .dense(4)
            .checkpoint(|b| b.dense(4).relu())
            .checkpoint(|b| b.residual(|m| m.dense(4)))
            .dense(2)
            .build()
            .unwrap();
        assert_eq!(m.checkpoints(), &[2..4, 4..6]);
        assert_eq!(m.nodes()[5].name, "add_1");
    }

    #[test]
    fn empty_and_nested_blocks_are_errors() {
        let e = err(ModelBuilder::new(&[2, 4]).dense(4).name("fc").checkpoint(|b| b));
        assert!(e.contains("checkpoint block after layer 'fc' is empty"), "{e}");
        let e = err(ModelBuilder::new(&[2, 4]).checkpoint(|b| b.dense(4).checkpoint(|c| c.relu())));
        assert!(e.contains("cannot be nested"), "{e}");
    }

    #[test]
    fn segments_read_from_outside_only_at_their_end() {
        // input, dense_1, relu_1, add_1 = relu_1 + dense_1
        let m = ModelBuilder::new(&[2, 4]).dense(4).residual(|b| b.relu()).build().unwrap();
        assert!(m.clone().with_checkpoints(once(2..3)).is_ok());
        assert!(m.clone().with_checkpoints(once(1..4)).is_ok());
        let e = m.clone().with_checkpoints(once(1..3)).unwrap_err().to_string();
        assert!(e.contains("add_1") && e.contains("reads layer 'dense_1' inside the checkpoint block"), "{e}");
        assert!(m.clone().with_checkpoints(once(0..2)).is_err());
        assert!(m.clone().with_checkpoints(once(3..5)).is_err());
        let e = m.with_checkpoints(vec![1..3, 2..3]).unwrap_err().to_string();
        assert!(e.contains("nested"), "{e}");
    }
}
