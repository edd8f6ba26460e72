//! `OrchestratorBuilder`: assembles an orchestrator from a config, with providers,
//! limiter and synthesizer replaceable for embedding and tests.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Concat, Inner, Orchestrator, PlannedAgent, Synthesizer};
use crate::config::{Config, ProviderConfig};
use crate::executor::Executor;
use crate::limits::{ConcurrencyLimit, Limiter};
use crate::provider::{Provider, SimProvider};
use crate::resilience::Resilience;

/// Builds an [`Orchestrator`]. See [`Orchestrator::builder`].
#[derive(Debug, Default)]
pub struct OrchestratorBuilder {
    config: Option<Config>,
    providers: HashMap<String, Arc<dyn Provider>>,
    limiter: Option<Arc<dyn Limiter>>,
    resilience: Option<Arc<Resilience>>,
    synthesizer: Option<Arc<dyn Synthesizer>>,
}

/// Why an orchestrator could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The config has no agents.
    #[error("no agents are configured; add at least one [[agents]] table")]
    NoAgents,
    /// An agent names a provider that is neither configured nor supplied.
    #[error(
        "agent \"{agent}\" uses provider \"{provider}\", which is not defined; defined: {defined}"
    )]
    UnknownProvider {
        /// The agent's id.
        agent: String,
        /// The missing provider's name.
        provider: String,
        /// The providers that are defined, comma-separated.
        defined: String,
    },
}

impl OrchestratorBuilder {
    /// Uses this config (agents, providers, limits). Default: [`Config::embedded`].
    pub fn config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    /// Uses `provider` for every agent whose `provider` is `name`, instead of building
    /// one from the config. This is how an embedder plugs in its own backend.
    pub fn provider(mut self, name: impl Into<String>, provider: Arc<dyn Provider>) -> Self {
        self.providers.insert(name.into(), provider);
        self
    }

    /// Shares `limiter` instead of a new [`ConcurrencyLimit`] of the configured size:
    /// pass the same limiter to several orchestrators that call the same provider key.
    pub fn limiter(mut self, limiter: Arc<dyn Limiter>) -> Self {
        self.limiter = Some(limiter);
        self
    }

    /// Shares `resilience` (retry budget, circuit breakers, jitter source) instead of
    /// new state built from the config: pass the same one to several orchestrators
    /// that call the same providers.
    pub fn resilience(mut self, resilience: Arc<Resilience>) -> Self {
        self.resilience = Some(resilience);
        self
    }

    /// Uses this synthesis strategy instead of [`Concat`].
    pub fn synthesizer(mut self, synthesizer: Arc<dyn Synthesizer>) -> Self {
        self.synthesizer = Some(synthesizer);
        self
    }

    /// Builds the orchestrator.
    pub fn build(self) -> Result<Orchestrator, BuildError> {
        let config = self.config.unwrap_or_else(Config::embedded);
        if config.active_agents().next().is_none() {
            return Err(BuildError::NoAgents);
        }

        let mut providers = self.providers;
        for (name, provider) in &config.providers {
            providers
                .entry(name.clone())
                .or_insert_with(|| build_provider(provider));
        }

        let resilience = self.resilience.unwrap_or_else(|| {
            Arc::new(Resilience::new(
                config.retry_budget.clone(),
                config.breaker.clone(),
                config.seed,
            ))
        });
        let mut agents = Vec::with_capacity(config.agents.len());
        for agent in config.agents {
            let Some(provider) = providers.get(&agent.provider) else {
                let mut defined: Vec<_> = providers.keys().cloned().collect();
                defined.sort();
                return Err(BuildError::UnknownProvider {
                    agent: agent.id,
                    provider: agent.provider,
                    defined: defined.join(", "),
                });
            };
            agents.push(PlannedAgent {
                provider: Arc::clone(provider),
                policy: Arc::new(agent.policy.clone()),
                breaker: resilience.breaker(&agent.provider, &agent.model),
                config: agent,
            });
        }

        let limiter = self
            .limiter
            .unwrap_or_else(|| Arc::new(ConcurrencyLimit::new(config.concurrency_limit)));
        Ok(Orchestrator {
            inner: Arc::new(Inner {
                active: agents
                    .iter()
                    .enumerate()
                    .filter(|(_, a)| !a.config.standby)
                    .map(|(i, _)| i)
                    .collect(),
                agents,
                executor: Executor::with_resilience(limiter, resilience),
                request_timeout: config.request_timeout,
                min_successes: config.min_successes,
                synthesizer: self.synthesizer.unwrap_or_else(|| Arc::new(Concat)),
            }),
        })
    }
}

fn build_provider(config: &ProviderConfig) -> Arc<dyn Provider> {
    match config {
        ProviderConfig::Sim(options) => Arc::new(SimProvider::new(options.clone())),
    }
}
