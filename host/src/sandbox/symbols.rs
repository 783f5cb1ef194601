//! An agent's DWARF, read by the node for `run-agent`: the source lines
//! under each frame of a trap's backtrace.
//!
//! The engine leaves DWARF alone (`backtrace.rs` says why); `run-agent`
//! has the component file and its one run is over when it reads them. A
//! frame's position is an offset into the component file (wasmtime
//! parses a core module inside a component at the module's place in the
//! file), so the core module whose code section holds it is the one to
//! ask, at the position relative to that section, as DWARF for
//! WebAssembly counts. Each module's DWARF context is built once, when a
//! frame first needs it.

use std::cell::OnceCell;
use std::ops::Range;

use addr2line::gimli::{self, EndianSlice, LittleEndian};
use wasmparser::{Encoding, Parser, Payload};

use super::backtrace::{SOURCE_LINES_PER_FRAME, SourceLine};

type Reader<'a> = EndianSlice<'a, LittleEndian>;

/// The DWARF of every core module of a component (or of a core module).
pub struct GuestSymbols<'a> {
    modules: Vec<CoreModule<'a>>,
}

/// A core module that has code and DWARF.
struct CoreModule<'a> {
    /// Its code section's contents, as offsets into the file.
    code: Range<usize>,
    /// Its `.debug_*` custom sections, by name.
    sections: Vec<(&'a str, &'a [u8])>,
    context: OnceCell<Option<addr2line::Context<Reader<'a>>>>,
}

impl<'a> GuestSymbols<'a> {
    /// Reads where each core module's code and DWARF are in `bytes`. A
    /// file that does not parse gives what was read before the fault.
    pub fn read(bytes: &'a [u8]) -> Self {
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
        GuestSymbols { modules }
    }

    /// Whether any core module carries DWARF.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// The source lines at `offset` (a position in the file), innermost
    /// function first; none where no DWARF covers it.
    pub fn locate(&self, offset: u64) -> Vec<SourceLine> {
        let Ok(offset) = usize::try_from(offset) else {
            return Vec::new();
        };
        let Some(module) = self.modules.iter().find(|module| module.code.contains(&offset)) else {
            return Vec::new();
        };
        let Some(context) = module.context.get_or_init(|| module.context()) else {
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
    fn context(&self) -> Option<addr2line::Context<Reader<'a>>> {
        let sections = &self.sections;
        let dwarf = gimli::Dwarf::load(|id: gimli::SectionId| -> Result<Reader<'a>, gimli::Error> {
            let data = sections
                .iter()
                .find(|(name, _)| *name == id.name())
                .map_or(&[][..], |(_, data)| *data);
            Ok(EndianSlice::new(data, LittleEndian))
        })
        .ok()?;
        addr2line::Context::from_dwarf(dwarf).ok()
    }
}
