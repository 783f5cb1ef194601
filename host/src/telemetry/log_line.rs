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
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

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
        SafeLine {
            stderr: *self,
            at_once: true,
        }
    }

    fn make_writer_for(&'a self, metadata: &tracing::Metadata<'_>) -> SafeLine {
        SafeLine {
            stderr: *self,
            at_once: *metadata.level() <= tracing::Level::WARN,
        }
    }
}

/// One event on its way to stderr.
pub struct SafeLine {
    stderr: SafeStderr,
    /// A warning or an error: written at once (with the lines that wait
    /// before it), never left to gather.
    at_once: bool,
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
        match BATCHER.get() {
            Some(batcher) => batcher.push(escaped.as_bytes(), newline, self.at_once)?,
            None => {
                // The line and its newline in one system call, not two.
                let mut line = Vec::with_capacity(escaped.len() + 1);
                line.extend_from_slice(escaped.as_bytes());
                if newline {
                    line.push(b'\n');
                }
                io::stderr().lock().write_all(&line)?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// How long a line may wait for company before it is written.
pub const GATHER_FOR: Duration = Duration::from_millis(2);

/// Past this many bytes waiting, a line is written at once, with what
/// waits before it, by the thread that logs it.
const MOST_WAITING: usize = 1 << 20;

/// The process's batcher, once [`Batcher::start`] ran (the daemon's
/// logging); without it, each line is a system call of its own.
static BATCHER: OnceLock<Arc<Batcher>> = OnceLock::new();

/// Log lines below `WARN` gathered for up to [`GATHER_FOR`] and written
/// together, by a thread of their own: at thousands of runs a second, a
/// system call per line cost the node several microseconds per lease
/// (bench `lease-cost`). Lines keep their order and none is dropped (past
/// [`MOST_WAITING`] the logging thread writes itself); a warning or an
/// error is written at once, with what waits before it; [`flush`] writes
/// what waits, and the guard does so when dropped, at the end of the
/// command. A crash can lose the last [`GATHER_FOR`] of lines below
/// `WARN`.
pub struct Batcher {
    waiting: Mutex<Waiting>,
    woken: Condvar,
    /// Taken before `waiting` by whoever writes: whoever writes first took
    /// everything logged before.
    out: Mutex<Box<dyn Write + Send>>,
}

#[derive(Default)]
struct Waiting {
    bytes: Vec<u8>,
    /// The writing thread is gone: lines are written at once.
    stopped: bool,
}

/// Writes what waits and stops the batcher's thread when dropped; lines
/// logged later are written at once.
pub struct BatcherGuard {
    batcher: Arc<Batcher>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Batcher {
    /// Starts the process's batcher, writing on stderr; `None` if it runs
    /// already or its thread cannot start (lines are then written one by
    /// one).
    pub fn start() -> Option<BatcherGuard> {
        if BATCHER.get().is_some() {
            return None;
        }
        let (batcher, guard) = Batcher::start_on(Box::new(io::stderr()))?;
        BATCHER.set(batcher).ok()?;
        Some(guard)
    }

    /// A batcher writing on `out`, with its thread.
    fn start_on(out: Box<dyn Write + Send>) -> Option<(Arc<Batcher>, BatcherGuard)> {
        let batcher = Arc::new(Batcher {
            waiting: Mutex::new(Waiting::default()),
            woken: Condvar::new(),
            out: Mutex::new(out),
        });
        let writer = batcher.clone();
        let thread = std::thread::Builder::new()
            .name("log-lines".into())
            .spawn(move || writer.write_until_stopped())
            .ok()?;
        let guard = BatcherGuard {
            batcher: batcher.clone(),
            thread: Some(thread),
        };
        Some((batcher, guard))
    }

    fn waiting(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn out(&self) -> MutexGuard<'_, Box<dyn Write + Send>> {
        self.out.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds `line` to what waits, or writes it now with what waits before
    /// it: `at_once`, past [`MOST_WAITING`], or once stopped.
    fn push(&self, line: &[u8], newline: bool, at_once: bool) -> io::Result<()> {
        let mut waiting = self.waiting();
        if at_once || waiting.stopped || waiting.bytes.len() + line.len() > MOST_WAITING {
            drop(waiting);
            let mut out = self.out();
            let mut bytes = std::mem::take(&mut self.waiting().bytes);
            bytes.extend_from_slice(line);
            if newline {
                bytes.push(b'\n');
            }
            return out.write_all(&bytes);
        }
        let was_empty = waiting.bytes.is_empty();
        waiting.bytes.extend_from_slice(line);
        if newline {
            waiting.bytes.push(b'\n');
        }
        drop(waiting);
        if was_empty {
            self.woken.notify_one();
        }
        Ok(())
    }

    /// Writes what waits now; `spare` is swapped in as the next buffer.
    fn write_waiting(&self, spare: &mut Vec<u8>) {
        let mut out = self.out();
        std::mem::swap(&mut self.waiting().bytes, spare);
        // Nothing to do with a failed write but go on: this is the log.
        let _ = out.write_all(spare);
        spare.clear();
    }

    fn write_until_stopped(&self) {
        let mut spare = Vec::new();
        loop {
            {
                let mut waiting = self.waiting();
                while waiting.bytes.is_empty() && !waiting.stopped {
                    waiting = self.woken.wait(waiting).unwrap_or_else(PoisonError::into_inner);
                }
                if waiting.stopped {
                    return;
                }
            }
            std::thread::sleep(GATHER_FOR);
            self.write_waiting(&mut spare);
        }
    }

    fn stop(&self) {
        self.waiting().stopped = true;
        self.woken.notify_one();
    }
}

/// Writes the log lines that wait, before a line written on stderr by
/// other means, so that the order holds.
pub fn flush() {
    if let Some(batcher) = BATCHER.get() {
        batcher.write_waiting(&mut Vec::new());
    }
}

impl Drop for BatcherGuard {
    fn drop(&mut self) {
        self.batcher.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.batcher.write_waiting(&mut Vec::new());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a test batcher wrote.
    #[derive(Clone, Default)]
    struct Written(Arc<Mutex<Vec<u8>>>);

    impl Write for Written {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_warning_is_written_at_once_after_the_lines_that_wait() {
        let written = Written::default();
        let (batcher, guard) = Batcher::start_on(Box::new(written.clone())).unwrap();
        batcher.push(b"info 1", true, false).unwrap();
        batcher.push(b"info 2", true, false).unwrap();
        batcher.push(b"warn", true, true).unwrap();
        assert_eq!(
            String::from_utf8(written.0.lock().unwrap().clone()).unwrap(),
            "info 1\ninfo 2\nwarn\n"
        );
        drop(guard);
    }

    #[test]
    fn gathered_lines_are_written_whole_in_each_threads_order_and_all_by_the_guard() {
        let written = Written::default();
        let (batcher, guard) = Batcher::start_on(Box::new(written.clone())).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|thread| {
                let batcher = batcher.clone();
                std::thread::spawn(move || {
                    for n in 0..2_000 {
                        // Some lines past the bound, which the logging
                        // thread writes itself.
                        let filler = if n % 500 == 0 {
                            "x".repeat(MOST_WAITING / 2)
                        } else {
                            String::new()
                        };
                        batcher
                            .push(
                                format!("thread {thread} line {n} {filler}").as_bytes(),
                                true,
                                n % 700 == 0,
                            )
                            .unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        // Dropped at once: most of the last lines still wait.
        drop(guard);
        let lines_written = || {
            String::from_utf8(written.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .count()
        };
        assert_eq!(lines_written(), 4 * 2_000, "every line, written by the guard");
        batcher.push(b"after the guard", true, false).unwrap();
        let text = String::from_utf8(written.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.last(), Some(&"after the guard"), "written at once");
        for thread in 0..4 {
            let numbers: Vec<usize> = lines
                .iter()
                .filter_map(|line| line.strip_prefix(&format!("thread {thread} line ")))
                .map(|rest| rest.split(' ').next().unwrap().parse().unwrap())
                .collect();
            assert_eq!(numbers, (0..2_000).collect::<Vec<_>>(), "thread {thread}");
        }
    }

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
