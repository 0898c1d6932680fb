//! Tunnel frames and their codec.
//!
//! On the wire a frame is a 4-byte big-endian length followed by that many bytes of a protobuf
//! [`Frame`] message. Protobuf lets a newer peer add fields (an older peer skips unknown tags)
//! and new message kinds (an older peer decodes them as a frame with no known body and reports
//! [`FrameError::UnknownMessage`] for that frame only, without losing the stream).
//!
//! Invariants: no frame larger than the configured limit is ever buffered or produced; a
//! decoder never panics and never allocates more than `max_frame_len` for one frame.

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;

use crate::ids::{DeviceId, INLINE_ID_LEN, IdError, PropertyId};
use crate::value::{BadReason, Quality, Sample, Timestamp, Value};

/// Protocol versions this build speaks, newest last.
///
/// - 1: hello/welcome, records, acks, resend, ping, goodbye.
/// - 2: adds the downlink of desired values ([`DesiredFrame`]), the edge's control log
///   ([`Control`], acknowledged by [`ControlAck`]: outcomes of desired values and local
///   proposals) and the device schema ([`DeviceSchema`]). A peer that negotiated 1 neither
///   sends nor receives them.
pub const SUPPORTED_VERSIONS: &[u32] = &[1, 2];

/// The first protocol version with desired values, control records and schemas.
pub const VERSION_DESIRED: u32 = 2;

/// Default largest frame accepted or produced (1 MiB).
pub const DEFAULT_MAX_FRAME_LEN: usize = 1 << 20;

/// Length prefix size in bytes.
pub const LEN_PREFIX: usize = 4;
/// Most samples in one records frame. Checked before the frame is decoded, so that a frame of
/// tiny samples cannot make the receiver allocate far more than the frame's bytes. The
/// agent's `batch_max_records` cannot exceed it.
pub const MAX_FRAME_SAMPLES: usize = 8_192;

/// One frame of the tunnel.
#[derive(Clone, PartialEq, Message)]
pub struct Frame {
    /// What the frame carries; `None` when a newer peer sent a kind this build does not know.
    #[prost(oneof = "Body", tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12")]
    pub body: Option<Body>,
}

/// The kinds of frames.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Body {
    /// Edge → hub, first frame of a connection.
    #[prost(message, tag = "1")]
    Hello(Hello),
    /// Hub → edge, answer to hello.
    #[prost(message, tag = "2")]
    Welcome(Welcome),
    /// Edge → hub, a run of consecutive records.
    #[prost(message, tag = "3")]
    Records(Records),
    /// Hub → edge, cumulative acknowledgement of durably stored records.
    #[prost(message, tag = "4")]
    Ack(Ack),
    /// Hub → edge, "I expected this sequence number next": resend from there.
    #[prost(message, tag = "5")]
    Resend(Resend),
    /// Either way, keep-alive probe.
    #[prost(message, tag = "6")]
    Ping(Ping),
    /// Either way, answer to a ping.
    #[prost(message, tag = "7")]
    Pong(Ping),
    /// Either way, the sender is closing the session (with a reason).
    #[prost(message, tag = "8")]
    Goodbye(Goodbye),
    /// Hub → edge (version 2), a desired value with its version.
    #[prost(message, tag = "9")]
    Desired(DesiredFrame),
    /// Edge → hub (version 2), one record of the edge's control log.
    #[prost(message, tag = "10")]
    Control(Control),
    /// Hub → edge (version 2), cumulative acknowledgement of durably stored control records.
    #[prost(message, tag = "11")]
    ControlAck(ControlAck),
    /// Edge → hub (version 2), the properties of one device (sent after every welcome).
    #[prost(message, tag = "12")]
    Schema(DeviceSchema),
}

/// A desired value: hub → edge, delivered in version order.
#[derive(Clone, PartialEq, Message)]
pub struct DesiredFrame {
    /// Device id.
    #[prost(string, tag = "1")]
    pub device: String,
    /// Property id.
    #[prost(string, tag = "2")]
    pub property: String,
    /// The value.
    #[prost(oneof = "WireValue", tags = "3, 4, 5, 6, 7")]
    pub value: Option<WireValue>,
    /// Its version: the node's downlink sequence number (1, 2, ...).
    #[prost(uint64, tag = "8")]
    pub version: u64,
    /// 0 = set by an operator through the hub, 1 = a local change of the edge the hub accepted.
    #[prost(uint32, tag = "9")]
    pub origin: u32,
    /// When it was set, ms since the Unix epoch.
    #[prost(uint64, tag = "10")]
    pub set_ms: u64,
}

/// One record of the edge's control log (edge → hub), numbered by the edge.
#[derive(Clone, PartialEq, Message)]
pub struct Control {
    /// The record's sequence number in the control log (1, 2, ...).
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// What it says.
    #[prost(oneof = "ControlKind", tags = "2, 3, 4")]
    pub kind: Option<ControlKind>,
}

/// The kinds of control records.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ControlKind {
    /// What became of a desired version.
    #[prost(message, tag = "2")]
    Status(DesiredStatus),
    /// A local app changed a desired value: compare-and-set against `base_version`.
    #[prost(message, tag = "3")]
    Proposal(Proposal),
    /// A local rule raised or cleared an alarm, or sent a record upstream. (A hub that
    /// predates rules stores the record's sequence number and ignores its content.)
    #[prost(message, tag = "4")]
    Rule(RuleEvent),
}

/// What a local rule sent to the hub.
#[derive(Clone, PartialEq, Message)]
pub struct RuleEvent {
    /// The rule id.
    #[prost(string, tag = "1")]
    pub rule: String,
    /// The device the output belongs to.
    #[prost(string, tag = "2")]
    pub device: String,
    /// What happened ([`RULE_RECORD`], [`RULE_ALARM_RAISED`], [`RULE_ALARM_CLEARED`]).
    #[prost(uint32, tag = "3")]
    pub kind: u32,
    /// When, ms since the Unix epoch (an alarm: raised or cleared).
    #[prost(uint64, tag = "4")]
    pub ts_ms: u64,
    /// An alarm's severity.
    #[prost(string, tag = "5")]
    pub severity: String,
    /// The rule's output fields, a JSON object.
    #[prost(string, tag = "6")]
    pub fields_json: String,
    /// An alarm: since when its condition held, ms since the Unix epoch.
    #[prost(uint64, tag = "7")]
    pub since_ms: u64,
    /// An alarm's labels, a JSON object of strings.
    #[prost(string, tag = "8")]
    pub labels_json: String,
    /// An alarm: when it was raised (also on its clearing record), ms since the Unix epoch.
    #[prost(uint64, tag = "9")]
    pub raised_ms: u64,
}

/// [`RuleEvent::kind`]: an output record.
pub const RULE_RECORD: u32 = 0;
/// [`RuleEvent::kind`]: an alarm was raised.
pub const RULE_ALARM_RAISED: u32 = 1;
/// [`RuleEvent::kind`]: an alarm was cleared.
pub const RULE_ALARM_CLEARED: u32 = 2;

/// What became of a desired version on the edge.
#[derive(Clone, PartialEq, Message)]
pub struct DesiredStatus {
    /// Device id.
    #[prost(string, tag = "1")]
    pub device: String,
    /// Property id.
    #[prost(string, tag = "2")]
    pub property: String,
    /// The desired version (0 = a local change not yet accepted by the hub).
    #[prost(uint64, tag = "8")]
    pub version: u64,
    /// Outcome code (see `desired::Outcome::to_wire`).
    #[prost(uint32, tag = "9")]
    pub outcome: u32,
    /// Modbus exception code for outcome `exception`.
    #[prost(uint32, tag = "10")]
    pub exception_code: u32,
    /// Reason for outcome `refused`.
    #[prost(string, tag = "11")]
    pub detail: String,
    /// When the outcome was reached, ms since the Unix epoch.
    #[prost(uint64, tag = "12")]
    pub ts_ms: u64,
}

/// A local desired change, proposed to the hub.
#[derive(Clone, PartialEq, Message)]
pub struct Proposal {
    /// Device id.
    #[prost(string, tag = "1")]
    pub device: String,
    /// Property id.
    #[prost(string, tag = "2")]
    pub property: String,
    /// The value the local app set.
    #[prost(oneof = "WireValue", tags = "3, 4, 5, 6, 7")]
    pub value: Option<WireValue>,
    /// The desired version the local change was based on (0 = none).
    #[prost(uint64, tag = "8")]
    pub base_version: u64,
    /// When the local app set it, ms since the Unix epoch.
    #[prost(uint64, tag = "9")]
    pub set_ms: u64,
}

/// Every control record up to and including `upto` is durably stored by the hub.
#[derive(Clone, PartialEq, Message)]
pub struct ControlAck {
    /// Highest control sequence number stored.
    #[prost(uint64, tag = "1")]
    pub upto: u64,
}

/// The properties of one device, as the edge's config defines them.
#[derive(Clone, PartialEq, Message)]
pub struct DeviceSchema {
    /// Device id.
    #[prost(string, tag = "1")]
    pub device: String,
    /// Its properties, in tag order.
    #[prost(message, repeated, tag = "2")]
    pub properties: Vec<PropertySchema>,
}

/// One property of a device.
#[derive(Clone, PartialEq, Message)]
pub struct PropertySchema {
    /// Property id.
    #[prost(string, tag = "1")]
    pub property: String,
    /// Value kind: `bool`, `int`, `uint`, `float` or `string`.
    #[prost(string, tag = "2")]
    pub kind: String,
    /// Whether it may be written.
    #[prost(bool, tag = "3")]
    pub writable: bool,
    /// Engineering unit.
    #[prost(string, tag = "4")]
    pub unit: String,
    /// Smallest value that can be written (numbers), if bounded.
    #[prost(double, optional, tag = "5")]
    pub min: Option<f64>,
    /// Largest value that can be written (numbers), if bounded.
    #[prost(double, optional, tag = "6")]
    pub max: Option<f64>,
}

/// First frame from the edge.
#[derive(Clone, PartialEq, Message)]
pub struct Hello {
    /// Protocol versions the edge speaks.
    #[prost(uint32, repeated, tag = "1")]
    pub versions: Vec<u32>,
    /// The agent's version string.
    #[prost(string, tag = "2")]
    pub agent_version: String,
    /// Random id of this agent process run.
    #[prost(string, tag = "3")]
    pub boot_id: String,
    /// The sequence number the edge will give its next record.
    #[prost(uint64, tag = "4")]
    pub next_seq: u64,
    /// The last downlink sequence number the edge applied.
    #[prost(uint64, tag = "5")]
    pub last_downlink_seq: u64,
    /// The config bundle version the edge runs.
    #[prost(uint64, tag = "6")]
    pub config_version: u64,
    /// Records waiting in the edge's outbox.
    #[prost(uint64, tag = "7")]
    pub backlog: u64,
    /// The lowest sequence number the edge can still send: records below it that the hub has
    /// not stored are lost (dropped or refused by a full outbox, or acknowledged by an earlier
    /// hub whose store was rolled back), and the hub records them as a gap. With an empty
    /// outbox it is the next sequence number; agents before 0.2 sent 0 then (no gap).
    #[prost(uint64, tag = "8")]
    pub oldest_seq: u64,
    /// Random id of the edge's outbox, created with it: a new id means the agent's data
    /// directory was lost or replaced (empty from agents before 0.2).
    #[prost(string, tag = "9")]
    pub store_id: String,
    /// (Version 2) The lowest control sequence number the edge can still send: control
    /// records below it that the hub has not stored are lost (its store was rolled back
    /// behind the edge's acknowledgements). 0 from agents before 0.2.
    #[prost(uint64, tag = "10")]
    pub control_oldest_seq: u64,
}

/// The hub's answer to [`Hello`].
#[derive(Clone, PartialEq, Message)]
pub struct Welcome {
    /// The protocol version chosen (the highest both speak).
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// The last uplink sequence number the hub has durably stored for this node (0 = none).
    #[prost(uint64, tag = "2")]
    pub stored_seq: u64,
    /// The hub's version string.
    #[prost(string, tag = "3")]
    pub hub_version: String,
    /// The node id the hub took from the edge's certificate.
    #[prost(string, tag = "4")]
    pub node: String,
    /// (Version 2) The last control record the hub has durably stored for this node.
    #[prost(uint64, tag = "5")]
    pub control_seq: u64,
}

/// A run of records with consecutive sequence numbers.
#[derive(Clone, PartialEq, Message)]
pub struct Records {
    /// Sequence number of the first record; record `i` has `first_seq + i`.
    #[prost(uint64, tag = "1")]
    pub first_seq: u64,
    /// The records.
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<WireSample>,
    /// Records still waiting in the edge's outbox after this batch.
    #[prost(uint64, tag = "3")]
    pub backlog: u64,
}

/// Cumulative ack: every record up to and including `stored_seq` is durably stored.
#[derive(Clone, PartialEq, Message)]
pub struct Ack {
    /// Highest sequence number stored (all lower ones are stored too).
    #[prost(uint64, tag = "1")]
    pub stored_seq: u64,
}

/// The hub saw a gap: it needs records from `from_seq` on.
#[derive(Clone, PartialEq, Message)]
pub struct Resend {
    /// The next sequence number the hub expects.
    #[prost(uint64, tag = "1")]
    pub from_seq: u64,
}

/// Keep-alive.
#[derive(Clone, PartialEq, Message)]
pub struct Ping {
    /// Opaque value echoed by the pong.
    #[prost(uint64, tag = "1")]
    pub nonce: u64,
}

/// Orderly close.
#[derive(Clone, PartialEq, Message)]
pub struct Goodbye {
    /// Why the sender closes.
    #[prost(string, tag = "1")]
    pub reason: String,
}

/// A sample as carried on the wire (ids not yet validated).
#[derive(Clone, PartialEq, Message)]
pub struct WireSample {
    /// Device id (UTF-8; a protobuf `string`, decoded as bytes so that a frame's ids are
    /// slices of it, not allocations: see [`IdCache`]).
    #[prost(bytes = "bytes", tag = "1")]
    pub device: bytes::Bytes,
    /// Property id (UTF-8, as `device`).
    #[prost(bytes = "bytes", tag = "2")]
    pub property: bytes::Bytes,
    /// The value, absent when the tag has never been read successfully.
    #[prost(oneof = "WireValue", tags = "3, 4, 5, 6, 7")]
    pub value: Option<WireValue>,
    /// 0 good, 1 timeout, 2 exception (see `exception_code`), 3 disconnected, 4 decode error,
    /// 5 bad response.
    #[prost(uint32, tag = "8")]
    pub quality: u32,
    /// Modbus exception code when `quality` is 2.
    #[prost(uint32, tag = "9")]
    pub exception_code: u32,
    /// Milliseconds since the Unix epoch when the agent read it.
    #[prost(uint64, tag = "10")]
    pub ts_ms: u64,
}

/// A value on the wire.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum WireValue {
    /// Boolean.
    #[prost(bool, tag = "3")]
    Bool(bool),
    /// Signed integer.
    #[prost(sint64, tag = "4")]
    Int(i64),
    /// Unsigned integer.
    #[prost(uint64, tag = "5")]
    UInt(u64),
    /// Float.
    #[prost(double, tag = "6")]
    Float(f64),
    /// String.
    #[prost(string, tag = "7")]
    Str(String),
}

/// A list of samples, the unit stored in outbox and hub logs.
#[derive(Clone, PartialEq, Message)]
pub struct SampleBatch {
    /// The samples.
    #[prost(message, repeated, tag = "1")]
    pub samples: Vec<WireSample>,
}

/// What can be wrong with bytes from a peer or a store.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix announces more than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not a valid protobuf message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The frame decoded but carries a message kind this build does not know.
    #[error("unknown message kind (a newer peer?)")]
    UnknownMessage,
    /// A records frame carries more samples than the limit (counted before decoding).
    #[error("records frame of {count} samples exceeds the limit of {max}")]
    TooManySamples {
        /// Samples counted (up to one past the limit).
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A sample in a frame is invalid.
    #[error("sample {index}: {reason}")]
    InvalidSample {
        /// Position of the sample in its frame.
        index: usize,
        /// What is wrong.
        reason: String,
    },
}

impl From<prost::DecodeError> for FrameError {
    fn from(e: prost::DecodeError) -> Self {
        FrameError::Malformed(e.to_string())
    }
}

impl From<&Sample> for WireSample {
    fn from(s: &Sample) -> Self {
        let (quality, exception_code) = match s.quality {
            Quality::Good => (0, 0),
            Quality::Bad(BadReason::Timeout) => (1, 0),
            Quality::Bad(BadReason::Exception(c)) => (2, u32::from(c)),
            Quality::Bad(BadReason::Disconnected) => (3, 0),
            Quality::Bad(BadReason::DecodeError) => (4, 0),
            Quality::Bad(BadReason::BadResponse) => (5, 0),
        };
        WireSample {
            device: bytes::Bytes::copy_from_slice(s.device.as_str().as_bytes()),
            property: bytes::Bytes::copy_from_slice(s.property.as_str().as_bytes()),
            value: s.value.as_ref().map(|v| match v {
                Value::Bool(b) => WireValue::Bool(*b),
                Value::Int(i) => WireValue::Int(*i),
                Value::UInt(u) => WireValue::UInt(*u),
                Value::Float(f) => WireValue::Float(*f),
                Value::Str(s) => WireValue::Str(s.clone()),
            }),
            quality,
            exception_code,
            ts_ms: s.ts.0,
        }
    }
}

/// Ids already validated on one connection: a record's device and property ids longer than
/// [`INLINE_ID_LEN`] are looked up here instead of being validated and allocated again (a node
/// sends the same few thousand ids over and over). Shorter ids are held inline: validating and
/// copying one costs less than the lookup, so they are not kept. Bounded: past
/// [`IdCache::MAX_IDS`] ids of a kind, that kind starts afresh.
#[derive(Debug, Default)]
pub struct IdCache {
    devices: std::collections::HashMap<Box<str>, DeviceId>,
    properties: std::collections::HashMap<Box<str>, PropertyId>,
}

impl IdCache {
    /// Most ids of each kind kept.
    pub const MAX_IDS: usize = 100_000;

    fn device(&mut self, b: &[u8]) -> Result<DeviceId, String> {
        cached(&mut self.devices, b, "device", |s| DeviceId::new(s))
    }

    fn property(&mut self, b: &[u8]) -> Result<PropertyId, String> {
        cached(&mut self.properties, b, "property", |s| PropertyId::new(s))
    }

    /// Ids of each kind held (for tests).
    pub fn counts(&self) -> (usize, usize) {
        (self.devices.len(), self.properties.len())
    }
}

/// The id spelled `b`: from `map`, or validated by `make` and kept there.
fn cached<T: Clone>(
    map: &mut std::collections::HashMap<Box<str>, T>,
    b: &[u8],
    kind: &str,
    make: fn(&str) -> Result<T, IdError>,
) -> Result<T, String> {
    let s = std::str::from_utf8(b).map_err(|_| format!("{kind} id is not UTF-8"))?;
    if s.len() <= INLINE_ID_LEN {
        return make(s).map_err(|e| e.to_string());
    }
    if let Some(id) = map.get(s) {
        return Ok(id.clone());
    }
    let id = make(s).map_err(|e| e.to_string())?;
    if map.len() >= IdCache::MAX_IDS {
        map.clear();
    }
    map.insert(s.into(), id.clone());
    Ok(id)
}

impl WireSample {
    /// Validates the sample (ids, quality code) into a [`Sample`].
    pub fn into_sample(self) -> Result<Sample, String> {
        self.into_sample_with(&mut IdCache::default())
    }

    /// [`WireSample::into_sample`], with ids validated before taken from `ids`.
    pub fn into_sample_with(self, ids: &mut IdCache) -> Result<Sample, String> {
        let device = ids.device(&self.device)?;
        let property = ids.property(&self.property)?;
        let quality = match self.quality {
            0 => Quality::Good,
            1 => Quality::Bad(BadReason::Timeout),
            2 => {
                let code = u8::try_from(self.exception_code)
                    .map_err(|_| format!("exception code {} out of range", self.exception_code))?;
                Quality::Bad(BadReason::Exception(code))
            }
            3 => Quality::Bad(BadReason::Disconnected),
            4 => Quality::Bad(BadReason::DecodeError),
            5 => Quality::Bad(BadReason::BadResponse),
            other => return Err(format!("unknown quality code {other}")),
        };
        let value = self.value.map(|v| match v {
            WireValue::Bool(b) => Value::Bool(b),
            WireValue::Int(i) => Value::Int(i),
            WireValue::UInt(u) => Value::UInt(u),
            WireValue::Float(f) => Value::Float(f),
            WireValue::Str(s) => Value::Str(s),
        });
        Ok(Sample {
            device,
            property,
            value,
            quality,
            ts: Timestamp(self.ts_ms),
        })
    }
}

/// A value as carried on the wire.
pub fn value_to_wire(v: &Value) -> WireValue {
    match v {
        Value::Bool(b) => WireValue::Bool(*b),
        Value::Int(i) => WireValue::Int(*i),
        Value::UInt(u) => WireValue::UInt(*u),
        Value::Float(f) => WireValue::Float(*f),
        Value::Str(s) => WireValue::Str(s.clone()),
    }
}

/// A wire value as a value.
pub fn value_from_wire(v: WireValue) -> Value {
    match v {
        WireValue::Bool(b) => Value::Bool(b),
        WireValue::Int(i) => Value::Int(i),
        WireValue::UInt(u) => Value::UInt(u),
        WireValue::Float(f) => Value::Float(f),
        WireValue::Str(s) => Value::Str(s),
    }
}

/// Validates a list of wire samples.
pub fn samples_from_wire(wire: Vec<WireSample>) -> Result<Vec<Sample>, FrameError> {
    samples_from_wire_with(wire, &mut IdCache::default())
}

/// [`samples_from_wire`], with the ids of earlier samples (on this connection) from `ids`.
pub fn samples_from_wire_with(
    wire: Vec<WireSample>,
    ids: &mut IdCache,
) -> Result<Vec<Sample>, FrameError> {
    wire.into_iter()
        .enumerate()
        .map(|(index, w)| {
            w.into_sample_with(ids)
                .map_err(|reason| FrameError::InvalidSample { index, reason })
        })
        .collect()
}

/// Encodes samples compactly (the unit of outbox and hub log entries).
///
/// The bytes are those of a [`SampleBatch`] of [`WireSample`]s, written straight from the
/// samples (no intermediate strings: this runs for every outbox commit).
pub fn encode_samples(samples: &[Sample]) -> Vec<u8> {
    encode_samples_of(samples.iter())
}

/// [`encode_samples`] of the samples `samples` yields (iterated twice: sized, then written), so
/// that a caller holding them elsewhere need not clone them into a slice.
pub fn encode_samples_of<'a, I>(samples: I) -> Vec<u8>
where
    I: Iterator<Item = &'a Sample> + Clone,
{
    let len: usize = samples.clone().map(|s| wire::nested_len(1, s)).sum();
    let mut out = Vec::with_capacity(len);
    for s in samples {
        wire::nested(1, s, &mut out);
    }
    out
}

/// Appends a length-prefixed [`Body::Records`] frame of `samples` to `out`, byte for byte what
/// [`encode_frame`] writes for `Records { first_seq, samples: samples.map(WireSample::from),
/// backlog }`, without building the [`WireSample`]s (the uplink's hot path).
///
/// Fails (appending nothing) when the encoded frame would exceed `max_frame_len`.
pub fn encode_records<'a, I>(
    first_seq: u64,
    samples: I,
    backlog: u64,
    max_frame_len: usize,
    out: &mut BytesMut,
) -> Result<(), FrameError>
where
    I: Iterator<Item = &'a Sample> + Clone,
{
    let samples_len = samples.clone().map(|s| wire::nested_len(2, s)).sum();
    records_frame(first_seq, samples_len, backlog, max_frame_len, out, |out| {
        for s in samples {
            wire::nested(2, s, out);
        }
        Ok(())
    })
}

/// Appends a length-prefixed [`Body::Records`] frame with `first_seq`, `backlog` and samples
/// of `samples_len` bytes, which `write_samples` appends (each as field 2). Fails, appending
/// nothing, when the frame would exceed `max_frame_len` or `write_samples` fails.
fn records_frame(
    first_seq: u64,
    samples_len: usize,
    backlog: u64,
    max_frame_len: usize,
    out: &mut BytesMut,
    write_samples: impl FnOnce(&mut BytesMut) -> Result<(), FrameError>,
) -> Result<(), FrameError> {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
    let varint_field = |tag: u32, v: u64| {
        if v == 0 {
            0
        } else {
            key_len(tag) + encoded_len_varint(v)
        }
    };
    let records_len = varint_field(1, first_seq) + samples_len + varint_field(3, backlog);
    let len = key_len(3) + encoded_len_varint(records_len as u64) + records_len;
    if len > max_frame_len || u32::try_from(len).is_err() {
        return Err(FrameError::TooLarge {
            len,
            max: max_frame_len,
        });
    }
    let mark = out.len();
    out.reserve(LEN_PREFIX + len);
    out.put_u32(len as u32);
    encode_key(3, WireType::LengthDelimited, out);
    encode_varint(records_len as u64, out);
    if first_seq != 0 {
        encode_key(1, WireType::Varint, out);
        encode_varint(first_seq, out);
    }
    if let Err(e) = write_samples(out) {
        out.truncate(mark);
        return Err(e);
    }
    if backlog != 0 {
        encode_key(3, WireType::Varint, out);
        encode_varint(backlog, out);
    }
    Ok(())
}

/// The byte range that samples `samples` (by index) take in `batch`, an [`encode_samples`]
/// batch; fails on bytes that are not a sequence of samples or when the batch is too short.
pub fn batch_range(
    batch: &[u8],
    samples: std::ops::Range<usize>,
) -> Result<std::ops::Range<usize>, FrameError> {
    let malformed = || FrameError::Malformed("truncated sample batch".into());
    let (mut at, mut index, mut start) = (0, 0, None);
    loop {
        if index == samples.start {
            start = Some(at);
        }
        if index == samples.end {
            return Ok(start.unwrap_or(at)..at);
        }
        if at >= batch.len() {
            return Err(malformed());
        }
        if read_varint(batch, &mut at) != Some(SAMPLE_KEY) {
            return Err(malformed());
        }
        skip_field(batch, &mut at, 2).ok_or_else(malformed)?;
        index += 1;
    }
}

/// The key of a sample in a [`SampleBatch`] (field 1, length-delimited).
const SAMPLE_KEY: u64 = 1 << 3 | 2;
/// The key of a sample in [`Records`] (field 2, length-delimited).
const RECORD_KEY: u8 = 2 << 3 | 2;

/// Appends a length-prefixed [`Body::Records`] frame whose samples are `batches` (each a whole
/// [`encode_samples`] batch, e.g. cut with [`batch_range`]), in order: byte for byte what
/// [`encode_records`] writes for the decoded samples, by copying (a sample's bytes are the
/// same in both; only its field number differs).
///
/// Fails (appending nothing) when the frame would exceed `max_frame_len` or a batch is not a
/// sequence of samples.
pub fn encode_records_batches(
    first_seq: u64,
    batches: &[&[u8]],
    backlog: u64,
    max_frame_len: usize,
    out: &mut BytesMut,
) -> Result<(), FrameError> {
    let samples_len = batches.iter().map(|b| b.len()).sum();
    records_frame(first_seq, samples_len, backlog, max_frame_len, out, |out| {
        for batch in batches {
            let base = out.len();
            out.extend_from_slice(batch);
            // Each sample's key becomes field 2 (both keys are one byte).
            let mut at = 0;
            while at < batch.len() {
                if read_varint(batch, &mut at) != Some(SAMPLE_KEY) {
                    return Err(FrameError::Malformed("not a sample batch".into()));
                }
                out[base + at - 1] = RECORD_KEY;
                skip_field(batch, &mut at, 2)
                    .ok_or_else(|| FrameError::Malformed("truncated sample batch".into()))?;
            }
        }
        Ok(())
    })
}

/// [`WireSample`]'s encoding written from a borrowed [`Sample`] (same bytes as prost's).
mod wire {
    use bytes::BufMut;
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

    use super::{BadReason, Quality, Sample, Value};

    fn quality(q: Quality) -> (u32, u32) {
        match q {
            Quality::Good => (0, 0),
            Quality::Bad(BadReason::Timeout) => (1, 0),
            Quality::Bad(BadReason::Exception(c)) => (2, u32::from(c)),
            Quality::Bad(BadReason::Disconnected) => (3, 0),
            Quality::Bad(BadReason::DecodeError) => (4, 0),
            Quality::Bad(BadReason::BadResponse) => (5, 0),
        }
    }

    fn zigzag(i: i64) -> u64 {
        ((i << 1) ^ (i >> 63)) as u64
    }

    fn str_len(tag: u32, s: &str) -> usize {
        key_len(tag) + encoded_len_varint(s.len() as u64) + s.len()
    }

    fn varint_len(tag: u32, v: u64) -> usize {
        if v == 0 {
            0
        } else {
            key_len(tag) + encoded_len_varint(v)
        }
    }

    /// Length of the sample's fields (the message body).
    fn body_len(s: &Sample) -> usize {
        let (q, code) = quality(s.quality);
        let value = match &s.value {
            None => 0,
            // Oneof members are written even when they hold the default value.
            Some(Value::Bool(_)) => key_len(3) + 1,
            Some(Value::Int(i)) => key_len(4) + encoded_len_varint(zigzag(*i)),
            Some(Value::UInt(u)) => key_len(5) + encoded_len_varint(*u),
            Some(Value::Float(_)) => key_len(6) + 8,
            Some(Value::Str(v)) => str_len(7, v),
        };
        str_len(1, s.device.as_str())
            + str_len(2, s.property.as_str())
            + value
            + varint_len(8, u64::from(q))
            + varint_len(9, u64::from(code))
            + varint_len(10, s.ts.0)
    }

    /// Length of the sample as field `tag` of its container.
    pub(super) fn nested_len(tag: u32, s: &Sample) -> usize {
        let body = body_len(s);
        key_len(tag) + encoded_len_varint(body as u64) + body
    }

    fn put_str(tag: u32, v: &str, out: &mut impl BufMut) {
        encode_key(tag, WireType::LengthDelimited, out);
        encode_varint(v.len() as u64, out);
        let b = v.as_bytes();
        if b.len() <= 16 {
            // Ids are a few bytes: a call to `memcpy` cost more than copying them here
            // (2.8 % of the agent's CPU in a profile of 10,000 samples a second).
            for &x in b {
                out.put_u8(x);
            }
        } else {
            out.put_slice(b);
        }
    }

    fn put_varint(tag: u32, v: u64, out: &mut impl BufMut) {
        if v != 0 {
            encode_key(tag, WireType::Varint, out);
            encode_varint(v, out);
        }
    }

    /// Writes the sample as field `tag` of its container.
    pub(super) fn nested(tag: u32, s: &Sample, out: &mut impl BufMut) {
        encode_key(tag, WireType::LengthDelimited, out);
        encode_varint(body_len(s) as u64, out);
        put_str(1, s.device.as_str(), out);
        put_str(2, s.property.as_str(), out);
        match &s.value {
            None => {}
            Some(Value::Bool(b)) => {
                encode_key(3, WireType::Varint, out);
                encode_varint(u64::from(*b), out);
            }
            Some(Value::Int(i)) => {
                encode_key(4, WireType::Varint, out);
                encode_varint(zigzag(*i), out);
            }
            Some(Value::UInt(u)) => {
                encode_key(5, WireType::Varint, out);
                encode_varint(*u, out);
            }
            Some(Value::Float(f)) => {
                encode_key(6, WireType::SixtyFourBit, out);
                out.put_f64_le(*f);
            }
            Some(Value::Str(v)) => put_str(7, v, out),
        }
        let (q, code) = quality(s.quality);
        put_varint(8, u64::from(q), out);
        put_varint(9, u64::from(code), out);
        put_varint(10, s.ts.0, out);
    }
}

/// Decodes what [`encode_samples`] wrote, validating every sample.
pub fn decode_samples(bytes: &[u8]) -> Result<Vec<Sample>, FrameError> {
    let batch = SampleBatch::decode(bytes)?;
    samples_from_wire(batch.samples)
}

/// How many samples an [`encode_samples`] batch holds, without decoding them (fails on bytes
/// that are not a well-formed sequence of fields).
pub fn count_samples(bytes: &[u8]) -> Result<usize, FrameError> {
    let malformed = || FrameError::Malformed("truncated sample batch".into());
    let mut count = 0;
    let mut at = 0;
    while at < bytes.len() {
        let key = read_varint(bytes, &mut at).ok_or_else(malformed)?;
        if key >> 3 == 1 && key & 7 == 2 {
            count += 1;
        }
        skip_field(bytes, &mut at, key & 7).ok_or_else(malformed)?;
    }
    Ok(count)
}

/// Appends `frame`, length-prefixed, to `out`.
///
/// Fails (appending nothing) when the encoded frame would exceed `max_frame_len`.
pub fn encode_frame(
    frame: &Frame,
    max_frame_len: usize,
    out: &mut BytesMut,
) -> Result<(), FrameError> {
    let len = frame.encoded_len();
    if len > max_frame_len || u32::try_from(len).is_err() {
        return Err(FrameError::TooLarge {
            len,
            max: max_frame_len,
        });
    }
    out.reserve(LEN_PREFIX + len);
    out.put_u32(len as u32);
    frame
        .encode(out)
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Convenience: one frame as a fresh buffer.
pub fn frame_bytes(frame: &Frame, max_frame_len: usize) -> Result<BytesMut, FrameError> {
    let mut out = BytesMut::new();
    encode_frame(frame, max_frame_len, &mut out)?;
    Ok(out)
}

/// Incremental decoder: push bytes as they arrive, pull whole frames.
///
/// After an error of kind [`FrameError::TooLarge`] or [`FrameError::Malformed`] the stream is
/// out of sync and the connection must be closed; [`FrameError::UnknownMessage`] concerns one
/// frame only and decoding may go on.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_frame_len: usize,
}

impl FrameDecoder {
    /// A decoder accepting frames of at most `max_frame_len` bytes.
    pub fn new(max_frame_len: usize) -> Self {
        FrameDecoder {
            buf: BytesMut::new(),
            max_frame_len,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Body>, FrameError> {
        if self.buf.len() < LEN_PREFIX {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > self.max_frame_len {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame_len,
            });
        }
        if self.buf.len() < LEN_PREFIX + len {
            // Reserve only up to the announced (bounded) length.
            self.buf.reserve(LEN_PREFIX + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(LEN_PREFIX);
        let payload = self.buf.split_to(len);
        let count = records_samples(&payload, MAX_FRAME_SAMPLES + 1);
        if count > MAX_FRAME_SAMPLES {
            return Err(FrameError::TooManySamples {
                count,
                max: MAX_FRAME_SAMPLES,
            });
        }
        let frame = Frame::decode(payload.freeze())?;
        match frame.body {
            Some(body) => Ok(Some(body)),
            None => Err(FrameError::UnknownMessage),
        }
    }
}

/// Reads a protobuf varint at `*at`, advancing it; `None` if truncated or too long.
fn read_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Skips the value of a field of wire type `wire` at `*at`; `None` if malformed.
fn skip_field(bytes: &[u8], at: &mut usize, wire: u64) -> Option<()> {
    let n = match wire {
        0 => {
            read_varint(bytes, at)?;
            0
        }
        1 => 8,
        2 => usize::try_from(read_varint(bytes, at)?).ok()?,
        5 => 4,
        _ => return None,
    };
    *at = at.checked_add(n).filter(|&end| end <= bytes.len())?;
    Some(())
}

/// How many samples the records frame in `frame` (an encoded [`Frame`]) holds, counting at most
/// `stop_at`: a scan of the wire format that allocates nothing. 0 for other kinds of frames;
/// malformed bytes count what was seen (the decoder reports them).
fn records_samples(frame: &[u8], stop_at: usize) -> usize {
    let mut count = 0;
    let mut at = 0;
    while at < frame.len() {
        let Some(key) = read_varint(frame, &mut at) else {
            return count;
        };
        let (field, wire) = (key >> 3, key & 7);
        if field != 3 || wire != 2 {
            if skip_field(frame, &mut at, wire).is_none() {
                return count;
            }
            continue;
        }
        // A Records message (a repeated oneof field merges, so every occurrence counts).
        let Some(len) = read_varint(frame, &mut at).and_then(|l| usize::try_from(l).ok()) else {
            return count;
        };
        let Some(end) = at.checked_add(len).filter(|&e| e <= frame.len()) else {
            return count;
        };
        let inner = &frame[at..end];
        let mut i = 0;
        while i < inner.len() {
            let Some(key) = read_varint(inner, &mut i) else {
                return count;
            };
            if key >> 3 == 2 {
                count += 1;
                if count >= stop_at {
                    return count;
                }
            }
            if skip_field(inner, &mut i, key & 7).is_none() {
                return count;
            }
        }
        at = end;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(i: u64) -> Sample {
        Sample {
            device: DeviceId::new("plc-1").unwrap(),
            property: PropertyId::new(format!("p{i}")).unwrap(),
            value: Some(Value::Float(i as f64 * 0.5)),
            quality: if i.is_multiple_of(3) {
                Quality::Bad(BadReason::Exception(2))
            } else {
                Quality::Good
            },
            ts: Timestamp(1_700_000_000_000 + i),
        }
    }

    #[test]
    fn id_cache_shares_validated_ids_and_still_refuses_bad_ones() {
        // Ids longer than INLINE_ID_LEN (shorter ones are held inline, not cached).
        let long = |s: Sample| Sample {
            device: DeviceId::new(format!("{}-of-line-7-in-hall-b", s.device)).unwrap(),
            property: PropertyId::new(format!("{}-temperature-upper-zone", s.property)).unwrap(),
            ..s
        };
        let mut ids = IdCache::default();
        let wire = |w: Vec<Sample>| w.iter().map(WireSample::from).collect::<Vec<_>>();
        let batch = || (0..5).map(sample).map(long).collect::<Vec<_>>();
        let first = samples_from_wire_with(wire(batch()), &mut ids).unwrap();
        let again = samples_from_wire_with(wire(batch()), &mut ids).unwrap();
        assert_eq!(first, again);
        assert_eq!(first, samples_from_wire(wire(batch())).unwrap());
        // One allocation per distinct id, shared by every later sample.
        assert_eq!(ids.counts(), (1, 5));
        assert!(std::ptr::eq(
            first[0].device.as_str(),
            again[4].device.as_str()
        ));
        assert!(std::ptr::eq(
            first[2].property.as_str(),
            again[2].property.as_str()
        ));
        // Short ids decode the same without being kept.
        let short = samples_from_wire_with(wire((0..5).map(sample).collect()), &mut ids).unwrap();
        assert_eq!(short, (0..5).map(sample).collect::<Vec<_>>());
        assert_eq!(ids.counts(), (1, 5));
        // An invalid id is refused with its index, cached ids or not.
        let mut bad = wire((0..3).map(sample).collect());
        bad[2].property = "has space".into();
        let e = samples_from_wire_with(bad, &mut ids).unwrap_err();
        assert!(
            matches!(e, FrameError::InvalidSample { index: 2, .. }),
            "{e:?}"
        );
        let mut bad = wire(batch());
        bad[3].device = "a device id longer than 23 bytes".into();
        let e = samples_from_wire_with(bad, &mut ids).unwrap_err();
        assert!(
            matches!(e, FrameError::InvalidSample { index: 3, .. }),
            "{e:?}"
        );
        let mut bad = wire((0..2).map(sample).collect());
        bad[1].device = bytes::Bytes::new();
        assert!(samples_from_wire_with(bad, &mut ids).is_err());
        let mut bad = wire((0..2).map(sample).collect());
        bad[0].property = bytes::Bytes::from_static(b"p\xff");
        let e = samples_from_wire_with(bad, &mut ids).unwrap_err();
        assert!(e.to_string().contains("not UTF-8"), "{e}");
        assert_eq!(ids.counts(), (1, 5), "refused ids are not kept");
    }

    #[test]
    fn id_cache_is_bounded() {
        let mut ids = IdCache::default();
        let n = IdCache::MAX_IDS + 10;
        let wire: Vec<WireSample> = (0..n as u64)
            .map(|i| WireSample::from(&sample(i)))
            .collect();
        let samples = samples_from_wire_with(wire, &mut ids).unwrap();
        assert_eq!(samples.len(), n);
        assert_eq!(samples[n - 1].property.as_str(), format!("p{}", n - 1));
        assert!(ids.counts().1 <= IdCache::MAX_IDS, "{:?}", ids.counts());
    }

    #[test]
    fn count_samples_matches_decode() {
        for n in [0u64, 1, 7, 300] {
            let samples: Vec<Sample> = (0..n).map(sample).collect();
            let bytes = encode_samples(&samples);
            assert_eq!(count_samples(&bytes).unwrap(), n as usize);
            assert_eq!(decode_samples(&bytes).unwrap().len(), n as usize);
            if !bytes.is_empty() {
                assert!(count_samples(&bytes[..bytes.len() - 1]).is_err());
            }
        }
    }

    /// A length-prefixed Records frame of `n` empty samples (2 bytes each on the wire).
    fn frame_of_empty_samples(n: usize) -> Vec<u8> {
        let mut records = vec![0x08, 0x01]; // first_seq = 1
        for _ in 0..n {
            records.extend_from_slice(&[0x12, 0x00]);
        }
        let mut body = vec![0x1a];
        let mut len = records.len() as u64;
        while len >= 0x80 {
            body.push((len as u8) | 0x80);
            len >>= 7;
        }
        body.push(len as u8);
        body.extend_from_slice(&records);
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn a_records_frame_with_too_many_samples_is_refused_before_decoding() {
        let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        d.push(&frame_of_empty_samples(MAX_FRAME_SAMPLES + 1));
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TooManySamples {
                count: MAX_FRAME_SAMPLES + 1,
                max: MAX_FRAME_SAMPLES
            })
        );
        // 500,000 empty samples fit in a 1 MiB frame: refused as well, after counting one
        // past the limit.
        let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        d.push(&frame_of_empty_samples(500_000));
        assert!(matches!(
            d.next_frame(),
            Err(FrameError::TooManySamples { count, .. }) if count == MAX_FRAME_SAMPLES + 1
        ));
        // At the limit, the frame decodes.
        let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        d.push(&frame_of_empty_samples(MAX_FRAME_SAMPLES));
        match d.next_frame() {
            Ok(Some(Body::Records(r))) => assert_eq!(r.samples.len(), MAX_FRAME_SAMPLES),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_sample_count_before_decoding_matches_the_decoded_frame() {
        for n in [0usize, 1, 2, 127, 128, 1000] {
            let samples: Vec<Sample> = (0..n as u64).map(sample).collect();
            let mut out = BytesMut::new();
            encode_records(7, samples.iter(), 3, DEFAULT_MAX_FRAME_LEN, &mut out).unwrap();
            assert_eq!(records_samples(&out[LEN_PREFIX..], usize::MAX), n);
        }
        // Other frame kinds count nothing; truncated bytes never panic.
        let ping = frame_bytes(
            &Frame {
                body: Some(Body::Ping(Ping { nonce: 5 })),
            },
            1024,
        )
        .unwrap();
        assert_eq!(records_samples(&ping[LEN_PREFIX..], usize::MAX), 0);
        let full = frame_of_empty_samples(10);
        for cut in 0..full.len() {
            assert!(records_samples(&full[LEN_PREFIX.min(cut)..cut], usize::MAX) <= 10);
        }
    }

    #[test]
    fn samples_round_trip() {
        let s: Vec<Sample> = (0..10).map(sample).collect();
        assert_eq!(decode_samples(&encode_samples(&s)).unwrap(), s);
    }

    #[test]
    fn frames_round_trip_in_pieces() {
        let frames = vec![
            Body::Hello(Hello {
                versions: vec![1],
                agent_version: "x".into(),
                boot_id: "b".into(),
                next_seq: 7,
                ..Default::default()
            }),
            Body::Records(Records {
                first_seq: 7,
                samples: (0..5).map(|i| WireSample::from(&sample(i))).collect(),
                backlog: 0,
            }),
            Body::Ack(Ack { stored_seq: 11 }),
        ];
        let mut wire = BytesMut::new();
        for f in &frames {
            encode_frame(
                &Frame {
                    body: Some(f.clone()),
                },
                4096,
                &mut wire,
            )
            .unwrap();
        }
        // Feed one byte at a time: frames come out whole and in order.
        let mut d = FrameDecoder::new(4096);
        let mut got = vec![];
        for b in wire.iter() {
            d.push(&[*b]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn oversized_frame_is_refused_without_buffering() {
        let mut d = FrameDecoder::new(100);
        d.push(&1_000_000u32.to_be_bytes());
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TooLarge {
                len: 1_000_000,
                max: 100
            })
        );
        let big = Frame {
            body: Some(Body::Goodbye(Goodbye {
                reason: "x".repeat(200),
            })),
        };
        assert!(matches!(
            frame_bytes(&big, 100),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn malformed_and_unknown_frames_are_errors() {
        let mut d = FrameDecoder::new(100);
        d.push(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
        assert!(matches!(d.next_frame(), Err(FrameError::Malformed(_))));

        // A frame with only a field this build does not know (tag 99): an unknown message.
        let mut d = FrameDecoder::new(100);
        let unknown = [0x98, 0x06, 0x01]; // field 99, varint, value 1
        d.push(&[0, 0, 0, unknown.len() as u8]);
        d.push(&unknown);
        assert_eq!(d.next_frame(), Err(FrameError::UnknownMessage));
        // ... and the stream stays usable.
        let ack = frame_bytes(
            &Frame {
                body: Some(Body::Ack(Ack { stored_seq: 3 })),
            },
            100,
        )
        .unwrap();
        d.push(&ack);
        assert_eq!(d.next_frame(), Ok(Some(Body::Ack(Ack { stored_seq: 3 }))));
    }

    #[test]
    fn newer_fields_are_skipped() {
        // An Ack from a newer peer with an extra field 15 is still an Ack.
        let mut payload = Ack { stored_seq: 5 }.encode_to_vec();
        payload.extend_from_slice(&[0x78, 0x2a]); // field 15 varint 42
        let mut frame = vec![0x22, payload.len() as u8]; // Frame field 4 (Ack), length-delimited
        frame.extend_from_slice(&payload);
        let mut d = FrameDecoder::new(100);
        d.push(&(frame.len() as u32).to_be_bytes());
        d.push(&frame);
        assert_eq!(d.next_frame(), Ok(Some(Body::Ack(Ack { stored_seq: 5 }))));
    }

    #[test]
    fn invalid_samples_are_reported_with_their_index() {
        let mut w: Vec<WireSample> = (0..3).map(|i| WireSample::from(&sample(i))).collect();
        w[2].device = "bad/id".into();
        let e = samples_from_wire(w).unwrap_err();
        assert!(
            matches!(e, FrameError::InvalidSample { index: 2, .. }),
            "{e}"
        );
        let mut w = WireSample::from(&sample(1));
        w.quality = 77;
        assert!(w.into_sample().is_err());
    }

    fn arb_sample() -> impl proptest::strategy::Strategy<Value = Sample> {
        use proptest::prelude::*;
        let value = prop_oneof![
            Just(None),
            any::<bool>().prop_map(|b| Some(Value::Bool(b))),
            any::<i64>().prop_map(|i| Some(Value::Int(i))),
            any::<u64>().prop_map(|u| Some(Value::UInt(u))),
            any::<f64>().prop_map(|f| Some(Value::Float(f))),
            "[a-zé ]{0,20}".prop_map(|s| Some(Value::Str(s))),
        ];
        let quality = prop_oneof![
            Just(Quality::Good),
            Just(Quality::Bad(BadReason::Timeout)),
            any::<u8>().prop_map(|c| Quality::Bad(BadReason::Exception(c))),
            Just(Quality::Bad(BadReason::Disconnected)),
            Just(Quality::Bad(BadReason::DecodeError)),
            Just(Quality::Bad(BadReason::BadResponse)),
        ];
        (
            "[a-z][a-z0-9-]{0,30}",
            "[a-z][a-z0-9_.]{0,30}",
            value,
            quality,
            any::<u64>(),
        )
            .prop_map(|(d, p, value, quality, ts)| Sample {
                device: DeviceId::new(d).unwrap(),
                property: PropertyId::new(p).unwrap(),
                value,
                quality,
                ts: Timestamp(ts),
            })
    }

    #[test]
    fn batch_ranges_and_copies_check_their_bytes() {
        let samples: Vec<Sample> = (0..3u64)
            .map(|i| Sample {
                device: DeviceId::new("d").unwrap(),
                property: PropertyId::new(format!("p{i}")).unwrap(),
                value: Some(Value::UInt(i)),
                quality: Quality::Good,
                ts: Timestamp(i),
            })
            .collect();
        let enc = encode_samples(&samples);
        assert_eq!(batch_range(&enc, 0..0).unwrap(), 0..0);
        assert_eq!(batch_range(&enc, 3..3).unwrap(), enc.len()..enc.len());
        let mid = batch_range(&enc, 1..2).unwrap();
        assert_eq!(decode_samples(&enc[mid]).unwrap(), samples[1..2]);
        // Past the end, truncated, or another field: refused.
        assert!(batch_range(&enc, 2..4).is_err());
        assert!(batch_range(&enc[..enc.len() - 1], 0..3).is_err());
        let mut other = enc.clone();
        other[0] = 2 << 3 | 2;
        assert!(batch_range(&other, 0..1).is_err());
        let mut out = BytesMut::new();
        assert!(encode_records_batches(1, &[&enc, &other], 0, 1 << 20, &mut out).is_err());
        assert!(encode_records_batches(1, &[&enc[..enc.len() - 1]], 0, 1 << 20, &mut out).is_err());
        assert!(out.is_empty());
    }

    proptest::proptest! {
        /// The hand-written encoders write exactly what prost writes for the same records.
        #[test]
        fn borrowed_encoders_match_prost(
            samples in proptest::collection::vec(arb_sample(), 0..20),
            first_seq in proptest::prop_oneof![proptest::strategy::Just(0u64), proptest::num::u64::ANY],
            backlog in proptest::prop_oneof![proptest::strategy::Just(0u64), proptest::num::u64::ANY],
        ) {
            let wire: Vec<WireSample> = samples.iter().map(WireSample::from).collect();
            let batch = SampleBatch { samples: wire.clone() }.encode_to_vec();
            proptest::prop_assert_eq!(encode_samples(&samples), batch);
            let frame = Frame {
                body: Some(Body::Records(Records { first_seq, samples: wire, backlog })),
            };
            let mut want = BytesMut::new();
            encode_frame(&frame, usize::MAX >> 1, &mut want).unwrap();
            let mut got = BytesMut::new();
            encode_records(first_seq, samples.iter(), backlog, usize::MAX >> 1, &mut got).unwrap();
            proptest::prop_assert_eq!(&got[..], &want[..]);
            // The size limit is the same too.
            let mut none = BytesMut::new();
            let limit = want.len() - LEN_PREFIX - 1;
            proptest::prop_assert!(encode_records(first_seq, samples.iter(), backlog, limit, &mut none).is_err());
            proptest::prop_assert!(none.is_empty());
            // Copied from encoded batches, cut anywhere, it is the same frame again.
            let enc = encode_samples(&samples);
            let cut = samples.len() / 3;
            let a = batch_range(&enc, 0..cut).unwrap();
            let b = batch_range(&enc, cut..samples.len()).unwrap();
            proptest::prop_assert_eq!((a.start, a.end, b.end), (0, b.start, enc.len()));
            let mut copied = BytesMut::from(&b"kept"[..]);
            encode_records_batches(first_seq, &[&enc[a], &enc[b]], backlog, usize::MAX >> 1, &mut copied).unwrap();
            proptest::prop_assert_eq!(&copied[4..], &want[..]);
            proptest::prop_assert!(encode_records_batches(first_seq, &[&enc], backlog, limit, &mut none).is_err());
            proptest::prop_assert!(none.is_empty());
            // And it decodes back to the same samples (compared as bytes: NaN != NaN).
            let enc = encode_samples(&samples);
            proptest::prop_assert_eq!(encode_samples(&decode_samples(&enc).unwrap()), enc);
        }

        /// Bytes that are not a sample batch are refused, never a panic, and append nothing.
        #[test]
        fn copied_batches_refuse_garbage(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            from in 0usize..8,
            n in 0usize..8,
        ) {
            let _ = batch_range(&bytes, from..from + n);
            let mut out = BytesMut::from(&b"kept"[..]);
            if encode_records_batches(1, &[&bytes], 0, usize::MAX >> 1, &mut out).is_err() {
                proptest::prop_assert_eq!(&out[..], b"kept");
            } else {
                // Accepted only if it really is a batch (of this many samples).
                proptest::prop_assert!(count_samples(&bytes).is_ok());
            }
        }

        #[test]
        fn decoder_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..64), 0..16)) {
            let mut d = FrameDecoder::new(256);
            for c in chunks {
                d.push(&c);
                loop {
                    match d.next_frame() {
                        Ok(Some(_)) => continue,
                        Ok(None) => break,
                        Err(FrameError::UnknownMessage) => continue,
                        Err(_) => return Ok(()),
                    }
                }
            }
        }
    }
}
