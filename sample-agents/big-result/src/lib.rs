//! Big-result agent: returns one very large result value.
//!
//! Exercises the node's bound on the result size: the result map has one
//! entry `big` whose value is `x` repeated `size` bytes (input-ref
//! `size`, 16 MiB by default).

wit_bindgen::generate!({
    world: "agent",
    path: "../../wit",
    generate_all,
});

const DEFAULT_SIZE: usize = 16 * 1024 * 1024;

struct BigResult;

impl Guest for BigResult {
    fn run(context: RunContext) -> Result<StringMap, AgentError> {
        let size = context
            .input_ref
            .iter()
            .rev()
            .find(|(key, _)| key == "size")
            .and_then(|(_, value)| value.parse().ok())
            .unwrap_or(DEFAULT_SIZE);
        Ok(vec![("big".to_string(), "x".repeat(size))])
    }
}

export!(BigResult);
