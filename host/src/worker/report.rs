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

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use support::sync::lock;

use super::Node;
use super::lease::{AcceptedLease, Report, Timings};
use crate::outbox;
use crate::sandbox::{RunFailure, RunOutcome, RunReport};
use crate::telemetry::FinishedRun;
use support::Backoff;
use tracing::Instrument;

/// Fails a lease that never ran, handing it back to the control plane.
pub(super) fn hand_back(node: &Arc<Node>, accepted: &AcceptedLease, failure: RunFailure) {
    tracing::warn!(lease_id = %accepted.lease.lease_id, run_id = %accepted.lease.run_id, reason = %failure.message, "handing the lease back");
    let timings = Timings {
        received: accepted.received,
        started: None,
        finished: Instant::now(),
    };
    node.metrics.run_finished(&FinishedRun {
        agent_id: accepted.agent_id(),
        fail_kind: Some(failure.kind.as_str()),
        executed: false,
        processing: timings.finished - timings.received,
        ..FinishedRun::default()
    });
    let report = Report::build(
        accepted,
        &node.settings.node_id,
        &RunOutcome::Failed(failure),
        &RunReport::default(),
        timings,
    );
    deliver(node, report, accepted.lease.deadline_unix_ms, None);
}

/// Stores `report` in the outbox (synced), then sends it in the
/// background, retrying until answered. `deadline_unix_ms` is its lease's;
/// `lease_span`, when given, is the parent of the delivery's span.
pub(super) fn deliver(node: &Arc<Node>, report: Report, deadline_unix_ms: i64, lease_span: Option<&tracing::Span>) {
    let lease_id = report.lease_id().to_string();
    if !mark_delivering(node, &lease_id) {
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
    let node = node.clone();
    node.reports.clone().spawn(async move {
        let written = outbox::now_unix_ms();
        match node.outbox.put_async(&report, deadline_unix_ms).await {
            Ok(dropped) => {
                for dropped in dropped {
                    node.stats.reports_overflowed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(lease_id = %dropped, max_reports = node.outbox.limits().max_reports, "the outbox is full: dropped its oldest report; the control plane will re-lease that run");
                }
            }
            Err(err) => outbox_error(&node, &lease_id, &err),
        }
        send(&node, report, deadline_unix_ms, written).await;
    }.instrument(span));
}

/// Sends the report the outbox holds for `lease_id`, unless a task
/// delivers it already or it is gone.
pub(super) fn deliver_stored(node: &Arc<Node>, lease_id: &str) {
    let mut delivering = lock(&node.delivering);
    if delivering.contains(lease_id) {
        return;
    }
    let stored = match node.outbox.get(lease_id) {
        Ok(Some(stored)) => stored,
        Ok(None) => return,
        Err(err) => {
            outbox_error(node, lease_id, &err);
            return;
        }
    };
    delivering.insert(lease_id.to_string());
    drop(delivering);
    tracing::info!(%lease_id, kind = stored.kind(), "sending the report the outbox holds");
    let node = node.clone();
    node.reports.clone().spawn(async move {
        send(&node, stored.report, stored.deadline_unix_ms, stored.written_unix_ms).await;
    });
}

/// At start: drops what expired, then, once registered, delivers every
/// report still in the outbox; then prunes accepted ids now and then.
pub(super) async fn recover(node: Arc<Node>) {
    let outbox = node.outbox.clone();
    match tokio::task::spawn_blocking(move || outbox.prune(outbox::now_unix_ms())).await {
        Ok(Ok(pruned)) => {
            for lease_id in &pruned.expired_reports {
                expired(&node, lease_id);
            }
            if pruned.expired_accepted > 0 {
                tracing::info!(count = pruned.expired_accepted, "pruned expired accepted lease ids");
            }
        }
        Ok(Err(err)) => outbox_error(&node, "", &err),
        Err(err) => outbox_error(&node, "", &err),
    }
    let mut registered = node.registered.subscribe();
    tokio::select! {
        // Stopped before registering: the backlog stays for the next start.
        _ = node.stop.cancelled() => return,
        ready = registered.wait_for(|registered| *registered) => if ready.is_err() { return },
    }
    let outbox = node.outbox.clone();
    let pending = match tokio::task::spawn_blocking(move || outbox.pending()).await {
        Ok(Ok(pending)) => pending,
        Ok(Err(err)) => return outbox_error(&node, "", &err),
        Err(err) => return outbox_error(&node, "", &err),
    };
    if !pending.is_empty() {
        tracing::info!(count = pending.len(), "delivering the reports left in the outbox");
    }
    for stored in pending {
        node.stats.reports_recovered.fetch_add(1, Ordering::Relaxed);
        deliver_stored(&node, stored.lease_id());
    }
    // While the node runs, expired accepted ids keep being pruned; pending
    // reports expire in their delivery tasks.
    loop {
        tokio::select! {
            _ = node.stop.cancelled() => return,
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
        }
        let outbox = node.outbox.clone();
        match tokio::task::spawn_blocking(move || outbox.prune_accepted(outbox::now_unix_ms())).await {
            Ok(Ok(0)) => {}
            Ok(Ok(count)) => tracing::debug!(count, "pruned expired accepted lease ids"),
            Ok(Err(err)) => outbox_error(&node, "", &err),
            Err(err) => outbox_error(&node, "", &err),
        }
    }
}

/// How often a running node prunes expired accepted lease ids.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

fn mark_delivering(node: &Node, lease_id: &str) -> bool {
    lock(&node.delivering).insert(lease_id.to_string())
}

fn outbox_error(node: &Node, lease_id: &str, err: &dyn std::fmt::Display) {
    node.stats.outbox_errors.fetch_add(1, Ordering::Relaxed);
    tracing::error!(%lease_id, error = %err, "outbox read or write failed");
}

fn expired(node: &Node, lease_id: &str) {
    node.stats.reports_expired.fetch_add(1, Ordering::Relaxed);
    tracing::error!(%lease_id, grace = ?node.outbox.limits().grace, "dropping a report whose lease deadline plus the grace period has passed; the control plane will have re-leased the run");
}

/// Sends until the control plane answers, then removes the report from
/// the outbox. At exit (`give_up`) it stays there, for the next start. A
/// report the plane refuses for its size is shrunk and sent once more;
/// refused again, it is dropped: waiting cannot make it smaller.
async fn send(node: &Arc<Node>, mut report: Report, deadline_unix_ms: i64, written_unix_ms: i64) {
    let lease_id = report.lease_id().to_string();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let mut attempts = 0u32;
    let mut shrunk = false;
    let remove = loop {
        attempts += 1;
        tracing::Span::current().record("report.attempts", attempts);
        if node
            .outbox
            .expired(deadline_unix_ms, written_unix_ms, outbox::now_unix_ms())
        {
            expired(node, &lease_id);
            break true;
        }
        let answer = node.leases.send_report(&report).await;
        match answer {
            Ok((true, _)) => {
                node.stats.reports_delivered.fetch_add(1, Ordering::Relaxed);
                break true;
            }
            Ok((false, message)) => {
                tracing::error!(%lease_id, %message, "the control plane refused the report; it will not be sent again");
                break true;
            }
            Err(err) if err.refused_for_size() && !shrunk => {
                let size = report.encoded_len();
                report = report.shrunk();
                shrunk = true;
                tracing::error!(%lease_id, error = %err, size, shrunk_to = report.encoded_len(), "the control plane refused the report for its size; sending it once more without its details");
                // Replaces the stored copy (same lease): nothing overflows.
                if let Err(err) = node.outbox.put_async(&report, deadline_unix_ms).await {
                    outbox_error(node, &lease_id, &err);
                }
            }
            Err(err) if err.refused_for_size() => {
                node.stats.reports_refused_for_size.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%lease_id, error = %err, size = report.encoded_len(), "the control plane refused the shrunk report for its size too; it will not be sent again, and the plane will re-lease the run after its lease expires");
                break true;
            }
            Err(err) => {
                let delay = backoff.next_delay();
                tracing::warn!(%lease_id, error = %err, retry_in = ?delay, "report not delivered");
                tokio::select! {
                    _ = node.give_up.cancelled() => {
                        tracing::error!(%lease_id, "report not delivered before exit; it stays in the outbox for the next start");
                        break false;
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    if remove && let Err(err) = node.outbox.remove_async(&lease_id).await {
        outbox_error(node, &lease_id, &err);
    }
    // Only now: a stored copy is gone before another task may look for it.
    lock(&node.delivering).remove(&lease_id);
}
