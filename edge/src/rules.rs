//! The local rule engine's runner: feeds `edgesync_rules` with the twin's accepted changes and
//! carries out what the rules produce, online or not.
//!
//! Data flow: [`TwinEvent::Reported`] (the same stream the MQTT bus reads) → [`Engine`] →
//! outputs → each rule's actions: `mqtt` (a [`TwinEvent::Publish`] the bus sends), `hub` (a
//! [`RuleEvent`] that the downlink appends to the control log, so it reaches the hub exactly
//! once, later if the hub is away), `write` (the twin's desired path: checked against the tag,
//! written, read back, acknowledged), `log`; `memory` (feeding other rules) happens inside the
//! engine.
//!
//! Rules come from the files of a directory (`*.json`, `*.yaml`, `*.yml`), read at start (an
//! invalid set stops the agent from starting, every problem named) and every
//! `reload_interval`: a changed set is validated completely before it replaces the old one
//! (an invalid one is logged and the old one stays), and unchanged rules keep their window
//! and alarm state. Active alarms are saved in the agent's store at every raise and clear and
//! restored at start, so a restart neither raises them again nor loses them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgesync_protocol::frame::{RULE_ALARM_CLEARED, RULE_ALARM_RAISED, RULE_RECORD, RuleEvent};
use edgesync_protocol::{DeviceId, Sample};
use edgesync_rules::{
    Action, Alarm, Catalog, ColType, Engine, Output, RuleDef, Value, parse_rule_file,
};
use tokio::sync::{Mutex, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::downlink::RuleRecord;
use crate::local::{LocalTwin, TwinEvent};
use crate::model::{DataType, DeviceSpec};
use crate::store::AgentStore;

/// Where rules come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulesConfig {
    /// The directory of rule files.
    pub dir: PathBuf,
    /// How often the directory is read for changes.
    pub reload_interval: Duration,
}

/// The engine's view of the configured devices: each tag's property and type (a scaled
/// integer is a float, as its values are).
pub fn catalog(specs: &HashMap<DeviceId, Arc<DeviceSpec>>) -> Catalog {
    let mut c = Catalog::default();
    for (id, spec) in specs {
        let props = spec
            .tags
            .iter()
            .map(|t| {
                let ty = match t.data_type {
                    DataType::Bool => ColType::Bool,
                    DataType::String { .. } => ColType::Str,
                    DataType::Float32 | DataType::Float64 => ColType::Float,
                    _ if t.scale != 1.0 || t.offset != 0.0 => ColType::Float,
                    _ => ColType::Int,
                };
                (t.property.as_str().to_owned(), ty)
            })
            .collect();
        c.add_device(id.as_str(), props);
    }
    c
}

/// A sample's value as the engine sees it (no value: null).
pub fn value_of(s: &Sample) -> Value {
    use edgesync_protocol::Value as V;
    match &s.value {
        None => Value::Null,
        Some(V::Bool(b)) => Value::Bool(*b),
        Some(V::Int(i)) => Value::Int(*i),
        Some(V::UInt(u)) => i64::try_from(*u).map_or(Value::Float(*u as f64), Value::Int),
        Some(V::Float(f)) => Value::Float(*f),
        Some(V::Str(t)) => Value::str(t),
    }
}

/// The bytes of every rule file of a directory and of its `tables/`, by path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Snapshot {
    rules: BTreeMap<PathBuf, Vec<u8>>,
    tables: BTreeMap<PathBuf, Vec<u8>>,
}

fn has_extension(p: &Path, exts: &[&str]) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| exts.contains(&e.to_ascii_lowercase().as_str()))
}

/// Largest table file read.
const MAX_TABLE_FILE_BYTES: u64 = 16 << 20;

/// The files of `dir` with one of `exts`, by path (a missing directory has none).
fn read_files(dir: &Path, exts: &[&str], max: u64) -> Result<BTreeMap<PathBuf, Vec<u8>>, String> {
    let mut out = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if !path.is_file() || !has_extension(&path, exts) {
            continue;
        }
        use std::io::Read as _;
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(max + 1).read_to_end(&mut bytes))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if bytes.len() as u64 > max {
            return Err(format!("{}: larger than {max} bytes", path.display()));
        }
        out.insert(path, bytes);
    }
    Ok(out)
}

/// Reads the rule files of `dir` and the table files of `dir/tables`.
fn snapshot(dir: &Path) -> Result<Snapshot, String> {
    Ok(Snapshot {
        rules: read_files(
            dir,
            &["json", "yaml", "yml"],
            edgesync_rules::rule::MAX_RULE_FILE_BYTES as u64,
        )?,
        tables: read_files(
            &dir.join("tables"),
            &["csv", "json", "jsonl"],
            MAX_TABLE_FILE_BYTES,
        )?,
    })
}

/// Parses and checks a snapshot against the devices: the tables (named after their file) and
/// the rules; every problem, each naming its file (and rule, line and column where they
/// apply). Returns the rules and the catalog with the tables.
fn rule_set(snap: &Snapshot, devices: &Catalog) -> Result<(Vec<RuleDef>, Catalog), Vec<String>> {
    let mut errors = Vec::new();
    let mut catalog = devices.clone();
    for (path, bytes) in &snap.tables {
        let name = path.display().to_string();
        let Some(table) = path.file_stem().and_then(|s| s.to_str()) else {
            errors.push(format!("{name}: the file name is not a table name"));
            continue;
        };
        match std::str::from_utf8(bytes) {
            Err(_) => errors.push(format!("{name}: not UTF-8")),
            Ok(text) => match edgesync_rules::table::load_table_file(&name, text) {
                Ok(t) => catalog.add_table(table, t),
                Err(e) => errors.push(e.to_string()),
            },
        }
    }
    let catalog = &catalog;
    let mut defs = Vec::new();
    let mut files: HashMap<String, PathBuf> = HashMap::new();
    for (path, bytes) in &snap.rules {
        let name = path.display().to_string();
        let text = match std::str::from_utf8(bytes) {
            Ok(t) => t,
            Err(_) => {
                errors.push(format!("{name}: not UTF-8"));
                continue;
            }
        };
        match parse_rule_file(&name, text) {
            Ok(def) => {
                for a in &def.actions {
                    if let Action::Write {
                        device, property, ..
                    } = a
                    {
                        let known = catalog
                            .device(device)
                            .is_some_and(|p| p.iter().any(|(n, _)| n == property));
                        if !known {
                            errors.push(format!(
                                "{name}: rule {:?}: write action: device {device:?} has no property {property:?}",
                                def.id
                            ));
                        }
                    }
                }
                if let Some(first) = files.get(&def.id) {
                    errors.push(format!(
                        "{name}: rule id {:?} is also used by {}",
                        def.id,
                        first.display()
                    ));
                    continue;
                }
                files.insert(def.id.clone(), path.clone());
                defs.push(def);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    // The SQL of every rule, checked against the devices.
    let mut probe = Engine::new(catalog.clone());
    if let Err(errs) = probe.load(defs.clone()) {
        for e in errs {
            let file = files
                .get(&e.rule)
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            errors.push(format!("{file}: {e}"));
        }
    }
    if errors.is_empty() {
        Ok((defs, catalog.clone()))
    } else {
        Err(errors)
    }
}

/// Checks the rules of `dir` against the devices, as the agent would load them (for
/// `edgesync-agent validate`).
pub fn validate_dir(
    dir: &Path,
    specs: &HashMap<DeviceId, Arc<DeviceSpec>>,
) -> Result<usize, Vec<String>> {
    let snap = snapshot(dir).map_err(|e| vec![e])?;
    rule_set(&snap, &catalog(specs)).map(|(d, _)| d.len())
}

/// An active alarm as the agent's store keeps it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SavedAlarm {
    rule: String,
    device: String,
    severity: String,
    labels: BTreeMap<String, String>,
    since_ms: u64,
    raised_ms: u64,
    fields: serde_json::Map<String, serde_json::Value>,
}

fn json_of(v: &Value) -> serde_json::Value {
    serde_json::Value::from(v)
}

fn value_from_json(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => n.as_f64().map_or(Value::Null, Value::Float),
        },
        serde_json::Value::String(s) => Value::str(s),
        _ => Value::Null,
    }
}

fn fields_json(fields: &[(Arc<str>, Value)]) -> serde_json::Map<String, serde_json::Value> {
    fields
        .iter()
        .map(|(n, v)| (n.to_string(), json_of(v)))
        .collect()
}

/// The runner task (see the module docs).
pub struct Runner {
    cfg: RulesConfig,
    engine: Engine,
    catalog: Catalog,
    snapshot: Snapshot,
    actions: HashMap<String, Vec<Action>>,
    twin: LocalTwin,
    events: broadcast::Receiver<TwinEvent>,
    to_hub: mpsc::Sender<RuleRecord>,
    store: Arc<Mutex<AgentStore>>,
    cancel: CancellationToken,
    /// The last `now` given to the engine (time never goes back for it).
    last_now: u64,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("dir", &self.cfg.dir)
            .field("rules", &self.actions.len())
            .finish_non_exhaustive()
    }
}

/// Nanoseconds of a monotonic clock, for the engine's evaluation times.
fn meter() -> edgesync_rules::engine::Meter {
    let origin = std::time::Instant::now();
    Box::new(move || origin.elapsed().as_nanos() as u64)
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Runner {
    /// Loads the rules of `cfg.dir` (every problem returned) and the alarms saved by the
    /// previous run.
    pub async fn start(
        cfg: RulesConfig,
        twin: LocalTwin,
        to_hub: mpsc::Sender<RuleRecord>,
        store: Arc<Mutex<AgentStore>>,
        cancel: CancellationToken,
    ) -> Result<Runner, Vec<String>> {
        let specs: HashMap<DeviceId, Arc<DeviceSpec>> = twin
            .devices()
            .into_iter()
            .filter_map(|d| twin.spec(&d).cloned().map(|s| (d, s)))
            .collect();
        let catalog = catalog(&specs);
        let dir = cfg.dir.clone();
        let snap = tokio::task::spawn_blocking(move || snapshot(&dir))
            .await
            .map_err(|e| vec![e.to_string()])?
            .map_err(|e| vec![e])?;
        let (defs, with_tables) = rule_set(&snap, &catalog)?;
        let mut engine = Engine::new(with_tables);
        engine.set_meter(meter());
        let actions = defs
            .iter()
            .map(|d| (d.id.clone(), d.actions.clone()))
            .collect();
        let count = defs.len();
        engine
            .load(defs)
            .map_err(|errs| errs.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        let saved = store
            .lock()
            .await
            .load_alarms()
            .map_err(|e| vec![format!("saved alarms: {e}")])?;
        if let Some(bytes) = saved {
            match serde_json::from_slice::<Vec<SavedAlarm>>(&bytes) {
                Ok(list) => {
                    let alarms = list
                        .into_iter()
                        .map(|a| Alarm {
                            rule: Arc::from(a.rule.as_str()),
                            device: Arc::from(a.device.as_str()),
                            severity: a.severity,
                            labels: a.labels,
                            since_ms: a.since_ms,
                            raised_ms: a.raised_ms,
                            cleared_ms: None,
                            fields: a
                                .fields
                                .iter()
                                .map(|(k, v)| (Arc::from(k.as_str()), value_from_json(v)))
                                .collect(),
                        })
                        .collect::<Vec<_>>();
                    tracing::info!(
                        active = alarms.len(),
                        "rules: alarms of the previous run restored"
                    );
                    engine.restore_alarms(alarms);
                }
                Err(e) => {
                    tracing::error!(error = %e, "rules: the saved alarms cannot be read; starting without them")
                }
            }
        }
        tracing::info!(dir = %cfg.dir.display(), rules = count, "rules loaded");
        let events = twin.subscribe();
        Ok(Runner {
            cfg,
            engine,
            catalog,
            snapshot: snap,
            actions,
            twin,
            events,
            to_hub,
            store,
            cancel,
            last_now: 0,
        })
    }

    fn now(&mut self) -> u64 {
        self.last_now = self.last_now.max(wall_ms());
        self.last_now
    }

    /// Runs until `cancel`.
    pub async fn run(mut self) {
        let mut reload = tokio::time::interval(self.cfg.reload_interval);
        reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        reload.tick().await;
        loop {
            let due = self.engine.poll_timeout().map(|t| {
                let wait = t.saturating_sub(wall_ms());
                tokio::time::Instant::now() + Duration::from_millis(wait)
            });
            tokio::select! {
                // Shutdown.
                _ = self.cancel.cancelled() => break,
                // Accepted twin changes (broadcast::recv is cancel-safe).
                r = self.events.recv() => match r {
                    Ok(TwinEvent::Reported { device, samples }) => {
                        let now = self.now();
                        for s in samples.iter() {
                            self.engine.handle_change(now, device.as_str(), s.property.as_str(), value_of(s));
                        }
                        self.drain().await;
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        metrics::counter!("edgesync_rules_lagged_events_total").increment(n);
                        tracing::warn!(missed = n, "rules: fell behind the twin's changes; some were not evaluated");
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                // Windows to close, alarm timers (sleep_until is cancel-safe).
                _ = async {
                    match due {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let now = self.now();
                    self.engine.handle_timeout(now);
                    self.drain().await;
                }
                // The rules directory, for changes; and the per-rule metrics.
                _ = reload.tick() => {
                    self.reload().await;
                    self.publish_metrics();
                }
            }
        }
    }

    async fn reload(&mut self) {
        let dir = self.cfg.dir.clone();
        let snap = match tokio::task::spawn_blocking(move || snapshot(&dir)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "rules: cannot read the rules directory");
                return;
            }
            Err(_) => return,
        };
        if snap == self.snapshot {
            return;
        }
        match rule_set(&snap, &self.catalog) {
            Ok((defs, with_tables)) => {
                let actions = defs
                    .iter()
                    .map(|d| (d.id.clone(), d.actions.clone()))
                    .collect();
                let count = defs.len();
                let outcome = if snap.tables == self.snapshot.tables {
                    // Unchanged rules keep their windows and alarms.
                    self.engine.load(defs)
                } else {
                    // New tables: a new engine (windows restart), the active alarms carried.
                    let mut engine = Engine::new(with_tables);
                    engine.set_meter(meter());
                    engine.load(defs).map(|()| {
                        engine.restore_alarms(self.engine.active_alarms());
                        self.engine = engine;
                    })
                };
                match outcome {
                    Ok(()) => {
                        self.actions = actions;
                        self.snapshot = snap;
                        metrics::counter!("edgesync_rules_reloads_total").increment(1);
                        tracing::info!(rules = count, "rules: the changed rule set is loaded");
                    }
                    Err(errs) => {
                        for e in errs {
                            tracing::error!(error = %e, "rules: changed rule set refused");
                        }
                        self.snapshot = snap;
                    }
                }
            }
            Err(errors) => {
                metrics::counter!("edgesync_rules_reload_errors_total").increment(1);
                for e in &errors {
                    tracing::error!(error = %e, "rules: the changed rule set is refused; the previous one stays");
                }
                // Not retried until the files change again.
                self.snapshot = snap;
            }
        }
    }

    async fn drain(&mut self) {
        let mut alarms_changed = false;
        while let Some(out) = self.engine.poll_output() {
            let rule = match &out {
                Output::Record { rule, .. } => rule.clone(),
                Output::Raised(a) | Output::Cleared(a) => {
                    alarms_changed = true;
                    a.rule.clone()
                }
            };
            let actions = self.actions.get(&*rule).cloned().unwrap_or_default();
            for action in &actions {
                self.act(action, &out).await;
            }
        }
        if alarms_changed {
            self.save_alarms().await;
        }
    }

    /// Publishes the per-rule counters (on the reload tick, not per change: with many rules
    /// the label lookups would cost more than the evaluation).
    fn publish_metrics(&self) {
        for (def, stats) in self.engine.rules() {
            let rule = def.id.clone();
            metrics::counter!("edgesync_rule_events_in_total", "rule" => rule.clone())
                .absolute(stats.events_in);
            metrics::counter!("edgesync_rule_events_out_total", "rule" => rule.clone())
                .absolute(stats.events_out);
            metrics::counter!("edgesync_rule_errors_total", "rule" => rule.clone())
                .absolute(stats.errors);
            metrics::gauge!("edgesync_rule_eval_seconds_total", "rule" => rule)
                .set(stats.eval_ns as f64 / 1e9);
        }
    }

    async fn save_alarms(&mut self) {
        let list: Vec<SavedAlarm> = self
            .engine
            .active_alarms()
            .into_iter()
            .map(|a| SavedAlarm {
                rule: a.rule.to_string(),
                device: a.device.to_string(),
                severity: a.severity,
                labels: a.labels,
                since_ms: a.since_ms,
                raised_ms: a.raised_ms,
                fields: fields_json(&a.fields),
            })
            .collect();
        metrics::gauge!("edgesync_rules_active_alarms").set(list.len() as f64);
        let bytes = match serde_json::to_vec(&list) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "rules: cannot encode the active alarms");
                return;
            }
        };
        if let Err(e) = self.store.lock().await.save_alarms(&bytes).await {
            tracing::error!(error = %e, "rules: cannot save the active alarms");
        }
    }

    async fn act(&mut self, action: &Action, out: &Output) {
        match action {
            Action::Log {} => match out {
                Output::Record {
                    rule,
                    device,
                    fields,
                    ..
                } => {
                    tracing::info!(%rule, %device, fields = %serde_json::Value::Object(fields_json(fields)), "rule output")
                }
                Output::Raised(a) => {
                    tracing::warn!(rule = %a.rule, device = %a.device, severity = %a.severity, fields = %serde_json::Value::Object(fields_json(&a.fields)), "alarm raised")
                }
                Output::Cleared(a) => {
                    tracing::info!(rule = %a.rule, device = %a.device, "alarm cleared")
                }
            },
            Action::Mqtt { topic } => {
                let (rule, device, payload) = match out {
                    Output::Record {
                        rule,
                        device,
                        fields,
                        ..
                    } => (rule, device, serde_json::Value::Object(fields_json(fields))),
                    Output::Raised(a) | Output::Cleared(a) => (
                        &a.rule,
                        &a.device,
                        serde_json::json!({
                            "alarm": if matches!(out, Output::Raised(_)) { "raised" } else { "cleared" },
                            "rule": &*a.rule,
                            "device": &*a.device,
                            "severity": a.severity,
                            "labels": a.labels,
                            "since_ms": a.since_ms,
                            "raised_ms": a.raised_ms,
                            "cleared_ms": a.cleared_ms,
                            "fields": fields_json(&a.fields),
                        }),
                    ),
                };
                let topic = topic
                    .replace("{{device}}", device)
                    .replace("{{rule}}", rule);
                self.twin.emit(TwinEvent::Publish {
                    topic,
                    payload: Arc::new(payload.to_string().into_bytes()),
                });
            }
            Action::Hub {} => {
                let ev = match out {
                    Output::Record {
                        rule,
                        device,
                        ts_ms,
                        fields,
                        ..
                    } => RuleEvent {
                        rule: rule.to_string(),
                        device: device.to_string(),
                        kind: RULE_RECORD,
                        ts_ms: *ts_ms,
                        fields_json: serde_json::Value::Object(fields_json(fields)).to_string(),
                        ..RuleEvent::default()
                    },
                    Output::Raised(a) | Output::Cleared(a) => RuleEvent {
                        rule: a.rule.to_string(),
                        device: a.device.to_string(),
                        kind: if a.cleared_ms.is_some() {
                            RULE_ALARM_CLEARED
                        } else {
                            RULE_ALARM_RAISED
                        },
                        ts_ms: a.cleared_ms.unwrap_or(a.raised_ms),
                        severity: a.severity.clone(),
                        fields_json: serde_json::Value::Object(fields_json(&a.fields)).to_string(),
                        since_ms: a.since_ms,
                        labels_json: serde_json::to_string(&a.labels).unwrap_or_default(),
                        raised_ms: a.raised_ms,
                    },
                };
                // Bounded, and never dropped: the downlink appends it to the durable control
                // log (the hub gets it when it is reachable). Waited for, so that an alarm is
                // in the control log before it is saved as active (a crash in between raises
                // it again rather than hiding it from the hub).
                let (done, appended) = tokio::sync::oneshot::channel();
                if self.to_hub.send((ev, done)).await.is_err() || appended.await.is_err() {
                    tracing::warn!(
                        "rules: the downlink has stopped; an output for the hub is lost"
                    );
                }
            }
            Action::Write {
                device,
                property,
                field,
            } => {
                let fields = match out {
                    Output::Record { fields, .. } => fields,
                    Output::Raised(a) | Output::Cleared(a) => &a.fields,
                };
                let Some((_, v)) = fields.iter().find(|(n, _)| &**n == field.as_str()) else {
                    metrics::counter!("edgesync_rule_write_errors_total").increment(1);
                    tracing::warn!(%device, %property, %field, "rules: write action: the output has no such field");
                    return;
                };
                let Ok(dev) = DeviceId::new(device.clone()) else {
                    return;
                };
                let mut values = serde_json::Map::new();
                values.insert(property.clone(), json_of(v));
                if let Err(e) = self.twin.set_desired(&dev, &values) {
                    metrics::counter!("edgesync_rule_write_errors_total").increment(1);
                    tracing::warn!(%device, %property, error = %e, "rules: write action refused");
                }
            }
            // Fed to the rules reading the topic by the engine itself.
            Action::Memory { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn specs() -> HashMap<DeviceId, Arc<DeviceSpec>> {
        let text = "[agent]\ndata_dir = \"d\"\n[hub]\naddress = \"h:1\"\n[identity]\ntrust_domain = \"example.org\"\ncert = \"c\"\nkey = \"k\"\nbundle = \"b\"\n\
            [[devices]]\nid = \"boiler\"\nprotocol = \"tcp\"\nendpoint = \"127.0.0.1:502\"\n\
            [[devices.tags]]\nname = \"temp\"\naddress = \"40001\"\ntype = \"int16\"\nscale = 0.1\n\
            [[devices.tags]]\nname = \"on\"\naddress = \"00001\"\ntype = \"bool\"\n\
            [[devices.tags]]\nname = \"sp\"\naddress = \"40002\"\ntype = \"uint16\"\naccess = \"read_write\"\n";
        let cfg = crate::config::parse("a.toml", text, Path::new("/tmp")).unwrap();
        cfg.devices
            .into_iter()
            .map(|d| (d.id.clone(), Arc::new(d)))
            .collect()
    }

    #[test]
    fn the_catalog_types_tags_as_their_values_are() {
        let c = catalog(&specs());
        let props = c.device("boiler").unwrap();
        assert_eq!(
            props.to_vec(),
            vec![
                ("temp".to_owned(), ColType::Float),
                ("on".to_owned(), ColType::Bool),
                ("sp".to_owned(), ColType::Int)
            ]
        );
    }

    #[test]
    fn a_rules_directory_is_checked_whole_and_every_problem_named() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write(
            "ok.json",
            r#"{"id": "hot", "sql": "SELECT temp FROM boiler WHERE temp > 85", "actions": [{"write": {"device": "boiler", "property": "sp", "field": "temp"}}]}"#,
        );
        write("notes.txt", "not a rule");
        assert_eq!(validate_dir(dir.path(), &specs()), Ok(1));
        write("bad.yaml", "id: cold\nsql: SELECT tmp FROM boiler\n");
        write(
            "dup.json",
            r#"{"id": "hot", "sql": "SELECT on FROM boiler", "actions": [{"write": {"device": "boiler", "property": "nope", "field": "on"}}]}"#,
        );
        let errors = validate_dir(dir.path(), &specs()).unwrap_err();
        let all = errors.join("\n");
        for want in [
            "bad.yaml: rule \"cold\": line 1, column 8: device \"boiler\" has no property \"tmp\"",
            "ok.json: rule id \"hot\" is also used by",
            "dup.json: rule \"hot\": write action: device \"boiler\" has no property \"nope\"",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        // A missing directory holds no rules.
        assert_eq!(validate_dir(&dir.path().join("none"), &specs()), Ok(0));
    }

    #[test]
    fn lookup_tables_come_from_the_tables_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tables")).unwrap();
        std::fs::write(
            dir.path().join("tables/limits.csv"),
            "device,max_temp:float\nboiler,85\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("limit.json"),
            r#"{"id": "limit", "sql": "SELECT temp FROM boiler INNER JOIN limits ON boiler.device = limits.device WHERE temp > limits.max_temp"}"#,
        )
        .unwrap();
        assert_eq!(validate_dir(dir.path(), &specs()), Ok(1));
        // A table that does not parse is named; a rule on a missing table too.
        std::fs::write(dir.path().join("tables/bad.csv"), "a:nope\n1\n").unwrap();
        std::fs::write(
            dir.path().join("other.json"),
            r#"{"id": "other", "sql": "SELECT temp FROM boiler INNER JOIN nolimits ON boiler.device = nolimits.device"}"#,
        )
        .unwrap();
        let all = validate_dir(dir.path(), &specs()).unwrap_err().join("\n");
        assert!(all.contains("tables/bad.csv"), "{all}");
        assert!(
            all.contains("other.json: rule \"other\"") && all.contains("nolimits"),
            "{all}"
        );
    }

    #[test]
    fn values_convert_without_loss_where_they_can() {
        use edgesync_protocol::{PropertyId, Quality, Timestamp, Value as V};
        let s = |v: Option<V>| Sample {
            device: DeviceId::new("d").unwrap(),
            property: PropertyId::new("p").unwrap(),
            value: v,
            quality: Quality::Good,
            ts: Timestamp(0),
        };
        assert_eq!(value_of(&s(Some(V::UInt(7)))), Value::Int(7));
        assert_eq!(
            value_of(&s(Some(V::UInt(u64::MAX)))),
            Value::Float(u64::MAX as f64)
        );
        assert_eq!(value_of(&s(None)), Value::Null);
        assert_eq!(value_of(&s(Some(V::Str("x".into())))), Value::str("x"));
    }
}
