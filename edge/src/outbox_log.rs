//! The outbox's own log: append-only segment files holding the records the hub has not yet
//! acknowledged (the rest of the agent's state stays in sled, see [`crate::store`]).
//!
//! Why not sled: every sled batch seals a write buffer that sled's IO threads then write and
//! `sync_file_range` one at a time (wake-ups on several threads per commit), and sled's page
//! cache grows with every record written during a backlog. Here a commit is one `pwrite` into a
//! file whose blocks already exist and one `fdatasync` on the flusher thread.
//!
//! Layout: files `seg-{id:016x}` in the log directory, ids increasing. A segment is filled with
//! zeros to its full size when it is created (and synced, with the directory), so a commit
//! only overwrites blocks the file already has: its `fdatasync` writes data, not a new file
//! length or extent. An entry is a 48-byte header, little endian, then its payload:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `EOB1` |
//! | 4 | kind: 1 group of records, 2 lost run, 3 mark |
//! | 5 | flags: bit 0, a resync is owed |
//! | 6..8 | zero |
//! | 8..16 | the segment's id (an entry copied into another file is not valid there) |
//! | 16..24 | first sequence number |
//! | 24..32 | records covered (0 for a mark) |
//! | 32..40 | highest sequence number acknowledged when the entry was written |
//! | 40..44 | payload length |
//! | 44..48 | CRC-32 of bytes 0..44 and the payload |
//!
//! Invariants:
//! - entries are written in the order of their sequence numbers, each right after the
//!   previous one; a segment ends at its first all-zero header;
//! - the state the log describes is its last entry's (flags) and the highest `acked` of all
//!   entries: an acknowledgement and the resync flag become durable with the next entry;
//! - a segment is deleted only once an entry that acknowledges all its records is durable,
//!   and the segment holding the last entry is never deleted;
//! - on open, a damaged entry at the end of the last segment is a torn write: it and what
//!   follows are zeroed. A damaged entry anywhere else ends that segment's readable part,
//!   and the numbers missing before the next readable entry come back as a lost run.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: [u8; 4] = *b"EOB1";
/// Header size in bytes.
pub const HEADER: usize = 48;
const FLAG_RESYNC: u8 = 1;
/// Zeros written per call when a segment is created.
const ZERO_CHUNK: usize = 64 * 1024;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Records `first .. first+count`, the payload their compact protobuf encoding.
    Group,
    /// Records `first .. first+count` lost (refused by a full outbox): no payload.
    Lost,
    /// No records: carries only `acked` and the flags (`first` is the next number then).
    Mark,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Group => 1,
            Kind::Lost => 2,
            Kind::Mark => 3,
        }
    }

    fn from_code(c: u8) -> Option<Kind> {
        match c {
            1 => Some(Kind::Group),
            2 => Some(Kind::Lost),
            3 => Some(Kind::Mark),
            _ => None,
        }
    }
}

/// Errors of the log, naming the file (and the offset, for damage).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// An entry that should be there does not check out.
    #[error("{path} at byte {offset}: {reason}")]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Where the entry starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

/// Maps an I/O error on `path` to [`LogError::Io`].
pub fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_owned(),
        source,
    }
}

/// An entry to write.
#[derive(Debug, Clone, Copy)]
pub struct EntryOut<'a> {
    /// What it is.
    pub kind: Kind,
    /// First sequence number.
    pub first: u64,
    /// Records covered.
    pub count: u64,
    /// Records (for [`Kind::Group`]).
    pub payload: &'a [u8],
}

/// Where a written entry lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    /// Segment id.
    pub segment: u64,
    /// Offset of the entry's header.
    pub offset: u64,
    /// Payload length.
    pub len: u32,
}

/// An entry found when the log was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// What it is.
    pub kind: Kind,
    /// First sequence number.
    pub first: u64,
    /// Records covered.
    pub count: u64,
    /// Highest acknowledged number when it was written.
    pub acked: u64,
    /// Whether a resync was owed after it.
    pub resync: bool,
    /// Where it lies.
    pub loc: Loc,
}

/// Damage found when the log was opened (logged by the caller; nothing here is fatal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The segment file.
    pub path: PathBuf,
    /// Where the damaged entry starts.
    pub offset: u64,
    /// What is wrong.
    pub reason: String,
    /// At the end of the last segment (a write cut short by a crash): zeroed.
    pub torn_tail: bool,
}

struct Header {
    kind: Kind,
    flags: u8,
    segment: u64,
    first: u64,
    count: u64,
    acked: u64,
    len: u32,
    crc: u32,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn crc(header: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&header[..44]);
    h.update(payload);
    h.finalize()
}

/// Appends an entry (header and payload) to `buf`.
fn encode(buf: &mut Vec<u8>, segment: u64, e: &EntryOut<'_>, acked: u64, resync: bool) {
    let start = buf.len();
    buf.extend_from_slice(&MAGIC);
    buf.push(e.kind.code());
    buf.push(if resync { FLAG_RESYNC } else { 0 });
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&segment.to_le_bytes());
    buf.extend_from_slice(&e.first.to_le_bytes());
    buf.extend_from_slice(&e.count.to_le_bytes());
    buf.extend_from_slice(&acked.to_le_bytes());
    let len = u32::try_from(e.payload.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_le_bytes());
    let c = crc(&buf[start..], e.payload);
    buf.extend_from_slice(&c.to_le_bytes());
    buf.extend_from_slice(e.payload);
}

/// Parses the header at the start of `b` (at least [`HEADER`] bytes). `Ok(None)`: all zero
/// (the end of the segment's entries).
fn parse_header(b: &[u8]) -> Result<Option<Header>, String> {
    let h = &b[..HEADER];
    if h.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    if h[..4] != MAGIC {
        return Err("not an entry header (bad magic)".into());
    }
    let kind = Kind::from_code(h[4]).ok_or_else(|| format!("unknown entry kind {}", h[4]))?;
    Ok(Some(Header {
        kind,
        flags: h[5],
        segment: u64_at(h, 8),
        first: u64_at(h, 16),
        count: u64_at(h, 24),
        acked: u64_at(h, 32),
        len: u32_at(h, 40),
        crc: u32_at(h, 44),
    }))
}

fn segment_name(id: u64) -> String {
    format!("seg-{id:016x}")
}

fn segment_id(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("seg-")?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

/// `fsync` of a directory (its entries: files created, renamed).
pub fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

struct Active {
    id: u64,
    file: Arc<File>,
    size: u64,
    /// Where the next entry goes.
    offset: u64,
}

/// What a sealed segment holds.
#[derive(Debug, Clone, Copy, Default)]
struct Sealed {
    /// One past the highest record number in it (0: none).
    end: u64,
}

/// A segment being made ahead of need.
struct Spare {
    id: u64,
    size: u64,
    thread: std::thread::JoinHandle<Result<File, LogError>>,
}

/// The segment files of one outbox.
pub struct Log {
    dir: PathBuf,
    segment_bytes: u64,
    /// Every segment but the active one.
    sealed: BTreeMap<u64, Sealed>,
    /// One past the highest record number in the active segment.
    active_end: u64,
    /// The segment holding the last entry: never deleted (the log's state is that entry's).
    last_entry: Option<u64>,
    active: Option<Active>,
    /// The last sealed segment read from (reads of a backlog go through segments in order).
    reader: Option<(u64, File)>,
    /// The next segment, being made ahead.
    spare: Option<Spare>,
    buf: Vec<u8>,
}

impl Drop for Log {
    fn drop(&mut self) {
        // Not left running after the store closed (it may be deleted right after).
        if let Some(sp) = self.spare.take() {
            let _ = sp.thread.join();
        }
    }
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.dir)
            .field("sealed", &self.sealed.len())
            .field("active", &self.active.as_ref().map(|a| (a.id, a.offset)))
            .finish()
    }
}

impl Log {
    /// Opens the log in `dir` (created if missing), reading every entry. Segments of
    /// `segment_bytes` (a larger entry gets a segment of its own size).
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
    ) -> Result<(Log, Vec<Found>, Vec<Damage>), LogError> {
        let created = !dir.exists();
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        if created && let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        let mut ids = vec![];
        for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let e = e.map_err(io_err(dir))?;
            if let Some(id) = e.file_name().to_str().and_then(segment_id) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let mut log = Log {
            dir: dir.to_owned(),
            segment_bytes,
            sealed: BTreeMap::new(),
            active_end: 0,
            last_entry: None,
            active: None,
            reader: None,
            spare: None,
            buf: vec![],
        };
        let mut found = vec![];
        let mut damage = vec![];
        for (i, &id) in ids.iter().enumerate() {
            let last = i + 1 == ids.len();
            let path = dir.join(segment_name(id));
            let bytes = std::fs::read(&path).map_err(io_err(&path))?;
            let mut offset = 0usize;
            let mut end = 0u64;
            let mut bad = None;
            while offset + HEADER <= bytes.len() {
                let h = match parse_header(&bytes[offset..]) {
                    Ok(Some(h)) => h,
                    Ok(None) => break,
                    Err(reason) => {
                        bad = Some(reason);
                        break;
                    }
                };
                let body = offset + HEADER;
                let Some(payload) = body
                    .checked_add(h.len as usize)
                    .and_then(|end| bytes.get(body..end))
                else {
                    bad = Some(format!(
                        "entry runs past the end of the file ({} bytes)",
                        h.len
                    ));
                    break;
                };
                if h.crc != crc(&bytes[offset..offset + HEADER], payload) {
                    bad = Some("checksum mismatch".into());
                    break;
                }
                if h.segment != id {
                    bad = Some(format!("entry of segment {} in segment {id}", h.segment));
                    break;
                }
                if h.kind != Kind::Mark {
                    end = end.max(h.first.saturating_add(h.count));
                }
                log.last_entry = Some(id);
                found.push(Found {
                    kind: h.kind,
                    first: h.first,
                    count: h.count,
                    acked: h.acked,
                    resync: h.flags & FLAG_RESYNC != 0,
                    loc: Loc {
                        segment: id,
                        offset: offset as u64,
                        len: h.len,
                    },
                });
                offset = body + payload.len();
            }
            if let Some(reason) = bad {
                damage.push(Damage {
                    path: path.clone(),
                    offset: offset as u64,
                    reason,
                    torn_tail: last,
                });
            }
            if last {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                let size = bytes.len() as u64;
                if damage.last().is_some_and(|d| d.torn_tail) {
                    // A write cut short: zero it, so nothing of it can be read as an entry
                    // once new entries are written over its start.
                    zero(&file, offset as u64, size, &path)?;
                    file.sync_data().map_err(io_err(&path))?;
                }
                log.active_end = end;
                log.active = Some(Active {
                    id,
                    file: Arc::new(file),
                    size,
                    offset: offset as u64,
                });
            } else {
                log.sealed.insert(id, Sealed { end });
            }
        }
        Ok((log, found, damage))
    }

    /// The directory the log is in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `entries` one after the other (to the OS, not synced), each with `acked` and
    /// the resync flag. Returns where each went and the file to sync for them.
    pub fn append(
        &mut self,
        entries: &[EntryOut<'_>],
        acked: u64,
        resync: bool,
    ) -> Result<(Vec<Loc>, Arc<File>), LogError> {
        let total: u64 = entries
            .iter()
            .map(|e| (HEADER + e.payload.len()) as u64)
            .sum();
        let fits = self
            .active
            .as_ref()
            .is_some_and(|a| a.offset + total <= a.size);
        if !fits {
            self.rotate(total)?;
        }
        let Some(active) = self.active.as_mut() else {
            return Err(LogError::Io {
                path: self.dir.clone(),
                source: io::Error::other("no active segment"),
            });
        };
        self.buf.clear();
        let mut locs = Vec::with_capacity(entries.len());
        for e in entries {
            locs.push(Loc {
                segment: active.id,
                offset: active.offset + self.buf.len() as u64,
                len: e.payload.len() as u32,
            });
            encode(&mut self.buf, active.id, e, acked, resync);
        }
        let path = self.dir.join(segment_name(active.id));
        active
            .file
            .write_all_at(&self.buf, active.offset)
            .map_err(io_err(&path))?;
        active.offset += self.buf.len() as u64;
        self.last_entry = Some(active.id);
        for e in entries {
            if e.kind != Kind::Mark {
                self.active_end = self.active_end.max(e.first + e.count);
            }
        }
        let file = active.file.clone();
        if self.buf.capacity() > 4 * self.segment_bytes as usize {
            // A huge group passed through: do not keep its buffer.
            self.buf = vec![];
        }
        self.prepare_spare();
        Ok((locs, file))
    }

    /// Seals the active segment and starts a new one with room for at least `need` bytes:
    /// created, zero-filled and synced with the directory before any entry goes in.
    fn rotate(&mut self, need: u64) -> Result<(), LogError> {
        let id = self
            .active
            .as_ref()
            .map(|a| a.id + 1)
            .or_else(|| self.sealed.keys().next_back().map(|k| k + 1))
            .unwrap_or(1);
        let size = self.segment_bytes.max(need);
        let spare = match self.spare.take() {
            Some(sp) => {
                let made = sp.thread.join().unwrap_or_else(|_| {
                    Err(LogError::Io {
                        path: self.dir.clone(),
                        source: io::Error::other("the thread making a segment panicked"),
                    })
                });
                match made {
                    Ok(f) if sp.id == id && sp.size >= size => Some(f),
                    Ok(_) => {
                        // Too small for this entry: made again below, to its size.
                        let _ = std::fs::remove_file(self.dir.join(segment_name(sp.id)));
                        None
                    }
                    // Tried again below (and reported if it fails again).
                    Err(_) => None,
                }
            }
            None => None,
        };
        let file = match spare {
            Some(f) => f,
            None => make_segment(&self.dir, id, size)?,
        };
        if let Some(old) = self.active.take() {
            self.sealed.insert(
                old.id,
                Sealed {
                    end: self.active_end,
                },
            );
        }
        self.active_end = 0;
        self.active = Some(Active {
            id,
            file: Arc::new(file),
            size,
            offset: 0,
        });
        Ok(())
    }

    /// Once the active segment is half full, starts making the next one on a thread of its
    /// own, so that filling it with zeros and syncing it does not hold up a commit.
    fn prepare_spare(&mut self) {
        let Some(a) = self.active.as_ref() else {
            return;
        };
        if self.spare.is_some() || a.offset * 2 < a.size {
            return;
        }
        let (dir, id, size) = (self.dir.clone(), a.id + 1, self.segment_bytes);
        // Without the thread the segment is made when it is needed.
        if let Ok(thread) = std::thread::Builder::new()
            .name("outbox-segment".into())
            .spawn(move || make_segment(&dir, id, size))
        {
            self.spare = Some(Spare { id, size, thread });
        }
    }

    /// Waits for a segment being made ahead and deletes it (before the directory moves).
    pub fn discard_spare(&mut self) {
        if let Some(sp) = self.spare.take()
            && let Ok(Ok(_)) = sp.thread.join()
        {
            let _ = std::fs::remove_file(self.dir.join(segment_name(sp.id)));
        }
    }

    /// The payload of the entry at `loc`, checked against its header (`first`, `count`).
    pub fn read(&mut self, loc: Loc, first: u64, count: u64) -> Result<Vec<u8>, LogError> {
        let path = self.dir.join(segment_name(loc.segment));
        let mut b = vec![0u8; HEADER + loc.len as usize];
        match self.active.as_ref().filter(|a| a.id == loc.segment) {
            Some(a) => a.file.read_exact_at(&mut b, loc.offset),
            None => {
                if self
                    .reader
                    .as_ref()
                    .is_none_or(|(id, _)| *id != loc.segment)
                {
                    let f = File::open(&path).map_err(io_err(&path))?;
                    self.reader = Some((loc.segment, f));
                }
                match self.reader.as_ref() {
                    Some((_, f)) => f.read_exact_at(&mut b, loc.offset),
                    None => Ok(()),
                }
            }
        }
        .map_err(io_err(&path))?;
        let corrupt = |reason: String| LogError::Corrupt {
            path: path.clone(),
            offset: loc.offset,
            reason,
        };
        let h = parse_header(&b)
            .map_err(&corrupt)?
            .ok_or_else(|| corrupt("no entry here".into()))?;
        if h.crc != crc(&b[..HEADER], &b[HEADER..]) {
            return Err(corrupt("checksum mismatch".into()));
        }
        if (h.segment, h.first, h.count, h.len) != (loc.segment, first, count, loc.len) {
            return Err(corrupt(format!(
                "holds records {}+{} of segment {}, expected {first}+{count}",
                h.first, h.count, h.segment
            )));
        }
        b.drain(..HEADER);
        Ok(b)
    }

    /// Deletes the sealed segments all of whose records are at or below `acked` (which must
    /// be durable). Returns how many.
    pub fn delete_through(&mut self, acked: u64) -> Result<usize, LogError> {
        let done: Vec<u64> = self
            .sealed
            .iter()
            .filter(|(id, s)| s.end <= acked + 1 && self.last_entry != Some(**id))
            .map(|(id, _)| *id)
            .collect();
        for id in &done {
            let path = self.dir.join(segment_name(*id));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
            self.sealed.remove(id);
            if self.reader.as_ref().is_some_and(|(r, _)| r == id) {
                self.reader = None;
            }
        }
        Ok(done.len())
    }

    /// Whether [`delete_through`](Self::delete_through) with `acked` would delete anything.
    pub fn has_deletable(&self, acked: u64) -> bool {
        self.sealed
            .iter()
            .any(|(id, s)| s.end <= acked + 1 && self.last_entry != Some(*id))
    }

    /// The segment new entries go to, if there is one yet.
    pub fn active_file(&self) -> Option<Arc<File>> {
        self.active.as_ref().map(|a| a.file.clone())
    }

    /// The size of a new segment.
    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    /// The log's directory was renamed to `dir` (its files stay open).
    pub fn moved_to(&mut self, dir: &Path) {
        dir.clone_into(&mut self.dir);
        self.reader = None;
    }

    /// Segment files on disk (sealed and active).
    pub fn segments(&self) -> usize {
        self.sealed.len() + usize::from(self.active.is_some())
    }
}

/// Creates segment `id` of `size` bytes in `dir`: zero-filled, synced with the directory. On
/// failure (most likely a full disk) no half-made file is left.
fn make_segment(dir: &Path, id: u64, size: u64) -> Result<File, LogError> {
    let path = dir.join(segment_name(id));
    let made = (|| {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        zero(&file, 0, size, &path)?;
        file.sync_data().map_err(io_err(&path))?;
        sync_dir(dir)?;
        Ok(file)
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    made
}

/// Writes zeros to `file` from `from` to `to`.
fn zero(file: &File, from: u64, to: u64, path: &Path) -> Result<(), LogError> {
    let zeros = vec![0u8; ZERO_CHUNK];
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZERO_CHUNK as u64) as usize;
        file.write_all_at(&zeros[..n], at).map_err(io_err(path))?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn group(first: u64, count: u64, payload: &[u8]) -> EntryOut<'_> {
        EntryOut {
            kind: Kind::Group,
            first,
            count,
            payload,
        }
    }

    #[test]
    fn entries_survive_reopen_and_rotate_into_new_segments() {
        let d = tmp();
        let dir = d.path().join("log");
        let payload = vec![7u8; 300];
        let mut locs = vec![];
        {
            let (mut log, found, damage) = Log::open(&dir, 1024).unwrap();
            assert!(found.is_empty() && damage.is_empty());
            for i in 0..10u64 {
                let (l, _) = log
                    .append(&[group(i * 3 + 1, 3, &payload)], i, i == 9)
                    .unwrap();
                locs.push(l[0]);
            }
            // 348 bytes per entry, two per 1 KiB segment.
            assert_eq!(log.segments(), 5);
            assert_eq!(log.read(locs[4], 13, 3).unwrap(), payload);
            assert!(matches!(
                log.read(locs[4], 14, 3),
                Err(LogError::Corrupt { .. })
            ));
        }
        let (mut log, found, damage) = Log::open(&dir, 1024).unwrap();
        assert!(damage.is_empty(), "{damage:?}");
        assert_eq!(found.len(), 10);
        assert_eq!(found[9].first, 28);
        assert_eq!(found[9].acked, 9);
        assert!(found[9].resync && !found[8].resync);
        assert_eq!(found.iter().map(|f| f.loc).collect::<Vec<_>>(), locs);
        assert_eq!(log.read(locs[0], 1, 3).unwrap(), payload);
        // The sixth segment was made ahead (empty) once the fifth was half full: it is the
        // active one now.
        assert_eq!(log.segments(), 6);
        // Records through 12 acknowledged: the two segments holding 1..=12 go.
        assert_eq!(log.delete_through(12).unwrap(), 2);
        assert_eq!(log.segments(), 4);
        assert!(log.read(locs[0], 1, 3).is_err());
        // The segment holding the last entry stays even when all of it is acknowledged.
        assert_eq!(log.delete_through(1000).unwrap(), 2);
        assert_eq!(log.segments(), 2);
        assert_eq!(log.read(locs[9], 28, 3).unwrap(), payload);
    }

    #[test]
    fn a_torn_tail_is_zeroed_and_written_over() {
        let d = tmp();
        let dir = d.path().join("log");
        let (mut log, _, _) = Log::open(&dir, 4096).unwrap();
        let (l1, _) = log.append(&[group(1, 2, b"first")], 0, false).unwrap();
        let (l2, _) = log.append(&[group(3, 2, &[9u8; 200])], 0, false).unwrap();
        drop(log);
        // A crash cut the second entry's payload short.
        let path = dir.join(segment_name(l2[0].segment));
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0u8; 100], l2[0].offset + HEADER as u64 + 100)
            .unwrap();
        drop(f);
        let (mut log, found, damage) = Log::open(&dir, 4096).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].loc, l1[0]);
        assert_eq!(damage.len(), 1);
        assert!(damage[0].torn_tail);
        assert_eq!(damage[0].offset, l2[0].offset);
        assert_eq!(damage[0].reason, "checksum mismatch");
        // A shorter entry goes where the torn one began; nothing of the torn one is read back.
        let (l3, _) = log.append(&[group(3, 1, b"x")], 0, false).unwrap();
        assert_eq!(l3[0].offset, l2[0].offset);
        drop(log);
        let (_, found, damage) = Log::open(&dir, 4096).unwrap();
        assert!(damage.is_empty(), "{damage:?}");
        assert_eq!(
            found.iter().map(|f| (f.first, f.count)).collect::<Vec<_>>(),
            vec![(1, 2), (3, 1)]
        );
    }

    #[test]
    fn damage_in_a_sealed_segment_is_reported_with_file_and_offset() {
        let d = tmp();
        let dir = d.path().join("log");
        let (mut log, _, _) = Log::open(&dir, 512).unwrap();
        let p = vec![1u8; 300];
        let (a, _) = log.append(&[group(1, 1, &p)], 0, false).unwrap();
        log.append(&[group(2, 1, &p)], 0, false).unwrap();
        drop(log);
        let path = dir.join(segment_name(a[0].segment));
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"JUNK", 0).unwrap();
        drop(f);
        let (_, found, damage) = Log::open(&dir, 512).unwrap();
        assert_eq!(found.len(), 1, "the later segment is still read");
        assert_eq!(found[0].first, 2);
        assert_eq!(damage.len(), 1);
        assert_eq!((damage[0].path.clone(), damage[0].offset), (path, 0));
        assert!(!damage[0].torn_tail);
        assert!(
            damage[0].reason.contains("bad magic"),
            "{}",
            damage[0].reason
        );
    }

    #[test]
    fn an_entry_larger_than_a_segment_gets_a_segment_of_its_size() {
        let d = tmp();
        let dir = d.path().join("log");
        let (mut log, _, _) = Log::open(&dir, 256).unwrap();
        let big = vec![3u8; 5000];
        let (l, _) = log.append(&[group(1, 100, &big)], 0, false).unwrap();
        drop(log);
        let (mut log, found, damage) = Log::open(&dir, 256).unwrap();
        assert!(damage.is_empty());
        assert_eq!(found.len(), 1);
        assert_eq!(log.read(l[0], 1, 100).unwrap(), big);
    }

    /// A crash right after a new segment was created leaves it empty: the segment before it
    /// holds the last entry, and it is never deleted, however much is acknowledged.
    #[test]
    fn the_segment_holding_the_last_entry_is_never_deleted() {
        let d = tmp();
        let dir = d.path().join("log");
        let (mut log, _, _) = Log::open(&dir, 4096).unwrap();
        let mark = EntryOut {
            kind: Kind::Mark,
            first: 11,
            count: 0,
            payload: &[],
        };
        log.append(&[group(1, 10, b"g"), mark], 10, true).unwrap();
        drop(log);
        // The next segment, created (zero-filled) but never written to.
        let f = File::create(dir.join(segment_name(2))).unwrap();
        zero(&f, 0, 4096, &dir).unwrap();
        drop(f);
        let (mut log, found, damage) = Log::open(&dir, 4096).unwrap();
        assert!(damage.is_empty());
        assert_eq!(found.len(), 2);
        assert!(!log.has_deletable(1000));
        assert_eq!(log.delete_through(1000).unwrap(), 0);
        drop(log);
        let (_, found, _) = Log::open(&dir, 4096).unwrap();
        assert_eq!(
            (found[1].kind, found[1].first, found[1].acked),
            (Kind::Mark, 11, 10)
        );
    }

    #[test]
    fn a_copied_segment_is_not_read_as_another() {
        let d = tmp();
        let dir = d.path().join("log");
        let (mut log, _, _) = Log::open(&dir, 4096).unwrap();
        log.append(&[group(1, 1, b"a")], 0, false).unwrap();
        drop(log);
        std::fs::copy(dir.join(segment_name(1)), dir.join(segment_name(2))).unwrap();
        let (_, found, damage) = Log::open(&dir, 4096).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(damage.len(), 1);
        assert!(damage[0].reason.contains("entry of segment 1 in segment 2"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Whatever a segment holds (a valid log with bytes overwritten, or noise), opening
        /// never panics, and every entry it reports reads back.
        #[test]
        fn any_segment_content_opens_without_panic(
            edits in proptest::collection::vec((0usize..2048, proptest::num::u8::ANY), 0..24),
            noise in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
        ) {
            let d = tmp();
            let dir = d.path().join("log");
            let (mut log, _, _) = Log::open(&dir, 2048).unwrap();
            for i in 0..8u64 {
                log.append(&[group(i * 2 + 1, 2, &[i as u8; 90])], i, false).unwrap();
            }
            drop(log);
            let path = dir.join(segment_name(1));
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            for (at, b) in edits {
                f.write_all_at(&[b], at as u64).unwrap();
            }
            f.write_all_at(&noise, 2048 - noise.len() as u64).unwrap();
            drop(f);
            std::fs::write(dir.join(segment_name(2)), &noise).unwrap();
            let (mut log, found, _) = Log::open(&dir, 2048).unwrap();
            for e in found {
                if e.kind == Kind::Group {
                    log.read(e.loc, e.first, e.count).unwrap();
                }
            }
            // And it takes new entries.
            log.append(&[group(100, 1, b"z")], 99, false).unwrap();
        }
    }
}
