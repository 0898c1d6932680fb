//! A UDP proxy that injects network faults between a client and an upstream, such as an
//! agent and the hub's QUIC listener.
//!
//! [`UdpProxy::start`] binds `127.0.0.1:0` and forwards every datagram a client sends to the
//! upstream address, through one upstream socket per client address (so the upstream sees one
//! peer per client, as through a NAT), and every answer back to that client. A cloneable
//! [`ProxyHandle`] changes the faults while traffic flows, separately per [`Direction`]:
//!
//! - **drop**: each datagram is dropped with probability [`Faults::drop`];
//! - **delay**: each datagram is sent [`Faults::delay`] plus a uniform draw from
//!   `0..=`[`Faults::jitter`] after it arrived (datagrams with different draws overtake each
//!   other, as on a real path; equal send times keep arrival order);
//! - **duplicate**: with probability [`Faults::duplicate`] a second copy is sent, with its own
//!   delay draw;
//! - **reorder**: with probability [`Faults::reorder`] a datagram is held back and sent right
//!   behind the next datagram of the same client and direction (counted as reordered), or,
//!   when none comes, [`Faults::reorder_hold`] later (then merely delayed);
//! - **black-hole**: [`Faults::black_hole`] drops everything, also what is already queued
//!   ([`ProxyHandle::set_black_hole`] switches each direction without touching the other
//!   faults).
//!
//! Per direction, [`Counters`] count what was received, forwarded, dropped, black-holed,
//! duplicated, reordered and refused for lack of room, for tests to assert on.
//!
//! Random decisions come from a seeded [`fastrand::Rng`] per client and direction (derived from
//! [`ProxyOptions::seed`] and the order in which clients appeared), so one client's stream of
//! decisions is reproducible. Memory is bounded: at most [`ProxyOptions::max_in_flight`]
//! datagrams are queued, delayed or held at once (more are refused and counted as
//! `overflowed`), and at most [`ProxyOptions::max_clients`] client addresses are served.
//!
//! Dropping the [`UdpProxy`] stops every task and closes its sockets; handles outlive it
//! harmlessly.
//!
//! ```no_run
//! # async fn demo(hub: std::net::SocketAddr) -> std::io::Result<()> {
//! use std::time::Duration;
//! use edgesync_testkit::udp_proxy::{Faults, UdpProxy};
//! let proxy = UdpProxy::start(hub).await?;
//! // Point the agent at proxy.local_addr(), then:
//! proxy.handle().set_faults(Faults {
//!     drop: 0.1,
//!     jitter: Duration::from_millis(20),
//!     ..Faults::default()
//! });
//! proxy.handle().set_black_hole(true, true); // a half-open path, both ways
//! # Ok(()) }
//! ```

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Which way a datagram travels through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From a client to the upstream (agent → hub).
    ToUpstream,
    /// From the upstream back to a client (hub → agent).
    ToClient,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::ToUpstream => 0,
            Direction::ToClient => 1,
        }
    }
}

/// The faults applied to one direction. The default forwards everything at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Faults {
    /// Probability (0..=1) that a datagram is dropped.
    pub drop: f64,
    /// Fixed delay of every datagram.
    pub delay: Duration,
    /// Extra delay drawn uniformly from `0..=jitter` per datagram.
    pub jitter: Duration,
    /// Probability (0..=1) that a datagram is sent twice.
    pub duplicate: f64,
    /// Probability (0..=1) that a datagram is held back and sent behind the next one.
    pub reorder: f64,
    /// How long a held datagram waits for a successor at most (then it is sent anyway).
    pub reorder_hold: Duration,
    /// Drop every datagram (including those already queued or held).
    pub black_hole: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            drop: 0.0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_hold: Duration::from_millis(50),
            black_hole: false,
        }
    }
}

/// What happened to the datagrams of one direction (a snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Datagrams that arrived at the proxy.
    pub received: u64,
    /// Datagrams sent on (original copies; duplicates are counted in `duplicated`).
    pub forwarded: u64,
    /// Datagrams dropped by the drop probability.
    pub dropped: u64,
    /// Datagrams (and copies) dropped because the direction was black-holed.
    pub black_holed: u64,
    /// Extra copies sent.
    pub duplicated: u64,
    /// Datagrams sent behind a datagram that arrived after them.
    pub reordered: u64,
    /// Datagrams (and copies) refused because [`ProxyOptions::max_in_flight`] or
    /// [`ProxyOptions::max_clients`] was reached.
    pub overflowed: u64,
}

#[derive(Default)]
struct AtomicCounters {
    received: AtomicU64,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    black_holed: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
    overflowed: AtomicU64,
}

impl AtomicCounters {
    fn snapshot(&self) -> Counters {
        let l = |a: &AtomicU64| a.load(Ordering::SeqCst);
        Counters {
            received: l(&self.received),
            forwarded: l(&self.forwarded),
            dropped: l(&self.dropped),
            black_holed: l(&self.black_holed),
            duplicated: l(&self.duplicated),
            reordered: l(&self.reordered),
            overflowed: l(&self.overflowed),
        }
    }

    fn reset(&self) {
        for a in [
            &self.received,
            &self.forwarded,
            &self.dropped,
            &self.black_holed,
            &self.duplicated,
            &self.reordered,
            &self.overflowed,
        ] {
            a.store(0, Ordering::SeqCst);
        }
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::SeqCst);
}

/// Settings fixed when the proxy starts.
#[derive(Debug, Clone, Copy)]
pub struct ProxyOptions {
    /// Seed of the random decisions.
    pub seed: u64,
    /// Most datagrams queued, delayed or held at once, over all clients and directions.
    pub max_in_flight: usize,
    /// Most client addresses served (datagrams of further clients are refused).
    pub max_clients: usize,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            seed: 0x5eed_f00d,
            max_in_flight: 4096,
            max_clients: 64,
        }
    }
}

struct Shared {
    faults: Mutex<[Faults; 2]>,
    counters: [AtomicCounters; 2],
    in_flight: AtomicUsize,
    opts: ProxyOptions,
}

impl Shared {
    fn faults(&self, dir: Direction) -> Faults {
        self.faults.lock().unwrap_or_else(PoisonError::into_inner)[dir.index()]
    }

    fn counters(&self, dir: Direction) -> &AtomicCounters {
        &self.counters[dir.index()]
    }

    /// Takes room for one datagram; false (counted) when the cap is reached.
    fn reserve(&self, dir: Direction) -> bool {
        let ok = self
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.opts.max_in_flight).then_some(n + 1)
            })
            .is_ok();
        if !ok {
            bump(&self.counters(dir).overflowed);
        }
        ok
    }

    fn release(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Changes a running proxy's faults and reads its counters. Cheap to clone.
#[derive(Clone)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ProxyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyHandle")
            .field("to_upstream", &self.shared.faults(Direction::ToUpstream))
            .field("to_client", &self.shared.faults(Direction::ToClient))
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl ProxyHandle {
    /// Sets the faults of both directions.
    pub fn set_faults(&self, faults: Faults) {
        *self
            .shared
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = [faults; 2];
    }

    /// Sets the faults of one direction.
    pub fn set_direction(&self, dir: Direction, faults: Faults) {
        self.shared
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)[dir.index()] = faults;
    }

    /// The faults of one direction.
    pub fn faults(&self, dir: Direction) -> Faults {
        self.shared.faults(dir)
    }

    /// Black-holes (or opens) each direction, keeping the other faults.
    pub fn set_black_hole(&self, to_upstream: bool, to_client: bool) {
        let mut f = self
            .shared
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        f[Direction::ToUpstream.index()].black_hole = to_upstream;
        f[Direction::ToClient.index()].black_hole = to_client;
    }

    /// Removes every fault: forwards everything at once, both ways.
    pub fn heal(&self) {
        self.set_faults(Faults::default());
    }

    /// The counters of one direction so far.
    pub fn counters(&self, dir: Direction) -> Counters {
        self.shared.counters(dir).snapshot()
    }

    /// Sets every counter of both directions back to 0.
    pub fn reset_counters(&self) {
        for c in &self.shared.counters {
            c.reset();
        }
    }

    /// Datagrams queued, delayed or held right now.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }
}

/// The proxy: its tasks run until it is dropped.
pub struct UdpProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    handle: ProxyHandle,
    clients: Arc<Mutex<HashMap<SocketAddr, Client>>>,
    cancel: CancellationToken,
}

impl std::fmt::Debug for UdpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream)
            .finish()
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// One client address: the lane of its datagrams to the upstream (the lane back is fed by the
/// task reading its upstream socket).
#[derive(Clone)]
struct Client {
    to_upstream: mpsc::UnboundedSender<Vec<u8>>,
}

impl UdpProxy {
    /// Starts a proxy to `upstream` on `127.0.0.1:0` with the default [`ProxyOptions`] and no
    /// faults.
    pub async fn start(upstream: SocketAddr) -> io::Result<UdpProxy> {
        Self::start_with(upstream, ProxyOptions::default()).await
    }

    /// Starts a proxy to `upstream` on `127.0.0.1:0` with `opts` and no faults.
    pub async fn start_with(upstream: SocketAddr, opts: ProxyOptions) -> io::Result<UdpProxy> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let shared = Arc::new(Shared {
            faults: Mutex::new([Faults::default(); 2]),
            counters: Default::default(),
            in_flight: AtomicUsize::new(0),
            opts,
        });
        let cancel = CancellationToken::new();
        let clients: Arc<Mutex<HashMap<SocketAddr, Client>>> = Arc::default();
        tokio::spawn(front_loop(
            front,
            upstream,
            shared.clone(),
            clients.clone(),
            cancel.clone(),
        ));
        Ok(UdpProxy {
            addr,
            upstream,
            handle: ProxyHandle { shared },
            clients,
            cancel,
        })
    }

    /// Where clients send (`127.0.0.1:<port>`).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where datagrams go.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// A handle to change faults and read counters.
    pub fn handle(&self) -> ProxyHandle {
        self.handle.clone()
    }

    /// How many client addresses the proxy has seen.
    pub fn clients(&self) -> usize {
        self.clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Receives from clients and hands each datagram to its client's upstream lane.
async fn front_loop(
    front: Arc<UdpSocket>,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    clients: Arc<Mutex<HashMap<SocketAddr, Client>>>,
    cancel: CancellationToken,
) {
    let mut buf = vec![0u8; 65_536];
    let mut lanes_started: u64 = 0;
    loop {
        let (n, from) = tokio::select! {
            () = cancel.cancelled() => return,
            r = front.recv_from(&mut buf) => match r {
                Ok(x) => x,
                // ICMP errors and the like: one per failed send, never a loop.
                Err(_) => continue,
            },
        };
        let dir = Direction::ToUpstream;
        bump(&shared.counters(dir).received);
        let existing = clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&from)
            .cloned();
        let client = match existing {
            Some(c) => c,
            None => {
                let full = clients.lock().unwrap_or_else(PoisonError::into_inner).len()
                    >= shared.opts.max_clients;
                if full {
                    bump(&shared.counters(dir).overflowed);
                    continue;
                }
                let Ok(up) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                if up.connect(upstream).await.is_err() {
                    continue;
                }
                let up = Arc::new(up);
                let seed = |k: u64| {
                    shared
                        .opts
                        .seed
                        .wrapping_add(k.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                };
                let (tx_up, rx_up) = mpsc::unbounded_channel();
                let (tx_cl, rx_cl) = mpsc::unbounded_channel();
                tokio::spawn(
                    Lane {
                        dir: Direction::ToUpstream,
                        target: Target::Upstream(up.clone()),
                        shared: shared.clone(),
                        rng: fastrand::Rng::with_seed(seed(2 * lanes_started + 1)),
                    }
                    .run(rx_up, cancel.clone()),
                );
                tokio::spawn(
                    Lane {
                        dir: Direction::ToClient,
                        target: Target::Client(front.clone(), from),
                        shared: shared.clone(),
                        rng: fastrand::Rng::with_seed(seed(2 * lanes_started + 2)),
                    }
                    .run(rx_cl, cancel.clone()),
                );
                lanes_started += 1;
                tokio::spawn(upstream_loop(up, tx_cl, shared.clone(), cancel.clone()));
                let c = Client { to_upstream: tx_up };
                clients
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(from, c.clone());
                c
            }
        };
        if shared.reserve(dir) && client.to_upstream.send(buf[..n].to_vec()).is_err() {
            shared.release();
        }
    }
}

/// Receives the upstream's answers to one client and hands them to the client's lane.
async fn upstream_loop(
    up: Arc<UdpSocket>,
    lane: mpsc::UnboundedSender<Vec<u8>>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let n = tokio::select! {
            () = cancel.cancelled() => return,
            r = up.recv(&mut buf) => match r {
                Ok(n) => n,
                // A connected UDP socket reports ICMP port unreachable (upstream down) once.
                Err(_) => continue,
            },
        };
        let dir = Direction::ToClient;
        bump(&shared.counters(dir).received);
        if shared.reserve(dir) && lane.send(buf[..n].to_vec()).is_err() {
            shared.release();
        }
    }
}

enum Target {
    Upstream(Arc<UdpSocket>),
    Client(Arc<UdpSocket>, SocketAddr),
}

impl Target {
    async fn send(&self, data: &[u8]) {
        // Send errors (a peer gone, a full buffer) are losses like any other.
        let _ = match self {
            Target::Upstream(s) => s.send(data).await,
            Target::Client(s, to) => s.send_to(data, *to).await,
        };
    }
}

/// A datagram waiting for its send time; `order` breaks ties in queueing order.
struct Queued {
    at: Instant,
    order: u64,
    data: Vec<u8>,
    /// An original (counted as forwarded) or an extra copy (counted as duplicated).
    copy: bool,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.order) == (o.at, o.order)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(o.at, o.order))
    }
}

/// A datagram held back to be sent behind its successor.
struct Held {
    at: Instant,
    deadline: Instant,
    data: Vec<u8>,
}

/// One client and direction: decides each datagram's fate and sends it at its time.
struct Lane {
    dir: Direction,
    target: Target,
    shared: Arc<Shared>,
    rng: fastrand::Rng,
}

impl Lane {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Vec<u8>>, cancel: CancellationToken) {
        let mut queue: BinaryHeap<Reverse<Queued>> = BinaryHeap::new();
        let mut held: Option<Held> = None;
        let mut order: u64 = 0;
        loop {
            let next = queue
                .peek()
                .map(|Reverse(q)| q.at)
                .into_iter()
                .chain(held.as_ref().map(|h| h.deadline))
                .min();
            tokio::select! {
                () = cancel.cancelled() => break,
                d = rx.recv() => match d {
                    Some(d) => self.accept(d, &mut queue, &mut held, &mut order),
                    None => break,
                },
                () = sleep_until(next) => {}
            }
            let now = Instant::now();
            if held.as_ref().is_some_and(|h| h.deadline <= now)
                && let Some(h) = held.take()
            {
                // No successor came: merely delayed.
                order += 1;
                queue.push(Reverse(Queued {
                    at: h.at,
                    order,
                    data: h.data,
                    copy: false,
                }));
            }
            while queue.peek().is_some_and(|Reverse(q)| q.at <= now) {
                let Some(Reverse(q)) = queue.pop() else { break };
                self.send(q).await;
            }
        }
        // Whatever is left is gone with the proxy.
        for _ in 0..queue.len() + usize::from(held.is_some()) {
            self.shared.release();
        }
    }

    /// Decides the fate of one datagram (its room is already reserved).
    fn accept(
        &mut self,
        data: Vec<u8>,
        queue: &mut BinaryHeap<Reverse<Queued>>,
        held: &mut Option<Held>,
        order: &mut u64,
    ) {
        let shared = self.shared.clone();
        let f = shared.faults(self.dir);
        let c = shared.counters(self.dir);
        if f.black_hole {
            bump(&c.black_holed);
            self.shared.release();
            return;
        }
        if f.drop > 0.0 && self.rng.f64() < f.drop {
            bump(&c.dropped);
            self.shared.release();
            return;
        }
        let now = Instant::now();
        let at = now + delay(&mut self.rng, &f);
        if f.duplicate > 0.0 && self.rng.f64() < f.duplicate && self.shared.reserve(self.dir) {
            let copy_at = now + delay(&mut self.rng, &f);
            *order += 1;
            queue.push(Reverse(Queued {
                at: copy_at,
                order: *order,
                data: data.clone(),
                copy: true,
            }));
        }
        if held.is_none() && f.reorder > 0.0 && self.rng.f64() < f.reorder {
            *held = Some(Held {
                at,
                deadline: at + f.reorder_hold,
                data,
            });
            return;
        }
        *order += 1;
        queue.push(Reverse(Queued {
            at,
            order: *order,
            data,
            copy: false,
        }));
        if let Some(h) = held.take() {
            // Right behind the datagram that arrived after it.
            bump(&c.reordered);
            *order += 1;
            queue.push(Reverse(Queued {
                at: at.max(h.at),
                order: *order,
                data: h.data,
                copy: false,
            }));
        }
    }

    async fn send(&self, q: Queued) {
        self.shared.release();
        let c = self.shared.counters(self.dir);
        // A black-hole also swallows what was already on its way.
        if self.shared.faults(self.dir).black_hole {
            bump(&c.black_holed);
            return;
        }
        self.target.send(&q.data).await;
        bump(if q.copy { &c.duplicated } else { &c.forwarded });
    }
}

/// The fixed delay plus a uniform draw from `0..=jitter` (microsecond steps).
fn delay(rng: &mut fastrand::Rng, f: &Faults) -> Duration {
    let jitter = f.jitter.as_micros() as u64;
    let extra = if jitter > 0 {
        Duration::from_micros(rng.u64(0..=jitter))
    } else {
        Duration::ZERO
    };
    f.delay + extra
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A plain socket standing in for the upstream.
    async fn sink() -> (UdpSocket, SocketAddr) {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let a = s.local_addr().unwrap();
        (s, a)
    }

    async fn client() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0").await.unwrap()
    }

    /// Sends `0..n` as 4-byte big-endian payloads, pacing so that no socket buffer overflows
    /// (every datagram the proxy takes must be one the test accounts for).
    async fn send_numbered(from: &UdpSocket, to: SocketAddr, n: u32, h: &ProxyHandle) {
        for i in 0..n {
            from.send_to(&i.to_be_bytes(), to).await.unwrap();
            if i % 32 == 31 {
                let want = u64::from(i) + 1;
                let deadline = Instant::now() + Duration::from_secs(5);
                while h.counters(Direction::ToUpstream).received < want && Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }

    /// Everything that arrives on `s` until it has been quiet for `quiet`.
    async fn drain(s: &UdpSocket, quiet: Duration) -> Vec<u32> {
        let mut out = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok(Ok(n)) = tokio::time::timeout(quiet, s.recv(&mut buf)).await {
            assert_eq!(n, 4);
            out.push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
        }
        out
    }

    #[tokio::test]
    async fn forwards_both_ways_and_counts() {
        let (up, up_addr) = sink().await;
        let proxy = UdpProxy::start(up_addr).await.unwrap();
        let h = proxy.handle();
        let c = client().await;
        for i in 0..20u32 {
            c.send_to(&i.to_be_bytes(), proxy.local_addr())
                .await
                .unwrap();
            let mut buf = [0u8; 16];
            let (n, from) = up.recv_from(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], &i.to_be_bytes());
            // Echo, with a marker.
            up.send_to(&[buf[0], buf[1], buf[2], buf[3], 0xee], from)
                .await
                .unwrap();
            let n = c.recv(&mut buf).await.unwrap();
            assert_eq!(n, 5);
            assert_eq!(&buf[..4], &i.to_be_bytes());
        }
        let want = Counters {
            received: 20,
            forwarded: 20,
            ..Counters::default()
        };
        assert_eq!(h.counters(Direction::ToUpstream), want);
        assert_eq!(h.counters(Direction::ToClient), want);
        assert_eq!(proxy.clients(), 1);
        assert_eq!(h.in_flight(), 0);
        // A second client gets its own upstream socket.
        let c2 = client().await;
        c2.send_to(b"abcd", proxy.local_addr()).await.unwrap();
        let mut buf = [0u8; 16];
        let (_, from2) = up.recv_from(&mut buf).await.unwrap();
        c.send_to(b"efgh", proxy.local_addr()).await.unwrap();
        let (_, from1) = up.recv_from(&mut buf).await.unwrap();
        assert_ne!(from1, from2);
        assert_eq!(proxy.clients(), 2);
    }

    #[tokio::test]
    async fn drop_rate_is_about_what_is_configured() {
        let (up, up_addr) = sink().await;
        let proxy = UdpProxy::start(up_addr).await.unwrap();
        let h = proxy.handle();
        h.set_direction(
            Direction::ToUpstream,
            Faults {
                drop: 0.3,
                ..Faults::default()
            },
        );
        let c = client().await;
        let n = 2000;
        let (got, ()) = tokio::join!(
            drain(&up, Duration::from_millis(500)),
            send_numbered(&c, proxy.local_addr(), n, &h)
        );
        let k = h.counters(Direction::ToUpstream);
        assert_eq!(k.received, u64::from(n));
        assert_eq!(k.forwarded + k.dropped, u64::from(n), "{k:?}");
        assert_eq!(
            got.len() as u64,
            k.forwarded,
            "what arrived = what was forwarded"
        );
        // 30 % of 2000: mean 600, standard deviation ~20.5; 5 sigma either way.
        assert!((500..=700).contains(&k.dropped), "dropped {}", k.dropped);
        // Nothing else happened, in order.
        assert_eq!(k.duplicated + k.reordered + k.black_holed + k.overflowed, 0);
        assert!(got.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(h.counters(Direction::ToClient), Counters::default());
    }

    #[tokio::test]
    async fn the_seed_makes_decisions_reproducible() {
        let mut runs = Vec::new();
        for _ in 0..2 {
            let (up, up_addr) = sink().await;
            let proxy = UdpProxy::start_with(
                up_addr,
                ProxyOptions {
                    seed: 42,
                    ..ProxyOptions::default()
                },
            )
            .await
            .unwrap();
            let h = proxy.handle();
            h.set_faults(Faults {
                drop: 0.5,
                ..Faults::default()
            });
            let c = client().await;
            let (got, ()) = tokio::join!(
                drain(&up, Duration::from_millis(300)),
                send_numbered(&c, proxy.local_addr(), 200, &h)
            );
            runs.push(got);
        }
        assert_eq!(runs[0], runs[1]);
        assert!(
            runs[0].len() > 50 && runs[0].len() < 150,
            "{}",
            runs[0].len()
        );
    }

    #[tokio::test]
    async fn duplicates_arrive_twice() {
        let (up, up_addr) = sink().await;
        let proxy = UdpProxy::start(up_addr).await.unwrap();
        let h = proxy.handle();
        h.set_faults(Faults {
            duplicate: 1.0,
            ..Faults::default()
        });
        let c = client().await;
        let (got, ()) = tokio::join!(
            drain(&up, Duration::from_millis(300)),
            send_numbered(&c, proxy.local_addr(), 100, &h)
        );
        let mut seen = std::collections::BTreeMap::<u32, usize>::new();
        for g in &got {
            *seen.entry(*g).or_default() += 1;
        }
        assert_eq!(seen.len(), 100);
        assert!(seen.values().all(|&k| k == 2), "{seen:?}");
        let k = h.counters(Direction::ToUpstream);
        assert_eq!((k.forwarded, k.duplicated), (100, 100));

        // Half the time: about half as many copies.
        h.reset_counters();
        h.set_faults(Faults {
            duplicate: 0.5,
            ..Faults::default()
        });
        let (got, ()) = tokio::join!(
            drain(&up, Duration::from_millis(300)),
            send_numbered(&c, proxy.local_addr(), 1000, &h)
        );
        let k = h.counters(Direction::ToUpstream);
        assert_eq!(got.len() as u64, k.forwarded + k.duplicated);
        assert_eq!(k.forwarded, 1000);
        // Mean 500, standard deviation ~15.8.
        assert!((420..=580).contains(&k.duplicated), "{k:?}");
    }

    #[tokio::test]
    async fn reorder_actually_reorders() {
        let (up, up_addr) = sink().await;
        let proxy = UdpProxy::start(up_addr).await.unwrap();
        let h = proxy.handle();
        // Every datagram that finds no other held is held until the next one: pairs swap.
        h.set_faults(Faults {
            reorder: 1.0,
            reorder_hold: Duration::from_secs(5),
            ..Faults::default()
        });
        let c = client().await;
        let (got, ()) = tokio::join!(
            drain(&up, Duration::from_millis(300)),
            send_numbered(&c, proxy.local_addr(), 10, &h)
        );
        assert_eq!(got, vec![1, 0, 3, 2, 5, 4, 7, 6, 9, 8]);
        assert_eq!(h.counters(Direction::ToUpstream).reordered, 5);

        // A held datagram with no successor is sent after `reorder_hold`, merely late.
        h.reset_counters();
        h.set_faults(Faults {
            reorder: 1.0,
            reorder_hold: Duration::from_millis(100),
            ..Faults::default()
        });
        let t = Instant::now();
        c.send_to(&7u32.to_be_bytes(), proxy.local_addr())
            .await
            .unwrap();
        let got = drain(&up, Duration::from_millis(300)).await;
        assert_eq!(got, vec![7]);
        assert!(t.elapsed() >= Duration::from_millis(100));
        let k = h.counters(Direction::ToUpstream);
        assert_eq!((k.forwarded, k.reordered), (1, 0));

        // Sometimes: a permutation of what was sent, with inversions.
        h.reset_counters();
        h.set_faults(Faults {
            reorder: 0.2,
            ..Faults::default()
        });
        let (got, ()) = tokio::join!(
            drain(&up, Duration::from_millis(300)),
            send_numbered(&c, proxy.local_addr(), 500, &h)
        );
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..500).collect::<Vec<_>>());
        let inversions = got.windows(2).filter(|w| w[0] > w[1]).count() as u64;
        let k = h.counters(Direction::ToUpstream);
        assert!(k.reordered > 30, "{k:?}");
        assert_eq!(inversions, k.reordered);
    }

    #[tokio::test]
    async fn delay_and_jitter() {
        let (up, up_addr) = sink().await;
        let proxy = UdpProxy::start(up_addr).await.unwrap();
        let h = proxy.handle();
        h.set_direction(
            Direction::ToUpstream,
            Faults {
                delay: Duration::from_millis(80),
                ..Faults::default()
            },
        );
        let c = client().await;
        let t = Instant::now();
        c.send_to(b"ping", proxy.local_addr()).await.unwrap();
        let mut buf = [0u8; 8];
        up.recv_from(&mut buf).await.unwrap();
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(80) && took < Duration::from_secs(2),
            "{took:?}"
        );
        // Jitter larger than the spacing lets datagrams overtake each other; none is lost.
        h.set_direction(
            Direction::ToUpstream,
            Faults {
                jitter: Duration::from_millis(30),
                ..Faults::default()
            },
        );
        let (got, ()) = tokio::join!(
            drain(&up, Duration::from_millis(300)),
            send_numbered(&c, proxy.local_addr(), 300, &h)
        );
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..300).collect::<Vec<_>>());
        assert!(got.windows(2).any(|w| w[0] > w[1]), "jitter reordered none");
    }

    #[tokio::test]
    async fn black_hole_drops_each_direction() {
        let (up, up_addr) = sink().await;
        let proxy = UdpProxy::start(up_addr).await.unwrap();
        let h = proxy.handle();
        let c = client().await;
        let mut buf = [0u8; 16];
        // Establish the client's upstream socket.
        c.send_to(b"helo", proxy.local_addr()).await.unwrap();
        let (_, up_peer) = up.recv_from(&mut buf).await.unwrap();

        // Both ways.
        h.set_black_hole(true, true);
        for _ in 0..10 {
            c.send_to(b"lost", proxy.local_addr()).await.unwrap();
            up.send_to(b"lost", up_peer).await.unwrap();
        }
        assert!(drain(&up, Duration::from_millis(200)).await.is_empty());
        assert!(drain(&c, Duration::from_millis(50)).await.is_empty());
        assert_eq!(h.counters(Direction::ToUpstream).black_holed, 10);
        assert_eq!(h.counters(Direction::ToClient).black_holed, 10);

        // Upstream → client only: requests pass, answers do not.
        h.reset_counters();
        h.set_black_hole(false, true);
        c.send_to(b"pass", proxy.local_addr()).await.unwrap();
        let (n, _) = up.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"pass");
        up.send_to(b"lost", up_peer).await.unwrap();
        assert!(drain(&c, Duration::from_millis(200)).await.is_empty());
        let (u, d) = (
            h.counters(Direction::ToUpstream),
            h.counters(Direction::ToClient),
        );
        assert_eq!((u.forwarded, u.black_holed), (1, 0));
        assert_eq!((d.forwarded, d.black_holed), (0, 1));

        // A black-hole also swallows what was already delayed.
        h.reset_counters();
        h.set_faults(Faults {
            delay: Duration::from_millis(200),
            ..Faults::default()
        });
        c.send_to(b"late", proxy.local_addr()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        h.set_black_hole(true, true);
        assert!(drain(&up, Duration::from_millis(400)).await.is_empty());
        assert_eq!(h.counters(Direction::ToUpstream).black_holed, 1);

        // Lifted: everything flows again.
        h.heal();
        c.send_to(b"back", proxy.local_addr()).await.unwrap();
        let (n, _) = up.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"back");
        up.send_to(b"ok!!", up_peer).await.unwrap();
        let n = c.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ok!!");
        assert_eq!(h.in_flight(), 0);
    }

    #[tokio::test]
    async fn held_datagrams_are_bounded() {
        let (up, up_addr) = sink().await;
        let proxy = UdpProxy::start_with(
            up_addr,
            ProxyOptions {
                max_in_flight: 8,
                ..ProxyOptions::default()
            },
        )
        .await
        .unwrap();
        let h = proxy.handle();
        h.set_faults(Faults {
            delay: Duration::from_millis(300),
            ..Faults::default()
        });
        let c = client().await;
        for i in 0..50u32 {
            c.send_to(&i.to_be_bytes(), proxy.local_addr())
                .await
                .unwrap();
        }
        // All 50 reach the proxy well within the delay; only 8 fit.
        let deadline = Instant::now() + Duration::from_secs(5);
        while h.counters(Direction::ToUpstream).received < 50 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(h.in_flight() <= 8);
        let got = drain(&up, Duration::from_millis(600)).await;
        let k = h.counters(Direction::ToUpstream);
        assert_eq!(got, (0..8).collect::<Vec<_>>());
        assert_eq!((k.forwarded, k.overflowed), (8, 42), "{k:?}");
        assert_eq!(h.in_flight(), 0);
    }

    #[tokio::test]
    async fn dropping_the_proxy_stops_it() {
        let (up, up_addr) = sink().await;
        let proxy = UdpProxy::start(up_addr).await.unwrap();
        let addr = proxy.local_addr();
        let h = proxy.handle();
        drop(proxy);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let c = client().await;
        let _ = c.send_to(b"gone", addr).await;
        assert!(drain(&up, Duration::from_millis(200)).await.is_empty());
        assert_eq!(h.counters(Direction::ToUpstream).forwarded, 0);
    }
}
