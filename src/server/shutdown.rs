//! Shutdown, from the signal to the last connection, within `drain_timeout`.
//!
//! 1. **Drain.** Readiness fails and new requests get 503 (connections are still
//!    accepted, so a load balancer that has not yet noticed gets a clear answer); the
//!    requests in flight finish.
//! 2. **Close.** The listener closes; every connection closes once its response is
//!    written, idle ones at once.
//! 3. **Cut**, when `drain_timeout` passes during either: the requests still in flight
//!    are cancelled — their unfinished agents end `cancelled`, each outcome and the
//!    `request.finish` (status `cancelled`) logged — with up to [`CANCEL_GRACE`] to do
//!    so, and every connection still open is dropped, a half-sent request or a slow
//!    body included. The server then returns, and the process exits.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::ServerState;
use super::listener::Connections;

/// How long cancelled requests have, after the drain timeout, to log their outcomes.
/// Cancellation ends an agent at once; this only bounds a synthesizer that is slow to
/// notice.
pub const CANCEL_GRACE: Duration = Duration::from_secs(1);

/// Step 1: waits for `shutdown`, then for the requests in flight (up to
/// `drain_timeout`). Returns the drain's deadline.
pub(super) async fn drain(state: &ServerState, shutdown: impl Future<Output = ()>) -> Instant {
    shutdown.await;
    state.draining.store(true, Ordering::Release);
    let deadline = Instant::now() + state.config.drain_timeout;
    let in_flight = state.in_flight();
    tracing::warn!(
        event = "server.draining",
        in_flight,
        drain_timeout_ms = state.config.drain_timeout.as_secs_f64() * 1000.0,
        "shutting down: refusing new requests, waiting for {in_flight} in flight"
    );
    // Every admitted request runs in a tracked task; none is admitted once draining.
    state.requests.close();
    let _ = tokio::time::timeout_at(deadline, state.requests.wait()).await;
    deadline
}

/// Steps 2 and 3: closes every connection, cutting what is left at `deadline`.
pub(super) async fn close(state: &ServerState, connections: &mut Connections, deadline: Instant) {
    // The requests are done or about to be cut: what is logged from here says how the
    // server stopped, and must not be lost to a full log queue.
    crate::telemetry::keep_last_lines();
    connections.close_gracefully();
    let closed = tokio::time::timeout_at(deadline, async {
        state.requests.wait().await;
        connections.closed().await;
    })
    .await;
    if closed.is_err() {
        let in_flight = state.in_flight();
        tracing::warn!(
            event = "server.drain_timeout",
            in_flight,
            connections = connections.open(),
            "drain timeout passed: cancelling {in_flight} requests still in flight and closing {} connections",
            connections.open()
        );
        state.cancel.cancel();
        let _ = tokio::time::timeout(CANCEL_GRACE, state.requests.wait()).await;
        connections.abort().await;
    }
    tracing::info!(
        event = "server.stopped",
        "stopped: every connection is closed"
    );
}
