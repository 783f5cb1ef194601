//! Stack-overflow agent: recurses without bound until the stack runs out.
//!
//! Exercises how the node reports a guest that exhausts its stack: the run
//! must fail with wasmtime's stack-overflow trap, and the node must stay
//! healthy. The local array is kept small on purpose: it lives on Rust's
//! 1 MiB shadow stack in linear memory, and with a big one that stack would
//! run out first (a `MemoryOutOfBounds` trap instead of `StackOverflow`).

use std::hint::black_box;

wit_bindgen::generate!({
    world: "agent",
    path: "../../wit",
    generate_all,
});

/// Recurse forever. The local array is passed through `black_box` and the
/// result is used after the call, so the recursion is neither removed nor
/// turned into a loop.
#[allow(unconditional_recursion)]
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let frame = black_box([depth as u8; 16]);
    let below = recurse(black_box(depth + 1));
    below.wrapping_add(u64::from(frame[(depth % 16) as usize]))
}

struct StackOverflow;

impl Guest for StackOverflow {
    fn run(_context: RunContext) -> Result<StringMap, AgentError> {
        let depth = recurse(0);
        Ok(vec![("depth".to_string(), depth.to_string())])
    }
}

export!(StackOverflow);
