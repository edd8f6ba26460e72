//! A lane's part of limits shared with other instances (`[redis]`): what this instance
//! was granted by the last sync with Redis, spent call by call without a round trip.
//!
//! - **Requests per minute** are leased as *scheduled* units: the shared GCRA hands an
//!   instance `n` units starting at its theoretical arrival time, one every
//!   `60 s / rpm`, and the instance sends each no earlier than its time. Instances
//!   together therefore send at the shared rate, evenly paced, never in bursts. A unit
//!   not used within the lease horizon of its time is lost (a lease may go unused; it
//!   is never banked).
//! - **Tokens per minute** (total, input, output) are leased as allowances that a call
//!   may overdraw (its size is known only after it); the debt is paid from the next
//!   lease, as the local GCRA does.
//! - **Calls in flight**: the instance holds a part of the cap (`max_concurrency`,
//!   shared), renewed with every sync and gone within the lease if it is not — a
//!   crashed instance's part comes back by itself. Parts are shared fairly among the
//!   instances that want them (water-filling).
//! - While Redis cannot be reached, the lane runs on its own at its *local share* of
//!   every shared limit, and returns to the shared limits at the next sync that works.

use std::time::Duration;

use tokio::time::Instant;

use super::flow::RateConfig;
use super::lane::WaitCause;

/// How long the units of one lease reach ahead, and so the longest another instance
/// may wait behind this one's unused units.
pub(crate) const HORIZON: Duration = Duration::from_millis(250);

/// Whose limits the lane keeps now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// No sync yet: calls wait for the first one (a round trip, or the Redis timeout).
    Starting,
    /// The shared limits, as leased.
    Shared,
    /// Redis cannot be reached: this instance's share, kept locally.
    Local,
}

/// What the lane holds of the shared limits.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) mode: Mode,
    /// Requests leased and not yet sent, and when the next one may go.
    req_left: u64,
    req_next: Instant,
    req_interval: Duration,
    /// Token allowances left (total, input, output); negative is a debt.
    tokens: [i64; 3],
    /// The granted part of the calls-in-flight cap; `None` while not capped.
    pub(crate) cap: Option<u32>,
    /// When the shared rate has more to lease, if the last sync found it dry.
    retry_at: Option<Instant>,
    /// A sync that brought nothing new is not asked again before this: a waiting
    /// call must not turn the sync into a loop.
    quiet_until: Instant,
    /// A call waits for a lease: sync now.
    pub(crate) starved: bool,
    /// Calls admitted since the last sync (the demand the next lease is sized on).
    admitted: u64,
    /// Instances seen at the last sync (this one included).
    pub(crate) instances: u32,
    /// This instance's share while Redis is unreachable, if configured.
    local_share: Option<f64>,
}

/// What a lane asks of the shared limits at a sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Wants {
    /// The shared limits per minute (0: none): requests, tokens, input, output.
    pub(crate) limits: [u64; 4],
    /// Units wanted of each.
    pub(crate) units: [u64; 4],
    /// The shared cap on calls in flight (0: none).
    pub(crate) cap: u32,
    /// Calls in flight wanted: in flight now plus queued.
    pub(crate) cap_wanted: u32,
    /// Calls in flight now.
    pub(crate) in_flight: u32,
}

/// What a sync brought back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Granted {
    pub(crate) instances: u32,
    /// Units granted of each rate, and when the first of them is due (from now; for
    /// a rate granted nothing, when it has more).
    pub(crate) units: [u64; 4],
    pub(crate) starts: [Duration; 4],
    /// Calls in flight this instance may have.
    pub(crate) cap: u32,
    /// The provider-wide pause in force, if any: how long it still lasts.
    pub(crate) pause: Option<Duration>,
}

impl Shared {
    pub(crate) fn new(local_share: Option<f64>, now: Instant) -> Shared {
        Shared {
            mode: Mode::Starting,
            req_left: 0,
            req_next: now,
            req_interval: Duration::ZERO,
            tokens: [0; 3],
            cap: None,
            retry_at: None,
            quiet_until: now,
            starved: false,
            admitted: 0,
            instances: 1,
            local_share,
        }
    }

    /// This instance's share while on its own: configured, or one over the instances
    /// last seen.
    pub(crate) fn local_share(&self) -> f64 {
        self.local_share
            .unwrap_or_else(|| 1.0 / f64::from(self.instances.max(1)))
    }

    /// What holds a call back, if the shared limits do (`rates`: the limits in force):
    /// when it may look again (`None`: when a slot frees), and why.
    pub(crate) fn blocks(
        &mut self,
        now: Instant,
        rates: &RateConfig,
        in_flight: u32,
    ) -> Option<(Option<Instant>, WaitCause)> {
        if self.mode == Mode::Starting {
            self.ask(now);
            return Some((Some(now + Duration::from_millis(5)), WaitCause::Rate));
        }
        if self.cap.is_some_and(|cap| in_flight >= cap) {
            if self.mode == Mode::Shared {
                self.ask(now);
            }
            return Some((None, WaitCause::Concurrency));
        }
        // On its own, the lane's local limits (at its share) are all there is.
        if self.mode == Mode::Local {
            return None;
        }
        if rates.rpm.is_some_and(|r| r > 0) {
            self.drop_stale(now);
            if self.req_left == 0 {
                return Some((Some(self.wait_for_lease(now)), WaitCause::Rate));
            }
            if self.req_next > now {
                return Some((Some(self.req_next), WaitCause::Rate));
            }
        }
        let limited = [rates.tpm, rates.input_tpm, rates.output_tpm];
        if self
            .tokens
            .iter()
            .zip(limited)
            .any(|(left, limit)| limit.is_some_and(|l| l > 0) && *left <= 0)
        {
            return Some((Some(self.wait_for_lease(now)), WaitCause::Rate));
        }
        None
    }

    /// A call needs a lease it does not have: asks for a sync, and says when to look
    /// again — when the shared rate has more, if the last sync said, else soon.
    fn wait_for_lease(&mut self, now: Instant) -> Instant {
        self.ask(now);
        self.retry_at.filter(|r| *r > now).unwrap_or(now + POLL)
    }

    /// A call waits for the shared limits: the sync should run now, unless the last
    /// one said there is nothing more yet.
    fn ask(&mut self, now: Instant) {
        if now >= self.quiet_until {
            self.starved = true;
        }
    }

    /// Drops leased requests whose time passed more than a horizon ago: unused, they
    /// are not banked.
    fn drop_stale(&mut self, now: Instant) {
        if self.req_left == 0 || self.req_next + HORIZON >= now || self.req_interval.is_zero() {
            return;
        }
        let late = now - HORIZON - self.req_next;
        let skipped = (late.as_nanos() / self.req_interval.as_nanos().max(1)) as u64 + 1;
        let skipped = skipped.min(self.req_left);
        self.req_left -= skipped;
        self.req_next += self.req_interval * u32::try_from(skipped).unwrap_or(u32::MAX);
    }

    /// Spends what an admitted call takes.
    pub(crate) fn spend(&mut self, estimate: u64, rates: &RateConfig) {
        if self.mode != Mode::Shared {
            return;
        }
        self.admitted += 1;
        if rates.rpm.is_some_and(|r| r > 0) && self.req_left > 0 {
            self.req_left -= 1;
            self.req_next += self.req_interval;
        }
        let estimate = i64::try_from(estimate).unwrap_or(i64::MAX);
        self.charge(rates, [estimate, estimate, 0]);
    }

    /// Charges what a call really used: input corrected against the `estimate`
    /// spent (when reported), output added.
    pub(crate) fn settle(
        &mut self,
        estimate: u64,
        input: Option<u64>,
        output: u64,
        rates: &RateConfig,
    ) {
        if self.mode != Mode::Shared {
            return;
        }
        let input_delta = input.map_or(0, |input| {
            i64::try_from(input)
                .unwrap_or(i64::MAX)
                .saturating_sub(i64::try_from(estimate).unwrap_or(i64::MAX))
        });
        let output = i64::try_from(output).unwrap_or(i64::MAX);
        self.charge(
            rates,
            [input_delta.saturating_add(output), input_delta, output],
        );
    }

    /// Takes `units` from the token allowances of the limits in force (tokens, input,
    /// output); a limit not in force keeps no count, so none is owed when it appears.
    fn charge(&mut self, rates: &RateConfig, units: [i64; 3]) {
        let limits = [rates.tpm, rates.input_tpm, rates.output_tpm];
        for ((left, limit), n) in self.tokens.iter_mut().zip(limits).zip(units) {
            if limit.is_some_and(|l| l > 0) {
                *left = left.saturating_sub(n);
            } else {
                *left = 0;
            }
        }
    }

    /// What to ask for at a sync.
    pub(crate) fn wants(
        &mut self,
        rates: &RateConfig,
        cap: u32,
        in_flight: u32,
        queued: u32,
        now: Instant,
    ) -> Wants {
        self.drop_stale(now);
        let limits =
            [rates.rpm, rates.tpm, rates.input_tpm, rates.output_tpm].map(|l| l.unwrap_or(0));
        let per_horizon = |limit: u64| {
            (limit as f64 * HORIZON.as_secs_f64() / 60.0)
                .ceil()
                .max(1.0) as u64
        };
        // Idle (nothing admitted since the last sync, nothing queued, nobody waiting),
        // the lane leases nothing: a lease it would not use is rate the others lose.
        let demand = self.admitted + u64::from(queued);
        let idle = demand == 0 && !self.starved;
        let demand = demand.max(1);
        self.admitted = 0;
        let mut units = [0; 4];
        if limits[0] > 0 && !idle {
            units[0] = demand
                .min(per_horizon(limits[0]))
                .saturating_sub(self.req_left);
        }
        for k in 0..3 {
            if limits[k + 1] > 0 && !idle {
                let batch = per_horizon(limits[k + 1]);
                let left = self.tokens[k];
                if left < i64::try_from(batch / 2).unwrap_or(i64::MAX) {
                    units[k + 1] = batch + left.min(0).unsigned_abs();
                }
            }
        }
        Wants {
            limits,
            units,
            cap,
            // A little more than in use, so that a step up in load does not wait a
            // round trip for each call.
            cap_wanted: {
                let used = in_flight.saturating_add(queued);
                used.saturating_add((used / 4).max(1)).min(cap.max(1))
            },
            in_flight,
        }
    }

    /// Takes a sync's grant: the lane is on the shared limits. Returns whether it
    /// brought anything a waiting call can use.
    pub(crate) fn grant(&mut self, now: Instant, wants: &Wants, granted: &Granted) -> bool {
        self.drop_stale(now);
        // What a sync says of time is bounded, whatever is in Redis.
        let start = |d: Duration| now + d.min(MAX_START);
        let mut gained = self.mode != Mode::Shared;
        self.mode = Mode::Shared;
        self.instances = granted.instances.max(1);
        self.starved = false;
        let mut retry_at: Option<Instant> = None;
        if wants.limits[0] > 0 {
            self.req_interval = Duration::from_secs_f64(60.0 / wants.limits[0] as f64);
            if granted.units[0] > 0 {
                // Units still held run first; the new ones follow them.
                if self.req_left == 0 {
                    self.req_next = start(granted.starts[0]);
                }
                self.req_left += granted.units[0];
                gained = true;
            } else if self.req_left == 0 {
                retry_at = Some(start(granted.starts[0].max(POLL)));
            }
        }
        for k in 0..3 {
            let units = i64::try_from(granted.units[k + 1]).unwrap_or(i64::MAX);
            if units > 0 {
                self.tokens[k] = self.tokens[k].saturating_add(units);
                gained = true;
            } else if wants.limits[k + 1] > 0 && wants.units[k + 1] > 0 {
                let at = start(granted.starts[k + 1].max(POLL));
                retry_at = Some(retry_at.map_or(at, |r| r.max(at)));
            }
        }
        let cap = (wants.cap > 0).then_some(granted.cap);
        if cap.unwrap_or(0) > self.cap.unwrap_or(0) {
            gained = true;
        }
        self.cap = cap;
        self.retry_at = retry_at;
        self.quiet_until = if gained {
            now
        } else {
            retry_at.unwrap_or(now + POLL).max(now + POLL)
        };
        gained
    }

    /// Redis could not be reached: the lane keeps its share of the limits locally.
    /// Leased units are dropped (they may be stale by the time Redis returns).
    pub(crate) fn go_local(&mut self, cap: u32) {
        self.mode = Mode::Local;
        self.req_left = 0;
        self.tokens = [0; 3];
        self.retry_at = None;
        self.starved = false;
        let share = self.local_share();
        self.cap = (cap > 0).then(|| ((f64::from(cap) * share).floor() as u32).max(1));
    }
}

/// How soon a starved call looks again when no sync says when.
const POLL: Duration = Duration::from_millis(20);
/// The furthest ahead a sync may schedule a lease: far past the horizon is a value
/// in Redis that is not this version's.
const MAX_START: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    fn rates(rpm: u64) -> RateConfig {
        RateConfig {
            rpm: Some(rpm),
            ..RateConfig::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn leased_requests_go_at_their_scheduled_times_and_stale_ones_are_dropped() {
        let now = Instant::now();
        let mut shared = Shared::new(None, now);
        let r = rates(600); // one every 100 ms
        assert!(
            shared.blocks(now, &r, 0).is_some(),
            "no lease before the first sync"
        );
        let wants = shared.wants(&r, 0, 0, 5, now);
        assert_eq!(wants.units[0], 3, "5 wanted, 3 fit in 250 ms at 10/s");
        let granted = Granted {
            instances: 2,
            units: [3, 0, 0, 0],
            starts: [
                Duration::from_millis(50),
                Duration::ZERO,
                Duration::ZERO,
                Duration::ZERO,
            ],
            cap: 0,
            pause: None,
        };
        shared.grant(now, &wants, &granted);
        let (at, _) = shared.blocks(now, &r, 0).unwrap();
        assert_eq!(at, Some(now + Duration::from_millis(50)));
        let t1 = now + Duration::from_millis(50);
        assert!(shared.blocks(t1, &r, 0).is_none());
        shared.spend(10, &r);
        let (at, _) = shared.blocks(t1, &r, 0).unwrap();
        assert_eq!(at, Some(t1 + Duration::from_millis(100)));
        // Long unused: the two left are past their time by more than a horizon.
        let late = t1 + Duration::from_secs(2);
        assert!(shared.blocks(late, &r, 0).is_some());
        assert_eq!(shared.req_left, 0);
        assert!(shared.starved);
    }

    #[test]
    fn an_idle_lane_leases_nothing_and_a_waiting_call_makes_it_ask() {
        let now = Instant::now();
        let mut shared = Shared::new(None, now);
        let r = RateConfig {
            rpm: Some(60),
            tpm: Some(6_000),
            ..RateConfig::default()
        };
        assert_eq!(shared.wants(&r, 8, 0, 0, now).units, [0; 4], "idle");
        shared.mode = Mode::Shared;
        assert!(shared.blocks(now, &r, 0).is_some());
        assert!(shared.starved);
        let wants = shared.wants(&r, 8, 0, 0, now);
        assert_eq!(wants.units[0], 1, "a call waits: one request");
        assert_eq!(wants.units[1], 25, "and a quarter second of tokens");
    }

    #[test]
    fn the_local_share_is_configured_or_one_over_the_instances_seen() {
        let now = Instant::now();
        let mut shared = Shared::new(None, now);
        shared.instances = 3;
        shared.go_local(30);
        assert_eq!(shared.cap, Some(10));
        let mut fixed = Shared::new(Some(0.5), now);
        fixed.instances = 3;
        fixed.go_local(30);
        assert_eq!(fixed.cap, Some(15));
        assert!(fixed.blocks(now, &rates(60), 15).is_some());
        assert!(
            fixed.blocks(now, &rates(60), 14).is_none(),
            "local rates are the GCRA's"
        );
    }

    #[test]
    fn tokens_may_be_overdrawn_and_the_debt_is_asked_for() {
        let now = Instant::now();
        let mut shared = Shared::new(None, now);
        let r = RateConfig {
            tpm: Some(60_000),
            ..RateConfig::default()
        };
        let wants = shared.wants(&r, 0, 0, 1, now);
        assert_eq!(wants.units[1], 250);
        let granted = Granted {
            instances: 1,
            units: [0, 250, 0, 0],
            starts: [Duration::ZERO; 4],
            cap: 0,
            pause: None,
        };
        shared.grant(now, &wants, &granted);
        assert!(shared.blocks(now, &r, 0).is_none());
        shared.spend(1_000, &r);
        assert!(shared.blocks(now, &r, 0).is_some(), "750 in debt");
        assert_eq!(shared.wants(&r, 0, 0, 1, now).units[1], 250 + 750);
        // Reported at 200 tokens used, 100 output: the estimate's 1,000 come back
        // but for 200, and 100 more are owed.
        shared.settle(1_000, Some(200), 100, &r);
        assert_eq!(shared.tokens[0], -750 + 800 - 100);
    }
}
