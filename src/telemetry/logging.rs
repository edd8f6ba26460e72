//! The process's log output: `tracing` events as JSON lines (the default) or a
//! human-readable format, on stderr or appended to a file, filtered by a
//! `RUST_LOG`-style filter.
//!
//! Short-lived commands write each line as it comes ([`init_telemetry`]), so nothing is
//! lost when they exit. A server writes through a bounded queue and a thread of its own
//! ([`init_server_telemetry`]), so a slow disk or pipe never blocks the runtime's
//! workers: past the queue's 16,384 lines, lines are dropped and counted (see
//! [`super::nonblocking`]). The human-readable format strips control characters and
//! escape sequences from every field (upstream text reaches the log), and writes
//! colours only to a terminal.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal as _};
use std::path::Path;
use std::sync::Mutex;

use tracing::field::Field;
use tracing_subscriber::field::MakeExt as _;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use super::nonblocking::{LogGuard, NonBlocking, Notice, QUEUE_LINES};
use super::otel::OtelGuard;
use super::{JsonLayer, TraceRing};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One JSON object per line, for machines (see [`JsonLayer`]).
    #[default]
    Json,
    /// Text for people: coloured on a terminal (unless `NO_COLOR` is set), plain in a
    /// pipe or a file.
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
    let output = match file {
        Some(path) => output_layer(filter, format, Mutex::new(open_append(path)?), false),
        None => output_layer(filter, format, io::stderr, stderr_colours()),
    };
    install(output, ring, otlp_endpoint)
}

/// [`init_telemetry`] for a command that draws on stderr itself (a progress bar): the
/// log lines meant for stderr are handed to `through` whole, one line a call, so that
/// it can clear what it drew, write the line and draw again. Lines for a log file go
/// to the file as usual.
pub fn init_telemetry_through(
    filter: &str,
    format: LogFormat,
    file: Option<&Path>,
    otlp_endpoint: Option<&str>,
    through: impl Fn(&[u8]) + Send + Sync + 'static,
) -> io::Result<Option<OtelGuard>> {
    let output = match file {
        Some(path) => output_layer(filter, format, Mutex::new(open_append(path)?), false),
        None => output_layer(
            filter,
            format,
            Through(std::sync::Arc::new(through)),
            stderr_colours(),
        ),
    };
    install(output, None, otlp_endpoint)
}

/// What takes each log line, whole.
type LineSink = std::sync::Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Hands each log line, whole, to a function.
#[derive(Clone)]
struct Through(LineSink);

/// One line's writer: collects the line, hands it over when dropped.
struct ThroughLine {
    through: LineSink,
    line: Vec<u8>,
}

impl io::Write for ThroughLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ThroughLine {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            (self.through)(&self.line);
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Through {
    type Writer = ThroughLine;

    fn make_writer(&'a self) -> ThroughLine {
        ThroughLine {
            through: std::sync::Arc::clone(&self.0),
            line: Vec::new(),
        }
    }
}

/// What [`init_server_telemetry`] started: keep it until the process ends, and drop it
/// outside any async runtime. Dropping it writes the log lines still queued (waiting at
/// most two seconds) and flushes the last spans.
#[derive(Debug)]
pub struct TelemetryGuard {
    // Field order is drop order: the spans' exporter may still log.
    _otel: Option<OtelGuard>,
    _log: LogGuard,
}

/// [`init_telemetry`] for a server: log lines are written by a thread of their own
/// through a bounded queue, so logging never blocks the runtime's workers on a slow
/// disk or pipe. When the queue is full (16,384 lines), lines are dropped, counted in
/// `metaorch_log_lines_dropped_total`, and reported by one `log.dropped` line once the
/// writer catches up.
pub fn init_server_telemetry(
    filter: &str,
    format: LogFormat,
    file: Option<&Path>,
    ring: Option<TraceRing>,
    otlp_endpoint: Option<&str>,
) -> io::Result<TelemetryGuard> {
    let notice = match format {
        LogFormat::Json => Notice::Json,
        LogFormat::Pretty => Notice::Text,
    };
    let (sink, colours): (Box<dyn io::Write + Send>, bool) = match file {
        Some(path) => (Box::new(open_append(path)?), false),
        None => (Box::new(io::stderr()), stderr_colours()),
    };
    let (writer, log) = NonBlocking::new(sink, QUEUE_LINES, notice)?;
    let otel = install(
        output_layer(filter, format, writer, colours),
        ring,
        otlp_endpoint,
    )?;
    Ok(TelemetryGuard {
        _otel: otel,
        _log: log,
    })
}

/// The log filter for stderr unless one is given: warnings and errors.
pub const DEFAULT_LOG_LEVEL: &str = "warn";

/// Colours only on a terminal, and never with `NO_COLOR` set (no-color.org).
fn stderr_colours() -> bool {
    io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The layer that writes the log itself, in `format`, filtered by `filter`.
fn output_layer<W>(filter: &str, format: LogFormat, writer: W, colours: bool) -> BoxedLayer
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::builder()
        .parse(filter)
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_LEVEL));
    match format {
        LogFormat::Json => JsonLayer::new(writer).with_filter(filter).boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_ansi(colours)
            .fmt_fields(tracing_subscriber::fmt::format::debug_fn(safe_field).delimited(" "))
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
    }
}

/// One field of a pretty line, without control characters or escape sequences: a
/// message or an error from upstream cannot drive the reader's terminal.
fn safe_field(
    writer: &mut Writer<'_>,
    field: &Field,
    value: &dyn std::fmt::Debug,
) -> std::fmt::Result {
    let text = format!("{value:?}");
    let text = super::terminal_safe_line(&text);
    match field.name() {
        "message" => write!(writer, "{text}"),
        name => write!(writer, "{name}={text}"),
    }
}

/// Installs `output` with the ring's and the exporter's layers as the global
/// subscriber.
fn install(
    output: BoxedLayer,
    ring: Option<TraceRing>,
    otlp_endpoint: Option<&str>,
) -> io::Result<Option<OtelGuard>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn pretty_lines_carry_no_escape_sequences_from_upstream_text_and_no_colour_in_a_pipe() {
        let buf = Buf::default();
        let writer = buf.clone();
        let layer = output_layer("info", LogFormat::Pretty, move || writer.clone(), false);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", trace_id = "t\x1b[2Jx");
            let _s = span.enter();
            let upstream = "bad\x1b]0;pwned\x07 gateway\r\n\x1b[31mred";
            tracing::warn!(
                event = "agent.failure",
                error.message = %upstream,
                quoted = upstream,
                "agent failed: {upstream}"
            );
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(!text.contains('\x1b') && !text.contains('\r'), "{text:?}");
        assert_eq!(text.lines().count(), 1, "one event, one line: {text:?}");
        assert!(text.contains("agent failed: bad gateway red"), "{text:?}");
        assert!(text.contains("error.message=bad gateway red"), "{text:?}");
        // A `str` field is written escaped, as Rust writes it: shown, never obeyed.
        assert!(text.contains(r#"quoted="bad\u{1b}]0;pwned"#), "{text:?}");
    }
}
