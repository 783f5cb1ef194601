//! [`RunStateBuilder`]: the one place a run's power is granted.
//!
//! Every run's [`RunState`] is built here, from the node's limits, the
//! run's budget, context and deadline, and exactly the grants the caller
//! names: like `wasmtime_wasi::WasiCtxBuilder`, the default is nothing
//! beyond the clocks, random and the node's own imports. The builder's doc
//! lists what a run gets by default and what each method adds.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use thiserror::Error;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};
use wasmtime_wasi_http::WasiHttpCtx;

use super::agent::error_chain;
use super::budget::{Budget, NodeLimits};
use super::capabilities::http::{EgressPolicy, HTTP_ALLOW_METADATA_KEY, HostGrant};
use super::capabilities::llm::{LlmClient, RunLlm};
use super::capabilities::log::RunLog;
use super::engine::RUN_SHAPE;
use super::grants::DirectoryGrant;
use super::host_memory::HostLimits;
use super::meters::{MemoryMeter, TokenMeter};
use super::output::{BoundedOutput, Overflow};
use super::run::{LastReading, RunContext};
use super::state::RunState;

/// How much of a guest's stderr the node keeps: enough for a panic message
/// and a few lines before it.
const STDERR_CAP: usize = 64 * 1024;
/// A world agent's stdout is only for debugging.
const WORLD_STDOUT_CAP: usize = 64 * 1024;

/// Builds one run's [`RunState`]. By default a run gets:
///
/// - no preopened directories, no environment variables, no arguments, and
///   an empty stdin;
/// - stdout and stderr captured in memory, never the node's own: the first
///   64 KiB of each kept, the rest dropped while the guest goes on;
/// - the WASI clocks and random, each draw of random bytes capped
///   ([`HostLimits::random_bytes`]) and paid in fuel;
/// - no network sockets: `wasi:sockets` is linked, but every TCP and UDP
///   use and every name lookup is refused;
/// - no outbound HTTP: every `wasi:http` request is denied;
/// - no LLM: `llm.chat` answers `not-configured`;
/// - `log.log` within the node's log caps, and `budget.remaining`;
/// - its budget on its meters (memory, with tables and what the host holds
///   for it; LLM tokens), its deadline on its host calls, and the host's
///   ceilings ([`HostLimits`]) on the resources, handles and data it may
///   make the host hold.
///
/// Each method grants one thing more:
///
/// - [`command`](Self::command): a command agent's channels: the run's
///   context as one JSON object on stdin, the agent id as its one argument,
///   and stdout as its result, capped at the node's result cap (a write
///   past it is refused, so the run fails `budget.output`);
/// - [`directories`](Self::directories): each directory preopened under its
///   guest path, read-only or read-write;
/// - [`environment`](Self::environment): these variables, with these
///   values;
/// - [`http_hosts`](Self::http_hosts): outbound HTTP to these hosts, as
///   narrowed by the run's metadata `http.allow`;
/// - [`llm`](Self::llm): `llm.chat` through the node's provider, the model
///   defaulting to the one the run's metadata `llm.model` names.
pub(crate) struct RunStateBuilder<'a> {
    limits: &'a NodeLimits,
    budget: &'a Budget,
    context: &'a RunContext,
    deadline: Instant,
    command: bool,
    directories: Vec<DirectoryGrant>,
    environment: Vec<(String, String)>,
    http_hosts: Vec<HostGrant>,
    llm: Option<RunLlm>,
}

/// How long after a run's deadline the host's own waits for it (an LLM
/// call, an outbound HTTP request) give up. The run's timer ends a run
/// waiting in a host call at its deadline, and the run is reported from
/// its meters before the call is unwound (`run/reading.rs`); a host call
/// that returned at the deadline instead would be stopped in the call
/// hook, and unwinding there is on the report's path (milliseconds for an
/// agent that carries DWARF). These waits are backstops: a request still
/// under way when the run is unwound is dropped with it.
const HOST_WAITS_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

/// A granted directory that cannot be opened for a run: it was checked at
/// start-up, and is gone or unreadable since.
#[derive(Debug, Error)]
#[error(
    "the directory granted to agent `{agent_id}` at {guest_path} cannot be opened on this node ({}): \
     {error}; restore it, or remove the grant",
    .host_path.display()
)]
pub(crate) struct DirectoryUnavailable {
    agent_id: String,
    guest_path: String,
    host_path: PathBuf,
    error: String,
}

impl<'a> RunStateBuilder<'a> {
    /// A run of `context` within the node's `limits` and its `budget`,
    /// ending at `deadline`, granted nothing yet.
    pub(crate) fn new(limits: &'a NodeLimits, budget: &'a Budget, context: &'a RunContext, deadline: Instant) -> Self {
        RunStateBuilder {
            limits,
            budget,
            context,
            deadline,
            command: false,
            directories: Vec::new(),
            environment: Vec::new(),
            http_hosts: Vec::new(),
            llm: None,
        }
    }

    /// The run is a command agent's (`wasi:cli/run`): its context on
    /// stdin, its agent id as its argument, its result on stdout.
    pub(crate) fn command(&mut self) -> &mut Self {
        self.command = true;
        self
    }

    /// Preopens these directories.
    pub(crate) fn directories(&mut self, directories: &[DirectoryGrant]) -> &mut Self {
        self.directories.extend_from_slice(directories);
        self
    }

    /// Passes these environment variables, with these values.
    pub(crate) fn environment(&mut self, variables: impl IntoIterator<Item = (String, String)>) -> &mut Self {
        self.environment.extend(variables);
        self
    }

    /// Allows outbound HTTP to these hosts, narrowed by the run's metadata
    /// `http.allow`.
    pub(crate) fn http_hosts(&mut self, hosts: &[HostGrant]) -> &mut Self {
        self.http_hosts.extend_from_slice(hosts);
        self
    }

    /// Answers `llm.chat` through `client`.
    pub(crate) fn llm(&mut self, client: &Arc<LlmClient>) -> &mut Self {
        self.llm = Some(RunLlm::new(client, &self.context.metadata));
        self
    }

    /// The run's state. Fails only when a granted directory cannot be
    /// opened now.
    pub(crate) fn build(self) -> Result<RunState, DirectoryUnavailable> {
        let limits = self.limits;
        let context = self.context;
        let stdout = if self.command {
            BoundedOutput::new(limits.result_bytes, Overflow::Refuse)
        } else {
            BoundedOutput::new(WORLD_STDOUT_CAP, Overflow::Truncate)
        };
        let stderr = BoundedOutput::new(STDERR_CAP, Overflow::Truncate);
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(stdout.clone()).stderr(stderr.clone());
        if self.command {
            wasi.stdin(MemoryInputPipe::new(command_stdin(context)))
                .arg(&context.agent_id);
        }
        wasi.allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false);
        let host_limits = HostLimits::for_results(limits.result_bytes);
        wasi.max_random_size(host_limits.random_bytes);
        for directory in &self.directories {
            let perms = if directory.read_only {
                FsPerms::ReadOnly
            } else {
                FsPerms::ReadWrite
            };
            if let Err(err) = wasi.preopened_dir(&directory.host_path, &directory.guest_path, perms) {
                return Err(DirectoryUnavailable {
                    agent_id: context.agent_id.clone(),
                    guest_path: directory.guest_path.clone(),
                    host_path: directory.host_path.clone(),
                    error: error_chain(&err),
                });
            }
        }
        for (name, value) in &self.environment {
            wasi.env(name, value);
        }
        let (table, refused_table) = tables(&host_limits);
        let mut http = WasiHttpCtx::new();
        http.set_field_size_limit(host_limits.field_bytes);
        Ok(RunState {
            wasi: wasi.build(),
            stdout,
            stderr,
            table,
            refused_table,
            host_limits,
            host_refused: false,
            host_work_fuel: 0,
            http,
            egress: EgressPolicy::new(
                &self.http_hosts,
                context.metadata.get(HTTP_ALLOW_METADATA_KEY).map(String::as_str),
                &context.run_id,
                &context.trace_id,
                self.deadline + HOST_WAITS_GRACE,
                host_limits,
            ),
            memory: MemoryMeter::new(self.budget.memory_bytes(), limits.table_elements as usize, RUN_SHAPE),
            log: RunLog::new(limits),
            tokens: TokenMeter::new(self.budget.tokens()),
            llm: self.llm,
            deadline: self.deadline,
            host_deadline: self.deadline + HOST_WAITS_GRACE,
            slice_started: Instant::now(),
            instantiate_us: 0,
            last_reading: LastReading::default(),
        })
    }
}

/// A run's resource table, holding at most `limits.resource_entries`
/// entries, and the refused one.
fn tables(limits: &HostLimits) -> (ResourceTable, ResourceTable) {
    let mut table = ResourceTable::new();
    table.set_max_capacity(limits.resource_entries);
    let mut refused = ResourceTable::new();
    refused.set_max_capacity(0);
    (table, refused)
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
