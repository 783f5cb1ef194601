//! The sandbox: runs one agent, once, inside budgets.
//!
//! [`Sandbox`] owns the process's wasmtime engine, the linker with the host
//! capabilities, and the compiled agents (one per content hash). A run gets
//! a fresh `Store`, so nothing leaks between runs, and ends in a classified
//! [`RunOutcome`] with a [`RunReport`] of what its four meters read: fuel
//! (CPU), memory, wall clock and LLM tokens. The LLM provider behind
//! `llm.chat` is configured with [`LlmSettings`] (`llm`); what each agent
//! may reach beyond clocks and random (directories, environment variables,
//! HTTP hosts) with [`Grants`] per agent id (`grants`).

mod agent;
pub mod artifact_trust;
pub mod backtrace;
mod bindings;
pub mod budget;
pub(crate) mod capabilities;
pub mod compile_limits;
pub mod compiled_cache;
pub mod declarative;
pub mod engine;
pub mod grants;
pub mod host_memory;
mod meters;
pub mod outcome;
mod output;
pub mod precompiled;
mod run;
pub mod signature;
mod state;
mod state_builder;
#[cfg(feature = "guest-symbols")]
pub mod symbols;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use support::sync::lock;

use sha2::{Digest, Sha256};
use thiserror::Error;
use tracing::Instrument;
use wasmtime::Engine;
use wasmtime::component::Linker;

pub use agent::{Agent, InvalidAgent};
pub(crate) use agent::{ELF_MAGIC, WASM_MAGIC};
pub use artifact_trust::{ArtifactTrust, NetworkArtifactRefused, NotAComponent};
pub use budget::{Budget, BudgetRequest, NodeLimits};
pub use capabilities::http::{HTTP_ALLOW_METADATA_KEY, HTTP_RESPONSE_BYTES, HostGrant, InvalidHostGrant};
/// The LLM capability's settings and shared client, where they have always
/// been named (`sandbox::llm::ModelPrice`).
pub use capabilities::llm;
pub use capabilities::log::HOST_WARNINGS_PER_KIND;
pub use compile_limits::CompileLimits;
pub use compiled_cache::{CompileCounts, CompiledCacheSettings};
pub use engine::{
    Allocator, AllocatorChoice, EngineSettings, Execution, Metering, PRECOMPILE_TARGETS, UnsupportedTarget,
};
pub use grants::{
    AgentGrants, DirectoryGrant, ENV_ALLOW_METADATA_KEY, FS_ALLOW_METADATA_KEY, Grants, InvalidGrant, OverlappingGrants,
};
pub use host_memory::HostLimits;
pub use llm::{LlmEndpoint, LlmSettings, ModelPrice};
pub use outcome::{FailKind, ResultMap, RunFailure, RunOutcome, RunReport};
pub use run::{CutOffCall, Reported, RunContext, RunRequest, RunResult};

use artifact_trust::ArtifactKind;
use state::RunState;

/// Everything that shapes a sandbox.
#[derive(Debug, Clone, Default)]
pub struct SandboxConfig {
    pub limits: NodeLimits,
    pub engine: EngineSettings,
    /// The LLM provider behind `llm.chat`; `None` answers `not-configured`.
    pub llm: Option<LlmSettings>,
    /// Outbound HTTP grants: agent id -> the hosts (`host` or `host:port`)
    /// its runs may reach. An agent not listed reaches nothing. The older,
    /// HTTP-only form of `grants`: both are merged per agent.
    pub allowed_hosts: std::collections::BTreeMap<String, Vec<String>>,
    /// Where compiled components are kept across restarts; `None` keeps
    /// them in memory only.
    pub compiled_cache: Option<CompiledCacheSettings>,
    /// How much code one component may bring to be compiled.
    pub compile_limits: CompileLimits,
    /// What each agent id may reach beyond clocks and random: directories,
    /// environment variables, HTTP hosts. An agent not listed gets none.
    pub grants: BTreeMap<String, Grants>,
    /// What declarative agents may use beyond their agent id's grants:
    /// output hosts for all of them, and the operator's secrets.
    pub declarative: declarative::DeclarativeSettings,
    /// Keys whose signature makes a `.cwasm` from a network source
    /// loadable; empty: none is.
    pub trusted_keys: signature::TrustedKeys,
}

#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("could not start the WebAssembly engine: {0}")]
    Engine(String),
    #[error(transparent)]
    Llm(#[from] llm::LlmClientError),
    #[error("cannot use the compiled cache at {}: {source}; make it writable or point it elsewhere", .path.display())]
    CompiledCache {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// An entry of `SandboxConfig.allowed_hosts` is not `host` or
    /// `host:port`.
    #[error("outbound HTTP grant for agent `{agent_id}`: {error}")]
    AllowedHost { agent_id: String, error: InvalidHostGrant },
    /// A grant in `SandboxConfig.grants` cannot be given.
    #[error("sandbox grant for agent `{agent_id}`: {error}")]
    Grant { agent_id: String, error: InvalidGrant },
    /// A directory grant could be redirected by, or shares files with,
    /// another grant that may write.
    #[error("sandbox grants: {0}")]
    Overlapping(#[from] Box<OverlappingGrants>),
}

/// Why [`Sandbox::precompile_for`] produced nothing.
#[derive(Debug, Error)]
pub enum PrecompileError {
    #[error(transparent)]
    Target(#[from] UnsupportedTarget),
    #[error(transparent)]
    Agent(#[from] InvalidAgent),
}

/// Where the agent compiled from one artifact is, or will be once its
/// first load has compiled it.
type AgentCell = Arc<tokio::sync::OnceCell<Arc<Agent>>>;

/// The process's one WebAssembly engine and the agents compiled for it.
pub struct Sandbox {
    engine: Engine,
    /// How `engine` meters guests (always on outside benchmarks).
    metering: Metering,
    /// How guests actually execute: Pulley when asked, or when Cranelift
    /// has no backend for this host.
    execution: Execution,
    allocator: Allocator,
    linker: Linker<RunState>,
    limits: NodeLimits,
    /// One HTTP client for every run's LLM calls (connections are pooled).
    llm: Option<Arc<llm::LlmClient>>,
    /// Grants by agent id, checked from `SandboxConfig.grants` and
    /// `allowed_hosts`; an agent not here is granted nothing.
    grants: BTreeMap<String, AgentGrants>,
    /// Agent ids whose grants have been logged (once each, at first use).
    announced: Mutex<BTreeSet<String>>,
    /// Compiled and linked agents by SHA-256 of their artifact. One cell
    /// per artifact, so that runs arriving together for an agent not yet
    /// compiled wait for one compilation instead of each starting their own
    /// (an 18 MB component takes seconds to compile, tens in a debug build).
    agents: Mutex<HashMap<[u8; 32], AgentCell>>,
    /// Compiled components on disk, when configured.
    compiled_cache: Option<Arc<compiled_cache::CompiledCache>>,
    compile_counters: Arc<compiled_cache::Counters>,
    compile_limits: CompileLimits,
    declarative: declarative::DeclarativeSettings,
    trusted_keys: signature::TrustedKeys,
    /// Loads served by an agent already compiled in this process.
    memory_hits: AtomicU64,
}

impl Sandbox {
    /// Builds the engine (and, for an engine with epochs, starts its
    /// ticker). Call once per process.
    pub fn new(config: SandboxConfig) -> Result<Self, SandboxError> {
        let fail = |err: wasmtime::Error| SandboxError::Engine(agent::error_chain(&err));
        let grants = check_grants(&config)?;
        let (engine, allocator) = engine::build_engine(&config.engine, &config.limits).map_err(fail)?;
        let linker = capabilities::linker(&engine).map_err(fail)?;
        let execution = if engine.is_pulley() {
            Execution::Pulley
        } else {
            Execution::Cranelift
        };
        if execution != config.engine.execution {
            tracing::warn!(
                "Cranelift has no backend for this host ({}): guests run under the Pulley \
                 interpreter ({}), computing an order of magnitude slower than native code",
                std::env::consts::ARCH,
                engine::pulley_host_target()
            );
        }
        let llm = config.llm.map(llm::LlmClient::new).transpose()?.map(Arc::new);
        let compiled_cache = open_compiled_cache(config.compiled_cache.as_ref(), &engine)?;
        if config.engine.metering.epochs() {
            engine::start_epoch_ticker(&engine, config.engine.epoch_tick);
        }
        Ok(Sandbox {
            engine,
            metering: config.engine.metering,
            execution,
            allocator,
            linker,
            limits: config.limits,
            llm,
            grants,
            announced: Mutex::default(),
            agents: Mutex::default(),
            compiled_cache,
            compile_counters: Arc::default(),
            compile_limits: config.compile_limits,
            declarative: config.declarative,
            trusted_keys: config.trusted_keys,
            memory_hits: AtomicU64::new(0),
        })
    }

    /// How many agents were compiled, and loaded from the on-disk cache.
    pub fn compile_counts(&self) -> CompileCounts {
        self.compile_counters.snapshot()
    }

    pub fn allocator(&self) -> &Allocator {
        &self.allocator
    }

    /// How guests execute: Cranelift's native code or the Pulley
    /// interpreter.
    pub fn execution(&self) -> Execution {
        self.execution
    }

    /// The architecture of the code this node runs (`x86_64`, `pulley64`,
    /// ...), and the `compile --target` value that produces it.
    pub fn target(&self) -> (&'static str, String) {
        (
            engine::engine_architecture(&self.engine),
            engine::host_precompile_target(&self.engine),
        )
    }

    /// Agent loads that did not compile (served in memory or from the
    /// on-disk cache), and loads that compiled.
    pub fn compile_cache_stats(&self) -> (u64, u64) {
        let counts = self.compile_counts();
        (
            self.memory_hits.load(Ordering::Relaxed) + counts.cache_hits,
            counts.compiled,
        )
    }

    pub fn limits(&self) -> &NodeLimits {
        &self.limits
    }

    /// The outbound HTTP grants of `agent_id` (empty: it reaches nothing).
    pub fn allowed_hosts(&self, agent_id: &str) -> &[HostGrant] {
        self.grants
            .get(agent_id)
            .map_or(&[], |grants| grants.http_hosts.as_slice())
    }

    /// Logs an agent's grants the first time one of its runs starts.
    fn announce_grants(&self, agent_id: &str, grants: &AgentGrants) {
        let first = lock(&self.announced).insert(agent_id.to_string());
        if first {
            tracing::info!(agent_id, "sandbox grants for agent `{agent_id}`: {grants}");
        }
    }

    /// Compiles, checks and links an artifact the operator supplied (a
    /// `.wasm` component, or a `.cwasm` of native code: a file named on the
    /// command line), or returns the one already loaded with the same
    /// bytes. Compilation runs on a blocking thread. Bytes from anywhere
    /// else go through [`load_digested`](Self::load_digested) with their
    /// [`ArtifactTrust`].
    pub async fn load(&self, bytes: Arc<[u8]>) -> Result<Arc<Agent>, InvalidAgent> {
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        self.load_digested(bytes, digest, &ArtifactTrust::Operator).await
    }

    /// [`load`](Self::load) for bytes of the given trust (a `.cwasm` is
    /// loaded only from the operator; from the network only a component is
    /// accepted, refused otherwise before anything is compiled), whose
    /// SHA-256 the caller has already computed (the agent store does, to
    /// check pins): hashing a large component again would be a good part
    /// of a cached load. The digest keys the compiled code, so it must be
    /// the SHA-256 of `bytes`.
    pub async fn load_digested(
        &self,
        bytes: Arc<[u8]>,
        digest: [u8; 32],
        trust: &ArtifactTrust,
    ) -> Result<Arc<Agent>, InvalidAgent> {
        let made_from = artifact_trust::classify(&bytes, trust, &self.trusted_keys)?;
        let cell = self.cell(digest);
        if let Some(agent) = cell.get() {
            self.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(agent.clone());
        }
        // A failed compilation leaves the cell empty: the next load tries
        // again (and reports the same error), nothing invalid is kept. The
        // compilation is a task of its own: a caller that stops waiting (its
        // lease's deadline passed) cannot cancel it (wasmtime cannot), so it
        // finishes and fills the cell, and the loads that come meanwhile
        // wait for it rather than start another.
        let engine = self.engine.clone();
        let linker = self.linker.clone();
        // A .cwasm loads quickly as it is; only .wasm compiled here is
        // cached, so every entry is native code this node produced.
        let cache = self.compiled_cache.clone().filter(|_| made_from == ArtifactKind::Wasm);
        let counters = self.compile_counters.clone();
        let limits = self.compile_limits;
        let compiling = tokio::spawn(async move {
            cell.get_or_try_init(|| async move {
                let agent = tokio::task::spawn_blocking(move || {
                    let kept = cache.as_ref().and_then(|cache| cache.get(&engine, &digest, &counters));
                    let component = match kept {
                        Some(component) => component,
                        None => {
                            let component = agent::compile(&engine, &bytes, made_from, &limits)?;
                            if made_from == ArtifactKind::Wasm {
                                counters.compiled();
                            }
                            // Only an agent that links is worth keeping.
                            let hex_digest = hex::encode(digest);
                            let agent = agent::link(&engine, &linker, &component, hex_digest, made_from)?;
                            if let Some(cache) = &cache {
                                cache.put(&digest, &component);
                            }
                            return Ok(agent);
                        }
                    };
                    agent::link(&engine, &linker, &component, hex::encode(digest), made_from)
                })
                .await
                .map_err(|err| InvalidAgent(format!("compiling the agent panicked: {err}")))??;
                Ok(Arc::new(agent))
            })
            .await
            .cloned()
        });
        compiling
            .await
            .map_err(|err| InvalidAgent(format!("compiling the agent panicked: {err}")))?
    }

    /// The agent compiled from the artifact with SHA-256 `digest`, when
    /// this sandbox has it: in memory, or as a sound entry of its on-disk
    /// compiled cache (linked here). `None` otherwise: the caller then
    /// reads the artifact and calls [`load_digested`](Self::load_digested).
    /// This is how a restarted node that knows an agent file's digest
    /// (the agent store's memo) skips reading and hashing the file.
    /// For bytes from the network, an agent loaded from a `.cwasm` (the
    /// operator's, with the same digest) is not served: reading the
    /// artifact refuses it, unless those very bytes came from the network
    /// and their signature verified. The on-disk entries are all compiled
    /// here.
    pub async fn load_compiled(&self, digest: [u8; 32], trust: &ArtifactTrust) -> Option<Arc<Agent>> {
        let cell = self.cell(digest);
        if let Some(agent) = cell.get() {
            if agent.is_precompiled() && !agent.is_verified_signed() && *trust != ArtifactTrust::Operator {
                return None;
            }
            self.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Some(agent.clone());
        }
        let cache = self.compiled_cache.clone()?;
        let engine = self.engine.clone();
        let linker = self.linker.clone();
        let counters = self.compile_counters.clone();
        // Sharing the cell with `load_digested`: runs arriving together
        // wait for one load. A miss leaves the cell empty.
        cell.get_or_try_init(|| async {
            let linked = tokio::task::spawn_blocking(move || {
                let component = cache.get(&engine, &digest, &counters)?;
                // An entry is only written for a component that linked; if
                // this one does not, loading the artifact will say why.
                let digest = hex::encode(digest);
                agent::link(&engine, &linker, &component, digest, ArtifactKind::Wasm).ok()
            })
            .await;
            match linked {
                Ok(Some(agent)) => Ok(Arc::new(agent)),
                _ => Err(()),
            }
        })
        .await
        .ok()
        .cloned()
    }

    /// The directory of the on-disk compiled cache, when there is one:
    /// the agent store keeps its memo of file digests there.
    pub fn compiled_cache_dir(&self) -> Option<&std::path::Path> {
        self.compiled_cache.as_ref().map(|cache| cache.root())
    }

    fn cell(&self, digest: [u8; 32]) -> AgentCell {
        lock(&self.agents).entry(digest).or_default().clone()
    }

    /// Compiles a `.wasm` component ahead of time into a sealed `.cwasm`
    /// that this engine configuration (and only a compatible one) loads.
    /// The component is linked first, so an agent that could never run
    /// here is refused now rather than on the edge device. Only a build
    /// with a compiler (the `cranelift` feature) has it.
    #[cfg(feature = "cranelift")]
    pub fn precompile(&self, wasm: &[u8]) -> Result<Vec<u8>, InvalidAgent> {
        if precompiled::is_precompiled(wasm) || signature::is_signed(wasm) {
            return Err(InvalidAgent("the file is already a precompiled .cwasm".into()));
        }
        let component = agent::compile(&self.engine, wasm, ArtifactKind::Wasm, &self.compile_limits)?;
        agent::link(
            &self.engine,
            &self.linker,
            &component,
            String::new(),
            ArtifactKind::Wasm,
        )?;
        let artifact = component.serialize().map_err(|err| {
            InvalidAgent(format!(
                "could not serialise the component: {}",
                agent::error_chain(&err)
            ))
        })?;
        Ok(precompiled::seal(artifact))
    }

    /// [`Sandbox::precompile`] for another machine: `target` is a target
    /// triple (`aarch64-unknown-linux-gnu`) or `pulley64`/`pulley32`. The
    /// component is compiled and linked here first, to refuse an agent that
    /// could never run, then compiled again for the target, with this
    /// node's compiler settings (fuel, epochs) so that the node there
    /// accepts it.
    #[cfg(feature = "cranelift")]
    pub fn precompile_for(&self, wasm: &[u8], target: &str) -> Result<Vec<u8>, PrecompileError> {
        let target_engine = engine::build_precompile_engine(target, self.metering)?;
        self.precompile(wasm)?;
        let artifact = target_engine.precompile_component(wasm).map_err(|err| {
            InvalidAgent(format!(
                "could not compile the component for {target}: {}",
                agent::error_chain(&err)
            ))
        })?;
        Ok(precompiled::seal(artifact))
    }

    /// Runs `agent` once in a fresh store. Never panics on guest behaviour:
    /// every way a run can end is a [`RunOutcome`]. A run cut off at its
    /// deadline while computing has its backtrace (where it was) at the
    /// head of its failure's details.
    pub async fn run(&self, agent: &Agent, request: RunRequest) -> RunResult {
        let mut reported = self.run_reported(agent, request).await;
        if let Some(call) = reported.cut_off
            && let Some(backtrace) = call.unwind().await
            && let RunOutcome::Failed(failure) = &mut reported.result.outcome
        {
            let details = std::mem::take(&mut failure.details);
            *failure = failure
                .clone()
                .with_details(format!("{backtrace}\n\n{details}").trim_end().to_string())
                .capped();
        }
        reported.result
    }

    /// [`run`](Self::run), returning as soon as the result is known: a run
    /// cut off at its deadline, waiting in a host call or computing, comes
    /// back with its call still to unwind ([`CutOffCall`]), which can take
    /// milliseconds for an agent that carries DWARF. The run holds its
    /// instance's slot in the pool until the call is unwound.
    pub async fn run_reported(&self, agent: &Agent, request: RunRequest) -> Reported {
        // The caller's span carries the run's ids (the worker's `lease`,
        // run-agent's `run`); this one times the sandbox's part, and the
        // instantiation, LLM and HTTP spans nest in it.
        let span = tracing::info_span!("execute", "agent.id" = %request.context.agent_id);
        let grants = self.grants_for(&request.context.agent_id);
        run::execute(&self.shared(), grants, agent, request)
            .instrument(span)
            .await
    }

    /// Runs a declarative agent once with the built-in agent
    /// (`declarative`): the same grants for its agent id, meters, report
    /// and outcome kinds as [`run`](Self::run).
    pub async fn run_spec(&self, spec: &declarative::AgentSpec, request: RunRequest) -> RunResult {
        let span = tracing::info_span!(
            "execute",
            "agent.id" = %request.context.agent_id,
            "agent.kind" = "declarative"
        );
        let grants = self.grants_for(&request.context.agent_id);
        declarative::execute(&self.shared(), grants, &self.declarative, spec, request)
            .instrument(span)
            .await
    }

    /// What every run of this sandbox shares.
    fn shared(&self) -> run::Shared<'_> {
        run::Shared {
            engine: &self.engine,
            metering: self.metering,
            limits: &self.limits,
            llm: self.llm.as_ref(),
        }
    }

    /// The grants of `agent_id` (none when it has none), announced at its
    /// first run.
    fn grants_for(&self, agent_id: &str) -> &AgentGrants {
        static NO_GRANTS: std::sync::LazyLock<AgentGrants> = std::sync::LazyLock::new(AgentGrants::default);
        let grants = self.grants.get(agent_id).unwrap_or(&NO_GRANTS);
        self.announce_grants(agent_id, grants);
        grants
    }
}

/// The on-disk cache of components compiled here, when configured.
#[cfg(feature = "cranelift")]
fn open_compiled_cache(
    settings: Option<&CompiledCacheSettings>,
    engine: &Engine,
) -> Result<Option<Arc<compiled_cache::CompiledCache>>, SandboxError> {
    let Some(settings) = settings else { return Ok(None) };
    let cache =
        compiled_cache::CompiledCache::open(settings, engine).map_err(|source| SandboxError::CompiledCache {
            path: settings.dir.clone(),
            source,
        })?;
    tracing::info!(dir = %cache.dir().display(), "compiled cache on disk");
    Ok(Some(Arc::new(cache)))
}

/// A build without a compiler compiles nothing, so it keeps nothing
/// compiled: a `.cwasm` is loaded as it lies.
#[cfg(not(feature = "cranelift"))]
fn open_compiled_cache(
    _settings: Option<&CompiledCacheSettings>,
    _engine: &Engine,
) -> Result<Option<Arc<compiled_cache::CompiledCache>>, SandboxError> {
    Ok(None)
}

/// Checks every agent's grants, merging the HTTP-only `allowed_hosts` into
/// them.
fn check_grants(config: &SandboxConfig) -> Result<BTreeMap<String, AgentGrants>, SandboxError> {
    let agent_ids: BTreeSet<&String> = config.grants.keys().chain(config.allowed_hosts.keys()).collect();
    let no_grants = Grants::default();
    let checked = agent_ids
        .into_iter()
        .map(|agent_id| {
            let grants = config.grants.get(agent_id).unwrap_or(&no_grants);
            let hosts = config.allowed_hosts.get(agent_id).map_or(&[][..], Vec::as_slice);
            AgentGrants::check(grants, hosts)
                .map(|checked| (agent_id.clone(), checked))
                .map_err(|error| match error {
                    InvalidGrant::Host(error) => SandboxError::AllowedHost {
                        agent_id: agent_id.clone(),
                        error,
                    },
                    error => SandboxError::Grant {
                        agent_id: agent_id.clone(),
                        error,
                    },
                })
        })
        .collect::<Result<_, _>>()?;
    grants::check_separation(&config.grants)?;
    Ok(checked)
}
