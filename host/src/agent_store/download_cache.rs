//! Downloaded agents, kept on disk, fetched once per version.
//!
//! The first run of a version downloads it, whatever the number of runs
//! waiting for it, into `<cache>/<agent_id>/<version>.wasm`; later runs and
//! later processes use that file. A version is treated as immutable: to
//! fetch it again, delete its file. Files are written atomically (a
//! temporary file, synced, then renamed), so a crash or a cut connection
//! never leaves half an artifact behind. Only a WebAssembly component is
//! kept: anything else a source delivers (native code above all) is
//! refused before it reaches the disk
//! ([`check_network_artifact`]). The HTTP and OCI sources share it.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::sync::lock;

use thiserror::Error;

use support::fs::{Durability, write_atomically};

use crate::sandbox::NetworkArtifactRefused;
use crate::sandbox::artifact_trust::check_network_artifact;

/// Why a download failed. Most are the node's problem, not the agent's
/// (a server down, a misconfigured URL): the lease goes back to the
/// control plane to be tried again. What the source delivered, when it
/// is not something this node runs from a network source, is final
/// ([`FetchError::is_retryable`]).
#[derive(Debug, Error)]
pub enum FetchError {
    #[error("GET {url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    /// Redirects are not followed: one could lead anywhere, plain
    /// `http://` included.
    #[error(
        "GET {url} answered HTTP {status}, a redirect to {location}; the agent store does not \
         follow redirects: point AgentStore.HttpUrlTemplate at the final URL"
    )]
    Redirect { url: String, status: u16, location: String },
    #[error(
        "{url}: the artifact is larger than AgentStore.MaxDownloadBytes ({limit} bytes); \
         raise the limit if the agent is meant to be this large"
    )]
    TooLarge { url: String, limit: u64 },
    #[error(
        "{url}: no complete answer within AgentStore.DownloadTimeoutSeconds ({}s)",
        .timeout.as_secs()
    )]
    Timeout { url: String, timeout: Duration },
    #[error("{url}: {reason}")]
    Transport { url: String, reason: String },
    #[error("cannot store the download of {url} at {}: {source}", .path.display())]
    Store {
        url: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The bytes are not a component (a `.cwasm` above all); nothing was
    /// kept.
    #[error(transparent)]
    NotAComponent(#[from] NetworkArtifactRefused),
    /// An OCI artifact not in the layout of a Wasm component, refused
    /// from its manifest, before its layer is fetched.
    #[error(
        "{url}: not a Wasm component artifact: {reason}; publish the component with \
         `node-runtime push` (or `wkg oci push`), which writes one layer of media type \
         application/wasm"
    )]
    NotWasmArtifact { url: String, reason: String },
}

impl FetchError {
    /// Whether another attempt could succeed: not when the source
    /// delivered what this node never runs from it.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, FetchError::NotAComponent(_) | FetchError::NotWasmArtifact { .. })
    }
}

/// An agent id and a version.
type AgentVersion = (String, String);

pub struct DownloadCache {
    dir: PathBuf,
    /// One lock per version being fetched: the first caller downloads,
    /// the others wait and then find the file.
    in_flight: Mutex<HashMap<AgentVersion, Arc<tokio::sync::Mutex<()>>>>,
}

impl DownloadCache {
    pub fn new(dir: PathBuf) -> Self {
        DownloadCache {
            dir,
            in_flight: Mutex::default(),
        }
    }

    /// Where the version is (or will be) kept. The names were checked by
    /// the store: no separators, no `..`.
    pub fn path(&self, agent_id: &str, version: &str) -> PathBuf {
        self.dir.join(agent_id).join(format!("{version}.wasm"))
    }

    /// The kept copy of the version, or what `download` brings (`None`:
    /// the source has no such version), kept first if it is a component.
    /// `origin` names the download in errors and logs. A kept copy is
    /// returned as it is: its loader checks it again.
    pub async fn get_or_fetch<F, Fut>(
        &self,
        agent_id: &str,
        version: &str,
        origin: &str,
        download: F,
    ) -> Result<Option<PathBuf>, FetchError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Vec<u8>>, FetchError>>,
    {
        let path = self.path(agent_id, version);
        if is_file(&path).await {
            return Ok(Some(path));
        }
        let gate = self.gate(agent_id, version);
        let _downloading = gate.lock().await;
        if is_file(&path).await {
            return Ok(Some(path));
        }
        let Some(bytes) = download().await? else {
            return Ok(None);
        };
        check_network_artifact(origin, &bytes)?;
        let target = path.clone();
        tokio::task::spawn_blocking(move || {
            let dir = target.parent().expect("a cached path has a parent");
            std::fs::create_dir_all(dir)?;
            write_atomically(&target, &bytes, Durability::Synced)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|written| written)
        .map_err(|source| FetchError::Store {
            url: origin.to_string(),
            path: path.clone(),
            source,
        })?;
        tracing::info!(origin, path = %path.display(), "downloaded agent");
        Ok(Some(path))
    }

    fn gate(&self, agent_id: &str, version: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = lock(&self.in_flight);
        gates
            .entry((agent_id.to_string(), version.to_string()))
            .or_default()
            .clone()
    }
}

async fn is_file(path: &Path) -> bool {
    tokio::fs::metadata(path).await.is_ok_and(|meta| meta.is_file())
}
