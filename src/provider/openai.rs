//! The OpenAI-compatible Chat Completions API (`POST /v1/chat/completions`), as served
//! by OpenAI and by Ollama, vLLM, llama.cpp's server, LM Studio and the LiteLLM proxy;
//! plain and streaming (`stream_options.include_usage`).
//!
//! One call is one HTTP request; no retries here. `Authorization: Bearer` is sent only
//! when a key is configured (local servers need none). A stream is complete only at
//! `data: [DONE]`.

use ::http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::anthropic::endpoint;
use super::client::HttpClient;
use super::http::{self, Http2, ResponseMeta, Secret};
use super::sse::SseEvent;
use super::{Completion, CompletionRequest, ErrorKind, Provider, ProviderError, Usage};

/// The public API.
pub const OPENAI_BASE_URL: &str = "https://api.openai.com";

/// Which name the token bound goes by: servers differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaxTokensField {
    /// `max_tokens`: what Ollama, vLLM, llama.cpp and most servers read.
    #[default]
    MaxTokens,
    /// `max_completion_tokens`: what OpenAI's newer models require.
    MaxCompletionTokens,
}

/// How to reach a Chat Completions server.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAiOptions {
    /// Scheme, host and port; `/v1/chat/completions` is appended (a trailing `/v1` in
    /// the base is not doubled).
    pub base_url: String,
    /// Sent as `Authorization: Bearer`, when set. Its `Debug` is redacted.
    pub api_key: Option<Secret>,
    /// The name of the token bound.
    pub max_tokens_field: MaxTokensField,
    /// Which HTTP version to speak.
    pub http2: Http2,
}

impl Default for OpenAiOptions {
    fn default() -> Self {
        OpenAiOptions {
            base_url: OPENAI_BASE_URL.to_owned(),
            api_key: None,
            max_tokens_field: MaxTokensField::default(),
            http2: Http2::default(),
        }
    }
}

/// A client of an OpenAI-compatible Chat Completions server.
#[derive(Debug, Clone)]
pub struct OpenAiProvider {
    options: OpenAiOptions,
    url: String,
    client: HttpClient,
}

/// The headers of every call: the content type and the key.
fn headers(options: &OpenAiOptions) -> Result<HeaderMap, ProviderError> {
    let mut headers = HeaderMap::with_capacity(3);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(key) = &options.api_key {
        headers.insert(AUTHORIZATION, key.header("Bearer ")?);
    }
    Ok(headers)
}

impl OpenAiProvider {
    /// A provider with its own connection pool.
    pub fn new(options: OpenAiOptions) -> Self {
        let url = endpoint(&options.base_url, "v1/chat/completions");
        let client = http::client(&url, options.http2, headers(&options));
        OpenAiProvider {
            options,
            url,
            client,
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    messages: Vec<Message<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[async_trait]
impl Provider for OpenAiProvider {
    fn kind(&self) -> &'static str {
        "openai"
    }

    fn identity(&self) -> String {
        format!("openai {}", self.url)
    }

    async fn complete(&self, request: &CompletionRequest) -> Result<Completion, ProviderError> {
        let started = Instant::now();
        let mut messages = Vec::with_capacity(request.history.len() + 2);
        if let Some(system) = &request.system {
            messages.push(Message {
                role: "system",
                content: system,
            });
        }
        messages.extend(request.history.iter().map(|turn| Message {
            role: turn.role.as_str(),
            content: &turn.content,
        }));
        messages.push(Message {
            role: "user",
            content: &request.prompt,
        });
        let completion_field = self.options.max_tokens_field == MaxTokensField::MaxCompletionTokens;
        // A temporary: the struct and its list of messages are dropped here, not held
        // across the awaits below.
        let body = http::encode_json(&Body {
            model: &request.model,
            messages,
            max_tokens: (!completion_field).then_some(request.max_tokens),
            max_completion_tokens: completion_field.then_some(request.max_tokens),
            temperature: request.temperature,
            stop: &request.stop_sequences,
            stream: request.stream,
            stream_options: request.stream.then_some(StreamOptions {
                include_usage: true,
            }),
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
            Box::pin(http::read_sse(response, "[DONE]", |e| state.on_event(e)))
                .await
                .map_err(|e| meta.apply(e))?
        } else {
            let body = Box::pin(http::read_body(response)).await?;
            parse_completion(&body).map_err(|e| meta.apply(e))?
        };
        completion.latency = started.elapsed();
        completion.request_id = meta.request_id;
        completion.rate_limits = meta.rate_limits;
        Ok(completion)
    }
}

#[derive(Deserialize)]
struct CompletionBody {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<UsageBody>,
    /// An error object, which can come with a 200.
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    message: Option<ChoiceMessage>,
    #[serde(default)]
    delta: Option<ChoiceMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct UsageBody {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: u64,
}

impl UsageBody {
    /// `prompt_tokens` counts the cached ones too; [`Usage`] keeps them apart, as
    /// Anthropic does, so each part gets its own price.
    fn usage(&self) -> Usage {
        let cached = self
            .prompt_tokens_details
            .as_ref()
            .map_or(0, |d| d.cached_tokens)
            .min(self.prompt_tokens);
        Usage {
            input_tokens: self.prompt_tokens - cached,
            output_tokens: self.completion_tokens,
            cache_read_input_tokens: cached,
            ..Usage::default()
        }
    }
}

/// Parses a chat completion body.
pub(crate) fn parse_completion(body: &[u8]) -> Result<Completion, ProviderError> {
    let malformed = |why: String| {
        ProviderError::new(
            ErrorKind::MalformedResponse,
            format!(
                "the chat completion is not valid ({why}): {}",
                http::excerpt(body)
            ),
        )
    };
    let parsed: CompletionBody =
        serde_json::from_slice(body).map_err(|e| malformed(e.to_string()))?;
    if parsed.error.is_some() {
        // An error object with a 200: the error it names, not a malformed success.
        return Err(error_from_body(None, body));
    }
    let choice = parsed
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| malformed("no choices".into()))?;
    let message = choice
        .message
        .ok_or_else(|| malformed("the choice has no message".into()))?;
    Ok(Completion {
        text: message.content.unwrap_or_default(),
        stop_reason: choice.finish_reason,
        usage: parsed.usage.map(|u| u.usage()).unwrap_or_default(),
        ..Completion::default()
    })
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    message: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    code: Option<serde_json::Value>,
}

/// An error from an `{"error":{…}}` body (after a failed status, or inside a stream).
pub(crate) fn error_from_body(status: Option<u16>, body: &[u8]) -> ProviderError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => {
            let kind_name = b.error.kind.as_deref().unwrap_or("error");
            let code = b.error.code.as_ref().and_then(|c| c.as_str());
            let kind = match status {
                Some(s) => http::kind_for_status(s),
                // Inside a stream there is no status: a server-side failure unless it
                // says otherwise.
                None => match kind_name {
                    "invalid_request_error" => ErrorKind::BadRequest,
                    "rate_limit_exceeded" | "tokens" | "requests" => ErrorKind::RateLimited,
                    _ => ErrorKind::Server,
                },
            };
            let mut error = ProviderError::new(kind, format!("{kind_name}: {}", b.error.message));
            if let Some(s) = status {
                error = error.with_status(s);
            }
            // An empty balance does not refill by waiting.
            if code == Some("insufficient_quota") {
                error = error.with_should_retry(false);
            }
            error
        }
        Err(_) => http::unparsed_error(status, body),
    }
}

/// What a stream has said so far.
#[derive(Debug, Default)]
pub(crate) struct StreamState<'a> {
    text: String,
    finish_reason: Option<String>,
    usage: Usage,
    /// The request whose reply this is, when its text is passed on as it arrives.
    listener: Option<&'a CompletionRequest>,
}

impl<'a> StreamState<'a> {
    /// The state of `request`'s stream, passing its text to the request's delta sink.
    pub(crate) fn for_request(request: &'a CompletionRequest) -> Self {
        StreamState {
            listener: request.deltas.is_some().then_some(request),
            ..StreamState::default()
        }
    }

    /// Takes one event; returns the completion at `[DONE]`.
    pub(crate) fn on_event(
        &mut self,
        event: &SseEvent,
    ) -> Result<Option<Completion>, ProviderError> {
        let data = event.data.trim();
        if data == "[DONE]" {
            return Ok(Some(Completion {
                text: std::mem::take(&mut self.text),
                stop_reason: self.finish_reason.take(),
                usage: self.usage,
                ..Completion::default()
            }));
        }
        if data.starts_with("{\"error\"") || event.event == "error" {
            return Err(error_from_body(None, data.as_bytes()));
        }
        let chunk: CompletionBody = serde_json::from_str(data).map_err(|e| {
            ProviderError::new(
                ErrorKind::MalformedResponse,
                format!("a stream chunk is not valid ({e})"),
            )
        })?;
        if let Some(usage) = chunk.usage {
            self.usage = usage.usage();
        }
        for choice in chunk.choices {
            if let Some(text) = choice.delta.and_then(|d| d.content) {
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
            if let Some(reason) = choice.finish_reason {
                self.finish_reason = Some(reason);
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_completion_parses() {
        let body = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m",
            "choices":[{"index":0,"message":{"role":"assistant","content":"Hi","refusal":null},"logprobs":null,"finish_reason":"stop"}],
            "usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11,"prompt_tokens_details":{"cached_tokens":4}}}"#;
        let c = parse_completion(body).unwrap();
        assert_eq!(c.text, "Hi");
        assert_eq!(c.stop_reason.as_deref(), Some("stop"));
        assert_eq!(
            (
                c.usage.input_tokens,
                c.usage.output_tokens,
                c.usage.cache_read_input_tokens
            ),
            (5, 2, 4),
            "prompt_tokens split into the uncached and the cached part"
        );
        assert_eq!(c.usage.prompt_tokens(), 9);
        assert_eq!(
            parse_completion(br#"{"choices":[]}"#).unwrap_err().kind,
            ErrorKind::MalformedResponse
        );
    }

    #[test]
    fn errors_are_classified_by_status_and_quota_is_final() {
        let body = br#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
        let e = error_from_body(Some(429), body);
        assert_eq!((e.kind, e.status), (ErrorKind::RateLimited, Some(429)));
        assert_eq!(e.should_retry, None, "retried, by its status");
        let body = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
        let e = error_from_body(Some(429), body);
        assert_eq!(
            e.should_retry,
            Some(false),
            "an empty balance does not refill"
        );
    }

    #[test]
    fn a_stream_builds_the_reply_and_usage() {
        let chunks = [
            r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
            r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}"#,
            r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}"#,
            r#"{"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":3}}}"#,
        ];
        let mut s = StreamState::default();
        for data in chunks {
            let e = SseEvent {
                event: "message".into(),
                data: data.into(),
            };
            assert!(s.on_event(&e).unwrap().is_none());
        }
        let done = SseEvent {
            event: "message".into(),
            data: "[DONE]".into(),
        };
        let c = s.on_event(&done).unwrap().unwrap();
        assert_eq!(c.text, "Hello");
        assert_eq!(c.stop_reason.as_deref(), Some("stop"));
        assert_eq!(
            (
                c.usage.input_tokens,
                c.usage.output_tokens,
                c.usage.cache_read_input_tokens
            ),
            (2, 2, 3)
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_and_chunks_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..512),
            data in ".{0,300}",
        ) {
            let json = serde_json::from_slice::<serde_json::Value>(&body).ok();
            // A success only for a completion: an object whose first choice has a message.
            if parse_completion(&body).is_ok() {
                prop_assert!(json.as_ref().is_some_and(|j| j["choices"][0]["message"].is_object()));
            }
            // With a status, the status decides the kind.
            let e = error_from_body(Some(500), &body);
            prop_assert_eq!((e.kind, e.status), (ErrorKind::Server, Some(500)));
            prop_assert_eq!(error_from_body(None, &body).status, None);
            let _ = StreamState::default().on_event(&SseEvent { event: "message".into(), data });
        }
    }
}
