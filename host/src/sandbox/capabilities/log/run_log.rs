//! The log capability's per-run part: a run's log caps and what it has
//! used of them.
//!
//! [`RunLog`] admits a run's lines up to the node's caps (`NodeLimits`'
//! `log_lines`, `log_bytes` and `log_line_bytes`), drops and counts the
//! rest, and renders an admitted line cut to the per-line cap.

use crate::sandbox::budget::NodeLimits;

/// The events' target from before this file moved, so that log filters
/// written for it (`Logging.LogLevel`) still apply.
const LOG_TARGET: &str = "node_runtime::sandbox::capabilities::log";

/// A run's log budget and what it has used.
#[derive(Debug)]
pub struct RunLog {
    max_lines: u32,
    max_bytes: usize,
    max_line_bytes: usize,
    lines: u32,
    bytes: usize,
    dropped: u32,
}

impl RunLog {
    pub fn new(limits: &NodeLimits) -> Self {
        RunLog {
            max_lines: limits.log_lines,
            max_bytes: limits.log_bytes,
            max_line_bytes: limits.log_line_bytes,
            lines: 0,
            bytes: 0,
            dropped: 0,
        }
    }

    pub fn lines(&self) -> u32 {
        self.lines
    }

    pub fn dropped(&self) -> u32 {
        self.dropped
    }

    /// Counts a line of `len` bytes; false when it must be dropped. The
    /// first drop is announced once, so a flood costs one warning.
    fn admit(&mut self, len: usize) -> bool {
        let len = len.min(self.max_line_bytes);
        if self.lines >= self.max_lines || self.bytes + len > self.max_bytes {
            if self.dropped == 0 {
                tracing::warn!(
                    target: LOG_TARGET, max_lines = self.max_lines,
                    max_bytes = self.max_bytes,
                    "agent log cap reached: further lines of this run are dropped and counted"
                );
            }
            self.dropped += 1;
            return false;
        }
        self.lines += 1;
        self.bytes += len;
        true
    }
}

impl RunLog {
    /// Admits one line and renders it: its message and its fields
    /// (`key=value ...`), each cut to the per-line cap; None when the line
    /// must be dropped.
    pub(crate) fn line<'a>(
        &mut self,
        message: &'a str,
        fields: &[(String, String)],
    ) -> Option<(std::borrow::Cow<'a, str>, String)> {
        let size = message.len() + fields.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        if !self.admit(size) {
            return None;
        }
        let max = self.max_line_bytes;
        let message = truncate(message, max);
        // Built up to the cap and no further: a line may carry thousands
        // of fields, and only `max` bytes of them are passed on.
        let mut fields_text = String::new();
        let mut cut = 0usize;
        for (key, value) in fields {
            let separator = if fields_text.is_empty() { "" } else { " " };
            let room = max.saturating_sub(fields_text.len());
            let entry_len = separator.len() + key.len() + 1 + value.len();
            if entry_len <= room {
                fields_text.extend([separator, key.as_str(), "=", value.as_str()]);
                continue;
            }
            if room == 0 {
                cut += entry_len;
                continue;
            }
            let entry = [separator, key.as_str(), "=", value.as_str()].concat();
            let mut end = room;
            while !entry.is_char_boundary(end) {
                end -= 1;
            }
            fields_text.push_str(&entry[..end]);
            cut += entry_len - end;
        }
        if cut > 0 {
            fields_text.push_str(&format!("... [{cut} bytes cut]"));
        }
        let fields = fields_text;
        Some((message, fields))
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary, marking the
/// cut.
pub fn truncate(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... [{} bytes cut]", &text[..end], text.len() - end).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_past_the_cap_are_dropped_and_counted() {
        let mut log = RunLog::new(&NodeLimits {
            log_lines: 2,
            ..NodeLimits::default()
        });
        assert!(log.admit(10));
        assert!(log.admit(10));
        assert!(!log.admit(10));
        assert!(!log.admit(10));
        assert_eq!((log.lines(), log.dropped()), (2, 2));
    }

    #[test]
    fn many_fields_are_cut_to_the_line_cap() {
        let mut log = RunLog::new(&NodeLimits {
            log_line_bytes: 32,
            log_bytes: usize::MAX,
            ..NodeLimits::default()
        });
        let fields: Vec<(String, String)> = (0..10_000).map(|n| (format!("k{n}"), "v".repeat(100))).collect();
        let (_, text) = log.line("m", &fields).expect("admitted");
        assert!(text.starts_with("k0=vvv"), "{text}");
        assert!(text.len() < 80, "{} bytes: {text}", text.len());
        assert!(text.ends_with("bytes cut]"), "{text}");
        let (_, short) = log
            .line("m", &[("a".into(), "1".into()), ("b".into(), "2".into())])
            .unwrap();
        assert_eq!(short, "a=1 b=2");
    }

    #[test]
    fn truncation_respects_character_boundaries() {
        assert_eq!(truncate("héllo", 2), "h... [5 bytes cut]");
        assert_eq!(truncate("short", 10), "short");
    }
}
