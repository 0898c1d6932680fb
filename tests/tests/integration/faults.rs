//! Network faults between a real agent and a real hub: the agent's `[hub] address` points at
//! a [`UdpProxy`] in front of the hub's QUIC listener, which drops, delays, duplicates and
//! reorders datagrams, or black-holes the path while both processes keep running.
//!
//! Every test ends with the same audit: the PLC is frozen, the hub's twin must equal the
//! simulator's registers, and after both processes stopped, the hub's store must hold every
//! record the agent's outbox ever committed (sequence numbers `1..=next_seq - 1`), each exactly
//! once, in order (per property, the counter values only grow).
//!
//! The detection bounds derive from the `[hub]` settings [`harness::agent_toml`] writes,
//! parsed from the config the agent really got: QUIC takes the smaller of both peers'
//! `max_idle_timeout` (the agent's `idle_timeout_ms`, the hub's 10 s), so both ends of a
//! silent path time out `idle_timeout_ms` after the last datagram they received (plus at most
//! one keep-alive interval: an endpoint's idle timer also restarts when it first sends after
//! receiving). After the path heals, the agent needs at most one `connect_timeout_ms` (an
//! attempt started in the outage) and one `backoff_max_ms` to be back.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use edgesync_cloud::store::HubStore;
use edgesync_edge::store::{AgentStore, Fsync};
use edgesync_protocol::{NodeId, Value};
use edgesync_testkit::harness::{self, Api, Pki, Proc, SimDevice, TempDir};
use edgesync_testkit::sim::{Script, ScriptId, SimConfig, SimHandle, Table};
use edgesync_testkit::udp_proxy::{Counters, Direction, Faults, ProxyHandle, UdpProxy};
use tokio::time::Instant;

use crate::support::free_tcp_port;

const TD: &str = "example.org";
const NODE: &str = "gw-1";
const UNITS: [u8; 2] = [1, 2];
/// Counting holding registers per unit (each one record per 50 ms tick).
const COUNTERS: u16 = 4;
/// Scheduling slack added to every bound: two shared cores, other builds running.
const SLACK: Duration = Duration::from_millis(2500);

/// The agent's `[hub]` timing, as written into its config.
#[derive(Debug, Clone, Copy)]
struct Timing {
    keepalive: Duration,
    idle: Duration,
    connect_timeout: Duration,
    backoff_max: Duration,
}

impl Timing {
    /// Reads the `[hub]` keys of `agent.toml` (the agent's defaults where a key is absent).
    fn from_config(text: &str) -> anyhow::Result<Timing> {
        // `key = <integer>` lines of the [hub] table (the harness writes it flat).
        let mut hub = BTreeMap::new();
        let mut in_hub = false;
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                in_hub = line == "[hub]";
            } else if in_hub && let Some((k, v)) = line.split_once('=') {
                hub.insert(k.trim().to_owned(), v.trim().to_owned());
            }
        }
        ensure!(
            hub.contains_key("address"),
            "no [hub] with an address in:\n{text}"
        );
        let ms = |key: &str, default: u64| -> anyhow::Result<Duration> {
            Ok(Duration::from_millis(match hub.get(key) {
                Some(v) => v.parse().with_context(|| format!("{key} = {v}"))?,
                None => default,
            }))
        };
        // Defaults: edge/src/config/mod.rs `check_hub`.
        Ok(Timing {
            keepalive: ms("keepalive_ms", 2000)?,
            idle: ms("idle_timeout_ms", 10_000)?,
            connect_timeout: ms("connect_timeout_ms", 5000)?,
            backoff_max: ms("backoff_max_ms", 30_000)?,
        })
    }

    /// How long after a path goes silent an end may take to declare it dead.
    fn detect(&self) -> Duration {
        self.idle + self.keepalive + SLACK
    }

    /// How long after the path heals the agent may take to be connected again.
    fn reconnect(&self) -> Duration {
        self.connect_timeout + self.backoff_max + SLACK
    }
}

struct Rig {
    tmp: TempDir,
    sim: SimHandle,
    scripts: Vec<ScriptId>,
    hub: Option<Proc>,
    agent: Option<Proc>,
    proxy: UdpProxy,
    api: Api,
    /// The agent's Prometheus endpoint.
    agent_metrics: String,
    agent_dir: PathBuf,
    timing: Timing,
    http: reqwest::Client,
}

async fn rig(tag: &str) -> anyhow::Result<Rig> {
    let tmp = TempDir::new(tag)?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let sim = SimHandle::start("127.0.0.1:0".parse()?, SimConfig::with_units(UNITS)).await?;
    let mut scripts = vec![];
    for unit in UNITS {
        for i in 0..COUNTERS {
            scripts.push(sim.add_script(
                unit,
                Table::HoldingRegisters,
                i,
                Script::Counter { step: 1 },
                Duration::from_millis(50),
            )?);
        }
    }
    let (hub, tunnel, http) =
        harness::start_hub(tmp.path(), &pki, "127.0.0.1:0", "127.0.0.1:0").await?;
    let proxy = UdpProxy::start(tunnel.parse()?).await?;
    let agent_dir = tmp.path().join(NODE);
    std::fs::create_dir_all(&agent_dir)?;
    let (cert, key) = harness::node_svid(&pki, &agent_dir, TD, NODE)?;
    let devices: Vec<SimDevice> = UNITS
        .iter()
        .map(|u| SimDevice {
            id: format!("plc-{u}"),
            endpoint: sim.local_addr().to_string(),
            unit: *u,
            counters: COUNTERS,
            poll_ms: 50,
        })
        .collect();
    // Build first, so the metrics port is taken moments after it is chosen.
    let agent_bin = harness::bin("edgesync-agent")?;
    let metrics_port = free_tcp_port()?;
    let cfg = harness::agent_toml(
        &agent_dir,
        &proxy.local_addr().to_string(),
        TD,
        &cert,
        &key,
        &pki.bundle,
        &devices,
        &format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"),
    )?;
    let timing = Timing::from_config(&std::fs::read_to_string(&cfg)?)?;
    let agent = Proc::spawn(
        &agent_bin,
        &["run", "--config", &cfg.display().to_string()],
        &agent_dir.join("agent.log"),
        None,
    )
    .await?;
    Ok(Rig {
        tmp,
        sim,
        scripts,
        hub: Some(hub),
        agent: Some(agent),
        proxy,
        api: Api::new(&http),
        agent_metrics: format!("http://127.0.0.1:{metrics_port}/metrics"),
        agent_dir,
        timing,
        http: reqwest::Client::new(),
    })
}

impl Rig {
    fn logs(&self) -> String {
        let a = self.agent.as_ref().map(Proc::log_text).unwrap_or_default();
        let h = self.hub.as_ref().map(Proc::log_text).unwrap_or_default();
        format!("--- agent log ---\n{a}\n--- hub log ---\n{h}")
    }

    fn agent_log(&self) -> String {
        self.agent.as_ref().map(Proc::log_text).unwrap_or_default()
    }

    /// How many times the agent logged `what` so far.
    fn agent_logged(&self, what: &str) -> usize {
        self.agent_log().matches(what).count()
    }

    /// The sum of the agent's metric `name` (every label set), if it serves it.
    async fn agent_metric(&self, name: &str) -> Option<f64> {
        let text = self
            .http
            .get(&self.agent_metrics)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        metric(&text, name)
    }

    /// The agent says its uplink is up (`Some(true)`) or down (`Some(false)`).
    async fn agent_connected(&self) -> Option<bool> {
        self.agent_metric("edgesync_uplink_connected")
            .await
            .map(|v| v > 0.5)
    }

    /// The hub's node resource of the agent.
    async fn node(&self) -> anyhow::Result<serde_json::Value> {
        let (status, v) = self.api.get(&format!("/api/v1/nodes/{NODE}")).await?;
        ensure!(status == 200, "GET node: {status} {v}");
        Ok(v)
    }

    async fn hub_connected(&self) -> Option<bool> {
        self.node().await.ok()?["connected"].as_bool()
    }

    async fn hub_seq(&self) -> anyhow::Result<u64> {
        self.node().await?["uplink_seq"]
            .as_u64()
            .context("no uplink_seq")
    }

    /// Waits until both ends say the agent is connected and the hub shows values.
    async fn connected(&self, within: Duration) -> anyhow::Result<()> {
        let t0 = Instant::now();
        let ok = poll_until(t0, within, || async move {
            self.agent_connected().await == Some(true)
                && self.hub_connected().await == Some(true)
                && self
                    .api
                    .reported_u64(NODE, "plc-1", "c0")
                    .await
                    .ok()
                    .flatten()
                    .is_some()
        })
        .await;
        if ok.is_none() {
            bail!("not connected within {within:?}\n{}", self.logs());
        }
        Ok(())
    }

    /// Stops the PLC's counters.
    fn freeze(&self) {
        for id in &self.scripts {
            self.sim.remove_script(*id);
        }
    }

    /// Waits until the hub's twin of every counter equals what the simulator holds.
    async fn converged(&self, within: Duration) -> anyhow::Result<()> {
        let sim = self.sim.clone();
        self.api
            .wait_for(within, move |api| {
                let sim = sim.clone();
                async move {
                    for unit in UNITS {
                        let want = sim.holding(unit, 0, COUNTERS as usize)?;
                        for (i, w) in want.iter().enumerate() {
                            let got = api
                                .reported_u64(NODE, &format!("plc-{unit}"), &format!("c{i}"))
                                .await?;
                            if got != Some(u64::from(*w)) {
                                return Ok(None);
                            }
                        }
                    }
                    Ok(Some(()))
                }
            })
            .await
            .map_err(|e| anyhow::anyhow!("twin != simulator: {e}\n{}", self.logs()))
    }
}

/// The sum of metric `name` in Prometheus text (every label set).
fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for l in text.lines() {
        let Some(rest) = l.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(v) = l
            .split_whitespace()
            .last()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Polls `check` every 25 ms until it holds; how long after `t0` that was, or `None` when
/// `within` (after `t0`) passed.
async fn poll_until<F, Fut>(t0: Instant, within: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    loop {
        if check().await {
            return Some(t0.elapsed());
        }
        if t0.elapsed() >= within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn show(d: Option<Duration>) -> String {
    d.map_or_else(
        || "never".to_owned(),
        |d| format!("{:.2} s", d.as_secs_f64()),
    )
}

/// What the audit found.
#[derive(Debug)]
struct Audit {
    /// Records in the hub's store (= its stored sequence number).
    stored: u64,
    /// The hub's count of records it received again and skipped.
    hub_duplicates: f64,
}

/// Freezes the PLC, waits for the twin to equal it and the outbox to drain, stops both
/// processes and audits the hub's store against the agent's outbox.
async fn finish_and_audit(r: &mut Rig) -> anyhow::Result<Audit> {
    r.freeze();
    r.converged(Duration::from_secs(30)).await?;
    // The outbox drained: the hub's stored sequence number stays put, the agent's backlog is 0.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = (r.hub_seq().await?, Instant::now());
    loop {
        let seq = r.hub_seq().await?;
        if seq != last.0 {
            last = (seq, Instant::now());
        } else if last.1.elapsed() >= Duration::from_secs(1)
            && r.agent_metric("edgesync_outbox_backlog_records").await == Some(0.0)
        {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the outbox never drained (hub at {})\n{}",
            last.0,
            r.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let api_seq = last.0;
    let hub_duplicates = metric(
        &r.api.metrics().await?,
        "edgesync_hub_duplicate_records_total",
    )
    .unwrap_or(0.0);
    if let Some(a) = r.agent.take() {
        let log = a.log.clone();
        ensure!(
            a.terminate().await?,
            "agent exits 0 on SIGTERM\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    if let Some(h) = r.hub.take() {
        ensure!(h.terminate().await?, "hub exits 0 on SIGTERM");
    }
    let (next, acked) = {
        let st = AgentStore::open(
            &r.agent_dir.join("data").join("agent.sled"),
            1 << 20,
            u64::MAX,
            Fsync::Never,
        )?;
        (st.next_seq(), st.acked())
    };
    let hub = HubStore::open(&r.tmp.path().join("hubdata").join("hub.sled"), 1 << 20)?;
    let stored = check_history(&hub, NODE)?;
    ensure!(
        stored == next - 1 && acked == next - 1,
        "the agent committed records 1..={} (acked {acked}), the hub stored {stored}",
        next - 1
    );
    ensure!(
        api_seq == stored,
        "the API said uplink_seq {api_seq}, the store holds {stored}"
    );
    Ok(Audit {
        stored,
        hub_duplicates,
    })
}

/// Checks the hub's history of `node`: sequence numbers dense from 1, each stored once, and
/// per property strictly increasing counter values among good reads (nothing replayed, lost
/// in the middle or reordered). Returns the stored sequence number.
fn check_history(store: &HubStore, node: &str) -> anyhow::Result<u64> {
    let node = NodeId::new(node)?;
    let stored = store.stored_seq(&node)?;
    let recs = store.records(&node, 1)?;
    ensure!(
        recs.len() as u64 == stored,
        "{} records stored for sequence numbers 1..={stored}",
        recs.len()
    );
    for (i, (seq, _)) in recs.iter().enumerate() {
        ensure!(*seq == i as u64 + 1, "record {i} has sequence number {seq}");
    }
    let mut last: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (seq, s) in &recs {
        if !s.quality.is_good() {
            continue;
        }
        let v = match &s.value {
            Some(Value::UInt(u)) => *u,
            Some(Value::Int(i)) => u64::try_from(*i)?,
            _ => continue,
        };
        let key = (s.device.to_string(), s.property.to_string());
        if let Some(prev) = last.get(&key) {
            ensure!(
                v > *prev,
                "record {seq}: {key:?} went from {prev} to {v} (duplicated or reordered)"
            );
        }
        last.insert(key, v);
    }
    Ok(stored)
}

fn both(h: &ProxyHandle) -> (Counters, Counters) {
    (
        h.counters(Direction::ToUpstream),
        h.counters(Direction::ToClient),
    )
}

/// 10 % loss both ways, 0-20 ms jitter, 5 % duplicates, 5 % reordered, for 10 s while the
/// counters count: every record arrives exactly once and in order, and the twin converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_path_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let mut r = rig("faults-lossy").await?;
    r.connected(Duration::from_secs(30)).await?;
    let h = r.proxy.handle();
    h.reset_counters();
    h.set_faults(Faults {
        drop: 0.10,
        jitter: Duration::from_millis(20),
        duplicate: 0.05,
        reorder: 0.05,
        reorder_hold: Duration::from_millis(20),
        ..Faults::default()
    });
    let downs = r.agent_logged("uplink down");
    let seq0 = r.hub_seq().await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let seq1 = r.hub_seq().await?;
    ensure!(
        seq1 > seq0 + 500,
        "records flowed on the lossy path: hub uplink_seq {seq0} -> {seq1} in 10 s\n{}",
        r.logs()
    );
    let lost = r.agent_logged("uplink down") - downs;
    ensure!(
        lost == 0,
        "the connection survived 10 % loss (keepalive {:?}, idle {:?}): {lost} disconnects\n{}",
        r.timing.keepalive,
        r.timing.idle,
        r.logs()
    );
    // Still lossy while the hub catches up and converges.
    let audit = finish_and_audit(&mut r).await?;
    let (up, down) = both(&h);
    eprintln!(
        "lossy path: {} records stored once each, hub skipped {} duplicate records; \
         agent->hub {up:?}; hub->agent {down:?}",
        audit.stored, audit.hub_duplicates
    );
    for (name, c) in [("agent->hub", up), ("hub->agent", down)] {
        ensure!(
            c.dropped > 0 && c.duplicated > 0 && c.reordered > 0,
            "{name}: the proxy applied every fault: {c:?}"
        );
    }
    ensure!(
        audit.stored > 1000,
        "a meaningful history ({})",
        audit.stored
    );
    Ok(())
}

/// Measured times of one outage.
#[derive(Debug)]
struct Outage {
    agent_down: Option<Duration>,
    hub_down: Option<Duration>,
    agent_up: Option<Duration>,
    hub_up: Option<Duration>,
}

/// Black-holes the given directions while connected, measures when each end notices, keeps
/// the outage (records pile up in the outbox), lifts it, measures the reconnect, and audits.
/// The bounds: `agent_bound` and `hub_bound` after the black-hole started, `timing.reconnect()`
/// after it was lifted.
async fn outage(
    tag: &str,
    to_upstream: bool,
    to_client: bool,
    bounds: impl Fn(&Timing) -> (Duration, Duration),
) -> anyhow::Result<()> {
    let mut rig = rig(tag).await?;
    let r = &rig;
    r.connected(Duration::from_secs(30)).await?;
    let h = r.proxy.handle();
    let (agent_bound, hub_bound) = bounds(&r.timing);
    // Some history before the outage.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let downs = r.agent_logged("uplink down");
    let ups = r.agent_logged("uplink established");
    let t0 = Instant::now();
    h.set_black_hole(to_upstream, to_client);
    let hard = agent_bound.max(hub_bound) + Duration::from_secs(10);
    let (agent_down, hub_down) = tokio::join!(
        poll_until(t0, hard, || async move {
            r.agent_logged("uplink down") > downs && r.agent_connected().await == Some(false)
        }),
        poll_until(t0, hard, || async move {
            r.hub_connected().await == Some(false)
        }),
    );
    let mut m = Outage {
        agent_down,
        hub_down,
        agent_up: None,
        hub_up: None,
    };
    eprintln!(
        "{tag}: black-hole to_upstream={to_upstream} to_client={to_client}: agent reported the \
         uplink down after {} (bound {:.1} s), the hub showed the node disconnected after {} \
         (bound {:.1} s); {:?}",
        show(m.agent_down),
        agent_bound.as_secs_f64(),
        show(m.hub_down),
        hub_bound.as_secs_f64(),
        r.timing,
    );
    let detected = m.agent_down.is_some_and(|d| d <= agent_bound)
        && m.hub_down.is_some_and(|d| d <= hub_bound);
    ensure!(
        detected,
        "half-open path not detected in time: {m:?} (agent bound {agent_bound:?}, hub bound \
         {hub_bound:?})\n{}",
        r.logs()
    );
    // The outage goes on; the agent keeps committing into its outbox.
    let seq_out = r.hub_seq().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let committed = r
        .agent_metric("edgesync_outbox_records_accepted_total")
        .await
        .unwrap_or(0.0) as u64;
    ensure!(
        committed > seq_out + 200,
        "the agent committed records during the outage: {committed} accepted, hub at {seq_out}"
    );
    // The agent always has something to send (records, keep-alives); the hub answers only
    // what it receives, so with both ways cut it may have nothing to send at all.
    let (up, down) = both(&h);
    let swallowed = if to_upstream {
        up.black_holed > 0
    } else {
        down.black_holed > 0
    };
    ensure!(
        swallowed,
        "the proxy black-holed traffic: agent->hub {up:?}, hub->agent {down:?}"
    );
    // Heal.
    let downs_in_outage = r.agent_logged("uplink down") - downs;
    let t1 = Instant::now();
    h.heal();
    let bound = r.timing.reconnect();
    let (agent_up, hub_up) = tokio::join!(
        poll_until(t1, bound + Duration::from_secs(10), || async move {
            r.agent_logged("uplink established") > ups && r.agent_connected().await == Some(true)
        }),
        poll_until(t1, bound + Duration::from_secs(10), || async move {
            r.hub_connected().await == Some(true)
        }),
    );
    m.agent_up = agent_up;
    m.hub_up = hub_up;
    eprintln!(
        "{tag}: healed: agent connected again after {}, hub showed the node connected after {} \
         (bound {:.1} s); the agent logged 'uplink down' {downs_in_outage} times during the outage",
        show(m.agent_up),
        show(m.hub_up),
        bound.as_secs_f64()
    );
    ensure!(
        m.agent_up.is_some_and(|d| d <= bound) && m.hub_up.is_some_and(|d| d <= bound),
        "no reconnect in time: {m:?} (bound {bound:?})\n{}",
        r.logs()
    );
    // Records from the outage arrive: the hub catches up past what was committed in it.
    let caught_up = poll_until(Instant::now(), Duration::from_secs(20), || async move {
        r.hub_seq().await.is_ok_and(|s| s >= committed)
    })
    .await;
    ensure!(
        caught_up.is_some(),
        "the hub never got the outage's records (committed {committed}, hub at {})\n{}",
        r.hub_seq().await.unwrap_or(0),
        r.logs()
    );
    let audit = finish_and_audit(&mut rig).await?;
    eprintln!(
        "{tag}: {} records stored once each ({committed} committed by the end of the outage, \
         {seq_out} stored before it); hub skipped {} duplicate records",
        audit.stored, audit.hub_duplicates
    );
    Ok(())
}

/// Both directions black-holed: both ends detect the half-open path within the idle timeout
/// (plus a keep-alive and slack), reconnect once it heals, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_is_detected_by_both_ends_and_heals() -> anyhow::Result<()> {
    outage("faults-bh", true, true, |t| (t.detect(), t.detect())).await
}

/// Only hub → agent black-holed: the agent hears nothing and times out; the hub still hears
/// the agent until then, and times out an idle timeout after the agent went quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_black_hole_is_detected() -> anyhow::Result<()> {
    outage("faults-oneway", false, true, |t| {
        (t.detect(), t.detect() + t.idle + t.keepalive)
    })
    .await
}

#[test]
fn timing_is_read_from_the_config() -> anyhow::Result<()> {
    let t = Timing::from_config(
        "[hub]\naddress = \"x:1\"\nkeepalive_ms = 500\nidle_timeout_ms = 3000\nbackoff_max_ms = 1000\n",
    )?;
    assert_eq!(t.keepalive, Duration::from_millis(500));
    assert_eq!(t.idle, Duration::from_secs(3));
    assert_eq!(t.connect_timeout, Duration::from_secs(5));
    assert_eq!(t.backoff_max, Duration::from_secs(1));
    Ok(())
}
