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
//! store's call hook, which parks the guest once its deadline has passed,
//! with its meters read. So a guest looping on synchronous host calls,
//! where fuel does not advance, is stopped too. A guest blocked in an async
//! host call never returns to the hook: the run is reported from its meters
//! as they read when it entered that call. Either way a timer at the
//! deadline finds the call pending, the run is reported (`reading.rs`), and
//! the call is unwound afterwards: unwinding is a trap, which wasmtime
//! symbolicates against the agent's DWARF, milliseconds per frame.

mod judge;
mod reading;

pub(crate) use judge::check_tokens;
pub use reading::CutOffCall;
pub(crate) use reading::LastReading;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use wasmtime::{AsContextMut, CallHook, Engine, Store, StoreContextMut, Trap, UpdateDeadline};

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
use judge::{DeadlineExceeded, Ended, Judge, Returned, Stage};
use reading::Reading;

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

/// A run's result, as soon as it is known, and the call of a run cut off
/// in a host call, still to be unwound.
#[derive(Debug)]
pub struct Reported {
    pub result: RunResult,
    pub cut_off: Option<CutOffCall>,
}

impl From<RunResult> for Reported {
    fn from(result: RunResult) -> Self {
        Reported { result, cut_off: None }
    }
}

/// A run's call, which owns its store and gives it back with how the call
/// ended.
type Calling = Pin<Box<dyn Future<Output = (Ended, Store<RunState>)> + Send>>;

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
pub(crate) async fn execute(shared: &Shared<'_>, grants: &AgentGrants, agent: &Agent, request: RunRequest) -> Reported {
    let limits = shared.limits;
    let (budget, started, deadline) = match begin(limits, &request) {
        Ok(begun) => begun,
        Err(late) => {
            return RunResult {
                outcome: RunOutcome::Failed(late),
                report: RunReport::default(),
            }
            .into();
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
            }
            .into();
        }
    };
    // What outlives the store's reach while a call waits in the host.
    let last_reading = state.last_reading.clone();
    let stderr = state.stderr.clone();
    let warnings = state.egress.warnings.clone();
    let requests = state.egress.cut_off.clone();
    let unwinding = CancellationToken::new();
    let mut store = store(shared.engine, shared.metering, &budget, state, unwinding.clone());

    let entry = agent.entry.clone();
    let context = request.context;
    let mut calling: Calling = Box::pin(async move {
        let ended = call(&mut store, &entry, &context).await;
        (ended, store)
    });
    let ended = until_deadline(deadline, calling.as_mut()).await;

    let allowed = Duration::from_millis((deadline - started).as_millis() as u64);
    let Some((ended, mut store)) = ended else {
        // Cut off, waiting in a host call or parked by the call hook: its
        // outbound requests end now; it is reported from its last reading;
        // the call is unwound by the caller.
        requests.cancel();
        let reading = last_reading.get();
        let outcome = judge::cut_off(allowed, &stderr, &reading.tokens, reading.computing);
        let report = reading.report(budget.fuel(), started.elapsed(), warnings.suppressed());
        warnings.summarise();
        return Reported {
            result: RunResult { outcome, report },
            cut_off: Some(CutOffCall {
                calling: Some(calling),
                unwinding,
                computing: reading.computing,
            }),
        };
    };
    drop(calling);
    let judge = Judge::new(&budget, allowed, limits, store.data());
    let outcome = judge.verdict(ended);
    // A failure carries stderr in its details; a completed world agent's
    // `eprintln!`s would otherwise be lost.
    if !is_command && matches!(outcome, RunOutcome::Completed(_)) {
        judge.pass_on_stderr();
    }
    let report = report(&mut store, &budget, started);
    warnings.summarise();
    RunResult { outcome, report }.into()
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

/// Runs `calling` until it ends or the run's deadline passes: `None` if
/// the deadline found it pending, waiting in a host call or parked.
///
/// The timer fires at the deadline itself, and is looked at whenever the
/// guest hands control back: at each fuel (or epoch) yield of a computing
/// guest, and while it waits in an async host call. The call is then
/// polled once more: a computing guest resumes from its yield into the
/// call hook, which parks it (its meters read, its fuel count exact, as
/// stored for the yield); one that ends in that poll has ended.
async fn until_deadline<F: Future + ?Sized>(deadline: Instant, mut calling: Pin<&mut F>) -> Option<F::Output> {
    match tokio::time::timeout_at(deadline.into(), calling.as_mut()).await {
        Ok(ended) => Some(ended),
        Err(_) => match std::future::poll_fn(|cx| Poll::Ready(calling.as_mut().poll(cx))).await {
            Poll::Ready(ended) => Some(ended),
            Poll::Pending => None,
        },
    }
}

/// A fresh store for one run: its state, its memory meter as the store's
/// limiter, the host's ceilings, the run's fuel and how often a computing
/// guest yields, and the call hook that parks the guest at its deadline
/// (until `unwinding` is cancelled) and charges it for the host work it
/// caused.
fn store(
    engine: &Engine,
    metering: Metering,
    budget: &Budget,
    state: RunState,
    unwinding: CancellationToken,
) -> Store<RunState> {
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
        // Nothing spent yet, should the run be cut off before its first
        // call into the host.
        let state = store.data();
        state.last_reading.take(state, Some(budget.fuel()));
    }
    store.call_hook_async(CallHooks { metering, unwinding });
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
    /// Cancelled once the run has been reported: a parked guest traps.
    unwinding: CancellationToken,
}

impl CallHooks {
    /// A guest past its deadline, back from the host: its meters are read
    /// whole and it waits here, so the run's timer finds its call pending
    /// and reports the run from that reading. Once the run is reported and
    /// its call unwound, it traps with the deadline (the trap's backtrace,
    /// symbolicated against the agent's DWARF, is off the report's path).
    async fn park(&self, mut ctx: StoreContextMut<'_, RunState>) -> wasmtime::Result<()> {
        if !self.unwinding.is_cancelled() {
            let reading = read(&mut ctx);
            ctx.data().last_reading.park(reading);
            self.unwinding.cancelled().await;
        }
        Err(DeadlineExceeded.into())
    }
}

#[async_trait::async_trait]
impl wasmtime::CallHookHandler<RunState> for CallHooks {
    async fn handle_call_event(&self, mut ctx: StoreContextMut<'_, RunState>, hook: CallHook) -> wasmtime::Result<()> {
        match hook {
            CallHook::CallingHost => {
                // Fuel cannot move until the call returns: if the run is
                // cut off in it, this is what it reports.
                let fuel_left = if self.metering.fuel() {
                    Some(ctx.get_fuel()?)
                } else {
                    None
                };
                let state = ctx.data();
                state.last_reading.take(state, fuel_left);
                return Ok(());
            }
            CallHook::ReturningFromHost => {}
            CallHook::CallingWasm | CallHook::ReturningFromWasm => return Ok(()),
        }
        let now = Instant::now();
        if now >= ctx.data().deadline {
            return self.park(ctx).await;
        }
        charge_host_work(&mut ctx, self.metering)?;
        if now.duration_since(ctx.data().slice_started) >= TIME_SLICE {
            // tokio's yield lets the runtime look at its timers and I/O
            // before this task runs again.
            tokio::task::yield_now().await;
            let now = Instant::now();
            ctx.data_mut().slice_started = now;
            if now >= ctx.data().deadline {
                return self.park(ctx).await;
            }
        }
        Ok(())
    }
}

/// At every return to the guest from the host (from a host call, a fuel
/// or epoch yield, or a libcall such as `memory.grow`) before its time
/// slice is looked at. Fuel does not advance while the host works, so this
/// is where a guest that loops on host calls (a megabyte of random bytes
/// at a time, say) meets its deadline (in the hook) and pays for the host
/// work it caused (here).
fn charge_host_work(ctx: &mut StoreContextMut<'_, RunState>, metering: Metering) -> wasmtime::Result<()> {
    // The host work the run caused counts against its fuel. It is kept
    // beside the store's count rather than taken out of it: compiled code
    // holds its fuel count in a register across some of these returns.
    let owed = ctx.data().host_work_fuel;
    if owed > 0 && metering.fuel() && owed >= ctx.get_fuel()? {
        return Err(Trap::OutOfFuel.into());
    }
    Ok(())
}

/// Instantiates the agent and calls its entry point. The time it took to
/// instantiate is kept as soon as the instance is made, so that a run cut
/// off during its call still reports it.
async fn call(store: &mut Store<RunState>, entry: &Entry, context: &RunContext) -> Ended {
    let began = Instant::now();
    match entry {
        Entry::World(pre) => {
            let instance = pre
                .instantiate_async(&mut *store)
                .instrument(tracing::info_span!("instantiate"))
                .await
                .map_err(|e| (Stage::Instantiate, e))?;
            store.data_mut().instantiate_us = began.elapsed().as_micros() as u64;
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
            store.data_mut().instantiate_us = began.elapsed().as_micros() as u64;
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
fn report(store: &mut Store<RunState>, budget: &Budget, started: Instant) -> RunReport {
    let reading = read(&mut *store);
    reading.report(
        budget.fuel(),
        started.elapsed(),
        store.data().egress.warnings.suppressed(),
    )
}

/// Every meter of a run whose store is at hand: at its end, or parked at
/// its deadline.
fn read(mut store: impl AsContextMut<Data = RunState>) -> Reading {
    let mut store = store.as_context_mut();
    // The host's share now, for runs that made no `wasi:http` call after
    // their last resource appeared.
    let state = store.data_mut();
    let (held, _) = host_memory::charge(&mut state.table, &state.host_limits);
    state.memory.set_host_bytes(held);
    let fuel_left = store.get_fuel().ok();
    Reading::of(store.data(), fuel_left)
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
