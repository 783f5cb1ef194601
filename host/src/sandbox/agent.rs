//! Turning bytes into a runnable agent.
//!
//! An artifact is a `.wasm` component (compiled here) or a `.cwasm`
//! precompiled by `node-runtime compile` (checked, then loaded), the
//! latter only from the operator's own files: what the bytes are taken
//! for is decided before anything is compiled
//! ([`classify`](super::artifact_trust::classify)). Either way the result
//! is an [`Agent`]: a component already linked against the node's host
//! capabilities (`InstancePre`), so each run only instantiates.
//! Everything that makes an artifact unrunnable is found here, before any
//! run starts, and reported as an [`InvalidAgent`] naming the problem.

use std::fmt;

use thiserror::Error;
use wasmtime::Engine;
use wasmtime::component::{Component, InstancePre, Linker};

use super::artifact_trust::ArtifactKind;
use super::backtrace::BACKTRACE_HEADER;
use super::bindings::AgentPre;
use super::compile_limits::CompileLimits;
use super::precompiled;
use super::state::RunState;
use wasmtime_wasi::p2::bindings::CommandPre;

/// Why an artifact cannot run. Shown to users as `agent.invalid`.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{0}")]
pub struct InvalidAgent(pub String);

/// Which calling convention the component follows.
#[derive(Clone)]
pub(crate) enum Entry {
    /// The node-runtime agent world: `run(context) -> result<map, error>`.
    World(AgentPre<RunState>),
    /// A plain WASI command: context as JSON on stdin, result on stdout.
    Command(CommandPre<RunState>),
}

/// A component ready to be instantiated, once per run.
pub struct Agent {
    pub(crate) entry: Entry,
    /// SHA-256 of the artifact, hex.
    digest: String,
    /// What it was made from.
    made_from: ArtifactKind,
}

impl Agent {
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Whether it was loaded from a `.cwasm` (native code from the
    /// operator) rather than compiled here.
    pub fn is_precompiled(&self) -> bool {
        self.made_from.is_precompiled()
    }

    /// Whether it was loaded from a network `.cwasm` whose signature by a
    /// trusted key verified: the same bytes may be served again to a
    /// network source without verifying them again.
    pub(crate) fn is_verified_signed(&self) -> bool {
        self.made_from == ArtifactKind::SignedPrecompiled
    }

    /// `"agent"` for the agent world, `"command"` for a WASI command.
    pub fn kind(&self) -> &'static str {
        match self.entry {
            Entry::World(_) => "agent",
            Entry::Command(_) => "command",
        }
    }
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent")
            .field("kind", &self.kind())
            .field("digest", &self.digest)
            .finish()
    }
}

/// How every wasmtime artifact, and so every `.cwasm`, starts.
pub(crate) const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// How every WebAssembly binary starts.
pub(crate) const WASM_MAGIC: &[u8; 4] = b"\0asm";
const CORE_MODULE_VERSION: [u8; 4] = [1, 0, 0, 0];

/// Compiles `bytes` as [`classify`](super::artifact_trust::classify)
/// found them: a `.wasm`, or (loaded) a `.cwasm`. CPU-heavy for a
/// `.wasm`: call it off the async runtime's worker threads.
/// A `.wasm` larger than `limits` allow is refused before wasmtime sees
/// it: a compilation cannot be cancelled.
pub(crate) fn compile(
    engine: &Engine,
    bytes: &[u8],
    kind: ArtifactKind,
    limits: &CompileLimits,
) -> Result<Component, InvalidAgent> {
    if bytes.is_empty() {
        return Err(InvalidAgent("the file is empty (0 bytes)".into()));
    }
    if kind.is_precompiled() {
        // A signature, if any, was verified by `classify` where it had to
        // be (bytes from the network); what it covers is the sealed .cwasm.
        let sealed = super::signature::strip(bytes);
        let artifact = precompiled::unseal(sealed).map_err(|err| InvalidAgent(err.to_string()))?;
        check_architecture(engine, artifact)?;
        // SAFETY: only the operator's own files, and network bytes whose
        // Ed25519 signature by a key the operator trusts verified, are
        // taken for a .cwasm (`classify`), as trusted as those files and
        // keys; the artifact carries the digest `node-runtime compile`
        // recorded, so it is the bytes wasmtime produced; wasmtime checks
        // its own version and configuration before using it.
        return unsafe { Component::deserialize(engine, artifact) }.map_err(|err| incompatible(engine, &err));
    }
    // What `node-runtime compile` writes starts as an ELF artifact and ends
    // with its trailer. With bytes appended, the trailer sits inside; cut
    // short, wasmtime no longer recognises the artifact (nor would it any
    // other ELF file).
    let detected = wasmtime::Engine::detect_precompiled(bytes);
    if bytes.starts_with(ELF_MAGIC) {
        if precompiled::holds_trailer(bytes) {
            return Err(InvalidAgent(
                "the file is a damaged .cwasm: bytes were appended after it, so node-runtime's \
                 integrity trailer is not at its end; compile it again from the .wasm with \
                 `node-runtime compile`"
                    .into(),
            ));
        }
        if detected.is_none() {
            return Err(InvalidAgent(
                "the file is an ELF file wasmtime does not recognise: a damaged (truncated) .cwasm, \
                 or native code that is no agent; compile the .cwasm again from the .wasm with \
                 `node-runtime compile`"
                    .into(),
            ));
        }
    }
    if detected.is_some() {
        return Err(InvalidAgent(precompiled::PrecompiledError::ForeignArtifact.to_string()));
    }
    if !bytes.starts_with(WASM_MAGIC) {
        return Err(InvalidAgent(
            "the file is not WebAssembly (it does not start with the `\\0asm` header) \
             nor a .cwasm from `node-runtime compile`"
                .into(),
        ));
    }
    if bytes.get(4..8) == Some(&CORE_MODULE_VERSION) {
        return Err(InvalidAgent(
            "the file is a core WebAssembly module, not a component; build the agent for \
             the wasm32-wasip2 target (`cargo build --target wasm32-wasip2`, or \
             `node-runtime new` and `node-runtime build`), or wrap the module with \
             `wasm-tools component new MODULE.wasm --adapt wasi_snapshot_preview1.reactor.wasm \
             -o agent.wasm` (the adapter of wasmtime's release)"
                .into(),
        ));
    }
    limits.check(bytes)?;
    compile_component(engine, bytes)
}

#[cfg(feature = "cranelift")]
fn compile_component(engine: &Engine, bytes: &[u8]) -> Result<Component, InvalidAgent> {
    Component::new(engine, bytes).map_err(|err| {
        InvalidAgent(format!(
            "the file is not a valid WebAssembly component (truncated or corrupt?): {}",
            error_chain(&err)
        ))
    })
}

/// A build without a compiler (the edge build) runs precompiled code only.
#[cfg(not(feature = "cranelift"))]
fn compile_component(engine: &Engine, _bytes: &[u8]) -> Result<Component, InvalidAgent> {
    Err(InvalidAgent(no_compiler(engine)))
}

/// What a build without a compiler says when asked to compile.
#[cfg(not(feature = "cranelift"))]
fn no_compiler(engine: &Engine) -> String {
    format!(
        "the file is a WebAssembly component, and this node-runtime is an edge build with no \
         compiler: it runs only .cwasm files precompiled for it; precompile the component on a \
         full build (the default features) with `node-runtime compile --target {}` and give \
         this node the .cwasm",
        super::engine::host_precompile_target(engine)
    )
}

/// Why wasmtime refused a `.cwasm`, with the command that makes one this
/// node runs. wasmtime compares the settings the code was compiled under
/// with the engine's, epoch interruption among them, so code that checks
/// epochs is never run by an engine that does not advance them.
fn incompatible(engine: &Engine, err: &wasmtime::Error) -> InvalidAgent {
    let reason = error_chain(err);
    let rebuild = format!(
        "compile it again from the .wasm with this node's `node-runtime compile` (or, on another \
         machine, `node-runtime compile --target {}`)",
        super::engine::host_precompile_target(engine)
    );
    if reason.contains("compiled with epoch interruption") {
        // Nodes before issue 22 compiled epoch checks into every guest for
        // deadlines; this node enforces them through fuel.
        return InvalidAgent(format!(
            "the .cwasm was compiled by an older node-runtime, with epoch checks for deadlines \
             that this node enforces through fuel instead ({reason}); {rebuild}"
        ));
    }
    if reason.contains("compiled with WebAssembly backtrace support") {
        // Nodes before this one kept the agent's DWARF in the `.cwasm`
        // for wasmtime to symbolicate traps with; this node never does.
        return InvalidAgent(format!(
            "the .cwasm was compiled by an older node-runtime, which kept the agent's debug \
             information in it for backtraces; this node does not ({reason}); {rebuild}"
        ));
    }
    InvalidAgent(format!(
        "the .cwasm was precompiled for a different engine and cannot run here: {reason}; {rebuild}"
    ))
}

/// Refuses a `.cwasm` compiled for another machine, naming both targets.
fn check_architecture(engine: &Engine, artifact: &[u8]) -> Result<(), InvalidAgent> {
    let here = super::engine::engine_architecture(engine);
    match precompiled::artifact_architecture(artifact) {
        Some(built_for) if built_for != here => {
            let runs = if engine.is_pulley() {
                format!("runs {here} bytecode under the Pulley interpreter")
            } else {
                format!("runs native {here} code")
            };
            let target = super::engine::host_precompile_target(engine);
            let or_pulley = if built_for == super::engine::pulley_host_target() {
                ", or run it under Pulley (`Sandbox.Engine: pulley`, `run-agent --engine pulley`)"
            } else {
                ""
            };
            Err(InvalidAgent(format!(
                "the .cwasm was compiled for {built_for}, but this node {runs}; \
                 compile the .wasm for it with `node-runtime compile --target {target}`{or_pulley}"
            )))
        }
        _ => Ok(()),
    }
}

/// Links `component` against the node's capabilities and finds its entry
/// point.
pub(crate) fn link(
    engine: &Engine,
    linker: &Linker<RunState>,
    component: &Component,
    digest: String,
    made_from: ArtifactKind,
) -> Result<Agent, InvalidAgent> {
    let exports: Vec<String> = component
        .component_type()
        .exports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let pre: InstancePre<RunState> = linker.instantiate_pre(component).map_err(|err| {
        // The message names the import, a name the agent chose.
        let chain = error_chain(&err);
        let missing = match quoted(&chain).first() {
            Some(import) => format!("`{}`: ", guest_text(import, GUEST_NAME_BYTES)),
            None => String::new(),
        };
        InvalidAgent(format!(
            "the component needs an import this node does not provide: {missing}{}; {SERVED_WORLDS}",
            guest_text(&chain, 2 * GUEST_NAME_BYTES)
        ))
    })?;
    let entry = if exports.iter().any(|name| name == "run") {
        Entry::World(AgentPre::new(pre).map_err(|err| {
            InvalidAgent(format!(
                "the component exports `run` but not as the node-runtime agent world \
                 defines it (wit/agent.wit): {}",
                error_chain(&err)
            ))
        })?)
    } else if exports.iter().any(|name| name.starts_with("wasi:cli/run@")) {
        Entry::Command(CommandPre::new(pre).map_err(|err| {
            InvalidAgent(format!(
                "the component's `wasi:cli/run` export does not match WASI 0.2: {}",
                error_chain(&err)
            ))
        })?)
    } else {
        return Err(InvalidAgent(format!(
            "the component is of another world: it exports neither `run` (the node-runtime \
             agent world, wit/agent.wit) nor `wasi:cli/run` (a WASI command); its exports: [{}]; \
             {SERVED_WORLDS}",
            export_list(&exports)
        )));
    };
    Ok(Agent {
        entry,
        digest,
        made_from,
    })
}

/// What a refused component is told the node serves, and how to build for it.
const SERVED_WORLDS: &str = "this node serves the world `agent` of node-runtime:agent@0.2.0 \
     (wit/v0.2/agent.wit) and of node-runtime:agent@0.1.0 (wit/agent.wit), which import only \
     node-runtime:agent/{log,budget,llm}, wasi:http/outgoing-handler and the WASI 0.2 \
     interfaces, and WASI 0.2 commands (`wasi:cli/run`); build against one \
     (`node-runtime new` writes a project for 0.2.0)";

/// The names a wasmtime error quotes in backticks, in order (the first
/// of an instantiation error is the import).
fn quoted(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// The longest name of the agent's (an export, an import) a message quotes.
const GUEST_NAME_BYTES: usize = 200;
/// The most exports a message lists.
const LISTED_EXPORTS: usize = 20;

/// `text` from the agent, cut to `max` bytes for a message, its control
/// characters escaped: a name the agent chose cannot forge a line of the
/// report or drive the terminal it is printed on.
fn guest_text(text: &str, max: usize) -> String {
    support::one_line::escape(&super::capabilities::log::truncate(text, max)).into_owned()
}

/// The agent's exports for a message: the first few, each name cut.
fn export_list(exports: &[String]) -> String {
    let mut listed: Vec<String> = exports
        .iter()
        .take(LISTED_EXPORTS)
        .map(|name| guest_text(name, GUEST_NAME_BYTES))
        .collect();
    if exports.len() > LISTED_EXPORTS {
        listed.push(format!("... {} more", exports.len() - LISTED_EXPORTS));
    }
    listed.join(", ")
}

/// `outer: inner: innermost`, the way wasmtime's errors read best, on one
/// line: a validation error quotes the component's own names and bytes,
/// so control characters are escaped.
pub(crate) fn error_chain(err: &wasmtime::Error) -> String {
    let chain = err.chain().filter_map(cause_text).collect::<Vec<_>>().join(": ");
    support::one_line::escape(&chain).into_owned()
}

/// The most of one cause's text kept.
const CAUSE_BYTES: usize = 16 * 1024;

/// A cause's text, at most [`CAUSE_BYTES`] of it; `None` for the guest
/// backtrace. That one is written by the judge, bounded: wasmtime's own
/// text of it demangles every frame's name whole first, which a crafted
/// name makes take seconds each.
fn cause_text(cause: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut text = CauseText::default();
    // An error is the bound reached, or the backtrace recognised.
    let _ = std::fmt::write(&mut text, format_args!("{cause}"));
    (!text.backtrace).then_some(text.text)
}

/// Text written up to [`CAUSE_BYTES`]; it stops at once at the backtrace's
/// header, before any frame.
#[derive(Default)]
struct CauseText {
    text: String,
    backtrace: bool,
}

impl std::fmt::Write for CauseText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = CAUSE_BYTES.saturating_sub(self.text.len());
        self.text.push_str(&super::capabilities::log::truncate(s, room));
        if self.text.starts_with(BACKTRACE_HEADER) {
            self.backtrace = true;
            return Err(std::fmt::Error);
        }
        if self.text.len() >= CAUSE_BYTES {
            return Err(std::fmt::Error);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nodes before this one compiled with `wasm_backtrace_details` on,
    /// which keeps the agent's DWARF in the `.cwasm`; wasmtime refuses
    /// such a file here, and the node says why and what to run.
    #[cfg(feature = "cranelift")]
    #[test]
    fn a_cwasm_that_kept_the_agent_s_dwarf_is_refused_with_the_command_to_rebuild() {
        use crate::sandbox::engine::{Metering, compiler_config};
        const EMPTY_COMPONENT: &[u8] = b"\0asm\x0d\0\x01\0";
        let mut older = compiler_config(Metering::Fuel, None).unwrap();
        older.wasm_backtrace_details(wasmtime::WasmBacktraceDetails::Enable);
        let artifact = Engine::new(&older)
            .unwrap()
            .precompile_component(EMPTY_COMPONENT)
            .unwrap();
        let here = Engine::new(&compiler_config(Metering::Fuel, None).unwrap()).unwrap();
        // SAFETY: the artifact was just made by wasmtime, in this process.
        let refused = unsafe { Component::deserialize(&here, &artifact) }
            .map(|_| ())
            .unwrap_err();
        let message = incompatible(&here, &refused).0;
        assert!(message.contains("compiled by an older node-runtime"), "{message}");
        assert!(message.contains("debug information"), "{message}");
        assert!(message.contains("`node-runtime compile`"), "{message}");
        // The same engine's own artifact loads.
        let own = Engine::new(&compiler_config(Metering::Fuel, None).unwrap()).unwrap();
        let artifact = own.precompile_component(EMPTY_COMPONENT).unwrap();
        // SAFETY: as above.
        assert!(unsafe { Component::deserialize(&here, &artifact) }.is_ok());
    }

    #[test]
    fn a_name_or_error_from_the_component_stays_on_one_line() {
        let forged = "a\u{1b}]0;PWN\u{7}b\ncompleted";
        assert_eq!(export_list(&[forged.to_string()]), "a\\u{1b}]0;PWN\\u{7}b\\ncompleted");
        let err = wasmtime::Error::msg(format!("import name `{forged}`")).context("invalid component");
        let chain = error_chain(&err);
        assert!(!chain.contains(['\u{1b}', '\u{7}', '\n']), "{chain:?}");
        assert!(chain.starts_with("invalid component: import name `a\\u{1b}"), "{chain}");
    }

    #[test]
    fn an_error_chain_leaves_out_the_guest_backtrace_and_cuts_each_cause() {
        struct Backtrace;
        impl std::fmt::Display for Backtrace {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                writeln!(f, "{BACKTRACE_HEADER}")?;
                panic!("the frames were written")
            }
        }
        let err = wasmtime::Error::msg("x".repeat(100_000))
            .context("wasm trap: stack overflow")
            .context(Backtrace);
        let chain = error_chain(&err);
        assert!(chain.starts_with("wasm trap: stack overflow: xxx"), "{chain}");
        assert!(!chain.contains("backtrace"), "{chain}");
        assert!(chain.len() <= CAUSE_BYTES + 64, "{} bytes", chain.len());
    }

    #[test]
    fn an_export_list_quotes_a_few_names_each_cut() {
        let exports: Vec<String> = (0..1000).map(|n| format!("{n}{}", "x".repeat(10_000))).collect();
        let listed = export_list(&exports);
        assert!(
            listed.len() < LISTED_EXPORTS * (GUEST_NAME_BYTES + 40) + 40,
            "{} bytes",
            listed.len()
        );
        assert!(listed.ends_with("... 980 more"), "{}", &listed[listed.len() - 40..]);
        assert_eq!(export_list(&["greet".to_string()]), "greet");
    }
}
