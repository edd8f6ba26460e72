//! `metaorch bench limits`: requests kept in flight against an upstream that enforces
//! an account's limits — how much of the allowed rate is served, how many calls the
//! upstream turns away (429, 529), whether any agent fails, and how the concurrency
//! limit moves. By default the upstream is a `mock-upstream` started in this process
//! on 127.0.0.1, so the limits are known exactly; `--fixed N` runs the same load with
//! a plain fixed limit per provider and model, for comparison.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use metaorch::Orchestrator;
use metaorch::config::Config;
use metaorch::mock_upstream::{MockOptions, MockUpstream};
use metaorch::provider::{
    AccountLimits, AnthropicOptions, AnthropicProvider, Completion, CompletionRequest,
    OpenAiOptions, OpenAiProvider, Provider, ProviderError, Secret, SimOptions, SimProvider,
};
use serde::Serialize;
use tokio::time::Instant;

use super::super::args::{ApiArg, LimitsArgs};
use super::stats::percentile;

/// How an upstream call ended, as counted here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ok,
    TooMany,
    Overloaded,
    Other,
}

/// Counts every call the orchestrator makes to the upstream.
#[derive(Debug)]
struct Counter {
    inner: Arc<dyn Provider>,
    /// (start, end, answer) of each call.
    calls: Mutex<Vec<(Instant, Instant, Answer)>>,
}

#[async_trait]
impl Provider for Counter {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn complete(&self, request: &CompletionRequest) -> Result<Completion, ProviderError> {
        let start = Instant::now();
        let result = self.inner.complete(request).await;
        let answer = match &result {
            Ok(_) => Answer::Ok,
            Err(e) if e.status == Some(429) => Answer::TooMany,
            Err(e) if e.status == Some(529) => Answer::Overloaded,
            Err(_) => Answer::Other,
        };
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((start, Instant::now(), answer));
        result
    }
}

/// One sample of the lane's state.
#[derive(Debug, Clone, Copy, Serialize)]
struct Sample {
    at_s: f64,
    limit: u32,
    in_flight: u32,
    queued: u32,
}

#[derive(Debug, Serialize)]
struct LimitsReport {
    upstream: String,
    limits: String,
    latency_ms: (f64, f64),
    flow: String,
    in_flight: u64,
    duration_s: f64,
    warmup_s: f64,
    /// Agent calls a second the upstream allows, when its limits say.
    allowed_per_s: Option<f64>,
    allowed_by: String,
    served_per_s: f64,
    served_share: Option<f64>,
    upstream_calls: usize,
    answered_429: usize,
    answered_529: usize,
    answered_other_errors: usize,
    refused_share: f64,
    upstream_calls_all: usize,
    answered_429_all: usize,
    answered_529_all: usize,
    requests: usize,
    agents: usize,
    failed_agents: usize,
    failed_agents_all: usize,
    e2e_p50_ms: f64,
    e2e_p99_ms: f64,
    limit_final: u32,
    limit_mean: f64,
    limit_min: u32,
    limit_max: u32,
    samples: Vec<Sample>,
}

pub(super) async fn run(args: &LimitsArgs) -> anyhow::Result<ExitCode> {
    let total: f64 = args.faults.iter().map(|(_, r)| r).sum();
    if total > 1.0 + 1e-9 {
        bail!("the --fault rates add up to {total}; expected at most 1");
    }
    let limits = args.limits.limits();
    let (min, max) = args.latency;
    let (inner, upstream, mock): (Arc<dyn Provider>, String, Option<MockUpstream>) = match args
        .upstream
        .as_str()
    {
        "sim" => {
            if !args.faults.is_empty() {
                bail!(
                    "--fault applies to the mock upstream; the sim has its own faults in a config"
                );
            }
            let sim = SimProvider::new(SimOptions {
                latency_min: min,
                latency_max: max,
                seed: Some(args.seed),
                limits,
                ..SimOptions::default()
            });
            (Arc::new(sim), "sim (in-process)".to_owned(), None)
        }
        "mock" => {
            let mock = MockUpstream::start(
                std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                MockOptions {
                    latency_min: min,
                    latency_max: max,
                    seed: args.seed,
                    rates: args.faults.clone(),
                    limits,
                    ..MockOptions::default()
                },
            )
            .await
            .context("cannot start the in-process mock upstream")?;
            let provider = http_provider(args.api, &mock.url());
            let name = format!("mock-upstream on {} ({:?})", mock.url(), args.api);
            (provider, name, Some(mock))
        }
        url => {
            if !args.faults.is_empty() {
                bail!(
                    "--fault applies to the in-process mock; start the server at {url} with its own faults"
                );
            }
            let url = super::reqwest_url(url)?;
            (
                http_provider(args.api, &url),
                format!("{url} ({:?})", args.api),
                None,
            )
        }
    };
    let counter = Arc::new(Counter {
        inner,
        calls: Mutex::new(Vec::new()),
    });
    let orchestrator = orchestrator(args, Arc::clone(&counter) as Arc<dyn Provider>)?;
    let metrics = if args.metrics {
        metaorch::telemetry::metrics::install()
    } else {
        None
    };

    let origin = Instant::now();
    let warm = origin + args.warmup;
    let end = warm + args.duration;
    let sampler = {
        let orchestrator = orchestrator.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while Instant::now() < end {
                tick.tick().await;
                if let Some(lane) = orchestrator.lanes().first() {
                    samples.push(Sample {
                        at_s: origin.elapsed().as_secs_f64(),
                        limit: lane.limit,
                        in_flight: lane.in_flight,
                        queued: lane.queued,
                    });
                }
            }
            samples
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..args.in_flight {
        let orchestrator = orchestrator.clone();
        tasks.spawn(async move {
            let mut samples = Vec::new();
            let mut n = 0u64;
            while Instant::now() < end {
                let started = Instant::now();
                let response = orchestrator
                    .process(&format!("Limits bench {lane}-{n}: what limits a fan-out?"))
                    .await
                    .expect("the bench query is valid");
                let failed = response.outcomes.iter().filter(|o| !o.succeeded()).count();
                samples.push((started, started.elapsed(), response.outcomes.len(), failed));
                n += 1;
            }
            samples
        });
    }
    let mut requests = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        requests.extend(joined.context("a bench lane failed")?);
    }
    let samples = sampler.await.context("the sampler failed")?;
    if let Some(mock) = mock {
        mock.stop().await;
    }

    let report = report(
        args, &limits, upstream, &counter, &requests, samples, warm, end,
    );
    print!("{}", render(&report));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.chart {
        super::chart::draw_limits(path, &report.samples_series(), &report.title())?;
        eprintln!("chart written to {}", path.display());
    }
    if let Some(handle) = metrics {
        eprintln!("{}", metaorch::telemetry::metrics::summary(handle));
    }
    Ok(ExitCode::SUCCESS)
}

fn http_provider(api: ApiArg, url: &str) -> Arc<dyn Provider> {
    let key = Some(Secret::new("bench"));
    match api {
        ApiArg::Anthropic => Arc::new(AnthropicProvider::new(AnthropicOptions {
            base_url: url.to_owned(),
            api_key: key,
            ..AnthropicOptions::default()
        })),
        ApiArg::Openai => Arc::new(OpenAiProvider::new(OpenAiOptions {
            base_url: format!("{}/v1", url.trim_end_matches('/')),
            api_key: key,
            ..OpenAiOptions::default()
        })),
    }
}

/// The six default agents on the upstream, with the default deadline, retries and
/// breakers; flow control adaptive, or fixed with `--fixed`.
fn orchestrator(args: &LimitsArgs, provider: Arc<dyn Provider>) -> anyhow::Result<Orchestrator> {
    let mut config = Config::embedded();
    config.concurrency_limit = (args.in_flight as usize).saturating_mul(6).max(1);
    // The fan-out is measured: six calls a request, comparable across versions.
    config.synthesizer = None;
    for agent in &mut config.agents {
        agent.provider = "bench".into();
        agent.model = "bench-model".into();
    }
    super::price_bench_model(&mut config);
    if let Some(n) = args.fixed {
        config.flow.concurrency.enabled = false;
        config.flow.concurrency.max = n;
        config.flow.learn_limits = false;
    }
    Ok(Orchestrator::builder()
        .config(config)
        .provider("bench", provider)
        .build()?)
}

/// What the upstream allows, in agent calls a second, and which limit says so. A
/// concurrency limit allows `max_concurrent` over the mean latency of the calls it
/// served (measured, since a seed's latency draws average close to, not exactly, the
/// middle of the range).
fn allowed(limits: &AccountLimits, mean: f64) -> (Option<f64>, String) {
    let mut candidates: Vec<(f64, String)> = Vec::new();
    if let Some(rps) = limits.rps {
        candidates.push((rps, format!("rps {rps}")));
    }
    if let Some(rpm) = limits.rpm {
        candidates.push((rpm as f64 / 60.0, format!("rpm {rpm}")));
    }
    if let Some(n) = limits.max_concurrent
        && mean > 0.0
    {
        candidates.push((
            n as f64 / mean,
            format!("max_concurrent {n} / measured mean latency {mean:.3} s"),
        ));
    }
    match candidates.into_iter().min_by(|a, b| a.0.total_cmp(&b.0)) {
        Some((rate, by)) => (Some(rate), by),
        None => (None, "no limit (tpm is not counted)".to_owned()),
    }
}

#[allow(clippy::too_many_arguments)]
fn report(
    args: &LimitsArgs,
    limits: &AccountLimits,
    upstream: String,
    counter: &Counter,
    requests: &[(Instant, Duration, usize, usize)],
    samples: Vec<Sample>,
    warm: Instant,
    end: Instant,
) -> LimitsReport {
    let calls = counter.calls.lock().unwrap_or_else(|e| e.into_inner());
    let window = |t: &Instant| *t >= warm && *t < end;
    let count = |answer: Answer, measured: bool| {
        calls
            .iter()
            .filter(|(start, _, a)| *a == answer && (!measured || window(start)))
            .count()
    };
    let upstream_calls = calls.iter().filter(|(s, _, _)| window(s)).count();
    let served = calls
        .iter()
        .filter(|(_, done, a)| *a == Answer::Ok && window(done))
        .count();
    let measured_s = args.duration.as_secs_f64();
    let served_per_s = served as f64 / measured_s;
    let served_latencies: Vec<f64> = calls
        .iter()
        .filter(|(start, _, a)| *a == Answer::Ok && window(start))
        .map(|(start, done, _)| done.duration_since(*start).as_secs_f64())
        .collect();
    let mean_latency = if served_latencies.is_empty() {
        (args.latency.0 + args.latency.1).as_secs_f64() / 2.0
    } else {
        served_latencies.iter().sum::<f64>() / served_latencies.len() as f64
    };
    let (allowed_per_s, allowed_by) = allowed(limits, mean_latency);
    let (answered_429, answered_529) = (
        count(Answer::TooMany, true),
        count(Answer::Overloaded, true),
    );
    let measured: Vec<_> = requests.iter().filter(|r| r.0 >= warm).collect();
    let mut e2e: Vec<f64> = measured
        .iter()
        .map(|r| r.1.as_secs_f64() * 1000.0)
        .collect();
    e2e.sort_by(f64::total_cmp);
    let window_samples: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at_s >= args.warmup.as_secs_f64())
        .collect();
    let limit_mean = if window_samples.is_empty() {
        0.0
    } else {
        window_samples
            .iter()
            .map(|s| f64::from(s.limit))
            .sum::<f64>()
            / window_samples.len() as f64
    };
    LimitsReport {
        upstream,
        limits: limits.to_string(),
        latency_ms: (
            args.latency.0.as_secs_f64() * 1000.0,
            args.latency.1.as_secs_f64() * 1000.0,
        ),
        flow: match args.fixed {
            Some(n) => format!("fixed limit {n} per provider and model"),
            None => "adaptive".to_owned(),
        },
        in_flight: args.in_flight,
        duration_s: measured_s,
        warmup_s: args.warmup.as_secs_f64(),
        allowed_per_s,
        allowed_by,
        served_per_s,
        served_share: allowed_per_s.map(|a| served_per_s / a),
        upstream_calls,
        answered_429,
        answered_529,
        answered_other_errors: count(Answer::Other, true),
        refused_share: if upstream_calls == 0 {
            0.0
        } else {
            (answered_429 + answered_529) as f64 / upstream_calls as f64
        },
        upstream_calls_all: calls.len(),
        answered_429_all: count(Answer::TooMany, false),
        answered_529_all: count(Answer::Overloaded, false),
        requests: measured.len(),
        agents: measured.iter().map(|r| r.2).sum(),
        failed_agents: measured.iter().map(|r| r.3).sum(),
        failed_agents_all: requests.iter().map(|r| r.3).sum(),
        e2e_p50_ms: percentile(&e2e, 50.0),
        e2e_p99_ms: percentile(&e2e, 99.0),
        limit_final: samples.last().map_or(0, |s| s.limit),
        limit_mean,
        limit_min: window_samples.iter().map(|s| s.limit).min().unwrap_or(0),
        limit_max: window_samples.iter().map(|s| s.limit).max().unwrap_or(0),
        samples,
    }
}

impl LimitsReport {
    fn title(&self) -> String {
        format!(
            "bench limits: {} in flight, {}, upstream limits {} ({})",
            self.in_flight, self.flow, self.limits, self.allowed_by
        )
    }

    /// (seconds, limit, in flight) for the chart.
    fn samples_series(&self) -> Vec<(f64, u32, u32)> {
        self.samples
            .iter()
            .map(|s| (s.at_s, s.limit, s.in_flight))
            .collect()
    }
}

fn render(r: &LimitsReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "limits — {} requests in flight for {:.1} s after a {:.1} s warm-up, flow control {}",
        r.in_flight, r.duration_s, r.warmup_s, r.flow
    );
    let _ = writeln!(
        out,
        "  upstream:  {}, limits {}, latency {:.0}..{:.0} ms",
        r.upstream, r.limits, r.latency_ms.0, r.latency_ms.1
    );
    match (r.allowed_per_s, r.served_share) {
        (Some(allowed), Some(share)) => {
            let _ = writeln!(
                out,
                "  served:    {:.1} agent calls/s succeeded, {:.1} % of the {allowed:.1}/s allowed ({})",
                r.served_per_s,
                share * 100.0,
                r.allowed_by
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "  served:    {:.1} agent calls/s succeeded ({})",
                r.served_per_s, r.allowed_by
            );
        }
    }
    let _ = writeln!(
        out,
        "  refused:   {} of {} upstream calls after warm-up answered 429, {} answered 529 ({:.2} %); {} other errors; whole run: {} calls, {} 429, {} 529",
        r.answered_429,
        r.upstream_calls,
        r.answered_529,
        r.refused_share * 100.0,
        r.answered_other_errors,
        r.upstream_calls_all,
        r.answered_429_all,
        r.answered_529_all
    );
    let _ = writeln!(
        out,
        "  agents:    {} requests, {} agent outcomes after warm-up, {} failed ({} in the whole run)",
        r.requests, r.agents, r.failed_agents, r.failed_agents_all
    );
    let _ = writeln!(
        out,
        "  latency:   end to end p50 {:.1} ms, p99 {:.1} ms",
        r.e2e_p50_ms, r.e2e_p99_ms
    );
    let _ = writeln!(
        out,
        "  limit:     {} at the end; after warm-up mean {:.1}, min {}, max {}",
        r.limit_final, r.limit_mean, r.limit_min, r.limit_max
    );
    out
}
