//! Persistence of runs to one JSON file, `runs.json` in the data dir.
//!
//! Every change to runs is written before the REST or gRPC answer that
//! reports it, so a plane killed at any point never forgets an outcome it
//! acknowledged or a lease it handed out. Nodes are not saved: after a
//! restart they get 404 on heartbeat and register again, as with the
//! reference.
//!
//! The whole file is rewritten each time: simple, and cheap at development
//! scale (thousands of runs).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::state::Run;

const FILE_NAME: &str = "runs.json";
const FORMAT: u32 = 1;

/// Why the runs could not be saved; the message names the file and what
/// to check.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot save runs to {}: {source}; check that it is a writable file in a writable directory with free space",
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
        "{} has format {found}, this plane reads format {FORMAT}; move it away or pass another data dir",
        path.display()
    )]
    Format { path: PathBuf, found: u32 },
}

#[derive(Serialize)]
struct FileOut<'a> {
    format: u32,
    runs: &'a [Run],
}

#[derive(Deserialize)]
struct FileIn {
    format: u32,
    runs: Vec<Run>,
}

/// The runs at one revision, serialized while the state was locked.
pub struct Snapshot {
    pub revision: u64,
    pub bytes: Vec<u8>,
}

impl Snapshot {
    pub fn of(revision: u64, runs: &[Run]) -> Snapshot {
        let bytes = serde_json::to_vec_pretty(&FileOut { format: FORMAT, runs })
            .expect("runs are plain data and always serialize");
        Snapshot { revision, bytes }
    }
}

pub struct Store {
    path: PathBuf,
    temporary: PathBuf,
    /// The revision on disk. Held across the write, so writes never
    /// overlap and an older snapshot never overwrites a newer one.
    written: tokio::sync::Mutex<u64>,
}

impl Store {
    /// Opens (creating if needed) the data dir and loads the saved runs.
    pub fn open(dir: &Path) -> Result<(Store, Vec<Run>), LoadError> {
        std::fs::create_dir_all(dir).map_err(|source| LoadError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(FILE_NAME);
        let runs = match std::fs::read(&path) {
            Ok(bytes) => {
                let file: FileIn = serde_json::from_slice(&bytes).map_err(|source| LoadError::Parse {
                    path: path.clone(),
                    source,
                })?;
                if file.format != FORMAT {
                    return Err(LoadError::Format {
                        path,
                        found: file.format,
                    });
                }
                file.runs
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(LoadError::Read { path, source }),
        };
        let store = Store {
            temporary: dir.join(format!("{FILE_NAME}.tmp")),
            path,
            written: tokio::sync::Mutex::new(0),
        };
        Ok((store, runs))
    }

    /// The runs file.
    pub fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// Writes the snapshot unless a newer one is on disk already; returns
    /// once the file holds this revision or a later one.
    ///
    /// Write-to-temporary then rename: a reader (or the next start) sees
    /// the old file or the new one, never half of one. There is no fsync:
    /// once `rename` returns, the data is in the kernel's page cache, which
    /// outlives the process, so a crash or SIGKILL of the plane loses
    /// nothing. Only a power loss or kernel crash could, and this plane is
    /// for development, where an fsync per lease would cost more than it
    /// protects.
    pub async fn save(&self, snapshot: Snapshot) -> Result<(), SaveError> {
        let mut written = self.written.lock().await;
        if *written >= snapshot.revision {
            return Ok(());
        }
        let (path, temporary) = (self.path.clone(), self.temporary.clone());
        let result = tokio::task::spawn_blocking(move || {
            std::fs::write(&temporary, &snapshot.bytes)?;
            std::fs::rename(&temporary, &path)
        })
        .await
        .unwrap_or_else(|join| Err(std::io::Error::other(join)));
        result.map_err(|source| SaveError {
            path: self.path.clone(),
            source,
        })?;
        *written = snapshot.revision;
        Ok(())
    }
}
