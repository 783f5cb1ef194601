//! Echo agent: returns its input and its run context as the result map.
//!
//! Exercises the whole happy path of the node: the context the node builds
//! from a lease reaches the agent unchanged, and the agent's result map comes
//! back as the lease's `Complete`. It logs one line and never asks for its
//! budget, so two runs on the same input consume exactly the same fuel.
//! Written with the Rust SDK (`kit/rust/sdk`), on the agent world 0.2.0.

use node_runtime_agent::log::{self, Level};
use node_runtime_agent::{Context, Error, Output};

fn run(context: Context) -> Result<Output, Error> {
    log::write(Level::Info, "echo", &[("keys", &context.input_ref.len().to_string())]);
    let mut result = context.input_ref;
    result.insert("run_id".to_string(), context.run_id);
    result.insert("lease_id".to_string(), context.lease_id);
    result.insert("agent_id".to_string(), context.agent_id);
    result.insert("agent_version".to_string(), context.agent_version);
    result.insert("trace_id".to_string(), context.trace_id);
    for (key, value) in context.metadata {
        result.insert(format!("metadata.{key}"), value);
    }
    Ok(result)
}

node_runtime_agent::export!(run);
