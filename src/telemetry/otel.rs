//! OpenTelemetry export (OTLP over HTTP/protobuf): each request becomes a tree of spans
//! — `request`, one `agent` per sub-agent, one `attempt` per provider call with GenAI
//! semantic-convention attributes — and retries, breaker transitions and fallbacks
//! become span events. The OTel trace id is the request's trace id, the one in the JSON
//! logs and in the `traceparent` sent upstream, so all three can be joined.
//!
//! Off unless an endpoint is configured (`telemetry.otlp_endpoint` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT`); when off, nothing is built and spans cost what they
//! cost without it.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

use super::TraceId;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Flushes and stops the exporter when dropped: keep it alive until the process ends.
/// Drop it outside any async runtime (it blocks while the last spans are sent).
#[derive(Debug)]
pub struct OtelGuard(SdkTracerProvider);

impl Drop for OtelGuard {
    fn drop(&mut self) {
        let _ = self.0.force_flush();
        let _ = self.0.shutdown();
        ENABLED.store(false, Ordering::Release);
    }
}

/// The endpoint in force: the configured one, else `OTEL_EXPORTER_OTLP_ENDPOINT`.
pub fn endpoint(configured: Option<&str>) -> Option<String> {
    configured
        .map(str::to_owned)
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
        .filter(|e| !e.trim().is_empty())
}

/// A tracing layer exporting spans to the OTLP/HTTP collector at `endpoint` (its base
/// URL, e.g. `http://127.0.0.1:4318`; `/v1/traces` is appended), and the guard that
/// flushes it. Build it outside an async runtime.
pub fn layer<S>(
    endpoint: &str,
) -> Result<(impl Layer<S> + Send + Sync + 'static, OtelGuard), String>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let url = if endpoint.trim_end_matches('/').ends_with("/v1/traces") {
        endpoint.to_owned()
    } else {
        format!("{}/v1/traces", endpoint.trim_end_matches('/'))
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(
            reqwest::blocking::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()
                .map_err(|e| format!("cannot build the OTLP client: {e}"))?,
        )
        .with_endpoint(url.clone())
        .build()
        .map_err(|e| format!("cannot export to {url}: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name("metaorch").build())
        .build();
    let tracer = provider.tracer("metaorch");
    ENABLED.store(true, Ordering::Release);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_target(false)
        .with_threads(false);
    Ok((layer, OtelGuard(provider)))
}

/// Makes `span` (a request's root span) carry `trace_id` as its OpenTelemetry trace
/// id, as the child of the caller's span `parent` when an incoming `traceparent` named
/// one. Does nothing when export is off.
pub(crate) fn adopt_trace_id(span: &tracing::Span, trace_id: TraceId, parent: Option<u64>) {
    if !ENABLED.load(Ordering::Acquire) {
        return;
    }
    let id = u128::from_str_radix(&trace_id.to_string(), 16).unwrap_or(1);
    // The parent is the caller: its span from `traceparent`, or a stand-in remote span
    // of this trace when the caller sent none.
    let parent = SpanContext::new(
        opentelemetry::trace::TraceId::from_bytes(id.to_be_bytes()),
        SpanId::from_bytes(parent.unwrap_or((id as u64) | 1).to_be_bytes()),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
}
