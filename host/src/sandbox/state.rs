//! The host state of one run: everything a `Store` owns.
//!
//! A fresh [`RunState`] is built for every run, so nothing an agent does
//! outlives it. Its fields are the run's grants (a WASI context with only
//! the directories and variables granted to the agent, an HTTP egress
//! policy) and its meters (memory, log
//! volume, tokens), and what it needs to call the LLM. The host capabilities in `capabilities/` are trait
//! impls on this struct, grouped by WIT interface.

use std::time::Instant;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::capabilities::http::EgressPolicy;
use super::capabilities::llm::RunLlm;
use super::capabilities::log::RunLog;
use super::meters::{MemoryMeter, TokenMeter};

pub struct RunState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
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
}

impl WasiView for RunState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for RunState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.egress,
        }
    }
}
