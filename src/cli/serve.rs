//! `metaorch serve`: the HTTP service, until SIGTERM or Ctrl-C, then a drain.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use metaorch::Orchestrator;
use metaorch::config::Overrides;
use metaorch::server::{ServerState, serve as run_server};
use metaorch::telemetry::{TraceRing, init_server_telemetry, otel};

use super::args::{Cli, ServeArgs};

/// Recent log lines kept for `GET /v1/traces/{id}`.
const RING_BYTES: usize = 16 << 20;

/// How long the runtime may take, once the server has returned, to stop what is left
/// (an exporter's last batch): the process exits within it.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(1);

pub fn serve(cli: &Cli, args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let config = match super::config_or_exit(cli, Overrides::default()) {
        Ok(config) => config,
        Err(code) => return Ok(code),
    };
    let ring = TraceRing::new(RING_BYTES);
    // Log lines go through a queue and a thread of their own: a slow disk or pipe
    // never blocks the workers that serve requests.
    let telemetry = init_server_telemetry(
        // A server's log is read later: info unless told otherwise.
        config.log_level.as_deref().unwrap_or("info"),
        cli.log_format.into(),
        config.log_file.as_deref(),
        Some(ring.clone()),
        otel::endpoint(config.otlp_endpoint.as_deref()).as_deref(),
    )?;
    let mut server = config.server.clone();
    if let Some(bind) = args.bind {
        server.bind = bind;
    }
    if let Some(port) = args.port {
        server.port = port;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let code = runtime.block_on(async move {
        let orchestrator = Orchestrator::builder().config(config.clone()).build()?;
        let addr = SocketAddr::new(server.bind, server.port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        eprintln!(
            "metaorch serve: http://{local} ({} agents from {}{}); SIGTERM or Ctrl-C drains and stops",
            orchestrator.agents().count(),
            config.origin,
            if server.auth_tokens.is_empty() { ", no auth" } else { ", bearer auth" }
        );
        if server.auth_tokens.is_empty() && !server.bind.is_loopback() {
            eprintln!(
                "warning: listening on {} with no bearer token: anyone who can reach this address can run requests on your provider keys; set server.auth_tokens or METAORCH_SERVER_TOKENS, or bind 127.0.0.1",
                server.bind
            );
            tracing::warn!(
                event = "server.unauthenticated",
                addr = %local,
                "serving a non-loopback address with no bearer token"
            );
        }
        tracing::info!(event = "server.start", addr = %local, agents = orchestrator.agents().count(), "serving");
        let state = ServerState::new(orchestrator, server, Some(ring));
        run_server(listener, state, super::shutdown_signal()).await?;
        Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
    });
    // The server has drained; whatever task is left must not keep the process.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    // Outside the runtime: write the queued log lines, flush the last spans.
    drop(telemetry);
    code
}
