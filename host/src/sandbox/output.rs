//! Bounded capture of a guest's stdout and stderr.
//!
//! A guest's standard streams are never the node's own: they are captured
//! in memory, up to a cap. Past the cap, stderr is truncated (the guest goes
//! on; the report says so) while a command agent's stdout, which carries its
//! result, refuses the write, so the run fails `budget.output` instead of
//! completing with half a result.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use support::sync::lock;

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// What happens to bytes past the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Keep the first `cap` bytes, drop the rest, let the guest go on.
    Truncate,
    /// Fail the write: the guest sees an I/O error.
    Refuse,
}

#[derive(Debug, Default)]
struct Captured {
    bytes: Vec<u8>,
    overflowed: bool,
}

/// A capped in-memory sink, shared between the guest's stream and the node.
#[derive(Debug, Clone)]
pub struct BoundedOutput {
    cap: usize,
    overflow: Overflow,
    captured: Arc<Mutex<Captured>>,
}

impl BoundedOutput {
    pub fn new(cap: usize, overflow: Overflow) -> Self {
        BoundedOutput {
            cap,
            overflow,
            captured: Arc::default(),
        }
    }

    /// The bytes captured so far.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().bytes.clone()
    }

    /// Whether the guest tried to write past the cap.
    pub fn overflowed(&self) -> bool {
        self.lock().overflowed
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Captured> {
        // The lock is only held to copy bytes; a poisoned lock still holds
        // valid bytes.
        lock(&self.captured)
    }

    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        let mut captured = self.lock();
        let room = self.cap - captured.bytes.len();
        if buf.len() > room {
            captured.overflowed = true;
            if self.overflow == Overflow::Refuse {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    format!("output is capped at {} bytes", self.cap),
                ));
            }
        }
        let taken = buf.len().min(room);
        captured.bytes.extend_from_slice(&buf[..taken]);
        // Report everything as written when truncating, so the guest does
        // not retry the dropped bytes forever.
        Ok(buf.len())
    }
}

impl IsTerminal for BoundedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for BoundedOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for BoundedOutput {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(self.write(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncating_output_keeps_the_head_and_says_it_overflowed() {
        let out = BoundedOutput::new(4, Overflow::Truncate);
        assert_eq!(out.write(b"abc").unwrap(), 3);
        assert_eq!(out.write(b"def").unwrap(), 3);
        assert_eq!(out.contents(), b"abcd");
        assert!(out.overflowed());
    }

    #[test]
    fn refusing_output_fails_the_write_past_the_cap() {
        let out = BoundedOutput::new(4, Overflow::Refuse);
        out.write(b"abcd").unwrap();
        assert!(out.write(b"e").is_err());
        assert_eq!(out.contents(), b"abcd");
        assert!(out.overflowed());
    }
}
