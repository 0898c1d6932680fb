//! The local MQTT bus against the embedded broker and a real Mosquitto: KubeEdge requests and
//! results, telemetry, delta/document, device state, tunnel state, credentials, and hostile
//! clients that must not take the embedded broker down.
//!
//! Mosquitto (Debian package `mosquitto`, installed by `scripts/setup-debian.sh`) is started by
//! the tests themselves on a free loopback port; a missing binary fails the tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgesync_edge::config::{EmbeddedBroker, ExternalBroker, MqttConfig, MqttMode, MqttPassword};
use edgesync_edge::local::{LocalChange, LocalTwin, TwinEvent};
use edgesync_edge::model::{
    Access, ByteOrder, DataType, DeviceSpec, LinkSpec, ReportPolicy, Table, TagSpec,
};
use edgesync_edge::mqtt;
use edgesync_edge::twin::Twin;
use edgesync_protocol::desired::{Applied, DesiredValue, Origin, Outcome};
use edgesync_protocol::{
    BadReason, DeviceId, NodeId, PropertyId, Quality, Sample, Timestamp, Value,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value as Json, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

fn tag(name: &str, table: Table, t: DataType, access: Access, scale: f64) -> TagSpec {
    TagSpec {
        property: PropertyId::new(name).unwrap(),
        table,
        address: 0,
        data_type: t,
        bit: None,
        byte_order: ByteOrder::Abcd,
        scale,
        offset: 0.0,
        unit: None,
        access,
        poll_interval: Duration::from_millis(100),
        report: ReportPolicy::default(),
    }
}

fn boiler() -> DeviceSpec {
    DeviceSpec {
        id: DeviceId::new("boiler").unwrap(),
        link: LinkSpec::Tcp {
            endpoint: "127.0.0.1:1".into(),
        },
        unit_id: 1,
        timeout: Duration::from_secs(1),
        max_registers_per_read: 125,
        max_bits_per_read: 2000,
        max_gap: 0,
        tags: vec![
            tag(
                "setpoint",
                Table::HoldingRegister,
                DataType::Int16,
                Access::ReadWrite,
                1.0,
            ),
            tag("pump", Table::Coil, DataType::Bool, Access::ReadWrite, 1.0),
            tag(
                "temp",
                Table::InputRegister,
                DataType::Int16,
                Access::Read,
                0.1,
            ),
        ],
    }
}

fn sample(p: &str, v: Option<Value>, q: Quality) -> Sample {
    Sample {
        device: DeviceId::new("boiler").unwrap(),
        property: PropertyId::new(p).unwrap(),
        value: v,
        quality: q,
        ts: Timestamp(1_700_000_000_000),
    }
}

struct Fixture {
    twin: LocalTwin,
    shared: Arc<Mutex<Twin>>,
    changes: mpsc::Receiver<LocalChange>,
}

/// A twin of node "line-1" with device "boiler", whose temp reads 21.5 and setpoint 50.
fn fixture() -> Fixture {
    let spec = boiler();
    let persisted = vec![
        sample("temp", Some(Value::Float(21.5)), Quality::Good),
        sample("setpoint", Some(Value::Int(50)), Quality::Good),
    ];
    let shared = Arc::new(Mutex::new(Twin::new(
        std::slice::from_ref(&spec),
        persisted,
    )));
    let specs = HashMap::from([(spec.id.clone(), Arc::new(spec))]);
    let (tx, changes) = mpsc::channel(16);
    let twin = LocalTwin::new(NodeId::new("line-1").unwrap(), shared.clone(), specs, tx);
    Fixture {
        twin,
        shared,
        changes,
    }
}

fn embedded_cfg() -> MqttConfig {
    MqttConfig {
        mode: MqttMode::Embedded(EmbeddedBroker {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..EmbeddedBroker::default()
        }),
        ..MqttConfig::default()
    }
}

struct Bus {
    addr: SocketAddr,
    cancel: CancellationToken,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Bus {
    async fn stop(self) {
        self.cancel.cancel();
        for h in self.handles {
            tokio::time::timeout(WAIT, h).await.unwrap().unwrap();
        }
    }
}

async fn start_embedded(twin: &LocalTwin, cfg: MqttConfig) -> Bus {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cancel = CancellationToken::new();
    let running = mqtt::start(cfg, twin.clone(), cancel.clone())
        .await
        .unwrap();
    Bus {
        addr: running.local_addr.unwrap(),
        cancel,
        handles: running.handles,
    }
}

/// An app: a rumqttc client whose received publishes arrive on a channel.
struct App {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    async fn connect(addr: SocketAddr, id: &str, login: Option<(&str, &str)>) -> App {
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        if let Some((u, p)) = login {
            o.set_credentials(u, p);
        }
        let (client, mut ev) = AsyncClient::new(o, 1000);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let task = tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(r) = ready_tx.take() {
                            let _ = r.send(Ok(()));
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send((p.topic, p.payload.to_vec()));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if let Some(r) = ready_tx.take() {
                            let _ = r.send(Err(e.to_string()));
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tokio::time::timeout(WAIT, ready_rx)
            .await
            .expect("connect timed out")
            .unwrap()
            .expect("connect refused");
        App { client, rx, task }
    }

    async fn subscribe(&self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtMostOnce)
            .await
            .unwrap();
        // Let the SUBACK arrive before anything is published.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtMostOnce, false, payload.into())
            .await
            .unwrap();
    }

    /// The next message on `topic`, as JSON.
    async fn next_on(&mut self, topic: &str) -> Json {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut skipped = Vec::new();
        loop {
            let (t, p) = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("nothing on {topic}; skipped {skipped:?}"))
                .unwrap();
            skipped.push(t.clone());
            if t == topic {
                return serde_json::from_slice(&p).unwrap();
            }
        }
    }

    /// Asserts nothing arrives on `topic` for `d`.
    async fn nothing_on(&mut self, topic: &str, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        while let Ok(Some((t, p))) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            assert_ne!(t, topic, "unexpected {}", String::from_utf8_lossy(&p));
        }
    }

    fn stop(self) {
        self.task.abort();
    }
}

const UPDATE: &str = "$hw/events/device/boiler/twin/update";
const UPDATE_RESULT: &str = "$hw/events/device/boiler/twin/update/result";
const GET: &str = "$hw/events/device/boiler/twin/get";
const GET_RESULT: &str = "$hw/events/device/boiler/twin/get/result";

/// The KubeEdge request/answer flows, against whatever broker `addr` is.
async fn request_flows(f: &mut Fixture, addr: SocketAddr, login: Option<(&str, &str)>) {
    let mut app = App::connect(addr, "app-flows", login).await;
    app.subscribe("$hw/events/device/+/twin/#").await;

    // twin/get -> the whole twin.
    app.publish(GET, r#"{"event_id":"g1","timestamp":1}"#).await;
    let r = app.next_on(GET_RESULT).await;
    assert_eq!(r["event_id"], "g1");
    assert_eq!(r["twin"]["temp"]["actual"]["value"], "21.5");
    assert_eq!(r["twin"]["temp"]["metadata"]["type"], "double");
    assert_eq!(r["twin"]["setpoint"]["actual"]["value"], "50");
    assert_eq!(
        r["twin"]["pump"],
        json!({"optional": false, "metadata": {"type": "boolean"}})
    );

    // twin/update with expected -> the twin takes it, the result says so.
    app.publish(
        UPDATE,
        r#"{"event_id":"u1","timestamp":1,"twin":{"setpoint":{"expected":{"value":"55"}},"pump":{"expected":{"value":"true"}}}}"#,
    )
    .await;
    let r = app.next_on(UPDATE_RESULT).await;
    assert_eq!(r["event_id"], "u1");
    assert!(r.get("code").is_none(), "{r}");
    assert_eq!(r["twin"]["setpoint"]["expected"]["value"], "55");
    let change = tokio::time::timeout(WAIT, f.changes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(change.device.as_str(), "boiler");
    assert_eq!(
        change.values,
        vec![
            (PropertyId::new("pump").unwrap(), Value::Bool(true)),
            (PropertyId::new("setpoint").unwrap(), Value::Int(55)),
        ]
    );

    // Bad requests -> error results, nothing changes.
    let cases: [(&str, &str, u64, &str); 6] = [
        (UPDATE, "{not json", 400, "not JSON"),
        (
            "$hw/events/device/nosuch/twin/update",
            r#"{"event_id":"u2","twin":{"setpoint":{"expected":{"value":"1"}}}}"#,
            404,
            "not configured",
        ),
        (
            UPDATE,
            r#"{"event_id":"u3","twin":{"nosuch":{"expected":{"value":"1"}}}}"#,
            400,
            "no property",
        ),
        (
            UPDATE,
            r#"{"event_id":"u4","twin":{"setpoint":{"expected":{"value":"hot"}}}}"#,
            400,
            "not a number",
        ),
        (
            UPDATE,
            r#"{"event_id":"u5","twin":{"setpoint":{"expected":{"value":"70000"}}}}"#,
            400,
            "setpoint",
        ),
        (
            UPDATE,
            r#"{"event_id":"u6","twin":{"temp":{"expected":{"value":"3"}}}}"#,
            400,
            "not writable",
        ),
    ];
    for (topic, payload, code, needle) in cases {
        app.publish(topic, payload).await;
        let result_topic = format!("{topic}/result");
        let r = app.next_on(&result_topic).await;
        assert_eq!(r["code"], code, "{payload} -> {r}");
        let reason = r["reason"].as_str().unwrap();
        assert!(reason.contains(needle), "{payload} -> {reason}");
    }
    // Every problem at once, each naming its property.
    app.publish(
        UPDATE,
        r#"{"event_id":"u7","twin":{"pump":{"expected":{"value":"maybe"}},"setpoint":{"expected":{"value":"99999"}}}}"#,
    )
    .await;
    let r = app.next_on(UPDATE_RESULT).await;
    let names: Vec<&str> = r["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["property"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["pump", "setpoint"], "{r}");
    app.publish(GET, "][").await;
    assert_eq!(app.next_on(GET_RESULT).await["code"], 400);
    app.publish("$hw/events/device/nosuch/twin/get", "{}").await;
    assert_eq!(
        app.next_on("$hw/events/device/nosuch/twin/get/result")
            .await["code"],
        404
    );
    assert!(
        f.changes.try_recv().is_err(),
        "a refused request changed the twin"
    );
    app.stop();
}

/// Telemetry, state, delta/document and tunnel events, against whatever broker `addr` is.
async fn event_flows(f: &Fixture, addr: SocketAddr, login: Option<(&str, &str)>) {
    let mut app = App::connect(addr, "app-events", login).await;
    app.subscribe("edgesync/#").await;
    app.subscribe("$hw/events/#").await;
    let boiler = DeviceId::new("boiler").unwrap();

    // One telemetry message per Reported event, with the changed properties.
    f.twin.emit(TwinEvent::Reported {
        device: boiler.clone(),
        samples: Arc::new(vec![sample(
            "temp",
            Some(Value::Float(22.0)),
            Quality::Good,
        )]),
    });
    let t = app.next_on("edgesync/line-1/boiler").await;
    assert_eq!(
        t,
        json!({"temp": {"value": 22.0, "quality": "good", "ts": 1_700_000_000_000u64}})
    );
    let s = app.next_on("$hw/events/device/boiler/state/update").await;
    assert_eq!(s["state"], "online");
    f.twin.emit(TwinEvent::Reported {
        device: boiler.clone(),
        samples: Arc::new(vec![sample(
            "temp",
            Some(Value::Float(22.0)),
            Quality::Bad(BadReason::Timeout),
        )]),
    });
    let t = app.next_on("edgesync/line-1/boiler").await;
    assert_eq!(t["temp"]["quality"], "bad: timeout");
    let s = app.next_on("$hw/events/device/boiler/state/update").await;
    assert_eq!(s["state"], "offline");

    // A desired value (as the downlink records it) -> document and delta.
    let desired = DesiredValue {
        value: Value::Int(60),
        version: 7,
        origin: Origin::Hub,
        set_ms: 42,
    };
    f.shared
        .lock()
        .unwrap()
        .set_desired(&boiler, 3, 0, desired.clone());
    f.twin.emit(TwinEvent::Desired {
        device: boiler.clone(),
        property: PropertyId::new("setpoint").unwrap(),
        desired,
    });
    let d = app
        .next_on("$hw/events/device/boiler/twin/update/document")
        .await;
    assert_eq!(d["twin"]["setpoint"]["current"]["expected"]["value"], "60");
    assert_eq!(d["twin"]["setpoint"]["current"]["actual"]["value"], "50");
    assert!(
        d["twin"]["setpoint"]["last"].get("expected").is_none(),
        "{d}"
    );
    let delta = app
        .next_on("$hw/events/device/boiler/twin/update/delta")
        .await;
    assert_eq!(delta["delta"], json!({"setpoint": "60"}));
    assert_eq!(delta["twin"]["setpoint"]["expected"]["value"], "60");

    // What became of it, on the applied topic, with the value it concerns.
    f.twin.emit(TwinEvent::Applied {
        device: boiler.clone(),
        property: PropertyId::new("setpoint").unwrap(),
        applied: Applied {
            version: 7,
            outcome: Outcome::Exception(2),
            ts_ms: 43,
        },
    });
    let a = app.next_on("edgesync/line-1/boiler/applied").await;
    assert_eq!(
        a,
        json!({"event_id": a["event_id"], "timestamp": a["timestamp"], "property": "setpoint",
               "version": 7, "outcome": "exception", "detail": 2, "ts_ms": 43,
               "value": 60, "origin": "hub"})
    );

    // The reading catches up: the delta empties and is published once.
    f.twin.emit(TwinEvent::Reported {
        device: boiler.clone(),
        samples: Arc::new(vec![sample(
            "setpoint",
            Some(Value::Int(60)),
            Quality::Good,
        )]),
    });
    let delta = app
        .next_on("$hw/events/device/boiler/twin/update/delta")
        .await;
    assert_eq!(delta["delta"], json!({}));
    f.twin.emit(TwinEvent::Reported {
        device: boiler.clone(),
        samples: Arc::new(vec![sample(
            "setpoint",
            Some(Value::Int(60)),
            Quality::Good,
        )]),
    });
    app.nothing_on(
        "$hw/events/device/boiler/twin/update/delta",
        Duration::from_millis(500),
    )
    .await;

    // The tunnel.
    f.twin.emit(TwinEvent::Uplink { connected: true });
    let c = app.next_on("$hw/events/connected/line-1").await;
    assert_eq!(c["event_type"], "connected");
    f.twin.emit(TwinEvent::Uplink { connected: false });
    let c = app.next_on("$hw/events/disconnected/line-1").await;
    assert_eq!(c["event_type"], "disconnected");
    app.stop();
}

#[tokio::test]
async fn embedded_broker_answers_requests() {
    let mut f = fixture();
    let bus = start_embedded(&f.twin, embedded_cfg()).await;
    request_flows(&mut f, bus.addr, None).await;
    bus.stop().await;
}

#[tokio::test]
async fn embedded_broker_publishes_twin_events() {
    let f = fixture();
    let bus = start_embedded(&f.twin, embedded_cfg()).await;
    event_flows(&f, bus.addr, None).await;
    bus.stop().await;
}

#[tokio::test]
async fn embedded_broker_checks_credentials() {
    let mut f = fixture();
    let mut cfg = embedded_cfg();
    cfg.username = Some("app".into());
    cfg.password = Some(MqttPassword::Inline("s3cret".into()));
    let bus = start_embedded(&f.twin, cfg).await;
    // Wrong password: CONNACK 4; no password: CONNACK 4.
    for login in [Some(("app", "wrong")), None] {
        let mut o = MqttOptions::new("intruder", "127.0.0.1", bus.addr.port());
        if let Some((u, p)) = login {
            o.set_credentials(u, p);
        }
        let (_c, mut ev) = AsyncClient::new(o, 10);
        let e = tokio::time::timeout(WAIT, ev.poll()).await.unwrap();
        assert!(
            matches!(e, Err(rumqttc::ConnectionError::ConnectionRefused(_))),
            "{e:?}"
        );
    }
    // The agent's own client is in (it answers), and so is an app with the password.
    request_flows(&mut f, bus.addr, Some(("app", "s3cret"))).await;
    bus.stop().await;
}

#[tokio::test]
async fn embedded_listen_address_in_use_is_an_error() {
    let f = fixture();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = MqttConfig {
        mode: MqttMode::Embedded(EmbeddedBroker {
            listen: taken.local_addr().unwrap(),
            ..EmbeddedBroker::default()
        }),
        ..MqttConfig::default()
    };
    let err = mqtt::start(cfg, f.twin.clone(), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, mqtt::MqttError::Listen { .. }), "{err}");
}

#[tokio::test]
async fn mode_off_starts_nothing() {
    let f = fixture();
    let cfg = MqttConfig {
        mode: MqttMode::Off,
        ..MqttConfig::default()
    };
    let running = mqtt::start(cfg, f.twin.clone(), CancellationToken::new())
        .await
        .unwrap();
    assert!(running.handles.is_empty() && running.local_addr.is_none());
}

// ---------------------------------------------------------------------------------------------
// Hostile clients.

/// A raw MQTT packet: `first` byte, body.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        p.push(b);
        if len == 0 {
            break;
        }
    }
    p.extend_from_slice(body);
    p
}

fn string(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

fn connect_v4(id: &str) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.extend_from_slice(&[4, 0x02, 0, 60]);
    body.extend(string(id.as_bytes()));
    packet(0x10, &body)
}

/// An MQTT 5 CONNECT (empty properties) and a PUBLISH with properties (payload format and
/// message expiry).
fn v5_connect_and_publish(topic: &str) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.extend_from_slice(&[5, 0x02, 0, 60, 0]);
    body.extend(string(b"v5-client"));
    let mut out = packet(0x10, &body);
    let mut publish = string(topic.as_bytes());
    publish.extend_from_slice(&[7, 0x01, 1, 0x02, 0, 0, 0, 60]);
    publish.extend_from_slice(b"{\"x\":1}");
    out.extend(packet(0x30, &publish));
    out
}

/// Sends `bytes` on a fresh connection, reads what comes back (until close or 1 s).
async fn raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => return out,
        }
    }
}

/// After an attack: a normal client connects, subscribes and receives what another
/// publishes, and the agent still answers a twin/get.
async fn bus_still_works(addr: SocketAddr, round: usize) {
    let mut sub = App::connect(addr, &format!("after-sub-{round}"), None).await;
    sub.subscribe("plain/topic").await;
    sub.subscribe(GET_RESULT).await;
    let publisher = App::connect(addr, &format!("after-pub-{round}"), None).await;
    publisher.publish("plain/topic", r#"{"n":1}"#).await;
    assert_eq!(sub.next_on("plain/topic").await, json!({"n": 1}));
    publisher.publish(GET, r#"{"event_id":"after"}"#).await;
    assert_eq!(sub.next_on(GET_RESULT).await["event_id"], "after");
    sub.stop();
    publisher.stop();
}

#[tokio::test]
async fn hostile_clients_cannot_take_the_embedded_broker_down() {
    let f = fixture();
    let mut cfg = embedded_cfg();
    if let MqttMode::Embedded(e) = &mut cfg.mode {
        e.max_connections = 16;
        e.max_topics = 64;
    }
    cfg.max_packet_bytes = 64 * 1024;
    cfg.connect_timeout = Duration::from_millis(500);
    let bus = start_embedded(&f.twin, cfg).await;
    let addr = bus.addr;
    // A subscriber of the topic the v5 client publishes to (rumqttd 0.20 with a v5 listener
    // panics delivering a v5 publish with properties to a 3.1.1 subscriber).
    let mut watcher = App::connect(addr, "watcher", None).await;
    watcher.subscribe("victim/topic").await;
    bus_still_works(addr, 0).await;

    // 1. MQTT 5: CONNECT + PUBLISH with properties -> CONNACK "unacceptable protocol version".
    let answer = raw(addr, &v5_connect_and_publish("victim/topic")).await;
    assert_eq!(answer, [0x20, 2, 0, 1]);
    bus_still_works(addr, 1).await;

    // 2. rumqttd's poison: two CONNECTs with an invalid client id (see the guard's docs).
    for _ in 0..3 {
        let answer = raw(addr, &connect_v4("a/b")).await;
        assert_eq!(
            &answer[..4],
            [0x20, 2, 0, 0],
            "the guard maps ids, a/b is fine"
        );
    }
    // ...and CONNECTs whose sockets close before the CONNACK, with the same id.
    for _ in 0..5 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&connect_v4("same-id")).await.unwrap();
        // Close at once (the CONNACK, if any, goes unread).
        drop(s);
    }
    let answer = raw(addr, &connect_v4("same-id")).await;
    assert_eq!(&answer[..4], [0x20, 2, 0, 0]);
    bus_still_works(addr, 2).await;

    // 3. Garbage, a truncated header, a packet claiming 256 MB, CONNACK from a client, a
    //    second CONNECT, a PUBLISH with a wildcard topic, QoS 3.
    let mut second_connect = connect_v4("twice");
    second_connect.extend(connect_v4("twice"));
    let mut wildcard = connect_v4("wild");
    wildcard.extend(packet(0x30, &string(b"a/+/b")));
    let mut qos3 = connect_v4("qos3");
    qos3.extend(packet(0x36, &string(b"a")));
    for bytes in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![0xff; 64],
        vec![0x10],
        vec![0x30, 0xff, 0xff, 0xff, 0x7f],
        [connect_v4("big"), vec![0x30, 0xff, 0xff, 0xff, 0x7f]].concat(),
        vec![0x20, 2, 0, 0],
        second_connect,
        wildcard,
        qos3,
    ] {
        raw(addr, &bytes).await;
    }
    bus_still_works(addr, 3).await;

    // 4. A connect flood: 200 silent connections and 200 CONNECTs at once.
    let mut silent = Vec::new();
    for _ in 0..200 {
        if let Ok(s) = TcpStream::connect(addr).await {
            silent.push(s);
        }
    }
    let floods: Vec<_> = (0..200)
        .map(|i| tokio::spawn(async move { raw(addr, &connect_v4(&format!("flood-{i}"))).await }))
        .collect();
    let mut accepted = 0;
    for h in floods {
        let a = h.await.unwrap();
        if a.get(..4) == Some(&[0x20, 2, 0, 0][..]) {
            accepted += 1;
        }
    }
    drop(silent);
    assert!(accepted <= 200);
    // The agent's own client was not locked out: it still answers (after the flood).
    tokio::time::sleep(Duration::from_millis(800)).await;
    bus_still_works(addr, 4).await;

    // 5. Topic budget: a client publishing to ever new topics is cut off at max_topics.
    let mut hog = TcpStream::connect(addr).await.unwrap();
    hog.write_all(&connect_v4("hog")).await.unwrap();
    let mut ack = [0u8; 4];
    hog.read_exact(&mut ack).await.unwrap();
    let mut cut = false;
    for i in 0..500 {
        let p = packet(0x30, &string(format!("hog/{i}").as_bytes()));
        if hog.write_all(&p).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut rest = Vec::new();
    let closed = matches!(
        tokio::time::timeout(WAIT, hog.read_to_end(&mut rest)).await,
        Ok(Ok(_)) | Ok(Err(_))
    );
    assert!(cut || closed, "the topic hog was not disconnected");
    // Topics already in use still work.
    let mut sub = App::connect(addr, "after-budget-sub", None).await;
    sub.subscribe("plain/topic").await;
    let publisher = App::connect(addr, "after-budget-pub", None).await;
    publisher.publish("plain/topic", r#"{"n":2}"#).await;
    assert_eq!(sub.next_on("plain/topic").await, json!({"n": 2}));
    sub.subscribe(GET_RESULT).await;
    publisher.publish(GET, r#"{"event_id":"late2"}"#).await;
    assert_eq!(sub.next_on(GET_RESULT).await["event_id"], "late2");

    // The watcher never got the v5 message (it was refused at CONNECT).
    watcher
        .nothing_on("victim/topic", Duration::from_millis(200))
        .await;
    bus.stop().await;
}

#[tokio::test]
async fn a_flood_of_bad_requests_does_not_stall_telemetry() {
    let f = fixture();
    let mut cfg = embedded_cfg();
    cfg.max_requests_per_s = 50;
    let bus = start_embedded(&f.twin, cfg).await;
    let mut app = App::connect(bus.addr, "watch", None).await;
    app.subscribe("edgesync/#").await;
    let flooder = App::connect(bus.addr, "flooder", None).await;
    let flood = tokio::spawn({
        let client = flooder.client.clone();
        async move {
            for i in 0..5000 {
                let _ = client
                    .publish(UPDATE, QoS::AtMostOnce, false, format!("garbage {i}"))
                    .await;
            }
        }
    });
    let boiler = DeviceId::new("boiler").unwrap();
    for i in 0..20 {
        f.twin.emit(TwinEvent::Reported {
            device: boiler.clone(),
            samples: Arc::new(vec![sample("temp", Some(Value::Int(i)), Quality::Good)]),
        });
        let t = app.next_on("edgesync/line-1/boiler").await;
        assert_eq!(t["temp"]["value"], i);
    }
    flood.await.unwrap();
    flooder.stop();
    app.stop();
    bus.stop().await;
}

/// A poll cycle of a gateway with 10 devices x 100 changed properties publishes ~55 KB of
/// telemetry within a few ms. Every message must reach a subscriber: with rumqttd's log per
/// filter smaller than one cycle (it was 2 x 16 KiB), rumqttd silently dropped the oldest
/// messages of a subscriber a few ms behind.
#[tokio::test]
async fn a_whole_poll_cycle_of_telemetry_reaches_a_subscriber() {
    let f = fixture();
    let bus = start_embedded(&f.twin, embedded_cfg()).await;
    let mut app = App::connect(bus.addr, "watch", None).await;
    app.subscribe("edgesync/#").await;
    let boiler = DeviceId::new("boiler").unwrap();
    let cycle = |c: i64| {
        (0..10).map(move |d| {
            (0..100)
                .map(|p| Sample {
                    device: DeviceId::new("boiler").unwrap(),
                    property: PropertyId::new(format!("p{p}")).unwrap(),
                    value: Some(Value::Int(c * 1_000_000 + d * 1000 + p)),
                    quality: Quality::Good,
                    ts: Timestamp(1_700_000_000_000),
                })
                .collect::<Vec<_>>()
        })
    };
    for c in 0..5 {
        // One cycle, back to back (as the pipeline emits it).
        for samples in cycle(c) {
            f.twin.emit(TwinEvent::Reported {
                device: boiler.clone(),
                samples: Arc::new(samples),
            });
        }
        for d in 0..10 {
            let t = app.next_on("edgesync/line-1/boiler").await;
            assert_eq!(t.as_object().unwrap().len(), 100);
            assert_eq!(
                t["p0"]["value"],
                c * 1_000_000 + d * 1000,
                "cycle {c}: message {d} lost or out of order"
            );
        }
    }
    app.stop();
    bus.stop().await;
}

/// rumqttd 0.20 on its own (no guard): two CONNECTs with client id "a/b" leave its listener
/// unable to accept anyone. This is why the guard exists; if it fails, rumqttd has been fixed
/// and the guard's id rewriting can be reconsidered.
#[test]
fn bare_rumqttd_is_poisoned_by_an_invalid_client_id() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let settings = rumqttd::ServerSettings {
        name: "bare".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 1000,
            max_payload_size: 4096,
            max_inflight_count: 10,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        router: rumqttd::RouterConfig {
            max_connections: 10,
            max_outgoing_packet_count: 10,
            max_segment_size: 4096,
            max_segment_count: 1,
            ..Default::default()
        },
        v4: Some(HashMap::from([("bare".to_owned(), settings)])),
        ..Default::default()
    };
    std::thread::spawn(move || {
        let _ = rumqttd::Broker::new(config).start();
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + WAIT;
        while TcpStream::connect(addr).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "rumqttd did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            &raw(addr, &connect_v4("ok-before")).await[..4],
            [0x20, 2, 0, 0]
        );
        raw(addr, &connect_v4("a/b")).await;
        raw(addr, &connect_v4("a/b")).await;
        let after = raw(addr, &connect_v4("ok-after")).await;
        assert!(
            after.is_empty(),
            "rumqttd answered after the poison: {after:?}"
        );
    });
}

// ---------------------------------------------------------------------------------------------
// Mosquitto.

fn which(name: &str) -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")]);
    for dir in candidates {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} not found: install the Debian package mosquitto (scripts/setup-debian.sh)");
}

/// A Mosquitto process on a free loopback port with a password file; killed (by PID) on drop.
struct Mosquitto {
    child: std::process::Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn mosquitto(users: &[(&str, &str)]) -> Mosquitto {
    let dir = std::env::temp_dir().join(format!(
        "edgesync-mosquitto-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let passwd = dir.join("passwd");
    for (i, (u, p)) in users.iter().enumerate() {
        let mut cmd = std::process::Command::new(which("mosquitto_passwd"));
        if i == 0 {
            cmd.arg("-c");
        }
        let status = cmd.arg("-b").arg(&passwd).arg(u).arg(p).status().unwrap();
        assert!(status.success(), "mosquitto_passwd failed");
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\npersistence false\nlog_dest stderr\n",
            passwd.display()
        ),
    )
    .unwrap();
    let child = std::process::Command::new(which("mosquitto"))
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("cannot start mosquitto");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let m = Mosquitto { child, addr, dir };
    let deadline = tokio::time::Instant::now() + WAIT;
    while TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "mosquitto did not listen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    m
}

fn external_cfg(m: &Mosquitto, user: &str, password: MqttPassword) -> MqttConfig {
    MqttConfig {
        mode: MqttMode::External(ExternalBroker {
            address: m.addr.to_string(),
            tls: None,
        }),
        username: Some(user.into()),
        password: Some(password),
        connect_timeout: Duration::from_millis(500),
        ..MqttConfig::default()
    }
}

async fn start_external(twin: &LocalTwin, cfg: MqttConfig) -> Bus {
    let cancel = CancellationToken::new();
    let running = mqtt::start(cfg, twin.clone(), cancel.clone())
        .await
        .unwrap();
    Bus {
        addr: "0.0.0.0:0".parse().unwrap(),
        cancel,
        handles: running.handles,
    }
}

/// Waits until the agent's client has subscribed (it answers a twin/get).
async fn agent_ready(addr: SocketAddr, login: (&str, &str)) {
    let mut probe = App::connect(addr, "probe", Some(login)).await;
    probe.subscribe(GET_RESULT).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        probe.publish(GET, r#"{"event_id":"probe"}"#).await;
        if tokio::time::timeout(Duration::from_millis(300), probe.next_on(GET_RESULT))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent never answered through mosquitto"
        );
    }
    probe.stop();
}

#[tokio::test]
async fn mosquitto_with_password_answers_requests_and_publishes_events() {
    let m = mosquitto(&[("agent", "agent-pw"), ("app", "app-pw")]).await;
    let mut f = fixture();
    let pwfile = m.dir.join("agent-password");
    std::fs::write(&pwfile, "agent-pw\n").unwrap();
    let bus = start_external(
        &f.twin,
        external_cfg(&m, "agent", MqttPassword::File(pwfile)),
    )
    .await;
    agent_ready(m.addr, ("app", "app-pw")).await;
    request_flows(&mut f, m.addr, Some(("app", "app-pw"))).await;
    event_flows(&f, m.addr, Some(("app", "app-pw"))).await;
    bus.stop().await;
}

#[tokio::test]
async fn mosquitto_refuses_a_wrong_password() {
    let m = mosquitto(&[("agent", "agent-pw"), ("app", "app-pw")]).await;
    let f = fixture();
    let bus = start_external(
        &f.twin,
        external_cfg(&m, "agent", MqttPassword::Inline("wrong".into())),
    )
    .await;
    // The agent's client is refused, so nobody answers a twin/get.
    let mut app = App::connect(m.addr, "app", Some(("app", "app-pw"))).await;
    app.subscribe(GET_RESULT).await;
    app.publish(GET, r#"{"event_id":"x"}"#).await;
    app.nothing_on(GET_RESULT, Duration::from_secs(2)).await;
    app.stop();
    bus.stop().await;
}
