//! The agent's own messages, delivered by the guard straight to the apps subscribed to them.
//!
//! Everything the agent publishes on the embedded broker (telemetry, twin results, documents
//! and deltas, device and tunnel state, rule outputs) is QoS 0 and never retained, and apps may
//! not publish on the agent's topics at all (see [`guard`](super::guard)). So these messages
//! need none of rumqttd's state: the bus task matches the topic against the subscriptions the
//! guard recorded, encodes one PUBLISH packet, and writes it to the socket of every matching
//! app itself (a non-blocking write, under the connection's lock, so it never splits one of
//! rumqttd's packets). What a socket cannot take at once waits in that connection's queue, and
//! the guard's connection task (on the broker thread) writes it when the socket is writable
//! again, between rumqttd's packets. No hand-off between threads at all while apps keep up,
//! instead of four (bus → rumqttd's router → rumqttd's connection → loopback TCP → guard).
//!
//! Semantics (what an app sees):
//! - a subscription counts from the moment rumqttd acknowledged it (the guard records the
//!   filters a SUBACK accepted, before passing the SUBACK on), until the UNSUBSCRIBE passes the
//!   guard or the connection ends;
//! - topics and filters match as rumqttd matches them for apps' own messages, after the guard's
//!   `$` mapping (so `#` and `+/...` also receive `$hw/...`, see `docs/mqtt.md`);
//! - a message is delivered once per connection however many of its filters match, with QoS 0;
//! - each connection has a queue of at most `limit` bytes of the agent's messages that its
//!   socket could not take yet; when an app reads too slowly and the queue is full, its oldest
//!   queued messages are dropped (counted as
//!   `edgesync_mqtt_dropped_total{reason="slow_subscriber"}`); nobody else waits for it, and
//!   rumqttd's packets for it are never dropped (rumqttd is read on only while few of them wait).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use super::guard::{put_bytes, put_len, to_internal, topic_matches};
use super::metrics;

/// Longest topic an MQTT packet can carry (a 2-byte length).
const MAX_TOPIC_BYTES: usize = u16::MAX as usize;
/// Largest remaining length of an MQTT packet (four length bytes).
const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// The subscriptions of the guard's connections and their queues of the agent's messages.
#[derive(Debug)]
pub struct Direct {
    subs: Mutex<Vec<Sub>>,
    /// Most bytes queued per connection.
    limit: usize,
}

/// One connection's subscriptions.
#[derive(Debug)]
struct Sub {
    conn: u64,
    /// Filters in rumqttd's form (`$x` as `_$x`), each once.
    filters: Vec<String>,
    queue: Arc<ConnQueue>,
}

/// One connection's way out: its socket's write half, and what waits to be written there.
///
/// Every write happens under the state lock, so packets never interleave. The agent's
/// messages are written by the publishing thread itself when nothing waits (no hand-off to the
/// broker thread at all); what the socket cannot take at once waits here, and the guard's
/// connection task writes it when the socket is writable again.
#[derive(Debug)]
pub struct ConnQueue {
    w: OwnedWriteHalf,
    state: Mutex<QueueState>,
    /// Something waits to be written (the connection task then waits for the socket).
    ready: Notify,
}

#[derive(Debug, Default)]
struct QueueState {
    /// The rest of a packet partly written: it must be finished before anything else.
    head: Option<Bytes>,
    /// Whole packets not started: (packet, the agent's message, so droppable).
    packets: VecDeque<(Bytes, bool)>,
    /// Bytes of the agent's messages in `packets`.
    droppable: usize,
    /// Bytes of rumqttd's packets waiting (never dropped).
    pinned: usize,
    /// A write failed: the connection is ending, nothing more is taken.
    closed: bool,
}

impl QueueState {
    fn is_empty(&self) -> bool {
        self.head.is_none() && self.packets.is_empty()
    }
}

/// Whether everything was written, or what is left waits for the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// Nothing waits.
    All,
    /// Bytes wait for the socket to be writable.
    Waiting,
}

impl ConnQueue {
    fn new(w: OwnedWriteHalf) -> Self {
        Self {
            w,
            state: Mutex::new(QueueState::default()),
            ready: Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes what waits, without waiting, as far as the socket takes it.
    fn flush_locked(&self, st: &mut QueueState) -> std::io::Result<Flushed> {
        loop {
            let p = match st.head.take() {
                Some(p) => p,
                None => match st.packets.pop_front() {
                    Some((p, droppable)) => {
                        if droppable {
                            st.droppable -= p.len();
                        } else {
                            st.pinned -= p.len();
                        }
                        p
                    }
                    None => return Ok(Flushed::All),
                },
            };
            match self.w.try_write(&p) {
                Ok(n) if n == p.len() => {}
                Ok(n) => {
                    st.head = Some(p.slice(n..));
                    return Ok(Flushed::Waiting);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    st.head = Some(p);
                    return Ok(Flushed::Waiting);
                }
                Err(e) => {
                    st.closed = true;
                    st.head = None;
                    st.packets.clear();
                    st.droppable = 0;
                    st.pinned = 0;
                    return Err(e);
                }
            }
        }
    }

    /// An agent's message: written at once when nothing waits and the socket takes it;
    /// otherwise queued, dropping the oldest queued messages of the agent while more than
    /// `limit` bytes of them would wait (the newest always stays). Returns how many were
    /// dropped.
    fn push(&self, packet: Bytes, limit: usize) -> u64 {
        let mut dropped = 0;
        let waiting = {
            let mut st = self.state();
            if st.closed {
                return 0;
            }
            while st.droppable > 0 && st.droppable + packet.len() > limit {
                let Some(i) = st.packets.iter().position(|(_, d)| *d) else {
                    break;
                };
                if let Some((old, _)) = st.packets.remove(i) {
                    st.droppable -= old.len();
                    dropped += 1;
                }
            }
            st.droppable += packet.len();
            st.packets.push_back((packet, true));
            // Errors close the connection: its task sees them on its next write or read.
            matches!(self.flush_locked(&mut st), Ok(Flushed::Waiting))
        };
        if waiting {
            self.ready.notify_one();
        }
        dropped
    }

    /// rumqttd's packets for this connection (never dropped), written as far as the socket
    /// takes them at once.
    pub fn push_broker(&self, packets: Bytes) -> std::io::Result<Flushed> {
        let mut st = self.state();
        if st.closed {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        st.pinned += packets.len();
        st.packets.push_back((packets, false));
        self.flush_locked(&mut st)
    }

    /// Writes what waits as far as the socket takes it at once.
    pub fn flush(&self) -> std::io::Result<Flushed> {
        let mut st = self.state();
        if st.closed {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        self.flush_locked(&mut st)
    }

    /// Bytes of rumqttd's packets waiting for the socket.
    pub fn pinned(&self) -> usize {
        self.state().pinned
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.state().is_empty()
    }

    /// Waits until the socket may take more (cancellation-safe).
    pub async fn writable(&self) -> std::io::Result<()> {
        self.w.writable().await
    }

    /// Waits until something was queued that could not be written at once
    /// (cancellation-safe; a notification sent before the wait is not lost).
    pub async fn ready(&self) {
        self.ready.notified().await;
    }
}

/// What [`Direct::publish`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for this many connections (possibly none).
    Queued(usize),
    /// Not a topic a message can be published to (empty, too long, with a wildcard or U+0000).
    BadTopic,
    /// Larger than an MQTT packet can be (256 MiB).
    TooLarge,
}

impl Direct {
    /// No connection yet; at most `limit` bytes queued per connection.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            subs: Mutex::new(Vec::new()),
            limit,
        })
    }

    fn subs(&self) -> std::sync::MutexGuard<'_, Vec<Sub>> {
        self.subs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers connection `conn` (no subscription yet) with the write half of its socket:
    /// from now on everything written to the app goes through the returned queue.
    pub fn attach(&self, conn: u64, w: OwnedWriteHalf) -> Arc<ConnQueue> {
        let queue = Arc::new(ConnQueue::new(w));
        self.subs().push(Sub {
            conn,
            filters: Vec::new(),
            queue: queue.clone(),
        });
        queue
    }

    /// Forgets connection `conn` and its queue.
    pub fn detach(&self, conn: u64) {
        self.subs().retain(|s| s.conn != conn);
    }

    /// Adds filters (as the client wrote them) to connection `conn`.
    pub fn subscribe(&self, conn: u64, filters: &[String]) {
        let mut subs = self.subs();
        if let Some(s) = subs.iter_mut().find(|s| s.conn == conn) {
            for f in filters {
                let f = to_internal(f).into_owned();
                if !s.filters.contains(&f) {
                    s.filters.push(f);
                }
            }
        }
    }

    /// Removes filters (as the client wrote them) from connection `conn`.
    pub fn unsubscribe(&self, conn: u64, filters: &[String]) {
        let mut subs = self.subs();
        if let Some(s) = subs.iter_mut().find(|s| s.conn == conn) {
            s.filters
                .retain(|f| !filters.iter().any(|g| to_internal(g) == f.as_str()));
        }
    }

    /// Whether any connection is subscribed to `topic` (as apps know it): a message nobody
    /// would receive need not be built.
    pub fn wanted(&self, topic: &str) -> bool {
        let internal = to_internal(topic);
        self.subs()
            .iter()
            .any(|s| s.filters.iter().any(|f| topic_matches(f, &internal)))
    }

    /// Queues a QoS 0 message on `topic` (as apps know it) for every connection subscribed to
    /// it. Never waits; the packet is encoded only if someone is subscribed.
    pub fn publish(&self, topic: &str, payload: &[u8]) -> Delivery {
        if topic.is_empty() || topic.len() > MAX_TOPIC_BYTES || topic.contains(['+', '#', '\0']) {
            return Delivery::BadTopic;
        }
        if 2 + topic.len() + payload.len() > MAX_REMAINING_LENGTH {
            return Delivery::TooLarge;
        }
        let internal = to_internal(topic);
        let subs = self.subs();
        let mut packet: Option<Bytes> = None;
        let mut queued = 0;
        for s in subs.iter() {
            if !s.filters.iter().any(|f| topic_matches(f, &internal)) {
                continue;
            }
            let p = packet.get_or_insert_with(|| publish_packet(topic, payload));
            let dropped = s.queue.push(p.clone(), self.limit);
            if dropped > 0 {
                metrics::dropped("slow_subscriber", dropped);
            }
            queued += 1;
        }
        Delivery::Queued(queued)
    }
}

/// A QoS 0 PUBLISH packet, not retained.
fn publish_packet(topic: &str, payload: &[u8]) -> Bytes {
    let body = 2 + topic.len() + payload.len();
    let mut out = Vec::with_capacity(body + 5);
    out.push(0x30);
    put_len(&mut out, body);
    // `publish` checked the topic's length.
    put_bytes(&mut out, topic.as_bytes());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A loopback connection: the write half for a queue, and the app's end.
    async fn pair() -> (OwnedWriteHalf, App) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (ours, _) = l.accept().await.unwrap();
        let (_r, w) = ours.into_split();
        // The read half is not needed; dropping it does not close the socket.
        (
            w,
            App {
                s: app,
                buf: Vec::new(),
            },
        )
    }

    /// An app's end of a connection, reading whole PUBLISH packets.
    struct App {
        s: TcpStream,
        buf: Vec<u8>,
    }

    impl App {
        /// The next message, or `None` if none arrives within `wait`.
        async fn next_within(&mut self, wait: Duration) -> Option<(String, Vec<u8>)> {
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                if let Some(m) = self.parse() {
                    return Some(m);
                }
                let mut chunk = [0u8; 65536];
                let got = tokio::time::timeout_at(deadline, self.s.read(&mut chunk))
                    .await
                    .ok()?
                    .unwrap();
                assert!(got > 0, "closed");
                self.buf.extend_from_slice(&chunk[..got]);
            }
        }

        fn parse(&mut self) -> Option<(String, Vec<u8>)> {
            let buf = &self.buf;
            if buf.len() < 2 {
                return None;
            }
            assert_eq!(buf[0], 0x30, "a QoS 0 PUBLISH, not retained");
            let mut len = 0usize;
            let mut i = 1;
            loop {
                let b = *buf.get(i)?;
                len |= usize::from(b & 0x7f) << (7 * (i - 1));
                i += 1;
                if b & 0x80 == 0 {
                    break;
                }
            }
            if buf.len() < i + len {
                return None;
            }
            let body = &buf[i..i + len];
            let tl = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let topic = String::from_utf8(body[2..2 + tl].to_vec()).unwrap();
            let payload = body[2 + tl..].to_vec();
            self.buf.drain(..i + len);
            Some((topic, payload))
        }
    }

    /// Reads `n` messages (5 s at most).
    async fn receive(app: &mut App, n: usize) -> Vec<(String, Vec<u8>)> {
        let mut msgs = Vec::new();
        while msgs.len() < n {
            msgs.push(
                app.next_within(Duration::from_secs(5))
                    .await
                    .expect("messages in time"),
            );
        }
        msgs
    }

    /// Nothing more arrives within 100 ms.
    async fn quiet(app: &mut App) {
        assert!(
            app.next_within(Duration::from_millis(100)).await.is_none(),
            "something more arrived"
        );
    }

    #[tokio::test]
    async fn messages_reach_the_matching_connections_once() {
        let d = Direct::new(1 << 20);
        let (wa, mut a) = pair().await;
        let (wb, mut b) = pair().await;
        let (wc, mut c) = pair().await;
        d.attach(1, wa);
        d.attach(2, wb);
        d.attach(3, wc);
        d.subscribe(1, &["edgesync/gw/+".into(), "edgesync/#".into()]);
        d.subscribe(2, &["$hw/events/device/+/twin/update/delta".into()]);
        d.subscribe(3, &["#".into()]);
        assert!(d.wanted("edgesync/gw/plc-1"));
        assert!(d.wanted("$hw/events/device/plc-1/twin/update/delta"));
        assert!(
            !Direct::new(1).wanted("edgesync/gw/plc-1"),
            "nobody subscribed"
        );
        assert_eq!(d.publish("edgesync/gw/plc-1", b"{}"), Delivery::Queued(2));
        assert_eq!(
            d.publish("$hw/events/device/plc-1/twin/update/delta", b"d"),
            Delivery::Queued(2)
        );
        assert_eq!(d.publish("other/topic", b"x"), Delivery::Queued(1));
        // Two matching filters, one copy.
        assert_eq!(
            receive(&mut a, 1).await,
            vec![("edgesync/gw/plc-1".into(), b"{}".to_vec())]
        );
        quiet(&mut a).await;
        assert_eq!(
            receive(&mut b, 1).await,
            vec![(
                "$hw/events/device/plc-1/twin/update/delta".into(),
                b"d".to_vec()
            )]
        );
        // `#` receives `$hw/...` too, as rumqttd does for apps' messages behind the guard.
        assert_eq!(receive(&mut c, 3).await.len(), 3);
    }

    #[tokio::test]
    async fn unsubscribe_and_detach_stop_delivery() {
        let d = Direct::new(1 << 20);
        let (w, mut a) = pair().await;
        d.attach(1, w);
        d.subscribe(1, &["$hw/#".into(), "edgesync/#".into()]);
        d.unsubscribe(1, &["$hw/#".into()]);
        assert!(!d.wanted("$hw/events/connected/gw"));
        assert_eq!(
            d.publish("$hw/events/connected/gw", b""),
            Delivery::Queued(0)
        );
        assert_eq!(d.publish("edgesync/gw/d", b""), Delivery::Queued(1));
        d.detach(1);
        assert_eq!(d.publish("edgesync/gw/d", b""), Delivery::Queued(0));
        assert_eq!(receive(&mut a, 1).await.len(), 1);
        // Detached: the socket's write half is gone, the app sees the end.
        let mut rest = Vec::new();
        a.s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty() && a.buf.is_empty());
        // Unknown connections are ignored.
        d.subscribe(9, &["#".into()]);
        assert_eq!(d.publish("edgesync/gw/d", b""), Delivery::Queued(0));
    }

    #[tokio::test]
    async fn a_slow_reader_loses_its_oldest_messages_only() {
        const LIMIT: usize = 64 * 1024;
        let d = Direct::new(LIMIT);
        let (ws, mut slow) = pair().await;
        let (wf, mut fast) = pair().await;
        let slow_q = d.attach(1, ws);
        d.attach(2, wf);
        d.subscribe(1, &["t/#".into()]);
        d.subscribe(2, &["t/#".into()]);
        // 1 KiB messages: far more than the socket buffers and the queue hold.
        let n = 20_000u32;
        for i in 0..n {
            let mut p = vec![0u8; 1024];
            p[..4].copy_from_slice(&i.to_be_bytes());
            assert_eq!(d.publish("t/x", &p), Delivery::Queued(2));
            let m = receive(&mut fast, 1).await;
            assert_eq!(
                &m[0].1[..4],
                &i.to_be_bytes(),
                "the fast app gets each in order"
            );
        }
        assert!(!slow_q.is_empty(), "the slow app's socket is full");
        assert!(slow_q.state().droppable <= LIMIT + 1100);
        // The slow app now reads (nobody writes what waits for it in this test but the
        // publisher, so publish once more after draining the socket).
        let mut got: Vec<u32> = Vec::new();
        while let Some(m) = slow.next_within(Duration::from_millis(300)).await {
            got.push(u32::from_be_bytes(m.1[..4].try_into().unwrap()));
        }
        assert!(got.windows(2).all(|w| w[0] < w[1]), "in order");
        assert_eq!(got[0], 0, "the first ones were written at once");
        let before_flush = got.len();
        // The rest of what waits (the socket had room again after the reads above).
        while !slow_q.is_empty() {
            slow_q.writable().await.unwrap();
            let _ = slow_q.flush().unwrap();
            while let Some(m) = slow.next_within(Duration::from_millis(100)).await {
                got.push(u32::from_be_bytes(m.1[..4].try_into().unwrap()));
            }
        }
        while let Some(m) = slow.next_within(Duration::from_millis(300)).await {
            got.push(u32::from_be_bytes(m.1[..4].try_into().unwrap()));
        }
        assert!(got.len() > before_flush, "the queued ones follow");
        assert_eq!(*got.last().unwrap(), n - 1, "the newest are kept");
        assert!(got.windows(2).all(|w| w[0] < w[1]), "in order");
        assert!((got.len() as u32) < n, "some were dropped");
        // Between what the socket took and the queue's newest: one gap only.
        let gaps = got.windows(2).filter(|w| w[1] != w[0] + 1).count();
        assert_eq!(gaps, 1, "dropped: the oldest queued, nothing else");
    }

    #[tokio::test]
    async fn broker_packets_are_never_dropped_and_keep_their_place() {
        let d = Direct::new(2048);
        let (w, mut app) = pair().await;
        let q = d.attach(1, w);
        d.subscribe(1, &["t".into()]);
        // Fill the socket with the agent's messages, then queue a broker packet and more.
        let mut sent = 0u32;
        while q.is_empty() {
            let mut p = vec![0u8; 1024];
            p[..4].copy_from_slice(&sent.to_be_bytes());
            d.publish("t", &p);
            sent += 1;
        }
        let broker = publish_packet("from/broker", b"keep me");
        assert_eq!(q.push_broker(broker).unwrap(), Flushed::Waiting);
        for _ in 0..100 {
            d.publish("t", &[9u8; 1024]);
        }
        assert!(q.pinned() > 0);
        // Drain: the broker packet arrives whole, after what was queued before it.
        let mut saw_broker = false;
        loop {
            let _ = q.flush().unwrap();
            match app.next_within(Duration::from_millis(300)).await {
                Some(m) if m.0 == "from/broker" => {
                    assert_eq!(m.1, b"keep me");
                    saw_broker = true;
                }
                Some(_) => {}
                None if q.is_empty() => break,
                None => {}
            }
        }
        assert!(saw_broker, "the broker's packet was dropped");
        assert_eq!(q.pinned(), 0);
    }

    #[tokio::test]
    async fn an_app_that_vanished_breaks_nothing() {
        let d = Direct::new(4096);
        let (w, app) = pair().await;
        let (w2, mut other) = pair().await;
        let gone = d.attach(1, w);
        d.attach(2, w2);
        d.subscribe(1, &["t".into()]);
        d.subscribe(2, &["t".into()]);
        drop(app);
        for i in 0..1000u32 {
            assert_eq!(d.publish("t", &i.to_be_bytes()), Delivery::Queued(2));
        }
        assert!(gone.flush().is_err(), "writes to the vanished app failed");
        assert!(gone.push_broker(Bytes::from_static(&[0xd0, 0])).is_err());
        let got = receive(&mut other, 1000).await;
        assert_eq!(got.last().unwrap().1, 999u32.to_be_bytes());
    }

    #[tokio::test]
    async fn topics_that_cannot_be_published_are_refused() {
        let d = Direct::new(1 << 20);
        let (w, _app) = pair().await;
        d.attach(1, w);
        d.subscribe(1, &["#".into()]);
        for t in ["", "a/+", "a/#", "a\0b"] {
            assert_eq!(d.publish(t, b""), Delivery::BadTopic, "{t:?}");
        }
        assert_eq!(
            d.publish(&"a".repeat(MAX_TOPIC_BYTES + 1), b""),
            Delivery::BadTopic
        );
        assert_eq!(
            d.publish(&"a".repeat(MAX_TOPIC_BYTES), b""),
            Delivery::Queued(1)
        );
    }

    #[tokio::test]
    async fn long_payloads_get_a_longer_length_field() {
        let d = Direct::new(1 << 22);
        let (w, mut a) = pair().await;
        let q = d.attach(1, w);
        d.subscribe(1, &["big".into()]);
        for n in [0, 121, 122, 16_380, 16_381, 2_097_148, 2_097_149] {
            d.publish("big", &vec![1; n]);
            // Large ones do not fit the socket at once: write the rest while reading (what the
            // guard's connection task does).
            let writer = async {
                while !q.is_empty() {
                    q.writable().await.unwrap();
                    let _ = q.flush().unwrap();
                }
            };
            let (got, ()) = tokio::join!(receive(&mut a, 1), writer);
            assert_eq!(got[0].1.len(), n);
        }
    }

    #[tokio::test]
    async fn the_writer_is_woken_when_the_socket_cannot_take_a_message() {
        let d = Direct::new(1 << 20);
        let (w, _app) = pair().await;
        let q = d.attach(1, w);
        d.subscribe(1, &["t".into()]);
        while q.is_empty() {
            d.publish("t", &[0u8; 4096]);
        }
        tokio::time::timeout(Duration::from_secs(5), q.ready())
            .await
            .unwrap();
    }
}
