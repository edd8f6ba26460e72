//! Synthesis: turning the agents' outcomes into one answer.
//!
//! With `[synthesizer]` configured, a model merges the replies: its call is one more
//! task through the executor (limits, breaker, retry, budget, fallback model) after
//! the fan-out, and [`SynthesisReport`] says what it did. Without it, or when that
//! call fails, a [`Synthesizer`] strategy makes the answer: [`Concat`] unless the
//! builder was given another.

use std::fmt::Write as _;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::config::AgentConfig;
use crate::executor::AgentOutcome;
use crate::outcome::{FallbackRecord, OutcomeError, OutcomeStatus, RetryRecord};
use crate::provider::Usage;
use crate::time::as_millis;

/// Merges outcomes into one answer.
#[async_trait]
pub trait Synthesizer: Send + Sync + std::fmt::Debug {
    /// `agents` and `outcomes` are parallel: `outcomes[i]` is `agents[i]`'s.
    async fn synthesize(
        &self,
        query: &str,
        agents: &[&AgentConfig],
        outcomes: &[AgentOutcome],
    ) -> String;
}

/// The `concat` strategy: each successful agent's reply under its role, in config
/// order, then the agents that failed and why.
#[derive(Debug, Clone, Copy, Default)]
pub struct Concat;

#[async_trait]
impl Synthesizer for Concat {
    async fn synthesize(
        &self,
        _query: &str,
        agents: &[&AgentConfig],
        outcomes: &[AgentOutcome],
    ) -> String {
        let succeeded = outcomes.iter().filter(|o| o.succeeded()).count();
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "Synthesized from {succeeded} of {} agents.",
            outcomes.len()
        );
        for (agent, outcome) in agents.iter().zip(outcomes) {
            if let Some(text) = outcome.output.as_deref().filter(|_| outcome.succeeded()) {
                let _ = write!(out, "\n## {} ({})\n{}\n", agent.role, agent.id, text.trim());
            }
        }
        let missing: Vec<_> = agents
            .iter()
            .zip(outcomes)
            .filter(|(_, o)| !o.succeeded())
            .collect();
        if !missing.is_empty() {
            out.push_str("\n## Not included\n");
            for (agent, outcome) in missing {
                let why = outcome
                    .error
                    .as_ref()
                    .map_or_else(|| "no reason recorded".to_owned(), ToString::to_string);
                let _ = writeln!(
                    out,
                    "- {} ({}): {} — {why}",
                    agent.role, agent.id, outcome.status
                );
            }
        }
        out.truncate(out.trim_end().len());
        out
    }
}

/// How the answer was made, as the response reports it: `"concat"` when no
/// synthesizer is configured, else what the synthesizer's call did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Synthesis {
    /// No `[synthesizer]`: the replies laid end to end (or a custom strategy's answer).
    Concat(ConcatTag),
    /// The synthesizer model's call and what became of it.
    Model(Box<SynthesisReport>),
}

impl Synthesis {
    /// The synthesizer's report, when there is one.
    pub fn report(&self) -> Option<&SynthesisReport> {
        match self {
            Synthesis::Concat(_) => None,
            Synthesis::Model(report) => Some(report),
        }
    }
}

/// Serializes as the string `"concat"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConcatTag;

impl Serialize for ConcatTag {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("concat")
    }
}

/// How the synthesis ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SynthesisStatus {
    /// The model wrote the answer.
    Succeeded,
    /// Its call failed for good; the answer is the concatenation.
    Failed,
    /// The deadline passed or the request was cancelled during it; the answer is the
    /// concatenation.
    TimedOut,
    /// It never ran: too few agents succeeded, or the request was cancelled first.
    Skipped,
}

impl SynthesisStatus {
    /// The stable snake_case name used in output and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SynthesisStatus::Succeeded => "succeeded",
            SynthesisStatus::Failed => "failed",
            SynthesisStatus::TimedOut => "timed_out",
            SynthesisStatus::Skipped => "skipped",
        }
    }
}

/// What the synthesizer's call did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SynthesisReport {
    /// How it ended.
    pub status: SynthesisStatus,
    /// The synthesizer's provider (its configured name).
    pub provider: String,
    /// The synthesizer's model.
    pub model: String,
    /// `concat` when the answer is the replies laid end to end instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<&'static str>,
    /// Why it did not write the answer, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Its call's error, when it failed or timed out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<OutcomeError>,
    /// Why the model stopped (`end_turn`, `max_tokens`, `stop`, `length`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    /// Provider calls made (its fallback model's included).
    pub attempts: u32,
    /// Each retry.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retries: Vec<RetryRecord>,
    /// Set when its fallback agent's provider and model took over.
    #[serde(rename = "model_fallback", skip_serializing_if = "Option::is_none")]
    pub model_fallback: Option<FallbackRecord>,
    /// From its start to its end, waits included.
    #[serde(rename = "latency_ms", serialize_with = "as_millis")]
    pub latency: Duration,
    /// Time waiting to be let through (flow control, concurrency slots).
    #[serde(rename = "queue_ms", serialize_with = "as_millis")]
    pub queue_wait: Duration,
    /// Time inside provider calls.
    #[serde(rename = "provider_ms", serialize_with = "as_millis")]
    pub provider_latency: Duration,
    /// Its tokens (also counted in the response's total).
    pub usage: Usage,
    /// What its calls cost in US dollars (also in the response's total); `null` when
    /// its model has no known price.
    #[serde(serialize_with = "crate::cost::as_usd")]
    pub cost_usd: Option<f64>,
}

impl SynthesisReport {
    /// The report of a synthesis that never ran.
    pub(crate) fn skipped(agent: &AgentConfig, reason: String) -> Self {
        SynthesisReport {
            status: SynthesisStatus::Skipped,
            provider: agent.provider.clone(),
            model: agent.model.clone(),
            fallback: Some("concat"),
            reason: Some(reason),
            error: None,
            stop_reason: None,
            attempts: 0,
            retries: Vec::new(),
            model_fallback: None,
            latency: Duration::ZERO,
            queue_wait: Duration::ZERO,
            provider_latency: Duration::ZERO,
            usage: Usage::default(),
            // No call was made.
            cost_usd: Some(0.0),
        }
    }

    /// The report of the synthesizer's call; the answer is its output when it succeeded.
    pub(crate) fn of(outcome: AgentOutcome) -> (Option<String>, Self) {
        let status = match outcome.status {
            OutcomeStatus::Succeeded => SynthesisStatus::Succeeded,
            OutcomeStatus::Failed => SynthesisStatus::Failed,
            OutcomeStatus::TimedOut => SynthesisStatus::TimedOut,
        };
        let failed = status != SynthesisStatus::Succeeded;
        let report = SynthesisReport {
            status,
            provider: outcome.provider,
            model: outcome.model,
            fallback: failed.then_some("concat"),
            reason: outcome
                .error
                .as_ref()
                .map(|e| format!("the synthesis {}: {e}", status.as_str())),
            error: outcome.error,
            stop_reason: outcome.stop_reason,
            attempts: outcome.attempts,
            retries: outcome.retries,
            model_fallback: outcome.fallback,
            latency: outcome.latency,
            queue_wait: outcome.queue_wait,
            provider_latency: outcome.provider_latency,
            usage: outcome.usage,
            cost_usd: outcome.cost_usd,
        };
        (outcome.output.filter(|_| !failed), report)
    }
}

/// The agents' replies as the synthesizer's prompt holds them: each success in a
/// `<reply>` element with its agent's id and role, each failure in a `<missing>` one
/// saying why.
pub fn render_replies(agents: &[&AgentConfig], outcomes: &[AgentOutcome]) -> String {
    let mut out = String::new();
    for (agent, outcome) in agents.iter().zip(outcomes) {
        if !out.is_empty() {
            out.push_str("\n\n");
        }
        match outcome.output.as_deref().filter(|_| outcome.succeeded()) {
            Some(text) => {
                let _ = write!(
                    out,
                    "<reply agent=\"{}\" role=\"{}\">\n{}\n</reply>",
                    agent.id,
                    agent.role,
                    text.trim()
                );
            }
            None => {
                let why = outcome
                    .error
                    .as_ref()
                    .map_or_else(|| outcome.status.to_string(), |e| e.kind.to_string());
                let _ = write!(
                    out,
                    "<missing agent=\"{}\" role=\"{}\">no reply: {why}</missing>",
                    agent.id, agent.role
                );
            }
        }
    }
    out
}
