//! `node-runtime build`: a project's sources into a component, with its
//! language's toolchain: cargo for Rust, componentize-py for Python,
//! componentize-js for JavaScript. The component lands in
//! `DIR/target/NAME.wasm` whatever the language.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::project::{Language, Project};
use super::{KitError, toolchain};

/// A finished build.
#[derive(Debug, Clone)]
pub struct Built {
    pub project: Project,
    /// `DIR/target/NAME.wasm`.
    pub component: PathBuf,
}

/// Builds the project in `dir`. The tools' output passes through to
/// stderr, so a compile error reads as it would from the tool itself.
pub fn build(dir: &Path) -> Result<Built, KitError> {
    let project = Project::open(dir)?;
    let dir = std::path::absolute(dir).map_err(KitError::io("cannot resolve", dir))?;
    let out_dir = output_folder(&dir)?;
    let component = out_dir.join(format!("{}.wasm", project.name));
    // Built in a folder this build makes afresh (private; never one that
    // was there before, so nothing planted in it is followed), then renamed
    // into place: a link at `target/NAME.wasm` is replaced, never written
    // through, and a tool that ends without writing leaves no older
    // component to pass as new.
    let scratch = Scratch::create(&out_dir)?;
    let partial = scratch.dir.join(format!("{}.wasm", project.name));
    let wit = dir.join("wit");
    match project.language {
        Language::Rust => {
            toolchain::rust_target()?;
            let built = cargo_build(&dir)?;
            copy_new(&built, &partial)?;
        }
        Language::Python => {
            let tool = toolchain::componentize_py()?;
            let mut command = Command::new(tool);
            command
                .arg("--wit-path")
                .arg(&wit)
                .args(["--world", "agent", "componentize", "--python-path"])
                .arg(&dir)
                .arg("app")
                .arg("--output")
                .arg(&partial);
            run_build(command.current_dir(&dir), "componentize-py")?;
        }
        Language::Js => {
            // Run from the tools' folder, every path absolute: a version
            // manager's `.node-version` in the project does not pick the
            // node that runs it.
            let (tool, tools) = toolchain::componentize_js()?;
            let mut command = Command::new(tool);
            command
                .arg(dir.join("agent.js"))
                .arg("--wit")
                .arg(&wit)
                .args(["--world-name", "agent", "--out"])
                .arg(&partial);
            run_build(command.current_dir(&tools), "componentize-js")?;
        }
    }
    match std::fs::symlink_metadata(&partial) {
        Ok(meta) if meta.is_file() => {}
        _ => {
            return Err(KitError::Build(format!(
                "the build ended without writing the component {}",
                partial.display()
            )));
        }
    }
    std::fs::rename(&partial, &component).map_err(KitError::io("cannot move the component to", &component))?;
    Ok(Built { project, component })
}

/// `DIR/target`, created if missing (mode 0755, whatever the umask); a
/// link or a file there is refused rather than followed (a project from
/// elsewhere may carry one), and so is a folder another user owns or
/// others may write to: they could swap what the build writes there.
fn output_folder(dir: &Path) -> Result<PathBuf, KitError> {
    let out_dir = dir.join("target");
    match std::fs::symlink_metadata(&out_dir) {
        Ok(meta) if meta.is_dir() => {
            check_own(&out_dir, &meta)?;
            Ok(out_dir)
        }
        Ok(_) => Err(KitError::Usage(format!(
            "{} is not a folder (a link or a file): the build writes its component there; remove \
             it and build again",
            out_dir.display()
        ))),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let mut builder = std::fs::DirBuilder::new();
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o755);
            builder
                .create(&out_dir)
                .map_err(KitError::io("cannot create", &out_dir))?;
            Ok(out_dir)
        }
        Err(err) => Err(KitError::io("cannot read", &out_dir)(err)),
    }
}

/// The project's `target/` must be the user's own, and not writable by
/// others.
fn check_own(out_dir: &Path, meta: &std::fs::Metadata) -> Result<(), KitError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me || meta.mode() & 0o022 != 0 {
            return Err(KitError::Usage(format!(
                "{} must be a folder of your own that others cannot write to (owner uid {}, mode \
                 {:o}): the build writes its component there, and others may have put files or \
                 links there already, which `chmod go-w` alone would keep: remove it and build again",
                out_dir.display(),
                meta.uid(),
                meta.mode() & 0o7777
            )));
        }
    }
    #[cfg(not(unix))]
    let _ = (out_dir, meta);
    Ok(())
}

/// A folder made afresh for one build in `target/` (mode 0700, a name no
/// other folder had: `create_dir`, never an existing one), removed with
/// whatever is left in it when the build ends.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn create(out_dir: &Path) -> Result<Scratch, KitError> {
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let mut last = None;
        for attempt in 0..16u32 {
            let dir = out_dir.join(format!(".build-{}-{nanos:x}-{attempt}", std::process::id()));
            match builder.create(&dir) {
                Ok(()) => return Ok(Scratch { dir }),
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => last = Some((dir, err)),
                Err(err) => return Err(KitError::io("cannot create", &dir)(err)),
            }
        }
        let (dir, err) = last.expect("tried at least once");
        Err(KitError::io("cannot create", &dir)(err))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Copies `from` into the new file `to` (never through a link).
fn copy_new(from: &Path, to: &Path) -> Result<(), KitError> {
    let mut source = std::fs::File::open(from).map_err(KitError::io("cannot read the component", from))?;
    let mut target = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(KitError::io("cannot write", to))?;
    std::io::copy(&mut source, &mut target).map_err(KitError::io("cannot write", to))?;
    Ok(())
}

/// `cargo build --release --target wasm32-wasip2`; the `.wasm` cargo made
/// (it reports it: the target directory may be anywhere).
fn cargo_build(dir: &Path) -> Result<PathBuf, KitError> {
    let mut child = Command::new("cargo")
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--message-format",
            "json-render-diagnostics",
        ])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|err| {
            KitError::Tool(format!(
                "`cargo` cannot run ({err}); install Rust with rustup: https://rustup.rs"
            ))
        })?;
    let stdout = child.stdout.take().expect("piped");
    let mut built = None;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let wasm = message["filenames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|name| name.as_str())
            .find(|name| name.ends_with(".wasm"));
        if let Some(wasm) = wasm {
            built = Some(PathBuf::from(wasm));
        }
    }
    let status = child.wait().map_err(KitError::io("cannot wait for cargo in", dir))?;
    if !status.success() {
        return Err(KitError::Build(format!(
            "cargo build failed ({status}); the errors are above (if it says the wasm32-wasip2 \
             target is missing: {})",
            toolchain::RUST_TARGET_FIX
        )));
    }
    built.ok_or_else(|| {
        KitError::Build(format!(
            "cargo built no .wasm in {}: the package must be a `cdylib` (`[lib] crate-type = \
             [\"cdylib\"]`), as the template's is",
            dir.display()
        ))
    })
}

fn run_build(command: &mut Command, tool: &str) -> Result<(), KitError> {
    match command.status() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(KitError::Build(format!(
            "{tool} failed ({status}); the errors are above"
        ))),
        Err(err) => Err(KitError::Tool(format!(
            "{tool} cannot run ({err}); remove the tools directory ({}) to reinstall it",
            toolchain::tools_dir()
                .map(|dir| dir.display().to_string())
                .unwrap_or_default()
        ))),
    }
}
