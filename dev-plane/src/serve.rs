//! Serving connections: HTTP/1.1 and HTTP/2 on one port, told apart per
//! connection (as `axum::serve` does), with the time limit it lacks.
//!
//! `axum::serve` sets no timer, so a client that sent half a request, or
//! nothing at all, held its connection (and a task) until it hung up. Here
//! a connection whose first request has not arrived within the header-read
//! timeout is dropped, and so is an HTTP/1.1 request whose headers are not
//! complete within it (hyper's own check, which also closes a keep-alive
//! connection idle that long). A gRPC stream, once its request arrived,
//! may stay open as long as it likes: an idle Pull sends nothing for
//! minutes.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::connect_info::ConnectInfo;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::codegen::Service;

use super::wait_for_shutdown;

/// Serves `app` on every connection `listener` accepts until shutdown,
/// then lets open connections finish (the caller bounds how long). Each
/// request carries its connection's `ConnectInfo<L::Addr>`.
pub async fn serve<L>(mut listener: L, app: Router, header_read_timeout: Duration, mut shutdown: watch::Receiver<bool>)
where
    L: Listener,
    L::Addr: Clone + Debug + Send + Sync + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        let (io, addr) = tokio::select! {
            () = wait_for_shutdown(&mut shutdown) => break,
            accepted = listener.accept() => accepted,
            // Reap finished connections as they end.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        connections.spawn(connection(io, addr, app.clone(), header_read_timeout, shutdown.clone()));
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

async fn connection<I, A>(
    io: I,
    addr: A,
    app: Router,
    header_read_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    A: Clone + Debug + Send + Sync + 'static,
{
    let requested = Arc::new(AtomicBool::new(false));
    let service = {
        let (requested, addr) = (Arc::clone(&requested), addr.clone());
        hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            requested.store(true, Ordering::Relaxed);
            request.extensions_mut().insert(ConnectInfo(addr.clone()));
            let mut app = app.clone();
            async move { app.call(request.map(axum::body::Body::new)).await }
        })
    };
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let first_request = tokio::time::sleep(header_read_timeout);
    tokio::pin!(first_request);
    let mut stopping = false;
    // Whether the first request's timer is still to be heeded. `select!`
    // reads a branch's condition only when it is entered, so the timer
    // checks `requested` itself when it fires.
    let mut waiting_for_a_request = true;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(peer = ?addr, %err, "dev control plane connection ended with an error");
                }
                return;
            }
            () = &mut first_request, if waiting_for_a_request => {
                if requested.load(Ordering::Relaxed) {
                    waiting_for_a_request = false;
                    continue;
                }
                tracing::warn!(
                    peer = ?addr,
                    "dev control plane dropped a connection: no complete request within {header_read_timeout:?}"
                );
                return;
            }
            () = wait_for_shutdown(&mut shutdown), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}
