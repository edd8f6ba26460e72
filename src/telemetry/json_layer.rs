//! The JSON log line: a `tracing-subscriber` [`Layer`] that writes each event as one
//! flat JSON object, with the request's `trace_id` and the enclosing spans' fields at
//! the top level, where log indexers and `jq` find them without digging.
//!
//! tracing-subscriber's own JSON formatter nests span fields under `spans[]`, so a
//! query for `trace_id` or `agent_id` would have to know which span holds it; this
//! layer flattens them. Every line has, in order: `timestamp` (RFC 3339 UTC,
//! microseconds), `level`, `message`, `event`, `trace_id` (null outside a request),
//! `target`, `file`, `line`, `span` (the innermost span's name), then the spans'
//! fields from the innermost out (`agent_id`, `provider`, `model`, `attempt`, …), then
//! the event's own fields. A name appears once: the event's value beats a span's, an
//! inner span's beats an outer one's.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::time::SystemTime;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber, span};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The span field that carries the request's trace id.
const TRACE_ID: &str = "trace_id";

/// Writes every event as one JSON line to `W`.
#[derive(Debug)]
pub struct JsonLayer<W> {
    make_writer: W,
}

impl<W> JsonLayer<W>
where
    W: for<'a> MakeWriter<'a> + 'static,
{
    /// A layer writing to `make_writer` (`std::io::stderr`, a `Mutex<File>`, …). Each
    /// line goes out in one `write_all`.
    pub fn new(make_writer: W) -> Self {
        JsonLayer { make_writer }
    }
}

/// A span's fields, rendered once when recorded: names and JSON values, in the order
/// first recorded. The values sit end to end in one buffer: a span lives as long as
/// its agent's call, in every call in flight, and a `String` per value would be an
/// allocation (and its slack) per field.
#[derive(Debug, Default)]
struct SpanFields {
    /// Each field's name and where its value ends in `values`.
    names: Vec<(&'static str, usize)>,
    values: String,
}

impl SpanFields {
    /// Fields as a visitor recorded them.
    fn of(recorded: Vec<(&'static str, String)>) -> Self {
        let mut fields = SpanFields {
            names: Vec::with_capacity(recorded.len()),
            values: String::with_capacity(recorded.iter().map(|(_, v)| v.len()).sum()),
        };
        fields.record(recorded);
        fields
    }

    /// Adds fields; a name already there keeps its place and takes the new value.
    fn record(&mut self, recorded: Vec<(&'static str, String)>) {
        for (name, value) in recorded {
            if self.names.iter().any(|(n, _)| *n == name) {
                // Rare (a span field recorded twice): rebuilt with the new value in place.
                let old = std::mem::take(self);
                let mut rebuilt = Vec::with_capacity(old.names.len());
                for (n, v) in old.iter() {
                    rebuilt.push((
                        n,
                        if n == name {
                            value.clone()
                        } else {
                            v.to_owned()
                        },
                    ));
                }
                *self = SpanFields::of(rebuilt);
            } else {
                self.values.push_str(&value);
                self.names.push((name, self.values.len()));
            }
        }
    }

    /// (name, JSON value), in order.
    fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        let mut start = 0;
        self.names.iter().map(move |&(name, end)| {
            let value = &self.values[start..end];
            start = end;
            (name, value)
        })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

impl<S, W> Layer<S> for JsonLayer<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'a> MakeWriter<'a> + 'static,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        // Another JSON layer on the same registry (a file and a trace ring, say) has
        // already recorded the same fields.
        if extensions.get_mut::<SpanFields>().is_some() {
            return;
        }
        let mut recorded = Vec::new();
        attrs.record(&mut Fields(&mut recorded));
        extensions.insert(SpanFields::of(recorded));
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(fields) = extensions.get_mut::<SpanFields>() {
            let mut recorded = Vec::new();
            values.record(&mut Fields(&mut recorded));
            fields.record(recorded);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        thread_local! {
            static BUF: RefCell<(String, Vec<(&'static str, String)>)> =
                const { RefCell::new((String::new(), Vec::new())) };
        }
        BUF.with(|cell| {
            // Re-entrancy (a log call while formatting) falls back to fresh buffers.
            let mut fresh = (String::new(), Vec::new());
            let mut borrowed = cell.try_borrow_mut();
            let (line, fields) = match borrowed.as_deref_mut() {
                Ok(bufs) => bufs,
                Err(_) => &mut fresh,
            };
            line.clear();
            fields.clear();
            event.record(&mut Fields(fields));
            format_line(line, fields, event, &ctx);
            let _ = self.make_writer.make_writer().write_all(line.as_bytes());
        });
    }
}

fn format_line<S>(
    line: &mut String,
    fields: &[(&'static str, String)],
    event: &Event<'_>,
    ctx: &Context<'_, S>,
) where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let meta = event.metadata();
    let own = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    };
    let _ = write!(
        line,
        "{{\"timestamp\":\"{}\",\"level\":\"{}\",\"message\":{},\"event\":{}",
        humantime::format_rfc3339_micros(SystemTime::now()),
        meta.level(),
        own("message").unwrap_or("\"\""),
        own("event").unwrap_or("null"),
    );

    // Innermost first.
    let spans: Vec<_> = ctx
        .event_scope(event)
        .map(|scope| scope.collect())
        .unwrap_or_default();
    let mut trace_id = None;
    for span in spans.iter().rev() {
        if let Some(f) = span.extensions().get::<SpanFields>()
            && let Some(v) = f.get(TRACE_ID)
        {
            trace_id = Some(v.to_owned());
            break;
        }
    }
    let _ = write!(
        line,
        ",\"trace_id\":{},\"target\":",
        trace_id.as_deref().unwrap_or("null")
    );
    push_str(line, meta.target());
    line.push_str(",\"file\":");
    match meta.file() {
        Some(file) => push_str(line, file),
        None => line.push_str("null"),
    }
    match meta.line() {
        Some(n) => {
            let _ = write!(line, ",\"line\":{n}");
        }
        None => line.push_str(",\"line\":null"),
    }
    line.push_str(",\"span\":");
    match spans.first() {
        Some(span) => push_str(line, span.name()),
        None => line.push_str("null"),
    }

    // Span fields, innermost first; each name once, and never one the event sets.
    let mut written: Vec<&'static str> = Vec::new();
    for span in &spans {
        let extensions = span.extensions();
        let Some(f) = extensions.get::<SpanFields>() else {
            continue;
        };
        for (name, value) in f.iter() {
            if name == TRACE_ID || written.contains(&name) || own(name).is_some() {
                continue;
            }
            written.push(name);
            push_key(line, name);
            line.push_str(value);
        }
    }
    for (name, value) in fields {
        if matches!(*name, "message" | "event") {
            continue;
        }
        push_key(line, name);
        line.push_str(value);
    }
    line.push_str("}\n");
}

fn push_key(line: &mut String, name: &str) {
    line.push(',');
    push_str(line, name);
    line.push(':');
}

/// Appends `s` as a JSON string.
fn push_str(line: &mut String, s: &str) {
    line.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        line.push_str(&s[start..i]);
        if escape.is_empty() {
            let _ = write!(line, "\\u{b:04x}");
        } else {
            line.push_str(escape);
        }
        start = i + 1;
    }
    line.push_str(&s[start..]);
    line.push('"');
}

/// Records fields as (name, JSON value); a later value of the same name replaces the
/// earlier one.
struct Fields<'a>(&'a mut Vec<(&'static str, String)>);

impl Fields<'_> {
    fn put(&mut self, field: &Field, value: String) {
        let name = field.name();
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        let mut s = String::with_capacity(value.len() + 2);
        push_str(&mut s, value);
        self.put(field, s);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        self.record_str(field, &text);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.to_string());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.to_string());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity.
        let text = if value.is_finite() {
            let mut s = value.to_string();
            if !s.contains(['.', 'e', 'E']) {
                s.push_str(".0");
            }
            s
        } else {
            "null".to_owned()
        };
        self.put(field, text);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.to_string());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let text = value.to_string();
        self.record_str(field, &text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(f: impl FnOnce()) -> Vec<(String, serde_json::Value)> {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber =
            tracing_subscriber::registry().with(JsonLayer::new(move || writer.clone()));
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buf.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| {
                let v = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
                (l.to_owned(), v)
            })
            .collect()
    }

    #[test]
    fn a_span_field_recorded_again_keeps_its_place_and_takes_the_new_value() {
        let out = lines(|| {
            let span =
                tracing::error_span!("attempt", a = 1u64, b = "two", c = tracing::field::Empty);
            span.record("a", 3u64);
            span.record("c", "four");
            let _s = span.enter();
            tracing::info!(event = "x.y", "hi");
        });
        let (raw, l) = &out[0];
        assert_eq!(
            (l["a"].as_u64(), &l["b"], &l["c"]),
            (Some(3), &"two".into(), &"four".into())
        );
        let at: Vec<_> = ["\"a\":3", "\"b\":\"two\"", "\"c\":\"four\""]
            .iter()
            .map(|k| raw.find(k).unwrap_or_else(|| panic!("{k} in {raw}")))
            .collect();
        assert!(
            at.windows(2).all(|w| w[0] < w[1]),
            "in recorded order: {raw}"
        );
    }

    #[test]
    fn span_fields_are_flattened_and_the_event_wins() {
        let out = lines(|| {
            let request = tracing::error_span!("request", trace_id = "abc");
            let _r = request.enter();
            let agent = tracing::error_span!("agent", agent_id = "critic", model = "m1");
            let _a = agent.enter();
            let fallback = tracing::error_span!("fallback", model = "m2");
            let _f = fallback.enter();
            tracing::warn!(
                event = "x.y",
                model = "own",
                n = 3u64,
                ok = true,
                r = 0.5,
                "hi {}",
                1
            );
        });
        let (raw, l) = &out[0];
        assert_eq!(l["trace_id"], "abc");
        assert_eq!(l["agent_id"], "critic");
        assert_eq!(l["model"], "own", "the event's own value wins");
        assert_eq!(l["span"], "fallback");
        assert_eq!(l["event"], "x.y");
        assert_eq!(l["message"], "hi 1");
        assert_eq!(l["level"], "WARN");
        assert_eq!(
            (l["n"].as_u64(), l["ok"].as_bool(), l["r"].as_f64()),
            (Some(3), Some(true), Some(0.5))
        );
        assert!(l["line"].as_u64().is_some() && l["file"].as_str().is_some());
        let order = [
            "\"timestamp\"",
            "\"level\"",
            "\"message\"",
            "\"event\"",
            "\"trace_id\"",
            "\"target\"",
        ];
        let at: Vec<_> = order.iter().map(|k| raw.find(k).unwrap()).collect();
        assert!(
            at.windows(2).all(|w| w[0] < w[1]),
            "fixed fields first, in order: {raw}"
        );
        assert_eq!(raw.matches("\"model\"").count(), 1, "each name once: {raw}");
    }

    #[test]
    fn outside_a_request_trace_id_is_null_and_text_is_escaped() {
        let out = lines(|| {
            tracing::info!(
                weird = "a\"b\\c\nd\u{1}",
                f = 2.0,
                nan = f64::NAN,
                "quote \" here"
            );
        });
        let (_, l) = &out[0];
        assert!(l["trace_id"].is_null());
        assert!(l["event"].is_null());
        assert!(l["span"].is_null());
        assert_eq!(l["weird"], "a\"b\\c\nd\u{1}");
        assert_eq!(l["f"], 2.0);
        assert!(l["nan"].is_null());
        assert_eq!(l["message"], "quote \" here");
        let ts = l["timestamp"].as_str().unwrap();
        assert!(
            ts.ends_with('Z') && ts.len() == "2026-11-25T11:38:06.123456Z".len(),
            "{ts}"
        );
    }
}
