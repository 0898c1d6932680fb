//! Records held in memory while the outbox cannot write, and their hand-over to the next run.
//!
//! A sled write error (a full disk, an I/O error) is permanent inside sled: every later commit
//! fails until the database is reopened, and sled 0.34 cannot be closed while a write is stuck
//! (dropping it waits for that write forever). So when a commit fails, the agent:
//!
//! 1. keeps polling, serving the twin and accepting changes, but holds new records in memory
//!    ([`Held`], bounded by [`HELD_MAX_BYTES`]; beyond it the oldest held records are dropped
//!    and counted) and reports itself not ready;
//! 2. probes the disk every [`PROBE_INTERVAL`]: it writes the held records to a spill file
//!    next to the store ([`SPILL_FILE`], written to a temporary name, synced, then renamed),
//!    plus [`HEADROOM_BYTES`] of scratch that is removed at once;
//! 3. once that succeeds, replaces itself with a fresh run of the same program (`exec`: same
//!    process id, every file and lock released), which reopens the store and imports the spill
//!    file ([`import`]) before anything else, then deletes it.
//!
//! The import gives the held records the sequence numbers they would have had: the group whose
//! commit failed keeps its first number. sled commits are atomic, so that group is either wholly
//! on disk after all (its write reached the disk before the error) or not at all; in the first
//! case it is not imported twice. Held records that were dropped become a lost run (a gap the hub
//! records), and the resync flag is set so that the hub gets every property's latest value.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgesync_protocol::Sample;
use edgesync_protocol::frame::{decode_samples, encode_samples};

use crate::store::{AgentStore, StoreError};

/// The spill file, in the agent's data directory.
pub const SPILL_FILE: &str = "held-records.bin";
/// Most bytes of records (as encoded in the outbox) held in memory while the store cannot
/// write.
pub const HELD_MAX_BYTES: u64 = 16 << 20;
/// How often the disk is probed while records are held.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// Free space the probe asks for beyond the spill file, for the store to reopen and commit.
pub const HEADROOM_BYTES: usize = 4 << 20;
const MAGIC: &[u8; 16] = b"edgesync-held-1\n";

/// Records that could not be committed, in order.
#[derive(Debug)]
pub struct Held {
    /// The sequence number the first held record would have had (the failed group's first).
    pub first_seq: u64,
    /// How many records the failed group held (it may have reached the disk after all).
    pub failed_len: u64,
    /// Records the failed group numbered as a lost run after its records (refused by a full
    /// outbox): lost either way, numbered on import unless the group reached the disk.
    pub failed_refused: u64,
    /// The held records, oldest first (the failed group's first).
    pub records: std::collections::VecDeque<(Sample, u64)>,
    /// Their encoded size.
    pub bytes: u64,
    /// Held records dropped to stay within [`HELD_MAX_BYTES`] (oldest first).
    pub dropped: u64,
    /// Why the store cannot write.
    pub error: String,
}

impl Held {
    /// Starts holding after the commit of `group` (first sequence number `first_seq`,
    /// followed by a lost run of `refused` records) failed.
    pub fn new(first_seq: u64, group: &[Sample], refused: u64, error: String) -> Held {
        let mut h = Held {
            first_seq,
            failed_len: group.len() as u64,
            failed_refused: refused,
            records: Default::default(),
            bytes: 0,
            dropped: 0,
            error,
        };
        h.extend(group.iter().cloned());
        h
    }

    /// Holds more records, dropping the oldest beyond [`HELD_MAX_BYTES`].
    pub fn extend(&mut self, records: impl IntoIterator<Item = Sample>) {
        for s in records {
            let n = encode_samples(std::slice::from_ref(&s)).len() as u64;
            self.bytes += n;
            self.records.push_back((s, n));
        }
        while self.bytes > HELD_MAX_BYTES {
            let Some((_, n)) = self.records.pop_front() else {
                break;
            };
            self.bytes -= n;
            self.dropped += 1;
        }
    }

    /// The spill file's content.
    pub fn encode(&self) -> Vec<u8> {
        let samples: Vec<Sample> = self.records.iter().map(|(s, _)| s.clone()).collect();
        let mut out = Vec::with_capacity(MAGIC.len() + 32 + self.bytes as usize);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.first_seq.to_be_bytes());
        out.extend_from_slice(&self.failed_len.to_be_bytes());
        out.extend_from_slice(&self.failed_refused.to_be_bytes());
        out.extend_from_slice(&self.dropped.to_be_bytes());
        out.extend_from_slice(&encode_samples(&samples));
        out
    }

    /// [`spill_bytes`] of these records.
    pub fn spill(&self, dir: &Path) -> std::io::Result<PathBuf> {
        spill_bytes(dir, &self.encode())
    }
}

/// Writes `bytes` (from [`Held::encode`]) as the spill file into `dir` (synced, then renamed
/// into place) after checking that [`HEADROOM_BYTES`] more fit. On error nothing is left
/// behind.
pub fn spill_bytes(dir: &Path, bytes: &[u8]) -> std::io::Result<PathBuf> {
    let tmp = dir.join(format!("{SPILL_FILE}.tmp"));
    let scratch = dir.join(format!("{SPILL_FILE}.headroom"));
    let r = (|| {
        write_synced(&tmp, bytes)?;
        write_synced(&scratch, &vec![0u8; HEADROOM_BYTES])?;
        std::fs::remove_file(&scratch)?;
        let path = dir.join(SPILL_FILE);
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&scratch);
    }
    r
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Why a spill file could not be imported.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// Reading or removing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a spill file or is damaged; it was renamed to `kept_as`.
    #[error("{path}: {reason}; kept as {kept_as}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
        /// Where it is now.
        kept_as: String,
    },
    /// The outbox refused the records (the file stays for the next start).
    #[error("{path}: importing into the outbox: {source}")]
    Store {
        /// The file.
        path: String,
        /// The error.
        source: StoreError,
    },
}

/// What [`import`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Imported {
    /// Records appended to the outbox.
    pub records: u64,
    /// Records of the failed group found on disk already (not appended again).
    pub already_stored: u64,
    /// Records numbered as a lost run (held records dropped while the store could not write).
    pub lost: u64,
}

/// Imports the spill file in `dir`, if there is one, into `store`, then removes it.
pub async fn import(store: &mut AgentStore, dir: &Path) -> Result<Option<Imported>, ImportError> {
    let path = dir.join(SPILL_FILE);
    let display = path.display().to_string();
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ImportError::Io {
                path: display,
                source,
            });
        }
    };
    let (first_seq, failed_len, failed_refused, dropped, mut records) = match decode(&bytes) {
        Ok(v) => v,
        Err(reason) => {
            let kept = dir.join(format!("{SPILL_FILE}.corrupt"));
            std::fs::rename(&path, &kept).map_err(|source| ImportError::Io {
                path: display.clone(),
                source,
            })?;
            return Err(ImportError::Corrupt {
                path: display,
                reason,
                kept_as: kept.display().to_string(),
            });
        }
    };
    let total = records.len() as u64 + dropped + failed_refused;
    let next = store.next_seq();
    let mut out = Imported::default();
    if next >= first_seq + total && total > 0 {
        // Imported before (the run that imported it stopped before removing the file).
    } else {
        // The failed group's write may have reached the disk after all (a commit is atomic:
        // all of it or nothing). The records held were the failed group's and the later ones,
        // minus the `dropped` oldest.
        let failed_end = first_seq + failed_len + failed_refused;
        let on_disk = failed_len + failed_refused > 0 && next == failed_end;
        if !on_disk && next != first_seq {
            tracing::warn!(
                next,
                first_seq,
                "held records were numbered from {first_seq}, the outbox continues at {next}"
            );
        }
        let (skip, dropped) = if on_disk {
            (
                failed_len.saturating_sub(dropped),
                dropped.saturating_sub(failed_len),
            )
        } else {
            (0, dropped + failed_refused)
        };
        records.drain(
            ..usize::try_from(skip)
                .unwrap_or(usize::MAX)
                .min(records.len()),
        );
        out.already_stored = if on_disk { failed_len } else { 0 };
        out.records = records.len() as u64;
        out.lost = dropped;
        // Dropped records first: they are older than the kept ones.
        if dropped > 0 {
            store
                .append_with(std::iter::empty(), &[], dropped, Some(true))
                .await
                .map_err(|source| ImportError::Store {
                    path: display.clone(),
                    source,
                })?;
        }
        store
            .append_with(&records, &[], 0, Some(true))
            .await
            .map_err(|source| ImportError::Store {
                path: display.clone(),
                source,
            })?;
        store.sync().await.map_err(|source| ImportError::Store {
            path: display.clone(),
            source,
        })?;
    }
    std::fs::remove_file(&path).map_err(|source| ImportError::Io {
        path: display,
        source,
    })?;
    Ok(Some(out))
}

#[allow(clippy::type_complexity)] // the file's fields, as named at the call
fn decode(bytes: &[u8]) -> Result<(u64, u64, u64, u64, Vec<Sample>), String> {
    let rest = bytes
        .strip_prefix(MAGIC.as_slice())
        .ok_or("not a held-records file (bad magic)")?;
    if rest.len() < 32 {
        return Err(format!("truncated header ({} bytes)", bytes.len()));
    }
    let u = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&rest[i * 8..i * 8 + 8]);
        u64::from_be_bytes(b)
    };
    let (first_seq, failed_len, failed_refused, dropped) = (u(0), u(1), u(2), u(3));
    if first_seq == 0 {
        return Err("first sequence number 0".into());
    }
    let records = decode_samples(&rest[32..]).map_err(|e| format!("records: {e}"))?;
    Ok((first_seq, failed_len, failed_refused, dropped, records))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use edgesync_protocol::{DeviceId, PropertyId, Quality, Timestamp, Value};

    use super::*;
    use crate::store::Fsync;

    fn sample(i: u64) -> Sample {
        Sample {
            device: DeviceId::new("plc1").unwrap(),
            property: PropertyId::new(format!("p{}", i % 7)).unwrap(),
            value: Some(Value::UInt(i)),
            quality: Quality::Good,
            ts: Timestamp(1_700_000_000_000 + i),
        }
    }

    fn samples(r: std::ops::Range<u64>) -> Vec<Sample> {
        r.map(sample).collect()
    }

    fn open(dir: &Path) -> AgentStore {
        AgentStore::open(
            &dir.join("agent.sled"),
            1 << 20,
            u64::MAX,
            Fsync::EveryCommit,
        )
        .unwrap()
    }

    /// Every record of the outbox (which holds no lost run).
    fn outbox(st: &mut AgentStore) -> Vec<Sample> {
        let n = st.next_seq() - 1;
        st.read(1, n as usize).unwrap()
    }

    #[tokio::test]
    async fn held_records_get_the_numbers_they_would_have_had() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = open(dir.path());
        st.append(samples(1..11), &[]).await.unwrap();
        // The commit of 11..=15 failed; 16..=20 came while the store could not write.
        let mut h = Held::new(st.next_seq(), &samples(11..16), 0, "disk full".into());
        h.extend(samples(16..21));
        h.spill(dir.path()).unwrap();
        assert!(!dir.path().join(format!("{SPILL_FILE}.tmp")).exists());
        assert!(!dir.path().join(format!("{SPILL_FILE}.headroom")).exists());
        drop(st);
        let mut st = open(dir.path());
        let got = import(&mut st, dir.path()).await.unwrap().unwrap();
        assert_eq!(
            got,
            Imported {
                records: 10,
                already_stored: 0,
                lost: 0
            }
        );
        assert_eq!(outbox(&mut st), samples(1..21));
        assert!(st.resync_pending());
        // The file is gone: a second start imports nothing.
        assert!(!dir.path().join(SPILL_FILE).exists());
        assert_eq!(import(&mut st, dir.path()).await.unwrap(), None);
        assert_eq!(st.next_seq(), 21);
    }

    #[tokio::test]
    async fn a_failed_group_that_reached_the_disk_is_not_imported_twice() {
        // What a real disk cannot be made to do on demand: the commit reported an error, but
        // its write was on disk after all.
        let dir = tempfile::tempdir().unwrap();
        let mut st = open(dir.path());
        st.append(samples(1..11), &[]).await.unwrap();
        let mut h = Held::new(st.next_seq(), &samples(11..16), 0, "I/O error".into());
        st.append(samples(11..16), &[]).await.unwrap();
        h.extend(samples(16..21));
        h.spill(dir.path()).unwrap();
        drop(st);
        let mut st = open(dir.path());
        let got = import(&mut st, dir.path()).await.unwrap().unwrap();
        assert_eq!(got.records, 5);
        assert_eq!(got.already_stored, 5);
        assert_eq!(outbox(&mut st), samples(1..21));
    }

    #[tokio::test]
    async fn a_spill_file_imported_before_is_only_removed() {
        // The run that imported it stopped before removing it.
        let dir = tempfile::tempdir().unwrap();
        let mut st = open(dir.path());
        let h = Held::new(1, &samples(1..6), 0, "disk full".into());
        h.spill(dir.path()).unwrap();
        st.append(samples(1..6), &[]).await.unwrap();
        let got = import(&mut st, dir.path()).await.unwrap().unwrap();
        assert_eq!(got, Imported::default());
        assert_eq!(st.next_seq(), 6);
        assert!(!dir.path().join(SPILL_FILE).exists());
    }

    #[tokio::test]
    async fn held_records_beyond_the_bound_become_a_lost_run() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = open(dir.path());
        let mut h = Held::new(1, &samples(1..2), 0, "disk full".into());
        let mut i = 2;
        while h.dropped == 0 {
            h.extend(samples(i..i + 1000));
            i += 1000;
        }
        assert!(h.bytes <= HELD_MAX_BYTES);
        let (kept, dropped) = (h.records.len() as u64, h.dropped);
        assert_eq!(kept + dropped, i - 1);
        h.spill(dir.path()).unwrap();
        let got = import(&mut st, dir.path()).await.unwrap().unwrap();
        assert_eq!((got.records, got.lost), (kept, dropped));
        // The dropped ones are a lost run before the kept ones, which keep their numbers.
        assert_eq!(st.next_seq(), i);
        assert_eq!(
            st.read(dropped + 1, kept as usize).unwrap(),
            samples(dropped + 1..i)
        );
        assert!(st.resync_pending());
    }

    #[tokio::test]
    async fn refused_records_of_the_failed_group_stay_a_lost_run_exactly_once() {
        for on_disk in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut st = open(dir.path());
            st.append(samples(1..4), &[]).await.unwrap();
            // The failed group: 4..=5, then a lost run of 3 refused records (6..=8).
            let mut h = Held::new(4, &samples(4..6), 3, "disk full".into());
            if on_disk {
                st.append_with(&samples(4..6), &[], 3, None).await.unwrap();
            }
            h.extend(samples(9..12));
            h.spill(dir.path()).unwrap();
            let got = import(&mut st, dir.path()).await.unwrap().unwrap();
            assert_eq!(got.lost, if on_disk { 0 } else { 3 }, "on disk: {on_disk}");
            assert_eq!(got.already_stored, if on_disk { 2 } else { 0 });
            // Numbered the same either way: 3 lost, and 9..=11 at the end.
            assert_eq!(st.next_seq(), 12, "on disk: {on_disk}");
            assert_eq!(st.read(9, 3).unwrap(), samples(9..12));
            if on_disk {
                assert_eq!(st.read(4, 2).unwrap(), samples(4..6));
            }
        }
    }

    #[tokio::test]
    async fn a_damaged_spill_file_is_kept_aside_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = open(dir.path());
        let h = Held::new(1, &samples(1..6), 0, "disk full".into());
        h.spill(dir.path()).unwrap();
        let path = dir.path().join(SPILL_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, &bytes).unwrap();
        let err = import(&mut st, dir.path()).await.unwrap_err().to_string();
        assert!(err.contains(SPILL_FILE) && err.contains("records"), "{err}");
        assert!(dir.path().join(format!("{SPILL_FILE}.corrupt")).exists());
        assert_eq!(st.next_seq(), 1);
        std::fs::write(&path, b"hello").unwrap();
        let err = import(&mut st, dir.path()).await.unwrap_err().to_string();
        assert!(err.contains("bad magic"), "{err}");
    }
}
