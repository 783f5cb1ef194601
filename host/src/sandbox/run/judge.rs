//! The judge: how a run ended, classified.
//!
//! Turns what the call came back with (a result, the agent's own error, a
//! command's exit status, a trap, a host error, the outer timeout) and what
//! the meters read (a refused growth, the tokens spent, an overflowed
//! stdout) into the run's [`RunOutcome`]: completed with its result map, or
//! failed with a [`FailKind`], a one-line message with the numbers, and
//! details with the evidence a developer needs (the guest backtrace, the
//! agent's stderr).

use std::time::Duration;

use wasmtime::{Trap, WasmBacktrace};
use wasmtime_wasi::I32Exit;

use support::units::format_bytes;

use crate::sandbox::agent::error_chain;
use crate::sandbox::backtrace;
use crate::sandbox::bindings::types::AgentError;
use crate::sandbox::budget::{Budget, NodeLimits};
use crate::sandbox::capabilities::log::truncate;
use crate::sandbox::meters::{Refusal, TOKEN_TOLERANCE_FLOOR, TokenMeter, TokenOverrun};
use crate::sandbox::outcome::{FailKind, ResultMap, RunFailure, RunOutcome};
use crate::sandbox::output::BoundedOutput;
use crate::sandbox::state::RunState;

/// How wasmtime says a host call (or a result) carried more than the
/// store's hostcall fuel allows; the error type is private.
const HOSTCALL_FUEL_EXHAUSTED: &str = "fuel allocated for hostcalls has been exhausted";

/// How much of stderr goes into a failure's one-line message.
const MESSAGE_STDERR_TAIL: usize = 300;

/// The epoch callback's verdict once the deadline has passed.
#[derive(Debug, thiserror::Error)]
#[error("the run's deadline passed")]
pub(super) struct DeadlineExceeded;

/// Where a wasmtime error came from.
pub(super) enum Stage {
    Instantiate,
    Call,
}

/// What the guest returned, before the node judged it.
pub(super) enum Returned {
    World(Result<Vec<(String, String)>, AgentError>),
    Command(Result<(), ()>),
}

/// How a run's call ended: what the guest returned, or a wasmtime error
/// from instantiating or calling it.
pub(super) type Ended = Result<Returned, (Stage, wasmtime::Error)>;

/// Turns what happened into an outcome, with the evidence a developer
/// needs in the message and details.
pub(super) struct Judge<'a> {
    budget: &'a Budget,
    /// From the start of the run to its deadline.
    allowed: Duration,
    limits: &'a NodeLimits,
    stdout: &'a BoundedOutput,
    stderr: &'a BoundedOutput,
    state: &'a RunState,
}

impl<'a> Judge<'a> {
    /// A judge of the run whose state is `state`; `allowed` is the time
    /// from its start to its deadline.
    pub(super) fn new(budget: &'a Budget, allowed: Duration, limits: &'a NodeLimits, state: &'a RunState) -> Self {
        Judge {
            budget,
            allowed,
            limits,
            stdout: &state.stdout,
            stderr: &state.stderr,
            state,
        }
    }

    /// The outcome of a run whose call ended as `ended`, a failure cut to
    /// what a report carries.
    pub(super) fn verdict(&self, ended: Ended) -> RunOutcome {
        let outcome = match ended {
            Err((stage, err)) => match err.downcast_ref::<I32Exit>() {
                Some(I32Exit(0)) => self.command_output(),
                Some(I32Exit(code)) => RunOutcome::Failed(self.command_exit(*code)),
                None => RunOutcome::Failed(self.error(stage, &err)),
            },
            Ok(Returned::World(Ok(pairs))) => self.result(pairs),
            Ok(Returned::World(Err(error))) => RunOutcome::Failed(RunFailure {
                kind: FailKind::AgentError,
                message: error.message,
                retryable: error.retryable,
                details: self.stderr_details(),
            }),
            Ok(Returned::Command(Ok(()))) => self.command_output(),
            Ok(Returned::Command(Err(()))) => RunOutcome::Failed(self.command_exit(1)),
        };
        checked_and_capped(&self.state.tokens, outcome)
    }

    fn result(&self, pairs: Vec<(String, String)>) -> RunOutcome {
        let size: usize = pairs.iter().map(|(k, v)| k.len() + v.len()).sum();
        if size > self.limits.result_bytes {
            return RunOutcome::Failed(RunFailure::new(
                FailKind::BudgetOutput,
                format!(
                    "the result map is {}, over the node's cap of {}",
                    format_bytes(size as u64),
                    format_bytes(self.limits.result_bytes as u64)
                ),
            ));
        }
        RunOutcome::Completed(pairs.into_iter().collect())
    }

    fn command_output(&self) -> RunOutcome {
        if self.stdout.overflowed() {
            return RunOutcome::Failed(self.output_overflow());
        }
        let stdout = self.stdout.contents();
        match serde_json::from_slice::<ResultMap>(&stdout) {
            Ok(result) => RunOutcome::Completed(result),
            Err(err) => RunOutcome::Failed(
                RunFailure::new(
                    FailKind::AgentError,
                    format!(
                        "the command's stdout is not a JSON object of strings ({err}); \
                         it starts with: {}",
                        truncate(String::from_utf8_lossy(&stdout).trim(), 200)
                    ),
                )
                .with_details(self.stderr_details()),
            ),
        }
    }

    fn command_exit(&self, code: i32) -> RunFailure {
        // A guest whose stdout write was refused usually exits with an
        // error: the cause is the cap, not the agent.
        if self.stdout.overflowed() {
            return self.output_overflow().with_details(self.stderr_details());
        }
        let mut message = format!("the command exited with a failure status (code {code})");
        self.append_stderr_tail(&mut message);
        RunFailure::new(FailKind::AgentError, message).with_details(self.stderr_details())
    }

    fn output_overflow(&self) -> RunFailure {
        RunFailure::new(
            FailKind::BudgetOutput,
            format!(
                "the command wrote more than the node's cap of {} to stdout",
                format_bytes(self.stdout.cap() as u64)
            ),
        )
    }

    fn deadline_text(&self) -> String {
        deadline_text(self.allowed)
    }

    fn error(&self, stage: Stage, err: &wasmtime::Error) -> RunFailure {
        let backtrace = backtrace::write(err).unwrap_or_default();
        let details = self.details(&backtrace);
        if err.is::<DeadlineExceeded>() {
            return RunFailure::new(
                FailKind::BudgetDeadline,
                format!("the run did not finish within its deadline ({})", self.deadline_text()),
            )
            .with_details(details);
        }
        if let Some(Trap::OutOfFuel) = err.downcast_ref::<Trap>() {
            return RunFailure::new(
                FailKind::BudgetFuel,
                format!("the run used all of its {} fuel", self.budget.fuel()),
            )
            .with_details(details);
        }
        if self.result_too_large_to_lift(err) {
            return RunFailure::new(
                FailKind::BudgetOutput,
                format!(
                    "the agent returned more than {}, the most a returned value may carry out of \
                     the agent (a result map over the node's cap of {}, or an error as large)",
                    format_bytes(self.state.host_limits.hostcall_bytes as u64),
                    format_bytes(self.limits.result_bytes as u64),
                ),
            );
        }
        if let Some(refusal) = self.state.memory.refusal().cloned().or_else(|| self.host_limit(err)) {
            return RunFailure::new(FailKind::BudgetMemory, self.refusal_message(&refusal)).with_details(details);
        }
        if self.stdout.overflowed() {
            return self.output_overflow().with_details(details);
        }
        let mut message = match (stage, err.downcast_ref::<Trap>()) {
            (Stage::Instantiate, Some(trap)) => {
                return RunFailure::new(
                    FailKind::AgentInvalid,
                    format!("the component trapped while being instantiated: {trap}"),
                )
                .with_details(details);
            }
            (Stage::Instantiate, None) => {
                // The component linked when it was loaded, and its memory
                // and tables are within budget (checked above): what is
                // left is this node's resources (the instance pool, the
                // kernel's mappings, memory). Another node, or this one
                // later, can run it.
                return RunFailure::handed_back(format!(
                    "this node could not instantiate the component: {}",
                    error_chain(err)
                ))
                .with_details(details);
            }
            (Stage::Call, Some(Trap::StackOverflow)) => {
                "the agent trapped: stack overflow (call stack exhausted)".to_string()
            }
            (Stage::Call, Some(Trap::UnreachableCodeReached)) => {
                "the agent trapped: `unreachable` executed (a panic or abort)".to_string()
            }
            (Stage::Call, Some(trap)) => format!("the agent trapped: {trap}"),
            (Stage::Call, None) => format!("the agent failed in a host call: {}", error_chain(err)),
        };
        self.append_stderr_tail(&mut message);
        RunFailure::new(FailKind::AgentTrap, message).with_details(details)
    }

    /// Whether the per-call ceiling stopped the copy of what `run`
    /// returned: the guest has returned, so no frame of it is on the
    /// stack, unlike a host call's arguments.
    fn result_too_large_to_lift(&self, err: &wasmtime::Error) -> bool {
        error_chain(err).contains(HOSTCALL_FUEL_EXHAUSTED)
            && err
                .downcast_ref::<WasmBacktrace>()
                .is_none_or(|backtrace| backtrace.frames().is_empty())
    }

    /// A host-side ceiling the error says the run hit (wasmtime and WASI
    /// report these as errors of the host call, named only in text).
    fn host_limit(&self, err: &wasmtime::Error) -> Option<Refusal> {
        let chain = error_chain(err);
        let limits = &self.state.host_limits;
        if chain.contains("resource table has no free keys") {
            Some(Refusal::HostResources {
                what: "host resources (WASI and HTTP handles)",
                limit: limits.resource_entries,
            })
        } else if chain.contains("store handle limit exceeded") {
            Some(Refusal::HostResources {
                what: "component handles",
                limit: limits.component_handles,
            })
        } else if chain.contains("total size of fields exceeds limit") {
            // wasi-http traps an append past its field-size limit.
            Some(Refusal::HeaderMap {
                limit: limits.field_bytes,
            })
        } else if chain.contains(HOSTCALL_FUEL_EXHAUSTED) {
            Some(Refusal::HostcallData {
                limit: limits.hostcall_bytes,
            })
        } else if chain.contains("requested len") && chain.contains("exceeds limit") {
            // wasmtime-wasi's refusal of a `get-random-bytes` over the limit.
            Some(Refusal::RandomBytes {
                limit: limits.random_bytes,
            })
        } else {
            None
        }
    }

    fn refusal_message(&self, refusal: &Refusal) -> String {
        let limit = format_bytes(self.state.memory.limit_bytes());
        match refusal {
            Refusal::Memory { requested_total } => format!(
                "memory growth to {} was refused: the run's limit is {limit}",
                format_bytes(*requested_total),
            ),
            Refusal::Table { requested_elements } if *requested_elements > self.limits.table_elements as usize => {
                format!(
                    "table growth to {requested_elements} elements was refused: the node's \
                     limit is {} (all of a run's tables together)",
                    self.limits.table_elements
                )
            }
            Refusal::Table { requested_elements } => format!(
                "table growth to {requested_elements} elements was refused: with the run's \
                 memories and host resources it would pass the run's limit of {limit}"
            ),
            Refusal::Host { host_bytes, total } => format!(
                "the host resources the run holds ({} of HTTP header maps, requests and \
                 their buffers, and other handles) took its memory to {}, over its limit of \
                 {limit}",
                format_bytes(*host_bytes),
                format_bytes(*total),
            ),
            Refusal::HostResources { what, limit } => {
                format!("the run holds {limit} {what} at once, the most a run may; drop them once used")
            }
            Refusal::HostcallData { limit } => format!(
                "the agent handed the host more than {} in one call (a host call's arguments, \
                 or the result it returned), the most a call may carry",
                format_bytes(*limit as u64)
            ),
            Refusal::HeaderMap { limit } => format!(
                "the agent grew an HTTP header map past {}, the most one may hold",
                format_bytes(*limit as u64)
            ),
            Refusal::RandomBytes { limit } => format!(
                "the agent asked for more than {} of random bytes in one call, the most a call \
                 may return; ask in smaller draws",
                format_bytes(*limit)
            ),
        }
    }

    fn stderr_text(&self) -> String {
        stderr_text(self.stderr)
    }

    /// Adds the end of stderr (a panic message, typically) to a one-line
    /// message.
    fn append_stderr_tail(&self, message: &mut String) {
        let stderr = self.stderr_text();
        // Rust's hint about RUST_BACKTRACE is noise here: the guest cannot
        // set it, and the backtrace is in the details anyway.
        let lines: Vec<&str> = stderr
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with("note: run with `RUST_BACKTRACE"))
            .collect();
        if lines.is_empty() {
            return;
        }
        let joined = lines.join(" | ");
        let mut start = joined.len().saturating_sub(MESSAGE_STDERR_TAIL);
        while !joined.is_char_boundary(start) {
            start += 1;
        }
        message.push_str("; stderr: ");
        message.push_str(&joined[start..]);
    }

    fn stderr_details(&self) -> String {
        self.details("")
    }

    fn details(&self, backtrace: &str) -> String {
        details(self.stderr, backtrace)
    }

    /// A world agent's stderr (its `eprintln!`s) reaches the node's log,
    /// once, at the end of the run.
    pub(super) fn pass_on_stderr(&self) {
        let stderr = self.stderr_text();
        let stderr = stderr.trim_end();
        if !stderr.is_empty() {
            let text = truncate(stderr, self.limits.log_line_bytes);
            tracing::info!(target: "agent", stream = "stderr", "{text}");
        }
    }
}

/// A run cut off at its deadline, `allowed` after its start, while it
/// waited in a host call or was computing (parked in the call hook):
/// judged from what does not need its store, which the suspended call
/// still holds (its captured stderr, and the tokens it had spent as last
/// read). A computing guest's backtrace is taken when its call is unwound,
/// after the report.
pub(super) fn cut_off(allowed: Duration, stderr: &BoundedOutput, tokens: &TokenMeter, computing: bool) -> RunOutcome {
    let waiting = if computing {
        ""
    } else {
        "; it was waiting in a host call"
    };
    let failure = RunFailure::new(
        FailKind::BudgetDeadline,
        format!(
            "the run did not finish within its deadline ({}){waiting}",
            deadline_text(allowed)
        ),
    )
    .with_details(details(stderr, ""));
    checked_and_capped(tokens, RunOutcome::Failed(failure))
}

/// A run that spent more tokens than its budget fails, whatever it
/// returned, unless the overrun is within the tolerance. The LLM
/// capability refuses a call whose estimated prompt plus its output
/// cap does not fit what remains, so a run goes over only by what the
/// estimate missed on the call that crossed the budget: up to the
/// tolerance (10% of the budget, at least 32 tokens) the run ends as
/// the agent decides, and the report shows the tokens used. A provider
/// that wrote past the cap it was given fails the run however small
/// the overrun.
///
/// A failure is then cut to what a report carries.
fn checked_and_capped(tokens: &TokenMeter, outcome: RunOutcome) -> RunOutcome {
    match check_tokens(tokens, outcome) {
        RunOutcome::Failed(failure) => RunOutcome::Failed(failure.capped()),
        completed => completed,
    }
}

fn deadline_text(allowed: Duration) -> String {
    humantime::format_duration(allowed).to_string()
}

fn stderr_text(stderr: &BoundedOutput) -> String {
    String::from_utf8_lossy(&stderr.contents()).into_owned()
}

/// A failure's details: the guest backtrace, then the agent's stderr.
fn details(stderr: &BoundedOutput, backtrace: &str) -> String {
    let mut details = String::new();
    if !backtrace.is_empty() {
        details.push_str(backtrace.trim_end());
    }
    let text = stderr_text(stderr);
    if !text.trim().is_empty() {
        if !details.is_empty() {
            details.push_str("\n\n");
        }
        details.push_str("stderr:\n");
        details.push_str(text.trim_end());
        if stderr.overflowed() {
            details.push_str("\n[stderr truncated]");
        }
    }
    details
}

/// The token check of [`checked_and_capped`], for any run that metered tokens (the
/// built-in declarative agent's too).
pub(crate) fn check_tokens(tokens: &TokenMeter, outcome: RunOutcome) -> RunOutcome {
    let why = match tokens.overrun() {
        None => return outcome,
        Some(TokenOverrun::OutputPastCap { tokens }) => {
            format!("the LLM provider wrote {tokens} tokens past the max_tokens the node gave it")
        }
        Some(TokenOverrun::BeyondTolerance { tolerance }) => format!(
            "more than the {tolerance} tokens tolerated for a prompt the node's estimate \
             missed (10% of the budget, at least {TOKEN_TOLERANCE_FLOOR})"
        ),
    };
    RunOutcome::Failed(RunFailure::new(
        FailKind::BudgetTokens,
        format!(
            "the run used {} LLM tokens, over its budget of {} by {}: {why}",
            tokens.used(),
            tokens.limit,
            tokens.over(),
        ),
    ))
}
