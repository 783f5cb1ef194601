//! The plane's runs on disk: `runs.redb` in the data dir, an embedded
//! database (redb, as the node's outbox), one row per run keyed by its
//! place in submission order.
//!
//! Every change is written, as the rows it touched, before the REST or
//! gRPC answer that reports it, so a plane killed at any point never
//! forgets an outcome it acknowledged or a lease it handed out. Nodes are
//! not saved: after a restart they get 404 on heartbeat and register
//! again, as with the reference.
//!
//! The agents and their versions (the agent API) live in two more tables
//! of the same file, written the same way, one change per transaction.
//!
//! A change costs the rows it touched, whatever the number of runs (the
//! whole-file `runs.json` this replaces slowed from 96 to 7 submissions a
//! second over 10,000). A `runs.json` left by an older plane is imported
//! once, then renamed `runs.json.imported`.
//!
//! Commits are not fsynced: once a commit returns, its pages are in the
//! kernel's page cache, which outlives the process, so a crash or SIGKILL
//! of the plane loses nothing; only a power loss or kernel crash could,
//! and this plane is for development, where an fsync per lease would cost
//! more than it protects (the database then opens at its last whole
//! commit).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use redb::backends::FileBackend;
use redb::{Database, DatabaseError, ReadableTable, StorageBackend, TableDefinition};
use serde::Deserialize;
use support::sync::lock;

use super::agents::{Agent, AgentChange, AgentVersion};
use super::state::Run;

const FILE_NAME: &str = "runs.redb";
/// What older planes wrote: the whole list of runs, rewritten per change.
const LEGACY_FILE: &str = "runs.json";
const LEGACY_FORMAT: u32 = 1;
/// A run's place in submission order -> the run as JSON (the REST shape).
const RUNS: TableDefinition<u64, &[u8]> = TableDefinition::new("runs_v1");
/// An agent id -> the agent as JSON (the REST shape).
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents_v1");
/// (agent id, version) -> the version as JSON (the REST shape).
const AGENT_VERSIONS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("agent_versions_v1");

/// The agents and versions a data dir holds.
#[derive(Debug, Default)]
pub struct SavedAgents {
    pub agents: Vec<Agent>,
    pub versions: Vec<AgentVersion>,
}

/// Why a change could not be saved; the message names the file and what
/// to check.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot save to {}: {source}; check that it is a writable file in a writable directory with free space",
    path.display()
)]
pub struct SaveError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Why the runs could not be loaded at start; the message names the file
/// and what to do.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot create the data dir {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} is in use by another dev plane (or another process); stop it, or pass another data dir",
        path.display()
    )]
    InUse { path: PathBuf },
    #[error(
        "cannot open {} ({source}); if it is damaged, move it away (the runs in it are lost) or pass another data dir",
        path.display()
    )]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error(
        "{} holds a run that cannot be read ({message}); move the file away or pass another data dir",
        path.display()
    )]
    Row { path: PathBuf, message: String },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} is not a dev plane runs file ({source}); move it away or pass another data dir",
        path.display()
    )]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{} has format {found}, this plane reads format {LEGACY_FORMAT}; move it away or pass another data dir",
        path.display()
    )]
    Format { path: PathBuf, found: u32 },
    #[error(
        "{} and {} both hold runs: the old file was imported before, or copied back since; \
         move {} away to keep the database's runs",
        legacy.display(), database.display(), legacy.display()
    )]
    Both { legacy: PathBuf, database: PathBuf },
    #[error("cannot import {} into {}: {source}", legacy.display(), database.display())]
    Import {
        legacy: PathBuf,
        database: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Deserialize)]
struct LegacyFile {
    format: u32,
    runs: Vec<Run>,
}

/// One run to write: its place in submission order and its JSON.
pub struct Row {
    pub at: u64,
    pub bytes: Vec<u8>,
}

impl Row {
    pub fn of(at: usize, run: &Run) -> Row {
        Row {
            at: at as u64,
            bytes: serde_json::to_vec(run).expect("runs are plain data and always serialize"),
        }
    }
}

pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// `None` once closed, or while it cannot be opened again after a
    /// failed write.
    db: Mutex<Option<Arc<Database>>>,
    /// Set when the plane shuts down: the file is free for the next plane
    /// on this data dir, even while tasks of this one unwind.
    closed: AtomicBool,
    /// Set after a failed write: redb refuses every later write until the
    /// database is opened again, which the next save tries.
    reopen: AtomicBool,
    /// Makes every write fail, as a full or failing disk would.
    failing: Arc<AtomicBool>,
}

/// redb's file backend without the fsync (see the module's paragraph),
/// whose writes can be made to fail, to test what a failing disk does.
#[derive(Debug)]
struct PageCacheOnly {
    file: FileBackend,
    failing: Arc<AtomicBool>,
}

impl PageCacheOnly {
    fn check(&self) -> Result<(), std::io::Error> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(std::io::Error::other(
                "writes made to fail (DevPlane::fail_disk_writes)",
            ));
        }
        Ok(())
    }
}

impl StorageBackend for PageCacheOnly {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.file.len()
    }

    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, std::io::Error> {
        self.file.read(offset, len)
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.check()?;
        self.file.set_len(len)
    }

    fn sync_data(&self, _eventual: bool) -> Result<(), std::io::Error> {
        self.check()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.check()?;
        self.file.write(offset, data)
    }
}

impl Store {
    /// Opens (creating if needed) the data dir and its database, imports a
    /// `runs.json` left there by an older plane, and loads the saved runs
    /// in submission order.
    pub fn open(dir: &Path) -> Result<(Store, Vec<Run>, SavedAgents), LoadError> {
        std::fs::create_dir_all(dir).map_err(|source| LoadError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(FILE_NAME);
        let failing = Arc::new(AtomicBool::new(false));
        let db = open_database(&path, &failing)?;
        let mut runs = read_runs(&db, &path)?;
        let agents = read_agents(&db, &path)?;
        let legacy = dir.join(LEGACY_FILE);
        if let Some(imported) = read_legacy(&legacy)? {
            if !runs.is_empty() {
                return Err(LoadError::Both { legacy, database: path });
            }
            let import_failed = |source: std::io::Error| LoadError::Import {
                legacy: legacy.clone(),
                database: path.clone(),
                source,
            };
            // A run id listed twice keeps its first entry, as the old
            // plane loaded it, so each row's key is the run's place.
            let mut seen = std::collections::HashSet::new();
            let imported: Vec<Run> = imported
                .into_iter()
                .filter(|run| seen.insert(run.run_id.clone()))
                .collect();
            let rows: Vec<Row> = imported.iter().enumerate().map(|(at, run)| Row::of(at, run)).collect();
            write_rows(&db, &rows).map_err(import_failed)?;
            let renamed = legacy.with_extension("json.imported");
            std::fs::rename(&legacy, &renamed).map_err(import_failed)?;
            tracing::info!(
                runs = imported.len(),
                from = %legacy.display(),
                into = %path.display(),
                "imported the runs of an older dev plane; the old file is now {}",
                renamed.display()
            );
            runs = imported;
        }
        let inner = Inner {
            path,
            db: Mutex::new(Some(Arc::new(db))),
            closed: AtomicBool::new(false),
            reopen: AtomicBool::new(false),
            failing,
        };
        Ok((Store { inner: Arc::new(inner) }, runs, agents))
    }

    /// The database file.
    pub fn path(&self) -> PathBuf {
        self.inner.path.clone()
    }

    /// Writes the rows in one transaction; when this returns `Ok`, they
    /// are in the file (see the module's paragraph on fsync). Callers
    /// never save concurrently (the ledger serializes them).
    pub async fn save(&self, rows: Vec<Row>) -> Result<(), SaveError> {
        self.save_with(move |db| write_rows(db, &rows)).await
    }

    /// Writes one change to the agents in one transaction, with the same
    /// durability as [`save`](Self::save).
    pub async fn save_agents(&self, change: AgentChange) -> Result<(), SaveError> {
        self.save_with(move |db| write_agent_change(db, &change)).await
    }

    async fn save_with(
        &self,
        write: impl FnOnce(&Database) -> Result<(), std::io::Error> + Send + 'static,
    ) -> Result<(), SaveError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || inner.save(write))
            .await
            .unwrap_or_else(|join| Err(std::io::Error::other(join)))
            .map_err(|source| SaveError {
                path: self.path(),
                source,
            })
    }

    /// Closes the database (once a save in flight, if any, ends); later
    /// saves fail.
    pub fn close(&self) {
        let mut db = lock(&self.inner.db);
        self.inner.closed.store(true, Ordering::SeqCst);
        db.take();
    }

    /// Makes every write fail (`true`) or work again (`false`).
    pub fn fail_writes(&self, failing: bool) {
        self.inner.failing.store(failing, Ordering::SeqCst);
    }
}

impl Inner {
    fn save(&self, write: impl FnOnce(&Database) -> Result<(), std::io::Error>) -> Result<(), std::io::Error> {
        let db = {
            let mut db = lock(&self.db);
            if self.closed.load(Ordering::SeqCst) {
                return Err(std::io::Error::other("the plane is shut down"));
            }
            if self.reopen.load(Ordering::SeqCst) {
                // The old handle must be gone (its file lock with it)
                // before the file is opened again.
                db.take();
                let reopened = open_database(&self.path, &self.failing).map_err(std::io::Error::other)?;
                *db = Some(Arc::new(reopened));
                self.reopen.store(false, Ordering::SeqCst);
                tracing::info!(path = %self.path.display(), "dev control plane reopened its runs database after a failed write");
            }
            db.clone()
        };
        let Some(db) = db else {
            unreachable!("an open store holds its database, or returned above")
        };
        let written = write(&db);
        if written.is_err() {
            self.reopen.store(true, Ordering::SeqCst);
        }
        written
    }
}

fn open_database(path: &Path, failing: &Arc<AtomicBool>) -> Result<Database, LoadError> {
    let open_failed = |source: redb::Error| LoadError::Open {
        path: path.to_path_buf(),
        source: Box::new(source),
    };
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|err| open_failed(err.into()))?;
    let backend = match FileBackend::new(file) {
        Ok(backend) => backend,
        Err(DatabaseError::DatabaseAlreadyOpen) => {
            return Err(LoadError::InUse {
                path: path.to_path_buf(),
            });
        }
        Err(err) => return Err(open_failed(err.into())),
    };
    let backend = PageCacheOnly {
        file: backend,
        failing: Arc::clone(failing),
    };
    match Database::builder().create_with_backend(backend) {
        Ok(db) => Ok(db),
        Err(DatabaseError::DatabaseAlreadyOpen) => Err(LoadError::InUse {
            path: path.to_path_buf(),
        }),
        Err(err) => Err(open_failed(err.into())),
    }
}

fn read_runs(db: &Database, path: &Path) -> Result<Vec<Run>, LoadError> {
    let open_failed = |source: redb::Error| LoadError::Open {
        path: path.to_path_buf(),
        source: Box::new(source),
    };
    let read = db.begin_read().map_err(|err| open_failed(err.into()))?;
    let table = match read.open_table(RUNS) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(err) => return Err(open_failed(err.into())),
    };
    let mut runs = Vec::new();
    for row in table.iter().map_err(|err| open_failed(err.into()))? {
        let (at, bytes) = row.map_err(|err| open_failed(err.into()))?;
        let run: Run = serde_json::from_slice(bytes.value()).map_err(|err| LoadError::Row {
            path: path.to_path_buf(),
            message: format!("row {}: {err}", at.value()),
        })?;
        runs.push(run);
    }
    Ok(runs)
}

fn read_agents(db: &Database, path: &Path) -> Result<SavedAgents, LoadError> {
    let open_failed = |source: redb::Error| LoadError::Open {
        path: path.to_path_buf(),
        source: Box::new(source),
    };
    let bad_row = |what: String, err: serde_json::Error| LoadError::Row {
        path: path.to_path_buf(),
        message: format!("{what}: {err}"),
    };
    let read = db.begin_read().map_err(|err| open_failed(err.into()))?;
    let mut saved = SavedAgents::default();
    match read.open_table(AGENTS) {
        Ok(table) => {
            for row in table.iter().map_err(|err| open_failed(err.into()))? {
                let (id, bytes) = row.map_err(|err| open_failed(err.into()))?;
                let agent = serde_json::from_slice(bytes.value())
                    .map_err(|err| bad_row(format!("agent {}", id.value()), err))?;
                saved.agents.push(agent);
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(err) => return Err(open_failed(err.into())),
    }
    match read.open_table(AGENT_VERSIONS) {
        Ok(table) => {
            for row in table.iter().map_err(|err| open_failed(err.into()))? {
                let (key, bytes) = row.map_err(|err| open_failed(err.into()))?;
                let (id, version) = key.value();
                let version = serde_json::from_slice(bytes.value())
                    .map_err(|err| bad_row(format!("agent {id} version {version}"), err))?;
                saved.versions.push(version);
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(err) => return Err(open_failed(err.into())),
    }
    Ok(saved)
}

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("agents are plain data and always serialize")
}

fn write_agent_change(db: &Database, change: &AgentChange) -> Result<(), std::io::Error> {
    let write = db.begin_write().map_err(std::io::Error::other)?;
    {
        let mut agents = write.open_table(AGENTS).map_err(std::io::Error::other)?;
        let mut versions = write.open_table(AGENT_VERSIONS).map_err(std::io::Error::other)?;
        match change {
            AgentChange::PutAgent(agent) => {
                agents
                    .insert(agent.agent_id.as_str(), to_json(agent).as_slice())
                    .map_err(std::io::Error::other)?;
            }
            AgentChange::DeleteAgent {
                agent_id,
                versions: numbers,
            } => {
                agents.remove(agent_id.as_str()).map_err(std::io::Error::other)?;
                for version in numbers {
                    versions
                        .remove((agent_id.as_str(), version.as_str()))
                        .map_err(std::io::Error::other)?;
                }
            }
            AgentChange::PutVersion(version) => {
                versions
                    .insert(
                        (version.agent_id.as_str(), version.version.as_str()),
                        to_json(version).as_slice(),
                    )
                    .map_err(std::io::Error::other)?;
            }
            AgentChange::DeleteVersion { agent_id, version } => {
                versions
                    .remove((agent_id.as_str(), version.as_str()))
                    .map_err(std::io::Error::other)?;
            }
        }
    }
    write.commit().map_err(std::io::Error::other)
}

/// The runs of an older plane's `runs.json`, if there is one.
fn read_legacy(path: &Path) -> Result<Option<Vec<Run>>, LoadError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(LoadError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let file: LegacyFile = serde_json::from_slice(&bytes).map_err(|source| LoadError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    if file.format != LEGACY_FORMAT {
        return Err(LoadError::Format {
            path: path.to_path_buf(),
            found: file.format,
        });
    }
    Ok(Some(file.runs))
}

fn write_rows(db: &Database, rows: &[Row]) -> Result<(), std::io::Error> {
    let write = db.begin_write().map_err(std::io::Error::other)?;
    {
        let mut table = write.open_table(RUNS).map_err(std::io::Error::other)?;
        for row in rows {
            table
                .insert(row.at, row.bytes.as_slice())
                .map_err(std::io::Error::other)?;
        }
    }
    write.commit().map_err(std::io::Error::other)
}
