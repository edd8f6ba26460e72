//! `metaorch run QUERY`: one request, printed as a table and an answer, or as JSON.

use std::io::{IsTerminal, Read, Write as _};
use std::process::ExitCode;

use anyhow::Context;
use metaorch::telemetry::terminal_safe;
use metaorch::{Orchestrator, Response};

use super::args::{Cli, OutputFormat, RunArgs};
use super::render;

pub fn run(cli: &Cli, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let query = read_query(&args.query)?;
    let config = match super::config_or_exit(cli, args.request.overrides()) {
        Ok(config) => config,
        Err(code) => return Ok(code),
    };
    let otel = super::request_telemetry(cli, &config)?;

    let metrics = if args.metrics {
        metaorch::telemetry::metrics::install()
    } else {
        None
    };
    let orchestrator = Orchestrator::builder().config(config.clone()).build()?;
    orchestrator.prime_metrics();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let agents: Vec<String> = orchestrator.agents().map(|a| a.id.clone()).collect();
    let response = runtime.block_on(async {
        let mut request = metaorch::Request::new(query);
        // On a terminal, a status line says which agents are still running, and the
        // answer is printed as the synthesizer writes it.
        let status_line = std::io::stderr().is_terminal();
        let stream_answer = args.format == OutputFormat::Text && std::io::stdout().is_terminal();
        let live = (status_line || stream_answer).then(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            request = request.clone().with_events(tx);
            tokio::spawn(live(rx, agents, status_line, stream_answer))
        });
        let cancel = request.cancel.clone();
        // Ctrl-C ends the request cleanly: unfinished agents are reported, not lost.
        let ctrl_c = tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                cancel.cancel();
            }
        });
        let response = orchestrator.process_request(request).await;
        ctrl_c.abort();
        let shown = match live {
            Some(live) => live.await.unwrap_or_default(),
            None => Shown::default(),
        };
        response.map(|r| (r, shown))
    })?;
    let (response, shown) = response;

    // The runtime is gone: flush the last spans now, outside it.
    drop(runtime);
    drop(otel);
    match args.format {
        OutputFormat::Json => {
            super::print_out(&format!("{}\n", serde_json::to_string_pretty(&response)?))?;
        }
        OutputFormat::Text if shown.table => {
            let answer = response.answer.trim();
            let rest = if shown.answer.is_empty() {
                format!("{}\n", terminal_safe(answer))
            } else if shown.answer.trim() != answer {
                format!(
                    "\n\n[the synthesis did not finish; the replies laid end to end:]\n\n{}\n",
                    terminal_safe(answer)
                )
            } else {
                "\n".to_owned()
            };
            super::print_out(&rest)?;
            super::print_out(&render::after_streamed_answer(&response, &config))?;
        }
        OutputFormat::Text => super::print_out(&render::response(&response, &config))?,
    }
    if let Some(handle) = metrics {
        eprintln!("{}", metaorch::telemetry::metrics::summary(handle));
    }
    Ok(exit_code(&response, config.log_file.as_deref()))
}

fn exit_code(response: &Response, log_file: Option<&std::path::Path>) -> ExitCode {
    if response.ok {
        return ExitCode::SUCCESS;
    }
    let s = &response.summary;
    // A timeline needs a log to read: point at it, or say how to get one.
    let more = match log_file {
        Some(path) => format!(
            "see the outcomes above, or `metaorch trace {} --log {}`",
            response.trace_id,
            path.display()
        ),
        None => "see the outcomes above; for a timeline, run again with `--log-file run.log`, then `metaorch trace --last --log run.log`".to_owned(),
    };
    eprintln!(
        "error: {} of {} agents succeeded; at least {} required (min_successes): {more}",
        s.succeeded,
        response.outcomes.len(),
        s.min_successes,
    );
    ExitCode::from(1)
}

/// The query from the arguments, or from stdin when it is `-`.
fn read_query(words: &[String]) -> anyhow::Result<String> {
    if let [only] = words
        && only == "-"
    {
        let mut query = String::new();
        std::io::stdin()
            .read_to_string(&mut query)
            .context("cannot read the query from stdin")?;
        return Ok(query.trim().to_owned());
    }
    Ok(words.join(" "))
}

/// What the live display showed while the request ran.
#[derive(Debug, Default)]
struct Shown {
    /// The outcomes table was printed when the synthesis started.
    table: bool,
    /// The answer's text as streamed (the last attempt's).
    answer: String,
}

/// Keeps one status line on stderr up to date (how many agents are done, which are
/// still running), cleared when the request ends; and, with `stream_answer`, prints
/// the outcomes when the synthesis starts and the answer as it is written.
async fn live(
    mut events: tokio::sync::mpsc::UnboundedReceiver<metaorch::executor::AgentEvent>,
    agents: Vec<String>,
    status_line: bool,
    stream_answer: bool,
) -> Shown {
    use metaorch::executor::AgentEvent;
    let started = std::time::Instant::now();
    let mut done: Vec<metaorch::AgentOutcome> = Vec::new();
    let mut retries = 0;
    let mut shown = Shown::default();
    let mut writer: Option<(u32, String)> = None;
    let clear = || {
        let _ = write!(std::io::stderr(), "\x1b[2K");
    };
    while let Some(event) = events.recv().await {
        match event {
            AgentEvent::Done(outcome) => done.push(*outcome),
            AgentEvent::Retry { .. } => retries += 1,
            AgentEvent::Dispatch { .. } => {}
            AgentEvent::SynthesisStart { provider, model } => {
                if stream_answer {
                    if status_line {
                        clear();
                    }
                    done.sort_by_key(|o| agents.iter().position(|a| *a == o.agent_id));
                    let table = format!(
                        "{}\nsynthesizing on {provider}/{model}:\n\n",
                        render::outcomes(&done)
                    );
                    let _ = super::print_out(&table);
                    shown.table = true;
                }
                continue;
            }
            AgentEvent::SynthesisDelta {
                attempt,
                model,
                text,
            } => {
                if shown.table {
                    let mut out = String::new();
                    let this = (attempt, model);
                    if writer.as_ref().is_some_and(|w| *w != this) && !shown.answer.is_empty() {
                        out.push_str(&format!(
                            "\n\n[attempt {} on {} starts the answer over]\n\n",
                            this.0, this.1
                        ));
                        shown.answer.clear();
                    }
                    writer = Some(this);
                    out.push_str(&terminal_safe(&text));
                    shown.answer.push_str(&text);
                    let _ = super::print_out(&out);
                }
                continue;
            }
        }
        // Once the answer streams to the same terminal, the status line would cut
        // into it.
        if !status_line || shown.table {
            continue;
        }
        let waiting: Vec<&str> = agents
            .iter()
            .filter(|a| !done.iter().any(|o| &o.agent_id == *a))
            .map(String::as_str)
            .collect();
        let line = format!(
            "{:.1}s: {}/{} agents done{}{}",
            started.elapsed().as_secs_f64(),
            done.len(),
            agents.len(),
            if retries > 0 {
                format!(", {retries} retries")
            } else {
                String::new()
            },
            if waiting.is_empty() {
                String::new()
            } else {
                format!("; waiting for {}", waiting.join(", "))
            }
        );
        // Cleared, written, and the cursor put back at its start: a log line written
        // next simply overwrites it (log lines are longer), and the next update
        // redraws it below.
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\x1b[2K{}\r",
            line.chars().take(120).collect::<String>()
        );
        let _ = err.flush();
    }
    if status_line {
        clear();
    }
    shown
}
