//! A damaged `outbox.redb`: recognising one, moving it aside so the node
//! starts (rather than crash at every start under `Restart=always`), and
//! reading what is left of it.
//!
//! redb answers a file of random bytes with an I/O error ("invalid data"),
//! and panics on a truncated one (an assertion on the file's length): both
//! count as damaged. A file locked by another process, or one redb cannot
//! read for another reason (permissions, an older file format), is not
//! damaged and is never moved.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use redb::{Database, ReadableTable};

use super::{FILE_NAME, OutboxError, PENDING, PendingReport, decode};

/// How opening the file went, when it did not.
pub(super) enum OpenFailure {
    Locked,
    Damaged(String),
    Other(redb::DatabaseError),
}

/// Opens (`create`: creating) the database at `path`, telling a damaged
/// file from other failures. A panic inside redb is caught, and its
/// message kept off stderr: it becomes the reason.
pub(super) fn open_database(path: &Path, create: bool) -> Result<Database, OpenFailure> {
    let opened = quietly(|| {
        if create {
            Database::create(path)
        } else {
            Database::open(path)
        }
    });
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => Err(OpenFailure::Locked),
        Ok(Err(err)) if is_damage(&err) => Err(OpenFailure::Damaged(err.to_string())),
        Ok(Err(err)) => Err(OpenFailure::Other(err)),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|text| text.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "redb panicked".to_string());
            Err(OpenFailure::Damaged(format!("redb cannot read it: {message}")))
        }
    }
}

thread_local! {
    /// Whether a panic on this thread is being caught as a reason, not a
    /// crash, and so stays off stderr.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, catching a panic, with the panic's message kept off stderr
/// for this thread only. The process's panic hook is wrapped once, never
/// swapped per call: swapping it would silence every other thread's
/// panics meanwhile, and two swaps racing could leave the silent hook in
/// place for good.
fn quietly<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> std::thread::Result<T> {
    static WRAPPED: std::sync::Once = std::sync::Once::new();
    WRAPPED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    QUIET.with(|quiet| quiet.set(true));
    let result = std::panic::catch_unwind(f);
    QUIET.with(|quiet| quiet.set(false));
    result
}

fn is_damage(err: &redb::DatabaseError) -> bool {
    match err {
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(_)) => true,
        redb::DatabaseError::Storage(redb::StorageError::Io(io)) => {
            matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            )
        }
        _ => false,
    }
}

/// Moves a damaged outbox file aside, next to where it was, as
/// `outbox.redb.corrupt-<UTC time>`; returns the new path.
pub(super) fn set_aside(path: &Path) -> Result<PathBuf, OutboxError> {
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace([':', '-'], "");
    let aside = path.with_file_name(format!("{FILE_NAME}.corrupt-{stamp}"));
    std::fs::rename(path, &aside).map_err(|err| OutboxError::Database {
        path: path.to_path_buf(),
        message: format!(
            "it is damaged, and moving it aside to {} failed: {err}; move or delete it by hand",
            aside.display()
        ),
    })?;
    Ok(aside)
}

/// What could be read from an outbox file, damaged or not.
#[derive(Debug)]
pub struct Salvaged {
    /// The reports read, oldest first.
    pub reports: Vec<PendingReport>,
    /// Entries found but not readable (cut short, or not a report).
    pub unreadable: usize,
    /// Why reading stopped early, if it did.
    pub stopped: Option<String>,
}

/// Reads the pending reports of the outbox file at `path` without
/// changing it: a copy is opened (redb repairs what it can in the copy),
/// and each entry is read on its own. Err says nothing could be read.
pub fn salvage(path: &Path) -> Result<Salvaged, OutboxError> {
    let fail = |message: String| OutboxError::Damaged {
        path: path.to_path_buf(),
        reason: message,
    };
    let scratch = tempfile::tempdir().map_err(|err| fail(format!("no temporary directory for a copy: {err}")))?;
    let copy = scratch.path().join(FILE_NAME);
    std::fs::copy(path, &copy).map_err(|err| fail(format!("cannot copy it: {err}")))?;
    let db = match open_database(&copy, false) {
        Ok(db) => db,
        Err(OpenFailure::Damaged(reason)) => return Err(fail(reason)),
        Err(OpenFailure::Locked) => return Err(fail("its copy is locked".to_string())),
        Err(OpenFailure::Other(err)) => return Err(fail(err.to_string())),
    };
    let mut salvaged = Salvaged {
        reports: Vec::new(),
        unreadable: 0,
        stopped: None,
    };
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<(), redb::Error> {
        let txn = db.begin_read()?;
        let table = txn.open_table(PENDING)?;
        for entry in table.iter()? {
            match entry {
                Ok((key, value)) => match decode(key.value(), value.value()) {
                    Ok(report) => salvaged.reports.push(report),
                    Err(_) => salvaged.unreadable += 1,
                },
                Err(err) => {
                    salvaged.unreadable += 1;
                    salvaged.stopped = Some(err.to_string());
                    break;
                }
            }
        }
        Ok(())
    }));
    match read {
        Ok(Ok(())) => {}
        Ok(Err(err)) if salvaged.reports.is_empty() => return Err(fail(err.to_string())),
        Ok(Err(err)) => salvaged.stopped = Some(err.to_string()),
        Err(_) if salvaged.reports.is_empty() => return Err(fail("redb panicked while reading it".to_string())),
        Err(_) => salvaged.stopped = Some("redb panicked while reading it".to_string()),
    }
    salvaged.reports.sort_by_key(|report| report.written_unix_ms);
    Ok(salvaged)
}
