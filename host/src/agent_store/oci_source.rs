//! Agents pulled from an OCI registry, as Wasm OCI artifacts.
//!
//! A reference template such as `registry.example:5000/agents/{agent_id}:{version}`
//! names each version. The artifact has the layout `wkg` and `oci-wasm`
//! use: one layer of media type `application/wasm` and a config of type
//! `application/vnd.wasm.config.v0+json`. The manifest is read first, so a
//! layer larger than the limit is refused before a byte of it is fetched;
//! the layer is then streamed with the limit enforced, and its SHA-256
//! checked against the manifest's digest. Each version is pulled once and
//! kept ([`DownloadCache`]).

use std::path::PathBuf;
use std::time::Duration;

use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_wasm::WasmClient;
use tokio_stream::StreamExt;

use super::digest::AgentDigest;
use super::download_cache::{DownloadCache, FetchError, error_chain};

/// Where and how to pull agents.
#[derive(Clone, PartialEq)]
pub struct OciSourceSettings {
    /// With `{agent_id}` and `{version}`, e.g. `ghcr.io/acme/{agent_id}:{version}`.
    pub reference_template: String,
    /// Speak plain HTTP to the registry (a registry on loopback).
    pub insecure: bool,
    /// Basic credentials; anonymous when `None`.
    pub credentials: Option<(String, String)>,
    pub max_bytes: u64,
    pub timeout: Duration,
    pub cache_dir: PathBuf,
}

impl std::fmt::Debug for OciSourceSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OciSourceSettings")
            .field("reference_template", &self.reference_template)
            .field("insecure", &self.insecure)
            .field("credentials", &self.credentials.as_ref().map(|(user, _)| (user, "***")))
            .field("max_bytes", &self.max_bytes)
            .field("timeout", &self.timeout)
            .field("cache_dir", &self.cache_dir)
            .finish()
    }
}

/// An OCI client for `insecure` (plain HTTP) or HTTPS registries.
pub fn registry_client(insecure: bool) -> WasmClient {
    let protocol = if insecure {
        oci_client::client::ClientProtocol::Http
    } else {
        oci_client::client::ClientProtocol::Https
    };
    WasmClient::new(Client::new(oci_client::client::ClientConfig {
        protocol,
        connect_timeout: Some(Duration::from_secs(10)),
        ..Default::default()
    }))
}

pub fn registry_auth(credentials: Option<&(String, String)>) -> RegistryAuth {
    match credentials {
        Some((user, password)) => RegistryAuth::Basic(user.clone(), password.clone()),
        None => RegistryAuth::Anonymous,
    }
}

pub struct OciSource {
    settings: OciSourceSettings,
    client: WasmClient,
    auth: RegistryAuth,
    cache: DownloadCache,
}

impl OciSource {
    pub fn new(settings: OciSourceSettings) -> Self {
        OciSource {
            client: registry_client(settings.insecure),
            auth: registry_auth(settings.credentials.as_ref()),
            cache: DownloadCache::new(settings.cache_dir.clone()),
            settings,
        }
    }

    pub fn reference(&self, agent_id: &str, version: &str) -> String {
        // OCI tags allow [A-Za-z0-9_.-]; `+` (semver build metadata) is
        // spelled `_`, as other Wasm registries do.
        self.settings
            .reference_template
            .replace("{agent_id}", agent_id)
            .replace("{version}", &version.replace('+', "_"))
    }

    /// The local copy of the version, pulled first if there is none;
    /// `None` when the registry has no such repository or tag.
    pub async fn fetch(&self, agent_id: &str, version: &str) -> Result<Option<PathBuf>, FetchError> {
        let reference = self.reference(agent_id, version);
        self.cache
            .get_or_fetch(agent_id, version, &reference, || async {
                let timeout = self.settings.timeout;
                tokio::time::timeout(timeout, self.pull(&reference))
                    .await
                    .unwrap_or_else(|_| Err(FetchError::Timeout { url: reference.clone(), timeout }))
            })
            .await
    }

    async fn pull(&self, text: &str) -> Result<Option<Vec<u8>>, FetchError> {
        let failed = |reason: String| FetchError::Transport { url: text.to_string(), reason };
        let reference: Reference = text
            .parse()
            .map_err(|err: oci_client::ParseError| failed(format!("not an OCI reference: {err}")))?;
        let manifest = match self.client.pull_manifest_and_config(&reference, &self.auth).await {
            Ok((manifest, _config, _digest)) => manifest,
            Err(err) if is_not_found(&err) => return Ok(None),
            Err(err) => return Err(failed(format!("{err:#}"))),
        };
        let layer = &manifest.layers[0];
        let limit = self.settings.max_bytes;
        let too_large = || FetchError::TooLarge { url: text.to_string(), limit };
        if u64::try_from(layer.size).map_or(true, |size| size > limit) {
            return Err(too_large());
        }
        let mut stream = self
            .client
            .pull_blob_stream(&reference, layer)
            .await
            .map_err(|err| failed(error_chain(&err)))?;
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|err| failed(error_chain(&err)))?;
            if bytes.len() as u64 + chunk.len() as u64 > limit {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        let actual = AgentDigest::of(&bytes).to_string();
        if actual != layer.digest {
            return Err(failed(format!(
                "the layer's content has digest {actual}, but the manifest says {}",
                layer.digest
            )));
        }
        Ok(Some(bytes))
    }
}

/// A registry's "no such repository or tag".
fn is_not_found(err: &anyhow::Error) -> bool {
    match err.downcast_ref::<OciDistributionError>() {
        Some(OciDistributionError::ImageManifestNotFoundError(_)) => true,
        Some(OciDistributionError::RegistryError { envelope, .. }) => envelope.errors.iter().any(|error| {
            matches!(
                error.code,
                OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown | OciErrorCode::NotFound
            )
        }),
        Some(OciDistributionError::ServerError { code: 404, .. }) => true,
        _ => false,
    }
}
