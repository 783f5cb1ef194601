//! `node-runtime compile`: precompile a component into a `.cwasm`, for
//! this machine or, with `--target`, for another one (an ARM edge box, or
//! the Pulley interpreter).

use std::path::PathBuf;

use clap::Args;

use super::{CommandError, Exit};

#[cfg(feature = "cranelift")]
use {
    super::read_agent_file,
    crate::sandbox::signature::{self, SigningKey},
    crate::sandbox::{EngineSettings, PrecompileError, Sandbox, SandboxConfig},
    std::os::unix::fs::MetadataExt,
    std::path::Path,
    std::sync::Arc,
    std::time::Instant,
    support::fs::{Durability, write_atomically},
    support::units::format_bytes,
};

#[derive(Debug, Args)]
pub struct CompileArgs {
    /// The component to compile (.wasm).
    pub agent: PathBuf,

    /// Where to write the .cwasm (default: next to the input, with the
    /// .cwasm extension).
    #[arg(short, long, value_name = "PATH")]
    pub output: Option<PathBuf>,

    /// Compile for another machine: a target triple such as
    /// aarch64-unknown-linux-gnu or x86_64-unknown-linux-gnu (code for any
    /// CPU of that architecture, where the default uses this CPU's
    /// extensions), or pulley64 / pulley32 for nodes that run the Pulley
    /// interpreter.
    #[arg(long, value_name = "TRIPLE")]
    pub target: Option<String>,

    /// Sign the .cwasm with this Ed25519 private key (PKCS#8 PEM, from
    /// `node-runtime keygen` or `openssl genpkey -algorithm ed25519`), so
    /// that nodes trusting its public key (AgentStore.TrustedSigningKeys)
    /// take it from an HTTP or OCI source.
    #[arg(long, value_name = "KEY")]
    pub sign: Option<PathBuf>,
}

/// A build without a compiler (the edge build) cannot precompile.
#[cfg(not(feature = "cranelift"))]
pub async fn run(_args: CompileArgs) -> Result<Exit, CommandError> {
    Err(CommandError::usage(NO_COMPILER))
}

/// What a build without a compiler says to `compile`.
#[cfg(not(feature = "cranelift"))]
pub(crate) const NO_COMPILER: &str = "this node-runtime is an edge build with no compiler: it runs \
     precompiled .cwasm files but cannot make them; run `node-runtime compile` (with `--target` \
     naming this machine) on a full build, the default features, and copy the .cwasm here";

#[cfg(feature = "cranelift")]
pub async fn run(args: CompileArgs) -> Result<Exit, CommandError> {
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| args.agent.with_extension("cwasm"));
    check_output(&args.agent, &output)?;
    // Before compiling: a key that cannot sign should not cost a compile.
    let key = args
        .sign
        .as_deref()
        .map(|path| SigningKey::read("--sign", path))
        .transpose()
        .map_err(|err| CommandError::usage(err.to_string()))?;
    let wasm = read_agent_file("the agent file", &args.agent)?;
    let sandbox = Sandbox::new(SandboxConfig {
        engine: EngineSettings {
            max_concurrent_runs: 1,
            ..EngineSettings::default()
        },
        ..SandboxConfig::default()
    })
    .map_err(|err| CommandError::internal(err.to_string()))?;

    let started = Instant::now();
    let wasm: Arc<[u8]> = Arc::from(wasm);
    let input = wasm.clone();
    let target = args.target.clone();
    let compiled = tokio::task::spawn_blocking(move || match &target {
        None => sandbox.precompile(&input).map_err(PrecompileError::from),
        Some(target) => sandbox.precompile_for(&input, target),
    })
    .await
    .map_err(|err| CommandError::internal(format!("compilation panicked: {err}")))?;
    let cwasm = match compiled {
        Ok(cwasm) => cwasm,
        Err(PrecompileError::Target(unsupported)) => {
            return Err(CommandError::usage(format!("--target: {unsupported}")));
        }
        Err(PrecompileError::Agent(invalid)) => {
            say_err!("error: {}: {invalid}", args.agent.display());
            return Ok(Exit::AgentInvalid);
        }
    };
    let cwasm = match &key {
        Some(key) => signature::sign(cwasm, key),
        None => cwasm,
    };
    // A reader never sees half a `.cwasm`.
    write_atomically(&output, &cwasm, Durability::Unsynced)
        .map_err(|err| CommandError::internal(format!("cannot write {}: {err}", output.display())))?;
    println!(
        "compiled {} ({}) -> {} ({}{}) in {} ms",
        args.agent.display(),
        format_bytes(wasm.len() as u64),
        output.display(),
        format_bytes(cwasm.len() as u64),
        args.target
            .as_ref()
            .map(|target| format!(", for {target}"))
            .unwrap_or_default(),
        started.elapsed().as_millis()
    );
    if let Some(key) = &key {
        println!("signed by {}", key.public_key());
    }
    Ok(Exit::Completed)
}

#[cfg(feature = "cranelift")]
/// The output is written to a temporary file renamed over it, which
/// replaces whatever the path names: so it must be a new path or a regular
/// file, and not the input itself.
fn check_output(input: &Path, output: &Path) -> Result<(), CommandError> {
    let meta = match std::fs::metadata(output) {
        Ok(meta) => meta,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => {
            return Err(CommandError::usage(format!("-o {}: {err}", output.display())));
        }
    };
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a device, FIFO or socket)"
        };
        return Err(CommandError::usage(format!(
            "-o {} is {kind}, which the .cwasm would replace; give a new path or a regular file",
            output.display()
        )));
    }
    let same = std::fs::metadata(input).is_ok_and(|input| input.dev() == meta.dev() && input.ino() == meta.ino());
    if same {
        return Err(CommandError::usage(format!(
            "-o {} is the input file itself, which the .cwasm would replace; give another path",
            output.display()
        )));
    }
    Ok(())
}
