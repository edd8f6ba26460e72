//! The orchestrator: one request's whole life — a trace id, a plan (one task per
//! agent, prompt rendered from its template), dispatch to the executor, synthesis.
//!
//! It knows nothing of transport: the CLI and the HTTP server both call
//! [`Orchestrator::process`]. One orchestrator serves every request in the process, so
//! its limiter (and, later, its breakers) are shared as provider limits require.

mod builder;
mod request;
mod response;
mod synthesis;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument;

use crate::config::{AgentConfig, FallbackConfig};
use crate::cost::PriceTable;
use crate::executor::{
    AgentEvent, AgentOutcome, AgentTask, Executor, Fallback, TaskCache, TaskKind,
};
use crate::limits::{FlowControl, FlowLane, LaneSnapshot};
use crate::provider::{CompletionRequest, DeltaSink, Provider, RequestMeta};
use crate::resilience::{BreakerSnapshot, BreakerState, CallPolicy, CircuitBreaker, RetryBudget};
use crate::telemetry::{RequestId, TraceId};
use crate::time::millis;

pub use builder::{BuildError, OrchestratorBuilder};
pub use request::{Request, RequestError, SynthesisParams};
pub use response::{RequestUsage, Response, Summary, Timings};
pub use synthesis::{
    Concat, ConcatTag, Synthesis, SynthesisReport, SynthesisStatus, Synthesizer, render_replies,
};

/// Answers queries by fanning them out to sub-agents. Cheap to clone: clones share the
/// agents, providers and limiter.
///
/// ```
/// use metaorch::{Config, Orchestrator};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // Three agents on the simulator, with near-zero latency for the example.
/// let config = Config::from_toml_str(r#"
///     [providers.sim]
///     kind = "sim"
///     latency_min = "1ms"
///     latency_max = "5ms"
///
///     [[agents]]
///     id = "researcher"
///     prompt = "Find facts about: {query}"
///     provider = "sim"
///
///     [[agents]]
///     id = "critic"
///     prompt = "Criticise: {query}"
///     provider = "sim"
///
///     [[agents]]
///     id = "writer"
///     prompt = "Answer briefly: {query}"
///     provider = "sim"
/// "#, "example.toml")?;
///
/// let orchestrator = Orchestrator::builder().config(config).build()?;
/// let response = orchestrator.process("Should we rewrite the service in Rust?").await?;
///
/// assert_eq!(response.outcomes.len(), 3);
/// assert!(response.ok);
/// println!("{} (trace {})", response.answer, response.trace_id);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Every agent, standby ones included, in config order.
    agents: Vec<PlannedAgent>,
    /// The indexes of the agents that run on every request.
    active: Vec<usize>,
    executor: Executor,
    /// Every provider and model's flow control.
    flow: Arc<FlowControl>,
    request_timeout: Duration,
    min_successes: usize,
    /// Makes the answer without a model, or when the model's synthesis fails.
    synthesizer: Arc<dyn Synthesizer>,
    /// The `[synthesizer]` model's call, if configured.
    synthesis: Option<PlannedSynthesis>,
}

/// The synthesizer, planned like an agent.
#[derive(Debug)]
struct PlannedSynthesis {
    agent: PlannedAgent,
    /// Kept back from the fan-out for the synthesis.
    reserve: Duration,
    /// The agent whose provider and model take over when its call fails.
    fallback: Option<usize>,
}

/// An agent with its provider resolved.
#[derive(Debug)]
struct PlannedAgent {
    config: AgentConfig,
    provider: Arc<dyn Provider>,
    policy: Arc<CallPolicy>,
    breaker: Arc<CircuitBreaker>,
    budget: Arc<RetryBudget>,
    lane: Arc<FlowLane>,
    /// The response cache, when this agent is cached.
    cache: Option<TaskCache>,
}

impl Orchestrator {
    /// Starts building an orchestrator; with nothing else set it uses the embedded
    /// default config (six agents on `sim`).
    pub fn builder() -> OrchestratorBuilder {
        OrchestratorBuilder::default()
    }

    /// The agents that run on every request, in the order their outcomes are
    /// reported (standby agents, which run only as fallbacks, are left out).
    pub fn agents(&self) -> impl Iterator<Item = &AgentConfig> {
        self.inner
            .active
            .iter()
            .map(|&i| &self.inner.agents[i].config)
    }

    /// The state of every circuit breaker (one per provider and model).
    pub fn breakers(&self) -> Vec<BreakerSnapshot> {
        self.inner.executor.resilience().breakers()
    }

    /// Every provider and model's flow control, shared by every request.
    pub fn flow(&self) -> &Arc<FlowControl> {
        &self.inner.flow
    }

    /// Every provider and model's flow control state: concurrency limit, calls in
    /// flight and queued, pause, rate limits in force.
    pub fn lanes(&self) -> Vec<LaneSnapshot> {
        self.inner.flow.snapshot()
    }

    /// Sets every documented metric to zero for this orchestrator's agents, providers
    /// and models, so that `/metrics` lists them all before the first request (a no-op
    /// without an installed recorder).
    pub fn prime_metrics(&self) {
        let agents: Vec<(&str, &str, &str)> = self
            .inner
            .agents
            .iter()
            .chain(self.inner.synthesis.as_ref().map(|s| &s.agent))
            .map(|a| {
                (
                    a.config.id.as_str(),
                    a.config.provider.as_str(),
                    a.config.model.as_str(),
                )
            })
            .collect();
        crate::telemetry::metrics::prime(&agents);
        for lane in self.lanes() {
            crate::telemetry::metrics::concurrency_limit(&lane.provider, &lane.model, lane.limit);
        }
    }

    /// The configured deadline of a request that sets none.
    pub fn request_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    /// The executor, whose limiter every request shares.
    pub fn executor(&self) -> &Executor {
        &self.inner.executor
    }

    /// The prices every call is costed at: the built-in table with the config's
    /// `[prices]` over it. A step that makes a call of its own (an LLM synthesis)
    /// prices it here, so that the request's total covers it.
    pub fn prices(&self) -> &Arc<PriceTable> {
        self.inner.executor.prices()
    }

    /// Answers `query` with a new trace id and the configured deadline.
    pub async fn process(&self, query: &str) -> Result<Response, RequestError> {
        self.process_request(Request::new(query)).await
    }

    /// Answers a request. Fails only on a request that cannot be run at all (an empty
    /// query); agent failures are reported in the response's outcomes.
    pub async fn process_request(&self, request: Request) -> Result<Response, RequestError> {
        request.validate()?;
        let selected = self.select(request.agents.as_deref())?;
        let trace_id = request.trace_id.unwrap_or_else(TraceId::random);
        let request_id = request.request_id.unwrap_or_else(RequestId::random);
        // ERROR level, so the span (and the ids it carries) is enabled whenever any
        // event is: a `warn` filter must still tie each warning to its request.
        let span = tracing::error_span!("request", trace_id = %trace_id, request_id = %request_id);
        crate::telemetry::otel::adopt_trace_id(&span, trace_id, request.parent_span);
        Ok(self
            .run(request, trace_id, request_id, selected)
            .instrument(span)
            .await)
    }

    /// Checks a request without running it: what [`Orchestrator::process_request`]
    /// would refuse (an empty query, a zero timeout, unknown agents).
    pub fn check(&self, request: &Request) -> Result<(), RequestError> {
        request.validate()?;
        self.select(request.agents.as_deref()).map(drop)
    }

    /// The indexes of the agents a request runs: the ones it names (in config order),
    /// or every active one.
    fn select(&self, ids: Option<&[String]>) -> Result<Vec<usize>, RequestError> {
        let inner = &*self.inner;
        let Some(ids) = ids else {
            return Ok(inner.active.clone());
        };
        if ids.is_empty() {
            return Err(RequestError::NoAgents);
        }
        for id in ids {
            if !inner
                .active
                .iter()
                .any(|&i| &inner.agents[i].config.id == id)
            {
                let known: Vec<&str> = self.agents().map(|a| a.id.as_str()).collect();
                return Err(RequestError::UnknownAgent {
                    agent: id.clone(),
                    known: known.join(", "),
                });
            }
        }
        Ok(inner
            .active
            .iter()
            .copied()
            .filter(|&i| ids.contains(&inner.agents[i].config.id))
            .collect())
    }

    async fn run(
        &self,
        request: Request,
        trace_id: TraceId,
        request_id: RequestId,
        selected: Vec<usize>,
    ) -> Response {
        let inner = &*self.inner;
        let started = Instant::now();
        let timeout = request.timeout.unwrap_or(inner.request_timeout);
        let deadline = crate::time::later(started, timeout);
        tracing::info!(
            event = "request.start",
            agents = selected.len(),
            query_chars = request.query.chars().count(),
            timeout_ms = millis(timeout),
            concurrency_limit = inner.executor.limiter().limit(),
            "request started"
        );

        // The synthesis's reserve comes off the fan-out's deadline (never more than
        // half of a short one), so slow agents are cut in time for it.
        let fan_out_deadline = match &inner.synthesis {
            Some(s) => deadline
                .checked_sub(s.reserve.min(timeout / 2))
                .unwrap_or(deadline),
            None => deadline,
        };
        let tasks = selected
            .iter()
            .map(|&i| plan(&inner.agents, i, &request, trace_id, 0))
            .collect();
        let outcomes = inner
            .executor
            .run_observed(
                tasks,
                fan_out_deadline,
                &request.cancel,
                request.events.clone(),
            )
            .await;

        let configs: Vec<&AgentConfig> =
            selected.iter().map(|&i| &inner.agents[i].config).collect();
        let min_successes = inner.min_successes.min(outcomes.len());
        let (answer, synthesis) = match &inner.synthesis {
            // Boxed: inline, the synthesis's state would make every request's
            // future larger for the whole fan-out, which comes first.
            Some(planned) => {
                Box::pin(
                    self.synthesize(planned, &request, trace_id, &configs, &outcomes, deadline),
                )
                .await
            }
            None => (
                inner
                    .synthesizer
                    .synthesize(&request.query, &configs, &outcomes)
                    .await,
                Synthesis::Concat(ConcatTag),
            ),
        };

        let summary = Summary::of(&outcomes, min_successes);
        let mut usage = RequestUsage::default();
        for o in &outcomes {
            usage.add(&o.usage, o.cost_usd);
        }
        if let Some(report) = synthesis.report() {
            usage.add(&report.usage, report.cost_usd);
        }
        let timings = Timings {
            total: started.elapsed(),
            slowest_agent: outcomes.iter().map(|o| o.latency).max().unwrap_or_default(),
            sum_of_agents: outcomes.iter().map(|o| o.latency).sum(),
            synthesis: synthesis.report().map(|r| r.latency),
        };
        let ok = summary.succeeded >= summary.min_successes;
        // Cancelled: the caller went away or the server stopped waiting. The outcomes
        // were still logged, each ending `cancelled`.
        let status = if request.cancel.is_cancelled() {
            "cancelled"
        } else if ok {
            "ok"
        } else {
            "failed"
        };
        crate::telemetry::metrics::request_finished(status, timings.total);
        tracing::info!(
            event = "request.finish",
            status,
            ok,
            succeeded = summary.succeeded,
            failed = summary.failed,
            timed_out = summary.timed_out,
            duration_ms = millis(timings.total),
            input_tokens = usage.input_tokens,
            output_tokens = usage.output_tokens,
            cost_usd = usage.cost_usd.map(crate::cost::round_usd),
            "request finished: {}/{} agents succeeded",
            summary.succeeded,
            outcomes.len()
        );
        let breakers = inner
            .agents
            .iter()
            .filter(|a| a.breaker.state() != BreakerState::Closed)
            .map(|a| a.breaker.snapshot())
            .fold(Vec::<BreakerSnapshot>::new(), |mut seen, b| {
                if !seen
                    .iter()
                    .any(|s| s.provider == b.provider && s.model == b.model)
                {
                    seen.push(b);
                }
                seen
            });
        Response {
            trace_id,
            request_id,
            query: request.query,
            answer,
            ok,
            summary,
            outcomes,
            synthesis,
            usage,
            timings,
            breakers,
        }
    }
}

/// Agent `index`'s task for this request, with its chain of fallbacks. Config
/// validation rules out loops; `depth` stops one anyway.
fn plan(
    agents: &[PlannedAgent],
    index: usize,
    request: &Request,
    trace_id: TraceId,
    depth: usize,
) -> AgentTask {
    let agent = &agents[index];
    let config = &agent.config;
    let mut task = agent_task(
        agent,
        agent_request(
            config,
            request,
            trace_id,
            config.prompt.render(&request.query),
        ),
    );
    let fallback = match &config.fallback {
        Some(FallbackConfig::Text(text)) => Some(Fallback::Text(text.clone())),
        Some(FallbackConfig::Agent(id)) if depth < agents.len() => agents
            .iter()
            .position(|a| &a.config.id == id)
            .map(|i| Fallback::Agent(Box::new(plan(agents, i, request, trace_id, depth + 1)))),
        _ => None,
    };
    if let Some(fallback) = fallback {
        task = task.with_fallback(fallback);
    }
    task
}

/// What `config`'s agent sends for `request`: its model, system prompt (with the
/// conversation's instructions), the conversation, `prompt`, and its own settings.
fn agent_request(
    config: &AgentConfig,
    request: &Request,
    trace_id: TraceId,
    prompt: String,
) -> CompletionRequest {
    CompletionRequest {
        model: config.model.clone(),
        system: system_prompt(config.system.as_deref(), request.context.as_deref()),
        history: Arc::clone(&request.history),
        prompt,
        max_tokens: config.max_tokens,
        temperature: config.temperature,
        stop_sequences: config.stop_sequences.clone(),
        stream: config.stream,
        prompt_cache: config.prompt_cache,
        deltas: None,
        meta: RequestMeta {
            trace_id: trace_id.to_string(),
            agent_id: config.id.clone(),
            attempt: 0,
        },
    }
}

/// A planned agent's call of `request`, with its policy, breaker, budget and lane.
fn agent_task(agent: &PlannedAgent, request: CompletionRequest) -> AgentTask {
    let task = AgentTask::new(
        agent.config.id.clone(),
        agent.config.provider.clone(),
        Arc::clone(&agent.provider),
        request,
    )
    .with_policy(Arc::clone(&agent.policy))
    .with_breaker(Arc::clone(&agent.breaker))
    .with_budget(Arc::clone(&agent.budget))
    .with_lane(Arc::clone(&agent.lane));
    match &agent.cache {
        Some(cache) => task.with_cache(cache.clone()),
        None => task,
    }
}

/// An agent's system prompt followed by the conversation's instructions.
fn system_prompt(own: Option<&str>, context: Option<&str>) -> Option<String> {
    match (own, context) {
        (Some(own), Some(context)) => Some(format!("{own}\n\n{context}")),
        (own, context) => own.or(context).map(str::to_owned),
    }
}

impl Orchestrator {
    /// The synthesizer's call after the fan-out, when enough agents succeeded: the
    /// answer and its report. A failed, cut or skipped synthesis falls back to the
    /// configured strategy (the concatenation) and says why.
    async fn synthesize(
        &self,
        planned: &PlannedSynthesis,
        request: &Request,
        trace_id: TraceId,
        configs: &[&AgentConfig],
        outcomes: &[AgentOutcome],
        deadline: Instant,
    ) -> (String, Synthesis) {
        let inner = &*self.inner;
        let concat = || {
            inner
                .synthesizer
                .synthesize(&request.query, configs, outcomes)
        };
        let config = &planned.agent.config;
        let succeeded = outcomes.iter().filter(|o| o.succeeded()).count();
        let needed = inner.min_successes.min(outcomes.len()).max(1);
        let skipped = if request.cancel.is_cancelled() {
            Some("the request was cancelled before the synthesis".to_owned())
        } else if succeeded < needed {
            Some(format!(
                "{succeeded} of {} agents succeeded, fewer than the {needed} the synthesis needs (min_successes)",
                outcomes.len()
            ))
        } else {
            None
        };
        if let Some(reason) = skipped {
            tracing::warn!(
                event = "synthesis.skipped",
                provider = %config.provider,
                model = %config.model,
                reason = %reason,
                "synthesis skipped: {reason}; the answer is the replies laid end to end"
            );
            crate::telemetry::metrics::synthesis_finished("skipped");
            let report = SynthesisReport::skipped(config, reason);
            return (concat().await, Synthesis::Model(Box::new(report)));
        }

        let mut task = synthesis_task(planned, &inner.agents, request, trace_id, configs, outcomes);
        if let Some(events) = &request.events {
            let _ = events.send(AgentEvent::SynthesisStart {
                provider: config.provider.clone(),
                model: config.model.clone(),
            });
            if config.stream {
                let events = events.clone();
                let sink = DeltaSink::new(move |delta| {
                    let _ = events.send(AgentEvent::SynthesisDelta {
                        attempt: delta.attempt,
                        model: delta.model.to_owned(),
                        text: delta.text.to_owned(),
                    });
                });
                set_deltas(&mut task, &sink);
            }
        }
        let outcome = inner
            .executor
            .run(vec![task], deadline, &request.cancel)
            .await
            .pop()
            .expect("the executor returns one outcome per task");
        let (text, report) = SynthesisReport::of(outcome);
        crate::telemetry::metrics::synthesis_finished(report.status.as_str());
        let answer = match text {
            Some(text) => text,
            None => concat().await,
        };
        (answer, Synthesis::Model(Box::new(report)))
    }
}

/// The synthesizer's task: its prompt with the query and the rendered replies, the
/// conversation, the caller's settings; its fallback agent (and that one's chain)
/// with the same request on their own provider and model.
fn synthesis_task(
    planned: &PlannedSynthesis,
    agents: &[PlannedAgent],
    request: &Request,
    trace_id: TraceId,
    configs: &[&AgentConfig],
    outcomes: &[AgentOutcome],
) -> AgentTask {
    let agent = &planned.agent;
    let config = &agent.config;
    let params = &request.synthesis;
    let prompt = config
        .prompt
        .fill(&request.query, &render_replies(configs, outcomes));
    let rendered = CompletionRequest {
        max_tokens: params.max_tokens.unwrap_or(config.max_tokens),
        temperature: params.temperature.or(config.temperature),
        stop_sequences: params
            .stop
            .clone()
            .unwrap_or_else(|| config.stop_sequences.clone()),
        ..agent_request(config, request, trace_id, prompt)
    };
    let mut task = agent_task(agent, rendered.clone()).with_kind(TaskKind::Synthesis);
    if let Some(index) = planned.fallback {
        let mut fallback = plan(agents, index, request, trace_id, 0);
        retarget(&mut fallback, &rendered);
        task = task.with_fallback(Fallback::Agent(Box::new(fallback)));
    }
    task
}

/// Gives a fallback chain the synthesizer's request on each link's own model; a text
/// fallback has no place in a synthesis (the concatenation stands in) and is dropped.
fn retarget(task: &mut AgentTask, rendered: &CompletionRequest) {
    let model = std::mem::take(&mut task.request.model);
    let meta = std::mem::take(&mut task.request.meta);
    task.request = CompletionRequest {
        model,
        meta,
        ..rendered.clone()
    };
    task.kind = TaskKind::Synthesis;
    match &mut task.fallback {
        Some(Fallback::Agent(next)) => retarget(next, rendered),
        Some(Fallback::Text(_)) => task.fallback = None,
        None => {}
    }
}

/// Sends the streamed text of every call in a task's chain to `sink`.
fn set_deltas(task: &mut AgentTask, sink: &DeltaSink) {
    task.request.deltas = Some(sink.clone());
    if let Some(Fallback::Agent(next)) = &mut task.fallback {
        set_deltas(next, sink);
    }
}
