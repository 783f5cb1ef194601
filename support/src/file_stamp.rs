//! A file's identity on disk, strict enough that a rewrite changes it.
//!
//! The agent store keeps what it learnt about an agent file (its SHA-256, the
//! compiled agent) under the file's stamp: device, inode, length, and
//! modification and change times in nanoseconds. Any write changes the
//! change time (ctime), which no user can set back, and replacing a file
//! changes its inode, so a stamp seen again means the same bytes, with one
//! exception that git calls "racily clean": a file written again within
//! the file system's timestamp granularity of the moment it was stamped
//! keeps its times. So a stamp only counts when the file last changed
//! safely before the moment the store looked at it ([`FileStamp::settled_at`]);
//! a file changed in the last [`SETTLE_TIME`] is simply read and hashed
//! again, until it has settled.
//!
//! The control-plane client re-reads its certificate when either file's
//! stamp changes.
//!
//! This trusts the file system's clock to be the node's (as on a local
//! file system) to within [`SETTLE_TIME`].

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a file must have been left alone before its stamp stands for
/// its content: above the coarsest timestamp granularity of common file
/// systems (one second, on ext3 and some network file systems), with a
/// margin for the kernel's coarse clock.
pub const SETTLE_TIME: Duration = Duration::from_secs(2);

/// Where a file is and which version of it is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub len: u64,
    /// Nanoseconds since the Unix epoch.
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileStamp {
    pub fn of(path: &Path, meta: &std::fs::Metadata) -> Self {
        let ns = |secs: i64, nanos: i64| i128::from(secs) * 1_000_000_000 + i128::from(nanos);
        FileStamp {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Whether the file's modification and change times are both more
    /// than [`SETTLE_TIME`] before `checked_at`, a moment taken before the
    /// file was stamped. Only then does the stamp identify the bytes read
    /// after it: any later write sets a change time after `checked_at`,
    /// less the granularity, so a different one.
    pub fn settled_at(&self, checked_at: SystemTime) -> bool {
        let Ok(since_epoch) = checked_at.duration_since(UNIX_EPOCH) else {
            return false;
        };
        let limit = since_epoch.saturating_sub(SETTLE_TIME).as_nanos() as i128;
        self.mtime_ns < limit && self.ctime_ns < limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(mtime_ns: i128, ctime_ns: i128) -> FileStamp {
        FileStamp {
            path: "a.wasm".into(),
            dev: 1,
            ino: 2,
            len: 3,
            mtime_ns,
            ctime_ns,
        }
    }

    #[test]
    fn a_stamp_counts_only_once_the_file_has_settled() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let now_ns = 1_000_000 * 1_000_000_000i128;
        let settle = SETTLE_TIME.as_nanos() as i128;
        assert!(stamp(now_ns - settle - 1, now_ns - settle - 1).settled_at(now));
        assert!(
            !stamp(now_ns - settle, now_ns - settle - 1).settled_at(now),
            "modified too recently"
        );
        assert!(
            !stamp(now_ns - settle - 1, now_ns - 5).settled_at(now),
            "changed too recently"
        );
        assert!(
            !stamp(now_ns + settle, now_ns - settle - 1).settled_at(now),
            "modified in the future"
        );
    }
}
