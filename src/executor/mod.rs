//! The executor: runs one request's agent tasks concurrently, under the process-wide
//! limiter and the request's deadline, and never loses an outcome.
//!
//! Each agent gets its own tokio task in a [`JoinSet`], so a panic in one is contained
//! to that task and becomes that agent's failed outcome. When the deadline passes or the
//! request is cancelled, the unfinished tasks are aborted and each is given a
//! `timed_out` outcome built from what it had got to (attempts, queue wait). Outcomes
//! come back in the order the tasks were given.

mod outcome;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::limits::Limiter;
use crate::provider::{CompletionRequest, Provider, Usage};

pub use outcome::{AgentOutcome, FailureKind, OutcomeError, OutcomeStatus};
pub(crate) use outcome::{as_millis, millis};

/// One agent's work for one request: which provider to call with what.
#[derive(Debug, Clone)]
pub struct AgentTask {
    /// The agent's id, copied into its outcome.
    pub agent_id: String,
    /// The provider's configured name, for outcomes and logs.
    pub provider_name: String,
    /// The provider to call.
    pub provider: Arc<dyn Provider>,
    /// The rendered request.
    pub request: CompletionRequest,
}

/// Runs agent tasks concurrently. Cheap to clone; clones share the limiter.
#[derive(Debug, Clone)]
pub struct Executor {
    limiter: Arc<dyn Limiter>,
}

/// Why the executor stopped waiting for unfinished tasks.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Deadline,
    Cancelled,
}

/// What an agent's task has got to, readable after the task is aborted.
#[derive(Debug)]
struct Progress {
    dispatched: Instant,
    attempts: AtomicU32,
    /// Nanoseconds spent waiting for a permit; `u64::MAX` while still waiting.
    queue_wait_nanos: AtomicU64,
}

impl Executor {
    /// An executor whose calls all go through `limiter`. Share one limiter across every
    /// executor in the process: provider limits are per key, not per request.
    pub fn new(limiter: Arc<dyn Limiter>) -> Self {
        Executor { limiter }
    }

    /// The limiter this executor's calls go through.
    pub fn limiter(&self) -> &Arc<dyn Limiter> {
        &self.limiter
    }

    /// Runs `tasks` to completion, until `deadline`, or until `cancel` fires, whichever
    /// comes first. Returns exactly one outcome per task, in the order given.
    pub async fn run(
        &self,
        tasks: Vec<AgentTask>,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Vec<AgentOutcome> {
        let mut set = JoinSet::new();
        let mut slot_of = HashMap::with_capacity(tasks.len());
        let mut pending: Vec<Pending> = Vec::with_capacity(tasks.len());

        for (index, task) in tasks.into_iter().enumerate() {
            let progress = Arc::new(Progress {
                dispatched: Instant::now(),
                attempts: AtomicU32::new(0),
                queue_wait_nanos: AtomicU64::new(u64::MAX),
            });
            // ERROR level for the same reason as the request span: ids on every line.
            let span = tracing::error_span!(
                "agent",
                agent_id = %task.agent_id,
                provider = %task.provider_name,
                model = %task.request.model,
            );
            pending.push(Pending {
                agent_id: task.agent_id.clone(),
                provider: task.provider_name.clone(),
                model: task.request.model.clone(),
                progress: Arc::clone(&progress),
            });
            let limiter = Arc::clone(&self.limiter);
            let handle = set.spawn(run_agent(task, limiter, deadline, progress).instrument(span));
            slot_of.insert(handle.id(), index);
        }

        let mut outcomes: Vec<Option<AgentOutcome>> = vec![None; pending.len()];
        let mut stop = None;
        loop {
            tokio::select! {
                // Results first: a task that finished at the deadline still counts.
                biased;
                joined = set.join_next_with_id() => match joined {
                    Some(joined) => place(joined, &slot_of, &pending, &mut outcomes, None),
                    None => break,
                },
                () = tokio::time::sleep_until(deadline) => { stop = Some(Stop::Deadline); break; }
                () = cancel.cancelled() => { stop = Some(Stop::Cancelled); break; }
            }
        }

        if stop.is_some() {
            set.abort_all();
            // Tasks that finished before the abort took effect still deliver their result.
            while let Some(joined) = set.join_next_with_id().await {
                place(joined, &slot_of, &pending, &mut outcomes, stop);
            }
        }

        outcomes
            .into_iter()
            .zip(&pending)
            .map(|(outcome, p)| {
                // Every spawned task is joined above, so every slot is filled; this
                // fallback only keeps the promise if that reasoning is ever broken.
                outcome.unwrap_or_else(|| p.interrupted(stop.unwrap_or(Stop::Cancelled)))
            })
            .collect()
    }
}

/// The executor's record of a task, kept to build an outcome if the task never returns.
struct Pending {
    agent_id: String,
    provider: String,
    model: String,
    progress: Arc<Progress>,
}

impl Pending {
    fn base(&self, status: OutcomeStatus, error: OutcomeError) -> AgentOutcome {
        let queue_wait = match self.progress.queue_wait_nanos.load(Ordering::Acquire) {
            u64::MAX => self.progress.dispatched.elapsed(),
            nanos => Duration::from_nanos(nanos),
        };
        AgentOutcome {
            agent_id: self.agent_id.clone(),
            provider: self.provider.clone(),
            model: self.model.clone(),
            status,
            output: None,
            stop_reason: None,
            error: Some(error),
            attempts: self.progress.attempts.load(Ordering::Acquire),
            latency: self.progress.dispatched.elapsed(),
            queue_wait,
            provider_latency: Duration::ZERO,
            usage: Usage::default(),
        }
    }

    fn interrupted(&self, stop: Stop) -> AgentOutcome {
        let (kind, message) = match stop {
            Stop::Deadline => (
                FailureKind::DeadlineExceeded,
                "the request deadline passed before this agent finished",
            ),
            Stop::Cancelled => (
                FailureKind::Cancelled,
                "the request was cancelled before this agent finished",
            ),
        };
        tracing::warn!(
            event = "agent.timeout",
            agent_id = %self.agent_id,
            reason = kind.as_str(),
            "agent {} did not finish: {message}", self.agent_id
        );
        self.base(
            OutcomeStatus::TimedOut,
            OutcomeError {
                kind,
                status: None,
                message: message.to_owned(),
            },
        )
    }

    fn panicked(&self, err: JoinError) -> AgentOutcome {
        let payload = err.into_panic();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-string panic payload".to_owned());
        tracing::error!(
            event = "agent.panic",
            agent_id = %self.agent_id,
            error.kind = "panicked",
            error.message = %message,
            "agent {} panicked; the other agents continue", self.agent_id
        );
        self.base(
            OutcomeStatus::Failed,
            OutcomeError {
                kind: FailureKind::Panicked,
                status: None,
                message: format!("the agent's task panicked: {message}"),
            },
        )
    }
}

fn place(
    joined: Result<(tokio::task::Id, AgentOutcome), JoinError>,
    slot_of: &HashMap<tokio::task::Id, usize>,
    pending: &[Pending],
    outcomes: &mut [Option<AgentOutcome>],
    stop: Option<Stop>,
) {
    let (id, outcome) = match joined {
        Ok((id, outcome)) => (id, Ok(outcome)),
        Err(err) => (err.id(), Err(err)),
    };
    let Some(&index) = slot_of.get(&id) else {
        return;
    };
    outcomes[index] = Some(match outcome {
        Ok(outcome) => outcome,
        Err(err) if err.is_panic() => pending[index].panicked(err),
        Err(_) => pending[index].interrupted(stop.unwrap_or(Stop::Cancelled)),
    });
}

/// One agent's task: wait for a slot, check the deadline, call the provider.
async fn run_agent(
    task: AgentTask,
    limiter: Arc<dyn Limiter>,
    deadline: Instant,
    progress: Arc<Progress>,
) -> AgentOutcome {
    tracing::debug!(
        event = "agent.dispatch",
        "dispatching agent {}",
        task.agent_id
    );
    let permit = match limiter.try_acquire() {
        Some(permit) => permit,
        None => {
            let permit = limiter.acquire().await;
            let waited = progress.dispatched.elapsed();
            tracing::debug!(
                event = "limiter.wait",
                wait_ms = millis(waited),
                limit = limiter.limit(),
                "waited {waited:?} for a concurrency slot"
            );
            permit
        }
    };
    let queue_wait = progress.dispatched.elapsed();
    progress
        .queue_wait_nanos
        .store(queue_wait.as_nanos() as u64, Ordering::Release);

    let mut outcome = AgentOutcome {
        agent_id: task.agent_id,
        provider: task.provider_name,
        model: task.request.model.clone(),
        status: OutcomeStatus::Failed,
        output: None,
        stop_reason: None,
        error: None,
        attempts: 0,
        latency: Duration::ZERO,
        queue_wait,
        provider_latency: Duration::ZERO,
        usage: Usage::default(),
    };

    // Invariant 3: no attempt starts after the deadline.
    if Instant::now() >= deadline {
        outcome.status = OutcomeStatus::TimedOut;
        outcome.error = Some(OutcomeError {
            kind: FailureKind::DeadlineExceeded,
            status: None,
            message: "the request deadline passed while waiting for a concurrency slot".into(),
        });
        outcome.latency = progress.dispatched.elapsed();
        return outcome;
    }

    let mut request = task.request;
    request.meta.attempt = 1;
    progress.attempts.store(1, Ordering::Release);
    outcome.attempts = 1;
    let attempt_started = Instant::now();
    let result = task
        .provider
        .complete(&request)
        .instrument(tracing::error_span!("attempt", attempt = 1))
        .await;
    drop(permit);

    match result {
        Ok(completion) => {
            outcome.status = OutcomeStatus::Succeeded;
            outcome.output = Some(completion.text);
            outcome.stop_reason = completion.stop_reason;
            outcome.usage = completion.usage;
            outcome.provider_latency = completion.latency;
        }
        Err(error) => {
            outcome.provider_latency = attempt_started.elapsed();
            outcome.error = Some(error.into());
        }
    }
    outcome.latency = progress.dispatched.elapsed();
    match &outcome.error {
        None => tracing::info!(
            event = "agent.success",
            latency_ms = millis(outcome.latency),
            attempts = outcome.attempts,
            input_tokens = outcome.usage.input_tokens,
            output_tokens = outcome.usage.output_tokens,
            "agent {} succeeded",
            outcome.agent_id
        ),
        Some(error) => tracing::warn!(
            event = "agent.failure",
            latency_ms = millis(outcome.latency),
            attempts = outcome.attempts,
            error.kind = error.kind.as_str(),
            error.message = %error.message,
            status = error.status,
            "agent {} failed: {error}", outcome.agent_id
        ),
    }
    outcome
}
