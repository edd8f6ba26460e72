//! An in-memory ring of recent JSON log lines, so a server can show a recent request's
//! timeline (`GET /v1/traces/{id}`) without a log file. Bounded in bytes: the oldest
//! lines go first.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

use tracing_subscriber::fmt::MakeWriter;

use super::timeline::{Scanner, Select, Timeline};

/// Recent log lines, shared by the log layer that fills it and the readers.
#[derive(Debug, Clone)]
pub struct TraceRing(Arc<Mutex<Ring>>);

#[derive(Debug)]
struct Ring {
    lines: VecDeque<Box<[u8]>>,
    bytes: usize,
    max_bytes: usize,
}

impl TraceRing {
    /// A ring holding up to `max_bytes` of lines.
    pub fn new(max_bytes: usize) -> Self {
        TraceRing(Arc::new(Mutex::new(Ring {
            lines: VecDeque::new(),
            bytes: 0,
            max_bytes,
        })))
    }

    /// The timeline of `trace_id`, if its lines are still in the ring.
    pub fn timeline(&self, trace_id: &str) -> Option<Timeline> {
        let mut scanner = Scanner::new(Select::Trace(trace_id.to_owned()));
        let ring = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for line in &ring.lines {
            scanner.feed(line);
        }
        drop(ring);
        scanner.finish()
    }

    /// Lines held now.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).lines.len()
    }

    /// True when no line is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&self, line: &[u8]) {
        let mut ring = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if line.len() > ring.max_bytes {
            return;
        }
        ring.bytes += line.len();
        ring.lines.push_back(line.into());
        while ring.bytes > ring.max_bytes {
            match ring.lines.pop_front() {
                Some(old) => ring.bytes -= old.len(),
                None => break,
            }
        }
    }
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

    #[test]
    fn oldest_lines_go_first_and_timelines_are_read_back() {
        let ring = TraceRing::new(400);
        let id = "0123456789abcdef0123456789abcdef";
        let line = format!(
            "{{\"timestamp\":\"2026-11-25T10:00:00Z\",\"level\":\"INFO\",\"message\":\"m\",\"event\":\"agent.success\",\"trace_id\":\"{id}\",\"agent_id\":\"a\"}}\n"
        );
        for _ in 0..10 {
            ring.make_writer().write_all(line.as_bytes()).unwrap();
        }
        assert!(ring.len() < 10 && !ring.is_empty(), "bounded by bytes");
        let t = ring.timeline(id).unwrap();
        assert_eq!(t.agents[0].agent_id, "a");
        assert!(ring.timeline("ffffffffffffffffffffffffffffffff").is_none());
    }
}
