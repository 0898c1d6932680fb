//! `[mqtt]`: the agent's local MQTT bus (see `docs/mqtt.md`).
//!
//! Three modes: `embedded` (the default: the agent runs a broker itself, reachable on
//! `listen`, loopback only unless told otherwise), `external` (the agent connects to a broker
//! such as Mosquitto at `broker`, optionally with TLS) and `off`. Fields that apply to one mode
//! only are errors in the other, so a config never carries settings that silently do nothing.
//!
//! Nothing but the config text is read here: `password_file` and the TLS files are read when
//! the bus starts.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::de::DeTable;

use super::diag::{Doc, Loc};
use super::{ms, net, read_section};

/// Default `listen` of the embedded broker: `127.0.0.1:1883` (loopback only).
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 1883);
/// Default `keepalive_ms`.
pub const DEFAULT_KEEPALIVE_MS: i64 = 30_000;
/// Default `connect_timeout_ms`.
pub const DEFAULT_CONNECT_TIMEOUT_MS: i64 = 5_000;
/// Default `max_packet_bytes`: 256 KiB (a twin document of a device with a few hundred
/// properties fits).
pub const DEFAULT_MAX_PACKET_BYTES: i64 = 256 * 1024;
/// Default `queue_capacity`.
pub const DEFAULT_QUEUE_CAPACITY: i64 = 1024;
/// Default `max_requests_per_s`.
pub const DEFAULT_MAX_REQUESTS_PER_S: i64 = 200;
/// Default `max_connections` of the embedded broker.
pub const DEFAULT_MAX_CONNECTIONS: i64 = 32;
/// Default `max_topics` of the embedded broker.
pub const DEFAULT_MAX_TOPICS: i64 = 1024;
/// Default `max_inflight` of the embedded broker.
pub const DEFAULT_MAX_INFLIGHT: i64 = 32;
/// Default `segment_bytes` of the embedded broker: 256 KiB. A subscription filter's log must
/// hold at least one poll cycle of telemetry (about 65 bytes per property), or rumqttd drops
/// the oldest messages of a subscriber that is a few ms behind; 256 KiB holds a cycle of about
/// 4,000 properties.
pub const DEFAULT_SEGMENT_BYTES: i64 = 256 * 1024;
/// Default `segment_count` of the embedded broker.
pub const DEFAULT_SEGMENT_COUNT: i64 = 2;

/// The validated `[mqtt]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttConfig {
    /// Which broker, if any.
    pub mode: MqttMode,
    /// External broker: the MQTT client id of the agent's client; `None` means
    /// `edgesync-agent-<node>`. (Embedded, the agent is connected in-process.)
    pub client_id: Option<String>,
    /// The user name: sent by the agent to an external broker; required from every client by
    /// the embedded broker.
    pub username: Option<String>,
    /// The password that goes with `username`.
    pub password: Option<MqttPassword>,
    /// External broker: MQTT keep-alive of the agent's client (whole seconds on the wire,
    /// rounded up).
    pub keepalive: Duration,
    /// Time allowed for a connection to be set up (TCP, TLS and CONNECT/CONNACK); also the
    /// first reconnect delay of the agent's client.
    pub connect_timeout: Duration,
    /// Largest MQTT packet accepted or sent, in bytes.
    pub max_packet_bytes: usize,
    /// External broker: messages the agent's client may have queued for sending; more are
    /// dropped and counted.
    pub queue_capacity: usize,
    /// Requests (`twin/update`, `twin/get`) handled per second; more are dropped and counted.
    pub max_requests_per_s: u32,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            mode: MqttMode::Embedded(EmbeddedBroker::default()),
            client_id: None,
            username: None,
            password: None,
            keepalive: Duration::from_millis(DEFAULT_KEEPALIVE_MS as u64),
            connect_timeout: Duration::from_millis(DEFAULT_CONNECT_TIMEOUT_MS as u64),
            max_packet_bytes: DEFAULT_MAX_PACKET_BYTES as usize,
            queue_capacity: DEFAULT_QUEUE_CAPACITY as usize,
            max_requests_per_s: DEFAULT_MAX_REQUESTS_PER_S as u32,
        }
    }
}

/// Which broker the bus uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MqttMode {
    /// No local MQTT at all.
    Off,
    /// The agent runs a broker itself.
    Embedded(EmbeddedBroker),
    /// The agent connects to a broker that runs elsewhere.
    External(ExternalBroker),
}

/// The embedded broker's settings (`mode = "embedded"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddedBroker {
    /// Where apps connect (MQTT 3.1.1 over TCP).
    pub listen: SocketAddr,
    /// Most client connections at once (the agent's own is not counted).
    pub max_connections: usize,
    /// Most distinct topics published to plus filters subscribed to, over the broker's life.
    pub max_topics: usize,
    /// Most unacknowledged QoS 1/2 messages per connection.
    pub max_inflight: usize,
    /// Size of one in-memory log segment per subscription filter, in bytes.
    pub segment_bytes: usize,
    /// Segments kept per subscription filter (older ones are dropped: a subscriber that far
    /// behind loses messages).
    pub segment_count: usize,
}

impl Default for EmbeddedBroker {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            max_connections: DEFAULT_MAX_CONNECTIONS as usize,
            max_topics: DEFAULT_MAX_TOPICS as usize,
            max_inflight: DEFAULT_MAX_INFLIGHT as usize,
            segment_bytes: DEFAULT_SEGMENT_BYTES as usize,
            segment_count: DEFAULT_SEGMENT_COUNT as usize,
        }
    }
}

/// An external broker (`mode = "external"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalBroker {
    /// `host:port`; the host may be a DNS name.
    pub address: String,
    /// TLS to the broker, if set.
    pub tls: Option<MqttTls>,
}

/// TLS settings for an external broker (rustls with the ring provider).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttTls {
    /// CA certificates (PEM) that sign the broker's certificate.
    pub ca_file: PathBuf,
    /// Client certificate chain (PEM) and its key (PEM: PKCS#8, SEC1 or PKCS#1), for brokers
    /// that require client certificates. The broker's certificate must name the host of
    /// `broker`.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// A password, given inline or in a file (read when the bus starts; one trailing newline is
/// removed).
#[derive(Clone, PartialEq, Eq)]
pub enum MqttPassword {
    /// Given in the config.
    Inline(String),
    /// Read from this file.
    File(PathBuf),
}

impl fmt::Debug for MqttPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MqttPassword::Inline(_) => f.write_str("Inline(<redacted>)"),
            MqttPassword::File(p) => f.debug_tuple("File").field(p).finish(),
        }
    }
}

/// `[mqtt]` as written.
#[derive(Debug, Default, Deserialize)]
struct RawMqtt {
    /// `embedded` (default), `external` or `off`.
    mode: Option<String>,
    /// Embedded: `ip:port` to listen on (default 127.0.0.1:1883).
    listen: Option<String>,
    /// External: `host:port` of the broker; required.
    broker: Option<String>,
    /// Client id of the agent's client (default `edgesync-agent-<node>`).
    client_id: Option<String>,
    /// User name (external: sent; embedded: required from clients).
    username: Option<String>,
    /// Password, inline.
    password: Option<String>,
    /// Password, from a file.
    password_file: Option<String>,
    /// External: CA file (PEM); enables TLS.
    tls_ca_file: Option<String>,
    /// External: client certificate chain (PEM).
    tls_cert_file: Option<String>,
    /// External: client key (PEM).
    tls_key_file: Option<String>,
    /// Keep-alive of the agent's client, ms.
    keepalive_ms: Option<i64>,
    /// Connection set-up timeout, ms.
    connect_timeout_ms: Option<i64>,
    /// Largest packet, bytes.
    max_packet_bytes: Option<i64>,
    /// Outgoing queue of the agent's client, messages.
    queue_capacity: Option<i64>,
    /// Requests handled per second.
    max_requests_per_s: Option<i64>,
    /// Embedded: most client connections.
    max_connections: Option<i64>,
    /// Embedded: most distinct topics and filters.
    max_topics: Option<i64>,
    /// Embedded: most unacknowledged messages per connection.
    max_inflight: Option<i64>,
    /// Embedded: log segment size per filter, bytes.
    segment_bytes: Option<i64>,
    /// Embedded: log segments per filter.
    segment_count: Option<i64>,
}

/// Validates `[mqtt]` (absent: the defaults, an embedded broker on 127.0.0.1:1883).
pub(super) fn check(doc: &mut Doc<'_>, root: &DeTable<'_>, base: &Path) -> MqttConfig {
    let mut out = MqttConfig::default();
    let Some((raw, loc)) = read_section::<RawMqtt>(doc, root, "mqtt", None) else {
        return out;
    };
    let mode = match raw.mode.as_deref() {
        None => Some("embedded"),
        Some(s) => doc.choice(
            &loc,
            "mode",
            s,
            &[
                ("embedded", "embedded"),
                ("external", "external"),
                ("off", "off"),
            ],
        ),
    };

    // Fields that belong to one mode only.
    let embedded_only = [
        ("listen", raw.listen.is_some()),
        ("max_connections", raw.max_connections.is_some()),
        ("max_topics", raw.max_topics.is_some()),
        ("max_inflight", raw.max_inflight.is_some()),
        ("segment_bytes", raw.segment_bytes.is_some()),
        ("segment_count", raw.segment_count.is_some()),
    ];
    let external_only = [
        ("broker", raw.broker.is_some()),
        ("tls_ca_file", raw.tls_ca_file.is_some()),
        ("tls_cert_file", raw.tls_cert_file.is_some()),
        ("tls_key_file", raw.tls_key_file.is_some()),
        // The agent's own client: embedded, the agent is connected in-process.
        ("client_id", raw.client_id.is_some()),
        ("keepalive_ms", raw.keepalive_ms.is_some()),
        ("queue_capacity", raw.queue_capacity.is_some()),
    ];
    // Each field given in `fields` is an error, worded by `why`.
    let report = |doc: &mut Doc<'_>, fields: &[(&str, bool)], why: &dyn Fn(&str) -> String| {
        for (field, present) in fields {
            if *present {
                doc.at(&loc, field, why(field));
            }
        }
    };
    let only = |applies: &'static str, mode: &'static str| {
        move |field: &str| format!("{field} applies only to mode = \"{applies}\", not {mode:?}")
    };
    match mode {
        Some("embedded") => report(doc, &external_only, &only("external", "embedded")),
        Some("external") => report(doc, &embedded_only, &only("embedded", "external")),
        Some("off") => {
            report(doc, &embedded_only, &only("embedded", "off"));
            report(doc, &external_only, &only("external", "off"));
            let either = [
                ("username", raw.username.is_some()),
                ("password", raw.password.is_some()),
                ("password_file", raw.password_file.is_some()),
                ("connect_timeout_ms", raw.connect_timeout_ms.is_some()),
                ("max_packet_bytes", raw.max_packet_bytes.is_some()),
                ("max_requests_per_s", raw.max_requests_per_s.is_some()),
            ];
            report(doc, &either, &|field| {
                format!("{field} has no effect with mode = \"off\" (no local MQTT)")
            });
        }
        _ => {}
    }

    if let Some(id) = &raw.client_id
        && let Err(why) = check_client_id(id)
    {
        doc.at(&loc, "client_id", format_args!("client_id {id:?} {why}"));
    }
    out.client_id = raw.client_id;

    if let Some(u) = &raw.username
        && (u.is_empty() || u.len() > 256)
    {
        doc.at(&loc, "username", "username must be 1 to 256 bytes long");
    }
    let password_key = if raw.password.is_some() {
        "password"
    } else {
        "password_file"
    };
    out.password = match (raw.password, raw.password_file) {
        (Some(_), Some(_)) => {
            doc.at(
                &loc,
                "password_file",
                "password and password_file are both given; choose one",
            );
            None
        }
        (Some(p), None) => Some(MqttPassword::Inline(p)),
        (None, Some(f)) => doc
            .path(&loc, "password_file", Some(f), base)
            .map(MqttPassword::File),
        (None, None) => None,
    };
    if out.password.is_some() && raw.username.is_none() {
        doc.at(
            &loc,
            password_key,
            "a password needs a username (MQTT 3.1.1 sends no password without one)",
        );
    }
    out.username = raw.username;

    out.keepalive = ms(doc.int_in(
        &loc,
        "keepalive_ms",
        raw.keepalive_ms,
        DEFAULT_KEEPALIVE_MS,
        5000..=65_535_000,
    ));
    out.connect_timeout = ms(doc.int_in(
        &loc,
        "connect_timeout_ms",
        raw.connect_timeout_ms,
        DEFAULT_CONNECT_TIMEOUT_MS,
        100..=65_535,
    ));
    out.max_packet_bytes = usize_of(doc.int_in(
        &loc,
        "max_packet_bytes",
        raw.max_packet_bytes,
        DEFAULT_MAX_PACKET_BYTES,
        1024..=16 * 1024 * 1024,
    ));
    out.queue_capacity = usize_of(doc.int_in(
        &loc,
        "queue_capacity",
        raw.queue_capacity,
        DEFAULT_QUEUE_CAPACITY,
        16..=1_000_000,
    ));
    out.max_requests_per_s = u32::try_from(doc.int_in(
        &loc,
        "max_requests_per_s",
        raw.max_requests_per_s,
        DEFAULT_MAX_REQUESTS_PER_S,
        1..=100_000,
    ))
    .unwrap_or(DEFAULT_MAX_REQUESTS_PER_S as u32);

    out.mode = match mode {
        Some("off") => MqttMode::Off,
        Some("external") => {
            let address = doc.required(&loc, "broker", raw.broker).and_then(|a| {
                match net::check_host_port(&a) {
                    Ok(()) => Some(a),
                    Err(why) => {
                        doc.at(&loc, "broker", format_args!("broker {a:?} {why}"));
                        None
                    }
                }
            });
            let tls = RawTls {
                ca: raw.tls_ca_file,
                cert: raw.tls_cert_file,
                key: raw.tls_key_file,
            };
            let tls = check_tls(doc, &loc, &tls, base);
            MqttMode::External(ExternalBroker {
                address: address.unwrap_or_default(),
                tls,
            })
        }
        _ => {
            let mut e = EmbeddedBroker::default();
            if let Some(l) = raw.listen {
                match l.parse::<SocketAddr>() {
                    Ok(a) => e.listen = a,
                    Err(_) => doc.at(
                        &loc,
                        "listen",
                        format_args!("listen {l:?} is not an ip:port socket address"),
                    ),
                }
            }
            e.max_connections = usize_of(doc.int_in(
                &loc,
                "max_connections",
                raw.max_connections,
                DEFAULT_MAX_CONNECTIONS,
                1..=1024,
            ));
            e.max_topics = usize_of(doc.int_in(
                &loc,
                "max_topics",
                raw.max_topics,
                DEFAULT_MAX_TOPICS,
                16..=100_000,
            ));
            e.max_inflight = usize_of(doc.int_in(
                &loc,
                "max_inflight",
                raw.max_inflight,
                DEFAULT_MAX_INFLIGHT,
                1..=65_535,
            ));
            e.segment_bytes = usize_of(doc.int_in(
                &loc,
                "segment_bytes",
                raw.segment_bytes,
                DEFAULT_SEGMENT_BYTES,
                1024..=64 * 1024 * 1024,
            ));
            e.segment_count = usize_of(doc.int_in(
                &loc,
                "segment_count",
                raw.segment_count,
                DEFAULT_SEGMENT_COUNT,
                1..=1024,
            ));
            MqttMode::Embedded(e)
        }
    };
    out
}

/// The TLS fields as written.
struct RawTls {
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

fn check_tls(doc: &mut Doc<'_>, loc: &Loc, raw: &RawTls, base: &Path) -> Option<MqttTls> {
    let Some(ca) = raw.ca.clone() else {
        for (field, present) in [
            ("tls_cert_file", raw.cert.is_some()),
            ("tls_key_file", raw.key.is_some()),
        ] {
            if present {
                doc.at(
                    loc,
                    field,
                    format_args!("{field} needs tls_ca_file (which turns TLS on)"),
                );
            }
        }
        return None;
    };
    let ca_file = doc.path(loc, "tls_ca_file", Some(ca), base)?;
    let client_cert = match (raw.cert.clone(), raw.key.clone()) {
        (Some(c), Some(k)) => {
            let c = doc.path(loc, "tls_cert_file", Some(c), base);
            let k = doc.path(loc, "tls_key_file", Some(k), base);
            c.zip(k)
        }
        (Some(_), None) => {
            doc.at(loc, "tls_cert_file", "tls_cert_file needs tls_key_file");
            None
        }
        (None, Some(_)) => {
            doc.at(loc, "tls_key_file", "tls_key_file needs tls_cert_file");
            None
        }
        (None, None) => None,
    };
    Some(MqttTls {
        ca_file,
        client_cert,
    })
}

/// A client id this agent may use: 1 to 64 characters from `[A-Za-z0-9._-]` (accepted by every
/// broker, including those that restrict MQTT 3.1.1's "0-9a-zA-Z" to 23 characters only by
/// default: Mosquitto accepts longer ones).
fn check_client_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() || id.len() > 64 {
        return Err("must be 1 to 64 characters long");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("may hold only letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

fn usize_of(v: i64) -> usize {
    usize::try_from(v).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const BASE: &str = "[agent]\ndata_dir = \"d\"\n[hub]\naddress = \"h:1\"\n[identity]\ntrust_domain = \"example.org\"\ncert = \"c\"\nkey = \"k\"\nbundle = \"b\"\n";

    fn parse(mqtt: &str) -> Result<MqttConfig, Vec<(Option<usize>, String)>> {
        super::super::parse("agent.toml", &format!("{BASE}{mqtt}"), Path::new("/etc/e"))
            .map(|c| c.mqtt)
            .map_err(|e| e.iter().map(|e| (e.line, e.message.clone())).collect())
    }

    #[test]
    fn absent_means_embedded_on_loopback() {
        let c = parse("").unwrap();
        assert_eq!(c, MqttConfig::default());
        assert_eq!(c.mode, MqttMode::Embedded(EmbeddedBroker::default()));
        assert_eq!(DEFAULT_LISTEN.to_string(), "127.0.0.1:1883");
    }

    #[test]
    fn external_with_tls_and_password_file() {
        let c = parse(
            "[mqtt]\nmode = \"external\"\nbroker = \"mosquitto.local:8883\"\nusername = \"agent\"\npassword_file = \"pw\"\ntls_ca_file = \"ca.pem\"\ntls_cert_file = \"c.pem\"\ntls_key_file = \"k.pem\"\n",
        )
        .unwrap();
        assert_eq!(
            c.mode,
            MqttMode::External(ExternalBroker {
                address: "mosquitto.local:8883".into(),
                tls: Some(MqttTls {
                    ca_file: "/etc/e/ca.pem".into(),
                    client_cert: Some(("/etc/e/c.pem".into(), "/etc/e/k.pem".into())),
                }),
            })
        );
        assert_eq!(c.password, Some(MqttPassword::File("/etc/e/pw".into())));
        assert_eq!(
            format!("{:?}", MqttPassword::Inline("x".into())),
            "Inline(<redacted>)"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let errs = parse(
            "[mqtt]\nmode = \"external\"\nlisten = \"127.0.0.1:1\"\npassword = \"p\"\ntls_cert_file = \"c\"\nsegment_count = 0\nbogus = 1\n",
        )
        .unwrap_err();
        let line = |n: usize| BASE.lines().count() + n;
        let has = |l: usize, needle: &str| {
            errs.iter()
                .any(|(el, m)| *el == Some(line(l)) && m.contains(needle))
        };
        assert!(has(1, "missing required field \"broker\""), "{errs:#?}");
        assert!(
            has(3, "listen applies only to mode = \"embedded\""),
            "{errs:#?}"
        );
        assert!(has(4, "needs a username"), "{errs:#?}");
        assert!(has(5, "tls_cert_file needs tls_ca_file"), "{errs:#?}");
        assert!(has(6, "segment_count applies only"), "{errs:#?}");
        assert!(has(7, "bogus"), "{errs:#?}");
        let errs = parse("[mqtt]\nmode = \"cloud\"\nlisten = \"nowhere\"\nclient_id = \"a/b\"\nkeepalive_ms = 10\n")
            .unwrap_err();
        for needle in ["is not one of", "client_id \"a/b\"", "keepalive_ms is 10"] {
            assert!(
                errs.iter().any(|(_, m)| m.contains(needle)),
                "{needle}: {errs:#?}"
            );
        }
        let errs = parse("[mqtt]\nlisten = \"nowhere\"\n").unwrap_err();
        assert!(errs[0].1.contains("not an ip:port"), "{errs:#?}");
        assert!(parse("[mqtt]\nmode = \"off\"\n").unwrap().mode == MqttMode::Off);
        // The agent's client exists only with an external broker; with `off`, no field of
        // either mode does anything: errors, not settings that silently do nothing.
        for (mode, field) in [
            ("embedded", "client_id = \"a\""),
            ("embedded", "keepalive_ms = 30000"),
            ("embedded", "queue_capacity = 100"),
            ("off", "listen = \"127.0.0.1:1\""),
            ("off", "broker = \"b:1\""),
            ("off", "queue_capacity = 100"),
            ("off", "max_packet_bytes = 4096"),
        ] {
            let errs = parse(&format!("[mqtt]\nmode = {mode:?}\n{field}\n")).unwrap_err();
            let key = field.split(' ').next().unwrap();
            assert!(
                errs.iter().any(|(l, m)| *l == Some(line(3))
                    && (m.contains(&format!("{key} applies only to mode"))
                        || m.contains(&format!("{key} has no effect with mode = \"off\"")))),
                "{mode} {field}: {errs:#?}"
            );
        }
    }
}
