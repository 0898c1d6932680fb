//! The hub's HTTP API (axum): health, readiness, Prometheus metrics, nodes, devices and twins,
//! desired values, and the event stream.
//!
//! `docs/api.md` describes every route with examples; this is the short version.
//!
//! - `/healthz`, `/readyz` and `/metrics` need no credentials.
//! - Everything under `/api/v1` needs `Authorization: Bearer <token>` with a configured token
//!   (compared in constant time): 401 with `WWW-Authenticate: Bearer` otherwise. Both roles may
//!   read (`GET`, `HEAD`); any other method from a read-only token is refused with 403 before
//!   the path or the body is looked at.
//! - Tokens given by `token_file`, and the listener's TLS certificate, are read again on
//!   [`ApiAccess::reload`] (SIGHUP, and every [`ACCESS_CHECK_INTERVAL`]): a usable new secret
//!   replaces the old one at once, an unusable file keeps the previous secret (see
//!   [`ApiAccess`]).
//! - Reads: `GET /api/v1/nodes`, `/nodes/{node}`, `/nodes/{node}/gaps` (records lost at the
//!   edge), `/nodes/{node}/records?from=&limit=` (the stored history, in pages),
//!   `/nodes/{node}/devices`, `/nodes/{node}/devices/{device}`,
//!   `/nodes/{node}/devices/{device}/twin`.
//! - `PATCH /api/v1/nodes/{node}/devices/{device}/twin/desired` with `{prop: value, ...}` (admin):
//!   checked against the device's schema, all or nothing; answers `{"versions": {prop: version}}`.
//! - `GET /api/v1/events`: server-sent events, resumable with `Last-Event-ID` (or the
//!   `last_event_id` query parameter).
//!
//! Errors are JSON `{"error": "..."}` (422 adds `"fields": {prop: message}`): 400 for malformed
//! ids (the message names the field) and bodies, 401, 403, 404 for unknown routes, nodes and
//! devices, 405, 413 above [`MAX_BODY_BYTES`], 415 for a body that is not declared JSON, 422
//! for values the schema refuses, 503 when the store fails, 408 when a request takes longer
//! than [`REQUEST_TIMEOUT`] (a body sent too slowly). Client input never causes a 5xx.
//! Every response is counted by route pattern and status. The listener's own bounds
//! (connections, request heads) are in [`crate::http`].
//!
//! # Event stream invariants
//!
//! - A subscriber resuming from an id gets the buffered events after it (preceded by `resync`
//!   if some are gone, see [`crate::events`]), then live ones, with no gap and no duplicate: the
//!   bus snapshots its buffer and subscribes under one lock, and live events with an id at or
//!   below the last one sent are skipped anyway.
//! - A subscriber never slows the hub and never holds more than the bus's buffer: publishing
//!   never waits for readers, and a reader that falls more than the channel's capacity behind
//!   gets a `resync` event (its id just below the next event's) and continues from there.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{
    DefaultBodyLimit, Extension, FromRequest, MatchedPath, Path, Query, Request, State,
};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch};
use axum::{Json, Router};
use edgesync_protocol::{DeviceId, NodeId, PropertyId, Value};
use futures_util::Stream;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;

use crate::events::Event;
use crate::http::{TlsCert, TlsFiles};
use crate::store::{DesiredError, HubStore, StoreError};
use crate::telemetry::{self, AuthFailure};

/// Largest request body accepted, in bytes (413 above).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Idle time after which the event stream sends a keep-alive comment.
pub const SSE_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read everything and change desired values and configs.
    Admin,
    /// Read everything, change nothing.
    ReadOnly,
}

/// A configured API token.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken {
    /// A name for logs (never the secret).
    pub name: String,
    /// The secret presented as `Authorization: Bearer <token>`.
    pub token: String,
    /// What the token may do.
    pub role: Role,
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiToken")
            .field("name", &self.name)
            .field("token", &"<redacted>")
            .field("role", &self.role)
            .finish()
    }
}

/// The caller of an authenticated request (inserted into the request's extensions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name.
    pub name: String,
    /// The token's role.
    pub role: Role,
}

/// `[[api.tokens]] token_file`: a token whose secret is read from a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFile {
    /// The token's name.
    pub name: String,
    /// The file (resolved), holding the secret with surrounding whitespace trimmed.
    pub path: PathBuf,
}

/// The accepted tokens, replaceable while the hub runs. A request takes the current list
/// (a read lock held for an `Arc` clone), so a reload never waits for a request, nor the
/// reverse, beyond that.
pub struct ApiTokens {
    current: RwLock<Arc<Vec<ApiToken>>>,
}

impl fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ApiTokens").field(&self.current()).finish()
    }
}

impl ApiTokens {
    /// Accepts `tokens`.
    pub fn new(tokens: Vec<ApiToken>) -> ApiTokens {
        ApiTokens {
            current: RwLock::new(Arc::new(tokens)),
        }
    }

    /// The tokens accepted now.
    pub fn current(&self) -> Arc<Vec<ApiToken>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Gives the token `name` the secret `secret`, at once: the previous secret is refused from
    /// the next request on. `Ok(false)` if it already had it. Refused (nothing changes) if
    /// there is no such token or another token has that secret.
    pub fn set_secret(&self, name: &str, secret: &str) -> Result<bool, String> {
        let mut guard = self.current.write().unwrap_or_else(PoisonError::into_inner);
        let Some(i) = guard.iter().position(|t| t.name == name) else {
            return Err(format!("no token is named {name:?}"));
        };
        if guard[i].token == secret {
            return Ok(false);
        }
        if let Some(other) = guard
            .iter()
            .find(|t| t.name != name && constant_time_eq(t.token.as_bytes(), secret.as_bytes()))
        {
            return Err(format!(
                "the same secret is already used by token {:?}",
                other.name
            ));
        }
        let mut tokens = Vec::clone(&guard);
        tokens[i].token = secret.to_owned();
        *guard = Arc::new(tokens);
        Ok(true)
    }
}

/// API token secrets replaced by a reload of their `token_file`.
pub const TOKEN_RELOADS_TOTAL: &str = "edgesync_hub_api_token_reloads_total";
/// Token files found unusable by a reload (the token kept its previous secret).
pub const TOKEN_RELOAD_ERRORS_TOTAL: &str = "edgesync_hub_api_token_reload_errors_total";
/// Certificates of the API's TLS listener replaced by a reload of `tls_cert`/`tls_key`.
pub const TLS_RELOADS_TOTAL: &str = "edgesync_hub_api_tls_reloads_total";
/// TLS files found unusable by a reload (the previous certificate stays).
pub const TLS_RELOAD_ERRORS_TOTAL: &str = "edgesync_hub_api_tls_reload_errors_total";

/// How often the hub reads its token files and TLS files (see [`ApiAccess::watch`]).
pub const ACCESS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A periodic check logs unusable files once it has found the same content this many times in a
/// row (a file being rewritten is unusable for a moment); a SIGHUP logs at once.
pub const RELOAD_ERROR_AFTER: u32 = 3;

/// Largest token or PEM file read (a path pointing at something else must not make the hub read
/// it whole every second).
pub const MAX_ACCESS_FILE_BYTES: u64 = 1 << 20;

/// What asked for [`ApiAccess::reload`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP: every unusable file is logged (and counted) at once.
    Signal,
    /// The periodic check: an unusable file is logged (and counted) once the same content was
    /// found [`RELOAD_ERROR_AFTER`] checks in a row.
    Watch,
}

/// What one [`ApiAccess::reload`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reloaded {
    /// Tokens whose secret was replaced.
    pub tokens: usize,
    /// Whether the TLS certificate was replaced.
    pub tls: bool,
    /// Unusable files logged as errors.
    pub errors: usize,
}

/// The bytes of some files (or why one could not be read), as one reload read them.
type Snapshot = Vec<Result<Vec<u8>, String>>;

/// What a reload remembers of one token file, or of the TLS pair.
#[derive(Debug, Default)]
struct Tracked {
    /// The content in use (`None`: not known yet, for token files read by the config).
    loaded: Option<Snapshot>,
    /// Unusable content last found, and how many reloads in a row found it.
    failing: Option<(Snapshot, u32)>,
}

impl Tracked {
    /// Whether `snap` differs from the content in use (else nothing is to be done).
    fn differs(&mut self, snap: &Snapshot) -> bool {
        if self.loaded.as_ref() == Some(snap) {
            self.failing = None;
            return false;
        }
        true
    }

    fn used(&mut self, snap: Snapshot) {
        self.loaded = Some(snap);
        self.failing = None;
    }

    /// Records unusable content; whether to log it as an error now.
    fn failed(&mut self, snap: Snapshot, trigger: Trigger) -> bool {
        let mut seen = match self.failing.take() {
            Some((prev, n)) if prev == snap => n.saturating_add(1),
            _ => 1,
        };
        let report = trigger == Trigger::Signal || seen == RELOAD_ERROR_AFTER;
        if trigger == Trigger::Signal {
            // Logged now: the periodic check need not log the same content again.
            seen = seen.max(RELOAD_ERROR_AFTER);
        }
        self.failing = Some((snap, seen));
        report
    }
}

/// Reads at most [`MAX_ACCESS_FILE_BYTES`] of `path`.
fn read_access_file(path: &FsPath) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_ACCESS_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read it: {e}"))?;
    if bytes.len() as u64 > MAX_ACCESS_FILE_BYTES {
        return Err(format!("it is larger than {MAX_ACCESS_FILE_BYTES} bytes"));
    }
    Ok(bytes)
}

/// The secret in a token file's content, or what is wrong with it (the config's rules).
fn token_secret(content: &Result<Vec<u8>, String>) -> Result<String, String> {
    let bytes = content.as_ref().map_err(Clone::clone)?;
    let text = std::str::from_utf8(bytes).map_err(|_| "it is not UTF-8 text".to_owned())?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err("it is empty".to_owned());
    }
    match crate::config::secret_problem(secret) {
        Some(problem) => Err(format!("the token in it {problem}")),
        None => Ok(secret.to_owned()),
    }
}

/// The TLS side of [`ApiAccess`].
struct ApiTls {
    files: TlsFiles,
    cert: Arc<TlsCert>,
    config: Arc<rustls::ServerConfig>,
}

/// The API's credentials: its tokens and, optionally, its TLS certificate, kept current from
/// their files.
///
/// [`ApiAccess::reload`] reads every token file and the TLS pair; both SIGHUP
/// ([`Trigger::Signal`]) and the periodic check ([`ApiAccess::watch`]) call it.
///
/// - A token file whose content changed and holds a usable secret (the config's rules: at least
///   16 visible ASCII characters once trimmed, not another token's) replaces that token's
///   secret at once: the previous one is refused from the next request on. A missing, empty,
///   short or unreadable file keeps the previous secret, is logged as an error naming the token
///   and the file, and is counted ([`TOKEN_RELOAD_ERRORS_TOTAL`]). Inline `token`s never
///   change; other tokens are never affected.
/// - The TLS pair: a changed certificate chain and key that parse and belong together replace
///   the certificate for new handshakes; otherwise the previous certificate stays, with an
///   error logged and counted ([`TLS_RELOAD_ERRORS_TOTAL`]).
///
/// A request already admitted (an open event stream) is not ended by a reload.
pub struct ApiAccess {
    tokens: Arc<ApiTokens>,
    token_files: Vec<TokenFile>,
    tls: Option<ApiTls>,
    /// Per token file (in the order of `token_files`), then the TLS pair. The lock also
    /// serialises reloads.
    tracked: Mutex<(Vec<Tracked>, Tracked)>,
}

impl fmt::Debug for ApiAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiAccess")
            .field("tokens", &self.tokens)
            .field("token_files", &self.token_files)
            .field("tls", &self.tls.as_ref().map(|t| &t.files))
            .finish()
    }
}

impl ApiAccess {
    /// Tokens that never change, plain HTTP (what an embedded hub uses).
    pub fn fixed(tokens: Vec<ApiToken>) -> Arc<ApiAccess> {
        Arc::new(ApiAccess {
            tokens: Arc::new(ApiTokens::new(tokens)),
            token_files: Vec::new(),
            tls: None,
            tracked: Mutex::new((Vec::new(), Tracked::default())),
        })
    }

    /// `tokens` as the config read them, the secrets of `token_files` kept current from their
    /// files, and TLS with the certificate in `tls` (read here: an unusable pair is an error
    /// naming the field and the file).
    pub fn new(
        tokens: Vec<ApiToken>,
        token_files: Vec<TokenFile>,
        tls: Option<TlsFiles>,
    ) -> Result<Arc<ApiAccess>, String> {
        describe_metrics();
        let mut tracked_tls = Tracked::default();
        let tls = match tls {
            None => None,
            Some(files) => {
                let snap = vec![read_access_file(&files.cert), read_access_file(&files.key)];
                let key = tls_pair(&files, &snap)?;
                tracked_tls.used(snap);
                let cert = Arc::new(TlsCert::new(key));
                let config = cert.server_config()?;
                Some(ApiTls {
                    files,
                    cert,
                    config,
                })
            }
        };
        let tracked = token_files.iter().map(|_| Tracked::default()).collect();
        Ok(Arc::new(ApiAccess {
            tokens: Arc::new(ApiTokens::new(tokens)),
            token_files,
            tls,
            tracked: Mutex::new((tracked, tracked_tls)),
        }))
    }

    /// The tokens, for [`ApiState::tokens`].
    pub fn tokens(&self) -> Arc<ApiTokens> {
        self.tokens.clone()
    }

    /// The TLS configuration of the listener (`None`: plain HTTP).
    pub fn tls_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.tls.as_ref().map(|t| t.config.clone())
    }

    /// Whether there are files to keep reading.
    pub fn has_files(&self) -> bool {
        !self.token_files.is_empty() || self.tls.is_some()
    }

    /// Reads the token files and the TLS pair and uses what changed and is usable (see the
    /// type's docs). Blocking file I/O: call it off the async threads ([`ApiAccess::reload_async`]).
    pub fn reload(&self, trigger: Trigger) -> Reloaded {
        let mut done = Reloaded::default();
        let mut tracked = self.tracked.lock().unwrap_or_else(PoisonError::into_inner);
        let (files, tls_tracked) = &mut *tracked;
        for (file, t) in self.token_files.iter().zip(files.iter_mut()) {
            let snap = vec![read_access_file(&file.path)];
            if !t.differs(&snap) {
                continue;
            }
            let outcome = token_secret(&snap[0])
                .and_then(|secret| self.tokens.set_secret(&file.name, &secret));
            match outcome {
                Ok(changed) => {
                    t.used(snap);
                    if changed {
                        tracing::info!(
                            token = %file.name,
                            file = %file.path.display(),
                            "API token {:?} reloaded from {}: the previous secret is refused from now on",
                            file.name,
                            file.path.display()
                        );
                        metrics::counter!(TOKEN_RELOADS_TOTAL).increment(1);
                        done.tokens += 1;
                    }
                }
                Err(why) => {
                    if t.failed(snap, trigger) {
                        tracing::error!(
                            token = %file.name,
                            file = %file.path.display(),
                            "API token {:?}: token_file {} cannot be used ({why}); the token keeps its previous secret",
                            file.name,
                            file.path.display()
                        );
                        metrics::counter!(TOKEN_RELOAD_ERRORS_TOTAL).increment(1);
                        done.errors += 1;
                    }
                }
            }
        }
        if let Some(tls) = &self.tls {
            let snap = vec![
                read_access_file(&tls.files.cert),
                read_access_file(&tls.files.key),
            ];
            if tls_tracked.differs(&snap) {
                match tls_pair(&tls.files, &snap) {
                    Ok(key) => {
                        tls.cert.set(key);
                        tls_tracked.used(snap);
                        tracing::info!(
                            cert = %tls.files.cert.display(),
                            key = %tls.files.key.display(),
                            "API TLS certificate reloaded: new connections get the new certificate"
                        );
                        metrics::counter!(TLS_RELOADS_TOTAL).increment(1);
                        done.tls = true;
                    }
                    Err(why) => {
                        if tls_tracked.failed(snap, trigger) {
                            tracing::error!(
                                "API TLS files cannot be used ({why}); still presenting the previous certificate"
                            );
                            metrics::counter!(TLS_RELOAD_ERRORS_TOTAL).increment(1);
                            done.errors += 1;
                        }
                    }
                }
            }
        }
        done
    }

    /// [`ApiAccess::reload`] on a blocking thread (the files may sit on a slow mount). `None`
    /// if the runtime is shutting down.
    pub async fn reload_async(self: &Arc<Self>, trigger: Trigger) -> Option<Reloaded> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.reload(trigger))
            .await
            .ok()
    }

    /// Reloads ([`Trigger::Watch`]) every `interval` until `stop` (at once if there are no
    /// files to read).
    pub async fn watch(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        if !self.has_files() {
            return;
        }
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {
                    if self.reload_async(Trigger::Watch).await.is_none() {
                        return;
                    }
                }
            }
        }
    }
}

/// The certificate of a TLS snapshot (cert, key), or what is wrong, naming the field and file.
fn tls_pair(files: &TlsFiles, snap: &Snapshot) -> Result<rustls::sign::CertifiedKey, String> {
    let (Some(cert), Some(key)) = (snap.first(), snap.get(1)) else {
        return Err("internal: incomplete TLS snapshot".to_owned());
    };
    let cert = cert
        .as_ref()
        .map_err(|e| format!("tls_cert {}: {e}", files.cert.display()))?;
    let key = key
        .as_ref()
        .map_err(|e| format!("tls_key {}: {e}", files.key.display()))?;
    crate::http::certified_key(files, cert, key)
}

/// Describes the reload counters and registers them at 0, so that they are exported before
/// the first reload.
fn describe_metrics() {
    use metrics::{Unit, describe_counter};
    // The hub's recorder, installed first (`edgesync-hub run` builds this before the hub).
    let _ = telemetry::prometheus();
    describe_counter!(
        TOKEN_RELOADS_TOTAL,
        Unit::Count,
        "API token secrets replaced by a reload of their token_file"
    );
    describe_counter!(
        TOKEN_RELOAD_ERRORS_TOTAL,
        Unit::Count,
        "API token files found unusable by a reload (the token kept its previous secret)"
    );
    describe_counter!(
        TLS_RELOADS_TOTAL,
        Unit::Count,
        "API TLS certificates replaced by a reload of tls_cert and tls_key"
    );
    describe_counter!(
        TLS_RELOAD_ERRORS_TOTAL,
        Unit::Count,
        "API TLS files found unusable by a reload (the previous certificate stays)"
    );
    for name in [
        TOKEN_RELOADS_TOTAL,
        TOKEN_RELOAD_ERRORS_TOTAL,
        TLS_RELOADS_TOTAL,
        TLS_RELOAD_ERRORS_TOTAL,
    ] {
        metrics::counter!(name).increment(0);
    }
}

/// What the API handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The hub store.
    pub store: Arc<HubStore>,
    /// The accepted tokens (replaced by [`ApiAccess::reload`]).
    pub tokens: Arc<ApiTokens>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// Cancelled when the hub stops: open event streams end, so a graceful shutdown does not
    /// wait for their clients to hang up.
    pub shutdown: CancellationToken,
}

impl fmt::Debug for ApiState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiState")
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

/// Builds the API router (state applied; serve it with [`crate::http::serve`]).
pub fn router(state: ApiState) -> Router {
    router_with_timeout(state, REQUEST_TIMEOUT)
}

/// [`router`] with another time limit per request than [`REQUEST_TIMEOUT`].
pub fn router_with_timeout(state: ApiState, request_timeout: Duration) -> Router {
    // The 405 fallback is set before the auth layer, so it is behind it: a stranger learns
    // nothing about which methods a route has.
    let api = Router::new()
        .route("/api/v1/nodes", get(list_nodes))
        .route("/api/v1/nodes/{node}", get(get_node))
        .route("/api/v1/nodes/{node}/gaps", get(get_gaps))
        .route("/api/v1/nodes/{node}/records", get(get_records))
        .route("/api/v1/nodes/{node}/devices", get(list_devices))
        .route("/api/v1/nodes/{node}/devices/{device}", get(get_device))
        .route("/api/v1/nodes/{node}/devices/{device}/twin", get(get_twin))
        .route(
            "/api/v1/nodes/{node}/devices/{device}/twin/desired",
            patch(set_desired).layer(DefaultBodyLimit::max(MAX_BODY_BYTES)),
        )
        .route("/api/v1/nodes/{node}/alarms", get(get_alarms))
        .route("/api/v1/nodes/{node}/rule-outputs", get(get_rule_outputs))
        .route(
            "/api/v1/nodes/{node}/alarms/{rule}/{device}/ack",
            axum::routing::post(ack_alarm),
        )
        .route("/api/v1/events", get(events))
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let open = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .method_not_allowed_fallback(method_not_allowed);
    open.merge(api)
        .fallback(not_found)
        .layer(middleware::from_fn(move |req, next| {
            bounded_time(req, next, request_timeout)
        }))
        .layer(middleware::from_fn(count_requests))
        .with_state(state)
}

/// Time allowed to produce a response, request body included (a client that sends its body
/// slowly gets `408`). An event stream's response starts at once and is not bounded.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

async fn bounded_time(req: Request, next: Next, limit: Duration) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request took longer than {} ms (a body sent too slowly?)",
                limit.as_millis()
            ),
        )
        .into_response(),
    }
}

/// An API error, rendered as `{"error": "..."}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message });
        (self.status, Json(body)).into_response()
    }
}

fn route_of(req: &Request) -> String {
    req.extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned())
}

/// Counts every response by route pattern and status.
async fn count_requests(req: Request, next: Next) -> Response {
    let route = route_of(&req);
    let response = next.run(req).await;
    telemetry::http_request(&route, response.status().as_u16());
    response
}

/// Equal in time independent of where `a` and `b` differ (only their lengths leak).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(!x);
    }
    diff == 0
}

/// Finds the token matching `presented`, comparing against every token without short-circuit.
fn find_token<'a>(tokens: &'a [ApiToken], presented: &str) -> Option<&'a ApiToken> {
    let mut found = None;
    for t in tokens {
        let matches =
            !t.token.is_empty() && constant_time_eq(t.token.as_bytes(), presented.as_bytes());
        if matches && found.is_none() {
            found = Some(t);
        }
    }
    found
}

fn bearer(req: &Request) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

fn unauthorized(message: &str) -> Response {
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Whether a method only reads.
fn is_read(method: &Method) -> bool {
    *method == Method::GET || *method == Method::HEAD
}

/// Lets through requests bearing a configured token; refuses the others with 401, and changes
/// (any method but `GET` and `HEAD`) by a read-only token with 403, before the path or the body
/// is parsed.
async fn require_token(State(state): State<ApiState>, mut req: Request, next: Next) -> Response {
    let route = route_of(&req);
    let Some(presented) = bearer(&req) else {
        telemetry::auth_failure(AuthFailure::Missing, &route);
        return unauthorized("missing bearer token");
    };
    let tokens = state.tokens.current();
    let Some(token) = find_token(&tokens, presented) else {
        telemetry::auth_failure(AuthFailure::Invalid, &route);
        return unauthorized("invalid bearer token");
    };
    if token.role != Role::Admin && !is_read(req.method()) {
        tracing::info!(token = %token.name, method = %req.method(), %route, "read-only token refused");
        return ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "token {} is read-only: {} is not allowed",
                token.name,
                req.method()
            ),
        )
        .into_response();
    }
    let caller = Caller {
        name: token.name.clone(),
        role: token.role,
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<ApiState>) -> Response {
    if state.store.is_ready() {
        "ok".into_response()
    } else {
        let why = state.store.write_error().map_or_else(
            || "store not ready".to_owned(),
            |e| format!("store cannot write: {e}"),
        );
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why).into_response()
    }
}

async fn render_metrics(State(state): State<ApiState>) -> Response {
    state.metrics.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route")
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} not allowed on this route"),
    )
}

fn path_error(e: PathRejection) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, e.body_text())
}

fn parse_node(s: String) -> Result<NodeId, ApiError> {
    NodeId::new(s).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))
}

fn parse_device(s: String) -> Result<DeviceId, ApiError> {
    DeviceId::new(s).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))
}

fn node_not_found(node: &NodeId) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("node {node} not found"))
}

fn device_not_found(node: &NodeId, device: &DeviceId) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("device {device} not found on node {node}"),
    )
}

type NodePath = Result<Path<String>, PathRejection>;
type DevicePath = Result<Path<(String, String)>, PathRejection>;

async fn list_nodes(State(state): State<ApiState>) -> Response {
    Json(state.store.nodes()).into_response()
}

async fn get_node(State(state): State<ApiState>, path: NodePath) -> Result<Response, ApiError> {
    let Path(node) = path.map_err(path_error)?;
    let node = parse_node(node)?;
    let status = state
        .store
        .node(&node)
        .ok_or_else(|| node_not_found(&node))?;
    Ok(Json(status).into_response())
}

/// One gap of the gaps resource: records `from..=to` were lost at the edge.
#[derive(Serialize)]
struct GapView {
    from: u64,
    to: u64,
    records: u64,
}

/// The gaps resource of a node.
#[derive(Serialize)]
struct GapsView {
    node: NodeId,
    /// The sum of `records` over `gaps`.
    lost_records: u64,
    gaps: Vec<GapView>,
}

/// `GET /api/v1/nodes/{node}/gaps`: the node's gaps in sequence order (read from sled on a
/// blocking thread; the node status's `lost_records` comes from memory).
async fn get_gaps(State(state): State<ApiState>, path: NodePath) -> Result<Response, ApiError> {
    let Path(node) = path.map_err(path_error)?;
    let node = parse_node(node)?;
    if state.store.node(&node).is_none() {
        return Err(node_not_found(&node));
    }
    let (store, owned) = (state.store.clone(), node.clone());
    let gaps = tokio::task::spawn_blocking(move || store.gaps(&owned))
        .await
        .map_err(|e| StoreError::Task(e.to_string()))
        .and_then(|r| r);
    gaps_response(node, gaps)
}

/// `GET /api/v1/nodes/{node}/alarms`: the alarms of the node's local rules that are active.
async fn get_alarms(State(state): State<ApiState>, path: NodePath) -> Result<Response, ApiError> {
    let Path(node) = path.map_err(path_error)?;
    let node = parse_node(node)?;
    if state.store.node(&node).is_none() {
        return Err(node_not_found(&node));
    }
    let (store, owned) = (state.store.clone(), node.clone());
    let alarms = tokio::task::spawn_blocking(move || store.alarms(&owned))
        .await
        .map_err(|e| StoreError::Task(e.to_string()))
        .and_then(|r| r)
        .map_err(|e| {
            tracing::error!(%node, error = %e, "reading alarms failed");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store unavailable: alarms not read",
            )
        })?;
    Ok(Json(serde_json::json!({ "node": node, "alarms": alarms })).into_response())
}

/// `GET /api/v1/nodes/{node}/rule-outputs`: the latest records the node's local rules sent.
async fn get_rule_outputs(
    State(state): State<ApiState>,
    path: NodePath,
) -> Result<Response, ApiError> {
    let Path(node) = path.map_err(path_error)?;
    let node = parse_node(node)?;
    if state.store.node(&node).is_none() {
        return Err(node_not_found(&node));
    }
    let outputs = state.store.rule_outputs(&node);
    Ok(Json(serde_json::json!({ "node": node, "outputs": outputs })).into_response())
}

/// `POST /api/v1/nodes/{node}/alarms/{rule}/{device}/ack`: an operator acknowledges an active
/// alarm (admin tokens only, like every change).
async fn ack_alarm(
    State(state): State<ApiState>,
    caller: Option<Extension<Caller>>,
    path: Result<Path<(String, String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((node, rule, device)) = path.map_err(path_error)?;
    let node = parse_node(node)?;
    let Some(Extension(caller)) = caller else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing bearer token",
        ));
    };
    if state.store.node(&node).is_none() {
        return Err(node_not_found(&node));
    }
    match state
        .store
        .ack_alarm(&node, &rule, &device, &caller.name)
        .await
    {
        Ok(Some(a)) => Ok(Json(a).into_response()),
        Ok(None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no active alarm of rule {rule:?} on device {device:?} of node {node}"),
        )),
        Err(e) => {
            tracing::error!(%node, error = %e, "acknowledging an alarm failed");
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store unavailable: alarm not acknowledged",
            ))
        }
    }
}

/// Renders the gaps of `node` as read from the store, or 503 if the read failed.
fn gaps_response(
    node: NodeId,
    gaps: Result<Vec<(u64, u64)>, StoreError>,
) -> Result<Response, ApiError> {
    let gaps = gaps.map_err(|e| {
        tracing::error!(%node, error = %e, "reading gaps failed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store unavailable: gaps not read",
        )
    })?;
    let gaps: Vec<GapView> = gaps
        .into_iter()
        .map(|(from, to)| GapView {
            from,
            to,
            records: to.saturating_sub(from).saturating_add(1),
        })
        .collect();
    let lost_records = gaps.iter().fold(0u64, |n, g| n.saturating_add(g.records));
    Ok(Json(GapsView {
        node,
        lost_records,
        gaps,
    })
    .into_response())
}

/// Records per page of the records resource, by default and at most.
pub const RECORDS_PAGE: usize = 1_000;
/// Most records per page a client may ask for.
pub const MAX_RECORDS_PAGE: usize = 10_000;

/// The query of `GET /api/v1/nodes/{node}/records`.
#[derive(Debug, Deserialize)]
struct RecordsQuery {
    from: Option<String>,
    limit: Option<String>,
}

/// One stored record.
#[derive(Serialize)]
struct RecordView {
    seq: u64,
    device: DeviceId,
    property: PropertyId,
    value: Option<Value>,
    quality: edgesync_protocol::Quality,
    ts: edgesync_protocol::Timestamp,
}

/// A page of a node's stored records.
#[derive(Serialize)]
struct RecordsView {
    node: NodeId,
    /// The first seq that may still be stored (older ones were pruned by retention).
    history_from: u64,
    /// The node's last seq durably stored.
    uplink_seq: u64,
    records: Vec<RecordView>,
    /// The `from` of the next page; `null` when this page ends with the last stored record.
    next_from: Option<u64>,
}

/// `GET /api/v1/nodes/{node}/records?from=<seq>&limit=<n>`: stored records from `from`
/// (default: the oldest kept) in sequence order, at most `limit` (default and cap in
/// [`RECORDS_PAGE`] and [`MAX_RECORDS_PAGE`]); records lost at the edge or pruned by retention
/// are absent.
async fn get_records(
    State(state): State<ApiState>,
    path: NodePath,
    query: Result<Query<RecordsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(node) = path.map_err(path_error)?;
    let node = parse_node(node)?;
    let Query(q) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let number = |field: &str, v: Option<String>| -> Result<Option<u64>, ApiError> {
        v.map(|v| {
            v.trim().parse::<u64>().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("{field}: expected a non-negative integer, got {v:?}"),
                )
            })
        })
        .transpose()
    };
    let from = number("from", q.from)?;
    let limit = match number("limit", q.limit)? {
        None => RECORDS_PAGE,
        Some(n) if (1..=MAX_RECORDS_PAGE as u64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("limit: expected 1 to {MAX_RECORDS_PAGE}, got {n}"),
            ));
        }
    };
    let status = state
        .store
        .node(&node)
        .ok_or_else(|| node_not_found(&node))?;
    let from = from.unwrap_or(status.history_from).max(status.history_from);
    let (store, owned) = (state.store.clone(), node.clone());
    let page = tokio::task::spawn_blocking(move || store.records_page(&owned, from, limit))
        .await
        .map_err(|e| StoreError::Task(e.to_string()))
        .and_then(|r| r)
        .map_err(|e| {
            tracing::error!(%node, error = %e, "reading records failed");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store unavailable: records not read",
            )
        })?;
    let (records, next_from) = page;
    let records = records
        .into_iter()
        .map(|(seq, s)| RecordView {
            seq,
            device: s.device,
            property: s.property,
            value: s.value,
            quality: s.quality,
            ts: s.ts,
        })
        .collect();
    Ok(Json(RecordsView {
        node,
        history_from: status.history_from,
        uplink_seq: status.uplink_seq,
        records,
        next_from,
    })
    .into_response())
}

async fn list_devices(State(state): State<ApiState>, path: NodePath) -> Result<Response, ApiError> {
    let Path(node) = path.map_err(path_error)?;
    let node = parse_node(node)?;
    if state.store.node(&node).is_none() {
        return Err(node_not_found(&node));
    }
    Ok(Json(state.store.devices(&node)).into_response())
}

/// The device resource.
#[derive(Serialize)]
struct DeviceView {
    device: DeviceId,
    properties: usize,
}

async fn get_device(State(state): State<ApiState>, path: DevicePath) -> Result<Response, ApiError> {
    let Path((node, device)) = path.map_err(path_error)?;
    let (node, device) = (parse_node(node)?, parse_device(device)?);
    let twin = find_twin(&state, &node, &device)?;
    Ok(Json(DeviceView {
        properties: twin.reported.len(),
        device,
    })
    .into_response())
}

async fn get_twin(State(state): State<ApiState>, path: DevicePath) -> Result<Response, ApiError> {
    let Path((node, device)) = path.map_err(path_error)?;
    let (node, device) = (parse_node(node)?, parse_device(device)?);
    let twin = find_twin(&state, &node, &device)?;
    Ok(Json(twin).into_response())
}

fn find_twin(
    state: &ApiState,
    node: &NodeId,
    device: &DeviceId,
) -> Result<crate::store::Twin, ApiError> {
    if let Some(twin) = state.store.twin(node, device) {
        return Ok(twin);
    }
    if state.store.node(node).is_none() {
        Err(node_not_found(node))
    } else {
        Err(device_not_found(node, device))
    }
}

/// Whether a `Content-Type` value declares JSON: `application/json` or `application/*+json`,
/// with any parameters.
fn is_json_content_type(value: &HeaderValue) -> bool {
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json")
            || (subtype.len() > 5
                && subtype
                    .get(subtype.len() - 5..)
                    .is_some_and(|s| s.eq_ignore_ascii_case("+json"))))
}

/// The body of `PATCH .../twin/desired`: checks the content type (415), reads at most
/// [`MAX_BODY_BYTES`] (413) and parses a JSON object (400).
async fn desired_body(
    req: Request,
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    match req.headers().get(header::CONTENT_TYPE) {
        Some(ct) if is_json_content_type(ct) => {}
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "body: expected Content-Type: application/json",
            ));
        }
        None => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "body: missing Content-Type: application/json",
            ));
        }
    }
    let bytes = Bytes::from_request(req, &()).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body: larger than {MAX_BODY_BYTES} bytes"),
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("body: could not be read: {}", e.body_text()),
            )
        }
    })?;
    let json: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("body: invalid JSON: {e}")))?;
    match json {
        serde_json::Value::Object(map) => Ok(map),
        other => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "body: expected a JSON object of property values, got {}",
                json_kind(&other)
            ),
        )),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Renders a refused desired change: 404, 422 with `fields`, or 503.
fn desired_error(e: DesiredError) -> Response {
    match e {
        DesiredError::UnknownNode(node) => node_not_found(&node).into_response(),
        DesiredError::UnknownDevice { node, device } => {
            device_not_found(&node, &device).into_response()
        }
        DesiredError::Invalid(errors) => {
            let message = errors
                .iter()
                .map(|e| {
                    if e.field.is_empty() {
                        e.message.clone()
                    } else {
                        format!("{}: {}", e.field, e.message)
                    }
                })
                .collect::<Vec<_>>()
                .join("; ");
            let fields: BTreeMap<&str, &str> = errors
                .iter()
                .filter(|e| !e.field.is_empty())
                .map(|e| (e.field.as_str(), e.message.as_str()))
                .collect();
            let body = serde_json::json!({
                "error": format!("invalid desired values: {message}"),
                "fields": fields,
            });
            (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response()
        }
        DesiredError::Store(e) => {
            tracing::error!(error = %e, "storing desired values failed");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store unavailable: desired values not changed",
            )
            .into_response()
        }
    }
}

/// `PATCH /api/v1/nodes/{node}/devices/{device}/twin/desired` (admin; the role was checked by
/// [`require_token`]).
async fn set_desired(
    State(state): State<ApiState>,
    caller: Option<Extension<Caller>>,
    path: DevicePath,
    req: Request,
) -> Result<Response, ApiError> {
    let Path((node, device)) = path.map_err(path_error)?;
    let (node, device) = (parse_node(node)?, parse_device(device)?);
    // Always there behind `require_token`; refuse rather than guess if it is not.
    let Some(Extension(caller)) = caller else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing bearer token",
        ));
    };
    let values = desired_body(req).await?;
    match state
        .store
        .set_desired(&node, &device, &values, &caller.name)
        .await
    {
        Ok(set) => {
            let versions: BTreeMap<String, u64> = set
                .into_iter()
                .map(|s| (s.property.as_str().to_owned(), s.version))
                .collect();
            Ok(Json(serde_json::json!({ "versions": versions })).into_response())
        }
        Err(e) => Ok(desired_error(e)),
    }
}

/// The query of `GET /api/v1/events`.
#[derive(Debug, Deserialize)]
struct EventsQuery {
    /// Where to resume, for clients that cannot set `Last-Event-ID`.
    last_event_id: Option<String>,
}

/// Parses a resumption id; empty means none (what `EventSource` sends after an event without
/// an id).
fn parse_last_event_id(source: &str, value: &str) -> Result<Option<u64>, ApiError> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{source}: expected an event id (a non-negative integer)"),
        )
    })
}

/// `GET /api/v1/events`: server-sent events, resumable (see the module docs).
async fn events(
    State(state): State<ApiState>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let last = match headers.get("last-event-id") {
        Some(v) => {
            let v = v.to_str().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "Last-Event-ID: expected an event id (a non-negative integer)",
                )
            })?;
            parse_last_event_id("Last-Event-ID", v)?
        }
        None => {
            let Query(q) =
                query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
            match q.last_event_id {
                Some(v) => parse_last_event_id("last_event_id", &v)?,
                None => None,
            }
        }
    };
    let (backlog, rx) = state.store.events().subscribe(last);
    let stream = event_stream(backlog, rx, state.shutdown.clone());
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE).text("keep-alive"))
        .into_response())
}

/// One subscriber's position in the event stream.
struct Subscription {
    /// Buffered events still to send (sent before any live one).
    backlog: std::vec::IntoIter<Arc<Event>>,
    /// Live events.
    rx: broadcast::Receiver<Arc<Event>>,
    /// An event received after a lag, sent right after the `resync` that announces the lag.
    held: Option<Arc<Event>>,
    /// The id of the last event sent.
    last_sent: Option<u64>,
}

impl Subscription {
    /// The next event to send; `None` when the bus is gone.
    async fn next(&mut self) -> Option<Arc<Event>> {
        if let Some(ev) = self.held.take().or_else(|| self.backlog.next()) {
            return Some(self.sent(ev));
        }
        let mut missed = 0u64;
        loop {
            match self.rx.recv().await {
                Ok(ev) if self.last_sent.is_some_and(|last| ev.id <= last) => continue,
                Ok(ev) if missed > 0 => {
                    // Announce the gap just below the first event after it, so a client that
                    // reconnects with the resync's id resumes exactly there.
                    let resync = Arc::new(Event::new(
                        ev.id.saturating_sub(1),
                        "resync",
                        &serde_json::json!({
                            "reason": "this client fell behind and missed events; re-read the state",
                            "missed": missed,
                            "last_event_id": self.last_sent,
                        }),
                    ));
                    self.held = Some(ev);
                    return Some(self.sent(resync));
                }
                Ok(ev) => return Some(self.sent(ev)),
                Err(RecvError::Lagged(n)) => {
                    tracing::debug!(missed = n, "event subscriber lagged");
                    missed = missed.saturating_add(n);
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }

    fn sent(&mut self, ev: Arc<Event>) -> Arc<Event> {
        self.last_sent = Some(self.last_sent.map_or(ev.id, |last| last.max(ev.id)));
        ev
    }
}

fn to_sse(ev: &Event) -> SseEvent {
    SseEvent::default()
        .id(ev.id.to_string())
        .event(ev.kind)
        .data(ev.data())
}

/// The buffered events, then the live ones, as SSE events (see [`Subscription`]).
/// The stream ends when `shutdown` is cancelled.
fn event_stream(
    backlog: Vec<Arc<Event>>,
    rx: broadcast::Receiver<Arc<Event>>,
    shutdown: CancellationToken,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    let sub = Subscription {
        backlog: backlog.into_iter(),
        rx,
        held: None,
        last_sent: None,
    };
    futures_util::stream::unfold(sub, move |mut sub| {
        let shutdown = shutdown.clone();
        async move {
            let ev = tokio::select! {
                biased;
                () = shutdown.cancelled() => return None,
                ev = sub.next() => ev?,
            };
            Some((Ok(to_sse(&ev)), sub))
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use axum::body::Body;
    use axum::http::Request as HttpRequest;
    use edgesync_protocol::frame::{DeviceSchema, PropertySchema};
    use edgesync_protocol::{PropertyId, Quality, Sample, Timestamp, Value};
    use http_body_util::BodyExt;
    use serde_json::{Value as Json, json};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;
    use tower::ServiceExt;

    use super::*;
    use crate::store::{ConnInfo, FieldError};

    const ADMIN: &str = "admin-secret-token";
    const READER: &str = "reader-secret-token";
    const DESIRED: &str = "/api/v1/nodes/gw-1/devices/plc1/twin/desired";

    struct Fixture {
        _dir: tempfile::TempDir,
        app: Router,
        store: Arc<HubStore>,
        metrics: PrometheusHandle,
        shutdown: CancellationToken,
    }

    fn prop(name: &str, kind: &str, writable: bool) -> PropertySchema {
        PropertySchema {
            property: name.into(),
            kind: kind.into(),
            writable,
            unit: String::new(),
            min: None,
            max: None,
        }
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(HubStore::open(dir.path(), 8 << 20).unwrap());
        let n = NodeId::new("gw-1").unwrap();
        store
            .node_connected(
                &n,
                ConnInfo {
                    remote_addr: "10.0.0.5:4433".into(),
                    agent_version: "0.1.0".into(),
                    boot_id: "boot-a".into(),
                    config_version: 3,
                    svid_expires_ms: Some(1_767_225_600_000),
                },
                1_000,
            )
            .unwrap();
        let s = |prop: &str, value: Option<Value>, quality, ts| Sample {
            device: DeviceId::new("plc1").unwrap(),
            property: PropertyId::new(prop).unwrap(),
            value,
            quality,
            ts: Timestamp(ts),
        };
        let timeout = Quality::Bad(edgesync_protocol::BadReason::Timeout);
        store
            .commit_batch(
                &n,
                1,
                &[
                    s(
                        "temp",
                        Some(Value::Float(21.5)),
                        Quality::Good,
                        1_700_000_000_000,
                    ),
                    s("rpm", None, timeout, 1_700_000_000_100),
                ],
            )
            .await
            .unwrap();
        // What the agent says plc1 is: two read-only inputs and four writable settings.
        let setpoint = PropertySchema {
            unit: "°C".into(),
            min: Some(0.0),
            max: Some(100.0),
            ..prop("sp", "float", true)
        };
        store
            .store_schema(
                &n,
                &DeviceSchema {
                    device: "plc1".into(),
                    properties: vec![
                        prop("temp", "float", false),
                        prop("rpm", "int", false),
                        setpoint,
                        prop("mode", "string", true),
                        prop("enabled", "bool", true),
                        prop("count", "uint", true),
                    ],
                },
            )
            .await
            .unwrap();
        store
            .node_connected(&NodeId::new("gw-2").unwrap(), ConnInfo::default(), 2_000)
            .unwrap();
        let metrics = telemetry::prometheus();
        let tokens = vec![
            ApiToken {
                name: "ops".into(),
                token: ADMIN.into(),
                role: Role::Admin,
            },
            ApiToken {
                name: "grafana".into(),
                token: READER.into(),
                role: Role::ReadOnly,
            },
        ];
        let shutdown = CancellationToken::new();
        let app = router(ApiState {
            store: store.clone(),
            tokens: Arc::new(ApiTokens::new(tokens)),
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
        });
        Fixture {
            _dir: dir,
            app,
            store,
            metrics,
            shutdown,
        }
    }

    /// Sends a request; `body` is sent as JSON when given.
    async fn send(
        app: &Router,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Response {
        let mut req = HttpRequest::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let body = match body {
            Some(b) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Body::from(b.to_owned())
            }
            None => Body::empty(),
        };
        app.clone().oneshot(req.body(body).unwrap()).await.unwrap()
    }

    async fn call(app: &Router, uri: &str, token: Option<&str>) -> (StatusCode, Response) {
        let response = send(app, Method::GET, uri, token, None).await;
        (response.status(), response)
    }

    async fn body(response: Response) -> Vec<u8> {
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec()
    }

    async fn json_of(response: Response) -> (StatusCode, Json) {
        let status = response.status();
        let ct = response.headers().get(header::CONTENT_TYPE).cloned();
        assert_eq!(
            ct.as_ref().and_then(|c| c.to_str().ok()),
            Some("application/json"),
            "{status}"
        );
        (
            status,
            serde_json::from_slice(&body(response).await).unwrap(),
        )
    }

    async fn get_json(app: &Router, uri: &str) -> (StatusCode, Json) {
        let (_, response) = call(app, uri, Some(READER)).await;
        json_of(response).await
    }

    async fn patch_json(app: &Router, uri: &str, body: &str) -> (StatusCode, Json) {
        json_of(send(app, Method::PATCH, uri, Some(ADMIN), Some(body)).await).await
    }

    fn rule_event(
        seq: u64,
        kind: u32,
        rule: &str,
        fields: &str,
    ) -> edgesync_protocol::frame::Control {
        use edgesync_protocol::frame::{Control, ControlKind};
        Control {
            seq,
            kind: Some(ControlKind::Rule(edgesync_protocol::frame::RuleEvent {
                rule: rule.into(),
                device: "plc1".into(),
                kind,
                ts_ms: 1_700_000_000_000 + seq,
                severity: "critical".into(),
                fields_json: fields.into(),
                since_ms: 1_700_000_000_000,
                labels_json: r#"{"area":"a"}"#.into(),
                raised_ms: 1_700_000_000_000,
            })),
        }
    }

    #[tokio::test]
    async fn alarms_are_listed_acknowledged_by_admins_only_and_cleared() {
        use edgesync_protocol::frame::{RULE_ALARM_CLEARED, RULE_ALARM_RAISED};
        let f = fixture().await;
        let gw1 = NodeId::new("gw-1").unwrap();
        let list = "/api/v1/nodes/gw-1/alarms";
        let ack = "/api/v1/nodes/gw-1/alarms/hot/plc1/ack";
        let (status, v) = get_json(&f.app, list).await;
        assert_eq!((status, v["alarms"].clone()), (StatusCode::OK, json!([])));
        f.store
            .apply_control(
                &gw1,
                rule_event(1, RULE_ALARM_RAISED, "hot", r#"{"temp":91.5}"#),
            )
            .await
            .unwrap();
        // Hostile input from a node: an oversized name is ignored, oversized or invalid JSON
        // is replaced, an unknown kind is ignored; none of it fails the control log.
        let long = "r".repeat(300);
        f.store
            .apply_control(&gw1, rule_event(2, RULE_ALARM_RAISED, &long, "{}"))
            .await
            .unwrap();
        let huge = format!(r#"{{"x":"{}"}}"#, "y".repeat(20_000));
        f.store
            .apply_control(&gw1, rule_event(3, RULE_ALARM_RAISED, "big", &huge))
            .await
            .unwrap();
        f.store
            .apply_control(&gw1, rule_event(4, 99, "odd", "not json"))
            .await
            .unwrap();
        let (_, v) = get_json(&f.app, list).await;
        let alarms = v["alarms"].as_array().unwrap();
        assert_eq!(alarms.len(), 2, "{v}");
        assert_eq!(alarms[0]["rule"], "big");
        assert_eq!(alarms[0]["fields"], json!({"truncated": true}));
        assert_eq!(alarms[1]["fields"]["temp"], 91.5);
        assert_eq!(alarms[1]["labels"]["area"], "a");
        // No token, a wrong token, a read-only token: refused; an admin acknowledges.
        let post = |token: Option<&'static str>, uri: &'static str| {
            let app = f.app.clone();
            async move { send(&app, Method::POST, uri, token, None).await.status() }
        };
        assert_eq!(post(None, ack).await, StatusCode::UNAUTHORIZED);
        assert_eq!(
            post(Some("wrong-token-wrong-token"), ack).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(post(Some(READER), ack).await, StatusCode::FORBIDDEN);
        let (status, a) = json_of(send(&f.app, Method::POST, ack, Some(ADMIN), None).await).await;
        assert_eq!(status, StatusCode::OK, "{a}");
        assert_eq!(a["acked_by"], "ops");
        assert!(a["acked_ms"].as_u64().is_some(), "{a}");
        // Unknown alarm, unknown node: 404 with a message.
        let (status, e) = json_of(
            send(
                &f.app,
                Method::POST,
                "/api/v1/nodes/gw-1/alarms/nope/plc1/ack",
                Some(ADMIN),
                None,
            )
            .await,
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{e}");
        let (status, _) = get_json(&f.app, "/api/v1/nodes/gw-9/alarms").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        // Cleared: gone from the list.
        f.store
            .apply_control(&gw1, rule_event(5, RULE_ALARM_CLEARED, "hot", "{}"))
            .await
            .unwrap();
        let (_, v) = get_json(&f.app, list).await;
        let rules: Vec<&str> = v["alarms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["rule"].as_str().unwrap())
            .collect();
        assert_eq!(rules, vec!["big"]);
        // Records sent upstream: the latest kept, oldest first.
        for seq in 6..6 + crate::store::RULE_OUTPUTS_KEPT as u64 + 5 {
            let fields = format!(r#"{{"n":{seq}}}"#);
            f.store
                .apply_control(
                    &gw1,
                    rule_event(seq, edgesync_protocol::frame::RULE_RECORD, "avg", &fields),
                )
                .await
                .unwrap();
        }
        let (status, v) = get_json(&f.app, "/api/v1/nodes/gw-1/rule-outputs").await;
        assert_eq!(status, StatusCode::OK);
        let outs = v["outputs"].as_array().unwrap();
        assert_eq!(outs.len(), crate::store::RULE_OUTPUTS_KEPT);
        assert_eq!(outs[0]["fields"]["n"], 11);
        assert_eq!(outs[outs.len() - 1]["rule"], "avg");
    }

    #[tokio::test]
    async fn health_ready_and_metrics_need_no_token() {
        let f = fixture().await;
        let (status, response) = call(&f.app, "/healthz", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body(response).await, b"ok");
        let (status, _) = call(&f.app, "/readyz", None).await;
        assert_eq!(status, StatusCode::OK);
        let (status, response) = call(&f.app, "/metrics", None).await;
        assert_eq!(status, StatusCode::OK);
        let text = String::from_utf8(body(response).await).unwrap();
        // The fixture's commit was counted.
        assert!(text.contains("edgesync_hub_records_stored_total"), "{text}");
        // The /healthz request above was counted by route and status.
        assert!(
            text.contains(r#"edgesync_hub_http_requests_total{route="/healthz",status="200"}"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn api_requires_a_valid_token() {
        let f = fixture().await;
        for token in [
            None,
            Some("wrong"),
            Some("admin-secret-tokeN"),
            Some("admin-secret-token-x"),
        ] {
            let (status, response) = call(&f.app, "/api/v1/nodes", token).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}");
            assert_eq!(
                response.headers().get(header::WWW_AUTHENTICATE).unwrap(),
                "Bearer"
            );
            let json: Json = serde_json::from_slice(&body(response).await).unwrap();
            assert!(json["error"].as_str().unwrap().contains("token"), "{json}");
        }
        // A non-bearer scheme is refused too.
        let req = HttpRequest::builder()
            .uri("/api/v1/nodes")
            .header(header::AUTHORIZATION, format!("Basic {ADMIN}"))
            .body(Body::empty())
            .unwrap();
        let response = f.app.clone().oneshot(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        // Auth is checked before ids are parsed: no information leaks to strangers.
        let (status, _) = call(&f.app, "/api/v1/nodes/bad%20id", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        // A path no route matches is 404 for anyone.
        let (status, response) = call(&f.app, "/api/v1/nothing", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(json_of(response).await.1, json!({"error": "no such route"}));
        for token in [ADMIN, READER] {
            let (status, _) = call(&f.app, "/api/v1/nodes", Some(token)).await;
            assert_eq!(status, StatusCode::OK);
        }
        let text = f.metrics.render();
        assert!(text.contains("edgesync_hub_auth_failures_total"), "{text}");
        assert!(
            text.contains(
                r#"edgesync_hub_http_requests_total{route="/api/v1/nodes",status="401"}"#
            ),
            "{text}"
        );
    }

    /// Every API route, with every kind of credential.
    #[tokio::test]
    async fn every_route_checks_token_and_role() {
        let f = fixture().await;
        let reads = [
            "/api/v1/nodes",
            "/api/v1/nodes/gw-1",
            "/api/v1/nodes/gw-1/gaps",
            "/api/v1/nodes/gw-1/devices",
            "/api/v1/nodes/gw-1/devices/plc1",
            "/api/v1/nodes/gw-1/devices/plc1/twin",
            "/api/v1/events",
        ];
        let mut routes: Vec<(Method, &str, Option<&str>)> =
            reads.iter().map(|uri| (Method::GET, *uri, None)).collect();
        routes.extend(reads.iter().map(|uri| (Method::HEAD, *uri, None)));
        routes.push((Method::PATCH, DESIRED, Some(r#"{"sp": 40}"#)));
        for (method, uri, payload) in routes {
            let is_change = method == Method::PATCH;
            for token in [None, Some("wrong"), Some(READER), Some(ADMIN)] {
                let response = send(&f.app, method.clone(), uri, token, payload).await;
                let status = response.status();
                let expected = match token {
                    None | Some("wrong") => StatusCode::UNAUTHORIZED,
                    Some(READER) if is_change => StatusCode::FORBIDDEN,
                    _ => StatusCode::OK,
                };
                assert_eq!(status, expected, "{method} {uri} with {token:?}");
                if status != StatusCode::OK {
                    if method != Method::HEAD {
                        let (_, json) = json_of(response).await;
                        assert!(json["error"].is_string(), "{method} {uri}: {json}");
                    }
                } else if uri == "/api/v1/events" {
                    assert_eq!(
                        response.headers().get(header::CONTENT_TYPE).unwrap(),
                        "text/event-stream"
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn read_only_changes_are_refused_before_anything_else() {
        let f = fixture().await;
        let large = format!(r#"{{"mode": "{}"}}"#, "x".repeat(MAX_BODY_BYTES));
        for (uri, payload) in [
            (DESIRED, r#"{"sp": 40}"#),
            (DESIRED, "{not json"),
            (DESIRED, large.as_str()),
            // Unknown node and a malformed id: the reader learns nothing.
            ("/api/v1/nodes/gw-9/devices/plc1/twin/desired", "{}"),
            ("/api/v1/nodes/-bad/devices/plc1/twin/desired", "{}"),
        ] {
            let response = send(&f.app, Method::PATCH, uri, Some(READER), Some(payload)).await;
            let (status, json) = json_of(response).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{uri}");
            assert_eq!(
                json["error"], "token grafana is read-only: PATCH is not allowed",
                "{uri}"
            );
        }
        // A wrong content type too.
        let req = HttpRequest::builder()
            .method(Method::PATCH)
            .uri(DESIRED)
            .header(header::AUTHORIZATION, format!("Bearer {READER}"))
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Body::from("sp=40"))
            .unwrap();
        let response = f.app.clone().oneshot(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        // Any method that changes, even where no route takes it.
        for method in [Method::POST, Method::PUT, Method::DELETE] {
            let response = send(&f.app, method.clone(), "/api/v1/nodes", Some(READER), None).await;
            assert_eq!(response.status(), StatusCode::FORBIDDEN, "{method}");
            let response = send(&f.app, method.clone(), "/api/v1/nodes", None, None).await;
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{method}");
            // An admin learns that the route has no such method (JSON, like every error).
            let response = send(&f.app, method.clone(), "/api/v1/nodes", Some(ADMIN), None).await;
            let (status, json) = json_of(response).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
            assert_eq!(
                json["error"],
                format!("method {method} not allowed on this route")
            );
        }
        // Nothing was changed.
        let (_, twin) = get_json(&f.app, "/api/v1/nodes/gw-1/devices/plc1/twin").await;
        assert_eq!(twin["desired"], json!({}));
        let text = f.metrics.render();
        assert!(
            text.contains(&format!(
                r#"edgesync_hub_http_requests_total{{route="{}",status="403"}}"#,
                "/api/v1/nodes/{node}/devices/{device}/twin/desired"
            )),
            "{text}"
        );
    }

    #[tokio::test]
    async fn patch_desired_sets_versions_and_the_twin_shows_them() {
        let f = fixture().await;
        let (status, json) = patch_json(
            &f.app,
            DESIRED,
            r#"{"sp": 42.5, "mode": "auto", "enabled": true, "count": 7}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{json}");
        let versions = json["versions"].as_object().unwrap();
        let mut got: Vec<(&str, u64)> = versions
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_u64().unwrap()))
            .collect();
        got.sort_by_key(|(_, v)| *v);
        let names: std::collections::BTreeSet<&str> = got.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            names,
            ["count", "enabled", "mode", "sp"].into_iter().collect()
        );
        assert_eq!(
            got.iter().map(|(_, v)| *v).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        // A second change of one property gets the node's next version.
        let (status, json) = patch_json(&f.app, DESIRED, r#"{"sp": 50}"#).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json, json!({"versions": {"sp": 5}}));
        // `application/*+json` with parameters is JSON too.
        let req = HttpRequest::builder()
            .method(Method::PATCH)
            .uri(DESIRED)
            .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
            .header(
                header::CONTENT_TYPE,
                "application/merge-patch+json; charset=utf-8",
            )
            .body(Body::from(r#"{"mode": "manual"}"#))
            .unwrap();
        let (status, json) = json_of(f.app.clone().oneshot(req).await.unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json, json!({"versions": {"mode": 6}}));

        let (status, twin) = get_json(&f.app, "/api/v1/nodes/gw-1/devices/plc1/twin").await;
        assert_eq!(status, StatusCode::OK);
        let sp = &twin["desired"]["sp"];
        assert_eq!(sp["value"], 50.0, "{twin}");
        assert_eq!(sp["version"], 5);
        assert_eq!(sp["origin"], "hub");
        assert_eq!(sp["by"], "ops");
        assert!(sp["set_ms"].as_u64().unwrap() > 1_700_000_000_000);
        assert_eq!(sp["applied"], Json::Null);
        assert_eq!(twin["desired"]["mode"]["value"], "manual");
        assert_eq!(twin["desired"]["enabled"]["value"], true);
        assert_eq!(twin["desired"]["count"]["value"], 7);
        assert_eq!(
            twin["delta"],
            json!({"count": 7, "enabled": true, "mode": "manual", "sp": 50.0})
        );
    }

    #[tokio::test]
    async fn patch_desired_errors_are_4xx_naming_the_problem() {
        let f = fixture().await;
        // 404: unknown node or device.
        for (uri, message) in [
            (
                "/api/v1/nodes/gw-9/devices/plc1/twin/desired",
                "node gw-9 not found",
            ),
            (
                "/api/v1/nodes/gw-1/devices/plc9/twin/desired",
                "device plc9 not found on node gw-1",
            ),
        ] {
            let (status, json) = patch_json(&f.app, uri, r#"{"sp": 40}"#).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
            assert_eq!(json, json!({"error": message}));
        }
        // 400: malformed ids.
        for (uri, field) in [
            ("/api/v1/nodes/-gw/devices/plc1/twin/desired", "node id"),
            (
                "/api/v1/nodes/gw-1/devices/pl%2Fc/twin/desired",
                "device id",
            ),
        ] {
            let (status, json) = patch_json(&f.app, uri, r#"{"sp": 40}"#).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
            assert!(json["error"].as_str().unwrap().starts_with(field), "{json}");
        }
        // 422: values the schema refuses, every problem at once, named by property.
        for (payload, field, message) in [
            (
                r#"{"nope": 1}"#,
                "nope",
                r#"device plc1 has no property "nope""#,
            ),
            (
                r#"{"sp": "hot"}"#,
                "sp",
                "expected a number value, got a string",
            ),
            (
                r#"{"enabled": 1}"#,
                "enabled",
                "expected a boolean value, got 1",
            ),
            (
                r#"{"count": -1}"#,
                "count",
                "expected a non-negative integer value, got -1",
            ),
            (r#"{"temp": 20.0}"#, "temp", "temp is read-only"),
            (r#"{"sp": 150}"#, "sp", "150 is above the maximum 100"),
            (r#"{"sp": -1}"#, "sp", "-1 is below the minimum 0"),
            (
                r#"{"mode": null}"#,
                "mode",
                "expected a string value, got null",
            ),
        ] {
            let (status, json) = patch_json(&f.app, DESIRED, payload).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{payload}");
            assert_eq!(json["fields"], json!({ field: message }), "{payload}");
            assert_eq!(
                json["error"],
                format!("invalid desired values: {field}: {message}"),
                "{payload}"
            );
        }
        let (status, json) =
            patch_json(&f.app, DESIRED, r#"{"sp": 40, "temp": 1.0, "nope": true}"#).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        let fields = json["fields"].as_object().unwrap();
        assert_eq!(
            fields.keys().collect::<Vec<_>>(),
            vec!["nope", "temp"],
            "{json}"
        );
        // An empty object changes nothing.
        let (status, json) = patch_json(&f.app, DESIRED, "{}").await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            json,
            json!({"error": "invalid desired values: no properties given", "fields": {}})
        );
        // 400: not JSON, or not an object.
        for (payload, message) in [
            (r#"{"sp": "#, "body: invalid JSON: "),
            ("", "body: invalid JSON: "),
            (
                "[1, 2]",
                "body: expected a JSON object of property values, got an array",
            ),
            (
                "42",
                "body: expected a JSON object of property values, got a number",
            ),
            (
                "null",
                "body: expected a JSON object of property values, got null",
            ),
        ] {
            let (status, json) = patch_json(&f.app, DESIRED, payload).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{payload}");
            assert!(
                json["error"].as_str().unwrap().starts_with(message),
                "{payload}: {json}"
            );
        }
        // 413: too large (a valid object, one byte over the limit).
        let pad = MAX_BODY_BYTES - r#"{"mode": ""}"#.len() + 1;
        let large = format!(r#"{{"mode": "{}"}}"#, "x".repeat(pad));
        assert_eq!(large.len(), MAX_BODY_BYTES + 1);
        let (status, json) = patch_json(&f.app, DESIRED, &large).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(json, json!({"error": "body: larger than 65536 bytes"}));
        // At the limit it is fine.
        let fits = format!(r#"{{"mode": "{}"}}"#, "x".repeat(pad - 1));
        let (status, _) = patch_json(&f.app, DESIRED, &fits).await;
        assert_eq!(status, StatusCode::OK);
        // 415: not declared JSON, or not declared at all.
        for ct in [
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            None,
        ] {
            let mut req = HttpRequest::builder()
                .method(Method::PATCH)
                .uri(DESIRED)
                .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"));
            if let Some(ct) = ct {
                req = req.header(header::CONTENT_TYPE, ct);
            }
            let req = req.body(Body::from(r#"{"sp": 40}"#)).unwrap();
            let (status, json) = json_of(f.app.clone().oneshot(req).await.unwrap()).await;
            assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct:?}");
            assert!(
                json["error"].as_str().unwrap().contains("application/json"),
                "{json}"
            );
        }
        // GET on the desired route is not a thing.
        let (status, _) = call(&f.app, DESIRED, Some(ADMIN)).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        // Only the one change at the limit got through.
        let (_, twin) = get_json(&f.app, "/api/v1/nodes/gw-1/devices/plc1/twin").await;
        assert_eq!(
            twin["desired"]
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            vec!["mode"]
        );
        assert_eq!(twin["desired"]["mode"]["version"], 1);
    }

    #[tokio::test]
    async fn a_device_without_schema_cannot_take_desired_values() {
        let f = fixture().await;
        // gw-2's agent reports values but never described the device (protocol version 1).
        let n = NodeId::new("gw-2").unwrap();
        let sample = Sample {
            device: DeviceId::new("old").unwrap(),
            property: PropertyId::new("sp").unwrap(),
            value: Some(Value::Float(1.0)),
            quality: Quality::Good,
            ts: Timestamp(1_700_000_000_000),
        };
        f.store.commit_batch(&n, 1, &[sample]).await.unwrap();
        let uri = "/api/v1/nodes/gw-2/devices/old/twin/desired";
        let (status, json) = patch_json(&f.app, uri, r#"{"sp": 2.0}"#).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(json["fields"], json!({}));
        assert!(
            json["error"]
                .as_str()
                .unwrap()
                .contains("node gw-2 has not described device old"),
            "{json}"
        );
    }

    #[test]
    fn desired_errors_map_to_statuses() {
        let cases = [
            (
                DesiredError::Store(StoreError::Task("gone".into())),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                DesiredError::UnknownNode(NodeId::new("gw-9").unwrap()),
                StatusCode::NOT_FOUND,
            ),
            (
                DesiredError::UnknownDevice {
                    node: NodeId::new("gw-1").unwrap(),
                    device: DeviceId::new("plc9").unwrap(),
                },
                StatusCode::NOT_FOUND,
            ),
            (
                DesiredError::Invalid(vec![FieldError {
                    field: "sp".into(),
                    message: "bad".into(),
                }]),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
        ];
        for (e, status) in cases {
            assert_eq!(desired_error(e).status(), status);
        }
    }

    #[tokio::test]
    async fn a_failed_gaps_read_is_503() {
        let node = NodeId::new("gw-1").unwrap();
        let response = gaps_response(node, Err(StoreError::Task("gone".into()))).into_response();
        let (status, json) = json_of(response).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json, json!({"error": "store unavailable: gaps not read"}));
    }

    #[test]
    fn json_content_types() {
        for (ct, ok) in [
            ("application/json", true),
            ("Application/JSON; charset=utf-8", true),
            ("application/merge-patch+json", true),
            ("application/+json", false),
            ("application/jsonx", false),
            ("text/json", false),
            ("json", false),
            ("", false),
        ] {
            assert_eq!(
                is_json_content_type(&HeaderValue::from_static(ct)),
                ok,
                "{ct}"
            );
        }
    }

    #[tokio::test]
    async fn nodes_and_node() {
        let f = fixture().await;
        let (status, json) = get_json(&f.app, "/api/v1/nodes").await;
        assert_eq!(status, StatusCode::OK);
        let nodes = json.as_array().unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0]["node"], "gw-1");
        assert_eq!(nodes[1]["node"], "gw-2");
        let (status, json) = get_json(&f.app, "/api/v1/nodes/gw-1").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            json,
            json!({
                "node": "gw-1",
                "connected": true,
                "last_seen_ms": 1000,
                "remote_addr": "10.0.0.5:4433",
                "agent_version": "0.1.0",
                "boot_id": "boot-a",
                "uplink_seq": 2,
                "lost_records": 0,
                "backlog": 0,
                "config_version": 3,
                "devices": 1,
                "history_bytes": f.store.node(&NodeId::new("gw-1").unwrap()).unwrap().history_bytes,
                "history_from": 1,
                "svid_expires_ms": 1_767_225_600_000u64,
            })
        );
        assert!(json["history_bytes"].as_u64().unwrap() > 0);
        let (status, json) = get_json(&f.app, "/api/v1/nodes/gw-9").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(json["error"], "node gw-9 not found");
    }

    #[tokio::test]
    async fn records_are_served_in_pages_and_bad_queries_are_400() {
        let f = fixture().await;
        let (status, json) = get_json(&f.app, "/api/v1/nodes/gw-1/records").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json["node"], "gw-1");
        assert_eq!(json["history_from"], 1);
        assert_eq!(json["uplink_seq"], 2);
        assert_eq!(json["next_from"], serde_json::Value::Null);
        let records = json["records"].as_array().unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0]["seq"], 1);
        assert_eq!(records[0]["device"], "plc1");
        assert_eq!(records[0]["property"], "temp");
        assert_eq!(records[0]["value"], 21.5);
        assert_eq!(records[0]["quality"], "good");
        assert_eq!(records[1]["property"], "rpm");
        assert_eq!(records[1]["value"], serde_json::Value::Null);
        let (status, json) = get_json(&f.app, "/api/v1/nodes/gw-1/records?from=1&limit=1").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json["records"].as_array().unwrap().len(), 1);
        assert_eq!(json["next_from"], 2);
        let (_, json) = get_json(&f.app, "/api/v1/nodes/gw-1/records?from=2").await;
        assert_eq!(json["records"][0]["seq"], 2);
        for (query, message) in [
            ("limit=0", "limit: expected 1 to 10000, got 0"),
            ("limit=10001", "limit: expected 1 to 10000, got 10001"),
            (
                "from=-1",
                "from: expected a non-negative integer, got \"-1\"",
            ),
            (
                "from=abc",
                "from: expected a non-negative integer, got \"abc\"",
            ),
        ] {
            let (status, json) =
                get_json(&f.app, &format!("/api/v1/nodes/gw-1/records?{query}")).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
            assert_eq!(json["error"], message, "{query}");
        }
        let (status, _) = get_json(&f.app, "/api/v1/nodes/gw-9/records").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    /// Records lost at the edge: the gaps route, `lost_records` in the node status and the
    /// per-node metric, each counting a resent gap once.
    #[tokio::test]
    async fn gaps_are_served_per_node_and_counted_once() {
        let f = fixture().await;
        // A node of its own: the metric is process-wide and other tests store gaps too.
        let n = NodeId::new("gw-lossy").unwrap();
        f.store
            .node_connected(&n, ConnInfo::default(), 3_000)
            .unwrap();
        let uri = "/api/v1/nodes/gw-lossy/gaps";
        let (status, json) = get_json(&f.app, uri).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            json,
            json!({"node": "gw-lossy", "lost_records": 0, "gaps": []})
        );
        let sample = |seq: u64| Sample {
            device: DeviceId::new("plc1").unwrap(),
            property: PropertyId::new("temp").unwrap(),
            value: Some(Value::Float(1.0)),
            quality: Quality::Good,
            ts: Timestamp(seq),
        };
        f.store.commit_batch(&n, 1, &[sample(1)]).await.unwrap();
        assert_eq!(f.store.commit_gap(&n, 2, 6).await.unwrap().new_records, 5);
        // Resent after a reconnect: nothing new.
        assert_eq!(f.store.commit_gap(&n, 2, 6).await.unwrap().new_records, 0);
        f.store.commit_batch(&n, 7, &[sample(7)]).await.unwrap();
        // Overlapping what is stored: only 8..=9 is new.
        assert_eq!(f.store.commit_gap(&n, 5, 9).await.unwrap().new_records, 2);
        let (status, json) = get_json(&f.app, uri).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            json,
            json!({
                "node": "gw-lossy",
                "lost_records": 7,
                "gaps": [
                    {"from": 2, "to": 6, "records": 5},
                    {"from": 8, "to": 9, "records": 2},
                ],
            })
        );
        // The node status counts them too, from memory.
        let (_, json) = get_json(&f.app, "/api/v1/nodes/gw-lossy").await;
        assert_eq!(json["lost_records"], 7, "{json}");
        assert_eq!(json["uplink_seq"], 9, "{json}");
        let (_, json) = get_json(&f.app, "/api/v1/nodes").await;
        let lost: Vec<(&str, u64)> = json
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["node"].as_str().unwrap(),
                    n["lost_records"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(lost, vec![("gw-1", 0), ("gw-2", 0), ("gw-lossy", 7)]);
        // Another node's gaps are its own.
        let (_, json) = get_json(&f.app, "/api/v1/nodes/gw-1/gaps").await;
        assert_eq!(json, json!({"node": "gw-1", "lost_records": 0, "gaps": []}));
        // 404 and 400 like the other node routes.
        let (status, json) = get_json(&f.app, "/api/v1/nodes/gw-9/gaps").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(json, json!({"error": "node gw-9 not found"}));
        let (status, json) = get_json(&f.app, "/api/v1/nodes/-gw/gaps").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            json["error"].as_str().unwrap().starts_with("node id"),
            "{json}"
        );
        // Credentials: read by both roles, changed by nobody.
        for (method, token, expected) in [
            (Method::GET, None, StatusCode::UNAUTHORIZED),
            (Method::GET, Some("wrong"), StatusCode::UNAUTHORIZED),
            (Method::GET, Some(READER), StatusCode::OK),
            (Method::GET, Some(ADMIN), StatusCode::OK),
            (Method::HEAD, Some(READER), StatusCode::OK),
            (Method::DELETE, Some(READER), StatusCode::FORBIDDEN),
            (Method::DELETE, Some(ADMIN), StatusCode::METHOD_NOT_ALLOWED),
        ] {
            let response = send(&f.app, method.clone(), uri, token, None).await;
            assert_eq!(response.status(), expected, "{method} {token:?}");
        }
        // The metric counts each lost record once, labelled by node.
        let (status, response) = call(&f.app, "/metrics", None).await;
        assert_eq!(status, StatusCode::OK);
        let text = String::from_utf8(body(response).await).unwrap();
        assert!(
            text.contains("edgesync_hub_gap_records_total{node=\"gw-lossy\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP edgesync_hub_gap_records_total "),
            "{text}"
        );
        assert!(
            text.contains(
                r#"edgesync_hub_http_requests_total{route="/api/v1/nodes/{node}/gaps",status="200"}"#
            ),
            "{text}"
        );
    }

    #[tokio::test]
    async fn devices_device_and_twin() {
        let f = fixture().await;
        let (status, json) = get_json(&f.app, "/api/v1/nodes/gw-1/devices").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json, json!(["plc1"]));
        let (status, json) = get_json(&f.app, "/api/v1/nodes/gw-2/devices").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json, json!([]));
        let (status, json) = get_json(&f.app, "/api/v1/nodes/gw-1/devices/plc1").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json, json!({"device": "plc1", "properties": 2}));
        let (status, json) = get_json(&f.app, "/api/v1/nodes/gw-1/devices/plc1/twin").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            json,
            json!({
                "reported": {
                    "rpm": {"value": null, "quality": "bad: timeout", "ts": 1_700_000_000_100u64},
                    "temp": {"value": 21.5, "quality": "good", "ts": 1_700_000_000_000u64},
                },
                "desired": {},
                "delta": {},
            })
        );
    }

    #[tokio::test]
    async fn unknown_resources_are_404() {
        let f = fixture().await;
        for (uri, message) in [
            ("/api/v1/nodes/gw-9/devices", "node gw-9 not found"),
            ("/api/v1/nodes/gw-9/devices/plc1", "node gw-9 not found"),
            (
                "/api/v1/nodes/gw-1/devices/plc9",
                "device plc9 not found on node gw-1",
            ),
            (
                "/api/v1/nodes/gw-2/devices/plc1/twin",
                "device plc1 not found on node gw-2",
            ),
            ("/api/v1/nothing", "no such route"),
        ] {
            let (status, json) = get_json(&f.app, uri).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
            assert_eq!(json["error"], message, "{uri}");
        }
    }

    #[tokio::test]
    async fn malformed_ids_are_400_naming_the_field() {
        let f = fixture().await;
        for (uri, field) in [
            ("/api/v1/nodes/-gw", "node id"),
            ("/api/v1/nodes/gw%201/devices", "node id"),
            ("/api/v1/nodes/gw-1/devices/pl%2Fc", "device id"),
            ("/api/v1/nodes/gw-1/devices/.x/twin", "device id"),
        ] {
            let (status, json) = get_json(&f.app, uri).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
            let message = json["error"].as_str().unwrap();
            assert!(message.starts_with(field), "{uri}: {message}");
        }
        let long = format!("/api/v1/nodes/{}", "a".repeat(65));
        let (status, json) = get_json(&f.app, &long).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(json["error"].as_str().unwrap().starts_with("node id"));
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"", b"a"));
        let tokens = vec![ApiToken {
            name: "empty".into(),
            token: String::new(),
            role: Role::Admin,
        }];
        assert!(find_token(&tokens, "").is_none());
        let shown = format!("{:?}", tokens[0]);
        assert!(shown.contains("redacted"));
    }

    // ---- Server-sent events ----

    /// One SSE message as a client sees it (`None` fields were absent).
    #[derive(Debug, Clone, PartialEq)]
    struct Msg {
        id: Option<u64>,
        kind: Option<String>,
        data: Option<Json>,
        comment: Option<String>,
    }

    /// Reads SSE messages from text arriving in arbitrary pieces.
    struct SseClient {
        rx: mpsc::UnboundedReceiver<String>,
        buf: String,
    }

    impl SseClient {
        /// Reads the body of a response in a task of its own.
        fn from_response(response: Response) -> SseClient {
            let (tx, rx) = mpsc::unbounded_channel();
            let mut body = response.into_body();
            tokio::spawn(async move {
                while let Some(Ok(frame)) = body.frame().await {
                    if let Ok(data) = frame.into_data()
                        && tx.send(String::from_utf8(data.to_vec()).unwrap()).is_err()
                    {
                        break;
                    }
                }
            });
            SseClient {
                rx,
                buf: String::new(),
            }
        }

        /// The next message, comments included.
        async fn next_any(&mut self) -> Msg {
            loop {
                if let Some(end) = self.buf.find("\n\n") {
                    let block: String = self.buf.drain(..end + 2).collect();
                    return parse_block(&block);
                }
                let piece = tokio::time::timeout(Duration::from_secs(20), self.rx.recv())
                    .await
                    .expect("no SSE message within 20 s")
                    .expect("the stream ended");
                self.buf.push_str(&piece);
            }
        }

        /// The next event (keep-alive comments skipped).
        async fn next(&mut self) -> Msg {
            loop {
                let m = self.next_any().await;
                if m.comment.is_none() {
                    return m;
                }
            }
        }

        /// The next `n` events as `(id, kind)`.
        async fn ids(&mut self, n: usize) -> Vec<(u64, String)> {
            let mut out = vec![];
            for _ in 0..n {
                let m = self.next().await;
                out.push((m.id.unwrap(), m.kind.unwrap()));
            }
            out
        }

        /// Nothing more arrives within `ms` (real time).
        async fn quiet(&mut self, ms: u64) {
            if let Some(end) = self.buf.find("\n\n") {
                panic!("unexpected message: {:?}", &self.buf[..end]);
            }
            if let Ok(Some(piece)) =
                tokio::time::timeout(Duration::from_millis(ms), self.rx.recv()).await
            {
                panic!("unexpected message: {piece:?}");
            }
        }
    }

    fn parse_block(block: &str) -> Msg {
        let mut m = Msg {
            id: None,
            kind: None,
            data: None,
            comment: None,
        };
        for line in block.lines() {
            if let Some(c) = line.strip_prefix(':') {
                m.comment = Some(c.trim().to_owned());
            } else if let Some((field, value)) = line.split_once(':') {
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "id" => m.id = Some(value.parse().unwrap()),
                    "event" => m.kind = Some(value.to_owned()),
                    "data" => m.data = Some(serde_json::from_str(value).unwrap()),
                    other => panic!("unexpected field {other:?} in {block:?}"),
                }
            }
        }
        m
    }

    /// `GET /api/v1/events` with extra headers.
    async fn subscribe(f: &Fixture, uri: &str, headers: &[(&str, &str)]) -> Response {
        let mut req = HttpRequest::builder()
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {READER}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let response = f
            .app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers().get(header::CONTENT_TYPE).unwrap(),
            "text/event-stream"
        );
        response
    }

    fn publish(f: &Fixture, kind: &'static str, i: u64) -> u64 {
        f.store.events().publish(kind, json!({"i": i}))
    }

    #[tokio::test]
    async fn events_a_client_sees_what_is_published_after_it_connected() {
        let f = fixture().await;
        let before = publish(&f, "node_connected", 0);
        let mut client = SseClient::from_response(subscribe(&f, "/api/v1/events", &[]).await);
        // A desired change through the API is an event...
        let (status, _) = patch_json(&f.app, DESIRED, r#"{"sp": 40}"#).await;
        assert_eq!(status, StatusCode::OK);
        let m = client.next().await;
        assert_eq!(m.kind.as_deref(), Some("desired"));
        assert!(m.id.unwrap() > before);
        let data = m.data.unwrap();
        assert_eq!(data["node"], "gw-1");
        assert_eq!(data["device"], "plc1");
        assert_eq!(data["property"], "sp");
        assert_eq!(data["desired"]["value"], 40.0);
        assert_eq!(data["desired"]["version"], 1);
        assert_eq!(data["desired"]["by"], "ops");
        // ... and so is anything else published on the bus, in order.
        let a = publish(&f, "node_disconnected", 1);
        let b = publish(&f, "twin", 2);
        let m = client.next().await;
        assert_eq!(
            m,
            Msg {
                id: Some(a),
                kind: Some("node_disconnected".into()),
                data: Some(json!({"i": 1})),
                comment: None,
            }
        );
        assert_eq!(client.ids(1).await, vec![(b, "twin".to_owned())]);
        // What was published before it connected never comes.
        client.quiet(100).await;
    }

    /// What each kind of event carries (the shapes `docs/api.md` shows).
    #[tokio::test]
    async fn events_carry_every_kind_of_change() {
        use edgesync_protocol::frame::{Control, ControlKind, DesiredStatus};
        let f = fixture().await;
        let mut client = SseClient::from_response(subscribe(&f, "/api/v1/events", &[]).await);
        let n3 = NodeId::new("gw-3").unwrap();
        let info = ConnInfo {
            remote_addr: "10.0.0.7:50000".into(),
            agent_version: "0.2.0".into(),
            ..ConnInfo::default()
        };
        f.store.node_connected(&n3, info, 5_000).unwrap();
        let m = client.next().await;
        assert_eq!(m.kind.as_deref(), Some("node_connected"));
        assert_eq!(
            m.data.unwrap(),
            json!({"node": "gw-3", "remote_addr": "10.0.0.7:50000", "agent_version": "0.2.0", "ts_ms": 5000})
        );
        let sample = Sample {
            device: DeviceId::new("plc7").unwrap(),
            property: PropertyId::new("temp").unwrap(),
            value: Some(Value::Float(19.0)),
            quality: Quality::Good,
            ts: Timestamp(1_700_000_001_000),
        };
        f.store.commit_batch(&n3, 1, &[sample]).await.unwrap();
        let m = client.next().await;
        assert_eq!(m.kind.as_deref(), Some("twin"));
        assert_eq!(
            m.data.unwrap(),
            json!({"node": "gw-3", "device": "plc7", "reported": {
                "temp": {"value": 19.0, "quality": "good", "ts": 1_700_000_001_000u64}
            }})
        );
        let (status, _) = patch_json(&f.app, DESIRED, r#"{"sp": 40}"#).await;
        assert_eq!(status, StatusCode::OK);
        let m = client.next().await;
        assert_eq!(m.kind.as_deref(), Some("desired"));
        let data = m.data.unwrap();
        let set_ms = data["desired"]["set_ms"].as_u64().unwrap();
        assert_eq!(
            data,
            json!({"node": "gw-1", "device": "plc1", "property": "sp", "desired": {
                "value": 40.0, "version": 1, "origin": "hub", "set_ms": set_ms, "by": "ops",
                "applied": null,
            }})
        );
        // The node reports that version 1 was refused, then (a resend) nothing more.
        let status = |seq, outcome, detail: &str| Control {
            seq,
            kind: Some(ControlKind::Status(DesiredStatus {
                device: "plc1".into(),
                property: "sp".into(),
                version: 1,
                outcome,
                exception_code: 0,
                detail: detail.into(),
                ts_ms: 1_700_000_002_000,
            })),
        };
        let gw1 = NodeId::new("gw-1").unwrap();
        f.store
            .apply_control(&gw1, status(1, 4, "above the tag's limit"))
            .await
            .unwrap();
        let m = client.next().await;
        assert_eq!(m.kind.as_deref(), Some("applied"));
        let applied = json!({"version": 1, "outcome": "refused", "detail": "above the tag's limit", "ts_ms": 1_700_000_002_000u64});
        assert_eq!(
            m.data.unwrap(),
            json!({"node": "gw-1", "device": "plc1", "property": "sp", "applied": applied})
        );
        let (_, twin) = get_json(&f.app, "/api/v1/nodes/gw-1/devices/plc1/twin").await;
        assert_eq!(twin["desired"]["sp"]["applied"], applied);
        f.store.apply_control(&gw1, status(2, 1, "")).await.unwrap();
        let m = client.next().await;
        assert_eq!(
            m.data.unwrap()["applied"],
            json!({"version": 1, "outcome": "ok", "ts_ms": 1_700_000_002_000u64})
        );
        f.store.node_disconnected(&n3, 6_000).unwrap();
        let m = client.next().await;
        assert_eq!(m.kind.as_deref(), Some("node_disconnected"));
        assert_eq!(m.data.unwrap(), json!({"node": "gw-3", "ts_ms": 6000}));
        client.quiet(50).await;
    }

    #[tokio::test]
    async fn events_resume_after_last_event_id_then_continue_live() {
        let f = fixture().await;
        let ids: Vec<u64> = (0..4).map(|i| publish(&f, "twin", i)).collect();
        let last = ids[1].to_string();
        let mut header_client = SseClient::from_response(
            subscribe(&f, "/api/v1/events", &[("last-event-id", &last)]).await,
        );
        let query = format!("/api/v1/events?last_event_id={last}");
        let mut query_client = SseClient::from_response(subscribe(&f, &query, &[]).await);
        // The header wins over the query parameter.
        let mut both_client = SseClient::from_response(
            subscribe(
                &f,
                &format!("/api/v1/events?last_event_id={}", ids[0]),
                &[("Last-Event-ID", &ids[2].to_string())],
            )
            .await,
        );
        let live = publish(&f, "desired", 9);
        for client in [&mut header_client, &mut query_client] {
            assert_eq!(
                client.ids(3).await,
                vec![
                    (ids[2], "twin".to_owned()),
                    (ids[3], "twin".to_owned()),
                    (live, "desired".to_owned()),
                ]
            );
            client.quiet(50).await;
        }
        assert_eq!(
            both_client.ids(2).await,
            vec![(ids[3], "twin".to_owned()), (live, "desired".to_owned())]
        );
        both_client.quiet(50).await;
        // Resuming at the newest id: only live events. An empty header means no id.
        for headers in [
            vec![("last-event-id", live.to_string())],
            vec![("last-event-id", String::new())],
        ] {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let mut client =
                SseClient::from_response(subscribe(&f, "/api/v1/events", &headers).await);
            let next = publish(&f, "twin", 10);
            assert_eq!(client.ids(1).await, vec![(next, "twin".to_owned())]);
            client.quiet(50).await;
        }
    }

    #[tokio::test]
    async fn events_resuming_from_an_unknown_past_gets_resync_first() {
        let f = fixture().await;
        let first = publish(&f, "twin", 0);
        // An id from before this hub run (ids start at the start time in ms times 1000).
        let mut client = SseClient::from_response(
            subscribe(&f, "/api/v1/events", &[("Last-Event-ID", "12345")]).await,
        );
        let m = client.next().await;
        assert_eq!(m.kind.as_deref(), Some("resync"));
        assert_eq!(m.data.unwrap()["last_event_id"], 12345);
        // Then the whole buffer (the fixture's own events first), in order, without a gap.
        let mut previous = m.id.unwrap();
        loop {
            let id = client.next().await.id.unwrap();
            assert_eq!(id, previous + 1);
            previous = id;
            if id == first {
                break;
            }
        }
        client.quiet(50).await;
    }

    #[tokio::test]
    async fn events_resuming_from_an_id_never_issued_gets_resync_first() {
        let f = fixture().await;
        let last = publish(&f, "twin", 0);
        // An id above every issued one (a hub run whose clock was ahead, another hub).
        let future = (last + 1_000).to_string();
        let mut client = SseClient::from_response(
            subscribe(&f, "/api/v1/events", &[("Last-Event-ID", &future)]).await,
        );
        let m = client.next().await;
        assert_eq!(m.kind.as_deref(), Some("resync"));
        assert_eq!(m.data.unwrap()["last_event_id"].to_string(), future);
        let mut previous = m.id.unwrap();
        loop {
            let id = client.next().await.id.unwrap();
            assert_eq!(id, previous + 1);
            previous = id;
            if id == last {
                break;
            }
        }
        // Then live events.
        let next = publish(&f, "twin", 1);
        assert_eq!(client.ids(1).await, vec![(next, "twin".to_owned())]);
    }

    #[tokio::test]
    async fn events_streams_end_when_the_hub_shuts_down() {
        let f = fixture().await;
        let mut client = SseClient::from_response(subscribe(&f, "/api/v1/events", &[]).await);
        let id = publish(&f, "twin", 0);
        assert_eq!(client.ids(1).await, vec![(id, "twin".to_owned())]);
        f.shutdown.cancel();
        // The body ends (well before a keep-alive would be due).
        let ended = tokio::time::timeout(Duration::from_secs(2), async {
            while client.rx.recv().await.is_some() {}
        })
        .await;
        assert!(
            ended.is_ok(),
            "the event stream is still open after shutdown"
        );
    }

    #[tokio::test]
    async fn events_bad_last_event_id_is_400() {
        let f = fixture().await;
        for (uri, header_value, message) in [
            (
                "/api/v1/events",
                Some("abc"),
                "Last-Event-ID: expected an event id (a non-negative integer)",
            ),
            (
                "/api/v1/events",
                Some("-1"),
                "Last-Event-ID: expected an event id (a non-negative integer)",
            ),
            (
                "/api/v1/events?last_event_id=1e3",
                None,
                "last_event_id: expected an event id (a non-negative integer)",
            ),
        ] {
            let mut req = HttpRequest::builder()
                .uri(uri)
                .header(header::AUTHORIZATION, format!("Bearer {READER}"));
            if let Some(v) = header_value {
                req = req.header("last-event-id", v);
            }
            let response = f
                .app
                .clone()
                .oneshot(req.body(Body::empty()).unwrap())
                .await
                .unwrap();
            let (status, json) = json_of(response).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
            assert_eq!(json, json!({"error": message}));
        }
    }

    #[tokio::test]
    async fn events_a_lagging_client_gets_resync_and_continues() {
        let f = fixture().await;
        let response = subscribe(&f, "/api/v1/events", &[]).await;
        // The client reads nothing while more events are published than the channel holds
        // (tokio rounds its capacity up to a power of two); publishing never waits for it.
        let burst = (f.store.events().capacity().next_power_of_two() + 100) as u64;
        let ids: Vec<u64> = (0..burst).map(|i| publish(&f, "twin", i)).collect();
        let mut client = SseClient::from_response(response);
        let m = client.next().await;
        assert_eq!(m.kind.as_deref(), Some("resync"), "{m:?}");
        let data = m.data.unwrap();
        let missed = data["missed"].as_u64().unwrap();
        assert!(missed >= 100, "{data}");
        assert_eq!(data["last_event_id"], Json::Null);
        // It continues with the oldest event still in the channel, its id just above the
        // resync's, and then every later one in order.
        let resync_id = m.id.unwrap();
        let next = client.next().await;
        assert_eq!(next.id, Some(resync_id + 1));
        assert_eq!(next.id, Some(ids[missed as usize]));
        assert_eq!(next.data.unwrap()["i"], missed);
        for expected in &ids[missed as usize + 1..missed as usize + 50] {
            assert_eq!(client.next().await.id, Some(*expected));
        }
    }

    #[tokio::test]
    async fn subscription_resync_after_lag_keeps_the_last_sent_id() {
        let bus = crate::events::EventBus::new(16, 1);
        let (backlog, rx) = bus.subscribe(None);
        let mut sub = Subscription {
            backlog: backlog.into_iter(),
            rx,
            held: None,
            last_sent: None,
        };
        let first = bus.publish("twin", json!({}));
        assert_eq!(sub.next().await.unwrap().id, first);
        let ids: Vec<u64> = (0..40).map(|_| bus.publish("twin", json!({}))).collect();
        let resync = sub.next().await.unwrap();
        assert_eq!(resync.kind, "resync");
        assert_eq!(resync.json()["last_event_id"], first);
        assert_eq!(resync.json()["missed"], 24);
        assert_eq!(resync.id, ids[24] - 1);
        let mut got = vec![];
        for _ in 0..16 {
            got.push(sub.next().await.unwrap().id);
        }
        assert_eq!(got, ids[24..]);
        // A live event already sent (or older) is skipped.
        sub.last_sent = Some(u64::MAX - 1);
        bus.publish("twin", json!({}));
        drop(bus);
        assert!(sub.next().await.is_none());
    }

    #[tokio::test]
    async fn events_keep_alive_comments_when_idle() {
        let f = fixture().await;
        let response = subscribe(&f, "/api/v1/events", &[]).await;
        tokio::time::pause();
        let mut client = SseClient::from_response(response);
        let start = tokio::time::Instant::now();
        let m = client.next_any().await;
        assert_eq!(m.comment.as_deref(), Some("keep-alive"), "{m:?}");
        assert_eq!(m.id, None);
        // (The keep-alive timer started a moment before the clock was paused.)
        let idle = start.elapsed();
        assert!(idle > SSE_KEEP_ALIVE - Duration::from_secs(1), "{idle:?}");
        assert!(idle < SSE_KEEP_ALIVE + Duration::from_secs(1), "{idle:?}");
        // Events still flow afterwards.
        tokio::time::resume();
        let id = publish(&f, "twin", 0);
        assert_eq!(client.ids(1).await, vec![(id, "twin".to_owned())]);
    }

    /// Reads an HTTP/1.1 response over TCP: returns its head, and its chunked body as it
    /// arrives.
    async fn tcp_get(
        addr: std::net::SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (String, SseClient) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: hub\r\nAccept: text/event-stream\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        let head_end = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed before the response head");
            raw.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(raw[..head_end].to_vec()).unwrap();
        let mut rest = raw[head_end + 4..].to_vec();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            // Decodes `Transfer-Encoding: chunked`.
            loop {
                while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
                    let size_line = String::from_utf8(rest[..i].to_vec()).unwrap();
                    let size = usize::from_str_radix(size_line.trim(), 16).unwrap();
                    if size == 0 {
                        return;
                    }
                    if rest.len() < i + 2 + size + 2 {
                        break;
                    }
                    let data = rest[i + 2..i + 2 + size].to_vec();
                    rest.drain(..i + 2 + size + 2);
                    if tx.send(String::from_utf8(data).unwrap()).is_err() {
                        return;
                    }
                }
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => rest.extend_from_slice(&chunk[..n]),
                }
            }
        });
        (
            head,
            SseClient {
                rx,
                buf: String::new(),
            },
        )
    }

    #[tokio::test]
    async fn events_over_tcp_resume_then_stream_live() {
        let f = fixture().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = f.app.clone();
        let cancel = CancellationToken::new();
        let server = tokio::spawn(crate::http::serve(
            listener,
            app,
            crate::http::HttpLimits::default(),
            cancel.clone(),
        ));
        let ids: Vec<u64> = (0..3).map(|i| publish(&f, "twin", i)).collect();
        let auth = format!("Bearer {ADMIN}");
        let last = ids[0].to_string();
        let (head, mut client) = tcp_get(
            addr,
            "/api/v1/events",
            &[("Authorization", &auth), ("Last-Event-ID", &last)],
        )
        .await;
        let lower = head.to_ascii_lowercase();
        assert!(lower.starts_with("http/1.1 200"), "{head}");
        assert!(lower.contains("content-type: text/event-stream"), "{head}");
        assert!(lower.contains("transfer-encoding: chunked"), "{head}");
        assert_eq!(
            client.ids(2).await,
            vec![(ids[1], "twin".to_owned()), (ids[2], "twin".to_owned())]
        );
        // Live events arrive as they are published, over the same response.
        let (status, _) = patch_json(&f.app, DESIRED, r#"{"mode": "auto"}"#).await;
        assert_eq!(status, StatusCode::OK);
        let m = client.next().await;
        assert_eq!(m.kind.as_deref(), Some("desired"));
        assert!(m.id.unwrap() > ids[2]);
        assert_eq!(m.data.unwrap()["desired"]["value"], "auto");
        let next = publish(&f, "node_disconnected", 3);
        assert_eq!(
            client.ids(1).await,
            vec![(next, "node_disconnected".to_owned())]
        );
        // Without a token the stream is refused.
        let (head, _) = tcp_get(addr, "/api/v1/events", &[]).await;
        assert!(head.starts_with("HTTP/1.1 401"), "{head}");
        // Shutdown ends the open stream and the listener.
        cancel.cancel();
        f.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_body_sent_too_slowly_gets_408_and_the_value_is_not_set() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let f = fixture().await;
        let app = router_with_timeout(
            ApiState {
                store: f.store.clone(),
                tokens: Arc::new(ApiTokens::new(vec![ApiToken {
                    name: "ops".into(),
                    token: ADMIN.into(),
                    role: Role::Admin,
                }])),
                metrics: f.metrics.clone(),
                shutdown: f.shutdown.clone(),
            },
            Duration::from_millis(500),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(crate::http::serve(
            listener,
            app,
            crate::http::HttpLimits::default(),
            cancel.clone(),
        ));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let body = r#"{"mode": "auto"}"#;
        let head = format!(
            "PATCH {DESIRED} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        // Half the body, then nothing.
        s.write_all(&body.as_bytes()[..body.len() / 2])
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains("too slowly"), "{text}");
        assert!(started.elapsed() >= Duration::from_millis(400));
        // Nothing was set.
        let (status, twin) = get_json(&f.app, "/api/v1/nodes/gw-1/devices/plc1/twin").await;
        assert_eq!(status, StatusCode::OK);
        assert!(twin["desired"]["mode"].is_null(), "{twin}");
        cancel.cancel();
    }

    // ---- Token and TLS files reloaded ----

    const OLD: &str = "old-secret-0123456789";
    const NEW: &str = "new-secret-0123456789";

    /// The fixture's store behind an [`ApiAccess`] with `ops` (admin) read from `ops.token`
    /// (holding [`OLD`]) and `grafana` (read-only, [`READER`]) inline.
    async fn reloading_fixture() -> (Fixture, tempfile::TempDir, PathBuf, Arc<ApiAccess>, Router) {
        let f = fixture().await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ops.token");
        std::fs::write(&file, format!("  {OLD}\n")).unwrap();
        let access = ApiAccess::new(
            vec![
                ApiToken {
                    name: "ops".into(),
                    token: OLD.into(),
                    role: Role::Admin,
                },
                ApiToken {
                    name: "grafana".into(),
                    token: READER.into(),
                    role: Role::ReadOnly,
                },
            ],
            vec![TokenFile {
                name: "ops".into(),
                path: file.clone(),
            }],
            None,
        )
        .unwrap();
        let app = router(ApiState {
            store: f.store.clone(),
            tokens: access.tokens(),
            metrics: f.metrics.clone(),
            shutdown: f.shutdown.clone(),
        });
        (f, dir, file, access, app)
    }

    async fn status_with(app: &Router, token: &str) -> StatusCode {
        call(app, "/api/v1/nodes", Some(token)).await.0
    }

    #[tokio::test]
    async fn a_rotated_token_file_replaces_the_secret_at_once() {
        let (f, _dir, file, access, app) = reloading_fixture().await;
        assert_eq!(status_with(&app, OLD).await, StatusCode::OK);
        // The file as the config read it: nothing to do.
        assert_eq!(access.reload(Trigger::Watch), Reloaded::default());
        assert_eq!(access.reload(Trigger::Signal), Reloaded::default());

        std::fs::write(&file, format!("{NEW}\n")).unwrap();
        let done = access.reload(Trigger::Signal);
        assert_eq!(
            done,
            Reloaded {
                tokens: 1,
                tls: false,
                errors: 0
            }
        );
        assert_eq!(status_with(&app, OLD).await, StatusCode::UNAUTHORIZED);
        assert_eq!(status_with(&app, NEW).await, StatusCode::OK);
        // The new secret has the token's role; the inline token is untouched.
        let (status, _) = patch_json(&app, DESIRED, "{}").await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "ADMIN is not configured here"
        );
        let response = send(
            &app,
            Method::PATCH,
            DESIRED,
            Some(NEW),
            Some("{\"mode\": \"auto\"}"),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(status_with(&app, READER).await, StatusCode::OK);

        // The periodic check sees the same, and back again.
        assert_eq!(access.reload(Trigger::Watch), Reloaded::default());
        std::fs::write(&file, OLD).unwrap();
        assert_eq!(access.reload(Trigger::Watch).tokens, 1);
        assert_eq!(status_with(&app, OLD).await, StatusCode::OK);
        assert_eq!(status_with(&app, NEW).await, StatusCode::UNAUTHORIZED);

        let text = f.metrics.render();
        assert!(text.contains(TOKEN_RELOADS_TOTAL), "{text}");
        assert!(text.contains(TOKEN_RELOAD_ERRORS_TOTAL), "{text}");
    }

    #[tokio::test]
    async fn an_unusable_token_file_keeps_the_previous_secret() {
        let (_f, _dir, file, access, app) = reloading_fixture().await;
        let one_error = Reloaded {
            tokens: 0,
            tls: false,
            errors: 1,
        };
        let bad: &[&[u8]] = &[
            b"",
            b"  \n",
            b"short\n",
            b"0123456789 abcdefghij",
            b"\xff\xfe0123456789abcdefghij",
            // Another token's secret.
            READER.as_bytes(),
        ];
        for content in bad {
            std::fs::write(&file, content).unwrap();
            assert_eq!(access.reload(Trigger::Signal), one_error, "{content:?}");
            assert_eq!(status_with(&app, OLD).await, StatusCode::OK, "{content:?}");
            assert_eq!(status_with(&app, READER).await, StatusCode::OK);
        }
        // Missing, and not a file.
        std::fs::remove_file(&file).unwrap();
        assert_eq!(access.reload(Trigger::Signal), one_error);
        std::fs::create_dir(&file).unwrap();
        assert_eq!(access.reload(Trigger::Signal), one_error);
        assert_eq!(status_with(&app, OLD).await, StatusCode::OK);
        std::fs::remove_dir(&file).unwrap();

        // The periodic check logs the same unusable content once, after a few checks (a file
        // being rewritten is unusable for a moment).
        std::fs::write(&file, "short").unwrap();
        let errors: Vec<usize> = (0..5)
            .map(|_| access.reload(Trigger::Watch).errors)
            .collect();
        assert_eq!(errors, [0, 0, 1, 0, 0]);
        // A SIGHUP logs it again.
        assert_eq!(access.reload(Trigger::Signal), one_error);
        assert_eq!(access.reload(Trigger::Watch).errors, 0);
        assert_eq!(status_with(&app, OLD).await, StatusCode::OK);

        // A usable file later is used.
        std::fs::write(&file, NEW).unwrap();
        assert_eq!(access.reload(Trigger::Watch).tokens, 1);
        assert_eq!(status_with(&app, NEW).await, StatusCode::OK);
        assert_eq!(status_with(&app, OLD).await, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn token_file_problems_are_phrased_like_the_config() {
        let secret = |b: &[u8]| token_secret(&Ok(b.to_vec()));
        assert_eq!(
            secret(b"  abcdefghijklmnop \n").unwrap(),
            "abcdefghijklmnop"
        );
        assert_eq!(secret(b"\n").unwrap_err(), "it is empty");
        assert_eq!(
            secret(b"abc").unwrap_err(),
            "the token in it is 3 characters long, shorter than 16"
        );
        assert_eq!(
            secret(b"abcdefgh ijklmnopq").unwrap_err(),
            "the token in it may only hold visible ASCII characters (no spaces)"
        );
        assert_eq!(secret(b"\xff").unwrap_err(), "it is not UTF-8 text");
        let missing = read_access_file(FsPath::new("/nonexistent/ops.token")).unwrap_err();
        assert!(missing.starts_with("cannot read it: "), "{missing}");
        let tokens = ApiTokens::new(vec![
            ApiToken {
                name: "a".into(),
                token: OLD.into(),
                role: Role::Admin,
            },
            ApiToken {
                name: "b".into(),
                token: NEW.into(),
                role: Role::ReadOnly,
            },
        ]);
        assert_eq!(
            tokens.set_secret("a", NEW).unwrap_err(),
            "the same secret is already used by token \"b\""
        );
        assert!(tokens.set_secret("c", "whatever-0123456789").is_err());
        assert_eq!(tokens.set_secret("a", OLD), Ok(false));
        assert_eq!(tokens.set_secret("a", "another-0123456789"), Ok(true));
        assert_eq!(tokens.current()[0].token, "another-0123456789");
        assert_eq!(tokens.current()[1].token, NEW);
    }

    #[test]
    fn tls_files_are_reloaded_only_when_usable() {
        use crate::http::test_tls::mint;
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: dir.path().join("api.crt"),
            key: dir.path().join("api.key"),
        };
        let (a, b) = (mint(), mint());
        std::fs::write(&files.cert, &a.cert_pem).unwrap();
        std::fs::write(&files.key, &a.key_pem).unwrap();
        let access = ApiAccess::new(Vec::new(), Vec::new(), Some(files.clone())).unwrap();
        assert!(access.tls_config().is_some());
        let presented = || access.tls.as_ref().unwrap().cert.current().cert[0].clone();
        assert_eq!(presented(), a.leaf);
        assert_eq!(access.reload(Trigger::Watch), Reloaded::default());

        // A new certificate with the old key (a rotation half done): kept.
        std::fs::write(&files.cert, &b.cert_pem).unwrap();
        assert_eq!(access.reload(Trigger::Signal).errors, 1);
        assert_eq!(presented(), a.leaf);
        // Both files written: used.
        std::fs::write(&files.key, &b.key_pem).unwrap();
        let done = access.reload(Trigger::Watch);
        assert!(done.tls && done.errors == 0, "{done:?}");
        assert_eq!(presented(), b.leaf);
        // A file gone: kept.
        std::fs::remove_file(&files.key).unwrap();
        assert_eq!(access.reload(Trigger::Signal).errors, 1);
        assert_eq!(presented(), b.leaf);

        // At startup, an unusable pair is an error naming the field and the file.
        let e = ApiAccess::new(Vec::new(), Vec::new(), Some(files.clone())).unwrap_err();
        assert!(
            e.starts_with(&format!(
                "tls_key {}: cannot read it: ",
                files.key.display()
            )),
            "{e}"
        );
        std::fs::write(&files.key, &a.key_pem).unwrap();
        let e = ApiAccess::new(Vec::new(), Vec::new(), Some(files.clone())).unwrap_err();
        assert!(e.contains("the private key does not belong"), "{e}");
    }
}
