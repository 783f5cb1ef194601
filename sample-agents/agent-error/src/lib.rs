//! Agent-error agent: gives up with a retryable error.
//!
//! Exercises the `err` side of `run`: the node must fail the lease with
//! kind `agent.error`, passing on the message and the retryable flag.

wit_bindgen::generate!({
    world: "agent",
    path: "../../wit",
    generate_all,
});

struct FailingAgent;

impl Guest for FailingAgent {
    fn run(_context: RunContext) -> Result<StringMap, AgentError> {
        Err(AgentError {
            message: "downstream system unavailable (sample agent-error)".to_string(),
            retryable: true,
        })
    }
}

export!(FailingAgent);
