//! `Response`: what a request produced — the answer, every agent's outcome, tokens,
//! US dollars and timings, under the request's trace id.

use std::time::Duration;

use serde::Serialize;

use super::Synthesis;
use crate::executor::{AgentOutcome, OutcomeStatus};
use crate::provider::Usage;
use crate::resilience::BreakerSnapshot;
use crate::telemetry::{RequestId, TraceId};
use crate::time::as_millis;

/// The result of one request.
#[derive(Debug, Clone, Serialize)]
pub struct Response {
    /// The request's trace id; every log line of the request carries it.
    pub trace_id: TraceId,
    /// The request's own id: requests that share a trace id (one caller's
    /// `traceparent`) are told apart by it. Every log line of the request carries it.
    pub request_id: RequestId,
    /// The query as asked.
    pub query: String,
    /// The answer: the synthesizer's, or the replies laid end to end.
    pub answer: String,
    /// Whether at least `min_successes` agents succeeded.
    pub ok: bool,
    /// Counts of outcomes by status, and the bar the request had to meet.
    pub summary: Summary,
    /// One outcome per agent, in config order.
    pub outcomes: Vec<AgentOutcome>,
    /// How the answer was made: `"concat"`, or what the synthesizer's call did.
    pub synthesis: Synthesis,
    /// Tokens and US dollars summed over every call of the request, the synthesis's
    /// included.
    pub usage: RequestUsage,
    /// Where the time went.
    pub timings: Timings,
    /// The circuit breakers of this request's providers that were open or half-open
    /// when it finished (breakers are shared by every request of the process).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub breakers: Vec<BreakerSnapshot>,
}

/// A request's tokens, summed over its calls as [`Usage`] counts them, and what they
/// cost in US dollars.
///
/// ```
/// use metaorch::orchestrator::RequestUsage;
/// use metaorch::provider::Usage;
///
/// let mut total = RequestUsage::default();
/// total.add(&Usage { input_tokens: 10, output_tokens: 5, ..Usage::default() }, Some(0.25));
/// total.add(&Usage { input_tokens: 1, ..Usage::default() }, Some(0.5));
/// assert_eq!((total.input_tokens, total.cost_usd), (11, Some(0.75)));
/// total.add(&Usage::default(), None);
/// assert_eq!(total.cost_usd, None, "one unknown part makes the total unknown");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RequestUsage {
    /// Input tokens, the prompt cache's parts aside.
    pub input_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
    /// Input tokens written to a prompt cache.
    #[serde(skip_serializing_if = "is_zero")]
    pub cache_creation_input_tokens: u64,
    /// Input tokens read from a prompt cache.
    #[serde(skip_serializing_if = "is_zero")]
    pub cache_read_input_tokens: u64,
    /// What the calls cost in US dollars; `None` (`null`) when a part of it is unknown
    /// (a call to a model without a price).
    #[serde(serialize_with = "crate::cost::as_usd")]
    pub cost_usd: Option<f64>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Default for RequestUsage {
    /// Nothing used, nothing spent.
    fn default() -> Self {
        RequestUsage {
            input_tokens: 0,
            output_tokens: 0,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: 0,
            cost_usd: Some(0.0),
        }
    }
}

impl RequestUsage {
    /// Adds one part: its tokens and its cost (`None` when unknown).
    pub fn add(&mut self, usage: &Usage, cost_usd: Option<f64>) {
        let mut tokens = self.tokens();
        tokens += *usage;
        *self = RequestUsage {
            input_tokens: tokens.input_tokens,
            output_tokens: tokens.output_tokens,
            cache_creation_input_tokens: tokens.cache_creation_input_tokens,
            cache_read_input_tokens: tokens.cache_read_input_tokens,
            cost_usd: crate::cost::sum([self.cost_usd, cost_usd]),
        };
    }

    /// The token counts alone.
    pub fn tokens(&self) -> Usage {
        Usage {
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            cache_creation_input_tokens: self.cache_creation_input_tokens,
            cache_read_input_tokens: self.cache_read_input_tokens,
        }
    }

    /// Input and output tokens together, saturating (see [`Usage::total_tokens`]).
    pub fn total_tokens(&self) -> u64 {
        self.tokens().total_tokens()
    }
}

/// Outcome counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Agents that produced output.
    pub succeeded: usize,
    /// Agents whose call failed.
    pub failed: usize,
    /// Agents cut off by the deadline or a cancellation.
    pub timed_out: usize,
    /// Agents that had to succeed for the request to count as answered.
    pub min_successes: usize,
}

impl Summary {
    pub(crate) fn of(outcomes: &[AgentOutcome], min_successes: usize) -> Summary {
        let count = |s| outcomes.iter().filter(|o| o.status == s).count();
        Summary {
            succeeded: count(OutcomeStatus::Succeeded),
            failed: count(OutcomeStatus::Failed),
            timed_out: count(OutcomeStatus::TimedOut),
            min_successes,
        }
    }
}

/// Where a request's time went.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Timings {
    /// Wall time from the request's start to its answer.
    #[serde(rename = "total_ms", serialize_with = "as_millis")]
    pub total: Duration,
    /// The slowest agent's latency: what the request had to wait for.
    #[serde(rename = "slowest_agent_ms", serialize_with = "as_millis")]
    pub slowest_agent: Duration,
    /// All agents' latencies added up: what running them one after another would take.
    #[serde(rename = "sum_of_agents_ms", serialize_with = "as_millis")]
    pub sum_of_agents: Duration,
    /// The synthesizer's call, when one ran.
    #[serde(
        rename = "synthesis_ms",
        serialize_with = "as_millis_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub synthesis: Option<Duration>,
}

fn as_millis_opt<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => as_millis(d, s),
        None => s.serialize_none(),
    }
}

impl Response {
    /// The outcome of the agent with this id.
    pub fn outcome(&self, agent_id: &str) -> Option<&AgentOutcome> {
        self.outcomes.iter().find(|o| o.agent_id == agent_id)
    }
}
