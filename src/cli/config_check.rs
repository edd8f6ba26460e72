//! `metaorch config check [FILE]`: validate a config and explain each problem.

use std::path::Path;
use std::process::ExitCode;

use metaorch::config::{Config, EMBEDDED_ORIGIN, Overrides};

use super::args::Cli;

pub fn check(cli: &Cli, file: Option<&Path>) -> anyhow::Result<ExitCode> {
    let loaded = match file {
        Some(path) => Config::from_file(path).and_then(|mut config| {
            // The environment is checked too: it is part of what `run` would use.
            let env = Overrides::from_env(|k| std::env::var(k).ok())?;
            config.apply(&env)?;
            Ok(config)
        }),
        None => super::load_config(cli, Overrides::default()),
    };
    match loaded {
        Ok(config) => {
            let problems = config.check_environment(|k| std::env::var(k).ok());
            let mut out = summary(&config);
            for p in &problems {
                let label = if p.error { "error" } else { "warning" };
                out.push_str(&format!("{label}: {}\n", p.message));
            }
            // A model without a price is no error: its cost is reported as unknown.
            for warning in config.check_prices() {
                out.push_str(&format!("warning: {warning}\n"));
            }
            super::print_out(&out)?;
            Ok(if problems.iter().any(|p| p.error) {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Err(errors) => {
            let out: String = errors.errors().iter().map(|e| format!("{e}\n")).collect();
            super::print_out(&out)?;
            let n = errors.errors().len();
            eprintln!(
                "error: {n} problem{} found; the config was not loaded",
                if n == 1 { "" } else { "s" }
            );
            Ok(ExitCode::from(1))
        }
    }
}

fn summary(config: &Config) -> String {
    let origin = if config.origin == EMBEDDED_ORIGIN {
        "no config file found; the embedded default".to_owned()
    } else {
        config.origin.clone()
    };
    let agents: Vec<String> = config
        .agents
        .iter()
        .map(|a| format!("{} ({}/{})", a.id, a.provider, a.model))
        .collect();
    let providers: Vec<String> = config
        .providers
        .iter()
        .map(|(name, p)| format!("{name} ({})", p.kind()))
        .collect();
    let synthesizer = match &config.synthesizer {
        Some(s) => format!(
            "{}/{}, reserve {}",
            s.agent.provider,
            s.agent.model,
            humantime::format_duration(s.reserve)
        ),
        None => "none (the replies laid end to end)".to_owned(),
    };
    let shared = match &config.redis {
        Some(r) => format!(
            "\n  shared with other instances: rate limits, caps and pauses through {} (namespace {})",
            metaorch::cache::redacted_url(&r.url),
            r.namespace
        ),
        None => String::new(),
    };
    format!(
        "{origin}: ok\n  agents ({}): {}\n  synthesizer: {synthesizer}\n  providers: {}\n  concurrency_limit = {}, request_timeout = {}, min_successes = {}, log.level = {}{shared}\n",
        agents.len(),
        agents.join(", "),
        providers.join(", "),
        config.concurrency_limit,
        humantime::format_duration(config.request_timeout),
        config.min_successes,
        config.log_filter()
    )
}
