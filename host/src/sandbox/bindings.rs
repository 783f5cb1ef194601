//! Rust bindings of the agent world in `wit/agent.wit`, generated at build
//! time. WASI types come from wasmtime-wasi and wasmtime-wasi-http, which
//! also implement them.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "agent",
    imports: {
        // An LLM call waits on the network: it must not block the thread.
        "node-runtime:agent/llm.chat": async,
        default: trappable,
    },
    exports: { default: async },
    with: {
        "wasi:http": wasmtime_wasi_http::p2::bindings::http,
        "wasi:io": wasmtime_wasi::p2::bindings::io,
        "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
    },
});

pub use self::node_runtime::agent::{budget, llm, log, types};

/// The agent world 0.2.0 (`wit/v0.2/agent.wit`): 0.1.0 with tool calling
/// and structured output in `llm`. Its `types`, `log` and `budget` are
/// 0.1.0's under the new version; a component built against it imports
/// these, and the node serves both versions side by side. The `run`
/// export has the same shape in both, so one entry point calls either.
pub mod v2 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.2",
        world: "agent",
        imports: {
            "node-runtime:agent/llm.chat": async,
            default: trappable,
        },
        exports: { default: async },
        with: {
            "wasi:http": wasmtime_wasi_http::p2::bindings::http,
            "wasi:io": wasmtime_wasi::p2::bindings::io,
            "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
        },
    });

    pub use self::node_runtime::agent::{budget, llm, log, types};
}
