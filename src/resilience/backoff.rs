//! How long to wait before a retry: exponential backoff with a cap and a choice of
//! jitter (AWS's "Exponential Backoff and Jitter": none, full, equal, decorrelated).

use std::time::Duration;

use rand::Rng;
use serde::Deserialize;

/// How a computed backoff is randomised, so that clients that failed together do not
/// retry together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    /// Exactly the exponential ceiling: 1 s, 2 s, 4 s, …
    None,
    /// Uniform in `[0, ceiling]`. The default: with decorrelated jitter, the least total
    /// work under contention in AWS's measurements.
    #[default]
    Full,
    /// Half the ceiling plus uniform in `[0, ceiling / 2]`.
    Equal,
    /// Uniform in `[initial_delay, 3 × previous delay]`, capped at `max_delay`.
    Decorrelated,
}

impl Jitter {
    /// The name used in config files and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Jitter::None => "none",
            Jitter::Full => "full",
            Jitter::Equal => "equal",
            Jitter::Decorrelated => "decorrelated",
        }
    }
}

/// When and how often to retry a failed call.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first try included; 1 means never retry.
    pub max_attempts: u32,
    /// The ceiling of the first retry's wait.
    pub initial_delay: Duration,
    /// How much the ceiling grows with each retry (at least 1.0).
    pub multiplier: f64,
    /// The ceiling never exceeds this.
    pub max_delay: Duration,
    /// How the wait is randomised below its ceiling.
    pub jitter: Jitter,
    /// A server's `Retry-After` is honoured up to this long. A 429 asking for longer
    /// opens the provider's circuit until then instead of waiting.
    pub retry_after_max: Duration,
}

impl Default for RetryPolicy {
    /// Four attempts, waits of up to 1 s, 2 s, 4 s (capped at 30 s), full jitter,
    /// `Retry-After` honoured up to 60 s.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            initial_delay: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(30),
            jitter: Jitter::Full,
            retry_after_max: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The exponential ceiling for retry number `retry` (1 for the first retry):
    /// `min(max_delay, initial_delay × multiplier^(retry − 1))`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.initial_delay.as_secs_f64() * self.multiplier.max(1.0).powi(exponent);
        if secs.is_finite() && secs < self.max_delay.as_secs_f64() {
            Duration::from_secs_f64(secs)
        } else {
            self.max_delay
        }
    }

    /// The wait before retry number `retry`, given the previous wait (zero before the
    /// first retry), drawn from `rng` according to the jitter. Never above `max_delay`.
    pub fn delay(&self, retry: u32, previous: Duration, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(retry);
        match self.jitter {
            Jitter::None => ceiling,
            Jitter::Full => uniform(rng, Duration::ZERO, ceiling),
            Jitter::Equal => {
                let half = ceiling / 2;
                half + uniform(rng, Duration::ZERO, ceiling - half)
            }
            Jitter::Decorrelated => {
                let previous = if previous.is_zero() {
                    self.initial_delay
                } else {
                    previous
                };
                let high = previous.saturating_mul(3).min(self.max_delay);
                uniform(rng, self.initial_delay.min(high), high)
            }
        }
    }
}

/// Uniform in `[low, high]`, to the nanosecond.
fn uniform(rng: &mut impl Rng, low: Duration, high: Duration) -> Duration {
    let span = u64::try_from(high.saturating_sub(low).as_nanos()).unwrap_or(u64::MAX);
    low + Duration::from_nanos(if span == 0 {
        0
    } else {
        rng.random_range(0..=span)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn policy(jitter: Jitter) -> RetryPolicy {
        RetryPolicy {
            jitter,
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn no_jitter_doubles_from_one_second() {
        let p = policy(Jitter::None);
        let mut rng = SmallRng::seed_from_u64(1);
        let waits: Vec<_> = (1..=6)
            .map(|n| p.delay(n, Duration::ZERO, &mut rng).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30]);
    }

    #[test]
    fn equal_jitter_keeps_at_least_half() {
        let p = policy(Jitter::Equal);
        let mut rng = SmallRng::seed_from_u64(2);
        for n in 1..=8 {
            let d = p.delay(n, Duration::ZERO, &mut rng);
            assert!(d >= p.ceiling(n) / 2 && d <= p.ceiling(n), "{d:?}");
        }
    }

    #[test]
    fn huge_retry_numbers_stay_at_the_cap() {
        let p = policy(Jitter::None);
        let mut rng = SmallRng::seed_from_u64(3);
        assert_eq!(p.delay(u32::MAX, Duration::ZERO, &mut rng), p.max_delay);
    }

    fn jitter() -> impl Strategy<Value = Jitter> {
        prop_oneof![
            Just(Jitter::None),
            Just(Jitter::Full),
            Just(Jitter::Equal),
            Just(Jitter::Decorrelated),
        ]
    }

    proptest! {
        #[test]
        fn delays_never_exceed_the_cap(
            jitter in jitter(),
            initial_ms in 0u64..10_000,
            multiplier in 1.0f64..10.0,
            max_ms in 0u64..120_000,
            retry in 1u32..100,
            previous_ms in 0u64..1_000_000,
            seed: u64,
        ) {
            let p = RetryPolicy {
                max_attempts: 10,
                initial_delay: Duration::from_millis(initial_ms),
                multiplier,
                max_delay: Duration::from_millis(max_ms),
                jitter,
                retry_after_max: Duration::from_secs(60),
            };
            let mut rng = SmallRng::seed_from_u64(seed);
            let d = p.delay(retry, Duration::from_millis(previous_ms), &mut rng);
            prop_assert!(d <= p.max_delay, "{d:?} > {:?}", p.max_delay);
            // And within what each jitter promises under this retry's ceiling.
            let ceiling = p.ceiling(retry);
            match jitter {
                Jitter::None => prop_assert_eq!(d, ceiling),
                Jitter::Full => prop_assert!(d <= ceiling),
                Jitter::Equal => prop_assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} of {ceiling:?}"),
                Jitter::Decorrelated => {
                    let previous = if previous_ms == 0 { p.initial_delay } else { Duration::from_millis(previous_ms) };
                    let high = previous.saturating_mul(3).min(p.max_delay);
                    prop_assert!(d >= p.initial_delay.min(high) && d <= high, "{d:?}");
                }
            }
        }

        #[test]
        fn without_jitter_the_delay_never_shrinks(
            initial_ms in 0u64..10_000,
            multiplier in 1.0f64..10.0,
            max_ms in 0u64..120_000,
            retry in 1u32..60,
        ) {
            let p = RetryPolicy {
                max_attempts: 10,
                initial_delay: Duration::from_millis(initial_ms),
                multiplier,
                max_delay: Duration::from_millis(max_ms),
                jitter: Jitter::None,
                retry_after_max: Duration::from_secs(60),
            };
            prop_assert!(p.ceiling(retry) <= p.ceiling(retry + 1));
        }

        #[test]
        fn full_jitter_expected_value_grows_until_the_cap(seed: u64, retry in 1u32..6) {
            // The mean of many draws tracks half the ceiling, which grows with `retry`.
            let p = policy(Jitter::Full);
            let mut rng = SmallRng::seed_from_u64(seed);
            let mean = |n: u32, rng: &mut SmallRng| {
                (0..400).map(|_| p.delay(n, Duration::ZERO, rng).as_secs_f64()).sum::<f64>() / 400.0
            };
            let (now, next) = (mean(retry, &mut rng), mean(retry + 1, &mut rng));
            prop_assert!(next > now, "mean wait {now} then {next}");
        }
    }
}
