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
