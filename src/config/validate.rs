//! Turns a [`RawConfig`] into a [`Config`], collecting every problem rather than
//! stopping at the first, each with its place in the file.

mod prices;

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;

use toml::Spanned;

use super::HttpProviderConfig;
use super::error::line_col;
use super::raw::{
    RawAgent, RawBreaker, RawConfig, RawFaults, RawFlow, RawProvider, RawRetry, RawRetryBudget,
    RawSynthesizer, RawTimeout, RawWindowKind,
};
use super::{
    AgentConfig, CacheBackend, CacheConfig, Config, ConfigError, ConfigErrors,
    DEFAULT_CONCURRENCY_LIMIT, DEFAULT_MAX_TOKENS, DEFAULT_MIN_SUCCESSES, DEFAULT_REQUEST_TIMEOUT,
    EMBEDDED_DEFAULT, FallbackConfig, PromptTemplate, ProviderConfig, SynthesizerConfig,
};
use crate::limits::FlowConfig;
use crate::provider::{
    ANTHROPIC_VERSION, Http2, MaxTokensField, ScriptedFault, SimFaults, SimOptions,
};
use crate::resilience::{BreakerConfig, CallPolicy, RetryBudgetConfig, RetryPolicy, Window};

/// The most attempts a policy may make: more is a config mistake, not resilience.
const MAX_ATTEMPTS: u32 = 100;

/// The largest count window a breaker may keep.
const MAX_WINDOW_SIZE: u32 = 100_000;

/// The most calls in flight a flow control bound may name.
const MAX_FLOW_CONCURRENCY: u32 = 100_000;

/// The highest rate limit, per minute, a config may name.
const MAX_PER_MINUTE: u64 = 1_000_000_000_000;

/// The model a `sim` agent asks for when it names none.
const SIM_DEFAULT_MODEL: &str = "sim-1";

pub(super) fn parse_and_validate(text: &str, origin: &str) -> Result<Config, ConfigErrors> {
    let raw: RawConfig =
        serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
            // `Spanned` shows up in the path as a private key; people never wrote it.
            let field =
                quote_model(&e.path().to_string()).replace(".$__serde_spanned_private_value", "");
            let e = e.into_inner();
            ConfigErrors::one(ConfigError {
                origin: origin.to_owned(),
                position: e.span().map(|span| line_col(text, span.start)),
                // The path of a whole-document problem is ".", which helps nobody.
                field: if field == "." { String::new() } else { field },
                message: e.message().trim_end().replace('\n', "; "),
            })
        })?;
    let mut v = Validator {
        text,
        origin,
        errors: Vec::new(),
        cache_default: false,
        redis_url: None,
    };
    let config = v.config(raw);
    if v.errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(v.errors))
    }
}

struct Validator<'a> {
    text: &'a str,
    origin: &'a str,
    errors: Vec<ConfigError>,
    /// `[cache] default`: whether agents that do not say are cached.
    cache_default: bool,
    /// `[redis] url` and `namespace`, for a Redis cache that names none.
    redis_url: Option<(String, String)>,
}

impl Validator<'_> {
    fn error(&mut self, span: Option<Range<usize>>, field: impl Into<String>, message: String) {
        self.errors.push(ConfigError {
            origin: self.origin.to_owned(),
            position: span.map(|s| line_col(self.text, s.start)),
            field: field.into(),
            message,
        });
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let concurrency_limit = match raw.concurrency_limit {
            Some(v) if *v.get_ref() == 0 => {
                self.error(
                    Some(v.span()),
                    "concurrency_limit",
                    "0 would let no agent call run; expected 1 or more".into(),
                );
                DEFAULT_CONCURRENCY_LIMIT
            }
            Some(v) => v.into_inner(),
            None => DEFAULT_CONCURRENCY_LIMIT,
        };
        let request_timeout = match raw.request_timeout {
            Some(v) if v.get_ref().0.is_zero() => {
                self.error(
                    Some(v.span()),
                    "request_timeout",
                    "a zero deadline would time out every request; expected a positive duration such as \"30s\"".into(),
                );
                DEFAULT_REQUEST_TIMEOUT
            }
            Some(v) => v.into_inner().0,
            None => DEFAULT_REQUEST_TIMEOUT,
        };
        let log_level = raw.log.level.map(|level| {
            if let Err(message) = check_log_filter(level.get_ref()) {
                self.error(Some(level.span()), "log.level", message);
            }
            level.into_inner()
        });
        let log_file = match raw.log.file {
            Some(file) if file.get_ref().trim().is_empty() => {
                self.error(
                    Some(file.span()),
                    "log.file",
                    "is empty; name a file to append log lines to, or remove the key to log to stderr".into(),
                );
                None
            }
            Some(file) => Some(std::path::PathBuf::from(file.into_inner())),
            None => None,
        };

        let defaults = self.defaults_policy(&raw.defaults);
        let breaker = self.breaker(raw.defaults.breaker);
        let retry_budget = retry_budget(raw.retry_budget);
        let flow = match raw.defaults.flow {
            Some(f) => {
                let span = f.span();
                self.flow(f.get_ref(), &FlowConfig::default(), "defaults.flow", span)
            }
            None => FlowConfig::default(),
        };
        let mut provider_flow = BTreeMap::new();
        let server = self.server(raw.server);
        let otlp_endpoint = raw.telemetry.otlp_endpoint.map(|e| {
            let ok = reqwest::Url::parse(e.get_ref())
                .map(|u| matches!(u.scheme(), "http" | "https"))
                .unwrap_or(false);
            if !ok {
                self.error(
                    Some(e.span()),
                    "telemetry.otlp_endpoint",
                    format!("\"{}\" is not an http(s) URL; expected an OTLP/HTTP collector such as \"http://127.0.0.1:4318\"", e.get_ref()),
                );
            }
            e.into_inner()
        });
        let mut providers = self.providers(raw.providers, &flow, &mut provider_flow);
        if let Some(seed) = raw.seed {
            for provider in providers.values_mut() {
                if let ProviderConfig::Sim(sim) = provider {
                    sim.seed.get_or_insert(seed);
                }
            }
        }
        let default_agents_used = raw.agents.is_none();
        let redis = raw.redis.map(|r| self.redis(r));
        self.redis_url = redis.as_ref().map(|r| (r.url.clone(), r.namespace.clone()));
        let mut cache = raw.cache.map(|c| self.cache(c));
        self.cache_default = cache.as_ref().is_some_and(|c| c.default);
        let agents = match raw.agents {
            Some(agents) if agents.get_ref().is_empty() => {
                self.error(
                    Some(agents.span()),
                    "agents",
                    "the list is empty; define at least one [[agents]] table, or remove `agents` to use the six default agents".into(),
                );
                Vec::new()
            }
            Some(agents) => {
                let span = agents.span();
                let synthesizer_fallback = raw
                    .synthesizer
                    .as_ref()
                    .and_then(|s| s.get_ref().fallback.as_ref())
                    .and_then(|f| f.get_ref().agent.as_ref())
                    .map(|a| a.get_ref().as_str());
                self.agents(
                    agents.into_inner(),
                    span,
                    &providers,
                    &defaults,
                    synthesizer_fallback,
                )
            }
            None => default_agents()
                .into_iter()
                .map(|a| AgentConfig {
                    policy: defaults.clone(),
                    cache: self.cache_default,
                    ..a
                })
                .collect(),
        };
        self.sim_scripts(&providers, &agents);
        let mut prices = self.prices(raw.prices);
        if default_agents_used {
            // The six default agents come with the default config's prices for their
            // model, under this config's own.
            for (model, price) in default_config().prices {
                prices.entry(model).or_insert(price);
            }
        }
        let synthesizer = raw
            .synthesizer
            .map(|s| self.synthesizer(s, &providers, &defaults, &agents, request_timeout));
        // An agent that asks for the cache gets one in memory, even without [cache].
        let asked = agents
            .iter()
            .chain(synthesizer.as_ref().map(|s| &s.agent))
            .any(|a| a.cache);
        if cache.is_none() && asked {
            cache = Some(CacheConfig {
                default: false,
                ..CacheConfig::default()
            });
        }

        let active = agents.iter().filter(|a| !a.standby).count();
        let min_successes = match raw.min_successes {
            Some(v) if *v.get_ref() > active && active > 0 => {
                self.error(
                    Some(v.span()),
                    "min_successes",
                    format!(
                        "{} is more than the {active} configured agents{}; expected 0 to {active}",
                        v.get_ref(),
                        if active < agents.len() {
                            " (standby agents do not count)"
                        } else {
                            ""
                        }
                    ),
                );
                DEFAULT_MIN_SUCCESSES
            }
            Some(v) => v.into_inner(),
            None => DEFAULT_MIN_SUCCESSES.min(active),
        };

        Config {
            origin: self.origin.to_owned(),
            concurrency_limit,
            request_timeout,
            min_successes,
            log_level,
            log_file,
            seed: raw.seed,
            breaker,
            retry_budget,
            flow,
            provider_flow,
            server,
            otlp_endpoint,
            providers,
            agents,
            prices,
            synthesizer,
            cache,
            redis,
        }
    }

    /// `[redis]`: the URL checked, every duration and the share bounded.
    fn redis(&mut self, raw: Spanned<super::raw::RawRedis>) -> super::RedisConfig {
        use super::RedisConfig as R;
        let span = raw.span();
        let raw = raw.into_inner();
        let url = match raw.url {
            Some(url) => {
                self.check_redis_url(&url, "redis.url");
                url.into_inner()
            }
            None => {
                self.error(
                    Some(span),
                    "redis.url",
                    "is missing; [redis] needs url = \"redis://HOST:PORT\", or remove [redis] to keep limits to this process".into(),
                );
                String::new()
            }
        };
        let namespace = match raw.namespace {
            Some(n) => {
                self.check_namespace(&n, "redis.namespace");
                n.into_inner()
            }
            None => CacheConfig::DEFAULT_NAMESPACE.to_owned(),
        };
        let mut bounded = |d: Option<Spanned<super::duration::HumanDuration>>,
                           key: &str,
                           min,
                           max,
                           text: &str,
                           default| {
            match d {
                Some(t) if t.get_ref().0 < min || t.get_ref().0 > max => {
                    self.error(
                        Some(t.span()),
                        key,
                        format!("is out of range; expected {text}"),
                    );
                    default
                }
                Some(t) => t.into_inner().0,
                None => default,
            }
        };
        let timeout = bounded(
            raw.timeout,
            "redis.timeout",
            std::time::Duration::from_millis(1),
            std::time::Duration::from_secs(10),
            "1ms to 10s (a slow Redis costs a call at most this)",
            R::DEFAULT_TIMEOUT,
        );
        let lease = bounded(
            raw.lease,
            "redis.lease",
            std::time::Duration::from_millis(500),
            std::time::Duration::from_secs(300),
            "500ms to 5m (a crashed instance's share comes back within it)",
            R::DEFAULT_LEASE,
        );
        if timeout > lease / 4 {
            self.error(
                None,
                "redis.timeout",
                format!(
                    "{timeout:?} is more than a quarter of redis.lease ({lease:?}): a hold could expire in Redis while this instance still waits to hear; shorten the timeout or lengthen the lease"
                ),
            );
        }
        let local_share = raw.local_share.map(|s| {
            let v = *s.get_ref();
            if !(v > 0.0 && v <= 1.0) {
                self.error(
                    Some(s.span()),
                    "redis.local_share",
                    format!("{v} is out of range; expected a fraction above 0 and at most 1, e.g. 0.5 for one of two instances"),
                );
                return 1.0;
            }
            v
        });
        R {
            url,
            namespace,
            timeout,
            lease,
            local_share,
        }
    }

    /// A `redis://` or `rediss://` URL with a host, else an error at `key`.
    fn check_redis_url(&mut self, url: &Spanned<String>, key: &str) {
        let ok = reqwest::Url::parse(url.get_ref())
            .is_ok_and(|u| matches!(u.scheme(), "redis" | "rediss") && u.has_host());
        if !ok {
            self.error(
                Some(url.span()),
                key,
                "is not a Redis URL; expected redis://HOST:PORT[/DB] or rediss://… for TLS, e.g. \"redis://127.0.0.1:6379\"".into(),
            );
        }
    }

    /// A key prefix of 1 to 64 safe characters, else an error at `key`.
    fn check_namespace(&mut self, n: &Spanned<String>, key: &str) {
        let ok = !n.get_ref().is_empty()
            && n.get_ref().len() <= 64
            && n.get_ref()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
        if !ok {
            self.error(
                Some(n.span()),
                key,
                "expected 1 to 64 letters, digits, `-`, `_`, `.` or `:`".into(),
            );
        }
    }

    /// `[server]`: every size and duration bounded, each error naming the bound.
    fn server(&mut self, raw: super::raw::RawServer) -> super::ServerConfig {
        use super::ServerConfig as S;
        let mut server = S::default();
        if let Some(bind) = raw.bind {
            match bind.get_ref().parse() {
                Ok(ip) => server.bind = ip,
                Err(_) => self.error(
                    Some(bind.span()),
                    "server.bind",
                    format!(
                        "\"{}\" is not an IP address; expected e.g. \"127.0.0.1\" or \"0.0.0.0\"",
                        bind.get_ref()
                    ),
                ),
            }
        }
        if let Some(port) = raw.port {
            server.port = port;
        }
        if let Some(tokens) = raw.auth_tokens {
            // Tokens are not echoed in errors: they are secrets.
            if tokens.iter().any(|t| t.trim().is_empty()) {
                self.error(
                    None,
                    "server.auth_tokens",
                    "contains an empty token; remove it".into(),
                );
            }
            server.auth_tokens = tokens
                .into_iter()
                .map(crate::provider::Secret::new)
                .collect();
        }
        if let Some(metrics_auth) = raw.metrics_auth {
            server.metrics_auth = metrics_auth;
        }
        for (value, name, max, target) in [
            (
                &raw.max_in_flight,
                "max_in_flight",
                S::MAX_IN_FLIGHT,
                &mut server.max_in_flight,
            ),
            (
                &raw.max_connections,
                "max_connections",
                S::MAX_CONNECTIONS,
                &mut server.max_connections,
            ),
            (
                &raw.max_body_bytes,
                "max_body_bytes",
                S::MAX_BODY_BYTES,
                &mut server.max_body_bytes,
            ),
            (
                &raw.max_query_chars,
                "max_query_chars",
                S::MAX_BODY_BYTES,
                &mut server.max_query_chars,
            ),
        ] {
            let Some(v) = value else { continue };
            let n = *v.get_ref();
            if n == 0 {
                self.error(
                    Some(v.span()),
                    format!("server.{name}"),
                    "0 would refuse every request; expected 1 or more".into(),
                );
            } else if n > max {
                self.error(
                    Some(v.span()),
                    format!("server.{name}"),
                    format!("{n} is out of range; expected 1 to {max}"),
                );
            } else {
                *target = n;
            }
        }
        // A duration within (0, max], or up to max when zero has a meaning (`zero` is
        // then `None`); an error naming the bound otherwise.
        fn bounded(
            v: &mut Validator<'_>,
            value: Option<Spanned<super::duration::HumanDuration>>,
            name: &str,
            max: std::time::Duration,
            zero: Option<&str>,
        ) -> Option<std::time::Duration> {
            let value = value?;
            let span = value.span();
            let d = value.into_inner().0;
            let problem = match zero {
                Some(why) if d.is_zero() => format!(
                    "0 {why}; expected a positive duration up to {}",
                    humantime::format_duration(max)
                ),
                _ if d > max => format!(
                    "\"{}\" is too long; expected at most \"{}\"",
                    humantime::format_duration(d),
                    humantime::format_duration(max)
                ),
                _ => return Some(d),
            };
            v.error(Some(span), format!("server.{name}"), problem);
            None
        }
        if let Some(d) = bounded(
            self,
            raw.header_read_timeout,
            "header_read_timeout",
            S::MAX_HEADER_READ_TIMEOUT,
            Some("would close every connection before its first request"),
        ) {
            server.header_read_timeout = d;
        }
        if let Some(d) = bounded(
            self,
            raw.body_read_timeout,
            "body_read_timeout",
            S::MAX_BODY_READ_TIMEOUT,
            Some("would refuse every request with a body"),
        ) {
            server.body_read_timeout = d;
        }
        server.max_request_timeout = bounded(
            self,
            raw.max_request_timeout,
            "max_request_timeout",
            S::MAX_REQUEST_TIMEOUT,
            Some("would time out every request before it starts"),
        );
        // Zero is allowed: cancel whatever is in flight at once.
        if let Some(d) = bounded(
            self,
            raw.drain_timeout,
            "drain_timeout",
            S::MAX_DRAIN_TIMEOUT,
            None,
        ) {
            server.drain_timeout = d;
        }
        server
    }

    /// `[defaults]`: the policy every agent starts from.
    fn defaults_policy(&mut self, raw: &super::raw::RawDefaults) -> CallPolicy {
        let base = CallPolicy::default();
        CallPolicy {
            retry: self.retry(raw.retry.as_ref(), &base.retry, "defaults.retry"),
            attempt_timeout: self.attempt_timeout(
                raw.attempt_timeout.as_ref(),
                base.attempt_timeout,
                "defaults.attempt_timeout",
            ),
        }
    }

    fn attempt_timeout(
        &mut self,
        raw: Option<&Spanned<RawTimeout>>,
        base: Option<std::time::Duration>,
        field: &str,
    ) -> Option<std::time::Duration> {
        match raw {
            None => base,
            Some(t) => match t.get_ref().0 {
                Some(d) if d.is_zero() => {
                    self.error(
                        Some(t.span()),
                        field,
                        "a zero timeout would fail every attempt; expected a positive duration such as \"30s\", or \"none\"".into(),
                    );
                    base
                }
                other => other,
            },
        }
    }

    /// A retry policy: `base` with the fields `raw` sets replaced.
    fn retry(
        &mut self,
        raw: Option<&Spanned<RawRetry>>,
        base: &RetryPolicy,
        field: &str,
    ) -> RetryPolicy {
        let Some(spanned) = raw else {
            return base.clone();
        };
        let r = spanned.get_ref();
        let mut policy = base.clone();
        if let Some(n) = &r.max_attempts {
            if (1..=MAX_ATTEMPTS).contains(n.get_ref()) {
                policy.max_attempts = *n.get_ref();
            } else {
                self.error(
                    Some(n.span()),
                    format!("{field}.max_attempts"),
                    format!(
                        "{} is out of range; expected 1 (no retries) to {MAX_ATTEMPTS}, the first try included",
                        n.get_ref()
                    ),
                );
            }
        }
        if let Some(m) = &r.multiplier {
            if m.get_ref().is_finite() && *m.get_ref() >= 1.0 && *m.get_ref() <= 100.0 {
                policy.multiplier = *m.get_ref();
            } else {
                self.error(
                    Some(m.span()),
                    format!("{field}.multiplier"),
                    format!(
                        "{} is out of range; expected 1.0 (constant delay) to 100.0, e.g. 2.0 to double each time",
                        m.get_ref()
                    ),
                );
            }
        }
        if let Some(d) = r.initial_delay {
            policy.initial_delay = d.0;
        }
        if let Some(d) = r.max_delay {
            policy.max_delay = d.0;
        }
        if let Some(j) = r.jitter {
            policy.jitter = j;
        }
        if let Some(d) = r.retry_after_max {
            policy.retry_after_max = d.0;
        }
        if policy.initial_delay > policy.max_delay {
            self.error(
                Some(spanned.span()),
                field.to_owned(),
                format!(
                    "initial_delay ({:?}) is greater than max_delay ({:?}); expected initial_delay <= max_delay",
                    policy.initial_delay, policy.max_delay
                ),
            );
        }
        policy
    }

    fn breaker(&mut self, raw: Option<Spanned<RawBreaker>>) -> BreakerConfig {
        let mut config = BreakerConfig::default();
        let Some(raw) = raw else { return config };
        let raw = raw.into_inner();
        let field = |name: &str| format!("defaults.breaker.{name}");
        if let Some(enabled) = raw.enabled {
            config.enabled = enabled;
        }
        let kind = raw
            .window
            .unwrap_or(match (&raw.window_size, &raw.window_duration) {
                (None, Some(_)) => RawWindowKind::Time,
                _ => RawWindowKind::Count,
            });
        match kind {
            RawWindowKind::Count => {
                if let Some(d) = &raw.window_duration {
                    self.error(
                        Some(d.span()),
                        field("window_duration"),
                        "applies to a time window, but window = \"count\"; use window_size (calls) instead, or set window = \"time\"".into(),
                    );
                }
                match &raw.window_size {
                    Some(n) if *n.get_ref() == 0 => self.error(
                        Some(n.span()),
                        field("window_size"),
                        "0 calls is no window; expected 1 or more, e.g. 20".into(),
                    ),
                    Some(n) if *n.get_ref() > MAX_WINDOW_SIZE => self.error(
                        Some(n.span()),
                        field("window_size"),
                        format!(
                            "{} calls is out of range; expected 1 to {MAX_WINDOW_SIZE} (the default is 100)",
                            n.get_ref()
                        ),
                    ),
                    Some(n) => config.window = Window::Count(*n.get_ref()),
                    None => {}
                }
            }
            RawWindowKind::Time => {
                if let Some(n) = &raw.window_size {
                    self.error(
                        Some(n.span()),
                        field("window_size"),
                        "applies to a count window, but window = \"time\"; use window_duration instead, e.g. \"60s\"".into(),
                    );
                }
                let duration = match &raw.window_duration {
                    Some(d)
                        if d.get_ref().0 < std::time::Duration::from_secs(1)
                            || d.get_ref().0 > std::time::Duration::from_secs(3600) =>
                    {
                        self.error(
                            Some(d.span()),
                            field("window_duration"),
                            format!(
                                "{:?} is out of range; expected 1s to 1h (the window counts whole seconds)",
                                d.get_ref().0
                            ),
                        );
                        std::time::Duration::from_secs(60)
                    }
                    Some(d) => d.get_ref().0,
                    None => std::time::Duration::from_secs(60),
                };
                config.window = Window::Time(duration);
            }
        }
        for (value, name, target) in [
            (
                &raw.failure_rate_threshold,
                "failure_rate_threshold",
                &mut config.failure_rate_threshold,
            ),
            (
                &raw.slow_call_rate,
                "slow_call_rate",
                &mut config.slow_call_rate,
            ),
        ] {
            if let Some(v) = value {
                if *v.get_ref() > 0.0 && *v.get_ref() <= 1.0 {
                    *target = *v.get_ref();
                } else {
                    self.errors.push(ConfigError {
                        origin: self.origin.to_owned(),
                        position: Some(line_col(self.text, v.span().start)),
                        field: field(name),
                        message: format!(
                            "{} is out of range; expected a fraction above 0 and at most 1, e.g. 0.5 for 50%",
                            v.get_ref()
                        ),
                    });
                }
            }
        }
        for (value, name, target) in [
            (
                &raw.minimum_calls,
                "minimum_calls",
                &mut config.minimum_calls,
            ),
            (
                &raw.half_open_probes,
                "half_open_probes",
                &mut config.half_open_probes,
            ),
        ] {
            if let Some(v) = value {
                if *v.get_ref() >= 1 {
                    *target = *v.get_ref();
                } else {
                    self.errors.push(ConfigError {
                        origin: self.origin.to_owned(),
                        position: Some(line_col(self.text, v.span().start)),
                        field: field(name),
                        message: "0 is out of range; expected 1 or more".into(),
                    });
                }
            }
        }
        for (value, name, target) in [
            (
                &raw.slow_call_threshold,
                "slow_call_threshold",
                &mut config.slow_call_threshold,
            ),
            (&raw.open_for, "open_for", &mut config.open_for),
        ] {
            if let Some(v) = value {
                if v.get_ref().0.is_zero() {
                    self.errors.push(ConfigError {
                        origin: self.origin.to_owned(),
                        position: Some(line_col(self.text, v.span().start)),
                        field: field(name),
                        message: "0s is out of range; expected a positive duration such as \"30s\""
                            .into(),
                    });
                } else {
                    *target = v.get_ref().0;
                }
            }
        }
        // A count window that can never hold `minimum_calls` calls can never open.
        if let (Window::Count(size), Some(min)) = (config.window, &raw.minimum_calls)
            && *min.get_ref() > size
        {
            self.error(
                Some(min.span()),
                field("minimum_calls"),
                format!(
                    "{} is more than window_size ({size}), so the breaker could never open; expected at most {size}",
                    min.get_ref()
                ),
            );
        }
        config
    }

    /// Flow control settings: `base` with what `raw` sets, checked. `field` names the
    /// table in errors (`defaults.flow`, `providers.claude.flow`).
    fn flow(
        &mut self,
        raw: &RawFlow,
        base: &FlowConfig,
        field: &str,
        span: Range<usize>,
    ) -> FlowConfig {
        let mut flow = base.clone();
        let c = &mut flow.concurrency;
        if let Some(adaptive) = raw.adaptive {
            c.enabled = adaptive;
        }
        if let Some(learn) = raw.learn_limits {
            flow.learn_limits = learn;
        }
        let mut errors = Vec::new();
        for (value, name, target) in [
            (raw.min_concurrency, "min_concurrency", &mut c.min),
            (raw.max_concurrency, "max_concurrency", &mut c.max),
            (
                raw.initial_concurrency,
                "initial_concurrency",
                &mut c.initial,
            ),
        ] {
            match value {
                Some(n) if (1..=MAX_FLOW_CONCURRENCY).contains(&n) => *target = n,
                Some(n) => errors.push((
                    name,
                    format!(
                        "{n} is out of range; expected 1 to {MAX_FLOW_CONCURRENCY} calls in flight"
                    ),
                )),
                None => {}
            }
        }
        if c.min > c.max {
            errors.push((
                "min_concurrency",
                format!(
                    "{} is above max_concurrency ({}); expected min_concurrency <= max_concurrency",
                    c.min, c.max
                ),
            ));
        } else if raw.initial_concurrency.is_some() && !(c.min..=c.max).contains(&c.initial) {
            errors.push((
                "initial_concurrency",
                format!(
                    "{} is outside min_concurrency..max_concurrency ({}..{}); expected a start within the bounds",
                    c.initial, c.min, c.max
                ),
            ));
        } else {
            // Bounds moved by this table carry the inherited start along.
            c.initial = c.initial.clamp(c.min, c.max);
        }
        match raw.decrease_ratio {
            Some(r) if r > 0.0 && r < 1.0 => c.decrease_ratio = r,
            Some(r) => errors.push((
                "decrease_ratio",
                format!("{r} is out of range; expected a fraction above 0 and below 1, e.g. 0.9 to cut the limit by 10% on overload"),
            )),
            None => {}
        }
        match raw.latency_factor {
            Some(0.0) => c.latency_factor = None,
            Some(f) if f > 1.0 && f <= 100.0 => c.latency_factor = Some(f),
            Some(f) => errors.push((
                "latency_factor",
                format!("{f} is out of range; expected above 1 (e.g. 2.0: latency twice its baseline counts as overload) up to 100, or 0 to ignore latency"),
            )),
            None => {}
        }
        for (value, name, target) in [
            (raw.rpm, "rpm", &mut flow.rates.rpm),
            (raw.tpm, "tpm", &mut flow.rates.tpm),
            (raw.input_tpm, "input_tpm", &mut flow.rates.input_tpm),
            (raw.output_tpm, "output_tpm", &mut flow.rates.output_tpm),
        ] {
            match value {
                Some(n) if (1..=MAX_PER_MINUTE).contains(&n) => *target = Some(n),
                Some(n) => errors.push((
                    name,
                    format!("{n} is out of range; expected 1 to {MAX_PER_MINUTE} per minute, or leave the key out for no limit"),
                )),
                None => {}
            }
        }
        for (name, message) in errors {
            self.error(Some(span.clone()), format!("{field}.{name}"), message);
        }
        flow
    }

    /// `providers.NAME.http2`: read here rather than by serde, whose error inside a
    /// provider table (buffered by its `kind` tag) would lose the field's name.
    fn http2(&mut self, value: Option<&str>, name: &str, span: Range<usize>) -> Http2 {
        match value.map(str::parse::<Http2>) {
            None => Http2::default(),
            Some(Ok(http2)) => http2,
            Some(Err(_)) => {
                self.error(
                    Some(span),
                    format!("providers.{name}.http2"),
                    format!(
                        "\"{}\" is not an HTTP/2 mode; expected \"auto\" (HTTP/2 by ALPN over https, HTTP/1.1 over http), \"always\" (HTTP/2 only: h2c over http) or \"never\" (HTTP/1.1 only)",
                        value.unwrap_or_default()
                    ),
                );
                Http2::default()
            }
        }
    }

    fn http_provider(&mut self, config: &HttpProviderConfig, name: &str, span: Range<usize>) {
        if let Some(url) = config
            .base_url
            .as_deref()
            .filter(|url| !super::is_http_url(url))
        {
            self.error(
                Some(span.clone()),
                format!("providers.{name}.base_url"),
                format!("\"{url}\" is not an http(s) URL; expected e.g. \"https://api.anthropic.com\" or \"http://127.0.0.1:11434\""),
            );
        }
        let env = &config.api_key_env;
        if env.is_empty() || !env.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            self.error(
                Some(span),
                format!("providers.{name}.api_key_env"),
                // The value is not echoed: it may be a key put in the wrong place.
                "is not an environment variable name (letters, digits and '_'); expected e.g. \"ANTHROPIC_API_KEY\". The key itself never goes in the config: export it in that variable".into(),
            );
        }
    }

    /// Every scripted sim fault must name an agent that exists.
    fn sim_scripts(
        &mut self,
        providers: &BTreeMap<String, ProviderConfig>,
        agents: &[AgentConfig],
    ) {
        for (name, provider) in providers {
            let ProviderConfig::Sim(sim) = provider else {
                continue;
            };
            for (i, script) in sim.faults.script.iter().enumerate() {
                if !agents.iter().any(|a| a.id == script.agent) {
                    let ids: Vec<&str> = agents.iter().map(|a| a.id.as_str()).collect();
                    self.error(
                        None,
                        format!("providers.{name}.faults.script[{i}].agent"),
                        format!(
                            "\"{}\" is not an agent's id; defined: {}",
                            script.agent,
                            ids.join(", ")
                        ),
                    );
                }
            }
        }
    }

    /// The account limits a `sim` provider enforces; each must be above zero.
    fn sim_limits(
        &mut self,
        raw: &super::raw::RawSimLimits,
        name: &str,
        span: Range<usize>,
    ) -> crate::provider::AccountLimits {
        let mut bad = |key: &str, value: String| {
            self.error(
                Some(span.clone()),
                format!("providers.{name}.limits.{key}"),
                format!("{value} is out of range; expected a number above 0, or leave the key out for no limit"),
            );
        };
        let rps = raw.rps.filter(|r| {
            let ok = r.is_finite() && *r > 0.0;
            if !ok {
                bad("rps", r.to_string());
            }
            ok
        });
        let mut positive = |key: &str, value: Option<u64>| {
            value.filter(|v| {
                if *v == 0 {
                    bad(key, "0".into());
                }
                *v > 0
            })
        };
        let rpm = positive("rpm", raw.rpm);
        let tpm = positive("tpm", raw.tpm);
        let max_concurrent =
            positive("max_concurrent", raw.max_concurrent.map(|n| n as u64)).map(|n| n as usize);
        crate::provider::AccountLimits {
            rps,
            rpm,
            tpm,
            max_concurrent,
        }
    }

    fn faults(&mut self, raw: RawFaults, name: &str, span: Range<usize>) -> SimFaults {
        let mut faults = SimFaults {
            retry_after: Some(
                raw.retry_after
                    .map_or(std::time::Duration::from_secs(1), |d| d.0),
            ),
            script: raw
                .script
                .into_iter()
                .map(|s| ScriptedFault {
                    agent: s.agent,
                    first_attempts: s.first_attempts,
                    kind: s.kind,
                })
                .collect(),
            ..SimFaults::default()
        };
        let mut total = 0.0;
        for (value, kind, target) in [
            (raw.rate_limited, "rate_limited", &mut faults.rate_limited),
            (raw.overloaded, "overloaded", &mut faults.overloaded),
            (raw.server, "server", &mut faults.server),
            (raw.timeout, "timeout", &mut faults.timeout),
            (raw.connection, "connection", &mut faults.connection),
        ] {
            let Some(v) = value else { continue };
            if (0.0..=1.0).contains(&v) {
                *target = v;
                total += v;
            } else {
                self.error(
                    Some(span.clone()),
                    format!("providers.{name}.faults.{kind}"),
                    format!(
                        "{v} is out of range; expected a fraction of calls from 0 to 1, e.g. 0.1 for 10%"
                    ),
                );
            }
        }
        if total > 1.0 + 1e-9 {
            self.error(
                Some(span),
                format!("providers.{name}.faults"),
                format!("the fault rates add up to {total}; expected at most 1"),
            );
        }
        faults
    }

    fn providers(
        &mut self,
        raw: BTreeMap<String, Spanned<RawProvider>>,
        flow: &FlowConfig,
        provider_flow: &mut BTreeMap<String, FlowConfig>,
    ) -> BTreeMap<String, ProviderConfig> {
        let mut providers = BTreeMap::new();
        for (name, provider) in raw {
            let span = provider.span();
            if let Err(message) = check_name(&name) {
                self.error(Some(span.clone()), format!("providers.{name}"), message);
            }
            let provider = provider.into_inner();
            let own_flow = match &provider {
                RawProvider::Sim(p) => p.flow.as_ref(),
                RawProvider::Anthropic(p) => p.flow.as_ref(),
                RawProvider::OpenAi(p) => p.flow.as_ref(),
            };
            if let Some(own) = own_flow {
                let config = self.flow(own, flow, &format!("providers.{name}.flow"), span.clone());
                provider_flow.insert(name.clone(), config);
            }
            let config = match provider {
                RawProvider::Sim(sim) => {
                    let defaults = SimOptions::default();
                    let options = SimOptions {
                        latency_min: sim.latency_min.map_or(defaults.latency_min, |d| d.0),
                        latency_max: sim.latency_max.map_or(defaults.latency_max, |d| d.0),
                        seed: sim.seed,
                        faults: self.faults(sim.faults, &name, span.clone()),
                        limits: self.sim_limits(&sim.limits, &name, span.clone()),
                    };
                    if options.latency_min > options.latency_max {
                        self.error(
                            Some(span),
                            format!("providers.{name}"),
                            format!(
                                "latency_min ({:?}) is greater than latency_max ({:?}); expected latency_min <= latency_max",
                                options.latency_min, options.latency_max
                            ),
                        );
                    }
                    ProviderConfig::Sim(options)
                }
                RawProvider::Anthropic(a) => {
                    let config = HttpProviderConfig {
                        base_url: a.base_url,
                        api_key_env: a.api_key_env.unwrap_or_else(|| "ANTHROPIC_API_KEY".into()),
                        key_required: true,
                        version: a.version.unwrap_or_else(|| ANTHROPIC_VERSION.into()),
                        max_tokens_field: MaxTokensField::default(),
                        prompt_cache: a.prompt_cache.unwrap_or(false),
                        http2: self.http2(a.http2.as_deref(), &name, span.clone()),
                    };
                    self.http_provider(&config, &name, span);
                    ProviderConfig::Anthropic(config)
                }
                RawProvider::OpenAi(o) => {
                    let config = HttpProviderConfig {
                        base_url: o.base_url,
                        api_key_env: o.api_key_env.unwrap_or_else(|| "OPENAI_API_KEY".into()),
                        key_required: false,
                        version: String::new(),
                        max_tokens_field: o.max_tokens_field.unwrap_or_default(),
                        prompt_cache: false,
                        http2: self.http2(o.http2.as_deref(), &name, span.clone()),
                    };
                    self.http_provider(&config, &name, span);
                    ProviderConfig::OpenAi(config)
                }
            };
            providers.insert(name, config);
        }
        providers
            .entry("sim".to_owned())
            .or_insert_with(|| ProviderConfig::Sim(SimOptions::default()));
        providers
    }

    fn agents(
        &mut self,
        raw: Vec<RawAgent>,
        span: Range<usize>,
        providers: &BTreeMap<String, ProviderConfig>,
        defaults: &CallPolicy,
        synthesizer_fallback: Option<&str>,
    ) -> Vec<AgentConfig> {
        let mut seen = HashSet::new();
        let mut agents = Vec::with_capacity(raw.len());
        // (agent index, fallback target, its span), checked once every id is known.
        let mut fallbacks = Vec::new();
        for (i, agent) in raw.into_iter().enumerate() {
            let id_span = agent.id.span();
            let (agent, fallback) = self.agent(agent, &format!("agents[{i}]"), providers, defaults);
            if let Err(message) = check_name(&agent.id) {
                self.error(Some(id_span), format!("agents[{i}].id"), message);
            } else if !seen.insert(agent.id.clone()) {
                self.error(
                    Some(id_span),
                    format!("agents[{i}].id"),
                    format!(
                        "\"{}\" is already the id of an earlier agent; ids must be unique",
                        agent.id
                    ),
                );
            }
            if let Some((target, target_span)) = fallback {
                fallbacks.push((i, target, target_span));
            }
            agents.push(agent);
        }
        self.check_fallbacks(&agents, &fallbacks, span, synthesizer_fallback);
        agents
    }

    /// `[cache]`: the backend and its keys, each bounded.
    fn cache(&mut self, raw: Spanned<super::raw::RawCache>) -> CacheConfig {
        let span = raw.span();
        let raw = raw.into_inner();
        let base = CacheConfig::default();
        let backend_name = raw
            .backend
            .as_ref()
            .map_or("memory", |b| b.get_ref().as_str());
        let backend = match backend_name {
            "memory" => {
                if let Some(url) = &raw.url {
                    self.error(
                        Some(url.span()),
                        "cache.url",
                        "is for backend = \"redis\"; remove it, or set backend = \"redis\"".into(),
                    );
                }
                let max_entries = match raw.max_entries {
                    Some(n) if !(1..=100_000_000).contains(n.get_ref()) => {
                        self.error(
                            Some(n.span()),
                            "cache.max_entries",
                            format!("{} is out of range; expected 1 to 100000000", n.get_ref()),
                        );
                        CacheConfig::DEFAULT_MAX_ENTRIES
                    }
                    Some(n) => n.into_inner(),
                    None => CacheConfig::DEFAULT_MAX_ENTRIES,
                };
                let max_bytes = match raw.max_bytes {
                    Some(n) if !(1024..=(64 << 30)).contains(n.get_ref()) => {
                        self.error(
                            Some(n.span()),
                            "cache.max_bytes",
                            format!(
                                "{} is out of range; expected 1024 (1 KiB) to 68719476736 (64 GiB)",
                                n.get_ref()
                            ),
                        );
                        CacheConfig::DEFAULT_MAX_BYTES
                    }
                    Some(n) => n.into_inner(),
                    None => CacheConfig::DEFAULT_MAX_BYTES,
                };
                CacheBackend::Memory {
                    max_entries,
                    max_bytes,
                }
            }
            "redis" => {
                for (key, set) in [
                    ("max_entries", raw.max_entries.as_ref().map(Spanned::span)),
                    ("max_bytes", raw.max_bytes.as_ref().map(Spanned::span)),
                ] {
                    if let Some(at) = set {
                        self.error(
                            Some(at),
                            format!("cache.{key}"),
                            "bounds the memory backend; Redis bounds itself (its maxmemory), so remove it".into(),
                        );
                    }
                }
                match &raw.url {
                    Some(url) => {
                        self.check_redis_url(url, "cache.url");
                        CacheBackend::Redis {
                            url: url.get_ref().clone(),
                        }
                    }
                    // The shared Redis, when there is one.
                    None if self.redis_url.is_some() => CacheBackend::Redis {
                        url: self.redis_url.clone().unwrap_or_default().0,
                    },
                    None => {
                        self.error(
                            Some(span.clone()),
                            "cache.url",
                            "is missing; backend = \"redis\" needs url = \"redis://HOST:PORT\""
                                .into(),
                        );
                        CacheBackend::Redis { url: String::new() }
                    }
                }
            }
            other => {
                let at = raw.backend.as_ref().map(Spanned::span);
                self.error(
                    at,
                    "cache.backend",
                    format!("\"{other}\" is not a cache backend; expected \"memory\" or \"redis\""),
                );
                base.backend.clone()
            }
        };
        let ttl = match raw.ttl {
            Some(t) if t.get_ref().0.is_zero() => {
                self.error(
                    Some(t.span()),
                    "cache.ttl",
                    "0 would keep nothing; give a positive duration such as \"1h\", or remove [cache]".into(),
                );
                base.ttl
            }
            Some(t) => t.into_inner().0,
            None => base.ttl,
        };
        let timeout = match raw.timeout {
            Some(t)
                if t.get_ref().0.is_zero()
                    || t.get_ref().0 > std::time::Duration::from_secs(10) =>
            {
                self.error(
                    Some(t.span()),
                    "cache.timeout",
                    "is out of range; expected 1ms to 10s (a slow cache costs a call at most this)"
                        .into(),
                );
                base.timeout
            }
            Some(t) => t.into_inner().0,
            None => base.timeout,
        };
        let namespace = match raw.namespace {
            Some(n) => {
                self.check_namespace(&n, "cache.namespace");
                n.into_inner()
            }
            None => self
                .redis_url
                .as_ref()
                .map_or(base.namespace, |(_, namespace)| namespace.clone()),
        };
        CacheConfig {
            backend,
            ttl,
            namespace,
            timeout,
            default: raw.default.unwrap_or(true),
        }
    }

    /// `[synthesizer]`: checked as an agent with id `synthesizer`, plus its prompt (it
    /// must use `{replies}`), its fallback (an agent, whose provider and model take
    /// over) and its reserve (less than the request's deadline).
    fn synthesizer(
        &mut self,
        raw: Spanned<RawSynthesizer>,
        providers: &BTreeMap<String, ProviderConfig>,
        defaults: &CallPolicy,
        agents: &[AgentConfig],
        request_timeout: std::time::Duration,
    ) -> SynthesizerConfig {
        let span = raw.span();
        let raw = raw.into_inner();
        let id = SynthesizerConfig::ID;
        if let Some(clash) = agents.iter().position(|a| a.id == id) {
            self.error(
                Some(span.clone()),
                format!("agents[{clash}].id"),
                format!("\"{id}\" is the synthesizer's id in outcomes and logs; give the agent another id"),
            );
        }
        let prompt = match &raw.prompt {
            Some(p) if !p.get_ref().contains(SynthesizerConfig::REPLIES) => {
                self.error(
                    Some(p.span()),
                    "synthesizer.prompt",
                    "the template never uses the agents' replies; put {replies} where they belong (and {query} for the question), e.g. \"Question: {query}\\n\\nReplies:\\n{replies}\\n\\nAnswer the question.\"".into(),
                );
                None
            }
            Some(p) => Some(p.get_ref().clone()),
            None => None,
        };
        if let Some(f) = &raw.fallback
            && f.get_ref().text.is_some()
        {
            self.error(
                Some(f.span()),
                "synthesizer.fallback",
                "the synthesizer falls back to laying the replies end to end by itself; a text fallback has no place here. Name an agent whose provider and model should try first, e.g. fallback = { agent = \"backup\" }".into(),
            );
        }
        if let Some(target) = raw
            .fallback
            .as_ref()
            .and_then(|f| f.get_ref().agent.as_ref())
            && !agents.iter().any(|a| &a.id == target.get_ref())
        {
            let ids: Vec<&str> = agents.iter().map(|a| a.id.as_str()).collect();
            self.error(
                Some(target.span()),
                "synthesizer.fallback.agent",
                format!(
                    "\"{}\" is not an agent's id; defined: {}",
                    target.get_ref(),
                    ids.join(", ")
                ),
            );
        }
        let reserve = match raw.reserve {
            Some(r) if r.get_ref().0 >= request_timeout => {
                self.error(
                    Some(r.span()),
                    "synthesizer.reserve",
                    format!(
                        "{:?} leaves the agents no time inside the request_timeout of {:?}; expected less than request_timeout",
                        r.get_ref().0,
                        request_timeout
                    ),
                );
                SynthesizerConfig::DEFAULT_RESERVE
            }
            Some(r) => r.into_inner().0,
            // The default never takes more than half of a short deadline.
            None => SynthesizerConfig::DEFAULT_RESERVE.min(request_timeout / 2),
        };
        let fallback = raw.fallback.filter(|f| f.get_ref().text.is_none());
        let as_agent = RawAgent {
            id: Spanned::new(span.clone(), id.to_owned()),
            role: Some("Synthesizer".to_owned()),
            system: Some(
                raw.system
                    .unwrap_or_else(|| SynthesizerConfig::DEFAULT_SYSTEM.to_owned()),
            ),
            // Checked above; the agent check wants `{query}`, which this one may leave out.
            prompt: None,
            provider: raw.provider,
            model: raw.model,
            max_tokens: raw.max_tokens,
            temperature: raw.temperature,
            stop_sequences: raw.stop_sequences,
            stream: raw.stream.unwrap_or(true),
            prompt_cache: raw.prompt_cache,
            cache: raw.cache,
            attempt_timeout: raw.attempt_timeout,
            retry: raw.retry,
            fallback,
            standby: false,
        };
        let (mut agent, _) = self.agent(as_agent, "synthesizer", providers, defaults);
        agent.prompt =
            PromptTemplate(prompt.unwrap_or_else(|| SynthesizerConfig::DEFAULT_PROMPT.to_owned()));
        SynthesizerConfig { agent, reserve }
    }

    /// One agent's table (or the synthesizer's, as an agent), its fields named under
    /// `prefix`; with the fallback agent it names, for checking once every id is known.
    fn agent(
        &mut self,
        agent: RawAgent,
        prefix: &str,
        providers: &BTreeMap<String, ProviderConfig>,
        defaults: &CallPolicy,
    ) -> (AgentConfig, Option<(String, Range<usize>)>) {
        let field = |name: &str| format!("{prefix}.{name}");
        let id = agent.id.get_ref().clone();
        let mut fallback_target = None;
        let provider = agent.provider.get_ref().clone();
        let kind = providers.get(&provider).map(ProviderConfig::kind);
        if kind.is_none() {
            let defined: Vec<&str> = providers.keys().map(String::as_str).collect();
            self.error(
                Some(agent.provider.span()),
                field("provider"),
                format!(
                    "\"{provider}\" is not a defined provider; defined: {}",
                    defined.join(", ")
                ),
            );
        }

        let prompt = match agent.prompt {
            None => PromptTemplate::new(PromptTemplate::PLACEHOLDER),
            Some(p) => {
                let template = PromptTemplate::new(p.get_ref().clone());
                if template.is_none() {
                    self.error(
                        Some(p.span()),
                        field("prompt"),
                        "the template never uses the query; put {query} where it belongs, e.g. \"Summarise: {query}\"".into(),
                    );
                }
                template
            }
        };

        let model = match agent.model {
            Some(m) if m.get_ref().trim().is_empty() => {
                self.error(
                    Some(m.span()),
                    field("model"),
                    "is empty; name the model to ask for".into(),
                );
                String::new()
            }
            Some(m) => m.into_inner(),
            None if kind == Some("sim") || kind.is_none() => SIM_DEFAULT_MODEL.to_owned(),
            None => {
                self.error(
                    Some(agent.id.span()),
                    field("model"),
                    "is missing; name the model this agent asks for".into(),
                );
                String::new()
            }
        };

        let max_tokens = match agent.max_tokens {
            Some(m) if *m.get_ref() == 0 => {
                self.error(
                    Some(m.span()),
                    field("max_tokens"),
                    "0 leaves no room for a reply; expected 1 or more".into(),
                );
                DEFAULT_MAX_TOKENS
            }
            Some(m) => m.into_inner(),
            None => DEFAULT_MAX_TOKENS,
        };

        // Anthropic takes 0 to 1; OpenAI-compatible servers and sim 0 to 2.
        let (top, whose) = match kind {
            Some("anthropic") => (1.0, " for an anthropic provider"),
            _ => (2.0, ""),
        };
        let temperature = match agent.temperature {
            Some(t) if !(0.0..=top).contains(t.get_ref()) => {
                self.error(
                    Some(t.span()),
                    field("temperature"),
                    format!(
                        "{} is out of range{whose}; expected 0.0 to {top:.1}",
                        t.get_ref()
                    ),
                );
                None
            }
            t => t.map(Spanned::into_inner),
        };

        // The agent's own setting wins over its provider's. Only Anthropic's cache is
        // opt-in; OpenAI-compatible servers cache long prompts on their own.
        let prompt_cache = match (&agent.prompt_cache, providers.get(&provider)) {
            (Some(p), Some(ProviderConfig::Anthropic(_))) => *p.get_ref(),
            (Some(p), Some(other)) if *p.get_ref() => {
                self.error(
                    Some(p.span()),
                    field("prompt_cache"),
                    format!(
                        "applies to anthropic providers only, and \"{provider}\" is {} {} provider{}; remove it",
                        if other.kind() == "openai" { "an" } else { "a" },
                        other.kind(),
                        if other.kind() == "openai" {
                            " (OpenAI-compatible servers cache long prompts without being asked)"
                        } else {
                            ""
                        }
                    ),
                );
                false
            }
            (None, Some(ProviderConfig::Anthropic(http))) => http.prompt_cache,
            _ => false,
        };

        let policy = CallPolicy {
            retry: self.retry(agent.retry.as_ref(), &defaults.retry, &field("retry")),
            attempt_timeout: self.attempt_timeout(
                agent.attempt_timeout.as_ref(),
                defaults.attempt_timeout,
                &field("attempt_timeout"),
            ),
        };

        let fallback = match agent.fallback {
            None => None,
            Some(f) => {
                let span = f.span();
                match f.into_inner() {
                    super::raw::RawFallback {
                        agent: Some(target),
                        text: None,
                    } => {
                        fallback_target = Some((target.get_ref().clone(), target.span()));
                        Some(FallbackConfig::Agent(target.into_inner()))
                    }
                    super::raw::RawFallback {
                        agent: None,
                        text: Some(text),
                    } => Some(FallbackConfig::Text(text)),
                    _ => {
                        self.error(
                            Some(span),
                            field("fallback"),
                            "expected exactly one of `agent` or `text`, e.g. fallback = { agent = \"backup\" } or fallback = { text = \"No answer available.\" }".into(),
                        );
                        None
                    }
                }
            }
        };

        let config = AgentConfig {
            role: agent.role.unwrap_or_else(|| id.clone()),
            id: id.clone(),
            system: agent.system,
            prompt: prompt.unwrap_or_else(|| PromptTemplate(PromptTemplate::PLACEHOLDER.into())),
            provider,
            model,
            max_tokens,
            temperature,
            stop_sequences: agent.stop_sequences,
            stream: agent.stream,
            prompt_cache,
            cache: agent.cache.unwrap_or(self.cache_default),
            policy,
            fallback,
            standby: agent.standby,
        };
        (config, fallback_target)
    }

    /// Fallback targets exist, chains end, and every standby agent is someone's fallback.
    fn check_fallbacks(
        &mut self,
        agents: &[AgentConfig],
        fallbacks: &[(usize, String, Range<usize>)],
        span: Range<usize>,
        synthesizer_fallback: Option<&str>,
    ) {
        let index: BTreeMap<&str, usize> = agents
            .iter()
            .enumerate()
            .map(|(i, a)| (a.id.as_str(), i))
            .collect();
        for (i, target, target_span) in fallbacks {
            let field = format!("agents[{i}].fallback.agent");
            let Some(&t) = index.get(target.as_str()) else {
                let ids: Vec<&str> = agents.iter().map(|a| a.id.as_str()).collect();
                self.error(
                    Some(target_span.clone()),
                    field,
                    format!(
                        "\"{target}\" is not an agent's id; defined: {}",
                        ids.join(", ")
                    ),
                );
                continue;
            };
            if t == *i {
                self.error(
                    Some(target_span.clone()),
                    field,
                    "an agent cannot be its own fallback; name another agent (a different model or provider)".into(),
                );
                continue;
            }
            // Follow the chain: it must end before it comes back to this agent.
            let mut seen = vec![*i];
            let mut at = t;
            while let Some(FallbackConfig::Agent(next)) = &agents[at].fallback {
                seen.push(at);
                match index.get(next.as_str()) {
                    Some(&n) if seen.contains(&n) => {
                        let chain: Vec<&str> = seen
                            .iter()
                            .chain(std::iter::once(&n))
                            .map(|&k| agents[k].id.as_str())
                            .collect();
                        self.error(
                            Some(target_span.clone()),
                            field.clone(),
                            format!(
                                "the fallbacks form a loop ({}); a chain of fallbacks must end",
                                chain.join(" -> ")
                            ),
                        );
                        break;
                    }
                    Some(&n) => at = n,
                    None => break, // reported on its own agent
                }
            }
        }
        for (i, agent) in agents.iter().enumerate() {
            if agent.standby
                && synthesizer_fallback != Some(agent.id.as_str())
                && !agents
                    .iter()
                    .any(|a| a.fallback == Some(FallbackConfig::Agent(agent.id.clone())))
            {
                self.error(
                    Some(span.clone()),
                    format!("agents[{i}].standby"),
                    format!(
                        "\"{}\" is standby but no agent falls back to it, so it would never run; name it in another agent's fallback = {{ agent = \"{}\" }}, or remove standby",
                        agent.id, agent.id
                    ),
                );
            }
        }
        if !agents.is_empty() && agents.iter().all(|a| a.standby) {
            self.error(
                Some(span),
                "agents",
                "every agent is standby, so none would run; remove standby from at least one"
                    .into(),
            );
        }
    }
}

fn retry_budget(raw: Option<Spanned<RawRetryBudget>>) -> RetryBudgetConfig {
    let base = RetryBudgetConfig::default();
    let Some(raw) = raw.map(Spanned::into_inner) else {
        return base;
    };
    RetryBudgetConfig {
        capacity: raw.capacity.unwrap_or(base.capacity),
        retry_cost: raw.retry_cost.unwrap_or(base.retry_cost),
        timeout_cost: raw.timeout_cost.unwrap_or(base.timeout_cost),
        success_deposit: raw.success_deposit.unwrap_or(base.success_deposit),
    }
}

/// `prices.MODEL…` with the model id quoted, as it is written in TOML and in the
/// validator's own messages: model ids hold dots (`gpt-4.1`).
fn quote_model(path: &str) -> String {
    let Some(rest) = path.strip_prefix("prices.") else {
        return path.to_owned();
    };
    // The model id is everything up to the last known key, if one follows it.
    let keys = [
        ".input_per_mtok",
        ".output_per_mtok",
        ".cache_write_per_mtok",
        ".cache_read_per_mtok",
        ".$__serde_spanned_private_value",
    ];
    let end = keys
        .iter()
        .filter_map(|k| rest.find(k))
        .min()
        .unwrap_or(rest.len());
    format!("prices.\"{}\"{}", &rest[..end], &rest[end..])
}

/// The six agents of the embedded default, used when a config defines none.
fn default_agents() -> Vec<AgentConfig> {
    default_config().agents
}

fn default_config() -> Config {
    super::Config::from_toml_str(EMBEDDED_DEFAULT, super::EMBEDDED_ORIGIN)
        .expect("the embedded default config is validated by the test suite")
}

/// Ids and provider names appear in logs, metrics labels and URLs: keep them plain.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty; expected a name of letters, digits, '-' or '_'".into());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "\"{name}\" contains {bad:?}; use only letters, digits, '-' and '_'"
        ));
    }
    Ok(())
}

/// Accepts what `RUST_LOG` accepts: `warn`, `info`, `metaorch=debug,warn`, …
pub(super) fn check_log_filter(filter: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map(drop)
        .map_err(|e| {
            format!(
                "\"{filter}\" is not a log filter ({e}); expected error, warn, info, debug, trace, or RUST_LOG directives such as \"metaorch=debug,warn\""
            )
        })
}
