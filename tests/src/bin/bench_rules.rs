//! `edgesync-bench-rules`: the rule engine (`edgesync-rules`) alone, on one thread, in virtual
//! time. No agent, no I/O: the benchmark calls the engine the way the agent's runner does
//! (`handle_change`, then drain `poll_output`; `handle_timeout` when `poll_timeout` is due).
//!
//! - **filter** (`--part filter`): one rule over one device, `boiler` (properties `temp`,
//!   `pressure`, `running`, `rpm`), and `--events` changes of `boiler.temp` with values drawn so
//!   that `--pass-pct` of them satisfy `temp > 85`; after each change the outputs are drained
//!   (and dropped). Variants (`--variants`): `filter` is the rule (`SELECT temp FROM
//!   boiler WHERE temp > 85`), `project` the same filter with a projection of expressions;
//!   `none`, `all` and `untriggered` are there to see where the time goes (a filter nothing
//!   passes, a filter everything passes, and changes of a property no rule reads). Measured
//!   per run: wall time and the thread's own CPU time (`/proc/thread-self/schedstat`, ns), and
//!   the time it waited for a core (same file), since the machine may be shared.
//! - **windows** (`--part windows`): `--devices` x `--tags` float properties (`dev<k>.t<j>`) in
//!   the catalog and `--rules` tumbling-window rules; rule `k` reads `--tags-per-rule` tags of
//!   device `k mod devices` (tags `t<(k+i) mod tags>`), each with `avg(..)` and `max(..)`, in a
//!   `TumblingWindow(ss, --window-secs)`. `--rate` changes per second of virtual time, cycling
//!   through every tag in a fixed shuffled order (each tag changes `rate / (devices x tags)`
//!   times a second), virtual time advancing `1 / rate` per change; once per virtual
//!   millisecond the driver calls `poll_timeout` and `handle_timeout` when due. Measured over
//!   `--virtual-secs`: CPU time of the thread per second of virtual time (below 100 % the
//!   engine keeps up on one core; `close cpu` is the part spent in `handle_timeout`, where the
//!   windows close and their aggregates are computed), and memory per rule: VmRSS before loading the rules,
//!   after, and the highest VmRSS sampled once per virtual second (so with a full window
//!   held), minus the first, divided by the rules. Each run is a fresh child process (this
//!   binary with a hidden `--child`) so that freed memory of one run does not hide the next
//!   run's growth.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use clap::{Parser, ValueEnum};
use edgesync_rules::{Catalog, ColType, Engine, RuleDef, Value};
use edgesync_testkit::harness::{median, proc_cpu_seconds, proc_status_mib};

/// A virtual epoch, a multiple of every window size used (windows align to the epoch).
const EPOCH_MS: u64 = 1_700_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    /// Both parts.
    All,
    /// One filter rule: changes per second on one core.
    Filter,
    /// Many windowed rules over many tags: CPU share of one core and memory per rule.
    Windows,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Variant {
    /// `SELECT temp FROM boiler WHERE temp > 85` (the rule).
    Filter,
    /// The same filter (and `pressure < 10`) with a projection of expressions.
    Project,
    /// `WHERE temp > 1000`: evaluated on every change, nothing passes, no output.
    None,
    /// `WHERE temp > -1000`: every change produces an output.
    All,
    /// The `filter` rule, but every change is of `pressure`, which it does not read.
    Untriggered,
}

impl Variant {
    fn sql(self) -> &'static str {
        match self {
            Variant::Filter | Variant::Untriggered => "SELECT temp FROM boiler WHERE temp > 85",
            Variant::Project => {
                "SELECT temp, (temp - 32) * 5 / 9 AS celsius, round(temp * pressure, 1) AS load, \
                 CASE WHEN temp > 95 THEN \"high\" ELSE \"warm\" END AS band \
                 FROM boiler WHERE temp > 85 AND pressure < 10"
            }
            Variant::None => "SELECT temp FROM boiler WHERE temp > 1000",
            Variant::All => "SELECT temp FROM boiler WHERE temp > -1000",
        }
    }

    fn property(self) -> &'static str {
        match self {
            Variant::Untriggered => "pressure",
            _ => "temp",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Variant::Filter => "filter",
            Variant::Project => "project",
            Variant::None => "none",
            Variant::All => "all",
            Variant::Untriggered => "untriggered",
        }
    }
}

/// The rule engine on one thread: a filter rule's rate, and windowed rules' CPU and memory.
#[derive(Debug, Parser)]
#[command(about = "The rule engine on one thread, in virtual time")]
struct Args {
    /// Which part to run.
    #[arg(long, value_enum, default_value = "all")]
    part: Part,
    /// Runs per variant (medians are reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// filter: changes per run.
    #[arg(long, default_value_t = 5_000_000)]
    events: u64,
    /// filter: percentage of the changes that pass `temp > 85`.
    #[arg(long, default_value_t = 10.0)]
    pass_pct: f64,
    /// filter: variants, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "filter,project,none,all,untriggered"
    )]
    variants: Vec<Variant>,
    /// windows: rules.
    #[arg(long, default_value_t = 100)]
    rules: usize,
    /// windows: devices in the catalog.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// windows: float properties per device.
    #[arg(long, default_value_t = 100)]
    tags: usize,
    /// windows: tags each rule reads (one set of runs per value, comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,10")]
    tags_per_rule: Vec<usize>,
    /// windows: changes per second of virtual time.
    #[arg(long, default_value_t = 100_000)]
    rate: u64,
    /// windows: seconds of virtual time per run.
    #[arg(long, default_value_t = 60)]
    virtual_secs: u64,
    /// windows: tumbling window size in seconds.
    #[arg(long, default_value_t = 10)]
    window_secs: u64,
    /// Seed of the values and of the tags' order.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Internal: run one windows run in this process and print its result line.
    #[arg(long, hide = true)]
    child: bool,
}

/// CPU time of this thread and time it waited for a core, in seconds
/// (`/proc/thread-self/schedstat`: ns on CPU, ns waiting on a run queue). Falls back to the
/// process's CPU time (10 ms ticks) and NaN when the file is missing.
fn thread_times() -> (f64, f64) {
    let parsed = std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| {
            let mut f = s.split_whitespace().map(str::parse::<u64>);
            match (f.next(), f.next()) {
                (Some(Ok(run)), Some(Ok(wait))) => Some((run as f64 / 1e9, wait as f64 / 1e9)),
                _ => None,
            }
        });
    parsed.unwrap_or_else(|| {
        (
            proc_cpu_seconds(std::process::id()).unwrap_or(f64::NAN),
            f64::NAN,
        )
    })
}

fn rss_mib() -> f64 {
    proc_status_mib(std::process::id(), "VmRSS:").unwrap_or(f64::NAN)
}

fn drain(e: &mut Engine) -> u64 {
    let mut n = 0;
    while let Some(o) = e.poll_output() {
        black_box(o);
        n += 1;
    }
    n
}

fn rule(id: &str, sql: &str) -> RuleDef {
    RuleDef {
        id: id.to_owned(),
        sql: sql.to_owned(),
        actions: Vec::new(),
        alarm: None,
        heartbeat_ms: None,
        ignored_options: Vec::new(),
    }
}

fn load(e: &mut Engine, defs: Vec<RuleDef>) -> anyhow::Result<()> {
    e.load(defs).map_err(|errs| {
        let msgs: Vec<String> = errs.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("rules refused: {}", msgs.join("; "))
    })
}

// --- filter -----------------------------------------------------------------------------------

struct FilterRun {
    wall: f64,
    cpu: f64,
    wait: f64,
    outputs: u64,
}

fn filter_run(args: &Args, variant: Variant, values: &[f64]) -> anyhow::Result<FilterRun> {
    let mut catalog = Catalog::default();
    catalog.add_device(
        "boiler",
        vec![
            ("temp".into(), ColType::Float),
            ("pressure".into(), ColType::Float),
            ("running".into(), ColType::Bool),
            ("rpm".into(), ColType::Int),
        ],
    );
    let mut e = Engine::new(catalog);
    load(&mut e, vec![rule("bench", variant.sql())])?;
    // The other columns hold a value (the projection reads `pressure`).
    e.handle_change(EPOCH_MS, "boiler", "pressure", Value::Float(5.0));
    e.handle_change(EPOCH_MS, "boiler", "running", Value::Bool(true));
    e.handle_change(EPOCH_MS, "boiler", "rpm", Value::Int(1_450));
    drain(&mut e);
    let prop = variant.property();
    let mask = values.len() - 1;
    let (cpu0, wait0) = thread_times();
    let t0 = Instant::now();
    let mut outputs = 0;
    for i in 0..args.events {
        let v = values[i as usize & mask];
        // One change per virtual µs (time matters to no filter rule).
        e.handle_change(EPOCH_MS + i / 1_000, "boiler", prop, Value::Float(v));
        outputs += drain(&mut e);
    }
    let wall = t0.elapsed().as_secs_f64();
    let (cpu1, wait1) = thread_times();
    black_box(&e);
    Ok(FilterRun {
        wall,
        cpu: cpu1 - cpu0,
        wait: wait1 - wait0,
        outputs,
    })
}

fn part_filter(args: &Args) -> anyhow::Result<()> {
    ensure!(
        args.events > 0 && args.runs > 0,
        "--events and --runs must be > 0"
    );
    // 2^20 values, `pass_pct` % of them in (85, 100], the rest in [20, 85].
    let mut rng = fastrand::Rng::with_seed(args.seed);
    let values: Vec<f64> = (0..1 << 20)
        .map(|_| {
            if rng.f64() * 100.0 < args.pass_pct {
                85.0 + 1e-6 + rng.f64() * 15.0
            } else {
                20.0 + rng.f64() * 65.0
            }
        })
        .collect();
    println!(
        "== filter: one rule, {} changes per run on one thread, outputs drained after each ({:.1} % of the values pass temp > 85) ==",
        args.events, args.pass_pct
    );
    let mut summary = Vec::new();
    for &variant in &args.variants {
        println!(
            "-- {}: `{}`, changes of boiler.{}",
            variant.name(),
            variant.sql(),
            variant.property()
        );
        println!(
            " run   wall s    cpu s  waited s   changes/s (wall)   changes/s (cpu)  ns/change (cpu)   outputs"
        );
        let (mut walls, mut cpus, mut waits, mut rw, mut rc, mut ns, mut outs) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        for run in 1..=args.runs {
            let r = filter_run(args, variant, &values)?;
            let n = args.events as f64;
            println!(
                "{run:>4} {:>8.3} {:>8.3} {:>9.3} {:>18.0} {:>17.0} {:>16.1} {:>9}",
                r.wall,
                r.cpu,
                r.wait,
                n / r.wall,
                n / r.cpu,
                r.cpu * 1e9 / n,
                r.outputs
            );
            walls.push(r.wall);
            cpus.push(r.cpu);
            waits.push(r.wait);
            rw.push(n / r.wall);
            rc.push(n / r.cpu);
            ns.push(r.cpu * 1e9 / n);
            outs.push(r.outputs as f64);
        }
        let (mw, mc) = (median(rw), median(rc));
        let met = |x: f64| if x >= 1e6 { "met" } else { "MISSED" };
        println!(
            " med {:>8.3} {:>8.3} {:>9.3} {:>18.0} {:>17.0} {:>16.1} {:>9.0}   (target 1000000/s: {} by wall, {} by cpu)",
            median(walls),
            median(cpus),
            median(waits),
            mw,
            mc,
            median(ns.clone()),
            median(outs),
            met(mw),
            met(mc),
        );
        summary.push((variant, mw, mc, median(ns)));
    }
    println!("filter summary (medians of {} runs):", args.runs);
    for (v, mw, mc, ns) in summary {
        println!(
            "  {:<12} {:>10.0} changes/s wall  {:>10.0} changes/s cpu  {:>7.1} ns/change",
            v.name(),
            mw,
            mc,
            ns
        );
    }
    Ok(())
}

// --- windows ----------------------------------------------------------------------------------

/// The result of one windows run (a child process).
#[derive(Debug, Default)]
struct WindowsRun {
    cpu: f64,
    /// CPU time inside `handle_timeout` (the windows closing: aggregates and outputs).
    close_cpu: f64,
    wall: f64,
    wait: f64,
    rss_base: f64,
    rss_loaded: f64,
    rss_max: f64,
    rss_end: f64,
    hwm: f64,
    outputs: f64,
    evaluations: f64,
    events: f64,
}

const FIELDS: [&str; 12] = [
    "cpu",
    "close_cpu",
    "wall",
    "wait",
    "rss_base",
    "rss_loaded",
    "rss_max",
    "rss_end",
    "hwm",
    "outputs",
    "evaluations",
    "events",
];

impl WindowsRun {
    fn values(&self) -> [f64; 12] {
        [
            self.cpu,
            self.close_cpu,
            self.wall,
            self.wait,
            self.rss_base,
            self.rss_loaded,
            self.rss_max,
            self.rss_end,
            self.hwm,
            self.outputs,
            self.evaluations,
            self.events,
        ]
    }

    fn line(&self) -> String {
        let parts: Vec<String> = FIELDS
            .iter()
            .zip(self.values())
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("child-result {}", parts.join(" "))
    }

    fn parse(text: &str) -> anyhow::Result<WindowsRun> {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("child-result "))
            .context("no child-result line")?;
        let kv: HashMap<&str, f64> = line
            .split_whitespace()
            .filter_map(|p| p.split_once('='))
            .filter_map(|(k, v)| v.parse().ok().map(|v| (k, v)))
            .collect();
        let get = |k: &str| kv.get(k).copied().with_context(|| format!("no {k}"));
        Ok(WindowsRun {
            cpu: get("cpu")?,
            close_cpu: get("close_cpu")?,
            wall: get("wall")?,
            wait: get("wait")?,
            rss_base: get("rss_base")?,
            rss_loaded: get("rss_loaded")?,
            rss_max: get("rss_max")?,
            rss_end: get("rss_end")?,
            hwm: get("hwm")?,
            outputs: get("outputs")?,
            evaluations: get("evaluations")?,
            events: get("events")?,
        })
    }
}

fn window_sql(args: &Args, k: usize, per_rule: usize) -> String {
    let cols: Vec<String> = (0..per_rule)
        .map(|i| {
            let j = (k + i) % args.tags;
            format!("avg(t{j}) AS avg_t{j}, max(t{j}) AS max_t{j}")
        })
        .collect();
    format!(
        "SELECT {} FROM dev{} GROUP BY TumblingWindow(ss, {})",
        cols.join(", "),
        k % args.devices,
        args.window_secs
    )
}

/// One windows run, in this process.
fn windows_child(args: &Args) -> anyhow::Result<()> {
    let per_rule = *args.tags_per_rule.first().context("--tags-per-rule")?;
    ensure!(
        per_rule >= 1 && per_rule <= args.tags,
        "--tags-per-rule must be in 1..=--tags"
    );
    ensure!(
        args.rate > 0 && args.devices > 0,
        "--rate and --devices > 0"
    );
    let mut catalog = Catalog::default();
    let tag_names: Vec<String> = (0..args.tags).map(|j| format!("t{j}")).collect();
    let dev_names: Vec<String> = (0..args.devices).map(|k| format!("dev{k}")).collect();
    for d in &dev_names {
        catalog.add_device(
            d,
            tag_names
                .iter()
                .map(|t| (t.clone(), ColType::Float))
                .collect(),
        );
    }
    let mut e = Engine::new(catalog);
    // Every tag once per cycle, in a fixed shuffled order.
    let mut rng = fastrand::Rng::with_seed(args.seed);
    let mut order: Vec<(u32, u32)> = (0..args.devices)
        .flat_map(|d| (0..args.tags).map(move |t| (d as u32, t as u32)))
        .collect();
    rng.shuffle(&mut order);
    let values: Vec<f64> = (0..1 << 16).map(|_| rng.f64() * 100.0).collect();
    let vmask = values.len() - 1;
    let defs: Vec<RuleDef> = (0..args.rules)
        .map(|k| rule(&format!("win{k}"), &window_sql(args, k, per_rule)))
        .collect();
    let rss_base = rss_mib();
    load(&mut e, defs)?;
    let rss_loaded = rss_mib();

    let total = args.rate * args.virtual_secs;
    let end_ms = EPOCH_MS + args.virtual_secs * 1_000;
    let mut rss_max = rss_loaded;
    let mut outputs = 0u64;
    let mut close_cpu = 0.0;
    let mut last_ms = u64::MAX;
    let (cpu0, wait0) = thread_times();
    let t0 = Instant::now();
    for i in 0..total {
        let now = EPOCH_MS + i * 1_000 / args.rate;
        if now != last_ms {
            last_ms = now;
            if (now - EPOCH_MS).is_multiple_of(1_000) {
                rss_max = rss_max.max(rss_mib());
            }
            while let Some(t) = e.poll_timeout().filter(|t| *t <= now) {
                let c0 = thread_times().0;
                e.handle_timeout(t);
                outputs += drain(&mut e);
                close_cpu += thread_times().0 - c0;
            }
        }
        let (d, t) = order[i as usize % order.len()];
        e.handle_change(
            now,
            &dev_names[d as usize],
            &tag_names[t as usize],
            Value::Float(values[i as usize & vmask]),
        );
        outputs += drain(&mut e);
    }
    rss_max = rss_max.max(rss_mib());
    // The last window closes at the end of virtual time.
    while let Some(t) = e.poll_timeout().filter(|t| *t <= end_ms) {
        let c0 = thread_times().0;
        e.handle_timeout(t);
        outputs += drain(&mut e);
        close_cpu += thread_times().0 - c0;
    }
    let wall = t0.elapsed().as_secs_f64();
    let (cpu1, wait1) = thread_times();
    let evaluations: u64 = e.rules().map(|(_, s)| s.events_in).sum();
    let errors: u64 = e.rules().map(|(_, s)| s.errors).sum();
    ensure!(errors == 0, "{errors} rule evaluations failed");
    let run = WindowsRun {
        cpu: cpu1 - cpu0,
        close_cpu,
        wall,
        wait: wait1 - wait0,
        rss_base,
        rss_loaded,
        rss_max,
        rss_end: rss_mib(),
        hwm: proc_status_mib(std::process::id(), "VmHWM:").unwrap_or(f64::NAN),
        outputs: outputs as f64,
        evaluations: evaluations as f64,
        events: total as f64,
    };
    println!("{}", run.line());
    Ok(())
}

fn part_windows(args: &Args) -> anyhow::Result<()> {
    ensure!(args.runs > 0, "--runs must be > 0");
    let exe = std::env::current_exe().context("current_exe")?;
    let vs = args.virtual_secs as f64;
    let rules = args.rules as f64;
    println!(
        "== windows: {} rules, TumblingWindow(ss, {}), over {} devices x {} float tags; {} changes/s of virtual time for {} s; one thread; each run a fresh process ==",
        args.rules, args.window_secs, args.devices, args.tags, args.rate, args.virtual_secs
    );
    let mut summary = Vec::new();
    for &per_rule in &args.tags_per_rule {
        println!(
            "-- {per_rule} tag(s) per rule (avg and max of each), e.g. `{}`",
            window_sql(args, 0, per_rule.min(2))
                + if per_rule > 2 {
                    "  (2 of them shown)"
                } else {
                    ""
                }
        );
        println!(
            " run    cpu s   wall s  waited s  close cpu s   cpu % of a core   rows in/s   outputs   RSS base   loaded      max      end    VmHWM  KiB/rule load  KiB/rule max"
        );
        let mut runs = Vec::new();
        for run in 1..=args.runs {
            let out = std::process::Command::new(&exe)
                .args(["--part", "windows", "--child"])
                .args(["--rules", &args.rules.to_string()])
                .args(["--devices", &args.devices.to_string()])
                .args(["--tags", &args.tags.to_string()])
                .args(["--tags-per-rule", &per_rule.to_string()])
                .args(["--rate", &args.rate.to_string()])
                .args(["--virtual-secs", &args.virtual_secs.to_string()])
                .args(["--window-secs", &args.window_secs.to_string()])
                .args(["--seed", &args.seed.to_string()])
                .output()
                .context("spawning the child run")?;
            if !out.status.success() {
                bail!(
                    "child run failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let r = WindowsRun::parse(&String::from_utf8_lossy(&out.stdout))?;
            let load_kib = (r.rss_loaded - r.rss_base) * 1024.0 / rules;
            let max_kib = (r.rss_max - r.rss_base) * 1024.0 / rules;
            println!(
                "{run:>4} {:>8.3} {:>8.3} {:>9.3} {:>12.3} {:>17.2} {:>11.0} {:>9.0} {:>10.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>14.1} {:>13.1}",
                r.cpu,
                r.wall,
                r.wait,
                r.close_cpu,
                r.cpu / vs * 100.0,
                r.evaluations / vs,
                r.outputs,
                r.rss_base,
                r.rss_loaded,
                r.rss_max,
                r.rss_end,
                r.hwm,
                load_kib,
                max_kib
            );
            runs.push(r);
        }
        let med = |f: &dyn Fn(&WindowsRun) -> f64| median(runs.iter().map(f).collect());
        let cpu_pct = med(&|r| r.cpu / vs * 100.0);
        let load_kib = med(&|r| (r.rss_loaded - r.rss_base) * 1024.0 / rules);
        let max_kib = med(&|r| (r.rss_max - r.rss_base) * 1024.0 / rules);
        println!(
            " med {:>8.3} {:>8.3} {:>9.3} {:>12.3} {:>17.2} {:>11.0} {:>9.0} {:>10.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>14.1} {:>13.1}   (keeps up on one core: {})",
            med(&|r| r.cpu),
            med(&|r| r.wall),
            med(&|r| r.wait),
            med(&|r| r.close_cpu),
            cpu_pct,
            med(&|r| r.evaluations / vs),
            med(&|r| r.outputs),
            med(&|r| r.rss_base),
            med(&|r| r.rss_loaded),
            med(&|r| r.rss_max),
            med(&|r| r.rss_end),
            med(&|r| r.hwm),
            load_kib,
            max_kib,
            if cpu_pct < 100.0 { "yes" } else { "NO" }
        );
        summary.push((per_rule, cpu_pct, load_kib, max_kib));
    }
    println!(
        "windows summary (medians of {} runs; {} changes/s of virtual time):",
        args.runs, args.rate
    );
    for (per_rule, cpu, load_kib, max_kib) in summary {
        println!(
            "  {per_rule:>3} tag(s)/rule: CPU {cpu:>6.2} % of one core; memory per rule {load_kib:>8.1} KiB loaded, {max_kib:>8.1} KiB with a full window"
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.child {
        return windows_child(&args);
    }
    println!(
        "edgesync-bench-rules: {} run(s) per variant; load average {}",
        args.runs,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    if matches!(args.part, Part::All | Part::Filter) {
        part_filter(&args)?;
    }
    if matches!(args.part, Part::All | Part::Windows) {
        part_windows(&args)?;
    }
    println!(
        "load average at the end {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}
