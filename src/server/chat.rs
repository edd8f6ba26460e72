//! `POST /v1/chat/completions`: the orchestrator as an OpenAI model. `model` is
//! `metaorch` (every agent) or `metaorch/<agent>+<agent>…` (a subset); the last user
//! message is the query; the synthesized answer is the assistant's message; `usage`
//! sums the agents' tokens. `stream: true` answers in chunks ending with `[DONE]`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use futures_util::stream;
use serde::Deserialize;
use serde_json::{Value, json};

use super::body::{json_body, parse};
use super::orchestrate::prepare;
use super::running::RunningRequest;
use super::{ApiError, ServerState, redact};
use crate::orchestrator::{Request, Response as Answer};

/// The model name the orchestrator answers to.
const MODEL: &str = "metaorch";

#[derive(Deserialize)]
struct Body {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

pub(super) async fn completions(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let admission = state.admit()?;
    let body: Body = parse(&json_body(&headers, body)?)?;
    let agents = agents_of(&body.model)?;
    let query = body
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .and_then(|m| m.content.as_ref())
        .map(|c| match c {
            Content::Text(t) => t.clone(),
            Content::Parts(parts) => parts
                .iter()
                .filter_map(|p| p.text.as_deref())
                .collect::<Vec<_>>()
                .join("\n"),
        })
        .ok_or_else(|| {
            ApiError::bad_request(
                "messages: there is no user message to answer",
                Some("messages"),
            )
        })?;
    let mut request = Request::new(query);
    if let Some(agents) = agents {
        request = request.with_agents(agents);
    }
    let (request, ids) = prepare(&state, &headers, request)?;
    let id = format!("chatcmpl-{}{}", ids.trace_id, ids.request_id);
    let created = now();
    let model = body.model.clone();

    let running = RunningRequest::spawn(&state, request, admission);
    if !body.stream {
        let answer = redact::response(running.finish().await?);
        if !answer.ok {
            return Err(too_few(&answer));
        }
        let completion = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": answer.answer, "refusal": null},
                "logprobs": null,
                "finish_reason": "stop"
            }],
            "usage": usage(&answer),
            "system_fingerprint": null
        });
        return Ok(ids.on(Json(completion).into_response()));
    }

    let include_usage = body.stream_options.is_some_and(|o| o.include_usage);
    let chunk = move |delta: Value, finish: Value| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": null,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
        })
    };
    let first = chunk(json!({"role": "assistant", "content": ""}), Value::Null);
    // The stream holds the running request: if the client goes away and the stream
    // is dropped, the request is cancelled and ends as `cancelled`.
    let work = async move {
        let result = running.finish().await.map(redact::response);
        let mut events = Vec::new();
        match result {
            Ok(answer) if answer.ok => {
                events.push(chunk(json!({"content": answer.answer}), Value::Null));
                events.push(chunk(json!({}), json!("stop")));
                if include_usage {
                    let mut last = chunk(json!({}), Value::Null);
                    last["choices"] = json!([]);
                    last["usage"] = usage(&answer);
                    events.push(last);
                }
            }
            Ok(answer) => events.push(json!({"error": error_body(&answer)})),
            Err(e) => events.push(json!({"error": {"type": "server_error", "message": e.message(), "param": null, "code": null}})),
        }
        events
    };
    // The role chunk goes out at once; the rest when the agents are done.
    let head = stream::iter([Ok::<_, Infallible>(data(&first))]);
    let tail = stream::once(work).flat_map(|events| {
        stream::iter(
            events
                .into_iter()
                .map(|e| Ok(data(&e)))
                .chain(std::iter::once(Ok(Event::default().data("[DONE]")))),
        )
    });
    let sse = Sse::new(head.chain(tail)).keep_alive(KeepAlive::default());
    Ok(ids.on(sse.into_response()))
}

pub(super) async fn models() -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "metaorch"}]
    }))
}

/// `metaorch` → every agent; `metaorch/a+b` → agents a and b.
fn agents_of(model: &str) -> Result<Option<Vec<String>>, ApiError> {
    if model == MODEL {
        return Ok(None);
    }
    if let Some(profile) = model.strip_prefix("metaorch/")
        && !profile.is_empty()
    {
        return Ok(Some(profile.split('+').map(str::to_owned).collect()));
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "model_not_found",
        format!(
            "model: \"{model}\" is not served here; use \"metaorch\" (every agent) or \"metaorch/<agent>+<agent>\""
        ),
    ))
}

fn usage(answer: &Answer) -> Value {
    json!({
        "prompt_tokens": answer.usage.input_tokens,
        "completion_tokens": answer.usage.output_tokens,
        "total_tokens": answer.usage.total_tokens()
    })
}

fn error_body(answer: &Answer) -> Value {
    json!({
        "type": "server_error",
        "message": format!(
            "{} of {} agents succeeded, fewer than the {} required (trace {})",
            answer.summary.succeeded,
            answer.outcomes.len(),
            answer.summary.min_successes,
            answer.trace_id
        ),
        "param": null,
        "code": "too_few_agents"
    })
}

fn too_few(answer: &Answer) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "server_error",
        error_body(answer)["message"]
            .as_str()
            .unwrap_or("too few agents succeeded"),
    )
}

fn data(value: &Value) -> Event {
    Event::default().data(value.to_string())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
