//! node-runtime: a worker node that runs business-process agents as
//! WebAssembly components, each inside its own budgets.
//!
//! Data flows one way: a run request goes into the [`sandbox`], which
//! executes the agent and returns a classified outcome and a report.
//!
//! - [`config`]: `appsettings.json` and environment variables, as .NET reads them.
//! - [`sandbox`]: the wasmtime engine, the agent world's host capabilities,
//!   the four meters (fuel, memory, wall clock, tokens) and run outcomes.
//! - [`agent_store`]: where agents come from, by id and version.
//! - [`proto`]: the control plane's LeaseService, generated from `proto/`.
//! - [`control_plane`]: the client of the control plane (REST and gRPC).
//! - [`worker`]: a node's life: register, heartbeat, pull, run, report, drain.
//! - [`outbox`]: what the node owes the control plane, on disk (redb) across restarts.
//! - [`telemetry`]: logs, OpenTelemetry, the metrics registry, the admin endpoint.
//! - [`dev_plane`]: a control plane for development and tests (REST, gRPC, run submission).
//! - [`cli`]: the `node-runtime` command line.

pub mod agent_store;
pub mod cli;
pub mod config;
pub mod control_plane;
pub mod dev_plane;
pub mod outbox;
pub mod proto;
pub mod sandbox;
pub mod telemetry;
pub mod worker;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

/// mimalloc instead of the C library's malloc, for every program built on
/// this library (the node, its tests and benches alike).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
