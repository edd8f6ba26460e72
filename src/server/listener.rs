//! Accepting connections and serving each one: HTTP/1.1 through hyper, with a deadline
//! for a request's headers and a cap on connections open at once.
//!
//! axum's own `serve` has neither: a client that sends its headers a byte at a time,
//! or opens connections and sends nothing, would hold them for ever. Here every
//! connection is a hyper connection with `header_read_timeout` (which also bounds how
//! long a keep-alive connection may sit idle between requests), and a semaphore of
//! `max_connections` slots is taken before one is served.
//!
//! Past `max_connections`, up to [`OVERFLOW_CONNECTIONS`] more are let in to answer
//! one request each — `/healthz` as usual, so a probe still sees a live process, and
//! 503 with `Retry-After` to anything else — and are then closed. Past those, a new
//! connection is closed as soon as it is accepted.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{ApiError, ServerState};
use crate::telemetry::metrics;

/// Connections let in past `max_connections`, to answer `/healthz` (and 503).
pub const OVERFLOW_CONNECTIONS: usize = 64;

/// The longest an overflow connection may take to send its headers.
const OVERFLOW_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// How long to wait before accepting again after an error such as too many open
/// files: long enough not to spin, short enough to recover at once.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The connections being served, and how new ones are let in.
#[derive(Debug)]
pub(super) struct Connections {
    /// The API, for connections within `max_connections`.
    app: Router,
    /// `/healthz` and 503, for overflow connections.
    overflow_app: Router,
    http: http1::Builder,
    overflow_http: http1::Builder,
    /// One slot per connection served.
    slots: Arc<Semaphore>,
    /// One slot per overflow connection.
    overflow: Arc<Semaphore>,
    max_connections: usize,
    tasks: JoinSet<()>,
    /// Cancelled when the server stops: every connection then closes once its
    /// response is written.
    close: CancellationToken,
    /// Whether the current stretch of full slots (or of accept errors) was logged:
    /// one line per episode, not one per connection.
    full_logged: bool,
    accept_error_logged: bool,
}

impl Connections {
    pub(super) fn new(state: &Arc<ServerState>) -> Connections {
        let config = &state.config;
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout);
        let mut overflow_http = http1::Builder::new();
        overflow_http
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout.min(OVERFLOW_HEADER_TIMEOUT))
            .keep_alive(false);
        Connections {
            app: super::router(Arc::clone(state)),
            overflow_app: overflow_router(config.max_connections),
            http,
            overflow_http,
            slots: Arc::new(Semaphore::new(config.max_connections)),
            overflow: Arc::new(Semaphore::new(OVERFLOW_CONNECTIONS)),
            max_connections: config.max_connections,
            tasks: JoinSet::new(),
            close: CancellationToken::new(),
            full_logged: false,
            accept_error_logged: false,
        }
    }

    /// Serves a newly accepted connection, or closes it when every slot is taken.
    pub(super) async fn accept(&mut self, accepted: io::Result<(TcpStream, SocketAddr)>) {
        let stream = match accepted {
            Ok((stream, _)) => {
                self.accept_error_logged = false;
                stream
            }
            Err(e) => return self.accept_failed(e).await,
        };
        // Small responses go out at once rather than waiting to be coalesced.
        let _ = stream.set_nodelay(true);
        if let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() {
            self.full_logged = false;
            let (app, http) = (self.app.clone(), self.http.clone());
            self.spawn(stream, app, http, slot, "served");
        } else if let Ok(slot) = Arc::clone(&self.overflow).try_acquire_owned() {
            self.log_full();
            let (app, http) = (self.overflow_app.clone(), self.overflow_http.clone());
            self.spawn(stream, app, http, slot, "overflow");
        } else {
            self.log_full();
            metrics::connection_refused();
            drop(stream);
        }
    }

    fn spawn(
        &mut self,
        stream: TcpStream,
        app: Router,
        http: http1::Builder,
        slot: OwnedSemaphorePermit,
        kind: &'static str,
    ) {
        let close = self.close.clone();
        self.tasks
            .spawn(serve_connection(stream, app, http, close, slot, kind));
    }

    fn log_full(&mut self) {
        if !self.full_logged {
            self.full_logged = true;
            tracing::warn!(
                event = "server.connections_full",
                max_connections = self.max_connections,
                overflow = OVERFLOW_CONNECTIONS,
                "{} connections are open, the most this server takes (server.max_connections): new ones get 503, or are closed once {} more are waiting",
                self.max_connections,
                OVERFLOW_CONNECTIONS
            );
        }
    }

    async fn accept_failed(&mut self, e: io::Error) {
        // A client that gave up before its connection was accepted: its own affair.
        if matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionRefused
        ) {
            return;
        }
        if !self.accept_error_logged {
            self.accept_error_logged = true;
            tracing::error!(
                event = "server.accept_error",
                error = %e,
                "cannot accept connections: {e}; retrying every {} ms (raise the open-file limit, or lower server.max_connections)",
                ACCEPT_BACKOFF.as_millis()
            );
        }
        tokio::time::sleep(ACCEPT_BACKOFF).await;
    }

    /// Collects a connection that closed; never resolves while none is open.
    pub(super) async fn reap(&mut self) {
        match self.tasks.join_next().await {
            Some(_) => {}
            None => std::future::pending().await,
        }
    }

    /// Connections open now.
    pub(super) fn open(&self) -> usize {
        self.tasks.len()
    }

    /// Asks every connection to close once its response is written; idle ones close
    /// at once.
    pub(super) fn close_gracefully(&self) {
        self.close.cancel();
    }

    /// Resolves once every connection has closed.
    pub(super) async fn closed(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }

    /// Drops every connection still open.
    pub(super) async fn abort(&mut self) {
        self.tasks.shutdown().await;
    }
}

/// One connection, served until the client closes it, a timeout closes it, or the
/// server asks it to close.
async fn serve_connection(
    stream: TcpStream,
    app: Router,
    http: http1::Builder,
    close: CancellationToken,
    _slot: OwnedSemaphorePermit,
    kind: &'static str,
) {
    let _open = OpenConnection::new(kind);
    let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = close.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    // A slow client, a reset, a malformed request: one connection's trouble, at debug
    // so that a flood of them cannot flood the log.
    if let Err(e) = result {
        tracing::debug!(
            event = "server.connection_closed",
            kind,
            timeout = e.is_timeout(),
            error = %e,
            "connection closed: {e}"
        );
    }
}

/// Counts a connection in `metaorch_server_connections` while it is open, however its
/// task ends (aborted included).
struct OpenConnection(&'static str);

impl OpenConnection {
    fn new(kind: &'static str) -> Self {
        metrics::connection(kind, 1.0);
        OpenConnection(kind)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::connection(self.0, -1.0);
    }
}

/// What an overflow connection answers: `/healthz` as usual, 503 to the rest.
fn overflow_router(max_connections: usize) -> Router {
    Router::new()
        .route("/healthz", get(super::healthz))
        .fallback(move || async move {
            ApiError::unavailable(format!(
                "{max_connections} connections are open, the most this server takes (server.max_connections); retry shortly"
            ))
        })
}
