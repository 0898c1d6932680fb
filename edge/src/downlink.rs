//! The downlink: desired values from the hub and from local apps, written to the PLCs.
//!
//! One task. It takes over desired versions from the uplink (in version order, each once: it
//! persists the highest version it took over, and the uplink's hello tells the hub where to
//! resume), and local changes from [`LocalTwin::set_desired`](crate::local::LocalTwin). Each
//! is recorded in the twin and persisted before it is written, then written through the
//! device's link with the verified-write path. Outcomes go to the hub through the control log
//! (durable, acknowledged, resent after a reconnect) and to local subscribers as events.
//!
//! # Rules
//!
//! - A version the hub sent with origin `edge` is a local change the hub accepted: it was
//!   written when the local app made it, so it only becomes the base of later proposals.
//! - At most one value per property is pending; a newer one (from the hub or a local app)
//!   supersedes it (outcome `superseded`).
//! - A write that fails because the device is unreachable (timeout, disconnected, backing off,
//!   a malformed answer) is retried with backoff until `expiry` after it was taken over, then
//!   ends as `expired` (with `expiry` zero, the first failure is final: `timeout`). An
//!   exception from the device, or a value that does not fit the tag, is final at once.
//! - Writes of different properties run concurrently (each waits its turn in its link's
//!   queue), so a dead PLC never holds back writes to the others.
//! - Pending values survive a restart: they are persisted and written again when the agent
//!   starts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use edgesync_protocol::desired::{Applied, DesiredValue, Origin, Outcome};
use edgesync_protocol::frame::{
    self, ControlKind, DesiredFrame, DesiredStatus, Proposal, RuleEvent,
};
use edgesync_protocol::{DeviceId, PropertyId, Value};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::agent::wall_clock;
use crate::local::{LocalChange, LocalTwin, TwinEvent};
use crate::modbus::write::{LinkHandle, WriteError};
use crate::store::{AgentStore, PersistedDesired};
use crate::values;

/// Settings of the downlink.
#[derive(Debug, Clone, Copy)]
pub struct DownlinkConfig {
    /// How long a desired value may wait for an unreachable device before it expires.
    pub expiry: Duration,
    /// First retry delay after a failed attempt (doubles up to `retry_max`).
    pub retry_initial: Duration,
    /// Largest retry delay.
    pub retry_max: Duration,
}

impl Default for DownlinkConfig {
    fn default() -> Self {
        DownlinkConfig {
            expiry: Duration::from_secs(600),
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(10),
        }
    }
}

type Key = (DeviceId, usize);

#[derive(Debug, Clone)]
struct Pending {
    version: u64,
    value: Value,
    taken: Instant,
    next_try: Instant,
    delay: Duration,
    /// An attempt is running (its result comes back through the join set).
    in_flight: bool,
    /// A "pending" status was already sent for this version.
    announced: bool,
}

struct Attempt {
    key: Key,
    version: u64,
    result: Result<(), WriteError>,
}

/// The downlink task.
pub struct Downlink {
    cfg: DownlinkConfig,
    twin: LocalTwin,
    store: Arc<Mutex<AgentStore>>,
    writers: HashMap<DeviceId, LinkHandle>,
    from_hub: mpsc::Receiver<DesiredFrame>,
    local: mpsc::Receiver<LocalChange>,
    rules: Option<mpsc::Receiver<RuleRecord>>,
    /// The control log's next sequence number, for the uplink.
    control_next: watch::Sender<u64>,
    /// The highest version taken over, for the uplink's hello.
    last_downlink: watch::Sender<u64>,
    cancel: CancellationToken,
    pending: HashMap<Key, Pending>,
    /// Per property: the highest version the hub sent (the base of local proposals).
    base: HashMap<Key, u64>,
    attempts: JoinSet<Attempt>,
}

/// A rule's event for the hub, and who to tell once it is in the control log.
pub type RuleRecord = (RuleEvent, tokio::sync::oneshot::Sender<()>);

/// The channels the downlink is built from.
pub struct DownlinkChannels {
    /// Desired values from the uplink.
    pub from_hub: mpsc::Receiver<DesiredFrame>,
    /// Local changes from [`LocalTwin`].
    pub local: mpsc::Receiver<LocalChange>,
    /// What local rules send to the hub (alarms, records): appended to the control log, so
    /// they reach the hub exactly once, later if it is away. `None`: no rules.
    pub rules: Option<mpsc::Receiver<RuleRecord>>,
    /// Control log position, to the uplink.
    pub control_next: watch::Sender<u64>,
    /// Highest version taken over, to the uplink.
    pub last_downlink: watch::Sender<u64>,
}

impl Downlink {
    /// Builds the task and restores the persisted desired state into the twin; pending
    /// values are written again once it runs.
    pub async fn new(
        cfg: DownlinkConfig,
        twin: LocalTwin,
        store: Arc<Mutex<AgentStore>>,
        writers: HashMap<DeviceId, LinkHandle>,
        ch: DownlinkChannels,
        cancel: CancellationToken,
    ) -> Result<Downlink, crate::store::StoreError> {
        let persisted = store.lock().await.load_desired()?;
        let mut pending = HashMap::new();
        let mut base = HashMap::new();
        let now = Instant::now();
        {
            let mut t = twin.lock();
            for (device, entries) in persisted {
                let Some(spec) = twin.spec(&device) else {
                    continue;
                };
                let len = spec.tags.len();
                for e in entries {
                    let Some(i) = spec.tags.iter().position(|t| t.property == e.property) else {
                        continue;
                    };
                    let key = (device.clone(), i);
                    base.insert(key.clone(), e.base);
                    if let Some(d) = &e.desired {
                        t.set_desired(&device, len, i, d.clone());
                        if e.pending {
                            pending.insert(
                                key,
                                Pending {
                                    version: d.version,
                                    value: d.value.clone(),
                                    taken: now,
                                    next_try: now,
                                    delay: cfg.retry_initial,
                                    in_flight: false,
                                    announced: false,
                                },
                            );
                        }
                    }
                    if let Some(a) = e.applied {
                        t.set_applied(&device, len, i, a);
                    }
                }
            }
        }
        Ok(Downlink {
            cfg,
            twin,
            store,
            writers,
            from_hub: ch.from_hub,
            local: ch.local,
            rules: ch.rules,
            control_next: ch.control_next,
            last_downlink: ch.last_downlink,
            cancel,
            pending,
            base,
            attempts: JoinSet::new(),
        })
    }

    /// Runs until cancelled.
    pub async fn run(mut self) {
        loop {
            self.start_due_attempts();
            let next_try = self
                .pending
                .values()
                .filter(|p| !p.in_flight)
                .map(|p| p.next_try)
                .min();
            tokio::select! {
                // Shutdown.
                _ = self.cancel.cancelled() => break,
                // A desired version from the hub (mpsc::recv is cancel-safe).
                Some(d) = self.from_hub.recv() => self.on_hub(d).await,
                // A local app's change (cancel-safe).
                Some(c) = self.local.recv() => self.on_local(c).await,
                // A rule's alarm or record for the hub (cancel-safe; never without rules).
                Some(ev) = async {
                    match &mut self.rules {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let (ev, appended) = ev;
                    self.append(ControlKind::Rule(ev)).await;
                    let _ = appended.send(());
                }
                // A write attempt finished (JoinSet::join_next is cancel-safe).
                Some(done) = self.attempts.join_next(), if !self.attempts.is_empty() => {
                    if let Ok(a) = done {
                        self.on_attempt(a).await;
                    }
                }
                // A retry is due.
                _ = async {
                    match next_try {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
        self.attempts.abort_all();
    }

    fn index(&self, device: &str, property: &str) -> Option<(DeviceId, usize)> {
        let device = DeviceId::new(device).ok()?;
        let spec = self.twin.spec(&device)?;
        let i = spec
            .tags
            .iter()
            .position(|t| t.property.as_str() == property)?;
        Some((device, i))
    }

    async fn on_hub(&mut self, d: DesiredFrame) {
        let taken = *self.last_downlink.borrow();
        if d.version <= taken {
            // Already taken over (a resend after a reconnect).
            return;
        }
        let origin = if d.origin == 1 {
            Origin::Edge
        } else {
            Origin::Hub
        };
        let value = d.value.map(frame::value_from_wire);
        let now_ms = wall_clock().0;
        let Some((device, i)) = self.index(&d.device, &d.property) else {
            // Unknown here (the config changed since the hub validated it): refuse.
            tracing::warn!(device = %d.device, property = %d.property, version = d.version, "desired value for an unknown property refused");
            self.report_raw(
                &d.device,
                &d.property,
                d.version,
                Outcome::Refused(format!(
                    "no property {:?} on device {:?} in the agent's config",
                    d.property, d.device
                )),
            )
            .await;
            self.mark_taken(d.version, None).await;
            return;
        };
        let key = (device.clone(), i);
        self.base.insert(key.clone(), d.version);
        if origin == Origin::Edge {
            // A local change the hub accepted: already written when it was made.
            if let Some(len) = self.twin.spec(&device).map(|s| s.tags.len()) {
                let mut t = self.twin.lock();
                let (_, current, _) = t.property(&device, i);
                if let (Some(mut cur), Some(v)) = (current, value.as_ref())
                    && cur.version == 0
                    && &cur.value == v
                {
                    cur.version = d.version;
                    t.set_desired(&device, len, i, cur);
                }
            }
            self.persist(&device, Some(d.version)).await;
            let _ = self.last_downlink.send(d.version);
            return;
        }
        let Some(value) = value else {
            self.mark_taken(d.version, None).await;
            self.report(&key, d.version, Outcome::Refused("no value".into()))
                .await;
            return;
        };
        let desired = DesiredValue {
            value: value.clone(),
            version: d.version,
            origin,
            set_ms: d.set_ms,
        };
        self.take_over(key, desired, now_ms).await;
        let _ = self.last_downlink.send(d.version);
        self.persist(&device, Some(d.version)).await;
    }

    async fn on_local(&mut self, c: LocalChange) {
        let now_ms = wall_clock().0;
        let Some(spec) = self.twin.spec(&c.device).cloned() else {
            return;
        };
        for (property, value) in c.values {
            let Some(i) = spec.tags.iter().position(|t| t.property == property) else {
                continue;
            };
            let key = (c.device.clone(), i);
            let base = self.base.get(&key).copied().unwrap_or(0);
            let desired = DesiredValue {
                value: value.clone(),
                version: 0,
                origin: Origin::Edge,
                set_ms: now_ms,
            };
            self.take_over(key, desired, now_ms).await;
            self.append(ControlKind::Proposal(Proposal {
                device: c.device.as_str().to_owned(),
                property: property.as_str().to_owned(),
                value: Some(frame::value_to_wire(&value)),
                base_version: base,
                set_ms: now_ms,
            }))
            .await;
        }
        self.persist(&c.device, None).await;
    }

    /// Records a desired value in the twin and makes it the property's pending write,
    /// superseding an older pending one.
    async fn take_over(&mut self, key: Key, desired: DesiredValue, now_ms: u64) {
        let (device, i) = key.clone();
        let Some(len) = self.twin.spec(&device).map(|s| s.tags.len()) else {
            return;
        };
        if let Some(old) = self.pending.remove(&key) {
            self.report(&key, old.version, Outcome::Superseded).await;
        }
        let property = self.property(&key);
        self.twin
            .lock()
            .set_desired(&device, len, i, desired.clone());
        if let Some(property) = property {
            self.twin.emit(TwinEvent::Desired {
                device: device.clone(),
                property,
                desired: desired.clone(),
            });
        }
        // Check now: a value that cannot be written is refused without waiting.
        let check = self
            .twin
            .spec(&device)
            .and_then(|s| s.tags.get(i))
            .map(|tag| values::check(tag, &desired.value));
        match check {
            Some(Err(reason)) => {
                self.report(&key, desired.version, Outcome::Refused(reason))
                    .await;
            }
            _ => {
                let now = Instant::now();
                self.pending.insert(
                    key,
                    Pending {
                        version: desired.version,
                        value: desired.value,
                        taken: now,
                        next_try: now,
                        delay: self.cfg.retry_initial,
                        in_flight: false,
                        announced: false,
                    },
                );
            }
        }
        let _ = now_ms;
    }

    fn property(&self, key: &Key) -> Option<PropertyId> {
        self.twin
            .spec(&key.0)
            .and_then(|s| s.tags.get(key.1))
            .map(|t| t.property.clone())
    }

    fn start_due_attempts(&mut self) {
        let now = Instant::now();
        for (key, p) in self.pending.iter_mut() {
            if p.in_flight || p.next_try > now {
                continue;
            }
            let Some(handle) = self.writers.get(&key.0).cloned() else {
                continue;
            };
            let Some(property) = self
                .twin
                .spec(&key.0)
                .and_then(|s| s.tags.get(key.1))
                .map(|t| t.property.clone())
            else {
                continue;
            };
            p.in_flight = true;
            let (key, version, value) = (key.clone(), p.version, p.value.clone());
            self.attempts.spawn(async move {
                let result = handle.write(&key.0, &property, value).await.map(|_| ());
                Attempt {
                    key,
                    version,
                    result,
                }
            });
        }
    }

    async fn on_attempt(&mut self, a: Attempt) {
        let Some(p) = self.pending.get_mut(&a.key) else {
            return;
        };
        if p.version != a.version {
            // Superseded while the attempt ran; the newer value is tried on its own.
            p.in_flight = false;
            return;
        }
        p.in_flight = false;
        let outcome = match a.result {
            Ok(()) => Some(Outcome::Ok),
            Err(WriteError::Exception(c)) => Some(Outcome::Exception(c)),
            Err(
                e @ (WriteError::NotWritable { .. }
                | WriteError::Encode(_)
                | WriteError::UnknownTag { .. }
                | WriteError::UnknownDevice(_)
                | WriteError::Mismatch { .. }),
            ) => Some(Outcome::Refused(e.to_string())),
            Err(e) => {
                // Unreachable for now: retry until expiry.
                if self.cfg.expiry.is_zero() {
                    Some(if matches!(e, WriteError::Timeout) {
                        Outcome::Timeout
                    } else {
                        Outcome::Expired
                    })
                } else if p.taken.elapsed() >= self.cfg.expiry {
                    Some(Outcome::Expired)
                } else {
                    tracing::debug!(error = %e, device = %a.key.0, "desired write will be retried");
                    p.next_try = Instant::now() + p.delay;
                    p.delay = (p.delay * 2).min(self.cfg.retry_max);
                    if !p.announced {
                        p.announced = true;
                        let version = p.version;
                        self.report(&a.key, version, Outcome::Pending).await;
                    }
                    None
                }
            }
        };
        if let Some(outcome) = outcome {
            self.pending.remove(&a.key);
            metrics::counter!("edgesync_desired_outcomes_total", "outcome" => outcome.label())
                .increment(1);
            self.report(&a.key, a.version, outcome).await;
            self.persist(&a.key.0, None).await;
        }
    }

    /// Records an outcome in the twin, tells local subscribers and the hub.
    async fn report(&mut self, key: &Key, version: u64, outcome: Outcome) {
        let (device, i) = key;
        let Some(len) = self.twin.spec(device).map(|s| s.tags.len()) else {
            return;
        };
        let applied = Applied {
            version,
            outcome: outcome.clone(),
            ts_ms: wall_clock().0,
        };
        self.twin
            .lock()
            .set_applied(device, len, *i, applied.clone());
        let Some(property) = self.property(key) else {
            return;
        };
        self.twin.emit(TwinEvent::Applied {
            device: device.clone(),
            property: property.clone(),
            applied,
        });
        self.report_raw(device.as_str(), property.as_str(), version, outcome)
            .await;
    }

    async fn report_raw(&mut self, device: &str, property: &str, version: u64, outcome: Outcome) {
        let (code, exception_code, detail) = outcome.to_wire();
        self.append(ControlKind::Status(DesiredStatus {
            device: device.to_owned(),
            property: property.to_owned(),
            version,
            outcome: code,
            exception_code,
            detail,
            ts_ms: wall_clock().0,
        }))
        .await;
    }

    async fn append(&mut self, kind: ControlKind) {
        let r = self.store.lock().await.append_control(kind).await;
        match r {
            Ok(next) => {
                let _ = self.control_next.send(next);
            }
            Err(e) => {
                metrics::counter!("edgesync_desired_store_errors_total").increment(1);
                tracing::error!(error = %e, "cannot append to the control log");
            }
        }
    }

    async fn mark_taken(&mut self, version: u64, device: Option<&DeviceId>) {
        let _ = self.last_downlink.send(version);
        if let Some(d) = device {
            self.persist(d, Some(version)).await;
        } else {
            let r = self.store.lock().await.save_desired_marker(version).await;
            if let Err(e) = r {
                tracing::error!(error = %e, "cannot persist the downlink position");
            }
        }
    }

    /// Persists the desired state of `device` (and the downlink position).
    async fn persist(&mut self, device: &DeviceId, last_downlink: Option<u64>) {
        let Some(spec) = self.twin.spec(device).cloned() else {
            return;
        };
        let entries: Vec<PersistedDesired> = {
            let t = self.twin.lock();
            spec.tags
                .iter()
                .enumerate()
                .filter_map(|(i, tag)| {
                    let (_, desired, applied) = t.property(device, i);
                    let key = (device.clone(), i);
                    let base = self.base.get(&key).copied().unwrap_or(0);
                    (desired.is_some() || applied.is_some() || base > 0).then(|| PersistedDesired {
                        property: tag.property.clone(),
                        desired,
                        applied,
                        base,
                        pending: self.pending.contains_key(&key),
                    })
                })
                .collect()
        };
        let r = self
            .store
            .lock()
            .await
            .save_desired(device, &entries, last_downlink)
            .await;
        if let Err(e) = r {
            metrics::counter!("edgesync_desired_store_errors_total").increment(1);
            tracing::error!(error = %e, %device, "cannot persist desired state");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use edgesync_protocol::NodeId;
    use edgesync_protocol::frame::WireValue;
    use tokio::sync::broadcast;

    use super::*;
    use crate::modbus::write::{WriteCommand, WriteOutcome};
    use crate::model::test_support::{device, tag};
    use crate::model::{Access, DataType, Table};
    use crate::store::Fsync;
    use crate::twin::Twin;

    /// What the fake link answers to its n-th write (1-based).
    type Script = Box<dyn Fn(usize) -> Result<WriteOutcome, WriteError> + Send>;

    /// A downlink over a real store and twin, with a link that answers per a script.
    struct Rig {
        hub: mpsc::Sender<DesiredFrame>,
        local: LocalTwin,
        events: broadcast::Receiver<TwinEvent>,
        writes: Arc<std::sync::Mutex<Vec<Value>>>,
        store: Arc<Mutex<AgentStore>>,
        last_downlink: watch::Receiver<u64>,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn cfg(expiry_ms: u64) -> DownlinkConfig {
        DownlinkConfig {
            expiry: Duration::from_millis(expiry_ms),
            retry_initial: Duration::from_millis(20),
            retry_max: Duration::from_millis(40),
        }
    }

    async fn rig(dir: &std::path::Path, cfg: DownlinkConfig, script: Script) -> Rig {
        let spec = device(
            "plc",
            vec![
                tag(
                    "sp",
                    Table::HoldingRegister,
                    DataType::UInt16,
                    Access::ReadWrite,
                ),
                tag("ro", Table::HoldingRegister, DataType::UInt16, Access::Read),
            ],
        );
        let store = AgentStore::open(dir, 1 << 20, 1 << 30, Fsync::EveryCommit).unwrap();
        let last = store.last_downlink().unwrap();
        let store = Arc::new(Mutex::new(store));
        let twin = Arc::new(std::sync::Mutex::new(Twin::new(
            std::slice::from_ref(&spec),
            vec![],
        )));
        let (local_tx, local_rx) = mpsc::channel(16);
        let specs = HashMap::from([(spec.id.clone(), Arc::new(spec.clone()))]);
        let local = LocalTwin::new(NodeId::new("gw").unwrap(), twin, specs, local_tx);
        let events = local.subscribe();
        let (cmd_tx, mut cmd_rx) = mpsc::channel::<WriteCommand>(8);
        let writes = Arc::new(std::sync::Mutex::new(vec![]));
        let seen = writes.clone();
        let n = AtomicUsize::new(0);
        tokio::spawn(async move {
            while let Some(cmd) = cmd_rx.recv().await {
                seen.lock().unwrap().push(cmd.value.clone());
                let _ = cmd.reply.send(script(n.fetch_add(1, Ordering::SeqCst) + 1));
            }
        });
        let writers = HashMap::from([(spec.id.clone(), LinkHandle::new("x:1".into(), cmd_tx))]);
        let (hub, from_hub) = mpsc::channel(16);
        let (control_next, _) = watch::channel(0);
        let (last_tx, last_downlink) = watch::channel(last);
        let cancel = CancellationToken::new();
        let downlink = Downlink::new(
            cfg,
            local.clone(),
            store.clone(),
            writers,
            DownlinkChannels {
                from_hub,
                local: local_rx,
                rules: None,
                control_next,
                last_downlink: last_tx,
            },
            cancel.clone(),
        )
        .await
        .unwrap();
        let task = tokio::spawn(downlink.run());
        Rig {
            hub,
            local,
            events,
            writes,
            store,
            last_downlink,
            cancel,
            task,
        }
    }

    impl Rig {
        async fn send(&self, version: u64, value: u64) {
            self.hub
                .send(DesiredFrame {
                    device: "plc".into(),
                    property: "sp".into(),
                    value: Some(WireValue::UInt(value)),
                    version,
                    origin: 0,
                    set_ms: 1,
                })
                .await
                .unwrap();
        }

        /// The next outcome reported for a property (version, outcome).
        async fn outcome(&mut self) -> (String, u64, Outcome) {
            loop {
                let ev = tokio::time::timeout(Duration::from_secs(5), self.events.recv())
                    .await
                    .expect("no outcome within 5 s")
                    .unwrap();
                if let TwinEvent::Applied {
                    property, applied, ..
                } = ev
                {
                    return (property.to_string(), applied.version, applied.outcome);
                }
            }
        }

        /// The values written, as numbers (a value persisted as JSON and restored may come
        /// back as another integer variant).
        fn writes(&self) -> Vec<f64> {
            self.writes
                .lock()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        }

        /// Every outcome in the control log, in order (what goes to the hub).
        async fn control_outcomes(&self) -> Vec<(u64, Outcome)> {
            let st = self.store.lock().await;
            let next = st.control_next();
            st.read_control(1, (next - 1) as usize)
                .unwrap()
                .into_iter()
                .filter_map(|c| match c.kind {
                    Some(ControlKind::Status(s)) => Some((
                        s.version,
                        Outcome::from_wire(s.outcome, s.exception_code, s.detail).unwrap(),
                    )),
                    _ => None,
                })
                .collect()
        }

        async fn stop(self) {
            self.cancel.cancel();
            self.task.await.unwrap();
        }
    }

    #[tokio::test]
    async fn with_expiry_zero_one_timed_out_attempt_is_final() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = rig(dir.path(), cfg(0), Box::new(|_| Err(WriteError::Timeout))).await;
        r.send(1, 7).await;
        assert_eq!(r.outcome().await, ("sp".into(), 1, Outcome::Timeout));
        // No retry follows.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(r.writes(), vec![7.0]);
        assert_eq!(r.control_outcomes().await, vec![(1, Outcome::Timeout)]);
        r.stop().await;
    }

    #[tokio::test]
    async fn an_unreachable_device_gets_the_write_when_it_answers_again() {
        let dir = tempfile::tempdir().unwrap();
        let script: Script = Box::new(|n| match n {
            1 => Err(WriteError::Timeout),
            2 => Err(WriteError::Disconnected),
            _ => Ok(WriteOutcome::Verified),
        });
        let mut r = rig(dir.path(), cfg(10_000), script).await;
        r.send(1, 7).await;
        // Pending is announced once, then the retry that gets through is final.
        assert_eq!(r.outcome().await, ("sp".into(), 1, Outcome::Pending));
        assert_eq!(r.outcome().await, ("sp".into(), 1, Outcome::Ok));
        assert_eq!(r.writes(), vec![7.0; 3]);
        assert_eq!(
            r.control_outcomes().await,
            vec![(1, Outcome::Pending), (1, Outcome::Ok)]
        );
        let doc = r.local.document(&DeviceId::new("plc").unwrap()).unwrap();
        let sp = &doc.properties[&PropertyId::new("sp").unwrap()];
        assert_eq!(sp.desired.as_ref().unwrap().version, 1);
        assert_eq!(sp.applied.as_ref().unwrap().outcome, Outcome::Ok);
        r.stop().await;
    }

    #[tokio::test]
    async fn a_device_unreachable_past_the_bound_expires_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = rig(dir.path(), cfg(200), Box::new(|_| Err(WriteError::Timeout))).await;
        let t0 = Instant::now();
        r.send(1, 7).await;
        assert_eq!(r.outcome().await, ("sp".into(), 1, Outcome::Pending));
        assert_eq!(r.outcome().await, ("sp".into(), 1, Outcome::Expired));
        assert!(t0.elapsed() >= Duration::from_millis(200));
        let tries = r.writes().len();
        assert!(tries >= 3, "retried with backoff: {tries} attempts");
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(r.writes().len(), tries, "no attempt after expiry");
        r.stop().await;
    }

    #[tokio::test]
    async fn an_exception_is_final_at_once_and_a_misfit_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = rig(
            dir.path(),
            cfg(10_000),
            Box::new(|_| Err(WriteError::Exception(2))),
        )
        .await;
        r.send(1, 7).await;
        assert_eq!(r.outcome().await, ("sp".into(), 1, Outcome::Exception(2)));
        // 70000 does not fit a uint16: refused without touching the device.
        r.send(2, 70_000).await;
        let (p, v, o) = r.outcome().await;
        assert_eq!((p.as_str(), v), ("sp", 2));
        assert!(
            matches!(o, Outcome::Refused(ref why) if why.contains("out of range")),
            "{o:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(r.writes(), vec![7.0]);
        r.stop().await;
    }

    #[tokio::test]
    async fn a_newer_version_supersedes_a_pending_one_and_resends_are_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = cfg(10_000);
        cfg.retry_initial = Duration::from_secs(5);
        let script: Script = Box::new(|n| {
            if n == 1 {
                Err(WriteError::Timeout)
            } else {
                Ok(WriteOutcome::Verified)
            }
        });
        let mut r = rig(dir.path(), cfg, script).await;
        r.send(1, 7).await;
        assert_eq!(r.outcome().await, ("sp".into(), 1, Outcome::Pending));
        r.send(2, 8).await;
        assert_eq!(r.outcome().await, ("sp".into(), 1, Outcome::Superseded));
        assert_eq!(r.outcome().await, ("sp".into(), 2, Outcome::Ok));
        // The hub resends versions after a reconnect: already taken over, ignored.
        r.send(1, 7).await;
        r.send(2, 8).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(r.writes(), vec![7.0, 8.0]);
        assert_eq!(*r.last_downlink.borrow(), 2);
        r.stop().await;
    }

    #[tokio::test]
    async fn a_pending_value_is_written_after_a_restart_and_not_taken_twice() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = rig(
            dir.path(),
            cfg(60_000),
            Box::new(|_| Err(WriteError::Timeout)),
        )
        .await;
        r.send(1, 7).await;
        assert_eq!(r.outcome().await, ("sp".into(), 1, Outcome::Pending));
        r.stop().await;
        // The agent starts again; the device answers now.
        let mut r = rig(
            dir.path(),
            cfg(60_000),
            Box::new(|_| Ok(WriteOutcome::Verified)),
        )
        .await;
        assert_eq!(*r.last_downlink.borrow(), 1, "the position survived");
        assert_eq!(r.outcome().await, ("sp".into(), 1, Outcome::Ok));
        // A resend of version 1 by the hub after the restart is not written again.
        r.send(1, 7).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(r.writes(), vec![7.0]);
        r.stop().await;
    }

    #[tokio::test]
    async fn a_local_change_is_written_and_proposed_against_the_hub_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = rig(
            dir.path(),
            cfg(10_000),
            Box::new(|_| Ok(WriteOutcome::Verified)),
        )
        .await;
        r.send(3, 7).await;
        assert_eq!(r.outcome().await, ("sp".into(), 3, Outcome::Ok));
        let device = DeviceId::new("plc").unwrap();
        let values = serde_json::json!({"sp": 9});
        r.local
            .set_desired(&device, values.as_object().unwrap())
            .unwrap();
        // Local changes carry version 0 until the hub accepts them.
        assert_eq!(r.outcome().await, ("sp".into(), 0, Outcome::Ok));
        assert_eq!(r.writes(), vec![7.0, 9.0]);
        let st = r.store.lock().await;
        let proposals: Vec<Proposal> = st
            .read_control(1, (st.control_next() - 1) as usize)
            .unwrap()
            .into_iter()
            .filter_map(|c| match c.kind {
                Some(ControlKind::Proposal(p)) => Some(p),
                _ => None,
            })
            .collect();
        drop(st);
        assert_eq!(proposals.len(), 1);
        assert_eq!(proposals[0].base_version, 3);
        assert_eq!(proposals[0].value, Some(WireValue::Int(9)));
        r.stop().await;
    }
}
