//! The executor's promises: one outcome per agent in order, limits, deadlines, panics
//! contained (DESIGN.md invariants 1–3).

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Behaviour, InFlightCounter, SIX, Scripted, server_error, tasks};
use metaorch::executor::{Executor, FailureKind, OutcomeStatus};
use metaorch::limits::ConcurrencyLimit;
use metaorch::resilience::CallPolicy;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn executor(limit: usize) -> Executor {
    Executor::new(Arc::new(ConcurrencyLimit::new(limit)))
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// UT-EXEC-001: all six succeed → six outcomes, each tagged with its agent id, in
/// config order — even though they finish in a different order.
#[tokio::test(start_paused = true)]
async fn ut_exec_001_six_successes_in_config_order() {
    let latencies = [600, 100, 500, 200, 400, 300];
    let script: Vec<_> = SIX
        .iter()
        .zip(latencies)
        .map(|(id, l)| (*id, Behaviour::Reply(ms(l))))
        .collect();
    let provider = Arc::new(Scripted::new(&script));
    let started = Instant::now();
    let outcomes = executor(6)
        .run(
            tasks(&SIX, provider),
            started + ms(10_000),
            &CancellationToken::new(),
        )
        .await;

    let ids: Vec<_> = outcomes.iter().map(|o| o.agent_id.as_str()).collect();
    assert_eq!(ids, SIX);
    for (o, l) in outcomes.iter().zip(latencies) {
        assert_eq!(o.status, OutcomeStatus::Succeeded);
        assert_eq!(
            o.output.as_deref(),
            Some(format!("reply from {}", o.agent_id).as_str())
        );
        assert_eq!(o.attempts, 1);
        assert_eq!(o.latency, ms(l));
        assert_eq!(o.provider_latency, ms(l));
        assert!(o.error.is_none());
    }
    assert_eq!(
        started.elapsed(),
        ms(600),
        "parallel: the slowest agent, not the sum"
    );
}

#[tokio::test(start_paused = true)]
async fn a_panicking_agent_becomes_a_failed_outcome_and_the_others_complete() {
    let provider = Arc::new(Scripted::new(&[
        ("critic", Behaviour::Panic("boom in critic")),
        ("writer", Behaviour::Reply(ms(50))),
    ]));
    let outcomes = executor(6)
        .run(
            tasks(&SIX, provider),
            Instant::now() + ms(1_000),
            &CancellationToken::new(),
        )
        .await;

    assert_eq!(outcomes.len(), 6);
    let critic = &outcomes[2];
    assert_eq!(critic.agent_id, "critic");
    assert_eq!(critic.status, OutcomeStatus::Failed);
    let error = critic.error.as_ref().unwrap();
    assert_eq!(error.kind, FailureKind::Panicked);
    assert!(
        error.message.contains("boom in critic"),
        "{}",
        error.message
    );
    assert_eq!(critic.attempts, 1);
    assert!(
        outcomes
            .iter()
            .filter(|o| o.agent_id != "critic")
            .all(|o| o.status == OutcomeStatus::Succeeded)
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_agent_keeps_its_classified_error() {
    let provider = Arc::new(Scripted::new(&[(
        "analyst",
        Behaviour::Fail(ms(20), server_error()),
    )]));
    // Tried once: retries are the resilience tests' business.
    let once = Arc::new(CallPolicy::once());
    let tasks = tasks(&SIX, provider)
        .into_iter()
        .map(|t| t.with_policy(Arc::clone(&once)))
        .collect();
    let outcomes = executor(6)
        .run(tasks, Instant::now() + ms(1_000), &CancellationToken::new())
        .await;
    let analyst = &outcomes[1];
    assert_eq!(analyst.status, OutcomeStatus::Failed);
    let error = analyst.error.as_ref().unwrap();
    assert_eq!(error.kind.as_str(), "server");
    assert_eq!(error.status, Some(500));
    assert_eq!(analyst.latency, ms(20));
    assert_eq!(outcomes.iter().filter(|o| o.succeeded()).count(), 5);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_turns_unfinished_agents_into_timed_out_outcomes() {
    let provider = Arc::new(Scripted::new(&[
        ("researcher", Behaviour::Hang),
        ("planner", Behaviour::Reply(ms(5_000))),
        ("writer", Behaviour::Reply(ms(100))),
    ]));
    let started = Instant::now();
    let outcomes = executor(6)
        .run(
            tasks(&SIX, provider),
            started + ms(1_000),
            &CancellationToken::new(),
        )
        .await;

    assert_eq!(
        started.elapsed(),
        ms(1_000),
        "returns at the deadline, not later"
    );
    assert_eq!(outcomes.len(), 6);
    for id in ["researcher", "planner"] {
        let o = outcomes.iter().find(|o| o.agent_id == id).unwrap();
        assert_eq!(o.status, OutcomeStatus::TimedOut, "{id}");
        assert_eq!(
            o.error.as_ref().unwrap().kind,
            FailureKind::DeadlineExceeded
        );
        assert_eq!(o.attempts, 1, "{id} had started its call");
        assert_eq!(o.latency, ms(1_000));
    }
    assert_eq!(outcomes.iter().filter(|o| o.succeeded()).count(), 4);
}

#[tokio::test(start_paused = true)]
async fn agents_still_queued_at_the_deadline_report_zero_attempts() {
    // One slot, three agents of 600 ms each, a 1 s deadline: the first finishes, the
    // second is cut off mid-call, the third never gets a slot.
    let provider = Arc::new(Scripted::new(&[
        ("a", Behaviour::Reply(ms(600))),
        ("b", Behaviour::Reply(ms(600))),
        ("c", Behaviour::Reply(ms(600))),
    ]));
    let outcomes = executor(1)
        .run(
            tasks(&["a", "b", "c"], provider),
            Instant::now() + ms(1_000),
            &CancellationToken::new(),
        )
        .await;
    let statuses: Vec<_> = outcomes.iter().map(|o| (o.status, o.attempts)).collect();
    assert_eq!(
        statuses,
        [
            (OutcomeStatus::Succeeded, 1),
            (OutcomeStatus::TimedOut, 1),
            (OutcomeStatus::TimedOut, 0),
        ]
    );
    assert_eq!(
        outcomes[2].queue_wait,
        ms(1_000),
        "waited the whole time for a slot"
    );
}

#[tokio::test(start_paused = true)]
async fn cancellation_reports_every_unfinished_agent() {
    let provider = Arc::new(Scripted::new(&[
        ("researcher", Behaviour::Reply(ms(10))),
        ("analyst", Behaviour::Hang),
    ]));
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(ms(200)).await;
        trigger.cancel();
    });
    let started = Instant::now();
    let outcomes = executor(6)
        .run(
            tasks(&["researcher", "analyst"], provider),
            started + ms(60_000),
            &cancel,
        )
        .await;
    assert_eq!(started.elapsed(), ms(200));
    assert_eq!(outcomes[0].status, OutcomeStatus::Succeeded);
    assert_eq!(outcomes[1].status, OutcomeStatus::TimedOut);
    assert_eq!(
        outcomes[1].error.as_ref().unwrap().kind,
        FailureKind::Cancelled
    );
}

#[tokio::test(start_paused = true)]
async fn no_tasks_no_outcomes() {
    let outcomes = executor(2)
        .run(
            Vec::new(),
            Instant::now() + ms(10),
            &CancellationToken::new(),
        )
        .await;
    assert!(outcomes.is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_limit_holds_within_one_request() {
    let counter = Arc::new(InFlightCounter::new(ms(100)));
    let ids: Vec<String> = (0..20).map(|i| format!("agent-{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let exec = executor(3);
    let started = Instant::now();
    let outcomes = exec
        .run(
            tasks(&ids, counter.clone()),
            started + ms(60_000),
            &CancellationToken::new(),
        )
        .await;
    assert_eq!(outcomes.len(), 20);
    assert!(outcomes.iter().all(|o| o.succeeded()));
    assert_eq!(counter.max.load(Ordering::SeqCst), 3);
    assert_eq!(started.elapsed(), ms(700), "ceil(20 / 3) waves of 100 ms");
    assert_eq!(exec.limiter().in_flight(), 0, "every permit came back");
}

/// Records the order in which agents' calls start.
#[derive(Debug, Default)]
struct StartOrder(std::sync::Mutex<Vec<String>>);

#[async_trait::async_trait]
impl metaorch::provider::Provider for StartOrder {
    fn kind(&self) -> &'static str {
        "order"
    }

    async fn complete(
        &self,
        request: &metaorch::provider::CompletionRequest,
    ) -> Result<metaorch::provider::Completion, metaorch::provider::ProviderError> {
        self.0.lock().unwrap().push(request.meta.agent_id.clone());
        tokio::time::sleep(ms(100)).await;
        Ok(common::reply(request, ms(100)))
    }
}

/// Under a limit, each request's agents start in config order, and requests sharing the
/// limiter take turns: a request waits for one slot at a time, so a large request
/// cannot starve a small one.
#[tokio::test(start_paused = true)]
async fn agents_start_in_config_order_and_requests_take_turns() {
    let provider = Arc::new(StartOrder::default());
    let executor = executor(2);
    let first = tasks(&SIX, provider.clone());
    let second: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|id| common::task(id, provider.clone()))
        .collect();
    let deadline = Instant::now() + ms(10_000);
    let cancel = CancellationToken::new();
    let (one, two) = tokio::join!(
        executor.run(first, deadline, &cancel),
        executor.run(second, deadline, &cancel)
    );
    assert!(one.iter().chain(&two).all(|o| o.succeeded()));
    let order = provider.0.lock().unwrap().clone();
    assert_eq!(
        order,
        [
            "researcher",
            "analyst",
            "a",
            "critic",
            "planner",
            "b",
            "c",
            "fact-checker",
            "writer"
        ]
    );
}
