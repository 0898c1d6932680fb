//! Pieces shared by the benchmarks: a free loopback port, an MQTT subscriber that timestamps
//! every message as it comes off the socket (`bench_twin.rs`, `bench_modbus.rs`), a
//! Prometheus text reader, and a load that changes every holding register of the simulator
//! (`bench_modbus.rs`, `bench_e2e.rs`).
//!
//! Included with `#[path]` by each benchmark (a directory without `main.rs` is not a binary
//! target of its own); not every benchmark uses every item.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use edgesync_testkit::sim::SimHandle;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

/// A loopback TCP port that was free a moment ago (bound to port 0, then released), for
/// configs that need a fixed port (the agent's embedded broker and metrics listener do not
/// report the port they got for port 0).
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    Ok(l.local_addr()?.port())
}

/// One message as the subscriber received it.
#[derive(Debug)]
pub struct Msg {
    /// When `EventLoop::poll` returned it (before any parsing).
    pub at: Instant,
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: bytes::Bytes,
}

/// A subscriber (rumqttc, MQTT 3.1.1, QoS 0) counting what it receives; with `keep`, it also
/// hands every message to [`Subscriber::rx`].
pub struct Subscriber {
    /// Messages received, if kept.
    pub rx: mpsc::UnboundedReceiver<Msg>,
    /// Messages received so far.
    pub messages: Arc<AtomicU64>,
    /// Telemetry properties received so far (`"quality"` keys in the payloads).
    pub properties: Arc<AtomicU64>,
    /// Payload bytes received so far.
    pub bytes: Arc<AtomicU64>,
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

/// How many times `needle` occurs in `hay` (non-overlapping).
fn count(hay: &[u8], needle: &[u8]) -> u64 {
    let mut n = 0;
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        if &hay[i..i + needle.len()] == needle {
            n += 1;
            i += needle.len();
        } else {
            i += 1;
        }
    }
    n
}

impl Subscriber {
    /// Connects to `127.0.0.1:port` (retrying while the broker is not up yet, for at most
    /// `within`), subscribes to `filter` and waits for the SUBACK.
    pub async fn connect(
        port: u16,
        filter: &str,
        keep: bool,
        within: Duration,
    ) -> anyhow::Result<Subscriber> {
        let mut o = MqttOptions::new(
            format!("bench-sub-{:x}", fastrand::u32(..)),
            "127.0.0.1",
            port,
        );
        o.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut ev) = AsyncClient::new(o, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        let messages = Arc::new(AtomicU64::new(0));
        let properties = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let (m, p, b) = (messages.clone(), properties.clone(), bytes.clone());
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::Publish(msg))) => {
                        let at = Instant::now();
                        m.fetch_add(1, Ordering::Relaxed);
                        p.fetch_add(count(&msg.payload, b"\"quality\""), Ordering::Relaxed);
                        b.fetch_add(msg.payload.len() as u64, Ordering::Relaxed);
                        if keep {
                            let _ = tx.send(Msg {
                                at,
                                topic: msg.topic,
                                payload: msg.payload,
                            });
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(_) => {}
                    // Not up yet, or a reconnect: rumqttc reconnects on the next poll.
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        client.subscribe(filter, QoS::AtMostOnce).await?;
        match tokio::time::timeout(within, ready_rx).await {
            Ok(Ok(())) => {}
            _ => {
                task.abort();
                bail!("no SUBACK from the broker on port {port} within {within:?}");
            }
        }
        Ok(Subscriber {
            rx,
            messages,
            properties,
            bytes,
            client,
            task,
        })
    }

    /// Disconnects and stops the event loop.
    pub async fn close(self) {
        let _ = self.client.try_disconnect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.task.abort();
    }
}

/// The sum of a Prometheus counter's samples whose line starts with `name` and contains
/// `label` (e.g. `reason="lagged"`; empty for any), from the text format.
pub fn metric_sum(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter(|l| l.contains(label))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// GET `http://127.0.0.1:port/metrics` (the agent's metrics listener).
pub async fn agent_metrics(port: u16) -> anyhow::Result<String> {
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .context("agent metrics")?
        .text()
        .await
        .context("agent metrics body")
}

/// Rewrites registers `0..registers` of units `1..=units` twice per `period` with new values
/// (one bulk write per unit; unit `u` lives on `sims[(u - 1) % sims.len()]`), so every poll of
/// every register tag reads a change. Runs until the task is aborted.
pub fn change_all(
    sims: Vec<SimHandle>,
    units: u8,
    registers: u16,
    period: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut iv = tokio::time::interval(period / 2);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u16 = 1000;
        let mut words = vec![0u16; usize::from(registers)];
        loop {
            iv.tick().await;
            n = n.wrapping_add(1);
            for u in 1..=units {
                for (i, w) in words.iter_mut().enumerate() {
                    *w = n.wrapping_add(i as u16);
                }
                let _ = sims[usize::from(u - 1) % sims.len()].set_holding(u, 0, &words);
            }
        }
    })
}
