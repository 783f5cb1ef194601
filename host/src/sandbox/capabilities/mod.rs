//! The host side of the agent world's imports, and the linker that offers
//! them (plus WASI) to every component.
//!
//! One folder per capability (`llm/`, `http/`, `log/`, `budget/`), each
//! holding its settings, the part every run shares, its per-run part and
//! its linking, the way Spin's factors do; `random.rs` replaces
//! wasmtime-wasi's random byte draws. A capability's per-run part is put
//! into the run's state by `RunStateBuilder` (`sandbox/state_builder.rs`).

pub mod budget;
pub mod http;
pub mod llm;
pub mod log;
pub mod random;

use wasmtime::Engine;
use wasmtime::component::{HasSelf, Linker};

use super::bindings;
use super::state::RunState;

/// Every import an agent may use. Built once per engine; components that
/// import anything else are refused at load time.
pub fn linker(engine: &Engine) -> wasmtime::Result<Linker<RunState>> {
    let mut linker = Linker::new(engine);
    // The WASI a `wasm32-wasip2` toolchain links against. Its grants come
    // from each run's `WasiCtx`, which grants nothing by default.
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    random::add_to_linker(&mut linker)?;
    http::add_to_linker(&mut linker)?;
    bindings::types::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
    bindings::v2::types::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
    log::add_to_linker(&mut linker)?;
    llm::add_to_linker(&mut linker)?;
    budget::add_to_linker(&mut linker)?;
    Ok(linker)
}

impl bindings::types::Host for RunState {}
impl bindings::v2::types::Host for RunState {}
