//! `POST /v1/orchestrate`: a query in, the same JSON as `metaorch run --format json`
//! out; or, with `Accept: text/event-stream`, the request's progress as server-sent
//! events (`agent.dispatch`, `agent.retry`, `agent.done`, `synthesis.start`,
//! `synthesis.delta` as the answer is written, then `result`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde::Deserialize;
use serde_json::json;

use super::body::{json_body, parse};
use super::running::RunningRequest;
use super::{ApiError, ServerState, redact, traceparent};
use crate::executor::AgentEvent;
use crate::orchestrator::{Request, RequestError};
use crate::telemetry::{RequestId, TraceId};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    query: String,
    #[serde(default)]
    agents: Option<Vec<String>>,
    /// Shortens the server's deadline; held to `server.max_request_timeout`.
    #[serde(default)]
    timeout_ms: Option<u64>,
}

pub(super) async fn orchestrate(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let admission = state.admit()?;
    let body: Body = parse(&json_body(&headers, body)?)?;
    let mut request = Request::new(body.query);
    if let Some(agents) = body.agents {
        request = request.with_agents(agents);
    }
    if let Some(ms) = body.timeout_ms {
        request = request.with_timeout(Duration::from_millis(ms));
    }
    let (request, ids) = prepare(&state, &headers, request)?;

    let wants_events = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if !wants_events {
        let response = RunningRequest::spawn(&state, request, admission)
            .finish()
            .await?;
        return Ok(ids.on(Json(redact::response(response)).into_response()));
    }

    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let request = request.with_events(tx);
    // The stream holds the running request: if the client goes away and the stream
    // is dropped, the request is cancelled and ends as `cancelled`.
    let running = RunningRequest::spawn(&state, request, admission);
    let events = stream::unfold((rx, Some(running)), |(mut rx, running)| async move {
        if let Some(event) = rx.recv().await {
            return Some((Ok::<_, Infallible>(sse_event(&event)), (rx, running)));
        }
        let event = match running?.finish().await {
            Ok(response) => Event::default()
                .event("result")
                .json_data(redact::response(response))
                .unwrap_or_default(),
            Err(e) => error_event(e.message()),
        };
        Some((Ok(event), (rx, None)))
    });
    let sse = Sse::new(events).keep_alive(KeepAlive::default());
    Ok(ids.on(sse.into_response()))
}

/// A request's ids, sent back as `X-Trace-Id` and `X-Request-Id`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ids {
    pub(super) trace_id: TraceId,
    pub(super) request_id: RequestId,
}

impl Ids {
    pub(super) fn on(self, mut response: Response) -> Response {
        for (name, value) in [
            ("x-trace-id", self.trace_id.to_string()),
            ("x-request-id", self.request_id.to_string()),
        ] {
            if let Ok(v) = HeaderValue::from_str(&value) {
                response.headers_mut().insert(name, v);
            }
        }
        response
    }
}

/// Sets the request's ids (the trace id from `traceparent`, else new; a new request
/// id), its deadline (held to `server.max_request_timeout`) and its cancellation (a
/// child of the server's), and checks the request and the query's length, before any
/// work starts.
pub(super) fn prepare(
    state: &ServerState,
    headers: &HeaderMap,
    mut request: Request,
) -> Result<(Request, Ids), ApiError> {
    let chars = request.query.chars().count();
    if chars > state.config.max_query_chars {
        return Err(ApiError::bad_request(
            format!(
                "query: is {chars} characters long; the limit is {} (server.max_query_chars)",
                state.config.max_query_chars
            ),
            Some("query"),
        ));
    }
    let trace_id = match traceparent(headers) {
        Some((trace_id, parent)) => {
            request = request.with_parent_span(parent);
            trace_id
        }
        None => TraceId::random(),
    };
    let request_id = RequestId::random();
    let timeout = state
        .config
        .request_deadline(request.timeout, state.orchestrator.request_timeout());
    let request = request
        .with_trace_id(trace_id)
        .with_request_id(request_id)
        .with_timeout(timeout)
        .with_cancel(state.cancel.child_token());
    state.orchestrator.check(&request).map_err(request_error)?;
    Ok((
        request,
        Ids {
            trace_id,
            request_id,
        },
    ))
}

pub(super) fn request_error(e: RequestError) -> ApiError {
    let param = match &e {
        RequestError::EmptyQuery => Some("query"),
        RequestError::ZeroTimeout => Some("timeout_ms"),
        RequestError::UnknownAgent { .. } | RequestError::NoAgents => Some("agents"),
    };
    let message = match param {
        Some(p) => format!("{p}: {e}"),
        None => e.to_string(),
    };
    ApiError::bad_request(message, param)
}

fn sse_event(event: &AgentEvent) -> Event {
    let (name, data) = match event {
        AgentEvent::Dispatch { agent_id } => ("agent.dispatch", json!({ "agent_id": agent_id })),
        AgentEvent::Retry { agent_id, retry } => (
            "agent.retry",
            json!({
                "agent_id": agent_id,
                "attempt": retry.attempt,
                "error": retry.error,
                "status": retry.status,
                "delay_ms": retry.delay.as_secs_f64() * 1000.0,
                "source": retry.source,
            }),
        ),
        AgentEvent::Done(outcome) => (
            "agent.done",
            serde_json::to_value(redact::outcome(outcome)).unwrap_or_default(),
        ),
        AgentEvent::SynthesisStart { provider, model } => (
            "synthesis.start",
            json!({ "provider": provider, "model": model }),
        ),
        AgentEvent::SynthesisDelta {
            attempt,
            model,
            text,
        } => (
            "synthesis.delta",
            json!({ "attempt": attempt, "model": model, "text": text }),
        ),
    };
    Event::default().event(name).data(data.to_string())
}

fn error_event(message: &str) -> Event {
    Event::default()
        .event("error")
        .data(json!({"error": {"type": "server_error", "message": message}}).to_string())
}
