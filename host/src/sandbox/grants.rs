//! Sandbox grants: what the operator lets one agent reach beyond the
//! clocks and random every agent has.
//!
//! Deny by default. An agent id with no grants gets no directory, no
//! environment variable and no outbound HTTP host; nothing grants sockets
//! (`wasi:sockets` stays linked, every use is refused). The operator grants
//! per agent id ([`Grants`], from `Sandbox.Grants` and `Sandbox.AllowedHosts`
//! in the node configuration, or `run-agent --dir/--env/--allow-http`):
//! preopened host directories, read-only or read-write, under a guest path;
//! environment variables by name, whose values are read from the node's
//! environment at each run; and outbound HTTP hosts. [`Sandbox::new`]
//! checks them once into [`AgentGrants`]; each run then narrows its agent's
//! grants by its metadata ([`AgentGrants::narrowed`]: `fs.allow`,
//! `env.allow`, and `http.allow` in `capabilities/http/`), which can drop
//! or downgrade a grant, never add one. `RunStateBuilder` (`state_builder.rs`)
//! turns the result into the run's `WasiCtx`, the one place the sandbox's
//! power is built.
//!
//! Directories are opened by path at each run, so a grant is only as fixed
//! as the directories on the way to it. [`check_separation`] refuses, at
//! start-up, any grant whose path runs through a directory another grant
//! may write (an agent could swap a directory there for a symlink, and the
//! other grant would follow it), and any directory one agent may write
//! that another agent also sees.
//!
//! [`Sandbox::new`]: super::Sandbox::new

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use thiserror::Error;

use super::capabilities::http::{HostGrant, InvalidHostGrant};
use super::capabilities::log::{HostWarning, HostWarnings};

/// The run metadata key that narrows a run's directories: a comma-separated
/// list of granted guest paths, each optionally `:ro` (read-only for this
/// run). Directories not named are not opened for the run.
pub const FS_ALLOW_METADATA_KEY: &str = "fs.allow";

/// The run metadata key that narrows a run's environment: a comma-separated
/// list of granted variable names. Variables not named are not passed.
pub const ENV_ALLOW_METADATA_KEY: &str = "env.allow";

/// What the operator grants one agent, as configured (unchecked).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// Host directories the agent sees as preopened guest paths.
    pub directories: Vec<DirectoryGrant>,
    /// Names of environment variables passed to the agent with the node's
    /// value at run time (a name the node's environment lacks is not passed).
    pub environment: Vec<String>,
    /// Hosts (`host` or `host:port`) its outbound HTTP may reach; merged
    /// with `SandboxConfig.allowed_hosts`.
    pub http_hosts: Vec<String>,
}

/// One preopened directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryGrant {
    /// An existing directory on the node.
    pub host_path: PathBuf,
    /// Where the agent sees it: an absolute path such as `/data`.
    pub guest_path: String,
    /// Read-only: the agent can open, read and list, not create, write,
    /// rename or remove.
    pub read_only: bool,
}

/// Why a grant was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InvalidGrant {
    #[error(
        "host directory {} does not exist or is not a directory: create it, or fix the path",
        .0.display()
    )]
    NoSuchDirectory(PathBuf),
    #[error(
        "guest path `{0}` is not an absolute path without `.` or `..` segments, `:` or `,`: \
         use e.g. /data"
    )]
    GuestPath(String),
    #[error("guest path `{0}` is granted twice: give each directory its own guest path")]
    DuplicateGuestPath(String),
    #[error(
        "`{0}` is not an environment variable name: give the name only (no `=` or value, no \
         spaces), e.g. TENANT_ID; the value is read from the node's environment at run time"
    )]
    EnvironmentName(String),
    #[error(transparent)]
    Host(#[from] InvalidHostGrant),
}

/// Checks a guest path: absolute, with no `.` or `..` segment, so that the
/// agent's view of its directories is exactly what the operator wrote; no
/// `:` or `,`, which the `--dir` flag and `fs.allow` use as separators.
pub fn check_guest_path(guest: &str) -> Result<(), InvalidGrant> {
    let plain = guest.starts_with('/')
        && !guest.contains(['\0', ',', ':'])
        && guest.split('/').all(|segment| segment != "." && segment != "..");
    if plain {
        Ok(())
    } else {
        Err(InvalidGrant::GuestPath(guest.to_string()))
    }
}

/// Checks a variable name: not empty, no `=`, blank or NUL.
pub fn check_environment_name(name: &str) -> Result<(), InvalidGrant> {
    let valid = !name.is_empty()
        && !name
            .chars()
            .any(|c| c == '=' || c == ',' || c == '\0' || c.is_whitespace());
    if valid {
        Ok(())
    } else {
        Err(InvalidGrant::EnvironmentName(name.to_string()))
    }
}

/// A guest path compared the way the guest sees it: without a trailing `/`.
fn normal_guest(guest: &str) -> &str {
    match guest.trim_end_matches('/') {
        "" => "/",
        trimmed => trimmed,
    }
}

/// One agent's grants, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentGrants {
    pub directories: Vec<DirectoryGrant>,
    pub environment: Vec<String>,
    pub http_hosts: Vec<HostGrant>,
}

impl AgentGrants {
    /// Checks `grants` (and the hosts of the older `allowed_hosts` form):
    /// every host directory exists, guest paths are absolute and distinct,
    /// variable names are names, hosts are `host` or `host:port`.
    pub fn check(grants: &Grants, more_hosts: &[String]) -> Result<AgentGrants, InvalidGrant> {
        let mut directories: Vec<DirectoryGrant> = Vec::new();
        for directory in &grants.directories {
            check_guest_path(&directory.guest_path)?;
            let guest = normal_guest(&directory.guest_path).to_string();
            if directories.iter().any(|d| d.guest_path == guest) {
                return Err(InvalidGrant::DuplicateGuestPath(guest));
            }
            if !directory.host_path.is_dir() {
                return Err(InvalidGrant::NoSuchDirectory(directory.host_path.clone()));
            }
            directories.push(DirectoryGrant {
                host_path: directory.host_path.clone(),
                guest_path: guest,
                read_only: directory.read_only,
            });
        }
        let mut environment: Vec<String> = Vec::new();
        for name in &grants.environment {
            check_environment_name(name)?;
            if !environment.contains(name) {
                environment.push(name.clone());
            }
        }
        let mut http_hosts: Vec<HostGrant> = Vec::new();
        for entry in grants.http_hosts.iter().chain(more_hosts) {
            let host = HostGrant::parse(entry)?;
            if !http_hosts.contains(&host) {
                http_hosts.push(host);
            }
        }
        Ok(AgentGrants {
            directories,
            environment,
            http_hosts,
        })
    }

    /// This run's directories and environment: the agent's grants, narrowed
    /// by the run's metadata `fs.allow` and `env.allow` when present. Only
    /// what the agent was granted and the metadata names survives, and a
    /// `:ro` entry makes a read-write grant read-only; an entry naming
    /// something not granted adds nothing (it is logged). Outbound HTTP is
    /// narrowed by `http.allow` in the egress policy.
    ///
    /// Ignored entries are counted in `warnings`, the run's, which logs
    /// the first few.
    pub fn narrowed(&self, metadata: &BTreeMap<String, String>, warnings: &HostWarnings) -> AgentGrants {
        let directories = match metadata.get(FS_ALLOW_METADATA_KEY) {
            None => self.directories.clone(),
            Some(list) => {
                let mut kept: Vec<DirectoryGrant> = Vec::new();
                for entry in list_entries(list) {
                    let (guest, read_only) = match entry.strip_suffix(":ro") {
                        Some(guest) => (guest, true),
                        None => (entry, false),
                    };
                    let guest = normal_guest(guest);
                    match self.directories.iter().find(|d| d.guest_path == guest) {
                        Some(granted) if !kept.iter().any(|k| k.guest_path == guest) => {
                            kept.push(DirectoryGrant {
                                read_only: granted.read_only || read_only,
                                ..granted.clone()
                            });
                        }
                        Some(_already_kept) => {}
                        None if warnings.admit(HostWarning::MetadataIgnored) => tracing::warn!(
                            "metadata {FS_ALLOW_METADATA_KEY}: `{entry}` is not a directory this \
                             agent is granted; ignored (metadata can only narrow grants)"
                        ),
                        None => {}
                    }
                }
                kept
            }
        };
        let environment = match metadata.get(ENV_ALLOW_METADATA_KEY) {
            None => self.environment.clone(),
            Some(list) => {
                let named: Vec<&str> = list_entries(list).collect();
                for name in named.iter().filter(|n| !self.environment.iter().any(|g| g == *n)) {
                    if !warnings.admit(HostWarning::MetadataIgnored) {
                        continue;
                    }
                    tracing::warn!(
                        "metadata {ENV_ALLOW_METADATA_KEY}: `{name}` is not a variable this agent \
                         is granted; ignored (metadata can only narrow grants)"
                    );
                }
                self.environment
                    .iter()
                    .filter(|granted| named.contains(&granted.as_str()))
                    .cloned()
                    .collect()
            }
        };
        AgentGrants {
            directories,
            environment,
            http_hosts: self.http_hosts.clone(),
        }
    }

    /// The granted variables the node's environment has, with their values
    /// now. A variable that is unset (or not UTF-8) is not passed.
    pub fn environment_values(&self) -> Vec<(String, String)> {
        self.environment
            .iter()
            .filter_map(|name| Some((name.clone(), std::env::var(name).ok()?)))
            .collect()
    }
}

/// How two directory grants overlap where one of them may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    /// The grant's path runs through the writable directory: the writer can
    /// replace a directory on the way with a symlink the grant then follows.
    Through,
    /// Another agent's grant is the writable directory itself or contains
    /// it: two agents would share files.
    Shares,
}

/// A directory grant that lies inside, equals or contains a directory
/// another grant may write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlappingGrants {
    pub agent_id: String,
    /// The position of the refused grant in its agent's list.
    pub index: usize,
    pub host_path: PathBuf,
    pub guest_path: String,
    pub writer_agent_id: String,
    pub writer_host_path: PathBuf,
    pub writer_guest_path: String,
    pub overlap: Overlap,
}

impl OverlappingGrants {
    /// How the refused grant stands to the writable one, in a few words.
    pub fn relation(&self) -> &'static str {
        match self.overlap {
            Overlap::Through => "inside",
            Overlap::Shares => "the same as or containing",
        }
    }
}

impl std::error::Error for OverlappingGrants {}

impl fmt::Display for OverlappingGrants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let this = format!(
            "directory grant {} (agent `{}`, guest path {})",
            self.host_path.display(),
            self.agent_id,
            self.guest_path
        );
        let writer = format!(
            "{} (agent `{}`, guest path {}, read-write)",
            self.writer_host_path.display(),
            self.writer_agent_id,
            self.writer_guest_path
        );
        match self.overlap {
            Overlap::Through => write!(
                f,
                "{this} lies inside {writer}: that agent could replace a directory on the way \
                 with a symlink, and this grant would follow it wherever it points. Grant \
                 directories side by side instead of one inside a writable one, or make the \
                 grant of {} read-only",
                self.writer_host_path.display()
            ),
            Overlap::Shares => write!(
                f,
                "{this} is or contains {writer}: the two agents would share files through it. \
                 Give each agent a directory of its own, or make the grant of {} read-only",
                self.writer_host_path.display()
            ),
        }
    }
}

/// Checks that no directory grant can be turned by another: across every
/// agent (`grants`, by agent id), no grant's path may run through a
/// directory some grant may write, and no agent may see a directory another
/// agent may write (an agent's grants may repeat or contain its own
/// writable directory). Paths are compared as the kernel resolves them,
/// every symlink followed, and every directory on the way counts: a grant
/// whose path already runs through a swapped symlink is refused as well as
/// one reached through an operator's symlink.
pub fn check_separation(grants: &BTreeMap<String, Grants>) -> Result<(), Box<OverlappingGrants>> {
    struct Resolved<'a> {
        agent_id: &'a str,
        index: usize,
        grant: &'a DirectoryGrant,
        trail: Vec<PathBuf>,
    }
    let resolved: Vec<Resolved<'_>> = grants
        .iter()
        .flat_map(|(agent_id, grants)| {
            grants
                .directories
                .iter()
                .enumerate()
                .map(move |(index, grant)| Resolved {
                    agent_id,
                    index,
                    grant,
                    trail: resolution_trail(&grant.host_path),
                })
        })
        .collect();
    for writer in resolved.iter().filter(|r| !r.grant.read_only) {
        let written = writer.trail.last().expect("a trail is never empty");
        for other in &resolved {
            if std::ptr::eq(other, writer) {
                continue;
            }
            let (end, on_the_way) = other.trail.split_last().expect("a trail is never empty");
            // A name looked up in a directory the writer controls is one it
            // can swap.
            let overlap = if on_the_way.iter().any(|p| p.starts_with(written)) {
                Some(Overlap::Through)
            } else if other.agent_id != writer.agent_id && written.starts_with(end) {
                Some(Overlap::Shares)
            } else {
                None
            };
            if let Some(overlap) = overlap {
                return Err(Box::new(OverlappingGrants {
                    agent_id: other.agent_id.to_string(),
                    index: other.index,
                    host_path: other.grant.host_path.clone(),
                    guest_path: other.grant.guest_path.clone(),
                    writer_agent_id: writer.agent_id.to_string(),
                    writer_host_path: writer.grant.host_path.clone(),
                    writer_guest_path: writer.grant.guest_path.clone(),
                    overlap,
                }));
            }
        }
    }
    Ok(())
}

/// A path the node itself writes or trusts (its data directory, its
/// agents, its certificates, its configuration), and the setting that names
/// it: no agent may see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePath {
    /// `NodeRuntime.DataDirectory`, or a description: `the configuration file`.
    pub key: String,
    /// A directory (everything under it counts) or a file.
    pub path: PathBuf,
}

/// A directory grant that would let its agent see or change the node's own files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantOnNodePath {
    pub agent_id: String,
    /// The position of the refused grant in its agent's list.
    pub index: usize,
    pub host_path: PathBuf,
    pub guest_path: String,
    pub read_only: bool,
    pub node_key: String,
    pub node_path: PathBuf,
    /// The grant lies inside the node's path; else it is, or contains, the
    /// node's path (or, read-write, a directory on the way to it).
    pub inside: bool,
}

impl GrantOnNodePath {
    /// How the grant stands to the node's path, in a few words.
    pub fn relation(&self) -> &'static str {
        if self.inside {
            "inside"
        } else {
            "the same as or containing"
        }
    }

    fn mode(&self) -> &'static str {
        if self.read_only { "read-only" } else { "read-write" }
    }
}

impl std::error::Error for GrantOnNodePath {}

impl fmt::Display for GrantOnNodePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "directory grant {} (agent `{}`, guest path {}, {}) is {} {} {}, which is the \
             node's own: an agent that sees it could read other runs' inputs and results, or \
             change the code the node runs (compiled components are trusted by name), its \
             certificates or its settings. Grant a directory that neither contains nor lies \
             inside {}, or move {} elsewhere",
            self.host_path.display(),
            self.agent_id,
            self.guest_path,
            self.mode(),
            self.relation(),
            self.node_key,
            self.node_path.display(),
            self.node_path.display(),
            self.node_key,
        )
    }
}

/// Checks that no directory grant, read-only or read-write, overlaps a path
/// of the node's own (`node_paths`): a grant may not be, contain or lie
/// inside one, and a read-write grant may not hold a directory on the way to
/// one (the agent could swap it for a symlink). Paths are resolved as in
/// [`check_separation`], every symlink followed.
pub fn check_node_paths(
    grants: &BTreeMap<String, Grants>,
    node_paths: &[NodePath],
) -> Result<(), Box<GrantOnNodePath>> {
    let node_trails: Vec<(&NodePath, Vec<PathBuf>)> = node_paths
        .iter()
        .map(|node| (node, resolution_trail(&node.path)))
        .collect();
    for (agent_id, agent_grants) in grants {
        for (index, grant) in agent_grants.directories.iter().enumerate() {
            let trail = resolution_trail(&grant.host_path);
            let granted = trail.last().expect("a trail is never empty");
            for (node, node_trail) in &node_trails {
                let node_end = node_trail.last().expect("a trail is never empty");
                let inside = granted.starts_with(node_end);
                let covers = if grant.read_only {
                    node_end.starts_with(granted)
                } else {
                    node_trail.iter().any(|p| p.starts_with(granted))
                };
                if inside || covers {
                    return Err(Box::new(GrantOnNodePath {
                        agent_id: agent_id.clone(),
                        index,
                        host_path: grant.host_path.clone(),
                        guest_path: grant.guest_path.clone(),
                        read_only: grant.read_only,
                        node_key: node.key.clone(),
                        node_path: node.path.clone(),
                        inside: inside && !covers,
                    }));
                }
            }
        }
    }
    Ok(())
}

/// Every directory the resolution of `path` visits, in order, each without
/// symlinks; the last is where the path leads. Symlinks are followed as the
/// kernel would (at most 40); a part that cannot be read ends the walk
/// lexically.
fn resolution_trail(path: &Path) -> Vec<PathBuf> {
    const MAX_SYMLINKS: u32 = 40;
    fn parts(path: &Path) -> impl DoubleEndedIterator<Item = OsString> + '_ {
        path.components().filter_map(|component| match component {
            Component::RootDir => Some(OsString::from("/")),
            Component::CurDir => None,
            Component::ParentDir => Some(OsString::from("..")),
            Component::Normal(name) => Some(name.to_os_string()),
            Component::Prefix(_) => None,
        })
    }
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut pending: VecDeque<OsString> = parts(&absolute).collect();
    let mut current = PathBuf::from("/");
    let mut trail = vec![current.clone()];
    let mut symlinks = 0;
    while let Some(part) = pending.pop_front() {
        if part == "/" {
            current = PathBuf::from("/");
        } else if part == ".." {
            current.pop();
        } else {
            let next = current.join(&part);
            let is_symlink = std::fs::symlink_metadata(&next).is_ok_and(|m| m.file_type().is_symlink());
            match std::fs::read_link(&next) {
                Ok(target) if is_symlink && symlinks < MAX_SYMLINKS => {
                    symlinks += 1;
                    for part in parts(&target).rev() {
                        pending.push_front(part);
                    }
                    continue;
                }
                _ => current = next,
            }
        }
        trail.push(current.clone());
    }
    trail
}

fn list_entries(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|entry| !entry.is_empty())
}

/// One line for the log: names and paths, never a variable's value.
impl fmt::Display for AgentGrants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let directories: Vec<String> = self
            .directories
            .iter()
            .map(|d| {
                let mode = if d.read_only { "read-only" } else { "read-write" };
                format!("{} -> {} ({mode})", d.host_path.display(), d.guest_path)
            })
            .collect();
        let hosts: Vec<String> = self.http_hosts.iter().map(HostGrant::to_string).collect();
        let or_none = |items: &[String]| {
            if items.is_empty() {
                "none".to_string()
            } else {
                items.join(", ")
            }
        };
        write!(
            f,
            "directories: {}; environment: {}; outbound HTTP: {}; sockets: none",
            or_none(&directories),
            or_none(&self.environment),
            or_none(&hosts)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn granted() -> (tempfile::TempDir, AgentGrants) {
        let dir = tempfile::tempdir().unwrap();
        let grants = Grants {
            directories: vec![
                DirectoryGrant {
                    host_path: dir.path().to_path_buf(),
                    guest_path: "/data/".into(),
                    read_only: false,
                },
                DirectoryGrant {
                    host_path: dir.path().to_path_buf(),
                    guest_path: "/ref".into(),
                    read_only: true,
                },
            ],
            environment: vec!["TENANT".into(), "REGION".into()],
            http_hosts: vec!["api.example.com".into()],
        };
        let checked = AgentGrants::check(&grants, &["b.example.com:443".to_string()]).unwrap();
        (dir, checked)
    }

    fn metadata(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn checking_normalises_guest_paths_and_merges_the_older_host_list() {
        let (_dir, grants) = granted();
        assert_eq!(grants.directories[0].guest_path, "/data");
        let hosts: Vec<String> = grants.http_hosts.iter().map(ToString::to_string).collect();
        assert_eq!(hosts, ["api.example.com", "b.example.com:443"]);
    }

    #[test]
    fn bad_grants_are_refused_with_what_to_write_instead() {
        let dir = tempfile::tempdir().unwrap();
        let with_dir = |host: PathBuf, guest: &str| Grants {
            directories: vec![DirectoryGrant {
                host_path: host,
                guest_path: guest.into(),
                read_only: true,
            }],
            ..Grants::default()
        };
        let missing = dir.path().join("missing");
        assert_eq!(
            AgentGrants::check(&with_dir(missing.clone(), "/data"), &[]),
            Err(InvalidGrant::NoSuchDirectory(missing))
        );
        for guest in ["data", "/data/../etc", "/./data", "", "/a,b", "/data:ro"] {
            assert!(
                matches!(
                    AgentGrants::check(&with_dir(dir.path().into(), guest), &[]),
                    Err(InvalidGrant::GuestPath(_))
                ),
                "{guest}"
            );
        }
        let twice = Grants {
            directories: vec![
                DirectoryGrant {
                    host_path: dir.path().into(),
                    guest_path: "/d".into(),
                    read_only: true,
                },
                DirectoryGrant {
                    host_path: dir.path().into(),
                    guest_path: "/d/".into(),
                    read_only: false,
                },
            ],
            ..Grants::default()
        };
        assert_eq!(
            AgentGrants::check(&twice, &[]),
            Err(InvalidGrant::DuplicateGuestPath("/d".into()))
        );
        for name in ["", "A=B", "A B", "A,B"] {
            let env = Grants {
                environment: vec![name.into()],
                ..Grants::default()
            };
            assert_eq!(
                AgentGrants::check(&env, &[]),
                Err(InvalidGrant::EnvironmentName(name.into()))
            );
        }
        assert!(AgentGrants::check(&Grants::default(), &["https://x.com/".into()]).is_err());
        let message = InvalidGrant::EnvironmentName("A=B".into()).to_string();
        assert!(message.contains("name only") && message.contains("A=B"), "{message}");
    }

    #[test]
    fn without_metadata_a_run_gets_every_grant() {
        let (_dir, grants) = granted();
        assert_eq!(grants.narrowed(&metadata(&[]), &HostWarnings::default()), grants);
    }

    #[test]
    fn metadata_keeps_downgrades_and_never_adds() {
        let (_dir, grants) = granted();
        let warnings = HostWarnings::default();
        let run = grants.narrowed(
            &metadata(&[
                (FS_ALLOW_METADATA_KEY, "/data:ro, /ref, /etc, /elsewhere:ro"),
                (ENV_ALLOW_METADATA_KEY, "REGION, PATH, HOME"),
            ]),
            &warnings,
        );
        let dirs: Vec<(&str, bool)> = run
            .directories
            .iter()
            .map(|d| (d.guest_path.as_str(), d.read_only))
            .collect();
        assert_eq!(dirs, [("/data", true), ("/ref", true)]);
        assert_eq!(run.environment, ["REGION"]);
        assert_eq!(run.http_hosts, grants.http_hosts, "http.allow is the egress policy's");

        // Naming a read-only grant without `:ro` does not make it writable.
        let run = grants.narrowed(&metadata(&[(FS_ALLOW_METADATA_KEY, "/ref")]), &warnings);
        assert_eq!(run.directories.len(), 1);
        assert!(run.directories[0].read_only);

        // Empty lists allow nothing.
        let run = grants.narrowed(
            &metadata(&[(FS_ALLOW_METADATA_KEY, ""), (ENV_ALLOW_METADATA_KEY, " ")]),
            &warnings,
        );
        assert!(run.directories.is_empty() && run.environment.is_empty());
    }

    #[test]
    fn the_log_line_names_grants_and_never_values() {
        let (_dir, grants) = granted();
        let line = grants.to_string();
        assert!(
            line.contains("/data (read-write)") && line.contains("/ref (read-only)"),
            "{line}"
        );
        assert!(line.contains("environment: TENANT, REGION"), "{line}");
        assert!(
            line.contains("outbound HTTP: api.example.com, b.example.com:443"),
            "{line}"
        );
        assert_eq!(
            AgentGrants::default().to_string(),
            "directories: none; environment: none; outbound HTTP: none; sockets: none"
        );
    }

    #[test]
    fn no_grant_may_see_a_path_of_the_node_s_own() {
        let root = tempfile::tempdir().unwrap();
        let node = root.path().join("node");
        let data = node.join("data");
        let key = root.path().join("tls").join("client.key");
        let beside = root.path().join("beside");
        for dir in [&data, &beside, &key.parent().unwrap().to_path_buf()] {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(&key, "key").unwrap();
        let node_paths = [
            NodePath {
                key: "NodeRuntime.DataDirectory".to_string(),
                path: data.clone(),
            },
            NodePath {
                key: "MTls.ClientKeyPath".to_string(),
                path: key.clone(),
            },
        ];
        let compiled = data.join("compiled");
        std::fs::create_dir(&compiled).unwrap();
        // A symlink elsewhere that leads into the data directory.
        let link = beside.join("link");
        std::os::unix::fs::symlink(&compiled, &link).unwrap();
        for read_only in [true, false] {
            for (granted, key_name, inside) in [
                (&data, "NodeRuntime.DataDirectory", false),
                (&node, "NodeRuntime.DataDirectory", false),
                (&compiled, "NodeRuntime.DataDirectory", true),
                (&link, "NodeRuntime.DataDirectory", true),
                (&key.parent().unwrap().to_path_buf(), "MTls.ClientKeyPath", false),
            ] {
                let error = check_node_paths(&agents(&[("a", granted, read_only)]), &node_paths).unwrap_err();
                assert_eq!(
                    (error.node_key.as_str(), error.inside, error.host_path.as_path()),
                    (key_name, inside, granted.as_path()),
                    "{error}"
                );
                let message = error.to_string();
                for part in [
                    &granted.display().to_string(),
                    key_name,
                    "Grant a directory that neither",
                ] {
                    assert!(message.contains(part), "{part} not in {message}");
                }
            }
            // Side by side is fine.
            check_node_paths(&agents(&[("a", &beside, read_only)]), &node_paths).unwrap();
        }
        // The data directory reached through a symlink in a writable grant:
        // the agent could point it elsewhere.
        let through = NodePath {
            key: "NodeRuntime.DataDirectory".to_string(),
            path: link.clone(),
        };
        let error = check_node_paths(&agents(&[("a", &beside, false)]), std::slice::from_ref(&through)).unwrap_err();
        assert!(!error.inside, "{error}");
        check_node_paths(&agents(&[("a", &beside, true)]), &[through]).unwrap();
    }

    fn agents(list: &[(&str, &Path, bool)]) -> BTreeMap<String, Grants> {
        let mut agents: BTreeMap<String, Grants> = BTreeMap::new();
        for (n, (agent, host, read_only)) in list.iter().enumerate() {
            agents
                .entry(agent.to_string())
                .or_default()
                .directories
                .push(DirectoryGrant {
                    host_path: host.to_path_buf(),
                    guest_path: format!("/d{n}"),
                    read_only: *read_only,
                });
        }
        agents
    }

    #[test]
    fn a_grant_inside_a_writable_grant_is_refused_naming_both() {
        let root = tempfile::tempdir().unwrap();
        let a = root.path().join("a");
        let shared = a.join("shared");
        std::fs::create_dir_all(&shared).unwrap();
        for same_agent in [false, true] {
            let other = if same_agent { "writer" } else { "reader" };
            let error = check_separation(&agents(&[("writer", &a, false), (other, &shared, true)])).unwrap_err();
            assert_eq!(error.overlap, Overlap::Through);
            assert_eq!(
                (error.agent_id.as_str(), error.host_path.as_path()),
                (other, shared.as_path())
            );
            assert_eq!(error.writer_host_path, a);
            let message = error.to_string();
            for part in [
                &shared.display().to_string(),
                &a.display().to_string(),
                "read-only",
                "side by side",
            ] {
                assert!(message.contains(part), "{part} not in {message}");
            }
        }
        // Read-only on both sides, or side by side, cannot be turned.
        let b = root.path().join("b");
        std::fs::create_dir(&b).unwrap();
        check_separation(&agents(&[("writer", &a, true), ("reader", &shared, true)])).unwrap();
        check_separation(&agents(&[("writer", &a, false), ("reader", &b, false)])).unwrap();
        // One agent may see its own writable directory twice, or from above.
        check_separation(&agents(&[
            ("one", &a, false),
            ("one", &a, true),
            ("one", root.path(), true),
        ]))
        .unwrap();
    }

    #[test]
    fn another_agent_never_sees_a_directory_an_agent_may_write() {
        let root = tempfile::tempdir().unwrap();
        let a = root.path().join("a");
        std::fs::create_dir(&a).unwrap();
        for seen in [a.as_path(), root.path()] {
            let error = check_separation(&agents(&[("writer", &a, false), ("reader", seen, true)])).unwrap_err();
            assert_eq!(error.overlap, Overlap::Shares, "{error}");
            assert!(error.to_string().contains("a directory of its own"), "{error}");
        }
    }

    #[test]
    fn symlinks_on_the_way_count_whether_swapped_already_or_set_by_the_operator() {
        let root = tempfile::tempdir().unwrap();
        let a = root.path().join("a");
        let elsewhere = root.path().join("etc");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&elsewhere).unwrap();
        // The writer already swapped `a/shared` for a symlink out of its grant.
        let swapped = a.join("shared");
        std::os::unix::fs::symlink(&elsewhere, &swapped).unwrap();
        let error = check_separation(&agents(&[("writer", &a, false), ("reader", &swapped, true)])).unwrap_err();
        assert_eq!(error.overlap, Overlap::Through);
        // The operator reaches into the writable grant through a link of their own.
        std::fs::create_dir(a.join("inner")).unwrap();
        let link = root.path().join("link");
        std::os::unix::fs::symlink(a.join("inner"), &link).unwrap();
        let error = check_separation(&agents(&[("writer", &a, false), ("reader", &link, true)])).unwrap_err();
        assert_eq!(error.overlap, Overlap::Through);
        // And the writable grant itself named through a link.
        let to_a = root.path().join("to-a");
        std::os::unix::fs::symlink(&a, &to_a).unwrap();
        let error =
            check_separation(&agents(&[("writer", &to_a, false), ("reader", &a.join("inner"), true)])).unwrap_err();
        assert_eq!(error.overlap, Overlap::Through);
        // `..` after a directory the writer could swap still passes through it.
        let dotdot = a.join("inner").join("..");
        let error = check_separation(&agents(&[("writer", &a, false), ("writer", &dotdot, true)])).unwrap_err();
        assert_eq!(error.overlap, Overlap::Through);
    }
}
