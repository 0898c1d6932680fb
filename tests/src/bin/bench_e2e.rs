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

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use clap::{Parser, ValueEnum};
use edgesync_edge::agent::Agent;
use edgesync_testkit::harness::{self, Api, Pki, Proc, SimDevice, TempDir, median};
use edgesync_testkit::sim::{SimConfig, SimHandle};
use hdrhistogram::Histogram;

#[path = "bench_common/mod.rs"]
mod bench_common;
use bench_common::{change_all, metric_sum};

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
}

/// End-to-end benchmark: PLC register change → hub API latency, or CPU per record.
#[derive(Debug, Parser)]
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
    /// `--part cpu`: the agent binary (default: this build's `edgesync-agent`).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// `--part cpu`: the hub binary (default: this build's `edgesync-hub`).
    #[arg(long)]
    hub_bin: Option<PathBuf>,
    /// `--part cpu`: record the hub with `perf record -F 999 --call-graph dwarf,16384` over the
    /// window of every run, into `<this>.<run>` (the run's CPU figures then include perf's cost).
    #[arg(long)]
    perf_hub: Option<PathBuf>,
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

/// The hub as the process `bin` (the real binary), on loopback ports the OS chooses, with its
/// config, store and log in `dir`; returns it with its tunnel and API addresses.
async fn start_hub_process(
    dir: &Path,
    pki: &Pki,
    bin: &Path,
) -> anyhow::Result<(Proc, String, String)> {
    let (cert, key) = pki.svid(&format!("spiffe://{TD}/hub"), "hub")?;
    let cfg = harness::hub_toml(
        dir,
        "127.0.0.1:0",
        "127.0.0.1:0",
        TD,
        &cert,
        &key,
        &pki.bundle,
        None,
    )?;
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
    let (hub, tunnel, http) = start_hub_process(dir, &pki, &hub_bin).await?;
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        match args.part {
            Part::Latency => latency_main(&args).await,
            Part::Cpu => cpu_main(&args).await,
        }
    })
}
