//! The `metaorch` binary end to end: what a user types, what they see, the exit code.

mod common;

use std::path::Path;
use std::process::Output;

const FAST: &str = r#"
[providers.sim]
kind = "sim"
latency_min = "5ms"
latency_max = "20ms"
"#;

fn metaorch(dir: &Path, args: &[&str]) -> Output {
    common::metaorch_command(dir, args)
        // The test's own environment must not leak into what is being tested.
        .output()
        .expect("the metaorch binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn dir_with(config: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    if let Some(text) = config {
        std::fs::write(dir.path().join("metaorch.toml"), text).unwrap();
    }
    dir
}

#[test]
fn run_with_no_config_uses_six_default_agents_on_sim() {
    let dir = dir_with(None);
    let out = metaorch(
        dir.path(),
        &[
            "run",
            "What are the risks of rewriting a service in Rust?",
            "--seed",
            "1",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for id in [
        "researcher",
        "analyst",
        "critic",
        "planner",
        "fact-checker",
        "writer",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(id) && l.contains(" ok ")),
            "no ok row for {id}:\n{text}"
        );
    }
    assert!(text.contains("6/6 agents succeeded"), "{text}");
    // The embedded config's synthesizer merges the six replies.
    assert!(text.contains("synthesis: sim/sim-1 in "), "{text}");
    assert!(
        text.contains("[simulated synthesis by sim-1] Merging the replies of researcher, analyst, critic, planner, fact-checker, writer:"),
        "{text}"
    );
    let trace = text
        .lines()
        .find_map(|l| l.strip_prefix("trace_id: "))
        .expect("a trace id line");
    assert_eq!(trace.len(), 32);
}

#[test]
fn run_format_json_prints_one_document() {
    let dir = dir_with(Some(FAST));
    let out = metaorch(dir.path(), &["run", "--format", "json", "Why", "Rust?"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(doc["query"], "Why Rust?", "words are joined");
    assert_eq!(doc["trace_id"].as_str().unwrap().len(), 32);
    assert_eq!(doc["outcomes"].as_array().unwrap().len(), 6);
    assert_eq!(doc["summary"]["succeeded"], 6);
    assert!(
        doc["answer"]
            .as_str()
            .unwrap()
            .starts_with("Synthesized from 6")
    );
    for key in ["total_ms", "slowest_agent_ms", "sum_of_agents_ms"] {
        assert!(doc["timings"][key].is_f64(), "timings.{key}");
    }
    let first = &doc["outcomes"][0];
    for key in [
        "agent_id",
        "status",
        "attempts",
        "latency_ms",
        "provider",
        "model",
        "usage",
    ] {
        assert!(!first[key].is_null(), "outcomes[0].{key}");
    }
}

#[test]
fn seed_makes_runs_repeatable() {
    let dir = dir_with(Some(FAST));
    let answer = |seed: &str| {
        let out = metaorch(
            dir.path(),
            &["run", "--format", "json", "--seed", seed, "q"],
        );
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        doc["answer"].as_str().unwrap().to_owned()
    };
    assert_eq!(answer("5"), answer("5"));
    assert_ne!(answer("5"), answer("6"));
}

#[test]
fn too_few_successes_exit_non_zero_with_the_reason() {
    // A 1 ms deadline against agents that take at least 50 ms: nobody succeeds.
    let config = "request_timeout = \"1ms\"\n[providers.sim]\nkind = \"sim\"\nlatency_min = \"50ms\"\nlatency_max = \"60ms\"\n";
    let dir = dir_with(Some(config));
    let out = metaorch(dir.path(), &["run", "q"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("timed out"), "{text}");
    assert!(text.contains("deadline_exceeded"), "{text}");
    let err = stderr(&out);
    assert!(
        err.contains("0 of 6 agents succeeded; at least 1 required (min_successes)"),
        "{err}"
    );
    // Each agent's timeout is logged as a warning tied to the request's trace id.
    let timeouts: Vec<serde_json::Value> = err
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .filter(|doc: &serde_json::Value| doc["event"] == "agent.timeout")
        .collect();
    assert_eq!(timeouts.len(), 6, "{err}");
    let trace_of = |doc: &serde_json::Value| doc["trace_id"].as_str().map(str::to_owned);
    let trace_id = trace_of(&timeouts[0]).expect("a trace id");
    assert_eq!(trace_id.len(), 32);
    assert!(text.contains(&trace_id), "{text}");
    assert!(
        timeouts
            .iter()
            .all(|doc| trace_of(doc).as_deref() == Some(trace_id.as_str()))
    );
}

#[test]
fn flags_beat_environment_beat_file() {
    let dir = dir_with(Some(&format!("min_successes = 6\n{FAST}")));
    // The file asks for 6, the environment for 7 (invalid: only 6 agents), the flag for 2.
    let out = common::metaorch_command(
        dir.path(),
        &["run", "--format", "json", "--min-successes", "2", "q"],
    )
    .env("METAORCH_MIN_SUCCESSES", "3")
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["summary"]["min_successes"], 2);
}

#[test]
fn config_check_names_each_problem_and_fails() {
    let dir = dir_with(None);
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        "concurrency_limit = 0\n\n[[agents]]\nid = \"a\"\nprovider = \"claud\"\n",
    )
    .unwrap();
    let out = metaorch(dir.path(), &["config", "check", "broken.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains("broken.toml:1:21: concurrency_limit: 0 would let no agent call run"),
        "{text}"
    );
    assert!(
        text.contains("broken.toml:5:12: agents[0].provider: \"claud\" is not a defined provider; defined: sim"),
        "{text}"
    );
    assert!(stderr(&out).contains("2 problems found"));
}

#[test]
fn config_check_accepts_the_example_and_summarises_it() {
    let dir = dir_with(None);
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("metaorch.example.toml");
    let out = metaorch(dir.path(), &["config", "check", example.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains(": ok"), "{text}");
    assert!(
        text.contains("agents (3): researcher (sim/sim-1)"),
        "{text}"
    );
}

#[test]
fn config_check_without_a_file_checks_the_embedded_default() {
    let out = metaorch(dir_with(None).path(), &["config", "check"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("no config file found; the embedded default: ok"));
}

#[test]
fn run_with_a_broken_config_exits_2_without_a_backtrace() {
    let dir = dir_with(Some("concurrency_limit = \"x\"\n"));
    let out = metaorch(dir.path(), &["run", "q"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("metaorch.toml:1:21: concurrency_limit: invalid type"),
        "{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

#[test]
fn bad_environment_values_are_named() {
    let out = common::metaorch_command(dir_with(None).path(), &["run", "q"])
        .env("METAORCH_REQUEST_TIMEOUT", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("METAORCH_REQUEST_TIMEOUT=\"soon\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_empty_query_is_refused() {
    let out = metaorch(dir_with(Some(FAST)).path(), &["run", " "]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("the query is empty"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_missing_config_file_is_named() {
    let out = metaorch(
        dir_with(None).path(),
        &["run", "--config", "nope.toml", "q"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("nope.toml: cannot read the config file"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn logs_are_json_lines_on_stderr() {
    let dir = dir_with(Some(FAST));
    let out = metaorch(
        dir.path(),
        &["run", "--log-level", "info", "--format", "json", "q"],
    );
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let trace = doc["trace_id"].as_str().unwrap();
    let lines: Vec<serde_json::Value> = stderr(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("every log line is JSON"))
        .collect();
    let events: Vec<&str> = lines.iter().filter_map(|l| l["event"].as_str()).collect();
    assert_eq!(events.first(), Some(&"request.start"));
    assert_eq!(events.last(), Some(&"request.finish"));
    assert_eq!(events.iter().filter(|e| **e == "agent.success").count(), 6);
    assert!(
        stderr(&out).contains(trace),
        "the trace id reaches the logs"
    );
}

/// The resilience drill as a user sees it: retries, a breaker opening and fallbacks in
/// the output and in the JSON log.
#[test]
fn faults_show_retries_an_open_breaker_and_fallbacks() {
    let config = r#"
seed = 1
[defaults.retry]
initial_delay = "5ms"
max_delay = "20ms"
[defaults.breaker]
window_size = 10
minimum_calls = 4
open_for = "1m"
[providers.sim]
kind = "sim"
latency_min = "5ms"
latency_max = "10ms"
[[providers.sim.faults.script]]
agent = "a"
first_attempts = 100
kind = "overloaded"
[[providers.sim.faults.script]]
agent = "b"
first_attempts = 100
kind = "server"
[[providers.sim.faults.script]]
agent = "c"
first_attempts = 100
kind = "auth"
[providers.backup]
kind = "sim"
latency_min = "5ms"
latency_max = "10ms"
[[agents]]
id = "a"
provider = "sim"
fallback = { agent = "a-backup" }
[[agents]]
id = "a-backup"
provider = "backup"
model = "backup-1"
standby = true
[[agents]]
id = "b"
provider = "sim"
[[agents]]
id = "c"
provider = "sim"
fallback = { text = "fixed reply" }
"#;
    let dir = dir_with(Some(config));
    let out = metaorch(dir.path(), &["run", "q"]);
    let text = stdout(&out);
    let err = stderr(&out);
    assert!(out.status.success(), "{text}\n{err}");
    assert!(text.contains("retried after"), "{text}");
    assert!(
        text.contains("fell back to agent a-backup (backup/backup-1)"),
        "{text}"
    );
    assert!(
        text.contains("fell back to its fallback text after: auth (HTTP 401)"),
        "{text}"
    );
    assert!(text.contains("circuit sim/sim-1 is open"), "{text}");
    assert!(text.contains("circuit_open"), "{text}");

    let events: Vec<serde_json::Value> = err
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    let count = |name: &str| events.iter().filter(|e| e["event"] == name).count();
    assert!(count("agent.retry") >= 2, "{err}");
    assert_eq!(count("breaker.open"), 1, "{err}");
    assert_eq!(count("agent.fallback"), 2, "{err}");
    let open = events
        .iter()
        .find(|e| e["event"] == "breaker.open")
        .unwrap();
    assert_eq!(open["level"], "WARN");
    assert_eq!(open["provider"], "sim");
    assert_eq!(open["reason"], "failure_rate");
}

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/two_requests.log"
);
/// The fixture's first request (started first), and its second.
const FIRST: &str = "fd999d32df3044a401874b424b2b8a03";
const SECOND: &str = "f536d78c5875e597258d1ad1f4e1e884";

fn trace_json(args: &[&str]) -> serde_json::Value {
    let dir = dir_with(None);
    let mut all = vec!["trace", "--format", "json"];
    all.extend_from_slice(args);
    let out = metaorch(dir.path(), &all);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `trace` on two interleaved requests with a retry and a fallback, among garbage.
#[test]
fn trace_tells_one_requests_story_from_an_interleaved_log() {
    let t = trace_json(&[FIRST, "--log", FIXTURE]);
    assert_eq!(t["trace_id"], FIRST);
    assert_eq!(t["ok"], true);
    assert_eq!(t["summary"]["succeeded"], 3);
    assert_eq!(t["lines"]["lines"], 18);
    assert_eq!(t["lines"]["matched"], 7);
    assert_eq!(
        t["lines"]["skipped"], 3,
        "a text line, another shape, a cut line"
    );

    let agents = t["agents"].as_array().unwrap();
    let ids: Vec<_> = agents
        .iter()
        .map(|a| a["agent_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["researcher", "critic", "writer"]);
    let researcher = &agents[0];
    assert_eq!(researcher["attempts"], 2);
    assert_eq!(researcher["retries"][0]["error"], "rate_limited");
    assert_eq!(researcher["retries"][0]["status"], 429);
    assert_eq!(researcher["retries"][0]["delay_ms"], 1000.0);
    assert_eq!(researcher["retries"][0]["source"], "retry_after");
    let critic = &agents[1];
    assert_eq!(critic["status"], "succeeded");
    assert_eq!(critic["fallback"]["source"], "text");
    assert_eq!(critic["fallback"]["primary_error"], "auth");
    assert_eq!(t["critical_path"]["agent_id"], "researcher");
    assert_eq!(t["critical_path"]["retry_wait_ms"], 1000.0);

    // The other request's lines never leak in, and it has its own story.
    let other = trace_json(&[SECOND, "--log", FIXTURE]);
    assert_eq!(other["lines"]["matched"], 7);
    assert_ne!(other["started_at"], t["started_at"]);
}

#[test]
fn trace_text_fits_one_screen_and_names_the_slow_agent() {
    let dir = dir_with(None);
    let out = metaorch(dir.path(), &["trace", FIRST, "--log", FIXTURE]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.lines().count() <= 24, "{text}");
    assert!(text.contains("attempt 1 failed at"), "{text}");
    assert!(
        text.contains("rate_limited (HTTP 429); waited 1.000s (retry_after)"),
        "{text}"
    );
    assert!(text.contains("fell back to its fallback text"), "{text}");
    assert!(text.contains("critical path: researcher"), "{text}");
    assert!(text.contains("3 skipped"), "{text}");
}

#[test]
fn trace_last_reads_stdin_and_gzip() {
    use std::io::Write as _;
    // --last on stdin: the request that started last.
    let dir = dir_with(None);
    let mut child = common::metaorch_command(dir.path(), &["trace", "--last", "--format", "json"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&std::fs::read(FIXTURE).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(t["trace_id"], SECOND);

    // A gzipped log reads the same.
    let gz = dir.path().join("app.log.gz");
    let mut encoder =
        flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), Default::default());
    encoder.write_all(&std::fs::read(FIXTURE).unwrap()).unwrap();
    encoder.finish().unwrap();
    let t = trace_json(&[FIRST, "--log", gz.to_str().unwrap()]);
    assert_eq!(t["lines"]["matched"], 7);
}

#[test]
fn trace_errors_are_clear() {
    let dir = dir_with(None);
    let out = metaorch(dir.path(), &["trace", "not-an-id", "--log", FIXTURE]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("\"not-an-id\" is not a trace id; expected 32 hex digits"));

    let missing = "00000000000000000000000000000001";
    let out = metaorch(dir.path(), &["trace", missing, "--log", FIXTURE]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&format!("no lines of trace {missing} in 18 lines read")));

    let out = metaorch(dir.path(), &["trace", FIRST, "--log", "nope.log"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot open the log nope.log"),
        "{}",
        stderr(&out)
    );
}

/// The "done when" of the logging work: two faulty requests into one log file, then
/// `trace` on one of them.
#[test]
fn run_logs_to_a_file_that_trace_reads() {
    let config = r#"
seed = 4
[defaults.retry]
initial_delay = "5ms"
[providers.sim]
kind = "sim"
latency_min = "5ms"
latency_max = "10ms"
[providers.sim.faults]
overloaded = 0.3
"#;
    let dir = dir_with(Some(config));
    let mut ids = Vec::new();
    for query in ["one", "two"] {
        let out = metaorch(
            dir.path(),
            &["--log-file", "app.log", "run", "--format", "json", query],
        );
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        ids.push(doc["trace_id"].as_str().unwrap().to_owned());
    }
    let log = std::fs::read_to_string(dir.path().join("app.log")).unwrap();
    assert!(
        log.lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
    );
    assert!(
        log.contains("\"event\":\"request.finish\""),
        "info by default in a file"
    );
    for id in &ids {
        let out = metaorch(
            dir.path(),
            &["trace", id, "--log", "app.log", "--format", "json"],
        );
        let t: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(t["agents"].as_array().unwrap().len(), 6);
        assert!(t["finished"].as_bool().unwrap());
    }
    // Appended, never truncated.
    let out = metaorch(dir.path(), &["--log-file", "app.log", "run", "three"]);
    assert!(out.status.success());
    let longer = std::fs::read_to_string(dir.path().join("app.log")).unwrap();
    assert!(longer.starts_with(&log));
}

/// Runs the binary with extra environment variables, from the repository root (so the
/// example configs resolve).
fn metaorch_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = common::metaorch_command(Path::new(env!("CARGO_MANIFEST_DIR")), args);
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("the metaorch binary runs")
}

/// Starts mock-upstream on a runtime of its own, for tests that drive the binary.
fn start_mock(
    script: &[(&str, metaorch::mock_upstream::MockFault)],
) -> (
    tokio::runtime::Runtime,
    metaorch::mock_upstream::MockUpstream,
) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let options = metaorch::mock_upstream::MockOptions {
        latency_min: std::time::Duration::from_millis(1),
        latency_max: std::time::Duration::from_millis(5),
        retry_after: std::time::Duration::from_millis(100),
        script: script
            .iter()
            .map(|(text, fault)| metaorch::mock_upstream::MockScript {
                matches: (*text).to_owned(),
                first: 1,
                fault: *fault,
            })
            .collect(),
        ..Default::default()
    };
    let mock = runtime
        .block_on(metaorch::mock_upstream::MockUpstream::start(
            ([127, 0, 0, 1], 0).into(),
            options,
        ))
        .unwrap();
    (runtime, mock)
}

/// examples/claude.toml, six agents on `anthropic`, against mock-upstream with faults:
/// it completes and the log shows the retries; the key never shows.
#[test]
fn the_claude_example_runs_against_mock_upstream() {
    use metaorch::mock_upstream::MockFault;
    let (_runtime, mock) = start_mock(&[
        ("You are a critic", MockFault::RateLimited),
        ("You are a planner", MockFault::Overloaded),
    ]);
    let url = mock.url();
    let key = "sk-ant-test-0123456789-secret";
    let out = metaorch_with_env(
        &[
            "--config",
            "examples/claude.toml",
            "--log-level",
            "info",
            "run",
            "--format",
            "json",
            "Is it worth it?",
        ],
        &[("ANTHROPIC_API_KEY", key), ("ANTHROPIC_BASE_URL", &url)],
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["summary"]["succeeded"], 6, "{doc}");
    let retries: Vec<serde_json::Value> = err
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|l: &serde_json::Value| l["event"] == "agent.retry")
        .collect();
    assert_eq!(retries.len(), 2, "{err}");
    assert!(retries.iter().any(|r| r["agent_id"] == "critic"
        && r["status"] == 429
        && r["delay_source"] == "retry_after"));
    assert!(
        retries
            .iter()
            .any(|r| r["agent_id"] == "planner" && r["status"] == 529)
    );
    assert!(
        !err.contains(key) && !stdout(&out).contains(key),
        "the key leaked"
    );
    // Every agent's calls reached the mock: 6 first tries and 2 retries.
    assert_eq!(mock.requests().len(), 8);
}

#[test]
fn the_openai_compatible_example_runs_against_mock_upstream() {
    let (_runtime, mock) = start_mock(&[]);
    let url = format!("{}/v1", mock.url());
    let out = metaorch_with_env(
        &[
            "--config",
            "examples/openai-compatible.toml",
            "run",
            "--format",
            "json",
            "What is a retry budget?",
        ],
        &[("OPENAI_API_KEY", "test"), ("OPENAI_BASE_URL", &url)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["summary"]["succeeded"], 3);
    assert!(
        doc["outcomes"][2]["output"]
            .as_str()
            .unwrap()
            .starts_with("[mock reply from llama3.2]")
    );
    let records = mock.requests();
    assert!(records.iter().all(|r| r.api == "openai"));
    assert!(records.iter().any(|r| r.stream), "the writer streams");
}

#[test]
fn a_missing_api_key_is_named() {
    let out = metaorch_with_env(&["--config", "examples/claude.toml", "run", "q"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains(
            "provider \"claude\" needs an API key: set the environment variable ANTHROPIC_API_KEY"
        ),
        "{err}"
    );
}

/// `metaorch serve` as a user starts it: the embedded default, a request, its timeline
/// from `/v1/traces/{id}`, and SIGTERM drains and exits 0.
#[cfg(unix)]
#[test]
fn serve_answers_keeps_recent_traces_and_stops_on_sigterm() {
    let dir = dir_with(Some(FAST));
    let (mut child, url, mut stderr) = common::spawn_serve(dir.path(), &[]);
    // Keep draining stderr so the server never blocks on a full pipe.
    let reader = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut rest);
        rest
    });

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let response: serde_json::Value = client
            .post(format!("{url}/v1/orchestrate"))
            .json(&serde_json::json!({"query": "What now?"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = response["trace_id"].as_str().unwrap();
        let timeline: serde_json::Value = client
            .get(format!("{url}/v1/traces/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(timeline["trace_id"], id);
        assert_eq!(
            timeline["agents"].as_array().unwrap().len(),
            6,
            "{timeline}"
        );
        assert_eq!(timeline["finished"], true);
    });

    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let log = reader.join().unwrap();
    assert!(log.contains("\"event\":\"server.draining\""), "{log}");
    assert!(log.contains("\"event\":\"server.stopped\""), "{log}");
}

#[test]
fn run_metrics_prints_the_counters() {
    let dir = dir_with(Some(FAST));
    let out = metaorch(dir.path(), &["run", "--metrics", "q"]);
    assert!(out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("metaorch_requests_total{outcome=\"ok\"} 1"),
        "{err}"
    );
    assert!(err.contains("metaorch_agent_calls_total{agent=\"writer\",provider=\"sim\",model=\"sim-1\",outcome=\"succeeded\"} 1"), "{err}");
}

/// The bench commands run end to end (tiny runs: the figures are not checked, only
/// that every mode reports and writes what it says).
#[test]
fn bench_modes_run_and_write_their_reports() {
    let dir = dir_with(None);
    let out = metaorch(
        dir.path(),
        &[
            "bench",
            "--time-scale",
            "0.005",
            "--requests",
            "4",
            "--json",
            "t.json",
            "--chart",
            "t.svg",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for mode in ["sequential", "parallel c=6", "parallel c=4"] {
        assert!(text.contains(mode), "{text}");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("t.json")).unwrap()).unwrap();
    assert_eq!(report["modes"].as_array().unwrap().len(), 3);
    assert!(
        report["modes"][1]["critical_path_mean_ms"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let svg = std::fs::read_to_string(dir.path().join("t.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("critical path"));

    for mode in ["load", "throughput"] {
        let out = metaorch(
            dir.path(),
            &[
                "bench",
                mode,
                "--in-flight",
                "4",
                "--duration",
                "200ms",
                "--warmup",
                "0s",
                "--latency",
                "1ms..2ms",
                "--json",
                "l.json",
            ],
        );
        assert!(out.status.success(), "{mode}: {}", stderr(&out));
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("l.json")).unwrap()).unwrap();
        assert_eq!(report["mode"], mode);
        assert!(report["requests"].as_u64().unwrap() > 0, "{report}");
        assert_eq!(report["failed_agents"], 0);
    }

    let out = metaorch(dir.path(), &["bench", "--upstream", "nowhere"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("neither `sim` nor an http(s) URL"),
        "{}",
        stderr(&out)
    );
}

/// Runs metaorch with its stdout a pipe whose reader is already gone.
fn with_closed_stdout(dir: &Path, args: &[&str]) -> Output {
    use std::process::Stdio;
    let mut child = common::metaorch_command(dir, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the metaorch binary runs");
    // The reader goes away before anything is written.
    drop(child.stdout.take());
    child.wait_with_output().expect("it ends")
}

/// `metaorch … | head -1`: a reader that goes away is not an error, and never a panic.
#[test]
fn a_closed_stdout_ends_quietly() {
    let dir = dir_with(Some(
        "[providers.sim]\nkind = \"sim\"\nlatency_min = \"200ms\"\nlatency_max = \"300ms\"\n",
    ));
    for args in [
        &["run", "q", "--seed", "1"][..],
        &["run", "q", "--seed", "1", "--format", "json"],
        &["config", "check"],
    ] {
        let out = with_closed_stdout(dir.path(), args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(
            !stderr(&out).contains("panicked"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

/// `config check` warns of a missing API key (CI may lack secrets) and refuses a base
/// URL variable that is not a URL, as `run` would.
#[test]
fn config_check_reads_the_environment_a_run_would_use() {
    let dir = dir_with(Some(
        "[providers.claude]\nkind = \"anthropic\"\n[[agents]]\nid = \"a\"\nprovider = \"claude\"\nmodel = \"m\"\n",
    ));
    let run = |envs: &[(&str, &str)], args: &[&str]| {
        let mut cmd = common::metaorch_command(dir.path(), args);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let out = run(&[], &["config", "check"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(
            "warning: providers.claude: its API key variable ANTHROPIC_API_KEY is not set"
        ),
        "{}",
        stdout(&out)
    );
    let out = run(&[], &["run", "q"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("ANTHROPIC_API_KEY"),
        "{}",
        stderr(&out)
    );

    let bad = [
        ("ANTHROPIC_API_KEY", "k"),
        ("ANTHROPIC_BASE_URL", "localhost:8081"),
    ];
    let out = run(&bad, &["config", "check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains(
            "error: providers.claude: ANTHROPIC_BASE_URL=\"localhost:8081\" is not an http(s) URL"
        ),
        "{}",
        stdout(&out)
    );
    let out = run(&bad, &["run", "q"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("is not an http(s) URL"),
        "{}",
        stderr(&out)
    );

    // A proxy the client cannot use is named before any call fails through it.
    let socks = [
        ("ANTHROPIC_API_KEY", "k"),
        ("HTTPS_PROXY", "socks5://10.0.0.1:1080"),
    ];
    let out = run(&socks, &["config", "check"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("warning: providers.claude: the proxy for https://api.anthropic.com/ (socks5://10.0.0.1) is not supported: only http:// proxies are"),
        "{}",
        stdout(&out)
    );

    // So is a CA file that cannot serve.
    let missing = dir.path().join("missing-ca.pem");
    let missing = missing.to_str().unwrap();
    let out = run(
        &[("ANTHROPIC_API_KEY", "k"), ("SSL_CERT_FILE", missing)],
        &["config", "check"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("warning: SSL_CERT_FILE={missing}: "))
            && stdout(&out).contains("every https:// call will fail"),
        "{}",
        stdout(&out)
    );
}

/// An environment variable's bad value is named by the variable, not "command line".
#[test]
fn environment_errors_name_the_variable() {
    let dir = dir_with(None);
    let out = common::metaorch_command(dir.path(), &["run", "q"])
        .env("METAORCH_CONCURRENCY_LIMIT", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out)
            .contains("environment: METAORCH_CONCURRENCY_LIMIT: 0 would let no agent call run"),
        "{}",
        stderr(&out)
    );
}

/// A failed run points at `metaorch trace` only when there is a log to read, and says
/// how to get one otherwise; a fallback's attempts say which model made them.
#[test]
fn failure_hints_and_fallback_attempts_say_what_they_can() {
    let config = r#"
min_successes = 1
[defaults.retry]
max_attempts = 2
initial_delay = "1ms"
max_delay = "1ms"
[providers.sim]
kind = "sim"
latency_min = "1ms"
latency_max = "2ms"
[[providers.sim.faults.script]]
agent = "main"
first_attempts = 9
kind = "bad_request"
[[providers.sim.faults.script]]
agent = "backup"
first_attempts = 9
kind = "server"
[[agents]]
id = "main"
provider = "sim"
model = "sim-1"
fallback = { agent = "backup" }
[[agents]]
id = "backup"
provider = "sim"
model = "sim-2"
standby = true
"#;
    let dir = dir_with(Some(config));
    let out = metaorch(dir.path(), &["run", "q"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("run again with `--log-file run.log`"),
        "{}",
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("attempt 1 on sim-2 failed: server"),
        "{}",
        stdout(&out)
    );
    let out = metaorch(dir.path(), &["run", "q", "--log-file", "run.log"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--log run.log`"), "{}", stderr(&out));
}
