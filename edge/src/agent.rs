//! Wiring of a running agent: links → twin → outbox → uplink, and back: uplink → downlink →
//! links.
//!
//! [`Agent::start`] builds every component from a validated [`AgentConfig`], spawns one task
//! per Modbus link, the pipeline task (twin and group commits), the downlink task (desired
//! values to the PLCs) and the uplink task, and returns a handle that stops them all. Local
//! consumers reach the twin through [`Agent::local`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgesync_protocol::spiffe_id::{self, NodeIds, SpiffeId};
use edgesync_protocol::svid_keeper::{Accept, IdentityDriver, IdentitySource};
use edgesync_protocol::tls::Identity;
use edgesync_protocol::{DeviceId, NodeId, PropertyId, Sample, Timestamp};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, FsyncPolicy, OutboxFullPolicy};
use crate::downlink::{Downlink, DownlinkChannels, DownlinkConfig};
use crate::health::Health;
use crate::held::Held;
use crate::local::{LocalTwin, TwinEvent};
use crate::modbus::link::{Clock, DeviceReading, LinkOptions, spawn_link_writable};
use crate::modbus::write::{LinkHandle, WriteError, WriteOutcome};
use crate::model::DeviceSpec;
use crate::store::{AgentStore, Fsync};
use crate::twin::Twin;
use crate::uplink::{DownlinkLink, Uplink, UplinkConfig, UplinkStatus};

/// Wall clock in ms since the epoch.
pub fn wall_clock() -> Timestamp {
    Timestamp(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    )
}

/// A running agent.
pub struct Agent {
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// Uplink status.
    pub status: watch::Receiver<UplinkStatus>,
    /// The node id, from the SVID.
    pub node: NodeId,
    store: Arc<Mutex<AgentStore>>,
    /// Write access to each device, through its link's queue.
    writers: HashMap<DeviceId, LinkHandle>,
    /// The twin as local consumers see it.
    pub local: LocalTwin,
    /// Where the embedded MQTT broker listens (the real port when port 0 was configured);
    /// `None` with an external broker or MQTT off.
    pub mqtt_addr: Option<std::net::SocketAddr>,
    /// Readiness (what `/readyz` reports).
    pub health: Health,
    /// Cancelled when the agent must be restarted to reopen its store: the records it held
    /// while the store could not write are in the spill file (see [`crate::held`]).
    pub restart: CancellationToken,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Reading or checking the SVID failed.
    #[error("identity: {0}")]
    Identity(String),
    /// The local MQTT bus could not start.
    #[error(transparent)]
    Mqtt(#[from] crate::mqtt::MqttError),
    /// The rule files cannot be loaded (every problem, each naming its file).
    #[error("rules:\n  {}", .0.join("\n  "))]
    Rules(Vec<String>),
    /// Records held by the previous run could not be imported (the file stays).
    #[error("held records: {0}")]
    Held(String),
    /// The store failed to open.
    #[error("store {path}: {source}")]
    Store {
        /// The data directory.
        path: String,
        /// The error.
        source: crate::store::StoreError,
    },
}

/// How often the agent reads its SVID files to pick up a rotation.
pub const SVID_CHECK_INTERVAL: Duration = Duration::from_secs(1);

impl Agent {
    /// Starts every component. Must be called within a tokio runtime.
    pub async fn start(mut cfg: AgentConfig) -> Result<Agent, StartError> {
        let td = spiffe_id::trust_domain(&cfg.identity.trust_domain)
            .map_err(|e| StartError::Identity(e.to_string()))?;
        // Our SVID, kept current as its files rotate; a rotated SVID must name the same node.
        let cfg_node = cfg.node_id.clone();
        let node_ids = NodeIds::new(td.clone())
            .with_prefix(&cfg.identity.node_path_prefix)
            .map_err(|e| StartError::Identity(format!("node_path_prefix {e}")))?;
        let accept: Accept = {
            let node_ids = node_ids.clone();
            // The configured node, or else the node of the SVID loaded first.
            let want = Arc::new(std::sync::OnceLock::new());
            if let Some(n) = &cfg.node_id {
                let _ = want.set(n.clone());
            }
            Arc::new(move |identity: &Identity| {
                let node = node_ids
                    .node(&identity.id)
                    .map_err(|e| format!("our own SVID: {e}"))?;
                let want = want.get_or_init(|| node.clone());
                if *want != node {
                    return Err(match &cfg_node {
                        Some(_) => {
                            format!("config node_id {want} does not match the SVID's node {node}")
                        }
                        None => format!(
                            "the SVID's node {node} is not the node {want} this agent started as"
                        ),
                    });
                }
                Ok(())
            })
        };
        let hub_id: SpiffeId = match &cfg.hub.hub_id {
            Some(id) => spiffe_id::parse_id(id),
            None => spiffe_id::parse_id(&spiffe_id::hub_id(&td)),
        }
        .map_err(|e| StartError::Identity(e.to_string()))?;
        // The hub is verified against the bundle of its own trust domain only: ours, or a
        // federated one configured with its bundle.
        let federated = match &cfg.identity.source {
            IdentitySource::Files(f) => f.federated.iter().map(|(td, _)| td.clone()).collect(),
            IdentitySource::WorkloadApi { federates_with, .. } => federates_with.clone(),
        };
        if !hub_id.is_member_of(&td) && !federated.iter().any(|f| hub_id.is_member_of(f)) {
            return Err(StartError::Identity(format!(
                "hub_id {hub_id} is in trust domain {}, neither ours ({td}) nor listed in [identity] federates_with",
                hub_id.trust_domain()
            )));
        }
        let (svid, svid_watcher) =
            IdentityDriver::start(&cfg.identity.source, accept, SVID_CHECK_INTERVAL)
                .await
                .map_err(|e| StartError::Identity(e.to_string()))?;
        let node = node_ids
            .node(&svid.id())
            .map_err(|e| StartError::Identity(format!("our own SVID: {e}")))?;

        let fsync = match cfg.outbox.fsync {
            FsyncPolicy::EveryCommit => Fsync::EveryCommit,
            FsyncPolicy::Interval(d) => Fsync::IntervalMs(d.as_millis() as u64),
            FsyncPolicy::Never => Fsync::Never,
        };
        let store_dir = cfg.data_dir.join("agent.sled");
        // With refuse_new the pipeline refuses at the budget and the store never drops what
        // it accepted (a group may overshoot the budget by its own size).
        let store_budget = match cfg.outbox.on_full {
            OutboxFullPolicy::DropOldest => cfg.outbox.max_bytes,
            OutboxFullPolicy::RefuseNew => u64::MAX,
        };
        let mut store = AgentStore::open(&store_dir, cfg.sled_cache_bytes, store_budget, fsync)
            .map_err(|source| StartError::Store {
                path: store_dir.display().to_string(),
                source,
            })?;
        // Records held in memory by the previous run while the store could not write.
        match crate::held::import(&mut store, &cfg.data_dir).await {
            Ok(None) => {}
            Ok(Some(i)) => tracing::warn!(
                records = i.records,
                already_stored = i.already_stored,
                lost = i.lost,
                "imported the records held while the outbox could not write"
            ),
            Err(e @ crate::held::ImportError::Corrupt { .. }) => {
                tracing::error!(error = %e, "held records not imported")
            }
            Err(e) => return Err(StartError::Held(e.to_string())),
        }
        let twin = Twin::new(
            &cfg.devices,
            store.load_twin().map_err(|source| StartError::Store {
                path: store_dir.display().to_string(),
                source,
            })?,
        );
        let next = store.sendable_next();
        let resync_hint = store.resync_pending();
        let last_downlink = store.last_downlink().map_err(|source| StartError::Store {
            path: store_dir.display().to_string(),
            source,
        })?;
        let control_next = store.control_next();
        let store = Arc::new(Mutex::new(store));
        let twin = Arc::new(std::sync::Mutex::new(twin));

        let cancel = CancellationToken::new();
        let mut tasks = vec![];
        let (tx, rx) = mpsc::channel::<DeviceReading>(1024);
        let clock: Clock = Arc::new(wall_clock);
        let mut by_link: BTreeMap<String, (crate::model::LinkSpec, Vec<Arc<DeviceSpec>>)> =
            BTreeMap::new();
        let mut specs = HashMap::new();
        let device_count = cfg.devices.len();
        // Moved, not cloned: a 10,000-tag config is megabytes.
        for d in std::mem::take(&mut cfg.devices) {
            let d = Arc::new(d);
            specs.insert(d.id.clone(), d.clone());
            by_link
                .entry(d.link.key())
                .or_insert_with(|| (d.link.clone(), vec![]))
                .1
                .push(d);
        }
        crate::modbus::metrics::describe();
        crate::modbus::transport::describe();
        crate::modbus::write::describe();
        let mut writers = HashMap::new();
        for (_, (link, devices)) in by_link {
            let ids: Vec<DeviceId> = devices.iter().map(|d| d.id.clone()).collect();
            let (handle, task) = spawn_link_writable(
                LinkOptions::default(),
                link,
                devices,
                tx.clone(),
                clock.clone(),
                cancel.child_token(),
            );
            for id in ids {
                writers.insert(id, handle.clone());
            }
            tasks.push(task);
        }
        drop(tx);

        let (local_tx, local_rx) = mpsc::channel(256);
        let local = LocalTwin::new(node.clone(), twin.clone(), specs.clone(), local_tx);
        let (desired_tx, desired_rx) = mpsc::channel(256);
        let (control_tx, control_rx) = watch::channel(control_next);
        let (downlink_tx, downlink_rx) = watch::channel(last_downlink);
        // Local rules: loaded before anything runs (an invalid set stops the start); what they
        // send to the hub goes through the downlink into the control log.
        let (rules_tx, rules_rx) = mpsc::channel(256);
        let runner = match cfg.rules.clone() {
            Some(rcfg) => Some(
                crate::rules::Runner::start(
                    rcfg,
                    local.clone(),
                    rules_tx,
                    store.clone(),
                    cancel.child_token(),
                )
                .await
                .map_err(StartError::Rules)?,
            ),
            None => None,
        };
        let downlink = Downlink::new(
            DownlinkConfig {
                expiry: cfg.desired_expiry,
                ..DownlinkConfig::default()
            },
            local.clone(),
            store.clone(),
            writers.clone(),
            DownlinkChannels {
                from_hub: desired_rx,
                local: local_rx,
                rules: runner.is_some().then_some(rules_rx),
                control_next: control_tx,
                last_downlink: downlink_tx,
            },
            cancel.child_token(),
        )
        .await
        .map_err(|source| StartError::Store {
            path: store_dir.display().to_string(),
            source,
        })?;
        tasks.push(tokio::spawn(downlink.run()));
        if let Some(runner) = runner {
            tasks.push(tokio::spawn(runner.run()));
        }
        // The local MQTT bus serves the twin from now on, before any PLC or the hub answers.
        let mqtt = crate::mqtt::start(
            std::mem::take(&mut cfg.mqtt),
            local.clone(),
            cancel.child_token(),
        )
        .await?;
        let mqtt_addr = mqtt.local_addr;
        tasks.extend(mqtt.handles);

        let (appended_tx, appended_rx) = watch::channel(next);
        let (dropped_tx, dropped_rx) = watch::channel(None);
        let (status_tx, status) = watch::channel(UplinkStatus::default());
        let state_only: HashSet<(DeviceId, PropertyId)> = specs
            .values()
            .flat_map(|d| {
                d.tags
                    .iter()
                    .filter(|t| t.report.state_only)
                    .map(|t| (d.id.clone(), t.property.clone()))
            })
            .collect();
        let health = Health::new();
        health.set_ready();
        let restart = CancellationToken::new();
        let pipeline = Pipeline {
            rx,
            held: None,
            probe_at: None,
            data_dir: cfg.data_dir.clone(),
            health: health.clone(),
            restart: restart.clone(),
            specs,
            local: local.clone(),
            store: store.clone(),
            commit_interval: Duration::from_millis(cfg.outbox.commit_interval_ms),
            refuse_when_full: cfg.outbox.on_full == OutboxFullPolicy::RefuseNew,
            max_bytes: cfg.outbox.max_bytes,
            appended: appended_tx,
            dropped: dropped_tx,
            uplink: status.clone(),
            state_only,
            stale: HashSet::new(),
            stale_all: resync_hint,
            cancel: cancel.child_token(),
        };
        tasks.push(tokio::spawn(pipeline.run()));

        let ucfg = UplinkConfig {
            hub_address: cfg.hub.address.clone(),
            hub_id,
            svid,
            svid_rotated: Some(svid_watcher.subscribe()),
            connect_timeout: cfg.hub.connect_timeout,
            keepalive: cfg.hub.keepalive,
            idle_timeout: cfg.hub.idle_timeout,
            backoff_initial: cfg.hub.backoff_initial,
            backoff_max: cfg.hub.backoff_max,
            batch_max_records: cfg.outbox.batch_max_records,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            boot_id: format!("{:016x}", fastrand::u64(..)),
        };
        let uplink = Uplink::new(
            ucfg,
            store.clone(),
            appended_rx,
            dropped_rx,
            status_tx,
            cancel.child_token(),
        )
        .with_downlink(DownlinkLink {
            to_downlink: desired_tx,
            control_next: control_rx,
            last_downlink: downlink_rx,
            twin: local.clone(),
        });
        tasks.push(tokio::spawn(uplink.run()));
        tasks.push(tokio::spawn(
            svid_watcher.run(cancel.child_token().cancelled_owned()),
        ));
        tracing::info!(node = %node, devices = device_count, "agent started");
        Ok(Agent {
            cancel,
            tasks,
            status,
            node,
            store,
            writers,
            local,
            mqtt_addr,
            health,
            restart,
        })
    }

    /// Writes `value` to a writable tag and verifies it by reading it back (see
    /// [`crate::modbus::write`]). The write waits its turn in the link's request queue.
    pub async fn write(
        &self,
        device: &DeviceId,
        property: &PropertyId,
        value: edgesync_protocol::Value,
    ) -> Result<WriteOutcome, WriteError> {
        match self.writers.get(device) {
            Some(h) => h.write(device, property, value).await,
            None => Err(WriteError::UnknownDevice(device.clone())),
        }
    }

    /// Stops every task, commits what is pending and flushes the store.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        if self.health.unready().is_some() {
            // The store cannot write: flushing it would wait for a write that never ends.
            return;
        }
        if let Err(e) = self.store.lock().await.sync().await {
            tracing::error!(error = %e, "final flush failed");
        }
    }
}

/// Trace events that mark outbox groups before they are written and once they are committed,
/// for checking writes, syncs and sends from outside (`RUST_LOG=edgesync::durability=trace`).
const DURABILITY_TARGET: &str = "edgesync::durability";

/// Most records in one outbox group (a commit starts once this many are pending).
const MAX_GROUP_RECORDS: usize = 4096;

/// Longest a commit waits, with `commit_interval_ms = 0`, for the rest of a poll sweep that a
/// link reads back to back (its readings say another cycle follows at once). One commit per
/// sweep instead of one per reading that arrives between commits: at 10 units of 100 changing
/// registers every 100 ms, see BENCHMARKS.md.
const SWEEP_HOLD_MAX: Duration = crate::modbus::link::FOLLOWS_WITHIN;

/// How often the twin is written behind to sled (at most).
const TWIN_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Changes waiting for the next commit: the batches the twin emitted, shared with local
/// consumers rather than copied (a copy touched two reference counts per change).
#[derive(Default)]
struct Pending {
    batches: Vec<Arc<Vec<Sample>>>,
    len: usize,
}

impl Pending {
    fn push(&mut self, batch: Arc<Vec<Sample>>) {
        self.len += batch.len();
        self.batches.push(batch);
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn iter(&self) -> impl Iterator<Item = &Sample> + Clone {
        self.batches.iter().flat_map(|b| b.iter())
    }

    /// The records, copied (for the rare paths that keep them apart).
    fn to_vec(&self) -> Vec<Sample> {
        self.iter().cloned().collect()
    }
}

/// The pipeline task: readings → twin → group commits.
struct Pipeline {
    rx: mpsc::Receiver<DeviceReading>,
    /// Records held in memory since a commit failed (the store cannot write until reopened).
    held: Option<Held>,
    /// When the disk is probed next (while records are held).
    probe_at: Option<tokio::time::Instant>,
    /// Where the spill file of held records goes.
    data_dir: std::path::PathBuf,
    health: Health,
    /// Cancelled once the held records are spilled: the process restarts to reopen the store.
    restart: CancellationToken,
    specs: HashMap<DeviceId, Arc<DeviceSpec>>,
    local: LocalTwin,
    store: Arc<Mutex<AgentStore>>,
    commit_interval: Duration,
    refuse_when_full: bool,
    max_bytes: u64,
    /// What the uplink may send up to (the outbox's `sendable_next`).
    appended: watch::Sender<u64>,
    /// The last loss the hub must be told of (history dropped, or a refused run handled).
    dropped: watch::Sender<Option<(u64, u64)>>,
    /// Whether the hub is reachable (state-only values are held back while it is not).
    uplink: watch::Receiver<UplinkStatus>,
    /// Properties whose tags are `state_only`.
    state_only: HashSet<(DeviceId, PropertyId)>,
    /// Properties whose latest value the hub may not have (held back while offline, refused,
    /// or dropped while still the latest): sent again once it is reachable and there is room.
    stale: HashSet<(DeviceId, PropertyId)>,
    /// Send every property's latest value again (a resync was owed when the agent stopped:
    /// which properties is not persisted).
    stale_all: bool,
    cancel: CancellationToken,
}

impl Pipeline {
    async fn run(mut self) {
        let mut pending = Pending::default();
        let mut dirty: HashSet<DeviceId> = HashSet::new();
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut twin_flushed = tokio::time::Instant::now();
        let mut online = self.uplink.borrow_and_update().connected;
        loop {
            let commit_now = tokio::select! {
                // Shutdown: commit what is pending, then stop.
                _ = self.cancel.cancelled() => {
                    self.commit(&mut pending, &mut dirty, true).await;
                    if self.held.is_some() {
                        // Saved for the next run if the disk takes them.
                        self.spill().await;
                    }
                    return;
                }
                // Records are held: is there room on the disk again?
                _ = async { match self.probe_at { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                    self.commit(&mut pending, &mut dirty, false).await;
                    self.probe_at = Some(tokio::time::Instant::now() + crate::held::PROBE_INTERVAL);
                    if self.spill().await {
                        // Restart to reopen the store; take nothing more meanwhile.
                        self.restart.cancel();
                        self.cancel.cancelled().await;
                        return;
                    }
                    false
                }
                // A poll cycle of one device (mpsc::recv is cancel-safe).
                r = self.rx.recv() => match r {
                    None => {
                        self.commit(&mut pending, &mut dirty, true).await;
                        // All links ended; wait for shutdown.
                        self.cancel.cancelled().await;
                        return;
                    }
                    Some(reading) => {
                        let mut follows = reading.follows;
                        self.observe(&reading, &mut pending, &mut dirty);
                        // Readings that queued up meanwhile (during the previous commit) join
                        // this group: group commit without waiting.
                        while pending.len() < MAX_GROUP_RECORDS {
                            let Ok(more) = self.rx.try_recv() else { break };
                            follows = more.follows;
                            self.observe(&more, &mut pending, &mut dirty);
                        }
                        if pending.is_empty() {
                            false
                        } else if pending.len() >= MAX_GROUP_RECORDS {
                            true
                        } else if self.commit_interval.is_zero() {
                            // Commit now (nothing is in flight: commits run in this task),
                            // unless the link is reading the rest of its sweep right now.
                            if follows {
                                deadline.get_or_insert_with(|| {
                                    tokio::time::Instant::now() + SWEEP_HOLD_MAX
                                });
                            }
                            !follows
                        } else {
                            deadline.get_or_insert_with(|| {
                                tokio::time::Instant::now() + self.commit_interval
                            });
                            false
                        }
                    }
                },
                // The group-commit window closed.
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => true,
                // The twin's write-behind is due (only while some device's twin is dirty).
                _ = tokio::time::sleep_until(twin_flushed + TWIN_FLUSH_INTERVAL), if !dirty.is_empty() => true,
                // The hub became reachable or unreachable: a resync may be due (cancel-safe).
                r = self.uplink.changed() => {
                    if r.is_err() {
                        // The uplink ended (shutdown): nothing to watch any more.
                        self.cancel.cancelled().await;
                        self.commit(&mut pending, &mut dirty, true).await;
                        return;
                    }
                    // Acks change the status too: only a change of reachability, or room
                    // freed while a resync waits, is worth a commit.
                    let now = self.uplink.borrow_and_update().connected;
                    let flipped = now != online;
                    online = now;
                    flipped || (now && (self.stale_all || !self.stale.is_empty()))
                }
            };
            if commit_now {
                deadline = None;
                let flush_twin = twin_flushed.elapsed() >= TWIN_FLUSH_INTERVAL;
                if flush_twin {
                    twin_flushed = tokio::time::Instant::now();
                }
                self.commit(&mut pending, &mut dirty, flush_twin).await;
            }
        }
    }

    /// Applies one device's reading to the twin; its changes go to local consumers at once and
    /// into `pending` for the next commit.
    fn observe(
        &self,
        reading: &DeviceReading,
        pending: &mut Pending,
        dirty: &mut HashSet<DeviceId>,
    ) {
        let Some(spec) = self.specs.get(&reading.device) else {
            return;
        };
        let changes = self.local.lock().observe(spec, reading);
        if !changes.is_empty() {
            dirty.insert(reading.device.clone());
            // Local consumers get the change now; the hub after the commit.
            let changes = Arc::new(changes);
            pending.push(changes.clone());
            self.local.emit(TwinEvent::Reported {
                device: reading.device.clone(),
                samples: changes,
            });
        }
    }

    /// Commits the pending records as one outbox group; with `flush_twin`, also writes the
    /// twin of every dirty device behind, in the same batch.
    async fn commit(
        &mut self,
        pending: &mut Pending,
        dirty: &mut HashSet<DeviceId>,
        flush_twin: bool,
    ) {
        if let Some(h) = self.held.as_mut() {
            // The store cannot write: hold the records (the twin stays dirty).
            h.extend(std::mem::take(pending).to_vec());
            metrics::gauge!("edgesync_outbox_held_records").set(h.records.len() as f64);
            self.health.set_unready(held_reason(h));
            return;
        }
        // Encoded straight from the twin: no copy of its samples (at 100,000 tags a copy of
        // every dirty device's samples took about 7 MB every second).
        let twin: Vec<(DeviceId, Vec<u8>)> = if flush_twin {
            let twin = self.local.lock();
            dirty
                .drain()
                .map(|d| {
                    let encoded = twin.encoded_device_samples(&d);
                    (d, encoded)
                })
                .collect()
        } else {
            vec![]
        };
        let online = self.uplink.borrow().connected;
        let mut records = std::mem::take(pending);
        if !online && !self.state_only.is_empty() {
            // Offline: only the latest value of a state-only property matters; it is in the
            // twin and goes out with the resync once the hub is reachable.
            let before = records.len();
            let state_only = &self.state_only;
            let stale = &mut self.stale;
            let kept: Vec<Sample> = records
                .iter()
                .filter(|s| {
                    let key = (s.device.clone(), s.property.clone());
                    if state_only.contains(&key) {
                        stale.insert(key);
                        false
                    } else {
                        true
                    }
                })
                .cloned()
                .collect();
            let held = before - kept.len();
            if held > 0 {
                records = Pending::default();
                records.push(Arc::new(kept));
                metrics::counter!("edgesync_outbox_coalesced_records_total").increment(held as u64);
            }
        }
        let mut st = self.store.lock().await;
        let mut refused = 0;
        if self.refuse_when_full && !records.is_empty() && st.outbox_bytes() >= self.max_bytes {
            refused = records.len() as u64;
            metrics::counter!("edgesync_outbox_refused_records_total").increment(refused);
            if st.lost_pending() == 0 {
                tracing::warn!(
                    records = refused,
                    "outbox full: refusing new records (reported to the hub as a gap)"
                );
            }
            for s in std::mem::take(&mut records).iter() {
                self.stale.insert((s.device.clone(), s.property.clone()));
            }
        }
        let mut resync = None;
        let owed = self.stale_all || !self.stale.is_empty();
        if owed && refused == 0 && online && st.outbox_bytes() <= self.max_bytes / 2 {
            // After a loss, once the hub is reachable and the outbox has room: the latest value
            // of every property whose latest value the hub may not have (all of them after a
            // restart, which forgets which), unless this group carries a newer one anyway.
            let newer: HashSet<(&DeviceId, &PropertyId)> =
                records.iter().map(|s| (&s.device, &s.property)).collect();
            let twin = self.local.lock();
            let snapshot: Vec<Sample> = self
                .specs
                .keys()
                .flat_map(|d| twin.device_samples(d))
                .filter(|s| {
                    (self.stale_all || self.stale.contains(&(s.device.clone(), s.property.clone())))
                        && !newer.contains(&(&s.device, &s.property))
                })
                .collect();
            drop(twin);
            drop(newer);
            tracing::info!(
                properties = snapshot.len(),
                "after a loss: sending the latest value of the properties concerned again"
            );
            metrics::counter!("edgesync_outbox_resyncs_total").increment(1);
            records.push(Arc::new(snapshot));
            self.stale.clear();
            self.stale_all = false;
            resync = Some(false);
        } else if owed {
            // Records accepted now carry the latest value of their property.
            for s in records.iter() {
                self.stale.remove(&(s.device.clone(), s.property.clone()));
            }
            if (self.stale_all || !self.stale.is_empty()) && !st.resync_pending() {
                resync = Some(true);
            }
        }
        if records.is_empty() && twin.is_empty() && refused == 0 && resync.is_none() {
            return;
        }
        let first_seq = st.next_seq();
        let n = records.len();
        let last_seq = (first_seq + n as u64).saturating_sub(1);
        if n > 0 {
            tracing::trace!(target: DURABILITY_TARGET, "appending upto={last_seq} from={first_seq}");
        }
        match st.append_with(records.iter(), &twin, refused, resync).await {
            Ok(a) => {
                // Also while the hub is away (the uplink sets them on acks).
                metrics::gauge!("edgesync_outbox_backlog_records").set(st.backlog() as f64);
                metrics::gauge!("edgesync_outbox_bytes").set(st.outbox_bytes() as f64);
                drop(st);
                if n > 0 {
                    // Durable per the fsync policy; only now may the uplink send them.
                    tracing::trace!(target: DURABILITY_TARGET, "committed upto={last_seq} from={first_seq}");
                }
                if n > 0 {
                    metrics::counter!("edgesync_outbox_commits_total").increment(1);
                }
                metrics::counter!("edgesync_outbox_records_accepted_total").increment(n as u64);
                if let Some(d) = a.dropped {
                    metrics::counter!("edgesync_outbox_records_dropped_total")
                        .increment(d.1 - d.0 + 1);
                    tracing::warn!(from = d.0, to = d.1, "outbox full: oldest history dropped");
                }
                if let Some(lost) = match (a.dropped, a.skipped) {
                    (Some(d), Some(s)) => Some((d.0.min(s.0), d.1.max(s.1))),
                    (d, s) => d.or(s),
                } {
                    let _ = self.dropped.send(Some(lost));
                }
                let _ = self.appended.send(a.sendable_next);
                if !a.dropped_latest.is_empty() {
                    // A dropped sample that is still its property's latest value: the hub may
                    // never have had it.
                    let twin = self.local.lock();
                    for (device, property, ts) in a.dropped_latest {
                        let latest = twin
                            .device_samples(&device)
                            .into_iter()
                            .find(|s| s.property == property)
                            .map(|s| s.ts);
                        if latest.is_none_or(|t| t <= ts) {
                            self.stale.insert((device, property));
                        }
                    }
                }
            }
            Err(e) => {
                // sled keeps a write error until the store is reopened: hold this group and
                // what follows in memory, report not ready, and probe the disk.
                drop(st);
                metrics::counter!("edgesync_outbox_commit_errors_total").increment(1);
                tracing::error!(
                    error = %e,
                    records = n,
                    "outbox commit failed: holding records in memory until the store can write again"
                );
                for (d, _) in twin {
                    dirty.insert(d);
                }
                let h = Held::new(first_seq, &records.to_vec(), refused, e.to_string());
                metrics::gauge!("edgesync_outbox_held_records").set(h.records.len() as f64);
                self.health.set_unready(held_reason(&h));
                self.held = Some(h);
                self.probe_at = Some(tokio::time::Instant::now() + crate::held::PROBE_INTERVAL);
            }
        }
    }

    /// Writes the held records to the spill file; true once they are safely there.
    async fn spill(&mut self) -> bool {
        let Some(h) = self.held.as_ref() else {
            return false;
        };
        let bytes = h.encode();
        let dir = self.data_dir.clone();
        let r = tokio::task::spawn_blocking(move || crate::held::spill_bytes(&dir, &bytes)).await;
        match r {
            Ok(Ok(path)) => {
                tracing::warn!(
                    records = h.records.len(),
                    dropped = h.dropped,
                    path = %path.display(),
                    "held records saved; restarting to reopen the outbox store"
                );
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, records = h.records.len(), "cannot save the held records yet (is the disk still full?)");
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "saving the held records panicked");
                false
            }
        }
    }
}

/// What `/readyz` says while records are held.
fn held_reason(h: &Held) -> String {
    format!(
        "outbox store cannot write ({}); {} records held in memory{}, retrying every {} s",
        h.error,
        h.records.len(),
        if h.dropped > 0 {
            format!(", {} oldest dropped", h.dropped)
        } else {
            String::new()
        },
        crate::held::PROBE_INTERVAL.as_secs()
    )
}
