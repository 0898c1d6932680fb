//! Agent configuration: `agent.toml` → [`AgentConfig`].
//!
//! Reading happens in three steps, all pure (no file but the config itself is touched):
//!
//! 1. **Syntax.** The TOML is parsed; every syntax error is reported with its line.
//! 2. **Raw values.** Each table (`[agent]`, `[hub]`, ..., each `[[devices]]`, each
//!    `[[devices.tags]]`) is deserialized on its own into a raw serde struct whose fields are all
//!    optional and carry their unit in their name (`poll_interval_ms`). Unknown keys are errors,
//!    all of them reported, with their lines. A wrong type stops only the table it is in.
//! 3. **Validation.** Every value is checked (ranges, names, addresses, combinations) and every
//!    problem is reported as a sentence naming file, line and component, for example
//!    `deploy/agent.toml:42: device "plc-1" tag "temp": address 70000 does not fit the holding
//!    register table (0..=65535)`. Only when nothing is wrong is the typed [`AgentConfig`]
//!    built, with defaults filled in and relative paths resolved against the config file's
//!    directory.
//!
//! Invariant: an [`AgentConfig`] (and every [`DeviceSpec`] in it) has passed every check; the
//! consumers (links, planner, store, uplink) need not re-check it.
//!
//! `deploy/README.md` documents every field; `deploy/agent.toml` is a checked example.

mod address;
use edgesync_protocol::config_diag as diag;
use edgesync_protocol::identity_config::{
    RawSource, check_node_prefix, check_source, check_trust_domain,
};
use edgesync_protocol::spiffe_id::EDGE_PATH_PREFIX;
use edgesync_protocol::svid_files::SvidFiles;
use edgesync_protocol::svid_keeper::IdentitySource;
mod kubeedge;
mod mqtt;
mod net;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgesync_protocol::{DeviceId, NodeId, PropertyId};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue};

pub use address::{AddressError, parse_shorthand, shorthand};
pub use diag::{ConfigError, ConfigErrors};
pub use mqtt::{EmbeddedBroker, ExternalBroker, MqttConfig, MqttMode, MqttPassword, MqttTls};

use crate::model::{
    Access, ByteOrder, DataType, DeviceSpec, LinkSpec, Parity, ReportPolicy, Table, TagSpec,
    default_inter_frame_delay,
};
use address::table_words;
use diag::{Doc, Loc, Node};

/// sled refuses (panics on) a page cache below 256 bytes; anything under 64 KiB is a typo.
const MIN_SLED_CACHE_BYTES: i64 = 64 * 1024;
/// Default sled page cache of the agent: 2 MiB.
const DEFAULT_SLED_CACHE_BYTES: u64 = 2 * 1024 * 1024;

/// Default `[agent] desired_expiry_ms`: ten minutes.
pub const DEFAULT_DESIRED_EXPIRY_MS: u64 = 600_000;
/// Default outbox bound: 256 MiB.
pub const DEFAULT_OUTBOX_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// Default `[outbox] batch_max_records`: a sweep of 10 units x 100 changed registers in one frame.
pub const DEFAULT_BATCH_MAX_RECORDS: usize = 1024;
/// Shortest poll interval accepted, in milliseconds.
pub const MIN_POLL_INTERVAL_MS: i64 = 10;

/// The validated agent configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// The file this was read from (as given), for messages.
    pub source: PathBuf,
    /// `[agent] node_id`: if set, must equal the node named in the agent's SVID (checked when
    /// the identity is loaded).
    pub node_id: Option<NodeId>,
    /// `[agent] data_dir`: where sled keeps the twin and the outbox.
    pub data_dir: PathBuf,
    /// `[agent] sled_cache_bytes`: sled's page cache size.
    pub sled_cache_bytes: u64,
    /// `[agent] desired_expiry_ms`: how long a desired value waits for an unreachable device
    /// before its outcome is `expired` (0 = one attempt only).
    pub desired_expiry: Duration,
    /// `[hub]`: how to reach the hub.
    pub hub: HubLinkConfig,
    /// `[identity]`: the agent's X.509-SVID files and trust domain.
    pub identity: IdentityConfig,
    /// `[outbox]`: the outbox bounds and flush policy.
    pub outbox: OutboxConfig,
    /// `[metrics] listen`: where to serve Prometheus metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// `[[devices]]`: the devices and their tags.
    pub devices: Vec<DeviceSpec>,
    /// `[mqtt]`: the local MQTT bus (default: an embedded broker on 127.0.0.1:1883).
    pub mqtt: MqttConfig,
    /// `[rules]`: the local rule engine (`None`: no rules).
    pub rules: Option<crate::rules::RulesConfig>,
}

/// How the agent reaches the hub (`[hub]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubLinkConfig {
    /// `host:port` of the hub's QUIC (UDP) listener; the host may be a DNS name.
    pub address: String,
    /// The SPIFFE id the hub must present; `None` means `spiffe://<trust_domain>/hub`.
    pub hub_id: Option<String>,
    /// Give up a connection attempt after this long.
    pub connect_timeout: Duration,
    /// Send a keep-alive after this much silence.
    pub keepalive: Duration,
    /// Consider the connection dead after this much silence (longer than `keepalive`).
    pub idle_timeout: Duration,
    /// First reconnect delay (then doubled, jittered, capped).
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
}

/// The agent's identity (`[identity]`): PEM files as written by spiffe-helper or
/// cert-manager's csi-driver-spiffe, or the SPIFFE Workload API. Paths are resolved; the
/// files are not read here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityConfig {
    /// The SPIFFE trust domain (`example.org`).
    pub trust_domain: String,
    /// Where the SVID and bundles come from, and the federated trust domains (the hub may
    /// belong to one of them).
    pub source: IdentitySource,
    /// The path prefix of node SPIFFE IDs (default `/edge/`; the hub's must be the same).
    pub node_path_prefix: String,
}

/// When the outbox forces its writes to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// fsync after every group commit: an accepted record survives a crash of the process or
    /// the OS and a power cut (the default).
    #[default]
    EveryCommit,
    /// Every commit written to the OS, fsync at most this often: an OS crash or a power cut may
    /// lose up to this much accepted data (a process crash nothing); less flash wear.
    Interval(Duration),
    /// Never fsync from the commit path: every commit is written to the OS, so a process crash
    /// loses nothing; an OS crash or a power cut loses what the OS had not written back yet.
    Never,
}

/// What the outbox does when it reaches `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutboxFullPolicy {
    /// Drop the oldest history and record a gap (the default); latest state is kept by the twin.
    #[default]
    DropOldest,
    /// Refuse new records (they are counted as a gap) until the hub drains the outbox.
    RefuseNew,
}

/// The outbox bounds and flush policy (`[outbox]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxConfig {
    /// Largest size of the outbox on disk, in bytes.
    pub max_bytes: u64,
    /// Group commit window in milliseconds. 0 (the default): commit at once when no commit is
    /// running; readings that arrive during a commit share the next one. More: wait up to this
    /// long after the first pending record, so that more share one write (fewer syncs and less
    /// CPU and flash wear, more latency).
    pub commit_interval_ms: u64,
    /// When commits are forced to stable storage.
    pub fsync: FsyncPolicy,
    /// Most records sent to the hub in one uplink frame. The hub commits and acknowledges
    /// what arrived together: a commit's records split over two frames cost it two commits
    /// and two acknowledgements, so the default holds a 10 x 100-register sweep.
    pub batch_max_records: usize,
    /// What happens when the outbox is full.
    pub on_full: OutboxFullPolicy,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_OUTBOX_MAX_BYTES,
            commit_interval_ms: 0,
            fsync: FsyncPolicy::EveryCommit,
            batch_max_records: DEFAULT_BATCH_MAX_RECORDS,
            on_full: OutboxFullPolicy::DropOldest,
        }
    }
}

/// Reads and validates the agent config at `path`; relative paths in it are resolved against
/// the file's directory.
pub fn load(path: &Path) -> Result<AgentConfig, ConfigErrors> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors::single(&name, format!("cannot read the config file: {e}")))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let base = std::path::absolute(&dir).unwrap_or(dir);
    let mut config = parse(&name, &text, &base)?;
    config.source = path.to_path_buf();
    Ok(config)
}

/// Validates the agent config `text`; messages name it `source_name`, and relative paths are
/// resolved against `base_dir`. Reads no file but the KubeEdge YAML files named by
/// `[[kubeedge]]` entries.
pub fn parse(source_name: &str, text: &str, base_dir: &Path) -> Result<AgentConfig, ConfigErrors> {
    let mut doc = Doc::new(source_name, text);
    let Some(root) = doc.parse_root() else {
        return Err(doc.into_errors());
    };
    let mut foreign = ConfigErrors::default();
    let config = check(&mut doc, &root, source_name, base_dir, &mut foreign);
    kubeedge::merge(doc.finish(config), foreign)
}

/// All problems, one per line as `file:line: message`: what `edgesync-agent validate` prints.
pub fn render_errors(errors: &ConfigErrors) -> String {
    errors.render()
}

// ---------------------------------------------------------------------------------------------
// Raw (unvalidated) file structure. Every field is optional so that all missing fields are
// reported at once; the unit of a quantity is in its name.

/// `[agent]`.
#[derive(Debug, Default, Deserialize)]
struct RawAgent {
    /// The node id; must match the node in the SVID if set.
    node_id: Option<String>,
    /// Directory for sled (twin and outbox); required.
    data_dir: Option<String>,
    /// sled page cache in bytes (default 2 MiB).
    sled_cache_bytes: Option<i64>,
    /// How long a desired value waits for an unreachable device, ms (default 600000).
    desired_expiry_ms: Option<i64>,
}

/// `[hub]`.
#[derive(Debug, Default, Deserialize)]
struct RawHub {
    /// `host:port` of the hub (UDP, QUIC); required.
    address: Option<String>,
    /// SPIFFE id the hub must present (default `spiffe://<trust_domain>/hub`).
    hub_id: Option<String>,
    /// Connection attempt timeout in milliseconds (default 5000).
    connect_timeout_ms: Option<i64>,
    /// Keep-alive interval in milliseconds (default 2000).
    keepalive_ms: Option<i64>,
    /// Idle timeout in milliseconds (default 10000), longer than the keep-alive.
    idle_timeout_ms: Option<i64>,
    /// First reconnect delay in milliseconds (default 200).
    backoff_initial_ms: Option<i64>,
    /// Longest reconnect delay in milliseconds (default 30000).
    backoff_max_ms: Option<i64>,
}

/// `[identity]` (the source keys are checked by `identity_config::check_source`).
#[derive(Debug, Default, Deserialize)]
struct RawIdentity {
    /// SPIFFE trust domain; required.
    trust_domain: Option<String>,
    /// `files` (default) or `workload_api`.
    source: Option<String>,
    /// SVID certificate chain (PEM); required with files.
    cert: Option<String>,
    /// SVID private key (PEM); required with files.
    key: Option<String>,
    /// Trust bundle (PEM); required with files.
    bundle: Option<String>,
    /// Workload API endpoint (default `SPIFFE_ENDPOINT_SOCKET`).
    workload_api_socket: Option<String>,
    /// How long start-up waits for the first SVID from the Workload API.
    workload_api_timeout_ms: Option<i64>,
    /// Federated trust domains (the hub's, if it is not ours).
    federates_with: Option<Vec<String>>,
    /// Bundle file per federated trust domain (files only).
    federated_bundles: Option<std::collections::BTreeMap<String, String>>,
    /// Path prefix of node SPIFFE IDs (default `/edge/`).
    node_path_prefix: Option<String>,
}

/// `[outbox]`.
#[derive(Debug, Default, Deserialize)]
struct RawOutbox {
    /// Bound on the outbox size in bytes (default 256 MiB).
    max_bytes: Option<i64>,
    /// Group commit window in milliseconds (default 0: commit at once).
    commit_interval_ms: Option<i64>,
    /// `every_commit` (default), `interval` or `never`.
    fsync: Option<String>,
    /// With `fsync = "interval"`: the interval in milliseconds (default 1000).
    fsync_interval_ms: Option<i64>,
    /// Records per uplink frame (default [`DEFAULT_BATCH_MAX_RECORDS`]).
    batch_max_records: Option<i64>,
    /// `drop_oldest` (default) or `refuse_new`.
    on_full: Option<String>,
}

/// `[metrics]`.
#[derive(Debug, Default, Deserialize)]
struct RawMetrics {
    /// `ip:port` to serve Prometheus metrics on.
    listen: Option<String>,
}

/// `[rules]`.
#[derive(Debug, Default, Deserialize)]
struct RawRules {
    /// The directory of rule files; required.
    dir: Option<String>,
    /// How often the directory is read for changes, ms (default 2000).
    reload_interval_ms: Option<i64>,
}

/// `[defaults]`: device settings used when a device does not give them.
#[derive(Debug, Default, Deserialize)]
struct RawDefaults {
    /// Poll interval in milliseconds (default 1000).
    poll_interval_ms: Option<i64>,
    /// Request timeout in milliseconds (default 1000).
    timeout_ms: Option<i64>,
    /// Byte order (default `ABCD`).
    byte_order: Option<String>,
    /// Most registers per read, 1..=125 (default 125).
    max_registers_per_read: Option<i64>,
    /// Most bits per read, 1..=2000 (default 2000).
    max_bits_per_read: Option<i64>,
    /// Largest gap bridged to merge reads (default 10).
    max_gap: Option<i64>,
}

/// `[[devices]]`.
#[derive(Debug, Default, Deserialize)]
struct RawDevice {
    /// Device id, unique on the node; required.
    id: Option<String>,
    /// Link protocol: `tcp`, `rtu` or `rtu_over_tcp`; required.
    protocol: Option<String>,
    /// `host:port` of the Modbus TCP server (or RTU-over-TCP converter); required for `tcp`
    /// and `rtu_over_tcp`.
    endpoint: Option<String>,
    /// Serial device path, e.g. `/dev/ttyUSB0`; required for `rtu`.
    serial_port: Option<String>,
    /// Baud rate for `rtu`, 300..=4000000 (default 19200).
    baud: Option<i64>,
    /// Parity for `rtu`: `none`, `even` or `odd` (default `even`).
    parity: Option<String>,
    /// Data bits for `rtu`: 7 or 8 (default 8).
    data_bits: Option<i64>,
    /// Stop bits for `rtu`: 1 or 2 (default 1).
    stop_bits: Option<i64>,
    /// Silence between RTU frames in milliseconds, 0..=10000 (default: 3.5 character times
    /// at the baud rate, at least 2 ms).
    inter_frame_delay_ms: Option<i64>,
    /// Modbus unit id 0..=247 (default 1).
    unit_id: Option<i64>,
    /// Poll interval in milliseconds for the device's tags.
    poll_interval_ms: Option<i64>,
    /// Request timeout in milliseconds.
    timeout_ms: Option<i64>,
    /// Default byte order of the device's tags.
    byte_order: Option<String>,
    /// Most registers per read, 1..=125.
    max_registers_per_read: Option<i64>,
    /// Most bits per read, 1..=2000.
    max_bits_per_read: Option<i64>,
    /// Largest gap bridged to merge reads.
    max_gap: Option<i64>,
}

/// `[[devices.tags]]`.
#[derive(Debug, Default, Deserialize)]
struct RawTag {
    /// Property id, unique in the device; required.
    name: Option<String>,
    /// `coil`, `discrete_input`, `input_register` or `holding_register`.
    table: Option<String>,
    /// 0-based offset (integer) or 1-based shorthand (string such as "40001").
    address: Option<IntOrString>,
    /// Data type; defaults to `bool` in the bit tables.
    #[serde(rename = "type")]
    data_type: Option<String>,
    /// String length in registers.
    length: Option<i64>,
    /// Bit of a register, for a bool in a register table.
    bit: Option<i64>,
    /// Byte order override.
    byte_order: Option<String>,
    /// Scale factor (default 1.0).
    scale: Option<f64>,
    /// Offset added after scaling (default 0.0).
    offset: Option<f64>,
    /// Engineering unit.
    unit: Option<String>,
    /// `read` (default), `write` or `read_write`.
    access: Option<String>,
    /// Poll interval in milliseconds (default: the device's).
    poll_interval_ms: Option<i64>,
    /// Absolute deadband.
    deadband: Option<f64>,
    /// Percent deadband, 0..=100.
    deadband_pct: Option<f64>,
    /// Heartbeat: report an unchanged value at least this often, in milliseconds.
    max_interval_ms: Option<i64>,
    /// `on_change` (default) or `every_sample`.
    report: Option<String>,
    /// Only the latest value matters: coalesced while the hub is unreachable.
    state_only: Option<bool>,
}

/// An integer or a string, for fields that accept both (such as a Modbus address).
#[derive(Debug, Clone, PartialEq)]
enum IntOrString {
    /// An integer.
    Int(i64),
    /// A string.
    Str(String),
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = IntOrString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer or a string")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<IntOrString, E> {
                Ok(IntOrString::Int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<IntOrString, E> {
                i64::try_from(v)
                    .map(IntOrString::Int)
                    .map_err(|_| E::custom(format!("integer {v} is too large")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::Str(v.to_owned()))
            }
        }
        de.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------------------
// Validation.

const ROOT_KEYS: &[&str] = &[
    "agent", "hub", "identity", "outbox", "metrics", "defaults", "devices", "kubeedge", "mqtt",
    "rules",
];

const TABLES: &[(&str, Table)] = &[
    ("coil", Table::Coil),
    ("discrete_input", Table::DiscreteInput),
    ("input_register", Table::InputRegister),
    ("holding_register", Table::HoldingRegister),
];

const BYTE_ORDERS: &[(&str, ByteOrder)] = &[
    ("ABCD", ByteOrder::Abcd),
    ("BADC", ByteOrder::Badc),
    ("CDAB", ByteOrder::Cdab),
    ("DCBA", ByteOrder::Dcba),
    ("ABCDEFGH", ByteOrder::Abcd),
    ("BADCFEHG", ByteOrder::Badc),
    ("GHEFCDAB", ByteOrder::Cdab),
    ("HGFEDCBA", ByteOrder::Dcba),
];

const ACCESS: &[(&str, Access)] = &[
    ("read", Access::Read),
    ("write", Access::Write),
    ("read_write", Access::ReadWrite),
];

/// Data type names; `String` gets its length from `length`.
const TYPES: &[(&str, DataType)] = &[
    ("bool", DataType::Bool),
    ("int16", DataType::Int16),
    ("uint16", DataType::UInt16),
    ("int32", DataType::Int32),
    ("uint32", DataType::UInt32),
    ("int64", DataType::Int64),
    ("uint64", DataType::UInt64),
    ("float32", DataType::Float32),
    ("float64", DataType::Float64),
    ("string", DataType::String { len: 0 }),
];

/// Reads the table `key` of the root into `T`. `None` if it is broken (already reported), or
/// if it is absent and `required` (reported here).
fn read_section<T: DeserializeOwned + Default>(
    doc: &mut Doc<'_>,
    root: &DeTable<'_>,
    key: &str,
    required: Option<&str>,
) -> Option<(T, Loc)> {
    let component = format!("[{key}]");
    let present = root.iter().any(|(k, _)| k.get_ref() == key);
    if !present {
        if let Some(needs) = required {
            doc.error(
                None,
                format!("missing required table {component} ({needs})"),
            );
            return None;
        }
        return Some((T::default(), Loc::absent(component)));
    }
    let (node, loc) = doc.table(root, key, &component)?;
    let raw = doc.section(node, &loc)?;
    Some((raw, loc))
}

fn ms(v: i64) -> Duration {
    Duration::from_millis(u64::try_from(v).unwrap_or(0))
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn u16_of(v: i64) -> u16 {
    u16::try_from(v).unwrap_or(0)
}

/// A string value of `table`, read directly (used to name a table in messages even when its
/// raw struct could not be read).
fn str_key<'a>(node: &'a Node<'_>, key: &str) -> Option<&'a str> {
    match node.get_ref() {
        DeValue::Table(t) => t
            .iter()
            .find(|(k, _)| k.get_ref() == key)
            .and_then(|(_, v)| v.get_ref().as_str()),
        _ => None,
    }
}

/// Checks the whole TOML document; problems in the KubeEdge YAML files it names go to
/// `foreign`.
fn check(
    doc: &mut Doc<'_>,
    root: &DeTable<'_>,
    source: &str,
    base: &Path,
    foreign: &mut ConfigErrors,
) -> AgentConfig {
    doc.check_keys(&Loc::absent("top level"), root, ROOT_KEYS);

    // [agent]
    let mut node_id = None;
    let mut data_dir = PathBuf::new();
    let mut sled_cache_bytes = DEFAULT_SLED_CACHE_BYTES;
    let mut desired_expiry = Duration::from_millis(DEFAULT_DESIRED_EXPIRY_MS);
    if let Some((raw, loc)) =
        read_section::<RawAgent>(doc, root, "agent", Some("it needs data_dir"))
    {
        if let Some(id) = raw.node_id {
            match NodeId::new(id) {
                Ok(id) => node_id = Some(id),
                Err(e) => doc.at(&loc, "node_id", e),
            }
        }
        if let Some(p) = doc.path(&loc, "data_dir", raw.data_dir, base) {
            data_dir = p;
        }
        sled_cache_bytes = u64_of(doc.int_in(
            &loc,
            "sled_cache_bytes",
            raw.sled_cache_bytes,
            DEFAULT_SLED_CACHE_BYTES as i64,
            MIN_SLED_CACHE_BYTES..=i64::MAX,
        ));
        desired_expiry = Duration::from_millis(u64_of(doc.int_in(
            &loc,
            "desired_expiry_ms",
            raw.desired_expiry_ms,
            DEFAULT_DESIRED_EXPIRY_MS as i64,
            0..=i64::MAX,
        )));
    }

    let (hub, hub_loc) = check_hub(doc, root);
    let errors_before_identity = doc.error_count();
    let identity = check_identity(doc, root, base);
    // A broken [identity] leaves its federated domains unknown: no second, false error.
    if let (Some(id), Some(loc), true) = (
        &hub.hub_id,
        &hub_loc,
        doc.error_count() == errors_before_identity,
    ) {
        check_hub_domain(doc, loc, id, &identity);
    }
    let outbox = check_outbox(doc, root);

    // [metrics]
    let mut metrics_listen = None;
    if let Some((raw, loc)) = read_section::<RawMetrics>(doc, root, "metrics", None)
        && let Some(listen) = raw.listen
    {
        match listen.parse::<SocketAddr>() {
            Ok(a) => metrics_listen = Some(a),
            Err(_) => doc.at(
                &loc,
                "listen",
                format_args!("listen {listen:?} is not an ip:port socket address"),
            ),
        }
    }

    // [rules]
    let mut rules = None;
    let present = root.iter().any(|(k, _)| k.get_ref() == "rules");
    if present && let Some((raw, loc)) = read_section::<RawRules>(doc, root, "rules", None) {
        let interval = doc.int_in(
            &loc,
            "reload_interval_ms",
            raw.reload_interval_ms,
            2000,
            100..=3_600_000,
        );
        if let Some(dir) = doc.path(&loc, "dir", raw.dir, base) {
            rules = Some(crate::rules::RulesConfig {
                dir,
                reload_interval: ms(interval),
            });
        }
    }

    let mqtt = mqtt::check(doc, root, base);
    let defaults = check_defaults(doc, root);
    let mut devices = check_devices(doc, root, &defaults);
    kubeedge::import(doc, root, source, base, &defaults, &mut devices, foreign);

    AgentConfig {
        source: PathBuf::from(source),
        node_id,
        data_dir,
        sled_cache_bytes,
        desired_expiry,
        hub,
        identity,
        outbox,
        metrics_listen,
        devices,
        mqtt,
        rules,
    }
}

/// The hub is verified against the bundle of its own trust domain only: `hub_id` must be in
/// ours or in a federated one (also checked when the agent starts; here `validate` reports it).
fn check_hub_domain(doc: &mut Doc<'_>, loc: &Loc, hub_id: &str, identity: &IdentityConfig) {
    let (Ok(id), Ok(ours)) = (
        spiffe::SpiffeId::new(hub_id),
        spiffe::TrustDomain::new(&identity.trust_domain),
    ) else {
        // Reported where each is parsed.
        return;
    };
    let federated: Vec<&spiffe::TrustDomain> = match &identity.source {
        IdentitySource::Files(f) => f.federated.iter().map(|(td, _)| td).collect(),
        IdentitySource::WorkloadApi { federates_with, .. } => federates_with.iter().collect(),
    };
    let td = id.trust_domain();
    if td != &ours && !federated.contains(&td) {
        doc.at(
            loc,
            "hub_id",
            format_args!(
                "hub_id {hub_id:?} is in trust domain {:?}, neither ours ({:?}) nor listed in [identity] federates_with",
                td.as_str(),
                identity.trust_domain
            ),
        );
    }
}

/// `[hub]`, and where it is in the file (for checks that need other tables too).
fn check_hub(doc: &mut Doc<'_>, root: &DeTable<'_>) -> (HubLinkConfig, Option<Loc>) {
    let mut hub = HubLinkConfig {
        address: String::new(),
        hub_id: None,
        connect_timeout: Duration::from_millis(5000),
        keepalive: Duration::from_millis(2000),
        idle_timeout: Duration::from_millis(10_000),
        backoff_initial: Duration::from_millis(200),
        backoff_max: Duration::from_millis(30_000),
    };
    let Some((raw, loc)) = read_section::<RawHub>(doc, root, "hub", Some("it needs address"))
    else {
        return (hub, None);
    };
    if let Some(address) = doc.required(&loc, "address", raw.address) {
        match net::check_host_port(&address) {
            Ok(()) => hub.address = address,
            Err(why) => doc.at(&loc, "address", format_args!("address {address:?} {why}")),
        }
    }
    if let Some(id) = raw.hub_id {
        match spiffe::SpiffeId::new(&id) {
            Ok(_) => hub.hub_id = Some(id),
            Err(e) => doc.at(
                &loc,
                "hub_id",
                format_args!("hub_id {id:?} is not a SPIFFE id: {e}"),
            ),
        }
    }
    let connect = doc.int_in(
        &loc,
        "connect_timeout_ms",
        raw.connect_timeout_ms,
        5000,
        1..=i64::MAX,
    );
    let keepalive = doc.int_in(&loc, "keepalive_ms", raw.keepalive_ms, 2000, 1..=i64::MAX);
    let idle = doc.int_in(
        &loc,
        "idle_timeout_ms",
        raw.idle_timeout_ms,
        10_000,
        1..=i64::MAX,
    );
    if keepalive >= idle {
        doc.at(
            &loc,
            "keepalive_ms",
            format_args!(
                "keepalive_ms ({keepalive}) must be shorter than idle_timeout_ms ({idle}), or the connection times out between keep-alives"
            ),
        );
    }
    let initial = doc.int_in(
        &loc,
        "backoff_initial_ms",
        raw.backoff_initial_ms,
        200,
        1..=i64::MAX,
    );
    let max = doc.int_in(
        &loc,
        "backoff_max_ms",
        raw.backoff_max_ms,
        30_000,
        1..=i64::MAX,
    );
    if initial > max {
        doc.at(
            &loc,
            "backoff_max_ms",
            format_args!("backoff_max_ms ({max}) is shorter than backoff_initial_ms ({initial})"),
        );
    }
    hub.connect_timeout = ms(connect);
    hub.keepalive = ms(keepalive);
    hub.idle_timeout = ms(idle);
    hub.backoff_initial = ms(initial);
    hub.backoff_max = ms(max);
    (hub, Some(loc))
}

fn check_identity(doc: &mut Doc<'_>, root: &DeTable<'_>, base: &Path) -> IdentityConfig {
    let mut id = IdentityConfig {
        trust_domain: String::new(),
        source: IdentitySource::Files(SvidFiles {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            bundle: PathBuf::new(),
            federated: Vec::new(),
        }),
        node_path_prefix: EDGE_PATH_PREFIX.to_owned(),
    };
    let Some((raw, loc)) = read_section::<RawIdentity>(
        doc,
        root,
        "identity",
        Some("it needs trust_domain, and cert, key and bundle or source = \"workload_api\""),
    ) else {
        return id;
    };
    let mut td_ok = false;
    if let Some(td) = doc.required(&loc, "trust_domain", raw.trust_domain) {
        match check_trust_domain(&td) {
            Ok(()) => {
                id.trust_domain = td;
                td_ok = true;
            }
            Err(why) => doc.at(
                &loc,
                "trust_domain",
                format_args!("trust_domain {td:?} {why}"),
            ),
        }
    }
    if let Some(prefix) = check_node_prefix(doc, &loc, raw.node_path_prefix) {
        id.node_path_prefix = prefix;
    }
    let own = td_ok.then(|| id.trust_domain.clone());
    let src = RawSource {
        source: raw.source,
        cert: raw.cert,
        key: raw.key,
        bundle: raw.bundle,
        workload_api_socket: raw.workload_api_socket,
        workload_api_timeout_ms: raw.workload_api_timeout_ms,
        federates_with: raw.federates_with,
        federated_bundles: raw.federated_bundles,
    };
    if let Some(source) = check_source(doc, &loc, src, own.as_deref(), base) {
        id.source = source;
    }
    id
}

fn check_outbox(doc: &mut Doc<'_>, root: &DeTable<'_>) -> OutboxConfig {
    // A key left out means the same as the section left out: one set of defaults.
    let mut out = OutboxConfig::default();
    let Some((raw, loc)) = read_section::<RawOutbox>(doc, root, "outbox", None) else {
        return out;
    };
    let d = OutboxConfig::default();
    out.max_bytes = u64_of(doc.int_in(
        &loc,
        "max_bytes",
        raw.max_bytes,
        i64::try_from(d.max_bytes).unwrap_or(i64::MAX),
        65_536..=i64::MAX,
    ));
    out.commit_interval_ms = u64_of(doc.int_in(
        &loc,
        "commit_interval_ms",
        raw.commit_interval_ms,
        i64::try_from(d.commit_interval_ms).unwrap_or(0),
        0..=10_000,
    ));
    let policy = match raw.fsync.as_deref() {
        None => Some("every_commit"),
        Some(s) => doc.choice(
            &loc,
            "fsync",
            s,
            &[
                ("every_commit", "every_commit"),
                ("interval", "interval"),
                ("never", "never"),
            ],
        ),
    };
    let interval = doc.int_in(
        &loc,
        "fsync_interval_ms",
        raw.fsync_interval_ms,
        1000,
        1..=i64::MAX,
    );
    out.fsync = match policy {
        Some("interval") => FsyncPolicy::Interval(ms(interval)),
        Some("never") => FsyncPolicy::Never,
        _ => FsyncPolicy::EveryCommit,
    };
    if raw.fsync_interval_ms.is_some() && policy.is_some() && policy != Some("interval") {
        doc.at(
            &loc,
            "fsync_interval_ms",
            "fsync_interval_ms applies only with fsync = \"interval\"",
        );
    }
    out.batch_max_records = usize::try_from(doc.int_in(
        &loc,
        "batch_max_records",
        raw.batch_max_records,
        i64::try_from(d.batch_max_records).unwrap_or(1),
        1..=edgesync_protocol::frame::MAX_FRAME_SAMPLES as i64,
    ))
    .unwrap_or(d.batch_max_records);
    if let Some(s) = raw.on_full
        && let Some(p) = doc.choice(
            &loc,
            "on_full",
            &s,
            &[
                ("drop_oldest", OutboxFullPolicy::DropOldest),
                ("refuse_new", OutboxFullPolicy::RefuseNew),
            ],
        )
    {
        out.on_full = p;
    }
    out
}

/// Device settings after `[defaults]` (and then a device's own values) are applied.
#[derive(Debug, Clone, Copy)]
struct DeviceDefaults {
    poll_interval_ms: i64,
    timeout_ms: i64,
    byte_order: ByteOrder,
    max_registers_per_read: i64,
    max_bits_per_read: i64,
    max_gap: i64,
}

impl Default for DeviceDefaults {
    fn default() -> Self {
        Self {
            poll_interval_ms: 1000,
            timeout_ms: 1000,
            byte_order: ByteOrder::Abcd,
            max_registers_per_read: 125,
            max_bits_per_read: 2000,
            max_gap: 10,
        }
    }
}

/// The device-level settings shared by `[defaults]` and `[[devices]]`.
struct DeviceSettings {
    poll_interval_ms: Option<i64>,
    timeout_ms: Option<i64>,
    byte_order: Option<String>,
    max_registers_per_read: Option<i64>,
    max_bits_per_read: Option<i64>,
    max_gap: Option<i64>,
}

fn apply_settings(
    doc: &mut Doc<'_>,
    loc: &Loc,
    s: DeviceSettings,
    base: &DeviceDefaults,
) -> DeviceDefaults {
    let mut d = *base;
    d.poll_interval_ms = doc.int_in(
        loc,
        "poll_interval_ms",
        s.poll_interval_ms,
        base.poll_interval_ms,
        MIN_POLL_INTERVAL_MS..=86_400_000,
    );
    d.timeout_ms = doc.int_in(
        loc,
        "timeout_ms",
        s.timeout_ms,
        base.timeout_ms,
        1..=600_000,
    );
    if let Some(bo) = s.byte_order
        && let Some(bo) = doc.choice(loc, "byte_order", &bo, BYTE_ORDERS)
    {
        d.byte_order = bo;
    }
    d.max_registers_per_read = doc.int_in(
        loc,
        "max_registers_per_read",
        s.max_registers_per_read,
        base.max_registers_per_read,
        1..=125,
    );
    d.max_bits_per_read = doc.int_in(
        loc,
        "max_bits_per_read",
        s.max_bits_per_read,
        base.max_bits_per_read,
        1..=2000,
    );
    d.max_gap = doc.int_in(loc, "max_gap", s.max_gap, base.max_gap, 0..=65_535);
    d
}

fn check_defaults(doc: &mut Doc<'_>, root: &DeTable<'_>) -> DeviceDefaults {
    let base = DeviceDefaults::default();
    let Some((raw, loc)) = read_section::<RawDefaults>(doc, root, "defaults", None) else {
        return base;
    };
    let settings = DeviceSettings {
        poll_interval_ms: raw.poll_interval_ms,
        timeout_ms: raw.timeout_ms,
        byte_order: raw.byte_order,
        max_registers_per_read: raw.max_registers_per_read,
        max_bits_per_read: raw.max_bits_per_read,
        max_gap: raw.max_gap,
    };
    apply_settings(doc, &loc, settings, &base)
}

fn check_devices(
    doc: &mut Doc<'_>,
    root: &DeTable<'_>,
    defaults: &DeviceDefaults,
) -> Vec<DeviceSpec> {
    let mut devices = Vec::new();
    let mut seen: HashMap<String, Option<usize>> = HashMap::new();
    // Physical links by key: the first device on each, its line, and its link.
    let mut links: HashMap<String, (String, Option<usize>, LinkSpec)> = HashMap::new();
    // No devices is valid: the hub may send them in a config bundle. A large file's devices
    // come part by part (see `Doc::device_chunks`), so that their trees are not all in memory
    // at once.
    let mut chunks = doc.device_chunks();
    let mut i = 0usize;
    let mut first = true;
    loop {
        let part;
        let table: &DeTable<'_> = match chunks.as_mut() {
            None if first => root,
            None => break,
            Some(it) => match it.next() {
                Some(p) => {
                    part = p;
                    &part
                }
                None => break,
            },
        };
        first = false;
        let items = doc.table_array(table, "devices", "[[devices]]");
        for (node, loc) in items {
            i += 1;
            check_device(
                doc,
                node,
                loc,
                i,
                defaults,
                &mut devices,
                &mut seen,
                &mut links,
            );
        }
    }
    devices
}

/// Checks device number `i` (1-based), adding it to `devices` when it has no error.
#[allow(clippy::too_many_arguments)]
fn check_device(
    doc: &mut Doc<'_>,
    node: &Node<'_>,
    loc: Loc,
    i: usize,
    defaults: &DeviceDefaults,
    devices: &mut Vec<DeviceSpec>,
    seen: &mut HashMap<String, Option<usize>>,
    links: &mut HashMap<String, (String, Option<usize>, LinkSpec)>,
) {
    {
        let component = match str_key(node, "id") {
            Some(id) => format!("device {id:?}"),
            None => format!("device #{i}"),
        };
        let loc = loc.named(component.clone());
        let errors_before = doc.error_count();
        // The tags are read below, table by table.
        let raw: Option<RawDevice> = doc.section_except(node, &loc, &["tags"]);
        let raw_ok = raw.is_some();
        let raw = raw.unwrap_or_default();

        let mut id = None;
        if raw_ok && let Some(s) = doc.required(&loc, "id", raw.id.clone()) {
            match DeviceId::new(s.clone()) {
                Ok(d) => id = Some(d),
                Err(e) => doc.at(&loc, "id", e),
            }
            if let Some(first) = seen.get(&s) {
                let first = first.map(|l| format!(" on line {l}")).unwrap_or_default();
                doc.at(
                    &loc,
                    "id",
                    format_args!("device id {s:?} is already used{first}"),
                );
            } else {
                seen.insert(s, loc.at("id"));
            }
        }

        let mut link = None;
        if raw_ok && let Some(protocol) = doc.required(&loc, "protocol", raw.protocol.clone()) {
            link = check_link(doc, &loc, &protocol, &raw);
        }
        let mut conflict = false;
        if let Some(l) = &link {
            let device = str_key(node, "id").unwrap_or("?").to_owned();
            let key_field = match l {
                LinkSpec::Rtu { .. } => "serial_port",
                _ => "endpoint",
            };
            match links.get(&l.key()) {
                Some((first, first_line, first_link)) if first_link != l => {
                    let on = first_line
                        .map(|n| format!(" on line {n}"))
                        .unwrap_or_default();
                    doc.at(
                        &loc,
                        key_field,
                        format_args!(
                            "device {device:?} and device {first:?}{on} share a link but give it different settings (a serial port's baud, parity, data_bits, stop_bits and inter_frame_delay_ms must agree)"
                        ),
                    );
                    conflict = true;
                }
                Some(_) => {}
                None => {
                    links.insert(l.key(), (device, loc.at(key_field), l.clone()));
                }
            }
            // One endpoint spoken to with two framings cannot work either.
            if let LinkSpec::Tcp { endpoint } | LinkSpec::RtuOverTcp { endpoint } = l {
                let other = match l {
                    LinkSpec::Tcp { .. } => format!("rtu+tcp://{endpoint}"),
                    _ => format!("tcp://{endpoint}"),
                };
                if let Some((first, first_line, _)) = links.get(&other) {
                    let on = first_line
                        .map(|n| format!(" on line {n}"))
                        .unwrap_or_default();
                    doc.at(
                        &loc,
                        "protocol",
                        format_args!(
                            "endpoint {endpoint:?} is also used by device {first:?}{on} with the other framing (tcp and rtu_over_tcp cannot share an endpoint)"
                        ),
                    );
                    conflict = true;
                }
            }
        }
        if conflict {
            link = None;
        }
        let unit_id = doc.int_in(&loc, "unit_id", raw.unit_id, 1, 0..=247);
        if unit_id == 0 && link.as_ref().is_some_and(LinkSpec::is_rtu) {
            doc.at(
                &loc,
                "unit_id",
                "unit_id 0 is the broadcast address on an RTU bus, which no device answers",
            );
        }
        let settings = DeviceSettings {
            poll_interval_ms: raw.poll_interval_ms,
            timeout_ms: raw.timeout_ms,
            byte_order: raw.byte_order,
            max_registers_per_read: raw.max_registers_per_read,
            max_bits_per_read: raw.max_bits_per_read,
            max_gap: raw.max_gap,
        };
        let dev = apply_settings(doc, &loc, settings, defaults);

        let DeValue::Table(table) = node.get_ref() else {
            return;
        };
        let errors_before_tags = doc.error_count();
        let tag_items = doc.table_array(table, "tags", &component);
        if tag_items.is_empty() && doc.error_count() == errors_before_tags {
            doc.error(loc.header, format!("{component}: device has no tags"));
        }
        let mut tags = Vec::new();
        let mut seen_tags: HashMap<String, Option<usize>> = HashMap::new();
        for (j, (tnode, tloc)) in tag_items.into_iter().enumerate() {
            let tcomponent = match str_key(tnode, "name") {
                Some(n) => format!("{component} tag {n:?}"),
                None => format!("{component} tag #{}", j + 1),
            };
            let tloc = tloc.named(tcomponent);
            let Some(raw_tag) = doc.section::<RawTag>(tnode, &tloc) else {
                continue;
            };
            if let Some(name) = &raw_tag.name {
                if let Some(first) = seen_tags.get(name) {
                    let first = first.map(|l| format!(" on line {l}")).unwrap_or_default();
                    doc.at(
                        &tloc,
                        "name",
                        format_args!("tag name {name:?} is already used in this device{first}"),
                    );
                } else {
                    seen_tags.insert(name.clone(), tloc.at("name"));
                }
            }
            if let Some(tag) = check_tag(doc, &tloc, raw_tag, &dev) {
                tags.push(tag);
            }
        }

        if doc.error_count() > errors_before {
            return;
        }
        if let (Some(id), Some(link)) = (id, link) {
            devices.push(DeviceSpec {
                id,
                link,
                unit_id: u8::try_from(unit_id).unwrap_or(0),
                timeout: ms(dev.timeout_ms),
                max_registers_per_read: u16_of(dev.max_registers_per_read),
                max_bits_per_read: u16_of(dev.max_bits_per_read),
                max_gap: u16_of(dev.max_gap),
                tags,
            });
        }
    }
}

const PARITIES: &[(&str, Parity)] = &[
    ("none", Parity::None),
    ("even", Parity::Even),
    ("odd", Parity::Odd),
];

/// The link of a device from `protocol` and its fields; `None` if anything is wrong
/// (reported). Serial fields are refused on TCP links and `endpoint` on serial ones.
fn check_link(doc: &mut Doc<'_>, loc: &Loc, protocol: &str, raw: &RawDevice) -> Option<LinkSpec> {
    let serial_fields = [
        ("serial_port", raw.serial_port.is_some()),
        ("baud", raw.baud.is_some()),
        ("parity", raw.parity.is_some()),
        ("data_bits", raw.data_bits.is_some()),
        ("stop_bits", raw.stop_bits.is_some()),
        ("inter_frame_delay_ms", raw.inter_frame_delay_ms.is_some()),
    ];
    match protocol {
        "tcp" | "rtu_over_tcp" => {
            let before = doc.error_count();
            for (field, present) in serial_fields {
                if present {
                    doc.at(
                        loc,
                        field,
                        format_args!("{field} applies only to protocol \"rtu\", not {protocol:?}"),
                    );
                }
            }
            let endpoint = doc.required(loc, "endpoint", raw.endpoint.clone())?;
            if let Err(why) = net::check_host_port(&endpoint) {
                doc.at(loc, "endpoint", format_args!("endpoint {endpoint:?} {why}"));
                return None;
            }
            if doc.error_count() > before {
                return None;
            }
            Some(if protocol == "tcp" {
                LinkSpec::Tcp { endpoint }
            } else {
                LinkSpec::RtuOverTcp { endpoint }
            })
        }
        "rtu" => {
            let before = doc.error_count();
            if raw.endpoint.is_some() {
                doc.at(
                    loc,
                    "endpoint",
                    "endpoint applies to protocols \"tcp\" and \"rtu_over_tcp\"; a serial device is named by serial_port",
                );
            }
            let path = doc.required(loc, "serial_port", raw.serial_port.clone());
            if path.as_deref().is_some_and(|p| p.trim().is_empty()) {
                doc.at(loc, "serial_port", "serial_port is empty");
            }
            let baud = doc.int_in(loc, "baud", raw.baud, 19_200, 300..=4_000_000);
            let parity = match &raw.parity {
                Some(p) => doc.choice(loc, "parity", p, PARITIES).unwrap_or_default(),
                None => Parity::Even,
            };
            let data_bits = doc.int_in(loc, "data_bits", raw.data_bits, 8, 7..=8);
            let stop_bits = doc.int_in(loc, "stop_bits", raw.stop_bits, 1, 1..=2);
            let baud = u32::try_from(baud).unwrap_or(19_200);
            let data_bits = u8::try_from(data_bits).unwrap_or(8);
            let stop_bits = u8::try_from(stop_bits).unwrap_or(1);
            let inter_frame_delay = match raw.inter_frame_delay_ms {
                Some(v) => ms(doc.int_in(loc, "inter_frame_delay_ms", Some(v), 0, 0..=10_000)),
                None => default_inter_frame_delay(baud, parity, data_bits, stop_bits),
            };
            let path = path?;
            if doc.error_count() > before {
                return None;
            }
            Some(LinkSpec::Rtu {
                path,
                baud,
                parity,
                data_bits,
                stop_bits,
                inter_frame_delay,
            })
        }
        other => {
            doc.at(
                loc,
                "protocol",
                format_args!("protocol {other:?} is not one of \"tcp\", \"rtu\", \"rtu_over_tcp\""),
            );
            None
        }
    }
}

fn is_64_bit(t: DataType) -> bool {
    matches!(t, DataType::Int64 | DataType::UInt64 | DataType::Float64)
}

fn is_numeric(t: DataType) -> bool {
    !matches!(t, DataType::Bool | DataType::String { .. })
}

fn type_name(t: DataType) -> &'static str {
    TYPES
        .iter()
        .find(|(_, d)| std::mem::discriminant(d) == std::mem::discriminant(&t))
        .map(|(n, _)| *n)
        .unwrap_or("?")
}

/// Validates one tag; `None` if anything is wrong (every problem is reported).
fn check_tag(doc: &mut Doc<'_>, loc: &Loc, raw: RawTag, dev: &DeviceDefaults) -> Option<TagSpec> {
    let before = doc.error_count();

    let property = match doc.required(loc, "name", raw.name) {
        Some(n) => match PropertyId::new(n) {
            Ok(p) => Some(p),
            Err(e) => {
                doc.at(loc, "name", e);
                None
            }
        },
        None => None,
    };

    // Table and address.
    let table_field = raw
        .table
        .as_deref()
        .and_then(|s| doc.choice(loc, "table", s, TABLES));
    let (table, address) = match raw.address {
        None => {
            doc.required::<()>(loc, "address", None);
            (table_field, None)
        }
        Some(IntOrString::Int(n)) => {
            if raw.table.is_none() {
                doc.at(
                    loc,
                    "address",
                    format_args!(
                        "address {n} is a 0-based offset, so table is required (or write the address in shorthand, such as \"40001\")"
                    ),
                );
            }
            match u16::try_from(n) {
                Ok(a) => (table_field, Some(a)),
                Err(_) => {
                    let what = match table_field {
                        Some(t) => format!("the {} table", table_words(t)),
                        None => "a Modbus table".to_owned(),
                    };
                    doc.at(
                        loc,
                        "address",
                        format_args!("address {n} does not fit {what} (0..=65535)"),
                    );
                    (table_field, None)
                }
            }
        }
        Some(IntOrString::Str(s)) => match parse_shorthand(&s) {
            Ok((t, a)) => {
                if let Some(given) = table_field
                    && given != t
                {
                    doc.at(
                        loc,
                        "table",
                        format_args!(
                            "table {:?} disagrees with address {s:?}, which is a {}",
                            given.as_str(),
                            table_words(t)
                        ),
                    );
                }
                (Some(t), Some(a))
            }
            Err(e) => {
                doc.at(loc, "address", e);
                (table_field, None)
            }
        },
    };

    // Data type, length and bit.
    let named_type = raw
        .data_type
        .as_deref()
        .and_then(|s| doc.choice(loc, "type", s, TYPES));
    let mut data_type = match (raw.data_type.is_some(), named_type, table) {
        (false, _, Some(t)) if !t.is_register() => Some(DataType::Bool),
        (false, _, Some(_)) => {
            doc.required::<()>(loc, "type", None);
            None
        }
        (_, t, _) => t,
    };
    if let Some(DataType::String { .. }) = data_type {
        match raw.length {
            None => {
                doc.at(
                    loc,
                    "type",
                    "type \"string\" needs length (in registers, 1..=125)",
                );
                data_type = None;
            }
            Some(len) => {
                let len = doc.int_in(loc, "length", Some(len), 0, 1..=125);
                data_type = (len > 0).then_some(DataType::String { len: u16_of(len) });
            }
        }
    } else if raw.length.is_some() && data_type.is_some() {
        doc.at(loc, "length", "length applies only to type \"string\"");
    }
    let mut bit = None;
    if let (Some(t), Some(dt)) = (table, data_type) {
        match (t.is_register(), dt) {
            (false, DataType::Bool) => {
                if raw.bit.is_some() {
                    doc.at(
                        loc,
                        "bit",
                        format_args!(
                            "bit applies only to a bool in a register table; a {} is a single bit already",
                            table_words(t)
                        ),
                    );
                }
            }
            (false, other) => {
                doc.at(
                    loc,
                    "type",
                    format_args!(
                        "type {:?} cannot live in the {} table, which holds single bits (use type \"bool\")",
                        type_name(other),
                        table_words(t)
                    ),
                );
            }
            (true, DataType::Bool) => match raw.bit {
                None => doc.at(
                    loc,
                    "type",
                    format_args!("a bool in the {} table needs bit (0..=15)", table_words(t)),
                ),
                Some(b) => {
                    let b = doc.int_in(loc, "bit", Some(b), -1, 0..=15);
                    bit = u8::try_from(b).ok();
                }
            },
            (true, _) => {
                if raw.bit.is_some() {
                    doc.at(loc, "bit", "bit applies only to type \"bool\"");
                }
            }
        }
    }

    // Extent of the tag in its table.
    if let (Some(t), Some(a), Some(dt)) = (table, address, data_type)
        && t.is_register()
    {
        let width = u32::from(dt.width());
        let last = u32::from(a) + width - 1;
        if last > 65_535 {
            doc.at(
                loc,
                "address",
                format_args!(
                    "address {a} ({} {}) with type {} ({width} registers) runs past the end of the {} table: its last register would be {last}, the table ends at 65535",
                    table_words(t),
                    shorthand(t, u32::from(a)),
                    type_name(dt),
                    table_words(t)
                ),
            );
        }
        if i64::from(width) > dev.max_registers_per_read {
            doc.at(
                loc,
                "type",
                format_args!(
                    "type {} takes {width} registers, more than the device reads at once (max_registers_per_read = {})",
                    type_name(dt),
                    dev.max_registers_per_read
                ),
            );
        }
    }

    let mut byte_order = dev.byte_order;
    if let Some(bo) = raw.byte_order.as_deref()
        && let Some(parsed) = doc.choice(loc, "byte_order", bo, BYTE_ORDERS)
    {
        byte_order = parsed;
        if bo.len() == 8 && data_type.is_some_and(|d| !is_64_bit(d)) {
            doc.at(
                loc,
                "byte_order",
                format_args!(
                    "byte_order {bo:?} is an 8-byte order, for 64-bit types only; use the 4-letter form"
                ),
            );
        }
    }

    let scale = raw.scale.unwrap_or(1.0);
    if !scale.is_finite() || scale == 0.0 {
        doc.at(
            loc,
            "scale",
            format_args!("scale is {scale} but must be finite and non-zero"),
        );
    }
    let offset = raw.offset.unwrap_or(0.0);
    if !offset.is_finite() {
        doc.at(
            loc,
            "offset",
            format_args!("offset is {offset} but must be finite"),
        );
    }
    if let Some(dt) = data_type
        && !is_numeric(dt)
        && (raw.scale.is_some() || raw.offset.is_some())
    {
        let key = if raw.scale.is_some() {
            "scale"
        } else {
            "offset"
        };
        doc.at(
            loc,
            key,
            format_args!(
                "scale and offset apply only to numeric types, not {:?}",
                type_name(dt)
            ),
        );
    }

    if let Some(u) = &raw.unit
        && u.trim().is_empty()
    {
        doc.at(loc, "unit", "unit is empty (leave it out instead)");
    }

    let access = raw
        .access
        .as_deref()
        .map_or(Some(Access::Read), |s| doc.choice(loc, "access", s, ACCESS));
    if let (Some(a), Some(t)) = (access, table)
        && a != Access::Read
        && matches!(t, Table::InputRegister | Table::DiscreteInput)
    {
        doc.at(
            loc,
            "access",
            format_args!(
                "access {:?} is not possible: the {} table is read only (write to a coil or holding register)",
                raw.access.as_deref().unwrap_or(""),
                table_words(t)
            ),
        );
    }

    let poll = doc.int_in(
        loc,
        "poll_interval_ms",
        raw.poll_interval_ms,
        dev.poll_interval_ms,
        MIN_POLL_INTERVAL_MS..=86_400_000,
    );

    // Reporting policy.
    let every_sample = match raw.report.as_deref() {
        None => false,
        Some(s) => doc
            .choice(
                loc,
                "report",
                s,
                &[("on_change", false), ("every_sample", true)],
            )
            .unwrap_or(false),
    };
    let deadband_abs = raw.deadband.unwrap_or(0.0);
    if !(deadband_abs.is_finite() && deadband_abs >= 0.0) {
        doc.at(
            loc,
            "deadband",
            format_args!("deadband is {deadband_abs} but must be a finite number >= 0"),
        );
    }
    let deadband_pct = raw.deadband_pct.unwrap_or(0.0);
    if !(0.0..=100.0).contains(&deadband_pct) {
        doc.at(
            loc,
            "deadband_pct",
            format_args!("deadband_pct is {deadband_pct} but must be in 0..=100"),
        );
    }
    if raw.deadband.is_some() && raw.deadband_pct.is_some() {
        doc.at(
            loc,
            "deadband_pct",
            "deadband and deadband_pct are both given; choose one",
        );
    }
    let has_deadband = raw.deadband.is_some() || raw.deadband_pct.is_some();
    if has_deadband {
        let key = if raw.deadband.is_some() {
            "deadband"
        } else {
            "deadband_pct"
        };
        if every_sample {
            doc.at(
                loc,
                key,
                format_args!("{key} has no effect with report = \"every_sample\""),
            );
        }
        if let Some(dt) = data_type
            && !is_numeric(dt)
        {
            doc.at(
                loc,
                key,
                format_args!(
                    "{key} applies only to numeric types, not {:?}",
                    type_name(dt)
                ),
            );
        }
    }
    let max_interval = match raw.max_interval_ms {
        None => None,
        Some(v) => {
            let v = doc.int_in(loc, "max_interval_ms", Some(v), 0, 1..=i64::MAX);
            if v > 0 && v < poll {
                doc.at(
                    loc,
                    "max_interval_ms",
                    format_args!(
                        "max_interval_ms ({v}) is shorter than the tag's poll interval ({poll} ms)"
                    ),
                );
            }
            Some(ms(v))
        }
    };

    if doc.error_count() > before {
        return None;
    }
    Some(TagSpec {
        property: property?,
        table: table?,
        address: address?,
        data_type: data_type?,
        bit,
        byte_order,
        scale,
        offset,
        unit: raw.unit,
        access: access?,
        poll_interval: ms(poll),
        report: ReportPolicy {
            deadband_abs,
            deadband_pct,
            max_interval,
            every_sample,
            state_only: raw.state_only.unwrap_or(false),
        },
    })
}

#[cfg(test)]
mod tests;
