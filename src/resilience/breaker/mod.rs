//! A circuit breaker per provider and model, shared by every agent and request that
//! calls it (DESIGN.md invariant 7).
//!
//! closed → open when, over a sliding window once `minimum_calls` calls in it have
//! finished, the failure rate reaches `failure_rate_threshold` or the slow-call rate
//! reaches `slow_call_rate`; open fails fast without calling the provider; after
//! `open_for` the next call finds it half-open and is let through as a probe, with at
//! most `half_open_probes` probes; when that many probes succeed it closes, and a failed
//! probe opens it again. The window keeps calls in the order they started (see
//! `window.rs` for why). What counts as a failure is the caller's verdict
//! ([`CallResult`]): the resilience layer counts only signs of ill health, never 429s
//! or 529s. [`CircuitBreaker::open_until`] opens it from outside.
//!
//! Written here rather than taken from a crate: the ones on crates.io (failsafe,
//! circuitbreaker-rs) lack slow-call rates, externally forced opening, or tokio's
//! clock, which the deterministic tests need. Every method holds a short
//! `std::sync::Mutex` and never awaits.

mod window;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::time::millis;
use window::{Counts, Settled, Ticket};

/// How the breaker's window is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The last N calls.
    Count(u32),
    /// The calls of the last period, in one-second buckets.
    Time(Duration),
}

/// A breaker's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// False turns breakers off: every call goes through.
    pub enabled: bool,
    /// The sliding window the rates are taken over.
    pub window: Window,
    /// Open when at least this fraction of the window's calls failed (0–1).
    pub failure_rate_threshold: f64,
    /// A call taking at least this long is slow.
    pub slow_call_threshold: Duration,
    /// Open when at least this fraction of the window's calls were slow (0–1).
    pub slow_call_rate: f64,
    /// No verdict on fewer calls than this.
    pub minimum_calls: u32,
    /// How long to stay open before letting probes through.
    pub open_for: Duration,
    /// Probes let through when half-open; that many successes close the breaker.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    /// A window of the last 100 calls; open at a 50 % failure rate over at least 20
    /// calls, or when every call takes 60 s or more; stay open 30 s; close after 3
    /// successful probes. (A smaller window trips by chance: at a steady 20 %
    /// transient failure rate, 10 failures in 20 calls happen one time in 400.)
    fn default() -> Self {
        BreakerConfig {
            enabled: true,
            window: Window::Count(100),
            failure_rate_threshold: 0.5,
            slow_call_threshold: Duration::from_secs(60),
            slow_call_rate: 1.0,
            minimum_calls: 20,
            open_for: Duration::from_secs(30),
            half_open_probes: 3,
        }
    }
}

/// The three states of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls go through; outcomes are counted.
    Closed,
    /// Calls fail fast until the cool-down ends.
    Open,
    /// A few probes go through; the rest fail fast.
    HalfOpen,
}

impl BreakerState {
    /// The stable snake_case name used in output and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// 0 closed, 1 half-open, 2 open: the encoding of a state gauge.
    pub fn code(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A breaker's state at one moment, for status pages and the CLI.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakerSnapshot {
    /// The provider's configured name.
    pub provider: String,
    /// The model.
    pub model: String,
    /// The current state.
    pub state: BreakerState,
    /// Calls in the window (closed state).
    pub calls: u32,
    /// Failed fraction of the window's calls.
    pub failure_rate: f64,
    /// Slow fraction of the window's calls.
    pub slow_call_rate: f64,
    /// While open: how long until probes are let through.
    #[serde(
        rename = "half_open_in_ms",
        serialize_with = "crate::time::as_opt_millis",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry_in: Option<Duration>,
}

/// How a call through the breaker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallResult {
    /// The provider answered.
    Success,
    /// The provider answered that the request was wrong (400, 401, 404, …): an answer
    /// while closed, but no proof of health while half-open, where it counts for
    /// nothing.
    RequestError,
    /// A failure that says the provider is unwell.
    Failure,
    /// Neither: the call was cut short for reasons of its own (the request's deadline),
    /// or the provider only asked for less traffic (429, 529).
    Ignored,
}

/// Why a call was refused without reaching the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    /// The state that refused it.
    pub state: BreakerState,
    /// How long until the breaker lets a probe through (zero when half-open and
    /// waiting for probes in flight).
    pub retry_in: Duration,
}

/// One provider and model's circuit breaker.
#[derive(Debug)]
pub struct CircuitBreaker {
    provider: String,
    model: String,
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// Bumped on every transition, so a call admitted under an earlier state cannot
    /// sway the current one.
    generation: u64,
    window: Counts,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { admitted: u32, succeeded: u32 },
}

/// A transition to log once the lock is released.
struct Transition {
    to: BreakerState,
    reason: &'static str,
    calls: u32,
    failure_rate: f64,
    slow_call_rate: f64,
    open_for: Option<Duration>,
}

impl CircuitBreaker {
    /// A closed breaker for `provider` / `model`.
    pub fn new(
        provider: impl Into<String>,
        model: impl Into<String>,
        config: BreakerConfig,
    ) -> Self {
        let window = Counts::new(config.window);
        let (provider, model) = (provider.into(), model.into());
        let closed = BreakerState::Closed;
        crate::telemetry::metrics::breaker(
            &provider,
            &model,
            closed.code(),
            closed.as_str(),
            false,
        );
        CircuitBreaker {
            provider,
            model,
            config,
            inner: Mutex::new(Inner {
                state: State::Closed,
                generation: 0,
                window,
            }),
        }
    }

    /// The provider's configured name.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// The model.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The settings.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the counts inconsistent in a way
        // that matters more than losing the breaker, so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks to make a call. The permit must be given the call's result with
    /// [`BreakerPermit::record`]; a permit dropped unrecorded counts as nothing.
    pub fn acquire(self: &Arc<Self>) -> Result<BreakerPermit, Rejected> {
        if !self.config.enabled {
            return Ok(BreakerPermit::none());
        }
        let now = Instant::now();
        let mut transition = None;
        let result = {
            let mut inner = self.lock();
            let mut ticket = None;
            match inner.state {
                State::Closed => {
                    ticket = Some(inner.window.start(now));
                    Ok(false)
                }
                State::Open { until } if now < until => Err(Rejected {
                    state: BreakerState::Open,
                    retry_in: until - now,
                }),
                State::Open { .. } => {
                    inner.set(State::HalfOpen {
                        admitted: 1,
                        succeeded: 0,
                    });
                    transition =
                        Some(inner.transition(BreakerState::HalfOpen, "cool_down_over", None));
                    Ok(true)
                }
                State::HalfOpen {
                    admitted,
                    succeeded,
                } if admitted < self.config.half_open_probes => {
                    inner.state = State::HalfOpen {
                        admitted: admitted + 1,
                        succeeded,
                    };
                    Ok(true)
                }
                State::HalfOpen { .. } => Err(Rejected {
                    state: BreakerState::HalfOpen,
                    retry_in: Duration::ZERO,
                }),
            }
            .map(|probe| BreakerPermit {
                breaker: Some(Arc::clone(self)),
                generation: inner.generation,
                probe,
                ticket,
                started: now,
                recorded: false,
            })
        };
        self.log(transition);
        result
    }

    /// The refusal an open breaker would give a call now, without taking anything:
    /// `None` unless it is open and its cool-down still runs. A cheap check before a
    /// call queues for its turn.
    pub fn rejects_now(&self) -> Option<Rejected> {
        if !self.config.enabled {
            return None;
        }
        let now = Instant::now();
        match self.lock().state {
            State::Open { until } if now < until => Some(Rejected {
                state: BreakerState::Open,
                retry_in: until - now,
            }),
            _ => None,
        }
    }

    /// Opens the breaker until `until` (or keeps it open that long, if it would close
    /// sooner), held to [`MAX_RETRY_AFTER`](crate::provider::retry_after::MAX_RETRY_AFTER)
    /// from now: no one's say-so shuts a provider out for longer.
    pub fn open_until(&self, until: Instant, reason: &'static str) {
        if !self.config.enabled {
            return;
        }
        let until = until.min(crate::time::later(
            Instant::now(),
            crate::provider::retry_after::MAX_RETRY_AFTER,
        ));
        let transition = {
            let mut inner = self.lock();
            match inner.state {
                State::Open { until: current } if current >= until => None,
                _ => {
                    inner.set(State::Open { until });
                    Some(inner.transition(
                        BreakerState::Open,
                        reason,
                        Some(until.saturating_duration_since(Instant::now())),
                    ))
                }
            }
        };
        self.log(transition);
    }

    /// The breaker's state now. An open breaker whose cool-down has ended reads as
    /// half-open: the next call will be a probe.
    pub fn snapshot(&self) -> BreakerSnapshot {
        let now = Instant::now();
        let inner = self.lock();
        let (state, retry_in) = match inner.state {
            State::Closed => (BreakerState::Closed, None),
            State::Open { until } if now < until => (BreakerState::Open, Some(until - now)),
            State::Open { .. } | State::HalfOpen { .. } => (BreakerState::HalfOpen, None),
        };
        let rates = inner.window.rates(now);
        BreakerSnapshot {
            provider: self.provider.clone(),
            model: self.model.clone(),
            state,
            calls: rates.finished,
            failure_rate: rates.failure_rate,
            slow_call_rate: rates.slow_call_rate,
            retry_in,
        }
    }

    /// The current state (see [`CircuitBreaker::snapshot`]).
    pub fn state(&self) -> BreakerState {
        self.snapshot().state
    }

    fn record(&self, permit: &BreakerPermit, result: CallResult) {
        let now = Instant::now();
        let slow = now.saturating_duration_since(permit.started) >= self.config.slow_call_threshold;
        let transition = {
            let mut inner = self.lock();
            if inner.generation != permit.generation {
                return; // admitted under an earlier state
            }
            match (inner.state, result) {
                (State::Open { .. }, _) => None,
                (State::Closed, result) => {
                    let Some(ticket) = permit.ticket else {
                        return;
                    };
                    inner.window.settle(
                        ticket,
                        match result {
                            CallResult::Ignored => Settled::Ignored,
                            result => Settled::Done {
                                failed: result == CallResult::Failure,
                                slow,
                            },
                        },
                    );
                    if result == CallResult::Ignored {
                        return;
                    }
                    let rates = inner.window.rates(now);
                    let (calls, failure_rate, slow_rate) =
                        (rates.finished, rates.failure_rate, rates.slow_call_rate);
                    let reason = if calls < self.config.minimum_calls {
                        None
                    } else if failure_rate >= self.config.failure_rate_threshold {
                        Some("failure_rate")
                    } else if slow_rate >= self.config.slow_call_rate {
                        Some("slow_call_rate")
                    } else {
                        None
                    };
                    reason.map(|reason| {
                        inner.set(State::Open {
                            until: crate::time::later(now, self.config.open_for),
                        });
                        // Report the rates that tripped it, before the reset.
                        Transition {
                            to: BreakerState::Open,
                            reason,
                            calls,
                            failure_rate,
                            slow_call_rate: slow_rate,
                            open_for: Some(self.config.open_for),
                        }
                    })
                }
                (
                    State::HalfOpen {
                        admitted,
                        succeeded,
                    },
                    CallResult::Ignored | CallResult::RequestError,
                ) => {
                    inner.state = State::HalfOpen {
                        admitted: admitted.saturating_sub(1),
                        succeeded,
                    };
                    None
                }
                (State::HalfOpen { .. }, CallResult::Failure) => {
                    Some(self.reopen(&mut inner, now, "probe_failed"))
                }
                (State::HalfOpen { .. }, CallResult::Success) if slow => {
                    Some(self.reopen(&mut inner, now, "probe_slow"))
                }
                (
                    State::HalfOpen {
                        admitted,
                        succeeded,
                    },
                    CallResult::Success,
                ) => {
                    let succeeded = succeeded + 1;
                    if succeeded >= self.config.half_open_probes {
                        inner.set(State::Closed);
                        Some(inner.transition(BreakerState::Closed, "probes_succeeded", None))
                    } else {
                        inner.state = State::HalfOpen {
                            admitted,
                            succeeded,
                        };
                        None
                    }
                }
            }
        };
        self.log(transition);
    }

    fn reopen(&self, inner: &mut Inner, now: Instant, reason: &'static str) -> Transition {
        inner.set(State::Open {
            until: crate::time::later(now, self.config.open_for),
        });
        inner.transition(BreakerState::Open, reason, Some(self.config.open_for))
    }

    fn log(&self, transition: Option<Transition>) {
        let Some(t) = transition else { return };
        crate::telemetry::metrics::breaker(
            &self.provider,
            &self.model,
            t.to.code(),
            t.to.as_str(),
            true,
        );
        let (event, verb) = match t.to {
            BreakerState::Open => ("breaker.open", "opened"),
            BreakerState::HalfOpen => ("breaker.half_open", "half-opened"),
            BreakerState::Closed => ("breaker.closed", "closed"),
        };
        tracing::warn!(
            event,
            provider = %self.provider,
            model = %self.model,
            state = t.to.as_str(),
            reason = t.reason,
            calls = t.calls,
            failure_rate = t.failure_rate,
            slow_call_rate = t.slow_call_rate,
            open_ms = t.open_for.map(millis),
            "circuit for {}/{} {verb} ({})", self.provider, self.model, t.reason
        );
    }
}

impl Inner {
    /// Moves to `state`, starting a new generation and an empty window.
    fn set(&mut self, state: State) {
        self.state = state;
        self.generation += 1;
        self.window.clear();
    }

    fn transition(
        &self,
        to: BreakerState,
        reason: &'static str,
        open_for: Option<Duration>,
    ) -> Transition {
        Transition {
            to,
            reason,
            calls: 0,
            failure_rate: 0.0,
            slow_call_rate: 0.0,
            open_for,
        }
    }
}

/// Leave to make one call. Record its result; dropping it unrecorded (the call was
/// aborted) frees a half-open probe slot and counts as nothing.
#[derive(Debug)]
pub struct BreakerPermit {
    breaker: Option<Arc<CircuitBreaker>>,
    generation: u64,
    probe: bool,
    /// Its place in the closed breaker's window.
    ticket: Option<Ticket>,
    started: Instant,
    recorded: bool,
}

impl BreakerPermit {
    /// A permit from no breaker (breakers off, or none configured).
    pub fn none() -> Self {
        BreakerPermit {
            breaker: None,
            generation: 0,
            probe: false,
            ticket: None,
            started: Instant::now(),
            recorded: true,
        }
    }

    /// True when this call is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Reports how the call ended. Its duration (for the slow-call rate) runs from
    /// when the permit was granted.
    pub fn record(mut self, result: CallResult) {
        self.recorded = true;
        if let Some(breaker) = &self.breaker {
            breaker.record(&self, result);
        }
    }
}

impl Drop for BreakerPermit {
    fn drop(&mut self) {
        if !self.recorded
            && let Some(breaker) = self.breaker.take()
        {
            self.recorded = true;
            breaker.record(self, CallResult::Ignored);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(window: Window) -> Arc<CircuitBreaker> {
        Arc::new(CircuitBreaker::new(
            "p",
            "m",
            BreakerConfig {
                window,
                minimum_calls: 4,
                failure_rate_threshold: 0.5,
                open_for: Duration::from_secs(10),
                half_open_probes: 2,
                ..BreakerConfig::default()
            },
        ))
    }

    fn call(b: &Arc<CircuitBreaker>, result: CallResult) {
        b.acquire().expect("admitted").record(result);
    }

    #[tokio::test(start_paused = true)]
    async fn count_window_slides() {
        let b = breaker(Window::Count(4));
        call(&b, CallResult::Failure);
        for _ in 0..6 {
            call(&b, CallResult::Success);
        }
        // The failure slid out: 0 of the last 4 failed.
        let s = b.snapshot();
        assert_eq!((s.calls, s.failure_rate), (4, 0.0));
        call(&b, CallResult::Failure);
        assert_eq!(b.state(), BreakerState::Closed, "1 of 4 is under 50%");
        call(&b, CallResult::Failure);
        assert_eq!(b.state(), BreakerState::Open, "2 of 4 is 50%");
    }

    #[tokio::test(start_paused = true)]
    async fn time_window_forgets_old_seconds() {
        let b = breaker(Window::Time(Duration::from_secs(5)));
        call(&b, CallResult::Failure);
        call(&b, CallResult::Failure);
        call(&b, CallResult::Failure);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(b.snapshot().calls, 0, "the failures slid out of the window");
        for _ in 0..3 {
            call(&b, CallResult::Success);
        }
        call(&b, CallResult::Failure);
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "1 of 4 in the window failed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ignored_calls_and_dropped_permits_count_for_nothing() {
        let b = breaker(Window::Count(10));
        for _ in 0..10 {
            call(&b, CallResult::Ignored);
            drop(b.acquire().unwrap());
        }
        assert_eq!(b.snapshot().calls, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_calls_open_it() {
        let b = Arc::new(CircuitBreaker::new(
            "p",
            "m",
            BreakerConfig {
                minimum_calls: 2,
                slow_call_threshold: Duration::from_secs(1),
                slow_call_rate: 1.0,
                ..BreakerConfig::default()
            },
        ));
        for _ in 0..2 {
            let permit = b.acquire().unwrap();
            tokio::time::advance(Duration::from_secs(2)).await;
            permit.record(CallResult::Success);
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_frees_its_slot() {
        let b = breaker(Window::Count(4));
        b.open_until(Instant::now() + Duration::from_secs(1), "test");
        tokio::time::advance(Duration::from_secs(1)).await;
        let first = b.acquire().unwrap();
        let second = b.acquire().unwrap();
        assert!(first.is_probe() && second.is_probe());
        assert_eq!(b.acquire().unwrap_err().state, BreakerState::HalfOpen);
        drop(first);
        let third = b.acquire().expect("the dropped probe's slot is free again");
        third.record(CallResult::Success);
        second.record(CallResult::Success);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn the_requests_own_errors_are_no_proof_of_health_when_half_open() {
        let b = breaker(Window::Count(4));
        b.open_until(Instant::now() + Duration::from_secs(1), "test");
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..5 {
            b.acquire().unwrap().record(CallResult::RequestError);
        }
        assert_eq!(b.state(), BreakerState::HalfOpen, "400s closed nothing");
        b.acquire().unwrap().record(CallResult::Success);
        b.acquire().unwrap().record(CallResult::Success);
        assert_eq!(b.state(), BreakerState::Closed);
        // Closed, they are answers: they count as calls that did not fail.
        for _ in 0..4 {
            b.acquire().unwrap().record(CallResult::RequestError);
        }
        let s = b.snapshot();
        assert_eq!((s.calls, s.failure_rate), (4, 0.0));
    }

    #[tokio::test(start_paused = true)]
    async fn calls_from_before_a_transition_do_not_count() {
        let b = breaker(Window::Count(4));
        let old = b.acquire().unwrap();
        b.open_until(Instant::now() + Duration::from_secs(1), "test");
        tokio::time::advance(Duration::from_secs(1)).await;
        let probe = b.acquire().unwrap();
        old.record(CallResult::Failure);
        assert_eq!(
            b.state(),
            BreakerState::HalfOpen,
            "the stale failure is ignored"
        );
        probe.record(CallResult::Success);
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_breaker_admits_everything() {
        let b = Arc::new(CircuitBreaker::new(
            "p",
            "m",
            BreakerConfig {
                enabled: false,
                minimum_calls: 1,
                ..BreakerConfig::default()
            },
        ));
        for _ in 0..5 {
            call(&b, CallResult::Failure);
        }
        b.open_until(Instant::now() + Duration::from_secs(60), "test");
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
