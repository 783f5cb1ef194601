//! The small things every part of node-runtime shares, and nothing else:
//! this crate depends on no other crate of the workspace, so anything may
//! use it and it can be part of no import circle.
//!
//! - [`secret`]: a value `Debug` never prints.
//! - [`units`]: sizes and durations as people type and read them.
//! - [`backoff`]: exponential backoff with jitter, for every retry loop.
//! - [`tls`]: the process's rustls crypto provider, PEM files, certificate fields.
//! - [`fs`]: atomic file writes with an explicit durability choice.
//! - [`file_stamp`]: a file's identity on disk, strict enough that a rewrite changes it.
//! - [`sync`]: a mutex lock that survives a panicked holder.
//! - [`error`]: an error and its causes on one line.
//! - [`redact`]: credentials taken out of URLs, alone or inside a text.
//! - [`one_line`]: control characters escaped, so a text stays one line.

pub mod backoff;
pub mod error;
pub mod file_stamp;
pub mod fs;
pub mod one_line;
pub mod percent;
pub mod redact;
pub mod secret;
pub mod sync;
pub mod tls;
pub mod units;

pub use backoff::Backoff;
pub use secret::Secret;
