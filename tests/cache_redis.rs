//! The Redis cache store against a real `redis-server` on 127.0.0.1 (no mocks): what
//! it keeps and for how long, sharing between instances, an outage (killed, frozen)
//! costing a call at most the timeout and healing by itself, credentials kept out of
//! every text, a corrupt value read as a miss.
//!
//! Each test starts its own server (`tests/common/redis.rs`); without `redis-server`
//! installed they print SKIPPED and pass, unless `METAORCH_REQUIRE_REDIS` or `CI` is set.

mod common;

use std::time::{Duration, Instant};

use common::redis::{RedisServer, skip};
use metaorch::cache::{CacheKey, CacheStore, CachedReply, Lookup, RedisStore, ResponseCache};
use metaorch::config::{CacheBackend, CacheConfig, Config};
use metaorch::mock_upstream::{MockOptions, MockUpstream};
use metaorch::orchestrator::BuildError;
use metaorch::provider::{CompletionRequest, Usage};
use metaorch::{Orchestrator, OutcomeStatus};

const TIMEOUT: Duration = Duration::from_millis(200);
const HOUR: Duration = Duration::from_secs(3600);

fn key(prompt: &str) -> CacheKey {
    CacheKey::of(
        "sim",
        &CompletionRequest {
            model: "sim-1".into(),
            prompt: prompt.into(),
            max_tokens: 64,
            ..CompletionRequest::default()
        },
    )
}

fn reply(text: &str) -> CachedReply {
    CachedReply {
        text: text.into(),
        stop_reason: Some("end_turn".into()),
        usage: Usage {
            input_tokens: 12,
            output_tokens: 34,
            ..Usage::default()
        },
    }
}

/// A plain connection to `redis`, to look at what the store wrote.
fn raw(redis: &RedisServer) -> redis::Connection {
    redis::Client::open(redis.url())
        .and_then(|c| c.get_connection())
        .expect("a plain connection to the test server")
}

/// Polls `f` every 20 ms until it returns `Some`, for at most `limit`.
async fn within<T>(limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(t) = f().await {
            return Some(t);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_reply_round_trips_as_json_under_its_namespaced_key_and_expires_with_its_ttl() {
    let Some(redis) = RedisServer::start() else {
        return skip(
            "a_reply_round_trips_as_json_under_its_namespaced_key_and_expires_with_its_ttl",
        );
    };
    let store = RedisStore::new(&redis.url(), "ttl-test", TIMEOUT).unwrap();
    assert_eq!(store.name(), "redis");
    let k = key("q");
    assert_eq!(store.get(&k).await.unwrap(), None);

    let written = Instant::now();
    store
        .put(&k, &reply("kept"), Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(store.get(&k).await.unwrap(), Some(reply("kept")));

    let mut raw = raw(&redis);
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut raw).unwrap();
    assert_eq!(keys, [format!("ttl-test:cache:v1:{k}")]);
    let value: String = redis::cmd("GET").arg(&keys[0]).query(&mut raw).unwrap();
    let parsed: CachedReply = serde_json::from_str(&value).expect("the value is a reply as JSON");
    assert_eq!(parsed, reply("kept"));
    let pttl: i64 = redis::cmd("PTTL").arg(&keys[0]).query(&mut raw).unwrap();
    assert!((1..=300).contains(&pttl), "PTTL {pttl}");

    let gone = within(Duration::from_secs(3), async || {
        store.get(&k).await.unwrap().is_none().then(Instant::now)
    })
    .await
    .expect("the reply expires within 3 s of a 300 ms TTL");
    assert!(
        gone - written >= Duration::from_millis(290),
        "expired after {:?}",
        gone - written
    );
}

#[tokio::test]
async fn two_stores_on_one_server_share_replies_within_a_namespace_only() {
    let Some(redis) = RedisServer::start() else {
        return skip("two_stores_on_one_server_share_replies_within_a_namespace_only");
    };
    // Two instances of a service: their own stores, their own connections.
    let a = RedisStore::new(&redis.url(), "team", TIMEOUT).unwrap();
    let b = RedisStore::new(&redis.url(), "team", TIMEOUT).unwrap();
    let other = RedisStore::new(&redis.url(), "other-team", TIMEOUT).unwrap();
    let k = key("shared");

    a.put(&k, &reply("from a"), HOUR).await.unwrap();
    assert_eq!(b.get(&k).await.unwrap(), Some(reply("from a")));
    assert_eq!(other.get(&k).await.unwrap(), None);

    b.put(&k, &reply("from b"), HOUR).await.unwrap();
    assert_eq!(a.get(&k).await.unwrap(), Some(reply("from b")));
    assert_eq!(a.get(&key("never written")).await.unwrap(), None);
}

#[tokio::test]
async fn a_killed_redis_fails_calls_fast_and_the_same_store_heals_after_restart() {
    let Some(mut redis) = RedisServer::start() else {
        return skip("a_killed_redis_fails_calls_fast_and_the_same_store_heals_after_restart");
    };
    let store = RedisStore::new(&redis.url(), "heal", TIMEOUT).unwrap();
    let k = key("q");
    store.put(&k, &reply("before"), HOUR).await.unwrap();

    redis.kill();
    let started = Instant::now();
    let error = store.get(&k).await.unwrap_err();
    assert!(
        started.elapsed() < TIMEOUT + Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
    assert!(error.to_string().contains(&redis.url()), "{error}");

    // Then it leaves the server alone: a hundred calls answer at once, none connects.
    let started = Instant::now();
    for _ in 0..100 {
        assert!(store.put(&k, &reply("during"), HOUR).await.is_err());
        assert!(store.get(&k).await.is_err());
    }
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "{:?}",
        started.elapsed()
    );

    redis.restart();
    // Healed within the pause (1 s, or 2 s if a try fell between kill and restart).
    let healed_in = within(Duration::from_secs(10), async || {
        store.get(&k).await.ok().map(|_| started.elapsed())
    })
    .await
    .expect("the store answers again within 10 s of the restart");
    println!("healed {healed_in:?} after the outage began");
    // The server came back empty (it keeps nothing); the store writes and reads again.
    assert_eq!(store.get(&k).await.unwrap(), None);
    store.put(&k, &reply("after"), HOUR).await.unwrap();
    assert_eq!(store.get(&k).await.unwrap(), Some(reply("after")));
}

#[tokio::test]
async fn a_restart_between_calls_costs_no_call() {
    let Some(mut redis) = RedisServer::start() else {
        return skip("a_restart_between_calls_costs_no_call");
    };
    let store = RedisStore::new(&redis.url(), "restart", TIMEOUT).unwrap();
    let k = key("q");
    store.put(&k, &reply("before"), HOUR).await.unwrap();
    redis.stop();
    redis.restart();
    // The dropped connection is noticed on the next call, which reconnects and
    // answers within the same call.
    assert_eq!(store.get(&k).await.unwrap(), None);
    store.put(&k, &reply("after"), HOUR).await.unwrap();
    assert_eq!(store.get(&k).await.unwrap(), Some(reply("after")));
}

#[tokio::test]
async fn a_frozen_redis_costs_a_call_at_most_the_timeout() {
    let Some(redis) = RedisServer::start() else {
        return skip("a_frozen_redis_costs_a_call_at_most_the_timeout");
    };
    let store = RedisStore::new(&redis.url(), "frozen", TIMEOUT).unwrap();
    let k = key("q");
    store.put(&k, &reply("kept"), HOUR).await.unwrap();

    redis.freeze();
    let started = Instant::now();
    let error = store.get(&k).await.unwrap_err();
    let took = started.elapsed();
    assert!(
        took >= TIMEOUT - Duration::from_millis(20) && took < TIMEOUT + Duration::from_millis(100),
        "{took:?}"
    );
    assert!(
        error.to_string().contains("did not answer within 200ms"),
        "{error}"
    );
    // Paused, the next calls do not wait at all.
    let started = Instant::now();
    assert!(store.get(&k).await.is_err());
    assert!(started.elapsed() < Duration::from_millis(10));

    redis.thaw();
    let found = within(Duration::from_secs(10), async || store.get(&k).await.ok())
        .await
        .expect("the store answers again within 10 s of the thaw");
    assert_eq!(found, Some(reply("kept")));
}

#[tokio::test]
async fn a_redis_down_at_start_is_used_once_it_is_up() {
    let Some(mut redis) = RedisServer::start() else {
        return skip("a_redis_down_at_start_is_used_once_it_is_up");
    };
    redis.kill();
    // Building the store does not connect: a server down at start delays nothing.
    let store = RedisStore::new(&redis.url(), "late", TIMEOUT).unwrap();
    assert!(store.get(&key("q")).await.is_err());
    redis.restart();
    let k = key("q");
    within(Duration::from_secs(10), async || {
        store.put(&k, &reply("late"), HOUR).await.ok()
    })
    .await
    .expect("the store connects within 10 s of the server starting");
    assert_eq!(store.get(&k).await.unwrap(), Some(reply("late")));
}

#[tokio::test]
async fn a_password_in_the_url_shows_in_no_debug_and_no_error() {
    const PASSWORD: &str = "s3cr3t-pw-Zq7";
    let Some(mut redis) = RedisServer::start_with(&["--requirepass", PASSWORD]) else {
        return skip("a_password_in_the_url_shows_in_no_debug_and_no_error");
    };
    let port = redis.port();
    let k = key("q");

    for url in [
        format!("redis://:{PASSWORD}@127.0.0.1:{port}"),
        format!("redis://default:{PASSWORD}@127.0.0.1:{port}/0"),
    ] {
        let store = RedisStore::new(&url, "auth", TIMEOUT).unwrap();
        store.put(&k, &reply("authorized"), HOUR).await.unwrap();
        assert_eq!(store.get(&k).await.unwrap(), Some(reply("authorized")));
        let debug = format!("{store:?}");
        assert!(!debug.contains(PASSWORD), "{debug}");
        assert!(
            debug.contains(&format!("redis://***@127.0.0.1:{port}")),
            "{debug}"
        );
    }

    let mut texts = Vec::new();
    let wrong = RedisStore::new(
        &format!("redis://default:wrong-pw-Kx9@127.0.0.1:{port}"),
        "auth",
        TIMEOUT,
    )
    .unwrap();
    texts.push(wrong.get(&k).await.unwrap_err().to_string());
    texts.push(format!("{wrong:?}"));

    let right = RedisStore::new(
        &format!("redis://:{PASSWORD}@127.0.0.1:{port}"),
        "auth",
        TIMEOUT,
    )
    .unwrap();
    right.get(&k).await.unwrap();
    redis.kill();
    texts.push(right.get(&k).await.unwrap_err().to_string());
    texts.push(
        right
            .put(&k, &reply("x"), HOUR)
            .await
            .unwrap_err()
            .to_string(),
    );
    texts.push(format!("{right:?}"));
    texts.push(
        RedisStore::new(&format!("redis://:{PASSWORD}@"), "auth", TIMEOUT)
            .unwrap_err()
            .to_string(),
    );

    for text in &texts {
        assert!(
            !text.contains(PASSWORD) && !text.contains("wrong-pw-Kx9"),
            "{text}"
        );
    }
    assert!(texts[0].contains("redis://***@127.0.0.1"), "{}", texts[0]);
}

#[tokio::test]
async fn a_value_that_is_not_a_reply_is_a_miss_said_once() {
    let Some(redis) = RedisServer::start() else {
        return skip("a_value_that_is_not_a_reply_is_a_miss_said_once");
    };
    let logs = common::Capture::global();
    let store = RedisStore::new(&redis.url(), "corrupt", TIMEOUT).unwrap();
    let mut raw = raw(&redis);
    let (k1, k2) = (key("one"), key("two"));
    let () = redis::cmd("SET")
        .arg(format!("corrupt:cache:v1:{k1}"))
        .arg("not json at all")
        .query(&mut raw)
        .unwrap();
    let () = redis::cmd("SET")
        .arg(format!("corrupt:cache:v1:{k2}"))
        .arg(r#"{"some":"other shape"}"#)
        .query(&mut raw)
        .unwrap();

    for _ in 0..3 {
        assert_eq!(store.get(&k1).await.unwrap(), None);
        assert_eq!(store.get(&k2).await.unwrap(), None);
    }
    let said = logs
        .lines()
        .into_iter()
        .filter(|l| l["event"] == "cache.corrupt")
        .count();
    assert_eq!(said, 1, "{}", logs.text());

    // The call's own reply replaces it.
    store.put(&k1, &reply("fresh"), HOUR).await.unwrap();
    assert_eq!(store.get(&k1).await.unwrap(), Some(reply("fresh")));
}

#[tokio::test]
async fn the_response_cache_reads_an_outage_as_misses_and_says_so_once_each_way() {
    let Some(mut redis) = RedisServer::start() else {
        return skip("the_response_cache_reads_an_outage_as_misses_and_says_so_once_each_way");
    };
    let logs = common::Capture::global();
    let url = redis.url();
    let store = RedisStore::new(&url, "outage", TIMEOUT).unwrap();
    let cache = ResponseCache::new(std::sync::Arc::new(store), HOUR);
    assert_eq!(cache.store_name(), "redis");
    let k = key("q");
    let Lookup::Miss(flight) = cache.lookup(&k).await else {
        panic!("an empty store misses");
    };
    drop(flight);
    cache.store(&k, &reply("kept")).await;
    assert!(matches!(cache.lookup(&k).await, Lookup::Hit(r) if r == reply("kept")));

    redis.kill();
    for _ in 0..20 {
        let Lookup::Miss(flight) = cache.lookup(&k).await else {
            panic!("a store that is down is a miss");
        };
        drop(flight);
        cache.store(&k, &reply("during")).await;
    }
    redis.restart();
    within(Duration::from_secs(10), async || {
        match cache.lookup(&k).await {
            Lookup::Miss(flight) => {
                drop(flight);
                logs.text().contains("cache.recovered").then_some(())
            }
            _ => None,
        }
    })
    .await
    .expect("the cache recovers within 10 s of the restart");

    let events: Vec<String> = logs
        .lines()
        .into_iter()
        .filter(|l| l["store"] == "redis")
        .filter_map(|l| l["event"].as_str().map(str::to_owned))
        .filter(|e| e == "cache.unavailable" || e == "cache.recovered")
        .collect();
    assert_eq!(
        events,
        ["cache.unavailable", "cache.recovered"],
        "{}",
        logs.text()
    );
    let unavailable = logs
        .lines()
        .into_iter()
        .find(|l| l["event"] == "cache.unavailable")
        .unwrap();
    assert!(
        unavailable["message"].as_str().unwrap().contains(&url),
        "{unavailable}"
    );
}

/// A config of six fast `sim` agents whose cache is the Redis at `url`.
fn redis_config(url: &str, namespace: &str) -> String {
    format!(
        r#"
[providers.sim]
kind = "sim"
latency_min = "5ms"
latency_max = "20ms"

[cache]
backend = "redis"
url = "{url}"
namespace = "{namespace}"
timeout = "200ms"
"#
    )
}

/// `metaorch run --format json ARGS…` in `dir`: the document, and what went to
/// stderr (the log).
fn run_json(dir: &std::path::Path, args: &[&str]) -> (serde_json::Value, String) {
    let out = common::metaorch_command(dir, &[&["run", "--format", "json"], args].concat())
        .output()
        .expect("the metaorch binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let doc = serde_json::from_slice(&out.stdout).expect("run prints one JSON document");
    (doc, stderr)
}

#[test]
fn run_answers_with_its_redis_cache_down() {
    // Nobody listens on this port: the cache fails open and every agent answers.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("metaorch.toml"),
        redis_config(&format!("redis://:pw-Yt5@127.0.0.1:{port}"), "down"),
    )
    .unwrap();
    let started = Instant::now();
    let (doc, log) = run_json(dir.path(), &["--log-level", "info", "q"]);
    assert_eq!(doc["summary"]["succeeded"], 6, "{doc}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(log.matches("cache.unavailable").count(), 1, "{log}");
    assert!(
        log.contains(&format!("redis://***@127.0.0.1:{port}")),
        "{log}"
    );
    assert!(
        !doc.to_string().contains("pw-Yt5") && !log.contains("pw-Yt5"),
        "{log}"
    );
}

#[test]
fn two_runs_share_replies_through_redis() {
    let Some(redis) = RedisServer::start() else {
        return skip("two_runs_share_replies_through_redis");
    };
    // Two processes, as two instances of a service: the second is answered by the
    // first one's replies.
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for dir in [&one, &two] {
        std::fs::write(
            dir.path().join("metaorch.toml"),
            redis_config(&redis.url(), "two-runs"),
        )
        .unwrap();
    }
    // The same seed: a simulated reply depends on it, and so does its key.
    let (first, _) = run_json(one.path(), &["--seed", "7", "What is shared?"]);
    let (second, _) = run_json(two.path(), &["--seed", "7", "What is shared?"]);
    for (doc, cached) in [(&first, false), (&second, true)] {
        let outcomes = doc["outcomes"].as_array().unwrap();
        assert_eq!(outcomes.len(), 6, "{doc}");
        for outcome in outcomes {
            assert_eq!(outcome["status"], "succeeded", "{outcome}");
            assert_eq!(
                outcome["cached"].as_bool() == Some(true),
                cached,
                "{outcome}"
            );
        }
    }
    let mut raw = raw(&redis);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("two-runs:cache:v1:*")
        .query(&mut raw)
        .unwrap();
    assert!(keys.len() >= 6, "{keys:?}");
}

/// Three agents on Anthropic's wire format at `upstream`, cached in the Redis at `url`.
fn orchestrator(upstream: &str, url: &str, namespace: &str) -> Orchestrator {
    let mut toml = format!(
        "[cache]\nbackend = \"redis\"\nurl = \"{url}\"\nnamespace = \"{namespace}\"\n\
         [providers.claude]\nkind = \"anthropic\"\nbase_url = \"{upstream}\"\n"
    );
    for id in ["a", "b", "c"] {
        toml.push_str(&format!(
            "[[agents]]\nid = \"{id}\"\nprovider = \"claude\"\nmodel = \"claude-haiku-4-5\"\nprompt = \"As {id}: {{query}}\"\n"
        ));
    }
    Orchestrator::builder()
        .config(Config::from_toml_str(&toml, "test.toml").unwrap())
        .env(|name| (name == "ANTHROPIC_API_KEY").then(|| "sk-test-key".to_owned()))
        .build()
        .unwrap()
}

#[tokio::test]
async fn two_orchestrators_share_hits_through_redis() {
    let Some(redis) = RedisServer::start() else {
        return skip("two_orchestrators_share_hits_through_redis");
    };
    let mock = MockUpstream::start(([127, 0, 0, 1], 0).into(), MockOptions::default())
        .await
        .unwrap();
    // Two instances: their own executors, in-flight tables and connections; one Redis.
    let one = orchestrator(&mock.url(), &redis.url(), "shared");
    let two = orchestrator(&mock.url(), &redis.url(), "shared");
    let first = one.process("What is shared?").await.unwrap();
    assert!(first.outcomes.iter().all(|o| !o.cached));
    assert_eq!(mock.requests().len(), 3);

    let second = two.process("What is shared?").await.unwrap();
    assert_eq!(
        mock.requests().len(),
        3,
        "the second instance calls no upstream"
    );
    for (a, b) in first.outcomes.iter().zip(&second.outcomes) {
        assert!(b.cached, "{} was not cached", b.agent_id);
        assert_eq!(b.status, OutcomeStatus::Succeeded);
        assert_eq!(a.output, b.output);
    }
    // Another namespace shares nothing.
    let other = orchestrator(&mock.url(), &redis.url(), "other");
    other.process("What is shared?").await.unwrap();
    assert_eq!(mock.requests().len(), 6);
}

#[test]
fn a_url_redis_cannot_use_fails_the_build_and_a_redis_down_does_not() {
    let build = |url: &str| {
        let mut config = Config::embedded();
        config.cache = Some(CacheConfig {
            backend: CacheBackend::Redis { url: url.into() },
            ..CacheConfig::default()
        });
        Orchestrator::builder().config(config).build()
    };
    // Nobody listens on port 1: building does not connect.
    assert!(build("redis://:pw-Qm3@127.0.0.1:1/0").is_ok());
    let error = build("redis://:pw-Qm3@127.0.0.1:1/not-a-db").unwrap_err();
    assert!(matches!(error, BuildError::CacheUrl(_)), "{error:?}");
    let text = format!("{:#}", anyhow::Error::from(error.clone()));
    assert!(
        text.starts_with(
            "cache.url cannot be used: redis://***@127.0.0.1:1/not-a-db is not a Redis URL"
        ),
        "{text}"
    );
    assert!(
        !text.contains("pw-Qm3") && !format!("{error:?}").contains("pw-Qm3"),
        "{text}"
    );
}

/// A TCP proxy on 127.0.0.1 that holds each connection for `delay` before passing it
/// on to `port`: a server far away, whose connect takes longer than a call may wait.
async fn slow_proxy(port: u16, delay: Duration) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let mut server = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    proxy_port
}

#[tokio::test]
async fn a_connect_slower_than_the_timeout_finishes_for_the_calls_after_it() {
    let Some(redis) = RedisServer::start() else {
        return skip("a_connect_slower_than_the_timeout_finishes_for_the_calls_after_it");
    };
    let proxy = slow_proxy(redis.port(), Duration::from_millis(300)).await;
    let timeout = Duration::from_millis(100);
    let store = RedisStore::new(&format!("redis://127.0.0.1:{proxy}"), "far", timeout).unwrap();
    let k = key("q");

    let started = Instant::now();
    let error = store.get(&k).await.unwrap_err();
    assert!(
        started.elapsed() < timeout + Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
    assert!(
        error.to_string().contains("did not answer within 100ms"),
        "{error}"
    );
    // The connect goes on without the call, and ends the pause when it is made.
    let answered = within(Duration::from_secs(5), async || store.get(&k).await.ok())
        .await
        .expect("the store answers once its connect is made");
    assert_eq!(answered, None);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    store.put(&k, &reply("far"), HOUR).await.unwrap();
    assert_eq!(store.get(&k).await.unwrap(), Some(reply("far")));
}
