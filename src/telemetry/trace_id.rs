//! `TraceId`: a W3C trace-context trace id, 16 random bytes shown as 32 lowercase hex
//! digits, so it can be sent upstream in a `traceparent` header and joined with
//! OpenTelemetry spans.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A request's trace id. Never all zeros (W3C reserves that as invalid).
///
/// ```
/// use metaorch::telemetry::TraceId;
///
/// let id = TraceId::random();
/// let text = id.to_string();
/// assert_eq!(text.len(), 32);
/// assert_eq!(text.parse::<TraceId>().unwrap(), id);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TraceId(u128);

impl TraceId {
    /// A new random trace id.
    pub fn random() -> TraceId {
        loop {
            let id: u128 = rand::random();
            if id != 0 {
                return TraceId(id);
            }
        }
    }

    /// The id as a number; `None` for zero, which W3C calls invalid.
    pub fn from_u128(id: u128) -> Option<TraceId> {
        (id != 0).then_some(TraceId(id))
    }

    /// The id as a number.
    pub fn as_u128(self) -> u128 {
        self.0
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceId({self})")
    }
}

/// Why a string is not a trace id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a trace id: expected 32 lowercase hexadecimal digits, not all zero")]
pub struct ParseTraceIdError {
    value: String,
}

impl FromStr for TraceId {
    type Err = ParseTraceIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseTraceIdError {
            value: s.chars().take(64).collect(),
        };
        if s.len() != 32 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(err());
        }
        u128::from_str_radix(s, 16)
            .ok()
            .and_then(TraceId::from_u128)
            .ok_or_else(err)
    }
}

impl Serialize for TraceId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TraceId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_as_32_lowercase_hex_with_leading_zeros() {
        let id = TraceId::from_u128(0xab).unwrap();
        assert_eq!(id.to_string(), "000000000000000000000000000000ab");
    }

    #[test]
    fn rejects_wrong_length_uppercase_and_zero() {
        for bad in [
            "abc",
            "4BF92F3577B34DA6A3CE929D0E0E4736",
            "00000000000000000000000000000000",
            "4bf92f3577b34da6a3ce929d0e0e473g",
            "+bf92f3577b34da6a3ce929d0e0e4736",
        ] {
            assert!(bad.parse::<TraceId>().is_err(), "{bad}");
        }
        assert!(
            "4bf92f3577b34da6a3ce929d0e0e4736"
                .parse::<TraceId>()
                .is_ok()
        );
    }

    #[test]
    fn random_ids_are_valid_and_do_not_repeat() {
        let ids: std::collections::HashSet<String> =
            (0..10_000).map(|_| TraceId::random().to_string()).collect();
        assert_eq!(ids.len(), 10_000, "no repeats in 10,000");
        for id in &ids {
            assert_eq!(id.parse::<TraceId>().unwrap().to_string(), *id, "{id}");
        }
        // Every hex digit shows up in every position over that many draws: not a
        // counter, not a fixed prefix.
        for position in 0..32 {
            let digits: std::collections::HashSet<u8> =
                ids.iter().map(|id| id.as_bytes()[position]).collect();
            assert_eq!(digits.len(), 16, "position {position}");
        }
    }
}
