//! The TCP communicator, with one thread per rank on localhost: the rendezvous for groups of 1
//! to 4, all-reduce (sum, mean, f64), broadcast and barrier results, and every way a group
//! fails (a world size or rank that does not fit, nobody at the rendezvous, a peer that exits,
//! a peer that hangs, ranks running different collectives) ending in an error naming the cause
//! within the timeout, never a hang.

mod common;
use common::free_port;

use std::time::{Duration, Instant};

use kiln::Error;
use kiln::dist::{Communicator, DistEnv, TcpCommunicator};

fn env(rank: usize, world: usize, port: u16) -> DistEnv {
    DistEnv { rank, world_size: world, local_rank: rank, master_addr: "127.0.0.1".into(), master_port: port }
}

/// Runs `f(rank, communicator)` on one thread per rank of a fresh group; results by rank.
fn group<T: Send>(world: usize, timeout: Duration, f: impl Fn(usize, TcpCommunicator) -> T + Sync) -> Vec<T> {
    let port = free_port();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let f = &f;
                s.spawn(move || f(r, TcpCommunicator::connect(&env(r, world, port), timeout).unwrap()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn dist_reason(e: Error) -> String {
    match e {
        Error::Dist { context, reason } => format!("{context}: {reason}"),
        other => panic!("expected a data-parallel error, got {other:?}"),
    }
}

const T: Duration = Duration::from_secs(30);

#[test]
fn all_reduce_sums_exactly_on_every_rank_for_groups_of_one_to_four() {
    for world in 1..=4 {
        // Lengths below, at and far above the world size, and one that splits unevenly.
        let lens = [0usize, 1, 3, 1000, 100_003];
        let results = group(world, T, |rank, mut c| {
            assert_eq!((c.rank(), c.world()), (rank, world));
            lens.iter()
                .map(|&n| {
                    // Integers, so every summation order gives the exact sum.
                    let mut v: Vec<f32> = (0..n).map(|i| (rank * 1000 + i % 997) as f32).collect();
                    c.all_reduce_sum(&mut v).unwrap();
                    v
                })
                .collect::<Vec<_>>()
        });
        for (k, &n) in lens.iter().enumerate() {
            let expected: Vec<f32> =
                (0..n).map(|i| (0..world).map(|r| (r * 1000 + i % 997) as f32).sum::<f32>()).collect();
            for (rank, r) in results.iter().enumerate() {
                assert_eq!(r[k], expected, "world {world}, rank {rank}, length {n}");
            }
        }
    }
}

#[test]
fn every_rank_gets_the_same_bits_for_mean_and_f64_sums() {
    for world in [2, 3, 4] {
        let results = group(world, T, |rank, mut c| {
            let mut rng = kiln::rng::Rng::new(rank as u64 + 7);
            let mut v: Vec<f32> = (0..5000).map(|_| rng.uniform_range(-1.0, 1.0)).collect();
            let orig = v.clone();
            c.all_reduce_mean(&mut v).unwrap();
            let mut d: Vec<f64> = orig.iter().map(|&x| x as f64 * 1e-3).collect();
            c.all_reduce_sum_f64(&mut d).unwrap();
            (orig, v, d)
        });
        for i in 0..5000 {
            let exact: f64 = results.iter().map(|r| r.0[i] as f64).sum();
            let mean = results[0].1[i];
            assert!((mean as f64 - exact / world as f64).abs() < 1e-6, "world {world} [{i}]");
            assert!((results[0].2[i] - exact * 1e-3).abs() < 1e-12);
        }
        for r in &results[1..] {
            assert!(r.1.iter().zip(&results[0].1).all(|(a, b)| a.to_bits() == b.to_bits()), "world {world}: f32 bits");
            assert!(r.2.iter().zip(&results[0].2).all(|(a, b)| a.to_bits() == b.to_bits()), "world {world}: f64 bits");
        }
    }
}

#[test]
fn broadcast_from_every_root_and_barrier() {
    for world in 1..=4 {
        let results = group(world, T, |rank, mut c| {
            let mut got = Vec::new();
            for root in 0..world {
                // Longer than one pipeline piece (1 MiB), so the pieces are checked too.
                let mut v: Vec<f32> = (0..300_000).map(|i| (rank * 7 + i) as f32).collect();
                c.broadcast(&mut v, root).unwrap();
                got.push(v);
                c.barrier().unwrap();
            }
            assert!(c.broadcast(&mut [0.0], world).is_err(), "a root outside the group");
            got
        });
        for (rank, r) in results.iter().enumerate() {
            for (root, v) in r.iter().enumerate() {
                assert!(v.iter().enumerate().all(|(i, &x)| x == (root * 7 + i) as f32), "world {world} rank {rank}");
            }
        }
    }
}

#[test]
fn a_world_size_that_differs_between_ranks_is_refused() {
    let port = free_port();
    let errs: Vec<String> = std::thread::scope(|s| {
        let a = s.spawn(|| TcpCommunicator::connect(&env(0, 2, port), T).err());
        let b = s.spawn(|| TcpCommunicator::connect(&env(1, 3, port), T).err());
        [a, b].into_iter().map(|h| dist_reason(h.join().unwrap().expect("must fail"))).collect()
    });
    for e in &errs {
        assert!(e.contains("world size is 3, rank 0 says 2"), "{e}");
    }
}

#[test]
fn a_rank_taken_twice_is_refused() {
    let port = free_port();
    let errs: Vec<Option<Error>> = std::thread::scope(|s| {
        let hs: Vec<_> = [0, 1, 1]
            .into_iter()
            .map(|r| s.spawn(move || TcpCommunicator::connect(&env(r, 3, port), Duration::from_secs(5)).err()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let reasons: Vec<String> = errs.into_iter().map(|e| dist_reason(e.expect("every rank fails"))).collect();
    assert!(reasons[0].contains("rank 1 joined twice"), "{reasons:?}");
}

#[test]
fn nobody_at_the_rendezvous_is_an_error_within_the_timeout() {
    let t = Duration::from_millis(600);
    // A worker whose rank 0 never starts.
    let start = Instant::now();
    let e = dist_reason(TcpCommunicator::connect(&env(1, 2, free_port()), t).err().unwrap());
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    assert!(e.contains("rank 0 was not reachable"), "{e}");
    // A rank 0 whose workers never come: the error lists them.
    let start = Instant::now();
    let e = dist_reason(TcpCommunicator::connect(&env(0, 3, free_port()), t).err().unwrap());
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(e.contains("rank(s) 1, 2 of 3 did not join"), "{e}");
}

#[test]
fn a_peer_that_exits_stops_the_others_at_once_not_at_the_timeout() {
    // Rank 3 of 4 leaves (drops its sockets, as an exiting process does); the timeout is long,
    // so only the closed connections can end the others' all-reduce this fast.
    let start = Instant::now();
    let errs = group(4, Duration::from_secs(60), |rank, mut c| {
        c.barrier().unwrap();
        if rank == 3 {
            drop(c);
            return None;
        }
        let mut v = vec![1.0f32; 1 << 16];
        let e = c.all_reduce_sum(&mut v).err().map(dist_reason);
        // Broken for good: the next collective fails at once too.
        assert!(c.barrier().err().map(dist_reason).unwrap().contains("failed earlier"));
        e
    });
    assert!(start.elapsed() < Duration::from_secs(20), "{:?}", start.elapsed());
    for (rank, e) in errs.iter().enumerate().take(3) {
        let e = e.as_ref().unwrap_or_else(|| panic!("rank {rank} did not fail"));
        assert!(e.contains("closed its connection"), "rank {rank}: {e}");
    }
    // The neighbours of rank 3 name it.
    assert!(errs[0].as_ref().unwrap().contains("rank 3") || errs[2].as_ref().unwrap().contains("rank 3"));
}

#[test]
fn a_peer_that_hangs_is_a_timeout_error() {
    let t = Duration::from_millis(500);
    let start = Instant::now();
    let errs = group(2, t, |rank, mut c| {
        if rank == 1 {
            // Alive but never joining the collective.
            std::thread::sleep(Duration::from_secs(2));
            return None;
        }
        let mut v = vec![1.0f32; 10];
        c.all_reduce_sum(&mut v).err().map(dist_reason)
    });
    let e = errs[0].as_ref().expect("rank 0 fails");
    assert!(e.contains("timed out after 0.5 s") && e.contains("rank 1"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn ranks_running_different_collectives_get_an_error_saying_so() {
    let errs = group(2, Duration::from_secs(5), |rank, mut c| {
        let mut v = vec![0.0f32; 10 + rank];
        c.all_reduce_sum(&mut v).err().map(dist_reason)
    });
    let e = errs.iter().flatten().next().expect("someone notices");
    assert!(e.contains("not running the same collectives"), "{e}");
    let errs = group(2, Duration::from_secs(5), |rank, mut c| {
        let mut v = vec![0.0f32; 4];
        if rank == 0 {
            let r = c.broadcast(&mut v, 0).err().map(dist_reason);
            // Stay connected while rank 1 reads what was sent (a close with its message unread
            // would reset the connection first).
            std::thread::sleep(Duration::from_millis(300));
            r
        } else {
            c.all_reduce_sum(&mut v).err().map(dist_reason)
        }
    });
    let e = errs[1].as_ref().expect("rank 1 receives the broadcast where it expected an all-reduce");
    assert!(e.contains("rank 0 sent broadcast"), "{e}");
}
