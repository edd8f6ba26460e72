//! `metaorch mock-upstream`: the fake provider as a server, until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{Context, bail};
use metaorch::mock_upstream::{MockOptions, MockUpstream};

use super::args::{Cli, MockUpstreamArgs};

pub fn run(_cli: &Cli, args: &MockUpstreamArgs) -> anyhow::Result<ExitCode> {
    let total: f64 = args.faults.iter().map(|(_, r)| r).sum();
    if total > 1.0 + 1e-9 {
        bail!("the --fault rates add up to {total}; expected at most 1");
    }
    let options = MockOptions {
        latency_min: args.latency.0,
        latency_max: args.latency.1,
        seed: args.seed,
        rates: args.faults.clone(),
        script: args.scripts.clone(),
        retry_after: args.retry_after,
        request_log: args.request_log.clone(),
        limits: args.limits.limits(),
        keep_bodies: false,
    };
    let options_limits = options.limits;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let addr = SocketAddr::new(args.bind, args.port);
        let mock = MockUpstream::start(addr, options)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        eprintln!(
            "mock-upstream listening on {} (POST /v1/messages, POST /v1/chat/completions); Ctrl-C stops it",
            mock.url()
        );
        if !options_limits.is_empty() {
            eprintln!("mock-upstream: account limits {options_limits}");
        }
        super::shutdown_signal().await;
        eprintln!("mock-upstream: stopping after {} requests", mock.requests().len());
        mock.stop().await;
        Ok(ExitCode::SUCCESS)
    })
}
