//! Bearer-token authentication (RFC 6750): `Authorization: Bearer <token>`, the scheme
//! in any case, exactly one `Authorization` header.
//!
//! Tokens are compared as HMAC-SHA-256 tags under a key drawn when the server starts:
//! the configured tokens' tags are computed once, the presented token's on each
//! request, and the 32-byte tags are compared in constant time. The time taken thus
//! depends on nothing about the configured tokens — not their bytes, not their
//! lengths, not which one matched — where comparing the strings themselves would
//! return early on a length mismatch.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ring::hmac;
use subtle::ConstantTimeEq;

use super::{ApiError, ServerState};
use crate::provider::Secret;

/// The tokens that may call the API, as tags under a key of this process.
pub(super) struct Tokens {
    key: hmac::Key,
    tags: Vec<hmac::Tag>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens([{} redacted])", self.tags.len())
    }
}

impl Tokens {
    pub(super) fn new(tokens: &[Secret]) -> Tokens {
        // `rand`'s thread generator is a CSPRNG seeded by the operating system.
        let key = hmac::Key::new(hmac::HMAC_SHA256, &rand::random::<[u8; 32]>());
        let tags = tokens
            .iter()
            .map(|t| hmac::sign(&key, t.expose().as_bytes()))
            .collect();
        Tokens { key, tags }
    }

    /// True when no token is configured: the API is open.
    pub(super) fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    /// Whether `given` is one of the tokens. Every tag is compared, whatever matched.
    pub(super) fn accepts(&self, given: &[u8]) -> bool {
        let tag = hmac::sign(&self.key, given);
        let matched = self.tags.iter().fold(0u8, |acc, t| {
            acc | t.as_ref().ct_eq(tag.as_ref()).unwrap_u8()
        });
        matched == 1
    }
}

/// Why a request's credentials were refused, in words for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Missing,
    Several,
    NotBearer,
    Wrong,
}

impl Refusal {
    fn message(self) -> &'static str {
        match self {
            Refusal::Missing => {
                "a bearer token is required: send Authorization: Bearer <token> (server.auth_tokens or METAORCH_SERVER_TOKENS)"
            }
            Refusal::Several => "send one Authorization header, not several",
            Refusal::NotBearer => {
                "the Authorization header is not a bearer token: send Authorization: Bearer <token>"
            }
            Refusal::Wrong => "the bearer token is not valid",
        }
    }
}

/// The token of the one `Authorization: Bearer` header.
fn bearer(headers: &HeaderMap) -> Result<&[u8], Refusal> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or(Refusal::Missing)?;
    if values.next().is_some() {
        return Err(Refusal::Several);
    }
    let value = value.as_bytes().trim_ascii();
    let split = value
        .iter()
        .position(|b| *b == b' ' || *b == b'\t')
        .ok_or(Refusal::NotBearer)?;
    let (scheme, token) = value.split_at(split);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(Refusal::NotBearer);
    }
    match token.trim_ascii() {
        [] => Err(Refusal::NotBearer),
        token => Ok(token),
    }
}

/// Middleware: lets a request through when no token is configured or it carries one;
/// 401 otherwise.
pub(super) async fn require_token(
    State(state): State<Arc<ServerState>>,
    request: Request,
    next: Next,
) -> Response {
    if state.tokens.is_empty() {
        return next.run(request).await;
    }
    let verdict = bearer(request.headers()).and_then(|token| {
        if state.tokens.accepts(token) {
            Ok(())
        } else {
            Err(Refusal::Wrong)
        }
    });
    match verdict {
        Ok(()) => next.run(request).await,
        Err(refusal) => ApiError::unauthorized(refusal.message()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::AUTHORIZATION, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_scheme_is_case_insensitive_and_one_header_only() {
        for ok in ["Bearer tok", "bearer tok", "BEARER tok", "Bearer   tok  "] {
            assert_eq!(bearer(&headers(&[ok])), Ok(&b"tok"[..]), "{ok}");
        }
        assert_eq!(bearer(&headers(&[])), Err(Refusal::Missing));
        assert_eq!(
            bearer(&headers(&["Bearer tok", "Bearer tok"])),
            Err(Refusal::Several)
        );
        for bad in ["Basic dG9rOg==", "Bearertok", "Bearer", "Bearer   ", "tok"] {
            assert_eq!(bearer(&headers(&[bad])), Err(Refusal::NotBearer), "{bad}");
        }
    }

    #[test]
    fn only_a_configured_token_is_accepted() {
        let tokens = Tokens::new(&[Secret::new("s3cret-token"), Secret::new("other")]);
        assert!(tokens.accepts(b"s3cret-token"));
        assert!(tokens.accepts(b"other"));
        for wrong in [
            &b""[..],
            b"s3cret-tokeX",
            b"s3cret-token ",
            b"s3cret",
            b"othe",
        ] {
            assert!(!tokens.accepts(wrong), "{wrong:?}");
        }
        assert!(Tokens::new(&[]).is_empty());
        assert_eq!(format!("{tokens:?}"), "Tokens([2 redacted])");
    }
}
