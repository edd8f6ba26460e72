//! The process's log output: `tracing` events as JSON lines (the default) or a
//! human-readable format, on stderr, filtered by a `RUST_LOG`-style filter.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One JSON object per line, for machines.
    #[default]
    Json,
    /// Coloured text, for terminals.
    Pretty,
}

/// Installs the global log subscriber writing to stderr. `filter` is a `RUST_LOG`-style
/// filter (`warn`, `metaorch=debug,info`). Does nothing if a subscriber is already set,
/// so tests and embedders keep their own.
pub fn init_logging(filter: &str, format: LogFormat) {
    let filter = EnvFilter::builder()
        .parse(filter)
        .unwrap_or_else(|_| EnvFilter::new(crate::config::DEFAULT_LOG_LEVEL));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_span_events(FmtSpan::NONE);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .with_file(true)
            .with_line_number(true)
            .try_init(),
        LogFormat::Pretty => builder.with_ansi(true).try_init(),
    };
}
