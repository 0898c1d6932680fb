//! The agent's local MQTT bus: apps on the gateway see the twin and set desired values over
//! MQTT, with KubeEdge's topics and payloads, whether or not the hub is reachable.
//!
//! Data flow: the twin's events ([`crate::local::TwinEvent`], from [`LocalTwin::subscribe`])
//! become messages (telemetry, twin delta and document, device state, tunnel state); requests
//! that apps publish (`twin/update`, `twin/get`) are answered from [`LocalTwin`], and accepted
//! desired values go to [`LocalTwin::set_desired`]. Topics and payloads: [`kubeedge`] and
//! `docs/mqtt.md`.
//!
//! The broker is either embedded (rumqttd behind our [`guard`], on its own thread: see
//! [`broker`]) or external (Mosquitto or any MQTT 3.1.1 broker; TLS with rustls and ring). With
//! the embedded broker the agent receives requests through rumqttd's router in-process (a local
//! link) and hands its own messages straight to the subscribed apps' connections in the guard
//! ([`direct`]); with an external one its client is rumqttc.
//!
//! Tasks (all end on `cancel`): the broker thread (embedded only); the link task (embedded) or
//! the client task (external, drives rumqttc's event loop), which hands incoming requests to a
//! bounded queue; the bus task, which turns twin events into messages and answers requests.
//! Nothing here can block the pipeline: twin events arrive on a broadcast channel (a lagging bus
//! task loses events, counted), requests are dropped when the queue is full or above
//! `max_requests_per_s`, and messages are queued without waiting (dropped and counted when
//! `queue_capacity` messages are waiting already for an external broker, or when an app of the
//! embedded broker is too far behind).

pub mod broker;
pub mod direct;
pub mod guard;
pub mod kubeedge;
pub mod metrics;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgesync_protocol::desired::{Applied, DesiredValue};
use edgesync_protocol::{DeviceId, PropertyId, Sample};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Map;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{MqttConfig, MqttMode, MqttPassword, MqttTls};
use crate::local::{LocalTwin, SetError, TwinEvent};
use kubeedge::{DeviceState, Refusal, Request, Topics};

/// Why the bus could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MqttError {
    /// The embedded broker could not listen on its address.
    #[error("mqtt: cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A thread or runtime could not be started.
    #[error("mqtt: cannot start the broker thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The broker thread stopped before it was ready.
    #[error("mqtt: the embedded broker stopped while starting")]
    BrokerStopped,
    /// The system's random number generator failed.
    #[error("mqtt: no random numbers for the broker's secrets")]
    Random,
    /// A file named by the config could not be read.
    #[error("mqtt: cannot read {path}: {source}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TLS settings do not work (a PEM file without a certificate, a bad key).
    #[error("mqtt: TLS: {0}")]
    Tls(String),
    /// The external broker's address is not `host:port`.
    #[error("mqtt: broker address {0:?} is not host:port")]
    Address(String),
    /// The agent's in-process connection to the embedded broker's router failed.
    #[error("mqtt: cannot connect the agent to the embedded broker's router: {0}")]
    Link(String),
}

/// A running bus.
#[derive(Debug)]
pub struct Running {
    /// The embedded broker's address (the actual port if the config asked for port 0); `None`
    /// for an external broker or when off.
    pub local_addr: Option<SocketAddr>,
    /// The tasks; they end after `cancel`.
    pub handles: Vec<JoinHandle<()>>,
}

/// Starts the bus: the embedded broker (bound before this returns, so a taken port is an error
/// here) or the client of an external broker (which connects, and reconnects, in the
/// background), and the bus task.
pub async fn start(
    cfg: MqttConfig,
    twin: LocalTwin,
    cancel: CancellationToken,
) -> Result<Running, MqttError> {
    metrics::describe();
    let password = match &cfg.password {
        None => None,
        Some(MqttPassword::Inline(p)) => Some(p.clone()),
        Some(MqttPassword::File(path)) => {
            let text = std::fs::read_to_string(path).map_err(|source| MqttError::File {
                path: path.clone(),
                source,
            })?;
            let text = text.strip_suffix('\n').unwrap_or(&text);
            Some(text.strip_suffix('\r').unwrap_or(text).to_owned())
        }
    };
    let client_id = cfg
        .client_id
        .clone()
        .unwrap_or_else(|| format!("edgesync-agent-{}", twin.node()));
    let mut handles = Vec::new();
    let (in_tx, in_rx) = mpsc::channel(IN_QUEUE);
    let events = twin.subscribe();
    let (outlet, local_addr) = match &cfg.mode {
        MqttMode::Off => {
            tracing::info!("mqtt: off");
            return Ok(Running {
                local_addr: None,
                handles,
            });
        }
        MqttMode::Embedded(e) => {
            let login = cfg
                .username
                .clone()
                .map(|u| (u, password.clone().unwrap_or_default().into_bytes()));
            let reserved = Topics::agent_owned()
                .iter()
                .map(|t| (*t).to_owned())
                .collect();
            let emb = broker::start(e, &cfg, login, reserved, cancel.clone()).await?;
            handles.push(emb.handle);
            let broker::AgentLink { mut tx, rx } = emb.link;
            for filter in Topics::subscriptions() {
                tx.try_subscribe(guard::to_internal(filter).into_owned())
                    .map_err(|e| MqttError::Link(e.to_string()))?;
            }
            handles.push(tokio::spawn(link_task(rx, in_tx, cancel.clone())));
            tracing::info!("mqtt: client connected (in-process)");
            // The link stays open for the requests; the agent's messages go straight to
            // the guard's connections.
            let outlet = Outlet::Direct {
                direct: emb.direct,
                _link: tx,
            };
            (outlet, Some(emb.local_addr))
        }
        MqttMode::External(x) => {
            let (host, port) = x
                .address
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
                .ok_or_else(|| MqttError::Address(x.address.clone()))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let mut o = MqttOptions::new(client_id, host, port);
            if let Some(u) = &cfg.username {
                o.set_credentials(u.clone(), password.clone().unwrap_or_default());
            }
            if let Some(tls) = &x.tls {
                o.set_transport(tls_transport(tls)?);
            }
            o.set_keep_alive(Duration::from_secs(
                cfg.keepalive.as_millis().div_ceil(1000) as u64,
            ))
            .set_clean_session(true)
            .set_max_packet_size(cfg.max_packet_bytes, cfg.max_packet_bytes)
            .set_request_channel_capacity(cfg.queue_capacity);
            let (client, mut eventloop) = AsyncClient::new(o, cfg.queue_capacity);
            eventloop
                .network_options
                .set_connection_timeout(cfg.connect_timeout.as_millis().div_ceil(1000) as u64);
            // A poll cycle publishes one message per device back to back: with Nagle's
            // algorithm each one after the first would wait for the broker's delayed ACK (40 ms
            // on Linux).
            eventloop.network_options.set_tcp_nodelay(true);
            handles.push(tokio::spawn(client_task(
                eventloop,
                client.clone(),
                in_tx,
                cfg.connect_timeout,
                cancel.clone(),
            )));
            (Outlet::Client(client), None)
        }
    };
    let bus = Bus::new(twin, outlet, cfg.max_requests_per_s);
    handles.push(tokio::spawn(bus.run(events, in_rx, cancel)));
    Ok(Running {
        local_addr,
        handles,
    })
}

/// Requests waiting for the bus task; more are dropped.
const IN_QUEUE: usize = 256;
/// Longest reconnect delay of the agent's client.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

fn tls_transport(tls: &MqttTls) -> Result<Transport, MqttError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| MqttError::File {
            path: path.to_path_buf(),
            source,
        })
    };
    let ca = read(&tls.ca_file)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca) {
        let cert = cert.map_err(|e| MqttError::Tls(format!("{}: {e}", tls.ca_file.display())))?;
        roots
            .add(cert)
            .map_err(|e| MqttError::Tls(format!("{}: {e}", tls.ca_file.display())))?;
    }
    if roots.is_empty() {
        return Err(MqttError::Tls(format!(
            "{} holds no certificate",
            tls.ca_file.display()
        )));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| MqttError::Tls(e.to_string()))?
    .with_root_certificates(roots);
    let config = match &tls.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let cert_pem = read(cert)?;
            let chain = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| MqttError::Tls(format!("{}: {e}", cert.display())))?;
            let key_pem = read(key)?;
            let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| MqttError::Tls(format!("{}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| MqttError::Tls(e.to_string()))?
        }
    };
    Ok(Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
    ))
}

/// Where the bus's messages go.
enum Outlet {
    /// rumqttc, connected to an external broker.
    Client(AsyncClient),
    /// The embedded broker: straight to the apps subscribed (see [`direct`]).
    Direct {
        direct: Arc<direct::Direct>,
        /// The agent's link to rumqttd's router (its subscriptions live as long as it does).
        _link: rumqttd::local::LinkTx,
    },
}

impl Outlet {
    /// Whether a message on `topic` may reach anyone (an external broker knows its
    /// subscribers itself: always).
    fn wants(&self, topic: &str) -> bool {
        match self {
            Outlet::Client(_) => true,
            Outlet::Direct { direct, .. } => direct.wanted(topic),
        }
    }

    /// Queues a QoS 0 message; the reason it was dropped otherwise (the metric's label).
    fn publish(&mut self, topic: String, payload: Vec<u8>) -> Result<(), &'static str> {
        match self {
            Outlet::Client(c) => c
                .try_publish(topic, QoS::AtMostOnce, false, payload)
                .map_err(|_| "out_queue_full"),
            Outlet::Direct { direct, .. } => match direct.publish(&topic, &payload) {
                direct::Delivery::Queued(_) => Ok(()),
                direct::Delivery::BadTopic => Err("bad_topic"),
                direct::Delivery::TooLarge => Err("too_large"),
            },
        }
    }
}

/// Reads what the router forwards to the agent's in-process connection (apps' requests) and
/// hands it to the bus task, like [`client_task`] does for an external broker.
async fn link_task(
    mut rx: rumqttd::local::LinkRx,
    in_tx: mpsc::Sender<Incoming>,
    cancel: CancellationToken,
) {
    loop {
        let notification = tokio::select! {
            // Shutdown.
            () = cancel.cancelled() => break,
            // `next` is cancellation-safe: it takes the router's notifications only after its
            // wake-up arrived.
            n = rx.next() => n,
        };
        match notification {
            Ok(Some(rumqttd::Notification::Forward(f))) => {
                let Ok(topic) = std::str::from_utf8(&f.publish.topic) else {
                    continue;
                };
                let msg = Incoming {
                    topic: guard::to_external(topic).to_owned(),
                    payload: f.publish.payload,
                };
                if in_tx.try_send(msg).is_err() {
                    metrics::dropped("in_queue_full", 1);
                }
            }
            // The router paused this connection because its queue was full; now drained.
            Ok(Some(rumqttd::Notification::Unschedule)) => {
                if rx.wake().await.is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                // The router is gone (it never stops on its own while the process lives).
                metrics::client_error();
                tracing::error!(error = %e, "mqtt: the embedded broker's router closed the agent's link");
                break;
            }
        }
    }
}

/// An incoming request.
struct Incoming {
    topic: String,
    payload: bytes::Bytes,
}

/// Drives rumqttc's event loop: (re)connects, subscribes after every CONNACK, hands
/// publishes to the bus task (dropping them when its queue is full).
async fn client_task(
    mut eventloop: EventLoop,
    client: AsyncClient,
    in_tx: mpsc::Sender<Incoming>,
    first_backoff: Duration,
    cancel: CancellationToken,
) {
    let mut backoff = first_backoff;
    let mut failing = false;
    loop {
        let event = tokio::select! {
            // Shutdown; dropping `poll` mid-way is fine, the connection is abandoned.
            () = cancel.cancelled() => break,
            // The next network event; `poll` is cancellation-safe for our use (rumqttc keeps
            // its state in the event loop, a dropped poll only abandons the read in progress,
            // and it is dropped only on shutdown).
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if failing {
                    tracing::info!("mqtt: client connected again");
                } else {
                    tracing::info!("mqtt: client connected");
                }
                failing = false;
                backoff = first_backoff;
                let subs = Topics::subscriptions()
                    .into_iter()
                    .map(|t| rumqttc::SubscribeFilter::new(t.to_owned(), QoS::AtMostOnce));
                if let Err(e) = client.try_subscribe_many(subs) {
                    tracing::warn!(error = %e, "mqtt: cannot queue the subscription");
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let msg = Incoming {
                    topic: p.topic,
                    payload: p.payload,
                };
                if in_tx.try_send(msg).is_err() {
                    metrics::dropped("in_queue_full", 1);
                }
            }
            Ok(_) => {}
            Err(e) => {
                metrics::client_error();
                if !failing {
                    // Logged once per outage, not on every retry.
                    tracing::warn!(error = %e, "mqtt: client disconnected; retrying");
                    failing = true;
                }
                tokio::select! {
                    // Shutdown during the pause.
                    () = cancel.cancelled() => break,
                    // The pause before the next attempt (poll reconnects).
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    let _ = client.try_disconnect();
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A token bucket: `rate` tokens per second, at most `rate` stored.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Self {
        Self {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The bus task's state.
struct Bus {
    twin: LocalTwin,
    outlet: Outlet,
    topics: Topics,
    limiter: Bucket,
    /// The last desired value seen per property (the `last` of a document).
    desired: HashMap<DeviceId, HashMap<PropertyId, DesiredValue>>,
    /// The last delta published per device.
    deltas: HashMap<DeviceId, BTreeMap<String, String>>,
    /// The last state published per device.
    states: HashMap<DeviceId, DeviceState>,
}

impl Bus {
    fn new(twin: LocalTwin, outlet: Outlet, max_requests_per_s: u32) -> Self {
        let topics = Topics::new(twin.node().as_str());
        let mut desired: HashMap<DeviceId, HashMap<PropertyId, DesiredValue>> = HashMap::new();
        let mut deltas = HashMap::new();
        for device in twin.devices() {
            let Some(doc) = twin.document(&device) else {
                continue;
            };
            for (p, t) in &doc.properties {
                if let Some(d) = &t.desired {
                    desired
                        .entry(device.clone())
                        .or_default()
                        .insert(p.clone(), d.clone());
                }
            }
            deltas.insert(device, kubeedge::delta_map(&doc.properties));
        }
        Self {
            twin,
            outlet,
            topics,
            limiter: Bucket::new(max_requests_per_s),
            desired,
            deltas,
            states: HashMap::new(),
        }
    }

    /// The bus loop: twin events out, requests in, until `cancel`.
    async fn run(
        mut self,
        mut events: broadcast::Receiver<TwinEvent>,
        mut requests: mpsc::Receiver<Incoming>,
        cancel: CancellationToken,
    ) {
        // The tunnel's state as of now, for apps that start before the first change.
        let connected = self.twin.uplink_connected();
        self.publish(
            self.topics.uplink(connected),
            kubeedge::uplink(connected, now_ms()),
            "uplink",
        );
        loop {
            tokio::select! {
                // Shutdown; cancellation-safe.
                () = cancel.cancelled() => break,
                // A twin event; `recv` is cancellation-safe.
                ev = events.recv() => match ev {
                    Ok(ev) => self.on_event(ev),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        metrics::dropped("lagged", n);
                        tracing::warn!(missed = n, "mqtt: the bus fell behind the twin; events lost");
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                // A request from an app; `recv` is cancellation-safe.
                req = requests.recv() => match req {
                    Some(req) => self.on_request(&req),
                    None => break,
                },
            }
        }
    }

    fn publish(&mut self, topic: String, payload: Vec<u8>, kind: &'static str) {
        match self.outlet.publish(topic, payload) {
            Ok(()) => metrics::sent(kind),
            Err(reason) => metrics::dropped(reason, 1),
        }
    }

    fn on_event(&mut self, ev: TwinEvent) {
        match ev {
            TwinEvent::Reported { device, samples } => self.on_reported(&device, &samples),
            TwinEvent::Desired {
                device,
                property,
                desired,
            } => self.on_desired(&device, &property, desired),
            TwinEvent::Applied {
                device,
                property,
                applied,
            } => self.on_applied(&device, &property, &applied),
            TwinEvent::Publish { topic, payload } => {
                self.publish(topic, payload.as_ref().clone(), "rule")
            }
            TwinEvent::Uplink { connected } => self.publish(
                self.topics.uplink(connected),
                kubeedge::uplink(connected, now_ms()),
                "uplink",
            ),
        }
    }

    fn on_reported(&mut self, device: &DeviceId, samples: &[Sample]) {
        if samples.is_empty() {
            return;
        }
        let topic = self.topics.telemetry(device.as_str());
        // Telemetry is the one message of every poll cycle: not built when nobody would get it.
        if self.outlet.wants(&topic) {
            self.publish(topic, kubeedge::telemetry(samples), "telemetry");
        }
        if let Some(state) = DeviceState::of_samples(samples)
            && self.states.get(device) != Some(&state)
        {
            self.states.insert(device.clone(), state);
            self.publish(
                Topics::state_update(device.as_str()),
                kubeedge::state(&kubeedge::new_event_id(), state, now_ms()),
                "state",
            );
        }
        // A reading can move a property into or out of the delta only if it has a desired
        // value.
        let touches_desired = self
            .desired
            .get(device)
            .is_some_and(|d| samples.iter().any(|s| d.contains_key(&s.property)));
        if touches_desired {
            self.publish_delta(device, false, samples);
        }
    }

    /// Publishes the device's delta: always when `force` and it is not empty (after a desired
    /// change, as KubeEdge does after an update), otherwise only when it changed. `latest` are
    /// samples newer than (or as new as) the twin's, from the event being handled.
    fn publish_delta(&mut self, device: &DeviceId, force: bool, latest: &[Sample]) {
        let (Some(spec), Some(mut doc)) = (self.twin.spec(device), self.twin.document(device))
        else {
            return;
        };
        for s in latest {
            if let Some(p) = doc.properties.get_mut(&s.property) {
                p.reported = Some(s.clone());
            }
        }
        let delta = kubeedge::delta_map(&doc.properties);
        let changed = self.deltas.get(device) != Some(&delta);
        if (force && !delta.is_empty()) || changed {
            let twin = kubeedge::twin_map(spec, &doc.properties);
            self.publish(
                Topics::update_delta(device.as_str()),
                kubeedge::delta(&kubeedge::new_event_id(), twin, &delta, now_ms()),
                "delta",
            );
        }
        self.deltas.insert(device.clone(), delta);
    }

    fn on_desired(&mut self, device: &DeviceId, property: &PropertyId, desired: DesiredValue) {
        let Some(spec) = self.twin.spec(device).cloned() else {
            return;
        };
        let Some(tag) = spec.tags.iter().find(|t| &t.property == property) else {
            return;
        };
        let reported = self
            .twin
            .document(device)
            .and_then(|d| d.properties.get(property).and_then(|p| p.reported.clone()));
        let last = self
            .desired
            .get(device)
            .and_then(|d| d.get(property))
            .cloned();
        let mut change = Map::new();
        change.insert(
            property.to_string(),
            serde_json::json!({
                "last": kubeedge::msg_twin(tag, reported.as_ref(), last.as_ref()),
                "current": kubeedge::msg_twin(tag, reported.as_ref(), Some(&desired)),
            }),
        );
        self.desired
            .entry(device.clone())
            .or_default()
            .insert(property.clone(), desired);
        self.publish(
            Topics::update_document(device.as_str()),
            kubeedge::document(&kubeedge::new_event_id(), change, now_ms()),
            "document",
        );
        self.publish_delta(device, true, &[]);
    }

    /// Publishes what became of a desired version. The value it concerns is the last desired
    /// value this task saw for the property, if its version matches: events arrive in the
    /// order they happened, so a newer value that superseded this one is not seen yet.
    fn on_applied(&mut self, device: &DeviceId, property: &PropertyId, applied: &Applied) {
        let desired = self
            .desired
            .get(device)
            .and_then(|d| d.get(property))
            .filter(|d| d.version == applied.version);
        self.publish(
            self.topics.applied(device.as_str()),
            kubeedge::applied(
                &kubeedge::new_event_id(),
                property.as_str(),
                applied,
                desired,
                now_ms(),
            ),
            "applied",
        );
    }

    fn on_request(&mut self, req: &Incoming) {
        let Some(request) = Topics::request(&req.topic) else {
            metrics::received("other");
            return;
        };
        if !self.limiter.take(Instant::now()) {
            metrics::dropped("rate_limited", 1);
            return;
        }
        match request {
            Request::Update(device) => {
                metrics::received("update");
                let payload = match self.update(device, &req.payload) {
                    Ok(ok) => ok,
                    Err(refusal) => self.refuse(device, "twin/update", &refusal),
                };
                self.publish(Topics::update_result(device), payload, "result");
            }
            Request::Get(device) => {
                metrics::received("get");
                let payload = match self.get(device, &req.payload) {
                    Ok(ok) => ok,
                    Err(refusal) => self.refuse(device, "twin/get", &refusal),
                };
                self.publish(Topics::get_result(device), payload, "result");
            }
        }
    }

    fn refuse(&self, device: &str, what: &'static str, refusal: &Refusal) -> Vec<u8> {
        metrics::request_error(refusal.code);
        tracing::debug!(
            device,
            request = what,
            code = refusal.code,
            reason = %refusal.reason(),
            "mqtt: request refused"
        );
        kubeedge::error_result(refusal, now_ms())
    }

    fn device(&self, device: &str, event_id: &str) -> Result<DeviceId, Refusal> {
        DeviceId::new(device)
            .ok()
            .filter(|d| self.twin.spec(d).is_some())
            .ok_or_else(|| {
                Refusal::whole(
                    event_id,
                    kubeedge::CODE_NOT_FOUND,
                    format!(
                        "device {device:?} is not configured on node {}",
                        self.twin.node()
                    ),
                )
            })
    }

    fn update(&self, device: &str, payload: &[u8]) -> Result<Vec<u8>, Refusal> {
        let doc = kubeedge::parse_json(payload)?;
        let event_id = kubeedge::parse_get(&doc);
        let id = self.device(device, &event_id)?;
        let Some(spec) = self.twin.spec(&id) else {
            return Err(Refusal::whole(
                &event_id,
                kubeedge::CODE_NOT_FOUND,
                "unknown device",
            ));
        };
        let update = kubeedge::parse_update(&doc, spec)?;
        if !update.problems.is_empty() {
            // Every problem at once: also those the twin would find in the values that did
            // convert.
            let mut problems = update.problems;
            if let Err(more) = crate::values::from_json_map(spec, &update.values) {
                problems.extend(more.into_iter().filter(|f| !f.field.is_empty()).map(|f| {
                    kubeedge::Problem {
                        property: f.field,
                        message: f.message,
                    }
                }));
            }
            return Err(Refusal {
                event_id,
                code: kubeedge::CODE_BAD_REQUEST,
                problems,
            });
        }
        match self.twin.set_desired(&id, &update.values) {
            Ok(()) => Ok(kubeedge::update_result(&event_id, &update.values, now_ms())),
            Err(SetError::Invalid(fields)) => Err(Refusal {
                event_id,
                code: kubeedge::CODE_BAD_REQUEST,
                problems: fields
                    .into_iter()
                    .map(|f| kubeedge::Problem {
                        property: f.field,
                        message: f.message,
                    })
                    .collect(),
            }),
            Err(SetError::UnknownDevice(d)) => Err(Refusal::whole(
                &event_id,
                kubeedge::CODE_NOT_FOUND,
                format!("device {d:?} is not configured"),
            )),
            Err(e) => Err(Refusal::whole(
                &event_id,
                kubeedge::CODE_INTERNAL,
                e.to_string(),
            )),
        }
    }

    fn get(&self, device: &str, payload: &[u8]) -> Result<Vec<u8>, Refusal> {
        let doc = kubeedge::parse_json(payload)?;
        let event_id = kubeedge::parse_get(&doc);
        let id = self.device(device, &event_id)?;
        let (Some(spec), Some(twin)) = (self.twin.spec(&id), self.twin.document(&id)) else {
            return Err(Refusal::whole(
                &event_id,
                kubeedge::CODE_NOT_FOUND,
                "unknown device",
            ));
        };
        let map = kubeedge::twin_map(spec, &twin.properties);
        Ok(kubeedge::get_result(&event_id, map, now_ms()))
    }
}
