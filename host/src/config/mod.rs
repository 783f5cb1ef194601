//! The node's configuration: the reference .NET node's `appsettings.json`,
//! read unchanged, plus this node's own keys.
//!
//! [`NodeConfig::load`] reads a file the way a .NET host does it: key
//! names in any case, numbers and booleans also as strings, the
//! environment's file (`appsettings.Development.json`) over it, and
//! environment variables (`NodeRuntime__MaxConcurrentLeases=2`) over both
//! (`layers` says which files, in which order). The files and the
//! environment are merged into one tree (`tree`), which each section
//! (`sections`, one file per section) binds to plain structs with every
//! value checked, through the section-agnostic typed reads of `reader`; a
//! bad value stops start-up with a [`ConfigError`] naming its key, the
//! file or variable it came from, and the fix.
//! Sections and keys the node does not read are listed in one warning.
//! `effective` prints the result back in the reference's shape, secrets
//! redacted, for `node-runtime config check`.
//!
//! Sections, with the reference's names: [`NodeRuntimeSection`]
//! (`NodeRuntime`), [`MTlsSection`] (`MTls`), [`AgentRuntimeSection`]
//! (`AgentRuntime`), [`OpenTelemetrySection`] (`OpenTelemetry`),
//! [`LoggingSection`] (`Logging`), and this node's [`SandboxSection`]
//! (`Sandbox`) and [`AgentStoreSection`] (`AgentStore`). Each section is
//! one file under `sections/`: its type, its defaults, its binding and its
//! printed view, so that a key is spelt in one place.

mod effective;
mod error;
mod layers;
mod reader;
mod sections;
mod tree;

#[cfg(test)]
pub(crate) mod tests;

use std::path::Path;
use std::time::Duration;

pub use error::ConfigError;
pub use layers::{ConfigSources, HostingEnvironment};
pub use sections::agent_runtime::{AgentRuntimeSection, AzureAiFoundry, OpenAiSection};
pub use sections::agent_store::{AgentSourceKind, AgentStoreSection};
pub use sections::declarative_agents::{DeclarativeAgentsSection, DeclarativeSecret};
pub use sections::logging::{LogLevel, LoggingSection};
pub use sections::mtls::MTlsSection;
pub use sections::node_runtime::{CapacitySection, NodeRuntimeSection};
pub use sections::open_telemetry::{Metrics, OpenTelemetrySection, OtlpExporter, Traces};
pub use sections::sandbox::SandboxSection;
pub use support::Secret;

pub use crate::telemetry::OtlpProtocol;

use crate::sandbox::grants::NodePath;

/// Everything the node is configured with. Build it with
/// [`NodeConfig::load`]; `Default` is the reference's defaults.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeConfig {
    pub node_runtime: NodeRuntimeSection,
    pub mtls: MTlsSection,
    pub agent_runtime: AgentRuntimeSection,
    pub open_telemetry: OpenTelemetrySection,
    pub logging: LoggingSection,
    pub sandbox: SandboxSection,
    pub agent_store: AgentStoreSection,
    pub declarative_agents: DeclarativeAgentsSection,
    /// Keys found in the file or the environment that the node does not
    /// read (`AllowedHosts`, `NodeRuntime.Typo`), already warned about
    /// once. A whole unknown section is listed by its name only.
    pub ignored_keys: Vec<String>,
    /// The hosting environment and the files read, for `config check` and
    /// the start-up log.
    pub sources: ConfigSources,
}

impl NodeConfig {
    /// Reads `path` (the reference's `appsettings.json` works as is), then
    /// its environment's file beside it when there is one
    /// (`appsettings.Development.json` with `DOTNET_ENVIRONMENT=Development`),
    /// then applies `env` over both (pass [`process_env`]; tests pass their
    /// own, which also names the environment). Relative paths resolve
    /// against the file's directory.
    pub fn load(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Result<NodeConfig, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let environment = HostingEnvironment::from_env(&env);
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Unreadable {
            path: path.to_path_buf(),
            source,
        })?;
        // Absolute, so that resolved paths survive a later change of
        // working directory.
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let base_dir = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let mut layers = vec![reader::Layer {
            name: path.display().to_string(),
            text,
        }];
        let mut files = vec![path.clone()];
        let environment_file = environment.file_for(&path);
        match std::fs::read_to_string(&environment_file) {
            Ok(text) => {
                layers.push(reader::Layer {
                    name: environment_file.display().to_string(),
                    text,
                });
                files.push(environment_file.clone());
            }
            // Optional, as in .NET: most environments have no file.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ConfigError::Unreadable {
                    path: environment_file,
                    source,
                });
            }
        }
        let sources = ConfigSources {
            environment,
            files,
            environment_file: Some(environment_file),
        };
        Self::read(layers, sources, &base_dir, env)
    }

    /// [`NodeConfig::load`] for text in hand: relative paths resolve
    /// against `base_dir`. No environment's file is layered.
    pub fn from_json_str(
        text: &str,
        base_dir: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<NodeConfig, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let sources = ConfigSources {
            environment: HostingEnvironment::from_env(&env),
            ..ConfigSources::default()
        };
        let layer = reader::Layer {
            name: "the configuration text".to_string(),
            text: text.to_string(),
        };
        Self::read(vec![layer], sources, base_dir, env)
    }

    fn read(
        layers: Vec<reader::Layer>,
        sources: ConfigSources,
        base_dir: &Path,
        env: Vec<(String, String)>,
    ) -> Result<NodeConfig, ConfigError> {
        let (mut reader, mut root) = reader::open(layers, base_dir, env)?;
        // In this order, which is the order a file's errors are found in.
        let node_runtime = sections::node_runtime::bind(&mut reader, &mut root)?;
        let mtls = sections::mtls::bind(&mut reader, &mut root)?;
        let agent_runtime = sections::agent_runtime::bind(&mut reader, &mut root)?;
        // Variables that hold a key of the node's (the LLM's, the declarative
        // agents' secrets), which no grant may pass to an agent.
        let declarative_agents = sections::declarative_agents::bind(&mut reader, &mut root)?;
        let key_variables: Vec<String> = agent_runtime
            .openai
            .api_key_environment_variable
            .iter()
            .chain(
                declarative_agents
                    .secrets
                    .values()
                    .filter_map(|secret| secret.environment_variable.as_ref()),
            )
            .cloned()
            .collect();
        let open_telemetry = sections::open_telemetry::bind(&mut reader, &mut root)?;
        let logging = sections::logging::bind(&mut reader, &mut root)?;
        let sandbox = sections::sandbox::bind(
            &mut reader,
            &mut root,
            &key_variables,
            &node_paths(&node_runtime, &mtls, &sources),
        )?;
        let agent_store = sections::agent_store::bind(&mut reader, &mut root)?;
        let config = NodeConfig {
            node_runtime,
            mtls,
            agent_runtime,
            open_telemetry,
            logging,
            sandbox,
            agent_store,
            declarative_agents,
            ignored_keys: reader.ignored_keys(root),
            sources,
        };
        if !config.ignored_keys.is_empty() {
            tracing::warn!(
                "ignoring configuration keys this node does not read: {}",
                config.ignored_keys.join(", ")
            );
        }
        // Valid, but likely a mistake worth a word.
        if config.node_runtime.heartbeat_interval >= Duration::from_secs(60) {
            tracing::warn!(
                "NodeRuntime.HeartbeatIntervalSeconds is {}: the control plane counts a node \
                 as live only while its last heartbeat is under 60 s old; use less than 60",
                config.node_runtime.heartbeat_interval.as_secs()
            );
        }
        Ok(config)
    }

    /// Runs the node takes at once: the lower of `MaxConcurrentLeases` and
    /// `Capacity.Slots`.
    pub fn slots(&self) -> u32 {
        self.node_runtime
            .max_concurrent_leases
            .min(self.node_runtime.capacity.slots)
    }

    /// `Logging.LogLevel` as a `tracing_subscriber::EnvFilter` directive:
    /// `Default` is the global level (Information when absent, as in .NET),
    /// every other category a target: `info,Microsoft.AspNetCore=warn`.
    pub fn log_filter(&self) -> String {
        let levels = &self.logging.log_level;
        let global = levels
            .iter()
            .find(|(category, _)| tree::same_key(category, "Default"))
            .map_or(LogLevel::Information, |(_, level)| *level);
        let mut filter = global.directive().to_string();
        for (category, level) in levels {
            if !tree::same_key(category, "Default") {
                filter.push_str(&format!(",{category}={}", level.directive()));
            }
        }
        filter
    }

    /// The effective configuration as pretty JSON, in the reference's
    /// sections and key names, defaults filled in, secrets as `"***"`.
    /// What `node-runtime config check` prints; it loads back as a
    /// configuration.
    pub fn redacted_json(&self) -> String {
        effective::redacted_json(self)
    }
}

/// What the node writes or trusts, which no agent's grant may overlap:
/// its data directory (the outbox, downloaded and compiled components),
/// its agents, its certificate and keys, its configuration files.
fn node_paths(node_runtime: &NodeRuntimeSection, mtls: &MTlsSection, sources: &ConfigSources) -> Vec<NodePath> {
    let setting = |key: &str, path: &Path| NodePath {
        key: key.to_string(),
        path: path.to_path_buf(),
    };
    let mut paths = vec![
        setting("NodeRuntime.DataDirectory", &node_runtime.data_directory),
        setting("NodeRuntime.AgentsDirectory", &node_runtime.agents_directory),
    ];
    for (key, path) in [
        ("MTls.ClientCertificatePath", &mtls.client_certificate_path),
        ("MTls.ClientKeyPath", &mtls.client_key_path),
        ("MTls.ServerCaCertificatePath", &mtls.server_ca_certificate_path),
    ] {
        if let Some(path) = path {
            paths.push(setting(key, path));
        }
    }
    for file in &sources.files {
        paths.push(setting("the configuration file", file));
    }
    paths
}

/// The process environment for [`NodeConfig::load`]. Unlike
/// `std::env::vars`, it skips (rather than panics on) variables that are
/// not UTF-8.
pub fn process_env() -> impl Iterator<Item = (String, String)> {
    std::env::vars_os().filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
}
