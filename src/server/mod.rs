//! `metaorch serve`: the orchestrator behind HTTP (axum), with its own API and an
//! OpenAI-compatible face, so any OpenAI client can call it by changing `base_url`.
//!
//! One orchestrator serves every request, so limits, the retry budget and breakers are
//! shared as provider keys require. Requests past `max_in_flight` are refused at once
//! with 503 and `Retry-After`: no unbounded queue. Connections are bounded too
//! (`listener.rs`): slow clients are cut off by header and body timeouts, and past
//! `max_connections` new ones get 503 (`/healthz` still answers). Each request runs in
//! a task of its own (`running.rs`), so one whose client goes away still ends properly.
//! Shutdown (`shutdown.rs`) drains, then closes, within `drain_timeout`.

mod auth;
mod body;
mod chat;
mod error;
mod listener;
mod orchestrate;
mod redact;
mod running;
mod shutdown;

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Orchestrator;
use crate::config::ServerConfig;
use crate::telemetry::{RequestId, TraceId, TraceRing};

pub use error::ApiError;
pub use listener::OVERFLOW_CONNECTIONS;
pub use shutdown::CANCEL_GRACE;

/// What every handler shares.
#[derive(Debug)]
pub struct ServerState {
    orchestrator: Orchestrator,
    config: ServerConfig,
    /// One permit per request in flight (`max_in_flight`).
    admission: Arc<Semaphore>,
    draining: AtomicBool,
    /// The bearer tokens, as tags (see [`auth`]).
    tokens: auth::Tokens,
    /// The parent of every request's cancellation: cancelled when the drain times out.
    cancel: CancellationToken,
    /// Every request's task, so the drain can wait for them.
    requests: TaskTracker,
    ring: Option<TraceRing>,
    metrics: Option<&'static metrics_exporter_prometheus::PrometheusHandle>,
}

impl ServerState {
    /// State for a server over `orchestrator`. `ring`, when given, holds recent log
    /// lines for `GET /v1/traces/{id}` (see [`crate::telemetry::init_logging_with_ring`]).
    pub fn new(
        orchestrator: Orchestrator,
        config: ServerConfig,
        ring: Option<TraceRing>,
    ) -> Arc<Self> {
        // A server is scraped: install the process's Prometheus recorder, and list
        // every documented metric at zero before the first request.
        let metrics = crate::telemetry::metrics::install();
        orchestrator.prime_metrics();
        crate::telemetry::metrics::prime_server();
        Arc::new(ServerState {
            admission: Arc::new(Semaphore::new(config.max_in_flight)),
            tokens: auth::Tokens::new(&config.auth_tokens),
            orchestrator,
            config,
            draining: AtomicBool::new(false),
            cancel: CancellationToken::new(),
            requests: TaskTracker::new(),
            ring,
            metrics,
        })
    }

    /// Requests being served now.
    pub fn in_flight(&self) -> usize {
        self.config.max_in_flight - self.admission.available_permits()
    }

    /// True once shutdown has begun.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// A slot for one request, or 503 when the server is full or draining.
    fn admit(&self) -> Result<Admission, ApiError> {
        if self.draining() {
            return Err(ApiError::unavailable(
                "the server is shutting down; retry on another instance",
            ));
        }
        let permit = Arc::clone(&self.admission).try_acquire_owned().map_err(|_| {
            ApiError::unavailable(format!(
                "{} requests are in flight, the most this server takes (server.max_in_flight); retry shortly",
                self.config.max_in_flight
            ))
        })?;
        Ok(Admission { _permit: permit })
    }
}

/// Holds a request's admission slot until the request is done.
#[derive(Debug)]
struct Admission {
    _permit: OwnedSemaphorePermit,
}

/// The HTTP API. `/healthz` and `/readyz` never need a token (probes carry none);
/// `/metrics` needs one when `server.metrics_auth` is on; everything else does
/// whenever tokens are configured. Bodies are read (within `body_read_timeout`) only
/// once the token is checked.
pub fn router(state: Arc<ServerState>) -> Router {
    let auth = || middleware::from_fn_with_state(Arc::clone(&state), auth::require_token);
    let api = Router::new()
        .route("/v1/orchestrate", post(orchestrate::orchestrate))
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/models", get(chat::models))
        .route("/v1/agents", get(agents))
        .route("/v1/cluster", get(cluster))
        .route("/v1/traces/{trace_id}", get(trace))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            body::read_body,
        ))
        .route_layer(auth());
    let mut metrics_route = Router::new().route("/metrics", get(metrics));
    if state.config.metrics_auth {
        metrics_route = metrics_route.route_layer(auth());
    }
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(metrics_route)
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .with_state(state)
}

/// Serves until `shutdown` resolves, then drains and closes within `drain_timeout`
/// (see `shutdown.rs`): readiness fails, new work gets 503, in-flight requests finish or
/// — past the timeout — are cancelled, and every connection closes. Returns once the
/// last one has.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ServerState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let mut connections = listener::Connections::new(&state);
    let drained = shutdown::drain(&state, shutdown);
    tokio::pin!(drained);
    let deadline = loop {
        tokio::select! {
            deadline = &mut drained => break deadline,
            accepted = listener.accept() => connections.accept(accepted).await,
            () = connections.reap() => {}
        }
    };
    drop(listener);
    shutdown::close(&state, &mut connections, deadline).await;
    Ok(())
}

pub(super) async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<Arc<ServerState>>) -> Response {
    if state.draining() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining", "in_flight": state.in_flight()})),
        )
            .into_response()
    } else {
        Json(json!({"status": "ready", "in_flight": state.in_flight()})).into_response()
    }
}

async fn agents(State(state): State<Arc<ServerState>>) -> Json<serde_json::Value> {
    let breakers = state.orchestrator.breakers();
    let lanes = state.orchestrator.lanes();
    let agents: Vec<_> = state
        .orchestrator
        .agents()
        .map(|a| {
            let breaker = breakers
                .iter()
                .find(|b| b.provider == a.provider && b.model == a.model);
            let flow = lanes
                .iter()
                .find(|l| l.provider == a.provider && l.model == a.model);
            json!({
                "id": a.id,
                "role": a.role,
                "provider": a.provider,
                "model": a.model,
                "stream": a.stream,
                "breaker": breaker,
                "flow": flow,
            })
        })
        .collect();
    Json(json!({ "agents": agents }))
}

/// `GET /v1/cluster`: the instances sharing limits through Redis, each lane's shared
/// limits and this instance's part of them; without `[redis]`, says so.
async fn cluster(State(state): State<Arc<ServerState>>) -> Json<serde_json::Value> {
    match state.orchestrator.flow().cluster() {
        Some(cluster) => Json(json!(cluster.snapshot().await)),
        None => Json(json!({
            "state": "off",
            "message": "no [redis] in the config: every limit is this instance's alone",
        })),
    }
}

/// `GET /v1/traces/{trace_id}[?request_id=…]`: a recent request's timeline; of a trace
/// that holds several requests, the one named, else the one that started last.
async fn trace(
    State(state): State<Arc<ServerState>>,
    Path(trace_id): Path<String>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let id: TraceId = trace_id.to_ascii_lowercase().parse().map_err(|_| {
        ApiError::bad_request(
            format!("\"{trace_id}\" is not a trace id; expected 32 hex digits"),
            Some("trace_id"),
        )
    })?;
    let request_id = query_param(&uri, "request_id")
        .map(|r| {
            r.to_ascii_lowercase().parse::<RequestId>().map_err(|_| {
                ApiError::bad_request(
                    format!("\"{r}\" is not a request id; expected 16 hex digits"),
                    Some("request_id"),
                )
            })
        })
        .transpose()?;
    let ring = state.ring.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "this server keeps no recent traces",
        )
    })?;
    let id = id.to_string();
    let timeline = match request_id {
        Some(r) => ring.request_timeline(&id, &r.to_string()),
        None => ring.timeline(&id),
    };
    match (timeline, request_id) {
        (Some(timeline), _) => Ok(Json(timeline).into_response()),
        (None, None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no recent request has trace id {id}; only the most recent ones are kept"),
        )),
        (None, Some(r)) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no recent request of trace {id} has request id {r}; only the most recent ones are kept"
            ),
        )),
    }
}

/// Prometheus text format.
async fn metrics(State(state): State<Arc<ServerState>>) -> Response {
    match state.metrics {
        Some(handle) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            crate::telemetry::metrics::render(handle),
        )
            .into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "metrics are off: another metrics recorder was installed in this process",
        )
        .into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see POST /v1/orchestrate, POST /v1/chat/completions, GET /v1/agents, GET /v1/traces/{id}, GET /metrics, GET /healthz, GET /readyz",
    )
}

/// 405, with the JSON error body (axum adds the `Allow` header).
async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{method} is not allowed on {}; the Allow header lists the methods that are",
            uri.path()
        ),
    )
}

/// The value of `name` in the URI's query string (ids only: no percent-decoding).
fn query_param<'a>(uri: &'a Uri, name: &str) -> Option<&'a str> {
    uri.query()?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// The trace id of an incoming W3C `traceparent` (`00-<trace id>-<parent id>-<flags>`).
fn traceparent(headers: &HeaderMap) -> Option<(TraceId, u64)> {
    let value = headers.get("traceparent")?.to_str().ok()?;
    let mut parts = value.trim().split('-');
    let (version, trace_id, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || parent.len() != 16 || flags.len() != 2 {
        return None;
    }
    let parent = u64::from_str_radix(parent, 16).ok().filter(|p| *p != 0)?;
    Some((trace_id.parse().ok()?, parent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_gives_its_trace_id() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let (trace_id, parent) = traceparent(&h).unwrap();
        assert_eq!(trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parent, 0x00f0_67aa_0ba9_02b7);
        for bad in [
            "00-0000000000000000000000000000000000-00f067aa0ba902b7-01",
            "garbage",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            h.insert("traceparent", bad.parse().unwrap());
            assert!(traceparent(&h).is_none(), "{bad}");
        }
    }
}
