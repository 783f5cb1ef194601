//! The control-plane link a configuration asks for: `MTls` as the client's
//! TLS, `NodeRuntime` as the worker's settings.

use crate::config::{MTlsSection, NodeConfig};
use crate::control_plane::{Capacity, ControlPlaneTls, TlsError, TlsOptions};
use crate::worker::NodeSettings;

/// `MTls`, as the control-plane client takes it.
pub fn tls_options(mtls: &MTlsSection) -> TlsOptions {
    TlsOptions {
        enabled: mtls.enabled,
        client_certificate_path: mtls.client_certificate_path.clone(),
        client_key_path: mtls.client_key_path.clone(),
        server_ca_certificate_path: mtls.server_ca_certificate_path.clone(),
        expected_server_certificate_subject: mtls.expected_server_certificate_subject.clone(),
        validate_certificate_chain: mtls.validate_certificate_chain,
    }
}

/// The control-plane TLS the `MTls` section asks for, its files read and
/// checked: a missing or non-PEM file is an error naming its key.
pub fn control_plane_tls(config: &NodeConfig) -> Result<ControlPlaneTls, TlsError> {
    let url = config.node_runtime.control_plane_url.to_string();
    ControlPlaneTls::configure(url.trim_end_matches('/'), &tls_options(&config.mtls))
}

/// The worker's settings: `NodeRuntime`, with the slots of
/// [`NodeConfig::slots`].
pub fn node_settings(config: &NodeConfig) -> NodeSettings {
    let node = &config.node_runtime;
    NodeSettings {
        node_id: node.node_id.clone(),
        control_plane_url: node.control_plane_url.to_string().trim_end_matches('/').to_string(),
        slots: config.slots(),
        max_leases: node.max_concurrent_leases,
        heartbeat_interval: node.heartbeat_interval,
        capacity: Capacity {
            slots: node.capacity.slots,
            cpu: node.capacity.cpu.clone(),
            memory: node.capacity.memory.clone(),
        },
        metadata: node.metadata.clone(),
        drain_timeout: node.drain_timeout,
    }
}
