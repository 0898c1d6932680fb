//! `edgesync-bench-fleet`: a fleet of simulated agents against the real `edgesync-hub` binary.
//!
//! `--part reconnect`: `--agents` simulated agents (the testkit's fleet: each with its own
//! SVID, one record per second, the real agent's reconnect backoff) connect to a fresh hub; the
//! hub is stopped (SIGTERM by PID) and started again on the same addresses and store; each run
//! does this twice, once with the agents following the retry hint the stopping hub sends
//! (`hint yes`, what the agent does) and once ignoring it (`hint no`: backoff only). `connect
//! s` is the time from the end of minting the identities (the agents start connecting while
//! they are minted) until all are connected; `noticed` is how many sessions had ended when the
//! old hub's process was gone (all of them, if its close reached every agent). Measured:
//! the time from the new hub's ready line until every agent has a session again, the hub's CPU
//! time over that interval (from its start), its peak RSS, the hub's RSS per connected node
//! (RSS with every agent connected minus the RSS of the fresh hub, divided by the agents),
//! refused handshakes, and the sessions that end again in the `--settle-secs` after the last
//! agent resumed (flapping).
//!
//! `--part flood`: a fresh hub with `--agents` simulated agents connected; then, for
//! `--flood-secs`, attempts that answer the hub's Retry and then stall (holding a handshake
//! until `handshake_timeout_ms`) from `--flood-hosts` source addresses (127.2.0.x), as fast as
//! `--flood-concurrency` tasks allow, plus the same rate of attempts that never answer the
//! Retry (spoofed sources). Halfway, the connected agents drop their sessions and reconnect
//! ("known", their addresses authenticated before), and as many new agents start from
//! addresses the hub has not seen. Measured: attempts per second, the hub's CPU and peak RSS,
//! its RSS per handshake in progress (RSS growth once the flood runs / `max_handshakes`), how
//! long the known agents took to be back, and how many new ones got in before the flood ended.
//!
//! The hub binary is the one next to this binary (`cargo build --release` builds both).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::ensure;
use clap::{Parser, ValueEnum};
use edgesync_testkit::fleet::{Fleet, FleetOptions};
use edgesync_testkit::harness::{self, Api, Pki, TempDir, median};
use edgesync_testkit::hostile::{self, HubAnswer};

const TD: &str = "bench.example";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    /// Reconnect of the fleet after a hub restart.
    Reconnect,
    /// A flood of stalled handshakes, with agents connecting during it.
    Flood,
    /// The hub's memory as one node's tag count grows.
    Tags,
    /// Tunnel handshakes (QUIC + mutually authenticated TLS 1.3 with SVIDs) as fast as clients
    /// make them: their duration, and how many per second the hub completes.
    Handshake,
}

#[derive(Debug, Parser)]
#[command(about = "A fleet of simulated agents against the real hub")]
struct Args {
    #[arg(long, value_enum, default_value = "reconnect")]
    part: Part,
    /// Simulated agents (reconnect), or agents connecting during the flood.
    #[arg(long)]
    agents: Option<usize>,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Watch for sessions ending again this long after the last agent resumed.
    #[arg(long, default_value_t = 10)]
    settle_secs: u64,
    #[arg(long, default_value_t = 10)]
    flood_secs: u64,
    #[arg(long, default_value_t = 64)]
    flood_hosts: u8,
    #[arg(long, default_value_t = 256)]
    flood_concurrency: usize,
    /// Concurrent clients of `--part handshake` (one run per value, each from its own
    /// loopback address 127.3.0.x).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    clients: Vec<usize>,
    /// Seconds each `--part handshake` run lasts.
    #[arg(long, default_value_t = 10)]
    handshake_secs: u64,
    /// Tag counts of `--part tags` (one node, one device, this many properties).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,30000,100000")]
    tags: Vec<usize>,
}

struct TagsRun {
    rss0_mib: f64,
    rss_mib: f64,
    hwm_mib: f64,
    reported: u64,
}

/// A fresh hub; one simulated agent reports `tags` distinct properties of one device (each
/// several times), then one record per millisecond goes on for 3 s; the hub's RSS and peak.
async fn tags_run(tags: usize) -> anyhow::Result<TagsRun> {
    let tmp = TempDir::new("bench-tags")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let (hub, tunnel, http) =
        harness::start_hub(tmp.path(), &pki, "127.0.0.1:0", "127.0.0.1:0").await?;
    let pid = hub.pid().unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0_mib = harness::proc_status_mib(pid, "VmRSS:")?;
    let fleet = Fleet::start(
        &pki,
        TD,
        tunnel.parse()?,
        &FleetOptions {
            agents: 1,
            record_every: Duration::from_millis(1),
            records_per_tick: 1000,
            max_unacked: 20_000,
            properties: tags,
            prefix: "tags".into(),
            ..Default::default()
        },
    )?;
    let want = 3 * tags as u64;
    let t = Instant::now();
    while fleet.counters.acked.load(Ordering::Relaxed) < want {
        ensure!(
            t.elapsed() < Duration::from_secs(300),
            "only {} records stored",
            fleet.counters.acked.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(fleet);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let api = Api::new(&http);
    let (_, dev) = api.get("/api/v1/nodes/tags-0/devices/plc-1").await?;
    Ok(TagsRun {
        rss0_mib,
        rss_mib: harness::proc_status_mib(pid, "VmRSS:")?,
        hwm_mib: harness::proc_status_mib(pid, "VmHWM:")?,
        reported: dev["properties"].as_u64().unwrap_or(0),
    })
}

async fn metric(api: &Api, name: &str, label: &str) -> f64 {
    let Ok(text) = api.metrics().await else {
        return f64::NAN;
    };
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        + 0.0
}

struct ReconnectRun {
    initial_s: f64,
    ended_at_restart: usize,
    resume_s: f64,
    resume_p50_s: f64,
    resume_p90_s: f64,
    hub_cpu_s: f64,
    hub_hwm_mib: f64,
    per_node_kib: f64,
    refused: f64,
    failed_attempts: u64,
    flapped: usize,
}

async fn reconnect_run(
    agents: usize,
    settle: Duration,
    follow_hints: bool,
) -> anyhow::Result<ReconnectRun> {
    let tmp = TempDir::new("bench-fleet")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let (hub, tunnel, http) =
        harness::start_hub(tmp.path(), &pki, "127.0.0.1:0", "127.0.0.1:0").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = harness::proc_status_mib(hub.pid().unwrap_or(0), "VmRSS:")?;
    let opts = FleetOptions {
        agents,
        follow_hints,
        ..Default::default()
    };
    let fleet = Fleet::start(&pki, TD, tunnel.parse()?, &opts)?;
    let t0 = Instant::now();
    while fleet.counters.connected.load(Ordering::Relaxed) < agents {
        ensure!(
            t0.elapsed() < Duration::from_secs(300),
            "the fleet did not connect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let initial_s = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss1 = harness::proc_status_mib(hub.pid().unwrap_or(0), "VmRSS:")?;
    let failed_before = fleet.counters.failed_attempts.load(Ordering::Relaxed);
    ensure!(hub.terminate().await?, "the hub did not stop cleanly");
    let stopped = Instant::now();
    let (hub, _, _) = harness::start_hub(tmp.path(), &pki, &tunnel, &http).await?;
    let ready = Instant::now();
    let ended_at_restart = fleet.ended_since(t0);
    let pid = hub.pid().unwrap_or(0);
    let all = loop {
        if let Some(t) = fleet.all_established_by(stopped) {
            break t;
        }
        ensure!(
            ready.elapsed() < Duration::from_secs(300),
            "{} of {agents} resumed",
            fleet.established_since(stopped)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let hub_cpu_s = harness::proc_cpu_seconds(pid)?;
    let resume_s = all.saturating_duration_since(ready).as_secs_f64();
    let mut each: Vec<f64> = fleet
        .first_established_since(stopped)
        .iter()
        .map(|t| t.saturating_duration_since(ready).as_secs_f64())
        .collect();
    each.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        each.get(((each.len() as f64 * p) as usize).min(each.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let (resume_p50_s, resume_p90_s) = (pct(0.5), pct(0.9));
    tokio::time::sleep(settle).await;
    let api = Api::new(&http);
    Ok(ReconnectRun {
        initial_s,
        ended_at_restart,
        resume_s,
        resume_p50_s,
        resume_p90_s,
        hub_cpu_s,
        hub_hwm_mib: harness::proc_status_mib(pid, "VmHWM:")?,
        per_node_kib: (rss1 - rss0) * 1024.0 / agents as f64,
        refused: metric(&api, "edgesync_hub_connections_refused_total", "").await,
        failed_attempts: fleet.counters.failed_attempts.load(Ordering::Relaxed) - failed_before,
        flapped: fleet.ended_since(all),
    })
}

struct FloodRun {
    attempts_per_s: f64,
    hub_cpu_pct: f64,
    hub_hwm_mib: f64,
    per_handshake_kib: f64,
    handshakes_seen: u64,
    known_back_s: f64,
    new_in: usize,
    new_in_s: f64,
}

async fn flood_run(
    agents: usize,
    secs: u64,
    hosts: u8,
    concurrency: usize,
) -> anyhow::Result<FloodRun> {
    let tmp = TempDir::new("bench-flood")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let (hub, tunnel, _http) =
        harness::start_hub(tmp.path(), &pki, "127.0.0.1:0", "127.0.0.1:0").await?;
    let pid = hub.pid().unwrap_or(0);
    let hub_addr: SocketAddr = tunnel.parse()?;
    // Known agents: connected before the flood.
    let known = Fleet::start(
        &pki,
        TD,
        hub_addr,
        &FleetOptions {
            agents,
            ..Default::default()
        },
    )?;
    let t = Instant::now();
    while known.counters.connected.load(Ordering::Relaxed) < agents {
        ensure!(
            t.elapsed() < Duration::from_secs(60),
            "the agents did not connect"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = harness::proc_status_mib(pid, "VmRSS:")?;
    let client = hostile::peer_client(&pki, TD, &tunnel, "flood", Duration::from_secs(5))?;
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU64::new(0));
    let handshakes = Arc::new(AtomicU64::new(0));
    let cpu0 = harness::proc_cpu_seconds(pid)?;
    let started = Instant::now();
    let mut floods = Vec::new();
    for answer_retry in [true, false] {
        let (stop, attempts, handshakes, client) = (
            stop.clone(),
            attempts.clone(),
            handshakes.clone(),
            client.clone(),
        );
        floods.push(tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(concurrency / 2));
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    break;
                };
                n = n.wrapping_add(1);
                let host = (n % u32::from(hosts.max(1))) as u8;
                let ip = Ipv4Addr::new(127, 2, u8::from(!answer_retry), host + 1);
                let (client, attempts, handshakes) =
                    (client.clone(), attempts.clone(), handshakes.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    attempts.fetch_add(1, Ordering::Relaxed);
                    if let Ok(HubAnswer::Handshake) = hostile::stalled_handshake(
                        hub_addr,
                        IpAddr::V4(ip),
                        client,
                        answer_retry,
                        Duration::from_millis(1000),
                    )
                    .await
                    {
                        handshakes.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        }));
    }
    // Halfway through: the known agents lose their sessions and reconnect, and as many new
    // agents (addresses the hub has not seen) start.
    tokio::time::sleep(Duration::from_secs(secs / 2)).await;
    let rss_flood = harness::proc_status_mib(pid, "VmRSS:")?;
    let kicked = Instant::now();
    known.reconnect_all();
    let fresh = Fleet::start(
        &pki,
        TD,
        hub_addr,
        &FleetOptions {
            agents,
            prefix: "new".into(),
            source_octet: 3,
            ..Default::default()
        },
    )?;
    let fresh_started = Instant::now();
    let mut known_back_s = f64::NAN;
    let mut new_in_s = f64::NAN;
    while started.elapsed() < Duration::from_secs(secs) {
        if known_back_s.is_nan()
            && let Some(t) = known.all_established_by(kicked + Duration::from_millis(1))
        {
            known_back_s = t.duration_since(kicked).as_secs_f64();
        }
        if new_in_s.is_nan() && fresh.counters.connected.load(Ordering::Relaxed) >= agents {
            new_in_s = fresh_started.elapsed().as_secs_f64();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let new_in = fresh.counters.connected.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let wall = started.elapsed().as_secs_f64();
    let cpu = harness::proc_cpu_seconds(pid)? - cpu0;
    for f in floods {
        let _ = f.await;
    }
    Ok(FloodRun {
        attempts_per_s: attempts.load(Ordering::Relaxed) as f64 / wall,
        hub_cpu_pct: cpu / wall * 100.0,
        hub_hwm_mib: harness::proc_status_mib(pid, "VmHWM:")?,
        per_handshake_kib: (rss_flood - rss0) * 1024.0
            / edgesync_cloud::server::DEFAULT_MAX_HANDSHAKES as f64,
        handshakes_seen: handshakes.load(Ordering::Relaxed),
        known_back_s,
        new_in,
        new_in_s,
    })
}

struct HandshakeRun {
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    failed: u64,
    hub_cpu_ms_each: f64,
}

/// A fresh hub; `clients` tasks, each with its own SVID (`spiffe://<td>/edge/hs-<i>`) and
/// loopback address, connect, wait for the handshake, close and connect again for `secs`.
async fn handshake_run(clients: usize, secs: u64) -> anyhow::Result<HandshakeRun> {
    ensure!((1..=250).contains(&clients), "--clients: 1 to 250");
    let tmp = TempDir::new("bench-handshake")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let (hub, tunnel, _) =
        harness::start_hub(tmp.path(), &pki, "127.0.0.1:0", "127.0.0.1:0").await?;
    let pid = hub.pid().unwrap_or(0);
    let addr: SocketAddr = tunnel.parse()?;
    let mut configs = Vec::with_capacity(clients);
    for i in 0..clients {
        configs.push(hostile::peer_client(
            &pki,
            TD,
            &tunnel,
            &format!("hs-{i}"),
            Duration::from_secs(5),
        )?);
    }
    let failed = Arc::new(AtomicU64::new(0));
    let cpu0 = harness::proc_cpu_seconds(pid)?;
    let start = Instant::now();
    let until = start + Duration::from_secs(secs);
    let mut tasks = Vec::with_capacity(clients);
    for (i, cc) in configs.into_iter().enumerate() {
        let failed = failed.clone();
        let ip = IpAddr::V4(Ipv4Addr::new(127, 3, 0, (i + 1) as u8));
        tasks.push(tokio::spawn(async move {
            let mut took = vec![];
            let Ok(ep) = quinn::Endpoint::client(SocketAddr::new(ip, 0)) else {
                failed.fetch_add(1, Ordering::Relaxed);
                return took;
            };
            while Instant::now() < until {
                let t = Instant::now();
                let ok = match ep.connect_with(cc.clone(), addr, "edgesync-hub") {
                    Ok(connecting) => {
                        match tokio::time::timeout(Duration::from_secs(5), connecting).await {
                            Ok(Ok(conn)) => {
                                took.push(t.elapsed().as_secs_f64() * 1000.0);
                                conn.close(0u32.into(), b"bench");
                                true
                            }
                            _ => false,
                        }
                    }
                    Err(_) => false,
                };
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            ep.wait_idle().await;
            took
        }));
    }
    let mut took = vec![];
    for t in tasks {
        took.extend(t.await?);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = harness::proc_cpu_seconds(pid)? - cpu0;
    drop(hub);
    ensure!(!took.is_empty(), "no handshake completed");
    took.sort_by(f64::total_cmp);
    let pct = |q: f64| took[((took.len() - 1) as f64 * q).round() as usize];
    Ok(HandshakeRun {
        per_s: took.len() as f64 / elapsed,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        failed: failed.load(Ordering::Relaxed),
        hub_cpu_ms_each: cpu * 1000.0 / took.len() as f64,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let load = || {
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next().map(str::to_owned))
            .unwrap_or_default()
    };
    match args.part {
        Part::Handshake => {
            println!(
                "edgesync-bench-fleet --part handshake: clients connect (QUIC Retry, TLS 1.3 with an SVID on both ends), close as soon as the handshake completes, and connect again, for {} s; each client from its own loopback address and with its own SVID; a fresh hub per run",
                args.handshake_secs
            );
            println!(
                " clients  run   load  handshakes/s  p50 ms  p99 ms  failed  hub cpu ms/handshake"
            );
            for &clients in &args.clients {
                let mut rows = Vec::new();
                for run in 1..=args.runs {
                    let l = load();
                    let r = handshake_run(clients, args.handshake_secs).await?;
                    println!(
                        "{clients:>8} {run:>4} {l:>6} {:>13.0} {:>7.2} {:>7.2} {:>7} {:>21.2}",
                        r.per_s, r.p50_ms, r.p99_ms, r.failed, r.hub_cpu_ms_each
                    );
                    rows.push(r);
                }
                println!(
                    "{clients:>8}  med        {:>13.0} {:>7.2} {:>7.2} {:>7} {:>21.2}",
                    median(rows.iter().map(|r| r.per_s).collect()),
                    median(rows.iter().map(|r| r.p50_ms).collect()),
                    median(rows.iter().map(|r| r.p99_ms).collect()),
                    "",
                    median(rows.iter().map(|r| r.hub_cpu_ms_each).collect()),
                );
            }
        }
        Part::Tags => {
            println!(
                "edgesync-bench-fleet --part tags: a fresh real hub per tag count; one simulated agent reports every tag of one device three times (1,000 records per frame, 20,000 unacknowledged at most), then stops"
            );
            println!(
                "   tags  reported  hub RSS idle MiB  hub RSS after MiB  hub HWM MiB  KiB/tag (HWM - idle)"
            );
            for &tags in &args.tags {
                for _ in 0..args.runs {
                    let r = tags_run(tags).await?;
                    println!(
                        "{tags:>7} {:>9} {:>17.1} {:>18.1} {:>12.1} {:>21.2}",
                        r.reported,
                        r.rss0_mib,
                        r.rss_mib,
                        r.hwm_mib,
                        (r.hwm_mib - r.rss0_mib) * 1024.0 / tags as f64
                    );
                }
            }
        }
        Part::Reconnect => {
            let agents = args.agents.unwrap_or(1000);
            println!(
                "edgesync-bench-fleet --part reconnect: {agents} simulated agents (one record/s each, the agent's backoff 200 ms doubling to 30 s, jittered), real hub binary (defaults: max_handshakes 64, 8 per IP), hub restarted by SIGTERM"
            );
            println!(
                " run  hint   load  connect s  noticed  resume p50  p90  all s  hub cpu s  hub HWM MiB  KiB/node  refused  failed  flapped"
            );
            let mut rows = Vec::new();
            let mut unhinted = Vec::new();
            for run in 1..=args.runs {
                // With and without following the hub's retry hint, alternately, in one run.
                for hints in [true, false] {
                    let l = load();
                    let r =
                        reconnect_run(agents, Duration::from_secs(args.settle_secs), hints).await?;
                    println!(
                        "{run:>4} {:>5} {l:>6} {:>10.3} {:>8} {:>11.3} {:>5.2} {:>6.2} {:>10.2} {:>12.1} {:>9.1} {:>8.0} {:>7} {:>8}",
                        if hints { "yes" } else { "no" },
                        r.initial_s,
                        r.ended_at_restart,
                        r.resume_p50_s,
                        r.resume_p90_s,
                        r.resume_s,
                        r.hub_cpu_s,
                        r.hub_hwm_mib,
                        r.per_node_kib,
                        r.refused,
                        r.failed_attempts,
                        r.flapped
                    );
                    if hints {
                        rows.push(r);
                    } else {
                        unhinted.push(r);
                    }
                }
            }
            for (label, rows) in [("yes", &rows), ("no", &unhinted)] {
                println!(
                    " med {label:>5}        {:>10.3}          {:>11.3} {:>5.2} {:>6.2} {:>10.2} {:>12.1} {:>9.1} {:>8.0} {:>7}",
                    median(rows.iter().map(|r| r.initial_s).collect()),
                    median(rows.iter().map(|r| r.resume_p50_s).collect()),
                    median(rows.iter().map(|r| r.resume_p90_s).collect()),
                    median(rows.iter().map(|r| r.resume_s).collect()),
                    median(rows.iter().map(|r| r.hub_cpu_s).collect()),
                    median(rows.iter().map(|r| r.hub_hwm_mib).collect()),
                    median(rows.iter().map(|r| r.per_node_kib).collect()),
                    median(rows.iter().map(|r| r.refused).collect()),
                    median(rows.iter().map(|r| r.failed_attempts as f64).collect()),
                );
            }
            let flapped: usize = rows.iter().chain(&unhinted).map(|r| r.flapped).sum();
            println!("sessions that ended again after the resume, all runs: {flapped}");
        }
        Part::Flood => {
            let agents = args.agents.unwrap_or(20);
            println!(
                "edgesync-bench-fleet --part flood: {} s of stalled handshakes ({} tasks; half answer the Retry then stall, from {} addresses; half never answer); {agents} known agents (connected before) reconnect halfway, and {agents} new agents start then",
                args.flood_secs, args.flood_concurrency, args.flood_hosts
            );
            println!(
                " run   load  attempts/s  hub cpu %  hub HWM MiB  KiB/handshake  handshakes  known back s  new in  new all in s"
            );
            let mut rows = Vec::new();
            for run in 1..=args.runs {
                let l = load();
                let r = flood_run(
                    agents,
                    args.flood_secs,
                    args.flood_hosts,
                    args.flood_concurrency,
                )
                .await?;
                println!(
                    "{run:>4} {l:>6} {:>11.0} {:>10.1} {:>12.1} {:>14.1} {:>11} {:>13.3} {:>7} {:>13.3}",
                    r.attempts_per_s,
                    r.hub_cpu_pct,
                    r.hub_hwm_mib,
                    r.per_handshake_kib,
                    r.handshakes_seen,
                    r.known_back_s,
                    r.new_in,
                    r.new_in_s
                );
                rows.push(r);
            }
            println!(
                " med        {:>11.0} {:>10.1} {:>12.1} {:>14.1} {:>11} {:>13.3}",
                median(rows.iter().map(|r| r.attempts_per_s).collect()),
                median(rows.iter().map(|r| r.hub_cpu_pct).collect()),
                median(rows.iter().map(|r| r.hub_hwm_mib).collect()),
                median(rows.iter().map(|r| r.per_handshake_kib).collect()),
                "",
                median(rows.iter().map(|r| r.known_back_s).collect()),
            );
        }
    }
    Ok(())
}
