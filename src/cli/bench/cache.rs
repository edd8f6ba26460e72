//! `metaorch bench cache`: a workload that repeats itself — requests drawn from a few
//! distinct queries, Zipf-like — run with no cache, the memory cache and the Redis
//! cache: upstream calls saved, hit rate, latency.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use metaorch::config::{CacheBackend, CacheConfig};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::time::Instant;

use super::stats::percentile;
use super::{query, setup};
use crate::cli::args::CacheBenchArgs;

/// One cache mode's figures.
#[derive(Debug, Serialize)]
struct CacheResult {
    mode: String,
    requests: usize,
    agent_calls: usize,
    upstream_calls: usize,
    calls_saved: usize,
    hit_rate: f64,
    failed_agents: usize,
    p50_ms: f64,
    p99_ms: f64,
    wall_s: f64,
}

pub(super) async fn run(args: &CacheBenchArgs) -> anyhow::Result<ExitCode> {
    if args.requests == 0 || args.distinct == 0 || args.in_flight == 0 {
        bail!("--requests, --distinct and --in-flight must be 1 or more");
    }
    if !(args.zipf >= 0.0 && args.zipf.is_finite()) {
        bail!(
            "--zipf {} must be a number of 0 or more, e.g. 1.0",
            args.zipf
        );
    }
    let queries = draw(args);
    let distinct_asked = {
        let mut seen = queries.clone();
        seen.sort_unstable();
        seen.dedup();
        seen.len()
    };
    let mut modes: Vec<(String, Option<CacheConfig>)> = vec![
        ("no cache".to_owned(), None),
        ("memory".to_owned(), Some(CacheConfig::default())),
    ];
    if let Some(url) = &args.redis_url {
        let namespace = format!(
            "metaorch-bench-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        );
        modes.push((
            "redis".to_owned(),
            Some(CacheConfig {
                backend: CacheBackend::Redis { url: url.clone() },
                namespace,
                ..CacheConfig::default()
            }),
        ));
    }
    let mut results = Vec::new();
    let mut upstream_name = String::new();
    let upstream = super::settle_http2(&args.upstream).await;
    for (mode, cache) in modes {
        let limit = args.in_flight * 7;
        let default_latency = (Duration::from_millis(500), Duration::from_millis(2000));
        let setup = setup(&upstream, limit, default_latency, cache)?;
        upstream_name.clone_from(&setup.upstream);
        let next = Arc::new(AtomicUsize::new(0));
        let queries = Arc::new(queries.clone());
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..args.in_flight {
            let (orchestrator, next, queries) = (
                setup.orchestrator.clone(),
                Arc::clone(&next),
                Arc::clone(&queries),
            );
            tasks.spawn(async move {
                let mut samples = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&q) = queries.get(i) else { break };
                    let t = Instant::now();
                    let response = orchestrator
                        .process(&query(q as u64))
                        .await
                        .expect("the bench query is valid");
                    let hits = response.outcomes.iter().filter(|o| o.cached).count();
                    let failed = response.outcomes.iter().filter(|o| !o.succeeded()).count();
                    samples.push((t.elapsed(), response.outcomes.len(), hits, failed));
                }
                samples
            });
        }
        let mut samples = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            samples.extend(joined.context("a bench task failed")?);
        }
        let wall = started.elapsed();
        let upstream_calls = setup.recorder.take().len();
        let agent_calls: usize = samples.iter().map(|s| s.1).sum();
        let hits: usize = samples.iter().map(|s| s.2).sum();
        let mut ms: Vec<f64> = samples.iter().map(|s| s.0.as_secs_f64() * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        results.push(CacheResult {
            mode,
            requests: samples.len(),
            agent_calls,
            upstream_calls,
            calls_saved: agent_calls.saturating_sub(upstream_calls),
            hit_rate: if agent_calls > 0 {
                hits as f64 / agent_calls as f64
            } else {
                0.0
            },
            failed_agents: samples.iter().map(|s| s.3).sum(),
            p50_ms: percentile(&ms, 50.0),
            p99_ms: percentile(&ms, 99.0),
            wall_s: wall.as_secs_f64(),
        });
    }
    println!(
        "cache — {} requests drawn from {} queries (Zipf s = {}; {} distinct asked), {} in flight, upstream: {}",
        args.requests, args.distinct, args.zipf, distinct_asked, args.in_flight, upstream_name
    );
    println!(
        "  {:<9} {:>8} {:>9} {:>9} {:>8} {:>10} {:>10} {:>8}",
        "mode", "upstream", "saved", "hit rate", "failed", "p50", "p99", "wall"
    );
    for r in &results {
        println!(
            "  {:<9} {:>8} {:>9} {:>8.1}% {:>8} {:>8.1}ms {:>8.1}ms {:>7.1}s",
            r.mode,
            r.upstream_calls,
            r.calls_saved,
            r.hit_rate * 100.0,
            r.failed_agents,
            r.p50_ms,
            r.p99_ms,
            r.wall_s
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The query index of each request: query k (from 1) in proportion to 1 / k^s, drawn
/// under the upstream's seed, so every mode sees the same sequence.
fn draw(args: &CacheBenchArgs) -> Vec<usize> {
    let weights: Vec<f64> = (1..=args.distinct)
        .map(|k| 1.0 / (k as f64).powf(args.zipf))
        .collect();
    let total: f64 = weights.iter().sum();
    let mut cumulative = Vec::with_capacity(weights.len());
    let mut sum = 0.0;
    for w in weights {
        sum += w / total;
        cumulative.push(sum);
    }
    let mut rng = rand::rngs::SmallRng::seed_from_u64(args.upstream.seed);
    (0..args.requests)
        .map(|_| {
            let u: f64 = rng.random();
            cumulative
                .partition_point(|&c| c < u)
                .min(args.distinct - 1)
        })
        .collect()
}
