//! The vocabulary of outcomes, spoken by every layer from the resilience policy up:
//! `AgentOutcome` (what became of one agent's task — exactly one per agent), its
//! status and failure kinds, fallbacks, and the retries a call made. It sits below the
//! layers that produce and read it, so that none of them imports another to name it.

use std::fmt;
use std::time::Duration;

use serde::{Serialize, Serializer};

use crate::provider::{ErrorKind, ProviderError, Usage};
use crate::time::as_millis;

/// How an agent's task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeStatus {
    /// The agent produced output.
    Succeeded,
    /// The agent's call failed (or its task panicked).
    Failed,
    /// The request's deadline passed, or the request was cancelled, before it finished.
    TimedOut,
}

impl OutcomeStatus {
    /// The stable snake_case name used in output and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeStatus::Succeeded => "succeeded",
            OutcomeStatus::Failed => "failed",
            OutcomeStatus::TimedOut => "timed_out",
        }
    }
}

impl fmt::Display for OutcomeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an agent did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The provider call failed, classified.
    Provider(ErrorKind),
    /// The request deadline passed before the agent finished.
    DeadlineExceeded,
    /// The request deadline came while the call waited to be let through (a pause, a
    /// rate limit, every slot of its provider taken): it was never sent.
    DeadlineInQueue,
    /// The request was cancelled (its caller went away or asked to stop).
    Cancelled,
    /// The agent's task panicked; the panic was contained.
    Panicked,
    /// The provider's circuit breaker was open: no call was made.
    CircuitOpen,
    /// A retry was due but the process-wide retry budget was spent.
    RetryBudgetExhausted,
}

impl FailureKind {
    /// The stable snake_case name used in output and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Provider(kind) => kind.as_str(),
            FailureKind::DeadlineExceeded => "deadline_exceeded",
            FailureKind::DeadlineInQueue => "deadline_in_queue",
            FailureKind::Cancelled => "cancelled",
            FailureKind::Panicked => "panicked",
            FailureKind::CircuitOpen => "circuit_open",
            FailureKind::RetryBudgetExhausted => "retry_budget_exhausted",
        }
    }

    /// The status an outcome that ended this way has: `timed_out` for the deadline
    /// and cancellation, `failed` for the rest.
    pub fn status(self) -> OutcomeStatus {
        match self {
            FailureKind::DeadlineExceeded
            | FailureKind::DeadlineInQueue
            | FailureKind::Cancelled => OutcomeStatus::TimedOut,
            _ => OutcomeStatus::Failed,
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for FailureKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The error part of a failed or timed-out outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutcomeError {
    /// The class of failure.
    pub kind: FailureKind,
    /// The HTTP status of the last failed attempt, if there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// A human-readable explanation.
    pub message: String,
}

impl From<ProviderError> for OutcomeError {
    fn from(e: ProviderError) -> Self {
        OutcomeError {
            kind: FailureKind::Provider(e.kind),
            status: e.status,
            message: e.message,
        }
    }
}

impl fmt::Display for OutcomeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(status) = self.status {
            write!(f, " (HTTP {status})")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What became of one agent's task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentOutcome {
    /// The agent's id from the config.
    pub agent_id: String,
    /// The provider's name from the config.
    pub provider: String,
    /// The model the agent asked for.
    pub model: String,
    /// How the task ended.
    pub status: OutcomeStatus,
    /// The agent's reply, when it succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Why generation stopped, as the provider said it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    /// Why it did not succeed, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<OutcomeError>,
    /// Provider calls started, fallback agent's included (0 if it never got past the
    /// limiter).
    pub attempts: u32,
    /// Each retry: the failed attempt, its error, and the wait before the next.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retries: Vec<RetryRecord>,
    /// Set when a fallback produced (or tried to produce) the result.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackRecord>,
    /// From dispatch to finish, limiter wait included.
    #[serde(rename = "latency_ms", serialize_with = "as_millis")]
    pub latency: Duration,
    /// Time spent waiting to be let through: flow control (a provider's pause, its
    /// rate limits, its concurrency limit) and the process-wide concurrency limit.
    #[serde(rename = "queue_ms", serialize_with = "as_millis")]
    pub queue_wait: Duration,
    /// The part of `queue_wait` spent behind a provider's pause (`Retry-After`).
    #[serde(
        rename = "pause_ms",
        serialize_with = "as_millis",
        skip_serializing_if = "Duration::is_zero"
    )]
    pub paused: Duration,
    /// Time inside provider calls, as the provider measured it.
    #[serde(rename = "provider_ms", serialize_with = "as_millis")]
    pub provider_latency: Duration,
    /// Tokens used by this agent's calls.
    pub usage: Usage,
    /// What this agent's calls cost in US dollars: each call that returned a reply,
    /// priced by the model it used (the agent's, or its fallback agent's). `None`
    /// (`null`) when one of those models has no known price; failed calls report no
    /// usage, so an outcome without a reply costs 0, or `None` if its model has no
    /// known price.
    #[serde(serialize_with = "crate::cost::as_usd")]
    pub cost_usd: Option<f64>,
    /// The reply came from the response cache (or an identical call in flight): no
    /// upstream call, no tokens, no cost.
    pub cached: bool,
}

/// What a fallback did for an agent whose own call failed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FallbackRecord {
    /// `text` (a static reply) or `agent` (another agent's call).
    pub source: FallbackSource,
    /// The fallback agent, when the source is an agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The fallback agent's provider and model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The fallback agent's model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Why the agent's own call failed.
    pub primary_error: OutcomeError,
}

/// Where a fallback's reply comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackSource {
    /// A static reply from the config.
    Text,
    /// Another agent (a different model or provider).
    Agent,
}

impl FallbackSource {
    /// The stable snake_case name used in output and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackSource::Text => "text",
            FallbackSource::Agent => "agent",
        }
    }
}

impl AgentOutcome {
    /// True when the agent produced output.
    pub fn succeeded(&self) -> bool {
        self.status == OutcomeStatus::Succeeded
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
    /// The model the attempt asked for: the agent's, or its fallback's.
    pub model: String,
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
