//! Durations in config files are written the way people say them: `"30s"`, `"1500ms"`,
//! `"2m"`. Parsed with `humantime`, so a bad value is a TOML error at its own position.

use std::time::Duration;

use serde::{Deserialize, Deserializer, de};

/// A `Duration` that deserializes from a human-readable string such as `"1.5s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map(HumanDuration).map_err(de::Error::custom)
    }
}

/// The longest duration any setting may be: a week. Longer is a mistake (a unit
/// typed wrong), and bounding every duration here keeps every deadline computed from
/// one far from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Parses a human-readable duration: `"250ms"`, `"1.5s"`, `"2m"`, `"1h 30m"`, at most
/// [`MAX_DURATION`]. The error says what was expected.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(metaorch::config::parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
/// assert!(metaorch::config::parse_duration("30").is_err());
/// ```
pub fn parse(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let too_long = || {
        format!(
            "\"{text}\" is longer than any duration may be ({}); write a shorter one, such as \"30s\" or \"2m\"",
            humantime::format_duration(MAX_DURATION)
        )
    };
    // humantime rejects fractions; "1.5s" is too common not to accept.
    if let Some(secs) = trimmed.strip_suffix('s').filter(|s| s.contains('.'))
        && let Ok(secs) = secs.trim().parse::<f64>()
    {
        return match Duration::try_from_secs_f64(secs) {
            Ok(d) if d <= MAX_DURATION => Ok(d),
            Ok(_) => Err(too_long()),
            Err(_) if secs.is_finite() && secs > 0.0 => Err(too_long()),
            Err(_) => Err(format!(
                "\"{text}\" is not a duration (it must be a finite number of seconds, 0 or more); write e.g. \"1.5s\""
            )),
        };
    }
    let d = humantime::parse_duration(trimmed).map_err(|e| {
        if matches!(e, humantime::DurationError::NumberOverflow) {
            return too_long();
        }
        format!(
            "\"{text}\" is not a duration ({e}); write a number with a unit, such as \"500ms\", \"30s\" or \"2m\""
        )
    })?;
    if d > MAX_DURATION {
        return Err(too_long());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse("2m").unwrap(), Duration::from_secs(120));
    }

    #[test]
    fn absurd_durations_are_errors_not_panics() {
        for text in [
            "1.0e30s",
            "300000000000y",
            "99999999999999999999999s",
            "8d",
            "604801s",
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains("longer than any duration may be"), "{text}: {e}");
        }
        for text in ["-1.5s", "NaN.s", "inf.s", "1e400s"] {
            assert!(parse(text).is_err(), "{text}");
        }
        assert_eq!(parse("7d").unwrap(), MAX_DURATION);
    }

    #[test]
    fn rejects_bare_numbers_with_a_hint() {
        let e = parse("30").unwrap_err();
        assert!(e.contains("\"30\" is not a duration"), "{e}");
        assert!(e.contains("\"30s\""), "{e}");
    }
}
