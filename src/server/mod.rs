//! `metaorch serve`: the orchestrator behind HTTP (axum), with its own API and an
//! OpenAI-compatible face, so any OpenAI client can call it by changing `base_url`.
//!
//! One orchestrator serves every request, so limits, the retry budget and breakers are
//! shared as provider keys require. Requests past `max_in_flight` are refused at once
//! with 503 and `Retry-After`: no unbounded queue. On shutdown the server first reports
//! not-ready and refuses new work while in-flight requests finish (up to
//! `drain_timeout`), then stops accepting connections.

mod chat;
mod error;
mod orchestrate;

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::Orchestrator;
use crate::config::ServerConfig;
use crate::telemetry::{TraceId, TraceRing};

pub use error::ApiError;

/// What every handler shares.
#[derive(Debug)]
pub struct ServerState {
    orchestrator: Orchestrator,
    config: ServerConfig,
    admission: Arc<Semaphore>,
    draining: AtomicBool,
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
        Arc::new(ServerState {
            admission: Arc::new(Semaphore::new(config.max_in_flight)),
            orchestrator,
            config,
            draining: AtomicBool::new(false),
            ring,
            // A server is scraped: install the process's Prometheus recorder.
            metrics: crate::telemetry::metrics::install(),
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

/// Holds a request's admission slot until the request (and its stream) is done.
struct Admission {
    _permit: OwnedSemaphorePermit,
}

/// The HTTP API.
pub fn router(state: Arc<ServerState>) -> Router {
    let api = Router::new()
        .route("/v1/orchestrate", post(orchestrate::orchestrate))
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/models", get(chat::models))
        .route("/v1/agents", get(agents))
        .route("/v1/traces/{trace_id}", get(trace))
        .route("/metrics", get(metrics))
        .route("/readyz", get(readyz))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            authenticate,
        ))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(api)
        .fallback(not_found)
        .with_state(state)
}

/// Serves until `shutdown` resolves, then drains: readiness fails, new work gets 503,
/// in-flight requests finish (up to `drain_timeout`), and the listener closes.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ServerState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let app = router(Arc::clone(&state));
    let drain_state = Arc::clone(&state);
    let stop = async move {
        shutdown.await;
        let state = drain_state;
        state.draining.store(true, Ordering::Release);
        let in_flight = state.in_flight();
        tracing::warn!(
            event = "server.draining",
            in_flight,
            drain_timeout_ms = state.config.drain_timeout.as_secs_f64() * 1000.0,
            "shutting down: refusing new requests, waiting for {in_flight} in flight"
        );
        // Poll rather than wait for a wake-up, which two requests finishing at once
        // could both miss. Responses still being written are then awaited by the
        // graceful shutdown itself.
        let deadline = tokio::time::Instant::now() + state.config.drain_timeout;
        while state.in_flight() > 0 {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    event = "server.drain_timeout",
                    in_flight = state.in_flight(),
                    "drain timeout passed; closing with requests still in flight"
                );
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        tracing::info!(event = "server.stopped", "stopped accepting connections");
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
}

/// Optional bearer-token auth, compared in constant time.
async fn authenticate(
    State(state): State<Arc<ServerState>>,
    request: Request,
    next: Next,
) -> Response {
    let tokens = &state.config.auth_tokens;
    if tokens.is_empty() {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Every token is compared, so the time taken says nothing about which matched.
    let matched = tokens.iter().fold(0u8, |acc, t| {
        acc | t.expose().as_bytes().ct_eq(given.as_bytes()).unwrap_u8()
    });
    if matched == 1 {
        next.run(request).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "a valid bearer token is required: send Authorization: Bearer <token> (server.auth_tokens or METAORCH_SERVER_TOKENS)",
        )
        .into_response()
    }
}

async fn healthz() -> Json<serde_json::Value> {
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

async fn trace(
    State(state): State<Arc<ServerState>>,
    Path(trace_id): Path<String>,
) -> Result<Response, ApiError> {
    let id: TraceId = trace_id.to_ascii_lowercase().parse().map_err(|_| {
        ApiError::bad_request(
            format!("\"{trace_id}\" is not a trace id; expected 32 hex digits"),
            Some("trace_id"),
        )
    })?;
    let ring = state.ring.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "this server keeps no recent traces",
        )
    })?;
    match ring.timeline(&id.to_string()) {
        Some(timeline) => Ok(Json(timeline).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no recent request has trace id {id}; only the most recent ones are kept"),
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
            handle.render(),
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

/// The body's bytes, or the JSON error a client should see: 413 past the limit, 415
/// for anything but JSON.
fn json_body(
    headers: &HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<axum::body::Bytes, ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    if !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with Content-Type: application/json",
        ));
    }
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                "the request body is larger than server.max_body_bytes",
            )
        } else {
            ApiError::bad_request(format!("cannot read the body: {rejection}"), None)
        }
    })
}

/// Parses a JSON body, naming the field in the error.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = (path != ".").then_some(path);
        let inner = e.into_inner();
        let message = match &field {
            Some(f) => format!("{f}: {inner}"),
            None => format!("the body is not valid JSON for this endpoint: {inner}"),
        };
        ApiError::bad_request(message, field.as_deref())
    })
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
