//! Text for a terminal: what an upstream model or server wrote must not drive the
//! terminal of the person reading metaorch's output.
//!
//! A reply, an error body or a header can carry escape sequences (colours, cursor
//! moves, a window title, a hyperlink), carriage returns that overwrite what was
//! printed, or bidirectional overrides that reorder it. Before such text reaches a
//! terminal (`run`'s table and answer, `trace`'s timeline, `--log-format pretty`),
//! these are removed: whole escape sequences, C0 and C1 control characters, DEL, and
//! the Unicode bidirectional controls. Line feeds and tabs stay, or become spaces in
//! [`terminal_safe_line`].

use std::borrow::Cow;

/// `text` without escape sequences or control characters; line feeds and tabs kept.
///
/// ```
/// use metaorch::telemetry::terminal_safe;
///
/// assert_eq!(terminal_safe("ok\x1b[2J\x1b]0;owned\x07 done\r\n"), "ok done\n");
/// assert_eq!(terminal_safe("plain"), "plain");
/// ```
pub fn terminal_safe(text: &str) -> Cow<'_, str> {
    clean(text, false)
}

/// [`terminal_safe`], and line feeds and tabs become spaces: for text that must stay on
/// one line, such as a log line's fields.
///
/// ```
/// use metaorch::telemetry::terminal_safe_line;
///
/// assert_eq!(terminal_safe_line("two\nlines\x1b[31m"), "two lines");
/// ```
pub fn terminal_safe_line(text: &str) -> Cow<'_, str> {
    clean(text, true)
}

fn clean(text: &str, one_line: bool) -> Cow<'_, str> {
    if !text
        .chars()
        .any(|c| unsafe_char(c) || (one_line && c == '\n'))
    {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' | '\t' if one_line => out.push(' '),
            '\n' | '\t' => out.push(c),
            '\x1b' => skip_escape(&mut chars),
            c if unsafe_char(c) => {}
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Control characters (C0 but line feed and tab, DEL, C1) and the bidirectional
/// controls that reorder what is shown.
fn unsafe_char(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Skips the rest of an escape sequence whose ESC was just read: CSI (`ESC [` …
/// final byte), OSC, DCS, SOS, PM and APC strings (up to BEL or `ESC \`), or a
/// two-character sequence.
fn skip_escape(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    match chars.next() {
        Some('[') => {
            // Parameter and intermediate bytes, then one final byte in @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
        Some(']' | 'P' | 'X' | '^' | '_') => {
            while let Some(c) = chars.next() {
                if c == '\x07' {
                    break;
                }
                if c == '\x1b' {
                    if chars.peek() == Some(&'\\') {
                        chars.next();
                    }
                    break;
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_go_whole_and_text_stays() {
        let cases = [
            ("\x1b[1;31mred\x1b[0m", "red"),
            ("title\x1b]0;pwned\x07!", "title!"),
            ("link \x1b]8;;http://x\x1b\\here\x1b]8;;\x1b\\", "link here"),
            ("keep\rover", "keepover"),
            ("bell\x07 nul\0 del\x7f c1\u{9b}", "bell nul del c1"),
            ("bidi \u{202e}txt.exe\u{202c}", "bidi txt.exe"),
            ("tab\tand\nnewline", "tab\tand\nnewline"),
            ("dangling \x1b", "dangling "),
            ("über naïve 日本", "über naïve 日本"),
        ];
        for (input, expected) in cases {
            assert_eq!(terminal_safe(input), expected, "{input:?}");
        }
    }

    #[test]
    fn one_line_text_has_no_line_breaks() {
        assert_eq!(terminal_safe_line("a\nb\tc\r\nd"), "a b c d");
    }

    #[test]
    fn clean_text_is_not_copied() {
        assert!(matches!(terminal_safe("clean text\n"), Cow::Borrowed(_)));
    }
}
