//! Log lines as the product's promises: one JSON object per event, tied to the trace.
//!
//! The whole binary logs through one global subscriber ([`Capture::global`]) in the
//! product's JSON format, so every thread of every runtime is captured; each test picks
//! out its own requests' lines by trace id.

mod common;

use std::sync::Arc;

use common::{Behaviour, Capture, Scripted, server_error};
use metaorch::config::Config;
use metaorch::orchestrator::Orchestrator;

/// FI-LOG-002: each retry writes one WARNING JSON line with the attempt number and the
/// delay, tied to the request's trace id and the agent.
#[tokio::test(start_paused = true)]
async fn fi_log_002_each_retry_is_one_warning_line() {
    let capture = Capture::global();
    let provider = Arc::new(Scripted::new(&[(
        "critic",
        Behaviour::FailFirst(2, server_error()),
    )]));
    // The scripted provider stands in for `sim`.
    let config = Config::from_toml_str(
        r#"
        [defaults.retry]
        jitter = "none"
        [[agents]]
        id = "critic"
        provider = "sim"
        "#,
        "test.toml",
    )
    .unwrap();
    let orchestrator = Orchestrator::builder()
        .config(config)
        .provider("sim", provider)
        .build()
        .unwrap();
    let response = orchestrator.process("q").await.unwrap();
    assert!(response.ok);

    let retries: Vec<_> = capture
        .trace(&response.trace_id.to_string())
        .into_iter()
        .filter(|l| l["event"] == "agent.retry")
        .collect();
    assert_eq!(retries.len(), 2, "one line per retry");
    for (line, (attempt, delay_ms)) in retries.iter().zip([(1, 1000.0), (2, 2000.0)]) {
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["attempt"], attempt);
        assert_eq!(line["next_attempt"], attempt + 1);
        assert_eq!(line["delay_ms"], delay_ms);
        assert_eq!(line["delay_source"], "backoff");
        assert_eq!(line["error.kind"], "server");
        assert_eq!(line["status"], 500);
        assert_eq!(line["agent_id"], "critic");
        assert_eq!(line["provider"], "sim");
    }
}

/// UT-LOG-001: every line written during a request is one JSON object with every
/// required field, carrying the request's trace id.
#[tokio::test(start_paused = true)]
async fn ut_log_001_every_line_has_the_fields_and_the_trace_id() {
    let capture = Capture::global();
    let config = Config::from_toml_str(
        "seed = 1\n[providers.sim]\nkind = \"sim\"\nlatency_min = \"1ms\"\nlatency_max = \"5ms\"\n",
        "test.toml",
    )
    .unwrap();
    let orchestrator = Orchestrator::builder().config(config).build().unwrap();
    let response = orchestrator.process("q").await.unwrap();
    let trace_id = response.trace_id.to_string();

    let lines = capture.trace(&trace_id);
    // request.start, then per agent dispatch, attempt and success, then request.finish.
    assert_eq!(lines.len(), 2 + 6 * 3, "{lines:#?}");
    for line in &lines {
        for field in [
            "timestamp",
            "level",
            "message",
            "event",
            "target",
            "file",
            "line",
        ] {
            assert!(!line[field].is_null(), "{field} missing: {line}");
        }
        assert_eq!(line["trace_id"], trace_id.as_str());
        let ts = line["timestamp"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(ts).is_ok(), "{ts}");
    }
    let agent_lines: Vec<_> = lines
        .iter()
        .filter(|l| l["event"].as_str().unwrap().starts_with("agent."))
        .collect();
    assert!(
        agent_lines
            .iter()
            .all(|l| l["agent_id"].is_string() && l["provider"] == "sim" && l["model"] == "sim-1")
    );
    let attempts = lines.iter().filter(|l| l["event"] == "agent.attempt");
    assert!(attempts.into_iter().all(|l| l["attempt"] == 1));
    let finish = lines
        .iter()
        .find(|l| l["event"] == "request.finish")
        .unwrap();
    assert_eq!(finish["succeeded"], 6);
    assert!(finish["duration_ms"].as_f64().is_some());
}

/// Two requests at once on a multi-threaded runtime: every line carries its own
/// request's trace id, whichever worker thread wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_never_cross_trace_ids() {
    let capture = Capture::global();
    let orchestrator = |prefix: &str| {
        let agents: String = (1..=6)
            .map(|i| format!("[[agents]]\nid = \"{prefix}{i}\"\nprovider = \"sim\"\n"))
            .collect();
        let config = Config::from_toml_str(
            &format!("[providers.sim]\nkind = \"sim\"\nlatency_min = \"1ms\"\nlatency_max = \"20ms\"\n{agents}"),
            "test.toml",
        )
        .unwrap();
        Orchestrator::builder().config(config).build().unwrap()
    };
    let (a, b) = (orchestrator("a"), orchestrator("b"));
    let mut handles = Vec::new();
    for _ in 0..5 {
        let (a, b) = (a.clone(), b.clone());
        handles.push(tokio::spawn(async move { a.process("qa").await.unwrap() }));
        handles.push(tokio::spawn(async move { b.process("qb").await.unwrap() }));
    }
    for handle in handles {
        let response = handle.await.unwrap();
        let prefix = &response.outcomes[0].agent_id[..1];
        let lines = capture.trace(&response.trace_id.to_string());
        // Plus a limiter.wait for each agent that queued behind the shared limit of 6.
        assert!(lines.len() >= 2 + 6 * 3, "{}", lines.len());
        for line in lines {
            if let Some(agent) = line["agent_id"].as_str() {
                assert!(
                    agent.starts_with(prefix),
                    "{agent} in a request of {prefix}: {line}"
                );
            }
        }
    }
}
