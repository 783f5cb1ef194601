//! The composition root: the one place that turns a [`NodeConfig`] into
//! the running parts of a node (its sandbox, agent store, control-plane
//! TLS and settings, outbox and telemetry). `serve`, `dev`, `config check`
//! and `outbox` all build through it; nothing below it reads the
//! configuration.
//!
//! - [`sandbox`]: `Sandbox` and `AgentRuntime` as the sandbox's settings.
//! - [`agent_store`]: `AgentStore` and `NodeRuntime.AgentsDirectory` as the store.
//! - [`control_plane`]: `MTls` as the client's TLS, `NodeRuntime` as the worker's settings.
//! - [`telemetry`]: `Logging` and `OpenTelemetry`.

pub mod agent_store;
pub mod control_plane;
pub mod sandbox;
pub mod telemetry;

#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;

use thiserror::Error;

pub use agent_store::agent_store;
pub use control_plane::{control_plane_tls, node_settings, tls_options};
pub use sandbox::{llm_settings, sandbox_config};
pub use telemetry::telemetry_settings;

/// The configuration the root builds from: the commands reach it through
/// here, and describe nodes of their own (`dev`) with it.
pub use crate::config::{self, NodeConfig};

use crate::agent_store::AgentStore;
use crate::config::ConfigError;
use crate::control_plane::TlsError;
use crate::outbox::{Outbox, OutboxError, OutboxLimits};
use crate::sandbox::{Sandbox, SandboxError};
use crate::telemetry::{LogFormat, NodeMetrics};
use crate::worker::{NodeHandle, StartError};

/// The target of the start-up lines from before they moved here from
/// `serve`, so that log filters written for it (`Logging.LogLevel`) still
/// apply.
const LOG_TARGET: &str = "node_runtime::cli::serve";

/// Loads the configuration as `serve` does: `path` (or, without one, the
/// defaults), its environment's file, then the process environment; the
/// warnings of loading (ignored keys) go to stderr, in `log_format`, as
/// safe to print as every other line (they quote the keys).
pub fn load_config(path: Option<&Path>, log_format: LogFormat) -> Result<NodeConfig, ConfigError> {
    tracing::subscriber::with_default(crate::telemetry::loading_logger(log_format), || match path {
        Some(path) => NodeConfig::load(path, config::process_env()),
        None => NodeConfig::from_json_str(
            "{}",
            &std::env::current_dir().unwrap_or_default(),
            config::process_env(),
        ),
    })
}

/// Why a node could not be built from its configuration.
#[derive(Debug, Error)]
pub enum BuildError {
    #[error("invalid configuration: {0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Sandbox(#[from] SandboxError),
    #[error("cannot build the agent store's HTTP client: {0}")]
    StoreClient(#[from] reqwest::Error),
    #[error("cannot open the outbox: {0}")]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Start(#[from] StartError),
}

impl BuildError {
    /// Whether the configuration (or a file it names) is at fault, rather
    /// than the node.
    pub fn is_usage(&self) -> bool {
        !matches!(self, BuildError::Sandbox(_) | BuildError::StoreClient(_))
    }
}

/// What the node's outbox keeps, and whether its commits wait for company:
/// they do on a node of [`OutboxLimits::GATHER_FROM_SLOTS`] slots or more.
pub(crate) fn outbox_limits(config: &NodeConfig) -> OutboxLimits {
    OutboxLimits::for_slots(config.slots())
}

/// Builds every part `config` asks for and starts the node, recording into
/// `metrics`.
pub fn start_node(config: &NodeConfig, metrics: Arc<NodeMetrics>) -> Result<NodeHandle, BuildError> {
    NodeBuild::new(config).metrics(metrics).start()
}

/// A node built from its configuration, with parts no configuration key
/// describes given instead (the dev node's agents come from several
/// directories).
pub struct NodeBuild<'a> {
    config: &'a NodeConfig,
    store: Option<AgentStore>,
    metrics: Arc<NodeMetrics>,
}

impl<'a> NodeBuild<'a> {
    pub fn new(config: &'a NodeConfig) -> Self {
        NodeBuild {
            config,
            store: None,
            metrics: Arc::default(),
        }
    }

    /// This store instead of the one `AgentStore` describes.
    pub fn agent_store(mut self, store: AgentStore) -> Self {
        self.store = Some(store);
        self
    }

    /// Records into `metrics` (the registry telemetry exports).
    pub fn metrics(mut self, metrics: Arc<NodeMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Reads the certificates, starts the engine, opens the outbox and
    /// starts the node's tasks.
    pub fn start(self) -> Result<NodeHandle, BuildError> {
        let config = self.config;
        let tls = control_plane_tls(config)?;
        let sandbox = Sandbox::new(sandbox_config(config))?;
        let (architecture, _) = sandbox.target();
        tracing::info!(
            target: LOG_TARGET,
            allocator = ?sandbox.allocator(),
            engine = %sandbox.execution(),
            architecture,
            "sandbox ready"
        );
        let store = match self.store {
            Some(store) => store,
            None => agent_store(config, &tls)?,
        };
        let outbox = Outbox::open_setting_aside_damaged(&config.node_runtime.data_directory, outbox_limits(config))?;
        tracing::info!(target: LOG_TARGET, path = %outbox.path().display(), "outbox open");
        let node = NodeHandle::builder(node_settings(config), Arc::new(sandbox), Arc::new(store), outbox)
            .tls(tls)
            .metrics(self.metrics)
            .max_lease_message_bytes(usize::try_from(config.node_runtime.max_lease_message_bytes).unwrap_or(usize::MAX))
            .declarative_agents(config.declarative_agents.enabled)
            .calls_stream(config.node_runtime.calls_stream)
            .start()?;
        Ok(node)
    }
}
