//! `edgesync-bench-tunnel`: throughput and hop latency of the QUIC tunnel on loopback.
//!
//! A hub ([`Hub::start`]) and the agent's uplink ([`Uplink`]) run in this one process, so
//! `Instant`s of both ends compare. The agent's outbox ([`AgentStore`]) is driven directly
//! (no Modbus), so the numbers are those of outbox → QUIC → hub store → ack.
//!
//! 1. **Throughput**: N records are appended to a fresh outbox in groups, then an uplink is
//!    started and timed until the hub has acknowledged the last sequence number as durably
//!    stored (`status.acked == last`, cross-checked with `hub.store.stored_seq`).
//! 2. **Hop latency**: records are appended at a steady rate (a group every 10 ms) while the
//!    uplink runs; for every group, the time from "group committed to the outbox" (when the
//!    agent would broadcast `Committed`) to "the hub's durable `stored_seq` covers the group"
//!    (polled every 100 µs from a dedicated thread) goes into a histogram.
//!
//! Both phases run `--runs` times per agent fsync policy; the median run is reported.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use clap::{Parser, ValueEnum};
use edgesync_cloud::hub::Hub;
use edgesync_cloud::store::HubStore;
use edgesync_edge::agent::wall_clock;
use edgesync_edge::store::{AgentStore, Fsync};
use edgesync_edge::uplink::{Uplink, UplinkConfig, UplinkStatus};
use edgesync_protocol::spiffe_id;
use edgesync_protocol::{DeviceId, NodeId, PropertyId, Quality, Sample, Value};
use edgesync_testkit::harness::{self, Pki, TempDir, median};
use hdrhistogram::Histogram;
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

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

/// Tunnel throughput and hop-latency benchmark (loopback, hub embedded).
#[derive(Debug, Parser)]
struct Args {
    /// Records per throughput run.
    #[arg(long, default_value_t = 300_000)]
    records: u64,
    /// Records per outbox group in the throughput run.
    #[arg(long, default_value_t = 1000)]
    group: u64,
    /// Most records per uplink frame (the agent's `batch_max_records`).
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// Records per second in the latency run (one group every 10 ms).
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Seconds of the latency run.
    #[arg(long, default_value_t = 5)]
    latency_secs: u64,
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
        cert,
        key,
        bundle: rig.pki.bundle.clone(),
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

async fn bench(args: &Args, ids: &Ids, fsync: Fsync) -> anyhow::Result<()> {
    println!();
    println!(
        "== agent outbox fsync = {}, hub store fsync = every commit (hub default, not configurable) ==",
        fsync_name(fsync)
    );
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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    ensure!(
        args.runs > 0 && args.group > 0 && args.records > 0 && args.batch > 0,
        "runs, group, records and batch must be > 0"
    );
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
            bench(&args, &ids, f).await?;
        }
        Ok(())
    })
}
