//! The embedded broker: rumqttd's router and one MQTT 3.1.1 listener on a private loopback port,
//! behind the [guard](super::guard) on the configured address. The agent itself is not a
//! network client of its own broker: apps' requests reach it through a rumqttd local link (no
//! socket, no MQTT encoding; see [`AgentLink`]), and its own messages go straight to the guard's
//! connections ([`direct`](super::direct)), not through rumqttd.
//!
//! Everything runs on one thread of its own ("mqtt-broker", a current-thread tokio runtime),
//! so a busy or hostile client costs that thread, not the agent's pipeline. rumqttd's router
//! runs on a thread it starts itself ("router-0"); rumqttd has no way to stop it, so it stays
//! (idle) until the process exits.
//!
//! rumqttd's limits, all small (memory is bounded by them; see `docs/mqtt.md`):
//! - one log per subscription filter of at most `segment_count` segments of `segment_bytes`
//!   (plus the one packet that overflows a segment); a subscriber further behind loses the
//!   oldest messages;
//! - `max_payload_size` = `max_packet_bytes`, `max_inflight_count` = `max_inflight`;
//! - at most `64` packets queued per connection by the router per round;
//! - `max_connections` = twice the guard's limit plus headroom (the guard enforces the real
//!   limit; rumqttd's own check must never fire, see the guard's docs);
//! - its internal listener requires a random per-process user and password and drops a
//!   connection that sends no CONNECT within 1 s.

use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::task::Poll;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::MqttError;
use super::direct::Direct;
use super::guard::{self, GuardConfig};
use crate::config::{EmbeddedBroker, MqttConfig};

/// The running embedded broker.
pub(crate) struct Embedded {
    /// Where the guard listens (the actual port when `listen` asked for port 0).
    pub local_addr: SocketAddr,
    /// The agent's own in-process connection to the router (to receive apps' requests).
    pub link: AgentLink,
    /// Where the agent's own messages go (straight to the guard's connections).
    pub direct: Arc<Direct>,
    /// Ends when the broker thread has stopped (after `cancel`).
    pub handle: JoinHandle<()>,
}

/// The client id of the agent's in-process connection.
const AGENT_CLIENT_ID: &str = "edgesync-agent";

/// The agent's in-process connection to rumqttd's router: its subscriptions go in, requests
/// of apps come out as notifications. Topics are as rumqttd sees them (`$x` mapped to `_$x`,
/// like the guard does for apps).
pub(crate) struct AgentLink {
    /// Subscriptions into the router.
    pub tx: rumqttd::local::LinkTx,
    /// What the router forwards to the agent (apps' requests).
    pub rx: rumqttd::local::LinkRx,
}

/// A random secret of 32 hex digits from the ring provider's system RNG.
fn secret() -> Result<String, MqttError> {
    let mut b = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut b)
        .map_err(|_| MqttError::Random)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Starts the embedded broker; returns once the guard and rumqttd's listener are bound.
pub(crate) async fn start(
    cfg: &EmbeddedBroker,
    common: &MqttConfig,
    client_login: Option<(String, Vec<u8>)>,
    reserved: Vec<String>,
    cancel: CancellationToken,
) -> Result<Embedded, MqttError> {
    let listener = std::net::TcpListener::bind(cfg.listen).map_err(|source| MqttError::Listen {
        addr: cfg.listen,
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| MqttError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| MqttError::Listen {
        addr: cfg.listen,
        source,
    })?;
    let upstream_login = ("edgesync-guard".to_owned(), secret()?);

    let router = rumqttd::RouterConfig {
        max_connections: 2 * (cfg.max_connections + 1) + 8,
        max_outgoing_packet_count: 64,
        max_segment_size: cfg.segment_bytes,
        max_segment_count: cfg.segment_count,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 1000,
        max_payload_size: common.max_packet_bytes,
        max_inflight_count: cfg.max_inflight,
        auth: Some(HashMap::from([upstream_login.clone()])),
        external_auth: None,
        dynamic_filters: true,
    };
    // A connection's queue of the agent's messages holds what rumqttd's log of one
    // subscription filter held.
    let direct = Direct::new(cfg.segment_bytes.saturating_mul(cfg.segment_count));
    let guard_cfg = GuardConfig {
        upstream: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        upstream_login,
        client_login,
        max_connections: cfg.max_connections,
        max_packet_bytes: common.max_packet_bytes,
        connect_timeout: common.connect_timeout,
        max_topics: cfg.max_topics,
        reserved,
        direct: direct.clone(),
    };

    let (ready_tx, ready_rx) = oneshot::channel::<Result<AgentLink, MqttError>>();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let thread_cancel = cancel.clone();
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            broker_thread(
                listener,
                router,
                connections,
                guard_cfg,
                thread_cancel,
                ready_tx,
            );
            let _ = done_tx.send(());
        })
        .map_err(MqttError::Thread)?;
    let link = match ready_rx.await {
        Ok(Ok(link)) => link,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(MqttError::BrokerStopped),
    };
    tracing::info!(listen = %local_addr, "mqtt: embedded broker listening");
    let handle = tokio::spawn(async move {
        let _ = done_rx.await;
    });
    Ok(Embedded {
        local_addr,
        link,
        direct,
        handle,
    })
}

/// The broker thread: binds rumqttd's internal listener, then runs it and the guard until
/// `cancel`.
fn broker_thread(
    listener: std::net::TcpListener,
    router: rumqttd::RouterConfig,
    connections: rumqttd::ConnectionSettings,
    mut guard_cfg: GuardConfig,
    cancel: CancellationToken,
    ready: oneshot::Sender<Result<AgentLink, MqttError>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let _ = ready.send(Err(MqttError::Thread(e)));
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(source) => {
                let _ = ready.send(Err(MqttError::Listen {
                    addr: guard_cfg.upstream,
                    source,
                }));
                return;
            }
        };
        let router_tx = rumqttd::Router::new(0, router).spawn();
        // The agent's own connection. `build` waits (briefly, on this thread) for the router's
        // answer. Its client id cannot collide with the guard's, which are `g<n>`.
        let link = match rumqttd::local::LinkBuilder::new(AGENT_CLIENT_ID, router_tx.clone())
            .build()
        {
            Ok((tx, rx, _connack)) => AgentLink { tx, rx },
            Err(e) => {
                let _ = ready.send(Err(MqttError::Link(e.to_string())));
                return;
            }
        };
        // rumqttd binds its listener itself, from an address: find a free loopback port, then
        // check it bound (the first poll of `start` binds; a port taken in between is an
        // error there, and another port is tried).
        let mut attempt = 0;
        let (mut start, addr) = loop {
            attempt += 1;
            let addr = match std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .and_then(|l| l.local_addr())
            {
                Ok(a) => a,
                Err(source) => {
                    let _ = ready.send(Err(MqttError::Listen {
                        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                        source,
                    }));
                    return;
                }
            };
            let settings = rumqttd::ServerSettings {
                name: "edgesync-internal".into(),
                listen: addr,
                tls: None,
                next_connection_delay_ms: 0,
                connections: connections.clone(),
            };
            let server =
                rumqttd::Server::new(settings, router_tx.clone(), rumqttd::protocol::v4::V4);
            let mut start = Box::pin(async move {
                let mut server = server;
                server.start(rumqttd::LinkType::Remote).await
            });
            let bound =
                std::future::poll_fn(|cx| Poll::Ready(start.as_mut().poll(cx).is_pending())).await;
            if bound {
                break (start, addr);
            }
            if attempt >= 10 {
                let _ = ready.send(Err(MqttError::Listen {
                    addr,
                    source: std::io::Error::other("rumqttd could not bind a loopback port"),
                }));
                return;
            }
        };
        guard_cfg.upstream = addr;
        let _ = ready.send(Ok(link));
        tokio::select! {
            // The guard, until shutdown (it watches `cancel` itself).
            () = guard::run(listener, guard_cfg, cancel.clone()) => {}
            // rumqttd's listener; it returns only on an error.
            r = start.as_mut() => {
                tracing::error!(result = ?r.err().map(|e| e.to_string()), "mqtt: rumqttd's listener stopped");
            }
            // Shutdown.
            () = cancel.cancelled() => {}
        }
    });
    // Dropping the runtime drops every connection task of the guard and of rumqttd.
    drop(runtime);
}
