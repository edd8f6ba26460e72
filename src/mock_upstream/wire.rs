//! The two wire formats as the mock speaks them: validation, replies (plain and
//! streaming), and the exact error bodies of each API.

use std::io;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::stream;
use serde_json::{Value, json};

use super::faults::{self, MockFault};
use super::{RequestRecord, Shared, hash, now_rfc3339, ratelimit, unit};
use crate::provider::{AccountRejection, AccountState};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Api {
    Anthropic,
    OpenAi,
}

impl Api {
    fn name(self) -> &'static str {
        match self {
            Api::Anthropic => "anthropic",
            Api::OpenAi => "openai",
        }
    }
}

/// One request, from headers and body to the response.
pub(crate) async fn handle(
    shared: &Shared,
    api: Api,
    version: axum::http::Version,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let options = &shared.options;
    let n = shared.next_id();
    let request_id = match api {
        Api::Anthropic => format!("req_mock{n:018x}"),
        Api::OpenAi => format!("req_{n:032x}"),
    };
    let mut record = RequestRecord {
        timestamp: now_rfc3339(),
        api: api.name(),
        http: match version {
            axum::http::Version::HTTP_2 => "HTTP/2.0",
            axum::http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        },
        model: None,
        stream: false,
        status: 200,
        fault: None,
        latency_ms: 0.0,
        input_tokens: 0,
        output_tokens: 0,
        cache_creation_input_tokens: 0,
        cache_read_input_tokens: 0,
        request_id: request_id.clone(),
        traceparent: header(headers, "traceparent").map(str::to_owned),
        seen: 0,
        limited_by: None,
        body: None,
    };

    // Authentication comes first, as on the real APIs.
    let bearer = header(headers, "authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|k| !k.trim().is_empty());
    // Anthropic takes `x-api-key`, and its newer SDKs send `Authorization: Bearer`.
    let authorized = match api {
        Api::Anthropic => {
            bearer || header(headers, "x-api-key").is_some_and(|k| !k.trim().is_empty())
        }
        Api::OpenAi => bearer,
    };
    if !authorized {
        let message = match api {
            Api::Anthropic => "x-api-key header is required",
            Api::OpenAi => {
                "You didn't provide an API key. Provide it in an Authorization header (Bearer auth)."
            }
        };
        return finish(
            shared,
            api,
            record,
            &shared.account.state(),
            error(api, 401, "authentication_error", message, &request_id),
        );
    }

    let request: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return finish(
                shared,
                api,
                record,
                &shared.account.state(),
                error(
                    api,
                    400,
                    "invalid_request_error",
                    "The request body is not valid JSON.",
                    &request_id,
                ),
            );
        }
    };
    if let Err(message) = validate(api, &request) {
        return finish(
            shared,
            api,
            record,
            &shared.account.state(),
            error(api, 400, "invalid_request_error", &message, &request_id),
        );
    }
    let model = request["model"].as_str().unwrap_or("").to_owned();
    record.model = Some(model.clone());
    if options.keep_bodies {
        record.body = Some(request.clone());
    }
    record.stream = request["stream"].as_bool().unwrap_or(false);
    let prompt = prompt_text(&request);
    record.input_tokens = tokens(&prompt);

    // The account's limits come before faults, and a refused request is not counted
    // as seen, so it does not use up a scripted fault.
    let permit = match shared.account.admit(record.input_tokens) {
        Ok(permit) => permit,
        Err(rejection) => return refuse(shared, api, record, &rejection, &model),
    };
    let limits = permit.state;

    let key = hash(options.seed, &[body]);
    let seen = shared.seen(key);
    record.seen = seen;
    let roll = unit(hash(options.seed ^ 0x5eed, &[body, &seen.to_le_bytes()]));
    let fault = faults::pick(&options.script, &options.rates, body, seen, roll)
        // Stream faults only make sense for streaming requests.
        .filter(|f| record.stream || !matches!(f, MockFault::StreamError | MockFault::StreamCut));
    record.fault = fault.map(MockFault::as_str);
    let latency = draw_latency(options.latency_min, options.latency_max, key);
    record.latency_ms = latency.as_secs_f64() * 1000.0;

    let reply = reply_text(&model, &prompt, key);
    let max_tokens = request["max_tokens"]
        .as_u64()
        .or_else(|| request["max_completion_tokens"].as_u64())
        .unwrap_or(4096);
    let output_tokens = tokens(&reply).min(max_tokens).max(1);
    // A reply that reaches the model reads or writes the cache; a status fault does not.
    let cache = match fault {
        None | Some(MockFault::Cut | MockFault::StreamError | MockFault::StreamCut) => {
            prompt_cache(shared, api, &model, &request, record.input_tokens)
        }
        _ => CacheUse::default(),
    };
    record.cache_creation_input_tokens = cache.write;
    record.cache_read_input_tokens = cache.read;

    let response = match fault {
        Some(MockFault::Hang) => {
            tokio::time::sleep(Duration::from_secs(600)).await;
            error(
                api,
                504,
                "timeout_error",
                "The mock hung for ten minutes.",
                &request_id,
            )
        }
        Some(
            f @ (MockFault::RateLimited
            | MockFault::RateLimitedBare
            | MockFault::Overloaded
            | MockFault::Server
            | MockFault::GatewayTimeout),
        ) => {
            pause(latency / 10).await;
            fault_response(api, f, options.retry_after, &request_id)
        }
        Some(MockFault::Malformed) => {
            pause(latency).await;
            raw(200, "application/json", Body::from(&b"{\"id\": \"msg_broken\", \"type\": \"message\", \"content\": [{\"type\": \"te"[..]), &request_id, api)
        }
        Some(MockFault::Oversized) => {
            pause(latency).await;
            record.output_tokens = 9 << 18;
            let text = "x".repeat(9 << 20);
            let body = match api {
                Api::Anthropic => message_body(
                    &model,
                    &text,
                    record.input_tokens,
                    9 << 18,
                    CacheUse::default(),
                    n,
                ),
                Api::OpenAi => completion_body(&model, &text, record.input_tokens, 9 << 18, n),
            };
            json_response(200, &body, &request_id, api)
        }
        Some(MockFault::Reset) => {
            pause(latency / 10).await;
            // Headers go out, then the body fails before its first byte: hyper drops
            // the connection.
            let broken = stream::iter([Err::<Bytes, _>(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "mock reset",
            ))]);
            raw(
                200,
                "application/json",
                Body::from_stream(broken),
                &request_id,
                api,
            )
        }
        Some(MockFault::Error200) => {
            pause(latency / 10).await;
            let body = match api {
                Api::Anthropic => json!({
                    "type": "error",
                    "error": {"type": "overloaded_error", "message": "Overloaded"},
                    "request_id": request_id
                }),
                Api::OpenAi => json!({"error": {
                    "message": "The server had an error while processing your request.",
                    "type": "server_error", "param": null, "code": null
                }}),
            };
            json_response(200, &body, &request_id, api)
        }
        Some(MockFault::Cut) => {
            pause(latency / 2).await;
            record.output_tokens = output_tokens;
            let full = Reply {
                api,
                model: &model,
                text: &reply,
                input: record.input_tokens - cache.write - cache.read,
                output: output_tokens,
                cache,
                n,
            };
            let (content_type, whole): (&'static str, Vec<u8>) = if record.stream {
                ("text/event-stream", full.events(None).concat().into_bytes())
            } else {
                ("application/json", full.body().to_string().into_bytes())
            };
            cut(content_type, whole, &request_id, api)
        }
        stream_fault @ (None | Some(MockFault::StreamError | MockFault::StreamCut)) => {
            record.output_tokens = output_tokens;
            let full = Reply {
                api,
                model: &model,
                text: &reply,
                input: record.input_tokens - cache.write - cache.read,
                output: output_tokens,
                cache,
                n,
            };
            if record.stream {
                // A third of the latency before the first byte, the rest across deltas.
                pause(latency / 3).await;
                let events = full.events(stream_fault);
                let gap = (latency - latency / 3) / (events.len().max(1) as u32);
                // The permit rides with the stream and is let go with its last event,
                // before the client can see the end: the request is in progress until
                // then, and no longer once the client knows it is over.
                let events = events.into_iter().peekable();
                let body = stream::unfold(
                    (events, Some(permit)),
                    move |(mut events, mut permit)| async move {
                        let event = events.next()?;
                        pause(gap).await;
                        if events.peek().is_none() {
                            permit.take();
                        }
                        Some((Ok::<_, io::Error>(Bytes::from(event)), (events, permit)))
                    },
                );
                raw(
                    200,
                    "text/event-stream",
                    Body::from_stream(body),
                    &request_id,
                    api,
                )
            } else {
                pause(latency).await;
                json_response(200, &full.body(), &request_id, api)
            }
        }
    };
    finish(shared, api, record, &limits, response)
}

/// The answer to a request the account refused, logged with the limit that refused it.
fn refuse(
    shared: &Shared,
    api: Api,
    mut record: RequestRecord,
    rejection: &AccountRejection,
    model: &str,
) -> Response {
    record.limited_by = Some(rejection.limited_by.as_str());
    record.fault = Some(match rejection.retry_after {
        Some(_) => MockFault::RateLimited.as_str(),
        None => MockFault::Overloaded.as_str(),
    });
    let response = ratelimit::refused(
        api,
        rejection,
        shared.account.limits(),
        record.input_tokens,
        model,
        &record.request_id,
    );
    finish(shared, api, record, &rejection.state, response)
}

/// Adds the rate-limit headers and logs the request.
fn finish(
    shared: &Shared,
    api: Api,
    mut record: RequestRecord,
    limits: &AccountState,
    mut response: Response,
) -> Response {
    ratelimit::insert_headers(api, limits, response.headers_mut());
    record.status = response.status().as_u16();
    shared.record(record);
    response
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The checks the real APIs make first.
fn validate(api: Api, request: &Value) -> Result<(), String> {
    if request["model"].as_str().is_none_or(str::is_empty) {
        return Err("model: Field required".into());
    }
    let messages = request["messages"].as_array();
    if messages.is_none_or(Vec::is_empty) {
        return Err("messages: Field required (at least one message)".into());
    }
    if api == Api::Anthropic && request["max_tokens"].as_u64().is_none_or(|n| n == 0) {
        return Err("max_tokens: Field required (a positive integer)".into());
    }
    Ok(())
}

/// The system prompt and every message's text, for token counts and replies.
fn prompt_text(request: &Value) -> String {
    let mut text = system_text(&request["system"], usize::MAX);
    if !text.is_empty() {
        text.push('\n');
    }
    for message in request["messages"].as_array().into_iter().flatten() {
        match &message["content"] {
            Value::String(s) => text.push_str(s),
            Value::Array(blocks) => {
                for block in blocks {
                    if let Some(s) = block["text"].as_str() {
                        text.push_str(s);
                    }
                }
            }
            _ => {}
        }
        text.push('\n');
    }
    text
}

/// The system prompt's text: a string, or its text blocks up to `blocks` of them.
fn system_text(system: &Value, blocks: usize) -> String {
    match system {
        Value::String(s) => s.clone(),
        Value::Array(all) => all
            .iter()
            .take(blocks)
            .filter_map(|b| b["text"].as_str())
            .collect(),
        _ => String::new(),
    }
}

/// What a request's prompt cache breakpoint does, Anthropic's way: the system blocks up
/// to the last one marked `cache_control` are written to the cache the first time this
/// model sees them and read from it after. (The mock keeps what it cached for its
/// life, and caches prefixes of any length; the real API keeps them five minutes and
/// caches none shorter than 1,024 tokens or so.)
fn prompt_cache(shared: &Shared, api: Api, model: &str, request: &Value, total: u64) -> CacheUse {
    let blocks = request["system"].as_array().map_or(&[][..], Vec::as_slice);
    let Some(last) = blocks
        .iter()
        .rposition(|b| b["cache_control"].is_object())
        .filter(|_| api == Api::Anthropic)
    else {
        return CacheUse::default();
    };
    let prefix = system_text(&request["system"], last + 1);
    let cached = tokens(&prefix).min(total);
    let key = hash(0xcac4e, &[model.as_bytes(), prefix.as_bytes()]);
    if shared.cache(key) {
        CacheUse {
            write: 0,
            read: cached,
        }
    } else {
        CacheUse {
            write: cached,
            read: 0,
        }
    }
}

/// Input tokens written to and read from the prompt cache.
#[derive(Debug, Clone, Copy, Default)]
struct CacheUse {
    write: u64,
    read: u64,
}

fn tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
}

fn draw_latency(min: Duration, max: Duration, key: u64) -> Duration {
    let max = max.max(min);
    min + (max - min).mul_f64(unit(key))
}

const SENTENCES: &[&str] = &[
    "The evidence points one way, with one caveat worth checking.",
    "Start small, measure, and widen the rollout only when the numbers hold.",
    "The cost is mostly operational; the build itself is the smaller part.",
    "Two independent sources agree on the main facts.",
    "The weakest assumption is the load estimate; test it first.",
    "A rollback plan matters more than the choice of tool.",
];

/// A short deterministic reply that says it comes from the mock.
fn reply_text(model: &str, prompt: &str, key: u64) -> String {
    let a = (key % SENTENCES.len() as u64) as usize;
    let b = (a + 1 + (key >> 8) as usize % (SENTENCES.len() - 1)) % SENTENCES.len();
    let topic: String = prompt
        .lines()
        .last()
        .unwrap_or("")
        .chars()
        .take(60)
        .collect();
    let topic = if topic.is_empty() {
        prompt.chars().take(60).collect()
    } else {
        topic
    };
    format!(
        "[mock reply from {model}] On \"{}\": {} {}",
        topic.trim(),
        SENTENCES[a],
        SENTENCES[b]
    )
}

fn message_body(
    model: &str,
    text: &str,
    input: u64,
    output: u64,
    cache: CacheUse,
    n: u64,
) -> Value {
    json!({
        "id": format!("msg_mock{n:018x}"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {
            "input_tokens": input,
            "output_tokens": output,
            "cache_creation_input_tokens": cache.write,
            "cache_read_input_tokens": cache.read
        }
    })
}

fn completion_body(model: &str, text: &str, input: u64, output: u64, n: u64) -> Value {
    json!({
        "id": format!("chatcmpl-mock{n:016x}"),
        "object": "chat.completion",
        "created": created(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": null},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": {
            "prompt_tokens": input,
            "completion_tokens": output,
            "total_tokens": input + output
        },
        "system_fingerprint": "fp_mock"
    })
}

fn created() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The reply cut into a few pieces, as deltas arrive.
fn pieces(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = rest.len().min(24);
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    out
}

fn sse(event: &str, data: &Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

fn anthropic_events(reply: &Reply<'_>, fault: Option<MockFault>) -> Vec<String> {
    let Reply {
        model,
        text,
        input,
        output,
        cache,
        n,
        ..
    } = *reply;
    let mut events = vec![
        sse(
            "message_start",
            &json!({
                "type": "message_start",
                "message": {
                    "id": format!("msg_mock{n:018x}"), "type": "message", "role": "assistant",
                    "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {
                        "input_tokens": input, "output_tokens": 1,
                        "cache_creation_input_tokens": cache.write,
                        "cache_read_input_tokens": cache.read
                    }
                }
            }),
        ),
        sse(
            "content_block_start",
            &json!({
                "type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}
            }),
        ),
        sse("ping", &json!({"type": "ping"})),
    ];
    let pieces = pieces(text);
    for (i, piece) in pieces.iter().enumerate() {
        events.push(sse(
            "content_block_delta",
            &json!({
                "type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": piece}
            }),
        ));
        if i == 0 {
            match fault {
                Some(MockFault::StreamError) => {
                    events.push(sse(
                        "error",
                        &json!({
                            "type": "error",
                            "error": {"type": "overloaded_error", "message": "Overloaded"}
                        }),
                    ));
                    return events;
                }
                Some(MockFault::StreamCut) => return events,
                _ => {}
            }
        }
    }
    events.push(sse(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(sse(
        "message_delta",
        &json!({
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": output}
        }),
    ));
    events.push(sse("message_stop", &json!({"type": "message_stop"})));
    events
}

fn openai_events(
    model: &str,
    text: &str,
    input: u64,
    output: u64,
    n: u64,
    fault: Option<MockFault>,
) -> Vec<String> {
    let id = format!("chatcmpl-mock{n:016x}");
    let created = created();
    let chunk = |delta: Value, finish: Value| {
        format!(
            "data: {}\n\n",
            json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": "fp_mock",
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
            })
        )
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    for (i, piece) in pieces(text).iter().enumerate() {
        events.push(chunk(json!({"content": piece}), Value::Null));
        if i == 0 {
            match fault {
                Some(MockFault::StreamError) => {
                    events.push(format!(
                        "data: {}\n\n",
                        json!({"error": {"message": "The server had an error while processing your request.", "type": "server_error", "param": null, "code": null}})
                    ));
                    return events;
                }
                Some(MockFault::StreamCut) => return events,
                _ => {}
            }
        }
    }
    events.push(chunk(json!({}), json!("stop")));
    events.push(format!(
        "data: {}\n\n",
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [],
            "usage": {"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output}
        })
    ));
    events.push("data: [DONE]\n\n".to_owned());
    events
}

/// The response a status fault gets, with each API's error body.
pub(super) fn fault_response(
    api: Api,
    fault: MockFault,
    retry_after: Duration,
    request_id: &str,
) -> Response {
    let (status, kind, message) = match (api, fault) {
        (_, MockFault::RateLimited | MockFault::RateLimitedBare) => (
            429,
            "rate_limit_error",
            "Number of requests has exceeded your rate limit.",
        ),
        (Api::Anthropic, MockFault::Overloaded) => (529, "overloaded_error", "Overloaded"),
        (Api::OpenAi, MockFault::Overloaded) => (
            503,
            "server_error",
            "The engine is currently overloaded, please try again later.",
        ),
        (_, MockFault::GatewayTimeout) => (504, "timeout_error", "Request timed out."),
        _ => (500, "api_error", "Internal server error"),
    };
    let mut response = error(api, status, kind, message, request_id);
    if fault == MockFault::RateLimited {
        let headers = response.headers_mut();
        let secs = retry_after.as_secs_f64().ceil() as u64;
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            headers.insert("retry-after", v);
        }
        if let Ok(v) = HeaderValue::from_str(&retry_after.as_millis().to_string()) {
            headers.insert("retry-after-ms", v);
        }
    }
    response
}

/// An error response with the API's exact body shape.
pub(super) fn error(
    api: Api,
    status: u16,
    kind: &str,
    message: &str,
    request_id: &str,
) -> Response {
    let body = match api {
        Api::Anthropic => json!({
            "type": "error",
            "error": {"type": kind, "message": message},
            "request_id": request_id
        }),
        Api::OpenAi => {
            let (kind, code) = match kind {
                "authentication_error" => ("invalid_request_error", json!("invalid_api_key")),
                "rate_limit_error" => ("requests", json!("rate_limit_exceeded")),
                "api_error" => ("server_error", Value::Null),
                other => (other, Value::Null),
            };
            json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
        }
    };
    json_response(status, &body, request_id, api)
}

/// A reply's pieces, for either wire format: the whole body, or the stream's events.
#[derive(Clone, Copy)]
struct Reply<'a> {
    api: Api,
    model: &'a str,
    text: &'a str,
    /// Input tokens, the cache's part aside.
    input: u64,
    output: u64,
    cache: CacheUse,
    n: u64,
}

impl Reply<'_> {
    fn body(&self) -> Value {
        match self.api {
            Api::Anthropic => message_body(
                self.model,
                self.text,
                self.input,
                self.output,
                self.cache,
                self.n,
            ),
            Api::OpenAi => completion_body(self.model, self.text, self.input, self.output, self.n),
        }
    }

    fn events(&self, fault: Option<MockFault>) -> Vec<String> {
        match self.api {
            Api::Anthropic => anthropic_events(self, fault),
            Api::OpenAi => openai_events(
                self.model,
                self.text,
                self.input,
                self.output,
                self.n,
                fault,
            ),
        }
    }
}

/// A 200 that promises `whole` (its `Content-Length`) and sends half of it before the
/// connection closes — a stream cut in the middle of an event.
fn cut(content_type: &'static str, whole: Vec<u8>, request_id: &str, api: Api) -> Response {
    let length = whole.len();
    let half = Bytes::from(whole).slice(..length / 2);
    let broken = stream::iter([
        Ok(half),
        Err(io::Error::new(io::ErrorKind::ConnectionAborted, "mock cut")),
    ]);
    let mut response = raw(
        200,
        content_type,
        Body::from_stream(broken),
        request_id,
        api,
    );
    if let Ok(v) = HeaderValue::from_str(&length.to_string()) {
        response.headers_mut().insert("content-length", v);
    }
    response
}

pub(super) fn json_response(status: u16, body: &Value, request_id: &str, api: Api) -> Response {
    raw(
        status,
        "application/json",
        Body::from(body.to_string()),
        request_id,
        api,
    )
}

fn raw(
    status: u16,
    content_type: &'static str,
    body: Body,
    request_id: &str,
    api: Api,
) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static(content_type));
    let id_header = match api {
        Api::Anthropic => "request-id",
        Api::OpenAi => "x-request-id",
    };
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(id_header, v);
    }
    response
}

/// Waits `d`; no time at all when it is zero (a zero sleep still waits for the timer's
/// next tick, about a millisecond, which a zero-latency mock must not add).
async fn pause(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}
