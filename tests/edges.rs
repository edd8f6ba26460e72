//! The edges, through the binary: text from upstream never drives the terminal
//! (`run`, `trace`); `trace` keys requests that share a trace id apart; `serve` keeps
//! answering when its log pipe is full, and exits within `drain_timeout` with a request
//! still running, logging it as cancelled.

mod common;

use std::io::{BufReader, Read as _};
use std::path::Path;
use std::process::{Child, Output};
use std::time::Duration;

use serde_json::{Value, json};

fn metaorch(dir: &Path, args: &[&str]) -> Output {
    common::metaorch_command(dir, args)
        .output()
        .expect("the metaorch binary runs")
}

fn dir_with(config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("metaorch.toml"), config).unwrap();
    dir
}

const FAST: &str =
    "[providers.sim]\nkind = \"sim\"\nlatency_min = \"1ms\"\nlatency_max = \"2ms\"\n";

/// No byte of an escape sequence, no carriage return, no other control character but
/// line feeds and tabs.
fn assert_terminal_safe(text: &str) {
    let bad: Vec<char> = text
        .chars()
        .filter(|c| c.is_control() && *c != '\n' && *c != '\t')
        .collect();
    assert!(bad.is_empty(), "control characters {bad:?} in:\n{text}");
}

/// The simulator echoes the query in its replies: a query full of escape sequences is
/// upstream text that `run` must not pass to the terminal.
#[test]
fn run_strips_escape_sequences_from_upstream_text() {
    let dir = dir_with(FAST);
    let query = "hi\x1b[2J\x1b]0;owned\x07 there\r";
    let out = metaorch(dir.path(), &["run", query]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("hi there"), "the text stays: {text}");
    assert_terminal_safe(&text);
}

const A: &str = "0123456789abcdef0123456789abcdef";

fn log_line(ts: &str, request: &str, event: &str, extra: &str) -> String {
    format!(
        r#"{{"timestamp":"2026-11-25T10:00:{ts}Z","level":"INFO","message":"m","event":"{event}","trace_id":"{A}","request_id":"{request}"{extra}}}"#
    )
}

/// A log of two requests under one trace id; the second's agent failed with an error
/// message full of escape sequences.
fn two_requests_log(dir: &Path) -> std::path::PathBuf {
    let lines = [
        log_line("00.000", "00000000000000a1", "request.start", ""),
        log_line("00.100", "00000000000000b2", "request.start", ""),
        log_line(
            "00.500",
            "00000000000000a1",
            "agent.success",
            r#","agent_id":"x","latency_ms":500.0"#,
        ),
        log_line(
            "00.600",
            "00000000000000b2",
            "agent.failure",
            r#","agent_id":"y","error.kind":"server","status":500,"error.message":"bad\u001b[31m gateway\r\u001b]0;owned\u0007""#,
        ),
        log_line(
            "00.700",
            "00000000000000b2",
            "request.finish",
            r#","status":"failed","ok":false,"succeeded":0,"failed":1,"timed_out":0,"duration_ms":600.0"#,
        ),
        log_line(
            "00.800",
            "00000000000000a1",
            "request.finish",
            r#","status":"ok","ok":true,"succeeded":1,"failed":0,"timed_out":0,"duration_ms":800.0"#,
        ),
    ];
    let path = dir.join("app.log");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

#[test]
fn trace_shows_each_request_of_a_shared_trace_and_strips_upstream_text() {
    let dir = tempfile::tempdir().unwrap();
    let log = two_requests_log(dir.path());
    let log = log.to_str().unwrap();

    let out = metaorch(dir.path(), &["trace", A, "--log", log]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_terminal_safe(&text);
    assert!(
        text.contains(&format!("trace {A} request 00000000000000a1 (1 of 2)")),
        "{text}"
    );
    assert!(
        text.contains(&format!("trace {A} request 00000000000000b2 (2 of 2)")),
        "{text}"
    );
    assert!(text.contains("server (HTTP 500): bad gateway"), "{text}");

    // One request by TRACE_ID/REQUEST_ID; JSON: the last, with the others listed.
    let out = metaorch(
        dir.path(),
        &[
            "trace",
            &format!("{A}/00000000000000a1"),
            "--log",
            log,
            "--format",
            "json",
        ],
    );
    let t: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(t["request_id"], "00000000000000a1");
    assert_eq!(t["agents"][0]["agent_id"], "x");
    assert_eq!(t["status"], "ok");
    let out = metaorch(dir.path(), &["trace", A, "--log", log, "--format", "json"]);
    let t: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(t["request_id"], "00000000000000b2");
    assert_eq!(t["requests"].as_array().unwrap().len(), 2);

    let out = metaorch(
        dir.path(),
        &["trace", &format!("{A}/00000000000000c3"), "--log", log],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!(
        "no lines of request 00000000000000c3 in trace {A}"
    )));
    let out = metaorch(dir.path(), &["trace", &format!("{A}/xyz"), "--log", log]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"xyz\" is not a request id"));
}

/// A child process killed when the test ends, however it ends: a failed test must not
/// leave a server running.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Served {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Served {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// `metaorch serve` as a user starts it, with the config in `dir`; its address and its
/// stderr.
fn serve(dir: &Path) -> (Served, String, BufReader<std::process::ChildStderr>) {
    let (child, url, stderr) = common::spawn_serve(dir, &[]);
    (Served(child), url, stderr)
}

/// A runtime whose spawned tasks run while the test's own thread waits on the child.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[cfg(unix)]
fn sigterm(child: &Child) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
}

/// Waits for the child to exit, within a bound that only a hang would reach.
fn exits(child: &mut Child) -> std::process::ExitStatus {
    for _ in 0..400 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("serve did not exit");
}

/// Nobody reads `serve`'s stderr: the pipe fills, and with a blocking log writer every
/// worker would stop on its next log line. Requests keep being answered; the lines
/// that did not fit are dropped, counted, and reported once the pipe drains.
#[cfg(unix)]
#[test]
fn serve_keeps_answering_when_nobody_reads_its_log() {
    // At debug, a request of six agents writes about 30 lines: 1,200 requests overflow
    // the pipe (64 KiB) and the writer's queue (16,384 lines) both.
    let dir = dir_with(&format!("{FAST}[log]\nlevel = \"debug\"\n"));
    let (mut child, url, mut stderr) = serve(dir.path());
    let dropped = runtime().block_on(async {
        let client = reqwest::Client::new();
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..16 {
            let (client, url) = (client.clone(), url.clone());
            tasks.spawn(async move {
                for i in 0..75 {
                    let r = client
                        .post(format!("{url}/v1/orchestrate"))
                        .json(&json!({"query": format!("q{worker}-{i}")}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                }
            });
        }
        tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(done) = tasks.join_next().await {
                done.unwrap();
            }
        })
        .await
        .expect("answered while the log pipe is full");
        let metrics = client
            .get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("metaorch_log_lines_dropped_total "))
            .map_or(0.0, |v| v.parse::<f64>().unwrap())
    });
    assert!(dropped > 0.0, "lines were dropped, and counted");
    sigterm(&child);
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert!(exits(&mut child).success());
    assert!(rest.contains("\"event\":\"log.dropped\""), "reported");
    assert!(
        rest.contains("\"event\":\"server.stopped\""),
        "the last lines written"
    );
}

/// SIGTERM with a request that never ends: `serve` exits once `drain_timeout` has
/// passed, and the request's story ends `cancelled` in the log.
#[cfg(unix)]
#[test]
fn serve_exits_within_the_drain_timeout_and_logs_the_cut_request_as_cancelled() {
    let dir = dir_with(
        "[providers.sim]\nkind = \"sim\"\nlatency_min = \"10m\"\nlatency_max = \"10m\"\n[server]\ndrain_timeout = \"200ms\"\n",
    );
    let (mut child, url, stderr) = serve(dir.path());
    let request_url = url.clone();
    let reader = std::thread::spawn(move || {
        let mut rest = String::new();
        let mut stderr = stderr;
        let _ = stderr.read_to_string(&mut rest);
        rest
    });
    let rt = runtime();
    let trace_id = "7bf92f3577b34da6a3ce929d0e0e4737";
    let request = rt.spawn(async move {
        reqwest::Client::new()
            .post(format!("{request_url}/v1/orchestrate"))
            .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
            .json(&json!({"query": "never done"}))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    // The request is admitted before the signal.
    rt.block_on(async {
        let client = reqwest::Client::new();
        for _ in 0..400 {
            let ready: Value = client
                .get(format!("{url}/readyz"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if ready["in_flight"] == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the request was never admitted");
    });
    sigterm(&child);
    assert!(exits(&mut child).success());
    let log = reader.join().unwrap();
    let _ = rt.block_on(request);
    let finish: Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "request.finish" && v["trace_id"] == trace_id)
        .unwrap_or_else(|| panic!("no request.finish for {trace_id} in:\n{log}"));
    assert_eq!(finish["status"], "cancelled");
    assert!(log.contains("\"event\":\"server.drain_timeout\""), "{log}");
}
