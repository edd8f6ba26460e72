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
    // Agents no other test uses: their lines are picked out by agent, not by trace id,
    // so that the trace id on each is something to check, not how it was found.
    let agents: String = (1..=6)
        .map(|i| format!("[[agents]]\nid = \"ut-log-{i}\"\nprovider = \"sim\"\n"))
        .collect();
    let config = Config::from_toml_str(
        &format!("seed = 1\n[providers.sim]\nkind = \"sim\"\nlatency_min = \"1ms\"\nlatency_max = \"5ms\"\n{agents}"),
        "test.toml",
    )
    .unwrap();
    let orchestrator = Orchestrator::builder().config(config).build().unwrap();
    let response = orchestrator.process("q").await.unwrap();
    let trace_id = response.trace_id.to_string();

    let all = capture.lines();
    let mine: Vec<_> = all
        .iter()
        .filter(|l| {
            l["agent_id"]
                .as_str()
                .is_some_and(|a| a.starts_with("ut-log-"))
        })
        .collect();
    // Per agent: dispatch, attempt, success — each carrying the request's trace id.
    assert_eq!(mine.len(), 6 * 3, "{mine:#?}");
    for line in &mine {
        assert_eq!(line["trace_id"], trace_id.as_str(), "{line}");
    }
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

/// An API key configured for a provider never appears in any log line (at TRACE, with
/// failures, retries and streams), in an outcome, or in `Debug` output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_never_appears() {
    use metaorch::mock_upstream::{MockFault, MockOptions, MockScript, MockUpstream};
    let capture = Capture::global();
    let script = [
        ("You are a critic", MockFault::RateLimited),
        ("You are a planner", MockFault::Malformed),
        ("You are a writer", MockFault::StreamError),
    ]
    .iter()
    .map(|(text, fault)| MockScript {
        matches: (*text).to_owned(),
        first: 1,
        fault: *fault,
    })
    .collect();
    let mock = MockUpstream::start(
        ([127, 0, 0, 1], 0).into(),
        MockOptions {
            latency_min: std::time::Duration::from_millis(1),
            latency_max: std::time::Duration::from_millis(3),
            retry_after: std::time::Duration::from_millis(20),
            script,
            ..MockOptions::default()
        },
    )
    .await
    .unwrap();
    let key = "sk-ant-api03-THIS-MUST-NEVER-BE-LOGGED";
    let roles = ["researcher", "critic", "planner", "writer"];
    let agents: String = roles
        .iter()
        .map(|r| {
            format!(
                "[[agents]]\nid = \"{r}\"\nsystem = \"You are a {r}.\"\nprovider = \"claude\"\nmodel = \"claude-x\"\nstream = {}\n",
                *r == "writer"
            )
        })
        .collect();
    let config = Config::from_toml_str(
        &format!(
            "[defaults.retry]\ninitial_delay = \"10ms\"\n[providers.claude]\nkind = \"anthropic\"\nbase_url = \"{}\"\n{agents}",
            mock.url()
        ),
        "test.toml",
    )
    .unwrap();
    let orchestrator = Orchestrator::builder()
        .config(config.clone())
        .env(move |name| (name == "ANTHROPIC_API_KEY").then(|| key.to_owned()))
        .build()
        .unwrap();
    let response = orchestrator.process("q").await.unwrap();
    // The planner's malformed reply is not retried; the critic's 429 and the writer's
    // mid-stream overload are.
    assert_eq!(response.summary.succeeded, 3, "{:?}", response.outcomes);
    assert_eq!(
        response
            .outcomes
            .iter()
            .map(|o| o.retries.len())
            .sum::<usize>(),
        2
    );
    mock.stop().await;

    let lines = capture.trace(&response.trace_id.to_string());
    assert!(lines.iter().any(|l| l["event"] == "agent.retry"));
    assert!(!capture.text().contains(key), "the key is in a log line");
    assert!(!serde_json::to_string(&response).unwrap().contains(key));
    assert!(
        !format!("{orchestrator:?} {config:?}").contains(key),
        "Debug shows the key"
    );
}

/// Logs stay proportional to requests while the breaker is open: a call it refuses is
/// counted and shown in its agent's outcome line, never logged on its own at the
/// levels a log file keeps.
#[tokio::test(start_paused = true)]
async fn lines_per_request_stay_bounded_while_the_breaker_is_open() {
    let capture = Capture::global();
    let provider = Arc::new(common::Toggle::default());
    provider
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let orchestrator = Orchestrator::builder()
        .provider("sim", provider)
        .build()
        .unwrap();
    orchestrator.process("opens the breaker").await.unwrap();
    assert_eq!(
        orchestrator.breakers()[0].state,
        metaorch::resilience::BreakerState::Open
    );
    let mut ids = Vec::new();
    for n in 0..50 {
        let response = orchestrator.process(&format!("q{n}")).await.unwrap();
        ids.push(response.trace_id.to_string());
    }
    let lines = capture.lines();
    for id in ids {
        let mine: Vec<_> = lines.iter().filter(|l| l["trace_id"] == *id).collect();
        let kept = mine
            .iter()
            .filter(|l| matches!(l["level"].as_str(), Some("INFO" | "WARN" | "ERROR")))
            .count();
        // request.start, one agent.failure per agent (six), synthesis.skipped,
        // request.finish.
        assert!(kept <= 9, "{kept} lines at info or above for one request");
        assert!(
            mine.len() <= 30,
            "{} lines in all for one request",
            mine.len()
        );
    }
}
