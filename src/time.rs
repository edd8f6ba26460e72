//! Durations as the logs and the JSON show them (milliseconds, to the microsecond),
//! and instants computed from durations a caller chose, without overflow. At the bottom
//! of the crate: every layer speaks them.

use std::time::Duration;

use serde::Serializer;

/// Serializes a duration as fractional milliseconds (microsecond precision).
pub(crate) fn as_millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(millis(*d))
}

/// Serializes an optional duration as fractional milliseconds.
pub(crate) fn as_opt_millis<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&millis(*d)),
        None => s.serialize_none(),
    }
}

/// A duration as milliseconds, rounded to the microsecond.
pub(crate) fn millis(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

/// As far ahead as an instant is taken to go: a century.
const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `t + d`, held to a century ahead: a deadline or a cool-down computed from a duration
/// a caller chose never overflows.
pub(crate) fn later(t: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    t.checked_add(d.min(FAR))
        .or_else(|| t.checked_add(Duration::from_secs(3600)))
        .unwrap_or(t)
}
