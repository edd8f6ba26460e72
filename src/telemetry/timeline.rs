//! Reading one request's story back out of a JSON log: the engine of `metaorch trace`.
//!
//! A [`Scanner`] reads a log a block at a time and keeps only the lines of the trace it
//! is after, so memory stays flat however big the log is. Lines of other requests are
//! never parsed, nor even searched one by one: a search over the whole block for the
//! trace id (or, for `--last`, for the `request.start` event) finds the few lines that
//! matter, which is what makes it faster than piping the log through `grep` into
//! `jq`. [`Scanner::finish`] turns the kept lines into a [`Timeline`]: one row per
//! agent with its span, attempts, retries, fallback and end, the breaker events, and
//! the critical path.
//!
//! A caller may send several requests inside one `traceparent`, so one trace id can
//! hold several requests. Each request's lines carry its own `request_id` (from the
//! request span); the scanner keys on it, so two requests of one trace are two
//! timelines, never one merged story. Lines without a `request_id` (logs written
//! before it existed) are one request per trace, as they always were.

mod blocks;
mod scanner;

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::Serialize;
use serde_json::Value;

pub use scanner::{ScanStats, Scanner, Select};

/// One request of a trace that holds several.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestRef {
    /// Its request id.
    pub request_id: Option<String>,
    /// When its first line was written.
    pub started_at: String,
    /// `ok`, `failed`, `cancelled`, or `unfinished` when no `request.finish` was seen.
    pub status: String,
}

impl RequestRef {
    fn of(t: &Timeline) -> RequestRef {
        RequestRef {
            request_id: t.request_id.clone(),
            started_at: t.started_at.clone(),
            status: t.status.clone(),
        }
    }
}

/// One request's story.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timeline {
    /// The request's trace id.
    pub trace_id: String,
    /// The request's own id (absent in logs written before request ids existed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// `ok`, `failed`, `cancelled` (the client went away, or the server's drain timed
    /// out), or `unfinished` when no `request.finish` line was seen.
    pub status: String,
    /// When the first line was written (the `request.start` when present).
    pub started_at: String,
    /// From the first to the last line, or the `request.finish` duration.
    pub total_ms: f64,
    /// Whether the request met `min_successes` (from `request.finish`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ok: Option<bool>,
    /// Outcome counts (from `request.finish`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<Counts>,
    /// What the request's calls cost in US dollars (from `request.finish`; absent when
    /// unknown: a model without a price, or a log written before costs were).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// One row per agent, in order of dispatch.
    pub agents: Vec<AgentRow>,
    /// Circuit breaker transitions during the request.
    pub breakers: Vec<BreakerRow>,
    /// Flow control changes this request's calls caused: pauses, resumes, concurrency
    /// limits cut, rate limits learned.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub flow: Vec<FlowRow>,
    /// The agent the request waited for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub critical_path: Option<CriticalPath>,
    /// Whether the request's last line (`request.finish`) was seen.
    pub finished: bool,
    /// What the scan read.
    pub lines: ScanStats,
    /// Every request of this trace, in the order they started, when it holds more than
    /// one (a caller's `traceparent` shared by several requests).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<RequestRef>,
}

/// Outcome counts of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Agents that succeeded.
    pub succeeded: u64,
    /// Agents that failed.
    pub failed: u64,
    /// Agents cut off by the deadline or a cancellation.
    pub timed_out: u64,
}

/// One agent's part of the request. Times are milliseconds from the request's start.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentRow {
    /// The agent's id.
    pub agent_id: String,
    /// Its provider and model, when a line said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `succeeded`, `failed`, `timed_out`, `panicked`, or `unfinished` when no end was
    /// logged.
    pub status: String,
    /// When it was dispatched.
    pub start_ms: f64,
    /// When it ended (or its last line, if unfinished).
    pub end_ms: f64,
    /// Provider calls made.
    pub attempts: u64,
    /// Time waiting to be let through (flow control and concurrency slots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_ms: Option<f64>,
    /// The part of `queue_ms` spent behind a provider's pause (`Retry-After`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<f64>,
    /// Time inside provider calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_ms: Option<f64>,
    /// What its calls cost in US dollars (absent when unknown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// Each retry.
    pub retries: Vec<RetryRow>,
    /// Retries that could have been made but were refused, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
    /// The fallback that took over, if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackRow>,
    /// Why it did not succeed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorRow>,
    /// The synthesizer's call after the fan-out, not a sub-agent.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub synthesis: bool,
    /// Answered from the response cache: where from (`memory`, `redis`, `in_flight`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached: Option<String>,
}

/// One retry of an agent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryRow {
    /// When the failed attempt ended.
    pub at_ms: f64,
    /// The attempt that failed.
    pub attempt: u64,
    /// Its error kind.
    pub error: String,
    /// Its HTTP status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u64>,
    /// The wait before the next attempt.
    pub delay_ms: f64,
    /// `backoff` or `retry_after`.
    pub source: String,
}

/// A fallback that took over for an agent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FallbackRow {
    /// When it took over.
    pub at_ms: f64,
    /// `agent` or `text`.
    pub source: String,
    /// The fallback agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The primary's error kind.
    pub primary_error: String,
}

/// An agent's final error.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorRow {
    /// Its kind.
    pub kind: String,
    /// Its HTTP status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u64>,
    /// Its message.
    pub message: String,
}

/// A breaker transition.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakerRow {
    /// When it happened.
    pub at_ms: f64,
    /// `open`, `half_open` or `closed`.
    pub state: String,
    /// The provider.
    pub provider: String,
    /// The model.
    pub model: String,
    /// Why.
    pub reason: String,
}

/// A flow control change: `pause`, `resume`, `limit` (the concurrency limit cut) or
/// `limits_learned`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlowRow {
    /// When it happened.
    pub at_ms: f64,
    /// Which change.
    pub change: String,
    /// The provider.
    pub provider: String,
    /// The model.
    pub model: String,
    /// What it came to: the pause's length, the new limit, the limits learned.
    pub detail: String,
}

/// The agent the request waited for, and where its time went.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CriticalPath {
    /// The agent that finished last.
    pub agent_id: String,
    /// Its time from dispatch to end.
    pub duration_ms: f64,
    /// Its share of the request's total.
    pub share: f64,
    /// Time it spent waiting between retries.
    pub retry_wait_ms: f64,
    /// Time it spent waiting to be let through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_ms: Option<f64>,
    /// The part of `queue_ms` spent behind a provider's pause.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<f64>,
}

/// `x` to `places` decimals: milliseconds to the microsecond, not
/// `0.11199999999985266`.
fn round(x: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (x * scale).round() / scale
}

/// Time an agent spent waiting to retry, not counting a `Retry-After` wait spent in
/// its provider's queue behind a pause (that is in `pause_ms` already).
fn retry_wait(a: &AgentRow) -> f64 {
    let total: f64 = a.retries.iter().map(|r| r.delay_ms).sum();
    let retry_after: f64 = a
        .retries
        .iter()
        .filter(|r| r.source == "retry_after")
        .map(|r| r.delay_ms)
        .sum();
    total - retry_after.min(a.pause_ms.unwrap_or(0.0))
}

impl Timeline {
    fn build(
        trace_id: String,
        request_id: Option<String>,
        mut lines: Vec<Value>,
        stats: ScanStats,
    ) -> Timeline {
        // Lines from several tasks can reach the log slightly out of order.
        lines.sort_by(|a, b| a["timestamp"].as_str().cmp(&b["timestamp"].as_str()));
        let time = |v: &Value| {
            v["timestamp"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
        };
        let start_line = lines
            .iter()
            .find(|l| l["event"] == "request.start")
            .unwrap_or(&lines[0]);
        let origin = time(start_line).unwrap_or(SystemTime::UNIX_EPOCH);
        let started_at = start_line["timestamp"].as_str().unwrap_or("").to_owned();
        let at = |v: &Value| {
            time(v)
                .and_then(|t| t.duration_since(origin).ok())
                .map_or(0.0, |d| round(d.as_secs_f64() * 1000.0, 3))
        };

        let mut agents: BTreeMap<String, AgentRow> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        let mut breakers = Vec::new();
        let mut flow = Vec::new();
        let mut finish = None;
        for line in &lines {
            let event = line["event"].as_str().unwrap_or("");
            let t = at(line);
            if let Some(state) = event.strip_prefix("breaker.")
                && state != "reject"
            {
                breakers.push(BreakerRow {
                    at_ms: t,
                    state: state.to_owned(),
                    provider: text(&line["provider"]),
                    model: text(&line["model"]),
                    reason: text(&line["reason"]),
                });
                continue;
            }
            if let Some(change) = event.strip_prefix("flow.") {
                let ms = |name: &str| line[name].as_f64().map_or(0.0, |v| v / 1000.0);
                let detail = match change {
                    "pause" => format!("{:.3}s ({})", ms("pause_ms"), text(&line["reason"])),
                    "resume" => format!("after {:.3}s", ms("paused_ms")),
                    "limit" => format!(
                        "{} → {} ({})",
                        line["previous"],
                        line["limit"],
                        text(&line["reason"])
                    ),
                    _ => text(&line["message"]),
                };
                flow.push(FlowRow {
                    at_ms: t,
                    change: change.to_owned(),
                    provider: text(&line["provider"]),
                    model: text(&line["model"]),
                    detail,
                });
                continue;
            }
            if event == "request.finish" {
                finish = Some(line);
                continue;
            }
            let Some(id) = line["agent_id"].as_str() else {
                continue;
            };
            let row = agents.entry(id.to_owned()).or_insert_with(|| {
                order.push(id.to_owned());
                AgentRow {
                    agent_id: id.to_owned(),
                    provider: None,
                    model: None,
                    status: "unfinished".to_owned(),
                    start_ms: t,
                    end_ms: t,
                    attempts: 0,
                    queue_ms: None,
                    pause_ms: None,
                    provider_ms: None,
                    cost_usd: None,
                    retries: Vec::new(),
                    refused: Vec::new(),
                    fallback: None,
                    error: None,
                    synthesis: false,
                    cached: None,
                }
            });
            row.end_ms = row.end_ms.max(t);
            if row.provider.is_none() {
                row.provider = line["provider"].as_str().map(str::to_owned);
                row.model = line["model"].as_str().map(str::to_owned);
            }
            if let Some(n) = line["attempt"].as_u64() {
                row.attempts = row.attempts.max(n);
            }
            match event {
                "agent.retry" => row.retries.push(RetryRow {
                    at_ms: t,
                    attempt: line["attempt"].as_u64().unwrap_or(0),
                    error: text(&line["error.kind"]),
                    status: line["status"].as_u64(),
                    delay_ms: line["delay_ms"].as_f64().unwrap_or(0.0),
                    source: text(&line["delay_source"]),
                }),
                "agent.retry_refused" => row.refused.push(text(&line["reason"])),
                "agent.fallback" => {
                    row.fallback = Some(FallbackRow {
                        at_ms: t,
                        source: text(&line["source"]),
                        agent: line["fallback_agent"].as_str().map(str::to_owned),
                        primary_error: text(&line["error.kind"]),
                    });
                }
                "synthesis.start" => row.synthesis = true,
                "agent.cache_hit" => row.cached = Some(text(&line["source"])),
                "agent.success" | "agent.failure" | "agent.timeout" | "agent.panic"
                | "synthesis.finish" => {
                    row.status = match event {
                        "agent.success" => "succeeded",
                        "agent.failure" => "failed",
                        "agent.timeout" => "timed_out",
                        "synthesis.finish" => line["status"].as_str().unwrap_or("finished"),
                        _ => "panicked",
                    }
                    .to_owned();
                    row.synthesis |= event == "synthesis.finish";
                    row.end_ms = t;
                    // The end line knows how long the agent ran: that places its start.
                    if let Some(latency) = line["latency_ms"].as_f64() {
                        row.start_ms = round((t - latency).max(0.0), 3);
                    }
                    row.queue_ms = line["queue_ms"].as_f64();
                    row.pause_ms = line["pause_ms"].as_f64();
                    row.provider_ms = line["provider_ms"].as_f64();
                    row.cost_usd = line["cost_usd"].as_f64();
                    if let Some(n) = line["attempts"].as_u64() {
                        row.attempts = n;
                    }
                    // The end line is the agent's own: its provider and model win over a
                    // fallback's.
                    if let Some(p) = line["provider"].as_str() {
                        row.provider = Some(p.to_owned());
                    }
                    if let Some(m) = line["model"].as_str() {
                        row.model = Some(m.to_owned());
                    }
                    if event != "agent.success" && row.status != "succeeded" {
                        row.error = Some(ErrorRow {
                            kind: text(&line["error.kind"]),
                            status: line["status"].as_u64(),
                            message: text(&line["error.message"]),
                        });
                    }
                }
                _ => {}
            }
        }

        let last = lines.last().map_or(0.0, at);
        let total_ms = finish
            .and_then(|f| f["duration_ms"].as_f64())
            .unwrap_or(last);
        let mut agents: Vec<AgentRow> = order
            .into_iter()
            .filter_map(|id| agents.remove(&id))
            .collect();
        agents.sort_by(|a, b| a.start_ms.total_cmp(&b.start_ms));
        let critical_path = agents
            .iter()
            .max_by(|a, b| a.end_ms.total_cmp(&b.end_ms))
            .map(|a| CriticalPath {
                agent_id: a.agent_id.clone(),
                duration_ms: round(a.end_ms - a.start_ms, 3),
                share: if total_ms > 0.0 {
                    round(((a.end_ms - a.start_ms) / total_ms).min(1.0), 4)
                } else {
                    1.0
                },
                retry_wait_ms: round(retry_wait(a), 3),
                queue_ms: a.queue_ms,
                pause_ms: a.pause_ms,
            });
        let status = match finish {
            // `status` is newer than `ok`: older logs have only the latter.
            Some(f) => f["status"].as_str().map_or_else(
                || match f["ok"].as_bool() {
                    Some(true) => "ok".to_owned(),
                    Some(false) => "failed".to_owned(),
                    None => "finished".to_owned(),
                },
                str::to_owned,
            ),
            None => "unfinished".to_owned(),
        };
        Timeline {
            trace_id,
            request_id,
            status,
            started_at,
            total_ms,
            ok: finish.and_then(|f| f["ok"].as_bool()),
            cost_usd: finish.and_then(|f| f["cost_usd"].as_f64()),
            summary: finish.and_then(|f| {
                Some(Counts {
                    succeeded: f["succeeded"].as_u64()?,
                    failed: f["failed"].as_u64()?,
                    timed_out: f["timed_out"].as_u64()?,
                })
            }),
            agents,
            breakers,
            flow,
            critical_path,
            finished: finish.is_some(),
            lines: stats,
            requests: Vec::new(),
        }
    }
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or("").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0123456789abcdef0123456789abcdef";
    const B: &str = "fedcba9876543210fedcba9876543210";

    fn feed(scanner: &mut Scanner, lines: &[String]) {
        for l in lines {
            scanner.feed(l.as_bytes());
        }
    }

    fn line(trace: &str, ts: &str, event: &str, extra: &str) -> String {
        format!(
            r#"{{"timestamp":"2026-11-25T10:00:{ts}Z","level":"INFO","message":"m","event":"{event}","trace_id":"{trace}"{extra}}}"#
        )
    }

    #[test]
    fn keeps_one_trace_and_counts_garbage() {
        let lines = vec![
            line(A, "00.000", "request.start", ""),
            line(B, "00.001", "request.start", ""),
            "not json at all".to_owned(),
            format!(r#"{{"trace_id":"{A}","shape":"other"}}"#),
            format!(r#"{{"trace_id":"{A}", broken"#),
            line(
                A,
                "01.000",
                "agent.success",
                r#","agent_id":"x","latency_ms":900.0,"attempts":1,"cost_usd":0.0125"#,
            ),
            line(
                B,
                "02.000",
                "agent.success",
                r#","agent_id":"y","latency_ms":100.0"#,
            ),
            line(
                A,
                "01.100",
                "request.finish",
                r#","duration_ms":1100.0,"ok":true,"succeeded":1,"failed":0,"timed_out":0,"cost_usd":0.0125"#,
            ),
        ];
        let mut s = Scanner::new(Select::Trace(A.into()));
        feed(&mut s, &lines);
        let t = s.finish().unwrap();
        assert_eq!(t.lines.lines, 8);
        assert_eq!(t.lines.matched, 3);
        assert_eq!(
            t.lines.skipped, 3,
            "the text, the other shape, the broken line"
        );
        assert_eq!(t.agents.len(), 1);
        let x = &t.agents[0];
        assert_eq!(
            (x.start_ms, x.end_ms, x.status.as_str()),
            (100.0, 1000.0, "succeeded")
        );
        assert_eq!(t.total_ms, 1100.0);
        assert_eq!(t.ok, Some(true));
        assert_eq!((x.cost_usd, t.cost_usd), (Some(0.0125), Some(0.0125)));
        assert_eq!(t.critical_path.unwrap().agent_id, "x");
    }

    #[test]
    fn shows_the_wait_behind_a_pause_and_the_flow_changes() {
        let lines = vec![
            line(A, "00.000", "request.start", ""),
            line(
                A,
                "00.050",
                "flow.pause",
                r#","provider":"claude","model":"m","pause_ms":5000.0,"reason":"rate_limited""#,
            ),
            line(
                A,
                "00.050",
                "agent.retry",
                r#","agent_id":"x","attempt":1,"error.kind":"rate_limited","status":429,"delay_ms":5000.0,"delay_source":"retry_after""#,
            ),
            line(
                A,
                "05.100",
                "flow.resume",
                r#","provider":"claude","model":"m","paused_ms":5000.0"#,
            ),
            line(
                A,
                "05.200",
                "agent.success",
                r#","agent_id":"x","latency_ms":5200.0,"queue_ms":5000.0,"pause_ms":4950.0,"attempts":2"#,
            ),
            line(A, "05.200", "request.finish", r#","duration_ms":5200.0"#),
        ];
        let mut s = Scanner::new(Select::Trace(A.into()));
        feed(&mut s, &lines);
        let t = s.finish().unwrap();
        let x = &t.agents[0];
        assert_eq!((x.queue_ms, x.pause_ms), (Some(5000.0), Some(4950.0)));
        let changes: Vec<_> = t.flow.iter().map(|f| f.change.as_str()).collect();
        assert_eq!(changes, ["pause", "resume"]);
        assert_eq!(t.flow[0].detail, "5.000s (rate_limited)");
        let c = t.critical_path.unwrap();
        // The Retry-After wait was spent behind the pause: not counted twice.
        assert_eq!(c.retry_wait_ms, 50.0);
        assert_eq!(c.pause_ms, Some(4950.0));
    }

    #[test]
    fn last_picks_the_request_that_started_last() {
        let lines = vec![
            line(A, "00.000", "request.start", ""),
            line(B, "00.500", "request.start", ""),
            line(A, "01.000", "agent.success", r#","agent_id":"x""#),
            line(B, "01.500", "agent.success", r#","agent_id":"y""#),
        ];
        let mut s = Scanner::new(Select::Last);
        feed(&mut s, &lines);
        let t = s.finish().unwrap();
        assert_eq!(t.trace_id, B);
        assert_eq!(t.agents[0].agent_id, "y");
        assert!(!t.finished);
    }

    #[test]
    fn two_requests_of_one_trace_are_two_timelines() {
        let r = |id: &str| format!(r#","request_id":"{id}""#);
        let lines = vec![
            line(A, "00.000", "request.start", &r("00000000000000a1")),
            line(A, "00.100", "request.start", &r("00000000000000b2")),
            line(
                A,
                "00.500",
                "agent.success",
                &format!(r#"{},"agent_id":"x""#, r("00000000000000a1")),
            ),
            line(
                A,
                "00.600",
                "agent.timeout",
                &format!(
                    r#"{},"agent_id":"y","error.kind":"cancelled""#,
                    r("00000000000000b2")
                ),
            ),
            line(
                A,
                "00.700",
                "request.finish",
                &format!(
                    r#"{},"status":"cancelled","ok":false"#,
                    r("00000000000000b2")
                ),
            ),
            line(
                A,
                "00.800",
                "request.finish",
                &format!(r#"{},"status":"ok","ok":true"#, r("00000000000000a1")),
            ),
        ];
        let mut s = Scanner::new(Select::Trace(A.into()));
        feed(&mut s, &lines);
        let all = s.finish_all();
        assert_eq!(all.len(), 2);
        let ids: Vec<_> = all.iter().map(|t| t.request_id.clone().unwrap()).collect();
        assert_eq!(ids, ["00000000000000a1", "00000000000000b2"], "start order");
        assert_eq!(all[0].agents.len(), 1);
        assert_eq!(all[0].agents[0].agent_id, "x");
        assert_eq!((all[0].status.as_str(), all[0].finished), ("ok", true));
        assert_eq!(all[1].agents[0].agent_id, "y");
        assert_eq!(all[1].status, "cancelled");
        assert_eq!(all[1].requests.len(), 2);

        let mut s = Scanner::new(Select::Request {
            trace_id: A.into(),
            request_id: "00000000000000a1".into(),
        });
        feed(&mut s, &lines);
        let one = s.finish().unwrap();
        assert_eq!(one.agents[0].agent_id, "x");
        assert!(one.requests.is_empty(), "only the request asked for");

        // `--last` picks the request that started last, not the trace.
        let mut s = Scanner::new(Select::Last);
        feed(&mut s, &lines);
        let last = s.finish().unwrap();
        assert_eq!(last.request_id.as_deref(), Some("00000000000000b2"));
        assert_eq!(last.agents.len(), 1);
    }

    #[test]
    fn nothing_found_is_none() {
        let mut s = Scanner::new(Select::Trace(A.into()));
        s.feed(line(B, "00.000", "request.start", "").as_bytes());
        assert!(s.finish().is_none());
        assert!(Scanner::new(Select::Last).finish().is_none());
    }
}
