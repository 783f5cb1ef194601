//! Where agents come from, tried in a configured order: directories laid
//! out `<dir>/<agent_id>/<version>.wasm` (or `.cwasm`, precompiled,
//! preferred when both exist), an HTTP(S) source ([`http_source`]) and an
//! OCI registry ([`oci_source`]).
//!
//! A lease names an agent by id and version, and may pin its bytes with
//! metadata `agent.digest` ([`digest`]). The store turns that into a
//! loaded [`Agent`], reading and compiling the file only when it changed
//! since the last run (same path, length and modification time), and
//! checking the pin first. The ids come from the control plane, so they are
//! checked before they touch the filesystem or a URL: no separators, no
//! `..`.

pub mod digest;
pub mod download_cache;
pub mod http_source;
pub mod oci_source;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use thiserror::Error;

use crate::sandbox::{Agent, InvalidAgent, Sandbox};
pub use digest::{AgentDigest, DIGEST_METADATA_KEY, InvalidDigest};
pub use download_cache::FetchError;
pub use http_source::{HttpSource, HttpSourceSettings};
pub use oci_source::{OciSource, OciSourceSettings};

#[derive(Debug, Error)]
pub enum ResolveError {
    #[error("agent {agent_id} version {version} not found: looked for {}", .looked_for.join(" and "))]
    NotFound {
        agent_id: String,
        version: String,
        looked_for: Vec<String>,
    },
    #[error("invalid agent {field} {value:?} in the lease: it must be non-empty and must not contain `/`, `\\` or `..`")]
    InvalidName { field: &'static str, value: String },
    #[error(transparent)]
    InvalidDigest(#[from] InvalidDigest),
    #[error(
        "agent {agent_id} version {version} is not pinned: this node requires lease metadata \
         {DIGEST_METADATA_KEY} = sha256:<hex> (AgentStore.RequireDigest is true)"
    )]
    DigestRequired { agent_id: String, version: String },
    #[error("{} has digest {actual}, but the lease pins {expected} ({DIGEST_METADATA_KEY})", .path.display())]
    DigestMismatch {
        path: PathBuf,
        expected: AgentDigest,
        actual: AgentDigest,
    },
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("{}: {invalid}", .path.display())]
    Invalid { path: PathBuf, invalid: InvalidAgent },
}

impl ResolveError {
    /// Whether another attempt (here later, or on another node) could
    /// succeed: a failed download could; a missing, mismatched or
    /// invalid artifact will not.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ResolveError::Fetch(_))
    }
}

/// One place agents are looked for.
pub enum AgentSource {
    /// `<dir>/<agent_id>/<version>.cwasm` or `.wasm`.
    Directory(PathBuf),
    /// Downloaded once, then kept on disk.
    Http(HttpSource),
    /// Pulled from an OCI registry once, then kept on disk.
    Oci(OciSource),
}

/// A file's identity for the cache: if any of these changed, read again.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
}

type Loaded = HashMap<(String, String), (FileStamp, AgentDigest, Arc<Agent>)>;

pub struct AgentStore {
    sources: Vec<AgentSource>,
    require_digest: bool,
    loaded: Mutex<Loaded>,
    /// Resolutions served from `loaded`, without reading the file.
    hits: AtomicU64,
}

impl AgentStore {
    /// A store over local directories only, searched in order.
    pub fn new(dirs: Vec<PathBuf>) -> Self {
        Self::with_sources(dirs.into_iter().map(AgentSource::Directory).collect(), false)
    }

    /// A store over `sources`, tried in order; with `require_digest`, a
    /// lease without `agent.digest` is refused.
    pub fn with_sources(sources: Vec<AgentSource>, require_digest: bool) -> Self {
        AgentStore {
            sources,
            require_digest,
            loaded: Mutex::default(),
            hits: AtomicU64::new(0),
        }
    }

    /// The local directories among the sources.
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.sources
            .iter()
            .filter_map(|source| match source {
                AgentSource::Directory(dir) => Some(dir.clone()),
                AgentSource::Http(_) | AgentSource::Oci(_) => None,
            })
            .collect()
    }

    /// The agent for `agent_id` at `version`, compiled by `sandbox`.
    pub async fn resolve(
        &self,
        sandbox: &Sandbox,
        agent_id: &str,
        version: &str,
    ) -> Result<Arc<Agent>, ResolveError> {
        self.resolve_pinned(sandbox, agent_id, version, None).await
    }

    /// Like [`resolve`](Self::resolve), checking the artifact's bytes
    /// against `pin` when there is one.
    pub async fn resolve_pinned(
        &self,
        sandbox: &Sandbox,
        agent_id: &str,
        version: &str,
        pin: Option<AgentDigest>,
    ) -> Result<Arc<Agent>, ResolveError> {
        check_name("id", agent_id)?;
        check_name("version", version)?;
        if pin.is_none() && self.require_digest {
            return Err(ResolveError::DigestRequired {
                agent_id: agent_id.to_string(),
                version: version.to_string(),
            });
        }
        let stamp = self.locate(agent_id, version).await?;
        let key = (agent_id.to_string(), version.to_string());
        let cached = self.lock().get(&key).cloned();
        if let Some((cached, digest, agent)) = cached
            && cached == stamp
        {
            check_pin(&stamp, pin, digest)?;
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(agent);
        }
        let bytes = tokio::fs::read(&stamp.path)
            .await
            .map_err(|source| ResolveError::Io {
                path: stamp.path.clone(),
                source,
            })?;
        let digest = AgentDigest::of(&bytes);
        check_pin(&stamp, pin, digest)?;
        let agent = sandbox
            .load_digested(Arc::from(bytes), *digest.bytes())
            .await
            .map_err(|invalid| ResolveError::Invalid {
                path: stamp.path.clone(),
                invalid,
            })?;
        self.lock().insert(key, (stamp, digest, agent.clone()));
        Ok(agent)
    }

    /// Resolutions served without reading or compiling the agent again
    /// (the sandbox counts the ones that found the same bytes compiled).
    pub fn cache_hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    async fn locate(&self, agent_id: &str, version: &str) -> Result<FileStamp, ResolveError> {
        let mut looked_for = Vec::new();
        for source in &self.sources {
            let found = match source {
                AgentSource::Directory(dir) => {
                    let folder = dir.join(agent_id);
                    let candidates = [
                        folder.join(format!("{version}.cwasm")),
                        folder.join(format!("{version}.wasm")),
                    ];
                    let mut found = None;
                    for path in candidates {
                        if let Some(stamp) = stamp_of(&path).await? {
                            found = Some(stamp);
                            break;
                        }
                        looked_for.push(path.display().to_string());
                    }
                    found
                }
                AgentSource::Http(http) => match http.fetch(agent_id, version).await? {
                    Some(path) => stamp_of(&path).await?,
                    None => {
                        looked_for.push(http.url(agent_id, version));
                        None
                    }
                },
                AgentSource::Oci(oci) => match oci.fetch(agent_id, version).await? {
                    Some(path) => stamp_of(&path).await?,
                    None => {
                        looked_for.push(oci.reference(agent_id, version));
                        None
                    }
                },
            };
            if let Some(stamp) = found {
                return Ok(stamp);
            }
        }
        Err(ResolveError::NotFound {
            agent_id: agent_id.to_string(),
            version: version.to_string(),
            looked_for,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.loaded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The file's stamp, or `None` when there is no file at `path`.
async fn stamp_of(path: &std::path::Path) -> Result<Option<FileStamp>, ResolveError> {
    match tokio::fs::metadata(path).await {
        Ok(meta) if meta.is_file() => Ok(Some(FileStamp {
            path: path.to_path_buf(),
            len: meta.len(),
            modified: meta.modified().ok(),
        })),
        Ok(_) => Ok(None),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ResolveError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn check_pin(stamp: &FileStamp, pin: Option<AgentDigest>, actual: AgentDigest) -> Result<(), ResolveError> {
    match pin {
        Some(expected) if expected != actual => Err(ResolveError::DigestMismatch {
            path: stamp.path.clone(),
            expected,
            actual,
        }),
        _ => Ok(()),
    }
}

fn check_name(field: &'static str, value: &str) -> Result<(), ResolveError> {
    let bad = value.is_empty()
        || value.contains('/')
        || value.contains('\\')
        || value.contains("..")
        || value.contains('\0');
    if bad {
        return Err(ResolveError::InvalidName {
            field,
            value: value.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_a_lease_cannot_escape_the_directory() {
        for bad in ["", "../etc", "a/b", "a\\b", ".."] {
            assert!(check_name("id", bad).is_err(), "{bad:?}");
        }
        assert!(check_name("version", "1.0.0").is_ok());
    }
}
