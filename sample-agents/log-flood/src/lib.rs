//! Log-flood agent: writes far more log lines than any node should keep.
//!
//! Exercises the per-run log cap: `lines` info lines (input-ref `lines`,
//! 100000 by default), then one warn line of 1 MiB. The node must drop and
//! count what is past its cap and still complete the run.

use node_runtime::agent::log::{self, Level};

wit_bindgen::generate!({
    world: "agent",
    path: "../../wit",
    generate_all,
});

const DEFAULT_LINES: u64 = 100_000;
const HUGE_LINE: usize = 1024 * 1024;

struct LogFlood;

impl Guest for LogFlood {
    fn run(context: RunContext) -> Result<StringMap, AgentError> {
        let lines = context
            .input_ref
            .iter()
            .rev()
            .find(|(key, _)| key == "lines")
            .and_then(|(_, value)| value.parse().ok())
            .unwrap_or(DEFAULT_LINES);
        for i in 0..lines {
            log::log(
                Level::Info,
                &format!("flood line {i}"),
                &[("i".to_string(), i.to_string())],
            );
        }
        log::log(Level::Warn, &"y".repeat(HUGE_LINE), &[]);
        Ok(vec![("lines".to_string(), lines.to_string())])
    }
}

export!(LogFlood);
