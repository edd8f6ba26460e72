//! Turns a [`RawConfig`] into a [`Config`], collecting every problem rather than
//! stopping at the first, each with its place in the file.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;

use toml::Spanned;

use super::error::line_col;
use super::raw::{RawAgent, RawConfig, RawProvider};
use super::{
    AgentConfig, Config, ConfigError, ConfigErrors, DEFAULT_CONCURRENCY_LIMIT, DEFAULT_LOG_LEVEL,
    DEFAULT_MAX_TOKENS, DEFAULT_MIN_SUCCESSES, DEFAULT_REQUEST_TIMEOUT, EMBEDDED_DEFAULT,
    PromptTemplate, ProviderConfig,
};
use crate::provider::SimOptions;

/// The model a `sim` agent asks for when it names none.
const SIM_DEFAULT_MODEL: &str = "sim-1";

pub(super) fn parse_and_validate(text: &str, origin: &str) -> Result<Config, ConfigErrors> {
    let raw: RawConfig =
        serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
            // `Spanned` shows up in the path as a private key; people never wrote it.
            let field = e
                .path()
                .to_string()
                .replace(".$__serde_spanned_private_value", "");
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
        let log_level = match raw.log.level {
            Some(level) => {
                if let Err(message) = check_log_filter(level.get_ref()) {
                    self.error(Some(level.span()), "log.level", message);
                }
                level.into_inner()
            }
            None => DEFAULT_LOG_LEVEL.to_owned(),
        };

        let providers = self.providers(raw.providers);
        let agents = match raw.agents {
            Some(agents) if agents.get_ref().is_empty() => {
                self.error(
                    Some(agents.span()),
                    "agents",
                    "the list is empty; define at least one [[agents]] table, or remove `agents` to use the six default agents".into(),
                );
                Vec::new()
            }
            Some(agents) => self.agents(agents.into_inner(), &providers),
            None => default_agents(),
        };

        let min_successes = match raw.min_successes {
            Some(v) if *v.get_ref() > agents.len() && !agents.is_empty() => {
                self.error(
                    Some(v.span()),
                    "min_successes",
                    format!(
                        "{} is more than the {} configured agents; expected 0 to {}",
                        v.get_ref(),
                        agents.len(),
                        agents.len()
                    ),
                );
                DEFAULT_MIN_SUCCESSES
            }
            Some(v) => v.into_inner(),
            None => DEFAULT_MIN_SUCCESSES.min(agents.len()),
        };

        Config {
            origin: self.origin.to_owned(),
            concurrency_limit,
            request_timeout,
            min_successes,
            log_level,
            providers,
            agents,
        }
    }

    fn providers(
        &mut self,
        raw: BTreeMap<String, Spanned<RawProvider>>,
    ) -> BTreeMap<String, ProviderConfig> {
        let mut providers = BTreeMap::new();
        for (name, provider) in raw {
            let span = provider.span();
            if let Err(message) = check_name(&name) {
                self.error(Some(span.clone()), format!("providers.{name}"), message);
            }
            let config = match provider.into_inner() {
                RawProvider::Sim(sim) => {
                    let defaults = SimOptions::default();
                    let options = SimOptions {
                        latency_min: sim.latency_min.map_or(defaults.latency_min, |d| d.0),
                        latency_max: sim.latency_max.map_or(defaults.latency_max, |d| d.0),
                        seed: sim.seed,
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
        providers: &BTreeMap<String, ProviderConfig>,
    ) -> Vec<AgentConfig> {
        let mut seen = HashSet::new();
        let mut agents = Vec::with_capacity(raw.len());
        for (i, agent) in raw.into_iter().enumerate() {
            let field = |name: &str| format!("agents[{i}].{name}");

            let id = agent.id.get_ref().clone();
            if let Err(message) = check_name(&id) {
                self.error(Some(agent.id.span()), field("id"), message);
            } else if !seen.insert(id.clone()) {
                self.error(
                    Some(agent.id.span()),
                    field("id"),
                    format!("\"{id}\" is already the id of an earlier agent; ids must be unique"),
                );
            }

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

            let temperature = match agent.temperature {
                Some(t) if !(0.0..=2.0).contains(t.get_ref()) => {
                    self.error(
                        Some(t.span()),
                        field("temperature"),
                        format!("{} is out of range; expected 0.0 to 2.0", t.get_ref()),
                    );
                    None
                }
                t => t.map(Spanned::into_inner),
            };

            agents.push(AgentConfig {
                role: agent.role.unwrap_or_else(|| id.clone()),
                id,
                system: agent.system,
                prompt: prompt
                    .unwrap_or_else(|| PromptTemplate(PromptTemplate::PLACEHOLDER.into())),
                provider,
                model,
                max_tokens,
                temperature,
            });
        }
        agents
    }
}

/// The six agents of the embedded default, used when a config defines none.
fn default_agents() -> Vec<AgentConfig> {
    super::Config::from_toml_str(EMBEDDED_DEFAULT, super::EMBEDDED_ORIGIN)
        .expect("the embedded default config is validated by the test suite")
        .agents
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
