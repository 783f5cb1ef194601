//! Registration and heartbeats, as the contract's "node must" lines say:
//! register with backoff until accepted; heartbeat right after, then every
//! interval, never overlapping; register again on a 404; say `draining`
//! with no free slots once stopping, every interval until the node exits.
//!
//! A 5xx to a registration may mean "known already": the Postgres-backed
//! reference answers 500 (duplicate key) to every registration of an id it
//! has, for as long as it lives, the first one after this process restarts
//! included. So a 5xx sends the node on to heartbeat, unconfirmed: it
//! counts as registered (so it pulls, and delivers what its outbox holds)
//! only once a heartbeat is answered; a 404 sends it back to registering,
//! after a backoff delay, so the two never alternate in a hot loop.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{Notify, watch};

use super::shutdown::Shutdown;
use super::{NodeStats, Slots};
use support::Backoff;

use crate::control_plane::{Capacity, HeartbeatAnswer, NodeState, NodeStatus, Registration, RestClient};
use crate::outbox::Outbox;

/// How a registration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Registered {
    /// 2xx: the control plane has this node.
    Accepted,
    /// 5xx: it may have it already; the next heartbeat says.
    Unconfirmed,
}

/// The heartbeat task's state: who this node is, how to reach the plane,
/// and the flag it raises once the plane has the node.
pub(super) struct Heartbeat {
    pub(super) node_id: String,
    /// Logged with each registration.
    pub(super) control_plane_url: String,
    pub(super) interval: Duration,
    pub(super) capacity: Capacity,
    pub(super) metadata: BTreeMap<String, String>,
    pub(super) rest: RestClient,
    /// How many runs the node takes at once; `slots` says how many are free.
    pub(super) slot_count: u32,
    pub(super) slots: Slots,
    pub(super) stats: Arc<NodeStats>,
    /// True once the control plane accepted the registration.
    pub(super) registered: Arc<watch::Sender<bool>>,
    /// Read for whether it can record: a node that cannot offers no slot.
    pub(super) outbox: Outbox,
    /// Asks for a heartbeat now (the lease stream ended at once: the plane
    /// may have forgotten this node).
    pub(super) heartbeat_now: Arc<Notify>,
    pub(super) shutdown: Shutdown,
}

impl Heartbeat {
    pub(super) async fn run(self) {
        // Shared by registration failures and by register-then-404 rounds;
        // reset once a heartbeat is answered. A plane that takes every
        // registration and forgets it at once (replicas that share nothing,
        // behind one address) gets a round per delay, not a hot loop.
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
        loop {
            let Some(registered) = self.register(&mut backoff).await else {
                return; // stopped before the control plane took us
            };
            if !self.heartbeat_until_forgotten(registered, &mut backoff).await {
                return;
            }
            self.registered.send_replace(false);
            let delay = backoff.next_delay();
            match registered {
                Registered::Accepted => {
                    tracing::warn!(retry_in = ?delay, "the control plane no longer knows this node (404 to a heartbeat); registering again");
                }
                Registered::Unconfirmed => {
                    tracing::warn!(
                        retry_in = ?delay,
                        "the control plane does not know this node after all (its registration was answered \
                         with a server error, then a heartbeat with 404); registering again"
                    );
                }
            }
            tokio::select! {
                _ = self.shutdown.stopping() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Registers until accepted, or until a 5xx says the control plane may
    /// have this node already; `None` if stopped first.
    async fn register(&self, backoff: &mut Backoff) -> Option<Registered> {
        let registration = Registration {
            node_id: self.node_id.clone(),
            metadata: self.metadata.clone(),
            capacity: self.capacity.clone(),
        };
        loop {
            match self.rest.register(&registration).await {
                Ok(()) => {
                    self.confirm("registered with the control plane");
                    return Some(Registered::Accepted);
                }
                Err(err) if err.is_server_error() => {
                    tracing::warn!(
                        error = %err,
                        "registration answered with a server error; the control plane may know this node \
                         already (the Postgres-backed reference answers 500 to a known id): heartbeating to find out"
                    );
                    return Some(Registered::Unconfirmed);
                }
                Err(err) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %err, retry_in = ?delay, attempt = backoff.attempts(), "registration failed");
                    tokio::select! {
                        _ = self.shutdown.stopping() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// The control plane has this node: the lease stream and the outbox's
    /// deliveries may start.
    fn confirm(&self, what: &str) {
        self.stats.registrations.fetch_add(1, Ordering::Relaxed);
        tracing::info!(node_id = %self.node_id, url = %self.control_plane_url, "{what}");
        self.registered.send_replace(true);
    }

    /// Heartbeats until stopped (false) or until the control plane answers 404
    /// (true). After an unconfirmed registration, the first heartbeat answered
    /// confirms it.
    async fn heartbeat_until_forgotten(&self, registered: Registered, backoff: &mut Backoff) -> bool {
        let interval = self.interval;
        let mut confirmed = registered == Registered::Accepted;
        let mut answered = false;
        loop {
            match self.rest.heartbeat(&self.node_id, self.status(NodeState::Active)).await {
                Ok(HeartbeatAnswer::Accepted) => {
                    self.stats.heartbeat_answered.store(true, Ordering::SeqCst);
                    if !answered {
                        answered = true;
                        backoff.reset();
                    }
                    if !confirmed {
                        confirmed = true;
                        self.confirm(
                            "the control plane knows this node already (a heartbeat was answered); going on as registered",
                        );
                    }
                }
                Ok(HeartbeatAnswer::UnknownNode) => {
                    self.stats.heartbeat_answered.store(false, Ordering::SeqCst);
                    return true;
                }
                Err(err) => {
                    self.stats.heartbeat_answered.store(false, Ordering::SeqCst);
                    self.stats.heartbeat_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %err, "heartbeat failed; the next one is due in {interval:?}");
                }
            }
            tokio::select! {
                _ = self.shutdown.stopping() => break,
                _ = tokio::time::sleep(interval) => {}
                _ = self.heartbeat_now.notified() => {}
            }
        }
        self.heartbeat_while_draining().await;
        false
    }

    /// What a heartbeat reports now: a draining node offers no free slot, so
    /// the scheduler places nothing here; nor does a node whose outbox
    /// cannot record, which reads no lease until it can (runs the plane
    /// assigned meanwhile would only wait, unacknowledged).
    fn status(&self, state: NodeState) -> NodeStatus {
        let free = self.slots.available().min(self.slot_count);
        NodeStatus {
            active_runs: self.slot_count - free,
            available_slots: if state == NodeState::Draining || !self.outbox.is_writable() {
                0
            } else {
                self.slots.available()
            },
            state,
        }
    }

    /// Stopping: says `draining` (no free slot, so the scheduler places
    /// nothing here) every interval until the node exits, which ends this
    /// task: a drain longer than the plane's liveness window (60 s in the
    /// reference) must not look like a dead node. A 404 is not answered by
    /// registering again: the node is leaving.
    async fn heartbeat_while_draining(&self) {
        let mut warned = false;
        loop {
            match self
                .rest
                .heartbeat(&self.node_id, self.status(NodeState::Draining))
                .await
            {
                Ok(_) => warned = false,
                Err(err) if !warned => {
                    warned = true;
                    tracing::warn!(error = %err, "could not tell the control plane this node is draining");
                }
                Err(_) => {}
            }
            self.shutdown.draining_said();
            tokio::time::sleep(self.interval).await;
        }
    }
}
