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
