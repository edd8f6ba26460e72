//! OpenTelemetry export to an in-process OTLP/HTTP receiver on 127.0.0.1 that decodes
//! the protobuf: the spans form the request → agent → attempt tree, carry the GenAI
//! attributes, and share the trace id of the JSON logs and the response.
//!
//! One test per binary: it installs the process's global subscriber.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use metaorch::Orchestrator;
use metaorch::config::Config;
use metaorch::telemetry::{LogFormat, init_telemetry};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

type Received = Arc<Mutex<Vec<Span>>>;

async fn receive(State(received): State<Received>, body: Bytes) -> Vec<u8> {
    let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
    let mut spans = received.lock().unwrap();
    for resource in request.resource_spans {
        for scope in resource.scope_spans {
            spans.extend(scope.spans);
        }
    }
    ExportTraceServiceResponse::default().encode_to_vec()
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| {
            kv.value.as_ref()?.value.as_ref().map(|v| match v {
                AnyValue::StringValue(s) => s.clone(),
                AnyValue::IntValue(i) => i.to_string(),
                AnyValue::BoolValue(b) => b.to_string(),
                AnyValue::DoubleValue(d) => d.to_string(),
                other => format!("{other:?}"),
            })
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn spans_form_the_request_tree_with_genai_attributes_and_the_log_trace_id() {
    let received: Received = Arc::default();
    let collector = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let url = collector.block_on(async {
        let app = Router::new()
            .route("/v1/traces", post(receive))
            .with_state(Arc::clone(&received));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    });

    let guard = init_telemetry("warn", LogFormat::Json, None, None, Some(&url))
        .unwrap()
        .expect("export is on");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let response = runtime.block_on(async {
        let config = Config::from_toml_str(
            r#"
            [defaults.retry]
            initial_delay = "1ms"
            max_delay = "2ms"
            [providers.sim]
            kind = "sim"
            latency_min = "1ms"
            latency_max = "3ms"
            [[providers.sim.faults.script]]
            agent = "critic"
            first_attempts = 1
            kind = "overloaded"
            [[providers.sim.faults.script]]
            agent = "writer"
            first_attempts = 9
            kind = "auth"
            [[agents]]
            id = "researcher"
            provider = "sim"
            [[agents]]
            id = "critic"
            provider = "sim"
            [[agents]]
            id = "writer"
            provider = "sim"
            fallback = { text = "no draft" }
            "#,
            "otel.toml",
        )
        .unwrap();
        let orchestrator = Orchestrator::builder().config(config).build().unwrap();
        // A request that arrived with a traceparent: its span is the caller's child.
        let incoming: metaorch::telemetry::TraceId =
            "0af7651916cd43dd8448eb211c80319c".parse().unwrap();
        orchestrator
            .process_request(
                metaorch::Request::new("q")
                    .with_trace_id(incoming)
                    .with_parent_span(0xb7ad_6b71_6920_3331),
            )
            .await
            .unwrap();
        orchestrator.process("q").await.unwrap()
    });
    drop(runtime);
    drop(guard); // flushes

    let spans = received.lock().unwrap().clone();
    let called = spans
        .iter()
        .find(|s| s.name == "request" && hex(&s.trace_id) == "0af7651916cd43dd8448eb211c80319c")
        .expect("the traced request's span");
    assert_eq!(
        hex(&called.parent_span_id),
        "b7ad6b7169203331",
        "child of the caller's span"
    );

    let trace_id = response.trace_id.to_string();
    let ours: Vec<&Span> = spans
        .iter()
        .filter(|s| hex(&s.trace_id) == trace_id)
        .collect();
    assert!(
        !ours.is_empty(),
        "no span with the response's trace id among {}",
        spans.len()
    );
    assert_eq!(
        ours.len() * 2,
        spans.len(),
        "two requests, the same tree each"
    );

    let by_name = |name: &str| {
        ours.iter()
            .filter(|s| s.name == name)
            .copied()
            .collect::<Vec<_>>()
    };
    let request = by_name("request");
    assert_eq!(request.len(), 1);
    let request = request[0];
    let agents = by_name("agent");
    assert_eq!(agents.len(), 3);
    assert!(
        agents.iter().all(|a| a.parent_span_id == request.span_id),
        "agents hang off the request"
    );
    let attempts = by_name("attempt");
    assert_eq!(
        attempts.len(),
        4,
        "three first tries and the critic's retry"
    );
    let agent_ids: HashMap<Vec<u8>, String> = agents
        .iter()
        .map(|a| (a.span_id.clone(), attr(a, "agent_id").unwrap()))
        .collect();
    for attempt in &attempts {
        assert!(
            agent_ids.contains_key(&attempt.parent_span_id),
            "attempts hang off agents"
        );
        assert_eq!(
            attr(attempt, "gen_ai.request.model").as_deref(),
            Some("sim-1")
        );
        assert_eq!(
            attr(attempt, "gen_ai.provider.name").as_deref(),
            Some("sim")
        );
        assert_eq!(
            attr(attempt, "gen_ai.operation.name").as_deref(),
            Some("chat")
        );
    }
    let ok = attempts
        .iter()
        .find(|a| agent_ids[&a.parent_span_id] == "researcher")
        .unwrap();
    assert!(
        attr(ok, "gen_ai.usage.input_tokens")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 0
    );
    assert!(
        attr(ok, "gen_ai.usage.output_tokens")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 0
    );
    assert_eq!(
        attr(ok, "gen_ai.response.finish_reasons").as_deref(),
        Some("end_turn")
    );
    let failed: Vec<_> = attempts
        .iter()
        .filter_map(|a| attr(a, "error.type"))
        .collect();
    assert!(failed.contains(&"overloaded".to_owned()), "{failed:?}");
    assert!(failed.contains(&"auth".to_owned()), "{failed:?}");

    // Retry and fallback are span events on their agents.
    let events_of = |id: &str| {
        let agent = agents
            .iter()
            .find(|a| attr(a, "agent_id").as_deref() == Some(id))
            .unwrap();
        agent
            .events
            .iter()
            .filter_map(|e| {
                e.attributes
                    .iter()
                    .find(|kv| kv.key == "event")
                    .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                        AnyValue::StringValue(s) => Some(s.clone()),
                        _ => None,
                    })
            })
            .collect::<Vec<_>>()
    };
    assert!(
        events_of("critic").contains(&"agent.retry".to_owned()),
        "{:?}",
        events_of("critic")
    );
    assert!(
        events_of("writer").contains(&"agent.fallback".to_owned()),
        "{:?}",
        events_of("writer")
    );
    collector.shutdown_background();
}
