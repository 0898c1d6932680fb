//! The hub's server-sent events with real processes: a client on `GET /api/v1/events` sees a
//! register change, a desired value and its acknowledgement, the node connecting and
//! disconnecting; after it disconnects and more happens, it resumes with `Last-Event-ID` and
//! gets exactly the events it missed, compared with a client that never disconnected.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use edgesync_testkit::harness::{self, Api, Pki, Proc, TempDir};
use edgesync_testkit::sim::{SimConfig, SimHandle};
use serde_json::{Value as Json, json};
use tokio::time::Instant;

use crate::support::{self, LEVEL, NODE, SP, TD, TWIN};

const WAIT: Duration = Duration::from_secs(15);

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
struct SseEvent {
    id: u64,
    kind: String,
    data: Json,
}

/// A client of `GET /api/v1/events`: every event it received, in order.
struct Sse {
    events: Arc<Mutex<Vec<SseEvent>>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Drop for Sse {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sse {
    /// Connects (with `Last-Event-ID: last` if given) and reads the stream in a task.
    async fn connect(http: &str, last: Option<u64>) -> anyhow::Result<Sse> {
        let mut req = reqwest::Client::new()
            .get(format!("http://{http}/api/v1/events"))
            .bearer_auth(harness::TOKEN);
        if let Some(id) = last {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let mut resp = req.send().await?;
        if resp.status() != 200 {
            bail!("GET /api/v1/events: {}", resp.status());
        }
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        if !ct.starts_with("text/event-stream") {
            bail!("GET /api/v1/events: content type {ct:?}");
        }
        let events: Arc<Mutex<Vec<SseEvent>>> = Arc::default();
        let sink = events.clone();
        let task = tokio::spawn(async move {
            let mut buf = String::new();
            while let Some(chunk) = resp.chunk().await? {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                buf = buf.replace("\r\n", "\n");
                while let Some(end) = buf.find("\n\n") {
                    let block: String = buf.drain(..end + 2).collect();
                    let (mut id, mut kind, mut data) =
                        (None, String::from("message"), String::new());
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("id:") {
                            id = Some(v.trim().parse::<u64>()?);
                        } else if let Some(v) = line.strip_prefix("event:") {
                            kind = v.trim().to_owned();
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data.push_str(v.trim_start());
                        }
                    }
                    // Comment-only blocks (keep-alives) have no id.
                    if let Some(id) = id {
                        let data = serde_json::from_str(&data)
                            .with_context(|| format!("event {id} data: {data}"))?;
                        sink.lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(SseEvent { id, kind, data });
                    }
                }
            }
            Ok(())
        });
        Ok(Sse { events, task })
    }

    fn all(&self) -> Vec<SseEvent> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The first event received (so far or within `within`) of `kind` whose data satisfies
    /// `pred`.
    async fn wait_for(
        &self,
        kind: &str,
        within: Duration,
        pred: impl Fn(&Json) -> bool,
    ) -> anyhow::Result<SseEvent> {
        self.wait_for_after(kind, 0, within, pred).await
    }

    /// As [`Sse::wait_for`], among the events with an id above `after`.
    async fn wait_for_after(
        &self,
        kind: &str,
        after: u64,
        within: Duration,
        pred: impl Fn(&Json) -> bool,
    ) -> anyhow::Result<SseEvent> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(e) = self
                .all()
                .into_iter()
                .find(|e| e.id > after && e.kind == kind && pred(&e.data))
            {
                return Ok(e);
            }
            if self.task.is_finished() {
                bail!("the event stream ended; events: {:?}", self.all());
            }
            if Instant::now() >= deadline {
                let tail: Vec<String> = self
                    .all()
                    .iter()
                    .rev()
                    .take(30)
                    .map(|e| format!("{} {} {}", e.id, e.kind, e.data))
                    .collect();
                bail!(
                    "no {kind} event matched within {within:?}; the last events (newest first):\n  {}",
                    tail.join("\n  ")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The highest id received.
    fn last_id(&self) -> Option<u64> {
        self.all().iter().map(|e| e.id).max()
    }
}

fn is_node(d: &Json) -> bool {
    d["node"] == NODE
}

fn sp_value(d: &Json) -> Option<u64> {
    d["reported"]["sp"]["value"].as_u64()
}

/// Ids strictly increasing by one.
fn consecutive(events: &[SseEvent]) -> Result<(), String> {
    for w in events.windows(2) {
        if w[1].id != w[0].id + 1 {
            return Err(format!(
                "ids jump from {} ({}) to {} ({})",
                w[0].id, w[0].kind, w[1].id, w[1].kind
            ));
        }
    }
    Ok(())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_show_twin_desired_and_node_changes_and_resume_without_a_gap() -> anyhow::Result<()>
{
    let tmp = TempDir::new("events")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let sim = SimHandle::start("127.0.0.1:0".parse()?, SimConfig::with_units([1])).await?;
    sim.set_holding(1, SP, &[100, 7, 1])?;
    let plc = sim.local_addr().to_string();
    let (hub, tunnel, http) =
        harness::start_hub(tmp.path(), &pki, "127.0.0.1:0", "127.0.0.1:0").await?;
    let api = Api::new(&http);
    let mqtt_off = "[mqtt]\nmode = \"off\"\n";
    // Two clients from the start: `a` will disconnect and resume; `full` never disconnects.
    let full = Sse::connect(&http, None).await?;
    let a = Sse::connect(&http, None).await?;
    let mut agent = Some(support::start_agent(tmp.path(), &pki, &tunnel, &plc, mqtt_off).await?);
    let logs = |agent: &Option<Proc>| {
        format!(
            "--- agent ---\n{}\n--- hub ---\n{}",
            agent.as_ref().map(Proc::log_text).unwrap_or_default(),
            hub.log_text()
        )
    };
    let r: anyhow::Result<()> = async {
        // The node connects and reports.
        let c = a.wait_for("node_connected", WAIT, is_node).await?;
        assert!(c.data["ts_ms"].as_u64().is_some(), "{c:?}");
        assert!(c.data["agent_version"].is_string(), "{c:?}");
        a.wait_for("twin", WAIT, |d| {
            is_node(d) && d["device"] == "plc-1" && sp_value(d) == Some(100)
        })
        .await?;
        // A register changes on the PLC.
        sim.set_holding(1, SP, &[150])?;
        let t = a
            .wait_for("twin", WAIT, |d| is_node(d) && sp_value(d) == Some(150))
            .await?;
        assert_eq!(t.data["reported"]["sp"]["quality"], "good", "{t:?}");
        // A desired value and its acknowledgement.
        let v1 = patch_sp(&api, 1234).await?;
        let d = a
            .wait_for("desired", WAIT, |d| {
                is_node(d) && d["property"] == "sp" && d["desired"]["version"] == v1
            })
            .await?;
        assert_eq!(d.data["desired"]["value"], 1234, "{d:?}");
        assert_eq!(d.data["desired"]["origin"], "hub", "{d:?}");
        let ack = a
            .wait_for("applied", WAIT, |d| {
                is_node(d) && d["property"] == "sp" && d["applied"]["version"] == v1
            })
            .await?;
        assert_eq!(ack.data["applied"]["outcome"], "ok", "{ack:?}");
        assert!(ack.id > d.id);
        // The node goes away (SIGKILL: the hub notices by the tunnel's idle timeout).
        if let Some(p) = agent.take() {
            p.kill9().await?;
        }
        let gone = a.wait_for("node_disconnected", WAIT, is_node).await?;
        assert!(gone.id > ack.id);
        Ok(())
    }
    .await;
    r.map_err(|e| anyhow::anyhow!("{e:#}\n{}", logs(&agent)))?;

    // `a` disconnects at its last event; more happens while it is away.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = a.all();
    let last = a.last_id().context("a saw events")?;
    drop(a);
    agent = Some(support::start_agent(tmp.path(), &pki, &tunnel, &plc, mqtt_off).await?);
    let r: anyhow::Result<(u64, u64)> = async {
        let reconnected = full
            .wait_for_after("node_connected", last, WAIT, is_node)
            .await?;
        let v2 = patch_sp(&api, 2222).await?;
        full.wait_for("applied", WAIT, |d| {
            d["applied"]["version"] == v2 && d["applied"]["outcome"] == "ok"
        })
        .await?;
        sim.set_holding(1, LEVEL, &[77])?;
        full.wait_for("twin", WAIT, |d| d["reported"]["level"]["value"] == 77)
            .await?;
        Ok((reconnected.id, v2))
    }
    .await;
    let (reconnected, v2) = r.map_err(|e| anyhow::anyhow!("{e:#}\n{}", logs(&agent)))?;
    let missed_until = full.last_id().context("full saw events")?;

    // `a` resumes: exactly the events after `last`, then live ones.
    let b = Sse::connect(&http, Some(last)).await?;
    let deadline = Instant::now() + WAIT;
    while b.last_id().is_none_or(|id| id < missed_until) {
        if Instant::now() >= deadline {
            bail!(
                "the resumed stream did not reach id {missed_until}: {:?}",
                b.all()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resumed: Vec<SseEvent> = b
        .all()
        .into_iter()
        .filter(|e| e.id <= missed_until)
        .collect();
    let missed: Vec<SseEvent> = full
        .all()
        .into_iter()
        .filter(|e| e.id > last && e.id <= missed_until)
        .collect();
    assert!(
        resumed.iter().all(|e| e.kind != "resync"),
        "no resync: {resumed:?}"
    );
    assert_eq!(
        resumed.first().map(|e| e.id),
        Some(last + 1),
        "no gap at the start"
    );
    assert_eq!(
        resumed, missed,
        "the resumed stream holds exactly the missed events"
    );
    consecutive(&resumed).map_err(|e| anyhow::anyhow!("{e}"))?;
    for kind in ["node_connected", "desired", "applied", "twin"] {
        assert!(
            resumed.iter().any(|e| e.kind == kind),
            "the missed {kind} event is resumed: {resumed:?}"
        );
    }
    assert!(resumed.iter().any(|e| e.id == reconnected));
    assert!(
        resumed
            .iter()
            .any(|e| e.kind == "applied" && e.data["applied"]["version"] == v2)
    );
    // What `a` saw before it left is what `full` saw up to then.
    let full_before: Vec<SseEvent> = full
        .all()
        .into_iter()
        .filter(|e| e.id <= last && e.id >= before[0].id)
        .collect();
    assert_eq!(before, full_before);

    // Live events continue on the resumed stream without a gap or a duplicate.
    let v3 = patch_sp(&api, 3333).await?;
    b.wait_for("applied", WAIT, |d| d["applied"]["version"] == v3)
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", logs(&agent)))?;
    let all = b.all();
    consecutive(&all).map_err(|e| anyhow::anyhow!("resumed then live: {e}"))?;
    assert_eq!(all.first().map(|e| e.id), Some(last + 1));
    let full_after: Vec<SseEvent> = full
        .all()
        .into_iter()
        .filter(|e| e.id > last && e.id <= all.last().map_or(0, |e| e.id))
        .collect();
    assert_eq!(all, full_after, "the resumed client saw what the other saw");
    eprintln!(
        "events: {} before the disconnect, {} resumed, {} in all on the resumed stream",
        before.len(),
        resumed.len(),
        all.len()
    );
    drop(agent);
    Ok(())
}
