//! `/metrics` lists every documented metric from the start, at zero, so dashboards and
//! alerts can be built before the first request. (Its own test binary: the Prometheus
//! recorder is process-wide.)

use metaorch::orchestrator::Orchestrator;

/// The metrics the README documents, every one.
const DOCUMENTED: [&str; 16] = [
    "metaorch_requests_total",
    "metaorch_request_duration_seconds",
    "metaorch_agent_calls_total",
    "metaorch_agent_attempts_total",
    "metaorch_retries_total",
    "metaorch_agent_latency_seconds",
    "metaorch_breaker_state",
    "metaorch_breaker_transitions_total",
    "metaorch_in_flight",
    "metaorch_limiter_wait_seconds",
    "metaorch_tokens_total",
    "metaorch_fallbacks_total",
    "metaorch_concurrency_limit",
    "metaorch_provider_paused_seconds_total",
    "metaorch_rate_limited_total",
    "metaorch_queue_wait_seconds",
];

#[test]
fn every_documented_metric_is_listed_before_the_first_request() {
    let handle = metaorch::telemetry::metrics::install().expect("the only recorder");
    let orchestrator = Orchestrator::builder().build().unwrap();
    orchestrator.prime_metrics();
    let text = handle.render();
    for name in DOCUMENTED {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} is missing from:\n{text}"
        );
    }
    // The README's table and this list agree.
    let readme = include_str!("../README.md");
    for name in DOCUMENTED {
        assert!(
            readme.contains(&format!("`{name}`")),
            "{name} is not in the README"
        );
    }
    assert!(text.contains(r#"metaorch_agent_calls_total{agent="critic",provider="sim",model="sim-1",outcome="failed"} 0"#), "{text}");
}
