//! Connections per call: a URL upstream that is `metaorch mock-upstream` counts the
//! connections it accepted and the requests each protocol carried (`GET /mock/stats`);
//! read before and after a run, they say how many connections the client opened per
//! 1,000 calls, and over which protocol the calls went.

use std::time::Duration;

use metaorch::mock_upstream::MockStats;
use serde::{Deserialize, Serialize};

/// The mock's counters at one moment; `None` from an upstream that has no
/// `/mock/stats` (a real API, another server).
pub(super) async fn read(upstream: &str) -> Option<MockStats> {
    #[derive(Deserialize)]
    struct Wire {
        connections_accepted: u64,
        connections_open: u64,
        requests_http1: u64,
        requests_http2: u64,
    }
    // A client of its own, so the bench's pool and its count are not disturbed by
    // more than this one connection.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .http1_only()
        .build()
        .ok()?;
    let url = format!("{}/mock/stats", upstream.trim_end_matches('/'));
    let response = client.get(url).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let wire: Wire = serde_json::from_slice(&response.bytes().await.ok()?).ok()?;
    Some(MockStats {
        connections_accepted: wire.connections_accepted,
        connections_open: wire.connections_open,
        requests_http1: wire.requests_http1,
        requests_http2: wire.requests_http2,
    })
}

/// What a run cost in connections.
#[derive(Debug, Clone, Serialize)]
pub(super) struct ConnectionReport {
    /// Connections the client opened during the run (the stats reads' own excluded).
    pub opened: u64,
    /// Calls the upstream answered during the run.
    pub calls: u64,
    /// `opened` per 1,000 `calls`.
    pub per_1000_calls: f64,
    /// `HTTP/1.1`, `HTTP/2` or `mixed`, by the requests the upstream saw.
    pub protocol: &'static str,
    /// Connections still open at the end (the client's idle pool, and in flight).
    pub open_at_end: u64,
}

impl ConnectionReport {
    /// The difference between two reads, less the connection the `after` read opened.
    pub(super) fn between(before: MockStats, after: MockStats) -> ConnectionReport {
        let opened = after
            .connections_accepted
            .saturating_sub(before.connections_accepted)
            .saturating_sub(1);
        let http1 = after.requests_http1.saturating_sub(before.requests_http1);
        let http2 = after.requests_http2.saturating_sub(before.requests_http2);
        let calls = http1 + http2;
        ConnectionReport {
            opened,
            calls,
            per_1000_calls: if calls > 0 {
                opened as f64 * 1000.0 / calls as f64
            } else {
                0.0
            },
            protocol: match (http1, http2) {
                (_, 0) => "HTTP/1.1",
                (0, _) => "HTTP/2",
                _ => "mixed",
            },
            // The read's own connection is still open while it is answered.
            open_at_end: after.connections_open.saturating_sub(1),
        }
    }
}
