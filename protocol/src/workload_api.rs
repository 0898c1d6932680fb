//! An SVID and trust bundles streamed from the SPIFFE Workload API (feature `workload-api`),
//! as a SPIRE agent serves them on its socket.
//!
//! The `spiffe` crate's [`X509Source`] holds the stream (it reconnects with backoff when the
//! agent restarts). [`ApiWatcher`] installs each update in an [`SvidStore`]: of the SVIDs
//! issued to this workload, the first one the caller's rule accepts, with the bundle of its
//! own trust domain and those of the federated domains named in configuration (other
//! federated bundles the API sends are ignored: a domain is trusted only when configured).
//! A withdrawal (the API answers `PermissionDenied`: the workload's registration entry was
//! removed) withdraws the identity from the store until a new SVID arrives. An update that
//! cannot be used keeps the previous material and is logged.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::X509Source;

use crate::spiffe_id::TrustDomain;
use crate::svid_keeper::{Accept, IdentityError, Keeper, unix_now};
use crate::tls::{Identity, SvidStore, TrustBundle, TrustBundles};

/// How often the expiry of the SVID in use is re-checked between updates.
const EXPIRY_CHECK: Duration = Duration::from_secs(1);

/// Keeps an [`SvidStore`] current from the Workload API (see the module docs).
pub struct ApiWatcher {
    source: X509Source,
    keeper: Keeper,
    federates_with: Vec<TrustDomain>,
}

impl std::fmt::Debug for ApiWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiWatcher")
            .field("origin", &self.keeper.origin)
            .field("rotations", &self.keeper.rotations())
            .finish_non_exhaustive()
    }
}

/// The identity and bundles of one Workload API state (see the module docs).
fn material(
    source: &X509Source,
    accept: &Accept,
    federates_with: &[TrustDomain],
) -> Result<(Identity, TrustBundles), String> {
    let state = source.state();
    let ctx = state.context().map_err(|e| e.to_string())?;
    let mut refused = Vec::new();
    for svid in ctx.svids() {
        let chain = svid
            .cert_chain()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            svid.private_key().as_bytes().to_vec(),
        ));
        let identity = match Identity::from_der(chain, key) {
            Ok(i) => i,
            Err(e) => {
                refused.push(format!("{}: {e}", svid.spiffe_id()));
                continue;
            }
        };
        if let Err(e) = accept(&identity) {
            refused.push(format!("{}: {e}", identity.id));
            continue;
        }
        let own = identity.id.trust_domain().clone();
        let set = ctx.bundle_set();
        let bundle = |td: &TrustDomain| -> Result<Option<TrustBundle>, String> {
            match set.get(td) {
                None => Ok(None),
                Some(b) => TrustBundle::from_der(b.authorities().iter().map(|c| c.as_bytes()))
                    .map(Some)
                    .map_err(|e| format!("bundle of {td}: {e}")),
            }
        };
        let mine = bundle(&own)?
            .ok_or_else(|| format!("no bundle for our own trust domain {own} was sent"))?;
        let mut bundles = TrustBundles::single(&own, mine);
        for td in federates_with {
            match bundle(td)? {
                Some(b) => bundles.insert(td, b),
                None => tracing::warn!(
                    trust_domain = %td,
                    "the Workload API sent no bundle for a configured federated trust domain: its peers are refused"
                ),
            }
        }
        return Ok((identity, bundles));
    }
    Err(if refused.is_empty() {
        "no X.509-SVID was issued to this workload".to_owned()
    } else {
        format!("no usable X.509-SVID: {}", refused.join("; "))
    })
}

impl ApiWatcher {
    /// Connects to the Workload API at `endpoint` (`None`: `SPIFFE_ENDPOINT_SOCKET`), waits up
    /// to `initial_timeout` for a usable SVID and returns the store holding it and a watcher
    /// that keeps it current.
    pub async fn start(
        endpoint: Option<String>,
        federates_with: Vec<TrustDomain>,
        accept: Accept,
        initial_timeout: Duration,
    ) -> Result<(Arc<SvidStore>, ApiWatcher), IdentityError> {
        let err = |reason: String| IdentityError::WorkloadApi {
            endpoint: endpoint.clone(),
            reason,
        };
        let mut builder = X509Source::builder().initial_sync_timeout(initial_timeout);
        if let Some(e) = &endpoint {
            builder = builder.endpoint(e);
        }
        let source = builder.build().await.map_err(|e| err(e.to_string()))?;
        let (identity, bundles) = match material(&source, &accept, &federates_with) {
            Ok(m) => m,
            Err(e) => {
                source.shutdown().await;
                return Err(err(e));
            }
        };
        let store = SvidStore::with_bundles(identity, bundles).map_err(|e| err(e.to_string()))?;
        let origin = format!(
            "Workload API {}",
            endpoint.as_deref().unwrap_or("($SPIFFE_ENDPOINT_SOCKET)")
        );
        let keeper = Keeper::new(store.clone(), accept, origin);
        Ok((
            store,
            ApiWatcher {
                source,
                keeper,
                federates_with,
            },
        ))
    }

    /// A receiver of the rotation count (changes after every rotation or withdrawal).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.keeper.subscribe()
    }

    fn apply(&mut self) {
        if let Some(why) = self.source.state().withdrawal() {
            let why = why.to_string();
            self.keeper.withdraw(&why);
            return;
        }
        let outcome = material(&self.source, &self.keeper.accept, &self.federates_with)
            .and_then(|(identity, bundles)| self.keeper.install(identity, bundles));
        if let Err(e) = outcome {
            tracing::error!(
                error = %e,
                source = %self.keeper.origin,
                "a Workload API update cannot be used; still presenting the previous SVID"
            );
            metrics::counter!("edgesync_svid_reload_errors_total").increment(1);
        }
    }

    /// Installs every update until `stop` completes, then closes the stream.
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        let mut updates = self.source.updated();
        let mut tick = tokio::time::interval(EXPIRY_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        let mut open = true;
        loop {
            tokio::select! {
                () = &mut stop => break,
                changed = updates.changed(), if open => match changed {
                    Ok(_) => self.apply(),
                    Err(e) => {
                        // Only after a shutdown or an internal failure of the client.
                        tracing::error!(
                            error = %e,
                            source = %self.keeper.origin,
                            "the Workload API client stopped; the current SVID is kept until it expires"
                        );
                        open = false;
                    }
                },
                _ = tick.tick() => self.keeper.watch_expiry(unix_now()),
            }
        }
        self.source.shutdown().await;
    }
}
