//! The one resilience policy every agent call goes through (the original report's
//! `@resilient_call`): for each attempt, a concurrency slot, the provider's circuit
//! breaker, the call under the attempt timeout and the request deadline; then
//! classification, and a retry after backoff or the server's `Retry-After`, paid for
//! from the process-wide retry budget. Fallbacks are applied above this, by the
//! executor, with a second call through the same policy.
//!
//! It wraps any [`Provider`] and knows no wire format. It is the only retry layer:
//! providers never retry on their own.

mod backoff;
mod breaker;
mod budget;
mod classify;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::Serialize;
use tokio::time::Instant;
use tracing::Instrument;

use crate::executor::{FailureKind, OutcomeError, Progress, as_millis, millis};
use crate::limits::{Limiter, Permit};
use crate::provider::{Completion, CompletionRequest, ErrorKind, Provider, ProviderError};

pub use backoff::{Jitter, RetryPolicy};
pub use breaker::{
    BreakerConfig, BreakerPermit, BreakerSnapshot, BreakerState, CallResult, CircuitBreaker,
    Rejected, Window,
};
pub use budget::{RetryBudget, RetryBudgetConfig};
pub use classify::{counts_against_provider, is_retryable, kind_is_retryable};

/// The per-agent part of the policy: how to retry, and how long one attempt may take.
#[derive(Debug, Clone, PartialEq)]
pub struct CallPolicy {
    /// When and how often to retry.
    pub retry: RetryPolicy,
    /// The longest one attempt may take; `None` leaves only the request deadline.
    pub attempt_timeout: Option<Duration>,
}

/// One attempt's limit, unless configured.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for CallPolicy {
    /// [`RetryPolicy::default`] and a 30 s attempt timeout.
    fn default() -> Self {
        CallPolicy {
            retry: RetryPolicy::default(),
            attempt_timeout: Some(DEFAULT_ATTEMPT_TIMEOUT),
        }
    }
}

impl CallPolicy {
    /// A policy that tries once: no retries.
    pub fn once() -> Self {
        CallPolicy {
            retry: RetryPolicy {
                max_attempts: 1,
                ..RetryPolicy::default()
            },
            ..CallPolicy::default()
        }
    }
}

/// Why a retry waited as long as it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DelaySource {
    /// The policy's backoff and jitter.
    Backoff,
    /// The server's `Retry-After` (clamped to `retry_after_max`).
    RetryAfter,
}

impl DelaySource {
    /// The stable snake_case name used in output and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DelaySource::Backoff => "backoff",
            DelaySource::RetryAfter => "retry_after",
        }
    }
}

/// One retry: which attempt failed, how, and how long the call waited before the next.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryRecord {
    /// The attempt that failed (1 for the first try).
    pub attempt: u32,
    /// How it failed.
    pub error: ErrorKind,
    /// Its HTTP status, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The wait before the next attempt.
    #[serde(rename = "delay_ms", serialize_with = "as_millis")]
    pub delay: Duration,
    /// Where the wait came from.
    pub source: DelaySource,
}

/// The state the policy shares across every request of a process: the retry budget,
/// the circuit breakers (one per provider and model) and the jitter's random source.
#[derive(Debug)]
pub struct Resilience {
    budget: RetryBudget,
    breaker_config: BreakerConfig,
    breakers: Mutex<BTreeMap<(String, String), Arc<CircuitBreaker>>>,
    rng: Mutex<SmallRng>,
}

impl Default for Resilience {
    fn default() -> Self {
        Resilience::new(RetryBudgetConfig::default(), BreakerConfig::default(), None)
    }
}

impl Resilience {
    /// Shared state with this budget and breaker config. `seed` makes jitter
    /// repeatable; `None` seeds from the operating system.
    pub fn new(budget: RetryBudgetConfig, breaker: BreakerConfig, seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(seed) => SmallRng::seed_from_u64(seed),
            None => SmallRng::from_os_rng(),
        };
        Resilience {
            budget: RetryBudget::new(budget),
            breaker_config: breaker,
            breakers: Mutex::new(BTreeMap::new()),
            rng: Mutex::new(rng),
        }
    }

    /// The process-wide retry budget.
    pub fn budget(&self) -> &RetryBudget {
        &self.budget
    }

    /// The breaker for `provider` / `model`, created closed on first use.
    pub fn breaker(&self, provider: &str, model: &str) -> Arc<CircuitBreaker> {
        let mut breakers = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            breakers
                .entry((provider.to_owned(), model.to_owned()))
                .or_insert_with(|| {
                    Arc::new(CircuitBreaker::new(
                        provider,
                        model,
                        self.breaker_config.clone(),
                    ))
                }),
        )
    }

    /// Every breaker's state, ordered by provider and model.
    pub fn breakers(&self) -> Vec<BreakerSnapshot> {
        let breakers: Vec<_> = self
            .breakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        breakers.iter().map(|b| b.snapshot()).collect()
    }

    fn draw_delay(&self, policy: &RetryPolicy, retry: u32, previous: Duration) -> Duration {
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        policy.delay(retry, previous, &mut *rng)
    }

    /// Makes one agent call under the policy, retrying as it allows.
    pub(crate) async fn call(&self, mut call: Call<'_>) -> CallReport {
        let retry = &call.policy.retry;
        let max_attempts = retry.max_attempts.max(1);
        let mut report = CallReport::default();
        let mut previous_delay = Duration::ZERO;
        // What the retry in progress cost, returned to the budget if it succeeds.
        let mut refund = None;

        loop {
            let attempt = report.attempts + 1;
            if Instant::now() >= call.deadline {
                return report.fail(deadline(format!(
                    "the request deadline passed before attempt {attempt} could start"
                )));
            }
            let slot = match call.first_slot.take() {
                Some(slot) => slot,
                None => acquire_slot(call.limiter, &mut report, call.progress).await,
            };
            // Invariant 3: no attempt starts after the deadline.
            let now = Instant::now();
            if now >= call.deadline {
                return report.fail(deadline(format!(
                    "the request deadline passed while attempt {attempt} waited for a concurrency slot"
                )));
            }
            let permit = match call.breaker.map(|b| b.acquire()).transpose() {
                Ok(permit) => permit.unwrap_or_else(BreakerPermit::none),
                Err(rejected) => {
                    let breaker = call.breaker.expect("only a breaker rejects");
                    tracing::info!(
                        event = "breaker.reject",
                        provider = breaker.provider(),
                        model = breaker.model(),
                        state = rejected.state.as_str(),
                        retry_in_ms = millis(rejected.retry_in),
                        "circuit for {}/{} is {}; not calling it",
                        breaker.provider(),
                        breaker.model(),
                        rejected.state
                    );
                    return report.fail(OutcomeError {
                        kind: FailureKind::CircuitOpen,
                        status: None,
                        message: match rejected.state {
                            BreakerState::Open => format!(
                                "the circuit for {}/{} is open after repeated failures; no call was made (probes resume in {:.1} s)",
                                breaker.provider(),
                                breaker.model(),
                                rejected.retry_in.as_secs_f64()
                            ),
                            _ => format!(
                                "the circuit for {}/{} is half-open and its probes are in flight; no call was made",
                                breaker.provider(),
                                breaker.model()
                            ),
                        },
                    });
                }
            };

            report.attempts = attempt;
            call.progress.attempt_started();
            call.request.meta.attempt = attempt;
            let left = call.deadline - now;
            let (limit, cut_by_deadline) = match call.policy.attempt_timeout {
                Some(t) if t < left => (t, false),
                _ => (left, true),
            };
            tracing::debug!(
                event = "agent.attempt",
                attempt,
                probe = permit.is_probe(),
                timeout_ms = millis(limit),
                "attempt {attempt} of {max_attempts}"
            );
            crate::telemetry::metrics::attempt(
                &call.request.meta.agent_id,
                call.provider_name,
                &call.request.model,
            );
            let in_flight = crate::telemetry::metrics::InFlight::start(call.provider_name);
            let started = Instant::now();
            // GenAI semantic-convention attributes, for OpenTelemetry export.
            let attempt_span = tracing::error_span!(
                "attempt",
                attempt,
                gen_ai.operation.name = "chat",
                gen_ai.provider.name = call.provider.kind(),
                gen_ai.system = call.provider.kind(),
                gen_ai.request.model = %call.request.model,
                gen_ai.usage.input_tokens = tracing::field::Empty,
                gen_ai.usage.output_tokens = tracing::field::Empty,
                gen_ai.response.finish_reasons = tracing::field::Empty,
                error.r#type = tracing::field::Empty,
            );
            let result = tokio::time::timeout(
                limit,
                call.provider
                    .complete(&call.request)
                    .instrument(attempt_span.clone()),
            )
            .await;
            match &result {
                Ok(Ok(c)) => {
                    attempt_span.record("gen_ai.usage.input_tokens", c.usage.input_tokens);
                    attempt_span.record("gen_ai.usage.output_tokens", c.usage.output_tokens);
                    if let Some(reason) = &c.stop_reason {
                        attempt_span.record("gen_ai.response.finish_reasons", reason.as_str());
                    }
                }
                Ok(Err(e)) => {
                    attempt_span.record("error.type", e.kind.as_str());
                }
                Err(_) => {
                    attempt_span.record("error.type", "timeout");
                }
            }
            drop(attempt_span);
            drop((slot, in_flight));

            let error = match result {
                Ok(Ok(completion)) => {
                    permit.record(CallResult::Success);
                    self.budget.on_success(refund);
                    report.provider_time += completion.latency;
                    report.result = Ok(completion);
                    return report;
                }
                Ok(Err(error)) => {
                    permit.record(if counts_against_provider(&error) {
                        CallResult::Failure
                    } else {
                        CallResult::Success
                    });
                    error
                }
                Err(_) if cut_by_deadline => {
                    drop(permit);
                    report.provider_time += started.elapsed();
                    return report.fail(deadline(format!(
                        "the request deadline passed during attempt {attempt}"
                    )));
                }
                Err(_) => {
                    permit.record(CallResult::Failure);
                    ProviderError::new(
                        ErrorKind::Timeout,
                        format!(
                            "no answer within the attempt timeout ({:.1} s)",
                            limit.as_secs_f64()
                        ),
                    )
                }
            };
            report.provider_time += started.elapsed();

            if !is_retryable(&error) || attempt >= max_attempts {
                return report.fail(error.into());
            }

            let now = Instant::now();
            let (delay, source) = match error.retry_after {
                Some(wait)
                    if wait > retry.retry_after_max && error.kind == ErrorKind::RateLimited =>
                {
                    if let Some(breaker) = call.breaker {
                        breaker.open_until(now + wait, "retry_after");
                    }
                    refused(attempt, "retry_after_beyond_max", &error);
                    let mut outcome: OutcomeError = error.into();
                    outcome.message = format!(
                        "{}; the provider asked to wait {:.1} s, more than retry_after_max ({:.1} s)",
                        outcome.message,
                        wait.as_secs_f64(),
                        retry.retry_after_max.as_secs_f64()
                    );
                    return report.fail(outcome);
                }
                Some(wait) => (wait.min(retry.retry_after_max), DelaySource::RetryAfter),
                None => (
                    self.draw_delay(retry, attempt, previous_delay),
                    DelaySource::Backoff,
                ),
            };
            if now + delay >= call.deadline {
                refused(attempt, "deadline_exceeded", &error);
                return report.fail(OutcomeError {
                    kind: FailureKind::DeadlineExceeded,
                    status: error.status,
                    message: format!(
                        "waiting {:.3} s before attempt {} would pass the request deadline ({:.3} s left); last error: {error}",
                        delay.as_secs_f64(),
                        attempt + 1,
                        (call.deadline - now).as_secs_f64()
                    ),
                });
            }
            let cost = self.budget.cost(error.kind == ErrorKind::Timeout);
            if !self.budget.withdraw(cost) {
                refused(attempt, "retry_budget_exhausted", &error);
                return report.fail(OutcomeError {
                    kind: FailureKind::RetryBudgetExhausted,
                    status: error.status,
                    message: format!(
                        "the process-wide retry budget is spent ({} tokens left, {cost} needed); last error: {error}",
                        self.budget.available()
                    ),
                });
            }
            refund = Some(cost);

            tracing::warn!(
                event = "agent.retry",
                attempt,
                next_attempt = attempt + 1,
                delay_ms = millis(delay),
                delay_source = source.as_str(),
                error.kind = error.kind.as_str(),
                error.message = %error.message,
                status = error.status,
                "attempt {attempt} failed ({}); retrying in {:.3} s ({})",
                error.kind,
                delay.as_secs_f64(),
                source.as_str()
            );
            let record = RetryRecord {
                attempt,
                error: error.kind,
                status: error.status,
                delay,
                source,
            };
            call.progress.retry(&record);
            crate::telemetry::metrics::retry(error.kind.as_str());
            report.retries.push(record);
            tokio::time::sleep(delay).await;
            previous_delay = delay;
        }
    }
}

/// One agent call to make under the policy.
pub(crate) struct Call<'a> {
    /// The slot for the first attempt, when the caller already holds one.
    pub first_slot: Option<Permit>,
    /// The provider's configured name, for metrics.
    pub provider_name: &'a str,
    pub provider: &'a dyn Provider,
    pub breaker: Option<&'a Arc<CircuitBreaker>>,
    pub policy: &'a CallPolicy,
    pub request: CompletionRequest,
    pub limiter: &'a dyn Limiter,
    pub deadline: Instant,
    pub progress: &'a Progress,
}

/// What became of a call under the policy.
#[derive(Debug)]
pub(crate) struct CallReport {
    pub result: Result<Completion, OutcomeError>,
    pub attempts: u32,
    pub retries: Vec<RetryRecord>,
    /// Time inside provider calls.
    pub provider_time: Duration,
    /// Time waiting for concurrency slots.
    pub queue_wait: Duration,
}

impl Default for CallReport {
    fn default() -> Self {
        CallReport {
            result: Err(deadline(String::new())),
            attempts: 0,
            retries: Vec::new(),
            provider_time: Duration::ZERO,
            queue_wait: Duration::ZERO,
        }
    }
}

impl CallReport {
    fn fail(mut self, error: OutcomeError) -> Self {
        self.result = Err(error);
        self
    }
}

fn deadline(message: String) -> OutcomeError {
    OutcomeError {
        kind: FailureKind::DeadlineExceeded,
        status: None,
        message,
    }
}

/// Takes a concurrency slot, waiting (and saying so) only when none is free.
async fn acquire_slot(
    limiter: &dyn Limiter,
    report: &mut CallReport,
    progress: &Progress,
) -> Permit {
    if let Some(permit) = limiter.try_acquire() {
        return permit;
    }
    let started = Instant::now();
    let permit = limiter.acquire().await;
    let waited = started.elapsed();
    report.queue_wait += waited;
    progress.waited(waited);
    crate::telemetry::metrics::limiter_wait(waited);
    tracing::debug!(
        event = "limiter.wait",
        wait_ms = millis(waited),
        limit = limiter.limit(),
        "waited {:.3} s for a concurrency slot",
        waited.as_secs_f64()
    );
    permit
}

/// Logs a retry the policy would have made but did not.
fn refused(attempt: u32, reason: &'static str, error: &ProviderError) {
    tracing::warn!(
        event = "agent.retry_refused",
        attempt,
        reason,
        error.kind = error.kind.as_str(),
        error.message = %error.message,
        status = error.status,
        "attempt {attempt} failed ({}) and will not be retried: {reason}",
        error.kind
    );
}
