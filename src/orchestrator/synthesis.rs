//! Synthesis: turning the agents' outcomes into one answer.
//!
//! [`Synthesizer`] is a trait so that an LLM-backed strategy (an `agent` synthesizer
//! that asks a model to merge the replies) can replace [`Concat`] without the
//! orchestrator changing.

use std::fmt::Write as _;

use async_trait::async_trait;

use crate::config::AgentConfig;
use crate::executor::AgentOutcome;

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
