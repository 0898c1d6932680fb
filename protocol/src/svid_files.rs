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
//! Expiry is watched as well (see [`crate::svid_keeper`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::spiffe_id::TrustDomain;
pub use crate::svid_keeper::Accept;
use crate::svid_keeper::{Keeper, unix_now};
use crate::tls::{Identity, SvidStore, TlsError, TrustBundle, TrustBundles};

/// Consecutive checks that find the same unusable files before it is logged as an error (a
/// rotation in progress is expected to be inconsistent for a moment).
pub const PERSISTENT_AFTER: u32 = 3;

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
    /// Trust bundle of our own trust domain (CA certificates).
    pub bundle: PathBuf,
    /// Bundles of federated trust domains, one file each (peers of those domains are
    /// verified against their own bundle only).
    pub federated: Vec<(TrustDomain, PathBuf)>,
}

/// The files' bytes, as last read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Snapshot {
    cert: Vec<u8>,
    key: Vec<u8>,
    bundle: Vec<u8>,
    federated: Vec<Vec<u8>>,
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
            federated: self
                .federated
                .iter()
                .map(|(_, p)| read(p))
                .collect::<Result<_, _>>()?,
        })
    }

    fn parse(
        &self,
        s: &Snapshot,
        accept: &Accept,
    ) -> Result<(Identity, TrustBundles), SvidFileError> {
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
        let own = identity.id.trust_domain().clone();
        let mut bundles = TrustBundles::single(&own, bundle);
        for ((td, path), bytes) in self.federated.iter().zip(&s.federated) {
            if *td == own {
                return Err(SvidFileError::Refused {
                    path: path.clone(),
                    reason: format!(
                        "trust domain {td} is our own: its bundle is {}",
                        self.bundle.display()
                    ),
                });
            }
            let b = TrustBundle::from_pem(bytes).map_err(|source| SvidFileError::Invalid {
                path: path.clone(),
                source,
            })?;
            bundles.insert(td, b);
        }
        Ok((identity, bundles))
    }

    /// Reads and checks the files (see the module docs).
    pub fn load(&self, accept: &Accept) -> Result<(Identity, TrustBundles), SvidFileError> {
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
    keeper: Keeper,
    loaded: Snapshot,
    /// The unusable snapshot last seen and how many checks in a row saw it.
    failing: Option<(Snapshot, u32)>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("files", &self.files)
            .field("rotations", &self.keeper.rotations())
            .finish_non_exhaustive()
    }
}

impl Watcher {
    /// Loads the files once (an error here is fatal to the caller: there is nothing to present)
    /// and returns the store holding them and a watcher that keeps it current.
    pub fn start(
        files: SvidFiles,
        accept: Accept,
    ) -> Result<(Arc<SvidStore>, Watcher), SvidFileError> {
        let snapshot = files.snapshot()?;
        let (identity, bundles) = files.parse(&snapshot, &accept)?;
        let store = SvidStore::with_bundles(identity, bundles).map_err(|source| {
            SvidFileError::Invalid {
                path: files.cert.clone(),
                source,
            }
        })?;
        let keeper = Keeper::new(store.clone(), accept, files.cert.display().to_string());
        Ok((
            store,
            Watcher {
                files,
                keeper,
                loaded: snapshot,
                failing: None,
            },
        ))
    }

    /// A receiver of the rotation count (changes after every rotation).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.keeper.subscribe()
    }

    /// Reads the files once and loads them if they changed and are usable.
    pub fn check(&mut self) -> Checked {
        let outcome = match self.files.snapshot() {
            Ok(s) if s == self.loaded => {
                self.failing = None;
                Checked::Unchanged
            }
            Ok(s) => match self.files.parse(&s, &self.keeper.accept) {
                Ok((identity, bundles)) => match self.keeper.install(identity, bundles) {
                    Ok(()) => {
                        self.loaded = s;
                        self.failing = None;
                        Checked::Rotated
                    }
                    Err(e) => self.unusable(s, e),
                },
                Err(e) => self.unusable(s, e.to_string()),
            },
            // A file missing for a moment (replaced by rename) is also a rotation in progress.
            Err(e) => self.unusable(Snapshot::default(), e.to_string()),
        };
        self.keeper.watch_expiry(unix_now());
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
