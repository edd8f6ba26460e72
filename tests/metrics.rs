//! `/metrics` lists every documented metric from the start, at zero, so dashboards and
//! alerts can be built before the first request. (Its own test binary: the Prometheus
//! recorder is process-wide.)

use std::sync::Arc;

use metaorch::config::ServerConfig;
use metaorch::orchestrator::Orchestrator;
use metaorch::server::{ServerState, serve};

/// The metrics the README's table documents, every one.
fn documented() -> Vec<&'static str> {
    let readme = include_str!("../README.md");
    let names: Vec<&str> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|name| name.starts_with("metaorch_"))
        .collect();
    assert!(names.len() >= 20, "the README's metric table: {names:?}");
    names
}

/// A real `serve` over 127.0.0.1, scraped before any request: every documented
/// metric is there, at zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_listed_before_the_first_request() {
    let orchestrator = Orchestrator::builder().build().unwrap();
    let state = ServerState::new(
        orchestrator,
        ServerConfig {
            metrics_auth: false,
            ..ServerConfig::default()
        },
        None,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/metrics", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, Arc::clone(&state), async move {
        let _ = stopped.await;
    }));

    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    for name in documented() {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} is missing from:\n{text}"
        );
    }
    for zero in [
        r#"metaorch_agent_calls_total{agent="critic",provider="sim",model="sim-1",outcome="failed"} 0"#,
        r#"metaorch_requests_total{outcome="cancelled"} 0"#,
        r#"metaorch_breaker_state{provider="sim",model="sim-1"} 0"#,
        r#"metaorch_server_connections_refused_total 0"#,
    ] {
        assert!(
            text.lines().any(|l| l == zero),
            "{zero} is missing from:\n{text}"
        );
    }
    let _ = stop.send(());
    tokio::time::timeout(std::time::Duration::from_secs(5), task)
        .await
        .expect("serve stops")
        .unwrap()
        .unwrap();
}
