//! The CPU backend's collective: [`crate::backend::Op::AllReduce`] through the backend's
//! communicator (TCP between processes). A bucket's buffers are packed into one message, reduced
//! in f32 (f64 on the f64 reference backend), and unpacked.

use super::CpuBackend;
use super::float::Float;
use crate::Result;
use crate::backend::Communicator;
use crate::backend::ops::BufId;
use crate::backend::ops::{self, OpDesc, RunOp};

/// Sums (or, with `mean`, averages) `list`'s buffers over the group.
pub fn all_reduce<T: Float>(
    comm: &mut dyn Communicator,
    bufs: &mut [Vec<T>],
    list: &[(BufId, usize)],
    mean: bool,
) -> Result<()> {
    let world = comm.world();
    if world == 1 {
        return Ok(());
    }
    let total: usize = list.iter().map(|x| x.1).sum();
    let values = |flat: &mut dyn Iterator<Item = f64>, bufs: &mut [Vec<T>]| {
        for &(b, len) in list {
            for (d, s) in bufs[b.0][..len].iter_mut().zip(&mut *flat) {
                *d = T::from_f64(s);
            }
        }
    };
    if std::mem::size_of::<T>() == 8 {
        let mut flat: Vec<f64> = Vec::with_capacity(total);
        list.iter().for_each(|&(b, len)| flat.extend(bufs[b.0][..len].iter().map(|v| v.to_f64())));
        comm.all_reduce_sum_f64(&mut flat)?;
        let w = if mean { world as f64 } else { 1.0 };
        values(&mut flat.into_iter().map(|v| v / w), bufs);
    } else {
        let mut flat: Vec<f32> = Vec::with_capacity(total);
        list.iter().for_each(|&(b, len)| flat.extend(bufs[b.0][..len].iter().map(|v| v.to_f32())));
        comm.all_reduce_sum(&mut flat)?;
        let w = if mean { world as f32 } else { 1.0 };
        values(&mut flat.into_iter().map(|v| (v / w) as f64), bufs);
    }
    Ok(())
}

impl<T: Float> RunOp<ops::AllReduce> for CpuBackend<T> {
    fn run_op(&mut self, o: &ops::AllReduce) -> Result<()> {
        let ops::AllReduce { bufs, mean } = o;
        all_reduce(super::group(&mut self.comm, ops::AllReduce::NAME)?, &mut self.bufs, bufs, *mean)?;
        Ok(())
    }
}
