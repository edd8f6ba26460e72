//! The response cache in memory: repeats answered without the upstream, keys that
//! change with the answer, single-flight with takeover, expiry on the paused clock,
//! and nothing but successes stored.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use metaorch::config::Config;
use metaorch::mock_upstream::{MockFault, MockOptions, MockScript, MockUpstream};
use metaorch::{Orchestrator, OutcomeStatus, Request};

async fn mock(latency_ms: u64, script: Vec<MockScript>) -> MockUpstream {
    MockUpstream::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        MockOptions {
            latency_min: Duration::from_millis(latency_ms),
            latency_max: Duration::from_millis(latency_ms),
            seed: 9,
            script,
            ..MockOptions::default()
        },
    )
    .await
    .expect("the mock binds an ephemeral port")
}

/// Three agents on Anthropic's wire format at `url`, with `[cache]` and `extra`.
fn config(url: &str, extra: &str) -> Config {
    let mut toml = format!(
        "[cache]\n{extra}\n[providers.claude]\nkind = \"anthropic\"\nbase_url = \"{url}\"\n"
    );
    for id in ["a", "b", "c"] {
        toml.push_str(&format!(
            "[[agents]]\nid = \"{id}\"\nprovider = \"claude\"\nmodel = \"claude-haiku-4-5\"\nprompt = \"As {id}: {{query}}\"\nretry = {{ max_attempts = 1 }}\n"
        ));
    }
    Config::from_toml_str(&toml, "test.toml").unwrap()
}

fn orchestrator(config: Config) -> Orchestrator {
    Orchestrator::builder()
        .config(config)
        .env(|name| (name == "ANTHROPIC_API_KEY").then(|| "sk-secret-test-key".to_owned()))
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_repeat_is_answered_from_the_cache_without_the_upstream() {
    let mock = mock(2, Vec::new()).await;
    let orchestrator = orchestrator(config(&mock.url(), ""));
    let first = orchestrator.process("Is it cached?").await.unwrap();
    assert!(first.outcomes.iter().all(|o| !o.cached));
    assert_eq!(mock.requests().len(), 3);
    let second = orchestrator.process("Is it cached?").await.unwrap();
    assert_eq!(mock.requests().len(), 3, "no upstream call for the repeat");
    assert_eq!(second.answer, first.answer);
    for (a, b) in first.outcomes.iter().zip(&second.outcomes) {
        assert!(b.cached, "{} was not cached", b.agent_id);
        assert_eq!(b.status, OutcomeStatus::Succeeded);
        assert_eq!(a.output, b.output);
        assert_eq!(b.attempts, 0);
        assert_eq!(b.usage.total_tokens(), 0, "a hit uses no tokens");
        assert_eq!(b.cost_usd, Some(0.0), "and costs nothing");
    }
    let json = serde_json::to_value(&second).unwrap();
    assert_eq!(json["outcomes"][0]["cached"], true);
    assert_eq!(
        serde_json::to_value(&first).unwrap()["outcomes"][0]["cached"],
        false
    );
    // Another query is another key.
    orchestrator.process("Something else?").await.unwrap();
    assert_eq!(mock.requests().len(), 6);
}

#[tokio::test]
async fn what_changes_the_answer_misses_and_no_secret_is_in_a_key() {
    let mock = mock(1, Vec::new()).await;
    let base = config(&mock.url(), "");
    orchestrator(base.clone()).process("q").await.unwrap();
    assert_eq!(mock.requests().len(), 3);
    // One cache per orchestrator: the same config again shares nothing with the first,
    // so build variants on one orchestrator each and count the calls they make.
    for change in [
        |c: &mut Config| c.agents[0].temperature = Some(0.9),
        |c: &mut Config| c.agents[0].model = "claude-sonnet-4-5".into(),
        |c: &mut Config| c.agents[0].system = Some("Be brief.".into()),
        |c: &mut Config| c.agents[0].max_tokens = 77,
    ] {
        let mut changed = base.clone();
        change(&mut changed);
        let o = orchestrator(changed);
        o.process("q").await.unwrap();
        let before = mock.requests().len();
        // Within this orchestrator the repeat hits for every agent.
        o.process("q").await.unwrap();
        assert_eq!(mock.requests().len(), before);
        // A different prompt misses.
        o.process("q2").await.unwrap();
        assert_eq!(mock.requests().len(), before + 3);
    }
    let provider =
        metaorch::provider::AnthropicProvider::new(metaorch::provider::AnthropicOptions {
            base_url: mock.url(),
            api_key: Some(metaorch::provider::Secret::new("sk-secret-test-key")),
            ..Default::default()
        });
    let identity = metaorch::provider::Provider::identity(&provider);
    assert!(!identity.contains("sk-secret"), "{identity}");
    assert!(identity.contains(&mock.url()), "{identity}");
}

#[tokio::test]
async fn failures_are_not_cached() {
    let mock = mock(
        1,
        vec![MockScript {
            matches: "As a:".to_owned(),
            first: 1,
            fault: MockFault::Server,
        }],
    )
    .await;
    let orchestrator = orchestrator(config(&mock.url(), ""));
    let first = orchestrator.process("q").await.unwrap();
    assert_eq!(first.outcome("a").unwrap().status, OutcomeStatus::Failed);
    let second = orchestrator.process("q").await.unwrap();
    let a = second.outcome("a").unwrap();
    assert_eq!(a.status, OutcomeStatus::Succeeded);
    assert!(!a.cached, "the failure was not stored: a new call was made");
    assert!(second.outcome("b").unwrap().cached);
    assert_eq!(mock.requests().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_calls_in_flight_share_one_upstream_call() {
    let mock = mock(200, Vec::new()).await;
    let orchestrator = orchestrator(config(&mock.url(), ""));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let o = orchestrator.clone();
        set.spawn(async move { o.process("same question").await.unwrap() });
    }
    let mut answers = Vec::new();
    while let Some(r) = set.join_next().await {
        answers.push(r.unwrap());
    }
    assert_eq!(answers.len(), 20);
    assert_eq!(mock.requests().len(), 3, "one upstream call per agent");
    assert!(
        answers
            .iter()
            .all(|a| a.ok && a.answer == answers[0].answer)
    );
    let shared = answers
        .iter()
        .flat_map(|a| &a.outcomes)
        .filter(|o| o.cached)
        .count();
    assert_eq!(
        shared,
        19 * 3,
        "every follower's outcome says it was not its own call"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_takes_over_when_the_leaders_request_is_cancelled() {
    let mock = mock(300, Vec::new()).await;
    let orchestrator = orchestrator(config(&mock.url(), ""));
    let cancel = tokio_util::sync::CancellationToken::new();
    let leader = {
        let o = orchestrator.clone();
        let request = Request::new("takeover").with_cancel(cancel.clone());
        tokio::spawn(async move { o.process_request(request).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let o = orchestrator.clone();
            tokio::spawn(async move { o.process("takeover").await.unwrap() })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    cancel.cancel();
    let cancelled = leader.await.unwrap();
    assert!(
        cancelled
            .outcomes
            .iter()
            .all(|o| o.status == OutcomeStatus::TimedOut)
    );
    let mut own_calls = 0;
    for w in waiters {
        let answer = tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .expect("no waiter hangs")
            .unwrap();
        assert!(answer.ok);
        assert!(
            answer
                .outcomes
                .iter()
                .all(|o| o.status == OutcomeStatus::Succeeded)
        );
        own_calls += answer.outcomes.iter().filter(|o| !o.cached).count();
    }
    // The leader's calls were cut; for each agent one waiter took over and made the
    // call, and the other two waited for it.
    assert_eq!(own_calls, 3);
    let answered: usize = mock.requests().iter().filter(|r| r.status == 200).count();
    assert_eq!(answered, 3, "one finished upstream call per agent");
}

#[tokio::test(start_paused = true)]
async fn entries_expire_after_the_ttl() {
    let config = Config::from_toml_str(
        "[cache]\nttl = \"10m\"\n[providers.sim]\nkind = \"sim\"\nlatency_min = \"10ms\"\nlatency_max = \"10ms\"\n[[agents]]\nid = \"a\"\nprovider = \"sim\"\n[[agents]]\nid = \"b\"\nprovider = \"sim\"\ncache = false\n",
        "t.toml",
    )
    .unwrap();
    let orchestrator = Orchestrator::builder().config(config).build().unwrap();
    orchestrator.process("q").await.unwrap();
    let hit = orchestrator.process("q").await.unwrap();
    assert!(hit.outcome("a").unwrap().cached);
    assert!(
        !hit.outcome("b").unwrap().cached,
        "cache = false on the agent"
    );
    tokio::time::advance(Duration::from_secs(9 * 60)).await;
    assert!(
        orchestrator
            .process("q")
            .await
            .unwrap()
            .outcome("a")
            .unwrap()
            .cached
    );
    tokio::time::advance(Duration::from_secs(2 * 60)).await;
    let expired = orchestrator.process("q").await.unwrap();
    assert!(!expired.outcome("a").unwrap().cached, "past the ttl");
}

#[test]
fn the_cache_is_off_unless_configured_and_its_keys_are_checked() {
    let plain =
        Config::from_toml_str("[[agents]]\nid = \"a\"\nprovider = \"sim\"\n", "t.toml").unwrap();
    assert!(plain.cache.is_none());
    assert!(!plain.agents[0].cache);
    let asked = Config::from_toml_str(
        "[[agents]]\nid = \"a\"\nprovider = \"sim\"\ncache = true\n",
        "t.toml",
    )
    .unwrap();
    assert!(
        asked.cache.is_some(),
        "an agent that asks gets a memory cache"
    );
    let off = Config::from_toml_str(
        "[cache]\ndefault = false\n[[agents]]\nid = \"a\"\nprovider = \"sim\"\n",
        "t.toml",
    )
    .unwrap();
    assert!(!off.agents[0].cache);
    for (toml, expected) in [
        (
            "[cache]\nbackend = \"disk\"\n",
            "cache.backend: \"disk\" is not a cache backend",
        ),
        ("[cache]\nbackend = \"redis\"\n", "cache.url: is missing"),
        (
            "[cache]\nbackend = \"redis\"\nurl = \"http://x\"\n",
            "cache.url: is not a Redis URL",
        ),
        (
            "[cache]\nurl = \"redis://x\"\n",
            "cache.url: is for backend = \"redis\"",
        ),
        ("[cache]\nttl = \"0s\"\n", "cache.ttl: 0 would keep nothing"),
        (
            "[cache]\nmax_entries = 0\n",
            "cache.max_entries: 0 is out of range",
        ),
        (
            "[cache]\ntimeout = \"1m\"\n",
            "cache.timeout: is out of range",
        ),
        (
            "[cache]\nnamespace = \"a b\"\n",
            "cache.namespace: expected",
        ),
    ] {
        let e = Config::from_toml_str(toml, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains(expected), "{toml}: {e}");
    }
}

/// A store that fails while `down` is set, and otherwise keeps replies in memory.
#[derive(Debug, Default)]
struct Flaky {
    down: std::sync::atomic::AtomicBool,
    inner: std::sync::Mutex<std::collections::HashMap<String, metaorch::cache::CachedReply>>,
}

#[async_trait::async_trait]
impl metaorch::cache::CacheStore for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }

    async fn get(
        &self,
        key: &metaorch::cache::CacheKey,
    ) -> Result<Option<metaorch::cache::CachedReply>, metaorch::cache::CacheError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(metaorch::cache::CacheError("connection refused".into()));
        }
        Ok(self.inner.lock().unwrap().get(&key.to_string()).cloned())
    }

    async fn put(
        &self,
        key: &metaorch::cache::CacheKey,
        reply: &metaorch::cache::CachedReply,
        _ttl: Duration,
    ) -> Result<(), metaorch::cache::CacheError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(metaorch::cache::CacheError("connection refused".into()));
        }
        self.inner
            .lock()
            .unwrap()
            .insert(key.to_string(), reply.clone());
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_store_is_a_miss_logged_once_per_outage_and_heals() {
    let capture = common::Capture::global();
    let store = std::sync::Arc::new(Flaky::default());
    let config = Config::from_toml_str(
        "[cache]\n[providers.sim]\nkind = \"sim\"\nlatency_min = \"10ms\"\nlatency_max = \"10ms\"\n[[agents]]\nid = \"a\"\nprovider = \"sim\"\n",
        "t.toml",
    )
    .unwrap();
    let orchestrator = Orchestrator::builder()
        .config(config)
        .cache_store(store.clone())
        .build()
        .unwrap();
    orchestrator.process("warm").await.unwrap();
    assert!(orchestrator.process("warm").await.unwrap().outcomes[0].cached);
    store.down.store(true, std::sync::atomic::Ordering::SeqCst);
    for n in 0..10 {
        let r = orchestrator
            .process(&format!("while down {}", n % 2))
            .await
            .unwrap();
        assert!(r.ok, "the cache is never a reason to fail");
        assert!(!r.outcomes[0].cached);
    }
    // Even what was cached before goes upstream while the store fails.
    assert!(!orchestrator.process("warm").await.unwrap().outcomes[0].cached);
    store.down.store(false, std::sync::atomic::Ordering::SeqCst);
    orchestrator.process("after").await.unwrap();
    assert!(
        orchestrator.process("after").await.unwrap().outcomes[0].cached,
        "hits resume"
    );
    let events: Vec<String> = capture
        .lines()
        .iter()
        .filter_map(|l| l["event"].as_str().map(str::to_owned))
        .filter(|e| e.starts_with("cache."))
        .collect();
    assert_eq!(
        events,
        ["cache.unavailable", "cache.recovered"],
        "once per outage"
    );
}
