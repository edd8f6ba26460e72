//! `metaorch run QUERY`: one request, printed as a table and an answer, or as JSON.

use std::io::{IsTerminal, Read, Write as _};
use std::process::ExitCode;

use anyhow::Context;
use metaorch::config::Overrides;
use metaorch::telemetry::{init_telemetry, otel};
use metaorch::{Orchestrator, Response};

use super::args::{Cli, OutputFormat, RunArgs};
use super::render;

pub fn run(cli: &Cli, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let query = read_query(&args.query)?;
    let flags = Overrides {
        concurrency_limit: args.concurrency_limit.map(|n| n as usize),
        request_timeout: args.request_timeout,
        min_successes: args.min_successes,
        seed: args.seed,
        ..Overrides::default()
    };
    let config = match super::config_or_exit(cli, flags) {
        Ok(config) => config,
        Err(code) => return Ok(code),
    };
    let otel = init_telemetry(
        config.log_filter(),
        cli.log_format.into(),
        config.log_file.as_deref(),
        None,
        otel::endpoint(config.otlp_endpoint.as_deref()).as_deref(),
    )?;

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
        // On a terminal, a status line says which agents are still running.
        let progress = std::io::stderr().is_terminal().then(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            request = request.clone().with_events(tx);
            tokio::spawn(progress(rx, agents))
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
        if let Some(progress) = progress {
            let _ = progress.await;
        }
        response
    })?;

    // The runtime is gone: flush the last spans now, outside it.
    drop(runtime);
    drop(otel);
    match args.format {
        OutputFormat::Json => {
            super::print_out(&format!("{}\n", serde_json::to_string_pretty(&response)?))?;
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

/// Keeps one status line on stderr up to date: how many agents are done, and which
/// are still running. Cleared when the request ends.
async fn progress(
    mut events: tokio::sync::mpsc::UnboundedReceiver<metaorch::executor::AgentEvent>,
    agents: Vec<String>,
) {
    use metaorch::executor::AgentEvent;
    let started = std::time::Instant::now();
    let mut done: Vec<String> = Vec::new();
    let mut retries = 0;
    while let Some(event) = events.recv().await {
        match event {
            AgentEvent::Done(outcome) => done.push(outcome.agent_id.clone()),
            AgentEvent::Retry { .. } => retries += 1,
            AgentEvent::Dispatch { .. } => {}
        }
        let waiting: Vec<&str> = agents
            .iter()
            .filter(|a| !done.contains(a))
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
    let _ = write!(std::io::stderr(), "\x1b[2K");
}
