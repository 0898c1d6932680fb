//! Topics and payloads of the local bus: KubeEdge's device-twin topics (`$hw/events/...`, with
//! the JSON of KubeEdge's `dttype` package) and edgesync's plain telemetry. Pure functions: no
//! I/O, the time is passed in.
//!
//! KubeEdge twin values are strings. Conversion rules for an `expected` value, by the tag's
//! type (documented in `docs/mqtt.md`):
//!
//! - `bool` tags: the strings `"true"`/`"false"` (any ASCII case) and `"1"`/`"0"`, or a JSON
//!   boolean, or the JSON numbers 0 and 1.
//! - numeric tags: a string holding a JSON number (`"42"`, `"-3"`, `"21.5"`, `"1e3"`; no
//!   surrounding spaces), or a JSON number. Range, integrality and scale are then checked
//!   against the tag as for any desired value.
//! - `string` tags: any string, as is.
//!
//! Outgoing values are strings too: booleans `true`/`false`, integers in decimal, floats in
//! the shortest form that reads back exactly (`21.5`), strings as they are.

use std::collections::BTreeMap;

use edgesync_protocol::desired::{Applied, DesiredValue};
use edgesync_protocol::{BadReason, Quality, Sample, Value};
use serde::Serialize;
use serde_json::{Map, Value as Json, json};

use crate::local::PropertyTwin;
use crate::model::{DataType, DeviceSpec, TagSpec};

/// KubeEdge's result code for a bad request.
pub const CODE_BAD_REQUEST: u16 = 400;
/// KubeEdge's result code for an unknown device.
pub const CODE_NOT_FOUND: u16 = 404;
/// KubeEdge's result code for an internal error (here: the agent cannot take changes now).
pub const CODE_INTERNAL: u16 = 500;

/// The topics of one node.
#[derive(Debug, Clone)]
pub struct Topics {
    node: String,
}

/// What an incoming message asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    /// `$hw/events/device/{device}/twin/update`.
    Update(&'a str),
    /// `$hw/events/device/{device}/twin/get`.
    Get(&'a str),
}

/// The prefix of every device topic.
const DEVICE_PREFIX: &str = "$hw/events/device/";

impl Topics {
    /// The topics of node `node`.
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
        }
    }

    /// The filters the agent subscribes to.
    pub fn subscriptions() -> [&'static str; 2] {
        [
            "$hw/events/device/+/twin/update",
            "$hw/events/device/+/twin/get",
        ]
    }

    /// Filters of every topic only the agent publishes to: the answers, documents and deltas
    /// of every device, device and tunnel state, and the whole `edgesync/` namespace
    /// (telemetry, outcomes). The embedded broker refuses these topics to apps.
    pub fn agent_owned() -> [&'static str; 8] {
        [
            "$hw/events/device/+/twin/update/result",
            "$hw/events/device/+/twin/update/document",
            "$hw/events/device/+/twin/update/delta",
            "$hw/events/device/+/twin/get/result",
            "$hw/events/device/+/state/update",
            "$hw/events/connected/+",
            "$hw/events/disconnected/+",
            "edgesync/#",
        ]
    }

    /// What `topic` asks for, if it is one of the agent's request topics.
    pub fn request(topic: &str) -> Option<Request<'_>> {
        let rest = topic.strip_prefix(DEVICE_PREFIX)?;
        let (device, suffix) = rest.split_once('/')?;
        if device.is_empty() {
            return None;
        }
        match suffix {
            "twin/update" => Some(Request::Update(device)),
            "twin/get" => Some(Request::Get(device)),
            _ => None,
        }
    }

    /// `$hw/events/device/{device}/twin/update/result`.
    pub fn update_result(device: &str) -> String {
        format!("{DEVICE_PREFIX}{device}/twin/update/result")
    }

    /// `$hw/events/device/{device}/twin/update/delta`.
    pub fn update_delta(device: &str) -> String {
        format!("{DEVICE_PREFIX}{device}/twin/update/delta")
    }

    /// `$hw/events/device/{device}/twin/update/document`.
    pub fn update_document(device: &str) -> String {
        format!("{DEVICE_PREFIX}{device}/twin/update/document")
    }

    /// `$hw/events/device/{device}/twin/get/result`.
    pub fn get_result(device: &str) -> String {
        format!("{DEVICE_PREFIX}{device}/twin/get/result")
    }

    /// `$hw/events/device/{device}/state/update`.
    pub fn state_update(device: &str) -> String {
        format!("{DEVICE_PREFIX}{device}/state/update")
    }

    /// `$hw/events/connected/{node}` or `$hw/events/disconnected/{node}`.
    pub fn uplink(&self, connected: bool) -> String {
        let what = if connected {
            "connected"
        } else {
            "disconnected"
        };
        format!("$hw/events/{what}/{}", self.node)
    }

    /// `edgesync/{node}/{device}`.
    pub fn telemetry(&self, device: &str) -> String {
        format!("edgesync/{}/{device}", self.node)
    }

    /// `edgesync/{node}/{device}/applied`.
    pub fn applied(&self, device: &str) -> String {
        format!("edgesync/{}/{device}/applied", self.node)
    }
}

/// A twin value as KubeEdge writes it: a string.
pub fn value_string(v: &Value) -> String {
    match v {
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Str(s) => s.clone(),
    }
}

/// KubeEdge's `metadata.type` of a tag: `boolean`, `int` (an integer type with scale 1 and
/// offset 0), `float` (float32), `double` (float64 and scaled integers) or `string`.
pub fn type_name(tag: &TagSpec) -> &'static str {
    match tag.data_type {
        DataType::Bool => "boolean",
        DataType::String { .. } => "string",
        DataType::Float32 => "float",
        DataType::Float64 => "double",
        _ if tag.scale == 1.0 && tag.offset == 0.0 => "int",
        _ => "double",
    }
}

/// Converts a KubeEdge `expected.value` (or a JSON value) to the JSON value the twin's
/// validation takes, by the tag's type (rules in the module docs).
pub fn expected_to_json(tag: &TagSpec, v: &Json) -> Result<Json, String> {
    match (tag.data_type, v) {
        (_, Json::Null | Json::Array(_) | Json::Object(_)) => Err(format!(
            "value must be a string (or a JSON number or boolean), not {}",
            json_kind(v)
        )),
        (DataType::String { .. }, Json::String(_)) => Ok(v.clone()),
        (DataType::Bool, Json::String(s)) => match s.to_ascii_lowercase().as_str() {
            "true" | "1" => Ok(Json::Bool(true)),
            "false" | "0" => Ok(Json::Bool(false)),
            _ => Err(format!(
                "{s:?} is not a boolean (\"true\", \"false\", \"1\" or \"0\")"
            )),
        },
        (_, Json::String(s)) => match serde_json::from_str::<Json>(s) {
            Ok(n @ Json::Number(_)) if s.trim() == s => Ok(n),
            _ => Err(format!("{s:?} is not a number")),
        },
        _ => Ok(v.clone()),
    }
}

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// One problem with a request, naming the property where there is one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The property (empty for the request as a whole).
    pub property: String,
    /// What is wrong.
    pub message: String,
}

impl Problem {
    fn whole(message: impl Into<String>) -> Self {
        Self {
            property: String::new(),
            message: message.into(),
        }
    }

    fn of(property: &str, message: impl Into<String>) -> Self {
        Self {
            property: property.to_owned(),
            message: message.into(),
        }
    }
}

/// A parsed `twin/update` request: its event id, `{property: json value}` to set, and the
/// problems of the properties that could not be read (the request is refused if there is any).
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// The request's `event_id` (echoed in the result).
    pub event_id: String,
    /// The values that converted, by tag type.
    pub values: Map<String, Json>,
    /// What is wrong with the other properties.
    pub problems: Vec<Problem>,
}

/// A request that cannot be carried out: its event id (empty if unknown), the code and every
/// problem.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// The request's `event_id`, if it could be read.
    pub event_id: String,
    /// KubeEdge result code (400, 404, 500).
    pub code: u16,
    /// Every problem found.
    pub problems: Vec<Problem>,
}

impl Refusal {
    /// A refusal with one problem about the whole request.
    pub fn whole(event_id: &str, code: u16, message: impl Into<String>) -> Self {
        Self {
            event_id: event_id.to_owned(),
            code,
            problems: vec![Problem::whole(message)],
        }
    }

    /// The problems as one sentence (KubeEdge's `reason`).
    pub fn reason(&self) -> String {
        self.problems
            .iter()
            .map(|p| {
                if p.property.is_empty() {
                    p.message.clone()
                } else {
                    format!("{}: {}", p.property, p.message)
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Reads the `event_id` of a JSON object, if it has a string one.
fn event_id_of(doc: &Json) -> String {
    doc.get("event_id")
        .and_then(Json::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// Parses the JSON of a request (`twin/update` or `twin/get`); a refusal if it is not a JSON
/// object.
pub fn parse_json(payload: &[u8]) -> Result<Json, Refusal> {
    match serde_json::from_slice::<Json>(payload) {
        Ok(doc @ Json::Object(_)) => Ok(doc),
        Ok(other) => Err(Refusal::whole(
            "",
            CODE_BAD_REQUEST,
            format!(
                "the payload must be a JSON object, not {}",
                json_kind(&other)
            ),
        )),
        Err(e) => Err(Refusal::whole(
            "",
            CODE_BAD_REQUEST,
            format!("the payload is not JSON: {e}"),
        )),
    }
}

/// Parses a `twin/update` request for `spec`'s device: `{"event_id", "timestamp", "twin":
/// {prop: {"expected": {"value": ...}}}}`. Only `expected` values may be set (`actual` is what
/// the agent reads from the device); `metadata`, `optional` and versions are ignored. A problem
/// with the request as a whole is an error; problems with properties are collected in
/// [`Update::problems`].
pub fn parse_update(doc: &Json, spec: &DeviceSpec) -> Result<Update, Refusal> {
    let event_id = event_id_of(doc);
    let refuse = |problems: Vec<Problem>| Refusal {
        event_id: event_id.clone(),
        code: CODE_BAD_REQUEST,
        problems,
    };
    let Some(twin) = doc.get("twin") else {
        return Err(refuse(vec![Problem::whole(
            "the request has no \"twin\" object",
        )]));
    };
    let Some(twin) = twin.as_object() else {
        return Err(refuse(vec![Problem::whole(format!(
            "\"twin\" must be an object, not {}",
            json_kind(twin)
        ))]));
    };
    if twin.is_empty() {
        return Err(refuse(vec![Problem::whole("\"twin\" names no property")]));
    }
    let mut values = Map::new();
    let mut problems = Vec::new();
    for (name, entry) in twin {
        let Some(tag) = spec.tags.iter().find(|t| t.property.as_str() == name) else {
            problems.push(Problem::of(
                name,
                format!("device {} has no property {name:?}", spec.id),
            ));
            continue;
        };
        let Some(entry) = entry.as_object() else {
            problems.push(Problem::of(
                name,
                if entry.is_null() {
                    "deleting a property is not supported (properties come from the agent's config)"
                        .to_owned()
                } else {
                    format!("must be an object, not {}", json_kind(entry))
                },
            ));
            continue;
        };
        if entry.contains_key("actual") {
            problems.push(Problem::of(
                name,
                "\"actual\" cannot be set: the agent reads it from the device; set \"expected\"",
            ));
            continue;
        }
        let Some(expected) = entry.get("expected") else {
            problems.push(Problem::of(name, "no \"expected\" value to set"));
            continue;
        };
        let Some(value) = expected.get("value") else {
            problems.push(Problem::of(name, "\"expected\" has no \"value\""));
            continue;
        };
        match expected_to_json(tag, value) {
            Ok(v) => {
                values.insert(name.clone(), v);
            }
            Err(m) => problems.push(Problem::of(name, m)),
        }
    }
    Ok(Update {
        event_id,
        values,
        problems,
    })
}

/// The `event_id` of a `twin/get` request (KubeEdge sends `{"event_id": ...}`).
pub fn parse_get(doc: &Json) -> String {
    event_id_of(doc)
}

/// An error result: `{"event_id", "timestamp", "code", "reason", "errors": [{"property",
/// "message"}]}` (`errors` is an edgesync extension; KubeEdge readers ignore it).
pub fn error_result(refusal: &Refusal, now_ms: u64) -> Vec<u8> {
    to_vec(&json!({
        "event_id": refusal.event_id,
        "timestamp": now_ms,
        "code": refusal.code,
        "reason": refusal.reason(),
        "errors": refusal.problems,
    }))
}

/// The result of an accepted `twin/update`: `{"event_id", "timestamp", "twin": {prop:
/// {"expected": {"value", "metadata": {"timestamp"}}}}}`: the values as the agent will apply
/// them (accepted is not yet written: the write's outcome comes later).
pub fn update_result(event_id: &str, values: &Map<String, Json>, now_ms: u64) -> Vec<u8> {
    let mut twin = Map::new();
    for (name, v) in values {
        let text = match v {
            Json::String(s) => s.clone(),
            other => other.to_string(),
        };
        twin.insert(
            name.clone(),
            json!({"expected": {"value": text, "metadata": {"timestamp": now_ms}}}),
        );
    }
    to_vec(&json!({"event_id": event_id, "timestamp": now_ms, "twin": twin}))
}

/// KubeEdge's `MsgTwin` for one property: `expected` (the desired value, with the time it was
/// set), `actual` (the last reading, with its time and, as an edgesync extension, its
/// `quality`), `optional: false` and `metadata.type`. A property never read has no `actual`.
pub fn msg_twin(tag: &TagSpec, reported: Option<&Sample>, desired: Option<&DesiredValue>) -> Json {
    let mut m = Map::new();
    if let Some(d) = desired {
        m.insert(
            "expected".into(),
            json!({"value": value_string(&d.value), "metadata": {"timestamp": d.set_ms}}),
        );
    }
    if let Some(s) = reported
        && let Some(v) = &s.value
    {
        m.insert(
            "actual".into(),
            json!({
                "value": value_string(v),
                "metadata": {"timestamp": s.ts.as_millis(), "quality": s.quality.to_string()}
            }),
        );
    }
    m.insert("optional".into(), Json::Bool(false));
    m.insert("metadata".into(), json!({"type": type_name(tag)}));
    Json::Object(m)
}

/// The whole twin of a device as `{prop: MsgTwin}`, each with, as an edgesync extension,
/// `applied` (what became of the last desired version) when there is one.
pub fn twin_map(
    spec: &DeviceSpec,
    props: &BTreeMap<edgesync_protocol::PropertyId, PropertyTwin>,
) -> Map<String, Json> {
    let mut twin = Map::new();
    for tag in &spec.tags {
        let p = props.get(&tag.property);
        let mut m = msg_twin(
            tag,
            p.and_then(|p| p.reported.as_ref()),
            p.and_then(|p| p.desired.as_ref()),
        );
        // An edgesync extension (KubeEdge readers ignore it): what became of the last desired
        // version, shaped like the hub API's `applied`.
        if let (Some(a), Json::Object(m)) = (p.and_then(|p| p.applied.as_ref()), &mut m)
            && let Ok(v) = serde_json::to_value(a)
        {
            m.insert("applied".into(), v);
        }
        twin.insert(tag.property.to_string(), m);
    }
    twin
}

/// The `twin/get` result: `{"event_id", "timestamp", "twin": {prop: MsgTwin}}`.
pub fn get_result(event_id: &str, twin: Map<String, Json>, now_ms: u64) -> Vec<u8> {
    to_vec(&json!({"event_id": event_id, "timestamp": now_ms, "twin": twin}))
}

/// Whether a property is in the delta: it has an expected value that differs from the
/// actual one. Numbers are compared as numbers, equal within a relative 1e-6 (a float32
/// register reads back `21.3` as `21.299999`); other values must be equal.
pub fn differs(desired: &Value, reported: Option<&Value>) -> bool {
    let Some(r) = reported else {
        return true;
    };
    match (desired, r) {
        (Value::Str(a), Value::Str(b)) => a != b,
        (Value::Bool(a), Value::Bool(b)) => a != b,
        (a, b) => match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => {
                let scale = x.abs().max(y.abs()).max(1.0);
                (x - y).abs() > 1e-6 * scale
            }
            _ => true,
        },
    }
}

/// The delta map `{prop: expected}` of a device: its properties whose expected value differs
/// from the actual one.
pub fn delta_map(
    props: &BTreeMap<edgesync_protocol::PropertyId, PropertyTwin>,
) -> BTreeMap<String, String> {
    props
        .iter()
        .filter_map(|(name, p)| {
            let d = p.desired.as_ref()?;
            let reported = p.reported.as_ref().and_then(|s| s.value.as_ref());
            differs(&d.value, reported).then(|| (name.to_string(), value_string(&d.value)))
        })
        .collect()
}

/// `twin/update/delta`: `{"event_id", "timestamp", "twin": {prop: MsgTwin}, "delta": {prop:
/// expected}}` (KubeEdge's `DeviceTwinDelta`).
pub fn delta(
    event_id: &str,
    twin: Map<String, Json>,
    delta: &BTreeMap<String, String>,
    now_ms: u64,
) -> Vec<u8> {
    to_vec(&json!({"event_id": event_id, "timestamp": now_ms, "twin": twin, "delta": delta}))
}

/// `twin/update/document`: `{"event_id", "timestamp", "twin": {prop: {"last": MsgTwin | null,
/// "current": MsgTwin}}}` (KubeEdge's `DeviceTwinDocument`).
pub fn document(event_id: &str, changes: Map<String, Json>, now_ms: u64) -> Vec<u8> {
    to_vec(&json!({"event_id": event_id, "timestamp": now_ms, "twin": changes}))
}

/// A device's state as published on `state/update`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// The last poll cycle read at least one value.
    Online,
    /// The last poll cycle read nothing: every reading timed out or the link is down.
    Offline,
}

impl DeviceState {
    /// `"online"` or `"offline"`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Online => "online",
            DeviceState::Offline => "offline",
        }
    }

    /// The state a cycle's changed samples show: online if any is good; offline if every one
    /// is bad because of a timeout or a broken link; otherwise (only decode errors, exception
    /// answers: the device answered) `None`, no change.
    pub fn of_samples(samples: &[Sample]) -> Option<DeviceState> {
        if samples.iter().any(|s| s.quality.is_good()) {
            return Some(DeviceState::Online);
        }
        let unreachable = |q: &Quality| {
            matches!(
                q,
                Quality::Bad(BadReason::Timeout | BadReason::Disconnected)
            )
        };
        if !samples.is_empty() && samples.iter().all(|s| unreachable(&s.quality)) {
            return Some(DeviceState::Offline);
        }
        if samples.iter().any(|s| matches!(s.quality, Quality::Bad(_))) {
            // The device answered (exception, bad response, decode error): it is there.
            return Some(DeviceState::Online);
        }
        None
    }
}

/// `state/update`: `{"event_id", "timestamp", "state"}` (KubeEdge's `DeviceUpdate`).
pub fn state(event_id: &str, state: DeviceState, now_ms: u64) -> Vec<u8> {
    to_vec(&json!({"event_id": event_id, "timestamp": now_ms, "state": state.as_str()}))
}

/// `$hw/events/connected|disconnected/{node}`: `{"event_type": "connected" | "disconnected",
/// "timestamp"}` (KubeEdge's `ConnectedInfo`).
pub fn uplink(connected: bool, now_ms: u64) -> Vec<u8> {
    let event_type = if connected {
        "connected"
    } else {
        "disconnected"
    };
    to_vec(&json!({"event_type": event_type, "timestamp": now_ms}))
}

/// Telemetry on `edgesync/{node}/{device}`: `{prop: {"value", "quality", "ts"}}` for the
/// samples of one cycle (`value` is `null` for a property never read).
///
/// Written by hand straight from the samples, in tag order: this runs for every device on
/// every poll cycle, and serde's generic path (escaping every key, `Display` for the quality)
/// cost about 8 % of the agent's CPU. The bytes are those serde_json writes for the same
/// document (a property test in `tests.rs` compares the two).
pub fn telemetry(samples: &[Sample]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + samples.len() * 56);
    let mut num = itoa::Buffer::new();
    out.push(b'{');
    for (i, s) in samples.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        json_str(&mut out, s.property.as_str());
        out.extend_from_slice(b":{\"value\":");
        match &s.value {
            None => out.extend_from_slice(b"null"),
            Some(Value::Bool(b)) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Some(Value::Int(v)) => out.extend_from_slice(num.format(*v).as_bytes()),
            Some(Value::UInt(v)) => out.extend_from_slice(num.format(*v).as_bytes()),
            // Floats (serde_json writes non-finite ones as null) and strings.
            Some(v) => {
                let _ = serde_json::to_writer(&mut out, v);
            }
        }
        out.extend_from_slice(b",\"quality\":");
        match s.quality {
            Quality::Good => out.extend_from_slice(b"\"good\""),
            q => {
                let _ = serde_json::to_writer(&mut out, &q);
            }
        }
        out.extend_from_slice(b",\"ts\":");
        out.extend_from_slice(num.format(s.ts.as_millis()).as_bytes());
        out.push(b'}');
    }
    out.push(b'}');
    out
}

/// `s` as a JSON string: copied as is when nothing in it needs escaping (serde_json escapes
/// only control characters, `"` and `\\`), otherwise written by serde_json.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Cannot fail: a string into a Vec.
        let _ = serde_json::to_writer(out, s);
    }
}

/// What became of a desired version, on `edgesync/{node}/{device}/applied`: `{"event_id",
/// "timestamp", "property", "version", "outcome", "detail"?, "ts_ms", "value"?, "origin"?}`.
/// `version`, `outcome`, `detail` and `ts_ms` are shaped like the hub API's `applied` (`detail`:
/// the Modbus exception code, or the reason of a refusal); `value` (typed JSON, as in
/// telemetry) and `origin` (`hub` or `edge`) are those of the desired value the outcome is
/// about, when the agent still knows it.
pub fn applied(
    event_id: &str,
    property: &str,
    applied: &Applied,
    desired: Option<&DesiredValue>,
    now_ms: u64,
) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("event_id".into(), json!(event_id));
    m.insert("timestamp".into(), json!(now_ms));
    m.insert("property".into(), json!(property));
    if let Ok(Json::Object(a)) = serde_json::to_value(applied) {
        m.extend(a);
    }
    if let Some(d) = desired {
        m.insert("value".into(), json!(d.value));
        m.insert("origin".into(), json!(d.origin));
    }
    to_vec(&Json::Object(m))
}

/// A random event id in UUID v4 form (KubeEdge uses UUIDs).
pub fn new_event_id() -> String {
    let a = fastrand::u64(..);
    let b = fastrand::u64(..);
    let version = (a & 0xffff_ffff_ffff_0fff) | 0x4000;
    let variant = (b & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        version >> 32,
        (version >> 16) & 0xffff,
        version & 0xffff,
        variant >> 48,
        variant & 0xffff_ffff_ffff
    )
}

fn to_vec(v: &Json) -> Vec<u8> {
    // Serializing a `serde_json::Value` cannot fail (its keys are strings).
    serde_json::to_vec(v).unwrap_or_default()
}

#[cfg(test)]
mod tests;
