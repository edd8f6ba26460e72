//! The command line's shape, declared with clap's derive API.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// metaorch: fan a query out to LLM sub-agents in parallel and synthesize one answer.
#[derive(Debug, Parser)]
#[command(name = "metaorch", version, about, long_about = None)]
pub struct Cli {
    /// Config file (TOML). Default: $METAORCH_CONFIG, then ./metaorch.toml, then the
    /// embedded default (six agents on the built-in `sim` provider).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Log filter: error, warn, info, debug, trace, or RUST_LOG directives.
    /// Default: $METAORCH_LOG_LEVEL, then $RUST_LOG, then the config's log.level, then
    /// warn on stderr and info in a log file.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Append log lines to this file instead of writing them to stderr (never
    /// truncated). Default: $METAORCH_LOG_FILE, then the config's log.file. The default
    /// filter for a file is info.
    #[arg(long, global = true, value_name = "PATH")]
    pub log_file: Option<PathBuf>,

    /// How log lines are written.
    #[arg(long, global = true, value_enum, default_value_t = LogFormatArg::Json)]
    pub log_format: LogFormatArg,

    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Answer one query: fan it out to every configured agent and synthesize the replies.
    Run(RunArgs),
    /// Answer every query of a file (JSON Lines, or one query per line with --text),
    /// appending one result line each to --out as it finishes. Rerun the same command
    /// after a crash or Ctrl-C: what is in --out is skipped, the rest runs.
    Batch(BatchArgs),
    /// Show one request's timeline from a JSON log: each agent's span, attempts,
    /// retries, fallback and end, breaker events, and the critical path.
    Trace(TraceArgs),
    /// Serve the orchestrator over HTTP: POST /v1/orchestrate, an OpenAI-compatible
    /// POST /v1/chat/completions, health, readiness, agents and recent traces.
    Serve(ServeArgs),
    /// Measure: the original report's Table 3 (sequential vs parallel), overhead over
    /// the critical path, and (`load`, `throughput`) behaviour under sustained load.
    Bench(BenchArgs),
    /// Serve a fake Anthropic Messages API and OpenAI Chat Completions API, with
    /// latency and faults injected, for tests, benchmarks and drills.
    MockUpstream(MockUpstreamArgs),
    /// Work with config files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file and print every problem with its place and the fix.
    Check {
        /// The file to check. Default: the file `run` would use.
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The query. Several words are joined with spaces; `-` reads it from stdin.
    #[arg(required = true, num_args = 1.., value_name = "QUERY")]
    pub query: Vec<String>,

    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,

    #[command(flatten)]
    pub request: RequestFlags,

    /// Print the Prometheus counters of the run on stderr at the end.
    #[arg(long)]
    pub metrics: bool,
}

#[derive(Debug, Args)]
pub struct BatchArgs {
    /// Queries, one per line: JSON objects `{"id": "q1", "query": "…", …}` (other
    /// fields are carried to the output), or plain text with --text. `-` reads stdin.
    #[arg(value_name = "INPUT")]
    pub input: PathBuf,

    /// Where results go, one JSON line per input id: the id, the input's fields, and
    /// under `response` the document `run --format json` prints. Appended to: ids
    /// already there are skipped.
    #[arg(long, value_name = "OUTPUT")]
    pub out: PathBuf,

    /// Each input line is one query (blank lines skipped); its id is its line number.
    #[arg(long)]
    pub text: bool,

    /// Requests in flight at once. Default: enough to fill concurrency_limit with the
    /// configured agents (at most 64). Every limit of the config applies on top,
    /// shared by the whole batch.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub in_flight: Option<u32>,

    /// Run again the ids whose result in OUTPUT did not meet min_successes (their old
    /// lines are replaced).
    #[arg(long)]
    pub retry_failed: bool,

    /// Refuse to start when any input line is bad (not JSON, no query, a repeated id)
    /// instead of reporting it and skipping it.
    #[arg(long)]
    pub strict: bool,

    /// Format of the summary printed at the end on stdout.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,

    #[command(flatten)]
    pub request: RequestFlags,
}

/// The settings of each request that `run` and `batch` take from the command line.
#[derive(Debug, Args)]
pub struct RequestFlags {
    /// Seed for every random draw (sim latencies and faults, retry jitter), for repeatable runs.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,

    /// Agent calls in flight at once, over every request of the process (overrides
    /// concurrency_limit).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency_limit: Option<u32>,

    /// A request's deadline, e.g. 30s or 1500ms (overrides request_timeout).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub request_timeout: Option<Duration>,

    /// Successful agents a request needs (overrides min_successes): exit status 0
    /// for `run`, an ok result for `batch`.
    #[arg(long, value_name = "N")]
    pub min_successes: Option<usize>,
}

impl RequestFlags {
    /// The flags as config overrides.
    pub fn overrides(&self) -> metaorch::config::Overrides {
        metaorch::config::Overrides {
            concurrency_limit: self.concurrency_limit.map(|n| n as usize),
            request_timeout: self.request_timeout,
            min_successes: self.min_successes,
            seed: self.seed,
            ..metaorch::config::Overrides::default()
        }
    }
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// The request's trace id (32 hex digits, as `run` prints it).
    #[arg(
        value_name = "TRACE_ID",
        required_unless_present = "last",
        conflicts_with = "last"
    )]
    pub trace_id: Option<String>,

    /// Show the request that started last in the log.
    #[arg(long)]
    pub last: bool,

    /// Log files to read, in order (`-` for stdin; gzip is detected). Default: the
    /// config's log.file, else stdin.
    #[arg(long = "log", value_name = "FILE")]
    pub logs: Vec<PathBuf>,

    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on. Default: server.bind (127.0.0.1).
    #[arg(long, value_name = "ADDR")]
    pub bind: Option<std::net::IpAddr>,

    /// Port to listen on (0 picks a free one). Default: server.port (8080).
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub mode: Option<BenchMode>,

    #[command(flatten)]
    pub upstream: BenchUpstream,

    /// Requests per mode.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: u64,

    /// Independent clients per mode, each with its own orchestrator and limit, sharing
    /// the requests between them (1 runs them strictly one at a time). Requests never
    /// share a limit across lanes, so each request's timing is as if it ran alone.
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub lanes: u64,

    /// Concurrency limits of the parallel modes (after the sequential one).
    #[arg(long, value_name = "N,N", value_delimiter = ',', default_values_t = [6usize, 4])]
    pub limits: Vec<usize>,

    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Also draw the latency distributions (end to end and critical path) as SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub chart: Option<PathBuf>,

    /// Print the Prometheus counters of the run on stderr at the end.
    #[arg(long)]
    pub metrics: bool,
}

#[derive(Debug, Subcommand)]
pub enum BenchMode {
    /// Keep N requests in flight for a while: overhead over each request's slowest
    /// call, requests/s, CPU, memory.
    Load(LoadArgs),
    /// The same against a near-zero-latency upstream: the orchestrator's own cost.
    Throughput(LoadArgs),
    /// Keep N requests in flight against an upstream with an account's limits (by
    /// default a mock-upstream started in-process): the share of the allowed rate
    /// served, 429 and 529 answers, failed agents, latency, and the concurrency limit
    /// over time.
    Limits(LimitsArgs),
    /// Several `serve` instances sharing limits through Redis, against one limited
    /// mock-upstream: the share of the allowed rate served, 429s after warm-up, Redis
    /// round trips per call, and latency against one instance without Redis.
    Cluster(ClusterBenchArgs),
    /// Requests drawn from a few distinct queries (Zipf-like), with no cache, the
    /// memory cache and, with --redis-url, the Redis cache: upstream calls saved, hit
    /// rate, latency.
    Cache(CacheBenchArgs),
}

#[derive(Debug, Args)]
pub struct ClusterBenchArgs {
    /// The Redis the instances share (a namespace of its own per run).
    #[arg(long, value_name = "URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// Instance counts to run, one after the other.
    #[arg(long, value_name = "N,N", value_delimiter = ',', default_values_t = [1u32, 2, 3], value_parser = clap::value_parser!(u32).range(1..=16))]
    pub instances: Vec<u32>,

    /// Requests per second the upstream account allows; the instances share a limit of
    /// as many requests per minute times 60.
    #[arg(long, value_name = "N", default_value_t = 100.0, value_parser = parse_per_second)]
    pub rps: f64,

    /// The upstream's latency range.
    #[arg(long, value_name = "MIN..MAX", default_value = "50ms..150ms", value_parser = parse_range)]
    pub latency: (Duration, Duration),

    /// Requests kept in flight, split evenly between the instances (the same load
    /// whatever their number).
    #[arg(long, value_name = "N", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub in_flight: u32,

    /// How long to measure, after the warm-up.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Run this long first without measuring.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = metaorch::config::parse_duration)]
    pub warmup: Duration,

    /// Also run two or more instances without Redis, each keeping the whole limit to
    /// itself: what sharing saves.
    #[arg(long)]
    pub unshared: bool,

    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CacheBenchArgs {
    #[command(flatten)]
    pub upstream: BenchUpstream,

    /// Requests in all, per mode.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub requests: usize,

    /// Distinct queries they are drawn from.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub distinct: usize,

    /// The Zipf exponent of the draw: query k is asked in proportion to 1 / k^s.
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    pub zipf: f64,

    /// Requests kept in flight at once.
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub in_flight: usize,

    /// Also run with the Redis cache at this URL (a namespace of its own per run).
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,

    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct LimitsArgs {
    /// `mock` (a mock-upstream started in-process with the limits below), `sim` (the
    /// in-process simulator with those limits), or the URL of a server whose limits
    /// the flags below describe.
    #[arg(long, value_name = "mock|sim|URL", default_value = "mock")]
    pub upstream: String,

    /// The wire format of a mock or URL upstream.
    #[arg(long, value_enum, default_value_t = ApiArg::Anthropic)]
    pub api: ApiArg,

    /// The upstream's latency range.
    #[arg(long, value_name = "MIN..MAX", default_value = "500ms..2000ms", value_parser = parse_range)]
    pub latency: (Duration, Duration),

    /// The upstream account's limits.
    #[command(flatten)]
    pub limits: AccountArgs,

    /// A fault by rate on the in-process mock, FAULT=FRACTION (repeatable), as
    /// `mock-upstream --fault`.
    #[arg(long = "fault", value_name = "FAULT=RATE", value_parser = parse_rate)]
    pub faults: Vec<(metaorch::mock_upstream::MockFault, f64)>,

    /// Requests kept in flight at once.
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub in_flight: u64,

    /// How long to measure, after the warm-up.
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Run this long first without measuring: the limit finds the capacity, the rate
    /// limits are learned.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = metaorch::config::parse_duration)]
    pub warmup: Duration,

    /// A fixed concurrency limit of N per provider and model, limits not learned from
    /// headers (flow control as a plain semaphore), instead of adaptive concurrency.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub fixed: Option<u32>,

    /// Seed for latencies and fault draws.
    #[arg(long, value_name = "N", default_value_t = 42)]
    pub seed: u64,

    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Also draw the concurrency limit and calls in flight over time as SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub chart: Option<PathBuf>,

    /// Print the Prometheus counters of the run on stderr at the end.
    #[arg(long)]
    pub metrics: bool,
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    #[command(flatten)]
    pub upstream: BenchUpstream,

    /// Requests kept in flight at once. Default: 100 for load, 64 for throughput.
    #[arg(long, value_name = "N")]
    pub in_flight: Option<usize>,

    /// How long to measure, after the warm-up.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Run this long first without measuring: connections are opened, caches and
    /// allocator arenas fill. Requests started during it are not counted.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = metaorch::config::parse_duration)]
    pub warmup: Duration,

    /// Agent calls in flight at once. Default: enough for every request's six agents.
    #[arg(long, value_name = "N")]
    pub concurrency_limit: Option<usize>,

    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Print the Prometheus counters of the run on stderr at the end.
    #[arg(long)]
    pub metrics: bool,
}

#[derive(Debug, Clone, Args)]
pub struct BenchUpstream {
    /// `sim` (in-process) or the URL of an Anthropic or OpenAI-compatible server, such
    /// as `metaorch mock-upstream`'s.
    #[arg(long, value_name = "sim|URL", default_value = "sim")]
    pub upstream: String,

    /// The wire format of a URL upstream.
    #[arg(long, value_enum, default_value_t = ApiArg::Anthropic)]
    pub api: ApiArg,

    /// HTTP/2 to a URL upstream: `auto` (by ALPN over https, HTTP/1.1 over http),
    /// `always` (h2c with prior knowledge over http, as mock-upstream speaks it) or
    /// `never` (HTTP/1.1 only). Default: `always` against `metaorch mock-upstream`
    /// (it stands for the Anthropic and OpenAI APIs, which speak HTTP/2), else `auto`.
    #[arg(long, value_name = "auto|always|never")]
    pub http2: Option<metaorch::provider::Http2>,

    /// Set when `http2` was chosen for the upstream rather than given.
    #[arg(skip)]
    pub http2_chosen: bool,

    /// Simulated latency range (sim upstream). Default: 500ms..2000ms, or 0ms for
    /// `throughput`.
    #[arg(long, value_name = "MIN..MAX", value_parser = parse_range)]
    pub latency: Option<(Duration, Duration)>,

    /// Multiplies simulated latencies (sim upstream), for quick runs: ratios hold,
    /// absolute times scale.
    #[arg(long, value_name = "F", default_value_t = 1.0)]
    pub time_scale: f64,

    /// Seed for the simulated latencies.
    #[arg(long, value_name = "N", default_value_t = 42)]
    pub seed: u64,

    /// Add the embedded config's synthesizer after the six agents, on the same
    /// upstream: seven calls a request, the seventh after the slowest agent.
    #[arg(long)]
    pub synthesize: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ApiArg {
    /// Anthropic's Messages API.
    Anthropic,
    /// OpenAI-compatible chat completions.
    Openai,
}

#[derive(Debug, Args)]
pub struct MockUpstreamArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    pub bind: std::net::IpAddr,

    /// Port to listen on (0 picks a free one and prints it).
    #[arg(long, value_name = "N", default_value_t = 8081)]
    pub port: u16,

    /// Latency range per request, drawn per request body: MIN..MAX or one duration.
    #[arg(long, value_name = "MIN..MAX", default_value = "500ms..2000ms", value_parser = parse_range)]
    pub latency: (Duration, Duration),

    /// Seed for latencies, replies and fault draws.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,

    /// A fault by rate, FAULT=FRACTION (repeatable): rate_limited, rate_limited_bare,
    /// overloaded, server, gateway_timeout, stream_error, stream_cut, reset, hang,
    /// malformed, oversized.
    #[arg(long = "fault", value_name = "FAULT=RATE", value_parser = parse_rate)]
    pub faults: Vec<(metaorch::mock_upstream::MockFault, f64)>,

    /// A scripted fault, TEXT:N:FAULT (repeatable): the first N times a request body
    /// containing TEXT is seen, answer with FAULT.
    #[arg(long = "script", value_name = "TEXT:N:FAULT")]
    pub scripts: Vec<metaorch::mock_upstream::MockScript>,

    /// The wait a rate_limited fault asks for (retry-after and retry-after-ms).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = metaorch::config::parse_duration)]
    pub retry_after: Duration,

    /// Append one JSON line per request to this file.
    #[arg(long, value_name = "FILE")]
    pub request_log: Option<PathBuf>,

    /// The fake account's limits.
    #[command(flatten)]
    pub limits: AccountArgs,
}

/// The limits of a fake provider account (mock-upstream's, or the in-process upstream
/// of `bench limits`).
#[derive(Debug, Clone, Args)]
pub struct AccountArgs {
    /// Requests per second the fake account allows (a fraction such as 0.5 is fine): a
    /// bucket of one second's worth (at least 1), refilled continuously. Past it: 429
    /// rate_limit_error with retry-after and retry-after-ms. Default: no limit.
    #[arg(long, value_name = "N", value_parser = parse_per_second)]
    pub rps: Option<f64>,

    /// Requests per minute the fake account allows, enforced as N/60 a second with a
    /// bucket of one second's worth, as Anthropic does (60 RPM is one request a
    /// second). Past it: 429. Default: no limit.
    #[arg(long, value_name = "N", value_parser = parse_limit::<u64>)]
    pub rpm: Option<u64>,

    /// Input tokens per minute the fake account allows: a bucket of N tokens refilled at
    /// N/60 a second (a request larger than N waits for a full bucket). Past it: 429.
    /// Default: no limit.
    #[arg(long, value_name = "N", value_parser = parse_limit::<u64>)]
    pub tpm: Option<u64>,

    /// Requests in progress at once (a stream until its last event). Past it: 529
    /// overloaded_error (503 on the OpenAI endpoint), without retry-after. Default: no
    /// limit.
    #[arg(long, value_name = "N", value_parser = parse_limit::<usize>)]
    pub max_concurrent: Option<usize>,
}

impl AccountArgs {
    /// The limits as the fake account takes them.
    pub fn limits(&self) -> metaorch::provider::AccountLimits {
        metaorch::provider::AccountLimits {
            rps: self.rps,
            rpm: self.rpm,
            tpm: self.tpm,
            max_concurrent: self.max_concurrent,
        }
    }
}

fn parse_range(text: &str) -> Result<(Duration, Duration), String> {
    let (min, max) = match text.split_once("..") {
        Some((a, b)) => (
            metaorch::config::parse_duration(a)?,
            metaorch::config::parse_duration(b)?,
        ),
        None => {
            let d = metaorch::config::parse_duration(text)?;
            (d, d)
        }
    };
    if min > max {
        return Err(format!("{text}: the minimum is above the maximum"));
    }
    Ok((min, max))
}

fn parse_rate(text: &str) -> Result<(metaorch::mock_upstream::MockFault, f64), String> {
    let (fault, rate) = text
        .split_once('=')
        .ok_or_else(|| format!("\"{text}\" is not FAULT=RATE, e.g. overloaded=0.1"))?;
    let rate: f64 = rate
        .parse()
        .map_err(|_| format!("\"{rate}\" is not a fraction; expected e.g. 0.1"))?;
    if !(0.0..=1.0).contains(&rate) {
        return Err(format!("{rate} is out of range; expected 0 to 1"));
    }
    Ok((fault.parse()?, rate))
}

fn parse_per_second(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 => Ok(n),
        _ => Err(format!(
            "\"{text}\" is not a rate above 0; expected e.g. 5 or 0.5 (leave the flag out for no limit)"
        )),
    }
}

fn parse_limit<T: std::str::FromStr + Default + PartialEq>(text: &str) -> Result<T, String> {
    match text.trim().parse::<T>() {
        Ok(n) if n != T::default() => Ok(n),
        _ => Err(format!(
            "\"{text}\" is not a whole number above 0; expected e.g. 60 (leave the flag out for no limit)"
        )),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// A table of agent outcomes, then the answer and the trace id.
    Text,
    /// One JSON document: trace_id, answer, outcomes[], usage, timings.
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormatArg {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Pretty,
}

impl From<LogFormatArg> for metaorch::telemetry::LogFormat {
    fn from(arg: LogFormatArg) -> Self {
        match arg {
            LogFormatArg::Json => metaorch::telemetry::LogFormat::Json,
            LogFormatArg::Pretty => metaorch::telemetry::LogFormat::Pretty,
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = metaorch::config::parse_duration(text)?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
