//! A running hub: the tunnel server, the store and the HTTP API, started together.
//!
//! [`Hub::start`] is what `edgesync-hub run` calls; the demo and the benchmarks embed a hub
//! the same way.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use edgesync_protocol::spiffe_id::{self, NodeIds, TrustDomain};
use edgesync_protocol::svid_keeper::{Accept, IdentityDriver, IdentitySource};
use edgesync_protocol::tls::{Identity, SvidStore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState, ApiToken};
use crate::http::HttpLimits;
use crate::server::{self, TunnelConfig};
use crate::store::{HubStore, Retention};

/// Everything a hub needs to start.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// UDP address of the QUIC tunnel.
    pub listen: SocketAddr,
    /// TCP address of the HTTP API.
    pub http_listen: SocketAddr,
    /// Where the sled store lives.
    pub data_dir: PathBuf,
    /// sled cache size.
    pub sled_cache_bytes: u64,
    /// Trust domain of the fleet.
    pub trust_domain: String,
    /// The hub's own SPIFFE ID (its SVID must carry it).
    pub hub_id: String,
    /// Where the hub's SVID and trust bundles come from; its federated trust domains are
    /// the ones whose nodes it accepts besides its own.
    pub identity: IdentitySource,
    /// Path prefix of node SPIFFE IDs (`/edge/`).
    pub node_path_prefix: String,
    /// API tokens.
    pub tokens: Vec<ApiToken>,
    /// Session idle timeout.
    pub idle_timeout: Duration,
    /// Most concurrent tunnel connections.
    pub max_connections: usize,
    /// Bounds of the HTTP API's listener.
    pub http_limits: HttpLimits,
    /// Most tunnel handshakes in progress at once.
    pub max_handshakes: usize,
    /// Time allowed for a tunnel handshake.
    pub handshake_timeout: Duration,
    /// Most records per second one node may store (`None`: no limit).
    pub node_max_records_per_s: Option<std::num::NonZeroU32>,
    /// How long records are kept and how much disk each node's may take.
    pub retention: Retention,
}

/// Why the hub could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// The identity files are unusable.
    #[error("identity: {0}")]
    Identity(String),
    /// The store failed to open.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// A listener could not be bound.
    #[error("listen: {0}")]
    Listen(String),
}

/// A running hub.
pub struct Hub {
    /// The store (shared with the API and sessions).
    pub store: Arc<HubStore>,
    /// Where the tunnel listens (the real port when 0 was asked).
    pub tunnel_addr: SocketAddr,
    /// Where the HTTP API listens.
    pub http_addr: SocketAddr,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// How often the hub reads its SVID files to pick up a rotation.
pub const SVID_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Loads the hub's SVID (it must carry `hub_id`, in `td`) and returns the store that holds it
/// and the driver that keeps it current as it rotates.
async fn load_svid(
    o: &HubOptions,
    td: &TrustDomain,
) -> Result<(Arc<SvidStore>, IdentityDriver), HubError> {
    let want = spiffe_id::parse_id(&o.hub_id).map_err(|e| HubError::Identity(e.to_string()))?;
    let td = td.clone();
    let accept: Accept = Arc::new(move |id: &Identity| {
        if id.id != want {
            return Err(format!(
                "the SVID is {}, not the configured hub id {want}",
                id.id
            ));
        }
        if !id.id.is_member_of(&td) {
            return Err(format!("hub id {} is not in trust domain {td}", id.id));
        }
        Ok(())
    });
    IdentityDriver::start(&o.identity, accept, SVID_CHECK_INTERVAL)
        .await
        .map_err(|e| HubError::Identity(e.to_string()))
}

/// The node SPIFFE IDs the hub accepts: its own trust domain's and its federated domains',
/// under the configured prefix.
fn node_ids(o: &HubOptions, td: &TrustDomain) -> Result<NodeIds, HubError> {
    let mut ids = NodeIds::new(td.clone())
        .with_prefix(&o.node_path_prefix)
        .map_err(|e| HubError::Identity(format!("node_path_prefix {e}")))?;
    let federated = match &o.identity {
        IdentitySource::Files(f) => f.federated.iter().map(|(td, _)| td.clone()).collect(),
        IdentitySource::WorkloadApi { federates_with, .. } => federates_with.clone(),
    };
    for f in federated {
        ids = ids.with_domain(f);
    }
    Ok(ids)
}

impl Hub {
    /// Opens the store, binds both listeners and starts serving. Must be called within a
    /// tokio runtime.
    pub async fn start(o: HubOptions) -> Result<Hub, HubError> {
        let access = api::ApiAccess::fixed(o.tokens.clone());
        Self::start_with_access(o, access).await
    }

    /// [`Hub::start`] with the API's tokens (`o.tokens` is not used) and TLS from `access`,
    /// whose files are read again every [`api::ACCESS_CHECK_INTERVAL`] until shutdown (and on
    /// [`api::ApiAccess::reload`]).
    pub async fn start_with_access(
        o: HubOptions,
        access: Arc<api::ApiAccess>,
    ) -> Result<Hub, HubError> {
        // The metrics recorder first: the tunnel registers metric handles when it starts.
        let metrics = crate::telemetry::prometheus();
        let td = spiffe_id::trust_domain(&o.trust_domain)
            .map_err(|e| HubError::Identity(e.to_string()))?;
        let nodes = node_ids(&o, &td)?;
        let (svid, svid_watcher) = load_svid(&o, &td).await?;
        let store = Arc::new(HubStore::open_with(
            &o.data_dir.join("hub.sled"),
            o.sled_cache_bytes,
            o.retention,
            Arc::new(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64)
            }),
        )?);
        let tcfg = TunnelConfig {
            nodes,
            idle_timeout: o.idle_timeout,
            max_connections: o.max_connections,
            max_handshakes: o.max_handshakes,
            handshake_timeout: o.handshake_timeout,
            node_max_records_per_s: o.node_max_records_per_s,
        };
        let endpoint = server::endpoint(o.listen, svid, &tcfg).map_err(HubError::Listen)?;
        let tunnel_addr = endpoint
            .local_addr()
            .map_err(|e| HubError::Listen(e.to_string()))?;
        let listener = tokio::net::TcpListener::bind(o.http_listen)
            .await
            .map_err(|e| HubError::Listen(format!("{}: {e}", o.http_listen)))?;
        let http_addr = listener
            .local_addr()
            .map_err(|e| HubError::Listen(e.to_string()))?;
        let cancel = CancellationToken::new();
        let mut tasks = vec![];
        tasks.push(tokio::spawn(server::serve(
            endpoint,
            store.clone(),
            tcfg,
            cancel.child_token(),
        )));
        // New handshakes present the rotated SVID and verify against the rotated bundle.
        tasks.push(tokio::spawn(
            svid_watcher.run(cancel.child_token().cancelled_owned()),
        ));
        let retention_store = store.clone();
        let retention_cancel = cancel.child_token();
        tasks.push(tokio::spawn(async move {
            retention_store.run_retention(retention_cancel).await;
        }));
        let state = ApiState {
            store: store.clone(),
            tokens: access.tokens(),
            metrics,
            shutdown: cancel.child_token(),
        };
        let app = api::router(state);
        tasks.push(tokio::spawn(crate::http::serve_with(
            listener,
            app,
            o.http_limits,
            access.tls_config(),
            cancel.child_token(),
        )));
        // Rotated token files and TLS files are picked up without a restart.
        tasks.push(tokio::spawn(
            access
                .clone()
                .watch(api::ACCESS_CHECK_INTERVAL, cancel.child_token()),
        ));
        tracing::info!(%tunnel_addr, %http_addr, "hub started");
        Ok(Hub {
            store,
            tunnel_addr,
            http_addr,
            cancel,
            tasks,
        })
    }

    /// Stops serving and flushes the store.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        if let Err(e) = self.store.flush().await {
            tracing::error!(error = %e, "final flush failed");
        }
    }
}
