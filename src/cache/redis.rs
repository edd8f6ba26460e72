//! The shared store: replies in Redis, so that every instance using the same server
//! and namespace answers from the others' calls. Every call is bounded by
//! `cache.timeout` and a failing server is left alone for a while (see
//! `redis_link`): the cache fails open, a request never waits on it.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redis::FromRedisValue;

use super::{CacheError, CacheKey, CacheStore, CachedReply};
pub use crate::redis_link::redacted_url;
use crate::redis_link::{LinkError, RedisLink};

/// The longest time to live sent (about 34 years): past Redis's range, `SET` fails.
const MAX_TTL_MS: u64 = 1 << 40;

/// Replies kept in Redis under `{namespace}:cache:v1:{key}` as JSON, each with its
/// time to live (`SET … PX`). Nothing is connected until the first call, so a server
/// that is down at start delays nothing; the store heals by itself when it returns.
///
/// ```
/// use std::time::Duration;
/// use metaorch::cache::RedisStore;
///
/// let store = RedisStore::new("redis://127.0.0.1:6379", "metaorch", Duration::from_millis(100))?;
/// assert!(format!("{store:?}").contains("redis://127.0.0.1:6379"));
/// # Ok::<(), metaorch::cache::CacheError>(())
/// ```
pub struct RedisStore {
    link: RedisLink,
    namespace: String,
    timeout: Duration,
    /// Whether a value that is not a reply was met: logged once, read as a miss.
    corrupt_seen: AtomicBool,
}

impl From<LinkError> for CacheError {
    fn from(e: LinkError) -> Self {
        CacheError(e.0)
    }
}

impl RedisStore {
    /// A store on the server at `url` (`redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`,
    /// or `rediss://` for TLS), its keys prefixed by `namespace`, each call bounded by
    /// `timeout`. Does not connect: fails only for a URL that cannot be used.
    pub fn new(url: &str, namespace: &str, timeout: Duration) -> Result<RedisStore, CacheError> {
        Ok(RedisStore {
            link: RedisLink::new(url, timeout, "cache.timeout")?,
            namespace: namespace.to_owned(),
            timeout,
            corrupt_seen: AtomicBool::new(false),
        })
    }

    /// The Redis key of `key`.
    fn redis_key(&self, key: &CacheKey) -> String {
        format!("{}:cache:v1:{key}", self.namespace)
    }

    async fn call<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, CacheError> {
        Ok(self.link.call(cmd).await?)
    }
}

#[async_trait]
impl CacheStore for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn get(&self, key: &CacheKey) -> Result<Option<CachedReply>, CacheError> {
        let redis_key = self.redis_key(key);
        let value: Option<Vec<u8>> = self.call(redis::cmd("GET").arg(&redis_key)).await?;
        let Some(value) = value else {
            return Ok(None);
        };
        match serde_json::from_slice(&value) {
            Ok(reply) => Ok(Some(reply)),
            Err(e) => {
                // Something else wrote under our namespace: a miss, which the call's
                // own reply then overwrites. Said once, not once per read.
                if !self.corrupt_seen.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        event = "cache.corrupt",
                        store = "redis",
                        key = %redis_key,
                        error.message = %e,
                        "{redis_key} in redis {} does not hold a cached reply ({e}); read as a miss and overwritten by the next reply (said once)",
                        self.link.shown_url()
                    );
                }
                Ok(None)
            }
        }
    }

    async fn put(
        &self,
        key: &CacheKey,
        reply: &CachedReply,
        ttl: Duration,
    ) -> Result<(), CacheError> {
        let value = serde_json::to_vec(reply)
            .map_err(|e| CacheError(format!("a reply could not be written as JSON: {e}")))?;
        let ttl_ms = u64::try_from(ttl.as_millis())
            .unwrap_or(u64::MAX)
            .clamp(1, MAX_TTL_MS);
        self.call::<()>(
            redis::cmd("SET")
                .arg(self.redis_key(key))
                .arg(value)
                .arg("PX")
                .arg(ttl_ms),
        )
        .await
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("namespace", &self.namespace)
            .field("timeout", &self.timeout)
            .field("link", &self.link)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_namespaced_and_versioned() {
        let store =
            RedisStore::new("redis://127.0.0.1:1", "team-a", Duration::from_millis(50)).unwrap();
        let key = CacheKey::of("sim", &crate::provider::CompletionRequest::default());
        assert_eq!(store.redis_key(&key), format!("team-a:cache:v1:{key}"));
    }

    #[test]
    fn credentials_stay_out_of_debug_and_errors() {
        let store = RedisStore::new(
            "redis://admin:s3cr3t-pw@127.0.0.1:1/0",
            "m",
            Duration::from_millis(50),
        )
        .unwrap();
        let shown = format!("{store:?}");
        assert!(shown.contains("redis://***@127.0.0.1:1/0"), "{shown}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("admin"),
            "{shown}"
        );

        let error = RedisStore::new("redis://admin:s3cr3t-pw@", "m", Duration::from_millis(50))
            .unwrap_err();
        assert!(!error.0.contains("s3cr3t"), "{error}");
        assert!(
            error.0.starts_with("redis://***@ is not a Redis URL"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_server_that_is_down_fails_fast_and_is_then_left_alone() {
        // A port nobody listens on: connecting is refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = RedisStore::new(
            &format!("redis://127.0.0.1:{port}"),
            "m",
            Duration::from_millis(200),
        )
        .unwrap();
        let key = CacheKey::of("sim", &crate::provider::CompletionRequest::default());
        let error = store.get(&key).await.unwrap_err();
        assert!(error.0.contains("could not be reached"), "{error}");
        let paused = store.get(&key).await.unwrap_err();
        assert!(paused.0.contains("not asked again for"), "{paused}");
        assert!(store.link.paused_for().is_some());
    }
}
