//! Spin-forever agent: a busy loop that never ends and never calls the host.
//!
//! Exercises CPU limits: only fuel exhaustion or the deadline (epoch
//! interruption) can stop it, since it never yields to the node.

wit_bindgen::generate!({
    world: "agent",
    path: "../../wit",
    generate_all,
});

struct SpinForever;

impl Guest for SpinForever {
    fn run(_context: RunContext) -> Result<StringMap, AgentError> {
        let mut counter: u64 = 0;
        loop {
            // `black_box` keeps the loop from being optimised away.
            counter = std::hint::black_box(counter.wrapping_add(1));
        }
    }
}

export!(SpinForever);
