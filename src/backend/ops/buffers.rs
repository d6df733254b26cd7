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

/// How an op uses one buffer, as its table states it: the access and the dtype it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Read, written, or both.
    pub access: Access,
    /// The dtype the buffer must hold (class labels: `U32`); `None`: any dtype the backend
    /// computes with (f32, or f64 on the CPU reference).
    pub dtype: Option<DType>,
}

/// The usages a buffer table names (`buffer_table!` brings them into scope).
pub(crate) mod usage {
    use super::{Access, DType, Usage};

    /// Read, of the computing dtype.
    pub const R: Usage = Usage { access: Access::Read, dtype: None };
    /// Overwritten, of the computing dtype.
    pub const W: Usage = Usage { access: Access::Write, dtype: None };
    /// Read and written, of the computing dtype.
    pub const RW: Usage = Usage { access: Access::ReadWrite, dtype: None };
    /// Read, `u32` values (class labels).
    pub const R_U32: Usage = Usage { access: Access::Read, dtype: Some(DType::U32) };

    /// A gradient output: written, or read and written when it accumulates.
    pub fn grad_access(accumulate: bool) -> Usage {
        if accumulate { RW } else { W }
    }
}

/// One buffer of an op: which, how many values from its start, how, and of which dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufUse {
    /// The buffer.
    pub buf: BufId,
    /// Values the op touches, from the start of the buffer.
    pub len: usize,
    /// Read, written, or both.
    pub access: Access,
    /// The dtype the buffer must hold; `None`: one the backend computes with.
    pub dtype: Option<DType>,
}

impl Op {
    /// Calls `f` on every buffer the op names, with the values it touches and how.
    pub fn each_buffer(&self, f: &mut impl FnMut(BufUse)) {
        self.each_buf(&mut |buf: &BufId, len: usize, u: Usage| {
            f(BufUse { buf: *buf, len, access: u.access, dtype: u.dtype })
        })
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
        self.each_buf_mut(&mut |buf: &mut BufId, _: usize, _: Usage| f(buf))
    }

    /// Checks the op against the buffers a backend holds (`info` gives a buffer's length in
    /// values and its dtype, `None` for one that does not exist; `computes` says which dtypes
    /// the backend's ops work on): every buffer must exist, be long enough and hold the dtype
    /// the op's table names (class labels: `u32`) or else one the backend computes with, and the op must be consistent in itself. A wrong op list is then
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
            let fits = |dtype: DType| u.dtype.map_or(computes(dtype), |want| dtype == want);
            if bad.is_none() && have.is_none_or(|(len, dtype)| len < u.len || !fits(dtype)) {
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
            Some((_, dtype)) => match u.dtype {
                Some(want) => Error::shape(what, format!("{want} values"), format!("{dtype} values")),
                None => Error::shape(what, "values of a dtype the backend computes with", format!("{dtype} values")),
            },
        })
    }
}
