//! Sync from a simulated PLC to the hub API through real processes.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use edgesync_cloud::store::HubStore;
use edgesync_protocol::{NodeId, Value};
use edgesync_testkit::harness::{self, Api, Pki, Proc, SimDevice, TempDir};
use edgesync_testkit::sim::{Script, ScriptId, SimConfig, SimHandle, Table};

const TD: &str = "example.org";

struct Rig {
    tmp: TempDir,
    pki: Pki,
    sim: SimHandle,
    scripts: Vec<ScriptId>,
    hub: Option<Proc>,
    agent: Option<Proc>,
    api: Api,
    tunnel: String,
    http: String,
}

async fn start_sim(counters: u16) -> anyhow::Result<(SimHandle, Vec<ScriptId>)> {
    let sim = SimHandle::start("127.0.0.1:0".parse()?, SimConfig::with_units([1, 2])).await?;
    let mut ids = vec![];
    for unit in [1u8, 2] {
        for i in 0..counters {
            ids.push(sim.add_script(
                unit,
                Table::HoldingRegisters,
                i,
                Script::Counter { step: 1 },
                Duration::from_millis(50),
            )?);
        }
    }
    Ok((sim, ids))
}

/// Stops the PLC's counters, so the hub can converge on fixed values.
fn freeze(r: &Rig) {
    for id in &r.scripts {
        r.sim.remove_script(*id);
    }
}

fn devices(sim: &SimHandle, counters: u16) -> Vec<SimDevice> {
    [1u8, 2]
        .iter()
        .map(|u| SimDevice {
            id: format!("plc-{u}"),
            endpoint: sim.local_addr().to_string(),
            unit: *u,
            counters,
            poll_ms: 50,
        })
        .collect()
}

async fn start_agent(
    tmp: &Path,
    pki: &Pki,
    node_id: &str,
    tunnel: &str,
    devs: &[SimDevice],
) -> anyhow::Result<Proc> {
    let dir = tmp.join(node_id.rsplit('/').next().unwrap_or("agent"));
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = pki.svid(node_id, "agent")?;
    std::fs::rename(&cert, dir.join("agent.pem"))?;
    std::fs::rename(&key, dir.join("agent.key.pem"))?;
    let cfg = harness::agent_toml(
        &dir,
        tunnel,
        TD,
        &dir.join("agent.pem"),
        &dir.join("agent.key.pem"),
        &pki.bundle,
        devs,
        "",
    )?;
    harness::spawn_agent(&cfg, &dir.join("agent.log")).await
}

async fn rig(counters: u16) -> anyhow::Result<Rig> {
    let tmp = TempDir::new("e2e")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let (sim, scripts) = start_sim(counters).await?;
    let (hub, tunnel, http) =
        harness::start_hub(tmp.path(), &pki, "127.0.0.1:0", "127.0.0.1:0").await?;
    let agent = start_agent(
        tmp.path(),
        &pki,
        &format!("spiffe://{TD}/edge/gw-1"),
        &tunnel,
        &devices(&sim, counters),
    )
    .await?;
    let api = Api::new(&http);
    Ok(Rig {
        tmp,
        pki,
        sim,
        scripts,
        hub: Some(hub),
        agent: Some(agent),
        api,
        tunnel,
        http,
    })
}

fn logs(r: &Rig) -> String {
    let a = r.agent.as_ref().map(|p| p.log_text()).unwrap_or_default();
    let h = r.hub.as_ref().map(|p| p.log_text()).unwrap_or_default();
    format!("--- agent log ---\n{a}\n--- hub log ---\n{h}")
}

/// Waits until the hub's twin of every counter equals what the simulator holds now.
async fn converged(r: &Rig, counters: u16, within: Duration) -> anyhow::Result<()> {
    let sim = r.sim.clone();
    r.api
        .wait_for(within, move |api| {
            let sim = sim.clone();
            async move {
                for unit in [1u8, 2] {
                    let want = sim.holding(unit, 0, counters as usize)?;
                    for (i, w) in want.iter().enumerate() {
                        let got = api
                            .reported_u64("gw-1", &format!("plc-{unit}"), &format!("c{i}"))
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_values_reach_the_hub_api() -> anyhow::Result<()> {
    let r = rig(4).await?;
    // Values arrive and keep changing.
    let first = r
        .api
        .wait_for(Duration::from_secs(20), |api| async move {
            api.reported_u64("gw-1", "plc-1", "c0").await
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(&r)))?;
    let later = r
        .api
        .wait_for(Duration::from_secs(10), move |api| async move {
            Ok(api
                .reported_u64("gw-1", "plc-1", "c0")
                .await?
                .filter(|v| *v > first))
        })
        .await?;
    assert!(later > first);
    // The twin has the contract's shape.
    let (status, twin) = r.api.get("/api/v1/nodes/gw-1/devices/plc-2/twin").await?;
    assert_eq!(status, 200);
    assert_eq!(twin["reported"]["c3"]["quality"], "good");
    assert!(
        twin["reported"]["c3"]["ts"]
            .as_u64()
            .is_some_and(|ts| ts > 1_600_000_000_000)
    );
    assert!(twin["desired"].is_object() && twin["delta"].is_object());
    // The node is listed as connected, with its agent version.
    let (_, node) = r.api.get("/api/v1/nodes/gw-1").await?;
    assert_eq!(node["connected"], true, "{node}");
    // Freeze the PLC: the hub converges on exactly its values.
    freeze(&r);
    converged(&r, 4, Duration::from_secs(15)).await?;
    // No token, no data.
    let no_auth = reqwest::get(format!("http://{}/api/v1/nodes", r.http)).await?;
    assert_eq!(no_auth.status().as_u16(), 401);
    Ok(())
}

/// Checks the hub's history of one node: dense sequence numbers from 1, each stored once, and
/// per property strictly increasing counter values (nothing replayed out of order).
fn check_history(store: &HubStore, node: &str) -> anyhow::Result<usize> {
    let node = NodeId::new(node)?;
    let stored = store.stored_seq(&node)?;
    let recs = store.records(&node, 1)?;
    assert_eq!(
        recs.len() as u64,
        stored,
        "every sequence number up to {stored} is stored exactly once"
    );
    for (i, (seq, _)) in recs.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1, "sequence numbers are dense");
    }
    let mut last: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (seq, s) in &recs {
        let Some(Value::Int(v)) = s.value.clone().map(|v| match v {
            Value::UInt(u) => Value::Int(u as i64),
            other => other,
        }) else {
            continue;
        };
        let key = (s.device.to_string(), s.property.to_string());
        if let Some(prev) = last.get(&key) {
            assert!(
                (v as u64) > *prev,
                "record {seq}: {key:?} went from {prev} to {v} (duplicate or reordered)"
            );
        }
        last.insert(key, v as u64);
    }
    Ok(recs.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_20_times_with_sigkill_loses_nothing_and_duplicates_nothing()
-> anyhow::Result<()> {
    let mut r = rig(8).await?;
    r.api
        .wait_for(Duration::from_secs(20), |api| async move {
            api.reported_u64("gw-1", "plc-1", "c0").await
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(&r)))?;
    // 20 kills at random moments while 16 counters change every 50 ms (commits, sends, acks
    // and the twin's write-behind all in flight at some point).
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(rng.u64(50..900))).await;
        if let Some(a) = r.agent.take() {
            a.kill9().await?;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        r.agent = Some(
            start_agent(
                r.tmp.path(),
                &r.pki,
                &format!("spiffe://{TD}/edge/gw-1"),
                &r.tunnel,
                &devices(&r.sim, 8),
            )
            .await?,
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    freeze(&r);
    converged(&r, 8, Duration::from_secs(20))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(&r)))?;
    // Stop the agent cleanly, then the hub, and read the hub's history.
    if let Some(a) = r.agent.take() {
        assert!(a.terminate().await?, "agent exits 0 on SIGTERM");
    }
    if let Some(h) = r.hub.take() {
        assert!(h.terminate().await?, "hub exits 0 on SIGTERM");
    }
    let store = HubStore::open(&r.tmp.path().join("hubdata").join("hub.sled"), 1 << 20)?;
    let n = check_history(&store, "gw-1")?;
    assert!(n > 50, "a meaningful history was stored ({n} records)");
    // Every sequence number the agent ever gave a record (its outbox's next - 1) is stored.
    let outbox = edgesync_edge::store::AgentStore::open(
        &r.tmp.path().join("gw-1").join("data").join("agent.sled"),
        1 << 20,
        1 << 30,
        edgesync_edge::store::Fsync::Never,
    )?;
    assert_eq!(
        outbox.next_seq() - 1,
        store.stored_seq(&NodeId::new("gw-1")?)?,
        "the hub stored every record the agent accepted"
    );
    assert_eq!(outbox.backlog(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_restart_agent_resumes_by_itself() -> anyhow::Result<()> {
    let mut r = rig(2).await?;
    r.api
        .wait_for(Duration::from_secs(20), |api| async move {
            api.reported_u64("gw-1", "plc-1", "c0").await
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(&r)))?;
    // Kill the hub hard; restart it on the same ports.
    if let Some(h) = r.hub.take() {
        h.kill9().await?;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (hub, _, _) = harness::start_hub(r.tmp.path(), &r.pki, &r.tunnel, &r.http).await?;
    r.hub = Some(hub);
    let before = r
        .api
        .reported_u64("gw-1", "plc-1", "c0")
        .await?
        .unwrap_or(0);
    r.api
        .wait_for(Duration::from_secs(20), move |api| async move {
            Ok(api
                .reported_u64("gw-1", "plc-1", "c0")
                .await?
                .filter(|v| *v > before + 5))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(&r)))?;
    freeze(&r);
    converged(&r, 2, Duration::from_secs(20)).await?;
    if let Some(a) = r.agent.take() {
        a.terminate().await?;
    }
    if let Some(h) = r.hub.take() {
        h.terminate().await?;
    }
    let store = HubStore::open(&r.tmp.path().join("hubdata").join("hub.sled"), 1 << 20)?;
    check_history(&store, "gw-1")?;
    Ok(())
}

async fn handshake_failures(api: &Api) -> anyhow::Result<f64> {
    let m = api.metrics().await?;
    Ok(m.lines()
        .filter(|l| l.starts_with("edgesync_hub_handshake_failures_total"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_non_edge_identities_are_refused() -> anyhow::Result<()> {
    let tmp = TempDir::new("refuse")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let (sim, _scripts) = start_sim(1).await?;
    let (_hub, tunnel, http) =
        harness::start_hub(tmp.path(), &pki, "127.0.0.1:0", "127.0.0.1:0").await?;
    let api = Api::new(&http);
    let devs = devices(&sim, 1);

    // 1. An edge of another trust domain, signed by its own CA, trusting ours.
    let evil_dir = tmp.path().join("evil");
    let evil = Pki::new(&evil_dir, "evil.org")?;
    let (cert, key) = evil.svid("spiffe://evil.org/edge/gw-x", "agent")?;
    let cfg = harness::agent_toml(
        &evil_dir,
        &tunnel,
        "evil.org",
        &cert,
        &key,
        &pki.bundle,
        &devs,
        "",
    )?;
    let a1 = harness::spawn_agent(&cfg, &evil_dir.join("agent.log")).await?;

    // 2. A foreign trust-domain id signed by our own CA (the hub must check the domain).
    let (cert2, key2) = pki.svid("spiffe://evil.org/edge/gw-y", "foreign")?;
    let d2 = tmp.path().join("foreign");
    std::fs::create_dir_all(&d2)?;
    let cfg2 = harness::agent_toml(
        &d2,
        &tunnel,
        "evil.org",
        &cert2,
        &key2,
        &pki.bundle,
        &devs,
        "",
    )?;
    let a2 = harness::spawn_agent(&cfg2, &d2.join("agent.log")).await;

    // 3. A non-edge path of our trust domain.
    let (cert3, key3) = pki.svid(&format!("spiffe://{TD}/workload/gw-z"), "workload")?;
    let d3 = tmp.path().join("workload");
    std::fs::create_dir_all(&d3)?;
    let cfg3 = harness::agent_toml(&d3, &tunnel, TD, &cert3, &key3, &pki.bundle, &devs, "")?;
    let a3 = harness::spawn_agent(&cfg3, &d3.join("agent.log")).await?;

    // The hub counts refused handshakes and never lists these nodes.
    api.wait_for(Duration::from_secs(20), |api| async move {
        Ok((handshake_failures(&api).await? >= 2.0).then_some(()))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}\n{}", a1.log_text(), a3.log_text()))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, nodes) = api.get("/api/v1/nodes").await?;
    assert_eq!(
        nodes.as_array().map(|a| a.len()),
        Some(0),
        "no refused node may appear: {nodes}"
    );
    // Agents 2 and 3 refuse to even start with an identity that is not an edge of their
    // trust domain, or keep failing to connect; either way nothing got through.
    if let Ok(a2) = a2 {
        drop(a2);
    }
    drop(a1);
    drop(a3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_a_hub_with_the_wrong_id() -> anyhow::Result<()> {
    let tmp = TempDir::new("wronghub")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let (sim, _scripts) = start_sim(1).await?;
    // The hub presents spiffe://example.org/impostor (and is configured to be it).
    let (cert, key) = pki.svid(&format!("spiffe://{TD}/impostor"), "hub")?;
    let cfg = harness::hub_toml(
        tmp.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        TD,
        &cert,
        &key,
        &pki.bundle,
        Some(&format!("spiffe://{TD}/impostor")),
    )?;
    let hub = Proc::spawn(
        &harness::bin("edgesync-hub")?,
        &["run", "--config", &cfg.display().to_string()],
        &tmp.path().join("hub.log"),
        Some("edgesync-hub listening"),
    )
    .await?;
    let (tunnel, http) = harness::hub_addrs(hub.ready_line.as_deref().unwrap_or_default())?;
    let agent = start_agent(
        tmp.path(),
        &pki,
        &format!("spiffe://{TD}/edge/gw-1"),
        &tunnel,
        &devices(&sim, 1),
    )
    .await?;
    let api = Api::new(&http);
    // The agent tries, and refuses the hub's certificate, every time.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = agent.log_text();
        if log.matches("uplink down").count() >= 2 {
            assert!(
                log.contains("spiffe://example.org/impostor")
                    && log.contains("invalid peer certificate"),
                "the agent names the refused hub id: {log}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent never reported the refusal:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, nodes) = api.get("/api/v1/nodes").await?;
    assert_eq!(nodes.as_array().map(|a| a.len()), Some(0), "{nodes}");
    Ok(())
}

async fn metric_sum(api: &Api, name: &str) -> anyhow::Result<f64> {
    let m = api.metrics().await?;
    Ok(m.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum())
}

/// A peer with a valid edge SVID that sends garbage: an oversized frame, a malformed frame,
/// a frame of an unknown kind. Each is counted and logged; the hub keeps serving the real
/// agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_from_a_peer_are_counted_and_harmless() -> anyhow::Result<()> {
    use edgesync_edge::uplink::{UplinkConfig, client_config, svid_from_files};
    let r = rig(1).await?;
    r.api
        .wait_for(Duration::from_secs(20), |api| async move {
            api.reported_u64("gw-1", "plc-1", "c0").await
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(&r)))?;
    let (cert, key) = r.pki.svid(&format!("spiffe://{TD}/edge/rogue"), "rogue")?;
    let ucfg = UplinkConfig {
        hub_address: r.tunnel.clone(),
        hub_id: edgesync_protocol::spiffe_id::parse_id(&format!("spiffe://{TD}/hub"))?,
        svid: svid_from_files(&cert, &key, &r.pki.bundle)?,
        svid_rotated: None,
        connect_timeout: Duration::from_secs(5),
        keepalive: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(5),
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
        batch_max_records: 10,
        agent_version: "rogue".into(),
        boot_id: "x".into(),
    };
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let hub_addr: std::net::SocketAddr = r.tunnel.parse()?;
    let payloads: [&[u8]; 3] = [
        // Announces 100 MB.
        &[0x06, 0x00, 0x00, 0x00],
        // 3 bytes of invalid protobuf.
        &[0, 0, 0, 3, 0xff, 0xff, 0xff],
        // A frame with only an unknown field (tag 99), then silence.
        &[0, 0, 0, 3, 0x98, 0x06, 0x01],
    ];
    for p in payloads {
        let conn = ep
            .connect_with(client_config(&ucfg)?, hub_addr, "hub")?
            .await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(p).await?;
        // The hub answers by closing (or, for the unknown frame, by ignoring it).
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(2), recv.read(&mut buf)).await;
        conn.close(0u32.into(), b"done");
    }
    r.api
        .wait_for(Duration::from_secs(10), |api| async move {
            let bad = metric_sum(&api, "edgesync_hub_bad_frames_total").await?;
            let unknown = metric_sum(&api, "edgesync_hub_unknown_frames_total").await?;
            Ok((bad >= 2.0 && unknown >= 1.0).then_some(()))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(&r)))?;
    // The real agent is unaffected: its values keep flowing.
    let now = r
        .api
        .reported_u64("gw-1", "plc-1", "c0")
        .await?
        .unwrap_or(0);
    r.api
        .wait_for(Duration::from_secs(10), move |api| async move {
            Ok(api
                .reported_u64("gw-1", "plc-1", "c0")
                .await?
                .filter(|v| *v > now))
        })
        .await?;
    Ok(())
}

/// A write through the agent is encoded with the tag's codec, written to the PLC, verified by
/// reading back, and the new value then flows to the hub like any other change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_writes_are_verified_and_reach_the_hub() -> anyhow::Result<()> {
    use edgesync_edge::agent::Agent;
    use edgesync_edge::modbus::write::{WriteError, WriteOutcome};
    use edgesync_protocol::{DeviceId, PropertyId};

    let tmp = TempDir::new("write")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let sim = SimHandle::start("127.0.0.1:0".parse()?, SimConfig::with_units([1])).await?;
    let (hub, tunnel, http) =
        harness::start_hub(tmp.path(), &pki, "127.0.0.1:0", "127.0.0.1:0").await?;
    let (cert, key) = pki.svid(&format!("spiffe://{TD}/edge/gw-w"), "agent")?;
    let extra = String::new();
    let dev = SimDevice {
        id: "plc-1".into(),
        endpoint: sim.local_addr().to_string(),
        unit: 1,
        counters: 1,
        poll_ms: 50,
    };
    let cfg = harness::agent_toml(
        tmp.path(),
        &tunnel,
        TD,
        &cert,
        &key,
        &pki.bundle,
        &[dev],
        &extra,
    )?;
    // Add writable tags: a float32 set point (CDAB) and a bit of a status word.
    let mut text = std::fs::read_to_string(&cfg)?;
    text.push_str(
        "[[devices.tags]]\nname = \"setpoint\"\naddress = \"40011\"\ntype = \"float32\"\nbyte_order = \"CDAB\"\naccess = \"read_write\"\n\n\
         [[devices.tags]]\nname = \"run\"\naddress = \"40021\"\ntype = \"bool\"\nbit = 3\naccess = \"read_write\"\n",
    );
    std::fs::write(&cfg, text)?;
    let cfg = edgesync_edge::config::load(&cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
    sim.set_holding(1, 20, &[0b1000_1001])?;
    let agent = Agent::start(cfg).await?;
    let d = DeviceId::new("plc-1")?;

    let out = agent
        .write(&d, &PropertyId::new("setpoint")?, Value::Float(21.5))
        .await?;
    assert_eq!(out, WriteOutcome::Verified);
    // 21.5f32 = 0x41AC0000; CDAB puts the low word first.
    assert_eq!(sim.holding(1, 10, 2)?, vec![0x0000, 0x41AC]);
    agent
        .write(&d, &PropertyId::new("run")?, Value::Bool(false))
        .await?;
    assert_eq!(
        sim.holding(1, 20, 1)?,
        vec![0b1000_0001],
        "only bit 3 changed"
    );
    // A read-only tag is refused before anything is sent.
    let refused = agent
        .write(&d, &PropertyId::new("c0")?, Value::UInt(1))
        .await;
    assert!(
        matches!(refused, Err(WriteError::NotWritable { .. })),
        "{refused:?}"
    );

    let api = Api::new(&http);
    api.wait_for(Duration::from_secs(15), |api| async move {
        let (status, twin) = api.get("/api/v1/nodes/gw-w/devices/plc-1/twin").await?;
        Ok(
            (status == 200 && twin["reported"]["setpoint"]["value"].as_f64() == Some(21.5))
                .then_some(()),
        )
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", hub.log_text()))?;
    agent.shutdown().await;
    Ok(())
}

/// Invariant: the hub converges to what the PLC holds after any crash of the agent, whatever
/// the moment. The sequence that once left the hub stale for good: a register goes A → B, the
/// hub shows B, the agent is SIGKILLed within the twin's one-second write-behind (so the
/// persisted twin may still say A), the PLC goes back to A, the agent restarts. The restarted
/// agent must report A although its persisted twin says A too. 20 rounds, the kill moved
/// across the write-behind second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_converges_to_the_plc_after_a_kill_at_any_moment() -> anyhow::Result<()> {
    const A: u64 = 111;
    const B: u64 = 222;
    let mut r = rig(1).await?;
    freeze(&r);
    let node = format!("spiffe://{TD}/edge/gw-1");
    let shows = |want: u64| {
        move |api: Api| async move {
            Ok(api
                .reported_u64("gw-1", "plc-1", "c0")
                .await?
                .filter(|v| *v == want))
        }
    };
    r.sim.set_holding(1, 0, &[A as u16])?;
    r.api
        .wait_for(Duration::from_secs(20), shows(A))
        .await
        .map_err(|e| anyhow::anyhow!("initial A: {e}\n{}", logs(&r)))?;
    for round in 0..20u64 {
        r.sim.set_holding(1, 0, &[B as u16])?;
        r.api
            .wait_for(Duration::from_secs(10), shows(B))
            .await
            .map_err(|e| anyhow::anyhow!("round {round}: B: {e}\n{}", logs(&r)))?;
        // Kill at a moment spread over the write-behind second (and a little beyond).
        tokio::time::sleep(Duration::from_millis((round * 61) % 1100)).await;
        if let Some(a) = r.agent.take() {
            a.kill9().await?;
        }
        r.sim.set_holding(1, 0, &[A as u16])?;
        r.agent =
            Some(start_agent(r.tmp.path(), &r.pki, &node, &r.tunnel, &devices(&r.sim, 1)).await?);
        r.api
            .wait_for(Duration::from_secs(10), shows(A))
            .await
            .map_err(|e| anyhow::anyhow!("round {round}: back to A: {e}\n{}", logs(&r)))?;
    }
    Ok(())
}
