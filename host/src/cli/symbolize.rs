//! `node-runtime symbolize AGENT.wasm`: the source lines of a backtrace the
//! node reported, read from the agent's DWARF.
//!
//! A node never reads an agent's DWARF (`sandbox/backtrace.rs`), so a
//! Fail's details, or the node's log, name each frame by its position in
//! the component file. Given that file, this writes the details again as
//! `run-agent` writes its own, with the source lines under the frames,
//! within the same bounds (`sandbox/symbols.rs`).

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use super::{CommandError, Exit, read_agent_file, read_file_at_most};
use crate::sandbox::backtrace::has_frames;

/// The most text read: a Fail's details are cut at 256 KiB.
const DETAILS_BYTES: u64 = 1 << 20;

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
            crate::sandbox::backtrace::BACKTRACE_HEADER_TEXT
        )));
    }
    let annotated =
        tokio::task::spawn_blocking(move || crate::sandbox::symbols::with_source_lines(Arc::from(agent), &text))
            .await
            .map_err(|err| CommandError::internal(format!("reading the agent's DWARF stopped: {err}")))?;
    println!("{}", annotated.trim_end());
    Ok(Exit::Completed)
}

fn details_name(path: &std::path::Path) -> String {
    if path.as_os_str() == "-" {
        "--details - (stdin)".to_string()
    } else {
        format!("--details {}", path.display())
    }
}

fn read_details(path: &PathBuf) -> Result<String, CommandError> {
    let bytes = if path.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .lock()
            .take(DETAILS_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|err| CommandError::usage(format!("cannot read --details - (stdin): {err}")))?;
        if bytes.len() as u64 > DETAILS_BYTES {
            return Err(CommandError::usage(format!(
                "--details - (stdin) is more than the {DETAILS_BYTES} bytes a failure's details take"
            )));
        }
        bytes
    } else {
        read_file_at_most("--details", path, DETAILS_BYTES, "a failure's details")?
    };
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
