//! One Redis server as the cache store and the cluster's shared limits see it: a
//! connection that never makes a caller wait longer than its timeout, and a server that
//! is left alone for a while after it fails.
//!
//! The `redis` crate's `ConnectionManager` holds one multiplexed connection and
//! reconnects it after a drop. Three things it does not do are added here, because
//! every user of Redis in metaorch must fail open (a request never waits on it): every
//! call is bounded by the configured timeout, its wait for a connection included;
//! connecting runs in a task of its own with a bound of its own (a TLS handshake to a
//! distant server may take longer than one call may wait, and still succeed for the
//! calls after it); and after a failure the server is left alone for a while (1 s,
//! doubling to 30 s while it keeps failing), every call answered with an error at once,
//! so an outage costs calls nothing and a server coming back is not met by a connect
//! from every call.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, RedisError};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use pause::Pause;
pub use redact::redacted_url;
use redact::{scrub, userinfo_at};

mod pause;
mod redact;

/// The least time a connect (TCP, TLS, AUTH) is given, in the background.
const MIN_CONNECT_TIME: Duration = Duration::from_secs(5);

/// A Lua script, called by its SHA-1.
#[derive(Debug)]
pub(crate) struct LuaScript {
    pub(crate) text: &'static str,
    pub(crate) sha1: String,
}

impl LuaScript {
    pub(crate) fn new(text: &'static str) -> LuaScript {
        let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, text.as_bytes());
        let sha1 = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        LuaScript { text, sha1 }
    }
}

/// A failed Redis call: what happened, the server named without its credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LinkError(pub(crate) String);

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A server, reached through one connection made on first use.
pub(crate) struct RedisLink {
    client: redis::Client,
    /// The most one call may take, its wait for a connection included.
    timeout: Duration,
    /// How failures are told, without the URL's credentials.
    text: ErrorText,
    /// The connection, the connect under way, and the pause.
    link: Arc<Link>,
    /// The longest the server is left alone after failing.
    max_pause: Duration,
}

/// What a link shares with its connect task.
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
    failure: Option<LinkError>,
    /// How long the server is left alone after failing.
    pause: Pause,
    /// What the last failure was, told while the server is left alone.
    last_failure: Option<String>,
}

/// The URL as it may be shown, and the texts of failures that name it.
#[derive(Debug, Clone)]
struct ErrorText {
    /// The URL with its credentials hidden: all that `Debug` and errors show of it.
    shown_url: String,
    /// The user info of the URL as written, scrubbed from any text the crate returns.
    userinfo: Option<String>,
    timeout: Duration,
    /// The setting that bounds a call, named when one times out.
    setting: &'static str,
}

impl RedisLink {
    /// A link to the server at `url` (`redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`, or
    /// `rediss://` for TLS), each call bounded by `timeout` (the setting `setting`).
    /// Does not connect: fails only for a URL that cannot be used.
    pub(crate) fn new(
        url: &str,
        timeout: Duration,
        setting: &'static str,
    ) -> Result<RedisLink, LinkError> {
        let text = ErrorText {
            shown_url: redacted_url(url),
            userinfo: userinfo_at(url).map(|(_, info)| info.to_owned()),
            timeout,
            setting,
        };
        let client = redis::Client::open(url).map_err(|e| {
            LinkError(format!(
                "{} is not a Redis URL ({}); expected redis://HOST:PORT[/DB], or rediss://… for TLS",
                text.shown_url,
                text.scrub(&e.to_string())
            ))
        })?;
        Ok(RedisLink {
            client,
            timeout,
            text,
            link: Arc::default(),
            max_pause: Duration::MAX,
        })
    }

    /// Leaves a failing server alone at most `max` at a time (30 s by default).
    pub(crate) fn with_max_pause(mut self, max: Duration) -> Self {
        self.max_pause = max;
        self
    }

    /// The URL with its credentials hidden.
    pub(crate) fn shown_url(&self) -> &str {
        &self.text.shown_url
    }

    /// The client, for connections of another kind (publish/subscribe).
    pub(crate) fn client(&self) -> &redis::Client {
        &self.client
    }

    /// How long the server is still left alone after failing, if it is.
    #[cfg(test)]
    pub(crate) fn paused_for(&self) -> Option<Duration> {
        self.link.state().pause.left(Instant::now())
    }

    /// Runs `cmd`, bounded by the timeout, unless the server is being left alone.
    pub(crate) async fn call<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, LinkError> {
        self.query(cmd, None).await
    }

    /// Runs `script` with the arguments `args` appends (the key count, the keys, the
    /// values): by its SHA-1 (`EVALSHA`), and by its text (`EVAL`) only when the server
    /// does not have it yet — a few dozen bytes a call instead of the whole script.
    pub(crate) async fn call_script<T: FromRedisValue>(
        &self,
        script: &LuaScript,
        args: impl Fn(&mut redis::Cmd),
    ) -> Result<T, LinkError> {
        let mut by_sha = redis::cmd("EVALSHA");
        by_sha.arg(&script.sha1);
        args(&mut by_sha);
        let mut by_text = redis::cmd("EVAL");
        by_text.arg(script.text);
        args(&mut by_text);
        self.query(&by_sha, Some(&by_text)).await
    }

    /// `cmd` — or, when the server answers NOSCRIPT, `noscript` — bounded by the
    /// timeout, unless the server is being left alone.
    async fn query<T: FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        noscript: Option<&redis::Cmd>,
    ) -> Result<T, LinkError> {
        {
            let state = self.link.state();
            if let Some(left) = state.pause.left(Instant::now()) {
                return Err(LinkError(format!(
                    "{}; not asked again for {} ms",
                    state
                        .last_failure
                        .as_deref()
                        .unwrap_or("redis failed recently"),
                    left.as_millis()
                )));
            }
        }
        let attempt = async {
            let mut connection = self.connection().await?;
            match cmd.query_async(&mut connection).await {
                // The script is not loaded yet (a new or restarted server): its text
                // once loads it. The server answered; nothing failed.
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
                        && noscript.is_some() =>
                {
                    match noscript {
                        Some(by_text) => by_text.query_async(&mut connection).await,
                        None => Err(e),
                    }
                }
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
            Ok(_) => {
                state.pause.succeeded();
                state.last_failure = None;
            }
            Err(e) => {
                state.pause.failed(Instant::now(), self.max_pause);
                state.last_failure = Some(e.0.clone());
            }
        }
        result
    }

    /// The connection, once the connect under way (started now if none is) ends.
    async fn connection(&self) -> Result<ConnectionManager, LinkError> {
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
            (None, None) => Err(LinkError(format!(
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
        let (client, link, text, max_pause) = (
            self.client.clone(),
            Arc::clone(&self.link),
            self.text.clone(),
            self.max_pause,
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
                    let failure = text.failure("could not be reached", &e);
                    state.last_failure = Some(failure.0.clone());
                    state.failure = Some(failure);
                    state.pause.failed(Instant::now(), max_pause);
                }
                Err(_) => {
                    let failure = LinkError(format!(
                        "redis {} could not be reached within {bound:?}",
                        text.shown_url
                    ));
                    state.last_failure = Some(failure.0.clone());
                    state.failure = Some(failure);
                    state.pause.failed(Instant::now(), max_pause);
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
    fn timed_out(&self) -> LinkError {
        LinkError(format!(
            "redis {} did not answer within {:?} ({})",
            self.shown_url, self.timeout, self.setting
        ))
    }

    fn failure(&self, what: &str, error: &RedisError) -> LinkError {
        // The connection's own response timeout is the call's: one message for both.
        if error.is_timeout() {
            return self.timed_out();
        }
        LinkError(format!(
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

impl Drop for RedisLink {
    fn drop(&mut self) {
        // A connect nobody can use any more.
        if let Some(connecting) = self.link.state().connecting.take() {
            connecting.abort();
        }
    }
}

impl fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.link.state();
        f.debug_struct("RedisLink")
            .field("url", &self.text.shown_url)
            .field("timeout", &self.timeout)
            .field("connected", &state.manager.is_some())
            .field("connecting", &state.connecting.is_some())
            .field("failures_in_a_row", &state.pause.failures)
            .field("paused_for", &state.pause.left(Instant::now()))
            .finish_non_exhaustive()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_is_named_by_the_sha1_redis_gives_it() {
        // `SCRIPT LOAD "return 1"` answers this.
        assert_eq!(
            LuaScript::new("return 1").sha1,
            "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
        );
    }
}
