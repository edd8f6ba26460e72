//! `metaorch batch`: every query once, resumable after kill -9 without sending a
//! finished query upstream again, a half-written line repaired, failed ids rerun, bad
//! lines reported. The binary runs for real, against `sim` or `mock-upstream` on
//! 127.0.0.1.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use metaorch::mock_upstream::{MockFault, MockOptions, MockScript, MockUpstream};
use serde_json::{Value, json};

const FAST_SIM: &str =
    "[providers.sim]\nkind = \"sim\"\nlatency_min = \"1ms\"\nlatency_max = \"3ms\"\n";

/// Three agents on an Anthropic-compatible upstream at `url`, retrying once at once.
fn mock_config(url: &str) -> String {
    let mut config = format!(
        "min_successes = 1\n[defaults.retry]\nmax_attempts = 2\ninitial_delay = \"1ms\"\nmax_delay = \"2ms\"\n\
         [providers.mock]\nkind = \"anthropic\"\nbase_url = \"{url}\"\napi_key_env = \"MOCK_KEY\"\n"
    );
    for id in ["alpha", "beta", "gamma"] {
        config.push_str(&format!(
            "[[agents]]\nid = \"{id}\"\nrole = \"{id}\"\nprovider = \"mock\"\nmodel = \"claude-haiku-4-5\"\nprompt = \"{id} on: {{query}}\"\n"
        ));
    }
    config
}

/// `n` queries as JSON Lines, each with a field to carry.
fn queries(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "{}\n",
                json!({"id": format!("q{i}"), "query": format!("Question number {i}?"), "gold": i})
            )
        })
        .collect()
}

/// A directory with `metaorch.toml` and `in.jsonl`.
fn workdir(config: &str, input: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("metaorch.toml"), config).unwrap();
    std::fs::write(dir.path().join("in.jsonl"), input).unwrap();
    dir
}

fn batch(dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["batch", "in.jsonl", "--out", "out.jsonl"];
    args.extend_from_slice(extra);
    common::metaorch_command(dir, &args)
        .env("MOCK_KEY", "test-key")
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The output's lines, parsed (each must be whole JSON).
fn results(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("out.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The ids of the results, each checked to be there once.
fn unique_ids(results: &[Value]) -> HashSet<String> {
    let mut ids = HashSet::new();
    for r in results {
        let id = r["id"].as_str().unwrap().to_owned();
        assert!(ids.insert(id.clone()), "{id} is there twice");
    }
    ids
}

fn start_mock(runtime: &tokio::runtime::Runtime, options: MockOptions) -> MockUpstream {
    runtime
        .block_on(MockUpstream::start(
            ([127, 0, 0, 1], 0).into(),
            MockOptions {
                keep_bodies: true,
                ..options
            },
        ))
        .unwrap()
}

fn mock_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// The query number a call to the mock was about ("Question number N?").
fn question(body: &Value) -> Option<usize> {
    let text = body.to_string();
    let at = text.find("Question number ")? + "Question number ".len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[test]
fn batch_answers_every_query_once_and_carries_the_input_fields() {
    let dir = workdir(FAST_SIM, &queries(200));
    let out = batch(dir.path(), &["--format", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let results = results(dir.path());
    assert_eq!(results.len(), 200);
    let ids = unique_ids(&results);
    assert_eq!(ids, (0..200).map(|i| format!("q{i}")).collect());
    for r in &results {
        let i: usize = r["id"].as_str().unwrap()[1..].parse().unwrap();
        assert_eq!(r["gold"], i, "carried");
        assert_eq!(r["query"], format!("Question number {i}?"));
        assert_eq!(r["response"]["ok"], true);
        assert_eq!(r["response"]["query"], format!("Question number {i}?"));
        assert_eq!(r["response"]["outcomes"].as_array().unwrap().len(), 6);
    }
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["requests"], json!({"ok": 200, "failed": 0}));
    assert_eq!(summary["agents"]["succeeded"], 1200);
    assert!(summary["latency_p99_ms"].as_f64().unwrap() > 0.0);

    // Run again: everything is done, nothing runs, nothing is added.
    let again = batch(dir.path(), &[]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(stderr(&again).contains("200 already in out.jsonl; 0 to run"));
    assert_eq!(self::results(dir.path()).len(), 200);
}

#[test]
fn batch_reads_text_from_stdin_with_line_numbers_for_ids() {
    let dir = workdir(FAST_SIM, "");
    let mut child =
        common::metaorch_command(dir.path(), &["batch", "-", "--text", "--out", "out.jsonl"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"First question?\n\nThird line asks this?\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let results = results(dir.path());
    let ids: HashSet<u64> = results.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(
        ids,
        HashSet::from([1, 3]),
        "blank lines count, and are skipped"
    );
    let third = results.iter().find(|r| r["id"] == 3).unwrap();
    assert_eq!(third["response"]["query"], "Third line asks this?");
}

/// An input that cannot be read twice (a pipe given by name, as `<(jq …)` or
/// `/dev/stdin` gives) is read whole first, like `-`.
#[cfg(unix)]
#[test]
fn a_pipe_given_by_name_is_read_once_and_every_query_runs() {
    let dir = workdir(FAST_SIM, "");
    let mut child =
        common::metaorch_command(dir.path(), &["batch", "/dev/stdin", "--out", "out.jsonl"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(queries(5).as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(unique_ids(&results(dir.path())).len(), 5);
}

/// Two batches on one output would both run the same ids: the second is refused.
#[cfg(unix)]
#[test]
fn a_second_batch_on_the_same_output_is_refused() {
    let dir = workdir(
        "[providers.sim]\nkind = \"sim\"\nlatency_min = \"200ms\"\nlatency_max = \"300ms\"\n",
        &queries(40),
    );
    let mut first = common::metaorch_command(
        dir.path(),
        &[
            "batch",
            "in.jsonl",
            "--out",
            "out.jsonl",
            "--in-flight",
            "2",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    // The first holds the lock once its output exists.
    for _ in 0..400 {
        if dir.path().join("out.jsonl").exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    let second = batch(dir.path(), &[]);
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(second.status.code(), Some(2), "{}", stderr(&second));
    assert!(
        stderr(&second).contains("another `metaorch batch` is writing"),
        "{}",
        stderr(&second)
    );
}

#[test]
fn bad_lines_are_reported_with_their_numbers_and_the_rest_run() {
    let input = format!(
        "{}not json\n{{\"id\": \"q1\", \"query\": \"again\"}}\n{{\"id\": \"x\"}}\n{{\"id\": \"y\", \"query\": \"\"}}\n",
        queries(3)
    );
    let dir = workdir(FAST_SIM, &input);
    let strict = batch(dir.path(), &["--strict"]);
    assert_eq!(strict.status.code(), Some(2));
    let err = stderr(&strict);
    assert!(err.contains("in.jsonl:4: not JSON"), "{err}");
    assert!(
        err.contains("in.jsonl:5: the id \"q1\" was already used on line 2"),
        "{err}"
    );
    assert!(err.contains("in.jsonl:6: no \"query\""), "{err}");
    assert!(err.contains("in.jsonl:7: \"query\" is empty"), "{err}");
    assert!(err.contains("nothing was run (--strict)"), "{err}");
    assert!(results(dir.path()).is_empty());

    let out = batch(dir.path(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("in.jsonl:4: not JSON"));
    assert_eq!(unique_ids(&results(dir.path())).len(), 3);
}

#[test]
fn a_half_written_last_line_is_repaired_and_its_query_runs_again() {
    let dir = workdir(FAST_SIM, &queries(20));
    assert!(batch(dir.path(), &[]).status.success());
    // As a kill in the middle of a write leaves it: the last five results lost, and
    // half of the next one written.
    let path = dir.path().join("out.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let half = &lines[15][..lines[15].len() / 2];
    std::fs::write(&path, format!("{}\n{half}", lines[..15].join("\n"))).unwrap();

    let out = batch(dir.path(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("repaired out.jsonl: cut off a half-written last line"),
        "{err}"
    );
    assert!(err.contains("15 already in out.jsonl; 5 to run"), "{err}");
    assert_eq!(unique_ids(&results(dir.path())).len(), 20);
}

#[test]
fn retry_failed_reruns_exactly_the_failed_ids() {
    let runtime = mock_runtime();
    let failing = [3usize, 11, 17];
    let mock = start_mock(
        &runtime,
        MockOptions {
            script: failing
                .iter()
                .map(|i| MockScript {
                    matches: format!("Question number {i}?"),
                    first: 1_000,
                    fault: MockFault::Server,
                })
                .collect(),
            ..MockOptions::default()
        },
    );
    let dir = workdir(&mock_config(&mock.url()), &queries(20));
    let out = batch(dir.path(), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("3 requests did not meet min_successes; `--retry-failed`"));
    let failed: HashSet<String> = results(dir.path())
        .iter()
        .filter(|r| r["response"]["ok"] == false)
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(failed, failing.iter().map(|i| format!("q{i}")).collect());

    // Without --retry-failed, a rerun runs nothing and still says they failed.
    let again = batch(dir.path(), &[]);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("(3 failed; --retry-failed runs them again)"));

    // The upstream is healthy again: only the failed ids are sent.
    let healthy = start_mock(&runtime, MockOptions::default());
    std::fs::write(
        dir.path().join("metaorch.toml"),
        mock_config(&healthy.url()),
    )
    .unwrap();
    let retried = batch(dir.path(), &["--retry-failed"]);
    assert!(retried.status.success(), "{}", stderr(&retried));
    let asked: HashSet<usize> = healthy
        .requests()
        .iter()
        .filter_map(|r| question(r.body.as_ref().unwrap()))
        .collect();
    assert_eq!(asked, HashSet::from(failing));
    assert_eq!(
        healthy.requests().len(),
        9,
        "three agents for each of three ids"
    );
    let results = results(dir.path());
    assert_eq!(unique_ids(&results).len(), 20);
    assert!(results.iter().all(|r| r["response"]["ok"] == true));
}

/// kill -9 in the middle, then the same command again: every id once, and no call
/// for a query whose result was already written reaches the upstream again.
#[cfg(unix)]
#[test]
fn batch_resumes_after_kill_9_without_sending_finished_queries_again() {
    let runtime = mock_runtime();
    let mock = start_mock(
        &runtime,
        MockOptions {
            latency_min: Duration::from_millis(20),
            latency_max: Duration::from_millis(40),
            ..MockOptions::default()
        },
    );
    let dir = workdir(&mock_config(&mock.url()), &queries(200));
    let mut child = common::metaorch_command(
        dir.path(),
        &[
            "batch",
            "in.jsonl",
            "--out",
            "out.jsonl",
            "--in-flight",
            "4",
        ],
    )
    .env("MOCK_KEY", "test-key")
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let path = dir.path().join("out.jsonl");
    let lines = || {
        std::fs::read_to_string(&path)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    for _ in 0..2_000 {
        if lines() >= 40 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let written = lines();
    assert!(
        (40..200).contains(&written),
        "killed in the middle: {written} written"
    );
    // What the output held at the kill: those queries are finished.
    let finished: HashSet<usize> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|r| r["id"].as_str().unwrap()[1..].parse().unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let before = mock.requests().len();

    let out = batch(dir.path(), &["--in-flight", "8"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ids = unique_ids(&results(dir.path()));
    assert_eq!(ids.len(), 200);
    let records = mock.requests();
    let mut calls: HashMap<usize, usize> = HashMap::new();
    for r in &records[before..] {
        let q = question(r.body.as_ref().unwrap()).unwrap();
        assert!(
            !finished.contains(&q),
            "query {q} was finished before the kill and was sent again"
        );
        *calls.entry(q).or_default() += 1;
    }
    assert!(
        calls.len() >= 200 - finished.len(),
        "the rest ran: {} of {}",
        calls.len(),
        200 - finished.len()
    );
}

/// SIGTERM: no new request starts, the ones in flight are written, exit 130; the same
/// command then finishes the rest.
#[cfg(unix)]
#[test]
fn sigterm_finishes_the_requests_in_flight_and_the_rerun_the_rest() {
    let dir = workdir(
        "[providers.sim]\nkind = \"sim\"\nlatency_min = \"20ms\"\nlatency_max = \"40ms\"\n",
        &queries(200),
    );
    let child = common::metaorch_command(
        dir.path(),
        &[
            "batch",
            "in.jsonl",
            "--out",
            "out.jsonl",
            "--in-flight",
            "4",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let path = dir.path().join("out.jsonl");
    for _ in 0..2_000 {
        let n = std::fs::read_to_string(&path)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if n >= 20 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("stopping: no new requests"), "{err}");
    assert!(err.contains("run the same command again"), "{err}");
    let first = results(dir.path());
    assert!(first.len() < 200);
    assert!(first.iter().all(|r| r["response"]["ok"] == true));

    let rest = batch(dir.path(), &[]);
    assert!(rest.status.success(), "{}", stderr(&rest));
    assert_eq!(unique_ids(&results(dir.path())).len(), 200);
}
