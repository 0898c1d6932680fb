//! Checking a value someone wants written against its tag, before anything is queued.
//!
//! Desired values arrive as JSON (local apps over MQTT) or as typed wire values (the hub).
//! [`check`] decides whether a value may be written to a tag: the tag is writable, the value's
//! kind fits the tag's type, and after removing the tag's offset and scale it fits the
//! registers. It uses the same codec that encodes the write, so what passes here encodes.

use edgesync_protocol::{PropertyId, Value};

use crate::local::writable;
use crate::modbus::codec;
use crate::model::{DataType, DeviceSpec, Table, TagSpec};

pub use edgesync_protocol::desired::FieldError;
use edgesync_protocol::desired::json_kind;

/// Why a value may not be written to a tag (the reason an outcome `refused` carries).
pub fn check(tag: &TagSpec, value: &Value) -> Result<(), String> {
    if !writable(tag) {
        return Err(format!(
            "{} is not writable ({} in the {} table)",
            tag.property,
            match tag.access {
                crate::model::Access::Read => "access read",
                _ => "not a coil or holding register",
            },
            tag.table.as_str()
        ));
    }
    let r = match (tag.table, tag.data_type, tag.bit) {
        (Table::Coil, _, _) => codec::encode_bit(tag, value).map(|_| ()),
        (_, DataType::Bool, Some(_)) => codec::encode_bit_mask(tag, value).map(|_| ()),
        _ => codec::encode(tag, value).map(|_| ()),
    };
    r.map_err(|e| e.to_string())
}

/// How the hub sees a device's properties (sent after every welcome, so the hub can check
/// desired values before it accepts them).
pub fn schema(spec: &DeviceSpec) -> edgesync_protocol::frame::DeviceSchema {
    let properties = spec
        .tags
        .iter()
        .map(|tag| {
            let identity = tag.scale == 1.0 && tag.offset == 0.0;
            let raw: Option<(f64, f64)> = match tag.data_type {
                DataType::Int16 => Some((i16::MIN.into(), i16::MAX.into())),
                DataType::UInt16 => Some((0.0, u16::MAX.into())),
                DataType::Int32 => Some((i32::MIN.into(), i32::MAX.into())),
                DataType::UInt32 => Some((0.0, u32::MAX.into())),
                DataType::Int64 => Some((i64::MIN as f64, i64::MAX as f64)),
                DataType::UInt64 => Some((0.0, u64::MAX as f64)),
                DataType::Float32 => Some((f32::MIN.into(), f32::MAX.into())),
                DataType::Float64 | DataType::Bool | DataType::String { .. } => None,
            };
            let (min, max) = match raw {
                Some((lo, hi)) => {
                    let (a, b) = (lo * tag.scale + tag.offset, hi * tag.scale + tag.offset);
                    (Some(a.min(b)), Some(a.max(b)))
                }
                None => (None, None),
            };
            let kind = match tag.data_type {
                DataType::Bool => "bool",
                DataType::String { .. } => "string",
                DataType::Float32 | DataType::Float64 => "float",
                _ if !identity => "float",
                DataType::Int16 | DataType::Int32 | DataType::Int64 => "int",
                DataType::UInt16 | DataType::UInt32 | DataType::UInt64 => "uint",
            };
            edgesync_protocol::frame::PropertySchema {
                property: tag.property.as_str().to_owned(),
                kind: kind.to_owned(),
                writable: writable(tag),
                unit: tag.unit.clone().unwrap_or_default(),
                min,
                max,
            }
        })
        .collect();
    edgesync_protocol::frame::DeviceSchema {
        device: spec.id.as_str().to_owned(),
        properties,
    }
}

/// The typed value of a JSON value for a tag (before [`check`]).
pub fn from_json(tag: &TagSpec, v: &serde_json::Value) -> Result<Value, String> {
    use serde_json::Value as J;
    let wrong = || {
        format!(
            "a {} cannot be written to a {} tag",
            json_kind(v),
            codec::type_name(&tag.data_type)
        )
    };
    match (tag.data_type, v) {
        (DataType::Bool, J::Bool(b)) => Ok(Value::Bool(*b)),
        (DataType::Bool, J::Number(n)) => match n.as_u64() {
            Some(0) => Ok(Value::Bool(false)),
            Some(1) => Ok(Value::Bool(true)),
            _ => Err(format!("{n} is not a boolean (0 or 1)")),
        },
        (DataType::String { .. }, J::String(s)) => Ok(Value::Str(s.clone())),
        (DataType::Bool | DataType::String { .. }, _) => Err(wrong()),
        (_, J::Number(n)) => Ok(if let Some(i) = n.as_i64() {
            Value::Int(i)
        } else if let Some(u) = n.as_u64() {
            Value::UInt(u)
        } else {
            Value::Float(n.as_f64().ok_or_else(wrong)?)
        }),
        _ => Err(wrong()),
    }
}

/// Converts and checks `{property: json}` for a device: all or nothing, every problem named.
pub fn from_json_map(
    spec: &DeviceSpec,
    values: &serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<(PropertyId, Value)>, Vec<FieldError>> {
    let mut ok = vec![];
    let mut errors = vec![];
    if values.is_empty() {
        errors.push(FieldError::empty_change());
    }
    for (name, json) in values {
        let err = |message: String| FieldError {
            field: name.clone(),
            message,
        };
        let Some(tag) = spec.tags.iter().find(|t| t.property.as_str() == name) else {
            errors.push(err(format!("device {} has no property {name:?}", spec.id)));
            continue;
        };
        match from_json(tag, json).and_then(|v| check(tag, &v).map(|()| v)) {
            Ok(v) => ok.push((tag.property.clone(), v)),
            Err(m) => errors.push(err(m)),
        }
    }
    if errors.is_empty() {
        Ok(ok)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::Access;
    use crate::model::test_support::{device, tag};

    fn scaled(mut t: TagSpec, scale: f64) -> TagSpec {
        t.scale = scale;
        t
    }

    fn spec() -> DeviceSpec {
        device(
            "plc",
            vec![
                scaled(
                    tag(
                        "setpoint",
                        Table::HoldingRegister,
                        DataType::UInt16,
                        Access::ReadWrite,
                    ),
                    0.1,
                ),
                tag("run", Table::Coil, DataType::Bool, Access::ReadWrite),
                tag("temp", Table::InputRegister, DataType::Int16, Access::Read),
                tag("ro", Table::HoldingRegister, DataType::Int16, Access::Read),
            ],
        )
    }

    fn map(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn good_values_become_typed() {
        let got = from_json_map(&spec(), &map(json!({"setpoint": 12.5, "run": true}))).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], (PropertyId::new("run").unwrap(), Value::Bool(true)));
        assert_eq!(
            got[1],
            (PropertyId::new("setpoint").unwrap(), Value::Float(12.5))
        );
        // 0/1 for a coil.
        assert!(from_json_map(&spec(), &map(json!({"run": 1}))).is_ok());
    }

    #[test]
    fn every_problem_is_named_and_nothing_passes() {
        let errs = from_json_map(
            &spec(),
            &map(json!({
                "setpoint": 7000.0,      // 70000 raw: above uint16 after scale 0.1
                "run": "yes",            // wrong type
                "temp": 3,               // input register: not writable
                "ro": 3,                 // access read
                "nope": 1,               // unknown
                "setpoint2": null,
            })),
        )
        .unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            vec!["nope", "ro", "run", "setpoint", "setpoint2", "temp"]
        );
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert!(text[1].contains("not writable"), "{text:?}");
        assert!(text[2].contains("string"), "{text:?}");
        assert!(text[3].contains("out of range"), "{text:?}");
        assert!(text[0].contains("no property"), "{text:?}");
        assert!(
            from_json_map(&spec(), &serde_json::Map::new()).is_err(),
            "an empty change is refused"
        );
    }
}
