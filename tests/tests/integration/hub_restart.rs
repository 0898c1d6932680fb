//! The hub restarted under load (issue 7), with real processes: a PLC simulator whose counters
//! change every 50 ms, a real agent, and a real hub that is stopped by PID several times at
//! random moments, gracefully (SIGTERM) or not (SIGKILL), and started again on the same tunnel
//! address. The agent is never restarted and must reconnect by itself every time.
//!
//! At the end the PLC stops, the test waits until the hub stored every record the agent
//! numbered, stops both processes and audits the hub's store: every sequence number
//! `1..=stored` exactly once and no gap (nothing was dropped: the outbox is large enough), per
//! counter strictly increasing values in sequence order (the agent was not restarted, so no
//! value may repeat), no value the PLC did not produce, and a twin equal to the PLC's final
//! registers.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use edgesync_cloud::store::HubStore;
use edgesync_protocol::{DeviceId, NodeId, Value};
use edgesync_testkit::harness::{self, Api, Pki, Proc, SimDevice, TempDir};
use edgesync_testkit::sim::{ScriptId, SimConfig, SimHandle};
use tokio::time::Instant;

use crate::support::{DEVICE, NODE, audit, free_tcp_port};

const TD: &str = "example.org";
/// Holding registers `0..COUNTERS` count up every 50 ms, polled as tags `c<i>` every 50 ms.
const COUNTERS: u16 = 12;
/// How many times the hub is stopped and started again.
const RESTARTS: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGTERM, and the hub must exit 0.
    Term,
    /// SIGKILL.
    Kill,
}

struct Rig {
    tmp: TempDir,
    pki: Pki,
    sim: SimHandle,
    scripts: Vec<ScriptId>,
    agent: Option<Proc>,
    hub: Option<Proc>,
    /// The hub's API (a new port at every start).
    api: Api,
    /// The hub's tunnel address (the same at every start: it is in the agent's config).
    tunnel: String,
    /// The agent's Prometheus endpoint.
    metrics: String,
    /// What happened, for failure messages.
    journal: String,
}

impl Rig {
    async fn start() -> anyhow::Result<Rig> {
        // Build the binaries first (once per test process), so the PLC starts counting, and the
        // metrics port is taken, moments before the processes start.
        let agent_bin = harness::bin("edgesync-agent")?;
        let tmp = TempDir::new("hub-restart")?;
        let pki = Pki::new(&tmp.path().join("pki"), TD)?;
        let sim = SimHandle::start("127.0.0.1:0".parse()?, SimConfig::with_units([1])).await?;
        let scripts = crate::support::start_counters(&sim, COUNTERS)?;
        let (hub, tunnel, http) =
            harness::start_hub(tmp.path(), &pki, "127.0.0.1:0", "127.0.0.1:0").await?;
        let metrics = format!("127.0.0.1:{}", free_tcp_port()?);
        let dir = tmp.path().join(NODE);
        std::fs::create_dir_all(&dir)?;
        let (cert, key) = harness::node_svid(&pki, &dir, TD, NODE)?;
        // The outbox keeps its defaults (256 MiB, fsync every commit): nothing is ever dropped.
        let cfg = harness::agent_toml(
            &dir,
            &tunnel,
            TD,
            &cert,
            &key,
            &pki.bundle,
            &[SimDevice {
                id: DEVICE.into(),
                endpoint: sim.local_addr().to_string(),
                unit: 1,
                counters: COUNTERS,
                poll_ms: 50,
            }],
            &format!("[metrics]\nlisten = {metrics:?}\n"),
        )?;
        let agent = Proc::spawn(
            &agent_bin,
            &["run", "--config", &cfg.display().to_string()],
            &dir.join("agent.log"),
            None,
        )
        .await?;
        Ok(Rig {
            tmp,
            pki,
            sim,
            scripts,
            agent: Some(agent),
            hub: Some(hub),
            api: Api::new(&http),
            tunnel,
            metrics,
            journal: String::new(),
        })
    }

    fn note(&mut self, line: String) {
        self.journal.push_str(&line);
        self.journal.push('\n');
    }

    fn logs(&self) -> String {
        let a = self
            .agent
            .as_ref()
            .map(|p| p.log_text())
            .unwrap_or_default();
        let h = std::fs::read_to_string(self.tmp.path().join("hub.log")).unwrap_or_default();
        format!(
            "--- journal ---\n{}--- agent log ---\n{a}\n--- hub log (every start) ---\n{h}",
            self.journal
        )
    }

    /// A metric of the agent (summed over labels; 0 if absent).
    async fn agent_metric(&self, name: &str) -> anyhow::Result<u64> {
        let text = reqwest::Client::new()
            .get(format!("http://{}/metrics", self.metrics))
            .timeout(Duration::from_secs(5))
            .send()
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum::<f64>() as u64)
    }

    /// The hub's stored sequence number of the node and whether the node is connected, from
    /// its API (`None` before the hub knows the node).
    async fn hub_seq(api: &Api) -> anyhow::Result<Option<(u64, bool)>> {
        let (status, n) = api.get(&format!("/api/v1/nodes/{NODE}")).await?;
        if status != 200 {
            return Ok(None);
        }
        Ok(Some((
            n["uplink_seq"].as_u64().context("uplink_seq")?,
            n["connected"] == true,
        )))
    }

    /// Stops the hub by its PID.
    async fn stop_hub(&mut self, how: Stop) -> anyhow::Result<()> {
        let hub = self.hub.take().context("no hub running")?;
        match how {
            Stop::Term => ensure!(hub.terminate().await?, "hub exits 0 on SIGTERM"),
            Stop::Kill => hub.kill9().await?,
        }
        Ok(())
    }

    /// Starts the hub again on the same store and tunnel address (a new API port).
    async fn start_hub(&mut self) -> anyhow::Result<()> {
        let (hub, tunnel, http) =
            harness::start_hub(self.tmp.path(), &self.pki, &self.tunnel, "127.0.0.1:0").await?;
        ensure!(tunnel == self.tunnel, "the hub moved to {tunnel}");
        self.hub = Some(hub);
        self.api = Api::new(&http);
        Ok(())
    }

    /// Waits (up to `within`) until the hub stored records beyond `seq` over a live tunnel:
    /// the agent reconnected by itself and its values flow again.
    async fn wait_flowing(&self, seq: u64, within: Duration) -> anyhow::Result<u64> {
        self.api
            .wait_for(within, move |api| async move {
                Ok(Rig::hub_seq(&api)
                    .await?
                    .filter(|(s, connected)| *connected && *s > seq)
                    .map(|(s, _)| s))
            })
            .await
    }

    fn freeze(&self) {
        for id in &self.scripts {
            self.sim.remove_script(*id);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_restarted_under_load_loses_nothing_duplicates_nothing_and_the_twin_converges()
-> anyhow::Result<()> {
    let began = Instant::now();
    let seed = std::env::var("EDGESYNC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut r = Rig::start().await?;
    r.note(format!(
        "seed {seed} (EDGESYNC_SEED={seed} repeats the schedule)"
    ));
    r.wait_flowing(0, Duration::from_secs(30))
        .await
        .with_context(|| format!("the first records\n{}", r.logs()))?;

    // Both kinds of stop, at least twice each, in a random order.
    let mut stops = [
        Stop::Term,
        Stop::Kill,
        Stop::Term,
        Stop::Kill,
        Stop::Kill,
        Stop::Term,
    ];
    rng.shuffle(&mut stops);
    assert_eq!(stops.len(), RESTARTS);
    for (round, how) in stops.into_iter().enumerate() {
        // Under load for a random while (sometimes right after the agent's reconnect, while
        // it replays what it kept during the last outage).
        tokio::time::sleep(Duration::from_millis(rng.u64(0..1500))).await;
        let before = Rig::hub_seq(&r.api).await?.map_or(0, |(s, _)| s);
        let pid = r.hub.as_ref().and_then(Proc::pid).unwrap_or(0);
        r.stop_hub(how)
            .await
            .with_context(|| format!("round {round}: stopping the hub\n{}", r.logs()))?;
        // Down for a random while: the PLC's values keep going into the outbox.
        let down = rng.u64(0..1000);
        tokio::time::sleep(Duration::from_millis(down)).await;
        r.start_hub()
            .await
            .with_context(|| format!("round {round}: starting the hub\n{}", r.logs()))?;
        let restarted = Instant::now();
        // What the hub acknowledged before it stopped is still there.
        let kept = Rig::hub_seq(&r.api).await?.map_or(0, |(s, _)| s);
        ensure!(
            kept >= before,
            "round {round}: the hub had stored up to {before} before {how:?}, {kept} after its restart\n{}",
            r.logs()
        );
        let seq = r
            .wait_flowing(kept, Duration::from_secs(30))
            .await
            .with_context(|| {
                format!(
                    "round {round}: the agent did not reconnect by itself after {how:?}\n{}",
                    r.logs()
                )
            })?;
        r.note(format!(
            "round {round}: {how:?} hub pid {pid} at stored {before}, down {down} ms, restarted with stored {kept}, flowing again after {:?} (stored {seq})",
            restarted.elapsed()
        ));
    }

    // A last while under load, then the PLC stops.
    tokio::time::sleep(Duration::from_millis(rng.u64(200..1000))).await;
    r.freeze();
    let sim = r.sim.clone();
    let want = sim.holding(1, 0, COUNTERS as usize)?;
    r.note(format!("frozen at {want:?}"));
    // Until the hub's twin shows the PLC's final values (after which the agent numbers no
    // more records) and the hub stored the last record the agent's outbox numbered (the
    // agent was never restarted and lost nothing, so that is its accepted-records count).
    let settled = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let twin_ok = {
                let mut ok = true;
                for (i, w) in want.iter().enumerate() {
                    let got = r
                        .api
                        .reported_u64(NODE, DEVICE, &format!("c{i}"))
                        .await
                        .unwrap_or(None);
                    ok &= got == Some(u64::from(*w));
                }
                ok
            };
            let accepted = r
                .agent_metric("edgesync_outbox_records_accepted_total")
                .await
                .unwrap_or(0);
            let stored = Rig::hub_seq(&r.api).await.ok().flatten().map(|(s, _)| s);
            let backlog = r
                .agent_metric("edgesync_outbox_backlog_records")
                .await
                .unwrap_or(u64::MAX);
            if twin_ok && stored == Some(accepted) && backlog == 0 {
                break accepted;
            }
            if Instant::now() >= deadline {
                bail!(
                    "the hub did not catch up within 30 s: twin equal to the PLC: {twin_ok}, agent accepted {accepted}, hub stored {stored:?}, agent backlog {backlog}\n{}",
                    r.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let connects = r.agent_metric("edgesync_uplink_connects_total").await?;
    ensure!(
        connects > RESTARTS as u64,
        "the agent connected {connects} times over {} hub lives",
        RESTARTS + 1
    );
    let (_, status) = r.api.get(&format!("/api/v1/nodes/{NODE}")).await?;
    ensure!(
        status["lost_records"] == 0,
        "the hub reports lost records: {status}\n{}",
        r.logs()
    );
    let logs = r.logs();

    // Stop both, then read their stores in this process.
    if let Some(a) = r.agent.take() {
        ensure!(a.terminate().await?, "agent exits 0 on SIGTERM\n{logs}");
    }
    if let Some(h) = r.hub.take() {
        ensure!(h.terminate().await?, "hub exits 0 on SIGTERM\n{logs}");
    }
    let outbox = edgesync_edge::store::AgentStore::open(
        &r.tmp.path().join(NODE).join("data").join("agent.sled"),
        1 << 20,
        1 << 30,
        edgesync_edge::store::Fsync::Never,
    )?;
    let last = outbox.next_seq() - 1;
    let backlog = outbox.backlog();
    drop(outbox);
    let store = HubStore::open(&r.tmp.path().join("hubdata").join("hub.sled"), 1 << 20)?;
    let node = NodeId::new(NODE)?;
    let stored = store.stored_seq(&node)?;
    ensure!(
        last == stored && stored == settled,
        "the agent's outbox numbered up to {last}, the hub stored up to {stored} (settled at {settled})\n{logs}"
    );
    ensure!(backlog == 0, "the outbox still holds {backlog} records");
    // Every sequence number once, no gap, strictly increasing counters (no repeat: the agent
    // ran throughout).
    let a = audit(&store, false).with_context(|| logs.clone())?;
    ensure!(
        a.gaps.is_empty() && a.lost == 0,
        "nothing was dropped, yet the hub holds gaps {:?}\n{logs}",
        a.gaps
    );
    ensure!(
        a.records.len() as u64 == stored,
        "{} records for {stored} sequence numbers",
        a.records.len()
    );
    // Only values the PLC produced: at most its final value.
    let mut per_counter = vec![0usize; COUNTERS as usize];
    for (seq, p, v) in &a.records {
        let i: usize = p
            .strip_prefix('c')
            .and_then(|i| i.parse().ok())
            .filter(|i| *i < COUNTERS as usize)
            .with_context(|| format!("record {seq}: unknown property {p}"))?;
        ensure!(
            *v <= u64::from(want[i]),
            "record {seq}: {p} = {v}, above the PLC's final {}",
            want[i]
        );
        per_counter[i] += 1;
    }
    ensure!(
        per_counter.iter().all(|n| *n > 20),
        "every counter has a history: {per_counter:?}"
    );
    // The twin the hub stored equals the PLC.
    let twin = store
        .twin(&node, &DeviceId::new(DEVICE)?)
        .context("the hub has no twin of the device")?;
    for (i, w) in want.iter().enumerate() {
        let got = twin
            .reported
            .iter()
            .find(|(p, _)| p.to_string() == format!("c{i}"))
            .and_then(|(_, r)| r.value.clone());
        ensure!(
            matches!(got, Some(Value::UInt(v)) if v == u64::from(*w))
                || matches!(got, Some(Value::Int(v)) if v == i64::from(*w)),
            "the hub's twin has c{i} = {got:?}, the PLC {w}"
        );
    }
    let mut summary = String::new();
    writeln!(
        summary,
        "{RESTARTS} hub restarts, {stored} records audited, {connects} agent connects, {:?}",
        began.elapsed()
    )?;
    eprint!("{}{summary}", r.journal);
    Ok(())
}
