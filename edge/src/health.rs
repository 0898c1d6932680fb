//! The agent's HTTP endpoint (`[metrics] listen`): Prometheus metrics, liveness and readiness.
//!
//! - `GET /metrics`: the Prometheus text format.
//! - `GET /healthz`: `200` while the process serves requests.
//! - `GET /readyz`: `200 ready`, or `503` with the reason: the outbox store cannot write (a full
//!   disk, an I/O error), with how many records are held in memory meanwhile.
//!
//! It faces the local network, so it is bounded: at most [`MAX_CONNECTIONS`] at once (more are
//! closed at once), request heads of at most [`MAX_HEAD_BYTES`], read within
//! [`HEAD_TIMEOUT`], and every connection closed after [`CONNECTION_LIFETIME`].

use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Most bytes of a request head.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Time allowed to send a request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed after this long, whatever it does.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// Whether the agent is ready, and why not. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct Health {
    unready: Arc<Mutex<Option<String>>>,
}

impl Health {
    /// A ready state.
    pub fn new() -> Health {
        Health::default()
    }

    /// Marks the agent not ready, for `reason`.
    pub fn set_unready(&self, reason: String) {
        metrics::gauge!("edgesync_agent_ready").set(0.0);
        *self.unready.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
    }

    /// Marks the agent ready.
    pub fn set_ready(&self) {
        metrics::gauge!("edgesync_agent_ready").set(1.0);
        *self.unready.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Why the agent is not ready (`None` when it is).
    pub fn unready(&self) -> Option<String> {
        self.unready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Serves the endpoint on `listener` until `cancel`.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    health: Health,
    cancel: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("edgesync_http_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        let (metrics, health, cancel) = (metrics.clone(), health.clone(), cancel.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let io = hyper_util::rt::TokioIo::new(stream);
            let svc = hyper::service::service_fn(move |req| {
                let r = respond(&req, &metrics, &health);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(io, svc);
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::timeout(CONNECTION_LIFETIME, conn) => {}
            }
        });
    }
}

fn respond(
    req: &Request<Incoming>,
    metrics: &PrometheusHandle,
    health: &Health,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let mut r = text(StatusCode::OK, metrics.render());
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match health.unready() {
            None => text(StatusCode::OK, "ready\n".into()),
            Some(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
        },
        other => text(
            StatusCode::NOT_FOUND,
            format!("no such path {other:?}; try /metrics, /healthz or /readyz\n"),
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    async fn start() -> (std::net::SocketAddr, Health, CancellationToken) {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Health::new();
        let cancel = CancellationToken::new();
        tokio::spawn(serve(listener, handle, health.clone(), cancel.clone()));
        (addr, health, cancel)
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        out
    }

    #[tokio::test]
    async fn readyz_follows_the_health_state_and_paths_are_checked() {
        let (addr, health, cancel) = start().await;
        let r = get(addr, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 200") && r.ends_with("ready\n"),
            "{r}"
        );
        health.set_unready("outbox store cannot write: No space left on device".into());
        let r = get(addr, "/readyz").await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(
            r.contains("not ready: outbox store cannot write: No space left"),
            "{r}"
        );
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        health.set_ready();
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let r = get(addr, "/metrics").await;
        assert!(
            r.starts_with("HTTP/1.1 200") && r.contains("version=0.0.4"),
            "{r}"
        );
        let r = get(addr, "/nope").await;
        assert!(
            r.starts_with("HTTP/1.1 404") && r.contains("/readyz"),
            "{r}"
        );
        cancel.cancel();
    }

    #[tokio::test]
    async fn hostile_clients_do_not_starve_the_endpoint() {
        let (addr, _health, cancel) = start().await;
        // A head far beyond the limit is refused, not buffered.
        let mut big = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "GET /readyz HTTP/1.1\r\nx: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES * 4)
        );
        let _ = big.write_all(head.as_bytes()).await;
        let mut out = vec![];
        let _ = tokio::time::timeout(Duration::from_secs(5), big.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(!text.contains("200 OK"), "{text}");
        // Garbage gets an error or a closed connection, never a hang.
        let mut junk = TcpStream::connect(addr).await.unwrap();
        junk.write_all(b"\x00\x01\x02 not http\r\n\r\n")
            .await
            .unwrap();
        let mut out = vec![];
        tokio::time::timeout(Duration::from_secs(5), junk.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        // Slow clients holding every slot without sending a head: the slots are freed once
        // their head times out, and the endpoint answers again.
        let mut idle = vec![];
        for _ in 0..MAX_CONNECTIONS + 8 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let started = tokio::time::Instant::now();
        let r = loop {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let _ = s
                .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await;
            let mut out = String::new();
            let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut out)).await;
            if out.starts_with("HTTP/1.1 200") {
                break out;
            }
            assert!(
                started.elapsed() < HEAD_TIMEOUT * 3,
                "the endpoint did not recover from idle connections"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(r.ends_with("ok\n"));
        drop(idle);
        cancel.cancel();
    }
}
