//! Files written whole or not at all.

use std::io::Write;
use std::path::Path;

/// Whether a write must survive a crash of the machine once it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The bytes reach the disk before the file takes its name: for what
    /// would be costly or impossible to get again (a download, a compiled
    /// component).
    Synced,
    /// The name is atomic, the bytes are not forced out: after a crash the
    /// file may be missing or empty, never half the old and half the new.
    /// For what is checked when read (a checksummed record) or is cheap to
    /// make again.
    Unsynced,
}

/// Writes `bytes` to a temporary file beside `path`, then renames it into
/// place: a reader sees the old file, or the whole new one. The directory
/// must exist.
pub fn write_atomically(path: &Path, bytes: &[u8], durability: Durability) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.write_all(bytes)?;
    if durability == Durability::Synced {
        file.as_file().sync_all()?;
    }
    file.persist(path).map_err(|err| err.error)?;
    Ok(())
}

/// How much a folder of files with one extension may keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// At most this many bytes, summed over the files.
    Bytes(u64),
    /// At most this many files.
    Files(usize),
}

/// A file of a bounded cache, as eviction orders it: least recently
/// modified first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CachedFile {
    pub modified: std::time::SystemTime,
    pub len: u64,
    pub path: std::path::PathBuf,
}

/// The regular files ending in `.{extension}` directly in `dir` (none
/// when it cannot be read). Files whose metadata cannot be read are
/// skipped.
pub fn files_in(dir: &Path, extension: &str) -> Vec<CachedFile> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| entry.path().extension().is_some_and(|ext| ext == extension))
        .filter_map(|entry| {
            let meta = entry.metadata().ok()?;
            meta.is_file().then_some(())?;
            Some(CachedFile {
                modified: meta.modified().ok()?,
                len: meta.len(),
                path: entry.path(),
            })
        })
        .collect()
}

/// Deletes the least recently modified files ending in `.{extension}` in
/// `dir` until the rest fit `bound`, and returns each deleted file with its
/// length. Files it cannot read or delete are skipped: a bound kept
/// loosely is better than a cache that fails.
pub fn evict_oldest(dir: &Path, extension: &str, bound: Bound) -> Vec<(std::path::PathBuf, u64)> {
    evict_oldest_of(files_in(dir, extension), bound, None)
}

/// Deletes the least recently modified of `files` until the rest fit
/// `bound`, never `keep`, and returns each deleted file with its length.
/// For a cache spread over several folders (gather them with
/// [`files_in`]); files it cannot delete are skipped.
pub fn evict_oldest_of(
    mut files: Vec<CachedFile>,
    bound: Bound,
    keep: Option<&Path>,
) -> Vec<(std::path::PathBuf, u64)> {
    files.sort();
    let mut bytes: u64 = files.iter().map(|file| file.len).sum();
    let mut count = files.len();
    let mut evicted = Vec::new();
    for CachedFile { len, path, .. } in files {
        let fits = match bound {
            Bound::Bytes(max) => bytes <= max,
            Bound::Files(max) => count <= max,
        };
        if fits {
            break;
        }
        if Some(path.as_path()) == keep {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            bytes -= len;
            count -= 1;
            evicted.push((path, len));
        }
    }
    evicted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_the_file_and_leaves_no_temporary_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("entry");
        for (bytes, durability) in [(&b"old"[..], Durability::Synced), (&b"new"[..], Durability::Unsynced)] {
            write_atomically(&path, bytes, durability).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), bytes);
        }
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "only the file itself"
        );
    }

    #[test]
    fn a_missing_directory_is_an_error_not_a_write_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_atomically(&dir.path().join("no/such/entry"), b"x", Durability::Synced).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }

    fn aged(dir: &Path, name: &str, len: usize, age_s: u64) {
        let path = dir.join(name);
        std::fs::write(&path, vec![0u8; len]).unwrap();
        let when = std::time::SystemTime::now() - std::time::Duration::from_secs(age_s);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(when)
            .unwrap();
    }

    #[test]
    fn the_oldest_files_go_first_until_the_rest_fit() {
        let dir = tempfile::tempdir().unwrap();
        aged(dir.path(), "old.cwasm", 100, 300);
        aged(dir.path(), "mid.cwasm", 100, 200);
        aged(dir.path(), "new.cwasm", 100, 100);
        aged(dir.path(), "other.txt", 1000, 400);
        let evicted = evict_oldest(dir.path(), "cwasm", Bound::Bytes(150));
        let names: Vec<_> = evicted.iter().map(|(p, _)| p.file_name().unwrap().to_owned()).collect();
        assert_eq!(names, ["old.cwasm", "mid.cwasm"]);
        assert!(dir.path().join("new.cwasm").exists() && dir.path().join("other.txt").exists());
        assert!(
            evict_oldest(dir.path(), "cwasm", Bound::Bytes(150)).is_empty(),
            "already fits"
        );
        aged(dir.path(), "newer.cwasm", 1, 50);
        let evicted = evict_oldest(dir.path(), "cwasm", Bound::Files(1));
        assert_eq!(evicted.len(), 1);
        assert!(dir.path().join("newer.cwasm").exists());
    }
}
