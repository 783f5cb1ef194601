//! The durable outbox: every outcome this node owes the control plane, on
//! disk before the first attempt to send it, and the ids of the leases it
//! accepted, so a lease redelivered after a restart does not run again.
//!
//! Why redb: it is pure Rust (no C toolchain, unlike SQLite), one file,
//! and ACID: a write transaction's `commit()` returns only after the data
//! is fsynced (`Durability::Immediate`, its default; only removals are
//! not, see [`Outbox::remove`]: they reach the disk within 100 ms), so an outcome
//! written is on disk before the node tries to send it, and a crash
//! (SIGKILL, power loss) leaves either the old or the new state, never a
//! torn one. Concurrent runs' writes share transactions and fsyncs (group
//! commit, see `group_commit`), so the disk does not serialise the slots.
//! It also takes a file lock, so two processes cannot share one outbox by
//! mistake; and since redb's lock goes with the database while the file
//! is reopened after a failure, the outbox holds `outbox.lock` beside it
//! for as long as it is open.
//!
//! The file is `{DataDirectory}/outbox.redb`. Two tables:
//! - `pending`: lease id -> a report not yet answered by the control plane:
//!   `[tag: 1 byte][deadline unix ms: i64 LE][written unix ms: i64 LE]`
//!   then the prost-encoded `CompleteRequest` (tag 1) or `FailRequest`
//!   (tag 2);
//! - `accepted_in_order`: (accepted-at unix ms, lease id) -> lease deadline
//!   unix ms. Keyed in the order leases arrive, so that each accept adds
//!   to the table's last page instead of rewriting a page at random: with
//!   random lease ids as keys (the table until 2026-12-07, `accepted`,
//!   moved into this one at open, or read where it is while the disk has
//!   no room for the move), an accept's commit cost grew with the
//!   table, which holds every lease of the last deadline plus grace. Whether
//!   an id was accepted is answered from memory: a set of 128-bit digests
//!   of the ids in the table, read at open and changed only after each
//!   commit that changes the table;
//! - `in_flight`: lease id -> (run id, lease deadline unix ms), for each
//!   accepted lease that has no report yet. Written with the accept,
//!   removed (in the same commit) when its report is stored or answered.
//!   What it holds at start-up was running when the node died: see
//!   [`Outbox::in_flight`].
//!
//! Bounds: a report (or accepted id) whose lease deadline plus
//! [`OutboxLimits::grace`] has passed is dropped: the control plane has
//! re-leased that run. A lease with no deadline counts from when the
//! report was written. Past [`OutboxLimits::max_reports`], the oldest
//! report is dropped.
//!
//! After an I/O error redb refuses everything until reopened; the outbox
//! then says it cannot record ([`Outbox::is_writable`], [`Outbox::fault`]),
//! answers writes with an error at once, and its writer thread reopens the
//! file with back-off (see `file`).

// redb::Error is large; it only travels on the rare failure path.
#![allow(clippy::result_large_err)]

mod damaged;
mod file;
mod group_commit;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use redb::{Database, ReadableTable, ReadableTableMetadata, Table, TableDefinition};

use damaged::{OpenFailure, open_database};
pub use damaged::{Salvaged, salvage};
use file::DatabaseFile;
pub use file::OutboxFault;
use group_commit::{Committer, GroupCommit, Write, Written};

use crate::control_plane::Report;
use proto::{CompleteRequest, FailRequest};

const PENDING: TableDefinition<&str, &[u8]> = TableDefinition::new("pending");
const ACCEPTED: TableDefinition<(i64, &str), i64> = TableDefinition::new("accepted_in_order");
/// The accepted ids as nodes before 2026-12-07 kept them: lease id ->
/// (accepted-at unix ms, lease deadline unix ms). Moved into [`ACCEPTED`]
/// at open.
const ACCEPTED_BY_ID: TableDefinition<&str, (i64, i64)> = TableDefinition::new("accepted");
const IN_FLIGHT: TableDefinition<&str, (&str, i64)> = TableDefinition::new("in_flight");

const TAG_COMPLETE: u8 = 1;
const TAG_FAIL: u8 = 2;
const HEADER: usize = 1 + 8 + 8;

/// The outbox's file name inside the data directory.
pub const FILE_NAME: &str = "outbox.redb";

/// How much the outbox keeps.
#[derive(Debug, Clone, Copy)]
pub struct OutboxLimits {
    /// Reports kept at most; past it the oldest is dropped.
    pub max_reports: usize,
    /// How long after its lease's deadline a report is still worth sending.
    pub grace: Duration,
    /// Whether a commit may wait for company under a steady stream of
    /// writes (see `group_commit`): for a node of many slots. With a few,
    /// the writes of one commit are mostly the same leases' (an accept, a
    /// report, a removal), which waiting only delays.
    pub gather: bool,
}

impl OutboxLimits {
    /// The slots from which a node's outbox gathers (the attack reviews
    /// of 2026-12-07 measured 1-4 slots slower with it, 8 even, 64 faster).
    pub const GATHER_FROM_SLOTS: u32 = 16;

    /// The limits for a node of `slots`.
    pub fn for_slots(slots: u32) -> Self {
        OutboxLimits {
            gather: slots >= Self::GATHER_FROM_SLOTS,
            ..Self::default()
        }
    }
}

impl Default for OutboxLimits {
    fn default() -> Self {
        OutboxLimits {
            max_reports: 100_000,
            grace: Duration::from_secs(600),
            gather: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("the outbox {0} is in use by another process (is a node running with this DataDirectory?)")]
    Locked(PathBuf),
    #[error("cannot create the data directory {path}: {source}")]
    Directory { path: PathBuf, source: std::io::Error },
    #[error("outbox {path}: {message}")]
    Database { path: PathBuf, message: String },
    #[error("a stored report for lease {0} cannot be decoded")]
    Corrupt(String),
    #[error("the outbox {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
}

/// A report waiting in the outbox.
#[derive(Debug, Clone)]
pub struct PendingReport {
    pub report: Report,
    /// The lease's deadline, unix ms (0: none).
    pub deadline_unix_ms: i64,
    /// When it was written, unix ms.
    pub written_unix_ms: i64,
}

impl PendingReport {
    pub fn lease_id(&self) -> &str {
        self.report.lease_id()
    }

    pub fn run_id(&self) -> &str {
        match &self.report {
            Report::Complete(request) => &request.run_id,
            Report::Fail(request) => &request.run_id,
        }
    }

    pub fn kind(&self) -> &'static str {
        match &self.report {
            Report::Complete(_) => "complete",
            Report::Fail(_) => "fail",
        }
    }
}

/// A lease accepted, with no report yet: to record one, or one found at
/// start-up, left by a node that died while it ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseKey {
    pub lease_id: String,
    pub run_id: String,
    /// The lease's deadline, unix ms (0: none).
    pub deadline_unix_ms: i64,
}

/// What [`Outbox::prune`] dropped.
#[derive(Debug, Default)]
pub struct Pruned {
    /// Lease ids of reports dropped because they expired.
    pub expired_reports: Vec<String>,
    pub expired_accepted: usize,
}

/// The durable outbox. Cloning shares the same open database.
#[derive(Clone)]
pub struct Outbox {
    file: Arc<DatabaseFile>,
    path: PathBuf,
    limits: OutboxLimits,
    /// Accepts, reports and removals of concurrent runs share commits,
    /// made by one writer thread.
    group: Arc<GroupCommit<OutboxError>>,
    accepted: Arc<AcceptedIds>,
}

/// The ids in the `accepted_in_order` table (and in an older node's
/// `accepted`, while it could not be moved), as digests: what an accept
/// and [`Outbox::is_accepted`] look up, instead of the tables. Changed
/// only once a commit that changes a table has succeeded, and read again
/// from the tables when the file is reopened after a failure.
#[derive(Default)]
struct AcceptedIds {
    ids: Mutex<HashSet<u128>>,
    /// The file still has an older node's `accepted` table: its ids are in
    /// the set, and pruning covers it too.
    old_table: std::sync::atomic::AtomicBool,
}

impl AcceptedIds {
    fn lock(&self) -> MutexGuard<'_, HashSet<u128>> {
        self.ids.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn has_old_table(&self) -> bool {
        self.old_table.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Replaces the set with the ids the tables hold.
    fn load(&self, db: &Database) -> Result<(), redb::Error> {
        let txn = db.begin_read()?;
        let table = txn.open_table(ACCEPTED)?;
        let mut ids = HashSet::with_capacity(usize::try_from(table.len()?).unwrap_or(0));
        for entry in table.iter()? {
            let (key, _) = entry?;
            ids.insert(digest(key.value().1));
        }
        let old_table = match txn.open_table(ACCEPTED_BY_ID) {
            Ok(old) => {
                for entry in old.iter()? {
                    ids.insert(digest(entry?.0.value()));
                }
                true
            }
            Err(redb::TableError::TableDoesNotExist(_)) => false,
            Err(err) => return Err(err.into()),
        };
        *self.lock() = ids;
        self.old_table.store(old_table, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// 128 bits of SHA-256 of a lease id: two ids of the same digest would be
/// one lease to the outbox, at odds of about 1 in 2^128 / n^2.
fn digest(lease_id: &str) -> u128 {
    use sha2::Digest as _;
    let hash = sha2::Sha256::digest(lease_id.as_bytes());
    u128::from_le_bytes(hash[..16].try_into().expect("SHA-256 has 32 bytes"))
}

/// The writer thread's side of the outbox: the tables the writes go to.
struct Tables {
    file: Arc<DatabaseFile>,
    path: PathBuf,
    limits: OutboxLimits,
    /// A commit since the last synced one was not synced.
    unsynced: std::cell::Cell<bool>,
    /// The reports those unsynced commits removed. A commit that fails
    /// takes them back: redb reopens at the last synced commit. So the
    /// reopen removes them again, or a restart would send each answered
    /// report once more.
    unsynced_removals: std::cell::RefCell<Vec<String>>,
    accepted: Arc<AcceptedIds>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.path)
            .field("limits", &self.limits)
            .finish()
    }
}

pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Outbox {
    /// Opens (creating) `{dir}/outbox.redb`, creating `dir` too.
    pub fn open(dir: &Path) -> Result<Outbox, OutboxError> {
        Outbox::open_with(dir, OutboxLimits::default())
    }

    pub fn open_with(dir: &Path, limits: OutboxLimits) -> Result<Outbox, OutboxError> {
        Outbox::open_moving(dir, limits, true)
    }

    /// Opens the outbox for the `outbox` commands, which accept no lease:
    /// an older node's accepted ids are left where that node reads them
    /// (moved, that node would no longer know them once started again).
    pub fn open_leaving_layout(dir: &Path) -> Result<Outbox, OutboxError> {
        Outbox::open_moving(dir, OutboxLimits::default(), false)
    }

    fn open_moving(dir: &Path, limits: OutboxLimits, move_old_ids: bool) -> Result<Outbox, OutboxError> {
        std::fs::create_dir_all(dir).map_err(|source| OutboxError::Directory {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(FILE_NAME);
        let lock = lock_directory(dir, &path)?;
        let open = || match open_database(&path, true) {
            Ok(db) => Ok(db),
            Err(OpenFailure::Locked) => Err(OutboxError::Locked(path.clone())),
            Err(OpenFailure::Damaged(reason)) => Err(OutboxError::Damaged {
                path: path.clone(),
                reason,
            }),
            Err(OpenFailure::Other(err)) => Err(opening(&path, err)),
        };
        let mut db = open()?;
        // Create the tables, so readers never meet a missing one, and move
        // the accepted ids of an older node's file into today's table. An
        // id both hold (a file that went to an older node and came back)
        // then has two rows, each with its own deadline: it is forgotten
        // once neither is live (see `prune_accepted_in`).
        //
        // The move needs room for a copy of the ids next to the file.
        // Without it, the node starts with them where they are (read from
        // both tables, pruned in both) and moves them at a later start.
        // The room is looked at first: a move that fails leaves a file
        // that redb repairs at the next open, which needs room of its own.
        let not_moved = match (move_old_ids, room_to_move(&db, &path)) {
            // Nothing to move: a failure is the file's or the disk's.
            (false, _) | (true, Ok(false)) => {
                commit_on(&db, |txn| prepare_tables(txn, move_old_ids)).map_err(|error| opening(&path, error))?;
                None
            }
            (true, Err(short)) => Some(short),
            (true, Ok(true)) => match commit_on(&db, |txn| prepare_tables(txn, true)) {
                Ok(()) => None,
                Err(error) => {
                    // redb refuses everything after a failed commit until
                    // the file is opened again.
                    drop(db);
                    db = open()?;
                    Some(error.to_string())
                }
            },
        };
        if let Some(error) = not_moved {
            commit_on(&db, |txn| prepare_tables(txn, false)).map_err(|error| opening(&path, error))?;
            tracing::warn!(
                path = %path.display(),
                %error,
                "the accepted lease ids of a node before 2026-12-07 were not moved to today's layout: \
                 the move needs room for a copy of them next to the file. The node reads them where \
                 they are and tries the move again at its next start (free some space on that disk)"
            );
        }
        let file = Arc::new(DatabaseFile::new(path.clone(), db, lock));
        let accepted = Arc::new(AcceptedIds::default());
        let tables = Tables {
            file: Arc::clone(&file),
            path: path.clone(),
            limits,
            unsynced: std::cell::Cell::new(false),
            unsynced_removals: std::cell::RefCell::default(),
            accepted: Arc::clone(&accepted),
        };
        let gone = {
            let path = path.clone();
            move || OutboxError::Database {
                path: path.clone(),
                message: "the outbox writer thread has stopped".to_string(),
            }
        };
        let gather = if limits.gather {
            group_commit::Gather::DEFAULT
        } else {
            group_commit::Gather::OFF
        };
        let group = GroupCommit::start(tables, gone, gather).map_err(|err| OutboxError::Database {
            path: path.clone(),
            message: format!("cannot start the outbox writer thread: {err}"),
        })?;
        let outbox = Outbox {
            file,
            path,
            limits,
            group: Arc::new(group),
            accepted,
        };
        outbox.read(|db| outbox.accepted.load(db))?;
        Ok(outbox)
    }

    /// Opens the outbox as [`Outbox::open_with`] does, but a damaged file
    /// does not stop the node: it is moved aside
    /// (`outbox.redb.corrupt-<time>`, see `node-runtime outbox list
    /// --file`), with an error log naming both paths, and an empty outbox
    /// takes its place. What the damaged file held is not sent: leases it
    /// had accepted may be redelivered and run again, reports it held are
    /// lost unless salvaged by hand; the alternative, a node that cannot
    /// start, loses every run it would have taken.
    pub fn open_setting_aside_damaged(dir: &Path, limits: OutboxLimits) -> Result<Outbox, OutboxError> {
        match Outbox::open_with(dir, limits) {
            Err(OutboxError::Damaged { path, reason }) => {
                let aside = damaged::set_aside(&path)?;
                tracing::error!(
                    damaged = %path.display(),
                    moved_to = %aside.display(),
                    %reason,
                    "THE OUTBOX WAS DAMAGED: moved it aside and starting with an empty one; the \
                     reports it held are not sent and the leases it had accepted are not \
                     recognised if redelivered; read what is left with `node-runtime outbox list \
                     --file {}`",
                    aside.display()
                );
                Outbox::open_with(dir, limits)
            }
            other => other,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn limits(&self) -> OutboxLimits {
        self.limits
    }

    /// Whether the outbox records now: false from a failed write until the
    /// file has been reopened and a write committed.
    pub fn is_writable(&self) -> bool {
        self.file.is_writable()
    }

    /// Waits until the outbox records (at once when it does).
    pub async fn writable(&self) {
        let mut writable = self.file.subscribe();
        let _ = writable.wait_for(|writable| *writable).await;
    }

    /// Why the outbox cannot record, and since when; None while it can.
    pub fn fault(&self) -> Option<OutboxFault> {
        self.file.fault()
    }

    /// Writes the disk refused since the outbox was opened.
    pub fn write_failures(&self) -> u64 {
        self.file.write_failures()
    }

    /// Runs a read on the current database. A panic inside redb (it has
    /// assertions that a damaged file can trip) is this outbox's error.
    fn read<T>(&self, body: impl FnOnce(&Database) -> Result<T, redb::Error>) -> Result<T, OutboxError> {
        let db = self.file.current()?;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&db))) {
            Ok(done) => done.map_err(|err| database(&self.path, err)),
            Err(_) => Err(OutboxError::Database {
                path: self.path.clone(),
                message: "redb panicked while reading".to_string(),
            }),
        }
    }

    fn write<T>(&self, body: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>) -> Result<T, OutboxError> {
        let db = self.file.current()?;
        commit_on(&db, body).map_err(|err| {
            let err = database(&self.path, err);
            self.file.failed(&err.to_string());
            err
        })
    }

    /// Records an accepted lease, synced. False when it was accepted before
    /// (by this process or an earlier one): it must not run again.
    pub fn accept(&self, lease_id: &str, deadline_unix_ms: i64) -> Result<bool, OutboxError> {
        self.accept_all(&[(lease_id, deadline_unix_ms)]).remove(0)
    }

    /// [`Outbox::accept`] for several leases (id, deadline), in one commit.
    pub fn accept_all(&self, leases: &[(&str, i64)]) -> Vec<Result<bool, OutboxError>> {
        let keys: Vec<LeaseKey> = leases
            .iter()
            .map(|&(lease_id, deadline_unix_ms)| LeaseKey {
                lease_id: lease_id.to_string(),
                run_id: String::new(),
                deadline_unix_ms,
            })
            .collect();
        accepted(self.group.submit_blocking(accept_writes(&keys)))
    }

    /// Records leases as accepted and in flight (until their report is
    /// stored), in one commit, for async callers: no thread is held while
    /// the commit waits for the disk. False for a lease accepted before.
    pub async fn accept_leases(&self, leases: &[LeaseKey]) -> Vec<Result<bool, OutboxError>> {
        accepted(self.group.submit(accept_writes(leases)).await)
    }

    pub fn is_accepted(&self, lease_id: &str) -> Result<bool, OutboxError> {
        Ok(self.accepted.lock().contains(&digest(lease_id)))
    }

    /// The leases accepted that have no report stored or answered: at
    /// start-up, those that were running (or queued) when the node died.
    pub fn in_flight(&self) -> Result<Vec<LeaseKey>, OutboxError> {
        self.read(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(IN_FLIGHT)?;
            let pending = txn.open_table(PENDING)?;
            let mut leases = Vec::new();
            for entry in table.iter()? {
                let (key, value) = entry?;
                let lease_id = key.value();
                if pending.get(lease_id)?.is_some() {
                    continue;
                }
                let (run_id, deadline_unix_ms) = value.value();
                leases.push(LeaseKey {
                    lease_id: lease_id.to_string(),
                    run_id: run_id.to_string(),
                    deadline_unix_ms,
                });
            }
            Ok(leases)
        })
    }

    /// [`Outbox::in_flight`] for async callers.
    pub async fn in_flight_async(&self) -> Result<Vec<LeaseKey>, OutboxError> {
        self.blocking(|outbox| outbox.in_flight()).await
    }

    /// Stores a report, synced. Returns the lease ids of the oldest reports
    /// dropped to stay within `max_reports`.
    pub fn put(&self, report: &Report, deadline_unix_ms: i64) -> Result<Vec<String>, OutboxError> {
        put_answer(self.group.submit_blocking(vec![put_write(report, deadline_unix_ms)]))
    }

    /// [`Outbox::put`] for async callers.
    pub async fn put_async(&self, report: &Report, deadline_unix_ms: i64) -> Result<Vec<String>, OutboxError> {
        put_answer(self.group.submit(vec![put_write(report, deadline_unix_ms)]).await)
    }

    pub fn get(&self, lease_id: &str) -> Result<Option<PendingReport>, OutboxError> {
        let stored = self.read(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(PENDING)?;
            Ok(table.get(lease_id)?.map(|value| value.value().to_vec()))
        })?;
        match stored {
            Some(bytes) => decode(lease_id, &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// [`Outbox::get`] for async callers: the read runs on a blocking
    /// thread, not the runtime's.
    pub async fn get_async(&self, lease_id: &str) -> Result<Option<PendingReport>, OutboxError> {
        let lease_id = lease_id.to_string();
        self.blocking(move |outbox| outbox.get(&lease_id)).await
    }

    /// Removes a report (the control plane answered). True if it was there.
    ///
    /// Not synced: the removal reaches the disk with the next synced write
    /// (a report, an accepted lease), or within 100 ms
    /// (`group_commit::SYNC_AFTER`) when none comes, and before the outbox
    /// closes. A node that crashes in between sends those answered reports
    /// again on its next start, and the control plane takes each as the
    /// repeat it is (same outcome, same lease); that window exists anyway,
    /// between the plane's answer and this call. This saves one fsync per
    /// run on the hot path, whether the node is loaded or not.
    pub fn remove(&self, lease_id: &str) -> Result<bool, OutboxError> {
        removed(self.group.submit_blocking(vec![remove_write(lease_id)]))
    }

    /// [`Outbox::remove`] for async callers.
    pub async fn remove_async(&self, lease_id: &str) -> Result<bool, OutboxError> {
        removed(self.group.submit(vec![remove_write(lease_id)]).await)
    }

    /// Every pending report, oldest first. Undecodable entries are skipped
    /// with an error log.
    pub fn pending(&self) -> Result<Vec<PendingReport>, OutboxError> {
        let all = self.read(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(PENDING)?;
            let mut all = Vec::new();
            for entry in table.iter()? {
                let (key, value) = entry?;
                all.push((key.value().to_string(), value.value().to_vec()));
            }
            Ok(all)
        })?;
        let mut reports = Vec::new();
        for (lease_id, bytes) in all {
            match decode(&lease_id, &bytes) {
                Ok(report) => reports.push(report),
                Err(err) => tracing::error!(error = %err, "skipping an outbox entry"),
            }
        }
        reports.sort_by_key(|report| report.written_unix_ms);
        Ok(reports)
    }

    /// [`Outbox::pending`] for async callers.
    pub async fn pending_async(&self) -> Result<Vec<PendingReport>, OutboxError> {
        self.blocking(|outbox| outbox.pending()).await
    }

    /// How many reports wait, and when the oldest was written (unix ms),
    /// reading only the entries' headers.
    pub fn backlog(&self) -> Result<(u64, Option<i64>), OutboxError> {
        self.read(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(PENDING)?;
            let mut oldest: Option<i64> = None;
            for entry in table.iter()? {
                let (_, value) = entry?;
                let at = written(value.value());
                oldest = Some(oldest.map_or(at, |o| o.min(at)));
            }
            Ok((table.len()?, oldest))
        })
    }

    pub fn pending_count(&self) -> Result<u64, OutboxError> {
        self.read(|db| {
            let txn = db.begin_read()?;
            Ok(txn.open_table(PENDING)?.len()?)
        })
    }

    /// True when a report's lease is past its deadline plus the grace.
    pub fn expired(&self, deadline_unix_ms: i64, written_unix_ms: i64, now_unix_ms: i64) -> bool {
        now_unix_ms > self.expiry_unix_ms(deadline_unix_ms, written_unix_ms)
    }

    /// How long until [`Outbox::expired`] says so (zero once it does).
    pub fn expires_in(&self, deadline_unix_ms: i64, written_unix_ms: i64, now_unix_ms: i64) -> Duration {
        let left = self
            .expiry_unix_ms(deadline_unix_ms, written_unix_ms)
            .saturating_add(1)
            .saturating_sub(now_unix_ms);
        Duration::from_millis(u64::try_from(left).unwrap_or(0))
    }

    /// When a report's lease is past its deadline plus the grace (counted
    /// from its writing when the lease has no deadline), unix ms.
    fn expiry_unix_ms(&self, deadline_unix_ms: i64, written_unix_ms: i64) -> i64 {
        let from = if deadline_unix_ms > 0 {
            deadline_unix_ms
        } else {
            written_unix_ms
        };
        let grace = i64::try_from(self.limits.grace.as_millis()).unwrap_or(i64::MAX);
        from.saturating_add(grace)
    }

    /// Drops expired reports and accepted ids.
    pub fn prune(&self, now_unix_ms: i64) -> Result<Pruned, OutboxError> {
        let mut stale_ids = Vec::new();
        let pruned = self.write(|txn| {
            let mut pruned = Pruned::default();
            let mut pending = txn.open_table(PENDING)?;
            let mut stale = Vec::new();
            for entry in pending.iter()? {
                let (key, value) = entry?;
                let value = value.value();
                if value.len() >= HEADER && self.expired(deadline(value), written(value), now_unix_ms) {
                    stale.push(key.value().to_string());
                }
            }
            for lease_id in stale {
                pending.remove(lease_id.as_str())?;
                pruned.expired_reports.push(lease_id);
            }
            stale_ids = self.prune_accepted_in(txn, now_unix_ms)?;
            pruned.expired_accepted = stale_ids.len();
            Ok(pruned)
        })?;
        self.forget(&stale_ids);
        Ok(pruned)
    }

    /// Takes ids pruned (and committed) out of the set.
    fn forget(&self, lease_ids: &[String]) {
        let mut accepted = self.accepted.lock();
        for lease_id in lease_ids {
            accepted.remove(&digest(lease_id));
        }
    }

    /// [`Outbox::prune`] for async callers.
    pub async fn prune_async(&self, now_unix_ms: i64) -> Result<Pruned, OutboxError> {
        self.blocking(move |outbox| outbox.prune(now_unix_ms)).await
    }

    /// Drops expired accepted ids only (a running node's pending reports
    /// are its delivery tasks' business). Returns how many.
    pub fn prune_accepted(&self, now_unix_ms: i64) -> Result<usize, OutboxError> {
        let stale = self.write(|txn| self.prune_accepted_in(txn, now_unix_ms))?;
        self.forget(&stale);
        Ok(stale.len())
    }

    /// [`Outbox::prune_accepted`] for async callers.
    pub async fn prune_accepted_async(&self, now_unix_ms: i64) -> Result<usize, OutboxError> {
        self.blocking(move |outbox| outbox.prune_accepted(now_unix_ms)).await
    }

    /// Removes the expired accepted ids from the table (not yet from the
    /// set: the caller does, once the commit succeeded) and returns them.
    fn prune_accepted_in(&self, txn: &redb::WriteTransaction, now_unix_ms: i64) -> Result<Vec<String>, redb::Error> {
        let mut accepted = txn.open_table(ACCEPTED)?;
        let mut stale = Vec::new();
        for entry in accepted.iter()? {
            let (key, deadline) = entry?;
            let (accepted_at, lease_id) = key.value();
            if self.expired(deadline.value(), accepted_at, now_unix_ms) {
                stale.push((accepted_at, lease_id.to_string()));
            }
        }
        for (accepted_at, lease_id) in &stale {
            accepted.remove((*accepted_at, lease_id.as_str()))?;
        }
        let mut stale: HashSet<String> = stale.into_iter().map(|(_, lease_id)| lease_id).collect();
        // An older node's table, not moved yet: pruned on the same rule.
        let mut old_ids = if self.accepted.has_old_table() {
            Some(txn.open_table(ACCEPTED_BY_ID)?)
        } else {
            None
        };
        if let Some(old_ids) = &mut old_ids {
            let mut old_stale = Vec::new();
            for entry in old_ids.iter()? {
                let (lease_id, value) = entry?;
                let (accepted_at, deadline) = value.value();
                if self.expired(deadline, accepted_at, now_unix_ms) {
                    old_stale.push(lease_id.value().to_string());
                }
            }
            for lease_id in &old_stale {
                old_ids.remove(lease_id.as_str())?;
            }
            stale.extend(old_stale);
        }
        // An id with a row that stays (it can have two) is not forgotten.
        if !stale.is_empty() {
            for entry in accepted.iter()? {
                stale.remove(entry?.0.value().1);
            }
            if let Some(old_ids) = &old_ids {
                for entry in old_ids.iter()? {
                    stale.remove(entry?.0.value());
                }
            }
        }
        // An in-flight lease goes with its accepted id.
        let mut in_flight = txn.open_table(IN_FLIGHT)?;
        let mut gone = Vec::new();
        for entry in in_flight.iter()? {
            let (key, _) = entry?;
            if stale.contains(key.value()) {
                gone.push(key.value().to_string());
            }
        }
        for lease_id in &gone {
            in_flight.remove(lease_id.as_str())?;
        }
        Ok(stale.into_iter().collect())
    }

    /// Runs a blocking read or write of this outbox on a blocking thread,
    /// so an async caller's runtime thread never waits for the disk. A
    /// panic there comes back as this outbox's database error.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Outbox) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, OutboxError> {
        let outbox = self.clone();
        match tokio::task::spawn_blocking(move || work(&outbox)).await {
            Ok(done) => done,
            Err(err) => Err(OutboxError::Database {
                path: self.path.clone(),
                message: err.to_string(),
            }),
        }
    }

    /// Deletes every pending report; returns how many.
    pub fn purge_all(&self) -> Result<u64, OutboxError> {
        self.write(|txn| {
            let mut table = txn.open_table(PENDING)?;
            let count = table.len()?;
            table.retain(|_, _| false)?;
            Ok(count)
        })
    }
}

/// The lock file next to the outbox, held while it is open: redb's own
/// lock goes with the database each time the file is reopened after a
/// failure, and a second node started in that moment would take the file
/// (review 2 of stop 35 got two outcomes for one lease so).
pub const LOCK_FILE_NAME: &str = "outbox.lock";

fn lock_directory(dir: &Path, outbox: &Path) -> Result<std::fs::File, OutboxError> {
    let path = dir.join(LOCK_FILE_NAME);
    let failed = |err: std::io::Error| OutboxError::Database {
        path: path.clone(),
        message: format!("cannot open the outbox's lock file: {err}"),
    };
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(failed)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(OutboxError::Locked(outbox.to_path_buf())),
        Err(std::fs::TryLockError::Error(err)) => Err(failed(err)),
    }
}

/// Whether `path` holds an older node's accepted ids to move (false:
/// none), and Err (how short it is) when its disk has not the room for
/// the move: twice what their table takes, and 1 MiB more (a file of
/// 100,000 ids, 9.8 MB, took 16 MB more). What cannot be read (the table,
/// the free room) does not stop the move being tried.
fn room_to_move(db: &Database, path: &Path) -> Result<bool, String> {
    let table_bytes = || -> Result<u64, redb::Error> {
        match db.begin_read()?.open_table(ACCEPTED_BY_ID) {
            Ok(old) if old.is_empty()? => Ok(0),
            Ok(old) => {
                let stats = old.stats()?;
                Ok(stats.stored_bytes() + stats.metadata_bytes() + stats.fragmented_bytes())
            }
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(err) => Err(err.into()),
        }
    };
    let Ok(size) = table_bytes() else {
        return Ok(true);
    };
    if size == 0 {
        return Ok(false);
    }
    let needed = size.saturating_mul(2).saturating_add(1 << 20);
    match path.parent().and_then(free_bytes) {
        Some(free) if free < needed => Err(format!(
            "{free} bytes free next to the file, {needed} wanted for the move"
        )),
        _ => Ok(true),
    }
}

/// The bytes an unprivileged process may still write on the filesystem of
/// `dir`; None when they cannot be read.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and `stat` is writable memory of
    // the type statvfs(3) fills; it is read only when the call succeeded.
    let stat = unsafe {
        if libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init()
    };
    // Both are u64 here; narrower on 32-bit targets.
    #[allow(clippy::useless_conversion)]
    Some(u64::from(stat.f_bavail).saturating_mul(u64::from(stat.f_frsize)))
}

/// An error opening the outbox; on a full disk it says what to do.
fn opening(path: &Path, err: impl Into<redb::Error>) -> OutboxError {
    let err = err.into();
    let full = matches!(&err, redb::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull);
    let mut error = database(path, err);
    if full && let OutboxError::Database { message, .. } = &mut error {
        message.push_str(
            " (the disk next to the outbox is full: free some space there and start again; the file is unchanged)",
        );
    }
    error
}

/// Commits `body` on `db`, synced (`Durability::Immediate`, the default:
/// fsynced before it returns). A panic inside redb is a failed commit.
fn commit_on<T>(
    db: &Database,
    body: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
) -> Result<T, redb::Error> {
    let run = || -> Result<T, redb::Error> {
        let txn = db.begin_write()?;
        let value = body(&txn)?;
        txn.commit()?;
        Ok(value)
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
        .unwrap_or_else(|_| Err(redb::Error::Corrupted("redb panicked while writing".to_string())))
}

/// Creates the tables, and with `move_old_ids` moves an older node's
/// accepted ids into today's table.
fn prepare_tables(txn: &redb::WriteTransaction, move_old_ids: bool) -> Result<(), redb::Error> {
    txn.open_table(PENDING)?;
    txn.open_table(IN_FLIGHT)?;
    let mut accepted = txn.open_table(ACCEPTED)?;
    if move_old_ids {
        let old_ids = txn.open_table(ACCEPTED_BY_ID)?;
        for entry in old_ids.iter()? {
            let (lease_id, value) = entry?;
            let (accepted_at, deadline) = value.value();
            accepted.insert((accepted_at, lease_id.value()), deadline)?;
        }
        drop(old_ids);
        txn.delete_table(ACCEPTED_BY_ID)?;
    }
    Ok(())
}

fn accept_writes(leases: &[LeaseKey]) -> Vec<Write> {
    leases
        .iter()
        .map(|lease| Write::Accept {
            lease_id: lease.lease_id.clone(),
            run_id: lease.run_id.clone(),
            deadline_unix_ms: lease.deadline_unix_ms,
        })
        .collect()
}

fn accepted(answers: Vec<Result<Written, OutboxError>>) -> Vec<Result<bool, OutboxError>> {
    answers
        .into_iter()
        .map(|answer| match answer? {
            Written::Accepted(fresh) => Ok(fresh),
            other => unreachable!("an accept answered {other:?}"),
        })
        .collect()
}

fn put_write(report: &Report, deadline_unix_ms: i64) -> Write {
    let (tag, body) = match report {
        Report::Complete(request) => (TAG_COMPLETE, request.encode_to_vec()),
        Report::Fail(request) => (TAG_FAIL, request.encode_to_vec()),
    };
    let mut value = Vec::with_capacity(HEADER + body.len());
    value.push(tag);
    value.extend_from_slice(&deadline_unix_ms.to_le_bytes());
    value.extend_from_slice(&now_unix_ms().to_le_bytes());
    value.extend_from_slice(&body);
    Write::Put {
        lease_id: report.lease_id().to_string(),
        value,
    }
}

fn put_answer(mut answers: Vec<Result<Written, OutboxError>>) -> Result<Vec<String>, OutboxError> {
    match answers.remove(0)? {
        Written::Put(dropped) => Ok(dropped),
        other => unreachable!("a put answered {other:?}"),
    }
}

fn remove_write(lease_id: &str) -> Write {
    Write::Remove {
        lease_id: lease_id.to_string(),
    }
}

fn removed(mut answers: Vec<Result<Written, OutboxError>>) -> Result<bool, OutboxError> {
    match answers.remove(0)? {
        Written::Removed(removed) => Ok(removed),
        other => unreachable!("a remove answered {other:?}"),
    }
}

impl Tables {
    /// Inserts a report, then drops the oldest others past `max_reports`.
    fn put_in(&self, table: &mut Table<&str, &[u8]>, lease_id: &str, value: &[u8]) -> Result<Vec<String>, redb::Error> {
        table.insert(lease_id, value)?;
        let max = self.limits.max_reports.max(1);
        let len = usize::try_from(table.len()?).unwrap_or(usize::MAX);
        if len <= max {
            return Ok(Vec::new());
        }
        let mut by_age: Vec<(i64, String)> = Vec::with_capacity(len);
        for entry in table.iter()? {
            let (key, value) = entry?;
            if key.value() != lease_id {
                by_age.push((written(value.value()), key.value().to_string()));
            }
        }
        by_age.sort();
        let mut dropped = Vec::with_capacity(len - max);
        for (_, old) in by_age.into_iter().take(len - max) {
            table.remove(old.as_str())?;
            dropped.push(old);
        }
        Ok(dropped)
    }

    /// After a reopen: removes again the reports that unsynced commits
    /// removed before the failed one took them back. On failure the file
    /// counts as failed again, and the next reopen tries again.
    fn remove_again(&self) -> Result<(), String> {
        let lost = self.unsynced_removals.take();
        if lost.is_empty() {
            return Ok(());
        }
        let removed = self.file.current().map_err(|err| err.to_string()).and_then(|db| {
            commit_on(&db, |txn| {
                let mut pending = txn.open_table(PENDING)?;
                let mut in_flight = txn.open_table(IN_FLIGHT)?;
                for lease_id in &lost {
                    pending.remove(lease_id.as_str())?;
                    in_flight.remove(lease_id.as_str())?;
                }
                Ok(())
            })
            .map_err(|err| err.to_string())
        });
        match removed {
            Ok(()) => {
                tracing::info!(
                    count = lost.len(),
                    "removed again the answered reports whose removal the failed commit took back"
                );
                Ok(())
            }
            Err(error) => {
                *self.unsynced_removals.borrow_mut() = lost;
                self.file
                    .failed(&format!("removing answered reports again after reopening: {error}"));
                Err(error)
            }
        }
    }

    /// Reopens the failed file, reads the accepted ids again and makes
    /// again the removals the failure took back; Ok once it records.
    fn reopen_file(&self, attempt: u32, at_exit: bool) -> Result<(), String> {
        // A commit that failed may still have reached the file: the set is
        // read again from what the file holds.
        let reopened = self.file.reopen(attempt, at_exit).and_then(|()| {
            let loaded = self
                .file
                .current()
                .map_err(|err| err.to_string())
                .and_then(|db| self.accepted.load(&db).map_err(|err| err.to_string()));
            if let Err(error) = &loaded {
                // Not without the set: the file counts as failed again.
                self.file
                    .failed(&format!("reading the accepted ids after reopening: {error}"));
            }
            loaded?;
            self.remove_again()
        });
        if let Err(error) = &reopened {
            tracing::debug!(path = %self.path.display(), %error, attempt, "the outbox could not be reopened yet");
        }
        reopened
    }
}

impl Committer for Tables {
    type Error = OutboxError;

    /// One transaction for the whole batch, in queue order. Synced unless
    /// it holds only removals (see [`Outbox::remove`]).
    fn commit(&self, batch: &[Write]) -> Result<Vec<Written>, OutboxError> {
        let run = || -> Result<Vec<Written>, redb::Error> {
            let db = self
                .file
                .current()
                .map_err(|err| redb::Error::Corrupted(err.to_string()))?;
            let mut txn = db.begin_write()?;
            let mut answers = Vec::with_capacity(batch.len());
            let mut must_sync = false;
            // The ids this commit accepts: in the set once it succeeded.
            let mut fresh_ids = Vec::new();
            let known = self.accepted.lock();
            {
                let mut pending = txn.open_table(PENDING)?;
                let mut accepted = txn.open_table(ACCEPTED)?;
                let mut in_flight = txn.open_table(IN_FLIGHT)?;
                for write in batch {
                    answers.push(match write {
                        Write::Accept {
                            lease_id,
                            run_id,
                            deadline_unix_ms,
                        } => {
                            must_sync = true;
                            let id = digest(lease_id);
                            let fresh = !known.contains(&id) && !fresh_ids.contains(&id);
                            if fresh {
                                accepted.insert((now_unix_ms(), lease_id.as_str()), *deadline_unix_ms)?;
                                in_flight.insert(lease_id.as_str(), (run_id.as_str(), *deadline_unix_ms))?;
                                fresh_ids.push(id);
                            }
                            Written::Accepted(fresh)
                        }
                        Write::Put { lease_id, value } => {
                            must_sync = true;
                            in_flight.remove(lease_id.as_str())?;
                            Written::Put(self.put_in(&mut pending, lease_id, value)?)
                        }
                        Write::Remove { lease_id } => {
                            // A lease whose report was dropped unrecorded
                            // (it expired while the outbox could not
                            // record): synced, as a lease with no report
                            // still marked in flight is failed at start.
                            if in_flight.remove(lease_id.as_str())?.is_some() {
                                must_sync = true;
                            }
                            Written::Removed(pending.remove(lease_id.as_str())?.is_some())
                        }
                    });
                }
            }
            drop(known);
            if !must_sync {
                txn.set_durability(redb::Durability::None);
            }
            txn.commit()?;
            self.unsynced.set(!must_sync);
            let mut removals = self.unsynced_removals.borrow_mut();
            if must_sync {
                removals.clear();
            } else {
                removals.extend(batch.iter().filter_map(|write| match write {
                    Write::Remove { lease_id } => Some(lease_id.clone()),
                    _ => None,
                }));
            }
            drop(removals);
            self.accepted.lock().extend(fresh_ids);
            Ok(answers)
        };
        run().map_err(|err| database(&self.path, err))
    }

    fn each(&self, error: &OutboxError) -> OutboxError {
        self.file.failed(&error.to_string());
        let message = match error {
            OutboxError::Database { message, .. } => message.clone(),
            other => other.to_string(),
        };
        OutboxError::Database {
            path: self.path.clone(),
            message,
        }
    }

    fn panicked(&self) -> OutboxError {
        let error = OutboxError::Database {
            path: self.path.clone(),
            message: "the commit holding this write panicked".to_string(),
        };
        self.file.failed(&error.to_string());
        error
    }

    fn healthy(&self) -> bool {
        self.file.is_writable()
    }

    fn reopen(&self, attempt: u32) -> bool {
        self.reopen_file(attempt, false).is_ok()
    }

    /// At exit, with removals a failed commit took back and nothing has
    /// made again yet (the file was not reopened since, or the last sync
    /// failed): the file is reopened once more, which makes them again if
    /// the disk has room now. Otherwise each of those leases is named: the
    /// next start sends its report again, a repeat of the outcome the
    /// plane has (review 1 of stop 37 saw such repeats with no line about
    /// them, after a SIGTERM while the disk was full).
    fn closing(&self) {
        if self.unsynced_removals.borrow().is_empty() {
            return;
        }
        // Healthy, they are a sync away from the disk (the writer syncs as
        // it closes; should it not have, this does).
        if self.healthy() && self.sync().is_ok() {
            return;
        }
        let Err(error) = self.reopen_file(0, true) else {
            return;
        };
        let lost = self.unsynced_removals.borrow();
        const NAMED: usize = 20;
        let leases: Vec<&str> = lost.iter().take(NAMED).map(String::as_str).collect();
        tracing::warn!(
            path = %self.path.display(),
            %error,
            count = lost.len(),
            ?leases,
            more = lost.len().saturating_sub(NAMED),
            "exiting before the outbox could record that these leases' reports were answered (a commit \
             after their removal failed, and the file could not be reopened to make them again): the next \
             start sends those reports again, a repeat of the outcome the control plane has"
        );
    }

    fn unavailable(&self) -> OutboxError {
        self.file.unavailable()
    }

    fn unsynced(&self) -> bool {
        self.unsynced.get()
    }

    /// An empty synced commit: redb puts the unsynced commits before it on
    /// disk with it.
    fn sync(&self) -> Result<(), OutboxError> {
        let run = || -> Result<(), redb::Error> {
            let db = self
                .file
                .current()
                .map_err(|err| redb::Error::Corrupted(err.to_string()))?;
            db.begin_write()?.commit()?;
            Ok(())
        };
        run().map_err(|err| database(&self.path, err))?;
        self.unsynced.set(false);
        self.unsynced_removals.borrow_mut().clear();
        Ok(())
    }
}

fn deadline(value: &[u8]) -> i64 {
    i64::from_le_bytes(value[1..9].try_into().expect("8 bytes"))
}

fn written(value: &[u8]) -> i64 {
    if value.len() < HEADER {
        return 0;
    }
    i64::from_le_bytes(value[9..17].try_into().expect("8 bytes"))
}

fn decode(lease_id: &str, value: &[u8]) -> Result<PendingReport, OutboxError> {
    let corrupt = || OutboxError::Corrupt(lease_id.to_string());
    if value.len() < HEADER {
        return Err(corrupt());
    }
    let body = &value[HEADER..];
    let report = match value[0] {
        TAG_COMPLETE => Report::Complete(CompleteRequest::decode(body).map_err(|_| corrupt())?),
        TAG_FAIL => Report::Fail(FailRequest::decode(body).map_err(|_| corrupt())?),
        _ => return Err(corrupt()),
    };
    Ok(PendingReport {
        report,
        deadline_unix_ms: deadline(value),
        written_unix_ms: written(value),
    })
}

fn database(path: &Path, err: impl Into<redb::Error>) -> OutboxError {
    OutboxError::Database {
        path: path.to_path_buf(),
        message: err.into().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use redb::TableHandle;

    use super::*;

    fn fail(lease_id: &str) -> Report {
        Report::Fail(FailRequest {
            lease_id: lease_id.into(),
            run_id: format!("run-of-{lease_id}"),
            ..FailRequest::default()
        })
    }

    #[tokio::test]
    async fn the_async_twins_answer_as_the_blocking_calls_do() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let outbox = Outbox::open(dir.path()).expect("the outbox opens");
        // Deadline 1 ms after the epoch: long past its grace. 0: no deadline,
        // so it counts from now and is fresh.
        outbox.put(&fail("stale"), 1).expect("put");
        outbox.put(&fail("fresh"), 0).expect("put");

        let stored = outbox.get_async("stale").await.expect("get").expect("stored");
        assert_eq!((stored.lease_id(), stored.deadline_unix_ms), ("stale", 1));
        assert!(outbox.get_async("unknown").await.expect("get").is_none());
        let pending: Vec<String> = outbox
            .pending_async()
            .await
            .expect("pending")
            .iter()
            .map(|report| report.lease_id().to_string())
            .collect();
        assert_eq!(
            pending,
            outbox
                .pending()
                .expect("pending")
                .iter()
                .map(|r| r.lease_id().to_string())
                .collect::<Vec<_>>()
        );
        assert_eq!(pending.len(), 2);

        let pruned = outbox.prune_async(now_unix_ms()).await.expect("prune");
        assert_eq!(pruned.expired_reports, ["stale"]);
        assert!(outbox.get_async("fresh").await.expect("get").is_some());

        assert!(outbox.accept("old lease", 1).expect("accept"));
        assert_eq!(outbox.prune_accepted_async(now_unix_ms()).await.expect("prune"), 1);
        assert!(!outbox.is_accepted("old lease").expect("read"));
    }

    #[test]
    fn the_accepted_ids_of_an_older_file_are_moved_and_still_known() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join(FILE_NAME);
        let now = now_unix_ms();
        {
            // The layout of a node before 2026-12-07: ids as keys.
            let db = Database::create(&path).expect("create");
            let txn = db.begin_write().expect("write");
            {
                let mut old = txn.open_table(ACCEPTED_BY_ID).expect("table");
                old.insert("recent", (now, now + 60_000)).expect("insert");
                old.insert("expired", (now - 3_600_000, 1)).expect("insert");
                txn.open_table(PENDING).expect("table");
            }
            txn.commit().expect("commit");
        }
        let outbox = Outbox::open(dir.path()).expect("the outbox opens");
        for lease_id in ["recent", "expired"] {
            assert!(outbox.is_accepted(lease_id).expect("read"), "{lease_id}");
            assert!(
                !outbox.accept(lease_id, now + 60_000).expect("accept"),
                "{lease_id} runs once"
            );
        }
        assert!(outbox.accept("new", now + 60_000).expect("accept"));
        assert_eq!(outbox.prune_accepted(now_unix_ms()).expect("prune"), 1);
        assert!(!outbox.is_accepted("expired").expect("read"));
        drop(outbox);

        // Moved, not copied: the old table is gone, and a reopen reads the
        // set from the new one.
        let outbox = Outbox::open(dir.path()).expect("the outbox opens again");
        let names: Vec<String> = outbox
            .read(|db| Ok(db.begin_read()?.list_tables()?.map(|t| t.name().to_string()).collect()))
            .expect("tables");
        assert!(!names.contains(&"accepted".to_string()), "{names:?}");
        for (lease_id, known) in [("recent", true), ("new", true), ("expired", false), ("never", false)] {
            assert_eq!(outbox.is_accepted(lease_id).expect("read"), known, "{lease_id}");
        }
    }

    /// A file that went to an older node and came back: the id has a row
    /// in each layout, the older one expired. It stays known.
    #[test]
    fn an_id_in_both_layouts_is_known_until_neither_row_is_live() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let now = now_unix_ms();
        drop(Outbox::open(dir.path()).expect("the outbox opens"));
        {
            let db = Database::create(dir.path().join(FILE_NAME)).expect("open");
            let txn = db.begin_write().expect("write");
            {
                let mut today = txn.open_table(ACCEPTED).expect("table");
                today.insert((now - 3_600_000, "again"), 1).expect("insert");
                let mut old = txn.open_table(ACCEPTED_BY_ID).expect("table");
                old.insert("again", (now, now + 60_000)).expect("insert");
            }
            txn.commit().expect("commit");
        }
        let outbox = Outbox::open(dir.path()).expect("the outbox opens");
        assert_eq!(
            outbox.prune_accepted(now_unix_ms()).expect("prune"),
            0,
            "no id forgotten"
        );
        assert!(outbox.is_accepted("again").expect("read"));
        assert!(!outbox.accept("again", now + 60_000).expect("accept"), "it runs once");
        assert_eq!(outbox.prune_accepted(now + 60_000 + 11 * 60_000).expect("prune"), 1);
        assert!(!outbox.is_accepted("again").expect("read"));
    }

    /// The `outbox` commands leave an older node's accepted ids where that
    /// node reads them.
    #[test]
    fn opening_for_a_command_moves_nothing() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        {
            let db = Database::create(dir.path().join(FILE_NAME)).expect("create");
            let txn = db.begin_write().expect("write");
            txn.open_table(ACCEPTED_BY_ID)
                .expect("table")
                .insert("old", (now_unix_ms(), now_unix_ms() + 60_000))
                .expect("insert");
            txn.commit().expect("commit");
        }
        let outbox = Outbox::open_leaving_layout(dir.path()).expect("the outbox opens");
        assert_eq!(outbox.pending_count().expect("count"), 0);
        let left = outbox
            .read(|db| Ok(db.begin_read()?.open_table(ACCEPTED_BY_ID)?.len()?))
            .expect("the old table");
        assert_eq!(left, 1);
    }

    /// An older node's table left in place (no room to move it, or opened
    /// for a command): its ids are known, pruned on the same rule, and an
    /// id with a live row in either table stays known.
    #[test]
    fn ids_left_in_the_older_table_are_known_and_pruned_there() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let now = now_unix_ms();
        let hour = 3_600_000;
        {
            let db = Database::create(dir.path().join(FILE_NAME)).expect("create");
            let txn = db.begin_write().expect("write");
            {
                let mut old = txn.open_table(ACCEPTED_BY_ID).expect("table");
                old.insert("old-live", (now, now + 60_000)).expect("insert");
                old.insert("old-expired", (now - hour, 1)).expect("insert");
                old.insert("both", (now - hour, 1)).expect("insert");
                let mut new = txn.open_table(ACCEPTED).expect("table");
                new.insert((now, "both"), now + 60_000).expect("insert");
            }
            txn.commit().expect("commit");
        }
        let outbox = Outbox::open_leaving_layout(dir.path()).expect("the outbox opens");
        for lease_id in ["old-live", "old-expired", "both"] {
            assert!(outbox.is_accepted(lease_id).expect("read"), "{lease_id}");
            assert!(
                !outbox.accept(lease_id, now + 60_000).expect("accept"),
                "{lease_id} runs once"
            );
        }
        assert_eq!(outbox.prune_accepted(now_unix_ms()).expect("prune"), 1);
        for (lease_id, known) in [("old-live", true), ("old-expired", false), ("both", true)] {
            assert_eq!(outbox.is_accepted(lease_id).expect("read"), known, "{lease_id}");
        }
        let left = outbox
            .read(|db| Ok(db.begin_read()?.open_table(ACCEPTED_BY_ID)?.len()?))
            .expect("the old table");
        assert_eq!(left, 1, "old-live alone stays in the older table");
        drop(outbox);
        // The next start with room moves what is left.
        let outbox = Outbox::open(dir.path()).expect("the outbox opens again");
        for (lease_id, known) in [("old-live", true), ("old-expired", false), ("both", true)] {
            assert_eq!(outbox.is_accepted(lease_id).expect("read"), known, "{lease_id}");
        }
        assert!(!outbox.accepted.has_old_table());
    }

    /// The lock file, not redb's lock alone, keeps a second opener out:
    /// redb's goes with the database while the file is reopened.
    #[test]
    fn the_lock_file_keeps_a_second_opener_out() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let held = std::fs::File::create(dir.path().join(LOCK_FILE_NAME)).expect("the lock file");
        held.try_lock().expect("locked here");
        match Outbox::open(dir.path()) {
            Err(OutboxError::Locked(path)) => assert_eq!(path, dir.path().join(FILE_NAME)),
            other => panic!("opened past the lock: {other:?}"),
        }
        drop(held);
        let outbox = Outbox::open(dir.path()).expect("opens once the lock is free");
        assert!(matches!(Outbox::open(dir.path()), Err(OutboxError::Locked(_))));
        drop(outbox);
    }

    #[test]
    fn a_lease_accepted_twice_in_one_commit_runs_once() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let outbox = Outbox::open(dir.path()).expect("the outbox opens");
        let deadline = now_unix_ms() + 60_000;
        let answers: Vec<bool> = outbox
            .accept_all(&[("a", deadline), ("b", deadline), ("a", deadline)])
            .into_iter()
            .map(|answer| answer.expect("accept"))
            .collect();
        assert_eq!(answers, [true, true, false]);
        assert_eq!(outbox.in_flight().expect("in flight").len(), 2);
    }
}
