//! `ProviderError`: a failed provider call, classified so that the resilience layer can
//! decide what to do without knowing any wire format.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

/// What went wrong, in the terms the retry policy decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// 429: the key's rate limit was hit.
    RateLimited,
    /// 529 or an `overloaded_error`: the provider is over capacity.
    Overloaded,
    /// 500, 502, 503, 504 and other server-side failures.
    Server,
    /// The call took longer than allowed.
    Timeout,
    /// The connection could not be made or broke.
    Connection,
    /// 400: the request itself is wrong.
    BadRequest,
    /// 401: the credentials are missing or wrong.
    Auth,
    /// 403: the credentials may not do this.
    Permission,
    /// 404: the model or endpoint does not exist.
    NotFound,
    /// 413: the request is too large.
    TooLarge,
    /// The provider answered, but not in a form that could be understood.
    MalformedResponse,
    /// Anything else.
    Unknown,
}

impl ErrorKind {
    /// The stable snake_case name used in logs and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Server => "server",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connection => "connection",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Auth => "auth",
            ErrorKind::Permission => "permission",
            ErrorKind::NotFound => "not_found",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::MalformedResponse => "malformed_response",
            ErrorKind::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed provider call.
///
/// The message must never contain credentials: providers build it from the response
/// body and status, never from request headers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{kind}{}: {message}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
pub struct ProviderError {
    /// The class of failure.
    pub kind: ErrorKind,
    /// The HTTP status, when the failure came from an HTTP response.
    pub status: Option<u16>,
    /// How long the provider asked us to wait before trying again.
    pub retry_after: Option<Duration>,
    /// The provider's own verdict on retrying (`x-should-retry`), which overrides the
    /// classification by status and kind.
    pub should_retry: Option<bool>,
    /// A human-readable explanation.
    pub message: String,
    /// The rate limit state the response's headers reported, if any.
    pub rate_limits: Option<Box<super::RateLimits>>,
}

impl ProviderError {
    /// A new error of `kind` with `message`, no status and no retry hint.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ProviderError {
            kind,
            status: None,
            retry_after: None,
            should_retry: None,
            message: message.into(),
            rate_limits: None,
        }
    }

    /// Sets the HTTP status.
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// Sets the server's `Retry-After` hint.
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }

    /// Sets the rate limit state the response reported.
    pub fn with_rate_limits(mut self, rate_limits: super::RateLimits) -> Self {
        self.rate_limits = Some(Box::new(rate_limits));
        self
    }

    /// Sets the provider's verdict on retrying (`x-should-retry: true|false`).
    pub fn with_should_retry(mut self, should_retry: bool) -> Self {
        self.should_retry = Some(should_retry);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_kind_status_and_message() {
        let e = ProviderError::new(ErrorKind::RateLimited, "slow down").with_status(429);
        assert_eq!(e.to_string(), "rate_limited (HTTP 429): slow down");
        let e = ProviderError::new(ErrorKind::Timeout, "no answer in 5s");
        assert_eq!(e.to_string(), "timeout: no answer in 5s");
    }
}
