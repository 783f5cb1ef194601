//! The worker: a node's whole life, from registration to drain.
//!
//! Five tasks, each owning the state it uses:
//! - `heartbeat` ([`Heartbeat`](heartbeat::Heartbeat)): registers
//!   (retrying until accepted), heartbeats every interval, re-registers
//!   when the control plane forgot the node;
//! - `pull` ([`Puller`](pull::Puller)): keeps the lease stream open and
//!   hands each new lease to the queue (a lease id seen before is not run
//!   again);
//! - `dispatch` ([`Dispatcher`](dispatch::Dispatcher)): takes leases from
//!   the bounded queue as slots free up and runs them in the sandbox;
//! - `report` ([`Reporter`](report::Reporter), shared by pull and
//!   dispatch): delivers exactly one Complete or Fail per accepted lease,
//!   retrying until the control plane answers;
//! - `recover` (in `report`): at start, drops expired outbox entries and,
//!   once registered, delivers the reports an earlier run left behind;
//!   then prunes expired accepted lease ids every minute. Before any task
//!   starts, each lease an earlier run left in flight (accepted, with no
//!   report) gets a retryable Fail in the outbox, which `recover` sends.
//!
//! While the outbox cannot record (a disk fault), the pull task reads no
//! lease and acknowledges none it could not record; reports are sent from
//! memory meanwhile; `/readyz` and the metrics say so.
//!
//! What two tasks really share is an `Arc` of that one piece: the
//! [`NodeStats`], the registered flag, the slots. The metrics and
//! `/readyz` read the node through [`Readings`].
//!
//! Data flows one way: lease -> queue -> sandbox -> outbox -> control
//! plane. The [`Outbox`] (redb, on disk) records each accepted lease id
//! before the lease is queued, and each report before its first send; a
//! report leaves it only once the control plane answered. On start, after
//! registration, whatever it still holds is delivered. Shutdown is one
//! value passed down ([`Shutdown`](shutdown::Shutdown)), in three stages:
//! stop taking leases (drain), abort the runs (the drain timeout passed:
//! hand back what still runs), give up delivering (at exit).

mod dispatch;
mod heartbeat;
pub mod lease;
mod pull;
mod report;
mod shutdown;
mod specs;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::sync::lock;

use tokio::sync::{AcquireError, Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent_store::AgentStore;
use crate::control_plane::{
    self, AgentApi, Capacity, ControlPlaneTls, LeaseClient, LeaseClientError, RestClient, TlsError, TlsOptions,
};
use crate::outbox::{self, Outbox};
use crate::sandbox::Sandbox;
use crate::telemetry::{NodeCounts, NodeMetrics, NodeObserver, OutboxBacklog, Readiness, ReadinessProbe};

use dispatch::Dispatcher;
use heartbeat::Heartbeat;
use pull::Puller;
use report::Reporter;
use shutdown::Shutdown;

pub use report::{Delivery, Sent};

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
    /// Leases refused because their lease id was empty.
    pub leases_without_id: AtomicU64,
    /// Leases found in flight at start-up (the node died while they ran),
    /// failed as interrupted.
    pub leases_interrupted: AtomicU64,
    /// Lease messages larger than the node decodes: each broke the stream.
    pub lease_messages_too_large: AtomicU64,
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

/// The node's run slots: a permit per run. Cloning shares them.
#[derive(Clone)]
struct Slots(Arc<Semaphore>);

impl Slots {
    fn new(count: u32) -> Slots {
        Slots(Arc::new(Semaphore::new(count as usize)))
    }

    /// The slots free now.
    fn available(&self) -> u32 {
        u32::try_from(self.0.available_permits()).unwrap_or(u32::MAX)
    }

    /// Waits for a free slot; the permit holds it until dropped.
    fn acquire(&self) -> impl Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + use<> {
        self.0.clone().acquire_owned()
    }
}

/// What the metrics and `/readyz` read of a running node: its counters,
/// slots, registration, outbox and whether it drains.
struct Readings {
    sandbox: Arc<Sandbox>,
    store: Arc<AgentStore>,
    stats: Arc<NodeStats>,
    slots: Slots,
    registered: Arc<watch::Sender<bool>>,
    outbox: Outbox,
    shutdown: Shutdown,
    /// The outbox's depth and oldest age, read at most once a second.
    backlog: Mutex<Option<(std::time::Instant, OutboxBacklog)>>,
    /// The last read of the backlog failed (its warning is logged once).
    backlog_unreadable: AtomicBool,
}

impl Readings {
    /// What the heartbeat reports: 0 once draining, and while the outbox
    /// cannot record (no lease is taken then).
    fn reported_available_slots(&self) -> u32 {
        if self.shutdown.is_stopping() || !self.outbox.is_writable() {
            0
        } else {
            self.slots.available()
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
                // Once per episode: `/readyz` and `/metrics` ask at every scrape.
                if !self.backlog_unreadable.swap(true, Ordering::SeqCst) {
                    tracing::warn!(
                        error = %err,
                        "cannot read the outbox's backlog: /readyz reports the node unready and \
                         /metrics leaves out the outbox's gauges until it can; check the disk \
                         under NodeRuntime.DataDirectory"
                    );
                }
                return None;
            }
        };
        if self.backlog_unreadable.swap(false, Ordering::SeqCst) {
            tracing::info!(depth, "the outbox's backlog can be read again");
        }
        let oldest_age = oldest.map_or(Duration::ZERO, |written| {
            Duration::from_millis(u64::try_from(outbox::now_unix_ms() - written).unwrap_or(0))
        });
        let backlog = OutboxBacklog { depth, oldest_age };
        *cached = Some((std::time::Instant::now(), backlog));
        Some(backlog)
    }
}

impl NodeObserver for Readings {
    fn counts(&self) -> NodeCounts {
        let stats = &self.stats;
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let (compile_cache_hits, compile_cache_misses) = self.sandbox.compile_cache_stats();
        NodeCounts {
            leases_received: read(&stats.leases_received),
            leases_acknowledged: read(&stats.leases_acknowledged),
            leases_without_id: read(&stats.leases_without_id),
            leases_interrupted: read(&stats.leases_interrupted),
            lease_messages_too_large: read(&stats.lease_messages_too_large),
            outbox_write_failures: self.outbox.write_failures(),
            outbox_writable: u64::from(self.outbox.is_writable()),
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

impl ReadinessProbe for Readings {
    fn readiness(&self) -> Readiness {
        Readiness {
            registered: *self.registered.borrow(),
            lease_stream_connected: self.stats.lease_stream_connected.load(Ordering::SeqCst),
            heartbeat_answered: self.stats.heartbeat_answered.load(Ordering::SeqCst),
            // Unreadable: not ready, said as such.
            outbox_depth: self.backlog().map(|backlog| backlog.depth),
            outbox_bound: self.outbox.limits().max_reports as u64,
            draining: self.shutdown.is_stopping(),
            outbox_fault: self.outbox.fault().map(|fault| {
                format!(
                    "since {}: {}",
                    humantime::format_rfc3339_seconds(fault.since),
                    fault.error
                )
            }),
        }
    }
}

/// A started node. Dropping it does not stop it: call [`NodeHandle::shutdown`].
pub struct NodeHandle {
    node_id: String,
    readings: Arc<Readings>,
    metrics: Arc<NodeMetrics>,
    shutdown: Shutdown,
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
            max_lease_message_bytes: DEFAULT_MAX_LEASE_MESSAGE_BYTES,
            declarative_agents: true,
            calls_stream: true,
        }
    }
}

/// The largest lease message decoded unless the builder says otherwise
/// (`NodeRuntime.MaxLeaseMessageBytes`'s default).
pub const DEFAULT_MAX_LEASE_MESSAGE_BYTES: usize = 64 << 20;

/// What a node starts with; see [`NodeHandle::builder`].
pub struct NodeBuilder {
    settings: NodeSettings,
    sandbox: Arc<Sandbox>,
    store: Arc<AgentStore>,
    outbox: Outbox,
    tls: Option<ControlPlaneTls>,
    metrics: Arc<NodeMetrics>,
    max_lease_message_bytes: usize,
    declarative_agents: bool,
    calls_stream: bool,
}

impl NodeBuilder {
    /// Whether a lease whose agent no source has runs the control plane's
    /// definition of it (`DeclarativeAgents.Enabled`; on unless turned
    /// off).
    pub fn declarative_agents(mut self, enabled: bool) -> Self {
        self.declarative_agents = enabled;
        self
    }

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

    /// Decodes lease messages of up to `bytes` (`MaxLeaseMessageBytes`).
    pub fn max_lease_message_bytes(mut self, bytes: usize) -> Self {
        self.max_lease_message_bytes = bytes;
        self
    }

    /// Whether Ack, Complete and Fail share one stream where the control
    /// plane has it (`CallsStream`; on unless turned off).
    pub fn calls_stream(mut self, enabled: bool) -> Self {
        self.calls_stream = enabled;
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
            max_lease_message_bytes,
            declarative_agents,
            calls_stream,
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
        let rest_http = control_plane::registration::http_client_with(rest_timeout, &tls)?;
        let specs = declarative_agents.then(|| {
            Arc::new(specs::Specs::new(AgentApi::new(
                &settings.control_plane_url,
                rest_http.clone(),
            )))
        });
        let rest = RestClient::new(&settings.control_plane_url, rest_http);
        let leases = LeaseClient::connect_lazy_with(&settings.control_plane_url, Duration::from_secs(10), &tls)?
            .max_lease_message_bytes(max_lease_message_bytes)
            .calls_stream(calls_stream);
        let (queue_tx, queue_rx) = mpsc::channel(queue_capacity(settings.slots));
        // Created once; each task gets what it uses.
        let shutdown = Shutdown::default();
        let stats = Arc::<NodeStats>::default();
        let slots = Slots::new(settings.slots);
        let registered = Arc::new(watch::Sender::new(false));
        let heartbeat_now = Arc::new(Notify::new());
        let reporter = Arc::new(Reporter {
            node_id: settings.node_id.clone(),
            leases: leases.clone(),
            outbox: outbox.clone(),
            delivering: tokio::sync::Mutex::new(HashSet::new()),
            tasks: TaskTracker::new(),
            stats: stats.clone(),
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
        });
        let heartbeat = Heartbeat {
            node_id: settings.node_id.clone(),
            control_plane_url: settings.control_plane_url.clone(),
            interval: settings.heartbeat_interval,
            capacity: settings.capacity.clone(),
            metadata: settings.metadata.clone(),
            rest,
            slot_count: settings.slots,
            slots: slots.clone(),
            stats: stats.clone(),
            registered: registered.clone(),
            heartbeat_now: heartbeat_now.clone(),
            shutdown: shutdown.clone(),
            outbox: outbox.clone(),
        };
        let puller = Puller {
            node_id: settings.node_id.clone(),
            control_plane_url: settings.control_plane_url.clone(),
            max_leases: settings.max_leases,
            max_lease_message_bytes,
            leases,
            outbox: outbox.clone(),
            seen: pull::SeenLeases::default(),
            stats: stats.clone(),
            registered: registered.clone(),
            heartbeat_now,
            reporter: reporter.clone(),
            shutdown: shutdown.clone(),
        };
        let dispatcher = Arc::new(Dispatcher {
            node_id: settings.node_id.clone(),
            sandbox: sandbox.clone(),
            store: store.clone(),
            specs,
            slots: slots.clone(),
            stats: stats.clone(),
            metrics: metrics.clone(),
            reporter: reporter.clone(),
            shutdown: shutdown.clone(),
        });
        let readings = Arc::new(Readings {
            sandbox,
            store,
            stats,
            slots,
            registered: registered.clone(),
            outbox,
            shutdown: shutdown.clone(),
            backlog: Mutex::new(None),
            backlog_unreadable: AtomicBool::new(false),
        });
        tokio::spawn(tls.warn_before_expiry(shutdown.stop_token()));
        let observer: Arc<dyn NodeObserver> = readings.clone();
        metrics.observe(Arc::downgrade(&observer));
        let tasks = Tasks {
            heartbeat,
            puller,
            dispatcher,
            reporter,
            registered,
            readings: readings.clone(),
            shutdown: shutdown.clone(),
            drain_timeout: settings.drain_timeout,
        };
        let done = tokio::spawn(lifecycle(tasks, queue_tx, queue_rx));
        Ok(NodeHandle {
            node_id: settings.node_id,
            readings,
            metrics,
            shutdown,
            done,
        })
    }
}

impl NodeHandle {
    pub fn stats(&self) -> Arc<NodeStats> {
        self.readings.stats.clone()
    }

    /// What `/readyz` asks.
    pub fn readiness_probe(&self) -> Arc<dyn ReadinessProbe> {
        self.readings.clone()
    }

    pub fn metrics(&self) -> Arc<NodeMetrics> {
        self.metrics.clone()
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Stops pulling, drains running leases within the drain timeout, hands
    /// back the rest, delivers every report it can, and returns.
    pub async fn shutdown(self) {
        self.shutdown.stop_taking_leases();
        let _ = self.done.await;
    }

    /// Waits until the node stops by itself (it does only when shut down).
    pub async fn wait(self) {
        let _ = self.done.await;
    }

    /// A token that, when cancelled, starts the shutdown.
    pub fn stop_token(&self) -> CancellationToken {
        self.shutdown.stop_token()
    }
}

/// Leases acknowledged beyond the running ones: enough that a burst from
/// the control plane keeps every slot busy, few enough that none waits
/// long. The pull task reads no lease it has no place for here, so at most
/// this many wait, plus the one the dispatcher holds while it waits for the
/// next free slot; the rest stay unread at the control plane.
fn queue_capacity(slots: u32) -> usize {
    (slots as usize * 2).max(4)
}

/// How long reports may still be retried after the drain, before the node
/// gives up on them (the control plane re-leases after the lease TTL).
const REPORT_FLUSH: Duration = Duration::from_secs(10);

/// The tasks of a node, made at start, and what the lifecycle itself
/// needs to run them to the end.
struct Tasks {
    heartbeat: Heartbeat,
    puller: Puller,
    dispatcher: Arc<Dispatcher>,
    reporter: Arc<Reporter>,
    /// For the recovery task, which waits for the registration.
    registered: Arc<watch::Sender<bool>>,
    /// Kept until the node stops, so the metrics can read it meanwhile
    /// (they hold it weakly), even if the handle was dropped.
    readings: Arc<Readings>,
    shutdown: Shutdown,
    drain_timeout: Duration,
}

async fn lifecycle(
    tasks: Tasks,
    queue_tx: mpsc::Sender<lease::AcceptedLease>,
    queue_rx: mpsc::Receiver<lease::AcceptedLease>,
) {
    let Tasks {
        heartbeat,
        puller,
        dispatcher,
        reporter,
        registered,
        readings: _readings,
        shutdown,
        drain_timeout,
    } = tasks;
    let runs = TaskTracker::new();
    // Before any lease is read: what an earlier life left running is failed
    // now, so a lease this life accepts is never taken for one of them.
    reporter.fail_interrupted().await;
    let heartbeat = tokio::spawn(heartbeat.run());
    let pull = tokio::spawn(puller.run(queue_tx));
    let dispatch = tokio::spawn(dispatcher.run(queue_rx, runs.clone()));
    let recovery = tokio::spawn(reporter.clone().recover(registered));

    shutdown.stopping().await;
    tracing::info!(
        drain_timeout = ?drain_timeout,
        "stopping: no new leases; draining the runs in flight"
    );
    let _ = pull.await;
    let _ = dispatch.await;
    let _ = recovery.await;
    runs.close();
    if tokio::time::timeout(drain_timeout, runs.wait()).await.is_err() {
        tracing::warn!("drain timeout passed: handing back the runs still in flight");
        shutdown.abort_runs();
        runs.wait().await;
    }
    reporter.tasks.close();
    if tokio::time::timeout(REPORT_FLUSH, reporter.tasks.wait()).await.is_err() {
        tracing::error!(
            "some reports could not be delivered before exit; those recorded stay in the outbox \
             and are sent when the node starts again"
        );
        shutdown.give_up_delivering();
        reporter.tasks.wait().await;
    }
    // The heartbeat says `draining` until here; the node is done. A drain
    // with nothing to wait for ends in a millisecond: the heartbeat's first
    // `draining` must not be cut off on its way (bounded by its own timeout).
    let mut heartbeat = heartbeat;
    let ended = tokio::select! {
        _ = shutdown.draining_was_said() => false,
        _ = &mut heartbeat => true,
        _ = tokio::time::sleep(Duration::from_secs(15)) => false,
    };
    if !ended {
        heartbeat.abort();
        let _ = heartbeat.await;
    }
    tracing::info!("stopped");
}
