//! Reading a server's request to wait: `retry-after-ms` (Anthropic and OpenAI send it,
//! fractional milliseconds) or the standard `Retry-After` (delay-seconds or an HTTP
//! date, RFC 9110 §10.2.3).

use std::time::{Duration, SystemTime};

/// The wait a response asks for, from its `retry-after-ms` and `retry-after` header
/// values (either may be absent). `retry-after-ms` wins when both parse. A date in the
/// past means "now" (zero). Values that do not parse are ignored.
pub fn parse(
    retry_after_ms: Option<&str>,
    retry_after: Option<&str>,
    now: SystemTime,
) -> Option<Duration> {
    if let Some(ms) = retry_after_ms.and_then(|v| v.trim().parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_secs_f64((ms / 1000.0).min(MAX_SECS)));
    }
    let value = retry_after?.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(MAX_SECS)));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A year: longer waits are nonsense and are held to this, which the retry clamp
/// then brings down further.
const MAX_SECS: f64 = 365.0 * 24.0 * 3600.0;

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn seconds_and_milliseconds() {
        let now = at(0);
        assert_eq!(parse(None, Some("3"), now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse(None, Some(" 1.5 "), now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse(Some("250"), None, now),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            parse(Some("250"), Some("9"), now),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            parse(Some("junk"), Some("9"), now),
            Some(Duration::from_secs(9))
        );
    }

    #[test]
    fn http_dates_count_from_now() {
        // Sun, 06 Nov 1994 08:49:37 GMT is 784111777 s after the epoch.
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        assert_eq!(
            parse(None, Some(date), at(784_111_770)),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse(None, Some(date), at(784_111_999)),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn nonsense_is_ignored() {
        let now = at(0);
        assert_eq!(parse(None, None, now), None);
        assert_eq!(parse(None, Some("soon"), now), None);
        assert_eq!(parse(Some("-5"), Some("-1"), now), None);
        assert_eq!(
            parse(None, Some("1e300"), now),
            Some(Duration::from_secs_f64(MAX_SECS))
        );
    }
}
