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
                append_line(&mut line, escaped.as_bytes(), newline);
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
const MOST_WAITING: usize = 256 << 10;

/// At most this much in one `write(2)` (but a longer line, alone): a pipe
/// takes a write of up to `PIPE_BUF` (4 KiB on Linux) whole, so the lines
/// of a stderr that other processes write to as well are never torn.
const ONE_WRITE: usize = 4096;

/// The process's batcher, once [`Batcher::start`] ran (the daemon's
/// logging); without it, each line is a system call of its own.
static BATCHER: OnceLock<Arc<Batcher>> = OnceLock::new();

/// Log lines below `WARN` gathered for up to [`GATHER_FOR`] and written
/// together ([`ONE_WRITE`] at a time), by a thread of their own: at
/// thousands of runs a second, a system call per line cost the node
/// several microseconds per lease (bench `lease-cost`). Lines keep their
/// order and none is dropped. A line is written by the thread that logs
/// it, with what waits before it, when it is a warning or an error, when
/// a write is under way (a slow stderr slows the loggers, as it did
/// before, instead of piling lines up), or past [`MOST_WAITING`].
/// [`flush`] writes what waits, and the guard does so when dropped, at the
/// end of the command. A crash can lose the last [`GATHER_FOR`] of lines
/// below `WARN`, and the write under way.
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
    /// A write of what waited is under way.
    writing: bool,
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
    /// it: `at_once`, while a write is under way, past [`MOST_WAITING`], or
    /// once stopped.
    fn push(&self, line: &[u8], newline: bool, at_once: bool) -> io::Result<()> {
        let mut waiting = self.waiting();
        if at_once || waiting.writing || waiting.stopped || waiting.bytes.len() + line.len() + 1 > MOST_WAITING {
            drop(waiting);
            return self.write_now(&mut Vec::new(), line, newline);
        }
        let was_empty = waiting.bytes.is_empty();
        append_line(&mut waiting.bytes, line, newline);
        drop(waiting);
        if was_empty {
            self.woken.notify_one();
        }
        Ok(())
    }

    /// Writes what waits, then `line`. `spare` is swapped in as the next
    /// buffer to gather into. Lines logged during the write are written by
    /// their own threads, after it (`writing`).
    fn write_now(&self, spare: &mut Vec<u8>, line: &[u8], newline: bool) -> io::Result<()> {
        let mut out = self.out();
        {
            let mut waiting = self.waiting();
            std::mem::swap(&mut waiting.bytes, spare);
            waiting.writing = true;
        }
        append_line(spare, line, newline);
        let written = write_lines(&mut **out, spare);
        self.waiting().writing = false;
        spare.clear();
        written
    }

    /// Writes what waits now.
    fn write_waiting(&self, spare: &mut Vec<u8>) {
        // Nothing to do with a failed write but go on: this is the log.
        let _ = self.write_now(spare, b"", false);
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

/// `line`, and its newline if it has one, at the end of `bytes`.
fn append_line(bytes: &mut Vec<u8>, line: &[u8], newline: bool) {
    bytes.extend_from_slice(line);
    if newline {
        bytes.push(b'\n');
    }
}

/// Writes `bytes`, whole lines, [`ONE_WRITE`] at most at a time (a longer
/// line alone). A write that fails loses its own lines, not the rest: the
/// first error is returned once every piece was tried.
fn write_lines(out: &mut dyn Write, mut bytes: &[u8]) -> io::Result<()> {
    let mut failed = None;
    while !bytes.is_empty() {
        let cut = if bytes.len() <= ONE_WRITE {
            bytes.len()
        } else {
            match bytes[..ONE_WRITE].iter().rposition(|&byte| byte == b'\n') {
                Some(end) => end + 1,
                None => bytes
                    .iter()
                    .position(|&byte| byte == b'\n')
                    .map_or(bytes.len(), |end| end + 1),
            }
        };
        if let Err(err) = out.write_all(&bytes[..cut]) {
            failed.get_or_insert(err);
        }
        bytes = &bytes[cut..];
    }
    failed.map_or(Ok(()), Err)
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

    /// Each write a test batcher made.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Writes {
        /// Everything written, in order.
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().concat()).unwrap()
        }
    }

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn no_write_is_longer_than_a_pipe_takes_whole_but_a_longer_line_alone() {
        let writes = Writes::default();
        let (batcher, guard) = Batcher::start_on(Box::new(writes.clone())).unwrap();
        let mut expected = String::new();
        for n in 0..200 {
            let line = if n == 100 {
                "long ".repeat(2_000)
            } else {
                format!("line {n} {}", "x".repeat(n * 3))
            };
            batcher.push(line.as_bytes(), true, false).unwrap();
            expected.push_str(&line);
            expected.push('\n');
        }
        drop(guard);
        let writes = writes.0.lock().unwrap().clone();
        for write in &writes {
            assert!(write.ends_with(b"\n"), "whole lines");
            let lines = write.iter().filter(|&&byte| byte == b'\n').count();
            assert!(
                write.len() <= ONE_WRITE || lines == 1,
                "{} bytes, {lines} lines",
                write.len()
            );
        }
        assert!(
            writes.iter().any(|write| write.len() > ONE_WRITE),
            "the long line, alone"
        );
        assert_eq!(String::from_utf8(writes.concat()).unwrap(), expected);
    }

    /// A stderr whose first write fails.
    struct FailsOnce(Writes, bool);

    impl Write for FailsOnce {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if std::mem::replace(&mut self.1, false) {
                return Err(io::Error::other("a failed write"));
            }
            self.0.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failed_write_loses_its_own_lines_not_the_rest() {
        let writes = Writes::default();
        let mut out = FailsOnce(writes.clone(), true);
        let lines: String = (0..100).map(|n| format!("line {n} {}\n", "x".repeat(100))).collect();
        assert!(
            write_lines(&mut out, lines.as_bytes()).is_err(),
            "the error is returned"
        );
        let written = writes.text();
        assert!(
            written.ends_with(&format!("line 99 {}\n", "x".repeat(100))),
            "the pieces after it are written"
        );
        assert!(!written.starts_with("line 0 "), "the first piece failed");
        assert_eq!(written.lines().count() + lines[..ONE_WRITE].matches('\n').count(), 100);
    }

    /// Stands for a stderr that takes a write only when the test says.
    struct Held {
        started: std::sync::mpsc::Sender<Vec<u8>>,
        release: std::sync::mpsc::Receiver<()>,
    }

    impl Write for Held {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.started.send(buf.to_vec());
            // Bounded, so that a failing test ends.
            let _ = self.release.recv_timeout(Duration::from_secs(10));
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn while_a_write_is_under_way_a_line_is_written_by_its_logging_thread() {
        let (started, writes_started) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel();
        let (batcher, guard) = Batcher::start_on(Box::new(Held {
            started,
            release: released,
        }))
        .unwrap();
        batcher.push(b"first", true, false).unwrap();
        // The batcher's thread is in its write of "first".
        assert_eq!(writes_started.recv().unwrap(), b"first\n");
        let logging = {
            let batcher = batcher.clone();
            std::thread::spawn(move || batcher.push(b"second", true, false).unwrap())
        };
        // "second" does not wait to be gathered: its thread waits for the
        // write under way, then writes it.
        std::thread::sleep(Duration::from_millis(50));
        assert!(!logging.is_finished(), "the logging thread waits for the slow write");
        release.send(()).unwrap();
        assert_eq!(writes_started.recv().unwrap(), b"second\n");
        release.send(()).unwrap();
        logging.join().unwrap();
        assert!(batcher.waiting().bytes.is_empty(), "nothing left to gather");
        drop(guard);
    }

    #[test]
    fn a_warning_is_written_at_once_after_the_lines_that_wait() {
        let written = Writes::default();
        let (batcher, guard) = Batcher::start_on(Box::new(written.clone())).unwrap();
        batcher.push(b"info 1", true, false).unwrap();
        batcher.push(b"info 2", true, false).unwrap();
        batcher.push(b"warn", true, true).unwrap();
        assert_eq!(written.text(), "info 1\ninfo 2\nwarn\n");
        drop(guard);
    }

    #[test]
    fn gathered_lines_are_written_whole_in_each_threads_order_and_all_by_the_guard() {
        let written = Writes::default();
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
        assert_eq!(
            written.text().lines().count(),
            4 * 2_000,
            "every line, written by the guard"
        );
        batcher.push(b"after the guard", true, false).unwrap();
        let text = written.text();
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
