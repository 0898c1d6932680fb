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
//! property) and the device and property. `docs/modbus.md` documents the mapping.
//!
//! Reading is in two passes over each file: the first reads only `apiVersion` and `kind` of
//! every document (so that a `v1alpha2` object is reported as such, not as a type error), the
//! second the fields this import uses. Fields it does not use (`status`, `pushMethod`,
//! `reportToCloud`, `desired`, ...) are ignored; unknown keys inside `configData` are errors,
//! because a misspelt `isRegisterSwap` would silently garble values.

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

/// Longest poll interval accepted (as for TOML tags): one day, in milliseconds.
const MAX_CYCLE_MS: i64 = 86_400_000;

/// `[[kubeedge]]` in agent.toml.
#[derive(Debug, Default, Deserialize)]
struct RawKubeEdge {
    /// YAML file with `Device` objects (and possibly `DeviceModel` objects); required.
    device: Option<String>,
    /// YAML file with `DeviceModel` objects.
    model: Option<String>,
    /// Unit of `collectCycle` and `reportCycle`: `ms` (default) or `ns`.
    cycle_unit: Option<String>,
}

/// Unit of KubeEdge's `collectCycle` / `reportCycle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CycleUnit {
    /// Milliseconds (KubeEdge's mapper-framework since 1.16).
    Ms,
    /// Nanoseconds (Go `time.Duration`, as the KubeEdge 1.15 Modbus mapper read them).
    Ns,
}

impl CycleUnit {
    /// `v` in this unit as whole milliseconds (nanoseconds are rounded up to the next ms).
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
    data_type: Option<String>,
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
    /// Device: where the property lives.
    visitors: Option<RawVisitors>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawVisitors {
    #[serde(rename = "protocolName")]
    protocol_name: Option<String>,
    #[serde(rename = "configData")]
    config_data: Option<RawVisitorConfig>,
}

/// `visitors.configData` of a Modbus property.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawVisitorConfig {
    /// Keys this import does not know: errors (reported with the property).
    #[serde(flatten)]
    extra: BTreeMap<String, IgnoredAny>,
    register: Option<String>,
    offset: Option<i64>,
    limit: Option<i64>,
    scale: Option<f64>,
    is_swap: Option<bool>,
    is_register_swap: Option<bool>,
    /// The mapper-framework's optional per-visitor type; overrides the model's.
    data_type: Option<String>,
}

/// `Device.spec.protocol`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawProtocol {
    #[serde(rename = "protocolName")]
    protocol_name: Option<String>,
    #[serde(rename = "configData")]
    config_data: Option<RawProtocolConfig>,
}

/// `Device.spec.protocol.configData` of a Modbus device.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawProtocolConfig {
    /// Keys this import does not know: errors for a Modbus device (other protocols have
    /// their own keys and are skipped).
    #[serde(flatten)]
    extra: BTreeMap<String, IgnoredAny>,
    #[serde(rename = "slaveID")]
    slave_id: Option<i64>,
    ip: Option<String>,
    port: Option<IntOrString>,
    serial_port: Option<String>,
    baud_rate: Option<i64>,
    data_bits: Option<i64>,
    stop_bits: Option<i64>,
    parity: Option<String>,
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

/// A `DeviceModel` property, as needed to type a device's property.
#[derive(Debug, Clone)]
struct ModelProperty {
    data_type: Option<String>,
    access_mode: Option<String>,
    unit: Option<String>,
}

/// One `DeviceModel`, with where it came from.
#[derive(Debug)]
struct Model {
    file: String,
    line: Option<usize>,
    properties: HashMap<String, ModelProperty>,
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
            file.error(
                line,
                format!(
                    "{kind} {name:?}: apiVersion {:?} is not supported (only {API_VERSION:?} is)",
                    h.api_version.as_deref().unwrap_or("")
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

/// A KubeEdge property type and `limit` as an edgesync type name and string length.
fn map_type(
    kind: &str,
    limit: Option<i64>,
    table: Table,
) -> Result<(&'static str, Option<i64>), String> {
    let kind_lc = kind.to_ascii_lowercase();
    let bits = !table.is_register();
    let limit_or = |d: i64| limit.unwrap_or(d);
    match kind_lc.as_str() {
        "boolean" if bits => match limit_or(1) {
            1 => Ok(("bool", None)),
            n => Err(format!(
                "type {kind:?} in a bit table takes limit 1, not {n}"
            )),
        },
        "boolean" => Err(format!(
            "type {kind:?} in a register table is not imported: KubeEdge's mapper reads it as \"high byte of the first register == 1\"; describe the tag in agent.toml with type \"bool\" and bit instead"
        )),
        _ if bits => Err(format!(
            "type {kind:?} cannot live in a bit table (CoilRegister, DiscreteInputRegister hold single bits; use type BOOLEAN)"
        )),
        "int" => match limit_or(1) {
            1 => Ok(("int16", None)),
            2 => Ok(("int32", None)),
            4 => Ok(("int64", None)),
            n => Err(format!(
                "type {kind:?} takes limit 1 (int16), 2 (int32) or 4 (int64) registers, not {n}"
            )),
        },
        "float" => match limit_or(2) {
            2 => Ok(("float32", None)),
            n => Err(format!(
                "type {kind:?} (float32) takes limit 2 registers, not {n}"
            )),
        },
        "double" => match limit_or(4) {
            4 => Ok(("float64", None)),
            n => Err(format!(
                "type {kind:?} (float64) takes limit 4 registers, not {n}"
            )),
        },
        "string" => match limit {
            Some(n) => Ok(("string", Some(n))),
            None => Err(format!(
                "type {kind:?} needs limit (its length in registers, 2 characters each)"
            )),
        },
        "bytes" | "stream" => Err(format!("type {kind:?} is not supported for Modbus")),
        _ => Err(format!(
            "type {kind:?} is not one of INT, FLOAT, DOUBLE, BOOLEAN, STRING"
        )),
    }
}

/// Keys of a Modbus `Device.spec.protocol.configData`.
const PROTOCOL_KEYS: &[&str] = &[
    "slaveID",
    "ip",
    "port",
    "serialPort",
    "baudRate",
    "dataBits",
    "stopBits",
    "parity",
];

/// Keys of a Modbus property's `visitors.configData`.
const VISITOR_KEYS: &[&str] = &[
    "register",
    "offset",
    "limit",
    "scale",
    "isSwap",
    "isRegisterSwap",
    "dataType",
];

/// Reports every key of `extra` as unknown, suggesting a known key when one is close.
fn unknown_keys(
    file: &mut YamlFile,
    component: &str,
    line: Option<usize>,
    what: &str,
    extra: &BTreeMap<String, IgnoredAny>,
    known: &[&str],
) {
    for key in extra.keys() {
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
        file.error(
            line,
            format!("{component}: {what} has unknown key {key:?} ({hint})"),
        );
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

    // Link and unit id.
    let empty_cfg = RawProtocolConfig::default();
    let cfg = protocol.config_data.as_ref().unwrap_or(&empty_cfg);
    unknown_keys(
        file,
        &component,
        line,
        "spec.protocol.configData",
        &cfg.extra,
        PROTOCOL_KEYS,
    );
    let unit_id = match cfg.slave_id {
        None => 1,
        Some(v) => match u8::try_from(v) {
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
    let link = match (&cfg.ip, &cfg.serial_port) {
        (Some(_), Some(_)) => {
            file.error(
                line,
                format!("{component}: configData has both ip and serialPort; choose one"),
            );
            None
        }
        (Some(ip), None) => {
            let port = match &cfg.port {
                None => Some("502".to_owned()),
                Some(IntOrString::Int(p)) => Some(p.to_string()),
                Some(IntOrString::Str(s)) => Some(s.clone()),
            };
            port.and_then(|port| {
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
            })
        }
        (None, Some(path)) => rtu_link(file, &component, line, path, cfg, existing),
        (None, None) => {
            file.error(
                line,
                format!("{component}: configData needs ip (and port) for Modbus TCP"),
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
        if let Some(raw) = raw_tag(file, &pcomponent, pline, &pname, p, model, unit, defaults) {
            let mut loc = Loc::absent(pcomponent);
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
        timeout: ms(defaults.timeout_ms),
        max_registers_per_read: u16_of(defaults.max_registers_per_read),
        max_bits_per_read: u16_of(defaults.max_bits_per_read),
        max_gap: u16_of(defaults.max_gap),
        tags,
    })
}

/// The RTU link of a device whose `configData` names `serialPort`; `None` if anything is wrong
/// (reported). Defaults follow KubeEdge's Modbus mapper: 8 data bits, 1 stop bit, no parity
/// unless `parity` is `even` or `odd`; `baudRate` is required.
fn rtu_link(
    file: &mut YamlFile,
    component: &str,
    line: Option<usize>,
    path: &str,
    cfg: &RawProtocolConfig,
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
    let parity = match cfg
        .parity
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("none" | "n") => Parity::None,
        Some("even" | "e") => Parity::Even,
        Some("odd" | "o") => Parity::Odd,
        Some(_) => {
            file.error(
                line,
                format!(
                    "{component}: configData.parity {:?} is not one of \"none\", \"even\", \"odd\"",
                    cfg.parity.as_deref().unwrap_or("")
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
        CycleUnit::Ms if msv > MAX_CYCLE_MS && unit.to_ms(v) / 1_000_000 <= MAX_CYCLE_MS => {
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

/// The raw tag a KubeEdge property stands for, for `check_tag` to validate; `None` if the
/// KubeEdge-specific fields are wrong (reported here, in KubeEdge's terms).
#[allow(clippy::too_many_arguments)]
fn raw_tag(
    file: &mut YamlFile,
    component: &str,
    line: Option<usize>,
    name: &str,
    p: &RawProperty,
    model: Option<&Model>,
    unit: CycleUnit,
    defaults: &DeviceDefaults,
) -> Option<RawTag> {
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
    let Some(visitors) = &p.visitors else {
        file.error(line, format!("{component}: missing visitors"));
        return None;
    };
    if let Some(proto) = &visitors.protocol_name
        && !proto.eq_ignore_ascii_case("modbus")
    {
        file.error(
            line,
            format!("{component}: visitors.protocolName is {proto:?}, not \"modbus\""),
        );
    }
    let empty = RawVisitorConfig::default();
    let v = visitors.config_data.as_ref().unwrap_or(&empty);
    unknown_keys(
        file,
        component,
        line,
        "visitors.configData",
        &v.extra,
        VISITOR_KEYS,
    );

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
    if let Some(l) = v.limit
        && l < 1
    {
        file.error(
            line,
            format!("{component}: limit is {l} but must be at least 1"),
        );
    }

    let kind = v
        .data_type
        .clone()
        .or_else(|| model_prop.and_then(|m| m.data_type.clone()));
    let mut data_type = None;
    let mut length = None;
    match (&kind, table) {
        (None, _) if model_prop.is_some() => {
            file.error(
                line,
                format!("{component}: the DeviceModel property has no type"),
            );
        }
        (Some(k), Some(t)) => match map_type(k, v.limit, t) {
            Ok((dt, len)) => {
                data_type = Some(dt);
                length = len;
            }
            Err(why) => file.error(line, format!("{component}: {why}")),
        },
        _ => {}
    }

    let byte_order = match (
        v.is_swap.unwrap_or(false),
        v.is_register_swap.unwrap_or(false),
    ) {
        (false, false) => "ABCD",
        (true, false) => "BADC",
        (false, true) => "CDAB",
        (true, true) => "DCBA",
    };
    let numeric = !matches!(data_type, Some("bool" | "string"));
    let scale = match v.scale {
        Some(s) if !numeric && s != 1.0 => {
            file.error(
                line,
                format!("{component}: scale {s} applies only to numeric types"),
            );
            None
        }
        Some(s) if numeric => Some(s),
        _ => None,
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
        length,
        bit: None,
        byte_order: Some(byte_order.to_owned()),
        scale,
        offset: None,
        unit: unit_name,
        access: access.map(str::to_owned),
        poll_interval_ms: collect.ok().flatten(),
        deadband: None,
        deadband_pct: None,
        max_interval_ms: report.ok().flatten(),
        report: None,
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
            (Table::InputRegister, 10, DataType::Int16, 0.01)
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
            (8, DataType::Int32, ByteOrder::Badc)
        );
        let c = tag("burner-on");
        assert_eq!(
            (c.table, c.data_type, c.access),
            (Table::Coil, DataType::Bool, Access::ReadWrite)
        );
        let sn = tag("serial-number");
        assert_eq!(sn.data_type, DataType::String { len: 4 });
        assert_eq!(sn.poll_interval, Duration::from_secs(60));

        let b4 = &cfg.devices[2];
        assert_eq!(b4.unit_id, 4);
        assert_eq!(b4.tags.len(), 1);
        // No collectCycle: the [defaults] poll interval.
        assert_eq!(b4.tags[0].poll_interval, Duration::from_millis(1000));
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
            (9, DataType::Int64, ByteOrder::Dcba, 0.5, Access::ReadWrite)
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
                "{file}:24: device \"d1\" property \"i\": type \"INT\" takes limit 1 (int16), 2 (int32) or 4 (int64) registers, not 3"
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
                "conf/device.yaml:4: Device \"old\": apiVersion \"devices.kubeedge.io/v1alpha2\" is not supported (only \"devices.kubeedge.io/v1beta1\" is)"
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
}
