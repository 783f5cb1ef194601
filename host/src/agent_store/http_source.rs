//! Agents fetched over HTTP(S) from a URL template, kept on disk.
//!
//! A URL template such as `{base}/agents/{agent_id}/{version}.wasm` names
//! where each version lives (`{base}` is the control plane's URL). The
//! first run of a version downloads it once, whatever the number of runs
//! waiting for it, into `<cache>/<agent_id>/<version>.wasm`; later runs and
//! later processes use that file. A version is treated as immutable: to
//! fetch it again, delete its file. Downloads are bounded in size and time
//! and written atomically (a temporary file, synced, then renamed), so a
//! crash or a cut connection never leaves half an artifact behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use thiserror::Error;

/// Where and how to download agents.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpSourceSettings {
    /// The URL of one version, with `{agent_id}` and `{version}` (and
    /// `{base}` already replaced by the control plane's URL).
    pub url_template: String,
    /// The largest artifact accepted, in bytes.
    pub max_bytes: u64,
    /// The longest a whole download may take.
    pub timeout: Duration,
    /// Where downloaded versions are kept.
    pub cache_dir: PathBuf,
}

/// Why a download failed. Each one is the node's problem, not the
/// agent's: the lease goes back to the control plane to be tried again.
#[derive(Debug, Error)]
pub enum FetchError {
    #[error("GET {url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error(
        "GET {url}: the artifact is larger than AgentStore.MaxDownloadBytes ({limit} bytes); \
         raise the limit if the agent is meant to be this large"
    )]
    TooLarge { url: String, limit: u64 },
    #[error(
        "GET {url}: no complete answer within AgentStore.DownloadTimeoutSeconds ({}s)",
        .timeout.as_secs()
    )]
    Timeout { url: String, timeout: Duration },
    #[error("GET {url}: {reason}")]
    Transport { url: String, reason: String },
    #[error("cannot store the download of {url} at {}: {source}", .path.display())]
    Store {
        url: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Characters kept as they are in an id or version put into a URL path.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

pub struct HttpSource {
    settings: HttpSourceSettings,
    client: reqwest::Client,
    /// One lock per version being fetched: the first caller downloads,
    /// the others wait and then find the file.
    in_flight: Mutex<HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>>,
}

impl HttpSource {
    pub fn new(settings: HttpSourceSettings, client: reqwest::Client) -> Self {
        HttpSource {
            settings,
            client,
            in_flight: Mutex::default(),
        }
    }

    pub fn url(&self, agent_id: &str, version: &str) -> String {
        self.settings
            .url_template
            .replace("{agent_id}", &utf8_percent_encode(agent_id, PATH_SEGMENT).to_string())
            .replace("{version}", &utf8_percent_encode(version, PATH_SEGMENT).to_string())
    }

    /// Where the version is (or will be) kept. The names were checked by
    /// the store: no separators, no `..`.
    pub fn cached_path(&self, agent_id: &str, version: &str) -> PathBuf {
        self.settings
            .cache_dir
            .join(agent_id)
            .join(format!("{version}.wasm"))
    }

    /// The local copy of the version, downloaded first if there is none;
    /// `None` when the server has no such version (HTTP 404 or 410).
    pub async fn fetch(&self, agent_id: &str, version: &str) -> Result<Option<PathBuf>, FetchError> {
        let path = self.cached_path(agent_id, version);
        if is_file(&path).await {
            return Ok(Some(path));
        }
        let gate = self.gate(agent_id, version);
        let _downloading = gate.lock().await;
        if is_file(&path).await {
            return Ok(Some(path));
        }
        let url = self.url(agent_id, version);
        let Some(bytes) = self.download(&url).await? else {
            return Ok(None);
        };
        let target = path.clone();
        tokio::task::spawn_blocking(move || write_atomically(&target, &bytes))
            .await
            .map_err(std::io::Error::other)
            .and_then(|written| written)
            .map_err(|source| FetchError::Store {
                url: url.clone(),
                path: path.clone(),
                source,
            })?;
        tracing::info!(%url, path = %path.display(), "downloaded agent");
        Ok(Some(path))
    }

    fn gate(&self, agent_id: &str, version: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = self.in_flight.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        gates
            .entry((agent_id.to_string(), version.to_string()))
            .or_default()
            .clone()
    }

    async fn download(&self, url: &str) -> Result<Option<Vec<u8>>, FetchError> {
        let limit = self.settings.max_bytes;
        let timeout = self.settings.timeout;
        let failed = |err: reqwest::Error| {
            if err.is_timeout() {
                FetchError::Timeout { url: url.to_string(), timeout }
            } else {
                FetchError::Transport { url: url.to_string(), reason: error_chain(&err) }
            }
        };
        // The timeout covers connecting, the answer and the whole body.
        let mut response = self.client.get(url).timeout(timeout).send().await.map_err(failed)?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::GONE {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(FetchError::Status { url: url.to_string(), status: status.as_u16() });
        }
        let too_large = || FetchError::TooLarge { url: url.to_string(), limit };
        if response.content_length().is_some_and(|length| length > limit) {
            return Err(too_large());
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(failed)? {
            if bytes.len() as u64 + chunk.len() as u64 > limit {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Some(bytes))
    }
}

async fn is_file(path: &Path) -> bool {
    tokio::fs::metadata(path).await.is_ok_and(|meta| meta.is_file())
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, and renames
/// it into place: readers see the whole file or none.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().expect("a cached path has a parent");
    std::fs::create_dir_all(dir)?;
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|err| err.error)?;
    Ok(())
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(template: &str) -> HttpSource {
        crate::control_plane::install_crypto_provider();
        HttpSource::new(
            HttpSourceSettings {
                url_template: template.to_string(),
                max_bytes: 1 << 20,
                timeout: Duration::from_secs(1),
                cache_dir: PathBuf::from("cache"),
            },
            reqwest::Client::new(),
        )
    }

    #[test]
    fn ids_and_versions_are_escaped_into_the_url() {
        let source = source("https://agents.test/agents/{agent_id}/{version}.wasm");
        assert_eq!(
            source.url("invoice classifier", "1.0.0+build?x"),
            "https://agents.test/agents/invoice%20classifier/1.0.0%2Bbuild%3Fx.wasm"
        );
        assert_eq!(
            source.cached_path("echo", "1.0.0"),
            Path::new("cache").join("echo").join("1.0.0.wasm")
        );
    }
}
