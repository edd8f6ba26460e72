//! A request running in a task of its own, so that it always ends properly inside
//! metaorch.
//!
//! When a client disconnects mid-request, hyper drops the handler's future; a request
//! processed inside that future would vanish with it, its `request.finish` never
//! logged and its metrics never counted. Here the request runs in a task the server
//! tracks, and the handler holds a [`RunningRequest`]: dropping it cancels the
//! request, which then finishes at once with its unfinished agents `cancelled` — each
//! outcome logged, `request.finish` logged with status `cancelled`, metrics counted,
//! and `/v1/traces/{id}` showing it finished. The server's drain waits for these tasks
//! and, past `drain_timeout`, cancels them the same way.

use tokio::task::JoinHandle;
use tokio_util::sync::DropGuard;

use super::orchestrate::request_error;
use super::{Admission, ApiError, ServerState};
use crate::Response;
use crate::orchestrator::{Request, RequestError};

/// A request in its task; dropping it cancels the request.
#[derive(Debug)]
pub(super) struct RunningRequest {
    handle: JoinHandle<Result<Response, RequestError>>,
    cancel: Option<DropGuard>,
}

impl RunningRequest {
    /// Starts `request` in a task the server tracks; `admission` is held until it ends.
    pub(super) fn spawn(state: &ServerState, request: Request, admission: Admission) -> Self {
        let cancel = request.cancel.clone().drop_guard();
        let orchestrator = state.orchestrator.clone();
        let handle = state.requests.spawn(async move {
            let result = orchestrator.process_request(request).await;
            drop(admission);
            result
        });
        RunningRequest {
            handle,
            cancel: Some(cancel),
        }
    }

    /// The request's response, once it is done.
    pub(super) async fn finish(mut self) -> Result<Response, ApiError> {
        let joined = (&mut self.handle).await;
        // Done: nothing left to cancel.
        if let Some(guard) = self.cancel.take() {
            guard.disarm();
        }
        match joined {
            Ok(result) => result.map_err(request_error),
            Err(e) => Err(ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("the request's task failed: {e}"),
            )),
        }
    }
}
