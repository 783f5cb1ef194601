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
//! (`Sandbox`).

mod effective;
mod error;
mod layers;
mod reader;
mod sections;
mod tree;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::ConfigError;
pub use layers::{ConfigSources, HostingEnvironment};
pub use support::Secret;

use crate::sandbox::{AllocatorChoice, Execution, Grants, NodeLimits};
pub use crate::telemetry::OtlpProtocol;

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
    /// Keys found in the file or the environment that the node does not
    /// read (`AllowedHosts`, `NodeRuntime.Typo`), already warned about
    /// once. A whole unknown section is listed by its name only.
    pub ignored_keys: Vec<String>,
    /// The hosting environment and the files read, for `config check` and
    /// the start-up log.
    pub sources: ConfigSources,
}

/// `NodeRuntime`: who the node is and how it talks to the control plane.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRuntimeSection {
    /// `NodeId`: the id the node registers under; never empty.
    pub node_id: String,
    /// `ControlPlaneUrl`: absolute `http://` or `https://` with a host.
    pub control_plane_url: http::Uri,
    /// `MaxConcurrentLeases`: sent as `max_leases` in each `Pull`.
    pub max_concurrent_leases: u32,
    /// `HeartbeatIntervalSeconds`: whole seconds, at least 1.
    pub heartbeat_interval: Duration,
    /// `Capacity`: what registration reports.
    pub capacity: Capacity,
    /// `Metadata`: sent at registration with its keys exactly as written
    /// (the reference sends `Region`, `Environment`).
    pub metadata: BTreeMap<String, String>,
    /// `AgentsDirectory` (this node): agents as
    /// `<dir>/<agent_id>/<version>.wasm` or `.cwasm`.
    pub agents_directory: PathBuf,
    /// `DataDirectory` (this node): the node's state, such as its outbox.
    pub data_directory: PathBuf,
    /// `DrainTimeoutSeconds` (this node): how long shutdown waits for
    /// running leases; 0 does not wait.
    pub drain_timeout: Duration,
    /// `AdminListen` (this node): where `/healthz`, `/readyz` and
    /// `/metrics` are served, e.g. `127.0.0.1:9090`; None (the default)
    /// serves nothing.
    pub admin_listen: Option<std::net::SocketAddr>,
}

/// `NodeRuntime.Capacity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capacity {
    /// `Slots`: runs the node takes at once (with `MaxConcurrentLeases`,
    /// see [`NodeConfig::slots`]).
    pub slots: u32,
    /// `Cpu`: reported as written, e.g. "4".
    pub cpu: String,
    /// `Memory`: reported as written, e.g. "8Gi".
    pub memory: String,
}

/// `MTls`: the client certificate for the control-plane connection.
/// Paths are resolved against the configuration file's directory; when
/// `Enabled`, those set exist; when not, they are never looked at (the
/// reference ships paths that exist only where its certificates are
/// mounted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MTlsSection {
    /// `Enabled`: when true, both the certificate and the key are set.
    pub enabled: bool,
    /// `ClientCertificatePath`: PEM.
    pub client_certificate_path: Option<PathBuf>,
    /// `ClientKeyPath`: PEM.
    pub client_key_path: Option<PathBuf>,
    /// `ServerCaCertificatePath`: PEM; the server's chain must lead to it.
    pub server_ca_certificate_path: Option<PathBuf>,
    /// `ExpectedServerCertificateSubject`: the server certificate's CN must
    /// equal it when set.
    pub expected_server_certificate_subject: Option<String>,
    /// `ValidateCertificateChain`.
    pub validate_certificate_chain: bool,
}

/// `AgentRuntime`: per-run defaults and the model endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRuntimeSection {
    /// `DefaultModel`.
    pub default_model: String,
    /// `DefaultTemperature`: 0 or more.
    pub default_temperature: f64,
    /// `MaxTokens`: the node's token limit per run (a lease's budget may
    /// lower it).
    pub max_tokens: u32,
    /// `MaxDurationSeconds`: the node's wall-clock limit per run.
    pub max_duration: Duration,
    /// `AzureAIFoundry`.
    pub azure_ai_foundry: AzureAiFoundry,
    /// `OpenAI` (this node): a generic OpenAI-compatible endpoint, used
    /// when its `Endpoint` is set (it wins over `AzureAIFoundry`).
    pub openai: OpenAiSection,
    /// `Prices` (this node): USD per 1k input and output tokens by model.
    pub prices: BTreeMap<String, crate::sandbox::llm::ModelPrice>,
}

/// `AgentRuntime.OpenAI`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OpenAiSection {
    /// `Endpoint`: `POST {Endpoint}/v1/chat/completions`.
    pub endpoint: Option<http::Uri>,
    /// `ApiKey`, or the value of the variable `ApiKeyEnvironmentVariable`
    /// names.
    pub api_key: Option<Secret>,
    /// `ApiKeyEnvironmentVariable`: the variable the key was read from.
    pub api_key_environment_variable: Option<String>,
}

/// `AgentRuntime.AzureAIFoundry`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AzureAiFoundry {
    /// `Endpoint`: an `http(s)://` URL when set.
    pub endpoint: Option<http::Uri>,
    /// `DeploymentName`.
    pub deployment_name: Option<String>,
    /// `ApiKey`: never printed.
    pub api_key: Option<Secret>,
    /// `UseManagedIdentity`.
    pub use_managed_identity: bool,
}

/// `OpenTelemetry`.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenTelemetrySection {
    /// `ServiceName`.
    pub service_name: String,
    /// `ServiceVersion` (default: this node's version).
    pub service_version: String,
    /// `OtlpExporter`.
    pub otlp_exporter: OtlpExporter,
    /// `ConsoleExporter.Enabled`.
    pub console_exporter_enabled: bool,
    /// `Traces`.
    pub traces: Traces,
    /// `Metrics`.
    pub metrics: Metrics,
}

/// `OpenTelemetry.OtlpExporter`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpExporter {
    /// `Endpoint`: `None` when set to an empty string, which (as in the
    /// reference) turns the OTLP exporter off.
    pub endpoint: Option<http::Uri>,
    /// `Protocol`.
    pub protocol: OtlpProtocol,
}

/// `OpenTelemetry.Traces`.
#[derive(Debug, Clone, PartialEq)]
pub struct Traces {
    /// `Enabled`.
    pub enabled: bool,
    /// `SamplingRatio`: in [0, 1].
    pub sampling_ratio: f64,
}

/// `OpenTelemetry.Metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metrics {
    /// `Enabled`.
    pub enabled: bool,
    /// `ExportIntervalMilliseconds`: at least 1 ms.
    pub export_interval: Duration,
}

/// `Logging`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoggingSection {
    /// `LogLevel`: category -> level, categories as written. `Default` is
    /// the level of everything else; the other categories become `tracing`
    /// targets (see [`NodeConfig::log_filter`]).
    pub log_level: BTreeMap<String, LogLevel>,
}

/// A .NET log level, as `Logging.LogLevel` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Trace,
    Debug,
    Information,
    Warning,
    Error,
    Critical,
    None,
}

impl LogLevel {
    pub const ALL: [LogLevel; 7] = [
        LogLevel::Trace,
        LogLevel::Debug,
        LogLevel::Information,
        LogLevel::Warning,
        LogLevel::Error,
        LogLevel::Critical,
        LogLevel::None,
    ];

    /// The .NET name.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "Trace",
            LogLevel::Debug => "Debug",
            LogLevel::Information => "Information",
            LogLevel::Warning => "Warning",
            LogLevel::Error => "Error",
            LogLevel::Critical => "Critical",
            LogLevel::None => "None",
        }
    }

    /// The `tracing` level: `tracing` has nothing above error, so
    /// Critical is error.
    pub fn directive(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Information => "info",
            LogLevel::Warning => "warn",
            LogLevel::Error | LogLevel::Critical => "error",
            LogLevel::None => "off",
        }
    }
}

/// `Sandbox` (this node): the ceilings of every run. Token and duration
/// limits come from `AgentRuntime` (`MaxTokens`, `MaxDurationSeconds`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSection {
    /// `DefaultFuel`: CPU fuel per run.
    pub default_fuel: u64,
    /// `MaxMemoryBytes`: bytes or a size (`"256MiB"`, `"256Mi"`); at
    /// least one WebAssembly page (64 KiB).
    pub max_memory_bytes: u64,
    /// `MaxTableElements`.
    pub max_table_elements: u32,
    /// `MaxResultBytes`: bytes or a size.
    pub max_result_bytes: usize,
    /// `MaxLogLines`: 0 drops every log line.
    pub max_log_lines: u32,
    /// `MaxLogBytes`: bytes or a size.
    pub max_log_bytes: usize,
    /// `Allocator`: `auto`, `pooling` or `on-demand`.
    pub allocator: AllocatorChoice,
    /// `Engine`: `cranelift` (native code) or `pulley` (the interpreter);
    /// Pulley regardless where Cranelift has no backend for the host.
    pub engine: Execution,
    /// `AllowedHosts` (agent id -> `host` or `host:port` entries): where
    /// each agent's outbound HTTP may go. An agent not listed reaches
    /// nothing.
    pub allowed_hosts: BTreeMap<String, Vec<String>>,
    /// `CompiledCacheMaxBytes`: room for compiled components kept under
    /// `DataDirectory/compiled`; 0 keeps them in memory only.
    pub compiled_cache_max_bytes: u64,
    /// `Grants` (agent id -> `Directories`, `Environment`, `AllowedHosts`):
    /// what each agent may reach beyond clocks and random; host
    /// directories exist (checked at load). An agent not listed gets none.
    pub grants: BTreeMap<String, Grants>,
}

/// Which kind of place an agent is looked for in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentSourceKind {
    /// `NodeRuntime.AgentsDirectory`.
    Directory,
    /// `AgentStore.HttpUrlTemplate`.
    Http,
    /// `AgentStore.OciReferenceTemplate`.
    Oci,
}

impl AgentSourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentSourceKind::Directory => "directory",
            AgentSourceKind::Http => "http",
            AgentSourceKind::Oci => "oci",
        }
    }
}

/// `AgentStore` (this node): where agents come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStoreSection {
    /// `Sources`: the order the sources are tried in. Default: the
    /// directory, then HTTP when `HttpUrlTemplate` is set.
    pub sources: Vec<AgentSourceKind>,
    /// `HttpUrlTemplate`: with `{agent_id}` and `{version}`, and
    /// optionally `{base}` (the control plane's URL).
    pub http_url_template: Option<String>,
    /// `OciReferenceTemplate`: `REGISTRY/REPOSITORY:TAG` with
    /// `{agent_id}` and `{version}`.
    pub oci_reference_template: Option<String>,
    /// `OciInsecure`: plain HTTP to the registry.
    pub oci_insecure: bool,
    /// `OciUsername`, `OciPassword`: basic credentials; anonymous when
    /// unset.
    pub oci_username: Option<String>,
    pub oci_password: Option<Secret>,
    /// `MaxDownloadBytes`: bytes or a size.
    pub max_download_bytes: u64,
    /// `DownloadTimeoutSeconds`.
    pub download_timeout: Duration,
    /// `RequireDigest`: refuse leases without `agent.digest` metadata.
    pub require_digest: bool,
}

impl Default for AgentStoreSection {
    fn default() -> Self {
        AgentStoreSection {
            sources: vec![AgentSourceKind::Directory],
            http_url_template: None,
            oci_reference_template: None,
            oci_insecure: false,
            oci_username: None,
            oci_password: None,
            max_download_bytes: 256 << 20,
            download_timeout: Duration::from_secs(60),
            require_digest: false,
        }
    }
}

impl Default for NodeRuntimeSection {
    fn default() -> Self {
        NodeRuntimeSection {
            node_id: "node-1".to_string(),
            control_plane_url: http::Uri::from_static("http://localhost:5109"),
            max_concurrent_leases: 5,
            heartbeat_interval: Duration::from_secs(30),
            capacity: Capacity::default(),
            metadata: BTreeMap::new(),
            agents_directory: PathBuf::from("agents"),
            data_directory: PathBuf::from("data"),
            drain_timeout: Duration::from_secs(30),
            admin_listen: None,
        }
    }
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            slots: 8,
            cpu: "4".to_string(),
            memory: "8Gi".to_string(),
        }
    }
}

impl Default for MTlsSection {
    fn default() -> Self {
        MTlsSection {
            enabled: false,
            client_certificate_path: None,
            client_key_path: None,
            server_ca_certificate_path: None,
            expected_server_certificate_subject: None,
            validate_certificate_chain: true,
        }
    }
}

impl Default for AgentRuntimeSection {
    fn default() -> Self {
        let limits = NodeLimits::default();
        AgentRuntimeSection {
            default_model: "gpt-5-mini".to_string(),
            default_temperature: 0.7,
            max_tokens: limits.tokens,
            max_duration: limits.duration,
            azure_ai_foundry: AzureAiFoundry::default(),
            openai: OpenAiSection::default(),
            prices: BTreeMap::new(),
        }
    }
}

impl Default for OpenTelemetrySection {
    fn default() -> Self {
        OpenTelemetrySection {
            service_name: "Node.Runtime".to_string(),
            service_version: env!("CARGO_PKG_VERSION").to_string(),
            otlp_exporter: OtlpExporter::default(),
            console_exporter_enabled: false,
            traces: Traces::default(),
            metrics: Metrics::default(),
        }
    }
}

impl Default for OtlpExporter {
    fn default() -> Self {
        OtlpExporter {
            endpoint: Some(http::Uri::from_static("http://localhost:4317")),
            protocol: OtlpProtocol::Grpc,
        }
    }
}

impl Default for Traces {
    fn default() -> Self {
        Traces {
            enabled: true,
            sampling_ratio: 1.0,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            enabled: true,
            export_interval: Duration::from_millis(60_000),
        }
    }
}

impl Default for SandboxSection {
    fn default() -> Self {
        let limits = NodeLimits::default();
        SandboxSection {
            default_fuel: limits.fuel,
            max_memory_bytes: limits.memory_bytes,
            max_table_elements: limits.table_elements,
            max_result_bytes: limits.result_bytes,
            max_log_lines: limits.log_lines,
            max_log_bytes: limits.log_bytes,
            allocator: AllocatorChoice::Auto,
            engine: Execution::Cranelift,
            allowed_hosts: BTreeMap::new(),
            compiled_cache_max_bytes: 1 << 30,
            grants: BTreeMap::new(),
        }
    }
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
        // Variables that hold a key of the node's (the LLM's), which no grant
        // may pass to an agent.
        let key_variables: Vec<String> = agent_runtime
            .openai
            .api_key_environment_variable
            .iter()
            .cloned()
            .collect();
        let open_telemetry = sections::open_telemetry::bind(&mut reader, &mut root)?;
        let logging = sections::logging::bind(&mut reader, &mut root)?;
        let sandbox = sections::sandbox::bind(&mut reader, &mut root, &key_variables)?;
        let agent_store = sections::agent_store::bind(&mut reader, &mut root)?;
        let config = NodeConfig {
            node_runtime,
            mtls,
            agent_runtime,
            open_telemetry,
            logging,
            sandbox,
            agent_store,
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

/// The process environment for [`NodeConfig::load`]. Unlike
/// `std::env::vars`, it skips (rather than panics on) variables that are
/// not UTF-8.
pub fn process_env() -> impl Iterator<Item = (String, String)> {
    std::env::vars_os().filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
}
