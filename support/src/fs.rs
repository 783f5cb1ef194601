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
}
