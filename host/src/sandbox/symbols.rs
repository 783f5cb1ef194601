//! An agent's DWARF, read by `node-runtime symbolize` (which `run-agent`
//! runs after its run): the source lines under each frame of a trap's
//! backtrace.
//!
//! The engine leaves DWARF alone (`backtrace.rs` says why); the command
//! is given the component file, and no run is waiting on it. A
//! frame's position is an offset into the component file (wasmtime
//! parses a core module inside a component at the module's place in the
//! file), so the core module whose code section holds it is the one to
//! ask, at the position relative to that section, as DWARF for
//! WebAssembly counts. Each module's DWARF context is built once, when a
//! frame first needs it.
//!
//! The DWARF is the agent's, so it is read as untrusted, within bounds
//! that an ordinary agent's debug build is far inside:
//! - a core module with a `.debug_*` section over [`MAX_SECTION_BYTES`],
//!   more than [`MAX_UNITS`] compile units, or entries nesting deeper than
//!   [`MAX_NESTING`] (addr2line reads nested inlined functions by
//!   recursion) gets no source lines;
//! - abbreviation tables are parsed once and shared by the units that
//!   use them (gimli would otherwise keep a copy per unit: 17.5 GB for a
//!   375 KB agent built for it);
//! - the reading runs on a thread of its own, with a stack sized for that
//!   depth, and is given up after [`READ_TIME`]; a panic there costs the
//!   source lines and nothing else;
//! - shared data can still make the work grow far past the file's size
//!   (one range list or line program referenced by thousands of units),
//!   so the `symbolize` command that does the reading limits its own
//!   memory and CPU, and `run-agent` runs it as a child process it kills
//!   after a few seconds (`cli/symbolize.rs`).
//!
//! Where source lines are left out, a line after the backtrace says why.

use std::cell::{Cell, OnceCell};
use std::ops::Range;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use addr2line::gimli::{self, AbbreviationsCacheStrategy, EndianSlice, LittleEndian};
use wasmparser::{Encoding, Parser, Payload};

use super::backtrace::{SOURCE_LINES_PER_FRAME, SourceLine, has_frames, with_note};

type Reader<'a> = EndianSlice<'a, LittleEndian>;

/// The deepest nesting of DWARF entries read (an ordinary agent's is
/// tens: namespaces, a function, the functions inlined into it).
const MAX_NESTING: isize = 4096;
/// The largest `.debug_*` section read (addr2line holds a line program's
/// rows at about 40 times its size).
const MAX_SECTION_BYTES: usize = 16 << 20;
/// The most compile units read in one core module (one per crate and
/// codegen unit: hundreds for a large agent).
const MAX_UNITS: usize = 10_000;
/// How long the reading may take before the backtrace is printed
/// without it.
const READ_TIME: Duration = Duration::from_secs(2);
/// The stack of the thread that reads DWARF: room for addr2line's
/// recursion [`MAX_NESTING`] deep, unoptimised builds included.
const READER_STACK_BYTES: usize = 64 << 20;

/// `text` (a failure's details, or a backtrace) with the source lines of
/// the backtrace it starts with, read from the DWARF in `file` (the
/// agent's component) on a thread of its own; `text` as it is when the
/// file has no DWARF, and with a line saying why when some was not read.
pub fn with_source_lines(file: Arc<[u8]>, text: &str) -> String {
    if !has_frames(text) {
        return text.to_string();
    }
    let (sender, answer) = mpsc::sync_channel(1);
    let input = text.to_string();
    let reader = std::thread::Builder::new()
        .name("guest-symbols".to_string())
        .stack_size(READER_STACK_BYTES)
        .spawn(move || {
            let symbols = GuestSymbols::read(&file);
            let mut text = if symbols.is_empty() {
                input
            } else {
                super::backtrace::with_source_lines(&input, |offset| symbols.locate(offset))
            };
            if let Some(why) = symbols.left_out.get() {
                text = with_note(&text, &format!("no source lines from a core module: {why}"));
            }
            let _ = sender.send(text);
        });
    if reader.is_err() {
        return with_note(text, "no source lines: cannot start a thread to read them");
    }
    // Given up, the thread is left to end with the process, whose limits
    // bound what it can take meanwhile (`cli/symbolize.rs`).
    match answer.recv_timeout(READ_TIME) {
        Ok(text) => text,
        Err(mpsc::RecvTimeoutError::Timeout) => with_note(
            text,
            &format!(
                "no source lines: reading the agent's DWARF took longer than {} s",
                READ_TIME.as_secs()
            ),
        ),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            with_note(text, "no source lines: the agent's DWARF could not be read")
        }
    }
}

/// The DWARF of every core module of a component (or of a core module).
struct GuestSymbols<'a> {
    modules: Vec<CoreModule<'a>>,
    /// Why a module's DWARF was not read, the first time one was not.
    left_out: Cell<Option<&'static str>>,
}

/// A core module that has code and DWARF.
struct CoreModule<'a> {
    /// Its code section's contents, as offsets into the file.
    code: Range<usize>,
    /// Its `.debug_*` custom sections, by name.
    sections: Vec<(&'a str, &'a [u8])>,
    context: OnceCell<Result<addr2line::Context<Reader<'a>>, ()>>,
}

impl<'a> GuestSymbols<'a> {
    /// Reads where each core module's code and DWARF are in `bytes`. A
    /// file that does not parse gives what was read before the fault.
    fn read(bytes: &'a [u8]) -> Self {
        let mut modules = Vec::new();
        // One entry per module or component being read (they nest); a
        // component's is `None`.
        let mut open: Vec<Option<CoreModule<'a>>> = Vec::new();
        for payload in Parser::new(0).parse_all(bytes) {
            let Ok(payload) = payload else { break };
            match payload {
                Payload::Version { encoding, .. } => open.push(match encoding {
                    Encoding::Module => Some(CoreModule {
                        code: 0..0,
                        sections: Vec::new(),
                        context: OnceCell::new(),
                    }),
                    Encoding::Component => None,
                }),
                Payload::CodeSectionStart { range, .. } => {
                    if let Some(Some(module)) = open.last_mut() {
                        module.code = range;
                    }
                }
                Payload::CustomSection(section) if section.name().starts_with(".debug_") => {
                    if let Some(Some(module)) = open.last_mut() {
                        module.sections.push((section.name(), section.data()));
                    }
                }
                Payload::End(_) => {
                    if let Some(Some(module)) = open.pop()
                        && !module.code.is_empty()
                        && !module.sections.is_empty()
                    {
                        modules.push(module);
                    }
                }
                _ => {}
            }
        }
        GuestSymbols {
            modules,
            left_out: Cell::new(None),
        }
    }

    /// Whether any core module carries DWARF.
    fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// The source lines at `offset` (a position in the file), innermost
    /// function first; none where no DWARF covers it.
    fn locate(&self, offset: u64) -> Vec<SourceLine> {
        let Ok(offset) = usize::try_from(offset) else {
            return Vec::new();
        };
        let Some(module) = self.modules.iter().find(|module| module.code.contains(&offset)) else {
            return Vec::new();
        };
        let context = module.context.get_or_init(|| {
            module.context().map_err(|why| {
                if self.left_out.get().is_none() {
                    self.left_out.set(Some(why));
                }
            })
        });
        let Ok(context) = context else {
            return Vec::new();
        };
        let probe = (offset - module.code.start) as u64;
        let Ok(mut frames) = context.find_frames(probe).skip_all_loads() else {
            return Vec::new();
        };
        let mut lines = Vec::new();
        while lines.len() < SOURCE_LINES_PER_FRAME {
            let Ok(Some(frame)) = frames.next() else { break };
            let function = frame
                .function
                .as_ref()
                .and_then(|function| function.raw_name().ok())
                .map(|name| name.into_owned());
            let location = frame.location.as_ref();
            lines.push(SourceLine {
                function,
                file: location.and_then(|at| at.file).map(str::to_string),
                line: location.and_then(|at| at.line),
                column: location.and_then(|at| at.column),
            });
        }
        lines
    }
}

impl<'a> CoreModule<'a> {
    /// Its DWARF, within the bounds, or why not.
    fn context(&self) -> Result<addr2line::Context<Reader<'a>>, &'static str> {
        if self.sections.iter().any(|(_, data)| data.len() > MAX_SECTION_BYTES) {
            return Err("a DWARF section is larger than run-agent reads (16 MiB)");
        }
        let sections = &self.sections;
        let mut dwarf = gimli::Dwarf::load(|id: gimli::SectionId| -> Result<Reader<'a>, gimli::Error> {
            let data = sections
                .iter()
                .find(|(name, _)| *name == id.name())
                .map_or(&[][..], |(_, data)| *data);
            Ok(EndianSlice::new(data, LittleEndian))
        })
        .map_err(|_| "its DWARF does not parse")?;
        within_bounds(&dwarf)?;
        dwarf.populate_abbreviations_cache(AbbreviationsCacheStrategy::All);
        addr2line::Context::from_dwarf(dwarf).map_err(|_| "its DWARF does not parse")
    }
}

/// Whether every unit's entries parse, there are at most [`MAX_UNITS`] of
/// them, and they nest at most [`MAX_NESTING`] deep: read without
/// recursion.
fn within_bounds(dwarf: &gimli::Dwarf<Reader<'_>>) -> Result<(), &'static str> {
    const UNPARSED: &str = "its DWARF does not parse";
    let mut units = dwarf.units();
    for _ in 0..=MAX_UNITS {
        let Some(header) = units.next().map_err(|_| UNPARSED)? else {
            return Ok(());
        };
        let abbreviations = dwarf.abbreviations(&header).map_err(|_| UNPARSED)?;
        let mut entries = header.entries_raw(&abbreviations, None).map_err(|_| UNPARSED)?;
        while !entries.is_empty() {
            if entries.next_depth() > MAX_NESTING {
                return Err("its DWARF nests deeper than run-agent reads (4,096 entries)");
            }
            if let Some(abbreviation) = entries.read_abbreviation().map_err(|_| UNPARSED)? {
                entries
                    .skip_attributes(abbreviation.attributes())
                    .map_err(|_| UNPARSED)?;
            }
        }
    }
    Err("its DWARF has more compile units than run-agent reads (10,000)")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A core module with one function and DWARF of a compile unit, a
    /// function covering its code, and `nesting` inlined functions, each
    /// inside the last; and a backtrace with a frame in that function.
    fn module_with_inlining(nesting: usize) -> (Vec<u8>, String) {
        fn section(id: u8, contents: &[u8]) -> Vec<u8> {
            let mut out = vec![id];
            leb(&mut out, contents.len());
            out.extend_from_slice(contents);
            out
        }
        fn leb(out: &mut Vec<u8>, mut n: usize) {
            loop {
                let byte = (n & 0x7f) as u8;
                n >>= 7;
                out.push(if n == 0 { byte } else { byte | 0x80 });
                if n == 0 {
                    break;
                }
            }
        }
        fn custom(name: &str, data: &[u8]) -> Vec<u8> {
            let mut contents = vec![name.len() as u8];
            contents.extend_from_slice(name.as_bytes());
            contents.extend_from_slice(data);
            section(0, &contents)
        }
        // Abbreviations 1-3: compile unit, function, inlined function;
        // each with children, a low_pc (addr) and a high_pc (data4).
        let mut abbrev = Vec::new();
        for (code, tag) in [(1u8, 0x11u8), (2, 0x2e), (3, 0x1d)] {
            abbrev.extend_from_slice(&[code, tag, 1, 0x11, 0x01, 0x12, 0x06, 0, 0]);
        }
        abbrev.push(0);
        let entry = |code: u8| [code, 0, 0, 0, 0, 100, 0, 0, 0];
        let mut entries = Vec::new();
        entries.extend_from_slice(&entry(1));
        entries.extend_from_slice(&entry(2));
        for _ in 0..nesting {
            entries.extend_from_slice(&entry(3));
        }
        entries.extend(std::iter::repeat_n(0, nesting + 2));
        // DWARF 4, 32-bit: version, abbreviation offset, address size.
        let mut info = ((2 + 4 + 1 + entries.len()) as u32).to_le_bytes().to_vec();
        info.extend_from_slice(&[4, 0, 0, 0, 0, 0, 4]);
        info.extend_from_slice(&entries);

        let mut module = b"\0asm\x01\0\0\0".to_vec();
        module.extend(section(1, &[1, 0x60, 0, 0]));
        module.extend(section(3, &[1, 0]));
        let code_start = module.len() + 2;
        module.extend(section(10, &[1, 2, 0, 0x0b]));
        module.extend(custom(".debug_abbrev", &abbrev));
        module.extend(custom(".debug_info", &info));
        let backtrace = format!(
            "error while executing at wasm backtrace:\n    0: {:#8x} - <unknown>!f",
            code_start + 1
        );
        (module, backtrace)
    }

    #[test]
    fn the_functions_inlined_at_a_frame_are_read_from_the_module_s_dwarf() {
        let (module, backtrace) = module_with_inlining(3);
        let text = with_source_lines(Arc::from(module), &backtrace);
        // The three inlined functions and the one they are in, unnamed.
        assert_eq!(text.matches("- <inlined function>").count(), 3, "{text}");
    }

    /// addr2line reads inlined functions by recursion: DWARF nested this
    /// deep would overflow any thread's stack.
    #[test]
    fn dwarf_nested_past_the_bound_gives_no_source_lines_and_no_overflow() {
        let (module, backtrace) = module_with_inlining(200_000);
        let text = with_source_lines(Arc::from(module), &backtrace);
        assert_eq!(
            text,
            format!(
                "{backtrace}\n[no source lines from a core module: its DWARF nests deeper than \
                 run-agent reads (4,096 entries)]"
            )
        );
    }
}
