//! Compiled components kept on disk, so a restarted node does not compile
//! again.
//!
//! Compiling a component is the slowest thing the node does (seconds for a
//! large Python agent); loading the compiled code back is milliseconds. An
//! entry is `<dir>/<engine>/<sha256 of the .wasm>.cwasm`: `<engine>` is a
//! hash of wasmtime's own compatibility hash for this engine configuration,
//! so a node upgraded to another wasmtime or started with other settings
//! looks in another folder, and wasmtime still checks each artifact itself.
//! Each entry ends with a CRC-32 of the artifact and a magic ([`seal`]): a
//! damaged (truncated, flipped, half-copied) or foreign entry is detected,
//! deleted and compiled again, never loaded blindly. A CRC rather than the
//! SHA-256 of `node-runtime compile`'s `.cwasm`: the threat here is
//! accidental damage to the node's own files, which a CRC-32 catches (any
//! burst up to 32 bits, anything else but one time in 2^32), and hashing a
//! multi-megabyte artifact with SHA-256 was a third of a restarted node's
//! first run. An entry is loaded where it lies: checked through a
//! read-only mapping, then mapped by wasmtime
//! (`Component::deserialize_file`), never copied into memory (copying it
//! twice, a read and wasmtime's copy into fresh memory, was most of a
//! cached load). That is sound because an entry is never written in place:
//! writes go to a temporary file renamed over the entry, so a component
//! mapped from the old file keeps its bytes. The cache directory is
//! bounded in size, all engine folders together (those an older wasmtime
//! or other settings left behind included), evicting the least recently
//! used entries. A write the disk refuses (full, read-only) only costs a
//! later compile: the component compiled in memory serves the run.
//!
//! The entries are native code the node will execute: the cache directory
//! must be as protected as the node's binary.

#[cfg(feature = "cranelift")]
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use wasmtime::Engine;
use wasmtime::component::Component;

use support::fs::{Bound, Durability, evict_oldest_of, files_in, write_atomically};

/// Marks a cache entry and its format version.
const MAGIC: &[u8; 16] = b"node-runtime:cc1";
const TRAILER_LEN: usize = 4 + MAGIC.len();

/// A cache entry: wasmtime's serialized component, then the CRC-32 of it
/// (little-endian) and [`MAGIC`].
pub fn seal(mut artifact: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&artifact);
    artifact.extend_from_slice(&crc.to_le_bytes());
    artifact.extend_from_slice(MAGIC);
    artifact
}

/// The artifact in a cache entry, if the entry is whole.
fn unseal(entry: &[u8]) -> Result<&[u8], String> {
    if entry.len() < TRAILER_LEN || !entry.ends_with(MAGIC) {
        return Err("not a node-runtime cache entry of this format".to_string());
    }
    let (artifact, trailer) = entry.split_at(entry.len() - TRAILER_LEN);
    let recorded = u32::from_le_bytes(trailer[..4].try_into().expect("4 bytes"));
    let found = crc32fast::hash(artifact);
    if found != recorded {
        return Err(format!("damaged: CRC-32 {found:08x}, recorded {recorded:08x}"));
    }
    Ok(artifact)
}

/// Where compiled components are kept, and how much room they may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledCacheSettings {
    pub dir: PathBuf,
    pub max_bytes: u64,
}

/// What loading agents cost, since the sandbox started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompileCounts {
    /// Components compiled from a `.wasm` (cache misses included).
    pub compiled: u64,
    /// Components loaded from the on-disk cache instead.
    pub cache_hits: u64,
    /// Cache entries found damaged or incompatible, deleted and rebuilt.
    pub cache_rejected: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    compiled: AtomicU64,
    cache_hits: AtomicU64,
    cache_rejected: AtomicU64,
}

impl Counters {
    pub(crate) fn compiled(&self) {
        self.compiled.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> CompileCounts {
        CompileCounts {
            compiled: self.compiled.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            cache_rejected: self.cache_rejected.load(Ordering::Relaxed),
        }
    }
}

pub(crate) struct CompiledCache {
    /// The cache directory, shared by every engine configuration.
    root: PathBuf,
    /// This engine's folder.
    dir: PathBuf,
    max_bytes: u64,
}

impl CompiledCache {
    /// The cache for `engine` under `settings.dir` (created if missing).
    /// Only a build with a compiler keeps one.
    #[cfg(feature = "cranelift")]
    pub(crate) fn open(settings: &CompiledCacheSettings, engine: &Engine) -> std::io::Result<Self> {
        let mut hasher = std::hash::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let dir = settings.dir.join(format!("engine-{:016x}", hasher.finish()));
        std::fs::create_dir_all(&dir)?;
        Ok(CompiledCache {
            root: settings.dir.clone(),
            dir,
            max_bytes: settings.max_bytes,
        })
    }

    #[cfg(feature = "cranelift")]
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    fn entry(&self, digest: &[u8; 32]) -> PathBuf {
        self.dir.join(format!("{}.cwasm", hex::encode(digest)))
    }

    /// The component compiled from the `.wasm` with `digest`, if a sound
    /// entry for it exists. A damaged or incompatible entry is deleted.
    /// Blocking: call it off the async runtime's worker threads.
    pub(crate) fn get(&self, engine: &Engine, digest: &[u8; 32], counters: &Counters) -> Option<Component> {
        let path = self.entry(digest);
        let file = std::fs::File::open(&path).ok()?;
        let loaded = check_in_place(&file).and_then(|()| {
            // SAFETY: the entry is whole (its CRC matches), so these are the
            // bytes this cache wrote from wasmtime's own serialisation;
            // wasmtime checks their version and configuration before using
            // them, and ignores the trailer after its ELF image. wasmtime
            // maps the file rather than copying it, so the file must not
            // change while the component lives: this cache never writes an
            // entry in place (a new entry is renamed over the old, eviction
            // unlinks), and a mapped file that is renamed over or unlinked
            // keeps its content.
            unsafe { Component::deserialize_file(engine, &path) }.map_err(|err| super::agent::error_chain(&err))
        });
        match loaded {
            Ok(component) => {
                counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                // Mark it used, for the eviction order.
                if let Ok(file) = std::fs::File::options().append(true).open(&path) {
                    let _ = file.set_modified(SystemTime::now());
                }
                Some(component)
            }
            Err(reason) => {
                counters.cache_rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(path = %path.display(), %reason, "compiled cache entry rejected; compiling again");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Keeps `component`, compiled from the `.wasm` with `digest`. A cache
    /// that cannot be written only costs a later compile: it is logged,
    /// never an error for the run. Blocking.
    pub(crate) fn put(&self, digest: &[u8; 32], component: &Component) {
        let path = self.entry(digest);
        let written = component
            .serialize()
            .map_err(|err| std::io::Error::other(super::agent::error_chain(&err)))
            .and_then(|artifact| write_atomically(&path, &seal(artifact), Durability::Synced));
        if let Err(err) = written {
            tracing::warn!(path = %path.display(), error = %err, "could not keep the compiled component");
            return;
        }
        self.evict();
    }

    /// Deletes the least recently used entries, in every engine's folder,
    /// until the cache directory fits.
    fn evict(&self) {
        for (path, bytes) in evict_least_recently_used(&self.root, self.max_bytes) {
            tracing::info!(path = %path.display(), bytes, "evicted from the compiled cache");
        }
    }
}

/// Deletes the least recently used `.cwasm` entries of every
/// `<root>/engine-*` folder until they take at most `max_bytes` together.
/// Files it cannot read or delete are skipped: a bound kept loosely is
/// better than a cache that fails.
fn evict_least_recently_used(root: &Path, max_bytes: u64) -> Vec<(PathBuf, u64)> {
    let Ok(engines) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let entries = engines
        .flatten()
        .filter(|engine| engine.file_name().to_string_lossy().starts_with("engine-"))
        .flat_map(|engine| files_in(&engine.path(), "cwasm"))
        .collect();
    evict_oldest_of(entries, Bound::Bytes(max_bytes), None)
}

/// Checks an entry where it lies, through a read-only mapping of `file`,
/// without copying it: the trailer's magic and the CRC-32 of the artifact
/// before it ([`unseal`]).
fn check_in_place(file: &std::fs::File) -> Result<(), String> {
    let len = file.metadata().map_err(|err| err.to_string())?.len();
    let len = usize::try_from(len).map_err(|_| "too large to map".to_string())?;
    if len < TRAILER_LEN {
        return Err("not a node-runtime cache entry of this format".to_string());
    }
    // SAFETY: a read-only private mapping; the file may change under it
    // only by an in-place write, which this cache never does, and such a
    // change would at worst make the CRC fail. The CRC reads every page,
    // so they are faulted in at once.
    let mapped = unsafe { memmap2::MmapOptions::new().len(len).populate().map(file) }
        .map_err(|err| format!("cannot map it: {err}"))?;
    unseal(&mapped).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(dir: &Path, name: &str, len: usize, age_s: u64) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, vec![0u8; len]).unwrap();
        let file = std::fs::File::options().append(true).open(&path).unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(age_s))
            .unwrap();
        path
    }

    #[test]
    fn the_bound_covers_every_engines_folder_the_least_recently_used_first() {
        let root = tempfile::tempdir().unwrap();
        let left_behind = entry(&root.path().join("engine-0000000000000001"), "a.cwasm", 100, 30);
        let older = entry(&root.path().join("engine-0000000000000002"), "b.cwasm", 100, 20);
        let newer = entry(&root.path().join("engine-0000000000000002"), "c.cwasm", 100, 10);
        let memo = entry(&root.path().join("file-digests"), "d.cwasm", 100, 40);
        let evicted = evict_least_recently_used(root.path(), 150);
        let evicted: Vec<&PathBuf> = evicted.iter().map(|(path, _)| path).collect();
        assert_eq!(evicted, [&left_behind, &older]);
        assert!(newer.exists() && memo.exists(), "only engine folders are touched");
    }
}
