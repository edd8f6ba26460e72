//! The mock's accept loop: HTTP/1.1 and HTTP/2 cleartext (h2c, prior knowledge) on the
//! same port, told apart by the connection's first bytes, and a count of the
//! connections and of the requests each protocol carried, so a bench or a test can
//! see how many connections a client opened for its calls.
//!
//! axum's own `serve` speaks both too, but counts nothing and caps HTTP/2 at hyper's
//! default of 200 streams a connection; here a client may multiplex every call it has
//! in flight on one connection.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

/// The most HTTP/2 streams (calls) one connection may carry at once: far above any
/// bench's calls in flight, so the client's multiplexing, not this limit, is measured.
const MAX_CONCURRENT_STREAMS: u32 = 100_000;

/// How long to wait before accepting again after an error such as too many open files.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Connections and requests counted since the mock started (`GET /mock/stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MockStats {
    /// TCP connections accepted.
    pub connections_accepted: u64,
    /// Of those, the ones still open.
    pub connections_open: u64,
    /// API requests that came over HTTP/1.x.
    pub requests_http1: u64,
    /// API requests that came over HTTP/2.
    pub requests_http2: u64,
}

/// The live counters behind [`MockStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    accepted: AtomicU64,
    closed: AtomicU64,
    http1: AtomicU64,
    http2: AtomicU64,
}

impl Counters {
    /// Counts one API request by its protocol.
    pub(crate) fn request(&self, version: axum::http::Version) {
        let counter = if version == axum::http::Version::HTTP_2 {
            &self.http2
        } else {
            &self.http1
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> MockStats {
        // Closed is read first, so open is never negative.
        let closed = self.closed.load(Ordering::Relaxed);
        let accepted = self.accepted.load(Ordering::Relaxed);
        MockStats {
            connections_accepted: accepted,
            connections_open: accepted.saturating_sub(closed),
            requests_http1: self.http1.load(Ordering::Relaxed),
            requests_http2: self.http2.load(Ordering::Relaxed),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` fires, then lets the requests in
/// progress finish (the caller bounds how long).
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    counters: Arc<Counters>,
    mut shutdown: oneshot::Receiver<()>,
) -> io::Result<()> {
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http2()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        // The mock's replies are small; the defaults' 64 KiB windows would do, but a
        // client sending many bodies at once should not wait on WINDOW_UPDATEs.
        .initial_connection_window_size(16 << 20);
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        let service = TowerToHyperService::new(app.clone());
        let connection = http
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        let counters = Arc::clone(&counters);
        connections.spawn(async move {
            let _ = connection.await;
            counters.closed.fetch_add(1, Ordering::Relaxed);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    while connections.join_next().await.is_some() {}
    Ok(())
}
