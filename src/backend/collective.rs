//! The collective seam: what a backend needs from a data-parallel group. The backends call it
//! (the CPU backend reduces through it, the CUDA backend bootstraps NCCL with it);
//! [`crate::dist`] implements it ([`crate::dist::TcpCommunicator`]) and re-exports it, so
//! `dist` uses `backend` and never the other way round.

use std::time::Duration;

use crate::Result;

/// The collectives of a data-parallel group, over host buffers.
///
/// Every rank of a group must call the same collectives, with the same lengths, in the same
/// order; a rank that does otherwise gets an error naming what its peer did instead (TCP). A
/// collective that does not complete within the communicator's timeout, or whose peer has
/// exited, is an [`crate::Error::Dist`] naming the peer, never a hang.
pub trait Communicator: Send {
    /// This process's rank, `0..world()`.
    fn rank(&self) -> usize;

    /// Number of processes in the group.
    fn world(&self) -> usize;

    /// Replaces `data` on every rank by its element-wise sum over the ranks. Every rank gets the
    /// same bits.
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()>;

    /// [`Communicator::all_reduce_sum`] in f64 (batch-norm statistics).
    fn all_reduce_sum_f64(&mut self, data: &mut [f64]) -> Result<()>;

    /// Replaces `data` on every rank by its element-wise mean over the ranks.
    fn all_reduce_mean(&mut self, data: &mut [f32]) -> Result<()> {
        self.all_reduce_sum(data)?;
        let w = self.world() as f32;
        if w != 1.0 {
            data.iter_mut().for_each(|v| *v /= w);
        }
        Ok(())
    }

    /// Replaces `data` on every rank by rank `root`'s.
    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<()>;

    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()>;

    /// How long a collective may wait for a peer before failing.
    fn timeout(&self) -> Duration;

    /// One line: kind, rank and world size.
    fn describe(&self) -> String;
}
