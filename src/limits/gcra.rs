//! A rate limit as the generic cell rate algorithm (GCRA): one instant, the
//! *theoretical arrival time*, says when the limit has paid off everything admitted so
//! far. A call is admitted once that time has come; admitting `n` units pushes it `n`
//! emission intervals further. With no burst allowance, the units admitted in any
//! window of a minute never exceed the per-minute limit, plus the size of the last
//! call (a call larger than the limit still goes, once the limit is clear, and leaves a
//! debt behind it).
//!
//! Written here rather than taken from `governor`: a token limit must be charged
//! *after* a call, when the provider reports what it really used (estimates corrected
//! up or down, output tokens added), and the rate must change in flight when the
//! provider's headers reveal the account's real limit. `governor` admits or refuses a
//! fixed quota and can do neither; the arithmetic itself is a few lines.

use std::time::Duration;

use tokio::time::Instant;

/// The most debt a limit carries, in nanoseconds: a day. Past that the charges are
/// nonsense, and stacking them would only shut the limit for good.
const MAX_DEBT_NANOS: f64 = 86_400e9;

/// One rate limit's state: `per_minute` units a minute, paced evenly.
#[derive(Debug, Clone)]
pub(crate) struct Gcra {
    per_minute: u64,
    /// Nanoseconds one unit takes to pay off.
    interval_nanos: f64,
    /// When everything admitted so far is paid off. At or before now: clear.
    tat: Instant,
}

impl Gcra {
    /// A clear limit of `per_minute` units a minute (at least 1).
    pub(crate) fn new(per_minute: u64, now: Instant) -> Self {
        let per_minute = per_minute.max(1);
        Gcra {
            per_minute,
            interval_nanos: 60e9 / per_minute as f64,
            tat: now,
        }
    }

    /// When the next call may be admitted: now, if the limit is clear.
    pub(crate) fn ready_at(&self, now: Instant) -> Instant {
        self.tat.max(now)
    }

    /// Admits `units` now: the caller has checked [`Gcra::ready_at`].
    pub(crate) fn admit(&mut self, units: u64, now: Instant) {
        let from = self.tat.max(now);
        self.push(from, self.span(units), now);
    }

    /// Corrects an earlier charge by `delta` units: positive when the call used more
    /// than was charged, negative to give back what it did not use.
    pub(crate) fn correct(&mut self, delta: i64, now: Instant) {
        let span = self.span(delta.unsigned_abs());
        if delta >= 0 {
            let from = self.tat.max(now);
            self.push(from, span, now);
        } else {
            // Never below now: time already passed cannot be given back twice.
            self.tat = self.tat.checked_sub(span).unwrap_or(now).max(now);
        }
    }

    /// Changes the limit, keeping the debt outstanding in units.
    pub(crate) fn set_per_minute(&mut self, per_minute: u64, now: Instant) {
        let per_minute = per_minute.max(1);
        if per_minute == self.per_minute {
            return;
        }
        let debt_units =
            self.tat.saturating_duration_since(now).as_nanos() as f64 / self.interval_nanos;
        self.per_minute = per_minute;
        self.interval_nanos = 60e9 / per_minute as f64;
        self.tat = now + Duration::from_nanos((debt_units * self.interval_nanos) as u64);
    }

    fn span(&self, units: u64) -> Duration {
        let nanos = units as f64 * self.interval_nanos;
        Duration::from_nanos(nanos.min(MAX_DEBT_NANOS) as u64)
    }

    /// Pushes the arrival time `span` further, never more than a day from now.
    fn push(&mut self, from: Instant, span: Duration, now: Instant) {
        let cap = now + Duration::from_nanos(MAX_DEBT_NANOS as u64);
        self.tat = from.checked_add(span).unwrap_or(cap).min(cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn paces_units_evenly() {
        let t0 = Instant::now();
        let mut g = Gcra::new(600, t0); // one every 100 ms
        assert_eq!(g.ready_at(t0), t0);
        g.admit(1, t0);
        assert_eq!(g.ready_at(t0), t0 + Duration::from_millis(100));
        g.admit(3, t0 + Duration::from_millis(100));
        assert_eq!(g.ready_at(t0), t0 + Duration::from_millis(400));
        // Idle time is not saved up: no burst after a quiet spell.
        let later = t0 + Duration::from_secs(10);
        g.admit(1, later);
        assert_eq!(g.ready_at(later), later + Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn corrections_charge_and_refund() {
        let t0 = Instant::now();
        let mut g = Gcra::new(60, t0); // one a second
        g.admit(10, t0);
        g.correct(-4, t0);
        assert_eq!(g.ready_at(t0), t0 + Duration::from_secs(6));
        g.correct(2, t0);
        assert_eq!(g.ready_at(t0), t0 + Duration::from_secs(8));
        g.correct(-100, t0);
        assert_eq!(g.ready_at(t0), t0, "never below now");
    }

    #[tokio::test(start_paused = true)]
    async fn debt_never_passes_a_day() {
        let t0 = Instant::now();
        let mut g = Gcra::new(1, t0);
        for _ in 0..10 {
            g.admit(u64::MAX, t0);
            g.correct(i64::MAX, t0);
        }
        g.set_per_minute(2, t0);
        g.set_per_minute(1, t0);
        assert!(g.ready_at(t0) <= t0 + Duration::from_secs(86_400));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_rate_keeps_the_debt_in_units() {
        let t0 = Instant::now();
        let mut g = Gcra::new(60, t0);
        g.admit(6, t0); // 6 s of debt at 1/s
        g.set_per_minute(120, t0); // 6 units at 2/s: 3 s
        assert_eq!(g.ready_at(t0), t0 + Duration::from_secs(3));
        assert_eq!(g.per_minute, 120);
    }
}
