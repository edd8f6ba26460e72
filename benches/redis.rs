//! The Redis cache store's round trips to a `redis-server` started here on a free port
//! of 127.0.0.1 (skipped where it is not installed): a get that hits, a get that
//! misses and a put of a 1 KiB reply, one at a time and 64 at once on the store's one
//! multiplexed connection; the memory store's get beside them for scale.

#[path = "../tests/common/redis.rs"]
#[allow(dead_code)]
mod redis_server;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use metaorch::cache::{CacheKey, CacheStore, CachedReply, MemoryStore, RedisStore};
use metaorch::provider::{CompletionRequest, Usage};

const HOUR: Duration = Duration::from_secs(3600);

fn key(prompt: &str) -> CacheKey {
    CacheKey::of(
        "bench",
        &CompletionRequest {
            prompt: prompt.into(),
            ..CompletionRequest::default()
        },
    )
}

fn round_trips(c: &mut Criterion) {
    let Some(server) = redis_server::RedisServer::start() else {
        return redis_server::skip("benches/redis.rs");
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = Arc::new(RedisStore::new(&server.url(), "bench", Duration::from_secs(1)).unwrap());
    let memory = MemoryStore::new(10_000, 64 << 20, HOUR);
    let reply = CachedReply {
        text: "x".repeat(1024),
        stop_reason: Some("end_turn".into()),
        usage: Usage {
            input_tokens: 200,
            output_tokens: 300,
            ..Usage::default()
        },
    };
    let (hit, miss) = (key("hit"), key("miss"));
    runtime.block_on(async {
        store.put(&hit, &reply, HOUR).await.unwrap();
        memory.put(&hit, &reply, HOUR).await.unwrap();
    });

    let mut group = c.benchmark_group("redis_store");
    group.bench_function("get_hit_1k", |b| {
        b.iter(|| black_box(runtime.block_on(store.get(&hit)).unwrap()))
    });
    group.bench_function("get_miss", |b| {
        b.iter(|| black_box(runtime.block_on(store.get(&miss)).unwrap()))
    });
    group.bench_function("put_1k", |b| {
        b.iter(|| runtime.block_on(store.put(&hit, &reply, HOUR)).unwrap())
    });
    group.throughput(Throughput::Elements(64));
    group.bench_function("get_hit_1k_x64_concurrent", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let mut calls = tokio::task::JoinSet::new();
                for _ in 0..64 {
                    let store = Arc::clone(&store);
                    calls.spawn(async move { store.get(&hit).await.unwrap().is_some() });
                }
                while let Some(found) = calls.join_next().await {
                    assert!(found.unwrap());
                }
            })
        })
    });
    group.finish();

    c.bench_function("memory_store/get_hit_1k", |b| {
        b.iter(|| black_box(runtime.block_on(memory.get(&hit)).unwrap()))
    });
}

criterion_group!(benches, round_trips);
criterion_main!(benches);
