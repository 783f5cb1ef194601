//! A control plane for development and tests: the reference control
//! plane's node-facing contract (REST registration and heartbeat, gRPC
//! `lease.LeaseService`), plus a way to submit runs and see what became of
//! them.
//!
//! One port serves both, like the reference: HTTP/1.1 for REST and HTTP/2
//! cleartext (prior knowledge) for gRPC, told apart per connection by
//! hyper's auto builder (`serve`); with [`PlaneTls`], the same
//! over TLS (ALPN `h2` or `http/1.1`), client certificates required.
//!
//! - [`state`]: nodes, runs and the leasing rules (pure logic).
//! - [`agents`]: the reference's declarative agents and their versions,
//!   with its spec validation (pure logic); `definitions`: agent files
//!   loaded at start-up.
//! - `ledger`: the state behind a lock, saved on every change (a change
//!   that cannot be saved is undone).
//! - `store`: the runs and agents database in the data dir, written per
//!   change.
//! - `access`: who may use the plane: the Host check, JSON-only POSTs,
//!   node ids bound to client certificates.
//! - `rest` (with `agent_api`), `grpc`: the two front ends; `serve`: the connections they
//!   are served on, with a header-read timeout.
//! - [`tls`]: HTTPS and gRPC over TLS, with required client certificates;
//!   [`tls_dir`]: the certificate files of `dev --tls-dir`.

mod access;
mod agent_api;
pub mod agents;
mod definitions;
mod grpc;
mod ledger;
mod rest;
mod serve;
pub mod state;
mod store;
pub mod stubs;
pub mod tls;
pub mod tls_dir;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use access::AllowedHost;
pub use agents::{Agent, AgentVersion};
pub use definitions::DefinitionError;
use proto::lease_service_server::LeaseServiceServer;
pub use state::{
    Budgets, Capacity, Costs, ErrorInfo, NewRun, Node, NodeStatus, Reregistration, Run, RunCounts, RunStatus,
    SandboxReadings, Timings,
};
pub use store::{LoadError, SaveError};
pub use tls::PlaneTls;

use access::{Access, HostRule};
use agents::AgentBook;
use ledger::Ledger;
use state::PlaneState;
use store::Store;

/// How long a client may take to send a request's headers.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `shutdown` waits for open connections to finish before it
/// drops them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct PlaneOptions {
    /// Where to listen; port 0 picks a free port (see [`DevPlane::url`]).
    pub listen: SocketAddr,
    /// Where runs are saved; `None` keeps them in memory only.
    pub data_dir: Option<PathBuf>,
    /// How long a node holds a lease before the run is re-queued.
    pub lease_ttl: Duration,
    /// How long an idle Pull stream waits before polling again (it wakes
    /// earlier when a run is submitted or re-queued).
    pub idle_poll: Duration,
    /// Serve HTTPS and gRPC over TLS instead of cleartext.
    pub tls: Option<PlaneTls>,
    /// Host names (or addresses) requests may name besides the listen
    /// address's own (see `access`).
    pub allowed_hosts: Vec<AllowedHost>,
    /// How a registration for a node id the plane knows is answered.
    pub reregistration: Reregistration,
    /// How long a connection may take to send a complete request's
    /// headers (the first request's, and each HTTP/1.1 request's after
    /// it); slower connections are dropped.
    pub header_read_timeout: Duration,
    /// A directory of agent definitions (`*.json`, the reference's
    /// format) to publish at start-up (see `definitions`).
    pub definitions: Option<PathBuf>,
}

impl Default for PlaneOptions {
    /// The reference's defaults: port 5109, 300 s leases, 2 s idle polls.
    fn default() -> PlaneOptions {
        PlaneOptions {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 5109)),
            data_dir: None,
            lease_ttl: Duration::from_secs(300),
            idle_poll: Duration::from_secs(2),
            tls: None,
            allowed_hosts: Vec::new(),
            reregistration: Reregistration::Replace,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            definitions: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    #[error("cannot listen on {addr}: address in use; pass --listen {}:0 or stop the other process", addr.ip())]
    AddressInUse { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Save(#[from] SaveError),
    #[error("{0}")]
    InvalidRun(String),
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Definitions(#[from] DefinitionError),
}

/// A running plane. Dropping it stops the server as `shutdown` does, but
/// without waiting; call `shutdown` to wait for open requests and free the data dir.
pub struct DevPlane {
    addr: SocketAddr,
    ledger: Arc<Ledger>,
    shutdown: watch::Sender<bool>,
    tls: bool,
    client_subjects: Arc<tls::ClientSubjects>,
    server: Option<JoinHandle<()>>,
    /// The TLS accept loop, which owns the listening socket (without TLS,
    /// `server` owns it).
    accept_loop: Option<JoinHandle<()>>,
    expiry: Option<JoinHandle<()>>,
    calls_streams: Arc<grpc::CallsStreamCounts>,
}

impl DevPlane {
    /// Binds, loads the saved runs, and starts serving and expiring leases.
    pub async fn start(options: PlaneOptions) -> Result<DevPlane, PlaneError> {
        // Definition files are read first: a bad one stops the plane
        // before anything is opened.
        let definitions = match &options.definitions {
            Some(dir) => definitions::read_dir(dir)?,
            None => Vec::new(),
        };
        let (state, book, store) = match &options.data_dir {
            Some(dir) => {
                let (store, runs, saved) = Store::open(dir)?;
                let book = AgentBook::from_saved(saved.agents, saved.versions);
                (PlaneState::from_runs(runs), book, Some(store))
            }
            None => (PlaneState::new(), AgentBook::default(), None),
        };
        let state = state.with_reregistration(options.reregistration);
        let listener = tokio::net::TcpListener::bind(options.listen).await.map_err(|source| {
            if source.kind() == std::io::ErrorKind::AddrInUse {
                PlaneError::AddressInUse { addr: options.listen }
            } else {
                PlaneError::Listen {
                    addr: options.listen,
                    source,
                }
            }
        })?;
        let addr = listener.local_addr().map_err(|source| PlaneError::Listen {
            addr: options.listen,
            source,
        })?;

        let ledger = Arc::new(Ledger::new(state, book, store, options.lease_ttl));
        publish(&ledger, &definitions).await?;
        let (shutdown, shutdown_rx) = watch::channel(false);

        let desk = grpc::LeaseDesk::new(Arc::clone(&ledger), shutdown_rx.clone(), options.idle_poll);
        let calls_streams = desk.calls_stream_counts();
        // The generated server is routed like tonic's own `Routes` does,
        // but without its gRPC "unimplemented" fallback, so an unknown REST
        // path still gets a plain 404.
        let client_certificates = options.tls.as_ref().is_some_and(|tls| tls.client_ca.is_some());
        let rules = Arc::new(Access {
            // A browser has no client certificate to present: with them
            // required, the Host check adds nothing.
            hosts: (!client_certificates)
                .then(|| HostRule::new(addr, options.tls.is_some(), options.allowed_hosts.clone())),
            bind_node_ids: client_certificates && options.tls.as_ref().is_some_and(|tls| tls.bind_node_ids),
        });
        let app = rest::router(Arc::clone(&ledger))
            .route_service("/lease.LeaseService/{*method}", LeaseServiceServer::new(desk))
            .layer(axum::middleware::from_fn_with_state(rules, access::guard));
        let client_subjects = Arc::new(tls::ClientSubjects::default());
        let header_read_timeout = options.header_read_timeout;
        let mut accept_loop = None;
        let server = match &options.tls {
            None => {
                // Without TCP_NODELAY a lease written while the previous
                // one is unacknowledged waits for the node's delayed ACK
                // (tens of milliseconds on loopback). The TLS listener
                // sets it too.
                let listener = listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                tokio::spawn(serve::serve(listener, app, header_read_timeout, shutdown_rx.clone()))
            }
            Some(plane_tls) => {
                let config = plane_tls.server_config().map_err(PlaneError::Tls)?;
                // Each request learns its connection's client certificate
                // (`ConnectInfo<Peer>`).
                let (listener, accepting) =
                    tls::TlsListener::start(listener, config, Arc::clone(&client_subjects), shutdown_rx.clone())
                        .map_err(|source| PlaneError::Listen { addr, source })?;
                accept_loop = Some(accepting);
                tokio::spawn(serve::serve(listener, app, header_read_timeout, shutdown_rx.clone()))
            }
        };
        let expiry = tokio::spawn(expire_leases(Arc::clone(&ledger), options.lease_ttl, shutdown_rx));
        tracing::info!(%addr, data_dir = ?options.data_dir, tls = ?options.tls, "dev control plane listening");
        Ok(DevPlane {
            addr,
            ledger,
            shutdown,
            tls: options.tls.is_some(),
            client_subjects,
            server: Some(server),
            accept_loop,
            expiry: Some(expiry),
            calls_streams,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL nodes use, e.g. `http://127.0.0.1:5109` (`https://`
    /// with TLS). A wildcard listen address is reached through loopback.
    pub fn url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// The CN of each client certificate the plane accepted, one entry per
    /// TLS connection, oldest first (the newest 10,000).
    pub fn client_subjects(&self) -> Vec<String> {
        self.client_subjects.all()
    }

    /// Calls streams nodes opened, and the calls answered on them.
    pub fn calls_on_streams(&self) -> (u64, u64) {
        self.calls_streams.read()
    }

    /// Submits a run, as `POST /v1/runs` does.
    pub async fn submit(&self, run: NewRun) -> Result<Run, PlaneError> {
        match self.ledger.write(|state, now| state.submit(run, now)).await? {
            Ok(run) => Ok(run),
            Err(invalid) => Err(PlaneError::InvalidRun(invalid.to_string())),
        }
    }

    /// Every run, in submission order.
    pub fn runs(&self) -> Vec<Run> {
        self.ledger.read(|state| state.runs().to_vec())
    }

    pub fn run(&self, run_id: &str) -> Option<Run> {
        self.ledger.read(|state| state.run(run_id).cloned())
    }

    /// Runs that reached a final status since position `from` of the order
    /// they reached it in, and the position to ask from next time: for
    /// watching many runs end without cloning every run.
    pub fn finished_since(&self, from: usize) -> (Vec<(String, RunStatus)>, usize) {
        self.ledger.read(|state| state.finished_since(from))
    }

    /// Makes every write to the data dir's database fail, as a full or
    /// failing disk would, until called with `false`: for testing what a
    /// plane (and a node) does then. Without a data dir, nothing changes.
    pub fn fail_disk_writes(&self, failing: bool) {
        self.ledger.fail_disk_writes(failing);
    }

    /// Every agent of the agent API, ordered by id.
    pub fn agents(&self) -> Vec<Agent> {
        self.ledger.read_agents(AgentBook::agents)
    }

    /// One version of an agent, as `GET /v1/agents/{agentId}/versions/{version}` shows it.
    pub fn agent_version(&self, agent_id: &str, version: &str) -> Option<AgentVersion> {
        self.ledger.read_agents(|book| book.version(agent_id, version).cloned())
    }

    /// Every registered node, ordered by id.
    pub fn nodes(&self) -> Vec<Node> {
        self.ledger.read(|state| state.nodes().cloned().collect())
    }

    /// Stops accepting connections, ends every Pull stream (with OK, as a
    /// clean end of stream), waits up to a few seconds for open requests,
    /// and closes the runs database.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(mut server) = self.server.take() {
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(Ok(())) => {}
                Ok(Err(join)) => tracing::warn!(%join, "dev control plane server panicked"),
                Err(_) => {
                    tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; dropping them");
                    server.abort();
                    // Aborted is not yet dropped: wait for the listener to close.
                    let _ = server.await;
                }
            }
        }
        // The port is free once the task holding the socket has ended: a
        // plane started on it next does not find it in use.
        if let Some(accept_loop) = self.accept_loop.take() {
            let _ = accept_loop.await;
        }
        if let Some(expiry) = self.expiry.take() {
            let _ = expiry.await;
        }
        // Every change was saved as it happened; what is left is to free
        // the data dir for the next plane.
        self.ledger.close().await;
    }
}

impl Drop for DevPlane {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.ledger.close_now();
    }
}

/// Publishes the definition files' agents and versions that the plane
/// does not hold yet (saved like any other change).
async fn publish(ledger: &Arc<Ledger>, definitions: &[definitions::Definition]) -> Result<(), PlaneError> {
    for definition in definitions {
        let now = state::iso8601(std::time::SystemTime::now());
        let changes = ledger.read_agents(|book| definitions::changes(book, definition, &now))?;
        for change in changes {
            ledger
                .change_agents(|_, _| Ok::<_, std::convert::Infallible>(change))
                .await?
                .unwrap_or_else(|never| match never {});
        }
        tracing::info!(
            agent_id = %definition.agent.agent_id,
            version = %definition.version,
            file = %definition.path.display(),
            "agent definition published"
        );
    }
    Ok(())
}

/// Resolves once shutdown is requested (or the `DevPlane` is gone).
async fn wait_for_shutdown(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender was dropped: as good as a shutdown.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Re-queues runs whose leases expired, about every second (faster for
/// short test TTLs). Leasing calls also expire leases themselves; this
/// pass makes a lapsed run show as pending and wakes idle pullers even
/// when no node is calling.
async fn expire_leases(ledger: Arc<Ledger>, lease_ttl: Duration, mut shutdown: watch::Receiver<bool>) {
    let tick = (lease_ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            () = wait_for_shutdown(&mut shutdown) => return,
        }
        match ledger.write(|state, now| state.expire_leases(now)).await {
            Ok(0) => {}
            Ok(requeued) => tracing::info!(requeued, "leases expired; runs re-queued"),
            Err(err) => tracing::warn!(%err, "cannot save re-queued runs"),
        }
    }
}
