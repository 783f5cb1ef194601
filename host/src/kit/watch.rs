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
/// How far behind the clock a file's modification time may be stamped
/// (the kernel takes it from a clock updated every tick).
const CLOCK_SLACK: Duration = Duration::from_millis(20);
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
    // The last moment the files were seen as `before` has them (at first
    // the call's, after the last build ended): a change saved later has a
    // later time. A changed file whose time is not later (restored by `cp
    // -p`, `tar`, `mv` of an older file, with any older time, even one
    // newer than every other source) could look unchanged to cargo, which
    // compares it with its last build's: it is given the time of the save.
    // A plain save keeps its own time, so an editor sees no change on disk
    // it did not make.
    let mut unchanged_at = SystemTime::now();
    let mut seen = before.clone();
    loop {
        tokio::time::sleep(POLL).await;
        // A save before this moment is in the snapshot taken after it.
        let polled_at = SystemTime::now();
        let now = snapshot(dir);
        if now == seen {
            if seen == *before {
                // Less the kernel's coarse clock, that stamps a write
                // made just after `polled_at` a little earlier than it.
                unchanged_at = unchanged_at.max(polled_at - CLOCK_SLACK);
            }
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
        let mut saved: Option<SystemTime> = None;
        for (path, modified) in seen.iter_mut() {
            if before.get(path) == Some(modified) {
                continue;
            }
            if *modified <= unchanged_at {
                match touch(path) {
                    Ok(now) => *modified = now,
                    // A file the watcher cannot write (read-only, or
                    // immutable) keeps its older time, and cargo may skip
                    // it: say so rather than run a stale build unawares.
                    Err(err) => eprintln!(
                        "watch: {} came back with a time from before the save and cannot be given \
                         the save's time ({err}); the build may not see the change: make the file \
                         writable, or touch it",
                        support::one_line::escape(&path.display().to_string())
                    ),
                }
            }
            saved = saved.max(Some(*modified));
        }
        return (seen, saved.unwrap_or_else(SystemTime::now));
    }
}

/// Sets `path`'s modification time to now; returns it.
fn touch(path: &Path) -> std::io::Result<SystemTime> {
    set_modified(path, SystemTime::now())
}

/// Sets `path`'s modification time; returns it as the file system keeps it.
fn set_modified(path: &Path, time: SystemTime) -> std::io::Result<SystemTime> {
    let file = std::fs::File::options().append(true).open(path)?;
    file.set_modified(time)?;
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
        set_modified(&source, hours_ago).unwrap();
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

    /// A file put back with a time newer than every source but older than
    /// the last build (`mv` of a file saved in between) is given the time
    /// of the save too; a plain save in the same change keeps its own.
    #[tokio::test]
    async fn a_file_restored_with_a_time_between_the_newest_source_and_the_last_build_is_given_the_time_of_the_save() {
        let dir = tempfile::tempdir().unwrap();
        let (restored, edited) = (dir.path().join("lib.rs"), dir.path().join("main.rs"));
        let two_hours_ago = SystemTime::now() - Duration::from_secs(2 * 3600);
        for file in [&restored, &edited] {
            std::fs::write(file, "old").unwrap();
            set_modified(file, two_hours_ago).unwrap();
        }
        let before = snapshot(dir.path());
        let called = SystemTime::now();
        let watching = tokio::spawn({
            let (dir, before) = (dir.path().to_path_buf(), before.clone());
            async move { next_change(&dir, &before).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Newer than every source in `before`, older than the call.
        let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
        std::fs::write(&restored, "new").unwrap();
        set_modified(&restored, an_hour_ago).unwrap();
        std::fs::write(&edited, "edited").unwrap();
        let edited_at = std::fs::metadata(&edited).unwrap().modified().unwrap();
        let (after, saved) = tokio::time::timeout(Duration::from_secs(10), watching)
            .await
            .expect("the change is seen")
            .unwrap();
        let modified = std::fs::metadata(&restored).unwrap().modified().unwrap();
        assert!(modified >= called, "the restored file's time moves past the call's");
        assert_eq!(after[&restored], modified);
        assert_eq!(
            std::fs::metadata(&edited).unwrap().modified().unwrap(),
            edited_at,
            "a plain save keeps its time"
        );
        assert_eq!(saved, modified.max(edited_at));
    }
}
