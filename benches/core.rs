//! Micro-benchmarks of the hot path: one request's fan-out to six agents that answer at
//! once (the orchestrator's own cost per request), a limiter acquire/release, a backoff
//! draw, and one JSON log line.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use criterion::{Criterion, criterion_group, criterion_main};
use metaorch::Orchestrator;
use metaorch::limits::{ConcurrencyLimit, Limiter};
use metaorch::provider::{Completion, CompletionRequest, Provider, ProviderError, Usage};
use metaorch::resilience::{Jitter, RetryPolicy};
use metaorch::telemetry::JsonLayer;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tracing_subscriber::layer::SubscriberExt;

/// Answers at once, without touching the timer.
#[derive(Debug)]
struct Instant;

#[async_trait]
impl Provider for Instant {
    fn kind(&self) -> &'static str {
        "instant"
    }

    async fn complete(&self, request: &CompletionRequest) -> Result<Completion, ProviderError> {
        Ok(Completion {
            text: format!("reply from {}", request.meta.agent_id),
            stop_reason: Some("end_turn".into()),
            usage: Usage {
                input_tokens: 10,
                output_tokens: 5,
                ..Usage::default()
            },
            ..Completion::default()
        })
    }
}

fn fan_out(c: &mut Criterion) {
    for (name, flavor) in [("current_thread", false), ("multi_thread", true)] {
        let runtime = if flavor {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .unwrap()
        } else {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let orchestrator = runtime.block_on(async {
            Orchestrator::builder()
                .provider("sim", Arc::new(Instant))
                .build()
                .unwrap()
        });
        c.bench_function(&format!("request_six_agents_{name}"), |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let response = orchestrator.process(black_box("What now?")).await.unwrap();
                    assert!(response.ok);
                    response
                })
            })
        });
    }
}

fn limiter(c: &mut Criterion) {
    let limit = ConcurrencyLimit::new(6);
    c.bench_function("limiter_try_acquire_release", |b| {
        b.iter(|| drop(black_box(limit.try_acquire())))
    });
}

fn backoff(c: &mut Criterion) {
    let policy = RetryPolicy {
        jitter: Jitter::Full,
        ..RetryPolicy::default()
    };
    let mut rng = SmallRng::seed_from_u64(1);
    c.bench_function("backoff_full_jitter", |b| {
        b.iter(|| policy.delay(black_box(3), Duration::ZERO, &mut rng))
    });
}

fn log_line(c: &mut Criterion) {
    let subscriber = tracing_subscriber::registry().with(JsonLayer::new(std::io::sink));
    tracing::subscriber::with_default(subscriber, || {
        let request =
            tracing::error_span!("request", trace_id = "4bf92f3577b34da6a3ce929d0e0e4736");
        let _r = request.enter();
        let agent = tracing::error_span!(
            "agent",
            agent_id = "critic",
            provider = "claude",
            model = "claude-sonnet-4-5"
        );
        let _a = agent.enter();
        c.bench_function("json_log_line", |b| {
            b.iter(|| {
                tracing::warn!(
                    event = "agent.retry",
                    attempt = 1,
                    next_attempt = 2,
                    delay_ms = 812.5,
                    delay_source = "backoff",
                    error.kind = "overloaded",
                    error.message = "overloaded_error: Overloaded",
                    status = 529,
                    "attempt 1 failed (overloaded); retrying in 0.813 s (backoff)"
                )
            })
        });
    });
}

criterion_group!(benches, fan_out, limiter, backoff, log_line);
criterion_main!(benches);
