//! Sleep-forever agent: blocks on a WASI monotonic clock and never wakes up.
//!
//! Exercises the run deadline when the agent burns no CPU: fuel never runs
//! out, so only the wall-clock timeout can end the run while the guest is
//! parked in a host call (`wasi:io/poll`).

use std::time::Duration;

wit_bindgen::generate!({
    world: "agent",
    path: "../../wit",
    generate_all,
});

struct SleepForever;

impl Guest for SleepForever {
    fn run(_context: RunContext) -> Result<StringMap, AgentError> {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

export!(SleepForever);
