//! The host state of one run: everything a `Store` owns.
//!
//! A fresh [`RunState`] is built for every run, by `RunStateBuilder`
//! (`state_builder.rs`), so nothing an agent does outlives it. Its fields
//! are the run's grants (a WASI context with only the directories and
//! variables granted to the agent, an HTTP egress policy), its captured
//! stdout and stderr, its meters (memory, log volume, tokens), and what it
//! needs to call the LLM. The host capabilities in `capabilities/` are
//! trait impls on this struct, grouped by WIT interface (`wasi:http`'s
//! view of it, which charges the run for what its resource table holds, is
//! in `capabilities/http/`).

use std::time::Instant;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::WasiHttpCtx;

use super::capabilities::http::EgressPolicy;
use super::capabilities::llm::RunLlm;
use super::capabilities::log::RunLog;
use super::host_memory::HostLimits;
use super::meters::{MemoryMeter, TokenMeter};
use super::output::BoundedOutput;
use super::run::LastReading;

pub struct RunState {
    pub(crate) wasi: WasiCtx,
    /// The guest's stdout and stderr as captured (its WASI context writes
    /// into clones of these).
    pub(crate) stdout: BoundedOutput,
    pub(crate) stderr: BoundedOutput,
    pub(crate) table: ResourceTable,
    /// Served to `wasi:http` calls instead of `table` once the run is over
    /// its memory budget: empty, and full at no entries.
    pub(crate) refused_table: ResourceTable,
    pub(crate) host_limits: HostLimits,
    /// Set once the host's share took the run over its memory budget.
    pub(crate) host_refused: bool,
    /// Fuel the run has spent on host work it caused (walking its
    /// resources, taking apart its log fields): counted against its fuel
    /// at each epoch tick, and in its report.
    pub(crate) host_work_fuel: u64,
    pub(crate) http: WasiHttpCtx,
    pub(crate) egress: EgressPolicy,
    pub(crate) memory: MemoryMeter,
    pub(crate) log: RunLog,
    pub(crate) tokens: TokenMeter,
    /// The node's LLM provider and this run's model; `None` when the node
    /// has no LLM configured (`llm.chat` answers `not-configured`).
    pub(crate) llm: Option<RunLlm>,
    /// When the run must end: its duration budget or the lease deadline.
    pub(crate) deadline: Instant,
    /// When the host's own waits for the run (an LLM call, an outbound
    /// HTTP request) give up: a little after `deadline`, so that the run's
    /// timer, not a host call returning, ends a run that waits.
    pub(crate) host_deadline: Instant,
    /// When the guest last gave its thread back (or started): a guest
    /// looping on host calls, where fuel does not advance, is made to
    /// yield once this is a time slice ago (`run::back_from_host`).
    pub(crate) slice_started: Instant,
    /// Time to instantiate the component, once it is instantiated.
    pub(crate) instantiate_us: u64,
    /// The meters as read when the guest last called into the host: what
    /// the run reports if it is cut off at its deadline in that call.
    pub(crate) last_reading: LastReading,
}

impl WasiView for RunState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}
