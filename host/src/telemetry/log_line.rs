//! What reaches stderr as log lines, whoever wrote the event: one event,
//! one line, nothing a secret.
//!
//! Ids from a control plane, an agent's errors and a library's messages end
//! up in field values and messages. Each formatted event passes through
//! [`SafeStderr`] on its way out: in the human format control characters
//! are escaped (a newline in a lease id cannot forge a second line, an
//! escape sequence cannot rewrite the terminal; the JSON format escapes
//! its own strings), and in both credentials in any URL are redacted
//! (`support::redact`). The formatters' own colours are kept. [`cap_libraries`]
//! keeps the HTTP, gRPC and OCI client crates at `info` whatever the
//! filter asks, as at `debug` and `trace` they print request headers
//! (bearer tokens among them).

use std::io::{self, Write};

use tracing_subscriber::fmt::MakeWriter;

/// The client crates whose debug and trace output can carry headers.
const HEADER_PRINTING_CRATES: &[&str] = &[
    "h2",
    "hyper",
    "hyper_util",
    "reqwest",
    "tonic",
    "tower",
    "tower_http",
    "oci_client",
    "rustls",
    "tokio_rustls",
    "wasmtime_wasi_http",
];

/// `filter` with every header-printing crate capped at `info`.
pub fn cap_libraries(filter: &str) -> String {
    let mut capped = filter.trim().trim_end_matches(',').to_string();
    for target in HEADER_PRINTING_CRATES {
        if !capped.is_empty() {
            capped.push(',');
        }
        capped.push_str(target);
        capped.push_str("=info");
    }
    capped
}

/// stderr for a `tracing` fmt layer, which writes each event in one call.
#[derive(Debug, Clone, Copy)]
pub struct SafeStderr {
    /// Whether the formatter writes colours (they are kept).
    pub colours: bool,
    /// Whether to escape control characters: for the human format. The
    /// JSON formatter escapes what JSON must itself, and an escape of ours
    /// inside a JSON string would not be JSON.
    pub escape: bool,
}

impl SafeStderr {
    pub fn human(colours: bool) -> Self {
        SafeStderr { colours, escape: true }
    }

    pub fn json() -> Self {
        SafeStderr {
            colours: false,
            escape: false,
        }
    }
}

impl<'a> MakeWriter<'a> for SafeStderr {
    type Writer = SafeLine;

    fn make_writer(&'a self) -> SafeLine {
        SafeLine { stderr: *self }
    }
}

/// One event on its way to stderr.
pub struct SafeLine {
    stderr: SafeStderr,
}

impl Write for SafeLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let (body, newline) = match text.strip_suffix('\n') {
            Some(body) => (body, true),
            None => (&*text, false),
        };
        let redacted = support::redact::urls_in(body);
        let escaped = if self.stderr.escape {
            support::one_line::escape_keeping_colours(&redacted, self.stderr.colours)
        } else {
            redacted
        };
        let mut stderr = io::stderr().lock();
        stderr.write_all(escaped.as_bytes())?;
        if newline {
            stderr.write_all(b"\n")?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_header_printing_crate_is_capped_after_what_the_operator_asked() {
        assert_eq!(
            cap_libraries("trace,"),
            format!(
                "trace,{}",
                HEADER_PRINTING_CRATES
                    .iter()
                    .map(|c| format!("{c}=info"))
                    .collect::<Vec<_>>()
                    .join(",")
            )
        );
        assert!(cap_libraries("").starts_with("h2=info,"));
    }
}
