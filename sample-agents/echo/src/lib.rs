//! Echo agent: returns its input and its run context as the result map.
//!
//! Exercises the whole happy path of the node: the context the node builds
//! from a lease reaches the agent unchanged, and the agent's result map comes
//! back as the lease's `Complete`. It logs one line and never asks for its
//! budget, so two runs on the same input consume exactly the same fuel.

wit_bindgen::generate!({
    world: "agent",
    path: "../../wit",
    // The world imports `wasi:http/outgoing-handler`; generate bindings for
    // it and the WASI interfaces it depends on too (unused ones cost nothing).
    generate_all,
});

use node_runtime::agent::log::{self, Level};

struct Echo;

impl Guest for Echo {
    fn run(context: RunContext) -> Result<StringMap, AgentError> {
        log::log(
            Level::Info,
            "echo",
            &[("keys".to_string(), context.input_ref.len().to_string())],
        );

        let mut result = context.input_ref;
        result.push(("run_id".to_string(), context.run_id));
        result.push(("lease_id".to_string(), context.lease_id));
        result.push(("agent_id".to_string(), context.agent_id));
        result.push(("agent_version".to_string(), context.agent_version));
        result.push(("trace_id".to_string(), context.trace_id));
        for (key, value) in context.metadata {
            result.push((format!("metadata.{key}"), value));
        }
        Ok(result)
    }
}

export!(Echo);
