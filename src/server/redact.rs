//! What an API client is told about upstream failures: the kind, the HTTP status and a
//! short sentence of metaorch's own — never the upstream's error body.
//!
//! An upstream error body can hold anything: an account id, an organisation name, a
//! quota, a prompt echoed back, a request id. Those stay in the server's log (every
//! `agent.failure` line has the full message, request id included); the client gets
//! `rate_limited (HTTP 429): the provider's rate limit was reached`. Errors without a
//! status (a refused connection, a timeout) keep metaorch's own description, with any
//! URL in it stripped of credentials, query and fragment, and control characters
//! removed. The synthesized answer, which quotes each failed agent's error, gets the
//! same treatment.

use std::borrow::Cow;

use crate::Response;
use crate::executor::{AgentOutcome, FailureKind, OutcomeError};
use crate::orchestrator::Synthesis;
use crate::provider::ErrorKind;

/// The most characters of metaorch's own description kept for a client.
const MAX_MESSAGE_CHARS: usize = 200;

/// `response` as a client may see it.
pub(super) fn response(mut response: Response) -> Response {
    for outcome in &mut response.outcomes {
        if let Some(error) = &mut outcome.error {
            let raw = error.to_string();
            redact(error);
            let clean = error.to_string();
            if raw != clean {
                response.answer = response.answer.replace(&raw, &clean);
            }
        }
        if let Some(fallback) = &mut outcome.fallback {
            redact(&mut fallback.primary_error);
        }
    }
    if let Synthesis::Model(report) = &mut response.synthesis {
        if let Some(error) = &mut report.error {
            redact(error);
            report.reason = Some(format!("the synthesis {}: {error}", report.status.as_str()));
        }
        if let Some(fallback) = &mut report.model_fallback {
            redact(&mut fallback.primary_error);
        }
    }
    response
}

/// One outcome as a client may see it (the live `agent.done` events).
pub(super) fn outcome(outcome: &AgentOutcome) -> Cow<'_, AgentOutcome> {
    if outcome.error.is_none() && outcome.fallback.is_none() {
        return Cow::Borrowed(outcome);
    }
    let mut outcome = outcome.clone();
    if let Some(error) = &mut outcome.error {
        redact(error);
    }
    if let Some(fallback) = &mut outcome.fallback {
        redact(&mut fallback.primary_error);
    }
    Cow::Owned(outcome)
}

fn redact(error: &mut OutcomeError) {
    error.message = message(error.kind, error.status, &error.message);
}

/// The client's message for an error of `kind` with `status`, whose full message (for
/// the log) is `full`.
fn message(kind: FailureKind, status: Option<u16>, full: &str) -> String {
    match kind {
        // An answer came: its body is the upstream's, not ours to pass on.
        FailureKind::Provider(kind) if status.is_some() => upstream_said(kind).to_owned(),
        // No answer: the description is metaorch's (reqwest's), naming the URL.
        FailureKind::Provider(ErrorKind::Connection | ErrorKind::Timeout) => own_words(full),
        FailureKind::Provider(kind) => upstream_said(kind).to_owned(),
        FailureKind::Panicked => "the agent's task panicked; see the server's log".to_owned(),
        FailureKind::DeadlineExceeded
        | FailureKind::DeadlineInQueue
        | FailureKind::Cancelled
        | FailureKind::CircuitOpen
        | FailureKind::RetryBudgetExhausted => own_words(full),
    }
}

/// A sentence per kind of upstream failure.
fn upstream_said(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::RateLimited => "the provider's rate limit was reached",
        ErrorKind::Overloaded => "the provider is over capacity",
        ErrorKind::Server => "the provider failed with a server error",
        ErrorKind::Timeout => "the provider did not answer in time",
        ErrorKind::Connection => "the connection to the provider failed",
        ErrorKind::BadRequest => "the provider refused the request as invalid",
        ErrorKind::Auth => "the provider refused metaorch's credentials",
        ErrorKind::Permission => "the provider does not permit this request",
        ErrorKind::NotFound => "the provider does not know this model or endpoint",
        ErrorKind::TooLarge => "the provider refused the request as too large",
        ErrorKind::MalformedResponse => "the provider's answer could not be understood",
        ErrorKind::Unknown => "the provider's call failed",
    }
}

/// metaorch's own description, made fit for a client: URLs without credentials, no
/// upstream request id, no control characters, at most 200 characters.
fn own_words(full: &str) -> String {
    let text = without_request_id(full);
    let text = clean_urls(&text);
    let text = crate::telemetry::terminal_safe_line(&text);
    if text.chars().count() > MAX_MESSAGE_CHARS {
        format!(
            "{}…",
            text.chars().take(MAX_MESSAGE_CHARS).collect::<String>()
        )
    } else {
        text.into_owned()
    }
}

/// Without the ` (request-id …)` the providers append.
fn without_request_id(text: &str) -> Cow<'_, str> {
    let Some(start) = text.find(" (request-id ") else {
        return Cow::Borrowed(text);
    };
    let end = text[start..]
        .find(')')
        .map_or(text.len(), |i| start + i + 1);
    Cow::Owned(format!("{}{}", &text[..start], &text[end..]))
}

/// Every `scheme://…` URL in `text` without user name, password, query or fragment.
fn clean_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        // The scheme: the letters, digits, `+`, `-`, `.` just before `://`.
        let scheme_start = rest[..at]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |i| i + 1);
        let end = rest[at..]
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '<' | '>' | '`'))
            .map_or(rest.len(), |i| at + i);
        out.push_str(&rest[..scheme_start]);
        out.push_str(&clean_url(&rest[scheme_start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn clean_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => "<url>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upstream_body_never_reaches_the_client() {
        let full = "{\"error\":{\"message\":\"org-4411 exceeded quota for key sk-…9f\"}} (request-id req_123)";
        let m = message(
            FailureKind::Provider(ErrorKind::RateLimited),
            Some(429),
            full,
        );
        assert_eq!(m, "the provider's rate limit was reached");
        let m = message(
            FailureKind::Provider(ErrorKind::MalformedResponse),
            None,
            "unexpected body: <html>secret</html>",
        );
        assert_eq!(m, "the provider's answer could not be understood");
    }

    #[test]
    fn urls_lose_credentials_and_request_ids_stay_in_the_log() {
        let full = "error sending request for url (https://user:pa55@api.example.com:8443/v1/messages?key=sk-123#x): connection refused (request-id req_9)";
        let m = message(FailureKind::Provider(ErrorKind::Connection), None, full);
        assert_eq!(
            m,
            "error sending request for url (https://api.example.com:8443/v1/messages): connection refused"
        );
        assert_eq!(
            clean_urls("a http://[::1 b http://h/p c"),
            "a <url> b http://h/p c"
        );
    }

    #[test]
    fn metaorchs_own_words_pass_trimmed_and_clean() {
        let m = message(
            FailureKind::DeadlineExceeded,
            None,
            "the request deadline passed before this agent finished",
        );
        assert_eq!(m, "the request deadline passed before this agent finished");
        let long = format!("timed out\x1b[31m {}", "x".repeat(500));
        let m = message(FailureKind::Provider(ErrorKind::Timeout), None, &long);
        assert!(m.starts_with("timed out x") && m.ends_with('…'), "{m}");
        assert_eq!(m.chars().count(), MAX_MESSAGE_CHARS + 1);
    }
}
