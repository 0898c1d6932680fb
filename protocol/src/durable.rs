//! Power-loss durability for a sled 0.34 store directory (feature `durable`; the one module of
//! this crate that does I/O, shared by the agent's outbox and the hub's store).
//!
//! sled's `Db::flush` writes its log with `pwrite` and then calls `sync_file_range`, which
//! starts and waits for the write-back of those pages but neither flushes the drive's write
//! cache nor persists the file's metadata (its new length, the extents that hold the new data).
//! Values larger than a quarter of a segment go to files under `blobs/`, written with no sync at
//! all. After a crash of the process everything is in the page cache and survives; after a
//! power cut or an OS crash, an acknowledged record may be gone.
//!
//! [`DirSync::sync`], called after `Db::flush`, closes that gap: `fdatasync` of the log file
//! (data, and the metadata needed to read it back), `fsync` of every blob file not synced yet,
//! and of the `blobs/` directory when it gained files. [`DirSync::open`] syncs the store
//! directory itself once, so the files sled created are found after a power cut.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// The file sled 0.34 keeps its log in, inside the store directory.
const LOG_FILE: &str = "db";
/// The directory sled 0.34 writes large values to, inside the store directory.
const BLOBS_DIR: &str = "blobs";

/// What [`DirSync::sync`] did (for tests and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Synced {
    /// Blob files synced by this call.
    pub blobs: usize,
}

/// Makes what sled wrote to a store directory durable. Create it after opening the `sled::Db`
/// (sled creates the files), call [`sync`](Self::sync) after every `Db::flush` whose result
/// must survive a power cut.
#[derive(Debug)]
pub struct DirSync {
    log: File,
    blobs: PathBuf,
    /// Blob files synced already (names; rebuilt from each listing, so it never outgrows the
    /// directory).
    synced: HashSet<OsString>,
}

impl DirSync {
    /// Opens the log file of the store in `dir` and syncs the directory entries sled created
    /// (the store directory and `blobs/`).
    pub fn open(dir: &Path) -> io::Result<Self> {
        let log = File::open(dir.join(LOG_FILE))?;
        let blobs = dir.join(BLOBS_DIR);
        let mut this = DirSync {
            log,
            blobs,
            synced: HashSet::new(),
        };
        // Blobs written before a crash were never synced by sled: sync them now, once.
        this.sync()?;
        sync_dir(dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            // The store directory's own entry, in case it was created just now.
            sync_dir(parent)?;
        }
        Ok(this)
    }

    /// `fdatasync` of the log, `fsync` of new blob files and, if there were any, of `blobs/`.
    /// Call it after `Db::flush` returned: then everything that flush covered is on stable
    /// storage (as far as the drive honours flushes).
    pub fn sync(&mut self) -> io::Result<Synced> {
        self.log.sync_data()?;
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(e) => e,
            // sled creates `blobs/` when it opens; gone means nothing to sync.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Synced::default()),
            Err(e) => return Err(e),
        };
        let mut seen = HashSet::with_capacity(self.synced.len());
        let mut blobs = 0;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !self.synced.contains(&name) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_all()?,
                    // Removed by sled's garbage collection since the listing.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                blobs += 1;
            }
            seen.insert(name);
        }
        self.synced = seen;
        if blobs > 0 {
            sync_dir(&self.blobs)?;
        }
        Ok(Synced { blobs })
    }
}

/// `fsync` of a directory (its entries: files created, renamed or removed in it).
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "edgesync-durable-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(dir.join(BLOBS_DIR)).unwrap();
        std::fs::write(dir.join(LOG_FILE), b"log").unwrap();
        dir
    }

    #[test]
    fn new_blobs_are_synced_once_and_removed_ones_forgotten() {
        let dir = temp_dir();
        std::fs::write(dir.join(BLOBS_DIR).join("1"), b"a").unwrap();
        let mut s = DirSync::open(&dir).unwrap();
        // Synced at open; nothing new since.
        assert_eq!(s.sync().unwrap(), Synced { blobs: 0 });
        std::fs::write(dir.join(BLOBS_DIR).join("2"), b"b").unwrap();
        std::fs::write(dir.join(BLOBS_DIR).join("3"), b"c").unwrap();
        assert_eq!(s.sync().unwrap(), Synced { blobs: 2 });
        assert_eq!(s.sync().unwrap(), Synced { blobs: 0 });
        std::fs::remove_file(dir.join(BLOBS_DIR).join("1")).unwrap();
        assert_eq!(s.sync().unwrap(), Synced { blobs: 0 });
        assert_eq!(s.synced.len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_log_is_an_error_and_a_missing_blobs_dir_is_not() {
        let dir = temp_dir();
        std::fs::remove_dir(dir.join(BLOBS_DIR)).unwrap();
        let mut s = DirSync::open(&dir).unwrap();
        assert_eq!(s.sync().unwrap(), Synced { blobs: 0 });
        std::fs::remove_dir_all(&dir).unwrap();
        let err = DirSync::open(&dir).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
