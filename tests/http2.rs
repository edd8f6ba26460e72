//! HTTP/2 and connection reuse, over real sockets on 127.0.0.1: a provider with
//! `http2 = "always"` multiplexes its calls on one connection to `mock-upstream`;
//! `"never"`, and `"auto"` over `http://`, speak HTTP/1.1 with a connection per call in
//! flight. The mock's own counts (`/mock/stats`) are the witness.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metaorch::mock_upstream::{MockOptions, MockStats, MockUpstream};
use metaorch::provider::{
    AnthropicOptions, AnthropicProvider, CompletionRequest, Http2, OpenAiOptions, OpenAiProvider,
    Provider, Secret,
};

/// Every call overlaps the others: a call takes longer than starting all of them.
async fn mock() -> MockUpstream {
    let options = MockOptions {
        latency_min: Duration::from_millis(300),
        latency_max: Duration::from_millis(400),
        ..MockOptions::default()
    };
    MockUpstream::start(SocketAddr::from(([127, 0, 0, 1], 0)), options)
        .await
        .expect("the mock binds an ephemeral port")
}

#[derive(Clone, Copy, Debug)]
enum Api {
    Anthropic,
    OpenAi,
}

fn provider(api: Api, url: &str, http2: Http2) -> Arc<dyn Provider> {
    let api_key = Some(Secret::new("test-key"));
    match api {
        Api::Anthropic => Arc::new(AnthropicProvider::new(AnthropicOptions {
            base_url: url.to_owned(),
            api_key,
            http2,
            ..AnthropicOptions::default()
        })),
        Api::OpenAi => Arc::new(OpenAiProvider::new(OpenAiOptions {
            base_url: url.to_owned(),
            api_key,
            http2,
            ..OpenAiOptions::default()
        })),
    }
}

fn request(n: usize, stream: bool) -> CompletionRequest {
    CompletionRequest {
        model: "test-model".into(),
        system: None,
        prompt: format!("Question {n}: what is HTTP/2?"),
        max_tokens: 64,
        temperature: None,
        stream,
        ..CompletionRequest::default()
    }
}

/// Makes `calls` calls at once (half of them streamed) and returns the mock's counts.
async fn concurrent_calls(api: Api, http2: Http2, calls: usize) -> MockStats {
    let mock = mock().await;
    let provider = provider(api, &mock.url(), http2);
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..calls {
        let provider = Arc::clone(&provider);
        tasks.spawn(async move { provider.complete(&request(n, n % 2 == 0)).await });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap().expect("every call succeeds");
    }
    let stats = mock.stats();
    mock.stop().await;
    stats
}

#[tokio::test]
async fn always_multiplexes_many_calls_on_one_connection() {
    for api in [Api::Anthropic, Api::OpenAi] {
        let stats = concurrent_calls(api, Http2::Always, 300).await;
        assert_eq!(
            (stats.requests_http2, stats.requests_http1),
            (300, 0),
            "{api:?}: {stats:?}"
        );
        assert_eq!(stats.connections_accepted, 1, "{api:?}: {stats:?}");
    }
}

#[tokio::test]
async fn never_speaks_http1_with_a_connection_per_call_in_flight() {
    let stats = concurrent_calls(Api::Anthropic, Http2::Never, 40).await;
    assert_eq!(
        (stats.requests_http1, stats.requests_http2),
        (40, 0),
        "{stats:?}"
    );
    // Every call overlaps the others, so none finds an idle connection.
    assert_eq!(stats.connections_accepted, 40, "{stats:?}");
}

#[tokio::test]
async fn auto_over_http_speaks_http1() {
    let stats = concurrent_calls(Api::OpenAi, Http2::Auto, 20).await;
    assert_eq!(
        (stats.requests_http1, stats.requests_http2),
        (20, 0),
        "{stats:?}"
    );
}

#[tokio::test]
async fn http1_connections_are_reused_one_call_after_another() {
    let mock = mock().await;
    let provider = provider(Api::Anthropic, &mock.url(), Http2::Never);
    for n in 0..3 {
        provider.complete(&request(n, false)).await.unwrap();
    }
    let stats = mock.stats();
    assert_eq!(
        (stats.connections_accepted, stats.requests_http1),
        (1, 3),
        "{stats:?}"
    );
    mock.stop().await;
}

#[tokio::test]
async fn the_mock_answers_its_stats_and_logs_the_protocol() {
    let mock = mock().await;
    let provider = provider(Api::Anthropic, &mock.url(), Http2::Always);
    provider.complete(&request(0, false)).await.unwrap();
    let stats: serde_json::Value = reqwest::get(format!("{}/mock/stats", mock.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // The h2 connection, and this read's own.
    assert_eq!(stats["connections_accepted"], 2, "{stats}");
    assert_eq!(stats["requests_http2"], 1, "{stats}");
    assert_eq!(stats["requests_http1"], 0, "{stats}");
    assert_eq!(mock.requests()[0].http, "HTTP/2.0");
    mock.stop().await;
}
