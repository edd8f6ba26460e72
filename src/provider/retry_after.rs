//! Reading a server's request to wait: `retry-after-ms` (Anthropic and OpenAI send it,
//! fractional milliseconds) or the standard `Retry-After` (delay-seconds or an HTTP
//! date, RFC 9110 §10.2.3).

use std::time::{Duration, SystemTime};

/// The wait a response asks for, from its `retry-after-ms` and `retry-after` header
/// values (either may be absent). `retry-after-ms` wins when both parse. A date in the
/// past means "now" (zero). Values that do not parse are ignored. Every form is held
/// to [`MAX_RETRY_AFTER`].
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
    Some(
        date.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

/// The longest wait a response may ask for: ten minutes. Longer asks — a misread
/// header, a proxy's idea of a day — are held to this. It bounds both what a call
/// waits (further held to its policy's `retry_after_max`) and how long a provider's
/// callers are paused or its breaker kept open on a provider's say-so.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

const MAX_SECS: f64 = MAX_RETRY_AFTER.as_secs_f64();

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
        assert_eq!(parse(None, Some("1e300"), now), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn every_form_is_held_to_the_maximum() {
        let now = at(0);
        for (ms, secs) in [
            (None, Some("99999999999999999999")),
            (Some("99999999999999999999"), None),
            (None, Some("Fri, 31 Dec 9999 23:59:59 GMT")),
            (None, Some("601")),
        ] {
            assert_eq!(
                parse(ms, secs, now),
                Some(MAX_RETRY_AFTER),
                "{ms:?} {secs:?}"
            );
        }
        assert_eq!(
            parse(None, Some("599"), now),
            Some(Duration::from_secs(599))
        );
    }
}
