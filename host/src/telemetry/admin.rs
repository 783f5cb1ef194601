//! The admin endpoint (`NodeRuntime.AdminListen`, `--admin-listen`): what
//! Kubernetes probes and Prometheus scrape.
//!
//! - `GET /healthz`: 200 while the process serves HTTP at all (liveness).
//! - `GET /readyz`: 200 when the node is registered, its lease stream is
//!   connected, its heartbeats are answered and its outbox records and is
//!   below its bound; otherwise 503 naming each condition that fails
//!   (readiness).
//! - `GET /metrics`: the node's metrics in the Prometheus text format.
//!
//! It serves plain HTTP on the address given: bind it to loopback or a pod
//! IP, not to the internet. It shares nothing with the control-plane
//! links, so a busy or broken control plane cannot stall the probes.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use super::NodeMetrics;

/// Why a node is or is not ready, as `/readyz` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readiness {
    /// The control plane accepted the registration.
    pub registered: bool,
    /// The lease stream is open, or a Pull is outstanding on a connection
    /// that has not failed.
    pub lease_stream_connected: bool,
    /// The last heartbeat was answered.
    pub heartbeat_answered: bool,
    /// Reports in the outbox, and the bound past which the oldest are
    /// dropped. `None`: the outbox cannot be read (see `outbox_fault`).
    pub outbox_depth: Option<u64>,
    pub outbox_bound: u64,
    /// The node is stopping (draining): no longer ready for new work.
    pub draining: bool,
    /// Why the outbox cannot record, when it cannot: the node then takes
    /// no leases.
    pub outbox_fault: Option<String>,
}

impl Readiness {
    /// The conditions that fail, in words; empty when ready.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.draining {
            problems.push("the node is draining".to_string());
        }
        if !self.registered {
            problems.push("not registered with the control plane".to_string());
        }
        if !self.heartbeat_answered {
            problems.push("the last heartbeat got no answer".to_string());
        }
        if !self.lease_stream_connected {
            problems.push("the lease stream is not connected".to_string());
        }
        if let Some(fault) = &self.outbox_fault {
            problems.push(format!(
                "the outbox cannot record ({fault}); no leases are taken until it can"
            ));
        }
        match self.outbox_depth {
            // A node that cannot read its outbox should not take more work.
            None => problems.push(
                "the outbox cannot be read (the node's log says why: look for \"cannot read \
                 the outbox's backlog\"; check the disk under NodeRuntime.DataDirectory)"
                    .to_string(),
            ),
            Some(depth) if depth >= self.outbox_bound => problems.push(format!(
                "the outbox holds {depth} reports, at its bound of {}",
                self.outbox_bound
            )),
            Some(_) => {}
        }
        problems
    }
}

/// Implemented by the worker.
pub trait ReadinessProbe: Send + Sync {
    fn readiness(&self) -> Readiness;
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "cannot listen on {addr} for the admin endpoint: {source}; \
         choose a free address with --admin-listen or NodeRuntime.AdminListen"
    )]
    Bind { addr: SocketAddr, source: std::io::Error },
}

#[derive(Clone)]
struct AdminState {
    probe: Arc<dyn ReadinessProbe>,
    metrics: Arc<NodeMetrics>,
}

/// A running admin endpoint.
pub struct AdminServer {
    addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl AdminServer {
    /// Binds `addr` and serves until [`AdminServer::shutdown`].
    pub async fn start(
        addr: SocketAddr,
        probe: Arc<dyn ReadinessProbe>,
        metrics: Arc<NodeMetrics>,
    ) -> Result<AdminServer, AdminError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AdminError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| AdminError::Bind { addr, source })?;
        let app = Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics_text))
            .with_state(AdminState { probe, metrics });
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
            if let Err(err) = served {
                tracing::error!(error = %err, "the admin endpoint stopped");
            }
        });
        tracing::info!(%addr, "admin endpoint listening (/healthz, /readyz, /metrics)");
        Ok(AdminServer { addr, stop, task })
    }

    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let probe = state.probe.clone();
    // The probe may read the outbox (a disk read): off the async threads.
    let readiness = match tokio::task::spawn_blocking(move || probe.readiness()).await {
        Ok(readiness) => readiness,
        Err(err) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("readiness check failed: {err}\n"),
            )
                .into_response();
        }
    };
    let problems = readiness.problems();
    if problems.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let mut body = String::from("not ready:\n");
        for problem in problems {
            body.push_str("- ");
            body.push_str(&problem);
            body.push('\n');
        }
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn metrics_text(State(state): State<AdminState>) -> Response {
    let metrics = state.metrics.clone();
    match tokio::task::spawn_blocking(move || metrics.prometheus_text()).await {
        Ok(Ok(text)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            text,
        )
            .into_response(),
        Ok(Err(err)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")).into_response(),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("collecting metrics failed: {err}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_every_failing_condition() {
        let ready = Readiness {
            registered: true,
            lease_stream_connected: true,
            heartbeat_answered: true,
            outbox_depth: Some(3),
            outbox_bound: 100,
            draining: false,
            outbox_fault: None,
        };
        assert!(ready.problems().is_empty());
        let unready = Readiness {
            heartbeat_answered: false,
            outbox_depth: Some(100),
            outbox_fault: Some("No space left on device".to_string()),
            ..ready.clone()
        };
        let problems = unready.problems().join("; ");
        assert!(
            problems.contains("heartbeat")
                && problems.contains("outbox holds 100")
                && problems.contains("outbox cannot record (No space left on device)"),
            "{problems}"
        );
        // Unreadable: said so, with no made-up count.
        let unreadable = Readiness {
            outbox_depth: None,
            ..ready
        };
        let problems = unreadable.problems().join("; ");
        assert!(problems.contains("the outbox cannot be read"), "{problems}");
        assert!(!problems.contains("holds"), "{problems}");
    }
}
