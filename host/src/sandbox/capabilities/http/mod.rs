//! The HTTP capability: outbound HTTP (`wasi:http/outgoing-handler`),
//! denied unless the host is granted. Everything about it is here:
//!
//! - its setting (`grant.rs`): the [`HostGrant`]s the operator gives an
//!   agent id (`SandboxConfig.allowed_hosts` and `grants`), and the run
//!   metadata key `http.allow` that narrows them;
//! - its per-run part (`egress.rs`): the run's [`EgressPolicy`], which
//!   decides what the run may reach, counts its requests and keeps the
//!   count of those in flight;
//! - the outgoing handler (`outgoing.rs`): how an allowed request is sent,
//!   traced, bounded by the run's deadline and its response capped at
//!   [`HTTP_RESPONSE_BYTES`];
//! - the linking ([`add_to_linker`]) and the run state's `WasiHttpView`.
//!
//! What the host buffers for a run's requests is bounded too: at most
//! [`HostLimits::http_in_flight`] requests at once, and each outgoing
//! body's buffer to [`HostLimits::body_chunk_bytes`] times its chunks (see
//! `sandbox/host_memory.rs`). There is no shared part: wasmtime-wasi-http's
//! default sender makes a connection per request.
//!
//! Every `wasi:http` call first charges the run for what its resource table
//! holds (`host_memory::audit`); once that is over the run's memory
//! budget, the calls are served from an empty table that holds and accepts
//! nothing, so each one traps and the run ends `budget.memory`.
//!
//! [`HostLimits::http_in_flight`]: crate::sandbox::HostLimits::http_in_flight
//! [`HostLimits::body_chunk_bytes`]: crate::sandbox::HostLimits::body_chunk_bytes

mod egress;
mod grant;
mod outgoing;

use wasmtime::component::Linker;
use wasmtime_wasi_http::{WasiHttpCtxView, WasiHttpView};

use crate::sandbox::host_memory;
use crate::sandbox::state::RunState;

pub use egress::EgressPolicy;
pub use grant::{HTTP_ALLOW_METADATA_KEY, HostGrant, InvalidHostGrant};
pub use outgoing::HTTP_RESPONSE_BYTES;
/// For the fuzzers, which take request URIs apart as the handler does.
#[cfg(feature = "fuzzing")]
pub(crate) use outgoing::destination;

/// Offers `wasi:http` (only: the rest of WASI is linked by
/// `capabilities::linker`). Its grants come from each run's [`EgressPolicy`].
pub(crate) fn add_to_linker(linker: &mut Linker<RunState>) -> wasmtime::Result<()> {
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(linker)
}

impl WasiHttpView for RunState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        if !self.host_refused {
            let (within, walked) = host_memory::audit(&mut self.table, &self.host_limits, &mut self.memory);
            self.host_refused = !within;
            self.host_work_fuel += walked * host_memory::FUEL_PER_ENTRY;
        }
        let table = if self.host_refused {
            &mut self.refused_table
        } else {
            &mut self.table
        };
        WasiHttpCtxView {
            ctx: &mut self.http,
            table,
            hooks: &mut self.egress,
        }
    }
}
