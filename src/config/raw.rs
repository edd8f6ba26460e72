//! The config file's schema, exactly as written in TOML. Every table denies unknown
//! keys. Values that need checks serde cannot make carry their span, so the validator
//! can point at them; [`super::Config`] is what comes out once they pass.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::duration::HumanDuration;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub concurrency_limit: Option<Spanned<usize>>,
    pub request_timeout: Option<Spanned<HumanDuration>>,
    pub min_successes: Option<Spanned<usize>>,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub providers: BTreeMap<String, Spanned<RawProvider>>,
    pub agents: Option<Spanned<Vec<RawAgent>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLog {
    pub level: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub(crate) enum RawProvider {
    Sim(RawSim),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSim {
    pub latency_min: Option<HumanDuration>,
    pub latency_max: Option<HumanDuration>,
    pub seed: Option<u64>,
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
}
