//! An in-memory ring of recent JSON log lines, so a server can show a recent request's
//! timeline (`GET /v1/traces/{id}`) without a log file. Bounded in bytes: the oldest
//! lines go first.
//!
//! Lines are indexed by trace id as they come in, so reading one request back copies
//! out that trace's lines (reference counted, not the bytes) and builds its timeline
//! outside the lock: the lock every log line of the process takes is never held for a
//! scan of the whole ring (16 MiB in `serve`), only for a push or a lookup. Lines
//! outside any request (`trace_id` null) could never be asked for, so none are kept.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex};

use memchr::memmem;
use tracing_subscriber::fmt::MakeWriter;

use super::timeline::{Scanner, Select, Timeline};

/// Recent log lines, shared by the log layer that fills it and the readers.
#[derive(Debug, Clone)]
pub struct TraceRing(Arc<Mutex<Ring>>);

/// A trace id as a number: the key of the index.
type TraceKey = u128;

#[derive(Debug)]
struct Ring {
    /// Every line held, oldest first, by trace and length: the order lines leave in.
    order: VecDeque<(TraceKey, usize)>,
    /// The lines of each trace, oldest first.
    by_trace: HashMap<TraceKey, VecDeque<Arc<[u8]>>>,
    bytes: usize,
    max_bytes: usize,
}

impl TraceRing {
    /// A ring holding up to `max_bytes` of lines.
    pub fn new(max_bytes: usize) -> Self {
        TraceRing(Arc::new(Mutex::new(Ring {
            order: VecDeque::new(),
            by_trace: HashMap::new(),
            bytes: 0,
            max_bytes,
        })))
    }

    /// The timeline of `trace_id`, if its lines are still in the ring: the request
    /// that started last when several share the trace (the others are listed in its
    /// `requests`).
    pub fn timeline(&self, trace_id: &str) -> Option<Timeline> {
        self.scan(trace_id, Select::Trace(trace_id.to_owned()))
    }

    /// The timeline of one request of `trace_id`, by its request id.
    pub fn request_timeline(&self, trace_id: &str, request_id: &str) -> Option<Timeline> {
        self.scan(
            trace_id,
            Select::Request {
                trace_id: trace_id.to_owned(),
                request_id: request_id.to_owned(),
            },
        )
    }

    fn scan(&self, trace_id: &str, select: Select) -> Option<Timeline> {
        let key = parse_key(trace_id.as_bytes())?;
        let lines: Vec<Arc<[u8]>> = {
            let ring = self.0.lock().unwrap_or_else(|e| e.into_inner());
            ring.by_trace.get(&key)?.iter().cloned().collect()
        };
        let mut scanner = Scanner::new(select);
        for line in &lines {
            scanner.feed_trace_line(line);
        }
        scanner.finish()
    }

    /// Lines held now.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).order.len()
    }

    /// True when no line is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&self, line: &[u8]) {
        let Some(key) = trace_key(line) else {
            return;
        };
        let line: Arc<[u8]> = line.into();
        let mut ring = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if line.len() > ring.max_bytes {
            return;
        }
        ring.bytes += line.len();
        ring.order.push_back((key, line.len()));
        ring.by_trace.entry(key).or_default().push_back(line);
        while ring.bytes > ring.max_bytes {
            let Some((old, len)) = ring.order.pop_front() else {
                break;
            };
            ring.bytes -= len;
            // Lines leave in the order they came, so the trace's oldest is this one.
            if let Some(lines) = ring.by_trace.get_mut(&old) {
                lines.pop_front();
                if lines.is_empty() {
                    ring.by_trace.remove(&old);
                }
            }
        }
    }
}

/// The trace id of a JSON log line, if it has one (`"trace_id":"<32 hex>"`).
fn trace_key(line: &[u8]) -> Option<TraceKey> {
    const FIELD: &[u8] = br#""trace_id":""#;
    let at = memmem::find(line, FIELD)? + FIELD.len();
    parse_key(line.get(at..at + 32)?)
}

fn parse_key(hex: &[u8]) -> Option<TraceKey> {
    if hex.len() != 32 {
        return None;
    }
    u128::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

/// One log line's writer.
#[derive(Debug)]
pub struct RingWriter(TraceRing);

impl io::Write for RingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // The JSON layer writes each line whole, in one call.
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for TraceRing {
    type Writer = RingWriter;

    fn make_writer(&'a self) -> RingWriter {
        RingWriter(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn line(trace: &str, request: &str, event: &str, extra: &str) -> String {
        format!(
            "{{\"timestamp\":\"2026-11-25T10:00:00Z\",\"level\":\"INFO\",\"message\":\"m\",\"event\":\"{event}\",\"trace_id\":\"{trace}\",\"request_id\":\"{request}\"{extra}}}\n"
        )
    }

    #[test]
    fn oldest_lines_go_first_and_timelines_are_read_back() {
        let ring = TraceRing::new(500);
        let id = "0123456789abcdef0123456789abcdef";
        let l = line(
            id,
            "00f067aa0ba902b7",
            "agent.success",
            ",\"agent_id\":\"a\"",
        );
        for _ in 0..10 {
            ring.make_writer().write_all(l.as_bytes()).unwrap();
        }
        assert!(ring.len() < 10 && !ring.is_empty(), "bounded by bytes");
        let t = ring.timeline(id).unwrap();
        assert_eq!(t.agents[0].agent_id, "a");
        assert_eq!(
            t.lines.lines as usize,
            ring.len(),
            "only this trace's lines read"
        );
        assert!(ring.timeline("ffffffffffffffffffffffffffffffff").is_none());
        assert!(ring.timeline("not a trace id").is_none());
    }

    #[test]
    fn lines_outside_a_request_are_not_kept_and_evicted_traces_leave_the_index() {
        let ring = TraceRing::new(400);
        let mut w = ring.make_writer();
        w.write_all(b"{\"trace_id\":null,\"event\":\"server.start\"}\n")
            .unwrap();
        assert!(ring.is_empty());
        let a = "0123456789abcdef0123456789abcdef";
        let b = "fedcba9876543210fedcba9876543210";
        w.write_all(line(a, "0000000000000001", "request.start", "").as_bytes())
            .unwrap();
        for _ in 0..5 {
            w.write_all(line(b, "0000000000000002", "request.start", "").as_bytes())
                .unwrap();
        }
        assert!(ring.timeline(a).is_none(), "a's only line was pushed out");
        assert!(ring.timeline(b).is_some());
        let held = ring.0.lock().unwrap();
        assert_eq!(held.by_trace.len(), 1, "no empty entry left for a");
        assert_eq!(held.bytes, held.order.iter().map(|(_, n)| n).sum::<usize>());
    }

    #[test]
    fn two_requests_of_one_trace_are_told_apart() {
        let ring = TraceRing::new(1 << 16);
        let id = "0123456789abcdef0123456789abcdef";
        let mut w = ring.make_writer();
        for (request, agent) in [("00000000000000a1", "x"), ("00000000000000b2", "y")] {
            w.write_all(line(id, request, "request.start", "").as_bytes())
                .unwrap();
            w.write_all(
                line(
                    id,
                    request,
                    "agent.success",
                    &format!(",\"agent_id\":\"{agent}\""),
                )
                .as_bytes(),
            )
            .unwrap();
        }
        let first = ring.request_timeline(id, "00000000000000a1").unwrap();
        assert_eq!(first.agents.len(), 1);
        assert_eq!(first.agents[0].agent_id, "x");
        let last = ring.timeline(id).unwrap();
        assert_eq!(last.request_id.as_deref(), Some("00000000000000b2"));
        assert_eq!(last.agents[0].agent_id, "y");
        assert_eq!(last.requests.len(), 2);
        assert!(ring.request_timeline(id, "00000000000000c3").is_none());
    }
}
