//! Flow control's promises (DESIGN.md invariant 8: overload slows us down, it never
//! becomes an outage), under load, on tokio's paused clock: upstreams with a capacity,
//! a rate limit or random refusals, and many requests in flight at once.

mod common;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::{Toggle, reply};
use metaorch::config::Config;
use metaorch::executor::{FailureKind, OutcomeStatus};
use metaorch::orchestrator::{Orchestrator, Response};
use metaorch::provider::{
    Completion, CompletionRequest, ErrorKind, Provider, ProviderError, RateLimits,
};
use metaorch::resilience::BreakerState;
use tokio::time::Instant;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A stable draw in [0, 1) for a call: the same call (agent, prompt, attempt, salt)
/// always draws the same.
fn unit(request: &CompletionRequest, salt: u64) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ salt;
    for b in request
        .meta
        .agent_id
        .bytes()
        .chain(request.prompt.bytes())
        .chain(request.meta.attempt.to_le_bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 31;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 29;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// 0.5–2 s, the report's agent latencies.
fn latency(request: &CompletionRequest) -> Duration {
    Duration::from_secs_f64(0.5 + 1.5 * unit(request, 1))
}

/// What an upstream saw: every call's start, and the refusals (429/529).
#[derive(Debug, Default)]
struct Log {
    starts: Mutex<Vec<Instant>>,
    refused: Mutex<Vec<Instant>>,
}

impl Log {
    fn start(&self) {
        self.starts.lock().unwrap().push(Instant::now());
    }

    fn refuse(&self) {
        self.refused.lock().unwrap().push(Instant::now());
    }

    /// (calls, refusals) from `since` on.
    fn counts_since(&self, since: Instant) -> (usize, usize) {
        let count =
            |v: &Mutex<Vec<Instant>>| v.lock().unwrap().iter().filter(|t| **t >= since).count();
        (count(&self.starts), count(&self.refused))
    }
}

/// An upstream that takes `cap` calls at once and answers 529 past it at once, with a
/// rate limit of `per_second` (429 with `retry-after-ms` past it, and the limit in
/// Anthropic's headers on every answer when set).
#[derive(Debug)]
struct Capped {
    cap: AtomicUsize,
    in_flight: AtomicUsize,
    per_second: Option<f64>,
    /// The rate limit's next free instant (a bucket of one).
    next_free: Mutex<Option<Instant>>,
    /// How long a refusal takes to come back (its round trip).
    refusal_delay: Duration,
    /// How long before its answer arrives a call frees its place (the server is done,
    /// the answer is on the wire).
    release_early: Duration,
    log: Log,
}

impl Capped {
    fn new(cap: usize, per_second: Option<f64>) -> Self {
        Capped {
            cap: AtomicUsize::new(cap),
            in_flight: AtomicUsize::new(0),
            per_second,
            next_free: Mutex::new(None),
            refusal_delay: Duration::ZERO,
            release_early: Duration::ZERO,
            log: Log::default(),
        }
    }

    fn limits(&self) -> Option<RateLimits> {
        self.per_second.map(|r| RateLimits {
            requests_limit: Some((r * 60.0) as u64),
            ..RateLimits::default()
        })
    }

    /// Takes the rate limit's next slot, or says how long until there is one.
    fn rate(&self) -> Result<(), Duration> {
        let Some(r) = self.per_second else {
            return Ok(());
        };
        let now = Instant::now();
        let mut next = self.next_free.lock().unwrap();
        match *next {
            Some(t) if t > now => Err(t - now),
            _ => {
                *next = Some(now + Duration::from_secs_f64(1.0 / r));
                Ok(())
            }
        }
    }
}

#[async_trait]
impl Provider for Capped {
    fn kind(&self) -> &'static str {
        "capped"
    }

    async fn complete(&self, request: &CompletionRequest) -> Result<Completion, ProviderError> {
        self.log.start();
        if let Err(wait) = self.rate() {
            self.log.refuse();
            let mut error = ProviderError::new(ErrorKind::RateLimited, "rate_limit_error")
                .with_status(429)
                .with_retry_after(wait);
            if let Some(limits) = self.limits() {
                error = error.with_rate_limits(limits);
            }
            return Err(error);
        }
        let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        if n > self.cap.load(Ordering::SeqCst) {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.log.refuse();
            tokio::time::sleep(self.refusal_delay).await;
            return Err(
                ProviderError::new(ErrorKind::Overloaded, "overloaded_error").with_status(529),
            );
        }
        let took = latency(request);
        tokio::time::sleep(took.saturating_sub(self.release_early)).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        tokio::time::sleep(self.release_early.min(took)).await;
        let mut completion = reply(request, took);
        completion.rate_limits = self.limits().map(Box::new);
        Ok(completion)
    }
}

/// An upstream that answers `rate` of calls at once with a 429, 529 or 500 (a third
/// each, no Retry-After), whatever the load, and the rest after 0.5–2 s.
#[derive(Debug)]
struct Flaky {
    rate: f64,
    log: Log,
}

#[async_trait]
impl Provider for Flaky {
    fn kind(&self) -> &'static str {
        "flaky"
    }

    async fn complete(&self, request: &CompletionRequest) -> Result<Completion, ProviderError> {
        self.log.start();
        let roll = unit(request, 2);
        if roll < self.rate {
            self.log.refuse();
            let (kind, status) = match (roll / self.rate * 3.0) as u32 {
                0 => (ErrorKind::RateLimited, 429),
                1 => (ErrorKind::Overloaded, 529),
                _ => (ErrorKind::Server, 500),
            };
            return Err(ProviderError::new(kind, "refused at random").with_status(status));
        }
        let took = latency(request);
        tokio::time::sleep(took).await;
        Ok(reply(request, took))
    }
}

/// Six agents on provider `sim` (stood in for by the test's upstream).
fn orchestrator(provider: Arc<dyn Provider>, extra: &str) -> Orchestrator {
    let config = Config::from_toml_str(&format!("seed = 5\n{extra}"), "test.toml").unwrap();
    Orchestrator::builder()
        .config(config)
        .provider("sim", provider)
        .build()
        .unwrap()
}

/// Keeps `in_flight` requests going until `duration` has passed; every response.
async fn load(orchestrator: &Orchestrator, in_flight: usize, duration: Duration) -> Vec<Response> {
    let end = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..in_flight {
        let orchestrator = orchestrator.clone();
        tasks.spawn(async move {
            let mut responses = Vec::new();
            let mut n = 0;
            while Instant::now() < end {
                let query = format!("request {lane}-{n}");
                responses.push(orchestrator.process(&query).await.unwrap());
                n += 1;
            }
            responses
        });
    }
    let mut all = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        all.extend(joined.unwrap());
    }
    all
}

fn outcomes(responses: &[Response]) -> impl Iterator<Item = &metaorch::AgentOutcome> {
    responses.iter().flat_map(|r| &r.outcomes)
}

/// 429s and 529s, however many, are flow control: the breaker never opens on them.
#[tokio::test(start_paused = true)]
async fn storms_of_429_and_529_never_open_a_breaker() {
    let upstream = Arc::new(Flaky {
        rate: 0.9,
        log: Log::default(),
    });
    // Only 429 and 529 here: the draw's 500s are turned into 529s.
    #[derive(Debug)]
    struct Storm(Arc<Flaky>);
    #[async_trait]
    impl Provider for Storm {
        fn kind(&self) -> &'static str {
            "storm"
        }
        async fn complete(&self, r: &CompletionRequest) -> Result<Completion, ProviderError> {
            match self.0.complete(r).await {
                Err(e) if e.kind == ErrorKind::Server => Err(ProviderError::new(
                    ErrorKind::Overloaded,
                    "overloaded_error",
                )
                .with_status(529)),
                other => other,
            }
        }
    }
    let orchestrator = orchestrator(
        Arc::new(Storm(Arc::clone(&upstream))),
        "[defaults.retry]\nmax_attempts = 2\n",
    );
    let responses = load(&orchestrator, 10, secs(30)).await;
    let (calls, refused) = upstream.log.counts_since(Instant::now() - secs(3600));
    // Refused nine times in ten, flow control backs off to its minimum; the breaker
    // never opens.
    assert!(
        calls > 100 && refused * 10 > calls * 8,
        "{refused} of {calls}"
    );
    assert!(
        outcomes(&responses).all(|o| o
            .error
            .as_ref()
            .is_none_or(|e| e.kind != FailureKind::CircuitOpen)),
        "no call was refused by a breaker"
    );
    assert!(
        orchestrator
            .breakers()
            .iter()
            .all(|b| b.state == BreakerState::Closed)
    );
}

/// A run of 500s still opens the breaker — calls then fail fast without reaching the
/// provider — and it heals when the provider does.
#[tokio::test(start_paused = true)]
async fn a_run_of_500s_still_opens_the_breaker_and_it_heals() {
    let upstream = Arc::new(Toggle::default());
    upstream
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let orchestrator = orchestrator(upstream.clone(), "");
    // Six agents, four attempts each: 24 failures, past the 20 a verdict needs.
    let response = orchestrator.process("q").await.unwrap();
    assert!(!response.ok);
    assert_eq!(orchestrator.breakers()[0].state, BreakerState::Open);
    let calls = upstream.calls.load(std::sync::atomic::Ordering::SeqCst);
    let response = orchestrator.process("q").await.unwrap();
    assert!(
        response
            .outcomes
            .iter()
            .all(|o| o.error.as_ref().unwrap().kind == FailureKind::CircuitOpen)
    );
    assert_eq!(
        upstream.calls.load(std::sync::atomic::Ordering::SeqCst),
        calls
    );
    upstream
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::advance(secs(31)).await;
    let response = orchestrator.process("q").await.unwrap();
    assert!(response.ok);
    assert_eq!(orchestrator.breakers()[0].state, BreakerState::Closed);
}

/// A real outage — every call failing at once, those in flight included (their
/// connections reset) — opens the breaker within a second under load, from a window
/// full of earlier successes.
#[tokio::test(start_paused = true)]
async fn a_real_outage_opens_the_breaker_within_a_second() {
    #[derive(Debug)]
    struct Outage {
        down: tokio::sync::watch::Sender<bool>,
    }
    impl Default for Outage {
        fn default() -> Self {
            Outage {
                down: tokio::sync::watch::channel(false).0,
            }
        }
    }
    #[async_trait]
    impl Provider for Outage {
        fn kind(&self) -> &'static str {
            "outage"
        }
        async fn complete(&self, r: &CompletionRequest) -> Result<Completion, ProviderError> {
            let mut down = self.down.subscribe();
            if *down.borrow() {
                return Err(ProviderError::new(ErrorKind::Server, "down").with_status(500));
            }
            let took = latency(r);
            tokio::select! {
                () = tokio::time::sleep(took) => Ok(reply(r, took)),
                _ = down.wait_for(|d| *d) => Err(ProviderError::new(ErrorKind::Connection, "reset")),
            }
        }
    }
    let upstream = Arc::new(Outage::default());
    let orchestrator = orchestrator(upstream.clone(), "");
    let opened = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut lanes = tokio::task::JoinSet::new();
    for lane in 0..10 {
        let (orchestrator, opened) = (orchestrator.clone(), Arc::clone(&opened));
        // Until the breaker opens: then requests fail at once, and a loop of them
        // would never let the paused clock move.
        lanes.spawn(async move {
            let mut n = 0;
            while !opened.load(Ordering::SeqCst) {
                orchestrator.process(&format!("{lane}-{n}")).await.unwrap();
                n += 1;
            }
        });
    }
    tokio::time::sleep(secs(20)).await;
    upstream.down.send_replace(true);
    let down_at = Instant::now();
    while orchestrator.breakers()[0].state != BreakerState::Open {
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(down_at.elapsed() < secs(10), "the breaker never opened");
    }
    let took = down_at.elapsed();
    eprintln!("opened {took:?} after the outage began");
    opened.store(true, Ordering::SeqCst);
    while lanes.join_next().await.is_some() {}
    assert!(took < secs(1), "opened {took:?} after the outage began");
}

/// 20 % of calls refused at once (429, 529, 500), successes slower: at 10 and 100
/// requests in flight the breaker stays closed and agents recover as retries allow,
/// within a point of 1 − 0.2⁴.
#[tokio::test(start_paused = true)]
async fn twenty_percent_instant_faults_keep_the_breaker_closed_and_recover() {
    for in_flight in [10, 100] {
        let upstream = Arc::new(Flaky {
            rate: 0.2,
            log: Log::default(),
        });
        let orchestrator = orchestrator(upstream.clone(), "");
        let responses = load(&orchestrator, in_flight, secs(60)).await;
        let total = outcomes(&responses).count();
        let succeeded = outcomes(&responses).filter(|o| o.succeeded()).count();
        let recovery = succeeded as f64 / total as f64;
        let expected = 1.0 - 0.2f64.powi(4);
        eprintln!(
            "{in_flight} in flight: {succeeded} of {total} agents ({recovery:.4}), limit {}",
            orchestrator.lanes()[0].limit
        );
        assert!(
            recovery >= expected - 0.01,
            "{in_flight} in flight: {succeeded} of {total} agents ({recovery:.4}) against {expected:.4}"
        );
        assert!(
            outcomes(&responses).all(|o| o
                .error
                .as_ref()
                .is_none_or(|e| e.kind != FailureKind::CircuitOpen)),
            "{in_flight} in flight: a breaker opened"
        );
        // Random refusals do not grind the concurrency limit down.
        let lane = &orchestrator.lanes()[0];
        assert!(
            lane.limit >= 32,
            "{in_flight} in flight: limit {}",
            lane.limit
        );
    }
}

/// One `Retry-After: 5` pauses every caller of that provider and model for 5 s; calls
/// whose deadline comes sooner end `timed_out` without being sent.
#[tokio::test(start_paused = true)]
async fn one_retry_after_pauses_every_caller() {
    #[derive(Debug, Default)]
    struct OnceLimited {
        log: Log,
        told: std::sync::atomic::AtomicBool,
    }
    #[async_trait]
    impl Provider for OnceLimited {
        fn kind(&self) -> &'static str {
            "once"
        }
        async fn complete(&self, r: &CompletionRequest) -> Result<Completion, ProviderError> {
            self.log.start();
            if !self.told.swap(true, Ordering::SeqCst) {
                return Err(
                    ProviderError::new(ErrorKind::RateLimited, "rate_limit_error")
                        .with_status(429)
                        .with_retry_after(secs(5)),
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(reply(r, Duration::from_millis(100)))
        }
    }
    let upstream = Arc::new(OnceLimited::default());
    let orchestrator = orchestrator(upstream.clone(), "");
    let t0 = Instant::now();
    let one = metaorch::Request::new("first").with_agents(vec!["critic".into()]);
    let first = orchestrator.process_request(one).await.unwrap();
    // Its retry waited behind the pause.
    assert!(first.ok);
    assert_eq!(first.outcomes[0].retries[0].delay, secs(5));
    assert_eq!(first.outcomes[0].paused, secs(5));
    assert!(t0.elapsed() >= secs(5));

    // Again, with other requests arriving during the pause.
    upstream.told.store(false, Ordering::SeqCst);
    let t1 = Instant::now();
    let trigger = orchestrator
        .process_request(metaorch::Request::new("trigger").with_agents(vec!["critic".into()]));
    let during = async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let patient = orchestrator.process("patient");
        let hurried =
            orchestrator.process_request(metaorch::Request::new("hurried").with_timeout(secs(2)));
        tokio::join!(patient, hurried)
    };
    let (_, (patient, hurried)) = tokio::join!(trigger, during);
    let patient = patient.unwrap();
    let hurried = hurried.unwrap();
    assert!(patient.ok && patient.outcomes.iter().all(|o| o.succeeded()));
    // Nobody reached the provider before the pause ended.
    let starts = upstream.log.starts.lock().unwrap().clone();
    let early = starts
        .iter()
        .filter(|t| **t > t1 && **t < t1 + secs(5))
        .count();
    assert_eq!(early, 0, "calls sent during the pause");
    for o in &patient.outcomes {
        assert!(o.paused >= Duration::from_millis(4_900), "{o:?}");
    }
    for o in &hurried.outcomes {
        assert_eq!(o.status, OutcomeStatus::TimedOut);
        let error = o.error.as_ref().unwrap();
        assert_eq!(error.kind, FailureKind::DeadlineInQueue);
        assert!(error.message.contains("paused"), "{}", error.message);
        assert_eq!(o.attempts, 0, "never sent");
    }
    assert!(
        hurried.timings.total < Duration::from_millis(100),
        "refused at once, not at the deadline"
    );
}

/// Against a fixed capacity, the adaptive limit settles just under it with few 529s,
/// and follows it when it rises.
#[tokio::test(start_paused = true)]
async fn the_limit_converges_under_a_fixed_cap_and_recovers_when_it_rises() {
    let upstream = Arc::new(Capped::new(20, None));
    let orchestrator = orchestrator(upstream.clone(), "");
    let warm = Instant::now() + secs(10);
    let responses = load(&orchestrator, 10, secs(60)).await;
    let limit = orchestrator.lanes()[0].limit;
    assert!(
        (20..=22).contains(&limit),
        "limit {limit} against a cap of 20"
    );
    let (calls, refused) = upstream.log.counts_since(warm);
    eprintln!("cap 20: limit {limit}, {refused} of {calls} calls refused after warm-up");
    assert!(
        (refused as f64) < 0.02 * calls as f64,
        "{refused} of {calls} calls refused after warm-up"
    );
    assert!(outcomes(&responses).all(|o| o.succeeded()));

    upstream.cap.store(40, Ordering::SeqCst);
    load(&orchestrator, 10, secs(60)).await;
    let limit = orchestrator.lanes()[0].limit;
    assert!(limit >= 39, "limit {limit} after the cap rose to 40");
}

/// 100 requests in flight (600 calls queued) against a capacity whose refusals take a
/// round trip to come back, and which frees a call's place just before its answer
/// arrives: calls in transit blur the count in flight, a call can succeed at a level
/// the capacity does not really allow, and a freed slot is refilled and refused again
/// and again unless the limit comes down. It must: no refusal storm, no failed agent.
#[tokio::test(start_paused = true)]
async fn refusals_in_transit_do_not_start_a_storm_at_100_in_flight() {
    let mut capped = Capped::new(40, None);
    capped.refusal_delay = Duration::from_millis(2);
    capped.release_early = Duration::from_millis(5);
    let upstream = Arc::new(capped);
    let orchestrator = orchestrator(upstream.clone(), "");
    let warm = Instant::now() + secs(10);
    let responses = load(&orchestrator, 100, secs(60)).await;
    let (calls, refused) = upstream.log.counts_since(warm);
    let limit = orchestrator.lanes()[0].limit;
    let mut took: Vec<Duration> = responses.iter().map(|r| r.timings.total).collect();
    took.sort();
    let (p50, p99) = (took[took.len() / 2], took[took.len() * 99 / 100]);
    eprintln!(
        "in transit: limit {limit}, {refused} of {calls} calls refused after warm-up, p50 {p50:?} p99 {p99:?}"
    );
    // A retry keeps its place: a request whose agent was refused does not wait twice.
    assert!(p99 < p50 * 3 / 2, "p50 {p50:?}, p99 {p99:?}");
    assert!(
        (refused as f64) < 0.02 * calls as f64,
        "{refused} of {calls} calls refused after warm-up"
    );
    assert!(outcomes(&responses).all(|o| o.succeeded()));
    assert!((40..=44).contains(&limit), "limit {limit}");
}

/// A limited upstream (a rate and a capacity), 10 requests in flight for a simulated
/// minute: no failed agent, and 429/529 answers under 2 % of its calls after the first
/// 5 s — the rate learned from its headers, the capacity found.
#[tokio::test(start_paused = true)]
async fn a_limited_upstream_serves_every_agent_for_a_minute() {
    let upstream = Arc::new(Capped::new(30, Some(20.0)));
    let orchestrator = orchestrator(upstream.clone(), "");
    let warm = Instant::now() + secs(5);
    let responses = load(&orchestrator, 10, secs(60)).await;
    let failed: Vec<_> = outcomes(&responses).filter(|o| !o.succeeded()).collect();
    assert!(
        failed.is_empty(),
        "{} failed agents: {:?}",
        failed.len(),
        failed.first()
    );
    let (calls, refused) = upstream.log.counts_since(warm);
    eprintln!("limited upstream: {refused} of {calls} calls refused after warm-up");
    assert!(
        (refused as f64) < 0.02 * calls as f64,
        "{refused} of {calls} calls refused after warm-up"
    );
    // Near the allowed rate: 20 calls a second.
    let served = outcomes(&responses).count() as f64 / 60.0;
    assert!(served > 18.0, "{served:.1} agent calls a second");
    assert_eq!(orchestrator.lanes()[0].rates.rpm, Some(1200));
}

/// A requests-per-minute limit: however many calls wait, no minute sees more than the
/// limit sent; a tokens-per-minute limit likewise, give or take the last call.
#[tokio::test(start_paused = true)]
async fn rate_limits_hold_in_every_minute_window() {
    #[derive(Debug, Default)]
    struct Quick(Log);
    #[async_trait]
    impl Provider for Quick {
        fn kind(&self) -> &'static str {
            "quick"
        }
        async fn complete(&self, r: &CompletionRequest) -> Result<Completion, ProviderError> {
            self.0.start();
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(reply(r, Duration::from_millis(50)))
        }
    }
    for (limits, per_call, most) in [
        ("rpm = 30", 1, 30),
        // 10 input tokens reported a call, estimated higher and corrected.
        ("input_tpm = 200", 10, 200 + 40),
    ] {
        let upstream = Arc::new(Quick::default());
        let orchestrator = orchestrator(
            upstream.clone(),
            &format!(
                "request_timeout = \"10m\"\n[providers.sim]\nkind = \"sim\"\n[providers.sim.flow]\n{limits}\n"
            ),
        );
        let responses = load(&orchestrator, 10, secs(180)).await;
        assert!(outcomes(&responses).all(|o| o.succeeded()));
        let starts = upstream.0.starts.lock().unwrap().clone();
        assert!(
            starts.len() >= 60 / per_call,
            "{limits}: {} calls",
            starts.len()
        );
        for (i, t) in starts.iter().enumerate() {
            let in_window = starts[i..]
                .iter()
                .take_while(|s| **s < *t + secs(60))
                .count();
            assert!(
                in_window * per_call <= most,
                "{limits}: {in_window} calls in the minute from call {i}"
            );
        }
    }
}

/// At 50 % failed attempts the default retry budget drains (a failure costs five
/// tokens, a success pays back one), so recovery settles below what four attempts
/// alone would give (93.75 %) — deliberately — and the agents it gives up on say why.
#[tokio::test(start_paused = true)]
async fn fifty_percent_faults_are_capped_by_the_retry_budget_and_say_so() {
    let upstream = Arc::new(Flaky {
        rate: 0.5,
        log: Log::default(),
    });
    let orchestrator = orchestrator(upstream.clone(), "");
    let responses = load(&orchestrator, 10, secs(120)).await;
    let total = outcomes(&responses).count();
    let succeeded = outcomes(&responses).filter(|o| o.succeeded()).count();
    let exhausted = outcomes(&responses)
        .filter(|o| o.error.as_ref().map(|e| e.kind) == Some(FailureKind::RetryBudgetExhausted))
        .count();
    let recovery = succeeded as f64 / total as f64;
    eprintln!(
        "50 % faults: {succeeded} of {total} agents ({recovery:.4}), {exhausted} retry_budget_exhausted"
    );
    assert!((0.55..0.9375).contains(&recovery), "recovery {recovery:.4}");
    assert!(exhausted > 0);
    assert_eq!(
        succeeded + exhausted,
        total
            - outcomes(&responses)
                .filter(|o| o
                    .error
                    .as_ref()
                    .is_some_and(|e| e.kind != FailureKind::RetryBudgetExhausted))
                .count()
    );
}

/// Records when each agent's calls start, and fails an agent's first attempt with a
/// 500 when asked.
#[derive(Debug, Default)]
struct Starts {
    starts: Mutex<Vec<(String, u32, Instant)>>,
    fail_first: Vec<String>,
}

#[async_trait]
impl Provider for Starts {
    fn kind(&self) -> &'static str {
        "starts"
    }

    async fn complete(&self, r: &CompletionRequest) -> Result<Completion, ProviderError> {
        self.starts
            .lock()
            .unwrap()
            .push((r.meta.agent_id.clone(), r.meta.attempt, Instant::now()));
        if r.meta.attempt == 1 && self.fail_first.contains(&r.meta.agent_id) {
            return Err(ProviderError::new(ErrorKind::Server, "boom").with_status(500));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(reply(r, Duration::from_secs(1)))
    }
}

const TWO_PROVIDERS: &str = r#"
concurrency_limit = 1
[defaults.retry]
jitter = "none"
[providers.other]
kind = "sim"
[[agents]]
id = "a"
provider = "sim"
[[agents]]
id = "b"
provider = "other"
"#;

/// A call waiting out its retry's backoff holds no process-wide slot: with one slot,
/// the other agent runs during the backoff.
#[tokio::test(start_paused = true)]
async fn a_retry_backoff_holds_no_process_wide_slot() {
    let upstream = Arc::new(Starts {
        fail_first: vec!["a".into()],
        ..Starts::default()
    });
    let config = Config::from_toml_str(TWO_PROVIDERS, "test.toml").unwrap();
    let orchestrator = Orchestrator::builder()
        .config(config)
        .provider("sim", upstream.clone())
        .provider("other", upstream.clone())
        .build()
        .unwrap();
    let t0 = Instant::now();
    let response = orchestrator.process("q").await.unwrap();
    assert!(response.ok && response.outcomes.iter().all(|o| o.succeeded()));
    let starts = upstream.starts.lock().unwrap().clone();
    let at = |id: &str, attempt: u32| {
        starts
            .iter()
            .find(|s| s.0 == id && s.1 == attempt)
            .map(|s| s.2 - t0)
            .unwrap()
    };
    assert_eq!(at("a", 1), Duration::ZERO);
    assert_eq!(at("b", 1), Duration::ZERO, "b ran during a's backoff");
    assert_eq!(at("a", 2), secs(1), "a's retry waited for b's slot");
}

/// A lane never counts a call that still waits for a process-wide slot: with two
/// process-wide slots, at most two calls are in flight in the lane, and its limit does
/// not grow on calls it never held.
#[tokio::test(start_paused = true)]
async fn a_lane_counts_only_calls_holding_a_process_wide_slot() {
    let upstream = Arc::new(Starts::default());
    let orchestrator = orchestrator(upstream.clone(), "concurrency_limit = 2\n");
    let watch = orchestrator.clone();
    let most = tokio::spawn(async move {
        let mut most = 0;
        for _ in 0..400 {
            if let Some(lane) = watch.lanes().first() {
                most = most.max(lane.in_flight);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        most
    });
    load(&orchestrator, 10, secs(4)).await;
    assert!(most.await.unwrap() <= 2);
    assert_eq!(orchestrator.lanes()[0].limit, 64, "never full, never grown");
}

/// An open breaker fails a call at once, before it queues behind a pause.
#[tokio::test(start_paused = true)]
async fn an_open_breaker_fails_calls_before_they_queue() {
    let upstream = Arc::new(Starts::default());
    let orchestrator = orchestrator(upstream.clone(), "");
    let flow = orchestrator.flow().lane("sim", "sim-1");
    flow.pause(secs(30), "rate_limited");
    let breaker = orchestrator.executor().resilience().breaker("sim", "sim-1");
    breaker.open_until(Instant::now() + secs(60), "test");
    let t0 = Instant::now();
    let response = orchestrator.process("q").await.unwrap();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert!(
        response
            .outcomes
            .iter()
            .all(|o| o.error.as_ref().unwrap().kind == FailureKind::CircuitOpen)
    );
    assert!(upstream.starts.lock().unwrap().is_empty());
}
