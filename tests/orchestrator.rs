//! End-to-end through `Orchestrator`: trace ids, synthesis, min_successes, and the
//! process-wide concurrency limit under a thousand concurrent requests.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Behaviour, InFlightCounter, Scripted, server_error};
use metaorch::orchestrator::RequestError;
use metaorch::telemetry::TraceId;
use metaorch::{Config, Orchestrator, OutcomeStatus, Request};

const SIX_ON_SIM: &str = r#"
concurrency_limit = 4
request_timeout = "1h"
min_successes = 5

[providers.sim]
kind = "sim"
latency_min = "10ms"
latency_max = "40ms"
seed = 7

[[agents]]
id = "researcher"
role = "Researcher"
prompt = "Research: {query}"
provider = "sim"

[[agents]]
id = "analyst"
role = "Analyst"
prompt = "Analyse: {query}"
provider = "sim"

[[agents]]
id = "critic"
role = "Critic"
prompt = "Criticise: {query}"
provider = "sim"

[[agents]]
id = "planner"
role = "Planner"
prompt = "Plan: {query}"
provider = "sim"

[[agents]]
id = "fact-checker"
role = "Fact-checker"
prompt = "Check: {query}"
provider = "sim"

[[agents]]
id = "writer"
role = "Writer"
prompt = "Write: {query}"
provider = "sim"
"#;

fn config() -> Config {
    Config::from_toml_str(SIX_ON_SIM, "test.toml").unwrap()
}

/// IT-FLOW-001: a request goes end to end on the real `sim` provider: one trace id on
/// the response, six successful outcomes in config order, one synthesized answer.
#[tokio::test(start_paused = true)]
async fn it_flow_001_end_to_end_on_sim() {
    let orchestrator = Orchestrator::builder().config(config()).build().unwrap();
    let response = orchestrator
        .process("What are the risks of rewriting a service in Rust?")
        .await
        .unwrap();

    let trace = response.trace_id.to_string();
    assert_eq!(trace.len(), 32);
    assert!(
        trace
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert!(response.ok);
    assert_eq!(response.summary.succeeded, 6);
    let ids: Vec<_> = response
        .outcomes
        .iter()
        .map(|o| o.agent_id.as_str())
        .collect();
    assert_eq!(ids, common::SIX);
    for o in &response.outcomes {
        assert!(
            o.output
                .as_deref()
                .unwrap()
                .contains("[simulated reply from sim-1]")
        );
        assert!(o.usage.output_tokens > 0);
        assert!(response.answer.contains(o.output.as_deref().unwrap()));
    }
    assert!(
        response
            .answer
            .starts_with("Synthesized from 6 of 6 agents.")
    );
    assert_eq!(
        response.usage.output_tokens,
        response
            .outcomes
            .iter()
            .map(|o| o.usage.output_tokens)
            .sum::<u64>()
    );
    assert!(response.timings.total >= response.timings.slowest_agent);
    assert!(response.timings.sum_of_agents >= response.timings.slowest_agent);

    let json = serde_json::to_value(&response).unwrap();
    assert_eq!(json["trace_id"], trace);
    assert_eq!(json["outcomes"].as_array().unwrap().len(), 6);
    assert_eq!(json["outcomes"][0]["status"], "succeeded");
    assert!(json["timings"]["total_ms"].as_f64().unwrap() > 0.0);
}

#[tokio::test(start_paused = true)]
async fn each_request_gets_a_new_trace_id_unless_one_is_given() {
    let orchestrator = Orchestrator::builder().config(config()).build().unwrap();
    let a = orchestrator.process("q").await.unwrap();
    let b = orchestrator.process("q").await.unwrap();
    assert_ne!(a.trace_id, b.trace_id);

    let given: TraceId = "4bf92f3577b34da6a3ce929d0e0e4736".parse().unwrap();
    let c = orchestrator
        .process_request(Request::new("q").with_trace_id(given))
        .await
        .unwrap();
    assert_eq!(c.trace_id, given);
}

#[tokio::test(start_paused = true)]
async fn the_same_seed_gives_the_same_replies() {
    let a = Orchestrator::builder().config(config()).build().unwrap();
    let b = Orchestrator::builder().config(config()).build().unwrap();
    let ra = a.process("same question").await.unwrap();
    let rb = b.process("same question").await.unwrap();
    assert_eq!(ra.answer, rb.answer);
    let latencies = |r: &metaorch::Response| -> Vec<_> {
        r.outcomes.iter().map(|o| o.provider_latency).collect()
    };
    assert_eq!(latencies(&ra), latencies(&rb));
}

#[tokio::test(start_paused = true)]
async fn failures_are_named_in_the_answer_and_min_successes_decides_ok() {
    let provider = Arc::new(Scripted::new(&[
        (
            "critic",
            Behaviour::Fail(Duration::from_millis(5), server_error()),
        ),
        ("planner", Behaviour::Panic("planner fell over")),
    ]));
    let orchestrator = Orchestrator::builder()
        .config(config())
        .provider("sim", provider)
        .build()
        .unwrap();
    let response = orchestrator.process("q").await.unwrap();

    assert_eq!(response.summary.succeeded, 4);
    assert_eq!(response.summary.failed, 2);
    assert!(!response.ok, "4 successes < min_successes 5");
    assert!(
        response
            .answer
            .starts_with("Synthesized from 4 of 6 agents.")
    );
    assert!(response.answer.contains("## Not included"));
    assert!(
        response
            .answer
            .contains("- Critic (critic): failed — server (HTTP 500): upstream exploded"),
        "{}",
        response.answer
    );
    assert!(
        response
            .answer
            .contains("- Planner (planner): failed — panicked")
    );
    assert_eq!(
        response.outcome("critic").unwrap().status,
        OutcomeStatus::Failed
    );
}

#[tokio::test(start_paused = true)]
async fn a_per_request_timeout_overrides_the_configured_one() {
    let provider = Arc::new(Scripted::new(&[("writer", Behaviour::Hang)]));
    let orchestrator = Orchestrator::builder()
        .config(config())
        .provider("sim", provider)
        .build()
        .unwrap();
    let started = tokio::time::Instant::now();
    let response = orchestrator
        .process_request(Request::new("q").with_timeout(Duration::from_secs(2)))
        .await
        .unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(
        response.outcome("writer").unwrap().status,
        OutcomeStatus::TimedOut
    );
    assert_eq!(response.summary.timed_out, 1);
    assert!(response.ok, "5 of 6 meet min_successes = 5");
}

#[tokio::test]
async fn empty_queries_are_refused_before_any_call() {
    let provider = Arc::new(Scripted::new(&[]));
    let orchestrator = Orchestrator::builder()
        .config(config())
        .provider("sim", provider.clone())
        .build()
        .unwrap();
    assert_eq!(
        orchestrator.process("  \n").await.unwrap_err(),
        RequestError::EmptyQuery
    );
    assert_eq!(provider.calls.load(Ordering::SeqCst), 0);
}

/// ST-PERF-001: 1,000 concurrent requests × 6 agents against a process-wide limit of 4.
/// The instrumented provider never sees more than 4 calls at once, and every request
/// gets its six outcomes.
#[tokio::test(start_paused = true)]
async fn st_perf_001_limit_holds_across_a_thousand_concurrent_requests() {
    let counter = Arc::new(InFlightCounter::new(Duration::from_millis(10)));
    let orchestrator = Orchestrator::builder()
        .config(config())
        .provider("sim", counter.clone())
        .build()
        .unwrap();

    let mut requests = tokio::task::JoinSet::new();
    for i in 0..1_000 {
        let orchestrator = orchestrator.clone();
        requests.spawn(async move { orchestrator.process(&format!("query {i}")).await });
    }
    let mut responses = 0;
    while let Some(joined) = requests.join_next().await {
        let response = joined.unwrap().unwrap();
        assert_eq!(response.outcomes.len(), 6);
        assert!(response.outcomes.iter().all(|o| o.succeeded()));
        responses += 1;
    }
    assert_eq!(responses, 1_000);
    assert_eq!(counter.calls.load(Ordering::SeqCst), 6_000);
    assert_eq!(
        counter.max.load(Ordering::SeqCst),
        4,
        "the limit was reached and never passed"
    );
    assert_eq!(orchestrator.executor().limiter().in_flight(), 0);
}

/// The same on a multi-threaded runtime with zero latency, where calls really do run
/// at the same time on different threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn st_perf_001_limit_holds_on_a_multi_threaded_runtime() {
    let counter = Arc::new(InFlightCounter::new(Duration::ZERO));
    let orchestrator = Orchestrator::builder()
        .config(config())
        .provider("sim", counter.clone())
        .build()
        .unwrap();
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..1_000 {
        let orchestrator = orchestrator.clone();
        requests.spawn(async move { orchestrator.process(&format!("query {i}")).await });
    }
    while let Some(joined) = requests.join_next().await {
        assert_eq!(joined.unwrap().unwrap().outcomes.len(), 6);
    }
    assert_eq!(counter.calls.load(Ordering::SeqCst), 6_000);
    assert!(counter.max.load(Ordering::SeqCst) <= 4);
}
