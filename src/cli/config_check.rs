//! `metaorch config check [FILE]`: validate a config and explain each problem.

use std::path::Path;
use std::process::ExitCode;

use metaorch::config::{Config, ConfigErrors, EMBEDDED_ORIGIN, Overrides};

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
            print_summary(&config);
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            print_errors(&errors);
            Ok(ExitCode::from(1))
        }
    }
}

fn print_summary(config: &Config) {
    let origin = if config.origin == EMBEDDED_ORIGIN {
        "no config file found; the embedded default".to_owned()
    } else {
        config.origin.clone()
    };
    println!("{origin}: ok");
    let agents: Vec<String> = config
        .agents
        .iter()
        .map(|a| format!("{} ({}/{})", a.id, a.provider, a.model))
        .collect();
    println!("  agents ({}): {}", agents.len(), agents.join(", "));
    let providers: Vec<String> = config
        .providers
        .iter()
        .map(|(name, p)| format!("{name} ({})", p.kind()))
        .collect();
    println!("  providers: {}", providers.join(", "));
    println!(
        "  concurrency_limit = {}, request_timeout = {}, min_successes = {}, log.level = {}",
        config.concurrency_limit,
        humantime::format_duration(config.request_timeout),
        config.min_successes,
        config.log_filter()
    );
}

fn print_errors(errors: &ConfigErrors) {
    for e in errors.errors() {
        println!("{e}");
    }
    let n = errors.errors().len();
    eprintln!(
        "error: {n} problem{} found; the config was not loaded",
        if n == 1 { "" } else { "s" }
    );
}
