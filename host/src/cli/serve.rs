//! `node-runtime serve`: the node daemon, as operators run it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use super::{CommandError, Exit};
use crate::app;
use crate::telemetry::{AdminServer, LogFormat, Telemetry};

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
    // Before anything starts: a SIGTERM from here on drains the node.
    let mut signals = StopSignals::listen();
    let config = app::load_config(args.config.as_deref(), args.log_format)
        .map_err(|err| CommandError::usage(format!("invalid configuration: {err}")))?;
    let telemetry = Telemetry::init(app::telemetry_settings(&config, args.log_format))
        .map_err(|err| CommandError::usage(err.to_string()))?;
    tracing::info!("configuration: {}", config.sources);
    let node = app::start_node(&config, telemetry.metrics())?;
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
        signals.received().await;
        stop.cancel();
    });
    node.wait().await;
    if let Some(admin) = admin {
        admin.shutdown().await;
    }
    telemetry.shutdown().await;
    Ok(Exit::Completed)
}

/// SIGTERM (systemd, Kubernetes) or SIGINT (Ctrl-C), listened for from
/// the moment [`StopSignals::listen`] is called: a signal that comes
/// before it is awaited (while the node starts) is kept, not lost, and
/// does not kill the process undrained, as it did when the listening
/// began in a task that had not run yet.
pub struct StopSignals {
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl StopSignals {
    /// Starts listening. Must run inside the tokio runtime.
    pub fn listen() -> StopSignals {
        use tokio::signal::unix::{SignalKind, signal};
        let streams = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(term), Ok(int)) => Some((term, int)),
            _ => None,
        };
        StopSignals { streams }
    }

    /// The first signal since [`listen`](Self::listen).
    pub async fn received(&mut self) {
        match &mut self.streams {
            Some((term, int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                }
            }
            None => {
                tracing::warn!("cannot listen for SIGTERM; only Ctrl-C stops the node");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
