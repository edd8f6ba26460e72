//! `POST /v1/orchestrate`: a query in, the same JSON as `metaorch run --format json`
//! out; or, with `Accept: text/event-stream`, the request's progress as server-sent
//! events (`agent.dispatch`, `agent.retry`, `agent.done`, then `result`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, ServerState, json_body, parse, traceparent};
use crate::executor::AgentEvent;
use crate::orchestrator::{Request, RequestError};
use crate::telemetry::TraceId;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    query: String,
    #[serde(default)]
    agents: Option<Vec<String>>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

pub(super) async fn orchestrate(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
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
    let (request, trace_id) = prepare(&state, &headers, request)?;

    let wants_events = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if !wants_events {
        let response = state
            .orchestrator
            .process_request(request)
            .await
            .map_err(request_error)?;
        drop(admission);
        return Ok(with_trace_id((Json(response)).into_response(), trace_id));
    }

    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let request = request.with_events(tx);
    // The request stops if the client goes away and the stream is dropped.
    let cancel = request.cancel.clone().drop_guard();
    let orchestrator = state.orchestrator.clone();
    let handle = tokio::spawn(async move { orchestrator.process_request(request).await });
    let events = stream::unfold(
        (rx, Some(handle), Some((admission, cancel))),
        |(mut rx, mut handle, mut held)| async move {
            if let Some(event) = rx.recv().await {
                return Some((Ok::<_, Infallible>(sse_event(&event)), (rx, handle, held)));
            }
            let handle = handle.take()?;
            let event = match handle.await {
                Ok(Ok(response)) => Event::default()
                    .event("result")
                    .json_data(&response)
                    .unwrap_or_default(),
                Ok(Err(e)) => error_event(&e.to_string()),
                Err(e) => error_event(&format!("the request's task failed: {e}")),
            };
            held.take();
            Some((Ok(event), (rx, None, None)))
        },
    );
    let sse = Sse::new(events).keep_alive(KeepAlive::default());
    Ok(with_trace_id(sse.into_response(), trace_id))
}

/// Sets the trace id (from `traceparent`, else new) and checks the request and the
/// query's length, before any work starts.
pub(super) fn prepare(
    state: &ServerState,
    headers: &HeaderMap,
    request: Request,
) -> Result<(Request, TraceId), ApiError> {
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
    let (request, trace_id) = match traceparent(headers) {
        Some((trace_id, parent)) => (
            request.with_trace_id(trace_id).with_parent_span(parent),
            trace_id,
        ),
        None => {
            let trace_id = TraceId::random();
            (request.with_trace_id(trace_id), trace_id)
        }
    };
    state.orchestrator.check(&request).map_err(request_error)?;
    Ok((request, trace_id))
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

pub(super) fn with_trace_id(mut response: Response, trace_id: TraceId) -> Response {
    if let Ok(v) = HeaderValue::from_str(&trace_id.to_string()) {
        response.headers_mut().insert("x-trace-id", v);
    }
    response
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
            serde_json::to_value(outcome.as_ref()).unwrap_or_default(),
        ),
    };
    Event::default().event(name).data(data.to_string())
}

fn error_event(message: &str) -> Event {
    Event::default()
        .event("error")
        .data(json!({"error": {"type": "server_error", "message": message}}).to_string())
}
