//! `metaorch batch INPUT --out OUTPUT`: every query of a file through one orchestrator
//! (its limits, rate limits and breakers shared by the whole batch), each result
//! appended to OUTPUT as its request finishes.
//!
//! Resumable by construction: OUTPUT is the record of what is done. A rerun of the same
//! command reads it, cuts off a half-written last line, skips every id already there
//! and appends the rest, so each id ends up in OUTPUT exactly once and nothing finished
//! is sent upstream again. Results are appended in the order requests finish.
//!
//! Ctrl-C (or SIGTERM) once: no new request starts, the ones in flight finish and are
//! written. Twice: those are cancelled and not written (they run on the next run).

mod input;
mod output;
mod progress;

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use metaorch::orchestrator::RequestError;
use metaorch::{Orchestrator, Request, Response};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::args::{BatchArgs, Cli, OutputFormat};
use input::{Entry, Format, Line, Source};
use progress::{Progress, Totals};

/// At most this many bad lines are listed one by one; the rest are counted.
const BAD_LINES_SHOWN: usize = 20;

/// Requests in flight by default, at most.
const DEFAULT_IN_FLIGHT_MAX: usize = 64;

pub fn batch(cli: &Cli, args: &BatchArgs) -> anyhow::Result<ExitCode> {
    let config = match super::config_or_exit(cli, args.request.overrides()) {
        Ok(config) => config,
        Err(code) => return Ok(code),
    };
    let format = if args.text {
        Format::Text
    } else {
        Format::JsonLines
    };
    let input_name = args.input.display().to_string();
    if same_file(&args.input, &args.out) {
        eprintln!(
            "error: --out {} is the input itself; results go to a file of their own, e.g. --out results.jsonl",
            args.out.display()
        );
        return Ok(ExitCode::from(2));
    }
    let source = Source::open(&args.input)?;
    let survey = input::survey(&source, format)?;
    for bad in survey.bad.iter().take(BAD_LINES_SHOWN) {
        eprintln!("{input_name}:{}: {}; skipped", bad.number, bad.reason);
    }
    if survey.bad.len() > BAD_LINES_SHOWN {
        eprintln!(
            "{input_name}: … and {} more bad lines, skipped",
            survey.bad.len() - BAD_LINES_SHOWN
        );
    }
    if args.strict && !survey.bad.is_empty() {
        eprintln!(
            "error: {} bad lines in {input_name}; nothing was run (--strict). Fix them, or run without --strict to skip them.",
            survey.bad.len()
        );
        return Ok(ExitCode::from(2));
    }
    if survey.keys.is_empty() {
        eprintln!(
            "error: {input_name} has no queries; expected one JSON object per line such as {{\"id\": \"q1\", \"query\": \"…\"}}, or --text for one query per line"
        );
        return Ok(ExitCode::from(2));
    }

    // Opened (and locked) first: a second batch on the same file stops here, and a
    // directory that does not exist is said before anything is built.
    let mut writer = output::Writer::open(&args.out)?;
    let mut previous = output::scan(&args.out)?;
    let out_name = args.out.display().to_string();
    if let Some(bytes) = previous.repaired {
        eprintln!(
            "repaired {out_name}: cut off a half-written last line ({bytes} bytes) left by an interrupted run; its request runs again"
        );
    }
    if args.retry_failed {
        let failed: HashSet<String> = previous
            .results
            .iter()
            .filter(|(key, ok)| !**ok && survey.keys.contains_key(*key))
            .map(|(key, _)| key.clone())
            .collect();
        if !failed.is_empty() {
            output::remove(&args.out, &failed)?;
            // The file was replaced: its lock and handle are the new one's.
            writer = output::Writer::open(&args.out)?;
            for key in &failed {
                previous.results.remove(key);
            }
        }
    }
    let earlier = Earlier::count(&survey, &previous);
    let todo = survey.keys.len() as u64 - earlier.ok - earlier.failed;

    // Log lines meant for stderr go around the progress bar, not through it.
    let progress = Progress::new(todo);
    let _telemetry = metaorch::telemetry::init_telemetry_through(
        config.log_filter(),
        cli.log_format.into(),
        config.log_file.as_deref(),
        metaorch::telemetry::otel::endpoint(config.otlp_endpoint.as_deref()).as_deref(),
        progress.writer(),
    )?;
    let orchestrator = Orchestrator::builder().config(config.clone()).build()?;
    let agents = orchestrator.agents().count().max(1);
    let in_flight = args.in_flight.map_or_else(
        || {
            config
                .concurrency_limit
                .div_ceil(agents)
                .clamp(1, DEFAULT_IN_FLIGHT_MAX)
        },
        |n| n as usize,
    );
    eprintln!(
        "batch: {} queries in {input_name}; {} already in {out_name}{}; {todo} to run, {in_flight} in flight",
        survey.keys.len(),
        earlier.ok + earlier.failed,
        if earlier.failed > 0 {
            format!(
                " ({} failed{})",
                earlier.failed,
                if args.retry_failed {
                    ""
                } else {
                    "; --retry-failed runs them again"
                }
            )
        } else {
            String::new()
        },
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let started = Instant::now();
    let run = Run {
        progress,
        writer,
        orchestrator,
        source,
        format,
        survey: Arc::new(survey),
        previous: Arc::new(previous),
        in_flight,
    };
    let totals = runtime.block_on(run.run())?;
    let wall = started.elapsed();
    drop(runtime);

    let (cpu, peak_rss_mb) = super::bench::stats::usage();
    let summary = Summary::new(&totals, &earlier, todo, wall, cpu, peak_rss_mb);
    match args.format {
        OutputFormat::Json => {
            super::print_out(&format!("{}\n", serde_json::to_string_pretty(&summary)?))?;
        }
        OutputFormat::Text => super::print_out(&summary.text(&out_name))?,
    }
    if summary.not_run > 0 {
        eprintln!(
            "interrupted: {} requests not run; run the same command again to finish them",
            summary.not_run
        );
        return Ok(ExitCode::from(130));
    }
    let failed = totals.failed + earlier.failed;
    if failed > 0 {
        eprintln!(
            "error: {failed} requests did not meet min_successes; `--retry-failed` runs them again"
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether two paths name one existing file.
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Results of the input's ids that an earlier run left in OUTPUT.
#[derive(Debug, Default, Serialize)]
struct Earlier {
    ok: u64,
    failed: u64,
}

impl Earlier {
    fn count(survey: &input::Survey, previous: &output::Previous) -> Earlier {
        let mut earlier = Earlier::default();
        for key in survey.keys.keys() {
            match previous.results.get(key) {
                Some(true) => earlier.ok += 1,
                Some(false) => earlier.failed += 1,
                None => {}
            }
        }
        earlier
    }
}

/// One run over the input.
struct Run {
    progress: Progress,
    writer: output::Writer,
    orchestrator: Orchestrator,
    source: Source,
    format: Format,
    survey: Arc<input::Survey>,
    previous: Arc<output::Previous>,
    in_flight: usize,
}

/// What a request's task hands back: its id, its result line, its response, and
/// whether a second Ctrl-C cut it short.
type Finished = (String, Vec<u8>, Result<Response, RequestError>, bool);

impl Run {
    /// Runs every query not yet done; returns the totals.
    async fn run(self) -> anyhow::Result<Totals> {
        let mut writer = self.writer;
        let mut totals = Totals::default();
        let mut progress = self.progress;
        progress.start();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Entry>(self.in_flight.max(16));
        let reader = {
            let (source, survey, previous, format) = (
                self.source,
                Arc::clone(&self.survey),
                Arc::clone(&self.previous),
                self.format,
            );
            tokio::task::spawn_blocking(move || {
                let mut stopped = false;
                let read = source.lines(|number, line| {
                    let Ok(line) = line else {
                        return Ok(());
                    };
                    if survey.is_bad(number) {
                        return Ok(());
                    }
                    if let Line::Entry(entry) = input::parse(format, number, line)
                        && !previous.is_done(&entry.key)
                        && tx.blocking_send(entry).is_err()
                    {
                        // The batch stopped taking new work: nothing more to read.
                        stopped = true;
                        anyhow::bail!("stopped");
                    }
                    Ok(())
                });
                if stopped { Ok(()) } else { read }
            })
        };

        let cancel = CancellationToken::new();
        let mut running: JoinSet<Finished> = JoinSet::new();
        let mut input_open = true;
        let mut stopping = false;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sync: Option<tokio::task::JoinHandle<std::io::Result<()>>> = None;
        let mut signals = Signals::new();
        loop {
            if (!input_open || stopping) && running.is_empty() {
                break;
            }
            tokio::select! {
                entry = rx.recv(), if input_open && !stopping && running.len() < self.in_flight => {
                    match entry {
                        Some(entry) => {
                            let orchestrator = self.orchestrator.clone();
                            let cancel = cancel.child_token();
                            running.spawn(answer(orchestrator, entry, cancel));
                        }
                        None => input_open = false,
                    }
                }
                Some(joined) = running.join_next() => {
                    let (_key, line, result, cut) = joined.context("a request's task failed")?;
                    if cut {
                        // Cut short: not a result; it runs again next time. (A request
                        // that finished before the cut is written like any other.)
                        continue;
                    }
                    writer.write(&line)?;
                    match &result {
                        Ok(response) => totals.add(response),
                        Err(_) => totals.add_error(),
                    }
                    progress.update(&totals);
                }
                _ = tick.tick() => {
                    progress.tick(&totals);
                    if sync.as_ref().is_none_or(tokio::task::JoinHandle::is_finished)
                        && let Some(file) = writer.take_dirty()
                    {
                        sync = Some(tokio::task::spawn_blocking(move || file.sync_data()));
                    }
                }
                () = signals.next() => {
                    if stopping {
                        progress.say(&format!(
                            "cancelling the {} requests in flight; they run again on the next run",
                            running.len()
                        ));
                        cancel.cancel();
                    } else {
                        stopping = true;
                        progress.say(&format!(
                            "stopping: no new requests; finishing the {} in flight (Ctrl-C again cancels them)",
                            running.len()
                        ));
                    }
                }
            }
        }
        drop(rx);
        progress.finish();
        if let Some(sync) = sync {
            let _ = sync.await;
        }
        writer.sync()?;
        // An input that could not be read to its end is an error; the results written
        // stand, and a rerun goes on from them.
        reader.await.context("the input's reader failed")??;
        Ok(totals)
    }
}

/// Runs one query and renders its result line.
async fn answer(orchestrator: Orchestrator, entry: Entry, cancel: CancellationToken) -> Finished {
    let request = Request::new(entry.query.clone()).with_cancel(cancel.clone());
    let result = orchestrator.process_request(request).await;
    let cut = cancel.is_cancelled() && result.as_ref().is_ok_and(cut_short);
    let line = result_line(&entry, &result);
    (entry.key, line, result, cut)
}

/// Whether the cancellation cut into a response: an agent or the synthesis ended for
/// it. A response complete before the cut is a result like any other.
fn cut_short(response: &Response) -> bool {
    use metaorch::orchestrator::SynthesisStatus;
    response.outcomes.iter().any(|o| {
        o.error
            .as_ref()
            .is_some_and(|e| e.kind == metaorch::executor::FailureKind::Cancelled)
    }) || response.synthesis.report().is_some_and(|r| {
        matches!(
            r.status,
            SynthesisStatus::TimedOut | SynthesisStatus::Skipped
        )
    })
}

/// `{"id": …, <the input's fields>, "response": <run's JSON document>}`, or `"error"`
/// in place of `"response"` for a request that could not run.
fn result_line(entry: &Entry, result: &Result<Response, RequestError>) -> Vec<u8> {
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(b"{\"id\":");
    // Serialising JSON values and a response into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, &entry.id);
    for (key, value) in &entry.fields {
        out.push(b',');
        let _ = serde_json::to_writer(&mut out, key);
        out.push(b':');
        let _ = serde_json::to_writer(&mut out, value);
    }
    match result {
        Ok(response) => {
            out.extend_from_slice(b",\"response\":");
            let _ = serde_json::to_writer(&mut out, response);
        }
        Err(e) => {
            out.extend_from_slice(b",\"error\":");
            let _ = serde_json::to_writer(&mut out, &e.to_string());
        }
    }
    out.extend_from_slice(b"}\n");
    out
}

/// Ctrl-C and, on Unix, SIGTERM, as many times as they come: the listeners live for
/// the whole batch, so that a signal between two waits is not lost.
struct Signals {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Signals {
                interrupt: signal(SignalKind::interrupt()).ok(),
                term: signal(SignalKind::terminate()).ok(),
            }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        if let (Some(interrupt), Some(term)) = (&mut self.interrupt, &mut self.term) {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// What the batch did, printed at the end.
#[derive(Debug, Serialize)]
struct Summary<'a> {
    /// Requests of this run.
    requests: RequestCounts,
    /// Results already in OUTPUT before this run, skipped.
    earlier: &'a Earlier,
    /// Requests of the input not run (stopped early).
    not_run: u64,
    #[serde(flatten)]
    totals: &'a Totals,
    wall_ms: f64,
    requests_per_second: f64,
    latency_p50_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
    cpu_ms: f64,
    peak_rss_mb: f64,
}

#[derive(Debug, Serialize)]
struct RequestCounts {
    ok: u64,
    failed: u64,
}

impl<'a> Summary<'a> {
    fn new(
        totals: &'a Totals,
        earlier: &'a Earlier,
        todo: u64,
        wall: Duration,
        cpu: Duration,
        peak_rss_mb: f64,
    ) -> Summary<'a> {
        Summary {
            requests: RequestCounts {
                ok: totals.ok,
                failed: totals.failed,
            },
            earlier,
            not_run: todo.saturating_sub(totals.done()),
            totals,
            wall_ms: wall.as_secs_f64() * 1000.0,
            requests_per_second: totals.done() as f64 / wall.as_secs_f64().max(1e-9),
            latency_p50_ms: totals.latency_percentile(50.0),
            latency_p99_ms: totals.latency_percentile(99.0),
            cpu_ms: cpu.as_secs_f64() * 1000.0,
            peak_rss_mb,
        }
    }

    fn text(&self, out_name: &str) -> String {
        let t = self.totals;
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0} ms"));
        let mut text = format!(
            "requests  {} ok, {} failed in {:.1} s ({:.1} requests/s)\n",
            t.ok,
            t.failed,
            self.wall_ms / 1000.0,
            self.requests_per_second
        );
        if self.earlier.ok + self.earlier.failed > 0 {
            text.push_str(&format!(
                "earlier   {} ok, {} failed (already in {out_name}, skipped)\n",
                self.earlier.ok, self.earlier.failed
            ));
        }
        if self.not_run > 0 {
            text.push_str(&format!("not run   {}\n", self.not_run));
        }
        text.push_str(&format!(
            "agents    {} succeeded, {} failed, {} timed out; {} retries\n",
            t.agents.succeeded, t.agents.failed, t.agents.timed_out, t.retries
        ));
        text.push_str(&format!(
            "tokens    {} in, {} out; {}\n",
            t.input_tokens,
            t.output_tokens,
            t.cost()
        ));
        text.push_str(&format!(
            "latency   p50 {}, p99 {}\n",
            ms(self.latency_p50_ms),
            ms(self.latency_p99_ms)
        ));
        text.push_str(&format!(
            "process   {:.1} s CPU, peak RSS {:.1} MB\n",
            self.cpu_ms / 1000.0,
            self.peak_rss_mb
        ));
        text
    }
}
