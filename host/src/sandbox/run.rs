//! One run, start to finish: a fresh store, four meters, the call, and the
//! classification of how it ended.
//!
//! The wall clock is enforced twice: the epoch callback traps a guest that
//! is computing past its deadline (and makes every guest yield to the
//! async runtime once per tick), and an outer timeout ends a guest that is
//! blocked in a host call, where epochs cannot reach it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use thiserror::Error;
use tracing::Instrument;
use wasmtime::{Engine, Store, Trap, UpdateDeadline, WasmBacktrace};
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};
use wasmtime_wasi_http::WasiHttpCtx;

use super::agent::{Agent, Entry, error_chain};
use super::bindings::types::{AgentError, RunContext as WitRunContext};
use support::units::format_bytes;

use super::budget::{Budget, BudgetRequest, NodeLimits};
use super::capabilities::http::{EgressPolicy, HTTP_ALLOW_METADATA_KEY};
use super::capabilities::llm::RunLlm;
use super::capabilities::log::{RunLog, truncate};
use super::engine::Metering;
use super::engine::RUN_SHAPE;
use super::grants::AgentGrants;
use super::host_memory::{self, HostLimits};
use super::llm::LlmClient;
use super::meters::{MemoryMeter, Refusal, TokenMeter};
use super::outcome::{FailKind, ResultMap, RunFailure, RunOutcome, RunReport};
use super::output::{BoundedOutput, Overflow};
use super::state::RunState;

/// What the node knows about a run, from its lease.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunContext {
    pub run_id: String,
    pub lease_id: String,
    pub agent_id: String,
    pub agent_version: String,
    /// 32 lowercase hex digits.
    pub trace_id: String,
    pub input_ref: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
}

/// A run to execute: its context, the budget it asks for, and the lease's
/// deadline if it has one.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    pub context: RunContext,
    pub budget: BudgetRequest,
    pub deadline: Option<SystemTime>,
}

/// How a run ended and what it consumed.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub outcome: RunOutcome,
    pub report: RunReport,
}

/// How long after the deadline the outer timeout waits for the epoch trap.
const BACKSTOP_GRACE: Duration = Duration::from_millis(30);

/// How much of a guest's stderr the node keeps: enough for a panic message
/// and a few lines before it.
const STDERR_CAP: usize = 64 * 1024;
/// A world agent's stdout is only for debugging.
const WORLD_STDOUT_CAP: usize = 64 * 1024;
/// How wasmtime says a host call (or a result) carried more than the
/// store's hostcall fuel allows; the error type is private.
const HOSTCALL_FUEL_EXHAUSTED: &str = "fuel allocated for hostcalls has been exhausted";

/// The longest line of a guest backtrace kept (a frame's name is the
/// agent's to choose).
const BACKTRACE_LINE_BYTES: usize = 512;
/// How much of stderr goes into a failure's one-line message.
const MESSAGE_STDERR_TAIL: usize = 300;

/// The epoch callback's verdict once the deadline has passed.
#[derive(Debug, Error)]
#[error("the run's deadline passed")]
struct DeadlineExceeded;

/// Where a wasmtime error came from.
enum Stage {
    Instantiate,
    Call,
}

/// What the guest returned, before the node judged it.
enum Returned {
    World(Result<Vec<(String, String)>, AgentError>),
    Command(Result<(), ()>),
}

pub(crate) async fn execute(
    engine: &Engine,
    metering: Metering,
    limits: &NodeLimits,
    llm: Option<&Arc<LlmClient>>,
    grants: &AgentGrants,
    agent: &Agent,
    request: RunRequest,
) -> RunResult {
    let budget = limits.budget(&request.budget);
    let started = Instant::now();
    let mut deadline = started + budget.duration();
    if let Some(lease_deadline) = request.deadline {
        match lease_deadline.duration_since(SystemTime::now()) {
            Ok(left) => deadline = deadline.min(started + left),
            Err(_) => {
                // Retryable: a new lease comes with a new deadline.
                return RunResult {
                    outcome: RunOutcome::Failed(RunFailure {
                        retryable: true,
                        ..RunFailure::new(
                            FailKind::BudgetDeadline,
                            "the lease's deadline had passed before the run started",
                        )
                    }),
                    report: RunReport::default(),
                };
            }
        }
    }

    let is_command = matches!(agent.entry, Entry::Command(_));
    let stdout = if is_command {
        BoundedOutput::new(limits.result_bytes, Overflow::Refuse)
    } else {
        BoundedOutput::new(WORLD_STDOUT_CAP, Overflow::Truncate)
    };
    let stderr = BoundedOutput::new(STDERR_CAP, Overflow::Truncate);
    // The run's whole WASI power, granted here and nowhere else: captured
    // stdio, the operator's grants for this agent as narrowed by the run's
    // metadata, and no network (every socket use and name lookup refused).
    let granted = grants.narrowed(&request.context.metadata);
    let mut wasi = WasiCtxBuilder::new();
    wasi.stdout(stdout.clone()).stderr(stderr.clone());
    if is_command {
        wasi.stdin(MemoryInputPipe::new(command_stdin(&request.context)))
            .arg(&request.context.agent_id);
    }
    wasi.allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false);
    let host_limits = HostLimits::for_results(limits.result_bytes);
    wasi.max_random_size(host_limits.random_bytes);
    for directory in &granted.directories {
        let perms = if directory.read_only {
            FsPerms::ReadOnly
        } else {
            FsPerms::ReadWrite
        };
        if let Err(err) = wasi.preopened_dir(&directory.host_path, &directory.guest_path, perms) {
            // Checked at start-up; gone or unreadable since. Another node
            // (or this one, once it is back) may run the lease.
            return RunResult {
                outcome: RunOutcome::Failed(RunFailure::handed_back(format!(
                    "the directory granted to agent `{}` at {} cannot be opened on this node \
                     ({}): {}; restore it, or remove the grant",
                    request.context.agent_id,
                    directory.guest_path,
                    directory.host_path.display(),
                    error_chain(&err)
                ))),
                report: RunReport::default(),
            };
        }
    }
    for (name, value) in granted.environment_values() {
        wasi.env(name, value);
    }
    let (table, refused_table) = RunState::tables(&host_limits);
    let mut http = WasiHttpCtx::new();
    http.set_field_size_limit(host_limits.field_bytes);
    let state = RunState {
        wasi: wasi.build(),
        table,
        refused_table,
        host_limits,
        host_refused: false,
        host_work_fuel: 0,
        http,
        egress: EgressPolicy::new(
            &granted.http_hosts,
            request
                .context
                .metadata
                .get(HTTP_ALLOW_METADATA_KEY)
                .map(String::as_str),
            &request.context.run_id,
            &request.context.trace_id,
            deadline,
            host_limits,
        ),
        memory: MemoryMeter::new(budget.memory_bytes(), limits.table_elements as usize, RUN_SHAPE),
        log: RunLog::new(limits),
        tokens: TokenMeter::new(budget.tokens()),
        llm: llm.map(|client| RunLlm::new(client, &request.context.metadata)),
        deadline,
    };
    let mut store = Store::new(engine, state);
    store.limiter(|state| &mut state.memory);
    store.set_max_component_handles(host_limits.component_handles);
    store.set_hostcall_fuel(host_limits.hostcall_bytes);
    if metering.fuel() {
        store
            .set_fuel(budget.fuel())
            .expect("the engine is configured with fuel");
    }
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |ctx| {
        if Instant::now() >= ctx.data().deadline {
            return Err(DeadlineExceeded.into());
        }
        // The host work the run caused counts against its fuel. (Compiled
        // code keeps its fuel count in a register across this callback,
        // so the debt is kept beside it rather than taken out of it.)
        let owed = ctx.data().host_work_fuel;
        if owed > 0 && metering.fuel() && owed >= ctx.get_fuel()? {
            return Err(Trap::OutOfFuel.into());
        }
        Ok(UpdateDeadline::Yield(1))
    });

    let mut instantiate_us = 0;
    let call = async {
        let began = Instant::now();
        match &agent.entry {
            Entry::World(pre) => {
                let instance = pre
                    .instantiate_async(&mut store)
                    .instrument(tracing::info_span!("instantiate"))
                    .await
                    .map_err(|e| (Stage::Instantiate, e))?;
                instantiate_us = began.elapsed().as_micros() as u64;
                let context = wit_context(&request.context);
                instance
                    .call_run(&mut store, &context)
                    .await
                    .map(Returned::World)
                    .map_err(|e| (Stage::Call, e))
            }
            Entry::Command(pre) => {
                let instance = pre
                    .instantiate_async(&mut store)
                    .instrument(tracing::info_span!("instantiate"))
                    .await
                    .map_err(|e| (Stage::Instantiate, e))?;
                instantiate_us = began.elapsed().as_micros() as u64;
                instance
                    .wasi_cli_run()
                    .call_run(&mut store)
                    .await
                    .map(Returned::Command)
                    .map_err(|e| (Stage::Call, e))
            }
        }
    };
    // The backstop fires a little after the deadline, so a computing guest
    // is stopped by its epoch trap (which leaves the store's meters
    // readable) and only a guest blocked in a host call is cut off here.
    let ended = tokio::time::timeout_at((deadline + BACKSTOP_GRACE).into(), call).await;

    let judge = Judge {
        budget: &budget,
        allowed: Duration::from_millis((deadline - started).as_millis() as u64),
        limits,
        stdout: &stdout,
        stderr: &stderr,
        state: store.data(),
    };
    let outcome = match ended {
        Err(_elapsed) => RunOutcome::Failed(judge.deadline_in_host_call()),
        Ok(Err((stage, err))) => match err.downcast_ref::<I32Exit>() {
            Some(I32Exit(0)) => judge.command_output(),
            Some(I32Exit(code)) => RunOutcome::Failed(judge.command_exit(*code)),
            None => RunOutcome::Failed(judge.error(stage, &err)),
        },
        Ok(Ok(Returned::World(Ok(pairs)))) => judge.result(pairs),
        Ok(Ok(Returned::World(Err(error)))) => RunOutcome::Failed(RunFailure {
            kind: FailKind::AgentError,
            message: error.message,
            retryable: error.retryable,
            details: judge.stderr_details(),
        }),
        Ok(Ok(Returned::Command(Ok(())))) => judge.command_output(),
        Ok(Ok(Returned::Command(Err(())))) => RunOutcome::Failed(judge.command_exit(1)),
    };
    let outcome = match judge.check_tokens(outcome) {
        RunOutcome::Failed(failure) => RunOutcome::Failed(failure.capped()),
        completed => completed,
    };
    // A failure carries stderr in its details; a completed world agent's
    // `eprintln!`s would otherwise be lost.
    if !is_command && matches!(outcome, RunOutcome::Completed(_)) {
        judge.pass_on_stderr();
    }

    // The host's share at the end, for runs that made no `wasi:http` call
    // after their last resource appeared.
    let state = store.data_mut();
    let (held, _) = host_memory::charge(&mut state.table, &state.host_limits);
    state.memory.set_host_bytes(held);
    let state = store.data();
    let report = RunReport {
        // Exact for a run that returned or ran out of fuel. For one trapped
        // at its deadline mid-loop it is a lower bound: compiled code keeps
        // fuel in a register and stores it at calls, not at every back-edge.
        fuel_consumed: (budget.fuel() - store.get_fuel().unwrap_or(0))
            .saturating_add(state.host_work_fuel)
            .min(budget.fuel()),
        peak_memory_bytes: state.memory.peak_bytes(),
        peak_host_bytes: state.memory.peak_host_bytes(),
        wall_ms: started.elapsed().as_millis() as u64,
        instantiate_us,
        tokens_in: state.tokens.tokens_in,
        tokens_out: state.tokens.tokens_out,
        usd_cost: state.tokens.usd_cost,
        log_lines: state.log.lines(),
        log_lines_dropped: state.log.dropped(),
        http_requests: state.egress.requests + state.egress.denied,
        http_denied: state.egress.denied,
    };
    RunResult { outcome, report }
}

fn wit_context(context: &RunContext) -> WitRunContext {
    let pairs = |map: &BTreeMap<String, String>| map.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>();
    WitRunContext {
        run_id: context.run_id.clone(),
        lease_id: context.lease_id.clone(),
        agent_id: context.agent_id.clone(),
        agent_version: context.agent_version.clone(),
        trace_id: context.trace_id.clone(),
        input_ref: pairs(&context.input_ref),
        metadata: pairs(&context.metadata),
    }
}

/// A command agent reads its context as one JSON object on stdin.
fn command_stdin(context: &RunContext) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "run_id": context.run_id,
        "lease_id": context.lease_id,
        "agent_id": context.agent_id,
        "agent_version": context.agent_version,
        "trace_id": context.trace_id,
        "input_ref": context.input_ref,
        "metadata": context.metadata,
    }))
    .expect("a map of strings always serialises")
}

/// Turns what happened into an outcome, with the evidence a developer
/// needs in the message and details.
struct Judge<'a> {
    budget: &'a Budget,
    /// From the start of the run to its deadline.
    allowed: Duration,
    limits: &'a NodeLimits,
    stdout: &'a BoundedOutput,
    stderr: &'a BoundedOutput,
    state: &'a RunState,
}

impl Judge<'_> {
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

    fn deadline_in_host_call(&self) -> RunFailure {
        RunFailure::new(
            FailKind::BudgetDeadline,
            format!(
                "the run did not finish within its deadline ({}); it was waiting in a host call",
                self.deadline_text()
            ),
        )
        .with_details(self.stderr_details())
    }

    fn deadline_text(&self) -> String {
        humantime::format_duration(self.allowed).to_string()
    }

    fn error(&self, stage: Stage, err: &wasmtime::Error) -> RunFailure {
        // Frame names come from the agent's name section: each line is cut.
        let backtrace = err
            .downcast_ref::<WasmBacktrace>()
            .map(|bt| {
                bt.to_string()
                    .lines()
                    .map(|line| truncate(line, BACKTRACE_LINE_BYTES))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default();
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

    /// A run that spent more tokens than its budget fails, whatever it
    /// returned. The LLM capability caps each call's completion to what
    /// remains, so the only overrun it lets happen is the prompt of the one
    /// call that crossed the budget, which is tolerated (the run ends as
    /// the agent decides, and the report shows the tokens used); anything
    /// beyond means a provider reported more than it was allowed.
    fn check_tokens(&self, outcome: RunOutcome) -> RunOutcome {
        let tokens = &self.state.tokens;
        if tokens.excess() > 0 {
            return RunOutcome::Failed(RunFailure::new(
                FailKind::BudgetTokens,
                format!(
                    "the run used {} LLM tokens, over its budget of {} (by {}; the prompt of \
                     the call that crossed the budget accounts for {})",
                    tokens.used(),
                    tokens.limit,
                    tokens.used() - tokens.limit,
                    tokens.tolerated_overrun
                ),
            ));
        }
        outcome
    }

    fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.contents()).into_owned()
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
        let mut details = String::new();
        if !backtrace.is_empty() {
            details.push_str(backtrace.trim_end());
        }
        let stderr = self.stderr_text();
        if !stderr.trim().is_empty() {
            if !details.is_empty() {
                details.push_str("\n\n");
            }
            details.push_str("stderr:\n");
            details.push_str(stderr.trim_end());
            if self.stderr.overflowed() {
                details.push_str("\n[stderr truncated]");
            }
        }
        details
    }

    /// A world agent's stderr (its `eprintln!`s) reaches the node's log,
    /// once, at the end of the run.
    fn pass_on_stderr(&self) {
        let stderr = self.stderr_text();
        let stderr = stderr.trim_end();
        if !stderr.is_empty() {
            let text = truncate(stderr, self.limits.log_line_bytes);
            tracing::info!(target: "agent", stream = "stderr", "{text}");
        }
    }
}
