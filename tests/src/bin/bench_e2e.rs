//! `edgesync-bench-e2e`: latency from a register change in a PLC to the new value in the hub
//! API, with 1,000 tags polled every 100 ms.
//!
//! The PLC simulator ([`SimHandle`], 10 units x 100 holding registers) and the hub
//! ([`Hub::start`]) run in this process. The agent runs in this process too
//! ([`Agent::start`], default) or, with `--processes`, as the real `edgesync-agent` binary,
//! in which case its CPU time and RSS are read from `/proc/<pid>`.
//!
//! Each sample: wait a random moment, write a new value into one random register, note the
//! `Instant`, then GET the device's twin from the hub API every `--api-poll-ms` until the
//! property shows the value.
//!
//! `--part cpu` measures the cost per record instead: the hub runs as the real `edgesync-hub`
//! binary and the agent as the real `edgesync-agent` binary (or `--hub-bin` / `--agent-bin`),
//! every holding register of every unit changes before every poll (1,000 tags every 100 ms =
//! 10,000 records/s with the defaults), no API traffic. Over a steady window after a warm-up:
//! the CPU time (utime + stime, `/proc/<pid>/stat`) of each process divided by the records the
//! hub stored (its `edgesync_hub_records_stored_total`, read before and after). `--perf-hub`
//! records a `perf` profile of the hub over the window.
//!
//! `--part backlog` (issue 7): both as real processes again, every register of
//! `--backlog-units` units changing before every poll (20 x 100 tags every 50 ms = 40,000
//! records/s by default). Once every tag reached the hub, the hub is stopped (SIGTERM by PID)
//! and the outbox grows to `--backlog-records`; then the changes stop (unless
//! `--keep-changing`) and the hub is started again on the same ports and store. Measured: the
//! time from the hub's ready line to its first stored record, the drain rate until its
//! `uplink_seq` reaches the agent's last accepted record, and the agent's VmRSS every 100 ms
//! throughout (plus VmHWM).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use clap::{Parser, ValueEnum};
use edgesync_edge::agent::Agent;
use edgesync_testkit::harness::{self, Api, Pki, Proc, SimDevice, TempDir, median};
use edgesync_testkit::sim::{SimConfig, SimHandle};
use hdrhistogram::Histogram;

#[path = "bench_common/mod.rs"]
mod bench_common;
use bench_common::{agent_metrics, change_all, metric_sum};

const TD: &str = "bench.example";
const NODE: &str = "gw-bench";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FsyncArg {
    /// fsync after every outbox group commit (the agent's default).
    EveryCommit,
    /// never fsync explicitly.
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    /// Register change -> hub API latency (agent embedded unless `--processes`).
    Latency,
    /// Hub and agent CPU per record with every register changing (both as processes).
    Cpu,
    /// A backlog built while the hub is down, then drained when it returns (both as
    /// processes): start delay, drain rate, agent RSS.
    Backlog,
}

/// End-to-end benchmark: PLC register change → hub API latency, CPU per record, or an
/// offline backlog drained.
#[derive(Debug, Clone, Parser)]
struct Args {
    /// What to measure.
    #[arg(long, value_enum, default_value = "latency")]
    part: Part,
    /// PLC units (devices).
    #[arg(long, default_value_t = 10)]
    units: u8,
    /// Holding registers (uint16 tags) per unit.
    #[arg(long, default_value_t = 100)]
    registers: u16,
    /// Poll interval of every device.
    #[arg(long, default_value_t = 100)]
    poll_ms: u64,
    /// Changes measured per run.
    #[arg(long, default_value_t = 60)]
    samples: usize,
    /// Interval of the API polling that detects the change.
    #[arg(long, default_value_t = 1)]
    api_poll_ms: u64,
    /// Runs (the median run is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Run the agent as the real `edgesync-agent` process (reports its CPU and RSS).
    #[arg(long)]
    processes: bool,
    /// Agent outbox fsync policy.
    #[arg(long, value_enum, default_value = "every-commit")]
    agent_fsync: FsyncArg,
    /// Seconds of the idle window (no API polling) over which agent CPU is measured.
    #[arg(long, default_value_t = 5)]
    cpu_window_secs: u64,
    /// `--part cpu`: seconds of steady load before the window.
    #[arg(long, default_value_t = 5)]
    warmup_secs: u64,
    /// `--part cpu`: seconds of the measured window.
    #[arg(long, default_value_t = 30)]
    window_secs: u64,
    /// `--part cpu|backlog`: the agent binary (default: this build's `edgesync-agent`).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// `--part cpu|backlog`: the hub binary (default: this build's `edgesync-hub`).
    #[arg(long)]
    hub_bin: Option<PathBuf>,
    /// `--part cpu`: record the hub with `perf record -F 999 --call-graph dwarf,16384` over the
    /// window of every run, into `<this>.<run>` (the run's CPU figures then include perf's cost).
    #[arg(long)]
    perf_hub: Option<PathBuf>,
    /// `--part backlog`: records to accumulate in the outbox while the hub is down.
    #[arg(long, default_value_t = 1_000_000)]
    backlog_records: u64,
    /// `--part backlog`: PLC units (each with `--registers` tags, all changing every poll).
    #[arg(long, default_value_t = 20)]
    backlog_units: u8,
    /// `--part backlog`: poll interval of every device.
    #[arg(long, default_value_t = 50)]
    backlog_poll_ms: u64,
    /// `--part backlog`: keep every register changing while the backlog drains (default: the
    /// changes stop once the backlog is built, so only the backlog drains).
    #[arg(long)]
    keep_changing: bool,
    /// `--part backlog`: the agent's `[outbox] max_bytes` (must hold the whole backlog).
    #[arg(long, default_value_t = 1 << 30)]
    outbox_max_bytes: u64,
    /// `--part backlog`: the agent's `[hub] backoff_max_ms` (the harness uses 1000; the
    /// agent's default is 30000).
    #[arg(long, default_value_t = 1000)]
    backoff_max_ms: u64,
    /// `--part backlog`: the agent's `[hub] connect_timeout_ms` (default: the agent's, 5000).
    #[arg(long)]
    connect_timeout_ms: Option<u64>,
    /// `--part backlog`: the agent's `[agent] sled_cache_bytes` (default: the agent's, 2 MiB).
    #[arg(long)]
    sled_cache_bytes: Option<u64>,
    /// `--part backlog`: give up if the backlog is not built within this many seconds.
    #[arg(long, default_value_t = 300)]
    build_max_secs: u64,
    /// `--part backlog`: give up if the backlog is not drained within this many seconds.
    #[arg(long, default_value_t = 300)]
    drain_max_secs: u64,
    /// `--part backlog`: interval of the hub polling that detects the first stored record
    /// and the end of the drain.
    #[arg(long, default_value_t = 10)]
    hub_poll_ms: u64,
    /// `--part backlog`: interval of the agent RSS sampling (`/proc/<pid>/status`).
    #[arg(long, default_value_t = 100)]
    rss_sample_ms: u64,
}

enum AgentRun {
    Embedded(Agent),
    Process(Proc),
}

impl AgentRun {
    fn pid(&self) -> u32 {
        match self {
            AgentRun::Embedded(_) => std::process::id(),
            AgentRun::Process(p) => p.pid().unwrap_or(0),
        }
    }
    async fn stop(self) {
        match self {
            AgentRun::Embedded(a) => a.shutdown().await,
            AgentRun::Process(p) => {
                let _ = p.terminate().await;
            }
        }
    }
}

struct RunResult {
    hist: Histogram<u64>,
    cpu_pct: f64,
    rss: f64,
    startup_s: f64,
}

async fn twin_value(api: &Api, device: &str, prop: &str) -> Option<u64> {
    match api
        .get(&format!("/api/v1/nodes/{NODE}/devices/{device}/twin"))
        .await
    {
        Ok((200, v)) => v["reported"][prop]["value"].as_u64(),
        _ => None,
    }
}

/// Starts the agent: embedded, or as the process `bin`.
async fn start_agent(
    args: &Args,
    dir: &Path,
    pki: &Pki,
    tunnel: &str,
    sim: &SimHandle,
    bin: Option<&Path>,
) -> anyhow::Result<AgentRun> {
    let (cert, key) = pki.svid(&format!("spiffe://{TD}/edge/{NODE}"), "agent")?;
    let devices: Vec<SimDevice> = (1..=args.units)
        .map(|u| SimDevice {
            id: format!("plc-{u}"),
            endpoint: sim.local_addr().to_string(),
            unit: u,
            counters: args.registers,
            poll_ms: args.poll_ms,
        })
        .collect();
    // `extra` is appended after the other tables, before the devices.
    let extra = match args.agent_fsync {
        FsyncArg::EveryCommit => "[outbox]\nfsync = \"every_commit\"\n",
        FsyncArg::Never => "[outbox]\nfsync = \"never\"\n",
    };
    let path = harness::agent_toml(dir, tunnel, TD, &cert, &key, &pki.bundle, &devices, extra)?;
    if let Some(bin) = bin {
        let p = Proc::spawn(
            bin,
            &["run", "--config", &path.display().to_string()],
            &dir.join("agent.log"),
            None,
        )
        .await?;
        Ok(AgentRun::Process(p))
    } else {
        let cfg = edgesync_edge::config::load(&path).map_err(|e| anyhow!("agent config: {e}"))?;
        Ok(AgentRun::Embedded(Agent::start(cfg).await?))
    }
}

/// Waits (up to 60 s) until the last tag of every device is in the hub's twin with the value
/// [`initial_values`] gave it.
async fn wait_all_tags(api: &Api, args: &Args) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let last = format!("c{}", args.registers - 1);
    for u in 1..=args.units {
        while twin_value(api, &format!("plc-{u}"), &last).await != Some(u64::from(args.registers)) {
            if Instant::now() > deadline {
                bail!("the hub did not receive every tag within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Register `i` of every unit holds `i + 1` (non-zero, so the twin proves every tag arrived).
fn initial_values(sim: &SimHandle, args: &Args) -> anyhow::Result<Vec<Vec<u16>>> {
    let v: Vec<u16> = (0..args.registers).map(|i| i + 1).collect();
    for u in 1..=args.units {
        sim.set_holding(u, 0, &v)?;
    }
    Ok(vec![v; args.units as usize])
}

async fn run_once(args: &Args) -> anyhow::Result<RunResult> {
    let tmp = TempDir::new("bench-e2e")?;
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"), TD)?;
    let sim = SimHandle::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SimConfig::with_units(1..=args.units),
    )
    .await?;
    let hub = harness::embedded_hub(&pki, dir).await?;
    let api = Api::new(&hub.http_addr.to_string());
    let mut values = initial_values(&sim, args)?;
    let started = Instant::now();
    let bin = if args.processes {
        Some(harness::bin("edgesync-agent")?)
    } else {
        None
    };
    let agent = start_agent(
        args,
        dir,
        &pki,
        &hub.tunnel_addr.to_string(),
        &sim,
        bin.as_deref(),
    )
    .await?;
    wait_all_tags(&api, args).await?;
    let startup_s = started.elapsed().as_secs_f64();

    // Agent CPU over an idle window: polling 1000 tags, nothing changes, no API traffic.
    let pid = agent.pid();
    let c0 = harness::proc_cpu_seconds(pid)?;
    let w0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.cpu_window_secs)).await;
    let cpu_pct = (harness::proc_cpu_seconds(pid)? - c0) / w0.elapsed().as_secs_f64() * 100.0;
    let rss = harness::proc_status_mib(pid, "VmRSS:")?;

    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for _ in 0..args.samples {
        // A random moment relative to the poll cycle.
        tokio::time::sleep(Duration::from_micros(fastrand::u64(
            0..2 * args.poll_ms * 1000,
        )))
        .await;
        let u = fastrand::u8(1..=args.units);
        let r = fastrand::u16(0..args.registers);
        let slot = &mut values[(u - 1) as usize][r as usize];
        *slot = slot.wrapping_add(1);
        let want = *slot;
        sim.set_holding(u, r, &[want])?;
        let t0 = Instant::now();
        let (device, prop) = (format!("plc-{u}"), format!("c{r}"));
        loop {
            if twin_value(&api, &device, &prop).await == Some(u64::from(want)) {
                break;
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(10),
                "{device}/{prop} = {want} not visible in the hub API within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(args.api_poll_ms)).await;
        }
        hist.saturating_record(t0.elapsed().as_micros() as u64);
    }
    agent.stop().await;
    hub.shutdown().await;
    sim.shutdown();
    Ok(RunResult {
        hist,
        cpu_pct,
        rss,
        startup_s,
    })
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// The hub as the process `bin` (the real binary), its tunnel on `listen` and its API on
/// `http` (`127.0.0.1:0`: a port the OS chooses), with its config, store and log in `dir`;
/// returns it with its tunnel and API addresses.
async fn start_hub_process(
    dir: &Path,
    pki: &Pki,
    bin: &Path,
    listen: &str,
    http: &str,
) -> anyhow::Result<(Proc, String, String)> {
    let (cert, key) = pki.svid(&format!("spiffe://{TD}/hub"), "hub")?;
    let cfg = harness::hub_toml(dir, listen, http, TD, &cert, &key, &pki.bundle, None)?;
    let hub = Proc::spawn(
        bin,
        &["run", "--config", &cfg.display().to_string()],
        &dir.join("hub.log"),
        Some("edgesync-hub listening"),
    )
    .await?;
    let (tunnel, http) = harness::hub_addrs(hub.ready_line.as_deref().unwrap_or_default())?;
    Ok((hub, tunnel, http))
}

struct CpuResult {
    stored_per_s: f64,
    records_per_commit: f64,
    hub_cpu_pct: f64,
    hub_us_per_record: f64,
    agent_cpu_pct: f64,
    agent_us_per_record: f64,
    hub_rss: f64,
}

/// `(records stored, commits)` from the hub's metrics.
async fn hub_counts(api: &Api) -> anyhow::Result<(f64, f64)> {
    let m = api.metrics().await?;
    Ok((
        metric_sum(&m, "edgesync_hub_records_stored_total", ""),
        metric_sum(&m, "edgesync_hub_commits_total", ""),
    ))
}

async fn cpu_once(args: &Args, run: usize) -> anyhow::Result<CpuResult> {
    let tmp = TempDir::new("bench-e2e-cpu")?;
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"), TD)?;
    let sim = SimHandle::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SimConfig::with_units(1..=args.units),
    )
    .await?;
    initial_values(&sim, args)?;
    let hub_bin = match &args.hub_bin {
        Some(p) => p.clone(),
        None => harness::bin("edgesync-hub")?,
    };
    let agent_bin = match &args.agent_bin {
        Some(p) => p.clone(),
        None => harness::bin("edgesync-agent")?,
    };
    let (hub, tunnel, http) =
        start_hub_process(dir, &pki, &hub_bin, "127.0.0.1:0", "127.0.0.1:0").await?;
    let api = Api::new(&http);
    let agent = start_agent(args, dir, &pki, &tunnel, &sim, Some(&agent_bin)).await?;
    wait_all_tags(&api, args).await?;
    let changer = change_all(
        vec![sim.clone()],
        args.units,
        args.registers,
        Duration::from_millis(args.poll_ms),
    );
    tokio::time::sleep(Duration::from_secs(args.warmup_secs)).await;

    let (hub_pid, agent_pid) = (hub.pid().context("hub has no pid")?, agent.pid());
    let perf = match &args.perf_hub {
        Some(out) => {
            let out = format!("{}.{}", out.display(), run + 1);
            Some(
                tokio::process::Command::new("perf")
                    .args([
                        "record",
                        "-F",
                        "999",
                        "--call-graph",
                        "dwarf,16384",
                        "-o",
                        &out,
                    ])
                    .args(["-p", &hub_pid.to_string(), "--"])
                    .args(["sleep", &args.window_secs.to_string()])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .context("spawn perf")?,
            )
        }
        None => None,
    };
    let (r0, k0) = hub_counts(&api).await?;
    let (h0, a0) = (
        harness::proc_cpu_seconds(hub_pid)?,
        harness::proc_cpu_seconds(agent_pid)?,
    );
    let w0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.window_secs)).await;
    let (h1, a1) = (
        harness::proc_cpu_seconds(hub_pid)?,
        harness::proc_cpu_seconds(agent_pid)?,
    );
    let elapsed = w0.elapsed().as_secs_f64();
    let (r1, k1) = hub_counts(&api).await?;
    let hub_rss = harness::proc_status_mib(hub_pid, "VmRSS:")?;
    if let Some(mut p) = perf {
        let status = tokio::time::timeout(Duration::from_secs(120), p.wait())
            .await
            .context("perf did not finish within 120 s")??;
        ensure!(status.success(), "perf record failed: {status}");
    }
    changer.abort();
    agent.stop().await;
    let _ = hub.terminate().await;
    sim.shutdown();

    let records = r1 - r0;
    ensure!(records > 0.0, "the hub stored nothing during the window");
    Ok(CpuResult {
        stored_per_s: records / elapsed,
        records_per_commit: records / (k1 - k0).max(1.0),
        hub_cpu_pct: (h1 - h0) / elapsed * 100.0,
        hub_us_per_record: (h1 - h0) / records * 1e6,
        agent_cpu_pct: (a1 - a0) / elapsed * 100.0,
        agent_us_per_record: (a1 - a0) / records * 1e6,
        hub_rss,
    })
}

async fn cpu_main(args: &Args) -> anyhow::Result<()> {
    println!(
        "edgesync-bench-e2e --part cpu: {} units x {} holding registers = {} tags polled every {} ms, every register changing before every poll; hub and agent as separate processes; PLC simulator in this process; agent fsync {:?}; no API traffic",
        args.units,
        args.registers,
        u32::from(args.units) * u32::from(args.registers),
        args.poll_ms,
        args.agent_fsync,
    );
    println!(
        "per run: {} s warm-up, then a {} s window; CPU = utime + stime from /proc/<pid>/stat; records = the hub's edgesync_hub_records_stored_total{}",
        args.warmup_secs,
        args.window_secs,
        if args.perf_hub.is_some() {
            "; perf recording the hub"
        } else {
            ""
        }
    );
    println!(
        "{:>4}  {:>10}  {:>8}  {:>10}  {:>13}  {:>12}  {:>15}  {:>12}",
        "run",
        "stored/s",
        "rec/cmt",
        "hub cpu %",
        "hub us/rec",
        "agent cpu %",
        "agent us/rec",
        "hub RSS MiB"
    );
    let mut cols: [Vec<f64>; 7] = Default::default();
    for run in 0..args.runs {
        let r = cpu_once(args, run).await?;
        let row = [
            r.stored_per_s,
            r.records_per_commit,
            r.hub_cpu_pct,
            r.hub_us_per_record,
            r.agent_cpu_pct,
            r.agent_us_per_record,
            r.hub_rss,
        ];
        println!(
            "{:>4}  {:>10.0}  {:>8.1}  {:>10.2}  {:>13.2}  {:>12.2}  {:>15.2}  {:>12.1}",
            run + 1,
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            row[6]
        );
        for (c, v) in cols.iter_mut().zip(row) {
            c.push(v);
        }
    }
    let m = cols.map(median);
    println!(
        "{:>4}  {:>10.0}  {:>8.1}  {:>10.2}  {:>13.2}  {:>12.2}  {:>15.2}  {:>12.1}   (target hub < 3 us/record: {})",
        "med",
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5],
        m[6],
        if m[3] < 3.0 { "met" } else { "MISSED" }
    );
    Ok(())
}

async fn latency_main(args: &Args) -> anyhow::Result<()> {
    println!(
        "edgesync-bench-e2e: {} units x {} holding registers = {} tags polled every {} ms; agent {}; hub and PLC simulator embedded; agent fsync {:?}",
        args.units,
        args.registers,
        u32::from(args.units) * u32::from(args.registers),
        args.poll_ms,
        if args.processes {
            "as a separate edgesync-agent process"
        } else {
            "embedded in this process"
        },
        args.agent_fsync,
    );
    println!(
        "latency = register written in the simulator -> value visible in GET /api/v1/nodes/{{node}}/devices/{{device}}/twin (polled every {} ms); {} changes per run",
        args.api_poll_ms, args.samples
    );
    let cpu_label = if args.processes {
        "agent CPU %"
    } else {
        "process CPU %"
    };
    let rss_label = if args.processes {
        "agent RSS MiB"
    } else {
        "process RSS MiB"
    };
    println!(
        "{:>4}  {:>10}  {:>8}  {:>8}  {:>8}  {:>8}  {:>13}  {:>15}",
        "run", "startup s", "p50 ms", "p90 ms", "p99 ms", "max ms", cpu_label, rss_label
    );
    let (mut p50, mut p90, mut p99, mut max, mut cpu, mut rss) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for run in 0..args.runs {
        let r = run_once(args).await?;
        let h = &r.hist;
        println!(
            "{:>4}  {:>10.2}  {:>8.1}  {:>8.1}  {:>8.1}  {:>8.1}  {:>13.1}  {:>15.1}",
            run + 1,
            r.startup_s,
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.9)),
            ms(h.value_at_quantile(0.99)),
            ms(h.max()),
            r.cpu_pct,
            r.rss
        );
        p50.push(ms(h.value_at_quantile(0.5)));
        p90.push(ms(h.value_at_quantile(0.9)));
        p99.push(ms(h.value_at_quantile(0.99)));
        max.push(ms(h.max()));
        cpu.push(r.cpu_pct);
        rss.push(r.rss);
    }
    println!(
        "{:>4}  {:>10}  {:>8.1}  {:>8.1}  {:>8.1}  {:>8.1}  {:>13.1}  {:>15.1}",
        "med",
        "",
        median(p50),
        median(p90),
        median(p99),
        median(max),
        median(cpu),
        median(rss)
    );
    println!(
        "({} = CPU seconds per wall second over a {} s idle window after warm-up: polling continues, nothing changes, no API traffic)",
        cpu_label, args.cpu_window_secs
    );
    Ok(())
}

// --- `--part backlog` ------------------------------------------------------------------------

/// VmRSS of one process, sampled on a thread of its own (so a busy runtime does not delay it).
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, f64)>>,
}

impl RssSampler {
    /// Samples `VmRSS` of `pid` every `every` until [`RssSampler::finish`].
    fn start(pid: u32, every: Duration) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut v = Vec::new();
            while !s.load(Ordering::Relaxed) {
                if let Ok(m) = harness::proc_status_mib(pid, "VmRSS:") {
                    v.push((Instant::now(), m));
                }
                std::thread::sleep(every);
            }
            v
        });
        RssSampler { stop, thread }
    }

    /// Stops sampling; every `(when, MiB)` sample.
    fn finish(self) -> Vec<(Instant, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// The largest sample taken in `[from, to)`, and how many samples that range holds.
fn max_between(samples: &[(Instant, f64)], from: Instant, to: Instant) -> (f64, usize) {
    samples
        .iter()
        .filter(|(t, _)| *t >= from && *t < to)
        .fold((0.0, 0), |(m, n), (_, v)| (f64::max(m, *v), n + 1))
}

/// Bytes of the regular files under `dir`, recursively.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The 1-minute load average (`/proc/loadavg`).
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// The agent's `uplink down` lines in `log` (already stripped of colour): how many, and each
/// distinct error (digits replaced by `#`) with its count.
fn uplink_failures(log: &str) -> (usize, Vec<(String, usize)>) {
    let mut kinds: Vec<(String, usize)> = Vec::new();
    let mut n = 0;
    for l in log.lines().filter(|l| l.contains("uplink down")) {
        n += 1;
        let e = l
            .split_once("error=")
            .map(|(_, r)| r.split(" hub=").next().unwrap_or(r))
            .unwrap_or(l);
        let e: String = e
            .chars()
            .map(|c| if c.is_ascii_digit() { '#' } else { c })
            .collect();
        match kinds.iter_mut().find(|(k, _)| *k == e) {
            Some((_, c)) => *c += 1,
            None => kinds.push((e, 1)),
        }
    }
    (n, kinds)
}

/// The wall-clock time of a tracing line (`2025-01-02T03:04:05.678901Z ...`), as seconds
/// since the epoch.
fn log_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?;
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, mi, sec) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + mi * 60.0 + sec)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `(records accepted into the outbox, records dropped from it)` from the agent's metrics.
async fn agent_counts(port: u16) -> anyhow::Result<(u64, u64)> {
    let m = agent_metrics(port).await?;
    Ok((
        metric_sum(&m, "edgesync_outbox_records_accepted_total", "") as u64,
        metric_sum(&m, "edgesync_outbox_records_dropped_total", "") as u64,
    ))
}

/// The hub's `uplink_seq` (last sequence number durably stored) and `lost_records` of the
/// node, if the hub knows it.
async fn hub_node(api: &Api) -> anyhow::Result<Option<(u64, u64)>> {
    let (status, v) = api.get(&format!("/api/v1/nodes/{NODE}")).await?;
    if status != 200 {
        return Ok(None);
    }
    Ok(Some((
        v["uplink_seq"].as_u64().context("no uplink_seq")?,
        v["lost_records"].as_u64().unwrap_or(0),
    )))
}

struct BacklogResult {
    load_start: f64,
    load_return: f64,
    backlog: u64,
    build_s: f64,
    outbox_mib: f64,
    hub_start_s: f64,
    start_s: f64,
    drain_s: f64,
    drain_rate: f64,
    ready_rate: f64,
    agent_cpu_pct: f64,
    hub_cpu_pct: f64,
    rss_online: f64,
    rss_stop: f64,
    rss_return: f64,
    rss_build: f64,
    rss_drain: f64,
    hwm: f64,
    rss_samples: usize,
    failures: usize,
    failure_kinds: Vec<(String, usize)>,
    last_failure_before_ready_s: Option<f64>,
    established_after_ready_s: Option<f64>,
}

/// The agent's config for the backlog: the harness's, with `[outbox] max_bytes`, a metrics
/// listener on `metrics_port`, and the reconnect settings asked for.
fn backlog_agent_toml(
    args: &Args,
    dir: &Path,
    pki: &Pki,
    tunnel: &str,
    sim: &SimHandle,
    metrics_port: u16,
) -> anyhow::Result<PathBuf> {
    let (cert, key) = pki.svid(&format!("spiffe://{TD}/edge/{NODE}"), "agent")?;
    let devices: Vec<SimDevice> = (1..=args.backlog_units)
        .map(|u| SimDevice {
            id: format!("plc-{u}"),
            endpoint: sim.local_addr().to_string(),
            unit: u,
            counters: args.registers,
            poll_ms: args.backlog_poll_ms,
        })
        .collect();
    let fsync = match args.agent_fsync {
        FsyncArg::EveryCommit => "every_commit",
        FsyncArg::Never => "never",
    };
    let extra = format!(
        "[outbox]\nfsync = \"{fsync}\"\nmax_bytes = {}\n\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
        args.outbox_max_bytes
    );
    let path = harness::agent_toml(dir, tunnel, TD, &cert, &key, &pki.bundle, &devices, &extra)?;
    let text = std::fs::read_to_string(&path)?;
    let harness_backoff = "backoff_max_ms = 1000\n";
    ensure!(
        text.contains(harness_backoff),
        "the harness's agent config no longer sets {harness_backoff:?}"
    );
    let mut text = text.replacen(
        harness_backoff,
        &format!("backoff_max_ms = {}\n", args.backoff_max_ms),
        1,
    );
    if let Some(c) = args.sled_cache_bytes {
        text = text.replacen(
            "[agent]\n",
            &format!("[agent]\nsled_cache_bytes = {c}\n"),
            1,
        );
    }
    if let Some(ct) = args.connect_timeout_ms {
        text = text.replacen("[hub]\n", &format!("[hub]\nconnect_timeout_ms = {ct}\n"), 1);
    }
    std::fs::write(&path, text)?;
    Ok(path)
}

async fn backlog_once(args: &Args) -> anyhow::Result<BacklogResult> {
    let load_start = loadavg();
    let tmp = TempDir::new("bench-e2e-backlog")?;
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"), TD)?;
    let units = args.backlog_units;
    let sim = SimHandle::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SimConfig::with_units(1..=units),
    )
    .await?;
    // The twin checks of `wait_all_tags` and the initial values use `units` and `poll_ms`.
    let mut a = args.clone();
    a.units = units;
    a.poll_ms = args.backlog_poll_ms;
    initial_values(&sim, &a)?;
    let hub_bin = match &args.hub_bin {
        Some(p) => p.clone(),
        None => harness::bin("edgesync-hub")?,
    };
    let agent_bin = match &args.agent_bin {
        Some(p) => p.clone(),
        None => harness::bin("edgesync-agent")?,
    };
    let (hub, tunnel, http) =
        start_hub_process(dir, &pki, &hub_bin, "127.0.0.1:0", "127.0.0.1:0").await?;
    let api = Api::new(&http);
    let metrics_port = bench_common::free_port()?;
    let cfg = backlog_agent_toml(args, dir, &pki, &tunnel, &sim, metrics_port)?;
    let agent_log = dir.join("agent.log");
    let agent = Proc::spawn(
        &agent_bin,
        &["run", "--config", &cfg.display().to_string()],
        &agent_log,
        None,
    )
    .await?;
    let agent_pid = agent.pid().context("agent has no pid")?;
    let rss = RssSampler::start(agent_pid, Duration::from_millis(args.rss_sample_ms));
    let t_online = Instant::now();
    wait_all_tags(&api, &a).await?;

    // Online with every register changing, then the hub goes away.
    let changer = change_all(
        vec![sim.clone()],
        units,
        args.registers,
        Duration::from_millis(args.backlog_poll_ms),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (seq_before_stop, _) = hub_node(&api)
        .await?
        .context("the hub does not know the node")?;
    let hub_pid = hub.pid().context("hub has no pid")?;
    let log_offset = std::fs::metadata(&agent_log).map(|m| m.len()).unwrap_or(0) as usize;
    let t_offline = Instant::now();
    ensure!(
        hub.terminate().await?,
        "the hub (pid {hub_pid}) did not exit cleanly on SIGTERM"
    );

    // Build the backlog: records accepted since the hub stopped (an upper bound until the
    // restarted hub says what it had stored; the margin covers records in flight at the stop).
    let margin = 20_000;
    let build_deadline = t_offline + Duration::from_secs(args.build_max_secs);
    let mut last_report = Instant::now();
    loop {
        let (accepted, dropped) = agent_counts(metrics_port).await?;
        ensure!(
            dropped == 0,
            "the outbox dropped {dropped} records: raise --outbox-max-bytes"
        );
        let est = accepted.saturating_sub(seq_before_stop);
        if est >= args.backlog_records + margin {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "  building: about {est} records in the outbox after {:.0} s, agent RSS {:.1} MiB",
                t_offline.elapsed().as_secs_f64(),
                harness::proc_status_mib(agent_pid, "VmRSS:").unwrap_or(f64::NAN)
            );
            last_report = Instant::now();
        }
        ensure!(
            Instant::now() < build_deadline,
            "only about {est} records accumulated in {} s",
            args.build_max_secs
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let build_s = t_offline.elapsed().as_secs_f64();
    if !args.keep_changing {
        changer.abort();
    }
    // Let the commit in progress land: the count stays the same over two poll intervals.
    let mut accepted = agent_counts(metrics_port).await?.0;
    if !args.keep_changing {
        loop {
            tokio::time::sleep(Duration::from_millis(2 * args.backlog_poll_ms + 200)).await;
            let now = agent_counts(metrics_port).await?.0;
            if now == accepted {
                break;
            }
            accepted = now;
        }
    }
    let outbox_mib = dir_bytes(&dir.join("data")) as f64 / (1 << 20) as f64;

    // The hub returns on the same ports and store.
    let load_return = loadavg();
    let t_spawn = Instant::now();
    let (hub, _, _) = start_hub_process(dir, &pki, &hub_bin, &tunnel, &http).await?;
    let t_ready = Instant::now();
    let ready_wall = unix_now();
    let hub_pid = hub.pid().context("hub has no pid")?;
    let target = if args.keep_changing {
        agent_counts(metrics_port).await?.0
    } else {
        accepted
    };
    let (a0, h0) = (
        harness::proc_cpu_seconds(agent_pid)?,
        harness::proc_cpu_seconds(hub_pid)?,
    );
    let poll = Duration::from_millis(args.hub_poll_ms);
    let drain_deadline = t_ready + Duration::from_secs(args.drain_max_secs);
    // Until the first record is stored: the node's uplink_seq is what the hub had before.
    let mut seq_at_return = None;
    let t_first = loop {
        let node = hub_node(&api).await.ok().flatten();
        let stored = metric_sum(
            &api.metrics().await?,
            "edgesync_hub_records_stored_total",
            "",
        );
        if stored > 0.0 {
            break Instant::now();
        }
        if let Some((seq, _)) = node {
            seq_at_return = Some(seq);
        }
        ensure!(
            Instant::now() < drain_deadline,
            "the hub stored nothing within {} s of its return",
            args.drain_max_secs
        );
        tokio::time::sleep(poll).await;
    };
    let t_done = loop {
        if let Some((seq, _)) = hub_node(&api).await?
            && seq >= target
        {
            break Instant::now();
        }
        ensure!(
            Instant::now() < drain_deadline,
            "the backlog was not drained within {} s of the hub's return",
            args.drain_max_secs
        );
        tokio::time::sleep(poll).await;
    };
    let (a1, h1) = (
        harness::proc_cpu_seconds(agent_pid)?,
        harness::proc_cpu_seconds(hub_pid)?,
    );
    let hwm = harness::proc_status_mib(agent_pid, "VmHWM:")?;
    // A few samples after the drain, then stop everything.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let samples = rss.finish();
    changer.abort();
    let stored = metric_sum(
        &api.metrics().await?,
        "edgesync_hub_records_stored_total",
        "",
    ) as u64;
    let (final_seq, lost) = hub_node(&api).await?.context("node gone")?;
    let (accepted_end, dropped) = agent_counts(metrics_port).await?;
    let log = harness::strip_ansi(&std::fs::read_to_string(&agent_log).unwrap_or_default());
    let _ = agent.terminate().await;
    let _ = hub.terminate().await;
    sim.shutdown();

    let seq_at_return = seq_at_return.unwrap_or(final_seq.saturating_sub(stored));
    let backlog = target.saturating_sub(seq_at_return);
    ensure!(
        dropped == 0 && lost == 0,
        "records were lost: {dropped} dropped by the outbox, {lost} lost at the hub"
    );
    if !args.keep_changing {
        ensure!(
            final_seq == accepted_end && stored == backlog,
            "after the drain the hub holds up to {final_seq} (stored {stored} since its return), the agent accepted {accepted_end}, backlog {backlog}"
        );
    }
    let offline_log = log.get(log_offset..).unwrap_or_default();
    let (failures, failure_kinds) = uplink_failures(offline_log);
    // Wall-clock times in the agent's log, relative to the moment the hub was ready.
    let last_failure_before_ready_s = offline_log
        .lines()
        .filter(|l| l.contains("uplink down"))
        .filter_map(log_time)
        .rfind(|t| *t <= ready_wall)
        .map(|t| t - ready_wall);
    let established_after_ready_s = offline_log
        .lines()
        .filter(|l| l.contains("uplink established"))
        .filter_map(log_time)
        .find(|t| *t >= ready_wall - 0.5)
        .map(|t| t - ready_wall);
    let (rss_online, _) = max_between(&samples, t_online, t_offline);
    // RSS at the stop and at the return: how it grew with the backlog.
    let rss_at = |t: Instant| {
        samples
            .iter()
            .min_by_key(|(s, _)| if *s > t { *s - t } else { t - *s })
            .map_or(f64::NAN, |(_, v)| *v)
    };
    let (rss_stop, rss_return) = (rss_at(t_offline), rss_at(t_ready));
    let (rss_build, n_build) = max_between(&samples, t_offline, t_ready);
    let (rss_drain, n_drain) = max_between(&samples, t_ready, t_done);
    let drain_s = (t_done - t_first).as_secs_f64();
    let ready_s = (t_done - t_ready).as_secs_f64();
    Ok(BacklogResult {
        load_start,
        load_return,
        backlog,
        build_s,
        outbox_mib,
        hub_start_s: (t_ready - t_spawn).as_secs_f64(),
        start_s: (t_first - t_ready).as_secs_f64(),
        drain_s,
        drain_rate: backlog as f64 / drain_s,
        ready_rate: backlog as f64 / ready_s,
        agent_cpu_pct: (a1 - a0) / ready_s * 100.0,
        hub_cpu_pct: (h1 - h0) / ready_s * 100.0,
        rss_online,
        rss_stop,
        rss_return,
        rss_build,
        rss_drain,
        hwm,
        rss_samples: n_build + n_drain,
        failures,
        failure_kinds,
        last_failure_before_ready_s,
        established_after_ready_s,
    })
}

async fn backlog_main(args: &Args) -> anyhow::Result<()> {
    let tags = u32::from(args.backlog_units) * u32::from(args.registers);
    println!(
        "edgesync-bench-e2e --part backlog: {} units x {} holding registers = {tags} tags polled every {} ms, every register changing before every poll (about {} records/s); hub and agent as separate processes; PLC simulator in this process",
        args.backlog_units,
        args.registers,
        args.backlog_poll_ms,
        u64::from(tags) * 1000 / args.backlog_poll_ms,
    );
    println!(
        "agent: fsync {:?}, [agent] sled_cache_bytes = {}, [outbox] max_bytes = {}, [hub] keepalive_ms = 500, idle_timeout_ms = 3000, backoff_initial_ms = 100, backoff_max_ms = {}, connect_timeout_ms = {}",
        args.agent_fsync,
        args.sled_cache_bytes
            .map_or("2097152 (default)".to_owned(), |c| c.to_string()),
        args.outbox_max_bytes,
        args.backoff_max_ms,
        args.connect_timeout_ms
            .map_or("5000 (default)".to_owned(), |c| c.to_string()),
    );
    println!(
        "per run: hub up, every tag at the hub, 3 s online, SIGTERM to the hub; backlog built to >= {} records; changes {}; hub restarted on the same ports and store",
        args.backlog_records,
        if args.keep_changing {
            "continue during the drain"
        } else {
            "stopped before the hub returns"
        }
    );
    println!(
        "start = hub listening (its ready line) -> first record stored (edgesync_hub_records_stored_total > 0, polled every {} ms); drain = first record -> the node's uplink_seq reaches the agent's last accepted seq at the return; RSS = agent VmRSS every {} ms",
        args.hub_poll_ms, args.rss_sample_ms
    );
    println!(
        "{:>4} {:>6} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>11} {:>11} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8}",
        "run",
        "load",
        "backlog",
        "build s",
        "disk MiB",
        "hub up s",
        "start s",
        "drain s",
        "drain rec/s",
        "ready rec/s",
        "agent %",
        "hub %",
        "RSS bld",
        "RSS drn",
        "RSS max",
        "VmHWM"
    );
    let mut cols: [Vec<f64>; 14] = Default::default();
    for run in 0..args.runs {
        let r = backlog_once(args).await?;
        let rss_max = r.rss_build.max(r.rss_drain);
        let row = [
            r.backlog as f64,
            r.build_s,
            r.outbox_mib,
            r.hub_start_s,
            r.start_s,
            r.drain_s,
            r.drain_rate,
            r.ready_rate,
            r.agent_cpu_pct,
            r.hub_cpu_pct,
            r.rss_build,
            r.rss_drain,
            rss_max,
            r.hwm,
        ];
        println!(
            "{:>4} {:>6.2} {:>9.0} {:>8.1} {:>8.1} {:>8.2} {:>8.3} {:>8.2} {:>11.0} {:>11.0} {:>8.1} {:>8.1} {:>9.1} {:>9.1} {:>9.1} {:>8.1}",
            run + 1,
            r.load_start,
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            row[6],
            row[7],
            row[8],
            row[9],
            row[10],
            row[11],
            row[12],
            row[13]
        );
        let kinds: Vec<String> = r
            .failure_kinds
            .iter()
            .map(|(k, n)| format!("{n} x {k:?}"))
            .collect();
        println!(
            "      load at the return {:.2}; agent RSS online max {:.1} MiB, {:.1} MiB at the stop, {:.1} MiB at the return ({:.1} bytes per backlog record); {} RSS samples during build-up and drain; while the hub was down the agent logged {} failed connection attempts ({}); last failure {} the hub was ready; uplink established {} after",
            r.load_return,
            r.rss_online,
            r.rss_stop,
            r.rss_return,
            (r.rss_return - r.rss_stop) * f64::from(1u32 << 20) / r.backlog as f64,
            r.rss_samples,
            r.failures,
            kinds.join(", "),
            r.last_failure_before_ready_s
                .map_or("-".to_owned(), |s| format!("{:.3} s before", -s)),
            r.established_after_ready_s
                .map_or("-".to_owned(), |s| format!("{s:.3} s")),
        );
        for (c, v) in cols.iter_mut().zip(row) {
            c.push(v);
        }
    }
    let m = cols.clone().map(median);
    println!(
        "{:>4} {:>6} {:>9.0} {:>8.1} {:>8.1} {:>8.2} {:>8.3} {:>8.2} {:>11.0} {:>11.0} {:>8.1} {:>8.1} {:>9.1} {:>9.1} {:>9.1} {:>8.1}",
        "med",
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
        m[10],
        m[11],
        m[12],
        m[13]
    );
    let worst = |c: &Vec<f64>| c.iter().copied().fold(f64::NAN, f64::max);
    let (rss_worst, hwm_worst) = (worst(&cols[12]), worst(&cols[13]));
    let verdict = |ok: bool| if ok { "MET" } else { "MISSED" };
    println!(
        "targets: start < 1 s: {} (median {:.3} s, worst {:.3} s); drain >= 100,000 records/s: {} (median {:.0} from the first record, {:.0} from the hub's return); agent RSS < 64 MiB throughout: {} (worst run: max sampled {:.1} MiB, VmHWM {:.1} MiB)",
        verdict(m[4] < 1.0),
        m[4],
        worst(&cols[4]),
        verdict(m[6] >= 100_000.0),
        m[6],
        m[7],
        verdict(rss_worst < 64.0 && hwm_worst < 64.0),
        rss_worst,
        hwm_worst
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
        args.runs > 0 && args.samples > 0 && args.units > 0 && args.registers > 0,
        "runs, samples, units and registers must be > 0"
    );
    ensure!(args.window_secs > 0, "window-secs must be > 0");
    ensure!(
        args.backlog_units > 0 && args.backlog_poll_ms >= 10 && args.hub_poll_ms > 0,
        "backlog-units must be > 0, backlog-poll-ms >= 10, hub-poll-ms > 0"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        match args.part {
            Part::Latency => latency_main(&args).await,
            Part::Cpu => cpu_main(&args).await,
            Part::Backlog => backlog_main(&args).await,
        }
    })
}
