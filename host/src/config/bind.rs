//! Binding: the merged tree (`tree`) to a checked [`NodeConfig`].
//!
//! Each key is taken out of its section as it is read, so whatever is
//! left afterwards is a key the node does not know. Every value goes
//! through one conversion that is also its check: a number that is out of
//! range fails the same way as a word where a number belongs, with the
//! message saying what the key accepts. Values the .NET binder would
//! coerce are coerced: `"5"` is 5, `"False"` is false, `5` is `"5"`.
//! A null, or an empty string where a number, boolean or path belongs,
//! means "not set": the default applies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::ConfigError;
use super::tree::{self, Entries, Kind, Node, Origin, Scalar};
use super::{
    AgentRuntimeSection, AgentSourceKind, AgentStoreSection, AzureAiFoundry, Capacity, LogLevel, LoggingSection,
    MTlsSection, Metrics, NodeConfig, NodeRuntimeSection, OpenAiSection, OpenTelemetrySection, OtlpExporter,
    OtlpProtocol, SandboxSection, Secret, Traces,
};
use crate::sandbox::grants::{DirectoryGrant, Grants, check_environment_name, check_guest_path};
use crate::sandbox::llm::ModelPrice;
use crate::sandbox::{AllocatorChoice, Execution};
use support::units::parse_size;

/// One configuration file's text, and its name as messages give it.
pub(super) struct Layer {
    pub name: String,
    pub text: String,
}

/// Parses each layer, merges them in order (a later one's keys win),
/// applies `env` over the result and binds it.
pub(super) fn read(
    layers: Vec<Layer>,
    base_dir: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<NodeConfig, ConfigError> {
    let mut entries = Entries::default();
    let mut files = Vec::with_capacity(layers.len());
    for (index, layer) in layers.into_iter().enumerate() {
        let mut root = tree::parse(&layer.text).map_err(|err| syntax_error(&layer.name, &err))?;
        root.set_file(index);
        match root.kind {
            Kind::Section {
                entries: layer_entries,
                list: false,
            } => {
                for (name, node) in layer_entries.0 {
                    entries.insert(name, node);
                }
            }
            _ => {
                return Err(ConfigError::NotAnObject {
                    found: root.describe(),
                    file: layer.name,
                });
            }
        }
        files.push(layer.name);
    }
    let env: Vec<(String, String)> = env.into_iter().collect();
    tree::apply_env(&mut entries, env.iter().cloned());

    let mut binder = Binder {
        files,
        base_dir,
        ignored: Vec::new(),
        env: env.into_iter().collect(),
        key_variables: Vec::new(),
    };
    let mut root = Section {
        key: String::new(),
        entries,
    };
    let node_runtime = binder.node_runtime(&mut root)?;
    let mtls = binder.mtls(&mut root)?;
    let agent_runtime = binder.agent_runtime(&mut root)?;
    binder.key_variables = agent_runtime
        .openai
        .api_key_environment_variable
        .iter()
        .cloned()
        .collect();
    let open_telemetry = binder.open_telemetry(&mut root)?;
    let logging = binder.logging(&mut root)?;
    let sandbox = binder.sandbox(&mut root)?;
    let agent_store = binder.agent_store(&mut root)?;
    binder.finish(root);
    binder.ignored.sort();
    Ok(NodeConfig {
        node_runtime,
        mtls,
        agent_runtime,
        open_telemetry,
        logging,
        sandbox,
        agent_store,
        ignored_keys: binder.ignored,
        // The caller knows which files these were.
        sources: Default::default(),
    })
}

fn syntax_error(file: &str, err: &serde_json::Error) -> ConfigError {
    let text = err.to_string();
    let position = format!(" at line {} column {}", err.line(), err.column());
    ConfigError::Syntax {
        file: file.to_string(),
        line: err.line(),
        column: err.column(),
        message: text.strip_suffix(&position).unwrap_or(&text).to_string(),
    }
}

/// A section being bound: its key path and the entries not read yet.
struct Section {
    /// `NodeRuntime.Capacity`; empty at the root.
    key: String,
    entries: Entries,
}

impl Section {
    fn key(&self, name: &str) -> String {
        if self.key.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.key)
        }
    }
}

/// One scalar setting, taken out of its section.
struct Setting {
    key: String,
    scalar: Scalar,
    origin: Origin,
}

struct Binder<'a> {
    /// The configuration files in the order layered, as messages name them.
    files: Vec<String>,
    base_dir: &'a Path,
    ignored: Vec<String>,
    /// The environment, for keys that name a variable (an API key's).
    env: BTreeMap<String, String>,
    /// Variables that hold a key of the node's (the LLM's), which no grant
    /// may pass to an agent.
    key_variables: Vec<String>,
}

/// What a path must be, when it exists.
#[derive(Clone, Copy)]
enum PathKind {
    /// Anything: the path is resolved, never looked at (a certificate of
    /// a disabled `MTls` section).
    Unread,
    /// A file that exists (a certificate or a key).
    ExistingFile,
    /// A directory, or nothing yet.
    Directory,
    /// A directory that exists (one granted to an agent).
    ExistingDirectory,
}

impl Binder<'_> {
    fn origin(&self, origin: &Origin) -> String {
        match origin {
            Origin::File(index) => match self.files.get(*index) {
                Some(file) => format!("in {file}"),
                None => "in the configuration".to_string(),
            },
            Origin::Env(name) => format!("from environment variable {name}"),
            Origin::Unset => match self.files.as_slice() {
                [] => "in the configuration".to_string(),
                [file] => format!("in {file}"),
                [files @ .., last] => format!("in neither {} nor {last}", files.join(", ")),
            },
        }
    }

    fn invalid(&self, key: String, found: String, origin: &Origin, fix: String) -> ConfigError {
        ConfigError::Invalid {
            key,
            found,
            origin: self.origin(origin),
            fix,
        }
    }

    /// Records what is left of a section as ignored. A whole unknown
    /// section is one entry.
    fn finish(&mut self, section: Section) {
        for (name, _) in &section.entries.0 {
            self.ignored.push(section.key(name));
        }
    }

    /// The subsection `name`, empty when absent or null.
    fn section(&self, parent: &mut Section, name: &str) -> Result<Section, ConfigError> {
        let key = parent.key(name);
        match parent.entries.take(name) {
            None => Ok(Section {
                key,
                entries: Entries::default(),
            }),
            Some(Node {
                kind: Kind::Section { entries, list: false },
                ..
            }) => Ok(Section { key, entries }),
            Some(Node {
                kind: Kind::Value(Scalar::Null),
                ..
            }) => Ok(Section {
                key,
                entries: Entries::default(),
            }),
            Some(node) => Err(self.invalid(
                key,
                node.describe(),
                &node.origin,
                format!("expected a section (a JSON object) with the {name} settings"),
            )),
        }
    }

    /// The scalar `name`, `None` when absent or null; a section or a list
    /// where a value belongs is an error.
    fn setting(&self, section: &mut Section, name: &str, expected: &str) -> Result<Option<Setting>, ConfigError> {
        let key = section.key(name);
        let Some(node) = section.entries.take(name) else {
            return Ok(None);
        };
        let found = node.describe();
        match node.kind {
            Kind::Value(Scalar::Null) => Ok(None),
            Kind::Value(scalar) => Ok(Some(Setting {
                key,
                scalar,
                origin: node.origin,
            })),
            Kind::Section { .. } => Err(self.invalid(key, found, &node.origin, format!("expected {expected}"))),
        }
    }

    /// A value other than a string: `convert` both reads and checks it, and
    /// `None` from it is an error that says what is `expected`. An empty
    /// string is "not set".
    fn value<T>(
        &self,
        section: &mut Section,
        name: &str,
        default: T,
        expected: &str,
        convert: impl FnOnce(&Scalar) -> Option<T>,
    ) -> Result<T, ConfigError> {
        let Some(setting) = self.setting(section, name, expected)? else {
            return Ok(default);
        };
        if matches!(&setting.scalar, Scalar::String(text) if text.trim().is_empty()) {
            return Ok(default);
        }
        convert(&setting.scalar).ok_or_else(|| self.rejected(setting, expected))
    }

    fn rejected(&self, setting: Setting, expected: &str) -> ConfigError {
        self.invalid(
            setting.key,
            setting.scalar.to_string(),
            &setting.origin,
            format!("expected {expected}"),
        )
    }

    /// A string, taken as written (numbers and booleans as their text).
    fn text(&self, section: &mut Section, name: &str, default: &str) -> Result<String, ConfigError> {
        Ok(self
            .setting(section, name, "a string")?
            .and_then(|setting| setting.scalar.text())
            .unwrap_or_else(|| default.to_string()))
    }

    /// A string that may be absent; empty is absent.
    fn optional_text(&self, section: &mut Section, name: &str) -> Result<Option<String>, ConfigError> {
        Ok(self
            .setting(section, name, "a string")?
            .and_then(|setting| setting.scalar.text())
            .filter(|text| !text.trim().is_empty()))
    }

    /// A string that must not be empty.
    fn required_text(
        &self,
        section: &mut Section,
        name: &str,
        default: &str,
        expected: &str,
    ) -> Result<String, ConfigError> {
        match self.setting(section, name, expected)? {
            None => Ok(default.to_string()),
            Some(setting) => match setting.scalar.text() {
                Some(text) if !text.trim().is_empty() => Ok(text),
                _ => Err(self.rejected(setting, expected)),
            },
        }
    }

    fn boolean(&self, section: &mut Section, name: &str, default: bool) -> Result<bool, ConfigError> {
        self.value(section, name, default, "true or false", Scalar::boolean)
    }

    /// A whole number in `range`.
    fn integer<T: TryFrom<i128>>(
        &self,
        section: &mut Section,
        name: &str,
        default: T,
        range: std::ops::RangeInclusive<i128>,
        expected: &str,
    ) -> Result<T, ConfigError> {
        self.value(section, name, default, expected, |scalar| {
            scalar
                .integer()
                .filter(|n| range.contains(n))
                .and_then(|n| T::try_from(n).ok())
        })
    }

    /// Whole seconds in `range`.
    fn seconds(
        &self,
        section: &mut Section,
        name: &str,
        default: Duration,
        range: std::ops::RangeInclusive<i128>,
        expected: &str,
    ) -> Result<Duration, ConfigError> {
        let seconds: u64 = self.integer(section, name, default.as_secs(), range, expected)?;
        Ok(Duration::from_secs(seconds))
    }

    /// A size in bytes: a number, or a string with a unit (`"256MiB"`).
    fn size(
        &self,
        section: &mut Section,
        name: &str,
        default: u64,
        minimum: u64,
        expected: &str,
    ) -> Result<u64, ConfigError> {
        self.value(section, name, default, expected, |scalar| {
            let bytes = match scalar {
                Scalar::Number(number) => number.as_u64(),
                Scalar::String(text) => parse_size(text).ok(),
                Scalar::Null | Scalar::Bool(_) => None,
            }?;
            (bytes >= minimum).then_some(bytes)
        })
    }

    /// An absolute `http://` or `https://` URL with a host; `Some(None)`
    /// when set to an empty string and `empty_allowed`.
    fn url(
        &self,
        section: &mut Section,
        name: &str,
        example: &str,
        empty_allowed: bool,
    ) -> Result<Option<Option<http::Uri>>, ConfigError> {
        let expected = format!("an absolute http:// or https:// URL with a host, e.g. {example}");
        let Some(setting) = self.setting(section, name, &expected)? else {
            return Ok(None);
        };
        let text = setting.scalar.text().unwrap_or_default();
        if text.trim().is_empty() && empty_allowed {
            return Ok(Some(None));
        }
        match http_url(text.trim()) {
            Some(uri) => Ok(Some(Some(uri))),
            None => Err(self.rejected(setting, &expected)),
        }
    }

    /// A path, resolved against the configuration file's directory, and
    /// checked against what it must be.
    fn path(&self, section: &mut Section, name: &str, kind: PathKind) -> Result<Option<PathBuf>, ConfigError> {
        let Some(setting) = self.setting(section, name, "a path")? else {
            return Ok(None);
        };
        let text = setting.scalar.text().unwrap_or_default();
        if text.trim().is_empty() {
            return Ok(None);
        }
        let path = self.base_dir.join(&text);
        let found = format!("{} (resolved to {})", setting.scalar, path.display());
        if matches!(kind, PathKind::Unread) {
            return Ok(Some(path));
        }
        let problem = match (kind, std::fs::metadata(&path)) {
            (PathKind::ExistingFile, Ok(meta)) if meta.is_file() => None,
            (PathKind::ExistingFile, Ok(meta)) if meta.is_dir() => Some("it is a directory; expected a PEM file"),
            (PathKind::ExistingFile, Ok(_)) => Some("it is not a regular file; expected a PEM file"),
            (PathKind::ExistingFile, Err(err)) if err.kind() == std::io::ErrorKind::NotFound => {
                Some("no such file; expected an existing PEM file")
            }
            (PathKind::ExistingFile, Err(_)) => Some("it cannot be read; expected a readable PEM file"),
            (PathKind::Directory, Ok(meta)) if !meta.is_dir() => {
                Some("it exists and is not a directory; expected a directory (or a path to create one at)")
            }
            (PathKind::Directory, _) => None,
            (PathKind::ExistingDirectory, Ok(meta)) if meta.is_dir() => None,
            (PathKind::ExistingDirectory, Ok(_)) => {
                Some("it is not a directory; expected an existing directory to grant")
            }
            (PathKind::ExistingDirectory, Err(err)) if err.kind() == std::io::ErrorKind::NotFound => {
                Some("no such directory; create it, or fix the path")
            }
            (PathKind::ExistingDirectory, Err(_)) => Some("it cannot be read; expected a directory the node can open"),
            (PathKind::Unread, _) => None,
        };
        match problem {
            None => Ok(Some(path)),
            Some(problem) => Err(self.invalid(
                setting.key,
                found,
                &setting.origin,
                format!("{problem} (a relative path is resolved against the configuration file's directory)"),
            )),
        }
    }

    fn required_path(&self, section: &mut Section, name: &str, default: &str) -> Result<PathBuf, ConfigError> {
        match self.path(section, name, PathKind::Directory)? {
            Some(path) => Ok(path),
            None => Ok(self.base_dir.join(default)),
        }
    }

    fn node_runtime(&mut self, root: &mut Section) -> Result<NodeRuntimeSection, ConfigError> {
        let defaults = NodeRuntimeSection::default();
        let mut s = self.section(root, "NodeRuntime")?;
        let node_id = self.required_text(&mut s, "NodeId", &defaults.node_id, "a non-empty node id, e.g. node-1")?;
        let control_plane_url = self
            .url(&mut s, "ControlPlaneUrl", "https://control-plane:5109", false)?
            .flatten()
            .unwrap_or(defaults.control_plane_url);
        let max_concurrent_leases = self.integer(
            &mut s,
            "MaxConcurrentLeases",
            defaults.max_concurrent_leases,
            1..=i32::MAX as i128,
            "a whole number of at least 1 (leases asked for per pull), e.g. 5",
        )?;
        let heartbeat_interval = self.seconds(
            &mut s,
            "HeartbeatIntervalSeconds",
            defaults.heartbeat_interval,
            1..=i32::MAX as i128,
            "a whole number of seconds greater than 0, e.g. 30",
        )?;
        let capacity = self.capacity(&mut s)?;
        let metadata = self.metadata(&mut s)?;
        let agents_directory = self.required_path(&mut s, "AgentsDirectory", "agents")?;
        let data_directory = self.required_path(&mut s, "DataDirectory", "data")?;
        let drain_timeout = self.seconds(
            &mut s,
            "DrainTimeoutSeconds",
            defaults.drain_timeout,
            0..=i32::MAX as i128,
            "a whole number of seconds, 0 or more, e.g. 30",
        )?;
        let admin_listen = match self.setting(&mut s, "AdminListen", "a string")? {
            None => None,
            Some(setting) => match setting.scalar.text().filter(|text| !text.trim().is_empty()) {
                None => None,
                Some(text) => match text.trim().parse::<std::net::SocketAddr>() {
                    Ok(addr) => Some(addr),
                    Err(_) => {
                        return Err(self.invalid(
                            setting.key,
                            setting.scalar.to_string(),
                            &setting.origin,
                            "an IP address and port for the admin endpoint, e.g. 127.0.0.1:9090 \
                             (0.0.0.0:9090 in a pod), or empty for none"
                                .to_string(),
                        ));
                    }
                },
            },
        };
        self.finish(s);
        Ok(NodeRuntimeSection {
            admin_listen,
            node_id,
            control_plane_url,
            max_concurrent_leases,
            heartbeat_interval,
            capacity,
            metadata,
            agents_directory,
            data_directory,
            drain_timeout,
        })
    }

    fn capacity(&mut self, parent: &mut Section) -> Result<Capacity, ConfigError> {
        let defaults = Capacity::default();
        let mut s = self.section(parent, "Capacity")?;
        let capacity = Capacity {
            slots: self.integer(
                &mut s,
                "Slots",
                defaults.slots,
                1..=i32::MAX as i128,
                "a whole number of at least 1 (runs the node takes at once), e.g. 8",
            )?,
            cpu: self.text(&mut s, "Cpu", &defaults.cpu)?,
            memory: self.text(&mut s, "Memory", &defaults.memory)?,
        };
        self.finish(s);
        Ok(capacity)
    }

    /// Every key is the node's to report: none is unknown, and each keeps
    /// its spelling.
    fn metadata(&mut self, parent: &mut Section) -> Result<BTreeMap<String, String>, ConfigError> {
        let mut s = self.section(parent, "Metadata")?;
        let names: Vec<String> = s.entries.0.iter().map(|(name, _)| name.clone()).collect();
        let mut metadata = BTreeMap::new();
        for name in names {
            if let Some(setting) = self.setting(&mut s, &name, "a string")?
                && let Some(text) = setting.scalar.text()
            {
                metadata.insert(name, text);
            }
        }
        Ok(metadata)
    }

    fn mtls(&mut self, root: &mut Section) -> Result<MTlsSection, ConfigError> {
        let defaults = MTlsSection::default();
        let mut s = self.section(root, "MTls")?;
        // Said in the message when it surprises: Enabled set from outside the file.
        let enabled_from_env = s.entries.0.iter().find_map(|(name, node)| match &node.origin {
            Origin::Env(variable) if tree::same_key(name, "Enabled") => {
                Some(format!(" (from environment variable {variable})"))
            }
            _ => None,
        });
        let enabled = self.boolean(&mut s, "Enabled", defaults.enabled)?;
        // The reference ships `Enabled: false` with paths under
        // /etc/bpa/certs that exist only where its certificates are
        // mounted: a disabled section's files are never looked at.
        let certificate = if enabled {
            PathKind::ExistingFile
        } else {
            PathKind::Unread
        };
        let mtls = MTlsSection {
            enabled,
            client_certificate_path: self.path(&mut s, "ClientCertificatePath", certificate)?,
            client_key_path: self.path(&mut s, "ClientKeyPath", certificate)?,
            server_ca_certificate_path: self.path(&mut s, "ServerCaCertificatePath", certificate)?,
            expected_server_certificate_subject: self.optional_text(&mut s, "ExpectedServerCertificateSubject")?,
            validate_certificate_chain: self.boolean(
                &mut s,
                "ValidateCertificateChain",
                defaults.validate_certificate_chain,
            )?,
        };
        if mtls.enabled {
            let required = [
                (
                    "ClientCertificatePath",
                    mtls.client_certificate_path.is_none(),
                    "client certificate",
                ),
                (
                    "ClientKeyPath",
                    mtls.client_key_path.is_none(),
                    "client certificate's private key",
                ),
            ];
            for (name, missing, what) in required {
                if missing {
                    return Err(self.invalid(
                        s.key(name),
                        "not set".to_string(),
                        &Origin::Unset,
                        format!(
                            "MTls.Enabled is true{}, which needs the {what} (a PEM file); \
                             set MTls.{name} to its path, or set MTls.Enabled to false",
                            enabled_from_env.as_deref().unwrap_or("")
                        ),
                    ));
                }
            }
        }
        self.finish(s);
        Ok(mtls)
    }

    fn agent_runtime(&mut self, root: &mut Section) -> Result<AgentRuntimeSection, ConfigError> {
        let defaults = AgentRuntimeSection::default();
        let mut s = self.section(root, "AgentRuntime")?;
        let default_model = self.text(&mut s, "DefaultModel", &defaults.default_model)?;
        let default_temperature = self.value(
            &mut s,
            "DefaultTemperature",
            defaults.default_temperature,
            "a number of 0 or more, e.g. 0.7",
            |scalar| scalar.float().filter(|t| *t >= 0.0),
        )?;
        let max_tokens = self.integer(
            &mut s,
            "MaxTokens",
            defaults.max_tokens,
            0..=i32::MAX as i128,
            "a whole number of tokens per run, 0 or more, e.g. 4000",
        )?;
        let max_duration = self.seconds(
            &mut s,
            "MaxDurationSeconds",
            defaults.max_duration,
            1..=i32::MAX as i128,
            "a whole number of seconds greater than 0, e.g. 60",
        )?;
        let azure_ai_foundry = self.azure_ai_foundry(&mut s)?;
        let openai = self.openai(&mut s)?;
        let prices = self.prices(&mut s)?;
        self.finish(s);
        Ok(AgentRuntimeSection {
            default_model,
            default_temperature,
            max_tokens,
            max_duration,
            azure_ai_foundry,
            openai,
            prices,
        })
    }

    /// `AgentRuntime.OpenAI`: a generic OpenAI-compatible endpoint. The key
    /// comes from `ApiKey` or from the environment variable that
    /// `ApiKeyEnvironmentVariable` names (so it need not sit in the file).
    fn openai(&mut self, parent: &mut Section) -> Result<OpenAiSection, ConfigError> {
        let mut s = self.section(parent, "OpenAI")?;
        let endpoint = self.url(&mut s, "Endpoint", "http://127.0.0.1:8000", true)?.flatten();
        let mut api_key = self.optional_text(&mut s, "ApiKey")?.map(Secret::new);
        let variable_key = s.key("ApiKeyEnvironmentVariable");
        let (variable, variable_origin) = match self.setting(&mut s, "ApiKeyEnvironmentVariable", "a string")? {
            None => (None, Origin::Unset),
            Some(setting) => (
                setting.scalar.text().filter(|text| !text.trim().is_empty()),
                setting.origin,
            ),
        };
        if let Some(variable) = &variable {
            match self.env.get(variable) {
                Some(value) if !value.is_empty() => api_key = Some(Secret::new(value.clone())),
                _ => {
                    return Err(self.invalid(
                        variable_key,
                        format!("{variable:?}"),
                        &variable_origin,
                        format!(
                            "the environment variable {variable} is not set; export it with the \
                             API key, or set AgentRuntime.OpenAI.ApiKey"
                        ),
                    ));
                }
            }
        }
        self.finish(s);
        Ok(OpenAiSection {
            endpoint,
            api_key,
            api_key_environment_variable: variable,
        })
    }

    /// `AgentRuntime.Prices`: `{"model": {"InputPer1K": 0.15, "OutputPer1K": 0.6}}`.
    fn prices(&mut self, parent: &mut Section) -> Result<BTreeMap<String, ModelPrice>, ConfigError> {
        let mut s = self.section(parent, "Prices")?;
        let models: Vec<String> = s.entries.0.iter().map(|(name, _)| name.clone()).collect();
        let mut prices = BTreeMap::new();
        for model in models {
            let mut m = self.section(&mut s, &model)?;
            let per_1k = |binder: &Self, m: &mut Section, name: &str| {
                binder.value(m, name, 0.0, "USD per 1,000 tokens, 0 or more, e.g. 0.15", |scalar| {
                    scalar.float().filter(|price| *price >= 0.0)
                })
            };
            let price = ModelPrice {
                input_per_1k: per_1k(self, &mut m, "InputPer1K")?,
                output_per_1k: per_1k(self, &mut m, "OutputPer1K")?,
            };
            self.finish(m);
            prices.insert(model, price);
        }
        self.finish(s);
        Ok(prices)
    }

    /// `Sandbox.AllowedHosts`: agent id -> hosts its runs may reach over
    /// HTTP, as a JSON array or a comma-separated string of `host` or
    /// `host:port`.
    fn allowed_hosts(&mut self, parent: &mut Section) -> Result<BTreeMap<String, Vec<String>>, ConfigError> {
        let mut s = self.section(parent, "AllowedHosts")?;
        let agents: Vec<String> = s.entries.0.iter().map(|(name, _)| name.clone()).collect();
        let mut grants = BTreeMap::new();
        for agent in agents {
            let key = s.key(&agent);
            let Some(node) = s.entries.take(&agent) else { continue };
            let hosts = self.host_list(key, &node)?;
            grants.insert(agent, hosts);
        }
        Ok(grants)
    }

    /// An agent's HTTP hosts: a JSON array or a comma-separated string of
    /// `host` or `host:port`.
    fn host_list(&self, key: String, node: &Node) -> Result<Vec<String>, ConfigError> {
        let hosts = names(node);
        if let Some(bad) = hosts.iter().find(|host| !valid_host(host)) {
            return Err(self.invalid(
                key,
                format!("{bad:?}"),
                &node.origin,
                "expected hosts as `host` or `host:port` (no scheme, no path), e.g. \
                 [\"api.example.com\", \"127.0.0.1:8080\"]"
                    .to_string(),
            ));
        }
        Ok(hosts)
    }

    /// `Sandbox.Grants`: agent id -> `Directories`, `Environment` and
    /// `AllowedHosts` granted to its runs.
    fn grants(&mut self, parent: &mut Section) -> Result<BTreeMap<String, Grants>, ConfigError> {
        let mut s = self.section(parent, "Grants")?;
        let agents: Vec<String> = s.entries.0.iter().map(|(name, _)| name.clone()).collect();
        let mut grants = BTreeMap::new();
        for agent in agents {
            let mut a = self.section(&mut s, &agent)?;
            let directories = self.directory_grants(&mut a)?;
            let environment = match a.entries.take("Environment") {
                None => Vec::new(),
                Some(node) => {
                    let names = names(&node);
                    if let Some(secret) = names
                        .iter()
                        .find(|name| self.key_variables.contains(name) || configures_the_node(name))
                    {
                        return Err(self.invalid(
                            a.key("Environment"),
                            format!("{secret:?}"),
                            &node.origin,
                            "that variable configures the node or holds its LLM key, which an \
                             agent is never given; remove it from the grant (and give the agent \
                             what it needs in a variable of its own)"
                                .to_string(),
                        ));
                    }
                    if let Some(bad) = names.iter().find(|name| check_environment_name(name).is_err()) {
                        return Err(self.invalid(
                            a.key("Environment"),
                            format!("{bad:?}"),
                            &node.origin,
                            "expected names of environment variables, e.g. [\"TENANT_ID\"] \
                             (the name only: the value is read from the node's environment at \
                             run time)"
                                .to_string(),
                        ));
                    }
                    names
                }
            };
            let http_hosts = match a.entries.take("AllowedHosts") {
                None => Vec::new(),
                Some(node) => self.host_list(a.key("AllowedHosts"), &node)?,
            };
            self.finish(a);
            grants.insert(
                agent,
                Grants {
                    directories,
                    environment,
                    http_hosts,
                },
            );
        }
        self.finish(s);
        Ok(grants)
    }

    /// `Directories`: a list of `{"HostPath", "GuestPath", "ReadOnly"}`;
    /// `ReadOnly` defaults to true, so write access is only ever asked for.
    fn directory_grants(&mut self, agent: &mut Section) -> Result<Vec<DirectoryGrant>, ConfigError> {
        let key = agent.key("Directories");
        let entries = match agent.entries.take("Directories") {
            None => return Ok(Vec::new()),
            Some(Node {
                kind: Kind::Value(Scalar::Null),
                ..
            }) => return Ok(Vec::new()),
            Some(Node {
                kind: Kind::Section { entries, .. },
                ..
            }) => entries,
            Some(node) => {
                return Err(self.invalid(
                    key,
                    node.describe(),
                    &node.origin,
                    "expected a list of directories, e.g. [{\"HostPath\": \"/srv/agent-data\", \
                     \"GuestPath\": \"/data\", \"ReadOnly\": true}]"
                        .to_string(),
                ));
            }
        };
        let mut list = Section { key, entries };
        let names: Vec<String> = list.entries.0.iter().map(|(name, _)| name.clone()).collect();
        let mut directories: Vec<DirectoryGrant> = Vec::new();
        for name in names {
            let mut d = self.section(&mut list, &name)?;
            let Some(host_path) = self.path(&mut d, "HostPath", PathKind::ExistingDirectory)? else {
                return Err(self.invalid(
                    d.key("HostPath"),
                    "not set".to_string(),
                    &Origin::Unset,
                    "expected the host directory to grant, e.g. /srv/agent-data".to_string(),
                ));
            };
            let guest_key = d.key("GuestPath");
            let guest = self.setting(&mut d, "GuestPath", "an absolute guest path")?;
            let (guest_path, origin) = match guest {
                Some(setting) => (setting.scalar.text().unwrap_or_default(), setting.origin),
                None => (String::new(), Origin::Unset),
            };
            let problem = match check_guest_path(&guest_path) {
                Err(_) => Some(
                    "expected an absolute path without `.` or `..` segments, `:` or `,`, \
                                where the agent sees the directory, e.g. /data",
                ),
                Ok(())
                    if directories
                        .iter()
                        .any(|other| other.guest_path.trim_end_matches('/') == guest_path.trim_end_matches('/')) =>
                {
                    Some(
                        "another directory of this agent is already granted at this guest path; \
                          give each its own",
                    )
                }
                Ok(()) => None,
            };
            if let Some(fix) = problem {
                let found = if guest_path.is_empty() {
                    "not set".to_string()
                } else {
                    format!("{guest_path:?}")
                };
                return Err(self.invalid(guest_key, found, &origin, fix.to_string()));
            }
            let read_only = self.boolean(&mut d, "ReadOnly", true)?;
            self.finish(d);
            directories.push(DirectoryGrant {
                host_path,
                guest_path,
                read_only,
            });
        }
        self.finish(list);
        Ok(directories)
    }

    fn azure_ai_foundry(&mut self, parent: &mut Section) -> Result<AzureAiFoundry, ConfigError> {
        let mut s = self.section(parent, "AzureAIFoundry")?;
        let foundry = AzureAiFoundry {
            endpoint: self
                .url(&mut s, "Endpoint", "https://my-project.services.ai.azure.com", true)?
                .flatten(),
            deployment_name: self.optional_text(&mut s, "DeploymentName")?,
            api_key: self.optional_text(&mut s, "ApiKey")?.map(Secret::new),
            use_managed_identity: self.boolean(&mut s, "UseManagedIdentity", false)?,
        };
        self.finish(s);
        Ok(foundry)
    }

    fn open_telemetry(&mut self, root: &mut Section) -> Result<OpenTelemetrySection, ConfigError> {
        let defaults = OpenTelemetrySection::default();
        let mut s = self.section(root, "OpenTelemetry")?;
        let service_name = self.required_text(
            &mut s,
            "ServiceName",
            &defaults.service_name,
            "a non-empty service name, e.g. Node.Runtime",
        )?;
        let service_version = self.text(&mut s, "ServiceVersion", &defaults.service_version)?;

        let mut exporter = self.section(&mut s, "OtlpExporter")?;
        let otlp_exporter = OtlpExporter {
            endpoint: self
                .url(&mut exporter, "Endpoint", "http://localhost:4317", true)?
                .unwrap_or(defaults.otlp_exporter.endpoint),
            protocol: self.value(
                &mut exporter,
                "Protocol",
                defaults.otlp_exporter.protocol,
                "grpc or http/protobuf",
                |scalar| {
                    let text = scalar.text()?;
                    let text = text.trim();
                    if text.eq_ignore_ascii_case("grpc") {
                        Some(OtlpProtocol::Grpc)
                    } else if text.eq_ignore_ascii_case("http/protobuf") || text.eq_ignore_ascii_case("HttpProtobuf") {
                        Some(OtlpProtocol::HttpProtobuf)
                    } else {
                        None
                    }
                },
            )?,
        };
        self.finish(exporter);

        let mut console = self.section(&mut s, "ConsoleExporter")?;
        let console_exporter_enabled = self.boolean(&mut console, "Enabled", defaults.console_exporter_enabled)?;
        self.finish(console);

        let mut traces = self.section(&mut s, "Traces")?;
        let traces_config = Traces {
            enabled: self.boolean(&mut traces, "Enabled", defaults.traces.enabled)?,
            sampling_ratio: self.value(
                &mut traces,
                "SamplingRatio",
                defaults.traces.sampling_ratio,
                "a number from 0 to 1 (the fraction of traces kept), e.g. 1.0",
                |scalar| scalar.float().filter(|r| (0.0..=1.0).contains(r)),
            )?,
        };
        self.finish(traces);

        let mut metrics = self.section(&mut s, "Metrics")?;
        let metrics_config = Metrics {
            enabled: self.boolean(&mut metrics, "Enabled", defaults.metrics.enabled)?,
            export_interval: Duration::from_millis(self.integer(
                &mut metrics,
                "ExportIntervalMilliseconds",
                defaults.metrics.export_interval.as_millis() as u64,
                1..=i32::MAX as i128,
                "a whole number of milliseconds greater than 0, e.g. 60000",
            )?),
        };
        self.finish(metrics);
        self.finish(s);
        Ok(OpenTelemetrySection {
            service_name,
            service_version,
            otlp_exporter,
            console_exporter_enabled,
            traces: traces_config,
            metrics: metrics_config,
        })
    }

    /// `Logging.LogLevel`; a category that cannot be a `tracing` target
    /// (it has `,`, `=`, brackets or spaces in it) is ignored.
    fn logging(&mut self, root: &mut Section) -> Result<LoggingSection, ConfigError> {
        let mut s = self.section(root, "Logging")?;
        let mut levels = self.section(&mut s, "LogLevel")?;
        let names: Vec<String> = levels.entries.0.iter().map(|(name, _)| name.clone()).collect();
        let expected = "a log level: one of Trace, Debug, Information, Warning, Error, Critical, None";
        let mut log_level = BTreeMap::new();
        for name in names {
            if !usable_as_target(&name) {
                continue;
            }
            let level = self.value(&mut levels, &name, None, expected, |scalar| {
                parse_log_level(&scalar.text()?).map(Some)
            })?;
            if let Some(level) = level {
                log_level.insert(name, level);
            }
        }
        self.finish(levels);
        self.finish(s);
        Ok(LoggingSection { log_level })
    }

    fn sandbox(&mut self, root: &mut Section) -> Result<SandboxSection, ConfigError> {
        let defaults = SandboxSection::default();
        let mut s = self.section(root, "Sandbox")?;
        let allowed_hosts = self.allowed_hosts(&mut s)?;
        let grants = self.grants(&mut s)?;
        let size_expected =
            |example: &str| format!("a size in bytes of at least 1: a number, or with a unit such as {example}");
        let sandbox = SandboxSection {
            default_fuel: self.integer(
                &mut s,
                "DefaultFuel",
                defaults.default_fuel,
                1..=u64::MAX as i128,
                "a whole number of at least 1 (fuel units, about one per instruction), \
                 e.g. 10000000000",
            )?,
            max_memory_bytes: self.size(
                &mut s,
                "MaxMemoryBytes",
                defaults.max_memory_bytes,
                64 << 10,
                "a size of at least 64KiB (one WebAssembly page): a number of bytes, \
                 or with a unit such as 256MiB, 256Mi, 1GiB",
            )?,
            max_table_elements: self.integer(
                &mut s,
                "MaxTableElements",
                defaults.max_table_elements,
                1..=u32::MAX as i128,
                "a whole number of at least 1, e.g. 100000",
            )?,
            max_result_bytes: self.size(
                &mut s,
                "MaxResultBytes",
                defaults.max_result_bytes as u64,
                1,
                &size_expected("1MiB"),
            )? as usize,
            max_log_lines: self.integer(
                &mut s,
                "MaxLogLines",
                defaults.max_log_lines,
                0..=u32::MAX as i128,
                "a whole number, 0 or more, e.g. 1000",
            )?,
            max_log_bytes: self.size(
                &mut s,
                "MaxLogBytes",
                defaults.max_log_bytes as u64,
                0,
                "a size in bytes, 0 or more: a number, or with a unit such as 1MiB",
            )? as usize,
            allocator: self.value(
                &mut s,
                "Allocator",
                defaults.allocator,
                "auto, pooling or on-demand",
                |scalar| parse_allocator(&scalar.text()?),
            )?,
            engine: self.value(
                &mut s,
                "Engine",
                defaults.engine,
                "cranelift (native code) or pulley (the interpreter)",
                |scalar| Execution::parse(&scalar.text()?),
            )?,
            allowed_hosts,
            compiled_cache_max_bytes: self.size(
                &mut s,
                "CompiledCacheMaxBytes",
                defaults.compiled_cache_max_bytes,
                0,
                "a size in bytes, 0 (no cache on disk) or more: a number, or with a unit such as 1GiB",
            )?,
            grants,
        };
        self.finish(s);
        Ok(sandbox)
    }
}

impl Binder<'_> {
    fn agent_store(&mut self, root: &mut Section) -> Result<AgentStoreSection, ConfigError> {
        let defaults = AgentStoreSection::default();
        let mut s = self.section(root, "AgentStore")?;
        let template_expected = "a URL template with {agent_id} and {version}, starting with \
             http://, https:// or {base} (the ControlPlaneUrl), \
             e.g. {base}/agents/{agent_id}/{version}.wasm";
        let http_url_template = match self.setting(&mut s, "HttpUrlTemplate", template_expected)? {
            None => None,
            Some(setting) => match setting.scalar.text() {
                Some(text) if text.trim().is_empty() => None,
                Some(text) if valid_url_template(text.trim()) => Some(text.trim().to_string()),
                _ => return Err(self.rejected(setting, template_expected)),
            },
        };
        let oci_expected = "an OCI reference template REGISTRY/REPOSITORY:TAG with {agent_id} and \
             {version}, e.g. 127.0.0.1:5000/agents/{agent_id}:{version}";
        let oci_reference_template = match self.setting(&mut s, "OciReferenceTemplate", oci_expected)? {
            None => None,
            Some(setting) => match setting.scalar.text() {
                Some(text) if text.trim().is_empty() => None,
                Some(text) if valid_oci_template(text.trim()) => Some(text.trim().to_string()),
                _ => return Err(self.rejected(setting, oci_expected)),
            },
        };
        let sources_key = s.key("Sources");
        let sources = match s.entries.take("Sources") {
            None => {
                let mut sources = defaults.sources.clone();
                if http_url_template.is_some() {
                    sources.push(AgentSourceKind::Http);
                }
                if oci_reference_template.is_some() {
                    sources.push(AgentSourceKind::Oci);
                }
                sources
            }
            Some(node) => {
                let names = names(&node);
                let expected = "a list of sources to try in order, each directory, http or oci, \
                     e.g. [\"directory\", \"oci\"]";
                let mut sources = Vec::new();
                for name in &names {
                    let kind = match name.to_ascii_lowercase().as_str() {
                        "directory" => AgentSourceKind::Directory,
                        "http" => AgentSourceKind::Http,
                        "oci" => AgentSourceKind::Oci,
                        _ => {
                            return Err(self.invalid(
                                sources_key,
                                format!("{name:?}"),
                                &node.origin,
                                expected.to_string(),
                            ));
                        }
                    };
                    if !sources.contains(&kind) {
                        sources.push(kind);
                    }
                }
                if sources.is_empty() {
                    return Err(self.invalid(sources_key, node.describe(), &node.origin, expected.to_string()));
                }
                if sources.contains(&AgentSourceKind::Http) && http_url_template.is_none() {
                    return Err(self.invalid(
                        sources_key,
                        node.describe(),
                        &node.origin,
                        "http is listed but AgentStore.HttpUrlTemplate is not set; set it, \
                         e.g. {base}/agents/{agent_id}/{version}.wasm, or drop http"
                            .to_string(),
                    ));
                }
                if sources.contains(&AgentSourceKind::Oci) && oci_reference_template.is_none() {
                    return Err(self.invalid(
                        sources_key,
                        node.describe(),
                        &node.origin,
                        "oci is listed but AgentStore.OciReferenceTemplate is not set; set it, \
                         e.g. 127.0.0.1:5000/agents/{agent_id}:{version}, or drop oci"
                            .to_string(),
                    ));
                }
                sources
            }
        };
        let store = AgentStoreSection {
            sources,
            http_url_template,
            oci_reference_template,
            oci_insecure: self.boolean(&mut s, "OciInsecure", defaults.oci_insecure)?,
            oci_username: self.optional_text(&mut s, "OciUsername")?,
            oci_password: self.optional_text(&mut s, "OciPassword")?.map(Secret::new),
            max_download_bytes: self.size(
                &mut s,
                "MaxDownloadBytes",
                defaults.max_download_bytes,
                1,
                "a size in bytes of at least 1: a number, or with a unit such as 256MiB",
            )?,
            download_timeout: self.seconds(
                &mut s,
                "DownloadTimeoutSeconds",
                defaults.download_timeout,
                1..=86_400,
                "whole seconds from 1 to 86400, e.g. 60",
            )?,
            require_digest: self.boolean(&mut s, "RequireDigest", defaults.require_digest)?,
        };
        self.finish(s);
        Ok(store)
    }
}

/// Whether `template` names both placeholders and is an OCI reference
/// once they are filled in.
fn valid_oci_template(template: &str) -> bool {
    let placeholders = template.contains("{agent_id}") && template.contains("{version}");
    let sample = template.replace("{agent_id}", "echo").replace("{version}", "1.0.0");
    placeholders && !sample.contains("://") && sample.parse::<oci_client::Reference>().is_ok()
}

/// Whether `template` names both placeholders and is an http(s) URL once
/// `{base}` is replaced by a sample control-plane URL.
fn valid_url_template(template: &str) -> bool {
    let placeholders = template.contains("{agent_id}") && template.contains("{version}");
    let sample = template
        .replace("{base}", "http://control-plane:5109")
        .replace("{agent_id}", "echo")
        .replace("{version}", "1.0.0");
    placeholders && http_url(&sample).is_some()
}

/// `http::Uri` accepts `localhost:5109` and `/path`; the node needs a
/// scheme it can speak and a host to speak to.
fn http_url(text: &str) -> Option<http::Uri> {
    let uri: http::Uri = text.parse().ok()?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http") | Some("https"));
    let host_ok = uri.host().is_some_and(|host| !host.is_empty());
    (scheme_ok && host_ok).then_some(uri)
}

/// A .NET level name in any case, or its number (`"2"` is Information), as
/// the .NET binder reads an enum.
fn parse_log_level(text: &str) -> Option<LogLevel> {
    let text = text.trim();
    if let Ok(number) = text.parse::<usize>() {
        return LogLevel::ALL.get(number).copied();
    }
    LogLevel::ALL
        .into_iter()
        .find(|level| level.as_str().eq_ignore_ascii_case(text))
}

fn parse_allocator(text: &str) -> Option<AllocatorChoice> {
    match text.trim().to_ascii_lowercase().as_str() {
        "auto" => Some(AllocatorChoice::Auto),
        "pooling" => Some(AllocatorChoice::Pooling),
        "on-demand" | "ondemand" => Some(AllocatorChoice::OnDemand),
        _ => None,
    }
}

/// Whether `EnvFilter` can parse `name` as a target: it starts with a
/// letter, digit, `-`, `_` or `:`, and holds none of the directive syntax.
fn usable_as_target(name: &str) -> bool {
    let starts_well = name
        .chars()
        .next()
        .is_some_and(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ':'));
    starts_well
        && !name
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, ',' | '=' | '[' | ']' | '{' | '}'))
}

/// The entries of a list given as a JSON array or a comma-separated string,
/// trimmed, blanks dropped.
fn names(node: &Node) -> Vec<String> {
    let texts: Vec<String> = match &node.kind {
        Kind::Value(scalar) => scalar
            .text()
            .unwrap_or_default()
            .split(',')
            .map(str::to_string)
            .collect(),
        Kind::Section { entries, .. } => entries
            .0
            .iter()
            .filter_map(|(_, item)| match &item.kind {
                Kind::Value(scalar) => scalar.text(),
                Kind::Section { .. } => None,
            })
            .collect(),
    };
    texts
        .into_iter()
        .map(|text| text.trim().to_string())
        .filter(|text| !text.is_empty())
        .collect()
}

/// Whether the variable `name` is one of the node's settings
/// (`AgentRuntime__OpenAI__ApiKey`), as `tree::apply_env` reads them.
fn configures_the_node(name: &str) -> bool {
    let normalised = name.replace("__", ":");
    let mut path = normalised.split(':');
    let section = path.next().unwrap_or_default();
    path.next().is_some() && tree::SECTIONS.iter().any(|known| tree::same_key(known, section))
}

/// `host` or `host:port`, with no scheme, path or blank.
fn valid_host(entry: &str) -> bool {
    let (host, port) = match entry.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (entry, None),
    };
    !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        && port.is_none_or(|port| port.parse::<u16>().is_ok())
}
