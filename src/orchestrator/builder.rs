//! `OrchestratorBuilder`: assembles an orchestrator from a config, with providers,
//! limiter and synthesizer replaceable for embedding and tests.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Concat, Inner, Orchestrator, PlannedAgent, PlannedSynthesis, Synthesizer};
use crate::cache::{CacheError, CacheStore, MemoryStore, RedisStore, ResponseCache};
use crate::config::{
    AgentConfig, CacheBackend, CacheConfig, Config, FallbackConfig, HttpProviderConfig,
    ProviderConfig,
};
use crate::executor::Executor;
use crate::executor::TaskCache;
use crate::limits::{ConcurrencyLimit, FlowControl, Limiter};
use crate::provider::{
    ANTHROPIC_BASE_URL, AnthropicOptions, AnthropicProvider, OPENAI_BASE_URL, OpenAiOptions,
    OpenAiProvider, Provider, Secret, SimProvider,
};
use crate::resilience::Resilience;

/// Where API keys and base-URL defaults are read from: the process environment,
/// unless the builder is given another source.
type EnvSource = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Builds an [`Orchestrator`]. See [`Orchestrator::builder`].
#[derive(Default)]
pub struct OrchestratorBuilder {
    env: Option<EnvSource>,
    config: Option<Config>,
    providers: HashMap<String, Arc<dyn Provider>>,
    limiter: Option<Arc<dyn Limiter>>,
    resilience: Option<Arc<Resilience>>,
    flow: Option<Arc<FlowControl>>,
    synthesizer: Option<Arc<dyn Synthesizer>>,
    cache_store: Option<Arc<dyn CacheStore>>,
}

/// Why an orchestrator could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The cache's Redis URL cannot be used (never because Redis is down: the store
    /// connects on first use).
    #[error("cache.url cannot be used")]
    CacheUrl(#[source] CacheError),
    /// `[redis] url` cannot be used (never because Redis is down: each lane syncs
    /// on first use, and keeps its local share while Redis cannot be reached).
    #[error("redis.url cannot be used: {0}")]
    RedisUrl(String),
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
    /// A base URL from the environment is not an http(s) URL.
    #[error(
        "provider \"{provider}\": {variable}=\"{value}\" is not an http(s) URL; expected e.g. \"https://api.anthropic.com\" or \"http://127.0.0.1:8081\", or unset it"
    )]
    BadBaseUrl {
        /// The provider's name.
        provider: String,
        /// The variable the URL came from.
        variable: String,
        /// What it held.
        value: String,
    },
    /// A provider needs an API key and its environment variable is not set.
    #[error(
        "provider \"{provider}\" needs an API key: set the environment variable {env} (the config's api_key_env)"
    )]
    MissingApiKey {
        /// The provider's name.
        provider: String,
        /// The environment variable that should hold the key.
        env: String,
    },
}

impl std::fmt::Debug for OrchestratorBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrchestratorBuilder")
            .field("config", &self.config)
            .field("providers", &self.providers)
            .field("limiter", &self.limiter)
            .field("resilience", &self.resilience)
            .field("flow", &self.flow)
            .finish_non_exhaustive()
    }
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

    /// Reads API keys and `ANTHROPIC_BASE_URL` / `OPENAI_BASE_URL` through `env`
    /// instead of the process environment (for embedding and tests).
    pub fn env(mut self, env: impl Fn(&str) -> Option<String> + Send + Sync + 'static) -> Self {
        self.env = Some(Arc::new(env));
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

    /// Shares `flow` (every provider and model's pause, rate limits and adaptive
    /// concurrency) instead of new flow control built from the config: pass the same
    /// one to several orchestrators that call the same provider accounts.
    pub fn flow(mut self, flow: Arc<FlowControl>) -> Self {
        self.flow = Some(flow);
        self
    }

    /// Uses this synthesis strategy instead of [`Concat`].
    pub fn synthesizer(mut self, synthesizer: Arc<dyn Synthesizer>) -> Self {
        self.synthesizer = Some(synthesizer);
        self
    }

    /// Keeps cached replies in `store` instead of the one `[cache]` describes. The
    /// config still says which agents are cached (`[cache] default`, each agent's
    /// `cache`) and for how long: without `[cache]` or an agent's `cache = true`,
    /// nothing is.
    pub fn cache_store(mut self, store: Arc<dyn CacheStore>) -> Self {
        self.cache_store = Some(store);
        self
    }

    /// Builds the orchestrator.
    pub fn build(self) -> Result<Orchestrator, BuildError> {
        let config = self.config.unwrap_or_else(Config::embedded);
        if config.active_agents().next().is_none() {
            return Err(BuildError::NoAgents);
        }

        let env: EnvSource = self
            .env
            .unwrap_or_else(|| Arc::new(|name: &str| std::env::var(name).ok()));
        let mut providers = self.providers;
        // Only the providers some agent uses are built: an unused one needs no key.
        let synthesizer_agent = config.synthesizer.as_ref().map(|s| &s.agent);
        for agent in config.agents.iter().chain(synthesizer_agent) {
            if providers.contains_key(&agent.provider) {
                continue;
            }
            if let Some(provider) = config.providers.get(&agent.provider) {
                let built = build_provider(&agent.provider, provider, &*env)?;
                providers.insert(agent.provider.clone(), built);
            }
        }

        let resilience = self.resilience.unwrap_or_else(|| {
            Arc::new(Resilience::new(
                config.retry_budget.clone(),
                config.breaker.clone(),
                config.seed,
            ))
        });
        let flow = match self.flow {
            Some(flow) => flow,
            None => {
                let flow = FlowControl::new(config.flow.clone(), config.provider_flow.clone());
                Arc::new(match &config.redis {
                    Some(redis) => flow.with_cluster(
                        crate::limits::Cluster::new(redis).map_err(BuildError::RedisUrl)?,
                    ),
                    None => flow,
                })
            }
        };
        let prices = Arc::new(config.price_table());
        let cache = match (self.cache_store, &config.cache) {
            (Some(store), c) => {
                let ttl = c.as_ref().map_or(CacheConfig::DEFAULT_TTL, |c| c.ttl);
                Some(ResponseCache::new(store, ttl))
            }
            (None, Some(c)) => Some(response_cache(c)?),
            (None, None) => None,
        };
        let planned = |agent: AgentConfig| -> Result<PlannedAgent, BuildError> {
            let Some(provider) = providers.get(&agent.provider) else {
                let mut defined: Vec<_> = providers.keys().cloned().collect();
                defined.sort();
                return Err(BuildError::UnknownProvider {
                    agent: agent.id,
                    provider: agent.provider,
                    defined: defined.join(", "),
                });
            };
            Ok(PlannedAgent {
                provider: Arc::clone(provider),
                policy: Arc::new(agent.policy.clone()),
                breaker: resilience.breaker(&agent.provider, &agent.model),
                budget: resilience.budget(&agent.provider, &agent.model),
                lane: flow.lane(&agent.provider, &agent.model),
                cache: cache
                    .as_ref()
                    .filter(|_| agent.cache)
                    .map(|cache| TaskCache {
                        cache: cache.clone(),
                        identity: Arc::from(provider.identity()),
                    }),
                config: agent,
            })
        };
        let agents = config
            .agents
            .into_iter()
            .map(&planned)
            .collect::<Result<Vec<_>, _>>()?;
        let synthesis = match config.synthesizer {
            Some(s) => {
                let fallback = match &s.agent.fallback {
                    Some(FallbackConfig::Agent(id)) => {
                        agents.iter().position(|a| &a.config.id == id)
                    }
                    _ => None,
                };
                Some(PlannedSynthesis {
                    agent: planned(s.agent)?,
                    reserve: s.reserve,
                    fallback,
                })
            }
            None => None,
        };

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
                executor: Executor::with_resilience(limiter, resilience).with_prices(prices),
                flow,
                request_timeout: config.request_timeout,
                min_successes: config.min_successes,
                synthesizer: self.synthesizer.unwrap_or_else(|| Arc::new(Concat)),
                synthesis,
            }),
        })
    }
}

/// The response cache `[cache]` describes. A store that is down is no error here:
/// calls go upstream until it answers.
fn response_cache(config: &CacheConfig) -> Result<ResponseCache, BuildError> {
    let store: Arc<dyn CacheStore> = match &config.backend {
        CacheBackend::Memory {
            max_entries,
            max_bytes,
        } => Arc::new(MemoryStore::new(*max_entries, *max_bytes, config.ttl)),
        CacheBackend::Redis { url } => Arc::new(
            RedisStore::new(url, &config.namespace, config.timeout)
                .map_err(BuildError::CacheUrl)?,
        ),
    };
    Ok(ResponseCache::new(store, config.ttl))
}

fn build_provider(
    name: &str,
    config: &ProviderConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Arc<dyn Provider>, BuildError> {
    let key = |http: &HttpProviderConfig| -> Result<Option<Secret>, BuildError> {
        match env(&http.api_key_env).filter(|k| !k.trim().is_empty()) {
            Some(key) => Ok(Some(Secret::new(key.trim()))),
            None if http.key_required => Err(BuildError::MissingApiKey {
                provider: name.to_owned(),
                env: http.api_key_env.clone(),
            }),
            None => Ok(None),
        }
    };
    let base_url =
        |http: &HttpProviderConfig, env_name: &str, default: &str| -> Result<String, BuildError> {
            if let Some(url) = &http.base_url {
                return Ok(url.clone());
            }
            match env(env_name).filter(|u| !u.trim().is_empty()) {
                Some(url) if crate::config::is_http_url(&url) => Ok(url.trim().to_owned()),
                Some(url) => Err(BuildError::BadBaseUrl {
                    provider: name.to_owned(),
                    variable: env_name.to_owned(),
                    value: crate::config::without_credentials(&url),
                }),
                None => Ok(default.to_owned()),
            }
        };
    Ok(match config {
        ProviderConfig::Sim(options) => Arc::new(SimProvider::new(options.clone())),
        ProviderConfig::Anthropic(http) => Arc::new(AnthropicProvider::new(AnthropicOptions {
            base_url: base_url(http, "ANTHROPIC_BASE_URL", ANTHROPIC_BASE_URL)?,
            api_key: key(http)?,
            version: http.version.clone(),
            http2: http.http2,
        })),
        ProviderConfig::OpenAi(http) => Arc::new(OpenAiProvider::new(OpenAiOptions {
            base_url: base_url(http, "OPENAI_BASE_URL", OPENAI_BASE_URL)?,
            api_key: key(http)?,
            max_tokens_field: http.max_tokens_field,
            http2: http.http2,
        })),
    })
}
