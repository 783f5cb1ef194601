//! `node-runtime serve`: the node daemon, as operators run it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use super::{CommandError, Exit};
use crate::config::NodeConfig;
use crate::control_plane::{Capacity, ControlPlaneTls, TlsOptions};
use crate::outbox::Outbox;
use crate::sandbox::Sandbox;
use crate::telemetry::{AdminServer, LogFormat, OtlpSettings, ResourceIdentity, Telemetry, TelemetrySettings};
use crate::worker::{NodeHandle, NodeSettings};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The configuration: the reference node's appsettings.json, plus this
    /// node's keys. Environment variables override it (`NodeRuntime__NodeId=node-7`).
    /// Without it, the defaults and the environment alone.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Serve /healthz, /readyz and /metrics on this address (e.g.
    /// 127.0.0.1:9090); overrides NodeRuntime.AdminListen.
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,

    /// How log lines are written to stderr.
    #[arg(long, value_enum, value_name = "FORMAT", default_value = "human")]
    pub log_format: LogFormat,
}

pub async fn run(args: ServeArgs) -> Result<Exit, CommandError> {
    // Loading may warn (ignored keys); the configured logger comes after.
    let config = tracing::subscriber::with_default(loading_logger(), || match &args.config {
        Some(path) => NodeConfig::load(path, crate::config::process_env()),
        None => NodeConfig::from_json_str(
            "{}",
            &std::env::current_dir().unwrap_or_default(),
            crate::config::process_env(),
        ),
    })
    .map_err(|err| CommandError::usage(format!("invalid configuration: {err}")))?;
    let telemetry = Telemetry::init(telemetry_settings(&config, args.log_format))
        .map_err(|err| CommandError::usage(err.to_string()))?;
    tracing::info!("configuration: {}", config.sources);
    let tls = control_plane_tls(&config)?;
    let sandbox = Sandbox::new(config.sandbox_config()).map_err(|err| CommandError::internal(err.to_string()))?;
    let (architecture, _) = sandbox.target();
    tracing::info!(
        allocator = ?sandbox.allocator(),
        engine = %sandbox.execution(),
        architecture,
        "sandbox ready"
    );
    let store = config
        .agent_store(&tls)
        .map_err(|err| CommandError::internal(format!("cannot build the agent store's HTTP client: {err}")))?;
    let outbox = Outbox::open(&config.node_runtime.data_directory)
        .map_err(|err| CommandError::usage(format!("cannot open the outbox: {err}")))?;
    tracing::info!(path = %outbox.path().display(), "outbox open");
    let node = NodeHandle::start_with(
        settings(&config),
        tls,
        Arc::new(sandbox),
        Arc::new(store),
        outbox,
        telemetry.metrics(),
    )
    .map_err(|err| CommandError::usage(err.to_string()))?;
    let admin = match args.admin_listen.or(config.node_runtime.admin_listen) {
        Some(addr) => match AdminServer::start(addr, node.readiness_probe(), node.metrics()).await {
            Ok(admin) => Some(admin),
            Err(err) => {
                node.shutdown().await;
                telemetry.shutdown().await;
                return Err(CommandError::usage(err.to_string()));
            }
        },
        None => None,
    };
    let stop = node.stop_token();
    tokio::spawn(async move {
        stop_signal().await;
        stop.cancel();
    });
    node.wait().await;
    if let Some(admin) = admin {
        admin.shutdown().await;
    }
    telemetry.shutdown().await;
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

/// A stderr logger for the moments before the configured one exists.
pub(crate) fn loading_logger() -> impl tracing::Subscriber + Send + Sync {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .finish()
}

/// Logging and OpenTelemetry from the configuration's `Logging` and
/// `OpenTelemetry` sections.
pub fn telemetry_settings(config: &NodeConfig, log_format: LogFormat) -> TelemetrySettings {
    let otel = &config.open_telemetry;
    let metadata = &config.node_runtime.metadata;
    let find = |key: &str| {
        metadata
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(key))
            .map(|(_, value)| value.clone())
    };
    TelemetrySettings {
        log_format,
        log_filter: config.log_filter(),
        console_spans: otel.console_exporter_enabled,
        otlp: otel.otlp_exporter.endpoint.as_ref().map(|endpoint| OtlpSettings {
            endpoint: endpoint.to_string(),
            protocol: otel.otlp_exporter.protocol,
            service_name: otel.service_name.clone(),
            service_version: otel.service_version.clone(),
            traces: otel.traces.enabled,
            sampling_ratio: otel.traces.sampling_ratio,
            metrics_interval: otel.metrics.enabled.then_some(otel.metrics.export_interval),
            logs: true,
        }),
        resource: ResourceIdentity {
            node_id: config.node_runtime.node_id.clone(),
            region: find("Region"),
            environment: find("Environment"),
        },
    }
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
