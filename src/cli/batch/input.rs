//! A batch's input: JSON Lines (`{"id": …, "query": …, …}`) or, with `--text`, one
//! query per line. Read twice — once to check every line and count the work, once to
//! run it — so the queries are never all in memory (stdin, which cannot be read twice,
//! is read to its end first).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{Map, Value};

/// Fields of an output line that an input line may not carry, since the result goes
/// there.
pub const RESERVED: [&str; 2] = ["response", "error"];

/// Where the lines come from.
#[derive(Debug)]
pub enum Source {
    File(PathBuf),
    /// Stdin, read whole.
    Memory(Vec<u8>),
}

impl Source {
    /// `-` is stdin, read to its end now; anything else a file, opened now to fail
    /// early with its name.
    /// A pipe, a FIFO or `/dev/stdin` cannot be read twice either: it is read whole
    /// too.
    pub fn open(path: &Path) -> anyhow::Result<Source> {
        let mut bytes = Vec::new();
        if path == Path::new("-") {
            io::stdin()
                .read_to_end(&mut bytes)
                .context("cannot read the input from stdin")?;
            return Ok(Source::Memory(bytes));
        }
        let mut file = File::open(path)
            .with_context(|| format!("cannot open the input {}", path.display()))?;
        let regular = file.metadata().is_ok_and(|m| m.is_file());
        if !regular {
            file.read_to_end(&mut bytes)
                .with_context(|| format!("cannot read the input {}", path.display()))?;
            return Ok(Source::Memory(bytes));
        }
        Ok(Source::File(path.to_owned()))
    }

    fn reader(&self) -> anyhow::Result<Box<dyn BufRead + Send + '_>> {
        Ok(match self {
            Source::File(path) => Box::new(BufReader::with_capacity(
                64 << 10,
                File::open(path)
                    .with_context(|| format!("cannot open the input {}", path.display()))?,
            )),
            Source::Memory(bytes) => Box::new(&bytes[..]),
        })
    }

    /// Calls `each` with every line and its number (from 1), the line ending cut off,
    /// or why the line cannot be read (longer than [`MAX_LINE`], not UTF-8).
    pub fn lines(
        &self,
        mut each: impl FnMut(u64, Result<&str, String>) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut reader = self.reader()?;
        let mut buf = Vec::new();
        let mut number = 0;
        loop {
            buf.clear();
            let n = (&mut reader)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut buf)
                .context("cannot read the input")?;
            if n == 0 {
                return Ok(());
            }
            number += 1;
            if buf.len() > MAX_LINE && !buf.ends_with(b"\n") {
                skip_line(&mut reader).context("cannot read the input")?;
                each(number, Err(format!("longer than {} MiB", MAX_LINE >> 20)))?;
                continue;
            }
            let line = match std::str::from_utf8(&buf) {
                Ok(line) => Ok(line.trim_end_matches(['\n', '\r'])),
                Err(e) => Err(format!("not UTF-8 (byte {})", e.valid_up_to() + 1)),
            };
            each(number, line)?;
        }
    }
}

/// The longest input line read: a query and its fields, not a document dump.
pub const MAX_LINE: usize = 16 << 20;

/// Reads past the rest of a line without keeping it.
fn skip_line(reader: &mut impl BufRead) -> io::Result<()> {
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok(());
        }
        if let Some(i) = memchr::memchr(b'\n', chunk) {
            reader.consume(i + 1);
            return Ok(());
        }
        let n = chunk.len();
        reader.consume(n);
    }
}

/// How input lines are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    JsonLines,
    Text,
}

/// One query of the input.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The id as given (a string or an integer), or the line number.
    pub id: Value,
    /// The id as text: `7` and `"7"` are the same id.
    pub key: String,
    pub query: String,
    /// The input's other fields, `query` included, carried to the output untouched.
    pub fields: Map<String, Value>,
}

/// What a line holds.
#[derive(Debug)]
pub enum Line {
    /// Nothing but white space: skipped without a word.
    Blank,
    Entry(Entry),
    /// A line that cannot run, and why.
    Bad(String),
}

/// Reads one line.
pub fn parse(format: Format, number: u64, line: &str) -> Line {
    if line.trim().is_empty() {
        return Line::Blank;
    }
    match format {
        Format::Text => Line::Entry(Entry {
            id: Value::from(number),
            key: number.to_string(),
            query: line.trim().to_owned(),
            fields: Map::new(),
        }),
        Format::JsonLines => parse_json(number, line),
    }
}

fn parse_json(number: u64, line: &str) -> Line {
    let mut fields = match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(fields)) => fields,
        Ok(other) => {
            return Line::Bad(format!(
                "expected a JSON object such as {{\"id\": \"q1\", \"query\": \"…\"}}, found {}",
                kind(&other)
            ));
        }
        Err(e) => {
            return Line::Bad(format!(
                "not JSON ({e}); each line must be one JSON object, or use --text for one query per line"
            ));
        }
    };
    let query = match fields.get("query") {
        Some(Value::String(q)) if !q.trim().is_empty() => q.trim().to_owned(),
        Some(Value::String(_)) => return Line::Bad("\"query\" is empty".into()),
        Some(other) => {
            return Line::Bad(format!("\"query\" must be a string, found {}", kind(other)));
        }
        None => return Line::Bad("no \"query\" field (the question to ask)".into()),
    };
    if let Some(reserved) = RESERVED.iter().find(|r| fields.contains_key(**r)) {
        return Line::Bad(format!(
            "the field \"{reserved}\" is where the output puts the result; rename it"
        ));
    }
    let id = match fields.remove("id") {
        None => Value::from(number),
        Some(Value::String(s)) if !s.is_empty() => Value::String(s),
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => Value::Number(n),
        Some(other) => {
            return Line::Bad(format!(
                "\"id\" must be a non-empty string or an integer, found {}",
                kind(&other)
            ));
        }
    };
    let key = key_of(&id).unwrap_or_default();
    Line::Entry(Entry {
        id,
        key,
        query,
        fields,
    })
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(s) if s.is_empty() => "an empty string",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An id as text: `7` and `"7"` are the same id. `None` for what cannot be an id.
pub fn key_of(id: &Value) -> Option<String> {
    match id {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A line that will not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    pub number: u64,
    pub reason: String,
}

/// What the first reading found.
#[derive(Debug, Default)]
pub struct Survey {
    /// Each good entry's key, with its line number.
    pub keys: HashMap<String, u64>,
    /// Lines that will not run (bad, or a repeated id), in order.
    pub bad: Vec<BadLine>,
}

impl Survey {
    /// Whether line `number` is one that will not run.
    pub fn is_bad(&self, number: u64) -> bool {
        self.bad.binary_search_by_key(&number, |b| b.number).is_ok()
    }
}

/// Reads every line once: the ids, and the lines that cannot run.
pub fn survey(source: &Source, format: Format) -> anyhow::Result<Survey> {
    let mut survey = Survey::default();
    source.lines(|number, line| {
        let line = match line {
            Ok(line) => line,
            Err(reason) => {
                survey.bad.push(BadLine { number, reason });
                return Ok(());
            }
        };
        match parse(format, number, line) {
            Line::Blank => {}
            Line::Bad(reason) => survey.bad.push(BadLine { number, reason }),
            Line::Entry(entry) => {
                if let Some(first) = survey.keys.get(&entry.key) {
                    survey.bad.push(BadLine {
                        number,
                        reason: format!("the id {} was already used on line {first}", entry.id),
                    });
                } else {
                    survey.keys.insert(entry.key, number);
                }
            }
        }
        Ok(())
    })?;
    Ok(survey)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(line: &str) -> String {
        match parse(Format::JsonLines, 3, line) {
            Line::Bad(reason) => reason,
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn json_lines_carry_their_fields_and_take_the_line_number_without_an_id() {
        let Line::Entry(e) = parse(
            Format::JsonLines,
            4,
            r#"{"id": "a", "query": " Why? ", "gold": 1}"#,
        ) else {
            panic!()
        };
        assert_eq!((e.key.as_str(), e.query.as_str()), ("a", "Why?"));
        assert_eq!(e.fields["gold"], 1);
        assert_eq!(e.fields["query"], " Why? ", "carried untouched");
        let Line::Entry(e) = parse(Format::JsonLines, 4, r#"{"query": "q"}"#) else {
            panic!()
        };
        assert_eq!((e.id, e.key), (Value::from(4), "4".to_owned()));
        let Line::Entry(e) = parse(Format::JsonLines, 4, r#"{"id": 17, "query": "q"}"#) else {
            panic!()
        };
        assert_eq!(e.key, "17");
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        assert!(bad("{not json").starts_with("not JSON"));
        assert!(bad("[1]").contains("found an array"));
        assert!(bad(r#"{"id": "a"}"#).contains("no \"query\""));
        assert!(bad(r#"{"query": "  "}"#).contains("empty"));
        assert!(bad(r#"{"query": 3}"#).contains("must be a string"));
        assert!(bad(r#"{"query": "q", "id": 1.5}"#).contains("\"id\""));
        assert!(bad(r#"{"query": "q", "id": ""}"#).contains("an empty string"));
        assert!(bad(r#"{"query": "q", "response": 1}"#).contains("rename it"));
        assert!(matches!(parse(Format::JsonLines, 1, "  "), Line::Blank));
    }

    #[test]
    fn an_endless_line_is_a_bad_line_and_the_next_one_reads() {
        let mut bytes = vec![b'x'; MAX_LINE + 10];
        bytes.extend_from_slice(b"\n{\"query\": \"after\"}\n");
        let survey = survey(&Source::Memory(bytes), Format::JsonLines).unwrap();
        assert_eq!(survey.bad.len(), 1);
        assert!(survey.bad[0].reason.starts_with("longer than 16 MiB"));
        assert_eq!(survey.keys.get("2"), Some(&2));
    }

    #[test]
    fn text_lines_are_queries_numbered_by_line() {
        let Line::Entry(e) = parse(Format::Text, 9, "  What now?\t") else {
            panic!()
        };
        assert_eq!((e.id, e.query.as_str()), (Value::from(9), "What now?"));
    }

    #[test]
    fn the_survey_finds_repeated_ids_and_keeps_going() {
        let source = Source::Memory(
            b"{\"id\":\"a\",\"query\":\"1\"}\n\nnope\n{\"id\":\"a\",\"query\":\"2\"}\n{\"id\":7,\"query\":\"3\"}\r\n{\"id\":\"7\",\"query\":\"4\"}\n{\"query\":\"\xff\"}"
                .to_vec(),
        );
        let survey = survey(&source, Format::JsonLines).unwrap();
        let numbers: Vec<u64> = survey.bad.iter().map(|b| b.number).collect();
        assert_eq!(numbers, [3, 4, 6, 7]);
        assert!(
            survey.bad[3].reason.starts_with("not UTF-8"),
            "{:?}",
            survey.bad[3]
        );
        assert!(survey.bad[1].reason.contains("already used on line 1"));
        assert_eq!(survey.keys.len(), 2);
        assert!(survey.is_bad(4) && !survey.is_bad(5));
    }
}
