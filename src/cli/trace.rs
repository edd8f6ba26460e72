//! `metaorch trace TRACE_ID[/REQUEST_ID] | --last [--log FILE ...]`: one request's
//! timeline, read from JSON log lines as a stream (files, gzip, or stdin).
//!
//! One trace id may hold several requests (a caller's `traceparent` shared by several
//! calls); each has its own request id. The text output shows every request of the
//! trace, one after another; `--format json` shows the one that started last (or the
//! one named by `TRACE_ID/REQUEST_ID`) with the others listed in `requests`. Text that
//! came from upstream is stripped of control characters before it reaches the
//! terminal.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufRead, BufReader, IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use metaorch::config::Overrides;
use metaorch::telemetry::timeline::{AgentRow, Scanner, Select, Timeline};
use metaorch::telemetry::{RequestId, TraceId, terminal_safe};

use super::args::{Cli, OutputFormat, TraceArgs};

/// Bytes looked at for the gzip magic. The scanner reads in larger blocks, and a read
/// larger than this buffer bypasses it: the log is copied once, into the scanner.
const PEEK: usize = 1 << 16;

pub fn trace(cli: &Cli, args: &TraceArgs) -> anyhow::Result<ExitCode> {
    let select = match &args.trace_id {
        Some(id) => select(id)?,
        None => Select::Last,
    };
    let logs = log_paths(cli, args)?;

    let mut scanner = Scanner::new(select);
    for path in &logs {
        scanner
            .read(open(path)?)
            .with_context(|| format!("cannot read {}", path.display()))?;
    }

    let stats = scanner.stats();
    let wanted = scanner.trace_id().map(str::to_owned);
    let timelines = match args.format {
        OutputFormat::Json => scanner.finish().into_iter().collect(),
        OutputFormat::Text => scanner.finish_all(),
    };
    if timelines.is_empty() {
        let request = args
            .trace_id
            .as_deref()
            .and_then(|a| a.split_once('/'))
            .map(|(_, r)| r.trim().to_ascii_lowercase());
        let what = match (wanted, request) {
            (Some(id), Some(r)) => format!("no lines of request {r} in trace {id}"),
            (Some(id), None) if args.trace_id.is_some() => format!("no lines of trace {id}"),
            (Some(id), None) => format!("the last request ({id}) left no readable lines"),
            (None, _) => "no request.start line, so no last request".to_owned(),
        };
        eprintln!(
            "error: {what} in {} lines read from {}{}",
            stats.lines,
            names(&logs),
            if stats.skipped > 0 {
                format!(" ({} skipped: not JSON or another shape)", stats.skipped)
            } else {
                String::new()
            }
        );
        eprintln!(
            "hint: the log needs info level to hold each request's story (log.level = \"info\", the default for log files)"
        );
        return Ok(ExitCode::from(1));
    }

    match args.format {
        OutputFormat::Json => {
            for timeline in &timelines {
                super::print_out(&format!("{}\n", serde_json::to_string_pretty(timeline)?))?;
            }
        }
        OutputFormat::Text => {
            let texts: Vec<String> = timelines.iter().map(render).collect();
            super::print_out(&terminal_safe(&texts.join("\n")))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `TRACE_ID` (every request of the trace) or `TRACE_ID/REQUEST_ID` (one of them).
fn select(arg: &str) -> anyhow::Result<Select> {
    let arg = arg.trim().to_ascii_lowercase();
    let (trace, request) = match arg.split_once('/') {
        Some((trace, request)) => (trace, Some(request)),
        None => (arg.as_str(), None),
    };
    let trace_id: TraceId = trace.parse().map_err(|_| {
        anyhow::anyhow!(
            "\"{trace}\" is not a trace id; expected 32 hex digits, as printed by `metaorch run` (trace_id: ...), optionally followed by /REQUEST_ID"
        )
    })?;
    Ok(match request {
        None => Select::Trace(trace_id.to_string()),
        Some(request) => {
            let request_id: RequestId = request.parse().map_err(|_| {
                anyhow::anyhow!(
                    "\"{request}\" is not a request id; expected 16 hex digits after the trace id, as in TRACE_ID/REQUEST_ID"
                )
            })?;
            Select::Request {
                trace_id: trace_id.to_string(),
                request_id: request_id.to_string(),
            }
        }
    })
}

/// The logs to read: `--log`, else the config's `log.file`, else stdin when it is not a
/// terminal.
fn log_paths(cli: &Cli, args: &TraceArgs) -> anyhow::Result<Vec<PathBuf>> {
    if !args.logs.is_empty() {
        return Ok(args.logs.clone());
    }
    // Only the log file matters here; a config that fails to load is not an error
    // unless it is the only way to find the log.
    if let Ok(config) = super::load_config(cli, Overrides::default())
        && let Some(file) = config.log_file
    {
        return Ok(vec![file]);
    }
    if !io::stdin().is_terminal() {
        return Ok(vec![PathBuf::from("-")]);
    }
    bail!("no log to read: pass --log FILE, set log.file in the config, or pipe a log on stdin")
}

/// A reader over a file (`-` for stdin), un-gzipping when it starts with the gzip
/// magic bytes.
fn open(path: &Path) -> anyhow::Result<Box<dyn Read>> {
    let raw: Box<dyn Read> = if path == Path::new("-") {
        Box::new(io::stdin().lock())
    } else {
        Box::new(
            File::open(path).with_context(|| format!("cannot open the log {}", path.display()))?,
        )
    };
    let mut reader = BufReader::with_capacity(PEEK, raw);
    let head = reader
        .fill_buf()
        .with_context(|| format!("cannot read {}", path.display()))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        return Ok(Box::new(flate2::bufread::MultiGzDecoder::new(reader)));
    }
    Ok(Box::new(reader))
}

fn names(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths
        .iter()
        .map(|p| match p.to_str() {
            Some("-") => "stdin".to_owned(),
            _ => p.display().to_string(),
        })
        .collect();
    names.join(", ")
}

/// Width of the timeline bars.
const BAR: usize = 24;

/// The timeline for a terminal: one screen for a request of a few agents.
pub fn render(t: &Timeline) -> String {
    let mut out = String::new();
    let outcome = match (t.ok, t.summary) {
        (Some(ok), Some(s)) => format!(
            "{}: {} succeeded, {} failed, {} timed out",
            match t.status.as_str() {
                "cancelled" => "cancelled",
                _ if ok => "ok",
                _ => "NOT ok",
            },
            s.succeeded,
            s.failed,
            s.timed_out
        ),
        _ => "unfinished: no request.finish line".to_owned(),
    };
    match (&t.request_id, t.requests.len()) {
        (Some(r), n) if n > 1 => {
            let i = t
                .requests
                .iter()
                .position(|q| q.request_id.as_deref() == Some(r.as_str()))
                .map_or(0, |i| i + 1);
            let _ = writeln!(out, "trace {} request {r} ({i} of {n})", t.trace_id);
        }
        (Some(r), _) => {
            let _ = writeln!(out, "trace {} request {r}", t.trace_id);
        }
        (None, _) => {
            let _ = writeln!(out, "trace {}", t.trace_id);
        }
    }
    let cost = match (t.finished, t.cost_usd) {
        (true, Some(usd)) => format!(", cost {}", super::render::usd(usd)),
        (true, None) => ", cost unknown".to_owned(),
        (false, _) => String::new(),
    };
    let _ = writeln!(
        out,
        "started {}, took {}, {outcome}{cost}\n",
        t.started_at,
        secs(t.total_ms)
    );

    let width = t
        .agents
        .iter()
        .map(|a| a.agent_id.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let _ = writeln!(
        out,
        "{:<width$}  {:<10}  {:>8}  {:>8}  {:>4}  {:>10}  TIMELINE",
        "AGENT", "STATUS", "START", "END", "TRY", "COST"
    );
    for a in &t.agents {
        let _ = writeln!(
            out,
            "{:<width$}  {:<10}  {:>8}  {:>8}  {:>4}  {:>10}  {}",
            a.agent_id,
            a.status,
            secs(a.start_ms),
            secs(a.end_ms),
            a.attempts,
            a.cost_usd
                .map_or_else(|| "-".to_owned(), super::render::usd),
            bar(a, t.total_ms)
        );
        for note in notes(a) {
            let _ = writeln!(out, "{:<width$}  {note}", "");
        }
    }
    for b in &t.breakers {
        let _ = writeln!(
            out,
            "breaker {}/{} {} at {} ({})",
            b.provider,
            b.model,
            b.state,
            secs(b.at_ms),
            b.reason
        );
    }
    for f in &t.flow {
        let _ = writeln!(
            out,
            "flow {}/{} {} at {}: {}",
            f.provider,
            f.model,
            f.change,
            secs(f.at_ms),
            f.detail
        );
    }
    if let Some(c) = &t.critical_path {
        let mut why = Vec::new();
        if c.retry_wait_ms > 0.0 {
            why.push(format!("{} waiting to retry", secs(c.retry_wait_ms)));
        }
        let pause = c.pause_ms.unwrap_or(0.0);
        if let Some(q) = c.queue_ms.filter(|q| *q - pause >= 1.0) {
            why.push(format!("{} waiting for a slot", secs(q - pause)));
        }
        if pause >= 1.0 {
            why.push(format!("{} behind a provider's pause", secs(pause)));
        }
        let why = if why.is_empty() {
            String::new()
        } else {
            format!("; of which {}", why.join(", "))
        };
        // The synthesis waits for the fan-out: the slowest agent comes before it.
        let before = t
            .agents
            .iter()
            .any(|a| a.synthesis && a.agent_id == c.agent_id)
            .then(|| {
                t.agents
                    .iter()
                    .filter(|a| !a.synthesis)
                    .max_by(|a, b| a.end_ms.total_cmp(&b.end_ms))
            })
            .flatten()
            .map(|a| format!("{} ({}), then ", a.agent_id, secs(a.end_ms - a.start_ms)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "\ncritical path: {before}{} ({} of {}, {:.0}%{why})",
            c.agent_id,
            secs(c.duration_ms),
            secs(t.total_ms),
            c.share * 100.0
        );
    }
    let _ = writeln!(
        out,
        "read {} lines ({:.1} MB): {} of this request, {} skipped (not JSON or another shape)",
        t.lines.lines,
        t.lines.bytes as f64 / 1e6,
        t.lines.matched,
        t.lines.skipped
    );
    out
}

fn notes(a: &AgentRow) -> Vec<String> {
    let mut notes = Vec::new();
    if let (Some(p), Some(m)) = (&a.provider, &a.model) {
        let mut s = format!("{p}/{m}");
        if a.synthesis {
            s.push_str(", merging the replies into the answer");
        }
        if let Some(source) = &a.cached {
            let _ = write!(s, ", answered from the cache ({source})");
        }
        if let Some(q) = a.queue_ms.filter(|q| *q >= 1.0) {
            let _ = write!(s, ", queued {}", secs(q));
            if let Some(p) = a.pause_ms.filter(|p| *p >= 1.0) {
                let _ = write!(s, " ({} behind a pause at the provider's request)", secs(p));
            }
        }
        notes.push(s);
    }
    for r in &a.retries {
        let status = r.status.map(|s| format!(" (HTTP {s})")).unwrap_or_default();
        notes.push(format!(
            "attempt {} failed at {}: {}{status}; waited {} ({})",
            r.attempt,
            secs(r.at_ms),
            r.error,
            secs(r.delay_ms),
            r.source
        ));
    }
    for reason in &a.refused {
        notes.push(format!("no retry: {reason}"));
    }
    if let Some(f) = &a.fallback {
        let to = f.agent.as_deref().map_or_else(
            || "its fallback text".to_owned(),
            |agent| format!("agent {agent}"),
        );
        notes.push(format!(
            "fell back to {to} at {} after {}",
            secs(f.at_ms),
            f.primary_error
        ));
    }
    if let Some(e) = &a.error {
        let status = e.status.map(|s| format!(" (HTTP {s})")).unwrap_or_default();
        notes.push(format!("{}{status}: {}", e.kind, e.message));
    }
    let n = notes.len();
    notes
        .into_iter()
        .enumerate()
        .map(|(i, note)| format!("{} {note}", if i + 1 == n { '└' } else { '├' }))
        .collect()
}

/// `|   ████████      |`: the agent's span within the request.
fn bar(a: &AgentRow, total_ms: f64) -> String {
    let scale = |ms: f64| {
        if total_ms <= 0.0 {
            0
        } else {
            ((ms / total_ms) * BAR as f64)
                .round()
                .clamp(0.0, BAR as f64) as usize
        }
    };
    let from = scale(a.start_ms);
    let to = scale(a.end_ms).max(from + 1).min(BAR);
    let from = from.min(to.saturating_sub(1));
    format!(
        "|{}{}{}|",
        " ".repeat(from),
        "█".repeat(to - from),
        " ".repeat(BAR - to)
    )
}

fn secs(ms: f64) -> String {
    format!("{:.3}s", ms / 1000.0)
}
