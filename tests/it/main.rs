//! The end-to-end suites, one module each, in one test binary: every
//! integration-test binary links all of wasmtime, so one binary builds in
//! a fraction of the time many take. Suites that measure their own
//! process (`tests/hostile_memory.rs`, `tests/resident_memory.rs`) and
//! those that install the process's log subscriber (`tests/logs/`) have
//! binaries of their own.
//!
//! Run one suite with its module as the filter: `cargo test --test it
//! sandbox::`.

#[path = "../support/certs.rs"]
mod certs;
#[path = "../hostile_set/mod.rs"]
mod hostile_set;
#[path = "../support/otlp.rs"]
mod otlp;
#[path = "../support/mod.rs"]
mod support;

/// Agents from HTTP and digest pins, through the real node.
mod agent_store;
/// The plane or the node killed and restarted under load; reports the
/// plane refuses for their size.
mod chaos;
/// The binary as a developer drives it: flags, output, exit codes, config.
mod cli;
/// The on-disk compiled cache.
mod compiled_cache;
/// The daemon against the dev plane: registration, slots, reports, drain.
mod daemon;
/// Declarative agents: definitions from the agent API run by a node.
mod declarative;
/// The development control plane, as nodes and developers use it.
mod dev_plane;
/// The outbox on a full filesystem, and damaged outbox files.
mod disk_faults;
/// Pulley and `compile --target`.
mod edge;
/// Outbound HTTP allow-lists and trace context.
mod egress;
/// Reports, restarts and upgrades on a disk that fills, across node lives.
mod full_disk;
/// Agents that attack the node (the set is in `tests/hostile_set/`).
mod hostile;
/// The invoice classifier in Rust, Python and JavaScript.
mod invoices;
/// The agent kit: `new`, `build`, `run-agent --watch`, in each language.
mod kit;
/// What the node prints: one line per event, no credential, no header.
mod log_lines;
/// Agents in a real OCI registry.
mod oci;
/// The deployment recipes in `deploy/`.
mod packaging;
/// Restart safety and the durable outbox.
mod restart;
/// The sandbox as a library: every way a run can end.
mod sandbox;
/// 10,000 runs through plane restarts and node kills (opt-in: scripts/soak).
mod soak;
/// OTLP, the admin endpoint, log formats, the dashboard.
mod telemetry;
/// Mutual TLS between the node and a control plane.
mod tls;
/// Tool calling and structured output: the agent world 0.2.0.
mod tools;
/// The LeaseService wire format against the contract.
mod wire_format;
