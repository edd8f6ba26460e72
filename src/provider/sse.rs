//! An incremental parser for server-sent events, following the WHATWG event-stream
//! rules, as both Anthropic's and OpenAI's streaming APIs send them. Bytes go in as
//! they arrive, in chunks cut anywhere; whole events come out.
//!
//! The rules kept: lines end with CRLF, LF or CR (a CR at the end of one chunk and an
//! LF at the start of the next are one ending); a leading byte-order mark is dropped;
//! lines starting with `:` are comments; each `data:` line adds its value and a line
//! feed to the event's data, and the last line feed goes at dispatch; a blank line
//! dispatches the event, unless it has no data; a field with no colon has an empty
//! value; one space after the colon is dropped; and an event the stream ends before its
//! blank line is discarded, never dispatched — a cut stream is a broken reply, not a
//! shorter one.
//!
//! Written here rather than taken from `eventsource-stream`: that crate parses with
//! `nom` behind a `Stream` adapter, while the providers feed chunks from their own read
//! loop and need a byte bound per event; the rules above are this file.

/// One event: its type (`message` when the stream names none) and its data, with the
/// lines of a multi-line `data` joined by `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    pub event: String,
    pub data: String,
}

/// The parser's state between chunks.
#[derive(Debug)]
pub(crate) struct SseParser {
    /// The unfinished line.
    line: Vec<u8>,
    /// The last chunk ended with a CR: an LF starting the next one ends nothing.
    after_cr: bool,
    /// No line has ended yet: a byte-order mark may open the stream.
    at_start: bool,
    event: String,
    data: String,
    /// Whether any `data` line came since the last dispatch.
    has_data: bool,
    /// Bytes taken in for the event being built, to bound memory.
    pending: usize,
}

impl Default for SseParser {
    fn default() -> Self {
        SseParser {
            line: Vec::new(),
            after_cr: false,
            at_start: true,
            event: String::new(),
            data: String::new(),
            has_data: false,
            pending: 0,
        }
    }
}

/// The most one event may hold.
const MAX_EVENT_BYTES: usize = super::http::MAX_RESPONSE_BYTES;

/// UTF-8's byte-order mark.
const BOM: &[u8] = b"\xEF\xBB\xBF";

impl SseParser {
    /// Feeds a chunk; returns the events it completed. Fails when one event grows past
    /// the size limit.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, &'static str> {
        let mut events = Vec::new();
        let mut rest = chunk;
        if self.after_cr && !rest.is_empty() {
            self.after_cr = false;
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
        }
        while let Some(end) = memchr::memchr2(b'\r', b'\n', rest) {
            self.take_in(&rest[..end])?;
            let line = std::mem::take(&mut self.line);
            if let Some(event) = self.line_done(&line) {
                events.push(event);
            }
            let crlf = rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n');
            if rest[end] == b'\r' && end + 1 == rest.len() {
                self.after_cr = true;
            }
            rest = &rest[end + if crlf { 2 } else { 1 }..];
        }
        self.take_in(rest)?;
        Ok(events)
    }

    fn take_in(&mut self, bytes: &[u8]) -> Result<(), &'static str> {
        self.pending += bytes.len();
        if self.pending > MAX_EVENT_BYTES {
            return Err("an event in the stream is larger than the response limit");
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn line_done(&mut self, line: &[u8]) -> Option<SseEvent> {
        let line = if std::mem::take(&mut self.at_start) {
            line.strip_prefix(BOM).unwrap_or(line)
        } else {
            line
        };
        if line.is_empty() {
            return self.dispatch();
        }
        if line[0] == b':' {
            return None; // a comment
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_ref(), ""),
        };
        match field {
            "event" => value.clone_into(&mut self.event),
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
                self.has_data = true;
            }
            _ => {} // id, retry and unknown fields do not matter here
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        self.pending = 0;
        let event = std::mem::take(&mut self.event);
        if !std::mem::take(&mut self.has_data) {
            return None;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop(); // the last line feed
        Some(SseEvent {
            event: if event.is_empty() {
                "message".to_owned()
            } else {
                event
            },
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all(input: &[u8]) -> Vec<SseEvent> {
        SseParser::default().feed(input).unwrap()
    }

    fn event(event: &str, data: &str) -> SseEvent {
        SseEvent {
            event: event.into(),
            data: data.into(),
        }
    }

    #[test]
    fn events_data_comments_and_crlf() {
        let input = b": keep-alive\r\nevent: message_start\r\ndata: {\"a\":1}\r\n\r\ndata: x\ndata: y\n\nevent: ping\ndata: {}\n\n";
        assert_eq!(
            all(input),
            [
                event("message_start", "{\"a\":1}"),
                event("message", "x\ny"),
                event("ping", "{}"),
            ]
        );
    }

    #[test]
    fn cr_lf_and_crlf_all_end_lines() {
        let expected = [event("a", "1"), event("b", "2\n3")];
        for input in [
            &b"event: a\ndata: 1\n\nevent: b\ndata: 2\ndata: 3\n\n"[..],
            b"event: a\rdata: 1\r\revent: b\rdata: 2\rdata: 3\r\r",
            b"event: a\r\ndata: 1\r\n\r\nevent: b\r\ndata: 2\r\ndata: 3\r\n\r\n",
            b"event: a\rdata: 1\n\r\nevent: b\r\ndata: 2\rdata: 3\n\n",
        ] {
            assert_eq!(all(input), expected, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn a_leading_bom_is_dropped_once() {
        assert_eq!(all(b"\xEF\xBB\xBFdata: x\n\n"), [event("message", "x")]);
        // Split across chunks, as the network may.
        let mut p = SseParser::default();
        let mut out = p.feed(b"\xEF\xBB").unwrap();
        out.extend(p.feed(b"\xBFdata: x\n\n").unwrap());
        assert_eq!(out, [event("message", "x")]);
        // Only at the start of the stream.
        let later = all(b"data: a\n\n\xEF\xBB\xBFdata: b\n\n");
        assert_eq!(later.len(), 1, "a BOM later makes an unknown field");
    }

    #[test]
    fn fields_without_colons_spaces_and_empty_data() {
        assert_eq!(all(b"data\n\n"), [event("message", "")]);
        assert_eq!(
            all(b"data:  two spaces\n\n"),
            [event("message", " two spaces")]
        );
        assert_eq!(all(b"data:\ndata:\n\n"), [event("message", "\n")]);
        assert!(
            all(b"event: only-a-name\n\n").is_empty(),
            "no data, no event"
        );
        // The name does not carry over to the next event.
        assert_eq!(all(b"event: x\n\ndata: 1\n\n"), [event("message", "1")]);
    }

    #[test]
    fn an_event_the_stream_ends_before_its_blank_line_is_discarded() {
        assert!(all(b"data: tail").is_empty());
        assert!(all(b"data: tail\n").is_empty());
        assert_eq!(all(b"data: 1\n\ndata: tail\n"), [event("message", "1")]);
    }

    #[test]
    fn a_crlf_split_by_an_empty_chunk_is_still_one_ending() {
        let mut p = SseParser::default();
        let mut out = p.feed(b"data: x\r").unwrap();
        out.extend(p.feed(b"").unwrap());
        out.extend(p.feed(b"\ndata: y\r\n\r\n").unwrap());
        assert_eq!(out, [event("message", "x\ny")]);
    }

    #[test]
    fn an_oversized_event_is_refused() {
        let mut p = SseParser::default();
        let big = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert!(p.feed(&big).is_err());
    }

    proptest! {
        /// However a stream is cut into chunks, and whichever line ending it uses, the
        /// same events come out, and nothing past the last blank line.
        #[test]
        fn any_cut_and_line_ending_gives_the_same_events(
            texts in proptest::collection::vec("[a-z {}\":,]{0,12}", 1..6),
            ending in prop_oneof![Just("\n"), Just("\r"), Just("\r\n")],
            cuts in proptest::collection::vec(0usize..200, 0..4),
            tail in "[a-z]{0,5}",
        ) {
            let mut stream = String::new();
            let mut expected = Vec::new();
            for (i, text) in texts.iter().enumerate() {
                stream.push_str(&format!(": note{ending}event: e{i}{ending}data: {text}{ending}{ending}"));
                expected.push(event(&format!("e{i}"), text));
            }
            stream.push_str(&format!("data: {tail}"));
            let bytes = stream.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort_unstable();
            let mut p = SseParser::default();
            let mut out = Vec::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                out.extend(p.feed(&bytes[from..cut]).unwrap());
                from = cut;
            }
            prop_assert_eq!(out, expected);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), cut in 0usize..2048) {
            let mut p = SseParser::default();
            let cut = cut.min(bytes.len());
            let _ = p.feed(&bytes[..cut]);
            let _ = p.feed(&bytes[cut..]);
        }
    }
}
