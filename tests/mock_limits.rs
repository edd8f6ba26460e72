//! `mock-upstream`'s account limits over real sockets on 127.0.0.1, seen by a plain
//! HTTP client: refusals with each API's status, body and retry headers, rate-limit
//! headers on successes, none when no limit is set, and the request log's `limited_by`.
//!
//! These run on real time: latencies are short and no wait is longer than the limits
//! force (a fifth of a second at most).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use metaorch::mock_upstream::{MockFault, MockOptions, MockScript, MockUpstream};
use metaorch::provider::{
    AccountLimits, AnthropicOptions, AnthropicProvider, CompletionRequest, ErrorKind,
    OpenAiOptions, OpenAiProvider, Provider, Secret,
};
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Api {
    Anthropic,
    OpenAi,
}

const APIS: [Api; 2] = [Api::Anthropic, Api::OpenAi];

async fn mock(latency: Duration, limits: AccountLimits) -> MockUpstream {
    mock_with(MockOptions {
        latency_min: latency,
        latency_max: latency,
        limits,
        ..MockOptions::default()
    })
    .await
}

async fn mock_with(options: MockOptions) -> MockUpstream {
    MockUpstream::start(SocketAddr::from(([127, 0, 0, 1], 0)), options)
        .await
        .expect("the mock binds an ephemeral port")
}

/// A response, read to the end.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn number(&self, name: &str) -> u64 {
        self.header(name)
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn rate_limit_headers(&self) -> Vec<&str> {
        self.headers
            .keys()
            .map(|k| k.as_str())
            .filter(|k| k.starts_with("anthropic-ratelimit-") || k.starts_with("x-ratelimit-"))
            .collect()
    }
}

fn request(api: Api, url: &str, prompt: &str, stream: bool) -> reqwest::RequestBuilder {
    let client = reqwest::Client::new();
    let body = json!({
        "model": "test-model",
        "max_tokens": 64,
        "stream": stream,
        "messages": [{"role": "user", "content": prompt}]
    });
    match api {
        Api::Anthropic => client
            .post(format!("{url}/v1/messages"))
            .header("x-api-key", "test-key")
            .header("anthropic-version", "2023-06-01")
            .json(&body),
        Api::OpenAi => client
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth("test-key")
            .json(&body),
    }
}

async fn send(api: Api, url: &str, prompt: &str) -> Reply {
    let response = request(api, url, prompt, false)
        .send()
        .await
        .expect("the mock answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.expect("a JSON body");
    Reply {
        status,
        headers,
        body,
    }
}

/// The error type in either API's error body (`error.type` in both).
fn error_type(body: &Value) -> &str {
    body["error"]["type"]
        .as_str()
        .unwrap_or_else(|| panic!("no error type in {body}"))
}

fn requests_remaining(api: Api) -> &'static str {
    match api {
        Api::Anthropic => "anthropic-ratelimit-requests-remaining",
        Api::OpenAi => "x-ratelimit-remaining-requests",
    }
}

#[tokio::test]
async fn max_concurrent_refuses_the_request_past_it_as_overloaded_until_one_finishes() {
    for api in APIS {
        let mock = mock(
            Duration::from_millis(300),
            AccountLimits {
                max_concurrent: Some(2),
                ..AccountLimits::default()
            },
        )
        .await;
        let url = mock.url();
        let (a, b, c) = tokio::join!(
            send(api, &url, "first"),
            send(api, &url, "second"),
            send(api, &url, "third"),
        );
        let replies = [a, b, c];
        let refused: Vec<&Reply> = replies.iter().filter(|r| r.status != 200).collect();
        assert_eq!(refused.len(), 1, "{api:?}: {replies:?}");
        let refused = refused[0];
        match api {
            Api::Anthropic => {
                assert_eq!(refused.status, 529);
                assert_eq!(error_type(&refused.body), "overloaded_error");
            }
            Api::OpenAi => {
                assert_eq!(refused.status, 503);
                assert_eq!(error_type(&refused.body), "server_error");
            }
        }
        assert_eq!(refused.header("retry-after"), None, "{api:?}");
        assert_eq!(refused.header("retry-after-ms"), None, "{api:?}");
        // Concurrency alone sets no rate limit, so no rate-limit headers either.
        assert!(refused.rate_limit_headers().is_empty(), "{api:?}");

        assert_eq!(mock.in_flight(), 0);
        assert_eq!(send(api, &url, "fourth").await.status, 200, "{api:?}");

        let records = mock.requests();
        let limited: Vec<_> = records.iter().filter(|r| r.limited_by.is_some()).collect();
        assert_eq!(limited.len(), 1, "{api:?}: {records:?}");
        assert_eq!(limited[0].limited_by, Some("max_concurrent"));
        assert_eq!(limited[0].fault, Some("overloaded"));
        assert_eq!(limited[0].status, refused.status);
        mock.stop().await;
    }
}

#[tokio::test]
async fn rps_refuses_the_sixth_of_a_burst_with_retry_after_and_admits_after_the_wait() {
    for api in APIS {
        let mock = mock(
            Duration::ZERO,
            AccountLimits {
                rps: Some(5.0),
                ..AccountLimits::default()
            },
        )
        .await;
        let url = mock.url();
        for i in 0..5 {
            let ok = send(api, &url, &format!("burst {i}")).await;
            assert_eq!(ok.status, 200, "{api:?} request {i}: {ok:?}");
            assert_eq!(ok.number(requests_remaining(api)), 4 - i);
        }
        let refused = send(api, &url, "burst 5").await;
        assert_eq!(refused.status, 429, "{api:?}: {refused:?}");
        let wait_ms = refused.number("retry-after-ms");
        assert!(wait_ms > 0 && wait_ms <= 200, "{api:?}: {wait_ms} ms");
        assert_eq!(refused.number("retry-after"), 1);
        assert_eq!(refused.number(requests_remaining(api)), 0);
        match api {
            Api::Anthropic => {
                assert_eq!(error_type(&refused.body), "rate_limit_error");
                assert_eq!(refused.number("anthropic-ratelimit-requests-limit"), 300);
                assert!(refused.body["request_id"].is_string());
            }
            Api::OpenAi => {
                assert_eq!(error_type(&refused.body), "requests");
                assert_eq!(refused.body["error"]["code"], "rate_limit_exceeded");
                assert_eq!(refused.body["error"]["param"], Value::Null);
                assert_eq!(refused.number("x-ratelimit-limit-requests"), 300);
            }
        }

        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        let again = send(api, &url, "burst 5").await;
        assert_eq!(again.status, 200, "{api:?} after {wait_ms} ms: {again:?}");

        let records = mock.requests();
        assert_eq!(records.len(), 7);
        assert_eq!(records[5].limited_by, Some("rps"));
        assert_eq!(records[5].fault, Some("rate_limited"));
        assert_eq!(records[5].status, 429);
        // A refused request is not counted, so its retry is seen for the first time.
        assert_eq!((records[5].seen, records[6].seen), (0, 1));
        mock.stop().await;
    }
}

#[tokio::test]
async fn an_anthropic_200_reports_requests_and_input_tokens_with_rfc3339_resets() {
    let mock = mock(
        Duration::from_millis(1),
        AccountLimits {
            rpm: Some(600),
            tpm: Some(60_000),
            ..AccountLimits::default()
        },
    )
    .await;
    let before = SystemTime::now();
    let ok = send(Api::Anthropic, &mock.url(), "What is a token bucket?").await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let input = ok.body["usage"]["input_tokens"].as_u64().unwrap();
    assert_eq!(ok.number("anthropic-ratelimit-requests-limit"), 600);
    assert_eq!(ok.number("anthropic-ratelimit-requests-remaining"), 9);
    for prefix in [
        "anthropic-ratelimit-input-tokens",
        "anthropic-ratelimit-tokens",
    ] {
        assert_eq!(ok.number(&format!("{prefix}-limit")), 60_000);
        assert_eq!(ok.number(&format!("{prefix}-remaining")), 60_000 - input);
    }
    for name in [
        "anthropic-ratelimit-requests-reset",
        "anthropic-ratelimit-input-tokens-reset",
        "anthropic-ratelimit-tokens-reset",
    ] {
        let text = ok.header(name).unwrap();
        assert!(text.ends_with('Z') && text.len() == 20, "{name}: {text}");
        let at = humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        // Whole seconds, rounded up: between now and a couple of seconds on.
        let ahead = at.duration_since(before - Duration::from_secs(1)).unwrap();
        assert!(ahead <= Duration::from_secs(3), "{name}: {text}");
    }
    mock.stop().await;
}

#[tokio::test]
async fn an_openai_200_reports_requests_and_tokens_with_go_duration_resets() {
    let mock = mock(
        Duration::from_millis(1),
        AccountLimits {
            rpm: Some(600),
            tpm: Some(60_000),
            ..AccountLimits::default()
        },
    )
    .await;
    let ok = send(Api::OpenAi, &mock.url(), "What is a token bucket?").await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let input = ok.body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(ok.number("x-ratelimit-limit-requests"), 600);
    assert_eq!(ok.number("x-ratelimit-remaining-requests"), 9);
    // One request of ten a second: full again in 100 ms.
    assert_eq!(ok.header("x-ratelimit-reset-requests"), Some("100ms"));
    assert_eq!(ok.number("x-ratelimit-limit-tokens"), 60_000);
    assert_eq!(ok.number("x-ratelimit-remaining-tokens"), 60_000 - input);
    // 1,000 tokens a second: full again in one millisecond per token.
    assert!(input < 1000);
    assert_eq!(
        ok.header("x-ratelimit-reset-tokens"),
        Some(format!("{input}ms").as_str())
    );
    mock.stop().await;
}

#[tokio::test]
async fn a_token_limit_refusal_says_tokens() {
    for api in APIS {
        let mock = mock(
            Duration::ZERO,
            AccountLimits {
                tpm: Some(10),
                ..AccountLimits::default()
            },
        )
        .await;
        let prompt = "a prompt of well over ten tokens, which a full bucket still admits once";
        assert_eq!(send(api, &mock.url(), prompt).await.status, 200);
        let refused = send(api, &mock.url(), prompt).await;
        assert_eq!(refused.status, 429, "{api:?}: {refused:?}");
        match api {
            Api::Anthropic => {
                assert_eq!(error_type(&refused.body), "rate_limit_error");
                assert_eq!(
                    refused.number("anthropic-ratelimit-input-tokens-remaining"),
                    0
                );
            }
            Api::OpenAi => {
                assert_eq!(error_type(&refused.body), "tokens");
                assert_eq!(refused.number("x-ratelimit-remaining-tokens"), 0);
            }
        }
        assert!(refused.number("retry-after") > 60, "{api:?}: {refused:?}");
        assert_eq!(mock.requests()[1].limited_by, Some("tpm"));
        mock.stop().await;
    }
}

#[tokio::test]
async fn without_limits_no_rate_limit_headers_are_sent() {
    let mock = mock_with(MockOptions {
        latency_min: Duration::from_millis(1),
        latency_max: Duration::from_millis(1),
        script: vec![MockScript {
            matches: "scripted".into(),
            first: 1,
            fault: MockFault::RateLimited,
        }],
        ..MockOptions::default()
    })
    .await;
    for api in APIS {
        let ok = send(api, &mock.url(), "plain").await;
        assert_eq!(ok.status, 200);
        let faulted = send(api, &mock.url(), &format!("scripted {api:?}")).await;
        assert_eq!(faulted.status, 429);
        for reply in [ok, faulted] {
            assert!(
                reply.rate_limit_headers().is_empty(),
                "{api:?}: {:?}",
                reply.headers
            );
        }
    }
    assert!(mock.requests().iter().all(|r| r.limited_by.is_none()));
    mock.stop().await;
}

#[tokio::test]
async fn a_stream_holds_its_concurrency_slot_until_its_last_event() {
    for api in APIS {
        let mock = mock(
            Duration::from_millis(300),
            AccountLimits {
                max_concurrent: Some(1),
                ..AccountLimits::default()
            },
        )
        .await;
        let url = mock.url();
        let mut stream = request(api, &url, "stream me", true)
            .send()
            .await
            .expect("the stream starts");
        assert_eq!(stream.status(), 200);
        assert_eq!(mock.in_flight(), 1, "{api:?}");
        let meanwhile = send(api, &url, "meanwhile").await;
        assert!(
            meanwhile.status == 529 || meanwhile.status == 503,
            "{meanwhile:?}"
        );
        let mut body = Vec::new();
        while let Some(chunk) = stream.chunk().await.expect("the stream completes") {
            body.extend_from_slice(&chunk);
        }
        assert!(!body.is_empty());
        assert_eq!(mock.in_flight(), 0, "{api:?}");
        assert_eq!(send(api, &url, "after").await.status, 200, "{api:?}");
        mock.stop().await;
    }
}

#[tokio::test]
async fn the_log_line_names_the_limit_that_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("mock.jsonl");
    let mock = mock_with(MockOptions {
        latency_min: Duration::ZERO,
        latency_max: Duration::ZERO,
        request_log: Some(log.clone()),
        limits: AccountLimits {
            rpm: Some(60),
            ..AccountLimits::default()
        },
        ..MockOptions::default()
    })
    .await;
    assert_eq!(send(Api::Anthropic, &mock.url(), "one").await.status, 200);
    assert_eq!(send(Api::OpenAi, &mock.url(), "two").await.status, 429);
    mock.stop().await;
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].get("limited_by").is_none(), "{}", lines[0]);
    assert!(lines[0].get("fault").is_none(), "{}", lines[0]);
    assert_eq!(lines[1]["limited_by"], "rpm");
    assert_eq!(lines[1]["fault"], "rate_limited");
    assert_eq!(lines[1]["status"], 429);
    assert_eq!(lines[1]["api"], "openai");
}

#[tokio::test]
async fn the_providers_read_the_limits_and_classify_the_refusals() {
    let call = CompletionRequest {
        model: "test-model".into(),
        prompt: "What limits does this account have?".into(),
        max_tokens: 64,
        ..CompletionRequest::default()
    };
    for api in APIS {
        // 60 RPM is one a second: the first call gets through, the next is refused.
        let mock = mock(
            Duration::ZERO,
            AccountLimits {
                rpm: Some(60),
                tpm: Some(100_000),
                ..AccountLimits::default()
            },
        )
        .await;
        let provider: Box<dyn Provider> = match api {
            Api::Anthropic => Box::new(AnthropicProvider::new(AnthropicOptions {
                base_url: mock.url(),
                api_key: Some(Secret::new("test-key")),
                ..AnthropicOptions::default()
            })),
            Api::OpenAi => Box::new(OpenAiProvider::new(OpenAiOptions {
                base_url: format!("{}/v1", mock.url()),
                api_key: Some(Secret::new("test-key")),
                ..OpenAiOptions::default()
            })),
        };
        let done = provider
            .complete(&call)
            .await
            .expect("the first call succeeds");
        let limits = done.rate_limits.expect("rate-limit headers are read");
        assert_eq!(limits.requests_limit, Some(60), "{api:?}");
        assert_eq!(limits.requests_remaining, Some(0), "{api:?}");
        assert_eq!(limits.tokens_limit, Some(100_000), "{api:?}");
        let refused = provider.complete(&call).await.unwrap_err();
        assert_eq!(refused.kind, ErrorKind::RateLimited, "{api:?}: {refused}");
        assert_eq!(refused.status, Some(429));
        let wait = refused.retry_after.expect("retry-after-ms is read");
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{api:?}: {wait:?}"
        );
        mock.stop().await;
    }
}
