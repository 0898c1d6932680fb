//! The agent's durable state: the outbox in its own log ([`crate::outbox_log`]), everything
//! else in sled.
//!
//! The outbox log, directory `outbox/` inside the store directory, holds the numbered
//! records: a *group* of records per commit (record `i` of a group has sequence `first + i`),
//! and *lost runs*: records refused while the outbox was full (`on_full = "refuse_new"`).
//! They hold their place in the numbering; once everything before them is acknowledged they
//! count as handled and the next hello tells the hub (a gap). Every log entry also carries
//! the highest acknowledged number and the resync flag as they were when it was written.
//!
//! One sled tree, keys prefixed by kind:
//! - `m` + name → metadata (the store's id, the control log's and the downlink's positions,
//!   the local rules' alarms);
//! - `c` + sequence number → a control record (an outcome or a local proposal for the hub);
//! - `d` + device → the desired state of that device's properties;
//! - `t` + device → the latest reported sample of every property of that device (one entry
//!   per device: sled's memory grows with the number of keys, ~2 KB each, so 10,000
//!   per-property keys would cost the agent ~20 MB).
//!
//! Stores written before the outbox had its own log kept groups (`o`), lost runs (`g`) and
//! their metadata (`macked`, `mnext`, `mresync`) in sled: they are moved into the log when
//! the store opens.
//!
//! Invariants:
//! - a record counts as accepted once its group is written to the log (and synced, per the
//!   fsync policy); accepted records are deleted only after the hub acknowledged them, or
//!   dropped oldest-first when the outbox exceeds its byte budget (which the uplink reports as
//!   a gap);
//! - sequence numbers are dense: groups and lost runs cover `acked+1 .. next` without holes
//!   (dropped history lies below `acked`); numbers the log cannot account for after damage
//!   become a lost run;
//! - records are only ever sent below the first lost run ([`AgentStore::sendable_next`]);
//! - after any loss (history dropped, records refused, state-only values held back while
//!   offline) the `resync` flag is set, durably before any record is deleted, and stays set
//!   until a group carrying the latest state of every property is committed
//!   ([`AgentStore::append_with`]), in the same log entry;
//! - an acknowledgement becomes durable with the next log entry: segment files are deleted
//!   only after that, so a crash can only bring acknowledged records back (sent again, counted
//!   as duplicates by the hub), never lose one;
//! - the twin in sled is written behind, at most every second, in the commit of an outbox
//!   group; after a crash it may lag the outbox by that second, which only means the first
//!   poll after a restart reports those properties again.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::outbox_log::{self, EntryOut, Found, Kind, Loc, Log, LogError, io_err};
use edgesync_protocol::durable::DirSync;
use edgesync_protocol::frame::{FrameError, batch_range, decode_samples, encode_samples_of};
use edgesync_protocol::{DeviceId, PropertyId, Sample};

/// Errors of the agent store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// sled failed.
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// The outbox log failed (a file, or damage in it).
    #[error("outbox log: {0}")]
    Log(#[from] LogError),
    /// Making a commit durable failed.
    #[error("{0}")]
    Flush(#[from] FlushFailed),
    /// A stored desired-state entry does not decode.
    #[error("corrupt entry {key}: {reason}")]
    CorruptDesired {
        /// Which key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A stored entry does not decode (disk corruption or a foreign file).
    #[error("corrupt entry {key}: {source}")]
    Corrupt {
        /// Which key.
        key: String,
        /// Decoder error.
        source: FrameError,
    },
    /// Records were asked for that the outbox does not hold.
    #[error("outbox does not hold records {from}..{to}")]
    Missing {
        /// First asked.
        from: u64,
        /// One past the last asked.
        to: u64,
    },
}

/// When the outbox fsyncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// After every group commit: nothing accepted is lost to a crash of the process or the OS,
    /// or a power cut (more flash wear).
    EveryCommit,
    /// Every commit is written to the OS (a process crash loses nothing); fsync at most this
    /// often, and this long after an unsynced commit at the latest: an OS crash or a power cut
    /// loses at most this window.
    IntervalMs(u64),
    /// Never explicitly: every commit is written to the OS (a crash of the process loses
    /// nothing), which writes it back on its own schedule (Linux: dirty pages older than 30 s
    /// by default); an OS crash or a power cut loses what was not written back yet.
    Never,
}

/// Before the outbox log: the highest acknowledged number (now in every log entry).
const LEGACY_ACKED: &[u8] = b"macked";
/// Before the outbox log: the next sequence number.
const LEGACY_NEXT: &[u8] = b"mnext";
/// Before the outbox log: set while a resync was owed (now a flag of every log entry).
const LEGACY_RESYNC: &[u8] = b"mresync";
/// Size of an outbox log segment.
const LOG_SEGMENT_BYTES: u64 = 1 << 20;
/// The outbox log's directory inside the store directory.
pub const LOG_DIR: &str = "outbox";
/// Random id of this store, created with it (hex).
const META_STORE_ID: &[u8] = b"mstoreid";
/// Highest control record the hub acknowledged.
const META_CTL_ACKED: &[u8] = b"mcacked";
/// Highest desired version taken over from the hub.
const META_DOWNLINK: &[u8] = b"mdownlink";
/// The local rules' active alarms (JSON, see `crate::rules`).
const META_ALARMS: &[u8] = b"malarms";

fn control_key(seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'c';
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn desired_key(device: &DeviceId) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + device.as_str().len());
    k.push(b'd');
    k.extend_from_slice(device.as_str().as_bytes());
    k
}

/// A run of records inside one outbox group: the group's encoded samples (as
/// [`encode_samples`](edgesync_protocol::frame::encode_samples) writes them) and the byte
/// range of the records in them.
pub type BatchRun = (bytes::Bytes, std::ops::Range<usize>);

/// The error for outbox group `first` (or the group holding it) whose records do not decode.
fn corrupt_group(first: u64) -> impl FnOnce(FrameError) -> StoreError {
    move |source| StoreError::Corrupt {
        key: format!("outbox group {first}"),
        source,
    }
}

/// The desired state of one property, as persisted (see [`AgentStore::save_desired`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PersistedDesired {
    /// The property.
    pub property: PropertyId,
    /// Its desired value.
    pub desired: Option<edgesync_protocol::desired::DesiredValue>,
    /// What became of it.
    pub applied: Option<edgesync_protocol::desired::Applied>,
    /// The highest version of this property the hub sent (the base of local proposals).
    pub base: u64,
    /// A version (or a local change, 0) taken over but not yet at a final outcome: applied
    /// again after a restart.
    pub pending: bool,
}

fn twin_key(device: &DeviceId) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + device.as_str().len());
    k.push(b't');
    k.extend_from_slice(device.as_str().as_bytes());
    k
}

/// sled segment (and write buffer) size of the agent store; sled's default is 512 KiB.
const SEGMENT_BYTES: usize = 256 * 1024;

/// Opens sled, waiting up to 2 s for the file lock: a previous handle of this process (or a
/// process that just exited) may release it a moment late (sled's flusher thread holds the
/// database briefly after the last handle drops).
fn open_with_retry(config: &sled::Config) -> Result<sled::Db, sled::Error> {
    let mut tries = 0;
    loop {
        match config.open() {
            // sled reports a held lock as an `Other` I/O error with this text.
            Err(sled::Error::Io(e))
                if tries < 100 && e.to_string().contains("could not acquire lock") =>
            {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// A flush request: answered with the outcome of a flush that started after it was sent.
struct FlushRequest {
    reply: tokio::sync::oneshot::Sender<Result<(), FlushFailed>>,
    /// sled was written to (the twin, metadata).
    sled: bool,
    /// The outbox log's segment that was written to.
    log: Option<Arc<std::fs::File>>,
    /// Sync now, even with an fsync interval that has not elapsed.
    force: bool,
}

/// A failed flush, as told to every request it answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FlushFailed(Arc<str>);

/// Makes commits durable on our own thread ("store-sync"), on request: `fdatasync` of the
/// outbox log's segment, and for writes to sled the synchronous `Db::flush` followed by
/// [`DirSync::sync`]. Requests that arrive while a flush runs are answered together by the
/// next flush, which starts after all of them were sent, so every write made before a request
/// is durable when its answer comes.
///
/// The thread ends when the flusher is dropped (the channel closes); the drop waits for it.
struct Flusher {
    tx: Option<mpsc::Sender<FlushRequest>>,
    thread: Option<std::thread::JoinHandle<FlushStats>>,
}

impl Flusher {
    /// `interval`: `None` makes every flush durable at once; `Some(d)` syncs at most every `d`
    /// (and `d` after an unsynced flush at the latest).
    fn start(db: sled::Db, dir: &Path, interval: Option<Duration>) -> std::io::Result<Self> {
        let mut sync = DirSync::open(dir)?;
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("store-sync".into())
            .spawn(move || serve_flushes(&db, &mut sync, &rx, interval))?;
        Ok(Flusher {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Makes durable what was written before this call: sled's writes (with `sled`) and the
    /// log segment `log`; with an fsync interval only when it elapsed, unless `force`.
    async fn flush(
        &self,
        sled: bool,
        log: Option<Arc<std::fs::File>>,
        force: bool,
    ) -> Result<(), StoreError> {
        let gone = || StoreError::Flush(FlushFailed("the store's flusher thread ended".into()));
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.tx
            .as_ref()
            .ok_or_else(gone)?
            .send(FlushRequest {
                reply,
                sled,
                log,
                force,
            })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())??;
        Ok(())
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            // A panic of the thread was already reported to the waiting callers as an error.
            let _ = thread.join();
        }
    }
}

/// What a flush still has to sync: sled's files, and log segments (by identity).
#[derive(Default)]
struct Unsynced {
    sled: bool,
    logs: Vec<Arc<std::fs::File>>,
}

impl Unsynced {
    fn add_log(&mut self, f: Arc<std::fs::File>) {
        if !self.logs.iter().any(|l| Arc::ptr_eq(l, &f)) {
            self.logs.push(f);
        }
    }

    fn is_empty(&self) -> bool {
        !self.sled && self.logs.is_empty()
    }

    /// `fdatasync` of every log segment, then sled's files; clears what it synced.
    fn sync(&mut self, sync: &mut DirSync) -> Result<(), FlushFailed> {
        for f in self.logs.drain(..) {
            f.sync_data()
                .map_err(|e| FlushFailed(format!("outbox log: fdatasync: {e}").into()))?;
        }
        if std::mem::take(&mut self.sled) {
            sync.sync()
                .map_err(|e| FlushFailed(format!("sled store: fsync: {e}").into()))?;
        }
        Ok(())
    }
}

/// The flusher thread: for all requests queued when it starts, one `Db::flush` (if any of
/// them wrote to sled) and the syncs: at once (`interval` `None`) or at most every `interval`,
/// timed with the monotonic clock (a wall-clock step cannot stop it); what is left unsynced is
/// synced `interval` after the previous sync even if no request follows, and when the channel
/// closes. Returns what it did once every sender is gone.
fn serve_flushes(
    db: &sled::Db,
    sync: &mut DirSync,
    rx: &mpsc::Receiver<FlushRequest>,
    interval: Option<Duration>,
) -> FlushStats {
    let mut stats = FlushStats::default();
    let mut waiting = Vec::new();
    let mut last_sync = Instant::now();
    let mut unsynced = Unsynced::default();
    loop {
        let first = match interval {
            Some(every) if !unsynced.is_empty() => {
                match rx.recv_timeout((last_sync + every).saturating_duration_since(Instant::now()))
                {
                    Ok(r) => r,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        stats.timed_syncs += 1;
                        last_sync = Instant::now();
                        if let Err(e) = unsynced.sync(sync) {
                            tracing::error!(error = %e, "outbox: periodic fsync failed");
                        }
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        stats.syncs += 1;
                        let _ = unsynced.sync(sync);
                        break;
                    }
                }
            }
            _ => match rx.recv() {
                Ok(r) => r,
                Err(_) => break,
            },
        };
        waiting.push(first);
        waiting.extend(rx.try_iter());
        let mut res = Ok(());
        if waiting.iter().any(|r| r.sled) {
            // sled's flush ends with sync_file_range (no drive cache flush, no file metadata),
            // so it survives a crash of the process but not a power cut; the syncs after it do.
            res = db
                .flush()
                .map(drop)
                .map_err(|e| FlushFailed(format!("sled store: flush: {e}").into()));
            unsynced.sled = true;
            stats.flushes += 1;
            // A flush retires sled's current IO buffer (segment-sized) through an
            // epoch-deferred drop, kept in this thread's local bag until 64 are queued: ~6 s
            // of flushes, +2 MiB peak RSS in the benchmark. Hand them to the global queue now
            // (crossbeam's `Guard::flush`, no disk I/O).
            sled::pin().flush();
        }
        for r in &mut waiting {
            if let Some(f) = r.log.take() {
                unsynced.add_log(f);
            }
        }
        let force = waiting.iter().any(|r| r.force);
        if res.is_ok() {
            match interval {
                Some(every) if last_sync.elapsed() < every && !force => {}
                _ => {
                    stats.syncs += 1;
                    last_sync = Instant::now();
                    res = unsynced.sync(sync);
                }
            }
        }
        for r in waiting.drain(..) {
            // The caller may have stopped waiting (its future was dropped).
            let _ = r.reply.send(res.clone());
        }
    }
    stats
}

/// What the flusher thread did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct FlushStats {
    /// `Db::flush` calls.
    flushes: u64,
    /// Syncs made by a flush or at the end.
    syncs: u64,
    /// Syncs made by the interval timer, with no request.
    timed_syncs: u64,
}

/// Where [`AgentStore::rebase`] builds the renumbered log, and where the replaced one goes.
fn rebase_dirs(log_dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let name = |suffix: &str| {
        let mut n = log_dir.file_name().unwrap_or_default().to_owned();
        n.push(suffix);
        log_dir.with_file_name(n)
    };
    (name(".new"), name(".old"))
}

/// Completes or undoes a rebase that a crash interrupted: a renumbered log that is complete
/// but was not yet moved in place while the old one is still there is discarded (the hub asks
/// again); one whose old log was already moved aside takes its place.
fn finish_rebase(log_dir: &Path) -> Result<(), StoreError> {
    let (new, old) = rebase_dirs(log_dir);
    if new.exists() {
        if log_dir.exists() {
            std::fs::remove_dir_all(&new).map_err(io_err(&new))?;
        } else {
            std::fs::rename(&new, log_dir).map_err(io_err(&new))?;
            if let Some(parent) = log_dir.parent() {
                outbox_log::sync_dir(parent)?;
            }
        }
    }
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    Ok(())
}

/// Moves an outbox kept in the sled tree (before the outbox had its own log) into `log`, then
/// removes it from sled. `found`: the log's entries (the moved ones are added). Returns whether
/// there was anything to move.
fn migrate_legacy(
    db: &sled::Db,
    log: &mut Log,
    found: &mut Vec<Found>,
) -> Result<bool, StoreError> {
    let mut keys = vec![];
    for prefix in [&b"o"[..], b"g"] {
        for k in db.scan_prefix(prefix).keys() {
            keys.push(k?);
        }
    }
    for k in [LEGACY_ACKED, LEGACY_NEXT, LEGACY_RESYNC] {
        if db.contains_key(k)? {
            keys.push(sled::IVec::from(k));
        }
    }
    if keys.is_empty() {
        return Ok(false);
    }
    if found.is_empty() {
        let acked = db.get(LEGACY_ACKED)?.and_then(|v| be_u64(&v)).unwrap_or(0);
        let mut next = db.get(LEGACY_NEXT)?.and_then(|v| be_u64(&v)).unwrap_or(1);
        let resync = db.get(LEGACY_RESYNC)?.is_some();
        // (first, count, payload; None for a lost run)
        let mut items: Vec<(u64, u64, Option<sled::IVec>)> = vec![];
        for kv in db.scan_prefix(b"o") {
            let (k, v) = kv?;
            let Some(first) = be_u64(&k[1..]) else {
                continue;
            };
            let count = decode_samples(&v)
                .map_err(|source| StoreError::Corrupt {
                    key: format!("outbox group {first} (sled tree, moving to the log)"),
                    source,
                })?
                .len() as u64;
            items.push((first, count, Some(v)));
        }
        for kv in db.scan_prefix(b"g") {
            let (k, v) = kv?;
            if let (Some(first), Some(last)) = (be_u64(&k[1..]), be_u64(&v))
                && last >= first
            {
                items.push((first, last - first + 1, None));
            }
        }
        items.sort_by_key(|i| i.0);
        let mut files: Vec<Arc<std::fs::File>> = vec![];
        for (first, count, payload) in items {
            if first + count <= acked + 1 || count == 0 {
                continue;
            }
            let e = EntryOut {
                kind: if payload.is_some() {
                    Kind::Group
                } else {
                    Kind::Lost
                },
                first,
                count,
                payload: payload.as_deref().unwrap_or(&[]),
            };
            let (locs, file) = log.append(&[e], acked, resync)?;
            if !files.iter().any(|f| Arc::ptr_eq(f, &file)) {
                files.push(file);
            }
            next = next.max(first + count);
            found.push(Found {
                kind: e.kind,
                first,
                count,
                acked,
                resync,
                loc: locs[0],
            });
        }
        let mark = EntryOut {
            kind: Kind::Mark,
            first: next,
            count: 0,
            payload: &[],
        };
        let (locs, file) = log.append(&[mark], acked, resync)?;
        files.push(file);
        found.push(Found {
            kind: Kind::Mark,
            first: next,
            count: 0,
            acked,
            resync,
            loc: locs[0],
        });
        for f in files {
            f.sync_data().map_err(|source| LogError::Io {
                path: log.dir().to_owned(),
                source,
            })?;
        }
    }
    // In the log now (or from an earlier open that crashed before this): gone from sled.
    let mut batch = sled::Batch::default();
    for k in keys {
        batch.remove(k);
    }
    db.apply_batch(batch)?;
    db.flush()?;
    Ok(true)
}

fn be_u64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

#[derive(Debug, Clone)]
struct Group {
    count: u64,
    /// A run of lost records: no samples.
    lost: bool,
    bytes: u64,
    /// Where its records are in the log (`None` for a lost run).
    loc: Option<Loc>,
    /// Its records as written to the log (encoded), kept while the cache budget allows.
    cached: Option<bytes::Bytes>,
}

/// What an append did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The sequence number the next record will get.
    pub next_seq: u64,
    /// History dropped to respect the byte budget (`from..=to`), if any.
    pub dropped: Option<(u64, u64)>,
    /// What the uplink may send up to (exclusive): [`AgentStore::sendable_next`].
    pub sendable_next: u64,
    /// A lost run that became the oldest entry and now counts as handled (`from..=to`): the
    /// hub must be told (as for `dropped`).
    pub skipped: Option<(u64, u64)>,
    /// The resync flag after this commit.
    pub resync: bool,
    /// For each property with samples in the dropped history: the newest dropped sample's
    /// timestamp (if it is still the property's latest value, the hub may never have had it).
    pub dropped_latest: Vec<(DeviceId, PropertyId, edgesync_protocol::Timestamp)>,
}

/// The outbox and twin of one agent.
pub struct AgentStore {
    db: sled::Db,
    log: Log,
    flusher: Flusher,
    fsync: Fsync,
    max_bytes: u64,
    cache_budget: u64,
    cached_bytes: u64,
    groups: BTreeMap<u64, Group>,
    total_bytes: u64,
    acked: u64,
    next: u64,
    ctl_acked: u64,
    ctl_next: u64,
    resync: bool,
    store_id: String,
    /// `acked` and `resync` as the last log entry has them.
    written: (u64, bool),
    /// `acked` as the last durable log entry has it: segments at or below it may go.
    durable_acked: u64,
}

impl std::fmt::Debug for AgentStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentStore")
            .field("acked", &self.acked)
            .field("next", &self.next)
            .field("groups", &self.groups.len())
            .field("bytes", &self.total_bytes)
            .finish()
    }
}

impl AgentStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(
        dir: &Path,
        cache_bytes: u64,
        max_bytes: u64,
        fsync: Fsync,
    ) -> Result<Self, StoreError> {
        Self::open_with(dir, cache_bytes, max_bytes, fsync, LOG_SEGMENT_BYTES)
    }

    fn open_with(
        dir: &Path,
        cache_bytes: u64,
        max_bytes: u64,
        fsync: Fsync,
        segment_bytes: u64,
    ) -> Result<Self, StoreError> {
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::LowSpace)
            // sled keeps its write buffers segment-sized; the agent's entries are small.
            .segment_size(SEGMENT_BYTES)
            .flush_every_ms(match fsync {
                Fsync::Never => Some(1000),
                _ => None,
            });
        let db = open_with_retry(&config)?;
        let interval = match fsync {
            Fsync::IntervalMs(ms) => Some(Duration::from_millis(ms)),
            _ => None,
        };
        let flusher = Flusher::start(db.clone(), dir, interval).map_err(sled::Error::Io)?;
        let log_dir = dir.join(LOG_DIR);
        finish_rebase(&log_dir)?;
        let (mut log, mut found, damage) = Log::open(&log_dir, segment_bytes)?;
        for d in &damage {
            if d.torn_tail {
                tracing::warn!(file = %d.path.display(), offset = d.offset, reason = %d.reason,
                    "outbox log: a write cut short by a crash was discarded");
            } else {
                tracing::error!(file = %d.path.display(), offset = d.offset, reason = %d.reason,
                    "outbox log: damaged entry; the records it and the rest of its segment held \
                     are reported to the hub as lost");
            }
        }
        if migrate_legacy(&db, &mut log, &mut found)? {
            tracing::info!(
                entries = found.len(),
                "outbox moved from the sled tree into its own log"
            );
        }
        let acked = found.iter().map(|f| f.acked).max().unwrap_or(0);
        let mut resync = found.last().is_some_and(|f| f.resync);
        let written = (acked, resync);
        let mut next = acked.saturating_add(1);
        let mut groups: BTreeMap<u64, Group> = BTreeMap::new();
        let mut total_bytes = 0;
        for f in &found {
            let end = f.first.saturating_add(f.count);
            if f.kind == Kind::Mark && f.first <= next {
                continue;
            }
            if end <= next {
                // Acknowledged, or written again after (not expected): already accounted for.
                if end > acked + 1 {
                    tracing::warn!(
                        first = f.first,
                        count = f.count,
                        "outbox log: entry overlaps an earlier one; skipped"
                    );
                }
                continue;
            }
            if f.first > next {
                // Numbers nothing in the log accounts for (damage): a lost run.
                groups.insert(
                    next,
                    Group {
                        count: f.first - next,
                        lost: true,
                        bytes: 0,
                        loc: None,
                        cached: None,
                    },
                );
                resync = true;
            } else if f.first < next && f.first > acked {
                tracing::warn!(
                    first = f.first,
                    count = f.count,
                    "outbox log: entry overlaps an earlier one; skipped"
                );
                continue;
            }
            match f.kind {
                Kind::Mark => {}
                Kind::Lost => match groups.iter_mut().next_back() {
                    Some((gf, g)) if g.lost && gf + g.count == f.first => g.count += f.count,
                    _ => {
                        groups.insert(
                            f.first,
                            Group {
                                count: f.count,
                                lost: true,
                                bytes: 0,
                                loc: None,
                                cached: None,
                            },
                        );
                    }
                },
                _ => {
                    total_bytes += u64::from(f.loc.len);
                    groups.insert(
                        f.first,
                        Group {
                            count: f.count,
                            lost: false,
                            bytes: u64::from(f.loc.len),
                            loc: Some(f.loc),
                            cached: None,
                        },
                    );
                }
            }
            next = end.max(f.first);
        }
        log.delete_through(acked)?;
        let store_id = match db.get(META_STORE_ID)? {
            Some(v) => String::from_utf8_lossy(&v).into_owned(),
            None => {
                let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
                db.insert(META_STORE_ID, id.as_bytes())?;
                id
            }
        };
        let ctl_acked = db
            .get(META_CTL_ACKED)?
            .and_then(|v| be_u64(&v))
            .unwrap_or(0);
        let ctl_next = match db.scan_prefix(b"c").keys().next_back() {
            Some(k) => be_u64(&k?[1..]).map_or(ctl_acked + 1, |last| last + 1),
            None => ctl_acked + 1,
        }
        .max(ctl_acked + 1);
        let mut store = AgentStore {
            db,
            log,
            flusher,
            fsync,
            max_bytes,
            cache_budget: (cache_bytes / 2).max(1 << 20),
            cached_bytes: 0,
            groups,
            total_bytes,
            acked,
            next,
            ctl_acked,
            ctl_next,
            resync,
            store_id,
            written,
            durable_acked: written.0,
        };
        // A lost run left at the start (acknowledged before a crash, or damage): handled; the
        // next hello tells the hub.
        store.skip_lost()?;
        Ok(store)
    }

    /// The random id this store got when it was created (sent in the hello, so the hub can
    /// tell a lost or replaced data directory from a restarted agent).
    pub fn store_id(&self) -> &str {
        &self.store_id
    }

    /// Whether the latest state of every property must be sent again (after a loss).
    pub fn resync_pending(&self) -> bool {
        self.resync
    }

    /// The uplink may send records below this (the first lost run, or `next`).
    pub fn sendable_next(&self) -> u64 {
        self.groups
            .iter()
            .find(|(_, g)| g.lost)
            .map_or(self.next, |(first, _)| *first)
    }

    /// Records refused and not yet counted as handled.
    pub fn lost_pending(&self) -> u64 {
        self.groups
            .values()
            .filter(|g| g.lost)
            .map(|g| g.count)
            .sum()
    }

    /// Highest control record the hub acknowledged.
    pub fn control_acked(&self) -> u64 {
        self.ctl_acked
    }

    /// The sequence number the next control record will get.
    pub fn control_next(&self) -> u64 {
        self.ctl_next
    }

    /// Appends a control record (an outcome or a proposal for the hub); durable per the fsync
    /// policy when this returns. Returns the control log's next sequence number.
    pub async fn append_control(
        &mut self,
        kind: edgesync_protocol::frame::ControlKind,
    ) -> Result<u64, StoreError> {
        use prost::Message;
        let seq = self.ctl_next;
        let rec = edgesync_protocol::frame::Control {
            seq,
            kind: Some(kind),
        };
        self.db.insert(control_key(seq), rec.encode_to_vec())?;
        self.flush(true, None).await?;
        self.ctl_next = seq + 1;
        Ok(self.ctl_next)
    }

    /// Control records `first .. first+count`, in order.
    pub fn read_control(
        &self,
        first: u64,
        count: usize,
    ) -> Result<Vec<edgesync_protocol::frame::Control>, StoreError> {
        use prost::Message;
        let end = first + count as u64;
        let mut out = Vec::with_capacity(count);
        for kv in self.db.range(control_key(first)..control_key(end)) {
            let (k, v) = kv?;
            let rec = edgesync_protocol::frame::Control::decode(&v[..]).map_err(|e| {
                StoreError::Corrupt {
                    key: format!("control record {:?}", be_u64(&k[1..])),
                    source: e.into(),
                }
            })?;
            out.push(rec);
        }
        if out.len() != count {
            return Err(StoreError::Missing {
                from: first,
                to: end,
            });
        }
        Ok(out)
    }

    /// The hub stored control records up to `upto`: delete them.
    pub fn ack_control(&mut self, upto: u64) -> Result<(), StoreError> {
        let upto = upto.min(self.ctl_next - 1);
        if upto <= self.ctl_acked {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for seq in self.ctl_acked + 1..=upto {
            batch.remove(&control_key(seq)[..]);
        }
        batch.insert(META_CTL_ACKED, &upto.to_be_bytes()[..]);
        self.db.apply_batch(batch)?;
        self.ctl_acked = upto;
        Ok(())
    }

    /// The hub holds control records this store does not know (it was lost, or restored from
    /// an older backup): the records still here are numbered again from `next_seq` on and
    /// sent (outcomes and local proposals the hub may not have). Returns how many.
    pub fn rebase_control(&mut self, next_seq: u64) -> Result<u64, StoreError> {
        use prost::Message;
        if next_seq <= self.ctl_next {
            return Ok(0);
        }
        let pending = self.ctl_next - self.ctl_acked - 1;
        let records = self.read_control(self.ctl_acked + 1, pending as usize)?;
        let mut batch = sled::Batch::default();
        for seq in self.ctl_acked + 1..self.ctl_next {
            batch.remove(&control_key(seq)[..]);
        }
        for (i, mut rec) in records.into_iter().enumerate() {
            rec.seq = next_seq + i as u64;
            batch.insert(&control_key(rec.seq)[..], rec.encode_to_vec());
        }
        batch.insert(META_CTL_ACKED, &(next_seq - 1).to_be_bytes()[..]);
        self.db.apply_batch(batch)?;
        self.ctl_next = next_seq + pending;
        self.ctl_acked = next_seq - 1;
        Ok(pending)
    }

    /// The highest desired version taken over from the hub (0 = none).
    pub fn last_downlink(&self) -> Result<u64, StoreError> {
        Ok(self
            .db
            .get(META_DOWNLINK)?
            .and_then(|v| be_u64(&v))
            .unwrap_or(0))
    }

    /// Persists the desired state of one device's properties and, with `last_downlink`, the
    /// highest version taken over, in one atomic batch; durable per the fsync policy.
    pub async fn save_desired(
        &mut self,
        device: &DeviceId,
        entries: &[PersistedDesired],
        last_downlink: Option<u64>,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_vec(entries).map_err(|e| StoreError::CorruptDesired {
            key: device.to_string(),
            reason: e.to_string(),
        })?;
        let mut batch = sled::Batch::default();
        batch.insert(desired_key(device), json);
        if let Some(v) = last_downlink {
            batch.insert(META_DOWNLINK, &v.to_be_bytes()[..]);
        }
        self.db.apply_batch(batch)?;
        self.flush(true, None).await
    }

    /// Persists only the downlink position (a version taken over that concerns no configured
    /// property).
    pub async fn save_desired_marker(&mut self, last_downlink: u64) -> Result<(), StoreError> {
        self.db
            .insert(META_DOWNLINK, &last_downlink.to_be_bytes()[..])?;
        self.flush(true, None).await
    }

    /// Persists the local rules' active alarms (replacing the previous set), durably.
    pub async fn save_alarms(&mut self, json: &[u8]) -> Result<(), StoreError> {
        self.db.insert(META_ALARMS, json)?;
        self.flush(true, None).await
    }

    /// The local rules' active alarms as last saved (`None`: never saved).
    pub fn load_alarms(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(META_ALARMS)?.map(|v| v.to_vec()))
    }

    /// Every persisted desired state, per device.
    pub fn load_desired(&self) -> Result<Vec<(DeviceId, Vec<PersistedDesired>)>, StoreError> {
        let mut out = vec![];
        for kv in self.db.scan_prefix(b"d") {
            let (k, v) = kv?;
            let key = String::from_utf8_lossy(&k[1..]).into_owned();
            let bad = |reason: String| StoreError::CorruptDesired {
                key: format!("desired {key}"),
                reason,
            };
            let device = DeviceId::new(key.clone()).map_err(|e| bad(e.to_string()))?;
            let entries: Vec<PersistedDesired> =
                serde_json::from_slice(&v).map_err(|e| bad(e.to_string()))?;
            out.push((device, entries));
        }
        Ok(out)
    }

    /// Highest sequence number the hub acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The sequence number the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next
    }

    /// Records not yet acknowledged.
    pub fn backlog(&self) -> u64 {
        self.next - self.acked - 1
    }

    /// Bytes held by the outbox.
    pub fn outbox_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// The latest reported samples persisted in the twin.
    pub fn load_twin(&self) -> Result<Vec<Sample>, StoreError> {
        let mut out = vec![];
        for kv in self.db.scan_prefix(b"t") {
            let (k, v) = kv?;
            let mut s = decode_samples(&v).map_err(|source| StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                source,
            })?;
            out.append(&mut s);
        }
        Ok(out)
    }

    /// Appends `records` to the outbox as one group and writes `twin` (for each listed device,
    /// the latest samples of all its properties, as
    /// [`encode_samples`](edgesync_protocol::frame::encode_samples) encodes them) behind, in
    /// one atomic commit; returns once durable per the fsync policy.
    pub async fn append(
        &mut self,
        records: impl Into<Arc<Vec<Sample>>>,
        twin: &[(DeviceId, Vec<u8>)],
    ) -> Result<Appended, StoreError> {
        let records = records.into();
        self.append_with(records.iter(), twin, 0, None).await
    }

    /// [`append`](Self::append), and also: numbers `refused` records that were not kept
    /// (refused by a full outbox) as a lost run after `records`, and sets (`Some(true)`) or
    /// clears (`Some(false)`) the resync flag, all in the same atomic commit. Refusing sets
    /// the flag.
    pub async fn append_with<'a>(
        &mut self,
        records: impl IntoIterator<Item = &'a Sample, IntoIter: Clone>,
        twin: &[(DeviceId, Vec<u8>)],
        refused: u64,
        resync: Option<bool>,
    ) -> Result<Appended, StoreError> {
        let records = records.into_iter();
        let resync = if refused > 0 { Some(true) } else { resync };
        let new_resync = resync.unwrap_or(self.resync);
        let first = self.next;
        let count = records.clone().count() as u64;
        let enc = if count > 0 {
            encode_samples_of(records)
        } else {
            vec![]
        };
        let bytes = enc.len() as u64;
        let lost_first = first + count;
        let mut entries = Vec::with_capacity(2);
        if count > 0 {
            entries.push(EntryOut {
                kind: Kind::Group,
                first,
                count,
                payload: &enc,
            });
        }
        if refused > 0 {
            entries.push(EntryOut {
                kind: Kind::Lost,
                first: lost_first,
                count: refused,
                payload: &[],
            });
        }
        if entries.is_empty() && new_resync != self.written.1 {
            // Only the flag changed: it must be durable all the same.
            entries.push(EntryOut {
                kind: Kind::Mark,
                first,
                count: 0,
                payload: &[],
            });
        }
        let mut loc = None;
        let mut log_file = None;
        if !entries.is_empty() {
            let (locs, file) = self.log.append(&entries, self.acked, new_resync)?;
            loc = (count > 0).then(|| locs[0]);
            log_file = Some(file);
            self.written = (self.acked, new_resync);
        }
        drop(entries);
        let enc = bytes::Bytes::from(enc);
        if !twin.is_empty() {
            let mut batch = sled::Batch::default();
            for (device, encoded) in twin {
                batch.insert(twin_key(device), encoded.as_slice());
            }
            self.db.apply_batch(batch)?;
        }
        self.flush(!twin.is_empty(), log_file).await?;
        self.resync = new_resync;
        if count > 0 {
            self.total_bytes += bytes;
            let cached = if self.cached_bytes + bytes <= self.cache_budget {
                self.cached_bytes += bytes;
                Some(enc)
            } else {
                None
            };
            self.groups.insert(
                first,
                Group {
                    count,
                    lost: false,
                    bytes,
                    loc,
                    cached,
                },
            );
        }
        if refused > 0 {
            // A lost run right after the previous one (nothing kept between) extends it.
            let extend = self
                .groups
                .iter_mut()
                .next_back()
                .filter(|(f, g)| count == 0 && g.lost && **f + g.count == lost_first);
            match extend {
                Some((_, g)) => g.count += refused,
                None => {
                    self.groups.insert(
                        lost_first,
                        Group {
                            count: refused,
                            lost: true,
                            bytes: 0,
                            loc: None,
                            cached: None,
                        },
                    );
                }
            }
        }
        self.next = first + count + refused;
        let (dropped, dropped_latest) = self.enforce_budget()?;
        // Everything before a new lost run may have been acknowledged already.
        let skipped = self.skip_lost()?;
        Ok(Appended {
            next_seq: self.next,
            dropped,
            sendable_next: self.sendable_next(),
            skipped,
            resync: self.resync,
            dropped_latest,
        })
    }

    /// Makes what was just written durable per the fsync policy (sled's part with `sled`, the
    /// log segment `log`), then deletes the log segments that the last written entry's
    /// `acked` covers.
    async fn flush(
        &mut self,
        sled: bool,
        log: Option<Arc<std::fs::File>>,
    ) -> Result<(), StoreError> {
        match self.fsync {
            // Written to the OS now; durable now, or within the interval (the flusher's timer).
            Fsync::EveryCommit | Fsync::IntervalMs(_) if sled || log.is_some() => {
                self.flusher.flush(sled, log, false).await?;
            }
            _ => {}
        }
        self.delete_acknowledged().await
    }

    /// Deletes the log segments that the last written entry's `acked` covers, once that entry
    /// is on disk (whatever the fsync policy: a deletion that survives a crash the entry does
    /// not would leave a hole, reported as lost records the hub already has).
    async fn delete_acknowledged(&mut self) -> Result<(), StoreError> {
        let acked = self.written.0;
        if acked <= self.durable_acked || !self.log.has_deletable(acked) {
            return Ok(());
        }
        if self.fsync != Fsync::EveryCommit {
            self.flusher
                .flush(false, self.log.active_file(), true)
                .await?;
        }
        self.durable_acked = acked;
        self.log.delete_through(acked)?;
        Ok(())
    }

    /// Drops the oldest history until the outbox fits its budget. Returns the range dropped
    /// and, per property in it, the newest dropped sample's timestamp.
    ///
    /// Memory only, like an acknowledgement: the new `acked` and the resync flag are written
    /// with the next log entry, and the dropped records' segments are deleted once that entry
    /// is durable (a crash before brings them back, to be dropped again).
    #[allow(clippy::type_complexity)] // a pair of plain results, named in the docs above
    fn enforce_budget(
        &mut self,
    ) -> Result<
        (
            Option<(u64, u64)>,
            Vec<(DeviceId, PropertyId, edgesync_protocol::Timestamp)>,
        ),
        StoreError,
    > {
        let mut dropped: Option<(u64, u64)> = None;
        let mut latest: HashMap<(DeviceId, PropertyId), edgesync_protocol::Timestamp> =
            HashMap::new();
        while self.total_bytes > self.max_bytes && self.groups.len() > 1 {
            let Some((&first, _)) = self.groups.iter().next() else {
                break;
            };
            self.resync = true;
            if self.groups.get(&first).is_some_and(|g| !g.lost) {
                let group = self.group_bytes(first)?;
                let samples = decode_samples(&group).map_err(corrupt_group(first))?;
                for s in &samples {
                    let ts = latest
                        .entry((s.device.clone(), s.property.clone()))
                        .or_insert(s.ts);
                    *ts = (*ts).max(s.ts);
                }
            }
            let g = self.forget_group(first)?;
            let last = first + g.count - 1;
            dropped = Some((dropped.map_or(first, |d| d.0), last));
            // Dropped history counts as handled: the hub is told through the next hello.
            self.acked = self.acked.max(last);
        }
        let latest = latest.into_iter().map(|((d, p), ts)| (d, p, ts)).collect();
        Ok((dropped, latest))
    }

    /// Removes a group from memory and returns it (its records stay in the log until their
    /// segment is deleted).
    fn forget_group(&mut self, first: u64) -> Result<Group, StoreError> {
        let g = self.groups.remove(&first).ok_or(StoreError::Missing {
            from: first,
            to: first,
        })?;
        self.total_bytes -= g.bytes;
        if g.cached.is_some() {
            self.cached_bytes -= g.bytes;
        }
        Ok(g)
    }

    /// Records `first .. first+count`, in order.
    pub fn read(&mut self, first: u64, count: usize) -> Result<Vec<Sample>, StoreError> {
        let mut out = Vec::with_capacity(count);
        for (bytes, r) in self.read_runs(first, count)? {
            out.extend(decode_samples(&bytes[r]).map_err(corrupt_group(first))?);
        }
        Ok(out)
    }

    /// Records `first .. first+count`, encoded, as runs of the groups holding them (shared,
    /// not copied): for each group, the byte range of its records that falls inside.
    pub fn read_runs(&mut self, first: u64, count: usize) -> Result<Vec<BatchRun>, StoreError> {
        let end = first + count as u64;
        let start_key = self
            .groups
            .range(..=first)
            .next_back()
            .map(|(k, _)| *k)
            .unwrap_or(first);
        let keys: Vec<u64> = self.groups.range(start_key..end).map(|(k, _)| *k).collect();
        let mut runs = Vec::with_capacity(keys.len());
        let mut total = 0;
        for gfirst in keys {
            if self.groups.get(&gfirst).is_some_and(|g| g.lost) {
                continue;
            }
            let gend = gfirst + self.groups.get(&gfirst).map_or(0, |g| g.count);
            let (a, b) = (first.max(gfirst), end.min(gend));
            if a < b {
                let bytes = self.group_bytes(gfirst)?;
                let r = (a - gfirst) as usize..(b - gfirst) as usize;
                total += r.len();
                let r = batch_range(&bytes, r).map_err(corrupt_group(gfirst))?;
                runs.push((bytes, r));
            }
        }
        if total != count {
            return Err(StoreError::Missing {
                from: first,
                to: end,
            });
        }
        Ok(runs)
    }

    /// A group's records, encoded: from the cache, or read from the log and checked (every
    /// record decodes, and as many as the group's header says).
    fn group_bytes(&mut self, first: u64) -> Result<bytes::Bytes, StoreError> {
        let missing = StoreError::Missing {
            from: first,
            to: first + 1,
        };
        let Some(g) = self.groups.get(&first) else {
            return Err(missing);
        };
        if let Some(c) = &g.cached {
            return Ok(c.clone());
        }
        let (Some(loc), count) = (g.loc, g.count) else {
            return Err(missing);
        };
        let v = self.log.read(loc, first, count)?;
        let samples = decode_samples(&v).map_err(corrupt_group(first))?;
        if samples.len() as u64 != count {
            return Err(StoreError::Log(LogError::Corrupt {
                path: self.log.dir().to_owned(),
                offset: loc.offset,
                reason: format!(
                    "group {first} decodes to {} records, its header says {count}",
                    samples.len()
                ),
            }));
        }
        Ok(bytes::Bytes::from(v))
    }

    /// The hub stored everything up to `upto`: delete it. A lost run that is now the oldest
    /// entry counts as handled too (the hub must be told, by the next hello): returns it.
    ///
    /// Memory only: the new acknowledged number is written with the next log entry (or by
    /// [`sync`](Self::sync)), and the segments it covers are deleted once that entry is
    /// durable. After a crash an acknowledgement not yet written is lost; its records are
    /// sent again and the hub counts them as duplicates.
    pub fn ack(&mut self, upto: u64) -> Result<Option<(u64, u64)>, StoreError> {
        if upto <= self.acked {
            return Ok(None);
        }
        let upto = upto.min(self.sendable_next() - 1);
        let done: Vec<u64> = self
            .groups
            .iter()
            .take_while(|(first, g)| *first + g.count - 1 <= upto)
            .map(|(first, _)| *first)
            .collect();
        for first in done {
            self.forget_group(first)?;
        }
        // Also when no group ended at or before `upto` (a group acknowledged in part).
        self.acked = self.acked.max(upto);
        self.skip_lost()
    }

    /// Counts lost runs at the start of the outbox as handled (moves `acked` past them).
    /// Returns the range skipped, if any.
    pub fn skip_lost(&mut self) -> Result<Option<(u64, u64)>, StoreError> {
        let mut skipped: Option<(u64, u64)> = None;
        while let Some((&first, g)) = self.groups.iter().next() {
            if !g.lost || first > self.acked + 1 {
                break;
            }
            let last = first + g.count - 1;
            self.forget_group(first)?;
            self.acked = self.acked.max(last);
            skipped = Some((skipped.map_or(first, |s| s.0), last));
        }
        Ok(skipped)
    }

    /// The hub holds more than this outbox ever had (the outbox was lost, or restored from an
    /// older backup): the records still here, which the hub may not have, are numbered again
    /// from `next_seq` on (in order) and sent. Returns how many.
    ///
    /// Which of them the hub already has cannot be known (its records with those numbers
    /// are another history), so this may duplicate some; it never drops a record.
    ///
    /// Atomic: the renumbered log is written and synced in a directory of its own, then
    /// replaces the old one by two renames (an interrupted rebase is completed or undone when
    /// the store opens, see `finish_rebase`).
    pub fn rebase(&mut self, next_seq: u64) -> Result<u64, StoreError> {
        if next_seq <= self.next {
            return Ok(0);
        }
        let shift = next_seq - (self.acked + 1);
        let log_dir = self.log.dir().to_owned();
        let (new_dir, old_dir) = rebase_dirs(&log_dir);
        if new_dir.exists() {
            std::fs::remove_dir_all(&new_dir).map_err(io_err(&new_dir))?;
        }
        let acked = next_seq - 1;
        let next = self.next + shift;
        let (mut log, _, _) = Log::open(&new_dir, self.log.segment_bytes())?;
        let firsts: Vec<u64> = self.groups.keys().copied().collect();
        let mut groups = BTreeMap::new();
        let mut files: Vec<Arc<std::fs::File>> = vec![];
        for first in firsts {
            let Some(g) = self.groups.get(&first).cloned() else {
                continue;
            };
            let payload = match g.loc {
                Some(loc) if !g.lost => self.log.read(loc, first, g.count)?,
                _ => vec![],
            };
            let to = first + shift;
            let e = EntryOut {
                kind: if g.lost { Kind::Lost } else { Kind::Group },
                first: to,
                count: g.count,
                payload: &payload,
            };
            let (locs, file) = log.append(&[e], acked, self.resync)?;
            if !files.iter().any(|f| Arc::ptr_eq(f, &file)) {
                files.push(file);
            }
            groups.insert(
                to,
                Group {
                    loc: (!g.lost).then(|| locs[0]),
                    ..g
                },
            );
        }
        let mark = EntryOut {
            kind: Kind::Mark,
            first: next,
            count: 0,
            payload: &[],
        };
        let (_, file) = log.append(&[mark], acked, self.resync)?;
        files.push(file);
        for f in files {
            f.sync_data().map_err(io_err(&new_dir))?;
        }
        // No segment may be in the making in either directory while they move.
        log.discard_spare();
        self.log.discard_spare();
        outbox_log::sync_dir(&new_dir)?;
        std::fs::rename(&log_dir, &old_dir).map_err(io_err(&log_dir))?;
        std::fs::rename(&new_dir, &log_dir).map_err(io_err(&new_dir))?;
        if let Some(parent) = log_dir.parent() {
            outbox_log::sync_dir(parent)?;
        }
        std::fs::remove_dir_all(&old_dir).map_err(io_err(&old_dir))?;
        log.moved_to(&log_dir);
        let backlog = self.next - self.acked - 1;
        self.log = log;
        self.groups = groups;
        self.next = next;
        self.acked = acked;
        self.written = (acked, self.resync);
        self.durable_acked = acked;
        Ok(backlog)
    }

    /// Writes what is not yet in the log (the acknowledged number, the resync flag) and
    /// flushes everything to disk (at shutdown).
    pub async fn sync(&mut self) -> Result<(), StoreError> {
        let mut log_file = None;
        if self.written != (self.acked, self.resync) {
            let mark = EntryOut {
                kind: Kind::Mark,
                first: self.next,
                count: 0,
                payload: &[],
            };
            let (_, file) = self.log.append(&[mark], self.acked, self.resync)?;
            self.written = (self.acked, self.resync);
            log_file = Some(file);
        }
        self.flusher.flush(true, log_file, true).await?;
        self.delete_acknowledged().await?;
        Ok(())
    }
}

/// Latest value per property, held in memory (the twin's hot copy).
pub type TwinMap = HashMap<(DeviceId, PropertyId), Sample>;

#[cfg(test)]
mod tests {
    use super::*;
    use edgesync_protocol::frame::encode_samples;

    fn legacy_group_key(first: u64) -> [u8; 9] {
        let mut k = [0u8; 9];
        k[0] = b'o';
        k[1..].copy_from_slice(&first.to_be_bytes());
        k
    }

    fn legacy_lost_key(first: u64) -> [u8; 9] {
        let mut k = [0u8; 9];
        k[0] = b'g';
        k[1..].copy_from_slice(&first.to_be_bytes());
        k
    }

    use edgesync_protocol::{Quality, Timestamp, Value};

    fn s(i: u64) -> Sample {
        Sample {
            device: DeviceId::new("d").unwrap(),
            property: PropertyId::new(format!("p{}", i % 5)).unwrap(),
            value: Some(Value::UInt(i)),
            quality: Quality::Good,
            ts: Timestamp(i),
        }
    }

    fn tmp() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "edgesync-store-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// Unacknowledged groups stay in memory as written to the log while they fit in half the
    /// configured cache (at least 1 MiB); the others are read back from the log; both give the
    /// same records and the same frames.
    #[tokio::test]
    async fn unacknowledged_groups_are_kept_in_memory_within_the_budget() {
        let dir = tmp();
        let mut st = AgentStore::open(&dir, 2 << 20, 1 << 30, Fsync::Never).unwrap();
        for g in 0..100u64 {
            st.append(
                (g * 1000 + 1..=g * 1000 + 1000).map(s).collect::<Vec<_>>(),
                &[],
            )
            .await
            .unwrap();
        }
        let cached = st.groups.values().filter(|g| g.cached.is_some()).count();
        assert!(st.total_bytes > 1 << 20, "{} bytes", st.total_bytes);
        assert!(
            st.cached_bytes <= 1 << 20 && cached > 0 && cached < 100,
            "{cached} groups"
        );
        // Across cached groups and groups read back from the log, cut anywhere.
        assert_eq!(
            st.read(500, 99_000).unwrap(),
            (500..99_500).map(s).collect::<Vec<_>>()
        );
        let mut out = bytes::BytesMut::new();
        let runs = st.read_runs(999, 1002).unwrap();
        let batches: Vec<&[u8]> = runs.iter().map(|(b, r)| &b[r.clone()]).collect();
        edgesync_protocol::frame::encode_records_batches(999, &batches, 0, 1 << 20, &mut out)
            .unwrap();
        let mut want = bytes::BytesMut::new();
        let samples: Vec<Sample> = (999..2001).map(s).collect();
        edgesync_protocol::frame::encode_records(999, samples.iter(), 0, 1 << 20, &mut want)
            .unwrap();
        assert_eq!(out, want);
        // Acknowledged groups leave memory.
        st.ack(100_000).unwrap();
        assert_eq!(st.cached_bytes, 0);
        drop(st);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn append_read_ack_reopen() {
        let dir = tmp();
        {
            let mut st = AgentStore::open(&dir, 1 << 20, 1 << 30, Fsync::EveryCommit).unwrap();
            let a = st
                .append(
                    (1..=10).map(s).collect::<Vec<_>>(),
                    &[(DeviceId::new("d").unwrap(), encode_samples(&[s(9), s(10)]))],
                )
                .await
                .unwrap();
            assert_eq!(a.next_seq, 11);
            st.append((11..=15).map(s).collect::<Vec<_>>(), &[])
                .await
                .unwrap();
            assert_eq!(st.read(9, 4).unwrap(), (9..=12).map(s).collect::<Vec<_>>());
            st.ack(12).unwrap();
            assert_eq!(st.backlog(), 3);
            assert!(st.read(5, 1).is_err());
            // A clean shutdown writes the acknowledgement.
            st.sync().await.unwrap();
        }
        // Reopen: acked, next and the remaining records survive; the twin too.
        let mut st = AgentStore::open(&dir, 1 << 20, 1 << 30, Fsync::EveryCommit).unwrap();
        assert_eq!((st.acked(), st.next_seq()), (12, 16));
        assert_eq!(
            st.read(13, 3).unwrap(),
            (13..=15).map(s).collect::<Vec<_>>()
        );
        assert_eq!(st.load_twin().unwrap(), vec![s(9), s(10)]);
        st.ack(15).unwrap();
        assert_eq!(st.outbox_bytes(), 0);
        drop(st);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An acknowledgement is written with the next commit: a crash before it loses it (its
    /// records come back and are sent again), after it the records are gone from disk.
    #[tokio::test]
    async fn acks_ride_on_the_next_commit() {
        let dir = tmp();
        let open = || AgentStore::open(&dir, 1 << 20, 1 << 30, Fsync::EveryCommit).unwrap();
        {
            let mut st = open();
            st.append((1..=10).map(s).collect::<Vec<_>>(), &[])
                .await
                .unwrap();
            assert_eq!(st.ack(10).unwrap(), None);
            assert_eq!((st.backlog(), st.outbox_bytes()), (0, 0));
            assert_eq!(st.written.0, 0, "not written yet");
            // Dropped without `sync`, as in a crash.
        }
        {
            let mut st = open();
            assert_eq!((st.acked(), st.next_seq()), (0, 11));
            assert_eq!(st.read(1, 10).unwrap(), (1..=10).map(s).collect::<Vec<_>>());
            st.ack(10).unwrap();
            st.append((11..=12).map(s).collect::<Vec<_>>(), &[])
                .await
                .unwrap();
            assert_eq!(st.written.0, 10, "written with the commit");
        }
        let mut st = open();
        assert_eq!((st.acked(), st.next_seq(), st.backlog()), (10, 13, 2));
        assert_eq!(
            st.read(11, 2).unwrap(),
            (11..=12).map(s).collect::<Vec<_>>()
        );
        drop(st);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn groups_larger_than_a_segment_survive_reopen() {
        let dir = tmp();
        let big: Vec<Sample> = (1..=20_000).map(s).collect();
        {
            let mut st =
                AgentStore::open_with(&dir, 1 << 20, 1 << 30, Fsync::EveryCommit, 4096).unwrap();
            st.append(big.clone(), &[]).await.unwrap();
        }
        let mut st =
            AgentStore::open_with(&dir, 1 << 20, 1 << 30, Fsync::EveryCommit, 4096).unwrap();
        assert_eq!(st.next_seq(), 20_001);
        assert_eq!(st.read(1, 20_000).unwrap(), big);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn byte_budget_drops_oldest_history() {
        let dir = tmp();
        let mut st = AgentStore::open(&dir, 1 << 20, 400, Fsync::Never).unwrap();
        let mut dropped = vec![];
        for g in 0..20u64 {
            let a = st
                .append((g * 10 + 1..=g * 10 + 10).map(s).collect::<Vec<_>>(), &[])
                .await
                .unwrap();
            if let Some(d) = a.dropped {
                dropped.push(d);
            }
        }
        assert!(!dropped.is_empty());
        assert!(st.outbox_bytes() <= 400 || st.backlog() <= 10);
        // What remains is contiguous and readable, right after what was dropped.
        let oldest = st.acked() + 1;
        let n = st.backlog() as usize;
        assert_eq!(
            st.read(oldest, n).unwrap(),
            (oldest..oldest + n as u64).map(s).collect::<Vec<_>>()
        );
        assert_eq!(oldest + n as u64, 201);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Records refused by a full outbox keep their place in the numbering as a lost run: the
    /// uplink never sends past it, and once everything before it is acknowledged it counts as
    /// handled (returned once, for the hub to be told). Runs merge; all of it survives a
    /// restart, and so does the resync flag.
    #[tokio::test]
    async fn refused_records_become_a_lost_run_that_is_handled_after_what_precedes_it() {
        let dir = tmp();
        {
            let mut st = AgentStore::open(&dir, 1 << 20, 1 << 30, Fsync::EveryCommit).unwrap();
            st.append((1..=10).map(s).collect::<Vec<_>>(), &[])
                .await
                .unwrap();
            assert!(!st.resync_pending());
            let a = st
                .append_with(std::iter::empty(), &[], 5, None)
                .await
                .unwrap();
            assert_eq!((a.next_seq, a.sendable_next, a.skipped), (16, 11, None));
            assert!(a.resync, "a refusal asks for a resync");
            // A second refusal right after extends the run.
            let a = st
                .append_with(std::iter::empty(), &[], 3, None)
                .await
                .unwrap();
            assert_eq!((a.next_seq, a.sendable_next), (19, 11));
            assert_eq!(st.lost_pending(), 8);
            // Then records are kept again: they wait behind the run.
            let a = st
                .append((19..=20).map(s).collect::<Vec<_>>(), &[])
                .await
                .unwrap();
            assert_eq!((a.next_seq, a.sendable_next), (21, 11));
            assert!(st.read(10, 2).is_err(), "the lost run holds no records");
            assert_eq!(st.ack(5).unwrap(), None);
            st.sync().await.unwrap();
        }
        let mut st = AgentStore::open(&dir, 1 << 20, 1 << 30, Fsync::EveryCommit).unwrap();
        assert_eq!((st.acked(), st.next_seq(), st.sendable_next()), (5, 21, 11));
        assert!(st.resync_pending());
        assert_eq!(st.ack(10).unwrap(), Some((11, 18)));
        assert_eq!((st.acked(), st.sendable_next(), st.backlog()), (18, 21, 2));
        assert_eq!(
            st.read(19, 2).unwrap(),
            (19..=20).map(s).collect::<Vec<_>>()
        );
        assert_eq!(st.ack(20).unwrap(), None);
        // The resync clears the flag, durably.
        let a = st.append_with(&[s(21)], &[], 0, Some(false)).await.unwrap();
        assert!(!a.resync);
        drop(st);
        let st = AgentStore::open(&dir, 1 << 20, 1 << 30, Fsync::EveryCommit).unwrap();
        assert!(!st.resync_pending());
        assert_eq!((st.acked(), st.next_seq()), (20, 22));
        drop(st);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A run refused after everything before it was acknowledged is handled at once; one left
    /// at the start by a crash is handled when the store opens.
    #[tokio::test]
    async fn a_lost_run_at_the_start_is_handled_at_once_and_on_open() {
        let dir = tmp();
        {
            let mut st = AgentStore::open(&dir, 1 << 20, 1 << 30, Fsync::EveryCommit).unwrap();
            st.append((1..=4).map(s).collect::<Vec<_>>(), &[])
                .await
                .unwrap();
            st.ack(4).unwrap();
            let a = st
                .append_with(std::iter::empty(), &[], 6, None)
                .await
                .unwrap();
            assert_eq!(a.skipped, Some((5, 10)));
            assert_eq!((st.acked(), a.sendable_next, a.next_seq), (10, 11, 11));
            st.sync().await.unwrap();
            // Simulate a crash between a refusal and its handling: a run written, not skipped.
            let run = EntryOut {
                kind: Kind::Lost,
                first: 11,
                count: 5,
                payload: &[],
            };
            st.log.append(&[run], 10, true).unwrap();
            st.flusher
                .flush(false, st.log.active_file(), true)
                .await
                .unwrap();
        }
        let st = AgentStore::open(&dir, 1 << 20, 1 << 30, Fsync::EveryCommit).unwrap();
        assert_eq!(
            (st.acked(), st.next_seq(), st.sendable_next()),
            (15, 16, 16)
        );
        drop(st);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Dropping history sets the resync flag (the dropped records may hold the only copy of
    /// some property's latest value the hub has not seen).
    #[tokio::test]
    async fn dropping_history_asks_for_a_resync() {
        let dir = tmp();
        let mut st = AgentStore::open(&dir, 1 << 20, 400, Fsync::EveryCommit).unwrap();
        let mut resync = false;
        for g in 0..20u64 {
            let a = st
                .append((g * 10 + 1..=g * 10 + 10).map(s).collect::<Vec<_>>(), &[])
                .await
                .unwrap();
            if a.dropped.is_some() {
                resync = true;
                assert!(a.resync);
            }
        }
        assert!(resync, "nothing was dropped");
        drop(st);
        let st = AgentStore::open(&dir, 1 << 20, 400, Fsync::EveryCommit).unwrap();
        assert!(st.resync_pending());
        drop(st);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn rebase_moves_numbering_forward() {
        let dir = tmp();
        let mut st = AgentStore::open(&dir, 1 << 20, 1 << 30, Fsync::Never).unwrap();
        st.append((1..=3).map(s).collect::<Vec<_>>(), &[])
            .await
            .unwrap();
        st.ack(1).unwrap();
        // Records 2 and 3 are still here: they move to 100 and 101, nothing is dropped.
        assert_eq!(st.rebase(100).unwrap(), 2);
        assert_eq!((st.acked(), st.next_seq(), st.backlog()), (99, 102, 2));
        assert_eq!(st.read(100, 2).unwrap(), vec![s(2), s(3)]);
        let a = st.append(vec![s(4)], &[]).await.unwrap();
        assert_eq!(a.next_seq, 103);
        // A small shift, where new keys are old ones: still in order, still all there.
        st.rebase(104).unwrap();
        assert_eq!(st.read(104, 3).unwrap(), vec![s(2), s(3), s(4)]);
        drop(st);
        let mut st = AgentStore::open(&dir, 1 << 20, 1 << 30, Fsync::Never).unwrap();
        assert_eq!((st.acked(), st.next_seq()), (103, 107));
        assert_eq!(st.read(104, 3).unwrap(), vec![s(2), s(3), s(4)]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn control_rebase_renumbers_pending_records_and_the_store_keeps_its_id() {
        use edgesync_protocol::frame::{ControlKind, DesiredStatus};
        let dir = tmp();
        let status = |version| {
            ControlKind::Status(DesiredStatus {
                device: "d".into(),
                property: "p".into(),
                version,
                outcome: 1,
                exception_code: 0,
                detail: String::new(),
                ts_ms: 1,
            })
        };
        let id = {
            let mut st = AgentStore::open(&dir, 1 << 20, 1 << 30, Fsync::EveryCommit).unwrap();
            for v in 1..=3 {
                st.append_control(status(v)).await.unwrap();
            }
            st.ack_control(1).unwrap();
            assert_eq!(st.rebase_control(50).unwrap(), 2);
            assert_eq!((st.control_acked(), st.control_next()), (49, 52));
            let recs = st.read_control(50, 2).unwrap();
            assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![50, 51]);
            assert_eq!(recs[0].kind, Some(status(2)));
            assert_eq!(recs[1].kind, Some(status(3)));
            assert_eq!(st.store_id().len(), 32);
            st.sync().await.unwrap();
            st.store_id().to_owned()
        };
        let st = AgentStore::open(&dir, 1 << 20, 1 << 30, Fsync::EveryCommit).unwrap();
        assert_eq!((st.control_acked(), st.control_next()), (49, 52));
        assert_eq!(st.store_id(), id, "the id stays with the store");
        drop(st);
        let _ = std::fs::remove_dir_all(&dir);
        let other = tmp();
        let st = AgentStore::open(&other, 1 << 20, 1 << 30, Fsync::EveryCommit).unwrap();
        assert_ne!(st.store_id(), id, "a new store gets a new id");
        drop(st);
        let _ = std::fs::remove_dir_all(&other);
    }

    fn segment_files(dir: &Path) -> usize {
        std::fs::read_dir(dir.join(LOG_DIR))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("seg-")
            })
            .count()
    }

    /// Appends records 1 ..= 10 * groups, ten per commit.
    async fn append_groups_of_ten(st: &mut AgentStore, groups: u64) {
        for g in 0..groups {
            st.append((g * 10 + 1..=g * 10 + 10).map(s).collect::<Vec<_>>(), &[])
                .await
                .unwrap();
        }
    }

    /// Segments go once an entry acknowledging all their records is durable, not before; the
    /// segment holding the last entry stays.
    #[tokio::test]
    async fn acknowledged_segments_are_deleted_after_the_next_commit() {
        let dir = tmp();
        let open =
            || AgentStore::open_with(&dir, 1 << 20, 1 << 30, Fsync::EveryCommit, 512).unwrap();
        let mut st = open();
        append_groups_of_ten(&mut st, 20).await;
        // (Segments in use: one made ahead may appear on disk at any moment.)
        let before = st.log.segments();
        assert!(before >= 5, "{before} segments");
        st.ack(150).unwrap();
        assert_eq!(
            st.log.segments(),
            before,
            "nothing deleted before the ack is written"
        );
        st.append(vec![s(201)], &[]).await.unwrap();
        let after = st.log.segments();
        assert!(after < before, "{after} segments left of {before}");
        assert_eq!(
            st.read(151, 51).unwrap(),
            (151..=201).map(s).collect::<Vec<_>>()
        );
        st.ack(201).unwrap();
        st.sync().await.unwrap();
        // The last entry's segment stays, and the next one may have been made ahead.
        assert!(segment_files(&dir) <= 2, "{} segments", segment_files(&dir));
        drop(st);
        let st = open();
        assert_eq!((st.acked(), st.next_seq(), st.backlog()), (201, 202, 0));
        assert!(segment_files(&dir) <= 2);
        drop(st);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A damaged entry in a sealed segment: the records nothing can be read for come back as
    /// a lost run (handled at once when at the start, and a resync is owed); the rest is read.
    #[tokio::test]
    async fn damaged_history_becomes_a_lost_run() {
        let dir = tmp();
        let open =
            || AgentStore::open_with(&dir, 1 << 20, 1 << 30, Fsync::EveryCommit, 1024).unwrap();
        let mut st = open();
        append_groups_of_ten(&mut st, 10).await;
        st.sync().await.unwrap();
        drop(st);
        let first_seg = std::fs::read_dir(dir.join(LOG_DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .min()
            .unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&first_seg)
            .unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"JUNK", 0).unwrap();
        drop(f);
        let mut st = open();
        assert!(st.resync_pending());
        let (acked, next) = (st.acked(), st.next_seq());
        assert!(acked >= 10 && acked % 10 == 0, "lost through {acked}");
        assert_eq!(next, 101);
        assert_eq!(
            st.read(acked + 1, (next - acked - 1) as usize).unwrap(),
            (acked + 1..next).map(s).collect::<Vec<_>>()
        );
        drop(st);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A store written before the outbox had its own log: its groups, lost runs and
    /// metadata move into the log and out of sled, and nothing else changes.
    #[tokio::test]
    async fn an_outbox_in_the_sled_tree_moves_into_the_log() {
        let dir = tmp();
        {
            let db = sled::Config::new()
                .path(&dir)
                .segment_size(SEGMENT_BYTES)
                .open()
                .unwrap();
            db.insert(
                legacy_group_key(1),
                encode_samples(&(1..=5).map(s).collect::<Vec<_>>()),
            )
            .unwrap();
            db.insert(
                legacy_group_key(6),
                encode_samples(&(6..=8).map(s).collect::<Vec<_>>()),
            )
            .unwrap();
            db.insert(legacy_lost_key(9), &10u64.to_be_bytes()[..])
                .unwrap();
            db.insert(legacy_group_key(11), encode_samples(&[s(11)]))
                .unwrap();
            db.insert(LEGACY_ACKED, &3u64.to_be_bytes()[..]).unwrap();
            db.insert(LEGACY_NEXT, &12u64.to_be_bytes()[..]).unwrap();
            db.insert(LEGACY_RESYNC, &[1u8][..]).unwrap();
            db.insert(META_STORE_ID, &b"0123456789abcdef0123456789abcdef"[..])
                .unwrap();
            db.flush().unwrap();
        }
        let check = |st: &mut AgentStore| {
            assert_eq!((st.acked(), st.next_seq(), st.sendable_next()), (3, 12, 9));
            assert_eq!(st.lost_pending(), 2);
            assert!(st.resync_pending());
            assert_eq!(st.read(4, 5).unwrap(), (4..=8).map(s).collect::<Vec<_>>());
            assert_eq!(st.store_id(), "0123456789abcdef0123456789abcdef");
        };
        {
            let mut st = AgentStore::open(&dir, 1 << 20, 1 << 30, Fsync::EveryCommit).unwrap();
            check(&mut st);
            for p in [&b"o"[..], b"g"] {
                assert_eq!(st.db.scan_prefix(p).count(), 0);
            }
            for k in [LEGACY_ACKED, LEGACY_NEXT, LEGACY_RESYNC] {
                assert!(!st.db.contains_key(k).unwrap());
            }
        }
        let mut st = AgentStore::open(&dir, 1 << 20, 1 << 30, Fsync::EveryCommit).unwrap();
        check(&mut st);
        assert_eq!(st.ack(8).unwrap(), Some((9, 10)));
        assert_eq!(st.read(11, 1).unwrap(), vec![s(11)]);
        drop(st);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A rebase interrupted by a crash: before the old log was moved aside, the old numbering
    /// stands (the hub will ask again); after, the new one.
    #[tokio::test]
    async fn an_interrupted_rebase_is_undone_or_completed_on_open() {
        let dir = tmp();
        let before = tmp();
        let mut st = AgentStore::open(&dir, 1 << 20, 1 << 30, Fsync::EveryCommit).unwrap();
        st.append((1..=3).map(s).collect::<Vec<_>>(), &[])
            .await
            .unwrap();
        st.sync().await.unwrap();
        copy_dir(&dir, &before);
        assert_eq!(st.rebase(100).unwrap(), 3);
        drop(st);
        let (new, old) = rebase_dirs(&before.join(LOG_DIR));
        // The renumbered log written in full, the old one still in place.
        copy_dir(&dir.join(LOG_DIR), &new);
        let mut undone = before.with_extension("undone");
        undone
            .as_mut_os_string()
            .push(fastrand::u64(..).to_string());
        copy_dir(&before, &undone);
        {
            let mut st = AgentStore::open(&undone, 1 << 20, 1 << 30, Fsync::EveryCommit).unwrap();
            assert_eq!((st.acked(), st.next_seq()), (0, 4));
            assert_eq!(st.read(1, 3).unwrap(), (1..=3).map(s).collect::<Vec<_>>());
            assert!(!rebase_dirs(&undone.join(LOG_DIR)).0.exists());
        }
        // The old log moved aside, the new one not yet in place.
        std::fs::rename(before.join(LOG_DIR), &old).unwrap();
        {
            let mut st = AgentStore::open(&before, 1 << 20, 1 << 30, Fsync::EveryCommit).unwrap();
            assert_eq!((st.acked(), st.next_seq()), (99, 103));
            assert_eq!(st.read(100, 3).unwrap(), (1..=3).map(s).collect::<Vec<_>>());
            assert!(!old.exists() && !new.exists());
        }
        for d in [&dir, &before, &undone] {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    /// Copies a store's files as they are on disk now, as a power loss would leave them.
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &to.join(e.file_name()));
            } else {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }

    #[tokio::test]
    async fn flushed_commit_is_on_disk_before_the_store_closes() {
        let dir = tmp();
        let copy = tmp();
        let mut st = AgentStore::open(&dir, 1 << 20, 1 << 30, Fsync::EveryCommit).unwrap();
        st.append((1..=10).map(s).collect::<Vec<_>>(), &[])
            .await
            .unwrap();
        // The store is still open: only what the flusher wrote is in the files (a commit
        // without a flush stays in sled's in-memory write buffer).
        copy_dir(&dir, &copy);
        let mut crashed = AgentStore::open(&copy, 1 << 20, 1 << 30, Fsync::EveryCommit).unwrap();
        assert_eq!(crashed.next_seq(), 11);
        assert_eq!(
            crashed.read(1, 10).unwrap(),
            (1..=10).map(s).collect::<Vec<_>>()
        );
        drop((st, crashed));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&copy);
    }

    #[test]
    fn flusher_answers_queued_requests_with_one_flush() {
        let dir = tmp();
        let db = sled::Config::new().path(&dir).open().unwrap();
        let (tx, rx) = mpsc::channel();
        let answers: Vec<_> = (0..16)
            .map(|_| {
                let (reply, answer) = tokio::sync::oneshot::channel();
                tx.send(FlushRequest {
                    reply,
                    sled: true,
                    log: None,
                    force: false,
                })
                .unwrap();
                answer
            })
            .collect();
        drop(tx);
        // Everything was queued before the flusher looked: one flush answers all, and the
        // loop ends once the channel is closed and drained.
        let mut sync = DirSync::open(&dir).unwrap();
        assert_eq!(
            serve_flushes(&db, &mut sync, &rx, None),
            FlushStats {
                flushes: 1,
                syncs: 1,
                timed_syncs: 0
            }
        );
        for mut a in answers {
            assert_eq!(a.try_recv().unwrap(), Ok(()));
        }
        drop(db);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `fsync = "interval"`: a commit is answered after sled's flush without waiting for the
    /// sync, and the sync follows on the flusher's (monotonic) timer although no request comes.
    #[test]
    fn interval_flusher_syncs_on_its_timer() {
        let dir = tmp();
        let db = sled::Config::new().path(&dir).open().unwrap();
        let mut sync = DirSync::open(&dir).unwrap();
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            serve_flushes(&db, &mut sync, &rx, Some(Duration::from_millis(100)))
        });
        let (reply, mut answer) = tokio::sync::oneshot::channel();
        tx.send(FlushRequest {
            reply,
            sled: true,
            log: None,
            force: false,
        })
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while answer.try_recv().is_err() {
            assert!(Instant::now() < deadline, "no answer");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Three intervals without a request: the timer syncs once.
        std::thread::sleep(Duration::from_millis(300));
        drop(tx);
        let stats = thread.join().unwrap();
        assert_eq!(
            stats,
            FlushStats {
                flushes: 1,
                syncs: 0,
                timed_syncs: 1
            }
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_flushes_are_all_answered_and_the_thread_ends_on_close() {
        let dir = tmp();
        let st = Arc::new(AgentStore::open(&dir, 1 << 20, 1 << 30, Fsync::EveryCommit).unwrap());
        let tasks: Vec<_> = (0..64u64)
            .map(|i| {
                let st = st.clone();
                tokio::spawn(async move {
                    st.db.insert(i.to_be_bytes(), &b"x"[..]).unwrap();
                    st.flusher.flush(true, None, false).await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let mut st = Arc::into_inner(st).unwrap();
        // Closing the channel ends the thread (dropping the store also joins it).
        drop(st.flusher.tx.take());
        let thread = st.flusher.thread.take().unwrap();
        let flushes = tokio::task::spawn_blocking(move || thread.join().unwrap().flushes)
            .await
            .unwrap();
        assert!((1..=64).contains(&flushes), "{flushes} flushes");
        // Without its thread the store reports an error instead of hanging.
        assert!(matches!(st.sync().await, Err(StoreError::Flush(_))));
        drop(st);
        let _ = std::fs::remove_dir_all(&dir);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// The outbox behaves like an in-memory model: what was appended and not acked is
        /// readable in order, across reopenings.
        #[test]
        fn outbox_matches_model(ops in proptest::collection::vec((0u8..4, 1u64..20), 1..40)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let dir = tmp();
                let mut st = AgentStore::open(&dir, 1 << 20, 1 << 30, Fsync::Never).unwrap();
                let mut model: std::collections::VecDeque<(u64, Sample)> = Default::default();
                let mut next = 1u64;
                for (op, n) in ops {
                    match op {
                        0 | 1 => {
                            let recs: Vec<Sample> = (next..next + n).map(s).collect();
                            for (i, r) in recs.iter().enumerate() { model.push_back((next + i as u64, r.clone())); }
                            next += n;
                            st.append(recs, &[]).await.unwrap();
                        }
                        2 => {
                            let upto = (st.acked() + n).min(next - 1);
                            st.ack(upto).unwrap();
                            while model.front().is_some_and(|(q, _)| *q <= upto) { model.pop_front(); }
                        }
                        _ => {
                            st.sync().await.unwrap();
                            drop(st);
                            st = AgentStore::open(&dir, 1 << 20, 1 << 30, Fsync::Never).unwrap();
                        }
                    }
                    assert_eq!(st.next_seq(), next);
                    assert_eq!(st.backlog() as usize, model.len());
                    if let Some((first, _)) = model.front() {
                        let got = st.read(*first, model.len()).unwrap();
                        let want: Vec<Sample> = model.iter().map(|(_, r)| r.clone()).collect();
                        assert_eq!(got, want);
                    }
                }
                drop(st);
                let _ = std::fs::remove_dir_all(&dir);
            });
        }
    }
}
