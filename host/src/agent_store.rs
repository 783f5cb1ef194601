//! Where agents come from: directories laid out `<dir>/<agent_id>/<version>.wasm`
//! (or `.cwasm`, precompiled, preferred when both exist), searched in order.
//!
//! A lease names an agent by id and version; the store turns that into a
//! loaded [`Agent`], reading and compiling the file only when it changed
//! since the last run (same path, length and modification time). The ids
//! come from the control plane, so they are checked before they touch the
//! filesystem: no separators, no `..`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use thiserror::Error;

use crate::sandbox::{Agent, InvalidAgent, Sandbox};

#[derive(Debug, Error)]
pub enum ResolveError {
    #[error("agent {agent_id} version {version} not found: looked for {}", .looked_for.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" and "))]
    NotFound {
        agent_id: String,
        version: String,
        looked_for: Vec<PathBuf>,
    },
    #[error("invalid agent {field} {value:?} in the lease: it must be non-empty and must not contain `/`, `\\` or `..`")]
    InvalidName { field: &'static str, value: String },
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {invalid}", .path.display())]
    Invalid { path: PathBuf, invalid: InvalidAgent },
}

/// A file's identity for the cache: if any of these changed, read again.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
}

pub struct AgentStore {
    dirs: Vec<PathBuf>,
    loaded: Mutex<HashMap<(String, String), (FileStamp, Arc<Agent>)>>,
    /// Resolutions served from `loaded`, without reading the file.
    hits: AtomicU64,
}

impl AgentStore {
    pub fn new(dirs: Vec<PathBuf>) -> Self {
        AgentStore {
            dirs,
            loaded: Mutex::default(),
            hits: AtomicU64::new(0),
        }
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The agent for `agent_id` at `version`, compiled by `sandbox`.
    pub async fn resolve(
        &self,
        sandbox: &Sandbox,
        agent_id: &str,
        version: &str,
    ) -> Result<Arc<Agent>, ResolveError> {
        check_name("id", agent_id)?;
        check_name("version", version)?;
        let stamp = self.locate(agent_id, version).await?;
        let key = (agent_id.to_string(), version.to_string());
        if let Some((cached, agent)) = self.lock().get(&key)
            && *cached == stamp
        {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(agent.clone());
        }
        let bytes = tokio::fs::read(&stamp.path)
            .await
            .map_err(|source| ResolveError::Io {
                path: stamp.path.clone(),
                source,
            })?;
        let agent = sandbox
            .load(Arc::from(bytes))
            .await
            .map_err(|invalid| ResolveError::Invalid {
                path: stamp.path.clone(),
                invalid,
            })?;
        self.lock().insert(key, (stamp, agent.clone()));
        Ok(agent)
    }

    /// Resolutions served without reading or compiling the agent again
    /// (the sandbox counts the ones that found the same bytes compiled).
    pub fn cache_hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    async fn locate(&self, agent_id: &str, version: &str) -> Result<FileStamp, ResolveError> {
        let candidates: Vec<PathBuf> = self
            .dirs
            .iter()
            .flat_map(|dir| {
                let folder = dir.join(agent_id);
                [
                    folder.join(format!("{version}.cwasm")),
                    folder.join(format!("{version}.wasm")),
                ]
            })
            .collect();
        for path in &candidates {
            match tokio::fs::metadata(path).await {
                Ok(meta) if meta.is_file() => {
                    return Ok(FileStamp {
                        path: path.clone(),
                        len: meta.len(),
                        modified: meta.modified().ok(),
                    });
                }
                Ok(_) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(ResolveError::Io {
                        path: path.clone(),
                        source,
                    });
                }
            }
        }
        Err(ResolveError::NotFound {
            agent_id: agent_id.to_string(),
            version: version.to_string(),
            looked_for: candidates,
        })
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(String, String), (FileStamp, Arc<Agent>)>> {
        self.loaded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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
