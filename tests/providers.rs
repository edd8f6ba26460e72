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
        prompt_cache: false,
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
        assert_eq!(e.kind, ErrorKind::Connection, "{api:?}: {e}");
        assert!(metaorch::resilience::is_retryable(&e));
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

/// What each failure shape of mock-upstream becomes, for both wire formats, plain and
/// streaming: the kind, the HTTP status, and whether it is retried — the README's
/// table, row by row.
#[tokio::test]
async fn every_failure_shape_is_classified_as_documented() {
    use metaorch::resilience::is_retryable;
    // (fault, stream, Anthropic's kind, OpenAI's kind, status, retried); `None` kinds
    // mean the fault does not apply and the call succeeds.
    type Row = (
        MockFault,
        bool,
        Option<ErrorKind>,
        Option<ErrorKind>,
        Option<u16>,
        bool,
    );
    use ErrorKind::*;
    let table: Vec<Row> = [false, true]
        .into_iter()
        .flat_map(|s| {
            [
                (
                    MockFault::RateLimited,
                    s,
                    Some(RateLimited),
                    Some(RateLimited),
                    Some(429),
                    true,
                ),
                (
                    MockFault::RateLimitedBare,
                    s,
                    Some(RateLimited),
                    Some(RateLimited),
                    Some(429),
                    true,
                ),
                (
                    MockFault::Overloaded,
                    s,
                    Some(Overloaded),
                    Some(Server),
                    Some(529),
                    true,
                ),
                (
                    MockFault::Server,
                    s,
                    Some(Server),
                    Some(Server),
                    Some(500),
                    true,
                ),
                (
                    MockFault::GatewayTimeout,
                    s,
                    Some(Timeout),
                    Some(Timeout),
                    Some(504),
                    true,
                ),
                (
                    MockFault::Reset,
                    s,
                    Some(Connection),
                    Some(Connection),
                    None,
                    true,
                ),
                (
                    MockFault::Cut,
                    s,
                    Some(Connection),
                    Some(Connection),
                    None,
                    true,
                ),
                (
                    MockFault::Error200,
                    s,
                    Some(Overloaded),
                    Some(Server),
                    None,
                    true,
                ),
                (
                    MockFault::Malformed,
                    s,
                    Some(MalformedResponse),
                    Some(MalformedResponse),
                    None,
                    false,
                ),
                (
                    MockFault::Oversized,
                    s,
                    Some(MalformedResponse),
                    Some(MalformedResponse),
                    None,
                    false,
                ),
                (
                    MockFault::StreamError,
                    s,
                    s.then_some(Overloaded),
                    s.then_some(Server),
                    None,
                    true,
                ),
                (
                    MockFault::StreamCut,
                    s,
                    s.then_some(Connection),
                    s.then_some(Connection),
                    None,
                    true,
                ),
            ]
        })
        .collect();
    let script: Vec<MockScript> = table
        .iter()
        .map(|(fault, stream, ..)| MockScript {
            matches: format!("shape-{fault}-{stream}."),
            first: 1000,
            fault: *fault,
        })
        .collect();
    let mock = MockUpstream::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        MockOptions {
            latency_min: Duration::from_millis(1),
            latency_max: Duration::from_millis(3),
            script,
            ..MockOptions::default()
        },
    )
    .await
    .unwrap();
    for api in APIS {
        let p = provider(api, &mock.url(), Some("k"));
        for (fault, stream, anthropic, openai, status, retried) in &table {
            let expected = match api {
                Api::Anthropic => anthropic,
                Api::OpenAi => openai,
            };
            let result = p
                .complete(&request(&format!("shape-{fault}-{stream}."), *stream))
                .await;
            let case = format!("{api:?} {fault} stream={stream}");
            match (expected, result) {
                (None, Ok(c)) => assert!(!c.text.is_empty(), "{case}"),
                (None, Err(e)) => panic!("{case}: expected a success, got {e}"),
                (Some(_), Ok(c)) => panic!("{case}: expected a failure, got {:?}", c.text),
                (Some(kind), Err(e)) => {
                    assert_eq!(e.kind, *kind, "{case}: {e}");
                    // OpenAI's endpoint answers 503 where Anthropic's says 529.
                    let status = match (api, fault) {
                        (Api::OpenAi, MockFault::Overloaded) => Some(503),
                        _ => *status,
                    };
                    assert_eq!(e.status, status, "{case}: {e}");
                    assert_eq!(is_retryable(&e), *retried, "{case}: {e}");
                }
            }
        }
    }
    mock.stop().await;
}

/// How a raw server ends its answer.
#[derive(Clone, Copy)]
enum End {
    /// Closes the connection cleanly (FIN).
    Close,
    /// Resets it (RST).
    Reset,
}

/// A server on 127.0.0.1 that answers one request with these bytes, exactly as given,
/// then ends the connection: the failure shapes no well-behaved server produces.
async fn raw_server(answer: Vec<u8>, end: End) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        // Read the request's head and body (its Content-Length).
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let Ok(n) = socket.read(&mut buf).await else {
                return;
            };
            if n == 0 {
                return;
            }
            seen.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
            if let Some(head) = text.find("\r\n\r\n") {
                let length = text[..head]
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if seen.len() >= head + 4 + length {
                    break;
                }
            }
        }
        let _ = socket.write_all(&answer).await;
        let _ = socket.flush().await;
        if let End::Reset = end {
            let _ = socket.set_zero_linger();
        }
        drop(socket);
    });
    url
}

fn head(status: &str, headers: &[&str]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\n");
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// A 429 with a huge body keeps its status and `Retry-After`: the headers decide.
#[tokio::test]
async fn a_huge_429_keeps_its_status_and_retry_after() {
    for api in APIS {
        let mut answer = head(
            "429 Too Many Requests",
            &[
                "content-type: application/json",
                "retry-after: 3",
                "content-length: 10485760",
            ],
        );
        answer.extend(std::iter::repeat_n(b'x', 10 << 20));
        let url = raw_server(answer, End::Close).await;
        let e = provider(api, &url, Some("k"))
            .complete(&request("hello", false))
            .await
            .unwrap_err();
        assert_eq!(
            (e.kind, e.status, e.retry_after),
            (
                ErrorKind::RateLimited,
                Some(429),
                Some(Duration::from_secs(3))
            ),
            "{api:?}: {e}"
        );
    }
}

/// A connection that breaks after the headers is a connection error, retried: a short
/// body, a chunked body cut, a reset mid-body, an event stream cut at an event's end
/// or ended without its closing event.
#[tokio::test]
async fn bodies_cut_after_the_headers_are_connection_errors() {
    use metaorch::resilience::is_retryable;
    let json = "content-type: application/json";
    let sse = "content-type: text/event-stream";
    let chunked = "transfer-encoding: chunked";
    let event = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3}}}\n\n";
    let chunk = |s: &str| format!("{:x}\r\n{s}\r\n", s.len());
    let cases: Vec<(&str, Vec<u8>, End, bool)> = vec![
        (
            "short content-length",
            [
                head("200 OK", &[json, "content-length: 500"]),
                b"{\"id\":\"msg_1\",".to_vec(),
            ]
            .concat(),
            End::Close,
            false,
        ),
        (
            "chunked body cut",
            [
                head("200 OK", &[json, chunked]),
                chunk("{\"id\":\"msg_1\",").into_bytes(),
            ]
            .concat(),
            End::Close,
            false,
        ),
        (
            "reset mid-body",
            [
                head("200 OK", &[json, "content-length: 500"]),
                b"{\"id\":".to_vec(),
            ]
            .concat(),
            End::Reset,
            false,
        ),
        (
            "stream cut at an event's end",
            [head("200 OK", &[sse, chunked]), chunk(event).into_bytes()].concat(),
            End::Close,
            true,
        ),
        (
            "stream cut mid-event",
            [
                head("200 OK", &[sse, chunked]),
                chunk("event: message_start\ndata: {\"ty").into_bytes(),
            ]
            .concat(),
            End::Close,
            true,
        ),
        (
            "stream ended without its closing event",
            [
                head("200 OK", &[sse, chunked]),
                chunk(event).into_bytes(),
                b"0\r\n\r\n".to_vec(),
            ]
            .concat(),
            End::Close,
            true,
        ),
    ];
    for (name, answer, end, stream) in cases {
        let url = raw_server(answer, end).await;
        let e = provider(Api::Anthropic, &url, Some("k"))
            .complete(&request("hello", stream))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Connection, "{name}: {e}");
        assert!(is_retryable(&e), "{name}");
    }
}

/// A 200 is read for what it says: an error object is that error, a body of the wrong
/// shape is malformed, and a reply with no text but a normal stop is a success.
#[tokio::test]
async fn a_200_is_what_its_body_says() {
    use metaorch::resilience::is_retryable;
    let ok = |body: &str| {
        [
            head(
                "200 OK",
                &[
                    "content-type: application/json",
                    &format!("content-length: {}", body.len()),
                ],
            ),
            body.as_bytes().to_vec(),
        ]
        .concat()
    };
    let cases = [
        (
            Api::Anthropic,
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            Some((ErrorKind::Overloaded, true)),
        ),
        (
            Api::Anthropic,
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: too big"}}"#,
            Some((ErrorKind::BadRequest, false)),
        ),
        (
            Api::Anthropic,
            r#"{"foo":"bar"}"#,
            Some((ErrorKind::MalformedResponse, false)),
        ),
        (
            Api::Anthropic,
            r#"{"type":"message","content":[],"stop_reason":"end_turn","usage":{"input_tokens":3,"output_tokens":0}}"#,
            None,
        ),
        (
            Api::OpenAi,
            r#"{"error":{"message":"bad","type":"invalid_request_error","param":null,"code":null}}"#,
            Some((ErrorKind::BadRequest, false)),
        ),
        (
            Api::OpenAi,
            r#"{"foo":"bar"}"#,
            Some((ErrorKind::MalformedResponse, false)),
        ),
        (
            Api::OpenAi,
            r#"{"choices":[{"index":0}]}"#,
            Some((ErrorKind::MalformedResponse, false)),
        ),
        (
            Api::OpenAi,
            r#"{"choices":[{"index":0,"message":{"role":"assistant","content":null},"finish_reason":"stop"}]}"#,
            None,
        ),
    ];
    for (api, body, expected) in cases {
        let url = raw_server(ok(body), End::Close).await;
        let result = provider(api, &url, Some("k"))
            .complete(&request("hello", false))
            .await;
        match (expected, result) {
            (None, Ok(c)) => assert_eq!(c.text, "", "{api:?} {body}"),
            (Some((kind, retried)), Err(e)) => {
                assert_eq!(e.kind, kind, "{api:?} {body}: {e}");
                assert_eq!(is_retryable(&e), retried, "{api:?} {body}");
            }
            (expected, result) => panic!("{api:?} {body}: expected {expected:?}, got {result:?}"),
        }
    }
}
