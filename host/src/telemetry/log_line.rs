//! What reaches stderr as log lines, whoever wrote the event: one event,
//! one line, nothing a secret.
//!
//! Ids from a control plane, an agent's errors and a library's messages end
//! up in field values and messages. Each formatted event passes through
//! [`SafeStderr`] on its way out: in the human format control characters
//! are escaped (a newline in a lease id cannot forge a second line, an
//! escape sequence cannot rewrite the terminal; the JSON format escapes
//! its own strings), and in both credentials in any URL are redacted
//! (`support::redact`). The formatters' own colours are kept. [`capped`]
//! keeps the HTTP, gRPC and OCI client crates at `info` and above whatever
//! the filter asks, as at `debug` and `trace` they print request headers
//! (bearer tokens among them). It is a filter of its own after the
//! operator's, not directives added to it: `RUST_LOG` directives for a
//! module (`hyper_util::client::legacy=trace`) would win over a crate's.

use std::borrow::Cow;
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

/// Whether an event or span passes the cap: below `info` (debug, trace),
/// nothing of a header-printing crate's targets (the crate's, or any of
/// its modules') does.
pub fn capped(metadata: &tracing::Metadata<'_>) -> bool {
    *metadata.level() <= tracing::Level::INFO || !of_crates(metadata.target(), HEADER_PRINTING_CRATES)
}

/// The node's spans a stderr line names: what the line is about (a
/// lease, a local run). The node's other spans time the parts of a run
/// (resolving, instantiating, reporting, each LLM or HTTP call) for the
/// exported trace; on stderr they would only lengthen every line, and
/// while no OTLP layer wants them they are not built at all (about 5% of
/// the node's CPU per lease, bench `lease-cost`). The console exporter
/// (`OpenTelemetry.ConsoleExporter.Enabled`) writes them all.
pub const STDERR_SPANS: &[&str] = &["lease", "run"];

/// Whether stderr takes this event or span: every event, every library's
/// span, and of the node's own spans those in [`STDERR_SPANS`].
pub fn on_stderr(metadata: &tracing::Metadata<'_>) -> bool {
    !metadata.is_span() || !of_crates(metadata.target(), &["node_runtime"]) || STDERR_SPANS.contains(&metadata.name())
}

/// Whether `target` (`hyper_util::client::legacy::pool`) belongs to one of `crates`.
pub fn of_crates(target: &str, crates: &[&str]) -> bool {
    let root = target.split("::").next().unwrap_or(target);
    crates.contains(&root)
}

/// stderr for a `tracing` fmt layer, which writes each event in one call.
#[derive(Debug, Clone, Copy)]
pub struct SafeStderr {
    /// Whether the formatter writes colours (they are kept).
    pub colours: bool,
    /// Whether to escape control characters: for the human format. The
    /// JSON formatter escapes what JSON must itself, and an escape of ours
    /// inside a JSON string would not be JSON: its lines get
    /// [`support::one_line::escape_json`] instead.
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
        } else if let Cow::Owned(escaped) = support::one_line::escape_json(&redacted) {
            // JSON: what JSON leaves raw and a terminal acts on, as `\uXXXX`.
            Cow::Owned(escaped)
        } else {
            redacted
        };
        // The line and its newline in one system call, not two.
        let mut line = Vec::with_capacity(escaped.len() + 1);
        line.extend_from_slice(escaped.as_bytes());
        if newline {
            line.push(b'\n');
        }
        io::stderr().lock().write_all(&line)?;
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
    fn the_client_crates_and_their_modules_stay_at_info_and_above() {
        use tracing::Level;
        use tracing::callsite::Identifier;
        use tracing::field::FieldSet;
        use tracing::metadata::Kind;

        struct Site;
        impl tracing::callsite::Callsite for Site {
            fn set_interest(&self, _: tracing::subscriber::Interest) {}
            fn metadata(&self) -> &tracing::Metadata<'_> {
                unreachable!()
            }
        }
        static SITE: Site = Site;
        let passes = |target: &'static str, level: Level| {
            let metadata = tracing::Metadata::new(
                "event",
                target,
                level,
                None,
                None,
                None,
                FieldSet::new(&[], Identifier(&SITE)),
                Kind::EVENT,
            );
            capped(&metadata)
        };
        for target in [
            "hyper_util::client::legacy",
            "hyper",
            "h2::codec::framed_write",
            "tonic::transport",
            "reqwest::connect",
        ] {
            assert!(!passes(target, Level::TRACE), "{target}");
            assert!(!passes(target, Level::DEBUG), "{target}");
            assert!(passes(target, Level::INFO), "{target}");
            assert!(passes(target, Level::WARN), "{target}");
        }
        // Not a client crate, though the name starts alike.
        assert!(passes("hyperloop::x", Level::TRACE));
        assert!(passes("node_runtime::worker", Level::TRACE));
    }
}
