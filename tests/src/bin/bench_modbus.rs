//! `edgesync-bench-modbus`: the cost and the regularity of polling 10,000 Modbus tags.
//!
//! Setup per run: the PLC simulator ([`SimHandle`], in this process) with 20 units of 500
//! holding registers and enough coils; a hub embedded in this process ([`Hub::start`]), so the
//! agent's uplink is live; and the real `edgesync-agent` release binary as a separate process,
//! configured with 500 tags per unit of mixed types (uint16, int16, int32 and float32 in every
//! 32-bit byte order, float64 in two 64-bit orders, over the 500 registers; the rest bools in
//! coils), all polled every 100 ms. A few uint16 tags per unit are driven by a counter script
//! so that the agent has changes to report through its twin, outbox and uplink.
//!
//! After a warm-up (every device visible in the hub's twin, then `--warmup-secs`), the
//! simulator's request counters are reset and its per-unit arrival log switched on for a
//! window of `--window-secs`. Measured over the window:
//! - **requests per cycle per unit**, from the simulator's counters and arrival log;
//! - **agent CPU** as a share of one core: utime + stime from `/proc/<pid>/stat`;
//! - **peak RSS**: `VmHWM` from `/proc/<pid>/status` at the end of the window;
//! - **cycle jitter**: per unit, the cycle starts are the first request arrival after a
//!   pause of more than half a period; jitter is `|start[k+1] - start[k] - period|` over all
//!   units (the "period jitter"), and, as a second view, the lateness of each start against
//!   the unit's own best-fitting 100 ms grid (`start[k] - k * period`, minus its minimum);
//! - records the hub stored during the window (proof the uplink ran).
//!
//! Options for the agent's local MQTT bus (issue 6): `--mqtt embedded` turns the embedded
//! broker on (a free loopback port) and connects a subscriber (rumqttc, QoS 0, in this
//! process) to `edgesync/{node}/+`, which counts the telemetry messages and properties it
//! receives during the window; `--mqtt both` measures every run twice, first with
//! `mode = "off"`, then with the broker on, so that the cost of MQTT shows in the same
//! conditions. `--layout uint16` makes every register tag a uint16, and `--change-all`
//! rewrites every register of every unit twice per poll interval (one bulk write per unit),
//! so every poll reads a change in every register tag.
//!
//! `--floor` measures, in every run after the agent and against the same simulators, the
//! `edgesync-io-floor` process: the same Modbus round trips, one message per unit of the size
//! the agent's telemetry had (to a TCP sink in this process), and one synced file write per
//! sweep of 16 bytes per record the hub stored, with nothing else. Its CPU is a lower bound
//! for this load on this machine at this moment, so the agent's CPU can be read as a ratio to
//! it (the machine's noise moves both). `--floor-quic` adds the tunnel's bare I/O to the floor:
//! per sweep, as many bytes as the agent's records take encoded (the records the hub stored
//! per sweep, times the encoded size of this layout's samples) on one QUIC stream to a quinn
//! server in this process, which acknowledges each sweep with 8 bytes. `--floor-pipeline` has
//! the floor write all of a sweep's Modbus requests at once instead of one after the other.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail, ensure};
use clap::{Parser, ValueEnum};
use edgesync_edge::modbus::codec;
use edgesync_edge::model::{Access, ByteOrder, DataType, ReportPolicy, Table as TagTable, TagSpec};
use edgesync_protocol::{NodeId, PropertyId, Value};
use edgesync_testkit::harness::{self, Api, Pki, Proc, TempDir, median};
use edgesync_testkit::sim::{Arrival, BankSizes, Script, SimConfig, SimHandle, Table};
use hdrhistogram::Histogram;
use tokio::time::Instant;

#[path = "bench_common/mod.rs"]
mod bench_common;
use bench_common::{Subscriber, change_all, free_port};

const TD: &str = "bench.example";
const NODE: &str = "gw-bench";
/// Largest read the planner may issue (Modbus limit, the agent's default).
const MAX_READ: u16 = 125;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FsyncArg {
    /// fsync after every outbox group commit (the agent's default).
    EveryCommit,
    /// never fsync explicitly.
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum MqttArg {
    /// `[mqtt] mode = "off"`.
    Off,
    /// The embedded broker on a free loopback port, and a subscriber to the telemetry.
    Embedded,
    /// Each run twice: off, then embedded.
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LayoutArg {
    /// A cycle of uint16, int16, int32, float32 and float64 in several byte orders.
    Mixed,
    /// Every register tag a uint16.
    Uint16,
}

/// Modbus polling benchmark: 10,000 tags on 20 units every 100 ms, agent as a real process.
#[derive(Debug, Parser)]
struct Args {
    /// Simulated PLC units (devices).
    #[arg(long, default_value_t = 20)]
    units: u8,
    /// Tags in total (split evenly over the units; what does not fit in the registers goes
    /// into coils).
    #[arg(long, default_value_t = 10_000)]
    tags: u32,
    /// Holding registers per unit that the register tags are spread over.
    #[arg(long, default_value_t = 500)]
    registers: u16,
    /// Poll interval of every device.
    #[arg(long, default_value_t = 100)]
    poll_ms: u64,
    /// uint16 tags per unit that a counter script changes every poll interval.
    #[arg(long, default_value_t = 5)]
    changing_per_unit: u16,
    /// Simulator listeners (separate Modbus TCP endpoints, hence separate agent links); the
    /// units are spread over them round-robin.
    #[arg(long, default_value_t = 1)]
    endpoints: u8,
    /// Seconds after every device reached the hub before measuring.
    #[arg(long, default_value_t = 10)]
    warmup_secs: u64,
    /// Seconds of the measurement window.
    #[arg(long, default_value_t = 60)]
    window_secs: u64,
    /// Runs (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Agent outbox fsync policy.
    #[arg(long, value_enum, default_value = "every-commit")]
    agent_fsync: FsyncArg,
    /// The agent's `commit_interval_ms` (group commit window); the agent's default if not given.
    #[arg(long)]
    commit_interval_ms: Option<u64>,
    /// Keep the agent's config and log here instead of a temporary directory (for profiling).
    #[arg(long)]
    keep_dir: Option<PathBuf>,
    /// Also print the jitter p50/p99 of every unit (in the order the agent polls them on a
    /// link: units sharing an endpoint are served one after the other).
    #[arg(long)]
    per_unit: bool,
    /// Run this agent binary instead of the workspace's `edgesync-agent` of the current
    /// profile (e.g. `target/bench/edgesync-agent`, which keeps its symbols, for profiling).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Command prefix to run the agent under (e.g. "valgrind --tool=callgrind"), split on
    /// spaces.
    #[arg(long)]
    wrap: Option<String>,
    /// The agent's `RUST_LOG` (default: the agent's own default filter, as a user runs it).
    #[arg(long, default_value = edgesync_edge::logging::DEFAULT_FILTER)]
    agent_rust_log: String,
    /// The agent's local MQTT bus: off, the embedded broker with a telemetry subscriber, or
    /// both (each run measured off, then on).
    #[arg(long, value_enum, default_value = "off")]
    mqtt: MqttArg,
    /// Types of the register tags.
    #[arg(long, value_enum, default_value = "mixed")]
    layout: LayoutArg,
    /// Rewrite every register of every unit twice per poll interval (needs `--layout
    /// uint16`), so that every tag changes every cycle.
    #[arg(long)]
    change_all: bool,
    /// CPU target (% of one core) for the verdict line.
    #[arg(long, default_value_t = 10.0)]
    cpu_target_pct: f64,
    /// Peak RSS target (MB) for the verdict line.
    #[arg(long, default_value_t = 32.0)]
    rss_target_mb: f64,
    /// Extra lines for the agent's `[mqtt]` table when the broker is on (e.g.
    /// "segment_bytes = 65536"; `;` separates lines).
    #[arg(long, default_value = "")]
    mqtt_config: String,
    /// Also measure `edgesync-io-floor` (the bare I/O of the load) in every run, after the
    /// agent, with the same simulators.
    #[arg(long)]
    floor: bool,
    /// The floor also sends the sweep's records (as many bytes as the agent's encoding takes)
    /// over QUIC and waits for an acknowledgement (with `--floor`).
    #[arg(long, requires = "floor")]
    floor_quic: bool,
    /// The floor writes all of a sweep's Modbus requests at once, then reads the answers
    /// (with `--floor`).
    #[arg(long, requires = "floor")]
    floor_pipeline: bool,
}

/// One tag of the generated layout (the same on every unit).
#[derive(Debug, Clone)]
struct TagDef {
    name: String,
    table: TagTable,
    address: u16,
    data_type: DataType,
    order: ByteOrder,
    /// The 8-letter name for 64-bit types, the 4-letter one otherwise.
    order_name: &'static str,
}

impl TagDef {
    fn type_name(&self) -> &'static str {
        codec::type_name(&self.data_type)
    }
}

/// The per-unit layout: register tags packed over `registers` holding registers (a cycle of
/// mixed types; a multi-register tag never straddles a 125-register boundary, so an ideal
/// planner needs `ceil(registers / 125)` reads), then bools in coils up to `per_unit` tags.
fn layout(registers: u16, per_unit: u32, kind: LayoutArg) -> Vec<TagDef> {
    use ByteOrder::{Abcd, Badc, Cdab, Dcba};
    use DataType::{Float32, Float64, Int16, Int32, UInt16};
    let pattern: [(DataType, ByteOrder, &'static str); 18] = [
        (UInt16, Abcd, "ABCD"),
        (Int16, Abcd, "ABCD"),
        (UInt16, Abcd, "ABCD"),
        (Int32, Abcd, "ABCD"),
        (Float32, Abcd, "ABCD"),
        (UInt16, Abcd, "ABCD"),
        (Int16, Abcd, "ABCD"),
        (Float32, Cdab, "CDAB"),
        (UInt16, Abcd, "ABCD"),
        (Int32, Cdab, "CDAB"),
        (Float32, Badc, "BADC"),
        (UInt16, Abcd, "ABCD"),
        (Float32, Dcba, "DCBA"),
        (Float64, Abcd, "ABCDEFGH"),
        (UInt16, Abcd, "ABCD"),
        (Int16, Abcd, "ABCD"),
        (Float64, Cdab, "GHEFCDAB"),
        (UInt16, Abcd, "ABCD"),
    ];
    let mut tags = Vec::new();
    let mut addr: u16 = 0;
    let mut i = 0usize;
    while addr < registers && (tags.len() as u32) < per_unit {
        let (mut dt, mut order, mut order_name) = pattern[i % pattern.len()];
        i += 1;
        let boundary = (addr / MAX_READ + 1) * MAX_READ;
        if kind == LayoutArg::Uint16 || addr + dt.width() > boundary.min(registers) {
            (dt, order, order_name) = (UInt16, Abcd, "ABCD");
        }
        tags.push(TagDef {
            name: format!("r{addr}"),
            table: TagTable::HoldingRegister,
            address: addr,
            data_type: dt,
            order,
            order_name,
        });
        addr += dt.width();
    }
    let mut coil = 0u16;
    while (tags.len() as u32) < per_unit {
        tags.push(TagDef {
            name: format!("b{coil}"),
            table: TagTable::Coil,
            address: coil,
            data_type: DataType::Bool,
            order: Abcd,
            order_name: "ABCD",
        });
        coil += 1;
    }
    tags
}

/// The registers that hold `value` for `tag`, encoded by the agent's own codec.
fn encode(tag: &TagDef, value: f64) -> anyhow::Result<Vec<u16>> {
    let spec = TagSpec {
        property: PropertyId::new(tag.name.clone())?,
        table: tag.table,
        address: tag.address,
        data_type: tag.data_type,
        bit: None,
        byte_order: tag.order,
        scale: 1.0,
        offset: 0.0,
        unit: None,
        access: Access::Read,
        poll_interval: Duration::from_millis(100),
        report: ReportPolicy::default(),
    };
    let v = match tag.data_type {
        DataType::Float32 | DataType::Float64 => Value::Float(value),
        DataType::UInt16 => Value::UInt(value as u64),
        _ => Value::Int(value as i64),
    };
    codec::encode(&spec, &v).map_err(|e| anyhow!("encode {}: {e}", tag.name))
}

fn agent_toml(
    args: &Args,
    dir: &Path,
    hub: SocketAddr,
    pki: &Pki,
    endpoints: &[SocketAddr],
    tags: &[TagDef],
    mqtt_port: Option<u16>,
) -> anyhow::Result<PathBuf> {
    let (cert, key) = pki.svid(&format!("spiffe://{TD}/edge/{NODE}"), "agent")?;
    let fsync = match args.agent_fsync {
        FsyncArg::EveryCommit => "every_commit",
        FsyncArg::Never => "never",
    };
    let mut s = String::new();
    writeln!(
        s,
        "[agent]\ndata_dir = {:?}\n",
        dir.join("data").display().to_string()
    )?;
    writeln!(
        s,
        "[hub]\naddress = {:?}\nbackoff_initial_ms = 100\nbackoff_max_ms = 1000\n",
        hub.to_string()
    )?;
    s.push_str(&harness::identity_toml(TD, &cert, &key, &pki.bundle));
    writeln!(s, "[outbox]\nfsync = {fsync:?}")?;
    if let Some(ms) = args.commit_interval_ms {
        writeln!(s, "commit_interval_ms = {ms}")?;
    }
    writeln!(s)?;
    match mqtt_port {
        Some(p) => writeln!(
            s,
            "[mqtt]\nmode = \"embedded\"\nlisten = \"127.0.0.1:{p}\"\n{}\n",
            args.mqtt_config.replace(';', "\n")
        )?,
        None => writeln!(s, "[mqtt]\nmode = \"off\"\n")?,
    }
    for u in 1..=args.units {
        let endpoint = endpoints[usize::from(u - 1) % endpoints.len()];
        writeln!(
            s,
            "[[devices]]\nid = \"plc-{u}\"\nprotocol = \"tcp\"\nendpoint = \"{endpoint}\"\nunit_id = {u}\npoll_interval_ms = {}\ntimeout_ms = 500\n",
            args.poll_ms
        )?;
        for t in tags {
            write!(
                s,
                "[[devices.tags]]\nname = {:?}\ntable = {:?}\naddress = {}\n",
                t.name,
                t.table.as_str(),
                t.address
            )?;
            if t.table.is_register() {
                writeln!(
                    s,
                    "type = {:?}\nbyte_order = {:?}",
                    t.type_name(),
                    t.order_name
                )?;
            }
            s.push('\n');
        }
    }
    let p = dir.join("agent.toml");
    std::fs::write(&p, s)?;
    Ok(p)
}

/// Cycle statistics of one unit's arrivals.
#[derive(Debug, Default)]
struct UnitCycles {
    /// Cycle start instants.
    starts: Vec<Instant>,
    /// Requests per cycle.
    requests: Vec<usize>,
    /// Time from the first to the last request of a cycle.
    spans: Vec<Duration>,
}

/// Split arrivals into cycles: a new cycle begins after a pause longer than half a period.
fn cycles(arrivals: &[Arrival], period: Duration) -> UnitCycles {
    let mut out = UnitCycles::default();
    let mut last: Option<Instant> = None;
    let mut first = None;
    for a in arrivals {
        let new_cycle = last.is_none_or(|l| a.at.duration_since(l) > period / 2);
        if new_cycle {
            if let (Some(f), Some(l)) = (first, last) {
                out.spans.push(l.duration_since(f));
            }
            out.starts.push(a.at);
            out.requests.push(0);
            first = Some(a.at);
        }
        if let Some(n) = out.requests.last_mut() {
            *n += 1;
        }
        last = Some(a.at);
    }
    if let (Some(f), Some(l)) = (first, last) {
        out.spans.push(l.duration_since(f));
    }
    out
}

#[derive(Debug)]
struct RunResult {
    requests_per_cycle: f64,
    expected_requests: u32,
    cycles_per_unit: f64,
    expected_cycles: f64,
    missed: u64,
    cpu_pct: f64,
    hwm_mib: f64,
    rss_mib: f64,
    jitter: Histogram<u64>,
    lateness: Histogram<u64>,
    span: Histogram<u64>,
    stored_per_s: f64,
    /// Telemetry messages and properties the MQTT subscriber received per second.
    mqtt_msgs_per_s: f64,
    mqtt_props_per_s: f64,
    /// The floor process's CPU (% of one core) and peak RSS, with `--floor`.
    floor: Option<(f64, f64)>,
}

async fn run_once(args: &Args, run: usize, mqtt: bool) -> anyhow::Result<RunResult> {
    let tmp = TempDir::new("bench-modbus")?;
    let dir = match &args.keep_dir {
        Some(d) => {
            let d = d.join(format!("run{run}"));
            std::fs::create_dir_all(&d)?;
            d
        }
        None => tmp.path().to_path_buf(),
    };
    let per_unit = args.tags / u32::from(args.units);
    let tags = layout(args.registers, per_unit, args.layout);
    let coils = tags.iter().filter(|t| t.table == TagTable::Coil).count();
    let period = Duration::from_millis(args.poll_ms);

    // Simulators: units spread round-robin over the endpoints.
    let sizes = BankSizes {
        coils: coils.max(1),
        discrete_inputs: 1,
        input_registers: 1,
        holding_registers: usize::from(args.registers),
    };
    let mut sims = Vec::new();
    for e in 0..args.endpoints {
        let units = (1..=args.units).filter(|u| (u - 1) % args.endpoints == e);
        let sim = SimHandle::start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            SimConfig::with_units(units).sizes(sizes),
        )
        .await?;
        sims.push(sim);
    }
    let sim_of = |u: u8| &sims[usize::from(u - 1) % sims.len()];
    for u in 1..=args.units {
        let sim = sim_of(u);
        for (i, t) in tags.iter().enumerate() {
            let v = (i % 1000) as f64 + f64::from(u);
            match t.table {
                TagTable::Coil => sim.set_coil(u, t.address, i % 3 == 0)?,
                _ => {
                    let v = if t.data_type == DataType::Float32 || t.data_type == DataType::Float64
                    {
                        v * 0.25
                    } else {
                        v
                    };
                    sim.set_holding(u, t.address, &encode(t, v)?)?;
                }
            }
        }
        let scripted = if args.change_all {
            0
        } else {
            usize::from(args.changing_per_unit)
        };
        for t in tags
            .iter()
            .filter(|t| t.data_type == DataType::UInt16)
            .take(scripted)
        {
            sim.add_script(
                u,
                Table::HoldingRegisters,
                t.address,
                Script::Counter { step: 1 },
                period,
            )?;
        }
    }

    let pki = Pki::new(&dir.join("pki"), TD)?;
    let hub = harness::embedded_hub(&pki, &dir).await?;
    let api = Api::new(&hub.http_addr.to_string());
    let endpoints: Vec<SocketAddr> = sims.iter().map(SimHandle::local_addr).collect();
    let mqtt_port = if mqtt { Some(free_port()?) } else { None };
    let config = agent_toml(
        args,
        &dir,
        hub.tunnel_addr,
        &pki,
        &endpoints,
        &tags,
        mqtt_port,
    )?;
    let agent_bin = match &args.agent_bin {
        Some(p) => p.clone(),
        None => harness::bin("edgesync-agent")?,
    };
    let config_arg = config.display().to_string();
    let agent_bin_arg = agent_bin.display().to_string();
    let mut cmd: Vec<&str> = args
        .wrap
        .as_deref()
        .map(|w| w.split(' ').collect())
        .unwrap_or_default();
    cmd.extend([
        agent_bin_arg.as_str(),
        "run",
        "--config",
        config_arg.as_str(),
    ]);
    let program = PathBuf::from(cmd[0]);
    // The agent logs as `--agent-rust-log` says (by default as when a user runs it), not at
    // the testkit's `info` for everything.
    let agent = Proc::spawn_env(
        &program,
        &cmd[1..],
        &dir.join("agent.log"),
        None,
        &[("RUST_LOG", args.agent_rust_log.as_str())],
    )
    .await?;
    let pid = agent.pid().context("agent has no pid")?;

    // Warm-up: every device has reached the hub's twin (the last coil proves whole devices).
    let last = tags.last().context("no tags")?.name.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    for u in 1..=args.units {
        loop {
            let path = format!("/api/v1/nodes/{NODE}/devices/plc-{u}/twin");
            if let Ok((200, v)) = api.get(&path).await
                && !v["reported"][&last].is_null()
            {
                break;
            }
            if std::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
                let tail: String = log.lines().rev().take(20).collect::<Vec<_>>().join("\n");
                bail!(
                    "plc-{u} did not reach the hub within 120 s; agent log (last lines, newest first):\n{tail}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let subscriber = match mqtt_port {
        Some(port) => Some(
            Subscriber::connect(
                port,
                &format!("edgesync/{NODE}/+"),
                false,
                Duration::from_secs(30),
            )
            .await?,
        ),
        None => None,
    };
    // Every register of every unit rewritten twice per period (a counter per unit).
    let changer = args
        .change_all
        .then(|| change_all(sims.clone(), args.units, args.registers, period));
    tokio::time::sleep(Duration::from_secs(args.warmup_secs)).await;

    // Measurement window.
    let counted = |s: &Option<Subscriber>| {
        s.as_ref().map_or((0, 0, 0), |s| {
            (
                s.messages.load(std::sync::atomic::Ordering::Relaxed),
                s.properties.load(std::sync::atomic::Ordering::Relaxed),
                s.bytes.load(std::sync::atomic::Ordering::Relaxed),
            )
        })
    };
    let (mq_m0, mq_p0, mq_b0) = counted(&subscriber);
    let node = NodeId::new(NODE)?;
    let seq0 = hub.store.stored_seq(&node)?;
    for sim in &sims {
        sim.reset_counters();
        sim.record_arrivals(true);
    }
    let c0 = harness::proc_cpu_seconds(pid)?;
    let w0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.window_secs)).await;
    let c1 = harness::proc_cpu_seconds(pid)?;
    let (mq_m1, mq_p1, mq_b1) = counted(&subscriber);
    let elapsed = w0.elapsed().as_secs_f64();
    let hwm_mib = harness::proc_status_mib(pid, "VmHWM:")?;
    let rss_mib = harness::proc_status_mib(pid, "VmRSS:")?;
    let seq1 = hub.store.stored_seq(&node)?;
    let mut per_unit_arrivals = Vec::new();
    let mut total_requests = 0u64;
    for u in 1..=args.units {
        let sim = sim_of(u);
        total_requests += sim.request_count(u);
        per_unit_arrivals.push(sim.take_arrivals(u));
    }
    for sim in &sims {
        sim.record_arrivals(false);
    }
    let cpu_pct = (c1 - c0) / elapsed * 100.0;

    if let Some(s) = subscriber {
        s.close().await;
    }
    let _ = agent.terminate().await;
    hub.shutdown().await;
    let floor = if args.floor {
        let sweeps = elapsed / period.as_secs_f64();
        let message_bytes = (mq_b1 - mq_b0).checked_div(mq_m1 - mq_m0).unwrap_or(0);
        let records_per_sweep = (seq1 - seq0) as f64 / sweeps;
        let commit_bytes = (records_per_sweep * 16.0) as usize;
        let uplink_bytes = (records_per_sweep * record_bytes(&tags)?) as usize;
        Some(
            measure_floor(
                args,
                &dir,
                &sims,
                &FloorLoad {
                    messages: mqtt,
                    message_bytes: usize::try_from(message_bytes)?,
                    commit_bytes,
                    uplink_bytes: args.floor_quic.then_some(uplink_bytes),
                    pipeline: args.floor_pipeline,
                },
            )
            .await?,
        )
    } else {
        None
    };
    if let Some(c) = changer {
        c.abort();
    }
    for sim in &sims {
        sim.shutdown();
    }

    let mut jitter = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut lateness = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut span = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut cycles_total = 0usize;
    let mut missed = 0u64;
    let p_us = period.as_micros() as i64;
    for (index, arrivals) in per_unit_arrivals.iter().enumerate() {
        let mut unit_jitter = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        // Drop the first and last cycle: the window may cut them.
        let c = cycles(arrivals, period);
        ensure!(
            c.starts.len() > 3,
            "a unit had {} cycles in the window",
            c.starts.len()
        );
        let starts = &c.starts[1..c.starts.len() - 1];
        for s in &c.spans[1..c.spans.len() - 1] {
            span.saturating_record(s.as_micros() as u64);
        }
        cycles_total += starts.len();
        let mut offsets = Vec::new();
        for w in starts.windows(2) {
            let gap = w[1].duration_since(w[0]).as_micros() as i64;
            // A gap of about k periods means k - 1 cycles were skipped (schedule catch-up).
            let k = ((gap as f64) / (p_us as f64)).round().max(1.0) as i64;
            missed += (k - 1) as u64;
            jitter.saturating_record((gap - k * p_us).unsigned_abs());
            unit_jitter.saturating_record((gap - k * p_us).unsigned_abs());
        }
        if args.per_unit {
            println!(
                "      unit {:>3}: jitter p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms, {} cycles",
                index + 1,
                ms(unit_jitter.value_at_quantile(0.5)),
                ms(unit_jitter.value_at_quantile(0.99)),
                ms(unit_jitter.max()),
                starts.len()
            );
        }
        let t0 = starts[0];
        for s in starts {
            let d = s.duration_since(t0).as_micros() as i64;
            let k = ((d as f64) / (p_us as f64)).round() as i64;
            offsets.push(d - k * p_us);
        }
        let min = offsets.iter().copied().min().unwrap_or(0);
        for o in offsets {
            lateness.saturating_record((o - min).unsigned_abs());
        }
    }
    let requests_in_full_cycles: usize = per_unit_arrivals
        .iter()
        .map(|a| {
            let c = cycles(a, period);
            c.requests[1..c.requests.len().saturating_sub(1)]
                .iter()
                .sum::<usize>()
        })
        .sum();
    let full_cycles: usize = per_unit_arrivals
        .iter()
        .map(|a| cycles(a, period).requests.len().saturating_sub(2))
        .sum();
    let requests_per_cycle = requests_in_full_cycles as f64 / full_cycles.max(1) as f64;
    ensure!(
        total_requests
            >= per_unit_arrivals
                .iter()
                .map(|a| a.len() as u64)
                .sum::<u64>(),
        "the counters and the arrival log disagree"
    );
    let expected_requests =
        u32::from(args.registers.div_ceil(MAX_READ)) + u32::try_from(coils.div_ceil(2000))?;
    ensure!(
        seq1 > seq0,
        "the hub stored nothing during the window: the uplink is not live"
    );
    Ok(RunResult {
        requests_per_cycle,
        expected_requests,
        cycles_per_unit: cycles_total as f64 / f64::from(args.units),
        expected_cycles: (elapsed / period.as_secs_f64()) - 2.0,
        missed,
        cpu_pct,
        hwm_mib,
        rss_mib,
        jitter,
        lateness,
        span,
        stored_per_s: (seq1 - seq0) as f64 / elapsed,
        mqtt_msgs_per_s: (mq_m1 - mq_m0) as f64 / elapsed,
        mqtt_props_per_s: (mq_p1 - mq_p0) as f64 / elapsed,
        floor,
    })
}

/// The floor's name in the report: `floor`, with `+quic` and `+pipeline` for its options.
fn floor_name(args: &Args) -> String {
    let mut name = "floor".to_owned();
    if args.floor_quic {
        name.push_str("+quic");
    }
    if args.floor_pipeline {
        name.push_str("+pipeline");
    }
    name
}

/// What the floor process does per sweep besides the Modbus reads.
struct FloorLoad {
    /// One message per unit to the sink.
    messages: bool,
    message_bytes: usize,
    /// Bytes written and synced per sweep.
    commit_bytes: usize,
    /// Bytes sent over QUIC per sweep (none: no QUIC).
    uplink_bytes: Option<usize>,
    /// All of a sweep's requests written at once.
    pipeline: bool,
}

/// Average encoded size (bytes) of one record of `tags` (unit 1's, each with a five-digit
/// value), as the agent's uplink encodes samples.
fn record_bytes(tags: &[TagDef]) -> anyhow::Result<f64> {
    let device = edgesync_protocol::DeviceId::new("plc-1")?;
    let samples = tags
        .iter()
        .map(|t| {
            Ok(edgesync_protocol::Sample {
                device: device.clone(),
                property: PropertyId::new(t.name.clone())?,
                value: Some(match t.data_type {
                    DataType::Bool => Value::Bool(true),
                    DataType::Float32 | DataType::Float64 => Value::Float(12345.5),
                    DataType::UInt16 => Value::UInt(12345),
                    _ => Value::Int(12345),
                }),
                quality: edgesync_protocol::Quality::Good,
                ts: edgesync_protocol::Timestamp(1_800_000_000_000),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    ensure!(!samples.is_empty(), "no tags");
    Ok(edgesync_protocol::frame::encode_samples(&samples).len() as f64 / samples.len() as f64)
}

/// A QUIC server in this process for the floor's uplink: on every stream it reads `per_sweep`
/// bytes at a time and answers each with 8 bytes.
struct QuicSink {
    addr: SocketAddr,
    /// PEM file of its self-signed certificate (name `localhost`).
    pem: PathBuf,
    /// Bytes read (and acknowledged) at a time.
    per_sweep: usize,
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl QuicSink {
    async fn start(dir: &Path, per_sweep: usize) -> anyhow::Result<Self> {
        use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
        let pem = dir.join("floor-quic.pem");
        std::fs::write(&pem, certified.cert.pem())?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let crypto = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)?;
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)?;
        let endpoint = quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(std::sync::Arc::new(quic)),
            SocketAddr::from(([127, 0, 0, 1], 0)),
        )?;
        let addr = endpoint.local_addr()?;
        let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = received.clone();
        let task = tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let counter = counter.clone();
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; per_sweep];
                            while recv.read_exact(&mut buf).await.is_ok() {
                                counter.fetch_add(
                                    per_sweep as u64,
                                    std::sync::atomic::Ordering::Relaxed,
                                );
                                if send.write_all(&[0u8; 8]).await.is_err() {
                                    break;
                                }
                            }
                        });
                    }
                });
            }
        });
        Ok(QuicSink {
            addr,
            pem,
            per_sweep,
            received,
            task,
        })
    }

    fn received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for QuicSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs `edgesync-io-floor` against the simulators (one endpoint) for a warm-up and the window;
/// returns its CPU (% of one core) and peak RSS (MiB), after checking that it polled.
async fn measure_floor(
    args: &Args,
    dir: &Path,
    sims: &[SimHandle],
    load: &FloorLoad,
) -> anyhow::Result<(f64, f64)> {
    ensure!(
        sims.len() == 1,
        "--floor supports one endpoint (it polls the units one after the other on one connection)"
    );
    let sim = &sims[0];
    let bin = std::env::current_exe()?.with_file_name("edgesync-io-floor");
    ensure!(
        bin.exists(),
        "{} is missing: build it with `cargo build --release -p edgesync-testkit --bins`",
        bin.display()
    );
    // The sink: reads and drops what the floor process sends, counting bytes.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let sink_addr = listener.local_addr()?;
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = received.clone();
    let sink = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        while let Ok((mut s, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    counter.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    let endpoint = sim.local_addr().to_string();
    let units = args.units.to_string();
    let registers = args.registers.to_string();
    let period = args.poll_ms.to_string();
    let sink_arg = sink_addr.to_string();
    let message_bytes = load.message_bytes.to_string();
    let commit_bytes = load.commit_bytes.to_string();
    let data_dir = dir.join("floor");
    let data_dir_arg = data_dir.display().to_string();
    let mut cmd = vec![
        "--endpoint",
        endpoint.as_str(),
        "--units",
        units.as_str(),
        "--registers",
        registers.as_str(),
        "--period-ms",
        period.as_str(),
        "--commit-bytes",
        commit_bytes.as_str(),
        "--data-dir",
        data_dir_arg.as_str(),
    ];
    if load.messages {
        cmd.extend([
            "--sink",
            sink_arg.as_str(),
            "--message-bytes",
            message_bytes.as_str(),
        ]);
    }
    let quic = match load.uplink_bytes {
        Some(n) => Some(QuicSink::start(dir, n).await?),
        None => None,
    };
    let quic_args = quic.as_ref().map(|q| {
        [
            q.addr.to_string(),
            q.pem.display().to_string(),
            q.per_sweep.to_string(),
        ]
    });
    if let Some([addr, pem, n]) = &quic_args {
        cmd.extend(["--quic", addr, "--quic-cert", pem, "--uplink-bytes", n]);
    }
    if load.pipeline {
        cmd.push("--pipeline");
    }
    let quic_received = || quic.as_ref().map_or(0, QuicSink::received);
    let floor = Proc::spawn_env(&bin, &cmd, &dir.join("floor.log"), Some("ready"), &[]).await?;
    let pid = floor.pid().context("floor process has no pid")?;
    tokio::time::sleep(Duration::from_secs(args.warmup_secs)).await;
    let r0 = sim.request_count(1);
    let b0 = received.load(std::sync::atomic::Ordering::Relaxed);
    let q0 = quic_received();
    let c0 = harness::proc_cpu_seconds(pid)?;
    let w0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.window_secs)).await;
    let c1 = harness::proc_cpu_seconds(pid)?;
    let elapsed = w0.elapsed().as_secs_f64();
    let hwm = harness::proc_status_mib(pid, "VmHWM:")?;
    let polls = sim.request_count(1) - r0;
    let bytes = received.load(std::sync::atomic::Ordering::Relaxed) - b0;
    let quic_bytes = quic_received() - q0;
    let _ = floor.terminate().await;
    sink.abort();
    drop(quic);
    let sweeps = elapsed * 1000.0 / args.poll_ms as f64;
    let per_sweep = f64::from(args.registers.div_ceil(MAX_READ));
    ensure!(
        polls as f64 >= 0.9 * sweeps * per_sweep,
        "the floor process read unit 1 {polls} times in {elapsed:.1} s, expected about {:.0}: see {}",
        sweeps * per_sweep,
        dir.join("floor.log").display()
    );
    ensure!(
        !load.messages
            || bytes as f64 >= 0.9 * sweeps * f64::from(args.units) * load.message_bytes as f64,
        "the sink received {bytes} bytes from the floor process, expected about {:.0}",
        sweeps * f64::from(args.units) * load.message_bytes as f64
    );
    if let Some(n) = load.uplink_bytes {
        ensure!(
            quic_bytes as f64 >= 0.9 * sweeps * n as f64,
            "the QUIC server received {quic_bytes} bytes from the floor process, expected about {:.0}",
            sweeps * n as f64
        );
    }
    Ok(((c1 - c0) / elapsed * 100.0, hwm))
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn print_row(label: &str, mode: &str, r: &RunResult) {
    println!(
        "{:>4} {:>5} {:>9.2} {:>8} {:>9.1} {:>7} {:>8.2} {:>8.1} {:>9.1} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.0} {:>9.0} {:>9.0}",
        label,
        mode,
        r.requests_per_cycle,
        r.expected_requests,
        r.cycles_per_unit,
        r.missed,
        r.cpu_pct,
        r.hwm_mib,
        r.rss_mib,
        ms(r.jitter.value_at_quantile(0.5)),
        ms(r.jitter.value_at_quantile(0.99)),
        ms(r.jitter.max()),
        ms(r.lateness.value_at_quantile(0.99)),
        ms(r.span.value_at_quantile(0.99)),
        r.stored_per_s,
        r.mqtt_msgs_per_s,
        r.mqtt_props_per_s,
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.units >= 1 && args.endpoints >= 1,
        "--units and --endpoints must be at least 1"
    );
    ensure!(args.runs >= 1, "--runs must be at least 1");
    ensure!(
        !args.change_all || args.layout == LayoutArg::Uint16,
        "--change-all needs --layout uint16"
    );
    let modes: &[bool] = match args.mqtt {
        MqttArg::Off => &[false],
        MqttArg::Embedded => &[true],
        MqttArg::Both => &[false, true],
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let per_unit = args.tags / u32::from(args.units);
        let tags = layout(args.registers, per_unit, args.layout);
        let mut kinds: Vec<(String, usize)> = Vec::new();
        for t in &tags {
            let k = if t.table == TagTable::Coil {
                "bool(coil)".to_string()
            } else {
                format!("{}/{}", t.type_name(), t.order_name)
            };
            match kinds.iter_mut().find(|(n, _)| *n == k) {
                Some((_, c)) => *c += 1,
                None => kinds.push((k, 1)),
            }
        }
        let changing = if args.change_all {
            "every register tag changing every cycle".to_string()
        } else {
            format!("{} changing tags/unit", args.changing_per_unit)
        };
        println!(
            "modbus polling: {} units x {} tags = {} tags every {} ms over {} endpoint(s), {changing}, agent = edgesync-agent process, mqtt {:?}",
            args.units,
            tags.len(),
            tags.len() * usize::from(args.units),
            args.poll_ms,
            args.endpoints,
            args.mqtt,
        );
        let kinds: Vec<String> = kinds.iter().map(|(k, c)| format!("{k} {c}")).collect();
        println!("tags per unit: {}", kinds.join(", "));
        println!("window {} s after a {} s warm-up; jitter = |cycle start interval - period|", args.window_secs, args.warmup_secs);
        println!(
            "{:>4} {:>5} {:>9} {:>8} {:>9} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "run", "mqtt", "req/cyc", "(ideal)", "cycles/u", "missed", "cpu %", "hwm MiB", "rss MiB",
            "jit p50", "jit p99", "jit max", "late p99", "span p99", "stored/s", "mq msg/s", "mq prop/s"
        );
        let mode_name = |m: bool| if m { "on" } else { "off" };
        let mut results: Vec<(bool, RunResult)> = Vec::new();
        for run in 1..=args.runs {
            for &mqtt in modes {
                let r = run_once(&args, run, mqtt).await?;
                print_row(&run.to_string(), mode_name(mqtt), &r);
                if let Some((cpu, hwm)) = r.floor {
                    println!(
                        "      {} ({}): cpu {cpu:.2} %, peak RSS {hwm:.1} MiB; agent / floor = {:.2}",
                        floor_name(&args),
                        mode_name(mqtt),
                        r.cpu_pct / cpu
                    );
                }
                let _ = r.expected_cycles;
                results.push((mqtt, r));
            }
        }
        for &mqtt in modes {
            let of_mode: Vec<&RunResult> =
                results.iter().filter(|(m, _)| *m == mqtt).map(|(_, r)| r).collect();
            let med = |f: &dyn Fn(&RunResult) -> f64| median(of_mode.iter().map(|r| f(r)).collect());
            let cpu = med(&|r| r.cpu_pct);
            let hwm = med(&|r| r.hwm_mib);
            let p99 = med(&|r| ms(r.jitter.value_at_quantile(0.99)));
            println!(
                "{:>4} {:>5} {:>9.2} {:>8} {:>9.1} {:>7} {:>8.2} {:>8.1} {:>9.1} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.0} {:>9.0} {:>9.0}",
                "med",
                mode_name(mqtt),
                med(&|r| r.requests_per_cycle),
                "",
                med(&|r| r.cycles_per_unit),
                med(&|r| r.missed as f64),
                cpu,
                hwm,
                med(&|r| r.rss_mib),
                med(&|r| ms(r.jitter.value_at_quantile(0.5))),
                p99,
                med(&|r| ms(r.jitter.max())),
                med(&|r| ms(r.lateness.value_at_quantile(0.99))),
                med(&|r| ms(r.span.value_at_quantile(0.99))),
                med(&|r| r.stored_per_s),
                med(&|r| r.mqtt_msgs_per_s),
                med(&|r| r.mqtt_props_per_s),
            );
            if args.floor {
                let floor_cpu = med(&|r| r.floor.map_or(f64::NAN, |f| f.0));
                let ratio = med(&|r| r.floor.map_or(f64::NAN, |f| r.cpu_pct / f.0));
                println!(
                    " med {} ({}): cpu {floor_cpu:.2} %, peak RSS {:.1} MiB; agent / floor, median of the runs' ratios = {ratio:.2}",
                    floor_name(&args),
                    mode_name(mqtt),
                    med(&|r| r.floor.map_or(f64::NAN, |f| f.1)),
                );
            }
            let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
            println!(
                "targets (mqtt {}): cpu < {}% of one core: {} ({cpu:.2}%); peak RSS < {} MB: {} ({:.1} MB); jitter p99 < 5 ms: {} ({p99:.3} ms)",
                mode_name(mqtt),
                args.cpu_target_pct,
                verdict(cpu < args.cpu_target_pct),
                args.rss_target_mb,
                verdict(hwm * 1.048_576 < args.rss_target_mb),
                hwm * 1.048_576,
                verdict(p99 < 5.0),
            );
        }
        Ok::<_, anyhow::Error>(())
    })
}
