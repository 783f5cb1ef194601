//! `node-runtime serve`: the node daemon, as operators run it.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use super::{CommandError, Exit};
use crate::config::NodeConfig;
use crate::control_plane::{Capacity, ControlPlaneTls, TlsOptions};
use crate::outbox::Outbox;
use crate::sandbox::Sandbox;
use crate::worker::{NodeHandle, NodeSettings};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The configuration: the reference node's appsettings.json, plus this
    /// node's keys. Environment variables override it (`NodeRuntime__NodeId=node-7`).
    /// Without it, the defaults and the environment alone.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

pub async fn run(args: ServeArgs) -> Result<Exit, CommandError> {
    let config = match &args.config {
        Some(path) => NodeConfig::load(path, crate::config::process_env()),
        None => NodeConfig::from_json_str("{}", &std::env::current_dir().unwrap_or_default(), crate::config::process_env()),
    }
    .map_err(|err| CommandError::usage(format!("invalid configuration: {err}")))?;
    let tls = control_plane_tls(&config)?;
    let sandbox = Sandbox::new(config.sandbox_config())
        .map_err(|err| CommandError::internal(err.to_string()))?;
    tracing::info!(allocator = ?sandbox.allocator(), "sandbox ready");
    let store = config
        .agent_store(&tls)
        .map_err(|err| CommandError::internal(format!("cannot build the agent store's HTTP client: {err}")))?;
    let outbox = Outbox::open(&config.node_runtime.data_directory)
        .map_err(|err| CommandError::usage(format!("cannot open the outbox: {err}")))?;
    tracing::info!(path = %outbox.path().display(), "outbox open");
    let node = NodeHandle::start_with_tls(settings(&config), tls, Arc::new(sandbox), Arc::new(store), outbox)
        .map_err(|err| CommandError::usage(err.to_string()))?;
    let stop = node.stop_token();
    tokio::spawn(async move {
        stop_signal().await;
        stop.cancel();
    });
    node.wait().await;
    Ok(Exit::Completed)
}

/// The control-plane TLS the `MTls` section asks for, its files read and
/// checked: a missing or non-PEM file stops start-up naming its key.
pub fn control_plane_tls(config: &NodeConfig) -> Result<ControlPlaneTls, CommandError> {
    let mtls = &config.mtls;
    let options = TlsOptions {
        enabled: mtls.enabled,
        client_certificate_path: mtls.client_certificate_path.clone(),
        client_key_path: mtls.client_key_path.clone(),
        server_ca_certificate_path: mtls.server_ca_certificate_path.clone(),
        expected_server_certificate_subject: mtls.expected_server_certificate_subject.clone(),
        validate_certificate_chain: mtls.validate_certificate_chain,
    };
    let url = config.node_runtime.control_plane_url.to_string();
    ControlPlaneTls::configure(url.trim_end_matches('/'), &options)
        .map_err(|err| CommandError::usage(format!("invalid configuration: {err}")))
}

/// The worker's settings from the configuration.
pub fn settings(config: &NodeConfig) -> NodeSettings {
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

/// SIGTERM (systemd, Kubernetes) or SIGINT (Ctrl-C).
pub async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            tracing::warn!("cannot listen for SIGTERM; only Ctrl-C stops the node");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
