//! The sandbox: runs one agent, once, inside budgets.
//!
//! [`Sandbox`] owns the process's wasmtime engine, the linker with the host
//! capabilities, and the compiled agents (one per content hash). A run gets
//! a fresh `Store`, so nothing leaks between runs, and ends in a classified
//! [`RunOutcome`] with a [`RunReport`] of what its four meters read: fuel
//! (CPU), memory, wall clock and LLM tokens. The LLM provider behind
//! `llm.chat` is configured with [`LlmSettings`] (`llm`).

mod agent;
mod bindings;
pub mod budget;
pub(crate) mod capabilities;
pub mod engine;
pub mod llm;
mod meters;
pub mod outcome;
mod output;
pub mod precompiled;
mod run;
mod state;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use thiserror::Error;
use tracing::Instrument;
use wasmtime::Engine;
use wasmtime::component::Linker;

pub use agent::{Agent, InvalidAgent};
pub use budget::{Budget, BudgetRequest, NodeLimits};
pub use engine::{Allocator, AllocatorChoice, EngineSettings};
pub use llm::{LlmEndpoint, LlmSettings, ModelPrice};
pub use outcome::{FailKind, ResultMap, RunFailure, RunOutcome, RunReport};
pub use run::{RunContext, RunRequest, RunResult};
pub use capabilities::http::{
    HTTP_ALLOW_METADATA_KEY, HTTP_RESPONSE_BYTES, HostGrant, InvalidHostGrant,
};

use state::RunState;

/// Everything that shapes a sandbox.
#[derive(Debug, Clone, Default)]
pub struct SandboxConfig {
    pub limits: NodeLimits,
    pub engine: EngineSettings,
    /// The LLM provider behind `llm.chat`; `None` answers `not-configured`.
    pub llm: Option<LlmSettings>,
    /// Outbound HTTP grants: agent id -> the hosts (`host` or `host:port`)
    /// its runs may reach. An agent not listed reaches nothing.
    pub allowed_hosts: std::collections::BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("could not start the WebAssembly engine: {0}")]
    Engine(String),
    #[error(transparent)]
    Llm(#[from] llm::LlmClientError),
    /// An entry of `SandboxConfig.allowed_hosts` is not `host` or
    /// `host:port`.
    #[error("outbound HTTP grant for agent `{agent_id}`: {error}")]
    AllowedHost {
        agent_id: String,
        error: InvalidHostGrant,
    },
}

/// The process's one WebAssembly engine and the agents compiled for it.
pub struct Sandbox {
    engine: Engine,
    allocator: Allocator,
    linker: Linker<RunState>,
    limits: NodeLimits,
    /// One HTTP client for every run's LLM calls (connections are pooled).
    llm: Option<Arc<llm::LlmClient>>,
    /// Outbound HTTP grants by agent id, parsed from
    /// `SandboxConfig.allowed_hosts`.
    allowed_hosts: BTreeMap<String, Vec<HostGrant>>,
    /// Compiled and linked agents by SHA-256 of their artifact.
    agents: Mutex<HashMap<[u8; 32], Arc<Agent>>>,
    /// Loads served from `agents`, and loads that compiled.
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
}

impl Sandbox {
    /// Builds the engine and starts its epoch ticker. Call once per
    /// process.
    pub fn new(config: SandboxConfig) -> Result<Self, SandboxError> {
        let fail = |err: wasmtime::Error| SandboxError::Engine(agent::error_chain(&err));
        let allowed_hosts = config
            .allowed_hosts
            .iter()
            .map(|(agent_id, entries)| {
                capabilities::http::parse_grants(entries)
                    .map(|grants| (agent_id.clone(), grants))
                    .map_err(|error| SandboxError::AllowedHost {
                        agent_id: agent_id.clone(),
                        error,
                    })
            })
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        let (engine, allocator) = engine::build_engine(&config.engine, &config.limits).map_err(fail)?;
        let linker = capabilities::linker(&engine).map_err(fail)?;
        let llm = config
            .llm
            .map(llm::LlmClient::new)
            .transpose()?
            .map(Arc::new);
        engine::start_epoch_ticker(&engine, config.engine.epoch_tick);
        Ok(Sandbox {
            engine,
            allocator,
            linker,
            limits: config.limits,
            llm,
            allowed_hosts,
            agents: Mutex::default(),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
        })
    }

    pub fn allocator(&self) -> &Allocator {
        &self.allocator
    }

    /// Agent loads served by the compiled-component cache, and loads that
    /// compiled (or tried to).
    pub fn compile_cache_stats(&self) -> (u64, u64) {
        (
            self.cache_hits.load(Ordering::Relaxed),
            self.cache_misses.load(Ordering::Relaxed),
        )
    }

    pub fn limits(&self) -> &NodeLimits {
        &self.limits
    }

    /// The outbound HTTP grants of `agent_id` (empty: it reaches nothing).
    pub fn allowed_hosts(&self, agent_id: &str) -> &[HostGrant] {
        self.allowed_hosts.get(agent_id).map_or(&[], Vec::as_slice)
    }

    /// Compiles, checks and links an artifact (`.wasm` component or
    /// `.cwasm`), or returns the one already loaded with the same bytes.
    /// Compilation runs on a blocking thread.
    pub async fn load(&self, bytes: Arc<[u8]>) -> Result<Arc<Agent>, InvalidAgent> {
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        if let Some(agent) = self.cached(&digest) {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(agent);
        }
        self.cache_misses.fetch_add(1, Ordering::Relaxed);
        let engine = self.engine.clone();
        let linker = self.linker.clone();
        let agent = tokio::task::spawn_blocking(move || {
            let component = agent::compile(&engine, &bytes)?;
            agent::link(&engine, &linker, &component, hex::encode(digest))
        })
        .await
        .map_err(|err| InvalidAgent(format!("compiling the agent panicked: {err}")))??;
        let agent = Arc::new(agent);
        self.agents
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(digest, agent.clone());
        Ok(agent)
    }

    fn cached(&self, digest: &[u8; 32]) -> Option<Arc<Agent>> {
        self.agents
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(digest)
            .cloned()
    }

    /// Compiles a `.wasm` component ahead of time into a sealed `.cwasm`
    /// that this engine configuration (and only a compatible one) loads.
    /// The component is linked first, so an agent that could never run
    /// here is refused now rather than on the edge device.
    pub fn precompile(&self, wasm: &[u8]) -> Result<Vec<u8>, InvalidAgent> {
        if precompiled::is_precompiled(wasm) {
            return Err(InvalidAgent("the file is already a precompiled .cwasm".into()));
        }
        let component = agent::compile(&self.engine, wasm)?;
        agent::link(&self.engine, &self.linker, &component, String::new())?;
        let artifact = component.serialize().map_err(|err| {
            InvalidAgent(format!(
                "could not serialise the component: {}",
                agent::error_chain(&err)
            ))
        })?;
        Ok(precompiled::seal(artifact))
    }

    /// Runs `agent` once in a fresh store. Never panics on guest behaviour:
    /// every way a run can end is a [`RunOutcome`].
    pub async fn run(&self, agent: &Agent, request: RunRequest) -> RunResult {
        // The caller's span carries the run's ids (the worker's `lease`,
        // run-agent's `run`); this one times the sandbox's part, and the
        // instantiation, LLM and HTTP spans nest in it.
        let span = tracing::info_span!("execute", "agent.id" = %request.context.agent_id);
        let grants = self.allowed_hosts(&request.context.agent_id);
        run::execute(&self.engine, &self.limits, self.llm.as_ref(), grants, agent, request)
            .instrument(span)
            .await
    }
}
