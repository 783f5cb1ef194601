//! The `node-runtime` command line: argument parsing and the commands.
//!
//! Parsing (this file and `args`) is separate from what each command does
//! (`run_agent`, `compile`), and both are separate from the engine, so each
//! can be tested alone. Exit codes are part of the interface: see
//! [`Exit`].

/// `println!` for a line of a command's own output that quotes outside
/// text (ids a control plane sent, paths, messages): escaped as a log line
/// is, so printing it can neither drive nor reorder the terminal, nor
/// forge another line.
macro_rules! say {
    ($($arg:tt)*) => {
        println!("{}", support::one_line::escape(&format!($($arg)*)))
    };
}

/// [`say!`] for stderr.
macro_rules! say_err {
    ($($arg:tt)*) => {
        {
            $crate::telemetry::flush_log_lines();
            eprintln!("{}", support::one_line::escape(&format!($($arg)*)))
        }
    };
}

mod args;
#[cfg(feature = "dev")]
mod build;
mod compile;
mod config_check;
#[cfg(feature = "dev")]
mod dev;
mod keygen;
#[cfg(feature = "dev")]
mod new;
mod outbox;
mod registry;
mod run_agent;
mod serve;
#[cfg(feature = "guest-symbols")]
mod symbolize;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::telemetry::LogFormat;

pub use args::{parse_duration, parse_key_value, parse_size};

/// Run business-process agents as sandboxed WebAssembly components.
#[derive(Debug, Parser)]
#[command(name = "node-runtime", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process; without `dev` (whose arguments are as large)
// clippy flags `run-agent`'s size.
#[derive(Debug, Subcommand)]
#[cfg_attr(not(feature = "dev"), allow(clippy::large_enum_variant))]
pub enum Command {
    /// Run an agent once, locally, in the sandbox production uses, and
    /// print its result and what it consumed.
    RunAgent(run_agent::RunAgentArgs),
    /// Precompile a component to a .cwasm for this node's engine (or, with
    /// --target, another machine's), so that nodes (edge devices above
    /// all) skip compilation at run time.
    Compile(compile::CompileArgs),
    /// Make an Ed25519 key pair for `compile --sign`: the private key
    /// (PKCS#8 PEM) and its public key (`.pub`, for
    /// AgentStore.TrustedSigningKeys).
    Keygen(keygen::KeygenArgs),
    /// Run the node daemon: register with the control plane, heartbeat,
    /// pull leases, run them, report; drain on SIGTERM or SIGINT.
    Serve(serve::ServeArgs),
    /// Start a development control plane and one node in this process.
    #[cfg(feature = "dev")]
    Dev(dev::DevArgs),
    /// See and manage the reports a stopped node still owes its control
    /// plane: list, retry, purge.
    Outbox(outbox::OutboxArgs),
    /// Publish a component to an OCI registry, as a Wasm OCI artifact.
    Push(registry::PushArgs),
    /// Fetch a component from an OCI registry.
    Pull(registry::PullArgs),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Create an agent project in Rust, Python or JavaScript: a sample
    /// agent, the SDK and the agent world it targets (no network needed).
    #[cfg(feature = "dev")]
    New(new::NewArgs),
    /// Build an agent project (`node-runtime new`) into a component, check
    /// it as the node will, and print its path, size and `agent.digest`.
    #[cfg(feature = "dev")]
    Build(build::BuildArgs),
    /// Add the source lines to a backtrace a node reported (a Fail's
    /// details, or its log), from the agent's DWARF: read on stdin or
    /// from --details, written to stdout.
    #[cfg(feature = "guest-symbols")]
    Symbolize(symbolize::SymbolizeArgs),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Load the configuration as `serve` would and print the effective
    /// values (defaults and environment applied, secrets redacted).
    Check(config_check::ConfigCheckArgs),
}

/// The process exit codes. Stable: scripts and CI key on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The run completed.
    Completed = 0,
    /// The node itself failed (the engine could not start, an output file
    /// could not be written).
    Internal = 1,
    /// The command line was wrong, or a file it names could not be read.
    Usage = 2,
    /// The agent returned an error (`agent.error`).
    AgentError = 3,
    /// The agent trapped (`agent.trap`).
    AgentTrap = 4,
    /// The artifact is not a runnable agent (`agent.invalid`).
    AgentInvalid = 5,
    /// A budget ran out (`budget.*`).
    BudgetExceeded = 6,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit as u8)
    }
}

/// An error that ends a command, with the exit code it maps to.
#[derive(Debug)]
pub struct CommandError {
    pub exit: Exit,
    pub message: String,
}

impl CommandError {
    pub fn usage(message: impl Into<String>) -> Self {
        CommandError {
            exit: Exit::Usage,
            message: message.into(),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        CommandError {
            exit: Exit::Internal,
            message: message.into(),
        }
    }
}

impl From<crate::app::BuildError> for CommandError {
    /// A configuration (or a file it names) at fault is a usage error; the
    /// node failing to start its parts is internal.
    fn from(err: crate::app::BuildError) -> Self {
        if err.is_usage() {
            CommandError::usage(err.to_string())
        } else {
            CommandError::internal(err.to_string())
        }
    }
}

/// Prints what parsing the command line came to (a usage error, or the
/// help or version asked for) and returns its exit code. A usage error
/// quotes the argument it could not take: each line is escaped as a log
/// line is (clap's colours kept on a terminal), so an argument cannot
/// drive or reorder the terminal through it.
pub fn parse_error(err: &clap::Error) -> ExitCode {
    use std::io::{IsTerminal, Write};
    let colours = if err.use_stderr() {
        std::io::stderr().is_terminal()
    } else {
        std::io::stdout().is_terminal()
    };
    let text = if colours {
        err.render().ansi().to_string()
    } else {
        err.render().to_string()
    };
    let shown = support::one_line::escape_keeping_lines(&text, colours);
    let _ = if err.use_stderr() {
        std::io::stderr().write_all(shown.as_bytes())
    } else {
        std::io::stdout().write_all(shown.as_bytes())
    };
    ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(2))
}

/// Writes a command's own line (not a log event) on stderr in the log's
/// `format`: for people, the message with its newlines kept and anything
/// else a terminal acts on escaped (`error: ` before an error); for
/// machines, one JSON object of the log's own shape.
pub(crate) fn say(format: LogFormat, level: tracing::Level, target: &str, message: &str) {
    crate::telemetry::flush_log_lines();
    match format {
        LogFormat::Human => {
            let prefix = if level == tracing::Level::ERROR { "error: " } else { "" };
            eprintln!("{prefix}{}", support::one_line::escape_keeping_lines(message, false));
        }
        LogFormat::Json => {
            let line = serde_json::json!({
                "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
                "level": level.as_str(),
                "fields": {"message": message},
                "target": target,
            });
            eprintln!("{}", support::one_line::escape_json(&line.to_string()));
        }
    }
}

/// Runs the parsed command and returns the process's exit code.
pub async fn run(cli: Cli) -> ExitCode {
    // run-agent, serve and dev install their own logging (format, level,
    // OpenTelemetry); the others log plainly.
    let (own_logging, log_format) = match &cli.command {
        Command::RunAgent(args) => (true, args.log_format),
        Command::Serve(args) => (true, args.log_format),
        #[cfg(feature = "dev")]
        Command::Dev(args) => (true, args.log_format),
        _ => (false, LogFormat::Human),
    };
    if !own_logging {
        crate::telemetry::init_plain_logging("info");
    }
    let result = match cli.command {
        Command::RunAgent(args) => run_agent::run(args).await,
        Command::Compile(args) => compile::run(args).await,
        Command::Keygen(args) => keygen::run(args).await,
        Command::Serve(args) => serve::run(args).await,
        #[cfg(feature = "dev")]
        Command::Dev(args) => dev::run(args).await,
        Command::Outbox(args) => outbox::run(args).await,
        Command::Push(args) => registry::push(args).await,
        Command::Pull(args) => registry::pull(args).await,
        Command::Config(ConfigCommand::Check(args)) => config_check::run(args).await,
        #[cfg(feature = "dev")]
        Command::New(args) => new::run(args).await,
        #[cfg(feature = "dev")]
        Command::Build(args) => build::run(args).await,
        #[cfg(feature = "guest-symbols")]
        Command::Symbolize(args) => symbolize::run(args).await,
    };
    match result {
        Ok(exit) => exit.into(),
        Err(err) => {
            // No URL's credentials, and nothing a terminal acts on,
            // whatever the error quotes (a configuration value, a path).
            let message = support::redact::urls_in(&err.message);
            // With JSON log lines, the last line is one of them.
            say(log_format, tracing::Level::ERROR, "node_runtime::cli", &message);
            err.exit.into()
        }
    }
}

/// A kit error as the exit it maps to: the command line's fault (2), a
/// missing or broken tool (1), the agent's own build failing (5, as an
/// artifact that is no agent).
#[cfg(feature = "dev")]
pub(crate) fn kit_error(err: crate::kit::KitError) -> CommandError {
    use crate::kit::KitError;
    let exit = match &err {
        KitError::Usage(_) => Exit::Usage,
        KitError::Build(_) => Exit::AgentInvalid,
        KitError::Tool(_) | KitError::Io { .. } => Exit::Internal,
    };
    CommandError {
        exit,
        message: err.to_string(),
    }
}

/// The most an agent file given on the command line may hold: what a node
/// downloads at most by default (`AgentStore.MaxDownloadBytes`).
pub(crate) const MAX_AGENT_FILE_BYTES: u64 = 256 << 20;

/// Reads an agent file: its first bytes first, and only a file that starts
/// as WebAssembly or as a compiled artifact (ELF) whole, and at most
/// [`MAX_AGENT_FILE_BYTES`]. Anything else comes back as its first bytes
/// only, for the sandbox to say what it is not: a large file, or an endless
/// one (`/dev/zero`), is never read into memory.
pub(crate) fn read_agent_file(flag: &str, path: &PathBuf) -> Result<Vec<u8>, CommandError> {
    use std::io::Read;
    let fail = |err: std::io::Error| CommandError::usage(format!("cannot read {flag} {}: {err}", path.display()));
    let mut file = std::fs::File::open(path).map_err(fail)?;
    let mut header = Vec::with_capacity(8);
    file.by_ref().take(8).read_to_end(&mut header).map_err(fail)?;
    if !(header.starts_with(crate::sandbox::WASM_MAGIC) || header.starts_with(crate::sandbox::ELF_MAGIC)) {
        return Ok(header);
    }
    read_rest(file, header, MAX_AGENT_FILE_BYTES)
        .map_err(fail)?
        .ok_or_else(|| too_large(flag, path, MAX_AGENT_FILE_BYTES, "an agent"))
}

/// Reads at most `max` bytes of a file a flag names; a larger (or endless)
/// one is an error naming the flag, the path and the bound.
pub(crate) fn read_file_at_most(flag: &str, path: &PathBuf, max: u64, what: &str) -> Result<Vec<u8>, CommandError> {
    let fail = |err: std::io::Error| CommandError::usage(format!("cannot read {flag} {}: {err}", path.display()));
    let file = std::fs::File::open(path).map_err(fail)?;
    read_rest(file, Vec::new(), max)
        .map_err(fail)?
        .ok_or_else(|| too_large(flag, path, max, what))
}

/// As [`read_file_at_most`], with `-` for stdin.
pub(crate) fn read_file_or_stdin_at_most(
    flag: &str,
    path: &std::path::Path,
    max: u64,
    what: &str,
) -> Result<Vec<u8>, CommandError> {
    use std::io::Read;
    if path.as_os_str() != "-" {
        return read_file_at_most(flag, &path.to_path_buf(), max, what);
    }
    let mut bytes = Vec::new();
    std::io::stdin()
        .lock()
        .take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|err| CommandError::usage(format!("cannot read {flag} - (stdin): {err}")))?;
    if bytes.len() as u64 > max {
        return Err(CommandError::usage(format!(
            "{flag} - (stdin) is more than the {max} bytes {what} may take"
        )));
    }
    Ok(bytes)
}

/// Appends what is left of `file` to `bytes`, up to `max` bytes in all;
/// `None` when there is more.
fn read_rest(file: std::fs::File, mut bytes: Vec<u8>, max: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let room = (max + 1).saturating_sub(bytes.len() as u64);
    file.take(room).read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= max).then_some(bytes))
}

fn too_large(flag: &str, path: &std::path::Path, max: u64, what: &str) -> CommandError {
    CommandError::usage(format!(
        "{flag} {} is larger than the {} {what} may be; check that it is the file you meant",
        path.display(),
        support::units::format_bytes(max)
    ))
}
