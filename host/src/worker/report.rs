//! Delivering the one Complete or Fail of each lease.
//!
//! A report is retried with backoff until the control plane answers. Any
//! answer ends it: `success=false` means the control plane will never take
//! it (unknown run, run held by another node, a stale lease), and sending
//! it again cannot help. Reports are tracked so shutdown waits for them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Node;
use super::lease::{AcceptedLease, Report, Timings};
use crate::control_plane::Backoff;
use crate::sandbox::{RunOutcome, RunFailure, RunReport};

/// Fails a lease that never ran, handing it back to the control plane.
pub(super) fn hand_back(node: &Arc<Node>, accepted: &AcceptedLease, failure: RunFailure) {
    tracing::warn!(lease_id = %accepted.lease.lease_id, run_id = %accepted.lease.run_id, reason = %failure.message, "handing the lease back");
    let timings = Timings {
        received: accepted.received,
        started: None,
        finished: Instant::now(),
    };
    let report = Report::build(
        accepted,
        &node.settings.node_id,
        &RunOutcome::Failed(failure),
        &RunReport::default(),
        timings,
    );
    deliver(node, report);
}

/// Sends `report` in the background, retrying until answered.
pub(super) fn deliver(node: &Arc<Node>, report: Report) {
    let node = node.clone();
    node.reports.clone().spawn(async move {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        loop {
            let answer = match &report {
                Report::Complete(request) => node
                    .leases
                    .complete(request.clone())
                    .await
                    .map(|response| (response.success, response.message)),
                Report::Fail(request) => node
                    .leases
                    .fail(request.clone())
                    .await
                    .map(|response| (response.success, response.message)),
            };
            match answer {
                Ok((true, _)) => {
                    node.stats.reports_delivered.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok((false, message)) => {
                    tracing::error!(lease_id = report.lease_id(), %message, "the control plane refused the report; it will not be sent again");
                    return;
                }
                Err(err) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(lease_id = report.lease_id(), error = %err, retry_in = ?delay, "report not delivered");
                    tokio::select! {
                        _ = node.give_up.cancelled() => {
                            tracing::error!(lease_id = report.lease_id(), "giving up on the report at exit");
                            return;
                        }
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    });
}
