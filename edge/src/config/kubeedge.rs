//! KubeEdge import: Modbus devices described as KubeEdge `devices.kubeedge.io/v1beta1`
//! `Device` and `DeviceModel` objects, named from `agent.toml`:
//!
//! ```toml
//! [[kubeedge]]
//! device = "kubeedge/devices.yaml"   # one or more YAML documents (`---`)
//! model = "kubeedge/models.yaml"     # optional: models may also live in the device file
//! cycle_unit = "ms"                  # how collectCycle/reportCycle are read: "ms" (default) or "ns"
//! ```
//!
//! Each `Device` whose `spec.protocol.protocolName` is `modbus` becomes a [`DeviceSpec`]
//! (devices of other protocols are skipped); each of its `spec.properties` becomes a tag, typed
//! by the matching property of the `DeviceModel` named by `spec.deviceModelRef.name`. The tag is
//! then validated by exactly the code that validates a `[[devices.tags]]` table, and the device
//! by the same rules as a `[[devices]]` table (ids unique across TOML and YAML, at least one
//! tag). Every problem names the YAML file, the line (of the device's `metadata` or of the
//! property) and the device and property. `docs/modbus.md` documents the mapping and the facts
//! about KubeEdge's own Modbus mappers it follows.
//!
//! Reading is in two passes over each file: the first reads only `apiVersion` and `kind` of
//! every document (so that a `v1alpha2` object is reported as such, not as a type error), the
//! second the fields this import uses. Fields it does not use (`status`, `pushMethod`,
//! `reportToCloud`, `desired`, `methods`, ...) are ignored.
//!
//! KubeEdge keeps both `configData` maps free-form and its mappers decode them with Go's
//! `encoding/json`, which matches keys case-insensitively. So the import reads `configData` as
//! key/value pairs ([`ConfigMap`]), finds known keys case-insensitively, and types each value
//! itself: unknown keys and values of the wrong type are errors (a misspelt `isRegisterSwap`
//! would silently garble values), except the few keys KubeEdge's own samples carry but no
//! mapper reads (see [`VISITOR_IGNORED`]). Since KubeEdge 1.22 a `DeviceModel` property may
//! carry `visitors` and the model `protocolConfigData`; the device's keys override the model's
//! key by key, as KubeEdge merges them.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

use edgesync_protocol::DeviceId;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_saphyr::Spanned;
use toml::de::DeTable;

use super::{
    DeviceDefaults, IntOrString, MIN_POLL_INTERVAL_MS, RawTag, check_tag, ms, net, u16_of,
};
use crate::model::{DeviceSpec, LinkSpec, Parity, Table, default_inter_frame_delay};
use edgesync_protocol::config_diag::{ConfigError, ConfigErrors, Doc, Loc};

/// The only API version accepted.
pub(super) const API_VERSION: &str = "devices.kubeedge.io/v1beta1";

/// The API version KubeEdge removed in 1.16; reported with a hint.
const API_V1ALPHA2: &str = "devices.kubeedge.io/v1alpha2";

/// Longest poll interval accepted (as for TOML tags): one day, in milliseconds.
const MAX_CYCLE_MS: i64 = 86_400_000;

/// Longest request timeout accepted (as for TOML devices), in milliseconds.
const MAX_TIMEOUT_MS: i64 = 600_000;

/// `[[kubeedge]]` in agent.toml.
#[derive(Debug, Default, Deserialize)]
struct RawKubeEdge {
    /// YAML file with `Device` objects (and possibly `DeviceModel` objects); required.
    device: Option<String>,
    /// YAML file with `DeviceModel` objects.
    model: Option<String>,
    /// Unit of `collectCycle`, `reportCycle` and `timeout`: `ms` (default) or `ns`.
    cycle_unit: Option<String>,
}

/// Unit of KubeEdge's `collectCycle` / `reportCycle` (and of `configData.timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CycleUnit {
    /// Milliseconds (KubeEdge's mapper-framework since 1.16).
    Ms,
    /// Nanoseconds (Go `time.Duration`, as the KubeEdge 1.15 Modbus mapper read them).
    Ns,
}

impl CycleUnit {
    /// `v` (>= 0) in this unit as whole milliseconds (nanoseconds are rounded up to the next ms).
    fn to_ms(self, v: i64) -> i64 {
        match self {
            CycleUnit::Ms => v,
            CycleUnit::Ns => v / 1_000_000 + i64::from(v % 1_000_000 != 0),
        }
    }

    fn name(self) -> &'static str {
        match self {
            CycleUnit::Ms => "ms",
            CycleUnit::Ns => "ns",
        }
    }
}

/// First pass: what a document is.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawHead {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<Spanned<RawMeta>>,
}

/// Second pass: the fields of a `Device` or `DeviceModel` this import uses.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawObject {
    kind: Option<String>,
    metadata: Option<Spanned<RawMeta>>,
    spec: Option<RawSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawMeta {
    name: Option<Spanned<String>>,
}

/// The union of `DeviceModel.spec` and `Device.spec`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawSpec {
    properties: Vec<Spanned<RawProperty>>,
    #[serde(rename = "deviceModelRef")]
    device_model_ref: Option<RawRef>,
    /// `Device`: `{protocolName, configData}`; `DeviceModel`: the protocol's name.
    protocol: Option<RawProtocolField>,
    /// `DeviceModel` (KubeEdge 1.22+): protocol `configData` defaults for its devices.
    #[serde(rename = "protocolConfigData")]
    protocol_config_data: Option<ConfigMap>,
    /// v1alpha2 layout (`propertyVisitors`), reported as such.
    #[serde(rename = "propertyVisitors")]
    property_visitors: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawRef {
    name: Option<String>,
}

/// The union of a `DeviceModel` property and a `Device` property.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawProperty {
    name: Option<Spanned<String>>,
    /// Model: `INT`, `FLOAT`, `DOUBLE`, `BOOLEAN`, `STRING`, `BYTES`, `STREAM`.
    #[serde(rename = "type")]
    data_type: Option<RawTypeField>,
    /// Model: `ReadWrite` or `ReadOnly`.
    #[serde(rename = "accessMode")]
    access_mode: Option<String>,
    /// Model: engineering unit.
    unit: Option<String>,
    /// Device: how often to read the property.
    #[serde(rename = "collectCycle")]
    collect_cycle: Option<i64>,
    /// Device: how often to report it.
    #[serde(rename = "reportCycle")]
    report_cycle: Option<i64>,
    /// Device (and, since KubeEdge 1.22, model): where the property lives.
    visitors: Option<RawVisitors>,
}

/// A model property's `type`: a name in v1beta1, a map (`{int: {accessMode: ...}}`) in v1alpha2.
#[derive(Debug, Clone)]
enum RawTypeField {
    Name(String),
    Alpha2Layout,
}

impl<'de> Deserialize<'de> for RawTypeField {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawTypeField;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a property type such as INT or FLOAT")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawTypeField, E> {
                Ok(RawTypeField::Name(v.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawTypeField, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(RawTypeField::Alpha2Layout)
            }
        }
        de.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct RawVisitors {
    #[serde(rename = "protocolName")]
    protocol_name: Option<String>,
    #[serde(rename = "configData")]
    config_data: Option<ConfigMap>,
}

/// `Device.spec.protocol`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawProtocol {
    #[serde(rename = "protocolName")]
    protocol_name: Option<String>,
    #[serde(rename = "configData")]
    config_data: Option<ConfigMap>,
    /// v1alpha2 layout (`protocol.modbus.slaveID`), reported as such.
    modbus: Option<IgnoredAny>,
}

/// `spec.protocol`: a map in a `Device`, a string in a `DeviceModel`.
#[derive(Debug)]
enum RawProtocolField {
    /// `DeviceModel.spec.protocol` (a name; not used).
    Name,
    /// `Device.spec.protocol`.
    Config(Box<RawProtocol>),
}

impl<'de> Deserialize<'de> for RawProtocolField {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawProtocolField;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a protocol name or a map with protocolName and configData")
            }
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<RawProtocolField, E> {
                Ok(RawProtocolField::Name)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawProtocolField, A::Error> {
                RawProtocol::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(|p| RawProtocolField::Config(Box::new(p)))
            }
        }
        de.deserialize_any(V)
    }
}

/// One value of a `configData` map, as YAML gave it.
#[derive(Debug, Clone, PartialEq)]
enum Scalar {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    /// A map, a list, or an integer beyond `i64`: never a valid Modbus setting.
    Other(&'static str),
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Null => f.write_str("null"),
            Scalar::Bool(b) => write!(f, "{b}"),
            Scalar::Int(i) => write!(f, "{i}"),
            Scalar::Float(x) => write!(f, "{x}"),
            Scalar::Str(s) => write!(f, "{s:?} (a string)"),
            Scalar::Other(what) => f.write_str(what),
        }
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a value")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(i64::try_from(v).map_or(Scalar::Other("an integer too large"), Scalar::Int))
            }
            fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<Scalar, E> {
                Ok(i64::try_from(v).map_or(Scalar::Other("an integer too large"), Scalar::Int))
            }
            fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<Scalar, E> {
                Ok(i64::try_from(v).map_or(Scalar::Other("an integer too large"), Scalar::Int))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(v.to_owned()))
            }
            fn visit_bytes<E: serde::de::Error>(self, _: &[u8]) -> Result<Scalar, E> {
                Ok(Scalar::Other("binary data"))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar::Null)
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar::Null)
            }
            fn visit_some<D2: serde::Deserializer<'de>>(self, de: D2) -> Result<Scalar, D2::Error> {
                Scalar::deserialize(de)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Scalar, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other("a map"))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Scalar, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other("a list"))
            }
        }
        de.deserialize_any(V)
    }
}

/// A `configData` map: its entries in file order, keys as written.
#[derive(Debug, Clone, Default, PartialEq)]
struct ConfigMap(Vec<(String, Scalar)>);

impl<'de> Deserialize<'de> for ConfigMap {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ConfigMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of settings")
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<ConfigMap, E> {
                Ok(ConfigMap::default())
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<ConfigMap, E> {
                Ok(ConfigMap::default())
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ConfigMap, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<Scalar, Scalar>()? {
                    let key = match k {
                        Scalar::Str(s) => s,
                        other => other.to_string(),
                    };
                    entries.push((key, v));
                }
                Ok(ConfigMap(entries))
            }
        }
        de.deserialize_any(V)
    }
}

impl ConfigMap {
    /// The entry whose key is `key` ignoring ASCII case (as Go's `encoding/json` matches), with
    /// the key as written; `null` counts as absent (Go leaves the field at its zero value).
    fn get(&self, key: &str) -> Option<(&str, &Scalar)> {
        self.0
            .iter()
            .find(|(k, v)| k.eq_ignore_ascii_case(key) && *v != Scalar::Null)
            .map(|(k, v)| (k.as_str(), v))
    }

    /// `base` overridden key by key (ignoring case) by `over`, as KubeEdge merges a
    /// `DeviceModel`'s visitors / `protocolConfigData` with the `Device`'s.
    fn merged(base: Option<&ConfigMap>, over: Option<&ConfigMap>) -> Option<ConfigMap> {
        match (base, over) {
            (None, None) => None,
            (Some(m), None) | (None, Some(m)) => Some(m.clone()),
            (Some(base), Some(over)) => {
                let mut out: Vec<(String, Scalar)> = base
                    .0
                    .iter()
                    .filter(|(k, _)| !over.0.iter().any(|(o, _)| o.eq_ignore_ascii_case(k)))
                    .cloned()
                    .collect();
                out.extend(over.0.iter().cloned());
                Some(ConfigMap(out))
            }
        }
    }
}

/// A problem with a `configData` map.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
enum ConfigDataError {
    /// A key no KubeEdge Modbus mapper reads.
    #[error("{what} has unknown key {key:?} ({hint})")]
    UnknownKey {
        what: &'static str,
        key: String,
        hint: String,
    },
    /// The same key twice, differing in case only.
    #[error(
        "{what} has both {first:?} and {second:?}; KubeEdge's mappers match keys ignoring case, so they name the same setting: keep one"
    )]
    SameKey {
        what: &'static str,
        first: String,
        second: String,
    },
    /// Two names of one setting.
    #[error("{what} has both {first:?} and {second:?}, two names for the same setting: keep one")]
    Alias {
        what: &'static str,
        first: &'static str,
        second: &'static str,
    },
    /// A value of the wrong type.
    #[error("{what}.{key} is {value} but must be {expected}{hint}")]
    WrongType {
        what: &'static str,
        key: String,
        value: String,
        expected: &'static str,
        hint: &'static str,
    },
}

/// Reads typed values out of a `configData` map, collecting problems.
struct ConfigReader<'a> {
    map: &'a ConfigMap,
    what: &'static str,
    errors: Vec<ConfigDataError>,
}

impl<'a> ConfigReader<'a> {
    /// Checks the keys of `map` against `known` and `ignored` (case-insensitively).
    fn new(
        map: &'a ConfigMap,
        what: &'static str,
        known: &[&'static str],
        ignored: &[&'static str],
    ) -> Self {
        let mut errors = Vec::new();
        let mut seen: BTreeMap<String, &str> = BTreeMap::new();
        for (key, _) in &map.0 {
            let lower = key.to_ascii_lowercase();
            if let Some(first) = seen.get(&lower) {
                errors.push(ConfigDataError::SameKey {
                    what,
                    first: (*first).to_owned(),
                    second: key.clone(),
                });
                continue;
            }
            seen.insert(lower, key);
            if known
                .iter()
                .chain(ignored)
                .any(|k| k.eq_ignore_ascii_case(key))
            {
                continue;
            }
            let close = known
                .iter()
                .map(|k| {
                    (
                        edit_distance(&key.to_ascii_lowercase(), &k.to_ascii_lowercase()),
                        k,
                    )
                })
                .filter(|(d, _)| *d <= 2)
                .min_by_key(|(d, _)| *d);
            let hint = match close {
                Some((_, k)) => format!("did you mean {k:?}?"),
                None => format!("expected one of: {}", known.join(", ")),
            };
            errors.push(ConfigDataError::UnknownKey {
                what,
                key: key.clone(),
                hint,
            });
        }
        Self { map, what, errors }
    }

    fn wrong(&mut self, key: &str, value: &Scalar, expected: &'static str) {
        let hint = match value {
            Scalar::Bool(_) if expected == "a string" => {
                " (YAML reads some unquoted words, such as n, no, yes, on, off, as true or false: quote the value)"
            }
            _ => "",
        };
        self.errors.push(ConfigDataError::WrongType {
            what: self.what,
            key: key.to_owned(),
            value: value.to_string(),
            expected,
            hint,
        });
    }

    fn int(&mut self, key: &str) -> Option<i64> {
        let (k, v) = self.map.get(key)?;
        match v {
            Scalar::Int(i) => Some(*i),
            other => {
                self.wrong(k, other, "an integer");
                None
            }
        }
    }

    fn number(&mut self, key: &str) -> Option<f64> {
        let (k, v) = self.map.get(key)?;
        match v {
            // Exact for every integer a scale is written with.
            Scalar::Int(i) => Some(*i as f64),
            Scalar::Float(x) => Some(*x),
            other => {
                self.wrong(k, other, "a number");
                None
            }
        }
    }

    fn boolean(&mut self, key: &str) -> Option<bool> {
        let (k, v) = self.map.get(key)?;
        match v {
            Scalar::Bool(b) => Some(*b),
            other => {
                self.wrong(k, other, "true or false");
                None
            }
        }
    }

    fn string(&mut self, key: &str) -> Option<String> {
        let (k, v) = self.map.get(key)?;
        match v {
            Scalar::Str(s) => Some(s.clone()),
            other => {
                self.wrong(k, other, "a string");
                None
            }
        }
    }

    fn int_or_string(&mut self, key: &str) -> Option<IntOrString> {
        let (k, v) = self.map.get(key)?;
        match v {
            Scalar::Int(i) => Some(IntOrString::Int(*i)),
            Scalar::Str(s) => Some(IntOrString::Str(s.clone())),
            other => {
                self.wrong(k, other, "a number or a string");
                None
            }
        }
    }

    /// The value of the first of two names for one setting; both given is an error.
    fn string_alias(&mut self, a: &'static str, b: &'static str) -> Option<String> {
        if self.map.get(a).is_some() && self.map.get(b).is_some() {
            self.errors.push(ConfigDataError::Alias {
                what: self.what,
                first: a,
                second: b,
            });
            return None;
        }
        if self.map.get(a).is_some() {
            self.string(a)
        } else {
            self.string(b)
        }
    }
}

/// Keys of a Modbus `Device.spec.protocol.configData` (matched ignoring case).
const PROTOCOL_KEYS: &[&str] = &[
    "slaveID",
    "ip",
    "port",
    "serialPort",
    "serialName",
    "baudRate",
    "dataBits",
    "stopBits",
    "parity",
    "timeout",
    "communicateMode",
    "rs485Enabled",
];

/// Keys of a Modbus property's `visitors.configData` (matched ignoring case).
const VISITOR_KEYS: &[&str] = &[
    "register",
    "offset",
    "limit",
    "scale",
    "isSwap",
    "isRegisterSwap",
    "dataType",
];

/// Keys of `visitors.configData` that KubeEdge's own samples carry but no KubeEdge Modbus mapper
/// reads (`max`/`min` in kubeedge/examples `temperature-sensor-demo`): accepted and ignored.
const VISITOR_IGNORED: &[&str] = &["max", "min"];

/// `Device.spec.protocol.configData` of a Modbus device (merged with the model's defaults).
#[derive(Debug, Default)]
struct ProtocolCfg {
    slave_id: Option<i64>,
    ip: Option<String>,
    port: Option<IntOrString>,
    /// `serialPort` (KubeEdge 1.15 mapper) or `serialName` (mapper-framework example).
    serial_port: Option<String>,
    baud_rate: Option<i64>,
    data_bits: Option<i64>,
    stop_bits: Option<i64>,
    parity: Option<String>,
    timeout: Option<i64>,
    communicate_mode: Option<String>,
    rs485_enabled: Option<bool>,
}

fn protocol_cfg(map: &ConfigMap) -> (ProtocolCfg, Vec<ConfigDataError>) {
    let mut r = ConfigReader::new(map, "spec.protocol.configData", PROTOCOL_KEYS, &[]);
    let cfg = ProtocolCfg {
        slave_id: r.int("slaveID"),
        ip: r.string("ip"),
        port: r.int_or_string("port"),
        serial_port: r.string_alias("serialPort", "serialName"),
        baud_rate: r.int("baudRate"),
        data_bits: r.int("dataBits"),
        stop_bits: r.int("stopBits"),
        parity: r.string("parity"),
        timeout: r.int("timeout"),
        communicate_mode: r.string("communicateMode"),
        rs485_enabled: r.boolean("rs485Enabled"),
    };
    (cfg, r.errors)
}

/// `visitors.configData` of a Modbus property (merged with the model's, KubeEdge 1.22+).
#[derive(Debug, Default)]
struct VisitorCfg {
    register: Option<String>,
    offset: Option<i64>,
    limit: Option<i64>,
    scale: Option<f64>,
    is_swap: Option<bool>,
    is_register_swap: Option<bool>,
    /// The mapper-framework's per-visitor type; overrides the model's.
    data_type: Option<String>,
}

fn visitor_cfg(map: &ConfigMap) -> (VisitorCfg, Vec<ConfigDataError>) {
    let mut r = ConfigReader::new(map, "visitors.configData", VISITOR_KEYS, VISITOR_IGNORED);
    let cfg = VisitorCfg {
        register: r.string("register"),
        offset: r.int("offset"),
        limit: r.int("limit"),
        scale: r.number("scale"),
        is_swap: r.boolean("isSwap"),
        is_register_swap: r.boolean("isRegisterSwap"),
        data_type: r.string("dataType"),
    };
    (cfg, r.errors)
}

/// A `DeviceModel` property, as needed to type a device's property.
#[derive(Debug, Clone)]
struct ModelProperty {
    data_type: Option<RawTypeField>,
    access_mode: Option<String>,
    unit: Option<String>,
    /// KubeEdge 1.22+: visitor defaults for the devices of this model.
    visitors: Option<RawVisitors>,
}

/// One `DeviceModel`, with where it came from.
#[derive(Debug)]
struct Model {
    file: String,
    line: Option<usize>,
    properties: HashMap<String, ModelProperty>,
    /// KubeEdge 1.22+: protocol `configData` defaults for the devices of this model.
    protocol_config: Option<ConfigMap>,
}

/// One YAML file being imported: its name in messages and its problems.
struct YamlFile {
    name: String,
    errors: Vec<ConfigError>,
}

impl YamlFile {
    fn error(&mut self, line: Option<usize>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.name.clone(),
            line,
            message: message.into(),
        });
    }
}

fn line_of<T>(s: &Spanned<T>) -> Option<usize> {
    usize::try_from(s.referenced.line()).ok().filter(|l| *l > 0)
}

/// An object's `metadata.name` and the line to report it at (that of the name, else of
/// `metadata`).
fn meta_name(meta: Option<&Spanned<RawMeta>>) -> (Option<String>, Option<usize>) {
    let Some(meta) = meta else {
        return (None, None);
    };
    match &meta.value.name {
        Some(n) => (Some(n.value.clone()), line_of(n).or(line_of(meta))),
        None => (None, line_of(meta)),
    }
}

/// A property's name and the line to report it at (that of `name`, else of the property).
fn prop_name(prop: &Spanned<RawProperty>) -> (Option<String>, Option<usize>) {
    match &prop.value.name {
        Some(n) => (Some(n.value.clone()), line_of(n).or(line_of(prop))),
        None => (None, line_of(prop)),
    }
}

/// A parse error of `serde_saphyr` as a problem with a line.
fn yaml_error(file: &mut YamlFile, e: &serde_saphyr::Error) {
    let line = e
        .location()
        .and_then(|l| usize::try_from(l.line()).ok())
        .filter(|l| *l > 0);
    // The rendered message may span several lines (a snippet); keep the first.
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("").trim();
    file.error(line, format!("invalid kubeedge yaml: {first}"));
}

/// Imports the devices of every `[[kubeedge]]` entry of `root` into `devices`.
///
/// Problems with the `[[kubeedge]]` table itself go to `doc` (the TOML file); problems inside
/// the YAML files go to `foreign`, each naming its YAML file. `source` is the TOML file's name
/// as given, used to name the YAML files in messages; `base` resolves their paths.
pub(super) fn import(
    doc: &mut Doc<'_>,
    root: &DeTable<'_>,
    source: &str,
    base: &Path,
    defaults: &DeviceDefaults,
    devices: &mut Vec<DeviceSpec>,
    foreign: &mut ConfigErrors,
) {
    let items = doc.table_array(root, "kubeedge", "[[kubeedge]]");
    for (i, (node, loc)) in items.into_iter().enumerate() {
        let loc = loc.named(format!("[[kubeedge]] #{}", i + 1));
        let Some(raw) = doc.section::<RawKubeEdge>(node, &loc) else {
            continue;
        };
        let unit = match raw.cycle_unit.as_deref() {
            None => Some(CycleUnit::Ms),
            Some(s) => doc.choice(
                &loc,
                "cycle_unit",
                s,
                &[("ms", CycleUnit::Ms), ("ns", CycleUnit::Ns)],
            ),
        };
        let device_rel = raw.device.clone();
        let device_path = doc.path(&loc, "device", raw.device, base);
        let model_rel = raw.model.clone();
        let model_path = match raw.model {
            None => None,
            Some(m) => doc.path(&loc, "model", Some(m), base),
        };
        let (Some(unit), Some(device_path), Some(device_rel)) = (unit, device_path, device_rel)
        else {
            continue;
        };
        let device_text = match std::fs::read_to_string(&device_path) {
            Ok(t) => t,
            Err(e) => {
                doc.at(
                    &loc,
                    "device",
                    format_args!("cannot read {}: {e}", device_path.display()),
                );
                continue;
            }
        };
        let model_text = match (&model_path, &model_rel) {
            (Some(p), Some(rel)) => match std::fs::read_to_string(p) {
                Ok(t) => Some((display_name(source, rel), t)),
                Err(e) => {
                    doc.at(
                        &loc,
                        "model",
                        format_args!("cannot read {}: {e}", p.display()),
                    );
                    continue;
                }
            },
            _ => None,
        };
        let device_file = display_name(source, &device_rel);
        let mut files = vec![(device_file, device_text)];
        files.extend(model_text);
        import_texts(&files, unit, defaults, devices, foreign);
    }
}

/// How messages name a YAML file: its path relative to the TOML file's directory, joined to
/// that directory as the TOML file was named.
fn display_name(source: &str, rel: &str) -> String {
    let rel_path = Path::new(rel);
    if rel_path.is_absolute() {
        return rel.to_owned();
    }
    match Path::new(source).parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(rel_path).display().to_string(),
        _ => rel.to_owned(),
    }
}

/// The objects of one YAML text.
struct Parsed {
    file: YamlFile,
    objects: Vec<RawObject>,
}

fn parse_yaml(name: &str, text: &str) -> Parsed {
    let mut file = YamlFile {
        name: name.to_owned(),
        errors: Vec::new(),
    };
    let heads: Vec<RawHead> = match serde_saphyr::from_multiple(text) {
        Ok(h) => h,
        Err(e) => {
            yaml_error(&mut file, &e);
            return Parsed {
                file,
                objects: Vec::new(),
            };
        }
    };
    let mut wrong_version = false;
    for h in &heads {
        let Some(kind) = h.kind.as_deref() else {
            continue;
        };
        if kind != "Device" && kind != "DeviceModel" {
            continue;
        }
        if h.api_version.as_deref() != Some(API_VERSION) {
            wrong_version = true;
            let (name, line) = meta_name(h.metadata.as_ref());
            let name = name.unwrap_or_default();
            let given = h.api_version.as_deref().unwrap_or("");
            let hint = if given == API_V1ALPHA2 {
                " (KubeEdge removed v1alpha2 in 1.16; rewrite the object in the v1beta1 layout, see docs/modbus.md, \"From v1alpha2\")"
            } else {
                ""
            };
            file.error(
                line,
                format!(
                    "{kind} {name:?}: apiVersion {given:?} is not supported (only {API_VERSION:?} is){hint}"
                ),
            );
        }
    }
    if wrong_version {
        return Parsed {
            file,
            objects: Vec::new(),
        };
    }
    match serde_saphyr::from_multiple::<RawObject>(text) {
        Ok(objects) => Parsed { file, objects },
        Err(e) => {
            yaml_error(&mut file, &e);
            Parsed {
                file,
                objects: Vec::new(),
            }
        }
    }
}

/// Imports the devices of `files` (name, text); the first is the device file.
fn import_texts(
    files: &[(String, String)],
    unit: CycleUnit,
    defaults: &DeviceDefaults,
    devices: &mut Vec<DeviceSpec>,
    foreign: &mut ConfigErrors,
) {
    let mut parsed: Vec<Parsed> = files.iter().map(|(n, t)| parse_yaml(n, t)).collect();

    // Models from every file of the entry.
    let mut models: HashMap<String, Model> = HashMap::new();
    for p in &mut parsed {
        for obj in &p.objects {
            if obj.kind.as_deref() != Some("DeviceModel") {
                continue;
            }
            let (name, line) = meta_name(obj.metadata.as_ref());
            let Some(name) = name else {
                p.file.error(line, "DeviceModel: missing metadata.name");
                continue;
            };
            if let Some(first) = models.get(&name) {
                let at = first.line.map(|l| format!(":{l}")).unwrap_or_default();
                p.file.error(
                    line,
                    format!(
                        "DeviceModel {name:?} is defined twice (first in {}{at})",
                        first.file
                    ),
                );
                continue;
            }
            let mut properties = HashMap::new();
            if let Some(spec) = &obj.spec {
                for prop in &spec.properties {
                    let (pname, pline) = prop_name(prop);
                    let Some(pname) = pname else {
                        p.file.error(
                            pline,
                            format!("DeviceModel {name:?}: a property has no name"),
                        );
                        continue;
                    };
                    properties.insert(
                        pname,
                        ModelProperty {
                            data_type: prop.value.data_type.clone(),
                            access_mode: prop.value.access_mode.clone(),
                            unit: prop.value.unit.clone(),
                            visitors: prop.value.visitors.clone(),
                        },
                    );
                }
            }
            models.insert(
                name,
                Model {
                    file: p.file.name.clone(),
                    line,
                    properties,
                    protocol_config: obj
                        .spec
                        .as_ref()
                        .and_then(|s| s.protocol_config_data.clone()),
                },
            );
        }
    }

    // Devices from the device file only.
    if let Some(first) = parsed.first_mut() {
        for obj in &first.objects {
            if obj.kind.as_deref() != Some("Device") {
                continue;
            }
            if let Some(dev) = import_device(&mut first.file, obj, &models, unit, defaults, devices)
            {
                devices.push(dev);
            }
        }
    }
    for p in parsed {
        let mut errors = p.file.errors;
        errors.sort_by_key(|e| e.line.unwrap_or(0));
        foreign.errors.extend(errors);
    }
}

/// Why a KubeEdge property type cannot be imported as given.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
enum TypeError {
    #[error(
        "type {kind:?} in a bit table takes limit 1, not {limit}: KubeEdge would pack {limit} coils or inputs into one number; edgesync imports each bit as its own property"
    )]
    BitLimit { kind: String, limit: i64 },
    #[error(
        "type {kind:?} in a register table is not imported: KubeEdge's mapper reads it as \"high byte of the first register == 1\"; describe the tag in agent.toml with type \"bool\" and bit instead"
    )]
    BoolInRegister { kind: String },
    #[error(
        "type {kind:?} cannot live in a bit table (CoilRegister and DiscreteInputRegister hold single bits; use type BOOLEAN or INT)"
    )]
    NotInBitTable { kind: String },
    #[error(
        "type {kind:?} takes limit 1 (uint16), 2 (uint32) or 4 (uint64) registers, not {limit}"
    )]
    IntLimit { kind: String, limit: i64 },
    #[error(
        "type {kind:?} takes limit 2 (float32) or 1 (a 16-bit register read as unsigned, scaled), not {limit}"
    )]
    FloatLimit { kind: String, limit: i64 },
    #[error(
        "type {kind:?} takes limit 4 (float64) or 1 (a 16-bit register read as unsigned, scaled), not {limit}"
    )]
    DoubleLimit { kind: String, limit: i64 },
    #[error("type {kind:?} needs limit (its length in registers, 2 characters each)")]
    StringLimit { kind: String },
    #[error("type {kind:?} is not supported for Modbus")]
    Unsupported { kind: String },
    #[error("type {kind:?} is not one of INT, FLOAT, DOUBLE, BOOLEAN, STRING")]
    Unknown { kind: String },
}

/// What a KubeEdge property type becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mapped {
    /// The edgesync type name.
    data_type: &'static str,
    /// String length in registers.
    length: Option<i64>,
}

/// A KubeEdge property type (any case) and `limit` as an edgesync type, for `table`.
///
/// In the bit tables, `BOOLEAN` and `INT` (which KubeEdge reports as 0/1) become `bool`. In the
/// register tables, `INT` is unsigned as in KubeEdge's converters, `FLOAT`/`DOUBLE` are IEEE
/// floats, or one register read as unsigned and scaled (kubeedge/examples temperature-sensor-demo)
/// when `limit` is 1. Absent limits take the natural width.
fn map_type(kind: &str, limit: Option<i64>, table: Table) -> Result<Mapped, TypeError> {
    let kind_lc = kind.to_ascii_lowercase();
    let bits = !table.is_register();
    let owned = || kind.to_owned();
    let plain = |data_type| {
        Ok(Mapped {
            data_type,
            length: None,
        })
    };
    match (kind_lc.as_str(), bits) {
        ("boolean" | "bool" | "int", true) => match limit.unwrap_or(1) {
            1 => plain("bool"),
            n => Err(TypeError::BitLimit {
                kind: owned(),
                limit: n,
            }),
        },
        ("boolean" | "bool", false) => Err(TypeError::BoolInRegister { kind: owned() }),
        ("float" | "double" | "string", true) => Err(TypeError::NotInBitTable { kind: owned() }),
        ("int", false) => match limit.unwrap_or(1) {
            1 => plain("uint16"),
            2 => plain("uint32"),
            4 => plain("uint64"),
            n => Err(TypeError::IntLimit {
                kind: owned(),
                limit: n,
            }),
        },
        ("float", false) => match limit.unwrap_or(2) {
            2 => plain("float32"),
            1 => plain("uint16"),
            n => Err(TypeError::FloatLimit {
                kind: owned(),
                limit: n,
            }),
        },
        ("double", false) => match limit.unwrap_or(4) {
            4 => plain("float64"),
            1 => plain("uint16"),
            n => Err(TypeError::DoubleLimit {
                kind: owned(),
                limit: n,
            }),
        },
        ("string", false) => match limit {
            Some(n) => Ok(Mapped {
                data_type: "string",
                length: Some(n),
            }),
            None => Err(TypeError::StringLimit { kind: owned() }),
        },
        ("bytes" | "stream", _) => Err(TypeError::Unsupported { kind: owned() }),
        _ => Err(TypeError::Unknown { kind: owned() }),
    }
}

/// Levenshtein distance (for suggestions).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

const REGISTERS: &[(&str, Table)] = &[
    ("CoilRegister", Table::Coil),
    ("DiscreteInputRegister", Table::DiscreteInput),
    ("InputRegister", Table::InputRegister),
    ("HoldingRegister", Table::HoldingRegister),
];

/// Converts one `Device` object; `None` if anything is wrong (every problem is reported).
fn import_device(
    file: &mut YamlFile,
    obj: &RawObject,
    models: &HashMap<String, Model>,
    unit: CycleUnit,
    defaults: &DeviceDefaults,
    existing: &[DeviceSpec],
) -> Option<DeviceSpec> {
    let (name, line) = meta_name(obj.metadata.as_ref());
    let Some(name) = name else {
        file.error(line, "Device: missing metadata.name");
        return None;
    };
    let component = format!("device {name:?}");
    let empty = RawSpec::default();
    let spec = obj.spec.as_ref().unwrap_or(&empty);
    if spec.property_visitors.is_some() {
        file.error(
            line,
            format!(
                "{component}: spec.propertyVisitors is the v1alpha2 layout; v1beta1 lists spec.properties, each with visitors (see docs/modbus.md, \"From v1alpha2\")"
            ),
        );
        return None;
    }
    let protocol = match &spec.protocol {
        Some(RawProtocolField::Config(p)) => p,
        Some(RawProtocolField::Name) => {
            file.error(
                line,
                format!(
                    "{component}: spec.protocol must be a map with protocolName and configData"
                ),
            );
            return None;
        }
        // No protocol: not a Modbus device.
        None => return None,
    };
    if protocol.protocol_name.is_none() && protocol.modbus.is_some() {
        file.error(
            line,
            format!(
                "{component}: spec.protocol.modbus is the v1alpha2 layout; v1beta1 says protocolName: modbus and puts the settings in configData (see docs/modbus.md, \"From v1alpha2\")"
            ),
        );
        return None;
    }
    if !protocol
        .protocol_name
        .as_deref()
        .is_some_and(|p| p.eq_ignore_ascii_case("modbus"))
    {
        // Devices of other protocols are not ours to import.
        return None;
    }
    let before = file.errors.len();

    let id = match DeviceId::new(name.clone()) {
        Ok(id) => Some(id),
        Err(e) => {
            file.error(line, format!("{component}: metadata.name: {e}"));
            None
        }
    };
    if existing.iter().any(|d| d.id.as_str() == name) {
        file.error(
            line,
            format!("{component}: device id {name:?} is already used (by a [[devices]] table or an earlier kubeedge device)"),
        );
    }

    // Model.
    let model_name = spec.device_model_ref.as_ref().and_then(|r| r.name.clone());
    let model = match &model_name {
        None => {
            file.error(
                line,
                format!("{component}: missing spec.deviceModelRef.name"),
            );
            None
        }
        Some(m) => match models.get(m) {
            Some(model) => Some(model),
            None => {
                file.error(
                    line,
                    format!("{component}: deviceModelRef {m:?} names no DeviceModel in the files of this [[kubeedge]] entry"),
                );
                None
            }
        },
    };

    // Link, unit id and timeout; the model's protocolConfigData (KubeEdge 1.22+) fills in what
    // the device leaves out.
    let merged = ConfigMap::merged(
        model.and_then(|m| m.protocol_config.as_ref()),
        protocol.config_data.as_ref(),
    )
    .unwrap_or_default();
    let (cfg, problems) = protocol_cfg(&merged);
    for p in problems {
        file.error(line, format!("{component}: {p}"));
    }
    let link = device_link(file, &component, line, &cfg, existing);
    let unit_id = match cfg.slave_id {
        // KubeEdge's mappers send Go's zero value, unit 0, when slaveID is absent: right for
        // TCP; on a serial line 0 is broadcast, which reads nothing.
        None if matches!(link, Some(LinkSpec::Rtu { .. })) => {
            file.error(
                line,
                format!("{component}: configData.slaveID is required with a serial port (KubeEdge would use 0, the broadcast address, which no device answers)"),
            );
            0
        }
        None => 0,
        Some(v) => match u8::try_from(v) {
            Ok(0) if matches!(link, Some(LinkSpec::Rtu { .. })) => {
                file.error(
                    line,
                    format!("{component}: configData.slaveID 0 is the broadcast address on a serial line; use 1..=247"),
                );
                0
            }
            Ok(u) if u <= 247 => u,
            _ => {
                file.error(
                    line,
                    format!("{component}: configData.slaveID is {v} but must be in 0..=247"),
                );
                0
            }
        },
    };
    let timeout_ms = match cfg.timeout.filter(|t| *t != 0) {
        None => defaults.timeout_ms,
        Some(t) => {
            let t_ms = if t < 0 { -1 } else { unit.to_ms(t) };
            if (1..=MAX_TIMEOUT_MS).contains(&t_ms) {
                t_ms
            } else {
                file.error(
                    line,
                    format!(
                        "{component}: configData.timeout is {t} {} but must be 1 ms to 10 minutes (it is read in cycle_unit)",
                        unit.name()
                    ),
                );
                defaults.timeout_ms
            }
        }
    };

    if spec.properties.is_empty() {
        file.error(line, format!("{component}: device has no properties"));
    }
    let mut tags = Vec::new();
    let mut seen: HashMap<String, Option<usize>> = HashMap::new();
    // check_tag reports through a Doc; give it one named after this file (its own line table is
    // not used: every location comes from the YAML spans).
    let mut tag_doc = Doc::new(&file.name, "");
    for (j, prop) in spec.properties.iter().enumerate() {
        let (pname, pline) = prop_name(prop);
        let p = &prop.value;
        let pcomponent = match &pname {
            Some(n) => format!("{component} property {n:?}"),
            None => format!("{component} property #{}", j + 1),
        };
        let Some(pname) = pname else {
            file.error(pline, format!("{pcomponent}: missing name"));
            continue;
        };
        if let Some(first) = seen.get(&pname) {
            let first = first.map(|l| format!(" on line {l}")).unwrap_or_default();
            file.error(
                pline,
                format!("{pcomponent}: property {pname:?} is already used in this device{first}"),
            );
            continue;
        }
        seen.insert(pname.clone(), pline);
        let ctx = PropCtx {
            component: &pcomponent,
            line: pline,
            name: &pname,
            model,
            unit,
            defaults,
        };
        if let Some(raw) = raw_tag(file, &ctx, p) {
            let mut loc = Loc::absent(pcomponent.clone());
            loc.header = pline;
            if let Some(tag) = check_tag(&mut tag_doc, &loc, raw, defaults) {
                tags.push(tag);
            }
        }
    }
    let tag_errors = tag_doc.into_errors();
    file.errors.extend(tag_errors.errors);

    if file.errors.len() > before {
        return None;
    }
    Some(DeviceSpec {
        id: id?,
        link: link?,
        unit_id,
        timeout: ms(timeout_ms),
        max_registers_per_read: u16_of(defaults.max_registers_per_read),
        max_bits_per_read: u16_of(defaults.max_bits_per_read),
        max_gap: u16_of(defaults.max_gap),
        tags,
    })
}

/// The link a device's `configData` describes: TCP with `ip`, RTU with `serialPort` (or
/// `serialName`), checked against `communicateMode` when given. `None` if anything is wrong
/// (reported).
fn device_link(
    file: &mut YamlFile,
    component: &str,
    line: Option<usize>,
    cfg: &ProtocolCfg,
    existing: &[DeviceSpec],
) -> Option<LinkSpec> {
    if cfg.rs485_enabled == Some(true) {
        file.error(
            line,
            format!("{component}: configData.rs485Enabled: true asks the mapper to switch the serial port into RS-485 mode, which edgesync does not do; use an adapter that handles RS-485 itself (or configure the port outside edgesync) and remove the key"),
        );
    }
    let mode = match cfg.communicate_mode.as_deref() {
        None => None,
        Some(m) if m.eq_ignore_ascii_case("tcp") => Some("TCP"),
        Some(m) if m.eq_ignore_ascii_case("rtu") => Some("RTU"),
        Some(m) => {
            file.error(
                line,
                format!("{component}: configData.communicateMode {m:?} is not \"TCP\" or \"RTU\""),
            );
            return None;
        }
    };
    let link = match (&cfg.ip, &cfg.serial_port, mode) {
        (Some(_), Some(_), _) => {
            file.error(
                line,
                format!("{component}: configData has both ip and serialPort; choose one"),
            );
            None
        }
        (Some(_), None, Some("RTU")) => {
            file.error(
                line,
                format!("{component}: configData.communicateMode is \"RTU\" but configData gives ip, not serialPort (or serialName)"),
            );
            None
        }
        (None, Some(_), Some("TCP")) => {
            file.error(
                line,
                format!("{component}: configData.communicateMode is \"TCP\" but configData gives serialPort, not ip"),
            );
            None
        }
        (Some(ip), None, _) => tcp_link(file, component, line, ip, cfg),
        (None, Some(path), _) => rtu_link(file, component, line, path, cfg, existing),
        (None, None, Some("RTU")) => {
            file.error(
                line,
                format!("{component}: configData needs serialPort (or serialName) for Modbus RTU"),
            );
            None
        }
        (None, None, _) => {
            file.error(
                line,
                format!("{component}: configData needs ip (and port) for Modbus TCP, or serialPort for Modbus RTU"),
            );
            None
        }
    };
    if matches!(link, Some(LinkSpec::Tcp { .. }))
        && (cfg.baud_rate.is_some()
            || cfg.data_bits.is_some()
            || cfg.stop_bits.is_some()
            || cfg.parity.is_some())
    {
        file.error(
            line,
            format!("{component}: configData baudRate, dataBits, stopBits and parity apply only with serialPort"),
        );
    }
    link
}

/// The TCP link of a device whose `configData` names `ip`; `port` defaults to 502.
fn tcp_link(
    file: &mut YamlFile,
    component: &str,
    line: Option<usize>,
    ip: &str,
    cfg: &ProtocolCfg,
) -> Option<LinkSpec> {
    let port = match &cfg.port {
        None => "502".to_owned(),
        Some(IntOrString::Int(p)) => p.to_string(),
        Some(IntOrString::Str(s)) => s.clone(),
    };
    let endpoint = if ip.contains(':') && !ip.starts_with('[') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    };
    match net::check_host_port(&endpoint) {
        Ok(()) => Some(LinkSpec::Tcp { endpoint }),
        Err(why) => {
            file.error(
                line,
                format!("{component}: configData ip/port {endpoint:?} {why}"),
            );
            None
        }
    }
}

/// The RTU link of a device whose `configData` names `serialPort`; `None` if anything is wrong
/// (reported). Defaults follow KubeEdge's Modbus mapper: 8 data bits, 1 stop bit, no parity
/// unless `parity` is `even` or `odd`; `baudRate` is required.
fn rtu_link(
    file: &mut YamlFile,
    component: &str,
    line: Option<usize>,
    path: &str,
    cfg: &ProtocolCfg,
    existing: &[DeviceSpec],
) -> Option<LinkSpec> {
    let before = file.errors.len();
    if path.trim().is_empty() {
        file.error(line, format!("{component}: configData.serialPort is empty"));
    }
    if cfg.ip.is_none() && cfg.port.is_some() {
        file.error(
            line,
            format!("{component}: configData.port applies only with ip (Modbus TCP)"),
        );
    }
    let baud = match cfg.baud_rate {
        None => {
            file.error(
                line,
                format!("{component}: configData.baudRate is required with serialPort"),
            );
            0
        }
        Some(b) => match u32::try_from(b) {
            Ok(b) if (300..=4_000_000).contains(&b) => b,
            _ => {
                file.error(
                    line,
                    format!("{component}: configData.baudRate is {b} but must be in 300..=4000000"),
                );
                0
            }
        },
    };
    let data_bits = match cfg.data_bits.unwrap_or(8) {
        7 => 7,
        8 => 8,
        d => {
            file.error(
                line,
                format!("{component}: configData.dataBits is {d} but must be 7 or 8"),
            );
            8
        }
    };
    let stop_bits = match cfg.stop_bits.unwrap_or(1) {
        1 => 1,
        2 => 2,
        d => {
            file.error(
                line,
                format!("{component}: configData.stopBits is {d} but must be 1 or 2"),
            );
            1
        }
    };
    // KubeEdge's mappers compare exactly "even" and "odd" and use no parity for anything else,
    // so a file that worked there with "Even" ran without parity: such spellings are refused
    // rather than guessed.
    let parity = match cfg.parity.as_deref() {
        None | Some("none" | "n") => Parity::None,
        Some("even") => Parity::Even,
        Some("odd") => Parity::Odd,
        Some(p) if matches!(p.to_ascii_lowercase().as_str(), "even" | "e" | "odd" | "o") => {
            file.error(
                line,
                format!(
                    "{component}: configData.parity {p:?} is ambiguous: KubeEdge's mappers read only \"even\" and \"odd\" (lowercase) and use no parity for anything else; write \"even\", \"odd\" or \"none\""
                ),
            );
            Parity::None
        }
        Some(p) => {
            file.error(
                line,
                format!(
                    "{component}: configData.parity {p:?} is not one of \"none\", \"even\", \"odd\""
                ),
            );
            Parity::None
        }
    };
    if file.errors.len() > before {
        return None;
    }
    let link = LinkSpec::Rtu {
        path: path.to_owned(),
        baud,
        parity,
        data_bits,
        stop_bits,
        inter_frame_delay: default_inter_frame_delay(baud, parity, data_bits, stop_bits),
    };
    // One serial port, one set of line settings.
    if let Some(other) = existing.iter().find(|d| {
        d.link.key() == link.key() && matches!(d.link, LinkSpec::Rtu { .. }) && d.link != link
    }) {
        file.error(
            line,
            format!(
                "{component}: serial port {path:?} is also used by device {:?} with other line settings (baud rate, parity, data or stop bits)",
                other.id.as_str()
            ),
        );
        return None;
    }
    Some(link)
}

/// A KubeEdge cycle (`collectCycle` / `reportCycle`) in milliseconds, checked against the range
/// of a poll interval. `None` (absent or 0) means "not given".
fn cycle_ms(
    file: &mut YamlFile,
    component: &str,
    line: Option<usize>,
    key: &str,
    value: Option<i64>,
    unit: CycleUnit,
) -> Result<Option<i64>, ()> {
    let Some(v) = value.filter(|v| *v != 0) else {
        return Ok(None);
    };
    let msv = if v < 0 { -1 } else { unit.to_ms(v) };
    if (MIN_POLL_INTERVAL_MS..=MAX_CYCLE_MS).contains(&msv) {
        return Ok(Some(msv));
    }
    let hint = match unit {
        CycleUnit::Ms if msv > MAX_CYCLE_MS && msv / 1_000_000 <= MAX_CYCLE_MS => {
            " (this looks like nanoseconds, as KubeEdge 1.15 mappers read it: set cycle_unit = \"ns\" in the [[kubeedge]] entry)"
        }
        _ => "",
    };
    file.error(
        line,
        format!(
            "{component}: {key} is {v} {} but must be {MIN_POLL_INTERVAL_MS} ms to 1 day{hint}",
            unit.name()
        ),
    );
    Err(())
}

/// What `raw_tag` needs to know about the property beyond its YAML.
struct PropCtx<'a> {
    component: &'a str,
    line: Option<usize>,
    name: &'a str,
    model: Option<&'a Model>,
    unit: CycleUnit,
    defaults: &'a DeviceDefaults,
}

/// The raw tag a KubeEdge property stands for, for `check_tag` to validate; `None` if the
/// KubeEdge-specific fields are wrong (reported here, in KubeEdge's terms).
fn raw_tag(file: &mut YamlFile, ctx: &PropCtx<'_>, p: &RawProperty) -> Option<RawTag> {
    let PropCtx {
        component,
        line,
        name,
        model,
        unit,
        defaults,
    } = *ctx;
    let before = file.errors.len();
    let model_prop = match model {
        None => None,
        Some(m) => match m.properties.get(name) {
            Some(mp) => Some(mp),
            None => {
                file.error(
                    line,
                    format!("{component}: the DeviceModel has no property {name:?}"),
                );
                None
            }
        },
    };

    // Visitors: the device's, over the model's (KubeEdge 1.22+).
    let model_visitors = model_prop.and_then(|m| m.visitors.as_ref());
    if p.visitors.is_none() && model_visitors.is_none() {
        file.error(line, format!("{component}: missing visitors"));
        return None;
    }
    let proto = p
        .visitors
        .as_ref()
        .and_then(|v| v.protocol_name.as_deref())
        .or_else(|| model_visitors.and_then(|v| v.protocol_name.as_deref()));
    if let Some(proto) = proto
        && !proto.eq_ignore_ascii_case("modbus")
    {
        file.error(
            line,
            format!("{component}: visitors.protocolName is {proto:?}, not \"modbus\""),
        );
    }
    let merged = ConfigMap::merged(
        model_visitors.and_then(|v| v.config_data.as_ref()),
        p.visitors.as_ref().and_then(|v| v.config_data.as_ref()),
    )
    .unwrap_or_default();
    let (v, problems) = visitor_cfg(&merged);
    for problem in problems {
        file.error(line, format!("{component}: {problem}"));
    }

    let table = match v.register.as_deref() {
        None => {
            file.error(
                line,
                format!("{component}: missing visitors.configData.register"),
            );
            None
        }
        Some(r) => match REGISTERS.iter().find(|(n, _)| n.eq_ignore_ascii_case(r)) {
            Some((_, t)) => Some(*t),
            None => {
                file.error(
                    line,
                    format!("{component}: register {r:?} is not one of CoilRegister, DiscreteInputRegister, InputRegister, HoldingRegister"),
                );
                None
            }
        },
    };
    let address = match v.offset {
        None => {
            file.error(
                line,
                format!("{component}: missing visitors.configData.offset"),
            );
            None
        }
        Some(o) if (0..=65_535).contains(&o) => Some(o),
        Some(o) => {
            file.error(
                line,
                format!("{component}: offset {o} is not a 0-based Modbus offset (0..=65535)"),
            );
            None
        }
    };
    let limit_ok = match v.limit {
        Some(l) if l < 1 => {
            file.error(
                line,
                format!("{component}: limit is {l} but must be at least 1"),
            );
            false
        }
        _ => true,
    };

    // The visitor's dataType wins over the model's type (as in the mapper-framework).
    let kind = match (&v.data_type, model_prop.and_then(|m| m.data_type.as_ref())) {
        (Some(k), _) => Some(k.clone()),
        (None, Some(RawTypeField::Name(k))) => Some(k.clone()),
        (None, Some(RawTypeField::Alpha2Layout)) => {
            file.error(
                line,
                format!("{component}: the DeviceModel property's type is a map (the v1alpha2 layout); v1beta1 says type: INT (or FLOAT, ...) with accessMode and unit beside it (see docs/modbus.md, \"From v1alpha2\")"),
            );
            None
        }
        (None, None) => {
            if model_prop.is_some() {
                file.error(
                    line,
                    format!("{component}: the DeviceModel property has no type"),
                );
            }
            None
        }
    };
    let mut mapped = None;
    if let (Some(k), Some(t), true) = (&kind, table, limit_ok) {
        match map_type(k, v.limit, t) {
            Ok(m) => mapped = Some(m),
            Err(why) => file.error(line, format!("{component}: {why}")),
        }
    }
    let data_type = mapped.map(|m| m.data_type);

    let swap = v.is_swap.unwrap_or(false);
    let register_swap = v.is_register_swap.unwrap_or(false);
    let byte_order = match data_type {
        // One coil or input comes as one byte: KubeEdge's swaps leave it alone.
        Some("bool") | None => None,
        Some("string") if swap || register_swap => {
            file.error(
                line,
                format!("{component}: isSwap/isRegisterSwap on a STRING would reorder its characters in KubeEdge; edgesync reads strings 2 characters per register, high byte first, and cannot reorder them"),
            );
            None
        }
        Some("string") => None,
        Some(_) => Some(match (swap, register_swap) {
            (false, false) => "ABCD",
            (true, false) => "BADC",
            (false, true) => "CDAB",
            (true, true) => "DCBA",
        }),
    };
    // scale 0 (or absent) is "no scale" in the mapper-framework example (`if Scale != 0`).
    let scale = match (v.scale.filter(|s| *s != 0.0), data_type) {
        (None, _) => None,
        (Some(s), Some("bool" | "string")) if s != 1.0 => {
            let why = if data_type == Some("bool") {
                "the property is a single bit, imported as a bool, so scale must be 1"
            } else {
                "scale applies only to numeric types"
            };
            file.error(line, format!("{component}: scale {s}: {why}"));
            None
        }
        (Some(_), Some("bool" | "string")) => None,
        (Some(s), _) => Some(s),
    };

    let access = match model_prop.and_then(|m| m.access_mode.as_deref()) {
        None | Some("ReadOnly") => Some("read"),
        // A model is shared by devices: a ReadWrite property read from a read-only table is
        // imported read only rather than refused.
        Some("ReadWrite") => match table {
            Some(Table::Coil | Table::HoldingRegister) => Some("read_write"),
            _ => Some("read"),
        },
        Some(other) => {
            file.error(
                line,
                format!("{component}: accessMode {other:?} is not ReadWrite or ReadOnly"),
            );
            None
        }
    };

    let collect = cycle_ms(file, component, line, "collectCycle", p.collect_cycle, unit);
    let report = cycle_ms(file, component, line, "reportCycle", p.report_cycle, unit);
    if let (Ok(c), Ok(Some(r))) = (collect, report) {
        let poll = c.unwrap_or(defaults.poll_interval_ms);
        if r < poll {
            file.error(
                line,
                format!(
                    "{component}: reportCycle ({r} ms) is shorter than the collect cycle ({poll} ms); edgesync reports a value when it is read, so reportCycle is a heartbeat and must be at least collectCycle"
                ),
            );
        }
    }

    if file.errors.len() > before {
        return None;
    }
    let unit_name = model_prop
        .and_then(|m| m.unit.clone())
        .filter(|u| !u.trim().is_empty());
    Some(RawTag {
        name: Some(name.to_owned()),
        table: table.map(|t| t.as_str().to_owned()),
        address: address.map(IntOrString::Int),
        data_type: data_type.map(str::to_owned),
        length: mapped.and_then(|m| m.length),
        bit: None,
        byte_order: byte_order.map(str::to_owned),
        scale,
        offset: None,
        unit: unit_name,
        access: access.map(str::to_owned),
        poll_interval_ms: collect.ok().flatten(),
        deadband: None,
        deadband_pct: None,
        max_interval_ms: report.ok().flatten(),
        report: None,
        state_only: None,
    })
}

/// Joins the problems of the TOML file (`toml`) and of the YAML files (`foreign`): the TOML
/// problems first, each file's in line order.
pub(super) fn merge<T>(
    toml: Result<T, ConfigErrors>,
    foreign: ConfigErrors,
) -> Result<T, ConfigErrors> {
    match toml {
        Ok(v) if foreign.is_empty() => Ok(v),
        Ok(_) => Err(foreign),
        Err(mut e) => {
            e.errors.extend(foreign.errors);
            Err(e)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::config::{AgentConfig, load, parse};
    use crate::model::{Access, ByteOrder, DataType};

    const BASE: &str = r#"[agent]
data_dir = "data"
[hub]
address = "hub.local:7443"
[identity]
trust_domain = "example.org"
cert = "c.pem"
key = "k.pem"
bundle = "b.pem"
"#;

    const MODEL: &str = r#"apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata:
  name: m
spec:
  properties:
    - name: t
      type: FLOAT
      accessMode: ReadOnly
    - name: i
      type: INT
      accessMode: ReadWrite
    - name: b
      type: BOOLEAN
      accessMode: ReadOnly
    - name: s
      type: STRING
"#;

    /// A fresh directory for one test's files.
    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("edgesync-kubeedge-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Parses BASE + `toml_extra` with `device.yaml` = `device` and `model.yaml` = MODEL in
    /// a fresh directory.
    fn run(name: &str, toml_extra: &str, device: &str) -> Result<AgentConfig, ConfigErrors> {
        let d = dir(name);
        std::fs::write(d.join("device.yaml"), device).unwrap();
        std::fs::write(d.join("model.yaml"), MODEL).unwrap();
        let text = format!(
            "{BASE}[[kubeedge]]\ndevice = \"device.yaml\"\nmodel = \"model.yaml\"\n{toml_extra}"
        );
        parse("conf/agent.toml", &text, &d)
    }

    fn device_yaml(config: &str, properties: &str) -> String {
        format!(
            r#"apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata:
  name: d1
spec:
  deviceModelRef:
    name: m
  protocol:
    protocolName: modbus
    configData:
{config}
  properties:
{properties}"#
        )
    }

    const TCP: &str = "      ip: 10.0.0.5\n      port: 502\n      slaveID: 7\n";

    fn prop(name: &str, data: &str) -> String {
        format!(
            "    - name: {name}\n      collectCycle: 1000\n      visitors:\n        protocolName: modbus\n        configData:\n{data}"
        )
    }

    fn rendered(e: &ConfigErrors) -> Vec<String> {
        e.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn example_config_imports_the_example_devices() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubeedge/agent.toml");
        let cfg = load(&path).unwrap_or_else(|e| panic!("{e}"));
        let ids: Vec<&str> = cfg.devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["meter-1", "boiler-3", "boiler-4"]);

        let b3 = &cfg.devices[1];
        assert_eq!(
            b3.link,
            LinkSpec::Tcp {
                endpoint: "127.0.0.1:5020".into()
            }
        );
        assert_eq!(b3.unit_id, 3);
        assert_eq!(b3.timeout, Duration::from_millis(1000));
        let tag = |n: &str| b3.tags.iter().find(|t| t.property.as_str() == n).unwrap();

        let t = tag("temperature");
        assert_eq!(
            (t.table, t.address, t.data_type, t.byte_order),
            (
                Table::HoldingRegister,
                0,
                DataType::Float32,
                ByteOrder::Cdab
            )
        );
        assert_eq!(t.poll_interval, Duration::from_millis(500));
        assert_eq!(t.report.max_interval, Some(Duration::from_secs(60)));
        assert_eq!(t.unit.as_deref(), Some("degC"));
        assert_eq!(t.access, Access::Read);

        let p = tag("pressure");
        assert_eq!(
            (p.table, p.address, p.data_type, p.scale),
            (Table::InputRegister, 10, DataType::UInt16, 0.01)
        );
        assert_eq!(p.report.max_interval, None);

        let s = tag("setpoint");
        assert_eq!(
            (s.data_type, s.byte_order, s.access),
            (DataType::Float64, ByteOrder::Dcba, Access::ReadWrite)
        );
        let e = tag("energy");
        assert_eq!(
            (e.address, e.data_type, e.byte_order),
            (8, DataType::UInt32, ByteOrder::Badc)
        );
        let c = tag("burner-on");
        assert_eq!(
            (c.table, c.data_type, c.access),
            (Table::Coil, DataType::Bool, Access::ReadWrite)
        );
        let sn = tag("serial-number");
        assert_eq!(sn.data_type, DataType::String { len: 4 });
        let pump = tag("pump-on");
        assert_eq!(
            (pump.table, pump.address, pump.data_type, pump.access),
            (Table::Coil, 1, DataType::Bool, Access::ReadWrite)
        );
        assert_eq!(sn.poll_interval, Duration::from_secs(60));

        let b4 = &cfg.devices[2];
        assert_eq!(b4.unit_id, 4);
        assert_eq!(b4.tags.len(), 1);
        // No collectCycle: the [defaults] poll interval.
        assert_eq!(b4.tags[0].poll_interval, Duration::from_millis(1000));
    }

    #[test]
    fn doc_error_example_is_what_the_import_says() {
        // docs/modbus.md quotes this message for the example with offset 70000.
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubeedge");
        let d = dir("doc-example");
        for f in ["model.yaml", "device.yaml"] {
            let text = std::fs::read_to_string(src.join(f)).unwrap();
            let text = text.replace("          offset: 10\n", "          offset: 70000\n");
            std::fs::write(d.join(f), text).unwrap();
        }
        let toml = std::fs::read_to_string(src.join("agent.toml")).unwrap();
        let errs = parse("deploy/kubeedge/agent.toml", &toml, &d).unwrap_err();
        assert_eq!(
            rendered(&errs),
            [
                "deploy/kubeedge/device.yaml:32: device \"boiler-3\" property \"pressure\": offset 70000 is not a 0-based Modbus offset (0..=65535)"
            ]
        );
    }

    #[test]
    fn maps_types_limits_and_swaps() {
        let props = [
            prop("t", "          register: InputRegister\n          offset: 4\n          limit: 2\n          isSwap: true\n"),
            prop("i", "          register: HoldingRegister\n          offset: 9\n          limit: 4\n          isSwap: true\n          isRegisterSwap: true\n          scale: 0.5\n"),
            prop("b", "          register: DiscreteInputRegister\n          offset: 3\n          limit: 1\n"),
        ]
        .concat();
        let cfg = run("types", "", &device_yaml(TCP, &props)).unwrap_or_else(|e| panic!("{e}"));
        let d = &cfg.devices[0];
        assert_eq!(d.id.as_str(), "d1");
        assert_eq!(d.unit_id, 7);
        assert_eq!(
            d.link,
            LinkSpec::Tcp {
                endpoint: "10.0.0.5:502".into()
            }
        );
        let t = &d.tags[0];
        assert_eq!(
            (t.table, t.address, t.data_type, t.byte_order),
            (Table::InputRegister, 4, DataType::Float32, ByteOrder::Badc)
        );
        let i = &d.tags[1];
        assert_eq!(
            (i.address, i.data_type, i.byte_order, i.scale, i.access),
            (9, DataType::UInt64, ByteOrder::Dcba, 0.5, Access::ReadWrite)
        );
        let b = &d.tags[2];
        assert_eq!(
            (b.table, b.address, b.data_type),
            (Table::DiscreteInput, 3, DataType::Bool)
        );
    }

    #[test]
    fn errors_name_file_line_device_and_property() {
        let props = [
            // line 16
            prop("t", "          register: HoldingRegister\n          offset: 70000\n          limit: 2\n"),
            // line 24
            prop("i", "          register: HoldingRegister\n          offset: 0\n          limit: 3\n"),
            // line 32
            prop("b", "          register: HoldingRegister\n          offset: 1\n          limit: 1\n"),
            // line 40
            prop("nope", "          register: HoldingRegister\n          offset: 1\n"),
        ]
        .concat();
        let errs = run("errors", "", &device_yaml(TCP, &props)).unwrap_err();
        let lines = rendered(&errs);
        let file = "conf/device.yaml";
        let want = [
            format!(
                "{file}:16: device \"d1\" property \"t\": offset 70000 is not a 0-based Modbus offset"
            ),
            format!(
                "{file}:24: device \"d1\" property \"i\": type \"INT\" takes limit 1 (uint16), 2 (uint32) or 4 (uint64) registers, not 3"
            ),
            format!(
                "{file}:32: device \"d1\" property \"b\": type \"BOOLEAN\" in a register table is not imported"
            ),
            format!(
                "{file}:40: device \"d1\" property \"nope\": the DeviceModel has no property \"nope\""
            ),
        ];
        for w in &want {
            assert!(
                lines.iter().any(|l| l.starts_with(w.as_str())),
                "{w}\n{lines:#?}"
            );
        }
        assert_eq!(lines.len(), want.len(), "{lines:#?}");
    }

    #[test]
    fn tags_are_checked_by_the_toml_rules() {
        // int32 at offset 65535 runs past the table: found by check_tag, reported on the YAML.
        let props = prop(
            "i",
            "          register: HoldingRegister\n          offset: 65535\n          limit: 2\n",
        );
        let errs = run("extent", "", &device_yaml(TCP, &props)).unwrap_err();
        let lines = rendered(&errs);
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0]
                .starts_with("conf/device.yaml:16: device \"d1\" property \"i\": address 65535")
                && lines[0].contains("runs past the end of the holding register table"),
            "{lines:#?}"
        );
    }

    #[test]
    fn unknown_config_keys_are_errors_with_lines() {
        let props = prop(
            "t",
            "          register: HoldingRegister\n          offset: 0\n          limit: 2\n          isRegisterSwapp: true\n",
        );
        let errs = run("unknown", "", &device_yaml(TCP, &props)).unwrap_err();
        let lines = rendered(&errs);
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0]
                == "conf/device.yaml:16: device \"d1\" property \"t\": visitors.configData has unknown key \"isRegisterSwapp\" (did you mean \"isRegisterSwap\"?)",
            "{lines:#?}"
        );
    }

    #[test]
    fn duplicate_ids_with_toml_devices_are_errors() {
        let toml = "[[devices]]\nid = \"d1\"\nprotocol = \"tcp\"\nendpoint = \"127.0.0.1:502\"\n[[devices.tags]]\nname = \"x\"\naddress = \"40001\"\ntype = \"int16\"\n";
        let props = prop(
            "t",
            "          register: HoldingRegister\n          offset: 0\n          limit: 2\n",
        );
        let errs = run("dup", toml, &device_yaml(TCP, &props)).unwrap_err();
        let lines = rendered(&errs);
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0]
                .starts_with("conf/device.yaml:4: device \"d1\": device id \"d1\" is already used"),
            "{lines:#?}"
        );
    }

    #[test]
    fn cycle_units() {
        let props = "    - name: t\n      collectCycle: 2000000000\n      reportCycle: 10000000000\n      visitors:\n        configData:\n          register: HoldingRegister\n          offset: 0\n          limit: 2\n";
        let yaml = device_yaml(TCP, props);
        let errs = run("cycle-ms", "", &yaml).unwrap_err();
        let lines = rendered(&errs);
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(
            lines[0].contains("collectCycle is 2000000000 ms but must be 10 ms to 1 day")
                && lines[0].contains("set cycle_unit = \"ns\""),
            "{lines:#?}"
        );
        let cfg = run("cycle-ns", "cycle_unit = \"ns\"\n", &yaml).unwrap_or_else(|e| panic!("{e}"));
        let t = &cfg.devices[0].tags[0];
        assert_eq!(t.poll_interval, Duration::from_secs(2));
        assert_eq!(t.report.max_interval, Some(Duration::from_secs(10)));

        let errs = run("cycle-bad", "cycle_unit = \"s\"\n", &yaml).unwrap_err();
        assert!(
            rendered(&errs)[0]
                .starts_with("conf/agent.toml:13: [[kubeedge]] #1: cycle_unit \"s\" is not one of"),
            "{errs}"
        );
    }

    #[test]
    fn report_cycle_shorter_than_collect_cycle_is_an_error() {
        let props = "    - name: t\n      collectCycle: 5000\n      reportCycle: 1000\n      visitors:\n        configData:\n          register: HoldingRegister\n          offset: 0\n          limit: 2\n";
        let errs = run("report", "", &device_yaml(TCP, props)).unwrap_err();
        assert!(
            rendered(&errs)[0]
                .contains("reportCycle (1000 ms) is shorter than the collect cycle (5000 ms)"),
            "{errs}"
        );
    }

    #[test]
    fn other_api_versions_and_missing_files_are_reported() {
        let yaml = "apiVersion: devices.kubeedge.io/v1alpha2\nkind: Device\nmetadata:\n  name: old\nspec: {}\n";
        let errs = run("alpha", "", yaml).unwrap_err();
        assert_eq!(
            rendered(&errs),
            [
                "conf/device.yaml:4: Device \"old\": apiVersion \"devices.kubeedge.io/v1alpha2\" is not supported (only \"devices.kubeedge.io/v1beta1\" is) (KubeEdge removed v1alpha2 in 1.16; rewrite the object in the v1beta1 layout, see docs/modbus.md, \"From v1alpha2\")"
            ]
        );

        let d = dir("missing");
        let text = format!("{BASE}[[kubeedge]]\ndevice = \"nowhere.yaml\"\n");
        let errs = parse("agent.toml", &text, &d).unwrap_err();
        let lines = rendered(&errs);
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].starts_with("agent.toml:11: [[kubeedge]] #1: cannot read"),
            "{lines:#?}"
        );

        let text = format!("{BASE}[[kubeedge]]\nmodel = \"m.yaml\"\ndevic = \"x\"\n");
        let errs = parse("agent.toml", &text, &d).unwrap_err();
        let all = errs.to_string();
        assert!(
            all.contains("agent.toml:12: [[kubeedge]] #1: unknown field \"devic\""),
            "{all}"
        );
        assert!(all.contains("missing required field \"device\""), "{all}");
    }

    #[test]
    fn missing_model_and_yaml_syntax_errors() {
        let props = prop(
            "t",
            "          register: HoldingRegister\n          offset: 0\n          limit: 2\n",
        );
        let yaml = device_yaml(TCP, &props).replace("name: m\n", "name: other\n");
        let errs = run("nomodel", "", &yaml).unwrap_err();
        assert!(
            rendered(&errs)[0].starts_with(
                "conf/device.yaml:4: device \"d1\": deviceModelRef \"other\" names no DeviceModel"
            ),
            "{errs}"
        );
        let errs = run("syntax", "", "kind: Device\nmetadata: [\n").unwrap_err();
        assert!(
            rendered(&errs)[0].starts_with("conf/device.yaml:"),
            "{errs}"
        );
    }

    #[test]
    fn models_may_live_in_the_device_file() {
        let props = prop(
            "t",
            "          register: HoldingRegister\n          offset: 0\n          limit: 2\n",
        );
        let yaml = format!("{MODEL}---\n{}", device_yaml(TCP, &props));
        let d = dir("onefile");
        std::fs::write(d.join("all.yaml"), yaml).unwrap();
        let text = format!("{BASE}[[kubeedge]]\ndevice = \"all.yaml\"\n");
        let cfg = parse("agent.toml", &text, &d).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.devices.len(), 1);
        assert_eq!(cfg.devices[0].tags[0].data_type, DataType::Float32);
    }

    #[test]
    fn serial_devices_become_rtu_links() {
        let cfg_rtu = "      serialPort: /dev/ttyUSB0\n      baudRate: 19200\n      parity: even\n      slaveID: 2\n";
        let props = prop(
            "t",
            "          register: HoldingRegister\n          offset: 0\n          limit: 2\n",
        );
        let cfg = run("rtu", "", &device_yaml(cfg_rtu, &props)).unwrap_or_else(|e| panic!("{e}"));
        let d = &cfg.devices[0];
        assert_eq!(d.unit_id, 2);
        match &d.link {
            LinkSpec::Rtu {
                path,
                baud,
                parity,
                data_bits,
                stop_bits,
                ..
            } => {
                assert_eq!(
                    (path.as_str(), *baud, *parity, *data_bits, *stop_bits),
                    ("/dev/ttyUSB0", 19200, Parity::Even, 8, 1)
                );
            }
            other => panic!("{other:?}"),
        }
        let bad = "      serialPort: /dev/ttyUSB0\n      parity: mark\n";
        let errs = run("rtu-bad", "", &device_yaml(bad, &props)).unwrap_err();
        let all = errs.to_string();
        assert!(
            all.contains("configData.baudRate is required with serialPort"),
            "{all}"
        );
        assert!(all.contains("configData.parity \"mark\""), "{all}");
    }

    #[test]
    fn cycle_unit_conversion() {
        assert_eq!(CycleUnit::Ms.to_ms(1500), 1500);
        assert_eq!(CycleUnit::Ns.to_ms(1_000_000_000), 1000);
        assert_eq!(CycleUnit::Ns.to_ms(1_500_001), 2);
    }

    /// `edge/tests/fixtures/kubeedge/<rel>`.
    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kubeedge")
    }

    /// Parses BASE + a `[[kubeedge]]` entry naming fixture files (relative to the fixture
    /// directory, which is also the base directory).
    fn run_fixture(
        device: &str,
        model: Option<&str>,
        cycle_unit: &str,
    ) -> Result<AgentConfig, ConfigErrors> {
        let model = model
            .map(|m| format!("model = \"{m}\"\n"))
            .unwrap_or_default();
        let text = format!(
            "{BASE}[[kubeedge]]\ndevice = \"{device}\"\n{model}cycle_unit = \"{cycle_unit}\"\n"
        );
        parse("agent.toml", &text, &fixtures())
    }

    fn tag<'a>(d: &'a DeviceSpec, name: &str) -> &'a crate::model::TagSpec {
        d.tags
            .iter()
            .find(|t| t.property.as_str() == name)
            .unwrap_or_else(|| panic!("no tag {name}"))
    }

    #[test]
    fn mappers_go_v1beta1_sample_imports() {
        // An INT on a CoilRegister (0/1 in KubeEdge) with both swaps, RTU, cycles in ns.
        let cfg = run_fixture(
            "mappers-go-v1beta1/device.yaml",
            Some("mappers-go-v1beta1/model.yaml"),
            "ns",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let d = &cfg.devices[0];
        assert_eq!(d.id.as_str(), "modbus-instance-01");
        assert_eq!(d.unit_id, 1);
        match &d.link {
            LinkSpec::Rtu {
                path,
                baud,
                parity,
                data_bits,
                stop_bits,
                ..
            } => assert_eq!(
                (path.as_str(), *baud, *parity, *data_bits, *stop_bits),
                ("1", 115_200, Parity::Even, 8, 1)
            ),
            other => panic!("{other:?}"),
        }
        let t = tag(d, "temperature");
        assert_eq!(
            (t.table, t.address, t.data_type, t.access),
            (Table::Coil, 2, DataType::Bool, Access::ReadWrite)
        );
        assert_eq!(t.poll_interval, Duration::from_secs(10));
        assert_eq!(t.report.max_interval, Some(Duration::from_secs(10)));

        // Read in milliseconds, the 1.15 cycles are refused with the hint.
        let errs = run_fixture(
            "mappers-go-v1beta1/device.yaml",
            Some("mappers-go-v1beta1/model.yaml"),
            "ms",
        )
        .unwrap_err();
        let lines = rendered(&errs);
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(
            lines.iter().all(|l| l.starts_with(
                "mappers-go-v1beta1/device.yaml:25: device \"modbus-instance-01\" property \"temperature\": "
            ) && l.contains("set cycle_unit = \"ns\"")),
            "{lines:#?}"
        );
    }

    #[test]
    fn int_on_a_coil_reads_and_writes_0_and_1() {
        use crate::modbus::codec::{decode_bit, encode_bit};
        use edgesync_protocol::Value;
        let cfg = run_fixture(
            "mappers-go-v1beta1/device.yaml",
            Some("mappers-go-v1beta1/model.yaml"),
            "ns",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let t = tag(&cfg.devices[0], "temperature");
        assert_eq!(decode_bit(t, &[true]), Ok(Value::Bool(true)));
        assert_eq!(decode_bit(t, &[false]), Ok(Value::Bool(false)));
        assert_eq!(encode_bit(t, &Value::Int(1)), Ok(true));
        assert_eq!(encode_bit(t, &Value::Int(0)), Ok(false));
        assert!(encode_bit(t, &Value::Int(2)).is_err());
    }

    #[test]
    fn temperature_sensor_demo_imports() {
        use crate::modbus::codec::decode;
        use edgesync_protocol::Value;
        let cfg = run_fixture(
            "temperature-sensor-demo/device.yaml",
            Some("temperature-sensor-demo/model.yaml"),
            "ms",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let d = &cfg.devices[0];
        assert_eq!(d.id.as_str(), "temperature-instance");
        assert_eq!(d.unit_id, 1);
        assert_eq!(
            d.link,
            LinkSpec::Tcp {
                endpoint: "10.244.1.13:5502".into()
            }
        );
        // dataType float, limit 1, scale 0.1: one register, unsigned, scaled.
        let t = tag(d, "temperature");
        assert_eq!(
            (t.table, t.address, t.data_type, t.scale, t.access),
            (
                Table::HoldingRegister,
                0,
                DataType::UInt16,
                0.1,
                Access::ReadWrite
            )
        );
        assert_eq!(t.unit.as_deref(), Some("Celsius"));
        assert_eq!(t.poll_interval, Duration::from_secs(10));
        match decode(t, &[235]) {
            Ok(Value::Float(v)) => assert!((v - 23.5).abs() < 1e-9, "{v}"),
            other => panic!("{other:?}"),
        }
        let s = tag(d, "temperature-switch");
        assert_eq!(
            (s.table, s.address, s.data_type, s.access),
            (Table::Coil, 0, DataType::Bool, Access::ReadWrite)
        );
    }

    #[test]
    fn crd_proposal_sample_imports() {
        let cfg = run_fixture("crd-proposal-v1beta1/all.yaml", None, "ms")
            .unwrap_or_else(|e| panic!("{e}"));
        let d = &cfg.devices[0];
        assert_eq!(d.id.as_str(), "beta1-device");
        // No slaveID: KubeEdge's mappers send 0 (Go's zero value).
        assert_eq!(d.unit_id, 0);
        assert_eq!(
            d.link,
            LinkSpec::Tcp {
                endpoint: "172.17.0.3:1502".into()
            }
        );
        let t = tag(d, "temp");
        assert_eq!(
            (t.table, t.address, t.data_type, t.byte_order, t.access),
            (
                Table::HoldingRegister,
                2,
                DataType::UInt16,
                ByteOrder::Dcba,
                Access::ReadWrite
            )
        );
        assert_eq!(t.unit.as_deref(), Some("Celsius"));
        assert_eq!(t.poll_interval, Duration::from_secs(2));
        assert_eq!(t.report.max_interval, Some(Duration::from_secs(2)));
    }

    #[test]
    fn v1alpha2_samples_are_refused_and_their_conversion_imports() {
        let errs =
            run_fixture("v1alpha2/device.yaml", Some("v1alpha2/model.yaml"), "ms").unwrap_err();
        let lines = rendered(&errs);
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(
            lines[0].starts_with("v1alpha2/device.yaml:6: Device \"modbustcp-device\": apiVersion \"devices.kubeedge.io/v1alpha2\" is not supported")
                && lines[0].contains("KubeEdge removed v1alpha2 in 1.16"),
            "{lines:#?}"
        );
        assert!(
            lines[1].starts_with("v1alpha2/model.yaml:6: DeviceModel \"modbus-sample-model\": apiVersion \"devices.kubeedge.io/v1alpha2\" is not supported"),
            "{lines:#?}"
        );

        let cfg =
            run_fixture("v1alpha2/converted.yaml", None, "ms").unwrap_or_else(|e| panic!("{e}"));
        let d = &cfg.devices[0];
        assert_eq!((d.id.as_str(), d.unit_id), ("modbustcp-device", 1));
        let t = tag(d, "temperature");
        assert_eq!(
            (t.table, t.address, t.data_type, t.access),
            (Table::Coil, 0, DataType::Bool, Access::ReadWrite)
        );
        assert_eq!(t.poll_interval, Duration::from_secs(5));

        // The v1alpha2 layout under a v1beta1 apiVersion is named as such.
        let alpha_body = std::fs::read_to_string(fixtures().join("v1alpha2/device.yaml"))
            .unwrap()
            .replace("v1alpha2", "v1beta1");
        let errs = run("alpha-body", "", &alpha_body).unwrap_err();
        let all = errs.to_string();
        assert!(
            all.contains(
                "device \"modbustcp-device\": spec.propertyVisitors is the v1alpha2 layout"
            ),
            "{all}"
        );
        let alpha_protocol = device_yaml(
            TCP,
            &prop(
                "t",
                "          register: HoldingRegister\n          offset: 0\n",
            ),
        )
        .replace(
            "    protocolName: modbus\n    configData:\n",
            "    modbus:\n      slaveID: 1\n    configData:\n",
        );
        let errs = run("alpha-protocol", "", &alpha_protocol).unwrap_err();
        assert!(
            errs.to_string()
                .contains("device \"d1\": spec.protocol.modbus is the v1alpha2 layout"),
            "{errs}"
        );
        let alpha_model = "apiVersion: devices.kubeedge.io/v1beta1\nkind: DeviceModel\nmetadata:\n  name: m\nspec:\n  properties:\n    - name: t\n      type:\n        int:\n          accessMode: ReadOnly\n---\n";
        let yaml = format!(
            "{alpha_model}{}",
            device_yaml(
                TCP,
                &prop(
                    "t",
                    "          register: HoldingRegister\n          offset: 0\n"
                )
            )
        );
        let d = dir("alpha-model");
        std::fs::write(d.join("all.yaml"), yaml).unwrap();
        let text = format!("{BASE}[[kubeedge]]\ndevice = \"all.yaml\"\n");
        let errs = parse("agent.toml", &text, &d).unwrap_err();
        assert!(
            errs.to_string()
                .contains("the DeviceModel property's type is a map (the v1alpha2 layout)"),
            "{errs}"
        );
    }

    #[test]
    fn type_mapping() {
        use Table::{Coil, DiscreteInput, HoldingRegister, InputRegister};
        let ok = |k: &str, l: Option<i64>, t: Table| map_type(k, l, t).map(|m| m.data_type);
        // Bit tables: BOOLEAN (or bool) and INT, one bit each; isSwap etc. do not matter.
        for k in ["BOOLEAN", "boolean", "Bool", "INT", "int"] {
            assert_eq!(ok(k, None, Coil), Ok("bool"), "{k}");
            assert_eq!(ok(k, Some(1), DiscreteInput), Ok("bool"), "{k}");
        }
        assert!(matches!(
            map_type("INT", Some(8), Coil),
            Err(TypeError::BitLimit { limit: 8, .. })
        ));
        for k in ["FLOAT", "double", "STRING"] {
            assert!(
                matches!(
                    map_type(k, Some(1), Coil),
                    Err(TypeError::NotInBitTable { .. })
                ),
                "{k}"
            );
        }
        // Register tables, any case.
        for (k, l, want) in [
            ("INT", None, "uint16"),
            ("int", Some(1), "uint16"),
            ("Int", Some(2), "uint32"),
            ("INT", Some(4), "uint64"),
            ("FLOAT", None, "float32"),
            ("float", Some(2), "float32"),
            ("float", Some(1), "uint16"),
            ("DOUBLE", None, "float64"),
            ("Double", Some(4), "float64"),
            ("double", Some(1), "uint16"),
        ] {
            assert_eq!(ok(k, l, HoldingRegister), Ok(want), "{k} {l:?}");
            assert_eq!(ok(k, l, InputRegister), Ok(want), "{k} {l:?}");
        }
        assert_eq!(
            map_type("string", Some(4), HoldingRegister),
            Ok(Mapped {
                data_type: "string",
                length: Some(4)
            })
        );
        assert!(matches!(
            map_type("STRING", None, HoldingRegister),
            Err(TypeError::StringLimit { .. })
        ));
        assert!(matches!(
            map_type("INT", Some(3), HoldingRegister),
            Err(TypeError::IntLimit { limit: 3, .. })
        ));
        assert!(matches!(
            map_type("FLOAT", Some(4), HoldingRegister),
            Err(TypeError::FloatLimit { limit: 4, .. })
        ));
        assert!(matches!(
            map_type("DOUBLE", Some(2), HoldingRegister),
            Err(TypeError::DoubleLimit { limit: 2, .. })
        ));
        assert!(matches!(
            map_type("BOOLEAN", Some(1), HoldingRegister),
            Err(TypeError::BoolInRegister { .. })
        ));
        for k in ["BYTES", "stream"] {
            assert!(matches!(
                map_type(k, Some(1), HoldingRegister),
                Err(TypeError::Unsupported { .. })
            ));
        }
        assert!(matches!(
            map_type("LONG", Some(2), HoldingRegister),
            Err(TypeError::Unknown { .. })
        ));
    }

    #[test]
    fn bit_table_rules() {
        let props = [
            // line 16: INT over 8 coils
            prop("i", "          register: CoilRegister\n          offset: 0\n          limit: 8\n"),
            // line 24: FLOAT on a coil
            prop("t", "          register: CoilRegister\n          offset: 1\n          limit: 1\n"),
            // line 32: INT on a coil, scaled
            prop("x", "          register: DiscreteInputRegister\n          offset: 2\n          limit: 1\n          scale: 10\n          dataType: INT\n"),
        ]
        .concat();
        let model = MODEL.to_owned() + "    - name: x\n      type: INT\n";
        let d = dir("bits");
        std::fs::write(d.join("device.yaml"), device_yaml(TCP, &props)).unwrap();
        std::fs::write(d.join("model.yaml"), model).unwrap();
        let text =
            format!("{BASE}[[kubeedge]]\ndevice = \"device.yaml\"\nmodel = \"model.yaml\"\n");
        let errs = parse("conf/agent.toml", &text, &d).unwrap_err();
        let lines = rendered(&errs);
        let want = [
            "conf/device.yaml:16: device \"d1\" property \"i\": type \"INT\" in a bit table takes limit 1, not 8",
            "conf/device.yaml:24: device \"d1\" property \"t\": type \"FLOAT\" cannot live in a bit table",
            "conf/device.yaml:32: device \"d1\" property \"x\": scale 10: the property is a single bit, imported as a bool, so scale must be 1",
        ];
        for w in want {
            assert!(lines.iter().any(|l| l.starts_with(w)), "{w}\n{lines:#?}");
        }
        assert_eq!(lines.len(), want.len(), "{lines:#?}");
    }

    #[test]
    fn string_swaps_and_scale_zero() {
        let props = [
            prop("s", "          register: HoldingRegister\n          offset: 0\n          limit: 4\n          isSwap: true\n          dataType: STRING\n"),
        ]
        .concat();
        let errs = run("string-swap", "", &device_yaml(TCP, &props)).unwrap_err();
        let lines = rendered(&errs);
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].starts_with("conf/device.yaml:16: device \"d1\" property \"s\": isSwap/isRegisterSwap on a STRING"),
            "{lines:#?}"
        );
        let props = [
            prop("t", "          register: HoldingRegister\n          offset: 0\n          limit: 2\n          scale: 0\n"),
            prop("s", "          register: HoldingRegister\n          offset: 2\n          limit: 4\n          scale: 1\n          dataType: string\n"),
        ]
        .concat();
        let cfg =
            run("scale-zero", "", &device_yaml(TCP, &props)).unwrap_or_else(|e| panic!("{e}"));
        let d = &cfg.devices[0];
        assert_eq!(tag(d, "t").scale, 1.0);
        assert_eq!(tag(d, "s").data_type, DataType::String { len: 4 });
    }

    #[test]
    fn config_keys_match_ignoring_case_and_values_are_typed() {
        // Go's encoding/json matches keys ignoring case: IsSwap is isSwap.
        // Register names and communicateMode in any case too; no port is 502.
        let props = [
            prop(
                "t",
                "          Register: holdingregister\n          OFFSET: 4\n          Limit: 2\n          IsSwap: true\n",
            ),
            // The visitor's dataType wins over the model's FLOAT.
            prop(
                "i",
                "          register: InputRegister\n          offset: 9\n          limit: 1\n          dataType: INT\n",
            )
            .replace("name: i\n", "name: b\n"),
        ]
        .concat();
        let cfg = run(
            "case",
            "",
            &device_yaml(
                "      IP: 10.0.0.5\n      SlaveId: 7\n      communicatemode: tcp\n",
                &props,
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let d = &cfg.devices[0];
        assert_eq!(d.unit_id, 7);
        assert_eq!(
            d.link,
            LinkSpec::Tcp {
                endpoint: "10.0.0.5:502".into()
            }
        );
        let t = tag(d, "t");
        assert_eq!(
            (t.table, t.address, t.data_type, t.byte_order),
            (
                Table::HoldingRegister,
                4,
                DataType::Float32,
                ByteOrder::Badc
            )
        );
        let b = tag(d, "b");
        assert_eq!(
            (b.table, b.address, b.data_type),
            (Table::InputRegister, 9, DataType::UInt16)
        );

        let props = prop(
            "t",
            "          register: HoldingRegister\n          offset: \"4\"\n          Offset: 4\n          limit: 2\n          isSwap: 1\n          scale: x\n",
        );
        let errs = run("types", "", &device_yaml(TCP, &props)).unwrap_err();
        let lines = rendered(&errs);
        let p = "conf/device.yaml:16: device \"d1\" property \"t\": visitors.configData";
        let want = [
            format!(
                "{p} has both \"offset\" and \"Offset\"; KubeEdge's mappers match keys ignoring case"
            ),
            format!("{p}.offset is \"4\" (a string) but must be an integer"),
            format!("{p}.isSwap is 1 but must be true or false"),
            format!("{p}.scale is \"x\" (a string) but must be a number"),
        ];
        for w in &want {
            assert!(
                lines.iter().any(|l| l.starts_with(w.as_str())),
                "{w}\n{lines:#?}"
            );
        }
        // The property's other problems follow from the bad values (no offset).
        assert!(
            lines
                .iter()
                .all(|l| l.starts_with(p) || l.contains("missing visitors.configData.offset")),
            "{lines:#?}"
        );
    }

    #[test]
    fn protocol_settings() {
        let props = prop(
            "t",
            "          register: HoldingRegister\n          offset: 0\n          limit: 2\n",
        );
        // serialName (mapper-framework example) names the port; communicateMode agrees;
        // timeout is read in cycle_unit.
        let rtu = "      communicateMode: RTU\n      serialName: /dev/ttyS1\n      baudRate: 9600\n      parity: even\n      slaveID: 5\n      timeout: 250\n      rs485Enabled: false\n";
        let cfg = run("rtu-name", "", &device_yaml(rtu, &props)).unwrap_or_else(|e| panic!("{e}"));
        let d = &cfg.devices[0];
        assert_eq!(d.timeout, Duration::from_millis(250));
        match &d.link {
            LinkSpec::Rtu { path, parity, .. } => {
                assert_eq!((path.as_str(), *parity), ("/dev/ttyS1", Parity::Even));
            }
            other => panic!("{other:?}"),
        }
        for (given, want) in [
            ("none", Parity::None),
            ("\"n\"", Parity::None),
            ("odd", Parity::Odd),
        ] {
            let rtu = rtu.replace("parity: even", &format!("parity: {given}"));
            let cfg =
                run("rtu-parity", "", &device_yaml(&rtu, &props)).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                matches!(&cfg.devices[0].link, LinkSpec::Rtu { parity, .. } if *parity == want),
                "{given}"
            );
        }
        let ns = rtu.replace("timeout: 250", "timeout: 2000000000");
        let ns_props = props.replace("collectCycle: 1000", "collectCycle: 1000000000");
        let cfg = run(
            "rtu-ns",
            "cycle_unit = \"ns\"\n",
            &device_yaml(&ns, &ns_props),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.devices[0].timeout, Duration::from_secs(2));

        let bad = [
            (
                "      communicateMode: TCP\n      serialPort: /dev/ttyS1\n      baudRate: 9600\n      slaveID: 1\n",
                "configData.communicateMode is \"TCP\" but configData gives serialPort, not ip",
            ),
            (
                "      communicateMode: RTU\n      ip: 10.0.0.1\n",
                "configData.communicateMode is \"RTU\" but configData gives ip",
            ),
            (
                "      communicateMode: udp\n      ip: 10.0.0.1\n",
                "configData.communicateMode \"udp\" is not \"TCP\" or \"RTU\"",
            ),
            (
                "      serialPort: /dev/ttyS1\n      serialName: /dev/ttyS2\n      baudRate: 9600\n      slaveID: 1\n",
                "spec.protocol.configData has both \"serialPort\" and \"serialName\"",
            ),
            (
                "      serialPort: /dev/ttyS1\n      baudRate: 9600\n      slaveID: 1\n      rs485Enabled: true\n",
                "configData.rs485Enabled: true asks the mapper to switch the serial port into RS-485 mode",
            ),
            (
                "      serialPort: /dev/ttyS1\n      baudRate: 9600\n",
                "configData.slaveID is required with a serial port",
            ),
            (
                "      serialPort: /dev/ttyS1\n      baudRate: 9600\n      slaveID: 0\n",
                "configData.slaveID 0 is the broadcast address on a serial line",
            ),
            (
                "      ip: 10.0.0.1\n      timeout: 0.5\n",
                "spec.protocol.configData.timeout is 0.5 but must be an integer",
            ),
            (
                "      ip: 10.0.0.1\n      timeout: 700000\n",
                "configData.timeout is 700000 ms but must be 1 ms to 10 minutes",
            ),
            (
                "      ip: 10.0.0.1\n      slaveId: 1\n      slaveID: 2\n",
                "spec.protocol.configData has both \"slaveId\" and \"slaveID\"",
            ),
            (
                "      serialPort: /dev/ttyS1\n      baudRate: 9600\n      slaveID: 1\n      parity: Even\n",
                "configData.parity \"Even\" is ambiguous: KubeEdge's mappers read only \"even\" and \"odd\" (lowercase)",
            ),
            (
                "      serialPort: /dev/ttyS1\n      baudRate: 9600\n      slaveID: 1\n      parity: n\n",
                "spec.protocol.configData.parity is false but must be a string (YAML reads some unquoted words",
            ),
            (
                "      ip: 10.0.0.1\n      unitID: 2\n",
                "spec.protocol.configData has unknown key \"unitID\"",
            ),
        ];
        for (i, (cfg, want)) in bad.iter().enumerate() {
            let errs = run(&format!("proto-bad-{i}"), "", &device_yaml(cfg, &props)).unwrap_err();
            let all = errs.to_string();
            assert!(
                all.contains(&format!("conf/device.yaml:4: device \"d1\": {want}")),
                "{want}\n{all}"
            );
        }
    }

    #[test]
    fn model_visitors_and_protocol_config_data_are_merged() {
        // KubeEdge 1.22+: the model carries visitor and protocol defaults; the device's keys
        // override them key by key.
        let model = r#"apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata:
  name: m
spec:
  protocol: modbus
  protocolConfigData:
    ip: 10.0.0.9
    port: 1502
    slaveID: 1
  properties:
    - name: t
      type: FLOAT
      accessMode: ReadOnly
      visitors:
        protocolName: modbus
        configData:
          register: HoldingRegister
          offset: 0
          limit: 2
          isRegisterSwap: true
"#;
        let device = r#"apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata:
  name: d1
spec:
  deviceModelRef:
    name: m
  protocol:
    protocolName: modbus
    configData:
      slaveID: 3
  properties:
    - name: t
      visitors:
        configData:
          offset: 8
    - name: u
"#;
        let model = model.replace("    - name: t\n", "    - name: u\n      type: INT\n      visitors:\n        configData:\n          register: InputRegister\n          offset: 20\n    - name: t\n");
        let d = dir("merge");
        std::fs::write(d.join("all.yaml"), format!("{model}---\n{device}")).unwrap();
        let text = format!("{BASE}[[kubeedge]]\ndevice = \"all.yaml\"\n");
        let cfg = parse("agent.toml", &text, &d).unwrap_or_else(|e| panic!("{e}"));
        let dev = &cfg.devices[0];
        assert_eq!(dev.unit_id, 3);
        assert_eq!(
            dev.link,
            LinkSpec::Tcp {
                endpoint: "10.0.0.9:1502".into()
            }
        );
        let t = tag(dev, "t");
        assert_eq!(
            (t.table, t.address, t.data_type, t.byte_order),
            (
                Table::HoldingRegister,
                8,
                DataType::Float32,
                ByteOrder::Cdab
            )
        );
        let u = tag(dev, "u");
        assert_eq!(
            (u.table, u.address, u.data_type),
            (Table::InputRegister, 20, DataType::UInt16)
        );
    }

    #[test]
    fn ignored_visitor_keys_are_only_max_and_min() {
        let props = prop(
            "t",
            "          register: HoldingRegister\n          offset: 0\n          limit: 2\n          max: 100\n          Min: 0\n          maximum: 100\n",
        );
        let errs = run("ignored", "", &device_yaml(TCP, &props)).unwrap_err();
        let lines = rendered(&errs);
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].contains("visitors.configData has unknown key \"maximum\""),
            "{lines:#?}"
        );
    }

    /// Texts that must be read without a panic: the fixtures and the test YAML, cut and
    /// mutated.
    fn seeds() -> Vec<String> {
        let mut out = vec![
            MODEL.to_owned(),
            device_yaml(
                TCP,
                &prop(
                    "t",
                    "          register: HoldingRegister\n          offset: 0\n",
                ),
            ),
        ];
        for f in [
            "mappers-go-v1beta1/device.yaml",
            "mappers-go-v1beta1/model.yaml",
            "temperature-sensor-demo/device.yaml",
            "temperature-sensor-demo/model.yaml",
            "crd-proposal-v1beta1/all.yaml",
            "v1alpha2/converted.yaml",
        ] {
            out.push(std::fs::read_to_string(fixtures().join(f)).unwrap());
        }
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        #[test]
        fn never_panics_on_mutated_samples(
            seed in 0usize..8,
            cut in 0usize..4000,
            pos in 0usize..4000,
            insert in "[ -~\n]{0,12}",
            unit_ns in proptest::bool::ANY,
        ) {
            let seeds = seeds();
            let text = &seeds[seed % seeds.len()];
            let mut chars: Vec<char> = text.chars().collect();
            let pos = pos % (chars.len() + 1);
            let end = (pos + cut % 40).min(chars.len());
            chars.splice(pos..end, insert.chars());
            let mutated: String = chars.into_iter().collect();
            let unit = if unit_ns { CycleUnit::Ns } else { CycleUnit::Ms };
            let mut devices = Vec::new();
            let mut errors = ConfigErrors::default();
            let files = [
                ("d.yaml".to_owned(), mutated),
                ("m.yaml".to_owned(), seeds[seed % 2].clone()),
            ];
            import_texts(&files, unit, &DeviceDefaults::default(), &mut devices, &mut errors);
        }

        #[test]
        fn never_panics_on_arbitrary_text(text in "\\PC{0,400}") {
            let mut devices = Vec::new();
            let mut errors = ConfigErrors::default();
            let files = [("d.yaml".to_owned(), text)];
            import_texts(&files, CycleUnit::Ms, &DeviceDefaults::default(), &mut devices, &mut errors);
        }
    }
}
