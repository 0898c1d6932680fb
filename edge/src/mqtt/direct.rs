//! The agent's own messages, delivered by the guard straight to the apps subscribed to them.
//!
//! Everything the agent publishes on the embedded broker (telemetry, twin results, documents
//! and deltas, device and tunnel state, rule outputs) is QoS 0 and never retained, and apps may
//! not publish on the agent's topics at all (see [`guard`](super::guard)). So these messages
//! need none of rumqttd's state: the bus task matches the topic against the subscriptions the
//! guard recorded, encodes one PUBLISH packet, and appends it to the outgoing queue of every
//! matching connection; the guard's connection task (on the broker thread) writes it to the
//! app's socket together with what rumqttd sends. One hand-off between threads per message,
//! instead of four (bus → rumqttd's router → rumqttd's connection → loopback TCP → guard).
//!
//! Semantics (what an app sees):
//! - a subscription counts from the moment rumqttd acknowledged it (the guard records the
//!   filters a SUBACK accepted, before passing the SUBACK on), until the UNSUBSCRIBE passes the
//!   guard or the connection ends;
//! - topics and filters match as rumqttd matches them for apps' own messages, after the guard's
//!   `$` mapping (so `#` and `+/...` also receive `$hw/...`, see `docs/mqtt.md`);
//! - a message is delivered once per connection however many of its filters match, with QoS 0;
//! - each connection has a queue of at most `limit` bytes of the agent's messages; when an app
//!   reads too slowly and the queue is full, its oldest messages are dropped (counted as
//!   `edgesync_mqtt_dropped_total{reason="slow_subscriber"}`); nobody else waits for it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tokio::sync::Notify;

use super::guard::{to_internal, topic_matches};
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

/// The agent's messages waiting for one connection's writer.
#[derive(Debug, Default)]
pub struct ConnQueue {
    state: Mutex<QueueState>,
    ready: Notify,
}

#[derive(Debug, Default)]
struct QueueState {
    packets: VecDeque<Bytes>,
    bytes: usize,
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

    /// Registers connection `conn` (no subscription yet); its writer drains the queue.
    pub fn attach(&self, conn: u64) -> Arc<ConnQueue> {
        let queue = Arc::new(ConnQueue::default());
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

impl ConnQueue {
    /// Appends a packet, dropping the oldest ones while more than `limit` bytes would wait
    /// (the newest packet always stays); returns how many were dropped.
    fn push(&self, packet: Bytes, limit: usize) -> u64 {
        let mut dropped = 0;
        {
            let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            while !st.packets.is_empty() && st.bytes + packet.len() > limit {
                if let Some(old) = st.packets.pop_front() {
                    st.bytes -= old.len();
                    dropped += 1;
                }
            }
            st.bytes += packet.len();
            st.packets.push_back(packet);
        }
        self.ready.notify_one();
        dropped
    }

    /// Moves every waiting packet to the end of `out`; returns how many.
    pub fn drain_into(&self, out: &mut Vec<u8>) -> usize {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let n = st.packets.len();
        for p in st.packets.drain(..) {
            out.extend_from_slice(&p);
        }
        st.bytes = 0;
        n
    }

    /// Waits until a packet was queued since the last wait (cancellation-safe).
    pub async fn ready(&self) {
        self.ready.notified().await;
    }
}

/// A QoS 0 PUBLISH packet, not retained.
fn publish_packet(topic: &str, payload: &[u8]) -> Bytes {
    let body = 2 + topic.len() + payload.len();
    let mut out = Vec::with_capacity(body + 5);
    out.push(0x30);
    let mut len = body;
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn drained(q: &ConnQueue) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        q.drain_into(&mut out);
        let mut msgs = Vec::new();
        let mut rest = &out[..];
        while !rest.is_empty() {
            assert_eq!(rest[0], 0x30, "a QoS 0 PUBLISH, not retained");
            let mut len = 0usize;
            let mut i = 1;
            loop {
                len |= usize::from(rest[i] & 0x7f) << (7 * (i - 1));
                i += 1;
                if rest[i - 1] & 0x80 == 0 {
                    break;
                }
            }
            let body = &rest[i..i + len];
            let tl = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let topic = String::from_utf8(body[2..2 + tl].to_vec()).unwrap();
            msgs.push((topic, body[2 + tl..].to_vec()));
            rest = &rest[i + len..];
        }
        msgs
    }

    #[test]
    fn messages_reach_the_matching_connections_once() {
        let d = Direct::new(1 << 20);
        let a = d.attach(1);
        let b = d.attach(2);
        let c = d.attach(3);
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
            drained(&a),
            vec![("edgesync/gw/plc-1".into(), b"{}".to_vec())]
        );
        assert_eq!(
            drained(&b),
            vec![(
                "$hw/events/device/plc-1/twin/update/delta".into(),
                b"d".to_vec()
            )]
        );
        // `#` receives `$hw/...` too, as rumqttd does for apps' messages behind the guard.
        assert_eq!(drained(&c).len(), 3);
    }

    #[test]
    fn unsubscribe_and_detach_stop_delivery() {
        let d = Direct::new(1 << 20);
        let a = d.attach(1);
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
        assert_eq!(drained(&a).len(), 1);
        // Unknown connections are ignored.
        d.subscribe(9, &["#".into()]);
        assert_eq!(d.publish("edgesync/gw/d", b""), Delivery::Queued(0));
    }

    #[test]
    fn a_slow_reader_loses_its_oldest_messages_only() {
        let d = Direct::new(100);
        let slow = d.attach(1);
        let fast = d.attach(2);
        d.subscribe(1, &["t/#".into()]);
        d.subscribe(2, &["t/#".into()]);
        let mut got_fast = 0;
        for i in 0..50u8 {
            // 2 + 1 header bytes, 2 + 3 topic bytes, 20 payload bytes: 28 bytes a packet.
            assert_eq!(d.publish("t/x", &[i; 20]), Delivery::Queued(2));
            got_fast += drained(&fast).len();
        }
        assert_eq!(got_fast, 50);
        let kept = drained(&slow);
        assert_eq!(kept.len(), 3, "100 bytes hold three packets of 28");
        let firsts: Vec<u8> = kept.iter().map(|(_, p)| p[0]).collect();
        assert_eq!(firsts, vec![47, 48, 49], "the newest are kept");
        // A packet larger than the limit is still delivered, alone.
        d.publish("t/x", &[7; 500]);
        d.publish("t/x", &[8; 500]);
        let big = drained(&slow);
        assert_eq!(big.len(), 1);
        assert_eq!(big[0].1[0], 8);
    }

    #[test]
    fn topics_that_cannot_be_published_are_refused() {
        let d = Direct::new(1 << 20);
        let _a = d.attach(1);
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

    #[test]
    fn long_payloads_get_a_longer_length_field() {
        let d = Direct::new(1 << 22);
        let a = d.attach(1);
        d.subscribe(1, &["big".into()]);
        for n in [0, 121, 122, 16_380, 16_381, 2_097_148, 2_097_149] {
            d.publish("big", &vec![1; n]);
            let got = drained(&a);
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].1.len(), n);
        }
    }

    #[tokio::test]
    async fn the_writer_is_woken_by_a_message_queued_before_it_waits() {
        let d = Direct::new(1 << 20);
        let a = d.attach(1);
        d.subscribe(1, &["t".into()]);
        d.publish("t", b"1");
        tokio::time::timeout(std::time::Duration::from_secs(5), a.ready())
            .await
            .unwrap();
        assert_eq!(drained(&a).len(), 1);
    }
}
