//! A fake provider account: the request, token and concurrency limits a real API key
//! has, enforced the way Anthropic and OpenAI enforce them, so that a client's flow
//! control can be load-tested against something that pushes back.
//!
//! Rate limits are token buckets refilled continuously, as Anthropic documents them:
//! a requests-per-minute limit "may be enforced as 1 request per second" (a bucket
//! holding one second's worth), and input tokens are "continuously replenished up to
//! your maximum" (a bucket holding a full minute's worth). Concurrency is a plain
//! count of requests in progress; past it the request is refused as overloaded.
//!
//! The account knows nothing of HTTP: `mock-upstream` turns a rejection into a 429 or
//! 529, and the in-process `sim` provider can turn it into a [`ProviderError`]. It reads
//! [`tokio::time::Instant`], so tests on tokio's paused clock are exact.
//!
//! [`ProviderError`]: super::ProviderError

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// Limits a fake provider account enforces, as the real APIs do. `None` is no limit.
///
/// Zero, negative or non-finite rates are not limits at all: [`Account::new`] ignores
/// them rather than refuse every request forever (the command line rejects them first).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AccountLimits {
    /// Requests per second: a bucket holding one second's worth (at least 1), refilled
    /// continuously.
    pub rps: Option<f64>,
    /// Requests per minute, enforced as `rpm / 60` per second with a bucket of one
    /// second's worth (at least 1): "60 RPM may be enforced as 1 request per second",
    /// as Anthropic documents.
    pub rpm: Option<u64>,
    /// Input tokens per minute: a bucket holding a full minute's worth (`tpm`), refilled
    /// at `tpm / 60` per second.
    pub tpm: Option<u64>,
    /// Requests in progress at once; past it a request is refused as overloaded.
    pub max_concurrent: Option<usize>,
}

impl AccountLimits {
    /// Whether no limit at all is set.
    ///
    /// ```
    /// use metaorch::provider::AccountLimits;
    ///
    /// assert!(AccountLimits::default().is_empty());
    /// assert!(!AccountLimits { rpm: Some(60), ..AccountLimits::default() }.is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.rps.is_none()
            && self.rpm.is_none()
            && self.tpm.is_none()
            && self.max_concurrent.is_none()
    }
}

impl fmt::Display for AccountLimits {
    /// The limits that are set, as `mock-upstream`'s flags name them: `rps 5, tpm
    /// 10000`, or `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set: Vec<String> = [
            ("rps", self.rps.map(|n| n.to_string())),
            ("rpm", self.rpm.map(|n| n.to_string())),
            ("tpm", self.tpm.map(|n| n.to_string())),
            ("max_concurrent", self.max_concurrent.map(|n| n.to_string())),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some(format!("{name} {}", value?)))
        .collect();
        if set.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&set.join(", "))
        }
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitedBy {
    /// Requests per second.
    Rps,
    /// Requests per minute.
    Rpm,
    /// Input tokens per minute.
    Tpm,
    /// Requests in progress at once.
    MaxConcurrent,
}

impl LimitedBy {
    /// The name used in logs and on the command line: `rps`, `rpm`, `tpm` or
    /// `max_concurrent`.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitedBy::Rps => "rps",
            LimitedBy::Rpm => "rpm",
            LimitedBy::Tpm => "tpm",
            LimitedBy::MaxConcurrent => "max_concurrent",
        }
    }
}

impl fmt::Display for LimitedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One rate limit as a client would see it in response headers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketState {
    /// The limit per minute: `rpm`, or `rps × 60` (rounded, at least 1). With both set,
    /// the more restrictive one.
    pub limit_per_minute: u64,
    /// Whole units (requests or tokens) that could be admitted right now.
    pub remaining: u64,
    /// How long until the bucket is full again.
    pub reset: Duration,
}

/// The rate limits' state at one moment, for response headers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AccountState {
    /// Requests (`rps` and `rpm` together); `None` when neither is configured.
    pub requests: Option<BucketState>,
    /// Input tokens (`tpm`); `None` when it is not configured.
    pub tokens: Option<BucketState>,
}

/// A request the account refused.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("{}", describe(*.limited_by, *.retry_after))]
pub struct AccountRejection {
    /// The limit that refused it. When several rate limits would, the one that frees
    /// up last.
    pub limited_by: LimitedBy,
    /// For a rate limit, exactly how long until this request would be admitted (if
    /// nothing else is admitted meanwhile); `None` for [`LimitedBy::MaxConcurrent`],
    /// which frees up when some request finishes.
    pub retry_after: Option<Duration>,
    /// The rate limits' state when it was refused.
    pub state: AccountState,
}

fn describe(limited_by: LimitedBy, retry_after: Option<Duration>) -> String {
    match retry_after {
        Some(wait) => format!(
            "the account's {limited_by} limit is reached; the request would be admitted in {wait:?}"
        ),
        None => format!(
            "the account's {limited_by} limit is reached; retry when a request in progress ends"
        ),
    }
}

/// A fake provider account: rate limits and a concurrency limit, shared by every
/// request made with it.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use metaorch::provider::{Account, AccountLimits, LimitedBy};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let account = Arc::new(Account::new(AccountLimits { rpm: Some(120), ..AccountLimits::default() }));
/// // 120 RPM is 2 per second, with a bucket of one second's worth. (The clock is
/// // tokio's, paused here, so the wait below is exact.)
/// let first = account.admit(100).unwrap();
/// let second = account.admit(100).unwrap();
/// let refused = account.admit(100).unwrap_err();
/// assert_eq!(refused.limited_by, LimitedBy::Rpm);
/// assert_eq!(refused.retry_after, Some(Duration::from_millis(500)));
/// assert_eq!(account.in_flight(), 2);
/// drop((first, second));
/// assert_eq!(account.in_flight(), 0);
/// # }
/// ```
#[derive(Debug)]
pub struct Account {
    limits: AccountLimits,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    rps: Option<Bucket>,
    rpm: Option<Bucket>,
    tpm: Option<Bucket>,
    in_flight: usize,
}

impl Account {
    /// An account with these limits, its buckets full.
    pub fn new(limits: AccountLimits) -> Self {
        let now = Instant::now();
        let rps = limits
            .rps
            .filter(|r| r.is_finite() && *r > 0.0)
            .map(|r| Bucket::new(r.max(1.0), r, now));
        let rpm = limits.rpm.filter(|r| *r > 0).map(|r| {
            let per_second = r as f64 / 60.0;
            Bucket::new(per_second.max(1.0), per_second, now)
        });
        let tpm = limits
            .tpm
            .filter(|t| *t > 0)
            .map(|t| Bucket::new(t as f64, t as f64 / 60.0, now));
        Account {
            limits,
            state: Mutex::new(State {
                rps,
                rpm,
                tpm,
                in_flight: 0,
            }),
        }
    }

    /// The limits it enforces.
    pub fn limits(&self) -> &AccountLimits {
        &self.limits
    }

    /// Admits a request of `input_tokens`, or says why not.
    ///
    /// Rate limits are checked first (a 429 on the real APIs), then concurrency (a 529).
    /// Nothing is taken from any bucket unless the request is admitted. A request of
    /// more tokens than the token bucket holds is admitted once the bucket is full and
    /// takes them all (the bucket goes below empty), so it is never refused forever.
    pub fn admit(self: &Arc<Self>, input_tokens: u64) -> Result<AccountPermit, AccountRejection> {
        let mut state = self.lock();
        state.refill(Instant::now());
        let tokens = input_tokens as f64;
        let waits = [
            (LimitedBy::Rps, state.rps.as_ref().map(|b| b.wait_for(1.0))),
            (LimitedBy::Rpm, state.rpm.as_ref().map(|b| b.wait_for(1.0))),
            (
                LimitedBy::Tpm,
                state.tpm.as_ref().map(|b| b.wait_for(tokens)),
            ),
        ];
        // Admission needs every bucket, so the longest wait is the one that counts.
        let longest = waits
            .into_iter()
            .filter_map(|(by, wait)| Some((by, wait?)))
            .filter(|(_, wait)| !wait.is_zero())
            .fold(
                None,
                |longest: Option<(LimitedBy, Duration)>, (by, wait)| match longest {
                    Some((_, w)) if w >= wait => longest,
                    _ => Some((by, wait)),
                },
            );
        if let Some((limited_by, wait)) = longest {
            return Err(AccountRejection {
                limited_by,
                retry_after: Some(wait),
                state: state.snapshot(&self.limits),
            });
        }
        if let Some(max) = self.limits.max_concurrent
            && state.in_flight >= max
        {
            return Err(AccountRejection {
                limited_by: LimitedBy::MaxConcurrent,
                retry_after: None,
                state: state.snapshot(&self.limits),
            });
        }
        state.take(tokens);
        Ok(AccountPermit {
            state: state.snapshot(&self.limits),
            account: Arc::clone(self),
        })
    }

    /// The rate limits' state now, taking nothing (for responses to requests that never
    /// reach admission, such as a 400).
    pub fn state(&self) -> AccountState {
        let mut state = self.lock();
        state.refill(Instant::now());
        state.snapshot(&self.limits)
    }

    /// Requests admitted and not yet finished (their permits not dropped).
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a few numbers updated together; a panic elsewhere cannot leave
        // them half-written, so a poisoned lock is still good.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An admitted request's hold on a concurrency slot, released on drop.
#[derive(Debug)]
pub struct AccountPermit {
    /// The rate limits' state right after admission, for response headers.
    pub state: AccountState,
    account: Arc<Account>,
}

impl Drop for AccountPermit {
    fn drop(&mut self) {
        let mut state = self.account.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
    }
}

impl State {
    fn refill(&mut self, now: Instant) {
        for bucket in [&mut self.rps, &mut self.rpm, &mut self.tpm]
            .into_iter()
            .flatten()
        {
            bucket.refill(now);
        }
    }

    /// Takes one request and `tokens` from the buckets, and a concurrency slot.
    fn take(&mut self, tokens: f64) {
        for bucket in [&mut self.rps, &mut self.rpm].into_iter().flatten() {
            bucket.take(1.0);
        }
        if let Some(bucket) = &mut self.tpm {
            bucket.take(tokens);
        }
        self.in_flight += 1;
    }

    fn snapshot(&self, limits: &AccountLimits) -> AccountState {
        let rps = self
            .rps
            .as_ref()
            .zip(limits.rps)
            .map(|(b, rps)| b.state((rps * 60.0).round().max(1.0) as u64));
        let rpm = self
            .rpm
            .as_ref()
            .zip(limits.rpm)
            .map(|(b, rpm)| b.state(rpm));
        let requests = match (rps, rpm) {
            (Some(a), Some(b)) => Some(BucketState {
                limit_per_minute: a.limit_per_minute.min(b.limit_per_minute),
                remaining: a.remaining.min(b.remaining),
                reset: a.reset.max(b.reset),
            }),
            (a, b) => a.or(b),
        };
        AccountState {
            requests,
            tokens: self
                .tpm
                .as_ref()
                .zip(limits.tpm)
                .map(|(b, tpm)| b.state(tpm)),
        }
    }
}

/// A token bucket refilled continuously at `per_second` up to `capacity`.
#[derive(Debug)]
struct Bucket {
    capacity: f64,
    per_second: f64,
    /// May go below zero after a request larger than the capacity.
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(capacity: f64, per_second: f64, now: Instant) -> Self {
        Bucket {
            capacity,
            per_second,
            level: capacity,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * self.per_second).min(self.capacity);
        self.at = now;
    }

    /// What one nanosecond refills: shortfalls this small are rounding, not a wait, so
    /// a client that waits exactly the `retry_after` it was given is admitted.
    fn slack(&self) -> f64 {
        self.per_second * 1e-9
    }

    /// How long until `cost` can be taken; zero if it can be now. A cost above the
    /// capacity waits only for a full bucket.
    fn wait_for(&self, cost: f64) -> Duration {
        self.time_to_reach(cost.min(self.capacity))
    }

    fn take(&mut self, cost: f64) {
        self.level -= cost;
    }

    fn time_to_reach(&self, level: f64) -> Duration {
        let shortfall = level - self.level;
        if shortfall <= self.slack() {
            return Duration::ZERO;
        }
        // Float-to-int `as` saturates, so an absurdly slow rate cannot overflow.
        Duration::from_nanos((shortfall / self.per_second * 1e9).round() as u64)
    }

    fn state(&self, limit_per_minute: u64) -> BucketState {
        BucketState {
            limit_per_minute,
            remaining: (self.level + self.slack()).floor().max(0.0) as u64,
            reset: self.time_to_reach(self.capacity),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(limits: AccountLimits) -> Arc<Account> {
        Arc::new(Account::new(limits))
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    async fn advance(by: Duration) {
        tokio::time::advance(by).await;
    }

    #[tokio::test(start_paused = true)]
    async fn rps_admits_a_seconds_worth_then_refuses_with_exact_retry_after() {
        let account = account(AccountLimits {
            rps: Some(5.0),
            ..AccountLimits::default()
        });
        let permits: Vec<_> = (0..5).map(|_| account.admit(1).unwrap()).collect();
        let refused = account.admit(1).unwrap_err();
        assert_eq!(refused.limited_by, LimitedBy::Rps);
        assert_eq!(refused.retry_after, Some(ms(200)));
        advance(ms(199)).await;
        assert_eq!(account.admit(1).unwrap_err().retry_after, Some(ms(1)));
        advance(ms(1)).await;
        assert!(account.admit(1).is_ok());
        drop(permits);
    }

    #[tokio::test(start_paused = true)]
    async fn fractional_rps_below_one_still_admits_one_then_waits_its_period() {
        let account = account(AccountLimits {
            rps: Some(0.5),
            ..AccountLimits::default()
        });
        assert!(account.admit(1).is_ok());
        assert_eq!(account.admit(1).unwrap_err().retry_after, Some(ms(2000)));
        advance(ms(2000)).await;
        assert!(account.admit(1).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn rpm_600_admits_ten_at_once_then_one_per_100ms() {
        let account = account(AccountLimits {
            rpm: Some(600),
            ..AccountLimits::default()
        });
        for _ in 0..10 {
            assert!(account.admit(1).is_ok());
        }
        let refused = account.admit(1).unwrap_err();
        assert_eq!(refused.limited_by, LimitedBy::Rpm);
        assert_eq!(refused.retry_after, Some(ms(100)));
        for _ in 0..20 {
            advance(ms(100)).await;
            assert!(account.admit(1).is_ok());
            assert_eq!(account.admit(1).unwrap_err().retry_after, Some(ms(100)));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn tpm_holds_a_minute_of_tokens_and_refills_continuously() {
        // 6,000 TPM: a bucket of 6,000 refilled at 100 a second.
        let account = account(AccountLimits {
            tpm: Some(6000),
            ..AccountLimits::default()
        });
        assert!(account.admit(4000).is_ok());
        assert!(account.admit(2000).is_ok());
        let refused = account.admit(50).unwrap_err();
        assert_eq!(refused.limited_by, LimitedBy::Tpm);
        assert_eq!(refused.retry_after, Some(ms(500)));
        advance(ms(500)).await;
        assert!(account.admit(50).is_ok());
        assert_eq!(account.admit(1).unwrap_err().retry_after, Some(ms(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_larger_than_the_token_bucket_waits_for_a_full_bucket_and_overdraws_it() {
        // 600 TPM: a bucket of 600 refilled at 10 a second.
        let account = account(AccountLimits {
            tpm: Some(600),
            ..AccountLimits::default()
        });
        assert!(account.admit(100).is_ok());
        let refused = account.admit(1000).unwrap_err();
        assert_eq!(refused.retry_after, Some(ms(10_000)));
        advance(ms(10_000)).await;
        let permit = account.admit(1000).unwrap();
        let tokens = permit.state.tokens.unwrap();
        assert_eq!(tokens.remaining, 0);
        // From -400 to 600 at 10 a second.
        assert_eq!(tokens.reset, ms(100_000));
        // Back above one token after 40.1 s.
        assert_eq!(account.admit(1).unwrap_err().retry_after, Some(ms(40_100)));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_exactly_retry_after_is_always_enough_at_awkward_rates() {
        let cases = [
            (
                AccountLimits {
                    rps: Some(3.0),
                    ..AccountLimits::default()
                },
                1,
            ),
            (
                AccountLimits {
                    rps: Some(7.3),
                    ..AccountLimits::default()
                },
                1,
            ),
            (
                AccountLimits {
                    rpm: Some(7),
                    ..AccountLimits::default()
                },
                1,
            ),
            (
                AccountLimits {
                    rpm: Some(1000),
                    ..AccountLimits::default()
                },
                1,
            ),
            (
                AccountLimits {
                    tpm: Some(7),
                    ..AccountLimits::default()
                },
                3,
            ),
            (
                AccountLimits {
                    tpm: Some(1_000_003),
                    ..AccountLimits::default()
                },
                4_999,
            ),
        ];
        for (limits, tokens) in cases {
            let account = account(limits);
            for round in 0..200 {
                match account.admit(tokens) {
                    Ok(_) => {}
                    Err(refused) => {
                        let wait = refused.retry_after.unwrap();
                        advance(wait).await;
                        assert!(
                            account.admit(tokens).is_ok(),
                            "{limits:?}, round {round}: still refused after {wait:?}"
                        );
                    }
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn max_concurrent_refuses_the_next_and_admits_after_a_permit_drops() {
        let account = account(AccountLimits {
            max_concurrent: Some(2),
            ..AccountLimits::default()
        });
        let a = account.admit(1).unwrap();
        let _b = account.admit(1).unwrap();
        let refused = account.admit(1).unwrap_err();
        assert_eq!(refused.limited_by, LimitedBy::MaxConcurrent);
        assert_eq!(refused.retry_after, None);
        assert_eq!(account.in_flight(), 2);
        drop(a);
        assert_eq!(account.in_flight(), 1);
        assert!(account.admit(1).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn rejected_requests_take_nothing() {
        let account = account(AccountLimits {
            rps: Some(2.0),
            tpm: Some(6000),
            max_concurrent: Some(1),
            ..AccountLimits::default()
        });
        let held = account.admit(1000).unwrap();
        let before = held.state;
        // Refused by concurrency: no request or token is taken.
        let refused = account.admit(1000).unwrap_err();
        assert_eq!(refused.limited_by, LimitedBy::MaxConcurrent);
        assert_eq!(refused.state, before);
        drop(held);
        // Refused by tokens: no request is taken.
        let refused = account.admit(100_000).unwrap_err();
        assert_eq!(refused.limited_by, LimitedBy::Tpm);
        assert_eq!(refused.state, account.state());
        assert_eq!(account.state().requests.unwrap().remaining, 1);
        assert_eq!(account.state().tokens.unwrap().remaining, 5000);
        assert!(account.admit(5000).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_longest_wait_names_the_limit_when_several_refuse() {
        let account = account(AccountLimits {
            rps: Some(10.0),
            rpm: Some(60),
            ..AccountLimits::default()
        });
        assert!(account.admit(1).is_ok());
        let refused = account.admit(1).unwrap_err();
        assert_eq!(refused.limited_by, LimitedBy::Rpm);
        assert_eq!(refused.retry_after, Some(ms(1000)));
    }

    #[tokio::test(start_paused = true)]
    async fn state_reports_limit_remaining_and_time_to_full() {
        let account = account(AccountLimits {
            rpm: Some(600),
            tpm: Some(6000),
            ..AccountLimits::default()
        });
        for _ in 0..2 {
            assert!(account.admit(750).is_ok());
        }
        let permit = account.admit(750).unwrap();
        assert_eq!(
            permit.state,
            AccountState {
                requests: Some(BucketState {
                    limit_per_minute: 600,
                    remaining: 7,
                    reset: ms(300),
                }),
                tokens: Some(BucketState {
                    limit_per_minute: 6000,
                    remaining: 3750,
                    reset: ms(22_500),
                }),
            }
        );
        advance(ms(150)).await;
        let state = account.state();
        assert_eq!(state.requests.unwrap().remaining, 8);
        assert_eq!(state.requests.unwrap().reset, ms(150));
        assert_eq!(state.tokens.unwrap().remaining, 3765);
    }

    #[tokio::test(start_paused = true)]
    async fn with_rps_and_rpm_the_more_restrictive_limit_is_reported() {
        let account = account(AccountLimits {
            rps: Some(5.0),
            rpm: Some(120),
            ..AccountLimits::default()
        });
        let state = account.admit(1).unwrap().state;
        let requests = state.requests.unwrap();
        assert_eq!(requests.limit_per_minute, 120);
        // rps has 4 left, rpm (2 a second) 1.
        assert_eq!(requests.remaining, 1);
        assert_eq!(requests.reset, ms(500));
        assert_eq!(state.tokens, None);
    }

    #[tokio::test(start_paused = true)]
    async fn no_limits_admits_everything_and_still_counts_in_flight() {
        let account = account(AccountLimits::default());
        let permits: Vec<_> = (0..1000).map(|_| account.admit(1 << 40).unwrap()).collect();
        assert_eq!(permits[0].state, AccountState::default());
        assert_eq!(account.in_flight(), 1000);
        drop(permits);
        assert_eq!(account.in_flight(), 0);
    }

    #[test]
    fn rejections_say_which_limit_and_when() {
        let rejection = AccountRejection {
            limited_by: LimitedBy::Tpm,
            retry_after: Some(ms(1500)),
            state: AccountState::default(),
        };
        assert_eq!(
            rejection.to_string(),
            "the account's tpm limit is reached; the request would be admitted in 1.5s"
        );
    }
}
