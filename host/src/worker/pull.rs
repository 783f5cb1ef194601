//! The lease stream: open it once registered, hand every new lease to the
//! queue, reopen with backoff when it breaks.
//!
//! The reference may stream more leases than the node has slots
//! (`max_leases` caps one poll, not concurrency). When the queue is full
//! the node stops reading the stream until a place frees up, so HTTP/2
//! flow control holds the surplus back, rather than handing leases back:
//! the reference never re-queues a failed run, so a hand-back would fail
//! the run for good. A lease that waited past its deadline is still
//! handed back (retryable) by the dispatcher.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

use super::Node;
use super::lease::AcceptedLease;
use super::report;
use crate::control_plane::{Backoff, LeaseStream};
use crate::proto::{AckRequest, Lease};
use crate::sandbox::RunFailure;

/// A stream that ends sooner than this after opening, with no lease, looks
/// like "unknown node": ask for a heartbeat, which re-registers on a 404.
const SUSPICIOUSLY_SHORT: Duration = Duration::from_secs(1);

pub(super) async fn run(node: Arc<Node>, queue: mpsc::Sender<AcceptedLease>) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
    let mut registered = node.registered.subscribe();
    let mut opened_before = false;
    loop {
        tokio::select! {
            _ = node.stop.cancelled() => return,
            ready = registered.wait_for(|registered| *registered) => if ready.is_err() { return },
        }
        if opened_before {
            node.stats.lease_stream_reconnects.fetch_add(1, Ordering::Relaxed);
        }
        opened_before = true;
        let opened = Instant::now();
        // An idle Pull gets no headers until the first lease: while it is
        // outstanding and has not failed, the stream counts as connected.
        node.stats.lease_stream_connected.store(true, Ordering::SeqCst);
        let stream = tokio::select! {
            _ = node.stop.cancelled() => return,
            stream = node.leases.pull(&node.settings.node_id, node.settings.max_leases) => stream,
        };
        match stream {
            Ok(stream) => {
                let received = consume(&node, stream, &queue, &mut backoff).await;
                if node.stop.is_cancelled() {
                    return;
                }
                if received == 0 && opened.elapsed() < SUSPICIOUSLY_SHORT {
                    node.heartbeat_now.notify_one();
                }
            }
            Err(err) => {
                node.stats.lease_stream_errors.fetch_add(1, Ordering::Relaxed);
                let hint = if node.settings.control_plane_url.starts_with("http://") {
                    " (if the control plane only speaks HTTP/2 over TLS, as the reference's \
                     Kestrel defaults do, use an https:// ControlPlaneUrl)"
                } else {
                    ""
                };
                tracing::warn!(error = %err, "the lease stream could not be opened{hint}");
            }
        }
        node.stats.lease_stream_connected.store(false, Ordering::SeqCst);
        let delay = backoff.next_delay();
        tracing::info!(reopen_in = ?delay, "lease stream closed; reopening");
        tokio::select! {
            _ = node.stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Reads leases until the stream ends or the node stops; returns how many
/// arrived.
async fn consume(
    node: &Arc<Node>,
    mut stream: LeaseStream,
    queue: &mpsc::Sender<AcceptedLease>,
    backoff: &mut Backoff,
) -> u64 {
    let mut received = 0;
    loop {
        let message = tokio::select! {
            _ = node.stop.cancelled() => return received,
            message = stream.message() => message,
        };
        match message {
            Ok(Some(lease)) => {
                received += 1;
                backoff.reset();
                if let Some(accepted) = accept(node, lease).await {
                    enqueue(node, accepted, queue).await;
                }
            }
            Ok(None) => {
                tracing::info!("the control plane ended the lease stream");
                return received;
            }
            Err(status) => {
                node.stats.lease_stream_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %status, "the lease stream broke");
                return received;
            }
        }
    }
}

/// Records (in the outbox, synced) and acknowledges a new lease; None for
/// a lease accepted before, by this process or an earlier one: it does not
/// run again, and the report the outbox may hold for it is sent.
async fn accept(node: &Arc<Node>, lease: Lease) -> Option<AcceptedLease> {
    node.stats.leases_received.fetch_add(1, Ordering::Relaxed);
    let fresh = node
        .seen
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .insert(&lease.lease_id);
    let fresh = fresh && {
        let outbox = node.outbox.clone();
        let (lease_id, deadline) = (lease.lease_id.clone(), lease.deadline_unix_ms);
        match tokio::task::spawn_blocking(move || outbox.accept(&lease_id, deadline)).await {
            Ok(Ok(fresh)) => fresh,
            Ok(Err(err)) => {
                node.stats.outbox_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(lease_id = %lease.lease_id, error = %err, "cannot record the accepted lease; running it anyway");
                true
            }
            Err(err) => {
                node.stats.outbox_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(lease_id = %lease.lease_id, error = %err, "cannot record the accepted lease; running it anyway");
                true
            }
        }
    };
    if !fresh {
        node.stats.duplicate_leases.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(lease_id = %lease.lease_id, run_id = %lease.run_id, "lease received twice; it runs once (its stored report, if any, is sent)");
        report::deliver_stored(node, &lease.lease_id);
        return None;
    }
    let accepted = AcceptedLease {
        lease,
        received: Instant::now(),
    };
    tracing::info!(lease_id = %accepted.lease.lease_id, run_id = %accepted.lease.run_id, agent_id = accepted.agent_id(), "lease received");
    acknowledge(node, &accepted);
    Some(accepted)
}

/// Waits for a place in the queue; the stream is not read meanwhile.
async fn enqueue(node: &Arc<Node>, accepted: AcceptedLease, queue: &mpsc::Sender<AcceptedLease>) {
    let permit = tokio::select! {
        _ = node.stop.cancelled() => None,
        permit = queue.reserve() => permit.ok(),
    };
    match permit {
        Some(permit) => permit.send(accepted),
        None => report::hand_back(node, &accepted, RunFailure::handed_back("the node is shutting down")),
    }
}

/// Acks off the stream's path, so a slow Ack never delays the next lease.
fn acknowledge(node: &Arc<Node>, accepted: &AcceptedLease) {
    let request = AckRequest {
        lease_id: accepted.lease.lease_id.clone(),
        node_id: node.settings.node_id.clone(),
        ack_timestamp_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
    };
    let node = node.clone();
    tokio::spawn(async move {
        match node.leases.ack(request.clone()).await {
            Ok((true, _)) => {
                node.stats.leases_acknowledged.fetch_add(1, Ordering::Relaxed);
            }
            Ok((false, message)) => {
                tracing::warn!(lease_id = %request.lease_id, %message, "the control plane refused the Ack")
            }
            Err(err) => tracing::warn!(lease_id = %request.lease_id, error = %err, "Ack failed"),
        }
    });
}
