//! Text that stays on one line: control characters escaped.
//!
//! Ids and messages from outside (a control plane's lease, an agent's
//! error) end up in log lines and in a Fail's one-line message. A newline
//! there forges a second log line; an escape sequence rewrites a terminal.
//! [`escape`] writes every control character (C0, DEL, C1), the Unicode
//! line and paragraph separators, the bidirectional overrides, isolates
//! and marks, and the invisible spaces as a visible escape (`\n`, `\r`, `\t`, `\u{1b}`), so the text reads the same
//! and cannot break out of its line.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether `c` is written as an escape: a control character, a line or
/// paragraph separator, a bidirectional override, isolate or mark (which
/// reorder or restyle the text around them), or a character that shows
/// nothing: the invisible spaces, the soft hyphen, the invisible
/// operators, the deprecated format characters, the interlinear
/// annotation marks, the Hangul fillers and the tag characters. (The
/// zero-width joiner and non-joiner stay: scripts and emoji need them.)
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}'
                | '\u{2029}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{061c}'
                | '\u{200b}'
                | '\u{2060}'
                | '\u{feff}'
                | '\u{ad}'
                | '\u{180e}'
                | '\u{2061}'..='\u{2064}'
                | '\u{206a}'..='\u{206f}'
                | '\u{fff9}'..='\u{fffb}'
                | '\u{115f}'
                | '\u{1160}'
                | '\u{3164}'
                | '\u{ffa0}'
                | '\u{e0000}'..='\u{e007f}'
        )
}

/// Whether nothing in `text` is written as an escape. Log lines are
/// nearly always printable ASCII, where only C0 and DEL are: the common
/// case is a scan of bytes, the characters are decoded only past ASCII.
fn is_clean(text: &str) -> bool {
    let printable_ascii = |b: &u8| (0x20..0x7f).contains(b);
    text.as_bytes().iter().all(printable_ascii) || !text.chars().any(needs_escape)
}

/// `text` with its control characters escaped; borrowed when it has none.
pub fn escape(text: &str) -> Cow<'_, str> {
    escape_keeping_colours(text, false)
}

/// As [`escape_keeping_colours`], line by line: the newlines of a message
/// written on several lines (an error and its hints) are kept; everything
/// else is escaped.
pub fn escape_keeping_lines(text: &str, keep_colours: bool) -> Cow<'_, str> {
    if !text.chars().any(|c| c != '\n' && needs_escape(c)) {
        return Cow::Borrowed(text);
    }
    let lines: Vec<Cow<'_, str>> = text
        .split('\n')
        .map(|line| escape_keeping_colours(line, keep_colours))
        .collect();
    Cow::Owned(lines.join("\n"))
}

/// As [`escape`], but with `keep_colours` the terminal colour sequences a
/// log formatter writes (`ESC [ digits ; ... m`, which can only change
/// colours) are kept.
pub fn escape_keeping_colours(text: &str, keep_colours: bool) -> Cow<'_, str> {
    if is_clean(text) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if keep_colours
            && c == '\x1b'
            && let Some(length) = colour_sequence(rest)
        {
            out.push_str(&rest[..length]);
            rest = &rest[length..];
            continue;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
        rest = &rest[c.len_utf8()..];
    }
    Cow::Owned(out)
}

/// Compact JSON text (as `serde_json` writes it) with the characters
/// [`escape`] would escape, and JSON leaves raw, written as `\uXXXX`:
/// DEL, the C1 controls (U+009B is a terminal's CSI), the separators,
/// the bidirectional marks and the invisible characters (a tag character,
/// beyond the Basic Multilingual Plane, as its surrogate pair). JSON
/// already escapes C0 inside strings and has nothing but ASCII outside
/// them, so the text means the same to a parser and shows the same on a
/// terminal as it reads.
pub fn escape_json(json: &str) -> Cow<'_, str> {
    let raw = |c: char| c >= '\u{7f}' && needs_escape(c);
    if (json.is_ascii() && !json.as_bytes().contains(&0x7f)) || !json.chars().any(raw) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if raw(c) {
            for unit in c.encode_utf16(&mut [0; 2]) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The length of the SGR sequence `ESC [ [0-9;]* m` at the start of
/// `text`, if it asks only for what the log formatter and clap write:
/// reset, bold, dim, italic, underline and the colours red to magenta. Not
/// the rest, which a lease id or an agent's message could use to hide what
/// follows (conceal, black on black, the background colours).
fn colour_sequence(text: &str) -> Option<usize> {
    const FORMATTERS: [&str; 11] = ["", "0", "1", "2", "3", "4", "31", "32", "33", "34", "35"];
    let body = text.strip_prefix("\x1b[")?;
    let digits = body.find(|c: char| !(c.is_ascii_digit() || c == ';'))?;
    let ours = body[..digits].split(';').all(|code| FORMATTERS.contains(&code));
    (body[digits..].starts_with('m') && digits <= 16 && ours).then_some(2 + digits + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_become_visible_escapes() {
        assert_eq!(
            escape("lease-1\n2026-01-01T00:00:00Z  INFO forged\r\t\x1b]0;x\x07\u{2028}\u{202e}"),
            "lease-1\\n2026-01-01T00:00:00Z  INFO forged\\r\\t\\u{1b}]0;x\\u{7}\\u{2028}\\u{202e}"
        );
        assert!(matches!(escape("plain text, ünïcode"), Cow::Borrowed(_)));
        // Marks that reorder text, and spaces that hide it.
        assert_eq!(
            escape("a\u{200e}b\u{200f}c\u{61c}d\u{200b}e\u{2060}f\u{feff}"),
            "a\\u{200e}b\\u{200f}c\\u{61c}d\\u{200b}e\\u{2060}f\\u{feff}"
        );
        // Characters that show nothing; the joiners stay (emoji need them).
        assert_eq!(
            escape("a\u{ad}b\u{180e}c\u{2062}d\u{206f}e\u{fffa}f\u{3164}g\u{e0001}h\u{200d}i"),
            "a\\u{ad}b\\u{180e}c\\u{2062}d\\u{206f}e\\u{fffa}f\\u{3164}g\\u{e0001}h\u{200d}i"
        );
    }

    #[test]
    fn the_fast_path_agrees_with_the_rule_for_every_character() {
        for c in (0..=u32::from(char::MAX)).filter_map(char::from_u32) {
            let text = format!("id={c}.");
            assert_eq!(is_clean(&text), !needs_escape(c), "U+{:04X}", c as u32);
            let json = serde_json::to_string(&text).unwrap();
            assert_eq!(
                matches!(escape_json(&json), Cow::Borrowed(_)),
                c < '\u{7f}' || !needs_escape(c),
                "U+{:04X} in JSON",
                c as u32
            );
        }
    }

    #[test]
    fn lines_are_kept_and_each_escaped() {
        assert_eq!(
            escape_keeping_lines("error: a\u{9b}2J\n  hint\u{202e}\r\n", false),
            "error: a\\u{9b}2J\n  hint\\u{202e}\\r\n"
        );
        assert!(matches!(escape_keeping_lines("two\nlines", false), Cow::Borrowed(_)));
    }

    #[test]
    fn json_text_shows_what_it_holds_and_parses_to_the_same() {
        let value = serde_json::json!({
            "message": "a\u{7f}b\u{85}c\u{9b}2Jd\u{202e}e\u{2028}f\u{feff}g\nh\u{e0041}i\u{ad}j",
            "plain": "ünïcode ✓ 𝄞",
        });
        let text = serde_json::to_string(&value).unwrap();
        let shown = escape_json(&text);
        assert_eq!(
            shown,
            r#"{"message":"a\u007fb\u0085c\u009b2Jd\u202ee\u2028f\ufeffg\nh\udb40\udc41i\u00adj","plain":"ünïcode ✓ 𝄞"}"#
        );
        assert_eq!(serde_json::from_str::<serde_json::Value>(&shown).unwrap(), value);
        assert!(!shown.chars().any(needs_escape));
        let plain = serde_json::to_string(&serde_json::json!({"a": "ünïcode"})).unwrap();
        assert!(matches!(escape_json(&plain), Cow::Borrowed(_)));
    }

    #[test]
    fn colour_sequences_are_kept_only_when_asked_and_only_colours() {
        let line = "\x1b[32mINFO\x1b[0m id=a\x1b[2Jb";
        assert_eq!(
            escape_keeping_colours(line, true),
            "\x1b[32mINFO\x1b[0m id=a\\u{1b}[2Jb"
        );
        assert_eq!(escape(line), "\\u{1b}[32mINFO\\u{1b}[0m id=a\\u{1b}[2Jb");
        // Only the formatter's own: not what would hide the text after it.
        let hiding = "\x1b[1;2;3;31;35mx\x1b[mid=\x1b[8mhidden\x1b[30;40mblack\x1b[37;47mwhite\x1b[38;5;0mk";
        assert_eq!(
            escape_keeping_colours(hiding, true),
            "\x1b[1;2;3;31;35mx\x1b[mid=\\u{1b}[8mhidden\\u{1b}[30;40mblack\\u{1b}[37;47mwhite\\u{1b}[38;5;0mk"
        );
    }
}
