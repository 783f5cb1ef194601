//! The lease stream: open it once registered, hand every new lease to the
//! queue, reopen with backoff when it breaks.
//!
//! The reference may stream more leases than the node has slots
//! (`max_leases` caps one poll, not concurrency). The node reads (records,
//! acknowledges) no more leases than it has places for in its queue; when
//! the queue is full it stops reading the stream until a place frees up,
//! so HTTP/2 flow control holds the surplus back, unacknowledged, rather
//! than handing leases back:
//! the reference never re-queues a failed run, so a hand-back would fail
//! the run for good. A lease that waited past its deadline is still
//! handed back (retryable) by the dispatcher.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll as TaskPoll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, mpsc, watch};

use super::NodeStats;
use super::lease::AcceptedLease;
use super::report::Reporter;
use super::shutdown::Shutdown;
use support::Backoff;

use crate::control_plane::{LeaseClient, LeaseStream, is_message_too_large};
use crate::outbox::{LeaseKey, Outbox};
use proto::{AckRequest, Lease};

/// A stream that ends sooner than this after opening, with no lease, looks
/// like "unknown node": ask for a heartbeat, which re-registers on a 404.
const SUSPICIOUSLY_SHORT: Duration = Duration::from_secs(1);

/// The pull task's state: the stream's parameters, the leases seen, and
/// where an accepted lease goes next.
pub(super) struct Puller {
    pub(super) node_id: String,
    /// For the hint when the stream cannot be opened.
    pub(super) control_plane_url: String,
    /// `Pull.max_leases`.
    pub(super) max_leases: u32,
    /// The largest lease message decoded (`MaxLeaseMessageBytes`).
    pub(super) max_lease_message_bytes: usize,
    pub(super) leases: LeaseClient,
    /// Where each accepted lease id is recorded before it is queued.
    pub(super) outbox: Outbox,
    pub(super) seen: SeenLeases,
    pub(super) stats: Arc<NodeStats>,
    /// The stream opens only while the control plane has this node.
    pub(super) registered: Arc<watch::Sender<bool>>,
    /// Asks the heartbeat task for a heartbeat now.
    pub(super) heartbeat_now: Arc<Notify>,
    /// Hands back what cannot be queued; sends a stored report again.
    pub(super) reporter: Arc<Reporter>,
    pub(super) shutdown: Shutdown,
}

/// Lease ids this node accepted, the newest few thousand: the control
/// plane may redeliver one (after a reconnect), and a lease must not run
/// twice.
#[derive(Default)]
pub(super) struct SeenLeases {
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

    /// Forgets a lease that was never taken, so it is taken if it comes
    /// again. (Its place in the eviction order stays; evicting an id no
    /// longer held is harmless.)
    fn forget(&mut self, lease_id: &str) {
        self.ids.remove(lease_id);
    }
}

impl Puller {
    pub(super) async fn run(mut self, queue: mpsc::Sender<AcceptedLease>) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
        let mut registered = self.registered.subscribe();
        let mut opened_before = false;
        loop {
            tokio::select! {
                _ = self.shutdown.stopping() => return,
                ready = registered.wait_for(|registered| *registered) => if ready.is_err() { return },
            }
            if opened_before {
                self.stats.lease_stream_reconnects.fetch_add(1, Ordering::Relaxed);
            }
            opened_before = true;
            let opened = Instant::now();
            // An idle Pull gets no headers until the first lease: while it is
            // outstanding and has not failed, the stream counts as connected.
            self.stats.lease_stream_connected.store(true, Ordering::SeqCst);
            let stream = tokio::select! {
                _ = self.shutdown.stopping() => return,
                stream = self.leases.pull(&self.node_id, self.max_leases) => stream,
            };
            match stream {
                Ok(stream) => {
                    let received = self.consume(stream, &queue, &mut backoff).await;
                    if self.shutdown.is_stopping() {
                        return;
                    }
                    if received == 0 && opened.elapsed() < SUSPICIOUSLY_SHORT {
                        self.heartbeat_now.notify_one();
                    }
                }
                Err(err) => {
                    self.stats.lease_stream_errors.fetch_add(1, Ordering::Relaxed);
                    let hint = if self.control_plane_url.starts_with("http://") {
                        " (if the control plane only speaks HTTP/2 over TLS, as the reference's \
                         Kestrel defaults do, use an https:// ControlPlaneUrl)"
                    } else {
                        ""
                    };
                    tracing::warn!(error = %err, "the lease stream could not be opened{hint}");
                }
            }
            self.stats.lease_stream_connected.store(false, Ordering::SeqCst);
            let delay = backoff.next_delay();
            tracing::info!(reopen_in = ?delay, "lease stream closed; reopening");
            tokio::select! {
                _ = self.shutdown.stopping() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Reads leases until the stream ends or the node stops; returns how many
    /// arrived.
    ///
    /// A lease is read only once there is a place for it in the queue: the
    /// places are reserved first, and no more leases are read (so recorded
    /// and acknowledged) than places were free. What the node has no room
    /// for stays unread in the stream, where HTTP/2 flow control holds it
    /// at the control plane, unacknowledged: the plane still has it, and a
    /// lease never waits acknowledged in this node behind a full queue
    /// while its deadline passes.
    async fn consume(
        &mut self,
        mut stream: LeaseStream,
        queue: &mpsc::Sender<AcceptedLease>,
        backoff: &mut Backoff,
    ) -> u64 {
        let mut received = 0;
        loop {
            let Some(mut places) = self.room(queue).await else {
                return received;
            };
            // While the outbox cannot record, the next lease is not read:
            // flow control holds it at the control plane.
            if !self.outbox.is_writable() {
                tokio::select! {
                    _ = self.shutdown.stopping() => return received,
                    _ = self.outbox.writable() => {}
                }
            }
            let mut message = tokio::select! {
                _ = self.shutdown.stopping() => return received,
                message = stream.message() => message,
            };
            // This lease and those already arrived behind it, up to the
            // places reserved, are recorded in the outbox together: one
            // fsync for a burst, not one each.
            let mut leases = Vec::new();
            let ended = loop {
                match message {
                    Ok(Some(lease)) => leases.push(lease),
                    ended => break Some(ended),
                }
                if leases.len() == places.len() {
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
            for accepted in self.accept(leases).await {
                let place = places.pop().expect("no more leases are read than places reserved");
                place.send(accepted);
            }
            // Places left over (a duplicate, a lease refused) go back.
            drop(places);
            match ended {
                None | Some(Ok(Some(_))) => {}
                Some(Ok(None)) => {
                    tracing::info!("the control plane ended the lease stream");
                    return received;
                }
                Some(Err(status)) if is_message_too_large(&status) => {
                    self.too_large(&status);
                    return received;
                }
                Some(Err(status)) => {
                    self.stats.lease_stream_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %status, "the lease stream broke");
                    return received;
                }
            }
        }
    }

    /// Waits for at least one free place in the queue, then takes every
    /// other place free now (up to [`ACCEPT_BATCH`]). None: the node stops.
    async fn room<'q>(&self, queue: &'q mpsc::Sender<AcceptedLease>) -> Option<Vec<mpsc::Permit<'q, AcceptedLease>>> {
        let first = tokio::select! {
            _ = self.shutdown.stopping() => return None,
            place = queue.reserve() => place.ok()?,
        };
        let mut places = vec![first];
        while places.len() < ACCEPT_BATCH {
            match queue.try_reserve() {
                Ok(place) => places.push(place),
                Err(_) => break,
            }
        }
        Some(places)
    }

    /// Records (in the outbox, synced, one commit for all) and acknowledges
    /// new leases. A lease accepted before, by this process or an earlier one,
    /// does not run again, and the report the outbox may hold for it is sent.
    async fn accept(&mut self, leases: Vec<Lease>) -> Vec<AcceptedLease> {
        self.stats
            .leases_received
            .fetch_add(leases.len() as u64, Ordering::Relaxed);
        let (leases, nameless): (Vec<Lease>, Vec<Lease>) =
            leases.into_iter().partition(|lease| !lease.lease_id.is_empty());
        for lease in nameless {
            self.refuse_nameless(&lease);
        }
        let (fresh, seen): (Vec<Lease>, Vec<Lease>) =
            leases.into_iter().partition(|lease| self.seen.insert(&lease.lease_id));
        let received = Instant::now();
        let (recorded, mut again) = self.record(fresh).await;
        again.extend(seen);
        let mut accepted = Vec::with_capacity(recorded.len());
        for lease in recorded {
            let lease = AcceptedLease { lease, received };
            tracing::debug!(lease_id = %lease.lease.lease_id, run_id = %lease.lease.run_id, agent_id = lease.agent_id(), "lease received");
            self.acknowledge(&lease);
            accepted.push(lease);
        }
        for lease in again {
            self.stats.duplicate_leases.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(lease_id = %lease.lease_id, run_id = %lease.run_id, "lease received twice; it runs once (its stored report, if any, is sent)");
            self.reporter.deliver_stored(&lease.lease_id).await;
        }
        accepted
    }

    /// Records fresh leases as accepted: returns those recorded now, and
    /// those the outbox had accepted before (by an earlier life of the node).
    ///
    /// A lease is acknowledged only once it is recorded. While the outbox
    /// cannot record, the leases already read are held here, unacknowledged,
    /// and recorded as soon as it can again; meanwhile the stream is not
    /// read. Under the reference plane's rule (a Fail ends the run for good)
    /// this loses least: running a lease unrecorded would, after a crash,
    /// leave a run the node can neither recognise when it is redelivered
    /// (it runs twice) nor fail at start-up; failing it would end the run;
    /// holding it only makes it wait, and the plane keeps it assigned (and
    /// re-leases it after its TTL if the node dies meanwhile). Should the
    /// node stop before the outbox records again, or a held lease's
    /// deadline pass, it is left to the plane the same way, with a warning.
    async fn record(&mut self, mut fresh: Vec<Lease>) -> (Vec<Lease>, Vec<Lease>) {
        let mut recorded = Vec::with_capacity(fresh.len());
        let mut before = Vec::new();
        // Only for an error that did not stop the outbox recording (its
        // writer thread gone): no hot loop on it either.
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        while !fresh.is_empty() {
            let keys: Vec<LeaseKey> = fresh
                .iter()
                .map(|lease| LeaseKey {
                    lease_id: lease.lease_id.clone(),
                    run_id: lease.run_id.clone(),
                    deadline_unix_ms: lease.deadline_unix_ms,
                })
                .collect();
            let answers = self.outbox.accept_leases(&keys).await;
            let mut unrecorded = Vec::new();
            for (lease, answer) in fresh.into_iter().zip(answers) {
                match answer {
                    Ok(true) => recorded.push(lease),
                    Ok(false) => before.push(lease),
                    Err(_) => unrecorded.push(lease),
                }
            }
            fresh = unrecorded;
            if fresh.is_empty() {
                break;
            }
            // The outbox has logged the fault once; say what waits on it.
            self.stats.outbox_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                count = fresh.len(),
                "holding leases unacknowledged until the outbox can record them"
            );
            let delay = backoff.next_delay();
            tokio::select! {
                _ = self.shutdown.stopping() => {
                    for lease in &fresh {
                        self.seen.forget(&lease.lease_id);
                        tracing::warn!(lease_id = %lease.lease_id, run_id = %lease.run_id, "stopping with a lease the outbox could not record: it was not acknowledged and did not run; the control plane keeps it assigned and re-leases it after its TTL");
                    }
                    break;
                }
                _ = async {
                    if self.outbox.is_writable() {
                        tokio::time::sleep(delay).await;
                    } else {
                        self.outbox.writable().await;
                    }
                } => {}
            }
            // One whose deadline passed meanwhile is not taken now: failing
            // it would end the run for good, and the plane re-leases it.
            let now = crate::outbox::now_unix_ms();
            fresh.retain(|lease| {
                let expired = lease.deadline_unix_ms > 0 && lease.deadline_unix_ms <= now;
                if expired {
                    self.seen.forget(&lease.lease_id);
                    tracing::warn!(lease_id = %lease.lease_id, run_id = %lease.run_id, "the lease's deadline passed while the outbox could not record it: not acknowledged, not run, left to the control plane to re-lease");
                }
                !expired
            });
        }
        (recorded, before)
    }

    /// A lease message larger than the node decodes breaks the stream
    /// (gRPC cannot skip one message), and, undecoded, it names no lease:
    /// the node cannot acknowledge, run or fail it. So it says so loudly,
    /// with the size and the setting to raise, counts it, and reopens the
    /// stream after the usual back-off; the other leases are served. The
    /// control plane keeps that run assigned until its lease expires (and
    /// may send it again, to break the stream again, until the setting is
    /// raised).
    fn too_large(&self, status: &tonic::Status) {
        self.stats.lease_stream_errors.fetch_add(1, Ordering::Relaxed);
        self.stats.lease_messages_too_large.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            error = %status.message(),
            limit_bytes = self.max_lease_message_bytes,
            "a lease larger than NodeRuntime.MaxLeaseMessageBytes ({} bytes) broke the lease stream: \
             the node cannot decode it, so it cannot tell which lease it was, nor acknowledge, \
             run or fail it; the control plane keeps that run until its lease expires. Raise \
             NodeRuntime.MaxLeaseMessageBytes (NodeRuntime__MaxLeaseMessageBytes) above the size found",
            self.max_lease_message_bytes
        );
    }

    /// A lease without a lease id cannot be acknowledged, completed or
    /// failed: each of those names the lease, and the control plane
    /// refuses an empty one. So it is not run (its outcome could never be
    /// reported) and nothing is sent; the control plane keeps the run
    /// assigned until its lease expires. It is logged with what identifies
    /// it, and counted.
    fn refuse_nameless(&self, lease: &Lease) {
        self.stats.leases_without_id.fetch_add(1, Ordering::Relaxed);
        let agent_id = lease.run_spec.as_ref().map_or("", |spec| spec.agent_id.as_str());
        tracing::error!(
            run_id = %lease.run_id,
            agent_id,
            "the control plane sent a lease with an empty lease id: it cannot be acknowledged or \
             failed (both name the lease), so the node does not run it; the control plane keeps \
             the run assigned until its lease expires (fix the control plane)"
        );
    }

    /// Acks off the stream's path, so a slow Ack never delays the next lease.
    fn acknowledge(&self, accepted: &AcceptedLease) {
        let request = AckRequest {
            lease_id: accepted.lease.lease_id.clone(),
            node_id: self.node_id.clone(),
            ack_timestamp_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        };
        let (leases, stats) = (self.leases.clone(), self.stats.clone());
        tokio::spawn(async move {
            match leases.ack(request.clone()).await {
                Ok((true, _)) => {
                    stats.leases_acknowledged.fetch_add(1, Ordering::Relaxed);
                }
                Ok((false, message)) => {
                    tracing::warn!(lease_id = %request.lease_id, %message, "the control plane refused the Ack")
                }
                Err(err) => tracing::warn!(lease_id = %request.lease_id, error = %err, "Ack failed"),
            }
        });
    }
}

/// Leases accepted with one outbox commit at most: what has already
/// arrived when the first of them is read, up to this many.
const ACCEPT_BATCH: usize = 256;

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
