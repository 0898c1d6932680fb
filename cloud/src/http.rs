//! The HTTP listener of the hub's API: bounded, so that clients that connect and never finish
//! a request cannot take it (or the process's file descriptors) away from everyone else.
//!
//! - **Connection cap** ([`HttpLimits::max_connections`]). When every slot is taken, the oldest
//!   connection that has not yet sent a complete request head is closed to make room (a flood
//!   of half-open or half-sent requests cannot lock out a health probe); if every connection
//!   has sent a request (busy SSE streams, say), the new one is closed at once. Both are
//!   counted in `edgesync_hub_http_connections_closed_total{reason}` and logged (at most once
//!   every 10 s).
//! - **Request heads** must arrive within [`HttpLimits::head_timeout`], also between requests
//!   on a kept-alive connection, and hold at most [`MAX_HEAD_BYTES`]; larger heads get
//!   `431`.
//! - **Bodies and handlers**: the API's routes bound bodies and the time to produce a response
//!   (`api::router`); an SSE stream, once started, is not bounded in time.
//! - **Accept errors** (out of file descriptors) are logged and retried after 100 ms instead of
//!   spinning.
//! - **Shutdown**: requests in progress get up to 5 s to finish.
//! - **TLS** (optional, [`serve_with`] and [`TlsCert`]): the handshake runs in the connection's
//!   own task, must finish within [`HttpLimits::head_timeout`] (then the first request head has
//!   that time again), and a connection still in its handshake has sent no request, so the cap
//!   may close it to make room. A handshake that fails or times out closes the connection and is
//!   counted in `edgesync_hub_http_connections_closed_total{reason}` (`tls_handshake_failed`,
//!   `tls_handshake_timeout`). New handshakes present the certificate [`TlsCert`] holds at that
//!   moment, so a reloaded certificate needs no restart.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Most bytes of a request head.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Default of [`HttpLimits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default of [`HttpLimits::head_timeout`].
pub const DEFAULT_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long requests in progress may take to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Bounds of the HTTP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Time allowed for a request head to arrive (from the connection's start, or from the end
    /// of the previous response on a kept-alive connection).
    pub head_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            head_timeout: DEFAULT_HEAD_TIMEOUT,
        }
    }
}

/// `[api] tls_cert` and `tls_key`: the PEM files of the API's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// The leaf's private key (PEM, e.g. PKCS#8).
    pub key: PathBuf,
}

/// Parses the API's certificate chain and key (the bytes of [`TlsFiles`]) and checks that the
/// key belongs to the leaf certificate. The error names the field and the file at fault.
pub fn certified_key(
    files: &TlsFiles,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, String> {
    let cert_err = |why: String| format!("tls_cert {}: {why}", files.cert.display());
    let key_err = |why: String| format!("tls_key {}: {why}", files.key.display());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(cert_err("holds no PEM certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| key_err(format!("not a PEM private key: {e}")))?;
    let provider = edgesync_protocol::tls::provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| key_err(format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(key_err(format!(
                "the private key does not belong to the first certificate of tls_cert {}",
                files.cert.display()
            )))
        }
        Err(e) => Err(cert_err(format!(
            "cannot check the first certificate against tls_key: {e}"
        ))),
    }
}

/// The API's certificate and key, replaceable while the hub runs: each TLS handshake presents
/// the one held at that moment (a rustls certificate resolver).
pub struct TlsCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for TlsCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCert").finish_non_exhaustive()
    }
}

impl TlsCert {
    /// Holds `key` (from [`certified_key`]).
    pub fn new(key: CertifiedKey) -> TlsCert {
        TlsCert {
            current: RwLock::new(Arc::new(key)),
        }
    }

    /// Replaces the certificate: new handshakes present `key`.
    pub fn set(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
    }

    /// The certificate presented now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A rustls server configuration (TLS 1.3 and 1.2, ring, ALPN `http/1.1`, no client
    /// certificates) presenting this certificate.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, String> {
        let mut config =
            rustls::ServerConfig::builder_with_provider(edgesync_protocol::tls::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("tls: {e}"))?
                .with_no_client_auth()
                .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl rustls::server::ResolvesServerCert for TlsCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// One open connection, as the cap sees it.
struct Slot {
    /// Set once the connection has sent a complete request head.
    served: Arc<AtomicBool>,
    /// Closes the connection.
    close: CancellationToken,
}

/// The open connections, oldest first (ids only grow).
#[derive(Default)]
struct Slots {
    open: Mutex<BTreeMap<u64, Slot>>,
}

enum Admit {
    Yes,
    /// Room was made by closing a connection that had not sent a request yet.
    Evicted,
    No,
}

impl Slots {
    fn admit(&self, id: u64, slot: Slot, max: usize) -> Admit {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let mut how = Admit::Yes;
        if open.len() >= max {
            let idle = open
                .iter()
                .find(|(_, s)| !s.served.load(Ordering::Acquire))
                .map(|(id, _)| *id);
            match idle.and_then(|id| open.remove(&id)) {
                Some(victim) => {
                    victim.close.cancel();
                    how = Admit::Evicted;
                }
                None => return Admit::No,
            }
        }
        open.insert(id, slot);
        how
    }

    fn release(&self, id: u64) {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }
}

/// Logs at most once per interval (a flood must not flood the log too).
struct Throttle {
    last: Mutex<Option<Instant>>,
}

impl Throttle {
    fn ready(&self) -> bool {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        match *last {
            Some(t) if t.elapsed() < Duration::from_secs(10) => false,
            _ => {
                *last = Some(Instant::now());
                true
            }
        }
    }
}

/// Serves `app` over plain HTTP on `listener` until `cancel`, within `limits`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    cancel: CancellationToken,
) {
    serve_with(listener, app, limits, None, cancel).await;
}

/// Serves `app` on `listener` until `cancel`, within `limits`: over TLS with `tls` (see the
/// module docs), else plain HTTP.
pub async fn serve_with(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
    cancel: CancellationToken,
) {
    let acceptor = tls.map(TlsAcceptor::from);
    let slots = Arc::new(Slots::default());
    let throttle = Throttle {
        last: Mutex::new(None),
    };
    let max = limits.max_connections.max(1);
    let mut next_id = 0u64;
    loop {
        let (stream, remote) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    metrics::counter!("edgesync_hub_http_accept_errors_total").increment(1);
                    if throttle.ready() {
                        tracing::warn!(error = %e, "http: accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        next_id += 1;
        let id = next_id;
        let served = Arc::new(AtomicBool::new(false));
        let close = CancellationToken::new();
        let slot = Slot {
            served: served.clone(),
            close: close.clone(),
        };
        match slots.admit(id, slot, max) {
            Admit::Yes => {}
            Admit::Evicted => {
                metrics::counter!("edgesync_hub_http_connections_closed_total", "reason" => "evicted_without_request").increment(1);
                if throttle.ready() {
                    tracing::warn!(%remote, max, "http: every connection slot is taken; closing the oldest connection that has not sent a request");
                }
            }
            Admit::No => {
                metrics::counter!("edgesync_hub_http_connections_closed_total", "reason" => "limit")
                    .increment(1);
                if throttle.ready() {
                    tracing::warn!(%remote, max, "http: every connection slot is taken by a connection with a request; refusing a new one");
                }
                drop(stream);
                continue;
            }
        }
        let _ = stream.set_nodelay(true);
        let conn = Conn {
            app: app.clone(),
            served,
            limits,
            shutdown: cancel.clone(),
            close,
        };
        let (acceptor, slots) = (acceptor.clone(), slots.clone());
        tokio::spawn(async move {
            match acceptor {
                None => conn.serve(stream).await,
                Some(acceptor) => {
                    if let Some(tls) = conn.handshake(&acceptor, stream).await {
                        conn.serve(tls).await;
                    }
                }
            }
            slots.release(id);
        });
    }
}

/// What one connection's task needs.
struct Conn {
    app: Router,
    /// Set once the connection has sent a complete request head.
    served: Arc<AtomicBool>,
    limits: HttpLimits,
    /// The listener stops.
    shutdown: CancellationToken,
    /// The cap closes this connection.
    close: CancellationToken,
}

impl Conn {
    /// The TLS handshake, within the head timeout; `None` if it failed, timed out, or the
    /// connection was closed meanwhile.
    async fn handshake(
        &self,
        acceptor: &TlsAcceptor,
        stream: TcpStream,
    ) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
        let remote = stream.peer_addr().ok();
        let accept = tokio::time::timeout(self.limits.head_timeout, acceptor.accept(stream));
        let reason = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return None,
            // Evicted to make room.
            _ = self.close.cancelled() => return None,
            r = accept => match r {
                Ok(Ok(tls)) => return Some(tls),
                Ok(Err(e)) => {
                    tracing::debug!(?remote, error = %e, "http: TLS handshake failed");
                    "tls_handshake_failed"
                }
                Err(_) => {
                    tracing::debug!(?remote, "http: TLS handshake not finished in time");
                    "tls_handshake_timeout"
                }
            },
        };
        metrics::counter!("edgesync_hub_http_connections_closed_total", "reason" => reason)
            .increment(1);
        None
    }

    /// Serves HTTP/1.1 on `io` until the client is done, the cap closes it, or shutdown (with
    /// [`SHUTDOWN_GRACE`] for requests in progress).
    async fn serve<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            app,
            served,
            limits,
            shutdown,
            close,
        } = self;
        let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            served.store(true, Ordering::Release);
            app.clone().oneshot(req)
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(limits.head_timeout)
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
        tokio::pin!(conn);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await;
            }
            // Evicted to make room.
            _ = close.cancelled() => {}
            _ = conn.as_mut() => {}
        }
    }
}

/// Certificates and a TLS client for tests (here and in `api`).
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod test_tls {
    use std::net::SocketAddr;
    use std::time::Duration;

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::pki_types::{CertificateDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// A new CA and a server certificate it signed for `127.0.0.1` and `localhost`.
    pub(crate) struct Minted {
        /// The CA certificate (what a client trusts).
        pub ca: CertificateDer<'static>,
        /// The server's certificate, PEM.
        pub cert_pem: String,
        /// Its key, PKCS#8 PEM.
        pub key_pem: String,
        /// The server's certificate, DER.
        pub leaf: CertificateDer<'static>,
    }

    pub(crate) fn mint() -> Minted {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        Minted {
            ca: ca.der().clone(),
            cert_pem: leaf.pem(),
            key_pem: key.serialize_pem(),
            leaf: leaf.der().clone(),
        }
    }

    /// A TLS client trusting only `ca`.
    pub(crate) fn client(ca: &CertificateDer<'static>) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).unwrap();
        let config =
            rustls::ClientConfig::builder_with_provider(edgesync_protocol::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
    }

    /// GET `path` over TLS (the server must be `127.0.0.1`); the response's status line, or
    /// why there is none.
    pub(crate) async fn https_get(
        addr: SocketAddr,
        client: &tokio_rustls::TlsConnector,
        path: &str,
    ) -> Result<String, String> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::IpAddress(addr.ip().into());
        let mut tls = tokio::time::timeout(Duration::from_secs(5), client.connect(name, tcp))
            .await
            .map_err(|_| "handshake timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        tls.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await;
        Ok(String::from_utf8_lossy(&buf)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::net::SocketAddr;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    async fn start(limits: HttpLimits) -> (SocketAddr, CancellationToken) {
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            // A response that never comes (stands for a long event stream).
            .route("/hang", get(std::future::pending::<&'static str>));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(serve(listener, app, limits, cancel.clone()));
        (addr, cancel)
    }

    /// Sends a complete GET and returns the status line (empty if the server closed first).
    async fn get_status(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        if s.write_all(req.as_bytes()).await.is_err() {
            return String::new();
        }
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        String::from_utf8_lossy(&buf)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned()
    }

    /// Whether the server closes `s` within `within` (reads until EOF or a reset).
    async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 1024];
        tokio::time::timeout(within, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    #[tokio::test]
    async fn a_flood_of_unfinished_request_heads_cannot_lock_out_a_probe() {
        let limits = HttpLimits {
            max_connections: 8,
            head_timeout: Duration::from_secs(60),
        };
        let (addr, cancel) = start(limits).await;
        // Fifty clients that start a request and never finish it: far more than the slots.
        let mut flood = Vec::new();
        for _ in 0..50 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
            flood.push(s);
        }
        // A probe still gets in, every time, long before the head timeout.
        for _ in 0..5 {
            assert_eq!(get_status(addr, "/healthz").await, "HTTP/1.1 200 OK");
        }
        // The oldest of the flood were closed to make room; the newest 8 at most are open.
        let mut closed = 0;
        for s in &mut flood {
            if closed_within(s, Duration::from_millis(200)).await {
                closed += 1;
            }
        }
        assert!(
            closed >= 50 - 8,
            "only {closed} of 50 unfinished connections were closed"
        );
        cancel.cancel();
    }

    #[tokio::test]
    async fn connections_that_have_a_request_in_progress_are_not_evicted() {
        let limits = HttpLimits {
            max_connections: 3,
            head_timeout: Duration::from_secs(60),
        };
        let (addr, cancel) = start(limits).await;
        let mut busy = Vec::new();
        for _ in 0..3 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            busy.push(s);
        }
        // Let the server read the three heads.
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Every slot holds a request: a newcomer is closed without an answer...
        assert_eq!(get_status(addr, "/healthz").await, "");
        // ...and the busy ones are still open.
        for s in &mut busy {
            assert!(!closed_within(s, Duration::from_millis(100)).await);
        }
        // Once one ends, there is room again.
        drop(busy.pop());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(get_status(addr, "/healthz").await, "HTTP/1.1 200 OK");
        cancel.cancel();
    }

    #[tokio::test]
    async fn request_heads_must_arrive_in_time_also_on_a_kept_alive_connection() {
        let limits = HttpLimits {
            max_connections: 8,
            head_timeout: Duration::from_millis(500),
        };
        let (addr, cancel) = start(limits).await;
        // A head that never ends is closed after the timeout.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        let started = Instant::now();
        assert!(closed_within(&mut slow, Duration::from_secs(3)).await);
        assert!(started.elapsed() >= Duration::from_millis(400));
        // A connection that said nothing at all, too.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut silent, Duration::from_secs(3)).await);
        // A kept-alive connection gets its answer, then is closed when idle too long.
        let mut kept = TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = kept.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200 OK"));
        assert!(closed_within(&mut kept, Duration::from_secs(3)).await);
        cancel.cancel();
    }

    #[tokio::test]
    async fn an_oversized_request_head_is_refused_with_431() {
        let (addr, cancel) = start(HttpLimits::default()).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let big = "a".repeat(MAX_HEAD_BYTES * 2);
        let req = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
        // The server may close before reading it all.
        let _ = s.write_all(req.as_bytes()).await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf);
        assert!(
            text.starts_with("HTTP/1.1 431"),
            "got {:?}",
            text.lines().next()
        );
        // Garbage instead of HTTP: answered 400 and closed, and the server goes on.
        let mut g = TcpStream::connect(addr).await.unwrap();
        g.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), g.read_to_end(&mut buf)).await;
        assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 400"));
        assert_eq!(get_status(addr, "/healthz").await, "HTTP/1.1 200 OK");
        cancel.cancel();
    }

    // ---- TLS ----

    use super::test_tls::{client, https_get, mint};

    fn files() -> TlsFiles {
        TlsFiles {
            cert: "/etc/hub/api.crt".into(),
            key: "/etc/hub/api.key".into(),
        }
    }

    async fn start_tls(limits: HttpLimits, cert: Arc<TlsCert>) -> (SocketAddr, CancellationToken) {
        let app = Router::new().route("/healthz", get(|| async { "ok\n" }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let config = cert.server_config().unwrap();
        tokio::spawn(serve_with(
            listener,
            app,
            limits,
            Some(config),
            cancel.clone(),
        ));
        (addr, cancel)
    }

    #[test]
    fn unusable_certificate_files_are_named_in_the_error() {
        let a = mint();
        let b = mint();
        let f = files();
        assert!(certified_key(&f, a.cert_pem.as_bytes(), a.key_pem.as_bytes()).is_ok());
        let e = certified_key(&f, b"not pem", a.key_pem.as_bytes()).unwrap_err();
        assert_eq!(e, "tls_cert /etc/hub/api.crt: holds no PEM certificate");
        let e = certified_key(&f, a.cert_pem.as_bytes(), b"").unwrap_err();
        assert!(
            e.starts_with("tls_key /etc/hub/api.key: not a PEM private key"),
            "{e}"
        );
        // The key of another certificate (files caught in the middle of a rotation).
        let e = certified_key(&f, a.cert_pem.as_bytes(), b.key_pem.as_bytes()).unwrap_err();
        assert_eq!(
            e,
            "tls_key /etc/hub/api.key: the private key does not belong to the first certificate of tls_cert /etc/hub/api.crt"
        );
        // A certificate where the key should be.
        let e = certified_key(&f, a.cert_pem.as_bytes(), a.cert_pem.as_bytes()).unwrap_err();
        assert!(e.starts_with("tls_key /etc/hub/api.key: "), "{e}");
    }

    #[tokio::test]
    async fn https_is_served_and_new_handshakes_get_a_replaced_certificate() {
        let a = mint();
        let b = mint();
        let f = files();
        let cert = Arc::new(TlsCert::new(
            certified_key(&f, a.cert_pem.as_bytes(), a.key_pem.as_bytes()).unwrap(),
        ));
        let (addr, cancel) = start_tls(HttpLimits::default(), cert.clone()).await;
        let (trusts_a, trusts_b) = (client(&a.ca), client(&b.ca));
        assert_eq!(
            https_get(addr, &trusts_a, "/healthz").await.unwrap(),
            "HTTP/1.1 200 OK"
        );
        let refused = https_get(addr, &trusts_b, "/healthz").await.unwrap_err();
        assert!(refused.contains("invalid peer certificate"), "{refused}");
        // Plain HTTP on the TLS port gets no HTTP answer.
        let plain = get_status(addr, "/healthz").await;
        assert!(!plain.starts_with("HTTP/"), "{plain:?}");

        cert.set(certified_key(&f, b.cert_pem.as_bytes(), b.key_pem.as_bytes()).unwrap());
        assert_eq!(cert.current().cert[0], b.leaf);
        assert_eq!(
            https_get(addr, &trusts_b, "/healthz").await.unwrap(),
            "HTTP/1.1 200 OK"
        );
        // (A fresh client: `trusts_a` would resume its earlier session, which needs no
        // certificate.)
        assert!(https_get(addr, &client(&a.ca), "/healthz").await.is_err());
        cancel.cancel();
    }

    #[tokio::test]
    async fn tls_handshakes_are_bounded_by_the_head_timeout_and_the_cap() {
        let a = mint();
        let cert = Arc::new(TlsCert::new(
            certified_key(&files(), a.cert_pem.as_bytes(), a.key_pem.as_bytes()).unwrap(),
        ));
        let limits = HttpLimits {
            max_connections: 4,
            head_timeout: Duration::from_millis(500),
        };
        let (addr, cancel) = start_tls(limits, cert).await;
        let trusts_a = client(&a.ca);
        // A client that opens TCP and never sends a ClientHello is closed after the timeout...
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        // ...while the others are served.
        assert_eq!(
            https_get(addr, &trusts_a, "/healthz").await.unwrap(),
            "HTTP/1.1 200 OK"
        );
        assert!(closed_within(&mut silent, Duration::from_secs(3)).await);
        assert!(started.elapsed() >= Duration::from_millis(400));
        // Half a ClientHello, the same.
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            .await
            .unwrap();
        assert!(closed_within(&mut half, Duration::from_secs(3)).await);

        // More silent clients than slots, with a long timeout: a probe still gets in, because a
        // connection in its handshake has sent no request and is closed to make room.
        cancel.cancel();
        let cert = Arc::new(TlsCert::new(
            certified_key(&files(), a.cert_pem.as_bytes(), a.key_pem.as_bytes()).unwrap(),
        ));
        let limits = HttpLimits {
            max_connections: 4,
            head_timeout: Duration::from_secs(60),
        };
        let (addr, cancel) = start_tls(limits, cert).await;
        let mut flood = Vec::new();
        for _ in 0..20 {
            flood.push(TcpStream::connect(addr).await.unwrap());
        }
        for _ in 0..3 {
            assert_eq!(
                https_get(addr, &trusts_a, "/healthz").await.unwrap(),
                "HTTP/1.1 200 OK"
            );
        }
        let mut closed = 0;
        for s in &mut flood {
            if closed_within(s, Duration::from_millis(200)).await {
                closed += 1;
            }
        }
        assert!(
            closed >= 20 - 4,
            "only {closed} of 20 silent connections were closed"
        );
        cancel.cancel();
    }
}
