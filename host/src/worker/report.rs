//! Delivering the one Complete or Fail of each lease.
//!
//! A report is retried with backoff until the control plane answers. Any
//! answer ends it: `success=false` means the control plane will never take
//! it (unknown run, run held by another node, a stale lease), and sending
//! it again cannot help. Reports are tracked so shutdown waits for them.
//!
//! Each report is written to the outbox (synced) before the first attempt
//! and removed only after the answer; one the node could not deliver
//! before exit, or before a crash, is sent on the next start.
//!
//! The [`Reporter`] is the one service the pull and dispatch tasks share:
//! it owns what delivering needs. [`Delivery::send`] is the one way a
//! Complete or Fail goes out, for the worker and for
//! `node-runtime outbox retry` alike.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, watch};
use tokio_util::task::TaskTracker;

use super::NodeStats;
use super::lease::{AcceptedLease, Report, Timings};
use super::shutdown::Shutdown;
use crate::control_plane::{LeaseClient, LeaseClientError};
use crate::outbox::{self, Outbox};
use crate::sandbox::{RunFailure, RunOutcome, RunReport};
use crate::telemetry::{FinishedRun, NodeMetrics};
use support::Backoff;
use tracing::Instrument;

/// A report on its way to the control plane, with the rule every sender
/// follows: a report the plane refuses for its size is shrunk and sent
/// once more; refused again, it is dropped: waiting cannot make it smaller.
#[derive(Debug)]
pub struct Delivery {
    report: Report,
    shrunk: bool,
}

/// What one [`Delivery::send`] came to.
#[derive(Debug)]
pub enum Sent {
    /// The control plane took the report.
    Delivered,
    /// The control plane answered `success=false`, with this message: it
    /// will never take the report.
    Refused(String),
    /// Refused for its size (`size` bytes); the report is shrunk now
    /// ([`Delivery::report`]) and should be sent once more, at once.
    Shrunk { error: LeaseClientError, size: usize },
    /// Refused for its size, shrunk too: it will never be taken.
    TooLarge(LeaseClientError),
    /// No answer: sending it again later may succeed.
    Failed(LeaseClientError),
}

impl Delivery {
    pub fn new(report: Report) -> Delivery {
        Delivery { report, shrunk: false }
    }

    /// The report as it is sent next (shrunk after [`Sent::Shrunk`]).
    pub fn report(&self) -> &Report {
        &self.report
    }

    /// Sends the report once. [`Sent::Shrunk`] happens at most once per
    /// delivery, so a loop that sends again on it ends.
    pub async fn send(&mut self, client: &LeaseClient) -> Sent {
        match client.send_report(&self.report).await {
            Ok((true, _)) => Sent::Delivered,
            Ok((false, message)) => Sent::Refused(message),
            Err(error) if error.refused_for_size() && !self.shrunk => {
                let size = self.report.encoded_len();
                self.report = self.report.shrunk();
                self.shrunk = true;
                Sent::Shrunk { error, size }
            }
            Err(error) if error.refused_for_size() => Sent::TooLarge(error),
            Err(error) => Sent::Failed(error),
        }
    }
}

/// Delivers reports: what pull and dispatch hand it, and what the outbox
/// still holds at start. Shared (in an `Arc`) by the tasks that report.
pub(super) struct Reporter {
    /// This node's id, for the reports it builds.
    pub(super) node_id: String,
    pub(super) leases: LeaseClient,
    pub(super) outbox: Outbox,
    /// Lease ids whose report a task is delivering right now. An async
    /// lock: [`Reporter::deliver_stored`] holds it across the outbox read,
    /// so a stored copy cannot be sent by two tasks.
    pub(super) delivering: Mutex<HashSet<String>>,
    /// The delivery tasks: shutdown waits for them.
    pub(super) tasks: TaskTracker,
    pub(super) stats: Arc<NodeStats>,
    pub(super) metrics: Arc<NodeMetrics>,
    pub(super) shutdown: Shutdown,
}

impl Reporter {
    /// Fails a lease that never ran, handing it back to the control plane.
    pub(super) async fn hand_back(self: &Arc<Self>, accepted: &AcceptedLease, failure: RunFailure) {
        tracing::warn!(lease_id = %accepted.lease.lease_id, run_id = %accepted.lease.run_id, reason = %failure.message, "handing the lease back");
        let timings = Timings {
            received: accepted.received,
            started: None,
            finished: Instant::now(),
        };
        self.metrics.run_finished(&FinishedRun {
            agent_id: accepted.agent_id(),
            fail_kind: Some(failure.kind.as_str()),
            executed: false,
            processing: timings.finished - timings.received,
            ..FinishedRun::default()
        });
        let report = Report::build(
            accepted,
            &self.node_id,
            &RunOutcome::Failed(failure),
            &RunReport::default(),
            timings,
        );
        self.deliver(report, accepted.lease.deadline_unix_ms, None).await;
    }

    /// Stores `report` in the outbox (synced), then sends it in the
    /// background, retrying until answered; returns once it is stored (or
    /// the outbox could not store it). `deadline_unix_ms` is its lease's;
    /// `lease_span`, when given, is the parent of the delivery's span.
    pub(super) async fn deliver(
        self: &Arc<Self>,
        report: Report,
        deadline_unix_ms: i64,
        lease_span: Option<&tracing::Span>,
    ) {
        let lease_id = report.lease_id().to_string();
        if !self.mark_delivering(&lease_id).await {
            tracing::warn!(%lease_id, "a report for this lease is being delivered already");
            return;
        }
        let kind = match &report {
            Report::Complete(_) => "Complete",
            Report::Fail(_) => "Fail",
        };
        let span = match lease_span {
            Some(parent) => {
                tracing::info_span!(parent: parent, "report", "report.kind" = kind, "report.attempts" = tracing::field::Empty)
            }
            None => {
                tracing::info_span!("report", "lease.id" = %lease_id, "report.kind" = kind, "report.attempts" = tracing::field::Empty)
            }
        };
        // Recorded before this returns, sent in the background: the caller
        // keeps its run's slot until the report is on disk (or the outbox
        // refused it), so a node whose recording lags takes no more leases
        // meanwhile, and a crash never finds a finished run without its
        // report (it would be failed as interrupted at the next start).
        let written = outbox::now_unix_ms();
        let recorded = self.record(&report, deadline_unix_ms).instrument(span.clone()).await;
        if !recorded {
            span.in_scope(|| tracing::warn!(%lease_id, "the outbox cannot record this report: it waits, unsent, until the outbox records again (sent unrecorded, it could be followed by a second outcome: a start that finds the lease with no report fails it as interrupted)"));
        }
        let reporter = self.clone();
        let delivery = async move {
            reporter.send(report, deadline_unix_ms, written, recorded).await;
        }
        .instrument(span);
        // Its lines carry the lease's ids: stderr names the spans entered
        // on the thread that it takes, and it does not take `report` (nor
        // is `report` built while no collector takes it), so the lease's
        // span is entered around it.
        match lease_span {
            Some(lease_span) => self.tasks.spawn(delivery.instrument(lease_span.clone())),
            None => self.tasks.spawn(delivery),
        };
    }

    /// Stores a report; false when the outbox could not.
    async fn record(&self, report: &Report, deadline_unix_ms: i64) -> bool {
        match self.outbox.put_async(report, deadline_unix_ms).await {
            Ok(dropped) => {
                for dropped in dropped {
                    self.stats.reports_overflowed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(lease_id = %dropped, max_reports = self.outbox.limits().max_reports, "the outbox is full: dropped its oldest report; the control plane will re-lease that run");
                }
                true
            }
            Err(_) => {
                // The outbox logs the fault once per episode.
                self.stats.outbox_errors.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// At start-up, before any lease is read: each lease the outbox
    /// recorded as accepted that has no report was running (or queued)
    /// when the node died. It is failed now, retryable, `node.unavailable`,
    /// through the outbox like any report (so a second crash does not lose
    /// the Fail; it is sent once registered), rather than left to a control
    /// plane that may never re-lease it. The run may have had effects before the node died; a
    /// Fail says it did not finish, which is true.
    pub(super) async fn fail_interrupted(self: &Arc<Self>) {
        let interrupted = match self.outbox.in_flight_async().await {
            Ok(interrupted) => interrupted,
            Err(err) => return self.outbox_error("", &err),
        };
        if !interrupted.is_empty() {
            tracing::warn!(
                count = interrupted.len(),
                "failing the leases that were running when the node stopped without finishing them"
            );
        }
        for key in interrupted {
            let accepted = AcceptedLease {
                lease: proto::Lease {
                    lease_id: key.lease_id,
                    run_id: key.run_id,
                    deadline_unix_ms: key.deadline_unix_ms,
                    ..proto::Lease::default()
                },
                received: Instant::now(),
            };
            self.stats.leases_interrupted.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(lease_id = %accepted.lease.lease_id, run_id = %accepted.lease.run_id, "failing a lease that was in flight when the node stopped (retryable, node.unavailable)");
            let now = Instant::now();
            let report = Report::build(
                &accepted,
                &self.node_id,
                &RunOutcome::Failed(RunFailure::handed_back(INTERRUPTED)),
                &RunReport::default(),
                Timings {
                    received: now,
                    started: None,
                    finished: now,
                },
            );
            // Stored only: `recover` sends it with the rest of the outbox
            // once the node is registered.
            self.record(&report, key.deadline_unix_ms).await;
        }
    }

    /// Sends the report the outbox holds for `lease_id`, unless a task
    /// delivers it already or it is gone.
    pub(super) async fn deliver_stored(self: &Arc<Self>, lease_id: &str) {
        let mut delivering = self.delivering.lock().await;
        if delivering.contains(lease_id) {
            return;
        }
        let stored = match self.outbox.get_async(lease_id).await {
            Ok(Some(stored)) => stored,
            Ok(None) => return,
            Err(err) => {
                self.outbox_error(lease_id, &err);
                return;
            }
        };
        delivering.insert(lease_id.to_string());
        drop(delivering);
        tracing::info!(%lease_id, kind = stored.kind(), "sending the report the outbox holds");
        let reporter = self.clone();
        self.tasks.spawn(async move {
            reporter
                .send(stored.report, stored.deadline_unix_ms, stored.written_unix_ms, true)
                .await;
        });
    }

    /// At start: drops what expired, then, once registered, delivers every
    /// report still in the outbox; then prunes accepted ids now and then.
    pub(super) async fn recover(self: Arc<Self>, registered: Arc<watch::Sender<bool>>) {
        match self.outbox.prune_async(outbox::now_unix_ms()).await {
            Ok(pruned) => {
                for lease_id in &pruned.expired_reports {
                    self.expired(lease_id);
                }
                if pruned.expired_accepted > 0 {
                    tracing::info!(count = pruned.expired_accepted, "pruned expired accepted lease ids");
                }
            }
            Err(err) => self.outbox_error("", &err),
        }
        let mut registered = registered.subscribe();
        tokio::select! {
            // Stopped before registering: the backlog stays for the next start.
            _ = self.shutdown.stopping() => return,
            ready = registered.wait_for(|registered| *registered) => if ready.is_err() { return },
        }
        let pending = match self.outbox.pending_async().await {
            Ok(pending) => pending,
            Err(err) => return self.outbox_error("", &err),
        };
        if !pending.is_empty() {
            tracing::info!(count = pending.len(), "delivering the reports left in the outbox");
        }
        for stored in pending {
            self.stats.reports_recovered.fetch_add(1, Ordering::Relaxed);
            self.deliver_stored(stored.lease_id()).await;
        }
        // While the node runs, expired accepted ids keep being pruned; pending
        // reports expire in their delivery tasks.
        loop {
            tokio::select! {
                _ = self.shutdown.stopping() => return,
                _ = tokio::time::sleep(PRUNE_EVERY) => {}
            }
            match self.outbox.prune_accepted_async(outbox::now_unix_ms()).await {
                Ok(0) => {}
                Ok(count) => tracing::debug!(count, "pruned expired accepted lease ids"),
                Err(err) => self.outbox_error("", &err),
            }
        }
    }

    /// Removes an answered (or expired) report, and with it the lease's
    /// in-flight mark. A removal refused is tried again (once the outbox
    /// records again, or after a pause while it says it does) until it is
    /// done or the node gives up delivering at exit, so that the next start
    /// does not send the report again. Whether the outbox records when the
    /// refusal arrives does not tell what refused it: the writer may have
    /// reopened the file since the commit that failed (such a refusal was
    /// once dropped as a lasting error, and the report sent again after a
    /// restart).
    async fn forget(&self, lease_id: &str) {
        let mut retry = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            let Err(err) = self.outbox.remove_async(lease_id).await else {
                return;
            };
            let pause = if self.outbox.is_writable() {
                self.outbox_error(lease_id, &err);
                Some(retry.next_delay())
            } else {
                None
            };
            let ready = async {
                match pause {
                    Some(pause) => tokio::time::sleep(pause).await,
                    None => self.outbox.writable().await,
                }
            };
            tokio::select! {
                _ = self.shutdown.delivery_given_up() => {
                    tracing::warn!(%lease_id, "exiting before the outbox could record that this lease's report was answered; the next start sends the stored report again, a repeat of the same outcome");
                    return;
                }
                () = ready => {}
            }
        }
    }

    async fn mark_delivering(&self, lease_id: &str) -> bool {
        self.delivering.lock().await.insert(lease_id.to_string())
    }

    fn outbox_error(&self, lease_id: &str, err: &dyn std::fmt::Display) {
        self.stats.outbox_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(%lease_id, error = %err, "outbox read or write failed");
    }

    fn expired(&self, lease_id: &str) {
        self.stats.reports_expired.fetch_add(1, Ordering::Relaxed);
        tracing::error!(%lease_id, grace = ?self.outbox.limits().grace, "dropping a report whose lease deadline plus the grace period has passed; the control plane will have re-leased the run");
    }

    /// Sends until the control plane answers, then removes the report from
    /// the outbox. At exit (`give_up`) it stays there, for the next start. A
    /// report the plane refuses for its size is shrunk and sent once more;
    /// refused again, it is dropped: waiting cannot make it smaller.
    ///
    /// A report the outbox could not record (`recorded` false) is not sent
    /// until the outbox has recorded either the report or, when the report
    /// will not fit (over [`RECORD_WHOLE_UP_TO`], or refused once more
    /// after a reopen), that the lease is answered: its in-flight mark
    /// removed, a small write. Sent with neither, it could reach the plane
    /// and then, should the node stop before the outbox records again, be
    /// followed by the Fail a start sends for a lease still marked in
    /// flight: two outcomes, the second overwriting the first. Sent after
    /// the mark alone, it is lost if the node dies before the plane has
    /// it: no outcome from this node, and the plane re-leases the run.
    async fn send(&self, report: Report, deadline_unix_ms: i64, written_unix_ms: i64, recorded: bool) {
        let lease_id = report.lease_id().to_string();
        let mut delivery = Delivery::new(report);
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut attempts = 0u32;
        let held = if recorded {
            Held::Recorded
        } else {
            self.hold(&lease_id, delivery.report(), deadline_unix_ms, written_unix_ms)
                .await
        };
        let remove = match held {
            Held::Expired => true,
            Held::GivenUp => false,
            Held::Recorded | Held::Marked => loop {
                if self
                    .outbox
                    .expired(deadline_unix_ms, written_unix_ms, outbox::now_unix_ms())
                {
                    self.expired(&lease_id);
                    break true;
                }
                attempts += 1;
                match delivery.send(&self.leases).await {
                    Sent::Delivered => {
                        self.stats.reports_delivered.fetch_add(1, Ordering::Relaxed);
                        break true;
                    }
                    Sent::Refused(message) => {
                        tracing::error!(%lease_id, %message, "the control plane refused the report; it will not be sent again");
                        break true;
                    }
                    Sent::Shrunk { error, size } => {
                        let report = delivery.report();
                        tracing::error!(%lease_id, error = %error, size, shrunk_to = report.encoded_len(), "the control plane refused the report for its size; sending it once more without its details");
                        // Replaces the stored copy (same lease): nothing overflows.
                        if let Err(err) = self.outbox.put_async(report, deadline_unix_ms).await {
                            self.outbox_error(&lease_id, &err);
                        }
                    }
                    Sent::TooLarge(err) => {
                        self.stats.reports_refused_for_size.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(%lease_id, error = %err, size = delivery.report().encoded_len(), "the control plane refused the shrunk report for its size too; it will not be sent again, and the plane will re-lease the run after its lease expires");
                        break true;
                    }
                    Sent::Failed(err) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(%lease_id, attempt = attempts, error = %err, retry_in = ?delay, "report not delivered");
                        tokio::select! {
                            _ = self.shutdown.delivery_given_up() => {
                                if held == Held::Recorded {
                                    tracing::error!(%lease_id, "report not delivered before exit; it stays in the outbox for the next start");
                                } else {
                                    tracing::error!(%lease_id, "report not delivered before exit, and the outbox could not record it: this node reports nothing more for the lease, which the control plane re-leases");
                                }
                                break false;
                            }
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            },
        };
        // Once: a log formatter appends each recording of a field to the
        // span's line, so one per attempt would repeat it.
        tracing::Span::current().record("report.attempts", attempts);
        if remove {
            self.forget(&lease_id).await;
        }
        // Only now: a stored copy is gone before another task may look for it.
        self.delivering.lock().await.remove(&lease_id);
    }

    /// Holds a report the outbox could not record until the outbox has
    /// recorded it, or the mark of its lease answered (see
    /// [`Reporter::send`]); or until it expires, or the node gives up
    /// delivering at exit.
    async fn hold(&self, lease_id: &str, report: &Report, deadline_unix_ms: i64, written_unix_ms: i64) -> Held {
        let mut record_whole = report.encoded_len() <= RECORD_WHOLE_UP_TO;
        let mut recording = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            let now = outbox::now_unix_ms();
            if self.outbox.expired(deadline_unix_ms, written_unix_ms, now) {
                self.expired(lease_id);
                return Held::Expired;
            }
            let writable = self.outbox.is_writable();
            if writable && record_whole {
                if self.record(report, deadline_unix_ms).await {
                    return Held::Recorded;
                }
                // Refused again with the room a reopen proved: the next
                // try writes the mark alone.
                record_whole = false;
            } else if writable && self.outbox.remove_async(lease_id).await.is_ok() {
                tracing::warn!(%lease_id, size = report.encoded_len(), "the report does not fit in the room the outbox has: the lease is marked answered and the report sent from memory (should the node stop before the plane has it, this node reports nothing for the lease)");
                return Held::Marked;
            }
            // A write refused while the outbox said it records (it fails
            // now and then) is not tried again at once.
            let pause = if writable {
                recording.next_delay()
            } else {
                Duration::ZERO
            };
            tokio::select! {
                _ = self.shutdown.delivery_given_up() => {
                    tracing::error!(%lease_id, "exiting before the outbox could record this report, which was therefore not sent; the next start fails the lease (retryable) as interrupted, its one outcome");
                    return Held::GivenUp;
                }
                _ = tokio::time::sleep(self.outbox.expires_in(deadline_unix_ms, written_unix_ms, now)) => {}
                _ = async {
                    tokio::time::sleep(pause).await;
                    self.outbox.writable().await;
                } => {}
            }
        }
    }
}

/// Where [`Reporter::hold`] left a report the outbox could not record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Recorded (or recorded from the start): sent as any report.
    Recorded,
    /// Its lease marked answered: sent from memory.
    Marked,
    /// Past its lease's deadline plus the grace: dropped.
    Expired,
    /// The node exits: not sent.
    GivenUp,
}

/// The largest report tried again whole once the outbox records after a
/// fault; a larger one gets the small mark at once (see
/// [`Reporter::send`]): the reopen proves room for 256 KiB, and a failed
/// write starts the fault over for every write that shares its commit.
const RECORD_WHOLE_UP_TO: usize = 64 * 1024;

/// The message of the Fail a lease gets when the node died while it ran.
pub(super) const INTERRUPTED: &str = "the node restarted during this lease";

/// How often a running node prunes expired accepted lease ids.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
