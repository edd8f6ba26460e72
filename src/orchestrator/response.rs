//! `Response`: what a request produced — the answer, every agent's outcome, tokens
//! and timings, under the request's trace id.

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
    /// Tokens summed over every call of the request, the synthesis's included.
    pub usage: Usage,
    /// Where the time went.
    pub timings: Timings,
    /// The circuit breakers of this request's providers that were open or half-open
    /// when it finished (breakers are shared by every request of the process).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub breakers: Vec<BreakerSnapshot>,
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
