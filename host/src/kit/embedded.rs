//! The kit's files as the binary carries them: `kit/` (templates and
//! SDKs), `wit/` (the newest agent world) and `guest-tools/` (the pins of
//! componentize-py and componentize-js). `host/build.rs` makes the table.

include!(concat!(env!("OUT_DIR"), "/kit_files.rs"));

/// The files under `prefix/`, as (path below `prefix`, bytes).
pub fn under(prefix: &str) -> impl Iterator<Item = (&'static str, &'static [u8])> + '_ {
    FILES.iter().filter_map(move |(name, bytes)| {
        let rest = name.strip_prefix(prefix)?.strip_prefix('/')?;
        Some((rest, *bytes))
    })
}

/// One file, by its full embedded path.
pub fn file(name: &str) -> Option<&'static [u8]> {
    FILES.iter().find(|(n, _)| *n == name).map(|(_, bytes)| *bytes)
}
