//! Which failures can heal with time (DESIGN.md invariant 4), and which say something
//! about the provider's health.

use crate::provider::{ErrorKind, ProviderError};

/// HTTP statuses worth retrying: a timeout, a conflict, a rate limit, and server-side
/// trouble (529 is Anthropic's "overloaded").
const RETRYABLE_STATUSES: [u16; 8] = [408, 409, 429, 500, 502, 503, 504, 529];

/// HTTP statuses that will fail the same way however often they are sent.
const FINAL_STATUSES: [u16; 5] = [400, 401, 403, 404, 413];

/// True when trying the same call again may succeed.
///
/// A provider's own verdict (`x-should-retry`) wins; then the HTTP status; then the
/// kind, which covers failures without a status (timeouts, broken connections, an
/// `overloaded_error` inside a stream that began with 200).
pub fn is_retryable(error: &ProviderError) -> bool {
    if let Some(verdict) = error.should_retry {
        return verdict;
    }
    match error.status {
        Some(s) if RETRYABLE_STATUSES.contains(&s) => true,
        Some(s) if FINAL_STATUSES.contains(&s) => false,
        _ => kind_is_retryable(error.kind),
    }
}

/// Whether a failure of this kind, with no other information, is worth retrying.
pub fn kind_is_retryable(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::RateLimited
            | ErrorKind::Overloaded
            | ErrorKind::Server
            | ErrorKind::Timeout
            | ErrorKind::Connection
    )
}

/// True when the failure says the provider is unwell (and so counts against its
/// circuit breaker), rather than that this one request was wrong or that the provider
/// is asking for less traffic (see [`is_flow_control`]).
pub fn counts_against_provider(error: &ProviderError) -> bool {
    !is_flow_control(error)
        && (kind_is_retryable(error.kind) || error.kind == ErrorKind::MalformedResponse)
}

/// True for a 429 (the account's rate limit) or a 529 / `overloaded_error` (the
/// provider over capacity): flow control, not ill health. They slow the caller down
/// (a lower concurrency limit, a pause) and never count towards a breaker.
pub fn is_flow_control(error: &ProviderError) -> bool {
    matches!(error.kind, ErrorKind::RateLimited | ErrorKind::Overloaded)
        || matches!(error.status, Some(429 | 529))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(kind: ErrorKind, status: u16) -> ProviderError {
        ProviderError::new(kind, "x").with_status(status)
    }

    #[test]
    fn retryable_statuses_are_retried() {
        for s in RETRYABLE_STATUSES {
            assert!(is_retryable(&status(ErrorKind::Unknown, s)), "{s}");
        }
    }

    #[test]
    fn final_statuses_are_never_retried() {
        for s in FINAL_STATUSES {
            // Even when the kind on its own would be.
            assert!(!is_retryable(&status(ErrorKind::Server, s)), "{s}");
        }
    }

    #[test]
    fn kinds_decide_without_a_status() {
        assert!(is_retryable(&ProviderError::new(ErrorKind::Timeout, "t")));
        assert!(is_retryable(&ProviderError::new(
            ErrorKind::Connection,
            "reset"
        )));
        // An overloaded_error inside a 200 stream has no error status.
        assert!(is_retryable(&ProviderError::new(
            ErrorKind::Overloaded,
            "overloaded_error"
        )));
        assert!(!is_retryable(&ProviderError::new(
            ErrorKind::MalformedResponse,
            "bad json"
        )));
        assert!(!is_retryable(&ProviderError::new(
            ErrorKind::Auth,
            "no key"
        )));
    }

    #[test]
    fn rate_limits_and_overload_are_flow_control_not_ill_health() {
        for e in [
            status(ErrorKind::RateLimited, 429),
            status(ErrorKind::Overloaded, 529),
            ProviderError::new(ErrorKind::Overloaded, "overloaded_error in a stream"),
        ] {
            assert!(is_flow_control(&e) && !counts_against_provider(&e), "{e}");
        }
        for e in [
            status(ErrorKind::Server, 500),
            status(ErrorKind::Server, 503),
            ProviderError::new(ErrorKind::Timeout, "t"),
            ProviderError::new(ErrorKind::Connection, "reset"),
        ] {
            assert!(!is_flow_control(&e) && counts_against_provider(&e), "{e}");
        }
        assert!(!counts_against_provider(&status(
            ErrorKind::BadRequest,
            400
        )));
    }

    #[test]
    fn the_providers_verdict_wins() {
        let e = status(ErrorKind::RateLimited, 429).with_should_retry(false);
        assert!(!is_retryable(&e));
        let e = status(ErrorKind::BadRequest, 400).with_should_retry(true);
        assert!(is_retryable(&e));
    }
}
