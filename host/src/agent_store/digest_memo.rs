//! The SHA-256 of agent files, remembered across restarts by file stamp.
//!
//! A restarted node would otherwise hash every agent file again at its
//! first run (about 2 ms for a 2.5 MB component, a third of a cached
//! load). The store records, for each file it hashed, the file's
//! [`FileStamp`] and digest; finding the same stamp later, it knows the
//! digest without reading the file, and loads the compiled component
//! straight from the compiled cache (the file's bytes are read only when
//! there is no compiled entry for that digest). Only settled stamps are
//! recorded or trusted ([`FileStamp::settled_at`]).
//!
//! The memo lives beside the compiled cache
//! (`<compiled cache dir>/file-digests/`), which already needs the
//! protection of the node's binary: whoever can write there could as well
//! write native code. One small file per agent path, written atomically
//! (a temporary file renamed into place). Each record ends with a SHA-256
//! of itself, so a damaged or half-written record is ignored (the file is
//! hashed again, and the record rewritten), never read as a wrong digest.
//! The folder keeps at most [`MAX_RECORDS`] records, dropping the oldest.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::digest::AgentDigest;
use support::file_stamp::FileStamp;
use support::fs::{Bound, Durability, evict_oldest, write_atomically};

/// Marks a record and its format version.
const MAGIC: &[u8; 16] = b"node-runtime:fd1";
/// Records kept, one per agent path; past it the oldest are deleted.
pub const MAX_RECORDS: usize = 4096;
const EXTENSION: &str = "digest";
/// What precedes the path: magic, dev, ino, len, mtime, ctime, digest,
/// path length.
const FIXED_LEN: usize = 16 + 8 + 8 + 8 + 16 + 16 + 32 + 4;
const CHECKSUM_LEN: usize = 32;

/// The memo's folder. Its methods block: call them off the async
/// runtime's worker threads.
#[derive(Debug, Clone)]
pub struct DigestMemo {
    dir: PathBuf,
    max_records: usize,
}

impl DigestMemo {
    /// The memo kept in the compiled cache's directory.
    pub fn in_cache_dir(compiled_cache_dir: &Path) -> Self {
        DigestMemo {
            dir: compiled_cache_dir.join("file-digests"),
            max_records: MAX_RECORDS,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the record for the file at `path` is kept.
    pub fn record_path(&self, path: &Path) -> PathBuf {
        let key = Sha256::digest(path.as_os_str().as_bytes());
        self.dir.join(format!("{}.{EXTENSION}", hex::encode(&key[..16])))
    }

    /// The digest recorded for exactly this stamp, if any. A record that
    /// is damaged or for another version of the file is `None`.
    pub fn get(&self, stamp: &FileStamp) -> Option<AgentDigest> {
        let record_path = self.record_path(&stamp.path);
        let record = std::fs::read(&record_path).ok()?;
        match decode(&record) {
            Some((recorded, digest)) if recorded == *stamp => Some(digest),
            Some(_) => None,
            None => {
                tracing::warn!(path = %record_path.display(), "damaged file-digest record ignored; the agent file is hashed again");
                None
            }
        }
    }

    /// Records that the file with `stamp` has `digest`. A memo that cannot
    /// be written only costs a later hash: it is logged, never an error.
    pub fn put(&self, stamp: &FileStamp, digest: AgentDigest) {
        let record_path = self.record_path(&stamp.path);
        let written = std::fs::create_dir_all(&self.dir).and_then(
            |()| // No sync: a record lost or half-written in a crash fails its
            // checksum and costs one hash.
            write_atomically(&record_path, &encode(stamp, digest), Durability::Unsynced),
        );
        if let Err(err) = written {
            tracing::warn!(path = %record_path.display(), error = %err, "could not remember the agent file's digest");
            return;
        }
        self.bound();
    }

    /// Deletes the oldest records past the bound.
    fn bound(&self) {
        evict_oldest(&self.dir, EXTENSION, Bound::Files(self.max_records));
    }
}

fn encode(stamp: &FileStamp, digest: AgentDigest) -> Vec<u8> {
    let path = stamp.path.as_os_str().as_bytes();
    let mut record = Vec::with_capacity(FIXED_LEN + path.len() + CHECKSUM_LEN);
    record.extend_from_slice(MAGIC);
    record.extend_from_slice(&stamp.dev.to_le_bytes());
    record.extend_from_slice(&stamp.ino.to_le_bytes());
    record.extend_from_slice(&stamp.len.to_le_bytes());
    record.extend_from_slice(&stamp.mtime_ns.to_le_bytes());
    record.extend_from_slice(&stamp.ctime_ns.to_le_bytes());
    record.extend_from_slice(digest.bytes());
    record.extend_from_slice(&(path.len() as u32).to_le_bytes());
    record.extend_from_slice(path);
    let checksum = Sha256::digest(&record);
    record.extend_from_slice(&checksum);
    record
}

/// The stamp and digest in a whole record; `None` if it is damaged or of
/// another format.
fn decode(record: &[u8]) -> Option<(FileStamp, AgentDigest)> {
    let (body, checksum) = record.split_at_checked(record.len().checked_sub(CHECKSUM_LEN)?)?;
    if body.len() < FIXED_LEN || !body.starts_with(MAGIC) || Sha256::digest(body).as_slice() != checksum {
        return None;
    }
    let mut rest = &body[MAGIC.len()..];
    let mut take = |n: usize| {
        let (head, tail) = rest.split_at(n);
        rest = tail;
        head
    };
    let u64_of = |bytes: &[u8]| u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
    let i128_of = |bytes: &[u8]| i128::from_le_bytes(bytes.try_into().expect("16 bytes"));
    let dev = u64_of(take(8));
    let ino = u64_of(take(8));
    let len = u64_of(take(8));
    let mtime_ns = i128_of(take(16));
    let ctime_ns = i128_of(take(16));
    let digest: [u8; 32] = take(32).try_into().expect("32 bytes");
    let path_len = u32::from_le_bytes(take(4).try_into().expect("4 bytes")) as usize;
    if rest.len() != path_len {
        return None;
    }
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(rest));
    let stamp = FileStamp {
        path,
        dev,
        ino,
        len,
        mtime_ns,
        ctime_ns,
    };
    Some((stamp, AgentDigest::from_bytes(digest)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp() -> FileStamp {
        FileStamp {
            path: "/agents/echo/1.0.0.wasm".into(),
            dev: 2049,
            ino: 131_074,
            len: 2_553_000,
            mtime_ns: 1_795_000_000_123_456_789,
            ctime_ns: 1_795_000_001_987_654_321,
        }
    }

    #[test]
    fn a_record_round_trips_and_any_flipped_bit_voids_it() {
        let digest = AgentDigest::of(b"echo");
        let record = encode(&stamp(), digest);
        assert_eq!(decode(&record), Some((stamp(), digest)));
        for byte in 0..record.len() {
            for bit in 0..8 {
                let mut damaged = record.clone();
                damaged[byte] ^= 1 << bit;
                assert_eq!(decode(&damaged), None, "byte {byte} bit {bit}");
            }
        }
        for cut in 0..record.len() {
            assert_eq!(decode(&record[..cut]), None, "cut to {cut}");
        }
    }

    #[test]
    fn a_record_answers_only_for_its_exact_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let memo = DigestMemo::in_cache_dir(dir.path());
        let digest = AgentDigest::of(b"echo");
        memo.put(&stamp(), digest);
        assert_eq!(memo.get(&stamp()), Some(digest));
        let changes: [fn(&mut FileStamp); 6] = [
            |s| s.dev += 1,
            |s| s.ino += 1,
            |s| s.len += 1,
            |s| s.mtime_ns += 1,
            |s| s.ctime_ns += 1,
            |s| s.path = "/agents/echo/1.0.1.wasm".into(),
        ];
        for change in changes {
            let mut other = stamp();
            change(&mut other);
            assert_eq!(memo.get(&other), None, "{other:?}");
        }
    }

    #[test]
    fn the_memo_keeps_its_newest_records_within_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let memo = DigestMemo {
            max_records: 3,
            ..DigestMemo::in_cache_dir(dir.path())
        };
        let stamps: Vec<FileStamp> = (0..5)
            .map(|n| FileStamp {
                path: format!("/agents/a/{n}.wasm").into(),
                ..stamp()
            })
            .collect();
        for stamp in &stamps {
            memo.put(stamp, AgentDigest::of(b"a"));
            // Distinct modification times, for the order.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let kept: Vec<bool> = stamps.iter().map(|stamp| memo.get(stamp).is_some()).collect();
        assert_eq!(kept, [false, false, true, true, true]);
        let files = std::fs::read_dir(memo.dir()).unwrap().count();
        assert_eq!(files, 3, "no temporary files left behind either");
    }
}
