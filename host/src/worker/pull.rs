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

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll as TaskPoll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::sync::lock;

use tokio::sync::mpsc;

use super::Node;
use super::lease::AcceptedLease;
use super::report;
use support::Backoff;

use crate::control_plane::LeaseStream;
use crate::sandbox::RunFailure;
use proto::{AckRequest, Lease};

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

/// Leases accepted with one outbox commit at most: what has already
/// arrived when the first of them is read, up to this many.
const ACCEPT_BATCH: usize = 256;

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
        let mut message = tokio::select! {
            _ = node.stop.cancelled() => return received,
            message = stream.message() => message,
        };
        // This lease and those already arrived behind it are recorded in
        // the outbox together: one fsync for a burst, not one each.
        let mut leases = Vec::new();
        let ended = loop {
            match message {
                Ok(Some(lease)) => leases.push(lease),
                ended => break Some(ended),
            }
            if leases.len() == ACCEPT_BATCH {
                break None;
            }
            match arrived(&mut stream) {
                Some(next) => message = next,
                None => break None,
            }
        };
        if !leases.is_empty() {
            received += leases.len() as u64;
            backoff.reset();
        }
        for accepted in accept(node, leases).await {
            enqueue(node, accepted, queue).await;
        }
        match ended {
            None | Some(Ok(Some(_))) => {}
            Some(Ok(None)) => {
                tracing::info!("the control plane ended the lease stream");
                return received;
            }
            Some(Err(status)) => {
                node.stats.lease_stream_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %status, "the lease stream broke");
                return received;
            }
        }
    }
}

/// The stream's next message if it has already arrived; None if reading
/// it would wait. (Polling once with a no-op waker is enough: the next
/// `message().await` polls again with a real one.)
fn arrived(stream: &mut LeaseStream) -> Option<Result<Option<Lease>, tonic::Status>> {
    let mut context = Context::from_waker(Waker::noop());
    match std::pin::pin!(stream.message()).poll(&mut context) {
        TaskPoll::Ready(message) => Some(message),
        TaskPoll::Pending => None,
    }
}

/// Records (in the outbox, synced, one commit for all) and acknowledges
/// new leases. A lease accepted before, by this process or an earlier one,
/// does not run again, and the report the outbox may hold for it is sent.
async fn accept(node: &Arc<Node>, leases: Vec<Lease>) -> Vec<AcceptedLease> {
    node.stats
        .leases_received
        .fetch_add(leases.len() as u64, Ordering::Relaxed);
    let (fresh, seen): (Vec<Lease>, Vec<Lease>) = {
        let mut seen = lock(&node.seen);
        leases.into_iter().partition(|lease| seen.insert(&lease.lease_id))
    };
    let keys: Vec<(&str, i64)> = fresh
        .iter()
        .map(|lease| (lease.lease_id.as_str(), lease.deadline_unix_ms))
        .collect();
    let recorded = node.outbox.accept_all_async(&keys).await;

    let mut accepted = Vec::with_capacity(fresh.len());
    let mut again = seen;
    for (lease, recorded) in fresh.into_iter().zip(recorded) {
        match recorded {
            Ok(true) => {}
            Ok(false) => {
                again.push(lease);
                continue;
            }
            Err(err) => {
                node.stats.outbox_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(lease_id = %lease.lease_id, error = %err, "cannot record the accepted lease; running it anyway");
            }
        }
        let lease = AcceptedLease {
            lease,
            received: Instant::now(),
        };
        tracing::info!(lease_id = %lease.lease.lease_id, run_id = %lease.lease.run_id, agent_id = lease.agent_id(), "lease received");
        acknowledge(node, &lease);
        accepted.push(lease);
    }
    for lease in again {
        node.stats.duplicate_leases.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(lease_id = %lease.lease_id, run_id = %lease.run_id, "lease received twice; it runs once (its stored report, if any, is sent)");
        report::deliver_stored(node, &lease.lease_id);
    }
    accepted
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
