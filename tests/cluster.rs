//! Several `serve` instances, one account: rate limits, the cap on calls in flight and
//! `Retry-After` pauses shared through a real `redis-server`, against `mock-upstream`
//! enforcing the account's limits; Redis stopped and restarted under them.

mod common;

use std::io::BufRead;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use common::redis::{RedisServer, skip};
use metaorch::mock_upstream::{MockFault, MockOptions, MockScript, MockUpstream};
use metaorch::provider::AccountLimits;
use serde_json::{Value, json};

/// A `serve` process, killed when dropped.
struct Served {
    child: Child,
    url: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three agents on an Anthropic-compatible `upstream`, sharing limits through
/// `redis` under `namespace`; `flow` and `extra` are added as they are.
fn config(upstream: &str, redis: &str, namespace: &str, flow: &str, extra: &str) -> String {
    let mut config = format!(
        "request_timeout = \"30s\"\n[defaults.retry]\nmax_attempts = 4\ninitial_delay = \"50ms\"\nmax_delay = \"200ms\"\n\
         [providers.mock]\nkind = \"anthropic\"\nbase_url = \"{upstream}\"\napi_key_env = \"MOCK_KEY\"\n\
         [providers.mock.flow]\n{flow}\n\
         [redis]\nurl = \"{redis}\"\nnamespace = \"{namespace}\"\n{extra}\n"
    );
    for id in ["alpha", "beta", "gamma"] {
        config.push_str(&format!(
            "[[agents]]\nid = \"{id}\"\nrole = \"{id}\"\nprovider = \"mock\"\nmodel = \"claude-haiku-4-5\"\nprompt = \"{id} on: {{query}}\"\n"
        ));
    }
    config
}

fn serve(dir: &Path) -> Served {
    let (child, url, stderr) = common::spawn_serve(dir, &[("MOCK_KEY", "test-key")]);
    // The rest of its log is read (and dropped) so that it never blocks on a pipe.
    std::thread::spawn(move || for _ in stderr.lines() {});
    Served { child, url }
}

fn instance(config: &str) -> (tempfile::TempDir, Served) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("metaorch.toml"), config).unwrap();
    let served = serve(dir.path());
    (dir, served)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A mock answering in 5–15 ms, enforcing `limits`.
fn limited_mock(runtime: &tokio::runtime::Runtime, limits: AccountLimits) -> MockUpstream {
    mock(
        runtime,
        MockOptions {
            latency_min: Duration::from_millis(5),
            latency_max: Duration::from_millis(15),
            limits,
            ..MockOptions::default()
        },
    )
}

fn mock(runtime: &tokio::runtime::Runtime, options: MockOptions) -> MockUpstream {
    runtime
        .block_on(MockUpstream::start(([127, 0, 0, 1], 0).into(), options))
        .unwrap()
}

/// Keeps `clients` requests in flight on each of `urls` until `until`; returns how
/// many came back 200.
async fn load(urls: &[String], clients: usize, until: Instant) -> usize {
    let client = reqwest::Client::new();
    let mut tasks = tokio::task::JoinSet::new();
    for url in urls {
        for c in 0..clients {
            let (client, url) = (client.clone(), url.clone());
            tasks.spawn(async move {
                let mut ok = 0;
                let mut i = 0;
                while Instant::now() < until {
                    i += 1;
                    let r = client
                        .post(format!("{url}/v1/orchestrate"))
                        .json(&json!({"query": format!("client {c} question {i}")}))
                        .send()
                        .await;
                    if r.is_ok_and(|r| r.status() == 200) {
                        ok += 1;
                    }
                }
                ok
            });
        }
    }
    let mut ok = 0;
    while let Some(done) = tasks.join_next().await {
        ok += done.unwrap();
    }
    ok
}

async fn cluster(url: &str) -> Value {
    reqwest::get(format!("{url}/v1/cluster"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Seconds since the epoch of a mock record's RFC 3339 timestamp.
fn at(record: &metaorch::mock_upstream::RequestRecord) -> f64 {
    humantime::parse_rfc3339(&record.timestamp)
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Two instances under one limit of 20 requests a second, against an upstream that
/// enforces it: after a second of warm-up, no window of a second sees more than the
/// limit and one lease, no 429 comes back, and most of the rate is used.
#[test]
fn two_instances_stay_under_one_shared_rate_limit() {
    let Some(redis) = RedisServer::start() else {
        return skip("two_instances_stay_under_one_shared_rate_limit");
    };
    let rt = runtime();
    let upstream = limited_mock(
        &rt,
        AccountLimits {
            rps: Some(20.0),
            ..AccountLimits::default()
        },
    );
    let config = config(&upstream.url(), &redis.url(), "rate", "rpm = 1200", "");
    let (_a_dir, a) = instance(&config);
    let (_b_dir, b) = instance(&config);
    let started = Instant::now();
    let ok = rt.block_on(load(
        &[a.url.clone(), b.url.clone()],
        6,
        started + Duration::from_secs(5),
    ));
    assert!(ok > 0);
    let records = upstream.requests();
    let t0 = records.iter().map(at).fold(f64::INFINITY, f64::min);
    let warm: Vec<_> = records.iter().filter(|r| at(r) >= t0 + 1.0).collect();
    let refused = warm.iter().filter(|r| r.status == 429).count();
    assert_eq!(refused, 0, "429s after warm-up");
    let mut windows = std::collections::BTreeMap::<u64, usize>::new();
    for r in &warm {
        *windows.entry((at(r) - t0) as u64).or_default() += 1;
    }
    // Whole windows only (not the last, cut by the end of the load).
    let whole: Vec<usize> = windows.values().copied().take(3).collect();
    assert!(
        whole.iter().all(|&n| n <= 20 + 5),
        "at most 20 a second and one lease: {windows:?}"
    );
    assert!(
        whole.iter().all(|&n| n >= 15),
        "the shared rate is used, not starved: {windows:?}"
    );
}

/// One instance gets `Retry-After: 3`: for those three seconds neither it nor the other
/// sends anything to that provider; then both finish their requests.
#[test]
fn one_instances_retry_after_pauses_every_instance() {
    let Some(redis) = RedisServer::start() else {
        return skip("one_instances_retry_after_pauses_every_instance");
    };
    let rt = runtime();
    let upstream = mock(
        &rt,
        MockOptions {
            latency_min: Duration::from_millis(5),
            latency_max: Duration::from_millis(10),
            retry_after: Duration::from_secs(3),
            script: vec![MockScript {
                matches: "PAUSE-ME".into(),
                first: 1,
                fault: MockFault::RateLimited,
            }],
            ..MockOptions::default()
        },
    );
    let config = config(&upstream.url(), &redis.url(), "pause", "", "");
    let (_a_dir, a) = instance(&config);
    let (_b_dir, b) = instance(&config);
    let statuses = rt.block_on(async {
        // Both instances have synced once (their lanes are attached and subscribed).
        for url in [&a.url, &b.url] {
            let r = reqwest::Client::new()
                .post(format!("{url}/v1/orchestrate"))
                .json(&json!({"query": "warm up"}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
        let a_url = a.url.clone();
        let paused = tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{a_url}/v1/orchestrate"))
                .json(&json!({"query": "PAUSE-ME please"}))
                .send()
                .await
                .unwrap()
                .status()
        });
        for _ in 0..500 {
            if upstream.requests().iter().any(|r| r.status == 429) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let client = reqwest::Client::new();
        let mut others = Vec::new();
        for i in 0..3 {
            let (client, url) = (client.clone(), b.url.clone());
            others.push(tokio::spawn(async move {
                client
                    .post(format!("{url}/v1/orchestrate"))
                    .json(&json!({"query": format!("meanwhile {i}")}))
                    .send()
                    .await
                    .unwrap()
                    .status()
            }));
        }
        let mut statuses = vec![paused.await.unwrap()];
        for o in others {
            statuses.push(o.await.unwrap());
        }
        statuses
    });
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let records = upstream.requests();
    let t429 = records
        .iter()
        .filter(|r| r.status == 429)
        .map(at)
        .fold(f64::INFINITY, f64::min);
    let during: Vec<f64> = records
        .iter()
        .map(at)
        .filter(|&t| t > t429 + 0.2 && t < t429 + 2.9)
        .map(|t| t - t429)
        .collect();
    assert!(
        during.is_empty(),
        "calls sent during the pause, at {during:?} s after the 429"
    );
    assert!(
        records.iter().map(at).any(|t| t >= t429 + 2.9),
        "the calls went once the pause ended"
    );
}

/// kill -9 an instance holding part of the cap on calls in flight: the survivor gets
/// the whole cap back within the lease.
#[cfg(unix)]
#[test]
fn a_killed_instances_part_of_the_cap_comes_back_within_the_lease() {
    let Some(redis) = RedisServer::start() else {
        return skip("a_killed_instances_part_of_the_cap_comes_back_within_the_lease");
    };
    let rt = runtime();
    let upstream = mock(
        &rt,
        MockOptions {
            latency_min: Duration::from_millis(300),
            latency_max: Duration::from_millis(400),
            limits: AccountLimits {
                max_concurrent: Some(4),
                ..AccountLimits::default()
            },
            ..MockOptions::default()
        },
    );
    let config = config(
        &upstream.url(),
        &redis.url(),
        "cap",
        "max_concurrency = 4",
        "lease = \"1s\"",
    );
    let (_a_dir, mut a) = instance(&config);
    let (_b_dir, b) = instance(&config);
    let (urls, b_url) = (vec![a.url.clone(), b.url.clone()], b.url.clone());
    let load =
        rt.spawn(async move { load(&urls, 4, Instant::now() + Duration::from_secs(6)).await });
    let (before, regained) = rt.block_on(async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = cluster(&b_url).await;
        a.child.kill().unwrap();
        let killed = Instant::now();
        loop {
            let now = cluster(&b_url).await;
            if now["lanes"][0]["in_flight_allowed"] == 4 {
                break (before, killed.elapsed());
            }
            assert!(killed.elapsed() < Duration::from_secs(3), "{now}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    rt.block_on(load).unwrap();
    let allowed = before["lanes"][0]["in_flight_allowed"].as_u64().unwrap();
    assert!(allowed <= 3, "the cap was shared before the kill: {before}");
    assert_eq!(before["instances"].as_array().unwrap().len(), 2, "{before}");
    assert!(
        regained < Duration::from_millis(1_500),
        "the whole cap came back in {regained:?}, the lease being 1 s"
    );
    let over = upstream
        .requests()
        .iter()
        .filter(|r| r.limited_by == Some("max_concurrent"))
        .count();
    assert_eq!(over, 0, "the upstream never saw more than 4 in flight");
}

/// Redis stopped under load: both instances keep answering at their local share
/// (half of the limit each), say so, and share again once Redis is back.
#[test]
fn with_redis_down_each_instance_keeps_its_share_and_shares_again_after() {
    let Some(mut redis) = RedisServer::start() else {
        return skip("with_redis_down_each_instance_keeps_its_share_and_shares_again_after");
    };
    let rt = runtime();
    let upstream = limited_mock(&rt, AccountLimits::default());
    let config = config(
        &upstream.url(),
        &redis.url(),
        "down",
        "rpm = 1200",
        "lease = \"1s\"\ntimeout = \"50ms\"",
    );
    let (_a_dir, a) = instance(&config);
    let (_b_dir, b) = instance(&config);
    let urls = vec![a.url.clone(), b.url.clone()];
    let shared = rt.block_on(async {
        load(&urls, 3, Instant::now() + Duration::from_secs(1)).await;
        cluster(&a.url).await
    });
    assert_eq!(shared["state"], "shared", "{shared}");
    assert_eq!(shared["instances"].as_array().unwrap().len(), 2, "{shared}");

    redis.stop();
    let stopped = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let (ok, local) = rt.block_on(async {
        let ok = load(&urls, 3, Instant::now() + Duration::from_secs(3)).await;
        (ok, cluster(&b.url).await)
    });
    let during = upstream
        .requests()
        .iter()
        .filter(|r| (stopped..stopped + 3.0).contains(&at(r)))
        .count();
    assert!(ok > 0, "requests are answered with Redis down");
    assert_eq!(local["state"], "local", "{local}");
    assert_eq!(local["lanes"][0]["local_share"], 0.5, "{local}");
    // Each keeps 10 a second: 60 in 3 s over both, and a little for the switch.
    assert!(
        (40..=66).contains(&during),
        "{during} calls in 3 s at half of 20/s each"
    );

    redis.restart();
    let back = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            load(&urls, 1, Instant::now() + Duration::from_millis(300)).await;
            let now = cluster(&a.url).await;
            if now["state"] == "shared" || Instant::now() > deadline {
                break now;
            }
        }
    });
    assert_eq!(back["state"], "shared", "{back}");
}

/// A shared rate below one call per lease horizon (here 2 a second, one every 500 ms)
/// is still granted, one call at a time, and two instances together keep to it.
#[test]
fn a_small_shared_rate_is_granted_one_call_at_a_time() {
    let Some(redis) = RedisServer::start() else {
        return skip("a_small_shared_rate_is_granted_one_call_at_a_time");
    };
    let rt = runtime();
    let upstream = limited_mock(
        &rt,
        AccountLimits {
            rpm: Some(120),
            ..AccountLimits::default()
        },
    );
    let config = config(&upstream.url(), &redis.url(), "small", "rpm = 120", "");
    let (_a_dir, a) = instance(&config);
    let (_b_dir, b) = instance(&config);
    let ok = rt.block_on(load(
        &[a.url.clone(), b.url.clone()],
        1,
        Instant::now() + Duration::from_secs(4),
    ));
    let records = upstream.requests();
    let refused = records.iter().filter(|r| r.status == 429).count();
    let served = records.iter().filter(|r| r.status == 200).count();
    assert!(ok >= 1, "requests are answered");
    assert_eq!(refused, 0, "{records:?}");
    assert!(served >= 6, "{served} calls at 2/s in 4 s and more");
    // Evenly paced: no second holds more than the rate and one call.
    let mut times: Vec<f64> = records.iter().map(at).collect();
    times.sort_by(f64::total_cmp);
    let busiest = times
        .iter()
        .map(|&t| times.iter().filter(|&&u| u >= t && u < t + 1.0).count())
        .max()
        .unwrap_or(0);
    assert!(busiest <= 3, "{busiest} calls within one second: {times:?}");
}

/// A Redis that stops answering (frozen, not gone): every sync gives up at
/// `redis.timeout`, the instance keeps answering at its local share, and shares again
/// once Redis answers.
#[cfg(unix)]
#[test]
fn a_frozen_redis_costs_requests_nothing_and_sharing_resumes_after() {
    let Some(redis) = RedisServer::start() else {
        return skip("a_frozen_redis_costs_requests_nothing_and_sharing_resumes_after");
    };
    let rt = runtime();
    let upstream = limited_mock(&rt, AccountLimits::default());
    let config = config(
        &upstream.url(),
        &redis.url(),
        "frozen",
        "rpm = 6000",
        "lease = \"1s\"\ntimeout = \"50ms\"",
    );
    let (_dir, a) = instance(&config);
    let urls = vec![a.url.clone()];
    let shared = rt.block_on(async {
        load(&urls, 2, Instant::now() + Duration::from_millis(500)).await;
        cluster(&a.url).await
    });
    assert_eq!(shared["state"], "shared", "{shared}");

    redis.freeze();
    let (ok, local) = rt.block_on(async {
        let started = Instant::now();
        let ok = load(&urls, 2, started + Duration::from_secs(2)).await;
        (ok, cluster(&a.url).await)
    });
    assert!(ok >= 20, "{ok} requests answered in 2 s with Redis frozen");
    assert_eq!(local["state"], "local", "{local}");
    assert!(
        local["error"]
            .as_str()
            .unwrap()
            .contains("did not answer within 50ms (redis.timeout)"),
        "{local}"
    );

    redis.thaw();
    let back = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            load(&urls, 1, Instant::now() + Duration::from_millis(300)).await;
            let now = cluster(&a.url).await;
            if now["state"] == "shared" || Instant::now() > deadline {
                break now;
            }
        }
    });
    assert_eq!(back["state"], "shared", "{back}");
}
