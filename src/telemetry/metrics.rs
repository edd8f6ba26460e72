//! Prometheus metrics, through the `metrics` facade: every count and timing the
//! operators alert on. Recording is a no-op until [`install`] sets the process's
//! recorder (`serve` does; `run` and `bench` with `--metrics`).
//!
//! Label values are bounded: agent ids, provider names and models come from the config,
//! error kinds and states from closed sets — never queries or trace ids.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Seconds: from a fast simulated call to a long generation.
const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Set once a recorder is installed: until then every recording function returns at
/// once, without building label strings.
static ENABLED: AtomicBool = AtomicBool::new(false);

fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Installs the Prometheus recorder for this process (once; later calls return the same
/// handle). `None` if another recorder was installed first.
pub fn install() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new().set_buckets(BUCKETS).ok()?;
            let handle = builder.install_recorder().ok()?;
            describe();
            ENABLED.store(true, Ordering::Relaxed);
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "metaorch_requests_total",
        "Requests finished, by outcome (ok: min_successes met; failed; cancelled: the client went away or the drain timed out)."
    );
    describe_counter!(
        "metaorch_cluster_syncs_total",
        "Syncs of a provider/model's shared limits with Redis ([redis]), by result (ok; error: this instance kept its local share)."
    );
    describe_gauge!(
        "metaorch_cluster_shared",
        "1 while limits are shared through Redis, 0 while Redis cannot be reached and each instance keeps its local share."
    );
    describe_counter!(
        "metaorch_cluster_fallbacks_total",
        "Times Redis became unreachable and the instance fell back to its local share of the shared limits."
    );
    describe_counter!(
        "metaorch_cache_requests_total",
        "Response cache lookups, by result (hit: the store or an identical call in flight answered; miss; error: the store failed and the call went upstream uncached)."
    );
    describe_counter!(
        "metaorch_synthesis_total",
        "Synthesizer calls after the fan-out, by status (succeeded; failed, timed_out, skipped: the answer fell back to the replies laid end to end)."
    );
    describe_gauge!(
        "metaorch_server_connections",
        "HTTP connections open, by kind (served; overflow: past max_connections, answering /healthz and 503)."
    );
    describe_counter!(
        "metaorch_server_connections_refused_total",
        "HTTP connections closed at once because max_connections and the overflow were full."
    );
    describe_counter!(
        "metaorch_server_timeouts_total",
        "Requests whose client was too slow, by what it was sending (body)."
    );
    describe_counter!(
        "metaorch_log_lines_dropped_total",
        "Log lines dropped because the log's writer (a slow disk or pipe) fell behind."
    );
    describe_histogram!(
        "metaorch_request_duration_seconds",
        Unit::Seconds,
        "Request duration, end to end."
    );
    describe_counter!(
        "metaorch_agent_calls_total",
        "Agent outcomes, by agent, provider, model and outcome."
    );
    describe_counter!(
        "metaorch_agent_attempts_total",
        "Provider calls started (first tries and retries)."
    );
    describe_counter!(
        "metaorch_retries_total",
        "Retries, by the error kind that caused them."
    );
    describe_histogram!(
        "metaorch_agent_latency_seconds",
        Unit::Seconds,
        "Agent duration from dispatch to finish."
    );
    describe_gauge!(
        "metaorch_breaker_state",
        "Circuit breaker state: 0 closed, 1 half-open, 2 open."
    );
    describe_counter!(
        "metaorch_breaker_transitions_total",
        "Circuit breaker transitions, by the state entered."
    );
    describe_gauge!("metaorch_in_flight", "Provider calls in flight.");
    describe_histogram!(
        "metaorch_limiter_wait_seconds",
        Unit::Seconds,
        "Time waiting for a concurrency slot."
    );
    describe_counter!(
        "metaorch_tokens_total",
        "Tokens, by provider, model and direction (input, output)."
    );
    describe_counter!("metaorch_fallbacks_total", "Fallbacks used, by agent.");
    describe_gauge!(
        "metaorch_concurrency_limit",
        "The adaptive concurrency limit, by provider and model."
    );
    describe_counter!(
        "metaorch_provider_paused_seconds_total",
        Unit::Seconds,
        "Time a provider and model were paused at the provider's request (Retry-After)."
    );
    describe_counter!(
        "metaorch_rate_limited_total",
        "Calls the provider refused for capacity or rate (rate_limited, overloaded) or that timed out, by provider, model and reason."
    );
    describe_histogram!(
        "metaorch_queue_wait_seconds",
        Unit::Seconds,
        "Time calls waited in a provider and model's queue (pause, rate, concurrency)."
    );
}

/// Every documented metric, at zero, for these agents (`(agent, provider, model)`):
/// dashboards and alerts can be built before the first request, and a series that
/// has never moved reads 0, not absent. A no-op until a recorder is installed.
pub fn prime(agents: &[(&str, &str, &str)]) {
    if !enabled() {
        return;
    }
    for outcome in ["ok", "failed", "cancelled"] {
        counter!("metaorch_requests_total", "outcome" => outcome).absolute(0);
    }
    for result in ["hit", "miss", "error"] {
        counter!("metaorch_cache_requests_total", "result" => result).absolute(0);
    }
    for status in ["succeeded", "failed", "timed_out", "skipped"] {
        counter!("metaorch_synthesis_total", "status" => status).absolute(0);
    }
    let _ = histogram!("metaorch_request_duration_seconds");
    let _ = histogram!("metaorch_limiter_wait_seconds");
    for reason in [
        "rate_limited",
        "overloaded",
        "server",
        "timeout",
        "connection",
    ] {
        counter!("metaorch_retries_total", "reason" => reason).absolute(0);
    }
    for (agent, provider, model) in agents {
        let (a, p, m) = (agent.to_string(), provider.to_string(), model.to_string());
        for outcome in ["succeeded", "failed", "timed_out"] {
            counter!(
                "metaorch_agent_calls_total",
                "agent" => a.clone(), "provider" => p.clone(), "model" => m.clone(), "outcome" => outcome
            )
            .absolute(0);
        }
        counter!("metaorch_agent_attempts_total", "agent" => a.clone(), "provider" => p.clone(), "model" => m.clone())
            .absolute(0);
        let _ = histogram!("metaorch_agent_latency_seconds", "agent" => a.clone());
        counter!("metaorch_fallbacks_total", "agent" => a).absolute(0);
        gauge!("metaorch_breaker_state", "provider" => p.clone(), "model" => m.clone()).set(0.0);
        for to in ["open", "half_open", "closed"] {
            counter!("metaorch_breaker_transitions_total", "provider" => p.clone(), "model" => m.clone(), "to" => to)
                .absolute(0);
        }
        gauge!("metaorch_in_flight", "provider" => p.clone()).increment(0.0);
        for direction in ["input", "output"] {
            counter!("metaorch_tokens_total", "provider" => p.clone(), "model" => m.clone(), "direction" => direction)
                .absolute(0);
        }
        counter!("metaorch_provider_paused_seconds_total", "provider" => p.clone(), "model" => m.clone())
            .absolute(0);
        for reason in ["rate_limited", "overloaded", "timeout"] {
            counter!("metaorch_rate_limited_total", "provider" => p.clone(), "model" => m.clone(), "reason" => reason)
                .absolute(0);
        }
        super::usd::add(&p, &m, 0.0);
        let _ = histogram!("metaorch_queue_wait_seconds", "provider" => p, "model" => m);
    }
}

/// `serve`'s own metrics, at zero (see [`prime`]).
pub fn prime_server() {
    if !enabled() {
        return;
    }
    for kind in ["served", "overflow"] {
        gauge!("metaorch_server_connections", "kind" => kind).increment(0.0);
    }
    counter!("metaorch_server_connections_refused_total").absolute(0);
    counter!("metaorch_server_timeouts_total", "part" => "body").absolute(0);
    counter!("metaorch_log_lines_dropped_total").absolute(0);
}

/// Every metric in Prometheus's text format: the exporter's, then the counters of
/// fractional amounts it cannot hold (`metaorch_cost_usd_total`).
pub fn render(handle: &PrometheusHandle) -> String {
    let mut text = handle.render();
    text.push_str(&super::usd::render());
    text
}

/// The metric lines of a handle's text, without comments: a summary for a terminal.
pub fn summary(handle: &PrometheusHandle) -> String {
    render(handle)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty() && !l.contains("_bucket{"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A request ended: `outcome` is `ok`, `failed` or `cancelled`.
pub(crate) fn request_finished(outcome: &'static str, duration: Duration) {
    if !enabled() {
        return;
    }
    counter!("metaorch_requests_total", "outcome" => outcome).increment(1);
    histogram!("metaorch_request_duration_seconds").record(duration.as_secs_f64());
}

/// A sync of a lane with the limits shared through Redis, and how it went.
pub(crate) fn cluster_sync(ok: bool) {
    if !enabled() {
        return;
    }
    counter!("metaorch_cluster_syncs_total", "result" => if ok { "ok" } else { "error" })
        .increment(1);
}

/// Whether the shared limits are in force (1) or each instance keeps its share (0).
pub(crate) fn cluster_mode(shared: bool) {
    if !enabled() {
        return;
    }
    gauge!("metaorch_cluster_shared").set(if shared { 1.0 } else { 0.0 });
    if !shared {
        counter!("metaorch_cluster_fallbacks_total").increment(1);
    }
}

/// A cache lookup: `hit`, `miss` or `error`.
pub(crate) fn cache_request(result: &'static str) {
    if !enabled() {
        return;
    }
    counter!("metaorch_cache_requests_total", "result" => result).increment(1);
}

/// A synthesis ended (`succeeded`, `failed`, `timed_out`) or was `skipped`.
pub(crate) fn synthesis_finished(status: &'static str) {
    if !enabled() {
        return;
    }
    counter!("metaorch_synthesis_total", "status" => status).increment(1);
}

/// One agent's end, in plain values: the metrics module sits below the executor and
/// knows nothing of its types.
pub(crate) struct AgentFinished<'a> {
    pub agent: &'a str,
    pub provider: &'a str,
    pub model: &'a str,
    /// `succeeded`, `failed` or `timed_out`.
    pub outcome: &'static str,
    pub latency: Duration,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub fell_back: bool,
}

pub(crate) fn agent_finished(a: &AgentFinished<'_>) {
    if !enabled() {
        return;
    }
    counter!(
        "metaorch_agent_calls_total",
        "agent" => a.agent.to_owned(),
        "provider" => a.provider.to_owned(),
        "model" => a.model.to_owned(),
        "outcome" => a.outcome
    )
    .increment(1);
    histogram!("metaorch_agent_latency_seconds", "agent" => a.agent.to_owned())
        .record(a.latency.as_secs_f64());
    for (direction, n) in [("input", a.input_tokens), ("output", a.output_tokens)] {
        if n > 0 {
            counter!(
                "metaorch_tokens_total",
                "provider" => a.provider.to_owned(),
                "model" => a.model.to_owned(),
                "direction" => direction
            )
            .increment(n);
        }
    }
    if a.fell_back {
        counter!("metaorch_fallbacks_total", "agent" => a.agent.to_owned()).increment(1);
    }
}

/// A call to `provider`'s `model` cost `usd` US dollars.
pub(crate) fn cost(provider: &str, model: &str, usd: f64) {
    if !enabled() {
        return;
    }
    super::usd::add(provider, model, usd);
}

pub(crate) fn attempt(agent: &str, provider: &str, model: &str) {
    if !enabled() {
        return;
    }
    counter!(
        "metaorch_agent_attempts_total",
        "agent" => agent.to_owned(),
        "provider" => provider.to_owned(),
        "model" => model.to_owned()
    )
    .increment(1);
}

pub(crate) fn retry(reason: &'static str) {
    if !enabled() {
        return;
    }
    counter!("metaorch_retries_total", "reason" => reason).increment(1);
}

/// A breaker's state: `code` is the gauge's value (0 closed, 1 half-open, 2 open),
/// `state` its name; `transition` counts a change into it.
pub(crate) fn breaker(
    provider: &str,
    model: &str,
    code: u8,
    state: &'static str,
    transition: bool,
) {
    if !enabled() {
        return;
    }
    gauge!("metaorch_breaker_state", "provider" => provider.to_owned(), "model" => model.to_owned())
        .set(f64::from(code));
    if transition {
        counter!(
            "metaorch_breaker_transitions_total",
            "provider" => provider.to_owned(),
            "model" => model.to_owned(),
            "to" => state
        )
        .increment(1);
    }
}

pub(crate) fn limiter_wait(wait: Duration) {
    if !enabled() {
        return;
    }
    histogram!("metaorch_limiter_wait_seconds").record(wait.as_secs_f64());
}

/// Counts a provider call in flight until dropped.
pub(crate) struct InFlight(Option<String>);

impl InFlight {
    pub(crate) fn start(provider: &str) -> Self {
        if !enabled() {
            return InFlight(None);
        }
        gauge!("metaorch_in_flight", "provider" => provider.to_owned()).increment(1.0);
        InFlight(Some(provider.to_owned()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take() {
            gauge!("metaorch_in_flight", "provider" => provider).decrement(1.0);
        }
    }
}

pub(crate) fn concurrency_limit(provider: &str, model: &str, limit: u32) {
    if !enabled() {
        return;
    }
    gauge!("metaorch_concurrency_limit", "provider" => provider.to_owned(), "model" => model.to_owned())
        .set(f64::from(limit));
}

/// A pause grew a lane's total paused time from `before` to `after`. Counters count
/// whole units, so the counter moves by the whole seconds crossed.
pub(crate) fn paused(provider: &str, model: &str, before: Duration, after: Duration) {
    if !enabled() {
        return;
    }
    let crossed = after.as_secs().saturating_sub(before.as_secs());
    if crossed > 0 {
        counter!("metaorch_provider_paused_seconds_total", "provider" => provider.to_owned(), "model" => model.to_owned())
            .increment(crossed);
    }
}

pub(crate) fn rate_limited(provider: &str, model: &str, reason: &'static str) {
    if !enabled() {
        return;
    }
    counter!(
        "metaorch_rate_limited_total",
        "provider" => provider.to_owned(),
        "model" => model.to_owned(),
        "reason" => reason
    )
    .increment(1);
}

pub(crate) fn queue_wait(provider: &str, model: &str, wait: Duration) {
    if !enabled() {
        return;
    }
    histogram!("metaorch_queue_wait_seconds", "provider" => provider.to_owned(), "model" => model.to_owned())
        .record(wait.as_secs_f64());
}

/// A server connection opened (`+1`) or closed (`-1`); `kind` is `served` or
/// `overflow`.
pub(crate) fn connection(kind: &'static str, delta: f64) {
    if !enabled() {
        return;
    }
    gauge!("metaorch_server_connections", "kind" => kind).increment(delta);
}

/// A connection was closed at once: every slot, overflow included, was taken.
pub(crate) fn connection_refused() {
    if !enabled() {
        return;
    }
    counter!("metaorch_server_connections_refused_total").increment(1);
}

/// A client took too long to send a request's `part` (`body`).
pub(crate) fn client_timeout(part: &'static str) {
    if !enabled() {
        return;
    }
    counter!("metaorch_server_timeouts_total", "part" => part).increment(1);
}

/// Log lines were dropped: the writer fell behind.
pub(crate) fn log_lines_dropped(n: u64) {
    if !enabled() {
        return;
    }
    counter!("metaorch_log_lines_dropped_total").increment(n);
}
