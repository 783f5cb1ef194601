//! Embeds the agent kit in the binary (`node-runtime new` and `build`):
//! `kit/` (templates and SDKs), the newest agent world (`wit/v0.2` and
//! `wit/deps`) and the guest toolchains' pins (`scripts/guest-tools`).
//!
//! A build script rather than a crate such as `include_dir`: it is a
//! directory walk and one generated table of `include_bytes!`, and it
//! keeps the file list (what is skipped, where each file lands) in one
//! place. Only with the `dev` feature: the edge build carries no kit.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// (folder in the repository, where it lands in the embedded tree).
const ROOTS: &[(&str, &str)] = &[
    ("kit", "kit"),
    ("wit/v0.2", "wit"),
    ("wit/deps", "wit/deps"),
    ("scripts/guest-tools", "guest-tools"),
];

fn main() {
    let repo = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("..");
    let mut files = Vec::new();
    if std::env::var_os("CARGO_FEATURE_DEV").is_some() {
        for (from, to) in ROOTS {
            let dir = repo.join(from);
            println!("cargo:rerun-if-changed={}", dir.display());
            walk(&dir, to, &mut files);
        }
    }
    files.sort();
    let mut table = String::from("pub static FILES: &[(&str, &[u8])] = &[\n");
    for (name, path) in &files {
        let _ = writeln!(
            table,
            "    ({name:?}, include_bytes!({:?})),",
            path.display().to_string()
        );
    }
    table.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("kit_files.rs");
    std::fs::write(out, table).unwrap();
}

/// Every file under `dir`, named `prefix/...`; build output, caches,
/// hidden files and symbolic links (`kit/rust/wit`, which points the SDK
/// at the world in the repository) are left out.
fn walk(dir: &Path, prefix: &str, files: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(kind) = entry.file_type() else { continue };
        if name.starts_with('.')
            || kind.is_symlink()
            || matches!(name.as_str(), "target" | "node_modules" | "__pycache__" | "Cargo.lock")
        {
            continue;
        }
        let path = entry.path();
        let named = format!("{prefix}/{name}");
        if kind.is_dir() {
            walk(&path, &named, files);
        } else if kind.is_file() {
            files.push((named, path.canonicalize().unwrap()));
        }
    }
}
