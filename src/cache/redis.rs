//! The shared store: replies in Redis, so that every instance using the same server
//! and namespace answers from the others' calls.
//!
//! The `redis` crate's `ConnectionManager` holds one multiplexed connection and
//! reconnects it after a drop. Three things it does not do are added here, because the
//! cache must fail open (a request never waits on it): every call is bounded by the
//! configured timeout, its wait for a connection included; connecting runs in a task
//! of its own with a bound of its own (a TLS handshake to a distant server may take
//! longer than one call may wait, and still succeed for the calls after it); and after
//! a failure the store leaves the server alone for a while (1 s, doubling to 30 s while
//! it keeps failing), answering every call with an error at once, so an outage costs
//! calls nothing and a server coming back is not met by a connect from every call.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, RedisError};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{CacheError, CacheKey, CacheStore, CachedReply};
use pause::Pause;
pub use redact::redacted_url;
use redact::{scrub, userinfo_at};

mod pause;
mod redact;

/// The least time a connect (TCP, TLS, AUTH) is given, in the background.
const MIN_CONNECT_TIME: Duration = Duration::from_secs(5);
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
    namespace: String,
    /// The most one call may take, its wait for a connection included.
    timeout: Duration,
    /// How failures are told, without the URL's credentials.
    text: ErrorText,
    /// The connection, the connect under way, and the pause.
    link: Arc<Link>,
    /// Whether a value that is not a reply was met: logged once, read as a miss.
    corrupt_seen: AtomicBool,
}

/// What a store shares with its connect task.
#[derive(Debug, Default)]
struct Link {
    state: Mutex<LinkState>,
    /// Woken when a connect ends, either way.
    connected: Notify,
}

#[derive(Default)]
struct LinkState {
    /// The connection, once made; its manager reconnects it after a drop.
    manager: Option<ConnectionManager>,
    /// The connect under way, if any: one at a time, whoever waits for it.
    connecting: Option<JoinHandle<()>>,
    /// Why the last connect failed.
    failure: Option<CacheError>,
    /// How long the server is left alone after failing.
    pause: Pause,
}

/// The URL as it may be shown, and the texts of failures that name it.
#[derive(Debug, Clone)]
struct ErrorText {
    /// The URL with its credentials hidden: all that `Debug` and errors show of it.
    shown_url: String,
    /// The user info of the URL as written, scrubbed from any text the crate returns.
    userinfo: Option<String>,
    timeout: Duration,
}

impl RedisStore {
    /// A store on the server at `url` (`redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`,
    /// or `rediss://` for TLS), its keys prefixed by `namespace`, each call bounded by
    /// `timeout`. Does not connect: fails only for a URL that cannot be used.
    pub fn new(url: &str, namespace: &str, timeout: Duration) -> Result<RedisStore, CacheError> {
        let text = ErrorText {
            shown_url: redacted_url(url),
            userinfo: userinfo_at(url).map(|(_, info)| info.to_owned()),
            timeout,
        };
        let client = redis::Client::open(url).map_err(|e| {
            CacheError(format!(
                "{} is not a Redis URL ({}); expected redis://HOST:PORT[/DB], or rediss://… for TLS",
                text.shown_url,
                text.scrub(&e.to_string())
            ))
        })?;
        Ok(RedisStore {
            client,
            namespace: namespace.to_owned(),
            timeout,
            text,
            link: Arc::default(),
            corrupt_seen: AtomicBool::new(false),
        })
    }

    /// The Redis key of `key`.
    fn redis_key(&self, key: &CacheKey) -> String {
        format!("{}:cache:v1:{key}", self.namespace)
    }

    /// Runs `cmd`, bounded by the timeout, unless the server is being left alone.
    async fn call<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, CacheError> {
        if let Some(left) = self.link.state().pause.left(Instant::now()) {
            return Err(CacheError(format!(
                "redis {} failed recently; not asked again for {} ms",
                self.text.shown_url,
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
            .map_err(|e| self.text.failure("failed", &e))
        };
        let result = tokio::time::timeout(self.timeout, attempt)
            .await
            .unwrap_or_else(|_| Err(self.text.timed_out()));
        let mut state = self.link.state();
        match &result {
            Ok(_) => state.pause.succeeded(),
            Err(_) => state.pause.failed(Instant::now()),
        }
        result
    }

    /// The connection, once the connect under way (started now if none is) ends.
    async fn connection(&self) -> Result<ConnectionManager, CacheError> {
        if let Some(manager) = &self.link.state().manager {
            return Ok(manager.clone());
        }
        let connected = self.link.connected.notified();
        tokio::pin!(connected);
        // Registered before the state is read, so that a connect ending in between
        // still wakes this call.
        connected.as_mut().enable();
        {
            let mut state = self.link.state();
            if let Some(manager) = &state.manager {
                return Ok(manager.clone());
            }
            if state.connecting.is_none() {
                state.connecting = Some(self.connect());
            }
        }
        connected.await;
        let state = self.link.state();
        match (&state.manager, &state.failure) {
            (Some(manager), _) => Ok(manager.clone()),
            (None, Some(failure)) => Err(failure.clone()),
            (None, None) => Err(CacheError(format!(
                "redis {}: the connect ended without a connection",
                self.text.shown_url
            ))),
        }
    }

    /// Starts a connect in a task of its own: it may outlast the call that started
    /// it, for the calls after it. Its outcome is kept in the link: the connection, or
    /// why not and a pause.
    fn connect(&self) -> JoinHandle<()> {
        let bound = self.timeout.max(MIN_CONNECT_TIME);
        let config = ConnectionManagerConfig::new()
            // The pause decides when to try again, not the manager's own retries.
            .set_number_of_retries(0)
            .set_connection_timeout(Some(bound))
            .set_response_timeout(Some(self.timeout));
        let (client, link, text) = (
            self.client.clone(),
            Arc::clone(&self.link),
            self.text.clone(),
        );
        tokio::spawn(async move {
            let made =
                tokio::time::timeout(bound, ConnectionManager::new_with_config(client, config))
                    .await;
            let mut state = link.state();
            state.connecting = None;
            match made {
                Ok(Ok(manager)) => {
                    state.manager = Some(manager);
                    state.failure = None;
                    state.pause.succeeded();
                }
                Ok(Err(e)) => {
                    state.failure = Some(text.failure("could not be reached", &e));
                    state.pause.failed(Instant::now());
                }
                Err(_) => {
                    state.failure = Some(CacheError(format!(
                        "redis {} could not be reached within {bound:?}",
                        text.shown_url
                    )));
                    state.pause.failed(Instant::now());
                }
            }
            drop(state);
            link.connected.notify_waiters();
        })
    }
}

impl Link {
    fn state(&self) -> MutexGuard<'_, LinkState> {
        // Each field is replaced whole under the lock: a panic cannot leave one
        // half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ErrorText {
    fn timed_out(&self) -> CacheError {
        CacheError(format!(
            "redis {} did not answer within {:?} (cache.timeout)",
            self.shown_url, self.timeout
        ))
    }

    fn failure(&self, what: &str, error: &RedisError) -> CacheError {
        // The connection's own response timeout is the call's: one message for both.
        if error.is_timeout() {
            return self.timed_out();
        }
        CacheError(format!(
            "redis {} {what}: {}",
            self.shown_url,
            self.scrub(&error.to_string())
        ))
    }

    /// `text` without the URL's credentials, in case an error quotes them.
    fn scrub(&self, text: &str) -> String {
        scrub(text, self.userinfo.as_deref())
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        // A connect nobody can use any more.
        if let Some(connecting) = self.link.state().connecting.take() {
            connecting.abort();
        }
    }
}

impl fmt::Debug for LinkState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkState")
            .field("connected", &self.manager.is_some())
            .field("connecting", &self.connecting.is_some())
            .field("pause", &self.pause)
            .finish_non_exhaustive()
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
                        self.text.shown_url
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
        let state = self.link.state();
        f.debug_struct("RedisStore")
            .field("url", &self.text.shown_url)
            .field("namespace", &self.namespace)
            .field("timeout", &self.timeout)
            .field("connected", &state.manager.is_some())
            .field("connecting", &state.connecting.is_some())
            .field("failures_in_a_row", &state.pause.failures)
            .field("paused_for", &state.pause.left(Instant::now()))
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
        assert!(store.link.state().pause.left(Instant::now()).is_some());
    }
}
