//! The QUIC uplink: drives an [`EdgeSession`] over a quinn connection to the hub.
//!
//! One task. It (re)connects with jittered exponential backoff, presents the agent's current
//! SVID, accepts only the configured hub id, opens one bidirectional stream and pumps the
//! session: frames in, outbox records out, acknowledged records deleted from the outbox.
//! In-flight records return to pending on every disconnect and are replayed.
//!
//! When the SVID rotates, the connection (authenticated with the previous certificate) is
//! replaced make-before-break: a new connection is handshaken with the new SVID while the
//! old one keeps carrying records, and only once it is up is the old one closed and the
//! session resumed on the new one (the hub skips records it already stored). If the new
//! handshake fails (say the hub does not trust a new CA yet), the old connection stays and the
//! switch is tried again every [`SWITCH_RETRY`].

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use edgesync_protocol::DeviceId;
use edgesync_protocol::frame::{
    self, Body, DEFAULT_MAX_FRAME_LEN, Frame, FrameDecoder, FrameError, Goodbye,
};
use edgesync_protocol::session::{EdgeConfig, EdgeEvent, EdgeSession, Transmit};
use edgesync_protocol::spiffe_id::SpiffeId;
use edgesync_protocol::tls::{self, Identity, SvidStore, TrustBundle};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::local::{LocalTwin, TwinEvent};
use crate::store::AgentStore;

/// Settings of the uplink.
#[derive(Debug, Clone)]
pub struct UplinkConfig {
    /// Hub address, `host:port`.
    pub hub_address: String,
    /// The hub's SPIFFE ID (the only server id accepted).
    pub hub_id: SpiffeId,
    /// Our SVID and the trust bundle, kept current as they rotate (see
    /// [`svid_files`](edgesync_protocol::svid_files)).
    pub svid: Arc<SvidStore>,
    /// Changes when the SVID rotates: the live connection, authenticated with the previous
    /// certificate, is then replaced by one that presents the new one. `None`: never.
    pub svid_rotated: Option<watch::Receiver<u64>>,
    /// Connection establishment timeout.
    pub connect_timeout: Duration,
    /// Keep-alive interval (QUIC and session pings).
    pub keepalive: Duration,
    /// Idle timeout: a silent path is declared dead after this.
    pub idle_timeout: Duration,
    /// First reconnect delay.
    pub backoff_initial: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Most records per frame.
    pub batch_max_records: usize,
    /// Agent version string.
    pub agent_version: String,
    /// This run's boot id.
    pub boot_id: String,
}

/// What the uplink reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UplinkStatus {
    /// Whether a session is established.
    pub connected: bool,
    /// Highest sequence number acknowledged by the hub.
    pub acked: u64,
    /// The last connection error, if any.
    pub last_error: Option<String>,
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UplinkError {
    /// Reading the identity files failed.
    #[error("identity: {0}")]
    Identity(String),
    /// TLS material was refused.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The hub address does not resolve.
    #[error("cannot resolve hub address {0}")]
    Resolve(String),
    /// Connecting failed.
    #[error("connect: {0}")]
    Connect(String),
    /// The connection broke.
    #[error("connection: {0}")]
    Connection(String),
    /// The hub sent bytes that do not decode.
    #[error("bad frame from hub: {0}")]
    Frame(#[from] FrameError),
    /// The session closed.
    #[error("session: {0}")]
    Session(String),
    /// The outbox failed.
    #[error("outbox: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The outbox lost records (history dropped, or new records refused, when full);
    /// reconnecting tells the hub (the hello's `oldest_seq`).
    #[error("outbox lost records {0}..={1} (full); reconnecting to report the gap")]
    Dropped(u64, u64),
    /// Our SVID rotated: the connection was replaced by one that presents the new one
    /// (already established when this is returned, unless the old one broke first).
    #[error("our SVID rotated; the connection was replaced by one that presents it")]
    SvidRotated,
}

/// Reads an SVID and bundle from PEM files once (for tools and tests; the agent keeps its
/// store current with a [`Watcher`](edgesync_protocol::svid_files::Watcher)).
pub fn svid_from_files(
    cert: &Path,
    key: &Path,
    bundle: &Path,
) -> Result<Arc<SvidStore>, UplinkError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| UplinkError::Identity(format!("{}: {e}", p.display())))
    };
    let id = Identity::from_pem(&read(cert)?, &read(key)?)?;
    let bundle = TrustBundle::from_pem(&read(bundle)?)?;
    Ok(SvidStore::new(id, bundle)?)
}

/// Resolves when the SVID watcher reports a rotation (`Err` once it is gone); never without a
/// watcher.
async fn rotation(rx: &mut Option<watch::Receiver<u64>>) -> Result<(), watch::error::RecvError> {
    match rx {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

/// A connection error, with what a TLS alert from the hub means for us: with TLS 1.3 the
/// client's handshake completes before the hub has checked its certificate, so a refusal of
/// our SVID arrives as an alert that closes the connection.
fn explain(e: &quinn::ConnectionError) -> String {
    let code = match e {
        quinn::ConnectionError::ConnectionClosed(c) => u64::from(c.error_code),
        quinn::ConnectionError::TransportError(t) => u64::from(t.code),
        _ => return e.to_string(),
    };
    // QUIC carries TLS alerts as the transport error codes 0x100 + alert (RFC 9001, 4.8).
    let why = match code.checked_sub(0x100) {
        Some(42) => {
            "the hub refused our certificate (bad_certificate: e.g. our SPIFFE ID is not an accepted node id, or the leaf is not an X.509-SVID)"
        }
        Some(44) => "the hub refused our certificate (revoked)",
        Some(45) => "the hub refused our certificate: it has expired",
        Some(46) => "the hub refused our certificate (certificate_unknown)",
        Some(48) => {
            "the hub does not trust the CA of our certificate (unknown_ca): not in its bundle for our trust domain"
        }
        Some(116) => {
            "the hub requires a certificate and we presented none (our SVID is withdrawn?)"
        }
        _ => return e.to_string(),
    };
    format!("{why} [{e}]")
}

/// How long after a failed make-before-break handshake the switch is tried again.
pub const SWITCH_RETRY: Duration = Duration::from_secs(2);

/// A handshake in progress for the connection that replaces the live one.
type Switch = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<quinn::Connection, UplinkError>> + Send>,
>;

/// The round-trip time assumed until one is measured (see [`client_config`]).
pub const INITIAL_RTT: Duration = Duration::from_millis(100);

/// Builds the quinn client config for `cfg` (its handshakes present the store's current SVID).
pub fn client_config(cfg: &UplinkConfig) -> Result<quinn::ClientConfig, UplinkError> {
    let crypto = tls::client_config(cfg.svid.clone(), cfg.hub_id.clone())?;
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
        .map_err(|e| UplinkError::Connect(e.to_string()))?;
    let mut cc = quinn::ClientConfig::new(Arc::new(qc));
    let mut transport = quinn::TransportConfig::default();
    // Before the first round trip is measured, lost handshake packets are sent again after
    // three times this (RFC 9002 suggests 333 ms: 1 s, then 2 s, 4 s...). When a hub comes
    // back, or is busy with a whole fleet reconnecting, Initials are lost; 100 ms (as browsers
    // use) makes the next try come within 0.3 s. On a slow link this costs a few spare
    // handshake packets, never a failed connection.
    transport.initial_rtt(INITIAL_RTT);
    transport.keep_alive_interval(Some(cfg.keepalive));
    if let Ok(idle) = quinn::IdleTimeout::try_from(cfg.idle_timeout) {
        transport.max_idle_timeout(Some(idle));
    }
    cc.transport_config(Arc::new(transport));
    Ok(cc)
}

/// When the hub has not answered a handshake at all within this, the third Initial has left
/// (quinn resends an unanswered Initial after 3 x [`INITIAL_RTT`], then 6 x, 12 x...).
const THIRD_INITIAL: Duration = Duration::from_millis(9 * INITIAL_RTT.as_millis() as u64);

/// How long a connection attempt waits for the hub's first answer before it ends, so that the
/// next attempt sends a new Initial at once instead of quinn's ever longer resend intervals
/// (after 2.1 s the next resend would come 2.4 s later: a hub that came back in between would
/// wait for it). Long enough for the third Initial and its answer on the path last measured
/// (at least [`MIN_ANSWER_WAIT`] after it); never longer than `connect_timeout`. Before any
/// round trip to the hub was measured, the whole `connect_timeout`: a slow link is never cut
/// short by a guess.
fn answer_wait(last_rtt: Option<Duration>, connect_timeout: Duration) -> Duration {
    match last_rtt {
        None => connect_timeout,
        Some(rtt) => (THIRD_INITIAL + (rtt * 4).max(MIN_ANSWER_WAIT)).min(connect_timeout),
    }
}

/// The least time [`answer_wait`] leaves for the answer to the third Initial.
const MIN_ANSWER_WAIT: Duration = Duration::from_millis(100);

/// The uplink endpoint's UDP socket, counting the datagrams it receives. A connection attempt
/// that received anything while it waited has heard from the hub (whose first answer to any
/// attempt is a stateless Retry, cheap for it even when a whole fleet reconnects), so it is
/// given the whole connect timeout: only an attempt met by silence ends early.
#[derive(Debug)]
struct CountingSocket {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
    received: Arc<AtomicU64>,
}

impl quinn::AsyncUdpSocket for CountingSocket {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = self.inner.poll_recv(cx, bufs, meta);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.received.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// A client endpoint bound to `bind` whose received datagrams are counted in `received`.
fn counting_endpoint(
    bind: SocketAddr,
    received: Arc<AtomicU64>,
) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(bind)?;
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
    let inner = runtime.wrap_udp_socket(socket)?;
    quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        Arc::new(CountingSocket { inner, received }),
        runtime,
    )
}

/// Waits for the handshake of `connecting`, at most `timeout` in all; gives up after
/// `answer_wait` if the endpoint received nothing at all meanwhile (`received` counts its
/// datagrams) and the hub's first flight of handshake packets has not arrived.
async fn handshake(
    mut connecting: quinn::Connecting,
    timeout: Duration,
    answer_wait: Duration,
    received: &AtomicU64,
) -> Result<quinn::Connection, UplinkError> {
    let deadline = Instant::now() + timeout;
    let before = received.load(Ordering::Relaxed);
    match tokio::time::timeout(answer_wait.min(timeout), connecting.handshake_data()).await {
        Err(_) if received.load(Ordering::Relaxed) == before => {
            return Err(UplinkError::Connect(format!(
                "no answer from the hub within {answer_wait:?}"
            )));
        }
        // Something arrived: the hub is there, busy or slow; the whole timeout.
        Err(_) => {}
        Ok(Err(e)) => return Err(UplinkError::Connect(explain(&e))),
        Ok(Ok(_)) => {}
    }
    established(connecting, deadline, timeout).await
}

/// Waits for `connecting` until `deadline` (`timeout` after the attempt began, for the error).
async fn established(
    connecting: quinn::Connecting,
    deadline: Instant,
    timeout: Duration,
) -> Result<quinn::Connection, UplinkError> {
    match tokio::time::timeout_at(deadline, connecting).await {
        Err(_) => Err(UplinkError::Connect(format!("timed out after {timeout:?}"))),
        Ok(Err(e)) => Err(UplinkError::Connect(explain(&e))),
        Ok(Ok(c)) => Ok(c),
    }
}

/// The uplink task. Runs until `cancel` fires.
pub struct Uplink {
    cfg: UplinkConfig,
    store: Arc<Mutex<AgentStore>>,
    appended: watch::Receiver<u64>,
    dropped: watch::Receiver<Option<(u64, u64)>>,
    status: watch::Sender<UplinkStatus>,
    cancel: CancellationToken,
    origin: Instant,
    downlink: Option<DownlinkLink>,
    /// The retry hint of the hub's last close, if it gave one ([`edgesync_protocol::close`]).
    retry_hint: Option<Duration>,
    /// Devices whose schema is still to be sent on this connection.
    schemas_due: std::collections::VecDeque<DeviceId>,
    /// A connection established make-before-break, to drive next.
    next_conn: Option<quinn::Connection>,
    /// The round trip time of the last connection to the hub, when it ended.
    last_rtt: Option<Duration>,
    /// Datagrams the endpoint received (see [`CountingSocket`]).
    received: Arc<AtomicU64>,
}

/// How the uplink talks to the downlink (protocol version 2).
pub struct DownlinkLink {
    /// Desired values from the hub, to the downlink.
    pub to_downlink: mpsc::Sender<edgesync_protocol::frame::DesiredFrame>,
    /// The control log's next sequence number, from the downlink.
    pub control_next: watch::Receiver<u64>,
    /// The highest desired version taken over, from the downlink.
    pub last_downlink: watch::Receiver<u64>,
    /// The local twin (schemas after welcome, uplink events).
    pub twin: LocalTwin,
}

impl Uplink {
    /// Builds the task. `appended` carries the outbox's next sequence number after each
    /// commit; `dropped` the last history dropped from a full outbox.
    pub fn new(
        cfg: UplinkConfig,
        store: Arc<Mutex<AgentStore>>,
        appended: watch::Receiver<u64>,
        dropped: watch::Receiver<Option<(u64, u64)>>,
        status: watch::Sender<UplinkStatus>,
        cancel: CancellationToken,
    ) -> Self {
        Uplink {
            cfg,
            store,
            appended,
            dropped,
            status,
            cancel,
            origin: Instant::now(),
            downlink: None,
            retry_hint: None,
            schemas_due: std::collections::VecDeque::new(),
            next_conn: None,
            last_rtt: None,
            received: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Adds desired values and the control log (protocol version 2).
    pub fn with_downlink(mut self, d: DownlinkLink) -> Self {
        self.downlink = Some(d);
        self
    }

    fn now(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// Runs the reconnect loop.
    pub async fn run(mut self) {
        let (acked, next, store_id) = {
            let st = self.store.lock().await;
            (st.acked(), st.sendable_next(), st.store_id().to_owned())
        };
        let scfg = EdgeConfig {
            agent_version: self.cfg.agent_version.clone(),
            boot_id: self.cfg.boot_id.clone(),
            keepalive_ms: self.cfg.keepalive.as_millis() as u64,
            idle_timeout_ms: self.cfg.idle_timeout.as_millis() as u64,
            max_batch_records: self.cfg.batch_max_records,
            store_id,
            ..EdgeConfig::default()
        };
        let (ctl_acked, ctl_next) = {
            let st = self.store.lock().await;
            (st.control_acked(), st.control_next())
        };
        let mut session = EdgeSession::new(scfg, acked, next).with_control(ctl_acked, ctl_next);
        let mut backoff = self.cfg.backoff_initial;
        // The hub's last retry hint and until when it applies.
        let mut hinted: Option<(Duration, Instant)> = None;
        let mut endpoint: Option<quinn::Endpoint> = None;
        loop {
            if self.cancel.is_cancelled() {
                break;
            }
            let started = Instant::now();
            let result = self.connect_and_drive(&mut session, &mut endpoint).await;
            session.handle_disconnected();
            let welcomed = self.status.borrow().connected;
            self.status.send_modify(|s| {
                s.connected = false;
                if let Err(e) = &result {
                    s.last_error = Some(e.to_string());
                }
            });
            metrics::gauge!("edgesync_uplink_connected").set(0.0);
            if welcomed && let Some(d) = &self.downlink {
                d.twin.emit(TwinEvent::Uplink { connected: false });
            }
            match &result {
                Ok(()) => break,
                Err(UplinkError::SvidRotated) => {
                    tracing::info!(
                        hub = %self.cfg.hub_address,
                        replaced = self.next_conn.is_some(),
                        "our SVID rotated: the session continues on a connection that presents it"
                    );
                    metrics::counter!("edgesync_uplink_svid_reconnects_total").increment(1);
                    // At once: the outbox resends what the hub had not acknowledged, and the
                    // hub skips what it already stored.
                    continue;
                }
                Err(e) => {
                    metrics::counter!("edgesync_uplink_disconnects_total").increment(1);
                    tracing::warn!(error = %e, hub = %self.cfg.hub_address, "uplink down");
                }
            }
            // A connection that lived a while resets the backoff; a storm of failures grows it.
            if welcomed && started.elapsed() > Duration::from_secs(5) {
                backoff = self.cfg.backoff_initial;
            }
            // The hub closed with a hint (it restarts, or it is full): until the next session,
            // every attempt waits a random moment within it instead of backing off (attempts
            // while a restarting hub is down are refused or unanswered, and should not push
            // the agent's return far behind the hub's), for at most `backoff_max`.
            if let Some(within) = self.retry_hint.take() {
                let within = within.min(self.cfg.backoff_max);
                tracing::info!(
                    within_ms = within.as_millis() as u64,
                    "reconnecting at the moments the hub's hint allows"
                );
                hinted = Some((within, Instant::now() + self.cfg.backoff_max));
            } else if welcomed {
                hinted = None;
            }
            let delay = match hinted.filter(|(_, until)| Instant::now() < *until) {
                Some((within, _)) => {
                    backoff = self.cfg.backoff_initial;
                    Duration::from_millis(fastrand::u64(0..=within.as_millis() as u64))
                }
                None => {
                    let delay = jitter(backoff);
                    backoff = (backoff * 2).min(self.cfg.backoff_max);
                    delay
                }
            };
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
                // A rotated SVID may be what the hub was waiting for (ours had expired while
                // the gateway was offline): try it at once.
                r = rotation(&mut self.cfg.svid_rotated) => {
                    if r.is_err() {
                        self.cfg.svid_rotated = None;
                    } else {
                        backoff = self.cfg.backoff_initial;
                    }
                }
            }
        }
        if let Some(ep) = endpoint {
            ep.close(0u32.into(), b"shutdown");
            // Give the close frame a moment to leave; bounded.
            let _ = tokio::time::timeout(Duration::from_millis(200), ep.wait_idle()).await;
        }
    }

    async fn connect_and_drive(
        &mut self,
        session: &mut EdgeSession,
        endpoint: &mut Option<quinn::Endpoint>,
    ) -> Result<(), UplinkError> {
        let cc = client_config(&self.cfg)?;
        if let Some(conn) = self.next_conn.take() {
            // Established make-before-break when our SVID rotated.
            return self.drive_and_close(session, conn, endpoint).await;
        }
        let addr: SocketAddr = tokio::net::lookup_host(&self.cfg.hub_address)
            .await
            .map_err(|e| UplinkError::Resolve(format!("{}: {e}", self.cfg.hub_address)))?
            .next()
            .ok_or_else(|| UplinkError::Resolve(self.cfg.hub_address.clone()))?;
        let ep = match endpoint {
            Some(ep) => ep.clone(),
            None => {
                let bind: SocketAddr = if addr.is_ipv6() {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                } else {
                    (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
                };
                let ep = counting_endpoint(bind, self.received.clone())
                    .map_err(|e| UplinkError::Connect(format!("bind: {e}")))?;
                *endpoint = Some(ep.clone());
                ep
            }
        };
        let connecting = ep
            .connect_with(cc, addr, "edgesync-hub")
            .map_err(|e| UplinkError::Connect(e.to_string()))?;
        let answer_wait = answer_wait(self.last_rtt, self.cfg.connect_timeout);
        let conn = tokio::select! {
            _ = self.cancel.cancelled() => return Ok(()),
            r = handshake(connecting, self.cfg.connect_timeout, answer_wait, &self.received) => r?,
        };
        self.drive_and_close(session, conn, endpoint).await
    }

    /// Starts the handshake of a connection that will replace the live one (it presents the
    /// SVID current now).
    fn start_switch(&self, ep: quinn::Endpoint, addr: SocketAddr) -> Switch {
        let cc = client_config(&self.cfg);
        let timeout = self.cfg.connect_timeout;
        Box::pin(async move {
            let connecting = ep
                .connect_with(cc?, addr, "edgesync-hub")
                .map_err(|e| UplinkError::Connect(e.to_string()))?;
            established(connecting, Instant::now() + timeout, timeout).await
        })
    }

    /// Drives `conn` until it ends; keeps a connection established make-before-break for the
    /// next round, even when the old one broke while the new one was being handshaken (the
    /// hub closes a node's older connection once its newer one is authenticated).
    async fn drive_and_close(
        &mut self,
        session: &mut EdgeSession,
        conn: quinn::Connection,
        endpoint: &mut Option<quinn::Endpoint>,
    ) -> Result<(), UplinkError> {
        let ep = endpoint.clone();
        let addr = conn.remote_address();
        let mut switch: Option<Switch> = None;
        let mut result = self.drive_conn(session, &conn, ep, addr, &mut switch).await;
        self.last_rtt = Some(conn.rtt());
        if let (Err(e), Some(pending)) = (&result, switch.take())
            && !matches!(e, UplinkError::SvidRotated)
        {
            match pending.await {
                Ok(next) => {
                    tracing::debug!(error = %e, "the old connection ended while its replacement was being established");
                    self.next_conn = Some(next);
                    result = Err(UplinkError::SvidRotated);
                }
                Err(e2) => tracing::warn!(error = %e2, "the replacement connection failed too"),
            }
        }
        if self.next_conn.is_some() {
            // The old connection was replaced: its close reason is ours, not a hub's hint.
            self.retry_hint = None;
            return result;
        }
        self.retry_hint = match conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c)) => {
                edgesync_protocol::close::retry_hint(&c.reason)
            }
            _ => None,
        };
        result
    }

    /// Runs the session on an established connection until it ends. A rotation of our SVID
    /// starts `switch`, the handshake of the replacing connection.
    async fn drive_conn(
        &mut self,
        session: &mut EdgeSession,
        conn: &quinn::Connection,
        ep: Option<quinn::Endpoint>,
        addr: SocketAddr,
        switch: &mut Option<Switch>,
    ) -> Result<(), UplinkError> {
        // When a failed switch is to be tried again.
        let mut switch_retry: Option<Instant> = None;
        self.schemas_due.clear();
        // This connection presents the SVID current now: only a later rotation replaces it.
        if let Some(rx) = &mut self.cfg.svid_rotated {
            rx.borrow_and_update();
        }
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| UplinkError::Connection(explain(&e)))?;
        metrics::counter!("edgesync_uplink_connects_total").increment(1);
        if let Some(d) = &mut self.downlink {
            session.set_last_downlink(*d.last_downlink.borrow_and_update());
            session.handle_control_appended(*d.control_next.borrow_and_update());
        }
        {
            // Losses while we were away (history dropped offline) count as handled: the hello
            // tells the hub where the outbox starts now.
            let st = self.store.lock().await;
            session.handle_lost(st.acked());
            session.handle_appended(st.sendable_next());
        }
        session.handle_connected(self.now());
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        let mut buf = vec![0u8; 64 * 1024];
        let mut out = BytesMut::new();
        let mut last_dropped = *self.dropped.borrow_and_update();
        session.handle_appended(*self.appended.borrow_and_update());
        loop {
            // Act on everything the session wants before waiting again.
            self.handle_events(session).await?;
            out.clear();
            while let Some(t) = session.poll_transmit() {
                let frame = match t {
                    Transmit::Frame(body) => Some(Frame { body: Some(body) }),
                    Transmit::Control { first_seq, count } => {
                        let recs = self.store.lock().await.read_control(first_seq, count)?;
                        for rec in recs {
                            frame::encode_frame(
                                &Frame {
                                    body: Some(Body::Control(rec)),
                                },
                                DEFAULT_MAX_FRAME_LEN,
                                &mut out,
                            )?;
                        }
                        continue;
                    }
                    Transmit::Records { first_seq, count } => {
                        // Copied from the outbox's encoded groups (cached, or read from its log).
                        let runs = self.store.lock().await.read_runs(first_seq, count)?;
                        metrics::counter!("edgesync_uplink_records_sent_total")
                            .increment(count as u64);
                        let batches: Vec<&[u8]> = runs.iter().map(|(g, r)| &g[r.clone()]).collect();
                        frame::encode_records_batches(
                            first_seq,
                            &batches,
                            session.backlog(),
                            DEFAULT_MAX_FRAME_LEN,
                            &mut out,
                        )?;
                        None
                    }
                };
                if let Some(frame) = frame {
                    frame::encode_frame(&frame, DEFAULT_MAX_FRAME_LEN, &mut out)?;
                }
                if out.len() >= 256 * 1024 {
                    send.write_all(&out)
                        .await
                        .map_err(|e| UplinkError::Connection(e.to_string()))?;
                    out.clear();
                }
            }
            // Device schemas due since the welcome: one alive at a time (at 100,000 tags all
            // of them at once would take about 17 MB).
            while let Some(device) = self.schemas_due.pop_front() {
                let Some(spec) = self.downlink.as_ref().and_then(|d| d.twin.spec(&device)) else {
                    continue;
                };
                let schema = Frame {
                    body: Some(Body::Schema(crate::values::schema(spec))),
                };
                frame::encode_frame(&schema, DEFAULT_MAX_FRAME_LEN, &mut out)?;
                if out.len() >= 256 * 1024 {
                    send.write_all(&out)
                        .await
                        .map_err(|e| UplinkError::Connection(e.to_string()))?;
                    out.clear();
                }
            }
            if !out.is_empty() {
                send.write_all(&out)
                    .await
                    .map_err(|e| UplinkError::Connection(e.to_string()))?;
            }
            self.handle_events(session).await?;
            let deadline = session
                .poll_timeout()
                .map(|t| self.origin + Duration::from_millis(t))
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                // Shutdown: say goodbye, bounded.
                _ = self.cancel.cancelled() => {
                    let bye = Frame { body: Some(Body::Goodbye(Goodbye { reason: "agent shutting down".into() })) };
                    if let Ok(b) = frame::frame_bytes(&bye, DEFAULT_MAX_FRAME_LEN) {
                        let _ = tokio::time::timeout(Duration::from_millis(200), send.write_all(&b)).await;
                    }
                    let _ = send.finish();
                    conn.close(0u32.into(), b"bye");
                    return Ok(());
                }
                // Bytes from the hub (RecvStream::read is cancel-safe).
                r = recv.read(&mut buf) => match r {
                    Ok(Some(n)) => {
                        decoder.push(&buf[..n]);
                        let now = self.now();
                        loop {
                            match decoder.next_frame() {
                                Ok(Some(body)) => {
                                    if let Err(e) = session.handle_frame(body, now) {
                                        metrics::counter!("edgesync_uplink_session_errors_total").increment(1);
                                        return Err(UplinkError::Session(e.to_string()));
                                    }
                                }
                                Ok(None) => break,
                                Err(FrameError::UnknownMessage) => {
                                    metrics::counter!("edgesync_uplink_unknown_frames_total").increment(1);
                                    tracing::debug!("ignoring a frame of a kind this agent does not know");
                                }
                                Err(e) => {
                                    metrics::counter!("edgesync_uplink_bad_frames_total").increment(1);
                                    return Err(e.into());
                                }
                            }
                        }
                    }
                    Ok(None) => return Err(UplinkError::Connection("hub closed the stream".into())),
                    Err(quinn::ReadError::ConnectionLost(e)) => return Err(UplinkError::Connection(explain(&e))),
                    Err(e) => return Err(UplinkError::Connection(e.to_string())),
                },
                // The outbox committed more records (watch::changed is cancel-safe).
                r = self.appended.changed() => {
                    if r.is_err() { return Ok(()); }
                    session.handle_appended(*self.appended.borrow_and_update());
                    let d = *self.dropped.borrow_and_update();
                    if d != last_dropped {
                        last_dropped = d;
                        if let Some((from, to)) = d {
                            session.handle_lost(to);
                            return Err(UplinkError::Dropped(from, to));
                        }
                    }
                }
                // The control log grew (watch::changed is cancel-safe; never resolves without a
                // downlink).
                r = async {
                    match &mut self.downlink {
                        Some(d) => d.control_next.changed().await.map(|()| *d.control_next.borrow_and_update()),
                        None => std::future::pending().await,
                    }
                } => {
                    if let Ok(next) = r {
                        session.handle_control_appended(next);
                    }
                }
                // Our SVID rotated (watch::changed is cancel-safe; never resolves without a
                // watcher): this connection was authenticated with the previous certificate.
                // Handshake its replacement while this one keeps working.
                r = rotation(&mut self.cfg.svid_rotated) => {
                    if r.is_err() {
                        // The watcher stopped (shutdown): nothing to follow any more.
                        self.cfg.svid_rotated = None;
                        continue;
                    }
                    if self.cfg.svid.is_withdrawn() {
                        // Our identity was revoked: stop using it at once.
                        conn.close(0u32.into(), b"svid withdrawn");
                        return Err(UplinkError::Identity("our SVID was withdrawn".into()));
                    }
                    if let Some(ep) = &ep {
                        *switch = Some(self.start_switch(ep.clone(), addr));
                        switch_retry = None;
                    }
                }
                _ = async {
                    match switch_retry {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    switch_retry = None;
                    if let Some(ep) = &ep {
                        *switch = Some(self.start_switch(ep.clone(), addr));
                    }
                }
                r = async {
                    match switch.as_mut() {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                } => {
                    *switch = None;
                    match r {
                        Ok(next) => {
                            let bye = Frame { body: Some(Body::Goodbye(Goodbye { reason: "agent SVID rotated: replaced by a new connection".into() })) };
                            if let Ok(b) = frame::frame_bytes(&bye, DEFAULT_MAX_FRAME_LEN) {
                                let _ = tokio::time::timeout(Duration::from_millis(200), send.write_all(&b)).await;
                            }
                            let _ = send.finish();
                            conn.close(0u32.into(), b"svid rotated");
                            self.next_conn = Some(next);
                            return Err(UplinkError::SvidRotated);
                        }
                        Err(e) => {
                            metrics::counter!("edgesync_uplink_svid_switch_failures_total").increment(1);
                            tracing::warn!(
                                error = %e,
                                retry_in_ms = SWITCH_RETRY.as_millis() as u64,
                                "the connection presenting our rotated SVID failed; staying on the current one"
                            );
                            switch_retry = Some(Instant::now() + SWITCH_RETRY);
                        }
                    }
                }
                // Session timers (keep-alive, idle, resend).
                _ = tokio::time::sleep_until(deadline) => session.handle_timeout(self.now()),
            }
        }
    }

    async fn handle_events(&mut self, session: &mut EdgeSession) -> Result<(), UplinkError> {
        while let Some(ev) = session.poll_event() {
            match ev {
                EdgeEvent::Welcomed {
                    version,
                    stored_seq,
                } => {
                    tracing::info!(version, stored_seq, hub = %self.cfg.hub_address, "uplink established");
                    metrics::gauge!("edgesync_uplink_connected").set(1.0);
                    self.status.send_modify(|s| {
                        s.connected = true;
                        s.last_error = None;
                    });
                    if let Some(d) = &self.downlink {
                        d.twin.emit(TwinEvent::Uplink { connected: true });
                        if session.desired_enabled() {
                            // The hub checks desired values against what we run: every
                            // device's schema, built one at a time as it is sent.
                            self.schemas_due = d.twin.devices().into();
                        }
                    }
                }
                EdgeEvent::Desired(desired) => {
                    if let Some(d) = &self.downlink {
                        // Bounded: a slow downlink slows the hub's stream, never our memory.
                        if d.to_downlink.send(desired).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                EdgeEvent::ControlAcked { upto } => {
                    self.store.lock().await.ack_control(upto)?;
                }
                EdgeEvent::ControlRebased { next_seq } => {
                    tracing::warn!(
                        next_seq,
                        "hub holds more control records than this agent: renumbering"
                    );
                    let mut st = self.store.lock().await;
                    let n = st.rebase_control(next_seq)?;
                    session.handle_control_appended(st.control_next());
                    drop(st);
                    if n > 0 {
                        metrics::counter!("edgesync_uplink_rebases_total", "log" => "control")
                            .increment(1);
                        tracing::warn!(
                            records = n,
                            next_seq,
                            "control records the hub may not have are sent again, renumbered"
                        );
                    }
                }
                EdgeEvent::Acked { upto } => {
                    let mut st = self.store.lock().await;
                    if let Some((from, to)) = st.ack(upto)? {
                        // Refused records are next: handled; the next hello reports them.
                        session.handle_lost(to);
                        return Err(UplinkError::Dropped(from, to));
                    }
                    metrics::gauge!("edgesync_outbox_backlog_records").set(st.backlog() as f64);
                    metrics::gauge!("edgesync_outbox_bytes").set(st.outbox_bytes() as f64);
                    drop(st);
                    self.status.send_modify(|s| s.acked = upto);
                }
                EdgeEvent::Rebased { next_seq } => {
                    tracing::warn!(
                        next_seq,
                        "hub holds more records than the outbox: renumbering"
                    );
                    let mut st = self.store.lock().await;
                    let n = st.rebase(next_seq)?;
                    metrics::counter!("edgesync_uplink_rebases_total", "log" => "records")
                        .increment(1);
                    if n > 0 {
                        tracing::warn!(
                            records = n,
                            next_seq,
                            "records the hub may not have are sent again, renumbered (some may be duplicates)"
                        );
                    }
                    session.handle_appended(st.sendable_next());
                }
                EdgeEvent::Gap { from, to } => {
                    metrics::counter!("edgesync_uplink_gaps_total").increment(1);
                    tracing::warn!(
                        from,
                        to,
                        "hub is missing records this outbox no longer has (reported as a gap)"
                    );
                }
                EdgeEvent::Closed(e) => return Err(UplinkError::Session(e.to_string())),
            }
        }
        Ok(())
    }
}

/// A delay drawn uniformly from `[d/2, d]`.
fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + Duration::from_millis(fastrand::u64(0..=half.as_millis() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_wait_leaves_room_for_the_third_initial_and_never_exceeds_the_timeout() {
        let t = Duration::from_secs(5);
        // Nothing measured yet: the whole timeout, however slow the path may be.
        assert_eq!(answer_wait(None, t), t);
        // A LAN: the third Initial at 0.9 s and at least 100 ms for its answer.
        assert_eq!(
            answer_wait(Some(Duration::from_millis(1)), t),
            Duration::from_millis(1000)
        );
        // A slow path: four of its round trips after the third Initial.
        assert_eq!(
            answer_wait(Some(Duration::from_millis(600)), t),
            Duration::from_millis(3300)
        );
        assert_eq!(answer_wait(Some(Duration::from_secs(2)), t), t);
        assert_eq!(
            answer_wait(Some(Duration::from_millis(1)), Duration::from_millis(400)),
            Duration::from_millis(400)
        );
    }

    /// A quinn client endpoint and a connection attempt to `to` (the peer is never trusted:
    /// these tests never get past its first flight).
    fn attempt(to: SocketAddr) -> (quinn::Endpoint, quinn::Connecting, Arc<AtomicU64>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let crypto = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let qc = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).expect("quic crypto");
        let mut cc = quinn::ClientConfig::new(Arc::new(qc));
        let mut transport = quinn::TransportConfig::default();
        transport.initial_rtt(INITIAL_RTT);
        cc.transport_config(Arc::new(transport));
        let received = Arc::new(AtomicU64::new(0));
        let ep = counting_endpoint((std::net::Ipv4Addr::LOCALHOST, 0).into(), received.clone())
            .expect("bind");
        let connecting = ep.connect_with(cc, to, "edgesync-hub").expect("connect");
        (ep, connecting, received)
    }

    /// What a test peer returns: its address, its thread (which returns how many datagrams
    /// arrived) and the flag that stops it.
    type Peer = (
        SocketAddr,
        std::thread::JoinHandle<usize>,
        Arc<std::sync::atomic::AtomicBool>,
    );

    /// A UDP peer on loopback: `on_datagram` sees every datagram it receives (and may answer
    /// it) until the flag is set.
    fn peer(
        mut on_datagram: impl FnMut(&std::net::UdpSocket, &mut [u8], SocketAddr) + Send + 'static,
    ) -> Peer {
        let sock = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0)).expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        let addr = sock.local_addr().expect("addr");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let mut n = 0;
            while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok((len, from)) = sock.recv_from(&mut buf) {
                    n += 1;
                    on_datagram(&sock, &mut buf[..len], from);
                }
            }
            n
        });
        (addr, thread, stop)
    }

    /// A peer that never answers.
    fn silent_peer() -> Peer {
        peer(|_, _, _| {})
    }

    /// A hub that does not answer: with a round trip measured before, the attempt ends once
    /// its third Initial went unanswered, long before the connect timeout, so the next
    /// attempt's Initial leaves at once.
    #[tokio::test]
    async fn an_unanswered_handshake_ends_after_the_third_initial() {
        let (addr, counter, stop) = silent_peer();
        let (_ep, connecting, received) = attempt(addr);
        let timeout = Duration::from_secs(10);
        let wait = answer_wait(Some(Duration::from_millis(1)), timeout);
        let t0 = std::time::Instant::now();
        let err = handshake(connecting, timeout, wait, &received)
            .await
            .unwrap_err();
        let took = t0.elapsed();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let initials = counter.join().expect("counter");
        assert!(
            err.to_string().contains("no answer from the hub within 1s"),
            "{err}"
        );
        assert!(took >= wait && took < Duration::from_secs(4), "{took:?}");
        // The Initial at 0 s, then two probes at each unanswered timeout (0.3 and 0.9 s); the
        // next timeout (2.1 s) was not waited for.
        assert!((3..=6).contains(&initials), "{initials} datagrams");
    }

    /// With no round trip measured yet, a silent peer is waited for the whole timeout (a slow
    /// first path is never cut short).
    #[tokio::test]
    async fn without_a_measured_round_trip_the_whole_timeout_is_waited() {
        let (addr, counter, stop) = silent_peer();
        let (_ep, connecting, received) = attempt(addr);
        let timeout = Duration::from_millis(1500);
        let t0 = std::time::Instant::now();
        let err = handshake(connecting, timeout, answer_wait(None, timeout), &received)
            .await
            .unwrap_err();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        counter.join().expect("counter");
        assert!(t0.elapsed() >= timeout, "{:?}", t0.elapsed());
        assert!(err.to_string().contains("no answer"), "{err}");
    }

    /// A peer that answers something, here garbage (as the hub's stateless Retry comes
    /// before its handshake, and a busy hub may be slow with the rest): the attempt has heard
    /// from the peer, so it is not cut short at the answer wait but waits the whole timeout,
    /// and ends with an error, not a panic.
    #[tokio::test]
    async fn a_peer_that_answers_anything_is_waited_for_the_whole_timeout() {
        let (addr, noise, stop) = peer(|sock, datagram, from| {
            // The datagram reversed, and 1,200 bytes of 0xff.
            datagram.reverse();
            let _ = sock.send_to(datagram, from);
            let _ = sock.send_to(&[0xff; 1200], from);
        });
        let (_ep, connecting, received) = attempt(addr);
        let timeout = Duration::from_millis(2500);
        let wait = answer_wait(Some(Duration::from_millis(1)), timeout);
        let t0 = std::time::Instant::now();
        let r = handshake(connecting, timeout, wait, &received).await;
        let took = t0.elapsed();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        noise.join().expect("noise");
        let err = r.unwrap_err();
        assert!(received.load(Ordering::Relaxed) > 0);
        assert!(took >= timeout, "{took:?}");
        assert!(err.to_string().contains("timed out after"), "{err}");
    }
}
