//! Typed configuration: the TOML file's schema, the embedded default, environment
//! overrides, and validation that names the field, the place and the fix.
//!
//! Precedence, highest first: command-line flags > `METAORCH_*` environment variables >
//! the config file > built-in defaults. A config is validated once, at load, into
//! [`Config`], whose values cannot be invalid (durations are `Duration`s, every agent's
//! provider exists, every prompt has its `{query}`).

mod duration;
mod error;
mod overrides;
mod raw;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cost::{Price, PriceTable};
use crate::limits::FlowConfig;
use crate::provider::SimOptions;
use crate::resilience::{BreakerConfig, CallPolicy, RetryBudgetConfig};

pub use crate::provider::MaxTokensField;
pub use duration::{MAX_DURATION, parse as parse_duration};
pub use error::{ConfigError, ConfigErrors};
pub use overrides::Overrides;

/// The embedded default config: six agents on the `sim` provider.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

/// The name `origin` takes for the embedded default.
pub const EMBEDDED_ORIGIN: &str = "<embedded default>";

/// Agent calls in flight at once across all requests, unless configured: a ceiling
/// over flow control, which finds each provider's own limit below it.
pub const DEFAULT_CONCURRENCY_LIMIT: usize = 256;
/// A request's deadline, unless configured.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Successful agents a request needs, unless configured.
pub const DEFAULT_MIN_SUCCESSES: usize = 1;
/// The log filter for stderr, unless configured.
pub const DEFAULT_LOG_LEVEL: &str = crate::telemetry::DEFAULT_LOG_LEVEL;
/// The log filter for a log file, unless configured: a file is read later, to find out
/// what happened, so it keeps each request's story (`request.*`, `agent.success`).
pub const DEFAULT_FILE_LOG_LEVEL: &str = "info";
/// Generated-token bound per call, unless an agent sets one.
pub const DEFAULT_MAX_TOKENS: u32 = 1024;

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where it came from: a file path or [`EMBEDDED_ORIGIN`].
    pub origin: String,
    /// Agent calls in flight at once, shared by all requests in the process.
    pub concurrency_limit: usize,
    /// Each request's deadline, measured from its start.
    pub request_timeout: Duration,
    /// Agents that must succeed for a request to count as answered.
    pub min_successes: usize,
    /// The log filter (`warn`, `info`, or `RUST_LOG`-style directives); `None` for the
    /// default (see [`Config::log_filter`]).
    pub log_level: Option<String>,
    /// Where log lines are appended; `None` for stderr.
    pub log_file: Option<PathBuf>,
    /// Seed for every random draw (simulated latencies and faults, retry jitter);
    /// `None` draws fresh each run.
    pub seed: Option<u64>,
    /// The circuit breaker settings, one breaker per provider and model.
    pub breaker: BreakerConfig,
    /// The retry budget, one per provider and model.
    pub retry_budget: RetryBudgetConfig,
    /// Flow control per provider and model (`[defaults.flow]`): adaptive concurrency,
    /// rate limits, limits learned from the provider's headers.
    pub flow: FlowConfig,
    /// A provider's own flow control (`[providers.NAME.flow]`, over the defaults), by
    /// provider name.
    pub provider_flow: BTreeMap<String, FlowConfig>,
    /// `metaorch serve`'s settings.
    pub server: ServerConfig,
    /// The OTLP/HTTP collector spans are exported to (`telemetry.otlp_endpoint`);
    /// `None` leaves export off unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    pub otlp_endpoint: Option<String>,
    /// Providers by name. `sim` is always defined; a `[providers.sim]` table tunes it.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// The sub-agents, in the order their outcomes are reported.
    pub agents: Vec<AgentConfig>,
    /// Prices by model id (`[prices."MODEL"]`), over the built-in ones (see
    /// [`crate::cost`]).
    pub prices: BTreeMap<String, Price>,
    /// The model that merges the agents' replies into one answer (`[synthesizer]`);
    /// `None` lays the replies end to end (`concat`).
    pub synthesizer: Option<SynthesizerConfig>,
    /// The response cache (`[cache]`); `None` caches nothing.
    pub cache: Option<CacheConfig>,
    /// Limits, pauses and the cache shared with other instances through Redis
    /// (`[redis]`); `None` keeps every limit to this process.
    pub redis: Option<RedisConfig>,
}

/// `[redis]`: what every instance with the same `url` and `namespace` shares — the
/// rate limits and the concurrency cap of each provider and model, its `Retry-After`
/// pauses, and (with `[cache] backend = "redis"`) the response cache. Its `Debug`
/// hides the URL's credentials.
#[derive(Clone, PartialEq)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` (TLS), with credentials if any.
    pub url: String,
    /// Prefix of every key: instances with the same one share their limits.
    pub namespace: String,
    /// The most one Redis call may take.
    pub timeout: Duration,
    /// How long an instance's hold on calls in flight, and its presence, last
    /// without renewal: a crashed instance's share comes back within this.
    pub lease: Duration,
    /// This instance's share of each shared limit while Redis cannot be reached;
    /// `None`: one over the number of instances last seen.
    pub local_share: Option<f64>,
}

impl RedisConfig {
    /// One call's limit, unless configured.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);
    /// The lease, unless configured.
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(3);
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &crate::cache::redacted_url(&self.url))
            .field("namespace", &self.namespace)
            .field("timeout", &self.timeout)
            .field("lease", &self.lease)
            .field("local_share", &self.local_share)
            .finish()
    }
}

/// `[cache]`: where successful replies are kept, and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// The store.
    pub backend: CacheBackend,
    /// How long a reply is kept.
    pub ttl: Duration,
    /// Prefix of every key in a shared store: instances with the same one share replies.
    pub namespace: String,
    /// The most one store operation may take (Redis); past it the call goes upstream.
    pub timeout: Duration,
    /// Whether agents that do not say (`cache = true|false`) are cached.
    pub default: bool,
}

/// Where the cache keeps replies. Its `Debug` hides the credentials of a Redis URL.
#[derive(Clone, PartialEq)]
pub enum CacheBackend {
    /// In this process, bounded.
    Memory {
        /// Most replies kept.
        max_entries: u64,
        /// Most bytes of replies kept.
        max_bytes: u64,
    },
    /// In Redis, shared by every instance using the same `url` and namespace.
    Redis {
        /// `redis://` or `rediss://` (TLS), with credentials if any.
        url: String,
    },
}

impl fmt::Debug for CacheBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheBackend::Memory {
                max_entries,
                max_bytes,
            } => f
                .debug_struct("Memory")
                .field("max_entries", max_entries)
                .field("max_bytes", max_bytes)
                .finish(),
            CacheBackend::Redis { url } => f
                .debug_struct("Redis")
                .field("url", &crate::cache::redacted_url(url))
                .finish(),
        }
    }
}

impl CacheBackend {
    /// `memory` or `redis`.
    pub fn name(&self) -> &'static str {
        match self {
            CacheBackend::Memory { .. } => "memory",
            CacheBackend::Redis { .. } => "redis",
        }
    }
}

impl CacheConfig {
    /// How long replies are kept, unless configured.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
    /// Most replies in memory, unless configured.
    pub const DEFAULT_MAX_ENTRIES: u64 = 10_000;
    /// Most bytes in memory, unless configured.
    pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;
    /// The key prefix, unless configured.
    pub const DEFAULT_NAMESPACE: &'static str = "metaorch";
    /// One store operation's limit, unless configured.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);
}

impl Default for CacheConfig {
    /// In memory, an hour, every agent that does not say otherwise.
    fn default() -> Self {
        CacheConfig {
            backend: CacheBackend::Memory {
                max_entries: Self::DEFAULT_MAX_ENTRIES,
                max_bytes: Self::DEFAULT_MAX_BYTES,
            },
            ttl: Self::DEFAULT_TTL,
            namespace: Self::DEFAULT_NAMESPACE.to_owned(),
            timeout: Self::DEFAULT_TIMEOUT,
            default: true,
        }
    }
}

/// `[synthesizer]`: a call after the fan-out that merges the replies.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthesizerConfig {
    /// The call as an agent (id `synthesizer`): provider, model, system, prompt (with
    /// `{query}` and `{replies}`), limits, policy, and a fallback agent whose provider
    /// and model take over with the same prompt.
    pub agent: AgentConfig,
    /// Kept back from the fan-out, so that slow agents are cut early enough for the
    /// synthesis to run inside the request's deadline.
    pub reserve: Duration,
}

impl SynthesizerConfig {
    /// The synthesizer's id in outcomes, logs and metrics.
    pub const ID: &'static str = "synthesizer";
    /// The time kept back from the fan-out, unless configured.
    pub const DEFAULT_RESERVE: Duration = Duration::from_secs(10);
    /// The placeholder the agents' replies replace.
    pub const REPLIES: &'static str = "{replies}";
    /// The system prompt, unless configured.
    pub const DEFAULT_SYSTEM: &'static str = "You lead a team of specialists. Merge their findings into one clear, accurate answer: keep what they agree on, settle or flag where they disagree, and leave out what does not help.";
    /// The prompt, unless configured.
    pub const DEFAULT_PROMPT: &'static str = "Question: {query}\n\nYour team's replies:\n\n{replies}\n\nWrite the answer to the question. Do not mention the team or its replies.";
}

/// `metaorch serve`'s settings.
#[derive(Clone, PartialEq)]
pub struct ServerConfig {
    /// The address to listen on.
    pub bind: std::net::IpAddr,
    /// The port to listen on.
    pub port: u16,
    /// Bearer tokens that may call the API; empty means no authentication.
    pub auth_tokens: Vec<crate::provider::Secret>,
    /// Whether `GET /metrics` needs a token when tokens are configured (`/healthz` and
    /// `/readyz` never do: probes carry none).
    pub metrics_auth: bool,
    /// Requests in flight at once; past it, 503 with `Retry-After`.
    pub max_in_flight: usize,
    /// Connections open at once. Past it a few more are let in to answer `/healthz`
    /// (and 503 to everything else); past those, new connections are closed at once.
    pub max_connections: usize,
    /// The largest request body accepted (413 past it).
    pub max_body_bytes: usize,
    /// The longest query accepted, in characters.
    pub max_query_chars: usize,
    /// How long a client may take to send a request's headers; also how long an idle
    /// keep-alive connection is kept. Past it the connection is closed.
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request's body, once its headers are in
    /// (408 and the connection closed past it).
    pub body_read_timeout: Duration,
    /// The longest deadline a request's `timeout_ms` may ask for; `None` for the
    /// config's `request_timeout`. Requests without `timeout_ms` get
    /// `request_timeout`, held to this bound too.
    pub max_request_timeout: Option<Duration>,
    /// How long in-flight requests may take to finish after SIGTERM: a hard bound —
    /// past it, the requests left are cancelled and the server stops.
    pub drain_timeout: Duration,
}

impl ServerConfig {
    /// The most `max_connections` may be.
    pub const MAX_CONNECTIONS: usize = 1_000_000;
    /// The most `max_in_flight` may be.
    pub const MAX_IN_FLIGHT: usize = 1_000_000;
    /// The most `max_body_bytes` may be: 64 MiB.
    pub const MAX_BODY_BYTES: usize = 64 << 20;
    /// The most `header_read_timeout` may be.
    pub const MAX_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5 * 60);
    /// The most `body_read_timeout` may be.
    pub const MAX_BODY_READ_TIMEOUT: Duration = Duration::from_secs(10 * 60);
    /// The most `max_request_timeout` may be.
    pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(60 * 60);
    /// The most `drain_timeout` may be.
    pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(60 * 60);

    /// The deadline a request gets: the one it asks for (`timeout_ms`) or else
    /// `request_timeout`, never past `max_request_timeout` (which defaults to
    /// `request_timeout`). A request may shorten the server's deadline, never lengthen
    /// it past the bound.
    ///
    /// ```
    /// use std::time::Duration;
    /// use metaorch::config::ServerConfig;
    ///
    /// let server = ServerConfig::default();
    /// let configured = Duration::from_secs(60);
    /// assert_eq!(server.request_deadline(None, configured), configured);
    /// assert_eq!(server.request_deadline(Some(Duration::from_secs(5)), configured), Duration::from_secs(5));
    /// assert_eq!(server.request_deadline(Some(Duration::from_secs(600)), configured), configured);
    /// ```
    pub fn request_deadline(&self, asked: Option<Duration>, request_timeout: Duration) -> Duration {
        let bound = self.max_request_timeout.unwrap_or(request_timeout);
        asked.unwrap_or(request_timeout).min(bound)
    }
}

impl Default for ServerConfig {
    /// 127.0.0.1:8080, no auth (`/metrics` behind the token once there is one), 256
    /// requests in flight, 4,096 connections, 1 MiB bodies, 32,768-character queries,
    /// 10 s to send headers, 30 s to send a body, deadlines up to `request_timeout`,
    /// 30 s to drain.
    fn default() -> Self {
        ServerConfig {
            bind: std::net::IpAddr::from([127, 0, 0, 1]),
            port: 8080,
            auth_tokens: Vec::new(),
            metrics_auth: true,
            max_in_flight: 256,
            max_connections: 4096,
            max_body_bytes: 1 << 20,
            max_query_chars: 32_768,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_request_timeout: None,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("bind", &self.bind)
            .field("port", &self.port)
            .field(
                "auth_tokens",
                &format_args!("[{} redacted]", self.auth_tokens.len()),
            )
            .field("metrics_auth", &self.metrics_auth)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_connections", &self.max_connections)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_query_chars", &self.max_query_chars)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("body_read_timeout", &self.body_read_timeout)
            .field("max_request_timeout", &self.max_request_timeout)
            .field("drain_timeout", &self.drain_timeout)
            .finish()
    }
}

/// How to reach one provider.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderConfig {
    /// The built-in simulator.
    Sim(SimOptions),
    /// Anthropic's Messages API.
    Anthropic(HttpProviderConfig),
    /// An OpenAI-compatible Chat Completions server.
    OpenAi(HttpProviderConfig),
}

impl ProviderConfig {
    /// The `kind` as written in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderConfig::Sim(_) => "sim",
            ProviderConfig::Anthropic(_) => "anthropic",
            ProviderConfig::OpenAi(_) => "openai",
        }
    }
}

/// An HTTP provider's settings. The key itself is never in the config: only the name
/// of the environment variable that holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpProviderConfig {
    /// The server; `None` for `ANTHROPIC_BASE_URL` / `OPENAI_BASE_URL`, else the
    /// public API.
    pub base_url: Option<String>,
    /// The environment variable holding the API key.
    pub api_key_env: String,
    /// Whether a missing key is an error (Anthropic) or means no `Authorization`
    /// header (OpenAI-compatible servers, which often need none).
    pub key_required: bool,
    /// `anthropic-version` (Anthropic only).
    pub version: String,
    /// `max_tokens` or `max_completion_tokens` (OpenAI-compatible only).
    pub max_tokens_field: crate::provider::MaxTokensField,
    /// Whether this provider's agents mark their system prompt for the prompt cache
    /// unless they say otherwise (Anthropic only).
    pub prompt_cache: bool,
    /// Which HTTP version to speak: HTTP/2 by ALPN over https (`auto`), h2c with prior
    /// knowledge (`always`), or HTTP/1.1 only (`never`).
    pub http2: crate::provider::Http2,
}

/// One sub-agent.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// Unique id: letters, digits, `-` and `_`.
    pub id: String,
    /// A short human name for the role, such as `Critic`.
    pub role: String,
    /// The system prompt.
    pub system: Option<String>,
    /// The user prompt; contains `{query}` at least once.
    pub prompt: PromptTemplate,
    /// The name of a provider in [`Config::providers`].
    pub provider: String,
    /// The model to ask for.
    pub model: String,
    /// Upper bound on generated tokens.
    pub max_tokens: u32,
    /// Sampling temperature, 0.0–2.0.
    pub temperature: Option<f32>,
    /// Strings that end generation.
    pub stop_sequences: Vec<String>,
    /// Ask the provider to stream the reply.
    pub stream: bool,
    /// Mark the system prompt for the provider's prompt cache (Anthropic): the agent's
    /// `prompt_cache`, else its provider's.
    pub prompt_cache: bool,
    /// Retries and timeouts: `[defaults]` with this agent's own settings on top.
    pub policy: CallPolicy,
    /// What stands in when the agent's call fails for good.
    pub fallback: Option<FallbackConfig>,
    /// A standby agent runs only as another agent's fallback, never on its own.
    pub standby: bool,
    /// Whether its replies are cached: its own `cache`, else `[cache] default`; false
    /// without a cache.
    pub cache: bool,
}

/// An agent's fallback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FallbackConfig {
    /// Call this other agent instead (a different model or provider).
    Agent(String),
    /// Reply with this text.
    Text(String),
}

/// A prompt template in which `{query}` stands for the user's query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTemplate(String);

impl PromptTemplate {
    /// The placeholder the query replaces.
    pub const PLACEHOLDER: &'static str = "{query}";

    /// A template, or `None` if it lacks the placeholder.
    pub fn new(template: impl Into<String>) -> Option<Self> {
        let template = template.into();
        template
            .contains(Self::PLACEHOLDER)
            .then_some(PromptTemplate(template))
    }

    /// The template with every `{query}` replaced by `query`.
    pub fn render(&self, query: &str) -> String {
        self.0.replace(Self::PLACEHOLDER, query)
    }

    /// The template with `{query}` and `{replies}` filled in, in one pass: a query
    /// that itself contains `{replies}` stays as written.
    pub fn fill(&self, query: &str, replies: &str) -> String {
        let mut out = String::with_capacity(self.0.len() + query.len() + replies.len());
        let mut rest = self.0.as_str();
        while let Some(at) = rest.find('{') {
            out.push_str(&rest[..at]);
            rest = &rest[at..];
            if let Some(after) = rest.strip_prefix(Self::PLACEHOLDER) {
                out.push_str(query);
                rest = after;
            } else if let Some(after) = rest.strip_prefix(SynthesizerConfig::REPLIES) {
                out.push_str(replies);
                rest = after;
            } else {
                out.push('{');
                rest = &rest[1..];
            }
        }
        out.push_str(rest);
        out
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Config {
    /// The embedded default: six agents with distinct roles on `sim`.
    pub fn embedded() -> Config {
        Config::from_toml_str(EMBEDDED_DEFAULT, EMBEDDED_ORIGIN)
            .expect("the embedded default config is validated by the test suite")
    }

    /// Parses and validates TOML text. `origin` names it in error messages.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Config, ConfigErrors> {
        validate::parse_and_validate(text, origin)
    }

    /// Reads, parses and validates a config file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigErrors> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors::one(ConfigError {
                origin: origin.clone(),
                position: None,
                field: String::new(),
                message: format!("cannot read the config file: {e}"),
            })
        })?;
        Config::from_toml_str(&text, &origin)
    }

    /// Applies overrides (from the environment or flags), checking them against the
    /// rest of the config.
    pub fn apply(&mut self, overrides: &Overrides) -> Result<(), ConfigErrors> {
        overrides.apply_to(self)
    }

    /// The agent with this id (standby agents included).
    pub fn agent(&self, id: &str) -> Option<&AgentConfig> {
        self.agents.iter().find(|a| a.id == id)
    }

    /// The log filter in force: the configured one, else `info` when logging to a file
    /// and `warn` on stderr.
    pub fn log_filter(&self) -> &str {
        match (&self.log_level, &self.log_file) {
            (Some(level), _) => level,
            (None, Some(_)) => DEFAULT_FILE_LOG_LEVEL,
            (None, None) => DEFAULT_LOG_LEVEL,
        }
    }

    /// The agents that run on every request: all but the standby ones.
    pub fn active_agents(&self) -> impl Iterator<Item = &AgentConfig> {
        self.agents.iter().filter(|a| !a.standby)
    }

    /// Every model's price: the built-in table with this config's `[prices]` over it.
    pub fn price_table(&self) -> PriceTable {
        PriceTable::with_overrides(self.prices.iter().map(|(m, p)| (m.clone(), *p)))
    }

    /// What `config check` warns of about prices: each model some agent uses that has
    /// no known price (its calls' cost would be `null`), with the agents that use it
    /// and what to add.
    pub fn check_prices(&self) -> Vec<String> {
        let table = self.price_table();
        let mut unpriced: Vec<(&str, usize, Vec<&str>)> = Vec::new();
        for (i, agent) in self.agents.iter().enumerate() {
            if table.price(&agent.model).is_some() {
                continue;
            }
            match unpriced.iter_mut().find(|(m, _, _)| *m == agent.model) {
                Some((_, _, ids)) => ids.push(&agent.id),
                None => unpriced.push((&agent.model, i, vec![&agent.id])),
            }
        }
        unpriced
            .into_iter()
            .map(|(model, first, ids)| {
                let (noun, ids) = match ids.len() {
                    1 => ("agent", ids[0].to_owned()),
                    _ => ("agents", ids.join(", ")),
                };
                format!(
                    "agents[{first}].model: \"{model}\" ({noun} {ids}) has no known price, so its cost_usd will be null; add [prices.\"{model}\"] with input_per_mtok and output_per_mtok (US dollars per million tokens)"
                )
            })
            .collect()
    }

    /// What the environment (read through `env`) lacks or gets wrong for the
    /// providers some agent uses: a missing API key (a warning here — CI may lack
    /// secrets — which `run` and `serve` refuse to start without) and a base URL
    /// variable that is not an http(s) URL (an error: they would refuse it too).
    pub fn check_environment(&self, env: impl Fn(&str) -> Option<String>) -> Vec<EnvProblem> {
        let mut problems = Vec::new();
        let mut tls_checked = false;
        for (name, provider) in &self.providers {
            if !self.agents.iter().any(|a| &a.provider == name) {
                continue;
            }
            if !tls_checked && !matches!(provider, ProviderConfig::Sim(_)) {
                tls_checked = true;
                if let Some(why) = crate::provider::ca_file_problem(&env) {
                    problems.push(EnvProblem {
                        error: false,
                        message: format!(
                            "{why}; every https:// call will fail until it is fixed or unset"
                        ),
                    });
                }
            }
            let (http, url_var) = match provider {
                ProviderConfig::Sim(_) => continue,
                ProviderConfig::Anthropic(h) => (h, "ANTHROPIC_BASE_URL"),
                ProviderConfig::OpenAi(h) => (h, "OPENAI_BASE_URL"),
            };
            let key = env(&http.api_key_env).filter(|k| !k.trim().is_empty());
            if key.is_none() && http.key_required {
                problems.push(EnvProblem {
                    error: false,
                    message: format!(
                        "providers.{name}: its API key variable {} is not set; `run` and `serve` will refuse to start until it is",
                        http.api_key_env
                    ),
                });
            }
            let url = http
                .base_url
                .clone()
                .or_else(|| env(url_var).filter(|u| is_http_url(u)))
                .unwrap_or_else(|| match provider {
                    ProviderConfig::OpenAi(_) => crate::provider::OPENAI_BASE_URL.to_owned(),
                    _ => crate::provider::ANTHROPIC_BASE_URL.to_owned(),
                });
            if let Some(why) = crate::provider::proxy_problem(&url, &env) {
                problems.push(EnvProblem {
                    error: false,
                    message: format!("providers.{name}: {why}; every call to it will fail"),
                });
            }
            if http.base_url.is_none()
                && let Some(url) = env(url_var).filter(|u| !u.trim().is_empty())
                && !is_http_url(&url)
            {
                problems.push(EnvProblem {
                    error: true,
                    message: format!(
                        "providers.{name}: {url_var}=\"{}\" is not an http(s) URL; expected e.g. \"https://api.anthropic.com\" or \"http://127.0.0.1:8081\", or unset it",
                        without_credentials(&url)
                    ),
                });
            }
        }
        problems
    }
}

/// A problem the environment has with a config (see [`Config::check_environment`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvProblem {
    /// True when `run` would refuse to start; false for a warning.
    pub error: bool,
    /// What is wrong and what to do.
    pub message: String,
}

/// A URL as an error may show it: anything before an `@` in its authority (a user
/// name and password) replaced by `***`, whether or not the rest parses.
pub fn without_credentials(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    match url[start..end].rfind('@') {
        Some(at) => format!("{}***@{}", &url[..start], &url[start + at + 1..]),
        None => url.to_owned(),
    }
}

/// True for an absolute `http` or `https` URL with a host.
pub fn is_http_url(url: &str) -> bool {
    reqwest::Url::parse(url.trim())
        .map(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .unwrap_or(false)
}

/// Which config file to load, by precedence: the `--config` flag, then
/// `METAORCH_CONFIG`, then `./metaorch.toml` if it exists; `None` means the embedded
/// default.
pub fn discover(flag: Option<&Path>, env: Option<&str>, cwd: &Path) -> Option<PathBuf> {
    if let Some(path) = flag {
        return Some(path.to_owned());
    }
    if let Some(path) = env.filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let local = cwd.join("metaorch.toml");
    local.is_file().then_some(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_has_six_distinct_agents_on_sim() {
        let config = Config::embedded();
        assert_eq!(config.agents.len(), 6);
        let ids: std::collections::HashSet<_> = config.agents.iter().map(|a| &a.id).collect();
        assert_eq!(ids.len(), 6);
        assert!(config.agents.iter().all(|a| a.provider == "sim"));
        assert_eq!(config.concurrency_limit, DEFAULT_CONCURRENCY_LIMIT);
        let ProviderConfig::Sim(sim) = &config.providers["sim"] else {
            panic!("sim is a sim");
        };
        assert_eq!(sim.latency_min, Duration::from_millis(500));
        assert_eq!(sim.latency_max, Duration::from_secs(2));
    }

    #[test]
    fn template_renders_every_placeholder() {
        let t = PromptTemplate::new("{query} / {query}").unwrap();
        assert_eq!(t.render("q"), "q / q");
        assert!(PromptTemplate::new("no placeholder").is_none());
    }

    #[test]
    fn discover_follows_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let flag = Path::new("flag.toml");
        assert_eq!(
            discover(Some(flag), Some("env.toml"), dir.path()),
            Some(flag.into())
        );
        assert_eq!(
            discover(None, Some("env.toml"), dir.path()),
            Some("env.toml".into())
        );
        assert_eq!(discover(None, None, dir.path()), None);
        std::fs::write(dir.path().join("metaorch.toml"), "").unwrap();
        assert_eq!(
            discover(None, None, dir.path()),
            Some(dir.path().join("metaorch.toml"))
        );
    }

    #[test]
    fn a_url_in_an_error_shows_no_credentials() {
        assert_eq!(
            without_credentials("htps://user:s3cret@gw.example/v1"),
            "htps://***@gw.example/v1"
        );
        assert_eq!(without_credentials("user:s3cret@gw:80"), "***@gw:80");
        assert_eq!(
            without_credentials("https://gw.example/a@b"),
            "https://gw.example/a@b"
        );
        assert_eq!(without_credentials("localhost:8081"), "localhost:8081");
    }

    #[test]
    fn a_redis_url_shows_without_its_password() {
        let backend = CacheBackend::Redis {
            url: "redis://:hunter2@h:6379".into(),
        };
        assert_eq!(
            format!("{backend:?}"),
            r#"Redis { url: "redis://***@h:6379" }"#
        );
    }
}
