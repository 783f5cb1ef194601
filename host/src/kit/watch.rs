//! Waiting for a save: the project's files are polled for changes (their
//! modification times, every [`POLL`]), and a change counts once no other
//! has followed for [`QUIET`] (an editor's save is often several writes).
//! Polling rather than inotify: a project is a few dozen files, a poll is
//! microseconds, and it behaves the same on every filesystem and OS.
//!
//! Build output is ignored: the project's `target/`, hidden files and
//! folders, `node_modules/`, `__pycache__/`, and `Cargo.lock` (cargo
//! writes it on the first build).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How often the files are looked at.
pub const POLL: Duration = Duration::from_millis(100);
/// How long a change must stand alone before it counts.
pub const QUIET: Duration = Duration::from_millis(200);
/// The most files looked at: more means the watched folder is not a
/// project (a home directory, say).
const MAX_FILES: usize = 20_000;

/// The project's files and their modification times.
pub type Snapshot = BTreeMap<PathBuf, SystemTime>;

/// Reads the modification times of the project's sources.
pub fn snapshot(dir: &Path) -> Snapshot {
    let mut files = Snapshot::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(at) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&at) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || matches!(name.as_ref(), "node_modules" | "__pycache__" | "Cargo.lock") {
                continue;
            }
            if at == dir && name == "target" {
                continue;
            }
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() {
                pending.push(entry.path());
            } else if let Ok(modified) = entry.metadata().and_then(|meta| meta.modified()) {
                files.insert(entry.path(), modified);
                if files.len() >= MAX_FILES {
                    return files;
                }
            }
        }
    }
    files
}

/// Waits until the files differ from `before` and then stay the same for
/// [`QUIET`]; returns the new snapshot and when the last change was saved
/// (the newest modification time among the changed files, or now for a
/// removal).
pub async fn next_change(dir: &Path, before: &Snapshot) -> (Snapshot, SystemTime) {
    let mut seen = before.clone();
    loop {
        tokio::time::sleep(POLL).await;
        let now = snapshot(dir);
        if now == seen {
            continue;
        }
        seen = now;
        // Debounce: wait for the writes to stop.
        loop {
            tokio::time::sleep(QUIET).await;
            let again = snapshot(dir);
            if again == seen {
                break;
            }
            seen = again;
        }
        if seen == *before {
            continue;
        }
        // A file restored with an older time (`cp -p`, `tar`, `mv` of an
        // older file) would look unchanged to cargo, which compares times:
        // it is given the time of the save, so the build sees it.
        let newest_before = before.values().max().copied();
        let mut saved: Option<SystemTime> = None;
        for (path, modified) in seen.iter_mut() {
            if before.get(path) == Some(modified) {
                continue;
            }
            if newest_before.is_some_and(|newest| *modified <= newest)
                && let Ok(now) = touch(path)
            {
                *modified = now;
            }
            saved = saved.max(Some(*modified));
        }
        return (seen, saved.unwrap_or_else(SystemTime::now));
    }
}

/// Sets `path`'s modification time to now; returns it.
fn touch(path: &Path) -> std::io::Result<SystemTime> {
    let file = std::fs::File::options().append(true).open(path)?;
    file.set_modified(SystemTime::now())?;
    file.metadata()?.modified()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_output_and_hidden_files_are_not_watched() {
        let dir = tempfile::tempdir().unwrap();
        for file in [
            "src/lib.rs",
            "target/x.wasm",
            ".git/HEAD",
            "node_modules/a.js",
            "sdk/target.rs",
        ] {
            let path = dir.path().join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "x").unwrap();
        }
        let names: Vec<_> = snapshot(dir.path())
            .keys()
            .map(|path| path.strip_prefix(dir.path()).unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["sdk/target.rs", "src/lib.rs"]);
    }

    /// A file put back with an older time than the last build (`cp -p`)
    /// is seen, and given the time of the save so cargo rebuilds it.
    #[tokio::test]
    async fn a_file_restored_with_an_older_time_is_seen_and_given_the_time_of_the_save() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("lib.rs");
        std::fs::write(&source, "new").unwrap();
        let before = snapshot(dir.path());
        let hours_ago = SystemTime::now() - Duration::from_secs(3 * 3600);
        std::fs::write(&source, "old").unwrap();
        std::fs::File::options()
            .append(true)
            .open(&source)
            .unwrap()
            .set_modified(hours_ago)
            .unwrap();
        let (after, saved) = tokio::time::timeout(Duration::from_secs(10), next_change(dir.path(), &before))
            .await
            .expect("the change is seen");
        let modified = std::fs::metadata(&source).unwrap().modified().unwrap();
        assert!(
            modified > before[&source],
            "the file's time moves past the last build's"
        );
        assert_eq!(after[&source], modified);
        assert_eq!(saved, modified);
    }
}
