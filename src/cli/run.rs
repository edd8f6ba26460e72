//! `metaorch run QUERY`: one request, printed as a table and an answer, or as JSON.

use std::io::Read;
use std::process::ExitCode;

use anyhow::Context;
use metaorch::config::Overrides;
use metaorch::telemetry::{LogFormat, init_telemetry, otel};
use metaorch::{Orchestrator, Response};

use super::args::{Cli, LogFormatArg, OutputFormat, RunArgs};
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
    let config = match super::load_config(cli, flags) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("error: the config is not valid:");
            for e in errors.errors() {
                eprintln!("  {e}");
            }
            eprintln!("Run `metaorch config check` for details, or fix the values above.");
            return Ok(ExitCode::from(2));
        }
    };
    let otel = init_telemetry(
        config.log_filter(),
        match cli.log_format {
            LogFormatArg::Json => LogFormat::Json,
            LogFormatArg::Pretty => LogFormat::Pretty,
        },
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let response = runtime.block_on(async {
        let request = metaorch::Request::new(query);
        let cancel = request.cancel.clone();
        // Ctrl-C ends the request cleanly: unfinished agents are reported, not lost.
        let ctrl_c = tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                cancel.cancel();
            }
        });
        let response = orchestrator.process_request(request).await;
        ctrl_c.abort();
        response
    })?;

    // The runtime is gone: flush the last spans now, outside it.
    drop(runtime);
    drop(otel);
    match args.format {
        OutputFormat::Json => {
            println!("{}", serde_json::to_string_pretty(&response)?);
        }
        OutputFormat::Text => print!("{}", render::response(&response, &config)),
    }
    if let Some(handle) = metrics {
        eprintln!("{}", metaorch::telemetry::metrics::summary(handle));
    }
    Ok(exit_code(&response))
}

fn exit_code(response: &Response) -> ExitCode {
    if response.ok {
        return ExitCode::SUCCESS;
    }
    let s = &response.summary;
    eprintln!(
        "error: {} of {} agents succeeded; at least {} required (min_successes). See the outcomes above, or trace {}.",
        s.succeeded,
        response.outcomes.len(),
        s.min_successes,
        response.trace_id
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
