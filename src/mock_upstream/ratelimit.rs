//! The fake account's limits on the wire: each API's rate-limit headers, and the 429
//! or 529 a refused request gets.
//!
//! Headers are sent only for limits that are configured: a client that learns its
//! limits from headers must not throttle itself to a limit nobody set.

use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use serde_json::json;

use super::faults::MockFault;
use super::wire::{Api, error, fault_response, json_response};
use crate::provider::{AccountLimits, AccountRejection, AccountState, BucketState, LimitedBy};

/// Adds the rate-limit headers of every configured limit.
pub(super) fn insert_headers(api: Api, state: &AccountState, headers: &mut HeaderMap) {
    let now = SystemTime::now();
    let mut insert = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    match api {
        Api::Anthropic => {
            let reset = |b: &BucketState| reset_at(now, b.reset);
            if let Some(b) = &state.requests {
                insert(
                    "anthropic-ratelimit-requests-limit",
                    b.limit_per_minute.to_string(),
                );
                insert(
                    "anthropic-ratelimit-requests-remaining",
                    b.remaining.to_string(),
                );
                insert("anthropic-ratelimit-requests-reset", reset(b));
            }
            if let Some(b) = &state.tokens {
                // The mock counts input tokens only, so the combined limit is the same.
                for (limit, remaining, reset_name) in [
                    (
                        "anthropic-ratelimit-input-tokens-limit",
                        "anthropic-ratelimit-input-tokens-remaining",
                        "anthropic-ratelimit-input-tokens-reset",
                    ),
                    (
                        "anthropic-ratelimit-tokens-limit",
                        "anthropic-ratelimit-tokens-remaining",
                        "anthropic-ratelimit-tokens-reset",
                    ),
                ] {
                    insert(limit, b.limit_per_minute.to_string());
                    insert(remaining, b.remaining.to_string());
                    insert(reset_name, reset(b));
                }
            }
        }
        Api::OpenAi => {
            if let Some(b) = &state.requests {
                insert("x-ratelimit-limit-requests", b.limit_per_minute.to_string());
                insert("x-ratelimit-remaining-requests", b.remaining.to_string());
                insert("x-ratelimit-reset-requests", go_duration(b.reset));
            }
            if let Some(b) = &state.tokens {
                insert("x-ratelimit-limit-tokens", b.limit_per_minute.to_string());
                insert("x-ratelimit-remaining-tokens", b.remaining.to_string());
                insert("x-ratelimit-reset-tokens", go_duration(b.reset));
            }
        }
    }
}

/// The response to a request the account refused: 429 with `retry-after` for a rate
/// limit, the API's overloaded error for concurrency.
pub(super) fn refused(
    api: Api,
    rejection: &AccountRejection,
    limits: &AccountLimits,
    input_tokens: u64,
    model: &str,
    request_id: &str,
) -> Response {
    let Some(wait) = rejection.retry_after else {
        return fault_response(api, MockFault::Overloaded, Duration::ZERO, request_id);
    };
    // The limit as configured, in its own unit, for the message.
    let (limit, requested, anthropic_unit, openai_unit) = match rejection.limited_by {
        LimitedBy::Tpm => (
            limits.tpm.unwrap_or(0).to_string(),
            input_tokens,
            "input tokens per minute",
            "tokens per min (TPM)",
        ),
        LimitedBy::Rps => (
            limits.rps.unwrap_or(0.0).to_string(),
            1,
            "requests per second",
            "requests per sec (RPS)",
        ),
        LimitedBy::Rpm | LimitedBy::MaxConcurrent => (
            limits.rpm.unwrap_or(0).to_string(),
            1,
            "requests per minute",
            "requests per min (RPM)",
        ),
    };
    let mut response = match api {
        Api::Anthropic => error(
            api,
            429,
            "rate_limit_error",
            &format!(
                "This request would exceed the rate limit for your organization of {limit} {anthropic_unit}. \
                 For details, refer to: https://docs.claude.com/en/api/rate-limits. \
                 You can see the response headers for current usage. \
                 Please reduce the prompt length or the maximum tokens requested, or try again later."
            ),
            request_id,
        ),
        Api::OpenAi => {
            let kind = match rejection.limited_by {
                LimitedBy::Tpm => "tokens",
                _ => "requests",
            };
            let body = json!({"error": {
                "message": format!(
                    "Rate limit reached for {model} in organization org-mock on {openai_unit}: \
                     Limit {limit}, Requested {requested}. Please try again in {}. \
                     Visit https://platform.openai.com/account/rate-limits to learn more.",
                    go_duration(wait)
                ),
                "type": kind,
                "param": null,
                "code": "rate_limit_exceeded"
            }});
            json_response(429, &body, request_id, api)
        }
    };
    let headers = response.headers_mut();
    // Whole seconds for `retry-after`, which cannot say less than one; whole
    // milliseconds rounded up for `retry-after-ms`, so waiting it is always enough.
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let millis = wait.as_nanos().div_ceil(1_000_000);
    for (name, value) in [
        ("retry-after", secs.max(1)),
        ("retry-after-ms", millis as u64),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
            headers.insert(name, v);
        }
    }
    response
}

/// When a bucket is full again, as Anthropic writes it: RFC 3339 in UTC, whole
/// seconds rounded up (so that at that time it is full).
fn reset_at(now: SystemTime, reset: Duration) -> String {
    let at = now.checked_add(reset).unwrap_or(now);
    let since_epoch = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let rounded =
        Duration::from_secs(since_epoch.as_secs() + u64::from(since_epoch.subsec_nanos() > 0));
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + rounded).to_string()
}

/// A duration as OpenAI writes it, in Go's `time.Duration` format: `17ms`, `1s`,
/// `1.5s`, `6m0s`, `1h0m0s`. Rounded up to the millisecond, as OpenAI's values are.
pub(super) fn go_duration(d: Duration) -> String {
    let ms = d.as_nanos().div_ceil(1_000_000);
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (hours, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (minutes, rest) = (rest / 60_000, rest % 60_000);
    let (secs, frac) = (rest / 1000, rest % 1000);
    let mut out = String::new();
    if hours > 0 {
        out.push_str(&format!("{hours}h"));
    }
    if hours > 0 || minutes > 0 {
        out.push_str(&format!("{minutes}m"));
    }
    out.push_str(&secs.to_string());
    if frac > 0 {
        let digits = format!("{frac:03}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
    out.push('s');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_as_openai_writes_them() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(1), "1ms"),
            (Duration::from_millis(17), "17ms"),
            (Duration::from_micros(16_400), "17ms"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_millis(8640), "8.64s"),
            (Duration::from_secs(360), "6m0s"),
            (Duration::from_millis(61_050), "1m1.05s"),
            (Duration::from_secs(3600), "1h0m0s"),
            (Duration::from_secs(3723), "1h2m3s"),
        ];
        for (d, text) in cases {
            assert_eq!(go_duration(d), text, "{d:?}");
        }
    }

    #[test]
    fn resets_are_rfc3339_seconds_rounded_up() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_640_400);
        assert_eq!(reset_at(now, Duration::ZERO), "2026-11-25T21:00:00Z");
        assert_eq!(
            reset_at(now, Duration::from_millis(2001)),
            "2026-11-25T21:00:03Z"
        );
    }
}
