//! Agents fetched over HTTP(S) from a URL template.
//!
//! A URL template such as `{base}/agents/{agent_id}/{version}.wasm` names
//! where each version lives (`{base}` is the control plane's URL). Each
//! version is downloaded once and kept ([`DownloadCache`]); downloads are
//! bounded in size and time, and must be a WebAssembly component. The
//! source builds its own HTTP client, which follows no redirect: a 3xx
//! could send the download to another host or to plain `http://`, so it
//! is an error naming both URLs.

use std::path::PathBuf;
use std::time::Duration;

use super::download_cache::{DownloadCache, FetchError, Fetched};

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
    /// The most the kept versions may take on disk; the oldest go first.
    pub cache_max_bytes: u64,
}

pub struct HttpSource {
    settings: HttpSourceSettings,
    client: reqwest::Client,
    cache: DownloadCache,
}

/// The agent store's HTTP client: bounded by `timeout`, with `tls` (the
/// control plane's, client certificate included, for a source on it) or
/// reqwest's default verification, and no redirects followed.
pub fn download_client(
    timeout: Duration,
    tls: Option<rustls::ClientConfig>,
) -> Result<reqwest::Client, reqwest::Error> {
    let builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("node-runtime/", env!("CARGO_PKG_VERSION")));
    match tls {
        Some(config) => builder.tls_backend_preconfigured(config).build(),
        None => builder.build(),
    }
}

impl HttpSource {
    /// A source downloading with [`download_client`].
    pub fn new(settings: HttpSourceSettings, tls: Option<rustls::ClientConfig>) -> Result<Self, reqwest::Error> {
        Ok(HttpSource {
            client: download_client(settings.timeout, tls)?,
            cache: DownloadCache::new(settings.cache_dir.clone(), settings.cache_max_bytes),
            settings,
        })
    }

    /// Also takes a `.cwasm` signed by one of `keys` (verified before it
    /// is kept, and again before it is loaded).
    pub fn trusting(self, keys: crate::sandbox::signature::TrustedKeys) -> Self {
        HttpSource {
            cache: self.cache.trusting(keys),
            ..self
        }
    }

    pub fn url(&self, agent_id: &str, version: &str) -> String {
        self.settings
            .url_template
            .replace("{agent_id}", &support::percent::component(agent_id))
            .replace("{version}", &support::percent::component(version))
    }

    /// Where the version is (or will be) kept.
    pub fn cached_path(&self, agent_id: &str, version: &str) -> PathBuf {
        self.cache.path(agent_id, version)
    }

    /// The local copy of the version, downloaded first if there is none;
    /// `None` when the server has no such version (HTTP 404 or 410).
    pub async fn fetch(&self, agent_id: &str, version: &str) -> Result<Option<Fetched>, FetchError> {
        let url = self.url(agent_id, version);
        self.cache
            .get_or_fetch(agent_id, version, &url, || self.download(&url))
            .await
    }

    async fn download(&self, url: &str) -> Result<Option<Vec<u8>>, FetchError> {
        let limit = self.settings.max_bytes;
        let timeout = self.settings.timeout;
        let failed = |err: reqwest::Error| {
            if err.is_timeout() {
                FetchError::Timeout {
                    url: url.to_string(),
                    timeout,
                }
            } else {
                FetchError::Transport {
                    url: url.to_string(),
                    reason: support::error::error_chain(&err),
                }
            }
        };
        // The timeout covers connecting, the answer and the whole body.
        let mut response = self.client.get(url).timeout(timeout).send().await.map_err(failed)?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::GONE {
            return Ok(None);
        }
        if status.is_redirection() {
            let location = response.headers().get(reqwest::header::LOCATION);
            // Resolved, so that the error names the URL to configure.
            let location = match location.map(|value| value.to_str()) {
                Some(Ok(location)) => response
                    .url()
                    .join(location)
                    .map_or_else(|_| location.to_string(), |resolved| resolved.to_string()),
                Some(Err(_)) => "a Location that is not text".to_string(),
                None => "no Location".to_string(),
            };
            return Err(FetchError::Redirect {
                url: url.to_string(),
                status: status.as_u16(),
                location,
            });
        }
        if !status.is_success() {
            return Err(FetchError::Status {
                url: url.to_string(),
                status: status.as_u16(),
            });
        }
        let too_large = || FetchError::TooLarge {
            url: url.to_string(),
            limit,
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn source(template: &str) -> HttpSource {
        support::tls::install_crypto_provider();
        HttpSource::new(
            HttpSourceSettings {
                url_template: template.to_string(),
                max_bytes: 1 << 20,
                timeout: Duration::from_secs(1),
                cache_dir: PathBuf::from("cache"),
                cache_max_bytes: 1 << 30,
            },
            None,
        )
        .unwrap()
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
            std::path::Path::new("cache").join("echo").join("1.0.0.wasm")
        );
    }
}
