//! The worker: a node's whole life, from registration to drain.
//!
//! Five tasks share one [`Node`]:
//! - `heartbeat`: registers (retrying until accepted), heartbeats every
//!   interval, re-registers when the control plane forgot the node;
//! - `pull`: keeps the lease stream open and hands each new lease to the
//!   queue (a lease id seen before is not run again);
//! - `dispatch`: takes leases from the bounded queue as slots free up and
//!   runs them in the sandbox;
//! - `report`: delivers exactly one Complete or Fail per accepted lease,
//!   retrying until the control plane answers;
//! - `recover` (in `report`): at start, drops expired outbox entries and,
//!   once registered, delivers the reports an earlier run left behind;
//!   then prunes expired accepted lease ids every minute.
//!
//! Data flows one way: lease -> queue -> sandbox -> outbox -> control
//! plane. The [`Outbox`] (redb, on disk) records each accepted lease id
//! before the lease is queued, and each report before its first send; a
//! report leaves it only once the control plane answered. On start, after
//! registration, whatever it still holds is delivered. Shutdown is two
//! tokens passed down: `stop` (no new leases; drain) and `abort` (the drain
//! timeout passed: hand back what still runs).

mod dispatch;
mod heartbeat;
pub mod lease;
mod pull;
mod report;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::sync::lock;

use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent_store::AgentStore;
use crate::control_plane::{
    self, Capacity, ControlPlaneTls, LeaseClient, LeaseClientError, RestClient, TlsError, TlsOptions,
};
use crate::outbox::{self, Outbox};
use crate::sandbox::Sandbox;
use crate::telemetry::{NodeCounts, NodeMetrics, NodeObserver, OutboxBacklog, Readiness, ReadinessProbe};

/// What the worker needs to know, taken from the configuration.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub node_id: String,
    /// `ControlPlaneUrl`: REST and gRPC share it.
    pub control_plane_url: String,
    /// Runs at once: `min(MaxConcurrentLeases, Capacity.Slots)`.
    pub slots: u32,
    /// `Pull.max_leases`: `MaxConcurrentLeases`.
    pub max_leases: u32,
    pub heartbeat_interval: Duration,
    pub capacity: Capacity,
    pub metadata: BTreeMap<String, String>,
    /// How long running leases may take to finish after a stop signal.
    pub drain_timeout: Duration,
}

/// Counters the tests and the operator read.
#[derive(Debug, Default)]
pub struct NodeStats {
    pub leases_received: AtomicU64,
    pub duplicate_leases: AtomicU64,
    pub runs_started: AtomicU64,
    pub reports_delivered: AtomicU64,
    pub active_runs: AtomicU32,
    /// The most runs ever active at once: never above the slots.
    pub max_active_runs: AtomicU32,
    pub registrations: AtomicU64,
    /// Reports dropped from the outbox because their lease's deadline plus
    /// the grace period had passed (the control plane re-leased the run).
    pub reports_expired: AtomicU64,
    /// Reports dropped because the outbox was full (the oldest goes).
    pub reports_overflowed: AtomicU64,
    /// Reports dropped because the control plane refused them for their
    /// size, shrunk included.
    pub reports_refused_for_size: AtomicU64,
    /// Outbox reads or writes that failed (the report is still sent, but
    /// would not survive a crash).
    pub outbox_errors: AtomicU64,
    /// Reports found in the outbox at start and delivered from it.
    pub reports_recovered: AtomicU64,
    /// Acks the control plane accepted.
    pub leases_acknowledged: AtomicU64,
    /// Lease streams that could not be opened, or broke.
    pub lease_stream_errors: AtomicU64,
    /// Lease streams opened after the first.
    pub lease_stream_reconnects: AtomicU64,
    /// Heartbeats that failed (no answer, or an error status).
    pub heartbeat_failures: AtomicU64,
    /// Whether the last heartbeat was answered.
    pub heartbeat_answered: AtomicBool,
    /// Whether a lease stream is open or being opened, on a connection
    /// that has not failed.
    pub lease_stream_connected: AtomicBool,
}

impl NodeStats {
    fn run_started(&self) {
        self.runs_started.fetch_add(1, Ordering::Relaxed);
        let now = self.active_runs.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_active_runs.fetch_max(now, Ordering::SeqCst);
    }

    fn run_ended(&self) {
        self.active_runs.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Lease ids this node accepted, the newest few thousand: the control
/// plane may redeliver one (after a reconnect), and a lease must not run
/// twice.
struct SeenLeases {
    ids: HashSet<String>,
    order: VecDeque<String>,
}

const SEEN_LEASES_KEPT: usize = 10_000;

impl SeenLeases {
    /// False when the id was seen already.
    fn insert(&mut self, lease_id: &str) -> bool {
        if self.ids.contains(lease_id) {
            return false;
        }
        if self.order.len() == SEEN_LEASES_KEPT
            && let Some(oldest) = self.order.pop_front()
        {
            self.ids.remove(&oldest);
        }
        self.ids.insert(lease_id.to_string());
        self.order.push_back(lease_id.to_string());
        true
    }
}

/// State shared by the worker's tasks.
pub(crate) struct Node {
    settings: NodeSettings,
    sandbox: Arc<Sandbox>,
    store: Arc<AgentStore>,
    rest: RestClient,
    leases: LeaseClient,
    slots: Arc<Semaphore>,
    stats: Arc<NodeStats>,
    seen: Mutex<SeenLeases>,
    outbox: Outbox,
    /// Lease ids whose report a task is delivering right now.
    delivering: Mutex<HashSet<String>>,
    /// True once the control plane accepted the registration.
    registered: watch::Sender<bool>,
    /// Asks the heartbeat task for a heartbeat now (the lease stream ended
    /// at once: the plane may have forgotten this node).
    heartbeat_now: Notify,
    stop: CancellationToken,
    abort: CancellationToken,
    /// Cancelled when undelivered reports must be abandoned, at exit.
    give_up: CancellationToken,
    reports: TaskTracker,
    metrics: Arc<NodeMetrics>,
    /// The outbox's depth and oldest age, read at most once a second.
    backlog: Mutex<Option<(std::time::Instant, OutboxBacklog)>>,
}

impl Node {
    fn available_slots(&self) -> u32 {
        u32::try_from(self.slots.available_permits()).unwrap_or(u32::MAX)
    }

    /// What the heartbeat reports: 0 once draining.
    fn reported_available_slots(&self) -> u32 {
        if self.stop.is_cancelled() {
            0
        } else {
            self.available_slots()
        }
    }

    fn backlog(&self) -> Option<OutboxBacklog> {
        let mut cached = lock(&self.backlog);
        if let Some((read, backlog)) = *cached
            && read.elapsed() < Duration::from_secs(1)
        {
            return Some(backlog);
        }
        let (depth, oldest) = match self.outbox.backlog() {
            Ok(backlog) => backlog,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the outbox's backlog for the metrics");
                return None;
            }
        };
        let oldest_age = oldest.map_or(Duration::ZERO, |written| {
            Duration::from_millis(u64::try_from(outbox::now_unix_ms() - written).unwrap_or(0))
        });
        let backlog = OutboxBacklog { depth, oldest_age };
        *cached = Some((std::time::Instant::now(), backlog));
        Some(backlog)
    }
}

impl NodeObserver for Node {
    fn counts(&self) -> NodeCounts {
        let stats = &self.stats;
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let (compile_cache_hits, compile_cache_misses) = self.sandbox.compile_cache_stats();
        NodeCounts {
            leases_received: read(&stats.leases_received),
            leases_acknowledged: read(&stats.leases_acknowledged),
            runs_started: read(&stats.runs_started),
            lease_stream_errors: read(&stats.lease_stream_errors),
            lease_stream_reconnects: read(&stats.lease_stream_reconnects),
            heartbeat_failures: read(&stats.heartbeat_failures),
            reports_delivered: read(&stats.reports_delivered),
            reports_dropped: read(&stats.reports_expired)
                + read(&stats.reports_overflowed)
                + read(&stats.reports_refused_for_size),
            compile_cache_hits: compile_cache_hits + self.store.cache_hits(),
            compile_cache_misses,
            active_leases: u64::from(stats.active_runs.load(Ordering::SeqCst)),
            available_slots: u64::from(self.reported_available_slots()),
        }
    }

    fn outbox_backlog(&self) -> Option<OutboxBacklog> {
        self.backlog()
    }
}

impl ReadinessProbe for Node {
    fn readiness(&self) -> Readiness {
        Readiness {
            registered: *self.registered.borrow(),
            lease_stream_connected: self.stats.lease_stream_connected.load(Ordering::SeqCst),
            heartbeat_answered: self.stats.heartbeat_answered.load(Ordering::SeqCst),
            // Unreadable counts as full: a node that cannot keep its
            // promises durably should not take more work.
            outbox_depth: self.backlog().map_or(u64::MAX, |backlog| backlog.depth),
            outbox_bound: self.outbox.limits().max_reports as u64,
            draining: self.stop.is_cancelled(),
        }
    }
}

/// A started node. Dropping it does not stop it: call [`NodeHandle::shutdown`].
pub struct NodeHandle {
    node: Arc<Node>,
    done: tokio::task::JoinHandle<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    LeaseClient(#[from] LeaseClientError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("NodeRuntime.Capacity.Slots and MaxConcurrentLeases must allow at least one run")]
    NoSlots,
}

impl NodeHandle {
    /// A node to start with [`NodeBuilder::start`]: it registers, delivers
    /// what `outbox` still holds, then pulls, until shut down. Unless
    /// [`NodeBuilder::tls`] says otherwise, an `https://` control plane is
    /// verified against the system roots, with no client certificate.
    pub fn builder(
        settings: NodeSettings,
        sandbox: Arc<Sandbox>,
        store: Arc<AgentStore>,
        outbox: Outbox,
    ) -> NodeBuilder {
        NodeBuilder {
            settings,
            sandbox,
            store,
            outbox,
            tls: None,
            metrics: Arc::default(),
        }
    }
}

/// What a node starts with; see [`NodeHandle::builder`].
pub struct NodeBuilder {
    settings: NodeSettings,
    sandbox: Arc<Sandbox>,
    store: Arc<AgentStore>,
    outbox: Outbox,
    tls: Option<ControlPlaneTls>,
    metrics: Arc<NodeMetrics>,
}

impl NodeBuilder {
    /// The TLS (and client certificate) the `MTls` configuration asks
    /// for, on both the REST and gRPC links.
    pub fn tls(mut self, tls: ControlPlaneTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Records into `metrics` (the registry that telemetry exports and
    /// `/metrics` serves) instead of a registry of its own.
    pub fn metrics(mut self, metrics: Arc<NodeMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Starts the node's tasks.
    pub fn start(self) -> Result<NodeHandle, StartError> {
        let NodeBuilder {
            settings,
            sandbox,
            store,
            outbox,
            tls,
            metrics,
        } = self;
        let tls = match tls {
            Some(tls) => tls,
            None => ControlPlaneTls::configure(&settings.control_plane_url, &TlsOptions::default())?,
        };
        if settings.slots == 0 || settings.max_leases == 0 {
            return Err(StartError::NoSlots);
        }
        support::tls::install_crypto_provider();
        // REST calls must end before the next heartbeat is due.
        let rest_timeout = settings
            .heartbeat_interval
            .clamp(Duration::from_secs(1), Duration::from_secs(10));
        let rest = RestClient::new(
            &settings.control_plane_url,
            control_plane::registration::http_client_with(rest_timeout, &tls)?,
        );
        let leases = LeaseClient::connect_lazy_with(&settings.control_plane_url, Duration::from_secs(10), &tls)?;
        let (queue_tx, queue_rx) = mpsc::channel(queue_capacity(settings.slots));
        let node = Arc::new(Node {
            slots: Arc::new(Semaphore::new(settings.slots as usize)),
            settings,
            sandbox,
            store,
            rest,
            leases,
            stats: Arc::default(),
            seen: Mutex::new(SeenLeases {
                ids: HashSet::new(),
                order: VecDeque::new(),
            }),
            outbox,
            delivering: Mutex::new(HashSet::new()),
            registered: watch::Sender::new(false),
            heartbeat_now: Notify::new(),
            stop: CancellationToken::new(),
            abort: CancellationToken::new(),
            give_up: CancellationToken::new(),
            reports: TaskTracker::new(),
            metrics,
            backlog: Mutex::new(None),
        });
        tokio::spawn(tls.warn_before_expiry(node.stop.clone()));
        let observer: Arc<dyn NodeObserver> = node.clone();
        node.metrics.observe(Arc::downgrade(&observer));
        let done = tokio::spawn(lifecycle(node.clone(), queue_tx, queue_rx));
        Ok(NodeHandle { node, done })
    }
}

impl NodeHandle {
    pub fn stats(&self) -> Arc<NodeStats> {
        self.node.stats.clone()
    }

    /// What `/readyz` asks.
    pub fn readiness_probe(&self) -> Arc<dyn ReadinessProbe> {
        self.node.clone()
    }

    pub fn metrics(&self) -> Arc<NodeMetrics> {
        self.node.metrics.clone()
    }

    pub fn node_id(&self) -> &str {
        &self.node.settings.node_id
    }

    /// Stops pulling, drains running leases within the drain timeout, hands
    /// back the rest, delivers every report it can, and returns.
    pub async fn shutdown(self) {
        self.node.stop.cancel();
        let _ = self.done.await;
    }

    /// Waits until the node stops by itself (it does only when shut down).
    pub async fn wait(self) {
        let _ = self.done.await;
    }

    /// A token that, when cancelled, starts the shutdown.
    pub fn stop_token(&self) -> CancellationToken {
        self.node.stop.clone()
    }
}

/// Leases accepted beyond the running ones: enough that a burst from the
/// control plane keeps every slot busy, few enough that none waits long.
fn queue_capacity(slots: u32) -> usize {
    (slots as usize * 2).max(4)
}

/// How long reports may still be retried after the drain, before the node
/// gives up on them (the control plane re-leases after the lease TTL).
const REPORT_FLUSH: Duration = Duration::from_secs(10);

async fn lifecycle(
    node: Arc<Node>,
    queue_tx: mpsc::Sender<lease::AcceptedLease>,
    queue_rx: mpsc::Receiver<lease::AcceptedLease>,
) {
    let runs = TaskTracker::new();
    let heartbeat = tokio::spawn(heartbeat::run(node.clone()));
    let pull = tokio::spawn(pull::run(node.clone(), queue_tx));
    let dispatch = tokio::spawn(dispatch::run(node.clone(), queue_rx, runs.clone()));
    let recovery = tokio::spawn(report::recover(node.clone()));

    node.stop.cancelled().await;
    tracing::info!(
        drain_timeout = ?node.settings.drain_timeout,
        "stopping: no new leases; draining the runs in flight"
    );
    let _ = pull.await;
    let _ = dispatch.await;
    let _ = recovery.await;
    runs.close();
    if tokio::time::timeout(node.settings.drain_timeout, runs.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout passed: handing back the runs still in flight");
        node.abort.cancel();
        runs.wait().await;
    }
    node.reports.close();
    if tokio::time::timeout(REPORT_FLUSH, node.reports.wait()).await.is_err() {
        tracing::error!(
            "some reports could not be delivered before exit; they stay in the outbox \
             and are sent when the node starts again"
        );
        node.give_up.cancel();
        node.reports.wait().await;
    }
    let _ = heartbeat.await;
    tracing::info!("stopped");
}
