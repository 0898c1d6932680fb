//! The twin both ways with real processes: desired values set through the hub API land in
//! the PLC, outcomes come back, and a desired value set while the agent is down is applied
//! when it returns.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use edgesync_testkit::harness::{self, Api, Pki, Proc, TempDir};
use edgesync_testkit::sim::{Fault, SimConfig, SimHandle, Table};
use serde_json::json;

const TD: &str = "example.org";
const TWIN: &str = "/api/v1/nodes/gw-1/devices/plc-1/twin";

/// An agent with one device: `sp` (holding 10, uint16, read_write), `ro` (holding 11,
/// read only), `bad` (holding 20, read_write; the simulator answers exception 2 there).
async fn start_agent(tmp: &Path, pki: &Pki, tunnel: &str, plc: &str) -> anyhow::Result<Proc> {
    let dir = tmp.join("gw-1");
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = harness::node_svid(pki, &dir, TD, "gw-1")?;
    let mut s = String::new();
    writeln!(
        s,
        "[agent]\ndata_dir = {:?}\ndesired_expiry_ms = 30000\n",
        dir.join("data").display().to_string()
    )?;
    writeln!(
        s,
        "[hub]\naddress = {tunnel:?}\nbackoff_initial_ms = 100\nbackoff_max_ms = 1000\nkeepalive_ms = 500\nidle_timeout_ms = 3000\n"
    )?;
    s.push_str(&harness::identity_toml(TD, &cert, &key, &pki.bundle));
    writeln!(
        s,
        "[outbox]\ncommit_interval_ms = 10\n\n[mqtt]\nmode = \"off\"\n"
    )?;
    writeln!(
        s,
        "[[devices]]\nid = \"plc-1\"\nprotocol = \"tcp\"\nendpoint = {plc:?}\nunit_id = 1\npoll_interval_ms = 50\ntimeout_ms = 300\n"
    )?;
    for (name, addr, access) in [
        ("sp", 10, "read_write"),
        ("ro", 11, "read"),
        ("bad", 20, "read_write"),
    ] {
        writeln!(
            s,
            "[[devices.tags]]\nname = {name:?}\ntable = \"holding_register\"\naddress = {addr}\ntype = \"uint16\"\naccess = {access:?}\n"
        )?;
    }
    let path = dir.join("agent.toml");
    std::fs::write(&path, s)?;
    harness::spawn_agent(&path, &dir.join("agent.log")).await
}

async fn outcome(api: &Api, prop: &str, version: u64) -> anyhow::Result<Option<String>> {
    let (status, v) = api.get(TWIN).await?;
    if status != 200 {
        return Ok(None);
    }
    let d = &v["desired"][prop];
    if d["version"].as_u64() != Some(version) {
        return Ok(None);
    }
    Ok(d["applied"]["outcome"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_values_reach_the_plc_and_outcomes_reach_the_hub() -> anyhow::Result<()> {
    let tmp = TempDir::new("twin")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let sim = SimHandle::start("127.0.0.1:0".parse()?, SimConfig::with_units([1])).await?;
    sim.set_fault(
        1,
        Fault::ExceptionAt {
            table: Table::HoldingRegisters,
            addr_range: 20..21,
            code: 2,
        },
    )?;
    let (hub, tunnel, http) =
        harness::start_hub(tmp.path(), &pki, "127.0.0.1:0", "127.0.0.1:0").await?;
    let plc = sim.local_addr().to_string();
    let mut agent = Some(start_agent(tmp.path(), &pki, &tunnel, &plc).await?);
    let api = Api::new(&http);
    let logs = |agent: &Option<Proc>| {
        format!(
            "--- agent ---\n{}\n--- hub ---\n{}",
            agent.as_ref().map(|a| a.log_text()).unwrap_or_default(),
            hub.log_text()
        )
    };
    api.wait_for(Duration::from_secs(20), |api| async move {
        api.reported_u64("gw-1", "plc-1", "sp").await
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(&agent)))?;

    // Invalid changes are refused with the field named, and nothing is sent.
    for (body, field) in [
        (json!({"ro": 1}), "ro"),
        (json!({"sp": "high"}), "sp"),
        (json!({"sp": 70000}), "sp"),
        (json!({"nope": 1}), "nope"),
    ] {
        let (status, v) = api.patch(&format!("{TWIN}/desired"), &body).await?;
        assert!((400..500).contains(&status), "{body}: {status} {v}");
        assert!(v.to_string().contains(field), "{body}: {v}");
    }

    // A good one lands in the PLC's register, and the hub shows it applied.
    let (status, v) = api
        .patch(&format!("{TWIN}/desired"), &json!({"sp": 1234}))
        .await?;
    assert_eq!(status, 200, "{v}");
    let version = v["versions"]["sp"].as_u64().unwrap_or(0);
    assert!(version > 0, "{v}");
    let s = sim.clone();
    api.wait_for(Duration::from_secs(10), move |_| {
        let s = s.clone();
        async move { Ok(s.holding(1, 10, 1)?.first().copied().filter(|v| *v == 1234)) }
    })
    .await
    .map_err(|e| anyhow::anyhow!("register: {e}\n{}", logs(&agent)))?;
    let got = api
        .wait_for(Duration::from_secs(10), |api| async move {
            outcome(&api, "sp", version).await
        })
        .await
        .map_err(|e| anyhow::anyhow!("outcome: {e}\n{}", logs(&agent)))?;
    assert_eq!(got, "ok");
    api.wait_for(Duration::from_secs(10), |api| async move {
        Ok(api
            .reported_u64("gw-1", "plc-1", "sp")
            .await?
            .filter(|v| *v == 1234))
    })
    .await?;

    // A write the device refuses shows the exception in the hub.
    let (status, v) = api
        .patch(&format!("{TWIN}/desired"), &json!({"bad": 5}))
        .await?;
    assert_eq!(status, 200, "{v}");
    let bad_version = v["versions"]["bad"].as_u64().unwrap_or(0);
    let got = api
        .wait_for(Duration::from_secs(10), |api| async move {
            outcome(&api, "bad", bad_version).await
        })
        .await
        .map_err(|e| anyhow::anyhow!("exception outcome: {e}\n{}", logs(&agent)))?;
    assert_eq!(got, "exception");
    let (_, twin) = api.get(TWIN).await?;
    assert_eq!(twin["desired"]["bad"]["applied"]["detail"], 2, "{twin}");

    // Set while the agent is stopped: applied once it starts, exactly once.
    if let Some(a) = agent.take() {
        a.terminate().await?;
    }
    let (status, v) = api
        .patch(&format!("{TWIN}/desired"), &json!({"sp": 777}))
        .await?;
    assert_eq!(status, 200, "{v}");
    let offline_version = v["versions"]["sp"].as_u64().unwrap_or(0);
    assert!(offline_version > version);
    assert_eq!(
        sim.holding(1, 10, 1)?,
        vec![1234],
        "nothing written while the agent is down"
    );
    sim.reset_counters();
    agent = Some(start_agent(tmp.path(), &pki, &tunnel, &plc).await?);
    let got = api
        .wait_for(Duration::from_secs(20), |api| async move {
            outcome(&api, "sp", offline_version).await
        })
        .await
        .map_err(|e| anyhow::anyhow!("offline outcome: {e}\n{}", logs(&agent)))?;
    assert_eq!(got, "ok");
    assert_eq!(sim.holding(1, 10, 1)?, vec![777]);
    // Restart once more: the version is not applied again (FC 6 count stays).
    let writes = sim.request_count_fc(1, 6) + sim.request_count_fc(1, 16);
    assert!(writes >= 1);
    if let Some(a) = agent.take() {
        a.kill9().await?;
    }
    agent = Some(start_agent(tmp.path(), &pki, &tunnel, &plc).await?);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        sim.request_count_fc(1, 6) + sim.request_count_fc(1, 16),
        writes,
        "a restarted agent does not write an applied version again\n{}",
        logs(&agent)
    );
    drop(agent);
    Ok(())
}
