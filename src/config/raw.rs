//! The config file's schema, exactly as written in TOML. Every table denies unknown
//! keys. Values that need checks serde cannot make carry their span, so the validator
//! can point at them; [`super::Config`] is what comes out once they pass.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::duration::HumanDuration;
use crate::resilience::Jitter;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub concurrency_limit: Option<Spanned<usize>>,
    pub request_timeout: Option<Spanned<HumanDuration>>,
    pub min_successes: Option<Spanned<usize>>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub defaults: RawDefaults,
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub telemetry: RawTelemetry,
    pub retry_budget: Option<Spanned<RawRetryBudget>>,
    #[serde(default)]
    pub providers: BTreeMap<String, Spanned<RawProvider>>,
    pub agents: Option<Spanned<Vec<RawAgent>>>,
    pub synthesizer: Option<Spanned<RawSynthesizer>>,
    pub cache: Option<Spanned<RawCache>>,
    pub redis: Option<Spanned<RawRedis>>,
    /// `[prices."MODEL"]`, by model id.
    #[serde(default)]
    pub prices: BTreeMap<String, Spanned<RawPrice>>,
}

/// `[prices."MODEL"]`: US dollars per million tokens. The two base prices are
/// optional here so that a missing one is reported with its place and field.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPrice {
    pub input_per_mtok: Option<Spanned<f64>>,
    pub output_per_mtok: Option<Spanned<f64>>,
    pub cache_write_per_mtok: Option<Spanned<f64>>,
    pub cache_read_per_mtok: Option<Spanned<f64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLog {
    pub level: Option<Spanned<String>>,
    pub file: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTelemetry {
    pub otlp_endpoint: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    pub bind: Option<Spanned<String>>,
    pub port: Option<u16>,
    pub auth_tokens: Option<Vec<String>>,
    pub max_in_flight: Option<Spanned<usize>>,
    pub max_body_bytes: Option<Spanned<usize>>,
    pub max_query_chars: Option<Spanned<usize>>,
    pub drain_timeout: Option<Spanned<HumanDuration>>,
    pub max_request_timeout: Option<Spanned<HumanDuration>>,
    pub header_read_timeout: Option<Spanned<HumanDuration>>,
    pub body_read_timeout: Option<Spanned<HumanDuration>>,
    pub max_connections: Option<Spanned<usize>>,
    pub metrics_auth: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDefaults {
    pub attempt_timeout: Option<Spanned<RawTimeout>>,
    pub retry: Option<Spanned<RawRetry>>,
    pub breaker: Option<Spanned<RawBreaker>>,
    pub flow: Option<Spanned<RawFlow>>,
}

/// `[defaults.flow]` and `[providers.NAME.flow]`. No `Spanned` fields: it also sits
/// inside the internally tagged provider tables, where spans are lost.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFlow {
    pub adaptive: Option<bool>,
    pub initial_concurrency: Option<u32>,
    pub min_concurrency: Option<u32>,
    pub max_concurrency: Option<u32>,
    pub decrease_ratio: Option<f64>,
    pub latency_factor: Option<f64>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub input_tpm: Option<u64>,
    pub output_tpm: Option<u64>,
    pub learn_limits: Option<bool>,
}

/// A duration, or `"none"` for no limit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawTimeout(pub Option<std::time::Duration>);

impl<'de> Deserialize<'de> for RawTimeout {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.trim() == "none" {
            return Ok(RawTimeout(None));
        }
        super::duration::parse(&text)
            .map(|d| RawTimeout(Some(d)))
            .map_err(|e| serde::de::Error::custom(format!("{e}, or \"none\" for no limit")))
    }
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetry {
    pub max_attempts: Option<Spanned<u32>>,
    pub initial_delay: Option<HumanDuration>,
    pub multiplier: Option<Spanned<f64>>,
    pub max_delay: Option<HumanDuration>,
    pub jitter: Option<Jitter>,
    pub retry_after_max: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBreaker {
    pub enabled: Option<bool>,
    pub window: Option<RawWindowKind>,
    pub window_size: Option<Spanned<u32>>,
    pub window_duration: Option<Spanned<HumanDuration>>,
    pub failure_rate_threshold: Option<Spanned<f64>>,
    pub slow_call_threshold: Option<Spanned<HumanDuration>>,
    pub slow_call_rate: Option<Spanned<f64>>,
    pub minimum_calls: Option<Spanned<u32>>,
    pub open_for: Option<Spanned<HumanDuration>>,
    pub half_open_probes: Option<Spanned<u32>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawWindowKind {
    Count,
    Time,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetryBudget {
    pub capacity: Option<u32>,
    pub retry_cost: Option<u32>,
    pub timeout_cost: Option<u32>,
    pub success_deposit: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub(crate) enum RawProvider {
    Sim(RawSim),
    Anthropic(RawAnthropic),
    #[serde(rename = "openai")]
    OpenAi(RawOpenAi),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAnthropic {
    pub base_url: Option<String>,
    pub api_key_env: Option<String>,
    pub version: Option<String>,
    pub prompt_cache: Option<bool>,
    pub http2: Option<String>,
    pub flow: Option<RawFlow>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOpenAi {
    pub base_url: Option<String>,
    pub api_key_env: Option<String>,
    pub max_tokens_field: Option<crate::provider::MaxTokensField>,
    pub http2: Option<String>,
    pub flow: Option<RawFlow>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSim {
    pub latency_min: Option<HumanDuration>,
    pub latency_max: Option<HumanDuration>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub faults: RawFaults,
    #[serde(default)]
    pub limits: RawSimLimits,
    pub flow: Option<RawFlow>,
}

/// `[providers.NAME.limits]` on `sim`: the account limits the simulator enforces.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSimLimits {
    pub rps: Option<f64>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub max_concurrent: Option<usize>,
}

/// Inside the internally tagged provider table, so no `Spanned` fields: serde buffers
/// the table and the spans are lost. Errors point at the provider's table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFaults {
    pub rate_limited: Option<f64>,
    pub overloaded: Option<f64>,
    pub server: Option<f64>,
    pub timeout: Option<f64>,
    pub connection: Option<f64>,
    pub retry_after: Option<HumanDuration>,
    #[serde(default)]
    pub script: Vec<RawScriptedFault>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawScriptedFault {
    pub agent: String,
    pub first_attempts: u32,
    pub kind: crate::provider::SimFault,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFallback {
    pub agent: Option<Spanned<String>>,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAgent {
    pub id: Spanned<String>,
    pub role: Option<String>,
    pub system: Option<String>,
    pub prompt: Option<Spanned<String>>,
    pub provider: Spanned<String>,
    pub model: Option<Spanned<String>>,
    pub max_tokens: Option<Spanned<u32>>,
    pub temperature: Option<Spanned<f32>>,
    #[serde(default)]
    pub stop_sequences: Vec<String>,
    #[serde(default)]
    pub stream: bool,
    pub prompt_cache: Option<Spanned<bool>>,
    pub cache: Option<bool>,
    pub attempt_timeout: Option<Spanned<RawTimeout>>,
    pub retry: Option<Spanned<RawRetry>>,
    pub fallback: Option<Spanned<RawFallback>>,
    #[serde(default)]
    pub standby: bool,
}

/// `[synthesizer]`: an agent's fields (no id, role or standby) and the time kept back
/// for it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSynthesizer {
    pub provider: Spanned<String>,
    pub model: Option<Spanned<String>>,
    pub system: Option<String>,
    pub prompt: Option<Spanned<String>>,
    pub max_tokens: Option<Spanned<u32>>,
    pub temperature: Option<Spanned<f32>>,
    #[serde(default)]
    pub stop_sequences: Vec<String>,
    pub stream: Option<bool>,
    pub prompt_cache: Option<Spanned<bool>>,
    pub cache: Option<bool>,
    pub attempt_timeout: Option<Spanned<RawTimeout>>,
    pub retry: Option<Spanned<RawRetry>>,
    pub fallback: Option<Spanned<RawFallback>>,
    pub reserve: Option<Spanned<HumanDuration>>,
}

/// `[redis]`: limits, pauses and cache shared by every instance of a namespace.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRedis {
    pub url: Option<Spanned<String>>,
    pub namespace: Option<Spanned<String>>,
    pub timeout: Option<Spanned<HumanDuration>>,
    pub lease: Option<Spanned<HumanDuration>>,
    pub local_share: Option<Spanned<f64>>,
}

/// `[cache]`: the response cache.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCache {
    pub backend: Option<Spanned<String>>,
    pub ttl: Option<Spanned<HumanDuration>>,
    pub max_entries: Option<Spanned<u64>>,
    pub max_bytes: Option<Spanned<u64>>,
    pub url: Option<Spanned<String>>,
    pub namespace: Option<Spanned<String>>,
    pub timeout: Option<Spanned<HumanDuration>>,
    pub default: Option<bool>,
}
