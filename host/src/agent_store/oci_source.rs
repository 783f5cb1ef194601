//! Agents pulled from an OCI registry, as Wasm OCI artifacts.
//!
//! A reference template such as `registry.example:5000/agents/{agent_id}:{version}`
//! names each version. The artifact has the layout `wkg` and `oci-wasm`
//! use: one layer of media type `application/wasm` and a config of type
//! `application/vnd.wasm.config.v0+json`. The manifest is read first, so
//! an artifact of another layout (another media type, no layer or more
//! than one: a container image, a `.cwasm` pushed as a blob) or a layer
//! larger than the limit is refused before a byte of the layer is fetched;
//! the layer is then streamed with the limit enforced, its SHA-256
//! checked against the manifest's digest, and its bytes must be a
//! WebAssembly component. Each version is pulled once and kept
//! ([`DownloadCache`]).

use std::path::PathBuf;
use std::time::Duration;

use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_wasm::{WASM_LAYER_MEDIA_TYPE, WASM_MANIFEST_CONFIG_MEDIA_TYPE, WasmClient};
use tokio_stream::StreamExt;

use super::digest::AgentDigest;
use support::error::error_chain;

use super::download_cache::{DownloadCache, FetchError, Fetched};

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
    /// The most the kept versions may take on disk; the oldest go first.
    pub cache_max_bytes: u64,
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
            .field("cache_max_bytes", &self.cache_max_bytes)
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
            cache: DownloadCache::new(settings.cache_dir.clone(), settings.cache_max_bytes),
            settings,
        }
    }

    /// Also takes a `.cwasm` signed by one of `keys` (verified before it
    /// is kept, and again before it is loaded).
    pub fn trusting(self, keys: crate::sandbox::signature::TrustedKeys) -> Self {
        OciSource {
            cache: self.cache.trusting(keys),
            ..self
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
    pub async fn fetch(&self, agent_id: &str, version: &str) -> Result<Option<Fetched>, FetchError> {
        let reference = self.reference(agent_id, version);
        self.cache
            .get_or_fetch(agent_id, version, &reference, || async {
                let timeout = self.settings.timeout;
                tokio::time::timeout(timeout, self.pull(&reference))
                    .await
                    .unwrap_or_else(|_| {
                        Err(FetchError::Timeout {
                            url: reference.clone(),
                            timeout,
                        })
                    })
            })
            .await
    }

    async fn pull(&self, text: &str) -> Result<Option<Vec<u8>>, FetchError> {
        let failed = |reason: String| FetchError::Transport {
            url: text.to_string(),
            reason,
        };
        let reference: Reference = text
            .parse()
            .map_err(|err: oci_client::ParseError| failed(format!("not an OCI reference: {err}")))?;
        // The manifest only: the config says nothing the layer's checks
        // need.
        let manifest = match self.client.pull_image_manifest(&reference, &self.auth).await {
            Ok((manifest, _digest)) => manifest,
            Err(err) if is_not_found(&err) => return Ok(None),
            Err(err) => return Err(failed(error_chain(&err))),
        };
        let layer = wasm_layer(&manifest).map_err(|reason| FetchError::NotWasmArtifact {
            url: text.to_string(),
            reason,
        })?;
        let limit = self.settings.max_bytes;
        let too_large = || FetchError::TooLarge {
            url: text.to_string(),
            limit,
        };
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

/// The one layer of a Wasm component artifact, as the manifest describes
/// it; why the manifest is not one otherwise.
fn wasm_layer(manifest: &OciImageManifest) -> Result<&OciDescriptor, String> {
    if manifest.config.media_type != WASM_MANIFEST_CONFIG_MEDIA_TYPE {
        return Err(format!(
            "its config has media type {}, not {WASM_MANIFEST_CONFIG_MEDIA_TYPE}",
            manifest.config.media_type
        ));
    }
    match manifest.layers.as_slice() {
        [layer] if layer.media_type == WASM_LAYER_MEDIA_TYPE => Ok(layer),
        [layer] => Err(format!(
            "its layer has media type {}, not {WASM_LAYER_MEDIA_TYPE}",
            layer.media_type
        )),
        layers => Err(format!("the manifest has {} layers, not exactly one", layers.len())),
    }
}

/// A registry's "no such repository or tag".
fn is_not_found(err: &OciDistributionError) -> bool {
    match err {
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|error| {
            matches!(
                error.code,
                OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown | OciErrorCode::NotFound
            )
        }),
        OciDistributionError::ServerError { code: 404, .. } => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(layer_types: &[&str]) -> OciImageManifest {
        let mut manifest = OciImageManifest::default();
        manifest.config.media_type = WASM_MANIFEST_CONFIG_MEDIA_TYPE.to_string();
        manifest.layers = layer_types
            .iter()
            .map(|media_type| OciDescriptor {
                media_type: media_type.to_string(),
                ..Default::default()
            })
            .collect();
        manifest
    }

    #[test]
    fn only_one_application_wasm_layer_is_a_wasm_component_artifact() {
        assert!(wasm_layer(&manifest(&[WASM_LAYER_MEDIA_TYPE])).is_ok());
        let no_layer = wasm_layer(&manifest(&[])).unwrap_err();
        assert_eq!(no_layer, "the manifest has 0 layers, not exactly one");
        let two = manifest(&[WASM_LAYER_MEDIA_TYPE, WASM_LAYER_MEDIA_TYPE]);
        let two = wasm_layer(&two).unwrap_err();
        assert!(two.contains("2 layers"), "{two}");
        let tar = "application/vnd.oci.image.layer.v1.tar+gzip";
        let other = wasm_layer(&manifest(&[tar])).unwrap_err();
        assert!(other.contains(tar) && other.contains(WASM_LAYER_MEDIA_TYPE), "{other}");
        let mut image = manifest(&[WASM_LAYER_MEDIA_TYPE]);
        image.config.media_type = "application/vnd.oci.image.config.v1+json".to_string();
        let refused = wasm_layer(&image).unwrap_err();
        assert!(
            refused.contains("application/vnd.oci.image.config.v1+json"),
            "{refused}"
        );
    }
}
