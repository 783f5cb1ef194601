//! The end-to-end suites that read the node's own log lines, in one test
//! binary: they install the process's one `tracing` subscriber, which
//! captures every line, and so cannot share a process with suites that
//! do not expect it.
//!
//! - `llm`: the `llm` capability against a stub provider on loopback.
//! - `grants`: sandbox grants (directories, environment, HTTP hosts).
//! - `host_warnings`: the node's own warnings an agent can cause, bounded.

#[path = "../support/mod.rs"]
mod support;

mod grants;
mod host_warnings;
mod llm;

use std::io::Write;
use std::sync::{Arc, Mutex};

/// Collects everything `tracing` writes, from every test of this binary.
#[derive(Clone, Default)]
pub struct Captured(pub Arc<Mutex<Vec<u8>>>);

/// Installs the process-wide subscriber once. (A thread's scoped
/// subscriber misses events: `tracing` caches each callsite's interest
/// from whichever thread hits it first.)
pub fn capture_logs() -> Captured {
    static CAPTURED: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    CAPTURED
        .get_or_init(|| {
            let captured = Captured::default();
            let writer = captured.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
            captured
        })
        .clone()
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
