//! How a node stops: one value, created once and cloned into every task,
//! with the three stages a stop goes through, each named for what it asks.
//!
//! 1. stop taking leases: pulling ends, the queue is handed back, the
//!    heartbeat says `draining`, running leases get the drain timeout;
//! 2. abort the runs: the drain timeout passed, so what still runs is
//!    handed back;
//! 3. give up delivering: the report flush timed out, so undelivered
//!    reports stay in the outbox for the next start.
//!
//! Each stage is a [`CancellationToken`]; a task waits on the stage it
//! cares about in its `select!`.

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// The node's shutdown stages. Cloning shares them.
#[derive(Debug, Clone, Default)]
pub(super) struct Shutdown {
    stop: CancellationToken,
    abort: CancellationToken,
    /// Cancelled when undelivered reports must be abandoned, at exit.
    give_up: CancellationToken,
    /// Cancelled once the heartbeat has tried to say `draining`: the node
    /// does not exit before that attempt ends.
    draining_said: CancellationToken,
}

impl Shutdown {
    /// Stage 1: no new leases; drain.
    pub(super) fn stop_taking_leases(&self) {
        self.stop.cancel();
    }

    /// Whether stage 1 began.
    pub(super) fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Completes once stage 1 began.
    pub(super) fn stopping(&self) -> WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }

    /// The token that starts stage 1 when cancelled, for whoever outside
    /// the worker may stop the node (a signal handler, a certificate
    /// watcher that should end with it).
    pub(super) fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Stage 2: the drain timeout passed; hand back what still runs.
    pub(super) fn abort_runs(&self) {
        self.abort.cancel();
    }

    /// Completes once stage 2 began.
    pub(super) fn runs_aborted(&self) -> WaitForCancellationFuture<'_> {
        self.abort.cancelled()
    }

    /// Stage 3: stop retrying reports; they stay in the outbox.
    pub(super) fn give_up_delivering(&self) {
        self.give_up.cancel();
    }

    /// Completes once stage 3 began.
    pub(super) fn delivery_given_up(&self) -> WaitForCancellationFuture<'_> {
        self.give_up.cancelled()
    }

    /// The heartbeat has tried once to tell the plane the node drains.
    pub(super) fn draining_said(&self) {
        self.draining_said.cancel();
    }

    /// Completes once the heartbeat tried to say `draining`.
    pub(super) fn draining_was_said(&self) -> WaitForCancellationFuture<'_> {
        self.draining_said.cancelled()
    }
}
