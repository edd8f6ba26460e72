//! Picking one request's lines out of a log: the search behind `metaorch trace`.
//!
//! Logs of a load run hold millions of lines, and one request is a handful of them.
//! The [`Scanner`] searches a block of whole lines (a megabyte) at once for the trace
//! id with `memmem`, and only around a hit finds the line's ends and keeps it; other
//! lines are never searched one by one, let alone parsed. The lines are still counted,
//! and those that cannot be a JSON object counted as skipped, in a second pass that
//! does little more than find the newlines.
//!
//! For `--last`, the request followed is the one of the last `request.start` line: in
//! each block the scanner finds the event's mentions, parses the last one's line alone
//! (or the one before, if that line is no object), and searches for its trace id from
//! there on. Earlier starts in the block would be replaced by it anyway.

use std::io::{self, Read};

use memchr::memmem;
use serde::Serialize;
use serde_json::Value;

use super::blocks::Blocks;
use super::{RequestRef, Timeline};

/// Which request to pick out of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Select {
    /// The requests of the trace with this id (32 lowercase hex digits): the one that
    /// started last, with the others listed in [`Timeline::requests`].
    Trace(String),
    /// One request of a trace, by its request id (16 lowercase hex digits).
    Request {
        /// The trace id.
        trace_id: String,
        /// The request id.
        request_id: String,
    },
    /// The request that started last.
    Last,
}

/// What the scan read and what it kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ScanStats {
    /// Lines read.
    pub lines: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Lines of the chosen request.
    pub matched: u64,
    /// Lines that were not JSON, or JSON of another shape, and so were skipped.
    pub skipped: u64,
}

/// The event that opens a request, as the log writes it.
const START: &[u8] = br#""event":"request.start""#;

/// Streams log lines and keeps those of one trace.
///
/// ```
/// use metaorch::telemetry::timeline::{Scanner, Select};
///
/// let log = concat!(
///     r#"{"timestamp":"2026-11-25T10:00:00Z","event":"request.start","trace_id":"0123456789abcdef0123456789abcdef"}"#,
///     "\nnot JSON\n",
///     r#"{"timestamp":"2026-11-25T10:00:01Z","event":"request.finish","trace_id":"0123456789abcdef0123456789abcdef","ok":true}"#,
/// );
/// let mut scanner = Scanner::new(Select::Last);
/// scanner.read(log.as_bytes())?;
/// let timeline = scanner.finish().expect("a request");
/// assert_eq!(timeline.trace_id, "0123456789abcdef0123456789abcdef");
/// assert_eq!((timeline.lines.lines, timeline.lines.skipped), (3, 1));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct Scanner {
    select: Select,
    /// The trace id being collected (for `Last`, the latest `request.start` seen).
    current: Option<String>,
    /// For `Last`, the request id of the latest `request.start`; for `Request`, the
    /// one asked for.
    request: Option<String>,
    /// Finds `current`.
    finder: Option<memmem::Finder<'static>>,
    /// Finds the `request.start` lines of a block.
    start_finder: memmem::Finder<'static>,
    /// The trace's lines, as read: parsed only at the end, so that `--last` does not
    /// parse every request's lines on the way to the last one.
    kept: Vec<Vec<u8>>,
    stats: ScanStats,
}

impl Scanner {
    /// A scanner for `select`.
    pub fn new(select: Select) -> Self {
        let (current, request) = match &select {
            Select::Trace(id) => (Some(id.clone()), None),
            Select::Request {
                trace_id,
                request_id,
            } => (Some(trace_id.clone()), Some(request_id.clone())),
            Select::Last => (None, None),
        };
        Scanner {
            finder: current
                .as_ref()
                .map(|id| memmem::Finder::new(id.as_bytes()).into_owned()),
            current,
            request,
            select,
            start_finder: memmem::Finder::new(START).into_owned(),
            kept: Vec::new(),
            stats: ScanStats::default(),
        }
    }

    /// Reads a whole log (plain bytes: a gzipped one goes through a decoder first) in
    /// blocks, keeping the chosen request's lines.
    pub fn read(&mut self, reader: impl Read) -> io::Result<()> {
        let mut blocks = Blocks::new(reader);
        while let Some(block) = blocks.next_block()? {
            self.feed(block);
        }
        Ok(())
    }

    /// Feeds whole lines: one, or a block of them. Each ends with a newline, except
    /// perhaps the last one, which is taken as a line of its own; a stream cut at any
    /// other place would cut a line in two, so streams go through [`Scanner::read`].
    pub fn feed(&mut self, block: &[u8]) {
        self.count(block);
        let from = match self.select {
            Select::Last => self.follow_last_start(block),
            Select::Trace(_) | Select::Request { .. } => 0,
        };
        self.keep_hits(block, from);
    }

    /// Feeds lines already known to be of the trace asked for (a ring indexed by
    /// trace id): no search.
    pub(crate) fn feed_trace_line(&mut self, line: &[u8]) {
        self.stats.lines += 1;
        self.stats.bytes += line.len() as u64;
        self.kept.push(line.trim_ascii().to_vec());
    }

    /// Counts the block's lines, and as skipped those that cannot be a JSON object.
    fn count(&mut self, block: &[u8]) {
        self.stats.bytes += block.len() as u64;
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', block) {
            self.count_line(&block[start..end]);
            start = end + 1;
        }
        if start < block.len() {
            self.count_line(&block[start..]);
        }
    }

    fn count_line(&mut self, line: &[u8]) {
        self.stats.lines += 1;
        // Nearly every line is an object alone on its line: decided on two bytes.
        if line.first() == Some(&b'{') && line.last() == Some(&b'}') {
            return;
        }
        if !line.trim_ascii().is_empty() && braced(line).is_none() {
            self.stats.skipped += 1;
        }
    }

    /// For `Last`: follows the request of the block's last `request.start` line that
    /// names a trace, if there is one, and returns where its line begins (the start of
    /// the block otherwise). The lines before it are of requests that started earlier.
    fn follow_last_start(&mut self, block: &[u8]) -> usize {
        // Searched forwards in windows from the block's end, each four times the one
        // before: in a log of short lines the last start is a few lines from the end,
        // and in one of long lines the block is crossed in a few vectorised searches (a
        // backward search has no vectorised prefilter: it crawled).
        let mut end = block.len();
        let mut window = 1 << 12;
        while end > 0 {
            let from = end.saturating_sub(window);
            // A mention that begins before `end` may finish after it.
            let to = (end + START.len() - 1).min(block.len());
            let starts: Vec<usize> = self
                .start_finder
                .find_iter(&block[from..to])
                .map(|at| from + at)
                .collect();
            for at in starts.into_iter().rev() {
                if at >= end {
                    // On a line already tried, or in the window before.
                    continue;
                }
                let (start, line_end) = line_around(block, at);
                if let Some(v) = braced(&block[start..line_end]).and_then(parse)
                    && let Some(id) = v["trace_id"].as_str().filter(|id| !id.is_empty())
                {
                    self.finder = Some(memmem::Finder::new(id.as_bytes()).into_owned());
                    self.current = Some(id.to_owned());
                    self.request = v["request_id"].as_str().map(str::to_owned);
                    self.kept.clear();
                    return start;
                }
                end = start;
            }
            end = end.min(from);
            window = window.saturating_mul(4);
        }
        0
    }

    /// Keeps each line of `block[from..]` that holds the trace id: an object of this
    /// trace, or one that mentions it in passing (told apart when parsed at the end).
    fn keep_hits(&mut self, block: &[u8], mut from: usize) {
        let Some(finder) = &self.finder else {
            return;
        };
        while from < block.len()
            && let Some(at) = finder.find(&block[from..])
        {
            let (start, end) = line_around(block, from + at);
            if let Some(line) = braced(&block[start..end]) {
                self.kept.push(line.to_vec());
            }
            // Once per line, however often the id appears in it.
            from = end + 1;
        }
    }

    /// The trace id chosen so far.
    pub fn trace_id(&self) -> Option<&str> {
        self.current.as_deref()
    }

    /// What has been read so far (`matched` is counted by [`Scanner::finish`]).
    pub fn stats(&self) -> ScanStats {
        self.stats
    }

    /// The timeline of the chosen request, or `None` when none of its lines were seen.
    /// When the trace holds several requests and none was named, it is the one that
    /// started last; [`Timeline::requests`] lists them all.
    pub fn finish(self) -> Option<Timeline> {
        let wanted = self.request.clone();
        let mut all = self.finish_all();
        let index = match &wanted {
            Some(id) => all
                .iter()
                .position(|t| t.request_id.as_deref() == Some(id.as_str()))?,
            None => all.len().checked_sub(1)?,
        };
        Some(all.swap_remove(index))
    }

    /// The timeline of every request of the chosen trace, in the order they started
    /// (for `Last` and `Request`, the chosen request's alone).
    pub fn finish_all(mut self) -> Vec<Timeline> {
        let Some(trace_id) = self.current.take() else {
            return Vec::new();
        };
        // Lines by request id, in the order each request was first seen.
        let mut groups: Vec<(Option<String>, Vec<Value>)> = Vec::new();
        let every_request = matches!(self.select, Select::Trace(_));
        for raw in &self.kept {
            let v = match parse(raw) {
                Some(v) if v["trace_id"].as_str() == Some(trace_id.as_str()) => v,
                // Another request's line that mentions this id in passing.
                Some(_) => continue,
                None => {
                    self.stats.skipped += 1;
                    continue;
                }
            };
            if !(v["timestamp"].is_string() && v["event"].is_string()) {
                self.stats.skipped += 1;
                continue;
            }
            let request = v["request_id"].as_str().map(str::to_owned);
            if !every_request && request != self.request {
                continue;
            }
            match groups.iter_mut().find(|(id, _)| *id == request) {
                Some((_, lines)) => lines.push(v),
                None => groups.push((request, vec![v])),
            }
        }
        let mut timelines: Vec<Timeline> = groups
            .into_iter()
            .map(|(request_id, lines)| {
                let stats = ScanStats {
                    matched: lines.len() as u64,
                    ..self.stats
                };
                Timeline::build(trace_id.clone(), request_id, lines, stats)
            })
            .collect();
        timelines.sort_by(|a, b| a.started_at.cmp(&b.started_at));
        if timelines.len() > 1 {
            let requests: Vec<RequestRef> = timelines.iter().map(RequestRef::of).collect();
            for t in &mut timelines {
                t.requests = requests.clone();
            }
        }
        timelines
    }
}

/// The line without the whitespace around it, when it may be a JSON object: braced at
/// both ends (a line cut short by a crash mid-write is not).
fn braced(line: &[u8]) -> Option<&[u8]> {
    let line = line.trim_ascii();
    (line.first() == Some(&b'{') && line.last() == Some(&b'}')).then_some(line)
}

/// The start and end (its newline, or the block's end) of the line holding `at`.
fn line_around(block: &[u8], at: usize) -> (usize, usize) {
    let start = memchr::memrchr(b'\n', &block[..at]).map_or(0, |i| i + 1);
    let end = memchr::memchr(b'\n', &block[at..]).map_or(block.len(), |i| at + i);
    (start, end)
}

fn parse(line: &[u8]) -> Option<Value> {
    serde_json::from_slice::<Value>(line)
        .ok()
        .filter(Value::is_object)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use proptest::prelude::*;

    use super::*;

    const A: &str = "0123456789abcdef0123456789abcdef";
    const B: &str = "fedcba9876543210fedcba9876543210";

    fn line(trace: &str, ts: &str, event: &str, extra: &str) -> String {
        format!(
            r#"{{"timestamp":"2026-11-25T10:00:{ts}Z","level":"INFO","message":"m","event":"{event}","trace_id":"{trace}"{extra}}}"#
        )
    }

    /// Two interleaved requests, a line of B that quotes A's id, and garbage.
    fn log() -> String {
        [
            line(A, "00.000", "request.start", ""),
            line(B, "00.001", "request.start", ""),
            "not json at all".to_owned(),
            line(
                B,
                "00.002",
                "agent.failure",
                &format!(r#","agent_id":"y","error.message":"upstream said {A}""#),
            ),
            line(A, "00.500", "agent.success", r#","agent_id":"x""#),
            String::new(),
            format!(r#"{{"trace_id":"{A}", cut short"#),
            line(B, "00.600", "agent.success", r#","agent_id":"z""#),
            line(A, "01.000", "request.finish", r#","ok":true"#),
        ]
        .join("\n")
    }

    /// What a scan came to: the trace followed, the lines kept, the counts.
    fn outcome(s: &Scanner) -> (Option<String>, Option<String>, Vec<Vec<u8>>, ScanStats) {
        (
            s.current.clone(),
            s.request.clone(),
            s.kept.clone(),
            s.stats,
        )
    }

    /// Scans `data` cut into blocks of about `block` bytes.
    fn scan_in_blocks(select: Select, data: &[u8], block: usize) -> Scanner {
        let mut scanner = Scanner::new(select);
        let mut blocks = Blocks::with_block_size(data, block);
        while let Some(b) = blocks.next_block().unwrap() {
            scanner.feed(b);
        }
        scanner
    }

    /// The scan as it was done a line at a time: what the block search must equal.
    fn scan_by_line(select: Select, data: &[u8]) -> Scanner {
        let mut s = Scanner::new(select);
        for raw in data.split_inclusive(|b| *b == b'\n') {
            s.stats.lines += 1;
            s.stats.bytes += raw.len() as u64;
            let line = raw.trim_ascii();
            if line.is_empty() {
                continue;
            }
            if line[0] != b'{' || line[line.len() - 1] != b'}' {
                s.stats.skipped += 1;
                continue;
            }
            if s.select == Select::Last
                && memmem::find(line, START).is_some()
                && let Some(v) = parse(line)
                && let Some(id) = v["trace_id"].as_str().filter(|id| !id.is_empty())
            {
                s.current = Some(id.to_owned());
                s.request = v["request_id"].as_str().map(str::to_owned);
                s.kept.clear();
            }
            if let Some(id) = &s.current
                && memmem::find(line, id.as_bytes()).is_some()
            {
                s.kept.push(line.to_vec());
            }
        }
        s
    }

    fn selects() -> [Select; 3] {
        [
            Select::Trace(A.into()),
            Select::Trace(B.into()),
            Select::Last,
        ]
    }

    #[test]
    fn a_hit_cut_by_a_block_boundary_is_found_whole() {
        let log = log();
        for select in selects() {
            let whole = outcome(&scan_by_line(select.clone(), log.as_bytes()));
            // Every cut: inside the id, inside the event name, at a newline.
            for block in 1..=log.len() + 1 {
                let s = scan_in_blocks(select.clone(), log.as_bytes(), block);
                assert_eq!(outcome(&s), whole, "{select:?}, blocks of {block} bytes");
            }
        }
    }

    #[test]
    fn an_id_inside_another_requests_line_is_not_its_story() {
        let mut s = Scanner::new(Select::Trace(A.into()));
        s.read(log().as_bytes()).unwrap();
        assert_eq!(s.kept.len(), 4, "B's line that quotes A's id is read");
        let t = s.finish().unwrap();
        assert_eq!(t.lines.matched, 3, "but is not A's");
        assert_eq!(t.agents.len(), 1);
        assert_eq!(t.agents[0].agent_id, "x");
        assert_eq!(t.lines.skipped, 2, "the text line and the cut one");
    }

    #[test]
    fn the_last_line_needs_no_newline() {
        let log = log();
        assert!(!log.ends_with('\n'));
        let mut s = Scanner::new(Select::Trace(A.into()));
        s.read(log.as_bytes()).unwrap();
        let t = s.finish().unwrap();
        assert_eq!(t.lines.lines, 9);
        assert_eq!(t.lines.bytes, log.len() as u64);
        assert!(
            t.finished,
            "the request.finish line without a newline is read"
        );

        // With a newline after it, no empty tenth line.
        let mut s = Scanner::new(Select::Trace(A.into()));
        s.read(format!("{log}\n").as_bytes()).unwrap();
        assert_eq!(s.stats().lines, 9);
    }

    #[test]
    fn last_follows_the_last_start_that_parses_across_blocks() {
        let log = [
            line(A, "00.000", "request.start", ""),
            line(A, "00.100", "agent.success", r#","agent_id":"x""#),
            line(B, "00.200", "request.start", ""),
            // Names the event but is no object: not a start.
            format!(r#"{{"event":"request.start","trace_id":"{A}" oops}}"#),
            line(B, "00.300", "agent.success", r#","agent_id":"y""#),
        ]
        .join("\n");
        for block in [1, 50, 300, log.len()] {
            let s = scan_in_blocks(Select::Last, log.as_bytes(), block);
            assert_eq!(s.trace_id(), Some(B), "blocks of {block}");
            let t = s.finish().unwrap();
            assert_eq!(t.agents.len(), 1);
            assert_eq!(t.agents[0].agent_id, "y");
        }
    }

    #[test]
    fn last_finds_a_start_far_from_the_block_end_or_astride_a_window() {
        let pad = |n: usize| format!(r#"{{"pad":"{}"}}"#, "x".repeat(n));
        let start = line(B, "00.000", "request.start", "");
        let tail = pad(20_000);
        // B's start far back, behind long lines and a start that is no object.
        let far = [
            start.clone(),
            pad(30_000),
            format!(r#"{{"event":"request.start","trace_id":"{A}" oops}}"#),
            tail.clone(),
        ]
        .join("\n");
        let mut s = Scanner::new(Select::Last);
        s.feed(far.as_bytes());
        assert_eq!(s.trace_id(), Some(B));
        // The event's name cut by the first window's edge, at every offset.
        let at = start.find(std::str::from_utf8(START).unwrap()).unwrap();
        for cut in 0..START.len() {
            // The block is 4096 bytes longer than what precedes the edge, at + cut.
            let pad_line = at + cut + 4096 - start.len() - 1;
            let log = format!("{start}\n{}", pad(pad_line - r#"{"pad":""}"#.len()));
            assert_eq!(log.len(), at + cut + 4096);
            let mut s = Scanner::new(Select::Last);
            s.feed(log.as_bytes());
            assert_eq!(s.trace_id(), Some(B), "cut {cut}");
        }
    }

    #[test]
    fn gzip_is_searched_after_decoding_even_across_members() {
        let log = log();
        // Two gzip members, the second starting in the middle of A's id.
        let cut = log.rfind(A).unwrap() + 10;
        let mut gz = Vec::new();
        for part in [&log[..cut], &log[cut..]] {
            let mut encoder = flate2::write::GzEncoder::new(Vec::new(), Default::default());
            encoder.write_all(part.as_bytes()).unwrap();
            gz.extend(encoder.finish().unwrap());
        }
        let mut s = Scanner::new(Select::Trace(A.into()));
        s.read(flate2::read::MultiGzDecoder::new(gz.as_slice()))
            .unwrap();
        assert_eq!(
            outcome(&s),
            outcome(&scan_by_line(Select::Trace(A.into()), log.as_bytes()))
        );
        assert!(s.finish().unwrap().finished);
    }

    #[test]
    fn bytes_that_are_not_text_are_counted_not_fatal() {
        let mut data = b"\xff\xfe{\"trace_id\":\"".to_vec();
        data.extend_from_slice(A.as_bytes());
        data.extend_from_slice(b"\",\"x\":\"\xc3\x28\"}\r\n\n   \n\x00\x00\n");
        data.extend_from_slice(line(A, "00.000", "request.start", "").as_bytes());
        data.extend_from_slice(b"\r\n{\"trace_id\":\"");
        data.extend_from_slice(A.as_bytes());
        data.extend_from_slice(b"\",\"bad\":\"\xc3\x28\"}\n{");
        let mut s = Scanner::new(Select::Trace(A.into()));
        s.read(data.as_slice()).unwrap();
        let t = s.finish().unwrap();
        assert_eq!(t.lines.lines, 7);
        assert_eq!(
            t.lines.matched, 1,
            "the start line, whatever its line ending"
        );
        assert_eq!(
            t.lines.skipped, 4,
            "the binary line, the NULs, the object that is not UTF-8, the lone brace"
        );
    }

    proptest! {
        /// Any log, cut into blocks of any size, scans as it does a line at a time.
        #[test]
        fn blocks_of_any_size_scan_as_lines_do(
            pieces in proptest::collection::vec(
                prop_oneof![
                    Just(line(A, "00.000", "request.start", r#","request_id":"00000000000000a1""#)),
                    Just(line(B, "00.001", "request.start", "")),
                    Just(line(A, "00.002", "agent.success", r#","agent_id":"x""#)),
                    Just(line(B, "00.003", "agent.success", &format!(r#","note":"{A}""#))),
                    Just(r#"{"event":"request.start","trace_id":"" }"#.to_owned()),
                    Just(format!("{{{A}")),
                    Just("\r".to_owned()),
                    Just(" \t ".to_owned()),
                    Just(format!(r#"{{"pad":"{}"}}"#, "x".repeat(3000))),
                    "[a-z{}\":, ]{0,20}",
                ],
                0..24,
            ),
            junk in proptest::collection::vec(any::<u8>(), 0..16),
            newline_at_end in any::<bool>(),
            block in prop_oneof![1usize..400, 4000usize..80_000],
        ) {
            let mut data = pieces.join("\n").into_bytes();
            data.extend_from_slice(&junk);
            if newline_at_end {
                data.push(b'\n');
            }
            for select in selects() {
                let by_block = scan_in_blocks(select.clone(), &data, block);
                let by_line = scan_by_line(select, &data);
                prop_assert_eq!(outcome(&by_block), outcome(&by_line));
            }
        }
    }
}
