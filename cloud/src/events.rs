//! The hub's event stream: what changed in the fleet, numbered, for `GET /api/v1/events`.
//!
//! Every event gets an id from one counter that only grows, also across hub restarts: it
//! starts at the wall-clock milliseconds of the start times 1,000, so ids of a later run are
//! larger than those of an earlier one as long as fewer than 1,000 events per millisecond
//! were published. The last [`EventBus::capacity`] events are kept in memory (at most
//! [`MAX_BUFFERED_BYTES`] of payloads, older ones dropped first; a payload is serialized when
//! first read, and counted until then by an upper bound of its length); a subscriber
//! resuming from an id still in the buffer gets everything after it, and one resuming from an
//! id older than the buffer (or from an earlier run), or from an id never issued (a run whose
//! clock was ahead, another hub), is told so by a `resync` event before the buffered ones: it
//! must re-read the state it cares about.
//!
//! Kinds: `twin` (reported values of a device changed), `desired` (a desired value was set),
//! `applied` (a desired version reached an outcome on the node), `node_connected`,
//! `node_disconnected`, `resync`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use tokio::sync::broadcast;

/// A payload serialized only when someone reads it (most events are buffered for resumption
/// and never sent: serializing each one as it is published cost a fifth of the hub's CPU per
/// record at 10,000 records/s with no subscriber).
pub trait LazyPayload: Send + Sync + std::fmt::Debug {
    /// The payload as JSON.
    fn render(&self) -> String;
    /// An upper bound of the length of [`render`](Self::render)'s output, in bytes (what the
    /// buffer's byte bound counts).
    fn max_len(&self) -> usize;
}

/// One event.
#[derive(Debug)]
pub struct Event {
    /// Its id (increasing).
    pub id: u64,
    /// Its kind (the SSE `event:` field).
    pub kind: &'static str,
    data: Data,
}

#[derive(Debug)]
enum Data {
    /// Serialized when published.
    Ready(String),
    /// Serialized at the first read, once, however many subscribers send it; the payload is
    /// dropped then (an event holds its payload or its JSON, not both).
    Lazy {
        payload: Mutex<Option<Arc<dyn LazyPayload>>>,
        json: OnceLock<String>,
        max_len: usize,
    },
}

impl PartialEq for Event {
    fn eq(&self, other: &Event) -> bool {
        self.id == other.id && self.kind == other.kind && self.data() == other.data()
    }
}

impl Event {
    /// An event with `data` serialized.
    pub fn new(id: u64, kind: &'static str, data: &serde_json::Value) -> Event {
        Event {
            id,
            kind,
            data: Data::Ready(data.to_string()),
        }
    }

    /// Its payload (the SSE `data:` field), serialized JSON.
    pub fn data(&self) -> &str {
        match &self.data {
            Data::Ready(s) => s,
            Data::Lazy { payload, json, .. } => json.get_or_init(|| {
                let p = payload
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                // Taken only here, and this runs once.
                p.map(|p| p.render()).unwrap_or_default()
            }),
        }
    }

    /// The payload parsed back (`Null` if it is not JSON, which [`EventBus`] never stores).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.data()).unwrap_or(serde_json::Value::Null)
    }

    /// What the buffer's byte bound counts for this event.
    fn size(&self) -> usize {
        match &self.data {
            Data::Ready(s) => s.len(),
            Data::Lazy { max_len, .. } => *max_len,
        }
    }
}

/// Default number of events kept for resumption.
pub const DEFAULT_CAPACITY: usize = 10_000;
/// Most bytes of event payloads kept for resumption (older events are dropped first; a payload
/// not serialized yet counts its [`LazyPayload::max_len`]).
pub const MAX_BUFFERED_BYTES: usize = 32 << 20;
/// Live events a subscriber may fall behind before it is told to resync (the live channel
/// keeps the last this many events, whatever their size).
pub const LIVE_CAPACITY: usize = 1024;

/// The event stream (see the module docs).
#[derive(Debug)]
pub struct EventBus {
    inner: Mutex<Ring>,
    live: broadcast::Sender<Arc<Event>>,
    capacity: usize,
}

#[derive(Debug)]
struct Ring {
    next_id: u64,
    /// The first id of this run.
    first_id: u64,
    buf: VecDeque<Arc<Event>>,
    /// Bytes of the payloads in `buf`.
    bytes: usize,
}

impl EventBus {
    /// A bus keeping the last `capacity` events, numbering from `start_ms * 1000`.
    pub fn new(capacity: usize, start_ms: u64) -> Self {
        let first = start_ms.saturating_mul(1000).max(1);
        let (live, _) = broadcast::channel(capacity.clamp(16, LIVE_CAPACITY));
        EventBus {
            inner: Mutex::new(Ring {
                next_id: first,
                first_id: first,
                buf: VecDeque::with_capacity(capacity.min(1024)),
                bytes: 0,
            }),
            live,
            capacity: capacity.max(1),
        }
    }

    /// How many events are kept for resumption.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Publishes an event; returns its id.
    pub fn publish(&self, kind: &'static str, data: serde_json::Value) -> u64 {
        self.publish_serialized(kind, data.to_string())
    }

    /// Publishes an event whose payload is already serialized JSON; returns its id.
    pub fn publish_serialized(&self, kind: &'static str, data: String) -> u64 {
        self.publish_data(kind, Data::Ready(data))
    }

    /// Publishes an event whose payload is serialized when it is first read; returns its id.
    pub fn publish_lazy(&self, kind: &'static str, payload: Arc<dyn LazyPayload>) -> u64 {
        let max_len = payload.max_len();
        self.publish_data(
            kind,
            Data::Lazy {
                payload: Mutex::new(Some(payload)),
                json: OnceLock::new(),
                max_len,
            },
        )
    }

    fn publish_data(&self, kind: &'static str, data: Data) -> u64 {
        let mut r = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let id = r.next_id;
        r.next_id += 1;
        let ev = Arc::new(Event { id, kind, data });
        r.bytes += ev.size();
        r.buf.push_back(ev.clone());
        // The last `capacity` events, within MAX_BUFFERED_BYTES (the newest is always kept).
        while r.buf.len() > self.capacity || (r.bytes > MAX_BUFFERED_BYTES && r.buf.len() > 1) {
            if let Some(old) = r.buf.pop_front() {
                r.bytes -= old.size();
            }
        }
        // Sent under the lock, so live events follow the buffer's order.
        let _ = self.live.send(ev);
        id
    }

    /// Subscribes: the events after `last_id` still buffered (preceded by a `resync` event
    /// when some after it are no longer buffered), and a receiver of the live ones that
    /// follow. With `last_id` `None`, only live events.
    pub fn subscribe(
        &self,
        last_id: Option<u64>,
    ) -> (Vec<Arc<Event>>, broadcast::Receiver<Arc<Event>>) {
        let r = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let rx = self.live.subscribe();
        let Some(last) = last_id else {
            return (vec![], rx);
        };
        let oldest = r.buf.front().map_or(r.next_id, |e| e.id);
        let mut out = Vec::new();
        // An id this bus never issued: from a run whose clock was ahead of this one's (the
        // wall clock stepped back between runs) or from another hub. What the client missed
        // is unknown: resync, then the whole buffer.
        let from_future = last >= r.next_id;
        // Missed events: from an earlier run, or dropped from the buffer.
        if from_future || last + 1 < oldest || last < r.first_id.saturating_sub(1) {
            out.push(Arc::new(Event::new(
                oldest.saturating_sub(1),
                "resync",
                &serde_json::json!({
                    "reason": "events after the given id are no longer available; re-read the state",
                    "last_event_id": last,
                }),
            )));
        }
        let after = if from_future { 0 } else { last };
        out.extend(r.buf.iter().filter(|e| e.id > after).cloned());
        (out, rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_from_an_id_gets_what_followed_and_a_resync_when_some_is_gone() {
        let bus = EventBus::new(3, 1);
        let ids: Vec<u64> = (0..5)
            .map(|i| bus.publish("twin", serde_json::json!({"i": i})))
            .collect();
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1));
        // ids[1] is still followed by buffered ids[2..]; ids[2], ids[3], ids[4] are kept.
        let (got, _) = bus.subscribe(Some(ids[2]));
        assert_eq!(
            got.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![ids[3], ids[4]]
        );
        // ids[0]: ids[1] was dropped, so a resync comes first.
        let (got, _) = bus.subscribe(Some(ids[0]));
        assert_eq!(got[0].kind, "resync");
        assert_eq!(
            got[1..].iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![ids[2], ids[3], ids[4]]
        );
        // Live events follow.
        let (_, mut rx) = bus.subscribe(None);
        let id = bus.publish("desired", serde_json::json!({}));
        assert_eq!(rx.try_recv().map(|e| e.id).ok(), Some(id));
    }

    #[test]
    fn the_buffer_is_bounded_in_bytes_and_live_subscribers_in_events() {
        let bus = EventBus::new(10_000, 1);
        let big = "x".repeat(1 << 20);
        let ids: Vec<u64> = (0..100)
            .map(|_| bus.publish_serialized("twin", big.clone()))
            .collect();
        let (got, _) = bus.subscribe(Some(ids[0] - 1));
        // A resync, then only the newest events that fit.
        assert_eq!(got[0].kind, "resync");
        let kept: usize = got[1..].iter().map(|e| e.data().len()).sum();
        assert!(kept <= MAX_BUFFERED_BYTES, "{kept}");
        assert_eq!(got.last().map(|e| e.id), ids.last().copied());
        assert_eq!(got.len() - 1, MAX_BUFFERED_BYTES / (1 << 20));
        // A live subscriber that reads nothing lags after LIVE_CAPACITY events.
        let (_, mut rx) = bus.subscribe(None);
        for _ in 0..LIVE_CAPACITY + 5 {
            bus.publish("desired", serde_json::json!({}));
        }
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(_))
        ));
    }

    /// A payload that counts how often it is rendered.
    #[derive(Debug)]
    struct Counted {
        renders: std::sync::atomic::AtomicUsize,
        max_len: usize,
    }

    impl LazyPayload for Counted {
        fn render(&self) -> String {
            self.renders
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            r#"{"lazy":true}"#.to_owned()
        }
        fn max_len(&self) -> usize {
            self.max_len
        }
    }

    #[test]
    fn a_lazy_payload_is_rendered_once_when_read_and_bounded_by_its_max_len() {
        let bus = EventBus::new(10_000, 1);
        let p = Arc::new(Counted {
            renders: 0.into(),
            max_len: 1 << 20,
        });
        let before = bus.publish("twin", serde_json::json!({}));
        let ids: Vec<u64> = (0..40)
            .map(|_| bus.publish_lazy("twin", p.clone()))
            .collect();
        // Nobody read them: nothing was rendered.
        assert_eq!(p.renders.load(std::sync::atomic::Ordering::SeqCst), 0);
        // Counted by the bound: 40 MiB of bounds do not fit in 32 MiB.
        let (got, _) = bus.subscribe(Some(before));
        assert_eq!(got[0].kind, "resync");
        assert_eq!(got.len() - 1, MAX_BUFFERED_BYTES / (1 << 20));
        assert_eq!(got.last().map(|e| e.id), ids.last().copied());
        let last = got.last().unwrap();
        assert_eq!(last.json(), serde_json::json!({"lazy": true}));
        assert_eq!(last.data(), r#"{"lazy":true}"#);
        // Read twice (and by another subscriber): rendered once.
        let (again, _) = bus.subscribe(Some(ids[38]));
        assert_eq!(again[0].data(), r#"{"lazy":true}"#);
        assert_eq!(p.renders.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(*again[0], **last);
        // The rendered events let go of the payload; the 31 others still hold it.
        assert_eq!(Arc::strong_count(&p), 1 + 31);
    }

    #[test]
    fn an_id_never_issued_gets_resync_and_the_whole_buffer() {
        let bus = EventBus::new(10, 1_000);
        let a = bus.publish("twin", serde_json::json!({}));
        let b = bus.publish("twin", serde_json::json!({}));
        // The last issued id is b: resuming from it is normal, from anything above is not.
        let (got, _) = bus.subscribe(Some(b));
        assert!(got.is_empty());
        for future in [b + 1, b + 1_000_000, u64::MAX] {
            let (got, _) = bus.subscribe(Some(future));
            assert_eq!(got[0].kind, "resync", "{future}");
            assert_eq!(got[0].json()["last_event_id"], future);
            assert_eq!(
                got[1..].iter().map(|e| e.id).collect::<Vec<_>>(),
                vec![a, b],
                "{future}"
            );
            // The resync's id is just below the buffer, so resuming from it loses nothing.
            assert_eq!(got[0].id, a - 1);
        }
    }

    #[test]
    fn ids_of_a_later_run_are_larger() {
        let a = EventBus::new(10, 1_000);
        let last = a.publish("twin", serde_json::json!({}));
        let b = EventBus::new(10, 1_001);
        let first = b.publish("twin", serde_json::json!({}));
        assert!(first > last);
        // Resuming in the new run from the old run's id: resync.
        let (got, _) = b.subscribe(Some(last));
        assert_eq!(got[0].kind, "resync");
    }
}
