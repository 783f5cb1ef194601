//! node-runtime: a worker node that runs business-process agents as
//! WebAssembly components, each inside its own budgets.
//!
//! # The rooms, bottom to top
//!
//! Crates of their own (cargo keeps them one way):
//! - [`support`]: the small shared things: secrets, units, backoff, PEM and
//!   TLS helpers, atomic files, file stamps, locks. Depends on nothing here.
//! - [`proto`]: the control plane's LeaseService, generated from `proto/`.
//! - [`dev_plane`]: a control plane for development and tests (REST, gRPC,
//!   run submission); it knows the wire types and `support`, nothing of the node.
//!
//! The domain, each module below the ones that use it:
//! - [`sandbox`]: the wasmtime engine, the agent world's host capabilities,
//!   the four meters (fuel, memory, wall clock, tokens) and run outcomes.
//! - [`agent_store`]: where agents come from, by id and version.
//! - [`control_plane`]: the client of the control plane (REST and gRPC), and
//!   the [`control_plane::Report`] it is owed for each lease.
//! - [`outbox`]: what the node owes the control plane, on disk (redb) across restarts.
//! - [`telemetry`]: logs, OpenTelemetry, the metrics registry, the admin endpoint.
//! - [`worker`]: a node's life: register, heartbeat, pull, run, report, drain.
//!
//! Above the domain:
//! - [`config`]: `appsettings.json` and environment variables, as .NET reads
//!   them: data and binding, nothing that runs.
//! - [`app`]: the composition root, the one place a configuration becomes
//!   running parts.
//! - [`kit`]: the agent kit behind `new`, `build` and `run-agent --watch`:
//!   templates, SDKs and the world embedded, toolchains run; it imports
//!   nothing of the node (the commands check its output with the sandbox).
//! - [`cli`]: the `node-runtime` command line.
//!
//! # The rule
//!
//! Imports go down only: `support` <- domain <- `config` <- `app` <- `cli`;
//! `kit` imports nothing of the node and only `cli` imports it.
//! Within the domain, `sandbox` imports nothing of the node; `agent_store`
//! imports `sandbox`; `outbox` imports `control_plane`; `worker` imports
//! the rest of the domain. `config` takes from the domain only the value
//! types it binds settings into (never a constructor of a running part),
//! and is imported by `app` alone; the commands reach it through `app`.
//! `scripts/check-layers` holds the table and fails CI on any import
//! against it.
//!
//! Data flows the same way: a lease comes in through the `worker`, becomes a
//! run request for the `sandbox`, which returns a classified outcome and a
//! report; the worker records it in the `outbox` and sends it to the plane.

pub mod agent_store;
pub mod app;
pub mod cli;
pub mod config;
pub mod control_plane;
#[cfg(feature = "dev")]
pub mod kit;
pub mod outbox;
pub mod sandbox;
pub mod telemetry;
pub mod worker;

/// The control plane's wire types: the `node-runtime-proto` crate.
pub use proto;

/// The development control plane behind `node-runtime dev`: the
/// `node-runtime-dev-plane` crate.
#[cfg(feature = "dev")]
pub use dev_plane;

/// The shared small things (secrets, units, backoff, TLS and PEM helpers,
/// atomic files, locks): the `node-runtime-support` crate.
pub use support;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

/// mimalloc instead of the C library's malloc, for every program built on
/// this library (the node, its tests and benches alike).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
