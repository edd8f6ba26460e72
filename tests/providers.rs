//! The HTTP providers against `mock-upstream`, over real sockets on 127.0.0.1: every
//! success and failure shape of both wire formats, classified as the resilience layer
//! expects.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metaorch::executor::{AgentTask, Executor, FailureKind, OutcomeStatus};
use metaorch::limits::ConcurrencyLimit;
use metaorch::mock_upstream::{MockFault, MockOptions, MockScript, MockUpstream};
use metaorch::provider::{
    AnthropicOptions, AnthropicProvider, CompletionRequest, ErrorKind, OpenAiOptions,
    OpenAiProvider, Provider, RequestMeta, Secret,
};
use metaorch::resilience::{CallPolicy, DelaySource, Resilience, RetryPolicy};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

async fn mock(script: &[(&str, MockFault)]) -> MockUpstream {
    let options = MockOptions {
        latency_min: Duration::from_millis(1),
        latency_max: Duration::from_millis(5),
        seed: 3,
        script: script
            .iter()
            .map(|(text, fault)| MockScript {
                matches: (*text).to_owned(),
                first: 1,
                fault: *fault,
            })
            .collect(),
        retry_after: Duration::from_millis(200),
        ..MockOptions::default()
    };
    MockUpstream::start(SocketAddr::from(([127, 0, 0, 1], 0)), options)
        .await
        .expect("the mock binds an ephemeral port")
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Api {
    Anthropic,
    OpenAi,
}

fn provider(api: Api, url: &str, key: Option<&str>) -> Arc<dyn Provider> {
    let api_key = key.map(Secret::new);
    match api {
        Api::Anthropic => Arc::new(AnthropicProvider::new(AnthropicOptions {
            base_url: url.to_owned(),
            api_key,
            ..AnthropicOptions::default()
        })),
        Api::OpenAi => Arc::new(OpenAiProvider::new(OpenAiOptions {
            base_url: format!("{url}/v1"),
            api_key,
            ..OpenAiOptions::default()
        })),
    }
}

fn request(prompt: &str, stream: bool) -> CompletionRequest {
    CompletionRequest {
        model: "test-model".into(),
        system: Some("You are terse.".into()),
        prompt: prompt.into(),
        max_tokens: 256,
        temperature: Some(0.2),
        stream,
        meta: RequestMeta {
            trace_id: TRACE.into(),
            agent_id: "a".into(),
            attempt: 1,
        },
        ..CompletionRequest::default()
    }
}

const APIS: [Api; 2] = [Api::Anthropic, Api::OpenAi];

#[tokio::test]
async fn success_plain_and_streaming() {
    let mock = mock(&[]).await;
    for api in APIS {
        let p = provider(api, &mock.url(), Some("test-key"));
        for stream in [false, true] {
            let c = p
                .complete(&request("What is a circuit breaker?", stream))
                .await
                .unwrap_or_else(|e| panic!("{api:?} stream={stream}: {e}"));
            assert!(
                c.text.starts_with("[mock reply from test-model]"),
                "{}",
                c.text
            );
            assert!(c.text.contains("What is a circuit breaker?"), "{}", c.text);
            assert!(
                c.usage.input_tokens > 0 && c.usage.output_tokens > 0,
                "{api:?} {stream}"
            );
            assert!(c.stop_reason.is_some());
            assert!(c.request_id.is_some(), "{api:?}");
            // No account limits are configured, so no rate-limit headers are sent.
            assert_eq!(c.rate_limits, None, "{api:?} stream={stream}");
        }
    }
    let records = mock.requests();
    assert_eq!(records.len(), 4);
    for r in &records {
        assert_eq!(r.status, 200);
        let tp = r.traceparent.as_deref().expect("traceparent sent");
        assert!(tp.starts_with(&format!("00-{TRACE}-")), "{tp}");
    }
    mock.stop().await;
}

#[tokio::test]
async fn every_error_status_is_classified() {
    let cases = [
        ("case-429", MockFault::RateLimited),
        ("case-bare-429", MockFault::RateLimitedBare),
        ("case-529", MockFault::Overloaded),
        ("case-500", MockFault::Server),
        ("case-504", MockFault::GatewayTimeout),
    ];
    let mock = mock(&cases).await;
    for api in APIS {
        let p = provider(api, &mock.url(), Some("test-key"));
        let expected = [
            (
                ErrorKind::RateLimited,
                429,
                Some(Duration::from_millis(200)),
            ),
            (ErrorKind::RateLimited, 429, None),
            match api {
                Api::Anthropic => (ErrorKind::Overloaded, 529, None),
                Api::OpenAi => (ErrorKind::Server, 503, None),
            },
            (ErrorKind::Server, 500, None),
            (ErrorKind::Timeout, 504, None),
        ];
        for ((prompt, _), (kind, status, retry_after)) in cases.iter().zip(expected) {
            let e = p.complete(&request(prompt, false)).await.unwrap_err();
            assert_eq!(
                (e.kind, e.status),
                (kind, Some(status)),
                "{api:?} {prompt}: {e}"
            );
            assert_eq!(e.retry_after, retry_after, "{api:?} {prompt}");
            assert!(metaorch::resilience::is_retryable(&e));
            assert!(e.message.contains("request-id"), "{e}");
        }
        // No key: 401, never retried.
        let e = provider(api, &mock.url(), None)
            .complete(&request("hello", false))
            .await
            .unwrap_err();
        assert_eq!((e.kind, e.status), (ErrorKind::Auth, Some(401)));
        assert!(!metaorch::resilience::is_retryable(&e));
        // A request the server refuses: 400, never retried.
        let mut bad = request("hello", false);
        bad.model.clear();
        let e = p.complete(&bad).await.unwrap_err();
        assert_eq!(
            (e.kind, e.status),
            (ErrorKind::BadRequest, Some(400)),
            "{e}"
        );
        assert!(e.message.contains("model"), "{e}");
    }
    mock.stop().await;
}

#[tokio::test]
async fn broken_bodies_and_streams_are_errors_not_panics() {
    let mock = mock(&[
        ("case-malformed", MockFault::Malformed),
        ("case-oversized", MockFault::Oversized),
        ("case-stream-error", MockFault::StreamError),
        ("case-stream-cut", MockFault::StreamCut),
        ("case-reset", MockFault::Reset),
    ])
    .await;
    for api in APIS {
        let p = provider(api, &mock.url(), Some("test-key"));
        let e = p
            .complete(&request("case-malformed", false))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::MalformedResponse, "{api:?}: {e}");
        let e = p
            .complete(&request("case-oversized", false))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::MalformedResponse, "{api:?}: {e}");
        assert!(e.message.contains("larger than"), "{e}");

        let e = p
            .complete(&request("case-stream-error", true))
            .await
            .unwrap_err();
        assert_eq!(e.status, None, "the error came after a 200");
        let expected = match api {
            Api::Anthropic => ErrorKind::Overloaded,
            Api::OpenAi => ErrorKind::Server,
        };
        assert_eq!(e.kind, expected, "{api:?}: {e}");
        assert!(metaorch::resilience::is_retryable(&e));

        let e = p
            .complete(&request("case-stream-cut", true))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Connection, "{api:?}: {e}");
        assert!(e.message.contains("incomplete"), "{e}");

        let e = p.complete(&request("case-reset", false)).await.unwrap_err();
        assert!(
            matches!(e.kind, ErrorKind::Connection | ErrorKind::MalformedResponse),
            "{api:?}: {e}"
        );
    }
    mock.stop().await;
}

#[tokio::test]
async fn connection_refused_is_a_connection_error() {
    // A port that was free a moment ago and has no listener now.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    for api in APIS {
        let e = provider(api, &url, Some("k"))
            .complete(&request("hello", false))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Connection, "{api:?}: {e}");
    }
}

fn executor() -> Executor {
    Executor::with_resilience(
        Arc::new(ConcurrencyLimit::new(4)),
        Arc::new(Resilience::new(
            Default::default(),
            Default::default(),
            Some(1),
        )),
    )
}

fn task(provider: Arc<dyn Provider>, prompt: &str, policy: CallPolicy) -> AgentTask {
    AgentTask::new("a", "mock", provider, request(prompt, false)).with_policy(Arc::new(policy))
}

#[tokio::test]
async fn retry_after_is_honoured_end_to_end() {
    let mock = mock(&[("case-429", MockFault::RateLimited)]).await;
    for api in APIS {
        let p = provider(api, &mock.url(), Some("k"));
        let outcome = executor()
            .run(
                vec![task(p, &format!("case-429 {api:?}"), CallPolicy::default())],
                Instant::now() + Duration::from_secs(10),
                &CancellationToken::new(),
            )
            .await
            .remove(0);
        assert_eq!(outcome.status, OutcomeStatus::Succeeded, "{outcome:?}");
        assert_eq!(outcome.attempts, 2);
        let retry = &outcome.retries[0];
        assert_eq!(retry.source, DelaySource::RetryAfter);
        assert_eq!(retry.delay, Duration::from_millis(200));
        assert_eq!(retry.status, Some(429));
    }
    mock.stop().await;
}

#[tokio::test]
async fn a_hang_ends_at_the_attempt_timeout() {
    let mock = mock(&[("case-hang", MockFault::Hang)]).await;
    let policy = CallPolicy {
        retry: RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        },
        attempt_timeout: Some(Duration::from_millis(300)),
    };
    for api in APIS {
        let p = provider(api, &mock.url(), Some("k"));
        let outcome = executor()
            .run(
                vec![task(p, "case-hang", policy.clone())],
                Instant::now() + Duration::from_secs(10),
                &CancellationToken::new(),
            )
            .await
            .remove(0);
        let error = outcome.error.unwrap();
        assert_eq!(
            error.kind,
            FailureKind::Provider(ErrorKind::Timeout),
            "{api:?}"
        );
        assert!(
            error.message.contains("attempt timeout"),
            "{}",
            error.message
        );
    }
    mock.stop().await;
}
