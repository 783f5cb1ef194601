//! The guest toolchains a build needs, found or installed pinned on first
//! use: componentize-py in a venv (`TOOLS/py`) and componentize-js in a
//! `node_modules` (`TOOLS/js`), from the pins the binary carries (the
//! repository's `scripts/guest-tools`), and the `wasm32-wasip2` target for
//! Rust.
//!
//! TOOLS is `$NODE_RUNTIME_TOOLS`, else `$XDG_CACHE_HOME/node-runtime/tools`,
//! else `~/.cache/node-runtime/tools`. Each environment carries the stamp
//! `scripts/install-guest-tools` writes (the SHA-256 of the pins and the
//! interpreter's version, and for the venv its path), computed the same
//! way, so either installer accepts what the other installed. Both write
//! [`INSTALL_MARKER`] into an environment's folder before anything else,
//! so a folder may be emptied for a fresh install only when it carries
//! the marker or a `.stamp`, or is empty: never a user's own folder that
//! happens to sit where the tools go, and always an install killed half way.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::{KitError, embedded};

/// The environment variable that names the tools directory.
pub const TOOLS_VARIABLE: &str = "NODE_RUNTIME_TOOLS";

/// The file a tools installer writes first into an environment's folder
/// (`scripts/install-guest-tools` writes the same): the folder is the
/// installer's, even when the install stopped before its `.stamp`.
pub const INSTALL_MARKER: &str = ".node-runtime-tools";

/// The directory the toolchains live in.
pub fn tools_dir() -> Result<PathBuf, KitError> {
    if let Some(dir) = std::env::var_os(TOOLS_VARIABLE).filter(|dir| !dir.is_empty()) {
        return std::path::absolute(PathBuf::from(dir))
            .map_err(|err| KitError::Usage(format!("{TOOLS_VARIABLE}: {err}")));
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .ok_or_else(|| {
            KitError::Usage(format!(
                "no place for the build tools: neither {TOOLS_VARIABLE}, XDG_CACHE_HOME nor HOME \
                 is set; set {TOOLS_VARIABLE} to a directory"
            ))
        })?;
    Ok(cache.join("node-runtime").join("tools"))
}

/// The tools directory, created if missing, checked (see [`check_private`])
/// and locked against another build installing into it at the same time;
/// the lock holds while the returned file is open.
fn locked_tools_dir() -> Result<(PathBuf, std::fs::File), KitError> {
    let tools = tools_dir()?;
    // Private from the start, whatever the umask: a group-writable umask
    // (002) would otherwise make a folder the check below refuses.
    create_dir_all_private(&tools)?;
    // One spelling of the path (no `..`, no links): the venv's stamp
    // carries it, as `scripts/install-guest-tools` writes it.
    let tools = std::fs::canonicalize(&tools).map_err(KitError::io("cannot resolve", &tools))?;
    check_private(&tools)?;
    let lock_path = tools.join(".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(KitError::io("cannot open", &lock_path))?;
    lock.lock().map_err(KitError::io("cannot lock", &lock_path))?;
    Ok((tools, lock))
}

/// The tools run as the user who builds: a directory another user owns,
/// or one others may write to, could hold anything under the pinned
/// names, so it is refused rather than trusted.
fn check_private(dir: &Path) -> Result<(), KitError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::symlink_metadata(dir).map_err(KitError::io("cannot read", dir))?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o022 != 0 {
            return Err(KitError::Tool(format!(
                "the tools directory {} must be a folder of your own that others cannot write to \
                 (it is {}, owner uid {}, mode {:o}): the build runs the programs in it, and \
                 others may have put programs there already, which `chmod go-w` alone would keep: \
                 remove it (the build installs the tools again), or point {TOOLS_VARIABLE} elsewhere",
                dir.display(),
                if meta.is_symlink() {
                    "a link"
                } else if meta.is_dir() {
                    "a folder"
                } else {
                    "a file"
                },
                meta.uid(),
                meta.mode() & 0o7777
            )));
        }
    }
    Ok(())
}

/// `dir` and its missing parents, created with mode 0700 (not what the
/// umask leaves); an existing `dir` is left as it is, for the check.
fn create_dir_all_private(dir: &Path) -> Result<(), KitError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(KitError::io("cannot create", dir))
}

/// An environment's folder (`TOOLS/py`, `TOOLS/js`), when it is there, is
/// checked as the tools directory is: the build runs what it holds.
fn check_env(env: &Path) -> Result<(), KitError> {
    match std::fs::symlink_metadata(env) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        _ => check_private(env),
    }
}

/// `componentize-py`, installed into `TOOLS/py` if it is not there.
pub fn componentize_py() -> Result<PathBuf, KitError> {
    let (tools, _lock) = locked_tools_dir()?;
    let env = tools.join("py");
    check_env(&env)?;
    let pins = pin("requirements.txt")?;
    // Asked from the tools directory: a project's `.python-version` (pyenv)
    // does not choose the interpreter the shared tools are built with.
    let version = output_of_in(&tools, "python3", &["--version"], true, "python3", PYTHON_FIX)?;
    let want = stamp(&[pins, &version, format!("{}\n", env.display()).as_bytes()]);
    let tool = env.join("bin").join("componentize-py");
    if stamp_matches(&env, &want) && tool.is_file() {
        return Ok(tool);
    }
    eprintln!("installing componentize-py (pinned) into {}", env.display());
    reset(&env)?;
    // Into the folder `reset` made (and marked): venv fills an existing one.
    run_tool(
        Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&env)
            .current_dir(&tools),
        "python3 -m venv",
        VENV_FIX,
    )?;
    let requirements = env.join("requirements.txt");
    std::fs::write(&requirements, pins).map_err(KitError::io("cannot write", &requirements))?;
    run_tool(
        Command::new(env.join("bin").join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(&requirements),
        "pip install componentize-py",
        "check the network and the package index, then run the build again",
    )?;
    others_cannot_write(&env)?;
    write_stamp(&env, &want)?;
    Ok(tool)
}

/// `componentize-js`, installed into `TOOLS/js` if it is not there; and
/// the folder to run it from (`TOOLS/js`), so that a version manager's
/// `.node-version` or `.nvmrc` in the project does not pick its node.
pub fn componentize_js() -> Result<(PathBuf, PathBuf), KitError> {
    let (tools, _lock) = locked_tools_dir()?;
    let env = tools.join("js");
    check_env(&env)?;
    let (package, lock) = (pin("package.json")?, pin("package-lock.json")?);
    // Asked from the tools directory, as python3 is: a project's
    // `.node-version` would otherwise choose the node, and a change of it
    // would wipe and reinstall the shared tools.
    let version = output_of_in(&tools, "node", &["--version"], false, "node", NODE_FIX)?;
    let want = stamp(&[package, lock, &version]);
    let tool = env.join("node_modules").join(".bin").join("componentize-js");
    if stamp_matches(&env, &want) && tool.exists() {
        return Ok((tool, env));
    }
    output_of_in(&tools, "npm", &["--version"], false, "npm", NODE_FIX)?;
    eprintln!("installing componentize-js (pinned) into {}", env.display());
    reset(&env)?;
    for (name, bytes) in [("package.json", package), ("package-lock.json", lock)] {
        let to = env.join(name);
        std::fs::write(&to, bytes).map_err(KitError::io("cannot write", &to))?;
    }
    // `npm ci`: exactly the lock file's versions and integrity hashes.
    run_tool(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&env),
        "npm ci (componentize-js)",
        "check the network and the npm registry, then run the build again",
    )?;
    others_cannot_write(&env)?;
    write_stamp(&env, &want)?;
    Ok((tool, env))
}

/// Makes sure Rust can build for `wasm32-wasip2`: cargo is there, and the
/// target is added with rustup when it is missing.
pub fn rust_target() -> Result<(), KitError> {
    // Once per process: `--watch` rebuilds without asking again.
    static READY: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    if READY.get().is_some() {
        return Ok(());
    }
    check_rust_target()?;
    let _ = READY.set(());
    Ok(())
}

fn check_rust_target() -> Result<(), KitError> {
    output_of("cargo", &["--version"], false, "cargo", RUSTUP_FIX)?;
    let Ok(installed) = Command::new("rustup").args(["target", "list", "--installed"]).output() else {
        // No rustup: a toolchain from elsewhere may have the target; the
        // build says so if it has not.
        return Ok(());
    };
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|line| line.trim() == "wasm32-wasip2")
    {
        return Ok(());
    }
    eprintln!("adding the wasm32-wasip2 target (rustup target add wasm32-wasip2)");
    run_tool(
        Command::new("rustup").args(["target", "add", "wasm32-wasip2"]),
        "rustup target add wasm32-wasip2",
        "check the network, then run `rustup target add wasm32-wasip2`",
    )
}

/// What a build says when Rust cannot target WebAssembly without rustup.
pub const RUST_TARGET_FIX: &str = "the Rust toolchain has no wasm32-wasip2 target; with rustup: \
     `rustup target add wasm32-wasip2` (no rustup? install it: https://rustup.rs)";

const RUSTUP_FIX: &str = "install Rust with rustup: https://rustup.rs (then `rustup target add wasm32-wasip2`)";
const PYTHON_FIX: &str = "install Python 3 with venv (Debian/Ubuntu: `apt install python3 python3-venv`)";
const VENV_FIX: &str = "install the venv module (Debian/Ubuntu: `apt install python3-venv`)";
const NODE_FIX: &str = "install Node.js 20 or newer with npm (Debian/Ubuntu: `apt install nodejs npm`)";

fn pin(name: &str) -> Result<&'static [u8], KitError> {
    embedded::file(&format!("guest-tools/{name}")).ok_or_else(|| {
        KitError::Tool(format!(
            "this node-runtime carries no pin file {name} (scripts/guest-tools/); build it from a \
             complete source tree"
        ))
    })
}

/// Takes group and others' write permission off everything an install
/// made (venv and npm create folders under the user's umask, 002 on some
/// systems), links not followed: nobody else can swap a tool the build
/// later runs.
fn others_cannot_write(dir: &Path) -> Result<(), KitError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mut folders = vec![dir.to_path_buf()];
        // Bounded by what the install wrote.
        while let Some(folder) = folders.pop() {
            let entries = std::fs::read_dir(&folder).map_err(KitError::io("cannot read", &folder))?;
            for entry in entries {
                let path = entry.map_err(KitError::io("cannot read", &folder))?.path();
                let meta = std::fs::symlink_metadata(&path).map_err(KitError::io("cannot read", &path))?;
                if meta.is_symlink() {
                    continue;
                }
                let mode = meta.permissions().mode();
                if mode & 0o022 != 0 {
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & !0o022))
                        .map_err(KitError::io("cannot change the mode of", &path))?;
                }
                if meta.is_dir() {
                    folders.push(path);
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The stamp: SHA-256 of the parts, concatenated, in hex.
fn stamp(parts: &[&[u8]]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part);
    }
    hex::encode(hash.finalize())
}

fn stamp_matches(env: &Path, want: &str) -> bool {
    std::fs::read_to_string(env.join(".stamp")).is_ok_and(|have| have.trim() == want)
}

fn write_stamp(env: &Path, want: &str) -> Result<(), KitError> {
    let path = env.join(".stamp");
    std::fs::write(&path, format!("{want}\n")).map_err(KitError::io("cannot write", &path))
}

/// Empties `env` for a fresh install, if a tools installer made it (it
/// carries an installer's `.stamp`, a SHA-256 in hex, or
/// [`INSTALL_MARKER`]) or it is empty: a folder of
/// the user's that happens to sit where the tools go (a JavaScript project
/// with its own `package-lock.json`, say) is never deleted. The folder is
/// made again, private, with the marker in it before anything else, so an
/// install killed half way is still the installer's to redo.
fn reset(env: &Path) -> Result<(), KitError> {
    match std::fs::symlink_metadata(env) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(KitError::io("cannot read", env)(err)),
        Ok(meta) => {
            let installers = |name: &str| std::fs::symlink_metadata(env.join(name)).is_ok_and(|meta| meta.is_file());
            // An installer's stamp is a SHA-256 in hex; a `.stamp` of
            // another kind (make's empty one, say) proves nothing.
            let stamped = installers(".stamp")
                && std::fs::read_to_string(env.join(".stamp")).is_ok_and(|stamp| {
                    let stamp = stamp.trim();
                    stamp.len() == 64 && stamp.bytes().all(|b| b.is_ascii_hexdigit())
                });
            let ours = meta.is_dir()
                && (stamped
                    || installers(INSTALL_MARKER)
                    || std::fs::read_dir(env).is_ok_and(|mut entries| entries.next().is_none()));
            if !ours {
                return Err(KitError::Tool(format!(
                    "{} is in the way of the build tools and was not made by a tools installer \
                     (no .stamp or {INSTALL_MARKER}): move it away, or point {TOOLS_VARIABLE} elsewhere",
                    env.display()
                )));
            }
            std::fs::remove_dir_all(env).map_err(KitError::io("cannot remove", env))?;
        }
    }
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o755);
    builder.create(env).map_err(KitError::io("cannot create", env))?;
    let marker = env.join(INSTALL_MARKER);
    std::fs::write(
        &marker,
        "made by a node-runtime tools installer; removed and made again on a reinstall\n",
    )
    .map_err(KitError::io("cannot write", &marker))
}

/// A program's stdout (and stderr, as a shell's `2>&1`, when asked); a
/// program that is not there is an error with `fix`.
fn output_of(program: &str, args: &[&str], with_stderr: bool, name: &str, fix: &str) -> Result<Vec<u8>, KitError> {
    output_of_in(Path::new("."), program, args, with_stderr, name, fix)
}

/// As [`output_of`], run in `dir`.
fn output_of_in(
    dir: &Path,
    program: &str,
    args: &[&str],
    with_stderr: bool,
    name: &str,
    fix: &str,
) -> Result<Vec<u8>, KitError> {
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|err| {
            KitError::Tool(format!(
                "`{name}` is needed for this build and cannot run ({err}); {fix}"
            ))
        })?;
    let mut bytes = output.stdout;
    if with_stderr {
        bytes.extend_from_slice(&output.stderr);
    }
    Ok(bytes)
}

/// Runs an install step, its output passed through; failing is an error
/// naming the step and the fix.
fn run_tool(command: &mut Command, what: &str, fix: &str) -> Result<(), KitError> {
    match command.status() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(KitError::Tool(format!("{what} failed ({status}); {fix}"))),
        Err(err) => Err(KitError::Tool(format!("{what} cannot run ({err}); {fix}"))),
    }
}
