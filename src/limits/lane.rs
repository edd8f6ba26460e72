//! One provider and model's flow control — a *lane*: the pause gate (`Retry-After`),
//! the rate limits (requests and tokens per minute) and the adaptive concurrency limit,
//! with one FIFO queue in front of all three.
//!
//! A call waits its turn in the queue (a fair mutex: first come, first served), then,
//! at the head, waits for whatever holds it back — a pause, a free slot, the rate —
//! and goes. It never waits past its deadline: a wait whose end is known (a pause, the
//! rate's next opening) and comes after the deadline is refused at once, without
//! waiting and without sending; a wait for a slot ends at the deadline. After the call,
//! its [`LanePermit`] reports what came back ([`Feedback`]): successes let the limit
//! grow, overloads cut it, reported usage corrects the token estimate, and the
//! provider's rate-limit headers tell the account's real limits.
//!
//! State changes are logged once each (`flow.limit`, `flow.pause`, `flow.resume`,
//! `flow.limits_learned`); calls that wait are counted in metrics and in their own
//! outcome, never logged one by one.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::adaptive::{Aimd, Decrease};
use super::flow::{FlowConfig, RateConfig};
use super::gcra::Gcra;
use super::shared::{Granted, Mode, Shared, Wants};
use super::{Limiter, Permit};
use crate::telemetry::metrics;

/// What held a call back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitCause {
    /// The provider asked every caller to wait (`Retry-After`).
    Pause,
    /// Every concurrency slot of the lane was taken.
    Concurrency,
    /// A requests- or tokens-per-minute limit.
    Rate,
}

impl WaitCause {
    /// The stable snake_case name used in outcomes and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            WaitCause::Pause => "pause",
            WaitCause::Concurrency => "concurrency",
            WaitCause::Rate => "rate",
        }
    }
}

impl fmt::Display for WaitCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which queue a call waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// A call's first try: the queue of first tries, served in arrival order.
    First,
    /// A retry: the queue of retries, served before the first tries.
    Retry,
}

/// How a call through the lane ended, as far as flow control cares.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Signal {
    /// The provider answered in this long.
    Success(Duration),
    /// The provider said it is over capacity or over the account's limit (429, 529),
    /// or the call timed out; the reason names which.
    Overload(&'static str),
    /// Anything else: says nothing about capacity.
    Neutral,
}

/// What came back from a call, for the lane to learn from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Feedback {
    /// How it ended.
    pub signal: Signal,
    /// Input tokens the provider reported, to correct the estimate charged.
    pub input_tokens: Option<u64>,
    /// Output tokens the provider reported, charged to the token limits now.
    pub output_tokens: u64,
    /// The account's limits, per minute, as the response's headers stated them.
    pub reported: Option<RateConfig>,
}

impl Feedback {
    /// Feedback with only a signal.
    pub fn signal(signal: Signal) -> Self {
        Feedback {
            signal,
            input_tokens: None,
            output_tokens: 0,
            reported: None,
        }
    }
}

/// A call let through, and how long it waited.
#[derive(Debug)]
pub struct Admitted {
    /// Holds the call's slot; report the result with [`LanePermit::finish`].
    pub permit: LanePermit,
    /// The call's process-wide slot, taken as it was let through.
    pub global: Permit,
    /// From joining the queue to admission.
    pub waited: Duration,
    /// The part of `waited` during which the lane was paused.
    pub paused: Duration,
}

/// A call that could not be let through before its deadline. Nothing was sent.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueTimeout {
    /// What held it back.
    pub cause: WaitCause,
    /// How long it waited before giving up.
    pub waited: Duration,
    /// The part of `waited` during which the lane was paused.
    pub paused: Duration,
    /// What happened, for the outcome.
    pub message: String,
}

/// A lane's state at one moment, for status pages and charts.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LaneSnapshot {
    /// The provider's configured name.
    pub provider: String,
    /// The model.
    pub model: String,
    /// Calls allowed in flight now.
    pub limit: u32,
    /// Calls in flight now.
    pub in_flight: u32,
    /// Calls waiting in the queue.
    pub queued: u32,
    /// While paused: how long until the pause ends.
    #[serde(
        rename = "paused_for_ms",
        serialize_with = "crate::time::as_opt_millis",
        skip_serializing_if = "Option::is_none"
    )]
    pub paused_for: Option<Duration>,
    /// The rate limits in force (configured, or learned from the provider, whichever
    /// is lower).
    pub rates: RateConfig,
}

/// One provider and model's flow control. Share it behind an `Arc`.
pub struct FlowLane {
    provider: String,
    model: String,
    config: FlowConfig,
    /// The FIFO queue: the head holds it while it waits for what holds it back.
    turnstile: tokio::sync::Mutex<()>,
    /// The queue of retries, served before the first tries: a retry has waited its
    /// turn once already, and sending it to the back of a long queue would make its
    /// request wait twice.
    retry_turnstile: tokio::sync::Mutex<()>,
    state: Mutex<State>,
    /// Wakes the head of the first tries' queue when a slot frees, the limit grows,
    /// or the retries' queue empties.
    wake: Notify,
    /// Wakes the head of the retries' queue when a slot frees.
    wake_retry: Notify,
    /// Wakes the lane's sync with the shared limits (`[redis]`), when a call waits
    /// for a lease.
    sync: Notify,
    /// Tells the other instances of a pause (`[redis]`).
    publish_pause: std::sync::OnceLock<Box<dyn Fn(Duration) + Send + Sync>>,
    /// Starts the sync with the shared limits, on the first call (lanes are made
    /// before the runtime that runs the sync may exist).
    sync_start: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    sync_pending: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for FlowLane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowLane")
            .field("provider", &self.provider)
            .field("model", &self.model)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct State {
    aimd: Aimd,
    in_flight: u32,
    queued: u32,
    /// Of `queued`, the retries.
    retries_queued: u32,
    /// The head of a queue waits for something (a pause, a slot, the rate, a
    /// process-wide slot): newcomers queue behind it rather than take what it waits
    /// for.
    head_waiting: bool,
    /// What it waits for is a slot of this lane: the limit is what holds calls back.
    head_waits_for_slot: bool,
    pause: Pause,
    rates: Rates,
    /// What this instance holds of limits shared with others (`[redis]`).
    shared: Option<Shared>,
}

/// What the head of the queue does next.
enum Step {
    /// Let through, as the `level`-th call in flight.
    Admit {
        epoch: u64,
        level: u32,
    },
    WaitUntil(Instant, WaitCause),
    WaitForSlot,
    /// Ready, but every process-wide slot is taken.
    WaitForGlobal,
}

impl FlowLane {
    /// A lane for `provider` / `model` with nothing in flight.
    pub fn new(provider: impl Into<String>, model: impl Into<String>, config: FlowConfig) -> Self {
        let (provider, model) = (provider.into(), model.into());
        let now = Instant::now();
        let aimd = Aimd::new(config.concurrency.clone());
        metrics::concurrency_limit(&provider, &model, aimd.limit());
        FlowLane {
            state: Mutex::new(State {
                aimd,
                in_flight: 0,
                queued: 0,
                retries_queued: 0,
                head_waiting: false,
                head_waits_for_slot: false,
                pause: Pause::default(),
                rates: Rates::new(config.rates, config.learn_limits, now),
                shared: None,
            }),
            provider,
            model,
            config,
            turnstile: tokio::sync::Mutex::new(()),
            retry_turnstile: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            wake_retry: Notify::new(),
            sync: Notify::new(),
            publish_pause: std::sync::OnceLock::new(),
            sync_start: Mutex::new(None),
            sync_pending: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Starts the sync with the shared limits if it waits for a first call.
    fn start_sync(&self) {
        use std::sync::atomic::Ordering;
        if self.sync_pending.load(Ordering::Acquire)
            && tokio::runtime::Handle::try_current().is_ok()
        {
            let start = self
                .sync_start
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(start) = start {
                self.sync_pending.store(false, Ordering::Release);
                start();
            }
        }
    }

    /// Makes the lane keep limits shared with other instances: calls wait for the
    /// first sync (see [`super::shared`]). Done before the lane is shared with any
    /// caller, so that no call goes past the shared limits.
    pub(crate) fn keep_shared(self, local_share: Option<f64>) -> Self {
        self.lock().shared = Some(Shared::new(local_share, Instant::now()));
        self
    }

    /// Connects the lane's shared limits: `publish` tells the others of a pause,
    /// `start` starts the sync (on the lane's first call, in its runtime).
    pub(crate) fn connect_shared(
        &self,
        publish: Box<dyn Fn(Duration) + Send + Sync>,
        start: Box<dyn FnOnce() + Send>,
    ) {
        let _ = self.publish_pause.set(publish);
        *self.sync_start.lock().unwrap_or_else(|e| e.into_inner()) = Some(start);
        self.sync_pending
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Wakes when a call waits for a lease of the shared limits.
    pub(crate) fn sync_wanted(&self) -> &Notify {
        &self.sync
    }

    /// What to ask of the shared limits now; `None` when the lane keeps none.
    pub(crate) fn sync_wants(&self) -> Option<(Wants, bool)> {
        let mut s = self.lock();
        let rates = s.rates.effective();
        let (in_flight, queued) = (s.in_flight, s.queued);
        let cap = self.shared_cap();
        let sh = s.shared.as_mut()?;
        let starved = sh.starved;
        Some((
            sh.wants(&rates, cap, in_flight, queued, Instant::now()),
            starved || queued > 0,
        ))
    }

    /// The cap on calls in flight that instances share: the configured maximum.
    fn shared_cap(&self) -> u32 {
        self.config.concurrency.max
    }

    /// Takes what a sync granted.
    pub(crate) fn sync_granted(&self, wants: &Wants, granted: &Granted) {
        let now = Instant::now();
        let (gained, paused_until) = {
            let mut s = self.lock();
            let was_local = s.shared.as_ref().is_some_and(|sh| sh.mode == Mode::Local);
            if was_local {
                s.rates.set_share(1.0, now);
            }
            let gained = s
                .shared
                .as_mut()
                .is_some_and(|sh| sh.grant(now, wants, granted));
            (gained, s.pause.until.filter(|u| *u > now))
        };
        // The pause in force, read back at every sync: taken when it ends later than
        // this lane's own (by more than a round trip's jitter).
        if let Some(left) = granted
            .pause
            .filter(|p| !p.is_zero())
            .map(|p| p.min(crate::resilience::MAX_PAUSE))
            && paused_until.is_none_or(|u| now + left > u + Duration::from_millis(100))
        {
            self.pause_here(left, "shared");
        }
        // Only a grant that brought something wakes the calls waiting: one that did
        // not would have them ask again at once.
        if gained {
            self.wake.notify_one();
            self.wake_retry.notify_one();
        }
    }

    /// Redis could not be reached: the lane keeps its share of each limit locally.
    pub(crate) fn sync_failed(&self) {
        let now = Instant::now();
        let cap = self.shared_cap();
        {
            let mut s = self.lock();
            let Some(sh) = s.shared.as_mut() else {
                return;
            };
            if sh.mode == Mode::Local {
                return;
            }
            sh.go_local(cap);
            let share = sh.local_share();
            s.rates.set_share(share, now);
        }
        self.wake.notify_one();
        self.wake_retry.notify_one();
    }

    /// The shared part of the lane's state, for the cluster's status.
    pub(crate) fn shared_snapshot(&self) -> Option<(Mode, Option<u32>, u32, f64)> {
        let s = self.lock();
        let sh = s.shared.as_ref()?;
        Some((sh.mode, sh.cap, sh.instances, sh.local_share()))
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
    pub fn config(&self) -> &FlowConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is counters and instants; a panic mid-update loses little.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lane's state now.
    pub fn snapshot(&self) -> LaneSnapshot {
        let now = Instant::now();
        let s = self.lock();
        LaneSnapshot {
            provider: self.provider.clone(),
            model: self.model.clone(),
            limit: s.aimd.limit(),
            in_flight: s.in_flight,
            queued: s.queued,
            paused_for: s
                .pause
                .until
                .filter(|u| *u > now)
                .map(|u| u.duration_since(now)),
            rates: s.rates.effective(),
        }
    }

    /// Lets a call through at once if nothing holds it back and nobody is queued
    /// ahead of it; `estimate` is its input tokens, charged to the token limits. It
    /// also needs a process-wide slot from `global`: `held` may bring one, and holds
    /// the call's slot when it is let through (untouched when it is not).
    pub fn try_admit(
        self: &Arc<Self>,
        estimate: u64,
        global: &dyn Limiter,
        held: &mut Option<Permit>,
    ) -> Option<LanePermit> {
        self.start_sync();
        // The queue may be held by a head that is only being woken, not held back:
        // then a newcomer may go past it, since nothing it waits for is taken. When
        // the head waits for something (a slot, the rate, a pause), newcomers queue:
        // first come, first served.
        let turn = self.turnstile.try_lock().ok();
        let now = Instant::now();
        let mut slot = held.take();
        let step = {
            let mut s = self.lock();
            if turn.is_none() && (s.head_waiting || s.retries_queued > 0) {
                *held = slot;
                return None;
            }
            s.step(self, now, None, estimate, false, global, &mut slot)
        };
        match step {
            Step::Admit { epoch, level } => {
                *held = slot;
                Some(LanePermit::new(self, epoch, level, estimate, now))
            }
            _ => {
                *held = slot;
                None
            }
        }
    }

    /// Waits in the queue until the call may go, or refuses it when that cannot happen
    /// before `deadline`. A [`Turn::Retry`] waits in the retries' queue, served first.
    /// Cancel-safe: dropping the future leaves the queue.
    pub async fn admit(
        self: &Arc<Self>,
        estimate: u64,
        deadline: Instant,
        turn: Turn,
        global: &dyn Limiter,
    ) -> Result<Admitted, QueueTimeout> {
        self.start_sync();
        let retry = turn == Turn::Retry;
        let joined = Instant::now();
        let _queued = Queued::join(self, retry);
        let (turnstile, wake) = if retry {
            (&self.retry_turnstile, &self.wake_retry)
        } else {
            (&self.turnstile, &self.wake)
        };
        let (paused_before, (opens, cause)) = {
            let s = self.lock();
            // What holds every call back, whatever its place in the queue: a call
            // cannot go before the pause ends or the rate next opens.
            let known = match s.pause.until.filter(|u| *u > joined) {
                Some(until) => (until, WaitCause::Pause),
                None => (s.rates.ready_at(joined), WaitCause::Rate),
            };
            (s.pause.total(joined), known)
        };
        if opens >= deadline {
            return Err(self.refuse(Some(cause), joined, paused_before, Some(opens)));
        }
        let turn = tokio::select! {
            biased;
            turn = turnstile.lock() => turn,
            () = tokio::time::sleep_until(deadline) => {
                return Err(self.refuse(None, joined, paused_before, None));
            }
        };
        // The rate's opening the head last slept for: admitted then, however late the
        // timer woke it, so timer lag does not eat into the rate.
        let mut scheduled = None;
        // A process-wide slot, taken once everything else lets the call through.
        let mut slot: Option<Permit> = None;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(self.refuse(None, joined, paused_before, None));
            }
            let step = {
                let mut s = self.lock();
                let step = s.step(self, now, scheduled, estimate, retry, global, &mut slot);
                s.note_head(&step);
                step
            };
            if !matches!(step, Step::Admit { .. }) {
                // Never held while something else holds the call back.
                slot = None;
            }
            match step {
                Step::Admit { epoch, level } => {
                    drop(turn);
                    let waited = now.duration_since(joined);
                    let paused = self.lock().pause.total(now).saturating_sub(paused_before);
                    metrics::queue_wait(&self.provider, &self.model, waited);
                    return Ok(Admitted {
                        permit: LanePermit::new(self, epoch, level, estimate, now),
                        global: slot.expect("a call is let through only with a process-wide slot"),
                        waited,
                        paused,
                    });
                }
                Step::WaitForGlobal => {
                    scheduled = None;
                    tokio::select! {
                        permit = global.acquire() => slot = Some(permit),
                        () = tokio::time::sleep_until(deadline) => {
                            return Err(self.refuse(
                                Some(WaitCause::Concurrency),
                                joined,
                                paused_before,
                                None,
                            ));
                        }
                    }
                }
                Step::WaitUntil(until, cause) if until >= deadline => {
                    return Err(self.refuse(Some(cause), joined, paused_before, Some(until)));
                }
                Step::WaitUntil(until, cause) => {
                    scheduled = (cause == WaitCause::Rate).then_some(until);
                    tokio::select! {
                        () = tokio::time::sleep_until(until) => {}
                        () = wake.notified() => {}
                    }
                }
                Step::WaitForSlot => {
                    scheduled = None;
                    tokio::select! {
                        () = wake.notified() => {}
                        () = tokio::time::sleep_until(deadline) => {
                            return Err(self.refuse(
                                Some(WaitCause::Concurrency),
                                joined,
                                paused_before,
                                None,
                            ));
                        }
                    }
                }
            }
        }
    }

    /// Pauses every caller of the lane for `wait` (a provider's `Retry-After`), or
    /// extends the pause in force to then — with `[redis]`, every instance's callers.
    pub fn pause(&self, wait: Duration, reason: &'static str) {
        self.pause_here(wait, reason);
        if let Some(publish) = self.publish_pause.get() {
            publish(wait);
        }
    }

    /// Pauses this instance's callers of the lane (another instance's pause, told).
    pub(crate) fn pause_here(&self, wait: Duration, reason: &'static str) {
        let now = Instant::now();
        let Some(until) = now.checked_add(wait) else {
            return;
        };
        let mut s = self.lock();
        let previous = s.pause.until.filter(|u| *u > now);
        match previous {
            Some(current) if current >= until => {}
            Some(current) => {
                s.pause.until = Some(until);
                s.pause
                    .schedule(&self.provider, &self.model, until - current);
                tracing::debug!(
                    event = "flow.pause",
                    provider = %self.provider,
                    model = %self.model,
                    pause_ms = crate::time::millis(wait),
                    reason,
                    extended = true,
                    "{}/{} pause extended to {:.3} s from now ({reason})",
                    self.provider,
                    self.model,
                    wait.as_secs_f64()
                );
            }
            None => {
                s.pause.start(now, until);
                s.pause.schedule(&self.provider, &self.model, wait);
                tracing::info!(
                    event = "flow.pause",
                    provider = %self.provider,
                    model = %self.model,
                    pause_ms = crate::time::millis(wait),
                    reason,
                    queued = s.queued,
                    in_flight = s.in_flight,
                    "{}/{} paused for {:.3} s ({reason}): every call to it waits",
                    self.provider,
                    self.model,
                    wait.as_secs_f64()
                );
            }
        }
    }

    /// The refusal of a call that cannot go before its deadline.
    fn refuse(
        &self,
        cause: Option<WaitCause>,
        joined: Instant,
        paused_before: Duration,
        opens: Option<Instant>,
    ) -> QueueTimeout {
        let now = Instant::now();
        let waited = now.duration_since(joined);
        let s = self.lock();
        let paused = s.pause.total(now).saturating_sub(paused_before);
        let limit = s.aimd.limit();
        let rates = s.rates.effective();
        let queued = s.queued.saturating_sub(1);
        // A call still behind others in the queue waits for what holds the head back.
        let cause = cause.unwrap_or_else(|| {
            if s.pause.until.is_some_and(|u| u > now) {
                WaitCause::Pause
            } else if s.in_flight >= limit {
                WaitCause::Concurrency
            } else {
                WaitCause::Rate
            }
        });
        drop(s);
        let lane = format!("{}/{}", self.provider, self.model);
        let opens_in = opens.map(|o| o.saturating_duration_since(now).as_secs_f64());
        let message = match (cause, opens_in) {
            (WaitCause::Pause, Some(secs)) => format!(
                "{lane} is paused for another {secs:.3} s at the provider's request (Retry-After), past the request deadline; not sent"
            ),
            (WaitCause::Rate, Some(secs)) => format!(
                "the rate limit of {lane} ({rates}) lets the next call go in {secs:.3} s, past the request deadline; not sent"
            ),
            (cause, _) => format!(
                "the request deadline passed after {:.3} s queued for {lane} ({}; limit {limit} in flight, {queued} others queued); not sent",
                waited.as_secs_f64(),
                match cause {
                    WaitCause::Pause => "paused at the provider's request",
                    WaitCause::Concurrency => "every concurrency slot taken",
                    WaitCause::Rate => "held by its rate limit",
                },
            ),
        };
        QueueTimeout {
            cause,
            waited,
            paused,
            message,
        }
    }
}

impl State {
    /// What the head of a queue does now; admits it when nothing holds it back.
    /// `scheduled`: the rate's opening it waited for, if it did. `retry`: it heads the
    /// retries' queue (the first tries' head gives way while that queue holds anyone).
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        lane: &FlowLane,
        now: Instant,
        scheduled: Option<Instant>,
        estimate: u64,
        retry: bool,
        global: &dyn Limiter,
        slot: &mut Option<Permit>,
    ) -> Step {
        let step = self.blocked(lane, now, retry, global, slot);
        self.head_waits_for_slot =
            matches!(step, Some(Step::WaitForSlot)) && self.in_flight >= self.aimd.limit();
        if let Some(step) = step {
            return step;
        }
        // Charged from the opening it waited for, when that opening still stands.
        let at = scheduled
            .filter(|s| *s <= now && self.rates.ready_at(*s) <= *s)
            .unwrap_or(now);
        self.rates.admit(estimate, at);
        if let Some(sh) = &mut self.shared {
            sh.spend(estimate, &self.rates.effective());
        }
        self.in_flight += 1;
        self.aimd.on_admit(self.in_flight);
        Step::Admit {
            epoch: self.aimd.epoch(),
            level: self.in_flight,
        }
    }
}

impl State {
    /// Charges the shared limits, when the lane keeps any, what a call really used,
    /// as [`Rates::settle`] does the local ones.
    fn settle_shared(&mut self, estimate: u64, input: Option<u64>, output: u64) {
        if let Some(sh) = &mut self.shared {
            sh.settle(estimate, input, output, &self.rates.effective());
        }
    }

    /// Notes what the head of a queue now waits for, if anything.
    fn note_head(&mut self, step: &Step) {
        self.head_waiting = !matches!(step, Step::Admit { .. });
        self.head_waits_for_slot =
            matches!(step, Step::WaitForSlot) && self.in_flight >= self.aimd.limit();
    }

    /// What holds the head of a queue back, if anything: the pause, its lane's slots
    /// (or, for the first tries' head, retries waiting), the rate, a process-wide
    /// slot — taken here when everything else lets the call through.
    fn blocked(
        &mut self,
        lane: &FlowLane,
        now: Instant,
        retry: bool,
        global: &dyn Limiter,
        slot: &mut Option<Permit>,
    ) -> Option<Step> {
        if let Some(until) = self.pause.until {
            if until > now {
                return Some(Step::WaitUntil(until, WaitCause::Pause));
            }
            let lasted = self.pause.end();
            tracing::info!(
                event = "flow.resume",
                provider = %lane.provider,
                model = %lane.model,
                paused_ms = crate::time::millis(lasted),
                limit = self.aimd.limit(),
                queued = self.queued,
                "{}/{} resumed after a {:.3} s pause",
                lane.provider,
                lane.model,
                lasted.as_secs_f64()
            );
        }
        if self.in_flight >= self.aimd.limit() || (!retry && self.retries_queued > 0) {
            return Some(Step::WaitForSlot);
        }
        let ready = self.rates.ready_at(now);
        if ready > now {
            return Some(Step::WaitUntil(ready, WaitCause::Rate));
        }
        if let Some(sh) = &mut self.shared {
            let rates = self.rates.effective();
            if let Some((at, cause)) = sh.blocks(now, &rates, self.in_flight) {
                if sh.starved {
                    lane.sync.notify_one();
                }
                return Some(match at {
                    Some(at) => Step::WaitUntil(at, cause),
                    None => Step::WaitForSlot,
                });
            }
        }
        // Last, the process-wide slot: taken only when the lane lets the call through,
        // so the lane never counts a call that is still waiting for one.
        if slot.is_none() {
            *slot = global.try_acquire();
            if slot.is_none() {
                return Some(Step::WaitForGlobal);
            }
        }
        None
    }
}

/// Counts a caller in the queue until dropped.
struct Queued<'a> {
    lane: &'a FlowLane,
    retry: bool,
}

impl<'a> Queued<'a> {
    fn join(lane: &'a FlowLane, retry: bool) -> Self {
        let mut s = lane.lock();
        s.queued += 1;
        s.retries_queued += u32::from(retry);
        Queued { lane, retry }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let mut s = self.lane.lock();
        s.queued = s.queued.saturating_sub(1);
        if s.queued == 0 {
            s.head_waiting = false;
            s.head_waits_for_slot = false;
        }
        if self.retry {
            s.retries_queued = s.retries_queued.saturating_sub(1);
            if s.retries_queued == 0 {
                // The first tries' head gave way to the retries; its turn again.
                drop(s);
                self.lane.wake.notify_one();
            }
        }
    }
}

/// A call's place in the lane while it is in flight. Report its result with
/// [`LanePermit::finish`]; dropped unreported (the call was aborted), it only frees the
/// slot.
#[derive(Debug)]
pub struct LanePermit {
    lane: Arc<FlowLane>,
    epoch: u64,
    /// Calls in flight in the lane when it was let through, itself included.
    level: u32,
    estimate: u64,
    admitted: Instant,
    done: bool,
}

impl LanePermit {
    fn new(lane: &Arc<FlowLane>, epoch: u64, level: u32, estimate: u64, admitted: Instant) -> Self {
        LanePermit {
            lane: Arc::clone(lane),
            epoch,
            level,
            estimate,
            admitted,
            done: false,
        }
    }

    /// The lane it belongs to.
    pub fn lane(&self) -> &Arc<FlowLane> {
        &self.lane
    }

    /// When the call was let through.
    pub fn admitted(&self) -> Instant {
        self.admitted
    }

    /// Reports how the call ended and frees its slot.
    pub fn finish(mut self, feedback: Feedback) {
        self.done = true;
        self.release(Some(feedback));
    }

    /// The call was let through but never sent (its breaker refused it, or its
    /// deadline came): frees its slot and gives back what it was charged.
    pub fn unsent(mut self) {
        self.done = true;
        {
            let mut s = self.lane.lock();
            s.rates.refund(self.estimate, Instant::now());
            // Used nothing: what it was charged comes back.
            s.settle_shared(self.estimate, Some(0), 0);
        }
        self.release(None);
    }

    fn release(&self, feedback: Option<Feedback>) {
        let lane = &*self.lane;
        let now = Instant::now();
        let retries_waiting = {
            let mut s = lane.lock();
            s.in_flight = s.in_flight.saturating_sub(1);
            if let Some(feedback) = feedback {
                let before = s.aimd.limit();
                // The limit was what held calls back: every slot was taken, or the
                // queue's head waits for one. (Calls waiting while slots are free wait
                // for something else — a pause, the rate, refusals that keep emptying
                // slots — and more slots would not help.)
                let saturated =
                    s.in_flight + 1 >= before || (s.queued > 0 && s.head_waits_for_slot);
                let decrease = match feedback.signal {
                    Signal::Success(latency) => s
                        .aimd
                        .on_success(self.epoch, self.level, latency, saturated),
                    Signal::Overload(reason) => {
                        metrics::rate_limited(&lane.provider, &lane.model, reason);
                        s.aimd.on_overload(self.epoch, self.level, reason)
                    }
                    Signal::Neutral => None,
                };
                let after = s.aimd.limit();
                if let Some(d) = decrease {
                    log_decrease(lane, d, &s);
                } else if after != before {
                    tracing::debug!(
                        event = "flow.limit",
                        provider = %lane.provider,
                        model = %lane.model,
                        limit = after,
                        previous = before,
                        reason = "success",
                        "{}/{} concurrency limit {before} → {after}",
                        lane.provider,
                        lane.model
                    );
                }
                if after != before {
                    metrics::concurrency_limit(&lane.provider, &lane.model, after);
                }
                s.rates.settle(
                    self.estimate,
                    feedback.input_tokens,
                    feedback.output_tokens,
                    now,
                );
                s.settle_shared(self.estimate, feedback.input_tokens, feedback.output_tokens);
                if let Some(reported) = feedback.reported
                    && s.rates.learn(reported, now)
                {
                    let rates = s.rates.effective();
                    tracing::info!(
                        event = "flow.limits_learned",
                        provider = %lane.provider,
                        model = %lane.model,
                        rpm = rates.rpm,
                        tpm = rates.tpm,
                        input_tpm = rates.input_tpm,
                        output_tpm = rates.output_tpm,
                        "{}/{} rate limits from the provider's headers: {rates}",
                        lane.provider,
                        lane.model
                    );
                }
            }
            s.retries_queued > 0
        };
        if retries_waiting {
            lane.wake_retry.notify_one();
        } else {
            lane.wake.notify_one();
        }
    }
}

impl Drop for LanePermit {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            self.release(None);
        }
    }
}

fn log_decrease(lane: &FlowLane, d: Decrease, s: &State) {
    tracing::info!(
        event = "flow.limit",
        provider = %lane.provider,
        model = %lane.model,
        limit = d.to,
        previous = d.from,
        reason = d.reason,
        in_flight = s.in_flight,
        queued = s.queued,
        "{}/{} concurrency limit {} → {} ({})",
        lane.provider,
        lane.model,
        d.from,
        d.to,
        d.reason
    );
}

/// The pause gate, and how long it has been shut in all (for each call's `pause_ms`).
#[derive(Debug, Default)]
struct Pause {
    until: Option<Instant>,
    started: Option<Instant>,
    /// Time paused by pauses that have ended.
    closed: Duration,
    /// Pause time ever scheduled, for the metric.
    scheduled: Duration,
}

impl Pause {
    fn schedule(&mut self, provider: &str, model: &str, added: Duration) {
        let before = self.scheduled;
        self.scheduled += added;
        metrics::paused(provider, model, before, self.scheduled);
    }

    fn start(&mut self, now: Instant, until: Instant) {
        // A pause that ended unobserved is closed first.
        if self.until.is_some() {
            self.end();
        }
        self.started = Some(now);
        self.until = Some(until);
    }

    /// Ends the pause in force (its time has come); returns how long it lasted.
    fn end(&mut self) -> Duration {
        let lasted = match (self.started.take(), self.until.take()) {
            (Some(started), Some(until)) => until.saturating_duration_since(started),
            _ => Duration::ZERO,
        };
        self.closed += lasted;
        lasted
    }

    /// Time paused in all, up to `now`.
    fn total(&self, now: Instant) -> Duration {
        let current = match (self.started, self.until) {
            (Some(started), Some(until)) => now.min(until).saturating_duration_since(started),
            _ => Duration::ZERO,
        };
        self.closed + current
    }
}

/// The lane's rate limits: configured ones, lowered by what the provider reports.
#[derive(Debug)]
struct Rates {
    configured: RateConfig,
    learned: RateConfig,
    learn: bool,
    /// The part of each limit this instance keeps locally: 1, or its share of limits
    /// shared with other instances while Redis cannot be reached.
    share: f64,
    requests: Option<Gcra>,
    tokens: Option<Gcra>,
    input_tokens: Option<Gcra>,
    output_tokens: Option<Gcra>,
}

impl Rates {
    fn new(configured: RateConfig, learn: bool, now: Instant) -> Self {
        let mut rates = Rates {
            configured,
            learned: RateConfig::default(),
            learn,
            share: 1.0,
            requests: None,
            tokens: None,
            input_tokens: None,
            output_tokens: None,
        };
        rates.apply(now);
        rates
    }

    /// The limits in force: the lower of configured and learned, for each.
    fn effective(&self) -> RateConfig {
        fn lower(a: Option<u64>, b: Option<u64>) -> Option<u64> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
        RateConfig {
            rpm: lower(self.configured.rpm, self.learned.rpm),
            tpm: lower(self.configured.tpm, self.learned.tpm),
            input_tpm: lower(self.configured.input_tpm, self.learned.input_tpm),
            output_tpm: lower(self.configured.output_tpm, self.learned.output_tpm),
        }
    }

    /// Brings each limit's state in line with [`Rates::effective`].
    fn apply(&mut self, now: Instant) {
        let effective = self.effective();
        for (limit, gcra) in [
            (effective.rpm, &mut self.requests),
            (effective.tpm, &mut self.tokens),
            (effective.input_tpm, &mut self.input_tokens),
            (effective.output_tpm, &mut self.output_tokens),
        ] {
            let limit = limit.map(|l| (l as f64 * self.share).ceil() as u64);
            match (limit.filter(|l| *l > 0), gcra.as_mut()) {
                (None, _) => *gcra = None,
                (Some(l), Some(g)) => g.set_per_minute(l, now),
                (Some(l), None) => *gcra = Some(Gcra::new(l, now)),
            }
        }
    }

    /// Keeps `share` of each limit locally (1: all of it).
    fn set_share(&mut self, share: f64, now: Instant) {
        if share != self.share {
            self.share = share;
            self.apply(now);
        }
    }

    /// Takes what the provider reported; true when the limits in force changed.
    fn learn(&mut self, reported: RateConfig, now: Instant) -> bool {
        if !self.learn {
            return false;
        }
        let before = self.effective();
        let merged = RateConfig {
            rpm: reported.rpm.or(self.learned.rpm),
            tpm: reported.tpm.or(self.learned.tpm),
            input_tpm: reported.input_tpm.or(self.learned.input_tpm),
            output_tpm: reported.output_tpm.or(self.learned.output_tpm),
        };
        if merged == self.learned {
            return false;
        }
        self.learned = merged;
        self.apply(now);
        self.effective() != before
    }

    fn ready_at(&self, now: Instant) -> Instant {
        [
            &self.requests,
            &self.tokens,
            &self.input_tokens,
            &self.output_tokens,
        ]
        .into_iter()
        .flatten()
        .map(|g| g.ready_at(now))
        .max()
        .unwrap_or(now)
    }

    fn admit(&mut self, estimate: u64, now: Instant) {
        if let Some(g) = &mut self.requests {
            g.admit(1, now);
        }
        for g in [&mut self.tokens, &mut self.input_tokens]
            .into_iter()
            .flatten()
        {
            g.admit(estimate, now);
        }
    }

    /// Gives back what a call that was never sent was charged.
    fn refund(&mut self, estimate: u64, now: Instant) {
        if let Some(g) = &mut self.requests {
            g.correct(-1, now);
        }
        let estimate = i64::try_from(estimate).unwrap_or(i64::MAX);
        for g in [&mut self.tokens, &mut self.input_tokens]
            .into_iter()
            .flatten()
        {
            g.correct(-estimate, now);
        }
    }

    /// Charges what the call really used: input corrected against the estimate,
    /// output added.
    fn settle(&mut self, estimate: u64, input: Option<u64>, output: u64, now: Instant) {
        if let Some(input) = input {
            let delta = i64::try_from(input)
                .unwrap_or(i64::MAX)
                .saturating_sub(i64::try_from(estimate).unwrap_or(i64::MAX));
            for g in [&mut self.tokens, &mut self.input_tokens]
                .into_iter()
                .flatten()
            {
                g.correct(delta, now);
            }
        }
        if output > 0 {
            let output = i64::try_from(output).unwrap_or(i64::MAX);
            for g in [&mut self.tokens, &mut self.output_tokens]
                .into_iter()
                .flatten()
            {
                g.correct(output, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{AdaptiveConfig, ConcurrencyLimit};

    fn lane(initial: u32) -> Arc<FlowLane> {
        Arc::new(FlowLane::new(
            "p",
            "m",
            FlowConfig {
                concurrency: AdaptiveConfig {
                    initial,
                    latency_factor: None,
                    ..AdaptiveConfig::default()
                },
                ..FlowConfig::default()
            },
        ))
    }

    /// A process-wide limit that never binds.
    fn free() -> ConcurrencyLimit {
        ConcurrencyLimit::new(1000)
    }

    fn take(lane: &Arc<FlowLane>) -> Option<LanePermit> {
        let mut held = None;
        let permit = lane.try_admit(10, &free(), &mut held)?;
        // The test keeps the lane's slot; the process-wide one is not under test.
        drop(held);
        Some(permit)
    }

    fn ok() -> Feedback {
        Feedback::signal(Signal::Success(Duration::from_secs(1)))
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_grows_only_when_every_slot_was_taken() {
        let lane = lane(4);
        let a = take(&lane).unwrap();
        let _b = take(&lane).unwrap();
        a.finish(ok());
        assert_eq!(lane.snapshot().limit, 4, "half the slots were free");
        let full: Vec<_> = (0..3).map(|_| take(&lane).unwrap()).collect();
        assert!(take(&lane).is_none(), "all four taken");
        full.into_iter().next().unwrap().finish(ok());
        assert_eq!(lane.snapshot().limit, 6, "slow start: two more per success");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_caller_and_refuses_those_it_would_outlast() {
        let lane = lane(4);
        lane.pause(Duration::from_secs(5), "rate_limited");
        assert!(take(&lane).is_none());
        let t0 = Instant::now();
        let refused = lane
            .admit(10, t0 + Duration::from_secs(2), Turn::First, &free())
            .await
            .unwrap_err();
        assert_eq!(refused.cause, WaitCause::Pause);
        assert_eq!(t0.elapsed(), Duration::ZERO, "refused at once");
        let admitted = lane
            .admit(10, t0 + Duration::from_secs(60), Turn::First, &free())
            .await
            .unwrap();
        assert_eq!(t0.elapsed(), Duration::from_secs(5));
        assert_eq!(admitted.paused, Duration::from_secs(5));
        assert_eq!(lane.snapshot().paused_for, None);
    }

    #[tokio::test(start_paused = true)]
    async fn callers_are_let_through_in_the_order_they_came_retries_first() {
        let lane = lane(1);
        let first = take(&lane).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for n in 0..5 {
            let (lane, order) = (Arc::clone(&lane), Arc::clone(&order));
            waiters.push(tokio::spawn(async move {
                // The fourth is a retry: it goes first.
                let admitted = lane
                    .admit(
                        1,
                        Instant::now() + Duration::from_secs(60),
                        if n == 3 { Turn::Retry } else { Turn::First },
                        &free(),
                    )
                    .await
                    .unwrap();
                order.lock().unwrap().push(n);
                tokio::time::sleep(Duration::from_millis(10)).await;
                admitted.permit.finish(Feedback::signal(Signal::Neutral));
            }));
            tokio::task::yield_now().await;
        }
        assert_eq!(lane.snapshot().queued, 5);
        first.finish(Feedback::signal(Signal::Neutral));
        for w in waiters {
            w.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [3, 0, 1, 2, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_newcomer_never_takes_the_slot_the_head_waits_for() {
        let lane = lane(1);
        let first = take(&lane).unwrap();
        let head = {
            let lane = Arc::clone(&lane);
            tokio::spawn(async move {
                lane.admit(
                    1,
                    Instant::now() + Duration::from_secs(60),
                    Turn::First,
                    &free(),
                )
                .await
                .map(|a| a.permit)
            })
        };
        tokio::task::yield_now().await;
        first.finish(Feedback::signal(Signal::Neutral));
        // The slot is free, and the head has not run yet: a newcomer still waits.
        assert!(take(&lane).is_none());
        let head = head.await.unwrap().unwrap();
        head.finish(Feedback::signal(Signal::Neutral));
        // With nobody waiting, the newcomer goes at once.
        assert!(take(&lane).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn learned_limits_pace_the_calls_and_never_raise_a_configured_one() {
        let lane = Arc::new(FlowLane::new(
            "p",
            "m",
            FlowConfig {
                rates: RateConfig {
                    rpm: Some(600),
                    ..RateConfig::default()
                },
                ..FlowConfig::default()
            },
        ));
        let p = take(&lane).unwrap();
        p.finish(Feedback {
            reported: Some(RateConfig {
                rpm: Some(6000),
                input_tpm: Some(1000),
                ..RateConfig::default()
            }),
            ..ok()
        });
        let rates = lane.snapshot().rates;
        assert_eq!((rates.rpm, rates.input_tpm), (Some(600), Some(1000)));
        // 600 a minute: the next call goes 100 ms after the first.
        let t0 = Instant::now();
        lane.admit(1, t0 + Duration::from_secs(1), Turn::First, &free())
            .await
            .unwrap();
        assert_eq!(t0.elapsed(), Duration::from_millis(100));
    }
}
