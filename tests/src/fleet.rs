//! A load generator speaking the tunnel protocol: many simulated agents in one process, for
//! reconnect storms against a real hub.
//!
//! Each simulated agent has its own edge SVID (`spiffe://<td>/edge/fleet-<i>`) and behaves as
//! the real agent's uplink does where it matters to the hub: it connects, says hello with its
//! next sequence number, resumes from the sequence number the hub's welcome reports, sends
//! one record every `record_every` (which also keeps the session from going idle), answers
//! pings, and reconnects with the real agent's jittered exponential backoff (`[d/2, d]`,
//! doubling from `backoff_initial` to `backoff_max`) whenever the connection ends or an
//! attempt fails; after a hub closed with a retry hint, at random moments within the hint
//! instead, as the agent does (unless `follow_hints` is off). Agents are spread over source addresses 127.<n>.x.y, eight per address,
//! as a fleet's gateways are spread over hosts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use edgesync_protocol::frame::{
    self, Body, DEFAULT_MAX_FRAME_LEN, Frame, FrameDecoder, Hello, Ping,
};
use edgesync_protocol::{DeviceId, PropertyId, Quality, Sample, Value};
use tokio_util::sync::CancellationToken;

use crate::harness::Pki;

/// How the simulated agents behave.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// How many agents.
    pub agents: usize,
    /// Records per agent sent this often...
    pub record_every: Duration,
    /// ...this many at a time (one frame)...
    pub records_per_tick: usize,
    /// ...while at most this many are sent and not acknowledged (a greedy node sends
    /// `records_per_tick` every millisecond and is held back only by this window and the hub).
    pub max_unacked: u64,
    /// First reconnect delay (the agent's default is 200 ms).
    pub backoff_initial: Duration,
    /// Largest reconnect delay (the agent's default is 30 s).
    pub backoff_max: Duration,
    /// Time allowed for one connection attempt (the agent's default is 5 s).
    pub connect_timeout: Duration,
    /// Node ids are `<prefix>-<i>`; the second octet of the agents' source addresses is
    /// `source_octet` (127.<source_octet>.x.y), so that two fleets differ in both.
    pub prefix: String,
    /// See `prefix`.
    pub source_octet: u8,
    /// Whether agents follow the retry hint a hub gives when it closes (as the agent does).
    pub follow_hints: bool,
    /// Distinct properties each agent reports (1: one property, `counter`; more: `p0`, `p1`,
    /// ... in turn), for the hub's memory per property.
    pub properties: usize,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            agents: 1000,
            record_every: Duration::from_secs(1),
            records_per_tick: 1,
            max_unacked: u64::MAX,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            prefix: "fleet".into(),
            source_octet: 1,
            follow_hints: true,
            properties: 1,
        }
    }
}

/// What one simulated agent went through.
#[derive(Debug, Default)]
struct AgentLog {
    /// When each session was established (welcome received).
    established: Vec<Instant>,
    /// When each established session ended.
    ended: Vec<Instant>,
}

/// Counters of the whole fleet.
#[derive(Debug, Default)]
pub struct FleetCounters {
    /// Sessions established now.
    pub connected: AtomicUsize,
    /// Connection attempts that failed (refused, timed out, handshake error).
    pub failed_attempts: AtomicU64,
    /// Records acknowledged by the hub.
    pub acked: AtomicU64,
}

/// A running fleet; stops when dropped.
pub struct Fleet {
    /// Live counters.
    pub counters: Arc<FleetCounters>,
    logs: Vec<Arc<Mutex<AgentLog>>>,
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    kick: tokio::sync::watch::Sender<u64>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.cancel.cancel();
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Fleet {
    /// Mints the agents' identities from `pki` (files under `pki.dir/fleet`) and starts them
    /// against the hub at `hub`.
    pub fn start(
        pki: &Pki,
        td: &str,
        hub: SocketAddr,
        opts: &FleetOptions,
    ) -> anyhow::Result<Fleet> {
        let counters = Arc::new(FleetCounters::default());
        let cancel = CancellationToken::new();
        let (kick, kicked) = tokio::sync::watch::channel(0u64);
        let mut endpoints = Vec::new();
        let mut logs = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..opts.agents {
            let node = format!("{}-{i}", opts.prefix);
            let client = crate::hostile::peer_client(
                pki,
                td,
                &hub.to_string(),
                &node,
                opts.connect_timeout,
            )?;
            if i % 8 == 0 {
                let ip = Ipv4Addr::new(
                    127,
                    opts.source_octet,
                    ((i / 8) / 250) as u8,
                    ((i / 8) % 250 + 1) as u8,
                );
                let sock = std::net::UdpSocket::bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
                let ep = quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    None,
                    sock,
                    Arc::new(quinn::TokioRuntime),
                )?;
                endpoints.push(ep);
            }
            let ep = endpoints
                .last()
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no endpoint"))?;
            let log = Arc::new(Mutex::new(AgentLog::default()));
            logs.push(log.clone());
            let agent = SimAgent {
                ep,
                client,
                hub,
                index: i,
                opts: opts.clone(),
                counters: counters.clone(),
                log,
                cancel: cancel.clone(),
                kick: kicked.clone(),
            };
            tasks.push(tokio::spawn(agent.run()));
        }
        Ok(Fleet {
            counters,
            logs,
            cancel,
            tasks,
            kick,
        })
    }

    /// Every agent closes its session and connects again (as after a network outage on the
    /// agents' side).
    pub fn reconnect_all(&self) {
        self.kick.send_modify(|g| *g += 1);
    }

    /// How many agents have established a session at or after `since`.
    pub fn established_since(&self, since: Instant) -> usize {
        self.logs
            .iter()
            .filter(|l| {
                l.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .established
                    .iter()
                    .any(|t| *t >= since)
            })
            .count()
    }

    /// The latest first-establishment after `since` over all agents (`None` unless all have
    /// one).
    pub fn all_established_by(&self, since: Instant) -> Option<Instant> {
        let mut last = since;
        for l in &self.logs {
            let l = l.lock().unwrap_or_else(PoisonError::into_inner);
            let first = l.established.iter().find(|t| **t >= since)?;
            last = last.max(*first);
        }
        Some(last)
    }

    /// Each agent's first session established at or after `since` (agents without one are left
    /// out).
    pub fn first_established_since(&self, since: Instant) -> Vec<Instant> {
        self.logs
            .iter()
            .filter_map(|l| {
                l.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .established
                    .iter()
                    .find(|t| **t >= since)
                    .copied()
            })
            .collect()
    }

    /// Sessions that ended at or after `since`.
    pub fn ended_since(&self, since: Instant) -> usize {
        self.logs
            .iter()
            .map(|l| {
                l.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .ended
                    .iter()
                    .filter(|t| **t >= since)
                    .count()
            })
            .sum()
    }
}

struct SimAgent {
    ep: quinn::Endpoint,
    client: quinn::ClientConfig,
    hub: SocketAddr,
    index: usize,
    opts: FleetOptions,
    counters: Arc<FleetCounters>,
    log: Arc<Mutex<AgentLog>>,
    cancel: CancellationToken,
    kick: tokio::sync::watch::Receiver<u64>,
}

impl SimAgent {
    async fn run(self) {
        // Sequence number of the last record sent; the hub's welcome moves it to what it stored.
        let mut seq = 0u64;
        let mut delay = self.opts.backoff_initial;
        let mut hinted: Option<(Duration, Instant)> = None;
        while !self.cancel.is_cancelled() {
            let mut hint = None;
            let mut established = false;
            match self.session(&mut seq, &mut hint).await {
                Ok(true) => {
                    delay = self.opts.backoff_initial;
                    established = true;
                }
                Ok(false) => {}
                Err(_) => {
                    self.counters
                        .failed_attempts
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            if self.cancel.is_cancelled() {
                return;
            }
            // As the agent does: after a hint, every attempt until the next session waits a
            // random moment within it (for at most backoff_max), instead of backing off.
            if let Some(within) = hint.filter(|_| self.opts.follow_hints) {
                hinted = Some((
                    within.min(self.opts.backoff_max),
                    Instant::now() + self.opts.backoff_max,
                ));
            } else if established {
                hinted = None;
            }
            let wait = match hinted.filter(|(_, until)| Instant::now() < *until) {
                Some((within, _)) => {
                    delay = self.opts.backoff_initial / 2;
                    Duration::from_millis(fastrand::u64(0..=within.as_millis() as u64))
                }
                None => {
                    let ms = delay.as_millis() as u64;
                    Duration::from_millis(fastrand::u64(ms / 2..=ms.max(1)))
                }
            };
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            delay = (delay * 2).min(self.opts.backoff_max);
        }
    }

    /// One connection: `Ok(true)` if a session was established (and then ended).
    async fn session(&self, seq: &mut u64, hint: &mut Option<Duration>) -> anyhow::Result<bool> {
        let connecting = self.ep.connect_with(self.client.clone(), self.hub, "hub")?;
        let conn = tokio::time::timeout(self.opts.connect_timeout, connecting)
            .await
            .map_err(|_| anyhow::anyhow!("connect timed out"))??;
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = Frame {
            body: Some(Body::Hello(Hello {
                versions: frame::SUPPORTED_VERSIONS.to_vec(),
                agent_version: "fleet".into(),
                boot_id: format!("fleet-{}", self.index),
                next_seq: *seq + 1,
                store_id: format!("fleet-store-{}", self.index),
                ..Default::default()
            })),
        };
        send.write_all(&frame::frame_bytes(&hello, DEFAULT_MAX_FRAME_LEN)?)
            .await?;
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        let mut buf = vec![0u8; 16 * 1024];
        // The welcome.
        let welcome = tokio::time::timeout(self.opts.connect_timeout, async {
            loop {
                if let Some(b) = decoder.next_frame()? {
                    return anyhow::Ok(b);
                }
                match recv.read(&mut buf).await? {
                    Some(n) => decoder.push(&buf[..n]),
                    None => anyhow::bail!("stream ended before the welcome"),
                }
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("no welcome in time"))??;
        let Body::Welcome(w) = welcome else {
            anyhow::bail!("expected a welcome");
        };
        *seq = w.stored_seq;
        let mut acked = w.stored_seq;
        self.counters.connected.fetch_add(1, Ordering::Relaxed);
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .established
            .push(Instant::now());
        let device = DeviceId::new("plc-1")?;
        let property = PropertyId::new("counter")?;
        // With `properties` > 1, record i is of property `p<i mod properties>`.
        let properties: Vec<PropertyId> = (0..self.opts.properties.max(1))
            .map(|i| PropertyId::new(format!("p{i}")))
            .collect::<Result<_, _>>()?;
        let mut tick = tokio::time::interval(self.opts.record_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut out = BytesMut::new();
        let mut kick = self.kick.clone();
        kick.borrow_and_update();
        let end = loop {
            tokio::select! {
                _ = self.cancel.cancelled() => {
                    conn.close(0u32.into(), b"fleet stopping");
                    break Ok(());
                }
                _ = kick.changed() => {
                    conn.close(0u32.into(), b"reconnecting");
                    break Ok(());
                }
                _ = tick.tick() => {
                    let room = self.opts.max_unacked.saturating_sub(seq.saturating_sub(acked));
                    let n = (self.opts.records_per_tick as u64).min(room);
                    if n == 0 {
                        continue;
                    }
                    let first = *seq + 1;
                    let ts = edgesync_edge::agent::wall_clock();
                    let batch: Vec<Sample> = (first..first + n)
                        .map(|i| Sample {
                            device: device.clone(),
                            property: if properties.len() > 1 {
                                properties[(i % properties.len() as u64) as usize].clone()
                            } else {
                                property.clone()
                            },
                            value: Some(Value::Int(i as i64)),
                            quality: Quality::Good,
                            ts,
                        })
                        .collect();
                    *seq += n;
                    out.clear();
                    frame::encode_records(first, batch.iter(), 0, DEFAULT_MAX_FRAME_LEN, &mut out)?;
                    if let Err(e) = send.write_all(&out).await {
                        break Err(anyhow::anyhow!("write: {e}"));
                    }
                }
                r = recv.read(&mut buf) => match r {
                    Ok(Some(n)) => {
                        decoder.push(&buf[..n]);
                        let mut done = None;
                        loop {
                            match decoder.next_frame() {
                                Ok(Some(Body::Ack(a))) => {
                                    acked = acked.max(a.stored_seq);
                                    self.counters.acked.store(a.stored_seq, Ordering::Relaxed);
                                }
                                Ok(Some(Body::Ping(p))) => {
                                    let pong = Frame { body: Some(Body::Pong(Ping { nonce: p.nonce })) };
                                    if send.write_all(&frame::frame_bytes(&pong, DEFAULT_MAX_FRAME_LEN)?).await.is_err() {
                                        done = Some(Err(anyhow::anyhow!("write pong")));
                                        break;
                                    }
                                }
                                Ok(Some(Body::Resend(r))) => *seq = r.from_seq.saturating_sub(1),
                                Ok(Some(Body::Goodbye(_))) => {
                                    done = Some(Ok(()));
                                    break;
                                }
                                Ok(Some(_)) => {}
                                Ok(None) => break,
                                Err(e) => {
                                    done = Some(Err(anyhow::anyhow!("frame: {e}")));
                                    break;
                                }
                            }
                        }
                        if let Some(d) = done {
                            break d;
                        }
                    }
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(anyhow::anyhow!("read: {e}")),
                },
            }
        };
        self.counters.connected.fetch_sub(1, Ordering::Relaxed);
        // Closing the stream's ends is not the hub's close: wait a moment for the latter.
        let _ = tokio::time::timeout(Duration::from_millis(100), conn.closed()).await;
        if let Some(quinn::ConnectionError::ApplicationClosed(c)) = conn.close_reason() {
            *hint = edgesync_protocol::close::retry_hint(&c.reason);
        }
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .ended
            .push(Instant::now());
        let _ = end;
        Ok(true)
    }
}
