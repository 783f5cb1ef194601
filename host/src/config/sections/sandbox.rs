//! `Sandbox` (this node): the ceilings of every run, and what each agent
//! may reach (`AllowedHosts`, `Grants`). Its type and defaults, its
//! binding, and its printed view, so that each of its keys is spelt here
//! only.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::effective::path;
use crate::config::error::ConfigError;
use crate::config::reader::{PathKind, Reader, Section, names};
use crate::config::tree::{self, Kind, Node, Origin, Scalar};
use crate::sandbox::grants::{
    DirectoryGrant, Grants, NodePath, check_environment_name, check_guest_path, check_node_paths, check_separation,
};
use crate::sandbox::{AllocatorChoice, CompileLimits, Execution, NodeLimits};

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
    /// `MaxComponentBytes`, `MaxFunctions`, `MaxFunctionBytes`,
    /// `MaxNesting`, `MaxFunctionLocals`, `MaxLocals`: how much code a
    /// component may bring to be compiled.
    pub compile_limits: CompileLimits,
    /// `Grants` (agent id -> `Directories`, `Environment`, `AllowedHosts`):
    /// what each agent may reach beyond clocks and random; host
    /// directories exist (checked at load). An agent not listed gets none.
    pub grants: BTreeMap<String, Grants>,
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
            compile_limits: CompileLimits::default(),
            grants: BTreeMap::new(),
        }
    }
}

/// `Sandbox`. `key_variables` are the variables that hold a key of the
/// node's (the LLM's), which no grant may pass to an agent; `node_paths`
/// the node's own directories and files, which no grant may overlap.
pub(in crate::config) fn bind(
    reader: &mut Reader<'_>,
    root: &mut Section,
    key_variables: &[String],
    node_paths: &[NodePath],
) -> Result<SandboxSection, ConfigError> {
    let defaults = SandboxSection::default();
    let mut s = reader.section(root, "Sandbox")?;
    let allowed_hosts = allowed_hosts(reader, &mut s)?;
    let grants = grants(reader, &mut s, key_variables, node_paths)?;
    let size_expected =
        |example: &str| format!("a size in bytes of at least 1: a number, or with a unit such as {example}");
    let sandbox = SandboxSection {
        default_fuel: reader.integer(
            &mut s,
            "DefaultFuel",
            defaults.default_fuel,
            1..=u64::MAX as i128,
            "a whole number of at least 1 (fuel units, about one per instruction), \
             e.g. 10000000000",
        )?,
        max_memory_bytes: reader.size(
            &mut s,
            "MaxMemoryBytes",
            defaults.max_memory_bytes,
            64 << 10,
            "a size of at least 64KiB (one WebAssembly page): a number of bytes, \
             or with a unit such as 256MiB, 256Mi, 1GiB",
        )?,
        max_table_elements: reader.integer(
            &mut s,
            "MaxTableElements",
            defaults.max_table_elements,
            1..=u32::MAX as i128,
            "a whole number of at least 1, e.g. 100000",
        )?,
        max_result_bytes: reader.size(
            &mut s,
            "MaxResultBytes",
            defaults.max_result_bytes as u64,
            1,
            &size_expected("1MiB"),
        )? as usize,
        max_log_lines: reader.integer(
            &mut s,
            "MaxLogLines",
            defaults.max_log_lines,
            0..=u32::MAX as i128,
            "a whole number, 0 or more, e.g. 1000",
        )?,
        max_log_bytes: reader.size(
            &mut s,
            "MaxLogBytes",
            defaults.max_log_bytes as u64,
            0,
            "a size in bytes, 0 or more: a number, or with a unit such as 1MiB",
        )? as usize,
        allocator: reader.value(
            &mut s,
            "Allocator",
            defaults.allocator,
            "auto, pooling or on-demand",
            |scalar| parse_allocator(&scalar.text()?),
        )?,
        engine: reader.value(
            &mut s,
            "Engine",
            defaults.engine,
            "cranelift (native code) or pulley (the interpreter)",
            |scalar| Execution::parse(&scalar.text()?),
        )?,
        allowed_hosts,
        compiled_cache_max_bytes: reader.size(
            &mut s,
            "CompiledCacheMaxBytes",
            defaults.compiled_cache_max_bytes,
            0,
            "a size in bytes, 0 (no cache on disk) or more: a number, or with a unit such as 1GiB",
        )?,
        compile_limits: CompileLimits {
            max_bytes: reader.size(
                &mut s,
                "MaxComponentBytes",
                defaults.compile_limits.max_bytes,
                1,
                &size_expected("64MiB"),
            )?,
            max_functions: reader.integer(
                &mut s,
                "MaxFunctions",
                defaults.compile_limits.max_functions,
                1..=u32::MAX as i128,
                "a whole number of functions of at least 1, e.g. 100000",
            )?,
            max_function_bytes: u32::try_from(reader.size(
                &mut s,
                "MaxFunctionBytes",
                u64::from(defaults.compile_limits.max_function_bytes),
                1,
                "a size in bytes from 1 to 4GiB: a number, or with a unit such as 2MiB",
            )?)
            .unwrap_or(u32::MAX),
            max_nesting: reader.integer(
                &mut s,
                "MaxNesting",
                defaults.compile_limits.max_nesting,
                1..=u32::MAX as i128,
                "a whole number of nested blocks of at least 1, e.g. 4000",
            )?,
            max_function_locals: reader.integer(
                &mut s,
                "MaxFunctionLocals",
                defaults.compile_limits.max_function_locals,
                1..=u32::MAX as i128,
                "a whole number of locals (parameters included) of at least 1, e.g. 10000",
            )?,
            max_locals: reader.integer(
                &mut s,
                "MaxLocals",
                defaults.compile_limits.max_locals,
                1..=u64::MAX as i128,
                "a whole number of locals (parameters included) of at least 1, e.g. 2000000",
            )?,
        },
        grants,
    };
    reader.finish(s);
    Ok(sandbox)
}

/// `Sandbox.AllowedHosts`: agent id -> hosts its runs may reach over
/// HTTP, as a JSON array or a comma-separated string of `host` or
/// `host:port`.
fn allowed_hosts(reader: &mut Reader<'_>, parent: &mut Section) -> Result<BTreeMap<String, Vec<String>>, ConfigError> {
    let mut s = reader.section(parent, "AllowedHosts")?;
    let agents: Vec<String> = s.entries.names();
    let mut grants = BTreeMap::new();
    for agent in agents {
        let key = s.key(&agent);
        let Some(node) = s.entries.take(&agent) else { continue };
        let hosts = host_list(reader, key, &node)?;
        grants.insert(agent, hosts);
    }
    Ok(grants)
}

/// An agent's HTTP hosts: a JSON array or a comma-separated string of
/// `host` or `host:port`.
pub(super) fn host_list(reader: &Reader<'_>, key: String, node: &Node) -> Result<Vec<String>, ConfigError> {
    let hosts = names(node);
    if let Some(bad) = hosts.iter().find(|host| !valid_host(host)) {
        return Err(reader.invalid(
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
fn grants(
    reader: &mut Reader<'_>,
    parent: &mut Section,
    key_variables: &[String],
    node_paths: &[NodePath],
) -> Result<BTreeMap<String, Grants>, ConfigError> {
    let mut s = reader.section(parent, "Grants")?;
    let agents: Vec<String> = s.entries.names();
    let mut grants = BTreeMap::new();
    // Where each agent's grants were written, for an error about two of them.
    let mut origins: BTreeMap<String, Origin> = s
        .entries
        .iter()
        .map(|(name, node)| (name.clone(), node.origin.clone()))
        .collect();
    for agent in agents {
        let mut a = reader.section(&mut s, &agent)?;
        let directories = directory_grants(reader, &mut a)?;
        let environment = match a.entries.take("Environment") {
            None => Vec::new(),
            Some(node) => {
                let names = names(&node);
                if let Some(secret) = names
                    .iter()
                    .find(|name| key_variables.contains(name) || configures_the_node(name))
                {
                    return Err(reader.invalid(
                        a.key("Environment"),
                        format!("{secret:?}"),
                        &node.origin,
                        "that variable configures the node or holds its LLM key or a secret, which an \
                         agent is never given; remove it from the grant (and give the agent \
                         what it needs in a variable of its own)"
                            .to_string(),
                    ));
                }
                if let Some(bad) = names.iter().find(|name| check_environment_name(name).is_err()) {
                    return Err(reader.invalid(
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
            Some(node) => host_list(reader, a.key("AllowedHosts"), &node)?,
        };
        reader.finish(a);
        grants.insert(
            agent,
            Grants {
                directories,
                environment,
                http_hosts,
            },
        );
    }
    if let Err(overlap) = check_separation(&grants) {
        let key = format!("{}.Directories.{}.HostPath", s.key(&overlap.agent_id), overlap.index);
        let origin = origins.remove(&overlap.agent_id).unwrap_or(Origin::Unset);
        let found = format!(
            "{:?}, {} {:?} (agent `{}`, read-write)",
            overlap.host_path.display().to_string(),
            overlap.relation(),
            overlap.writer_host_path.display().to_string(),
            overlap.writer_agent_id,
        );
        return Err(reader.invalid(key, found, &origin, overlap.to_string()));
    }
    if let Err(overlap) = check_node_paths(&grants, node_paths) {
        let key = format!("{}.Directories.{}.HostPath", s.key(&overlap.agent_id), overlap.index);
        let origin = origins.remove(&overlap.agent_id).unwrap_or(Origin::Unset);
        let found = format!(
            "{:?}, {} {} {:?}",
            overlap.host_path.display().to_string(),
            overlap.relation(),
            overlap.node_key,
            overlap.node_path.display().to_string(),
        );
        return Err(reader.invalid(key, found, &origin, overlap.to_string()));
    }
    reader.finish(s);
    Ok(grants)
}

/// `Directories`: a list of `{"HostPath", "GuestPath", "ReadOnly"}`;
/// `ReadOnly` defaults to true, so write access is only ever asked for.
fn directory_grants(reader: &mut Reader<'_>, agent: &mut Section) -> Result<Vec<DirectoryGrant>, ConfigError> {
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
            return Err(reader.invalid(
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
    let names: Vec<String> = list.entries.names();
    let mut directories: Vec<DirectoryGrant> = Vec::new();
    for name in names {
        let mut d = reader.section(&mut list, &name)?;
        let Some(host_path) = reader.path(&mut d, "HostPath", PathKind::ExistingDirectory)? else {
            return Err(reader.invalid(
                d.key("HostPath"),
                "not set".to_string(),
                &Origin::Unset,
                "expected the host directory to grant, e.g. /srv/agent-data".to_string(),
            ));
        };
        let guest_key = d.key("GuestPath");
        let guest = reader.setting(&mut d, "GuestPath", "an absolute guest path")?;
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
            return Err(reader.invalid(guest_key, found, &origin, fix.to_string()));
        }
        let read_only = reader.boolean(&mut d, "ReadOnly", true)?;
        reader.finish(d);
        directories.push(DirectoryGrant {
            host_path,
            guest_path,
            read_only,
        });
    }
    reader.finish(list);
    Ok(directories)
}

fn parse_allocator(text: &str) -> Option<AllocatorChoice> {
    match text.trim().to_ascii_lowercase().as_str() {
        "auto" => Some(AllocatorChoice::Auto),
        "pooling" => Some(AllocatorChoice::Pooling),
        "on-demand" | "ondemand" => Some(AllocatorChoice::OnDemand),
        _ => None,
    }
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

/// `Sandbox` as `config check` prints it.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(in crate::config) struct View<'a> {
    default_fuel: u64,
    max_memory_bytes: u64,
    max_table_elements: u32,
    max_result_bytes: usize,
    max_log_lines: u32,
    max_log_bytes: usize,
    allocator: &'static str,
    engine: &'static str,
    allowed_hosts: &'a BTreeMap<String, Vec<String>>,
    compiled_cache_max_bytes: u64,
    max_component_bytes: u64,
    max_functions: u32,
    max_function_bytes: u32,
    max_nesting: u32,
    max_function_locals: u32,
    max_locals: u64,
    grants: BTreeMap<&'a str, AgentGrantsView<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct AgentGrantsView<'a> {
    directories: Vec<DirectoryView<'a>>,
    environment: &'a [String],
    allowed_hosts: &'a [String],
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct DirectoryView<'a> {
    host_path: String,
    guest_path: &'a str,
    read_only: bool,
}

impl<'a> View<'a> {
    pub(in crate::config) fn of(sandbox: &'a SandboxSection) -> Self {
        View {
            default_fuel: sandbox.default_fuel,
            max_memory_bytes: sandbox.max_memory_bytes,
            max_table_elements: sandbox.max_table_elements,
            max_result_bytes: sandbox.max_result_bytes,
            max_log_lines: sandbox.max_log_lines,
            max_log_bytes: sandbox.max_log_bytes,
            allocator: match sandbox.allocator {
                AllocatorChoice::Auto => "auto",
                AllocatorChoice::Pooling => "pooling",
                AllocatorChoice::OnDemand => "on-demand",
            },
            engine: sandbox.engine.as_str(),
            allowed_hosts: &sandbox.allowed_hosts,
            compiled_cache_max_bytes: sandbox.compiled_cache_max_bytes,
            max_component_bytes: sandbox.compile_limits.max_bytes,
            max_functions: sandbox.compile_limits.max_functions,
            max_function_bytes: sandbox.compile_limits.max_function_bytes,
            max_nesting: sandbox.compile_limits.max_nesting,
            max_function_locals: sandbox.compile_limits.max_function_locals,
            max_locals: sandbox.compile_limits.max_locals,
            grants: sandbox
                .grants
                .iter()
                .map(|(agent, grants)| {
                    let directories = grants
                        .directories
                        .iter()
                        .map(|d| DirectoryView {
                            host_path: path(&d.host_path),
                            guest_path: &d.guest_path,
                            read_only: d.read_only,
                        })
                        .collect();
                    let view = AgentGrantsView {
                        directories,
                        environment: &grants.environment,
                        allowed_hosts: &grants.http_hosts,
                    };
                    (agent.as_str(), view)
                })
                .collect(),
        }
    }
}
