//! The adaptive concurrency limit of one provider and model: how many calls it may
//! have in flight, found by watching what comes back.
//!
//! The algorithm is AIMD (additive increase, multiplicative decrease), shaped the way
//! TCP CUBIC shapes a congestion window, because an LLM provider's overload signals are
//! explicit losses (429, 529, timeouts), not queueing delay:
//!
//! - **slow start**: until the first overload, each success that found the limit full
//!   raises it by two — it triples every round trip;
//! - **decrease**: an overload multiplies it by `decrease_ratio` (0.9), once per round
//!   trip — calls admitted under the old, higher limit can neither cut it again nor
//!   raise it; an overload at the same ceiling as the last one (the probe went one
//!   step too far) takes it back one step only;
//! - **recovery**: after a decrease the limit climbs back by one per success to just
//!   under the level where the overload happened (`w_max`);
//! - **probe**: above that it creeps up by `probe / limit` per success. An overload at
//!   the same level halves the probe (down to 1/8), so against a fixed capacity it
//!   touches the ceiling rarely and sits just under it; passing the old level without
//!   an overload doubles the probe, so when capacity grows the limit follows quickly.
//!   An overload below `w_max` means capacity shrank: `w_max` is lowered too (CUBIC's
//!   fast convergence).
//!
//! Latency is a secondary signal: when the short-term average latency of successes
//! rises past `latency_factor` times the long-term one (and by 50 ms at least, so that
//! scheduling noise on millisecond calls does not count), that counts as an overload
//! (once), and the long-term average is reset to the new level.
//!
//! Why not a gradient (Netflix's Gradient2, Envoy's adaptive concurrency filter)? They
//! steer by round-trip time against a minimum, which suits services whose latency is
//! mostly queueing. An LLM call's latency is mostly generation, varying fourfold with
//! the reply's length and not with load, while overload is announced outright.

use std::time::Duration;

/// Bounds and tuning of an adaptive limit.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveConfig {
    /// False holds the limit at `max` (a fixed limit per provider and model).
    pub enabled: bool,
    /// The limit to start from.
    pub initial: u32,
    /// The limit never goes below this.
    pub min: u32,
    /// The limit never goes above this.
    pub max: u32,
    /// What an overload multiplies the limit by (between 0 and 1).
    pub decrease_ratio: f64,
    /// A short-term latency this many times the long-term one counts as an overload;
    /// `None` ignores latency.
    pub latency_factor: Option<f64>,
}

impl Default for AdaptiveConfig {
    /// Adaptive, from 64 between 1 and 1024, ×0.9 on overload, latency above 2× its
    /// baseline counts as overload.
    fn default() -> Self {
        AdaptiveConfig {
            enabled: true,
            initial: 64,
            min: 1,
            max: 1024,
            decrease_ratio: 0.9,
            latency_factor: Some(2.0),
        }
    }
}

/// Smallest probe gain: against a fixed ceiling, one probe past it per ~8 × limit
/// calls (two refusals each).
const MIN_PROBE: f64 = 0.125;
/// Refusals in a row, with no success between, that make a storm whatever the level:
/// a provider refusing a fifth of calls at random does that once in 15,000 answers.
const STORM: u32 = 6;
/// Weight of a new answer in the share of refusals (~20 answers).
const REFUSED_WEIGHT: f64 = 0.05;
/// Weight of a new sample in the short-term latency average (~20 calls).
const SHORT_WEIGHT: f64 = 0.1;
/// Weight of a new sample in the long-term latency average (~200 calls).
const LONG_WEIGHT: f64 = 0.005;
/// The least rise of the short-term latency, in seconds, that may count as overload:
/// at a few milliseconds, doubling is scheduling noise, not a provider's queue.
const LATENCY_MIN_RISE: f64 = 0.05;
/// Successes needed before latency may judge.
const LATENCY_WARMUP: u64 = 50;

/// A decrease of the limit, to log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Decrease {
    pub from: u32,
    pub to: u32,
    pub reason: &'static str,
}

/// The limit's state.
#[derive(Debug, Clone)]
pub(crate) struct Aimd {
    config: AdaptiveConfig,
    limit: f64,
    slow_start: bool,
    /// The limit at which the last overload happened.
    w_max: f64,
    /// Growth per success above `w_max - 1`, divided by the limit.
    probe: f64,
    /// Bumped on every decrease; calls carry the epoch they were admitted in.
    epoch: u64,
    /// The most calls in flight at which a call was recently let through and
    /// succeeded — over the last one to two limits' worth of successes, kept as two
    /// rotating maxima: overloads at or below it are noise, not capacity.
    proven: u32,
    proven_previous: u32,
    /// Successes counted into `proven` since it last rotated.
    proven_count: u32,
    /// Calls let through above `proven`, and how many of them were refused, since it
    /// last changed.
    above_admitted: u32,
    above_refused: u32,
    /// The share of recent answers that were overloads (a moving average over about
    /// twenty): when most answers are refusals, they are not noise, whatever the level.
    refused_share: f64,
    /// Overloads since the last success.
    refused_in_a_row: u32,
    short: f64,
    long: f64,
    samples: u64,
}

impl Aimd {
    pub(crate) fn new(config: AdaptiveConfig) -> Self {
        let max = config.max.max(1);
        let min = config.min.clamp(1, max);
        let initial = if config.enabled {
            config.initial.clamp(min, max)
        } else {
            max
        };
        Aimd {
            config: AdaptiveConfig { min, max, ..config },
            limit: f64::from(initial),
            slow_start: true,
            w_max: 0.0,
            probe: 1.0,
            epoch: 0,
            proven: 0,
            proven_previous: 0,
            proven_count: 0,
            above_admitted: 0,
            above_refused: 0,
            refused_share: 0.0,
            refused_in_a_row: 0,
            short: 0.0,
            long: 0.0,
            samples: 0,
        }
    }

    /// A call is let through as the `level`-th in flight.
    pub(crate) fn on_admit(&mut self, level: u32) {
        if level > self.proven() {
            self.above_admitted += 1;
        }
    }

    /// The level at which calls recently succeeded.
    fn proven(&self) -> u32 {
        self.proven.max(self.proven_previous)
    }

    /// Calls allowed in flight now.
    pub(crate) fn limit(&self) -> u32 {
        (self.limit.floor() as u32).clamp(self.config.min, self.config.max)
    }

    /// The current epoch, to stamp on an admitted call.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// A call admitted in `epoch` as the `level`-th in flight succeeded after
    /// `latency`. `saturated`: the limit was in use (calls waiting, or every slot
    /// taken), so it may grow.
    pub(crate) fn on_success(
        &mut self,
        epoch: u64,
        level: u32,
        latency: Duration,
        saturated: bool,
    ) -> Option<Decrease> {
        if !self.config.enabled {
            return None;
        }
        self.refused_share *= 1.0 - REFUSED_WEIGHT;
        self.refused_in_a_row = 0;
        let before = self.proven();
        self.proven = self.proven.max(level);
        self.proven_count += 1;
        // About a round trip's worth of successes: as many as were in flight.
        if self.proven_count >= level.max(8) {
            self.proven_previous = std::mem::take(&mut self.proven);
            self.proven_count = 0;
        }
        if self.proven() != before {
            (self.above_admitted, self.above_refused) = (0, 0);
        }
        if let Some(decrease) = self.track_latency(epoch, latency.as_secs_f64()) {
            return Some(decrease);
        }
        // Only calls admitted under the current limit say whether it may grow: those
        // from before a decrease ran under the limit that was too high.
        if !saturated || epoch < self.epoch {
            return None;
        }
        if self.slow_start {
            // Two more per success: the limit triples each round trip until the
            // provider first pushes back, so a cold start opens up in a few seconds.
            self.limit += 2.0;
        } else if self.limit < self.w_max - 1.0 {
            self.limit += 1.0;
        } else {
            self.limit += self.probe / self.limit;
            if self.limit > self.w_max + 1.0 {
                // Past the old ceiling without an overload: capacity has grown.
                self.w_max = self.limit.floor();
                self.probe = (self.probe * 2.0).min(self.limit);
            }
        }
        self.limit = self.limit.min(f64::from(self.config.max));
        None
    }

    /// A call admitted in `epoch` as the `level`-th in flight was told the provider
    /// is over capacity (or timed out).
    ///
    /// Only an overload *above* the level at which calls recently succeeded says the
    /// limit is too high: a provider that turns away calls at a level it has just
    /// served is refusing at random (or for its rate, which the pause and the rate
    /// limits handle), and cutting concurrency for that would grind the limit down to
    /// its minimum for nothing. (When capacity really shrinks, calls stop succeeding at
    /// the higher levels, and within a limit or two of successes the proven level
    /// falls and overloads rise above it.) Above it, the first overload is a warning and the second (with no success above the proven
    /// level between them) the ceiling: a full provider refuses every call past its
    /// capacity, a random refusal rarely strikes twice in a row.
    pub(crate) fn on_overload(
        &mut self,
        epoch: u64,
        level: u32,
        reason: &'static str,
    ) -> Option<Decrease> {
        if !self.config.enabled {
            return None;
        }
        self.refused_share += REFUSED_WEIGHT * (1.0 - self.refused_share);
        self.refused_in_a_row += 1;
        // A call from before the last cut ran under the higher limit: it neither cuts
        // again nor spends the evidence gathered since.
        if epoch < self.epoch {
            return None;
        }
        if self.refused_share >= 0.5 || self.refused_in_a_row >= STORM {
            // Most answers are refusals: a slot freed by a refusal is refilled at once
            // and refused again. Whatever the proven level says, the limit is too high.
            (self.above_admitted, self.above_refused) = (0, 0);
            self.refused_in_a_row = 0;
            return self.decrease(epoch, reason);
        }
        if level <= self.proven() {
            return None;
        }
        self.above_refused += 1;
        if self.above_refused < 2 || self.above_refused * 2 < self.above_admitted {
            return None;
        }
        (self.above_admitted, self.above_refused) = (0, 0);
        self.decrease(epoch, reason)
    }

    /// Cuts the limit, once per epoch.
    fn decrease(&mut self, epoch: u64, reason: &'static str) -> Option<Decrease> {
        if epoch < self.epoch {
            return None;
        }
        let from = self.limit;
        let decreased = from * self.config.decrease_ratio;
        self.limit = if self.slow_start {
            self.slow_start = false;
            self.w_max = from;
            self.probe = 1.0;
            decreased
        } else if from.floor() < self.w_max.floor() {
            // Below the last ceiling: capacity shrank, so lower the target too.
            self.w_max = from * (1.0 + self.config.decrease_ratio) / 2.0;
            self.probe = 1.0;
            decreased
        } else {
            // The same ceiling as last time: the probe went one step too far, so step
            // back one and probe more gently.
            self.w_max = from;
            self.probe = (self.probe / 2.0).max(MIN_PROBE);
            decreased.max(from - 1.0)
        }
        .max(f64::from(self.config.min));
        self.epoch += 1;
        Some(Decrease {
            from: (from.floor() as u32).clamp(self.config.min, self.config.max),
            to: self.limit(),
            reason,
        })
    }

    fn track_latency(&mut self, epoch: u64, secs: f64) -> Option<Decrease> {
        let factor = self.config.latency_factor?;
        self.samples += 1;
        if self.samples == 1 {
            self.short = secs;
            self.long = secs;
            return None;
        }
        self.short += SHORT_WEIGHT * (secs - self.short);
        self.long += LONG_WEIGHT * (secs - self.long);
        if self.samples >= LATENCY_WARMUP
            && epoch >= self.epoch
            && self.short > factor * self.long
            && self.short - self.long >= LATENCY_MIN_RISE
        {
            // One decrease per shift: the new level becomes the baseline.
            self.long = self.short;
            return self.decrease(epoch, "latency");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Duration = Duration::from_millis(1000);

    fn aimd(initial: u32) -> Aimd {
        Aimd::new(AdaptiveConfig {
            initial,
            latency_factor: None,
            ..AdaptiveConfig::default()
        })
    }

    /// A server that takes `cap` calls at once and answers in 0.5–2 s, refusing at
    /// once past its cap; callers always have more to send.
    struct Upstream {
        now: f64,
        /// (finish time, epoch, level) of calls in progress.
        running: Vec<(f64, u64, u32)>,
        seed: u64,
        admitted: u64,
        overloads: u64,
        busy: f64,
    }

    impl Upstream {
        fn new() -> Self {
            Upstream {
                now: 0.0,
                running: Vec::new(),
                seed: 7,
                admitted: 0,
                overloads: 0,
                busy: 0.0,
            }
        }

        fn unit(&mut self) -> f64 {
            self.seed = self.seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            (self.seed >> 11) as f64 / (1u64 << 53) as f64
        }

        fn latency(&mut self) -> f64 {
            0.5 + 1.5 * self.unit()
        }

        /// Whether this call is refused at random (`rate` of all calls).
        fn noise(&mut self, rate: f64) -> bool {
            rate > 0.0 && self.unit() < rate
        }

        /// Runs `secs` of simulated time in 10 ms steps; `noise` of the calls are
        /// refused at random whatever the load.
        fn run(&mut self, a: &mut Aimd, cap: usize, secs: f64) {
            self.run_noisy(a, cap, secs, 0.0);
        }

        fn run_noisy(&mut self, a: &mut Aimd, cap: usize, secs: f64, noise: f64) {
            let end = self.now + secs;
            while self.now < end {
                self.now += 0.01;
                let now = self.now;
                let (done, running): (Vec<_>, Vec<_>) =
                    self.running.iter().partition(|(t, _, _)| *t <= now);
                self.running = running;
                for (_, epoch, level) in done {
                    a.on_success(epoch, level, L, true);
                }
                // Refused calls come back after a backoff; a few new ones a step.
                let mut tries = 0;
                while self.running.len() < a.limit() as usize && tries < 20 {
                    tries += 1;
                    self.admitted += 1;
                    let level = self.running.len() as u32 + 1;
                    a.on_admit(level);
                    if self.running.len() >= cap || self.noise(noise) {
                        self.overloads += 1;
                        a.on_overload(a.epoch(), level, "overloaded");
                        continue;
                    }
                    let finish = now + self.latency();
                    self.running.push((finish, a.epoch(), level));
                }
                self.busy += self.running.len().min(cap) as f64 * 0.01;
            }
        }

        fn measure(&mut self, a: &mut Aimd, cap: usize, secs: f64) -> (f64, f64) {
            (self.admitted, self.overloads, self.busy) = (0, 0, 0.0);
            self.run(a, cap, secs);
            (
                self.busy / (secs * cap as f64),
                self.overloads as f64 / self.admitted as f64,
            )
        }
    }

    #[test]
    fn slow_start_triples_until_the_first_overload() {
        let mut a = aimd(4);
        for _ in 0..4 {
            a.on_success(0, 4, L, true);
        }
        assert_eq!(a.limit(), 12);
        for _ in 0..12 {
            a.on_success(0, 12, L, true);
        }
        assert_eq!(a.limit(), 36);
    }

    #[test]
    fn one_decrease_per_epoch_and_no_growth_from_before_it() {
        let mut a = aimd(40);
        let e = a.epoch();
        a.on_admit(41);
        a.on_admit(41);
        assert_eq!(a.on_overload(e, 41, "overloaded"), None, "a warning");
        assert_eq!(
            a.on_overload(e, 41, "overloaded"),
            Some(Decrease {
                from: 40,
                to: 36,
                reason: "overloaded"
            })
        );
        for _ in 0..3 {
            a.on_admit(41);
            a.on_overload(e, 41, "overloaded");
        }
        assert_eq!(a.limit(), 36, "same epoch");
        a.on_success(e, 30, L, true);
        assert_eq!(a.limit(), 36, "a call from before the decrease");
        a.on_success(a.epoch(), 30, L, true);
        assert_eq!(a.limit(), 37);
    }

    #[test]
    fn settles_just_under_a_fixed_ceiling_with_rare_overloads() {
        let mut a = aimd(16);
        let mut up = Upstream::new();
        up.run(&mut a, 40, 10.0);
        let (used, overloads) = up.measure(&mut a, 40, 120.0);
        assert!(used > 0.97, "used {used:.3} of the ceiling");
        assert!(overloads < 0.01, "overloads {overloads:.4} of calls");
    }

    #[test]
    fn follows_the_ceiling_down_and_back_up() {
        let mut a = aimd(16);
        let mut up = Upstream::new();
        up.run(&mut a, 40, 10.0);
        up.run(&mut a, 20, 10.0);
        let (used, overloads) = up.measure(&mut a, 20, 30.0);
        assert!(
            (19..=22).contains(&a.limit()) && used > 0.95 && overloads < 0.02,
            "limit {} used {used:.3} overloads {overloads:.4}",
            a.limit()
        );
        up.run(&mut a, 40, 45.0);
        let (used, _) = up.measure(&mut a, 40, 30.0);
        assert!(
            a.limit() >= 39 && used > 0.95,
            "back up to {} (used {used:.3})",
            a.limit()
        );
    }

    #[test]
    fn random_refusals_at_served_levels_do_not_grind_the_limit_down() {
        let mut a = aimd(32);
        let mut up = Upstream::new();
        // A fifth of the calls refused at random, whatever the load; capacity ample.
        up.run_noisy(&mut a, 1000, 60.0, 0.2);
        assert!(a.limit() >= 64, "limit {}", a.limit());
        // With a real ceiling as well, it still finds the ceiling.
        up.run_noisy(&mut a, 40, 30.0, 0.2);
        let limit = a.limit();
        assert!((40..=44).contains(&limit), "limit {limit}");
    }

    #[test]
    fn a_storm_of_refusals_cuts_the_limit_whatever_the_level() {
        let mut a = aimd(45);
        // Calls once succeeded at 45 in flight; now the provider takes only 40.
        for _ in 0..45 {
            a.on_admit(45);
            a.on_success(0, 45, L, false);
        }
        let mut cut = None;
        for n in 0..40 {
            let e = a.epoch();
            a.on_admit(45);
            if let Some(d) = a.on_overload(e, 45, "overloaded") {
                cut = Some((n, d.to));
                break;
            }
        }
        let (n, to) = cut.expect("the storm cut the limit");
        assert_eq!(n + 1, STORM as usize, "six refusals in a row");
        assert!(to < 45, "cut to {to}");
    }

    #[test]
    fn grows_only_when_used_and_stays_in_bounds() {
        let mut a = Aimd::new(AdaptiveConfig {
            initial: 4,
            min: 2,
            max: 6,
            latency_factor: None,
            ..AdaptiveConfig::default()
        });
        a.on_success(0, 1, L, false);
        assert_eq!(a.limit(), 4, "not saturated: no growth");
        for _ in 0..10 {
            a.on_success(0, 1, L, true);
        }
        assert_eq!(a.limit(), 6);
        for _ in 0..20 {
            let e = a.epoch();
            for _ in 0..3 {
                a.on_admit(7);
                a.on_overload(e, 7, "overloaded");
            }
        }
        assert_eq!(a.limit(), 2);
    }

    #[test]
    fn a_fixed_limit_never_moves() {
        let mut a = Aimd::new(AdaptiveConfig {
            enabled: false,
            max: 8,
            ..AdaptiveConfig::default()
        });
        assert_eq!(a.limit(), 8);
        assert_eq!(a.on_overload(0, 9, "overloaded"), None);
        a.on_success(0, 8, L, true);
        assert_eq!(a.limit(), 8);
    }

    /// The first calls of a run come back shortest first: a baseline taken from them
    /// must not make the longer ones look like a provider's queue.
    #[test]
    fn the_first_calls_back_shortest_first_are_not_a_latency_rise() {
        let mut a = Aimd::new(AdaptiveConfig {
            initial: 600,
            ..AdaptiveConfig::default()
        });
        // 600 calls sent at once, latencies spread evenly over 0.5–2 s, answered in
        // order of latency.
        for n in 0..600u64 {
            let latency = Duration::from_micros(500_000 + n * 2_500);
            assert_eq!(a.on_success(a.epoch(), 1, latency, false), None, "call {n}");
        }
    }

    #[test]
    fn millisecond_jitter_is_not_a_latency_rise() {
        let mut a = Aimd::new(AdaptiveConfig::default());
        for n in 0..1000u64 {
            let jitter = Duration::from_micros(50 + 400 * (n % 7 == 0) as u64 * 10);
            assert_eq!(a.on_success(a.epoch(), 1, jitter, false), None);
        }
    }

    #[test]
    fn latency_far_above_its_baseline_counts_once() {
        let mut a = Aimd::new(AdaptiveConfig {
            initial: 32,
            ..AdaptiveConfig::default()
        });
        for _ in 0..100 {
            assert_eq!(a.on_success(a.epoch(), 1, L, false), None);
        }
        let mut decreases = 0;
        for _ in 0..100 {
            if a.on_success(a.epoch(), 1, L * 4, false).is_some() {
                decreases += 1;
            }
        }
        assert_eq!(decreases, 1);
        assert_eq!(a.limit(), 28);
    }
}
