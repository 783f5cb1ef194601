//! Where agents come from, tried in a configured order: directories laid
//! out `<dir>/<agent_id>/<version>.wasm` (or `.cwasm`, precompiled,
//! preferred when both exist), an HTTP(S) source ([`http_source`]) and an
//! OCI registry ([`oci_source`]).
//!
//! Each source hands its file to the sandbox with its trust
//! ([`ArtifactTrust`]): a directory is the operator's, and may hold native
//! code (`.cwasm`); a download may be a WebAssembly component only, checked
//! before it is kept ([`download_cache`]) and again before it is compiled,
//! since a download cache an older node filled may hold anything.
//!
//! A lease names an agent by id and version, and may pin its bytes with
//! metadata `agent.digest` ([`digest`]). The store turns that into a
//! loaded [`Agent`], checking the pin first. It reads and hashes a file
//! only when the file changed: an unchanged file (same [`FileStamp`]:
//! device, inode, length, modification and change times) is served from
//! memory, and after a restart its SHA-256 comes from a memo kept beside
//! the compiled cache ([`digest_memo`]), so the compiled component is
//! loaded from that cache without reading the file at all. A file changed
//! in the last seconds is always read and hashed again
//! ([`SETTLE_TIME`]). The ids come from the control plane, so
//! they are checked before they touch the filesystem or a URL: no
//! separators, no `..`.

pub mod digest;
pub mod digest_memo;
pub mod download_cache;
pub mod http_source;
pub mod oci_source;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use support::sync::lock;

use thiserror::Error;

use crate::sandbox::{Agent, ArtifactTrust, InvalidAgent, Sandbox};
pub use digest::{AgentDigest, DIGEST_METADATA_KEY, InvalidDigest};
pub use digest_memo::DigestMemo;
pub use download_cache::{FetchError, Fetched};
pub use http_source::{HttpSource, HttpSourceSettings};
pub use oci_source::{OciSource, OciSourceSettings};
pub use support::file_stamp::{FileStamp, SETTLE_TIME};

#[derive(Debug, Error)]
pub enum ResolveError {
    #[error("agent {agent_id} version {version} not found: looked for {}", .looked_for.join(" and "))]
    NotFound {
        agent_id: String,
        version: String,
        looked_for: Vec<String>,
    },
    #[error(
        "invalid agent {field} {value:?} in the lease: it must be non-empty and must not contain `/`, `\\` or `..`"
    )]
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
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("{}: {invalid}", .path.display())]
    Invalid { path: PathBuf, invalid: InvalidAgent },
    /// A kept download that cannot run: versions are immutable, so it
    /// would be refused at every lease until deleted.
    #[error(
        "{} (downloaded earlier): {invalid}; delete the file so that the node downloads the \
         version again",
        .path.display()
    )]
    InvalidDownload { path: PathBuf, invalid: InvalidAgent },
}

impl ResolveError {
    /// Whether another attempt (here later, or on another node) could
    /// succeed: a failed download could; a missing, mismatched or
    /// invalid artifact will not, nor a download that is not a component.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ResolveError::Fetch(fetch) if fetch.is_retryable())
    }
}

/// One place agents are looked for.
pub enum AgentSource {
    /// `<dir>/<agent_id>/<version>.cwasm` or `.wasm`: the operator's own
    /// files, native code included.
    Directory(PathBuf),
    /// Downloaded once, then kept on disk: components only.
    Http(HttpSource),
    /// Pulled from an OCI registry once, then kept on disk: components
    /// only.
    Oci(OciSource),
}

/// An agent loaded from a file: the file's stamp then, its digest, and
/// whether the stamp had settled when the digest was taken.
#[derive(Clone)]
struct LoadedAgent {
    stamp: FileStamp,
    digest: AgentDigest,
    agent: Arc<Agent>,
    settled: bool,
}

type Loaded = HashMap<(String, String), LoadedAgent>;

/// How the store's resolutions were served, since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResolveCounts {
    /// From memory: the file's stamp had not changed since this store
    /// loaded it.
    pub in_memory: u64,
    /// From the digest memo and the compiled cache, without reading the
    /// file: what a restarted node does with an unchanged file.
    pub remembered: u64,
    /// By reading and hashing the file.
    pub hashed: u64,
}

pub struct AgentStore {
    sources: Vec<AgentSource>,
    require_digest: bool,
    loaded: Mutex<Loaded>,
    in_memory: AtomicU64,
    remembered: AtomicU64,
    hashed: AtomicU64,
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
            in_memory: AtomicU64::new(0),
            remembered: AtomicU64::new(0),
            hashed: AtomicU64::new(0),
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
    pub async fn resolve(&self, sandbox: &Sandbox, agent_id: &str, version: &str) -> Result<Arc<Agent>, ResolveError> {
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
        // Taken before the file is stamped: what is known about a file is
        // trusted only if it had settled by then (`FileStamp::settled_at`).
        let checked_at = SystemTime::now();
        let (stamp, trust) = match self.locate(agent_id, version).await? {
            Located::File(stamp, trust) => (stamp, trust),
            Located::InMemory { bytes, origin, trust } => {
                return self.load_unkept(sandbox, bytes, origin, trust, pin).await;
            }
        };
        let settled = stamp.settled_at(checked_at);
        let key = (agent_id.to_string(), version.to_string());
        let cached = self.lock().get(&key).cloned();
        if let Some(loaded) = cached
            && loaded.stamp == stamp
            && reusable(&loaded, settled, pin)
        {
            check_pin(&stamp, pin, loaded.digest)?;
            self.in_memory.fetch_add(1, Ordering::Relaxed);
            return Ok(loaded.agent);
        }
        let memo = sandbox.compiled_cache_dir().map(DigestMemo::in_cache_dir);
        if settled && let Some(memo) = &memo {
            let (memo, wanted) = (memo.clone(), stamp.clone());
            let remembered = tokio::task::spawn_blocking(move || memo.get(&wanted))
                .await
                .ok()
                .flatten();
            if let Some(digest) = remembered {
                // The memo's digest is the file's: the pin is checked
                // against it as against a fresh hash.
                check_pin(&stamp, pin, digest)?;
                // Without a compiled entry for it, the file is read and
                // hashed below: only a digest computed here keys new
                // compiled code.
                if let Some(agent) = sandbox.load_compiled(*digest.bytes(), &trust).await {
                    self.remembered.fetch_add(1, Ordering::Relaxed);
                    let loaded = LoadedAgent {
                        stamp,
                        digest,
                        agent: agent.clone(),
                        settled: true,
                    };
                    self.lock().insert(key, loaded);
                    return Ok(agent);
                }
            }
        }
        let bytes = tokio::fs::read(&stamp.path).await.map_err(|source| ResolveError::Io {
            path: stamp.path.clone(),
            source,
        })?;
        let digest = AgentDigest::of(&bytes);
        self.hashed.fetch_add(1, Ordering::Relaxed);
        check_pin(&stamp, pin, digest)?;
        let agent = sandbox
            .load_digested(Arc::from(bytes), *digest.bytes(), &trust)
            .await
            .map_err(|invalid| {
                let path = stamp.path.clone();
                match trust {
                    ArtifactTrust::Operator => ResolveError::Invalid { path, invalid },
                    ArtifactTrust::Network { .. } => ResolveError::InvalidDownload { path, invalid },
                }
            })?;
        // A file changed since `checked_at` less the settle time might
        // change again without changing its stamp: nothing is recorded on
        // disk under such a stamp, and in memory it is kept only until the
        // file settles (see `reusable`). (Had the file changed between the
        // stamp and the read, its stamp has changed since, so a record
        // under the old one is never matched.)
        if settled && let Some(memo) = memo {
            let recorded = stamp.clone();
            let _ = tokio::task::spawn_blocking(move || memo.put(&recorded, digest)).await;
        }
        let loaded = LoadedAgent {
            stamp,
            digest,
            agent: agent.clone(),
            settled,
        };
        self.lock().insert(key, loaded);
        Ok(agent)
    }

    /// A download the disk did not take: loaded from its bytes, for this
    /// lease only (nothing is remembered under a stamp: there is no file).
    async fn load_unkept(
        &self,
        sandbox: &Sandbox,
        bytes: Vec<u8>,
        origin: String,
        trust: ArtifactTrust,
        pin: Option<AgentDigest>,
    ) -> Result<Arc<Agent>, ResolveError> {
        let digest = AgentDigest::of(&bytes);
        self.hashed.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(origin);
        if let Some(expected) = pin.filter(|pin| *pin != digest) {
            return Err(ResolveError::DigestMismatch {
                path,
                expected,
                actual: digest,
            });
        }
        sandbox
            .load_digested(Arc::from(bytes), *digest.bytes(), &trust)
            .await
            .map_err(|invalid| ResolveError::Invalid { path, invalid })
    }

    /// Resolutions served without reading or compiling the agent again,
    /// from this store's memory (the sandbox counts the loads that found
    /// the same bytes compiled, in memory or in its on-disk cache).
    pub fn cache_hits(&self) -> u64 {
        self.in_memory.load(Ordering::Relaxed)
    }

    /// How resolutions were served: from memory, from the digest memo, or
    /// by hashing the file.
    pub fn counts(&self) -> ResolveCounts {
        ResolveCounts {
            in_memory: self.in_memory.load(Ordering::Relaxed),
            remembered: self.remembered.load(Ordering::Relaxed),
            hashed: self.hashed.load(Ordering::Relaxed),
        }
    }

    /// The first source's file for the version (or, for a download the
    /// disk did not take, its bytes), and the trust its bytes carry.
    async fn locate(&self, agent_id: &str, version: &str) -> Result<Located, ResolveError> {
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
                            found = Some(Located::File(stamp, ArtifactTrust::Operator));
                            break;
                        }
                        looked_for.push(path.display().to_string());
                    }
                    found
                }
                AgentSource::Http(http) => {
                    let origin = http.url(agent_id, version);
                    downloaded(|| http.fetch(agent_id, version), origin, &mut looked_for).await?
                }
                AgentSource::Oci(oci) => {
                    let origin = oci.reference(agent_id, version);
                    downloaded(|| oci.fetch(agent_id, version), origin, &mut looked_for).await?
                }
            };
            if let Some(found) = found {
                return Ok(found);
            }
        }
        Err(ResolveError::NotFound {
            agent_id: agent_id.to_string(),
            version: version.to_string(),
            looked_for,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        lock(&self.loaded)
    }
}

/// Where a version's bytes are.
enum Located {
    /// In a file: the operator's, or a kept download.
    File(FileStamp, ArtifactTrust),
    /// Downloaded, but not kept (the disk did not take it).
    InMemory {
        bytes: Vec<u8>,
        origin: String,
        trust: ArtifactTrust,
    },
}

/// What a network source answers (`fetch`): its downloaded copy (or its
/// bytes), trusted as bytes from `origin`, or (not there) `origin` noted as
/// looked for. A kept copy evicted before it could be stamped (another
/// version's download made room) is fetched again, once: a version the
/// source has is never reported missing for that.
async fn downloaded<F, Fut>(
    fetch: F,
    origin: String,
    looked_for: &mut Vec<String>,
) -> Result<Option<Located>, ResolveError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Option<Fetched>, FetchError>>,
{
    let trust = || ArtifactTrust::Network { origin: origin.clone() };
    for _ in 0..2 {
        match fetch().await? {
            Some(Fetched::Kept(path)) => {
                if let Some(stamp) = stamp_of(&path).await? {
                    return Ok(Some(Located::File(stamp, trust())));
                }
            }
            Some(Fetched::InMemory(bytes)) => {
                return Ok(Some(Located::InMemory {
                    bytes,
                    trust: trust(),
                    origin,
                }));
            }
            None => {
                looked_for.push(origin);
                return Ok(None);
            }
        }
    }
    Err(ResolveError::Fetch(FetchError::Store {
        url: origin.clone(),
        path: PathBuf::from(&origin),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the download was evicted from the download cache twice before it could be loaded; \
             raise AgentStore.DownloadCacheMaxBytes",
        ),
    }))
}

/// The file's stamp, or `None` when there is no file at `path`.
///
/// A `stat` on the calling thread: every lease resolves its agent, and
/// handing two `stat`s to the blocking pool (`tokio::fs`) and back cost
/// more than the run of a small agent. Agent directories are local, and
/// their entries stay in the kernel's cache.
async fn stamp_of(path: &std::path::Path) -> Result<Option<FileStamp>, ResolveError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(Some(FileStamp::of(path, &meta))),
        Ok(_) => Ok(None),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ResolveError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Whether an agent loaded from a file with the stamp seen now serves
/// this resolution without hashing the file again.
///
/// A digest taken once the stamp had settled stands for the file. One
/// taken before (a file written moments ago: a deployment) serves until
/// the file settles, so that a burst of leases for a new agent does not
/// hash it once each; the first resolution after that hashes it again.
/// That bounds the one case a stamp cannot tell, a rewrite in place
/// within the file system's timestamp granularity, to a few seconds of
/// the earlier bytes; and a pin that names other bytes than those is
/// checked against a fresh hash, never refused on the earlier one.
fn reusable(loaded: &LoadedAgent, settled_now: bool, pin: Option<AgentDigest>) -> bool {
    if loaded.settled {
        return true;
    }
    !settled_now && pin.is_none_or(|pin| pin == loaded.digest)
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
    let bad =
        value.is_empty() || value.contains('/') || value.contains('\\') || value.contains("..") || value.contains('\0');
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
