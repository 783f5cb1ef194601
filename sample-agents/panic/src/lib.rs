//! Panic agent: always panics.
//!
//! Exercises how the node reports a guest panic: a Rust panic aborts the
//! component (a wasm `unreachable` trap) after the panic message has been
//! written to the captured stderr.

wit_bindgen::generate!({
    world: "agent",
    path: "../../wit",
    generate_all,
});

struct Panic;

impl Guest for Panic {
    fn run(_context: RunContext) -> Result<StringMap, AgentError> {
        panic!("panic agent: this agent always panics")
    }
}

export!(Panic);
