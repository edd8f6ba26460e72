//! Telemetry: trace ids, the process's log output (one flat JSON object per event),
//! and reading a request's timeline back out of a log.
//!
//! Every request gets a [`TraceId`]; it is recorded on the request's `request` span, so
//! every event of that request — in whichever tokio task it happens — carries it.

mod json_layer;
mod logging;
pub mod metrics;
mod nonblocking;
pub mod otel;
mod request_id;
mod ring;
mod terminal;
pub mod timeline;
mod trace_id;
mod usd;

pub use json_layer::JsonLayer;
pub(crate) use logging::open_append_as;
pub use logging::{
    DEFAULT_LOG_LEVEL, LogFormat, TelemetryGuard, init_logging, init_logging_with_ring,
    init_server_telemetry, init_telemetry, init_telemetry_through,
};
pub(crate) use nonblocking::keep_last_lines;
pub use request_id::{ParseRequestIdError, RequestId};
pub use ring::{RingWriter, TraceRing};
pub use terminal::{terminal_safe, terminal_safe_line};
pub use trace_id::{ParseTraceIdError, TraceId};
