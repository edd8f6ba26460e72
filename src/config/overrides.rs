//! Overrides from the environment (`METAORCH_*`) and from command-line flags, applied
//! on top of a loaded config. Flags beat the environment, which beats the file.

use std::time::Duration;

use super::{Config, ConfigError, ConfigErrors, ProviderConfig, duration, validate};

/// Values that replace the config file's. `None` leaves the file's value alone.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// Where these came from, for error messages (`environment`, `command line`).
    pub origin: String,
    /// Replaces `concurrency_limit`.
    pub concurrency_limit: Option<usize>,
    /// Replaces `request_timeout`.
    pub request_timeout: Option<Duration>,
    /// Replaces `min_successes`.
    pub min_successes: Option<usize>,
    /// Replaces `log.level`.
    pub log_level: Option<String>,
    /// Replaces `log.file`.
    pub log_file: Option<std::path::PathBuf>,
    /// Replaces `server.auth_tokens` (comma-separated in `METAORCH_SERVER_TOKENS`).
    pub server_tokens: Option<Vec<crate::provider::Secret>>,
    /// Replaces `seed`, and the seed of every `sim` provider.
    pub seed: Option<u64>,
}

impl Overrides {
    /// Reads `METAORCH_CONCURRENCY_LIMIT`, `METAORCH_REQUEST_TIMEOUT`,
    /// `METAORCH_MIN_SUCCESSES`, `METAORCH_LOG_LEVEL`, `METAORCH_LOG_FILE` and
    /// `METAORCH_SEED` through `get`
    /// (pass `|k| std::env::var(k).ok()`). Empty values count as unset.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Overrides, ConfigErrors> {
        let mut errors = Vec::new();
        let read = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let mut bad = |name: &str, value: &str, message: String| {
            errors.push(ConfigError {
                origin: "environment".into(),
                position: None,
                field: format!("{name}={value:?}"),
                message,
            });
        };

        let mut o = Overrides {
            origin: "environment".into(),
            ..Overrides::default()
        };
        if let Some(v) = read("METAORCH_CONCURRENCY_LIMIT") {
            match v.trim().parse::<usize>() {
                Ok(n) => o.concurrency_limit = Some(n),
                Err(_) => bad(
                    "METAORCH_CONCURRENCY_LIMIT",
                    &v,
                    "expected a whole number of 1 or more, such as 4".into(),
                ),
            }
        }
        if let Some(v) = read("METAORCH_REQUEST_TIMEOUT") {
            match duration::parse(&v) {
                Ok(d) => o.request_timeout = Some(d),
                Err(message) => bad("METAORCH_REQUEST_TIMEOUT", &v, message),
            }
        }
        if let Some(v) = read("METAORCH_MIN_SUCCESSES") {
            match v.trim().parse::<usize>() {
                Ok(n) => o.min_successes = Some(n),
                Err(_) => bad(
                    "METAORCH_MIN_SUCCESSES",
                    &v,
                    "expected a whole number, such as 3".into(),
                ),
            }
        }
        if let Some(v) = read("METAORCH_LOG_LEVEL") {
            o.log_level = Some(v);
        }
        if let Some(v) = read("METAORCH_LOG_FILE") {
            o.log_file = Some(v.into());
        }
        if let Some(v) = read("METAORCH_SERVER_TOKENS") {
            o.server_tokens = Some(
                v.split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(crate::provider::Secret::new)
                    .collect(),
            );
        }
        if let Some(v) = read("METAORCH_SEED") {
            match v.trim().parse::<u64>() {
                Ok(n) => o.seed = Some(n),
                Err(_) => bad(
                    "METAORCH_SEED",
                    &v,
                    "expected a whole number from 0 to 18446744073709551615".into(),
                ),
            }
        }
        if errors.is_empty() {
            Ok(o)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// `self` with every value that `higher` sets replaced by `higher`'s.
    pub fn then(self, higher: Overrides) -> Overrides {
        Overrides {
            origin: higher.origin,
            concurrency_limit: higher.concurrency_limit.or(self.concurrency_limit),
            request_timeout: higher.request_timeout.or(self.request_timeout),
            min_successes: higher.min_successes.or(self.min_successes),
            log_level: higher.log_level.or(self.log_level),
            log_file: higher.log_file.or(self.log_file),
            server_tokens: higher.server_tokens.or(self.server_tokens),
            seed: higher.seed.or(self.seed),
        }
    }

    pub(super) fn apply_to(&self, config: &mut Config) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        let mut bad = |field: &str, message: String| {
            errors.push(ConfigError {
                origin: self.origin.clone(),
                position: None,
                field: field.into(),
                message,
            });
        };
        if let Some(n) = self.concurrency_limit {
            if n == 0 {
                bad(
                    "concurrency_limit",
                    "0 would let no agent call run; expected 1 or more".into(),
                );
            } else {
                config.concurrency_limit = n;
            }
        }
        if let Some(d) = self.request_timeout {
            if d.is_zero() {
                bad(
                    "request_timeout",
                    "a zero deadline would time out every request; expected a positive duration such as \"30s\"".into(),
                );
            } else {
                config.request_timeout = d;
            }
        }
        if let Some(n) = self.min_successes {
            let active = config.active_agents().count();
            if n > active {
                bad(
                    "min_successes",
                    format!(
                        "{n} is more than the {active} configured agents; expected 0 to {active}"
                    ),
                );
            } else {
                config.min_successes = n;
            }
        }
        if let Some(level) = &self.log_level {
            match validate::check_log_filter(level) {
                Ok(()) => config.log_level = Some(level.clone()),
                Err(message) => bad("log_level", message),
            }
        }
        if let Some(file) = &self.log_file {
            config.log_file = Some(file.clone());
        }
        if let Some(tokens) = &self.server_tokens {
            config.server.auth_tokens = tokens.clone();
        }
        if let Some(seed) = self.seed {
            config.seed = Some(seed);
            for provider in config.providers.values_mut() {
                if let ProviderConfig::Sim(sim) = provider {
                    sim.seed = Some(seed);
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn environment_overrides_the_file_and_flags_override_the_environment() {
        let mut config =
            Config::from_toml_str("concurrency_limit = 2\nrequest_timeout = \"5s\"", "f.toml")
                .unwrap();
        let from_env = Overrides::from_env(env(&[
            ("METAORCH_CONCURRENCY_LIMIT", "3"),
            ("METAORCH_REQUEST_TIMEOUT", "7s"),
            ("METAORCH_LOG_LEVEL", "debug"),
        ]))
        .unwrap();
        let flags = Overrides {
            origin: "command line".into(),
            concurrency_limit: Some(5),
            ..Overrides::default()
        };
        config.apply(&from_env.then(flags)).unwrap();
        assert_eq!(config.concurrency_limit, 5);
        assert_eq!(config.request_timeout, Duration::from_secs(7));
        assert_eq!(config.log_level.as_deref(), Some("debug"));
    }

    #[test]
    fn bad_environment_values_name_the_variable_and_the_fix() {
        let err = Overrides::from_env(env(&[
            ("METAORCH_CONCURRENCY_LIMIT", "lots"),
            ("METAORCH_REQUEST_TIMEOUT", "30"),
        ]))
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.errors().len(), 2, "{text}");
        assert!(
            text.contains("METAORCH_CONCURRENCY_LIMIT=\"lots\": expected a whole number"),
            "{text}"
        );
        assert!(text.contains("METAORCH_REQUEST_TIMEOUT=\"30\""), "{text}");
    }

    #[test]
    fn overrides_are_checked_against_the_config() {
        let mut config = Config::embedded();
        let o = Overrides {
            origin: "command line".into(),
            concurrency_limit: Some(0),
            min_successes: Some(7),
            log_level: Some("loud[".into()),
            ..Overrides::default()
        };
        let err = config.apply(&o).unwrap_err();
        assert_eq!(err.errors().len(), 3, "{err}");
        assert_eq!(
            config.concurrency_limit,
            crate::config::DEFAULT_CONCURRENCY_LIMIT,
            "a rejected override changes nothing"
        );
    }

    #[test]
    fn seed_reaches_every_sim_provider() {
        let mut config = Config::embedded();
        config
            .apply(&Overrides {
                seed: Some(9),
                ..Overrides::default()
            })
            .unwrap();
        let ProviderConfig::Sim(sim) = &config.providers["sim"] else {
            panic!("sim is a sim")
        };
        assert_eq!(sim.seed, Some(9));
    }
}
