//! The executor: runs one request's agent tasks concurrently, under the process-wide
//! limiter and the request's deadline, and never loses an outcome.
//!
//! Each agent gets its own tokio task in a [`JoinSet`], so a panic in one is contained
//! to that task and becomes that agent's failed outcome. When the deadline passes or the
//! request is cancelled, the unfinished tasks are aborted and each is given a
//! `timed_out` outcome built from what it had got to (attempts, queue wait). Outcomes
//! come back in the order the tasks were given.
//!
//! Each task makes its call through the [`Resilience`] policy (slots, breaker,
//! timeouts, retries); if that fails and the agent has a fallback, the fallback's text
//! or the fallback agent's call (through the same policy) takes its place.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cache::{CacheKey, CachedReply, Lookup, ResponseCache};
use crate::cost::PriceTable;
use crate::limits::{FlowLane, Limiter, Permit};
use crate::provider::{Completion, CompletionRequest, Provider, Usage};
use crate::resilience::{
    Call, CallPolicy, CallProgress, CallReport, CircuitBreaker, Resilience, RetryBudget,
};

pub use crate::outcome::{
    AgentOutcome, FailureKind, FallbackRecord, FallbackSource, OutcomeError, OutcomeStatus,
};
use crate::time::millis;

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
    /// How to retry and time out its calls.
    pub policy: Arc<CallPolicy>,
    /// The provider and model's circuit breaker, shared with every other caller.
    pub breaker: Option<Arc<CircuitBreaker>>,
    /// The provider and model's flow control (pause, rate limits, adaptive
    /// concurrency), shared with every other caller; `None` for none.
    pub lane: Option<Arc<FlowLane>>,
    /// The provider and model's retry budget; `None` takes it from the executor's
    /// resilience state.
    pub budget: Option<Arc<RetryBudget>>,
    /// What to do when the call fails for good.
    pub fallback: Option<Fallback>,
    /// A sub-agent's call, or the synthesis after the fan-out (which logs
    /// `synthesis.start` / `synthesis.finish` instead of `agent.*`).
    pub kind: TaskKind,
    /// The response cache its calls go through, if the agent is cached.
    pub cache: Option<TaskCache>,
}

/// A task's way into the response cache.
#[derive(Debug, Clone)]
pub struct TaskCache {
    /// The cache every request shares.
    pub cache: ResponseCache,
    /// Its provider's identity, part of every key (see [`Provider::identity`]).
    pub identity: Arc<str>,
}

/// What a task is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TaskKind {
    /// A sub-agent of the fan-out.
    #[default]
    Agent,
    /// The call that merges the replies.
    Synthesis,
}

impl AgentTask {
    /// A task with the default policy, no breaker and no fallback.
    pub fn new(
        agent_id: impl Into<String>,
        provider_name: impl Into<String>,
        provider: Arc<dyn Provider>,
        request: CompletionRequest,
    ) -> Self {
        AgentTask {
            agent_id: agent_id.into(),
            provider_name: provider_name.into(),
            provider,
            request,
            policy: Arc::new(CallPolicy::default()),
            breaker: None,
            lane: None,
            budget: None,
            fallback: None,
            kind: TaskKind::Agent,
            cache: None,
        }
    }

    /// Uses this retry and timeout policy.
    pub fn with_policy(mut self, policy: Arc<CallPolicy>) -> Self {
        self.policy = policy;
        self
    }

    /// Guards the calls with this breaker.
    pub fn with_breaker(mut self, breaker: Arc<CircuitBreaker>) -> Self {
        self.breaker = Some(breaker);
        self
    }

    /// Paces the calls through this provider and model's flow control.
    pub fn with_lane(mut self, lane: Arc<FlowLane>) -> Self {
        self.lane = Some(lane);
        self
    }

    /// Pays for retries from this budget.
    pub fn with_budget(mut self, budget: Arc<RetryBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Falls back to this when the call fails for good.
    pub fn with_fallback(mut self, fallback: Fallback) -> Self {
        self.fallback = Some(fallback);
        self
    }

    /// Answers its calls from `cache` when it can, and keeps their replies there.
    pub fn with_cache(mut self, cache: TaskCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Marks the task as a sub-agent's call or the synthesis.
    pub fn with_kind(mut self, kind: TaskKind) -> Self {
        self.kind = kind;
        self
    }
}

/// What stands in for an agent whose call failed for good.
#[derive(Debug, Clone)]
pub enum Fallback {
    /// A static reply.
    Text(String),
    /// Another agent's call (a different model or provider), with its own policy,
    /// breaker and, possibly, fallback.
    Agent(Box<AgentTask>),
}

/// Live news of a request's agents, for callers that show progress as it happens.
#[derive(Debug, Clone)]
pub enum AgentEvent {
    /// An agent got its first slot and started.
    Dispatch {
        /// The agent.
        agent_id: String,
    },
    /// An agent's attempt failed and will be retried after `delay`.
    Retry {
        /// The agent.
        agent_id: String,
        /// What happened, as in the outcome's `retries`.
        retry: crate::resilience::RetryRecord,
    },
    /// An agent finished: its outcome, as it will appear in the response.
    Done(Box<AgentOutcome>),
    /// The fan-out is over and the synthesis starts on this provider and model.
    SynthesisStart {
        /// The provider's configured name.
        provider: String,
        /// The model.
        model: String,
    },
    /// A piece of the synthesized answer, as the model writes it. Text of an earlier
    /// attempt (or model) that then failed is superseded: a delta with a new
    /// `attempt` or `model` starts the answer over.
    SynthesisDelta {
        /// The attempt writing it (1 for the first).
        attempt: u32,
        /// The model writing it (the synthesizer's, or its fallback's).
        model: String,
        /// The new text.
        text: String,
    },
}

/// Where live events go. Sending never blocks; a closed receiver is ignored.
pub type EventSink = tokio::sync::mpsc::UnboundedSender<AgentEvent>;

/// Runs agent tasks concurrently. Cheap to clone; clones share the limiter, the
/// resilience state (retry budget, breakers) and the prices calls are costed at.
#[derive(Debug, Clone)]
pub struct Executor {
    limiter: Arc<dyn Limiter>,
    resilience: Arc<Resilience>,
    prices: Arc<PriceTable>,
}

/// Why the executor stopped waiting for unfinished tasks.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Deadline,
    Cancelled,
}

/// What an agent's task has got to, readable after the task is aborted.
#[derive(Debug)]
pub(crate) struct Progress {
    dispatched: Instant,
    attempts: AtomicU32,
    /// Nanoseconds spent waiting for slots so far.
    queue_wait_nanos: AtomicU64,
    /// While the agent waits in a provider's queue: since when, and which lane.
    queued: std::sync::Mutex<Option<(Instant, String)>>,
    /// The agent's id and where its live events go, if anyone listens.
    events: Option<(String, EventSink)>,
}

impl Progress {
    fn new(events: Option<(String, EventSink)>) -> Self {
        Progress {
            dispatched: Instant::now(),
            attempts: AtomicU32::new(0),
            queue_wait_nanos: AtomicU64::new(0),
            queued: std::sync::Mutex::new(None),
            events,
        }
    }
}

impl CallProgress for Progress {
    fn retry(&self, retry: &crate::resilience::RetryRecord) {
        if let Some((agent_id, sink)) = &self.events {
            let _ = sink.send(AgentEvent::Retry {
                agent_id: agent_id.clone(),
                retry: retry.clone(),
            });
        }
    }

    fn attempt_started(&self) {
        self.attempts.fetch_add(1, Ordering::AcqRel);
    }

    fn queued(&self, lane: Option<&FlowLane>) {
        let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        *queued = lane.map(|l| (Instant::now(), format!("{}/{}", l.provider(), l.model())));
    }

    fn waited(&self, wait: Duration) {
        let nanos = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
        self.queue_wait_nanos.fetch_add(nanos, Ordering::AcqRel);
    }
}

impl Executor {
    /// An executor whose calls all go through `limiter`, with default resilience
    /// state. Share one limiter across every executor in the process: provider limits
    /// are per key, not per request.
    pub fn new(limiter: Arc<dyn Limiter>) -> Self {
        Executor::with_resilience(limiter, Arc::new(Resilience::default()))
    }

    /// An executor sharing `limiter` and `resilience` (retry budget and breakers).
    pub fn with_resilience(limiter: Arc<dyn Limiter>, resilience: Arc<Resilience>) -> Self {
        Executor {
            limiter,
            resilience,
            prices: Arc::new(PriceTable::default()),
        }
    }

    /// Costs calls at these prices instead of the built-in ones.
    pub fn with_prices(mut self, prices: Arc<PriceTable>) -> Self {
        self.prices = prices;
        self
    }

    /// The prices this executor's calls are costed at.
    pub fn prices(&self) -> &Arc<PriceTable> {
        &self.prices
    }

    /// The limiter this executor's calls go through.
    pub fn limiter(&self) -> &Arc<dyn Limiter> {
        &self.limiter
    }

    /// The retry budget and breakers this executor's calls share.
    pub fn resilience(&self) -> &Arc<Resilience> {
        &self.resilience
    }

    /// Runs `tasks` to completion, until `deadline`, or until `cancel` fires, whichever
    /// comes first. Returns exactly one outcome per task, in the order given.
    pub async fn run(
        &self,
        tasks: Vec<AgentTask>,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Vec<AgentOutcome> {
        self.run_observed(tasks, deadline, cancel, None).await
    }

    /// [`Executor::run`], sending live events to `events` as agents start, retry and
    /// finish.
    pub async fn run_observed(
        &self,
        tasks: Vec<AgentTask>,
        deadline: Instant,
        cancel: &CancellationToken,
        events: Option<EventSink>,
    ) -> Vec<AgentOutcome> {
        let mut set = JoinSet::new();
        let mut slot_of = HashMap::with_capacity(tasks.len());
        let mut pending: Vec<Pending> = Vec::with_capacity(tasks.len());
        let mut queue = VecDeque::with_capacity(tasks.len());

        for (index, task) in tasks.into_iter().enumerate() {
            let progress = Arc::new(Progress::new(
                events.as_ref().map(|e| (task.agent_id.clone(), e.clone())),
            ));
            // ERROR level for the same reason as the request span: ids on every line.
            let span = tracing::error_span!(
                "agent",
                agent_id = %task.agent_id,
                provider = %task.provider_name,
                model = %task.request.model,
                cache.hit = tracing::field::Empty,
            );
            pending.push(Pending {
                kind: task.kind,
                agent_id: task.agent_id.clone(),
                provider: task.provider_name.clone(),
                model: task.request.model.clone(),
                progress: Arc::clone(&progress),
            });
            queue.push_back(Queued {
                index,
                task: Box::new(task),
                span,
                progress,
            });
        }

        // Boxed, so that a request holds room only for the outcomes that are in, not
        // for all of them while its agents run.
        let mut outcomes: Vec<Option<Box<AgentOutcome>>> = vec![None; pending.len()];
        let mut stop = None;
        // Agents are dispatched in config order. An agent whose provider has flow
        // control goes at once: its lane's FIFO queue admits it, and takes the
        // process-wide slot as it lets it through (a slot taken here would sit idle
        // while the lane held the call back). Any other agent is dispatched with the
        // slot for its first attempt: the executor waits for one slot at a time in the
        // limiter's FIFO queue, so a request's agents start in order, requests sharing
        // the limiter take turns, and agents still queued are not yet tasks at all.
        let mut waiting: Option<Pin<Box<dyn Future<Output = Permit> + Send + '_>>> = None;
        loop {
            while waiting.is_none() && !queue.is_empty() {
                if queue.front().is_some_and(|q| q.task.lane.is_some()) {
                    let next = queue.pop_front().expect("not empty");
                    let (id, index) = self.dispatch(&mut set, next, None, deadline, false);
                    slot_of.insert(id, index);
                    continue;
                }
                match self.limiter.try_acquire() {
                    Some(permit) => {
                        let next = queue.pop_front().expect("not empty");
                        let (id, index) =
                            self.dispatch(&mut set, next, Some(permit), deadline, false);
                        slot_of.insert(id, index);
                    }
                    None => waiting = Some(self.limiter.acquire()),
                }
            }
            if set.is_empty() && queue.is_empty() {
                break;
            }
            tokio::select! {
                // Results first: a task that finished at the deadline still counts.
                biased;
                Some(joined) = set.join_next_with_id(), if !set.is_empty() => {
                    place(joined, &slot_of, &pending, &mut outcomes, None, events.as_ref(), &self.prices);
                }
                permit = async { waiting.as_mut().expect("guarded by the condition").await }, if waiting.is_some() => {
                    waiting = None;
                    let next = queue.pop_front().expect("a permit is awaited only for a queued agent");
                    let (id, index) = self.dispatch(&mut set, next, Some(permit), deadline, true);
                    slot_of.insert(id, index);
                }
                () = tokio::time::sleep_until(deadline) => { stop = Some(Stop::Deadline); break; }
                () = cancel.cancelled() => { stop = Some(Stop::Cancelled); break; }
            }
        }
        drop(waiting);

        if stop.is_some() {
            set.abort_all();
            // Tasks that finished before the abort took effect still deliver their result.
            while let Some(joined) = set.join_next_with_id().await {
                place(
                    joined,
                    &slot_of,
                    &pending,
                    &mut outcomes,
                    stop,
                    events.as_ref(),
                    &self.prices,
                );
            }
        }

        outcomes
            .into_iter()
            .zip(&pending)
            .map(|(outcome, p)| {
                // Every spawned task is joined above, so every slot is filled; this
                // fallback only keeps the promise if that reasoning is ever broken.
                outcome.map(|o| *o).unwrap_or_else(|| {
                    let outcome = p.interrupted(stop.unwrap_or(Stop::Cancelled), &self.prices);
                    if let Some(sink) = &events {
                        let _ = sink.send(AgentEvent::Done(Box::new(outcome.clone())));
                    }
                    outcome
                })
            })
            .collect()
    }
}

/// An agent waiting for the slot of its first attempt.
struct Queued {
    index: usize,
    /// Boxed: the queue keeps its capacity for the whole request, and the agent's
    /// task then holds a pointer, not the task, across its awaits.
    task: Box<AgentTask>,
    span: tracing::Span,
    progress: Arc<Progress>,
}

impl Executor {
    /// Spawns a queued agent's task with the slot for its first attempt.
    fn dispatch(
        &self,
        set: &mut JoinSet<AgentOutcome>,
        queued: Queued,
        permit: Option<Permit>,
        deadline: Instant,
        had_to_wait: bool,
    ) -> (tokio::task::Id, usize) {
        let Queued {
            index,
            task,
            span,
            progress,
        } = queued;
        if let Some((agent_id, sink)) = &progress.events {
            let _ = sink.send(AgentEvent::Dispatch {
                agent_id: agent_id.clone(),
            });
        }
        let waited = if had_to_wait {
            progress.dispatched.elapsed()
        } else {
            Duration::ZERO
        };
        if had_to_wait {
            progress.waited(waited);
            crate::telemetry::metrics::limiter_wait(waited);
            span.in_scope(|| {
                tracing::debug!(
                    event = "limiter.wait",
                    wait_ms = millis(waited),
                    limit = self.limiter.limit(),
                    "waited {:.3} s for a concurrency slot",
                    waited.as_secs_f64()
                );
            });
        }
        let handle = set.spawn(
            run_agent(self.clone(), task, deadline, progress, permit, waited).instrument(span),
        );
        (handle.id(), index)
    }
}

/// The executor's record of a task, kept to build an outcome if the task never returns.
struct Pending {
    kind: TaskKind,
    agent_id: String,
    provider: String,
    model: String,
    progress: Arc<Progress>,
}

impl Pending {
    /// An outcome without a reply: no usage, so it costs nothing if its model has a
    /// price.
    fn base(
        &self,
        status: OutcomeStatus,
        error: OutcomeError,
        prices: &PriceTable,
    ) -> AgentOutcome {
        let attempts = self.progress.attempts.load(Ordering::Acquire);
        let waited = Duration::from_nanos(self.progress.queue_wait_nanos.load(Ordering::Acquire));
        let queued = self
            .progress
            .queued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(Duration::ZERO, |(since, _)| since.elapsed());
        let queue_wait = if attempts == 0 && queued.is_zero() && waited.is_zero() {
            // Still waiting for its first slot.
            self.progress.dispatched.elapsed()
        } else {
            waited + queued
        };
        AgentOutcome {
            agent_id: self.agent_id.clone(),
            provider: self.provider.clone(),
            model: self.model.clone(),
            status,
            output: None,
            stop_reason: None,
            error: Some(error),
            attempts,
            retries: Vec::new(),
            fallback: None,
            latency: self.progress.dispatched.elapsed(),
            queue_wait,
            paused: Duration::ZERO,
            provider_latency: Duration::ZERO,
            usage: Usage::default(),
            cost_usd: prices.cost(&self.model, &Usage::default()),
            cached: false,
        }
    }

    fn interrupted(&self, stop: Stop, prices: &PriceTable) -> AgentOutcome {
        let queued_in = self
            .progress
            .queued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (kind, message) = match (stop, queued_in) {
            (Stop::Deadline, Some((since, lane))) => (
                FailureKind::DeadlineInQueue,
                format!(
                    "the request deadline passed after {:.3} s queued for {lane}; not sent",
                    since.elapsed().as_secs_f64()
                ),
            ),
            (Stop::Deadline, None) => (
                FailureKind::DeadlineExceeded,
                "the request deadline passed before this agent finished".to_owned(),
            ),
            (Stop::Cancelled, _) => (
                FailureKind::Cancelled,
                "the request was cancelled before this agent finished".to_owned(),
            ),
        };
        let outcome = self.base(
            OutcomeStatus::TimedOut,
            OutcomeError {
                kind,
                status: None,
                message,
            },
            prices,
        );
        log_finish(&outcome, self.kind);
        outcome
    }

    fn panicked(&self, err: JoinError, prices: &PriceTable) -> AgentOutcome {
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
            prices,
        )
    }
}

fn place(
    joined: Result<(tokio::task::Id, AgentOutcome), JoinError>,
    slot_of: &HashMap<tokio::task::Id, usize>,
    pending: &[Pending],
    outcomes: &mut [Option<Box<AgentOutcome>>],
    stop: Option<Stop>,
    events: Option<&EventSink>,
    prices: &PriceTable,
) {
    let (id, outcome) = match joined {
        Ok((id, outcome)) => (id, Ok(outcome)),
        Err(err) => (err.id(), Err(err)),
    };
    let Some(&index) = slot_of.get(&id) else {
        return;
    };
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(err) if err.is_panic() => pending[index].panicked(err, prices),
        Err(_) => pending[index].interrupted(stop.unwrap_or(Stop::Cancelled), prices),
    };
    if let Some(sink) = events {
        let _ = sink.send(AgentEvent::Done(Box::new(outcome.clone())));
    }
    outcomes[index] = Some(Box::new(outcome));
}

/// What an agent's calls add up to, kept while they run and turned into its outcome
/// at the end: the task's state lives across every await of a call in flight, so it
/// holds only what the calls add, not the whole outcome.
#[derive(Debug, Default)]
struct Tally {
    attempts: u32,
    retries: Vec<crate::resilience::RetryRecord>,
    queue_wait: Duration,
    paused: Duration,
    provider_latency: Duration,
    cached: bool,
}

impl Tally {
    /// Adds a call's attempts and timings; returns its result.
    fn absorb(&mut self, report: CallReport) -> Result<Completion, OutcomeError> {
        self.attempts += report.attempts;
        self.retries.extend(report.retries);
        self.queue_wait += report.queue_wait;
        self.paused += report.paused;
        self.provider_latency += report.provider_time;
        report.result
    }
}

/// One agent's task: its call through the resilience policy, then its fallbacks if
/// that failed.
async fn run_agent(
    executor: Executor,
    mut task: Box<AgentTask>,
    deadline: Instant,
    progress: Arc<Progress>,
    first_slot: Option<Permit>,
    queued: Duration,
) -> AgentOutcome {
    match task.kind {
        TaskKind::Agent => tracing::debug!(
            event = "agent.dispatch",
            "dispatching agent {}",
            task.agent_id
        ),
        TaskKind::Synthesis => tracing::info!(
            event = "synthesis.start",
            provider = %task.provider_name,
            model = %task.request.model,
            prompt_chars = task.request.prompt.len(),
            "synthesis started on {}/{}",
            task.provider_name,
            task.request.model
        ),
    }
    let mut tally = Tally {
        queue_wait: queued,
        ..Tally::default()
    };
    let mut fallback_record = None;

    let (report, cached) = executor
        .call(&mut task, deadline, &progress, first_slot)
        .await;
    tally.cached = cached;
    let mut result = tally.absorb(report);
    // What the calls that returned a reply cost, each at its own model's price; `None`
    // until one does.
    let mut spent: Option<Option<f64>> = None;
    executor.price(&task, &result, &mut spent);
    let mut next = task.fallback.take();
    let mut primary_error = None;
    while let Err(error) = &result {
        if error.kind == FailureKind::Cancelled {
            break;
        }
        let Some(fallback) = next.take() else { break };
        let primary_error = primary_error.get_or_insert_with(|| error.clone()).clone();
        match fallback {
            Fallback::Text(text) => {
                tracing::warn!(
                    event = "agent.fallback",
                    source = "text",
                    error.kind = primary_error.kind.as_str(),
                    error.message = %primary_error.message,
                    "agent {} failed ({}); using its fallback text",
                    task.agent_id,
                    primary_error.kind
                );
                fallback_record = Some(FallbackRecord {
                    source: FallbackSource::Text,
                    agent: None,
                    provider: None,
                    model: None,
                    primary_error,
                });
                result = Ok(Completion {
                    text,
                    stop_reason: Some("fallback".to_owned()),
                    ..Completion::default()
                });
            }
            Fallback::Agent(mut target) => {
                tracing::warn!(
                    event = "agent.fallback",
                    source = "agent",
                    fallback_agent = %target.agent_id,
                    fallback_provider = %target.provider_name,
                    fallback_model = %target.request.model,
                    error.kind = primary_error.kind.as_str(),
                    error.message = %primary_error.message,
                    "agent {} failed ({}); falling back to agent {}",
                    task.agent_id,
                    primary_error.kind,
                    target.agent_id
                );
                fallback_record = Some(FallbackRecord {
                    source: FallbackSource::Agent,
                    agent: Some(target.agent_id.clone()),
                    provider: Some(target.provider_name.clone()),
                    model: Some(target.request.model.clone()),
                    primary_error,
                });
                let span = tracing::error_span!(
                    "fallback",
                    fallback_agent = %target.agent_id,
                    provider = %target.provider_name,
                    model = %target.request.model,
                );
                // Boxed: only a fallback pays for a second call's state in the task.
                let (report, cached) = Box::pin(
                    executor
                        .call(&mut target, deadline, &progress, None)
                        .instrument(span),
                )
                .await;
                tally.cached = cached;
                result = tally.absorb(report);
                executor.price(&target, &result, &mut spent);
                next = target.fallback.take();
            }
        }
    }

    let Tally {
        attempts,
        retries,
        queue_wait,
        paused,
        provider_latency,
        cached,
    } = tally;
    let model = std::mem::take(&mut task.request.model);
    let mut outcome = AgentOutcome {
        agent_id: std::mem::take(&mut task.agent_id),
        provider: std::mem::take(&mut task.provider_name),
        cost_usd: spent.unwrap_or_else(|| executor.prices.cost(&model, &Usage::default())),
        model,
        status: OutcomeStatus::Failed,
        output: None,
        stop_reason: None,
        error: None,
        attempts,
        retries,
        fallback: fallback_record,
        latency: progress.dispatched.elapsed(),
        queue_wait,
        paused,
        provider_latency,
        usage: Usage::default(),
        cached,
    };
    match result {
        Ok(completion) => {
            outcome.status = OutcomeStatus::Succeeded;
            outcome.output = Some(completion.text);
            outcome.stop_reason = completion.stop_reason;
            outcome.usage += completion.usage;
        }
        Err(error) => {
            outcome.status = error.kind.status();
            outcome.error = Some(error);
        }
    }
    log_finish(&outcome, task.kind);
    outcome
}

/// The one line that says how an agent ended: `agent.success`, `agent.failure` or
/// `agent.timeout` (`synthesis.finish` for the synthesis, with its `status`), with its
/// timings, so a timeline can be rebuilt from these lines alone (dispatch = finish −
/// `latency_ms`).
fn log_finish(o: &AgentOutcome, kind: TaskKind) {
    crate::telemetry::metrics::agent_finished(&crate::telemetry::metrics::AgentFinished {
        agent: &o.agent_id,
        provider: &o.provider,
        model: &o.model,
        outcome: o.status.as_str(),
        latency: o.latency,
        input_tokens: o.usage.input_tokens,
        output_tokens: o.usage.output_tokens,
        fell_back: o.fallback.is_some(),
    });
    let fallback = o.fallback.as_ref().map(|f| f.source.as_str());
    let cost_usd = o.cost_usd.map(crate::cost::round_usd);
    if kind == TaskKind::Synthesis {
        log_synthesis_finish(o, fallback);
        return;
    }
    match &o.error {
        None => tracing::info!(
            event = "agent.success",
            agent_id = %o.agent_id,
            provider = %o.provider,
            model = %o.model,
            latency_ms = millis(o.latency),
            queue_ms = millis(o.queue_wait),
            pause_ms = (!o.paused.is_zero()).then(|| millis(o.paused)),
            provider_ms = millis(o.provider_latency),
            attempts = o.attempts,
            retries = o.retries.len(),
            input_tokens = o.usage.input_tokens,
            output_tokens = o.usage.output_tokens,
            cache_write_tokens = (o.usage.cache_creation_input_tokens > 0)
                .then_some(o.usage.cache_creation_input_tokens),
            cache_read_tokens = (o.usage.cache_read_input_tokens > 0)
                .then_some(o.usage.cache_read_input_tokens),
            cost_usd,
            fallback,
            cached = o.cached.then_some(true),
            "agent {} succeeded", o.agent_id
        ),
        Some(error) if o.status == OutcomeStatus::TimedOut => tracing::warn!(
            event = "agent.timeout",
            agent_id = %o.agent_id,
            provider = %o.provider,
            model = %o.model,
            reason = error.kind.as_str(),
            error.kind = error.kind.as_str(),
            error.message = %error.message,
            latency_ms = millis(o.latency),
            queue_ms = millis(o.queue_wait),
            pause_ms = (!o.paused.is_zero()).then(|| millis(o.paused)),
            provider_ms = millis(o.provider_latency),
            attempts = o.attempts,
            retries = o.retries.len(),
            cost_usd,
            fallback,
            "agent {} did not finish: {}", o.agent_id, error.message
        ),
        Some(error) => tracing::warn!(
            event = "agent.failure",
            agent_id = %o.agent_id,
            provider = %o.provider,
            model = %o.model,
            error.kind = error.kind.as_str(),
            error.message = %error.message,
            status = error.status,
            latency_ms = millis(o.latency),
            queue_ms = millis(o.queue_wait),
            pause_ms = (!o.paused.is_zero()).then(|| millis(o.paused)),
            provider_ms = millis(o.provider_latency),
            attempts = o.attempts,
            retries = o.retries.len(),
            cost_usd,
            fallback,
            "agent {} failed: {error}", o.agent_id
        ),
    }
}

/// `synthesis.finish`: `info` when it succeeded, `warn` when the answer falls back to
/// the concatenation.
fn log_synthesis_finish(o: &AgentOutcome, fallback: Option<&str>) {
    macro_rules! finish {
        ($level:ident, $($message:tt)+) => {
            tracing::$level!(
                event = "synthesis.finish",
                agent_id = %o.agent_id,
                provider = %o.provider,
                model = %o.model,
                status = o.status.as_str(),
                error.kind = o.error.as_ref().map(|e| e.kind.as_str()),
                error.message = o.error.as_ref().map(|e| e.message.as_str()),
                latency_ms = millis(o.latency),
                queue_ms = millis(o.queue_wait),
                pause_ms = (!o.paused.is_zero()).then(|| millis(o.paused)),
                provider_ms = millis(o.provider_latency),
                attempts = o.attempts,
                retries = o.retries.len(),
                input_tokens = o.usage.input_tokens,
                output_tokens = o.usage.output_tokens,
                cost_usd = o.cost_usd.map(crate::cost::round_usd),
                fallback,
                $($message)+
            )
        };
    }
    match &o.error {
        None => finish!(info, "synthesis succeeded"),
        Some(error) => finish!(
            warn,
            "synthesis {}: {error}; the answer is the replies laid end to end",
            o.status
        ),
    }
}

impl Executor {
    /// Adds what a call that returned a reply cost, at its model's price, to `spent`,
    /// and counts it in the metrics. A failed call reports no usage and costs nothing.
    fn price(
        &self,
        task: &AgentTask,
        result: &Result<Completion, OutcomeError>,
        spent: &mut Option<Option<f64>>,
    ) {
        let Ok(completion) = result else { return };
        let model = &task.request.model;
        let cost = self.prices.cost(model, &completion.usage);
        if let Some(usd) = cost {
            crate::telemetry::metrics::cost(&task.provider_name, model, usd);
        }
        *spent = Some(match *spent {
            None => cost,
            Some(before) => crate::cost::sum([before, cost]),
        });
    }

    /// One task's call (without its fallback): through the response cache when the
    /// task is cached, else through the resilience policy. Says whether the result
    /// came from the cache.
    async fn call(
        &self,
        task: &mut AgentTask,
        deadline: Instant,
        progress: &Progress,
        first_slot: Option<Permit>,
    ) -> (CallReport, bool) {
        // A handle of its own (two reference counts), so the call can borrow the task's
        // request mutably.
        match task.cache.clone() {
            None => (
                self.call_upstream(task, deadline, progress, first_slot)
                    .await,
                false,
            ),
            // Boxed: inline, the cache's state (its key, lookup and flight) would make
            // every agent's task larger, cached or not.
            Some(cached) => {
                Box::pin(self.call_cached(cached, task, deadline, progress, first_slot)).await
            }
        }
    }

    /// A cached task's call: from the cache when it has the reply (or an identical
    /// call in flight gives it), else through the resilience policy, keeping a
    /// successful reply. A hit takes no slot, no rate and makes no upstream call.
    async fn call_cached(
        &self,
        cached: TaskCache,
        task: &mut AgentTask,
        deadline: Instant,
        progress: &Progress,
        first_slot: Option<Permit>,
    ) -> (CallReport, bool) {
        let key = CacheKey::of(&cached.identity, &task.request);
        let (result, source) = match cached.cache.lookup(&key).await {
            Lookup::Miss(flight) => {
                let report = self
                    .call_upstream(task, deadline, progress, first_slot)
                    .await;
                let reply = report.result.as_ref().map(CachedReply::of);
                if let Ok(reply) = &reply {
                    cached.cache.store(&key, reply).await;
                }
                flight.finish(reply.map_err(Clone::clone));
                return (report, false);
            }
            Lookup::Hit(reply) => (Ok(reply), cached.cache.store_name()),
            Lookup::Shared(result) => ((*result).clone(), "in_flight"),
        };
        drop(first_slot);
        tracing::Span::current().record("cache.hit", true);
        let result = result.map(|reply| {
            tracing::info!(
                event = "agent.cache_hit",
                source,
                key = %key,
                "agent {} answered from the cache ({source})",
                task.agent_id
            );
            if let Some(sink) = &task.request.deltas {
                sink.send(&task.request, &reply.text);
            }
            reply.completion()
        });
        let report = CallReport {
            result,
            ..CallReport::default()
        };
        (report, true)
    }

    /// One task's call (without its fallback) through the resilience policy.
    async fn call_upstream(
        &self,
        task: &mut AgentTask,
        deadline: Instant,
        progress: &Progress,
        first_slot: Option<Permit>,
    ) -> CallReport {
        self.resilience
            .call(Call {
                first_slot,
                provider_name: &task.provider_name,
                provider: &*task.provider,
                breaker: task.breaker.as_ref(),
                lane: task.lane.as_ref(),
                budget: task.budget.as_ref(),
                policy: &task.policy,
                request: &mut task.request,
                limiter: &*self.limiter,
                deadline,
                progress,
            })
            .await
    }
}
