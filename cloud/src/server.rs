//! The QUIC tunnel server: accepts edge connections and drives a [`HubSession`] per node.
//!
//! Per connection: the TLS handshake requires an edge SVID of our trust domain (see
//! `edgesync_protocol::tls::server_config`); the node id is taken from the verified
//! certificate. One bidirectional stream carries the session. Records go to a per-connection
//! committer task that merges queued batches into one store commit (group commit) and reports
//! the durable sequence number back; only then does the session acknowledge.
//!
//! A newer connection of the same node supersedes the older one (an agent restarted after
//! `kill -9` does not wait for the old connection to time out).
//!
//! # Bounds against hostile or broken peers
//!
//! - **Address validation:** every connection attempt first gets a stateless QUIC Retry; an
//!   address that cannot receive (spoofed) never makes the hub keep state or start TLS.
//! - **Handshakes:** at most [`TunnelConfig::max_handshakes`] at once, at most
//!   [`MAX_HANDSHAKES_PER_IP`] from one IP address, each finished within
//!   [`TunnelConfig::handshake_timeout`]; further attempts are refused (agents back off and
//!   retry). Addresses from which a node authenticated during this run have a second pool of
//!   `max_handshakes` of their own: a flood of stalled handshakes from many other addresses
//!   fills the first pool but cannot keep known gateways out. (The set is kept in memory: after
//!   a hub restart every address starts unknown.)
//! - **Sessions:** a slot of [`TunnelConfig::max_connections`] is taken only after the peer's
//!   certificate is verified; one node holds one slot however often it connects.
//! - **Writes** to a peer that stops reading end the session after the idle timeout (a newer
//!   connection of the node or shutdown ends them at once).
//! - **Memory:** frames of at most `DEFAULT_MAX_FRAME_LEN` bytes and
//!   `frame::MAX_FRAME_SAMPLES` records (counted before decoding); at most
//!   [`MAX_QUEUED_SAMPLES`] decoded records waiting for their commit per connection; hello
//!   strings of at most 256 bytes. quinn queues at most 1,024 connection attempts with 16 MiB
//!   of their data.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use edgesync_protocol::close;
use edgesync_protocol::frame::{
    self, Body, DEFAULT_MAX_FRAME_LEN, Frame, FrameDecoder, FrameError,
};
use edgesync_protocol::session::{HubConfig as SessionConfig, HubEvent, HubSession, Millis};
use edgesync_protocol::spiffe_id::NodeIds;
use edgesync_protocol::tls::{self, SvidStore};
use edgesync_protocol::{NodeId, Sample};
use rustls_pki_types::CertificateDer;
use std::num::NonZeroU32;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::store::{ConnInfo, HubStore};

/// Settings of the tunnel server.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// The node SPIFFE IDs accepted (trust domains and path prefix).
    pub nodes: NodeIds,
    /// Close a session after this much silence.
    pub idle_timeout: Duration,
    /// Most authenticated sessions at once (a node's newer connection replaces its older one
    /// and needs no extra slot; others are refused until some close).
    pub max_connections: usize,
    /// Most TLS handshakes in progress at once (more are refused; agents retry later).
    pub max_handshakes: usize,
    /// A handshake not finished in this time is dropped.
    pub handshake_timeout: Duration,
    /// Most records per second one node may store (`None`: no limit). A node sending faster
    /// is slowed down: its records wait in its outbox, none is dropped.
    pub node_max_records_per_s: Option<NonZeroU32>,
}

/// Default of [`TunnelConfig::node_max_records_per_s`].
pub const DEFAULT_NODE_MAX_RECORDS_PER_S: u32 = 100_000;

/// The per-node rate quota: a token bucket per node id holding one second of records.
struct NodeRate {
    limiter: governor::RateLimiter<
        NodeId,
        governor::state::keyed::HashMapStateStore<NodeId>,
        governor::clock::DefaultClock,
    >,
    clock: governor::clock::DefaultClock,
    per_s: NonZeroU32,
    /// `edgesync_hub_rate_limited_total`, registered once (the hub's recorder is installed
    /// before the tunnel starts).
    waits: metrics::Counter,
    /// `edgesync_hub_rate_limit_wait_seconds`, registered once.
    wait_seconds: metrics::Histogram,
}

impl NodeRate {
    fn new(per_s: NonZeroU32) -> NodeRate {
        NodeRate {
            limiter: governor::RateLimiter::hashmap(governor::Quota::per_second(per_s)),
            clock: governor::clock::DefaultClock::default(),
            per_s,
            waits: metrics::counter!("edgesync_hub_rate_limited_total"),
            wait_seconds: metrics::histogram!("edgesync_hub_rate_limit_wait_seconds"),
        }
    }

    /// Waits until `node` may store `n` records (`n` at most one second's worth).
    async fn admit(&self, node: &NodeId, n: usize) {
        use governor::clock::Clock;
        let Some(n) = u32::try_from(n).ok().and_then(NonZeroU32::new) else {
            return;
        };
        let n = n.min(self.per_s);
        loop {
            match self.limiter.check_key_n(node, n) {
                Ok(Ok(())) | Err(_) => return,
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    self.waits.increment(1);
                    self.wait_seconds.record(wait.as_secs_f64());
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// Default of [`TunnelConfig::max_handshakes`].
pub const DEFAULT_MAX_HANDSHAKES: usize = 64;
/// Default of [`TunnelConfig::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most handshakes in progress from one IP address (so that one flooding host cannot take
/// every handshake slot; gateways behind one NAT address still connect a few at a time).
pub const MAX_HANDSHAKES_PER_IP: usize = 8;
/// Most connection attempts queued in quinn before the accept loop sees them.
const MAX_INCOMING: usize = 1024;
/// Most bytes quinn buffers for all connection attempts not yet accepted.
const INCOMING_BUFFER_TOTAL: u64 = 16 << 20;

/// Builds the quinn endpoint listening on `listen`.
pub fn endpoint(
    listen: SocketAddr,
    svid: Arc<SvidStore>,
    cfg: &TunnelConfig,
) -> Result<quinn::Endpoint, String> {
    let crypto = tls::server_config(svid, cfg.nodes.clone()).map_err(|e| e.to_string())?;
    let qc =
        quinn::crypto::rustls::QuicServerConfig::try_from(crypto).map_err(|e| e.to_string())?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(qc));
    let mut transport = quinn::TransportConfig::default();
    if let Ok(idle) = quinn::IdleTimeout::try_from(cfg.idle_timeout) {
        transport.max_idle_timeout(Some(idle));
    }
    transport.max_concurrent_bidi_streams(1u8.into());
    transport.max_concurrent_uni_streams(0u8.into());
    sc.transport_config(Arc::new(transport));
    sc.max_incoming(MAX_INCOMING);
    sc.incoming_buffer_size_total(INCOMING_BUFFER_TOTAL);
    quinn::Endpoint::server(sc, listen).map_err(|e| format!("bind {listen}: {e}"))
}

struct Ctx {
    store: Arc<HubStore>,
    cfg: TunnelConfig,
    origin: Instant,
    live: Mutex<HashMap<NodeId, (u64, CancellationToken)>>,
    next_conn: std::sync::atomic::AtomicU64,
    /// Handshakes in progress.
    handshakes: Arc<tokio::sync::Semaphore>,
    /// Handshakes in progress per source IP address.
    per_ip: Mutex<HashMap<std::net::IpAddr, usize>>,
    /// Handshakes in progress from addresses that authenticated a node before (their own
    /// pool of `max_handshakes`, so a flood from elsewhere cannot keep known gateways out).
    known_handshakes: Arc<tokio::sync::Semaphore>,
    /// Addresses from which a node authenticated during this run (at most [`MAX_KNOWN_IPS`]).
    known_ips: Mutex<std::collections::HashSet<std::net::IpAddr>>,
    /// The per-node rate quota, shared by a node's successive connections.
    rate: Option<Arc<NodeRate>>,
    /// The reconnect spread announced when the hub stops (decided once, from the sessions
    /// live at that moment).
    stop_spread: std::sync::OnceLock<Duration>,
}

/// The retry hint given to a node refused because the hub is full.
pub const HUB_FULL_RETRY_WITHIN: Duration = Duration::from_secs(10);

fn stop_spread(ctx: &Ctx) -> Duration {
    close::restart_spread(ctx.live.lock().unwrap_or_else(|p| p.into_inner()).len())
}

/// Most addresses remembered as known (beyond, new ones are not added).
const MAX_KNOWN_IPS: usize = 100_000;

/// A handshake slot of one IP address, given back when dropped.
struct IpSlot {
    ctx: Arc<Ctx>,
    ip: std::net::IpAddr,
}

impl IpSlot {
    fn take(ctx: &Arc<Ctx>, ip: std::net::IpAddr) -> Option<IpSlot> {
        let mut m = ctx.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_HANDSHAKES_PER_IP {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            ctx: ctx.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self.ctx.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl Ctx {
    fn now(&self) -> Millis {
        self.origin.elapsed().as_millis() as u64
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Accepts connections until `cancel` fires.
pub async fn serve(
    endpoint: quinn::Endpoint,
    store: Arc<HubStore>,
    cfg: TunnelConfig,
    cancel: CancellationToken,
) {
    let cfg_max_handshakes = cfg.max_handshakes.max(1);
    let rate = cfg.node_max_records_per_s;
    let ctx = Arc::new(Ctx {
        store,
        cfg,
        origin: Instant::now(),
        live: Mutex::new(HashMap::new()),
        next_conn: 0.into(),
        handshakes: Arc::new(tokio::sync::Semaphore::new(cfg_max_handshakes)),
        per_ip: Mutex::new(HashMap::new()),
        known_handshakes: Arc::new(tokio::sync::Semaphore::new(cfg_max_handshakes)),
        known_ips: Mutex::new(std::collections::HashSet::new()),
        rate: rate.map(|r| Arc::new(NodeRate::new(r))),
        stop_spread: std::sync::OnceLock::new(),
    });
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => break,
            i = endpoint.accept() => match i { Some(i) => i, None => break },
        };
        if !incoming.remote_address_validated() {
            // Address validation first (a stateless QUIC Retry): a source address that cannot
            // receive cannot make the hub keep any state or start a handshake.
            metrics::counter!("edgesync_hub_quic_retries_total").increment(1);
            if let Err(e) = incoming.retry() {
                e.into_incoming().ignore();
            }
            continue;
        }
        let Some(ip_slot) = IpSlot::take(&ctx, incoming.remote_address().ip()) else {
            metrics::counter!("edgesync_hub_connections_refused_total", "reason" => "handshakes_per_ip")
                .increment(1);
            incoming.refuse();
            continue;
        };
        let known = ctx
            .known_ips
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&incoming.remote_address().ip());
        let pool = if known {
            &ctx.known_handshakes
        } else {
            &ctx.handshakes
        };
        let Ok(permit) = pool.clone().try_acquire_owned() else {
            metrics::counter!("edgesync_hub_connections_refused_total", "reason" => "handshakes")
                .increment(1);
            incoming.refuse();
            continue;
        };
        let ctx = ctx.clone();
        let cancel = cancel.child_token();
        tokio::spawn(async move {
            handle_connection(incoming, (permit, ip_slot), &ctx, cancel).await;
        });
    }
    let spread = *ctx.stop_spread.get_or_init(|| stop_spread(&ctx));
    endpoint.close(
        close::CLOSE_HUB_STOPPING.into(),
        &close::reason_with_hint("hub shutting down", spread),
    );
    // Let the close reach every peer before the process exits: an agent that misses it would
    // wait for its idle timeout (10 s by default) before reconnecting to the restarted hub.
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

async fn handle_connection(
    incoming: quinn::Incoming,
    handshake: (tokio::sync::OwnedSemaphorePermit, IpSlot),
    ctx: &Arc<Ctx>,
    cancel: CancellationToken,
) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(ctx.cfg.handshake_timeout, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            metrics::counter!("edgesync_hub_handshake_failures_total").increment(1);
            tracing::warn!(%remote, error = %e, "tunnel handshake refused");
            return;
        }
        Err(_) => {
            metrics::counter!("edgesync_hub_handshake_failures_total").increment(1);
            tracing::warn!(%remote, "tunnel handshake timed out");
            return;
        }
    };
    drop(handshake);
    let peer = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| "no peer certificate".to_string())
        .and_then(|certs| {
            let (node, td) = tls::peer_node(&certs, &ctx.cfg.nodes).map_err(|e| e.to_string())?;
            let (_, not_after) = tls::cert_validity(&certs[0]).map_err(|e| e.to_string())?;
            // Node ids are shared by our trust domain and the federated ones: a node stays
            // with the domain it first connected from.
            match ctx.store.pin_trust_domain(&node, td.as_str()) {
                Ok(None) => {}
                Ok(Some(pinned)) => {
                    metrics::counter!("edgesync_hub_node_domain_refusals_total").increment(1);
                    return Err(format!(
                        "node {node} belongs to trust domain {pinned}; refused from {td}"
                    ));
                }
                Err(e) => return Err(format!("cannot check the node's trust domain: {e}")),
            }
            Ok((node, not_after))
        });
    let (node, peer_not_after) = match peer {
        Ok(n) => n,
        Err(e) => {
            // The verifier already refuses these; this is defence in depth.
            metrics::counter!("edgesync_hub_handshake_failures_total").increment(1);
            tracing::warn!(%remote, error = %e, "peer refused");
            conn.close(close::CLOSE_FORBIDDEN.into(), b"forbidden");
            return;
        }
    };
    {
        let mut known = ctx.known_ips.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() < MAX_KNOWN_IPS {
            known.insert(remote.ip());
        }
    }
    // A session slot, only now that the peer is authenticated. A newer connection of a node
    // supersedes its older one (an agent restarted after `kill -9` does not wait for the old
    // connection to time out), in the same slot.
    let conn_id = ctx
        .next_conn
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let token = cancel.child_token();
    {
        let mut live = ctx.live.lock().unwrap_or_else(|p| p.into_inner());
        if !live.contains_key(&node) && live.len() >= ctx.cfg.max_connections {
            drop(live);
            metrics::counter!("edgesync_hub_connections_refused_total", "reason" => "limit")
                .increment(1);
            tracing::warn!(%node, %remote, max = ctx.cfg.max_connections, "session refused: the hub has as many nodes connected as it allows (max_nodes)");
            conn.close(
                close::CLOSE_HUB_FULL.into(),
                &close::reason_with_hint("hub full", HUB_FULL_RETRY_WITHIN),
            );
            return;
        }
        if let Some((_, old)) = live.insert(node.clone(), (conn_id, token.clone())) {
            old.cancel();
        }
    }
    // A TLS handshake authenticates once: a connection must not outlive the certificate it
    // was authenticated with. At its `notAfter` the session ends and the agent is told to come
    // back (with its rotated SVID) at once.
    let session = token.child_token();
    let expired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let expiry = tokio::spawn({
        let session = session.clone();
        let expired = expired.clone();
        let left = Duration::from_millis(
            peer_not_after
                .saturating_mul(1000)
                .saturating_add(1000)
                .saturating_sub(wall_ms()),
        );
        async move {
            tokio::select! {
                () = session.cancelled() => {}
                () = tokio::time::sleep(left) => {
                    expired.store(true, std::sync::atomic::Ordering::Release);
                    session.cancel();
                }
            }
        }
    });
    metrics::gauge!("edgesync_hub_sessions").increment(1.0);
    let result = drive(
        &conn,
        ctx,
        &node,
        remote,
        peer_not_after.saturating_mul(1000),
        &session,
        &expired,
    )
    .await;
    expiry.abort();
    metrics::gauge!("edgesync_hub_sessions").decrement(1.0);
    {
        let mut live = ctx.live.lock().unwrap_or_else(|p| p.into_inner());
        if live.get(&node).is_some_and(|(id, _)| *id == conn_id) {
            live.remove(&node);
            if let Err(e) = ctx.store.node_disconnected(&node, wall_ms()) {
                tracing::error!(%node, error = %e, "cannot record disconnect");
            }
        }
    }
    match result {
        Ok(()) => tracing::info!(%node, %remote, "session ended"),
        Err(e) => {
            metrics::counter!("edgesync_hub_session_errors_total").increment(1);
            tracing::warn!(%node, %remote, error = %e, "session ended with an error");
        }
    }
    if cancel.is_cancelled() {
        // The hub stops: tell the agent when to come back (the whole fleet hears this at once).
        let spread = *ctx.stop_spread.get_or_init(|| stop_spread(ctx));
        conn.close(
            close::CLOSE_HUB_STOPPING.into(),
            &close::reason_with_hint("hub shutting down", spread),
        );
    } else if expired.load(std::sync::atomic::Ordering::Acquire) {
        metrics::counter!("edgesync_hub_sessions_expired_total").increment(1);
        tracing::info!(%node, %remote, "session ended: the node's certificate expired; it may reconnect with its rotated SVID");
        conn.close(
            close::CLOSE_CERT_EXPIRED.into(),
            &close::reason_with_hint("your certificate expired", close::CERT_EXPIRED_RETRY_WITHIN),
        );
    } else {
        conn.close(close::CLOSE_NORMAL.into(), b"bye");
    }
}

/// Most records of one connection decoded and waiting for their commit (with the receive
/// buffer and one frame being decoded, this bounds a session's memory): about four full frames,
/// or 64 frames of the agent's default batch.
pub const MAX_QUEUED_SAMPLES: usize = 4 * frame::MAX_FRAME_SAMPLES;

enum Job {
    Store {
        first_seq: u64,
        samples: Vec<Sample>,
        /// The records' share of [`MAX_QUEUED_SAMPLES`], returned once committed.
        budget: Vec<tokio::sync::OwnedSemaphorePermit>,
    },
    Gap {
        from: u64,
        to: u64,
    },
}

async fn commit_one(store: &HubStore, node: &NodeId, job: Job) -> Result<u64, String> {
    match job {
        Job::Gap { from, to } => {
            // The store logs the gap (node, from, to) and counts its new records per node in
            // edgesync_hub_gap_records_total: a resent gap is not counted twice.
            store
                .commit_gap(node, from, to)
                .await
                .map(|o| o.stored_seq)
                .map_err(|e| e.to_string())
        }
        Job::Store {
            first_seq, samples, ..
        } => {
            let o = store
                .commit_owned(node, first_seq, samples)
                .await
                .map_err(|e| e.to_string())?;
            // The store counts stored and duplicate records itself.
            Ok(o.stored_seq)
        }
    }
}

/// Commits jobs in order, merging consecutive record batches that queued up meanwhile into one
/// commit (group commit), and reports each commit's durable sequence number.
///
/// With a rate quota, a batch is committed in parts of at most one second's worth of records,
/// each after the quota admits it, so that acknowledgements keep flowing at the allowed rate
/// (the agent resends what stays unacknowledged for a while).
async fn committer(
    store: Arc<HubStore>,
    node: NodeId,
    rate: Option<Arc<NodeRate>>,
    mut jobs: mpsc::Receiver<Job>,
    done: mpsc::Sender<Result<u64, String>>,
) {
    let mut held: Option<Job> = None;
    loop {
        let job = match held.take() {
            Some(j) => j,
            None => match jobs.recv().await {
                Some(j) => j,
                None => return,
            },
        };
        let job = match job {
            Job::Store {
                first_seq,
                mut samples,
                mut budget,
            } => {
                let mut next = first_seq + samples.len() as u64;
                while let Ok(more) = jobs.try_recv() {
                    match more {
                        Job::Store {
                            first_seq: f,
                            samples: s,
                            budget: b,
                        } if f == next
                            // Under a rate quota, at most one second's worth per commit, so
                            // that each one's share of the queue is given back as it is acked.
                            && rate
                                .as_ref()
                                .is_none_or(|r| samples.len() + s.len() <= r.per_s.get() as usize) =>
                        {
                            next += s.len() as u64;
                            samples.extend(s);
                            budget.extend(b);
                        }
                        other => {
                            held = Some(other);
                            break;
                        }
                    }
                }
                Job::Store {
                    first_seq,
                    samples,
                    budget,
                }
            }
            gap => gap,
        };
        if let (
            Some(rate),
            Job::Store {
                first_seq, samples, ..
            },
        ) = (&rate, &job)
        {
            let part = rate.per_s.get() as usize;
            for (i, chunk) in samples.chunks(part).enumerate() {
                rate.admit(&node, chunk.len()).await;
                let r = store
                    .commit_batch(&node, first_seq + (i * part) as u64, chunk)
                    .await
                    .map(|o| o.stored_seq)
                    .map_err(|e| e.to_string());
                let failed = r.is_err();
                if done.send(r).await.is_err() {
                    return;
                }
                if failed {
                    break;
                }
            }
            // The job (and its share of the queue) is released here.
            continue;
        }
        if done
            .send(commit_one(&store, &node, job).await)
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn drive(
    conn: &quinn::Connection,
    ctx: &Arc<Ctx>,
    node: &NodeId,
    remote: SocketAddr,
    peer_expires_ms: u64,
    cancel: &CancellationToken,
    expired: &std::sync::atomic::AtomicBool,
) -> Result<(), String> {
    let (mut send, mut recv) = tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        r = tokio::time::timeout(ctx.cfg.idle_timeout, conn.accept_bi()) => match r {
            Err(_) => return Err("no stream opened in time".into()),
            Ok(Err(e)) => return Err(format!("connection: {e}")),
            Ok(Ok(s)) => s,
        }
    };
    let stored = ctx
        .store
        .stored_seq(node)
        .map_err(|e| format!("store: {e}"))?;
    let scfg = SessionConfig {
        hub_version: env!("CARGO_PKG_VERSION").to_owned(),
        idle_timeout_ms: ctx.cfg.idle_timeout.as_millis() as u64,
    };
    let mut session = HubSession::new(scfg, node.clone(), stored, ctx.now())
        .with_control_stored(ctx.store.control_seq(node));
    // Desired values: the highest version sent on this connection (from the agent's hello).
    let mut desired_sent: Option<u64> = None;
    let mut desired_rx = ctx.store.desired_changes();
    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>(64);
    let queued = Arc::new(tokio::sync::Semaphore::new(MAX_QUEUED_SAMPLES));
    let (done_tx, mut done_rx) = mpsc::channel(64);
    let committer = tokio::spawn(committer(
        ctx.store.clone(),
        node.clone(),
        ctx.rate.clone(),
        jobs_rx,
        done_tx,
    ));
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = BytesMut::new();
    let result = loop {
        // Events first (they may queue jobs), then frames to send.
        let mut closed = None;
        while let Some(ev) = session.poll_event() {
            match ev {
                HubEvent::Hello(h) => {
                    tracing::info!(%node, %remote, agent = %h.agent_version, backlog = h.backlog, "session established");
                    let info = ConnInfo {
                        remote_addr: remote.to_string(),
                        agent_version: h.agent_version,
                        boot_id: h.boot_id,
                        config_version: h.config_version,
                        svid_expires_ms: Some(peer_expires_ms),
                    };
                    if let Err(e) = ctx.store.node_connected(node, info, wall_ms()) {
                        tracing::error!(%node, error = %e, "cannot record connect");
                    }
                    let _ = ctx.store.node_seen(node, wall_ms(), h.backlog);
                    match ctx.store.note_store_id(node, &h.store_id) {
                        Ok(Some(old)) => {
                            metrics::counter!("edgesync_hub_node_store_changes_total").increment(1);
                            tracing::warn!(%node, old = %old, new = %h.store_id, "the node's outbox is a different store (its data directory was lost or replaced)");
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::error!(%node, error = %e, "cannot record the node's store id")
                        }
                    }
                    // A node that took over versions this store never handed out: the store
                    // went back in time (see reconcile_downlink).
                    match ctx
                        .store
                        .reconcile_downlink(node, h.last_downlink_seq)
                        .await
                    {
                        Ok((moved, resent)) => {
                            if moved {
                                metrics::counter!("edgesync_hub_store_behind_node_total", "what" => "desired").increment(1);
                                tracing::warn!(%node, node_version = h.last_downlink_seq, "the node took over desired versions this store does not know (store restored from an older state?): numbering continues after them");
                            }
                            if resent > 0 {
                                tracing::info!(%node, values = resent, "desired values the node has not reported on are sent again under new versions");
                            }
                        }
                        Err(e) => {
                            tracing::error!(%node, error = %e, "cannot reconcile desired versions")
                        }
                    }
                    desired_sent = Some(h.last_downlink_seq);
                }
                HubEvent::ControlGap { from, to } => {
                    metrics::counter!("edgesync_hub_store_behind_node_total", "what" => "control")
                        .increment(1);
                    tracing::warn!(%node, from, to, "control records the node had acknowledged are missing here (store restored from an older state?): continuing after them");
                    match ctx.store.skip_control(node, to).await {
                        Ok(seq) => session.handle_control_stored(seq),
                        Err(e) => {
                            metrics::counter!("edgesync_hub_commit_errors_total").increment(1);
                            session.handle_store_failed(e.to_string());
                        }
                    }
                }
                HubEvent::Control(c) => match ctx.store.apply_control(node, c).await {
                    Ok(seq) => session.handle_control_stored(seq),
                    Err(e) => {
                        metrics::counter!("edgesync_hub_commit_errors_total").increment(1);
                        session.handle_store_failed(e.to_string());
                    }
                },
                HubEvent::Schema(schema) => {
                    if let Err(e) = ctx.store.store_schema(node, &schema).await {
                        metrics::counter!("edgesync_hub_schema_errors_total").increment(1);
                        tracing::warn!(%node, device = %schema.device.escape_debug(), error = %e, "device schema refused");
                    }
                }
                HubEvent::Store { first_seq, samples } => {
                    // Bounded queue (in records; a frame holds at most MAX_FRAME_SAMPLES): when
                    // commits lag, we stop reading and QUIC flow control pushes back on the agent.
                    let n = u32::try_from(samples.len().clamp(1, MAX_QUEUED_SAMPLES)).unwrap_or(1);
                    let budget = match queued.clone().acquire_many_owned(n).await {
                        Ok(p) => vec![p],
                        Err(_) => vec![],
                    };
                    if jobs_tx
                        .send(Job::Store {
                            first_seq,
                            samples,
                            budget,
                        })
                        .await
                        .is_err()
                    {
                        closed = Some(Err("committer stopped".to_string()));
                    }
                }
                HubEvent::Gap { from, to } => {
                    if jobs_tx.send(Job::Gap { from, to }).await.is_err() {
                        closed = Some(Err("committer stopped".to_string()));
                    }
                }
                HubEvent::Duplicates { count } => {
                    metrics::counter!("edgesync_hub_duplicate_frames_records_total")
                        .increment(count);
                }
                HubEvent::Backlog(b) => {
                    let _ = ctx.store.node_seen(node, wall_ms(), b);
                }
                HubEvent::Closed(e) => closed = Some(Err(e.to_string())),
            }
        }
        // Desired values newer than what this connection sent, in version order.
        if let Some(sent) = desired_sent.as_mut()
            && session.desired_enabled()
        {
            for d in ctx.store.desired_after(node, *sent) {
                *sent = (*sent).max(d.version);
                let _ = session.send_desired(d);
            }
        }
        out.clear();
        while let Some(body) = session.poll_transmit() {
            if let Err(e) =
                frame::encode_frame(&Frame { body: Some(body) }, DEFAULT_MAX_FRAME_LEN, &mut out)
            {
                tracing::error!(%node, error = %e, "cannot encode a frame");
            }
        }
        if !out.is_empty() {
            // A peer that stops reading fills QUIC's flow-control window and the write waits:
            // bounded by the idle timeout, and by a newer connection of the node or shutdown.
            tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                r = tokio::time::timeout(ctx.cfg.idle_timeout, send.write_all(&out)) => match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Err(format!("write: {e}")),
                    Err(_) => {
                        metrics::counter!("edgesync_hub_session_write_timeouts_total").increment(1);
                        break Err(format!(
                            "write: the node did not read for {} ms",
                            ctx.cfg.idle_timeout.as_millis()
                        ));
                    }
                },
            }
        }
        if let Some(r) = closed {
            // Let the goodbye leave.
            let _ = send.finish();
            break r;
        }
        let deadline = session
            .poll_timeout()
            .map(|t| ctx.origin + Duration::from_millis(t))
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            // Superseded by a newer connection of this node, or hub shutdown.
            _ = cancel.cancelled() => {
                let reason = if expired.load(std::sync::atomic::Ordering::Acquire) {
                    "your certificate expired"
                } else {
                    "superseded or shutting down"
                };
                let bye = Frame { body: Some(Body::Goodbye(frame::Goodbye { reason: reason.into() })) };
                if let Ok(b) = frame::frame_bytes(&bye, DEFAULT_MAX_FRAME_LEN) {
                    let _ = tokio::time::timeout(Duration::from_millis(200), send.write_all(&b)).await;
                }
                break Ok(());
            }
            // Bytes from the agent (RecvStream::read is cancel-safe).
            r = recv.read(&mut buf) => match r {
                Ok(Some(n)) => {
                    decoder.push(&buf[..n]);
                    let now = ctx.now();
                    let mut err = None;
                    loop {
                        match decoder.next_frame() {
                            Ok(Some(body)) => {
                                if session.handle_frame(body, now).is_err() {
                                    break; // reported as a Closed event
                                }
                            }
                            Ok(None) => break,
                            Err(FrameError::UnknownMessage) => {
                                metrics::counter!("edgesync_hub_unknown_frames_total").increment(1);
                                tracing::debug!(%node, "ignoring a frame of a kind this hub does not know");
                            }
                            Err(e) => {
                                metrics::counter!("edgesync_hub_bad_frames_total").increment(1);
                                err = Some(format!("bad frame: {e}"));
                                break;
                            }
                        }
                    }
                    if let Some(e) = err {
                        break Err(e);
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(format!("read: {e}")),
            },
            // A commit finished (mpsc::recv is cancel-safe).
            d = done_rx.recv() => match d {
                Some(Ok(upto)) => {
                    tracing::trace!(target: crate::store::DURABILITY_TARGET, "acknowledged upto={upto} node={node}");
                    session.handle_stored(upto);
                }
                Some(Err(e)) => {
                    metrics::counter!("edgesync_hub_commit_errors_total").increment(1);
                    session.handle_store_failed(e);
                }
                None => break Err("committer stopped".into()),
            },
            // A desired value was set somewhere (watch::changed is cancel-safe); the loop's
            // top sends what concerns this node.
            r = desired_rx.changed() => {
                if r.is_err() {
                    break Err("store closed".into());
                }
            }
            // Idle and handshake timers.
            _ = tokio::time::sleep_until(deadline) => session.handle_timeout(ctx.now()),
        }
    };
    drop(jobs_tx);
    // Let queued commits finish (they are idempotent); bounded.
    let _ = tokio::time::timeout(Duration::from_secs(5), committer).await;
    result
}
