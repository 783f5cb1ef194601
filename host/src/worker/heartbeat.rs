//! Registration and heartbeats, as the contract's "node must" lines say:
//! register with backoff until accepted; heartbeat right after, then every
//! interval, never overlapping; register again on a 404; say `draining`
//! with no free slots once stopping.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Node;
use crate::control_plane::{Backoff, HeartbeatAnswer, NodeState, NodeStatus, Registration};

pub(super) async fn run(node: Arc<Node>) {
    loop {
        if !register(&node).await {
            return; // stopped before the control plane took us
        }
        if heartbeat_until_forgotten(&node).await {
            tracing::warn!("the control plane no longer knows this node (404 to a heartbeat); registering again");
            node.registered.send_replace(false);
            continue;
        }
        return;
    }
}

/// Registers until accepted; false if stopped first.
async fn register(node: &Node) -> bool {
    let settings = &node.settings;
    let registration = Registration {
        node_id: settings.node_id.clone(),
        metadata: settings.metadata.clone(),
        capacity: settings.capacity.clone(),
    };
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
    let registered_before = node.stats.registrations.load(Ordering::Relaxed) > 0;
    loop {
        match node.rest.register(&registration).await {
            Ok(()) => break,
            // A re-registration the server refuses with a 5xx may mean it
            // still has us (the reference's Postgres store does that): go
            // on, and a 404 heartbeat brings us back here.
            Err(err) if registered_before && err.is_server_error() => {
                tracing::warn!(error = %err, "re-registration refused with a server error; assuming the control plane still knows this node");
                break;
            }
            Err(err) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %err, retry_in = ?delay, attempt = backoff.attempts(), "registration failed");
                tokio::select! {
                    _ = node.stop.cancelled() => return false,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    node.stats.registrations.fetch_add(1, Ordering::Relaxed);
    tracing::info!(node_id = %settings.node_id, url = %settings.control_plane_url, "registered with the control plane");
    node.registered.send_replace(true);
    true
}

/// Heartbeats until stopped (false) or until the control plane answers 404
/// (true).
async fn heartbeat_until_forgotten(node: &Node) -> bool {
    let interval = node.settings.heartbeat_interval;
    loop {
        let status = NodeStatus {
            state: NodeState::Active,
            active_runs: node.settings.slots - node.available_slots().min(node.settings.slots),
            available_slots: node.available_slots(),
        };
        match node.rest.heartbeat(&node.settings.node_id, status).await {
            Ok(HeartbeatAnswer::Accepted) => node.stats.heartbeat_answered.store(true, Ordering::SeqCst),
            Ok(HeartbeatAnswer::UnknownNode) => {
                node.stats.heartbeat_answered.store(false, Ordering::SeqCst);
                return true;
            }
            Err(err) => {
                node.stats.heartbeat_answered.store(false, Ordering::SeqCst);
                node.stats.heartbeat_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %err, "heartbeat failed; the next one is due in {interval:?}");
            }
        }
        tokio::select! {
            _ = node.stop.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
            _ = node.heartbeat_now.notified() => {}
        }
    }
    // Stopping: the scheduler must not place anything here any more.
    let draining = NodeStatus {
        state: NodeState::Draining,
        active_runs: node.settings.slots - node.available_slots().min(node.settings.slots),
        available_slots: 0,
    };
    if let Err(err) = node.rest.heartbeat(&node.settings.node_id, draining).await {
        tracing::warn!(error = %err, "could not tell the control plane this node is draining");
    }
    false
}
