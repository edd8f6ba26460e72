//! The shared store: replies in Redis, so that every instance using the same server
//! and namespace answers from the others' calls.
//!
//! The `redis` crate's `ConnectionManager` holds one multiplexed connection and
//! reconnects it after a drop. Two things it does not do are added here, because the
//! cache must fail open (a request never waits on it): every operation, connecting
//! included, is bounded by the configured timeout; and after a failure the store
//! leaves the server alone for a while (1 s, doubling to 30 s while it keeps failing),
//! answering every call with an error at once, so an outage costs calls nothing and
//! the server coming back is not met by a connect from every call.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, RedisError};
use tokio::time::Instant;

use super::{CacheError, CacheKey, CacheStore, CachedReply};

/// The first pause after a failure.
const FIRST_PAUSE: Duration = Duration::from_secs(1);
/// The longest pause, however long the server stays down.
const MAX_PAUSE: Duration = Duration::from_secs(30);
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
    client: redis::Client,
    /// The URL with its credentials hidden: all that `Debug` and errors show of it.
    shown_url: String,
    /// The user info of the URL as written, scrubbed from any text the crate returns.
    userinfo: Option<String>,
    namespace: String,
    /// The most one call may take, connecting included.
    timeout: Duration,
    /// The connection, once made; its manager reconnects it after a drop.
    connection: Mutex<Option<ConnectionManager>>,
    /// Held while connecting, so that one caller connects and the others wait for it.
    connecting: tokio::sync::Mutex<()>,
    /// How long the server is left alone after failing.
    pause: Mutex<Pause>,
    /// Whether a value that is not a reply was met: logged once, read as a miss.
    corrupt_seen: AtomicBool,
}

impl RedisStore {
    /// A store on the server at `url` (`redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`,
    /// or `rediss://` for TLS), its keys prefixed by `namespace`, each call bounded by
    /// `timeout`. Does not connect: fails only for a URL that cannot be used.
    pub fn new(url: &str, namespace: &str, timeout: Duration) -> Result<RedisStore, CacheError> {
        let shown_url = redacted_url(url);
        let userinfo = userinfo_at(url).map(|(_, info)| info.to_owned());
        let client = redis::Client::open(url).map_err(|e| {
            CacheError(format!(
                "{shown_url} is not a Redis URL ({}); expected redis://HOST:PORT[/DB], or rediss://… for TLS",
                scrub(&e.to_string(), userinfo.as_deref())
            ))
        })?;
        Ok(RedisStore {
            client,
            shown_url,
            userinfo,
            namespace: namespace.to_owned(),
            timeout,
            connection: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            pause: Mutex::new(Pause::default()),
            corrupt_seen: AtomicBool::new(false),
        })
    }

    /// The Redis key of `key`.
    fn redis_key(&self, key: &CacheKey) -> String {
        format!("{}:cache:v1:{key}", self.namespace)
    }

    /// Runs `cmd`, bounded by the timeout, unless the server is being left alone.
    async fn call<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, CacheError> {
        if let Some(left) = self.pause().left(Instant::now()) {
            return Err(CacheError(format!(
                "redis {} failed recently; not asked again for {} ms",
                self.shown_url,
                left.as_millis()
            )));
        }
        let attempt = async {
            let mut connection = self.connection().await?;
            match cmd.query_async(&mut connection).await {
                // The connection was lost (the server restarted, say): the manager is
                // reconnecting, and one more try within the same timeout uses the new one.
                Err(e) if e.is_unrecoverable_error() => cmd.query_async(&mut connection).await,
                result => result,
            }
            .map_err(|e| self.failure("failed", &e))
        };
        let result = tokio::time::timeout(self.timeout, attempt)
            .await
            .unwrap_or_else(|_| Err(self.timed_out()));
        match &result {
            Ok(_) => self.pause().succeeded(),
            Err(_) => self.pause().failed(Instant::now()),
        }
        result
    }

    /// The connection, made now if there is none yet.
    async fn connection(&self) -> Result<ConnectionManager, CacheError> {
        if let Some(connection) = self.slot().clone() {
            return Ok(connection);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(connection) = self.slot().clone() {
            return Ok(connection);
        }
        // The caller's timeout bounds the whole connect; the manager's own retries
        // are left out, since the pause decides when to try again.
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let connection = ConnectionManager::new_with_config(self.client.clone(), config)
            .await
            .map_err(|e| self.failure("could not be reached", &e))?;
        *self.slot() = Some(connection.clone());
        Ok(connection)
    }

    fn timed_out(&self) -> CacheError {
        CacheError(format!(
            "redis {} did not answer within {:?} (cache.timeout)",
            self.shown_url, self.timeout
        ))
    }

    fn failure(&self, what: &str, error: &RedisError) -> CacheError {
        // The connection's own response timeout is ours: one message for both.
        if error.is_timeout() {
            return self.timed_out();
        }
        CacheError(format!(
            "redis {} {what}: {}",
            self.shown_url,
            scrub(&error.to_string(), self.userinfo.as_deref())
        ))
    }

    fn slot(&self) -> MutexGuard<'_, Option<ConnectionManager>> {
        // A panic elsewhere cannot leave an Option half-written.
        self.connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn pause(&self) -> MutexGuard<'_, Pause> {
        // Pause is a pair of plain values, consistent after any panic.
        self.pause.lock().unwrap_or_else(PoisonError::into_inner)
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
                        self.shown_url
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
        let pause = *self.pause();
        f.debug_struct("RedisStore")
            .field("url", &self.shown_url)
            .field("namespace", &self.namespace)
            .field("timeout", &self.timeout)
            .field("connection_made", &self.slot().is_some())
            .field("failures_in_a_row", &pause.failures)
            .field("paused_for", &pause.left(Instant::now()))
            .finish_non_exhaustive()
    }
}

/// How long a failing server is left alone: [`FIRST_PAUSE`] after a failure, twice
/// as long after each failure that follows, at most [`MAX_PAUSE`]; nothing after a
/// success.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Pause {
    /// Failures in a row.
    failures: u32,
    /// Until when calls are answered without asking the server.
    until: Option<Instant>,
}

impl Pause {
    /// How long the pause still lasts at `now`, if it does.
    fn left(&self, now: Instant) -> Option<Duration> {
        self.until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    fn failed(&mut self, now: Instant) {
        // Calls that were already under way when a pause began fail as well: they
        // are the same outage, not a longer one.
        if self.left(now).is_some() {
            return;
        }
        let doublings = self.failures.min(5);
        self.failures = self.failures.saturating_add(1);
        let pause = (FIRST_PAUSE * 2u32.pow(doublings)).min(MAX_PAUSE);
        self.until = Some(now + pause);
    }

    fn succeeded(&mut self) {
        *self = Pause::default();
    }
}

/// `url` with its credentials (`user:password@`) replaced by `***@`, for `Debug`,
/// errors and logs; a URL without any is returned as it is.
///
/// ```
/// use metaorch::cache::redacted_url;
/// assert_eq!(redacted_url("redis://:hunter2@cache:6379/0"), "redis://***@cache:6379/0");
/// assert_eq!(redacted_url("redis://cache:6379"), "redis://cache:6379");
/// ```
pub fn redacted_url(url: &str) -> String {
    match userinfo_at(url) {
        Some((start, info)) => format!("{}***{}", &url[..start], &url[start + info.len()..]),
        None => url.to_owned(),
    }
}

/// The user info of `url` and where it starts: between `scheme://` and the last `@`
/// of the authority (a password may hold an `@`).
fn userinfo_at(url: &str) -> Option<(usize, &str)> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    authority.rfind('@').map(|at| (start, &authority[..at]))
}

/// `text` without the URL's credentials, in case an error quotes them.
fn scrub(text: &str, userinfo: Option<&str>) -> String {
    let mut text = text.to_owned();
    if let Some(userinfo) = userinfo.filter(|u| !u.is_empty()) {
        text = text.replace(userinfo, "***");
        let password = userinfo.split_once(':').map_or("", |(_, p)| p);
        if password.len() >= 4 {
            text = text.replace(password, "***");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_doubles_to_its_cap_and_ends_on_success() {
        let t0 = Instant::now();
        let mut pause = Pause::default();
        assert_eq!(pause.left(t0), None);
        let mut now = t0;
        let mut pauses = Vec::new();
        for _ in 0..8 {
            pause.failed(now);
            let left = pause.left(now).unwrap();
            pauses.push(left.as_secs());
            // A failure during the pause does not lengthen it.
            pause.failed(now + left / 2);
            assert_eq!(pause.left(now), Some(left));
            now += left;
        }
        assert_eq!(pauses, [1, 2, 4, 8, 16, 30, 30, 30]);
        pause.succeeded();
        assert_eq!(pause, Pause::default());
        assert_eq!(pause.left(now), None);
    }

    #[test]
    fn redacted_url_hides_user_and_password_only() {
        for (url, shown) in [
            ("redis://:pw@h:6379/0", "redis://***@h:6379/0"),
            ("rediss://user:pw@h", "rediss://***@h"),
            ("redis://user:p@ss@h:1/2?x=@", "redis://***@h:1/2?x=@"),
            ("redis://h:6379", "redis://h:6379"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redacted_url(url), shown, "{url}");
        }
    }

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

        assert_eq!(
            scrub(
                "auth admin:s3cr3t-pw failed, s3cr3t-pw",
                Some("admin:s3cr3t-pw")
            ),
            "auth *** failed, ***"
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
        assert!(store.pause().left(Instant::now()).is_some());
    }
}
