//! The guard: the only door of the embedded broker.
//!
//! rumqttd 0.20 can be taken down by one client (see `docs/mqtt.md`): two CONNECTs with a
//! client id holding `/`, `+`, `#` or `$`, or a CONNECT whose connection fails before its
//! CONNACK followed by another with the same id, panic its listener task while it holds a
//! mutex, and every later connection on that listener panics too (the broker stays up but
//! accepts nobody until the process restarts). Its router also keeps a log per subscription
//! filter and a cache entry per published topic forever. So apps never talk to rumqttd
//! directly: they talk to this guard, which
//!
//! - accepts at most `max_connections` clients at once (plus handshakes in progress, bounded the
//!   same way), and drops a connection that sends no CONNECT within `connect_timeout`;
//! - reads every packet a client sends (fixed header, remaining length at most
//!   `max_packet_bytes`), checks it is a well-formed MQTT 3.1.1 packet a client may send, and
//!   forwards it unchanged; anything else closes that connection only;
//! - answers an MQTT 5 (or 3.1) CONNECT with CONNACK "unacceptable protocol version";
//! - checks the username and password if the config sets them;
//! - rewrites the CONNECT it forwards: a fresh internal client id per connection (so rumqttd
//!   never sees an id twice and never sees an invalid one), a clean session, rumqttd's secret
//!   credentials, and keep-alive 0 replaced by 65535 s (rumqttd refuses 0); a client id that is
//!   connected already is taken over here (the older connection is closed), as MQTT requires;
//! - counts distinct topics published to and filters subscribed to (`max_topics`) and closes a
//!   connection that would exceed the budget; refuses shared subscriptions (`$share/...`);
//! - refuses publishes to the agent's own topics (`reserved`: results, documents, deltas,
//!   device and tunnel state, telemetry, outcomes) from every client (the agent publishes
//!   in-process, not through the guard, see [`broker`](super::broker)): such a PUBLISH closes the connection (MQTT 3.1.1 has no negative acknowledgement; closing is one
//!   of the two answers the spec allows, and the app notices), and a will on such a topic is
//!   refused at CONNECT with return code 5 "not authorized". So no local process can spoof
//!   the agent to the other apps;
//! - maps topics and filters that start with `$` (KubeEdge's `$hw/...`), which rumqttd 0.20
//!   refuses to subscribe to (it disconnects the client) and never matches, to `_$...` on the
//!   way in, and back on the way out (the PUBLISH packets rumqttd sends). Topics and filters a
//!   client writes with the prefix `_$` are refused, so the mapping cannot be forged.
//!
//! Broker-to-client packets are forwarded unchanged except for that mapping. The agent's own
//! messages do not come from rumqttd: the guard records the filters each SUBACK granted and
//! writes the agent's messages for them itself, between rumqttd's packets (see
//! [`direct`](super::direct)). No client is exempt from these rules: the agent itself is not a
//! client of the guard.
//!
//! Invariant: rumqttd's listener sees only connections from this guard, each carrying one
//! CONNECT that passed [`parse_connect`], with a client id it has never seen.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::direct::{Direct, Flushed};
use super::metrics;

/// Packet types (high nibble of the first byte).
const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const UNSUBSCRIBE: u8 = 10;
const PINGREQ: u8 = 12;
const DISCONNECT: u8 = 14;

/// CONNACK return codes of MQTT 3.1.1.
const RC_BAD_VERSION: u8 = 1;
const RC_ID_REJECTED: u8 = 2;
const RC_UNAVAILABLE: u8 = 3;
const RC_BAD_LOGIN: u8 = 4;
const RC_NOT_AUTHORIZED: u8 = 5;

/// SUBACK return code of a refused subscription.
const SUBACK_FAILURE: u8 = 0x80;

/// Most SUBSCRIBEs of one connection waiting for rumqttd's SUBACK.
const MAX_AWAITING_SUBACKS: usize = 256;

/// Longest topic or filter accepted, in bytes.
const MAX_TOPIC_BYTES: usize = 1024;
/// Longest client id accepted, in bytes (only the guard sees it).
const MAX_CLIENT_ID_BYTES: usize = 256;

/// Why a connection was closed by the guard.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GuardError {
    /// The socket failed or closed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The client sent no CONNECT in time, or rumqttd no CONNACK.
    #[error("timed out during the handshake")]
    Timeout,
    /// The client broke the protocol or the guard's rules.
    #[error("{0}")]
    Refused(String),
    /// The client asked for a protocol version other than 3.1.1.
    #[error("unsupported protocol level {0}")]
    Version(u8),
    /// The client published to (or set a will on) a topic only the agent may publish to.
    #[error("publish to the agent's topic {0:?} refused")]
    Reserved(String),
}

fn refused(why: impl Into<String>) -> GuardError {
    GuardError::Refused(why.into())
}

/// A CONNECT packet a client sent, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// The client's id (may be empty).
    pub client_id: String,
    /// Keep-alive in seconds.
    pub keep_alive: u16,
    /// The will: topic, payload, QoS, retain.
    pub will: Option<(String, Vec<u8>, u8, bool)>,
    /// User name, if given.
    pub username: Option<String>,
    /// Password, if given.
    pub password: Option<Vec<u8>>,
}

/// A cursor over a packet body that never reads past its end.
struct Body<'a> {
    buf: &'a [u8],
}

impl<'a> Body<'a> {
    fn u8(&mut self) -> Result<u8, GuardError> {
        let (&b, rest) = self
            .buf
            .split_first()
            .ok_or_else(|| refused("packet ends early"))?;
        self.buf = rest;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, GuardError> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }

    fn bytes(&mut self) -> Result<&'a [u8], GuardError> {
        let len = usize::from(self.u16()?);
        if self.buf.len() < len {
            return Err(refused("packet ends early"));
        }
        let (b, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(b)
    }

    fn string(&mut self) -> Result<&'a str, GuardError> {
        let b = self.bytes()?;
        let s = std::str::from_utf8(b).map_err(|_| refused("a string is not UTF-8"))?;
        if s.contains('\0') {
            return Err(refused("a string holds U+0000"));
        }
        Ok(s)
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Splits a whole packet into its first byte and body (the remaining-length bytes skipped).
fn split(packet: &[u8]) -> Result<(u8, &[u8]), GuardError> {
    let (&first, rest) = packet
        .split_first()
        .ok_or_else(|| refused("empty packet"))?;
    let mut i = 0;
    while i < rest.len() && rest[i] & 0x80 != 0 {
        i += 1;
    }
    let body = rest
        .get(i + 1..)
        .ok_or_else(|| refused("packet ends early"))?;
    Ok((first, body))
}

/// Parses and checks a CONNECT packet (whole, header included).
pub fn parse_connect(packet: &[u8]) -> Result<Connect, GuardError> {
    let (first, body) = split(packet)?;
    if first != CONNECT << 4 {
        return Err(refused("the first packet must be CONNECT"));
    }
    let mut b = Body { buf: body };
    let name = b.bytes()?;
    let level = b.u8()?;
    match (name, level) {
        (b"MQTT", 4) => {}
        (b"MQTT", l) | (b"MQIsdp", l) => return Err(GuardError::Version(l)),
        _ => return Err(refused("not an MQTT CONNECT")),
    }
    let flags = b.u8()?;
    if flags & 0x01 != 0 {
        return Err(refused("CONNECT reserved flag set"));
    }
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(refused("will QoS or retain without a will"));
    }
    if will_qos > 2 {
        return Err(refused("will QoS 3"));
    }
    if password_flag && !username_flag {
        return Err(refused("password without user name"));
    }
    let keep_alive = b.u16()?;
    let client_id = b.string()?.to_owned();
    if client_id.len() > MAX_CLIENT_ID_BYTES {
        return Err(refused("client id too long"));
    }
    let will = if will_flag {
        let topic = b.string()?.to_owned();
        check_topic(&topic)?;
        let payload = b.bytes()?.to_vec();
        Some((topic, payload, will_qos, will_retain))
    } else {
        None
    };
    let username = if username_flag {
        Some(b.string()?.to_owned())
    } else {
        None
    };
    let password = if password_flag {
        Some(b.bytes()?.to_vec())
    } else {
        None
    };
    if !b.is_empty() {
        return Err(refused("trailing bytes after CONNECT"));
    }
    Ok(Connect {
        client_id,
        keep_alive,
        will,
        username,
        password,
    })
}

/// Encodes `len` as an MQTT remaining length.
pub(super) fn put_len(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

/// Appends a 2-byte length and `b` (cut at 65,535 bytes).
pub(super) fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Lengths were read as u16 or are ours (short); saturate rather than panic.
    let len = u16::try_from(b.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&b[..usize::from(len)]);
}

/// The CONNECT the guard sends to rumqttd for `c`: internal id, clean session, internal
/// credentials, keep-alive 0 replaced by 65535.
pub fn upstream_connect(c: &Connect, internal_id: &str, user: &str, password: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    put_bytes(&mut body, b"MQTT");
    body.push(4);
    let mut flags = 0x02 | 0x80 | 0x40;
    if let Some((_, _, qos, retain)) = &c.will {
        flags |= 0x04 | (qos << 3);
        if *retain {
            flags |= 0x20;
        }
    }
    body.push(flags);
    let keep_alive = if c.keep_alive == 0 {
        u16::MAX
    } else {
        c.keep_alive
    };
    body.extend_from_slice(&keep_alive.to_be_bytes());
    put_bytes(&mut body, internal_id.as_bytes());
    if let Some((topic, payload, _, _)) = &c.will {
        put_bytes(&mut body, to_internal(topic).as_bytes());
        put_bytes(&mut body, payload);
    }
    put_bytes(&mut body, user.as_bytes());
    put_bytes(&mut body, password.as_bytes());
    let mut out = vec![CONNECT << 4];
    put_len(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// A CONNACK with return code `code`.
pub fn connack(code: u8) -> [u8; 4] {
    [CONNACK << 4, 2, 0, code]
}

/// Checks a topic name to publish to: 1 to 1024 bytes, no wildcards.
pub fn check_topic(t: &str) -> Result<(), GuardError> {
    if t.is_empty() || t.len() > MAX_TOPIC_BYTES {
        return Err(refused("topic must be 1 to 1024 bytes"));
    }
    if t.contains(['+', '#']) {
        return Err(refused("topic holds a wildcard"));
    }
    if t.starts_with(MAPPED) {
        return Err(refused("topics starting with _$ are reserved"));
    }
    Ok(())
}

/// Checks a subscription filter: 1 to 1024 bytes, `+` and `#` only as whole levels and `#`
/// only last, no shared subscriptions.
pub fn check_filter(f: &str) -> Result<(), GuardError> {
    if f.is_empty() || f.len() > MAX_TOPIC_BYTES {
        return Err(refused("filter must be 1 to 1024 bytes"));
    }
    if f.starts_with("$share/") {
        return Err(refused("shared subscriptions are not supported"));
    }
    if f.starts_with(MAPPED) {
        return Err(refused("filters starting with _$ are reserved"));
    }
    let levels: Vec<&str> = f.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let last = i + 1 == levels.len();
        match *level {
            "#" if last => {}
            "+" => {}
            l if l.contains(['+', '#']) => {
                return Err(refused("wildcard not alone in its level, or # not last"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether `topic` matches the subscription filter `filter` (MQTT 3.1.1 rules: `+` matches
/// one level, `#` the rest, the parent level included; a filter starting with a wildcard does
/// not match a topic starting with `$`).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether `topic` is one of the `reserved` filters' topics.
pub fn is_reserved(reserved: &[String], topic: &str) -> bool {
    reserved.iter().any(|f| topic_matches(f, topic))
}

/// The prefix rumqttd sees instead of `$`.
const MAPPED: &str = "_$";

/// A client's topic or filter as rumqttd sees it: `$x` becomes `_$x`.
pub fn to_internal(t: &str) -> std::borrow::Cow<'_, str> {
    if t.starts_with('$') {
        std::borrow::Cow::Owned(format!("_{t}"))
    } else {
        std::borrow::Cow::Borrowed(t)
    }
}

/// A topic rumqttd sends, as the client knows it: `_$x` becomes `$x`.
pub fn to_external(t: &str) -> &str {
    if t.starts_with(MAPPED) { &t[1..] } else { t }
}

/// Encodes a packet from its first byte and body.
fn encode(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(first);
    put_len(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// Maps the topic or filters of a checked client packet for rumqttd (the packet unchanged when
/// nothing needs mapping).
pub fn map_client_packet(packet: Vec<u8>) -> Result<Vec<u8>, GuardError> {
    let (first, body) = split(&packet)?;
    let kind = first >> 4;
    let mut b = Body { buf: body };
    match kind {
        PUBLISH => {
            let topic = b.string()?;
            if !topic.starts_with('$') {
                return Ok(packet);
            }
            let mut out = Vec::with_capacity(body.len() + 1);
            put_bytes(&mut out, to_internal(topic).as_bytes());
            out.extend_from_slice(b.buf);
            Ok(encode(first, &out))
        }
        SUBSCRIBE | UNSUBSCRIBE => {
            let id = b.u16()?;
            let mut out = id.to_be_bytes().to_vec();
            let mut mapped = false;
            while !b.is_empty() {
                let f = b.string()?;
                mapped |= f.starts_with('$');
                put_bytes(&mut out, to_internal(f).as_bytes());
                if kind == SUBSCRIBE {
                    out.push(b.u8()?);
                }
            }
            if mapped {
                Ok(encode(first, &out))
            } else {
                Ok(packet)
            }
        }
        _ => Ok(packet),
    }
}

/// Maps the topic of a PUBLISH rumqttd sends back to the client's form (other packets
/// unchanged).
pub fn map_broker_packet(packet: Vec<u8>) -> Result<Vec<u8>, GuardError> {
    let (first, body) = split(&packet)?;
    if first >> 4 != PUBLISH {
        return Ok(packet);
    }
    let mut b = Body { buf: body };
    let topic = b.string()?;
    if !topic.starts_with(MAPPED) {
        return Ok(packet);
    }
    let mut out = Vec::with_capacity(body.len());
    put_bytes(&mut out, to_external(topic).as_bytes());
    out.extend_from_slice(b.buf);
    Ok(encode(first, &out))
}

/// What a client packet does that the guard must account for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// Forward it.
    Forward,
    /// A PUBLISH to this topic: forward it if the client may publish there (the topic counts
    /// against the budget).
    Publish(String),
    /// A SUBSCRIBE with this packet id: forward it; it uses these filters (each counts
    /// against the budget).
    Subscribe(u16, Vec<String>),
    /// An UNSUBSCRIBE of these filters: forward it.
    Unsubscribe(Vec<String>),
    /// Forward it, then stop reading (DISCONNECT).
    Last,
}

/// Checks one packet a connected client sent (whole, header included).
pub fn check_packet(packet: &[u8]) -> Result<Checked, GuardError> {
    let (first, body) = split(packet)?;
    let kind = first >> 4;
    let flags = first & 0x0f;
    let mut b = Body { buf: body };
    match kind {
        PUBLISH => {
            let qos = (flags >> 1) & 0x03;
            if qos == 3 {
                return Err(refused("PUBLISH with QoS 3"));
            }
            if qos == 0 && flags & 0x08 != 0 {
                return Err(refused("DUP set on a QoS 0 PUBLISH"));
            }
            let topic = b.string()?;
            check_topic(topic)?;
            if qos > 0 && b.u16()? == 0 {
                return Err(refused("packet id 0"));
            }
            Ok(Checked::Publish(topic.to_owned()))
        }
        PUBACK | PUBREC | PUBCOMP | PUBREL => {
            let want = if kind == PUBREL { 2 } else { 0 };
            if flags != want || body.len() != 2 {
                return Err(refused("malformed acknowledgement"));
            }
            Ok(Checked::Forward)
        }
        SUBSCRIBE | UNSUBSCRIBE => {
            if flags != 2 {
                return Err(refused("SUBSCRIBE/UNSUBSCRIBE flags must be 2"));
            }
            let id = b.u16()?;
            if id == 0 {
                return Err(refused("packet id 0"));
            }
            let mut filters = Vec::new();
            while !b.is_empty() {
                let f = b.string()?;
                check_filter(f)?;
                if kind == SUBSCRIBE && b.u8()? > 2 {
                    return Err(refused("SUBSCRIBE with QoS above 2"));
                }
                filters.push(f.to_owned());
            }
            if filters.is_empty() {
                return Err(refused("SUBSCRIBE/UNSUBSCRIBE without a filter"));
            }
            if kind == UNSUBSCRIBE {
                return Ok(Checked::Unsubscribe(filters));
            }
            Ok(Checked::Subscribe(id, filters))
        }
        PINGREQ if flags == 0 && body.is_empty() => Ok(Checked::Forward),
        DISCONNECT if flags == 0 && body.is_empty() => Ok(Checked::Last),
        CONNECT => Err(refused("a second CONNECT")),
        _ => Err(refused(format!("packet type {kind} with flags {flags:#x}"))),
    }
}

/// Reads one whole packet (header included) of at most `max` bytes of remaining length.
/// `Ok(None)` at a clean end of stream before a packet starts.
pub async fn read_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, GuardError> {
    let mut first = [0u8; 1];
    if r.read(&mut first).await? == 0 {
        return Ok(None);
    }
    let mut header = vec![first[0]];
    let mut len: usize = 0;
    let mut shift = 0;
    loop {
        let byte = r.read_u8().await?;
        header.push(byte);
        len |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err(refused("remaining length longer than 4 bytes"));
        }
    }
    if len > max {
        return Err(refused(format!(
            "packet of {len} bytes exceeds max_packet_bytes ({max})"
        )));
    }
    let start = header.len();
    header.resize(start + len, 0);
    r.read_exact(&mut header[start..]).await?;
    Ok(Some(header))
}

/// Most bytes of broker-to-client packets gathered into one write (also the size of the read
/// buffer on rumqttd's side of a connection).
const COALESCE_BYTES: usize = 16 * 1024;

/// Takes the packet at the start of `buf` (header included) once it is there in full, of at
/// most `max` bytes of remaining length; `Ok(None)` while it is still arriving.
fn take_packet(buf: &mut bytes::BytesMut, max: usize) -> Result<Option<Vec<u8>>, GuardError> {
    let mut len: usize = 0;
    for i in 1..=4 {
        let Some(&byte) = buf.get(i) else {
            return Ok(None);
        };
        len |= usize::from(byte & 0x7f) << (7 * (i - 1));
        if byte & 0x80 != 0 {
            continue;
        }
        if len > max {
            return Err(refused(format!(
                "packet of {len} bytes exceeds max_packet_bytes ({max})"
            )));
        }
        let whole = i + 1 + len;
        if buf.len() < whole {
            buf.reserve(whole - buf.len());
            return Ok(None);
        }
        return Ok(Some(buf.split_to(whole).to_vec()));
    }
    Err(refused("remaining length longer than 4 bytes"))
}

/// The packet id and return codes of a SUBACK (`None` for any other packet).
fn parse_suback(packet: &[u8]) -> Option<(u16, Vec<u8>)> {
    let (first, body) = split(packet).ok()?;
    if first != SUBACK << 4 || body.len() < 2 {
        return None;
    }
    Some((u16::from_be_bytes([body[0], body[1]]), body[2..].to_vec()))
}

/// Whether `buf` starts with a whole packet (then it is taken before waiting again).
fn take_ready(buf: &[u8]) -> bool {
    for i in 1..=4 {
        let Some(&byte) = buf.get(i) else {
            return false;
        };
        if byte & 0x80 == 0 {
            let mut len = 0usize;
            for (k, b) in buf[1..=i].iter().enumerate() {
                len |= usize::from(b & 0x7f) << (7 * k);
            }
            return buf.len() >= i + 1 + len;
        }
    }
    // A length field of five bytes: `take_packet` refuses it.
    true
}

/// Drops a connection's registration for the agent's messages when the connection ends.
struct Detach<'a>(&'a Direct, u64);

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        self.0.detach(self.1);
    }
}

/// Asks the kernel to acknowledge what arrives on `sock` at once (Linux `TCP_QUICKACK`; a
/// no-op elsewhere). Best effort: a failure only costs latency.
fn quick_ack(sock: &tokio::net::tcp::OwnedReadHalf) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let tcp: &TcpStream = sock.as_ref();
        let _ = socket2::SockRef::from(tcp).set_tcp_quickack(true);
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = sock;
}

/// The guard's settings.
#[derive(Debug, Clone)]
pub struct GuardConfig {
    /// rumqttd's internal listener.
    pub upstream: SocketAddr,
    /// rumqttd's secret credentials.
    pub upstream_login: (String, String),
    /// Credentials every other client must present, if any.
    pub client_login: Option<(String, Vec<u8>)>,
    /// Most client connections at once.
    pub max_connections: usize,
    /// Largest packet (remaining length), bytes.
    pub max_packet_bytes: usize,
    /// Time for the CONNECT to arrive and rumqttd's CONNACK to come back.
    pub connect_timeout: Duration,
    /// Most distinct topics and filters used by clients.
    pub max_topics: usize,
    /// Filters of the topics only the agent may publish to.
    pub reserved: Vec<String>,
    /// The agent's messages and the subscriptions they go to.
    pub direct: Arc<Direct>,
}

/// State shared by the guard's connections.
struct Shared {
    cfg: GuardConfig,
    handshakes: Arc<Semaphore>,
    sessions: Arc<Semaphore>,
    topics: Mutex<HashSet<String>>,
    /// Live connections by client id: (connection number, token that closes it).
    live: Mutex<HashMap<String, (u64, CancellationToken)>>,
    next_id: AtomicU64,
}

impl Shared {
    /// Whether all of `names` fit the topic budget (counting them if so).
    fn admit(&self, names: &[String]) -> bool {
        let mut set = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
        let new = names.iter().filter(|n| !set.contains(*n)).count();
        if set.len() + new > self.cfg.max_topics {
            return false;
        }
        for n in names {
            if !set.contains(n) {
                set.insert(n.clone());
            }
        }
        true
    }
}

/// Runs the guard on `listener` until `cancel`.
pub async fn run(listener: TcpListener, cfg: GuardConfig, cancel: CancellationToken) {
    let shared = Arc::new(Shared {
        handshakes: Arc::new(Semaphore::new(cfg.max_connections)),
        sessions: Arc::new(Semaphore::new(cfg.max_connections)),
        topics: Mutex::new(HashSet::new()),
        live: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        cfg,
    });
    loop {
        tokio::select! {
            // Shutdown; cancellation-safe.
            () = cancel.cancelled() => return,
            // A new TCP connection; `accept` is cancellation-safe.
            r = listener.accept() => {
                let (sock, peer) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off briefly instead of
                        // spinning.
                        tracing::warn!(error = %e, "mqtt guard: accept failed");
                        metrics::refused("accept_error");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = shared.handshakes.clone().try_acquire_owned() else {
                    metrics::refused("too_many_handshakes");
                    drop(sock);
                    continue;
                };
                let shared = shared.clone();
                let cancel = cancel.clone();
                tokio::spawn(async move {
                    let n = shared.next_id.fetch_add(1, Ordering::Relaxed);
                    match connection(sock, n, &shared, permit, &cancel).await {
                        Ok(()) => tracing::debug!(%peer, conn = n, "mqtt guard: connection closed"),
                        Err(e @ GuardError::Reserved(_)) => {
                            // Worth an operator's attention: an app tried to speak for the agent.
                            tracing::warn!(%peer, conn = n, error = %e, "mqtt guard: connection closed");
                            metrics::refused("reserved_topic");
                        }
                        Err(e) => {
                            tracing::debug!(%peer, conn = n, error = %e, "mqtt guard: connection closed");
                            metrics::refused(match e {
                                GuardError::Io(_) => "io",
                                GuardError::Timeout => "timeout",
                                GuardError::Refused(_) => "protocol",
                                GuardError::Version(_) => "version",
                                GuardError::Reserved(_) => "reserved_topic",
                            });
                        }
                    }
                });
            }
        }
    }
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves one client connection.
async fn connection(
    sock: TcpStream,
    n: u64,
    shared: &Shared,
    handshake: tokio::sync::OwnedSemaphorePermit,
    cancel: &CancellationToken,
) -> Result<(), GuardError> {
    let cfg = &shared.cfg;
    let _ = sock.set_nodelay(true);
    let (client_r, mut client_w) = sock.into_split();
    let mut client_r = BufReader::new(client_r);

    let first = tokio::time::timeout(
        cfg.connect_timeout,
        read_packet(&mut client_r, cfg.max_packet_bytes),
    )
    .await
    .map_err(|_| GuardError::Timeout)??
    .ok_or_else(|| refused("closed before CONNECT"))?;
    let connect = match parse_connect(&first) {
        Ok(c) => c,
        Err(e @ GuardError::Version(_)) => {
            let _ = client_w.write_all(&connack(RC_BAD_VERSION)).await;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    if let Some((user, pass)) = &cfg.client_login {
        let ok = connect.username.as_deref() == Some(user.as_str())
            && connect.password.as_deref().is_some_and(|p| same(p, pass));
        if !ok {
            let _ = client_w.write_all(&connack(RC_BAD_LOGIN)).await;
            return Err(refused("bad user name or password"));
        }
    }
    let Ok(_session) = shared.sessions.clone().try_acquire_owned() else {
        let _ = client_w.write_all(&connack(RC_UNAVAILABLE)).await;
        return Err(refused("too many connections"));
    };
    if let Some((topic, ..)) = &connect.will
        && is_reserved(&cfg.reserved, topic)
    {
        let _ = client_w.write_all(&connack(RC_NOT_AUTHORIZED)).await;
        return Err(GuardError::Reserved(topic.clone()));
    }
    if let Some((topic, ..)) = &connect.will
        && !shared.admit(std::slice::from_ref(topic))
    {
        let _ = client_w.write_all(&connack(RC_ID_REJECTED)).await;
        return Err(refused("topic budget exhausted (will topic)"));
    }
    drop(handshake);

    // rumqttd, with a fresh internal id.
    let internal_id = format!("g{n}");
    let (up_user, up_pass) = &cfg.upstream_login;
    let up = tokio::time::timeout(cfg.connect_timeout, async {
        let mut up = TcpStream::connect(cfg.upstream).await?;
        let _ = up.set_nodelay(true);
        up.write_all(&upstream_connect(&connect, &internal_id, up_user, up_pass))
            .await?;
        let ack = read_packet(&mut up, 16).await?;
        Ok::<_, GuardError>((up, ack))
    })
    .await
    .map_err(|_| GuardError::Timeout)?;
    let (up, ack) = match up {
        Ok(x) => x,
        Err(e) => {
            let _ = client_w.write_all(&connack(RC_UNAVAILABLE)).await;
            return Err(e);
        }
    };
    let Some(ack) = ack else {
        let _ = client_w.write_all(&connack(RC_UNAVAILABLE)).await;
        return Err(refused("the broker closed the connection during CONNECT"));
    };
    client_w.write_all(&ack).await?;
    if ack.get(3) != Some(&0) {
        return Err(refused("the broker refused the CONNECT"));
    }

    // Take over an older connection with the same client id.
    let takeover = CancellationToken::new();
    if !connect.client_id.is_empty() {
        let old = shared
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(connect.client_id.clone(), (n, takeover.clone()));
        if let Some((_, old)) = old {
            old.cancel();
        }
    }
    metrics::connection(1);
    // From here on everything for the app goes through `queue`: rumqttd's packets from this
    // task, the agent's own messages from the bus (written by the bus's thread when the
    // socket takes them at once).
    let queue = cfg.direct.attach(n, client_w);
    let _detach = Detach(&cfg.direct, n);
    // SUBSCRIBEs rumqttd has not acknowledged yet: (packet id, filters), oldest first.
    let awaiting: Mutex<VecDeque<(u16, Vec<String>)>> = Mutex::new(VecDeque::new());
    let (mut up_r, mut up_w) = up.into_split();
    let result = tokio::select! {
        // Client to broker, packet by packet, checked. Not cancellation-safe (a packet may be
        // half read), which is fine: every other arm ends the connection.
        r = async {
            loop {
                let Some(packet) = read_packet(&mut client_r, cfg.max_packet_bytes).await? else {
                    return Ok(());
                };
                match check_packet(&packet)? {
                    Checked::Forward => {}
                    Checked::Last => {
                        up_w.write_all(&packet).await?;
                        return Ok(());
                    }
                    Checked::Publish(topic) => {
                        if is_reserved(&cfg.reserved, &topic) {
                            return Err(GuardError::Reserved(topic));
                        }
                        if !shared.admit(std::slice::from_ref(&topic)) {
                            return Err(refused("topic budget exhausted (max_topics)"));
                        }
                    }
                    Checked::Subscribe(id, filters) => {
                        if !shared.admit(&filters) {
                            return Err(refused("topic budget exhausted (max_topics)"));
                        }
                        let mut awaiting = awaiting.lock().unwrap_or_else(PoisonError::into_inner);
                        if awaiting.len() >= MAX_AWAITING_SUBACKS {
                            return Err(refused("too many SUBSCRIBEs awaiting their SUBACK"));
                        }
                        awaiting.push_back((id, filters));
                    }
                    Checked::Unsubscribe(filters) => cfg.direct.unsubscribe(n, &filters),
                }
                up_w.write_all(&map_client_packet(packet)?).await?;
            }
        } => r,
        // To the client: rumqttd's packets (PUBLISH topics mapped back) and what the socket
        // could not take at once of the agent's messages. Cancellation-safe waits only.
        r = async {
            let mut buf = bytes::BytesMut::with_capacity(COALESCE_BYTES);
            let mut out = Vec::new();
            loop {
                // rumqttd's packets are bounded by max_payload_size plus a header.
                while let Some(packet) = take_packet(&mut buf, cfg.max_packet_bytes + 4096)? {
                    if let Some((id, codes)) = parse_suback(&packet) {
                        // The filters rumqttd accepted now receive the agent's messages too.
                        let mut awaiting = awaiting.lock().unwrap_or_else(PoisonError::into_inner);
                        if let Some(i) = awaiting.iter().position(|(pid, _)| *pid == id)
                            && let Some((_, filters)) = awaiting.remove(i)
                            && filters.len() == codes.len()
                        {
                            let granted: Vec<String> = filters
                                .into_iter()
                                .zip(codes)
                                .filter(|(_, c)| *c != SUBACK_FAILURE)
                                .map(|(f, _)| f)
                                .collect();
                            cfg.direct.subscribe(n, &granted);
                        }
                    }
                    out.extend_from_slice(&map_broker_packet(packet)?);
                    if out.len() >= COALESCE_BYTES {
                        break;
                    }
                }
                // A round of rumqttd's packets in one write when they are all here.
                let flushed = if out.is_empty() {
                    queue.flush()?
                } else {
                    queue.push_broker(bytes::Bytes::from(std::mem::take(&mut out)))?
                };
                if take_ready(&buf) {
                    continue;
                }
                let waiting = flushed == Flushed::Waiting;
                tokio::select! {
                    // All cancellation-safe. rumqttd's packets are read on only while few of
                    // them wait for a slow app (so rumqttd sees the app's pace).
                    r = up_r.read_buf(&mut buf), if !waiting || queue.pinned() < COALESCE_BYTES => {
                        if r? == 0 {
                            return Ok(());
                        }
                        // rumqttd leaves Nagle's algorithm on for the sockets it accepts, so
                        // when it sends packets back to back the second waits for our ACK,
                        // which the kernel delays up to 40 ms. Acknowledge at once instead
                        // (quick-ack mode does not stick, so it is set again after every read).
                        quick_ack(&up_r);
                    }
                    // The socket takes more.
                    r = queue.writable(), if waiting => r?,
                    // The bus queued something the socket could not take at once.
                    () = queue.ready(), if !waiting => {}
                }
            }
        } => r,
        // A newer connection with the same client id took over.
        () = takeover.cancelled() => Err(refused("taken over by a newer connection with the same client id")),
        // Shutdown.
        () = cancel.cancelled() => Ok(()),
    };
    metrics::connection(-1);
    if !connect.client_id.is_empty() {
        let mut live = shared.live.lock().unwrap_or_else(PoisonError::into_inner);
        if live.get(&connect.client_id).is_some_and(|(m, _)| *m == n) {
            live.remove(&connect.client_id);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn connect_packet(level: u8, flags: u8, keep_alive: u16, id: &str, rest: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        put_bytes(&mut body, b"MQTT");
        body.push(level);
        body.push(flags);
        body.extend_from_slice(&keep_alive.to_be_bytes());
        put_bytes(&mut body, id.as_bytes());
        body.extend_from_slice(rest);
        let mut p = vec![0x10];
        put_len(&mut p, body.len());
        p.extend(body);
        p
    }

    #[test]
    fn connect_round_trips_through_the_rewrite() {
        let mut rest = Vec::new();
        put_bytes(&mut rest, b"will/t");
        put_bytes(&mut rest, b"bye");
        put_bytes(&mut rest, b"user");
        put_bytes(&mut rest, b"pw");
        let p = connect_packet(4, 0x80 | 0x40 | 0x04 | 0x08, 0, "a/b", &rest);
        let c = parse_connect(&p).unwrap();
        assert_eq!(c.client_id, "a/b");
        assert_eq!(c.will, Some(("will/t".into(), b"bye".to_vec(), 1, false)));
        assert_eq!(c.username.as_deref(), Some("user"));
        let up = upstream_connect(&c, "g7", "u", "p");
        let back = parse_connect(&up).unwrap();
        assert_eq!(back.client_id, "g7");
        assert_eq!(back.keep_alive, u16::MAX);
        assert_eq!(back.will, c.will);
        assert_eq!(back.username.as_deref(), Some("u"));
        assert_eq!(back.password.as_deref(), Some(&b"p"[..]));
    }

    #[test]
    fn bad_connects_are_refused() {
        assert!(matches!(
            parse_connect(&connect_packet(5, 2, 60, "x", &[0])),
            Err(GuardError::Version(5))
        ));
        assert!(parse_connect(&connect_packet(4, 3, 60, "x", &[])).is_err()); // reserved bit
        assert!(parse_connect(&connect_packet(4, 0x40, 60, "x", &[])).is_err()); // pw, no user
        assert!(parse_connect(&connect_packet(4, 2, 60, "x", &[1])).is_err()); // trailing
        assert!(parse_connect(&[0x10, 3, 0, 4, b'M']).is_err());
        assert!(parse_connect(&[0x30, 0]).is_err());
        assert!(parse_connect(&[]).is_err());
    }

    #[test]
    fn packets_are_checked() {
        let mut publish = vec![0x30, 5];
        put_bytes(&mut publish, b"a/b");
        assert_eq!(
            check_packet(&publish).unwrap(),
            Checked::Publish("a/b".into())
        );
        let mut wild = vec![0x30, 5];
        put_bytes(&mut wild, b"a/+");
        assert!(check_packet(&wild).is_err());
        assert!(check_packet(&[0x36, 0]).is_err()); // QoS 3
        assert!(check_packet(&[0x40, 2, 0, 1]).is_ok());
        assert!(check_packet(&[0x62, 2, 0, 1]).is_ok());
        assert!(check_packet(&[0x60, 2, 0, 1]).is_err()); // PUBREL flags
        assert_eq!(check_packet(&[0xc0, 0]).unwrap(), Checked::Forward);
        assert_eq!(check_packet(&[0xe0, 0]).unwrap(), Checked::Last);
        assert!(check_packet(&[0x20, 2, 0, 0]).is_err()); // CONNACK from a client
        let mut sub = vec![0x82, 0, 0, 1];
        put_bytes(&mut sub, b"$hw/events/device/+/twin/#");
        sub.push(1);
        sub[1] = (sub.len() - 2) as u8;
        assert!(matches!(
            check_packet(&sub).unwrap(),
            Checked::Subscribe(1, _)
        ));
        for bad in ["a/#/b", "a+", "$share/g/a", ""] {
            assert!(check_filter(bad).is_err(), "{bad}");
        }
        for good in ["#", "+/+", "a/+/c/#", "$hw/events/device/+/twin/update"] {
            assert!(check_filter(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn dollar_topics_are_mapped_both_ways() {
        let mut body = Vec::new();
        put_bytes(&mut body, b"$hw/events/device/d/twin/get");
        body.extend_from_slice(b"{}");
        let publish = encode(0x30, &body);
        let internal = map_client_packet(publish.clone()).unwrap();
        let (_, ib) = split(&internal).unwrap();
        assert_eq!(
            Body { buf: ib }.string().unwrap(),
            "_$hw/events/device/d/twin/get"
        );
        assert_eq!(map_broker_packet(internal).unwrap(), publish);
        let mut sub = vec![0, 7];
        put_bytes(&mut sub, b"$hw/events/device/+/twin/#");
        sub.push(1);
        put_bytes(&mut sub, b"plain/#");
        sub.push(0);
        let mapped = map_client_packet(encode(0x82, &sub)).unwrap();
        let (_, mb) = split(&mapped).unwrap();
        let mut b = Body { buf: mb };
        assert_eq!(b.u16().unwrap(), 7);
        assert_eq!(b.string().unwrap(), "_$hw/events/device/+/twin/#");
        assert_eq!(b.u8().unwrap(), 1);
        assert_eq!(b.string().unwrap(), "plain/#");
        // Plain topics pass untouched; the reserved prefix cannot be written by a client.
        let mut plain = Vec::new();
        put_bytes(&mut plain, b"a/b");
        let p = encode(0x30, &plain);
        assert_eq!(map_client_packet(p.clone()).unwrap(), p);
        assert!(check_topic("_$hw/x").is_err());
        assert!(check_filter("_$hw/#").is_err());
    }

    #[test]
    fn topics_match_filters() {
        for (filter, topic) in [
            ("a/b", "a/b"),
            ("a/+", "a/b"),
            ("a/#", "a/b/c"),
            ("a/#", "a"),
            ("#", "a/b"),
            ("+/+", "a/b"),
            (
                "$hw/events/device/+/twin/update/result",
                "$hw/events/device/d/twin/update/result",
            ),
            ("edgesync/#", "edgesync/gw-1/plc-1"),
            ("a//c", "a//c"),
        ] {
            assert!(topic_matches(filter, topic), "{filter} ~ {topic}");
        }
        for (filter, topic) in [
            ("a/b", "a/b/c"),
            ("a/+", "a/b/c"),
            ("a/+", "a"),
            ("#", "$hw/x"),
            ("+/x", "$hw/x"),
            (
                "$hw/events/device/+/twin/update/result",
                "$hw/events/device/d/twin/update",
            ),
            ("edgesync/#", "edgesyncx/a"),
        ] {
            assert!(!topic_matches(filter, topic), "{filter} !~ {topic}");
        }
        let reserved = vec!["edgesync/#".to_owned(), "$hw/events/connected/+".to_owned()];
        assert!(is_reserved(&reserved, "edgesync/gw-1/plc-1/applied"));
        assert!(is_reserved(&reserved, "$hw/events/connected/gw-1"));
        assert!(!is_reserved(&reserved, "$hw/events/device/d/twin/update"));
    }

    /// A guard in front of a fake upstream that accepts every CONNECT and records what it
    /// receives after it; it answers a SUBSCRIBE with a SUBACK (refusing filters that start
    /// with `refuse/`, never answering one with a filter under `mute/`) and sends a PUBLISH
    /// to `echo/...` back.
    async fn guard_with_fake_upstream(
        reserved: Vec<String>,
    ) -> (
        SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
        CancellationToken,
        Arc<Direct>,
    ) {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = upstream.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    if read_packet(&mut s, 1 << 16).await.ok().flatten().is_none() {
                        return;
                    }
                    let _ = s.write_all(&connack(0)).await;
                    while let Ok(Some(p)) = read_packet(&mut s, 1 << 16).await {
                        if p[0] == SUBSCRIBE << 4 | 2 {
                            // Not `check_packet`: mapped filters (`_$...`) are fine here.
                            let (_, body) = split(&p).unwrap();
                            let mut b = Body { buf: body };
                            let mut ack = b.u16().unwrap().to_be_bytes().to_vec();
                            let mut mute = false;
                            while !b.is_empty() {
                                let f = b.string().unwrap();
                                mute |= f.starts_with("mute/");
                                ack.push(if f.starts_with("refuse/") { 0x80 } else { 0 });
                                b.u8().unwrap();
                            }
                            if !mute {
                                let _ = s.write_all(&encode(SUBACK << 4, &ack)).await;
                            }
                        }
                        if let Ok(Checked::Publish(t)) = check_packet(&p)
                            && t.starts_with("echo/")
                        {
                            let _ = s.write_all(&p).await;
                        }
                        let _ = tx.send(p);
                    }
                });
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let cfg = GuardConfig {
            upstream: up_addr,
            upstream_login: ("up".into(), "up-secret".into()),
            client_login: None,
            max_connections: 8,
            max_packet_bytes: 4096,
            connect_timeout: Duration::from_secs(2),
            max_topics: 64,
            reserved,
            direct: Direct::new(1024),
        };
        let direct = cfg.direct.clone();
        tokio::spawn(run(listener, cfg, cancel.clone()));
        (addr, rx, cancel, direct)
    }

    fn publish_packet(topic: &str, payload: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        put_bytes(&mut body, topic.as_bytes());
        body.extend_from_slice(payload);
        encode(0x30, &body)
    }

    /// Connects an app through the guard (CONNACK 0 checked).
    async fn connected_app(addr: SocketAddr, id: &str) -> TcpStream {
        let mut app = TcpStream::connect(addr).await.unwrap();
        app.write_all(&connect_packet(4, 0x02, 60, id, &[]))
            .await
            .unwrap();
        let mut ack = [0u8; 4];
        app.read_exact(&mut ack).await.unwrap();
        assert_eq!(ack, connack(0));
        app
    }

    /// Connects an app through the guard and subscribes it to `filters` (packet id 1);
    /// returns the socket and the SUBACK's return codes.
    async fn subscribed_app(addr: SocketAddr, id: &str, filters: &[&str]) -> (TcpStream, Vec<u8>) {
        let mut app = connected_app(addr, id).await;
        let mut body = vec![0, 1];
        for f in filters {
            put_bytes(&mut body, f.as_bytes());
            body.push(0);
        }
        app.write_all(&encode(0x82, &body)).await.unwrap();
        let suback = next(&mut app).await;
        let (id, codes) = parse_suback(&suback).unwrap();
        assert_eq!(id, 1);
        (app, codes)
    }

    /// The next packet the app receives, within 2 s.
    async fn next(app: &mut TcpStream) -> Vec<u8> {
        tokio::time::timeout(Duration::from_secs(2), read_packet(app, 1 << 20))
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    }

    /// Publishes through `direct` until `want` connections get it (2 s at most).
    async fn publish_until(direct: &Direct, topic: &str, want: usize) {
        for _ in 0..200 {
            if direct.publish(topic, b"x") == super::super::direct::Delivery::Queued(want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{topic} never reached {want} connections");
    }

    #[tokio::test]
    async fn the_agents_messages_go_to_the_subscriptions_rumqttd_granted() {
        let (addr, _upstream, cancel, direct) =
            guard_with_fake_upstream(vec!["edgesync/#".to_owned()]).await;
        use super::super::direct::Delivery;
        // Nobody subscribed yet: nothing is encoded or queued.
        assert_eq!(direct.publish("edgesync/n/d", b"{}"), Delivery::Queued(0));
        let (mut app, codes) = subscribed_app(
            addr,
            "app",
            &["edgesync/#", "refuse/x", "$hw/events/connected/+"],
        )
        .await;
        assert_eq!(codes, vec![0, 0x80, 0]);
        // Granted as soon as the SUBACK reached the app; the refused filter gets nothing.
        assert_eq!(direct.publish("edgesync/n/d", b"{}"), Delivery::Queued(1));
        assert_eq!(direct.publish("refuse/x", b"no"), Delivery::Queued(0));
        assert_eq!(
            direct.publish("$hw/events/connected/n", b"up"),
            Delivery::Queued(1)
        );
        assert_eq!(next(&mut app).await, publish_packet("edgesync/n/d", b"{}"));
        assert_eq!(
            next(&mut app).await,
            publish_packet("$hw/events/connected/n", b"up")
        );
        // rumqttd's packets and the agent's, interleaved on one socket, arrive whole.
        for i in 0..200u32 {
            app.write_all(&publish_packet("echo/a", &i.to_be_bytes()))
                .await
                .unwrap();
            assert_eq!(
                direct.publish("edgesync/n/d", &i.to_be_bytes()),
                Delivery::Queued(1)
            );
            // Let the guard's tasks run (this test's runtime has one thread): the app's
            // queue holds 1 KiB only.
            tokio::task::yield_now().await;
        }
        let (mut echoed, mut direct_got) = (0u32, 0u32);
        while echoed + direct_got < 400 {
            let p = next(&mut app).await;
            if p == publish_packet("echo/a", &echoed.to_be_bytes()) {
                echoed += 1;
            } else {
                assert_eq!(
                    p,
                    publish_packet("edgesync/n/d", &direct_got.to_be_bytes()),
                    "each source in order"
                );
                direct_got += 1;
            }
        }
        // UNSUBSCRIBE stops the agent's messages.
        let mut body = vec![0, 2];
        put_bytes(&mut body, b"edgesync/#");
        app.write_all(&encode(0xa2, &body)).await.unwrap();
        publish_until(&direct, "edgesync/n/d", 0).await;
        assert_eq!(
            direct.publish("$hw/events/connected/n", b"up"),
            Delivery::Queued(1)
        );
        // The connection ends: so does its registration.
        drop(app);
        publish_until(&direct, "$hw/events/connected/n", 0).await;
        cancel.cancel();
    }

    #[tokio::test]
    async fn subscribes_the_broker_never_acknowledges_are_bounded() {
        let (addr, _upstream, cancel, direct) = guard_with_fake_upstream(vec![]).await;
        let mut app = connected_app(addr, "flood").await;
        let mut flood = Vec::new();
        for id in 1..=(MAX_AWAITING_SUBACKS as u16 + 1) {
            let mut body = id.to_be_bytes().to_vec();
            put_bytes(&mut body, b"mute/x");
            body.push(0);
            flood.extend_from_slice(&encode(0x82, &body));
        }
        let _ = app.write_all(&flood).await;
        assert!(closed(&mut app).await, "the guard kept an unbounded list");
        // Nothing was granted, and the connection's registration is gone.
        assert_eq!(
            direct.publish("mute/x", b""),
            super::super::direct::Delivery::Queued(0)
        );
        cancel.cancel();
    }

    #[tokio::test]
    async fn an_app_that_does_not_read_holds_up_nobody() {
        let (addr, _upstream, cancel, direct) = guard_with_fake_upstream(vec![]).await;
        let (_stuck, codes) = subscribed_app(addr, "stuck", &["t/#"]).await;
        assert_eq!(codes, vec![0]);
        let (mut reader, _) = subscribed_app(addr, "reader", &["t/#"]).await;
        // 20 MB for the app that never reads, far beyond socket buffers and its 1 KiB queue:
        // publishing never waits, and the reader gets every message.
        let payload = vec![7u8; 1000];
        let mut got = 0;
        for i in 0..20_000u32 {
            let mut p = payload.clone();
            p[..4].copy_from_slice(&i.to_be_bytes());
            assert_eq!(
                direct.publish("t/x", &p),
                super::super::direct::Delivery::Queued(2)
            );
            // Keep the reader's queue short: it holds 1 KiB.
            let m = next(&mut reader).await;
            assert_eq!(&m[m.len() - 1000..][..4], &i.to_be_bytes());
            got += 1;
        }
        assert_eq!(got, 20_000);
        cancel.cancel();
    }

    /// Reads until the guard closes the connection (or 2 s pass); whether it closed.
    async fn closed(s: &mut TcpStream) -> bool {
        let mut buf = [0u8; 64];
        loop {
            match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    }

    #[tokio::test]
    async fn only_the_agent_may_publish_to_reserved_topics() {
        let reserved = vec![
            "$hw/events/device/+/twin/update/result".to_owned(),
            "edgesync/#".to_owned(),
        ];
        let (addr, mut upstream, cancel, _) = guard_with_fake_upstream(reserved).await;

        // An app publishing to its own topic and to a request topic: forwarded.
        let mut app = connected_app(addr, "app").await;
        let mut ack = [0u8; 4];
        app.write_all(&publish_packet("plant/notes", b"1"))
            .await
            .unwrap();
        app.write_all(&publish_packet("$hw/events/device/d/twin/update", b"{}"))
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), upstream.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, publish_packet("plant/notes", b"1"));
        let got = tokio::time::timeout(Duration::from_secs(2), upstream.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            got,
            publish_packet("_$hw/events/device/d/twin/update", b"{}")
        );

        // The same app spoofing a result and telemetry: closed, nothing forwarded.
        for topic in ["$hw/events/device/d/twin/update/result", "edgesync/n/d"] {
            let mut spoofer = TcpStream::connect(addr).await.unwrap();
            spoofer
                .write_all(&connect_packet(4, 0x02, 60, "spoofer", &[]))
                .await
                .unwrap();
            spoofer.read_exact(&mut ack).await.unwrap();
            assert_eq!(ack, connack(0));
            spoofer
                .write_all(&publish_packet(topic, b"{}"))
                .await
                .unwrap();
            assert!(
                closed(&mut spoofer).await,
                "{topic}: the spoofer stays connected"
            );
        }
        // A will on a reserved topic: CONNACK 5.
        let mut will = Vec::new();
        put_bytes(&mut will, b"edgesync/n/d");
        put_bytes(&mut will, b"{}");
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&connect_packet(4, 0x02 | 0x04, 60, "will", &will))
            .await
            .unwrap();
        s.read_exact(&mut ack).await.unwrap();
        assert_eq!(ack, connack(RC_NOT_AUTHORIZED));

        assert!(
            upstream.try_recv().is_err(),
            "a spoofed message reached the broker"
        );
        cancel.cancel();
    }

    #[test]
    fn take_packet_needs_the_whole_packet() {
        fn take(b: &[u8], max: usize) -> Result<Option<Vec<u8>>, GuardError> {
            take_packet(&mut bytes::BytesMut::from(b), max)
        }
        assert_eq!(take(&[], 10).unwrap(), None);
        assert_eq!(take(&[0x30], 10).unwrap(), None);
        assert_eq!(take(&[0xc0, 0], 10).unwrap(), Some(vec![0xc0, 0]));
        assert_eq!(take(&[0x30, 3, 0, 1], 10).unwrap(), None);
        let mut buf = bytes::BytesMut::from(&[0x30, 3, 0, 1, b'a', 0x30, 3][..]);
        assert_eq!(
            take_packet(&mut buf, 10).unwrap(),
            Some(vec![0x30, 3, 0, 1, b'a'])
        );
        assert_eq!(&buf[..], &[0x30, 3], "the next packet stays");
        assert_eq!(take_packet(&mut buf, 10).unwrap(), None);
        // Two-byte remaining length: 128 bytes of body.
        let mut p = vec![0x30, 0x80, 0x01];
        p.resize(3 + 127, 0);
        assert_eq!(take(&p, 1000).unwrap(), None);
        p.push(0);
        assert_eq!(take(&p, 1000).unwrap().map(|v| v.len()), Some(131));
        assert!(take(&p, 127).is_err(), "longer than max");
        // A length field that never ends.
        assert!(take(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX).is_err());
    }

    #[test]
    fn subacks_are_read() {
        assert_eq!(
            parse_suback(&[0x90, 4, 0, 7, 0, 0x80]),
            Some((7, vec![0, 0x80]))
        );
        assert_eq!(parse_suback(&[0xb0, 2, 0, 7]), None, "UNSUBACK");
        assert_eq!(parse_suback(&[0x90, 1, 0]), None, "truncated");
        assert_eq!(parse_suback(&[0x90]), None);
    }

    #[tokio::test]
    async fn read_packet_bounds_the_length() {
        let mut ok: &[u8] = &[0xc0, 0];
        assert_eq!(read_packet(&mut ok, 10).await.unwrap(), Some(vec![0xc0, 0]));
        let mut big: &[u8] = &[0x30, 0xff, 0xff, 0xff, 0x7f];
        assert!(read_packet(&mut big, 1 << 20).await.is_err());
        let mut five: &[u8] = &[0x30, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert!(read_packet(&mut five, usize::MAX).await.is_err());
        let mut empty: &[u8] = &[];
        assert_eq!(read_packet(&mut empty, 10).await.unwrap(), None);
    }
}
