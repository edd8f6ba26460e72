//! `metaorch bench cluster`: one, two, three `serve` instances (child processes of this
//! binary) sharing one account's limits through Redis, against a `mock-upstream`
//! started in this process that enforces the account's rate. Reports the share of the
//! allowed rate served, the 429s after warm-up, Redis round trips per upstream call,
//! and request latency against one instance keeping its limits alone.

use std::io::{BufRead, BufReader};
use std::process::{Child, ExitCode, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use metaorch::mock_upstream::{MockOptions, MockUpstream, RequestRecord};
use metaorch::provider::AccountLimits;
use serde::Serialize;
use tokio::time::Instant;

use super::super::args::ClusterBenchArgs;
use super::stats::percentile;

#[derive(Debug, Serialize)]
struct Run {
    instances: u32,
    redis: bool,
    requests: usize,
    failed_requests: usize,
    /// Agents that failed or timed out (after their retries) in those requests.
    failed_agents: u64,
    upstream_calls: usize,
    served_per_s: f64,
    /// Upstream 200s per second over the allowed rate.
    served_share: f64,
    /// Of the upstream's answers after warm-up, the share that were 429.
    refused_share: f64,
    refused: usize,
    redis_round_trips: u64,
    round_trips_per_call: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Requests answered by each instance after warm-up: how evenly the limits are
    /// shared.
    per_instance: Vec<usize>,
}

/// A `serve` child, killed when dropped.
struct Instance {
    child: Child,
    url: String,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn run(args: &ClusterBenchArgs) -> anyhow::Result<ExitCode> {
    // Without Redis every instance would keep the whole limit (its local share, having
    // seen no other): say so now rather than measure that.
    let shown = metaorch::cache::redacted_url(&args.redis_url);
    let client = redis::Client::open(args.redis_url.as_str())
        .map_err(|_| anyhow::anyhow!("{shown} is not a Redis URL; expected redis://HOST:PORT"))?;
    let ping = tokio::time::timeout(Duration::from_secs(3), async {
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
    })
    .await;
    if !matches!(ping, Ok(Ok(_))) {
        bail!(
            "redis {shown} does not answer; start one (redis-server --port 6379 --save \"\") or pass --redis-url"
        );
    }
    let dir = tempdir()?;
    let mut runs = Vec::new();
    // The reference: one instance, its limits its own.
    let mut plan = vec![(1, false)];
    if args.unshared {
        plan.extend(
            args.instances
                .iter()
                .filter(|&&n| n > 1)
                .map(|&n| (n, false)),
        );
    }
    plan.extend(args.instances.iter().map(|&n| (n, true)));
    for (n, redis) in plan {
        eprintln!(
            "bench cluster: {n} instance{} {}…",
            if n == 1 { "" } else { "s" },
            if redis {
                "sharing through Redis"
            } else {
                "without Redis"
            }
        );
        runs.push(run_one(args, &dir, n, redis).await?);
    }
    print_report(args, &runs);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&runs)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ExitCode::SUCCESS)
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "metaorch-bench-cluster-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

async fn run_one(
    args: &ClusterBenchArgs,
    dir: &std::path::Path,
    n: u32,
    redis: bool,
) -> anyhow::Result<Run> {
    let mock = MockUpstream::start(
        ([127, 0, 0, 1], 0).into(),
        MockOptions {
            latency_min: args.latency.0,
            latency_max: args.latency.1,
            limits: AccountLimits {
                rps: Some(args.rps),
                ..AccountLimits::default()
            },
            ..MockOptions::default()
        },
    )
    .await
    .context("cannot start the mock upstream")?;
    let namespace = format!("bench-{:08x}", rand::random::<u32>());
    let config = config(
        args,
        &mock.url(),
        redis.then_some((&args.redis_url, &namespace)),
    );
    let path = dir.join(format!("cluster-{n}-{redis}.toml"));
    std::fs::write(&path, config).with_context(|| format!("cannot write {}", path.display()))?;
    let mut instances = Vec::new();
    for i in 0..n {
        instances.push(start(
            &path,
            &dir.join(format!("instance-{n}-{redis}-{i}.log")),
        )?);
    }

    let client = reqwest::Client::new();
    let started = Instant::now();
    let warm_from = started + args.warmup;
    let until = warm_from + args.duration;
    let warm_wall = epoch_secs() + args.warmup.as_secs_f64();
    let mut tasks = tokio::task::JoinSet::new();
    // The same load in all, split between the instances.
    let per_instance = (args.in_flight / n).max(1);
    for (i, instance) in instances.iter().enumerate() {
        for c in 0..per_instance {
            let (client, url) = (client.clone(), instance.url.clone());
            tasks.spawn(async move {
                let mut samples = Vec::new();
                let mut k = 0;
                while Instant::now() < until {
                    k += 1;
                    let t = Instant::now();
                    let answer = client
                        .post(format!("{url}/v1/orchestrate"))
                        .header("content-type", "application/json")
                        .body(serde_json::json!({"query": format!("instance {i} client {c} question {k}")}).to_string())
                        .send()
                        .await;
                    let (ok, agents_failed) = match answer {
                        Ok(r) if r.status() == 200 => {
                            let body = r.bytes().await.unwrap_or_default();
                            let doc: serde_json::Value =
                                serde_json::from_slice(&body).unwrap_or_default();
                            let summary = &doc["summary"];
                            let failed = summary["failed"].as_u64().unwrap_or(0)
                                + summary["timed_out"].as_u64().unwrap_or(0);
                            (true, failed)
                        }
                        _ => (false, 0),
                    };
                    samples.push((t, t.elapsed(), ok, i, agents_failed));
                }
                samples
            });
        }
    }
    let mut samples = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        samples.extend(joined.context("a load task failed")?);
    }
    let mut round_trips = 0;
    if redis {
        for instance in &instances {
            let body = client
                .get(format!("{}/v1/cluster", instance.url))
                .send()
                .await?
                .bytes()
                .await?;
            let status: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            round_trips += status["syncs"].as_u64().unwrap_or(0);
        }
    }
    drop(instances);
    let records = mock.requests();
    mock.stop().await;

    let measured: Vec<_> = samples.iter().filter(|s| s.0 >= warm_from).collect();
    let mut ms: Vec<f64> = measured
        .iter()
        .map(|s| s.1.as_secs_f64() * 1000.0)
        .collect();
    ms.sort_by(f64::total_cmp);
    let window: Vec<&RequestRecord> = records
        .iter()
        .filter(|r| {
            let t = at(r);
            t >= warm_wall && t < warm_wall + args.duration.as_secs_f64()
        })
        .collect();
    let served = window.iter().filter(|r| r.status == 200).count();
    let refused = window.iter().filter(|r| r.status == 429).count();
    let served_per_s = served as f64 / args.duration.as_secs_f64();
    Ok(Run {
        instances: n,
        redis,
        requests: measured.len(),
        failed_requests: measured.iter().filter(|s| !s.2).count(),
        failed_agents: measured.iter().map(|s| s.4).sum(),
        upstream_calls: records.len(),
        served_per_s,
        served_share: served_per_s / args.rps,
        refused_share: refused as f64 / window.len().max(1) as f64,
        refused,
        redis_round_trips: round_trips,
        round_trips_per_call: round_trips as f64 / records.len().max(1) as f64,
        p50_ms: percentile(&ms, 50.0),
        p99_ms: percentile(&ms, 99.0),
        per_instance: (0..n as usize)
            .map(|i| measured.iter().filter(|s| s.3 == i && s.2).count())
            .collect(),
    })
}

/// Six agents on the mock, the account's rate as a limit per minute, and `[redis]`
/// when shared.
fn config(args: &ClusterBenchArgs, upstream: &str, redis: Option<(&String, &String)>) -> String {
    let rpm = (args.rps * 60.0).round().max(1.0) as u64;
    let mut config = format!(
        "request_timeout = \"60s\"\nconcurrency_limit = 4096\n[log]\nlevel = \"warn\"\n\
         [providers.mock]\nkind = \"anthropic\"\nbase_url = \"{upstream}\"\napi_key_env = \"MOCK_KEY\"\n\
         [providers.mock.flow]\nrpm = {rpm}\n"
    );
    if let Some((url, namespace)) = redis {
        config.push_str(&format!(
            "[redis]\nurl = \"{url}\"\nnamespace = \"{namespace}\"\n"
        ));
    }
    // The six agents of every bench: the embedded default's.
    for agent in metaorch::config::Config::embedded().agents {
        let id = agent.id;
        config.push_str(&format!(
            "[[agents]]\nid = \"{id}\"\nrole = \"{id}\"\nprovider = \"mock\"\nmodel = \"claude-haiku-4-5\"\nprompt = \"As the {id}: {{query}}\"\n"
        ));
    }
    config
}

/// Starts `metaorch serve` on a free port with `config`, its log in `log`.
fn start(config: &std::path::Path, log: &std::path::Path) -> anyhow::Result<Instance> {
    let exe = std::env::current_exe().context("cannot find this program to start serve")?;
    let mut child = std::process::Command::new(exe)
        .arg("--config")
        .arg(config)
        .arg("--log-file")
        .arg(log)
        .args(["serve", "--port", "0"])
        .env("MOCK_KEY", "bench")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start serve")?;
    let mut stderr = BufReader::new(child.stderr.take().context("no stderr")?);
    let mut first = String::new();
    stderr.read_line(&mut first)?;
    let Some(url) = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .map(str::to_owned)
    else {
        let _ = child.kill();
        bail!("serve did not start: {first}");
    };
    std::thread::spawn(move || for _ in stderr.lines() {});
    Ok(Instance { child, url })
}

fn epoch_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

fn at(record: &RequestRecord) -> f64 {
    humantime::parse_rfc3339(&record.timestamp)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64())
}

fn print_report(args: &ClusterBenchArgs, runs: &[Run]) {
    println!(
        "cluster — mock-upstream allowing {} requests/s (the instances' shared limit: rpm {}), {:?}..{:?}, {} requests in flight split between the instances, {:?} after {:?} of warm-up",
        args.rps,
        (args.rps * 60.0).round(),
        args.latency.0,
        args.latency.1,
        args.in_flight,
        args.duration,
        args.warmup
    );
    println!(
        "  {:>9}  {:>5}  {:>9}  {:>6}  {:>9}  {:>8}  {:>11}  {:>8}  {:>8}  {:>8}  {:>8}  per instance",
        "instances",
        "redis",
        "served/s",
        "share",
        "429s",
        "failed",
        "trips/call",
        "p50 ms",
        "p99 ms",
        "+p50",
        "+p99",
    );
    let base = runs.iter().find(|r| !r.redis);
    for r in runs {
        let (dp50, dp99) = base.map_or((0.0, 0.0), |b| (r.p50_ms - b.p50_ms, r.p99_ms - b.p99_ms));
        println!(
            "  {:>9}  {:>5}  {:>9.1}  {:>5.1}%  {:>4} {:>3.1}%  {:>8}  {:>11.3}  {:>8.0}  {:>8.0}  {:>+8.0}  {:>+8.0}  {:?}",
            r.instances,
            if r.redis { "yes" } else { "no" },
            r.served_per_s,
            r.served_share * 100.0,
            r.refused,
            r.refused_share * 100.0,
            r.failed_agents,
            r.round_trips_per_call,
            r.p50_ms,
            r.p99_ms,
            dp50,
            dp99,
            r.per_instance,
        );
    }
    for r in runs.iter().filter(|r| r.failed_requests > 0) {
        println!(
            "  {} instance(s), redis {}: {} of {} requests failed",
            r.instances, r.redis, r.failed_requests, r.requests
        );
    }
}
