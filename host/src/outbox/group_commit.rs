//! Group commit: the writes of concurrent runs share one transaction and
//! one fsync.
//!
//! Every accepted lease and every report must be on disk before the node
//! acts on it, and an fsync costs about a millisecond here: one per write
//! would cap the node near a thousand writes a second whatever its slot
//! count. Instead, a caller queues its write and either finds a commit
//! under way (then it waits: the next commit takes its write along) or
//! becomes the writer itself, takes everything queued so far, and commits
//! it as one transaction. The queue never waits for company: a lone write
//! commits at once, so an idle node pays no latency for the batching.
//!
//! Each write keeps its own answer (a lease already accepted, the reports
//! dropped to stay in bounds), exactly as if it had committed alone and in
//! queue order. A transaction that fails fails every write in it.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};

/// One queued write.
#[derive(Debug)]
pub(super) enum Write {
    Accept {
        lease_id: String,
        deadline_unix_ms: i64,
    },
    Put {
        lease_id: String,
        value: Vec<u8>,
    },
    Remove {
        lease_id: String,
    },
}

/// What a write found.
#[derive(Debug)]
pub(super) enum Written {
    /// False: the lease had been accepted before.
    Accepted(bool),
    /// Lease ids of the oldest reports dropped to stay within bounds.
    Put(Vec<String>),
    /// False: there was no such report.
    Removed(bool),
}

/// Commits a batch of writes in order, returning one answer per write, or
/// one error for the whole batch.
pub(super) trait Committer {
    type Error;
    fn commit(&self, batch: &[Write]) -> Result<Vec<Written>, Self::Error>;
    /// The error each write of a failed batch is answered with.
    fn each(&self, error: &Self::Error) -> Self::Error;
    /// The error for writes whose commit panicked.
    fn panicked(&self) -> Self::Error;
}

#[derive(Default)]
struct Queue<E> {
    queued: Vec<(u64, Write)>,
    next_ticket: u64,
    writing: bool,
    answered: HashMap<u64, Result<Written, E>>,
}

/// The queue concurrent writers share.
pub(super) struct GroupCommit<E> {
    queue: Mutex<Queue<E>>,
    changed: Condvar,
}

impl<E> Default for GroupCommit<E> {
    fn default() -> Self {
        GroupCommit {
            queue: Mutex::new(Queue {
                queued: Vec::new(),
                next_ticket: 0,
                writing: false,
                answered: HashMap::new(),
            }),
            changed: Condvar::new(),
        }
    }
}

impl<E> GroupCommit<E> {
    fn lock(&self) -> MutexGuard<'_, Queue<E>> {
        // A panic while holding the lock leaves the queue consistent (every
        // step below is a single push, take or insert), so carry on.
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `writes` (kept together, in order) and returns their answers
    /// once a commit holding them has finished. Blocks the calling thread:
    /// call it from a blocking context.
    pub(super) fn submit<C: Committer<Error = E>>(
        &self,
        committer: &C,
        writes: Vec<Write>,
    ) -> Vec<Result<Written, E>> {
        if writes.is_empty() {
            return Vec::new();
        }
        let mut queue = self.lock();
        let first = queue.next_ticket;
        let count = writes.len() as u64;
        queue.next_ticket += count;
        queue.queued.extend((first..).zip(writes));
        // The commit that takes the first write takes them all: they are
        // queued together, under one lock.
        loop {
            if queue.answered.contains_key(&first) {
                return (first..first + count)
                    .map(|ticket| {
                        queue
                            .answered
                            .remove(&ticket)
                            .expect("answered with the batch")
                    })
                    .collect();
            }
            if !queue.writing {
                // Nobody is writing, so these writes are still queued:
                // commit them, and everything queued with them.
                queue.writing = true;
                let (tickets, batch): (Vec<u64>, Vec<Write>) =
                    std::mem::take(&mut queue.queued).into_iter().unzip();
                drop(queue);
                let answers = self.commit_batch(committer, &tickets, &batch);
                queue = self.lock();
                queue.writing = false;
                queue.answered.extend(answers);
                self.changed.notify_all();
                continue;
            }
            queue = self
                .changed
                .wait(queue)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    fn commit_batch<C: Committer<Error = E>>(
        &self,
        committer: &C,
        tickets: &[u64],
        batch: &[Write],
    ) -> Vec<(u64, Result<Written, E>)> {
        // Should the commit panic, answer everyone (the panic hook has
        // already logged it) rather than leave them waiting for a writer
        // that is gone.
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| committer.commit(batch)));
        match outcome {
            Ok(Ok(answers)) if answers.len() == tickets.len() => tickets
                .iter()
                .copied()
                .zip(answers.into_iter().map(Ok))
                .collect(),
            Ok(Err(error)) => tickets
                .iter()
                .map(|&ticket| (ticket, Err(committer.each(&error))))
                .collect(),
            Ok(Ok(_)) | Err(_) => tickets
                .iter()
                .map(|&ticket| (ticket, Err(committer.panicked())))
                .collect(),
        }
    }
}
