//! How a run ended, and what it consumed.
//!
//! Every run produces a [`RunOutcome`] (the lease's `Complete` or `Fail`)
//! and a [`RunReport`] (the meters' readings). A failure carries a
//! [`FailKind`]: a machine-readable class the control plane, the CLI's exit
//! code and the telemetry all key on, so it is a closed enum and not a
//! free-form string.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// The result map of a completed run: it becomes `CompleteRequest.result`.
pub type ResultMap = BTreeMap<String, String>;

/// Why a run failed. The string form (`as_str`) is stable: it appears in
/// `FailRequest.error_details`, in `run-agent --json`, and in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum FailKind {
    /// The agent returned an error of its own (its `retryable` flag is kept).
    #[serde(rename = "agent.error")]
    AgentError,
    /// The agent trapped: a panic, `unreachable`, a stack overflow...
    #[serde(rename = "agent.trap")]
    AgentTrap,
    /// The artifact is not a runnable agent: not Wasm, a core module, a
    /// component of another world, or imports the node does not provide.
    #[serde(rename = "agent.invalid")]
    AgentInvalid,
    /// CPU fuel ran out.
    #[serde(rename = "budget.fuel")]
    BudgetFuel,
    /// Linear memory (or a table) would have grown past the run's limit.
    #[serde(rename = "budget.memory")]
    BudgetMemory,
    /// The run's deadline passed: its duration budget or the lease deadline.
    #[serde(rename = "budget.deadline")]
    BudgetDeadline,
    /// The agent went on past its LLM token budget.
    #[serde(rename = "budget.tokens")]
    BudgetTokens,
    /// The agent's result (or a command agent's stdout) is larger than the
    /// node accepts.
    #[serde(rename = "budget.output")]
    BudgetOutput,
    /// The node handed the lease back without finishing it: it was shutting
    /// down, or every slot and queue place was taken. Always retryable.
    #[serde(rename = "node.unavailable")]
    NodeUnavailable,
}

impl FailKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailKind::AgentError => "agent.error",
            FailKind::AgentTrap => "agent.trap",
            FailKind::AgentInvalid => "agent.invalid",
            FailKind::BudgetFuel => "budget.fuel",
            FailKind::BudgetMemory => "budget.memory",
            FailKind::BudgetDeadline => "budget.deadline",
            FailKind::BudgetTokens => "budget.tokens",
            FailKind::BudgetOutput => "budget.output",
            FailKind::NodeUnavailable => "node.unavailable",
        }
    }

    /// True for the kinds that mean "a meter ran out".
    pub fn is_budget(self) -> bool {
        matches!(
            self,
            FailKind::BudgetFuel
                | FailKind::BudgetMemory
                | FailKind::BudgetDeadline
                | FailKind::BudgetTokens
                | FailKind::BudgetOutput
        )
    }
}

impl fmt::Display for FailKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed run, as the control plane and the developer see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunFailure {
    pub kind: FailKind,
    /// One line for a human: what happened, with the numbers.
    pub message: String,
    /// Whether running the same input again could succeed. Only the agent
    /// can know that for `agent.error`; every other kind is final.
    pub retryable: bool,
    /// Longer evidence: the guest backtrace, the tail of the agent's stderr.
    pub details: String,
}

impl RunFailure {
    /// A failure the node decided on, never retryable.
    pub fn new(kind: FailKind, message: impl Into<String>) -> Self {
        RunFailure {
            kind,
            message: message.into(),
            retryable: false,
            details: String::new(),
        }
    }

    /// The lease goes back to the control plane to run elsewhere or later.
    pub fn handed_back(message: impl Into<String>) -> Self {
        RunFailure {
            kind: FailKind::NodeUnavailable,
            message: message.into(),
            retryable: true,
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The failure with its message and details cut to
    /// [`FAILURE_MESSAGE_BYTES`] and [`FAILURE_DETAILS_BYTES`], each cut
    /// marked: much of both comes from the agent (its error, its stderr,
    /// the names in its backtrace), and a report must always fit in a
    /// message the control plane accepts.
    /// The message is also made one line and the credentials in any URL
    /// of message or details redacted, as [`one_line_message`] does.
    ///
    /// [`one_line_message`]: Self::one_line_message
    pub fn capped(self) -> Self {
        let message = RunFailure {
            message: without_nul(self.message.clone()),
            ..self.clone()
        }
        .one_line_message();
        let details = support::redact::urls_in(&self.details).into_owned();
        RunFailure {
            message: cut(message, FAILURE_MESSAGE_BYTES),
            details: cut(without_nul(details), FAILURE_DETAILS_BYTES),
            ..self
        }
    }

    /// The message as a Fail carries it: one line (control characters,
    /// which ids from the plane or the agent's own error may hold, escaped
    /// as `\n`, `\u{1b}`...) with the credentials in any URL redacted.
    pub fn one_line_message(&self) -> String {
        let redacted = support::redact::urls_in(&self.message);
        support::one_line::escape(&redacted).into_owned()
    }
}

/// The longest failure message a report carries.
pub const FAILURE_MESSAGE_BYTES: usize = 16 * 1024;
/// The longest failure details a report carries.
pub const FAILURE_DETAILS_BYTES: usize = 256 * 1024;

/// `text` with each NUL replaced by U+FFFD: a database behind a control
/// plane (PostgreSQL's `text`) refuses NUL, and would refuse the report.
fn without_nul(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{fffd}")
    } else {
        text
    }
}

/// `text` cut to at most `max` bytes (the mark included) on a character
/// boundary, with `... [N bytes cut]` where it was cut.
pub fn cut(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    // Room for the mark: "... [" + up to 20 digits + " bytes cut]".
    let mut end = max.saturating_sub(40);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... [{} bytes cut]", &text[..end], text.len() - end)
}

impl fmt::Display for RunFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for RunFailure {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_failure_fits_and_says_what_was_cut() {
        let failure = RunFailure::new(FailKind::AgentError, "é".repeat(20 * 1024 * 1024))
            .with_details("x".repeat(FAILURE_DETAILS_BYTES))
            .capped();
        assert!(
            failure.message.len() <= FAILURE_MESSAGE_BYTES,
            "{}",
            failure.message.len()
        );
        assert!(
            failure.message.ends_with(" bytes cut]"),
            "{}",
            &failure.message[failure.message.len() - 40..]
        );
        assert_eq!(failure.details.len(), FAILURE_DETAILS_BYTES, "at the cap: kept whole");
        assert_eq!(cut("short".into(), 10), "short");
        let nul = RunFailure::new(FailKind::AgentError, "a\0b")
            .with_details("\0")
            .capped();
        assert_eq!((nul.message.as_str(), nul.details.as_str()), ("a\u{fffd}b", "\u{fffd}"));
    }

    #[test]
    fn a_capped_message_is_one_line_and_no_url_keeps_its_password() {
        let failure = RunFailure::new(
            FailKind::AgentError,
            "agent `x\n2026-01-01T00:00:00Z  INFO forged` fetching https://u:hunter2@store.test/a?sig=abc",
        )
        .with_details("backtrace:\n  at https://u:hunter2@store.test/\n")
        .capped();
        assert_eq!(
            failure.message,
            "agent `x\\n2026-01-01T00:00:00Z  INFO forged` fetching https://***@store.test/a?sig=***"
        );
        assert_eq!(
            failure.details, "backtrace:\n  at https://***@store.test/\n",
            "details keep their lines"
        );
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    Completed(ResultMap),
    Failed(RunFailure),
}

impl RunOutcome {
    pub fn failure(&self) -> Option<&RunFailure> {
        match self {
            RunOutcome::Completed(_) => None,
            RunOutcome::Failed(failure) => Some(failure),
        }
    }
}

/// What one run consumed. Filled for every run, failed ones included.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RunReport {
    /// Fuel (about one unit per WebAssembly instruction) the run burned.
    /// A lower bound for a run stopped by its deadline while computing:
    /// compiled code stores its fuel count at calls, not in every loop.
    pub fuel_consumed: u64,
    /// Largest the run's memory has been, in bytes: its linear memories,
    /// its tables, and what the host held for it, together. The budget
    /// applies to this sum.
    pub peak_memory_bytes: u64,
    /// The host's part of it at its largest: the resources the run made
    /// the host hold (HTTP header maps, requests, body buffers, handles),
    /// each charged the most it may hold.
    pub peak_host_bytes: u64,
    /// From the start of instantiation to the outcome.
    pub wall_ms: u64,
    /// Time to instantiate the component into a fresh store.
    pub instantiate_us: u64,
    pub tokens_in: u32,
    pub tokens_out: u32,
    pub usd_cost: f64,
    /// Log lines the agent emitted and the node passed on.
    pub log_lines: u32,
    /// Log lines dropped because the run's log cap was reached.
    pub log_lines_dropped: u32,
    /// Outbound HTTP requests the run attempted, and how many of them the
    /// allow-list refused.
    pub http_requests: u32,
    pub http_denied: u32,
    /// Warnings the run made the node log (egress denials and failures,
    /// ignored metadata entries) past the first
    /// `HOST_WARNINGS_PER_KIND` of each kind: counted, not logged.
    pub host_warnings_suppressed: u32,
}
