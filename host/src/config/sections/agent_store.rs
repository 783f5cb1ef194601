//! `AgentStore` (this node): where agents come from. Its type and
//! defaults, its binding, and its printed view, so that each of its keys
//! is spelt here only.

use std::time::Duration;

use serde::Serialize;
use support::Secret;

use crate::config::effective::REDACTED;
use crate::config::error::ConfigError;
use crate::config::reader::{Reader, Section, http_url, names};
use crate::sandbox::signature::TrustedKey;

/// Which kind of place an agent is looked for in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentSourceKind {
    /// `NodeRuntime.AgentsDirectory`.
    Directory,
    /// `AgentStore.HttpUrlTemplate`.
    Http,
    /// `AgentStore.OciReferenceTemplate`.
    Oci,
}

impl AgentSourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentSourceKind::Directory => "directory",
            AgentSourceKind::Http => "http",
            AgentSourceKind::Oci => "oci",
        }
    }
}

/// `AgentStore` (this node): where agents come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStoreSection {
    /// `Sources`: the order the sources are tried in. Default: the
    /// directory, then HTTP when `HttpUrlTemplate` is set.
    pub sources: Vec<AgentSourceKind>,
    /// `HttpUrlTemplate`: with `{agent_id}` and `{version}`, and
    /// optionally `{base}` (the control plane's URL).
    pub http_url_template: Option<String>,
    /// `OciReferenceTemplate`: `REGISTRY/REPOSITORY:TAG` with
    /// `{agent_id}` and `{version}`.
    pub oci_reference_template: Option<String>,
    /// `OciInsecure`: plain HTTP to the registry.
    pub oci_insecure: bool,
    /// `OciUsername`, `OciPassword`: basic credentials; anonymous when
    /// unset.
    pub oci_username: Option<String>,
    pub oci_password: Option<Secret>,
    /// `MaxDownloadBytes`: bytes or a size.
    pub max_download_bytes: u64,
    /// `DownloadTimeoutSeconds`.
    pub download_timeout: Duration,
    /// `DownloadCacheMaxBytes`: bytes or a size; the most each network
    /// source's kept downloads may take on disk (the oldest go first). At
    /// least `MaxDownloadBytes`.
    pub download_cache_max_bytes: u64,
    /// `RequireDigest`: refuse leases without `agent.digest` metadata.
    pub require_digest: bool,
    /// `TrustedSigningKeys`: Ed25519 public keys (PEM files) whose
    /// signature makes a `.cwasm` from the HTTP or OCI source loadable.
    /// Empty (the default): network sources deliver components only.
    pub trusted_signing_keys: Vec<TrustedKey>,
}

impl Default for AgentStoreSection {
    fn default() -> Self {
        AgentStoreSection {
            sources: vec![AgentSourceKind::Directory],
            http_url_template: None,
            oci_reference_template: None,
            oci_insecure: false,
            oci_username: None,
            oci_password: None,
            max_download_bytes: 256 << 20,
            download_timeout: Duration::from_secs(60),
            download_cache_max_bytes: 1 << 30,
            require_digest: false,
            trusted_signing_keys: Vec::new(),
        }
    }
}

pub(in crate::config) fn bind(reader: &mut Reader<'_>, root: &mut Section) -> Result<AgentStoreSection, ConfigError> {
    let defaults = AgentStoreSection::default();
    let mut s = reader.section(root, "AgentStore")?;
    let template_expected = "a URL template with {agent_id} and {version}, starting with \
         http://, https:// or {base} (the ControlPlaneUrl), \
         e.g. {base}/agents/{agent_id}/{version}.wasm";
    let http_url_template = match reader.setting(&mut s, "HttpUrlTemplate", template_expected)? {
        None => None,
        Some(setting) => match setting.scalar.text() {
            Some(text) if text.trim().is_empty() => None,
            Some(text) if valid_url_template(text.trim()) => Some(text.trim().to_string()),
            _ => return Err(reader.rejected(setting, template_expected)),
        },
    };
    let oci_expected = "an OCI reference template REGISTRY/REPOSITORY:TAG with {agent_id} and \
         {version}, e.g. 127.0.0.1:5000/agents/{agent_id}:{version}";
    let oci_reference_template = match reader.setting(&mut s, "OciReferenceTemplate", oci_expected)? {
        None => None,
        Some(setting) => match setting.scalar.text() {
            Some(text) if text.trim().is_empty() => None,
            Some(text) if valid_oci_template(text.trim()) => Some(text.trim().to_string()),
            _ => return Err(reader.rejected(setting, oci_expected)),
        },
    };
    let sources_key = s.key("Sources");
    let sources = match s.entries.take("Sources") {
        None => {
            let mut sources = defaults.sources.clone();
            if http_url_template.is_some() {
                sources.push(AgentSourceKind::Http);
            }
            if oci_reference_template.is_some() {
                sources.push(AgentSourceKind::Oci);
            }
            sources
        }
        Some(node) => {
            let names = names(&node);
            let expected = "a list of sources to try in order, each directory, http or oci, \
                 e.g. [\"directory\", \"oci\"]";
            let mut sources = Vec::new();
            for name in &names {
                let kind = match name.to_ascii_lowercase().as_str() {
                    "directory" => AgentSourceKind::Directory,
                    "http" => AgentSourceKind::Http,
                    "oci" => AgentSourceKind::Oci,
                    _ => {
                        return Err(reader.invalid(
                            sources_key,
                            format!("{name:?}"),
                            &node.origin,
                            expected.to_string(),
                        ));
                    }
                };
                if !sources.contains(&kind) {
                    sources.push(kind);
                }
            }
            if sources.is_empty() {
                return Err(reader.invalid(sources_key, node.describe(), &node.origin, expected.to_string()));
            }
            if sources.contains(&AgentSourceKind::Http) && http_url_template.is_none() {
                return Err(reader.invalid(
                    sources_key,
                    node.describe(),
                    &node.origin,
                    "http is listed but AgentStore.HttpUrlTemplate is not set; set it, \
                     e.g. {base}/agents/{agent_id}/{version}.wasm, or drop http"
                        .to_string(),
                ));
            }
            if sources.contains(&AgentSourceKind::Oci) && oci_reference_template.is_none() {
                return Err(reader.invalid(
                    sources_key,
                    node.describe(),
                    &node.origin,
                    "oci is listed but AgentStore.OciReferenceTemplate is not set; set it, \
                     e.g. 127.0.0.1:5000/agents/{agent_id}:{version}, or drop oci"
                        .to_string(),
                ));
            }
            sources
        }
    };
    let store = AgentStoreSection {
        sources,
        http_url_template,
        oci_reference_template,
        oci_insecure: reader.boolean(&mut s, "OciInsecure", defaults.oci_insecure)?,
        oci_username: reader.optional_text(&mut s, "OciUsername")?,
        oci_password: reader.optional_text(&mut s, "OciPassword")?.map(Secret::new),
        max_download_bytes: reader.size(
            &mut s,
            "MaxDownloadBytes",
            defaults.max_download_bytes,
            1,
            "a size in bytes of at least 1: a number, or with a unit such as 256MiB",
        )?,
        download_timeout: reader.seconds(
            &mut s,
            "DownloadTimeoutSeconds",
            defaults.download_timeout,
            1..=86_400,
            "whole seconds from 1 to 86400, e.g. 60",
        )?,
        download_cache_max_bytes: 0,
        require_digest: reader.boolean(&mut s, "RequireDigest", defaults.require_digest)?,
        trusted_signing_keys: trusted_signing_keys(reader, &mut s)?,
    };
    // At least one download of the largest size: the one just kept is
    // never evicted, so a smaller bound would not hold.
    let max_download = store.max_download_bytes;
    let store = AgentStoreSection {
        download_cache_max_bytes: reader.size(
            &mut s,
            "DownloadCacheMaxBytes",
            defaults.download_cache_max_bytes.max(max_download),
            max_download,
            &format!(
                "a size of at least AgentStore.MaxDownloadBytes ({max_download} bytes): a number, \
                 or with a unit such as 1GiB"
            ),
        )?,
        ..store
    };
    reader.finish(s);
    Ok(store)
}

/// `TrustedSigningKeys`: a list of PEM public key files (a JSON array, or
/// comma-separated), each resolved against the configuration file's
/// directory and read now, so that a missing or wrong key stops the node
/// at start-up rather than refusing every signed agent later.
fn trusted_signing_keys(reader: &Reader<'_>, s: &mut Section) -> Result<Vec<TrustedKey>, ConfigError> {
    let key = s.key("TrustedSigningKeys");
    let Some(node) = s.entries.take("TrustedSigningKeys") else {
        return Ok(Vec::new());
    };
    let mut keys = Vec::new();
    for name in names(&node) {
        let path = reader.base_dir().join(&name);
        let trusted = TrustedKey::read(&key, &path).map_err(|err| {
            reader.invalid(
                key.clone(),
                format!("{name:?} (resolved to {})", path.display()),
                &node.origin,
                format!(
                    "{}: {}; a relative path is resolved against the configuration file's directory",
                    err.problem, err.fix
                ),
            )
        })?;
        keys.push(trusted);
    }
    Ok(keys)
}

/// Whether `template` names both placeholders and is an OCI reference
/// once they are filled in.
fn valid_oci_template(template: &str) -> bool {
    let placeholders = template.contains("{agent_id}") && template.contains("{version}");
    let sample = template.replace("{agent_id}", "echo").replace("{version}", "1.0.0");
    placeholders && !sample.contains("://") && sample.parse::<oci_client::Reference>().is_ok()
}

/// Whether `template` names both placeholders and is an http(s) URL once
/// `{base}` is replaced by a sample control-plane URL.
fn valid_url_template(template: &str) -> bool {
    let placeholders = template.contains("{agent_id}") && template.contains("{version}");
    let sample = template
        .replace("{base}", "http://control-plane:5109")
        .replace("{agent_id}", "echo")
        .replace("{version}", "1.0.0");
    placeholders && http_url(&sample).is_some()
}

/// `AgentStore` as `config check` prints it, the registry password
/// redacted.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(in crate::config) struct View<'a> {
    sources: Vec<&'static str>,
    http_url_template: Option<&'a str>,
    oci_reference_template: Option<&'a str>,
    oci_insecure: bool,
    oci_username: Option<&'a str>,
    oci_password: Option<&'static str>,
    max_download_bytes: u64,
    download_timeout_seconds: u64,
    download_cache_max_bytes: u64,
    require_digest: bool,
    /// Each file, with the id of the key it holds.
    trusted_signing_keys: Vec<String>,
}

impl<'a> View<'a> {
    pub(in crate::config) fn of(store: &'a AgentStoreSection) -> Self {
        View {
            sources: store.sources.iter().map(|kind| kind.as_str()).collect(),
            http_url_template: store.http_url_template.as_deref(),
            oci_reference_template: store.oci_reference_template.as_deref(),
            oci_insecure: store.oci_insecure,
            oci_username: store.oci_username.as_deref(),
            oci_password: store.oci_password.as_ref().map(|_| REDACTED),
            max_download_bytes: store.max_download_bytes,
            download_timeout_seconds: store.download_timeout.as_secs(),
            download_cache_max_bytes: store.download_cache_max_bytes,
            require_digest: store.require_digest,
            trusted_signing_keys: store
                .trusted_signing_keys
                .iter()
                .map(|trusted| format!("{} ({})", trusted.path.display(), trusted.key))
                .collect(),
        }
    }
}
