//! Downloaded agents, kept on disk, fetched once per version.
//!
//! The first run of a version downloads it, whatever the number of runs
//! waiting for it, into `<cache>/<agent_id>/<version>.wasm`; later runs and
//! later processes use that file. A version is treated as immutable: to
//! fetch it again, delete its file. Files are written atomically (a
//! temporary file, synced, then renamed), so a crash or a cut connection
//! never leaves half an artifact behind. Only a WebAssembly component is
//! kept, or a `.cwasm` whose signature by a trusted key verified: anything
//! else a source delivers (native code above all) is refused before it
//! reaches the disk ([`check_network_artifact`]). The HTTP and OCI sources share it.
//!
//! The folder is bounded in bytes (`AgentStore.DownloadCacheMaxBytes`, per
//! source): after each download the oldest downloads are deleted until the
//! rest fit, never the one just written. A deleted version is downloaded
//! again at its next lease; the agent compiled from it stays in memory
//! and in the compiled cache. A download that cannot be kept (a full or
//! read-only disk) is not a failure: the lease runs from the bytes in
//! memory ([`Fetched::InMemory`]), with a warning, and the next lease for
//! that version downloads it again.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::sync::lock;

use thiserror::Error;

use support::fs::{Bound, Durability, evict_oldest_of, files_in, write_atomically};

use crate::sandbox::NetworkArtifactRefused;
use crate::sandbox::artifact_trust::check_network_artifact;
use crate::sandbox::signature::TrustedKeys;

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
    /// The bytes are not a component (a `.cwasm` above all), nor a
    /// `.cwasm` signed by a trusted key; nothing was kept.
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

/// What a source found for a version.
#[derive(Debug)]
pub enum Fetched {
    /// Its kept copy on disk.
    Kept(PathBuf),
    /// Downloaded, but the copy could not be written (the disk is full,
    /// or read-only): the bytes, checked to be a component, for this lease
    /// only.
    InMemory(Vec<u8>),
}

pub struct DownloadCache {
    dir: PathBuf,
    /// The most its downloads may take on disk together.
    max_bytes: u64,
    /// One lock per version being fetched: the first caller downloads,
    /// the others wait and then find the file.
    in_flight: Mutex<HashMap<AgentVersion, Arc<tokio::sync::Mutex<()>>>>,
    /// Keys whose signed `.cwasm` may be kept; none by default.
    trusted_keys: TrustedKeys,
}

impl DownloadCache {
    pub fn new(dir: PathBuf, max_bytes: u64) -> Self {
        DownloadCache {
            dir,
            max_bytes,
            in_flight: Mutex::default(),
            trusted_keys: TrustedKeys::default(),
        }
    }

    /// Also keeps a `.cwasm` signed by one of `keys` (verified first).
    pub fn trusting(self, keys: TrustedKeys) -> Self {
        DownloadCache {
            trusted_keys: keys,
            ..self
        }
    }

    /// Where the version is (or will be) kept. The names were checked by
    /// the store: no separators, no `..`.
    pub fn path(&self, agent_id: &str, version: &str) -> PathBuf {
        self.dir.join(agent_id).join(format!("{version}.wasm"))
    }

    /// The kept copy of the version, or what `download` brings (`None`:
    /// the source has no such version), kept first if it is a component
    /// and the disk takes it. `origin` names the download in errors and
    /// logs. A kept copy is returned as it is: its loader checks it again.
    pub async fn get_or_fetch<F, Fut>(
        &self,
        agent_id: &str,
        version: &str,
        origin: &str,
        download: F,
    ) -> Result<Option<Fetched>, FetchError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Vec<u8>>, FetchError>>,
    {
        let path = self.path(agent_id, version);
        if is_file(&path).await {
            return Ok(Some(Fetched::Kept(path)));
        }
        let gate = self.gate(agent_id, version);
        let _downloading = gate.lock().await;
        if is_file(&path).await {
            return Ok(Some(Fetched::Kept(path)));
        }
        let Some(bytes) = download().await? else {
            return Ok(None);
        };
        check_network_artifact(origin, &bytes, &self.trusted_keys)?;
        let (target, root, max_bytes) = (path.clone(), self.dir.clone(), self.max_bytes);
        let (bytes, written) = tokio::task::spawn_blocking(move || {
            let dir = target.parent().expect("a cached path has a parent");
            let written =
                std::fs::create_dir_all(dir).and_then(|()| write_atomically(&target, &bytes, Durability::Synced));
            if written.is_ok() {
                evict_oldest_downloads(&root, max_bytes, &target);
            }
            (bytes, written)
        })
        .await
        .map_err(|err| FetchError::Store {
            url: origin.to_string(),
            path: path.clone(),
            source: std::io::Error::other(err),
        })?;
        if let Err(err) = written {
            tracing::warn!(
                origin, path = %path.display(), error = %err,
                "could not keep the downloaded agent (is the disk full?); running it from memory, \
                 and downloading it again for its next lease"
            );
            return Ok(Some(Fetched::InMemory(bytes)));
        }
        tracing::info!(origin, path = %path.display(), "downloaded agent");
        Ok(Some(Fetched::Kept(path)))
    }

    fn gate(&self, agent_id: &str, version: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = lock(&self.in_flight);
        gates
            .entry((agent_id.to_string(), version.to_string()))
            .or_default()
            .clone()
    }
}

/// Deletes the oldest downloads (`<root>/<agent_id>/<version>.wasm`, by
/// modification time: when they were downloaded) until the rest take at
/// most `max_bytes`, never `keep`. Files it cannot read or delete are
/// skipped: a bound kept loosely is better than a failed download.
/// Downloads are ordered by when they were written, not by their last use:
/// touching a kept file would change the stamp the agent store knows it by.
fn evict_oldest_downloads(root: &Path, max_bytes: u64, keep: &Path) -> Vec<(PathBuf, u64)> {
    let Ok(agents) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let files = agents
        .flatten()
        .flat_map(|agent| files_in(&agent.path(), "wasm"))
        .collect();
    let evicted = evict_oldest_of(files, Bound::Bytes(max_bytes), Some(keep));
    for (path, bytes) in &evicted {
        tracing::info!(path = %path.display(), bytes, "evicted from the download cache");
    }
    evicted
}

async fn is_file(path: &Path) -> bool {
    tokio::fs::metadata(path).await.is_ok_and(|meta| meta.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn download(root: &Path, agent: &str, version: &str, len: usize, age_s: u64) -> PathBuf {
        let path = root.join(agent).join(format!("{version}.wasm"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, vec![0u8; len]).unwrap();
        let file = std::fs::File::options().append(true).open(&path).unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(age_s))
            .unwrap();
        path
    }

    #[test]
    fn the_oldest_downloads_go_first_across_agents_never_the_newest() {
        let root = tempfile::tempdir().unwrap();
        let oldest = download(root.path(), "a", "1", 100, 30);
        let older = download(root.path(), "b", "1", 100, 20);
        let newer = download(root.path(), "a", "2", 100, 10);
        let evicted = evict_oldest_downloads(root.path(), 150, &newer);
        let evicted: Vec<&PathBuf> = evicted.iter().map(|(path, _)| path).collect();
        assert_eq!(evicted, [&oldest, &older]);
        assert!(newer.exists());
        // A download larger than the bound is kept: it is the one in use.
        let big = download(root.path(), "c", "1", 500, 0);
        let evicted = evict_oldest_downloads(root.path(), 150, &big);
        assert_eq!(evicted.len(), 1, "{evicted:?}");
        assert!(big.exists() && !newer.exists());
    }
}
