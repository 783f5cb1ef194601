//! `node-runtime symbolize AGENT.wasm`: the source lines of a backtrace the
//! node reported, read from the agent's DWARF.
//!
//! A node never reads an agent's DWARF (`sandbox/backtrace.rs`), so a
//! Fail's details, or the node's log, name each frame by its position in
//! the component file. Given that file, this writes the details again as
//! `run-agent` writes its own, with the source lines under the frames,
//! within the same bounds (`sandbox/symbols.rs`).
//!
//! The DWARF is the agent's, and shared data (one range list or line
//! program for thousands of units) can make a reader's work grow far past
//! the file's size: the command limits its own address space and CPU time
//! before it reads, and `run-agent` runs it as a child process
//! ([`in_child`]) that it kills after [`CHILD_TIME`], so a reading that
//! outgrows them costs the source lines and nothing else.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::{CommandError, Exit, read_agent_file, read_file_or_stdin_at_most};
use crate::sandbox::backtrace::{has_frames, with_note};

/// The most text read: a Fail's details are cut at 256 KiB.
const DETAILS_BYTES: u64 = 1 << 20;
/// The address space the command may take beyond what it has when it
/// starts (an allocation past it fails, and ends the process).
const ADDRESS_SPACE_BYTES: u64 = 2 << 30;
/// The CPU time it may take.
const CPU_SECONDS: u64 = 5;
/// How long `run-agent` waits for its `symbolize` child.
const CHILD_TIME: Duration = Duration::from_secs(4);
/// What the child may print beyond the text it was given: the source
/// lines (16 KiB at most, escaped) and a note.
const CHILD_OUTPUT_SLACK: usize = 64 * 1024;

#[derive(Debug, Args)]
pub struct SymbolizeArgs {
    /// The component (`.wasm`) the backtrace came from, as built: its
    /// DWARF gives the source lines. A `.cwasm` has none.
    #[arg(value_name = "AGENT")]
    pub agent: PathBuf,
    /// The backtrace, or a failure's details that start with one: a file,
    /// or `-` for stdin (the default).
    #[arg(long, value_name = "FILE", default_value = "-")]
    pub details: PathBuf,
}

pub async fn run(args: SymbolizeArgs) -> Result<Exit, CommandError> {
    limit_this_process();
    let agent = read_agent_file("the agent file", &args.agent)?;
    if !agent.starts_with(crate::sandbox::WASM_MAGIC) {
        return Err(CommandError::usage(format!(
            "{} is not a WebAssembly component: give the .wasm the agent was built as (a .cwasm \
             keeps no DWARF)",
            args.agent.display()
        )));
    }
    let text = read_details(&args.details)?;
    // As copied: indented (from `run-agent`'s report) or after blank lines.
    let text = dedented(text.trim_start_matches(['\n', '\r']));
    if !has_frames(&text) {
        return Err(CommandError::usage(format!(
            "{}: no backtrace: the text must start with the line `{}`, as a failure's details do",
            details_name(&args.details),
            crate::sandbox::backtrace::BACKTRACE_HEADER
        )));
    }
    let annotated =
        tokio::task::spawn_blocking(move || crate::sandbox::symbols::with_source_lines(Arc::from(agent), &text))
            .await
            .map_err(|err| CommandError::internal(format!("reading the agent's DWARF stopped: {err}")))?;
    println!("{}", annotated.trim_end());
    Ok(Exit::Completed)
}

/// `text` (a failure's details, or a backtrace) with the source lines
/// `node-runtime symbolize` reads from `agent` (the bytes that ran, given
/// to it in a private temporary file, so that a file replaced since, or
/// a pipe, reads the same), run as a child process; with a note saying
/// why not, when it fails or takes longer than [`CHILD_TIME`] (it is
/// killed then, and with this process).
pub(super) async fn in_child(agent: &[u8], text: &str) -> String {
    use std::io::Write as _;
    use tokio::io::AsyncWriteExt as _;
    if !has_frames(text) {
        return text.to_string();
    }
    let copy = tempfile::Builder::new()
        .prefix("node-runtime-agent-")
        .suffix(".wasm")
        .tempfile()
        .and_then(|mut file| file.write_all(agent).map(|()| file));
    let Ok(copy) = copy else {
        return with_note(
            text,
            "no source lines: cannot write the agent to a temporary file to read them",
        );
    };
    // The running binary, even if its file was replaced or deleted since.
    let exe = if cfg!(target_os = "linux") {
        Ok(PathBuf::from("/proc/self/exe"))
    } else {
        std::env::current_exe()
    };
    let Ok(exe) = exe else {
        return with_note(
            text,
            "no source lines: cannot find the node-runtime binary to read them",
        );
    };
    let mut command = tokio::process::Command::new(exe);
    command
        .args(["symbolize", "--details", "-", "--"])
        .arg(copy.path())
        .env("RUST_LOG", "off")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    #[cfg(target_os = "linux")]
    // SAFETY: only prctl, async-signal-safe, runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            // Ends with run-agent, however run-agent ends.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let Ok(mut child) = command.spawn() else {
        return with_note(text, "no source lines: cannot start `node-runtime symbolize`");
    };
    let read = async {
        if let Some(mut stdin) = child.stdin.take() {
            // A child that ends early stops reading: what it printed says.
            let _ = stdin.write_all(text.as_bytes()).await;
        }
        child.wait_with_output().await
    };
    let output = tokio::time::timeout(CHILD_TIME, read).await;
    drop(copy);
    match output {
        Ok(Ok(output)) if output.status.success() => {
            let annotated = String::from_utf8_lossy(&output.stdout);
            // What it prints is the text with at most 16 KiB of source
            // lines and a note; anything else is not taken.
            if !has_frames(&annotated) || annotated.len() > text.len() + CHILD_OUTPUT_SLACK {
                return with_note(text, "no source lines: `node-runtime symbolize` printed something else");
            }
            let mut annotated = annotated.trim_end().to_string();
            if text.ends_with('\n') {
                annotated.push('\n');
            }
            annotated
        }
        Ok(_) => with_note(
            text,
            "no source lines: reading the agent's DWARF failed or outgrew its bounds (2 GiB more \
             memory, 5 s of CPU)",
        ),
        Err(_) => with_note(
            text,
            &format!(
                "no source lines: reading the agent's DWARF took longer than {} s",
                CHILD_TIME.as_secs()
            ),
        ),
    }
}

/// Caps this process: its address space at what it has now plus
/// [`ADDRESS_SPACE_BYTES`] (its allocator's and threads' reservations
/// grow with the machine's cores, so a fixed total would leave nothing on
/// a large machine), its CPU time at [`CPU_SECONDS`], and its core dumps
/// at nothing (a dump of a process stopped at its limit is gigabytes).
fn limit_this_process() {
    #[cfg(target_os = "linux")]
    {
        let now = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix("VmSize:"))
                    .and_then(|value| value.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(0, |kib| kib * 1024);
        for (resource, limit) in [
            (libc::RLIMIT_AS, now + ADDRESS_SPACE_BYTES),
            (libc::RLIMIT_CPU, CPU_SECONDS),
            (libc::RLIMIT_CORE, 0),
        ] {
            let wanted = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            let mut current = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit and setrlimit read and write only the
            // structs passed; a limit already lower is kept.
            unsafe {
                if libc::getrlimit(resource, &mut current) == 0 && current.rlim_cur <= limit {
                    continue;
                }
                libc::setrlimit(resource, &wanted);
            }
        }
    }
}

fn details_name(path: &std::path::Path) -> String {
    if path.as_os_str() == "-" {
        "--details - (stdin)".to_string()
    } else {
        format!("--details {}", path.display())
    }
}

fn read_details(path: &std::path::Path) -> Result<String, CommandError> {
    let bytes = read_file_or_stdin_at_most("--details", path, DETAILS_BYTES, "a failure's details")?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// `text` with the first line's indentation taken off every line that has
/// it.
fn dedented(text: &str) -> String {
    let first = text.lines().next().unwrap_or_default();
    let indent = &first[..first.len() - first.trim_start().len()];
    text.lines()
        .map(|line| line.strip_prefix(indent).unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backtrace_copied_from_run_agent_s_report_is_dedented() {
        let copied = "  error while executing at wasm backtrace:\n     11:   0x1005 - a.wasm!run\n  \n  stderr:";
        assert_eq!(
            dedented(copied),
            "error while executing at wasm backtrace:\n   11:   0x1005 - a.wasm!run\n\nstderr:"
        );
        assert!(has_frames(&dedented(copied)));
    }
}
