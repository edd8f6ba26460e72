//! The HTTP providers' per-call path against an in-process `mock-upstream` on
//! 127.0.0.1 with no latency: building the body, the request over a kept-alive
//! connection, reading and parsing the reply — plain and streamed, Anthropic's and
//! OpenAI's wire formats. A regression in the client's cost per call shows here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use metaorch::mock_upstream::{MockOptions, MockUpstream};
use metaorch::provider::{
    AnthropicOptions, AnthropicProvider, CompletionRequest, OpenAiOptions, OpenAiProvider,
    Provider, RequestMeta, Secret,
};

fn request(stream: bool) -> CompletionRequest {
    CompletionRequest {
        model: "bench-model".into(),
        system: Some("You are a critic. Find the weakest assumptions.".into()),
        prompt: "Criticise the premises and likely failure modes of: should we rewrite the service in Rust?".into(),
        max_tokens: 512,
        stream,
        meta: RequestMeta {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            agent_id: "critic".into(),
            attempt: 1,
        },
        ..CompletionRequest::default()
    }
}

fn provider_call(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mock = runtime.block_on(async {
        MockUpstream::start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            MockOptions {
                latency_min: Duration::ZERO,
                latency_max: Duration::ZERO,
                ..MockOptions::default()
            },
        )
        .await
        .unwrap()
    });
    let key = || Some(Secret::new("bench-key"));
    let providers: [(&str, Arc<dyn Provider>); 2] = [
        (
            "anthropic",
            Arc::new(AnthropicProvider::new(AnthropicOptions {
                base_url: mock.url(),
                api_key: key(),
                ..AnthropicOptions::default()
            })),
        ),
        (
            "openai",
            Arc::new(OpenAiProvider::new(OpenAiOptions {
                base_url: format!("{}/v1", mock.url()),
                api_key: key(),
                ..OpenAiOptions::default()
            })),
        ),
    ];
    let mut group = c.benchmark_group("provider_call");
    for (name, provider) in &providers {
        for stream in [false, true] {
            let request = request(stream);
            let id = format!("{name}_{}", if stream { "stream" } else { "plain" });
            group.bench_function(id, |b| {
                b.iter(|| {
                    runtime.block_on(async {
                        provider.complete(&request).await.unwrap();
                    })
                });
            });
        }
    }
    group.finish();
}

criterion_group!(benches, provider_call);
criterion_main!(benches);
