//! What every identity source shares (feature `svid-files`): the [`SvidStore`] it keeps
//! current, the caller's rule a new SVID must follow, the rotation count that connections
//! watch, and the expiry watch.
//!
//! Sources: PEM files ([`crate::svid_files`]) and, with feature `workload-api`, the SPIFFE
//! Workload API ([`crate::workload_api`]). [`IdentitySource`] names one in configuration and
//! [`IdentityDriver`] runs it.
//!
//! Expiry: the gauge `edgesync_svid_expiry_seconds` holds the seconds until the SVID in use
//! expires (negative once it has); a warning is logged once when less than a third of its
//! lifetime is left (SPIRE rotates at half), and an error once it has expired.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::spiffe_id::TrustDomain;
use crate::tls::{Identity, SvidStore, TrustBundles};

/// A rule the loaded SVID must follow besides being valid (its SPIFFE ID, usually).
pub type Accept = Arc<dyn Fn(&Identity) -> Result<(), String> + Send + Sync>;

/// Where an SVID and its trust bundles come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySource {
    /// PEM files, read every second.
    Files(crate::svid_files::SvidFiles),
    /// The SPIFFE Workload API (a SPIRE agent's socket), streamed.
    WorkloadApi {
        /// `unix:///path` or `tcp://ip:port`; `None`: `SPIFFE_ENDPOINT_SOCKET`.
        endpoint: Option<String>,
        /// Federated trust domains whose bundles are taken from the API.
        federates_with: Vec<TrustDomain>,
        /// How long the first SVID may take to arrive before start-up fails.
        initial_timeout: Duration,
    },
}

/// Why an identity source could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The files cannot be used.
    #[error(transparent)]
    Files(#[from] crate::svid_files::SvidFileError),
    /// The Workload API gave nothing usable.
    #[error("SPIFFE Workload API{}: {reason}", endpoint.as_deref().map(|e| format!(" at {e}")).unwrap_or_default())]
    WorkloadApi {
        /// The endpoint (`None`: from `SPIFFE_ENDPOINT_SOCKET`).
        endpoint: Option<String>,
        /// What went wrong.
        reason: String,
    },
    /// This binary was built without the Workload API client.
    #[error("this build has no SPIFFE Workload API client (feature `workload-api`)")]
    Unsupported,
}

/// Runs an identity source: keeps the store current until stopped.
#[derive(Debug)]
pub enum IdentityDriver {
    /// Files, checked every `interval`.
    Files(Box<crate::svid_files::Watcher>, Duration),
    /// The Workload API stream.
    #[cfg(feature = "workload-api")]
    WorkloadApi(crate::workload_api::ApiWatcher),
}

impl IdentityDriver {
    /// Starts `source`: loads the first SVID (an error is fatal to the caller: there is
    /// nothing to present) and returns the store holding it and the driver keeping it current.
    /// Files are checked every `interval`.
    pub async fn start(
        source: &IdentitySource,
        accept: Accept,
        interval: Duration,
    ) -> Result<(Arc<SvidStore>, IdentityDriver), IdentityError> {
        match source {
            IdentitySource::Files(files) => {
                let (store, w) = crate::svid_files::Watcher::start(files.clone(), accept)?;
                Ok((store, IdentityDriver::Files(Box::new(w), interval)))
            }
            #[cfg(feature = "workload-api")]
            IdentitySource::WorkloadApi {
                endpoint,
                federates_with,
                initial_timeout,
            } => {
                let (store, w) = crate::workload_api::ApiWatcher::start(
                    endpoint.clone(),
                    federates_with.clone(),
                    accept,
                    *initial_timeout,
                )
                .await?;
                Ok((store, IdentityDriver::WorkloadApi(w)))
            }
            #[cfg(not(feature = "workload-api"))]
            IdentitySource::WorkloadApi { .. } => Err(IdentityError::Unsupported),
        }
    }

    /// A receiver of the rotation count (changes after every rotation or withdrawal).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        match self {
            IdentityDriver::Files(w, _) => w.subscribe(),
            #[cfg(feature = "workload-api")]
            IdentityDriver::WorkloadApi(w) => w.subscribe(),
        }
    }

    /// Keeps the store current until `stop` completes.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        match self {
            IdentityDriver::Files(w, interval) => (*w).run(interval, stop).await,
            #[cfg(feature = "workload-api")]
            IdentityDriver::WorkloadApi(w) => w.run(stop).await,
        }
    }
}

/// The shared state of a source (see the module docs).
pub(crate) struct Keeper {
    pub(crate) store: Arc<SvidStore>,
    pub(crate) accept: Accept,
    /// Where the SVID comes from, for log lines (a file path or the API endpoint).
    pub(crate) origin: String,
    /// The expiry state last logged, so that each is logged once per SVID.
    expiry_logged: (u64, ExpiryState),
    rotations: u64,
    notify: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExpiryState {
    Fresh,
    Late,
    Expired,
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Keeper {
    pub(crate) fn new(store: Arc<SvidStore>, accept: Accept, origin: String) -> Keeper {
        let (notify, _) = tokio::sync::watch::channel(0);
        let mut k = Keeper {
            store,
            accept,
            origin,
            expiry_logged: (0, ExpiryState::Fresh),
            rotations: 0,
            notify,
        };
        k.watch_expiry(unix_now());
        k
    }

    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.notify.subscribe()
    }

    pub(crate) fn rotations(&self) -> u64 {
        self.rotations
    }

    /// Checks `identity` against the caller's rule and installs it with `bundles`.
    pub(crate) fn install(
        &mut self,
        identity: Identity,
        bundles: TrustBundles,
    ) -> Result<(), String> {
        (self.accept)(&identity)?;
        let id = identity.id.clone();
        self.store
            .update(identity, bundles)
            .map_err(|e| e.to_string())?;
        self.rotations += 1;
        let (_, not_after) = self.store.validity();
        tracing::info!(
            %id,
            expires_in_s = not_after.saturating_sub(unix_now()),
            source = %self.origin,
            "SVID rotated: new handshakes present the new certificate"
        );
        metrics::counter!("edgesync_svid_rotations_total").increment(1);
        self.notify.send_replace(self.rotations);
        self.watch_expiry(unix_now());
        Ok(())
    }

    /// The source withdrew our identity: nothing is presented or verified until a new one.
    #[cfg(feature = "workload-api")]
    pub(crate) fn withdraw(&mut self, why: &str) {
        if self.store.is_withdrawn() {
            return;
        }
        self.store.withdraw();
        self.rotations += 1;
        tracing::error!(
            id = %self.store.id(),
            source = %self.origin,
            reason = why,
            "our SVID was withdrawn: no connection is made or accepted until a new one is issued"
        );
        metrics::counter!("edgesync_svid_withdrawals_total").increment(1);
        self.notify.send_replace(self.rotations);
    }

    pub(crate) fn watch_expiry(&mut self, now: u64) {
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
                source = %self.origin,
                "our SVID has expired and was not rotated: peers refuse it"
            ),
            ExpiryState::Late => tracing::warn!(
                %id,
                expires_in_s = not_after - now,
                source = %self.origin,
                "our SVID expires soon and has not been rotated"
            ),
            ExpiryState::Fresh => {}
        }
        self.expiry_logged = (not_after, state);
    }
}
