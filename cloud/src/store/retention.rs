//! History retention: a node's stored records are pruned, oldest first, once they are older than
//! the configured age or once the node's history exceeds its disk quota.
//!
//! # Layout
//!
//! | key | value |
//! |---|---|
//! | `0x06 <node> 0x00 <bucket start: u64 BE, ms since the epoch>` | the first seq (u64 BE) the node committed in that time bucket |
//! | `0x01 <node> 0x00 "hbytes"` | bytes of the node's stored record entries (u64 BE) |
//! | `0x01 <node> 0x00 "floor"` | the first seq that may still be stored: every record below it was pruned (u64 BE) |
//!
//! # Rules
//!
//! - An index entry `(t, s)` says: the records from `s` up to the next entry's seq were
//!   committed within the bucket `t..t + bucket` (`s` is the bucket's first commit; a commit in
//!   a later bucket writes the next entry). Pruning by age removes the records of every entry
//!   whose bucket ended before `now - max_age`, and those entries: records are removed at most
//!   one bucket late (the bucket is 1/100 of the age limit, between 1 s and 1 h).
//! - Pruning by size removes the oldest batches until the node's history is at most 90 % of its
//!   quota, so a node at its quota is pruned once per tenth of the quota, not once per commit.
//! - Records after the twin checkpoint are never pruned: they rebuild the twin on open.
//! - Gap markers are kept: a pruned record was stored, a gap record never was.
//! - Everything a pruning step changes (records removed, `hbytes`, `floor`, index entries) is
//!   one atomic sled batch, written under the commit lock; at most [`MAX_BATCHES_PER_STEP`]
//!   record entries per step, so commits of other nodes never wait long behind a large prune.

use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::time::Duration;

use edgesync_protocol::NodeId;

use super::{
    FIELD_BYTES, FIELD_FLOOR, FIELD_SEQ, HISTORY, Inner, SEP, StoreError, be_u64, meta_key,
    node_prefix, record_key,
};

/// Record entries removed in one atomic pruning step at most.
pub(super) const MAX_BATCHES_PER_STEP: usize = 2048;

/// How long the hub keeps a node's records, and how much disk they may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    /// Records committed longer ago than this are pruned (`None`: kept whatever their age).
    pub max_age: Option<Duration>,
    /// A node's stored records may take at most this many bytes (`None`: no quota).
    pub node_max_bytes: Option<u64>,
}

impl Retention {
    /// The index's time bucket: 1/100 of the age limit, between 1 s and 1 h (1 h without one).
    pub fn bucket_ms(&self) -> u64 {
        self.max_age.map_or(3_600_000, |a| {
            (a.as_millis() / 100).clamp(1_000, 3_600_000) as u64
        })
    }

    /// How often the hub looks for records past their age (the bucket, at most a minute).
    pub fn sweep_interval(&self) -> Duration {
        Duration::from_millis(self.bucket_ms().min(60_000))
    }

    /// The history size a node over its quota is brought back to (90 % of the quota).
    fn size_target(&self) -> Option<u64> {
        self.node_max_bytes.map(|q| q - q / 10)
    }
}

/// What one call of [`Inner::prune_node`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Record entries (batches) removed.
    pub batches: u64,
    /// Records removed.
    pub records: u64,
    /// Bytes of record entries removed.
    pub bytes: u64,
}

pub(super) fn index_key(node: &NodeId, bucket_ms: u64) -> Vec<u8> {
    let mut k = vec![HISTORY];
    k.extend_from_slice(node.as_str().as_bytes());
    k.push(SEP);
    k.extend_from_slice(&bucket_ms.to_be_bytes());
    k
}

pub(super) fn index_prefix(node: &NodeId) -> Vec<u8> {
    let mut k = vec![HISTORY];
    k.extend_from_slice(node.as_str().as_bytes());
    k.push(SEP);
    k
}

impl Inner {
    /// The bucket (start, ms) of `now_ms`.
    pub(super) fn bucket_of(&self, now_ms: u64) -> u64 {
        let b = self.retention.bucket_ms();
        now_ms - now_ms % b
    }

    /// Adds to `batch` the index entry of a commit starting at `first_seq` now, unless the
    /// node already has one for this bucket; returns the bucket to remember.
    pub(super) fn index_commit(
        &self,
        node: &NodeId,
        last_bucket: Option<u64>,
        first_seq: u64,
        batch: &mut sled::Batch,
    ) -> u64 {
        let bucket = self.bucket_of((self.clock)());
        if last_bucket != Some(bucket) {
            batch.insert(index_key(node, bucket), &first_seq.to_be_bytes());
        }
        bucket
    }

    /// The nodes whose history may need pruning now: over their quota, or (with an age
    /// limit) any node with an index entry old enough.
    pub(super) fn prune_candidates(&self) -> Vec<NodeId> {
        let target = self.retention.node_max_bytes;
        let by_age = self.retention.max_age.is_some();
        self.read()
            .iter()
            .filter(|(_, n)| by_age || target.is_some_and(|q| n.history_bytes > q))
            .map(|(node, _)| node.clone())
            .collect()
    }

    /// Prunes `node`'s history down to what the retention allows, in atomic steps of at most
    /// [`MAX_BATCHES_PER_STEP`] entries (the commit lock is released between steps).
    pub(super) fn prune_node(&self, node: &NodeId) -> Result<Pruned, StoreError> {
        // Over its quota: brought down to 90 % of it (decided once, so later steps go on).
        let goal = match (self.read().get(node), self.retention.node_max_bytes) {
            (Some(n), Some(q)) if n.history_bytes > q => self.retention.size_target(),
            _ => None,
        };
        let mut total = Pruned::default();
        loop {
            let step = self.prune_step(node, goal)?;
            total.batches += step.batches;
            total.records += step.records;
            total.bytes += step.bytes;
            if step.batches < MAX_BATCHES_PER_STEP as u64 {
                return Ok(total);
            }
        }
    }

    fn prune_step(&self, node: &NodeId, size_goal: Option<u64>) -> Result<Pruned, StoreError> {
        let _commit = self
            .commit_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (floor, applied, twin_seq, bytes) = match self.read().get(node) {
            None => return Ok(Pruned::default()),
            Some(n) => (n.floor.max(1), n.applied_seq, n.twin_seq, n.history_bytes),
        };
        // Records after the twin checkpoint rebuild the twin on open: never below this.
        let limit = twin_seq.min(applied) + 1;
        let mut batch = sled::Batch::default();

        // By age: the records of index entry k (`s_k` up to the next entry's seq) were all
        // committed within its bucket `t_k..t_k + bucket` (a commit in a later bucket writes
        // the next entry), so they are older than the cutoff once that bucket ended before it.
        let mut age_floor = 0;
        let mut old_entries = vec![];
        if let Some(max_age) = self.retention.max_age {
            let cutoff = (self.clock)().saturating_sub(max_age.as_millis() as u64);
            let bucket = self.retention.bucket_ms();
            let prefix = index_prefix(node);
            let mut all_old = false;
            for entry in self.tree.scan_prefix(&prefix) {
                let (key, value) = entry?;
                let t = be_u64(&key, &key[prefix.len()..])?;
                let s = be_u64(&key, &value)?;
                if t.saturating_add(bucket) > cutoff {
                    age_floor = s;
                    all_old = false;
                    break;
                }
                all_old = true;
                old_entries.push(key);
            }
            if all_old {
                age_floor = applied + 1;
            }
        }
        let age_target = age_floor.min(limit);

        // The batches to remove: the oldest ones, below the age target or while over the goal.
        let mut remaining = bytes;
        let mut removed = Pruned::default();
        let mut new_floor = floor;
        let prefix = node_prefix(node);
        for entry in self.tree.range(prefix.clone()..record_key(node, limit)) {
            let (key, value) = entry?;
            let Some(seq_bytes) = key.strip_prefix(prefix.as_slice()) else {
                break;
            };
            let first = be_u64(&key, seq_bytes)?;
            let over_goal = size_goal.is_some_and(|g| remaining > g);
            if (first >= age_target && !over_goal) || removed.batches == MAX_BATCHES_PER_STEP as u64
            {
                break;
            }
            let n = super::count_samples(&value).map_err(|e| super::corrupt_frame(&key, &e))?;
            batch.remove(key.clone());
            remaining = remaining.saturating_sub(value.len() as u64);
            removed.batches += 1;
            removed.records += n as u64;
            removed.bytes += value.len() as u64;
            // The next record is at or after this batch's end.
            new_floor = new_floor.max(first + n as u64);
        }
        // Records below the age target are gone (removed now, or gaps that were never stored).
        let done_by_age = removed.batches < MAX_BATCHES_PER_STEP as u64;
        if done_by_age {
            new_floor = new_floor.max(age_target);
        }
        if removed.batches == 0 && new_floor == floor {
            return Ok(removed);
        }
        // The index entries of what is now pruned.
        if done_by_age && age_floor <= limit {
            for key in old_entries {
                batch.remove(key);
            }
        }
        // The byte count covers every entry written so far: so does the sequence number.
        batch.insert(meta_key(node, FIELD_SEQ), &applied.to_be_bytes());
        batch.insert(meta_key(node, FIELD_BYTES), &remaining.to_be_bytes());
        batch.insert(meta_key(node, FIELD_FLOOR), &new_floor.to_be_bytes());
        self.tree.apply_batch(batch)?;
        self.written.fetch_add(1, Ordering::AcqRel);
        if let Some(n) = self.write().get_mut(node) {
            n.history_bytes = remaining;
            n.floor = new_floor;
        }
        Ok(removed)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    use edgesync_protocol::{DeviceId, PropertyId, Quality, Sample, Timestamp, Value};

    use super::super::{HubStore, count_samples, node_prefix};
    use super::*;

    const CACHE: u64 = 8 << 20;
    const T0: u64 = 1_800_000_000_000;

    fn node(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    /// Ten samples of ten properties, values from `v`.
    fn batch(v: i64) -> Vec<Sample> {
        (0..10)
            .map(|i| Sample {
                device: DeviceId::new("plc1").unwrap(),
                property: PropertyId::new(format!("p{i}")).unwrap(),
                value: Some(Value::Int(v + i)),
                quality: Quality::Good,
                ts: Timestamp(v as u64),
            })
            .collect()
    }

    fn open(dir: &tempfile::TempDir, r: Retention, now: &Arc<AtomicU64>) -> HubStore {
        let now = now.clone();
        HubStore::open_with(
            dir.path(),
            CACHE,
            r,
            Arc::new(move || now.load(Ordering::Relaxed)),
        )
        .unwrap()
    }

    /// Sizes of the node's record entries, by first seq, read from sled.
    fn entries(store: &HubStore, n: &NodeId) -> Vec<(u64, u64, usize)> {
        let prefix = node_prefix(n);
        store
            .tree()
            .scan_prefix(&prefix)
            .map(|e| {
                let (k, v) = e.unwrap();
                let first = u64::from_be_bytes(k[prefix.len()..].try_into().unwrap());
                (first, v.len() as u64, count_samples(&v).unwrap())
            })
            .collect()
    }

    fn index(store: &HubStore, n: &NodeId) -> Vec<(u64, u64)> {
        let prefix = index_prefix(n);
        store
            .tree()
            .scan_prefix(&prefix)
            .map(|e| {
                let (k, v) = e.unwrap();
                (
                    u64::from_be_bytes(k[prefix.len()..].try_into().unwrap()),
                    u64::from_be_bytes(v[..].try_into().unwrap()),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn quota_prunes_oldest_batches_to_ninety_percent_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let now = Arc::new(AtomicU64::new(T0));
        let n = node("gw-1");
        let other = node("gw-2");
        let one_batch = crate::store::encode_samples(&batch(0)).len() as u64;
        let quota = one_batch * 10;
        let r = Retention {
            max_age: None,
            node_max_bytes: Some(quota),
        };
        {
            let store = open(&dir, r, &now);
            for i in 0..30u64 {
                store
                    .commit_batch(&n, i * 10 + 1, &batch(i as i64))
                    .await
                    .unwrap();
                store
                    .commit_batch(&other, i + 1, &batch(i as i64)[..1])
                    .await
                    .unwrap();
            }
            let before = store.node(&n).unwrap();
            let sizes: u64 = entries(&store, &n).iter().map(|e| e.1).sum();
            assert_eq!(before.history_bytes, sizes);
            assert!(before.history_bytes > quota);
            assert_eq!(before.history_from, 1);
            // Records after the twin checkpoint are kept: checkpoint everything first.
            store.flush().await.unwrap();
            let pruned = store.prune_history().await.unwrap();
            let after = store.node(&n).unwrap();
            assert!(after.history_bytes <= quota - quota / 10, "{after:?}");
            assert!(after.history_bytes > quota - quota / 10 - one_batch - 16);
            assert_eq!(pruned.bytes, before.history_bytes - after.history_bytes);
            assert_eq!(pruned.records % 10, 0);
            // Whole batches, oldest first: what is left starts at the floor and runs to the end.
            let left = entries(&store, &n);
            assert_eq!(left[0].0, after.history_from);
            assert_eq!(after.history_from, 1 + pruned.records);
            assert_eq!(left.last().unwrap().0, 291);
            let records = store.records(&n, 1).unwrap();
            assert_eq!(records[0].0, after.history_from);
            assert_eq!(records.last().unwrap().0, 300);
            // The twin and the other node (under its quota) are untouched.
            let twin = store.twin(&n, &DeviceId::new("plc1").unwrap()).unwrap();
            assert_eq!(twin.reported.len(), 10);
            assert_eq!(store.records(&other, 1).unwrap().len(), 30);
            // Nothing more to do: a second sweep removes nothing.
            assert_eq!(store.prune_history().await.unwrap(), Pruned::default());
        }
        let store = open(&dir, r, &now);
        let again = store.node(&n).unwrap();
        let sizes: u64 = entries(&store, &n).iter().map(|e| e.1).sum();
        assert_eq!(again.history_bytes, sizes);
        assert_eq!(store.records(&n, 1).unwrap()[0].0, again.history_from);
        // Commits go on after the pruned range.
        store.commit_batch(&n, 301, &batch(99)).await.unwrap();
        assert_eq!(store.stored_seq(&n).unwrap(), 310);
    }

    #[tokio::test]
    async fn records_after_the_twin_checkpoint_are_never_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let now = Arc::new(AtomicU64::new(T0));
        let n = node("gw-1");
        let r = Retention {
            max_age: None,
            node_max_bytes: Some(1),
        };
        let store = open(&dir, r, &now);
        // The first commit of a run checkpoints; the next ones (within 1 s) do not.
        for i in 0..5u64 {
            store
                .commit_batch(&n, i * 10 + 1, &batch(i as i64))
                .await
                .unwrap();
        }
        store.prune_history().await.unwrap();
        assert_eq!(store.node(&n).unwrap().history_from, 11);
        assert_eq!(store.records(&n, 1).unwrap()[0].0, 11);
        drop(store);
        // Reopening replays them into the twin: the latest values are all there.
        let store = open(&dir, r, &now);
        let twin = store.twin(&n, &DeviceId::new("plc1").unwrap()).unwrap();
        assert_eq!(
            twin.reported[&PropertyId::new("p9").unwrap()].value,
            Some(Value::Int(4 + 9))
        );
        store.flush().await.unwrap();
        store.prune_history().await.unwrap();
        assert_eq!(store.node(&n).unwrap().history_from, 51);
        assert!(store.records(&n, 1).unwrap().is_empty());
        assert_eq!(store.node(&n).unwrap().history_bytes, 0);
    }

    #[tokio::test]
    async fn age_prunes_what_was_committed_before_the_cutoff_and_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let now = Arc::new(AtomicU64::new(T0));
        let n = node("gw-1");
        let r = Retention {
            max_age: Some(Duration::from_secs(600)),
            node_max_bytes: None,
        };
        assert_eq!(r.bucket_ms(), 6_000);
        let store = open(&dir, r, &now);
        // One batch every 10 s for 20 minutes: seq 10*i+1 committed at T0 + 10 s * i.
        for i in 0..120u64 {
            now.store(T0 + i * 10_000, Ordering::Relaxed);
            store
                .commit_batch(&n, i * 10 + 1, &batch(i as i64))
                .await
                .unwrap();
        }
        store.flush().await.unwrap();
        // Now T0 + 1190 s: the cutoff is T0 + 590 s; bucket T0 + 588 s began with seq 591
        // (committed at T0 + 590 s), so everything before it goes.
        let pruned = store.prune_history().await.unwrap();
        assert_eq!(pruned.records, 590);
        let status = store.node(&n).unwrap();
        assert_eq!(status.history_from, 591);
        assert_eq!(store.records(&n, 1).unwrap()[0].0, 591);
        let idx = index(&store, &n);
        assert_eq!(idx[0], (T0 + 588_000, 591));
        // Without new commits, time alone prunes the rest (all but the checkpointed end).
        now.store(T0 + 10_000_000, Ordering::Relaxed);
        store.prune_history().await.unwrap();
        assert!(store.records(&n, 1).unwrap().is_empty());
        assert_eq!(store.node(&n).unwrap().history_from, 1201);
        assert_eq!(store.node(&n).unwrap().history_bytes, 0);
        assert!(index(&store, &n).is_empty());
        // Gaps are kept, and a gap commit is indexed too.
        store.commit_gap(&n, 1201, 1300).await.unwrap();
        assert_eq!(store.gaps(&n).unwrap(), vec![(1201, 1300)]);
    }

    #[tokio::test]
    async fn a_store_from_before_retention_counts_its_bytes_and_ages_from_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let now = Arc::new(AtomicU64::new(T0));
        let n = node("gw-1");
        let keep = Retention::default();
        {
            let store = open(&dir, keep, &now);
            for i in 0..3u64 {
                store
                    .commit_batch(&n, i * 10 + 1, &batch(i as i64))
                    .await
                    .unwrap();
            }
            store.flush().await.unwrap();
            // What an older hub wrote: no byte count, no index.
            let tree = store.tree();
            tree.remove(meta_key(&n, FIELD_BYTES)).unwrap();
            for k in index(&store, &n) {
                tree.remove(index_key(&n, k.0)).unwrap();
            }
        }
        now.store(T0 + 3_600_000, Ordering::Relaxed);
        let r = Retention {
            max_age: Some(Duration::from_secs(60)),
            node_max_bytes: None,
        };
        let store = open(&dir, r, &now);
        let sizes: u64 = entries(&store, &n).iter().map(|e| e.1).sum();
        assert_eq!(store.node(&n).unwrap().history_bytes, sizes);
        // An hour old, but the age counts from the upgrade.
        store.prune_history().await.unwrap();
        assert_eq!(store.records(&n, 1).unwrap().len(), 30);
        now.store(T0 + 3_600_000 + 61_000, Ordering::Relaxed);
        store.prune_history().await.unwrap();
        assert!(store.records(&n, 1).unwrap().is_empty());
    }

    #[tokio::test]
    async fn records_page_pages_through_history() {
        let dir = tempfile::tempdir().unwrap();
        let now = Arc::new(AtomicU64::new(T0));
        let n = node("gw-1");
        let store = open(&dir, Retention::default(), &now);
        for i in 0..3u64 {
            store
                .commit_batch(&n, i * 10 + 1, &batch(i as i64))
                .await
                .unwrap();
        }
        let (page, next) = store.records_page(&n, 5, 10).unwrap();
        assert_eq!(
            page.iter().map(|r| r.0).collect::<Vec<_>>(),
            (5..15).collect::<Vec<_>>()
        );
        assert_eq!(next, Some(15));
        let (page, next) = store.records_page(&n, 25, 10).unwrap();
        assert_eq!(page.len(), 6);
        assert_eq!(next, None);
        let (page, next) = store.records_page(&n, 31, 10).unwrap();
        assert!(page.is_empty());
        assert_eq!(next, None);
    }
}
