//! The process's log output: `tracing` events as JSON lines (the default) or a
//! human-readable format, on stderr or appended to a file, filtered by a
//! `RUST_LOG`-style filter.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use super::otel::OtelGuard;
use super::{JsonLayer, TraceRing};

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
    init_logging_with_ring(filter, format, file, None)
}

/// [`init_logging`], and also keeps every `metaorch` line at `info` and above in
/// `ring`, whatever the output's filter, so recent requests' timelines can be shown.
pub fn init_logging_with_ring(
    filter: &str,
    format: LogFormat,
    file: Option<&Path>,
    ring: Option<TraceRing>,
) -> io::Result<()> {
    init_telemetry(filter, format, file, ring, None).map(drop)
}

/// [`init_logging_with_ring`], and also exports spans to the OTLP/HTTP collector at
/// `otlp_endpoint` when one is given (see [`super::otel`]). Keep the returned guard
/// until the process ends, and drop it outside any async runtime: dropping it flushes
/// the last spans.
pub fn init_telemetry(
    filter: &str,
    format: LogFormat,
    file: Option<&Path>,
    ring: Option<TraceRing>,
    otlp_endpoint: Option<&str>,
) -> io::Result<Option<OtelGuard>> {
    let filter = EnvFilter::builder()
        .parse(filter)
        .unwrap_or_else(|_| EnvFilter::new(crate::config::DEFAULT_LOG_LEVEL));
    let output: BoxedLayer = match (format, file) {
        (LogFormat::Json, None) => JsonLayer::new(io::stderr).with_filter(filter).boxed(),
        (LogFormat::Json, Some(path)) => JsonLayer::new(Mutex::new(open_append(path)?))
            .with_filter(filter)
            .boxed(),
        (LogFormat::Pretty, None) => tracing_subscriber::fmt::layer()
            .with_writer(io::stderr)
            .with_filter(filter)
            .boxed(),
        (LogFormat::Pretty, Some(path)) => tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(Mutex::new(open_append(path)?))
            .with_filter(filter)
            .boxed(),
    };
    let mut layers = vec![output];
    if let Some(ring) = ring {
        layers.push(
            JsonLayer::new(ring)
                .with_filter(EnvFilter::new("metaorch=info"))
                .boxed(),
        );
    }
    let mut guard = None;
    if let Some(endpoint) = otlp_endpoint {
        let (layer, g) = super::otel::layer::<Registry>(endpoint)
            .map_err(|e| io::Error::other(format!("OpenTelemetry: {e}")))?;
        layers.push(layer.with_filter(EnvFilter::new("metaorch=info")).boxed());
        guard = Some(g);
    }
    let _ = tracing_subscriber::registry().with(layers).try_init();
    Ok(guard)
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Opens `path` for appending (created if missing): each line is one `write` on an
/// `O_APPEND` file, so lines from several processes interleave whole. `what` names the
/// file in the error.
pub(crate) fn open_append_as(path: &Path, what: &str) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open {what} {}: {e}", path.display()),
            )
        })
}

fn open_append(path: &Path) -> io::Result<File> {
    open_append_as(path, "the log file")
}
