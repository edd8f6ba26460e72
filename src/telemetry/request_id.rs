//! `RequestId`: one request's own id, 8 random bytes shown as 16 lowercase hex digits
//! (the size of a W3C span id).
//!
//! A trace id names a caller's whole operation, and a caller may send several requests
//! inside one `traceparent`; the request id keeps them apart in the logs, in
//! `metaorch trace` and in `GET /v1/traces/{id}`.

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

/// A request's id. Never zero.
///
/// ```
/// use metaorch::telemetry::RequestId;
///
/// let id = RequestId::random();
/// let text = id.to_string();
/// assert_eq!(text.len(), 16);
/// assert_eq!(text.parse::<RequestId>().unwrap(), id);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(u64);

impl RequestId {
    /// A new random request id.
    pub fn random() -> RequestId {
        RequestId(rand::random::<u64>().max(1))
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({self})")
    }
}

/// Why a string is not a request id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a request id: expected 16 lowercase hexadecimal digits, not all zero")]
pub struct ParseRequestIdError {
    value: String,
}

impl FromStr for RequestId {
    type Err = ParseRequestIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseRequestIdError {
            value: s.chars().take(32).collect(),
        };
        if s.len() != 16 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(err());
        }
        match u64::from_str_radix(s, 16) {
            Ok(0) | Err(_) => Err(err()),
            Ok(n) => Ok(RequestId(n)),
        }
    }
}

impl Serialize for RequestId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_what_is_not_one() {
        let id = RequestId::random();
        assert_eq!(id.to_string().parse::<RequestId>(), Ok(id));
        for bad in [
            "",
            "0000000000000000",
            "00f067aa0ba902b",
            "00F067AA0BA902B7",
            "00f067aa0ba902b7x",
        ] {
            assert!(bad.parse::<RequestId>().is_err(), "{bad}");
        }
    }
}
