//! Write a node-runtime agent in Rust: one function from a [`Context`] to
//! an [`Output`] or an [`Error`], exported with [`export!`].
//!
//! ```ignore
//! use node_runtime_agent::{Context, Error, Output, info};
//!
//! fn run(ctx: Context) -> Result<Output, Error> {
//!     let message = ctx.input().ok_or_else(|| Error::fatal("no input"))?;
//!     info!("got {} bytes", message.len());
//!     Ok(Output::from([("echo".to_string(), message.to_string())]))
//! }
//!
//! node_runtime_agent::export!(run);
//! ```
//!
//! The helpers are thin: [`llm::chat`] is the world's `llm.chat`, [`http`]
//! is `wasi:http` with the node's denial as an error, [`budget::remaining`]
//! is the world's `budget.remaining`. The generated bindings stay reachable
//! in [`bindings`] for anything the helpers do not cover.

pub mod budget;
mod context;
mod error;
pub mod http;
pub mod llm;
pub mod log;

pub use context::{Context, Output};
pub use error::Error;

/// The agent world 0.2.0, generated from `../wit` by wit-bindgen.
pub mod bindings {
    wit_bindgen::generate!({
        world: "agent",
        path: "../wit",
        // `wasi:http` and the WASI interfaces it depends on.
        generate_all,
        pub_export_macro: true,
        export_macro_name: "export_world",
    });
}

/// Exports `fn run(Context) -> Result<Output, Error>` as the agent's `run`.
#[macro_export]
macro_rules! export {
    ($run:path) => {
        const _: () = {
            struct NodeRuntimeAgent;

            impl $crate::bindings::Guest for NodeRuntimeAgent {
                fn run(
                    context: $crate::bindings::RunContext,
                ) -> ::core::result::Result<$crate::bindings::StringMap, $crate::bindings::AgentError> {
                    $crate::__run(context, $run)
                }
            }

    $crate::bindings::export_world!(NodeRuntimeAgent with_types_in $crate::bindings);
        };
    };
}

/// What [`export!`] calls: the world's types in, the agent's out.
#[doc(hidden)]
pub fn __run(
    context: bindings::RunContext,
    run: fn(Context) -> Result<Output, Error>,
) -> Result<bindings::StringMap, bindings::AgentError> {
    match run(Context::from(context)) {
        Ok(output) => Ok(output.into_iter().collect()),
        Err(error) => Err(bindings::AgentError {
            message: error.message,
            retryable: error.retryable,
        }),
    }
}
