//! One agent call under the policy, step by step: admit (flow control, then a
//! process-wide slot), pass the breaker, send under the attempt timeout, tell flow
//! control and the breaker what came back, then retry or stop.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument;

use super::{
    BreakerPermit, BreakerState, CallPolicy, CallResult, CircuitBreaker, DelaySource, Resilience,
    RetryBudget, RetryRecord, counts_against_provider, is_flow_control, is_retryable,
};
use crate::limits::{Feedback, FlowLane, LanePermit, Limiter, Permit, RateConfig, Signal, Turn};
use crate::outcome::{FailureKind, OutcomeError};
use crate::provider::{
    Completion, CompletionRequest, ErrorKind, Provider, ProviderError, RateLimits,
};
use crate::time::millis;

/// The longest a provider's `Retry-After` pauses its callers: the longest wait a
/// response may ask for at all ([`crate::provider::retry_after::MAX_RETRY_AFTER`]).
pub const MAX_PAUSE: Duration = crate::provider::retry_after::MAX_RETRY_AFTER;

/// Where a call reports how far it has got, as it goes: the executor keeps it, to
/// build an outcome even for a task it has to abort, and to send live events.
pub(crate) trait CallProgress: Send + Sync {
    /// A retry is about to happen.
    fn retry(&self, retry: &RetryRecord);
    /// An attempt is about to call the provider.
    fn attempt_started(&self);
    /// The call starts (`Some`) or stops (`None`) waiting in a lane's queue.
    fn queued(&self, lane: Option<&FlowLane>);
    /// A wait to be let through ended.
    fn waited(&self, wait: Duration);
}

/// One agent call to make under the policy.
pub(crate) struct Call<'a> {
    /// The process-wide slot for the first attempt, when the caller already holds one.
    pub first_slot: Option<Permit>,
    /// The provider's configured name, for metrics.
    pub provider_name: &'a str,
    pub provider: &'a dyn Provider,
    pub breaker: Option<&'a Arc<CircuitBreaker>>,
    /// The provider and model's flow control; `None` for none.
    pub lane: Option<&'a Arc<FlowLane>>,
    /// The provider and model's retry budget; `None` to look it up.
    pub budget: Option<&'a Arc<RetryBudget>>,
    pub policy: &'a CallPolicy,
    /// The request, borrowed from the task: each attempt sets its `meta.attempt`.
    pub request: &'a mut CompletionRequest,
    pub limiter: &'a dyn Limiter,
    pub deadline: Instant,
    pub progress: &'a dyn CallProgress,
}

/// What became of a call under the policy.
#[derive(Debug)]
pub(crate) struct CallReport {
    pub result: Result<Completion, OutcomeError>,
    pub attempts: u32,
    pub retries: Vec<RetryRecord>,
    /// Time inside provider calls.
    pub provider_time: Duration,
    /// Time waiting to be let through (flow control and process-wide slots).
    pub queue_wait: Duration,
    /// The part of `queue_wait` spent behind a provider's pause (`Retry-After`).
    pub paused: Duration,
}

impl Default for CallReport {
    fn default() -> Self {
        CallReport {
            result: Err(deadline(String::new())),
            attempts: 0,
            retries: Vec::new(),
            provider_time: Duration::ZERO,
            queue_wait: Duration::ZERO,
            paused: Duration::ZERO,
        }
    }
}

/// What a call has done so far: its report without the result, which only the end
/// knows. Kept apart because it lives across every await of the call, in every call
/// in flight; a placeholder result would double its size.
#[derive(Debug, Default)]
struct Tally {
    attempts: u32,
    retries: Vec<RetryRecord>,
    provider_time: Duration,
    queue_wait: Duration,
    paused: Duration,
}

impl Tally {
    fn report(self, result: Result<Completion, OutcomeError>) -> CallReport {
        CallReport {
            result,
            attempts: self.attempts,
            retries: self.retries,
            provider_time: self.provider_time,
            queue_wait: self.queue_wait,
            paused: self.paused,
        }
    }

    fn fail(self, error: OutcomeError) -> CallReport {
        self.report(Err(error))
    }
}

/// What an attempt holds while it runs: its process-wide slot and its place in the
/// provider and model's lane.
struct Slots {
    global: Option<Permit>,
    lane: Option<LanePermit>,
}

impl Slots {
    /// The attempt was never sent: both slots go back, and the lane refunds what it
    /// charged.
    fn unsent(self) {
        if let Some(lane) = self.lane {
            lane.unsent();
        }
    }
}

/// An attempt's result and what it cost.
struct Sent {
    result: Result<Completion, ProviderError>,
    /// The request deadline, not the attempt timeout, cut it short.
    cut_by_deadline: bool,
    took: Duration,
}

impl Resilience {
    /// Makes one agent call under the policy, retrying as it allows.
    pub(crate) async fn call(&self, mut call: Call<'_>) -> CallReport {
        let retry = &call.policy.retry;
        let max_attempts = retry.max_attempts.max(1);
        let budget = match call.budget {
            Some(budget) => Arc::clone(budget),
            None => self.budget(call.provider_name, &call.request.model),
        };
        let mut report = Tally::default();
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
            // An open breaker fails fast, before the call queues or is charged a rate.
            if let Some(breaker) = call.breaker
                && let Some(rejected) = breaker.rejects_now()
            {
                drop(call.first_slot.take());
                return report.fail(circuit_open(breaker, rejected));
            }
            let slots = match admit(&mut call, &mut report).await {
                Ok(slots) => slots,
                Err(error) => return report.fail(error),
            };
            // Invariant 3: no attempt starts after the deadline.
            let now = Instant::now();
            if now >= call.deadline {
                slots.unsent();
                return report.fail(deadline(format!(
                    "the request deadline passed while attempt {attempt} waited for a concurrency slot"
                )));
            }
            let permit = match call.breaker.map(|b| b.acquire()).transpose() {
                Ok(permit) => permit.unwrap_or_else(BreakerPermit::none),
                Err(rejected) => {
                    slots.unsent();
                    let breaker = call.breaker.expect("only a breaker rejects");
                    return report.fail(circuit_open(breaker, rejected));
                }
            };

            report.attempts = attempt;
            let sent = send(&mut call, attempt, max_attempts, permit.is_probe(), now).await;
            report.provider_time += match &sent.result {
                Ok(completion) => completion.latency,
                Err(_) => sent.took,
            };
            // Both slots go back now, not after a retry's backoff.
            let Slots { global, lane } = slots;
            drop(global);
            if let Some(lane) = lane {
                lane.finish(feedback(&sent));
            }

            let error = match sent.result {
                Ok(completion) => {
                    permit.record(CallResult::Success);
                    budget.on_success(refund);
                    return report.report(Ok(completion));
                }
                Err(_) if sent.cut_by_deadline => {
                    drop(permit);
                    return report.fail(deadline(format!(
                        "the request deadline passed during attempt {attempt}"
                    )));
                }
                Err(error) => {
                    permit.record(if is_flow_control(&error) {
                        CallResult::Ignored
                    } else if counts_against_provider(&error) {
                        CallResult::Failure
                    } else {
                        CallResult::RequestError
                    });
                    error
                }
            };

            // The provider asked every caller to wait: pause the lane for as long, so
            // the others do not keep knocking (held to MAX_PAUSE against nonsense;
            // this call itself waits at most retry_after_max, below).
            if let (Some(lane), Some(wait)) = (call.lane, error.retry_after) {
                lane.pause(wait.min(MAX_PAUSE), error.kind.as_str());
            }
            if !is_retryable(&error) || attempt >= max_attempts {
                return report.fail(error.into());
            }

            let now = Instant::now();
            let (delay, source) = match error.retry_after {
                // A rate limit that lasts longer than the caller will wait: give up
                // now (the lane stays paused for the others). Other failures clamp.
                Some(wait)
                    if wait > retry.retry_after_max && error.kind == ErrorKind::RateLimited =>
                {
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
            if crate::time::later(now, delay) >= call.deadline {
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
            let cost = budget.cost(error.kind == ErrorKind::Timeout);
            if !budget.withdraw(cost) {
                refused(attempt, "retry_budget_exhausted", &error);
                return report.fail(OutcomeError {
                    kind: FailureKind::RetryBudgetExhausted,
                    status: error.status,
                    message: format!(
                        "the retry budget of {}/{} is spent ({} tokens left, {cost} needed); last error: {error}",
                        call.provider_name,
                        call.request.model,
                        budget.available()
                    ),
                });
            }
            refund = Some(cost);

            log_retry(attempt, delay, source, &error);
            let record = RetryRecord {
                attempt,
                model: call.request.model.clone(),
                error: error.kind,
                status: error.status,
                delay,
                source,
            };
            call.progress.retry(&record);
            crate::telemetry::metrics::retry(error.kind.as_str());
            report.retries.push(record);
            if source == DelaySource::RetryAfter && call.lane.is_some() {
                // The lane's pause holds the retry back; waiting in its queue rather
                // than asleep keeps this call's place ahead of later arrivals.
            } else {
                tokio::time::sleep(delay).await;
            }
            previous_delay = delay;
        }
    }
}

/// Takes what an attempt needs to start: a place in the provider and model's lane and
/// a process-wide slot, the slot taken last — never held while the lane holds the call
/// back, so one paused provider cannot block the others, and never counted by the lane
/// while the call still waits for it.
async fn admit(call: &mut Call<'_>, report: &mut Tally) -> Result<Slots, OutcomeError> {
    let mut held = call.first_slot.take();
    let Some(lane) = call.lane else {
        let global = match held {
            Some(slot) => slot,
            None => acquire_slot(call.limiter, report, call.progress).await,
        };
        return Ok(Slots {
            global: Some(global),
            lane: None,
        });
    };
    let estimate = estimate_input_tokens(call.request);
    if let Some(permit) = lane.try_admit(estimate, call.limiter, &mut held) {
        return Ok(Slots {
            global: held,
            lane: Some(permit),
        });
    }
    drop(held);
    call.progress.queued(Some(lane));
    // A retry keeps its place ahead of first tries that came after it.
    let turn = if report.attempts > 0 {
        Turn::Retry
    } else {
        Turn::First
    };
    // Boxed: only a call that must queue pays for the queue's state; inline, every
    // call in flight would carry it.
    let admitted = Box::pin(lane.admit(estimate, call.deadline, turn, call.limiter)).await;
    call.progress.queued(None);
    let admitted = admitted.map_err(|timeout| {
        report.queue_wait += timeout.waited;
        report.paused += timeout.paused;
        call.progress.waited(timeout.waited);
        OutcomeError {
            kind: FailureKind::DeadlineInQueue,
            status: None,
            message: timeout.message,
        }
    })?;
    report.queue_wait += admitted.waited;
    report.paused += admitted.paused;
    call.progress.waited(admitted.waited);
    tracing::debug!(
        event = "limiter.wait",
        wait_ms = millis(admitted.waited),
        pause_ms = millis(admitted.paused),
        "waited {:.3} s in the queue of {}/{}",
        admitted.waited.as_secs_f64(),
        lane.provider(),
        lane.model()
    );
    Ok(Slots {
        global: Some(admitted.global),
        lane: Some(admitted.permit),
    })
}

/// A rough count of a request's input tokens before it is sent (four bytes a token,
/// which overestimates for most text outside English): what the token limits are
/// charged until the provider reports the real count.
fn estimate_input_tokens(request: &CompletionRequest) -> u64 {
    let bytes = request.prompt.len() + request.system.as_ref().map_or(0, String::len);
    (bytes as u64).div_ceil(4) + 8
}

/// Makes one attempt under the attempt timeout and the request deadline.
async fn send(
    call: &mut Call<'_>,
    attempt: u32,
    max_attempts: u32,
    probe: bool,
    now: Instant,
) -> Sent {
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
        probe,
        timeout_ms = millis(limit),
        "attempt {attempt} of {max_attempts}"
    );
    crate::telemetry::metrics::attempt(
        &call.request.meta.agent_id,
        call.provider_name,
        &call.request.model,
    );
    let _in_flight = crate::telemetry::metrics::InFlight::start(call.provider_name);
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
            .complete(call.request)
            .instrument(attempt_span.clone()),
    )
    .await;
    let took = started.elapsed();
    let timed_out = result.is_err();
    let result = match result {
        Ok(Ok(c)) => {
            attempt_span.record("gen_ai.usage.input_tokens", c.usage.input_tokens);
            attempt_span.record("gen_ai.usage.output_tokens", c.usage.output_tokens);
            if let Some(reason) = &c.stop_reason {
                attempt_span.record("gen_ai.response.finish_reasons", reason.as_str());
            }
            Ok(c)
        }
        Ok(Err(e)) => {
            attempt_span.record("error.type", e.kind.as_str());
            Err(e)
        }
        Err(_) => {
            attempt_span.record("error.type", "timeout");
            Err(ProviderError::new(
                ErrorKind::Timeout,
                format!(
                    "no answer within the attempt timeout ({:.1} s)",
                    limit.as_secs_f64()
                ),
            ))
        }
    };
    Sent {
        cut_by_deadline: cut_by_deadline && timed_out,
        result,
        took,
    }
}

/// What flow control learns from an attempt.
fn feedback(sent: &Sent) -> Feedback {
    match &sent.result {
        Ok(c) => Feedback {
            signal: Signal::Success(sent.took),
            // The whole prompt, its cached part included: OpenAI's limits count it all,
            // and for Anthropic's (which skip cache reads) it errs on the slow side.
            input_tokens: (c.usage.prompt_tokens() > 0).then_some(c.usage.prompt_tokens()),
            output_tokens: c.usage.output_tokens,
            reported: c.rate_limits.as_deref().map(per_minute),
        },
        Err(_) if sent.cut_by_deadline => Feedback::signal(Signal::Neutral),
        Err(e) => Feedback {
            signal: if is_flow_control(e) {
                Signal::Overload(e.kind.as_str())
            } else if e.kind == ErrorKind::Timeout {
                Signal::Overload("timeout")
            } else {
                Signal::Neutral
            },
            input_tokens: None,
            output_tokens: 0,
            reported: e.rate_limits.as_deref().map(per_minute),
        },
    }
}

/// The account's limits per minute, as flow control takes them: requests, and tokens —
/// Anthropic's input and output limits when it states them (its combined `tokens`
/// limit only otherwise), OpenAI's combined one.
fn per_minute(r: &RateLimits) -> RateConfig {
    let split = r.input_tokens_limit.is_some() || r.output_tokens_limit.is_some();
    RateConfig {
        rpm: r.requests_limit.filter(|n| *n > 0),
        tpm: if split {
            None
        } else {
            r.tokens_limit.filter(|n| *n > 0)
        },
        input_tpm: r.input_tokens_limit.filter(|n| *n > 0),
        output_tpm: r.output_tokens_limit.filter(|n| *n > 0),
    }
}

/// The outcome of a call the breaker refused. Counted in metrics and shown in the
/// agent's outcome; not logged on its own (an open breaker can refuse thousands).
fn circuit_open(breaker: &CircuitBreaker, rejected: super::Rejected) -> OutcomeError {
    tracing::debug!(
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
    OutcomeError {
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
    }
}

fn deadline(message: String) -> OutcomeError {
    OutcomeError {
        kind: FailureKind::DeadlineExceeded,
        status: None,
        message,
    }
}

/// Takes a process-wide slot, waiting (and saying so) only when none is free.
async fn acquire_slot(
    limiter: &dyn Limiter,
    report: &mut Tally,
    progress: &dyn CallProgress,
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

/// Logs a retry about to happen: a warning when the provider failed, information when
/// it only asked for less traffic (429, 529), which flow control deals with.
fn log_retry(attempt: u32, delay: Duration, source: DelaySource, error: &ProviderError) {
    macro_rules! retry_event {
        ($level:ident) => {
            tracing::$level!(
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
            )
        };
    }
    if is_flow_control(error) {
        retry_event!(info);
    } else {
        retry_event!(warn);
    }
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
