//! Local rules with real processes (issue 10): a rule file in the agent's rules directory
//! raises an alarm on a simulator value; the alarm reaches the hub (API) and a local MQTT app,
//! an operator acknowledges it, and it clears when the value returns. The same with the hub
//! stopped: the alarm reaches the local app at once and the hub when it starts; a restarted
//! agent neither raises an active alarm again nor loses it.

use std::time::Duration;

use anyhow::Context;
use edgesync_testkit::harness::{self, Api, Pki, TempDir};
use edgesync_testkit::sim::{SimConfig, SimHandle};
use serde_json::Value as Json;

use crate::support::{self, App, Bus, DEVICE, LEVEL, NODE, SP, TD, with_log};

const WAIT: Duration = Duration::from_secs(15);
const TOPIC: &str = "alarms/plc-1/level_high";

/// The rule: `level` above 50 is a critical alarm, published locally and sent to the hub.
const RULE: &str = r#"{
  "id": "level_high",
  "sql": "SELECT level, level - 50 AS excess FROM `plc-1` WHERE level > 50",
  "actions": [{"mqtt": {"topic": "alarms/{{device}}/{{rule}}"}}, {"hub": {}}, {"log": {}}],
  "alarm": {"severity": "critical", "labels": {"area": "tank farm"}}
}"#;

/// An interlock: with `level` above 50, `sp` is set to twice the level, through the twin's
/// desired path (checked, written, read back).
const WRITE_RULE: &str = r#"{
  "id": "double",
  "sql": "SELECT level * 2 AS target FROM `plc-1` WHERE level > 50",
  "actions": [{"write": {"device": "plc-1", "property": "sp", "field": "target"}}]
}"#;

async fn plc() -> anyhow::Result<SimHandle> {
    let sim = SimHandle::start("127.0.0.1:0".parse()?, SimConfig::with_units([1])).await?;
    sim.set_holding(1, SP, &[100, 7, 10])?;
    Ok(sim)
}

/// The agent's `[mqtt]` and `[rules]`, with the rule written into `dir/rules`.
fn agent_extra(dir: &std::path::Path, bus: &Bus) -> anyhow::Result<String> {
    let rules = dir.join("rules");
    std::fs::create_dir_all(&rules)?;
    std::fs::write(rules.join("level_high.json"), RULE)?;
    std::fs::write(rules.join("double.json"), WRITE_RULE)?;
    Ok(format!(
        "{}\n[rules]\ndir = {:?}\nreload_interval_ms = 500\n",
        bus.toml,
        rules.display().to_string()
    ))
}

async fn alarms(api: &Api) -> anyhow::Result<Vec<Json>> {
    let (status, v) = api.get(&format!("/api/v1/nodes/{NODE}/alarms")).await?;
    anyhow::ensure!(status == 200, "alarms: {status} {v}");
    Ok(v["alarms"].as_array().cloned().unwrap_or_default())
}

async fn hub_alarms_become(api: &Api, n: usize) -> anyhow::Result<Vec<Json>> {
    api.wait_for(WAIT, move |api| async move {
        let a = match alarms(&api).await {
            Ok(a) => a,
            Err(_) => return Ok(None),
        };
        Ok((a.len() == n).then_some(a))
    })
    .await
}

async fn watcher(bus: &Bus, id: &str) -> anyhow::Result<App> {
    let mut app = App::connect(bus.addr, id, bus.login(), WAIT).await?;
    app.subscribe("alarms/#").await?;
    Ok(app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_alarm_reaches_the_hub_and_a_local_app_is_acknowledged_and_clears()
-> anyhow::Result<()> {
    let tmp = TempDir::new("rules-alarm")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let sim = plc().await?;
    let (hub, tunnel, http) =
        harness::start_hub(tmp.path(), &pki, "127.0.0.1:0", "127.0.0.1:0").await?;
    let bus = Bus::embedded()?;
    let extra = agent_extra(tmp.path(), &bus)?;
    let agent = support::start_agent(
        tmp.path(),
        &pki,
        &tunnel,
        &sim.local_addr().to_string(),
        &extra,
    )
    .await?;
    let api = Api::new(&http);
    let r = async {
        api.wait_for(WAIT, |api| async move {
            api.reported_u64(NODE, DEVICE, "level").await
        })
        .await
        .context("the hub sees level")?;
        let mut app = watcher(&bus, "watcher").await?;
        anyhow::ensure!(alarms(&api).await?.is_empty());

        sim.set_holding(1, LEVEL, &[73])?;
        let raised = app
            .wait_for(TOPIC, WAIT, |j| j["alarm"] == "raised")
            .await
            .context("the local app sees the alarm")?;
        assert_eq!(raised["severity"], "critical", "{raised}");
        assert_eq!(raised["fields"]["level"], 73, "{raised}");
        assert_eq!(raised["fields"]["excess"], 23, "{raised}");
        assert_eq!(raised["labels"]["area"], "tank farm", "{raised}");
        // The interlock wrote sp = 2 x level to the PLC.
        let deadline = tokio::time::Instant::now() + WAIT;
        while sim.holding(1, SP, 1)?[0] != 146 {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "sp is {}, not 146",
                sim.holding(1, SP, 1)?[0]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let at_hub = hub_alarms_become(&api, 1)
            .await
            .context("the hub has the alarm")?;
        assert_eq!(at_hub[0]["rule"], "level_high", "{at_hub:?}");
        assert_eq!(at_hub[0]["device"], DEVICE, "{at_hub:?}");
        assert_eq!(at_hub[0]["fields"]["level"], 73, "{at_hub:?}");
        assert!(at_hub[0]["acked_by"].is_null(), "{at_hub:?}");

        // An operator acknowledges it; an unknown alarm is a 404.
        let (status, acked) = api
            .post(&format!(
                "/api/v1/nodes/{NODE}/alarms/level_high/{DEVICE}/ack"
            ))
            .await?;
        assert_eq!(status, 200, "{acked}");
        assert_eq!(acked["acked_by"], "test", "{acked}");
        let (status, v) = api
            .post(&format!("/api/v1/nodes/{NODE}/alarms/nope/{DEVICE}/ack"))
            .await?;
        assert_eq!(status, 404, "{v}");
        assert_eq!(alarms(&api).await?[0]["acked_by"], "test");

        // Still above: nothing new. Back below: cleared, locally and at the hub.
        sim.set_holding(1, LEVEL, &[80])?;
        sim.set_holding(1, LEVEL, &[20])?;
        let cleared = app
            .wait_for(TOPIC, WAIT, |j| j["alarm"] == "cleared")
            .await
            .context("the local app sees the clearing")?;
        assert!(cleared["cleared_ms"].as_u64().is_some(), "{cleared}");
        hub_alarms_become(&api, 0)
            .await
            .context("the hub clears it")?;
        let raised_again = app
            .wait_for(TOPIC, Duration::from_millis(500), |j| {
                j["alarm"] == "raised"
            })
            .await;
        assert!(raised_again.is_err(), "raised once only: {raised_again:?}");

        // The rules directory changes while the agent runs: a new rule takes effect; then a
        // broken file is refused whole and the running set keeps working.
        let rules = tmp.path().join("rules");
        app.subscribe("echo/#").await?;
        std::fs::write(
            rules.join("echo.json"),
            r#"{"id": "echo", "sql": "SELECT level FROM `plc-1`", "actions": [{"mqtt": {"topic": "echo/{{device}}"}}]}"#,
        )?;
        let mut level = 30u16;
        let echoed = async {
            loop {
                level += 1;
                sim.set_holding(1, LEVEL, &[level])?;
                let want = level;
                if app
                    .wait_for("echo/plc-1", Duration::from_millis(700), |j| j["level"] == want)
                    .await
                    .is_ok()
                {
                    return anyhow::Ok(());
                }
            }
        };
        tokio::time::timeout(WAIT, echoed)
            .await
            .context("the new rule never took effect")??;
        std::fs::write(rules.join("broken.json"), r#"{"id": "broken", "sql": "SELECT nope FROM `plc-1`"}"#)?;
        let deadline = tokio::time::Instant::now() + WAIT;
        while !agent.log_text().contains("the changed rule set is refused") {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "the broken set was not refused");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sim.set_holding(1, LEVEL, &[12])?;
        app.wait_for("echo/plc-1", WAIT, |j| j["level"] == 12)
            .await
            .context("the running set keeps working after a refused change")?;
        Ok(())
    }
    .await;
    with_log(r, &[&agent, &hub])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_hub_stopped_the_alarm_works_locally_and_reaches_the_hub_later()
-> anyhow::Result<()> {
    let tmp = TempDir::new("rules-offline")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let sim = plc().await?;
    // The hub's future address: nothing listens there yet.
    let hub_addr = support::dead_hub()?;
    let bus = Bus::embedded()?;
    let extra = agent_extra(tmp.path(), &bus)?;
    let plc_addr = sim.local_addr().to_string();
    let start_agent = || support::start_agent(tmp.path(), &pki, &hub_addr, &plc_addr, &extra);
    let first = start_agent().await?;
    let mut app = watcher(&bus, "watcher-1").await?;
    sim.set_holding(1, LEVEL, &[90])?;
    let r = app
        .wait_for(TOPIC, WAIT, |j| j["alarm"] == "raised")
        .await
        .context("raised locally with no hub");
    with_log(r, &[&first])?;

    // A restart while the alarm is active: not raised again, still active.
    drop(app);
    first.kill9().await?;
    let agent = start_agent().await?;
    let r = async {
        let mut app = watcher(&bus, "watcher-2").await?;
        let again = app
            .wait_for(TOPIC, Duration::from_secs(3), |j| j["alarm"] == "raised")
            .await;
        anyhow::ensure!(again.is_err(), "raised again after a restart: {again:?}");

        // The hub starts: the alarm raised while it was away reaches it.
        let (hub, _tunnel, http) =
            harness::start_hub(tmp.path(), &pki, &hub_addr, "127.0.0.1:0").await?;
        let api = Api::new(&http);
        let r = async {
            let a = hub_alarms_become(&api, 1)
                .await
                .context("the alarm reaches the hub later")?;
            assert_eq!(a[0]["rule"], "level_high", "{a:?}");
            assert_eq!(a[0]["fields"]["level"], 90, "{a:?}");
            // It clears as usual after the restart.
            sim.set_holding(1, LEVEL, &[5])?;
            app.wait_for(TOPIC, WAIT, |j| j["alarm"] == "cleared")
                .await
                .context("cleared after the restart")?;
            hub_alarms_become(&api, 0).await?;
            Ok(())
        }
        .await;
        with_log(r, &[&hub])
    }
    .await;
    with_log(r, &[&agent])
}
