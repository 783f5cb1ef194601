//! Why a configuration was refused.
//!
//! The node stops at start-up on the first bad value, so each error is the
//! one line a person reads: the key as written in `appsettings.json`
//! (`NodeRuntime.HeartbeatIntervalSeconds`), the value found, where it came
//! from (the file or an environment variable), and what to put there
//! instead.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read the configuration file {}: {source}", path.display())]
    Unreadable { path: PathBuf, source: std::io::Error },

    /// The file is not JSON, even allowing the comments and trailing commas
    /// .NET accepts. `line` and `column` count from 1.
    #[error("{file} is not valid JSON: {message} at line {line}, column {column}")]
    Syntax {
        /// The file's path, or "the configuration text".
        file: String,
        line: usize,
        column: usize,
        message: String,
    },

    /// The JSON is valid but is not an object of sections.
    #[error(
        "{file} is not a configuration: expected a JSON object of sections \
         like {{\"NodeRuntime\": {{...}}}}, found {found}"
    )]
    NotAnObject { file: String, found: String },

    /// A setting has a value the node cannot use.
    #[error("{key} is {found} ({origin}): {fix}")]
    Invalid {
        /// The key as the reference names it, levels joined by dots:
        /// `NodeRuntime.Capacity.Slots`.
        key: String,
        /// The value as written (strings quoted), `a section`, or `not set`.
        found: String,
        /// `in <file>` or `from environment variable <NAME>`.
        origin: String,
        /// What the node expected, and so what to write instead.
        fix: String,
    },
}

impl ConfigError {
    /// The offending key, for errors about one setting.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}
