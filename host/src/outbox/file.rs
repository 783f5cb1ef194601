//! The outbox's database file, as something that can fail and come back.
//!
//! redb marks a database failed after one I/O error (a full disk, a
//! failing device): every later read or write answers "Previous I/O error
//! occurred", until the database is closed and opened again. So the
//! outbox holds its `Database` here, where the writer thread can drop it
//! and open the file again, and where everyone else can see whether the
//! outbox records at the moment: it does not from the first failed commit
//! until a reopened database has committed a write with room to spare. The pull task waits on it before it reads the next lease, the
//! readiness probe and the metrics report it, and each such episode is
//! logged twice: once when it starts, once when it ends.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use redb::Database;
use tokio::sync::watch;

use super::{ACCEPTED, IN_FLIGHT, OutboxError, PENDING};

/// Where a reopened outbox proves it has room, and how much.
const PROBE: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("reopen_probe");
const PROBE_BYTES: usize = 256 * 1024;

/// Why the outbox cannot record, since when.
#[derive(Debug, Clone)]
pub struct OutboxFault {
    /// The error of the write that failed first.
    pub error: String,
    pub since: SystemTime,
    started: Instant,
}

/// The open database, or none while it is being reopened.
pub(super) struct DatabaseFile {
    path: PathBuf,
    /// The outbox's lock file, locked for as long as this lives.
    _lock: std::fs::File,
    db: RwLock<Option<Arc<Database>>>,
    writable: watch::Sender<bool>,
    fault: Mutex<Option<OutboxFault>>,
    write_failures: AtomicU64,
}

impl DatabaseFile {
    pub(super) fn new(path: PathBuf, db: Database, lock: std::fs::File) -> DatabaseFile {
        DatabaseFile {
            path,
            _lock: lock,
            db: RwLock::new(Some(Arc::new(db))),
            writable: watch::Sender::new(true),
            fault: Mutex::new(None),
            write_failures: AtomicU64::new(0),
        }
    }

    /// The database to read or write now. While it is closed for a reopen
    /// the answer is the fault that closed it.
    pub(super) fn current(&self) -> Result<Arc<Database>, OutboxError> {
        let db = self.db.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        match db.as_ref() {
            Some(db) => Ok(Arc::clone(db)),
            None => Err(self.unavailable()),
        }
    }

    /// The answer to a write while the outbox cannot record.
    pub(super) fn unavailable(&self) -> OutboxError {
        let error = self
            .fault()
            .map_or_else(|| "it is being reopened".to_string(), |fault| fault.error);
        OutboxError::Database {
            path: self.path.clone(),
            message: format!("the outbox cannot record until it is reopened (after: {error})"),
        }
    }

    pub(super) fn is_writable(&self) -> bool {
        *self.writable.borrow()
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<bool> {
        self.writable.subscribe()
    }

    pub(super) fn fault(&self) -> Option<OutboxFault> {
        self.fault
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(super) fn write_failures(&self) -> u64 {
        self.write_failures.load(Ordering::Relaxed)
    }

    /// A commit failed: the outbox records nothing more until reopened.
    /// Logged once per episode, at its start.
    pub(super) fn failed(&self, error: &str) {
        self.write_failures.fetch_add(1, Ordering::Relaxed);
        let mut fault = self.fault.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if fault.is_none() {
            tracing::error!(
                path = %self.path.display(),
                %error,
                "the outbox cannot record: the node takes no more leases (leases already read \
                 wait, unacknowledged) and reports finished meanwhile wait, unsent, until the \
                 outbox records again; it is reopened with back-off (free the disk, or fix the device)"
            );
            *fault = Some(OutboxFault {
                error: error.to_string(),
                since: SystemTime::now(),
                started: Instant::now(),
            });
        }
        drop(fault);
        self.writable.send_replace(false);
    }

    /// Closes the database and opens the file again, then commits a write
    /// to prove it records. On success the episode ends. `at_exit`: the
    /// last try of a closing outbox (the node takes no more leases), which
    /// proves nothing: what it commits next is all it will commit.
    pub(super) fn reopen(&self, attempt: u32, at_exit: bool) -> Result<(), String> {
        let mut slot = self.db.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Dropping the failed database releases its file lock, unless a
        // reader still holds it: then this attempt fails and the next one
        // tries again.
        slot.take();
        let opened = std::panic::catch_unwind(|| -> Result<Database, String> {
            let db = Database::create(&self.path).map_err(|err| err.to_string())?;
            // A small commit can succeed on a full disk (redb reuses pages
            // it already holds), and the next real write fail again: the
            // probe asks for room for a burst of writes, then gives it back
            // to the file, where later writes find it.
            let probe = || -> Result<(), redb::Error> {
                let txn = db.begin_write()?;
                txn.open_table(PENDING)?;
                txn.open_table(ACCEPTED)?;
                txn.open_table(IN_FLIGHT)?;
                txn.open_table(PROBE)?
                    .insert("room", vec![0u8; PROBE_BYTES].as_slice())?;
                txn.commit()?;
                let txn = db.begin_write()?;
                txn.delete_table(PROBE)?;
                txn.commit()?;
                Ok(())
            };
            // At exit no burst follows: the removals to make again need a
            // few pages, which a file can find where the probe's 256 KiB
            // would not fit (review 2 of stop 37).
            if !at_exit {
                probe().map_err(|err| err.to_string())?;
            }
            Ok(db)
        })
        .unwrap_or_else(|_| Err("redb panicked while opening the file".to_string()))?;
        *slot = Some(Arc::new(opened));
        drop(slot);
        let fault = self
            .fault
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let down_for = fault.map_or(Duration::ZERO, |fault| fault.started.elapsed());
        if at_exit {
            tracing::info!(path = %self.path.display(), down_for = ?down_for, "the outbox records again, as the node exits");
        } else {
            tracing::info!(
                path = %self.path.display(),
                down_for = ?down_for,
                attempts = attempt,
                "the outbox records again: taking leases again"
            );
        }
        self.writable.send_replace(true);
        Ok(())
    }
}
