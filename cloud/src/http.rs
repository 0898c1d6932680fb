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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use tokio::net::TcpListener;
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

/// Serves `app` on `listener` until `cancel`, within `limits`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    cancel: CancellationToken,
) {
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
        let (app, slots) = (app.clone(), slots.clone());
        let shutdown = cancel.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                served.store(true, Ordering::Release);
                app.clone().oneshot(req)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.head_timeout)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
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
            slots.release(id);
        });
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
}
