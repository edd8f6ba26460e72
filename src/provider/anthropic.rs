//! Anthropic's Messages API (`POST /v1/messages`), plain and streaming.
//!
//! One call is one HTTP request: no retries here (the resilience layer owns them). The
//! response's `request-id`, `retry-after-ms` / `retry-after`, `x-should-retry` and
//! `anthropic-ratelimit-*` headers are kept. Error bodies
//! (`{"type":"error","error":{"type":…,"message":…}}`) are classified by their type,
//! else by status. A stream is complete only at `message_stop`: a stream that ends
//! sooner is an error, never a truncated success.

use std::borrow::Cow;

use tokio::time::Instant;

use ::http::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::client::HttpClient;
use super::http::{self, Http2, ResponseMeta, Secret};
use super::sse::SseEvent;
use super::{Completion, CompletionRequest, ErrorKind, Provider, ProviderError, Usage};

/// The public API.
pub const ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";
/// The API version sent in `anthropic-version`, unless configured.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// How to reach the Messages API.
#[derive(Debug, Clone, PartialEq)]
pub struct AnthropicOptions {
    /// Scheme, host and port (and any path prefix); `/v1/messages` is appended.
    pub base_url: String,
    /// Sent as `x-api-key`. Its `Debug` is redacted.
    pub api_key: Option<Secret>,
    /// Sent as `anthropic-version`.
    pub version: String,
    /// Which HTTP version to speak.
    pub http2: Http2,
}

impl Default for AnthropicOptions {
    fn default() -> Self {
        AnthropicOptions {
            base_url: ANTHROPIC_BASE_URL.to_owned(),
            api_key: None,
            version: ANTHROPIC_VERSION.to_owned(),
            http2: Http2::default(),
        }
    }
}

/// A client of Anthropic's Messages API.
#[derive(Debug, Clone)]
pub struct AnthropicProvider {
    url: String,
    client: HttpClient,
}

impl AnthropicProvider {
    /// A provider with its own connection pool.
    pub fn new(options: AnthropicOptions) -> Self {
        let url = endpoint(&options.base_url, "v1/messages");
        let client = http::client(&url, options.http2, headers(&options));
        AnthropicProvider { url, client }
    }
}

/// The headers of every call: the API version, the content type and the key.
fn headers(options: &AnthropicOptions) -> Result<HeaderMap, ProviderError> {
    let mut headers = HeaderMap::with_capacity(4);
    let version = HeaderValue::from_str(&options.version).map_err(|_| {
        ProviderError::new(
            ErrorKind::BadRequest,
            format!(
                "the API version {:?} cannot go in an HTTP header",
                options.version
            ),
        )
    })?;
    headers.insert("anthropic-version", version);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(key) = &options.api_key {
        headers.insert("x-api-key", key.header("")?);
    }
    Ok(headers)
}

/// `{base}/v1/…`, without doubling a `/v1` the base already ends with.
pub(crate) fn endpoint(base: &str, path: &str) -> String {
    let base = base.trim_end_matches('/');
    match base.strip_suffix("/v1") {
        Some(stripped) => http::join(stripped, path),
        None => http::join(base, path),
    }
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    max_tokens: u32,
    messages: Vec<Message<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<System<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

/// The system prompt: a plain string, or, with prompt caching, one text block marked
/// as a cache breakpoint (`cache_control: {"type": "ephemeral"}`, the 5-minute cache),
/// so that calls sharing it write it once and read it from the cache after.
#[derive(Serialize)]
#[serde(untagged)]
enum System<'a> {
    Text(&'a str),
    Cached([CachedText<'a>; 1]),
}

#[derive(Serialize)]
struct CachedText<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
    cache_control: CacheControl,
}

#[derive(Serialize)]
struct CacheControl {
    #[serde(rename = "type")]
    kind: &'static str,
}

impl<'a> System<'a> {
    fn of(request: &'a CompletionRequest) -> Option<System<'a>> {
        let text = request.system.as_deref()?;
        Some(if request.prompt_cache {
            System::Cached([CachedText {
                kind: "text",
                text,
                cache_control: CacheControl { kind: "ephemeral" },
            }])
        } else {
            System::Text(text)
        })
    }
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: Cow<'a, str>,
}

/// The conversation as Anthropic takes it: the earlier turns, then the prompt, with
/// turns of the same speaker in a row joined into one (the API alternates speakers).
fn messages(request: &CompletionRequest) -> Vec<Message<'_>> {
    let mut messages: Vec<Message<'_>> = Vec::with_capacity(request.history.len() + 1);
    let turns = request
        .history
        .iter()
        .map(|t| (t.role.as_str(), t.content.as_str()))
        .chain(std::iter::once(("user", request.prompt.as_str())));
    for (role, content) in turns {
        match messages.last_mut() {
            Some(last) if last.role == role => {
                let joined = last.content.to_mut();
                joined.push_str("\n\n");
                joined.push_str(content);
            }
            _ => messages.push(Message {
                role,
                content: Cow::Borrowed(content),
            }),
        }
    }
    messages
}

#[async_trait]
impl Provider for AnthropicProvider {
    fn kind(&self) -> &'static str {
        "anthropic"
    }

    fn identity(&self) -> String {
        format!("anthropic {}", self.url)
    }

    async fn complete(&self, request: &CompletionRequest) -> Result<Completion, ProviderError> {
        let started = Instant::now();
        // A temporary: the struct and its list of messages are dropped here, not held
        // across the awaits below.
        let body = http::encode_json(&Body {
            model: &request.model,
            max_tokens: request.max_tokens,
            messages: messages(request),
            system: System::of(request),
            temperature: request.temperature,
            stop_sequences: &request.stop_sequences,
            stream: request.stream,
        })?;
        let traceparent = http::traceparent(&request.meta.trace_id).map(|v| ("traceparent", v));
        // The body readers below are boxed: inline, their state would make every call's
        // future larger while it waits for the response, which is most of its life.
        let response = self.client.post(traceparent, body).await?;
        let status = response.status().as_u16();
        let meta = ResponseMeta::from_headers(response.headers());
        if !response.status().is_success() {
            // Headers first: a huge or broken error body changes nothing of what the
            // status and `Retry-After` already say.
            let body = Box::pin(http::read_error_body(response)).await;
            return Err(meta.apply(error_from_body(Some(status), &body)));
        }
        let mut completion = if request.stream && !http::is_json(&response) {
            let mut state = StreamState::for_request(request);
            Box::pin(http::read_sse(response, "message_stop", |e| {
                state.on_event(e)
            }))
            .await
            .map_err(|e| meta.apply(e))?
        } else {
            let body = Box::pin(http::read_body(response)).await?;
            parse_message(&body).map_err(|e| meta.apply(e))?
        };
        completion.latency = started.elapsed();
        completion.request_id = meta.request_id;
        completion.rate_limits = meta.rate_limits;
        Ok(completion)
    }
}

#[derive(Deserialize)]
struct MessageBody {
    /// `message`; `error` for an error object (which can come with a 200).
    #[serde(rename = "type", default)]
    kind: Option<String>,
    /// Required: a body without it is not a Message.
    content: Option<Vec<Block>>,
    stop_reason: Option<String>,
    #[serde(default)]
    usage: UsageBody,
}

#[derive(Deserialize)]
#[serde(tag = "type")]
enum Block {
    #[serde(rename = "text")]
    Text { text: String },
    /// tool_use, thinking and types yet to come carry no text for us.
    #[serde(other)]
    Other,
}

#[derive(Deserialize, Default)]
struct UsageBody {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

impl UsageBody {
    /// Merges into `usage`: present fields replace (usage in a stream is cumulative).
    fn merge_into(&self, usage: &mut Usage) {
        let set = |slot: &mut u64, v: Option<u64>| {
            if let Some(v) = v {
                *slot = v;
            }
        };
        set(&mut usage.input_tokens, self.input_tokens);
        set(&mut usage.output_tokens, self.output_tokens);
        set(
            &mut usage.cache_creation_input_tokens,
            self.cache_creation_input_tokens,
        );
        set(
            &mut usage.cache_read_input_tokens,
            self.cache_read_input_tokens,
        );
    }
}

/// Parses a Message response body.
pub(crate) fn parse_message(body: &[u8]) -> Result<Completion, ProviderError> {
    let malformed = |why: String| {
        ProviderError::new(
            ErrorKind::MalformedResponse,
            format!(
                "the Message body is not valid ({why}): {}",
                http::excerpt(body)
            ),
        )
    };
    let message: MessageBody =
        serde_json::from_slice(body).map_err(|e| malformed(e.to_string()))?;
    match message.kind.as_deref() {
        // An error object with a 200: the error it names, not an empty success.
        Some("error") => return Err(error_from_body(None, body)),
        Some("message") | None => {}
        Some(other) => {
            return Err(malformed(format!(
                "its type is \"{other}\", not \"message\""
            )));
        }
    }
    let content = message
        .content
        .ok_or_else(|| malformed("it has no content".to_owned()))?;
    let mut usage = Usage::default();
    message.usage.merge_into(&mut usage);
    let text = content
        .into_iter()
        .filter_map(|b| match b {
            Block::Text { text } => Some(text),
            Block::Other => None,
        })
        .collect::<Vec<_>>()
        .join("");
    Ok(Completion {
        text,
        stop_reason: message.stop_reason,
        usage,
        ..Completion::default()
    })
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: String,
}

/// The kind an Anthropic error type means.
fn kind_for_type(kind: &str, status: Option<u16>) -> ErrorKind {
    match kind {
        "invalid_request_error" => ErrorKind::BadRequest,
        "authentication_error" => ErrorKind::Auth,
        "billing_error" | "permission_error" => ErrorKind::Permission,
        "not_found_error" => ErrorKind::NotFound,
        "request_too_large" => ErrorKind::TooLarge,
        "rate_limit_error" => ErrorKind::RateLimited,
        "api_error" => ErrorKind::Server,
        "timeout_error" => ErrorKind::Timeout,
        "overloaded_error" => ErrorKind::Overloaded,
        // conflict_error and types yet to come: by status (409 is retried by status).
        _ => status.map_or(ErrorKind::Unknown, http::kind_for_status),
    }
}

/// An error from an error body (after a failed status, or inside a stream).
pub(crate) fn error_from_body(status: Option<u16>, body: &[u8]) -> ProviderError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => {
            let error = ProviderError::new(
                kind_for_type(&b.error.kind, status),
                format!("{}: {}", b.error.kind, b.error.message),
            );
            match status {
                Some(s) => error.with_status(s),
                None => error,
            }
        }
        Err(_) => http::unparsed_error(status, body),
    }
}

/// What a stream has said so far.
#[derive(Debug, Default)]
pub(crate) struct StreamState<'a> {
    text: String,
    stop_reason: Option<String>,
    usage: Usage,
    /// The request whose reply this is, when its text is passed on as it arrives.
    listener: Option<&'a CompletionRequest>,
}

#[derive(Deserialize)]
struct StreamEvent {
    #[serde(default)]
    message: Option<StreamMessage>,
    #[serde(default)]
    delta: Option<StreamDelta>,
    #[serde(default)]
    usage: Option<UsageBody>,
}

#[derive(Deserialize)]
struct StreamMessage {
    #[serde(default)]
    usage: Option<UsageBody>,
}

#[derive(Deserialize)]
struct StreamDelta {
    #[serde(rename = "type")]
    kind: Option<String>,
    text: Option<String>,
    stop_reason: Option<String>,
}

impl<'a> StreamState<'a> {
    /// The state of `request`'s stream, passing its text to the request's delta sink.
    pub(crate) fn for_request(request: &'a CompletionRequest) -> Self {
        StreamState {
            listener: request.deltas.is_some().then_some(request),
            ..StreamState::default()
        }
    }

    /// Takes one event; returns the completion at `message_stop`.
    pub(crate) fn on_event(
        &mut self,
        event: &SseEvent,
    ) -> Result<Option<Completion>, ProviderError> {
        let parse = || {
            serde_json::from_str::<StreamEvent>(&event.data).map_err(|e| {
                ProviderError::new(
                    ErrorKind::MalformedResponse,
                    format!("a {} event is not valid ({e})", event.event),
                )
            })
        };
        match event.event.as_str() {
            "message_start" => {
                if let Some(usage) = parse()?.message.and_then(|m| m.usage) {
                    usage.merge_into(&mut self.usage);
                }
            }
            "content_block_delta" => {
                if let Some(delta) = parse()?.delta
                    && delta.kind.as_deref() == Some("text_delta")
                    && let Some(text) = delta.text
                {
                    if self.text.len() + text.len() > http::MAX_RESPONSE_BYTES {
                        return Err(http::too_big());
                    }
                    self.text.push_str(&text);
                    if let Some(request) = self.listener
                        && let Some(sink) = &request.deltas
                    {
                        sink.send(request, &text);
                    }
                }
            }
            "message_delta" => {
                let e = parse()?;
                if let Some(reason) = e.delta.and_then(|d| d.stop_reason) {
                    self.stop_reason = Some(reason);
                }
                if let Some(usage) = e.usage {
                    usage.merge_into(&mut self.usage);
                }
            }
            "message_stop" => {
                return Ok(Some(Completion {
                    text: std::mem::take(&mut self.text),
                    stop_reason: self.stop_reason.take(),
                    usage: self.usage,
                    ..Completion::default()
                }));
            }
            // After a 200, an error arrives as an event; an overloaded_error here is
            // retryable by its kind.
            "error" => return Err(error_from_body(None, event.data.as_bytes())),
            // ping, content_block_start/stop and event types yet to come.
            _ => {}
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_message_with_unknown_blocks_and_fields_parses() {
        let body = br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude",
            "content":[{"type":"thinking","thinking":"hm"},{"type":"text","text":"Hello"},{"type":"text","text":" there"}],
            "stop_reason":"end_turn","stop_sequence":null,"new_field":{"x":1},
            "usage":{"input_tokens":12,"output_tokens":3,"cache_read_input_tokens":7}}"#;
        let c = parse_message(body).unwrap();
        assert_eq!(c.text, "Hello there");
        assert_eq!(c.stop_reason.as_deref(), Some("end_turn"));
        assert_eq!(
            (
                c.usage.input_tokens,
                c.usage.output_tokens,
                c.usage.cache_read_input_tokens
            ),
            (12, 3, 7)
        );
    }

    #[test]
    fn error_types_map_to_kinds() {
        let cases = [
            (400, "invalid_request_error", ErrorKind::BadRequest),
            (401, "authentication_error", ErrorKind::Auth),
            (402, "billing_error", ErrorKind::Permission),
            (403, "permission_error", ErrorKind::Permission),
            (404, "not_found_error", ErrorKind::NotFound),
            (409, "conflict_error", ErrorKind::Unknown),
            (413, "request_too_large", ErrorKind::TooLarge),
            (429, "rate_limit_error", ErrorKind::RateLimited),
            (500, "api_error", ErrorKind::Server),
            (504, "timeout_error", ErrorKind::Timeout),
            (529, "overloaded_error", ErrorKind::Overloaded),
            (503, "brand_new_error", ErrorKind::Server),
        ];
        for (status, kind, expected) in cases {
            let body = format!(r#"{{"type":"error","error":{{"type":"{kind}","message":"m"}}}}"#);
            let e = error_from_body(Some(status), body.as_bytes());
            assert_eq!((e.kind, e.status), (expected, Some(status)), "{kind}");
            assert_eq!(e.message, format!("{kind}: m"));
        }
        let e = error_from_body(Some(502), b"<html>bad gateway</html>");
        assert_eq!(e.kind, ErrorKind::Server);
        assert!(e.message.contains("bad gateway"));
    }

    #[test]
    fn a_stream_builds_the_reply_and_usage() {
        let events = [
            (
                "message_start",
                r#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":25,"output_tokens":1}}}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            ),
            ("ping", r#"{"type":"ping"}"#),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hel"}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"lo"}}"#,
            ),
            ("something_new", r#"{}"#),
            (
                "content_block_stop",
                r#"{"type":"content_block_stop","index":0}"#,
            ),
            (
                "message_delta",
                r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}"#,
            ),
        ];
        let mut s = StreamState::default();
        for (event, data) in events {
            let e = SseEvent {
                event: event.into(),
                data: data.into(),
            };
            assert!(s.on_event(&e).unwrap().is_none());
        }
        let stop = SseEvent {
            event: "message_stop".into(),
            data: r#"{"type":"message_stop"}"#.into(),
        };
        let c = s.on_event(&stop).unwrap().unwrap();
        assert_eq!(c.text, "Hello");
        assert_eq!(c.stop_reason.as_deref(), Some("end_turn"));
        assert_eq!((c.usage.input_tokens, c.usage.output_tokens), (25, 15));
    }

    #[test]
    fn an_error_event_is_classified_and_retryable_when_overloaded() {
        let mut s = StreamState::default();
        let e = SseEvent {
            event: "error".into(),
            data: r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
                .into(),
        };
        let err = s.on_event(&e).unwrap_err();
        assert_eq!((err.kind, err.status), (ErrorKind::Overloaded, None));
    }

    #[test]
    fn endpoints_do_not_double_v1() {
        assert_eq!(
            endpoint("https://api.anthropic.com", "v1/messages"),
            "https://api.anthropic.com/v1/messages"
        );
        assert_eq!(
            endpoint("http://h:1/v1/", "v1/messages"),
            "http://h:1/v1/messages"
        );
        assert_eq!(
            endpoint("http://h:1/proxy", "v1/messages"),
            "http://h:1/proxy/v1/messages"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_and_events_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..512),
            event in "[a-z_]{0,20}",
            data in ".{0,300}",
        ) {
            let json = serde_json::from_slice::<serde_json::Value>(&body).ok();
            // A success only for a body that is a Message: an object with content.
            if parse_message(&body).is_ok() {
                prop_assert!(json.as_ref().is_some_and(|j| j["content"].is_array()));
            }
            // An error with a status keeps it; without an error object it is the
            // status's kind.
            let e = error_from_body(Some(500), &body);
            prop_assert_eq!(e.status, Some(500));
            if json.as_ref().is_none_or(|j| !j["error"]["type"].is_string()) {
                prop_assert_eq!(e.kind, ErrorKind::Server);
            }
            prop_assert_eq!(error_from_body(None, &body).status, None);
            let mut s = StreamState::default();
            let _ = s.on_event(&SseEvent { event, data });
        }

        #[test]
        fn error_objects_are_classified_by_their_type(
            kind in prop_oneof![
                Just("invalid_request_error"), Just("authentication_error"),
                Just("permission_error"), Just("not_found_error"), Just("request_too_large"),
                Just("rate_limit_error"), Just("api_error"), Just("overloaded_error"),
                Just("timeout_error"), Just("something_new"),
            ],
            status in prop_oneof![Just(None), Just(Some(200)), Just(Some(500))],
            message in "[a-z ]{0,20}",
        ) {
            let body = serde_json::json!({"type": "error", "error": {"type": kind, "message": message}}).to_string();
            let e = error_from_body(status.filter(|s| *s != 200), body.as_bytes());
            let expected = match kind {
                "invalid_request_error" => ErrorKind::BadRequest,
                "authentication_error" => ErrorKind::Auth,
                "permission_error" => ErrorKind::Permission,
                "not_found_error" => ErrorKind::NotFound,
                "request_too_large" => ErrorKind::TooLarge,
                "rate_limit_error" => ErrorKind::RateLimited,
                "api_error" => ErrorKind::Server,
                "overloaded_error" => ErrorKind::Overloaded,
                "timeout_error" => ErrorKind::Timeout,
                _ if status == Some(500) => ErrorKind::Server,
                _ => ErrorKind::Unknown,
            };
            prop_assert_eq!(e.kind, expected);
            prop_assert!(e.message.starts_with(kind));
            // With a 200 the same object is that error, whatever else it says.
            if status == Some(200) {
                let e = parse_message(body.as_bytes()).unwrap_err();
                prop_assert_eq!(e.kind, expected);
            }
        }

        #[test]
        fn json_shaped_noise_never_panics(data in r#"\{"(type|message|delta|usage|content)":.{0,80}\}"#) {
            let _ = parse_message(data.as_bytes());
            for event in ["message_start", "content_block_delta", "message_delta", "message_stop", "error"] {
                let _ = StreamState::default().on_event(&SseEvent { event: event.into(), data: data.clone() });
            }
        }
    }
}
