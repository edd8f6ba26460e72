//! `metaorch bench`: the original report's Table 3 (six agents one after another, then
//! in parallel under two concurrency limits), extended with the critical path — the
//! least time the calls themselves allow — and the overhead above it; and two load
//! modes, `load` and `throughput`, that keep many requests in flight.
//!
//! Latencies come from `sim` (in-process, seeded, scaled by `--time-scale`) or from a
//! real HTTP upstream such as `metaorch mock-upstream`. Every number is measured here,
//! by the client: nothing is asserted, and nothing is tuned to the machine.

mod cache;
mod chart;
mod cluster;
mod connections;
mod limits;
pub(crate) mod stats;

use std::io::{IsTerminal, Write as _};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use metaorch::config::Config;
use metaorch::provider::{
    AnthropicOptions, AnthropicProvider, Completion, CompletionRequest, Http2, OpenAiOptions,
    OpenAiProvider, Provider, ProviderError, Secret, SimOptions, SimProvider,
};
use metaorch::telemetry::{LogFormat, init_logging};
use metaorch::{Orchestrator, Response};
use serde::Serialize;
use tokio::time::Instant;

use super::args::{ApiArg, BenchArgs, BenchMode, BenchUpstream, Cli, LoadArgs};
use stats::{burst, critical_path, mean, percentile, usage};

/// The report's Table 3 (seconds): sequential, parallel c=6, semaphore 4.
const REPORT: [(&str, f64); 3] = [
    ("sequential", 8.24),
    ("parallel c=6", 2.11),
    ("parallel c=4", 2.85),
];

pub fn run(cli: &Cli, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    // As everywhere: info in a file (it is read later), warn on stderr.
    let default_level = if cli.log_file.is_some() {
        metaorch::config::DEFAULT_FILE_LOG_LEVEL
    } else {
        metaorch::config::DEFAULT_LOG_LEVEL
    };
    init_logging(
        cli.log_level.as_deref().unwrap_or(default_level),
        LogFormat::Json,
        cli.log_file.as_deref(),
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match &args.mode {
        None => runtime.block_on(table(args)),
        Some(BenchMode::Load(load_args)) => runtime.block_on(load(load_args, false)),
        Some(BenchMode::Throughput(load_args)) => runtime.block_on(load(load_args, true)),
        Some(BenchMode::Limits(limits_args)) => runtime.block_on(limits::run(limits_args)),
        Some(BenchMode::Cache(cache_args)) => runtime.block_on(cache::run(cache_args)),
        Some(BenchMode::Cluster(cluster_args)) => runtime.block_on(cluster::run(cluster_args)),
    }
}

/// Notes when each call starts, for the burst rate.
#[derive(Debug)]
struct Recorder {
    inner: Arc<dyn Provider>,
    origin: Instant,
    starts: Mutex<Vec<Duration>>,
}

#[async_trait]
impl Provider for Recorder {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn complete(&self, request: &CompletionRequest) -> Result<Completion, ProviderError> {
        let at = self.origin.elapsed();
        self.starts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(at);
        self.inner.complete(request).await
    }
}

impl Recorder {
    fn take(&self) -> Vec<Duration> {
        std::mem::take(&mut *self.starts.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

struct Setup {
    orchestrator: Orchestrator,
    recorder: Arc<Recorder>,
    /// The upstream, for the report.
    upstream: String,
    /// The window burst rates are counted in: a second, scaled like the latencies.
    second: Duration,
}

/// An orchestrator with the six default agents on the chosen upstream.
fn setup(
    up: &BenchUpstream,
    limit: usize,
    default_latency: (Duration, Duration),
    cache: Option<metaorch::config::CacheConfig>,
) -> anyhow::Result<Setup> {
    if !(up.time_scale > 0.0 && up.time_scale.is_finite()) {
        bail!(
            "--time-scale {} must be a positive number, e.g. 0.1",
            up.time_scale
        );
    }
    let sim = up.upstream == "sim";
    let (min, max) = up.latency.unwrap_or(default_latency);
    let inner: Arc<dyn Provider> = if sim {
        Arc::new(SimProvider::new(SimOptions {
            latency_min: min.mul_f64(up.time_scale),
            latency_max: max.mul_f64(up.time_scale),
            seed: Some(up.seed),
            ..SimOptions::default()
        }))
    } else {
        let url = reqwest_url(&up.upstream)?;
        let key = Some(Secret::new("bench"));
        match up.api {
            ApiArg::Anthropic => Arc::new(AnthropicProvider::new(AnthropicOptions {
                base_url: url,
                api_key: key,
                http2: up.http2.unwrap_or_default(),
                ..AnthropicOptions::default()
            })),
            ApiArg::Openai => Arc::new(OpenAiProvider::new(OpenAiOptions {
                base_url: url,
                api_key: key,
                http2: up.http2.unwrap_or_default(),
                ..OpenAiOptions::default()
            })),
        }
    };
    let recorder = Arc::new(Recorder {
        inner,
        origin: Instant::now(),
        starts: Mutex::new(Vec::new()),
    });
    let mut config = Config::embedded();
    config.concurrency_limit = limit.max(1);
    // Every call the bench keeps in flight may be in flight at the provider: the
    // adaptive limit may climb that far (by default it stops at 1,024).
    let ceiling = u32::try_from(limit).unwrap_or(u32::MAX);
    config.flow.concurrency.max = config.flow.concurrency.max.max(ceiling);
    config.request_timeout = Duration::from_secs(3600);
    // The fan-out is measured (six calls a request, comparable across versions),
    // unless the synthesis is asked for too.
    if !up.synthesize {
        config.synthesizer = None;
    }
    let cached = cache.is_some();
    config.cache = cache;
    let synthesizer = config.synthesizer.as_mut().map(|s| &mut s.agent);
    for agent in config.agents.iter_mut().chain(synthesizer) {
        agent.cache = cached;
        agent.provider = "bench".into();
        if !sim {
            agent.model = "bench-model".into();
        }
    }
    price_bench_model(&mut config);
    let orchestrator = Orchestrator::builder()
        .config(config)
        .provider("bench", Arc::clone(&recorder) as Arc<dyn Provider>)
        .build()?;
    Ok(Setup {
        orchestrator,
        recorder,
        upstream: if sim {
            format!(
                "sim, latency {:?}..{:?} × {} (seed {}){}",
                min,
                max,
                up.time_scale,
                up.seed,
                if up.synthesize {
                    ", with synthesis"
                } else {
                    ""
                }
            )
        } else {
            format!(
                "{} ({:?}, http2 {}{}){}",
                up.upstream,
                up.api,
                up.http2.unwrap_or_default(),
                if up.http2_chosen {
                    ": mock-upstream speaks h2c; --http2 never for HTTP/1.1"
                } else {
                    ""
                },
                if up.synthesize {
                    ", with synthesis"
                } else {
                    ""
                }
            )
        },
        second: if sim {
            Duration::from_secs(1).mul_f64(up.time_scale)
        } else {
            Duration::from_secs(1)
        },
    })
}

/// The default config's illustrative price for its simulated model, for the model the
/// agents ask an HTTP upstream for too: a bench reports a plausible cost, and no
/// `price.unknown` warning in the middle of its report.
fn price_bench_model(config: &mut Config) {
    if let Some(price) = config.prices.get("sim-1").copied() {
        config.prices.insert("bench-model".into(), price);
    }
}

/// The upstream with its HTTP version settled: as `--http2` says, else HTTP/2 (h2c) to
/// `metaorch mock-upstream` (known by its `/mock/stats`), which stands for APIs that
/// speak HTTP/2, else `auto`.
async fn settle_http2(up: &BenchUpstream) -> BenchUpstream {
    let mut up = up.clone();
    if up.http2.is_none() && up.upstream != "sim" {
        let mock = connections::read(&up.upstream).await.is_some();
        up.http2 = Some(if mock { Http2::Always } else { Http2::Auto });
        up.http2_chosen = mock;
    }
    up
}

fn reqwest_url(text: &str) -> anyhow::Result<String> {
    match reqwest::Url::parse(text) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(text.to_owned()),
        _ => bail!(
            "--upstream \"{text}\" is neither `sim` nor an http(s) URL such as http://127.0.0.1:8081"
        ),
    }
}

fn query(n: u64) -> String {
    format!("Bench request {n}: what are the risks of rewriting a service in Rust?")
}

/// One mode of the table.
#[derive(Debug, Serialize)]
pub struct ModeResult {
    name: String,
    concurrency_limit: usize,
    requests: u64,
    failed_agents: u64,
    mean_ms: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    critical_path_mean_ms: f64,
    overhead_mean_ms: f64,
    overhead_p50_ms: f64,
    overhead_p99_ms: f64,
    overhead_ratio: f64,
    cpu_percent: f64,
    peak_rss_mb: f64,
    burst_calls_per_second: usize,
    #[serde(skip)]
    e2e_ms: Vec<f64>,
    #[serde(skip)]
    critical_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct TableReport<'a> {
    upstream: String,
    agents: usize,
    requests_per_mode: u64,
    modes: &'a [ModeResult],
}

async fn table(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let metrics = if args.metrics {
        metaorch::telemetry::metrics::install()
    } else {
        None
    };
    let mut modes: Vec<(String, usize)> = vec![("sequential".into(), 1)];
    for &limit in &args.limits {
        if limit == 0 {
            bail!("--limits: 0 would run nothing; expected 1 or more");
        }
        modes.push((format!("parallel c={limit}"), limit));
    }
    let default_latency = (Duration::from_millis(500), Duration::from_millis(2000));
    let mut results = Vec::new();
    let mut upstream = String::new();
    let up = settle_http2(&args.upstream).await;
    for (name, limit) in modes {
        let lanes = (0..args.lanes.min(args.requests))
            .map(|_| setup(&up, limit, default_latency, None))
            .collect::<anyhow::Result<Vec<_>>>()?;
        upstream = lanes[0].upstream.clone();
        results.push(run_mode(lanes, &name, limit, args.requests).await?);
    }

    print!("{}", render_table(&upstream, args.requests, &results));
    if let Some(handle) = metrics {
        eprintln!("{}", metaorch::telemetry::metrics::summary(handle));
    }
    if let Some(path) = &args.json {
        let report = TableReport {
            upstream,
            agents: 6,
            requests_per_mode: args.requests,
            modes: &results,
        };
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.chart {
        chart::draw(
            path,
            &results,
            &format!(
                "metaorch bench: six agents, {} requests per mode",
                args.requests
            ),
        )?;
        eprintln!("chart written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_mode(
    lanes: Vec<Setup>,
    name: &str,
    limit: usize,
    requests: u64,
) -> anyhow::Result<ModeResult> {
    let progress = std::io::stderr().is_terminal();
    let (cpu_before, _) = usage();
    let started = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let lane_count = lanes.len() as u64;
    let mut tasks = tokio::task::JoinSet::new();
    let mut recorders = Vec::new();
    for (lane, setup) in lanes.into_iter().enumerate() {
        recorders.push((Arc::clone(&setup.recorder), setup.second));
        let done = Arc::clone(&done);
        let name = name.to_owned();
        tasks.spawn(async move {
            let mut samples = Vec::new();
            let mut i = lane as u64;
            while i < requests {
                let t = Instant::now();
                let response = setup
                    .orchestrator
                    .process(&query(i))
                    .await
                    .expect("the bench query is valid");
                let e2e = t.elapsed();
                let failed = response.outcomes.iter().filter(|o| !o.succeeded()).count() as u64;
                let calls: Vec<Duration> = response
                    .outcomes
                    .iter()
                    .map(|o| o.provider_latency)
                    .collect();
                samples.push((i, e2e, critical_path(&calls, limit), failed));
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if progress {
                    eprint!("\r{name}: {n}/{requests} requests");
                }
                i += lane_count;
            }
            samples
        });
    }
    let mut samples = Vec::with_capacity(requests as usize);
    while let Some(joined) = tasks.join_next().await {
        samples.extend(joined.context("a bench lane failed")?);
    }
    samples.sort_by_key(|s| s.0);
    if progress {
        eprint!("\r{}\r", " ".repeat(60));
        let _ = std::io::stderr().flush();
    }
    let e2e_ms: Vec<f64> = samples.iter().map(|s| s.1.as_secs_f64() * 1000.0).collect();
    let critical_ms: Vec<f64> = samples.iter().map(|s| s.2.as_secs_f64() * 1000.0).collect();
    let failed_agents = samples.iter().map(|s| s.3).sum();
    let wall = started.elapsed();
    let (cpu_after, rss) = usage();
    // One client's burst: the busiest lane's.
    let burst_calls = recorders
        .iter()
        .map(|(recorder, second)| burst(&mut recorder.take(), *second))
        .max()
        .unwrap_or(0);
    let overheads: Vec<f64> = e2e_ms
        .iter()
        .zip(&critical_ms)
        .map(|(e, c)| e - c)
        .collect();
    let mut sorted = e2e_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let mut sorted_overheads = overheads.clone();
    sorted_overheads.sort_by(f64::total_cmp);
    let critical_mean = mean(&critical_ms);
    Ok(ModeResult {
        name: name.to_owned(),
        concurrency_limit: limit,
        requests,
        failed_agents,
        mean_ms: mean(&e2e_ms),
        p50_ms: percentile(&sorted, 50.0),
        p95_ms: percentile(&sorted, 95.0),
        p99_ms: percentile(&sorted, 99.0),
        critical_path_mean_ms: critical_mean,
        overhead_mean_ms: mean(&overheads),
        overhead_p50_ms: percentile(&sorted_overheads, 50.0),
        overhead_p99_ms: percentile(&sorted_overheads, 99.0),
        overhead_ratio: if critical_mean > 0.0 {
            mean(&overheads) / critical_mean
        } else {
            0.0
        },
        cpu_percent: (cpu_after - cpu_before).as_secs_f64() / wall.as_secs_f64() * 100.0,
        peak_rss_mb: rss,
        burst_calls_per_second: burst_calls,
        e2e_ms,
        critical_ms,
    })
}

fn render_table(upstream: &str, requests: u64, results: &[ModeResult]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "six agents, {requests} requests per mode, upstream: {upstream}\n"
    );
    let _ = writeln!(
        out,
        "{:<14} {:>9} {:>9} {:>9} {:>9} {:>10} {:>12} {:>9} {:>6} {:>7} {:>6}",
        "MODE",
        "MEAN",
        "P50",
        "P95",
        "P99",
        "CRIT.PATH",
        "OVERHEAD",
        "OVER %",
        "CPU %",
        "RSS MB",
        "BURST"
    );
    for r in results {
        let _ = writeln!(
            out,
            "{:<14} {:>9} {:>9} {:>9} {:>9} {:>10} {:>12} {:>8.3}% {:>6.1} {:>7.1} {:>6}",
            r.name,
            secs(r.mean_ms),
            secs(r.p50_ms),
            secs(r.p95_ms),
            secs(r.p99_ms),
            secs(r.critical_path_mean_ms),
            format!("{:.3} ms", r.overhead_mean_ms),
            r.overhead_ratio * 100.0,
            r.cpu_percent,
            r.peak_rss_mb,
            r.burst_calls_per_second
        );
        if r.failed_agents > 0 {
            let _ = writeln!(out, "{:<14} {} agent calls failed", "", r.failed_agents);
        }
    }
    if let Some(seq) = results.first() {
        let _ = writeln!(
            out,
            "\ncut in mean latency against sequential, and the report's Table 3:"
        );
        for r in &results[1..] {
            let report = REPORT.iter().find(|(n, _)| *n == r.name).map(|(_, v)| *v);
            let cut = (1.0 - r.mean_ms / seq.mean_ms) * 100.0;
            let _ = match report {
                Some(v) => writeln!(
                    out,
                    "  {:<14} {cut:>5.1} %   (report: {} s → {v} s, {:.1} %; here {} → {})",
                    r.name,
                    REPORT[0].1,
                    (1.0 - v / REPORT[0].1) * 100.0,
                    secs(seq.mean_ms),
                    secs(r.mean_ms)
                ),
                None => writeln!(out, "  {:<14} {cut:>5.1} %", r.name),
            };
        }
    }
    let _ = writeln!(
        out,
        "\nCRIT.PATH: the least time the calls allow under the mode's limit (the slowest call, or the\n\
         makespan of their FIFO schedule on fewer slots). OVERHEAD = end to end − critical path.\n\
         BURST: most calls started within one (scaled) second."
    );
    out
}

/// Load and throughput: keep `in_flight` requests going for `duration`.
#[derive(Debug, Serialize)]
struct LoadReport {
    mode: &'static str,
    upstream: String,
    in_flight: usize,
    concurrency_limit: usize,
    duration_s: f64,
    requests: u64,
    failed_agents: u64,
    requests_per_s: f64,
    agent_calls_per_s: f64,
    e2e_p50_ms: f64,
    e2e_p99_ms: f64,
    overhead_p50_ms: f64,
    overhead_p99_ms: f64,
    cpu_cores_busy: f64,
    cpu_us_per_agent_call: f64,
    peak_rss_mb: f64,
    /// Peak RSS over the agent calls kept in flight (six per request), per 1,000.
    peak_rss_mb_per_1000_calls_in_flight: f64,
    /// Mean US dollars per request at the configured (for `sim`, illustrative)
    /// prices; `null` when a model has no price.
    cost_usd_per_request: Option<f64>,
    /// Connections opened and the protocol, when the upstream is a mock-upstream.
    #[serde(skip_serializing_if = "Option::is_none")]
    connections: Option<connections::ConnectionReport>,
}

async fn load(args: &LoadArgs, throughput: bool) -> anyhow::Result<ExitCode> {
    let in_flight = args.in_flight.unwrap_or(if throughput { 64 } else { 100 });
    if in_flight == 0 {
        bail!("--in-flight 0 would measure nothing; expected 1 or more");
    }
    let limit = args.concurrency_limit.unwrap_or(in_flight * 6);
    let default_latency = if throughput {
        (Duration::ZERO, Duration::ZERO)
    } else {
        (Duration::from_millis(500), Duration::from_millis(2000))
    };
    let metrics = if args.metrics {
        metaorch::telemetry::metrics::install()
    } else {
        None
    };
    let upstream = settle_http2(&args.upstream).await;
    let setup = setup(&upstream, limit, default_latency, None)?;
    let stats_before = if args.upstream.upstream == "sim" {
        None
    } else {
        connections::read(&args.upstream.upstream).await
    };
    let counter = Arc::new(AtomicU64::new(0));
    let warm = Instant::now() + args.warmup;
    let deadline = warm + args.duration;
    // The CPU clock is read when the warm-up ends, by a task that waits for it.
    let cpu_at_warm = tokio::spawn(async move {
        tokio::time::sleep_until(warm).await;
        usage().0
    });
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        let orchestrator = setup.orchestrator.clone();
        let counter = Arc::clone(&counter);
        tasks.spawn(async move {
            let mut samples = Vec::new();
            while Instant::now() < deadline {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                let counted = t >= warm;
                let response: Response = orchestrator
                    .process(&query(n))
                    .await
                    .expect("the bench query is valid");
                let e2e = t.elapsed();
                let slowest = response
                    .outcomes
                    .iter()
                    .map(|o| o.provider_latency)
                    .max()
                    .unwrap_or_default();
                let failed = response.outcomes.iter().filter(|o| !o.succeeded()).count();
                if counted {
                    samples.push(Sample {
                        e2e,
                        slowest,
                        calls: response.outcomes.len(),
                        failed,
                        cost_usd: response.usage.cost_usd,
                    });
                }
            }
            samples
        });
    }
    let mut samples = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        samples.extend(joined.context("a load task failed")?);
    }
    let wall = warm.elapsed();
    let (cpu_after, rss) = usage();
    let cpu_before = cpu_at_warm.await.context("the CPU clock task failed")?;
    let connections = match stats_before {
        Some(before) => connections::read(&args.upstream.upstream)
            .await
            .map(|after| connections::ConnectionReport::between(before, after)),
        None => None,
    };
    let cpu = cpu_after.saturating_sub(cpu_before).as_secs_f64();
    let calls: usize = samples.iter().map(|s| s.calls).sum();
    let mut e2e: Vec<f64> = samples
        .iter()
        .map(|s| s.e2e.as_secs_f64() * 1000.0)
        .collect();
    let mut overhead: Vec<f64> = samples
        .iter()
        .map(|s| s.e2e.saturating_sub(s.slowest).as_secs_f64() * 1000.0)
        .collect();
    let cost_usd_per_request = metaorch::cost::sum(samples.iter().map(|s| s.cost_usd))
        .filter(|_| !samples.is_empty())
        .map(|total| total / samples.len() as f64);
    e2e.sort_by(f64::total_cmp);
    overhead.sort_by(f64::total_cmp);
    let report = LoadReport {
        mode: if throughput { "throughput" } else { "load" },
        upstream: setup.upstream.clone(),
        in_flight,
        concurrency_limit: limit,
        duration_s: wall.as_secs_f64(),
        requests: samples.len() as u64,
        failed_agents: samples.iter().map(|s| s.failed as u64).sum(),
        requests_per_s: samples.len() as f64 / wall.as_secs_f64(),
        agent_calls_per_s: calls as f64 / wall.as_secs_f64(),
        e2e_p50_ms: percentile(&e2e, 50.0),
        e2e_p99_ms: percentile(&e2e, 99.0),
        overhead_p50_ms: percentile(&overhead, 50.0),
        overhead_p99_ms: percentile(&overhead, 99.0),
        cpu_cores_busy: cpu / wall.as_secs_f64(),
        cpu_us_per_agent_call: if calls > 0 {
            cpu / calls as f64 * 1e6
        } else {
            0.0
        },
        peak_rss_mb: rss,
        peak_rss_mb_per_1000_calls_in_flight: rss * 1000.0 / (in_flight as f64 * 6.0),
        cost_usd_per_request,
        connections,
    };
    println!(
        "{} — {} requests in flight for {:.1} s after a {:.1} s warm-up (limit {}), upstream: {}",
        report.mode,
        in_flight,
        report.duration_s,
        args.warmup.as_secs_f64(),
        limit,
        report.upstream
    );
    println!(
        "  requests:  {} ({:.1}/s), agent calls {:.0}/s, {} failed agent calls",
        report.requests, report.requests_per_s, report.agent_calls_per_s, report.failed_agents
    );
    println!(
        "  latency:   end to end p50 {:.3} ms, p99 {:.3} ms",
        report.e2e_p50_ms, report.e2e_p99_ms
    );
    println!(
        "  overhead:  over each request's slowest call p50 {:.3} ms, p99 {:.3} ms",
        report.overhead_p50_ms, report.overhead_p99_ms
    );
    println!(
        "  cpu:       {:.2} CPU cores busy, {:.1} µs CPU per agent call, peak RSS {:.1} MB ({:.1} MB per 1,000 calls in flight)",
        report.cpu_cores_busy,
        report.cpu_us_per_agent_call,
        report.peak_rss_mb,
        report.peak_rss_mb_per_1000_calls_in_flight
    );
    if let Some(c) = &report.connections {
        println!(
            "  connections: {} opened for {} calls ({:.2} per 1,000 calls, warm-up included), {}; {} open at the end",
            c.opened, c.calls, c.per_1000_calls, c.protocol, c.open_at_end
        );
    }
    match report.cost_usd_per_request {
        Some(usd) => println!(
            "  cost:      ${usd:.6} per request, at the default config's illustrative price for sim-1"
        ),
        None => println!("  cost:      unknown (a model has no price)"),
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(handle) = metrics {
        eprintln!("{}", metaorch::telemetry::metrics::summary(handle));
    }
    Ok(ExitCode::SUCCESS)
}

fn secs(ms: f64) -> String {
    format!("{:.3}s", ms / 1000.0)
}

/// One request of a load run.
struct Sample {
    e2e: Duration,
    /// Its slowest call, as the provider measured it.
    slowest: Duration,
    calls: usize,
    failed: usize,
    cost_usd: Option<f64>,
}
