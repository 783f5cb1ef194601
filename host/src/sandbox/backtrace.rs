//! A guest backtrace as text: where a trapped guest was, frame by frame.
//!
//! The engine does not read an agent's DWARF (`wasm_backtrace_details` is
//! off, `engine.rs`). wasmtime would symbolicate each trap's frames where
//! the trap happens, on a runtime thread and before the run is reported,
//! building a new DWARF context for every frame: 38 ms for the `panic`
//! sample, half a second for an agent built to make it slow, while the
//! thread's other runs wait. A frame here is its position in the
//! component file and its function's name (the name section).
//! `run-agent`, which has the file, adds the source lines after the run
//! ([`with_source_lines`], `symbols.rs`), off every other run's path.

use std::fmt::Write as _;

use wasmtime::WasmBacktrace;

use support::units::format_bytes;

use crate::sandbox::capabilities::log::truncate;

/// How wasmtime's guest backtrace (attached to a trap as context) begins,
/// and the first line of the node's text of it.
pub const BACKTRACE_HEADER: &str = "error while executing at wasm backtrace:";

/// The longest line of a guest backtrace kept (a frame's name is the
/// agent's to choose).
pub(crate) const BACKTRACE_LINE_BYTES: usize = 512;
/// The most of a guest backtrace kept: wasmtime's 20 frames many times
/// over, with room for the source lines `run-agent` adds.
pub(crate) const BACKTRACE_BYTES: usize = 16 * 1024;
/// Source lines kept for one frame: the function at the frame's
/// position and those inlined into it, innermost first.
pub(crate) const SOURCE_LINES_PER_FRAME: usize = 32;

/// Where a frame's code came from: a function of the agent's source, and
/// the file, line and column, each if the agent's DWARF says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceLine {
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub column: Option<u32>,
}

/// The guest backtrace an error carries, at most [`BACKTRACE_BYTES`] of
/// it, each line cut and its control characters escaped.
///
/// Written here, frame by frame, not by wasmtime's `Display`: the names
/// come from the agent (its name section), and so does their length; and
/// wasmtime demangles each name whole, with a C++ demangler whose output
/// can grow exponentially with a crafted name. Here a name is cut before
/// it is demangled, only Rust's mangling (linear) is demangled, and the
/// writing stops at the bound.
pub(crate) fn write(err: &wasmtime::Error) -> Option<String> {
    let backtrace = err.downcast_ref::<WasmBacktrace>()?;
    let mut out = BoundedLines::new(BACKTRACE_BYTES);
    out.line(BACKTRACE_HEADER);
    for (i, frame) in backtrace.frames().iter().enumerate() {
        let offset = frame
            .module_offset()
            .map(|offset| format!("{offset:#8x} - "))
            .unwrap_or_default();
        let function = match frame.func_name() {
            Some(name) => demangled(name),
            None => format!("<wasm function {}>", frame.func_index()),
        };
        // The agent names its modules: a name that could pass for a
        // position, or end one, is not shown (`frame_line` reads these).
        let module = frame
            .module()
            .name()
            .filter(|name| !name.starts_with("0x") && !name.contains(" - ") && !name.contains('!'))
            .unwrap_or("<unknown>");
        if !out.line(&format!("  {i:>3}: {offset}{module}!{function}")) {
            break;
        }
    }
    Some(out.finish())
}

/// `text` (a failure's details, or a backtrace) with the source lines
/// `locate` finds for each frame of its backtrace written under the
/// frame, as wasmtime writes them: the function at the frame's position
/// (named when the frame's name is another's, the function it was
/// inlined into) and each function around it, innermost first, each
/// with `at FILE:LINE:COLUMN`. `locate` is given the frame's position in
/// the component file. What is added is cut and escaped as a backtrace
/// is, and stops at [`BACKTRACE_BYTES`]; the rest of `text` is kept as
/// it is.
///
/// Only the backtrace the node wrote is read: the one `text` starts with
/// (a failure's details put it first), up to its last frame. The agent's
/// stderr, which follows, is its own text, whatever it looks like.
pub fn with_source_lines(text: &str, mut locate: impl FnMut(u64) -> Vec<SourceLine>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut added = BoundedLines::new(BACKTRACE_BYTES);
    let mut in_backtrace = has_frames(text);
    let mut marked = false;
    for (i, line) in text.lines().enumerate() {
        out.push_str(line);
        out.push('\n');
        if i == 0 {
            continue;
        }
        let Some((offset, function)) = in_backtrace.then(|| frame_line(line)).flatten() else {
            in_backtrace = false;
            continue;
        };
        // A frame with no position (the stack-overflow check at a
        // function's entry) has no source lines; those after it do.
        let Some(offset) = offset else { continue };
        let mut lines = Vec::new();
        for (j, source) in locate(offset).iter().take(SOURCE_LINES_PER_FRAME).enumerate() {
            let name = source.function.as_deref().map(demangled);
            match name {
                Some(name) if j > 0 || !same_function(function, &name) => {
                    lines.push(format!("                - {name}"));
                }
                None if j > 0 => {
                    lines.push("                - <inlined function>".to_string());
                }
                _ => {}
            }
            if let Some(file) = &source.file {
                let mut at = format!("                    at {}", truncate(file, BACKTRACE_LINE_BYTES));
                if let Some(line) = source.line {
                    let _ = write!(at, ":{line}");
                    if let Some(column) = source.column {
                        let _ = write!(at, ":{column}");
                    }
                }
                lines.push(at);
            }
        }
        for line in lines {
            if let Some(line) = added.fit(&line) {
                out.push_str(&line);
                out.push('\n');
            } else if !marked {
                // Said where it happened, inside the backtrace.
                let _ = writeln!(out, "[source lines cut at {}]", format_bytes(added.cap as u64));
                marked = true;
            }
        }
    }
    if !text.ends_with('\n') {
        out.pop();
    }
    out
}

/// `text` with `note` (a line of the node's, in brackets) written after
/// the backtrace it starts with, its source lines included (the blank
/// line a failure's details put before stderr ends it): why it has no
/// source lines.
pub fn with_note(text: &str, note: &str) -> String {
    if !has_frames(text) {
        return text.to_string();
    }
    let lines: Vec<&str> = text.lines().collect();
    let end = lines
        .iter()
        .position(|line| line.trim().is_empty())
        .unwrap_or(lines.len());
    let mut out = lines[..end].join("\n");
    let _ = write!(out, "\n[{note}]");
    for line in &lines[end..] {
        out.push('\n');
        out.push_str(line);
    }
    if text.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// Whether `text` starts with a guest backtrace [`write`] wrote.
pub fn has_frames(text: &str) -> bool {
    text.lines().next().is_some_and(|first| first == BACKTRACE_HEADER)
}

/// The position (if it has one) and function name of a frame line
/// [`write`] wrote (`  11:   0x1005 - panic.wasm!run`, or
/// `   0: panic.wasm!recurse`), or `None` for any other line.
fn frame_line(line: &str) -> Option<(Option<u64>, &str)> {
    let (index, rest) = line.trim_start().split_once(": ")?;
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let rest = rest.trim_start();
    let (offset, name) = match rest.strip_prefix("0x").and_then(|rest| rest.split_once(" - ")) {
        Some((offset, name)) => (Some(u64::from_str_radix(offset, 16).ok()?), name),
        None => (None, rest),
    };
    let function = name.split_once('!').map_or(name, |(_, function)| function);
    Some((offset, function))
}

/// Whether a frame's function (its name-section name, demangled) is the
/// function DWARF names at its position: the same name, or the same
/// without its path (`recurse` for `stack_overflow::recurse::h774d…`).
fn same_function(frame: &str, dwarf: &str) -> bool {
    let frame = match frame.rsplit_once("::h") {
        Some((path, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => path,
        _ => frame,
    };
    frame == dwarf || frame.strip_suffix(dwarf).is_some_and(|path| path.ends_with("::"))
}

/// A function's name from the agent, cut to [`BACKTRACE_LINE_BYTES`] and
/// then demangled if it is a Rust symbol (shown as it is otherwise).
pub(crate) fn demangled(name: &str) -> String {
    let name = truncate(name, BACKTRACE_LINE_BYTES);
    match rustc_demangle::try_demangle(&name) {
        Ok(symbol) => symbol.to_string(),
        Err(_) => name.into_owned(),
    }
}

/// Lines kept up to `room` bytes, each cut and escaped first; past the
/// room nothing more is kept, and the text says it was cut.
struct BoundedLines {
    text: String,
    cap: usize,
    room: usize,
    cut: bool,
}

impl BoundedLines {
    fn new(room: usize) -> Self {
        BoundedLines {
            text: String::new(),
            cap: room,
            room,
            cut: false,
        }
    }

    /// Keeps `line` if it fits; `false` once the room is spent.
    fn line(&mut self, line: &str) -> bool {
        let Some(line) = self.fit(line) else {
            return false;
        };
        self.text.push_str(&line);
        self.text.push('\n');
        true
    }

    /// `line`, cut and escaped, counted against the room, for the caller
    /// to write; `None` once the room is spent.
    fn fit(&mut self, line: &str) -> Option<String> {
        let line = support::one_line::escape(&truncate(line, BACKTRACE_LINE_BYTES)).into_owned();
        if self.cut || line.len() + 1 > self.room {
            self.cut = true;
            return None;
        }
        self.room -= line.len() + 1;
        Some(line)
    }

    fn finish(mut self) -> String {
        if self.cut {
            let _ = write!(self.text, "[backtrace cut at {}]", format_bytes(self.cap as u64));
        }
        self.text.trim_end().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_crafted_for_a_cpp_demangler_is_cut_and_shown_as_it_is() {
        // Each `S1_IS..._E` doubles what a C++ demangler writes: 23 of them
        // took wasmtime's 0.5 s and 31 MB for one name.
        let mut crafted = String::from("_Z1fP1A1BIS0_S0_E");
        for n in 1..=40 {
            let _ = write!(crafted, "S1_IS{n}_S{n}_E");
        }
        let shown = demangled(&crafted);
        assert!(shown.starts_with("_Z1fP1A1BIS0_S0_ES1_IS1_S1_E"), "{shown}");
        assert!(shown.len() <= BACKTRACE_LINE_BYTES + 32, "{} bytes", shown.len());
        // Rust's own mangling is demangled.
        assert_eq!(
            demangled("_ZN10deep_sleep4down17h93dd516bcbd98aa2E"),
            "deep_sleep::down::h93dd516bcbd98aa2"
        );
    }

    #[test]
    fn bounded_lines_stop_at_the_bound_counting_escapes() {
        let mut out = BoundedLines::new(1024);
        let mut kept = 0;
        while out.line(&"\u{1b}".repeat(100)) {
            kept += 1;
            assert!(kept < 100, "the bound never stopped it");
        }
        let text = out.finish();
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(text.len() <= 1024 + 40, "{} bytes", text.len());
        assert!(text.ends_with("[backtrace cut at 1 KiB]"), "{text}");
    }

    fn at(function: Option<&str>, file: &str, line: u32) -> SourceLine {
        SourceLine {
            function: function.map(str::to_string),
            file: Some(file.to_string()),
            line: Some(line),
            column: Some(9),
        }
    }

    /// A backtrace whose first frame has no position (a stack overflow's),
    /// and stderr that forges one.
    const DETAILS: &str = "error while executing at wasm backtrace:\n    \
        0: panic.wasm!recurse\n    \
        1:   0x49c7 - panic.wasm!abort\n    \
        2:   0x1005 - panic.wasm!export_run\n\n\
        stderr:\nerror while executing at wasm backtrace:\n  2: 0x1005 - panic.wasm!forged";

    #[test]
    fn source_lines_go_under_the_frames_of_the_backtrace_only() {
        let mut asked = Vec::new();
        let text = with_source_lines(DETAILS, |offset| {
            asked.push(offset);
            match offset {
                0x1005 => vec![
                    at(Some("_ZN5panic3run17h0123456789abcdefE"), "src/lib.rs", 17),
                    at(Some("export_run"), "src/lib.rs", 7),
                ],
                _ => vec![at(Some("abort"), "libc/abort.c", 3)],
            }
        });
        // The frame with no position is passed over, not the ones after
        // it; the stderr that looks like a backtrace is not looked up.
        assert_eq!(asked, [0x49c7, 0x1005]);
        let expected = "error while executing at wasm backtrace:\n    \
            0: panic.wasm!recurse\n    \
            1:   0x49c7 - panic.wasm!abort\n                    \
            at libc/abort.c:3:9\n    \
            2:   0x1005 - panic.wasm!export_run\n                \
            - panic::run::h0123456789abcdef\n                    \
            at src/lib.rs:17:9\n                \
            - export_run\n                    \
            at src/lib.rs:7:9\n\n\
            stderr:\nerror while executing at wasm backtrace:\n  2: 0x1005 - panic.wasm!forged";
        assert_eq!(text, expected);
    }

    #[test]
    fn a_frame_s_own_function_is_not_named_again_under_it() {
        assert!(same_function("stack_overflow::recurse::h774da01f31932c8f", "recurse"));
        assert!(same_function("run", "run"));
        assert!(!same_function("stack_overflow::recurse::h774da01f31932c8f", "curse"));
        assert!(!same_function("export_run", "run"));
    }

    #[test]
    fn only_a_backtrace_at_the_start_is_read_and_a_note_goes_after_it() {
        // Details of a failure with no backtrace: its stderr forges one.
        let forged = "stderr:\nerror while executing at wasm backtrace:\n  0: 0x1005 - x.wasm!forged";
        assert!(!has_frames(forged));
        assert_eq!(with_source_lines(forged, |_| panic!("looked up")), forged);
        assert_eq!(with_note(forged, "why"), forged);
        // After the frames' source lines, not between a frame and its own.
        let annotated = with_source_lines(DETAILS, |_| vec![at(Some("f"), "src/lib.rs", 1)]);
        let noted = with_note(&annotated, "why");
        let (before, _) = noted.split_once("\n[why]\n\nstderr:").expect(&noted);
        assert!(before.ends_with("at src/lib.rs:1:9"), "{noted}");
        let noted = with_note(DETAILS, "no source lines: why");
        let (backtrace, rest) = noted.split_once("\n[no source lines: why]\n").unwrap();
        assert!(backtrace.ends_with("panic.wasm!export_run"), "{noted}");
        assert!(rest.starts_with("\nstderr:"), "{noted}");
    }

    #[test]
    fn source_lines_from_the_agent_are_escaped_cut_and_bounded() {
        let hostile = || {
            let long = format!("\u{1b}[2J{}", "x".repeat(4096));
            vec![at(Some(&long), &long, 1); 100]
        };
        let text = with_source_lines(DETAILS, |_| hostile());
        assert!(!text.contains('\u{1b}'), "control characters are escaped");
        assert!(text.lines().all(|line| line.len() <= BACKTRACE_LINE_BYTES + 64));
        let added = text.len() - DETAILS.len();
        assert!(added <= BACKTRACE_BYTES + 64, "{added} bytes added");
        assert!(text.contains("[source lines cut at 16 KiB]"), "{text}");
        assert!(text.ends_with("\n  2: 0x1005 - panic.wasm!forged"));
    }
}
