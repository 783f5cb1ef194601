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
//! [`Sandbox::new`]: super::Sandbox::new

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use thiserror::Error;

use super::capabilities::http::{HostGrant, InvalidHostGrant};

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
    pub fn narrowed(&self, metadata: &BTreeMap<String, String>) -> AgentGrants {
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
                        None => tracing::warn!(
                            "metadata {FS_ALLOW_METADATA_KEY}: `{entry}` is not a directory this \
                             agent is granted; ignored (metadata can only narrow grants)"
                        ),
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
        assert_eq!(grants.narrowed(&metadata(&[])), grants);
    }

    #[test]
    fn metadata_keeps_downgrades_and_never_adds() {
        let (_dir, grants) = granted();
        let run = grants.narrowed(&metadata(&[
            (FS_ALLOW_METADATA_KEY, "/data:ro, /ref, /etc, /elsewhere:ro"),
            (ENV_ALLOW_METADATA_KEY, "REGION, PATH, HOME"),
        ]));
        let dirs: Vec<(&str, bool)> = run
            .directories
            .iter()
            .map(|d| (d.guest_path.as_str(), d.read_only))
            .collect();
        assert_eq!(dirs, [("/data", true), ("/ref", true)]);
        assert_eq!(run.environment, ["REGION"]);
        assert_eq!(run.http_hosts, grants.http_hosts, "http.allow is the egress policy's");

        // Naming a read-only grant without `:ro` does not make it writable.
        let run = grants.narrowed(&metadata(&[(FS_ALLOW_METADATA_KEY, "/ref")]));
        assert_eq!(run.directories.len(), 1);
        assert!(run.directories[0].read_only);

        // Empty lists allow nothing.
        let run = grants.narrowed(&metadata(&[(FS_ALLOW_METADATA_KEY, ""), (ENV_ALLOW_METADATA_KEY, " ")]));
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
}
