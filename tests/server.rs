//! `metaorch serve` over 127.0.0.1: the API, its errors, auth, traceparent, draining,
//! admission under load, and the official OpenAI Python client.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::InFlightCounter;
use metaorch::config::{Config, ServerConfig};
use metaorch::provider::{Provider, Secret};
use metaorch::server::{ServerState, serve};
use metaorch::{Orchestrator, telemetry::TraceRing};
use serde_json::{Value, json};
use tokio::sync::oneshot;

struct Server {
    url: String,
    state: Arc<ServerState>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// The ring every test server shows traces from, fed by this test binary's one global
/// log subscriber (at `info`, as `serve` logs), installed on first use.
fn ring() -> TraceRing {
    use tracing_subscriber::layer::SubscriberExt;
    static RING: std::sync::OnceLock<TraceRing> = std::sync::OnceLock::new();
    RING.get_or_init(|| {
        let ring = TraceRing::new(8 << 20);
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new("info"))
            .with(metaorch::telemetry::JsonLayer::new(ring.clone()));
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global subscriber in this test binary");
        ring
    })
    .clone()
}

impl Server {
    async fn start(
        server: ServerConfig,
        provider: Option<Arc<dyn Provider>>,
        latency_ms: u64,
    ) -> Server {
        let config = Config::from_toml_str(
            &format!(
                "concurrency_limit = 16\n[providers.sim]\nkind = \"sim\"\nlatency_min = \"{latency_ms}ms\"\nlatency_max = \"{latency_ms}ms\"\n"
            ),
            "test.toml",
        )
        .unwrap();
        Server::start_with(config, server, provider).await
    }

    async fn start_with(
        config: Config,
        server: ServerConfig,
        provider: Option<Arc<dyn Provider>>,
    ) -> Server {
        let mut builder = Orchestrator::builder().config(config);
        if let Some(p) = provider {
            builder = builder.provider("sim", p);
        }
        let orchestrator = builder.build().unwrap();
        let state = ServerState::new(orchestrator, server, Some(ring()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, Arc::clone(&state), async move {
            let _ = rx.await;
        }));
        Server {
            url,
            state,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post(url: &str, body: Value) -> reqwest::Response {
    client().post(url).json(&body).send().await.unwrap()
}

#[tokio::test]
async fn orchestrate_plain_and_traceparent() {
    let server = Server::start(ServerConfig::default(), None, 5).await;
    let response = post(
        &format!("{}/v1/orchestrate", server.url),
        json!({"query": "Is it worth it?"}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let trace = response.headers()["x-trace-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["trace_id"], trace);
    assert_eq!(body["outcomes"].as_array().unwrap().len(), 6);
    assert_eq!(body["ok"], true);

    // A subset of agents, and an incoming traceparent.
    let id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = client()
        .post(format!("{}/v1/orchestrate", server.url))
        .header("traceparent", format!("00-{id}-00f067aa0ba902b7-01"))
        .json(&json!({"query": "q", "agents": ["writer", "critic"], "timeout_ms": 5000}))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["trace_id"], id);
    let ids: Vec<_> = body["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["agent_id"].clone())
        .collect();
    assert_eq!(ids, [json!("critic"), json!("writer")], "config order");

    // Its timeline is kept in the ring the log feeds.
    let r = client()
        .get(format!("{}/v1/traces/{id}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let timeline: Value = r.json().await.unwrap();
    assert_eq!(timeline["trace_id"], id);
    let agents: Vec<_> = timeline["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["agent_id"].clone())
        .collect();
    assert_eq!(agents.len(), 2, "{timeline}");
    assert!(agents.contains(&json!("critic")) && agents.contains(&json!("writer")));
    // A trace id it never saw is unknown.
    let r = client()
        .get(format!(
            "{}/v1/traces/00000000000000000000000000000001",
            server.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let agents: Value = client()
        .get(format!("{}/v1/agents", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(agents["agents"].as_array().unwrap().len(), 6);
    assert_eq!(agents["agents"][0]["breaker"]["state"], "closed");
    assert_eq!(agents["agents"][0]["flow"]["limit"], 64);
    assert_eq!(agents["agents"][0]["flow"]["in_flight"], 0);
    server.stop().await;
}

#[tokio::test]
async fn orchestrate_streams_events_then_the_result() {
    let server = Server::start(ServerConfig::default(), None, 5).await;
    let text = client()
        .post(format!("{}/v1/orchestrate", server.url))
        .header("accept", "text/event-stream")
        .json(&json!({"query": "stream it"}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(
        events.iter().filter(|e| **e == "agent.dispatch").count(),
        6,
        "{text}"
    );
    assert_eq!(
        events.iter().filter(|e| **e == "agent.done").count(),
        6,
        "{text}"
    );
    assert_eq!(events.last(), Some(&"result"), "{text}");
    let data = text
        .split("event: result\ndata: ")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap();
    let response: Value = serde_json::from_str(data).unwrap();
    assert_eq!(response["summary"]["succeeded"], 6);
    server.stop().await;
}

#[tokio::test]
async fn chat_completions_plain_and_streaming() {
    let server = Server::start(ServerConfig::default(), None, 5).await;
    let url = format!("{}/v1/chat/completions", server.url);
    let body: Value = post(
        &url,
        json!({"model": "metaorch", "temperature": 0.3, "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "What is a retry budget?"}]}
        ]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(body["object"], "chat.completion");
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        content.starts_with("Synthesized from 6 of 6 agents."),
        "{content}"
    );
    assert!(content.contains("What is a retry budget?"));
    assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 0);

    let text = post(
        &url,
        json!({"model": "metaorch/critic+writer", "stream": true, "stream_options": {"include_usage": true},
               "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .text()
    .await
    .unwrap();
    let chunks: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(chunks.last(), Some(&"[DONE]"), "{text}");
    let parsed: Vec<Value> = chunks[..chunks.len() - 1]
        .iter()
        .map(|c| serde_json::from_str(c).unwrap())
        .collect();
    assert_eq!(parsed[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = parsed
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(
        streamed.starts_with("Synthesized from 2 of 2 agents."),
        "{streamed}"
    );
    assert!(
        parsed.last().unwrap()["usage"]["completion_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );

    let models: Value = client()
        .get(format!("{}/v1/models", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "metaorch");
    server.stop().await;
}

#[tokio::test]
async fn every_bad_request_gets_a_json_error_that_says_why() {
    let server = Server::start(
        ServerConfig {
            max_body_bytes: 2048,
            max_query_chars: 100,
            ..ServerConfig::default()
        },
        None,
        1,
    )
    .await;
    let orchestrate = format!("{}/v1/orchestrate", server.url);
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            client()
                .post(&orchestrate)
                .json(&json!({"query": "x".repeat(3000)})),
            413,
            "max_body_bytes",
        ),
        (
            client()
                .post(&orchestrate)
                .json(&json!({"query": "x".repeat(101)})),
            400,
            "max_query_chars",
        ),
        (
            client().post(&orchestrate).json(&json!({"query": 7})),
            400,
            "query: invalid type",
        ),
        (
            client().post(&orchestrate).json(&json!({"question": "x"})),
            400,
            "unknown field `question`",
        ),
        (
            client()
                .post(&orchestrate)
                .header("content-type", "application/json")
                .body("{\"query\":"),
            400,
            "EOF while parsing",
        ),
        (
            client()
                .post(&orchestrate)
                .json(&json!({"query": "x", "agents": ["nobody"]})),
            400,
            "\"nobody\" is not a configured agent",
        ),
        (
            client().post(&orchestrate).json(&json!({"query": "   "})),
            400,
            "query: the query is empty",
        ),
        (
            client()
                .post(&orchestrate)
                .json(&json!({"query": "x", "timeout_ms": 0})),
            400,
            "timeout_ms",
        ),
        (
            client().post(&orchestrate).body("query=x"),
            415,
            "Content-Type: application/json",
        ),
        (
            client()
                .post(format!("{}/v1/chat/completions", server.url))
                .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})),
            404,
            "\"gpt-4o\" is not served here",
        ),
        (
            client()
                .post(format!("{}/v1/chat/completions", server.url))
                .json(
                    &json!({"model": "metaorch", "messages": [{"role": "system", "content": "x"}]}),
                ),
            400,
            "no user message",
        ),
        (
            client().get(format!("{}/nowhere", server.url)),
            404,
            "no such endpoint",
        ),
        (
            client().get(format!("{}/v1/traces/xyz", server.url)),
            400,
            "not a trace id",
        ),
    ];
    for (request, status, says) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{says}");
        let body: Value = response.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{status}: {message}");
    }
    server.stop().await;
}

#[tokio::test]
async fn bearer_auth_when_tokens_are_configured() {
    let server = Server::start(
        ServerConfig {
            auth_tokens: vec![Secret::new("s3cret-token"), Secret::new("other")],
            ..ServerConfig::default()
        },
        None,
        1,
    )
    .await;
    let url = format!("{}/v1/orchestrate", server.url);
    let body = json!({"query": "x"});
    let missing = client().post(&url).json(&body).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    let error: Value = missing.json().await.unwrap();
    assert_eq!(error["error"]["type"], "authentication_error");
    let wrong = client()
        .post(&url)
        .bearer_auth("s3cret-tokeX")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right = client()
        .post(&url)
        .bearer_auth("other")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
    let health = client()
        .get(format!("{}/healthz", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200, "health stays open");
    let ready = client()
        .get(format!("{}/readyz", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 401, "everything else needs the token");
    server.stop().await;
}

#[tokio::test]
async fn draining_fails_readiness_refuses_new_work_and_finishes_old() {
    let mut server = Server::start(ServerConfig::default(), None, 400).await;
    let url = server.url.clone();
    let in_flight = tokio::spawn(async move {
        post(&format!("{url}/v1/orchestrate"), json!({"query": "slow"}))
            .await
            .status()
    });
    // Wait until it is admitted.
    while server.state.in_flight() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = server.stop.take().unwrap().send(());
    while !server.state.draining() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ready = client()
        .get(format!("{}/readyz", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let refused = post(
        &format!("{}/v1/orchestrate", server.url),
        json!({"query": "late"}),
    )
    .await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(
        in_flight.await.unwrap(),
        200,
        "the request in flight finishes"
    );
    let stopped = tokio::time::timeout(Duration::from_secs(5), &mut server.task).await;
    assert!(
        matches!(stopped, Ok(Ok(Ok(())))),
        "the server stops once drained"
    );
}

/// 1,000 concurrent requests against `serve` on a counting provider: none lost, the
/// provider never sees more calls at once than the limit; then past `max_in_flight`,
/// the excess is refused with 503 rather than queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests() {
    let counter = Arc::new(InFlightCounter::new(Duration::from_millis(2)));
    let server = Server::start(
        ServerConfig {
            max_in_flight: 1000,
            ..ServerConfig::default()
        },
        Some(counter.clone()),
        0,
    )
    .await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1000)
        .build()
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let (client, url) = (client.clone(), format!("{}/v1/orchestrate", server.url));
        tasks.spawn(async move {
            let r = client
                .post(url)
                .json(&json!({"query": format!("q{i}")}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap();
            (status, body["outcomes"].as_array().map_or(0, Vec::len))
        });
    }
    let mut answered = 0;
    while let Some(joined) = tasks.join_next().await {
        let (status, outcomes) = joined.unwrap();
        assert_eq!((status, outcomes), (200, 6));
        answered += 1;
    }
    assert_eq!(answered, 1000);
    assert_eq!(counter.calls.load(Ordering::SeqCst), 6000);
    assert!(
        counter.max.load(Ordering::SeqCst) <= 16,
        "the shared limit of 16 held"
    );
    assert_eq!(server.state.in_flight(), 0);
    server.stop().await;

    // Past max_in_flight: 503 with Retry-After, nothing queued.
    let slow = Arc::new(InFlightCounter::new(Duration::from_millis(200)));
    let server = Server::start(
        ServerConfig {
            max_in_flight: 50,
            ..ServerConfig::default()
        },
        Some(slow),
        0,
    )
    .await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let (client, url) = (client.clone(), format!("{}/v1/orchestrate", server.url));
        tasks.spawn(async move {
            let r = client
                .post(url)
                .json(&json!({"query": format!("q{i}")}))
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.headers().get("retry-after").is_some(),
            )
        });
    }
    let (mut ok, mut refused) = (0, 0);
    while let Some(joined) = tasks.join_next().await {
        match joined.unwrap() {
            (200, _) => ok += 1,
            (503, true) => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ok + refused, 200, "every request answered");
    assert!(refused > 0 && ok >= 50, "ok {ok}, refused {refused}");
    server.stop().await;
}

/// The official `openai` Python package, unchanged but for `base_url`, against
/// `serve`. Skipped, with a message, where Python or the package cannot be had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_client_works_unchanged() {
    let Some(python) = openai_python() else {
        eprintln!(
            "SKIPPED the_openai_python_client_works_unchanged: no python3 with the openai package could be set up"
        );
        return;
    };
    let server = Server::start(ServerConfig::default(), None, 5).await;
    let script = format!(
        r#"
import openai
client = openai.OpenAI(api_key="unused", base_url="{url}/v1")
r = client.chat.completions.create(model="metaorch", messages=[{{"role": "user", "content": "What is a circuit breaker?"}}])
print("PLAIN", r.choices[0].finish_reason, r.usage.total_tokens > 0, r.choices[0].message.content.splitlines()[0])
s = client.chat.completions.create(model="metaorch/critic", stream=True, stream_options={{"include_usage": True}}, messages=[{{"role": "user", "content": "hi"}}])
text, usage = "", None
for chunk in s:
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage:
        usage = chunk.usage
print("STREAM", text.splitlines()[0], usage.completion_tokens > 0)
"#,
        url = server.url
    );
    let output = tokio::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("PLAIN stop True Synthesized from 6 of 6 agents."),
        "{stdout}"
    );
    assert!(
        stdout.contains("STREAM Synthesized from 1 of 1 agents. True"),
        "{stdout}"
    );
    server.stop().await;
}

/// A Python with `openai` installed: a virtual environment under `target/`, created
/// (with pip, from PyPI) on first use and reused after.
fn openai_python() -> Option<std::path::PathBuf> {
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/openai-venv");
    let python = venv.join("bin/python");
    let has_openai = |p: &std::path::Path| {
        std::process::Command::new(p)
            .args(["-c", "import openai"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if has_openai(&python) {
        return Some(python);
    }
    let created = std::process::Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success());
    if !created {
        return None;
    }
    let installed = std::process::Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "openai",
        ])
        .status()
        .is_ok_and(|s| s.success());
    (installed && has_openai(&python)).then_some(python)
}

/// `/metrics` parses as Prometheus text, and its counters move as a faulty run
/// predicts: retries by reason, a breaker open, fallbacks, outcomes.
#[tokio::test]
async fn metrics_move_as_a_faulty_run_predicts() {
    let config = Config::from_toml_str(
        r#"
[defaults.retry]
initial_delay = "1ms"
max_delay = "2ms"
[defaults.breaker]
window_size = 4
minimum_calls = 2
failure_rate_threshold = 0.9
[providers.sim]
kind = "sim"
latency_min = "1ms"
latency_max = "2ms"
[[providers.sim.faults.script]]
agent = "m-planner"
first_attempts = 2
kind = "overloaded"
[[providers.sim.faults.script]]
agent = "m-critic"
first_attempts = 100
kind = "auth"
[providers.flaky]
kind = "sim"
latency_min = "1ms"
latency_max = "2ms"
[[providers.flaky.faults.script]]
agent = "m-researcher"
first_attempts = 100
kind = "server"
[[agents]]
id = "m-planner"
provider = "sim"
[[agents]]
id = "m-critic"
provider = "sim"
fallback = { text = "no critique" }
[[agents]]
id = "m-researcher"
provider = "flaky"
"#,
        "metrics.toml",
    )
    .unwrap();
    let server = Server::start_with(config, ServerConfig::default(), None).await;
    let response = post(
        &format!("{}/v1/orchestrate", server.url),
        json!({"query": "q"}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let body = client()
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap();
    assert!(
        body.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = body.text().await.unwrap();

    // Every sample line is `name{labels} value` with a number.
    let mut samples = std::collections::HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        samples.insert(series.to_owned(), value);
    }
    let get = |series: &str| {
        samples
            .get(series)
            .copied()
            .unwrap_or_else(|| panic!("{series} missing:\n{text}"))
    };
    assert_eq!(
        get(
            r#"metaorch_agent_calls_total{agent="m-planner",provider="sim",model="sim-1",outcome="succeeded"}"#
        ),
        1.0
    );
    assert_eq!(
        get(r#"metaorch_agent_attempts_total{agent="m-planner",provider="sim",model="sim-1"}"#),
        3.0
    );
    assert!(get(r#"metaorch_retries_total{reason="overloaded"}"#) >= 2.0);
    assert_eq!(get(r#"metaorch_fallbacks_total{agent="m-critic"}"#), 1.0);
    assert_eq!(
        get(r#"metaorch_breaker_state{provider="flaky",model="sim-1"}"#),
        2.0,
        "open"
    );
    assert_eq!(
        get(r#"metaorch_breaker_transitions_total{provider="flaky",model="sim-1",to="open"}"#),
        1.0
    );
    assert_eq!(
        get(
            r#"metaorch_agent_calls_total{agent="m-researcher",provider="flaky",model="sim-1",outcome="failed"}"#
        ),
        1.0
    );
    assert_eq!(get(r#"metaorch_in_flight{provider="flaky"}"#), 0.0);
    assert!(get("metaorch_request_duration_seconds_count") >= 1.0);
    assert!(
        text.contains(r#"metaorch_agent_latency_seconds_bucket{agent="m-planner",le="0.1"}"#),
        "histograms have buckets"
    );
    server.stop().await;
}
