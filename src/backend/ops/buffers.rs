//! Which buffers an op reads and writes, and how many values of each it touches. Each op writes
//! its table once ([`OpDesc::each_buf`], in its family file); on it are built what every
//! backend validates op lists with ([`Op::validate`]), what the planner renames buffers with
//! ([`Op::visit_bufs`]) and what the CUDA backend orders its collectives with ([`Op::buffers`]).

use super::*;
use crate::backend::DType;
use crate::{Error, Result};

/// How an op uses a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Only read.
    Read,
    /// Overwritten without being read.
    Write,
    /// Read, then written (accumulated gradients, running statistics, optimizer state).
    ReadWrite,
}

impl Access {
    /// Whether the op writes the buffer.
    pub fn writes(self) -> bool {
        self != Access::Read
    }
}

/// One buffer of an op: which, how many values from its start, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufUse {
    /// The buffer.
    pub buf: BufId,
    /// Values the op touches, from the start of the buffer.
    pub len: usize,
    /// Read, written, or both.
    pub access: Access,
}

/// The access of a gradient output: written, or read and written when it accumulates.
pub(crate) fn grad_access(accumulate: bool) -> Access {
    if accumulate { Access::ReadWrite } else { Access::Write }
}

impl Op {
    /// Calls `f` on every buffer the op names, with the values it touches and how.
    pub fn each_buffer(&self, f: &mut impl FnMut(BufUse)) {
        self.each_buf(&mut |buf: &BufId, len: usize, access: Access| f(BufUse { buf: *buf, len, access }))
    }

    /// Every buffer the op names (inputs, outputs, saved tensors, gradients, state), with the
    /// values it touches and how.
    pub fn buffers(&self) -> Vec<BufUse> {
        let mut v = Vec::new();
        self.each_buffer(&mut |u| v.push(u));
        v
    }

    /// Calls `f` on every buffer id the op names, so that it can rename them.
    pub fn visit_bufs(&mut self, f: &mut impl FnMut(&mut BufId)) {
        self.each_buf_mut(&mut |buf: &mut BufId, _: usize, _: Access| f(buf))
    }

    /// Checks the op against the buffers a backend holds (`info` gives a buffer's length in
    /// values and its dtype, `None` for one that does not exist; `computes` says which dtypes
    /// the backend's ops work on): every buffer must exist, be long enough and hold a dtype the
    /// backend computes with, and the op must be consistent in itself. A wrong op list is then
    /// an error, never a read or write past an allocation. Both backends call this before
    /// executing an op.
    pub fn validate(
        &self,
        info: impl Fn(BufId) -> Option<(usize, DType)>,
        computes: impl Fn(DType) -> bool,
    ) -> Result<()> {
        self.check()?;
        let mut bad = None;
        self.each_buffer(&mut |u| {
            let have = info(u.buf);
            if bad.is_none() && have.is_none_or(|(len, dtype)| len < u.len || !computes(dtype)) {
                bad = Some((u, have));
            }
        });
        let Some((u, have)) = bad else { return Ok(()) };
        let what = format!("buffer {} of op {}", u.buf.0, self.name());
        Err(match have {
            None => Error::shape(what, format!("at least {} values", u.len), "no such buffer"),
            Some((len, _)) if len < u.len => {
                Error::shape(what, format!("at least {} values", u.len), format!("{len} values"))
            }
            Some((_, dtype)) => {
                Error::shape(what, "values of a dtype the backend computes with", format!("{dtype} values"))
            }
        })
    }
}
