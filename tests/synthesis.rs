//! The synthesizer after the fan-out: a seventh call over real sockets to
//! `mock-upstream`, its fallback to the concatenation, and the reserve that keeps time
//! for it inside the deadline.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use metaorch::config::Config;
use metaorch::mock_upstream::{MockFault, MockOptions, MockScript, MockUpstream};
use metaorch::orchestrator::{Synthesis, SynthesisStatus};
use metaorch::provider::Usage;
use metaorch::{Orchestrator, OutcomeStatus, Request};

/// What the synthesizer's prompt says, so a script can aim at its calls.
const SYNTH_MARK: &str = "Merge the findings";

async fn mock(script: Vec<MockScript>) -> MockUpstream {
    MockUpstream::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        MockOptions {
            latency_min: Duration::from_millis(1),
            latency_max: Duration::from_millis(5),
            seed: 5,
            script,
            keep_bodies: true,
            ..MockOptions::default()
        },
    )
    .await
    .expect("the mock binds an ephemeral port")
}

/// Six agents and a synthesizer, all on Anthropic's wire format at `url`.
fn config(url: &str, synthesizer_extra: &str) -> Config {
    let mut toml = format!(
        "request_timeout = \"20s\"\n[providers.claude]\nkind = \"anthropic\"\nbase_url = \"{url}\"\n"
    );
    for id in common::SIX {
        toml.push_str(&format!(
            "[[agents]]\nid = \"{id}\"\nrole = \"Role {id}\"\nprovider = \"claude\"\nmodel = \"agent-model\"\nprompt = \"As {id}: {{query}}\"\n"
        ));
    }
    toml.push_str(&format!(
        "[synthesizer]\nprovider = \"claude\"\nmodel = \"lead-model\"\nprompt = \"{SYNTH_MARK} for: {{query}}\\n\\n{{replies}}\"\nretry = {{ max_attempts = 2, initial_delay = \"1ms\" }}\n{synthesizer_extra}"
    ));
    Config::from_toml_str(&toml, "test.toml").unwrap()
}

fn orchestrator(config: Config) -> Orchestrator {
    Orchestrator::builder()
        .config(config)
        .env(|name| (name == "ANTHROPIC_API_KEY").then(|| "test-key".to_owned()))
        .build()
        .unwrap()
}

/// The text of the one user message of an Anthropic request body.
fn prompt_of(body: &serde_json::Value) -> String {
    body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn the_synthesizer_is_a_seventh_call_that_holds_the_six_replies() {
    let mock = mock(Vec::new()).await;
    let response = orchestrator(config(&mock.url(), ""))
        .process("Should we adopt Rust?")
        .await
        .unwrap();
    assert!(response.ok);
    let requests = mock.requests();
    assert_eq!(requests.len(), 7, "six agents and the synthesizer");
    let lead: Vec<_> = requests
        .iter()
        .filter(|r| r.model.as_deref() == Some("lead-model"))
        .collect();
    assert_eq!(lead.len(), 1);
    let prompt = prompt_of(lead[0].body.as_ref().expect("bodies are kept"));
    assert!(prompt.starts_with(&format!("{SYNTH_MARK} for: Should we adopt Rust?")));
    for outcome in &response.outcomes {
        assert_eq!(outcome.status, OutcomeStatus::Succeeded);
        let reply = outcome.output.as_deref().unwrap();
        assert!(
            prompt.contains(&format!(
                "<reply agent=\"{}\" role=\"Role {}\">\n{}\n</reply>",
                outcome.agent_id,
                outcome.agent_id,
                reply.trim()
            )),
            "{} is missing from the synthesizer's prompt:\n{prompt}",
            outcome.agent_id
        );
    }
    // The answer is the seventh reply; the request's usage covers all seven calls.
    assert!(response.answer.starts_with("[mock reply from lead-model]"));
    let Synthesis::Model(report) = &response.synthesis else {
        panic!("a synthesizer is configured");
    };
    assert_eq!(report.status, SynthesisStatus::Succeeded);
    assert_eq!(report.attempts, 1);
    assert!(report.fallback.is_none());
    let mut from_outcomes = Usage::default();
    for o in &response.outcomes {
        from_outcomes += o.usage;
    }
    from_outcomes += report.usage;
    assert_eq!(response.usage.tokens(), from_outcomes);
    // Its cost is in the total too (null here: the test's models have no price).
    assert_eq!(
        response.usage.cost_usd,
        metaorch::cost::sum(
            response
                .outcomes
                .iter()
                .map(|o| o.cost_usd)
                .chain([report.cost_usd])
        )
    );
    let upstream_in: u64 = requests.iter().map(|r| r.input_tokens).sum();
    let upstream_out: u64 = requests.iter().map(|r| r.output_tokens).sum();
    assert_eq!(response.usage.input_tokens, upstream_in);
    assert_eq!(response.usage.output_tokens, upstream_out);
    // The JSON names it all.
    let json = serde_json::to_value(&response).unwrap();
    assert_eq!(json["synthesis"]["status"], "succeeded");
    assert_eq!(json["synthesis"]["model"], "lead-model");
    assert_eq!(json["outcomes"].as_array().unwrap().len(), 6);
}

#[tokio::test]
async fn a_failing_synthesizer_falls_back_to_the_concatenation() {
    let mock = mock(vec![MockScript {
        matches: SYNTH_MARK.to_owned(),
        first: 10,
        fault: MockFault::Server,
    }])
    .await;
    let response = orchestrator(config(&mock.url(), ""))
        .process("q")
        .await
        .unwrap();
    assert!(response.ok, "the agents succeeded: the request did");
    let Synthesis::Model(report) = &response.synthesis else {
        panic!("a synthesizer is configured");
    };
    assert_eq!(report.status, SynthesisStatus::Failed);
    assert_eq!(report.fallback, Some("concat"));
    assert_eq!(report.attempts, 2, "its own retry policy");
    let reason = report.reason.as_deref().unwrap();
    assert!(reason.contains("server (HTTP 500)"), "{reason}");
    assert!(
        response
            .answer
            .starts_with("Synthesized from 6 of 6 agents.")
    );
    assert_eq!(
        serde_json::to_value(&response).unwrap()["synthesis"]["fallback"],
        "concat"
    );

    // The same through the binary: the answer is there, and it exits 0.
    let dir = tempfile::tempdir().unwrap();
    let mut toml = String::new();
    toml.push_str(&format!(
        "request_timeout = \"20s\"\n[providers.claude]\nkind = \"anthropic\"\nbase_url = \"{}\"\n",
        mock.url()
    ));
    toml.push_str("[[agents]]\nid = \"a\"\nprovider = \"claude\"\nmodel = \"m\"\n");
    toml.push_str(&format!(
        "[synthesizer]\nprovider = \"claude\"\nmodel = \"lead\"\nprompt = \"{SYNTH_MARK}: {{replies}}\"\nretry = {{ max_attempts = 1 }}\n"
    ));
    std::fs::write(dir.path().join("metaorch.toml"), toml).unwrap();
    // The mock runs on this test's runtime: the binary is waited for off it.
    let path = dir.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        common::metaorch_command(&path, &["run", "--format", "json", "q"])
            .env("ANTHROPIC_API_KEY", "k")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["synthesis"]["status"], "failed");
    assert!(
        doc["answer"]
            .as_str()
            .unwrap()
            .starts_with("Synthesized from 1 of 1 agents.")
    );
}

#[tokio::test]
async fn a_fallback_model_writes_the_answer_when_the_synthesizer_fails() {
    let mock = mock(vec![MockScript {
        matches: "\"model\":\"lead-model\"".to_owned(),
        first: 10,
        fault: MockFault::Overloaded,
    }])
    .await;
    let mut toml = format!(
        "[providers.claude]\nkind = \"anthropic\"\nbase_url = \"{}\"\n[[agents]]\nid = \"a\"\nprovider = \"claude\"\nmodel = \"agent-model\"\n[[agents]]\nid = \"backup\"\nprovider = \"claude\"\nmodel = \"backup-model\"\nstandby = true\n",
        mock.url()
    );
    toml.push_str("[synthesizer]\nprovider = \"claude\"\nmodel = \"lead-model\"\nretry = { max_attempts = 1 }\nfallback = { agent = \"backup\" }\n");
    let config = Config::from_toml_str(&toml, "t.toml").unwrap();
    let response = orchestrator(config).process("q").await.unwrap();
    let report = response.synthesis.report().unwrap();
    assert_eq!(report.status, SynthesisStatus::Succeeded);
    let fallback = report.model_fallback.as_ref().unwrap();
    assert_eq!(fallback.model.as_deref(), Some("backup-model"));
    assert!(
        response
            .answer
            .starts_with("[mock reply from backup-model]")
    );
    // The backup got the synthesizer's prompt, not its own.
    let backup = mock
        .requests()
        .into_iter()
        .find(|r| r.model.as_deref() == Some("backup-model"))
        .unwrap();
    assert!(prompt_of(backup.body.as_ref().unwrap()).contains("<reply agent=\"a\""));
}

#[tokio::test(start_paused = true)]
async fn the_reserve_cuts_slow_agents_so_the_synthesis_finishes_in_time() {
    let config = Config::from_toml_str(
        r#"
request_timeout = "10s"
[providers.fast]
kind = "sim"
latency_min = "100ms"
latency_max = "100ms"
[providers.slow]
kind = "sim"
latency_min = "60s"
latency_max = "60s"
[[agents]]
id = "quick"
provider = "fast"
[[agents]]
id = "laggard"
provider = "slow"
[synthesizer]
provider = "fast"
reserve = "3s"
"#,
        "t.toml",
    )
    .unwrap();
    let orchestrator = Orchestrator::builder().config(config).build().unwrap();
    let started = tokio::time::Instant::now();
    let response = orchestrator.process("q").await.unwrap();
    let took = started.elapsed();
    let laggard = response.outcome("laggard").unwrap();
    assert_eq!(laggard.status, OutcomeStatus::TimedOut);
    assert_eq!(
        laggard.error.as_ref().unwrap().kind.as_str(),
        "deadline_exceeded"
    );
    assert_eq!(laggard.latency, Duration::from_secs(7), "cut at 10 s − 3 s");
    let report = response.synthesis.report().unwrap();
    assert_eq!(report.status, SynthesisStatus::Succeeded);
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(
        response.answer.contains("Merging the replies of quick"),
        "{}",
        response.answer
    );
}

#[tokio::test(start_paused = true)]
async fn too_few_successes_skip_the_synthesis() {
    let config = Config::from_toml_str(
        r#"
min_successes = 2
[providers.sim]
kind = "sim"
latency_min = "10ms"
latency_max = "10ms"
[providers.sim.faults]
script = [{ agent = "b", first_attempts = 9, kind = "server" }]
[[agents]]
id = "a"
provider = "sim"
[[agents]]
id = "b"
provider = "sim"
retry = { max_attempts = 1 }
[synthesizer]
provider = "sim"
"#,
        "t.toml",
    )
    .unwrap();
    let orchestrator = Orchestrator::builder().config(config).build().unwrap();
    let response = orchestrator.process("q").await.unwrap();
    assert!(!response.ok);
    let report = response.synthesis.report().unwrap();
    assert_eq!(report.status, SynthesisStatus::Skipped);
    assert_eq!(report.attempts, 0);
    assert!(
        report
            .reason
            .as_deref()
            .unwrap()
            .contains("1 of 2 agents succeeded"),
        "{:?}",
        report.reason
    );
    assert!(
        response
            .answer
            .starts_with("Synthesized from 1 of 2 agents.")
    );
}

#[tokio::test(start_paused = true)]
async fn the_sim_synthesizer_streams_a_deterministic_merge_naming_the_agents() {
    let orchestrator = Orchestrator::builder().build().unwrap();
    let run = || async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let request = Request::new("Is it worth it?").with_events(tx);
        let response = orchestrator.process_request(request).await.unwrap();
        let mut streamed = String::new();
        let mut pieces = 0;
        while let Ok(event) = rx.try_recv() {
            if let metaorch::executor::AgentEvent::SynthesisDelta { text, .. } = event {
                streamed.push_str(&text);
                pieces += 1;
            }
        }
        (response, streamed, pieces)
    };
    let (first, streamed, pieces) = run().await;
    assert!(pieces > 5, "streamed in {pieces} pieces");
    assert_eq!(streamed, first.answer);
    assert!(first.answer.starts_with(
        "[simulated synthesis by sim-1] Merging the replies of researcher, analyst, critic, planner, fact-checker, writer:"
    ));
    let (second, ..) = run().await;
    // Seeded per request: the same reply for the same agents' replies.
    assert_eq!(
        first.answer.split(':').next(),
        second.answer.split(':').next()
    );
}
