//! The hub's HTTP API (axum): health, readiness, Prometheus metrics, and the read side of nodes,
//! devices and twins.
//!
//! `/healthz`, `/readyz` and `/metrics` need no credentials; everything under `/api/v1` needs
//! `Authorization: Bearer <token>` with a configured token (compared in constant time). Both
//! roles may read. Errors are JSON `{"error": "..."}`: 400 for malformed ids (the message names
//! the field), 401 with `WWW-Authenticate: Bearer` for missing or unknown tokens, 404 for unknown
//! nodes and devices. Every response is counted by route pattern and status.

use std::fmt;
use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use edgesync_protocol::{DeviceId, NodeId};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};

use crate::store::HubStore;
use crate::telemetry::{self, AuthFailure};

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

/// What the API handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The hub store.
    pub store: Arc<HubStore>,
    /// The accepted tokens.
    pub tokens: Arc<Vec<ApiToken>>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
}

impl fmt::Debug for ApiState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiState")
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

/// Builds the API router (state applied; serve it with `axum::serve`).
pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/api/v1/nodes", get(list_nodes))
        .route("/api/v1/nodes/{node}", get(get_node))
        .route("/api/v1/nodes/{node}/devices", get(list_devices))
        .route("/api/v1/nodes/{node}/devices/{device}", get(get_device))
        .route("/api/v1/nodes/{node}/devices/{device}/twin", get(get_twin))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .merge(api)
        .fallback(not_found)
        .layer(middleware::from_fn(count_requests))
        .with_state(state)
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

/// Lets through requests bearing a configured token; refuses the others with 401.
async fn require_token(State(state): State<ApiState>, mut req: Request, next: Next) -> Response {
    let route = route_of(&req);
    let Some(presented) = bearer(&req) else {
        telemetry::auth_failure(AuthFailure::Missing, &route);
        return unauthorized("missing bearer token");
    };
    let Some(token) = find_token(&state.tokens, presented) else {
        telemetry::auth_failure(AuthFailure::Invalid, &route);
        return unauthorized("invalid bearer token");
    };
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
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store not ready").into_response()
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use axum::body::Body;
    use axum::http::Request as HttpRequest;
    use edgesync_protocol::{PropertyId, Quality, Sample, Timestamp, Value};
    use http_body_util::BodyExt;
    use serde_json::{Value as Json, json};
    use tower::ServiceExt;

    use super::*;
    use crate::store::ConnInfo;

    const ADMIN: &str = "admin-secret-token";
    const READER: &str = "reader-secret-token";

    struct Fixture {
        _dir: tempfile::TempDir,
        app: Router,
        metrics: PrometheusHandle,
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
        let app = router(ApiState {
            store,
            tokens: Arc::new(tokens),
            metrics: metrics.clone(),
        });
        Fixture {
            _dir: dir,
            app,
            metrics,
        }
    }

    async fn call(app: &Router, uri: &str, token: Option<&str>) -> (StatusCode, Response) {
        let mut req = HttpRequest::builder().uri(uri);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let response = app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
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

    async fn get_json(app: &Router, uri: &str) -> (StatusCode, Json) {
        let (status, response) = call(app, uri, Some(READER)).await;
        let ct = response.headers().get(header::CONTENT_TYPE).cloned();
        assert_eq!(
            ct.as_ref().and_then(|c| c.to_str().ok()),
            Some("application/json")
        );
        (
            status,
            serde_json::from_slice(&body(response).await).unwrap(),
        )
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
                "backlog": 0,
                "config_version": 3,
                "devices": 1,
            })
        );
        let (status, json) = get_json(&f.app, "/api/v1/nodes/gw-9").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(json["error"], "node gw-9 not found");
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
}
