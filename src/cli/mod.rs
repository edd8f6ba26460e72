//! The command line: argument parsing (clap) and one module per command. Errors reach
//! the person as one clear message and an exit code, never a panic or a backtrace.
//!
//! Exit codes: 0 success; 1 the command ran but its result is a failure (a request
//! with fewer than `min_successes` successful agents, a config that does not pass
//! `config check`); 2 bad usage or a config that cannot be loaded.

mod args;
mod batch;
mod bench;
mod config_check;
mod mock_upstream;
mod render;
mod run;
mod serve;
mod trace;

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command, ConfigCommand};
use metaorch::config::{self, Config, ConfigErrors, Overrides};

/// Parses arguments, runs the command, maps the result to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(args) => run::run(&cli, args),
        Command::Batch(args) => batch::batch(&cli, args),
        Command::Trace(args) => trace::trace(&cli, args),
        Command::MockUpstream(args) => mock_upstream::run(&cli, args),
        Command::Bench(args) => bench::run(&cli, args),
        Command::Serve(args) => serve::serve(&cli, args),
        Command::Config {
            command: ConfigCommand::Check { file },
        } => config_check::check(&cli, file.as_deref()),
    };
    match result {
        Ok(code) => code,
        // The reader went away (`metaorch run … | head -1`): nothing more to say, and
        // nothing went wrong, as for grep and rg.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// Writes `text` to stdout, all of it, and flushes. A reader that went away comes back
/// as an error the exit code handles quietly, instead of the panic `print!` makes.
pub(crate) fn print_out(text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The config a command runs with, or — when it cannot load — its errors printed on
/// stderr and exit code 2.
fn config_or_exit(cli: &Cli, flags: Overrides) -> Result<Config, ExitCode> {
    load_config(cli, flags).map_err(|errors| {
        eprintln!("error: the config is not valid:");
        for e in errors.errors() {
            eprintln!("  {e}");
        }
        eprintln!("Run `metaorch config check` for details, or fix the values above.");
        ExitCode::from(2)
    })
}

/// The config a command runs with: the file chosen by precedence (or the embedded
/// default), then environment overrides, then `flags`.
fn load_config(cli: &Cli, flags: Overrides) -> Result<Config, ConfigErrors> {
    let mut config = load_file(cli.config.as_deref())?;
    let env = Overrides::from_env(|k| std::env::var(k).ok())?;
    let log_level = cli.log_level.clone().or_else(|| {
        // RUST_LOG is honoured when neither metaorch-specific setting is given.
        env.log_level
            .is_none()
            .then(|| std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty()))
            .flatten()
    });
    let flags = Overrides {
        origin: "command line".into(),
        log_level,
        log_file: cli.log_file.clone(),
        ..flags
    };
    config.apply(&env.then(flags))?;
    Ok(config)
}

/// The config file by precedence (`--config`, `METAORCH_CONFIG`, `./metaorch.toml`),
/// or the embedded default when there is none.
fn load_file(flag: Option<&Path>) -> Result<Config, ConfigErrors> {
    let env = std::env::var("METAORCH_CONFIG").ok();
    let cwd = std::env::current_dir().unwrap_or_default();
    match config::discover(flag, env.as_deref(), &cwd) {
        Some(path) => Config::from_file(&path),
        None => Ok(Config::embedded()),
    }
}

/// The log and span output of a command that runs requests (`run`, `batch`), as the
/// config says; dropping the guard flushes it.
fn request_telemetry(
    cli: &Cli,
    config: &Config,
) -> std::io::Result<Option<metaorch::telemetry::otel::OtelGuard>> {
    metaorch::telemetry::init_telemetry(
        config.log_filter(),
        cli.log_format.into(),
        config.log_file.as_deref(),
        None,
        metaorch::telemetry::otel::endpoint(config.otlp_endpoint.as_deref()).as_deref(),
    )
}

/// Resolves on Ctrl-C or, on Unix, SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
