//! An SVID and trust bundle kept current from PEM files (feature `svid-files`), as SPIRE's
//! spiffe-helper or cert-manager's csi-driver-spiffe write them next to a workload.
//!
//! [`SvidFiles::load`] reads the certificate chain, the key and the bundle and checks them:
//! the chain is an X.509-SVID, the key belongs to its leaf, the bundle holds usable CAs, and the
//! caller's own rule ([`Accept`], e.g. "the SPIFFE ID is the configured hub id"). Every error
//! names the file.
//!
//! [`Watcher`] keeps an [`SvidStore`] current: every `interval` it reads the three files and,
//! when their bytes changed and they pass every check, replaces the store's material, so new
//! TLS handshakes use it. Files caught in the middle of a rotation (a new chain with the old
//! key: spiffe-helper writes the files one after the other) fail the key check and are not
//! loaded; the old material stays until a later check finds a consistent set, and only a set
//! that stays inconsistent for [`PERSISTENT_AFTER`] checks is logged as an error.
//!
//! Expiry is watched as well: the gauge `edgesync_svid_expiry_seconds` holds the seconds until
//! the loaded SVID expires (negative once it has), a warning is logged once when less than a
//! third of its lifetime is left (SPIRE rotates at half), and an error once it has expired.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::tls::{Identity, SvidStore, TlsError, TrustBundle};

/// Consecutive checks that find the same unusable files before it is logged as an error (a
/// rotation in progress is expected to be inconsistent for a moment).
pub const PERSISTENT_AFTER: u32 = 3;

/// A rule the loaded SVID must follow besides being valid (its SPIFFE ID, usually).
pub type Accept = Arc<dyn Fn(&Identity) -> Result<(), String> + Send + Sync>;

/// Why the files cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SvidFileError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file's content is not usable.
    #[error("{path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: TlsError,
    },
    /// The SVID is valid but not the one this process must present.
    #[error("{path}: {reason}")]
    Refused {
        /// The certificate file.
        path: PathBuf,
        /// The caller's rule that failed.
        reason: String,
    },
}

/// The three PEM files of an SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// PKCS#8 private key of the leaf.
    pub key: PathBuf,
    /// Trust bundle (CA certificates).
    pub bundle: PathBuf,
}

/// The files' bytes, as last read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Snapshot {
    cert: Vec<u8>,
    key: Vec<u8>,
    bundle: Vec<u8>,
}

/// Largest SVID, key or bundle file read (they are a few KiB; a path pointing at something
/// else must not make the process read it whole every second).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

fn read(path: &Path) -> Result<Vec<u8>, SvidFileError> {
    use std::io::Read as _;
    let err = |source| SvidFileError::Read {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(err)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(err(std::io::Error::other(format!(
            "larger than {MAX_FILE_BYTES} bytes: not an SVID, key or bundle file"
        ))));
    }
    Ok(bytes)
}

impl SvidFiles {
    fn snapshot(&self) -> Result<Snapshot, SvidFileError> {
        Ok(Snapshot {
            cert: read(&self.cert)?,
            key: read(&self.key)?,
            bundle: read(&self.bundle)?,
        })
    }

    fn parse(
        &self,
        s: &Snapshot,
        accept: &Accept,
    ) -> Result<(Identity, TrustBundle), SvidFileError> {
        let identity = Identity::from_pem(&s.cert, &s.key).map_err(|source| {
            // A key that does not belong to the chain is as much the key file's fault.
            SvidFileError::Invalid {
                path: self.cert.clone(),
                source,
            }
        })?;
        let bundle = TrustBundle::from_pem(&s.bundle).map_err(|source| SvidFileError::Invalid {
            path: self.bundle.clone(),
            source,
        })?;
        accept(&identity).map_err(|reason| SvidFileError::Refused {
            path: self.cert.clone(),
            reason,
        })?;
        Ok((identity, bundle))
    }

    /// Reads and checks the files (see the module docs).
    pub fn load(&self, accept: &Accept) -> Result<(Identity, TrustBundle), SvidFileError> {
        self.parse(&self.snapshot()?, accept)
    }
}

/// What one [`Watcher::check`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Checked {
    /// The files are as last loaded.
    Unchanged,
    /// New material was loaded (the store holds it now).
    Rotated,
    /// The files changed but cannot be used (yet); the store keeps the material it had.
    Unusable(String),
}

/// Keeps an [`SvidStore`] current with [`SvidFiles`] (see the module docs).
pub struct Watcher {
    files: SvidFiles,
    store: Arc<SvidStore>,
    accept: Accept,
    loaded: Snapshot,
    /// The unusable snapshot last seen and how many checks in a row saw it.
    failing: Option<(Snapshot, u32)>,
    /// The expiry state last logged, so that each is logged once per SVID.
    expiry_logged: (u64, ExpiryState),
    rotations: u64,
    notify: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("files", &self.files)
            .field("rotations", &self.rotations)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExpiryState {
    Fresh,
    Late,
    Expired,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Watcher {
    /// Loads the files once (an error here is fatal to the caller: there is nothing to present)
    /// and returns the store holding them and a watcher that keeps it current.
    pub fn start(
        files: SvidFiles,
        accept: Accept,
    ) -> Result<(Arc<SvidStore>, Watcher), SvidFileError> {
        let snapshot = files.snapshot()?;
        let (identity, bundle) = files.parse(&snapshot, &accept)?;
        let store = SvidStore::new(identity, bundle).map_err(|source| SvidFileError::Invalid {
            path: files.cert.clone(),
            source,
        })?;
        let (notify, _) = tokio::sync::watch::channel(0);
        let mut w = Watcher {
            files,
            store: store.clone(),
            accept,
            loaded: snapshot,
            failing: None,
            expiry_logged: (0, ExpiryState::Fresh),
            rotations: 0,
            notify,
        };
        w.watch_expiry(unix_now());
        Ok((store, w))
    }

    /// A receiver of the rotation count (changes after every rotation).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.notify.subscribe()
    }

    /// Reads the files once and loads them if they changed and are usable.
    pub fn check(&mut self) -> Checked {
        let outcome = match self.files.snapshot() {
            Ok(s) if s == self.loaded => {
                self.failing = None;
                Checked::Unchanged
            }
            Ok(s) => match self.files.parse(&s, &self.accept) {
                Ok((identity, bundle)) => {
                    let id = identity.id.clone();
                    match self.store.update(identity, bundle) {
                        Ok(()) => {
                            self.loaded = s;
                            self.failing = None;
                            self.rotations += 1;
                            let (_, not_after) = self.store.validity();
                            tracing::info!(
                                %id,
                                expires_in_s = not_after.saturating_sub(unix_now()),
                                "SVID rotated: new handshakes present the new certificate"
                            );
                            metrics::counter!("edgesync_svid_rotations_total").increment(1);
                            self.notify.send_replace(self.rotations);
                            Checked::Rotated
                        }
                        Err(e) => self.unusable(s, e.to_string()),
                    }
                }
                Err(e) => self.unusable(s, e.to_string()),
            },
            // A file missing for a moment (replaced by rename) is also a rotation in progress.
            Err(e) => self.unusable(Snapshot::default(), e.to_string()),
        };
        self.watch_expiry(unix_now());
        outcome
    }

    fn unusable(&mut self, s: Snapshot, why: String) -> Checked {
        let seen = match self.failing.take() {
            Some((prev, n)) if prev == s => n + 1,
            _ => 1,
        };
        if seen == PERSISTENT_AFTER {
            tracing::error!(
                error = %why,
                "the SVID files changed but cannot be used; still presenting the previous SVID"
            );
            metrics::counter!("edgesync_svid_reload_errors_total").increment(1);
        } else if seen < PERSISTENT_AFTER {
            tracing::debug!(error = %why, "SVID files not usable (yet)");
        }
        self.failing = Some((s, seen));
        Checked::Unusable(why)
    }

    fn watch_expiry(&mut self, now: u64) {
        let (not_before, not_after) = self.store.validity();
        metrics::gauge!("edgesync_svid_expiry_seconds").set(not_after as f64 - now as f64);
        let lifetime = not_after.saturating_sub(not_before);
        let state = if now >= not_after {
            ExpiryState::Expired
        } else if not_after - now < lifetime / 3 {
            ExpiryState::Late
        } else {
            ExpiryState::Fresh
        };
        if self.expiry_logged == (not_after, state) {
            return;
        }
        let id = self.store.id();
        match state {
            ExpiryState::Expired => tracing::error!(
                %id,
                expired_s_ago = now - not_after,
                files = %self.files.cert.display(),
                "our SVID has expired and was not rotated: peers refuse it"
            ),
            ExpiryState::Late => tracing::warn!(
                %id,
                expires_in_s = not_after - now,
                files = %self.files.cert.display(),
                "our SVID expires soon and has not been rotated"
            ),
            ExpiryState::Fresh => {}
        }
        self.expiry_logged = (not_after, state);
    }

    /// Checks the files every `interval` until `stop` completes.
    pub async fn run(self, interval: Duration, stop: impl std::future::Future<Output = ()>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        let mut w = self;
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = tick.tick() => {
                    // On a blocking thread: the files may sit on a slow or stalled mount.
                    match tokio::task::spawn_blocking(move || {
                        w.check();
                        w
                    })
                    .await
                    {
                        Ok(back) => w = back,
                        // The runtime is shutting down.
                        Err(_) => return,
                    }
                }
            }
        }
    }
}
