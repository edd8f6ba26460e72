//! The resilience policy's promises (DESIGN.md invariants 3, 4 and 7), on tokio's paused
//! clock with seeded randomness: nothing here sleeps in real time.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use common::{Behaviour, SIX, Scripted, Toggle, server_error, task, tasks};
use metaorch::config::Config;
use metaorch::executor::{AgentTask, Executor, FailureKind, FallbackSource, OutcomeStatus};
use metaorch::limits::{ConcurrencyLimit, FlowConfig, FlowLane};
use metaorch::orchestrator::Orchestrator;
use metaorch::provider::{ErrorKind, Provider, ProviderError, retry_after};
use metaorch::resilience::{
    BreakerConfig, BreakerState, CallPolicy, DelaySource, Jitter, Resilience, RetryBudgetConfig,
    RetryPolicy, Window,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn resilience(seed: u64) -> Arc<Resilience> {
    Arc::new(Resilience::new(
        RetryBudgetConfig::default(),
        BreakerConfig::default(),
        Some(seed),
    ))
}

fn executor_with(resilience: Arc<Resilience>) -> Executor {
    Executor::with_resilience(Arc::new(ConcurrencyLimit::new(6)), resilience)
}

fn policy(jitter: Jitter) -> Arc<CallPolicy> {
    Arc::new(CallPolicy {
        retry: RetryPolicy {
            jitter,
            ..RetryPolicy::default()
        },
        attempt_timeout: Some(secs(30)),
    })
}

fn rate_limited() -> ProviderError {
    ProviderError::new(ErrorKind::RateLimited, "rate_limit_error").with_status(429)
}

/// Runs one task to its outcome, with a deadline `deadline` from now.
async fn run_one(
    executor: &Executor,
    task: AgentTask,
    deadline: Duration,
) -> metaorch::AgentOutcome {
    executor
        .run(
            vec![task],
            Instant::now() + deadline,
            &CancellationToken::new(),
        )
        .await
        .remove(0)
}

/// UT-ERR-001: a 429 three times with jitter off waits exactly 1 s, 2 s and 4 s, then
/// attempt 4 succeeds.
#[tokio::test(start_paused = true)]
async fn ut_err_001_three_429s_wait_1_2_4_seconds_then_succeed() {
    let provider = Arc::new(Scripted::new(&[(
        "critic",
        Behaviour::FailFirst(3, rate_limited()),
    )]));
    let started = Instant::now();
    let outcome = run_one(
        &executor_with(resilience(1)),
        task("critic", provider.clone()).with_policy(policy(Jitter::None)),
        secs(60),
    )
    .await;

    assert_eq!(outcome.status, OutcomeStatus::Succeeded);
    assert_eq!(outcome.attempts, 4);
    assert_eq!(provider.calls.load(Ordering::SeqCst), 4);
    let waits: Vec<_> = outcome.retries.iter().map(|r| r.delay).collect();
    assert_eq!(waits, [secs(1), secs(2), secs(4)]);
    assert!(
        outcome
            .retries
            .iter()
            .all(|r| r.source == DelaySource::Backoff
                && r.error == ErrorKind::RateLimited
                && r.status == Some(429))
    );
    assert_eq!(
        started.elapsed(),
        secs(7),
        "the waits are real (virtual) sleeps"
    );
}

/// UT-ERR-001 with full jitter: each wait lies in [0, ceiling], and the seed
/// reproduces them.
#[tokio::test(start_paused = true)]
async fn ut_err_001_full_jitter_waits_are_bounded_and_seeded() {
    async fn waits(seed: u64) -> Vec<Duration> {
        let provider = Arc::new(Scripted::new(&[(
            "critic",
            Behaviour::FailFirst(3, rate_limited()),
        )]));
        let outcome = run_one(
            &executor_with(resilience(seed)),
            task("critic", provider).with_policy(policy(Jitter::Full)),
            secs(60),
        )
        .await;
        assert_eq!(outcome.status, OutcomeStatus::Succeeded);
        outcome.retries.iter().map(|r| r.delay).collect()
    }
    let first = waits(42).await;
    assert_eq!(first.len(), 3);
    for (wait, ceiling) in first.iter().zip([1, 2, 4]) {
        assert!(*wait <= secs(ceiling), "{wait:?} > {ceiling}s");
    }
    assert_eq!(first, waits(42).await, "the same seed, the same waits");
    assert_ne!(first, waits(43).await, "another seed, other waits");
}

/// IT-ERR-003: an agent that always fails exhausts its retries and yields a failed
/// outcome while the other five succeed.
#[tokio::test(start_paused = true)]
async fn it_err_003_one_agent_always_fails_the_others_succeed() {
    let config = Config::from_toml_str(
        r#"
        seed = 3
        [providers.sim]
        kind = "sim"
        latency_min = "10ms"
        latency_max = "50ms"
        [[providers.sim.faults.script]]
        agent = "critic"
        first_attempts = 1000
        kind = "server"
        "#,
        "test.toml",
    )
    .unwrap();
    let orchestrator = Orchestrator::builder().config(config).build().unwrap();
    let response = orchestrator.process("q").await.unwrap();

    assert_eq!(response.outcomes.len(), 6);
    let critic = response
        .outcomes
        .iter()
        .find(|o| o.agent_id == "critic")
        .unwrap();
    assert_eq!(critic.status, OutcomeStatus::Failed);
    assert_eq!(critic.attempts, 4, "max_attempts is 4 by default");
    assert_eq!(critic.retries.len(), 3);
    let error = critic.error.as_ref().unwrap();
    assert_eq!(error.kind, FailureKind::Provider(ErrorKind::Server));
    assert_eq!(error.status, Some(500));
    assert_eq!(response.summary.succeeded, 5);
    assert!(response.ok);
    assert!(response.answer.contains("critic"), "{}", response.answer);
}

/// Retry-After in both header forms replaces the backoff.
#[tokio::test(start_paused = true)]
async fn retry_after_seconds_and_milliseconds_are_honoured() {
    let now = SystemTime::now();
    for (ms, secs_header, expected) in [
        (None, Some("3"), Duration::from_secs(3)),
        (Some("1500"), None, Duration::from_millis(1500)),
    ] {
        let wait = retry_after::parse(ms, secs_header, now).unwrap();
        let provider = Arc::new(Scripted::new(&[(
            "critic",
            Behaviour::FailFirst(1, rate_limited().with_retry_after(wait)),
        )]));
        let started = Instant::now();
        let outcome = run_one(
            &executor_with(resilience(1)),
            task("critic", provider).with_policy(policy(Jitter::Full)),
            secs(60),
        )
        .await;
        assert_eq!(outcome.status, OutcomeStatus::Succeeded);
        assert_eq!(outcome.retries.len(), 1);
        assert_eq!(outcome.retries[0].delay, expected);
        assert_eq!(outcome.retries[0].source, DelaySource::RetryAfter);
        assert_eq!(started.elapsed(), expected);
    }
}

/// A Retry-After that would pass the deadline gives up at once, without sleeping.
#[tokio::test(start_paused = true)]
async fn retry_after_beyond_the_deadline_fails_fast() {
    let provider = Arc::new(Scripted::new(&[(
        "critic",
        Behaviour::FailFirst(1, rate_limited().with_retry_after(secs(10))),
    )]));
    let started = Instant::now();
    let outcome = run_one(
        &executor_with(resilience(1)),
        task("critic", provider.clone()).with_policy(policy(Jitter::Full)),
        secs(5),
    )
    .await;
    assert_eq!(outcome.status, OutcomeStatus::TimedOut);
    let error = outcome.error.unwrap();
    assert_eq!(error.kind, FailureKind::DeadlineExceeded);
    assert!(
        error.message.contains("would pass the request deadline"),
        "{}",
        error.message
    );
    assert_eq!(outcome.attempts, 1);
    assert_eq!(provider.calls.load(Ordering::SeqCst), 1);
    assert_eq!(started.elapsed(), Duration::ZERO, "no sleep");
}

/// A Retry-After beyond the clamp is held to it for a 503; for a 429 the call gives up,
/// and the provider's lane stays paused as long as asked (not its breaker: a rate limit
/// is not ill health), so calls whose deadline comes first are never sent.
#[tokio::test(start_paused = true)]
async fn long_retry_after_is_clamped_or_pauses_the_lane() {
    let res = resilience(1);
    let short_clamp = Arc::new(CallPolicy {
        retry: RetryPolicy {
            retry_after_max: secs(2),
            ..RetryPolicy::default()
        },
        attempt_timeout: None,
    });
    let unavailable = ProviderError::new(ErrorKind::Server, "unavailable")
        .with_status(503)
        .with_retry_after(secs(30));
    let provider = Arc::new(Scripted::new(&[
        ("a", Behaviour::FailFirst(1, unavailable)),
        (
            "b",
            Behaviour::FailFirst(1, rate_limited().with_retry_after(secs(30))),
        ),
    ]));
    let breaker = res.breaker("test", "m");
    let lane = Arc::new(FlowLane::new("test", "m", FlowConfig::default()));
    let outcome = run_one(
        &executor_with(Arc::clone(&res)),
        task("a", provider.clone())
            .with_policy(Arc::clone(&short_clamp))
            .with_breaker(Arc::clone(&breaker)),
        secs(60),
    )
    .await;
    assert_eq!(outcome.status, OutcomeStatus::Succeeded);
    assert_eq!(
        outcome.retries[0].delay,
        secs(2),
        "clamped to retry_after_max"
    );

    let outcome = run_one(
        &executor_with(Arc::clone(&res)),
        task("b", provider.clone())
            .with_policy(Arc::clone(&short_clamp))
            .with_breaker(Arc::clone(&breaker))
            .with_lane(Arc::clone(&lane)),
        secs(60),
    )
    .await;
    assert_eq!(outcome.status, OutcomeStatus::Failed);
    assert_eq!(outcome.attempts, 1);
    assert!(
        outcome
            .error
            .unwrap()
            .message
            .contains("more than retry_after_max")
    );
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(
        lane.snapshot().paused_for,
        Some(secs(30)),
        "the others wait as long as the provider asked"
    );

    // A call whose deadline comes before the pause ends is refused without being sent.
    let calls = provider.calls.load(Ordering::SeqCst);
    let outcome = run_one(
        &executor_with(Arc::clone(&res)),
        task("a", provider.clone()).with_lane(Arc::clone(&lane)),
        secs(1),
    )
    .await;
    assert_eq!(outcome.status, OutcomeStatus::TimedOut);
    assert_eq!(outcome.error.unwrap().kind, FailureKind::DeadlineInQueue);
    assert_eq!(provider.calls.load(Ordering::SeqCst), calls);
}

/// 400, 401, 403, 404 and 413 are tried once, and so is anything the provider marks
/// `x-should-retry: false`; `x-should-retry: true` forces a retry.
#[tokio::test(start_paused = true)]
async fn never_retried_kinds_are_tried_once() {
    let finals = [
        (ErrorKind::BadRequest, 400),
        (ErrorKind::Auth, 401),
        (ErrorKind::Permission, 403),
        (ErrorKind::NotFound, 404),
        (ErrorKind::TooLarge, 413),
    ];
    let mut cases: Vec<(ProviderError, u32)> = finals
        .iter()
        .map(|&(kind, status)| (ProviderError::new(kind, "no").with_status(status), 1))
        .collect();
    cases.push((rate_limited().with_should_retry(false), 1));
    cases.push((
        ProviderError::new(ErrorKind::BadRequest, "conflict-ish")
            .with_status(400)
            .with_should_retry(true),
        2,
    ));
    for (error, attempts) in cases {
        let provider = Arc::new(Scripted::new(&[(
            "x",
            Behaviour::FailFirst(1, error.clone()),
        )]));
        let outcome = run_one(
            &executor_with(resilience(1)),
            task("x", provider.clone()),
            secs(60),
        )
        .await;
        assert_eq!(outcome.attempts, attempts, "{error}");
        assert_eq!(provider.calls.load(Ordering::SeqCst), attempts as usize);
    }
}

/// When the retry budget is spent, retries stop and outcomes say so.
#[tokio::test(start_paused = true)]
async fn an_exhausted_retry_budget_stops_retries() {
    let res = Arc::new(Resilience::new(
        RetryBudgetConfig {
            capacity: 10,
            retry_cost: 5,
            timeout_cost: 10,
            success_deposit: 1,
        },
        BreakerConfig::default(),
        Some(1),
    ));
    let script: Vec<_> = SIX
        .iter()
        .map(|id| (*id, Behaviour::FailFirst(100, server_error())))
        .collect();
    let provider = Arc::new(Scripted::new(&script));
    let outcomes = executor_with(Arc::clone(&res))
        .run(
            tasks(&SIX, provider.clone()),
            Instant::now() + secs(60),
            &CancellationToken::new(),
        )
        .await;
    assert_eq!(outcomes.len(), 6);
    // Six first tries, and the two retries ten tokens pay for.
    assert_eq!(provider.calls.load(Ordering::SeqCst), 8);
    let exhausted = outcomes
        .iter()
        .filter(|o| o.error.as_ref().map(|e| e.kind) == Some(FailureKind::RetryBudgetExhausted))
        .count();
    assert!(exhausted >= 4, "{exhausted}");
    assert!(outcomes.iter().all(|o| o.status == OutcomeStatus::Failed));
    assert_eq!(res.budget("test", "m").available(), 0);
}

/// The breaker's whole life: opens at the threshold, fails fast while open, half-opens
/// after `open_for`, re-opens on a failed probe, closes after successful probes.
#[tokio::test(start_paused = true)]
async fn breaker_opens_fails_fast_half_opens_and_closes() {
    let res = Arc::new(Resilience::new(
        RetryBudgetConfig::default(),
        BreakerConfig {
            window: Window::Count(10),
            minimum_calls: 4,
            failure_rate_threshold: 0.5,
            open_for: secs(10),
            half_open_probes: 2,
            ..BreakerConfig::default()
        },
        Some(1),
    ));
    let provider = Arc::new(Toggle::default());
    provider.failing.store(true, Ordering::SeqCst);
    let breaker = res.breaker("test", "m");
    let executor = executor_with(Arc::clone(&res));
    let call = || {
        task("x", provider.clone() as Arc<dyn Provider>)
            .with_policy(Arc::new(CallPolicy::once()))
            .with_breaker(Arc::clone(&breaker))
    };

    for _ in 0..3 {
        run_one(&executor, call(), secs(60)).await;
        assert_eq!(breaker.state(), BreakerState::Closed, "under minimum_calls");
    }
    run_one(&executor, call(), secs(60)).await;
    assert_eq!(breaker.state(), BreakerState::Open, "4 of 4 failed");

    let outcome = run_one(&executor, call(), secs(60)).await;
    assert_eq!(outcome.error.unwrap().kind, FailureKind::CircuitOpen);
    assert_eq!(outcome.attempts, 0);
    assert_eq!(
        provider.calls.load(Ordering::SeqCst),
        4,
        "open: no call made"
    );

    tokio::time::advance(secs(10)).await;
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    run_one(&executor, call(), secs(60)).await;
    assert_eq!(
        breaker.state(),
        BreakerState::Open,
        "a failed probe re-opens it"
    );
    assert_eq!(provider.calls.load(Ordering::SeqCst), 5);

    tokio::time::advance(secs(10)).await;
    provider.failing.store(false, Ordering::SeqCst);
    run_one(&executor, call(), secs(60)).await;
    assert_eq!(
        breaker.state(),
        BreakerState::HalfOpen,
        "one of two probes done"
    );
    let outcome = run_one(&executor, call(), secs(60)).await;
    assert!(outcome.succeeded());
    assert_eq!(
        breaker.state(),
        BreakerState::Closed,
        "two probes succeeded"
    );
}

/// A fallback agent or text stands in for a failed agent, and the outcome says so.
#[tokio::test(start_paused = true)]
async fn fallbacks_are_used_and_recorded() {
    let config = Config::from_toml_str(
        r#"
        seed = 9
        [providers.sim]
        kind = "sim"
        latency_min = "10ms"
        latency_max = "20ms"
        [[providers.sim.faults.script]]
        agent = "critic"
        first_attempts = 100
        kind = "auth"
        [[providers.sim.faults.script]]
        agent = "writer"
        first_attempts = 100
        kind = "bad_request"

        [[agents]]
        id = "critic"
        provider = "sim"
        fallback = { agent = "critic-backup" }

        [[agents]]
        id = "critic-backup"
        provider = "sim"
        model = "sim-2"
        standby = true

        [[agents]]
        id = "writer"
        provider = "sim"
        fallback = { text = "No draft this time." }
        "#,
        "test.toml",
    )
    .unwrap();
    let orchestrator = Orchestrator::builder().config(config).build().unwrap();
    let response = orchestrator.process("q").await.unwrap();
    let ids: Vec<_> = response
        .outcomes
        .iter()
        .map(|o| o.agent_id.as_str())
        .collect();
    assert_eq!(
        ids,
        ["critic", "writer"],
        "standby agents have no outcome of their own"
    );

    let critic = &response.outcomes[0];
    assert!(critic.succeeded());
    assert!(critic.output.as_deref().unwrap().contains("sim-2"));
    let fallback = critic.fallback.as_ref().unwrap();
    assert_eq!(fallback.source, FallbackSource::Agent);
    assert_eq!(fallback.agent.as_deref(), Some("critic-backup"));
    assert_eq!(fallback.model.as_deref(), Some("sim-2"));
    assert_eq!(
        fallback.primary_error.kind,
        FailureKind::Provider(ErrorKind::Auth)
    );
    assert_eq!(
        critic.attempts, 2,
        "auth is not retried; then the backup's one try"
    );

    let writer = &response.outcomes[1];
    assert!(writer.succeeded());
    assert_eq!(writer.output.as_deref(), Some("No draft this time."));
    let fallback = writer.fallback.as_ref().unwrap();
    assert_eq!(fallback.source, FallbackSource::Text);
    assert_eq!(fallback.primary_error.status, Some(400));
}

/// Recovery drill: 10,000 agent calls through `sim` with a 20 % transient failure rate
/// and 4 attempts. Each call fails only if all four attempts do (0.2⁴ = 0.16 %).
#[tokio::test(start_paused = true)]
async fn recovery_drill_10000_calls_at_20_percent_faults() {
    let config = Config::from_toml_str(
        r#"
        seed = 2026
        [providers.sim]
        kind = "sim"
        latency_min = "10ms"
        latency_max = "100ms"
        [providers.sim.faults]
        rate_limited = 0.05
        retry_after = "500ms"
        overloaded = 0.05
        server = 0.05
        connection = 0.05
        "#,
        "drill.toml",
    )
    .unwrap();
    let orchestrator = Orchestrator::builder().config(config).build().unwrap();
    let requests = 10_000_usize.div_ceil(6);
    let (mut calls, mut succeeded, mut retries) = (0usize, 0usize, 0usize);
    for i in 0..requests {
        let response = orchestrator
            .process(&format!("drill query {i}"))
            .await
            .unwrap();
        assert_eq!(response.outcomes.len(), 6, "no outcome is missing");
        calls += response.outcomes.len();
        succeeded += response.outcomes.iter().filter(|o| o.succeeded()).count();
        retries += response
            .outcomes
            .iter()
            .map(|o| o.retries.len())
            .sum::<usize>();
    }
    let rate = succeeded as f64 / calls as f64;
    let expected = 1.0 - 0.2f64.powi(4);
    println!(
        "recovery drill: {succeeded}/{calls} calls succeeded ({:.4} %), {retries} retries; expected {:.4} %",
        rate * 100.0,
        expected * 100.0
    );
    // Three standard deviations of the binomial failure count, as the margin, on
    // both sides: a rate too good means faults were not injected or not counted.
    let margin = 3.0 * (expected * (1.0 - expected) / calls as f64).sqrt();
    assert!(
        (expected - margin..=expected + margin).contains(&rate),
        "success rate {rate} outside {expected} ± {margin}"
    );
    // Retries per call: 0.2 + 0.2² + 0.2³ = 0.248 expected (variance 0.2985 each);
    // four standard deviations of the sum either way.
    let (mean, sd) = (0.248 * calls as f64, (0.2985 * calls as f64).sqrt());
    assert!(
        (retries as f64 - mean).abs() <= 4.0 * sd,
        "{retries} retries against {mean:.0} ± {:.0}",
        4.0 * sd
    );
    assert!(
        orchestrator
            .breakers()
            .iter()
            .all(|b| b.state == BreakerState::Closed)
    );
}
