//! Desired state: what an operator (through the hub) or a local app (on the gateway) wants a
//! property to be, and what became of it.
//!
//! # Rules (both ends)
//!
//! - Every desired value the hub accepts gets a **version**: the node's downlink sequence
//!   number, assigned by the hub, increasing by one per accepted change. Versions order all
//!   desired changes of a node; the agent applies them in version order, each exactly once
//!   (it persists the highest version it has taken over, and the hub resends only newer ones).
//! - A local app's change is applied on the gateway at once (even offline) and sent upstream
//!   as a **proposal**: a compare-and-set against the version it was based on. The hub accepts
//!   it when its own version of that property is still the base (the value becomes a new
//!   version with origin [`Origin::Edge`]); otherwise the hub's value is newer and wins: the
//!   hub issues it again as a new version, which comes down and is applied.
//! - Applying a version ends in an [`Outcome`]: `ok` (written and read back), `exception`
//!   (the device refused with a Modbus exception), `timeout`, `refused` (the value does not
//!   fit the tag: type, range, writability), `expired` (the device stayed unreachable longer
//!   than the agent's bound), or `superseded` (a newer version of the same property arrived
//!   before this one could be written).

use serde::{Deserialize, Serialize};

use crate::value::Value;

/// A problem with one property of a desired change, naming the property (as given). Both
/// ends check changes (the hub against the schema the agent sent, the agent against its tags)
/// and answer with a list of these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// The property as given (empty for a problem with the whole change).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl FieldError {
    /// The error of a change that names no property.
    pub fn empty_change() -> Self {
        FieldError {
            field: String::new(),
            message: "no properties given".into(),
        }
    }
}

/// How a JSON value's kind is named in error messages: `null`, `boolean`, `number`, `string`,
/// `array`, `object`.
pub fn json_kind(v: &serde_json::Value) -> &'static str {
    use serde_json::Value as J;
    match v {
        J::Null => "null",
        J::Bool(_) => "boolean",
        J::Number(_) => "number",
        J::String(_) => "string",
        J::Array(_) => "array",
        J::Object(_) => "object",
    }
}

/// Who set a desired value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// An operator through the hub API.
    Hub,
    /// A local app on the gateway, accepted by the hub.
    Edge,
}

/// What became of a desired version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "detail")]
#[non_exhaustive]
pub enum Outcome {
    /// Taken over by the agent, not yet written (the device may be unreachable).
    Pending,
    /// Written and verified (or acknowledged, for a write-only tag).
    Ok,
    /// The device answered with this Modbus exception code.
    Exception(u8),
    /// The device did not answer in time (the last attempt before expiry).
    Timeout,
    /// The value does not fit the tag (the reason).
    Refused(String),
    /// The device stayed unreachable longer than the agent's bound.
    Expired,
    /// A newer version of the property arrived before this one was written.
    Superseded,
}

impl Outcome {
    /// Whether the outcome is final (`pending` is the only one that is not).
    pub fn is_final(&self) -> bool {
        !matches!(self, Outcome::Pending)
    }

    /// A short label (metrics, logs).
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Pending => "pending",
            Outcome::Ok => "ok",
            Outcome::Exception(_) => "exception",
            Outcome::Timeout => "timeout",
            Outcome::Refused(_) => "refused",
            Outcome::Expired => "expired",
            Outcome::Superseded => "superseded",
        }
    }

    /// Wire code and detail.
    pub fn to_wire(&self) -> (u32, u32, String) {
        match self {
            Outcome::Pending => (0, 0, String::new()),
            Outcome::Ok => (1, 0, String::new()),
            Outcome::Exception(c) => (2, u32::from(*c), String::new()),
            Outcome::Timeout => (3, 0, String::new()),
            Outcome::Refused(r) => (4, 0, r.clone()),
            Outcome::Expired => (5, 0, String::new()),
            Outcome::Superseded => (6, 0, String::new()),
        }
    }

    /// From wire code and detail (`None` for an unknown code).
    pub fn from_wire(code: u32, exception: u32, detail: String) -> Option<Outcome> {
        Some(match code {
            0 => Outcome::Pending,
            1 => Outcome::Ok,
            2 => Outcome::Exception(u8::try_from(exception).ok()?),
            3 => Outcome::Timeout,
            4 => Outcome::Refused(detail),
            5 => Outcome::Expired,
            6 => Outcome::Superseded,
            _ => return None,
        })
    }
}

/// A desired value and its version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredValue {
    /// The value to write.
    pub value: Value,
    /// Its version (the node's downlink sequence number; 0 = set locally, not yet accepted
    /// by the hub).
    pub version: u64,
    /// Who set it.
    pub origin: Origin,
    /// When it was set, ms since the Unix epoch.
    pub set_ms: u64,
}

/// What became of the last desired version applied to a property.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    /// The version (0 = a local change not yet accepted by the hub).
    pub version: u64,
    /// The outcome.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// When the outcome was reached, ms since the Unix epoch.
    pub ts_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_round_trip_on_the_wire() {
        for o in [
            Outcome::Pending,
            Outcome::Ok,
            Outcome::Exception(2),
            Outcome::Timeout,
            Outcome::Refused("above the maximum 100".into()),
            Outcome::Expired,
            Outcome::Superseded,
        ] {
            let (c, e, d) = o.to_wire();
            assert_eq!(Outcome::from_wire(c, e, d), Some(o));
        }
        assert_eq!(Outcome::from_wire(99, 0, String::new()), None);
        assert_eq!(Outcome::from_wire(2, 300, String::new()), None);
    }

    #[test]
    fn applied_serializes_flat() {
        let a = Applied {
            version: 4,
            outcome: Outcome::Exception(2),
            ts_ms: 7,
        };
        assert_eq!(
            serde_json::to_value(&a).unwrap(),
            serde_json::json!({"version": 4, "outcome": "exception", "detail": 2, "ts_ms": 7})
        );
    }
}
