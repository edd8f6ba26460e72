//! What the HTTP providers share: the client, secrets that never print, reading a
//! response without trusting its size, the headers that steer retries and limits, and
//! the W3C `traceparent` sent upstream.

use std::fmt;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};

use super::client::{BodyError, HttpClient, Response};
use super::{ErrorKind, ProviderError, retry_after};

/// The most a response body may hold: a reply of `max_tokens` is far smaller, so more
/// is a broken or hostile upstream, and reading on would only cost memory.
pub const MAX_RESPONSE_BYTES: usize = 8 << 20;

/// How long to wait for a connection (DNS, TCP, a proxy's tunnel, TLS) before the call
/// fails as a `timeout`. The attempt timeout bounds the whole call.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An API key. Its `Debug` and `Display` print `***`, so it cannot leak through logs,
/// errors or config dumps; only [`Secret::expose`] reveals it, to build a header.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a key.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The key itself, for the one header that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A header value marked sensitive, so HTTP libraries do not log it either.
    pub(crate) fn header(&self, prefix: &str) -> Result<HeaderValue, ProviderError> {
        let mut value = HeaderValue::from_str(&format!("{prefix}{}", self.0)).map_err(|_| {
            ProviderError::new(
                ErrorKind::Auth,
                "the API key contains characters that cannot go in an HTTP header",
            )
        })?;
        value.set_sensitive(true);
        Ok(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How long a connection may sit idle in a provider's pool before it is closed: after
/// a burst, the connections it opened are let go within this (reqwest's default is 90
/// s; APIs behind load balancers often drop idle connections sooner anyway).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP/2 flow-control window of one call: a whole ordinary reply (and the 8 MiB
/// cap's first eighth) arrives without waiting for a `WINDOW_UPDATE`. A window is
/// credit, not a buffer: memory is spent only on what arrives unread.
pub const H2_STREAM_WINDOW: u32 = 1 << 20;

/// The HTTP/2 window all calls on one connection share: thousands of small replies in
/// flight at once do not stall each other.
pub const H2_CONNECTION_WINDOW: u32 = 16 << 20;

/// How often an HTTP/2 connection with calls in flight is pinged, and how long a ping
/// may go unanswered before the connection counts as dead. One dead connection holds
/// every call multiplexed on it: a ping finds it before the attempt timeouts do, and
/// its calls fail as connection errors, which are retried.
pub const H2_KEEP_ALIVE: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(10));

/// Which HTTP version a provider speaks (`providers.NAME.http2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Http2 {
    /// HTTP/2 where the server offers it during the TLS handshake (ALPN), as the
    /// Anthropic and OpenAI APIs do; HTTP/1.1 over `http://`.
    #[default]
    Auto,
    /// HTTP/2 only, with prior knowledge: h2c over `http://`, and only `h2` offered
    /// over TLS. For local servers that speak it, such as `metaorch mock-upstream`.
    Always,
    /// HTTP/1.1 only: one connection per call in flight.
    Never,
}

impl Http2 {
    /// The name as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Http2::Auto => "auto",
            Http2::Always => "always",
            Http2::Never => "never",
        }
    }
}

impl fmt::Display for Http2 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Http2 {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Http2::Auto),
            "always" => Ok(Http2::Always),
            "never" => Ok(Http2::Never),
            _ => Err(format!(
                "\"{s}\" is not an HTTP/2 mode; expected auto, always or never"
            )),
        }
    }
}

/// The client of a provider's endpoint: `headers` go with every request.
pub(crate) fn client(
    url: &str,
    http2: Http2,
    headers: Result<HeaderMap, ProviderError>,
) -> HttpClient {
    HttpClient::new(url, http2, headers, POOL_IDLE_TIMEOUT)
}

/// The rate limit state a provider reported with its response, for flow control.
/// Anthropic reports per-minute limits (`anthropic-ratelimit-*`: requests, input
/// tokens, output tokens, and their most restrictive combination as `tokens`); OpenAI
/// reports requests and tokens (input and output together) as `x-ratelimit-*`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RateLimits {
    /// Requests allowed per window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_limit: Option<u64>,
    /// Requests left in the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_remaining: Option<u64>,
    /// When the request window resets, as the provider wrote it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_reset: Option<String>,
    /// Tokens allowed per window (Anthropic: the most restrictive of its token
    /// limits; OpenAI: input and output together).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_limit: Option<u64>,
    /// Tokens left in the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_remaining: Option<u64>,
    /// When the token window resets, as the provider wrote it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_reset: Option<String>,
    /// Input tokens allowed per minute (Anthropic).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_tokens_limit: Option<u64>,
    /// Input tokens left (Anthropic).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_tokens_remaining: Option<u64>,
    /// Output tokens allowed per minute (Anthropic).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_tokens_limit: Option<u64>,
    /// Output tokens left (Anthropic).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_tokens_remaining: Option<u64>,
}

impl RateLimits {
    /// Reads `anthropic-ratelimit-*` or `x-ratelimit-*` headers; `None` when there are
    /// none.
    pub(crate) fn from_headers(headers: &HeaderMap) -> Option<RateLimits> {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let number = |name: &str| text(name).and_then(|v| v.trim().parse().ok());
        let anthropic = headers
            .keys()
            .any(|k| k.as_str().starts_with("anthropic-ratelimit-"));
        let limits = if anthropic {
            RateLimits {
                requests_limit: number("anthropic-ratelimit-requests-limit"),
                requests_remaining: number("anthropic-ratelimit-requests-remaining"),
                requests_reset: text("anthropic-ratelimit-requests-reset"),
                tokens_limit: number("anthropic-ratelimit-tokens-limit"),
                tokens_remaining: number("anthropic-ratelimit-tokens-remaining"),
                tokens_reset: text("anthropic-ratelimit-tokens-reset"),
                input_tokens_limit: number("anthropic-ratelimit-input-tokens-limit"),
                input_tokens_remaining: number("anthropic-ratelimit-input-tokens-remaining"),
                output_tokens_limit: number("anthropic-ratelimit-output-tokens-limit"),
                output_tokens_remaining: number("anthropic-ratelimit-output-tokens-remaining"),
            }
        } else {
            RateLimits {
                requests_limit: number("x-ratelimit-limit-requests"),
                requests_remaining: number("x-ratelimit-remaining-requests"),
                requests_reset: text("x-ratelimit-reset-requests"),
                tokens_limit: number("x-ratelimit-limit-tokens"),
                tokens_remaining: number("x-ratelimit-remaining-tokens"),
                tokens_reset: text("x-ratelimit-reset-tokens"),
                ..RateLimits::default()
            }
        };
        (limits != RateLimits::default()).then_some(limits)
    }
}

/// What every response says beyond its body.
#[derive(Debug, Clone, Default)]
pub(crate) struct ResponseMeta {
    pub request_id: Option<String>,
    pub retry_after: Option<Duration>,
    pub should_retry: Option<bool>,
    /// Boxed: the metadata is held across the awaits that read the body.
    pub rate_limits: Option<Box<RateLimits>>,
}

impl ResponseMeta {
    pub(crate) fn from_headers(headers: &HeaderMap) -> Self {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        ResponseMeta {
            request_id: text("request-id")
                .or_else(|| text("x-request-id"))
                .map(str::to_owned),
            retry_after: retry_after::parse(
                text("retry-after-ms"),
                text("retry-after"),
                SystemTime::now(),
            ),
            should_retry: match text("x-should-retry").map(str::trim) {
                Some("true") => Some(true),
                Some("false") => Some(false),
                _ => None,
            },
            rate_limits: RateLimits::from_headers(headers).map(Box::new),
        }
    }

    /// Adds what the headers said to an error built from the body.
    pub(crate) fn apply(&self, mut error: ProviderError) -> ProviderError {
        error.retry_after = error.retry_after.or(self.retry_after);
        error.should_retry = error.should_retry.or(self.should_retry);
        if error.rate_limits.is_none() {
            error.rate_limits.clone_from(&self.rate_limits);
        }
        if let Some(id) = &self.request_id {
            error.message = format!("{} (request-id {id})", error.message);
        }
        error
    }
}

/// The error kind an HTTP status means when the body does not say more.
pub(crate) fn kind_for_status(status: u16) -> ErrorKind {
    match status {
        400 | 422 => ErrorKind::BadRequest,
        401 => ErrorKind::Auth,
        402 | 403 => ErrorKind::Permission,
        404 => ErrorKind::NotFound,
        408 | 504 => ErrorKind::Timeout,
        413 => ErrorKind::TooLarge,
        429 => ErrorKind::RateLimited,
        529 => ErrorKind::Overloaded,
        500..=599 => ErrorKind::Server,
        _ => ErrorKind::Unknown,
    }
}

/// Classifies a failure while reading a body, after the headers came: the connection
/// dropped, was reset, or ended short of its `Content-Length` or last chunk. A broken
/// connection is retried.
pub(crate) fn body_error(error: &BodyError) -> ProviderError {
    ProviderError::new(
        ErrorKind::Connection,
        format!(
            "the connection broke while the response was being read ({error}); the reply is incomplete"
        ),
    )
}

/// A request's body as JSON. The buffer is trimmed to the body: it is held until
/// sent, by every call in flight, and the encoder grows it by doubling.
pub(crate) fn encode_json(body: &impl serde::Serialize) -> Result<Bytes, ProviderError> {
    let mut bytes = serde_json::to_vec(body).map_err(|e| {
        ProviderError::new(
            ErrorKind::BadRequest,
            format!("cannot encode the request: {e}"),
        )
    })?;
    bytes.shrink_to_fit();
    Ok(Bytes::from(bytes))
}

/// Reads a whole body, failing once it passes [`MAX_RESPONSE_BYTES`].
pub(crate) async fn read_body(mut response: Response) -> Result<Vec<u8>, ProviderError> {
    if let Some(len) = response.content_length()
        && len > MAX_RESPONSE_BYTES as u64
    {
        return Err(too_big());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| body_error(&e))? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(too_big());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The most of an error body read: enough for any API's error object. The status and
/// headers already say what happened; a huge error body changes nothing.
pub const MAX_ERROR_BODY_BYTES: usize = 64 << 10;

/// Reads an error response's body, up to [`MAX_ERROR_BODY_BYTES`]; never fails (what
/// could be read is what there is), so the status and headers always decide.
pub(crate) async fn read_error_body(mut response: Response) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = MAX_ERROR_BODY_BYTES - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_ERROR_BODY_BYTES {
            break;
        }
    }
    body
}

/// True when a response's content type is JSON: a streaming request answered with a
/// JSON body (an error object, as some gateways send) is read whole, not as events.
pub(crate) fn is_json(response: &Response) -> bool {
    response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"))
}

pub(crate) fn too_big() -> ProviderError {
    ProviderError::new(
        ErrorKind::MalformedResponse,
        format!(
            "the response is larger than {} MiB; no reply should be",
            MAX_RESPONSE_BYTES >> 20
        ),
    )
}

/// The error for a body that is not the API's error shape: classified by status
/// (malformed without one), with an excerpt of what came back.
pub(crate) fn unparsed_error(status: Option<u16>, body: &[u8]) -> ProviderError {
    let error = ProviderError::new(
        status.map_or(ErrorKind::MalformedResponse, kind_for_status),
        if body.is_empty() {
            "no error body".to_owned()
        } else {
            excerpt(body)
        },
    );
    match status {
        Some(s) => error.with_status(s),
        None => error,
    }
}

/// Reads a server-sent event stream, handing each event to `on_event` until it returns
/// the finished value. A stream that ends first, or breaks, is a `connection` error:
/// the reply is incomplete, and `end` (the event that should have closed it) is named.
pub(crate) async fn read_sse<T>(
    mut response: Response,
    end: &str,
    mut on_event: impl FnMut(&super::sse::SseEvent) -> Result<Option<T>, ProviderError>,
) -> Result<T, ProviderError> {
    let mut parser = super::sse::SseParser::default();
    while let Some(chunk) = response.chunk().await.map_err(|e| body_error(&e))? {
        let events = parser
            .feed(&chunk)
            .map_err(|e| ProviderError::new(ErrorKind::MalformedResponse, e))?;
        for event in events {
            if let Some(done) = on_event(&event)? {
                return Ok(done);
            }
        }
    }
    // An event the stream ended before its blank line is discarded (WHATWG), and a
    // stream without its closing event is a broken reply, never a shorter one.
    Err(ProviderError::new(
        ErrorKind::Connection,
        format!("the stream ended before {end}; the reply is incomplete"),
    ))
}

/// A short, printable excerpt of a body for an error message.
pub(crate) fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.chars().count() > 200 {
        format!("{}…", text.chars().take(200).collect::<String>())
    } else {
        text.to_owned()
    }
}

/// A W3C `traceparent` for one attempt: the request's trace id, a fresh span id, sampled.
pub(crate) fn traceparent(trace_id: &str) -> Option<HeaderValue> {
    let valid = trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit());
    if !valid || trace_id.bytes().all(|b| b == b'0') {
        return None;
    }
    let span_id = rand::random::<u64>().max(1);
    HeaderValue::from_str(&format!("00-{trace_id}-{span_id:016x}-01")).ok()
}

/// Joins a base URL and a path without doubling or dropping the slash.
pub(crate) fn join(base: &str, path: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("sk-ant-very-secret");
        assert_eq!(format!("{s:?} {s}"), "Secret(***) ***");
        assert!(s.header("Bearer ").unwrap().is_sensitive());
    }

    #[test]
    fn headers_are_read() {
        let mut h = HeaderMap::new();
        h.insert("request-id", HeaderValue::from_static("req_1"));
        h.insert("retry-after", HeaderValue::from_static("7"));
        h.insert("x-should-retry", HeaderValue::from_static("false"));
        h.insert(
            "anthropic-ratelimit-requests-remaining",
            HeaderValue::from_static("41"),
        );
        h.insert(
            "anthropic-ratelimit-requests-limit",
            HeaderValue::from_static("50"),
        );
        let m = ResponseMeta::from_headers(&h);
        assert_eq!(m.request_id.as_deref(), Some("req_1"));
        assert_eq!(m.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(m.should_retry, Some(false));
        let limits = m.rate_limits.unwrap();
        assert_eq!(
            (limits.requests_limit, limits.requests_remaining),
            (Some(50), Some(41))
        );

        let mut h = HeaderMap::new();
        h.insert(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from_static("900"),
        );
        let limits = RateLimits::from_headers(&h).unwrap();
        assert_eq!(limits.tokens_remaining, Some(900));
        assert!(RateLimits::from_headers(&HeaderMap::new()).is_none());
    }

    #[test]
    fn traceparent_carries_the_trace_id() {
        let id = "0af7651916cd43dd8448eb211c80319c";
        let tp = traceparent(id).unwrap();
        let tp = tp.to_str().unwrap();
        assert!(
            tp.starts_with(&format!("00-{id}-")) && tp.ends_with("-01"),
            "{tp}"
        );
        assert_eq!(tp.len(), 55);
        assert!(traceparent("not-an-id").is_none());
        assert!(traceparent(&"0".repeat(32)).is_none());
    }

    #[test]
    fn urls_join_with_one_slash() {
        assert_eq!(
            join("http://h:1/", "/v1/messages"),
            "http://h:1/v1/messages"
        );
        assert_eq!(join("http://h:1", "v1/messages"), "http://h:1/v1/messages");
    }
}
