//! An incremental parser for server-sent events (the WHATWG event-stream format), as
//! both Anthropic's and OpenAI's streaming APIs send them. Bytes go in as they arrive,
//! in chunks cut anywhere; whole events come out.

/// One event: its type (`message` when the stream names none) and its data, with the
/// lines of a multi-line `data` joined by `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    pub event: String,
    pub data: String,
}

/// The parser's state between chunks.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    /// The unfinished line.
    line: Vec<u8>,
    event: Option<String>,
    data: Option<String>,
    /// Bytes buffered for the event being built, to bound memory.
    pending: usize,
}

/// The most one event may hold.
const MAX_EVENT_BYTES: usize = super::http::MAX_RESPONSE_BYTES;

impl SseParser {
    /// Feeds a chunk; returns the events it completed. Fails when one event grows past
    /// the size limit.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, &'static str> {
        let mut events = Vec::new();
        for &b in chunk {
            if b == b'\n' {
                let mut line = std::mem::take(&mut self.line);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if let Some(event) = self.line_done(&line) {
                    events.push(event);
                }
            } else {
                self.line.push(b);
                self.pending += 1;
                if self.pending > MAX_EVENT_BYTES {
                    return Err("an event in the stream is larger than the response limit");
                }
            }
        }
        Ok(events)
    }

    /// Ends the stream: an event not closed by a blank line is still delivered, as
    /// the format requires nothing after the last one.
    pub fn finish(&mut self) -> Option<SseEvent> {
        let line = std::mem::take(&mut self.line);
        let from_line = if line.is_empty() {
            None
        } else {
            self.line_done(&line)
        };
        from_line.or_else(|| self.dispatch())
    }

    fn line_done(&mut self, line: &[u8]) -> Option<SseEvent> {
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
            "event" => self.event = Some(value.to_owned()),
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            _ => {} // id, retry and unknown fields do not matter here
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        self.pending = 0;
        let event = self.event.take();
        let data = self.data.take()?;
        Some(SseEvent {
            event: event
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "message".to_owned()),
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all(input: &[u8]) -> Vec<SseEvent> {
        let mut p = SseParser::default();
        let mut out = p.feed(input).unwrap();
        out.extend(p.finish());
        out
    }

    #[test]
    fn events_data_comments_and_crlf() {
        let input = b": keep-alive\r\nevent: message_start\r\ndata: {\"a\":1}\r\n\r\ndata: x\ndata: y\n\nevent: ping\ndata: {}\n\n";
        let events = all(input);
        assert_eq!(
            events,
            [
                SseEvent {
                    event: "message_start".into(),
                    data: "{\"a\":1}".into()
                },
                SseEvent {
                    event: "message".into(),
                    data: "x\ny".into()
                },
                SseEvent {
                    event: "ping".into(),
                    data: "{}".into()
                },
            ]
        );
    }

    #[test]
    fn chunks_cut_anywhere_give_the_same_events() {
        let input = b"event: a\ndata: 1\n\nevent: b\ndata: 2\n\ndata: [DONE]\n\n";
        let whole = all(input);
        for cut in 0..input.len() {
            let mut p = SseParser::default();
            let mut out = p.feed(&input[..cut]).unwrap();
            out.extend(p.feed(&input[cut..]).unwrap());
            out.extend(p.finish());
            assert_eq!(out, whole, "cut at {cut}");
        }
    }

    #[test]
    fn an_unterminated_last_event_is_delivered() {
        assert_eq!(all(b"data: tail").len(), 1);
        assert!(
            all(b"event: only-a-name\n\n").is_empty(),
            "no data, no event"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), cut in 0usize..2048) {
            let mut p = SseParser::default();
            let cut = cut.min(bytes.len());
            let _ = p.feed(&bytes[..cut]);
            let _ = p.feed(&bytes[cut..]);
            let _ = p.finish();
        }
    }
}
