//! Group commit: the writes of concurrent runs share one transaction and
//! one fsync, made by one writer thread.
//!
//! Every accepted lease and every report must be on disk before the node
//! acts on it, and an fsync costs about a millisecond here: one per write
//! would cap the node near a thousand writes a second whatever its slot
//! count. Instead, callers queue their writes for the outbox's writer
//! thread, which takes everything queued when it is free and commits it as
//! one transaction: while one commit waits for the disk, the next batch
//! gathers. The queue never waits for company: a lone write commits at
//! once, so an idle node pays no latency for the batching.
//!
//! A caller on the async runtime awaits its answer without holding a
//! thread; a blocking caller (tests, the `outbox` command) waits on its
//! own thread. Each write keeps its own answer (a lease already accepted,
//! the reports dropped to stay in bounds), exactly as if it had committed
//! alone and in queue order. A transaction that fails fails every write in
//! it.
//!
//! On a node of many slots ([`super::OutboxLimits::gather`]), under a
//! steady stream of writes from many callers, a commit waits a little for
//! company: when the last commit carried writes of two callers or more
//! and a write arrives within [`Gather::BUSY_WITHIN`] of its end, the
//! writer gathers for [`Gather::FOR`] unless [`Gather::WRITES`] writes
//! are queued already (MySQL's `binlog_group_commit_sync_delay` and
//! `..._no_delay_count`). At a few thousand leases a second each commit
//! otherwise carried three or four writes, and an fsync costs the node
//! tens of microseconds of CPU on a virtual disk. After
//! [`Gather::MISSES`] waits in a row that each brought fewer than
//! [`Gather::WORTH`] callers, none is made for [`Gather::REST`]: where
//! the callers wait on each other's commits (a node of a few slots, a
//! lone lease), waiting brings no one and only adds latency. An idle
//! node's lone write commits at once; a saturated node's batches are full
//! without waiting.
//!
//! A commit of removals alone is not synced (see `Outbox::remove`): the
//! next synced commit carries it to disk, or, when none comes within
//! [`SYNC_AFTER`], the writer thread syncs it itself, as it does before
//! it ends.
//!
//! A failed (or panicked) commit leaves the store unable to record (redb
//! refuses everything after an I/O error). From then on the writer thread
//! answers each write at once with the committer's "unavailable" error,
//! rather than let it wait, and asks the committer to reopen the store
//! with back-off; once it has, writes commit again.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use support::Backoff;

use tokio::sync::oneshot;

/// One queued write.
#[derive(Debug)]
pub(super) enum Write {
    Accept {
        lease_id: String,
        run_id: String,
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
pub(super) trait Committer: Send + 'static {
    type Error: Send + 'static;
    fn commit(&self, batch: &[Write]) -> Result<Vec<Written>, Self::Error>;
    /// The error each write of a failed batch is answered with.
    fn each(&self, error: &Self::Error) -> Self::Error;
    /// The error for writes whose commit panicked.
    fn panicked(&self) -> Self::Error;
    /// Whether the store records now; false after a failed commit until
    /// [`Committer::reopen`] succeeds.
    fn healthy(&self) -> bool;
    /// Reopens the store after a failure (`attempt` counts from 1); true
    /// once it records again.
    fn reopen(&self, attempt: u32) -> bool;
    /// The answer to a write while the store is not healthy.
    fn unavailable(&self) -> Self::Error;
    /// Whether a commit left writes that are not yet on disk (see
    /// [`Committer::sync`]).
    fn unsynced(&self) -> bool {
        false
    }
    /// Puts every committed write on disk.
    fn sync(&self) -> Result<(), Self::Error> {
        Ok(())
    }
    /// The writer's last act, once the queue is closed and what it held
    /// is committed (or answered with errors).
    fn closing(&self) {}
}

/// How long the writer thread leaves unsynced writes (removals) waiting
/// for the next synced commit to carry them before it syncs them itself,
/// counted from the first of them: a stream of unsynced writes does not
/// put the sync off.
pub(super) const SYNC_AFTER: Duration = Duration::from_millis(100);

/// The first wait before reopening a failed store, and the longest.
const REOPEN_FIRST: Duration = Duration::from_millis(200);
const REOPEN_MAX: Duration = Duration::from_secs(10);

type Answers<E> = Vec<Result<Written, E>>;

/// Where a queued job's answers go.
enum Reply<E> {
    Blocking(mpsc::SyncSender<Answers<E>>),
    Async(oneshot::Sender<Answers<E>>),
}

/// Writes queued together, committed together, answered together.
struct Job<E> {
    writes: Vec<Write>,
    reply: Reply<E>,
}

/// Jobs one commit takes at most; the rest wait for the next.
const MAX_JOBS_PER_COMMIT: usize = 1024;

/// When and how long a commit waits for more writes (see the module's
/// documentation).
#[derive(Debug, Clone, Copy)]
pub(super) struct Gather {
    /// A write arriving within this of the last commit's end finds the
    /// writer busy, and gathers.
    pub(super) busy_within: Duration,
    /// How long a gathering commit waits, from its first write.
    pub(super) wait: Duration,
    /// The writes queued already that make the wait needless.
    pub(super) writes: usize,
    /// The callers a wait must bring to be worth it.
    pub(super) worth: usize,
    /// Waits in a row not worth it after which no wait is made for `rest`.
    pub(super) misses: u32,
    pub(super) rest: Duration,
}

impl Gather {
    pub(super) const BUSY_WITHIN: Duration = Duration::from_millis(1);
    pub(super) const FOR: Duration = Duration::from_micros(500);
    pub(super) const WRITES: usize = 16;
    pub(super) const WORTH: usize = 2;
    pub(super) const MISSES: u32 = 3;
    pub(super) const REST: Duration = Duration::from_millis(100);

    /// Never waits: every commit takes what is queued when it starts.
    pub(super) const OFF: Gather = Gather {
        busy_within: Duration::ZERO,
        ..Gather::DEFAULT
    };

    pub(super) const DEFAULT: Gather = Gather {
        busy_within: Gather::BUSY_WITHIN,
        wait: Gather::FOR,
        writes: Gather::WRITES,
        worth: Gather::WORTH,
        misses: Gather::MISSES,
        rest: Gather::REST,
    };
}

/// The writer thread and the queue to it. Dropping it lets the thread
/// finish what is queued and joins it, so the database is closed (and its
/// file lock released) when the last outbox handle goes.
pub(super) struct GroupCommit<E> {
    jobs: Option<mpsc::Sender<Job<E>>>,
    writer: Option<JoinHandle<()>>,
    /// The answer to a write the writer thread did not answer (it is gone).
    gone: Box<dyn Fn() -> E + Send + Sync>,
}

impl<E: Send + 'static> GroupCommit<E> {
    /// Starts the writer thread, which owns `committer` and gathers as
    /// `gather` says. `gone` makes the error for writes the thread does
    /// not answer.
    pub(super) fn start<C: Committer<Error = E>>(
        committer: C,
        gone: impl Fn() -> E + Send + Sync + 'static,
        gather: Gather,
    ) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job<E>>();
        let writer = std::thread::Builder::new()
            .name("outbox-writer".to_string())
            .spawn(move || {
                write_until_closed(&committer, &queue, gather);
                committer.closing();
            })?;
        Ok(GroupCommit {
            jobs: Some(jobs),
            writer: Some(writer),
            gone: Box::new(gone),
        })
    }

    /// Queues `writes` (kept together, in order) and waits, on this
    /// thread, for their answers: for blocking callers.
    pub(super) fn submit_blocking(&self, writes: Vec<Write>) -> Answers<E> {
        let count = writes.len();
        if count == 0 {
            return Vec::new();
        }
        let (sender, receiver) = mpsc::sync_channel(1);
        if self.queue(writes, Reply::Blocking(sender))
            && let Ok(answers) = receiver.recv()
        {
            return answers;
        }
        self.unanswered(count)
    }

    /// Queues `writes` (kept together, in order) and awaits their answers,
    /// holding no thread meanwhile.
    pub(super) async fn submit(&self, writes: Vec<Write>) -> Answers<E> {
        let count = writes.len();
        if count == 0 {
            return Vec::new();
        }
        let (sender, receiver) = oneshot::channel();
        if self.queue(writes, Reply::Async(sender))
            && let Ok(answers) = receiver.await
        {
            return answers;
        }
        self.unanswered(count)
    }

    fn queue(&self, writes: Vec<Write>, reply: Reply<E>) -> bool {
        self.jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(Job { writes, reply }).is_ok())
    }

    fn unanswered(&self, count: usize) -> Answers<E> {
        (0..count).map(|_| Err((self.gone)())).collect()
    }
}

impl<E> Drop for GroupCommit<E> {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has committed what
        // was queued before.
        drop(self.jobs.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn write_until_closed<C: Committer>(committer: &C, queue: &mpsc::Receiver<Job<C::Error>>, gather: Gather) {
    let mut backoff = Backoff::new(REOPEN_FIRST, REOPEN_MAX);
    let mut next_reopen: Option<Instant> = None;
    // When the oldest commit not yet on disk was made.
    let mut unsynced_since: Option<Instant> = None;
    // When the last commit ended, and how many callers' writes it carried.
    let mut last_commit: Option<(Instant, usize)> = None;
    // Waits in a row that brought too few callers, and no wait for
    // company before `rest_until` once they were too many.
    let mut misses = 0;
    let mut rest_until: Option<Instant> = None;
    loop {
        if !committer.healthy() {
            // Answer what arrives at once, and reopen when it is time.
            let due = *next_reopen.get_or_insert_with(|| Instant::now() + backoff.next_delay());
            match queue.recv_timeout(due.saturating_duration_since(Instant::now())) {
                Ok(job) => answer(
                    job.reply,
                    job.writes.iter().map(|_| Err(committer.unavailable())).collect(),
                ),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if committer.reopen(backoff.attempts()) {
                        backoff.reset();
                        next_reopen = None;
                    } else {
                        next_reopen = Some(Instant::now() + backoff.next_delay());
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            continue;
        }
        let first = if committer.unsynced() {
            // Due SYNC_AFTER after the first unsynced commit, however many
            // unsynced ones follow it.
            let since = *unsynced_since.get_or_insert_with(Instant::now);
            let left = (since + SYNC_AFTER).saturating_duration_since(Instant::now());
            let next = if left.is_zero() {
                Err(mpsc::RecvTimeoutError::Timeout)
            } else {
                queue.recv_timeout(left)
            };
            match next {
                Ok(job) => job,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    sync(committer);
                    unsynced_since = None;
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return sync(committer),
            }
        } else {
            unsynced_since = None;
            match queue.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        let arrived = Instant::now();
        let busy = last_commit
            .is_some_and(|(ended, callers)| callers > 1 && arrived.duration_since(ended) < gather.busy_within)
            && rest_until.is_none_or(|until| arrived >= until);
        let (jobs, brought) = gathered(queue, first, busy.then(|| (arrived + gather.wait, gather.writes)));
        match brought {
            Some(brought) if brought < gather.worth => {
                misses += 1;
                if misses >= gather.misses {
                    misses = 0;
                    rest_until = Some(Instant::now() + gather.rest);
                }
            }
            Some(_) => misses = 0,
            None => {}
        }
        let callers = jobs.len();
        commit_jobs(committer, jobs);
        last_commit = Some((Instant::now(), callers));
    }
}

/// `first` and the jobs queued behind it, up to [`MAX_JOBS_PER_COMMIT`];
/// with `until`, while they hold fewer than its count of writes, also
/// those that arrive before its instant, and how many those were (None:
/// no wait). The writer sleeps through that wait rather than wait on the
/// queue: a writer waiting on the queue is woken by every job (a system
/// call of the runs' threads each), where one asleep is not, as one busy
/// with a commit is not.
fn gathered<E>(
    queue: &mpsc::Receiver<Job<E>>,
    first: Job<E>,
    until: Option<(Instant, usize)>,
) -> (Vec<Job<E>>, Option<usize>) {
    let mut writes = first.writes.len();
    let mut jobs = vec![first];
    let mut drain = |jobs: &mut Vec<Job<E>>| {
        while jobs.len() < MAX_JOBS_PER_COMMIT {
            match queue.try_recv() {
                Ok(job) => {
                    writes += job.writes.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        writes
    };
    let queued = drain(&mut jobs);
    let mut brought = None;
    if let Some((deadline, enough)) = until
        && queued < enough
        && jobs.len() < MAX_JOBS_PER_COMMIT
    {
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
        let before = jobs.len();
        drain(&mut jobs);
        brought = Some(jobs.len() - before);
    }
    (jobs, brought)
}

/// Syncs what earlier commits left unsynced. A failure is the store's
/// (it stops recording until reopened), as for a failed commit.
fn sync<C: Committer>(committer: &C) {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| committer.sync())) {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            committer.each(&error);
        }
        Err(_) => {
            committer.panicked();
        }
    }
}

fn commit_jobs<C: Committer>(committer: &C, jobs: Vec<Job<C::Error>>) {
    let mut counts = Vec::with_capacity(jobs.len());
    let mut replies = Vec::with_capacity(jobs.len());
    let mut batch = Vec::new();
    for job in jobs {
        counts.push(job.writes.len());
        replies.push(job.reply);
        batch.extend(job.writes);
    }
    // Should the commit panic, answer everyone (the panic hook has already
    // logged it) rather than leave them waiting.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| committer.commit(&batch)));
    let answers: Answers<C::Error> = match outcome {
        Ok(Ok(answers)) if answers.len() == batch.len() => answers.into_iter().map(Ok).collect(),
        Ok(Err(error)) => batch.iter().map(|_| Err(committer.each(&error))).collect(),
        Ok(Ok(_)) | Err(_) => batch.iter().map(|_| Err(committer.panicked())).collect(),
    };
    let mut answers = answers.into_iter();
    for (count, reply) in counts.into_iter().zip(replies) {
        let own: Answers<C::Error> = answers.by_ref().take(count).collect();
        answer(reply, own);
    }
}

fn answer<E>(reply: Reply<E>, answers: Answers<E>) {
    // A caller that stopped waiting (its task was dropped) needs no
    // answer; the write is committed all the same.
    match reply {
        Reply::Blocking(sender) => {
            let _ = sender.send(answers);
        }
        Reply::Async(sender) => {
            let _ = sender.send(answers);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Waker};

    use super::*;

    /// Answers each put with its own lease id, records batch sizes, and
    /// holds its first commit until the test lets it go.
    struct Recorder {
        batches: Arc<Mutex<Vec<usize>>>,
        started: mpsc::Sender<()>,
        gate: Mutex<mpsc::Receiver<()>>,
        panic_on: Option<&'static str>,
        /// Set by a panicked commit, cleared by a reopen.
        broken: Mutex<bool>,
    }

    impl Committer for Recorder {
        type Error = String;

        fn commit(&self, batch: &[Write]) -> Result<Vec<Written>, String> {
            let first = self.batches.lock().unwrap().is_empty();
            self.batches.lock().unwrap().push(batch.len());
            if first {
                let _ = self.started.send(());
                let _ = self.gate.lock().unwrap().recv();
            }
            batch
                .iter()
                .map(|write| match write {
                    Write::Put { lease_id, .. } if Some(lease_id.as_str()) == self.panic_on => {
                        panic!("commit of {lease_id} panics")
                    }
                    Write::Put { lease_id, .. } => Ok(Written::Put(vec![lease_id.clone()])),
                    _ => Err("only puts here".to_string()),
                })
                .collect()
        }

        fn each(&self, error: &String) -> String {
            error.clone()
        }

        fn panicked(&self) -> String {
            *self.broken.lock().unwrap() = true;
            "panicked".to_string()
        }

        fn healthy(&self) -> bool {
            !*self.broken.lock().unwrap()
        }

        fn reopen(&self, _: u32) -> bool {
            *self.broken.lock().unwrap() = false;
            true
        }

        fn unavailable(&self) -> String {
            "unavailable".to_string()
        }
    }

    struct Harness {
        group: Arc<GroupCommit<String>>,
        batches: Arc<Mutex<Vec<usize>>>,
        started: mpsc::Receiver<()>,
        gate: mpsc::Sender<()>,
    }

    fn harness(panic_on: Option<&'static str>) -> Harness {
        harness_gathering(panic_on, Gather::DEFAULT)
    }

    fn harness_gathering(panic_on: Option<&'static str>, gather: Gather) -> Harness {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let (started_tx, started) = mpsc::channel();
        let (gate, gate_rx) = mpsc::channel();
        let recorder = Recorder {
            batches: Arc::clone(&batches),
            started: started_tx,
            gate: Mutex::new(gate_rx),
            panic_on,
            broken: Mutex::new(false),
        };
        let group = GroupCommit::start(recorder, || "gone".to_string(), gather).expect("writer thread");
        Harness {
            group: Arc::new(group),
            batches,
            started,
            gate,
        }
    }

    fn put(lease_id: &str) -> Write {
        Write::Put {
            lease_id: lease_id.to_string(),
            value: Vec::new(),
        }
    }

    type Submission = Pin<Box<dyn Future<Output = Answers<String>> + Send>>;

    /// Submits, polling once so the writes are queued before this returns.
    fn queued(group: &Arc<GroupCommit<String>>, writes: Vec<Write>) -> Submission {
        let group = Arc::clone(group);
        let mut submission: Submission = Box::pin(async move { group.submit(writes).await });
        let polled = submission.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        assert!(polled.is_pending(), "answered before the writer was let go");
        submission
    }

    fn ids(answers: Answers<String>) -> Vec<String> {
        answers
            .into_iter()
            .map(|answer| match answer {
                Ok(Written::Put(ids)) => ids.concat(),
                other => panic!("unexpected answer {other:?}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn writes_queued_during_a_commit_share_the_next_one_and_keep_their_answers() {
        let h = harness(None);
        let first = queued(&h.group, vec![put("a")]);
        h.started.recv().expect("the first commit started");
        // Queued while the first commit waits for its "disk".
        let second = queued(&h.group, vec![put("b"), put("c")]);
        let third = queued(&h.group, vec![put("d")]);
        let blocking = {
            let group = Arc::clone(&h.group);
            std::thread::spawn(move || group.submit_blocking(vec![put("e")]))
        };
        h.gate.send(()).unwrap();
        assert_eq!(ids(first.await), ["a"]);
        assert_eq!(ids(second.await), ["b", "c"]);
        assert_eq!(ids(third.await), ["d"]);
        assert_eq!(ids(blocking.join().unwrap()), ["e"]);
        let batches = h.batches.lock().unwrap().clone();
        assert_eq!(batches[0], 1);
        assert_eq!(batches.iter().sum::<usize>(), 5);
        assert!(
            batches[1] >= 3,
            "the writes queued during the first commit share the second: {batches:?}"
        );
    }

    /// Windows no test outlasts, but for the wait itself.
    const LONG: Gather = Gather {
        busy_within: Duration::from_secs(600),
        wait: Duration::from_secs(2),
        writes: 16,
        worth: 2,
        misses: 1,
        rest: Duration::from_secs(600),
    };

    #[tokio::test]
    async fn writes_of_many_callers_gather_and_a_lone_write_commits_at_once() {
        let h = harness_gathering(None, LONG);
        let first = queued(&h.group, vec![put("a")]);
        // No commit before it: the lone write is not held for company.
        h.started
            .recv_timeout(Duration::from_secs(60))
            .expect("an idle writer commits a lone write at once");
        // Two callers queue during the first commit: they share the next.
        let x = queued(&h.group, vec![put("x")]);
        let y = queued(&h.group, vec![put("y")]);
        h.gate.send(()).unwrap();
        assert_eq!(ids(first.await), ["a"]);
        assert_eq!(ids(x.await), ["x"]);
        assert_eq!(ids(y.await), ["y"]);
        // Just after a commit of two callers: a write waits for company,
        // and the writes that come meanwhile share its commit.
        let mut b = queued(&h.group, vec![put("b")]);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut b).await.is_err(),
            "a write just after a commit of many callers waits for company"
        );
        let c = queued(&h.group, vec![put("c")]);
        let de = queued(&h.group, vec![put("d"), put("e")]);
        assert_eq!(ids(b.await), ["b"]);
        assert_eq!(ids(c.await), ["c"]);
        assert_eq!(ids(de.await), ["d", "e"]);
        assert_eq!(*h.batches.lock().unwrap(), [1, 2, 4]);
    }

    /// The review's case: a caller that waits for each commit before its
    /// next write (a node of one slot) must not find the writer waiting
    /// for company that cannot come.
    #[tokio::test]
    async fn one_caller_writing_after_each_commit_never_waits_for_company() {
        // Longer than the test waits for an answer (a failure then takes
        // this long more: the writer is joined when the group drops).
        let gather = Gather {
            wait: Duration::from_secs(120),
            ..LONG
        };
        let h = harness_gathering(None, gather);
        let first = queued(&h.group, vec![put("a")]);
        h.started.recv_timeout(Duration::from_secs(60)).unwrap();
        h.gate.send(()).unwrap();
        assert_eq!(ids(first.await), ["a"]);
        for i in 0..5 {
            let id = format!("w{i}");
            let answered = tokio::time::timeout(Duration::from_secs(60), h.group.submit(vec![put(&id)]))
                .await
                .expect("a lone caller's write commits without waiting 120 s for company");
            assert_eq!(ids(answered), [id]);
        }
        assert_eq!(*h.batches.lock().unwrap(), [1; 6]);
    }

    #[tokio::test]
    async fn a_commit_that_panics_fails_its_writes_and_the_writer_goes_on() {
        let h = harness(Some("boom"));
        let first = queued(&h.group, vec![put("a")]);
        h.started.recv().unwrap();
        let doomed = queued(&h.group, vec![put("b"), put("boom")]);
        h.gate.send(()).unwrap();
        assert_eq!(ids(first.await), ["a"]);
        let answers = doomed.await;
        assert_eq!(answers.len(), 2);
        assert!(answers.iter().all(|answer| matches!(answer, Err(e) if e == "panicked")));
        // Until the store is reopened (after a back-off), writes are
        // answered "unavailable" at once; then they commit again.
        let mut after = h.group.submit(vec![put("after")]).await;
        for _ in 0..100 {
            match &after[0] {
                Err(e) if e == "unavailable" => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    after = h.group.submit(vec![put("after")]).await;
                }
                _ => break,
            }
        }
        assert_eq!(ids(after), ["after"]);
    }

    #[test]
    fn dropping_it_commits_what_was_queued_then_stops_the_writer() {
        let h = harness(None);
        let group = Arc::try_unwrap(h.group).ok().expect("one handle");
        let waiting = queued_blocking(&group);
        h.started.recv().unwrap();
        h.gate.send(()).unwrap();
        drop(group);
        // The writer thread is joined: it no longer holds the recorder.
        assert_eq!(Arc::strong_count(&h.batches), 1);
        assert_eq!(*h.batches.lock().unwrap(), [1]);
        assert!(waiting.recv().is_ok(), "the queued write was answered");
    }

    /// Leaves every commit unsynced; counts the syncs.
    struct Lazy {
        unsynced: std::cell::Cell<bool>,
        syncs: Arc<Mutex<u32>>,
    }

    impl Committer for Lazy {
        type Error = String;

        fn commit(&self, batch: &[Write]) -> Result<Vec<Written>, String> {
            self.unsynced.set(true);
            Ok(batch.iter().map(|_| Written::Removed(true)).collect())
        }
        fn each(&self, error: &String) -> String {
            error.clone()
        }
        fn panicked(&self) -> String {
            "panicked".into()
        }
        fn healthy(&self) -> bool {
            true
        }
        fn reopen(&self, _: u32) -> bool {
            true
        }
        fn unavailable(&self) -> String {
            "unavailable".into()
        }
        fn unsynced(&self) -> bool {
            self.unsynced.get()
        }
        fn sync(&self) -> Result<(), String> {
            self.unsynced.set(false);
            *self.syncs.lock().unwrap() += 1;
            Ok(())
        }
    }

    /// A writer over a [`Lazy`] committer, and its sync count.
    fn lazy_group() -> (GroupCommit<String>, Arc<Mutex<u32>>) {
        let syncs = Arc::new(Mutex::new(0));
        let lazy = Lazy {
            unsynced: std::cell::Cell::new(false),
            syncs: syncs.clone(),
        };
        (
            GroupCommit::start(lazy, || "gone".to_string(), Gather::DEFAULT).unwrap(),
            syncs,
        )
    }

    #[test]
    fn unsynced_writes_are_synced_when_no_write_follows_and_before_the_writer_stops() {
        let (group, syncs) = lazy_group();
        let remove = || Write::Remove {
            lease_id: "a".to_string(),
        };
        assert_eq!(group.submit_blocking(vec![remove()]).len(), 1);
        // Bounded: 100 polls of 50 ms.
        let synced = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            *syncs.lock().unwrap() == 1
        });
        assert!(synced, "the writer synced the lone unsynced commit");
        std::thread::sleep(SYNC_AFTER * 3);
        assert_eq!(*syncs.lock().unwrap(), 1, "nothing left to sync, no more syncs");
        assert_eq!(group.submit_blocking(vec![remove()]).len(), 1);
        drop(group);
        assert_eq!(*syncs.lock().unwrap(), 2, "synced before the writer stopped");
    }

    #[test]
    fn a_stream_of_unsynced_writes_does_not_put_the_sync_off() {
        let (group, syncs) = lazy_group();
        // A removal every 30 ms for at least 600 ms: each comes sooner
        // than SYNC_AFTER after the one before it.
        let started = Instant::now();
        for _ in 0..20 {
            let remove = Write::Remove {
                lease_id: "a".to_string(),
            };
            assert_eq!(group.submit_blocking(vec![remove]).len(), 1);
            std::thread::sleep(Duration::from_millis(30));
        }
        let elapsed = started.elapsed();
        let synced = *syncs.lock().unwrap();
        assert!(
            synced >= 3,
            "{synced} syncs in {elapsed:?} of removals every 30 ms (one due every {SYNC_AFTER:?})"
        );
    }

    /// Queues one put without waiting for its answer.
    fn queued_blocking(group: &GroupCommit<String>) -> mpsc::Receiver<Answers<String>> {
        let (sender, receiver) = mpsc::sync_channel(1);
        assert!(group.queue(vec![put("a")], Reply::Blocking(sender)));
        receiver
    }
}
