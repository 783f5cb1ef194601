//! Why an agent gave up, and whether running it again could help.

use std::fmt;

/// An agent's failure: the lease fails with kind `agent.error`. The
/// reference control plane never re-queues a failed run, so `retryable`
/// informs whoever resubmits it; say `true` only for passing causes (a
/// downstream outage), never for bad input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub message: String,
    pub retryable: bool,
}

impl Error {
    /// A failure running again would not fix (bad input, a bug).
    pub fn fatal(message: impl Into<String>) -> Self {
        Error {
            message: message.into(),
            retryable: false,
        }
    }

    /// A failure that may pass (a timeout, an unavailable service).
    pub fn retryable(message: impl Into<String>) -> Self {
        Error {
            message: message.into(),
            retryable: true,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<crate::llm::LlmError> for Error {
    fn from(err: crate::llm::LlmError) -> Self {
        Error {
            retryable: err.is_retryable(),
            message: format!("the model call failed: {err}"),
        }
    }
}

impl From<crate::http::Error> for Error {
    fn from(err: crate::http::Error) -> Self {
        Error {
            retryable: err.is_retryable(),
            message: format!("the HTTP request failed: {err}"),
        }
    }
}
