//! The process's log output: `tracing` events as JSON lines (the default) or a
//! human-readable format, on stderr or appended to a file, filtered by a
//! `RUST_LOG`-style filter.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use super::JsonLayer;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One JSON object per line, for machines (see [`JsonLayer`]).
    #[default]
    Json,
    /// Coloured text, for terminals.
    Pretty,
}

/// Installs the global log subscriber. `filter` is a `RUST_LOG`-style filter (`warn`,
/// `metaorch=debug,info`). Lines go to `file` when given (opened for appending and
/// created if missing, never truncated), else to stderr. Does nothing if a subscriber
/// is already set, so tests and embedders keep their own.
///
/// Fails only when the file cannot be opened.
pub fn init_logging(filter: &str, format: LogFormat, file: Option<&Path>) -> io::Result<()> {
    let filter = EnvFilter::builder()
        .parse(filter)
        .unwrap_or_else(|_| EnvFilter::new(crate::config::DEFAULT_LOG_LEVEL));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match (format, file) {
        (LogFormat::Json, None) => registry.with(JsonLayer::new(io::stderr)).try_init(),
        (LogFormat::Json, Some(path)) => registry
            .with(JsonLayer::new(Mutex::new(open_append(path)?)))
            .try_init(),
        (LogFormat::Pretty, None) => registry
            .with(tracing_subscriber::fmt::layer().with_writer(io::stderr))
            .try_init(),
        (LogFormat::Pretty, Some(path)) => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(Mutex::new(open_append(path)?)),
            )
            .try_init(),
    };
    Ok(())
}

/// Opens `path` for appending: each line is one `write` on an `O_APPEND` file, so
/// lines from several processes interleave whole.
fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open the log file {}: {e}", path.display()),
            )
        })
}
