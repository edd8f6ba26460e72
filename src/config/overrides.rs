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
    /// The fields whose values came from the environment, with the variable each came
    /// from: their errors name the variable, whatever `origin` says.
    pub from_env: Vec<(&'static str, &'static str)>,
}

/// Each overridable field and the variable that sets it.
const VARIABLES: [(&str, &str); 7] = [
    ("concurrency_limit", "METAORCH_CONCURRENCY_LIMIT"),
    ("request_timeout", "METAORCH_REQUEST_TIMEOUT"),
    ("min_successes", "METAORCH_MIN_SUCCESSES"),
    ("log_level", "METAORCH_LOG_LEVEL"),
    ("log_file", "METAORCH_LOG_FILE"),
    ("server.auth_tokens", "METAORCH_SERVER_TOKENS"),
    ("seed", "METAORCH_SEED"),
];

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
        if let Some(v) = read("METAORCH_SERVER_TOKENS") {
            // A token list with an empty entry ("," or "a,,b") is a mistake; taken
            // as given it could turn authentication off. The tokens are not echoed.
            let tokens: Vec<&str> = v.split(',').map(str::trim).collect();
            if tokens.iter().any(|t| t.is_empty()) {
                errors.push(ConfigError {
                    origin: "environment".into(),
                    position: None,
                    field: "METAORCH_SERVER_TOKENS".into(),
                    message: "contains an empty token; expected tokens separated by commas, such as \"token1,token2\", with none empty (unset the variable for no authentication)".into(),
                });
            } else {
                o.server_tokens = Some(
                    tokens
                        .into_iter()
                        .map(crate::provider::Secret::new)
                        .collect(),
                );
            }
        }
        o.from_env = VARIABLES
            .into_iter()
            .filter(|(field, _)| o.sets(field))
            .collect();
        if errors.is_empty() {
            Ok(o)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Whether this sets `field`.
    fn sets(&self, field: &str) -> bool {
        match field {
            "concurrency_limit" => self.concurrency_limit.is_some(),
            "request_timeout" => self.request_timeout.is_some(),
            "min_successes" => self.min_successes.is_some(),
            "log_level" => self.log_level.is_some(),
            "log_file" => self.log_file.is_some(),
            "server.auth_tokens" => self.server_tokens.is_some(),
            "seed" => self.seed.is_some(),
            _ => false,
        }
    }

    /// `self` with every value that `higher` sets replaced by `higher`'s.
    pub fn then(self, higher: Overrides) -> Overrides {
        let mut from_env: Vec<_> = self
            .from_env
            .iter()
            .copied()
            .filter(|(field, _)| !higher.sets(field))
            .collect();
        from_env.extend(higher.from_env.iter().copied());
        Overrides {
            from_env,
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
            let (origin, field) = match self.from_env.iter().find(|(f, _)| *f == field) {
                Some((_, variable)) => ("environment".to_owned(), (*variable).to_owned()),
                None => (self.origin.clone(), field.to_owned()),
            };
            errors.push(ConfigError {
                origin,
                position: None,
                field,
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
    fn errors_of_values_from_the_environment_name_the_variable() {
        let mut config = Config::embedded();
        let from_env = Overrides::from_env(env(&[("METAORCH_CONCURRENCY_LIMIT", "0")])).unwrap();
        let flags = Overrides {
            origin: "command line".into(),
            min_successes: Some(99),
            ..Overrides::default()
        };
        let err = config.apply(&from_env.then(flags)).unwrap_err().to_string();
        assert!(
            err.contains("environment: METAORCH_CONCURRENCY_LIMIT: 0 would let no agent call run"),
            "{err}"
        );
        assert!(err.contains("command line: min_successes: 99"), "{err}");
    }

    #[test]
    fn a_token_list_with_an_empty_token_is_refused() {
        for value in [",", "secret,,token", " , "] {
            let err = Overrides::from_env(env(&[("METAORCH_SERVER_TOKENS", value)]))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("METAORCH_SERVER_TOKENS: contains an empty token"),
                "{err}"
            );
            assert!(!err.contains("secret"), "tokens are never echoed: {err}");
        }
        let o = Overrides::from_env(env(&[("METAORCH_SERVER_TOKENS", "a, b")])).unwrap();
        assert_eq!(o.server_tokens.unwrap().len(), 2);
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
