//! Telemetry: trace ids and the process's log output.
//!
//! Every request gets a [`TraceId`]; it is recorded on the request's `request` span, so
//! every event of that request — in whichever tokio task it happens — carries it.

mod logging;
mod trace_id;

pub use logging::{LogFormat, init_logging};
pub use trace_id::{ParseTraceIdError, TraceId};
