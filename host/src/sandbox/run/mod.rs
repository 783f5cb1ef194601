//! One run, start to finish: its deadline, a fresh store with its meters,
//! the call, and the report of what the meters read.
//!
//! The run's state (its WASI context, its capabilities' per-run parts, its
//! meters) is built by `RunStateBuilder` (`sandbox/state_builder.rs`), the
//! one place a run's power is granted; how the run ended is classified by
//! the judge (`judge.rs`).
//!
//! The wall clock is enforced where the guest comes back to the host. A
//! computing guest yields to the async runtime every
//! [`fuel_per_yield`](super::engine::fuel_per_yield) units of fuel (an
//! engine without fuel: every epoch tick). A yield is a call into the host
//! (a libcall), and every return from the host to the guest passes the
//! store's call hook, which traps the guest once its deadline has passed.
//! So a guest looping on synchronous host calls, where fuel does not
//! advance, is stopped too. A guest blocked in an async host call never
//! returns to the hook: a timer at the deadline ends it there.

mod judge;

pub(crate) use judge::check_tokens;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use tokio::time::error::Elapsed;
use tracing::Instrument;
use wasmtime::{CallHook, Engine, Store, StoreContextMut, Trap, UpdateDeadline};

use super::agent::{Agent, Entry};
use super::bindings::types::RunContext as WitRunContext;
use super::budget::{Budget, BudgetRequest, NodeLimits};
use super::capabilities::log::HostWarnings;
use super::engine::{Metering, fuel_per_yield};
use super::grants::AgentGrants;
use super::host_memory;
use super::llm::LlmClient;
use super::outcome::{FailKind, RunFailure, RunOutcome, RunReport};
use super::state::RunState;
use super::state_builder::RunStateBuilder;
use judge::{DeadlineExceeded, Judge, Returned, Stage};

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

/// What every run of one sandbox shares: the engine and how it meters
/// guests, the node's limits, and the LLM client (`None`: no LLM
/// configured).
pub(crate) struct Shared<'a> {
    pub engine: &'a Engine,
    pub metering: Metering,
    pub limits: &'a NodeLimits,
    pub llm: Option<&'a Arc<LlmClient>>,
}

/// Runs `agent` once for `request`, granted `grants` (its agent id's, as
/// checked at start-up).
pub(crate) async fn execute(
    shared: &Shared<'_>,
    grants: &AgentGrants,
    agent: &Agent,
    request: RunRequest,
) -> RunResult {
    let limits = shared.limits;
    let (budget, started, deadline) = match begin(limits, &request) {
        Ok(begun) => begun,
        Err(late) => {
            return RunResult {
                outcome: RunOutcome::Failed(late),
                report: RunReport::default(),
            };
        }
    };

    let is_command = matches!(agent.entry, Entry::Command(_));
    // The run's whole power, granted here and nowhere else: captured
    // stdio, the operator's grants for this agent as narrowed by the run's
    // metadata, and no network (every socket use and name lookup refused).
    let narrowing = HostWarnings::default();
    let granted = grants.narrowed(&request.context.metadata, &narrowing);
    let mut builder = RunStateBuilder::new(limits, &budget, &request.context, deadline);
    if is_command {
        builder.command();
    }
    builder
        .directories(&granted.directories)
        .environment(granted.environment_values())
        .http_hosts(&granted.http_hosts);
    if let Some(client) = shared.llm {
        builder.llm(client);
    }
    let state = match builder.build() {
        Ok(state) => {
            state.egress.warnings.add(&narrowing);
            state
        }
        Err(unavailable) => {
            narrowing.summarise();
            // Checked at start-up; gone or unreadable since. Another node
            // (or this one, once it is back) may run the lease.
            return RunResult {
                outcome: RunOutcome::Failed(RunFailure::handed_back(unavailable.to_string())),
                report: RunReport::default(),
            };
        }
    };
    let mut store = store(shared.engine, shared.metering, &budget, state);

    let mut instantiate_us = 0;
    let ended = until_deadline(deadline, call(&mut store, agent, &request.context, &mut instantiate_us)).await;

    let allowed = Duration::from_millis((deadline - started).as_millis() as u64);
    let judge = Judge::new(&budget, allowed, limits, store.data());
    let outcome = judge.verdict(ended);
    // A failure carries stderr in its details; a completed world agent's
    // `eprintln!`s would otherwise be lost.
    if !is_command && matches!(outcome, RunOutcome::Completed(_)) {
        judge.pass_on_stderr();
    }
    let report = report(&mut store, &budget, started, instantiate_us);
    store.data().egress.warnings.summarise();
    RunResult { outcome, report }
}

/// The run's budget, when it starts, and when it must end: its duration
/// budget or the lease's deadline, whichever comes first. A lease already
/// past its deadline is not started (retryable: a new lease comes with a
/// new deadline).
pub(crate) fn begin(limits: &NodeLimits, request: &RunRequest) -> Result<(Budget, Instant, Instant), RunFailure> {
    let budget = limits.budget(&request.budget);
    let started = Instant::now();
    let mut deadline = started + budget.duration();
    if let Some(lease_deadline) = request.deadline {
        match lease_deadline.duration_since(SystemTime::now()) {
            Ok(left) => deadline = deadline.min(started + left),
            Err(_) => {
                return Err(RunFailure {
                    retryable: true,
                    ..RunFailure::new(
                        FailKind::BudgetDeadline,
                        "the lease's deadline had passed before the run started",
                    )
                });
            }
        }
    }
    Ok((budget, started, deadline))
}

/// Runs `calling` until it ends or the run's deadline passes.
///
/// The timer fires at the deadline itself, and is looked at whenever the
/// guest hands control back: at each fuel (or epoch) yield of a computing
/// guest, and while it waits in an async host call. The call is then
/// polled once more to tell the two apart: a computing guest resumes from
/// its yield into the call hook, which traps it with the deadline at once
/// (its fuel count exact, as stored for the yield); a guest still pending
/// is waiting in a host call, and is cut off here.
async fn until_deadline<T>(deadline: Instant, calling: impl Future<Output = T>) -> Result<T, Elapsed> {
    let mut calling = std::pin::pin!(calling);
    match tokio::time::timeout_at(deadline.into(), calling.as_mut()).await {
        Ok(ended) => Ok(ended),
        Err(elapsed) => match std::future::poll_fn(|cx| Poll::Ready(calling.as_mut().poll(cx))).await {
            Poll::Ready(ended) => Ok(ended),
            Poll::Pending => Err(elapsed),
        },
    }
}

/// A fresh store for one run: its state, its memory meter as the store's
/// limiter, the host's ceilings, the run's fuel and how often a computing
/// guest yields, and the call hook that ends the run at its deadline and
/// charges it for the host work it caused.
fn store(engine: &Engine, metering: Metering, budget: &Budget, state: RunState) -> Store<RunState> {
    let host_limits = state.host_limits;
    let mut store = Store::new(engine, state);
    store.limiter(|state| &mut state.memory);
    store.set_max_component_handles(host_limits.component_handles);
    store.set_hostcall_fuel(host_limits.hostcall_bytes);
    if metering.fuel() {
        store
            .set_fuel(budget.fuel())
            .expect("the engine is configured with fuel");
        store
            .fuel_async_yield_interval(Some(fuel_per_yield(engine)))
            .expect("the engine is configured with fuel and async support");
    }
    store.call_hook_async(CallHooks { metering });
    if metering.epochs() {
        // The epoch callback is itself a call into the host: the call hook
        // checks the deadline when it returns.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|_| Ok(UpdateDeadline::Yield(1)));
    }
    store
}

/// The longest a guest keeps its thread between two host calls' returns
/// without giving it back. A computing guest yields every
/// [`fuel_per_yield`] units of fuel (a fraction of a millisecond); a guest
/// looping on synchronous host calls barely advances fuel, and without
/// this would hold a runtime thread, and every task queued on it (other
/// runs' timers, heartbeats, the admin endpoint), until its deadline.
const TIME_SLICE: Duration = Duration::from_millis(2);

/// The store's call hook: checks at every return to the guest, and a
/// yield to the async runtime when the guest has held its thread for a
/// time slice.
struct CallHooks {
    metering: Metering,
}

#[async_trait::async_trait]
impl wasmtime::CallHookHandler<RunState> for CallHooks {
    async fn handle_call_event(&self, mut ctx: StoreContextMut<'_, RunState>, hook: CallHook) -> wasmtime::Result<()> {
        if !matches!(hook, CallHook::ReturningFromHost) {
            return Ok(());
        }
        let now = back_from_host(&mut ctx, self.metering)?;
        if now.duration_since(ctx.data().slice_started) >= TIME_SLICE {
            // tokio's yield lets the runtime look at its timers and I/O
            // before this task runs again.
            tokio::task::yield_now().await;
            let now = Instant::now();
            ctx.data_mut().slice_started = now;
            if now >= ctx.data().deadline {
                return Err(DeadlineExceeded.into());
            }
        }
        Ok(())
    }
}

/// Every return to the guest from the host: from a host call, a fuel or
/// epoch yield, or a libcall such as `memory.grow`. Fuel does not advance
/// while the host works, so this is where a guest that loops on host calls
/// (a megabyte of random bytes at a time, say) meets its deadline and pays
/// for the host work it caused. Returns the time it looked at.
fn back_from_host(ctx: &mut StoreContextMut<'_, RunState>, metering: Metering) -> wasmtime::Result<Instant> {
    let now = Instant::now();
    if now >= ctx.data().deadline {
        return Err(DeadlineExceeded.into());
    }
    // The host work the run caused counts against its fuel. It is kept
    // beside the store's count rather than taken out of it: compiled code
    // holds its fuel count in a register across some of these returns.
    let owed = ctx.data().host_work_fuel;
    if owed > 0 && metering.fuel() && owed >= ctx.get_fuel()? {
        return Err(Trap::OutOfFuel.into());
    }
    Ok(now)
}

/// Instantiates the agent and calls its entry point. `instantiate_us` is
/// set as soon as the instance is made, so that a run cut off during its
/// call still reports it.
async fn call(
    store: &mut Store<RunState>,
    agent: &Agent,
    context: &RunContext,
    instantiate_us: &mut u64,
) -> Result<Returned, (Stage, wasmtime::Error)> {
    let began = Instant::now();
    match &agent.entry {
        Entry::World(pre) => {
            let instance = pre
                .instantiate_async(&mut *store)
                .instrument(tracing::info_span!("instantiate"))
                .await
                .map_err(|e| (Stage::Instantiate, e))?;
            *instantiate_us = began.elapsed().as_micros() as u64;
            let context = wit_context(context);
            instance
                .call_run(&mut *store, &context)
                .await
                .map(Returned::World)
                .map_err(|e| (Stage::Call, e))
        }
        Entry::Command(pre) => {
            let instance = pre
                .instantiate_async(&mut *store)
                .instrument(tracing::info_span!("instantiate"))
                .await
                .map_err(|e| (Stage::Instantiate, e))?;
            *instantiate_us = began.elapsed().as_micros() as u64;
            instance
                .wasi_cli_run()
                .call_run(&mut *store)
                .await
                .map(Returned::Command)
                .map_err(|e| (Stage::Call, e))
        }
    }
}

/// What the run's meters read at its end.
fn report(store: &mut Store<RunState>, budget: &Budget, started: Instant, instantiate_us: u64) -> RunReport {
    // The host's share at the end, for runs that made no `wasi:http` call
    // after their last resource appeared.
    let state = store.data_mut();
    let (held, _) = host_memory::charge(&mut state.table, &state.host_limits);
    state.memory.set_host_bytes(held);
    let state = store.data();
    RunReport {
        // Exact for a run that returned, ran out of fuel, or was stopped
        // at its deadline by the call hook or in a host call: compiled code
        // stores its fuel count before every call out of the guest, fuel
        // yields included. (Under epochs only there is no fuel to report.)
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
        host_warnings_suppressed: state.egress.warnings.suppressed(),
    }
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
