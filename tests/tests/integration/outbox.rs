//! A full outbox, an unreachable hub and stores that go back in time, with real processes:
//! every record lost to the byte budget becomes a gap the hub stores, the hub's twin converges
//! on the PLC, state-only tags are coalesced while the hub is away, and a hub restored from a
//! snapshot or an agent restored from a backup neither loses new records nor loops.
//!
//! Each test starts the agent while its hub address is dead, lets the PLC's values change, then
//! starts the hub on that address. At the end both processes stop and the test audits the
//! hub's store: records and gaps together cover `1..=stored` exactly once, per counter the
//! values never go back (nothing replayed), the gaps hold exactly the records the
//! agent counted as lost, and every record it accepted and kept is there.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use edgesync_cloud::store::HubStore;
use edgesync_testkit::harness::{self, Api, Pki, Proc, TempDir};
use edgesync_testkit::sim::{ScriptId, SimConfig, SimHandle};

use crate::support::{audit, dead_hub, free_tcp_port, start_counters};

const TD: &str = "example.org";
const NODE: &str = "gw-1";
/// Holding register of the writable tag `sp`.
const SP: u16 = 100;
const DEVICE: &str = "plc-1";

struct Rig {
    tmp: TempDir,
    pki: Pki,
    sim: SimHandle,
    scripts: Vec<ScriptId>,
    agent: Option<Proc>,
    hub: Option<Proc>,
    /// The hub's tunnel address (dead until the hub starts).
    tunnel: String,
    /// The agent's Prometheus endpoint.
    metrics: String,
}

/// The agent's directory under `tmp`, a free metrics address, and the start of its config:
/// `[agent]`, `[hub]` with `hub` (its keys), `[identity]`, `[mqtt]` off and `[metrics]`.
fn agent_preamble(
    tmp: &TempDir,
    pki: &Pki,
    hub: &str,
) -> anyhow::Result<(std::path::PathBuf, String, String)> {
    let metrics = format!("127.0.0.1:{}", free_tcp_port()?);
    let dir = tmp.path().join(NODE);
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = pki.svid(&format!("spiffe://{TD}/edge/{NODE}"), "agent")?;
    let mut s = String::new();
    writeln!(
        s,
        "[agent]\ndata_dir = {:?}\n",
        dir.join("data").display().to_string()
    )?;
    writeln!(s, "[hub]\n{hub}\n")?;
    s.push_str(&harness::identity_toml(TD, &cert, &key, &pki.bundle));
    writeln!(s, "[mqtt]\nmode = \"off\"\n")?;
    writeln!(s, "[metrics]\nlisten = {metrics:?}\n")?;
    Ok((dir, metrics, s))
}

impl Rig {
    /// A PLC whose holding registers `0..counters` count up every 50 ms, and an agent polling
    /// them every 50 ms as tags `c<i>` (`state_only` for the indexes in `state_only`), with a
    /// hub address where nothing listens yet.
    async fn start(
        tag: &str,
        counters: u16,
        state_only: &[u16],
        outbox: &str,
    ) -> anyhow::Result<Rig> {
        Self::start_on(tag, counters, state_only, outbox, None).await
    }

    /// [`Rig::start`]; with `tmpfs` (a size such as `"16m"`), the agent runs in a user and
    /// mount namespace of its own (`unshare`, util-linux; no privileges needed) with its data
    /// directory on a tmpfs of that size, which only it sees (and the test, through
    /// `/proc/<pid>/root`) and which vanishes with it.
    async fn start_on(
        tag: &str,
        counters: u16,
        state_only: &[u16],
        outbox: &str,
        tmpfs: Option<&str>,
    ) -> anyhow::Result<Rig> {
        let tmp = TempDir::new(tag)?;
        let pki = Pki::new(&tmp.path().join("pki"), TD)?;
        let sim = SimHandle::start("127.0.0.1:0".parse()?, SimConfig::with_units([1])).await?;
        let scripts = start_counters(&sim, counters)?;
        let tunnel = dead_hub()?;
        let (dir, metrics, mut s) = agent_preamble(
            &tmp,
            &pki,
            &format!(
                "address = {tunnel:?}\nbackoff_initial_ms = 100\nbackoff_max_ms = 500\nkeepalive_ms = 500\nidle_timeout_ms = 3000"
            ),
        )?;
        writeln!(s, "[outbox]\n{outbox}\n")?;
        writeln!(
            s,
            "[[devices]]\nid = {DEVICE:?}\nprotocol = \"tcp\"\nendpoint = {:?}\nunit_id = 1\npoll_interval_ms = 50\ntimeout_ms = 500\n",
            sim.local_addr().to_string()
        )?;
        for i in 0..counters {
            writeln!(
                s,
                "[[devices.tags]]\nname = \"c{i}\"\ntable = \"holding_register\"\naddress = {i}\ntype = \"uint16\"\nstate_only = {}\n",
                state_only.contains(&i)
            )?;
        }
        // A set point the PLC does not change, for desired values.
        writeln!(
            s,
            "[[devices.tags]]\nname = \"sp\"\ntable = \"holding_register\"\naddress = {SP}\ntype = \"uint16\"\naccess = \"read_write\"\n"
        )?;
        let cfg = dir.join("agent.toml");
        std::fs::write(&cfg, s)?;
        let bin = harness::bin("edgesync-agent")?;
        let (cfg, bin) = (cfg.display().to_string(), bin.display().to_string());
        let agent = match tmpfs {
            None => {
                Proc::spawn(
                    Path::new(&bin),
                    &["run", "--config", &cfg],
                    &dir.join("agent.log"),
                    None,
                )
                .await?
            }
            Some(size) => {
                let data = dir.join("data");
                std::fs::create_dir_all(&data)?;
                let unshare = crate::support::which("unshare")?;
                Proc::spawn(
                    &unshare,
                    &[
                        "--user",
                        "--map-root-user",
                        "--mount",
                        "--",
                        "sh",
                        "-c",
                        &format!("mount -t tmpfs -o size={size} tmpfs \"$0\" && exec \"$@\""),
                        &data.display().to_string(),
                        &bin,
                        "run",
                        "--config",
                        &cfg,
                    ],
                    &dir.join("agent.log"),
                    None,
                )
                .await?
            }
        };
        Ok(Rig {
            tmp,
            pki,
            sim,
            scripts,
            agent: Some(agent),
            hub: None,
            tunnel,
            metrics,
        })
    }

    /// A counter of the agent (summed over labels; 0 if absent).
    async fn agent_counter(&self, name: &str) -> anyhow::Result<u64> {
        let text = reqwest::get(format!("http://{}/metrics", self.metrics))
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

    /// Waits until the agent's counter `name` exceeds `min`.
    async fn wait_counter(&self, name: &str, min: u64, within: Duration) -> anyhow::Result<u64> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let v = self.agent_counter(name).await.unwrap_or(0);
            if v > min {
                return Ok(v);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("{name} stayed at {v} for {within:?}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts the agent again on the same config and data directory.
    async fn restart_agent(&mut self) -> anyhow::Result<()> {
        let dir = self.tmp.path().join(NODE);
        self.agent = Some(
            Proc::spawn(
                &harness::bin("edgesync-agent")?,
                &[
                    "run",
                    "--config",
                    &dir.join("agent.toml").display().to_string(),
                ],
                &dir.join("agent.log"),
                None,
            )
            .await?,
        );
        Ok(())
    }

    async fn stop_agent(&mut self) -> anyhow::Result<()> {
        if let Some(a) = self.agent.take() {
            ensure!(a.terminate().await?, "agent exits 0 on SIGTERM");
        }
        Ok(())
    }

    async fn stop_hub(&mut self) -> anyhow::Result<()> {
        if let Some(h) = self.hub.take() {
            ensure!(h.terminate().await?, "hub exits 0 on SIGTERM");
        }
        Ok(())
    }

    /// Sets `sp` through the hub and waits until the PLC holds it and the hub shows it
    /// applied.
    async fn set_sp(&self, api: &Api, value: u16) -> anyhow::Result<()> {
        let path = format!("/api/v1/nodes/{NODE}/devices/{DEVICE}/twin");
        let (status, v) = api
            .patch(
                &format!("{path}/desired"),
                &serde_json::json!({ "sp": value }),
            )
            .await?;
        ensure!(status == 200, "PATCH answered {status}: {v}");
        let version = v["versions"]["sp"].as_u64().context("the new version")?;
        let sim = self.sim.clone();
        let path2 = path.clone();
        api.wait_for(Duration::from_secs(20), move |api| {
            let (sim, path) = (sim.clone(), path2.clone());
            async move {
                let (_, t) = api.get(&path).await?;
                let d = &t["desired"]["sp"];
                // The hub may give the value a newer version when the node says hello (a
                // value it numbered while it could not know the node's versions).
                let done = d["version"].as_u64().is_some_and(|v| v >= version)
                    && d["value"] == value
                    && d["applied"]["version"] == d["version"]
                    && d["applied"]["outcome"] == "ok"
                    && sim.holding(1, SP, 1)?[0] == value;
                Ok(done.then_some(()))
            }
        })
        .await
        .with_context(|| format!("sp = {value} applied\n{}", self.logs()))
    }

    async fn start_hub(&mut self) -> anyhow::Result<Api> {
        let (hub, _, http) =
            harness::start_hub(self.tmp.path(), &self.pki, &self.tunnel, "127.0.0.1:0").await?;
        self.hub = Some(hub);
        Ok(Api::new(&http))
    }

    fn freeze(&self) {
        for id in &self.scripts {
            self.sim.remove_script(*id);
        }
    }

    /// Starts the counters again after [`Rig::freeze`], from where they stopped.
    fn resume(&mut self, counters: u16) -> anyhow::Result<()> {
        self.scripts = start_counters(&self.sim, counters)?;
        Ok(())
    }

    fn logs(&self) -> String {
        let a = self
            .agent
            .as_ref()
            .map(|p| p.log_text())
            .unwrap_or_default();
        let h = self.hub.as_ref().map(|p| p.log_text()).unwrap_or_default();
        format!("--- agent log ---\n{a}\n--- hub log ---\n{h}")
    }

    /// Waits until the hub shows values of the first counter.
    async fn converged_soon(&self, api: &Api) -> anyhow::Result<()> {
        api.wait_for(Duration::from_secs(20), |api| async move {
            api.reported_u64(NODE, DEVICE, "c0").await
        })
        .await
        .map(drop)
        .with_context(|| self.logs())
    }

    /// Waits until the hub's twin of every counter equals what the PLC holds.
    async fn converged(&self, api: &Api, counters: u16, within: Duration) -> anyhow::Result<()> {
        let sim = self.sim.clone();
        api.wait_for(within, move |api| {
            let sim = sim.clone();
            async move {
                let want = sim.holding(1, 0, counters as usize)?;
                for (i, w) in want.iter().enumerate() {
                    let got = api.reported_u64(NODE, DEVICE, &format!("c{i}")).await?;
                    if got != Some(u64::from(*w)) {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            }
        })
        .await
        .with_context(|| self.logs())
    }

    /// Stops both processes (SIGTERM, exit 0) and opens the hub's store.
    async fn stop_and_open_store(&mut self) -> anyhow::Result<HubStore> {
        if let Some(a) = self.agent.take() {
            ensure!(a.terminate().await?, "agent exits 0 on SIGTERM");
        }
        if let Some(h) = self.hub.take() {
            ensure!(h.terminate().await?, "hub exits 0 on SIGTERM");
        }
        Ok(HubStore::open(
            &self.tmp.path().join("hubdata").join("hub.sled"),
            1 << 20,
        )?)
    }
}

const COUNTERS: u16 = 40;

/// The agent's `/readyz`: status and body (`None` while nothing answers, e.g. restarting).
async fn readyz(metrics: &str) -> Option<(u16, String)> {
    let r = reqwest::get(format!("http://{metrics}/readyz"))
        .await
        .ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().await.ok()?))
}

/// Writes `path` until the filesystem is full.
fn fill(path: &Path) -> anyhow::Result<u64> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).with_context(|| path.display().to_string())?;
    let chunk = vec![0u8; 64 * 1024];
    let mut n = 0;
    loop {
        match f.write_all(&chunk) {
            Ok(()) => n += chunk.len() as u64,
            Err(e) if e.raw_os_error() == Some(28) => return Ok(n),
            Err(e) => bail!("filling {}: {e}", path.display()),
        }
    }
}

/// A disk that really fills under the agent's outbox, while the hub is up and values flow:
/// the agent reports not ready and holds its records in memory; once there is room again it
/// restarts itself (same PID), and the hub ends up with every record, no gap, and the PLC's
/// values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_under_the_agent_loses_no_record() -> anyhow::Result<()> {
    let mut r = Rig::start_on("disk-full", 8, &[], "", Some("16m")).await?;
    let api = r.start_hub().await?;
    r.converged_soon(&api).await?;
    let pid = r
        .agent
        .as_ref()
        .and_then(|a| a.pid())
        .context("agent pid")?;
    // The tmpfs as the agent sees it.
    let data = Path::new(&format!("/proc/{pid}/root"))
        .join(r.tmp.path().join(NODE).join("data").strip_prefix("/")?);
    ensure!(
        data.join("agent.sled").exists(),
        "no store under {}",
        data.display()
    );
    let filler = data.join("filler");
    fill(&filler)?;
    let full_at = tokio::time::Instant::now();
    // Not ready within seconds, with the reason; records are held meanwhile.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let reason = loop {
        if let Some((503, body)) = readyz(&r.metrics).await {
            break body;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "/readyz did not turn 503 on a full disk\n{}",
            r.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(
        reason.contains("outbox store cannot write") && reason.contains("held in memory"),
        "{reason}"
    );
    let held = r
        .wait_counter("edgesync_outbox_held_records", 50, Duration::from_secs(20))
        .await?;
    // Polling goes on: more records are held a moment later.
    r.wait_counter(
        "edgesync_outbox_held_records",
        held,
        Duration::from_secs(10),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        matches!(readyz(&r.metrics).await, Some((503, _))),
        "still not ready while the disk is full"
    );
    std::fs::remove_file(&filler)?;
    let full_for = full_at.elapsed();
    // Ready again: the agent saved what it held and restarted itself.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((200, _)) = readyz(&r.metrics).await {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "/readyz did not turn 200 once the disk had room\n{}",
            r.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        r.agent.as_ref().and_then(|a| a.pid()) == Some(pid),
        "the agent restarted in place (same process)"
    );
    let logs = r.logs();
    ensure!(
        logs.contains("restarting to reopen the outbox store")
            && logs.contains("imported the records held while the outbox could not write"),
        "{logs}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    r.freeze();
    r.converged(&api, 8, Duration::from_secs(30)).await?;
    let logs = r.logs();
    let store = r.stop_and_open_store().await?;
    // The agent restarted once: its first reading after it may repeat a value.
    let a = audit(&store, true).with_context(|| logs.clone())?;
    ensure!(
        a.lost == 0,
        "gaps {:?} (nothing had to be dropped)\n{logs}",
        a.gaps
    );
    // The records polled while the disk was full reached the hub: no counter has a hole in
    // its history as long as the full period (only the restart's moment).
    let node = edgesync_protocol::NodeId::new(NODE)?;
    let mut last: std::collections::BTreeMap<String, u64> = Default::default();
    let mut worst = 0;
    for (_, s) in store.records(&node, 1)? {
        // The counters (`sp` holds still and is reported only when it changes).
        if !s.property.as_str().starts_with('c') {
            continue;
        }
        if let Some(prev) = last.insert(s.property.to_string(), s.ts.0) {
            worst = worst.max(s.ts.0.saturating_sub(prev));
        }
    }
    ensure!(
        u128::from(worst) < full_for.as_millis() / 2 && worst < 3000,
        "a counter has no record for {worst} ms; the disk was full for {full_for:?}\n{logs}"
    );
    Ok(())
}

async fn full_outbox(policy: &str, lost_metric: &str) -> anyhow::Result<()> {
    // 40 counters changing every 50 ms: ~800 records/s fill the smallest outbox in seconds.
    let outbox = format!("max_bytes = 65536\non_full = {policy:?}");
    let mut r = Rig::start(&format!("outbox-{policy}"), COUNTERS, &[], &outbox).await?;
    // Losses accumulate while the hub is away.
    r.wait_counter(lost_metric, 500, Duration::from_secs(30))
        .await?;
    if policy == "refuse_new" {
        // The PLC stops while the outbox is still full: its final values are refused, so
        // only the resync after the gap can bring them to the hub.
        r.freeze();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let api = r.start_hub().await?;
    api.wait_for(Duration::from_secs(20), |api| async move {
        let (_, n) = api.get(&format!("/api/v1/nodes/{NODE}")).await?;
        Ok((n["connected"] == true).then_some(()))
    })
    .await
    .with_context(|| r.logs())?;
    if policy == "drop_oldest" {
        // Values keep flowing for a while after the hub returns, then the PLC stops.
        tokio::time::sleep(Duration::from_secs(2)).await;
        r.freeze();
    }
    r.converged(&api, COUNTERS, Duration::from_secs(30)).await?;
    let accepted = r
        .agent_counter("edgesync_outbox_records_accepted_total")
        .await?;
    let lost = r.agent_counter(lost_metric).await?;
    let logs = r.logs();
    let store = r.stop_and_open_store().await?;
    let a = audit(&store, false).with_context(|| logs.clone())?;
    let numbered = a.records.len() as u64 + a.lost;
    if policy == "refuse_new" {
        // Refused records were never sent: the gaps are exactly them, and every accepted
        // record was stored.
        ensure!(
            a.lost == lost,
            "the hub holds gaps of {} records ({:?}), the agent refused {lost}\n{logs}",
            a.lost,
            a.gaps
        );
        ensure!(
            a.records.len() as u64 == accepted,
            "the hub stored {} records, the agent accepted {accepted}",
            a.records.len()
        );
    } else {
        // Every accepted record has a sequence number, stored or in a gap; a group dropped
        // while in flight may have reached the hub, so the gaps hold at most what was dropped.
        ensure!(
            numbered == accepted,
            "the hub accounts for {numbered} records ({} stored, {} in gaps), the agent accepted {accepted}",
            a.records.len(),
            a.lost
        );
        ensure!(
            a.lost > 0 && a.lost <= lost,
            "the hub holds gaps of {} records ({:?}), the agent dropped {lost}\n{logs}",
            a.lost,
            a.gaps
        );
    }
    ensure!(
        a.records.len() > 1000,
        "a meaningful history ({})",
        a.records.len()
    );
    Ok(())
}

/// `on_full = "refuse_new"`: refused records are numbered, stored as gaps by the hub, and the
/// properties whose latest values were refused are sent again, so the twin converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_records_become_gaps_at_the_hub_and_the_twin_converges() -> anyhow::Result<()> {
    full_outbox("refuse_new", "edgesync_outbox_refused_records_total").await
}

/// `on_full = "drop_oldest"`: dropped history becomes a gap at the hub; the rest arrives once,
/// in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_history_becomes_a_gap_at_the_hub_and_the_twin_converges() -> anyhow::Result<()> {
    full_outbox("drop_oldest", "edgesync_outbox_records_dropped_total").await
}

/// While the hub is away, a `state_only` tag keeps only its latest value (sent once it
/// returns); a history tag keeps every change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_only_tags_are_coalesced_while_the_hub_is_away() -> anyhow::Result<()> {
    // c0 is state only, c1 keeps its history.
    let mut r = Rig::start("outbox-state", 2, &[0], "").await?;
    r.wait_counter(
        "edgesync_outbox_coalesced_records_total",
        30,
        Duration::from_secs(30),
    )
    .await?;
    r.freeze();
    // Let the last values be polled and committed before the hub appears.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let api = r.start_hub().await?;
    r.converged(&api, 2, Duration::from_secs(30)).await?;
    let history_changes = r
        .agent_counter("edgesync_outbox_records_accepted_total")
        .await?;
    let commits = r.agent_counter("edgesync_outbox_commits_total").await?;
    ensure!(
        commits > 0 && commits <= history_changes,
        "{commits} commits for {history_changes} accepted records"
    );
    let logs = r.logs();
    let store = r.stop_and_open_store().await?;
    let a = audit(&store, false).with_context(|| logs.clone())?;
    ensure!(a.gaps.is_empty(), "nothing was lost: {:?}", a.gaps);
    let state: Vec<_> = a.records.iter().filter(|(_, p, _)| p == "c0").collect();
    let history: Vec<_> = a.records.iter().filter(|(_, p, _)| p == "c1").collect();
    ensure!(
        state.len() == 1,
        "the state-only tag sent {} records: {state:?}\n{logs}",
        state.len()
    );
    ensure!(
        history.len() > 30,
        "the history tag kept every change ({} records)",
        history.len()
    );
    ensure!(
        a.records.len() as u64 == history_changes,
        "the hub stored {} records, the agent accepted {history_changes}",
        a.records.len()
    );
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}

/// The hub's store is restored from an older snapshot while the agent runs on: the records it
/// lost become a gap (no request for records the agent no longer has), the control log and the
/// desired versions continue after what the agent had (a desired value set after the restore
/// reaches the PLC, its outcome reaches the hub), and new records keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_restored_from_a_snapshot_records_a_gap_and_keeps_syncing_both_ways()
-> anyhow::Result<()> {
    let mut r = Rig::start("rollback-hub", 8, &[], "").await?;
    let api = r.start_hub().await?;
    r.converged_soon(&api).await?;
    r.set_sp(&api, 11).await?;
    // Snapshot of the hub's store, taken while it is stopped.
    r.stop_hub().await?;
    let data = r.tmp.path().join("hubdata");
    let snapshot = r.tmp.path().join("hubdata-snapshot");
    copy_dir(&data, &snapshot)?;
    // The hub lives on: more records, another desired value (and its outcome).
    let api = r.start_hub().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    r.set_sp(&api, 12).await?;
    r.stop_hub().await?;
    // Restored from the snapshot.
    std::fs::remove_dir_all(&data)?;
    copy_dir(&snapshot, &data)?;
    let api = r.start_hub().await?;
    // Desired values go on: a new version must be above what the agent took over.
    r.set_sp(&api, 13).await?;
    r.freeze();
    r.converged(&api, 8, Duration::from_secs(30)).await?;
    let (_, gaps) = api.get(&format!("/api/v1/nodes/{NODE}/gaps")).await?;
    let logs = r.logs();
    let store = r.stop_and_open_store().await?;
    let a = audit(&store, false).with_context(|| logs.clone())?;
    ensure!(
        a.lost > 0,
        "the records the snapshot lacks are a gap: {gaps}\n{logs}"
    );
    ensure!(
        gaps["lost_records"] == a.lost,
        "the API shows the gap: {gaps}"
    );
    Ok(())
}

/// The agent's data directory is restored from an older backup while the hub has moved on:
/// the records the agent commits before it reaches the hub are renumbered after the hub's
/// history and stored, none is taken for "already stored", nothing loops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restored_from_a_backup_loses_none_of_its_new_records() -> anyhow::Result<()> {
    let mut r = Rig::start("rollback-agent", 8, &[], "").await?;
    let api = r.start_hub().await?;
    // The backup is taken with an empty outbox (all acknowledged): what the restored agent
    // sends again is then only what it committed after the restore. (A backup with a backlog
    // may duplicate that backlog at the hub, as documented.)
    r.converged_soon(&api).await?;
    r.freeze();
    r.converged(&api, 8, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.stop_agent().await?;
    r.resume(8)?;
    let data = r.tmp.path().join(NODE).join("data");
    let backup = r.tmp.path().join("agent-backup");
    copy_dir(&data, &backup)?;
    // The agent lives on, and the hub stores a few seconds more of its history.
    r.restart_agent().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    r.stop_agent().await?;
    let (_, node) = api.get(&format!("/api/v1/nodes/{NODE}")).await?;
    let hub_seq = node["uplink_seq"].as_u64().context("uplink_seq")?;
    // Restored from the backup, the agent first runs without the hub: what it commits then
    // carries numbers the hub already holds (another history).
    r.stop_hub().await?;
    std::fs::remove_dir_all(&data)?;
    copy_dir(&backup, &data)?;
    r.restart_agent().await?;
    let offline = r
        .wait_counter(
            "edgesync_outbox_records_accepted_total",
            100,
            Duration::from_secs(20),
        )
        .await?;
    let api = r.start_hub().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    r.freeze();
    r.converged(&api, 8, Duration::from_secs(30)).await?;
    let accepted = r
        .agent_counter("edgesync_outbox_records_accepted_total")
        .await?;
    let logs = r.logs();
    let store = r.stop_and_open_store().await?;
    let a = audit(&store, true).with_context(|| logs.clone())?;
    let after: u64 = a
        .records
        .iter()
        .filter(|(seq, _, _)| *seq > hub_seq)
        .count() as u64;
    ensure!(
        after == accepted,
        "the restored agent accepted {accepted} records ({offline} before it reached the hub); the hub stored {after} after its {hub_seq}\n{logs}"
    );
    ensure!(a.gaps.is_empty(), "nothing was lost: {:?}", a.gaps);
    Ok(())
}

/// With the default `commit_interval_ms = 0`, the readings of a poll sweep that one link reads
/// back to back share one outbox commit (one write, one `fdatasync`), instead of one commit per
/// reading that arrives while none is running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_sweep_read_back_to_back_shares_one_commit() -> anyhow::Result<()> {
    use edgesync_testkit::sim::{Script, Table};
    const UNITS: u8 = 5;
    let tmp = TempDir::new("outbox-sweep")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let sim = SimHandle::start("127.0.0.1:0".parse()?, SimConfig::with_units(1..=UNITS)).await?;
    for u in 1..=UNITS {
        // Faster than the polls: every unit changes in every sweep.
        sim.add_script(
            u,
            Table::HoldingRegisters,
            0,
            Script::Counter { step: 1 },
            Duration::from_millis(20),
        )?;
    }
    let (dir, metrics, mut s) =
        agent_preamble(&tmp, &pki, &format!("address = {:?}", dead_hub()?))?;
    // No [outbox] table: the default commit policy.
    for u in 1..=UNITS {
        writeln!(
            s,
            "[[devices]]\nid = \"plc-{u}\"\nprotocol = \"tcp\"\nendpoint = {:?}\nunit_id = {u}\npoll_interval_ms = 100\ntimeout_ms = 500\n\n[[devices.tags]]\nname = \"c0\"\ntable = \"holding_register\"\naddress = 0\ntype = \"uint16\"\n",
            sim.local_addr().to_string()
        )?;
    }
    let cfg = dir.join("agent.toml");
    std::fs::write(&cfg, s)?;
    let agent = harness::spawn_agent(&cfg, &dir.join("agent.log")).await?;
    let commits = || async {
        let text = reqwest::get(format!("http://{metrics}/metrics"))
            .await?
            .text()
            .await?;
        let n = text
            .lines()
            .filter_map(|l| l.strip_prefix("edgesync_outbox_commits_total "))
            .filter_map(|v| v.trim().parse::<f64>().ok())
            .sum::<f64>();
        anyhow::Ok(n as u64)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while commits().await.unwrap_or(0) == 0 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no commit within 30 s\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // One commit per sweep, give or take the sweeps a loaded machine stretches past the 10 ms
    // hold; committing each reading that arrives while none runs makes 2 or more. The best of
    // three windows counts, so that a burst of load elsewhere does not fail the test.
    let mut windows = Vec::new();
    for _ in 0..3 {
        let (c0, s0) = (commits().await?, sim.request_count(UNITS));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (c1, s1) = (commits().await?, sim.request_count(UNITS));
        let (commits, sweeps) = (c1 - c0, s1 - s0);
        eprintln!("{commits} commits for {sweeps} sweeps of {UNITS} units");
        windows.push((commits, sweeps));
        if sweeps >= 10 && commits * 2 <= sweeps * 3 {
            ensure!(agent.terminate().await?, "agent exits 0 on SIGTERM");
            return Ok(());
        }
    }
    bail!(
        "(commits, sweeps of {UNITS} units) per 2 s window: {windows:?}\n{}",
        agent.log_text()
    )
}
