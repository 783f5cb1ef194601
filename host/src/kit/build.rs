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
    // Built under a fresh name and renamed into place: a link planted at
    // `target/NAME.wasm` is replaced, never written through, and a tool
    // that ends without writing leaves no older component to pass as new.
    let partial = out_dir.join(format!(".{}.wasm.partial", project.name));
    remove_if_there(&partial)?;
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
            let tool = toolchain::componentize_js()?;
            let mut command = Command::new(tool);
            command
                .arg(dir.join("agent.js"))
                .arg("--wit")
                .arg(&wit)
                .args(["--world-name", "agent", "--out"])
                .arg(&partial);
            run_build(command.current_dir(&dir), "componentize-js")?;
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

/// `DIR/target`, created if missing; a link or a file there is refused
/// rather than followed (a project from elsewhere may carry one).
fn output_folder(dir: &Path) -> Result<PathBuf, KitError> {
    let out_dir = dir.join("target");
    match std::fs::symlink_metadata(&out_dir) {
        Ok(meta) if meta.is_dir() => Ok(out_dir),
        Ok(_) => Err(KitError::Usage(format!(
            "{} is not a folder (a link or a file): the build writes its component there; remove \
             it and build again",
            out_dir.display()
        ))),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(&out_dir).map_err(KitError::io("cannot create", &out_dir))?;
            Ok(out_dir)
        }
        Err(err) => Err(KitError::io("cannot read", &out_dir)(err)),
    }
}

fn remove_if_there(path: &Path) -> Result<(), KitError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(KitError::io("cannot remove", path)(err)),
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
