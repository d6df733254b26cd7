//! Gradient buckets: which parameter gradients are all-reduced together, and where in a
//! training step each bucket's all-reduce goes.
//!
//! As DDP does: gradients are taken in reverse parameter order (roughly the order in which the
//! backward pass finishes them: the last layer's first) and packed into buckets of about
//! `bucket_bytes` (25 MiB), the first bucket smaller (1 MiB) so that communication starts early.
//! A bucket is closed once it holds at least its size, so a tensor larger than a bucket gets one
//! of its own. Each bucket's [`Op::AllReduce`] is placed right after the backward op that last
//! writes one of its gradients: from there on the backend may reduce it while the rest of
//! backward runs.
//!
//! ```
//! use kiln::backend::{BufId, Op};
//! use kiln::dist::bucket;
//!
//! // Three gradients of 1000, 10 and 200,000 f32 values, in parameter order.
//! let grads = [(BufId(0), 1000), (BufId(1), 10), (BufId(2), 200_000)];
//! let buckets = bucket::assign(&grads, 4096, 1 << 20);
//! // Reverse order; the first bucket closes once it holds 4096 bytes.
//! assert_eq!(buckets, vec![vec![(BufId(2), 200_000)], vec![(BufId(1), 10), (BufId(0), 1000)]]);
//! ```

use crate::backend::{BufId, Op, ops};

/// Splits `grads` (buffer, values; in parameter order) into buckets, in reverse order: the first
/// closes at `first_bytes`, the others at `bytes` (f32 values).
pub fn assign(grads: &[(BufId, usize)], first_bytes: usize, bytes: usize) -> Vec<Vec<(BufId, usize)>> {
    let mut buckets: Vec<Vec<(BufId, usize)>> = Vec::new();
    let mut current: Vec<(BufId, usize)> = Vec::new();
    let mut held = 0usize;
    for &(buf, len) in grads.iter().rev() {
        current.push((buf, len));
        held += len * crate::backend::DType::F32.size();
        let cap = if buckets.is_empty() { first_bytes } else { bytes };
        if held >= cap {
            buckets.push(std::mem::take(&mut current));
            held = 0;
        }
    }
    if !current.is_empty() {
        buckets.push(current);
    }
    buckets
}

/// The index in `ops` of the last op that names `buf`, if any.
fn last_use(ops: &[Op], buf: BufId) -> Option<usize> {
    let mut last = None;
    for (i, op) in ops.iter().enumerate() {
        let mut names = false;
        op.clone().visit_bufs(&mut |b: &mut BufId| names |= *b == buf);
        if names {
            last = Some(i);
        }
    }
    last
}

/// `backward` with one [`Op::AllReduce`] (`mean`) per bucket, each right after the last op that
/// names one of the bucket's buffers (parameter gradients are only written in backward, so that
/// op is the last writer); a bucket whose buffers no op names goes at the end. Buckets ready at
/// the same op keep their order.
pub fn insert_all_reduces(backward: &[Op], buckets: &[Vec<(BufId, usize)>], mean: bool) -> Vec<Op> {
    let ready: Vec<usize> = buckets
        .iter()
        .map(|b| b.iter().filter_map(|&(buf, _)| last_use(backward, buf)).max().map_or(backward.len(), |i| i + 1))
        .collect();
    let mut out = Vec::with_capacity(backward.len() + buckets.len());
    for i in 0..=backward.len() {
        for (b, _) in ready.iter().enumerate().filter(|&(_, &r)| r == i) {
            out.push(Op::AllReduce(ops::AllReduce { bufs: buckets[b].clone(), mean }));
        }
        if let Some(op) = backward.get(i) {
            out.push(op.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::GradOut;

    fn grads(lens: &[usize]) -> Vec<(BufId, usize)> {
        lens.iter().enumerate().map(|(i, &l)| (BufId(i), l)).collect()
    }

    #[test]
    fn buckets_fill_in_reverse_order_and_close_at_their_size() {
        // 100 values = 400 bytes; first bucket closes at 400 bytes, the others at 1000.
        let g = grads(&[100, 50, 50, 300, 10, 100]);
        let b = assign(&g, 400, 1000);
        let ids: Vec<Vec<usize>> = b.iter().map(|b| b.iter().map(|x| x.0.0).collect()).collect();
        // 5 (400 B) closes the first; 4 + 3 (1240 B) the second; 2, 1, 0 (800 B) are the rest.
        assert_eq!(ids, vec![vec![5], vec![4, 3], vec![2, 1, 0]]);
    }

    #[test]
    fn every_gradient_is_in_exactly_one_bucket() {
        let lens: Vec<usize> = (0..57).map(|i| (i * 7919) % 3000 + 1).collect();
        let g = grads(&lens);
        for (first, cap) in [(4, 4), (1 << 10, 1 << 12), (1 << 20, 25 << 20), (1, usize::MAX)] {
            let b = assign(&g, first, cap);
            let mut seen: Vec<usize> = b.iter().flatten().map(|x| x.0.0).collect();
            // Reverse parameter order across and within buckets.
            assert!(seen.windows(2).all(|w| w[0] > w[1]), "{seen:?}");
            seen.sort();
            assert_eq!(seen, (0..57).collect::<Vec<_>>());
            // Every bucket but the last holds at least its size, and drops below it without its
            // last tensor.
            for (i, bucket) in b.iter().enumerate().take(b.len() - 1) {
                let cap = if i == 0 { first } else { cap };
                let bytes: usize = bucket.iter().map(|x| x.1 * 4).sum();
                assert!(bytes >= cap && bytes - bucket.last().unwrap().1 * 4 < cap);
            }
        }
        assert!(assign(&[], 1, 1).is_empty());
    }

    fn writes(buf: usize) -> Op {
        Op::GradInto(ops::GradInto { len: 1, src: BufId(100), dst: GradOut { buf: BufId(buf), accumulate: false } })
    }

    #[test]
    fn all_reduces_follow_the_last_writer_of_their_bucket() {
        // Backward writes gradient 3, then 2, then an unrelated buffer, then 1, then 0.
        let backward = vec![writes(3), writes(2), writes(50), writes(1), writes(0)];
        let buckets = vec![vec![(BufId(3), 1), (BufId(2), 1)], vec![(BufId(1), 1), (BufId(0), 1)], vec![(BufId(9), 1)]];
        let ops = insert_all_reduces(&backward, &buckets, true);
        let names: Vec<String> = ops
            .iter()
            .map(|op| match op {
                Op::GradInto(ops::GradInto { dst, .. }) => format!("w{}", dst.buf.0),
                Op::AllReduce(ops::AllReduce { bufs, mean: true }) => format!("r{}", bufs[0].0.0),
                other => panic!("{other:?}"),
            })
            .collect();
        // Bucket 0 after its last writer (gradient 2), bucket 1 after gradient 0, bucket 2 (never
        // written) at the end.
        assert_eq!(names, ["w3", "w2", "r3", "w50", "w1", "w0", "r1", "r9"]);
    }

    #[test]
    fn a_bucket_waits_for_its_latest_gradient_even_out_of_order() {
        let backward = vec![writes(0), writes(1), writes(2)];
        // Gradient 0 is written first but shares a bucket with gradient 2.
        let buckets = vec![vec![(BufId(2), 1), (BufId(0), 1)], vec![(BufId(1), 1)]];
        let ops = insert_all_reduces(&backward, &buckets, false);
        let pos = |pred: &dyn Fn(&Op) -> bool| ops.iter().position(pred).unwrap();
        let r0 = pos(&|o| matches!(o, Op::AllReduce(ops::AllReduce { bufs, .. }) if bufs[0].0 == BufId(2)));
        let r1 = pos(&|o| matches!(o, Op::AllReduce(ops::AllReduce { bufs, .. }) if bufs[0].0 == BufId(1)));
        assert_eq!((r0, r1), (4, 2));
        assert_eq!(ops.len(), 5);
    }
}
