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
use crate::executor::{AgentTask, Executor, Fallback};
use crate::limits::{FlowControl, FlowLane, LaneSnapshot};
use crate::provider::{CompletionRequest, Provider, RequestMeta};
use crate::resilience::{BreakerSnapshot, BreakerState, CallPolicy, CircuitBreaker, RetryBudget};
use crate::telemetry::{RequestId, TraceId};
use crate::time::millis;

pub use builder::{BuildError, OrchestratorBuilder};
pub use request::{Request, RequestError};
pub use response::{RequestUsage, Response, Summary, Timings};
pub use synthesis::{Concat, Synthesizer};

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
    synthesizer: Arc<dyn Synthesizer>,
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

        let tasks = selected
            .iter()
            .map(|&i| plan(&inner.agents, i, &request.query, trace_id, 0))
            .collect();
        let outcomes = inner
            .executor
            .run_observed(tasks, deadline, &request.cancel, request.events.clone())
            .await;

        let configs: Vec<&AgentConfig> =
            selected.iter().map(|&i| &inner.agents[i].config).collect();
        let answer = inner
            .synthesizer
            .synthesize(&request.query, &configs, &outcomes)
            .await;

        let summary = Summary::of(&outcomes, inner.min_successes.min(outcomes.len()));
        let mut usage = RequestUsage::default();
        for o in &outcomes {
            usage.add(&o.usage, o.cost_usd);
        }
        let timings = Timings {
            total: started.elapsed(),
            slowest_agent: outcomes.iter().map(|o| o.latency).max().unwrap_or_default(),
            sum_of_agents: outcomes.iter().map(|o| o.latency).sum(),
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
            usage,
            timings,
            breakers,
        }
    }
}

/// Agent `index`'s task for this query, with its chain of fallbacks. Config
/// validation rules out loops; `depth` stops one anyway.
fn plan(
    agents: &[PlannedAgent],
    index: usize,
    query: &str,
    trace_id: TraceId,
    depth: usize,
) -> AgentTask {
    let agent = &agents[index];
    let config = &agent.config;
    let mut task = AgentTask::new(
        config.id.clone(),
        config.provider.clone(),
        Arc::clone(&agent.provider),
        CompletionRequest {
            model: config.model.clone(),
            system: config.system.clone(),
            prompt: config.prompt.render(query),
            max_tokens: config.max_tokens,
            temperature: config.temperature,
            stop_sequences: config.stop_sequences.clone(),
            stream: config.stream,
            prompt_cache: config.prompt_cache,
            meta: RequestMeta {
                trace_id: trace_id.to_string(),
                agent_id: config.id.clone(),
                attempt: 0,
            },
        },
    )
    .with_policy(Arc::clone(&agent.policy))
    .with_breaker(Arc::clone(&agent.breaker))
    .with_budget(Arc::clone(&agent.budget))
    .with_lane(Arc::clone(&agent.lane));
    let fallback = match &config.fallback {
        Some(FallbackConfig::Text(text)) => Some(Fallback::Text(text.clone())),
        Some(FallbackConfig::Agent(id)) if depth < agents.len() => agents
            .iter()
            .position(|a| &a.config.id == id)
            .map(|i| Fallback::Agent(Box::new(plan(agents, i, query, trace_id, depth + 1)))),
        _ => None,
    };
    if let Some(fallback) = fallback {
        task = task.with_fallback(fallback);
    }
    task
}
