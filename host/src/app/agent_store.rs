//! The agent store a configuration asks for: its sources in the configured
//! order, downloads kept under `DataDirectory/agents`.

use crate::agent_store::{AgentSource, AgentStore, HttpSource, HttpSourceSettings, OciSource, OciSourceSettings};
use crate::config::{AgentSourceKind, NodeConfig};
use crate::control_plane::ControlPlaneTls;

/// The store's sources, in `AgentStore.Sources` order. An HTTP source on
/// the control plane (`{base}`) is reached with the control plane's TLS,
/// client certificate included; any other with the system roots.
pub fn agent_store(config: &NodeConfig, control_plane_tls: &ControlPlaneTls) -> Result<AgentStore, reqwest::Error> {
    let store = &config.agent_store;
    let downloads = config.node_runtime.data_directory.join("agents");
    let mut sources = Vec::new();
    for kind in &store.sources {
        match kind {
            AgentSourceKind::Directory => {
                sources.push(AgentSource::Directory(config.node_runtime.agents_directory.clone()));
            }
            // The binder guarantees a template for each listed source.
            AgentSourceKind::Http => {
                let Some(template) = &store.http_url_template else {
                    continue;
                };
                let base = config.node_runtime.control_plane_url.to_string();
                let settings = HttpSourceSettings {
                    url_template: template.replace("{base}", base.trim_end_matches('/')),
                    max_bytes: store.max_download_bytes,
                    timeout: store.download_timeout,
                    cache_dir: downloads.join("http"),
                    cache_max_bytes: store.download_cache_max_bytes,
                };
                let plaintext = ControlPlaneTls::plaintext();
                let tls = if template.starts_with("{base}") {
                    control_plane_tls
                } else {
                    &plaintext
                };
                let source = HttpSource::new(settings, tls.client_config(&[b"http/1.1"]))?
                    .trusting(super::sandbox::trusted_keys(config));
                sources.push(AgentSource::Http(source));
            }
            AgentSourceKind::Oci => {
                let Some(template) = &store.oci_reference_template else {
                    continue;
                };
                let settings = OciSourceSettings {
                    reference_template: template.clone(),
                    insecure: store.oci_insecure,
                    credentials: store.oci_username.clone().map(|user| {
                        let password = store.oci_password.as_ref().map(|p| p.expose().to_string());
                        (user, password.unwrap_or_default())
                    }),
                    max_bytes: store.max_download_bytes,
                    timeout: store.download_timeout,
                    cache_dir: downloads.join("oci"),
                    cache_max_bytes: store.download_cache_max_bytes,
                };
                let source = OciSource::new(settings).trusting(super::sandbox::trusted_keys(config));
                sources.push(AgentSource::Oci(source));
            }
        }
    }
    Ok(AgentStore::with_sources(sources, store.require_digest))
}
