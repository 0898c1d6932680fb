//! A local app on the gateway, with real processes: an MQTT client in the test talks to the
//! real `edgesync-agent` over its embedded broker and over a real Mosquitto, with no hub
//! running (the agent's `[hub] address` is a loopback port where nothing listens); the agent
//! restores its twin after SIGKILL and serves it before the PLC or the hub answer; and
//! concurrent desired changes from the hub and from the local app resolve as `docs/twin.md`
//! says, in both orders.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use edgesync_testkit::harness::{self, Api, Pki, TempDir};
use edgesync_testkit::sim::{Fault, SimConfig, SimHandle};
use serde_json::{Value as Json, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::support::{
    self, APPLIED, App, Bus, DELTA, DEVICE, DOCUMENT, LEVEL, Mosquitto, NODE, SP, TD, TELEMETRY,
    TWIN, UPDATE, UPDATE_RESULT, UdpRelay, with_log,
};

const WAIT: Duration = Duration::from_secs(10);

/// A PLC (our simulator, unit 1) holding sp = 100, ro = 7, level = 1.
async fn plc() -> anyhow::Result<SimHandle> {
    let sim = SimHandle::start("127.0.0.1:0".parse()?, SimConfig::with_units([1])).await?;
    sim.set_holding(1, SP, &[100, 7, 1])?;
    Ok(sim)
}

/// Waits until the simulator's register `addr` holds `want`.
async fn register_becomes(
    sim: &SimHandle,
    addr: u16,
    want: u16,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let got = sim.holding(1, addr, 1)?[0];
        if got == want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("register {addr} holds {got}, not {want}, after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects an app and subscribes to every topic of the node's devices and telemetry; waits
/// until the agent answers a `twin/get` (its own client may still be connecting).
async fn app(bus: &Bus, id: &str) -> anyhow::Result<App> {
    let mut app = App::connect(bus.addr, id, bus.login(), WAIT).await?;
    app.subscribe("$hw/events/#").await?;
    app.subscribe("edgesync/#").await?;
    answered(&mut app, &format!("{id}-hello"))
        .await
        .with_context(|| format!("through {}", bus.addr))?;
    Ok(app)
}

/// Sends `twin/get` every 300 ms until the agent answers one (its client may still be
/// connecting, or its request budget, `max_requests_per_s`, may be spent); the answer.
async fn answered(app: &mut App, prefix: &str) -> anyhow::Result<Json> {
    let deadline = Instant::now() + WAIT;
    let mut n = 0;
    loop {
        n += 1;
        let event_id = format!("{prefix}-{n}");
        app.publish(support::GET, format!(r#"{{"event_id":"{event_id}"}}"#))
            .await?;
        if let Ok(r) = app
            .wait_for(support::GET_RESULT, Duration::from_millis(300), |j| {
                j["event_id"] == event_id.as_str()
            })
            .await
        {
            return Ok(r);
        }
        if Instant::now() >= deadline {
            bail!("the agent never answered twin/get");
        }
    }
}

/// The whole local-app story against whatever broker `bus` is, with no hub anywhere.
async fn local_app_without_a_hub(tmp: &Path, bus: &Bus) -> anyhow::Result<()> {
    let pki = Pki::new(&tmp.join("pki"), TD)?;
    let sim = plc().await?;
    let agent = support::start_agent(
        tmp,
        &pki,
        &support::dead_hub()?,
        &sim.local_addr().to_string(),
        &bus.toml,
    )
    .await?;
    let started = Instant::now();
    with_log(app_story(bus, &sim, started).await, &[&agent])
}

async fn app_story(bus: &Bus, sim: &SimHandle, started: Instant) -> anyhow::Result<()> {
    let mut app = app(bus, "app-1").await?;

    // The twin, with what the PLC holds.
    let t = app
        .twin_until(WAIT, |t| {
            t["sp"]["actual"]["value"] == "100" && t["level"]["actual"]["value"] == "1"
        })
        .await
        .context("twin/get shows the PLC's values")?;
    eprintln!(
        "twin served {:?} after the agent started",
        started.elapsed()
    );
    let twin = &t["twin"];
    assert_eq!(twin["ro"]["actual"]["value"], "7", "{t}");
    assert_eq!(twin["sp"]["metadata"]["type"], "int", "{t}");
    assert_eq!(twin["sp"]["actual"]["metadata"]["quality"], "good", "{t}");
    assert!(
        twin["sp"].get("expected").is_none(),
        "no desired value yet: {t}"
    );

    // Telemetry follows the PLC.
    sim.set_holding(1, LEVEL, &[42])?;
    let tel = app
        .wait_for(TELEMETRY, WAIT, |j| j["level"]["value"] == 42)
        .await
        .context("telemetry of level = 42")?;
    assert_eq!(tel["level"]["quality"], "good", "{tel}");

    // Set an expected value: accepted, announced, written, caught up.
    let r = app.set_sp("set-1", "555").await?;
    assert!(r.get("code").is_none(), "accepted: {r}");
    assert_eq!(r["twin"]["sp"]["expected"]["value"], "555", "{r}");
    let doc = app
        .wait_for(DOCUMENT, WAIT, |j| {
            j["twin"]["sp"]["current"]["expected"]["value"] == "555"
        })
        .await
        .context("document of sp = 555")?;
    assert!(
        doc["twin"]["sp"]["last"].get("expected").is_none(),
        "no earlier desired value: {doc}"
    );
    app.wait_for(DELTA, WAIT, |j| j["delta"]["sp"] == "555")
        .await
        .context("delta while the PLC has not caught up")?;
    register_becomes(sim, SP, 555, WAIT).await?;
    app.wait_for(DELTA, WAIT, |j| j["delta"] == json!({}))
        .await
        .context("an empty delta once the PLC holds 555")?;
    let applied = app
        .wait_for(APPLIED, WAIT, |j| j["property"] == "sp")
        .await
        .context("the write's outcome on the applied topic")?;
    assert_eq!(applied["outcome"], "ok", "{applied}");
    assert_eq!(applied["value"], 555, "{applied}");
    assert_eq!(
        applied["version"], 0,
        "a local value the hub has not numbered: {applied}"
    );
    assert!(applied["ts_ms"].as_u64().is_some(), "{applied}");
    let t = app
        .twin_until(WAIT, |t| t["sp"]["actual"]["value"] == "555")
        .await?;
    assert_eq!(t["twin"]["sp"]["expected"]["value"], "555", "{t}");
    assert_eq!(t["twin"]["sp"]["applied"]["outcome"], "ok", "{t}");

    // Someone changes the register at the panel: the desired value differs again, a delta says
    // so.
    sim.set_holding(1, SP, &[600])?;
    let d = app
        .wait_for(DELTA, WAIT, |j| {
            j["delta"]["sp"] == "555" && j["twin"]["sp"]["actual"]["value"] == "600"
        })
        .await
        .context("a delta when the reading leaves the desired value")?;
    assert_eq!(d["twin"]["sp"]["expected"]["value"], "555", "{d}");

    // Bad requests get an error result, change nothing, and polling goes on.
    app.publish(UPDATE, "{not json").await?;
    let r = app
        .wait_for(UPDATE_RESULT, WAIT, |j| {
            j["event_id"] == "" && j["code"] == 400
        })
        .await
        .context("not JSON")?;
    assert!(
        r["reason"].as_str().unwrap_or("").contains("not JSON"),
        "{r}"
    );
    for (event_id, twin, property, needle) in [
        (
            "bad-2",
            r#"{"nosuch":{"expected":{"value":"1"}}}"#,
            "nosuch",
            "no property",
        ),
        (
            "bad-3",
            r#"{"sp":{"expected":{"value":"hot"}}}"#,
            "sp",
            "not a number",
        ),
        (
            "bad-4",
            r#"{"sp":{"expected":{"value":"70000"}}}"#,
            "sp",
            "sp",
        ),
        (
            "bad-5",
            r#"{"ro":{"expected":{"value":"3"}}}"#,
            "ro",
            "not writable",
        ),
        ("bad-6", r#"{"sp":{"expected":{"value":true}}}"#, "sp", "sp"),
    ] {
        let r = app
            .request(
                UPDATE,
                UPDATE_RESULT,
                event_id,
                &format!(r#"{{"event_id":"{event_id}","twin":{twin}}}"#),
            )
            .await?;
        assert_eq!(r["code"], 400, "{event_id}: {r}");
        assert_eq!(r["errors"][0]["property"], property, "{event_id}: {r}");
        assert!(
            r["reason"].as_str().unwrap_or("").contains(needle),
            "{event_id}: {r}"
        );
    }
    let r = app
        .request(
            "$hw/events/device/nosuch/twin/update",
            "$hw/events/device/nosuch/twin/update/result",
            "bad-7",
            r#"{"event_id":"bad-7","twin":{"sp":{"expected":{"value":"1"}}}}"#,
        )
        .await?;
    assert_eq!(r["code"], 404, "{r}");
    app.publish(support::GET, "][").await?;
    app.wait_for(support::GET_RESULT, WAIT, |j| j["code"] == 400)
        .await
        .context("twin/get with a payload that is not JSON")?;
    // A flood of garbage does not stall polling either. (Requests above `max_requests_per_s`,
    // 200 by default, are dropped unanswered: the next request is retried until the budget
    // allows it, as an app would.)
    for i in 0..300 {
        app.publish(UPDATE, format!("garbage {i}")).await?;
    }
    sim.set_holding(1, LEVEL, &[43])?;
    app.wait_for(TELEMETRY, WAIT, |j| j["level"]["value"] == 43)
        .await
        .context("polling continues after bad requests")?;
    assert_eq!(sim.holding(1, SP, 1)?, vec![600], "nothing was written");
    // The budget is spent now; it refills within a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let t = answered(&mut app, "after-bad").await?;
    assert_eq!(t["twin"]["sp"]["expected"]["value"], "555", "{t}");

    // And a good request still works.
    let r = app.set_sp("set-2", "700").await?;
    assert!(r.get("code").is_none(), "{r}");
    register_becomes(sim, SP, 700, WAIT).await?;

    // Another app cannot speak for the agent (the embedded broker's guard, or the broker's
    // ACL): its messages on the agent's topics reach nobody.
    let spoofer = App::connect(bus.addr, "spoofer", bus.login(), WAIT).await?;
    spoofer
        .publish(
            TELEMETRY,
            r#"{"level":{"value":9999,"quality":"good","ts":1}}"#,
        )
        .await?;
    spoofer
        .publish(
            UPDATE_RESULT,
            r#"{"event_id":"spoofed","timestamp":1,"twin":{}}"#,
        )
        .await?;
    // The embedded broker closes the spoofer's connection; Mosquitto drops what the ACL
    // denies and keeps the connection. Either way, give the messages time to be sent.
    let closed = spoofer.wait_closed(Duration::from_millis(1000)).await;
    assert_eq!(
        closed,
        bus.app_login.is_none(),
        "the embedded broker (only) closes a spoofer's connection"
    );
    drop(spoofer);
    sim.set_holding(1, LEVEL, &[44])?;
    app.wait_for(TELEMETRY, WAIT, |j| j["level"]["value"] == 44)
        .await
        .context("telemetry after the spoofing attempt")?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let spoofed_telemetry = app
        .collect(TELEMETRY, Duration::from_millis(200))
        .await
        .into_iter()
        .filter(|j| j["level"]["value"] == 9999)
        .count();
    let spoofed_results = app
        .collect(UPDATE_RESULT, Duration::ZERO)
        .await
        .into_iter()
        .filter(|j| j["event_id"] == "spoofed")
        .count();
    assert_eq!(
        (spoofed_telemetry, spoofed_results),
        (0, 0),
        "spoofed messages were delivered"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_app_over_the_embedded_broker_without_a_hub() -> anyhow::Result<()> {
    let tmp = TempDir::new("local-emb")?;
    let bus = Bus::embedded()?;
    local_app_without_a_hub(tmp.path(), &bus).await
}

/// The ACL `docs/mqtt.md` recommends for an external broker: apps read everything and write
/// only requests, so they cannot speak for the agent.
const MOSQUITTO_ACL: &str = "\
user agent
topic readwrite $hw/events/#
topic readwrite edgesync/#

user app
topic read $hw/events/#
topic read edgesync/#
topic write $hw/events/device/+/twin/update
topic write $hw/events/device/+/twin/get
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_app_over_mosquitto_without_a_hub() -> anyhow::Result<()> {
    let tmp = TempDir::new("local-mosq")?;
    let m = Mosquitto::start(
        &tmp.path().join("mosquitto"),
        &[("agent", "agent-pw"), ("app", "app-pw")],
        Some(MOSQUITTO_ACL),
    )
    .await?;
    let bus = m.bus(("agent", "agent-pw"), ("app", "app-pw"));
    local_app_without_a_hub(tmp.path(), &bus).await
}

/// The embedded broker refuses apps that publish on the agent's own topics (results,
/// documents, deltas, state, tunnel state, telemetry, outcomes): the spoofing client is
/// disconnected and nobody receives its message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_refuses_spoofed_agent_messages() -> anyhow::Result<()> {
    let tmp = TempDir::new("local-spoof")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let sim = plc().await?;
    let bus = Bus::embedded()?;
    let agent = support::start_agent(
        tmp.path(),
        &pki,
        &support::dead_hub()?,
        &sim.local_addr().to_string(),
        &bus.toml,
    )
    .await?;
    let r = async {
        let mut watcher = app(&bus, "watcher").await?;
        for (i, topic) in [
            TELEMETRY,
            APPLIED,
            support::UPDATE_RESULT,
            support::GET_RESULT,
            DOCUMENT,
            DELTA,
            "$hw/events/device/plc-1/state/update",
            "$hw/events/connected/gw-1",
            "$hw/events/disconnected/gw-1",
        ]
        .into_iter()
        .enumerate()
        {
            let spoofer = App::connect(bus.addr, &format!("spoofer-{i}"), None, WAIT).await?;
            spoofer
                .publish(topic, r#"{"spoofed":true,"event_id":"spoof"}"#)
                .await?;
            assert!(
                spoofer.wait_closed(WAIT).await,
                "a client publishing on {topic} is disconnected"
            );
            let seen = watcher
                .collect(topic, Duration::from_millis(400))
                .await
                .into_iter()
                .filter(|j| j["spoofed"] == true)
                .count();
            assert_eq!(seen, 0, "a spoofed message on {topic} was delivered");
            drop(spoofer);
        }
        // On the wire: the guard closes the connection of a client that publishes there.
        let mut s = tokio::net::TcpStream::connect(bus.addr).await?;
        s.write_all(&raw_connect("raw-spoofer")).await?;
        let mut ack = [0u8; 4];
        tokio::time::timeout(WAIT, s.read_exact(&mut ack)).await??;
        assert_eq!(ack, [0x20, 2, 0, 0]);
        s.write_all(&raw_publish(TELEMETRY, br#"{"spoofed":true}"#))
            .await?;
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await;
        assert!(
            matches!(closed, Ok(Ok(_)) | Ok(Err(_))),
            "the spoofer's connection was not closed"
        );
        // A will on an agent topic is refused at CONNECT.
        let mut o = rumqttc::MqttOptions::new("will-spoofer", "127.0.0.1", bus.addr.port());
        o.set_last_will(rumqttc::LastWill::new(
            TELEMETRY,
            r#"{"spoofed":true}"#,
            rumqttc::QoS::AtMostOnce,
            false,
        ));
        let (_c, mut ev) = rumqttc::AsyncClient::new(o, 10);
        let first = tokio::time::timeout(WAIT, ev.poll()).await?;
        assert!(
            matches!(
                first,
                Err(rumqttc::ConnectionError::ConnectionRefused(
                    rumqttc::ConnectReturnCode::NotAuthorized
                ))
            ),
            "a will on an agent topic: {first:?}"
        );
        // The agent's own messages still flow, and apps may still use their own topics.
        sim.set_holding(1, LEVEL, &[77])?;
        watcher
            .wait_for(TELEMETRY, WAIT, |j| j["level"]["value"] == 77)
            .await?;
        let other = App::connect(bus.addr, "other", None, WAIT).await?;
        other.publish("plant/line-1/notes", r#"{"n":1}"#).await?;
        watcher.subscribe("plant/#").await?;
        other.publish("plant/line-1/notes", r#"{"n":2}"#).await?;
        watcher
            .wait_for("plant/line-1/notes", WAIT, |j| j["n"] == 2)
            .await?;
        Ok(())
    }
    .await;
    with_log(r, &[&agent])
}

/// An MQTT 3.1.1 CONNECT with a clean session and `id`.
fn raw_connect(id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut p = vec![0x10, body.len() as u8];
    p.extend(body);
    p
}

/// A QoS 0 PUBLISH (short: one length byte).
fn raw_publish(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(payload);
    let mut p = vec![0x30, body.len() as u8];
    p.extend(body);
    p
}

/// After SIGKILL, with the PLC not answering and no hub, the restarted agent serves the twin
/// it restored from sled over MQTT: the last values read and the desired value set by the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_serves_the_restored_twin_before_the_plc_or_the_hub_answer()
-> anyhow::Result<()> {
    let tmp = TempDir::new("local-restart")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let sim = plc().await?;
    sim.set_holding(1, LEVEL, &[42])?;
    let bus = Bus::embedded()?;
    let hub = support::dead_hub()?;
    let plc_addr = sim.local_addr().to_string();
    let agent = support::start_agent(tmp.path(), &pki, &hub, &plc_addr, &bus.toml).await?;
    let r = async {
        let mut app = app(&bus, "before").await?;
        app.twin_until(WAIT, |t| {
            t["sp"]["actual"]["value"] == "100" && t["level"]["actual"]["value"] == "42"
        })
        .await?;
        let r = app.set_sp("before-1", "555").await?;
        assert!(r.get("code").is_none(), "{r}");
        register_becomes(&sim, SP, 555, WAIT).await?;
        app.wait_for(APPLIED, WAIT, |j| j["outcome"] == "ok")
            .await?;
        app.twin_until(WAIT, |t| t["sp"]["actual"]["value"] == "555")
            .await?;
        Ok(())
    }
    .await;
    with_log(r, &[&agent])?;
    // The twin is written behind at most once a second: give it time to reach sled.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // The PLC stops answering, the agent dies.
    sim.set_fault(1, Fault::NoAnswer)?;
    agent.kill9().await?;
    sim.reset_counters();
    let restarted = Instant::now();
    let agent = support::start_agent(tmp.path(), &pki, &hub, &plc_addr, &bus.toml).await?;
    let r = async {
        let mut app = app(&bus, "after").await?;
        let t = app.twin("after-1").await?;
        let served = restarted.elapsed();
        eprintln!("the restarted agent served its twin {served:?} after it was started");
        let twin = &t["twin"];
        assert_eq!(twin["sp"]["actual"]["value"], "555", "{t}");
        assert_eq!(twin["sp"]["expected"]["value"], "555", "{t}");
        assert_eq!(twin["sp"]["applied"]["outcome"], "ok", "{t}");
        assert_eq!(twin["level"]["actual"]["value"], "42", "{t}");
        assert_eq!(twin["ro"]["actual"]["value"], "7", "{t}");
        // Nothing of it came from the PLC: it has not answered a single request.
        assert_eq!(sim.fault(1)?, Fault::NoAnswer);

        // The PLC answers again: polling resumes, and the applied value is not written again.
        sim.set_holding(1, LEVEL, &[43])?;
        sim.set_fault(1, Fault::None)?;
        app.wait_for(TELEMETRY, WAIT, |j| {
            j["level"]["value"] == 43 && j["level"]["quality"] == "good"
        })
        .await
        .context("telemetry after the PLC came back")?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            sim.request_count_fc(1, 6) + sim.request_count_fc(1, 16),
            0,
            "a restarted agent does not write an applied value again"
        );

        // A value set while the PLC does not answer is pending, and written when it answers.
        sim.set_fault(1, Fault::NoAnswer)?;
        let r = app.set_sp("while-down", "777").await?;
        assert!(r.get("code").is_none(), "{r}");
        let p = app
            .wait_for(APPLIED, WAIT, |j| j["value"] == 777)
            .await
            .context("an outcome for 777")?;
        assert_eq!(p["outcome"], "pending", "{p}");
        assert_eq!(sim.holding(1, SP, 1)?, vec![555]);
        sim.set_fault(1, Fault::None)?;
        register_becomes(&sim, SP, 777, WAIT).await?;
        let ok = app
            .wait_for(APPLIED, WAIT, |j| {
                j["value"] == 777 && j["outcome"] != "pending"
            })
            .await?;
        assert_eq!(ok["outcome"], "ok", "{ok}");
        app.twin_until(WAIT, |t| {
            t["sp"]["actual"]["value"] == "777" && t["sp"]["applied"]["outcome"] == "ok"
        })
        .await?;
        Ok(())
    }
    .await;
    with_log(r, &[&agent])
}

// ---------------------------------------------------------------------------------------------
// Concurrent changes from the hub and from a local app (docs/twin.md, "Changes made on the
// gateway").

/// The hub's desired entry of `sp` once `pred` holds for it.
async fn hub_desired(
    api: &Api,
    within: Duration,
    pred: impl Fn(&Json) -> bool,
) -> anyhow::Result<Json> {
    let deadline = Instant::now() + within;
    loop {
        let (status, twin) = api.get(TWIN).await?;
        if status == 200 && pred(&twin["desired"]["sp"]) {
            return Ok(twin);
        }
        if Instant::now() >= deadline {
            bail!("the hub's desired sp never matched within {within:?}; last twin: {twin}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn patch_sp(api: &Api, value: u64) -> anyhow::Result<u64> {
    let (status, v) = api
        .patch(&format!("{TWIN}/desired"), &json!({"sp": value}))
        .await?;
    if status != 200 {
        bail!("PATCH sp = {value}: {status} {v}");
    }
    v["versions"]["sp"].as_u64().context("no version")
}

/// With the hub reachable and no newer operator value, a local change becomes the hub's
/// desired value with origin `edge`; an operator's later value comes down and wins; a local
/// change after that (based on the operator's version) is accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_change_with_the_hub_reachable_becomes_the_hubs_desired_value() -> anyhow::Result<()>
{
    let tmp = TempDir::new("local-cas-a")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let sim = plc().await?;
    let (hub, tunnel, http) =
        harness::start_hub(tmp.path(), &pki, "127.0.0.1:0", "127.0.0.1:0").await?;
    let bus = Bus::embedded()?;
    let agent = support::start_agent(
        tmp.path(),
        &pki,
        &tunnel,
        &sim.local_addr().to_string(),
        &bus.toml,
    )
    .await?;
    let api = Api::new(&http);
    let r = async {
        api.wait_for(Duration::from_secs(20), |api| async move {
            api.reported_u64(NODE, DEVICE, "sp").await
        })
        .await
        .context("the hub sees sp")?;
        let mut app = app(&bus, "app").await?;

        // (1) A local change, no operator value at all.
        let r = app.set_sp("local-1", "321").await?;
        assert!(r.get("code").is_none(), "{r}");
        register_becomes(&sim, SP, 321, WAIT).await?;
        let twin = hub_desired(&api, WAIT, |d| {
            d["value"] == 321 && d["applied"]["outcome"] == "ok"
        })
        .await
        .context("the hub takes the local value")?;
        let d = &twin["desired"]["sp"];
        assert_eq!(d["origin"], "edge", "{twin}");
        assert_eq!(d["by"], "edge", "{twin}");
        let v1 = d["version"].as_u64().context("version")?;
        assert!(v1 > 0, "{twin}");

        // (2) An operator's later value comes down and replaces it.
        let v2 = patch_sp(&api, 222).await?;
        assert!(v2 > v1);
        register_becomes(&sim, SP, 222, WAIT).await?;
        app.wait_for(DOCUMENT, WAIT, |j| {
            j["twin"]["sp"]["current"]["expected"]["value"] == "222"
        })
        .await?;
        let a = app.wait_for(APPLIED, WAIT, |j| j["version"] == v2).await?;
        assert_eq!(a["outcome"], "ok", "{a}");
        hub_desired(&api, WAIT, |d| {
            d["version"] == v2 && d["applied"]["outcome"] == "ok"
        })
        .await?;

        // (3) A local change based on the operator's version: accepted.
        let r = app.set_sp("local-2", "333").await?;
        assert!(r.get("code").is_none(), "{r}");
        register_becomes(&sim, SP, 333, WAIT).await?;
        let twin = hub_desired(&api, WAIT, |d| {
            d["value"] == 333 && d["applied"]["outcome"] == "ok"
        })
        .await
        .context("the hub takes the second local value")?;
        let d = &twin["desired"]["sp"];
        assert_eq!(d["origin"], "edge", "{twin}");
        assert!(d["version"].as_u64().unwrap_or(0) > v2, "{twin}");
        let t = app.twin("after").await?;
        assert_eq!(t["twin"]["sp"]["expected"]["value"], "333", "{t}");
        // Nothing flips back later.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(sim.holding(1, SP, 1)?, vec![333]);
        let metrics = api.metrics().await?;
        assert!(
            !metrics.contains("edgesync_hub_proposals_total{result=\"rejected\"}"),
            "no proposal was rejected:\n{metrics}"
        );
        Ok(())
    }
    .await;
    with_log(r, &[&agent, &hub])
}

/// A local change made while the tunnel is cut, with no newer operator value, is accepted
/// when the tunnel returns. Then: an operator sets a value while the tunnel is cut (after the
/// agent's base), and the local app sets another one on the gateway; when the tunnel returns,
/// the operator's value wins: it comes down again, the PLC ends at it, and the local app sees
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_value_set_during_a_partition_wins_over_a_later_local_change()
-> anyhow::Result<()> {
    let tmp = TempDir::new("local-cas-b")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let sim = plc().await?;
    let (hub, tunnel, http) =
        harness::start_hub(tmp.path(), &pki, "127.0.0.1:0", "127.0.0.1:0").await?;
    let relay = UdpRelay::start(tunnel.parse()?).await?;
    let bus = Bus::embedded()?;
    let agent = support::start_agent(
        tmp.path(),
        &pki,
        &relay.addr.to_string(),
        &sim.local_addr().to_string(),
        &bus.toml,
    )
    .await?;
    let api = Api::new(&http);
    let r = async {
        api.wait_for(Duration::from_secs(20), |api| async move {
            api.reported_u64(NODE, DEVICE, "sp").await
        })
        .await
        .context("the hub sees sp")?;
        let mut app = app(&bus, "app").await?;

        // A first operator value: the agent's base for sp.
        let v0 = patch_sp(&api, 111).await?;
        register_becomes(&sim, SP, 111, WAIT).await?;
        hub_desired(&api, WAIT, |d| {
            d["version"] == v0 && d["applied"]["outcome"] == "ok"
        })
        .await?;

        // The tunnel is cut; the local app is told; a local change made now, with no newer
        // operator value, is accepted by the hub when the tunnel returns.
        app.clear();
        relay.set_open(false);
        app.wait_for(
            "$hw/events/disconnected/gw-1",
            Duration::from_secs(15),
            |_| true,
        )
        .await
        .context("the app learns the tunnel is down")?;
        let r = app.set_sp("offline-0", "444").await?;
        assert!(r.get("code").is_none(), "{r}");
        register_becomes(&sim, SP, 444, WAIT).await?;
        relay.set_open(true);
        app.wait_for("$hw/events/connected/gw-1", Duration::from_secs(15), |_| {
            true
        })
        .await
        .context("the app learns the tunnel is up")?;
        let twin = hub_desired(&api, Duration::from_secs(15), |d| {
            d["value"] == 444 && d["applied"]["outcome"] == "ok"
        })
        .await
        .context("the hub accepts the offline local change")?;
        assert_eq!(twin["desired"]["sp"]["origin"], "edge", "{twin}");
        assert!(
            twin["desired"]["sp"]["version"].as_u64().unwrap_or(0) > v0,
            "{twin}"
        );
        assert_eq!(sim.holding(1, SP, 1)?, vec![444]);

        // The tunnel is cut again.
        app.clear();
        relay.set_open(false);
        app.wait_for(
            "$hw/events/disconnected/gw-1",
            Duration::from_secs(15),
            |_| true,
        )
        .await
        .context("the app learns the tunnel is down again")?;

        // The operator sets 999 (newer than the agent's base) and it cannot be delivered.
        let v1 = patch_sp(&api, 999).await?;
        assert!(v1 > v0);
        // The local app sets 555 on the gateway: written at once, without the hub.
        let r = app.set_sp("offline-1", "555").await?;
        assert!(r.get("code").is_none(), "{r}");
        register_becomes(&sim, SP, 555, WAIT).await?;
        let (_, twin) = api.get(TWIN).await?;
        assert_eq!(twin["desired"]["sp"]["value"], 999, "{twin}");
        assert_eq!(twin["desired"]["sp"]["origin"], "hub", "{twin}");

        // The tunnel returns: the operator's value wins everywhere.
        relay.set_open(true);
        app.wait_for("$hw/events/connected/gw-1", Duration::from_secs(15), |_| {
            true
        })
        .await
        .context("the app learns the tunnel is up")?;
        register_becomes(&sim, SP, 999, Duration::from_secs(15)).await?;
        let twin = hub_desired(&api, WAIT, |d| {
            d["value"] == 999
                && d["applied"]["outcome"] == "ok"
                && d["applied"]["version"] == d["version"]
        })
        .await
        .context("the hub shows its value applied")?;
        let d = &twin["desired"]["sp"];
        assert_eq!(d["origin"], "hub", "{twin}");
        assert!(d["version"].as_u64().unwrap_or(0) >= v1, "{twin}");
        api.wait_for(WAIT, |api| async move {
            Ok(api
                .reported_u64(NODE, DEVICE, "sp")
                .await?
                .filter(|v| *v == 999))
        })
        .await
        .context("the hub's reported sp")?;
        app.wait_for(DOCUMENT, WAIT, |j| {
            j["twin"]["sp"]["current"]["expected"]["value"] == "999"
        })
        .await
        .context("the app sees the operator's value come down")?;
        let t = app
            .twin_until(WAIT, |t| {
                t["sp"]["expected"]["value"] == "999" && t["sp"]["actual"]["value"] == "999"
            })
            .await?;
        eprintln!("after the partition: {}", t["twin"]["sp"]);
        // It stays there.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(sim.holding(1, SP, 1)?, vec![999]);
        let t = app.twin("settled").await?;
        assert_eq!(t["twin"]["sp"]["expected"]["value"], "999", "{t}");
        let metrics = api.metrics().await?;
        assert!(
            metrics.contains("edgesync_hub_proposals_total{result=\"rejected\"} 1"),
            "the local proposal was rejected by the hub's compare-and-set:\n{}",
            metrics
                .lines()
                .filter(|l| l.contains("proposals"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        Ok(())
    }
    .await;
    with_log(r, &[&agent, &hub])
}

/// A local value still pending (the PLC does not answer) is accepted by the hub; an operator's
/// newer value then supersedes it on the gateway at once: the local app sees the pending
/// value superseded, and when the PLC answers only the operator's value is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_value_supersedes_a_local_value_still_pending() -> anyhow::Result<()> {
    let tmp = TempDir::new("local-cas-c")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let sim = plc().await?;
    let (hub, tunnel, http) =
        harness::start_hub(tmp.path(), &pki, "127.0.0.1:0", "127.0.0.1:0").await?;
    let bus = Bus::embedded()?;
    let agent = support::start_agent(
        tmp.path(),
        &pki,
        &tunnel,
        &sim.local_addr().to_string(),
        &bus.toml,
    )
    .await?;
    let api = Api::new(&http);
    let r = async {
        api.wait_for(Duration::from_secs(20), |api| async move {
            api.reported_u64(NODE, DEVICE, "sp").await
        })
        .await
        .context("the hub sees sp")?;
        let mut app = app(&bus, "app").await?;

        // The PLC stops answering; a local value waits.
        sim.set_fault(1, Fault::NoAnswer)?;
        let r = app.set_sp("local-pending", "123").await?;
        assert!(r.get("code").is_none(), "{r}");
        let p = app
            .wait_for(APPLIED, WAIT, |j| j["value"] == 123)
            .await
            .context("the local value's first outcome")?;
        assert_eq!(p["outcome"], "pending", "{p}");
        hub_desired(&api, WAIT, |d| d["value"] == 123 && d["origin"] == "edge")
            .await
            .context("the hub accepts the local value")?;

        // The operator sets 456: the pending local value is superseded at once.
        let v = patch_sp(&api, 456).await?;
        let s = app
            .wait_for(APPLIED, WAIT, |j| {
                j["value"] == 123 && j["outcome"] != "pending"
            })
            .await
            .context("the local value's final outcome")?;
        assert_eq!(s["outcome"], "superseded", "{s}");
        app.wait_for(DOCUMENT, WAIT, |j| {
            j["twin"]["sp"]["current"]["expected"]["value"] == "456"
        })
        .await?;
        assert_eq!(sim.holding(1, SP, 1)?, vec![100]);

        // The PLC answers again: only 456 is written.
        sim.set_fault(1, Fault::None)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let got = sim.holding(1, SP, 1)?[0];
            assert_ne!(got, 123, "the superseded local value reached the PLC");
            if got == 456 {
                break;
            }
            if Instant::now() >= deadline {
                bail!("the PLC holds {got}, not 456");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let a = app
            .wait_for(APPLIED, WAIT, |j| {
                j["version"] == v && j["outcome"] != "pending"
            })
            .await?;
        assert_eq!(a["outcome"], "ok", "{a}");
        assert_eq!(a["value"], 456, "{a}");
        hub_desired(&api, WAIT, |d| {
            d["version"] == v && d["value"] == 456 && d["applied"]["outcome"] == "ok"
        })
        .await
        .context("the hub shows the operator's value applied")?;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(sim.holding(1, SP, 1)?, vec![456], "nothing flips back");
        Ok(())
    }
    .await;
    with_log(r, &[&agent, &hub])
}
