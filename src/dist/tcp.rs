//! The TCP communicator: a data-parallel group over plain `std::net` sockets, for CPU workers
//! (and for bootstrapping NCCL).
//!
//! Rendezvous: rank 0 listens at `MASTER_ADDR:MASTER_PORT` (on every interface, as PyTorch's
//! TCP store does); every other rank connects to it (retrying until the timeout, so the order
//! in which processes start does not matter) and says its rank, the world size and the port of
//! its own ring listener. Rank 0 checks that the world sizes agree and no rank is taken twice,
//! then sends everyone the address table (each worker's address as rank 0 saw it). Each rank
//! then connects to its successor in the ring and accepts its predecessor, and a barrier checks
//! the ring end to end.
//!
//! Collectives run over the ring: all-reduce is a reduce-scatter followed by an all-gather
//! (each rank sends and receives `2 (world - 1) / world` of the data, whatever the world size),
//! so every rank ends with the same bits; broadcast is a pipeline from the root along the ring;
//! barrier is an all-reduce of one value. Every message carries a header (collective, sequence
//! number, length) that the receiver checks, so ranks that disagree on what they are doing get
//! an error saying so instead of corrupt sums.
//!
//! Failure: a read or write that waits longer than the timeout, or a peer that closes its
//! socket (a process that exited does), ends the collective with [`Error::Dist`] naming the
//! peer. The communicator is then broken: it shuts its sockets down, so its own neighbours
//! stop as well instead of waiting out their timeouts, and refuses further collectives.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::{Communicator, DistEnv};
use crate::{Error, Result};

const RENDEZVOUS_MAGIC: &[u8; 8] = b"KILNRDV1";
const RING_MAGIC: &[u8; 8] = b"KILNRNG1";
/// Messages up to this size are written before the matching read (the socket buffers absorb
/// them); larger ones are written from a second thread while this one reads, so two neighbours
/// sending to each other cannot block each other.
const INLINE_BYTES: usize = 16 << 10;
/// Broadcast pipelines the data along the ring in pieces of this many bytes.
const BROADCAST_PIECE: usize = 1 << 20;

/// Which collective a message belongs to (checked by the receiver).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    AllReduceF32 = 1,
    AllReduceF64 = 2,
    Broadcast = 3,
    Barrier = 4,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::AllReduceF32 => "all_reduce",
            Kind::AllReduceF64 => "all_reduce (f64)",
            Kind::Broadcast => "broadcast",
            Kind::Barrier => "barrier",
        }
    }

    fn from_u32(v: u32) -> Option<Kind> {
        Some(match v {
            1 => Kind::AllReduceF32,
            2 => Kind::AllReduceF64,
            3 => Kind::Broadcast,
            4 => Kind::Barrier,
            _ => return None,
        })
    }
}

/// The values a collective moves, as little-endian bytes.
trait Elem: Copy + Send + Sync + std::ops::AddAssign {
    const SIZE: usize;
    fn put(v: &[Self], out: &mut Vec<u8>);
    fn get(b: &[u8]) -> Self;
}

impl Elem for f32 {
    const SIZE: usize = 4;
    fn put(v: &[f32], out: &mut Vec<u8>) {
        out.clear();
        out.extend(v.iter().flat_map(|x| x.to_le_bytes()));
    }
    fn get(b: &[u8]) -> f32 {
        f32::from_le_bytes(b.try_into().expect("4 bytes"))
    }
}

impl Elem for f64 {
    const SIZE: usize = 8;
    fn put(v: &[f64], out: &mut Vec<u8>) {
        out.clear();
        out.extend(v.iter().flat_map(|x| x.to_le_bytes()));
    }
    fn get(b: &[u8]) -> f64 {
        f64::from_le_bytes(b.try_into().expect("8 bytes"))
    }
}

/// The two sockets of a rank in the ring.
struct Ring {
    /// To rank `(rank + 1) % world`.
    next: TcpStream,
    /// From rank `(rank + world - 1) % world`.
    prev: TcpStream,
}

/// A data-parallel group over TCP; see the module documentation.
///
/// ```
/// use kiln::dist::{Communicator, DistEnv, TcpCommunicator};
/// use std::time::Duration;
///
/// // A group of one needs no network; a real job reads its place with DistEnv::from_env().
/// let mut comm = TcpCommunicator::connect(&DistEnv::single(), Duration::from_secs(10)).unwrap();
/// let mut grads = vec![1.0f32, 2.0];
/// comm.all_reduce_mean(&mut grads).unwrap();
/// assert_eq!(grads, [1.0, 2.0]);
/// ```
pub struct TcpCommunicator {
    rank: usize,
    world: usize,
    timeout: Duration,
    ring: Option<Ring>,
    /// Collectives started so far (every message carries it).
    seq: u32,
    /// Why the communicator stopped working, after a failed collective.
    broken: Option<String>,
    send_buf: Vec<u8>,
    recv_buf: Vec<u8>,
}

fn rendezvous_err(env: &DistEnv, reason: impl Into<String>) -> Error {
    Error::dist(
        format!("rendezvous of rank {} of {} at {}:{}", env.rank, env.world_size, env.master_addr, env.master_port),
        reason,
    )
}

/// Appends a `u32`, little-endian (every number on the wire is).
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn read_u32(s: &mut TcpStream) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u16(s: &mut TcpStream) -> io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_le_bytes(b))
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}

/// Connects to `host:port`, retrying (the peer may not be listening yet) until `deadline`.
fn connect_retrying(host: &str, port: u16, deadline: Instant) -> std::result::Result<TcpStream, String> {
    let mut last = String::from("no attempt made");
    loop {
        match (host, port).to_socket_addrs() {
            Ok(addrs) => {
                for a in addrs {
                    let wait = remaining(deadline).min(Duration::from_secs(2));
                    match TcpStream::connect_timeout(&a, wait) {
                        Ok(s) => return Ok(s),
                        Err(e) => last = format!("{a}: {e}"),
                    }
                }
            }
            Err(e) => last = format!("cannot resolve '{host}': {e}"),
        }
        if Instant::now() >= deadline {
            return Err(last);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Accepts one connection on `listener` before `deadline`.
fn accept_until(listener: &TcpListener, deadline: Instant) -> io::Result<Option<(TcpStream, SocketAddr)>> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((s, a)) => {
                s.set_nonblocking(false)?;
                return Ok(Some((s, a)));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The unspecified address of the family `host` resolves to (IPv4 when it does not resolve).
fn any_addr_like(host: &str) -> IpAddr {
    match (host, 0).to_socket_addrs().ok().and_then(|mut a| a.next()) {
        Some(SocketAddr::V6(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    }
}

impl TcpCommunicator {
    /// Joins the group `env` describes: the rendezvous at `env.master_addr:env.master_port`,
    /// then the ring. Fails with [`Error::Dist`] when the group does not form within `timeout`
    /// (naming the ranks that did not arrive), when ranks disagree on the world size, or when a
    /// rank is taken twice. A group of one opens no socket.
    pub fn connect(env: &DistEnv, timeout: Duration) -> Result<TcpCommunicator> {
        let mut c = TcpCommunicator {
            rank: env.rank,
            world: env.world_size,
            timeout,
            ring: None,
            seq: 0,
            broken: None,
            send_buf: Vec::new(),
            recv_buf: Vec::new(),
        };
        if env.world_size <= 1 {
            return Ok(c);
        }
        if env.rank >= env.world_size {
            return Err(rendezvous_err(env, format!("rank {} is not below the world size", env.rank)));
        }
        let deadline = Instant::now() + timeout;
        let bind_ip = any_addr_like(&env.master_addr);
        let ring_listener = TcpListener::bind((bind_ip, 0))
            .map_err(|e| rendezvous_err(env, format!("cannot open a listening socket: {e}")))?;
        let ring_port = ring_listener.local_addr().map_err(|e| rendezvous_err(env, e.to_string()))?.port();
        let table = if env.rank == 0 {
            Self::serve_table(env, bind_ip, ring_port, deadline)?
        } else {
            Self::fetch_table(env, ring_port, deadline)?
        };

        let w = env.world_size;
        let (next, prev) = ((env.rank + 1) % w, (env.rank + w - 1) % w);
        let (ip, port) = table[next];
        let mut to_next = connect_retrying(&ip.to_string(), port, deadline)
            .map_err(|e| rendezvous_err(env, format!("cannot connect to rank {next} at {ip}:{port}: {e}")))?;
        let mut hello = RING_MAGIC.to_vec();
        put_u32(&mut hello, env.rank as u32);
        put_u32(&mut hello, w as u32);
        to_next.write_all(&hello).map_err(|e| rendezvous_err(env, format!("greeting rank {next}: {e}")))?;
        let (mut from_prev, _) = accept_until(&ring_listener, deadline)
            .map_err(|e| rendezvous_err(env, format!("waiting for rank {prev}: {e}")))?
            .ok_or_else(|| {
                rendezvous_err(env, format!("rank {prev} did not connect within {:.1} s", timeout.as_secs_f64()))
            })?;
        from_prev.set_read_timeout(Some(remaining(deadline))).map_err(|e| rendezvous_err(env, e.to_string()))?;
        let mut magic = [0u8; 8];
        let got = from_prev
            .read_exact(&mut magic)
            .and_then(|_| Ok((read_u32(&mut from_prev)?, read_u32(&mut from_prev)?)))
            .map_err(|e| rendezvous_err(env, format!("reading rank {prev}'s greeting: {e}")))?;
        if &magic != RING_MAGIC || got != (prev as u32, w as u32) {
            return Err(rendezvous_err(
                env,
                format!(
                    "expected rank {prev} of {w} to connect, got {} (another job on this port?)",
                    if &magic == RING_MAGIC { format!("rank {} of {}", got.0, got.1) } else { "a stranger".into() }
                ),
            ));
        }
        for s in [&to_next, &from_prev] {
            s.set_nodelay(true)
                .and_then(|_| s.set_read_timeout(Some(timeout)))
                .and_then(|_| s.set_write_timeout(Some(timeout)))
                .map_err(|e| rendezvous_err(env, e.to_string()))?;
        }
        c.ring = Some(Ring { next: to_next, prev: from_prev });
        c.barrier().map_err(|e| rendezvous_err(env, format!("the ring does not work: {e}")))?;
        Ok(c)
    }

    /// [`TcpCommunicator::connect`] with the group [`DistEnv::from_env`] reads.
    pub fn from_env(timeout: Duration) -> Result<TcpCommunicator> {
        Self::connect(&DistEnv::from_env()?, timeout)
    }

    /// Rank 0: accepts every other rank's greeting, checks them, sends back the address table.
    fn serve_table(env: &DistEnv, bind_ip: IpAddr, ring_port: u16, deadline: Instant) -> Result<Vec<(IpAddr, u16)>> {
        let w = env.world_size;
        let master = TcpListener::bind((bind_ip, env.master_port)).map_err(|e| {
            let hint = if e.kind() == io::ErrorKind::AddrInUse {
                " (another job uses this port, or choose another MASTER_PORT)"
            } else {
                ""
            };
            rendezvous_err(env, format!("rank 0 cannot listen on port {}: {e}{hint}", env.master_port))
        })?;
        let mut peers: Vec<Option<(TcpStream, IpAddr, u16)>> = (0..w).map(|_| None).collect();
        let mut joined = 1;
        let mut problem: Option<String> = None;
        while joined < w && problem.is_none() {
            let Some((mut s, addr)) =
                accept_until(&master, deadline).map_err(|e| rendezvous_err(env, format!("accepting: {e}")))?
            else {
                let missing: Vec<String> = (1..w).filter(|&r| peers[r].is_none()).map(|r| r.to_string()).collect();
                return Err(rendezvous_err(
                    env,
                    format!(
                        "timed out: rank(s) {} of {w} did not join (not started, crashed, or given another \
                         MASTER_ADDR/MASTER_PORT)",
                        missing.join(", ")
                    ),
                ));
            };
            let _ = s.set_read_timeout(Some(remaining(deadline).min(Duration::from_secs(10))));
            let mut magic = [0u8; 8];
            let hello = s.read_exact(&mut magic).and_then(|_| {
                let r = read_u32(&mut s)?;
                let ws = read_u32(&mut s)?;
                let port = read_u16(&mut s)?;
                Ok((r as usize, ws as usize, port))
            });
            let Ok((r, ws, port)) = hello else { continue };
            if &magic != RENDEZVOUS_MAGIC {
                continue; // not a kiln worker (a port scanner, a health check): ignore it
            }
            if ws != w {
                problem = Some(format!("rank {r} (from {addr}) says the world size is {ws}, rank 0 says {w}"));
            } else if r == 0 || r >= w {
                problem = Some(format!("a worker from {addr} claims rank {r}, outside 1..{w}"));
            } else if peers[r].is_some() {
                problem = Some(format!("rank {r} joined twice (the second from {addr}): check RANK of every worker"));
            }
            peers[if problem.is_none() { r } else { 0 }] = Some((s, addr.ip(), port));
            if problem.is_none() {
                joined += 1;
            }
        }
        // Rank 0's own entry: the workers use the address they reached rank 0 at.
        let mut table: Vec<(IpAddr, u16)> = vec![(bind_ip, ring_port)];
        table.extend(peers[1..].iter().map(|p| p.as_ref().map(|p| (p.1, p.2)).unwrap_or((bind_ip, 0))));
        let mut msg = Vec::new();
        match &problem {
            Some(p) => {
                msg.push(1);
                put_u32(&mut msg, p.len() as u32);
                msg.extend_from_slice(p.as_bytes());
            }
            None => {
                msg.push(0);
                for (ip, port) in &table {
                    let ip = ip.to_string();
                    msg.push(ip.len() as u8);
                    msg.extend_from_slice(ip.as_bytes());
                    msg.extend_from_slice(&port.to_le_bytes());
                }
            }
        }
        for (s, _, _) in peers.iter_mut().flatten() {
            let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
            let _ = s.write_all(&msg);
        }
        match problem {
            Some(p) => Err(rendezvous_err(env, p)),
            None => Ok(table),
        }
    }

    /// Ranks above 0: greet rank 0 and read the address table.
    fn fetch_table(env: &DistEnv, ring_port: u16, deadline: Instant) -> Result<Vec<(IpAddr, u16)>> {
        let mut s = connect_retrying(&env.master_addr, env.master_port, deadline).map_err(|e| {
            rendezvous_err(
                env,
                format!(
                    "rank 0 was not reachable within the timeout ({e}); is it running, with the same \
                     MASTER_ADDR and MASTER_PORT?"
                ),
            )
        })?;
        let master_ip = s.peer_addr().map_err(|e| rendezvous_err(env, e.to_string()))?.ip();
        let mut hello = RENDEZVOUS_MAGIC.to_vec();
        put_u32(&mut hello, env.rank as u32);
        put_u32(&mut hello, env.world_size as u32);
        hello.extend_from_slice(&ring_port.to_le_bytes());
        s.write_all(&hello).map_err(|e| rendezvous_err(env, format!("greeting rank 0: {e}")))?;
        s.set_read_timeout(Some(remaining(deadline))).map_err(|e| rendezvous_err(env, e.to_string()))?;
        let read = |s: &mut TcpStream| -> io::Result<std::result::Result<Vec<(IpAddr, u16)>, String>> {
            let mut status = [0u8; 1];
            s.read_exact(&mut status)?;
            if status[0] != 0 {
                let n = read_u32(s)? as usize;
                let mut m = vec![0u8; n.min(1 << 16)];
                s.read_exact(&mut m)?;
                return Ok(Err(String::from_utf8_lossy(&m).into_owned()));
            }
            let mut table = Vec::with_capacity(env.world_size);
            for _ in 0..env.world_size {
                let mut len = [0u8; 1];
                s.read_exact(&mut len)?;
                let mut ip = vec![0u8; len[0] as usize];
                s.read_exact(&mut ip)?;
                let ip: IpAddr = String::from_utf8_lossy(&ip)
                    .parse()
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad address in the table"))?;
                table.push((ip, read_u16(s)?));
            }
            Ok(Ok(table))
        };
        match read(&mut s) {
            Ok(Ok(mut table)) => {
                table[0].0 = master_ip;
                Ok(table)
            }
            Ok(Err(problem)) => Err(rendezvous_err(env, format!("rank 0 refused the group: {problem}"))),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Err(rendezvous_err(
                env,
                "timed out waiting for the other ranks to join (rank 0 answered but the group did not form)",
            )),
            Err(e) => Err(rendezvous_err(env, format!("reading the address table from rank 0: {e}"))),
        }
    }

    fn context(&self, kind: Kind) -> String {
        format!("rank {} of {}, {} #{}", self.rank, self.world, kind.name(), self.seq)
    }

    fn check(&self, kind: Kind) -> Result<()> {
        match &self.broken {
            Some(why) => Err(Error::dist(self.context(kind), format!("the group failed earlier ({why})"))),
            None => Ok(()),
        }
    }

    /// Marks the communicator broken and shuts its sockets, so the neighbours stop too.
    fn fail(&mut self, kind: Kind, reason: String) -> Error {
        if let Some(r) = &self.ring {
            let _ = r.next.shutdown(Shutdown::Both);
            let _ = r.prev.shutdown(Shutdown::Both);
        }
        self.broken = Some(reason.clone());
        Error::dist(self.context(kind), reason)
    }

    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn prev_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    fn header(&self, kind: Kind, len: usize) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&(kind as u32).to_le_bytes());
        h[4..8].copy_from_slice(&self.seq.to_le_bytes());
        h[8..16].copy_from_slice(&(len as u64).to_le_bytes());
        h
    }

    fn describe_io(&self, e: &io::Error, peer: usize, sending: bool) -> String {
        match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => {
                format!("rank {peer} closed its connection (it exited or failed)")
            }
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
                "timed out after {:.1} s {} rank {peer} (it is stuck, or not running the same collectives)",
                self.timeout.as_secs_f64(),
                if sending { "sending to" } else { "waiting for" }
            ),
            _ => format!("{} rank {peer}: {e}", if sending { "sending to" } else { "receiving from" }),
        }
    }

    /// Sends `self.send_buf` (if `send`) to the next rank while receiving `recv_len` bytes from
    /// the previous one (if `recv_len` is some) into `self.recv_buf`.
    fn exchange(&mut self, kind: Kind, send: bool, recv_len: Option<usize>) -> Result<()> {
        let (next, prev) = (self.next_rank(), self.prev_rank());
        let header = self.header(kind, self.send_buf.len());
        let (seq, world) = (self.seq, self.world);
        let ring = self.ring.as_mut().expect("a group of several ranks has a ring");
        let (to, from) = (&mut ring.next, &mut ring.prev);
        let payload = &self.send_buf;
        let recv_buf = &mut self.recv_buf;
        let write = move |to: &mut TcpStream| -> io::Result<()> {
            to.write_all(&header)?;
            to.write_all(payload)
        };
        // What went wrong, if anything: (peer, sending, error) or a protocol mismatch.
        let read = |from: &mut TcpStream, recv_buf: &mut Vec<u8>| -> std::result::Result<(), ReadError> {
            let Some(want) = recv_len else { return Ok(()) };
            let mut h = [0u8; 16];
            from.read_exact(&mut h).map_err(ReadError::Io)?;
            let k = u32::from_le_bytes(h[0..4].try_into().unwrap());
            let s = u32::from_le_bytes(h[4..8].try_into().unwrap());
            let len = u64::from_le_bytes(h[8..16].try_into().unwrap()) as usize;
            if Kind::from_u32(k) != Some(kind) || s != seq || len != want {
                let theirs = Kind::from_u32(k).map_or_else(|| format!("unknown message {k}"), |k| k.name().into());
                return Err(ReadError::Mismatch(format!(
                    "rank {prev} sent {theirs} #{s} of {len} bytes where {} #{seq} of {want} bytes was expected: the \
                     {world} ranks are not running the same collectives on the same sizes",
                    kind.name()
                )));
            }
            recv_buf.resize(want, 0);
            from.read_exact(recv_buf).map_err(ReadError::Io)
        };
        let (wrote, got) = if !send {
            (Ok(()), read(from, recv_buf))
        } else if recv_len.is_none() || payload.len() + 16 <= INLINE_BYTES {
            let w = write(to);
            // After a failed write (the peer closed), what it sent before may still say why:
            // a message of another collective is the better error. Not after a write timeout,
            // which would double the wait.
            let timed_out =
                w.as_ref().is_err_and(|e| matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut));
            let r = if timed_out { Ok(()) } else { read(from, recv_buf) };
            (w, r)
        } else {
            std::thread::scope(|sc| {
                let writer = sc.spawn(move || write(to));
                let r = read(from, recv_buf);
                let w = writer.join().unwrap_or_else(|_| Err(io::Error::other("the sending thread panicked")));
                (w, r)
            })
        };
        let reason = match (wrote, got) {
            (Ok(()), Ok(())) => return Ok(()),
            (_, Err(ReadError::Mismatch(m))) => m,
            (Err(e), _) => self.describe_io(&e, next, true),
            (Ok(()), Err(ReadError::Io(e))) => self.describe_io(&e, prev, false),
        };
        Err(self.fail(kind, reason))
    }

    /// Ring all-reduce (sum) of `data`; see the module documentation.
    fn ring_all_reduce<T: Elem>(&mut self, data: &mut [T], kind: Kind) -> Result<()> {
        self.check(kind)?;
        self.seq = self.seq.wrapping_add(1);
        let p = self.world;
        if p == 1 {
            return Ok(());
        }
        let n = data.len();
        let bounds = |i: usize| (n * i / p)..(n * (i + 1) / p);
        let r = self.rank;
        // Reduce-scatter: after p - 1 steps this rank holds the full sum of chunk (r + 1) % p.
        for s in 0..p - 1 {
            let (si, ri) = ((r + p - s) % p, (r + 2 * p - s - 1) % p);
            T::put(&data[bounds(si)], &mut self.send_buf);
            self.exchange(kind, true, Some(bounds(ri).len() * T::SIZE))?;
            for (d, b) in data[bounds(ri)].iter_mut().zip(self.recv_buf.chunks_exact(T::SIZE)) {
                *d += T::get(b);
            }
        }
        // All-gather: pass the finished chunks around the ring.
        for s in 0..p - 1 {
            let (si, ri) = ((r + 1 + p - s) % p, (r + p - s) % p);
            T::put(&data[bounds(si)], &mut self.send_buf);
            self.exchange(kind, true, Some(bounds(ri).len() * T::SIZE))?;
            for (d, b) in data[bounds(ri)].iter_mut().zip(self.recv_buf.chunks_exact(T::SIZE)) {
                *d = T::get(b);
            }
        }
        Ok(())
    }
}

enum ReadError {
    Io(io::Error),
    Mismatch(String),
}

impl Communicator for TcpCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        self.ring_all_reduce(data, Kind::AllReduceF32)
    }

    fn all_reduce_sum_f64(&mut self, data: &mut [f64]) -> Result<()> {
        self.ring_all_reduce(data, Kind::AllReduceF64)
    }

    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<()> {
        let kind = Kind::Broadcast;
        self.check(kind)?;
        if root >= self.world {
            return Err(Error::dist(self.context(kind), format!("root {root} is not a rank of the group")));
        }
        self.seq = self.seq.wrapping_add(1);
        if self.world == 1 {
            return Ok(());
        }
        // The chain root -> root + 1 -> ... -> root - 1, piece by piece.
        let receives = self.rank != root;
        let forwards = self.next_rank() != root;
        let per = BROADCAST_PIECE / 4;
        let pieces = data.len().div_ceil(per).max(1);
        for i in 0..pieces {
            let range = (i * per).min(data.len())..((i + 1) * per).min(data.len());
            if receives {
                self.exchange(kind, false, Some(range.len() * std::mem::size_of::<f32>()))?;
                for (d, b) in data[range.clone()].iter_mut().zip(self.recv_buf.chunks_exact(4)) {
                    *d = f32::get(b);
                }
            }
            if forwards {
                f32::put(&data[range], &mut self.send_buf);
                self.exchange(kind, true, None)?;
            }
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        let mut token = [1.0f32];
        self.ring_all_reduce(&mut token, Kind::Barrier)
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn describe(&self) -> String {
        format!("tcp (rank {} of {})", self.rank, self.world)
    }
}
