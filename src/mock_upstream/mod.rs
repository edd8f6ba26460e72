//! `mock-upstream`: a fake of Anthropic's Messages API and of OpenAI's Chat Completions
//! API, faithful in the shapes that clients parse (ids, `request-id`, usage, streaming
//! events, error bodies), with latency and faults injected deterministically. Tests,
//! benchmarks and chaos drills point real clients at it over real sockets.
//!
//! Latency is drawn per request from a range, keyed on (seed, request body), so the
//! same prompt gets the same latency from any client. Faults come by script (the first
//! N times a body containing some text is seen) or by rate (drawn under the seed, keyed
//! on the body and how often it has been seen, so retries draw afresh).
//!
//! Limits are those of a real account ([`AccountLimits`]: requests per second or
//! minute, input tokens per minute, requests in progress), checked after the request
//! is authenticated and validated and before any fault: a refused request gets the
//! API's 429 or 529, and every response carries the rate-limit headers of the limits
//! that are set (and none when none are).

mod conn;
mod faults;
mod ratelimit;
mod wire;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::Version;
use axum::response::Response;
use axum::routing::{get, post};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use conn::MockStats;
pub use faults::{MockFault, MockScript};
use wire::Api;

use crate::provider::{Account, AccountLimits};

/// How the mock behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct MockOptions {
    /// Shortest latency.
    pub latency_min: Duration,
    /// Longest latency.
    pub latency_max: Duration,
    /// Seed for latencies, replies and fault draws.
    pub seed: u64,
    /// Faults by rate: each the fraction of requests (0–1) answered with it.
    pub rates: Vec<(MockFault, f64)>,
    /// Faults by script, checked first.
    pub script: Vec<MockScript>,
    /// The wait a `rate_limited` fault asks for.
    pub retry_after: Duration,
    /// Appends one JSON line per request here.
    pub request_log: Option<PathBuf>,
    /// The account's rate and concurrency limits (none by default).
    pub limits: AccountLimits,
    /// Keep each request's JSON body in its record (for tests that check what was
    /// sent; off by default, as bodies can be large).
    pub keep_bodies: bool,
}

impl Default for MockOptions {
    /// 0.5–2.0 s latency (the report's mock agents), no faults, 1 s `retry-after`, no
    /// limits.
    fn default() -> Self {
        MockOptions {
            latency_min: Duration::from_millis(500),
            latency_max: Duration::from_millis(2000),
            seed: 0,
            rates: Vec::new(),
            script: Vec::new(),
            retry_after: Duration::from_secs(1),
            request_log: None,
            limits: AccountLimits::default(),
            keep_bodies: false,
        }
    }
}

/// What the mock did with one request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestRecord {
    /// When it arrived (RFC 3339).
    pub timestamp: String,
    /// `anthropic` or `openai`.
    pub api: &'static str,
    /// The protocol it came over: `HTTP/1.1` or `HTTP/2.0`.
    pub http: &'static str,
    /// The model asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Whether it asked to stream.
    pub stream: bool,
    /// The HTTP status answered (200 for stream faults, which fail after it).
    pub status: u16,
    /// The fault injected, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<&'static str>,
    /// The latency drawn.
    pub latency_ms: f64,
    /// Input tokens counted, the prompt cache's included.
    pub input_tokens: u64,
    /// The part of `input_tokens` written to the prompt cache (Anthropic, with a
    /// `cache_control` breakpoint, the first time).
    #[serde(skip_serializing_if = "is_zero")]
    pub cache_creation_input_tokens: u64,
    /// The part of `input_tokens` read from the prompt cache (the times after).
    #[serde(skip_serializing_if = "is_zero")]
    pub cache_read_input_tokens: u64,
    /// Output tokens sent.
    pub output_tokens: u64,
    /// The `request-id` sent back.
    pub request_id: String,
    /// The `traceparent` received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// How many times this exact body has been seen, this one included (0 when the
    /// account refused it before it was counted).
    pub seen: u32,
    /// The account limit that refused it (`rps`, `rpm`, `tpm`, `max_concurrent`), if one
    /// did; `fault` is then `rate_limited` or `overloaded`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limited_by: Option<&'static str>,
    /// The request's JSON body, with [`MockOptions::keep_bodies`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
}

/// Most records kept in memory for [`MockUpstream::requests`].
const MAX_RECORDS: usize = 100_000;

pub(crate) struct Shared {
    options: MockOptions,
    account: Arc<Account>,
    seen: Mutex<HashMap<u64, u32>>,
    /// The prompt cache: the prefixes written to it (by model and text).
    cached: Mutex<HashSet<u64>>,
    records: Mutex<Vec<RequestRecord>>,
    log: Option<Mutex<File>>,
    ids: AtomicU64,
    /// Connections accepted and requests by protocol.
    counters: Arc<conn::Counters>,
}

impl Shared {
    fn record(&self, record: RequestRecord) {
        if let Some(log) = &self.log
            && let Ok(mut line) = serde_json::to_vec(&record)
        {
            line.push(b'\n');
            let _ = log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_all(&line);
        }
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        if records.len() < MAX_RECORDS {
            records.push(record);
        }
    }
}

/// A running mock server.
#[derive(Debug)]
pub struct MockUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<io::Result<()>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl MockUpstream {
    /// Binds `addr` (port 0 picks a free one) and serves until stopped.
    pub async fn start(addr: SocketAddr, options: MockOptions) -> io::Result<MockUpstream> {
        let log = match &options.request_log {
            Some(path) => Some(Mutex::new(crate::telemetry::open_append_as(
                path,
                "the request log",
            )?)),
            None => None,
        };
        let shared = Arc::new(Shared {
            account: Arc::new(Account::new(options.limits)),
            options,
            seen: Mutex::new(HashMap::new()),
            cached: Mutex::new(HashSet::new()),
            records: Mutex::new(Vec::new()),
            log,
            ids: AtomicU64::new(1),
            counters: Arc::new(conn::Counters::default()),
        });
        let app = Router::new()
            .route("/v1/messages", post(messages))
            .route("/v1/chat/completions", post(chat))
            .route("/mock/stats", get(stats))
            .with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(conn::serve(listener, app, Arc::clone(&shared.counters), rx));
        Ok(MockUpstream {
            addr,
            shared,
            shutdown: Some(tx),
            task,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, the base URL to configure clients with.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request answered so far (up to 100,000).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Connections accepted so far and requests by protocol, as `GET /mock/stats`
    /// answers.
    pub fn stats(&self) -> MockStats {
        self.shared.counters.snapshot()
    }

    /// Requests the account has admitted that are still in progress (a stream until its
    /// last event).
    pub fn in_flight(&self) -> usize {
        self.shared.account.in_flight()
    }

    /// Stops accepting and waits for requests in progress (a hanging one is cut off
    /// after a second).
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(Duration::from_secs(1), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

async fn messages(
    State(shared): State<Arc<Shared>>,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.counters.request(version);
    wire::handle(&shared, Api::Anthropic, version, &headers, &body).await
}

async fn chat(
    State(shared): State<Arc<Shared>>,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.counters.request(version);
    wire::handle(&shared, Api::OpenAi, version, &headers, &body).await
}

async fn stats(State(shared): State<Arc<Shared>>) -> axum::Json<MockStats> {
    axum::Json(shared.counters.snapshot())
}

impl Shared {
    /// How many times this body hash has been seen, this time included.
    fn seen(&self, key: u64) -> u32 {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let n = seen.entry(key).or_insert(0);
        *n += 1;
        *n
    }

    /// Whether this prompt prefix was in the cache; it is from now on.
    fn cache(&self, key: u64) -> bool {
        !self
            .cached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key)
    }

    fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// FNV-1a over the seed and some bytes: stable across builds and platforms.
fn hash(seed: u64, parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed
        .to_le_bytes()
        .iter()
        .chain(parts.iter().flat_map(|p| p.iter()))
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's low bits are weak; mix them (splitmix64's finaliser).
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A uniform draw in [0, 1) from a hash.
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
