//! The response cache: a successful completion kept under a hash of everything that
//! shapes it, so that a repeated call is answered without the upstream — no call, no
//! concurrency slot, no rate-limit token, no cost.
//!
//! It sits in front of the resilience layer, inside the executor: [`ResponseCache`]
//! looks a call up, and on a miss lets one caller (the leader) make it while identical
//! calls in flight in this process wait for its result ([`flight`]). Only successful
//! completions are stored — never errors, fallbacks or a stream cut short. A store is
//! in memory ([`MemoryStore`], moka) or shared through Redis ([`RedisStore`]); either
//! can fail, and a failing store makes the call go upstream as if uncached: the cache
//! is never a reason for a request to fail.

pub mod flight;
mod key;
mod memory;
mod redis;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use self::redis::{RedisStore, redacted_url};
pub use flight::{Flight, FlightResult, Joined, SingleFlight};
pub use key::CacheKey;
pub use memory::MemoryStore;

use crate::provider::{Completion, Usage};

/// What a cache keeps of a successful completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedReply {
    /// The generated text.
    pub text: String,
    /// Why generation stopped, as the provider said it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    /// The tokens the original call used (a hit uses none).
    #[serde(default)]
    pub usage: Usage,
}

impl CachedReply {
    /// What is kept of `completion`.
    pub fn of(completion: &Completion) -> Self {
        CachedReply {
            text: completion.text.clone(),
            stop_reason: completion.stop_reason.clone(),
            usage: completion.usage,
        }
    }

    /// The completion a hit answers with: the reply, no tokens, no time upstream.
    pub fn completion(&self) -> Completion {
        Completion {
            text: self.text.clone(),
            stop_reason: self.stop_reason.clone(),
            ..Completion::default()
        }
    }

    /// Its size in memory, about: what the memory store weighs it by.
    pub fn weight(&self) -> usize {
        self.text.len() + self.stop_reason.as_ref().map_or(0, String::len) + 64
    }
}

/// A store's failure: the call goes on as if uncached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CacheError(pub String);

/// Where replies are kept: in this process, or shared.
#[async_trait]
pub trait CacheStore: Send + Sync + fmt::Debug {
    /// `memory` or `redis`, for logs and metrics.
    fn name(&self) -> &'static str;

    /// The reply kept under `key`, if any (and not expired).
    async fn get(&self, key: &CacheKey) -> Result<Option<CachedReply>, CacheError>;

    /// Keeps `reply` under `key` for `ttl`.
    async fn put(
        &self,
        key: &CacheKey,
        reply: &CachedReply,
        ttl: Duration,
    ) -> Result<(), CacheError>;
}

/// The cache every request shares: a store, its time to live, and the calls in flight.
#[derive(Debug, Clone)]
pub struct ResponseCache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn CacheStore>,
    ttl: Duration,
    flights: SingleFlight,
    /// Whether the store is failing: its problems are logged once per outage.
    down: AtomicBool,
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// The store had it.
    Hit(CachedReply),
    /// An identical call in flight answered: its result, success or error.
    Shared(Arc<FlightResult>),
    /// Nobody has it: the caller makes the call and reports it through the flight.
    Miss(Flight),
}

impl ResponseCache {
    /// A cache over `store`, keeping replies for `ttl`.
    pub fn new(store: Arc<dyn CacheStore>, ttl: Duration) -> Self {
        ResponseCache {
            inner: Arc::new(Inner {
                store,
                ttl,
                flights: SingleFlight::default(),
                down: AtomicBool::new(false),
            }),
        }
    }

    /// The store's name (`memory`, `redis`).
    pub fn store_name(&self) -> &'static str {
        self.inner.store.name()
    }

    /// Looks `key` up: in the store, then among the identical calls in flight. A
    /// store that fails counts as a miss.
    /// Counted once in `metaorch_cache_requests_total`: `hit` (the store or a call in
    /// flight answered), `miss`, or `error` (the store failed and nobody else had it).
    pub async fn lookup(&self, key: &CacheKey) -> Lookup {
        let store_failed = match self.inner.store.get(key).await {
            Ok(Some(reply)) => {
                self.healthy();
                crate::telemetry::metrics::cache_request("hit");
                return Lookup::Hit(reply);
            }
            Ok(None) => {
                self.healthy();
                false
            }
            Err(e) => {
                self.failing(&e);
                true
            }
        };
        match self.inner.flights.join(key).await {
            Joined::Lead(flight) => {
                crate::telemetry::metrics::cache_request(if store_failed {
                    "error"
                } else {
                    "miss"
                });
                Lookup::Miss(flight)
            }
            Joined::Done(result) => {
                crate::telemetry::metrics::cache_request("hit");
                Lookup::Shared(result)
            }
        }
    }

    /// Keeps a successful reply; a failing store is logged (once per outage), never
    /// an error for the caller.
    pub async fn store(&self, key: &CacheKey, reply: &CachedReply) {
        match self.inner.store.put(key, reply, self.inner.ttl).await {
            Ok(()) => self.healthy(),
            Err(e) => self.failing(&e),
        }
    }

    fn healthy(&self) {
        if self.inner.down.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                event = "cache.recovered",
                store = self.inner.store.name(),
                "the {} cache answers again; replies are cached again",
                self.inner.store.name()
            );
        }
    }

    fn failing(&self, error: &CacheError) {
        if !self.inner.down.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                event = "cache.unavailable",
                store = self.inner.store.name(),
                error.message = %error,
                "the {} cache failed ({error}); calls go to their providers uncached until it answers again",
                self.inner.store.name()
            );
        }
    }
}
