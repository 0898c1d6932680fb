//! A fake SPIFFE Workload API: the X.509 half of the gRPC service a SPIRE agent serves on its
//! Unix socket, close enough to the real protocol that the `spiffe` crate's real client
//! (`X509Source`, `WorkloadApiClient`) runs against it unchanged. SPIRE cannot be installed on
//! the test machines; this stands in for it.
//!
//! What it does as SPIRE does:
//! - gRPC service `SpiffeWorkloadAPI` (the proto has no package), on a Unix socket, endpoint
//!   `unix:///path`;
//! - server-streaming `FetchX509SVID` and `FetchX509Bundles`: the current material at once,
//!   then again whenever [`WorkloadApi::set`] replaces it;
//! - requests without the metadata header `workload.spiffe.io: true` are refused with
//!   `InvalidArgument` ("security header missing from request");
//! - without an identity (before the first [`WorkloadApi::set`], or after
//!   [`WorkloadApi::withdraw`]) open streams end, and new ones are refused, with
//!   `PermissionDenied` ("no identity issued");
//! - bundles are keyed by the trust domain's SPIFFE ID (`spiffe://example.org`);
//! - the JWT RPCs, and any other method, answer `Unimplemented`.
//!
//! No attestation: every caller gets the same identity. The messages are written by hand
//! with the field numbers and types of `workload.proto` ([`pb`]); no protoc is needed.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    future::{Future, Ready, ready},
    marker::PhantomData,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context as TaskContext, Poll},
    time::Duration,
};

use anyhow::Context;
use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream};
use tokio::{net::UnixListener, sync::watch, task::JoinHandle};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, body::Body, metadata::MetadataMap, server::NamedService};
use tonic_prost::ProstCodec;
use tower_service::Service;

use crate::pki::{Svid, TestCa};

/// The gRPC service name (`workload.proto` declares no package).
pub const SERVICE_NAME: &str = "SpiffeWorkloadAPI";
/// Path of the `FetchX509SVID` method.
pub const FETCH_X509_SVID_PATH: &str = "/SpiffeWorkloadAPI/FetchX509SVID";
/// Path of the `FetchX509Bundles` method.
pub const FETCH_X509_BUNDLES_PATH: &str = "/SpiffeWorkloadAPI/FetchX509Bundles";
/// The metadata header every Workload API request must carry, with the value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";
/// SPIRE's message when a request lacks [`SECURITY_HEADER`].
pub const SECURITY_HEADER_MISSING: &str = "security header missing from request";
/// SPIRE's message for a caller without an identity; the `spiffe` client maps it to
/// `WorkloadApiError::NoIdentityIssued`.
pub const NO_IDENTITY_ISSUED: &str = "no identity issued";

/// How long [`WorkloadApi::stop`] waits for the server to wind down before aborting it.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The X.509 messages of `workload.proto` (the `spiffe` crate's generated copy is private).
pub mod pb {
    use std::collections::HashMap;

    use bytes::Bytes;

    /// `X509SVIDRequest`: no parameters.
    #[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
    pub struct X509SvidRequest {}

    /// `X509SVIDResponse`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct X509SvidResponse {
        /// The SVIDs, the default one first.
        #[prost(message, repeated, tag = "1")]
        pub svids: Vec<X509Svid>,
        /// DER CRLs (unused here).
        #[prost(bytes = "bytes", repeated, tag = "2")]
        pub crl: Vec<Bytes>,
        /// Bundles of foreign trust domains, keyed by trust domain SPIFFE ID, DER concatenated.
        #[prost(map = "string, bytes", tag = "3")]
        pub federated_bundles: HashMap<String, Bytes>,
    }

    /// `X509SVID`.
    #[derive(Clone, PartialEq, Eq, prost::Message)]
    pub struct X509Svid {
        /// The SPIFFE ID.
        #[prost(string, tag = "1")]
        pub spiffe_id: String,
        /// DER certificates, leaf first, concatenated.
        #[prost(bytes = "bytes", tag = "2")]
        pub x509_svid: Bytes,
        /// PKCS#8 DER private key.
        #[prost(bytes = "bytes", tag = "3")]
        pub x509_svid_key: Bytes,
        /// DER CA certificates of the SVID's trust domain, concatenated.
        #[prost(bytes = "bytes", tag = "4")]
        pub bundle: Bytes,
        /// Operator hint.
        #[prost(string, tag = "5")]
        pub hint: String,
    }

    /// `X509BundlesRequest`: no parameters.
    #[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
    pub struct X509BundlesRequest {}

    /// `X509BundlesResponse`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct X509BundlesResponse {
        /// DER CRLs (unused here).
        #[prost(bytes = "bytes", repeated, tag = "1")]
        pub crl: Vec<Bytes>,
        /// Bundles keyed by trust domain SPIFFE ID, DER certificates concatenated.
        #[prost(map = "string, bytes", tag = "2")]
        pub bundles: HashMap<String, Bytes>,
    }
}

/// One X.509-SVID as the Workload API hands it out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SvidEntry {
    /// The SPIFFE ID (`spiffe://<trust-domain>/<path>`).
    pub spiffe_id: String,
    /// The leaf certificate first, then intermediates, DER.
    pub chain_der: Vec<Vec<u8>>,
    /// The leaf's private key, PKCS#8 DER.
    pub key_pkcs8_der: Vec<u8>,
    /// The CA certificates of the SVID's trust domain, DER (several during a CA rotation).
    pub bundle_der: Vec<Vec<u8>>,
    /// Operator hint (empty: none).
    pub hint: String,
}

impl SvidEntry {
    /// `svid` with a bundle holding the root of each of `cas` (duplicates dropped, order kept).
    #[must_use]
    pub fn new(svid: &Svid, cas: &[&TestCa]) -> SvidEntry {
        SvidEntry {
            spiffe_id: svid.spiffe_id.clone(),
            chain_der: svid.chain_der.iter().map(|c| c.to_vec()).collect(),
            key_pkcs8_der: svid.key_pkcs8_der.clone(),
            bundle_der: roots(cas),
            hint: String::new(),
        }
    }
}

/// What the Workload API serves: replaced whole by [`WorkloadApi::set`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct X509Update {
    /// The SVIDs, the default one first. Must not be empty for the client to accept it.
    pub svids: Vec<SvidEntry>,
    /// Bundles of foreign trust domains: trust domain name (`example.com`, or its SPIFFE ID
    /// `spiffe://example.com`) and its CA certificates, DER.
    pub federated: Vec<(String, Vec<Vec<u8>>)>,
}

impl X509Update {
    /// One SVID, trusting the roots of `cas` for its trust domain (pass the old and the new CA
    /// for an overlapping bundle during a CA rotation).
    #[must_use]
    pub fn single(svid: &Svid, cas: &[&TestCa]) -> X509Update {
        X509Update {
            svids: vec![SvidEntry::new(svid, cas)],
            federated: Vec::new(),
        }
    }

    /// Adds a federated bundle for `trust_domain` holding the roots of `cas`.
    #[must_use]
    pub fn with_federated(mut self, trust_domain: &str, cas: &[&TestCa]) -> X509Update {
        self.federated.push((trust_domain.to_owned(), roots(cas)));
        self
    }
}

/// The distinct trust-domain roots of `cas`, DER.
fn roots(cas: &[&TestCa]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for ca in cas {
        let der = ca.bundle_der().to_vec();
        if !out.contains(&der) {
            out.push(der);
        }
    }
    out
}

/// `spiffe://<td>` for a trust domain name or SPIFFE ID.
fn trust_domain_id(td: &str) -> String {
    if td.starts_with("spiffe://") {
        td.to_owned()
    } else {
        format!("spiffe://{td}")
    }
}

/// The trust domain SPIFFE ID of a SPIFFE ID, if it has the `spiffe://` shape.
fn trust_domain_of(spiffe_id: &str) -> Option<String> {
    let rest = spiffe_id.strip_prefix("spiffe://")?;
    let td = rest.split('/').next().filter(|td| !td.is_empty())?;
    Some(trust_domain_id(td))
}

fn concat(ders: &[Vec<u8>]) -> Bytes {
    Bytes::from(ders.concat())
}

/// The two responses an [`X509Update`] turns into, built once per [`WorkloadApi::set`].
#[derive(Debug)]
struct Messages {
    svids: pb::X509SvidResponse,
    bundles: pb::X509BundlesResponse,
}

impl Messages {
    fn new(update: &X509Update) -> Messages {
        let federated: HashMap<String, Bytes> = update
            .federated
            .iter()
            .map(|(td, ders)| (trust_domain_id(td), concat(ders)))
            .collect();
        let svids = update
            .svids
            .iter()
            .map(|s| pb::X509Svid {
                spiffe_id: s.spiffe_id.clone(),
                x509_svid: concat(&s.chain_der),
                x509_svid_key: Bytes::from(s.key_pkcs8_der.clone()),
                bundle: concat(&s.bundle_der),
                hint: s.hint.clone(),
            })
            .collect();
        // FetchX509Bundles: the SVIDs' own trust domains (the first SVID of each wins), then
        // the federated ones, as SPIRE returns its own bundle with the federated ones.
        let mut bundles: BTreeMap<String, Bytes> = BTreeMap::new();
        for s in &update.svids {
            if let Some(td) = trust_domain_of(&s.spiffe_id) {
                bundles.entry(td).or_insert_with(|| concat(&s.bundle_der));
            }
        }
        for (td, ders) in &federated {
            bundles.entry(td.clone()).or_insert_with(|| ders.clone());
        }
        Messages {
            svids: pb::X509SvidResponse {
                svids,
                crl: Vec::new(),
                federated_bundles: federated,
            },
            bundles: pb::X509BundlesResponse {
                crl: Vec::new(),
                bundles: bundles.into_iter().collect(),
            },
        }
    }
}

/// What every stream sees.
#[derive(Debug, Clone)]
enum Published {
    Identity(Arc<Messages>),
    Withdrawn,
}

#[derive(Debug)]
struct Shared {
    /// One value, the newest: open streams skip states they had no time to send.
    state: watch::Sender<Published>,
    /// Open `FetchX509SVID` streams.
    open_svid_streams: AtomicUsize,
    /// Ends the server and every open stream.
    stop: CancellationToken,
}

/// A fake SPIFFE Workload API serving on a Unix socket. Dropping it stops the server and
/// removes the socket file; [`WorkloadApi::stop`] does so gracefully.
#[derive(Debug)]
pub struct WorkloadApi {
    path: PathBuf,
    shared: Arc<Shared>,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl WorkloadApi {
    /// Starts serving on a new socket at `path` (keep it short: a socket path holds at most
    /// 107 bytes). No identity is issued until the first [`WorkloadApi::set`]: until then
    /// requests are refused with `PermissionDenied` ("no identity issued"), which clients
    /// retry. Must be called within a tokio runtime.
    ///
    /// # Errors
    /// The socket cannot be bound (e.g. `path` exists already or is too long).
    pub async fn start(path: &Path) -> anyhow::Result<WorkloadApi> {
        let path = std::path::absolute(path)
            .with_context(|| format!("the absolute path of {}", path.display()))?;
        let listener = UnixListener::bind(&path)
            .with_context(|| format!("bind the Workload API socket {}", path.display()))?;
        let (state, _) = watch::channel(Published::Withdrawn);
        let shared = Arc::new(Shared {
            state,
            open_svid_streams: AtomicUsize::new(0),
            stop: CancellationToken::new(),
        });
        let service = WorkloadApiService {
            shared: Arc::clone(&shared),
        };
        let stop = shared.stop.clone();
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .serve_with_incoming_shutdown(
                    service,
                    UnixListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
                .await
        });
        Ok(WorkloadApi {
            path,
            shared,
            task: Some(task),
        })
    }

    /// The socket path (absolute).
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The endpoint address for clients: `unix://` and the absolute socket path.
    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// Replaces what every open and future `FetchX509SVID` / `FetchX509Bundles` stream sees,
    /// and sends it at once on the open streams.
    pub fn set(&self, update: X509Update) {
        let messages = Arc::new(Messages::new(&update));
        self.shared
            .state
            .send_replace(Published::Identity(messages));
    }

    /// Withdraws the identity: open streams end with `PermissionDenied` ("no identity
    /// issued"), and new ones are refused that way until the next [`WorkloadApi::set`].
    pub fn withdraw(&self) {
        self.shared.state.send_replace(Published::Withdrawn);
    }

    /// Number of `FetchX509SVID` streams currently open (e.g. to wait for a client).
    #[must_use]
    pub fn open_streams(&self) -> usize {
        self.shared.open_svid_streams.load(Ordering::SeqCst)
    }

    /// Stops the server: open streams end with `Unavailable`, the socket stops accepting, and
    /// its file is removed. Waits a few seconds for connections to close, then aborts them.
    pub async fn stop(mut self) {
        self.shared.stop.cancel();
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(STOP_GRACE, &mut task).await.is_err()
        {
            task.abort();
            let _ = task.await;
        }
        // Drop removes the socket file.
    }
}

impl Drop for WorkloadApi {
    fn drop(&mut self) {
        self.shared.stop.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Routes the HTTP/2 requests of the gRPC server.
#[derive(Debug, Clone)]
struct WorkloadApiService {
    shared: Arc<Shared>,
}

impl NamedService for WorkloadApiService {
    const NAME: &'static str = SERVICE_NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl Service<http::Request<Body>> for WorkloadApiService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let shared = Arc::clone(&self.shared);
        match req.uri().path() {
            FETCH_X509_SVID_PATH => Box::pin(async move {
                let handler = Fetch::<pb::X509SvidRequest, _> {
                    shared,
                    pick: |m: &Messages| m.svids.clone(),
                    counted: true,
                    _request: PhantomData,
                };
                let codec = ProstCodec::<pb::X509SvidResponse, pb::X509SvidRequest>::default();
                let mut grpc = tonic::server::Grpc::new(codec);
                Ok(grpc.server_streaming(handler, req).await)
            }),
            FETCH_X509_BUNDLES_PATH => Box::pin(async move {
                let handler = Fetch::<pb::X509BundlesRequest, _> {
                    shared,
                    pick: |m: &Messages| m.bundles.clone(),
                    counted: false,
                    _request: PhantomData,
                };
                let codec =
                    ProstCodec::<pb::X509BundlesResponse, pb::X509BundlesRequest>::default();
                let mut grpc = tonic::server::Grpc::new(codec);
                Ok(grpc.server_streaming(handler, req).await)
            }),
            other => {
                let status =
                    Status::unimplemented(format!("{other} is not implemented by this fake"));
                Box::pin(ready(Ok(status.into_http())))
            }
        }
    }
}

/// A server-streaming X.509 method: `pick` selects its message from the published state.
struct Fetch<Req, Resp> {
    shared: Arc<Shared>,
    pick: fn(&Messages) -> Resp,
    /// Whether the stream counts in [`WorkloadApi::open_streams`].
    counted: bool,
    _request: PhantomData<fn(Req)>,
}

type ResponseStream<Resp> = Pin<Box<dyn Stream<Item = Result<Resp, Status>> + Send>>;

impl<Req, Resp: Send + 'static> Service<tonic::Request<Req>> for Fetch<Req, Resp> {
    type Response = tonic::Response<ResponseStream<Resp>>;
    type Error = Status;
    type Future = Ready<Result<Self::Response, Status>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: tonic::Request<Req>) -> Self::Future {
        ready(self.open(request.metadata()).map(tonic::Response::new))
    }
}

impl<Req, Resp: Send + 'static> Fetch<Req, Resp> {
    fn open(&self, metadata: &MetadataMap) -> Result<ResponseStream<Resp>, Status> {
        let has_header = metadata
            .get(SECURITY_HEADER)
            .is_some_and(|v| v.as_bytes() == b"true");
        if !has_header {
            return Err(Status::invalid_argument(SECURITY_HEADER_MISSING));
        }
        if self.shared.stop.is_cancelled() {
            return Err(stopped());
        }
        let mut rx = self.shared.state.subscribe();
        let first = match &*rx.borrow_and_update() {
            Published::Identity(messages) => (self.pick)(messages),
            Published::Withdrawn => return Err(no_identity()),
        };
        let guard = self.counted.then(|| OpenStream::new(&self.shared));
        let state = StreamState {
            rx,
            stop: self.shared.stop.clone(),
            pick: self.pick,
            first: Some(first),
            done: false,
            _guard: guard,
        };
        Ok(stream::unfold(state, next_message).boxed())
    }
}

struct StreamState<Resp> {
    rx: watch::Receiver<Published>,
    stop: CancellationToken,
    pick: fn(&Messages) -> Resp,
    first: Option<Resp>,
    done: bool,
    _guard: Option<OpenStream>,
}

/// The next message of a stream: the state at open, then each new one; ends after an error.
async fn next_message<Resp>(
    mut s: StreamState<Resp>,
) -> Option<(Result<Resp, Status>, StreamState<Resp>)> {
    if s.done {
        return None;
    }
    if let Some(first) = s.first.take() {
        return Some((Ok(first), s));
    }
    let item = tokio::select! {
        biased;
        () = s.stop.cancelled() => Err(stopped()),
        changed = s.rx.changed() => match changed {
            Err(_) => Err(stopped()),
            Ok(()) => match &*s.rx.borrow_and_update() {
                Published::Identity(messages) => Ok((s.pick)(messages)),
                Published::Withdrawn => Err(no_identity()),
            },
        },
    };
    s.done = item.is_err();
    Some((item, s))
}

fn no_identity() -> Status {
    Status::permission_denied(NO_IDENTITY_ISSUED)
}

fn stopped() -> Status {
    Status::unavailable("the Workload API is stopping")
}

/// Counts an open `FetchX509SVID` stream while alive.
struct OpenStream(Arc<Shared>);

impl OpenStream {
    fn new(shared: &Arc<Shared>) -> OpenStream {
        shared.open_svid_streams.fetch_add(1, Ordering::SeqCst);
        OpenStream(Arc::clone(shared))
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open_svid_streams.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn trust_domain_ids() {
        assert_eq!(trust_domain_id("example.org"), "spiffe://example.org");
        assert_eq!(
            trust_domain_id("spiffe://example.org"),
            "spiffe://example.org"
        );
        assert_eq!(
            trust_domain_of("spiffe://example.org/edge/n1").as_deref(),
            Some("spiffe://example.org")
        );
        assert_eq!(
            trust_domain_of("spiffe://example.org").as_deref(),
            Some("spiffe://example.org")
        );
        assert_eq!(trust_domain_of("spiffe:///x"), None);
        assert_eq!(trust_domain_of("https://example.org/x"), None);
    }

    #[test]
    fn messages_carry_the_update() {
        let ca = TestCa::new("example.org").unwrap();
        let ca2 = TestCa::new("example.org").unwrap();
        let fed = TestCa::new("example.com").unwrap();
        let svid = ca
            .mint(&ca.id("/edge/n1"), Duration::from_secs(3600))
            .unwrap();
        let update =
            X509Update::single(&svid, &[&ca, &ca2, &ca]).with_federated("example.com", &[&fed]);
        assert_eq!(update.svids[0].bundle_der.len(), 2, "duplicates dropped");
        let m = Messages::new(&update);
        let s = &m.svids.svids[0];
        assert_eq!(s.spiffe_id, "spiffe://example.org/edge/n1");
        assert_eq!(s.x509_svid.as_ref(), svid.chain_der[0].as_ref());
        assert_eq!(s.x509_svid_key.as_ref(), svid.key_pkcs8_der.as_slice());
        assert_eq!(
            s.bundle.as_ref(),
            [ca.bundle_der().as_ref(), ca2.bundle_der().as_ref()].concat()
        );
        assert_eq!(
            m.svids.federated_bundles["spiffe://example.com"].as_ref(),
            fed.bundle_der().as_ref()
        );
        assert_eq!(m.bundles.bundles.len(), 2);
        assert_eq!(m.bundles.bundles["spiffe://example.org"], s.bundle);

        // The wire form round-trips.
        let decoded = pb::X509SvidResponse::decode(m.svids.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, m.svids);
    }
}
