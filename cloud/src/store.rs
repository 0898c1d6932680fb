//! The hub's durable state on sled: uplink records, per-node sequence numbers, reported twins and
//! node status.
//!
//! One [`HubStore`] is shared (`Arc<HubStore>`) by every connection task and by the HTTP API.
//! Connection tasks call [`HubStore::commit_batch`] with each uplink batch and acknowledge it to
//! the agent only after it returns; the API reads twins and node status (with the number of
//! records lost in gaps) from memory, and only the list of a node's gaps from sled.
//!
//! # Layout (one sled tree, `hub`)
//!
//! | key | value |
//! |---|---|
//! | `<node> 0x00 <first seq: u64 BE>` | [`encode_samples`] of one batch: records `first..first+n` |
//! | `0x01 <node> 0x00 "seq"` | last uplink seq stored as of the last checkpoint (u64 BE; the record entries after it count too) |
//! | `0x01 <node> 0x00 "agent"` | agent version (UTF-8) |
//! | `0x01 <node> 0x00 "seen"` | last seen, ms since the epoch (u64 BE) |
//! | `0x07 <node> 0x00 <bucket: u16 BE>` | [`encode_samples`] of the latest sample of every property hashed to the bucket ([`twin_bucket`]), as of the twin checkpoint |
//! | `0x02 <node> 0x00 <device> 0x00 <property>` | the latest sample of one property, as hubs before the buckets wrote them: read on open, then replaced by buckets |
//! | `0x01 <node> 0x00 "twinseq"` | the twin checkpoint: the node's twin keys hold every value reported up to this seq (u64 BE) |
//! | `0x03 <node> 0x00 <first seq: u64 BE>` | last seq (u64 BE) of a gap: records lost at the edge |
//! | `0x04 <node> 0x00 <device> 0x00 <property>` | the desired value and its outcome (JSON) |
//! | `0x05 <node> 0x00 <device>` | the device's schema as the agent sent it (protobuf) |
//! | `0x01 <node> 0x00 "dlseq"` / `"ctlseq"` | last desired version assigned / control record stored |
//! | `0x01 <node> 0x00 "store"` | the id of the node's outbox (UTF-8), as its last hello said |
//! | `0x01 <node> 0x00 "hbytes"` / `"floor"` | bytes of the node's record entries / first seq not pruned ([`retention`]) |
//! | `0x06 <node> 0x00 <bucket start ms: u64 BE>` | first seq committed in that time bucket ([`retention`]) |
//! | `0x08 <node> 0x00 <rule> 0x00 <device>` | an active alarm of a local rule ([`AlarmRecord`], JSON) |
//!
//! Ids never hold `0x00` and always start with a letter or digit, so the key spaces never
//! overlap and a node's records sort by sequence number.
//!
//! # Invariants
//!
//! - A batch's new records are one record entry (one sled key, atomic by itself). The node's
//!   sequence number, byte count and last-seen time on disk are written with it in one atomic
//!   sled batch at a twin checkpoint or when the history index gets a new bucket; between them
//!   a commit writes its entry alone (a sled batch costs two more log writes) and the
//!   metadata lags. Open counts the entries that continue the sequence after it (sled recovers
//!   a prefix of its log) and persists the result; an entry after a hole, which the hub never
//!   writes, was never acknowledged and is removed.
//! - The twin is a view of the records: its keys are brought up to date (a checkpoint, in the
//!   same atomic batch as a commit) at a node's first commit of a run, then at least every
//!   [`TWIN_CHECKPOINT_INTERVAL`] or [`TWIN_CHECKPOINT_RECORDS`] records while it sends (both
//!   longer for a twin of more than 10,000 properties, see [`checkpoint_due`]), and at
//!   [`HubStore::flush`]. Open replays the records after the checkpoint into the twin, so the
//!   twin after a crash equals the one before it, while a commit writes one key per batch
//!   instead of one per changed property.
//! - A node's persisted twin is at most [`TWIN_BUCKETS`] keys, each rewritten whole (from the
//!   twin in memory) when one of its properties changed: sled spends kilobytes of memory per
//!   key written, so one key per property cost the hub about 7 KiB per property (700 MB at
//!   100,000 tags).
//! - Every sequence number `1..=seq` of a node is stored exactly once, either as a record or
//!   inside a gap marker (records the edge lost and reported), until history retention prunes
//!   it (records below the node's `floor`, see [`retention`]); duplicates are skipped, batches
//!   that would leave a hole are refused.
//! - [`HubStore::stored_seq`] and [`CommitOutcome::stored_seq`] only report what has been
//!   flushed to disk: sled's flush, then `fdatasync` of its log and `fsync` of new blob files
//!   ([`edgesync_protocol::durable`]), so an agent told "stored up to N" may drop its records up
//!   to N, even if the power fails next.
//! - The in-memory twin and node status follow commit order. Twin reads may show a value a few
//!   milliseconds before its flush completes (it is already written, not yet fsynced).
//! - A node's `lost_records` is the sum of `to - from + 1` over its gap markers written to sled:
//!   updated with `applied_seq` under the commit lock, in the step that writes the marker, and
//!   rebuilt from the markers on open. A gap resent or overlapping what is stored adds only its
//!   new records, so no lost record is counted twice.
//! - Desired versions and control records are decided from what is written to sled, under the
//!   commit lock, so two concurrent changes never get the same version. A desired value is
//!   shown (and sent to the node) only once it is durable, and never replaced in memory by an
//!   older version that finished its flush later.
//! - A node's twin holds at most [`MAX_PROPERTIES_PER_NODE`] properties, so a peer cannot grow
//!   the hub's memory without bound.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use edgesync_protocol::desired::{Applied as AppliedOutcome, Origin, Outcome};
use edgesync_protocol::durable::DirSync;
use edgesync_protocol::frame::{
    Control, ControlKind, DesiredFrame, DeviceSchema, FrameError, PropertySchema, count_samples,
    decode_samples, encode_samples, value_from_wire, value_to_wire,
};
use edgesync_protocol::{DeviceId, NodeId, PropertyId, Quality, Sample, Timestamp, Value};
use serde::Serialize;
use serde::ser::SerializeStruct;

use crate::events::LazyPayload;
use crate::telemetry;

/// Trace events that mark records written (not yet durable) and acknowledged, for checking the
/// order of writes, syncs and acks from outside (`RUST_LOG=edgesync::durability=trace`).
pub const DURABILITY_TARGET: &str = "edgesync::durability";

/// Most properties of one device in one `twin` event (a commit that changed more publishes
/// several events for the device).
pub const TWIN_EVENT_PROPERTIES: usize = 1_000;

/// Most properties (over all devices) the twin of one node may hold.
pub const MAX_PROPERTIES_PER_NODE: usize = 100_000;

const TREE: &[u8] = b"hub";
const META: u8 = 0x01;
const TWIN: u8 = 0x02;
const GAP: u8 = 0x03;
const DESIRED: u8 = 0x04;
const SCHEMA: u8 = 0x05;
const HISTORY: u8 = 0x06;
const TWIN_BUCKET: u8 = 0x07;
const ALARM: u8 = 0x08;
/// Keys of a node's persisted twin: each property's latest sample lives in bucket
/// [`twin_bucket`] of its device and id.
pub const TWIN_BUCKETS: u16 = 256;
const SEP: u8 = 0x00;
const FIELD_DOWNLINK: &[u8] = b"dlseq";
const FIELD_CONTROL: &[u8] = b"ctlseq";
const FIELD_SEQ: &[u8] = b"seq";
const FIELD_AGENT: &[u8] = b"agent";
const FIELD_SEEN: &[u8] = b"seen";
const FIELD_STORE: &[u8] = b"store";
/// The trust domain a node first authenticated from (node ids are shared by the hub's own
/// and its federated trust domains; one domain may not take over another's node).
const FIELD_DOMAIN: &[u8] = b"domain";
const FIELD_TWIN: &[u8] = b"twinseq";
const FIELD_BYTES: &[u8] = b"hbytes";
const FIELD_FLOOR: &[u8] = b"floor";

mod retention;
pub use retention::{Pruned, Retention};

/// The persisted twin is brought up to date (a checkpoint) at least this often while a node
/// sends records...
const TWIN_CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// ...or once this many records changed it since the last checkpoint, whichever comes first.
/// Both bound how many records [`HubStore::open`] replays into the twin.
const TWIN_CHECKPOINT_RECORDS: u64 = 20_000;

/// What can go wrong in the hub store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// sled failed (I/O error, corruption detected by sled, ...).
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    /// The batch starts after the next expected sequence number; nothing was stored.
    #[error("sequence gap: expected {expected}, got {got}")]
    Gap {
        /// The next sequence number the store expects (stored seq + 1).
        expected: u64,
        /// The first sequence number of the batch.
        got: u64,
    },
    /// The batch's sequence numbers are not valid (a zero first seq, or an overflow).
    #[error("invalid sequence numbers: first {first_seq} with {len} records")]
    InvalidSeq {
        /// The first sequence number of the batch.
        first_seq: u64,
        /// How many records the batch holds.
        len: usize,
    },
    /// Storing the batch would give the node's twin more than [`MAX_PROPERTIES_PER_NODE`]
    /// properties; nothing was stored.
    #[error("twin of node {node} would exceed {limit} properties")]
    TwinFull {
        /// The node.
        node: NodeId,
        /// The limit.
        limit: usize,
    },
    /// A gap range is empty or starts at 0.
    #[error("invalid gap: records {from}..={to}")]
    InvalidGap {
        /// First lost record.
        from: u64,
        /// Last lost record.
        to: u64,
    },
    /// A blocking store task failed (it panicked, or the runtime is shutting down).
    #[error("store task failed: {0}")]
    Task(String),
    /// An entry on disk cannot be read back.
    #[error("corrupt store entry {key}: {reason}")]
    Corrupt {
        /// The entry's key, escaped for display.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// What [`HubStore::commit_batch`] did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitOutcome {
    /// The node's last sequence number durably stored (flushed) after this commit.
    pub stored_seq: u64,
    /// How many records of the batch were new and stored.
    pub accepted: usize,
    /// How many records of the batch were already stored and skipped.
    pub duplicates: usize,
}

/// A page of stored records (`(seq, sample)` in order) and the seq of the next page, if any.
pub type RecordsPage = (Vec<(u64, Sample)>, Option<u64>);

/// What [`HubStore::commit_gap`] did with a gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GapOutcome {
    /// The node's last sequence number durably stored (flushed) after this commit.
    pub stored_seq: u64,
    /// How many records of the range were new and are now recorded as lost (0 for a gap
    /// already stored, such as one resent after a reconnect).
    pub new_records: u64,
}

/// What a connection reports about its node when the session is established.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnInfo {
    /// The peer's address (`ip:port`).
    pub remote_addr: String,
    /// The agent's version string.
    pub agent_version: String,
    /// The agent's boot id (changes on every agent start).
    pub boot_id: String,
    /// The config version the agent runs.
    pub config_version: u64,
    /// When the certificate the node presented expires (its leaf's `notAfter`), ms since the
    /// epoch.
    pub svid_expires_ms: Option<u64>,
}

/// What the hub knows about a node (the API's node resource).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub struct NodeStatus {
    /// The node.
    pub node: NodeId,
    /// Whether a session with the node is up.
    pub connected: bool,
    /// When the node was last heard from, ms since the epoch (`null` if never).
    pub last_seen_ms: Option<u64>,
    /// The address of the node's current or last connection since the hub started.
    pub remote_addr: Option<String>,
    /// The agent version the node last reported.
    pub agent_version: Option<String>,
    /// The boot id of the node's current or last connection since the hub started.
    pub boot_id: Option<String>,
    /// The last uplink sequence number durably stored.
    pub uplink_seq: u64,
    /// Records lost at the edge, summed over the node's gaps.
    pub lost_records: u64,
    /// Records waiting in the node's outbox, as last reported by the agent.
    pub backlog: u64,
    /// The config version the node last reported.
    pub config_version: u64,
    /// How many devices the node's twin holds.
    pub devices: usize,
    /// Bytes the node's stored records take on disk (before sled's own overhead).
    pub history_bytes: u64,
    /// The first sequence number that may still be stored: records before it were pruned by
    /// the history retention (1 when none was).
    pub history_from: u64,
    /// When the certificate of the node's current or last connection since the hub started
    /// expires, ms since the epoch (the hub closes a connection when it does).
    pub svid_expires_ms: Option<u64>,
}

/// The latest reported state of one property.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reported {
    /// The value (`None` if the property never had a good read).
    pub value: Option<Value>,
    /// Good or bad with a reason.
    pub quality: Quality,
    /// When the agent read it.
    pub ts: Timestamp,
    /// The node's sequence number with which this value was last set: newer than the twin
    /// checkpoint means not in the twin's keys yet (0 when loaded from them).
    #[serde(skip)]
    seq: u64,
}

impl Reported {
    /// This value as the sample of `device`/`property` that reported it.
    fn sample(&self, device: &DeviceId, property: &PropertyId) -> Sample {
        Sample {
            device: device.clone(),
            property: property.clone(),
            value: self.value.clone(),
            quality: self.quality,
            ts: self.ts,
        }
    }
}

/// A desired value of one property, its version and what became of it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Desired {
    /// The value to write to the device.
    pub value: Value,
    /// Its version: the node's downlink sequence number (increases with every change).
    pub version: u64,
    /// Who set it.
    pub origin: Origin,
    /// When it was set, ms since the Unix epoch.
    pub set_ms: u64,
    /// The API token name that set it, or `edge` for a local change.
    pub by: String,
    /// What became of it on the node (`None` until the node reports).
    pub applied: Option<AppliedOutcome>,
}

/// One property whose desired value was set: its new version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DesiredSet {
    /// The property.
    pub property: PropertyId,
    /// Its new version.
    pub version: u64,
}

pub use edgesync_protocol::desired::FieldError;
use edgesync_protocol::desired::json_kind;

/// Why a desired change was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DesiredError {
    /// The node is not known.
    #[error("node {0} not found")]
    UnknownNode(NodeId),
    /// The node has no such device.
    #[error("device {device} not found on node {node}")]
    UnknownDevice {
        /// The node.
        node: NodeId,
        /// The device.
        device: DeviceId,
    },
    /// Some values are invalid (every problem; nothing was changed).
    #[error("{}", .0.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldError>),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The twin of one device: reported and desired state per property.
///
/// Serializes as `{"reported": {...}, "desired": {...}, "delta": {...}}`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Twin {
    /// Latest reported state per property.
    pub reported: BTreeMap<PropertyId, Reported>,
    /// Desired value per property.
    pub desired: BTreeMap<PropertyId, Desired>,
}

impl Twin {
    /// Desired values that differ from the reported value (or have none reported).
    pub fn delta(&self) -> BTreeMap<PropertyId, Value> {
        self.desired
            .iter()
            .filter(|(prop, desired)| {
                self.reported
                    .get(*prop)
                    .and_then(|r| r.value.as_ref())
                    .is_none_or(|v| *v != desired.value)
            })
            .map(|(prop, desired)| (prop.clone(), desired.value.clone()))
            .collect()
    }
}

impl Serialize for Twin {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Twin", 3)?;
        st.serialize_field("reported", &self.reported)?;
        st.serialize_field("desired", &self.desired)?;
        st.serialize_field("delta", &self.delta())?;
        st.end()
    }
}

/// The latest samples of a commit, by device and property.
type Latest<'a> = BTreeMap<&'a DeviceId, BTreeMap<&'a PropertyId, &'a Sample>>;

impl NodeState {
    /// Adds to `batch` every twin bucket that holds a value changed after the checkpoint or one
    /// of `latest` (every bucket with `all`), rewritten whole: the twin in memory with
    /// `latest` over it.
    fn write_buckets(
        &self,
        node: &NodeId,
        batch: &mut sled::Batch,
        latest: &Latest<'_>,
        all: bool,
    ) {
        let mut dirty = vec![all; usize::from(TWIN_BUCKETS)];
        if !all {
            for (device, twin) in &self.twins {
                for (property, r) in &twin.reported {
                    if r.seq > self.twin_seq {
                        dirty[usize::from(twin_bucket(device, property))] = true;
                    }
                }
            }
            for (device, props) in latest {
                for property in props.keys() {
                    dirty[usize::from(twin_bucket(device, property))] = true;
                }
            }
        }
        let mut buckets: BTreeMap<u16, Vec<Sample>> = BTreeMap::new();
        for (device, twin) in &self.twins {
            let newer = latest.get(device);
            for (property, r) in &twin.reported {
                let b = twin_bucket(device, property);
                if dirty[usize::from(b)] && !newer.is_some_and(|m| m.contains_key(property)) {
                    buckets
                        .entry(b)
                        .or_default()
                        .push(r.sample(device, property));
                }
            }
        }
        for (device, props) in latest {
            for (property, sample) in props {
                buckets
                    .entry(twin_bucket(device, property))
                    .or_default()
                    .push((*sample).clone());
            }
        }
        for (b, samples) in buckets {
            batch.insert(twin_bucket_key(node, b), encode_samples(&samples));
        }
    }

    /// Whether a commit of `records` more records checkpoints the twin: the first one of a run,
    /// or once [`TWIN_CHECKPOINT_RECORDS`] records or [`TWIN_CHECKPOINT_INTERVAL`] passed since
    /// the last; for a twin of more than 10,000 properties, the interval grows by a second per
    /// 10,000 and the records to twice the properties (a checkpoint rewrites buckets whole).
    fn checkpoint_due(&self, records: u64) -> bool {
        let props = self.properties as u64;
        let interval =
            TWIN_CHECKPOINT_INTERVAL * u32::try_from(props / 10_000).unwrap_or(u32::MAX).max(1);
        !self.twin_seq_written
            || self.dirty_records + records >= TWIN_CHECKPOINT_RECORDS.max(2 * props)
            || self.checkpointed_at.is_none_or(|t| t.elapsed() >= interval)
    }

    /// [`NodeState::report`] for several properties of one device.
    fn report_device<'a>(
        &mut self,
        device: &DeviceId,
        props: impl IntoIterator<Item = (&'a PropertyId, &'a Sample)>,
        seq: u64,
    ) {
        let twin = match self.twins.get_mut(device) {
            Some(t) => t,
            None => self.twins.entry(device.clone()).or_default(),
        };
        for (property, sample) in props {
            let reported = Reported {
                value: sample.value.clone(),
                quality: sample.quality,
                ts: sample.ts,
                seq,
            };
            match twin.reported.get_mut(property) {
                Some(r) => *r = reported,
                None => {
                    twin.reported.insert(property.clone(), reported);
                    self.properties += 1;
                }
            }
        }
    }

    /// Records that the twin's keys now hold every value up to `seq`.
    fn checkpointed(&mut self, seq: u64) {
        self.twin_seq = seq;
        self.twin_seq_written = true;
        self.dirty_records = 0;
        self.checkpointed_at = Some(std::time::Instant::now());
    }

    /// Sets a reported value in the twin (counting a new property).
    fn report(&mut self, device: &DeviceId, property: &PropertyId, sample: &Sample, seq: u64) {
        self.report_device(device, std::iter::once((property, sample)), seq);
    }
}

/// In-memory state of one node.
#[derive(Debug, Default)]
struct NodeState {
    /// Last seq durably stored (flushed).
    durable_seq: u64,
    /// Last seq written to sled (maybe not yet flushed); >= durable_seq.
    applied_seq: u64,
    /// Records in the gap markers written to sled (maybe not yet flushed), like applied_seq.
    lost_records: u64,
    connected: bool,
    last_seen_ms: Option<u64>,
    remote_addr: Option<String>,
    agent_version: Option<String>,
    boot_id: Option<String>,
    /// When the certificate of the current or last connection expires (ms since the epoch).
    svid_expires_ms: Option<u64>,
    backlog: u64,
    config_version: u64,
    properties: usize,
    twins: BTreeMap<DeviceId, Twin>,
    /// The persisted twin: its keys hold every reported value up to this seq; later records
    /// are replayed from the log on open.
    twin_seq: u64,
    /// Whether `twin_seq` is on disk (a node's first commit in a run writes it).
    twin_seq_written: bool,
    /// Records committed after `twin_seq`.
    dirty_records: u64,
    /// When the last checkpoint was written (monotonic).
    checkpointed_at: Option<std::time::Instant>,
    /// What the agent said its devices are (protocol version 2).
    schema: BTreeMap<DeviceId, BTreeMap<PropertyId, PropertySchema>>,
    /// Last desired version assigned.
    downlink_seq: u64,
    /// Last control record stored.
    control_seq: u64,
    /// Bytes of the node's stored record entries.
    history_bytes: u64,
    /// Every record below this seq was pruned by retention (0: none was).
    floor: u64,
    /// The latest records the node's local rules sent (action `hub`), oldest first, at most
    /// [`RULE_OUTPUTS_KEPT`]; in memory only.
    rule_outputs: std::collections::VecDeque<serde_json::Value>,
    /// The time bucket of the node's latest history index entry.
    index_bucket: Option<u64>,
    /// Its twin was read from one key per property (an older hub's layout).
    legacy_twin: bool,
}

/// The payload of a `twin` event, `{"device", "node", "reported": {property: {"quality", "ts",
/// "value"}}}`, serialized only when a subscriber reads it (see [`LazyPayload`]).
#[derive(Debug)]
struct TwinPayload {
    node: NodeId,
    device: DeviceId,
    /// The latest sample of each changed property, in property order.
    samples: Vec<Sample>,
}

#[derive(Serialize)]
struct TwinEvent<'a> {
    device: &'a DeviceId,
    node: &'a NodeId,
    reported: ReportedJson<'a>,
}

/// Changed properties of one device (one sample per property, in property order), as a JSON
/// object.
struct ReportedJson<'a>(&'a [Sample]);

impl Serialize for ReportedJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        #[derive(Serialize)]
        struct One<'a> {
            quality: &'a Quality,
            ts: &'a Timestamp,
            value: &'a Option<Value>,
        }
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for sample in self.0 {
            map.serialize_entry(
                sample.property.as_str(),
                &One {
                    quality: &sample.quality,
                    ts: &sample.ts,
                    value: &sample.value,
                },
            )?;
        }
        map.end()
    }
}

/// Longest JSON of a quality (`"bad: exception 0xff"`), of a number, bool or null value (an
/// `f64` as `ryu` writes it: `-1.7976931348623157e308`), and of a `u64` timestamp.
const QUALITY_JSON_MAX: usize = 21;
const SCALAR_JSON_MAX: usize = 24;
const TS_JSON_MAX: usize = 20;

impl LazyPayload for TwinPayload {
    fn render(&self) -> String {
        let event = TwinEvent {
            device: &self.device,
            node: &self.node,
            reported: ReportedJson(&self.samples),
        };
        serde_json::to_string(&event).unwrap_or_else(|e| {
            // Not reachable with these types (map keys are strings, floats become null);
            // still an event a client can read.
            tracing::error!(node = %self.node, device = %self.device, error = %e, "twin event not serializable");
            serde_json::json!({"device": self.device, "node": self.node, "error": e.to_string()})
                .to_string()
        })
    }

    fn max_len(&self) -> usize {
        // `{"device":"…","node":"…","reported":{…}}`, then per property
        // `"p":{"quality":…,"ts":…,"value":…},` (ids need no escaping: [A-Za-z0-9._-]).
        let entries: usize = self
            .samples
            .iter()
            .map(|s| {
                let value = match &s.value {
                    // Escaped, a character takes at most 6 bytes (`\u001f`).
                    Some(Value::Str(v)) => 2 + 6 * v.len(),
                    _ => SCALAR_JSON_MAX,
                };
                s.property.as_str().len() + 32 + QUALITY_JSON_MAX + TS_JSON_MAX + value
            })
            .sum();
        self.device.as_str().len() + self.node.as_str().len() + 40 + entries
    }
}

/// What the synchronous part of a commit did.
struct Applied {
    /// The commit's ticket: durable once `flushed >= ticket`.
    ticket: u64,
    /// The node's applied seq after this commit.
    target_seq: u64,
    accepted: usize,
    duplicates: usize,
    /// Records newly recorded as lost (gap commits only).
    lost: u64,
}

/// The hub's durable state (see the module docs for layout and invariants).
///
/// Cheap to share: wrap it in an `Arc`. All methods take `&self`.
#[derive(Debug)]
pub struct HubStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: sled::Db,
    tree: sled::Tree,
    /// Serializes the check-and-write part of commits, so sequence checks and writes happen in
    /// one order. Only taken on blocking threads, never across an await.
    commit_lock: Mutex<()>,
    state: RwLock<BTreeMap<NodeId, NodeState>>,
    /// Number of sled batches written by commits (a commit's ticket).
    written: AtomicU64,
    /// All commits with a ticket up to this value are flushed.
    flushed: AtomicU64,
    /// Flushes run one at a time; commits waiting here share the next flush (group commit).
    flush_lock: tokio::sync::Mutex<()>,
    /// Syncs the files sled wrote (its own flush does not reach the disk for a power cut).
    dir_sync: Mutex<DirSync>,
    /// Why the store cannot write, since a write or flush failed (sled keeps an I/O error, such
    /// as a full disk, until the store is reopened); `None` while writes work.
    write_error: Mutex<Option<String>>,
    /// Flushes performed (for tests and metrics).
    flushes: AtomicU64,
    /// The event stream.
    events: crate::events::EventBus,
    /// Woken when a desired value is set for a node (sessions wait on it).
    desired_notify: tokio::sync::watch::Sender<u64>,
    /// How long records are kept, and how much disk each node's may take.
    retention: Retention,
    /// Woken when a commit takes a node over its disk quota.
    over_quota: tokio::sync::Notify,
    /// Wall clock, ms since the epoch (replaced in tests).
    clock: ClockFn,
}

/// [`Clock`] with a `Debug` that says what it is.
#[derive(Clone)]
struct ClockFn(Clock);

impl std::fmt::Debug for ClockFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

impl std::ops::Deref for ClockFn {
    type Target = Clock;
    fn deref(&self) -> &Clock {
        &self.0
    }
}

/// The store's wall clock, ms since the epoch.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// sled's segment size (and write buffer size) of a store created by this version. sled writes
/// any page larger than a quarter of it to a file of its own (a blob: a file created, written,
/// synced and its directory synced, then deleted when the page is rewritten). With sled's
/// default of 512 KiB, the leaf pages that hold a node's recent record entries (tens of
/// kilobytes each) passed that size several times a second at 10,000 records/s; at 4 MiB they
/// stay in the log.
pub const SEGMENT_BYTES: usize = 4 << 20;

/// The segment size a store in `dir` was created with (sled refuses to open it with another),
/// from sled's `conf` file; `None` for a new store.
fn persisted_segment_size(dir: &Path) -> Result<Option<usize>, StoreError> {
    let conf = dir.join("conf");
    // Lines of text followed by a 4-byte CRC.
    let text = match std::fs::read(&conf) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::Sled(e.into())),
    };
    // Lines "key: value"; sled itself reports a malformed file when it opens the store.
    Ok(text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "segment_size")
            .then(|| v.trim().parse().ok())
            .flatten()
    }))
}

impl HubStore {
    /// Opens (or creates) the store in `dir`, with a sled page cache of `cache_bytes`, and
    /// loads node status and twins into memory. Keeps every record (no [`Retention`]).
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<HubStore, StoreError> {
        HubStore::open_with(dir, cache_bytes, Retention::default(), Arc::new(wall_ms))
    }

    /// [`HubStore::open`] with a history retention and a wall clock.
    pub fn open_with(
        dir: &Path,
        cache_bytes: u64,
        retention: Retention,
        clock: Clock,
    ) -> Result<HubStore, StoreError> {
        let segment = persisted_segment_size(dir)?.unwrap_or(SEGMENT_BYTES);
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .segment_size(segment);
        // Wait up to 2 s for the file lock: a handle dropped a moment ago (sled's flusher thread
        // outlives it briefly) or a process that just exited may still hold it.
        let mut tries = 0;
        let db = loop {
            match config.open() {
                Err(sled::Error::Io(e))
                    if tries < 100 && e.to_string().contains("could not acquire lock") =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        let tree = db.open_tree(TREE)?;
        let mut state = load(&tree)?;
        index_unindexed(&tree, &mut state, &retention, clock())?;
        bucket_legacy_twins(&tree, &mut state)?;
        let dir_sync = DirSync::open(dir).map_err(|e| StoreError::Sled(e.into()))?;
        Ok(HubStore {
            inner: Arc::new(Inner {
                db,
                tree,
                commit_lock: Mutex::new(()),
                state: RwLock::new(state),
                written: AtomicU64::new(0),
                flushed: AtomicU64::new(0),
                flush_lock: tokio::sync::Mutex::new(()),
                dir_sync: Mutex::new(dir_sync),
                write_error: Mutex::new(None),
                flushes: AtomicU64::new(0),
                events: crate::events::EventBus::new(crate::events::DEFAULT_CAPACITY, clock()),
                desired_notify: tokio::sync::watch::channel(0).0,
                retention,
                over_quota: tokio::sync::Notify::new(),
                clock: ClockFn(clock),
            }),
        })
    }

    /// The event stream.
    pub fn events(&self) -> &crate::events::EventBus {
        &self.inner.events
    }

    /// A receiver that changes whenever a desired value is set on any node.
    pub fn desired_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.desired_notify.subscribe()
    }

    /// The last control record stored for `node`.
    pub fn control_seq(&self, node: &NodeId) -> u64 {
        self.read().get(node).map_or(0, |n| n.control_seq)
    }

    /// Stores what the agent says a device is (its properties), replacing the previous one.
    pub async fn store_schema(
        &self,
        node: &NodeId,
        schema: &DeviceSchema,
    ) -> Result<(), StoreError> {
        use prost::Message;
        let device = DeviceId::new(schema.device.clone()).map_err(|e| StoreError::Corrupt {
            key: "schema".into(),
            reason: e.to_string(),
        })?;
        let mut props = BTreeMap::new();
        for p in &schema.properties {
            let id = PropertyId::new(p.property.clone()).map_err(|e| StoreError::Corrupt {
                key: format!("schema of {device}"),
                reason: e.to_string(),
            })?;
            props.insert(id, p.clone());
        }
        {
            let state = self.read();
            let others: usize = state.get(node).map_or(0, |n| {
                n.schema
                    .iter()
                    .filter(|(d, _)| **d != device)
                    .map(|(_, p)| p.len())
                    .sum()
            });
            if others + props.len() > MAX_PROPERTIES_PER_NODE {
                return Err(StoreError::TwinFull {
                    node: node.clone(),
                    limit: MAX_PROPERTIES_PER_NODE,
                });
            }
            if state
                .get(node)
                .and_then(|n| n.schema.get(&device))
                .is_some_and(|old| *old == props)
            {
                return Ok(());
            }
        }
        self.tree()
            .insert(schema_key(node, &device), schema.encode_to_vec())?;
        let mut state = self.write();
        let n = state.entry(node.clone()).or_default();
        n.twins.entry(device.clone()).or_default();
        n.schema.insert(device, props);
        Ok(())
    }

    /// Sets desired values of a device (`{property: json}`), checked against the schema the
    /// agent sent: all or nothing. Each property gets the next version of the node; the
    /// change is durable when this returns and is then sent to the node (at once if it is
    /// connected, else when it returns).
    pub async fn set_desired(
        &self,
        node: &NodeId,
        device: &DeviceId,
        values: &serde_json::Map<String, serde_json::Value>,
        by: &str,
    ) -> Result<Vec<DesiredSet>, DesiredError> {
        let now_ms = wall_ms();
        let typed: Vec<(PropertyId, Value)> = {
            let state = self.read();
            let n = state
                .get(node)
                .ok_or_else(|| DesiredError::UnknownNode(node.clone()))?;
            let schema = match n.schema.get(device) {
                Some(s) => s,
                None if n.twins.contains_key(device) => {
                    return Err(DesiredError::Invalid(vec![FieldError {
                        field: String::new(),
                        message: format!(
                            "node {node} has not described device {device} (its agent is older than protocol version 2): desired values cannot be checked"
                        ),
                    }]));
                }
                None => {
                    return Err(DesiredError::UnknownDevice {
                        node: node.clone(),
                        device: device.clone(),
                    });
                }
            };
            check_values(schema, device, values).map_err(DesiredError::Invalid)?
        };
        let _commit = self
            .inner
            .commit_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // What is written (maybe not yet flushed) decides, not the published state: a
        // concurrent commit may have written and not yet published.
        let mut seq = self.written_u64(node, FIELD_DOWNLINK)?;
        let mut batch = sled::Batch::default();
        let mut set = vec![];
        let mut entries = vec![];
        for (property, value) in typed {
            seq += 1;
            let d = Desired {
                value,
                version: seq,
                origin: Origin::Hub,
                set_ms: now_ms,
                by: by.to_owned(),
                applied: None,
            };
            batch.insert(desired_key(node, device, &property), desired_json(&d)?);
            set.push(DesiredSet {
                property: property.clone(),
                version: seq,
            });
            entries.push((property, d));
        }
        batch.insert(meta_key(node, FIELD_DOWNLINK), &seq.to_be_bytes());
        self.tree().apply_batch(batch).map_err(StoreError::from)?;
        drop(_commit);
        let ticket = self.inner.written.fetch_add(1, Ordering::AcqRel) + 1;
        self.flush_through(ticket).await?;
        {
            let mut state = self.write();
            let n = state.entry(node.clone()).or_default();
            n.downlink_seq = n.downlink_seq.max(seq);
            let twin = n.twins.entry(device.clone()).or_default();
            for (property, d) in entries {
                self.inner.events.publish(
                    "desired",
                    serde_json::json!({"node": node, "device": device, "property": property, "desired": d}),
                );
                publish_desired(&mut twin.desired, property, d);
            }
        }
        self.inner.desired_notify.send_modify(|v| *v += 1);
        Ok(set)
    }

    /// The desired values of `node` with a version above `after`, in version order (what a
    /// session sends the node). Superseded versions are not sent: only the latest value of
    /// each property counts.
    pub fn desired_after(&self, node: &NodeId, after: u64) -> Vec<DesiredFrame> {
        let state = self.read();
        let Some(n) = state.get(node) else {
            return vec![];
        };
        let mut out: Vec<DesiredFrame> =
            n.twins
                .iter()
                .flat_map(|(device, twin)| {
                    twin.desired.iter().filter(|(_, d)| d.version > after).map(
                        move |(property, d)| DesiredFrame {
                            device: device.as_str().to_owned(),
                            property: property.as_str().to_owned(),
                            value: Some(value_to_wire(&d.value)),
                            version: d.version,
                            origin: u32::from(d.origin == Origin::Edge),
                            set_ms: d.set_ms,
                        },
                    )
                })
                .collect();
        out.sort_by_key(|d| d.version);
        out
    }

    /// Applies one control record of `node` (an outcome or a local proposal) and stores it
    /// durably with the node's control sequence number. Returns that number.
    ///
    /// Records at or below the stored number are skipped (a resend).
    pub async fn apply_control(&self, node: &NodeId, c: Control) -> Result<u64, StoreError> {
        let now_ms = wall_ms();
        let guard = self
            .inner
            .commit_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // What is written decides (see set_desired): a commit of this node that wrote and has
        // not yet published must not be read as the current state.
        let stored = self.written_u64(node, FIELD_CONTROL)?;
        let mut seq = self.written_u64(node, FIELD_DOWNLINK)?;
        if c.seq <= stored {
            return Ok(stored);
        }
        let mut batch = sled::Batch::default();
        batch.insert(meta_key(node, FIELD_CONTROL), &c.seq.to_be_bytes());
        // What to change in memory after the flush.
        let mut change: Option<(DeviceId, PropertyId, Desired)> = None;
        let mut event: Option<(&'static str, serde_json::Value)> = None;
        match c.kind {
            Some(ControlKind::Status(st)) => {
                if let (Ok(device), Ok(property), Some(outcome)) = (
                    DeviceId::new(st.device.clone()),
                    PropertyId::new(st.property.clone()),
                    Outcome::from_wire(st.outcome, st.exception_code, st.detail.clone()),
                ) {
                    let current = self.written_desired(node, &device, &property)?;
                    // The outcome of the current version, or of a local change (version 0)
                    // that the hub accepted as the current version.
                    if let Some(mut d) = current.filter(|d| {
                        d.version == st.version || (st.version == 0 && d.origin == Origin::Edge)
                    }) {
                        let applied = AppliedOutcome {
                            version: d.version,
                            outcome,
                            ts_ms: st.ts_ms,
                        };
                        d.applied = Some(applied.clone());
                        batch.insert(desired_key(node, &device, &property), desired_json(&d)?);
                        event = Some((
                            "applied",
                            serde_json::json!({"node": node, "device": device, "property": property, "applied": applied}),
                        ));
                        change = Some((device, property, d));
                    }
                }
            }
            Some(ControlKind::Proposal(p)) => {
                if let (Ok(device), Ok(property), Some(value)) = (
                    DeviceId::new(p.device.clone()),
                    PropertyId::new(p.property.clone()),
                    p.value.clone().map(value_from_wire),
                ) {
                    let current = self.written_desired(node, &device, &property)?;
                    // The hub's own value wins when an operator set it after the base.
                    let hub_newer = current
                        .as_ref()
                        .is_some_and(|d| d.origin == Origin::Hub && d.version > p.base_version);
                    seq += 1;
                    let d = match current {
                        Some(cur) if hub_newer => {
                            metrics::counter!("edgesync_hub_proposals_total", "result" => "rejected").increment(1);
                            Desired {
                                version: seq,
                                set_ms: now_ms,
                                applied: None,
                                ..cur
                            }
                        }
                        _ => {
                            metrics::counter!("edgesync_hub_proposals_total", "result" => "accepted").increment(1);
                            Desired {
                                value,
                                version: seq,
                                origin: Origin::Edge,
                                set_ms: p.set_ms,
                                by: "edge".into(),
                                applied: None,
                            }
                        }
                    };
                    batch.insert(desired_key(node, &device, &property), desired_json(&d)?);
                    batch.insert(meta_key(node, FIELD_DOWNLINK), &seq.to_be_bytes());
                    event = Some((
                        "desired",
                        serde_json::json!({"node": node, "device": device, "property": property, "desired": d}),
                    ));
                    change = Some((device, property, d));
                }
            }
            Some(ControlKind::Rule(r)) => {
                event = rule_event(node, &r, &mut batch, self.tree())?;
            }
            None => {}
        }
        self.tree().apply_batch(batch)?;
        drop(guard);
        let ticket = self.inner.written.fetch_add(1, Ordering::AcqRel) + 1;
        self.flush_through(ticket).await?;
        let notify = {
            let mut state = self.write();
            let n = state.entry(node.clone()).or_default();
            n.control_seq = n.control_seq.max(c.seq);
            n.downlink_seq = n.downlink_seq.max(seq);
            let desired_changed = event.as_ref().is_some_and(|(k, _)| *k == "desired");
            if let Some(("rule_output", data)) = &event {
                if n.rule_outputs.len() >= RULE_OUTPUTS_KEPT {
                    n.rule_outputs.pop_front();
                }
                n.rule_outputs.push_back(data.clone());
            }
            if let Some((device, property, d)) = change {
                publish_desired(&mut n.twins.entry(device).or_default().desired, property, d);
            }
            desired_changed
        };
        if let Some((kind, data)) = event {
            self.inner.events.publish(kind, data);
        }
        if notify {
            self.inner.desired_notify.send_modify(|v| *v += 1);
        }
        Ok(c.seq)
    }

    /// The node's control log continues after `upto`: the records up to it are lost for good
    /// (this store is behind what the node had acknowledged, e.g. restored from a snapshot).
    /// Durable when this returns. Returns the node's stored control sequence number.
    pub async fn skip_control(&self, node: &NodeId, upto: u64) -> Result<u64, StoreError> {
        let guard = self
            .inner
            .commit_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let stored = self.written_u64(node, FIELD_CONTROL)?;
        if upto <= stored {
            return Ok(stored);
        }
        self.tree()
            .insert(meta_key(node, FIELD_CONTROL), &upto.to_be_bytes())?;
        drop(guard);
        let ticket = self.inner.written.fetch_add(1, Ordering::AcqRel) + 1;
        self.flush_through(ticket).await?;
        let mut state = self.write();
        let n = state.entry(node.clone()).or_default();
        n.control_seq = n.control_seq.max(upto);
        Ok(n.control_seq)
    }

    /// Reconciles the desired versions with what the node says it took over (`seen`, from its
    /// hello), durably:
    /// - the next version is made higher than `seen`: a store restored from an older snapshot
    ///   would otherwise hand out versions the node already used and ignores;
    /// - an operator's value with a version up to `seen` that the node has not reported on
    ///   (no outcome at all) gets a new version above it and is sent again: it may have been
    ///   numbered by such a store before the node said hello, colliding with a version the
    ///   node used for something else. Without a rollback this only re-sends a value the node
    ///   took over just before the connection broke (the node supersedes its own copy).
    ///
    /// Returns whether the counter moved and how many values were re-sent.
    pub async fn reconcile_downlink(
        &self,
        node: &NodeId,
        seen: u64,
    ) -> Result<(bool, usize), StoreError> {
        let guard = self
            .inner
            .commit_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let written = self.written_u64(node, FIELD_DOWNLINK)?;
        let mut seq = written.max(seen);
        let moved = seen > written;
        let unreported: Vec<(DeviceId, PropertyId)> = self
            .read()
            .get(node)
            .map(|n| {
                n.twins
                    .iter()
                    .flat_map(|(device, t)| {
                        t.desired
                            .iter()
                            .filter(|(_, d)| {
                                d.origin == Origin::Hub && d.applied.is_none() && d.version <= seen
                            })
                            .map(move |(property, _)| (device.clone(), property.clone()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut batch = sled::Batch::default();
        let mut changed = vec![];
        for (device, property) in unreported {
            // What is written decides (see set_desired).
            let Some(mut d) = self.written_desired(node, &device, &property)? else {
                continue;
            };
            if d.origin != Origin::Hub || d.applied.is_some() || d.version > seen {
                continue;
            }
            seq += 1;
            d.version = seq;
            batch.insert(desired_key(node, &device, &property), desired_json(&d)?);
            changed.push((device, property, d));
        }
        if !moved && changed.is_empty() {
            return Ok((false, 0));
        }
        batch.insert(meta_key(node, FIELD_DOWNLINK), &seq.to_be_bytes());
        self.tree().apply_batch(batch)?;
        drop(guard);
        let ticket = self.inner.written.fetch_add(1, Ordering::AcqRel) + 1;
        self.flush_through(ticket).await?;
        let resent = changed.len();
        {
            let mut state = self.write();
            let n = state.entry(node.clone()).or_default();
            n.downlink_seq = n.downlink_seq.max(seq);
            for (device, property, d) in changed {
                self.inner.events.publish(
                    "desired",
                    serde_json::json!({"node": node, "device": device, "property": property, "desired": d}),
                );
                publish_desired(&mut n.twins.entry(device).or_default().desired, property, d);
            }
        }
        if resent > 0 {
            self.inner.desired_notify.send_modify(|v| *v += 1);
        }
        Ok((moved, resent))
    }

    /// Binds `node` to the trust domain `td` on its first connection; returns the domain it is
    /// bound to if that is another one (the connection must then be refused).
    pub fn pin_trust_domain(&self, node: &NodeId, td: &str) -> Result<Option<String>, StoreError> {
        let key = meta_key(node, FIELD_DOMAIN);
        match self
            .tree()
            .compare_and_swap(&key, None as Option<&[u8]>, Some(td.as_bytes()))?
        {
            Ok(()) => Ok(None),
            Err(e) => Ok(e
                .current
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .filter(|cur| cur != td)),
        }
    }

    /// The latest records the node's local rules sent to the hub since it started, oldest first
    /// (at most [`RULE_OUTPUTS_KEPT`]).
    pub fn rule_outputs(&self, node: &NodeId) -> Vec<serde_json::Value> {
        self.inner
            .read()
            .get(node)
            .map(|n| n.rule_outputs.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The node's active alarms (raised by its local rules and not cleared), by rule and device.
    pub fn alarms(&self, node: &NodeId) -> Result<Vec<AlarmRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree().scan_prefix(alarm_prefix(node)) {
            let (k, v) = kv?;
            let a: AlarmRecord = serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason: e.to_string(),
            })?;
            out.push(a);
        }
        Ok(out)
    }

    /// An operator acknowledges an active alarm; `None` if there is no such alarm. Durable when
    /// this returns; publishes `alarm_acked`.
    pub async fn ack_alarm(
        &self,
        node: &NodeId,
        rule: &str,
        device: &str,
        by: &str,
    ) -> Result<Option<AlarmRecord>, StoreError> {
        let key = alarm_key(node, rule, device);
        let acked = {
            let _guard = self
                .inner
                .commit_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let Some(v) = self.tree().get(&key)? else {
                return Ok(None);
            };
            let mut a: AlarmRecord =
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                    key: format!("alarm {rule}/{device}"),
                    reason: e.to_string(),
                })?;
            a.acked_by = Some(by.to_owned());
            a.acked_ms = Some(wall_ms());
            let json = serde_json::to_vec(&a).map_err(|e| StoreError::Corrupt {
                key: "alarm".into(),
                reason: e.to_string(),
            })?;
            self.tree().insert(key, json)?;
            a
        };
        let ticket = self.inner.written.fetch_add(1, Ordering::AcqRel) + 1;
        self.flush_through(ticket).await?;
        self.inner.events.publish(
            "alarm_acked",
            serde_json::json!({"node": node, "alarm": acked}),
        );
        Ok(Some(acked))
    }

    /// Records the id of the node's outbox; returns the previous one if it was different
    /// (the node's data directory was lost or replaced). Durable at the next flush.
    pub fn note_store_id(&self, node: &NodeId, id: &str) -> Result<Option<String>, StoreError> {
        if id.is_empty() {
            return Ok(None);
        }
        let key = meta_key(node, FIELD_STORE);
        let old = self.tree().insert(&key, id.as_bytes())?;
        Ok(old
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .filter(|o| o != id))
    }

    /// Whether the store can serve: its last write or flush did not fail, and it answers reads
    /// (a cheap read through sled's page cache).
    pub fn is_ready(&self) -> bool {
        self.write_error().is_none() && self.inner.tree.get([META]).is_ok()
    }

    /// Why the store cannot write (a disk full, an I/O error), if its last write or flush
    /// failed. sled keeps such an error until the store is reopened, so this stays set until
    /// the hub restarts.
    pub fn write_error(&self) -> Option<String> {
        self.inner
            .write_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records the outcome of a write for [`HubStore::is_ready`]: a sled or I/O failure makes
    /// the store unready (logged once); with `durable`, a success (a flush) after one makes it
    /// ready again.
    fn note_write<T>(&self, r: Result<T, StoreError>, durable: bool) -> Result<T, StoreError> {
        let mut slot = self
            .inner
            .write_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match &r {
            Err(e @ (StoreError::Sled(_) | StoreError::Task(_))) => {
                if slot.is_none() {
                    tracing::error!(error = %e, "hub store cannot write; not ready until restarted");
                }
                *slot = Some(e.to_string());
            }
            Ok(_) if durable && slot.is_some() => {
                tracing::info!("hub store writes again");
                *slot = None;
            }
            _ => {}
        }
        r
    }

    /// The last uplink sequence number durably stored for `node` (0 = none).
    pub fn stored_seq(&self, node: &NodeId) -> Result<u64, StoreError> {
        Ok(self.inner.read().get(node).map_or(0, |n| n.durable_seq))
    }

    /// Stores an uplink batch: record `i` has sequence number `first_seq + i`.
    ///
    /// Records already stored are skipped and counted as duplicates. A batch starting after the
    /// next expected sequence number is refused with [`StoreError::Gap`], storing nothing. The
    /// new records are written as one entry together with the node's sequence number and twin,
    /// atomically, then flushed; the outcome's `stored_seq` is durable when this returns.
    ///
    /// The sled write runs on a blocking thread (a sled batch waits for any fsync in progress),
    /// so the caller's runtime thread is never blocked. Concurrent commits share flushes: one
    /// flush runs at a time and covers every commit written before it started.
    ///
    /// Cancellation: if the future is dropped, a write already started completes (memory and
    /// disk stay consistent) and becomes durable with the next flush; `stored_seq` does not
    /// report it until then.
    pub async fn commit_batch(
        &self,
        node: &NodeId,
        first_seq: u64,
        records: &[Sample],
    ) -> Result<CommitOutcome, StoreError> {
        self.commit_owned(node, first_seq, records.to_vec()).await
    }

    /// [`commit_batch`](Self::commit_batch) of records the caller hands over (no copy).
    pub async fn commit_owned(
        &self,
        node: &NodeId,
        first_seq: u64,
        records: Vec<Sample>,
    ) -> Result<CommitOutcome, StoreError> {
        let started = tokio::time::Instant::now();
        let result = self.commit_inner(node, first_seq, records).await;
        match &result {
            Ok(out) => telemetry::batch_committed(
                out.accepted,
                out.duplicates,
                started.elapsed().as_secs_f64(),
            ),
            Err(e) => telemetry::commit_failed(node, e),
        }
        result
    }

    async fn commit_inner(
        &self,
        node: &NodeId,
        first_seq: u64,
        records: Vec<Sample>,
    ) -> Result<CommitOutcome, StoreError> {
        if records.is_empty() {
            return Ok(CommitOutcome {
                stored_seq: self.stored_seq(node)?,
                accepted: 0,
                duplicates: 0,
            });
        }
        let inner = Arc::clone(&self.inner);
        let owned_node = node.clone();
        let applied = if let Ok(leader) = self.inner.flush_lock.try_lock() {
            // No flush in flight: write, then flush, in one trip to a blocking thread (one
            // hand-off instead of two). Otherwise the write joins the next flush (below).
            let joined = tokio::task::spawn_blocking(move || {
                let applied = inner.apply(&owned_node, first_seq, &records);
                let flushed = match &applied {
                    Ok(a) if inner.flushed.load(Ordering::Acquire) < a.ticket => {
                        // Every commit with a ticket up to `upto` finished its write already.
                        let upto = inner.written.load(Ordering::Acquire);
                        Some(inner.flush_and_sync().map(|()| upto))
                    }
                    _ => None,
                };
                (applied, flushed)
            })
            .await;
            let (applied, flushed) = match joined {
                Ok(r) => r,
                Err(e) => return self.note_write(Err(StoreError::Task(e.to_string())), false),
            };
            let applied = self.note_write(applied, false)?;
            if let Some(r) = flushed {
                let upto = self.note_write(r, true)?;
                self.inner.flushes.fetch_add(1, Ordering::Relaxed);
                self.inner.flushed.fetch_max(upto, Ordering::AcqRel);
            }
            drop(leader);
            applied
        } else {
            self.note_write(
                tokio::task::spawn_blocking(move || inner.apply(&owned_node, first_seq, &records))
                    .await
                    .map_err(|e| StoreError::Task(e.to_string()))
                    .and_then(|r| r),
                false,
            )?
        };
        let stored_seq = self.make_durable(node, &applied).await?;
        Ok(CommitOutcome {
            stored_seq,
            accepted: applied.accepted,
            duplicates: applied.duplicates,
        })
    }

    /// Records that the node's records `from..=to` are lost for good (the edge dropped them):
    /// stores a gap marker and advances the node's sequence number to `to`, atomically, then
    /// flushes. Returns the node's durable sequence number and how many records were newly
    /// recorded as lost; those are counted in `edgesync_hub_gap_records_total{node}`.
    ///
    /// The part of the range already stored is skipped (a resent gap adds nothing); a range
    /// starting after the next expected sequence number is refused with [`StoreError::Gap`].
    pub async fn commit_gap(
        &self,
        node: &NodeId,
        from: u64,
        to: u64,
    ) -> Result<GapOutcome, StoreError> {
        let result = self.commit_gap_inner(node, from, to).await;
        match &result {
            Ok(out) => telemetry::gap_committed(node, from, to, out.new_records),
            Err(e) => telemetry::commit_failed(node, e),
        }
        result
    }

    async fn commit_gap_inner(
        &self,
        node: &NodeId,
        from: u64,
        to: u64,
    ) -> Result<GapOutcome, StoreError> {
        let inner = Arc::clone(&self.inner);
        let owned_node = node.clone();
        let applied = self.note_write(
            tokio::task::spawn_blocking(move || inner.apply_gap(&owned_node, from, to))
                .await
                .map_err(|e| StoreError::Task(e.to_string()))
                .and_then(|r| r),
            false,
        )?;
        let stored_seq = self.make_durable(node, &applied).await?;
        Ok(GapOutcome {
            stored_seq,
            new_records: applied.lost,
        })
    }

    /// Flushes the commit (unless already durable) and marks the node's seq durable.
    async fn make_durable(&self, node: &NodeId, applied: &Applied) -> Result<u64, StoreError> {
        let durable = self.inner.read().get(node).map_or(0, |n| n.durable_seq);
        if durable >= applied.target_seq {
            return Ok(durable);
        }
        self.flush_through(applied.ticket).await?;
        let mut state = self.inner.write();
        let n = state.entry(node.clone()).or_default();
        n.durable_seq = n.durable_seq.max(applied.target_seq);
        Ok(n.durable_seq)
    }

    /// Makes everything written so far durable, with the twin checkpointed so that the next
    /// open replays nothing (for shutdown; commits flush on their own).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let inner = Arc::clone(&self.inner);
        let r = tokio::task::spawn_blocking(move || inner.checkpoint_all())
            .await
            .map_err(|e| StoreError::Task(e.to_string()))
            .and_then(|r| r);
        self.note_write(r, false)?;
        // Snapshot before flushing: every seq applied now is covered by the flush below.
        let applied: Vec<(NodeId, u64)> = self
            .inner
            .read()
            .iter()
            .map(|(node, n)| (node.clone(), n.applied_seq))
            .collect();
        let upto = self.inner.written.load(Ordering::Acquire);
        let _leader = self.inner.flush_lock.lock().await;
        self.flush_locked(upto).await?;
        let mut state = self.inner.write();
        for (node, seq) in applied {
            if let Some(n) = state.get_mut(&node) {
                n.durable_seq = n.durable_seq.max(seq);
            }
        }
        Ok(())
    }

    /// Returns once every commit with a ticket up to `ticket` is flushed (group commit).
    async fn flush_through(&self, ticket: u64) -> Result<(), StoreError> {
        if self.inner.flushed.load(Ordering::Acquire) >= ticket {
            return Ok(());
        }
        let _leader = self.inner.flush_lock.lock().await;
        // A flush that ran while we waited may have covered us.
        if self.inner.flushed.load(Ordering::Acquire) >= ticket {
            return Ok(());
        }
        // Every commit with a ticket up to `upto` finished its write before this flush starts.
        let upto = self.inner.written.load(Ordering::Acquire);
        self.flush_locked(upto).await
    }

    /// Flushes (caller holds `flush_lock`), then records that tickets up to `upto` are durable.
    async fn flush_locked(&self, upto: u64) -> Result<(), StoreError> {
        let r = self.flush_locked_inner(upto).await;
        self.note_write(r, true)
    }

    async fn flush_locked_inner(&self, upto: u64) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        // A blocking thread, not sled's flush_async: sled 0.34 runs flush_async on its own small
        // IO pool, which deadlocks when flushers fill the pool while a batch waits for the
        // flush's read lock (the log write the flush waits for is queued on that same pool).
        // sled's flush ends with sync_file_range; the fdatasync that makes it survive a power
        // cut follows (see `edgesync_protocol::durable`).
        tokio::task::spawn_blocking(move || inner.flush_and_sync())
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        self.inner.flushes.fetch_add(1, Ordering::Relaxed);
        self.inner.flushed.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }

    /// Flushes performed by commits since the store was opened.
    pub fn flush_count(&self) -> u64 {
        self.inner.flushes.load(Ordering::Relaxed)
    }
}

impl Inner {
    /// The synchronous part of a commit: checks sequence numbers, writes one sled batch and
    /// updates memory.
    /// sled's flush, then what makes it survive a power cut (blocking; see
    /// `edgesync_protocol::durable`).
    fn flush_and_sync(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        self.dir_sync
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .sync()
            .map_err(|e| StoreError::Sled(e.into()))?;
        Ok(())
    }

    fn apply(
        &self,
        node: &NodeId,
        first_seq: u64,
        records: &[Sample],
    ) -> Result<Applied, StoreError> {
        let _commit = self
            .commit_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (applied_seq, properties) = self
            .read()
            .get(node)
            .map_or((0, 0), |n| (n.applied_seq, n.properties));
        let len = records.len();
        let last_seq = u64::try_from(len.saturating_sub(1))
            .ok()
            .and_then(|n| first_seq.checked_add(n));
        let Some(last_seq) = last_seq.filter(|_| first_seq > 0 && len > 0) else {
            return Err(StoreError::InvalidSeq { first_seq, len });
        };
        let expected = applied_seq + 1;
        if first_seq > expected {
            return Err(StoreError::Gap {
                expected,
                got: first_seq,
            });
        }
        if last_seq <= applied_seq {
            // Already written; durable once every write so far is flushed.
            return Ok(Applied {
                ticket: self.written.load(Ordering::Acquire),
                target_seq: applied_seq,
                accepted: 0,
                duplicates: len,
                lost: 0,
            });
        }
        // first_seq <= expected <= last_seq, so skip < len.
        let skip = usize::try_from(expected - first_seq)
            .unwrap_or(len)
            .min(len);
        let new = &records[skip..];

        // Latest sample per device and property among the new records, in sequence order
        // (by device first: a node has few devices, so ids are compared less often).
        let mut latest: Latest<'_> = BTreeMap::new();
        for s in new {
            latest.entry(&s.device).or_default().insert(&s.property, s);
        }
        let mut batch = sled::Batch::default();
        let (last_seen, checkpoint, index_bucket, history_bytes) = {
            let state = self.read();
            let twins = state.get(node).map(|n| &n.twins);
            // The properties this commit adds to the twin, counted only when the commit could
            // exceed the limit at all (one lookup per property saved in the common case).
            let at_most: usize = latest.values().map(BTreeMap::len).sum();
            let added = || -> usize {
                latest
                    .iter()
                    .map(|(d, props)| match twins.and_then(|t| t.get(*d)) {
                        None => props.len(),
                        Some(t) => props
                            .keys()
                            .filter(|p| !t.reported.contains_key(**p))
                            .count(),
                    })
                    .sum()
            };
            if properties + at_most > MAX_PROPERTIES_PER_NODE
                && properties + added() > MAX_PROPERTIES_PER_NODE
            {
                return Err(StoreError::TwinFull {
                    node: node.clone(),
                    limit: MAX_PROPERTIES_PER_NODE,
                });
            }
            let n = state.get(node);
            let checkpoint = n.is_none_or(|n| n.checkpoint_due(new.len() as u64));
            if checkpoint {
                // The twin's keys brought up to `last_seq`, in the same atomic batch: the
                // buckets of the values changed since the last checkpoint or by this commit.
                match n {
                    Some(n) => n.write_buckets(node, &mut batch, &latest, false),
                    None => NodeState::default().write_buckets(node, &mut batch, &latest, false),
                }
                batch.insert(meta_key(node, FIELD_TWIN), &last_seq.to_be_bytes());
            }
            let (seen, bucket, bytes) = n.map_or((None, None, 0), |n| {
                (n.last_seen_ms, n.index_bucket, n.history_bytes)
            });
            (seen, checkpoint, bucket, bytes)
        };

        let entry = encode_samples(new);
        let history_bytes = history_bytes.saturating_add(entry.len() as u64);
        let bucket = self.index_commit(node, index_bucket, expected, &mut batch);
        if checkpoint || index_bucket != Some(bucket) {
            batch.insert(record_key(node, expected), entry);
            write_progress(&mut batch, node, last_seq, history_bytes, last_seen);
            self.tree.apply_batch(batch)?;
        } else {
            // Between checkpoints a commit writes its record entry alone: one key is atomic by
            // itself, and a sled batch costs two more log writes (sled seals its write buffer
            // before and after a batch's manifest), each a job for its IO threads. The node's
            // sequence number and byte count on disk catch up at the next checkpoint, and
            // `catch_up` counts the entries written after them when the store opens.
            self.tree.insert(record_key(node, expected), entry)?;
        }
        // Before the ticket is taken: any flush that covers this batch starts after this line
        // (the durability test checks acks against it with strace).
        tracing::trace!(target: DURABILITY_TARGET, "written upto={last_seq} node={node}");
        let ticket = self.written.fetch_add(1, Ordering::AcqRel) + 1;

        // One `twin` event per device (per TWIN_EVENT_PROPERTIES of its properties, so that no
        // event is large), serialized if and when a subscriber reads it.
        for (device, props) in &latest {
            let mut rest = props.values();
            loop {
                let samples: Vec<Sample> = rest
                    .by_ref()
                    .take(TWIN_EVENT_PROPERTIES)
                    .map(|s| (*s).clone())
                    .collect();
                if samples.is_empty() {
                    break;
                }
                self.events.publish_lazy(
                    "twin",
                    Arc::new(TwinPayload {
                        node: node.clone(),
                        device: (*device).clone(),
                        samples,
                    }),
                );
            }
        }
        let mut state = self.write();
        let n = state.entry(node.clone()).or_default();
        n.applied_seq = last_seq;
        n.history_bytes = history_bytes;
        n.index_bucket = Some(bucket);
        if self
            .retention
            .node_max_bytes
            .is_some_and(|q| history_bytes > q)
        {
            self.over_quota.notify_one();
        }
        if checkpoint {
            n.checkpointed(last_seq);
        } else {
            n.dirty_records += new.len() as u64;
        }
        for (device, props) in latest {
            n.report_device(device, props, last_seq);
        }
        Ok(Applied {
            ticket,
            target_seq: last_seq,
            accepted: new.len(),
            duplicates: skip,
            lost: 0,
        })
    }

    /// Writes a twin checkpoint for every node with values changed since its last one.
    fn checkpoint_all(&self) -> Result<(), StoreError> {
        let _commit = self
            .commit_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut batch = sled::Batch::default();
        let mut done = vec![];
        for (node, n) in self.read().iter() {
            if n.twin_seq >= n.applied_seq {
                continue;
            }
            n.write_buckets(node, &mut batch, &BTreeMap::new(), false);
            batch.insert(meta_key(node, FIELD_TWIN), &n.applied_seq.to_be_bytes());
            write_progress(
                &mut batch,
                node,
                n.applied_seq,
                n.history_bytes,
                n.last_seen_ms,
            );
            done.push((node.clone(), n.applied_seq));
        }
        if done.is_empty() {
            return Ok(());
        }
        self.tree.apply_batch(batch)?;
        self.written.fetch_add(1, Ordering::AcqRel);
        let mut state = self.write();
        for (node, seq) in done {
            if let Some(n) = state.get_mut(&node) {
                n.checkpointed(seq);
            }
        }
        Ok(())
    }

    /// The synchronous part of a gap commit.
    fn apply_gap(&self, node: &NodeId, from: u64, to: u64) -> Result<Applied, StoreError> {
        let _commit = self
            .commit_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if from == 0 || to < from {
            return Err(StoreError::InvalidGap { from, to });
        }
        let applied_seq = self.read().get(node).map_or(0, |n| n.applied_seq);
        let expected = applied_seq + 1;
        if from > expected {
            return Err(StoreError::Gap {
                expected,
                got: from,
            });
        }
        if to <= applied_seq {
            // Already recorded (a resent gap): nothing new is lost.
            return Ok(Applied {
                ticket: self.written.load(Ordering::Acquire),
                target_seq: applied_seq,
                accepted: 0,
                duplicates: 0,
                lost: 0,
            });
        }
        // The marker covers expected..=to: the records of the range not stored yet.
        let lost = to - applied_seq;
        let mut batch = sled::Batch::default();
        batch.insert(gap_key(node, expected), &to.to_be_bytes());
        let (index_bucket, history_bytes, last_seen) =
            self.read().get(node).map_or((None, 0, None), |n| {
                (n.index_bucket, n.history_bytes, n.last_seen_ms)
            });
        // With the byte count: commits since the last checkpoint may not have written it.
        write_progress(&mut batch, node, to, history_bytes, last_seen);
        let bucket = self.index_commit(node, index_bucket, expected, &mut batch);
        self.tree.apply_batch(batch)?;
        tracing::trace!(target: DURABILITY_TARGET, "written upto={to} node={node}");
        let ticket = self.written.fetch_add(1, Ordering::AcqRel) + 1;
        {
            let mut state = self.write();
            let n = state.entry(node.clone()).or_default();
            n.applied_seq = to;
            n.lost_records = n.lost_records.saturating_add(lost);
            n.index_bucket = Some(bucket);
        }
        Ok(Applied {
            ticket,
            target_seq: to,
            accepted: 0,
            duplicates: 0,
            lost,
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<NodeId, NodeState>> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<NodeId, NodeState>> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl HubStore {
    /// Prunes every node's history down to what the [`Retention`] allows; returns what was
    /// removed. Runs on a blocking thread, in steps that let commits in between.
    pub async fn prune_history(&self) -> Result<Pruned, StoreError> {
        let inner = Arc::clone(&self.inner);
        let r = tokio::task::spawn_blocking(move || {
            let mut total = Pruned::default();
            for node in inner.prune_candidates() {
                let p = inner.prune_node(&node)?;
                if p.batches > 0 {
                    tracing::debug!(%node, records = p.records, bytes = p.bytes, "history pruned");
                }
                total.batches += p.batches;
                total.records += p.records;
                total.bytes += p.bytes;
            }
            Ok(total)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))
        .and_then(|r| r);
        let pruned = self.note_write(r, false)?;
        telemetry::history_pruned(&pruned);
        Ok(pruned)
    }

    /// Applies the [`Retention`] until `cancel`: at every sweep interval, and at once when a
    /// commit takes a node over its quota. Returns at once when nothing is to be pruned.
    pub async fn run_retention(&self, cancel: tokio_util::sync::CancellationToken) {
        let r = self.inner.retention;
        if r.max_age.is_none() && r.node_max_bytes.is_none() {
            return;
        }
        loop {
            if let Err(e) = self.prune_history().await {
                tracing::error!(error = %e, "history retention failed");
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(r.sweep_interval()) => {}
                _ = self.inner.over_quota.notified() => {}
            }
        }
    }

    /// Up to `limit` stored records of `node` from `from_seq` on, in order, and the seq to ask
    /// for next (`None` when these are the last stored ones).
    pub fn records_page(
        &self,
        node: &NodeId,
        from_seq: u64,
        limit: usize,
    ) -> Result<RecordsPage, StoreError> {
        let mut out = Vec::new();
        let mut next = None;
        scan_records_until(self.tree(), node, from_seq, |seq, sample| {
            if out.len() == limit {
                next = Some(seq);
                return false;
            }
            out.push((seq, sample));
            true
        })?;
        Ok((out, next))
    }

    /// Every stored record of `node` with sequence number `>= from_seq`, in order.
    pub fn records(&self, node: &NodeId, from_seq: u64) -> Result<Vec<(u64, Sample)>, StoreError> {
        let mut out = Vec::new();
        scan_records(self.tree(), node, from_seq, |seq, sample| {
            out.push((seq, sample))
        })?;
        Ok(out)
    }

    /// The gaps recorded for `node` (ranges of lost records, inclusive), in order.
    ///
    /// Reads sled (one prefix scan), not memory: run it off the async runtime's threads when
    /// a node may have many gaps. Shows gaps as written, maybe a few milliseconds before their
    /// flush completes, like [`HubStore::node`]'s `lost_records`.
    pub fn gaps(&self, node: &NodeId) -> Result<Vec<(u64, u64)>, StoreError> {
        let mut prefix = vec![GAP];
        prefix.extend_from_slice(&node_prefix(node));
        let mut out = Vec::new();
        for entry in self.tree().scan_prefix(&prefix) {
            let (key, value) = entry?;
            let from = be_u64(&key, &key[prefix.len()..])?;
            let to = be_u64(&key, &value)?;
            out.push((from, to));
        }
        Ok(out)
    }

    /// Records that a session with `node` is established (persists the agent version and the
    /// time; durable with the next flush).
    ///
    /// Writes to sled: may wait briefly (at most about one fsync) while a commit is queued
    /// behind a flush.
    pub fn node_connected(
        &self,
        node: &NodeId,
        info: ConnInfo,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let tree = self.tree();
        tree.insert(meta_key(node, FIELD_AGENT), info.agent_version.as_bytes())?;
        tree.insert(meta_key(node, FIELD_SEEN), &now_ms.to_be_bytes())?;
        self.inner.events.publish(
            "node_connected",
            serde_json::json!({"node": node, "remote_addr": info.remote_addr, "agent_version": info.agent_version, "ts_ms": now_ms}),
        );
        let mut state = self.write();
        let n = state.entry(node.clone()).or_default();
        n.connected = true;
        n.last_seen_ms = n.last_seen_ms.max(Some(now_ms));
        n.remote_addr = Some(info.remote_addr);
        n.agent_version = Some(info.agent_version);
        n.boot_id = Some(info.boot_id);
        n.config_version = info.config_version;
        n.svid_expires_ms = info.svid_expires_ms;
        Ok(())
    }

    /// Records that the session with `node` ended (persists the time; durable with the next
    /// flush). Writes to sled like [`node_connected`](Self::node_connected).
    pub fn node_disconnected(&self, node: &NodeId, now_ms: u64) -> Result<(), StoreError> {
        self.tree()
            .insert(meta_key(node, FIELD_SEEN), &now_ms.to_be_bytes())?;
        self.inner.events.publish(
            "node_disconnected",
            serde_json::json!({"node": node, "ts_ms": now_ms}),
        );
        let mut state = self.write();
        let n = state.entry(node.clone()).or_default();
        n.connected = false;
        n.last_seen_ms = n.last_seen_ms.max(Some(now_ms));
        Ok(())
    }

    /// Records that `node` was heard from, with the backlog its agent reported.
    ///
    /// Memory only (cheap enough for every frame): the time is persisted with the node's next
    /// commit or disconnect. Never fails today; fallible so that persisting can change.
    pub fn node_seen(&self, node: &NodeId, now_ms: u64, backlog: u64) -> Result<(), StoreError> {
        let mut state = self.write();
        let n = state.entry(node.clone()).or_default();
        n.last_seen_ms = n.last_seen_ms.max(Some(now_ms));
        n.backlog = backlog;
        Ok(())
    }

    /// Status of every known node, ordered by node id.
    pub fn nodes(&self) -> Vec<NodeStatus> {
        self.read()
            .iter()
            .map(|(node, n)| status(node, n))
            .collect()
    }

    /// Status of one node, if known.
    pub fn node(&self, node: &NodeId) -> Option<NodeStatus> {
        self.read().get(node).map(|n| status(node, n))
    }

    /// The devices in the twin of `node` (empty for an unknown node), ordered by id.
    pub fn devices(&self, node: &NodeId) -> Vec<DeviceId> {
        self.read()
            .get(node)
            .map(|n| n.twins.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The twin of one device, if the device is known.
    pub fn twin(&self, node: &NodeId, device: &DeviceId) -> Option<Twin> {
        self.read().get(node)?.twins.get(device).cloned()
    }

    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<NodeId, NodeState>> {
        self.inner.read()
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<NodeId, NodeState>> {
        self.inner.write()
    }

    /// A node's counter as written to sled (maybe not yet flushed; 0 if never written). Read
    /// under the commit lock, it is the value the next commit must build on.
    fn written_u64(&self, node: &NodeId, field: &[u8]) -> Result<u64, StoreError> {
        let key = meta_key(node, field);
        match self.tree().get(&key)? {
            Some(v) => be_u64(&key, &v),
            None => Ok(0),
        }
    }

    /// A property's desired value as written to sled (maybe not yet flushed).
    fn written_desired(
        &self,
        node: &NodeId,
        device: &DeviceId,
        property: &PropertyId,
    ) -> Result<Option<Desired>, StoreError> {
        let key = desired_key(node, device, property);
        let Some(bytes) = self.tree().get(&key)? else {
            return Ok(None);
        };
        let mut d: Desired =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(&key, e.to_string()))?;
        if let Some(p) = self
            .read()
            .get(node)
            .and_then(|n| n.schema.get(device))
            .and_then(|s| s.get(property))
        {
            d.value = typed(&p.kind, d.value);
        }
        Ok(Some(d))
    }

    fn tree(&self) -> &sled::Tree {
        &self.inner.tree
    }
}

fn status(node: &NodeId, n: &NodeState) -> NodeStatus {
    NodeStatus {
        node: node.clone(),
        connected: n.connected,
        last_seen_ms: n.last_seen_ms,
        remote_addr: n.remote_addr.clone(),
        agent_version: n.agent_version.clone(),
        boot_id: n.boot_id.clone(),
        uplink_seq: n.durable_seq,
        lost_records: n.lost_records,
        backlog: n.backlog,
        config_version: n.config_version,
        devices: n.twins.len(),
        history_bytes: n.history_bytes,
        history_from: n.floor.max(1),
        svid_expires_ms: n.svid_expires_ms,
    }
}

/// Rewrites the twin of every node read from one key per property (an older hub's layout) as
/// buckets, checkpointed at the node's last seq (the twin in memory holds everything up to it),
/// and removes the old keys, in one atomic batch.
fn bucket_legacy_twins(
    tree: &sled::Tree,
    state: &mut BTreeMap<NodeId, NodeState>,
) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    let mut done = vec![];
    for (node, n) in state.iter() {
        if !n.legacy_twin {
            continue;
        }
        n.write_buckets(node, &mut batch, &BTreeMap::new(), true);
        let mut prefix = vec![TWIN];
        prefix.extend_from_slice(&node_prefix(node));
        for entry in tree.scan_prefix(&prefix) {
            batch.remove(entry?.0);
        }
        batch.insert(meta_key(node, FIELD_TWIN), &n.applied_seq.to_be_bytes());
        done.push(node.clone());
    }
    if done.is_empty() {
        return Ok(());
    }
    tree.apply_batch(batch)?;
    tree.flush()?;
    for node in done {
        if let Some(n) = state.get_mut(&node) {
            n.legacy_twin = false;
            let seq = n.applied_seq;
            n.checkpointed(seq);
        }
    }
    Ok(())
}

/// Gives the records of a store written before history retention existed (records but no
/// index entry) an index entry for the current bucket, so their age counts from now, and
/// counts their bytes.
fn index_unindexed(
    tree: &sled::Tree,
    state: &mut BTreeMap<NodeId, NodeState>,
    retention: &Retention,
    now_ms: u64,
) -> Result<(), StoreError> {
    let bucket = now_ms - now_ms % retention.bucket_ms();
    let mut batch = sled::Batch::default();
    let mut any = false;
    for (node, n) in state.iter_mut() {
        if n.index_bucket.is_some() || n.applied_seq == 0 {
            continue;
        }
        let prefix = node_prefix(node);
        let mut bytes = 0u64;
        for entry in tree.scan_prefix(&prefix) {
            bytes = bytes.saturating_add(entry?.1.len() as u64);
        }
        n.history_bytes = bytes;
        n.index_bucket = Some(bucket);
        batch.insert(meta_key(node, FIELD_BYTES), &bytes.to_be_bytes());
        batch.insert(
            retention::index_key(node, bucket),
            &n.floor.max(1).to_be_bytes(),
        );
        any = true;
    }
    if any {
        tree.apply_batch(batch)?;
    }
    Ok(())
}

/// Adds a node's progress to `batch`: its last sequence number written, the bytes of its record
/// entries (both as of the same commit) and, if known, when it was last seen.
fn write_progress(
    batch: &mut sled::Batch,
    node: &NodeId,
    seq: u64,
    history_bytes: u64,
    last_seen_ms: Option<u64>,
) {
    batch.insert(meta_key(node, FIELD_SEQ), &seq.to_be_bytes());
    batch.insert(meta_key(node, FIELD_BYTES), &history_bytes.to_be_bytes());
    if let Some(seen) = last_seen_ms {
        // node_seen only updates memory; it is persisted with the node's progress.
        batch.insert(meta_key(node, FIELD_SEEN), &seen.to_be_bytes());
    }
}

/// Brings each node's sequence number and byte count up to the record entries written after
/// the ones on disk (commits between checkpoints write their entry alone), and persists them.
/// The entries must continue the node's sequence without a hole; an entry that does not (which
/// only a store edited behind the hub's back can hold: sled recovers a prefix of its log) was
/// never acknowledged, so it is removed and the agent sends its records again.
fn catch_up(tree: &sled::Tree, state: &mut BTreeMap<NodeId, NodeState>) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    let mut any = false;
    for (node, n) in state.iter_mut() {
        let mut next = n.applied_seq + 1;
        let mut bytes = 0u64;
        for entry in record_entries(tree, node, record_key(node, next)) {
            let (first, key, value) = entry?;
            if first != next {
                tracing::warn!(%node, expected = next, found = first, "store: removing a record entry after a hole in the sequence (never acknowledged)");
                batch.remove(key);
                any = true;
                continue;
            }
            let count = count_samples(&value).map_err(|e| corrupt_frame(&key, &e))?;
            if count == 0 {
                return Err(corrupt(&key, "record entry without records"));
            }
            next += count as u64;
            bytes = bytes.saturating_add(value.len() as u64);
        }
        if next > n.applied_seq + 1 {
            tracing::debug!(%node, from = n.applied_seq + 1, to = next - 1, "store: sequence caught up from record entries");
            n.applied_seq = next - 1;
            n.durable_seq = next - 1;
            n.history_bytes = n.history_bytes.saturating_add(bytes);
            write_progress(&mut batch, node, n.applied_seq, n.history_bytes, None);
            any = true;
        }
    }
    if any {
        tree.apply_batch(batch)?;
    }
    Ok(())
}

/// The record entries of `node` from key `begin` on, in order: first sequence number, key and
/// value of each.
fn record_entries<'a>(
    tree: &'a sled::Tree,
    node: &NodeId,
    begin: Vec<u8>,
) -> impl Iterator<Item = Result<(u64, sled::IVec, sled::IVec), StoreError>> + 'a {
    let prefix = node_prefix(node);
    tree.range(begin..).map_while(move |entry| {
        let (key, value) = match entry {
            Ok(kv) => kv,
            Err(e) => return Some(Err(e.into())),
        };
        let first =
            <[u8; 8]>::try_from(key.strip_prefix(prefix.as_slice())?).map(u64::from_be_bytes);
        Some(match first {
            Ok(first) => Ok((first, key, value)),
            Err(_) => Err(corrupt(
                &key,
                "record key without an 8-byte sequence number",
            )),
        })
    })
}

/// Calls `f` with every stored record of `node` with sequence number `>= from_seq`, in order.
fn scan_records(
    tree: &sled::Tree,
    node: &NodeId,
    from_seq: u64,
    mut f: impl FnMut(u64, Sample),
) -> Result<(), StoreError> {
    scan_records_until(tree, node, from_seq, |seq, sample| {
        f(seq, sample);
        true
    })
}

/// Like [`scan_records`], stopping when `f` returns false.
fn scan_records_until(
    tree: &sled::Tree,
    node: &NodeId,
    from_seq: u64,
    mut f: impl FnMut(u64, Sample) -> bool,
) -> Result<(), StoreError> {
    let prefix = node_prefix(node);
    // The entry holding `from_seq` starts at or before it.
    let begin = match tree
        .range(prefix.clone()..=record_key(node, from_seq))
        .next_back()
    {
        Some(entry) => entry?.0.to_vec(),
        None => prefix.clone(),
    };
    for entry in record_entries(tree, node, begin) {
        let (first, key, value) = entry?;
        let samples = decode_samples(&value).map_err(|e| corrupt_frame(&key, &e))?;
        for (seq, sample) in (first..).zip(samples) {
            if seq >= from_seq && !f(seq, sample) {
                return Ok(());
            }
        }
    }
    Ok(())
}

fn node_prefix(node: &NodeId) -> Vec<u8> {
    let mut k = Vec::with_capacity(node.as_str().len() + 9);
    k.extend_from_slice(node.as_str().as_bytes());
    k.push(SEP);
    k
}

fn record_key(node: &NodeId, first_seq: u64) -> Vec<u8> {
    let mut k = node_prefix(node);
    k.extend_from_slice(&first_seq.to_be_bytes());
    k
}

fn meta_key(node: &NodeId, field: &[u8]) -> Vec<u8> {
    let mut k = vec![META];
    k.extend_from_slice(node.as_str().as_bytes());
    k.push(SEP);
    k.extend_from_slice(field);
    k
}

fn alarm_key(node: &NodeId, rule: &str, device: &str) -> Vec<u8> {
    let mut k = vec![ALARM];
    k.extend_from_slice(node.as_str().as_bytes());
    k.push(SEP);
    k.extend_from_slice(rule.as_bytes());
    k.push(SEP);
    k.extend_from_slice(device.as_bytes());
    k
}

fn alarm_prefix(node: &NodeId) -> Vec<u8> {
    let mut k = vec![ALARM];
    k.extend_from_slice(node.as_str().as_bytes());
    k.push(SEP);
    k
}

/// An active alarm of a node's local rule, as the hub keeps it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AlarmRecord {
    /// The rule.
    pub rule: String,
    /// The device.
    pub device: String,
    /// Severity.
    pub severity: String,
    /// Labels.
    pub labels: serde_json::Value,
    /// Since when its condition held, ms since the epoch.
    pub since_ms: u64,
    /// When it was raised, ms since the epoch.
    pub raised_ms: u64,
    /// The rule's output when it was raised.
    pub fields: serde_json::Value,
    /// Who acknowledged it (an API token's name), if anyone.
    pub acked_by: Option<String>,
    /// When it was acknowledged, ms since the epoch.
    pub acked_ms: Option<u64>,
}

/// How many of a node's latest rule outputs the hub keeps in memory.
pub const RULE_OUTPUTS_KEPT: usize = 100;

/// Longest rule id or device accepted in a rule event (longer ones are ignored).
const MAX_RULE_EVENT_NAME: usize = 256;
/// Largest `fields_json`/`labels_json` of a rule event kept (larger ones are replaced by
/// `{"truncated": true}`).
const MAX_RULE_EVENT_JSON: usize = 16 * 1024;

fn bounded_json(text: &str) -> serde_json::Value {
    if text.is_empty() {
        return serde_json::json!({});
    }
    if text.len() > MAX_RULE_EVENT_JSON {
        return serde_json::json!({"truncated": true});
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        _ => serde_json::json!({"invalid": true}),
    }
}

/// What a rule event changes: an alarm key in `batch`, and the event to publish.
fn rule_event(
    node: &NodeId,
    r: &edgesync_protocol::frame::RuleEvent,
    batch: &mut sled::Batch,
    tree: &sled::Tree,
) -> Result<Option<(&'static str, serde_json::Value)>, StoreError> {
    use edgesync_protocol::frame::{RULE_ALARM_CLEARED, RULE_ALARM_RAISED, RULE_RECORD};
    let valid = |t: &str| !t.is_empty() && t.len() <= MAX_RULE_EVENT_NAME && !t.contains('\0');
    if !valid(&r.rule) || !valid(&r.device) {
        metrics::counter!("edgesync_hub_rule_events_invalid_total").increment(1);
        return Ok(None);
    }
    let fields = bounded_json(&r.fields_json);
    let key = alarm_key(node, &r.rule, &r.device);
    Ok(match r.kind {
        RULE_RECORD => Some((
            "rule_output",
            serde_json::json!({"node": node, "rule": r.rule, "device": r.device, "ts_ms": r.ts_ms, "fields": fields}),
        )),
        RULE_ALARM_RAISED => {
            let a = AlarmRecord {
                rule: r.rule.clone(),
                device: r.device.clone(),
                severity: r.severity.chars().take(MAX_RULE_EVENT_NAME).collect(),
                labels: bounded_json(&r.labels_json),
                since_ms: r.since_ms,
                raised_ms: r.raised_ms.max(r.ts_ms),
                fields,
                acked_by: None,
                acked_ms: None,
            };
            let json = serde_json::to_vec(&a).map_err(|e| StoreError::Corrupt {
                key: "alarm".into(),
                reason: e.to_string(),
            })?;
            batch.insert(key, json);
            Some((
                "alarm_raised",
                serde_json::json!({"node": node, "alarm": a}),
            ))
        }
        RULE_ALARM_CLEARED => {
            let known = tree.get(&key)?.is_some();
            batch.remove(key);
            Some((
                "alarm_cleared",
                serde_json::json!({"node": node, "rule": r.rule, "device": r.device, "since_ms": r.since_ms, "raised_ms": r.raised_ms, "cleared_ms": r.ts_ms, "known": known, "fields": fields}),
            ))
        }
        _ => {
            metrics::counter!("edgesync_hub_rule_events_invalid_total").increment(1);
            None
        }
    })
}

fn gap_key(node: &NodeId, first_seq: u64) -> Vec<u8> {
    let mut k = vec![GAP];
    k.extend_from_slice(&record_key(node, first_seq));
    k
}

/// The bucket of a property's latest sample in the persisted twin: FNV-1a of the device and
/// property ids, modulo [`TWIN_BUCKETS`] (stable across runs and builds).
pub fn twin_bucket(device: &DeviceId, property: &PropertyId) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in device
        .as_str()
        .bytes()
        .chain(std::iter::once(0))
        .chain(property.as_str().bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(TWIN_BUCKETS)) as u16
}

fn twin_bucket_key(node: &NodeId, bucket: u16) -> Vec<u8> {
    let mut k = vec![TWIN_BUCKET];
    k.extend_from_slice(node.as_str().as_bytes());
    k.push(SEP);
    k.extend_from_slice(&bucket.to_be_bytes());
    k
}

fn twin_key(node: &NodeId, device: &DeviceId, property: &PropertyId) -> Vec<u8> {
    let mut k = vec![TWIN];
    k.extend_from_slice(node.as_str().as_bytes());
    k.push(SEP);
    k.extend_from_slice(device.as_str().as_bytes());
    k.push(SEP);
    k.extend_from_slice(property.as_str().as_bytes());
    k
}

fn desired_key(node: &NodeId, device: &DeviceId, property: &PropertyId) -> Vec<u8> {
    let mut k = twin_key(node, device, property);
    k[0] = DESIRED;
    k
}

fn schema_key(node: &NodeId, device: &DeviceId) -> Vec<u8> {
    let mut k = vec![SCHEMA];
    k.extend_from_slice(node.as_str().as_bytes());
    k.push(SEP);
    k.extend_from_slice(device.as_str().as_bytes());
    k
}

/// A desired value read back from JSON, as the type the schema declares: JSON does not say
/// whether `42` was signed, so an unsigned property would otherwise come back as `Int` and
/// differ from the `UInt` the agent reports (a delta that never clears).
fn typed(kind: &str, v: Value) -> Value {
    match (kind, v) {
        ("uint", Value::Int(i)) if i >= 0 => Value::UInt(i.unsigned_abs()),
        ("float", Value::Int(i)) => Value::Float(i as f64),
        ("float", Value::UInt(u)) => Value::Float(u as f64),
        (_, v) => v,
    }
}

/// Publishes a durable desired value in memory unless a newer version already is: commits
/// publish after their flush, so a later commit of the same property may publish first.
fn publish_desired(desired: &mut BTreeMap<PropertyId, Desired>, property: PropertyId, d: Desired) {
    match desired.get(&property) {
        Some(cur) if cur.version > d.version => {}
        _ => {
            desired.insert(property, d);
        }
    }
}

fn desired_json(d: &Desired) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(d).map_err(|e| StoreError::Corrupt {
        key: "desired".into(),
        reason: e.to_string(),
    })
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Checks `{property: json}` against a device's schema: all or nothing.
fn check_values(
    schema: &BTreeMap<PropertyId, PropertySchema>,
    device: &DeviceId,
    values: &serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<(PropertyId, Value)>, Vec<FieldError>> {
    use serde_json::Value as J;
    let mut ok = vec![];
    let mut errors = vec![];
    if values.is_empty() {
        errors.push(FieldError::empty_change());
    }
    for (name, json) in values {
        let mut err = |message: String| {
            errors.push(FieldError {
                field: name.clone(),
                message,
            })
        };
        let Some((id, p)) = PropertyId::new(name.clone())
            .ok()
            .and_then(|id| schema.get(&id).map(|p| (id, p)))
        else {
            err(format!("device {device} has no property {name:?}"));
            continue;
        };
        if !p.writable {
            err(format!("{name} is read-only"));
            continue;
        }
        let value = match (p.kind.as_str(), json) {
            ("bool", J::Bool(b)) => Value::Bool(*b),
            ("string", J::String(s)) => Value::Str(s.clone()),
            ("int", J::Number(n)) if n.as_i64().is_some() => Value::Int(n.as_i64().unwrap_or(0)),
            ("uint", J::Number(n)) if n.as_u64().is_some() => Value::UInt(n.as_u64().unwrap_or(0)),
            ("float", J::Number(n)) => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            (kind, other) => {
                err(format!(
                    "expected a {} value, got {}",
                    match kind {
                        "int" => "integer",
                        "uint" => "non-negative integer",
                        "float" => "number",
                        "bool" => "boolean",
                        k => k,
                    },
                    match other {
                        J::Null => "null".to_owned(),
                        J::Number(n) => format!("{n}"),
                        J::Array(_) | J::Object(_) => format!("an {}", json_kind(other)),
                        _ => format!("a {}", json_kind(other)),
                    }
                ));
                continue;
            }
        };
        if let Some(x) = value.as_f64().filter(|_| !matches!(value, Value::Bool(_))) {
            if !x.is_finite() {
                err(format!("{x} is not a finite number"));
                continue;
            }
            if let Some(min) = p.min.filter(|m| x < *m) {
                err(format!("{x} is below the minimum {min}"));
                continue;
            }
            if let Some(max) = p.max.filter(|m| x > *m) {
                err(format!("{x} is above the maximum {max}"));
                continue;
            }
        }
        ok.push((id, value));
    }
    if errors.is_empty() {
        Ok(ok)
    } else {
        Err(errors)
    }
}

fn corrupt(key: &[u8], reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        key: key.escape_ascii().to_string(),
        reason: reason.into(),
    }
}

fn corrupt_frame(key: &[u8], e: &FrameError) -> StoreError {
    corrupt(key, e.to_string())
}

fn parse_id<T, E: std::fmt::Display>(
    key: &[u8],
    bytes: &[u8],
    parse: impl FnOnce(String) -> Result<T, E>,
) -> Result<T, StoreError> {
    let s = std::str::from_utf8(bytes).map_err(|_| corrupt(key, "id is not utf-8"))?;
    parse(s.to_owned()).map_err(|e| corrupt(key, e.to_string()))
}

fn be_u64(key: &[u8], value: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(value)
        .map(u64::from_be_bytes)
        .map_err(|_| corrupt(key, "value is not a u64"))
}

/// Loads node metadata and twins from disk.
fn load(tree: &sled::Tree) -> Result<BTreeMap<NodeId, NodeState>, StoreError> {
    let mut state: BTreeMap<NodeId, NodeState> = BTreeMap::new();
    for entry in tree.scan_prefix([META]) {
        let (key, value) = entry?;
        let mut parts = key[1..].splitn(2, |b| *b == SEP);
        let (Some(node), Some(field)) = (parts.next(), parts.next()) else {
            return Err(corrupt(&key, "meta key without a field"));
        };
        let node = parse_id(&key, node, NodeId::new)?;
        let n = state.entry(node).or_default();
        match field {
            FIELD_SEQ => {
                let seq = be_u64(&key, &value)?;
                n.durable_seq = seq;
                n.applied_seq = seq;
            }
            FIELD_TWIN => {
                n.twin_seq = be_u64(&key, &value)?;
                n.twin_seq_written = true;
            }
            FIELD_AGENT => {
                let v = std::str::from_utf8(&value)
                    .map_err(|_| corrupt(&key, "agent version is not utf-8"))?;
                n.agent_version = Some(v.to_owned());
            }
            FIELD_SEEN => n.last_seen_ms = Some(be_u64(&key, &value)?),
            FIELD_DOWNLINK => n.downlink_seq = be_u64(&key, &value)?,
            FIELD_BYTES => n.history_bytes = be_u64(&key, &value)?,
            FIELD_FLOOR => n.floor = be_u64(&key, &value)?,
            FIELD_CONTROL => n.control_seq = be_u64(&key, &value)?,
            // A field written by a newer hub: keep going.
            _ => {}
        }
    }
    for entry in tree.scan_prefix([GAP]) {
        let (key, value) = entry?;
        let mut parts = key[1..].splitn(2, |b| *b == SEP);
        let (Some(node), Some(first)) = (parts.next(), parts.next()) else {
            return Err(corrupt(&key, "gap key without a node"));
        };
        let node = parse_id(&key, node, NodeId::new)?;
        let from = be_u64(&key, first)?;
        let to = be_u64(&key, &value)?;
        if from == 0 || to < from {
            return Err(corrupt(&key, format!("gap {from}..={to} is empty")));
        }
        let n = state.entry(node).or_default();
        n.lost_records = n.lost_records.saturating_add(to - from + 1);
    }
    for entry in tree.scan_prefix([HISTORY]) {
        let (key, _) = entry?;
        let mut parts = key[1..].splitn(2, |b| *b == SEP);
        let (Some(node), Some(bucket)) = (parts.next(), parts.next()) else {
            return Err(corrupt(&key, "history index key without a node"));
        };
        let node = parse_id(&key, node, NodeId::new)?;
        let bucket = be_u64(&key, bucket)?;
        let n = state.entry(node).or_default();
        n.index_bucket = Some(n.index_bucket.map_or(bucket, |b| b.max(bucket)));
    }
    for entry in tree.scan_prefix([TWIN_BUCKET]) {
        let (key, value) = entry?;
        let mut parts = key[1..].splitn(2, |b| *b == SEP);
        let Some(node) = parts.next() else {
            return Err(corrupt(&key, "twin bucket key without a node"));
        };
        let node = parse_id(&key, node, NodeId::new)?;
        let samples = decode_samples(&value).map_err(|e| corrupt_frame(&key, &e))?;
        let n = state.entry(node).or_default();
        for sample in samples {
            let (device, property) = (sample.device.clone(), sample.property.clone());
            n.report(&device, &property, &sample, 0);
        }
    }
    // One key per property, as hubs before the buckets wrote them (replaced in `open`).
    for entry in tree.scan_prefix([TWIN]) {
        let (key, value) = entry?;
        let mut parts = key[1..].splitn(2, |b| *b == SEP);
        let Some(node) = parts.next() else {
            return Err(corrupt(&key, "twin key without a node"));
        };
        let node = parse_id(&key, node, NodeId::new)?;
        let mut samples = decode_samples(&value).map_err(|e| corrupt_frame(&key, &e))?;
        let (Some(sample), true) = (samples.pop(), samples.is_empty()) else {
            return Err(corrupt(&key, "twin entry does not hold exactly one sample"));
        };
        let n = state.entry(node).or_default();
        let (device, property) = (sample.device.clone(), sample.property.clone());
        n.report(&device, &property, &sample, 0);
        n.legacy_twin = true;
    }
    catch_up(tree, &mut state)?;
    // The twin's keys hold the values up to its checkpoint; the records after it are replayed
    // (a store written before checkpoints existed has no checkpoint: its twin keys were
    // written with every commit).
    for (node, n) in state.iter_mut() {
        if !n.twin_seq_written {
            n.twin_seq = n.applied_seq;
        }
        if n.twin_seq >= n.applied_seq {
            continue;
        }
        let mut replayed = 0u64;
        scan_records(tree, node, n.twin_seq + 1, |seq, sample| {
            n.report(&sample.device, &sample.property, &sample, seq);
            replayed += 1;
        })?;
        n.dirty_records = replayed;
        tracing::debug!(%node, replayed, from = n.twin_seq + 1, "twin replayed from the log");
    }
    for entry in tree.scan_prefix([DESIRED]) {
        let (key, value) = entry?;
        let mut parts = key[1..].splitn(3, |b| *b == SEP);
        let (Some(node), Some(device), Some(property)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(corrupt(
                &key,
                "desired key without node, device and property",
            ));
        };
        let node = parse_id(&key, node, NodeId::new)?;
        let device = parse_id(&key, device, DeviceId::new)?;
        let property = parse_id(&key, property, PropertyId::new)?;
        let d: Desired =
            serde_json::from_slice(&value).map_err(|e| corrupt(&key, e.to_string()))?;
        state
            .entry(node)
            .or_default()
            .twins
            .entry(device)
            .or_default()
            .desired
            .insert(property, d);
    }
    for entry in tree.scan_prefix([SCHEMA]) {
        use prost::Message;
        let (key, value) = entry?;
        let mut parts = key[1..].splitn(2, |b| *b == SEP);
        let (Some(node), Some(device)) = (parts.next(), parts.next()) else {
            return Err(corrupt(&key, "schema key without node and device"));
        };
        let node = parse_id(&key, node, NodeId::new)?;
        let device = parse_id(&key, device, DeviceId::new)?;
        let schema = DeviceSchema::decode(&value[..]).map_err(|e| corrupt(&key, e.to_string()))?;
        let mut props = BTreeMap::new();
        for p in schema.properties {
            let id = parse_id(&key, p.property.as_bytes(), PropertyId::new)?;
            props.insert(id, p);
        }
        let n = state.entry(node).or_default();
        let twin = n.twins.entry(device.clone()).or_default();
        for (property, d) in twin.desired.iter_mut() {
            if let Some(p) = props.get(property) {
                d.value = typed(&p.kind, d.value.clone());
            }
        }
        n.schema.insert(device, props);
    }
    Ok(state)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use edgesync_protocol::BadReason;
    use proptest::prelude::*;

    use super::*;

    const CACHE: u64 = 8 << 20;

    fn node(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn dev(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    fn prop(s: &str) -> PropertyId {
        PropertyId::new(s).unwrap()
    }

    fn sample(device: &str, property: &str, v: i64, ts: u64) -> Sample {
        Sample {
            device: dev(device),
            property: prop(property),
            value: Some(Value::Int(v)),
            quality: Quality::Good,
            ts: Timestamp(ts),
        }
    }

    /// Describes device `plc1` of `n` with writable int properties.
    async fn writable_int(store: &HubStore, n: &NodeId, properties: &[&str]) {
        store
            .store_schema(
                n,
                &DeviceSchema {
                    device: "plc1".into(),
                    properties: properties.iter().map(|p| writable(p, "int")).collect(),
                },
            )
            .await
            .unwrap();
    }

    fn writable(property: &str, kind: &str) -> PropertySchema {
        PropertySchema {
            property: property.into(),
            kind: kind.into(),
            writable: true,
            unit: String::new(),
            min: None,
            max: None,
        }
    }

    fn open(dir: &tempfile::TempDir) -> HubStore {
        HubStore::open(dir.path(), CACHE).unwrap()
    }

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<HubStore>();
        check::<Arc<HubStore>>();
    }

    #[tokio::test]
    async fn commit_and_reopen_keeps_seq_history_and_twin() {
        let dir = tempfile::tempdir().unwrap();
        let n = node("gw-1");
        let batch1 = vec![
            sample("plc1", "temp", 20, 100),
            sample("plc1", "rpm", 900, 100),
        ];
        let batch2 = vec![
            sample("plc1", "temp", 21, 200),
            Sample {
                quality: Quality::Bad(BadReason::Exception(2)),
                ..sample("plc2", "level", 7, 210)
            },
        ];
        {
            let store = open(&dir);
            assert_eq!(store.stored_seq(&n).unwrap(), 0);
            let out = store.commit_batch(&n, 1, &batch1).await.unwrap();
            assert_eq!(
                out,
                CommitOutcome {
                    stored_seq: 2,
                    accepted: 2,
                    duplicates: 0
                }
            );
            let out = store.commit_batch(&n, 3, &batch2).await.unwrap();
            assert_eq!(out.stored_seq, 4);
            assert_eq!(store.stored_seq(&n).unwrap(), 4);
        }
        let store = open(&dir);
        assert_eq!(store.stored_seq(&n).unwrap(), 4);
        let history = store.records(&n, 1).unwrap();
        let expected: Vec<(u64, Sample)> =
            (1..).zip(batch1.iter().chain(&batch2).cloned()).collect();
        assert_eq!(history, expected);
        // Reading from the middle of a stored batch.
        assert_eq!(store.records(&n, 4).unwrap(), expected[3..].to_vec());
        assert_eq!(store.records(&n, 5).unwrap(), vec![]);
        assert_eq!(store.devices(&n), vec![dev("plc1"), dev("plc2")]);
        let twin = store.twin(&n, &dev("plc1")).unwrap();
        assert_eq!(twin.reported.len(), 2);
        assert_eq!(twin.reported[&prop("temp")].value, Some(Value::Int(21)));
        assert_eq!(twin.reported[&prop("temp")].ts, Timestamp(200));
        let level = &store.twin(&n, &dev("plc2")).unwrap().reported[&prop("level")];
        assert_eq!(level.quality, Quality::Bad(BadReason::Exception(2)));
        let status = store.node(&n).unwrap();
        assert_eq!(status.uplink_seq, 4);
        assert_eq!(status.devices, 2);
        assert!(!status.connected);
        // Another node's records do not leak into this one's.
        assert_eq!(store.records(&node("gw-10"), 1).unwrap(), vec![]);
    }

    /// A new store is created with [`SEGMENT_BYTES`]; one created with sled's default segment
    /// size (by earlier versions) still opens, keeps its size and its records, and large pages
    /// of a new store stay in the log (no blob files).
    #[tokio::test]
    async fn segment_size_of_new_and_earlier_stores() {
        let conf_size = |dir: &tempfile::TempDir| persisted_segment_size(dir.path()).unwrap();
        let new = tempfile::tempdir().unwrap();
        assert_eq!(conf_size(&new), None);
        let n = node("gw-1");
        {
            let store = open(&new);
            // Entries of 2,000 records: pages of tens of kilobytes, rewritten as they grow.
            let mut seq = 1;
            for round in 0..40 {
                let batch: Vec<Sample> = (0..2000)
                    .map(|i| sample("plc", &format!("p{i}"), round * 2000 + i, 1))
                    .collect();
                store.commit_batch(&n, seq, &batch).await.unwrap();
                seq += batch.len() as u64;
            }
            store.flush().await.unwrap();
            let blobs = std::fs::read_dir(new.path().join("blobs")).unwrap().count();
            assert_eq!(blobs, 0, "pages written as blob files");
        }
        assert_eq!(conf_size(&new), Some(SEGMENT_BYTES));
        assert_eq!(open(&new).stored_seq(&n).unwrap(), 80_000);

        let old = tempfile::tempdir().unwrap();
        {
            let db = sled::Config::new().path(old.path()).open().unwrap();
            db.open_tree(TREE).unwrap();
            db.flush().unwrap();
        }
        assert_eq!(conf_size(&old), Some(512 * 1024));
        {
            let store = open(&old);
            store
                .commit_batch(&n, 1, &[sample("plc", "a", 1, 1)])
                .await
                .unwrap();
            store.flush().await.unwrap();
        }
        assert_eq!(conf_size(&old), Some(512 * 1024));
        assert_eq!(open(&old).stored_seq(&n).unwrap(), 1);

        // A conf file sled did not write: no size found, and sled itself refuses it.
        let bad = tempfile::tempdir().unwrap();
        std::fs::write(bad.path().join("conf"), "segment_size: lots\n").unwrap();
        assert_eq!(conf_size(&bad), None);
        assert!(HubStore::open(bad.path(), CACHE).is_err());
    }

    fn on_disk_seq(store: &HubStore, n: &NodeId) -> u64 {
        let v = store.tree().get(meta_key(n, FIELD_SEQ)).unwrap().unwrap();
        u64::from_be_bytes(v.as_ref().try_into().unwrap())
    }

    /// Commits between twin checkpoints write their record entry alone; a store dropped
    /// without `flush` (as after a crash) counts them on open, and rejects an entry after a
    /// hole.
    #[tokio::test]
    async fn commits_between_checkpoints_are_caught_up_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let n = node("gw-1");
        let (b1, b2, b3) = (
            vec![sample("d", "a", 1, 1), sample("d", "b", 2, 1)],
            vec![sample("d", "a", 3, 2)],
            vec![sample("d", "b", 4, 3), sample("e", "c", 5, 3)],
        );
        let bytes: u64 = [&b1, &b2, &b3]
            .iter()
            .map(|b| encode_samples(b).len() as u64)
            .sum();
        {
            let store = open(&dir);
            store.commit_batch(&n, 1, &b1).await.unwrap();
            assert_eq!(
                on_disk_seq(&store, &n),
                2,
                "a node's first commit is a checkpoint"
            );
            assert_eq!(store.commit_batch(&n, 3, &b2).await.unwrap().stored_seq, 3);
            assert_eq!(store.commit_batch(&n, 4, &b3).await.unwrap().stored_seq, 5);
            // The entries alone were written: the sequence number on disk lags.
            assert_eq!(on_disk_seq(&store, &n), 2);
            assert_eq!(store.read()[&n].history_bytes, bytes);
            // An entry after a hole, as no hub writes it.
            store
                .tree()
                .insert(record_key(&n, 9), encode_samples(&[sample("d", "a", 9, 9)]))
                .unwrap();
            store.tree().flush().unwrap();
        }
        let store = open(&dir);
        assert_eq!(store.stored_seq(&n).unwrap(), 5);
        assert_eq!(
            on_disk_seq(&store, &n),
            5,
            "the progress found is persisted"
        );
        assert_eq!(store.read()[&n].history_bytes, bytes);
        let all: Vec<Sample> = b1.iter().chain(&b2).chain(&b3).cloned().collect();
        let expected: Vec<(u64, Sample)> = (1..).zip(all).collect();
        assert_eq!(
            store.records(&n, 1).unwrap(),
            expected,
            "the entry after the hole is gone"
        );
        let twin = store.twin(&n, &dev("d")).unwrap();
        assert_eq!(twin.reported[&prop("a")].value, Some(Value::Int(3)));
        assert_eq!(twin.reported[&prop("b")].value, Some(Value::Int(4)));
        // A resend of what was stored is a duplicate; the sequence goes on after it.
        let again = store.commit_batch(&n, 4, &b3).await.unwrap();
        assert_eq!((again.accepted, again.duplicates), (0, 2));
        let next = store
            .commit_batch(&n, 6, &[sample("d", "a", 6, 4)])
            .await
            .unwrap();
        assert_eq!((next.stored_seq, next.accepted), (6, 1));
    }

    /// The reported value of `device`/`property` in the twin's keys on disk (the checkpoint).
    fn persisted(store: &HubStore, n: &NodeId, device: &str, property: &str) -> Option<Value> {
        let (d, p) = (dev(device), prop(property));
        let raw = store
            .tree()
            .get(twin_bucket_key(n, twin_bucket(&d, &p)))
            .unwrap()?;
        decode_samples(&raw)
            .unwrap()
            .into_iter()
            .find(|s| s.device == d && s.property == p)?
            .value
    }

    #[tokio::test]
    async fn a_large_twin_is_persisted_in_at_most_the_bucket_count_of_keys() {
        let dir = tempfile::tempdir().unwrap();
        let n = node("gw-1");
        let batch: Vec<Sample> = (0..5000)
            .map(|i| sample("plc1", &format!("p{i}"), i, 100))
            .collect();
        {
            let store = open(&dir);
            store.commit_batch(&n, 1, &batch).await.unwrap();
            store
                .commit_batch(&n, 5001, &[sample("plc1", "p7", -7, 200)])
                .await
                .unwrap();
            store.flush().await.unwrap();
            let mut prefix = vec![TWIN_BUCKET];
            prefix.extend_from_slice(&node_prefix(&n));
            let keys = store.tree().scan_prefix(&prefix).count();
            assert!(keys <= usize::from(TWIN_BUCKETS), "{keys} keys");
            assert!(keys > 200, "{keys} keys: the hash spreads");
            assert_eq!(persisted(&store, &n, "plc1", "p7"), Some(Value::Int(-7)));
        }
        let store = open(&dir);
        let twin = store.twin(&n, &dev("plc1")).unwrap();
        assert_eq!(twin.reported.len(), 5000);
        assert_eq!(twin.reported[&prop("p7")].value, Some(Value::Int(-7)));
        assert_eq!(twin.reported[&prop("p4999")].value, Some(Value::Int(4999)));
    }

    #[tokio::test]
    async fn a_commit_of_many_properties_publishes_twin_events_of_bounded_size() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let n = node("gw-1");
        let (_, mut rx) = store.events().subscribe(None);
        let batch: Vec<Sample> = (0..2500)
            .map(|i| sample("plc1", &format!("p{i}"), i, 100))
            .collect();
        store.commit_batch(&n, 1, &batch).await.unwrap();
        let mut sizes = vec![];
        while let Ok(ev) = rx.try_recv() {
            if ev.kind == "twin" {
                let json = ev.json();
                assert_eq!(json["device"], "plc1");
                sizes.push(json["reported"].as_object().unwrap().len());
            }
        }
        assert_eq!(sizes, vec![1000, 1000, 500]);
    }

    #[test]
    fn a_twin_payload_renders_within_its_bound_whatever_the_values() {
        use edgesync_protocol::BadReason;
        let long_id = "p".repeat(edgesync_protocol::ids::MAX_ID_LEN);
        let values = [
            None,
            Some(Value::Bool(false)),
            Some(Value::Int(i64::MIN)),
            Some(Value::UInt(u64::MAX)),
            Some(Value::Float(-f64::MAX)),
            Some(Value::Float(f64::MIN_POSITIVE)),
            Some(Value::Float(-1.234_567_890_123_456_7e-300)),
            Some(Value::Float(f64::NAN)),
            Some(Value::Str(String::new())),
            Some(Value::Str("\u{1}\u{1f}\"\\\n".repeat(50))),
            Some(Value::Str("\u{20ac}x".into())),
        ];
        let qualities = [
            Quality::Good,
            Quality::Bad(BadReason::Exception(0xff)),
            Quality::Bad(BadReason::DecodeError),
            Quality::Bad(BadReason::Disconnected),
        ];
        let mut samples = vec![];
        for (i, value) in values.iter().enumerate() {
            for (j, quality) in qualities.iter().enumerate() {
                samples.push(Sample {
                    device: dev(&long_id),
                    property: prop(&format!("{}{i}-{j}", &long_id[4..])),
                    value: value.clone(),
                    quality: *quality,
                    ts: Timestamp(u64::MAX),
                });
            }
        }
        samples.sort_by(|a, b| a.property.cmp(&b.property));
        for n in 1..=samples.len() {
            let p = TwinPayload {
                node: node(&long_id),
                device: dev(&long_id),
                samples: samples[..n].to_vec(),
            };
            let json = p.render();
            assert!(
                json.len() <= p.max_len(),
                "{n}: {} > {}",
                json.len(),
                p.max_len()
            );
            let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(parsed["reported"].as_object().unwrap().len(), n);
        }
    }

    #[tokio::test]
    async fn a_twin_kept_one_key_per_property_is_rewritten_as_buckets_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let n = node("gw-1");
        {
            let store = open(&dir);
            store
                .commit_batch(
                    &n,
                    1,
                    &[
                        sample("plc1", "temp", 20, 100),
                        sample("plc1", "rpm", 900, 100),
                    ],
                )
                .await
                .unwrap();
            store.flush().await.unwrap();
            store
                .commit_batch(&n, 3, &[sample("plc1", "temp", 21, 200)])
                .await
                .unwrap();
            // What an older hub left: one key per property up to seq 2, the record of seq 3
            // after its checkpoint, no buckets.
            let tree = store.tree();
            for e in tree.scan_prefix([TWIN_BUCKET]) {
                tree.remove(e.unwrap().0).unwrap();
            }
            for s in [
                sample("plc1", "temp", 20, 100),
                sample("plc1", "rpm", 900, 100),
            ] {
                tree.insert(
                    twin_key(&n, &s.device, &s.property),
                    encode_samples(std::slice::from_ref(&s)),
                )
                .unwrap();
            }
            tree.insert(meta_key(&n, FIELD_TWIN), &2u64.to_be_bytes())
                .unwrap();
            tree.flush().unwrap();
        }
        let store = open(&dir);
        let twin = store.twin(&n, &dev("plc1")).unwrap();
        assert_eq!(twin.reported[&prop("temp")].value, Some(Value::Int(21)));
        assert_eq!(twin.reported[&prop("rpm")].value, Some(Value::Int(900)));
        assert_eq!(store.tree().scan_prefix([TWIN]).count(), 0);
        assert_eq!(persisted(&store, &n, "plc1", "temp"), Some(Value::Int(21)));
        assert_eq!(persisted(&store, &n, "plc1", "rpm"), Some(Value::Int(900)));
        drop(store);
        // And again: nothing left to rewrite, the same twin.
        let store = open(&dir);
        let twin = store.twin(&n, &dev("plc1")).unwrap();
        assert_eq!(twin.reported[&prop("temp")].value, Some(Value::Int(21)));
    }

    #[tokio::test]
    async fn the_twin_is_checkpointed_and_replayed_from_the_records_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let n = node("gw-1");
        {
            let store = open(&dir);
            // The node's first commit writes the checkpoint...
            store
                .commit_batch(&n, 1, &[sample("plc1", "temp", 1, 1)])
                .await
                .unwrap();
            assert_eq!(persisted(&store, &n, "plc1", "temp"), Some(Value::Int(1)));
            // ...later ones within the interval only their records.
            for seq in 2..=5 {
                store
                    .commit_batch(&n, seq, &[sample("plc1", "temp", seq as i64, seq)])
                    .await
                    .unwrap();
            }
            store
                .commit_batch(&n, 6, &[sample("plc1", "new", 60, 6)])
                .await
                .unwrap();
            assert_eq!(persisted(&store, &n, "plc1", "temp"), Some(Value::Int(1)));
            assert_eq!(persisted(&store, &n, "plc1", "new"), None);
            // Dropped without a flush: a crash after the commits returned.
        }
        let store = open(&dir);
        let twin = store.twin(&n, &dev("plc1")).unwrap();
        assert_eq!(twin.reported[&prop("temp")].value, Some(Value::Int(5)));
        assert_eq!(twin.reported[&prop("temp")].ts, Timestamp(5));
        assert_eq!(twin.reported[&prop("new")].value, Some(Value::Int(60)));
        assert_eq!(store.node(&n).unwrap().uplink_seq, 6);
        // The replayed values reach the disk with the next checkpoint (this run's first
        // commit), together with the new ones; nothing is replayed after that.
        store
            .commit_batch(&n, 7, &[sample("plc2", "x", 7, 7)])
            .await
            .unwrap();
        assert_eq!(persisted(&store, &n, "plc1", "temp"), Some(Value::Int(5)));
        assert_eq!(persisted(&store, &n, "plc1", "new"), Some(Value::Int(60)));
        assert_eq!(persisted(&store, &n, "plc2", "x"), Some(Value::Int(7)));
        // Enough records force a checkpoint within the interval.
        let many: Vec<Sample> = (0..TWIN_CHECKPOINT_RECORDS)
            .map(|i| sample("plc1", "temp", 1000 + i as i64, 8 + i))
            .collect();
        store.commit_batch(&n, 8, &many).await.unwrap();
        let last = Some(Value::Int(1000 + TWIN_CHECKPOINT_RECORDS as i64 - 1));
        assert_eq!(persisted(&store, &n, "plc1", "temp"), last);
        // A graceful flush checkpoints what changed since.
        let next = 8 + TWIN_CHECKPOINT_RECORDS;
        store
            .commit_batch(&n, next, &[sample("plc2", "x", 8, next)])
            .await
            .unwrap();
        assert_eq!(persisted(&store, &n, "plc2", "x"), Some(Value::Int(7)));
        store.flush().await.unwrap();
        assert_eq!(persisted(&store, &n, "plc2", "x"), Some(Value::Int(8)));
        drop(store);
        let store = open(&dir);
        assert_eq!(
            store.twin(&n, &dev("plc1")).unwrap().reported[&prop("temp")].value,
            last
        );
        assert_eq!(store.node(&n).unwrap().uplink_seq, next);
        // Reads see one sequence, also from the middle of an entry.
        let got = store.records(&n, 8).unwrap();
        assert_eq!(got.len(), many.len() + 1);
        assert!(got.iter().zip(&many).all(|((_, a), b)| a == b));
        assert!(got.iter().zip(8..).all(|((seq, _), want)| *seq == want));
        let mid = 8 + TWIN_CHECKPOINT_RECORDS / 2 + 7;
        assert_eq!(store.records(&n, mid).unwrap()[0].0, mid);
    }

    #[tokio::test]
    async fn a_commit_publishes_one_twin_event_per_device_with_its_changed_properties() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let n = node("gw-1");
        let (_, mut rx) = store.events().subscribe(None);
        let batch = vec![
            sample("plc2", "b", 1, 10),
            sample("plc1", "a", 2, 11),
            sample("plc2", "a", 3, 12),
            Sample {
                quality: Quality::Bad(BadReason::Timeout),
                value: None,
                ..sample("plc2", "b", 0, 13)
            },
        ];
        store.commit_batch(&n, 1, &batch).await.unwrap();
        let mut got = vec![];
        while let Ok(ev) = rx.try_recv() {
            assert_eq!(ev.kind, "twin");
            got.push(ev.json());
        }
        assert_eq!(
            got,
            vec![
                serde_json::json!({"node": "gw-1", "device": "plc1", "reported": {
                    "a": {"value": 2, "quality": "good", "ts": 11}}}),
                serde_json::json!({"node": "gw-1", "device": "plc2", "reported": {
                    "a": {"value": 3, "quality": "good", "ts": 12},
                    "b": {"value": null, "quality": Quality::Bad(BadReason::Timeout), "ts": 13}}}),
            ]
        );
    }

    #[tokio::test]
    async fn a_store_without_a_twin_checkpoint_keeps_its_twin_keys() {
        // Written before checkpoints existed: twin keys with every commit, no "twinseq".
        let dir = tempfile::tempdir().unwrap();
        let n = node("gw-1");
        {
            let store = open(&dir);
            store
                .commit_batch(&n, 1, &[sample("plc1", "temp", 1, 1)])
                .await
                .unwrap();
            store.tree().remove(meta_key(&n, FIELD_TWIN)).unwrap();
            store.flush().await.unwrap();
        }
        let store = open(&dir);
        let twin = store.twin(&n, &dev("plc1")).unwrap();
        assert_eq!(twin.reported[&prop("temp")].value, Some(Value::Int(1)));
        store
            .commit_batch(&n, 2, &[sample("plc1", "temp", 2, 2)])
            .await
            .unwrap();
        assert_eq!(persisted(&store, &n, "plc1", "temp"), Some(Value::Int(2)));
    }

    #[tokio::test]
    async fn duplicates_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let n = node("gw-1");
        let batch: Vec<Sample> = (0..4).map(|i| sample("d", "p", i, i as u64)).collect();
        store.commit_batch(&n, 1, &batch).await.unwrap();
        // The same batch again: all duplicates.
        let out = store.commit_batch(&n, 1, &batch).await.unwrap();
        assert_eq!(
            out,
            CommitOutcome {
                stored_seq: 4,
                accepted: 0,
                duplicates: 4
            }
        );
        // Overlapping: seqs 3..=6, two old, two new.
        let overlap: Vec<Sample> = (10..14).map(|i| sample("d", "p", i, i as u64)).collect();
        let out = store.commit_batch(&n, 3, &overlap).await.unwrap();
        assert_eq!(
            out,
            CommitOutcome {
                stored_seq: 6,
                accepted: 2,
                duplicates: 2
            }
        );
        let values: Vec<(u64, Option<Value>)> = store
            .records(&n, 1)
            .unwrap()
            .into_iter()
            .map(|(s, r)| (s, r.value))
            .collect();
        let want: Vec<(u64, Option<Value>)> = [0, 1, 2, 3, 12, 13]
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i as u64 + 1, Some(Value::Int(v))))
            .collect();
        assert_eq!(values, want);
        assert_eq!(
            store.twin(&n, &dev("d")).unwrap().reported[&prop("p")].value,
            Some(Value::Int(13))
        );
    }

    #[tokio::test]
    async fn gap_is_refused_and_nothing_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let n = node("gw-1");
        store
            .commit_batch(&n, 1, &[sample("d", "p", 1, 1)])
            .await
            .unwrap();
        let err = store
            .commit_batch(&n, 3, &[sample("d", "p", 2, 2), sample("d", "q", 3, 3)])
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Gap {
                    expected: 2,
                    got: 3
                }
            ),
            "{err:?}"
        );
        assert_eq!(store.stored_seq(&n).unwrap(), 1);
        assert_eq!(store.records(&n, 1).unwrap().len(), 1);
        let twin = store.twin(&n, &dev("d")).unwrap();
        assert_eq!(twin.reported.len(), 1);
        assert_eq!(twin.reported[&prop("p")].value, Some(Value::Int(1)));
        // A first batch must start at 1.
        let err = store
            .commit_batch(&node("gw-2"), 2, &[sample("d", "p", 1, 1)])
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            StoreError::Gap {
                expected: 1,
                got: 2
            }
        ));
        assert!(store.node(&node("gw-2")).is_none());
        drop(store);
        let store = open(&dir);
        assert_eq!(store.records(&n, 1).unwrap().len(), 1);
        assert_eq!(store.stored_seq(&node("gw-2")).unwrap(), 0);
    }

    #[tokio::test]
    async fn invalid_sequence_numbers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let n = node("gw-1");
        let err = store
            .commit_batch(&n, 0, &[sample("d", "p", 1, 1)])
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            StoreError::InvalidSeq {
                first_seq: 0,
                len: 1
            }
        ));
        let two = [sample("d", "p", 1, 1), sample("d", "p", 2, 2)];
        let err = store.commit_batch(&n, u64::MAX, &two).await.unwrap_err();
        assert!(matches!(err, StoreError::InvalidSeq { .. }), "{err:?}");
        // An empty batch changes nothing.
        let out = store.commit_batch(&n, 7, &[]).await.unwrap();
        assert_eq!(
            out,
            CommitOutcome {
                stored_seq: 0,
                accepted: 0,
                duplicates: 0
            }
        );
        assert!(store.records(&n, 0).unwrap().is_empty());
    }

    #[tokio::test]
    async fn twin_follows_the_last_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let n = node("gw-1");
        // Within one batch and across batches, the later sequence number wins, even if its
        // timestamp is older (the agent sends per-device changes in read order).
        store
            .commit_batch(
                &n,
                1,
                &[
                    sample("d", "p", 1, 100),
                    sample("d", "p", 2, 300),
                    sample("d", "p", 3, 200),
                ],
            )
            .await
            .unwrap();
        let reported = &store.twin(&n, &dev("d")).unwrap().reported[&prop("p")];
        assert_eq!(reported.value, Some(Value::Int(3)));
        assert_eq!(reported.ts, Timestamp(200));
        let bad = Sample {
            value: Some(Value::Int(3)),
            quality: Quality::Bad(BadReason::Timeout),
            ..sample("d", "p", 0, 400)
        };
        store.commit_batch(&n, 4, &[bad]).await.unwrap();
        drop(store);
        let store = open(&dir);
        let reported = &store.twin(&n, &dev("d")).unwrap().reported[&prop("p")];
        assert_eq!(reported.quality, Quality::Bad(BadReason::Timeout));
        assert_eq!(reported.value, Some(Value::Int(3)));
        assert_eq!(reported.ts, Timestamp(400));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_from_eight_nodes_are_all_durable() {
        // 8 x 50 commits: enough to have deadlocked sled 0.34's flush_async (see flush_locked).
        const BATCHES: u64 = 50;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(&dir));
        let mut tasks = Vec::new();
        for i in 0..8 {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                let n = node(&format!("gw-{i}"));
                for b in 0..BATCHES {
                    let batch: Vec<Sample> = (0..5)
                        .map(|k| sample("d", &format!("p{k}"), (b * 5 + k) as i64, b))
                        .collect();
                    let out = store.commit_batch(&n, b * 5 + 1, &batch).await.unwrap();
                    assert_eq!(out.stored_seq, b * 5 + 5);
                    assert_eq!(out.accepted, 5);
                }
            }));
        }
        for t in tasks {
            tokio::time::timeout(std::time::Duration::from_secs(120), t)
                .await
                .unwrap()
                .unwrap();
        }
        // Group commit: concurrent commits shared flushes.
        let flushes = store.flush_count();
        assert!(
            flushes < 8 * BATCHES,
            "{flushes} flushes for {} commits",
            8 * BATCHES
        );
        drop(store);
        let store = open(&dir);
        assert_eq!(store.nodes().len(), 8);
        for i in 0..8 {
            let n = node(&format!("gw-{i}"));
            assert_eq!(store.stored_seq(&n).unwrap(), BATCHES * 5);
            let records = store.records(&n, 1).unwrap();
            assert_eq!(records.len() as u64, BATCHES * 5);
            for (idx, (seq, s)) in records.iter().enumerate() {
                assert_eq!(*seq, idx as u64 + 1);
                assert_eq!(s.value, Some(Value::Int(idx as i64)));
            }
        }
    }

    #[tokio::test]
    async fn node_status_is_tracked_and_partly_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let n = node("gw-1");
        {
            let store = open(&dir);
            store
                .node_connected(
                    &n,
                    ConnInfo {
                        remote_addr: "10.0.0.5:4433".into(),
                        agent_version: "0.1.0".into(),
                        boot_id: "boot-a".into(),
                        config_version: 3,
                        svid_expires_ms: Some(9_000_000),
                    },
                    1_000,
                )
                .unwrap();
            store.node_seen(&n, 2_000, 42).unwrap();
            let s = store.node(&n).unwrap();
            assert_eq!(
                s,
                NodeStatus {
                    node: n.clone(),
                    connected: true,
                    last_seen_ms: Some(2_000),
                    remote_addr: Some("10.0.0.5:4433".into()),
                    agent_version: Some("0.1.0".into()),
                    boot_id: Some("boot-a".into()),
                    uplink_seq: 0,
                    lost_records: 0,
                    backlog: 42,
                    config_version: 3,
                    devices: 0,
                    history_bytes: 0,
                    history_from: 1,
                    svid_expires_ms: Some(9_000_000),
                }
            );
            store.node_disconnected(&n, 3_000).unwrap();
            let s = store.node(&n).unwrap();
            assert!(!s.connected);
            assert_eq!(s.last_seen_ms, Some(3_000));
            store.inner.db.flush().unwrap();
        }
        let store = open(&dir);
        let s = store.node(&n).unwrap();
        assert!(!s.connected);
        assert_eq!(s.last_seen_ms, Some(3_000));
        assert_eq!(s.agent_version.as_deref(), Some("0.1.0"));
        assert_eq!(s.remote_addr, None);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["node"], "gw-1");
        assert_eq!(json["last_seen_ms"], 3_000);
        assert_eq!(json["uplink_seq"], 0);
    }

    /// An operator's changes and a node's control records (proposals and outcomes) commit
    /// concurrently for the same property: every change gets its own version, and what memory
    /// shows at the end is what is on disk. Commits publish after their flush, so a decision
    /// taken from the published state (not the written one) gave two changes one version, or
    /// let an outcome's late publish bring back an older value that the node never received.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_desired_changes_and_control_records_never_share_a_version() {
        use edgesync_protocol::frame::{DesiredStatus, Proposal};
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(&dir));
        let n = node("gw-1");
        writable_int(&store, &n, &["sp"]).await;
        const OPS: u64 = 60;
        let operator = {
            let (store, n) = (store.clone(), n.clone());
            tokio::spawn(async move {
                let mut versions = vec![];
                for i in 0..OPS {
                    let mut values = serde_json::Map::new();
                    values.insert("sp".into(), serde_json::json!(1000 + i));
                    let set = store
                        .set_desired(&n, &dev("plc1"), &values, "ops")
                        .await
                        .unwrap();
                    versions.push(set[0].version);
                }
                versions
            })
        };
        let agent = {
            let (store, n) = (store.clone(), n.clone());
            tokio::spawn(async move {
                for seq in 1..=2 * OPS {
                    let kind = if seq % 2 == 1 {
                        ControlKind::Proposal(Proposal {
                            device: "plc1".into(),
                            property: "sp".into(),
                            value: Some(value_to_wire(&Value::Int(i64::try_from(seq).unwrap()))),
                            base_version: 0,
                            set_ms: 1,
                        })
                    } else {
                        // "pending" for the local change (version 0).
                        ControlKind::Status(DesiredStatus {
                            device: "plc1".into(),
                            property: "sp".into(),
                            version: 0,
                            outcome: 0,
                            exception_code: 0,
                            detail: String::new(),
                            ts_ms: 2,
                        })
                    };
                    store
                        .apply_control(
                            &n,
                            Control {
                                seq,
                                kind: Some(kind),
                            },
                        )
                        .await
                        .unwrap();
                }
            })
        };
        let mut versions = operator.await.unwrap();
        agent.await.unwrap();
        // Every proposal takes a version too (accepted or rejected).
        let total = OPS + OPS;
        let downlink = store.read().get(&n).map(|s| s.downlink_seq).unwrap();
        assert_eq!(downlink, total, "two changes got the same version");
        versions.dedup();
        assert_eq!(versions.len(), usize::try_from(OPS).unwrap());
        let shown = store.twin(&n, &dev("plc1")).unwrap().desired[&prop("sp")].clone();
        assert_eq!(
            shown.version, total,
            "memory shows an older version: {shown:?}"
        );
        let sent = store.desired_after(&n, 0);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].version, total);
        drop(store);
        let reopened = open(&dir);
        assert_eq!(
            reopened.twin(&n, &dev("plc1")).unwrap().desired[&prop("sp")],
            shown
        );
    }

    /// JSON does not keep an integer's signedness: a desired value of an unsigned property that
    /// went through the disk (an outcome's rewrite, a restart) is still the `UInt` the agent
    /// reports, so the delta clears.
    #[tokio::test]
    async fn unsigned_desired_values_keep_their_type_through_the_disk() {
        use edgesync_protocol::frame::DesiredStatus;
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let n = node("gw-1");
        store
            .store_schema(
                &n,
                &DeviceSchema {
                    device: "plc1".into(),
                    properties: vec![writable("sp", "uint"), writable("f", "float")],
                },
            )
            .await
            .unwrap();
        let values = serde_json::json!({"sp": 4321, "f": 7});
        store
            .set_desired(&n, &dev("plc1"), values.as_object().unwrap(), "ops")
            .await
            .unwrap();
        let reported = [
            Sample {
                value: Some(Value::UInt(4321)),
                ..sample("plc1", "sp", 0, 1)
            },
            Sample {
                value: Some(Value::Float(7.0)),
                ..sample("plc1", "f", 0, 1)
            },
        ];
        store.commit_batch(&n, 1, &reported).await.unwrap();
        for (seq, (property, version)) in [("f", 1), ("sp", 2)].into_iter().enumerate() {
            let status = ControlKind::Status(DesiredStatus {
                device: "plc1".into(),
                property: property.into(),
                version,
                outcome: 1,
                exception_code: 0,
                detail: String::new(),
                ts_ms: 3,
            });
            let seq = u64::try_from(seq).unwrap() + 1;
            store
                .apply_control(
                    &n,
                    Control {
                        seq,
                        kind: Some(status),
                    },
                )
                .await
                .unwrap();
        }
        let twin = store.twin(&n, &dev("plc1")).unwrap();
        assert_eq!(twin.desired[&prop("sp")].value, Value::UInt(4321));
        assert!(twin.desired[&prop("sp")].applied.is_some(), "{twin:?}");
        assert!(twin.delta().is_empty(), "{twin:?}");
        drop(store);
        let twin = open(&dir).twin(&n, &dev("plc1")).unwrap();
        assert_eq!(twin.desired[&prop("sp")].value, Value::UInt(4321));
        assert_eq!(twin.desired[&prop("f")].value, Value::Float(7.0));
        assert!(twin.delta().is_empty(), "{twin:?}");
    }

    /// A node that took over versions this store never handed out (the store was restored from
    /// an older snapshot): the counter moves above them, and an operator's value numbered
    /// meanwhile, which the node has not reported on, gets a new version.
    #[tokio::test]
    async fn a_store_behind_the_node_renumbers_unreported_values_above_the_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let n = node("gw-1");
        writable_int(&store, &n, &["sp"]).await;
        let values = serde_json::json!({"sp": 5});
        let set = store
            .set_desired(&n, &dev("plc1"), values.as_object().unwrap(), "ops")
            .await
            .unwrap();
        assert_eq!(set[0].version, 1);
        // The node says it took over up to version 4.
        assert_eq!(store.reconcile_downlink(&n, 4).await.unwrap(), (true, 1));
        let d = store.twin(&n, &dev("plc1")).unwrap().desired[&prop("sp")].clone();
        assert_eq!((d.version, &d.value), (5, &Value::Int(5)));
        assert_eq!(store.desired_after(&n, 4).len(), 1, "sent again");
        // Nothing to do when the node is not ahead and has nothing unreported.
        assert_eq!(store.reconcile_downlink(&n, 3).await.unwrap(), (false, 0));
        let set = store
            .set_desired(&n, &dev("plc1"), values.as_object().unwrap(), "ops")
            .await
            .unwrap();
        assert_eq!(set[0].version, 6);
        drop(store);
        let reopened = open(&dir);
        assert_eq!(
            reopened.twin(&n, &dev("plc1")).unwrap().desired[&prop("sp")].version,
            6
        );
    }

    #[tokio::test]
    async fn twin_size_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let n = node("gw-1");
        let too_many: Vec<Sample> = (0..=MAX_PROPERTIES_PER_NODE)
            .map(|i| sample("d", &format!("p{i}"), 0, 0))
            .collect();
        let err = store.commit_batch(&n, 1, &too_many).await.unwrap_err();
        assert!(matches!(err, StoreError::TwinFull { .. }), "{err:?}");
        assert_eq!(store.stored_seq(&n).unwrap(), 0);
        assert!(store.twin(&n, &dev("d")).is_none());
    }

    #[test]
    fn twin_serializes_reported_desired_and_delta() {
        let mut twin = Twin::default();
        twin.reported.insert(
            prop("temp"),
            Reported {
                value: Some(Value::Float(21.5)),
                quality: Quality::Good,
                ts: Timestamp(5),
                seq: 7,
            },
        );
        twin.reported.insert(
            prop("rpm"),
            Reported {
                value: None,
                quality: Quality::Bad(BadReason::Timeout),
                ts: Timestamp(6),
                seq: 8,
            },
        );
        twin.desired.insert(
            prop("temp"),
            Desired {
                value: Value::Float(21.5),
                version: 1,
                origin: Origin::Hub,
                set_ms: 3,
                by: "ops".into(),
                applied: Some(AppliedOutcome {
                    version: 1,
                    outcome: Outcome::Ok,
                    ts_ms: 4,
                }),
            },
        );
        twin.desired.insert(
            prop("rpm"),
            Desired {
                value: Value::Int(900),
                version: 2,
                origin: Origin::Edge,
                set_ms: 5,
                by: "edge".into(),
                applied: None,
            },
        );
        let json = serde_json::to_value(&twin).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "reported": {
                    "rpm": {"value": null, "quality": "bad: timeout", "ts": 6},
                    "temp": {"value": 21.5, "quality": "good", "ts": 5},
                },
                "desired": {
                    "rpm": {"value": 900, "version": 2, "origin": "edge", "set_ms": 5, "by": "edge", "applied": null},
                    "temp": {"value": 21.5, "version": 1, "origin": "hub", "set_ms": 3, "by": "ops",
                             "applied": {"version": 1, "outcome": "ok", "ts_ms": 4}},
                },
                "delta": {"rpm": 900},
            })
        );
    }

    #[tokio::test]
    async fn gaps_count_as_stored_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let n = node("gw-1");
        {
            let store = open(&dir);
            store
                .commit_batch(&n, 1, &[sample("d", "p", 1, 1), sample("d", "p", 2, 2)])
                .await
                .unwrap();
            // Records 3..=9 were lost at the edge.
            assert_eq!(
                store.commit_gap(&n, 3, 9).await.unwrap(),
                GapOutcome {
                    stored_seq: 9,
                    new_records: 7
                }
            );
            // Overlapping report: only 10..=12 is new.
            assert_eq!(
                store.commit_gap(&n, 8, 12).await.unwrap(),
                GapOutcome {
                    stored_seq: 12,
                    new_records: 3
                }
            );
            // Entirely old: nothing changes.
            assert_eq!(
                store.commit_gap(&n, 1, 5).await.unwrap(),
                GapOutcome {
                    stored_seq: 12,
                    new_records: 0
                }
            );
            let err = store.commit_gap(&n, 14, 20).await.unwrap_err();
            assert!(
                matches!(
                    err,
                    StoreError::Gap {
                        expected: 13,
                        got: 14
                    }
                ),
                "{err:?}"
            );
            let err = store.commit_gap(&n, 5, 4).await.unwrap_err();
            assert!(matches!(err, StoreError::InvalidGap { .. }), "{err:?}");
            let out = store
                .commit_batch(&n, 13, &[sample("d", "p", 13, 13)])
                .await
                .unwrap();
            assert_eq!(out.stored_seq, 13);
        }
        let store = open(&dir);
        assert_eq!(store.stored_seq(&n).unwrap(), 13);
        assert_eq!(store.gaps(&n).unwrap(), vec![(3, 9), (10, 12)]);
        assert_eq!(store.node(&n).unwrap().lost_records, 10);
        let seqs: Vec<u64> = store.records(&n, 1).unwrap().iter().map(|r| r.0).collect();
        assert_eq!(seqs, vec![1, 2, 13]);
        assert_eq!(store.records(&n, 5).unwrap().len(), 1);
    }

    /// A gap resent after a reconnect (or overlapping one stored) counts only its new records,
    /// in memory and after a reopen; other nodes are not affected.
    #[tokio::test]
    async fn lost_records_count_each_record_once_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (n, other) = (node("gw-1"), node("gw-10"));
        let lost = |store: &HubStore, n: &NodeId| store.node(n).unwrap().lost_records;
        {
            let store = open(&dir);
            store
                .commit_batch(&n, 1, &[sample("d", "p", 1, 1)])
                .await
                .unwrap();
            assert_eq!(lost(&store, &n), 0);
            assert_eq!(store.commit_gap(&n, 2, 6).await.unwrap().new_records, 5);
            assert_eq!(lost(&store, &n), 5);
            // The same gap again (the agent did not get the ack): nothing new.
            assert_eq!(store.commit_gap(&n, 2, 6).await.unwrap().new_records, 0);
            assert_eq!(lost(&store, &n), 5);
            // Overlapping: 7..=8 are new.
            assert_eq!(store.commit_gap(&n, 4, 8).await.unwrap().new_records, 2);
            assert_eq!(lost(&store, &n), 7);
            // A refused gap (after a hole) counts nothing.
            assert!(store.commit_gap(&n, 20, 30).await.is_err());
            assert!(store.commit_gap(&n, 9, 8).await.is_err());
            assert_eq!(lost(&store, &n), 7);
            store
                .commit_batch(&n, 9, &[sample("d", "p", 9, 9)])
                .await
                .unwrap();
            assert_eq!(store.commit_gap(&n, 10, 10).await.unwrap().new_records, 1);
            assert_eq!(lost(&store, &n), 8);
            assert_eq!(store.commit_gap(&other, 1, 3).await.unwrap().new_records, 3);
            assert_eq!(lost(&store, &other), 3);
            assert_eq!(store.node(&n).unwrap().uplink_seq, 10);
        }
        let store = open(&dir);
        assert_eq!(store.gaps(&n).unwrap(), vec![(2, 6), (7, 8), (10, 10)]);
        assert_eq!(lost(&store, &n), 8);
        assert_eq!(lost(&store, &other), 3);
        // Resent after the reopen: still counted once.
        assert_eq!(store.commit_gap(&n, 2, 10).await.unwrap().new_records, 0);
        assert_eq!(lost(&store, &n), 8);
        let json = serde_json::to_value(store.node(&n).unwrap()).unwrap();
        assert_eq!(json["lost_records"], 8);
    }

    #[tokio::test]
    async fn flush_persists_status_and_last_seen_rides_on_commits() {
        let dir = tempfile::tempdir().unwrap();
        let n = node("gw-1");
        {
            let store = open(&dir);
            store
                .node_connected(&n, ConnInfo::default(), 1_000)
                .unwrap();
            store.node_seen(&n, 5_000, 3).unwrap();
            store
                .commit_batch(&n, 1, &[sample("d", "p", 1, 1)])
                .await
                .unwrap();
            store.node_seen(&n, 9_000, 0).unwrap();
            store.flush().await.unwrap();
        }
        let store = open(&dir);
        // node_seen alone is memory only; the commit carried 5_000 to disk.
        assert_eq!(store.node(&n).unwrap().last_seen_ms, Some(5_000));
        assert_eq!(store.node(&n).unwrap().uplink_seq, 1);
    }

    /// One step of the model test.
    #[derive(Debug, Clone)]
    enum Op {
        /// Commit `records` for node `node`, starting at `stored + 1 + offset` (at least 1).
        Commit {
            node: u8,
            offset: i8,
            records: Vec<(u8, u8, i64)>,
        },
        /// Record a gap of `len` records for node `node`, from `stored + 1 + offset`.
        Gap { node: u8, offset: i8, len: u8 },
        /// Close and reopen the store.
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u8..3, -3i8..=1, prop::collection::vec((0u8..2, 0u8..3, any::<i64>()), 0..5))
                .prop_map(|(node, offset, records)| Op::Commit { node, offset, records }),
            1 => (0u8..3, -2i8..=1, 1u8..4)
                .prop_map(|(node, offset, len)| Op::Gap { node, offset, len }),
            1 => Just(Op::Reopen),
        ]
    }

    #[derive(Default)]
    struct Model {
        seq: u64,
        history: Vec<(u64, Sample)>,
        gaps: Vec<(u64, u64)>,
        twins: BTreeMap<DeviceId, BTreeMap<PropertyId, Option<Value>>>,
    }

    fn check(store: &HubStore, model: &HashMap<u8, Model>) {
        for (i, m) in model {
            let n = node(&format!("n{i}"));
            assert_eq!(store.stored_seq(&n).unwrap(), m.seq);
            assert_eq!(store.records(&n, 1).unwrap(), m.history);
            assert_eq!(store.gaps(&n).unwrap(), m.gaps);
            let lost: u64 = m.gaps.iter().map(|(from, to)| to - from + 1).sum();
            assert_eq!(store.node(&n).map_or(0, |s| s.lost_records), lost);
            assert_eq!(
                store.devices(&n),
                m.twins.keys().cloned().collect::<Vec<_>>()
            );
            for (d, props) in &m.twins {
                let twin = store.twin(&n, d).unwrap();
                let got: BTreeMap<PropertyId, Option<Value>> = twin
                    .reported
                    .into_iter()
                    .map(|(p, r)| (p, r.value))
                    .collect();
                assert_eq!(&got, props);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn store_matches_model(ops in prop::collection::vec(op(), 1..25)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let mut store = Some(open(&dir));
            let mut model: HashMap<u8, Model> = HashMap::new();
            let mut ts = 0u64;
            for op in ops {
                match op {
                    Op::Reopen => {
                        drop(store.take());
                        store = Some(open(&dir));
                    }
                    Op::Commit { node: i, offset, records } => {
                        let s = store.as_ref().unwrap();
                        let n = node(&format!("n{i}"));
                        let m = model.entry(i).or_default();
                        let stored = m.seq;
                        let first = (stored as i64 + 1 + i64::from(offset)).max(1) as u64;
                        let samples: Vec<Sample> = records
                            .iter()
                            .map(|(d, p, v)| {
                                ts += 1;
                                sample(&format!("d{d}"), &format!("p{p}"), *v, ts)
                            })
                            .collect();
                        let result = rt.block_on(s.commit_batch(&n, first, &samples));
                        if samples.is_empty() {
                            prop_assert_eq!(result.unwrap().accepted, 0);
                        } else if first > stored + 1 {
                            let gap = matches!(result, Err(StoreError::Gap { expected, got })
                                if expected == stored + 1 && got == first);
                            prop_assert!(gap);
                        } else {
                            let dup = (stored + 1 - first).min(samples.len() as u64) as usize;
                            let out = result.unwrap();
                            prop_assert_eq!(out.duplicates, dup);
                            prop_assert_eq!(out.accepted, samples.len() - dup);
                            for s in &samples[dup..] {
                                m.seq += 1;
                                m.history.push((m.seq, s.clone()));
                                m.twins
                                    .entry(s.device.clone())
                                    .or_default()
                                    .insert(s.property.clone(), s.value.clone());
                            }
                            prop_assert_eq!(out.stored_seq, m.seq);
                        }
                    }
                    Op::Gap { node: i, offset, len } => {
                        let s = store.as_ref().unwrap();
                        let n = node(&format!("n{i}"));
                        let m = model.entry(i).or_default();
                        let from = (m.seq as i64 + 1 + i64::from(offset)).max(1) as u64;
                        let to = from + u64::from(len) - 1;
                        let result = rt.block_on(s.commit_gap(&n, from, to));
                        if from > m.seq + 1 {
                            let gap = matches!(result, Err(StoreError::Gap { expected, got })
                                if expected == m.seq + 1 && got == from);
                            prop_assert!(gap);
                        } else {
                            let mut new_records = 0;
                            if to > m.seq {
                                new_records = to - m.seq;
                                m.gaps.push((m.seq + 1, to));
                                m.seq = to;
                            }
                            let out = result.unwrap();
                            prop_assert_eq!(out.stored_seq, m.seq);
                            prop_assert_eq!(out.new_records, new_records);
                        }
                    }
                }
                check(store.as_ref().unwrap(), &model);
            }
            drop(store.take());
            check(&open(&dir), &model);
        }
    }
}
