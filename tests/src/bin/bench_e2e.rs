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

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure};
use clap::{Parser, ValueEnum};
use edgesync_edge::agent::Agent;
use edgesync_testkit::harness::{self, Api, Pki, Proc, SimDevice, TempDir, median};
use edgesync_testkit::sim::{SimConfig, SimHandle};
use hdrhistogram::Histogram;

const TD: &str = "bench.example";
const NODE: &str = "gw-bench";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FsyncArg {
    /// fsync after every outbox group commit (the agent's default).
    EveryCommit,
    /// never fsync explicitly.
    Never,
}

/// End-to-end latency benchmark: PLC register change → hub API.
#[derive(Debug, Parser)]
struct Args {
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

async fn start_agent(
    args: &Args,
    dir: &Path,
    pki: &Pki,
    tunnel: SocketAddr,
    sim: &SimHandle,
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
    let path = harness::agent_toml(
        dir,
        &tunnel.to_string(),
        TD,
        &cert,
        &key,
        &pki.bundle,
        &devices,
        extra,
    )?;
    if args.processes {
        let bin = harness::bin("edgesync-agent")?;
        let p = Proc::spawn(
            &bin,
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
    let mut values = vec![vec![0u16; args.registers as usize]; args.units as usize];
    // Start from a known non-zero state so the hub's twin proves every tag arrived.
    for u in 1..=args.units {
        let v: Vec<u16> = (0..args.registers).map(|i| i + 1).collect();
        sim.set_holding(u, 0, &v)?;
        values[(u - 1) as usize] = v;
    }
    let started = Instant::now();
    let agent = start_agent(args, dir, &pki, hub.tunnel_addr, &sim).await?;
    // Warm-up: every tag of every device is in the hub's twin.
    let deadline = Instant::now() + Duration::from_secs(60);
    'warm: loop {
        let mut all = true;
        for u in 1..=args.units {
            let last = format!("c{}", args.registers - 1);
            if twin_value(&api, &format!("plc-{u}"), &last).await != Some(u64::from(args.registers))
            {
                all = false;
                break;
            }
        }
        if all {
            break 'warm;
        }
        if Instant::now() > deadline {
            bail!("the hub did not receive every tag within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        println!(
            "edgesync-bench-e2e: {} units x {} holding registers = {} tags polled every {} ms; agent {}; hub and PLC simulator embedded; agent fsync {:?}",
            args.units,
            args.registers,
            u32::from(args.units) * u32::from(args.registers),
            args.poll_ms,
            if args.processes { "as a separate edgesync-agent process" } else { "embedded in this process" },
            args.agent_fsync,
        );
        println!(
            "latency = register written in the simulator -> value visible in GET /api/v1/nodes/{{node}}/devices/{{device}}/twin (polled every {} ms); {} changes per run",
            args.api_poll_ms, args.samples
        );
        let cpu_label = if args.processes { "agent CPU %" } else { "process CPU %" };
        let rss_label = if args.processes { "agent RSS MiB" } else { "process RSS MiB" };
        println!(
            "{:>4}  {:>10}  {:>8}  {:>8}  {:>8}  {:>8}  {:>13}  {:>15}",
            "run", "startup s", "p50 ms", "p90 ms", "p99 ms", "max ms", cpu_label, rss_label
        );
        let (mut p50, mut p90, mut p99, mut max, mut cpu, mut rss) = (vec![], vec![], vec![], vec![], vec![], vec![]);
        for run in 0..args.runs {
            let r = run_once(&args).await?;
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
    })
}
