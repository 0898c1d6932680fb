//! Typed values, their quality, timestamps and versions.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, PropertyId};

/// A property value as read from a device (after decoding and scaling).
///
/// In JSON it is the plain value (`true`, `42`, `-3`, `21.5`, `"text"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    /// A boolean (a coil, a discrete input, a register bit).
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// An unsigned integer that does not fit in `i64` or was declared unsigned.
    UInt(u64),
    /// A floating point number (any scaled value is one).
    Float(f64),
    /// A string.
    Str(String),
}

impl Value {
    /// The value as `f64` where that makes sense (numbers and booleans).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            Value::Int(i) => Some(*i as f64),
            Value::UInt(u) => Some(*u as f64),
            Value::Float(f) => Some(*f),
            Value::Str(_) => None,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::UInt(u) => write!(f, "{u}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// Why a sample is bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "reason", content = "code")]
#[non_exhaustive]
pub enum BadReason {
    /// The device did not answer within the request timeout.
    Timeout,
    /// The device answered with a Modbus exception (the code).
    Exception(u8),
    /// The link to the device is down.
    Disconnected,
    /// The registers could not be decoded into the declared type.
    DecodeError,
    /// The device answered with a malformed or unexpected response.
    BadResponse,
}

impl BadReason {
    /// Short stable name, used in logs, metrics and JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            BadReason::Timeout => "timeout",
            BadReason::Exception(_) => "exception",
            BadReason::Disconnected => "disconnected",
            BadReason::DecodeError => "decode_error",
            BadReason::BadResponse => "bad_response",
        }
    }
}

impl fmt::Display for BadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadReason::Exception(code) => write!(f, "exception {code:#04x}"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// Quality of a sample: `good`, or `bad` with a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Quality {
    /// The value was read and decoded.
    #[default]
    Good,
    /// The value could not be read; the previous value (if any) is stale.
    Bad(BadReason),
}

impl Quality {
    /// Whether the quality is good.
    pub fn is_good(&self) -> bool {
        matches!(self, Quality::Good)
    }
}

impl fmt::Display for Quality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Quality::Good => f.write_str("good"),
            Quality::Bad(r) => write!(f, "bad: {r}"),
        }
    }
}

impl Serialize for Quality {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Quality {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Quality::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("bad quality {s:?}")))
    }
}

impl Quality {
    /// Parses the [`Display`](fmt::Display) form back.
    pub fn parse(s: &str) -> Option<Quality> {
        if s == "good" {
            return Some(Quality::Good);
        }
        let reason = s.strip_prefix("bad: ")?;
        let r = match reason {
            "timeout" => BadReason::Timeout,
            "disconnected" => BadReason::Disconnected,
            "decode_error" => BadReason::DecodeError,
            "bad_response" => BadReason::BadResponse,
            other => {
                let hex = other.strip_prefix("exception 0x")?;
                BadReason::Exception(u8::from_str_radix(hex, 16).ok()?)
            }
        };
        Some(Quality::Bad(r))
    }
}

/// Wall-clock time in milliseconds since the Unix epoch, as read by the agent.
///
/// The protocol never reads a clock: drivers pass timestamps in.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// Milliseconds since the Unix epoch.
    pub fn as_millis(&self) -> u64 {
        self.0
    }
}

/// A monotonically increasing version of a desired value or config bundle.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Version(pub u64);

/// One reported property change: what the agent read, when, and how well.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The device the property belongs to.
    pub device: DeviceId,
    /// The property.
    pub property: PropertyId,
    /// The value (the last good value is kept when quality is bad).
    pub value: Option<Value>,
    /// Good or bad with a reason.
    pub quality: Quality,
    /// When the agent read it.
    pub ts: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quality_round_trips() {
        for q in [
            Quality::Good,
            Quality::Bad(BadReason::Timeout),
            Quality::Bad(BadReason::Exception(2)),
            Quality::Bad(BadReason::Disconnected),
            Quality::Bad(BadReason::DecodeError),
            Quality::Bad(BadReason::BadResponse),
        ] {
            assert_eq!(Quality::parse(&q.to_string()), Some(q));
        }
        assert_eq!(Quality::parse("meh"), None);
        assert_eq!(Quality::parse("bad: exception 0xzz"), None);
    }

    #[test]
    fn values_serialize_plain() {
        let v = vec![
            Value::Bool(true),
            Value::Int(-3),
            Value::Float(21.5),
            Value::Str("x".into()),
        ];
        assert_eq!(
            serde_json::to_string(&v).unwrap_or_default(),
            r#"[true,-3,21.5,"x"]"#
        );
    }
}
