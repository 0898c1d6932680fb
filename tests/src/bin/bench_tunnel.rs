//! `edgesync-bench-tunnel`: throughput and latency of the QUIC tunnel on loopback.
//!
//! A hub ([`Hub::start`]) and the agent's uplink ([`Uplink`]) run in this one process, so
//! `Instant`s of both ends compare. The agent's outbox ([`AgentStore`]) is driven directly
//! (no Modbus), so the numbers are those of outbox → QUIC → hub store → ack.
//!
//! 1. **Throughput** (`--part throughput`): N records are appended to a fresh outbox in
//!    groups, then an uplink is started and timed until the hub has acknowledged the last
//!    sequence number as durably stored (`status.acked == last`, cross-checked with
//!    `hub.store.stored_seq`).
//! 2. **Hop latency** (`--part hop`): records are appended at a steady rate (a group every
//!    10 ms) while the uplink runs; for every group, the time from "group committed to the
//!    outbox" (when the agent would broadcast `Committed`) to "the hub's durable `stored_seq`
//!    covers the group" (polled every 100 µs from a dedicated thread) goes into a histogram.
//! 3. **Record latency** (`--part record`): single records arrive at a steady rate (default
//!    1,000/s, one every millisecond) at a committer that group-commits like the agent's
//!    pipeline (commit at once; records that queued during a commit form the next group). Per
//!    record: from the moment it was handed to the committer ("accepted") to the moment the
//!    hub's session learned that a commit covering it returned durable (the hub's
//!    `edgesync::durability` trace "acknowledged upto=N", captured in this process by a
//!    tracing layer, so no polling), split into the agent's part (accepted → outbox commit
//!    returned) and the hop (outbox commit returned → hub stored). The disk's own
//!    `fdatasync` latency is probed before each run, for context.
//!
//! Each phase runs `--runs` times per agent fsync policy; the median run is reported.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use clap::{Parser, ValueEnum};
use edgesync_cloud::hub::Hub;
use edgesync_cloud::store::{DURABILITY_TARGET, HubStore};
use edgesync_edge::agent::wall_clock;
use edgesync_edge::store::{AgentStore, Fsync};
use edgesync_edge::uplink::{Uplink, UplinkConfig, UplinkStatus, svid_from_files};
use edgesync_protocol::spiffe_id;
use edgesync_protocol::{DeviceId, NodeId, PropertyId, Quality, Sample, Value};
use edgesync_testkit::harness::{self, Pki, TempDir, median};
use hdrhistogram::Histogram;
use tokio::sync::{Mutex, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, filter};

const TD: &str = "bench.example";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FsyncArg {
    /// fsync after every outbox group commit (the agent's default).
    EveryCommit,
    /// never fsync explicitly (sled flushes every second).
    Never,
    /// run everything once with each policy.
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    /// Durable-ack throughput of a full outbox.
    Throughput,
    /// Groups every 10 ms: outbox commit -> hub durable `stored_seq` (polled).
    Hop,
    /// Single records at `--record-rate`: accepted -> hub stored (hub's ack trace).
    Record,
}

/// Tunnel throughput and latency benchmark (loopback, hub embedded).
#[derive(Debug, Parser)]
struct Args {
    /// What to measure (comma-separated; default all three).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "throughput,hop,record"
    )]
    part: Vec<Part>,
    /// Records per throughput run.
    #[arg(long, default_value_t = 300_000)]
    records: u64,
    /// Records per outbox group in the throughput run.
    #[arg(long, default_value_t = 1000)]
    group: u64,
    /// Most records per uplink frame (the agent's `batch_max_records`).
    #[arg(long, default_value_t = edgesync_edge::config::DEFAULT_BATCH_MAX_RECORDS)]
    batch: usize,
    /// Records per second in the latency run (one group every 10 ms).
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Seconds of the latency run.
    #[arg(long, default_value_t = 5)]
    latency_secs: u64,
    /// Records per second in the record-latency run (one record at a time, evenly spaced).
    #[arg(long, default_value_t = 1000)]
    record_rate: u64,
    /// Seconds of the record-latency run.
    #[arg(long, default_value_t = 10)]
    record_secs: u64,
    /// After each record-latency run, the same two group commits on the disk alone
    /// (`disk_pipeline`): the floor of the record latency on this disk.
    #[arg(long)]
    disk_floor: bool,
    /// Runs per configuration (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Agent outbox fsync policy.
    #[arg(long, value_enum, default_value = "both")]
    agent_fsync: FsyncArg,
}

/// 10 devices x 100 properties, reused for every record.
struct Ids {
    props: Vec<(DeviceId, PropertyId)>,
}

impl Ids {
    fn new() -> anyhow::Result<Ids> {
        let mut props = vec![];
        for d in 0..10 {
            for p in 0..100 {
                props.push((
                    DeviceId::new(format!("plc-{d}"))?,
                    PropertyId::new(format!("c{p}"))?,
                ));
            }
        }
        Ok(Ids { props })
    }

    fn records(&self, first_seq: u64, n: u64) -> Vec<Sample> {
        let ts = wall_clock();
        (first_seq..first_seq + n)
            .map(|k| {
                let (device, property) = &self.props[(k % self.props.len() as u64) as usize];
                Sample {
                    device: device.clone(),
                    property: property.clone(),
                    value: Some(Value::UInt(k)),
                    quality: Quality::Good,
                    ts,
                }
            })
            .collect()
    }
}

struct Rig {
    _tmp: TempDir,
    pki: Pki,
    hub: Hub,
    dir: std::path::PathBuf,
}

async fn start_hub() -> anyhow::Result<Rig> {
    let tmp = TempDir::new("bench-tunnel")?;
    let dir = tmp.path().to_path_buf();
    let pki = Pki::new(&dir.join("pki"), TD)?;
    let hub = harness::embedded_hub(&pki, &dir).await?;
    Ok(Rig {
        _tmp: tmp,
        pki,
        hub,
        dir,
    })
}

/// An uplink for node `name`, with the channels that keep it running.
struct Edge {
    node: NodeId,
    store: Arc<Mutex<AgentStore>>,
    appended: watch::Sender<u64>,
    _dropped: watch::Sender<Option<(u64, u64)>>,
    status: watch::Receiver<UplinkStatus>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn open_store(dir: &Path, fsync: Fsync) -> anyhow::Result<AgentStore> {
    Ok(AgentStore::open(dir, 64 << 20, 1 << 30, fsync)?)
}

fn start_uplink(rig: &Rig, name: &str, store: AgentStore, batch: usize) -> anyhow::Result<Edge> {
    let (cert, key) = rig.pki.svid(&format!("spiffe://{TD}/edge/{name}"), name)?;
    let cfg = UplinkConfig {
        hub_address: rig.hub.tunnel_addr.to_string(),
        hub_id: spiffe_id::parse_id(&format!("spiffe://{TD}/hub")).map_err(|e| anyhow!("{e}"))?,
        svid: svid_from_files(&cert, &key, &rig.pki.bundle)?,
        svid_rotated: None,
        connect_timeout: Duration::from_secs(5),
        keepalive: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(10),
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
        batch_max_records: batch,
        agent_version: "bench".into(),
        boot_id: format!("{:016x}", fastrand::u64(..)),
    };
    let next = store.next_seq();
    let store = Arc::new(Mutex::new(store));
    let (appended, appended_rx) = watch::channel(next);
    let (dropped, dropped_rx) = watch::channel(None);
    let (status_tx, status) = watch::channel(UplinkStatus::default());
    let cancel = CancellationToken::new();
    let uplink = Uplink::new(
        cfg,
        store.clone(),
        appended_rx,
        dropped_rx,
        status_tx,
        cancel.clone(),
    );
    let task = tokio::spawn(uplink.run());
    Ok(Edge {
        node: NodeId::new(name)?,
        store,
        appended,
        _dropped: dropped,
        status,
        cancel,
        task,
    })
}

impl Edge {
    async fn wait_connected(&mut self) -> anyhow::Result<()> {
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            self.status.wait_for(|s| s.connected),
        )
        .await
        .map(|r| r.is_ok());
        match r {
            Ok(true) => Ok(()),
            Ok(false) => bail!("uplink task ended before connecting"),
            Err(_) => bail!(
                "uplink did not connect within 30 s: {:?}",
                self.status.borrow().last_error
            ),
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

struct Throughput {
    append_rate: f64,
    connect_ms: f64,
    drain_s: f64,
    rate: f64,
}

async fn throughput(
    rig: &Rig,
    ids: &Ids,
    args: &Args,
    fsync: Fsync,
    run: usize,
) -> anyhow::Result<Throughput> {
    let mut st = open_store(&rig.dir.join(format!("tp-{run}")), fsync)?;
    let t0 = Instant::now();
    let mut appended = 0;
    while appended < args.records {
        let n = args.group.min(args.records - appended);
        let first = st.next_seq();
        st.append(ids.records(first, n), &[]).await?;
        appended += n;
    }
    let append_rate = args.records as f64 / t0.elapsed().as_secs_f64();
    let last = st.next_seq() - 1;
    let started = Instant::now();
    let mut edge = start_uplink(rig, &format!("tp-{run}"), st, args.batch)?;
    edge.wait_connected().await?;
    let connected = Instant::now();
    let acked = tokio::time::timeout(
        Duration::from_secs(300),
        edge.status.wait_for(|s| s.acked >= last),
    )
    .await
    .map(|r| r.is_ok());
    match acked {
        Ok(true) => {}
        Ok(false) => bail!("uplink task ended before the hub acked {last}"),
        Err(_) => bail!(
            "hub did not ack {last} records within 300 s (acked {})",
            edge.status.borrow().acked
        ),
    }
    let done = Instant::now();
    let stored = rig.hub.store.stored_seq(&edge.node)?;
    ensure!(
        stored == last,
        "hub stored_seq {stored} != last appended {last}"
    );
    edge.stop().await;
    let drain = done - connected;
    Ok(Throughput {
        append_rate,
        connect_ms: (connected - started).as_secs_f64() * 1e3,
        drain_s: drain.as_secs_f64(),
        rate: args.records as f64 / drain.as_secs_f64(),
    })
}

struct Latency {
    hop: Histogram<u64>,
    commit: Histogram<u64>,
    achieved_rate: f64,
}

/// Polls the hub's durable sequence number every 100 µs and records, for each pending group
/// `(last_seq, committed_at)`, the time until it is covered.
fn watcher(
    store: Arc<HubStore>,
    node: NodeId,
    pending: Arc<std::sync::Mutex<VecDeque<(u64, Instant)>>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<anyhow::Result<Histogram<u64>>> {
    std::thread::spawn(move || {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        loop {
            let stopping = stop.load(Ordering::Acquire);
            let seq = store.stored_seq(&node)?;
            let now = Instant::now();
            {
                let mut p = pending.lock().map_err(|_| anyhow!("poisoned"))?;
                while let Some(&(last, at)) = p.front() {
                    if last > seq {
                        break;
                    }
                    h.saturating_record((now - at).as_micros() as u64);
                    p.pop_front();
                }
                if stopping && p.is_empty() {
                    return Ok(h);
                }
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    })
}

async fn latency(
    rig: &Rig,
    ids: &Ids,
    args: &Args,
    fsync: Fsync,
    run: usize,
) -> anyhow::Result<Latency> {
    let st = open_store(&rig.dir.join(format!("lat-{run}")), fsync)?;
    let mut edge = start_uplink(rig, &format!("lat-{run}"), st, args.batch)?;
    edge.wait_connected().await?;
    let pending = Arc::new(std::sync::Mutex::new(VecDeque::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let w = watcher(
        rig.hub.store.clone(),
        edge.node.clone(),
        pending.clone(),
        stop.clone(),
    );
    let per_group = (args.rate / 100).max(1);
    let mut commit = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(args.latency_secs);
    let mut sent = 0u64;
    while Instant::now() < end {
        tick.tick().await;
        let mut st = edge.store.lock().await;
        let first = st.next_seq();
        let recs = ids.records(first, per_group);
        let c0 = Instant::now();
        let a = st.append(recs, &[]).await?;
        drop(st);
        let committed = Instant::now();
        commit.saturating_record((committed - c0).as_micros() as u64);
        pending
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .push_back((a.next_seq - 1, committed));
        let _ = edge.appended.send(a.next_seq);
        sent += per_group;
    }
    let achieved_rate = sent as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    let hop = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || w.join()),
    )
    .await
    .context("the hub did not store every group within 30 s")??
    .map_err(|_| anyhow!("watcher thread panicked"))??;
    edge.stop().await;
    Ok(Latency {
        hop,
        commit,
        achieved_rate,
    })
}

/// When the embedded hub's sessions acknowledged: the hub logs the trace event
/// "acknowledged upto=N node=X" (target [`DURABILITY_TARGET`]) as soon as a commit covering
/// `N` has returned durable, just before it queues the ack. This layer notes `(N, Instant)`
/// for every such event while `on` is set.
#[derive(Clone, Default)]
struct HubAcks {
    on: Arc<AtomicBool>,
    seen: Arc<std::sync::Mutex<Vec<(u64, Instant)>>>,
}

impl HubAcks {
    /// Starts recording (dropping what was recorded before).
    fn start(&self) -> anyhow::Result<()> {
        self.seen.lock().map_err(|_| anyhow!("poisoned"))?.clear();
        self.on.store(true, Ordering::Release);
        Ok(())
    }

    /// Stops recording and returns what was recorded, in order.
    fn take(&self) -> anyhow::Result<Vec<(u64, Instant)>> {
        self.on.store(false, Ordering::Release);
        Ok(std::mem::take(
            &mut *self.seen.lock().map_err(|_| anyhow!("poisoned"))?,
        ))
    }

    /// The `upto` of an "acknowledged upto=N ..." message.
    fn upto(event: &tracing::Event<'_>) -> Option<u64> {
        struct Upto(Option<u64>);
        impl tracing::field::Visit for Upto {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" {
                    let m = format!("{v:?}");
                    self.0 = m
                        .strip_prefix("acknowledged upto=")
                        .and_then(|r| r.split(' ').next())
                        .and_then(|n| n.parse().ok());
                }
            }
        }
        let mut u = Upto(None);
        event.record(&mut u);
        u.0
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for HubAcks {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let now = Instant::now();
        if !self.on.load(Ordering::Acquire) {
            return;
        }
        if let Some(upto) = Self::upto(event)
            && let Ok(mut seen) = self.seen.lock()
        {
            seen.push((upto, now));
        }
    }
}

/// The disk's own fsync latency where the stores live, measured just before a run: 200 times
/// `write` of 512 bytes + `fdatasync` on a scratch file; `(p50, p99)` in ms.
fn fdatasync_probe(dir: &Path) -> anyhow::Result<(f64, f64)> {
    use std::io::Write as _;
    let path = dir.join("fdatasync-probe");
    let mut f = std::fs::File::create(&path)?;
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for _ in 0..200 {
        f.write_all(&[0x55; 512])?;
        let t = Instant::now();
        f.sync_data()?;
        h.saturating_record(t.elapsed().as_micros() as u64);
    }
    drop(f);
    std::fs::remove_file(&path)?;
    Ok((ms(h.value_at_quantile(0.5)), ms(h.value_at_quantile(0.99))))
}

/// A thread that hands `n` instants to `send`, one every 1/`rate` s on absolute deadlines (so
/// sleep overshoot does not lower the rate); it stops early when `send` returns false.
fn paced_source(
    n: u64,
    rate: u64,
    mut send: impl FnMut(Instant) -> bool + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let period_ns = 1_000_000_000 / rate.max(1);
    std::thread::spawn(move || {
        let t0 = Instant::now();
        for k in 0..n {
            let due = t0 + Duration::from_nanos(k * period_ns);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if !send(Instant::now()) {
                return;
            }
        }
    })
}

/// The record pipeline with everything but the disk taken out, for the floor the record
/// latency cannot go under on this disk: records arrive every 1/`rate` s for `secs` s (absolute
/// deadlines); stage A (the agent's commit) writes 64 bytes per record that queued into a file
/// zero-filled beforehand (as the outbox's segments are) and `fdatasync`s it; stage B (the hub's
/// commit) appends 64 bytes per record that A finished to a growing file (as sled's log grows)
/// and `fdatasync`s it. Both stages commit at once and batch what queued meanwhile, as ours do.
/// Per record: accepted -> B durable.
fn disk_pipeline(dir: &Path, rate: u64, secs: u64) -> anyhow::Result<Histogram<u64>> {
    use std::io::Write as _;
    use std::os::unix::fs::FileExt as _;
    use std::sync::mpsc as smpsc;
    let n = rate * secs;
    let a_path = dir.join("disk-pipeline-a");
    let b_path = dir.join("disk-pipeline-b");
    let a = std::fs::File::create(&a_path)?;
    a.write_all_at(&vec![0u8; (n as usize + 1) * 64], 0)?;
    a.sync_all()?;
    let mut b = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&b_path)?;
    let (to_a, a_rx) = smpsc::channel::<Instant>();
    let (to_b, b_rx) = smpsc::channel::<Vec<Instant>>();
    let source = paced_source(n, rate, move |at| to_a.send(at).is_ok());
    let stage_a = std::thread::spawn(move || -> std::io::Result<()> {
        let mut off = 0u64;
        while let Ok(first) = a_rx.recv() {
            let mut group = vec![first];
            group.extend(a_rx.try_iter());
            let bytes = vec![0x55u8; group.len() * 64];
            a.write_all_at(&bytes, off)?;
            off += bytes.len() as u64;
            a.sync_data()?;
            if to_b.send(group).is_err() {
                break;
            }
        }
        Ok(())
    });
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    while let Ok(first) = b_rx.recv() {
        let mut group = first;
        for more in b_rx.try_iter() {
            group.extend(more);
        }
        b.write_all(&vec![0xaau8; group.len() * 64])?;
        b.sync_data()?;
        let done = Instant::now();
        for at in group {
            h.saturating_record(done.duration_since(at).as_micros() as u64);
        }
    }
    source
        .join()
        .map_err(|_| anyhow!("disk pipeline source panicked"))?;
    stage_a
        .join()
        .map_err(|_| anyhow!("disk pipeline stage A panicked"))??;
    drop(b);
    std::fs::remove_file(&a_path)?;
    std::fs::remove_file(&b_path)?;
    Ok(h)
}

struct RecordLatency {
    /// Accepted -> hub stored.
    total: Histogram<u64>,
    /// Accepted -> outbox commit returned.
    agent: Histogram<u64>,
    /// Outbox commit returned -> hub stored.
    hop: Histogram<u64>,
    records: u64,
    groups: usize,
    achieved_rate: f64,
    /// The disk's fdatasync p50 / p99 (ms) just before the run.
    disk: (f64, f64),
    /// Runs of records slower than [`SLOW_MS`], for the tail's cause (see [`Episode`]).
    episodes: Vec<Episode>,
}

/// A record slower than this (ms) is part of an [`Episode`].
const SLOW_MS: f64 = 3.0;

/// Records over [`SLOW_MS`] accepted within 10 ms of each other: a stall, not a slow record.
#[derive(Debug, Clone, Copy)]
struct Episode {
    /// When its first record was accepted, seconds into the run.
    at_s: f64,
    /// Its slow records.
    records: usize,
    /// Its slowest record's total, agent part and hop (ms).
    max_ms: f64,
    agent_ms: f64,
    hop_ms: f64,
}

/// Groups the slow records of a run into [`Episode`]s.
fn episodes(t0: Instant, per_record: &[(Instant, f64, f64, f64)]) -> Vec<Episode> {
    let mut out: Vec<Episode> = vec![];
    let mut last: Option<Instant> = None;
    for &(at, total, agent, hop) in per_record.iter().filter(|r| r.1 > SLOW_MS) {
        let joins = last.is_some_and(|l| at.duration_since(l) < Duration::from_millis(10));
        last = Some(at);
        match out.last_mut() {
            Some(e) if joins => {
                e.records += 1;
                if total > e.max_ms {
                    (e.max_ms, e.agent_ms, e.hop_ms) = (total, agent, hop);
                }
            }
            _ => out.push(Episode {
                at_s: at.duration_since(t0).as_secs_f64(),
                records: 1,
                max_ms: total,
                agent_ms: agent,
                hop_ms: hop,
            }),
        }
    }
    out
}

/// Single records at `--record-rate`, group-committed as the agent's pipeline does; per record,
/// accepted -> outbox commit returned -> hub stored (see the module docs).
async fn record_latency(
    rig: &Rig,
    ids: &Ids,
    args: &Args,
    fsync: Fsync,
    run: usize,
    acks: &HubAcks,
) -> anyhow::Result<RecordLatency> {
    let disk = fdatasync_probe(&rig.dir)?;
    let st = open_store(&rig.dir.join(format!("rec-{run}")), fsync)?;
    let mut edge = start_uplink(rig, &format!("rec-{run}"), st, args.batch)?;
    edge.wait_connected().await?;
    acks.start()?;
    let base = edge.store.lock().await.next_seq();
    let n = args.record_rate * args.record_secs;
    // The source: one record every 1/rate s on a thread of its own (absolute deadlines, so
    // sleep overshoot does not lower the rate), handed over with its acceptance instant.
    let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
    let source = paced_source(n, args.record_rate, move |at| tx.send(at).is_ok());
    // The committer: commit at once; what queued meanwhile is the next group.
    let t0 = Instant::now();
    let mut accepted: Vec<Instant> = Vec::with_capacity(n as usize);
    let mut committed: Vec<(u64, Instant)> = vec![];
    while let Some(at) = rx.recv().await {
        accepted.push(at);
        let mut count = 1;
        while let Ok(at) = rx.try_recv() {
            accepted.push(at);
            count += 1;
        }
        let mut st = edge.store.lock().await;
        let first = st.next_seq();
        let a = st.append(ids.records(first, count), &[]).await?;
        drop(st);
        committed.push((a.next_seq - 1, Instant::now()));
        let _ = edge.appended.send(a.next_seq);
    }
    let achieved_rate = accepted.len() as f64 / t0.elapsed().as_secs_f64();
    source
        .join()
        .map_err(|_| anyhow!("source thread panicked"))?;
    let last = base + accepted.len() as u64 - 1;
    let acked = tokio::time::timeout(
        Duration::from_secs(30),
        edge.status.wait_for(|s| s.acked >= last),
    )
    .await
    .map(|r| r.is_ok());
    ensure!(
        acked == Ok(true),
        "the hub did not acknowledge {last} within 30 s"
    );
    let stored = acks.take()?;
    edge.stop().await;

    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut agent = total.clone();
    let mut hop = total.clone();
    let (mut c, mut h) = (0, 0);
    let mut per_record = Vec::with_capacity(accepted.len());
    for (k, at) in accepted.iter().enumerate() {
        let seq = base + k as u64;
        while committed.get(c).is_some_and(|&(upto, _)| upto < seq) {
            c += 1;
        }
        while stored.get(h).is_some_and(|&(upto, _)| upto < seq) {
            h += 1;
        }
        let (Some(&(_, done)), Some(&(_, safe))) = (committed.get(c), stored.get(h)) else {
            bail!("record {seq}: no outbox commit or hub acknowledgement covers it");
        };
        agent.saturating_record((done - *at).as_micros() as u64);
        hop.saturating_record(safe.saturating_duration_since(done).as_micros() as u64);
        total.saturating_record((safe - *at).as_micros() as u64);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        per_record.push((
            *at,
            ms(safe - *at),
            ms(done - *at),
            ms(safe.saturating_duration_since(done)),
        ));
    }
    let episodes = episodes(t0, &per_record);
    Ok(RecordLatency {
        total,
        agent,
        hop,
        records: accepted.len() as u64,
        groups: committed.len(),
        achieved_rate,
        disk,
        episodes,
    })
}

/// One line on the run's stalls: how many, how far apart, and the worst five.
fn print_episodes(eps: &[Episode]) {
    let slow: usize = eps.iter().map(|e| e.records).sum();
    let mut gaps: Vec<f64> = eps.windows(2).map(|w| w[1].at_s - w[0].at_s).collect();
    let gap = if gaps.is_empty() {
        "-".to_owned()
    } else {
        gaps.sort_by(f64::total_cmp);
        format!("{:.2} s", gaps[gaps.len() / 2])
    };
    let mut worst = eps.to_vec();
    worst.sort_by(|a, b| b.max_ms.total_cmp(&a.max_ms));
    let shown: Vec<String> = worst
        .iter()
        .take(5)
        .map(|e| {
            format!(
                "{:.2} s: {} rec, max {:.1} ms (agent {:.1}, hop {:.1})",
                e.at_s, e.records, e.max_ms, e.agent_ms, e.hop_ms
            )
        })
        .collect();
    println!(
        "      records over {SLOW_MS} ms: {slow} in {} stalls, median {gap} apart; worst: {}",
        eps.len(),
        shown.join("; ")
    );
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn fsync_name(f: Fsync) -> &'static str {
    match f {
        Fsync::EveryCommit => "every-commit",
        Fsync::Never => "never",
        Fsync::IntervalMs(_) => "interval",
    }
}

async fn bench(args: &Args, ids: &Ids, fsync: Fsync, acks: &HubAcks) -> anyhow::Result<()> {
    println!();
    println!(
        "== agent outbox fsync = {}, hub store fsync = every commit (hub default, not configurable) ==",
        fsync_name(fsync)
    );
    if args.part.contains(&Part::Throughput) {
        bench_throughput(args, ids, fsync).await?;
    }
    if args.part.contains(&Part::Hop) {
        bench_hop(args, ids, fsync).await?;
    }
    if args.part.contains(&Part::Record) {
        bench_record(args, ids, fsync, acks).await?;
    }
    Ok(())
}

async fn bench_throughput(args: &Args, ids: &Ids, fsync: Fsync) -> anyhow::Result<()> {
    println!();
    println!(
        "throughput: {} records, outbox groups of {}, uplink frames of <= {} records, durable acks",
        args.records, args.group, args.batch
    );
    println!(
        "{:>4}  {:>16}  {:>11}  {:>9}  {:>22}",
        "run", "outbox append/s", "connect ms", "drain s", "tunnel records/s"
    );
    let mut rates = vec![];
    let mut appends = vec![];
    for run in 0..args.runs {
        let rig = start_hub().await?;
        let t = throughput(&rig, ids, args, fsync, run).await?;
        println!(
            "{:>4}  {:>16.0}  {:>11.1}  {:>9.2}  {:>22.0}",
            run + 1,
            t.append_rate,
            t.connect_ms,
            t.drain_s,
            t.rate
        );
        rates.push(t.rate);
        appends.push(t.append_rate);
        rig.hub.shutdown().await;
    }
    let r = median(rates);
    println!(
        "{:>4}  {:>16.0}  {:>11}  {:>9}  {:>22.0}   (target 100000/s: {})",
        "med",
        median(appends),
        "",
        "",
        r,
        if r >= 100_000.0 { "met" } else { "MISSED" }
    );
    Ok(())
}

async fn bench_hop(args: &Args, ids: &Ids, fsync: Fsync) -> anyhow::Result<()> {
    println!();
    println!(
        "hop latency: {} records/s offered ({} per group every 10 ms) for {} s; outbox commit -> hub durable stored_seq",
        args.rate,
        (args.rate / 100).max(1),
        args.latency_secs
    );
    println!(
        "{:>4}  {:>9}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}  {:>16}",
        "run", "groups", "p50 ms", "p90 ms", "p99 ms", "max ms", "rec/s", "agent commit p50/p99 ms"
    );
    let (mut p50, mut p90, mut p99, mut max) = (vec![], vec![], vec![], vec![]);
    for run in 0..args.runs {
        let rig = start_hub().await?;
        let l = latency(&rig, ids, args, fsync, run).await?;
        let h = &l.hop;
        println!(
            "{:>4}  {:>9}  {:>8.2}  {:>8.2}  {:>8.2}  {:>8.2}  {:>8.0}  {:>8.2} / {:.2}",
            run + 1,
            h.len(),
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.9)),
            ms(h.value_at_quantile(0.99)),
            ms(h.max()),
            l.achieved_rate,
            ms(l.commit.value_at_quantile(0.5)),
            ms(l.commit.value_at_quantile(0.99)),
        );
        p50.push(ms(h.value_at_quantile(0.5)));
        p90.push(ms(h.value_at_quantile(0.9)));
        p99.push(ms(h.value_at_quantile(0.99)));
        max.push(ms(h.max()));
        rig.hub.shutdown().await;
    }
    let m99 = median(p99);
    println!(
        "{:>4}  {:>9}  {:>8.2}  {:>8.2}  {:>8.2}  {:>8.2}   (target p99 < 5 ms: {})",
        "med",
        "",
        median(p50),
        median(p90),
        m99,
        median(max),
        if m99 < 5.0 { "met" } else { "MISSED" }
    );
    Ok(())
}

async fn bench_record(args: &Args, ids: &Ids, fsync: Fsync, acks: &HubAcks) -> anyhow::Result<()> {
    println!();
    println!(
        "record latency: {} single records/s for {} s, group commit without a window; accepted -> outbox commit returned (agent) -> hub commit returned durable (hub's ack trace)",
        args.record_rate, args.record_secs
    );
    println!(
        "{:>4}  {:>8}  {:>7}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}  {:>17}  {:>17}  {:>19}",
        "run",
        "records",
        "groups",
        "rec/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "agent p50/p99 ms",
        "hop p50/p99 ms",
        "disk fdatasync p50/p99"
    );
    let mut cols: [Vec<f64>; 10] = Default::default();
    for run in 0..args.runs {
        let rig = start_hub().await?;
        let l = record_latency(&rig, ids, args, fsync, run, acks).await?;
        rig.hub.shutdown().await;
        let row = [
            ms(l.total.value_at_quantile(0.5)),
            ms(l.total.value_at_quantile(0.9)),
            ms(l.total.value_at_quantile(0.99)),
            ms(l.total.max()),
            ms(l.agent.value_at_quantile(0.5)),
            ms(l.agent.value_at_quantile(0.99)),
            ms(l.hop.value_at_quantile(0.5)),
            ms(l.hop.value_at_quantile(0.99)),
            l.disk.0,
            l.disk.1,
        ];
        println!(
            "{:>4}  {:>8}  {:>7}  {:>8.0}  {:>8.2}  {:>8.2}  {:>8.2}  {:>8.2}  {:>8.2} / {:<6.2}  {:>8.2} / {:<6.2}  {:>10.2} / {:<6.2}",
            run + 1,
            l.records,
            l.groups,
            l.achieved_rate,
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            row[6],
            row[7],
            row[8],
            row[9]
        );
        for (c, v) in cols.iter_mut().zip(row) {
            c.push(v);
        }
        print_episodes(&l.episodes);
        if args.disk_floor {
            let dir = rig.dir.clone();
            let (rate, secs) = (args.record_rate, args.record_secs);
            let h = tokio::task::spawn_blocking(move || disk_pipeline(&dir, rate, secs)).await??;
            println!(
                "      the same two group commits on the disk alone (no network, no encoding): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.99)),
                ms(h.max())
            );
        }
    }
    let m = cols.map(median);
    println!(
        "{:>4}  {:>8}  {:>7}  {:>8}  {:>8.2}  {:>8.2}  {:>8.2}  {:>8.2}  {:>8.2} / {:<6.2}  {:>8.2} / {:<6.2}  {:>10.2} / {:<6.2}   (target p50 < 1.5 ms: {}, p99 < 3 ms: {})",
        "med",
        "",
        "",
        "",
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5],
        m[6],
        m[7],
        m[8],
        m[9],
        if m[0] < 1.5 { "met" } else { "MISSED" },
        if m[2] < 3.0 { "met" } else { "MISSED" }
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.runs > 0 && args.group > 0 && args.records > 0 && args.batch > 0,
        "runs, group, records and batch must be > 0"
    );
    ensure!(
        (1..=1_000_000).contains(&args.record_rate) && args.record_secs > 0,
        "record-rate must be 1..=1000000 and record-secs > 0"
    );
    // Logs only with RUST_LOG; the hub's acknowledgements are always seen by `acks`.
    let acks = HubAcks::default();
    let log = std::env::var_os("RUST_LOG")
        .is_some()
        .then(|| tracing_subscriber::fmt::layer().with_filter(EnvFilter::from_default_env()));
    tracing_subscriber::registry()
        .with(log)
        .with(
            // A static filter: every other callsite is disabled once, when registered, so the
            // layer costs nothing on the hot paths (quinn's spans among them).
            acks.clone().with_filter(
                filter::Targets::new().with_target(DURABILITY_TARGET, tracing::Level::TRACE),
            ),
        )
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let ids = Ids::new()?;
        println!("edgesync-bench-tunnel: hub and agent uplink in one process, QUIC over 127.0.0.1");
        let policies = match args.agent_fsync {
            FsyncArg::EveryCommit => vec![Fsync::EveryCommit],
            FsyncArg::Never => vec![Fsync::Never],
            FsyncArg::Both => vec![Fsync::EveryCommit, Fsync::Never],
        };
        for f in policies {
            bench(&args, &ids, f, &acks).await?;
        }
        Ok(())
    })
}
